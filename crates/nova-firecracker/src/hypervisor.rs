//! [`FirecrackerHypervisor`]: the [`Hypervisor`] trait over Firecracker,
//! plus snapshots.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use nova_core::config::SandboxConfig;
use nova_core::error::{CreateSandboxError, ExecError, FileError, SandboxError};
use nova_core::exec::{ExecRequest, ExecStream};
use nova_core::home::NovaHome;
use nova_core::host::KvmStatus;
use nova_core::hypervisor::{Hypervisor, HypervisorKind};
use nova_core::id::SandboxId;
use nova_core::metadata::{SandboxInfo, now_ms};
use nova_core::sandbox::Sandbox;
use nova_core::state::SandboxState;
use nova_core::stats::SandboxStats;
use nova_core::template::TemplateManager;
use nova_runtime::registry::{Entry, SandboxRegistry};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::Instrument;

use crate::api::{ApiError, InstanceInfo, LogLevel, SnapshotType};
use crate::binary::{BinaryError, FirecrackerBinary};
use crate::jailer::JailerConfig;
use crate::stats::MetricsTotals;
use crate::vm::{self, BootParams, BootSource, VmCommand};

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
    /// Options with the defaults for `binary`: no jail, 4 GiB sparse scratch
    /// disks, no serial console, warnings logged, entropy device on, agent
    /// waited for, hardware KVM required.
    pub fn new(home: NovaHome, firecracker: FirecrackerBinary) -> Self {
        Self {
            home,
            firecracker,
            jailer: None,
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

/// Taking a snapshot failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// No sandbox has this id.
    #[error("no sandbox with id {0}")]
    NotFound(SandboxId),
    /// Snapshots are taken of paused sandboxes only.
    #[error("cannot snapshot a sandbox that is {0}; pause it first")]
    NotPaused(SandboxState),
    /// Diff snapshots need dirty-page tracking from boot.
    #[error(
        "diff snapshots need dirty-page tracking; create the sandbox with \
         FirecrackerOptions::track_dirty_pages = true"
    )]
    DiffNeedsDirtyTracking,
    /// A diff is merged into a previous snapshot's memory, which is missing.
    #[error(
        "a diff snapshot is merged into a previous full snapshot of the same sandbox, but {} \
         has none; take a full snapshot there first", .0.display()
    )]
    DiffWithoutBase(PathBuf),
    /// Firecracker refused or failed.
    #[error("Firecracker failed to write the snapshot")]
    Api(#[source] ApiError),
    /// A snapshot file could not be written, copied or read.
    #[error("cannot write or read {}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `snapshot.json` does not describe a snapshot.
    #[error("{} is not a NovaSandbox snapshot description", .path.display())]
    Description {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
}

/// A snapshot directory's description (`snapshot.json`). The directory also
/// holds `vmstate` (the microVM state), `memory` (guest memory) and, unless
/// the root was read-only, `scratch.ext4` (the sandbox's writable disk at
/// the time of the snapshot). The template rootfs is referenced by path and
/// must not change.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    /// The snapshot directory (not stored; set when read).
    #[serde(skip)]
    pub dir: PathBuf,
    /// The sandbox it was taken of.
    pub source: SandboxId,
    /// Full, or a diff merged into the previous memory file.
    pub kind: SnapshotType,
    /// That sandbox's config; restored sandboxes get the same.
    pub config: SandboxConfig,
    /// When it was taken, milliseconds since the Unix epoch.
    pub created_at_ms: u64,
    /// The Firecracker version that wrote it.
    pub firecracker_version: String,
    /// Whether it has a scratch disk copy.
    pub scratch: bool,
    /// Whether the VM tracked dirty pages (restored VMs keep doing so).
    pub track_dirty_pages: bool,
}

impl SnapshotInfo {
    /// Reads the description of the snapshot in `dir`.
    pub fn read(dir: &Path) -> Result<Self, SnapshotError> {
        let path = dir.join(vm::SNAPSHOT_INFO);
        let text = std::fs::read(&path).map_err(|source| SnapshotError::Io {
            path: path.clone(),
            source,
        })?;
        let mut info: Self = serde_json::from_slice(&text)
            .map_err(|source| SnapshotError::Description { path, source })?;
        info.dir = dir.to_owned();
        Ok(info)
    }
}

