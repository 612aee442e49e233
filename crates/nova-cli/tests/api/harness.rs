//! The test harness: a `nova serve` process per test ([`Daemon`], killed
//! with everything it started on drop) and a small HTTP / WebSocket client
//! ([`Api`]) that speaks to it over its Unix socket or over TCP.
//!
//! Every daemon gets its own temporary `$NOVA_HOME` under /tmp whose
//! `templates` is a symlink to the installed templates, so tests never touch
//! a daemon someone else runs on /var/lib/nova. Sandboxes run detached (the
//! daemon's QEMU provider), so they outlive a killed daemon: the guard finds
//! them by their command line, which names the temporary `$NOVA_HOME`, and
//! kills them by pid.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::Frame;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// The installed templates the tests boot (the operator's `$NOVA_HOME`).
const INSTALLED_TEMPLATES: &str = "/var/lib/nova/templates";
/// How long a daemon may take to answer `/v1/health` after its start
/// (re-attaching sandboxes included).
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Polls `condition` every 50 ms until it holds or `timeout` passes; says
/// whether it held.
pub async fn wait_until<F, Fut>(timeout: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if condition().await {
            return true;
        }
        if start.elapsed() >= timeout {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The templates directory the tests use, or `None` (after a SKIP line)
/// when it is not built and `NOVA_SKIP_VM_TESTS=1`.
pub fn templates(test: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("NOVA_TEST_TEMPLATES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(INSTALLED_TEMPLATES));
    if dir.join("minimal/minimal.json").is_file() {
        return Some(dir);
    }
    if std::env::var_os("NOVA_SKIP_VM_TESTS").is_some_and(|v| v == "1") {
        eprintln!(
            "SKIP {test}: no minimal template in {} (NOVA_SKIP_VM_TESTS=1)",
            dir.display()
        );
        return None;
    }
    panic!(
        "the minimal template is not built in {}; run `make images` (or set NOVA_TEST_TEMPLATES)",
        dir.display()
    );
}

/// How to start a daemon.
#[derive(Clone, Debug, Default)]
pub struct DaemonOptions {
    /// The text of `$NOVA_HOME/policy.toml`.
    pub policy: String,
    /// Also listen on TCP (127.0.0.1, a free port).
    pub tcp: bool,
}

/// A policy that keeps tests cheap: no network unless asked, the minimal
/// template by default, `extra` appended (TOML sections).
pub fn cheap_policy(extra: &str) -> String {
    format!("[templates]\ndefault = \"minimal\"\n\n[network]\ndefault = false\n\n{extra}\n",)
}

/// A `nova serve` process on its own temporary `$NOVA_HOME`. Dropping it
/// kills the daemon's process group and every process whose command line
/// names the `$NOVA_HOME` (its detached VMMs), then removes the directory.
#[derive(Debug)]
pub struct Daemon {
    home: PathBuf,
    options: DaemonOptions,
    child: Option<Child>,
    tcp: Option<SocketAddr>,
}

impl Daemon {
    /// Starts a daemon and waits until it answers `/v1/health`; `None` when
    /// VM tests are skipped (see [`templates`]).
    pub async fn start(test: &str, options: DaemonOptions) -> Option<Self> {
        let templates = templates(test)?;
        let home = tempfile::Builder::new()
            .prefix("nova-api-")
            .tempdir_in("/tmp")
            .expect("a temporary NOVA_HOME")
            .keep();
        std::os::unix::fs::symlink(&templates, home.join("templates"))
            .expect("link the installed templates");
        std::fs::write(home.join("policy.toml"), &options.policy).expect("write policy.toml");
        let mut daemon = Self {
            home,
            options,
            child: None,
            tcp: None,
        };
        daemon.spawn().await;
        Some(daemon)
    }

    /// `$NOVA_HOME`.
    pub fn home(&self) -> &Path {
        &self.home
    }

    /// The daemon's stderr so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.home.join("serve.log")).unwrap_or_default()
    }

    /// A client over the Unix socket.
    pub fn api(&self) -> Api {
        Api::Unix(self.home.join("nova.sock"))
    }

    /// A client over TCP with `token` (`None`: no Authorization header).
    pub fn tcp_api(&self, token: Option<&str>) -> Api {
        Api::Tcp(
            self.tcp.expect("the daemon listens on TCP"),
            token.map(str::to_owned),
        )
    }

    /// The bearer token the daemon made at its first start.
    pub fn token(&self) -> String {
        std::fs::read_to_string(self.home.join("token"))
            .expect("the daemon wrote its token")
            .trim()
            .to_owned()
    }

    async fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.home.join("serve.log"))
            .expect("open serve.log");
        let mut command = Command::new(env!("CARGO_BIN_EXE_nova"));
        command.arg("serve");
        let tcp = if self.options.tcp {
            // The same port across a restart, so clients keep working.
            let addr = self.tcp.unwrap_or_else(free_port);
            command.args(["--listen", &addr.to_string()]);
            Some(addr)
        } else {
            None
        };
        self.tcp = tcp;
        use std::os::unix::process::CommandExt;
        command
            .env("NOVA_HOME", &self.home)
            .env("RUST_LOG", "nova=debug,info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup serve.log"))
            .stderr(log)
            // Its own process group, so the guard can kill it and whatever
            // it spawned into its group at once.
            .process_group(0);
        let mut child = command.spawn().expect("spawn nova serve");
        let api = self.api();
        let start = Instant::now();
        loop {
            if let Ok(reply) = api.try_get("/v1/health").await
                && reply.status == StatusCode::OK
            {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "nova serve exited ({status}) before answering:\n{}",
                    self.log()
                );
            }
            assert!(
                start.elapsed() < START_TIMEOUT,
                "nova serve did not answer /v1/health within {START_TIMEOUT:?}:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.child = Some(child);
    }

    /// `kill -9` of the daemon process alone (its detached VMs run on), and
    /// its reaping.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts a new daemon on the same `$NOVA_HOME` (after [`kill9`]).
    ///
    /// [`kill9`]: Self::kill9
    pub async fn restart(&mut self) {
        self.kill9();
        self.spawn().await;
    }

    /// Pids of the processes whose command line names this `$NOVA_HOME`
    /// (the VMMs; the daemon itself does not name it).
    pub fn processes(&self) -> Vec<(u32, String)> {
        processes_naming(&self.home)
    }

    /// The pids of QEMU processes of this `$NOVA_HOME`.
    pub fn qemu_pids(&self) -> Vec<u32> {
        self.processes()
            .into_iter()
            .filter(|(_, cmdline)| cmdline.contains("qemu"))
            .map(|(pid, _)| pid)
            .collect()
    }

    /// The sandbox directories under `$NOVA_HOME/sandboxes`.
    pub fn sandbox_dirs(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.home.join("sandboxes"))
            .map(|entries| entries.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(child) = &self.child {
            // SAFETY: kill(2) on a process group id we spawned; no memory
            // is involved.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
        }
        self.kill9();
        for (pid, _) in self.processes() {
            // SAFETY: as above, a pid whose command line names our own
            // temporary directory.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        let gone = {
            let start = Instant::now();
            while !self.processes().is_empty() && start.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(50));
            }
            self.processes().is_empty()
        };
        if !gone {
            eprintln!(
                "warning: processes of {} outlived SIGKILL",
                self.home.display()
            );
        }
        let _ = std::fs::remove_dir_all(&self.home);
    }
}

