//! A typed client of the daemon (`nova serve`), over hyper.
//!
//! ```text
//! Client::from_env()        NOVA_URL=http://host:port (TCP + bearer token)
//!                           else $NOVA_HOME/nova.sock (Unix socket, no token)
//!   -> connect()            one connection per request (the daemon is local;
//!                           a Unix connect costs microseconds)
//!   -> send()               hyper http1 handshake, the request, the response
//!   -> check()              2xx, or the daemon's application/problem+json as
//!                           ClientError::Problem (its detail is what prints)
//!   -> typed helpers        create, list, get, stop, delete, exec, files, ...
//! websocket()               the same connection, upgraded by tokio-tungstenite
//!                           for streamed exec and attach (see [`ws`])
//! ```
//!
//! The wire types are the daemon's own (`nova_server::api::*`), so the client
//! and the server cannot drift apart. When nothing answers at the socket (it
//! is missing, or refuses connections), every call fails with
//! [`ClientError::NoDaemon`], whose message says how to start one.

pub(crate) mod ws;

use std::io;
use std::path::PathBuf;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, HOST};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use nova_server::api::exec::{ExecBody, ExecResult};
use nova_server::api::files::{FileStatView, UploadResult};
use nova_server::api::sandboxes::{CreateSandboxRequest, SandboxView, StatsView};
use nova_server::api::system::Health;
use nova_server::problem::{PROBLEM_JSON, Problem};
use novasandbox::core::NovaHome;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncWrite};

/// A request body: JSON bytes, or a stream (an upload).
pub(crate) type ReqBody = UnsyncBoxBody<Bytes, io::Error>;

/// A byte stream to the daemon, Unix or TCP.
pub(crate) trait Conn: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Conn for T {}

/// Where the daemon listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Endpoint {
    /// A Unix socket (no token).
    Unix(PathBuf),
    /// `host:port` over TCP (a bearer token).
    Tcp(String),
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unix(path) => write!(f, "{}", path.display()),
            Self::Tcp(authority) => write!(f, "http://{authority}"),
        }
    }
}

