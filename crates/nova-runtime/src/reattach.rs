//! Re-attaching the sandboxes a dead detached provider left running: what
//! a restarted daemon calls first ([`Provider::reattach`]).
//!
//! ```text
//! Provider::reattach()                       (a detached provider)
//!   scan $NOVA_HOME/sandboxes/*              (blocking pool)
//!     flock held?            -> a live provider's: skip
//!     state.json, detached, running|paused, VMM pid with the recorded
//!     start time still alive -> adoptable; anything else -> dead
//!   adoptable, one by one:
//!     VmmProcess::adopt_verified (pidfd, start time checked after)
//!     SandboxDir::adopt (the lock taken in the scan)
//!     network::adopt (namespace, veth, nft table, or passt: ours again)
//!     Backend::reattach (QMP / API socket reconnected, leases re-taken)
//!     agent channel + handshake (a paused VM is resumed for it, then
//!       paused again); commands left running in the guest carry on,
//!       found with Hypervisor::list_execs / attach_exec
//!     a fresh task (task::drive) in the registry, in its recorded state
//!   paused to disk (state.json: persisted): adopted without a VMM (one
//!     a restore that was cut off left running is killed); its network
//!     taken over, or made anew when it is gone (the host restarted); a
//!     task in `paused` whose resume restores the saved state
//!   dead: its VMM killed if it somehow runs, its network, what the
//!     backend made outside its directory (Backend::release_dead: a jail)
//!     and its directory removed (as leftovers are), and a `failed`
//!     tombstone with the reason
//!     kept in the registry (Hypervisor::get / list show it)
//! ```
//!
//! A sandbox whose adoption fails half way is released like a dead one
//! (its VMM killed) and reported failed with the reason.

use std::fs::File;
use std::path::PathBuf;
use std::time::Duration;

use nova_core::error::BoxError;
use nova_core::home::SandboxPaths;
use nova_core::id::SandboxId;
use nova_core::metadata::SandboxInfo;
use nova_core::state::SandboxState;
use nova_protocol::client::AgentClient;
use tracing::Instrument;

use crate::Guest;
use crate::backend::{Backend, ReattachVm, Vm};
use crate::dir::{SandboxDir, SandboxRecord, read_record, try_lock};
use crate::leftovers::{is_same_process, kill};
use crate::provider::Provider;
use crate::task::SandboxTask;
use crate::vmm::VmmProcess;

/// How long one agent handshake attempt may take before it is tried again
/// on a new connection (the guest may still hold the dead host's session).
const HANDSHAKE_ATTEMPT: Duration = Duration::from_secs(1);
/// The least time a sandbox's re-attach may take before it is given up.
const MIN_REATTACH_TIME: Duration = Duration::from_secs(10);

/// What [`Provider::reattach`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReattachReport {
    /// Sandboxes now run by this provider, in their recorded state.
    pub adopted: Vec<SandboxId>,
    /// Sandboxes that could not be taken over (their VMM died, or
    /// re-attaching failed): released, and kept as `failed` tombstones.
    pub failed: Vec<ReattachFailure>,
}

/// One sandbox [`Provider::reattach`] could not take over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReattachFailure {
    /// The sandbox.
    pub id: SandboxId,
    /// Why, in words (also its `SandboxInfo::failure`).
    pub reason: String,
}

