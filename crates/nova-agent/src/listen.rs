//! Where the agent listens: vsock, virtio-serial, Unix socket.
//!
//! * `vsock:PORT` — an `AF_VSOCK` stream socket bound to any CID; each host
//!   connection is a session (Firecracker's hybrid vsock, Apple VZ).
//! * `serial:NAME` — the virtio-serial port whose
//!   `/sys/class/virtio-ports/*/name` is `NAME` (there is no udev to make
//!   `/dev/virtio-ports/NAME`). A port is one byte stream: the agent serves
//!   one session on it at a time, keeping it open from one host to the next
//!   (closing it would discard what a new host already sent).
//! * `unix:PATH` — a Unix socket, for host tests.
//!
//! The addresses themselves ([`ListenAddr`]) and their defaults are part of
//! the boot contract in [`nova_protocol::boot`].

use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nova_protocol::boot::ListenAddr;
use rustix::net::addr::{SocketAddrArg, SocketAddrLen, SocketAddrOpaque};
use rustix::net::{AddressFamily, SocketFlags, SocketType};
use tokio::io::unix::AsyncFd;

use crate::Agent;
use crate::fdio::FdStream;
use crate::session;

/// A bound listener, ready to accept.
#[derive(Debug)]
pub(crate) enum Listener {
    Unix(tokio::net::UnixListener),
    Vsock(AsyncFd<OwnedFd>),
    Serial(PathBuf),
}

impl Listener {
    /// Binds `addr` (for a serial port: finds its device).
    pub(crate) fn bind(addr: &ListenAddr) -> io::Result<Self> {
        match addr {
            ListenAddr::Unix(path) => {
                // A socket file left by an earlier run would make bind fail.
                if path.exists() {
                    std::fs::remove_file(path)?;
                }
                Ok(Self::Unix(tokio::net::UnixListener::bind(path)?))
            }
            ListenAddr::Vsock(port) => {
                let fd = rustix::net::socket_with(
                    AddressFamily::VSOCK,
                    SocketType::STREAM,
                    SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
                    None,
                )?;
                rustix::net::bind(&fd, &VsockAddr { port: *port })?;
                rustix::net::listen(&fd, 128)?;
                Ok(Self::Vsock(crate::fdio::register(fd)?))
            }
            ListenAddr::Serial(name) => {
                find_serial_port(Path::new("/sys/class/virtio-ports"), name)
                    .map(Self::Serial)
                    .ok_or_else(|| {
                        io::Error::new(
                            io::ErrorKind::NotFound,
                            format!("no virtio-serial port named {name}"),
                        )
                    })
            }
        }
    }

    /// Accepts connections forever, one session task each.
    pub(crate) async fn run(self, agent: Arc<Agent>) {
        match self {
            Self::Unix(listener) => loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        tokio::spawn(session::serve(stream, agent.clone(), "unix".to_owned()));
                    }
                    Err(e) => accept_failed(e).await,
                }
            },
            Self::Vsock(listener) => loop {
                let accepted = async {
                    loop {
                        let mut guard = listener.readable().await?;
                        match rustix::net::accept_with(
                            listener.get_ref(),
                            SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
                        ) {
                            Ok(fd) => return Ok(fd),
                            Err(rustix::io::Errno::AGAIN) => guard.clear_ready(),
                            Err(e) => return Err(io::Error::from(e)),
                        }
                    }
                };
                match accepted.await.and_then(FdStream::new) {
                    Ok(stream) => {
                        tokio::spawn(session::serve(stream, agent.clone(), "vsock".to_owned()));
                    }
                    Err(e) => accept_failed(e).await,
                }
            },
            Self::Serial(device) => {
                // One session at a time, each on a duplicate of one open of
                // the port. While no host is connected the port reads EOF at
                // once, so the session ends and this loop polls: read EOF,
                // wait SERIAL_POLL, again. See SERIAL_POLL for the
                // trade-off.
                //
                // The port stays open between sessions: the guest's driver
                // discards what the port holds when its last opener closes
                // it, and a host that connects between a session's EOF and
                // that close (a restored guest's new host, any time in its
                // poll) has its `Hello` thrown away, leaving it waiting for
                // an answer that never comes. Only a session the agent ended
                // while the host may still be sending closes the port, so
                // that the unread rest of that host's stream is discarded
                // rather than read as the next host's handshake.
                let peer = format!("serial {}", device.display());
                let mut port: Option<OwnedFd> = None;
                loop {
                    let stream = match &port {
                        Some(fd) => fd.try_clone(),
                        None => open_serial(&device).and_then(|fd| {
                            let stream = fd.try_clone();
                            port = Some(fd);
                            stream
                        }),
                    }
                    .and_then(FdStream::new);
                    let pause = match stream {
                        Ok(stream) => {
                            let served = session::serve(stream, agent.clone(), peer.clone()).await;
                            if served == session::Served::AgentEnded {
                                port = None;
                            }
                            SERIAL_POLL
                        }
                        Err(e) => {
                            // E.g. EBUSY (the port allows one opener) or
                            // ENODEV (unplugged): nothing a fast retry would
                            // fix.
                            tracing::warn!(device = %device.display(), error = %e, "cannot open the serial port");
                            port = None;
                            RETRY_AFTER_ERROR
                        }
                    };
                    tokio::time::sleep(pause).await;
                }
            }
        }
    }
}