/// A call to the daemon failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ClientError {
    /// Nothing answers at the endpoint.
    #[error("no daemon at {at}: start one with `nova serve` (or set NOVA_URL)")]
    NoDaemon {
        /// The endpoint.
        at: Endpoint,
        /// The connect error.
        #[source]
        source: io::Error,
    },
    /// The endpoint exists but could not be connected to.
    #[error("cannot connect to the daemon at {at}")]
    Connect {
        /// The endpoint.
        at: Endpoint,
        /// The connect error.
        #[source]
        source: io::Error,
    },
    /// The daemon refused or failed the request; its problem says why.
    #[error("{}", .0.detail)]
    Problem(Box<Problem>),
    /// The daemon answered an error that is not a problem document.
    #[error("the daemon answered {status}: {body}")]
    Status {
        /// The HTTP status.
        status: StatusCode,
        /// The body, as text.
        body: String,
    },
    /// `NOVA_URL` is not `http://host:port`.
    #[error("NOVA_URL={0:?} is not http://HOST:PORT")]
    BadUrl(String),
    /// No `$NOVA_HOME` could be chosen.
    #[error(transparent)]
    Home(#[from] novasandbox::core::home::HomeError),
    /// The HTTP exchange broke off.
    #[error("HTTP to the daemon failed")]
    Http(#[from] hyper::Error),
    /// A request could not be built (a bad header value).
    #[error("cannot build the request")]
    Request(#[from] hyper::http::Error),
    /// The daemon's answer is not the JSON expected.
    #[error("the daemon's answer is not the JSON expected")]
    Decode(#[source] serde_json::Error),
    /// A streamed exec ended without the command's exit.
    #[error("the daemon closed the stream before the command ended")]
    StreamEnded,
    /// A WebSocket to the daemon failed.
    #[error("the WebSocket to the daemon failed")]
    WebSocket(#[from] Box<tokio_tungstenite::tungstenite::Error>),
}

/// A client of one daemon.
#[derive(Clone, Debug)]
pub(crate) struct Client {
    endpoint: Endpoint,
    token: Option<String>,
}

impl Client {
    /// The daemon named by the environment: `NOVA_URL` (with `NOVA_TOKEN`,
    /// else `$NOVA_HOME/token`) when set, else `$NOVA_HOME/nova.sock`.
    pub(crate) fn from_env() -> Result<Self, ClientError> {
        let url = std::env::var("NOVA_URL").ok().filter(|u| !u.is_empty());
        let home = NovaHome::resolve()?;
        match url {
            Some(url) => {
                let authority = parse_url(&url)?;
                let token = std::env::var("NOVA_TOKEN")
                    .ok()
                    .filter(|t| !t.is_empty())
                    .or_else(|| {
                        std::fs::read_to_string(home.root().join(nova_server::auth::TOKEN_FILE))
                            .ok()
                            .map(|t| t.trim().to_owned())
                    });
                Ok(Self {
                    endpoint: Endpoint::Tcp(authority),
                    token,
                })
            }
            None => Ok(Self::unix(home.root().join(nova_server::SOCKET_FILE))),
        }
    }

    /// The daemon on the Unix socket `path`.
    pub(crate) fn unix(path: impl Into<PathBuf>) -> Self {
        Self {
            endpoint: Endpoint::Unix(path.into()),
            token: None,
        }
    }

    /// Where this client sends its requests.
    pub(crate) fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// A new connection to the daemon.
    pub(crate) async fn connect(&self) -> Result<Box<dyn Conn>, ClientError> {
        let result: io::Result<Box<dyn Conn>> = match &self.endpoint {
            Endpoint::Unix(path) => tokio::net::UnixStream::connect(path)
                .await
                .map(|s| Box::new(s) as Box<dyn Conn>),
            Endpoint::Tcp(authority) => tokio::net::TcpStream::connect(authority.as_str())
                .await
                .map(|s| {
                    let _ = s.set_nodelay(true);
                    Box::new(s) as Box<dyn Conn>
                }),
        };
        result.map_err(|source| {
            let at = self.endpoint.clone();
            match source.kind() {
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
                    ClientError::NoDaemon { at, source }
                }
                _ => ClientError::Connect { at, source },
            }
        })
    }

    /// The `Host` header value.
    fn host(&self) -> &str {
        match &self.endpoint {
            Endpoint::Unix(_) => "localhost",
            Endpoint::Tcp(authority) => authority,
        }
    }

    /// A request builder with the host and token set.
    pub(crate) fn builder(&self, method: Method, path: &str) -> hyper::http::request::Builder {
        let mut builder = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, self.host());
        if let Some(token) = &self.token {
            builder = builder.header(AUTHORIZATION, format!("Bearer {token}"));
        }
        builder
    }

    /// Sends `request` on a new connection; the response body streams.
    pub(crate) async fn send(
        &self,
        request: Request<ReqBody>,
    ) -> Result<Response<Incoming>, ClientError> {
        let conn = self.connect().await?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(conn)).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "connection to the daemon ended");
            }
        });
        Ok(sender.send_request(request).await?)
    }

    /// Sends `request`; a non-2xx answer becomes an error.
    pub(crate) async fn call(
        &self,
        request: Request<ReqBody>,
    ) -> Result<Response<Incoming>, ClientError> {
        check(self.send(request).await?).await
    }

    /// `method path` with an optional JSON body; the answer's body, whole.
    async fn bytes(
        &self,
        method: Method,
        path: &str,
        body: Option<&(impl Serialize + ?Sized)>,
    ) -> Result<Bytes, ClientError> {
        let builder = self.builder(method, path);
        let request = match body {
            Some(body) => {
                let json = serde_json::to_vec(body).map_err(ClientError::Decode)?;
                builder
                    .header(CONTENT_TYPE, "application/json")
                    .body(full(json))?
            }
            None => builder.body(empty())?,
        };
        let response = self.call(request).await?;
        Ok(response.into_body().collect().await?.to_bytes())
    }

    /// `method path` with an optional JSON body, answered with JSON.
    async fn json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&(impl Serialize + ?Sized)>,
    ) -> Result<T, ClientError> {
        let bytes = self.bytes(method, path, body).await?;
        serde_json::from_slice(&bytes).map_err(ClientError::Decode)
    }

    /// `GET /v1/health`.
    pub(crate) async fn health(&self) -> Result<Health, ClientError> {
        self.json(Method::GET, "/v1/health", NO_BODY).await
    }

    /// `POST /v1/sandboxes`: a ready sandbox.
    pub(crate) async fn create(
        &self,
        request: &CreateSandboxRequest,
    ) -> Result<SandboxView, ClientError> {
        self.json(Method::POST, "/v1/sandboxes", Some(request))
            .await
    }

    /// `GET /v1/sandboxes?label=...`: every sandbox the label selector
    /// (`k=v,k2`) matches, oldest first.
    pub(crate) async fn list(&self, label: Option<&str>) -> Result<Vec<SandboxView>, ClientError> {
        let path = match label {
            Some(selector) => format!("/v1/sandboxes?label={}", encode(selector)),
            None => "/v1/sandboxes".to_owned(),
        };
        self.json(Method::GET, &path, NO_BODY).await
    }

    /// `GET /v1/sandboxes/{id}`.
    pub(crate) async fn get(&self, id: &str) -> Result<SandboxView, ClientError> {
        self.json(Method::GET, &sandbox_path(id, ""), NO_BODY).await
    }

    /// `POST /v1/sandboxes/{id}/stop`.
    pub(crate) async fn stop(&self, id: &str, force: bool) -> Result<SandboxView, ClientError> {
        let path = format!("{}?force={force}", sandbox_path(id, "/stop"));
        self.json(Method::POST, &path, NO_BODY).await
    }

    /// `DELETE /v1/sandboxes/{id}` (stops it first when live).
    pub(crate) async fn delete(&self, id: &str, force: bool) -> Result<(), ClientError> {
        let path = format!("{}?force={force}", sandbox_path(id, ""));
        self.bytes(Method::DELETE, &path, NO_BODY).await.map(drop)
    }

    /// `POST /v1/sandboxes/{id}/pause`; `persist`: to disk.
    pub(crate) async fn pause(&self, id: &str, persist: bool) -> Result<SandboxView, ClientError> {
        let path = format!("{}?persist={persist}", sandbox_path(id, "/pause"));
        self.json(Method::POST, &path, NO_BODY).await
    }

    /// `POST /v1/sandboxes/{id}/resume`.
    pub(crate) async fn resume(&self, id: &str) -> Result<SandboxView, ClientError> {
        self.json(Method::POST, &sandbox_path(id, "/resume"), NO_BODY)
            .await
    }

    /// `GET /v1/sandboxes/{id}/stats`.
    pub(crate) async fn stats(&self, id: &str) -> Result<StatsView, ClientError> {
        self.json(Method::GET, &sandbox_path(id, "/stats"), NO_BODY)
            .await
    }

    /// `GET /v1/sandboxes/{id}/logs`: the last `tail_bytes` of the console.
    pub(crate) async fn logs(
        &self,
        id: &str,
        tail_bytes: Option<u64>,
    ) -> Result<Bytes, ClientError> {
        let mut path = sandbox_path(id, "/logs");
        if let Some(tail) = tail_bytes {
            path.push_str(&format!("?tail_bytes={tail}"));
        }
        self.bytes(Method::GET, &path, NO_BODY).await
    }

    /// `POST /v1/sandboxes/{id}/exec`: runs a command to completion.
    pub(crate) async fn exec(&self, id: &str, body: &ExecBody) -> Result<ExecResult, ClientError> {
        self.json(Method::POST, &sandbox_path(id, "/exec"), Some(body))
            .await
    }

    /// `GET /v1/sandboxes/{id}/files/stat?path=`.
    pub(crate) async fn stat(&self, id: &str, path: &str) -> Result<FileStatView, ClientError> {
        let path = format!("{}?path={}", sandbox_path(id, "/files/stat"), encode(path));
        self.json(Method::GET, &path, NO_BODY).await
    }

    /// `PUT /v1/sandboxes/{id}/files?path=&mode=`: streams `body` into a
    /// guest file. `len`, when known, lets the daemon refuse an upload over
    /// its limit before any byte is sent.
    pub(crate) async fn upload(
        &self,
        id: &str,
        guest_path: &str,
        mode: Option<u32>,
        len: Option<u64>,
        body: ReqBody,
    ) -> Result<UploadResult, ClientError> {
        let mut path = format!("{}?path={}", sandbox_path(id, "/files"), encode(guest_path));
        if let Some(mode) = mode {
            path.push_str(&format!("&mode={mode:o}"));
        }
        let mut builder = self
            .builder(Method::PUT, &path)
            .header(CONTENT_TYPE, "application/octet-stream");
        if let Some(len) = len {
            builder = builder.header(CONTENT_LENGTH, len);
        }
        let response = self.call(builder.body(body)?).await?;
        let bytes = response.into_body().collect().await?.to_bytes();
        serde_json::from_slice(&bytes).map_err(ClientError::Decode)
    }

    /// `GET /v1/sandboxes/{id}/files?path=`: the response, its body a
    /// stream of the file's bytes.
    pub(crate) async fn download(
        &self,
        id: &str,
        guest_path: &str,
    ) -> Result<Response<Incoming>, ClientError> {
        let path = format!("{}?path={}", sandbox_path(id, "/files"), encode(guest_path));
        self.call(self.builder(Method::GET, &path).body(empty())?)
            .await
    }
}

