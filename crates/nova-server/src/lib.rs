//! `nova serve`: the NovaSandbox daemon.
//!
//! An HTTP API (axum) in front of one provider, for callers that do not own
//! the VMs: the CLI's client commands, the Python SDK, MCP clients. It
//! listens on a Unix socket (`$NOVA_HOME/nova.sock`, mode 0600, no token)
//! and optionally on TCP (bearer token, [`auth`]).
//!
//! ```text
//! HTTP request --(UDS | TCP + auth::require_token)--> api::router
//!   -> api::{sandboxes, exec, files, system}   extract (ApiJson/ApiQuery: 4xx problems)
//!        -> Daemon                             policy, admission, records, pool, metrics
//!             -> Arc<dyn Hypervisor>           the runtime: one task per sandbox
//!   <- JSON, a stream, or application/problem+json (problem)
//! background: Daemon::run_lifetimes (stops expired sandboxes, 1 s),
//!             Daemon::run_pool (keeps the warm pool full)
//! ```
//!
//! Callers are untrusted: what they send is the API's own types
//! ([`api::sandboxes::CreateSandboxRequest`]), turned into a runtime config
//! only under the operator's [`policy::Policy`]. The daemon's own records
//! ([`records`]) hold what the runtime does not: labels, environment,
//! lifetime, pool membership.

#![forbid(unsafe_code)]

pub mod api;
pub mod auth;
pub mod daemon;
pub mod e2b;
pub mod mcp;
pub mod metrics;
pub mod policy;
pub mod pool;
pub mod problem;
pub mod records;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nova_core::home::NovaHome;
use nova_core::hypervisor::Hypervisor;

pub use daemon::Daemon;
pub use policy::Policy;

/// The daemon's Unix socket under `$NOVA_HOME`.
pub const SOCKET_FILE: &str = "nova.sock";
/// The operator's policy under `$NOVA_HOME`.
pub const POLICY_FILE: &str = "policy.toml";

/// Where and how to serve.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// `$NOVA_HOME`.
    pub home: NovaHome,
    /// The Unix socket (default `$NOVA_HOME/nova.sock`).
    pub socket: PathBuf,
    /// Also listen on this TCP address, with a bearer token.
    pub tcp: Option<SocketAddr>,
    /// Also serve E2B's API (both planes, [`e2b`]) on this TCP address,
    /// with the token as its API key.
    pub e2b: Option<SocketAddr>,
    /// The policy file (default `$NOVA_HOME/policy.toml`; missing means the
    /// defaults).
    pub policy: PathBuf,
}

impl ServeOptions {
    /// The defaults for `home`.
    pub fn new(home: NovaHome) -> Self {
        Self {
            socket: home.root().join(SOCKET_FILE),
            policy: home.root().join(POLICY_FILE),
            tcp: None,
            e2b: None,
            home,
        }
    }
}

/// The daemon could not start or stopped on an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The policy is unusable.
    #[error(transparent)]
    Policy(#[from] policy::PolicyError),
    /// Another daemon serves this `$NOVA_HOME`.
    #[error("another nova serve is running for {home} (it holds {lock}); stop it first")]
    AlreadyRunning {
        /// `$NOVA_HOME`.
        home: PathBuf,
        /// The lock file.
        lock: PathBuf,
    },
    /// A file or socket could not be set up.
    #[error("cannot {action} {path}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The path or address.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ServeError {
    let path = path.to_owned();
    move |source| ServeError::Io {
        action,
        path,
        source,
    }
}

/// Binds `addr` (if any) with the daemon's token (made at the first use),
/// for the `/v1` TCP listener and the E2B one.
async fn bind_tcp(
    root: &Path,
    addr: Option<SocketAddr>,
) -> Result<Option<(tokio::net::TcpListener, auth::Token)>, ServeError> {
    let Some(addr) = addr else { return Ok(None) };
    let token_path = root.join(auth::TOKEN_FILE);
    let token = auth::Token::load_or_create(&token_path)
        .map_err(io_err("read or create the token", &token_path))?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(io_err("listen on", Path::new(&addr.to_string())))?;
    Ok(Some((listener, token)))
}

/// A daemon bound to its sockets, ready to serve.
#[derive(Debug)]
pub struct Server {
    daemon: Arc<Daemon>,
    unix: tokio::net::UnixListener,
    tcp: Option<(tokio::net::TcpListener, auth::Token)>,
    e2b: Option<(tokio::net::TcpListener, auth::Token)>,
    _lock: std::fs::File,
    socket: PathBuf,
}

