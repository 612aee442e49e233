//! [`QemuHypervisor`]: the [`Hypervisor`] trait over QEMU's microvm.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use nova_core::config::SandboxConfig;
use nova_core::error::{CreateSandboxError, ExecError, FileError, SandboxError};
use nova_core::exec::{ExecRequest, ExecStream};
use nova_core::home::NovaHome;
use nova_core::host::{Accel, BackendChoice, HostReport};
use nova_core::hypervisor::{Hypervisor, HypervisorKind};
use nova_core::id::SandboxId;
use nova_core::metadata::{SandboxInfo, now_ms};
use nova_core::sandbox::Sandbox;
use nova_core::state::SandboxState;
use nova_core::stats::SandboxStats;
use nova_core::template::TemplateManager;
use nova_runtime::registry::{Entry, SandboxRegistry};
use tokio::sync::{mpsc, watch};
use tracing::Instrument;

use crate::cmdline::{VmSpec, tcg_tsc_khz};
use crate::vm::{self, BootParams, VmCommand};

/// Default size of each sandbox's scratch disk (sparse: only what the guest
/// writes takes space).
pub const DEFAULT_SCRATCH_MB: u64 = 4096;

/// How the QEMU provider runs.
#[derive(Clone, Debug)]
pub struct QemuOptions {
    /// Data directory (templates, sandboxes).
    pub home: NovaHome,
    /// The `qemu-system-x86_64` binary.
    pub qemu_bin: PathBuf,
    /// KVM or TCG.
    pub accel: Accel,
    /// Size of each sandbox's sparse scratch disk in MiB.
    pub scratch_size_mb: u64,
}

/// QEMU cannot be used on this host.
#[derive(Debug, thiserror::Error)]
#[error("QEMU cannot run here: {reason}")]
pub struct QemuUnavailable {
    /// Why, and what to do.
    pub reason: String,
}

impl QemuOptions {
    /// Options for this host: `$NOVA_HOME`, the QEMU binary found by
    /// [`HostReport::probe`], KVM when hardware KVM is usable, else TCG
    /// (with a warning: boots take seconds).
    pub fn detect() -> Result<Self, QemuUnavailable> {
        let home = NovaHome::resolve().map_err(|e| QemuUnavailable {
            reason: e.to_string(),
        })?;
        let report = HostReport::probe();
        let qemu = report.qemu.map_err(|nf| QemuUnavailable {
            reason: format!(
                "qemu-system-x86_64 not found (looked in {}); install it with `apt-get install \
                 qemu-system-x86`",
                nf.searched.join(", ")
            ),
        })?;
        let accel = if report.kvm.is_hardware() {
            Accel::Kvm
        } else {
            tracing::warn!(
                kvm = %report.kvm,
                "no hardware KVM: QEMU will emulate the guest (TCG); boots take seconds"
            );
            Accel::Tcg
        };
        Ok(Self {
            home,
            qemu_bin: qemu.path,
            accel,
            scratch_size_mb: DEFAULT_SCRATCH_MB,
        })
    }

    /// Options from a [`BackendChoice`] that picked QEMU.
    pub fn from_choice(home: NovaHome, choice: &BackendChoice) -> Option<Self> {
        match choice {
            BackendChoice::Qemu { binary, accel } => Some(Self {
                home,
                qemu_bin: binary.clone(),
                accel: *accel,
                scratch_size_mb: DEFAULT_SCRATCH_MB,
            }),
            BackendChoice::Firecracker { .. } => None,
        }
    }
}

/// Runs sandboxes as QEMU `microvm` VMs. Cheap to clone; clones share the
/// same sandboxes. Dropping the last clone kills every VM it still runs and
/// removes their directories.
#[derive(Clone, Debug)]
pub struct QemuHypervisor {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    options: QemuOptions,
    templates: TemplateManager,
    sandboxes: SandboxRegistry<VmCommand>,
}

impl QemuHypervisor {
    /// A provider with these options. Sandboxes that a dead provider left
    /// under the same `$NOVA_HOME` are cleaned first (see
    /// [`nova_runtime::leftovers`]).
    pub fn new(options: QemuOptions) -> Self {
        nova_runtime::leftovers::clean_leftovers(&options.home.sandboxes_dir());
        let templates = TemplateManager::new(options.home.templates_dir());
        Self {
            inner: Arc::new(Inner {
                options,
                templates,
                sandboxes: SandboxRegistry::default(),
            }),
        }
    }

    /// A provider for this host (see [`QemuOptions::detect`]).
    pub fn detect() -> Result<Self, QemuUnavailable> {
        QemuOptions::detect().map(Self::new)
    }