/// No JSON body (a typed `None` for the helpers).
const NO_BODY: Option<&()> = None;

/// `/v1/sandboxes/{id}{rest}` with the id escaped.
pub(crate) fn sandbox_path(id: &str, rest: &str) -> String {
    format!("/v1/sandboxes/{}{rest}", encode(id))
}

/// A whole body.
pub(crate) fn full(bytes: impl Into<Bytes>) -> ReqBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// An empty body.
pub(crate) fn empty() -> ReqBody {
    full(Bytes::new())
}

/// Passes a 2xx response; turns any other into [`ClientError::Problem`]
/// (an `application/problem+json` body) or [`ClientError::Status`].
pub(crate) async fn check(response: Response<Incoming>) -> Result<Response<Incoming>, ClientError> {
    let status = response.status();
    if status.is_success() || status == StatusCode::SWITCHING_PROTOCOLS {
        return Ok(response);
    }
    let is_problem = response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with(PROBLEM_JSON));
    let body = response.into_body().collect().await?.to_bytes();
    if is_problem && let Ok(problem) = serde_json::from_slice::<Problem>(&body) {
        return Err(ClientError::Problem(Box::new(problem)));
    }
    Err(ClientError::Status {
        status,
        body: String::from_utf8_lossy(&body).trim().to_owned(),
    })
}