/// [`Provider::reattach`] could not run at all.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReattachError {
    /// The provider kills its VMs when dropped; use
    /// [`Provider::detached`].
    #[error(
        "only a detached provider can re-attach sandboxes (Provider::detached); this one's VMs \
         die with it"
    )]
    NotDetached,
    /// The sandboxes directory could not be read.
    #[error("cannot read the sandboxes directory {}", .path.display())]
    Scan {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// A sandbox directory without a living owner, as the scan found it.
struct Found {
    dir: PathBuf,
    /// Its lock, held from the scan on.
    lock: File,
    record: Option<SandboxRecord>,
    /// `None`: adoptable; otherwise why it is dead.
    dead: Option<String>,
}

/// Lists the sandbox directories under `root` that no provider owns, and
/// says of each whether it can be adopted.
fn scan(root: &std::path::Path) -> Result<Vec<Found>, std::io::Error> {
    let entries = match std::fs::read_dir(root) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let dir = entry.path();
        if !dir.is_dir() {
            continue;
        }
        let lock = match try_lock(&dir) {
            Ok(Some(lock)) => lock,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot lock a sandbox directory; leaving it alone");
                continue;
            }
        };
        let record = match read_record(&dir.join("state.json")) {
            Ok(record) => record,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                found.push(Found {
                    dir,
                    lock,
                    record: None,
                    dead: Some("its provider died before its VMM started".into()),
                });
                continue;
            }
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "unreadable state.json; leaving the directory alone");
                continue;
            }
        };
        let alive = record
            .info
            .vmm_pid
            .is_some_and(|pid| is_same_process(pid, record.vmm_start_ticks));
        let state = record.info.state;
        let persisted = record.info.persisted && state == SandboxState::Paused;
        if persisted
            && alive
            && let Some(pid) = record.info.vmm_pid
            && let Err(e) = kill(pid)
        {
            tracing::warn!(pid, error = %e, "cannot kill the VMM of a restore from disk that was cut off");
        }
        let dead = if persisted {
            None
        } else if !matches!(state, SandboxState::Running | SandboxState::Paused) {
            Some(format!("its provider died while it was {state}"))
        } else if !alive {
            Some(match record.info.vmm_pid {
                Some(pid) => format!("its VMM (pid {pid}) exited while no provider owned it"),
                None => "no VMM was recorded for it".to_owned(),
            })
        } else if !record.detached {
            Some(
                "its provider was not detached, so its VMM's output went through the dead \
                 provider; it cannot be re-attached"
                    .into(),
            )
        } else {
            None
        };
        if dead.is_some()
            && !persisted
            && alive
            && let Some(pid) = record.info.vmm_pid
            && let Err(e) = kill(pid)
        {
            tracing::warn!(pid, error = %e, "cannot kill the VMM of a sandbox that cannot be re-attached");
        }
        found.push(Found {
            dir,
            lock,
            record: Some(record),
            dead,
        });
    }
    Ok(found)
}

impl<B: Backend> Provider<B> {
    /// Takes over every sandbox a dead detached provider left under this
    /// `$NOVA_HOME`: the live ones run on under this provider (in the state
    /// they were in, commands in their guests still running), the dead
    /// ones (their VMM exited, or taking one over failed) are released and
    /// kept as `failed` tombstones with the reason, visible through
    /// `Hypervisor::get` / `list`. See the module docs. Directories another
    /// living provider owns are not touched.
    ///
    /// Call it once, before creating sandboxes.
    pub async fn reattach(&self) -> Result<ReattachReport, ReattachError> {
        if !self.inner.detached {
            return Err(ReattachError::NotDetached);
        }
        let root = self.inner.backend.home().sandboxes_dir();
        let scanned = {
            let scanned = root.clone();
            tokio::task::spawn_blocking(move || scan(&scanned))
                .await
                .map_err(|e| ReattachError::Scan {
                    path: root.clone(),
                    source: std::io::Error::other(e),
                })?
                .map_err(|source| ReattachError::Scan {
                    path: root.clone(),
                    source,
                })?
        };
        let mut report = ReattachReport::default();
        let mut abandoned_networks = Vec::new();
        for found in scanned {
            let Found {
                dir,
                lock,
                record,
                dead,
            } = found;
            let Some(record) = record else {
                self.inner.backend.release_dead(&dir).await;
                remove_dead(&dir, lock).await;
                continue;
            };
            let id = record.info.id.clone();
            let reason = match dead {
                Some(reason) => {
                    if record.network.is_some() {
                        abandoned_networks.push(id.to_string());
                    }
                    self.inner.backend.release_dead(&dir).await;
                    remove_dead(&dir, lock).await;
                    reason
                }
                None => {
                    let paths = self.inner.backend.home().sandbox(&id);
                    let adopted = if record.info.persisted {
                        self.adopt_persisted(paths, lock, record.clone()).await
                    } else {
                        self.adopt(paths, lock, record.clone()).await
                    };
                    match adopted {
                        Ok(()) => {
                            tracing::info!(sandbox = %id, persisted = record.info.persisted, "re-attached a sandbox");
                            report.adopted.push(id);
                            continue;
                        }
                        Err(reason) => reason,
                    }
                }
            };
            tracing::warn!(sandbox = %id, %reason, "a sandbox left by a dead provider failed");
            let mut info = record.info;
            info.state = SandboxState::Failed;
            info.failure = Some(reason.clone());
            info.vmm_pid = None;
            self.inner.sandboxes.retire(&id, info);
            report.failed.push(ReattachFailure { id, reason });
        }
        crate::network::clean_abandoned(abandoned_networks).await;
        Ok(report)
    }

