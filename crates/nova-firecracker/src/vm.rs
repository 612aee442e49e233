//! One sandbox's microVM: booting it (cold or from a snapshot), and the task
//! that owns it afterwards.
//!
//! [`boot`] lays out the sandbox directory (and the jail, if any), makes or
//! copies the scratch disk, spawns Firecracker, configures it through the
//! API, starts the guest (`InstanceStart` or `PUT /snapshot/load`) and waits
//! for the agent over hybrid vsock, timing each phase. If any step fails the
//! VMM is killed and every directory removed before the error is returned
//! ([`Resources`] does it on drop, so an early `?` or a cancelled future
//! cleans up too).
//!
//! After boot the VM belongs to one task (`nova_runtime::task::drive` over
//! this file's [`SandboxTask`] impl); the hypervisor
//! sends it [`VmCommand`]s and reads its published [`SandboxInfo`] from a
//! `watch`. The task also watches the process: if Firecracker exits on its
//! own (the guest rebooted or crashed), the sandbox becomes `failed` until
//! it is stopped.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nova_core::error::{CreateSandboxError, SandboxError};
use nova_core::home::SandboxPaths;
use nova_core::host::process_usage;
use nova_core::metadata::{BootTimings, SandboxInfo, now_ms};
use nova_core::state::{InvalidTransition, SandboxState};
use nova_core::stats::{SandboxStats, VmmStats};
use nova_runtime::Guest;
use nova_runtime::task::{Reply, SandboxTask, persist, reply, tail_lines};
use tokio::sync::oneshot;

use crate::api::{
    ApiClient, ApiError, InstanceInfo, LogLevel, MemoryBackend, MemoryBackendType,
    SnapshotCreateParams, SnapshotLoadParams, SnapshotType,
};
use crate::hypervisor::{SnapshotError, SnapshotInfo};
use crate::jailer::{Jail, JailLimits, JailerConfig};
use crate::machine::{ExtraDrive, LOG_FILE, METRICS_FILE, MachineSpec, SCRATCH_FILE, VSOCK_SOCKET};
use crate::process::{ApiReadyError, SpawnError, SpawnSpec, VmmProcess};
use crate::stats::{MetricsReader, MetricsTotals};
use crate::vsock::{AGENT_VSOCK_PORT, AgentConnectError, connect_agent};

/// Name of the VMM.
pub(crate) const VMM: &str = "firecracker";
/// How long the agent may take to answer a stats request.
const STATS_TIMEOUT: Duration = Duration::from_secs(5);
/// After the agent acknowledged a shutdown (it syncs, then powers off), how
/// long to wait for Firecracker to exit before killing it. Firecracker has
/// no power-off device, so a guest that powers off (rather than reboots)
/// halts and the VMM stays; its disks are synced by then.
const AGENT_HALT_GRACE: Duration = Duration::from_secs(2);
/// Snapshot file names inside a snapshot directory.
pub(crate) const SNAPSHOT_STATE: &str = "vmstate";
/// Guest memory file name inside a snapshot directory.
pub(crate) const SNAPSHOT_MEMORY: &str = "memory";
/// Description file name inside a snapshot directory.
pub(crate) const SNAPSHOT_INFO: &str = "snapshot.json";

/// What the sandbox's task can be asked to do. Each variant is legal in the
/// states the [`SandboxState`] machine allows for its target state; the task
/// answers with the state error otherwise.
#[derive(Debug)]
pub(crate) enum VmCommand {
    /// Pause the vCPUs (running → paused).
    Pause(oneshot::Sender<Result<(), SandboxError>>),
    /// Resume the vCPUs (paused → running).
    Resume(oneshot::Sender<Result<(), SandboxError>>),
    /// Gather stats (any live state).
    Stats(oneshot::Sender<Result<SandboxStats, SandboxError>>),
    /// Flush and read Firecracker's metrics (any live state).
    Metrics(oneshot::Sender<Result<MetricsTotals, SandboxError>>),
    /// `GET /` (any live state).
    InstanceInfo(oneshot::Sender<Result<InstanceInfo, SandboxError>>),
    /// Snapshot a paused VM into a directory (paused only).
    Snapshot {
        dir: PathBuf,
        kind: SnapshotType,
        reply: oneshot::Sender<Result<SnapshotInfo, SnapshotError>>,
    },
    /// Stop the VM and release everything (any live state → stopped). The
    /// task ends after answering.
    Stop {
        force: bool,
        reply: oneshot::Sender<Result<(), SandboxError>>,
    },
}

