//! [`SandboxAction`]: every command a sandbox's task carries out.
//!
//! Like Firecracker's `VmmAction`, each request to a running sandbox is one
//! variant sent over a channel to the one task that owns the VM; the task
//! answers on the variant's oneshot after publishing the new state. Each
//! variant's doc says when it is legal; otherwise the answer is the state
//! machine's error and nothing changes.

use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;

use nova_core::error::{SandboxError, UpdateNetworkError};
use nova_core::metadata::SandboxInfo;
use nova_core::network::EgressConfig;
use nova_core::snapshot::{Snapshot, SnapshotError, SnapshotKind};
use nova_core::stats::SandboxStats;
use tokio::sync::oneshot;

/// Where a lifecycle action's answer goes.
pub type Reply<T> = oneshot::Sender<Result<T, SandboxError>>;

/// A backend-specific operation run on the VM inside its task: given the VM
/// (or why it is not available) and the sandbox's info, it answers through
/// whatever reply it captured.
pub type VmOperation<V> = Box<
    dyn for<'a> FnOnce(
            Result<&'a mut V, SandboxError>,
            &'a SandboxInfo,
        ) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>>
        + Send,
>;

/// A command for a sandbox's task.
pub enum SandboxAction<V> {
    /// Pause the vCPUs. Legal when `running`.
    Pause(Reply<()>),
    /// Save the VM to disk under the sandbox directory and end its VMM
    /// (pausing it first if it runs): see
    /// `Hypervisor::pause_sandbox_to_disk`. Legal when `running` or
    /// `paused`; a sandbox already on disk answers `Ok` at once.
    PauseToDisk(Reply<()>),
    /// Resume the vCPUs, then set the guest's clock from the host's; a
    /// sandbox paused to disk is first restored in a new VMM. Legal when
    /// `paused`.
    Resume(Reply<()>),
    /// Gather stats from the VMM, the host and the agent. Legal in every
    /// live state (`running`, `paused`, `failed`); a paused or failed
    /// sandbox reports the host's view only.
    Stats(Reply<SandboxStats>),
    /// Write a snapshot into `dir`. Legal when `paused`; the sandbox stays
    /// paused.
    Snapshot {
        /// The snapshot directory (absolute; created if missing).
        dir: PathBuf,
        /// Full or diff.
        kind: SnapshotKind,
        /// The answer.
        reply: oneshot::Sender<Result<Snapshot, SnapshotError>>,
    },
    /// Stop the VM and release every host resource. Legal in every state but
    /// `stopped`; graceful unless `force` (or the VMM is gone). The task ends
    /// after answering.
    Stop {
        /// Kill at once instead of asking the guest.
        force: bool,
        /// The answer.
        reply: Reply<()>,
    },
    /// Replace the egress policy in one nft transaction (the old one stays
    /// on error) and record it in the sandbox's config. Legal when
    /// `running` or `paused`, for a sandbox with a network.
    UpdateNetwork {
        /// The new policy (validated by the caller).
        egress: EgressConfig,
        /// The answer.
        reply: oneshot::Sender<Result<(), UpdateNetworkError>>,
    },
    /// Run a backend-specific operation on the VM. Legal while the VMM runs
    /// (not `failed`); the operation is told why otherwise.
    WithVm(VmOperation<V>),
}

impl<V> fmt::Debug for SandboxAction<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Pause(_) => "Pause",
            Self::PauseToDisk(_) => "PauseToDisk",
            Self::Resume(_) => "Resume",
            Self::Stats(_) => "Stats",
            Self::Snapshot { .. } => "Snapshot",
            Self::Stop { .. } => "Stop",
            Self::UpdateNetwork { .. } => "UpdateNetwork",
            Self::WithVm(_) => "WithVm",
        })
    }
}