/// How often the agent looks for a host on a virtio-serial port that has
/// none.
///
/// A guest cannot wait for a host to connect to its port: while none is
/// connected, the port reads EOF at once (and polls readable), so the agent
/// reopens it on a timer. After a snapshot restore the host connects anew
/// and its `Hello` waits until the next reopen, so this interval is added,
/// half of it on average, to every restore that reaches the agent over
/// virtio-serial, whose target is a few tens of milliseconds. The price is
/// paid only while no host is connected: about 200 rounds a second of
/// one read that returns EOF, a few system calls each: estimated (not
/// measured) at around a
/// percent of a vCPU under TCG, far less under KVM. A sandbox's host keeps its connection for the sandbox's life,
/// so the poll runs in the gaps: before the first connection, between a
/// snapshot's quiesce and its save, after a restore.
/// (The port also raises `SIGIO` when a host connects, which could replace
/// the poll; a poll needs no signal plumbing and cannot miss an event.)
const SERIAL_POLL: Duration = Duration::from_millis(5);
/// Pause after a failed accept or open, so that a persistent error (EMFILE,
/// EBUSY) does not spin.
const RETRY_AFTER_ERROR: Duration = Duration::from_millis(100);

async fn accept_failed(e: io::Error) {
    // E.g. EMFILE: back off instead of spinning.
    tracing::warn!(error = %e, "accept failed");
    tokio::time::sleep(RETRY_AFTER_ERROR).await;
}

/// Opens the serial port `device` (non-blocking).
fn open_serial(device: &Path) -> io::Result<OwnedFd> {
    use rustix::fs::{Mode, OFlags};
    Ok(rustix::fs::open(
        device,
        OFlags::RDWR | OFlags::NOCTTY | OFlags::CLOEXEC | OFlags::NONBLOCK,
        Mode::empty(),
    )?)
}

/// Finds `/dev/<port>` for the virtio-serial port called `name`.
fn find_serial_port(class_dir: &Path, name: &str) -> Option<PathBuf> {
    let entries = std::fs::read_dir(class_dir).ok()?;
    for entry in entries.flatten() {
        let port_name = std::fs::read_to_string(entry.path().join("name")).unwrap_or_default();
        if port_name.trim() == name {
            return Some(Path::new("/dev").join(entry.file_name()));
        }
    }
    None
}

/// `sockaddr_vm` for binding a vsock port on any CID.
struct VsockAddr {
    port: u32,
}

// SAFETY: `with_sockaddr` passes `f` a pointer to a fully initialized
// `sockaddr_vm` that lives on the stack for the whole call, together with
// exactly its size; `sockaddr_vm` is what the kernel expects for AF_VSOCK.
unsafe impl SocketAddrArg for VsockAddr {
    unsafe fn with_sockaddr<R>(
        &self,
        f: impl FnOnce(*const SocketAddrOpaque, SocketAddrLen) -> R,
    ) -> R {
        // SAFETY: `sockaddr_vm` is a plain C struct of integers; all-zero
        // bytes are a valid value (and the required zero padding).
        let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
        addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
        addr.svm_port = self.port;
        addr.svm_cid = libc::VMADDR_CID_ANY;
        let len = SocketAddrLen::try_from(std::mem::size_of::<libc::sockaddr_vm>())
            .expect("sockaddr_vm is a few bytes long");
        f((&raw const addr).cast(), len)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn finds_serial_ports_by_name() {
        let dir = tempfile::tempdir().unwrap();
        for (port, name) in [("vport0p0", "other\n"), ("vport1p1", "org.nova.agent\n")] {
            std::fs::create_dir(dir.path().join(port)).unwrap();
            std::fs::write(dir.path().join(port).join("name"), name).unwrap();
        }
        assert_eq!(
            find_serial_port(dir.path(), "org.nova.agent"),
            Some(PathBuf::from("/dev/vport1p1"))
        );
        assert_eq!(find_serial_port(dir.path(), "missing"), None);
        assert_eq!(find_serial_port(&dir.path().join("nope"), "x"), None);
    }
}
