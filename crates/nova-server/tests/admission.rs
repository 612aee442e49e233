//! The daemon's admission, quotas, lifetimes, warm pool and independence of
//! sandboxes, against an in-memory hypervisor whose creates and commands
//! take as long as a test says (no VMs: these are the daemon's own rules).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use nova_core::config::SandboxConfig;
use nova_core::error::{CreateSandboxError, ExecError, FileError, SandboxError};
use nova_core::exec::{Command, ExecEvent, ExecRequest, ExecStream, ExitStatus};
use nova_core::home::NovaHome;
use nova_core::hypervisor::{Hypervisor, HypervisorKind};
use nova_core::id::SandboxId;
use nova_core::metadata::{SandboxInfo, now_ms};
use nova_core::sandbox::Sandbox;
use nova_core::state::SandboxState;
use nova_core::stats::SandboxStats;
use nova_server::api::sandboxes::{CreateSandboxRequest, SandboxStateView};
use nova_server::problem::ProblemCode;
use nova_server::{Daemon, Policy};

/// A hypervisor that keeps sandboxes in memory. A create takes
/// `create_delay`; a command `sleep:MS` takes MS milliseconds and exits 0.
#[derive(Debug)]
struct FakeHypervisor {
    me: Mutex<Option<std::sync::Weak<FakeHypervisor>>>,
    sandboxes: Mutex<BTreeMap<SandboxId, SandboxInfo>>,
    create_delay: Duration,
    creating: AtomicUsize,
    peak_creating: AtomicUsize,
}

impl FakeHypervisor {
    fn new(create_delay: Duration) -> Arc<Self> {
        let hv = Arc::new(Self {
            me: Mutex::new(None),
            sandboxes: Mutex::new(BTreeMap::new()),
            create_delay,
            creating: AtomicUsize::new(0),
            peak_creating: AtomicUsize::new(0),
        });
        *hv.me.lock().unwrap() = Some(Arc::downgrade(&hv));
        hv
    }

    fn set_state(&self, id: &SandboxId, state: SandboxState) -> Result<(), SandboxError> {
        let mut map = self.sandboxes.lock().unwrap();
        let info = map
            .get_mut(id)
            .ok_or_else(|| SandboxError::NotFound(id.clone()))?;
        info.state.transition_to(state)?;
        Ok(())
    }
}

#[async_trait]
impl Hypervisor for FakeHypervisor {
    fn kind(&self) -> HypervisorKind {
        HypervisorKind::Qemu
    }

    async fn create_sandbox(&self, config: SandboxConfig) -> Result<Sandbox, CreateSandboxError> {
        let now = self.creating.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak_creating.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(self.create_delay).await;
        self.creating.fetch_sub(1, Ordering::SeqCst);
        let id = SandboxId::random();
        let info = SandboxInfo {
            id: id.clone(),
            hypervisor: HypervisorKind::Qemu,
            state: SandboxState::Running,
            config,
            created_at_ms: now_ms(),
            boot: None,
            vmm_pid: None,
            dir: std::path::PathBuf::from("/nonexistent"),
            agent_version: None,
            kernel_release: None,
            failure: None,
            persisted: false,
        };
        self.sandboxes.lock().unwrap().insert(id, info.clone());
        let me = self.me.lock().unwrap().clone().unwrap().upgrade().unwrap();
        Ok(Sandbox::new(me, info))
    }

    async fn stop_sandbox(&self, id: &SandboxId, _force: bool) -> Result<(), SandboxError> {
        self.set_state(id, SandboxState::Stopping)?;
        self.set_state(id, SandboxState::Stopped)
    }

    async fn pause_sandbox(&self, id: &SandboxId) -> Result<(), SandboxError> {
        self.set_state(id, SandboxState::Paused)
    }

    async fn resume_sandbox(&self, id: &SandboxId) -> Result<(), SandboxError> {
        self.set_state(id, SandboxState::Running)
    }

    async fn get_sandbox_stats(&self, id: &SandboxId) -> Result<SandboxStats, SandboxError> {
        self.get(id)
            .await
            .map(|_| SandboxStats::default())
            .ok_or_else(|| SandboxError::NotFound(id.clone()))
    }

