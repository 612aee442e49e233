//! One Firecracker microVM: starting it (cold or from a snapshot) for the
//! runtime, and the running VM the sandbox's task drives.
//!
//! `start` lays out the jail (if any), makes the VMM see the kernel, disks
//! and snapshot files, writes the VM's record for a provider that may
//! re-attach it (`firecracker.json`, see [`crate::reattach`]), spawns
//! Firecracker through the runtime's `Launch`,
//! configures it through the API and starts the guest (`InstanceStart` or
//! `PUT /snapshot/load`). Every wait is a `Launch::step`, bounded by the boot
//! deadline and raced against the VMM's exit.

use std::path::{Path, PathBuf};

use nova_core::error::{BoxError, CreateSandboxError};
use nova_core::hypervisor::HypervisorKind;
use nova_core::snapshot::{SnapshotError, SnapshotKind};
use nova_runtime::backend::{
    AgentConnector, BootSource, Launch, Vm, VmStart, VmmCounters, kernel_args_error,
};

use crate::api::{
    ApiClient, MemoryBackend, MemoryBackendType, SnapshotCreateParams, SnapshotLoadParams,
    SnapshotType,
};
use crate::hypervisor::FirecrackerOptions;
use crate::jailer::{Jail, JailLimits};
use crate::machine::{
    ExtraDrive, LOG_FILE, METRICS_FILE, MachineSpec, SCRATCH_FILE, VSOCK_SOCKET, network_interface,
};
use crate::process::{API_SOCKET, SpawnSpec};
use crate::reattach::{JailRecord, VmRecord};
use crate::stats::MetricsReader;
use crate::vsock::AGENT_VSOCK_PORT;

/// Machine-state file name inside a snapshot directory.
pub(crate) const SNAPSHOT_STATE: &str = "vmstate";
/// Guest memory file name inside a snapshot directory.
pub(crate) const SNAPSHOT_MEMORY: &str = "memory";
/// How long one vsock `CONNECT` may wait for its answer while booting.
const CONNECT_ATTEMPT_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(500);

/// A jail directory, removed on drop (a failed start, or a VM dropped
/// without a release) unless forgotten ([`Vm::leave`]: the VM outlives its
/// provider).
#[derive(Debug)]
pub(crate) struct JailDir(Option<PathBuf>);

impl JailDir {
    /// Guards `dir`, if any.
    pub(crate) fn new(dir: Option<PathBuf>) -> Self {
        Self(dir)
    }

    /// Lets go of the directory without removing it.
    fn forget(&mut self) {
        self.0 = None;
    }
}

impl Drop for JailDir {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take()
            && let Err(e) = std::fs::remove_dir_all(&dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot remove a jail directory");
        }
    }
}

/// A running Firecracker microVM.
#[derive(Debug)]
pub struct FirecrackerVm {
    pub(crate) api: ApiClient,
    /// The VMM's working directory on the host (the jail root when jailed).
    pub(crate) workdir: PathBuf,
    pub(crate) jail_dir: JailDir,
    /// The uid and gid a jailed VMM runs as.
    pub(crate) jailed: Option<(u32, u32)>,
    pub(crate) metrics: MetricsReader,
    pub(crate) track_dirty_pages: bool,
    pub(crate) kernel_cmdline: String,
}

impl FirecrackerVm {
    /// Firecracker's API client for this VM.
    pub fn api(&mut self) -> &mut ApiClient {
        &mut self.api
    }

    /// Flushes Firecracker's metrics and returns them summed since boot.
    pub async fn metrics(&mut self) -> Result<crate::stats::MetricsTotals, BoxError> {
        self.api.flush_metrics().await?;
        Ok(self.metrics.read_new().cloned()?)
    }
}

fn prepare_err(path: &Path) -> impl FnOnce(std::io::Error) -> CreateSandboxError + use<> {
    let path = path.to_owned();
    move |source| CreateSandboxError::Prepare { path, source }
}

/// Makes `host` visible to the VMM under `name` and returns the path the VMM
/// should use: the absolute host path without a jail, else a hard link in
/// the jail root (a copy if the jail is on another file system).
async fn import(
    workdir: &Path,
    jailed: Option<(u32, u32)>,
    host: &Path,
    name: &str,
) -> std::io::Result<String> {
    let Some((uid, gid)) = jailed else {
        return Ok(host.to_string_lossy().into_owned());
    };
    let target = workdir.join(name);
    if let Err(e) = tokio::fs::hard_link(host, &target).await {
        if e.kind() != std::io::ErrorKind::CrossesDevices {
            return Err(e);
        }
        tracing::warn!(file = %host.display(), "jail is on another file system; copying instead of linking");
        nova_runtime::scratch::clone_disk_image(host, &target).await?;
        std::os::unix::fs::chown(&target, Some(uid), Some(gid))?;
    }
    Ok(name.to_owned())
}

