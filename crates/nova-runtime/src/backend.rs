//! What a VMM backend supplies: the [`Backend`] and [`Vm`] traits, and the
//! [`Launch`] a backend drives while it starts a VM.
//!
//! Everything every VMM needs is in the runtime ([`crate::Provider`]): the
//! sandbox directory, the scratch disk, the VMM process, the agent
//! handshake, the per-sandbox task, stats, stop, snapshots' bookkeeping. A
//! backend supplies only what is VMM-specific:
//!
//! - [`Backend::start`]: spawn the VMM (through [`Launch::spawn`]), configure
//!   it and start the guest, cold or from a snapshot;
//! - on the running VM ([`Vm`]): open the agent channel, pause, resume, read
//!   the VMM's counters, ask the guest to power off, write a snapshot.
//!
//! Every wait during a start goes through [`Launch::step`], which bounds it
//! by the boot deadline and races it against the VMM's exit, so a backend
//! cannot wedge a create.
//!
//! A backend that supports re-attaching ([`Backend::reattach`]) rebuilds its
//! [`Vm`] around a VMM that a dead provider left running: it reconnects the
//! VMM's control channel and re-takes what it leases per sandbox; the
//! runtime adopts the process, the directory and the network, and opens the
//! agent channel itself. [`Vm::leave`] is the other half: a detached
//! provider that goes away leaves its VMs running, and the backend forgets
//! (without removing) what it would remove on drop. What such a VM had
//! outside its sandbox directory (a jail) is removed, once its VMM is found
//! dead, by [`Backend::release_dead`].

use std::fmt;
use std::future::Future;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::network::SandboxNet;
use nova_core::config::DriveConfig;
use nova_core::error::{BoxError, CreateSandboxError};
use nova_core::home::{NovaHome, SandboxPaths};
use nova_core::hypervisor::HypervisorKind;
use nova_core::metadata::SandboxInfo;
use nova_core::snapshot::{Snapshot, SnapshotError, SnapshotKind};
use nova_core::template::GuestArch;
use tokio::net::UnixStream;

use crate::dir::{SandboxDir, SandboxRecord};
use crate::vmm::{SpawnMode, VmmCommand, VmmExit, VmmProcess, VmmSpawnError};

/// The guest's kernel and disks, as the template (and config) give them.
#[derive(Clone, Debug)]
pub struct GuestImage {
    /// The guest kernel.
    pub kernel: PathBuf,
    /// The root filesystem image (attached read-only).
    pub rootfs: PathBuf,
    /// More disks, in order.
    pub extra_drives: Vec<DriveConfig>,
    /// The guest's architecture (the template's): a backend refuses one it
    /// cannot run, and picks its machine by it.
    pub arch: GuestArch,
}

/// How to start the guest.
#[derive(Clone, Debug)]
pub enum BootSource {
    /// Boot the kernel.
    Cold,
    /// Restore a snapshot this backend wrote; the VM has the same devices
    /// as the one the snapshot was taken of.
    Restore(Box<Snapshot>),
}

/// How a backend gives a sandbox (with `enable_network`) its network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetworkMode {
    /// None: the runtime makes no network, refuses a config that publishes
    /// a port or sets egress rules, and otherwise runs the sandbox without
    /// a network, with a warning.
    None,
    /// The runtime's network namespace (`nova-net`): it makes the
    /// namespace, tap, NAT, published ports and egress sets, and the
    /// backend attaches the VM to the tap ([`VmStart::network`]).
    Namespace,
    /// The backend's own network (Apple VZ's NAT): the runtime makes none
    /// ([`VmStart::network`] is `None`), and the backend attaches the VM
    /// and publishes the config's ports itself. Egress rules need
    /// [`NetworkMode::Namespace`] and are refused.
    Own,
}