/// Runs sandboxes as Firecracker microVMs. Cheap to clone; clones share the
/// same sandboxes. Dropping the last clone kills every VM it still runs and
/// removes their directories.
#[derive(Clone, Debug)]
pub struct FirecrackerHypervisor {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    options: FirecrackerOptions,
    templates: TemplateManager,
    kvm: KvmStatus,
    sandboxes: SandboxRegistry<VmCommand>,
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

impl FirecrackerHypervisor {
    /// A provider with these options. Looks at `/dev/kvm` once, now, and
    /// cleans sandboxes that a dead provider left under the same
    /// `$NOVA_HOME` (see [`nova_runtime::leftovers`]).
    pub fn new(options: FirecrackerOptions) -> Self {
        nova_runtime::leftovers::clean_leftovers(&options.home.sandboxes_dir());
        let templates = TemplateManager::new(options.home.templates_dir());
        Self {
            inner: Arc::new(Inner {
                options,
                templates,
                kvm: KvmStatus::probe(),
                sandboxes: SandboxRegistry::default(),
            }),
        }
    }

    /// A provider for this host (see [`FirecrackerOptions::detect`]).
    pub fn detect() -> Result<Self, FirecrackerUnavailable> {
        FirecrackerOptions::detect().map(Self::new)
    }

    /// The options in use.
    pub fn options(&self) -> &FirecrackerOptions {
        &self.inner.options
    }

    /// KVM on this host, as seen when the provider was made.
    pub fn kvm(&self) -> &KvmStatus {
        &self.inner.kvm
    }

    fn check_host(&self) -> Result<(), CreateSandboxError> {
        check_kvm(&self.inner.kvm, self.inner.options.allow_non_hardware_kvm)
            .map_err(|reason| CreateSandboxError::Unsupported { reason })
    }

    /// Boots `source` as a new sandbox with `config` and registers it.
    async fn launch(
        &self,
        config: SandboxConfig,
        source: BootSource,
    ) -> Result<Sandbox, CreateSandboxError> {
        let options = &self.inner.options;
        let id = SandboxId::random();
        let paths = options.home.sandbox(&id);
        let info = SandboxInfo {
            id: id.clone(),
            hypervisor: HypervisorKind::Firecracker,
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
            firecracker: options.firecracker.path(),
            firecracker_version: options.firecracker.version.to_string(),
            jailer: options.jailer.as_ref(),
            extra_args: &options.extra_args,
            boot_timer: options.boot_timer,
            serial_console: options.serial_console,
            log_level: options.log_level,
            entropy: options.entropy,
            track_dirty_pages: match &source {
                BootSource::Snapshot(s) => s.track_dirty_pages,
                BootSource::Cold { .. } => options.track_dirty_pages,
            },
            wait_for_agent: options.wait_for_agent,
            scratch_size_mb: options.scratch_size_mb,
            paths,
            source,
            timeout: Duration::from_millis(config.boot_timeout_ms),
            info,
        })
        .instrument(span.clone())
        .await?;
        let info = booted.info.clone();
        tracing::info!(
            parent: &span,
            boot_ms = info.boot_time_ms(),
            from_snapshot = info.boot.as_ref().is_some_and(|b| b.from_snapshot),
            "sandbox ready"
        );
        let (commands, rx) = mpsc::channel(8);
        let (published, watcher) = watch::channel(info.clone());
        let entry = Entry {
            commands,
            info: watcher,
            guest: booted.guest.clone(),
        };
        tokio::spawn(nova_runtime::task::drive(booted, rx, published).instrument(span));
        self.inner.sandboxes.insert(id, entry);
        Ok(Sandbox::new(Arc::new(self.clone()), info))
    }

    /// Writes a snapshot of the paused sandbox `id` into `dir` (created if
    /// needed): a full one, or a diff merged into the full snapshot already
    /// in `dir` (which needs `track_dirty_pages`). The sandbox stays paused.
    pub async fn snapshot_sandbox(
        &self,
        id: &SandboxId,
        dir: &Path,
        kind: SnapshotType,
    ) -> Result<SnapshotInfo, SnapshotError> {
        let entry = self
            .inner
            .sandboxes
            .entry(id, SandboxState::Paused)
            .map_err(|e| match e {
                SandboxError::State(t) => SnapshotError::NotPaused(t.from),
                _ => SnapshotError::NotFound(id.clone()),
            })?;
        let dir = if dir.is_absolute() {
            dir.to_owned()
        } else {
            std::env::current_dir()
                .map_err(|source| SnapshotError::Io {
                    path: dir.to_owned(),
                    source,
                })?
                .join(dir)
        };
        let (reply, rx) = oneshot::channel();
        let state = entry.info.borrow().state;
        entry
            .commands
            .send(VmCommand::Snapshot { dir, kind, reply })
            .await
            .map_err(|_| SnapshotError::NotPaused(state))?;
        rx.await
            .unwrap_or(Err(SnapshotError::NotPaused(SandboxState::Stopped)))
    }