impl Server {
    /// Takes the daemon lock of `$NOVA_HOME`, reads the policy, reconciles
    /// the records with what `hv` runs, and binds the sockets.
    pub async fn bind(hv: Arc<dyn Hypervisor>, options: ServeOptions) -> Result<Self, ServeError> {
        let root = options.home.root().to_owned();
        let server_dir = root.join("server");
        std::fs::create_dir_all(&server_dir).map_err(io_err("create", &server_dir))?;
        let lock_path = server_dir.join("daemon.lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err("open", &lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(ServeError::AlreadyRunning {
                    home: root,
                    lock: lock_path,
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io_err("lock", &lock_path)(e)),
        }
        let policy = Policy::load(&options.policy)?;
        let daemon = Daemon::new(hv, options.home.clone(), policy)
            .map_err(io_err("open the records in", &server_dir))?;
        daemon.reconcile().await;

        // The lock says no daemon serves here: a socket file is stale.
        let _ = std::fs::remove_file(&options.socket);
        let unix = tokio::net::UnixListener::bind(&options.socket)
            .map_err(io_err("listen on", &options.socket))?;
        std::fs::set_permissions(&options.socket, std::fs::Permissions::from_mode(0o600))
            .map_err(io_err("restrict", &options.socket))?;
        let tcp = bind_tcp(&root, options.tcp).await?;
        let e2b = bind_tcp(&root, options.e2b).await?;
        Ok(Self {
            daemon,
            unix,
            tcp,
            e2b,
            _lock: lock,
            socket: options.socket,
        })
    }

    /// The E2B API's address, when serving it.
    pub fn e2b_addr(&self) -> Option<SocketAddr> {
        self.e2b.as_ref().and_then(|(l, _)| l.local_addr().ok())
    }

    /// The daemon.
    pub fn daemon(&self) -> &Arc<Daemon> {
        &self.daemon
    }

    /// The TCP address, when listening on TCP.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp.as_ref().and_then(|(l, _)| l.local_addr().ok())
    }

    /// Serves until `shutdown` completes; then stops the pool's sandboxes
    /// (callers' sandboxes keep running for the next daemon to re-attach,
    /// when the provider leaves its VMs running).
    pub async fn serve(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        let Self {
            daemon,
            unix,
            tcp,
            e2b,
            _lock,
            socket,
        } = self;
        tokio::spawn(Daemon::run_lifetimes(Arc::downgrade(&daemon)));
        tokio::spawn(Daemon::run_pool(Arc::downgrade(&daemon)));
        let router = api::router(daemon.clone());
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let tcp_task = tcp.map(|(listener, token)| {
            let router = router.clone().layer(axum::middleware::from_fn_with_state(
                token,
                auth::require_token,
            ));
            let stop = stopped(stop_rx.clone());
            tokio::spawn(async move {
                // Small frames (streamed output, WebSocket events) go out at
                // once instead of waiting on the peer's delayed ACK.
                let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
                    if let Err(e) = tcp.set_nodelay(true) {
                        tracing::debug!(error = %e, "cannot set TCP_NODELAY");
                    }
                });
                axum::serve(listener, router)
                    .with_graceful_shutdown(stop)
                    .await
            })
        });
        let e2b_task = e2b.map(|(listener, token)| {
            e2b::spawn(daemon.clone(), listener, token, stopped(stop_rx.clone()))
        });
        let unix_result = axum::serve(unix, router)
            .with_graceful_shutdown(stopped(stop_rx))
            .await;
        if let Some(task) = tcp_task {
            let _ = task.await;
        }
        if let Some(task) = e2b_task {
            let _ = task.await;
        }
        let _ = std::fs::remove_file(&socket);
        daemon.drain_pool().await;
        unix_result.map_err(io_err("serve on", &socket))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_checked_in_openapi_document_is_current() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("openapi.json");
        let now = crate::api::openapi_json();
        if std::env::var_os("NOVA_UPDATE_OPENAPI").is_some() {
            std::fs::write(&path, &now).unwrap();
        }
        let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            checked_in == now,
            "{} is out of date with the API's types: run \
             `NOVA_UPDATE_OPENAPI=1 cargo test -p nova-server` and commit it",
            path.display()
        );
    }
}