/// What the runtime hands a backend to start one VM.
#[derive(Debug)]
pub struct VmStart<'a> {
    /// The sandbox (id, config) as it stands.
    pub info: &'a SandboxInfo,
    /// Its file names.
    pub paths: &'a SandboxPaths,
    /// Its kernel and disks.
    pub image: &'a GuestImage,
    /// Cold boot or restore.
    pub source: &'a BootSource,
    /// The sandbox's scratch disk, prepared by the runtime (a clone of an
    /// empty image, or of the snapshot's); `None` with a read-only root.
    pub scratch: Option<&'a Path>,
    /// The sandbox's network, made by the runtime ([`crate::network`]);
    /// `None` without one. In namespace mode the backend attaches the VM to
    /// its tap ([`nova_net::SandboxNetwork::open_tap`] for a VMM that takes
    /// a descriptor, or [`nova_net::SandboxNetwork::open_netns`] to start
    /// the VMM inside the namespace); in user mode (only for a backend whose
    /// [`Backend::user_network`] is true) to passt's socket
    /// ([`nova_net::UserNetwork::connect_vmm`]). It gives the guest
    /// [`SandboxNet::guest_net`] on its kernel command line; the runtime
    /// tears the network down.
    pub network: Option<&'a SandboxNet>,
}

/// What the runtime hands a backend to re-attach to a running VM
/// ([`Backend::reattach`]).
#[derive(Debug)]
pub struct ReattachVm<'a> {
    /// The sandbox as its dead provider last recorded it.
    pub info: &'a SandboxInfo,
    /// Its file names (sockets, logs).
    pub paths: &'a SandboxPaths,
    /// The VMM's PID, checked to be the recorded process.
    pub vmm_pid: u32,
    /// The sandbox's network, when it has one (taken over by the runtime).
    pub network: Option<&'a SandboxNet>,
    /// When to give up.
    pub deadline: tokio::time::Instant,
}

/// The config's `kernel_args` break the boot contract: a config error, to
/// refuse before the VMM starts.
pub fn kernel_args_error(e: nova_protocol::boot::KernelArgsError) -> CreateSandboxError {
    CreateSandboxError::Config(nova_core::config::ConfigError::KernelArgs {
        reason: e.to_string(),
    })
}

/// Opening the agent channel failed.
#[derive(Debug)]
pub struct ConnectError {
    /// Whether the guest may simply not be listening yet.
    pub transient: bool,
    /// Why.
    pub source: BoxError,
}

impl ConnectError {
    /// An error worth retrying while the guest boots.
    pub fn transient(source: impl Into<BoxError>) -> Self {
        Self {
            transient: true,
            source: source.into(),
        }
    }

    /// An error that retrying will not fix.
    pub fn permanent(source: impl Into<BoxError>) -> Self {
        Self {
            transient: false,
            source: source.into(),
        }
    }
}

impl From<std::io::Error> for ConnectError {
    fn from(e: std::io::Error) -> Self {
        Self {
            transient: crate::retry::socket_not_ready(&e),
            source: e.into(),
        }
    }
}

/// Opens the host end of a VM's agent channel, once per call.
pub type AgentConnector = Box<
    dyn Fn() -> Pin<Box<dyn Future<Output = Result<UnixStream, ConnectError>> + Send>>
        + Send
        + Sync,
>;

/// The VMM's own counters, where it keeps them (`None`: it does not).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VmmCounters {
    /// Bytes the guest read from its disks.
    pub block_read_bytes: Option<u64>,
    /// Bytes the guest wrote to its disks.
    pub block_write_bytes: Option<u64>,
    /// Bytes received by the guest's network devices.
    pub net_rx_bytes: Option<u64>,
    /// Bytes sent by the guest's network devices.
    pub net_tx_bytes: Option<u64>,
}

