//! The task that owns one sandbox's VM after boot, for every backend.
//!
//! `drive` runs it:
//!
//! - [`SandboxAction`]s are carried out one at a time, in order;
//! - the new [`SandboxInfo`] is persisted (`state.json`) and published on the
//!   `watch` *before* the action's answer is sent, so a caller never sees a
//!   stale state after its own command returned;
//! - every await is bounded ([`Timeouts`]): a VMM or agent that does not
//!   answer in time is killed, everything is released, and the sandbox
//!   becomes `failed` with the reason, never a stuck task;
//! - a VMM that exits on its own does the same, and so does an agent
//!   connection that ends outside a stop (the agent died, or the guest broke
//!   the protocol: sent past its flow-control credit, ...);
//! - when every action sender is gone (the provider was dropped), the VM is
//!   released: nothing outlives its provider; except with a detached
//!   provider, whose task then leaves the VM running (VMM, directory,
//!   network left in place, the directory's lock let go) for a later
//!   provider to re-attach;
//! - when the task ends (stopped, or its provider gone) it retires the
//!   sandbox from the registry itself, so a caller that gave up waiting on
//!   `stop` leaks nothing;
//! - a pause to disk ([`SandboxAction::PauseToDisk`]) writes a full
//!   snapshot into the sandbox directory's `persisted/`, records
//!   `persisted` in `state.json`, then ends the VMM: the task goes on
//!   without a VM (`vm: None`), keeping the directory, its lock and the
//!   network. A resume boots a new VMM from that snapshot through the
//!   provider's `Restarter` (the same boot path a create takes) and the
//!   task owns the new VM; a failed restore leaves the sandbox paused on
//!   disk, its files untouched.

use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::time::Duration;

use nova_core::error::{BoxError, CreateSandboxError, SandboxError, UpdateNetworkError};
use nova_core::metadata::{SandboxInfo, now_ms};
use nova_core::network::EgressConfig;
use nova_core::snapshot::{
    SNAPSHOT_FORMAT, Snapshot, SnapshotError, SnapshotKind, SnapshotManifest, TemplateIdentity,
};
use nova_core::state::{InvalidTransition, SandboxState};
use nova_core::stats::{SandboxStats, VmmStats};
use tokio::sync::{mpsc, watch};

use crate::Guest;
use crate::action::SandboxAction;
use crate::backend::Vm;
use crate::dir::{SandboxDir, SandboxRecord};
use crate::registry::SandboxRegistry;
use crate::vmm::VmmProcess;

/// The bounds on every wait of a sandbox's task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// One VMM request (pause, resume, counters, a backend operation).
    pub vmm: Duration,
    /// One agent request made by the runtime (stats, clock, shutdown).
    pub agent: Duration,
    /// A graceful stop, from asking the guest to the VMM's exit; the VMM is
    /// killed after it.
    pub graceful_stop: Duration,
    /// Writing a snapshot (memory may be gigabytes).
    pub snapshot: Duration,
    /// Killing and reaping the VMM.
    pub kill: Duration,
}

impl Default for Timeouts {
    /// 10 s per VMM request, 5 s per agent request, 10 s for a graceful
    /// stop, 120 s for a snapshot, 5 s to reap a killed VMM.
    fn default() -> Self {
        Self {
            vmm: Duration::from_secs(10),
            agent: Duration::from_secs(5),
            graceful_stop: Duration::from_secs(10),
            snapshot: Duration::from_secs(120),
            kill: Duration::from_secs(5),
        }
    }
}

/// Name of the directory, inside a sandbox's directory, that holds its
/// state while it is paused to disk (a snapshot: VM state and memory; the
/// scratch disk stays where it is).
pub const PERSISTED_DIR: &str = "persisted";

/// What a restore of a sandbox paused to disk is given: the sandbox's
/// directory, its record as it stands, its network, and the snapshot.
pub(crate) struct Restart<'a> {
    pub(crate) dir: &'a SandboxDir,
    pub(crate) record: SandboxRecord,
    pub(crate) network: Option<&'a crate::network::SandboxNet>,
    pub(crate) snapshot_dir: PathBuf,
}

/// A sandbox restored from disk, for its task to own.
pub(crate) struct Restarted<V> {
    pub(crate) vm: V,
    pub(crate) vmm: Option<VmmProcess>,
    pub(crate) guest: Option<Guest>,
    /// The record with the new VMM's PID and the agent's versions.
    pub(crate) record: SandboxRecord,
}

