//! The daemon's state: the provider, the operator's policy, the records,
//! admission of creates, the warm pool, lifetimes and metrics.
//!
//! Calls on different sandboxes never wait on each other: the daemon holds
//! no lock across a runtime call, and the runtime gives each sandbox its own
//! task. Creates are admitted in two steps: at most
//! `max_pending_creates` may wait (one more is answered `busy`, 429), and at
//! most `max_concurrent_creates` boot at once; the daemon-wide totals
//! (sandboxes, memory, vCPUs) are checked under one admission lock against
//! the live sandboxes plus the creates already admitted. A create runs in
//! its own task, so a caller that hangs up cannot leave it half done (the
//! sandbox it made is reaped when its lifetime ends).

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use nova_core::config::SandboxConfig;
use nova_core::error::SandboxError;
use nova_core::home::NovaHome;
use nova_core::hypervisor::Hypervisor;
use nova_core::id::SandboxId;
use nova_core::metadata::{SandboxInfo, now_ms};
use nova_core::snapshot::{SNAPSHOT_MANIFEST, SnapshotManifest};
use nova_core::state::SandboxState;
use nova_core::template::{TemplateError, TemplateManager};
use tokio::sync::Semaphore;

use crate::api::sandboxes::{CreateSandboxRequest, SandboxView};
use crate::api::system::{Health, TemplateView};
use crate::metrics::{Metrics, Snapshot};
use crate::policy::{Admitted, Policy, Usage};
use crate::pool::Pool;
use crate::problem::{Problem, ProblemCode, parse_id};
use crate::records::{Record, Records};

/// How often lifetimes are checked.
const REAP_EVERY: Duration = Duration::from_secs(1);
/// How long a metrics scrape waits for one sandbox's stats.
const STATS_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the pool waits after a failed refill before trying again.
const POOL_BACKOFF: Duration = Duration::from_secs(10);

/// The daemon.
#[derive(Debug)]
pub struct Daemon {
    hv: Arc<dyn Hypervisor>,
    home: NovaHome,
    policy: Policy,
    records: Records,
    metrics: Metrics,
    pool: Pool,
    pending: AtomicUsize,
    slots: Semaphore,
    admit_lock: tokio::sync::Mutex<()>,
    reserved: Mutex<Usage>,
    started: Instant,
}

/// A create's place in admission: released (and its reserved usage given
/// back) on drop, after the sandbox is in the runtime's registry.
struct Reservation<'a> {
    daemon: &'a Daemon,
    usage: Usage,
    _slot: tokio::sync::SemaphorePermit<'a>,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        let mut reserved = self.daemon.lock_reserved();
        reserved.sandboxes = reserved.sandboxes.saturating_sub(self.usage.sandboxes);
        reserved.memory_mb = reserved.memory_mb.saturating_sub(self.usage.memory_mb);
        reserved.vcpus = reserved.vcpus.saturating_sub(self.usage.vcpus);
    }
}

