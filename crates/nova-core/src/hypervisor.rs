//! The [`Hypervisor`] trait: one implementation per backend.
//!
//! The trait is async and object-safe (through `async_trait`), so a caller
//! can hold a `Box<dyn Hypervisor>` or `Arc<dyn Hypervisor>` chosen at run
//! time by `novasandbox::detect()`. Every operation after creation is
//! addressed by [`SandboxId`]; the [`Sandbox`] handle is a convenience that
//! carries the id and delegates here.
//!
//! A provider owns each of its sandboxes in one task (CONVENTIONS.md, item
//! 2); the trait's methods send that task a command and await its reply, so
//! concurrent calls on different sandboxes never wait on each other.

use std::fmt;
use std::path::Path;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncRead;

use crate::config::SandboxConfig;
use crate::error::{CreateSandboxError, ExecError, FileError, SandboxError, UpdateNetworkError};
use crate::exec::{ExecInfo, ExecOutput, ExecRequest, ExecStream};
use crate::fs::{DirListing, FileDownload, FileStat};
use crate::id::SandboxId;
use crate::metadata::SandboxInfo;
use crate::network::EgressConfig;
use crate::sandbox::Sandbox;
use crate::snapshot::{Snapshot, SnapshotError};
use crate::state::{InvalidTransition, SandboxState};
use crate::stats::SandboxStats;
use crate::template::Template;

/// Which VMM a provider drives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HypervisorKind {
    /// Firecracker, the production backend on Linux.
    Firecracker,
    /// QEMU's `microvm` machine, the fallback on Linux.
    Qemu,
    /// Apple's Virtualization.framework, on macOS.
    AppleVz,
}

impl HypervisorKind {
    /// The VMM's name in error messages (`firecracker`, `qemu`,
    /// `Virtualization.framework`).
    pub fn vmm_name(self) -> &'static str {
        match self {
            Self::Firecracker => "firecracker",
            Self::Qemu => "qemu",
            Self::AppleVz => "Virtualization.framework",
        }
    }
}

impl fmt::Display for HypervisorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Firecracker => "firecracker",
            Self::Qemu => "qemu",
            Self::AppleVz => "apple-vz",
        })
    }
}

/// A backend that creates and drives sandboxes (the seed's `BaseHypervisor`).
#[async_trait]
pub trait Hypervisor: Send + Sync + fmt::Debug {
    /// Which VMM this provider drives.
    fn kind(&self) -> HypervisorKind;

    /// Validates `config`, lays out the sandbox directory, starts the VMM,
    /// boots the guest and waits until its agent answers `ready` (within
    /// `config.boot_timeout_ms`). On error, nothing the attempt made on the
    /// host is left behind.
    async fn create_sandbox(&self, config: SandboxConfig) -> Result<Sandbox, CreateSandboxError>;

    /// Makes sure the sandbox is running: a paused sandbox is resumed, a
    /// running one is left as it is. A stopped or failed sandbox cannot be
    /// started again (its resources are gone): create a new one.
    async fn start_sandbox(&self, id: &SandboxId) -> Result<(), SandboxError> {
        let info = self
            .get(id)
            .await
            .ok_or_else(|| SandboxError::NotFound(id.clone()))?;
        match info.state {
            SandboxState::Running => Ok(()),
            SandboxState::Paused => self.resume_sandbox(id).await,
            from => Err(InvalidTransition {
                from,
                to: SandboxState::Running,
            }
            .into()),
        }
    }

    /// Stops the sandbox. Graceful (`force = false`) asks the agent to sync
    /// and power off and waits for the VMM to exit, killing it if it does
    /// not; `force = true` kills the VMM at once. Either way every host
    /// resource the sandbox made is gone when this returns.
    async fn stop_sandbox(&self, id: &SandboxId, force: bool) -> Result<(), SandboxError>;

    /// Pauses the guest's vCPUs through the VMM; it makes no progress until
    /// resumed.
    async fn pause_sandbox(&self, id: &SandboxId) -> Result<(), SandboxError>;

