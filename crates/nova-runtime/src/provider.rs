//! [`Provider`]: the [`Hypervisor`] trait, implemented once for every
//! backend.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use nova_core::config::{SandboxConfig, StartMode};
use nova_core::error::{
    CreateSandboxError, ExecError, FileError, SandboxError, UpdateNetworkError,
};
use nova_core::exec::{DEFAULT_MAX_OUTPUT, ExecInfo, ExecOutput, ExecRequest, ExecStream};
use nova_core::fs::{DirListing, FileDownload, FileStat};
use nova_core::hypervisor::{Hypervisor, HypervisorKind};
use nova_core::id::SandboxId;
use nova_core::metadata::{BootTimings, SandboxInfo, now_ms};
use nova_core::network::EgressConfig;
use nova_core::sandbox::Sandbox;
use nova_core::snapshot::{Snapshot, SnapshotError, SnapshotKind, TemplateIdentity};
use nova_core::state::SandboxState;
use nova_core::stats::SandboxStats;
use nova_core::template::{Template, TemplateManager};
use nova_protocol::client::{AgentClient, ClientError};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::Instrument;

use crate::Guest;
use crate::action::{SandboxAction, VmOperation};
use crate::backend::{Backend, BootSource, ConnectError, GuestImage, Launch, Vm, VmStart};
use crate::dir::{SandboxDir, SandboxRecord};
use crate::registry::{Entry, SandboxRegistry};
use crate::retry::{RetryError, retry_until};
use crate::scratch::ScratchCache;
use crate::task::{SandboxTask, Timeouts};

/// How long one handshake with a restored guest's agent may take before it
/// is tried again on a new connection.
const RESTORED_HANDSHAKE_ATTEMPT: Duration = Duration::from_secs(1);

/// How long a command whose agent connection broke waits for its sandbox's
/// task to say whether the VM exited (see [`Provider::agent_lost`]).
const VM_EXIT_GRACE: Duration = Duration::from_secs(3);

/// How long past a command's own timeout `execute_command` waits for the
/// guest to end it.
const GUEST_TIMEOUT_GRACE: Duration = Duration::from_secs(20);

/// How many actions may wait for one sandbox's task.
const ACTION_QUEUE: usize = 8;

/// Runs sandboxes on backend `B`. Cheap to clone; clones share the same
/// sandboxes. Dropping the last clone kills every VM it still runs and
/// removes their directories, unless the provider is
/// [detached](Provider::detached): then its VMs outlive it (and its
/// process), for a later detached provider to
/// [re-attach](Provider::reattach).
#[derive(Debug)]
pub struct Provider<B: Backend> {
    pub(crate) inner: Arc<Inner<B>>,
}

impl<B: Backend> Clone for Provider<B> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

#[derive(Debug)]
pub(crate) struct Inner<B: Backend> {
    pub(crate) backend: B,
    pub(crate) templates: TemplateManager,
    pub(crate) timeouts: Timeouts,
    scratch: ScratchCache,
    pub(crate) sandboxes: Arc<SandboxRegistry<B::Vm>>,
    /// The host ends of the sandboxes' veths.
    pub(crate) pool: nova_net::AddressPool,
    /// Which host network sandboxes get ([`crate::network::NET_MODE_VAR`]
    /// when the provider was made, or [`Provider::set_net_mode`]); an
    /// invalid variable is refused at create.
    net_mode: std::sync::RwLock<Result<crate::network::NetModeChoice, String>>,
    /// Whether the VMs outlive the provider (see [`Provider::detached`]).
    pub(crate) detached: bool,
    /// Ids of the sandboxes a dead provider left under this `$NOVA_HOME`,
    /// whose networks the first create removes (it is async, `new` is not).
    abandoned: std::sync::Mutex<Vec<String>>,
    /// Set once those networks are gone.
    abandoned_cleaned: tokio::sync::OnceCell<()>,
}

impl<B: Backend> Provider<B> {
    /// A provider with these options. Sandboxes that a dead provider left
    /// under the same `$NOVA_HOME` are cleaned first (see
    /// [`crate::leftovers`]; this reads the sandboxes directory, blocking).
    pub fn new(options: B::Options) -> Self {
        Self::with_timeouts(options, Timeouts::default())
    }

    /// [`new`](Self::new) with other bounds on the sandboxes' waits.
    pub fn with_timeouts(options: B::Options, timeouts: Timeouts) -> Self {
        Self::build(options, timeouts, false)
    }

    /// A provider whose VMs outlive it: a daemon that may be restarted (or
    /// killed) without its sandboxes going down. Its VMMs write their
    /// output to their files themselves (uncapped: see [`crate::vmm`]);
    /// dropping the provider, or its process dying, leaves them running,
    /// with their directories and networks. Nothing is cleaned when it is
    /// made: call [`reattach`](Self::reattach) first, which takes over the
    /// sandboxes a dead detached provider left and cleans the rest.
    pub fn detached(options: B::Options) -> Self {
        Self::detached_with_timeouts(options, Timeouts::default())
    }

    /// [`detached`](Self::detached) with other bounds on the sandboxes'
    /// waits.
    pub fn detached_with_timeouts(options: B::Options, timeouts: Timeouts) -> Self {
        Self::build(options, timeouts, true)
    }

    /// Whether this provider's VMs outlive it.
    pub fn is_detached(&self) -> bool {
        self.inner.detached
    }

