//! One running QEMU VM, as the runtime's sandbox task drives it: QMP for the
//! vCPUs and counters, the virtio-serial socket for the agent.

use std::path::{Path, PathBuf};

use nova_core::error::BoxError;
use nova_core::snapshot::{SnapshotError, SnapshotKind};
use nova_runtime::backend::{AgentConnector, ConnectError, Vm, VmmCounters};
use tokio::net::UnixStream;

use crate::qmp::QmpClient;

/// A running QEMU VM.
#[derive(Debug)]
pub struct QemuVm {
    qmp: QmpClient,
    agent_socket: PathBuf,
    kernel_cmdline: String,
}

impl QemuVm {
    pub(crate) fn new(qmp: QmpClient, agent_socket: PathBuf, kernel_cmdline: String) -> Self {
        Self {
            qmp,
            agent_socket,
            kernel_cmdline,
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

    async fn snapshot(&mut self, _dir: &Path, _kind: SnapshotKind) -> Result<(), SnapshotError> {
        Err(SnapshotError::Unsupported {
            vmm: nova_core::hypervisor::HypervisorKind::Qemu,
            reason: "QEMU snapshots are not built yet".into(),
        })
    }

    fn kernel_cmdline(&self) -> String {
        self.kernel_cmdline.clone()
    }
}
