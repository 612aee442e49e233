//! [`Firecracker`]: the runtime's [`Backend`] over Firecracker, and
//! [`FirecrackerHypervisor`], the provider on it.

use std::ffi::OsString;
use std::path::Path;

use nova_core::error::{BoxError, CreateSandboxError, SandboxError};
use nova_core::home::NovaHome;
use nova_core::hypervisor::HypervisorKind;
use nova_core::id::SandboxId;
use nova_runtime::Provider;
use nova_runtime::backend::{Backend, Launch, NetworkMode, ReattachVm, VmStart};
use nova_runtime::host::KvmStatus;

use crate::api::{InstanceInfo, LogLevel};
use crate::binary::{BinaryError, FirecrackerBinary};
use crate::jailer::JailerConfig;
use crate::stats::MetricsTotals;
use crate::vm::FirecrackerVm;

/// Default size of each sandbox's scratch disk (sparse: only what the guest
/// writes takes space).
pub const DEFAULT_SCRATCH_MB: u64 = 4096;

/// How the Firecracker provider runs.
#[derive(Clone, Debug)]
pub struct FirecrackerOptions {
    /// Data directory (templates, sandboxes).
    pub home: NovaHome,
    /// The `firecracker` binary.
    pub firecracker: FirecrackerBinary,
    /// Run each sandbox through the jailer.
    pub jailer: Option<JailerConfig>,
    /// Size of each sandbox's sparse scratch disk in MiB.
    pub scratch_size_mb: u64,
    /// Keep the guest serial console (written to the sandbox's
    /// `console.log`). Off by default: it costs boot time. A `console=` in
    /// the config's `kernel_args` also keeps it.
    pub serial_console: bool,
    /// Firecracker's log level (the log is the sandbox's `vmm.log`).
    pub log_level: LogLevel,
    /// Pass `--boot-timer` (Firecracker logs guest boot time when the guest
    /// writes the boot-timer marker).
    pub boot_timer: bool,
    /// Attach a virtio-rng device, so the guest has entropy from the start.
    pub entropy: bool,
    /// Track dirty pages, so diff snapshots can be taken (costs some speed).
    pub track_dirty_pages: bool,
    /// Wait for the agent before `create_sandbox` returns. When false the
    /// sandbox is ready once `InstanceStart` was accepted: for images
    /// without `nova-agent` and for measuring the VMM alone; commands and
    /// files then fail with an agent error.
    pub wait_for_agent: bool,
    /// Run even when KVM is not backed by hardware virtualization (a
    /// paravirtualized KVM): the VMM works, but a standard guest kernel does
    /// not boot at usable speed. Off by default, so the choice is explicit.
    pub allow_non_hardware_kvm: bool,
    /// Extra Firecracker arguments (for example `--no-seccomp`).
    pub extra_args: Vec<OsString>,
}

/// Firecracker cannot be used on this host.
#[derive(Debug, thiserror::Error)]
#[error("Firecracker cannot run here: {reason}")]
pub struct FirecrackerUnavailable {
    /// Why, and what to do.
    pub reason: String,
}

impl From<BinaryError> for FirecrackerUnavailable {
    fn from(e: BinaryError) -> Self {
        Self {
            reason: e.to_string(),
        }
    }
}

impl FirecrackerOptions {
    /// Options with the defaults for `binary`: jailed when nova runs as root
    /// and a jailer is found ([`JailerConfig::for_host`]), 4 GiB sparse
    /// scratch disks, no serial console, warnings logged, entropy device
    /// on, agent waited for, hardware KVM required.
    pub fn new(home: NovaHome, firecracker: FirecrackerBinary) -> Self {
        let jailer = match JailerConfig::for_host(firecracker.path()) {
            Ok(jail) => Some(jail),
            Err(reason) => {
                tracing::debug!(%reason, "Firecracker runs without its jailer");
                None
            }
        };
        Self {
            home,
            firecracker,
            jailer,
            scratch_size_mb: DEFAULT_SCRATCH_MB,
            serial_console: false,
            log_level: LogLevel::Warning,
            boot_timer: false,
            entropy: true,
            track_dirty_pages: false,
            wait_for_agent: true,
            allow_non_hardware_kvm: false,
            extra_args: Vec::new(),
        }
    }

    /// Options for this host: `$NOVA_HOME` and the Firecracker binary found
    /// by [`FirecrackerBinary::locate`].
    pub fn detect() -> Result<Self, FirecrackerUnavailable> {
        let home = NovaHome::resolve().map_err(|e| FirecrackerUnavailable {
            reason: e.to_string(),
        })?;
        Ok(Self::new(home, FirecrackerBinary::locate()?))
    }
}

