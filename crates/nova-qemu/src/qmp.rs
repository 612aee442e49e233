//! A client for QEMU's machine protocol (QMP) over a Unix socket.
//!
//! QMP is line-delimited JSON: on connect QEMU sends a greeting
//! (`{"QMP": {"version": …, "capabilities": […]}}`); the client must send
//! `qmp_capabilities` before any other command. Each command is
//! `{"execute": NAME, "arguments": {…}, "id": N}` and is answered by
//! `{"return": …, "id": N}` or `{"error": {"class": …, "desc": …}, "id": N}`.
//! Asynchronous events (`{"event": NAME, "data": …, "timestamp": …}`) can
//! arrive between answers. The protocol is documented in QEMU's
//! `docs/interop/qmp-spec.rst`.
//!
//! This client sends one command at a time and gives every command a fresh
//! `id`. An answer is handed only to the command whose `id` it carries:
//!
//! - an answer with an earlier `id` is *late*: its command timed out (or its
//!   future was dropped) and already returned. It is discarded, so it can
//!   never be taken for the answer to the command after it;
//! - an event is skipped (the last few are kept for diagnostics, see
//!   [`QmpClient::recent_events`]);
//! - anything else (a later `id`, no `id`, not JSON) is a protocol error.
//!
//! Reading is cancel-safe: bytes read from the socket stay in the client's
//! buffer until a whole line is there, so a timeout that fires in the middle
//! of an answer loses nothing and the next command finds the stream in step.
//! Writing cannot be made so: a command cut short while it was being sent
//! leaves half a request in QEMU's parser, and the client refuses further
//! commands with [`QmpError::Desynchronized`] (reconnect to recover).

use std::collections::VecDeque;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

/// Longest QMP line accepted, to bound memory if the peer misbehaves.
const MAX_LINE: usize = 1 << 20;
/// How many recent events are kept for diagnostics.
const KEPT_EVENTS: usize = 16;

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
    /// An earlier command was cut short while it was being sent, so QEMU may
    /// hold half a request; the connection cannot be trusted any more.
    #[error("the QMP connection is out of step after `{0}` was cut short; reconnect")]
    Desynchronized(String),
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
    reader: LineReader,
    writer: OwnedWriteHalf,
    /// The id of the last command sent; answers with a smaller one are late.
    last_id: u64,
    /// The command whose request was being written when its future was
    /// dropped or timed out, if any.
    cut_short: Option<String>,
    timeout: Duration,
    events: VecDeque<Value>,
    /// How many events QEMU sent so far.
    events_seen: u64,
    /// The status the last `MIGRATION` event reported, and that event's
    /// number (counting from 1, as `events_seen` does).
    migration_status: Option<(u64, String)>,
    /// The greeting QEMU sent.
    pub greeting: Greeting,
}

