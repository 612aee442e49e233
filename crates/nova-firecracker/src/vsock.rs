//! The host side of Firecracker's hybrid vsock.
//!
//! Firecracker exposes the guest's vsock device on the host as a Unix socket
//! (`uds_path` of `PUT /vsock`). To reach guest port `P`, the host connects
//! to that socket and writes `CONNECT P\n`; Firecracker answers
//! `OK <host-port>\n` once the guest accepted, after which the stream carries
//! the guest connection's bytes. If nothing listens on `P` in the guest,
//! Firecracker closes the stream without answering.
//!
//! The acknowledgement is read one byte at a time, so nothing the guest sends
//! right after it is consumed here: the returned stream is handed as is to
//! the agent protocol client.

use std::path::{Path, PathBuf};
use std::time::Duration;

use nova_protocol::client::{AgentClient, ClientError};
use nova_protocol::handshake::HelloInfo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::time::Instant;

/// Guest vsock port the agent listens on (the boot contract's).
pub use nova_protocol::boot::AGENT_VSOCK_PORT;
/// Longest acknowledgement line accepted.
const MAX_ACK_LINE: usize = 64;
/// How long one `CONNECT` attempt may wait for its answer while booting.
const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(500);

/// A hybrid vsock connection could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VsockConnectError {
    /// The Unix socket could not be connected.
    #[error("cannot connect to the vsock socket {}", .socket.display())]
    Connect {
        /// The socket.
        socket: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Reading or writing the handshake failed.
    #[error("vsock handshake I/O failed")]
    Io(#[from] std::io::Error),
    /// Firecracker closed the stream: nothing listens on the guest port.
    #[error("nothing accepted the connection on guest vsock port {port}")]
    Refused {
        /// The guest port.
        port: u32,
    },
    /// The answer was not `OK <port>`.
    #[error("unexpected answer to CONNECT {port}: {line:?}")]
    Garbage {
        /// The guest port.
        port: u32,
        /// What came back (lossy UTF-8, possibly cut short).
        line: String,
    },
    /// No answer in time.
    #[error("no answer to CONNECT {port} within {timeout:?}")]
    Timeout {
        /// The guest port.
        port: u32,
        /// The limit.
        timeout: Duration,
    },
}

impl VsockConnectError {
    /// Whether trying again later may succeed (the guest is still booting).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Connect { source, .. } => matches!(
                source.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ),
            Self::Refused { .. } | Self::Timeout { .. } => true,
            Self::Io(e) => matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
            ),
            Self::Garbage { .. } => false,
        }
    }
}

/// Opens one connection to guest port `port` through the hybrid vsock
/// socket `uds`, waiting at most `timeout` for the acknowledgement. Returns
/// the stream and the host-side port Firecracker assigned.
pub async fn connect(
    uds: &Path,
    port: u32,
    timeout: Duration,
) -> Result<(UnixStream, u32), VsockConnectError> {
    let mut stream =
        UnixStream::connect(uds)
            .await
            .map_err(|source| VsockConnectError::Connect {
                socket: uds.to_owned(),
                source,
            })?;
    let handshake = async {
        stream
            .write_all(format!("CONNECT {port}\n").as_bytes())
            .await?;
        read_ack(&mut stream, port).await
    };
    let host_port = tokio::time::timeout(timeout, handshake)
        .await
        .map_err(|_| VsockConnectError::Timeout { port, timeout })??;
    Ok((stream, host_port))
}

async fn read_ack(stream: &mut UnixStream, port: u32) -> Result<u32, VsockConnectError> {
    let mut line = Vec::with_capacity(16);
    loop {
        let mut byte = [0u8; 1];
        if stream.read(&mut byte).await? == 0 {
            return Err(if line.is_empty() {
                VsockConnectError::Refused { port }
            } else {
                garbage(port, &line)
            });
        }
        if byte[0] == b'\n' {
            break;
        }
        line.push(byte[0]);
        if line.len() > MAX_ACK_LINE {
            return Err(garbage(port, &line));
        }
    }
    std::str::from_utf8(&line)
        .ok()
        .and_then(|l| l.strip_prefix("OK "))
        .and_then(|p| p.trim().parse::<u32>().ok())
        .ok_or_else(|| garbage(port, &line))
}

fn garbage(port: u32, line: &[u8]) -> VsockConnectError {
    VsockConnectError::Garbage {
        port,
        line: String::from_utf8_lossy(line).into_owned(),
    }
}

