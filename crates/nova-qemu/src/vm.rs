//! One sandbox's VM: booting it, and the task that owns it afterwards.
//!
//! [`boot`] lays out the sandbox directory, makes the scratch disk, spawns
//! QEMU, connects QMP and the agent channel, and measures each phase. If any
//! step fails, the QEMU process is killed and reaped and the directory
//! removed before the error is returned ([`Resources`] does it on drop, so
//! an early `?` or a cancelled future cleans up too).
//!
//! After boot, the VM belongs to one task: [`BootedVm`] implements
//! [`SandboxTask`] and `nova_runtime::task::drive` runs it. The hypervisor
//! sends it [`VmCommand`]s over a channel and reads its published
//! [`SandboxInfo`] from a `watch`; no lock is held across an `.await`. The
//! task also watches the QEMU process: if it dies on its own, the sandbox
//! becomes `failed` until it is stopped.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use nova_core::error::{CreateSandboxError, SandboxError};
use nova_core::home::SandboxPaths;
use nova_core::host::process_usage;
use nova_core::metadata::{BootTimings, SandboxInfo};
use nova_core::state::SandboxState;
use nova_core::stats::{SandboxStats, VmmStats};
use nova_runtime::Guest;
use nova_runtime::task::{Reply, SandboxTask, persist, reply, tail_lines};
use nova_protocol::client::AgentClient;
use tokio::net::UnixStream;
use tokio::process::{Child, Command};
use tokio::sync::oneshot;

use crate::cmdline::VmSpec;
use crate::qmp::QmpClient;

/// What the sandbox's task can be asked to do. Each variant is legal in the
/// states the [`SandboxState`] machine allows for its target state; the task
/// checks and answers with the state error otherwise.
#[derive(Debug)]
pub(crate) enum VmCommand {
    /// Pause the vCPUs (running → paused).
    Pause(oneshot::Sender<Result<(), SandboxError>>),
    /// Resume the vCPUs (paused → running).
    Resume(oneshot::Sender<Result<(), SandboxError>>),
    /// Gather stats (any live state).
    Stats(oneshot::Sender<Result<SandboxStats, SandboxError>>),
    /// Stop the VM and release everything (any live state → stopped). The
    /// task ends after answering.
    Stop {
        force: bool,
        reply: oneshot::Sender<Result<(), SandboxError>>,
    },
}

/// How long a QMP command may take.
const QMP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a graceful stop waits for the guest to power off before killing.
const GRACEFUL_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the agent may take to answer a stats request.
const STATS_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest Unix socket path (`sun_path` is 108 bytes with its NUL).
const MAX_SOCKET_PATH: usize = 107;

/// The host resources of one sandbox. Dropping it kills QEMU and removes the
/// sandbox directory; [`Resources::release`] does the same and waits.
#[derive(Debug)]
pub(crate) struct Resources {
    child: Option<Child>,
    dir: PathBuf,
}

impl Resources {
    /// Kills QEMU (if still there), reaps it, and removes the directory.
    async fn release(&mut self) -> std::io::Result<()> {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
        match tokio::fs::remove_dir_all(&self.dir).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

impl Drop for Resources {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            // `kill_on_drop` is set too; the runtime reaps the process.
            let _ = child.start_kill();
        }
        if let Err(e) = std::fs::remove_dir_all(&self.dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(dir = %self.dir.display(), error = %e, "cannot remove sandbox directory");
        }
    }
}

/// A booted VM, ready to be handed to its task.
#[derive(Debug)]
pub(crate) struct BootedVm {
    pub(crate) info: SandboxInfo,
    pub(crate) guest: Guest,
    qmp: QmpClient,
    resources: Resources,
    paths: SandboxPaths,
}

/// What [`boot`] needs besides the VM spec.
#[derive(Debug)]
pub(crate) struct BootParams<'a> {
    pub(crate) qemu_bin: &'a Path,
    pub(crate) paths: SandboxPaths,
    pub(crate) spec: VmSpec,
    pub(crate) scratch_size_mb: u64,
    pub(crate) timeout: Duration,
    pub(crate) info: SandboxInfo,
}