    fn build(options: B::Options, timeouts: Timeouts, detached: bool) -> Self {
        let backend = B::from_options(options);
        // A detached provider cleans in `reattach`; one that is not leaves
        // a detached provider's running VMs to a daemon that re-attaches.
        let cleaned = if detached {
            crate::leftovers::Cleaned::default()
        } else {
            crate::leftovers::clean_leftovers_sparing(&backend.home().sandboxes_dir(), true)
        };
        let abandoned = cleaned
            .removed
            .iter()
            .filter_map(|dir| dir.file_name())
            .map(|name| name.to_string_lossy().into_owned())
            .collect();
        let templates = TemplateManager::new(backend.home().templates_dir());
        let scratch = ScratchCache::in_home(backend.home());
        // Make the empty scratch image now, off the first create's path,
        // when there is a runtime to do it on.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (cache, size) = (scratch.clone(), backend.scratch_size_mb());
            runtime.spawn(async move {
                if let Err(e) = cache.base(size).await {
                    tracing::warn!(error = %e, "cannot make the empty scratch image yet");
                }
            });
        }
        Self {
            inner: Arc::new(Inner {
                backend,
                templates,
                timeouts,
                scratch,
                sandboxes: Arc::new(SandboxRegistry::default()),
                pool: nova_net::AddressPool::default(),
                net_mode: std::sync::RwLock::new(crate::network::NetModeChoice::from_env()),
                detached,
                abandoned: std::sync::Mutex::new(abandoned),
                abandoned_cleaned: tokio::sync::OnceCell::new(),
            }),
        }
    }

    /// Sets which host network the sandboxes created from now on get
    /// (by default the one [`crate::network::NET_MODE_VAR`] names, else
    /// [`NetModeChoice::Auto`](crate::network::NetModeChoice::Auto)).
    pub fn set_net_mode(&self, choice: crate::network::NetModeChoice) {
        *self
            .inner
            .net_mode
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Ok(choice);
    }

    /// How [`crate::network::create`] picks the host network of a sandbox
    /// whose directory is `dir`.
    pub(crate) fn net_choice<'a>(
        &self,
        dir: &'a Path,
    ) -> Result<crate::network::NetChoice<'a>, CreateSandboxError> {
        let choice = self
            .inner
            .net_mode
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .map_err(|reason| CreateSandboxError::Unsupported { reason })?;
        Ok(crate::network::NetChoice {
            choice,
            user_ok: self.inner.backend.user_network(),
            dir,
        })
    }

    /// The backend's options.
    pub fn options(&self) -> &B::Options {
        self.inner.backend.options()
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.inner.backend
    }

    /// Runs a backend-specific operation on the VM of sandbox `id`, in its
    /// task (see [`SandboxAction::WithVm`]), bounded like every VMM request.
    pub async fn with_vm<T: Send + 'static>(
        &self,
        id: &SandboxId,
        op: impl for<'a> FnOnce(
            &'a mut B::Vm,
            &'a SandboxInfo,
        ) -> std::pin::Pin<
            Box<dyn Future<Output = Result<T, SandboxError>> + Send + 'a>,
        > + Send
        + 'static,
    ) -> Result<T, SandboxError> {
        self.inner
            .sandboxes
            .ask(id, SandboxState::Running, move |reply| {
                let op: VmOperation<B::Vm> = Box::new(move |vm, info| {
                    Box::pin(async move {
                        let result = match vm {
                            Ok(vm) => op(vm, info).await,
                            Err(e) => Err(e),
                        };
                        let _ = reply.send(result);
                    })
                });
                SandboxAction::WithVm(op)
            })
            .await
    }

    /// Restores the snapshot in `dir` into a new sandbox; `keep_ports`
    /// false drops the published port of its config (a fork's children:
    /// the parent keeps it).
    async fn restore(&self, dir: &Path, keep_ports: bool) -> Result<Sandbox, CreateSandboxError> {
        self.check_snapshot_support()?;
        let backend = &self.inner.backend;
        let snapshot = crate::snapshot::read(dir).await?;
        self.check_restorable(&snapshot).await?;
        backend.check_host()?;
        if snapshot.manifest.vmm_version != backend.vmm_version() {
            tracing::warn!(
                snapshot = %snapshot.manifest.vmm_version,
                vmm = %backend.vmm_version(),
                "the snapshot was written by another version of the VMM; loading may fail"
            );
        }
        let mut config = snapshot.manifest.config.clone();
        if !keep_ports {
            config.host_port = None;
            config.ports.clear();
        }
        // A snapshot's VM is restored with its devices: a network device only
        // if it had one (snapshots from before networking have none).
        if config.enable_network
            && !crate::network::snapshot_has_network(&snapshot.manifest.kernel_cmdline)
        {
            tracing::warn!(dir = %dir.display(), "the snapshot's VM had no network device; the restored sandbox has no network");
            config.enable_network = false;
            config.host_port = None;
            config.ports.clear();
            config.egress = None;
        }
        let identity = snapshot.manifest.template.clone();
        let template = self.inner.templates.load(&config.template_id)?;
        let image = guest_image(&template, &config);
        self.launch(
            config,
            image,
            BootSource::Restore(Box::new(snapshot)),
            identity,
            template.manifest.exec_defaults,
        )
        .await
    }

    /// [`crate::snapshot::check_restorable`] for this provider, on the
    /// blocking pool (it reads the template's files).
    async fn check_restorable(&self, snapshot: &Snapshot) -> Result<(), SnapshotError> {
        let (checked, kind, templates) = (
            snapshot.clone(),
            self.inner.backend.kind(),
            self.inner.templates.clone(),
        );
        tokio::task::spawn_blocking(move || {
            crate::snapshot::check_restorable(&checked, kind, &templates)
        })
        .await
        .map_err(|e| SnapshotError::Io {
            path: snapshot.dir.clone(),
            source: std::io::Error::other(e),
        })?
    }

    /// Refuses snapshots on a backend that cannot take or load them.
    fn check_snapshot_support(&self) -> Result<(), SnapshotError> {
        let backend = &self.inner.backend;
        backend
            .snapshot_support()
            .map_err(|reason| SnapshotError::Unsupported {
                vmm: backend.kind(),
                reason,
            })
    }

    /// Writes a snapshot of the paused sandbox `id` into `dir` (created if
    /// needed): full, or a diff merged into the full snapshot already there
    /// (where the backend tracks dirty pages). The sandbox stays paused.
    pub async fn snapshot_sandbox_with(
        &self,
        id: &SandboxId,
        dir: &Path,
        kind: SnapshotKind,
    ) -> Result<Snapshot, SnapshotError> {
        self.check_snapshot_support()?;
        let entry = self
            .inner
            .sandboxes
            .entry(id, SandboxState::Paused)
            .map_err(|e| match e {
                SandboxError::State(t) => SnapshotError::NotPaused(t.from),
                _ => SnapshotError::NotFound(id.clone()),
            })?;
        let dir = std::path::absolute(dir).map_err(|source| SnapshotError::Io {
            path: dir.to_owned(),
            source,
        })?;
        let (reply, rx) = oneshot::channel();
        let state = entry.info.borrow().state;
        entry
            .commands
            .send(SandboxAction::Snapshot { dir, kind, reply })
            .await
            .map_err(|_| SnapshotError::NotPaused(state))?;
        rx.await
            .unwrap_or(Err(SnapshotError::NotPaused(SandboxState::Stopped)))
    }

    /// The template's snapshot, when `config` asks for one (or leaves it to
    /// us) and it fits; `None` to boot the kernel. With
    /// [`StartMode::Snapshot`] an unusable snapshot is an error that says
    /// why; with [`StartMode::Auto`] it is logged and the kernel booted.
    async fn template_snapshot(
        &self,
        template: &Template,
        config: &SandboxConfig,
    ) -> Result<Option<Snapshot>, CreateSandboxError> {
        let mode = config.start;
        if mode == StartMode::Cold {
            return Ok(None);
        }
        let dir = template.snapshot_dir();
        let usable = async {
            self.check_snapshot_support()?;
            let snapshot = crate::snapshot::read(&dir).await?;
            self.check_restorable(&snapshot).await?;
            crate::snapshot::fits(&snapshot, config)?;
            Ok::<_, SnapshotError>(snapshot)
        };
        match (usable.await, mode) {
            (Ok(snapshot), _) => Ok(Some(snapshot)),
            (Err(e), StartMode::Snapshot) => Err(e.into()),
            (Err(e), _) => {
                tracing::debug!(template = template.id(), reason = %e, "booting the kernel, not the template's snapshot");
                Ok(None)
            }
        }
    }

    /// Lays out, boots and registers one sandbox; see the crate docs.
    async fn launch(
        &self,
        config: SandboxConfig,
        image: GuestImage,
        source: BootSource,
        template: Option<TemplateIdentity>,
        exec_defaults: nova_core::template::ExecDefaults,
    ) -> Result<Sandbox, CreateSandboxError> {
        let backend = &self.inner.backend;
        let kind = backend.kind();
        let id = SandboxId::random();
        let span = tracing::info_span!("sandbox", id = %id, vmm = %kind);
        let prepare_start = Instant::now();
        let paths = backend.home().sandbox(&id);
        let dir = {
            let owned = paths.clone();
            tokio::task::spawn_blocking(move || SandboxDir::create(owned))
                .await
                .map_err(|e| CreateSandboxError::Prepare {
                    path: paths.dir().to_owned(),
                    source: std::io::Error::other(e),
                })?
                .map_err(|(path, source)| CreateSandboxError::Prepare { path, source })?
        };
        let scratch = match &source {
            BootSource::Cold if config.read_only_rootfs => None,
            BootSource::Cold => {
                self.inner
                    .scratch
                    .create_disk(&paths.scratch_disk(), backend.scratch_size_mb())
                    .await?;
                Some(paths.scratch_disk())
            }
            BootSource::Restore(snapshot) if snapshot.manifest.scratch => {
                let from = snapshot.dir.join(crate::snapshot::SCRATCH_FILE);
                crate::scratch::clone_disk_image(&from, &paths.scratch_disk())
                    .await
                    .map_err(|source| CreateSandboxError::Prepare {
                        path: paths.scratch_disk(),
                        source,
                    })?;
                Some(paths.scratch_disk())
            }
            BootSource::Restore(_) => None,
        };
        // What a dead provider's sandboxes left of their networks goes
        // first: a published port of theirs would catch this one's traffic.
        self.inner
            .abandoned_cleaned
            .get_or_init(|| {
                let ids = std::mem::take(
                    &mut *self
                        .inner
                        .abandoned
                        .lock()
                        .unwrap_or_else(|p| p.into_inner()),
                );
                crate::network::clean_abandoned(ids)
            })
            .await;
        // The network, when asked for, before the VMM: it needs the tap.
        let network = crate::network::create(
            &id,
            &config,
            &self.inner.pool,
            backend.network_mode(),
            self.net_choice(paths.dir())?,
        )
        .instrument(span.clone())
        .await?;
        let record = SandboxRecord {
            info: SandboxInfo {
                id: id.clone(),
                hypervisor: kind,
                state: SandboxState::Creating,
                created_at_ms: now_ms(),
                boot: None,
                vmm_pid: None,
                dir: paths.dir().to_owned(),
                agent_version: None,
                kernel_release: None,
                failure: None,
                persisted: false,
                config: config.clone(),
            },
            vmm_start_ticks: None,
            detached: false,
            network: network.as_ref().map(crate::network::SandboxNet::record),
        };
        let prepare = prepare_start.elapsed();
        let booted = self
            .boot(
                &dir,
                record,
                &image,
                &source,
                scratch.as_deref(),
                network.as_ref(),
                &span,
            )
            .await;
        let Booted {
            vm,
            guest,
            mut record,
            vmm,
            spawned_at,
            vmm_ready_at,
            started_at,
        } = match booted {
            Ok(booted) => booted,
            Err(e) => {
                abandon(dir, network).await;
                return Err(e);
            }
        };
        let mut guest_kernel_ms = None;
        let restored = matches!(source, BootSource::Restore(_));
        let guest = guest.map(|(client, hello)| {
            // A restored guest reports its original boot, not this start.
            if !restored {
                guest_kernel_ms = Some(hello.agent_started_us as f64 / 1000.0);
            }
            record.info.agent_version = Some(hello.agent_version.clone());
            record.info.kernel_release = Some(hello.kernel_release.clone());
            Guest::new(client, record.info.config.env.clone()).with_exec_defaults(&exec_defaults)
        });
        // A cold guest read the hardware clock to whole seconds, and a
        // restored one kept the time of its snapshot: set it from the host's.
        // A restored guest is first made a machine of its own (hostname,
        // machine-id, random pool, clock): two restores of one snapshot must
        // not share them. A refresh that fails fails the create.
        if let Some(guest) = &guest {
            let limit = self.inner.timeouts.agent;
            if restored {
                // The servers a cold boot would get now, not the snapshot's.
                let dns = network.as_ref().map(|net| net.guest_net().dns);
                let refreshed =
                    tokio::time::timeout(limit, guest.refresh(id.as_str(), dns.as_deref())).await;
                let failure: Option<nova_core::error::BoxError> = match refreshed {
                    Ok(Ok(_)) => None,
                    Ok(Err(e)) => Some(Box::new(e)),
                    Err(_) => Some(format!("no answer within {limit:?}").into()),
                };
                if let Some(source) = failure {
                    drop(vmm);
                    abandon(dir, network).await;
                    return Err(CreateSandboxError::Agent(source));
                }
            } else if tokio::time::timeout(limit, guest.sync_clock())
                .await
                .is_err()
            {
                tracing::warn!(?limit, "the agent did not set the guest clock in time");
            }
        }
        // Ready counts from here: the clock is right when the caller gets
        // the sandbox.
        let now = Instant::now();
        let spawned = spawned_at.unwrap_or(now);
        let vmm_ready = vmm_ready_at.unwrap_or(spawned);
        let started = started_at.unwrap_or(vmm_ready);
        // Without an agent the sandbox is ready once the guest started.
        let ready = if guest.is_some() { now } else { started };
        record.info.boot = Some(BootTimings {
            boot_time_ms: BootTimings::ms(ready - spawned),
            prepare_ms: BootTimings::ms(prepare),
            spawn_ms: BootTimings::ms(vmm_ready - spawned),
            configure_ms: BootTimings::ms(started - vmm_ready),
            guest_ms: BootTimings::ms(ready - started),
            guest_kernel_ms,
            from_snapshot: restored,
        });
        record
            .info
            .state
            .transition_to(SandboxState::Running)
            .map_err(|e| CreateSandboxError::Agent(e.into()))?;
        dir.persist_in_background(&record).await;
        let info = record.info.clone();
        tracing::info!(
            parent: &span,
            boot_ms = info.boot_time_ms(),
            from_snapshot = restored,
            "sandbox ready"
        );
        let mut vmm = vmm;
        if self.inner.detached
            && let Some(vmm) = vmm.as_mut()
        {
            vmm.set_kill_on_drop(false);
        }
        let task = SandboxTask {
            vm: Some(vm),
            vmm,
            dir,
            record,
            guest: guest.clone(),
            timeouts: self.inner.timeouts,
            vmm_version: backend.vmm_version(),
            template,
            network,
            released: false,
            detached: self.inner.detached,
            restarter: self.restarter(),
        };
        self.spawn_task(id, task, info.clone(), guest, span);
        Ok(Sandbox::new(Arc::new(self.clone()), info))
    }

    /// Starts the VMM of sandbox `record` (in `dir`, with `network`) from
    /// `source` and waits for its agent's handshake, within the config's
    /// boot timeout; used by a create and by a resume from disk. On error
    /// the VMM is killed; the directory and network are the caller's.
    #[allow(
        clippy::too_many_arguments,
        reason = "one boot's inputs, each borrowed"
    )]
    async fn boot(
        &self,
        dir: &SandboxDir,
        record: SandboxRecord,
        image: &GuestImage,
        source: &BootSource,
        scratch: Option<&Path>,
        network: Option<&crate::network::SandboxNet>,
        span: &tracing::Span,
    ) -> Result<Booted<B::Vm>, CreateSandboxError> {
        let backend = &self.inner.backend;
        let timeout = Duration::from_millis(record.info.config.boot_timeout_ms);
        let mut launch = Launch {
            dir,
            record,
            vmm: None,
            timeout,
            // The boot deadline runs from here; the boot clock from the spawn.
            deadline: tokio::time::Instant::now() + timeout,
            spawned_at: None,
            vmm_ready_at: None,
            started_at: None,
            extra_logs: Vec::new(),
            mode: if self.inner.detached {
                crate::vmm::SpawnMode::Detached
            } else {
                crate::vmm::SpawnMode::Owned
            },
        };
        let creating = launch.record.info.clone();
        let paths = dir.paths().clone();
        let start = VmStart {
            info: &creating,
            paths: &paths,
            image,
            source,
            scratch,
            network,
        };
        let booted = async {
            let vm = backend.start(start, &mut launch).await?;
            launch.guest_started();
            let guest = if backend.waits_for_agent() {
                let connector = vm.agent_connector();
                let deadline = launch.deadline();
                // A restored guest's agent may still be in the session of the
                // host that took the snapshot, or blocked writing to it; a
                // handshake that gets no answer soon is tried again on a new
                // connection (whose `Hello` starts a new session). A cold
                // guest's agent answers once it is up: one attempt, up to the
                // deadline.
                let restored = matches!(source, BootSource::Restore(_));
                let mut attempt = 0u32;
                loop {
                    attempt += 1;
                    let stream = launch
                        .step("open the agent channel", async {
                            retry_until(deadline, &connector, |e: &ConnectError| e.transient)
                                .await
                                .map_err(|e| match e {
                                    RetryError::Failed(e) => e.source,
                                    RetryError::TimedOut(last) => last.map_or_else(
                                        || "the agent channel did not open in time".into(),
                                        |e| e.source,
                                    ),
                                })
                        })
                        .await?;
                    let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
                    let limit = if restored {
                        remaining.min(RESTORED_HANDSHAKE_ATTEMPT)
                    } else {
                        remaining
                    };
                    // An unanswered attempt of a restored guest is not a
                    // failure of the boot: it ends the step with `None`, so
                    // no time goes to checking whether the VMM exited.
                    let answered = launch
                        .step("answer the agent handshake", async {
                            match AgentClient::connect(stream, limit).await {
                                Ok(pair) => Ok(Some(pair)),
                                Err(ClientError::TimedOut(_)) if restored && limit < remaining => {
                                    Ok(None)
                                }
                                Err(e) => Err(e),
                            }
                        })
                        .await
                        .map_err(|e| match e {
                            CreateSandboxError::Vmm { source, .. } => {
                                CreateSandboxError::Agent(source)
                            }
                            other => other,
                        })?;
                    match answered {
                        Some(pair) => break Some(pair),
                        None => tracing::debug!(
                            attempt,
                            "the restored agent did not answer; trying a new connection"
                        ),
                    }
                }
            } else {
                None
            };
            Ok::<_, CreateSandboxError>((vm, guest))
        }
        .instrument(span.clone())
        .await;
        // On error `launch` kills the VMM when dropped.
        let (vm, guest) = booted?;
        let Launch {
            record,
            vmm,
            spawned_at,
            vmm_ready_at,
            started_at,
            ..
        } = launch;
        Ok(Booted {
            vm,
            guest,
            record,
            vmm,
            spawned_at,
            vmm_ready_at,
            started_at,
        })
    }

    /// What a sandbox's task calls to restore it after a pause to disk:
    /// [`Provider::restart`] on this provider, held weakly.
    pub(crate) fn restarter(&self) -> crate::task::Restarter<B::Vm> {
        let provider = Arc::downgrade(&self.inner);
        crate::task::Restarter(Arc::new(move |restart| {
            let provider = provider.clone();
            Box::pin(async move {
                let inner = provider
                    .upgrade()
                    .ok_or_else(|| CreateSandboxError::Unsupported {
                        reason: "the provider is shutting down".into(),
                    })?;
                Provider { inner }.restart(restart).await
            })
        }))
    }

    /// Boots a new VMM for a sandbox paused to disk, from the saved state in
    /// `restart.snapshot_dir`, on its own directory, disk and network; the
    /// guest's clock is then set from the host's. The saved state must have
    /// been made by this VMM for the template as it is now.
    async fn restart(
        &self,
        restart: crate::task::Restart<'_>,
    ) -> Result<crate::task::Restarted<B::Vm>, CreateSandboxError> {
        let crate::task::Restart {
            dir,
            record,
            network,
            snapshot_dir,
        } = restart;
        let span =
            tracing::info_span!("sandbox", id = %record.info.id, vmm = %self.inner.backend.kind());
        self.check_snapshot_support()?;
        self.inner.backend.check_host()?;
        let snapshot = crate::snapshot::read(&snapshot_dir).await?;
        self.check_restorable(&snapshot).await?;
        let config = record.info.config.clone();
        let template = self.inner.templates.load(&config.template_id)?;
        let image = guest_image(&template, &config);
        let scratch_disk = dir.paths().scratch_disk();
        let scratch = snapshot.manifest.scratch.then_some(scratch_disk.as_path());
        let source = BootSource::Restore(Box::new(snapshot));
        let Booted {
            vm,
            guest,
            mut record,
            mut vmm,
            ..
        } = self
            .boot(dir, record, &image, &source, scratch, network, &span)
            .await?;
        let guest = guest.map(|(client, hello)| {
            record.info.agent_version = Some(hello.agent_version.clone());
            record.info.kernel_release = Some(hello.kernel_release.clone());
            // The template's defaults (env, working directory, user) apply
            // after a resume as before the pause.
            Guest::new(client, record.info.config.env.clone())
                .with_exec_defaults(&template.manifest.exec_defaults)
        });
        // The guest's clock stood still while it was on disk.
        if let Some(guest) = &guest {
            let limit = self.inner.timeouts.agent;
            if tokio::time::timeout(limit, guest.sync_clock())
                .await
                .is_err()
            {
                tracing::warn!(parent: &span, ?limit, "the agent did not set the guest clock in time");
            }
        }
        if self.inner.detached
            && let Some(vmm) = vmm.as_mut()
        {
            vmm.set_kill_on_drop(false);
        }
        Ok(crate::task::Restarted {
            vm,
            vmm,
            guest,
            record,
        })
    }

    /// Registers sandbox `id` (its `info` and agent) and hands it to its own
    /// task, which from then on owns it; used by a create and by a
    /// re-attach.
    pub(crate) fn spawn_task(
        &self,
        id: SandboxId,
        task: SandboxTask<B::Vm>,
        info: SandboxInfo,
        guest: Option<Guest>,
        span: tracing::Span,
    ) {
        let (commands, rx) = mpsc::channel(ACTION_QUEUE);
        let (published, watcher) = watch::channel(info);
        let registry = &self.inner.sandboxes;
        registry.insert(
            id,
            Entry {
                commands,
                info: watcher,
                guest,
            },
        );
        tokio::spawn(
            crate::task::drive(task, rx, published, Arc::downgrade(registry)).instrument(span),
        );
    }
}

