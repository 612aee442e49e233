//! E2B's API on the daemon, so the unmodified `e2b` SDKs (and the tools
//! built on them) run on NovaSandbox.
//!
//! It is served on its own TCP listener (`nova serve --e2b-listen ADDR`),
//! which carries both of E2B's planes; a request is for the sandbox plane
//! when it names a sandbox, as the SDK does when `E2B_SANDBOX_URL` is set
//! (`E2b-Sandbox-Id` / `E2b-Sandbox-Port` headers) or by a
//! `<port>-<sandbox id>.<domain>` Host:
//!
//! ```text
//! request --(E2b-Sandbox-Id or <port>-<id>.* Host?)--+-- no --> control::router   X-API-Key = daemon token
//!                                                     |           /sandboxes, /v2/sandboxes ...
//!                                                     +-- yes, another port -> ports::proxy (into the guest)
//!                                                     +-- yes, 49983 -> envd             X-Access-Token
//!                                                                 GET  /health
//!                                                                 GET|POST /files             files.rs
//!                                                                 POST /process.Process/*     process.rs  (Connect, connect.rs)
//!                                                                 POST /filesystem.Filesystem/* filesystem.rs, watch.rs
//! ```
//!
//! envd runs in E2B's guests; here it is served by the daemon on the host,
//! over the same [`Daemon`] calls as `/v1`, so the operator's policy applies
//! identically. A sandbox's `envdAccessToken` is derived from the daemon's
//! token and the sandbox id (SHA-256), so it needs no state and only the
//! daemon can mint it. Requests for other guest ports are proxied to them
//! in the guest ([`ports`]).

pub mod connect;
pub mod control;
pub mod files;
pub mod filesystem;
pub mod ports;
pub mod process;
pub mod proto;
pub mod watch;
pub mod wire;

use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use nova_core::id::SandboxId;
use sha2::{Digest, Sha256};
use tower::ServiceExt;

use crate::auth::Token;
use crate::daemon::Daemon;
use connect::{Code, Codec, ConnectError, Framing};

/// The port envd listens on in E2B's guests (what the SDK asks for).
pub const ENVD_PORT: u16 = 49983;

/// The E2B API's state.
#[derive(Debug)]
pub struct E2b {
    daemon: Arc<Daemon>,
    token: Token,
    domain: String,
    processes: Arc<process::Processes>,
    watchers: watch::Watchers,
}

impl E2b {
    /// The E2B API over `daemon`, with `token` as the API key; `domain` is
    /// what sandboxes report as theirs (`<port>-<id>.<domain>` hosts).
    pub fn new(daemon: Arc<Daemon>, token: Token, domain: String) -> Arc<Self> {
        Arc::new(Self {
            daemon,
            token,
            domain,
            processes: Arc::new(process::Processes::default()),
            watchers: watch::Watchers::default(),
        })
    }

    /// The `envdAccessToken` of sandbox `id`.
    pub fn access_token(&self, id: &str) -> String {
        let mut h = Sha256::new();
        h.update(b"nova-e2b-envd\0");
        h.update(self.token.as_str().as_bytes());
        h.update(b"\0");
        h.update(id.as_bytes());
        h.finalize()
            .iter()
            .take(20)
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    fn access_token_matches(&self, id: &str, presented: &str) -> bool {
        use subtle::ConstantTimeEq;
        self.access_token(id)
            .as_bytes()
            .ct_eq(presented.as_bytes())
            .into()
    }
}

/// The sandbox and port a sandbox-plane request is for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// The sandbox id as given.
    pub sandbox: String,
    /// The guest port.
    pub port: u16,
}

/// The target a request names, if it is for the sandbox plane.
pub fn target(headers: &HeaderMap) -> Option<Target> {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    if let Some(sandbox) = header("e2b-sandbox-id").filter(|s| !s.is_empty()) {
        let port = header("e2b-sandbox-port")
            .and_then(|p| p.parse().ok())
            .unwrap_or(ENVD_PORT);
        return Some(Target {
            sandbox: sandbox.to_owned(),
            port,
        });
    }
    // <port>-<id>.<domain>[:port]
    let host = header("host")?;
    let first = host.split('.').next()?;
    let (port, sandbox) = first.split_once('-')?;
    let port: u16 = port.parse().ok()?;
    sandbox.parse::<SandboxId>().ok()?;
    Some(Target {
        sandbox: sandbox.to_owned(),
        port,
    })
}