/// Connecting to the agent over hybrid vsock failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentConnectError {
    /// The vsock connection failed for good.
    #[error(transparent)]
    Vsock(#[from] VsockConnectError),
    /// The deadline passed while the guest was not yet listening.
    #[error("the guest agent did not accept a vsock connection in time")]
    Timeout,
    /// The agent accepted but its protocol handshake failed.
    #[error("the agent protocol handshake failed")]
    Handshake(#[source] ClientError),
}

/// Connects to the agent on guest port `port`, retrying while the guest is
/// booting, and runs the protocol handshake; gives up at `deadline`.
pub async fn connect_agent(
    uds: &Path,
    port: u32,
    deadline: Instant,
) -> Result<(AgentClient, HelloInfo), AgentConnectError> {
    let mut delay = Duration::from_millis(1);
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(AgentConnectError::Timeout);
        }
        match connect(uds, port, remaining.min(ATTEMPT_TIMEOUT)).await {
            Ok((stream, _)) => {
                let remaining = deadline.saturating_duration_since(Instant::now());
                return AgentClient::connect(stream, remaining)
                    .await
                    .map_err(AgentConnectError::Handshake);
            }
            Err(e) if e.is_transient() => {
                tracing::trace!(error = %e, "agent not reachable over vsock yet");
                tokio::time::sleep(delay.min(remaining)).await;
                delay = (delay * 2).min(Duration::from_millis(20));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncBufReadExt;
    use tokio::net::UnixListener;

    use super::*;

    /// A fake Firecracker vsock socket whose single connection is handled
    /// by `peer`.
    async fn fake<F, Fut>(peer: F) -> (tempfile::TempDir, PathBuf)
    where
        F: FnOnce(UnixStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("vsock.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            peer(stream).await;
        });
        (dir, socket)
    }

    async fn read_connect_line(stream: &mut UnixStream) -> String {
        let mut reader = tokio::io::BufReader::new(stream);
        let mut line = String::new();
        reader.read_line(&mut line).await.unwrap();
        line
    }

    #[tokio::test]
    async fn accepted_connection_keeps_the_bytes_after_ok() {
        let (_dir, socket) = fake(|mut s| async move {
            assert_eq!(read_connect_line(&mut s).await, "CONNECT 1024\n");
            // The ack and the guest's first bytes arrive in one segment.
            s.write_all(b"OK 1073741824\nHELLO").await.unwrap();
            let mut buf = [0u8; 4];
            s.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"PING");
        })
        .await;
        let (mut stream, host_port) = connect(&socket, 1024, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(host_port, 1_073_741_824);
        let mut hello = [0u8; 5];
        stream.read_exact(&mut hello).await.unwrap();
        assert_eq!(&hello, b"HELLO");
        stream.write_all(b"PING").await.unwrap();
    }

    #[tokio::test]
    async fn closed_without_answer_is_refused() {
        let (_dir, socket) = fake(|mut s| async move {
            read_connect_line(&mut s).await;
        })
        .await;
        let err = connect(&socket, 52, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(
            matches!(err, VsockConnectError::Refused { port: 52 }),
            "{err}"
        );
        assert!(err.is_transient());
    }

    #[tokio::test]
    async fn garbage_is_reported_and_not_retried() {
        let (_dir, socket) = fake(|mut s| async move {
            read_connect_line(&mut s).await;
            s.write_all(b"NOPE 12\n").await.unwrap();
        })
        .await;
        let err = connect(&socket, 1024, Duration::from_secs(5))
            .await
            .unwrap_err();
        match &err {
            VsockConnectError::Garbage { line, .. } => assert_eq!(line, "NOPE 12"),
            other => panic!("unexpected {other:?}"),
        }
        assert!(!err.is_transient());
        let (_dir, socket) = fake(|mut s| async move {
            read_connect_line(&mut s).await;
            s.write_all(&[b'x'; 200]).await.unwrap();
        })
        .await;
        assert!(matches!(
            connect(&socket, 1024, Duration::from_secs(5)).await,
            Err(VsockConnectError::Garbage { .. })
        ));
    }

    #[tokio::test]
    async fn silent_peer_times_out() {
        let (_dir, socket) = fake(|mut s| async move {
            read_connect_line(&mut s).await;
            tokio::time::sleep(Duration::from_secs(30)).await;
        })
        .await;
        let err = connect(&socket, 1024, Duration::from_millis(50))
            .await
            .unwrap_err();
        assert!(matches!(err, VsockConnectError::Timeout { .. }), "{err}");
    }

    #[tokio::test]
    async fn missing_socket_is_transient_and_the_agent_wait_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("absent.sock");
        let err = connect(&socket, 1024, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(matches!(err, VsockConnectError::Connect { .. }));
        assert!(err.is_transient());
        let deadline = Instant::now() + Duration::from_millis(100);
        assert!(matches!(
            connect_agent(&socket, 1024, deadline).await,
            Err(AgentConnectError::Timeout)
        ));
    }

    /// The agent wait keeps trying while the guest refuses, then fails for
    /// good on garbage.
    #[tokio::test]
    async fn agent_wait_retries_refusals_then_stops_on_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("vsock.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        tokio::spawn(async move {
            for _ in 0..3 {
                let (mut s, _) = listener.accept().await.unwrap();
                read_connect_line(&mut s).await;
            }
            let (mut s, _) = listener.accept().await.unwrap();
            read_connect_line(&mut s).await;
            s.write_all(b"ERR\n").await.unwrap();
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        match connect_agent(&socket, 1024, deadline).await {
            Err(AgentConnectError::Vsock(VsockConnectError::Garbage { line, .. })) => {
                assert_eq!(line, "ERR");
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
