//! The runtime against a backend double whose VMM (a `sleep` process) and
//! agent misbehave: every wait in a sandbox's task is bounded, and whatever
//! goes wrong, nothing is left on the host. The provider is the one every
//! backend shares, so these faults are covered once for QEMU, Firecracker
//! and Apple VZ alike.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nova_core::config::SandboxConfig;
use nova_core::error::{BoxError, CreateSandboxError, ExecError, SandboxError};
use nova_core::home::NovaHome;
use nova_core::hypervisor::{Hypervisor, HypervisorKind};
use nova_core::snapshot::{SnapshotError, SnapshotKind};
use nova_core::state::SandboxState;
use nova_core::template::{TemplateManager, TemplateManifest};
use nova_protocol::frame::FrameReader;
use nova_protocol::{
    AgentMessage, ClientMessage, Hello, HelloInfo, HelloReply, PROTOCOL_VERSION, Request,
    StreamKind,
};
use nova_runtime::backend::{
    AgentConnector, Backend, ConnectError, Launch, Vm, VmStart, VmmCounters,
};
use nova_runtime::vmm::VmmCommand;
use nova_runtime::{Provider, Timeouts};
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};

/// How the double misbehaves.
#[derive(Clone, Debug, Default)]
struct Faults {
    /// `pause` never returns.
    pause_hangs: bool,
    /// The agent sends output for a request that was never made.
    agent_breaks_protocol: bool,
    /// What the agent does to the first command it is asked to run.
    rogue: Option<Rogue>,
    /// Bytes the rogue agent got written before the host cut it off.
    rogue_sent: Arc<AtomicU64>,
    /// Set once `state.json` was seen with the VMM's PID right after spawn.
    saw_state_at_spawn: Arc<AtomicBool>,
}

/// A rogue agent's answer to an exec.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rogue {
    /// Starts it, then sends stdout as fast as it can, never waiting for
    /// the host's credit (up to [`FLOOD_BYTES`]).
    IgnoresFlowControl,
    /// Starts it, then sends a frame header announcing 4 GiB - 1.
    OversizedFrame,
}

/// How much a flow-control-ignoring agent tries to send.
const FLOOD_BYTES: u64 = 1 << 30;

#[derive(Clone, Debug)]
struct Options {
    home: NovaHome,
    faults: Faults,
}

#[derive(Debug)]
struct Double {
    options: Options,
}

#[derive(Debug)]
struct DoubleVm {
    agent_socket: PathBuf,
    pause_hangs: bool,
}

/// A fake agent on `listener`: answers the handshake, then reads requests
/// forever without answering any (a wedged guest), unless `faults` make it
/// break the protocol at once or answer an exec as a [`Rogue`].
async fn wedged_agent(listener: UnixListener, faults: Faults) {
    let Ok((stream, _)) = listener.accept().await else {
        return;
    };
    let (read, mut write) = stream.into_split();
    let mut reader = FrameReader::new(read);
    let Ok(Some(_hello)) = reader.read_message::<Hello>().await else {
        return;
    };
    let welcome = HelloReply::Welcome(HelloInfo {
        protocol_version: PROTOCOL_VERSION,
        agent_version: "wedged".into(),
        kernel_release: "6.1.0".into(),
        agent_started_us: 1,
        agent_ready_us: 2,
        pid1: true,
        hostname: "double".into(),
    });
    if send(&mut write, &welcome).await.is_err() {
        return;
    }
    if faults.agent_breaks_protocol {
        let bogus = AgentMessage::Data {
            id: 999,
            stream: StreamKind::Stdout,
            data: bytes::Bytes::from_static(b"unasked"),
        };
        let _ = send(&mut write, &bogus).await;
    }
    while let Ok(Some(msg)) = reader.read_message::<ClientMessage>().await {
        let (
            Some(rogue),
            ClientMessage::Request {
                id,
                request: Request::Exec(_),
            },
        ) = (faults.rogue, msg)
        else {
            continue;
        };
        let started = AgentMessage::Started {
            id,
            pid: 42,
            exec_id: 1,
        };
        if send(&mut write, &started).await.is_err() {
            return;
        }
        match rogue {
            Rogue::IgnoresFlowControl => {
                let chunk = bytes::Bytes::from(vec![b'x'; 64 << 10]);
                while faults.rogue_sent.load(Ordering::SeqCst) < FLOOD_BYTES {
                    let data = AgentMessage::Data {
                        id,
                        stream: StreamKind::Stdout,
                        data: chunk.clone(),
                    };
                    match send(&mut write, &data).await {
                        Ok(n) => faults.rogue_sent.fetch_add(n as u64, Ordering::SeqCst),
                        Err(_) => break,
                    };
                }
            }
            Rogue::OversizedFrame => {
                let _ = write.write_all(&u32::MAX.to_be_bytes()).await;
                let _ = write.write_all(&[0xab; 4096]).await;
            }
        }
        // Whatever the host does next, this agent says nothing more.
        while let Ok(Some(_)) = reader.read_message::<ClientMessage>().await {}
        return;
    }
}