/// Processes whose command line contains `dir` (this process excepted).
pub fn processes_naming(dir: &Path) -> Vec<(u32, String)> {
    let needle = dir.to_string_lossy().into_owned();
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != me)
        .filter_map(|pid| {
            let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
            cmdline.contains(&needle).then_some((pid, cmdline))
        })
        .collect()
}

/// A free TCP port on 127.0.0.1 (free when asked; the daemon binds it next).
fn free_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("its address")
}

/// A body a test sends.
pub type TestBody = BoxBody<Bytes, std::convert::Infallible>;

/// A body of `bytes` sent whole (with a Content-Length).
pub fn full(bytes: impl Into<Bytes>) -> TestBody {
    Full::new(bytes.into()).boxed()
}

/// A body sent in `chunk`-byte frames without a Content-Length (chunked
/// transfer encoding): the server sees a stream.
pub fn chunked(bytes: Vec<u8>, chunk: usize) -> TestBody {
    let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = bytes
        .chunks(chunk)
        .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
        .collect();
    BodyExt::boxed(StreamBody::new(futures_util::stream::iter(frames)))
}

/// A response, read whole.
#[derive(Debug)]
pub struct Reply {
    /// Its status.
    pub status: StatusCode,
    /// Its headers.
    pub headers: hyper::HeaderMap,
    /// Its body.
    pub body: Bytes,
}