/// The future a [`Restarter`] returns.
pub(crate) type RestartFuture<'a, V> =
    Pin<Box<dyn Future<Output = Result<Restarted<V>, CreateSandboxError>> + Send + 'a>>;

/// Boots a new VMM from a sandbox's saved state (the provider's boot path;
/// it holds the provider weakly, so a task never keeps its provider alive).
#[derive(Clone)]
pub(crate) struct Restarter<V>(
    pub(crate) Arc<dyn for<'a> Fn(Restart<'a>) -> RestartFuture<'a, V> + Send + Sync>,
);

impl<V> fmt::Debug for Restarter<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Restarter")
    }
}

/// A booted sandbox, as its task owns it.
#[derive(Debug)]
pub(crate) struct SandboxTask<V: Vm> {
    /// The VM; `None` while the sandbox is paused to disk.
    pub(crate) vm: Option<V>,
    pub(crate) vmm: Option<VmmProcess>,
    pub(crate) dir: SandboxDir,
    pub(crate) record: SandboxRecord,
    pub(crate) guest: Option<Guest>,
    pub(crate) timeouts: Timeouts,
    pub(crate) vmm_version: String,
    pub(crate) template: Option<TemplateIdentity>,
    /// The sandbox's network, torn down on release.
    pub(crate) network: Option<crate::network::SandboxNet>,
    /// Whether the VM and the sandbox's files are gone.
    pub(crate) released: bool,
    /// Whether the VM outlives the provider (see the module docs).
    pub(crate) detached: bool,
    /// Restores the sandbox after a pause to disk.
    pub(crate) restarter: Restarter<V>,
}

/// Runs `task` until it is stopped or its provider is dropped; see the
/// module docs.
pub(crate) async fn drive<V: Vm>(
    mut task: SandboxTask<V>,
    mut actions: mpsc::Receiver<SandboxAction<V>>,
    published: watch::Sender<SandboxInfo>,
    registry: Weak<SandboxRegistry<V>>,
) {
    loop {
        let watching = task.vmm.is_some();
        tokio::select! {
            action = actions.recv() => {
                let Some(action) = action else {
                    if task.detached {
                        tracing::debug!("provider dropped; leaving the VM running");
                        task.leave();
                        break;
                    }
                    tracing::debug!("provider dropped; releasing the VM");
                    if let Err((path, e)) = task.release().await {
                        tracing::warn!(path = %path.display(), error = %e, "cannot remove the sandbox's files");
                    }
                    break;
                };
                task.handle(action, &published, &registry).await;
                if task.record.info.state == SandboxState::Stopped {
                    break;
                }
            }
            exit = wait_vmm(&mut task.vmm), if watching => {
                task.fail(format!("the VMM exited on its own ({exit})")).await;
                publish(&task.dir, &task.record, task.released, &published).await;
            }
            end = agent_closed(&task.guest), if task.guest.is_some() => {
                // A VMM that was killed closes the agent channel as it
                // dies: its exit, seen within a moment, is the reason.
                let vmm_exit = match end.violation() {
                    Some(_) => None,
                    None => bounded(VMM_EXIT_GRACE, wait_vmm(&mut task.vmm)).await.ok(),
                };
                let reason = match (vmm_exit, end.violation()) {
                    (Some(exit), _) => format!("the VMM exited on its own ({exit})"),
                    (None, Some(_)) => format!("the guest broke the agent protocol ({end})"),
                    (None, None) => format!("the agent connection ended ({end})"),
                };
                task.fail(reason).await;
                publish(&task.dir, &task.record, task.released, &published).await;
            }
        }
    }
    if let Some(registry) = registry.upgrade() {
        registry.retire(&task.record.info.id, task.record.info.clone());
    }
}

/// Persists `record` (unless the sandbox is stopped or its files are gone)
/// and publishes it.
async fn publish(
    dir: &SandboxDir,
    record: &SandboxRecord,
    released: bool,
    published: &watch::Sender<SandboxInfo>,
) {
    if record.info.state != SandboxState::Stopped && !released {
        dir.persist_in_background(record).await;
    }
    published.send_replace(record.info.clone());
}

/// Why the agent connection ended; pends forever without an agent.
async fn agent_closed(guest: &Option<Guest>) -> nova_protocol::client::ConnectionEnd {
    match guest {
        Some(guest) => guest.client().closed().await,
        None => std::future::pending().await,
    }
}