    /// Pauses the sandbox to disk: its vCPUs are paused (if it was running),
    /// its memory, VM state and scratch disk are saved under its directory
    /// in `$NOVA_HOME`, and its VMM ends, freeing the guest's memory. The
    /// sandbox keeps its id, network and files and shows as `paused` with
    /// [`SandboxInfo::persisted`] set; [`Hypervisor::resume_sandbox`]
    /// restores it in a new VMM, also after the provider (a detached one,
    /// re-attaching) or the host restarted. Legal when `running` or
    /// `paused`; pausing a sandbox that is already on disk does nothing.
    /// Backends that cannot snapshot answer [`SandboxError::Snapshot`] with
    /// [`SnapshotError::Unsupported`].
    async fn pause_sandbox_to_disk(&self, id: &SandboxId) -> Result<(), SandboxError> {
        let _ = id;
        Err(SandboxError::Snapshot(SnapshotError::Unsupported {
            vmm: self.kind(),
            reason: "this provider does not implement snapshots".into(),
        }))
    }

    /// Resumes a paused sandbox; one paused to disk is first restored in a
    /// new VMM (an error then leaves it paused on disk, to try again).
    async fn resume_sandbox(&self, id: &SandboxId) -> Result<(), SandboxError>;

    /// Resource usage, merged from the VMM, the host and the agent.
    async fn get_sandbox_stats(&self, id: &SandboxId) -> Result<SandboxStats, SandboxError>;

    /// Runs a command and returns its output as it is produced. Dropping the
    /// stream before the command ended kills the command's process group in
    /// the guest (see [`ExecStream`]).
    async fn exec_stream(
        &self,
        id: &SandboxId,
        request: ExecRequest,
    ) -> Result<ExecStream, ExecError>;

    /// The commands sandbox `id`'s agent knows, oldest first: the running
    /// ones (including those whose caller went away without killing them,
    /// e.g. a daemon that restarted) and the last that ended.
    async fn list_execs(&self, id: &SandboxId) -> Result<Vec<ExecInfo>, ExecError> {
        let _ = id;
        Err(ExecError::Unsupported(
            "this provider does not keep commands across callers".into(),
        ))
    }

    /// Follows command `exec_id` of sandbox `id` (from
    /// [`ExecStream::exec_id`] or [`Hypervisor::list_execs`]): the output
    /// held for it while nobody read it, its further output, and its exit
    /// status; a command that already ended yields what is left of its
    /// output and its status at once. The stream has no stdin. Dropping it
    /// before the command ended kills the command, as for
    /// [`Hypervisor::exec_stream`].
    async fn attach_exec(&self, id: &SandboxId, exec_id: u64) -> Result<ExecStream, ExecError> {
        let _ = (id, exec_id);
        Err(ExecError::Unsupported(
            "this provider does not keep commands across callers".into(),
        ))
    }

    /// Runs a command to completion and returns all its output, up to the
    /// request's `max_output` (default
    /// [`DEFAULT_MAX_OUTPUT`](crate::exec::DEFAULT_MAX_OUTPUT)) bytes; past
    /// that the command is killed and this fails with
    /// [`ExecError::OutputTooLarge`] (use [`Hypervisor::exec_stream`]).
    async fn execute_command(
        &self,
        id: &SandboxId,
        request: ExecRequest,
    ) -> Result<ExecOutput, ExecError> {
        let limit = request
            .max_output
            .unwrap_or(crate::exec::DEFAULT_MAX_OUTPUT);
        self.exec_stream(id, request)
            .await?
            .collect_limited(limit)
            .await
    }

    /// Writes `data` to the absolute guest path `path` with permission bits
    /// `mode`, creating or replacing the file.
    async fn write_file(
        &self,
        id: &SandboxId,
        path: &str,
        data: Vec<u8>,
        mode: u32,
    ) -> Result<(), FileError>;

    /// Reads the whole guest file at the absolute path `path`.
    async fn read_file(&self, id: &SandboxId, path: &str) -> Result<Vec<u8>, FileError>;

    /// Lists the guest directory `path` (absolute).
    async fn list_dir(&self, id: &SandboxId, path: &str) -> Result<DirListing, FileError> {
        let _ = id;
        Err(unsupported_file_op(path))
    }

    /// Metadata of the guest path `path` (absolute, links followed).
    async fn stat(&self, id: &SandboxId, path: &str) -> Result<FileStat, FileError> {
        let _ = id;
        Err(unsupported_file_op(path))
    }

    /// Removes a guest file, symbolic link or empty directory; with
    /// `recursive`, a directory and everything in it.
    async fn remove(&self, id: &SandboxId, path: &str, recursive: bool) -> Result<(), FileError> {
        let _ = (id, recursive);
        Err(unsupported_file_op(path))
    }

    /// Creates the guest directory `path` and its missing parents
    /// (`mkdir -p`), with permission bits `mode`.
    async fn mkdir(&self, id: &SandboxId, path: &str, mode: u32) -> Result<(), FileError> {
        let _ = (id, mode);
        Err(unsupported_file_op(path))
    }