/// `http://host:port[/]` as `host:port`.
fn parse_url(url: &str) -> Result<String, ClientError> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| ClientError::BadUrl(url.to_owned()))?;
    let authority = rest.trim_end_matches('/');
    if authority.is_empty() || authority.contains('/') || !authority.contains(':') {
        return Err(ClientError::BadUrl(url.to_owned()));
    }
    Ok(authority.to_owned())
}

/// Percent-encodes everything but RFC 3986's unreserved characters and `/`
/// (so guest paths stay readable in logs).
pub(crate) fn encode(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    for byte in raw.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                out.push(byte as char);
            }
            _ => out.push_str(&format!("%{byte:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_are_percent_encoded() {
        assert_eq!(encode("/tmp/a b&c=d"), "/tmp/a%20b%26c%3Dd");
        assert_eq!(encode("team=a,stage"), "team%3Da%2Cstage");
        assert_eq!(encode("sb-abc_1.~"), "sb-abc_1.~");
    }

    #[test]
    fn nova_url_is_http_host_port() {
        assert_eq!(
            parse_url("http://127.0.0.1:7070/").unwrap(),
            "127.0.0.1:7070"
        );
        assert_eq!(parse_url("http://h:1").unwrap(), "h:1");
        assert!(parse_url("https://h:1").is_err());
        assert!(parse_url("http://h").is_err());
        assert!(parse_url("http://h:1/v1").is_err());
    }

    #[tokio::test]
    async fn a_missing_socket_says_how_to_start_a_daemon() {
        let dir = tempfile::tempdir().unwrap();
        let client = Client::unix(dir.path().join("nova.sock"));
        let e = client.health().await.unwrap_err();
        assert!(matches!(e, ClientError::NoDaemon { .. }), "{e:?}");
        assert_eq!(
            e.to_string(),
            format!(
                "no daemon at {}: start one with `nova serve` (or set NOVA_URL)",
                dir.path().join("nova.sock").display()
            )
        );
    }
}