/// A VMM the runtime can drive; see the module docs. One value serves every
/// sandbox of a provider.
pub trait Backend: Send + Sync + fmt::Debug + Sized + 'static {
    /// The backend's options (binary, data directory, knobs).
    type Options: Clone + fmt::Debug + Send + Sync;
    /// One running VM.
    type Vm: Vm;

    /// Makes the backend from its options; probes the host if it must
    /// (once, here).
    fn from_options(options: Self::Options) -> Self;

    /// Its options.
    fn options(&self) -> &Self::Options;

    /// Which VMM this is.
    fn kind(&self) -> HypervisorKind;

    /// The VMM's version, as recorded in snapshot manifests.
    fn vmm_version(&self) -> String;

    /// Where templates and sandboxes live.
    fn home(&self) -> &NovaHome;

    /// Size of each sandbox's sparse scratch disk, in MiB.
    fn scratch_size_mb(&self) -> u64;

    /// Whether `create_sandbox` waits for the guest agent (the default). A
    /// sandbox without an agent can be paused, resumed and stopped, but
    /// commands and files fail with an agent error.
    fn waits_for_agent(&self) -> bool {
        true
    }

    /// Refuses, before anything is made, when this host cannot run the VMM
    /// (no KVM, ...), saying what to do.
    fn check_host(&self) -> Result<(), CreateSandboxError> {
        Ok(())
    }

    /// How this backend gives a sandbox its network ([`NetworkMode`]).
    fn network_mode(&self) -> NetworkMode {
        NetworkMode::None
    }

    /// Whether this backend, with [`NetworkMode::Namespace`], can also
    /// attach the user-mode network (a passt stream socket) where the
    /// namespace network cannot be made (see [`crate::network`]).
    fn user_network(&self) -> bool {
        false
    }

    /// Why this backend cannot write or load snapshots, if it cannot.
    fn snapshot_support(&self) -> Result<(), String> {
        Err("this VMM's snapshots are not supported yet".into())
    }

    /// Rebuilds the VM of a sandbox whose provider died and whose VMM
    /// (`reattach.vmm_pid`, verified by the runtime) still runs: reconnect
    /// the VMM's control channel (QMP, the API socket) and re-take any
    /// per-sandbox lease, within `reattach.deadline`. The runtime kills the
    /// VMM and releases the sandbox on error. Unsupported by default.
    fn reattach(
        &self,
        reattach: ReattachVm<'_>,
    ) -> impl Future<Output = Result<Self::Vm, BoxError>> + Send {
        let _ = reattach;
        async { Err("this backend cannot re-attach to a running VM".into()) }
    }

    /// Removes what the backend made outside the sandbox directory `dir`
    /// (a jail) for a sandbox a dead provider left that is being cleaned:
    /// its VMM is gone or killed, or re-attaching it failed. Reads what it
    /// needs from `dir`, which the runtime removes afterwards. Best effort
    /// (failures are logged); nothing to do by default.
    fn release_dead(&self, dir: &Path) -> impl Future<Output = ()> + Send {
        let _ = dir;
        async {}
    }

    /// Spawns the VMM through `launch`, configures it and starts the guest
    /// (or restores it). Every wait goes through [`Launch::step`]. On error
    /// the runtime kills the VMM and removes the sandbox directory.
    fn start(
        &self,
        start: VmStart<'_>,
        launch: &mut Launch<'_>,
    ) -> impl Future<Output = Result<Self::Vm, CreateSandboxError>> + Send;
}

/// One running VM, owned by its sandbox's task; see the module docs. Every
/// call is bounded by the runtime (a VMM that does not answer in time makes
/// the sandbox `failed`).
pub trait Vm: Send + fmt::Debug + 'static {
    /// What opens the host end of the agent channel; the runtime calls it
    /// again on transient errors until the boot deadline.
    fn agent_connector(&self) -> AgentConnector;

    /// Pauses the vCPUs.
    fn pause(&mut self) -> impl Future<Output = Result<(), BoxError>> + Send;

    /// Resumes the vCPUs.
    fn resume(&mut self) -> impl Future<Output = Result<(), BoxError>> + Send;

    /// The VMM's counters (best effort: a field it cannot read is `None`).
    fn counters(&mut self) -> impl Future<Output = VmmCounters> + Send;

    /// Asks a guest without an agent to end (ACPI power button,
    /// Ctrl+Alt+Del); the runtime then waits a bounded time for the VMM to
    /// exit and kills it otherwise.
    fn request_power_off(&mut self) -> impl Future<Output = Result<(), BoxError>> + Send;

    /// Writes the paused VM's state and memory into `dir` (which exists),
    /// returning the VMM's kernel command line for the manifest. The runtime
    /// copies the scratch disk and writes the manifest.
    fn snapshot(
        &mut self,
        dir: &Path,
        kind: SnapshotKind,
    ) -> impl Future<Output = Result<(), SnapshotError>> + Send;

    /// The guest kernel command line this VM booted with.
    fn kernel_cmdline(&self) -> String;

    /// Whether the VM tracks dirty pages (so diff snapshots can be taken).
    fn tracks_dirty_pages(&self) -> bool {
        false
    }

    /// Backend files worth showing when the VM fails (beyond `console.log`
    /// and `vmm.log`), labelled.
    fn extra_logs(&self) -> Vec<(&'static str, PathBuf)> {
        Vec::new()
    }

    /// The provider goes away and the VM keeps running (a detached
    /// provider): forget, without removing, whatever this value would
    /// remove when dropped (a jail), so that a later provider can
    /// re-attach. Nothing to do by default.
    fn leave(&mut self) {}

    /// Removes what the backend made outside the sandbox directory (a jail),
    /// after the VMM is gone; on error, the path that could not be removed.
    fn release(&mut self) -> impl Future<Output = Result<(), (PathBuf, std::io::Error)>> + Send {
        async { Ok(()) }
    }
}

