//! Hybrid vsock: a guest's vsock ports reached through a host Unix socket.
//!
//! Firecracker exposes a guest's vsock device this way (`uds_path` of
//! `PUT /vsock`), and the Apple VZ backend's helper process serves the same
//! protocol for `VZVirtioSocketDevice`, so the host side is written once:
//!
//! ```text
//! host                              socket owner (Firecracker | nova-vz-vmm)
//!  connect(uds) ------------------>
//!  "CONNECT <guest port>\n" ------>  connects to the guest port
//!                      <----------  "OK <host-side port>\n"   (guest accepted)
//!                      <----------  end of stream             (nothing listens yet)
//!  bytes <-----------------------> bytes of the guest connection
//! ```
//!
//! Lines are read one byte at a time, so nothing the guest sends right after
//! the acknowledgement is consumed here: the stream is handed on as it is
//! (to the agent protocol client). Lines are bounded ([`MAX_LINE`] bytes).

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::backend::{AgentConnector, ConnectError};

/// Longest handshake line accepted, bytes (without the newline).
pub const MAX_LINE: usize = 64;

/// A hybrid vsock connection could not be made, or a handshake line was
/// not the protocol's.
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
    /// The socket's owner closed the stream: nothing accepted the
    /// connection on the guest port.
    #[error("nothing accepted the connection on guest vsock port {port}")]
    Refused {
        /// The guest port.
        port: u32,
    },
    /// A handshake line was not the protocol's.
    #[error("unexpected vsock handshake line {line:?}")]
    Garbage {
        /// What came (lossy UTF-8, possibly cut short).
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
    /// Whether trying again later may succeed (the guest is still booting,
    /// or the socket's owner has not made its socket yet).
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
/// socket `uds`, waiting at most `timeout` for the acknowledgement.
/// Returns the stream and the host-side port the owner named in its `OK`.
///
/// # Errors
///
/// [`VsockConnectError`]; see [`VsockConnectError::is_transient`].
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
        read_word_line(&mut stream, "OK")
            .await?
            .ok_or(VsockConnectError::Refused { port })
    };
    let host_port = tokio::time::timeout(timeout, handshake)
        .await
        .map_err(|_| VsockConnectError::Timeout { port, timeout })??;
    Ok((stream, host_port))
}

/// The runtime's [`AgentConnector`] for an agent on guest port `port`
/// behind the hybrid vsock socket `uds`: each attempt waits at most
/// `attempt_timeout` for the acknowledgement; a guest not listening yet is
/// a transient failure (the runtime retries until its boot deadline).
pub fn agent_connector(uds: PathBuf, port: u32, attempt_timeout: Duration) -> AgentConnector {
    Box::new(move || {
        let uds = uds.clone();
        Box::pin(async move {
            match connect(&uds, port, attempt_timeout).await {
                Ok((stream, _)) => Ok(stream),
                Err(e) if e.is_transient() => Err(ConnectError::transient(e)),
                Err(e) => Err(ConnectError::permanent(e)),
            }
        })
    })
}

/// The socket owner's half: reads `CONNECT <port>\n` and returns the port;
/// `None` if the host closed before sending anything.
///
/// # Errors
///
/// [`VsockConnectError::Garbage`] for another line, or the socket's error.
pub async fn read_connect<S>(stream: &mut S) -> Result<Option<u32>, VsockConnectError>
where
    S: AsyncRead + Unpin,
{
    read_word_line(stream, "CONNECT").await
}

/// The socket owner's half: acknowledges a connection to guest `port`.
///
/// # Errors
///
/// The socket's error.
pub async fn write_ok<S>(stream: &mut S, port: u32) -> std::io::Result<()>
where
    S: AsyncWrite + Unpin,
{
    stream.write_all(format!("OK {port}\n").as_bytes()).await?;
    stream.flush().await
}

/// Reads `<word> <u32>\n` a byte at a time; `None` at an end of stream
/// before anything came.
async fn read_word_line<S>(stream: &mut S, word: &str) -> Result<Option<u32>, VsockConnectError>
where
    S: AsyncRead + Unpin,
{
    let mut line = Vec::with_capacity(16);
    loop {
        let mut byte = [0u8; 1];
        if stream.read(&mut byte).await? == 0 {
            if line.is_empty() {
                return Ok(None);
            }
            return Err(garbage(&line));
        }
        if byte[0] == b'\n' {
            break;
        }
        if line.len() >= MAX_LINE {
            return Err(garbage(&line));
        }
        line.push(byte[0]);
    }
    std::str::from_utf8(&line)
        .ok()
        .and_then(|text| text.strip_prefix(word))
        .and_then(|rest| rest.strip_prefix(' '))
        .and_then(|n| n.trim().parse().ok())
        .map(Some)
        .ok_or_else(|| garbage(&line))
}