/// Counts a waiting create; decrements on drop.
struct Pending<'a>(&'a AtomicUsize);

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Daemon {
    /// A daemon over `hv`, keeping its records under `$NOVA_HOME/server`.
    pub fn new(
        hv: Arc<dyn Hypervisor>,
        home: NovaHome,
        policy: Policy,
    ) -> std::io::Result<Arc<Self>> {
        let records = home.root().join("server").join("sandboxes");
        Self::with_records(hv, home, policy, &records)
    }

    /// A daemon over `hv` keeping its records in `records` instead: for a
    /// process with a provider of its own beside `nova serve` on the same
    /// `$NOVA_HOME` (`nova mcp`), whose records must not mix with the
    /// daemon's.
    pub fn with_records(
        hv: Arc<dyn Hypervisor>,
        home: NovaHome,
        policy: Policy,
        records: &Path,
    ) -> std::io::Result<Arc<Self>> {
        let records = Records::open(records)?;
        let templates = TemplateManager::new(home.templates_dir());
        let pool = Pool::new(&policy, |id| template_size(&templates, id));
        let slots = Semaphore::new(policy.limits.max_concurrent_creates);
        Ok(Arc::new(Self {
            hv,
            home,
            policy,
            records,
            metrics: Metrics::new(),
            pool,
            pending: AtomicUsize::new(0),
            slots,
            admit_lock: tokio::sync::Mutex::new(()),
            reserved: Mutex::new(Usage::default()),
            started: Instant::now(),
        }))
    }

    fn lock_reserved(&self) -> std::sync::MutexGuard<'_, Usage> {
        // Plain arithmetic under the lock: a poisoned lock is still whole.
        self.reserved.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The provider.
    pub fn hypervisor(&self) -> &Arc<dyn Hypervisor> {
        &self.hv
    }

    /// The operator's policy.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The records.
    pub fn records(&self) -> &Records {
        &self.records
    }

    /// The id `raw` names, if it is a sandbox callers can see (not one
    /// waiting in the pool, not one deleted).
    pub async fn known(&self, raw: &str) -> Result<SandboxId, Problem> {
        let id = parse_id(raw)?;
        match self.records.get(&id) {
            Some(record) if record.pool.is_none() && self.hv.get(&id).await.is_some() => Ok(id),
            _ => Err(Problem::sandbox_not_found(raw)),
        }
    }

    /// The environment every command in `id` gets.
    pub fn sandbox_env(&self, id: &SandboxId) -> BTreeMap<String, String> {
        self.records.get(id).map(|r| r.env).unwrap_or_default()
    }

    /// The view of sandbox `raw`.
    pub async fn view(&self, raw: &str) -> Result<SandboxView, Problem> {
        let id = self.known(raw).await?;
        let info = self
            .hv
            .get(&id)
            .await
            .ok_or_else(|| Problem::sandbox_not_found(raw))?;
        Ok(SandboxView::new(&info, self.records.get(&id).as_ref()))
    }

    /// Every sandbox callers can see, oldest first. Records of sandboxes
    /// the runtime no longer has are dropped here.
    pub async fn list(&self) -> Vec<SandboxView> {
        let infos = self.hv.list().await;
        let mut views = Vec::with_capacity(infos.len());
        for info in &infos {
            if let Some(record) = self.records.get(&info.id)
                && record.pool.is_none()
            {
                views.push(SandboxView::new(info, Some(&record)));
            }
        }
        for (id, _) in self.records.all() {
            if !infos.iter().any(|i| i.id == id) {
                self.records.remove(&id);
            }
        }
        views
    }

    async fn live_usage(&self) -> Usage {
        self.hv
            .list()
            .await
            .iter()
            .filter(|i| i.state.is_live())
            .fold(Usage::default(), |u, i| u.plus(Usage::of(&i.config)))
    }

    /// Admits a create of `config`: the daemon-wide totals, then a boot
    /// slot. `bounded` creates count against `max_pending_creates`.
    async fn reserve(&self, config: &SandboxConfig) -> Result<Reservation<'_>, Problem> {
        let usage = Usage::of(config);
        {
            let _admit = self.admit_lock.lock().await;
            // Reserved first, then live: a create that finishes in between
            // is registered before its reservation is released, so it is
            // counted at least once.
            let reserved = *self.lock_reserved();
            let live = self.live_usage().await;
            self.policy.check_totals(live.plus(reserved).plus(usage))?;
            let mut reserved_now = self.lock_reserved();
            *reserved_now = reserved_now.plus(usage);
        }
        let slot = self
            .slots
            .acquire()
            .await
            .map_err(|_| Problem::new(ProblemCode::HostError, "the daemon is shutting down"))?;
        Ok(Reservation {
            daemon: self,
            usage,
            _slot: slot,
        })
    }

    /// Creates a sandbox for a caller: from the pool when one fits, else by
    /// booting one. Runs in its own task, so it completes even if the caller
    /// hangs up.
    pub async fn create(
        self: &Arc<Self>,
        request: CreateSandboxRequest,
    ) -> Result<SandboxView, Problem> {
        let template = request
            .template
            .as_deref()
            .unwrap_or(&self.policy.templates.default);
        let manager = TemplateManager::new(self.home.templates_dir());
        let defaults = template_size(&manager, template);
        let admitted = self.policy.admit(&request, defaults)?;
        let this = self.clone();
        tokio::spawn(async move { this.create_admitted(admitted).await })
            .await
            .map_err(|e| {
                Problem::new(
                    ProblemCode::HostError,
                    format!("the create task failed: {e}"),
                )
            })?
    }

    async fn create_admitted(&self, admitted: Admitted) -> Result<SandboxView, Problem> {
        let started = Instant::now();
        if let Some(view) = self.claim_from_pool(&admitted).await {
            self.metrics.pool_claim(true);
            self.metrics
                .create_done(started.elapsed().as_secs_f64(), true);
            return Ok(view);
        }
        self.metrics.pool_claim(false);
        let waiting = self.pending.fetch_add(1, Ordering::SeqCst);
        let _pending = Pending(&self.pending);
        if waiting >= self.policy.limits.max_pending_creates {
            return Err(Problem::new(
                ProblemCode::Busy,
                format!(
                    "{waiting} creates are waiting already (max_pending_creates); retry shortly"
                ),
            )
            .retry_after(1));
        }
        let reservation = self.reserve(&admitted.config).await?;
        let sandbox = self.hv.create_sandbox(admitted.config.clone()).await?;
        let id = sandbox.id().clone();
        let record = Record {
            labels: admitted.labels,
            env: admitted.env,
            timeout_secs: Some(admitted.timeout_secs),
            expires_at_ms: Some(now_ms() + admitted.timeout_secs * 1000),
            pool: None,
            from_pool: false,
        };
        if let Err(e) = self.records.put(&id, record.clone()) {
            // Without a record the sandbox would outlive its lifetime
            // unseen: undo the create.
            let _ = self.hv.stop_sandbox(&id, true).await;
            return Err(Problem::new(
                ProblemCode::HostError,
                format!("cannot write the daemon's record of {id}: {e}"),
            ));
        }
        drop(reservation);
        let info = sandbox.info();
        if let Some(boot) = &info.boot {
            self.metrics
                .booted(boot.boot_time_ms / 1000.0, boot.from_snapshot);
        }
        self.metrics
            .create_done(started.elapsed().as_secs_f64(), false);
        let info = self.hv.get(&id).await.unwrap_or_else(|| info.clone());
        Ok(SandboxView::new(&info, Some(&record)))
    }

    /// Claims a pooled sandbox made exactly like `admitted`, resumes it and
    /// gives it the caller's record; `None` when there is none (or it could
    /// not be resumed, in which case it is stopped).
    async fn claim_from_pool(&self, admitted: &Admitted) -> Option<SandboxView> {
        while let Some(id) = self.pool.claim(&admitted.config) {
            if let Err(e) = self.hv.resume_sandbox(&id).await {
                tracing::warn!(sandbox = %id, error = %crate::problem::chain(&e), "pooled sandbox cannot resume; stopping it");
                let _ = self.hv.stop_sandbox(&id, true).await;
                self.records.remove(&id);
                continue;
            }
            let record = Record {
                labels: admitted.labels.clone(),
                env: admitted.env.clone(),
                timeout_secs: Some(admitted.timeout_secs),
                expires_at_ms: Some(now_ms() + admitted.timeout_secs * 1000),
                pool: None,
                from_pool: true,
            };
            if let Err(e) = self.records.put(&id, record.clone()) {
                tracing::warn!(sandbox = %id, error = %e, "cannot record a claimed sandbox; stopping it");
                let _ = self.hv.stop_sandbox(&id, true).await;
                self.records.remove(&id);
                continue;
            }
            let info = self.hv.get(&id).await?;
            return Some(SandboxView::new(&info, Some(&record)));
        }
        None
    }

    /// Stops sandbox `raw` (its record stays, so it is listed `stopped`).
    pub async fn stop(&self, raw: &str, force: bool) -> Result<SandboxView, Problem> {
        let id = self.known(raw).await?;
        self.stop_id(&id, force).await?;
        self.view(raw).await
    }

    async fn stop_id(&self, id: &SandboxId, force: bool) -> Result<(), Problem> {
        match self.hv.get(id).await {
            Some(info) if info.state == SandboxState::Stopped => Ok(()),
            // A failed sandbox is stopped to release what is left of it.
            // One the runtime already released (a re-attach found it dead)
            // has no task left to ask, and its stop is refused as a state
            // error: nothing is left, so it is stopped.
            Some(info) if info.state == SandboxState::Failed => {
                match self.hv.stop_sandbox(id, force).await {
                    Ok(()) | Err(SandboxError::State(_)) => Ok(()),
                    Err(e) => Err(e.into()),
                }
            }
            Some(_) => Ok(self.hv.stop_sandbox(id, force).await?),
            None => Err(Problem::sandbox_not_found(id.as_str())),
        }
    }

    /// Stops sandbox `raw` if it is live and forgets it.
    pub async fn delete(&self, raw: &str, force: bool) -> Result<(), Problem> {
        let id = self.known(raw).await?;
        self.stop_id(&id, force).await?;
        self.records.remove(&id);
        Ok(())
    }

    /// Sets the lifetime of `raw` to `secs` from now.
    pub async fn set_timeout(&self, raw: &str, secs: u64) -> Result<SandboxView, Problem> {
        self.policy.check_timeout(secs)?;
        let id = self.known(raw).await?;
        let live = self.hv.get(&id).await.is_some_and(|i| i.state.is_live());
        if !live {
            return Err(Problem::new(
                ProblemCode::NotRunning,
                format!("sandbox {id} is stopped; a lifetime applies to a live sandbox"),
            ));
        }
        self.records
            .update(&id, |r| {
                r.timeout_secs = Some(secs);
                r.expires_at_ms = Some(now_ms() + secs * 1000);
            })
            .map_err(|e| {
                Problem::new(
                    ProblemCode::HostError,
                    format!("cannot write the record: {e}"),
                )
            })?;
        self.view(raw).await
    }

    /// The last `tail` bytes of the console log of `raw` (and of its VMM's
    /// log, when it wrote one).
    pub async fn logs(&self, raw: &str, tail: u64) -> Result<String, Problem> {
        let id = self.known(raw).await?;
        let paths = self.home.sandbox(&id);
        let (console, vmm) = (paths.console_log(), paths.vmm_log());
        tokio::task::spawn_blocking(move || {
            let mut text = tail_of(&console, tail);
            let vmm = tail_of(&vmm, tail);
            if !vmm.trim().is_empty() {
                text.push_str("\n--- vmm.log ---\n");
                text.push_str(&vmm);
            }
            text
        })
        .await
        .map_err(|e| Problem::new(ProblemCode::HostError, format!("cannot read the logs: {e}")))
    }

    /// What `GET /v1/health` says.
    pub async fn health(&self) -> Health {
        let live = self
            .hv
            .list()
            .await
            .iter()
            .filter(|i| i.state.is_live())
            .count();
        Health {
            status: "ok".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            backend: self.hv.kind().to_string(),
            sandboxes: live,
            pool_ready: self.pool.ready_counts().iter().map(|(_, n)| n).sum(),
            uptime_secs: self.started.elapsed().as_secs(),
        }
    }

    /// The installed templates the policy allows.
    pub fn templates(&self) -> Result<Vec<TemplateView>, TemplateError> {
        let counts = self.pool.ready_counts();
        let manager = TemplateManager::new(self.home.templates_dir());
        Ok(manager
            .list()?
            .into_iter()
            .filter_map(Result::ok)
            .filter(|t| self.policy.template_allowed(t.id()))
            .map(|t| TemplateView {
                id: t.id().to_owned(),
                name: t.manifest.name.clone(),
                memory_mb: t.manifest.memory_mb,
                vcpus: t.manifest.vcpus,
                kernel_version: t.manifest.kernel_version.clone(),
                snapshot: t.snapshot_dir().is_dir(),
                pool_ready: counts
                    .iter()
                    .find(|(id, _)| id == t.id())
                    .map_or(0, |(_, n)| *n),
            })
            .collect())
    }

    /// The Prometheus text, with the present read from the runtime.
    pub async fn render_metrics(&self) -> String {
        let infos = self.hv.list().await;
        let mut states: BTreeMap<String, i64> = BTreeMap::new();
        for info in &infos {
            *states.entry(info.state.to_string()).or_default() += 1;
        }
        let running: Vec<&SandboxInfo> = infos
            .iter()
            .filter(|i| i.state == SandboxState::Running)
            .collect();
        let stats = futures_util::future::join_all(running.iter().map(|info| async {
            let stats =
                tokio::time::timeout(STATS_TIMEOUT, self.hv.get_sandbox_stats(&info.id)).await;
            match stats {
                Ok(Ok(s)) => Some((
                    info.id.to_string(),
                    s.cpu_usage_us as f64 / 1e6,
                    s.memory_usage_mb * 1024.0 * 1024.0,
                )),
                _ => None,
            }
        }))
        .await;
        self.metrics
            .render(Snapshot {
                states: states.into_iter().collect(),
                pool: self
                    .pool
                    .ready_counts()
                    .into_iter()
                    .map(|(t, n)| (t, n as i64))
                    .collect(),
                sandboxes: stats.into_iter().flatten().collect(),
            })
            .await
    }

    /// Reconciles the records with the sandboxes the runtime has at start-up
    /// (after a re-attach): records of sandboxes that are gone are dropped;
    /// live sandboxes without a record get one with the default lifetime;
    /// paused pool sandboxes go back in the pool.
    pub async fn reconcile(&self) {
        let infos = self.hv.list().await;
        for (id, record) in self.records.all() {
            let Some(info) = infos.iter().find(|i| i.id == id) else {
                self.records.remove(&id);
                continue;
            };
            if let Some(template) = &record.pool {
                if info.state == SandboxState::Paused {
                    self.pool.add(template, id);
                } else {
                    let _ = self.hv.stop_sandbox(&id, true).await;
                    self.records.remove(&id);
                }
            }
        }
        for info in infos.iter().filter(|i| i.state.is_live()) {
            if self.records.get(&info.id).is_none() {
                let secs = self.policy.limits.default_timeout_secs;
                let record = Record {
                    timeout_secs: Some(secs),
                    expires_at_ms: Some(now_ms() + secs * 1000),
                    ..Record::default()
                };
                if let Err(e) = self.records.put(&info.id, record) {
                    tracing::warn!(sandbox = %info.id, error = %e, "cannot record an adopted sandbox");
                }
            }
        }
    }

    /// Stops the sandboxes whose lifetime has ended; runs until `daemon` is
    /// dropped.
    pub async fn run_lifetimes(daemon: Weak<Self>) {
        let mut tick = tokio::time::interval(REAP_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(daemon) = daemon.upgrade() else {
                return;
            };
            let now = now_ms();
            for (id, record) in daemon.records.all() {
                if record.pool.is_some() || record.expires_at_ms.is_none_or(|t| t > now) {
                    continue;
                }
                let live = daemon.hv.get(&id).await.is_some_and(|i| i.state.is_live());
                if live {
                    tracing::info!(sandbox = %id, "lifetime ended; stopping");
                    if let Err(problem) = daemon.stop_id(&id, true).await {
                        tracing::warn!(sandbox = %id, detail = %problem.detail, "cannot stop an expired sandbox");
                        continue;
                    }
                    daemon.metrics.expired();
                }
                daemon.records.remove(&id);
            }
        }
    }

    /// Keeps the warm pool full; runs until `daemon` is dropped.
    pub async fn run_pool(daemon: Weak<Self>) {
        loop {
            let Some(this) = daemon.upgrade() else { return };
            if !this.pool.is_enabled() {
                return;
            }
            let mut failed = false;
            for (template, config) in this.pool.short() {
                if let Err(problem) = this.fill_pool(&template, config).await {
                    tracing::warn!(template, detail = %problem.detail, "cannot refill the warm pool");
                    failed = true;
                }
            }
            if failed {
                drop(this);
                tokio::time::sleep(POOL_BACKOFF).await;
                continue;
            }
            if this.pool.short().is_empty() {
                let wait = async { this.pool.wait().await };
                let _ = tokio::time::timeout(POOL_BACKOFF, wait).await;
            }
        }
    }

    async fn fill_pool(&self, template: &str, config: SandboxConfig) -> Result<(), Problem> {
        let reservation = self.reserve(&config).await?;
        let sandbox = self.hv.create_sandbox(config).await?;
        let id = sandbox.id().clone();
        let record = Record {
            pool: Some(template.to_owned()),
            ..Record::default()
        };
        let ready = async {
            self.records
                .put(&id, record)
                .map_err(|e| Problem::new(ProblemCode::HostError, e.to_string()))?;
            self.hv.pause_sandbox(&id).await.map_err(Problem::from)
        };
        if let Err(problem) = ready.await {
            let _ = self.hv.stop_sandbox(&id, true).await;
            self.records.remove(&id);
            return Err(problem);
        }
        drop(reservation);
        if let Some(boot) = &sandbox.info().boot {
            self.metrics
                .booted(boot.boot_time_ms / 1000.0, boot.from_snapshot);
        }
        self.pool.add(template, id);
        Ok(())
    }

    /// Stops every pooled sandbox (at shutdown: they hold no caller's work).
    pub async fn drain_pool(&self) {
        for (id, record) in self.records.all() {
            if record.pool.is_some() {
                self.pool.forget(&id);
                let _ = self.hv.stop_sandbox(&id, true).await;
                self.records.remove(&id);
            }
        }
    }
}

/// The memory (MiB) and vCPUs a create of template `id` gets by default:
/// those its snapshot was taken with, so the create restores it, else the
/// template's recommendation; `None` when it is not installed.
fn template_size(manager: &TemplateManager, id: &str) -> Option<(u32, u8)> {
    let template = manager.load(id).ok()?;
    let snapshot = std::fs::read(template.snapshot_dir().join(SNAPSHOT_MANIFEST))
        .ok()
        .and_then(|bytes| serde_json::from_slice::<SnapshotManifest>(&bytes).ok());
    Some(match snapshot {
        Some(s) => (s.config.memory_mb, s.config.vcpus),
        None => (template.manifest.memory_mb, template.manifest.vcpus),
    })
}

/// The last `n` bytes of `path`, as text; empty when it cannot be read.
fn tail_of(path: &Path, n: u64) -> String {
    let Ok(mut file) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map_or(0, |m| m.len());
    if file.seek(SeekFrom::Start(len.saturating_sub(n))).is_err() {
        return String::new();
    }
    let mut bytes = Vec::new();
    let _ = file.take(n).read_to_end(&mut bytes);
    String::from_utf8_lossy(&bytes).into_owned()
}