async fn wait_vmm(vmm: &mut Option<VmmProcess>) -> crate::vmm::VmmExit {
    match vmm.as_mut() {
        Some(vmm) => vmm.wait().await,
        None => std::future::pending().await,
    }
}

/// How long a sandbox whose agent connection ended waits for its VMM's
/// exit, to report that (the usual cause) rather than the closed channel.
const VMM_EXIT_GRACE: Duration = Duration::from_millis(500);

/// Bounds `fut` by `limit`.
async fn bounded<T>(limit: Duration, fut: impl Future<Output = T>) -> Result<T, Duration> {
    tokio::time::timeout(limit, fut).await.map_err(|_| limit)
}

impl<V: Vm> SandboxTask<V> {
    fn info(&self) -> &SandboxInfo {
        &self.record.info
    }

    fn state(&self) -> SandboxState {
        self.record.info.state
    }

    async fn handle(
        &mut self,
        action: SandboxAction<V>,
        published: &watch::Sender<SandboxInfo>,
        registry: &Weak<SandboxRegistry<V>>,
    ) {
        // Each arm publishes before it answers.
        match action {
            SandboxAction::PauseToDisk(reply) => {
                let r = self.pause_to_disk().await;
                publish(&self.dir, &self.record, self.released, published).await;
                let _ = reply.send(r);
            }
            SandboxAction::Pause(reply) => {
                let r = self.pause().await;
                publish(&self.dir, &self.record, self.released, published).await;
                let _ = reply.send(r);
            }
            SandboxAction::Resume(reply) => {
                let restores = self.record.info.persisted;
                let r = self.resume().await;
                // A VM restored from disk has a new agent connection: exec
                // and file calls go to it from now on.
                if restores
                    && r.is_ok()
                    && let Some(registry) = registry.upgrade()
                {
                    registry.set_guest(&self.record.info.id, self.guest.clone());
                }
                publish(&self.dir, &self.record, self.released, published).await;
                let _ = reply.send(r);
            }
            SandboxAction::Stats(reply) => {
                let r = self.stats().await;
                publish(&self.dir, &self.record, self.released, published).await;
                let _ = reply.send(r);
            }
            SandboxAction::Snapshot { dir, kind, reply } => {
                let r = self.snapshot(dir, kind).await;
                publish(&self.dir, &self.record, self.released, published).await;
                let _ = reply.send(r);
            }
            SandboxAction::Stop { force, reply } => {
                let r = self.stop(force).await;
                publish(&self.dir, &self.record, self.released, published).await;
                let _ = reply.send(r);
            }
            SandboxAction::UpdateNetwork { egress, reply } => {
                let r = self.update_network(egress).await;
                publish(&self.dir, &self.record, self.released, published).await;
                let _ = reply.send(r);
            }
            SandboxAction::WithVm(op) => {
                let limit = self.timeouts.vmm;
                let usable = self.vmm.is_some() && self.state() != SandboxState::Failed;
                let timed_out = if usable && let Some(vm) = self.vm.as_mut() {
                    let info = self.record.info.clone();
                    bounded(limit, op(Ok(vm), &info)).await.is_err()
                } else {
                    let e = InvalidTransition {
                        from: self.state(),
                        to: SandboxState::Running,
                    };
                    let info = self.record.info.clone();
                    op(Err(e.into()), &info).await;
                    false
                };
                if timed_out {
                    self.fail(format!("the VMM did not answer within {limit:?}"))
                        .await;
                }
                publish(&self.dir, &self.record, self.released, published).await;
            }
        }
    }

    /// Replaces the egress policy of the sandbox's network, bounded by the
    /// VMM request timeout (an nft transaction takes milliseconds).
    async fn update_network(&mut self, egress: EgressConfig) -> Result<(), UpdateNetworkError> {
        let state = self.state();
        if !matches!(state, SandboxState::Running | SandboxState::Paused) {
            return Err(UpdateNetworkError::NotRunning(state));
        }
        let id = self.info().id.clone();
        let limit = self.timeouts.vmm;
        let Some(net) = self.network.as_mut() else {
            return Err(UpdateNetworkError::NoNetwork(id));
        };
        match bounded(limit, crate::network::update(net, &egress)).await {
            Ok(Ok(())) => {
                tracing::info!("egress policy updated");
                self.record.info.config.egress = Some(egress);
                Ok(())
            }
            Ok(Err(e)) => Err(e),
            Err(limit) => Err(UpdateNetworkError::Network(
                format!("nft did not apply the policy within {limit:?}").into(),
            )),
        }
    }