/// Writes `msg` as one frame; the bytes written.
async fn send(
    write: &mut tokio::net::unix::OwnedWriteHalf,
    msg: &impl serde::Serialize,
) -> std::io::Result<usize> {
    let bytes = nova_protocol::frame::encode(msg).map_err(std::io::Error::other)?;
    write.write_all(&bytes).await?;
    Ok(bytes.len())
}

impl Backend for Double {
    type Options = Options;
    type Vm = DoubleVm;

    fn from_options(options: Options) -> Self {
        Self { options }
    }

    fn options(&self) -> &Options {
        &self.options
    }

    fn kind(&self) -> HypervisorKind {
        HypervisorKind::Qemu
    }

    fn vmm_version(&self) -> String {
        "double".into()
    }

    fn home(&self) -> &NovaHome {
        &self.options.home
    }

    fn scratch_size_mb(&self) -> u64 {
        16
    }

    async fn start(
        &self,
        start: VmStart<'_>,
        launch: &mut Launch<'_>,
    ) -> Result<DoubleVm, CreateSandboxError> {
        let paths = start.paths;
        let agent_socket = paths.vsock_socket();
        let listener = UnixListener::bind(&agent_socket).unwrap();
        tokio::spawn(wedged_agent(listener, self.options.faults.clone()));
        launch.spawn(&VmmCommand {
            program: "sleep".into(),
            args: vec!["600".into()],
            cwd: None,
            stdout: paths.console_log(),
            stderr: paths.vmm_log(),
            log_cap: 4096,
            fds: Vec::new(),
        })?;
        let json = std::fs::read(paths.state_json()).unwrap();
        let state: serde_json::Value = serde_json::from_slice(&json).unwrap();
        if state["vmm_pid"].as_u64().is_some() && state["state"] == "creating" {
            self.options
                .faults
                .saw_state_at_spawn
                .store(true, Ordering::SeqCst);
        }
        launch.vmm_ready();
        Ok(DoubleVm {
            agent_socket,
            pause_hangs: self.options.faults.pause_hangs,
        })
    }
}

impl Vm for DoubleVm {
    fn agent_connector(&self) -> AgentConnector {
        let socket = self.agent_socket.clone();
        Box::new(move || {
            let socket = socket.clone();
            Box::pin(async move {
                UnixStream::connect(&socket)
                    .await
                    .map_err(ConnectError::from)
            })
        })
    }

    async fn pause(&mut self) -> Result<(), BoxError> {
        if self.pause_hangs {
            std::future::pending::<()>().await;
        }
        Ok(())
    }

    async fn resume(&mut self) -> Result<(), BoxError> {
        Ok(())
    }

    async fn counters(&mut self) -> VmmCounters {
        VmmCounters::default()
    }