    async fn exec_stream(
        &self,
        id: &SandboxId,
        request: ExecRequest,
    ) -> Result<ExecStream, ExecError> {
        let info = self
            .get(id)
            .await
            .ok_or_else(|| ExecError::NotFound(id.clone()))?;
        if info.state != SandboxState::Running {
            return Err(ExecError::NotRunning(info.state));
        }
        let Command::Shell(script) = request.command else {
            return Err(ExecError::Invalid("the fake runs sleep:MS only".into()));
        };
        let ms: u64 = script
            .strip_prefix("sleep:")
            .and_then(|ms| ms.parse().ok())
            .ok_or_else(|| ExecError::Invalid("the fake runs sleep:MS only".into()))?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            let _ = tx.send(ExecEvent::Exited(ExitStatus::Code(0))).await;
        });
        Ok(ExecStream::new(rx))
    }

    async fn write_file(
        &self,
        _id: &SandboxId,
        path: &str,
        _data: Vec<u8>,
        _mode: u32,
    ) -> Result<(), FileError> {
        Err(FileError::InvalidPath {
            path: path.into(),
            reason: "the fake has no files",
        })
    }

    async fn read_file(&self, _id: &SandboxId, path: &str) -> Result<Vec<u8>, FileError> {
        Err(FileError::InvalidPath {
            path: path.into(),
            reason: "the fake has no files",
        })
    }

    async fn list(&self) -> Vec<SandboxInfo> {
        self.sandboxes.lock().unwrap().values().cloned().collect()
    }

    async fn get(&self, id: &SandboxId) -> Option<SandboxInfo> {
        self.sandboxes.lock().unwrap().get(id).cloned()
    }
}

fn daemon(hv: &Arc<FakeHypervisor>, policy: &str) -> (Arc<Daemon>, tempfile::TempDir) {
    let home = tempfile::tempdir().unwrap();
    let policy: Policy = toml::from_str(policy).unwrap();
    let daemon = Daemon::new(hv.clone(), NovaHome::at(home.path()), policy).unwrap();
    (daemon, home)
}

fn offline() -> CreateSandboxRequest {
    CreateSandboxRequest {
        network: Some(false),
        ..CreateSandboxRequest::default()
    }
}