/// The Firecracker backend of the runtime: one `firecracker` process per
/// sandbox (optionally through the jailer), configured through its API.
#[derive(Debug)]
pub struct Firecracker {
    options: FirecrackerOptions,
    kvm: KvmStatus,
}

impl Firecracker {
    /// KVM on this host, as seen when the provider was made.
    pub fn kvm(&self) -> &KvmStatus {
        &self.kvm
    }
}

/// Runs sandboxes as Firecracker microVMs: the runtime's [`Provider`] over
/// [`Firecracker`]. Cheap to clone; clones share the same sandboxes.
/// Dropping the last clone kills every VM it still runs and removes their
/// directories, except for a [detached](Provider::detached) provider: its
/// VMs (with their jails) outlive it and its process, and the next detached
/// provider takes them over ([`Provider::reattach`]; see
/// [`crate::reattach`]). Firecracker-only operations are in
/// [`FirecrackerSandboxes`].
pub type FirecrackerHypervisor = Provider<Firecracker>;

impl Backend for Firecracker {
    type Options = FirecrackerOptions;
    type Vm = FirecrackerVm;

    /// Looks at `/dev/kvm` once, now.
    fn from_options(options: FirecrackerOptions) -> Self {
        Self {
            options,
            kvm: KvmStatus::probe(),
        }
    }

    fn options(&self) -> &FirecrackerOptions {
        &self.options
    }

    fn kind(&self) -> HypervisorKind {
        HypervisorKind::Firecracker
    }

    fn vmm_version(&self) -> String {
        self.options.firecracker.version.to_string()
    }

    fn home(&self) -> &NovaHome {
        &self.options.home
    }

    fn scratch_size_mb(&self) -> u64 {
        self.options.scratch_size_mb
    }

    fn waits_for_agent(&self) -> bool {
        self.options.wait_for_agent
    }

    fn check_host(&self) -> Result<(), CreateSandboxError> {
        check_kvm(&self.kvm, self.options.allow_non_hardware_kvm)
            .map_err(|reason| CreateSandboxError::Unsupported { reason })
    }

    fn network_mode(&self) -> NetworkMode {
        NetworkMode::Namespace
    }

    fn snapshot_support(&self) -> Result<(), String> {
        Ok(())
    }

    async fn reattach(&self, reattach: ReattachVm<'_>) -> Result<FirecrackerVm, BoxError> {
        crate::reattach::reattach(reattach).await
    }

    async fn release_dead(&self, dir: &Path) {
        crate::reattach::release_dead(dir).await;
    }

    async fn start(
        &self,
        start: VmStart<'_>,
        launch: &mut Launch<'_>,
    ) -> Result<FirecrackerVm, CreateSandboxError> {
        // Firecracker runs guests of the host's own architecture only.
        let arch = start.image.arch;
        if nova_core::template::GuestArch::host() != Some(arch) {
            return Err(CreateSandboxError::Unsupported {
                reason: format!(
                    "Firecracker cannot run this {arch} template on a {} host; use the QEMU \
                     backend (`--backend qemu`), which emulates it",
                    std::env::consts::ARCH
                ),
            });
        }
        crate::vm::start(&self.options, start, launch).await
    }
}

/// What a Firecracker provider offers beyond the
/// [`Hypervisor`](nova_core::hypervisor::Hypervisor) trait.
#[allow(async_fn_in_trait, reason = "implemented here only, for one type")]
pub trait FirecrackerSandboxes {
    /// Firecracker's own view of the instance (`GET /`): id, state
    /// (`Not started`, `Running`, `Paused`) and version.
    async fn instance_info(&self, id: &SandboxId) -> Result<InstanceInfo, SandboxError>;

    /// Flushes Firecracker's metrics and returns them summed since boot
    /// (block and network bytes, vCPU exits).
    async fn vmm_metrics(&self, id: &SandboxId) -> Result<MetricsTotals, SandboxError>;
}

fn sandbox_vmm_error(action: &str, e: impl Into<nova_core::error::BoxError>) -> SandboxError {
    SandboxError::Vmm {
        vmm: HypervisorKind::Firecracker.vmm_name(),
        action: action.to_owned(),
        source: e.into(),
    }
}

