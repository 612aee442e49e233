//! [`ApiClient`]: HTTP/1.1 over Firecracker's API socket.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::{Method, Request, StatusCode, header};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::UnixStream;

use super::{
    ActionType, Balloon, BalloonStats, BalloonStatsUpdate, BalloonUpdate, BootSource, Drive,
    EntropyDevice, FirecrackerVersion, InstanceActionInfo, InstanceInfo, Logger, MachineConfig,
    Metrics, NetworkInterface, PartialDrive, PartialNetworkInterface, SnapshotCreateParams,
    SnapshotLoadParams, Vm, VmState, Vsock,
};

/// How long one API request may take unless told otherwise. Snapshot
/// creation of a large guest is the slowest call; it writes all memory.
pub const DEFAULT_API_TIMEOUT: Duration = Duration::from_secs(30);

/// An API call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    /// The API socket could not be connected.
    #[error("cannot connect to the Firecracker API socket {socket}")]
    Connect {
        /// The socket.
        socket: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// HTTP failed underneath a request (connection reset, bad response).
    #[error("{method} {path}: HTTP exchange with Firecracker failed")]
    Http {
        /// The request method.
        method: Method,
        /// The request path.
        path: String,
        /// The HTTP error.
        #[source]
        source: hyper::Error,
    },
    /// Firecracker did not answer in time.
    #[error("{method} {path}: Firecracker did not answer within {timeout:?}")]
    Timeout {
        /// The request method.
        method: Method,
        /// The request path.
        path: String,
        /// The limit.
        timeout: Duration,
    },
    /// Firecracker refused the request; `fault_message` is its reason.
    #[error("{method} {path}: Firecracker refused ({status}): {fault_message}")]
    Fault {
        /// The request method.
        method: Method,
        /// The request path.
        path: String,
        /// The HTTP status.
        status: StatusCode,
        /// Firecracker's `fault_message` (or the raw body if it had none).
        fault_message: String,
    },
    /// A successful answer did not have the documented shape.
    #[error("{method} {path}: cannot parse Firecracker's answer")]
    Decode {
        /// The request method.
        method: Method,
        /// The request path.
        path: String,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// A request body could not be encoded.
    #[error("cannot encode the body of {path}")]
    Encode {
        /// The request path.
        path: String,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// A drive or interface id cannot be used in a request path.
    #[error(transparent)]
    ResourceId(#[from] InvalidResourceId),
    /// The boot source's kernel command line breaks the boot contract (the
    /// config's `kernel_args`); nothing was sent.
    #[error("cannot build the kernel command line")]
    BootArgs(#[from] nova_protocol::boot::KernelArgsError),
}

impl ApiError {
    /// Firecracker's `fault_message`, if it refused the request.
    pub fn fault_message(&self) -> Option<&str> {
        match self {
            Self::Fault { fault_message, .. } => Some(fault_message),
            _ => None,
        }
    }
}

/// A drive or interface id Firecracker would not accept (it allows ASCII
/// letters, digits and `_`, up to 64 characters).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid Firecracker resource id {0:?}: use 1 to 64 ASCII letters, digits or `_`")]
pub struct InvalidResourceId(pub String);

/// Checks that `id` can name a drive or a network interface.
pub fn check_resource_id(id: &str) -> Result<(), InvalidResourceId> {
    if !id.is_empty()
        && id.len() <= 64
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    {
        Ok(())
    } else {
        Err(InvalidResourceId(id.to_owned()))
    }
}

/// The body `fault_message` arrives in.
#[derive(serde::Deserialize)]
struct Fault {
    fault_message: String,
}

/// A client of one Firecracker process's API.
///
/// Methods take `&mut self`: a sandbox's client is owned by the task that
/// owns the sandbox, so requests on one VM are naturally serialised.
#[derive(Debug)]
pub struct ApiClient {
    socket: PathBuf,
    timeout: Duration,
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl ApiClient {
    /// A client of the API socket at `socket`; it connects on first use.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
            timeout: DEFAULT_API_TIMEOUT,
            sender: None,
        }
    }

    /// Connects to `socket` now.
    pub async fn connect(socket: impl Into<PathBuf>) -> Result<Self, ApiError> {
        let mut client = Self::new(socket);
        client.sender().await?;
        Ok(client)
    }

    /// Sets how long each request may take.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The API socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    async fn sender(&mut self) -> Result<&mut SendRequest<Full<Bytes>>, ApiError> {
        if self.sender.as_ref().is_none_or(SendRequest::is_closed) {
            let stream =
                UnixStream::connect(&self.socket)
                    .await
                    .map_err(|source| ApiError::Connect {
                        socket: self.socket.clone(),
                        source,
                    })?;
            let (sender, connection) =
                http1::handshake(TokioIo::new(stream))
                    .await
                    .map_err(|source| ApiError::Http {
                        method: Method::GET,
                        path: "/".into(),
                        source,
                    })?;
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::debug!(error = %e, "Firecracker API connection ended");
                }
            });
            self.sender = Some(sender);
        }
        Ok(self.sender.as_mut().expect("the sender was set just above"))
    }

    /// Sends one request and returns the body of a successful answer.
    pub async fn request(
        &mut self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Bytes, ApiError> {
        let timeout = self.timeout;
        match tokio::time::timeout(timeout, self.exchange(method.clone(), path, body)).await {
            Ok(result) => result,
            Err(_) => {
                // The connection may be mid-request; start afresh next time.
                self.sender = None;
                Err(ApiError::Timeout {
                    method,
                    path: path.to_owned(),
                    timeout,
                })
            }
        }
    }

    async fn exchange(
        &mut self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Bytes, ApiError> {
        let http = |source| ApiError::Http {
            method: method.clone(),
            path: path.to_owned(),
            source,
        };
        let mut builder = Request::builder()
            .method(method.clone())
            .uri(path)
            .header(header::HOST, "localhost")
            .header(header::ACCEPT, "application/json");
        if body.is_some() {
            builder = builder.header(header::CONTENT_TYPE, "application/json");
        }
        let request = builder
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| ApiError::Encode {
                path: path.to_owned(),
                source: serde::ser::Error::custom(e),
            })?;
        let sender = self.sender().await?;
        sender.ready().await.map_err(http)?;
        let response = sender.send_request(request).await.map_err(http)?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(http)?
            .to_bytes();
        if status.is_success() {
            return Ok(bytes);
        }
        let fault_message = match serde_json::from_slice::<Fault>(&bytes) {
            Ok(fault) => fault.fault_message,
            Err(_) => String::from_utf8_lossy(&bytes).trim().to_owned(),
        };
        Err(ApiError::Fault {
            method,
            path: path.to_owned(),
            status,
            fault_message,
        })
    }

    async fn send_json<T: Serialize + ?Sized>(
        &mut self,
        method: Method,
        path: &str,
        body: &T,
    ) -> Result<(), ApiError> {
        let body = serde_json::to_vec(body).map_err(|source| ApiError::Encode {
            path: path.to_owned(),
            source,
        })?;
        self.request(method, path, Some(body)).await.map(drop)
    }

    /// `PUT path` with a JSON body; Firecracker answers 204.
    pub async fn put<T: Serialize + ?Sized>(
        &mut self,
        path: &str,
        body: &T,
    ) -> Result<(), ApiError> {
        self.send_json(Method::PUT, path, body).await
    }

    /// `PATCH path` with a JSON body; Firecracker answers 204.
    pub async fn patch<T: Serialize + ?Sized>(
        &mut self,
        path: &str,
        body: &T,
    ) -> Result<(), ApiError> {
        self.send_json(Method::PATCH, path, body).await
    }

    /// `GET path`, parsing the JSON answer.
    pub async fn get<R: DeserializeOwned>(&mut self, path: &str) -> Result<R, ApiError> {
        let bytes = self.request(Method::GET, path, None).await?;
        serde_json::from_slice(&bytes).map_err(|source| ApiError::Decode {
            method: Method::GET,
            path: path.to_owned(),
            source,
        })
    }

    /// `GET /`: the instance's id, state and version.
    pub async fn instance_info(&mut self) -> Result<InstanceInfo, ApiError> {
        self.get("/").await
    }

    /// `GET /version`.
    pub async fn version(&mut self) -> Result<FirecrackerVersion, ApiError> {
        self.get("/version").await
    }

    /// `PUT /machine-config` (before start).
    pub async fn put_machine_config(&mut self, config: &MachineConfig) -> Result<(), ApiError> {
        self.put("/machine-config", config).await
    }

    /// `GET /machine-config`.
    pub async fn machine_config(&mut self) -> Result<MachineConfig, ApiError> {
        self.get("/machine-config").await
    }

    /// `PUT /boot-source` (before start).
    pub async fn put_boot_source(&mut self, boot: &BootSource) -> Result<(), ApiError> {
        self.put("/boot-source", boot).await
    }

    /// `PUT /drives/{drive_id}` (before start).
    pub async fn put_drive(&mut self, drive: &Drive) -> Result<(), ApiError> {
        check_resource_id(&drive.drive_id)?;
        self.put(&format!("/drives/{}", drive.drive_id), drive)
            .await
    }

    /// `PATCH /drives/{drive_id}` (after start).
    pub async fn patch_drive(&mut self, drive: &PartialDrive) -> Result<(), ApiError> {
        check_resource_id(&drive.drive_id)?;
        self.patch(&format!("/drives/{}", drive.drive_id), drive)
            .await
    }

    /// `PUT /vsock` (before start).
    pub async fn put_vsock(&mut self, vsock: &Vsock) -> Result<(), ApiError> {
        self.put("/vsock", vsock).await
    }

    /// `PUT /network-interfaces/{iface_id}` (before start).
    pub async fn put_network_interface(
        &mut self,
        iface: &NetworkInterface,
    ) -> Result<(), ApiError> {
        check_resource_id(&iface.iface_id)?;
        self.put(&format!("/network-interfaces/{}", iface.iface_id), iface)
            .await
    }

    /// `PATCH /network-interfaces/{iface_id}` (after start).
    pub async fn patch_network_interface(
        &mut self,
        iface: &PartialNetworkInterface,
    ) -> Result<(), ApiError> {
        check_resource_id(&iface.iface_id)?;
        self.patch(&format!("/network-interfaces/{}", iface.iface_id), iface)
            .await
    }

    /// `PUT /logger` (before start or snapshot load).
    pub async fn put_logger(&mut self, logger: &Logger) -> Result<(), ApiError> {
        self.put("/logger", logger).await
    }

    /// `PUT /metrics` (once, before start or snapshot load).
    pub async fn put_metrics(&mut self, metrics: &Metrics) -> Result<(), ApiError> {
        self.put("/metrics", metrics).await
    }

    /// `PUT /entropy` (before start).
    pub async fn put_entropy(&mut self, entropy: &EntropyDevice) -> Result<(), ApiError> {
        self.put("/entropy", entropy).await
    }

    /// `PUT /balloon` (before start).
    pub async fn put_balloon(&mut self, balloon: &Balloon) -> Result<(), ApiError> {
        self.put("/balloon", balloon).await
    }

    /// `PATCH /balloon`: a new target size.
    pub async fn patch_balloon(&mut self, update: &BalloonUpdate) -> Result<(), ApiError> {
        self.patch("/balloon", update).await
    }

    /// `GET /balloon`.
    pub async fn balloon(&mut self) -> Result<Balloon, ApiError> {
        self.get("/balloon").await
    }

    /// `GET /balloon/statistics` (statistics must have been enabled).
    pub async fn balloon_stats(&mut self) -> Result<BalloonStats, ApiError> {
        self.get("/balloon/statistics").await
    }

    /// `PATCH /balloon/statistics`: a new polling interval.
    pub async fn patch_balloon_stats(
        &mut self,
        update: &BalloonStatsUpdate,
    ) -> Result<(), ApiError> {
        self.patch("/balloon/statistics", update).await
    }

    /// `PUT /actions`.
    pub async fn action(&mut self, action_type: ActionType) -> Result<(), ApiError> {
        self.put("/actions", &InstanceActionInfo { action_type })
            .await
    }

    /// Boots the configured guest.
    pub async fn instance_start(&mut self) -> Result<(), ApiError> {
        self.action(ActionType::InstanceStart).await
    }

    /// Writes the metrics now.
    pub async fn flush_metrics(&mut self) -> Result<(), ApiError> {
        self.action(ActionType::FlushMetrics).await
    }

    /// Presses Ctrl+Alt+Del in the guest.
    pub async fn send_ctrl_alt_del(&mut self) -> Result<(), ApiError> {
        self.action(ActionType::SendCtrlAltDel).await
    }

    /// `PATCH /vm` `Paused`.
    pub async fn pause(&mut self) -> Result<(), ApiError> {
        self.patch(
            "/vm",
            &Vm {
                state: VmState::Paused,
            },
        )
        .await
    }

    /// `PATCH /vm` `Resumed`.
    pub async fn resume(&mut self) -> Result<(), ApiError> {
        self.patch(
            "/vm",
            &Vm {
                state: VmState::Resumed,
            },
        )
        .await
    }

    /// `PUT /snapshot/create` (the VM must be paused).
    pub async fn create_snapshot(&mut self, params: &SnapshotCreateParams) -> Result<(), ApiError> {
        self.put("/snapshot/create", params).await
    }

    /// `PUT /snapshot/load` (into a fresh, unconfigured process).
    pub async fn load_snapshot(&mut self, params: &SnapshotLoadParams) -> Result<(), ApiError> {
        self.put("/snapshot/load", params).await
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    use tokio::net::UnixListener;

    use super::*;

    /// A fake Firecracker: answers each request on one connection with the
    /// next canned response, and reports what it received.
    async fn fake_api(
        responses: Vec<String>,
    ) -> (
        tempfile::TempDir,
        PathBuf,
        tokio::task::JoinHandle<Vec<String>>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("api.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let task = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let mut reader = BufReader::new(stream);
            let mut seen = Vec::new();
            for response in responses {
                let mut head = String::new();
                let mut length = 0usize;
                loop {
                    let mut line = String::new();
                    reader.read_line(&mut line).await.unwrap();
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap();
                    }
                    if line == "\r\n" {
                        break;
                    }
                    head.push_str(&line);
                }
                let mut body = vec![0; length];
                reader.read_exact(&mut body).await.unwrap();
                let request_line = head.lines().next().unwrap().to_owned();
                seen.push(format!(
                    "{request_line} {}",
                    String::from_utf8(body).unwrap()
                ));
                reader
                    .get_mut()
                    .write_all(response.as_bytes())
                    .await
                    .unwrap();
            }
            seen
        });
        (dir, socket, task)
    }

    /// An HTTP/1.1 response with a JSON body, as Firecracker sends it.
    fn response(status: &str, body: &str) -> String {
        format!(
            "HTTP/1.1 {status}\r\nServer: Firecracker API\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
    }

    fn no_content() -> String {
        "HTTP/1.1 204 No Content\r\nServer: Firecracker API\r\n\r\n".to_owned()
    }

    #[tokio::test]
    async fn sends_typed_bodies_on_one_connection() {
        let info = response(
            "200 OK",
            r#"{"id":"sb-1","state":"Paused","vmm_version":"1.16.1","app_name":"Firecracker"}"#,
        );
        let (_dir, socket, task) = fake_api(vec![no_content(), no_content(), info]).await;
        let mut client = ApiClient::connect(&socket).await.unwrap();
        client
            .put_machine_config(&MachineConfig::new(2, 256))
            .await
            .unwrap();
        client.pause().await.unwrap();
        let info = client.instance_info().await.unwrap();
        assert_eq!(info.state, super::super::InstanceState::Paused);
        let seen = task.await.unwrap();
        assert_eq!(
            seen,
            [
                r#"PUT /machine-config HTTP/1.1 {"vcpu_count":2,"mem_size_mib":256}"#,
                r#"PATCH /vm HTTP/1.1 {"state":"Paused"}"#,
                "GET / HTTP/1.1 ",
            ]
        );
    }

    #[tokio::test]
    async fn carries_fault_message_into_the_error() {
        let fault = response(
            "400 Bad Request",
            r#"{"fault_message":"The requested operation is not supported now."}"#,
        );
        let (_dir, socket, task) = fake_api(vec![fault]).await;
        let mut client = ApiClient::new(&socket);
        let err = client.instance_start().await.unwrap_err();
        assert_eq!(
            err.fault_message(),
            Some("The requested operation is not supported now.")
        );
        let msg = err.to_string();
        assert!(
            msg.starts_with("PUT /actions: Firecracker refused (400 Bad Request)"),
            "{msg}"
        );
        task.await.unwrap();
    }

    #[tokio::test]
    async fn malformed_answers_and_missing_sockets_are_typed() {
        let junk = response("200 OK", "{}");
        let (dir, socket, task) = fake_api(vec![junk]).await;
        let mut client = ApiClient::new(&socket);
        assert!(matches!(
            client.instance_info().await,
            Err(ApiError::Decode { .. })
        ));
        task.await.unwrap();
        let mut absent = ApiClient::new(dir.path().join("absent.sock"));
        assert!(matches!(
            absent.version().await,
            Err(ApiError::Connect { .. })
        ));
    }

    #[tokio::test]
    async fn times_out_on_a_silent_peer() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("api.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let hold = tokio::spawn(async move { listener.accept().await.map(|(s, _)| s) });
        let mut client = ApiClient::new(&socket).with_timeout(Duration::from_millis(50));
        assert!(matches!(
            client.flush_metrics().await,
            Err(ApiError::Timeout { .. })
        ));
        drop(hold);
    }

    #[tokio::test]
    async fn refuses_ids_that_would_break_the_path() {
        let mut client = ApiClient::new("/nonexistent/api.sock");
        let err = client
            .put_drive(&Drive::new("../x", "/a", false, false))
            .await
            .unwrap_err();
        assert!(matches!(err, ApiError::ResourceId(_)));
        assert!(check_resource_id("rootfs").is_ok());
        assert!(check_resource_id("extra_0").is_ok());
        assert!(check_resource_id("").is_err());
        assert!(check_resource_id(&"a".repeat(65)).is_err());
    }
}