/// The boot in progress: the VMM process once spawned, the deadline, and
/// the phase marks the boot timings are computed from.
#[derive(Debug)]
pub struct Launch<'a> {
    pub(crate) dir: &'a SandboxDir,
    pub(crate) record: SandboxRecord,
    pub(crate) vmm: Option<VmmProcess>,
    pub(crate) timeout: Duration,
    pub(crate) deadline: tokio::time::Instant,
    pub(crate) spawned_at: Option<Instant>,
    pub(crate) vmm_ready_at: Option<Instant>,
    pub(crate) started_at: Option<Instant>,
    pub(crate) extra_logs: Vec<(&'static str, PathBuf)>,
    /// Whether the VMM is to outlive its provider.
    pub(crate) mode: SpawnMode,
}

/// How a [`Launch::step`] ended badly, before it is turned into a
/// [`CreateSandboxError`].
enum StepFailure {
    Exited(VmmExit),
    TimedOut,
    Failed(BoxError),
}

impl<'a> Launch<'a> {
    /// Spawns the VMM (own process group, pidfd) and records its PID and
    /// start time in `state.json` at once, before the boot goes on. The boot
    /// clock (`boot_time_ms`) starts here.
    pub fn spawn(&mut self, command: &VmmCommand) -> Result<(), CreateSandboxError> {
        self.spawn_in_netns(command, None)
    }

    /// [`spawn`](Self::spawn), the VMM started inside the network namespace
    /// `netns` ([`nova_net::SandboxNetwork::open_netns`]): for a VMM that opens the
    /// sandbox's tap by name.
    pub fn spawn_in_netns(
        &mut self,
        command: &VmmCommand,
        netns: Option<&Arc<OwnedFd>>,
    ) -> Result<(), CreateSandboxError> {
        let vmm = VmmProcess::spawn_in_netns(command, self.mode, netns)
            .map_err(|e| self.spawn_error(e))?;
        self.spawned_at.get_or_insert_with(Instant::now);
        self.set_vmm(vmm);
        Ok(())
    }

    /// Replaces the spawned process with `pid`, which it forked and which
    /// is the VMM proper (the jailer's child in a new PID namespace).
    pub fn adopt(&mut self, pid: u32) -> Result<(), CreateSandboxError> {
        let vmm = VmmProcess::adopt(pid).map_err(|e| self.spawn_error(e))?;
        self.set_vmm(vmm);
        Ok(())
    }

    fn set_vmm(&mut self, vmm: VmmProcess) {
        self.record.info.vmm_pid = vmm.pid();
        self.record.vmm_start_ticks = vmm.start_ticks();
        self.record.detached = self.mode == SpawnMode::Detached;
        self.vmm = Some(vmm);
        self.dir.persist_or_warn(&self.record);
        tracing::debug!(pid = ?self.record.info.vmm_pid, vmm = %self.record.info.hypervisor, "VMM spawned");
    }