impl QmpClient {
    /// Connects to the QMP socket at `path` and negotiates capabilities.
    /// Each command, the greeting included, must be answered within
    /// `timeout`.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Self, QmpError> {
        let stream = UnixStream::connect(path).await?;
        Self::handshake(stream, timeout).await
    }

    /// Negotiates capabilities on an established stream.
    pub async fn handshake(stream: UnixStream, timeout: Duration) -> Result<Self, QmpError> {
        let (read, writer) = stream.into_split();
        let mut reader = LineReader::new(read);
        let line = tokio::time::timeout(timeout, reader.next_line())
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
            last_id: 0,
            cut_short: None,
            timeout,
            events: VecDeque::new(),
            events_seen: 0,
            migration_status: None,
            greeting: hello.qmp,
        };
        client.execute("qmp_capabilities", None).await?;
        Ok(client)
    }

    /// Runs `command` with optional `arguments` and returns its `return`
    /// value. Sending the command and receiving its answer together take at
    /// most the client's timeout; an answer that comes later is discarded
    /// by whichever command reads it (see the module docs).
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        self.execute_passing(command, arguments, None).await
    }

    /// [`execute`](Self::execute), sending `fd` along with the request
    /// (`SCM_RIGHTS`), as `getfd` and `add-fd` expect.
    async fn execute_passing(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<Value, QmpError> {
        if let Some(earlier) = &self.cut_short {
            return Err(QmpError::Desynchronized(earlier.clone()));
        }
        self.last_id += 1;
        let id = self.last_id;
        let mut request = json!({ "execute": command, "id": id });
        if let Some(args) = arguments {
            request["arguments"] = args;
        }
        let mut line =
            serde_json::to_vec(&request).map_err(|e| QmpError::Protocol(e.to_string()))?;
        line.push(b'\n');
        let timeout = self.timeout;
        tokio::time::timeout(timeout, self.exchange(command, id, &line, fd))
            .await
            .map_err(|_| QmpError::Timeout(command.to_owned()))?
    }

    /// Sends one request and waits for its answer.
    async fn exchange(
        &mut self,
        command: &str,
        id: u64,
        request: &[u8],
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<Value, QmpError> {
        // Cleared only once the whole request is out: if this future is
        // dropped mid-write, the mark stays and poisons the connection.
        self.cut_short = Some(command.to_owned());
        match fd {
            None => self.writer.write_all(request).await?,
            Some(fd) => send_with_fd(self.writer.as_ref(), request, fd).await?,
        }
        self.cut_short = None;
        loop {
            let Some((msg, line)) = self.read_message().await? else {
                continue;
            };
            match msg.get("id").and_then(Value::as_u64) {
                Some(got) if got == id => return answer(command, &msg, &line),
                Some(got) if got < id => {
                    tracing::debug!(
                        id = got,
                        waiting_for = id,
                        "discarding a late QMP answer to a command that gave up"
                    );
                }
                _ => {
                    return Err(QmpError::Protocol(format!(
                        "an answer to no command sent (waiting for id {id}): {line}"
                    )));
                }
            }
        }
    }

    /// The last few asynchronous events QEMU sent (oldest first), e.g. a
    /// `SHUTDOWN` with its reason.
    pub fn recent_events(&self) -> impl Iterator<Item = &Value> {
        self.events.iter()
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

    /// Hands QEMU the file descriptor `fd` under `name` (`getfd`), for a
    /// later `fd:NAME` URI. QEMU keeps its own copy.
    pub async fn getfd(&mut self, name: &str, fd: BorrowedFd<'_>) -> Result<(), QmpError> {
        self.execute_passing("getfd", Some(json!({ "fdname": name })), Some(fd))
            .await
            .map(drop)
    }

    /// Sets the migration capabilities this client's migrations use:
    /// `events` (QEMU reports each status change as a `MIGRATION` event, so
    /// the end of a migration is seen at once instead of polled for) and
    /// `x-ignore-shared` as asked. With `x-ignore-shared` on both ends, RAM
    /// mapped from a shared file (`memory-backend-file,share=on`) is left
    /// out of the stream: the file itself holds it, and the loading QEMU maps
    /// it before the stream comes.
    async fn set_migration_capabilities(&mut self, ignore_shared: bool) -> Result<(), QmpError> {
        self.execute(
            "migrate-set-capabilities",
            Some(json!({ "capabilities": [
                { "capability": "events", "state": true },
                { "capability": "x-ignore-shared", "state": ignore_shared },
            ] })),
        )
        .await
        .map(drop)
    }

    /// Writes the paused VM's state to `file`: outgoing migration to an
    /// `fd:` (no helper process, no path QEMU must be able to open), at full
    /// speed, until QEMU's `MIGRATION` event says it completed. With
    /// `ignore_shared` (capability `x-ignore-shared`), RAM mapped from a
    /// shared file (`memory-backend-file,share=on`) is left out: the file
    /// itself holds it. Else the stream holds all of memory (zero pages
    /// skipped). The VM is left paused (`postmigrate`); `cont` resumes it.
    pub async fn save_to(
        &mut self,
        file: &std::fs::File,
        ignore_shared: bool,
    ) -> Result<(), QmpError> {
        self.set_migration_capabilities(ignore_shared).await?;
        self.execute(
            "migrate-set-parameters",
            Some(json!({ "max-bandwidth": MIGRATION_BANDWIDTH })),
        )
        .await?;
        self.migrate_over_fd("migrate", file).await
    }

    /// Loads a VM state written by [`save_to`](Self::save_to) from `file`
    /// into this QEMU, which was started with `-incoming defer`, and waits
    /// until it is loaded. `ignore_shared` must be what the state was saved
    /// with (its RAM then comes from the memory file QEMU mapped at start).
    /// The VM is then paused; `cont` runs it.
    pub async fn load_from(
        &mut self,
        file: &std::fs::File,
        ignore_shared: bool,
    ) -> Result<(), QmpError> {
        self.set_migration_capabilities(ignore_shared).await?;
        self.migrate_over_fd("migrate-incoming", file).await
    }

    /// Hands QEMU `file` and runs `command` (`migrate` or
    /// `migrate-incoming`) on it as an `fd:` URI, until the migration ends.
    async fn migrate_over_fd(
        &mut self,
        command: &str,
        file: &std::fs::File,
    ) -> Result<(), QmpError> {
        self.getfd(MIGRATION_FD, file.as_fd()).await?;
        let since = self.events_seen;
        self.execute(
            command,
            Some(json!({ "uri": format!("fd:{MIGRATION_FD}") })),
        )
        .await?;
        self.wait_for_migration(command, since).await
    }

    /// Waits for the `MIGRATION` event that ends the migration `command`
    /// started (`completed`, `failed` or `cancelled`), looking at the events
    /// after the `since`-th one. Unbounded here: the caller bounds it (a
    /// snapshot's or a boot's deadline). On failure, QEMU's reason comes
    /// from `query-migrate`.
    async fn wait_for_migration(&mut self, command: &str, since: u64) -> Result<(), QmpError> {
        loop {
            if let Some((seq, status)) = &self.migration_status
                && *seq > since
            {
                match status.as_str() {
                    "completed" => return Ok(()),
                    "failed" | "cancelled" => {
                        let info = self.execute("query-migrate", None).await?;
                        return Err(QmpError::Command {
                            command: command.to_owned(),
                            class: "MigrationFailed".into(),
                            desc: info["error-desc"]
                                .as_str()
                                .unwrap_or("no reason given")
                                .to_owned(),
                        });
                    }
                    _ => {}
                }
            }
            let Some((msg, line)) = self.read_message().await? else {
                continue;
            };
            match msg.get("id").and_then(Value::as_u64) {
                Some(got) if got <= self.last_id => {
                    tracing::debug!(id = got, "discarding a late QMP answer");
                }
                _ => {
                    return Err(QmpError::Protocol(format!(
                        "an answer to no command sent (waiting for a MIGRATION event): {line}"
                    )));
                }
            }
        }
    }

    /// Reads QEMU's next message: an answer, with its line, or `None` for
    /// an event, which is kept (see [`keep_event`](Self::keep_event)).
    async fn read_message(&mut self) -> Result<Option<(Value, String)>, QmpError> {
        let line = self.reader.next_line().await?;
        let msg: Value = serde_json::from_str(&line)
            .map_err(|e| QmpError::Protocol(format!("{line:?}: {e}")))?;
        if msg.get("event").is_some() {
            self.keep_event(msg);
            return Ok(None);
        }
        Ok(Some((msg, line)))
    }

    /// Keeps `msg`, an event, among the recent ones, and notes a migration's
    /// status.
    fn keep_event(&mut self, msg: Value) {
        tracing::debug!(event = %msg["event"], "QMP event");
        self.events_seen += 1;
        if msg["event"] == "MIGRATION"
            && let Some(status) = msg["data"]["status"].as_str()
        {
            self.migration_status = Some((self.events_seen, status.to_owned()));
        }
        if self.events.len() == KEPT_EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(msg);
    }

    /// Block device statistics (`query-blockstats`): the bytes read and
    /// written, summed over every device (saturating at `u64::MAX`: the
    /// counters are what QEMU says, and a huge one must not wrap the sum).
    pub async fn block_bytes(&mut self) -> Result<(u64, u64), QmpError> {
        let value = self.execute("query-blockstats", None).await?;
        let mut read = 0u64;
        let mut written = 0u64;
        for dev in value.as_array().into_iter().flatten() {
            let stats = &dev["stats"];
            read = read.saturating_add(stats["rd_bytes"].as_u64().unwrap_or(0));
            written = written.saturating_add(stats["wr_bytes"].as_u64().unwrap_or(0));
        }
        Ok((read, written))
    }
}

/// Name under which the migration file descriptor is handed to QEMU.
const MIGRATION_FD: &str = "nova-migration";
/// Migration bandwidth cap in bytes per second: a file is no network link,
/// so effectively none (QEMU's default is 128 MiB/s).
const MIGRATION_BANDWIDTH: u64 = 64 << 30;

/// Writes all of `bytes` to `stream`, passing `fd` with the first byte
/// (`SCM_RIGHTS`); QEMU takes the descriptor with the message it came with.
async fn send_with_fd(
    stream: &UnixStream,
    bytes: &[u8],
    fd: BorrowedFd<'_>,
) -> std::io::Result<()> {
    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    let mut sent = 0;
    while sent < bytes.len() {
        stream.writable().await?;
        let rest = &bytes[sent..];
        let first = sent == 0;
        let result = stream.try_io(tokio::io::Interest::WRITABLE, || {
            let iov = [std::io::IoSlice::new(rest)];
            if first {
                let fds = [fd];
                let mut space =
                    [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
                let mut control = SendAncillaryBuffer::new(&mut space);
                control.push(SendAncillaryMessage::ScmRights(&fds));
                Ok(rustix::net::sendmsg(
                    stream,
                    &iov,
                    &mut control,
                    SendFlags::NOSIGNAL,
                )?)
            } else {
                Ok(rustix::net::send(stream, rest, SendFlags::NOSIGNAL)?)
            }
        });
        match result {
            Ok(n) => sent += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The `return` of an answer to `command`, or its `error` as a typed error.
fn answer(command: &str, msg: &Value, line: &str) -> Result<Value, QmpError> {
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
    Err(QmpError::Protocol(format!(
        "neither return nor error: {line}"
    )))
}

/// Splits the socket's bytes into lines, cancel-safely: what has been read
/// but not yet returned as a line stays in `buf` across cancelled calls.
#[derive(Debug)]
struct LineReader {
    read: OwnedReadHalf,
    buf: Vec<u8>,
    /// How much of `buf` is known to hold no newline.
    scanned: usize,
}

impl LineReader {
    fn new(read: OwnedReadHalf) -> Self {
        Self {
            read,
            buf: Vec::new(),
            scanned: 0,
        }
    }

    /// The next line, without its newline. Cancel-safe.
    async fn next_line(&mut self) -> Result<String, QmpError> {
        loop {
            if let Some(pos) = self.buf[self.scanned..].iter().position(|&b| b == b'\n') {
                let end = self.scanned + pos;
                let mut line: Vec<u8> = self.buf.drain(..=end).collect();
                line.pop();
                self.scanned = 0;
                return String::from_utf8(line).map_err(|e| QmpError::Protocol(e.to_string()));
            }
            self.scanned = self.buf.len();
            if self.buf.len() > MAX_LINE {
                return Err(QmpError::Protocol(format!(
                    "a line longer than {MAX_LINE} bytes"
                )));
            }
            // `read_buf` is cancel-safe: a cancelled call has read nothing.
            self.buf.reserve(8192);
            if self.read.read_buf(&mut self.buf).await? == 0 {
                return Err(QmpError::Closed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The client against a scripted QMP peer on a socket pair.

    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    use tokio::sync::oneshot;

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

    /// Found with the `qmp_replies` fuzz target: two devices whose
    /// `rd_bytes` sum past `u64::MAX` panicked `block_bytes` with "attempt
    /// to add with overflow" (and wrapped in a release build).
    #[tokio::test]
    async fn block_bytes_of_huge_counters_saturate_instead_of_overflowing() {
        let (a, b) = UnixStream::pair().unwrap();
        let _peer = fake_qemu(b, |req| match req["execute"].as_str().unwrap() {
            "query-blockstats" => vec![ok(
                &req,
                json!([
                    {"device": "vda", "stats": {"rd_bytes": u64::MAX, "wr_bytes": 7}},
                    {"device": "vdb", "stats": {"rd_bytes": 1, "wr_bytes": 8}},
                ]),
            )],
            _ => vec![ok(&req, json!({}))],
        });
        let mut qmp = QmpClient::handshake(a, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(qmp.block_bytes().await.unwrap(), (u64::MAX, 15));
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

    /// A scripted peer for tests that need to control the order of lines:
    /// sends the greeting, answers `qmp_capabilities`, then returns the
    /// stream for the test to drive line by line.
    async fn scripted_peer(
        peer: UnixStream,
    ) -> (tokio::io::Lines<BufReader<OwnedReadHalf>>, OwnedWriteHalf) {
        let (r, mut w) = peer.into_split();
        w.write_all(format!("{GREETING}\n").as_bytes())
            .await
            .unwrap();
        let mut lines = BufReader::new(r).lines();
        let caps: Value = serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
        assert_eq!(caps["execute"], "qmp_capabilities");
        w.write_all(format!("{}\n", ok(&caps, json!({}))).as_bytes())
            .await
            .unwrap();
        (lines, w)
    }

    async fn next_request(lines: &mut tokio::io::Lines<BufReader<OwnedReadHalf>>) -> Value {
        serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap()
    }

    fn status(req: &Value, status: &str) -> String {
        ok(
            req,
            json!({"running": status == "running", "status": status, "singlestep": false}),
        )
    }

    /// The fault: QEMU answered a command after the client had given up on
    /// it, and the client handed that answer to the next command (or, as
    /// this client once did, failed the next command with "answer for
    /// another command"). The peer holds back the first answer until the
    /// second command arrives, so the first answer is late by construction.
    #[tokio::test]
    async fn late_answer_after_timeout_is_discarded_not_handed_to_the_next_command() {
        let (a, b) = UnixStream::pair().unwrap();
        let peer = tokio::spawn(async move {
            let (mut lines, mut w) = scripted_peer(b).await;
            let first = next_request(&mut lines).await;
            let second = next_request(&mut lines).await;
            // The late answer (a different state, so handing it over would
            // show), an event, then the answer that belongs to `second`.
            let out = format!(
                "{}\n{}\n{}\n",
                status(&first, "paused"),
                r#"{"event": "RESUME", "timestamp": {"seconds": 1, "microseconds": 2}}"#,
                status(&second, "running"),
            );
            w.write_all(out.as_bytes()).await.unwrap();
            let third = next_request(&mut lines).await;
            w.write_all(format!("{}\n", ok(&third, json!({}))).as_bytes())
                .await
                .unwrap();
            (first, second, third)
        });
        let mut qmp = QmpClient::handshake(a, Duration::from_millis(200))
            .await
            .unwrap();
        let e = qmp.query_status().await.unwrap_err();
        assert!(
            matches!(&e, QmpError::Timeout(c) if c == "query-status"),
            "{e:?}"
        );
        // Answered with its own reply, not the late "paused".
        let now = qmp.query_status().await.unwrap();
        assert_eq!(now.status, "running");
        assert!(now.running);
        // Nothing left over for the command after.
        qmp.cont().await.unwrap();
        assert_eq!(
            qmp.recent_events()
                .map(|e| e["event"].as_str().unwrap())
                .collect::<Vec<_>>(),
            ["RESUME"]
        );
        let (first, second, third) = peer.await.unwrap();
        let ids: Vec<u64> = [&first, &second, &third]
            .iter()
            .map(|r| r["id"].as_u64().unwrap())
            .collect();
        assert!(
            ids[0] < ids[1] && ids[1] < ids[2],
            "ids {ids:?} must be distinct and rising"
        );
    }

    /// The fault: a timeout that fired in the middle of an answer dropped
    /// the half already read, and the rest of that line then broke the next
    /// command. The peer sends half the first answer at once and the rest
    /// only after the second command arrives.
    #[tokio::test]
    async fn answer_split_by_a_timeout_keeps_the_stream_in_step() {
        let (a, b) = UnixStream::pair().unwrap();
        let _peer = tokio::spawn(async move {
            let (mut lines, mut w) = scripted_peer(b).await;
            let first = next_request(&mut lines).await;
            let late = format!("{}\n", status(&first, "paused"));
            let (head, tail) = late.split_at(late.len() / 2);
            w.write_all(head.as_bytes()).await.unwrap();
            let second = next_request(&mut lines).await;
            w.write_all(format!("{tail}{}\n", status(&second, "running")).as_bytes())
                .await
                .unwrap();
            // Keep the connection open until the client is done.
            let _ = lines.next_line().await;
        });
        let mut qmp = QmpClient::handshake(a, Duration::from_millis(200))
            .await
            .unwrap();
        assert!(matches!(
            qmp.query_status().await,
            Err(QmpError::Timeout(_))
        ));
        assert_eq!(qmp.query_status().await.unwrap().status, "running");
    }

    /// A request cut short while being written leaves half a command in
    /// QEMU's parser; the client must refuse to go on rather than send the
    /// next command after it. The peer never reads, so a request larger
    /// than the socket buffer cannot be written in time.
    #[tokio::test]
    async fn request_cut_short_while_sending_refuses_further_commands() {
        let (a, b) = UnixStream::pair().unwrap();
        let (done_tx, done_rx) = oneshot::channel::<()>();
        let _peer = tokio::spawn(async move {
            let (_lines, _w) = scripted_peer(b).await;
            // Hold the socket open, unread, until the test ends.
            let _ = done_rx.await;
        });
        let mut qmp = QmpClient::handshake(a, Duration::from_millis(200))
            .await
            .unwrap();
        let big = "x".repeat(16 << 20);
        let e = qmp
            .execute("human-monitor-command", Some(json!({"command-line": big})))
            .await
            .unwrap_err();
        assert!(matches!(&e, QmpError::Timeout(_)), "{e:?}");
        let e = qmp.query_status().await.unwrap_err();
        assert!(
            matches!(&e, QmpError::Desynchronized(c) if c == "human-monitor-command"),
            "{e:?}"
        );
        drop(done_tx);
    }

    #[tokio::test]
    async fn an_answer_to_no_command_sent_is_a_protocol_error() {
        let (a, b) = UnixStream::pair().unwrap();
        let _peer = fake_qemu(b, |req| {
            if req["execute"] == "qmp_capabilities" {
                vec![ok(&req, json!({}))]
            } else {
                let ahead = req["id"].as_u64().unwrap() + 5;
                vec![json!({"return": {}, "id": ahead}).to_string()]
            }
        });
        let mut qmp = QmpClient::handshake(a, Duration::from_secs(5))
            .await
            .unwrap();
        let e = qmp.stop().await.unwrap_err();
        assert!(
            matches!(&e, QmpError::Protocol(m) if m.contains("no command sent")),
            "{e:?}"
        );
    }
}
