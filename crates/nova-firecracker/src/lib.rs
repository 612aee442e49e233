//! Firecracker provider for NovaSandbox: the production backend on Linux.
//!
//! Each sandbox is one `firecracker` process (optionally started through
//! Firecracker's `jailer`), driven through its HTTP API on a Unix socket in
//! the sandbox directory. The pieces, one module each:
//!
//! - [`binary`]: finding the `firecracker` binary and checking its version;
//! - [`jailer`]: the optional jail (chroot, uid/gid, cgroups, PID namespace)
//!   and its command line;
//! - [`process`]: the VMM's command line (with or without the jailer),
//!   waiting for its API socket, and naming its documented exit codes;
//! - [`api`]: the typed API client (hyper over the Unix socket) and one file
//!   per API resource with its request and response bodies;
//! - [`machine`]: a sandbox's VM as Firecracker sees it (kernel command line,
//!   drives, vsock, metrics) and the request sequence that configures it;
//! - [`vsock`]: the host side of Firecracker's hybrid vsock (`CONNECT`/`OK`),
//!   which carries the agent protocol;
//! - [`stats`]: Firecracker's flushed metrics, parsed and summed;
//! - [`vm`]: starting one microVM (cold or from a snapshot) and the running
//!   VM the runtime drives;
//! - [`reattach`]: taking a running microVM over from a dead detached
//!   provider (a daemon that restarts), and removing a dead one's jail;
//! - [`Firecracker`]: the runtime's `Backend`; [`FirecrackerHypervisor`] is
//!   the runtime's provider over it, which implements the
//!   [`Hypervisor`](nova_core::hypervisor::Hypervisor) trait, snapshots
//!   included.
//!
//! Boot-time breakdown (`BootTimings`): process spawn → API socket answers
//! (`spawn_ms`) → every resource configured and `InstanceStart` accepted
//! (`configure_ms`) → agent `ready` over vsock (`guest_ms`).
//!
//! Firecracker has no power-off device: a guest ends its VM by rebooting
//! with `reboot=k` (the i8042 reset line), which makes the VMM exit.

#![forbid(unsafe_code)]

pub mod api;
pub mod binary;
mod hypervisor;
pub mod jailer;
pub mod machine;
pub mod process;
pub mod reattach;
pub mod stats;
pub mod vm;
pub mod vsock;

pub use hypervisor::{
    DEFAULT_SCRATCH_MB, Firecracker, FirecrackerHypervisor, FirecrackerOptions,
    FirecrackerSandboxes, FirecrackerUnavailable,
};
pub use vm::FirecrackerVm;
