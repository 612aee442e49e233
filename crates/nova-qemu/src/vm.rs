//! One running QEMU VM, as the runtime's sandbox task drives it: QMP for the
//! vCPUs and counters, the virtio-serial socket for the agent.
//!
//! A snapshot of a VM whose RAM is a shared memfd
//! ([`GuestMemory::SharedMemfd`], every cold boot) is two files: the VM
//! state stream, devices only ([`SNAPSHOT_STATE`], tens of KiB), and a
//! sparse copy of the memfd ([`SNAPSHOT_MEMORY`], read through QEMU's
//! descriptor in `/proc/PID/fd`), which a restore maps private and
//! copy-on-write instead of reading it through the stream. A VM whose RAM
//! is not shared (a restored one) streams all of its memory into the state
//! file, and its snapshot has no memory file.

use std::path::{Path, PathBuf};

use nova_core::error::BoxError;
use nova_core::hypervisor::HypervisorKind;
use nova_core::snapshot::{SnapshotError, SnapshotKind};
use nova_runtime::backend::{AgentConnector, ConnectError, Vm, VmmCounters};
use tokio::net::UnixStream;

use crate::cmdline::GuestMemory;
use crate::qmp::QmpClient;

/// Name of the saved VM state (QEMU's migration stream) in a snapshot
/// directory.
pub const SNAPSHOT_STATE: &str = "vmstate";

/// Name of the guest's RAM in a snapshot directory: the copy of a cold
/// booted guest's memfd, which a restore maps private. Removed with its
/// directory.
pub const SNAPSHOT_MEMORY: &str = "memory";

/// The name the Linux kernel gives QEMU's RAM memfd (QEMU names it after
/// its object type), as `/proc/PID/fd/N` links to it.
const MEMFD_LINK: &str = "/memfd:memory-backend-memfd (deleted)";

/// The `/proc/PID/fd/N` path of QEMU `pid`'s RAM memfd: opening it opens
/// the memfd itself (root may, whatever uid QEMU dropped to).
fn memfd_path(pid: u32) -> std::io::Result<PathBuf> {
    let fds = PathBuf::from(format!("/proc/{pid}/fd"));
    for entry in std::fs::read_dir(&fds)? {
        let path = entry?.path();
        if std::fs::read_link(&path).is_ok_and(|target| target.as_os_str() == MEMFD_LINK) {
            return Ok(path);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::NotFound,
        format!(
            "QEMU (pid {pid}) holds no {MEMFD_LINK:?} descriptor; was it started with \
             memory-backend-memfd?"
        ),
    ))
}

/// A running QEMU VM.
#[derive(Debug)]
pub struct QemuVm {
    qmp: QmpClient,
    agent_socket: PathBuf,
    kernel_cmdline: String,
    /// Where its RAM lives, which decides how a snapshot saves it.
    memory: GuestMemory,
    /// QEMU's pid, where known (to find its RAM memfd).
    pid: Option<u32>,
    /// The sandbox's own uid, held while the VM lives.
    _ids: Option<crate::ids::IdLease>,
}

impl QemuVm {
    pub(crate) fn new(
        qmp: QmpClient,
        agent_socket: PathBuf,
        kernel_cmdline: String,
        memory: GuestMemory,
        pid: Option<u32>,
        ids: Option<crate::ids::IdLease>,
    ) -> Self {
        Self {
            qmp,
            agent_socket,
            kernel_cmdline,
            memory,
            pid,
            _ids: ids,
        }
    }
}

impl Vm for QemuVm {
    fn agent_connector(&self) -> AgentConnector {
        // QEMU listens on the socket from its start; the guest end opens when
        // the agent opens its virtio-serial port, and the host's first bytes
        // wait in QEMU until then, so one connect suffices.
        let socket = self.agent_socket.clone();
        Box::new(move || {
            let socket = socket.clone();
            Box::pin(async move {
                UnixStream::connect(&socket)
                    .await
                    .map_err(ConnectError::from)
            })
        })
    }