/// A VM whose guest is up, with the boot's phase marks.
struct Booted<V> {
    vm: V,
    guest: Option<(AgentClient, nova_protocol::HelloInfo)>,
    record: SandboxRecord,
    vmm: Option<crate::vmm::VmmProcess>,
    spawned_at: Option<Instant>,
    vmm_ready_at: Option<Instant>,
    started_at: Option<Instant>,
}

/// Removes what a create that failed had made: its network and its
/// directory (its VMM is already gone).
async fn abandon(mut dir: SandboxDir, network: Option<crate::network::SandboxNet>) {
    crate::network::teardown(network).await;
    if let Err((path, e)) = dir.remove().await {
        tracing::warn!(path = %path.display(), error = %e, "cannot remove a failed sandbox's files");
    }
}

/// The kernel and disks `config` boots from `template`.
fn guest_image(template: &Template, config: &SandboxConfig) -> GuestImage {
    GuestImage {
        kernel: template.kernel_path(),
        rootfs: config
            .rootfs_path
            .clone()
            .unwrap_or_else(|| template.rootfs_path()),
        extra_drives: config.extra_drives.clone(),
        arch: template.manifest.arch,
    }
}

impl<B: Backend> Provider<B> {
    /// What a command's lost agent connection means: when the sandbox's
    /// task reports the VM gone (within [`VM_EXIT_GRACE`], as both ends are
    /// seen at nearly the same time), [`ExecError::VmExited`] with its
    /// reason; otherwise the agent error as it was.
    async fn agent_lost(&self, id: &SandboxId, cause: nova_core::error::BoxError) -> ExecError {
        let deadline = Instant::now() + VM_EXIT_GRACE;
        loop {
            let Some(info) = self.inner.sandboxes.get(id) else {
                return ExecError::Agent(cause);
            };
            match info.state {
                SandboxState::Failed => {
                    return match info.failure {
                        Some(reason) if reason.starts_with("the VMM exited") => {
                            ExecError::VmExited { reason }
                        }
                        _ => ExecError::Agent(cause),
                    };
                }
                SandboxState::Running if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                _ => return ExecError::Agent(cause),
            }
        }
    }
}