/// Prepares and boots a sandbox; see the module docs.
pub(crate) async fn boot(params: BootParams<'_>) -> Result<BootedVm, CreateSandboxError> {
    let BootParams {
        qemu_bin,
        paths,
        spec,
        scratch_size_mb,
        timeout,
        mut info,
    } = params;
    let prepare_start = Instant::now();
    for socket in [&spec.qmp_socket, &spec.agent_socket] {
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(CreateSandboxError::Unsupported {
                reason: format!(
                    "socket path {} is longer than {MAX_SOCKET_PATH} bytes; use a shorter NOVA_HOME",
                    socket.display()
                ),
            });
        }
    }
    let prepare_err = |path: &Path| {
        let path = path.to_owned();
        move |source| CreateSandboxError::Prepare { path, source }
    };
    paths
        .create()
        .map_err(|(path, source)| CreateSandboxError::Prepare { path, source })?;
    let mut resources = Resources {
        child: None,
        dir: paths.dir().to_owned(),
    };
    if let Some(scratch) = &spec.scratch {
        nova_runtime::scratch::create_scratch_disk(scratch, scratch_size_mb).await?;
    }
    let log = std::fs::File::create(paths.vmm_log()).map_err(prepare_err(&paths.vmm_log()))?;
    let log2 = log.try_clone().map_err(prepare_err(&paths.vmm_log()))?;
    let mut command = Command::new(qemu_bin);
    command
        .args(spec.qemu_args())
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .kill_on_drop(true)
        .process_group(0);
    let prepare = prepare_start.elapsed();

    let spawned = Instant::now();
    let deadline = tokio::time::Instant::from_std(spawned + timeout);
    let child = command
        .spawn()
        .map_err(|source| CreateSandboxError::Spawn {
            program: qemu_bin.to_owned(),
            source,
        })?;
    info.vmm_pid = child.id();
    resources.child = Some(child);
    tracing::debug!(pid = ?info.vmm_pid, "QEMU spawned");

    let timeout_ms = timeout.as_millis() as u64;
    let exited = |status: String| CreateSandboxError::VmmExited {
        status,
        console_tail: console_tail(&paths),
    };
    let timed_out = || CreateSandboxError::BootTimeout {
        timeout_ms,
        console_tail: console_tail(&paths),
    };

    // QMP answers once QEMU has parsed its configuration and created its
    // sockets.
    let qmp = tokio::select! {
        r = tokio::time::timeout_at(deadline, connect_qmp(&spec.qmp_socket)) => match r {
            Ok(Ok(qmp)) => qmp,
            Ok(Err(e)) => {
                // QEMU closing QMP usually means it is exiting: report that.
                if let Some(status) = exited_soon(&mut resources).await {
                    return Err(exited(status));
                }
                return Err(CreateSandboxError::Vmm { vmm: "qemu", action: "answer on QMP".into(), source: e.into() });
            }
            Err(_) => return Err(timed_out()),
        },
        status = wait_child(&mut resources) => return Err(exited(status)),
    };
    let vmm_ready = Instant::now();

    // The agent answers once the guest booted, mounted its filesystems and
    // opened its virtio-serial port.
    let handshake = async {
        let stream = connect_socket(&spec.agent_socket).await?;
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        AgentClient::connect(stream, remaining)
            .await
            .map_err(|e| -> Box<dyn std::error::Error + Send + Sync> { Box::new(e) })
    };
    let (client, hello) = tokio::select! {
        r = tokio::time::timeout_at(deadline, handshake) => match r {
            Ok(Ok(pair)) => pair,
            Ok(Err(e)) => {
                // A handshake that timed out inside is still a boot timeout.
                if tokio::time::Instant::now() >= deadline {
                    return Err(timed_out());
                }
                if let Some(status) = exited_soon(&mut resources).await {
                    return Err(exited(status));
                }
                return Err(CreateSandboxError::Agent(e));
            }
            Err(_) => return Err(timed_out()),
        },
        status = wait_child(&mut resources) => return Err(exited(status)),
    };
    let ready = Instant::now();

    info.boot = Some(BootTimings {
        boot_time_ms: BootTimings::ms(ready - spawned),
        prepare_ms: BootTimings::ms(prepare),
        spawn_ms: BootTimings::ms(vmm_ready - spawned),
        configure_ms: 0.0,
        guest_ms: BootTimings::ms(ready - vmm_ready),
        guest_kernel_ms: Some(hello.agent_started_us as f64 / 1000.0),
        from_snapshot: false,
    });
    info.agent_version = Some(hello.agent_version.clone());
    info.kernel_release = Some(hello.kernel_release.clone());
    info.state
        .transition_to(SandboxState::Running)
        .map_err(|e| CreateSandboxError::Agent(e.into()))?;
    let env = info.config.env.clone();
    let booted = BootedVm {
        guest: Guest::new(client, env),
        qmp,
        resources,
        paths,
        info,
    };
    persist(&booted.paths.state_json(), &booted.info);
    Ok(booted)
}

/// Waits for QEMU to exit and describes how it did. Pends forever if there
/// is no process (so it never wins a `select!`).
async fn wait_child(resources: &mut Resources) -> String {
    match resources.child.as_mut() {
        Some(child) => match child.wait().await {
            Ok(status) => status.to_string(),
            Err(e) => format!("wait failed: {e}"),
        },
        None => std::future::pending().await,
    }
}

/// If QEMU exits within a moment, how it did.
async fn exited_soon(resources: &mut Resources) -> Option<String> {
    tokio::time::timeout(Duration::from_millis(500), wait_child(resources))
        .await
        .ok()
}

/// Connects to a socket QEMU is about to create, retrying until it exists.
async fn connect_socket(path: &Path) -> std::io::Result<UnixStream> {
    let mut delay = Duration::from_micros(500);
    loop {
        match UnixStream::connect(path).await {
            Ok(stream) => return Ok(stream),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) =>
            {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_millis(20));
            }
            Err(e) => return Err(e),
        }
    }
}