impl Reply {
    /// The body as JSON (panics with the body when it is not).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The Content-Type.
    pub fn content_type(&self) -> &str {
        self.headers
            .get(hyper::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    /// Asserts the status, printing the body when it differs; returns self.
    #[track_caller]
    pub fn expect(self, status: u16) -> Self {
        assert_eq!(
            self.status.as_u16(),
            status,
            "expected {status}, got {}: {}",
            self.status,
            self.text()
        );
        self
    }

    /// Asserts a problem+json response with `status` and `code`; returns
    /// its `detail`.
    #[track_caller]
    pub fn problem(self, status: u16, code: &str) -> String {
        let reply = self.expect(status);
        assert_eq!(
            reply.content_type(),
            "application/problem+json",
            "{}",
            reply.text()
        );
        let body = reply.json();
        assert_eq!(body["code"], code, "{body}");
        assert_eq!(body["status"], status, "{body}");
        body["detail"].as_str().unwrap_or_default().to_owned()
    }
}

/// Where a client connects.
#[derive(Clone, Debug)]
pub enum Api {
    /// The daemon's Unix socket.
    Unix(PathBuf),
    /// TCP, with a bearer token or none.
    Tcp(SocketAddr, Option<String>),
}

/// A connection, whichever transport.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static> Io for T {}

impl Api {
    async fn connect(&self) -> std::io::Result<Box<dyn Io>> {
        Ok(match self {
            Api::Unix(path) => Box::new(tokio::net::UnixStream::connect(path).await?),
            Api::Tcp(addr, _) => Box::new(tokio::net::TcpStream::connect(addr).await?),
        })
    }

    /// Sends one request on a new connection and reads the whole answer.
    pub async fn try_send(
        &self,
        method: Method,
        path: &str,
        content_type: Option<&str>,
        body: TestBody,
    ) -> Result<Reply, Box<dyn std::error::Error + Send + Sync>> {
        let io = self.connect().await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
        tokio::spawn(conn);
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "localhost");
        if let Some(ct) = content_type {
            request = request.header(hyper::header::CONTENT_TYPE, ct);
        }
        if let Api::Tcp(_, Some(token)) = self {
            request = request.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let response = sender.send_request(request.body(body)?).await?;
        let (parts, body) = response.into_parts();
        let body = tokio::time::timeout(Duration::from_secs(120), body.collect())
            .await
            .map_err(|_| "the response body took over 120 s")??
            .to_bytes();
        Ok(Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }

    /// Like [`try_send`](Self::try_send), panicking on a transport error.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        content_type: Option<&str>,
        body: TestBody,
    ) -> Reply {
        self.try_send(method.clone(), path, content_type, body)
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    async fn try_get(&self, path: &str) -> Result<Reply, Box<dyn std::error::Error + Send + Sync>> {
        self.try_send(Method::GET, path, None, full(Bytes::new()))
            .await
    }

    /// `POST path` with a JSON `body` written by hand while the answer is
    /// read: a server that answers before it has read the whole body (413)
    /// may close the connection under a writer, which a plain client reports
    /// as a write error instead of the answer.
    pub async fn post_early_answer(&self, path: &str, body: Vec<u8>) -> Reply {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let io = self.connect().await.expect("connect");
        let (mut reader, mut writer) = tokio::io::split(io);
        let mut head = format!(
            "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n",
            body.len()
        );
        if let Api::Tcp(_, Some(token)) = self {
            head.push_str(&format!("Authorization: Bearer {token}\r\n"));
        }
        head.push_str("\r\n");
        let write = tokio::spawn(async move {
            // Errors are expected once the server has answered.
            let _ = writer.write_all(head.as_bytes()).await;
            let _ = writer.write_all(&body).await;
        });
        let mut raw = Vec::new();
        let mut buf = [0u8; 8192];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let (status, headers, start) = loop {
            let n = tokio::time::timeout_at(deadline, reader.read(&mut buf))
                .await
                .expect("an answer within 30 s")
                .expect("read the answer");
            assert!(n > 0, "the connection closed without an answer");
            raw.extend_from_slice(&buf[..n]);
            let mut parsed = [httparse::EMPTY_HEADER; 32];
            let mut response = httparse::Response::new(&mut parsed);
            if let Ok(httparse::Status::Complete(start)) = response.parse(&raw) {
                let mut headers = hyper::HeaderMap::new();
                for h in response.headers.iter() {
                    headers.append(
                        hyper::header::HeaderName::from_bytes(h.name.as_bytes()).expect("a name"),
                        hyper::header::HeaderValue::from_bytes(h.value).expect("a value"),
                    );
                }
                let status = StatusCode::from_u16(response.code.expect("a status")).expect("valid");
                break (status, headers, start);
            }
        };
        let length: usize = headers
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .expect("a Content-Length");
        while raw.len() < start + length {
            let n = tokio::time::timeout_at(deadline, reader.read(&mut buf))
                .await
                .expect("the body within 30 s")
                .expect("read the body");
            assert!(n > 0, "the connection closed in the body");
            raw.extend_from_slice(&buf[..n]);
        }
        write.abort();
        Reply {
            status,
            headers,
            body: Bytes::copy_from_slice(&raw[start..start + length]),
        }
    }

    /// `GET path`.
    pub async fn get(&self, path: &str) -> Reply {
        self.send(Method::GET, path, None, full(Bytes::new())).await
    }

    /// `DELETE path`.
    pub async fn delete(&self, path: &str) -> Reply {
        self.send(Method::DELETE, path, None, full(Bytes::new()))
            .await
    }

    /// `POST path` with a JSON body.
    pub async fn post(&self, path: &str, body: &Value) -> Reply {
        self.post_raw(path, body.to_string()).await
    }

    /// `POST path` with `body` as `application/json`, sent as is.
    pub async fn post_raw(&self, path: &str, body: impl Into<Bytes>) -> Reply {
        self.send(Method::POST, path, Some("application/json"), full(body))
            .await
    }

    /// Creates a sandbox of the minimal template sized like its snapshot
    /// (so it restores), without a network, with `extra` fields; asserts
    /// 201 and returns the body.
    pub async fn create(&self, extra: Value) -> Value {
        let mut body =
            json!({"template": "minimal", "memory_mb": 256, "vcpus": 1, "network": false});
        if let (Some(body), Value::Object(extra)) = (body.as_object_mut(), extra) {
            body.extend(extra);
        }
        let reply = self.post("/v1/sandboxes", &body).await.expect(201);
        reply.json()
    }

    /// Runs `script` to completion in sandbox `id`; asserts 200.
    pub async fn sh(&self, id: &str, script: &str) -> Value {
        self.post(
            &format!("/v1/sandboxes/{id}/exec"),
            &json!({"shell": script}),
        )
        .await
        .expect(200)
        .json()
    }

    /// Opens a WebSocket on `path`.
    pub async fn websocket(&self, path: &str) -> WsSession {
        let io = self.connect().await.expect("connect for a WebSocket");
        let mut request = format!("ws://localhost{path}")
            .into_client_request()
            .expect("a WebSocket URL");
        if let Api::Tcp(_, Some(token)) = self {
            request.headers_mut().insert(
                hyper::header::AUTHORIZATION,
                format!("Bearer {token}").parse().expect("a header value"),
            );
        }
        let (ws, _) = tokio_tungstenite::client_async(request, io)
            .await
            .unwrap_or_else(|e| panic!("WebSocket upgrade of {path}: {e}"));
        WsSession { ws }
    }
}

/// What a streamed exec produced until its end.
#[derive(Debug, Default)]
pub struct Transcript {
    /// The `exec_id` of the `started` event.
    pub exec_id: Option<u64>,
    /// Stdout bytes (the terminal's, with a tty).
    pub stdout: Vec<u8>,
    /// Stderr bytes.
    pub stderr: Vec<u8>,
    /// The `exit` event, if one came.
    pub exit: Option<Value>,
    /// The `error` event, if one came.
    pub error: Option<Value>,
}

impl Transcript {
    /// Stdout as text.
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

/// A WebSocket to an exec (`exec/stream`) or an attach (`execs/{id}/stream`).
pub struct WsSession {
    ws: tokio_tungstenite::WebSocketStream<Box<dyn Io>>,
}

impl std::fmt::Debug for WsSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WsSession")
    }
}

impl WsSession {
    /// Sends a text frame of `value`.
    pub async fn send_json(&mut self, value: &Value) {
        self.ws
            .send(Message::Text(value.to_string().into()))
            .await
            .expect("send a text frame");
    }

    /// Sends a binary frame (stdin).
    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        self.ws
            .send(Message::Binary(Bytes::copy_from_slice(bytes)))
            .await
            .expect("send a binary frame");
    }

    /// Reads frames into `transcript` until `until` holds for it, the exec
    /// ends, or `timeout` passes; says whether `until` held.
    pub async fn read_until(
        &mut self,
        transcript: &mut Transcript,
        timeout: Duration,
        until: impl Fn(&Transcript) -> bool,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if until(transcript) {
                return true;
            }
            if transcript.exit.is_some() || transcript.error.is_some() {
                return false;
            }
            let frame = match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Ok(Some(Ok(frame))) => frame,
                Ok(_) | Err(_) => return until(transcript),
            };
            match frame {
                Message::Binary(bytes) => match bytes.first() {
                    Some(1) => transcript.stdout.extend_from_slice(&bytes[1..]),
                    Some(2) => transcript.stderr.extend_from_slice(&bytes[1..]),
                    other => panic!("a binary frame with tag {other:?}"),
                },
                Message::Text(text) => {
                    let event: Value = serde_json::from_str(&text).expect("a JSON event");
                    match event["event"].as_str() {
                        Some("started") => transcript.exec_id = event["exec_id"].as_u64(),
                        Some("exit") => transcript.exit = Some(event),
                        Some("error") => transcript.error = Some(event),
                        other => panic!("an unknown event {other:?}: {text}"),
                    }
                }
                Message::Close(_) => return until(transcript),
                _ => {}
            }
        }
    }

    /// Reads until the `started` event; returns its exec id.
    pub async fn started(&mut self) -> Option<u64> {
        let mut t = Transcript::default();
        let ok = self
            .read_until(&mut t, Duration::from_secs(30), |t| {
                t.exec_id.is_some() || t.exit.is_some()
            })
            .await;
        assert!(ok, "no started event: {t:?}");
        t.exec_id
    }

    /// Reads everything until the exec ends (bounded by `timeout`).
    pub async fn finish(&mut self, transcript: &mut Transcript, timeout: Duration) {
        self.read_until(transcript, timeout, |t| {
            t.exit.is_some() || t.error.is_some()
        })
        .await;
    }
}