/// The host resources of one sandbox. Dropping it kills Firecracker and
/// removes the directories; [`Resources::release`] does the same and waits.
#[derive(Debug)]
pub(crate) struct Resources {
    vmm: Option<VmmProcess>,
    /// The sandbox directory, then the jail directory if any.
    dirs: Vec<PathBuf>,
}

impl Resources {
    async fn release(&mut self) -> Result<(), (PathBuf, std::io::Error)> {
        if let Some(mut vmm) = self.vmm.take() {
            vmm.kill().await;
        }
        for dir in &self.dirs {
            match tokio::fs::remove_dir_all(dir).await {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err((dir.clone(), e)),
                _ => {}
            }
        }
        Ok(())
    }

    async fn wait_vmm(&mut self) -> crate::process::VmmExit {
        match self.vmm.as_mut() {
            Some(vmm) => vmm.wait().await,
            None => std::future::pending().await,
        }
    }
}

impl Drop for Resources {
    fn drop(&mut self) {
        if let Some(vmm) = self.vmm.as_mut() {
            vmm.start_kill();
        }
        for dir in &self.dirs {
            if let Err(e) = std::fs::remove_dir_all(dir)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot remove sandbox directory");
            }
        }
    }
}

/// What to boot.
#[derive(Debug)]
pub(crate) enum BootSource {
    /// A cold boot of a template.
    Cold {
        kernel: PathBuf,
        rootfs: PathBuf,
        extra_drives: Vec<(PathBuf, bool)>,
    },
    /// A restore of a snapshot made by [`BootedVm::snapshot`].
    Snapshot(SnapshotInfo),
}

/// Everything [`boot`] needs.
#[derive(Debug)]
pub(crate) struct BootParams<'a> {
    pub(crate) firecracker: &'a Path,
    pub(crate) firecracker_version: String,
    pub(crate) jailer: Option<&'a JailerConfig>,
    pub(crate) extra_args: &'a [OsString],
    pub(crate) boot_timer: bool,
    pub(crate) serial_console: bool,
    pub(crate) log_level: LogLevel,
    pub(crate) entropy: bool,
    pub(crate) track_dirty_pages: bool,
    pub(crate) wait_for_agent: bool,
    pub(crate) scratch_size_mb: u64,
    pub(crate) paths: SandboxPaths,
    pub(crate) source: BootSource,
    pub(crate) timeout: Duration,
    pub(crate) info: SandboxInfo,
}

/// A booted VM, ready to be handed to its task.
#[derive(Debug)]
pub(crate) struct BootedVm {
    pub(crate) info: SandboxInfo,
    pub(crate) guest: Option<Guest>,
    api: ApiClient,
    resources: Resources,
    paths: SandboxPaths,
    /// The VMM's working directory on the host.
    workdir: PathBuf,
    jailed: Option<(u32, u32)>,
    metrics: MetricsReader,
    firecracker_version: String,
    track_dirty_pages: bool,
    has_scratch: bool,
}

fn prepare_err(path: &Path) -> impl FnOnce(std::io::Error) -> CreateSandboxError + use<> {
    let path = path.to_owned();
    move |source| CreateSandboxError::Prepare { path, source }
}

/// Makes `host` visible to the VMM under `name` and returns the path the VMM
/// should use: the absolute host path without a jail, else a hard link in
/// the jail root (a copy if the jail is on another file system).
fn import(
    workdir: &Path,
    jailed: Option<(u32, u32)>,
    host: &Path,
    name: &str,
) -> std::io::Result<String> {
    let Some((uid, gid)) = jailed else {
        return Ok(host.to_string_lossy().into_owned());
    };
    let target = workdir.join(name);
    if let Err(e) = std::fs::hard_link(host, &target) {
        if e.kind() != std::io::ErrorKind::CrossesDevices {
            return Err(e);
        }
        tracing::warn!(file = %host.display(), "jail is on another file system; copying instead of linking");
        std::fs::copy(host, &target)?;
        std::os::unix::fs::chown(&target, Some(uid), Some(gid))?;
    }
    Ok(name.to_owned())
}

