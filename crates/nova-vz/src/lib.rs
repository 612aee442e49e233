//! Apple Virtualization.framework provider for NovaSandbox (macOS on Apple
//! Silicon).
//!
//! Each sandbox is one helper process, `nova-vz-vmm`, that owns one
//! `VZVirtualMachine`: the runtime spawns it as the sandbox's VMM process
//! (own process group, watched, killed on drop, exactly as QEMU), so a VZ
//! crash takes one sandbox with it and the runtime needs no in-process VM
//! model. The helper is the only binary that needs the
//! `com.apple.security.virtualization` entitlement
//! (`contrib/macos/nova.entitlements`, `make sign-macos`).
//!
//! ```text
//! runtime (Provider<Vz>)        nova-vz (host side, any OS)        nova-vz-vmm (macOS)
//! ----------------------        ---------------------------        -------------------
//! Backend::start ------------>  VzMachineSpec::build (spec)
//!                               write vz.json, Launch::spawn --->  read vz.json
//!                                                                  VZVirtualMachineConfiguration (machine)
//!                                                                  start / restore+resume (queue)
//!                               ControlClient::connect <-------->  listen api.sock, vsock.sock
//! Vm::pause/resume/snapshot --> {"op":"pause"} (control) ------->  pauseWithCompletionHandler: ...
//! agent_connector ------------> CONNECT 1024 (vsock) ----------->  connectToPort:completionHandler:,
//!                                                                  relay the connection's fd
//! stop / drop ---------------> (the runtime kills the process group; the VM dies with it)
//! ```
//!
//! Everything that is not FFI is outside `cfg(target_os = "macos")` and
//! unit-tested on Linux: the machine spec ([`spec`]), the published ports'
//! relay ([`ports`]), VZ's states
//! ([`state`]) and errors ([`error`]), the control protocol ([`control`]),
//! the vsock handshake ([`vsock`]) and the backend itself ([`backend`],
//! which refuses to start off macOS). The FFI — building the VZ
//! configuration, the queue bridge, the helper's main — is in `macos`,
//! built only on macOS (`make check-macos` type-checks it here against the
//! real `objc2-virtualization` API; nothing of it has run).
//!
//! # What is not here
//!
//! * Egress rules: the runtime's are nova-net's nftables sets in a Linux
//!   network namespace; the network here is VZ's own NAT (the backend's
//!   [`NetworkMode::Own`](nova_runtime::backend::NetworkMode::Own)), and
//!   the runtime refuses a config with `egress` on this backend. The guest
//!   reaches out through the NAT. Published ports are relayed on the host
//!   instead ([`ports`]: VZ's NAT has no port forwarding).
//! * Guest addresses: the agent has no DHCP client, so a guest gets a
//!   static address in vmnet's default shared subnet, from a hash of its
//!   name ([`spec::nat_guest_addr`]); two live sandboxes can draw the same
//!   one, and a Mac whose shared subnet was changed needs a matching
//!   address.
//! * Re-attaching a VM after a daemon restart (the helper would allow it:
//!   its control socket survives the daemon), and VZ device counters (VZ
//!   has none).

#![cfg_attr(not(target_os = "macos"), forbid(unsafe_code))]

pub mod backend;
pub mod control;
pub mod error;
#[cfg(target_os = "macos")]
pub mod macos;
pub mod ports;
pub mod spec;
pub mod state;
pub mod vsock;

pub use backend::{DEFAULT_SCRATCH_MB, Vz, VzHypervisor, VzOptions, VzUnavailable, VzVm};
pub use error::{VzErrorKind, VzFailure};
pub use spec::{VzLimits, VzMachineSpec};
pub use state::VzState;

/// VZ's limits on this host: asked of Virtualization.framework on macOS;
/// `None` elsewhere.
pub fn host_limits() -> Option<VzLimits> {
    #[cfg(target_os = "macos")]
    {
        Some(macos::machine::limits())
    }
    #[cfg(not(target_os = "macos"))]
    {
        None
    }
}
