//! One running QEMU VM, as the runtime's sandbox task drives it: QMP for the
//! vCPUs and counters, the virtio-serial socket for the agent.

use std::path::{Path, PathBuf};

use nova_core::error::BoxError;
use nova_core::hypervisor::HypervisorKind;
use nova_core::snapshot::{SnapshotError, SnapshotKind};
use nova_runtime::backend::{AgentConnector, ConnectError, Vm, VmmCounters};
use tokio::net::UnixStream;

use crate::qmp::QmpClient;

/// Name of the saved VM state (QEMU's migration stream) in a snapshot
/// directory.
pub const SNAPSHOT_STATE: &str = "vmstate";

/// A running QEMU VM.
#[derive(Debug)]
pub struct QemuVm {
    qmp: QmpClient,
    agent_socket: PathBuf,
    kernel_cmdline: String,
    /// The sandbox's own uid, held while the VM lives.
    _ids: Option<crate::ids::IdLease>,
}

impl QemuVm {
    pub(crate) fn new(
        qmp: QmpClient,
        agent_socket: PathBuf,
        kernel_cmdline: String,
        ids: Option<crate::ids::IdLease>,
    ) -> Self {
        Self {
            qmp,
            agent_socket,
            kernel_cmdline,
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
        // The whole VM state (devices and memory, zero pages skipped) goes
        // to one file, handed to QEMU as an open descriptor.
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
            .save_to(&file)
            .await
            .map_err(|e| SnapshotError::Vmm {
                vmm: HypervisorKind::Qemu,
                action: "save the VM state (migrate to a file)".into(),
                source: Box::new(e),
            })?;
        tokio::fs::File::from_std(file)
            .sync_all()
            .await
            .map_err(|source| SnapshotError::Io { path, source })
    }

    fn kernel_cmdline(&self) -> String {
        self.kernel_cmdline.clone()
    }
}