/// Copies a (sparse) disk image, keeping its holes.
pub(crate) async fn copy_sparse(from: &Path, to: &Path) -> std::io::Result<()> {
    let output = tokio::process::Command::new("cp")
        .arg("--sparse=always")
        .arg("--reflink=auto")
        .arg(from)
        .arg(to)
        .output()
        .await?;
    if output.status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "cp {} {} failed: {}",
            from.display(),
            to.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        )))
    }
}

fn vmm_error(
    action: &str,
    e: impl std::error::Error + Send + Sync + 'static,
) -> CreateSandboxError {
    CreateSandboxError::Vmm {
        vmm: VMM,
        action: action.to_owned(),
        source: Box::new(e),
    }
}

/// Prepares and boots a sandbox; see the module docs.
pub(crate) async fn boot(params: BootParams<'_>) -> Result<BootedVm, CreateSandboxError> {
    let BootParams {
        firecracker,
        firecracker_version,
        jailer,
        extra_args,
        boot_timer,
        serial_console,
        log_level,
        entropy,
        track_dirty_pages,
        wait_for_agent,
        scratch_size_mb,
        paths,
        source,
        timeout,
        mut info,
    } = params;
    let prepare_start = Instant::now();
    paths
        .create()
        .map_err(|(path, source)| CreateSandboxError::Prepare { path, source })?;
    let mut resources = Resources {
        vmm: None,
        dirs: vec![paths.dir().to_owned()],
    };
    let jail = match jailer {
        Some(config) => {
            let jail = Jail::new(config.clone(), info.id.as_str(), firecracker).map_err(|e| {
                CreateSandboxError::Unsupported {
                    reason: e.to_string(),
                }
            })?;
            resources.dirs.push(jail.jail_dir());
            tokio::fs::create_dir_all(jail.root())
                .await
                .map_err(prepare_err(&jail.root()))?;
            std::os::unix::fs::chown(jail.root(), Some(config.uid), Some(config.gid))
                .map_err(prepare_err(&jail.root()))?;
            Some(jail)
        }
        None => None,
    };
    let jailed = jailer.map(|c| (c.uid, c.gid));
    let workdir = jail
        .as_ref()
        .map_or_else(|| paths.dir().to_owned(), Jail::root);

    // The scratch disk: a fresh one, or the snapshot's copy.
    let scratch_path = workdir.join(SCRATCH_FILE);
    let has_scratch = match &source {
        BootSource::Cold { .. } => {
            if info.config.read_only_rootfs {
                false
            } else {
                nova_runtime::scratch::create_scratch_disk(&scratch_path, scratch_size_mb).await?;
                true
            }
        }
        BootSource::Snapshot(snapshot) => {
            if snapshot.scratch {
                copy_sparse(&snapshot.dir.join(SCRATCH_FILE), &scratch_path)
                    .await
                    .map_err(prepare_err(&scratch_path))?;
            }
            snapshot.scratch
        }
    };
    if has_scratch && let Some((uid, gid)) = jailed {
        std::os::unix::fs::chown(&scratch_path, Some(uid), Some(gid))
            .map_err(prepare_err(&scratch_path))?;
    }

    let mut machine = MachineSpec {
        kernel: String::new(),
        rootfs: String::new(),
        scratch: has_scratch.then(|| SCRATCH_FILE.to_owned()),
        extra_drives: Vec::new(),
        memory_mib: info.config.memory_mb,
        vcpus: info.config.vcpus,
        kernel_args: info.config.kernel_args.clone(),
        hostname: info.id.to_string(),
        serial_console,
        track_dirty_pages,
        vsock_uds: VSOCK_SOCKET.to_owned(),
        metrics_path: Some(METRICS_FILE.to_owned()),
        log_path: Some(LOG_FILE.to_owned()),
        log_level,
        entropy,
        balloon: None,
        network: Vec::new(),
    };
    let mut load = None;
    match &source {
        BootSource::Cold {
            kernel,
            rootfs,
            extra_drives,
        } => {
            machine.kernel =
                import(&workdir, jailed, kernel, "vmlinux").map_err(prepare_err(kernel))?;
            machine.rootfs =
                import(&workdir, jailed, rootfs, "rootfs.ext4").map_err(prepare_err(rootfs))?;
            for (i, (path, read_only)) in extra_drives.iter().enumerate() {
                let path = import(&workdir, jailed, path, &format!("extra{i}.img"))
                    .map_err(prepare_err(path))?;
                machine.extra_drives.push(ExtraDrive {
                    path,
                    read_only: *read_only,
                });
            }
        }
        BootSource::Snapshot(snapshot) => {
            let state = snapshot.dir.join(SNAPSHOT_STATE);
            let memory = snapshot.dir.join(SNAPSHOT_MEMORY);
            load = Some(SnapshotLoadParams {
                snapshot_path: import(&workdir, jailed, &state, SNAPSHOT_STATE)
                    .map_err(prepare_err(&state))?,
                mem_backend: MemoryBackend {
                    backend_type: MemoryBackendType::File,
                    backend_path: import(&workdir, jailed, &memory, SNAPSHOT_MEMORY)
                        .map_err(prepare_err(&memory))?,
                },
                track_dirty_pages: snapshot.track_dirty_pages.then_some(true),
                resume_vm: Some(true),
                network_overrides: Vec::new(),
                vsock_override: None,
            });
        }
    }
    let id = info.id.to_string();
    let spawn_spec = SpawnSpec {
        firecracker,
        id: &id,
        workdir: &workdir,
        jail: jail.as_ref(),
        limits: JailLimits {
            memory_mib: info.config.memory_mb,
            vcpus: info.config.vcpus,
        },
        output: &paths.console_log(),
        boot_timer,
        extra_args,
    };
    let prepare = prepare_start.elapsed();

    let spawned = Instant::now();
    let deadline = tokio::time::Instant::from_std(spawned + timeout);
    let vmm = VmmProcess::spawn(&spawn_spec).await.map_err(|e| match e {
        SpawnError::Exec { program, source } => CreateSandboxError::Spawn { program, source },
        other => vmm_error("start", other),
    })?;
    info.vmm_pid = vmm.pid();
    let vmm = resources.vmm.insert(vmm);
    tracing::debug!(pid = ?info.vmm_pid, "Firecracker spawned");

    let timeout_ms = timeout.as_millis() as u64;
    let tail = |paths: &SandboxPaths| console_tail(paths, &workdir);
    let mut api = match vmm.wait_api(deadline).await {
        Ok(api) => api,
        Err(ApiReadyError::Exited(exit)) => {
            return Err(CreateSandboxError::VmmExited {
                status: exit.to_string(),
                console_tail: tail(&paths),
            });
        }
        Err(ApiReadyError::Timeout) => {
            return Err(CreateSandboxError::BootTimeout {
                timeout_ms,
                console_tail: tail(&paths),
            });
        }
        Err(ApiReadyError::Api(e)) => return Err(vmm_error("answer on its API socket", e)),
    };
    let api_ready = Instant::now();

    // Configure and start, unless the VMM dies meanwhile.
    let configure = async {
        match &load {
            None => {
                machine
                    .configure(&mut api)
                    .await
                    .map_err(|e| ("accept its configuration", e))?;
                api.instance_start()
                    .await
                    .map_err(|e| ("start the guest (InstanceStart)", e))
            }
            Some(load) => {
                machine
                    .configure_observability(&mut api)
                    .await
                    .map_err(|e| ("accept its logger and metrics", e))?;
                api.load_snapshot(load)
                    .await
                    .map_err(|e| ("load the snapshot", e))
            }
        }
    };
    let configured: Result<(), (&str, ApiError)> = tokio::select! {
        r = tokio::time::timeout_at(deadline, configure) => match r {
            Ok(r) => r,
            Err(_) => return Err(CreateSandboxError::BootTimeout { timeout_ms, console_tail: tail(&paths) }),
        },
        exit = resources.wait_vmm() => {
            return Err(CreateSandboxError::VmmExited { status: exit.to_string(), console_tail: tail(&paths) });
        }
    };
    if let Err((action, e)) = configured {
        return Err(vmm_error(action, e));
    }
    let started = Instant::now();

    let mut guest = None;
    let mut guest_kernel_ms = None;
    if wait_for_agent {
        let uds = workdir.join(VSOCK_SOCKET);
        let agent = tokio::select! {
            r = connect_agent(&uds, AGENT_VSOCK_PORT, deadline) => r,
            exit = resources.wait_vmm() => {
                return Err(CreateSandboxError::VmmExited { status: exit.to_string(), console_tail: tail(&paths) });
            }
        };
        let (client, hello) = match agent {
            Ok(pair) => pair,
            Err(AgentConnectError::Timeout) => {
                return Err(CreateSandboxError::BootTimeout {
                    timeout_ms,
                    console_tail: tail(&paths),
                });
            }
            Err(e) => {
                if tokio::time::Instant::now() >= deadline {
                    return Err(CreateSandboxError::BootTimeout {
                        timeout_ms,
                        console_tail: tail(&paths),
                    });
                }
                return Err(CreateSandboxError::Agent(Box::new(e)));
            }
        };
        guest_kernel_ms = Some(hello.agent_started_us as f64 / 1000.0);
        info.agent_version = Some(hello.agent_version.clone());
        info.kernel_release = Some(hello.kernel_release.clone());
        guest = Some(Guest::new(client, info.config.env.clone()));
    }
    let ready = Instant::now();

    info.boot = Some(BootTimings {
        boot_time_ms: BootTimings::ms(ready - spawned),
        prepare_ms: BootTimings::ms(prepare),
        spawn_ms: BootTimings::ms(api_ready - spawned),
        configure_ms: BootTimings::ms(started - api_ready),
        guest_ms: BootTimings::ms(ready - started),
        guest_kernel_ms,
        from_snapshot: load.is_some(),
    });
    info.state
        .transition_to(SandboxState::Running)
        .map_err(|e| CreateSandboxError::Agent(e.into()))?;
    let booted = BootedVm {
        guest,
        api,
        metrics: MetricsReader::new(workdir.join(METRICS_FILE)),
        resources,
        paths,
        workdir,
        jailed,
        firecracker_version,
        track_dirty_pages,
        has_scratch,
        info,
    };
    persist(&booted.paths.state_json(), &booted.info);
    Ok(booted)
}