/// Spawns, configures and starts one microVM; see the module docs.
pub(crate) async fn start(
    options: &FirecrackerOptions,
    start: VmStart<'_>,
    launch: &mut Launch<'_>,
) -> Result<FirecrackerVm, CreateSandboxError> {
    let info = start.info;
    let paths = start.paths;
    let (jail, jail_dir) = match &options.jailer {
        Some(config) => {
            let mut config = config.clone();
            if let Some(nova_runtime::network::SandboxNet::Namespace(network)) = start.network {
                // The jailer joins the namespace before it drops privileges;
                // Firecracker then opens the tap as the jail's user.
                config.netns = Some(network.netns_path().to_owned());
                network
                    .set_tap_owner(nova_net::TapOwner {
                        uid: config.uid,
                        gid: config.gid,
                    })
                    .await
                    .map_err(|e| CreateSandboxError::Network(Box::new(e)))?;
            }
            let jail = Jail::new(config.clone(), info.id.as_str(), options.firecracker.path())
                .map_err(|e| CreateSandboxError::Unsupported {
                    reason: e.to_string(),
                })?;
            let guard = JailDir(Some(jail.jail_dir()));
            tokio::fs::create_dir_all(jail.root())
                .await
                .map_err(prepare_err(&jail.root()))?;
            std::os::unix::fs::chown(jail.root(), Some(config.uid), Some(config.gid))
                .map_err(prepare_err(&jail.root()))?;
            (Some(jail), guard)
        }
        None => (None, JailDir(None)),
    };
    let jailed = options.jailer.as_ref().map(|c| (c.uid, c.gid));
    let workdir = jail
        .as_ref()
        .map_or_else(|| paths.dir().to_owned(), Jail::root);

    let scratch = match start.scratch {
        Some(scratch) => {
            let name = import(&workdir, jailed, scratch, SCRATCH_FILE)
                .await
                .map_err(prepare_err(scratch))?;
            if let Some((uid, gid)) = jailed {
                std::os::unix::fs::chown(scratch, Some(uid), Some(gid))
                    .map_err(prepare_err(scratch))?;
            }
            Some(name)
        }
        None => None,
    };
    let track_dirty_pages = match start.source {
        BootSource::Restore(s) => s.manifest.track_dirty_pages,
        BootSource::Cold => options.track_dirty_pages,
    };
    let mut machine = MachineSpec {
        kernel: String::new(),
        rootfs: String::new(),
        // Firecracker names the scratch disk relative to its working
        // directory, so a snapshot binds the restoring sandbox's own copy.
        scratch: scratch.map(|_| SCRATCH_FILE.to_owned()),
        extra_drives: Vec::new(),
        memory_mib: info.config.memory_mb,
        vcpus: info.config.vcpus,
        kernel_args: info.config.kernel_args.clone(),
        hostname: info.id.to_string(),
        serial_console: options.serial_console,
        track_dirty_pages,
        vsock_uds: VSOCK_SOCKET.to_owned(),
        metrics_path: Some(METRICS_FILE.to_owned()),
        log_path: Some(LOG_FILE.to_owned()),
        log_level: options.log_level,
        entropy: options.entropy,
        balloon: None,
        network: Vec::new(),
        guest_net: None,
    };
    // The guest's NIC on the sandbox's tap, which Firecracker opens by name
    // inside the namespace it starts in; the agent configures `eth0` from
    // `nova.net=`. A restored guest keeps the snapshot's (same) addresses.
    let netns = match start.network {
        // The runtime makes a user-mode network only for a backend that
        // says it can attach one; Firecracker attaches a tap only.
        Some(nova_runtime::network::SandboxNet::User(_)) => {
            return Err(CreateSandboxError::Unsupported {
                reason: "Firecracker attaches only a tap (the namespace network, which needs \
                         root or CAP_NET_ADMIN); use QEMU for the user-mode network, or set \
                         enable_network = false"
                    .to_owned(),
            });
        }
        Some(nova_runtime::network::SandboxNet::Namespace(network)) => {
            machine.network.push(network_interface(
                network.tap_name().unwrap_or(nova_net::TAP_NAME),
            ));
            machine.guest_net = Some(nova_runtime::network::guest_net(network));
            match &jail {
                Some(_) => None,
                None => Some(std::sync::Arc::new(
                    network
                        .open_netns()
                        .map_err(|e| CreateSandboxError::Network(Box::new(e)))?,
                )),
            }
        }
        None => None,
    };
    let mut load = None;
    match start.source {
        BootSource::Cold => {
            let image = start.image;
            let (kernel, rootfs, extra_drives) =
                (&image.kernel, &image.rootfs, &image.extra_drives);
            machine.kernel = import(&workdir, jailed, kernel, "vmlinux")
                .await
                .map_err(prepare_err(kernel))?;
            machine.rootfs = import(&workdir, jailed, rootfs, "rootfs.ext4")
                .await
                .map_err(prepare_err(rootfs))?;
            for (i, drive) in extra_drives.iter().enumerate() {
                let path = import(&workdir, jailed, &drive.path, &format!("extra{i}.img"))
                    .await
                    .map_err(prepare_err(&drive.path))?;
                machine.extra_drives.push(ExtraDrive {
                    path,
                    read_only: drive.read_only,
                });
            }
        }
        BootSource::Restore(snapshot) => {
            let state = snapshot.dir.join(SNAPSHOT_STATE);
            let memory = snapshot.dir.join(SNAPSHOT_MEMORY);
            load = Some(SnapshotLoadParams {
                snapshot_path: import(&workdir, jailed, &state, SNAPSHOT_STATE)
                    .await
                    .map_err(prepare_err(&state))?,
                mem_backend: MemoryBackend {
                    backend_type: MemoryBackendType::File,
                    backend_path: import(&workdir, jailed, &memory, SNAPSHOT_MEMORY)
                        .await
                        .map_err(prepare_err(&memory))?,
                },
                track_dirty_pages: track_dirty_pages.then_some(true),
                resume_vm: Some(true),
                network_overrides: Vec::new(),
                vsock_override: None,
            });
        }
    }
    // Refused before the VMM starts, with the boot contract's reason.
    let kernel_cmdline = machine.kernel_cmdline().map_err(kernel_args_error)?;
    // What a provider that re-attaches the VM needs to know of it, and
    // which jail to remove if it dies without one.
    let record = VmRecord {
        jail: jail.as_ref().map(|j| JailRecord {
            dir: j.jail_dir(),
            uid: j.config().uid,
            gid: j.config().gid,
        }),
        kernel_cmdline: kernel_cmdline.clone(),
        track_dirty_pages,
    };
    record
        .write(paths.dir())
        .await
        .map_err(prepare_err(&paths.dir().join(crate::reattach::RECORD_FILE)))?;
    launch.show_logs(vec![("firecracker log", workdir.join(LOG_FILE))]);
    let id = info.id.to_string();
    let console = paths.console_log();
    let spawn_spec = SpawnSpec {
        firecracker: options.firecracker.path(),
        id: &id,
        workdir: &workdir,
        jail: jail.as_ref(),
        limits: JailLimits {
            memory_mib: info.config.memory_mb,
            vcpus: info.config.vcpus,
        },
        output: &console,
        boot_timer: options.boot_timer,
        extra_args: &options.extra_args,
        netns: netns.as_ref(),
    };
    crate::process::spawn(&spawn_spec, launch).await?;

    let deadline = launch.deadline();
    let api_socket = workdir.join(API_SOCKET);
    let mut api = launch
        .step(
            "answer on its API socket",
            crate::process::connect_api(&api_socket, deadline),
        )
        .await?;
    launch.vmm_ready();
    match &load {
        None => {
            launch
                .step("accept its configuration", machine.configure(&mut api))
                .await?;
            launch
                .step("start the guest (InstanceStart)", api.instance_start())
                .await?;
        }
        Some(load) => {
            launch
                .step(
                    "accept its logger and metrics",
                    machine.configure_observability(&mut api),
                )
                .await?;
            launch
                .step("load the snapshot", api.load_snapshot(load))
                .await?;
        }
    }
    Ok(FirecrackerVm {
        api,
        metrics: MetricsReader::new(workdir.join(METRICS_FILE)),
        kernel_cmdline,
        workdir,
        jail_dir,
        jailed,
        track_dirty_pages,
    })
}