async fn connect_qmp(path: &Path) -> Result<QmpClient, crate::qmp::QmpError> {
    let stream = connect_socket(path).await?;
    QmpClient::handshake(stream, QMP_TIMEOUT).await
}

/// The last lines of the guest console and of QEMU's own log.
pub(crate) fn console_tail(paths: &SandboxPaths) -> String {
    const LINES: usize = 30;
    let console = tail_lines(&paths.console_log(), LINES);
    let vmm = tail_lines(&paths.vmm_log(), LINES);
    match (console.is_empty(), vmm.is_empty()) {
        (true, true) => "(no console output)".to_owned(),
        (false, true) => console,
        (true, false) => format!("qemu: {vmm}"),
        (false, false) => format!("{console}\nqemu: {vmm}"),
    }
}

impl SandboxTask for BootedVm {
    type Command = VmCommand;

    async fn handle(&mut self, command: VmCommand) -> Reply {
        match command {
            VmCommand::Pause(tx) => reply(tx, self.pause().await),
            VmCommand::Resume(tx) => reply(tx, self.resume().await),
            VmCommand::Stats(tx) => reply(tx, self.stats().await),
            VmCommand::Stop { force, reply: tx } => reply(tx, self.stop(force).await),
        }
    }

    async fn vmm_exit(&mut self) -> String {
        wait_child(&mut self.resources).await
    }

    fn forget_vmm(&mut self) {
        self.resources.child = None;
    }

    fn has_vmm(&self) -> bool {
        self.resources.child.is_some()
    }

    async fn release(&mut self) -> Result<(), (PathBuf, std::io::Error)> {
        let dir = self.paths.dir().to_owned();
        self.resources.release().await.map_err(|e| (dir, e))
    }

    async fn graceful_shutdown(&mut self, was: SandboxState) {
        self.shut_down_guest(was).await;
    }

    fn console_tail(&self) -> String {
        console_tail(&self.paths)
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
    async fn pause(&mut self) -> Result<(), SandboxError> {
        self.info.state.check_transition(SandboxState::Paused)?;
        self.qmp
            .stop()
            .await
            .map_err(|e| vmm_error("pause the guest (QMP stop)", e))?;
        self.info.state.transition_to(SandboxState::Paused)?;
        Ok(())
    }

    async fn resume(&mut self) -> Result<(), SandboxError> {
        self.info.state.check_transition(SandboxState::Running)?;
        if self.info.state != SandboxState::Paused {
            return Err(nova_core::state::InvalidTransition {
                from: self.info.state,
                to: SandboxState::Running,
            }
            .into());
        }
        self.qmp
            .cont()
            .await
            .map_err(|e| vmm_error("resume the guest (QMP cont)", e))?;
        self.info.state.transition_to(SandboxState::Running)?;
        Ok(())
    }

    async fn stats(&mut self) -> Result<SandboxStats, SandboxError> {
        if !self.info.state.is_live() {
            return Err(nova_core::state::InvalidTransition {
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
        if self.info.state != SandboxState::Failed
            && let Ok((read, written)) = self.qmp.block_bytes().await
        {
            vmm.block_read_bytes = Some(read);
            vmm.block_write_bytes = Some(written);
        }
        // A paused guest cannot answer; report the host's view only.
        let guest = if self.info.state == SandboxState::Running {
            match self.guest.stats(STATS_TIMEOUT).await {
                Ok(g) => Some(g),
                Err(e) => {
                    tracing::debug!(error = %e, "guest stats unavailable");
                    None
                }
            }
        } else {
            None
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

    /// Asks the agent to sync and power off, and waits for QEMU to exit;
    /// gives up (the caller then kills QEMU) after [`GRACEFUL_STOP_TIMEOUT`].
    async fn shut_down_guest(&mut self, was: SandboxState) {
        if was == SandboxState::Paused
            && let Err(e) = self.qmp.cont().await
        {
            tracing::warn!(error = %e, "cannot resume the guest for a graceful stop; killing it");
            return;
        }
        let started = Instant::now();
        let shutdown = async {
            if let Err(e) = self.guest.shutdown().await {
                tracing::warn!(error = %e, "the agent refused to shut down; killing the VM");
                return false;
            }
            wait_child(&mut self.resources).await;
            true
        };
        match tokio::time::timeout(GRACEFUL_STOP_TIMEOUT, shutdown).await {
            Ok(true) => {
                tracing::debug!(
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "guest powered off"
                );
            }
            Ok(false) => {}
            Err(_) => tracing::warn!("the guest did not power off in time; killing the VM"),
        }
    }
}

fn vmm_error(action: &str, e: crate::qmp::QmpError) -> SandboxError {
    SandboxError::Vmm {
        vmm: "qemu",
        action: action.to_owned(),
        source: Box::new(e),
    }
}