/// The last lines of the guest console (Firecracker's output) and of its log.
pub(crate) fn console_tail(paths: &SandboxPaths, workdir: &Path) -> String {
    const LINES: usize = 30;
    let tail = |path: PathBuf| tail_lines(&path, LINES);
    let console = tail(paths.console_log());
    let log = tail(workdir.join(LOG_FILE));
    match (console.is_empty(), log.is_empty()) {
        (true, true) => {
            "(no console output; the serial console is off unless asked for)".to_owned()
        }
        (false, true) => console,
        (true, false) => format!("firecracker log: {log}"),
        (false, false) => format!("{console}\nfirecracker log: {log}"),
    }
}

impl SandboxTask for BootedVm {
    type Command = VmCommand;

    async fn handle(&mut self, command: VmCommand) -> Reply {
        match command {
            VmCommand::Pause(tx) => reply(tx, self.pause().await),
            VmCommand::Resume(tx) => reply(tx, self.resume().await),
            VmCommand::Stats(tx) => reply(tx, self.stats().await),
            VmCommand::Metrics(tx) => reply(tx, self.metrics().await),
            VmCommand::InstanceInfo(tx) => {
                let result = match self.live_vmm() {
                    Ok(()) => self
                        .api
                        .instance_info()
                        .await
                        .map_err(|e| sandbox_vmm_error("describe the instance (GET /)", e)),
                    Err(e) => Err(e),
                };
                reply(tx, result)
            }
            VmCommand::Snapshot {
                dir,
                kind,
                reply: tx,
            } => reply(tx, self.snapshot(dir, kind).await),
            VmCommand::Stop { force, reply: tx } => reply(tx, self.stop(force).await),
        }
    }

