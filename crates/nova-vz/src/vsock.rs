//! The agent channel: the guest's vsock port, reached through a Unix
//! socket the helper serves.
//!
//! VZ opens a guest vsock connection only inside the process that owns the
//! VM (`-[VZVirtioSocketDevice connectToPort:completionHandler:]`, which
//! yields a `VZVirtioSocketConnection` holding a socket descriptor). The
//! helper therefore listens on the sandbox's `vsock.sock` and speaks
//! Firecracker's hybrid vsock handshake ([`nova_runtime::hybrid_vsock`]),
//! so the host side is the same for both backends: the host connects and
//! writes `CONNECT <port>\n`; the helper connects to the guest port and
//! answers `OK <port>\n` ([`write_ok`]), then relays bytes both ways
//! between the two sockets; if the guest does not accept, the helper
//! closes the stream without answering (the guest is still booting: the
//! runtime tries again).

pub use nova_runtime::hybrid_vsock::{VsockConnectError, connect, read_connect, write_ok};
