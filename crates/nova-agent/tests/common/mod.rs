//! Test harness: runs `nova-agent` as a normal process on a Unix socket in a
//! private temporary directory and connects the real client to it.
//!
//! The agent runs in its own process group; dropping [`TestAgent`] sends it
//! SIGTERM (it then kills the process groups of its commands) and, if it is
//! still there shortly after, SIGKILLs the group.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nova_protocol::HelloInfo;
use nova_protocol::client::AgentClient;

/// Polls `cond` every 10 ms until it holds or `timeout` passes.
pub async fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A running agent owned by the test.
pub struct TestAgent {
    child: Child,
    dir: tempfile::TempDir,
    socket: PathBuf,
}

impl TestAgent {
    /// Starts the agent and waits until its socket exists.
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let log = std::fs::File::create(dir.path().join("agent.log")).unwrap();
        std::fs::create_dir(dir.path().join("etc")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_nova-agent"))
            .arg("--listen")
            .arg(format!("unix:{}", socket.display()))
            .arg("--etc")
            .arg(dir.path().join("etc"))
            .env("NOVA_AGENT_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("spawn nova-agent");
        let agent = Self { child, dir, socket };
        let socket = agent.socket.clone();
        assert!(
            wait_until(Duration::from_secs(10), || socket.exists()).await,
            "agent did not create its socket; log:\n{}",
            agent.log()
        );
        agent
    }

    /// Connects and completes the handshake.
    pub async fn connect(&self) -> (AgentClient, HelloInfo) {
        let stream = self.raw().await;
        AgentClient::connect(stream, Duration::from_secs(10))
            .await
            .expect("handshake")
    }

    /// A raw connection, before any handshake.
    pub async fn raw(&self) -> tokio::net::UnixStream {
        // The socket file appears at bind(), a moment before listen(); a
        // connect in between is refused.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match tokio::net::UnixStream::connect(&self.socket).await {
                Ok(stream) => return stream,
                Err(e)
                    if e.kind() == std::io::ErrorKind::ConnectionRefused
                        && Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e) => panic!("connect: {e}"),
            }
        }
    }

    /// The agent's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A scratch directory for the test.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The directory the agent writes its identity files into on a
    /// refresh (`--etc`), in place of `/etc`.
    pub fn etc(&self) -> PathBuf {
        self.dir.path().join("etc")
    }

    /// Whether the agent process is still running.
    pub fn is_alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Exit status once it exited.
    pub fn try_exit_code(&mut self) -> Option<Option<i32>> {
        self.child.try_wait().ok().flatten().map(|s| s.code())
    }

    /// Peak resident memory of the agent (`VmHWM`), in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        status_field(self.pid(), "VmHWM:").expect("VmHWM of the agent")
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    /// Fails if the agent logged a panic. A panic in one of its tasks does
    /// not end a test build of the agent (tokio catches it), but the guest
    /// build aborts on panic: as PID 1, that is a kernel panic.
    pub fn assert_no_panic(&self) {
        let log = self.log();
        assert!(!log.contains("panicked"), "the agent panicked; log:\n{log}");
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        let pid = self.child.id() as i32;
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{pid}")])
            .status();
        let _ = self.child.wait();
    }
}

/// A `kB` field of `/proc/PID/status`.
pub fn status_field(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Whether `pid` is gone (or only a zombie nobody reaped yet).
pub fn process_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state == "Z" || state == "X"),
    }
}

/// Deterministic pseudo-random bytes (xorshift64*).
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}
