//! A client for QEMU's machine protocol (QMP) over a Unix socket.
//!
//! QMP is line-delimited JSON: on connect QEMU sends a greeting
//! (`{"QMP": {"version": …, "capabilities": […]}}`); the client must send
//! `qmp_capabilities` before any other command. Each command is
//! `{"execute": NAME, "arguments": {…}, "id": N}` and is answered by
//! `{"return": …, "id": N}` or `{"error": {"class": …, "desc": …}, "id": N}`.
//! Asynchronous events (`{"event": NAME, "data": …, "timestamp": …}`) can
//! arrive between answers. This client sends one command at a time, skips
//! events (keeping the last few for diagnostics) and matches answers by id.
//! The protocol is documented in QEMU's `docs/interop/qmp-spec.rst`.

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

/// Longest QMP line accepted, to bound memory if the peer misbehaves.
const MAX_LINE: usize = 1 << 20;

/// A QMP exchange failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QmpError {
    /// The socket could not be used.
    #[error("QMP socket I/O failed")]
    Io(#[from] std::io::Error),
    /// QEMU closed the connection.
    #[error("QEMU closed the QMP connection")]
    Closed,
    /// QEMU sent something that is not QMP.
    #[error("QEMU sent an invalid QMP message: {0}")]
    Protocol(String),
    /// QEMU answered a command with an error.
    #[error("QEMU refused `{command}`: {desc} ({class})")]
    Command {
        /// The command.
        command: String,
        /// QEMU's error class, e.g. `GenericError`.
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// No answer came in time.
    #[error("QEMU did not answer `{0}` in time")]
    Timeout(String),
}

/// QEMU's greeting.
#[derive(Clone, Debug, Deserialize)]
pub struct Greeting {
    /// Version information.
    pub version: Value,
    /// Capabilities offered.
    pub capabilities: Vec<Value>,
}

/// The answer to `query-status`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct Status {
    /// Whether the vCPUs are running.
    pub running: bool,
    /// The run state, e.g. `running`, `paused`, `shutdown`.
    pub status: String,
}

/// A connected, negotiated QMP session.
#[derive(Debug)]
pub struct QmpClient {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    next_id: u64,
    timeout: Duration,
    /// The greeting QEMU sent.
    pub greeting: Greeting,
}

impl QmpClient {
    /// Connects to the QMP socket at `path` and negotiates capabilities.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Self, QmpError> {
        let stream = UnixStream::connect(path).await?;
        Self::handshake(stream, timeout).await
    }

    /// Negotiates capabilities on an established stream.
    pub async fn handshake(stream: UnixStream, timeout: Duration) -> Result<Self, QmpError> {
        let (read, writer) = stream.into_split();
        let mut reader = BufReader::new(read);
        let line = tokio::time::timeout(timeout, read_line(&mut reader))
            .await
            .map_err(|_| QmpError::Timeout("greeting".into()))??;
        #[derive(Deserialize)]
        struct Hello {
            #[serde(rename = "QMP")]
            qmp: Greeting,
        }
        let hello: Hello = serde_json::from_str(&line)
            .map_err(|e| QmpError::Protocol(format!("bad greeting {line:?}: {e}")))?;
        let mut client = Self {
            reader,
            writer,
            next_id: 0,
            timeout,
            greeting: hello.qmp,
        };
        client.execute("qmp_capabilities", None).await?;
        Ok(client)
    }

    /// Runs `command` with optional `arguments` and returns its `return`
    /// value.
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        self.next_id += 1;
        let id = self.next_id;
        let mut request = json!({ "execute": command, "id": id });
        if let Some(args) = arguments {
            request["arguments"] = args;
        }
        let mut line =
            serde_json::to_vec(&request).map_err(|e| QmpError::Protocol(e.to_string()))?;
        line.push(b'\n');
        self.writer.write_all(&line).await?;
        let timeout = self.timeout;
        tokio::time::timeout(timeout, self.answer(command, id))
            .await
            .map_err(|_| QmpError::Timeout(command.to_owned()))?
    }

    async fn answer(&mut self, command: &str, id: u64) -> Result<Value, QmpError> {
        loop {
            let line = read_line(&mut self.reader).await?;
            let msg: Value = serde_json::from_str(&line)
                .map_err(|e| QmpError::Protocol(format!("{line:?}: {e}")))?;
            if msg.get("event").is_some() {
                tracing::debug!(event = %msg["event"], "QMP event");
                continue;
            }
            if msg.get("id").and_then(Value::as_u64) != Some(id) {
                return Err(QmpError::Protocol(format!(
                    "answer for another command: {line}"
                )));
            }
            if let Some(ret) = msg.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = msg.get("error") {
                let field = |k: &str| err.get(k).and_then(Value::as_str).unwrap_or("?").to_owned();
                return Err(QmpError::Command {
                    command: command.to_owned(),
                    class: field("class"),
                    desc: field("desc"),
                });
            }
            return Err(QmpError::Protocol(format!(
                "neither return nor error: {line}"
            )));
        }
    }

    /// Pauses the vCPUs (`stop`).
    pub async fn stop(&mut self) -> Result<(), QmpError> {
        self.execute("stop", None).await.map(drop)
    }

    /// Resumes the vCPUs (`cont`).
    pub async fn cont(&mut self) -> Result<(), QmpError> {
        self.execute("cont", None).await.map(drop)
    }

    /// Resets the machine (`system_reset`); with `-no-reboot` QEMU exits.
    pub async fn system_reset(&mut self) -> Result<(), QmpError> {
        self.execute("system_reset", None).await.map(drop)
    }

    /// Asks QEMU to exit at once (`quit`).
    pub async fn quit(&mut self) -> Result<(), QmpError> {
        self.execute("quit", None).await.map(drop)
    }

    /// The run state (`query-status`).
    pub async fn query_status(&mut self) -> Result<Status, QmpError> {
        let value = self.execute("query-status", None).await?;
        serde_json::from_value(value).map_err(|e| QmpError::Protocol(e.to_string()))
    }

    /// Block device statistics (`query-blockstats`): the bytes read and
    /// written, summed over every device.
    pub async fn block_bytes(&mut self) -> Result<(u64, u64), QmpError> {
        let value = self.execute("query-blockstats", None).await?;
        let mut read = 0;
        let mut written = 0;
        for dev in value.as_array().into_iter().flatten() {
            let stats = &dev["stats"];
            read += stats["rd_bytes"].as_u64().unwrap_or(0);
            written += stats["wr_bytes"].as_u64().unwrap_or(0);
        }
        Ok((read, written))
    }
}