    async fn pause(&mut self) -> Result<(), BoxError> {
        Ok(self.qmp.stop().await?)
    }

    async fn resume(&mut self) -> Result<(), BoxError> {
        Ok(self.qmp.cont().await?)
    }

    async fn counters(&mut self) -> VmmCounters {
        match self.qmp.block_bytes().await {
            Ok((read, written)) => VmmCounters {
                block_read_bytes: Some(read),
                block_write_bytes: Some(written),
                ..VmmCounters::default()
            },
            Err(e) => {
                tracing::debug!(error = %e, "QEMU block statistics unavailable");
                VmmCounters::default()
            }
        }
    }

    async fn request_power_off(&mut self) -> Result<(), BoxError> {
        // microvm runs without ACPI, so there is no power button to press;
        // with -no-reboot a reset ends QEMU, as a guest's own reboot does.
        Ok(self.qmp.system_reset().await?)
    }

    async fn snapshot(&mut self, dir: &Path, kind: SnapshotKind) -> Result<(), SnapshotError> {
        if kind == SnapshotKind::Diff {
            return Err(SnapshotError::Unsupported {
                vmm: HypervisorKind::Qemu,
                reason: "QEMU writes full snapshots only; take a full one".into(),
            });
        }
        // The VM state goes to one file, handed to QEMU as an open
        // descriptor: devices only when the RAM is a shared memfd (copied
        // next to it once the VM state is saved, while the VM stays
        // paused), else devices and memory, zero pages skipped. A memfd
        // that cannot be found makes a streamed snapshot, which loads too.
        let memory_copy = dir.join(SNAPSHOT_MEMORY);
        let shared = match (&self.memory, self.pid) {
            (GuestMemory::SharedMemfd, Some(pid)) => match memfd_path(pid) {
                Ok(path) => Some(path),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot find the guest's RAM; streaming it into the snapshot");
                    None
                }
            },
            _ => None,
        };
        if shared.is_none() {
            // A memory file left by an earlier snapshot into this directory
            // would be taken for this one's.
            match tokio::fs::remove_file(&memory_copy).await {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(SnapshotError::Io {
                        path: memory_copy,
                        source,
                    });
                }
            }
        }
        let path = dir.join(SNAPSHOT_STATE);
        let file = tokio::fs::File::create(&path)
            .await
            .map_err(|source| SnapshotError::Io {
                path: path.clone(),
                source,
            })?
            .into_std()
            .await;
        self.qmp
            .save_to(&file, shared.is_some())
            .await
            .map_err(|e| SnapshotError::Vmm {
                vmm: HypervisorKind::Qemu,
                action: "save the VM state (migrate to a file)".into(),
                source: Box::new(e),
            })?;
        tokio::fs::File::from_std(file)
            .sync_all()
            .await
            .map_err(|source| SnapshotError::Io { path, source })?;
        if let Some(memory) = shared {
            // A new file renamed into place: a sandbox restored from an
            // earlier snapshot here maps the old one, which must not change
            // under it.
            let io = |source| SnapshotError::Io {
                path: memory_copy.clone(),
                source,
            };
            nova_runtime::scratch::clone_disk_image(&memory, &memory_copy)
                .await
                .map_err(io)?;
            // It is guest memory: root's alone (the memfd's mode is 0777).
            use std::os::unix::fs::PermissionsExt;
            tokio::fs::set_permissions(&memory_copy, std::fs::Permissions::from_mode(0o600))
                .await
                .map_err(io)?;
            // A sandbox paused to disk lives on from this copy alone.
            tokio::fs::File::open(&memory_copy)
                .await
                .map_err(io)?
                .sync_all()
                .await
                .map_err(io)?;
        }
        Ok(())
    }

    fn kernel_cmdline(&self) -> String {
        self.kernel_cmdline.clone()
    }
}
