//! What a `nova run` that dies leaves behind. One stopped with SIGTERM or
//! Ctrl-C stops its sandbox itself. One killed with SIGKILL leaves its QEMU
//! running and its sandbox directory behind; the next provider on the same
//! `$NOVA_HOME` must kill that orphan and remove the directory.

// QEMU's, so Linux's.
#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used, reason = "test code")]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use novasandbox::core::NovaHome;
use novasandbox::providers::{QemuHypervisor, QemuOptions};

fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if condition() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    condition()
}

/// A `nova run -- sleep 600` whose sandbox is ready, in a private
/// `$NOVA_HOME` that shares the built templates.
struct RunningNova {
    home: tempfile::TempDir,
    nova: std::process::Child,
    /// The sandbox's QEMU.
    qemu: u32,
    /// The sandbox's directory.
    dir: PathBuf,
}

/// Starts `nova run` and waits until its sandbox is ready; `None` (after a
/// SKIP line) when the minimal template is not built and
/// NOVA_SKIP_VM_TESTS=1.
fn start_nova_run(test: &str) -> Option<RunningNova> {
    let templates = NovaHome::resolve().unwrap().templates_dir();
    if !templates.join("minimal/minimal.json").is_file() {
        if std::env::var_os("NOVA_SKIP_VM_TESTS").is_some_and(|v| v == "1") {
            eprintln!("SKIP {test}: no minimal template (NOVA_SKIP_VM_TESTS=1)");
            return None;
        }
        panic!(
            "the minimal template is not built in {}; run `make images`",
            templates.display()
        );
    }
    let home = tempfile::Builder::new()
        .prefix("nova-run-")
        .tempdir_in("/tmp")
        .unwrap();
    std::os::unix::fs::symlink(&templates, home.path().join("templates")).unwrap();
    let sandboxes = home.path().join("sandboxes");
    let nova = Command::new(env!("CARGO_BIN_EXE_nova"))
        .args([
            "run",
            "--template",
            "minimal",
            "--memory",
            "256",
            "--vcpus",
            "1",
            "--",
            "sleep",
            "600",
        ])
        .env("NOVA_HOME", home.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // state.json is written when QEMU is spawned and again when the
    // sandbox is ready.
    let state = || -> Option<PathBuf> {
        std::fs::read_dir(&sandboxes)
            .ok()?
            .flatten()
            .map(|e| e.path().join("state.json"))
            .find(|p| {
                std::fs::read(p)
                    .ok()
                    .and_then(|json| serde_json::from_slice::<serde_json::Value>(&json).ok())
                    .is_some_and(|info| info["state"] == "running")
            })
    };
    assert!(
        wait_until(Duration::from_secs(90), || state().is_some()),
        "the sandbox never became ready"
    );
    let info: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state().unwrap()).unwrap()).unwrap();
    let qemu = info["vmm_pid"].as_u64().unwrap() as u32;
    let dir = PathBuf::from(info["dir"].as_str().unwrap());
    Some(RunningNova {
        home,
        nova,
        qemu,
        dir,
    })
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn a_killed_nova_run_leaves_an_orphan_that_the_next_provider_cleans() {
    let Some(RunningNova {
        home,
        mut nova,
        qemu,
        dir,
    }) = start_nova_run("a_killed_nova_run_leaves_an_orphan")
    else {
        return;
    };

    // No unwinding, no cleanup: QEMU is orphaned.
    nova.kill().unwrap();
    nova.wait().unwrap();
    assert!(alive(qemu), "QEMU died with its parent; nothing to clean");

    let mut options = QemuOptions::detect().unwrap();
    options.home = NovaHome::at(home.path());
    let provider = QemuHypervisor::new(options);
    assert!(
        wait_until(Duration::from_secs(10), || !alive(qemu)),
        "the orphaned QEMU {qemu} survived"
    );
    assert!(!dir.exists(), "{} survived", dir.display());

    // Its network (as root, where sandboxes have one) goes before the next
    // create: a published port of its could catch the new one's traffic.
    let id = dir.file_name().unwrap().to_string_lossy().into_owned();
    let netns = Path::new("/run/netns").join(format!("nova-{id}"));
    if !netns.exists() {
        eprintln!("note: the orphan had no network here; its cleanup was not exercised");
        return;
    }
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        use novasandbox::core::{Hypervisor, SandboxConfig};
        let config = SandboxConfig::builder()
            .template_id("minimal")
            .memory_mb(256)
            .vcpus(1)
            .enable_network(false)
            .build()
            .unwrap();
        let sandbox = provider.create_sandbox(config).await.unwrap();
        sandbox.stop(true).await.unwrap();
    });
    assert!(!netns.exists(), "the orphan's network namespace survived");
}

/// `nova run` stopped with SIGTERM (or Ctrl-C) stops its sandbox: exit code
/// 130, no QEMU and no directory left.
#[test]
fn a_terminated_nova_run_stops_its_sandbox() {
    let Some(RunningNova {
        home: _home,
        mut nova,
        qemu,
        dir,
    }) = start_nova_run("a_terminated_nova_run_stops_its_sandbox")
    else {
        return;
    };
    // Give `sleep` a moment to start in the guest, then terminate `nova`.
    std::thread::sleep(Duration::from_millis(500));
    let status = Command::new("kill")
        .args(["-TERM", &nova.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = nova.wait().unwrap();
    assert_eq!(exit.code(), Some(130));
    assert!(!alive(qemu), "QEMU {qemu} survived");
    assert!(
        std::fs::read_dir(dir.parent().unwrap())
            .unwrap()
            .next()
            .is_none(),
        "a sandbox directory survived"
    );
}