impl FirecrackerSandboxes for FirecrackerHypervisor {
    async fn instance_info(&self, id: &SandboxId) -> Result<InstanceInfo, SandboxError> {
        self.with_vm(id, |vm, _| {
            Box::pin(async move {
                vm.api()
                    .instance_info()
                    .await
                    .map_err(|e| sandbox_vmm_error("describe the instance (GET /)", e))
            })
        })
        .await
    }

    async fn vmm_metrics(&self, id: &SandboxId) -> Result<MetricsTotals, SandboxError> {
        self.with_vm(id, |vm, _| {
            Box::pin(async move {
                vm.metrics()
                    .await
                    .map_err(|e| sandbox_vmm_error("flush its metrics", e))
            })
        })
        .await
    }
}

/// Whether Firecracker may run with KVM in state `kvm`; the error says why
/// not and what to do.
pub(crate) fn check_kvm(kvm: &KvmStatus, allow_non_hardware: bool) -> Result<(), String> {
    match kvm {
        KvmStatus::Hardware => Ok(()),
        KvmStatus::Paravirtualized { .. } if allow_non_hardware => Ok(()),
        KvmStatus::Paravirtualized { .. } => Err(format!(
            "KVM is {kvm}. Use QEMU (novasandbox::detect() picks it here), or set \
             FirecrackerOptions::allow_non_hardware_kvm to run the VMM anyway"
        )),
        KvmStatus::Missing => Err(format!(
            "Firecracker needs KVM, and there is {kvm}; enable virtualization in the \
             firmware or load kvm_intel / kvm_amd"
        )),
        KvmStatus::NoAccess { .. } => Err(format!("Firecracker needs KVM: {kvm}")),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use nova_core::config::SandboxConfig;
    use nova_core::error::ExecError;
    use nova_core::hypervisor::Hypervisor;
    use nova_core::snapshot::{SnapshotError, SnapshotKind};

    use super::*;

    #[test]
    fn kvm_errors_say_what_to_do() {
        assert!(check_kvm(&KvmStatus::Hardware, false).is_ok());
        let pvm = KvmStatus::Paravirtualized { pvm_module: true };
        let msg = check_kvm(&pvm, false).unwrap_err();
        assert!(msg.contains("paravirtualized"), "{msg}");
        assert!(msg.contains("allow_non_hardware_kvm"), "{msg}");
        assert!(check_kvm(&pvm, true).is_ok());
        let denied = KvmStatus::NoAccess {
            reason: "Permission denied (os error 13)".into(),
        };
        let msg = check_kvm(&denied, true).unwrap_err();
        assert!(msg.contains("run as root or join the `kvm` group"), "{msg}");
        assert!(check_kvm(&KvmStatus::Missing, true).is_err());
    }

    fn options(home: &Path) -> FirecrackerOptions {
        FirecrackerOptions::new(
            NovaHome::at(home),
            FirecrackerBinary {
                path: "/nonexistent/firecracker".into(),
                version: crate::binary::Version::new(1, 16, 1),
            },
        )
    }

    #[tokio::test]
    async fn missing_template_is_reported_before_anything_is_made() {
        let home = tempfile::tempdir().unwrap();
        let hv = FirecrackerHypervisor::new(options(home.path()));
        let config = SandboxConfig::builder()
            .template_id("nope")
            .build()
            .unwrap();
        let err = hv.create_sandbox(config).await.unwrap_err();
        assert!(matches!(err, CreateSandboxError::Template(_)), "{err}");
        assert!(!home.path().join("sandboxes").exists());
    }

    #[tokio::test]
    async fn operations_on_unknown_sandboxes_say_so() {
        let home = tempfile::tempdir().unwrap();
        let hv = FirecrackerHypervisor::new(options(home.path()));
        let id = SandboxId::random();
        assert!(matches!(
            hv.pause_sandbox(&id).await,
            Err(SandboxError::NotFound(_))
        ));
        assert!(matches!(
            hv.exec_stream(&id, "true".into()).await,
            Err(ExecError::NotFound(_))
        ));
        assert!(matches!(
            hv.snapshot_sandbox_with(&id, home.path(), SnapshotKind::Full)
                .await,
            Err(SnapshotError::NotFound(_))
        ));
        assert!(hv.get(&id).await.is_none());
        assert!(hv.list().await.is_empty());
        let err = hv
            .create_sandbox_from_snapshot(&home.path().join("none"))
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                CreateSandboxError::Snapshot(SnapshotError::Invalid { .. })
            ),
            "{err}"
        );
    }
}