    async fn vmm_exit(&mut self) -> String {
        self.resources.wait_vmm().await.to_string()
    }

    fn forget_vmm(&mut self) {
        self.resources.vmm = None;
    }

    fn has_vmm(&self) -> bool {
        self.resources.vmm.is_some()
    }

    async fn release(&mut self) -> Result<(), (PathBuf, std::io::Error)> {
        self.resources.release().await
    }

    async fn graceful_shutdown(&mut self, was: SandboxState) {
        self.shut_down_guest(was).await;
    }

    fn console_tail(&self) -> String {
        console_tail(&self.paths, &self.workdir)
    }

    fn info(&self) -> &SandboxInfo {
        &self.info
    }

    fn info_mut(&mut self) -> &mut SandboxInfo {
        &mut self.info
    }

    fn state_path(&self) -> PathBuf {
        self.paths.state_json()
    }
}

impl BootedVm {
    /// Errors unless the VMM is there to ask.
    fn live_vmm(&self) -> Result<(), SandboxError> {
        if self.resources.vmm.is_some() && self.info.state != SandboxState::Failed {
            Ok(())
        } else {
            Err(InvalidTransition {
                from: self.info.state,
                to: SandboxState::Running,
            }
            .into())
        }
    }

    async fn pause(&mut self) -> Result<(), SandboxError> {
        self.info.state.check_transition(SandboxState::Paused)?;
        self.api
            .pause()
            .await
            .map_err(|e| sandbox_vmm_error("pause the guest (PATCH /vm)", e))?;
        self.info.state.transition_to(SandboxState::Paused)?;
        Ok(())
    }