    /// Adopts one live sandbox; on error everything of it is released and
    /// the reason returned.
    async fn adopt(
        &self,
        paths: SandboxPaths,
        lock: File,
        mut record: SandboxRecord,
    ) -> Result<(), String> {
        let backend = &self.inner.backend;
        let id = record.info.id.clone();
        let span = tracing::info_span!("sandbox", id = %id, vmm = %backend.kind());
        let (Some(pid), Some(ticks)) = (record.info.vmm_pid, record.vmm_start_ticks) else {
            return Err("no VMM was recorded for it".into());
        };
        // Dropping any of these on an error below kills the VMM, removes
        // the directory, tears the network down.
        let dir = SandboxDir::adopt(paths.clone(), lock);
        let mut vmm = VmmProcess::adopt_verified(pid, ticks)
            .map_err(|e| format!("its VMM (pid {pid}) cannot be adopted: {e}"))?;
        let network = match (record.network, record.info.config.enable_network) {
            (Some(net), true) => Some(
                crate::network::adopt(
                    &id,
                    &record.info.config,
                    &self.inner.pool,
                    &net,
                    paths.dir(),
                )
                .map_err(|e| format!("its network cannot be taken over: {e}"))?,
            ),
            _ => None,
        };
        let limit = self.inner.timeouts.vmm.max(MIN_REATTACH_TIME);
        let deadline = tokio::time::Instant::now() + limit;
        let recorded = record.info.clone();
        let reattach = ReattachVm {
            info: &recorded,
            paths: &paths,
            vmm_pid: pid,
            network: network.as_ref(),
            deadline,
        };
        let attached = async {
            let mut vm = tokio::time::timeout_at(deadline, backend.reattach(reattach))
                .await
                .map_err(|_| format!("the VMM's control channel did not answer within {limit:?}"))?
                .map_err(|e| format!("the VMM's control channel cannot be reconnected: {e}"))?;
            let guest = if backend.waits_for_agent() {
                let paused = record.info.state == SandboxState::Paused;
                if paused {
                    vm.resume()
                        .await
                        .map_err(|e| format!("cannot resume it to reach its agent: {e}"))?;
                }
                let answered = handshake(&vm, deadline).await;
                if paused && let Err(e) = vm.pause().await {
                    return Err(format!("cannot pause it again: {e}"));
                }
                let (client, hello) =
                    answered.map_err(|e| format!("its agent did not answer: {e}"))?;
                record.info.agent_version = Some(hello.agent_version);
                record.info.kernel_release = Some(hello.kernel_release);
                // The template as installed now; none if it is gone.
                let defaults = self
                    .inner
                    .templates
                    .load(&record.info.config.template_id)
                    .map(|t| t.manifest.exec_defaults)
                    .unwrap_or_default();
                Some(
                    Guest::new(client, record.info.config.env.clone())
                        .with_exec_defaults(&defaults),
                )
            } else {
                None
            };
            Ok::<_, String>((vm, guest))
        }
        .instrument(span.clone())
        .await;
        let (vm, guest) = match attached {
            Ok(attached) => attached,
            Err(reason) => {
                let _ = tokio::time::timeout(self.inner.timeouts.kill, vmm.kill()).await;
                crate::network::teardown(network).await;
                backend.release_dead(paths.dir()).await;
                let mut dir = dir;
                if let Err((path, e)) = dir.remove().await {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remove a failed sandbox's files");
                }
                return Err(reason);
            }
        };
        vmm.set_kill_on_drop(false);
        record.info.failure = None;
        dir.persist_in_background(&record).await;
        let info: SandboxInfo = record.info.clone();
        let task = SandboxTask {
            vm: Some(vm),
            vmm: Some(vmm),
            dir,
            record,
            guest: guest.clone(),
            timeouts: self.inner.timeouts,
            vmm_version: backend.vmm_version(),
            template: None,
            network,
            released: false,
            detached: true,
            restarter: self.restarter(),
        };
        self.spawn_task(id, task, info, guest, span);
        Ok(())
    }
}