    /// Creates a sandbox by loading the snapshot in `dir` into a fresh
    /// Firecracker process (with its own copy of the scratch disk) and
    /// resuming it. Its boot timings have `from_snapshot` set; the guest
    /// keeps the hostname of the sandbox the snapshot was taken of.
    pub async fn create_sandbox_from_snapshot(
        &self,
        dir: &Path,
    ) -> Result<Sandbox, CreateSandboxError> {
        let snapshot = SnapshotInfo::read(dir).map_err(|e| CreateSandboxError::Prepare {
            path: dir.join(vm::SNAPSHOT_INFO),
            source: std::io::Error::other(e),
        })?;
        self.check_host()?;
        let ours = self.inner.options.firecracker.version.to_string();
        if snapshot.firecracker_version != ours {
            tracing::warn!(
                snapshot = %snapshot.firecracker_version,
                firecracker = %ours,
                "the snapshot was written by another Firecracker version; loading may fail"
            );
        }
        let config = snapshot.config.clone();
        self.launch(config, BootSource::Snapshot(snapshot)).await
    }

    /// Firecracker's own view of the instance (`GET /`): id, state
    /// (`Not started`, `Running`, `Paused`) and version.
    pub async fn instance_info(&self, id: &SandboxId) -> Result<InstanceInfo, SandboxError> {
        self.inner
            .sandboxes
            .ask(id, SandboxState::Running, VmCommand::InstanceInfo)
            .await
    }

    /// Flushes Firecracker's metrics and returns them summed since boot
    /// (block and network bytes, vCPU exits).
    pub async fn vmm_metrics(&self, id: &SandboxId) -> Result<MetricsTotals, SandboxError> {
        self.inner
            .sandboxes
            .ask(id, SandboxState::Running, VmCommand::Metrics)
            .await
    }
}

#[async_trait]
impl Hypervisor for FirecrackerHypervisor {
    fn kind(&self) -> HypervisorKind {
        HypervisorKind::Firecracker
    }

    async fn create_sandbox(&self, config: SandboxConfig) -> Result<Sandbox, CreateSandboxError> {
        config.validate()?;
        let template = self.inner.templates.load(&config.template_id)?;
        self.check_host()?;
        let source = BootSource::Cold {
            kernel: template.kernel_path(),
            rootfs: config
                .rootfs_path
                .clone()
                .unwrap_or_else(|| template.rootfs_path()),
            extra_drives: config
                .extra_drives
                .iter()
                .map(|d| (d.path.clone(), d.read_only))
                .collect(),
        };
        self.launch(config, source).await
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

#[cfg(test)]
mod tests {
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
            hv.snapshot_sandbox(&id, home.path(), SnapshotType::Full)
                .await,
            Err(SnapshotError::NotFound(_))
        ));
        assert!(hv.get(&id).await.is_none());
        assert!(hv.list().await.is_empty());
        let err = hv
            .create_sandbox_from_snapshot(&home.path().join("none"))
            .await
            .unwrap_err();
        assert!(matches!(err, CreateSandboxError::Prepare { .. }), "{err}");
    }

    #[test]
    fn snapshot_description_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let info = SnapshotInfo {
            dir: dir.path().to_owned(),
            source: SandboxId::random(),
            kind: SnapshotType::Full,
            config: SandboxConfig::default(),
            created_at_ms: 1,
            firecracker_version: "1.16.1".into(),
            scratch: true,
            track_dirty_pages: false,
        };
        std::fs::write(
            dir.path().join(vm::SNAPSHOT_INFO),
            serde_json::to_vec(&info).unwrap(),
        )
        .unwrap();
        assert_eq!(SnapshotInfo::read(dir.path()).unwrap(), info);
        std::fs::write(dir.path().join(vm::SNAPSHOT_INFO), b"{}").unwrap();
        assert!(matches!(
            SnapshotInfo::read(dir.path()),
            Err(SnapshotError::Description { .. })
        ));
    }
}