#[async_trait]
impl<B: Backend> Hypervisor for Provider<B> {
    fn kind(&self) -> HypervisorKind {
        self.inner.backend.kind()
    }

    async fn create_sandbox(&self, config: SandboxConfig) -> Result<Sandbox, CreateSandboxError> {
        config.validate()?;
        crate::network::refuse_unsupported(
            &config,
            self.inner.backend.network_mode(),
            self.inner.backend.kind(),
        )?;
        let template = self.inner.templates.load(&config.template_id)?;
        self.inner.backend.check_host()?;
        let identity = match config.rootfs_path {
            Some(_) => None,
            None => crate::snapshot::template_identity(&template).ok(),
        };
        let image = guest_image(&template, &config);
        let source = match self.template_snapshot(&template, &config).await? {
            Some(snapshot) => BootSource::Restore(Box::new(snapshot)),
            None => BootSource::Cold,
        };
        self.launch(
            config,
            image,
            source,
            identity,
            template.manifest.exec_defaults,
        )
        .await
    }

    async fn create_sandbox_from_snapshot(
        &self,
        dir: &Path,
    ) -> Result<Sandbox, CreateSandboxError> {
        self.restore(dir, true).await
    }

    async fn fork_sandbox(
        &self,
        id: &SandboxId,
        n: usize,
    ) -> Result<Vec<Sandbox>, CreateSandboxError> {
        const MAX_FORKS: usize = 64;
        if n == 0 || n > MAX_FORKS {
            return Err(CreateSandboxError::Unsupported {
                reason: format!("cannot fork into {n} sandboxes: ask for 1..={MAX_FORKS}"),
            });
        }
        self.check_snapshot_support()?;
        let state = self
            .get(id)
            .await
            .ok_or_else(|| SnapshotError::NotFound(id.clone()))?
            .state;
        if state != SandboxState::Running {
            return Err(SnapshotError::Invalid {
                dir: self.inner.backend.home().sandboxes_dir(),
                reason: format!("only a running sandbox can be forked, and {id} is {state}"),
            }
            .into());
        }
        // The fork's state lives only until the children are restored.
        let dir = self
            .inner
            .backend
            .home()
            .cache_dir()
            .join("forks")
            .join(format!("{id}-{}", SandboxId::random()));
        let paused = std::time::Instant::now();
        let snapshot = async {
            let vmm_error = |action: &str, e: SandboxError| CreateSandboxError::Vmm {
                vmm: self.inner.backend.kind().vmm_name(),
                action: action.to_owned(),
                source: Box::new(e),
            };
            self.pause_sandbox(id)
                .await
                .map_err(|e| vmm_error("pause the sandbox to fork it", e))?;
            let saved = self.snapshot_sandbox(id, &dir).await;
            let resumed = self.resume_sandbox(id).await;
            let saved = saved?;
            resumed.map_err(|e| vmm_error("resume the forked sandbox", e))?;
            Ok::<_, CreateSandboxError>(saved)
        }
        .await;
        tracing::info!(sandbox = %id, paused_ms = paused.elapsed().as_millis() as u64, "forked state saved");
        let children = match snapshot {
            Ok(_) => {
                let mut children = Vec::with_capacity(n);
                let mut failed = None;
                for _ in 0..n {
                    match self.restore(&dir, false).await {
                        Ok(child) => children.push(child),
                        Err(e) => {
                            failed = Some(e);
                            break;
                        }
                    }
                }
                match failed {
                    None => Ok(children),
                    Some(e) => {
                        // All or nothing: the children made so far go too.
                        for child in children {
                            let _ = child.stop(true).await;
                        }
                        Err(e)
                    }
                }
            }
            Err(e) => Err(e),
        };
        if let Err(e) = tokio::fs::remove_dir_all(&dir).await
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot remove a fork's snapshot");
        }
        children
    }

    async fn snapshot_as_template(
        &self,
        id: &SandboxId,
        name: &str,
    ) -> Result<Template, SnapshotError> {
        self.check_snapshot_support()?;
        let templates = &self.inner.templates;
        let target = templates.dir().join(name);
        let invalid = |reason: String| SnapshotError::Invalid {
            dir: target.clone(),
            reason,
        };
        match templates.load(name) {
            Err(nova_core::template::TemplateError::NotFound { .. }) => {}
            Err(nova_core::template::TemplateError::InvalidId(_)) => {
                return Err(invalid(format!(
                    "{name:?} is not a template id: use a-z, 0-9, '.', '_' or '-'"
                )));
            }
            _ => {
                return Err(invalid(format!(
                    "template {name} exists already; pick another name or remove it first"
                )));
            }
        }
        let info = self
            .get(id)
            .await
            .ok_or_else(|| SnapshotError::NotFound(id.clone()))?;
        if info.config.rootfs_path.is_some() || !info.config.extra_drives.is_empty() {
            return Err(invalid(
                "the sandbox boots its own root filesystem or extra drives, which a template \
                 cannot carry"
                    .into(),
            ));
        }
        let source = templates
            .load(&info.config.template_id)
            .map_err(|e| invalid(format!("its template cannot be loaded: {e}")))?;
        let was_running = match info.state {
            SandboxState::Running => true,
            SandboxState::Paused => false,
            other => return Err(SnapshotError::NotPaused(other)),
        };
        // Built aside and renamed into place, so a half-made template is
        // never seen.
        let staging = templates
            .dir()
            .join(format!(".{name}.new-{}", SandboxId::random()));
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| SnapshotError::Io { path, source }
        };
        let build = async {
            tokio::fs::create_dir_all(&staging)
                .await
                .map_err(io(&staging))?;
            for (from, file) in [
                (source.kernel_path(), nova_core::template::KERNEL_FILE),
                (source.rootfs_path(), nova_core::template::ROOTFS_FILE),
            ] {
                let to = staging.join(file);
                if tokio::fs::hard_link(&from, &to).await.is_err() {
                    crate::scratch::clone_disk_image(&from, &to)
                        .await
                        .map_err(io(&to))?;
                }
            }
            let mut manifest = source.manifest.clone();
            manifest.template_id = name.to_owned();
            manifest.name = format!("{name} (from sandbox {id} of {})", source.id());
            manifest.memory_mb = info.config.memory_mb;
            manifest.vcpus = info.config.vcpus;
            let written = staging.clone();
            tokio::task::spawn_blocking(move || {
                TemplateManager::write_manifest(&written, &manifest)
            })
            .await
            .map_err(std::io::Error::other)
            .and_then(|r| r)
            .map_err(io(&staging))?;
            if was_running {
                self.pause_sandbox(id)
                    .await
                    .map_err(|e| SnapshotError::Vmm {
                        vmm: self.inner.backend.kind(),
                        action: "pause the sandbox".into(),
                        source: Box::new(e),
                    })?;
            }
            let saved = self
                .snapshot_sandbox(id, &staging.join(nova_core::template::SNAPSHOT_DIR))
                .await;
            if was_running && let Err(e) = self.resume_sandbox(id).await {
                tracing::warn!(sandbox = %id, error = %e, "cannot resume the sandbox after saving it");
            }
            let mut snapshot = saved?;
            tokio::fs::rename(&staging, &target)
                .await
                .map_err(io(&target))?;
            // The snapshot belongs to the new template now.
            let template = templates
                .load(name)
                .map_err(|e| invalid(format!("the new template cannot be loaded: {e}")))?;
            snapshot.dir = template.snapshot_dir();
            snapshot.manifest.template =
                Some(crate::snapshot::template_identity(&template).map_err(io(&template.dir))?);
            crate::snapshot::write_manifest(&snapshot).await?;
            Ok(template)
        };
        let result = build.await;
        if result.is_err() {
            let _ = tokio::fs::remove_dir_all(&staging).await;
        }
        result
    }

    async fn snapshot_sandbox(
        &self,
        id: &SandboxId,
        dir: &Path,
    ) -> Result<Snapshot, SnapshotError> {
        self.snapshot_sandbox_with(id, dir, SnapshotKind::Full)
            .await
    }

    async fn stop_sandbox(&self, id: &SandboxId, force: bool) -> Result<(), SandboxError> {
        self.inner
            .sandboxes
            .ask(id, SandboxState::Stopping, |reply| SandboxAction::Stop {
                force,
                reply,
            })
            .await
    }

    async fn update_network(
        &self,
        id: &SandboxId,
        egress: EgressConfig,
    ) -> Result<(), UpdateNetworkError> {
        egress.validate()?;
        if self.inner.backend.network_mode() == crate::backend::NetworkMode::Own {
            return Err(UpdateNetworkError::Unsupported(format!(
                "egress rules need the Linux network namespace mode (QEMU or Firecracker); \
                 the {} backend's own NAT network has none",
                self.inner.backend.kind()
            )));
        }
        let entry = self
            .inner
            .sandboxes
            .entry(id, SandboxState::Running)
            .map_err(|e| match e {
                SandboxError::State(t) => UpdateNetworkError::NotRunning(t.from),
                _ => UpdateNetworkError::NotFound(id.clone()),
            })?;
        let (reply, rx) = oneshot::channel();
        let gone = || UpdateNetworkError::NotRunning(entry.info.borrow().state);
        if entry
            .commands
            .send(SandboxAction::UpdateNetwork { egress, reply })
            .await
            .is_err()
        {
            return Err(gone());
        }
        rx.await.unwrap_or_else(|_| Err(gone()))
    }

    async fn pause_sandbox(&self, id: &SandboxId) -> Result<(), SandboxError> {
        self.inner
            .sandboxes
            .ask(id, SandboxState::Paused, SandboxAction::Pause)
            .await
    }

    async fn pause_sandbox_to_disk(&self, id: &SandboxId) -> Result<(), SandboxError> {
        self.check_snapshot_support()?;
        self.inner
            .sandboxes
            .ask(id, SandboxState::Paused, SandboxAction::PauseToDisk)
            .await
    }

    async fn resume_sandbox(&self, id: &SandboxId) -> Result<(), SandboxError> {
        self.inner
            .sandboxes
            .ask(id, SandboxState::Running, SandboxAction::Resume)
            .await
    }

    async fn get_sandbox_stats(&self, id: &SandboxId) -> Result<SandboxStats, SandboxError> {
        self.inner
            .sandboxes
            .ask(id, SandboxState::Running, SandboxAction::Stats)
            .await
    }

    async fn exec_stream(
        &self,
        id: &SandboxId,
        request: ExecRequest,
    ) -> Result<ExecStream, ExecError> {
        self.inner.sandboxes.exec_stream(id, request).await
    }

    /// As the trait's, and a command cut off by its VM's exit says so:
    /// [`ExecError::VmExited`] with the sandbox's failure reason. A command
    /// with a timeout is waited for at most 20 s past it:
    /// the guest enforces the timeout, and a guest too overloaded to (a fork
    /// bomb) must not hold the caller forever.
    async fn execute_command(
        &self,
        id: &SandboxId,
        request: ExecRequest,
    ) -> Result<ExecOutput, ExecError> {
        let limit = request.max_output.unwrap_or(DEFAULT_MAX_OUTPUT);
        let timeout = request.timeout;
        let result = match self.exec_stream(id, request).await {
            Ok(stream) => match timeout {
                Some(timeout) => tokio::time::timeout(
                    timeout + GUEST_TIMEOUT_GRACE,
                    stream.collect_limited(limit),
                )
                .await
                .unwrap_or_else(|_| {
                    Err(ExecError::Agent(
                        format!(
                            "the guest did not end the command within its timeout \
                                     ({timeout:?}) and {GUEST_TIMEOUT_GRACE:?} more: it is \
                                     overloaded (a fork bomb?); the command is being killed, \
                                     retry, or stop the sandbox"
                        )
                        .into(),
                    ))
                }),
                None => stream.collect_limited(limit).await,
            },
            Err(e) => Err(e),
        };
        match result {
            Err(ExecError::Agent(cause)) => Err(self.agent_lost(id, cause).await),
            other => other,
        }
    }

    async fn list_execs(&self, id: &SandboxId) -> Result<Vec<ExecInfo>, ExecError> {
        self.inner.sandboxes.exec_guest(id)?.list_execs().await
    }

    async fn attach_exec(&self, id: &SandboxId, exec_id: u64) -> Result<ExecStream, ExecError> {
        self.inner
            .sandboxes
            .exec_guest(id)?
            .attach_exec(exec_id)
            .await
    }

    async fn write_file(
        &self,
        id: &SandboxId,
        path: &str,
        data: Vec<u8>,
        mode: u32,
    ) -> Result<(), FileError> {
        self.inner
            .sandboxes
            .file_guest(id, path)?
            .write_file(path, data, mode)
            .await
    }

    async fn read_file(&self, id: &SandboxId, path: &str) -> Result<Vec<u8>, FileError> {
        self.inner
            .sandboxes
            .file_guest(id, path)?
            .read_file(path)
            .await
    }

    async fn list_dir(&self, id: &SandboxId, path: &str) -> Result<DirListing, FileError> {
        self.inner
            .sandboxes
            .file_guest(id, path)?
            .list_dir(path)
            .await
    }

    async fn stat(&self, id: &SandboxId, path: &str) -> Result<FileStat, FileError> {
        self.inner.sandboxes.file_guest(id, path)?.stat(path).await
    }

    async fn remove(&self, id: &SandboxId, path: &str, recursive: bool) -> Result<(), FileError> {
        self.inner
            .sandboxes
            .file_guest(id, path)?
            .remove(path, recursive)
            .await
    }

    async fn mkdir(&self, id: &SandboxId, path: &str, mode: u32) -> Result<(), FileError> {
        self.inner
            .sandboxes
            .file_guest(id, path)?
            .mkdir(path, mode)
            .await
    }

    async fn upload(
        &self,
        id: &SandboxId,
        path: &str,
        mode: u32,
        data: Box<dyn tokio::io::AsyncRead + Send + Unpin>,
    ) -> Result<u64, FileError> {
        self.inner
            .sandboxes
            .file_guest(id, path)?
            .upload(path, mode, data)
            .await
    }

    async fn download(&self, id: &SandboxId, path: &str) -> Result<FileDownload, FileError> {
        self.inner
            .sandboxes
            .file_guest(id, path)?
            .download(path)
            .await
    }

    async fn list(&self) -> Vec<SandboxInfo> {
        self.inner.sandboxes.list()
    }

    async fn get(&self, id: &SandboxId) -> Option<SandboxInfo> {
        self.inner.sandboxes.get(id)
    }
}