    /// The options in use.
    pub fn options(&self) -> &QemuOptions {
        &self.inner.options
    }
}

#[async_trait]
impl Hypervisor for QemuHypervisor {
    fn kind(&self) -> HypervisorKind {
        HypervisorKind::Qemu
    }

    async fn create_sandbox(&self, config: SandboxConfig) -> Result<Sandbox, CreateSandboxError> {
        config.validate()?;
        let template = self.inner.templates.load(&config.template_id)?;
        let options = &self.inner.options;
        let id = SandboxId::random();
        let paths = options.home.sandbox(&id);
        let spec = VmSpec {
            kernel: template.kernel_path(),
            rootfs: config
                .rootfs_path
                .clone()
                .unwrap_or_else(|| template.rootfs_path()),
            scratch: (!config.read_only_rootfs).then(|| paths.scratch_disk()),
            extra_drives: config.extra_drives.clone(),
            memory_mb: config.memory_mb,
            vcpus: config.vcpus,
            accel: options.accel,
            qmp_socket: paths.api_socket(),
            agent_socket: paths.vsock_socket(),
            console_log: paths.console_log(),
            kernel_args: config.kernel_args.clone(),
            hostname: id.to_string(),
            tsc_khz: tcg_tsc_khz(options.accel),
            confinement: crate::confinement::Confinement::for_host(),
        };
        let info = SandboxInfo {
            id: id.clone(),
            hypervisor: HypervisorKind::Qemu,
            state: SandboxState::Creating,
            created_at_ms: now_ms(),
            boot: None,
            vmm_pid: None,
            dir: paths.dir().to_owned(),
            agent_version: None,
            kernel_release: None,
            config: config.clone(),
        };
        let span = tracing::info_span!("sandbox", id = %id);
        let booted = vm::boot(BootParams {
            qemu_bin: &options.qemu_bin,
            paths,
            spec,
            scratch_size_mb: options.scratch_size_mb,
            timeout: Duration::from_millis(config.boot_timeout_ms),
            info,
        })
        .instrument(span.clone())
        .await?;
        let info = booted.info.clone();
        tracing::info!(parent: &span, boot_ms = info.boot_time_ms(), "sandbox ready");
        let (commands, rx) = mpsc::channel(8);
        let (published, watcher) = watch::channel(info.clone());
        let entry = Entry {
            commands,
            info: watcher,
            guest: Some(booted.guest.clone()),
        };
        tokio::spawn(nova_runtime::task::drive(booted, rx, published).instrument(span));
        self.inner.sandboxes.insert(id, entry);
        Ok(Sandbox::new(Arc::new(self.clone()), info))
    }

    async fn stop_sandbox(&self, id: &SandboxId, force: bool) -> Result<(), SandboxError> {
        let sandboxes = &self.inner.sandboxes;
        let result = sandboxes
            .ask(id, SandboxState::Stopping, |reply| VmCommand::Stop {
                force,
                reply,
            })
            .await;
        sandboxes.retire_if_stopped(id);
        result
    }

    async fn pause_sandbox(&self, id: &SandboxId) -> Result<(), SandboxError> {
        self.inner
            .sandboxes
            .ask(id, SandboxState::Paused, VmCommand::Pause)
            .await
    }

    async fn resume_sandbox(&self, id: &SandboxId) -> Result<(), SandboxError> {
        self.inner
            .sandboxes
            .ask(id, SandboxState::Running, VmCommand::Resume)
            .await
    }

    async fn get_sandbox_stats(&self, id: &SandboxId) -> Result<SandboxStats, SandboxError> {
        self.inner
            .sandboxes
            .ask(id, SandboxState::Running, VmCommand::Stats)
            .await
    }

    async fn exec_stream(
        &self,
        id: &SandboxId,
        request: ExecRequest,
    ) -> Result<ExecStream, ExecError> {
        self.inner.sandboxes.exec_stream(id, request).await
    }

    async fn write_file(
        &self,
        id: &SandboxId,
        path: &str,
        data: Vec<u8>,
        mode: u32,
    ) -> Result<(), FileError> {
        self.inner.sandboxes.write_file(id, path, data, mode).await
    }

    async fn read_file(&self, id: &SandboxId, path: &str) -> Result<Vec<u8>, FileError> {
        self.inner.sandboxes.read_file(id, path).await
    }

    async fn list(&self) -> Vec<SandboxInfo> {
        self.inner.sandboxes.list()
    }

    async fn get(&self, id: &SandboxId) -> Option<SandboxInfo> {
        self.inner.sandboxes.get(id)
    }
}