fn vmm_snapshot_error(action: &str, e: impl Into<BoxError>) -> SnapshotError {
    SnapshotError::Vmm {
        vmm: HypervisorKind::Firecracker,
        action: action.to_owned(),
        source: e.into(),
    }
}

impl Vm for FirecrackerVm {
    fn agent_connector(&self) -> AgentConnector {
        nova_runtime::hybrid_vsock::agent_connector(
            self.workdir.join(VSOCK_SOCKET),
            AGENT_VSOCK_PORT,
            CONNECT_ATTEMPT_TIMEOUT,
        )
    }

    async fn pause(&mut self) -> Result<(), BoxError> {
        Ok(self.api.pause().await?)
    }

    async fn resume(&mut self) -> Result<(), BoxError> {
        Ok(self.api.resume().await?)
    }

    async fn counters(&mut self) -> VmmCounters {
        match self.metrics().await {
            Ok(totals) => VmmCounters {
                block_read_bytes: Some(totals.block.read_bytes),
                block_write_bytes: Some(totals.block.write_bytes),
                net_rx_bytes: Some(totals.net.rx_bytes_count),
                net_tx_bytes: Some(totals.net.tx_bytes_count),
            },
            Err(e) => {
                tracing::debug!(error = %e, "Firecracker metrics unavailable");
                VmmCounters::default()
            }
        }
    }