impl<B: Backend> Provider<B> {
    /// Adopts one sandbox paused to disk: its directory, its saved state
    /// (checked readable), its network (taken over, or made anew where the
    /// host lost it); on error its files are removed and the reason
    /// returned.
    async fn adopt_persisted(
        &self,
        paths: SandboxPaths,
        lock: File,
        mut record: SandboxRecord,
    ) -> Result<(), String> {
        let backend = &self.inner.backend;
        let id = record.info.id.clone();
        let span = tracing::info_span!("sandbox", id = %id, vmm = %backend.kind());
        // Dropping it on an error below removes the directory.
        let mut dir = SandboxDir::adopt(paths.clone(), lock);
        let saved = paths.dir().join(crate::task::PERSISTED_DIR);
        let snapshot = match crate::snapshot::read(&saved).await {
            Ok(snapshot) => snapshot,
            Err(e) => {
                let _ = dir.remove().await;
                return Err(format!("its state saved to disk cannot be read: {e}"));
            }
        };
        record.info.vmm_pid = None;
        record.vmm_start_ticks = None;
        let network = if record.info.config.enable_network {
            let taken = match record.network {
                // Not a user-mode one: its passt went with the VMM.
                Some(net) if !net.user => crate::network::adopt(
                    &id,
                    &record.info.config,
                    &self.inner.pool,
                    &net,
                    paths.dir(),
                ),
                Some(_) => Err("a user-mode network is started with its VMM".to_owned()),
                None => Err("none was recorded".to_owned()),
            };
            match taken {
                Ok(net) => Some(net),
                Err(why) => {
                    // The host restarted (or someone removed it): what is
                    // left goes, and the sandbox gets a new one (every
                    // guest has the same address, so the guest sees no
                    // change).
                    tracing::info!(parent: &span, reason = %why, "making the network of a sandbox on disk anew");
                    crate::network::clean_abandoned(vec![id.to_string()]).await;
                    let choice = match self.net_choice(paths.dir()) {
                        Ok(choice) => choice,
                        Err(e) => {
                            let _ = dir.remove().await;
                            return Err(format!("its network cannot be made again: {e}"));
                        }
                    };
                    match crate::network::create(
                        &id,
                        &record.info.config,
                        &self.inner.pool,
                        backend.network_mode(),
                        choice,
                    )
                    .instrument(span.clone())
                    .await
                    {
                        Ok(net) => net,
                        Err(e) => {
                            let _ = dir.remove().await;
                            return Err(format!("its network cannot be made again: {e}"));
                        }
                    }
                }
            }
        } else {
            None
        };
        record.network = network.as_ref().map(crate::network::SandboxNet::record);
        record.detached = true;
        record.info.failure = None;
        dir.persist_in_background(&record).await;
        let info = record.info.clone();
        let task = SandboxTask {
            vm: None,
            vmm: None,
            dir,
            record,
            guest: None,
            timeouts: self.inner.timeouts,
            vmm_version: backend.vmm_version(),
            template: snapshot.manifest.template,
            network,
            released: false,
            detached: true,
            restarter: self.restarter(),
        };
        self.spawn_task(id, task, info, None, span);
        Ok(())
    }
}

/// Opens the agent channel of `vm` and shakes hands, trying again on a new
/// connection when an attempt gets no answer (the guest may not have seen
/// the dead host's connection end yet), until `deadline`.
async fn handshake<V: Vm>(
    vm: &V,
    deadline: tokio::time::Instant,
) -> Result<(AgentClient, nova_protocol::HelloInfo), BoxError> {
    let connector = vm.agent_connector();
    loop {
        let stream =
            crate::retry::retry_until(deadline, &connector, |e: &crate::backend::ConnectError| {
                e.transient
            })
            .await
            .map_err(|e| -> BoxError {
                match e {
                    crate::retry::RetryError::Failed(e) => e.source,
                    crate::retry::RetryError::TimedOut(_) => {
                        "the agent channel did not open".into()
                    }
                }
            })?;
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        if remaining.is_zero() {
            return Err("no time left for the handshake".into());
        }
        match AgentClient::connect(stream, remaining.min(HANDSHAKE_ATTEMPT)).await {
            Ok(pair) => return Ok(pair),
            // No answer in time, or the agent closed the stream (it ends a
            // session whose output for the dead host was on its way out):
            // a new connection starts afresh.
            Err(e) if remaining > HANDSHAKE_ATTEMPT => {
                tracing::debug!(error = %e, "the agent did not answer; trying a new connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Removes a dead sandbox's directory, holding its lock until it is gone.
async fn remove_dead(dir: &std::path::Path, lock: File) {
    if let Some(pid) = nova_net::passt::kill_leftover(dir) {
        tracing::info!(pid, dir = %dir.display(), "killed a dead sandbox's passt");
    }
    match tokio::fs::remove_dir_all(dir).await {
        Ok(()) => tracing::info!(dir = %dir.display(), "removed a dead sandbox"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot remove a dead sandbox's files")
        }
    }
    drop(lock);
}
