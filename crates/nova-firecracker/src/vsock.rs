//! The host side of Firecracker's hybrid vsock: the guest's vsock device as
//! the Unix socket named by `uds_path` of `PUT /vsock`. The `CONNECT`/`OK`
//! handshake is the runtime's ([`nova_runtime::hybrid_vsock`]), shared with
//! the Apple VZ backend's helper.

/// Guest vsock port the agent listens on (the boot contract's).
pub use nova_protocol::boot::AGENT_VSOCK_PORT;
pub use nova_runtime::hybrid_vsock::{VsockConnectError, connect};