fn garbage(line: &[u8]) -> VsockConnectError {
    VsockConnectError::Garbage {
        line: String::from_utf8_lossy(line).into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use tokio::net::UnixListener;

    use super::*;

    /// A socket owner on `listener` for one connection, handled by `peer`.
    fn owner<F, Fut>(listener: UnixListener, peer: F) -> tokio::task::JoinHandle<()>
    where
        F: FnOnce(UnixStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            peer(stream).await;
        })
    }

    fn socket() -> (tempfile::TempDir, PathBuf, UnixListener) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vsock.sock");
        let listener = UnixListener::bind(&path).unwrap();
        (dir, path, listener)
    }

    #[tokio::test]
    async fn accepted_connection_keeps_the_bytes_after_ok() {
        let (_dir, path, listener) = socket();
        let server = owner(listener, |mut s| async move {
            assert_eq!(read_connect(&mut s).await.unwrap(), Some(1024));
            // The ack and the guest's first bytes arrive in one segment.
            s.write_all(b"OK 1073741824\nHELLO").await.unwrap();
            let mut buf = [0u8; 4];
            s.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"PING");
        });
        let (mut stream, host_port) = connect(&path, 1024, Duration::from_secs(5)).await.unwrap();
        assert_eq!(host_port, 1_073_741_824);
        let mut hello = [0u8; 5];
        stream.read_exact(&mut hello).await.unwrap();
        assert_eq!(&hello, b"HELLO");
        stream.write_all(b"PING").await.unwrap();
        server.await.unwrap();
    }

    #[tokio::test]
    async fn write_ok_answers_what_connect_reads() {
        let (_dir, path, listener) = socket();
        let server = owner(listener, |mut s| async move {
            let port = read_connect(&mut s).await.unwrap().unwrap();
            write_ok(&mut s, port).await.unwrap();
        });
        let (_stream, port) = connect(&path, 52, Duration::from_secs(5)).await.unwrap();
        assert_eq!(port, 52);
        server.await.unwrap();
    }

    #[tokio::test]
    async fn closed_without_answer_is_refused_and_transient() {
        let (_dir, path, listener) = socket();
        let _server = owner(listener, |mut s| async move {
            read_connect(&mut s).await.unwrap();
        });
        let err = connect(&path, 52, Duration::from_secs(5))
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
        let (_dir, path, listener) = socket();
        let _server = owner(listener, |mut s| async move {
            read_connect(&mut s).await.unwrap();
            s.write_all(b"NOPE 12\n").await.unwrap();
        });
        let err = connect(&path, 1024, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, VsockConnectError::Garbage { line } if line == "NOPE 12"),
            "{err:?}"
        );
        assert!(!err.is_transient());

        let (mut a, mut b) = UnixStream::pair().unwrap();
        b.write_all(&[b'7'; MAX_LINE + 1]).await.unwrap();
        assert!(matches!(
            read_connect(&mut a).await,
            Err(VsockConnectError::Garbage { .. })
        ));
    }

    #[tokio::test]
    async fn silent_owner_times_out_and_a_missing_socket_is_transient() {
        let (_dir, path, listener) = socket();
        let _server = owner(listener, |mut s| async move {
            read_connect(&mut s).await.unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
        });
        let err = connect(&path, 1024, Duration::from_millis(50))
            .await
            .unwrap_err();
        assert!(matches!(err, VsockConnectError::Timeout { .. }), "{err}");

        let missing = connect(
            &path.with_file_name("absent.sock"),
            1024,
            Duration::from_secs(1),
        )
        .await
        .unwrap_err();
        assert!(matches!(missing, VsockConnectError::Connect { .. }));
        assert!(missing.is_transient());
    }

    #[tokio::test]
    async fn the_agent_connector_sorts_transient_from_permanent() {
        let dir = tempfile::tempdir().unwrap();
        let connector = agent_connector(
            dir.path().join("absent.sock"),
            1024,
            Duration::from_millis(100),
        );
        let err = connector().await.unwrap_err();
        assert!(err.transient, "{err:?}");
    }
}