/// Serves E2B's API on `listener` (the daemon's `token` is its API key)
/// until `stop` completes. A sandbox's `domain` is `localhost:<port>`, so
/// `get_host(port)` names `<port>-<id>.localhost:<port>`.
pub fn spawn(
    daemon: Arc<Daemon>,
    listener: tokio::net::TcpListener,
    token: Token,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> tokio::task::JoinHandle<std::io::Result<()>> {
    let domain = listener
        .local_addr()
        .map(|a| format!("localhost:{}", a.port()))
        .unwrap_or_else(|_| "localhost".into());
    let app = router(E2b::new(daemon, token, domain));
    // Streamed RPCs write small frames: without TCP_NODELAY each one waits
    // on the client's delayed ACK (commands.run('true') 72 ms instead of 20).
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(stop)
            .await
    })
}

/// The E2B listener's router: both planes.
pub fn router(e2b: Arc<E2b>) -> Router {
    let control = control::router(e2b.clone());
    let envd = envd_router(e2b.clone());
    Router::new().fallback(move |mut request: Request| {
        let control = control.clone();
        let envd = envd.clone();
        let e2b = e2b.clone();
        async move {
            let result = match target(request.headers()) {
                Some(t) if t.port != ENVD_PORT => Ok(guest_port(&e2b, &t, request).await),
                Some(t) => {
                    request.extensions_mut().insert(t);
                    envd.oneshot(request).await
                }
                None => control.oneshot(request).await,
            };
            match result {
                Ok(response) => response,
                Err(never) => match never {},
            }
        }
    })
}

fn envd_router(e2b: Arc<E2b>) -> Router {
    Router::new()
        .route("/health", axum::routing::get(health))
        .route("/files", axum::routing::get(files_get).post(files_post))
        .route("/{service}/{method}", axum::routing::post(rpc))
        .fallback(envd_unserved)
        .with_state(e2b)
}

/// Why a sandbox-plane request cannot be served, as (status, message).
#[derive(Debug)]
struct Refused(StatusCode, String);

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "code": self.0.as_u16(), "message": self.1 });
        (self.0, axum::Json(body)).into_response()
    }
}

impl From<Refused> for ConnectError {
    fn from(r: Refused) -> Self {
        let code = match r.0 {
            StatusCode::UNAUTHORIZED => Code::Unauthenticated,
            StatusCode::BAD_GATEWAY => Code::Unavailable,
            StatusCode::NOT_IMPLEMENTED => Code::Unimplemented,
            _ => Code::InvalidArgument,
        };
        ConnectError::new(code, r.1)
    }
}

/// Checks the target is envd's port, the token is the sandbox's, and the
/// sandbox is live; returns its id.
async fn admit(
    e2b: &E2b,
    request_target: Option<&Target>,
    headers: &HeaderMap,
    need_token: bool,
) -> Result<SandboxId, Refused> {
    let Some(t) = request_target else {
        return Err(Refused(
            StatusCode::BAD_REQUEST,
            "no sandbox named (E2b-Sandbox-Id)".into(),
        ));
    };
    debug_assert_eq!(t.port, ENVD_PORT, "other ports are proxied before this");
    if need_token {
        let presented = headers
            .get("x-access-token")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !e2b.access_token_matches(&t.sandbox, presented) {
            return Err(Refused(
                StatusCode::UNAUTHORIZED,
                "missing or wrong X-Access-Token for this sandbox".into(),
            ));
        }
    }
    let sandbox_gone = || {
        Refused(
            StatusCode::BAD_GATEWAY,
            format!("The sandbox {} was not found", t.sandbox),
        )
    };
    let id = e2b
        .daemon
        .known(&t.sandbox)
        .await
        .map_err(|_| sandbox_gone())?;
    match e2b.daemon.hypervisor().get(&id).await {
        Some(info) if info.state.is_live() => Ok(id),
        _ => Err(sandbox_gone()),
    }
}