    async fn resume(&mut self) -> Result<(), SandboxError> {
        if self.info.state != SandboxState::Paused {
            return Err(InvalidTransition {
                from: self.info.state,
                to: SandboxState::Running,
            }
            .into());
        }
        self.api
            .resume()
            .await
            .map_err(|e| sandbox_vmm_error("resume the guest (PATCH /vm)", e))?;
        self.info.state.transition_to(SandboxState::Running)?;
        if let Some(guest) = &self.guest {
            let _ = guest.sync_clock().await; // The clock stopped while paused; failure is logged.
        }
        Ok(())
    }

    async fn metrics(&mut self) -> Result<MetricsTotals, SandboxError> {
        self.live_vmm()?;
        self.api
            .flush_metrics()
            .await
            .map_err(|e| sandbox_vmm_error("flush its metrics", e))?;
        let path = self.metrics.path().to_owned();
        self.metrics
            .read_new()
            .cloned()
            .map_err(|source| SandboxError::Io {
                action: "read",
                path,
                source,
            })
    }

    async fn stats(&mut self) -> Result<SandboxStats, SandboxError> {
        if !self.info.state.is_live() {
            return Err(InvalidTransition {
                from: self.info.state,
                to: SandboxState::Running,
            }
            .into());
        }
        let mut vmm = VmmStats::default();
        if let Some(usage) = self.info.vmm_pid.and_then(|pid| process_usage(pid).ok()) {
            vmm.rss_bytes = usage.rss_bytes;
            vmm.cpu_user_us = usage.cpu_user_us;
            vmm.cpu_system_us = usage.cpu_system_us;
        }
        match self.metrics().await {
            Ok(totals) => {
                vmm.block_read_bytes = Some(totals.block.read_bytes);
                vmm.block_write_bytes = Some(totals.block.write_bytes);
                vmm.net_rx_bytes = Some(totals.net.rx_bytes_count);
                vmm.net_tx_bytes = Some(totals.net.tx_bytes_count);
            }
            Err(e) => tracing::debug!(error = %e, "Firecracker metrics unavailable"),
        }
        // A paused guest cannot answer; report the host's view only.
        let guest = match (&self.guest, self.info.state) {
            (Some(guest), SandboxState::Running) => match guest.stats(STATS_TIMEOUT).await {
                Ok(g) => Some(g),
                Err(e) => {
                    tracing::debug!(error = %e, "guest stats unavailable");
                    None
                }
            },
            _ => None,
        };
        let memory_usage_mb = match &guest {
            Some(g) => g.memory_used_bytes as f64 / (1024.0 * 1024.0),
            None => vmm.rss_bytes as f64 / (1024.0 * 1024.0),
        };
        Ok(SandboxStats {
            memory_usage_mb,
            memory_limit_mb: self.info.config.memory_mb.into(),
            cpu_usage_us: vmm.cpu_user_us + vmm.cpu_system_us,
            uptime_ms: self.info.age_ms(),
            vmm,
            guest,
        })
    }