    async fn request_power_off(&mut self) -> Result<(), BoxError> {
        Ok(())
    }

    async fn snapshot(&mut self, _dir: &Path, _kind: SnapshotKind) -> Result<(), SnapshotError> {
        Err(SnapshotError::Unsupported {
            vmm: HypervisorKind::Qemu,
            reason: "double".into(),
        })
    }

    fn kernel_cmdline(&self) -> String {
        String::new()
    }
}

const TIMEOUTS: Timeouts = Timeouts {
    vmm: Duration::from_millis(300),
    agent: Duration::from_millis(300),
    graceful_stop: Duration::from_millis(500),
    snapshot: Duration::from_secs(1),
    kill: Duration::from_secs(5),
};

struct Setup {
    _home: tempfile::TempDir,
    home: NovaHome,
    provider: Provider<Double>,
    faults: Faults,
}

fn setup(faults: Faults) -> Setup {
    let dir = tempfile::Builder::new()
        .prefix("nova-rt-")
        .tempdir_in("/tmp")
        .unwrap();
    let home = NovaHome::at(dir.path());
    let template = home.template_dir("t");
    std::fs::create_dir_all(&template).unwrap();
    std::fs::write(template.join("vmlinux"), b"kernel").unwrap();
    std::fs::write(template.join("rootfs.ext4"), b"rootfs").unwrap();
    let manifest = TemplateManifest {
        name: "t".into(),
        template_id: "t".into(),
        os_type: "linux".into(),
        memory_mb: 256,
        vcpus: 1,
        boot_time_ms: 0,
        disk_size_gb: 0.0,
        kernel_version: "6.1".into(),
        required_files: vec!["vmlinux".into(), "rootfs.ext4".into()],
        packages: vec![],
        arch: Default::default(),
        exec_defaults: Default::default(),
    };
    TemplateManager::write_manifest(&template, &manifest).unwrap();
    let provider = Provider::<Double>::with_timeouts(
        Options {
            home: home.clone(),
            faults: faults.clone(),
        },
        TIMEOUTS,
    );
    Setup {
        _home: dir,
        home,
        provider,
        faults,
    }
}

fn config() -> SandboxConfig {
    SandboxConfig::builder()
        .template_id("t")
        .memory_mb(256)
        .vcpus(1)
        .read_only_rootfs(true)
        .boot_timeout_ms(10_000)
        .build()
        .unwrap()
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z"))
}

async fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if condition() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    condition()
}

fn no_sandbox_dirs(home: &NovaHome) -> bool {
    std::fs::read_dir(home.sandboxes_dir()).map_or(true, |mut d| d.next().is_none())
}

#[tokio::test]
async fn graceful_stop_with_an_agent_that_never_answers_shutdown_is_bounded() {
    let s = setup(Faults::default());
    let sandbox = s.provider.create_sandbox(config()).await.unwrap();
    assert!(
        s.faults.saw_state_at_spawn.load(Ordering::SeqCst),
        "state.json named the VMM right after the spawn, before the boot finished"
    );
    let pid = sandbox.info().vmm_pid.unwrap();
    assert!(alive(pid));
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(30), sandbox.stop(false))
        .await
        .expect("a graceful stop is bounded even when the agent never answers")
        .unwrap();
    println!(
        "graceful stop with a wedged agent took {:?}",
        started.elapsed()
    );
    assert!(!alive(pid), "the VMM was killed");
    assert_eq!(
        s.provider.get(sandbox.id()).await.unwrap().state,
        SandboxState::Stopped
    );
    assert!(no_sandbox_dirs(&s.home));
}