    /// Streams everything `data` yields into the guest file `path` (created
    /// or replaced, permission bits `mode`), without holding it in memory;
    /// returns the bytes written.
    async fn upload(
        &self,
        id: &SandboxId,
        path: &str,
        mode: u32,
        data: Box<dyn AsyncRead + Send + Unpin>,
    ) -> Result<u64, FileError> {
        let _ = (id, mode, data);
        Err(unsupported_file_op(path))
    }

    /// Opens the guest file `path` for streaming to the host.
    async fn download(&self, id: &SandboxId, path: &str) -> Result<FileDownload, FileError> {
        let _ = id;
        Err(unsupported_file_op(path))
    }

    /// Forks the running sandbox `id` into `n` new sandboxes that start
    /// where it is now: it is paused while its state is saved (a snapshot),
    /// then resumes with its connections and processes, and each child is
    /// restored from that state as a distinct machine (its own id, disk,
    /// hostname, network; a published host port stays the parent's). Backends that cannot snapshot answer
    /// [`SnapshotError::Unsupported`].
    async fn fork_sandbox(
        &self,
        id: &SandboxId,
        n: usize,
    ) -> Result<Vec<Sandbox>, CreateSandboxError> {
        let _ = (id, n);
        Err(SnapshotError::Unsupported {
            vmm: self.kind(),
            reason: "this provider does not implement snapshots".into(),
        }
        .into())
    }

    /// Turns sandbox `id` (running or paused) into a new template `name`:
    /// its kernel and root filesystem are the sandbox's template's, and its
    /// snapshot holds the sandbox as it is now (memory and disk), so later
    /// creates of `name` with the same resources start where the sandbox
    /// was. The sandbox is paused while its state is saved, then left as it
    /// was. Backends that cannot snapshot answer
    /// [`SnapshotError::Unsupported`].
    async fn snapshot_as_template(
        &self,
        id: &SandboxId,
        name: &str,
    ) -> Result<Template, SnapshotError> {
        let _ = (id, name);
        Err(SnapshotError::Unsupported {
            vmm: self.kind(),
            reason: "this provider does not implement snapshots".into(),
        })
    }

    /// Writes a full snapshot of the paused sandbox `id` into `dir` (created
    /// if needed); the sandbox stays paused. Backends that cannot answer
    /// [`SnapshotError::Unsupported`].
    async fn snapshot_sandbox(
        &self,
        id: &SandboxId,
        dir: &Path,
    ) -> Result<Snapshot, SnapshotError> {
        let _ = (id, dir);
        Err(SnapshotError::Unsupported {
            vmm: self.kind(),
            reason: "this provider does not implement snapshots".into(),
        })
    }

    /// Creates a sandbox by restoring the snapshot in `dir`, which must have
    /// been made by this provider's VMM for the current build of its
    /// template. Its boot timings have `from_snapshot` set.
    async fn create_sandbox_from_snapshot(
        &self,
        dir: &Path,
    ) -> Result<Sandbox, CreateSandboxError> {
        let _ = dir;
        Err(SnapshotError::Unsupported {
            vmm: self.kind(),
            reason: "this provider does not implement snapshots".into(),
        }
        .into())
    }

    /// Replaces the egress policy of sandbox `id` while it runs (or is
    /// paused), atomically: on error the old policy stays in force. Open
    /// connections to what the new policy denies are cut. The config the
    /// sandbox reports ([`SandboxInfo::config`]) carries the new policy.
    /// Providers that cannot answer [`UpdateNetworkError::Unsupported`].
    async fn update_network(
        &self,
        id: &SandboxId,
        egress: EgressConfig,
    ) -> Result<(), UpdateNetworkError> {
        let _ = (id, egress);
        Err(UpdateNetworkError::Unsupported(format!(
            "the {} provider cannot change a sandbox's network while it runs",
            self.kind()
        )))
    }

    /// Every sandbox this provider knows, in creation order.
    async fn list(&self) -> Vec<SandboxInfo>;

    /// The sandbox with this id, if this provider has it.
    async fn get(&self, id: &SandboxId) -> Option<SandboxInfo>;
}

/// The error of a file operation a provider does not implement.
fn unsupported_file_op(path: &str) -> FileError {
    FileError::Agent {
        path: path.to_owned(),
        source: "this provider does not implement this file operation".into(),
    }
}