async fn wait_until(what: &str, limit: Duration, mut done: impl AsyncFnMut() -> bool) {
    let start = Instant::now();
    while !done().await {
        assert!(
            start.elapsed() < limit,
            "{what} did not happen within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn creates_beyond_the_pending_bound_are_busy_and_boots_are_bounded() {
    let hv = FakeHypervisor::new(Duration::from_millis(400));
    let (daemon, _home) = daemon(
        &hv,
        "[limits]\nmax_pending_creates = 2\nmax_concurrent_creates = 1\n",
    );
    let creates: Vec<_> = (0..4)
        .map(|_| {
            let d = daemon.clone();
            tokio::spawn(async move { d.create(offline()).await })
        })
        .collect();
    let mut ok = 0;
    let mut busy = 0;
    for c in creates {
        match c.await.unwrap() {
            Ok(_) => ok += 1,
            Err(p) if p.code == ProblemCode::Busy => {
                assert_eq!(p.retry_after_secs, Some(1));
                busy += 1;
            }
            Err(p) => panic!("unexpected {p:?}"),
        }
    }
    assert_eq!((ok, busy), (2, 2));
    assert_eq!(hv.peak_creating.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn the_sandbox_quota_counts_live_sandboxes_and_frees_on_delete() {
    let hv = FakeHypervisor::new(Duration::ZERO);
    let (daemon, _home) = daemon(&hv, "[limits]\nmax_sandboxes = 2\n");
    let a = daemon.create(offline()).await.unwrap();
    daemon.create(offline()).await.unwrap();
    let e = daemon.create(offline()).await.unwrap_err();
    assert_eq!(e.code, ProblemCode::QuotaExceeded);
    assert!(e.detail.contains("max_sandboxes"), "{}", e.detail);
    daemon.delete(&a.id, false).await.unwrap();
    daemon.create(offline()).await.unwrap();
    assert_eq!(daemon.list().await.len(), 2);
}

#[tokio::test]
async fn a_sandbox_whose_lifetime_ends_is_stopped_and_forgotten() {
    let hv = FakeHypervisor::new(Duration::ZERO);
    let (daemon, _home) = daemon(&hv, "");
    tokio::spawn(Daemon::run_lifetimes(Arc::downgrade(&daemon)));
    let short = daemon
        .create(CreateSandboxRequest {
            timeout_secs: Some(1),
            ..offline()
        })
        .await
        .unwrap();
    let long = daemon.create(offline()).await.unwrap();
    let id: SandboxId = short.id.parse().unwrap();
    wait_until("the expiry", Duration::from_secs(5), async || {
        hv.get(&id).await.unwrap().state == SandboxState::Stopped
    })
    .await;
    let listed: Vec<String> = daemon.list().await.into_iter().map(|v| v.id).collect();
    assert_eq!(listed, vec![long.id.clone()]);
    // A refreshed lifetime moves the end.
    let before = long.expires_at_ms.unwrap();
    let after = daemon.set_timeout(&long.id, 3600).await.unwrap();
    assert!(after.expires_at_ms.unwrap() > before);
    assert_eq!(
        daemon.set_timeout(&long.id, 0).await.unwrap_err().code,
        ProblemCode::InvalidConfig
    );
}

#[tokio::test]
async fn the_warm_pool_fills_serves_a_matching_create_and_refills() {
    let hv = FakeHypervisor::new(Duration::from_millis(50));
    let (daemon, _home) = daemon(&hv, "[network]\ndefault = false\n[pool]\nminimal = 2\n");
    tokio::spawn(Daemon::run_pool(Arc::downgrade(&daemon)));
    let paused = async || {
        hv.list()
            .await
            .iter()
            .filter(|i| i.state == SandboxState::Paused)
            .count()
    };
    wait_until("the pool filled", Duration::from_secs(5), async || {
        paused().await == 2
    })
    .await;
    // Pooled sandboxes are not the callers'.
    assert!(daemon.list().await.is_empty());
    let request = CreateSandboxRequest {
        template: Some("minimal".into()),
        labels: BTreeMap::from([("team".into(), "a".into())]),
        ..CreateSandboxRequest::default()
    };
    let claimed = daemon.create(request.clone()).await.unwrap();
    assert!(claimed.from_pool);
    assert_eq!(claimed.labels["team"], "a");
    assert_eq!(claimed.state, SandboxStateView::Running);
    // A create that asks for something else boots.
    let bigger = daemon
        .create(CreateSandboxRequest {
            memory_mb: Some(1024),
            ..request
        })
        .await
        .unwrap();
    assert!(!bigger.from_pool);
    wait_until("the pool refilled", Duration::from_secs(5), async || {
        paused().await == 2
    })
    .await;
    let text = daemon.render_metrics().await;
    assert!(
        text.contains("nova_pool_claims_total{result=\"hit\"} 1"),
        "{text}"
    );
}

#[tokio::test]
async fn a_slow_command_in_one_sandbox_does_not_hold_up_another() {
    let hv = FakeHypervisor::new(Duration::ZERO);
    let (daemon, _home) = daemon(&hv, "");
    let a: SandboxId = daemon.create(offline()).await.unwrap().id.parse().unwrap();
    let b: SandboxId = daemon.create(offline()).await.unwrap().id.parse().unwrap();
    let slow = {
        let d = daemon.clone();
        tokio::spawn(async move {
            d.hypervisor()
                .execute_command(&a, ExecRequest::shell("sleep:3000"))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    daemon
        .hypervisor()
        .execute_command(&b, ExecRequest::shell("sleep:0"))
        .await
        .unwrap();
    daemon.view(b.as_str()).await.unwrap();
    // B's command and view completed while A's 3 s command still runs:
    // nothing of B waited on A.
    assert!(!slow.is_finished(), "the slow command ended early");
    slow.abort();
}

#[tokio::test]
async fn records_of_sandboxes_gone_are_dropped_and_adopted_ones_get_a_record() {
    let hv = FakeHypervisor::new(Duration::ZERO);
    let (daemon, home) = daemon(&hv, "");
    let gone = SandboxId::random();
    daemon
        .records()
        .put(&gone, nova_server::records::Record::default())
        .unwrap();
    // A sandbox the runtime has (as after a re-attach) but no record.
    let adopted = hv.create_sandbox(SandboxConfig::default()).await.unwrap();
    daemon.reconcile().await;
    assert!(daemon.records().get(&gone).is_none());
    assert!(daemon.records().get(adopted.id()).is_some());
    assert!(
        !home
            .path()
            .join("server/sandboxes")
            .join(format!("{gone}.json"))
            .exists()
    );
    assert_eq!(daemon.list().await.len(), 1);
}