#[tokio::test]
async fn a_vmm_that_never_answers_pause_fails_the_sandbox_and_is_released() {
    let s = setup(Faults {
        pause_hangs: true,
        ..Faults::default()
    });
    let sandbox = s.provider.create_sandbox(config()).await.unwrap();
    let pid = sandbox.info().vmm_pid.unwrap();
    let e = tokio::time::timeout(Duration::from_secs(30), sandbox.pause())
        .await
        .expect("pause is bounded")
        .unwrap_err();
    assert!(matches!(e, SandboxError::Vmm { .. }), "{e}");
    let info = s.provider.get(sandbox.id()).await.unwrap();
    assert_eq!(info.state, SandboxState::Failed);
    let failure = info.failure.unwrap();
    assert!(
        failure.contains("did not pause the guest within"),
        "{failure}"
    );
    assert!(!alive(pid), "a wedged VMM is killed");
    assert!(no_sandbox_dirs(&s.home));
    // A failed sandbox can still be stopped; it then says stopped.
    sandbox.stop(false).await.unwrap();
    assert_eq!(
        s.provider.get(sandbox.id()).await.unwrap().state,
        SandboxState::Stopped
    );
}

#[tokio::test]
async fn a_vmm_that_exits_on_its_own_fails_the_sandbox_with_the_reason() {
    let s = setup(Faults::default());
    let sandbox = s.provider.create_sandbox(config()).await.unwrap();
    let pid = sandbox.info().vmm_pid.unwrap();
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid as i32).unwrap(),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    let provider = s.provider.clone();
    let id = sandbox.id().clone();
    let mut failed = None;
    for _ in 0..500 {
        let info = provider.get(&id).await.unwrap();
        if info.state == SandboxState::Failed {
            failed = Some(info);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let info = failed.expect("the sandbox turned failed");
    assert!(
        info.failure
            .as_deref()
            .unwrap()
            .contains("exited on its own (killed by signal 15)"),
        "{:?}",
        info.failure
    );
    assert!(no_sandbox_dirs(&s.home), "its files are released at once");
    let e = sandbox.execute_command("true").await.unwrap_err();
    assert!(e.to_string().contains("failed"), "{e}");
}

#[tokio::test]
async fn a_cancelled_stop_leaks_nothing() {
    let s = setup(Faults::default());
    let sandbox = s.provider.create_sandbox(config()).await.unwrap();
    let pid = sandbox.info().vmm_pid.unwrap();
    // The caller gives up long before the graceful stop's bound.
    let cancelled = tokio::time::timeout(Duration::from_millis(50), sandbox.stop(false)).await;
    assert!(cancelled.is_err(), "the stop was still running");
    let provider = s.provider.clone();
    let id = sandbox.id().clone();
    let mut stopped = false;
    for _ in 0..500 {
        if provider.get(&id).await.unwrap().state == SandboxState::Stopped {
            stopped = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(stopped, "the task finished the stop on its own");
    assert!(wait_until(Duration::from_secs(5), || !alive(pid)).await);
    assert!(no_sandbox_dirs(&s.home));
    assert_eq!(provider.list().await.len(), 1, "remembered as stopped");
}

#[tokio::test]
async fn dropping_the_provider_releases_every_sandbox() {
    let s = setup(Faults::default());
    let a = s.provider.create_sandbox(config()).await.unwrap();
    let b = s.provider.create_sandbox(config()).await.unwrap();
    let pids = [a.info().vmm_pid.unwrap(), b.info().vmm_pid.unwrap()];
    drop((a, b));
    drop(s.provider);
    assert!(wait_until(Duration::from_secs(10), || pids.iter().all(|p| !alive(*p))).await);
    assert!(wait_until(Duration::from_secs(10), || no_sandbox_dirs(&s.home)).await);
}

#[tokio::test]
async fn a_published_port_is_refused_until_networking_exists() {
    let s = setup(Faults::default());
    let mut c = config();
    c.host_port = Some(8080);
    let e = s.provider.create_sandbox(c).await.unwrap_err();
    assert!(matches!(e, CreateSandboxError::Unsupported { .. }), "{e}");
    assert!(e.to_string().contains("host_port = 8080"), "{e}");
    assert!(no_sandbox_dirs(&s.home));
}

#[tokio::test]
async fn an_agent_that_breaks_the_protocol_fails_its_sandbox() {
    let s = setup(Faults {
        agent_breaks_protocol: true,
        ..Faults::default()
    });
    // The violation may land during the boot (then the create fails) or
    // right after it (then the sandbox turns failed); either way nothing
    // stays behind.
    match s.provider.create_sandbox(config()).await {
        Err(e) => println!("refused at boot: {e}"),
        Ok(sandbox) => {
            let pid = sandbox.info().vmm_pid.unwrap();
            let provider = s.provider.clone();
            let id = sandbox.id().clone();
            let mut failure = None;
            for _ in 0..500 {
                let info = provider.get(&id).await.unwrap();
                if info.state == SandboxState::Failed {
                    failure = info.failure;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let failure = failure.expect("the sandbox turned failed");
            assert!(failure.contains("broke the agent protocol"), "{failure}");
            assert!(!alive(pid));
        }
    }
    assert!(no_sandbox_dirs(&s.home));
}

/// This process's resident set, in KiB.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// A rogue agent's exec, its output not read (so no credit goes back): the
/// sandbox is failed with the protocol violation as its reason, the
/// command's stream ends without an exit status, the host kept what it
/// buffered bounded (its resident set grows by far less than what the
/// agent tried to send), and nothing of the sandbox is left.
async fn a_rogue_agent_fails_its_sandbox(rogue: Rogue) -> String {
    let s = setup(Faults {
        rogue: Some(rogue),
        ..Faults::default()
    });
    let sandbox = s.provider.create_sandbox(config()).await.unwrap();
    let pid = sandbox.info().vmm_pid.unwrap();
    let rss_before = rss_kib();
    let mut stream = sandbox.exec_stream("cat /dev/zero").await.unwrap();
    let id = sandbox.id().clone();
    let provider = s.provider.clone();
    let mut info = provider.get(&id).await.unwrap();
    for _ in 0..3000 {
        if info.state == SandboxState::Failed {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        info = provider.get(&id).await.unwrap();
    }
    assert_eq!(info.state, SandboxState::Failed, "{info:?}");
    let rss_after = rss_kib();
    let sent = s.faults.rogue_sent.load(Ordering::SeqCst);
    eprintln!(
        "{rogue:?}: the agent got {sent} bytes out; host RSS {rss_before} -> {rss_after} KiB"
    );
    assert!(
        rss_after.saturating_sub(rss_before) < 64 << 10,
        "host memory grew by {} KiB",
        rss_after - rss_before
    );
    let mut exited = false;
    let drained = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(event) = stream.next().await {
            exited |= matches!(event, nova_core::exec::ExecEvent::Exited(_));
        }
    })
    .await;
    assert!(drained.is_ok(), "the command's stream never ended");
    assert!(!exited, "a cut-off command has no exit status");
    assert!(wait_until(Duration::from_secs(5), || !alive(pid)).await);
    assert!(no_sandbox_dirs(&s.home));
    let e = sandbox.execute_command("true").await.unwrap_err();
    assert!(
        matches!(e, ExecError::NotRunning(SandboxState::Failed)),
        "{e:?}"
    );
    info.failure.unwrap()
}

#[tokio::test]
async fn an_agent_that_ignores_flow_control_is_cut_off_and_fails_its_sandbox() {
    let failure = a_rogue_agent_fails_its_sandbox(Rogue::IgnoresFlowControl).await;
    assert!(failure.contains("broke the agent protocol"), "{failure}");
    assert!(failure.contains("over the window"), "{failure}");
}

#[tokio::test]
async fn an_agent_that_sends_an_oversized_frame_fails_its_sandbox() {
    let failure = a_rogue_agent_fails_its_sandbox(Rogue::OversizedFrame).await;
    assert!(failure.contains("broke the agent protocol"), "{failure}");
    assert!(failure.contains("over the maximum"), "{failure}");
}