/// A request for another guest port: proxied into the guest ([`ports`]).
async fn guest_port(e2b: &E2b, t: &Target, request: Request) -> Response {
    let gone = || {
        Refused(
            StatusCode::BAD_GATEWAY,
            format!("The sandbox {} was not found", t.sandbox),
        )
    };
    let Ok(id) = e2b.daemon.known(&t.sandbox).await else {
        return gone().into_response();
    };
    match e2b.daemon.hypervisor().get(&id).await {
        Some(info) if info.state == nova_core::state::SandboxState::Running => {
            ports::proxy(&e2b.daemon, &id, t.port, request).await
        }
        _ => gone().into_response(),
    }
}

async fn health(State(e2b): State<Arc<E2b>>, request: Request) -> Response {
    match admit(
        &e2b,
        request.extensions().get::<Target>(),
        request.headers(),
        false,
    )
    .await
    {
        Ok(_) => StatusCode::NO_CONTENT.into_response(),
        Err(r) => r.into_response(),
    }
}

async fn files_get(
    State(e2b): State<Arc<E2b>>,
    Query(q): Query<files::FilesQuery>,
    request: Request,
) -> Response {
    let id = match admit(
        &e2b,
        request.extensions().get::<Target>(),
        request.headers(),
        true,
    )
    .await
    {
        Ok(id) => id,
        Err(r) => return r.into_response(),
    };
    files::download(&e2b.daemon, &id, q)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn files_post(
    State(e2b): State<Arc<E2b>>,
    Query(q): Query<files::FilesQuery>,
    request: Request,
) -> Response {
    let id = match admit(
        &e2b,
        request.extensions().get::<Target>(),
        request.headers(),
        true,
    )
    .await
    {
        Ok(id) => id,
        Err(r) => return closing(r.into_response()),
    };
    let (parts, body) = request.into_parts();
    files::upload(&e2b.daemon, &id, q, &parts.headers, body)
        .await
        // The body may be unread (or half read) after an error.
        .unwrap_or_else(|e| closing(e.into_response()))
}

/// `response` with `Connection: close`: for answers given before the
/// request's body was read, so the client does not reuse a connection the
/// server is about to close (it would fail its next request there).
pub(crate) fn closing(mut response: Response) -> Response {
    response.headers_mut().insert(
        axum::http::header::CONNECTION,
        axum::http::HeaderValue::from_static("close"),
    );
    response
}

async fn envd_unserved(request: Request) -> Response {
    let (status, what) = if request.method() == Method::POST {
        (
            StatusCode::NOT_IMPLEMENTED,
            format!("RPC {}", request.uri().path()),
        )
    } else {
        (
            StatusCode::NOT_FOUND,
            format!("{} {}", request.method(), request.uri().path()),
        )
    };
    let e = ConnectError::unimplemented(&what);
    let body = serde_json::json!({ "code": e.code.as_str(), "message": e.message });
    closing(
        (
            status,
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            body.to_string(),
        )
            .into_response(),
    )
}

/// A Connect call: unary or server-streaming by method.
async fn rpc(
    State(e2b): State<Arc<E2b>>,
    Path((service, method)): Path<(String, String)>,
    request: Request,
) -> Response {
    let streaming = matches!(
        (service.as_str(), method.as_str()),
        ("process.Process", "Start" | "Connect" | "StreamInput")
            | ("filesystem.Filesystem", "WatchDir")
    );
    let framing = if streaming {
        Framing::Stream
    } else {
        Framing::Unary
    };
    let codec = connect::codec_of(request.headers(), framing);
    // Errors before the codec is known are written as JSON.
    let fail = |e: ConnectError| {
        if streaming {
            connect::stream_error(*codec.as_ref().unwrap_or(&Codec::Json), e)
        } else {
            e.into_response()
        }
    };
    let codec = match &codec {
        Ok(c) => *c,
        Err(e) => return closing(fail(e.clone())),
    };
    if method == "StreamInput" {
        // Refused before its (client-streamed) body is read.
        return closing(fail(ConnectError::unimplemented(
            "process.Process/StreamInput (client streaming; use SendInput: commands.send_stdin)",
        )));
    }
    let id = match admit(
        &e2b,
        request.extensions().get::<Target>(),
        request.headers(),
        true,
    )
    .await
    {
        Ok(id) => id,
        Err(r) => return closing(fail(r.into())),
    };
    let (parts, body) = request.into_parts();
    let body: Bytes = match axum::body::to_bytes(Body::new(body), connect::MAX_MESSAGE + 5).await {
        Ok(b) => b,
        Err(_) => {
            return closing(fail(ConnectError::new(
                Code::ResourceExhausted,
                "request message too large",
            )));
        }
    };
    let result = if streaming {
        stream_call(&e2b, &id, (codec, &parts.headers), &service, &method, &body).await
    } else {
        unary_call(&e2b, &id, codec, &service, &method, &body).await
    };
    result.unwrap_or_else(fail)
}

async fn stream_call(
    e2b: &Arc<E2b>,
    id: &SandboxId,
    (codec, headers): (Codec, &HeaderMap),
    service: &str,
    method: &str,
    body: &[u8],
) -> Result<Response, ConnectError> {
    match (service, method) {
        ("process.Process", "Start") => {
            let r = connect::decode_stream_request(codec, body)?;
            process::start(&e2b.daemon, &e2b.processes, id, (codec, headers), r).await
        }
        ("process.Process", "Connect") => {
            let r = connect::decode_stream_request(codec, body)?;
            process::connect(&e2b.daemon, &e2b.processes, id, (codec, headers), r).await
        }
        ("filesystem.Filesystem", "WatchDir") => {
            let r = connect::decode_stream_request(codec, body)?;
            watch::watch_dir(&e2b.daemon, id, (codec, headers), r).await
        }
        _ => Err(ConnectError::unimplemented(&format!("{service}/{method}"))),
    }
}

async fn unary_call(
    e2b: &Arc<E2b>,
    id: &SandboxId,
    codec: Codec,
    service: &str,
    method: &str,
    body: &[u8],
) -> Result<Response, ConnectError> {
    macro_rules! d {
        () => {
            connect::decode_unary(codec, body)?
        };
    }
    macro_rules! ok {
        ($m:expr) => {
            connect::unary_response(codec, $m)
        };
    }
    let (daemon, procs) = (&e2b.daemon, &e2b.processes);
    Ok(match (service, method) {
        ("process.Process", "List") => ok!(&process::list(daemon, procs, id).await?),
        ("process.Process", "SendSignal") => {
            ok!(&process::send_signal(daemon, procs, id, d!()).await?)
        }
        ("process.Process", "SendInput") => ok!(&process::send_input(procs, id, d!()).await?),
        ("process.Process", "CloseStdin") => ok!(&process::close_stdin(procs, id, d!())?),
        ("process.Process", "Update") => ok!(&process::update(daemon, procs, id, d!()).await?),
        ("filesystem.Filesystem", "Stat") => ok!(&filesystem::stat(daemon, id, d!()).await?),
        ("filesystem.Filesystem", "ListDir") => {
            ok!(&filesystem::list_dir(daemon, id, d!()).await?)
        }
        ("filesystem.Filesystem", "MakeDir") => {
            ok!(&filesystem::make_dir(daemon, id, d!()).await?)
        }
        ("filesystem.Filesystem", "Move") => {
            ok!(&filesystem::move_entry(daemon, id, d!()).await?)
        }
        ("filesystem.Filesystem", "Remove") => {
            filesystem::remove(daemon, id, d!()).await?;
            ok!(&wire::Empty {})
        }
        ("filesystem.Filesystem", "CreateWatcher") => {
            ok!(&e2b.watchers.create(daemon, id, d!()).await?)
        }
        ("filesystem.Filesystem", "GetWatcherEvents") => ok!(&e2b.watchers.events(id, &d!())?),
        ("filesystem.Filesystem", "RemoveWatcher") => {
            e2b.watchers.remove(id, &d!())?;
            ok!(&wire::Empty {})
        }
        _ => return Err(ConnectError::unimplemented(&format!("{service}/{method}"))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;
    use nova_core::config::SandboxConfig;
    use nova_core::error::{CreateSandboxError, ExecError, FileError, SandboxError};
    use nova_core::exec::{ExecRequest, ExecStream};
    use nova_core::hypervisor::{Hypervisor, HypervisorKind};
    use nova_core::metadata::SandboxInfo;
    use nova_core::sandbox::Sandbox;
    use nova_core::stats::SandboxStats;

    /// A provider with no sandboxes (and that makes none): enough for the
    /// API's auth and error paths without a VM.
    #[derive(Debug)]
    struct NoSandboxes;

    #[async_trait::async_trait]
    impl Hypervisor for NoSandboxes {
        fn kind(&self) -> HypervisorKind {
            HypervisorKind::Qemu
        }
        async fn create_sandbox(&self, _: SandboxConfig) -> Result<Sandbox, CreateSandboxError> {
            Err(CreateSandboxError::Unsupported {
                reason: "no sandboxes here".into(),
            })
        }
        async fn stop_sandbox(&self, id: &SandboxId, _: bool) -> Result<(), SandboxError> {
            Err(SandboxError::NotFound(id.clone()))
        }
        async fn pause_sandbox(&self, id: &SandboxId) -> Result<(), SandboxError> {
            Err(SandboxError::NotFound(id.clone()))
        }
        async fn resume_sandbox(&self, id: &SandboxId) -> Result<(), SandboxError> {
            Err(SandboxError::NotFound(id.clone()))
        }
        async fn get_sandbox_stats(&self, id: &SandboxId) -> Result<SandboxStats, SandboxError> {
            Err(SandboxError::NotFound(id.clone()))
        }
        async fn exec_stream(
            &self,
            id: &SandboxId,
            _: ExecRequest,
        ) -> Result<ExecStream, ExecError> {
            Err(ExecError::NotFound(id.clone()))
        }
        async fn write_file(
            &self,
            id: &SandboxId,
            _: &str,
            _: Vec<u8>,
            _: u32,
        ) -> Result<(), FileError> {
            Err(FileError::NotFound(id.clone()))
        }
        async fn read_file(&self, id: &SandboxId, _: &str) -> Result<Vec<u8>, FileError> {
            Err(FileError::NotFound(id.clone()))
        }
        async fn list(&self) -> Vec<SandboxInfo> {
            Vec::new()
        }
        async fn get(&self, _: &SandboxId) -> Option<SandboxInfo> {
            None
        }
    }

    /// The E2B router over a daemon with no sandboxes, and its API key.
    fn app(dir: &std::path::Path) -> (Router, Arc<E2b>, String) {
        let home = nova_core::home::NovaHome::at(dir);
        let daemon = Daemon::new(Arc::new(NoSandboxes), home, crate::Policy::default())
            .expect("records under a temp dir");
        let token = Token::load_or_create(&dir.join("token")).expect("a token under a temp dir");
        let key = token.as_str().to_owned();
        let e2b = E2b::new(daemon, token, "localhost:3000".into());
        (router(e2b.clone()), e2b, key)
    }

    async fn call(
        app: &Router,
        request: axum::http::Request<Body>,
    ) -> (StatusCode, HeaderMap, Vec<u8>) {
        let response = app.clone().oneshot(request).await.expect("infallible");
        let (parts, body) = response.into_parts();
        let bytes = axum::body::to_bytes(body, 1 << 20)
            .await
            .expect("a small body");
        (parts.status, parts.headers, bytes.to_vec())
    }

    fn get(uri: &str, headers: &[(&str, &str)]) -> axum::http::Request<Body> {
        let mut b = axum::http::Request::get(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(Body::empty()).expect("a valid request")
    }

    fn post(uri: &str, headers: &[(&str, &str)], body: Vec<u8>) -> axum::http::Request<Body> {
        let mut b = axum::http::Request::post(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(Body::from(body)).expect("a valid request")
    }

    #[tokio::test]
    async fn the_control_plane_wants_the_daemons_token_as_api_key() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let (app, _, key) = app(dir.path());
        let (status, headers, body) = call(&app, get("/sandboxes", &[])).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        // Refused before the body is read: the connection is not reused.
        assert_eq!(headers[axum::http::header::CONNECTION], "close");
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["code"], 401);
        assert!(v["message"].as_str().unwrap().contains("X-API-Key"), "{v}");
        let (status, _, _) = call(&app, get("/sandboxes", &[("x-api-key", "wrong")])).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let (status, _, body) = call(&app, get("/v2/sandboxes", &[("x-api-key", &key)])).await;
        assert_eq!(
            (status, body.as_slice()),
            (StatusCode::OK, b"[]".as_slice())
        );
        let (status, _, body) = call(&app, get("/sandboxes/sb-nope", &[("x-api-key", &key)])).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(String::from_utf8_lossy(&body).contains("was not found"));
        let (status, _, body) = call(&app, get("/templates", &[("x-api-key", &key)])).await;
        assert_eq!(status, StatusCode::NOT_IMPLEMENTED);
        assert!(String::from_utf8_lossy(&body).contains("GET /templates is not served"));
    }

    #[tokio::test]
    async fn the_sandbox_plane_wants_the_sandboxs_access_token() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let (app, e2b, _) = app(dir.path());
        let json = ("content-type", "application/json");
        let sandbox = ("e2b-sandbox-id", "sb-nope");
        let (status, _, body) = call(
            &app,
            post("/process.Process/List", &[json, sandbox], b"{}".to_vec()),
        )
        .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["code"], "unauthenticated");
        // The right token for a sandbox that is not there: unavailable,
        // with the words the SDK turns into SandboxNotRunningException.
        let token = e2b.access_token("sb-nope");
        let headers = [json, sandbox, ("x-access-token", token.as_str())];
        let (status, _, body) = call(
            &app,
            post("/process.Process/List", &headers, b"{}".to_vec()),
        )
        .await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["code"], "unavailable");
        assert!(
            v["message"].as_str().unwrap().contains("was not found"),
            "{v}"
        );
        // A streaming call fails inside a 200 stream, in its end frame.
        let stream = [
            ("content-type", "application/connect+json"),
            sandbox,
            ("x-access-token", token.as_str()),
        ];
        let (status, headers, body) = call(
            &app,
            post(
                "/process.Process/Start",
                &stream,
                connect::envelope(0, b"{}").to_vec(),
            ),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            headers[axum::http::header::CONTENT_TYPE],
            "application/connect+json"
        );
        let (flags, payload, rest) = connect::split_envelope(&body).unwrap();
        assert_eq!((flags, rest.is_empty()), (connect::FLAG_END_STREAM, true));
        let v: serde_json::Value = serde_json::from_slice(payload).unwrap();
        assert_eq!(v["error"]["code"], "unavailable");
        assert_ne!(e2b.access_token("sb-nope"), e2b.access_token("sb-other"));
    }

    #[test]
    fn requests_name_their_sandbox_by_header_or_host() {
        let mut h = HeaderMap::new();
        h.insert("host", HeaderValue::from_static("127.0.0.1:3000"));
        assert_eq!(target(&h), None);
        h.insert(
            "host",
            HeaderValue::from_static("8080-sb-abcdefghjkmnp.localhost:3000"),
        );
        assert_eq!(
            target(&h),
            Some(Target {
                sandbox: "sb-abcdefghjkmnp".into(),
                port: 8080
            })
        );
        h.insert("e2b-sandbox-id", HeaderValue::from_static("sb-x"));
        h.insert("e2b-sandbox-port", HeaderValue::from_static("49983"));
        assert_eq!(
            target(&h),
            Some(Target {
                sandbox: "sb-x".into(),
                port: ENVD_PORT
            })
        );
    }
}