    /// A VMM request, bounded; a VMM that does not answer in time fails the
    /// sandbox.
    async fn vmm_request<T>(
        &mut self,
        action: &str,
        request: impl AsyncFnOnce(&mut V) -> Result<T, BoxError>,
    ) -> Result<T, SandboxError> {
        let limit = self.timeouts.vmm;
        let Some(vm) = self.vm.as_mut() else {
            return Err(InvalidTransition {
                from: self.state(),
                to: SandboxState::Running,
            }
            .into());
        };
        match bounded(limit, request(vm)).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(source)) => Err(SandboxError::Vmm {
                vmm: self.info().hypervisor.vmm_name(),
                action: action.to_owned(),
                source,
            }),
            Err(limit) => {
                let reason = format!("the VMM did not {action} within {limit:?}");
                self.fail(reason.clone()).await;
                Err(SandboxError::Vmm {
                    vmm: self.info().hypervisor.vmm_name(),
                    action: action.to_owned(),
                    source: reason.into(),
                })
            }
        }
    }

    async fn pause(&mut self) -> Result<(), SandboxError> {
        self.state().check_transition(SandboxState::Paused)?;
        self.vmm_request("pause the guest", async |vm| vm.pause().await)
            .await?;
        self.record.info.state.transition_to(SandboxState::Paused)?;
        Ok(())
    }

    async fn resume(&mut self) -> Result<(), SandboxError> {
        if self.state() != SandboxState::Paused {
            return Err(InvalidTransition {
                from: self.state(),
                to: SandboxState::Running,
            }
            .into());
        }
        if self.record.info.persisted {
            return self.restore_from_disk().await;
        }
        self.vmm_request("resume the guest", async |vm| vm.resume().await)
            .await?;
        self.record
            .info
            .state
            .transition_to(SandboxState::Running)?;
        // The guest's clock stood still while it was paused.
        if let Some(guest) = &self.guest {
            let limit = self.timeouts.agent;
            if bounded(limit, guest.sync_clock()).await.is_err() {
                tracing::warn!(?limit, "the agent did not set the guest clock in time");
            }
        }
        Ok(())
    }

    async fn stats(&mut self) -> Result<SandboxStats, SandboxError> {
        if !self.state().is_live() {
            return Err(InvalidTransition {
                from: self.state(),
                to: SandboxState::Running,
            }
            .into());
        }
        let mut vmm = VmmStats::default();
        if let Some(pid) = self.vmm.as_ref().and_then(VmmProcess::pid)
            && let Ok(usage) = crate::host::process_usage(pid)
        {
            vmm.rss_bytes = usage.rss_bytes;
            vmm.cpu_user_us = usage.cpu_user_us;
            vmm.cpu_system_us = usage.cpu_system_us;
        }
        if self.vmm.is_some() && self.state() != SandboxState::Failed {
            let counters = self
                .vmm_request("report its counters", async |vm| Ok(vm.counters().await))
                .await?;
            vmm.block_read_bytes = counters.block_read_bytes;
            vmm.block_write_bytes = counters.block_write_bytes;
            vmm.net_rx_bytes = counters.net_rx_bytes;
            vmm.net_tx_bytes = counters.net_tx_bytes;
        }
        // The sandbox's veth counts everything the guest sent and received;
        // a user-mode network counts nothing (and QEMU keeps no counters
        // for its stream netdev): those stay unavailable, not 0.
        if let Some(net) = &self.network {
            match bounded(self.timeouts.vmm, net.counters()).await {
                Ok(Ok(Some(c))) => {
                    vmm.net_rx_bytes = Some(c.rx_bytes);
                    vmm.net_tx_bytes = Some(c.tx_bytes);
                }
                Ok(Ok(None)) => {}
                Ok(Err(e)) => tracing::debug!(error = %e, "network counters unavailable"),
                Err(limit) => tracing::debug!(?limit, "network counters did not come in time"),
            }
        }
        // A paused guest cannot answer; report the host's view only.
        let guest = match (&self.guest, self.state()) {
            (Some(guest), SandboxState::Running) => match guest.stats(self.timeouts.agent).await {
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
            memory_limit_mb: self.info().config.memory_mb.into(),
            cpu_usage_us: vmm.cpu_user_us + vmm.cpu_system_us,
            uptime_ms: self.info().age_ms(),
            vmm,
            guest,
        })
    }

    async fn snapshot(
        &mut self,
        dir: PathBuf,
        kind: SnapshotKind,
    ) -> Result<Snapshot, SnapshotError> {
        self.write_snapshot(dir, kind, true).await
    }

    /// Writes a snapshot of the paused VM into `dir`; with `copy_scratch`
    /// the scratch disk is copied into it, otherwise it is synced where it
    /// is (a pause to disk, whose restore uses the sandbox's own disk) and
    /// the manifest still says the VM has one.
    async fn write_snapshot(
        &mut self,
        dir: PathBuf,
        kind: SnapshotKind,
        copy_scratch: bool,
    ) -> Result<Snapshot, SnapshotError> {
        if self.record.info.persisted {
            return Err(SnapshotError::Invalid {
                dir,
                reason: "the sandbox is paused to disk; resume it before taking a snapshot".into(),
            });
        }
        if self.state() != SandboxState::Paused || self.vmm.is_none() {
            return Err(SnapshotError::NotPaused(self.state()));
        }
        let Some(vm) = self.vm.as_mut() else {
            return Err(SnapshotError::NotPaused(self.state()));
        };
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| SnapshotError::Io { path, source }
        };
        tokio::fs::create_dir_all(&dir).await.map_err(io(&dir))?;
        let started = std::time::Instant::now();
        let limit = self.timeouts.snapshot;
        match bounded(limit, vm.snapshot(&dir, kind)).await {
            Ok(result) => result?,
            Err(limit) => {
                let reason = format!("the VMM did not write the snapshot within {limit:?}");
                self.fail(reason.clone()).await;
                return Err(SnapshotError::Vmm {
                    vmm: self.info().hypervisor,
                    action: "write the snapshot".into(),
                    source: reason.into(),
                });
            }
        }
        // The guest is paused, so its scratch disk matches the memory image.
        let scratch = self.dir.paths().scratch_disk();
        let has_scratch = tokio::fs::try_exists(&scratch).await.unwrap_or(false);
        if has_scratch && copy_scratch {
            let copy = dir.join(crate::snapshot::SCRATCH_FILE);
            let _ = tokio::fs::remove_file(&copy).await;
            crate::scratch::clone_disk_image(&scratch, &copy)
                .await
                .map_err(io(&copy))?;
        } else if has_scratch {
            // What the VMM wrote is in the page cache; a host that goes down
            // while the sandbox is on disk must not lose it.
            let file = tokio::fs::File::open(&scratch)
                .await
                .map_err(io(&scratch))?;
            file.sync_all().await.map_err(io(&scratch))?;
        }
        let manifest = SnapshotManifest {
            format: SNAPSHOT_FORMAT,
            vmm: self.info().hypervisor,
            vmm_version: self.vmm_version.clone(),
            kind,
            source: self.info().id.clone(),
            config: self.info().config.clone(),
            template: self.template.clone(),
            kernel_cmdline: self.vm.as_ref().map(Vm::kernel_cmdline).unwrap_or_default(),
            created_at_ms: now_ms(),
            scratch: has_scratch,
            track_dirty_pages: self.vm.as_ref().is_some_and(Vm::tracks_dirty_pages),
        };
        let snapshot = Snapshot { dir, manifest };
        crate::snapshot::write_manifest(&snapshot).await?;
        tracing::info!(
            dir = %snapshot.dir.display(),
            ?kind,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "snapshot written"
        );
        Ok(snapshot)
    }

    /// Saves the sandbox to disk and ends its VMM; see the module docs.
    /// The record says `persisted` (in `state.json`, synchronously) before
    /// the VMM is killed, so a provider that dies at any point leaves
    /// either a running VM or a complete saved state to re-attach.
    async fn pause_to_disk(&mut self) -> Result<(), SandboxError> {
        if self.record.info.persisted {
            return Ok(());
        }
        let was = self.state();
        match was {
            SandboxState::Running => self.pause().await?,
            SandboxState::Paused => {}
            from => {
                return Err(InvalidTransition {
                    from,
                    to: SandboxState::Paused,
                }
                .into());
            }
        }
        let started = std::time::Instant::now();
        let dir = self.dir.paths().dir().join(PERSISTED_DIR);
        if let Err(e) = tokio::fs::remove_dir_all(&dir).await
            && e.kind() != std::io::ErrorKind::NotFound
        {
            return Err(SandboxError::Io {
                action: "remove the earlier saved state",
                path: dir,
                source: e,
            });
        }
        let written = self
            .write_snapshot(dir.clone(), SnapshotKind::Full, false)
            .await;
        if let Err(e) = written {
            // Nothing is lost: the VM still runs (paused), as before.
            let _ = tokio::fs::remove_dir_all(&dir).await;
            if was == SandboxState::Running
                && self.state() == SandboxState::Paused
                && let Err(resume) = self.resume().await
            {
                tracing::warn!(error = %resume, "cannot resume the sandbox after a failed pause to disk");
            }
            return Err(e.into());
        }
        self.record.info.persisted = true;
        if let Err(source) = self.record_now().await {
            self.record.info.persisted = false;
            let _ = tokio::fs::remove_dir_all(&dir).await;
            return Err(SandboxError::Io {
                action: "record the pause to disk in",
                path: self.dir.paths().state_json(),
                source,
            });
        }
        // The state is on disk: the VMM and what the backend leased go.
        self.guest = None;
        if let Some(mut vmm) = self.vmm.take()
            && bounded(self.timeouts.kill, vmm.kill()).await.is_err()
        {
            tracing::warn!(pid = ?vmm.pid(), "the killed VMM was not reaped in time; tokio reaps it later");
        }
        if let Some(mut vm) = self.vm.take()
            && let Err((path, e)) = vm.release().await
        {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove what the VMM left outside the sandbox directory");
        }
        if let Some(net) = &self.network {
            net.vmm_stopped();
        }
        self.record.info.vmm_pid = None;
        self.record.vmm_start_ticks = None;
        tracing::info!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            "paused to disk; the VMM is gone"
        );
        Ok(())
    }

    /// Writes `state.json` now (atomically), for a step that must be on
    /// disk before the next one.
    /// (It borrows nothing while it waits, so the task need not be `Sync`.)
    fn record_now(&self) -> impl Future<Output = std::io::Result<()>> + Send + 'static {
        let record = self.record.clone();
        let state_json = self.dir.paths().state_json();
        async move {
            tokio::task::spawn_blocking(move || crate::dir::write_atomic(&state_json, &record))
                .await
                .map_err(std::io::Error::other)
                .and_then(|r| r)
        }
    }

    /// Restores a sandbox paused to disk in a new VMM, running; on error
    /// it stays paused on disk (its saved state and disk untouched).
    async fn restore_from_disk(&mut self) -> Result<(), SandboxError> {
        let started = std::time::Instant::now();
        let snapshot_dir = self.dir.paths().dir().join(PERSISTED_DIR);
        let restart = Restart {
            dir: &self.dir,
            record: self.record.clone(),
            network: self.network.as_ref(),
            snapshot_dir: snapshot_dir.clone(),
        };
        let restarted = (self.restarter.0)(restart)
            .await
            .map_err(|e| SandboxError::Restore(Box::new(e)))?;
        self.vm = Some(restarted.vm);
        self.vmm = restarted.vmm;
        self.guest = restarted.guest;
        self.record = restarted.record;
        self.record.info.persisted = false;
        self.record.info.failure = None;
        self.record
            .info
            .state
            .transition_to(SandboxState::Running)?;
        // The saved state is spent: the guest has moved on from it. It goes
        // only once `state.json` no longer says the sandbox is on disk, so
        // that a provider dying in between leaves a running VM to re-attach
        // rather than a record pointing at a removed state.
        if let Err(e) = self.record_now().await {
            tracing::warn!(error = %e, "cannot record the restore; keeping the saved state");
        } else if let Err(e) = tokio::fs::remove_dir_all(&snapshot_dir).await {
            tracing::warn!(dir = %snapshot_dir.display(), error = %e, "cannot remove the spent saved state");
        }
        tracing::info!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            "restored from disk"
        );
        Ok(())
    }

    /// Stops the sandbox: any state but `stopped` → `stopping` → `stopped`
    /// (or `failed` if its files cannot be removed). Graceful unless `force`
    /// or the VMM is already gone; either way the VMM is killed and reaped
    /// and the sandbox's files removed before this returns.
    async fn stop(&mut self, force: bool) -> Result<(), SandboxError> {
        let was = self.state();
        self.record
            .info
            .state
            .transition_to(SandboxState::Stopping)?;
        if !force && self.vmm.is_some() && was != SandboxState::Failed {
            let limit = self.timeouts.graceful_stop;
            if bounded(limit, self.graceful_shutdown(was)).await.is_err() {
                tracing::warn!(?limit, "the guest did not end in time; killing the VM");
            }
        }
        match self.release().await {
            Ok(()) => Ok(self
                .record
                .info
                .state
                .transition_to(SandboxState::Stopped)?),
            Err((path, source)) => {
                let _ = self.record.info.state.transition_to(SandboxState::Failed);
                self.record.info.failure = Some(format!("cannot remove {}", path.display()));
                Err(SandboxError::Io {
                    action: "remove",
                    path,
                    source,
                })
            }
        }
    }

    /// Asks the guest to end (resuming it first if it was paused) and waits
    /// for the VMM to exit; the caller bounds the whole and kills what is
    /// left.
    async fn graceful_shutdown(&mut self, was: SandboxState) {
        let started = std::time::Instant::now();
        let Some(vm) = self.vm.as_mut() else {
            return;
        };
        if was == SandboxState::Paused
            && let Err(e) = vm.resume().await
        {
            tracing::warn!(error = %e, "cannot resume the guest for a graceful stop; killing it");
            return;
        }
        let asked = match &self.guest {
            Some(guest) => guest.shutdown().await.map_err(|e| -> BoxError { e.into() }),
            None => vm.request_power_off().await,
        };
        if let Err(e) = asked {
            tracing::warn!(error = %e, "the guest refused to shut down; killing the VM");
            return;
        }
        let exit = wait_vmm(&mut self.vmm).await;
        tracing::debug!(
            %exit,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "guest ended its VM"
        );
    }

    /// Lets the VM run on without this provider: the VMM is not killed,
    /// the directory, network and backend state stay in place, and the
    /// directory's lock is let go (see the module docs).
    pub(crate) fn leave(&mut self) {
        self.guest = None;
        if let Some(mut vmm) = self.vmm.take() {
            vmm.set_kill_on_drop(false);
        }
        if let Some(vm) = self.vm.as_mut() {
            vm.leave();
        }
        if let Some(net) = self.network.take() {
            net.forget();
        }
        self.dir.leave();
        self.released = true;
    }

    /// Kills the VMM (bounded), releases what the backend made, tears the
    /// network down, removes the sandbox directory. Idempotent.
    pub(crate) async fn release(&mut self) -> Result<(), (PathBuf, std::io::Error)> {
        self.guest = None;
        if let Some(mut vmm) = self.vmm.take()
            && bounded(self.timeouts.kill, vmm.kill()).await.is_err()
        {
            tracing::warn!(pid = ?vmm.pid(), "the killed VMM was not reaped in time; tokio reaps it later");
        }
        self.record.info.vmm_pid = None;
        self.record.vmm_start_ticks = None;
        if self.released {
            return Ok(());
        }
        if let Some(vm) = self.vm.as_mut() {
            vm.release().await?;
        }
        crate::network::teardown(self.network.take()).await;
        self.dir.remove().await?;
        self.released = true;
        Ok(())
    }

    /// Forces the sandbox down after its VMM or agent failed: logs the
    /// console tail, kills and releases everything, and leaves it `failed`
    /// with `reason` until it is stopped.
    pub(crate) async fn fail(&mut self, reason: String) {
        let extra = self.vm.as_ref().map(Vm::extra_logs).unwrap_or_default();
        let extra: Vec<(&str, PathBuf)> = extra.into_iter().collect();
        let console = crate::console::tail(self.dir.paths(), &extra);
        tracing::warn!(%reason, %console, "the sandbox failed; releasing it");
        let _ = self.record.info.state.transition_to(SandboxState::Failed);
        self.record.info.failure = Some(reason);
        if let Err((path, e)) = self.release().await {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove the sandbox's files");
        }
    }
}

impl<V: Vm> Drop for SandboxTask<V> {
    /// A detached sandbox's task dropped without ending (its runtime shut
    /// down as the process exits) leaves the VM running too.
    fn drop(&mut self) {
        if self.detached && !self.released {
            self.leave();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn bounded_cuts_off_a_wait_that_never_ends() {
        let r = bounded(Duration::from_secs(10), std::future::pending::<()>()).await;
        assert_eq!(r, Err(Duration::from_secs(10)));
        assert_eq!(bounded(Duration::from_secs(1), async { 3 }).await, Ok(3));
    }
}
