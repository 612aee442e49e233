//! The agent channel: the guest's vsock port, reached through a Unix
//! socket the helper serves.
//!
//! VZ opens a guest vsock connection only inside the process that owns the
//! VM (`-[VZVirtioSocketDevice connectToPort:completionHandler:]`, which
//! yields a `VZVirtioSocketConnection` holding a socket descriptor). The
//! helper therefore listens on the sandbox's `vsock.sock` and speaks
//! Firecracker's hybrid vsock handshake, so the host side is the same for
//! both backends: the host connects and writes `CONNECT <port>\n`; the
//! helper connects to the guest port and answers `OK <port>\n`, then
//! relays bytes both ways between the two sockets; if the guest does not
//! accept, the helper closes the stream without answering (the guest is
//! still booting: the runtime tries again).
//!
//! The acknowledgement is read one byte at a time, so nothing the guest
//! sends right after it is consumed here.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;

/// Longest handshake line accepted, bytes.
const MAX_LINE: usize = 64;

/// A connection to a guest port could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VsockConnectError {
    /// The helper's socket could not be connected.
    #[error("cannot connect to the VZ helper's vsock socket {}", .socket.display())]
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
    /// The helper closed the stream: nothing accepted on the guest port.
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
    /// or the helper has not made its socket yet).
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

/// Opens one connection to guest port `port` through the helper's socket
/// `uds`, waiting at most `timeout` for the acknowledgement.
///
/// # Errors
///
/// [`VsockConnectError`]; see [`VsockConnectError::is_transient`].
pub async fn connect(
    uds: &Path,
    port: u32,
    timeout: Duration,
) -> Result<UnixStream, VsockConnectError> {
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
        match read_word_line(&mut stream, "OK").await? {
            Some(_) => Ok(()),
            None => Err(VsockConnectError::Refused { port }),
        }
    };
    tokio::time::timeout(timeout, handshake)
        .await
        .map_err(|_| VsockConnectError::Timeout { port, timeout })??;
    Ok(stream)
}

/// The helper's half: reads `CONNECT <port>\n` and returns the port;
/// `None` if the host closed first.
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

/// The helper's half: acknowledges a connection to guest `port`.
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

/// Reads `<word> <u32>\n`, a byte at a time; `None` at a clean end of
/// stream before anything came.
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
    let text = std::str::from_utf8(&line).map_err(|_| garbage(&line))?;
    text.strip_prefix(word)
        .and_then(|rest| rest.strip_prefix(' '))
        .and_then(|n| n.parse().ok())
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
    use super::*;
    use tokio::net::UnixListener;

    /// A helper stand-in on `listener`: accepts one connection, reads its
    /// CONNECT and, when `accept`, acknowledges and echoes one message.
    async fn helper(listener: UnixListener, accept: bool) -> Option<u32> {
        let (mut stream, _) = listener.accept().await.ok()?;
        let port = read_connect(&mut stream).await.ok()??;
        if accept {
            write_ok(&mut stream, port).await.ok()?;
            let mut buf = [0u8; 5];
            stream.read_exact(&mut buf).await.ok()?;
            stream.write_all(&buf).await.ok()?;
        }
        Some(port)
    }

    #[tokio::test]
    async fn connect_hands_over_the_stream_after_ok() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("vsock.sock");
        let server = tokio::spawn(helper(UnixListener::bind(&uds).unwrap(), true));
        let mut stream = connect(&uds, 1024, Duration::from_secs(10)).await.unwrap();
        stream.write_all(b"hello").await.unwrap();
        let mut back = [0u8; 5];
        stream.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"hello");
        assert_eq!(server.await.unwrap(), Some(1024));
    }

    #[tokio::test]
    async fn a_guest_not_listening_yet_is_transient() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("vsock.sock");
        let missing = connect(&uds, 1024, Duration::from_secs(10))
            .await
            .unwrap_err();
        assert!(missing.is_transient(), "{missing:?}");
        let server = tokio::spawn(helper(UnixListener::bind(&uds).unwrap(), false));
        let refused = connect(&uds, 1024, Duration::from_secs(10))
            .await
            .unwrap_err();
        assert!(
            matches!(refused, VsockConnectError::Refused { port: 1024 }),
            "{refused:?}"
        );
        assert!(refused.is_transient());
        assert_eq!(server.await.unwrap(), Some(1024));
    }

    #[tokio::test]
    async fn garbage_is_refused_for_good() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        b.write_all(b"CONNECT x\n").await.unwrap();
        let e = read_connect(&mut a).await.unwrap_err();
        assert!(
            matches!(&e, VsockConnectError::Garbage { line } if line == "CONNECT x"),
            "{e:?}"
        );
        assert!(!e.is_transient());
        b.write_all(&[b'7'; MAX_LINE + 1]).await.unwrap();
        assert!(matches!(
            read_connect(&mut a).await,
            Err(VsockConnectError::Garbage { .. })
        ));
    }
}