    async fn request_power_off(&mut self) -> Result<(), BoxError> {
        // A Linux guest reboots on Ctrl+Alt+Del, which with `reboot=k` ends
        // Firecracker.
        Ok(self.api.send_ctrl_alt_del().await?)
    }

    async fn snapshot(&mut self, dir: &Path, kind: SnapshotKind) -> Result<(), SnapshotError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| SnapshotError::Io { path, source }
        };
        let memory = dir.join(SNAPSHOT_MEMORY);
        let state = dir.join(SNAPSHOT_STATE);
        let kind = match kind {
            SnapshotKind::Full => SnapshotType::Full,
            SnapshotKind::Diff => {
                if !self.track_dirty_pages {
                    return Err(SnapshotError::Unsupported {
                        vmm: HypervisorKind::Firecracker,
                        reason: "diff snapshots need dirty-page tracking; create the sandbox \
                                 with FirecrackerOptions::track_dirty_pages = true"
                            .into(),
                    });
                }
                if !tokio::fs::try_exists(&memory).await.unwrap_or(false) {
                    return Err(SnapshotError::Invalid {
                        dir: dir.to_owned(),
                        reason: "a diff snapshot is merged into a previous full snapshot of the \
                                 same sandbox, and there is none here; take a full snapshot first"
                            .into(),
                    });
                }
                SnapshotType::Diff
            }
        };
        // In a jail Firecracker writes inside the chroot; the files are then
        // moved out (a diff is merged into the previous memory file, so that
        // one is linked in first).
        let (vmm_state, vmm_memory) = match self.jailed {
            None => (
                state.to_string_lossy().into_owned(),
                memory.to_string_lossy().into_owned(),
            ),
            Some(_) => {
                if kind == SnapshotType::Diff {
                    import(&self.workdir, self.jailed, &memory, "snapshot.memory")
                        .await
                        .map_err(io(&memory))?;
                }
                ("snapshot.vmstate".to_owned(), "snapshot.memory".to_owned())
            }
        };
        self.api
            .create_snapshot(&SnapshotCreateParams {
                snapshot_path: vmm_state.clone(),
                mem_file_path: vmm_memory.clone(),
                snapshot_type: Some(kind),
            })
            .await
            .map_err(|e| vmm_snapshot_error("write the snapshot", e))?;
        if self.jailed.is_some() {
            for (inside, outside) in [(&vmm_state, &state), (&vmm_memory, &memory)] {
                let inside = self.workdir.join(inside);
                if tokio::fs::rename(&inside, outside).await.is_err() {
                    nova_runtime::scratch::clone_disk_image(&inside, outside)
                        .await
                        .map_err(io(outside))?;
                    tokio::fs::remove_file(&inside).await.map_err(io(&inside))?;
                }
            }
        }
        Ok(())
    }

    fn kernel_cmdline(&self) -> String {
        self.kernel_cmdline.clone()
    }

    fn tracks_dirty_pages(&self) -> bool {
        self.track_dirty_pages
    }

    fn extra_logs(&self) -> Vec<(&'static str, PathBuf)> {
        vec![("firecracker log", self.workdir.join(LOG_FILE))]
    }

    fn leave(&mut self) {
        // The jail holds the VMM's sockets, log and metrics, and its view
        // of the disks: it stays for the provider that re-attaches.
        self.jail_dir.forget();
    }

    async fn release(&mut self) -> Result<(), (PathBuf, std::io::Error)> {
        if let Some(dir) = self.jail_dir.0.take() {
            match tokio::fs::remove_dir_all(&dir).await {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err((dir, e)),
                _ => {}
            }
        }
        Ok(())
    }
}