async fn read_line(reader: &mut BufReader<OwnedReadHalf>) -> Result<String, QmpError> {
    let mut buf = Vec::new();
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Err(QmpError::Closed);
        }
        match available.iter().position(|&b| b == b'\n') {
            Some(pos) => {
                buf.extend_from_slice(&available[..pos]);
                reader.consume(pos + 1);
                break;
            }
            None => {
                let n = available.len();
                buf.extend_from_slice(available);
                reader.consume(n);
            }
        }
        if buf.len() > MAX_LINE {
            return Err(QmpError::Protocol(format!(
                "a line longer than {MAX_LINE} bytes"
            )));
        }
    }
    String::from_utf8(buf).map_err(|e| QmpError::Protocol(e.to_string()))
}

#[cfg(test)]
mod tests {
    //! The client against a scripted QMP peer on a socket pair.

    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

    use super::*;

    const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, "capabilities": ["oob"]}}"#;

    /// Runs a fake QEMU: sends the greeting, then for each request line
    /// calls `answer` and writes the lines it returns.
    fn fake_qemu(
        peer: UnixStream,
        answer: impl Fn(Value) -> Vec<String> + Send + 'static,
    ) -> tokio::task::JoinHandle<Vec<Value>> {
        tokio::spawn(async move {
            let (r, mut w) = peer.into_split();
            w.write_all(format!("{GREETING}\n").as_bytes())
                .await
                .unwrap();
            let mut lines = BufReader::new(r).lines();
            let mut seen = Vec::new();
            while let Ok(Some(line)) = lines.next_line().await {
                let req: Value = serde_json::from_str(&line).unwrap();
                for out in answer(req.clone()) {
                    w.write_all(format!("{out}\n").as_bytes()).await.unwrap();
                }
                seen.push(req);
            }
            seen
        })
    }

    fn ok(req: &Value, ret: Value) -> String {
        json!({"return": ret, "id": req["id"]}).to_string()
    }

    #[tokio::test]
    async fn negotiates_and_runs_commands_skipping_events() {
        let (a, b) = UnixStream::pair().unwrap();
        let peer = fake_qemu(b, |req| match req["execute"].as_str().unwrap() {
            "query-status" => vec![
                r#"{"event": "STOP", "data": {}, "timestamp": {"seconds": 1, "microseconds": 2}}"#
                    .into(),
                ok(
                    &req,
                    json!({"running": false, "status": "paused", "singlestep": false}),
                ),
            ],
            _ => vec![ok(&req, json!({}))],
        });
        let mut qmp = QmpClient::handshake(a, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(qmp.greeting.version["qemu"]["major"], 7);
        qmp.stop().await.unwrap();
        let status = qmp.query_status().await.unwrap();
        assert_eq!(
            status,
            Status {
                running: false,
                status: "paused".into()
            }
        );
        qmp.cont().await.unwrap();
        drop(qmp);
        let seen = peer.await.unwrap();
        let names: Vec<&str> = seen
            .iter()
            .map(|r| r["execute"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["qmp_capabilities", "stop", "query-status", "cont"]);
    }

    #[tokio::test]
    async fn command_errors_are_typed() {
        let (a, b) = UnixStream::pair().unwrap();
        let _peer = fake_qemu(b, |req| {
            if req["execute"] == "qmp_capabilities" {
                vec![ok(&req, json!({}))]
            } else {
                vec![json!({"error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}, "id": req["id"]}).to_string()]
            }
        });
        let mut qmp = QmpClient::handshake(a, Duration::from_secs(5))
            .await
            .unwrap();
        let e = qmp.execute("nope", None).await.unwrap_err();
        assert!(
            matches!(&e, QmpError::Command { class, .. } if class == "CommandNotFound"),
            "{e:?}"
        );
        assert!(e.to_string().contains("has not been found"));
    }

    #[tokio::test]
    async fn silence_times_out_and_close_is_reported() {
        let (a, b) = UnixStream::pair().unwrap();
        let _peer = fake_qemu(b, |req| {
            if req["execute"] == "qmp_capabilities" {
                vec![ok(&req, json!({}))]
            } else {
                vec![]
            }
        });
        let mut qmp = QmpClient::handshake(a, Duration::from_millis(200))
            .await
            .unwrap();
        assert!(matches!(qmp.stop().await, Err(QmpError::Timeout(c)) if c == "stop"));

        let (a, b) = UnixStream::pair().unwrap();
        drop(b);
        assert!(matches!(
            QmpClient::handshake(a, Duration::from_secs(1)).await,
            Err(QmpError::Closed)
        ));

        let (a, mut b) = UnixStream::pair().unwrap();
        b.write_all(b"not json\n").await.unwrap();
        assert!(matches!(
            QmpClient::handshake(a, Duration::from_secs(1)).await,
            Err(QmpError::Protocol(_))
        ));
    }
}