    fn spawn_error(&self, e: VmmSpawnError) -> CreateSandboxError {
        match e {
            VmmSpawnError::Exec { program, source } => {
                CreateSandboxError::Spawn { program, source }
            }
            VmmSpawnError::Output { path, source } => CreateSandboxError::Prepare { path, source },
            other => CreateSandboxError::Vmm {
                vmm: self.record.info.hypervisor.vmm_name(),
                action: "start".into(),
                source: Box::new(other),
            },
        }
    }

    /// The VMM process, once spawned.
    pub fn vmm(&mut self) -> Option<&mut VmmProcess> {
        self.vmm.as_mut()
    }

    /// Marks the VMM's control channel as answering (ends `spawn_ms`).
    pub fn vmm_ready(&mut self) {
        self.vmm_ready_at = Some(Instant::now());
    }

    /// Marks the guest as started (ends `configure_ms`).
    pub fn guest_started(&mut self) {
        let now = Instant::now();
        self.vmm_ready_at.get_or_insert(now);
        self.started_at = Some(now);
    }

    /// Whether the VMM is to outlive its provider ([`SpawnMode::Detached`]:
    /// a backend must then make nothing the VMM depends on live in this
    /// process).
    pub fn spawn_mode(&self) -> SpawnMode {
        self.mode
    }

    /// The boot deadline.
    pub fn deadline(&self) -> tokio::time::Instant {
        self.deadline
    }

    /// Backend files to show (besides `console.log` and `vmm.log`) if the
    /// boot fails.
    pub fn show_logs(&mut self, logs: Vec<(&'static str, PathBuf)>) {
        self.extra_logs = logs;
    }

    /// Runs one boot step: `fut`, bounded by the boot deadline and raced
    /// against the VMM's exit. `action` names the step in errors ("answer on
    /// QMP", "load the snapshot").
    pub async fn step<T, E>(
        &mut self,
        action: &str,
        fut: impl Future<Output = Result<T, E>> + Send,
    ) -> Result<T, CreateSandboxError>
    where
        E: Into<BoxError>,
    {
        let deadline = self.deadline;
        let failure = {
            let exit = async {
                match self.vmm.as_mut() {
                    Some(vmm) => vmm.wait().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = tokio::time::timeout_at(deadline, fut) => match r {
                    Ok(Ok(value)) => return Ok(value),
                    Ok(Err(e)) => StepFailure::Failed(e.into()),
                    Err(_) => StepFailure::TimedOut,
                },
                exit = exit => StepFailure::Exited(exit),
            }
        };
        Err(self.failure(action, failure).await)
    }

    async fn failure(&mut self, action: &str, failure: StepFailure) -> CreateSandboxError {
        let failure = match failure {
            // A step that gave up at the deadline is a boot timeout, said
            // at once.
            StepFailure::Failed(_) if tokio::time::Instant::now() >= self.deadline => {
                StepFailure::TimedOut
            }
            // A control socket closing usually means the VMM is exiting:
            // report that rather than the socket error.
            StepFailure::Failed(e) => match self.exited_soon().await {
                Some(exit) => StepFailure::Exited(exit),
                None => StepFailure::Failed(e),
            },
            other => other,
        };
        match failure {
            StepFailure::Exited(exit) => CreateSandboxError::VmmExited {
                status: exit.to_string(),
                console_tail: self.console_tail(),
            },
            StepFailure::TimedOut => CreateSandboxError::BootTimeout {
                timeout_ms: self.timeout.as_millis() as u64,
                console_tail: self.console_tail(),
            },
            StepFailure::Failed(source) => CreateSandboxError::Vmm {
                vmm: self.record.info.hypervisor.vmm_name(),
                action: action.to_owned(),
                source,
            },
        }
    }

    /// If the VMM exits within a moment (2 s: a loaded host is slow to tear
    /// a process down), how it did.
    async fn exited_soon(&mut self) -> Option<VmmExit> {
        let vmm = self.vmm.as_mut()?;
        tokio::time::timeout(Duration::from_secs(2), vmm.wait())
            .await
            .ok()
    }

    pub(crate) fn console_tail(&self) -> String {
        let extra: Vec<(&str, PathBuf)> = self
            .extra_logs
            .iter()
            .map(|(label, path)| (*label, path.clone()))
            .collect();
        crate::console::tail(self.dir.paths(), &extra)
    }
}