    async fn snapshot(
        &mut self,
        dir: PathBuf,
        kind: SnapshotType,
    ) -> Result<SnapshotInfo, SnapshotError> {
        if self.info.state != SandboxState::Paused || self.resources.vmm.is_none() {
            return Err(SnapshotError::NotPaused(self.info.state));
        }
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| SnapshotError::Io { path, source }
        };
        let memory = dir.join(SNAPSHOT_MEMORY);
        if kind == SnapshotType::Diff {
            if !self.track_dirty_pages {
                return Err(SnapshotError::DiffNeedsDirtyTracking);
            }
            if !memory.exists() {
                return Err(SnapshotError::DiffWithoutBase(dir));
            }
        }
        tokio::fs::create_dir_all(&dir).await.map_err(io(&dir))?;
        let state = dir.join(SNAPSHOT_STATE);
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
                        .map_err(io(&memory))?;
                }
                ("snapshot.vmstate".to_owned(), "snapshot.memory".to_owned())
            }
        };
        let started = Instant::now();
        self.api
            .create_snapshot(&SnapshotCreateParams {
                snapshot_path: vmm_state.clone(),
                mem_file_path: vmm_memory.clone(),
                snapshot_type: Some(kind),
            })
            .await
            .map_err(SnapshotError::Api)?;
        if self.jailed.is_some() {
            for (inside, outside) in [(&vmm_state, &state), (&vmm_memory, &memory)] {
                let inside = self.workdir.join(inside);
                if tokio::fs::rename(&inside, outside).await.is_err() {
                    copy_sparse(&inside, outside).await.map_err(io(outside))?;
                    tokio::fs::remove_file(&inside).await.map_err(io(&inside))?;
                }
            }
        }
        // The guest is paused, so its scratch disk matches the memory image.
        if self.has_scratch {
            let copy = dir.join(SCRATCH_FILE);
            let _ = tokio::fs::remove_file(&copy).await;
            copy_sparse(&self.workdir.join(SCRATCH_FILE), &copy)
                .await
                .map_err(io(&copy))?;
        }
        let info = SnapshotInfo {
            dir: dir.clone(),
            source: self.info.id.clone(),
            kind,
            config: self.info.config.clone(),
            created_at_ms: now_ms(),
            firecracker_version: self.firecracker_version.clone(),
            scratch: self.has_scratch,
            track_dirty_pages: self.track_dirty_pages,
        };
        let json = serde_json::to_vec_pretty(&info).map_err(|e| SnapshotError::Io {
            path: dir.join(SNAPSHOT_INFO),
            source: std::io::Error::other(e),
        })?;
        tokio::fs::write(dir.join(SNAPSHOT_INFO), json)
            .await
            .map_err(io(&dir.join(SNAPSHOT_INFO)))?;
        tracing::info!(
            dir = %dir.display(),
            ?kind,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "snapshot written"
        );
        Ok(info)
    }

    /// Asks the guest to end: through the agent (sync, then power off) when
    /// there is one, else with Ctrl+Alt+Del (a Linux guest reboots, which
    /// with `reboot=k` ends Firecracker). Gives up after the grace period;
    /// the caller then kills the VMM.
    async fn shut_down_guest(&mut self, was: SandboxState) {
        if was == SandboxState::Paused
            && let Err(e) = self.api.resume().await
        {
            tracing::warn!(error = %e, "cannot resume the guest for a graceful stop; killing it");
            return;
        }
        let started = Instant::now();
        let grace = match &self.guest {
            Some(guest) => {
                if let Err(e) = guest.shutdown().await {
                    tracing::warn!(error = %e, "the agent refused to shut down; killing the VM");
                    return;
                }
                AGENT_HALT_GRACE
            }
            None => {
                if let Err(e) = self.api.send_ctrl_alt_del().await {
                    tracing::warn!(error = %e, "cannot send Ctrl+Alt+Del; killing the VM");
                    return;
                }
                GRACEFUL_STOP_TIMEOUT
            }
        };
        match tokio::time::timeout(grace, self.resources.wait_vmm()).await {
            Ok(exit) => tracing::debug!(
                %exit,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "guest ended its VM"
            ),
            Err(_) => {
                tracing::debug!("the VMM did not exit after the guest was asked to; killing it")
            }
        }
    }
}

/// How long a graceful stop without an agent waits for the guest to react to
/// Ctrl+Alt+Del.
const GRACEFUL_STOP_TIMEOUT: Duration = Duration::from_secs(10);

fn sandbox_vmm_error(action: &str, e: ApiError) -> SandboxError {
    SandboxError::Vmm {
        vmm: VMM,
        action: action.to_owned(),
        source: Box::new(e),
    }
}
