//! Injected faults on real microVMs under QEMU: the VMM killed with
//! `SIGKILL` while a command runs, a fork bomb and an out-of-memory guest,
//! and a `$NOVA_HOME` with no space left during a create.
//!
//! What each shows: a failure is answered promptly with its reason (never a
//! hang), the sandbox ends `failed` or keeps answering, and nothing of it is
//! left on the host. Bounds in these tests are hang guards (generous, for a
//! loaded 2-core TCG host), not performance assertions.

#![allow(clippy::unwrap_used, reason = "test code")]

mod common;

use std::path::Path;
use std::time::Duration;

use common::{config, process_exists, setup, wait_until};
use nova_core::error::{CreateSandboxError, ExecError};
use nova_core::exec::{ExecRequest, ExecState, ExitStatus};
use nova_core::hypervisor::Hypervisor;
use nova_core::state::SandboxState;
use nova_net::testing;

/// How long a fault may take to be answered before the test calls it a hang.
const HANG: Duration = Duration::from_secs(30);

/// What is left on the host of sandbox `id`: its namespace, host veth and
/// nft table (empty without networking).
async fn network_leftovers(id: &str) -> Vec<String> {
    let mut left = Vec::new();
    let name = format!("{}{id}", nova_net::NAME_PREFIX);
    if testing::namespaces().unwrap_or_default().contains(&name) {
        left.push(format!("namespace {name}"));
    }
    let veth = nova_net::host_veth_name(id);
    if let Ok(links) = testing::links_with_addresses(None).await
        && links.iter().any(|(l, _)| *l == veth)
    {
        left.push(format!("veth {veth}"));
    }
    if testing::host_nft_tables()
        .unwrap_or_default()
        .iter()
        .any(|t| t.contains(&name))
    {
        left.push(format!("nft table {name}"));
    }
    left
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vmm_killed_during_an_exec_fails_it_with_the_reason_and_leaves_nothing() {
    let test = "a_vmm_killed_during_an_exec";
    let Some(t) = setup(test, &["minimal"]) else {
        return;
    };
    let mut cfg = config("minimal");
    // With networking where the host allows it, so its objects are checked
    // too; without, the rest still holds.
    match nova_runtime::network::unsupported_reason() {
        None => cfg.enable_network = true,
        Some(why) => eprintln!("{test}: without networking ({why})"),
    }
    let sandbox = t.hypervisor.create_sandbox(cfg).await.unwrap();
    let id = sandbox.id().as_str().to_owned();
    let pid = sandbox.info().vmm_pid.unwrap();
    let dir = sandbox.info().dir.clone();

    let exec = tokio::spawn({
        let hypervisor = sandbox.hypervisor().clone();
        let id = sandbox.id().clone();
        async move {
            hypervisor
                .execute_command(&id, ExecRequest::shell("sleep 60; echo never"))
                .await
        }
    });
    // The command runs once the agent lists it.
    let mut running = false;
    for _ in 0..1500 {
        let execs = sandbox.hypervisor().list_execs(sandbox.id()).await.unwrap();
        if execs.iter().any(|e| e.state == ExecState::Running) {
            running = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(running, "the command never started");
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid as i32).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    let killed = std::time::Instant::now();

    let err = tokio::time::timeout(HANG, exec)
        .await
        .expect("the exec hung after its VM was killed")
        .unwrap()
        .expect_err("an exec whose VM died cannot succeed");
    eprintln!(
        "{test}: the exec failed {:?} after the kill: {err}",
        killed.elapsed()
    );
    let text = err.to_string();
    assert!(matches!(err, ExecError::VmExited { .. }), "{err:?}");
    assert!(text.contains("the VM exited"), "{text}");
    assert!(text.contains("killed by SIGKILL"), "{text}");

    let info = sandbox.refresh().await.unwrap();
    assert_eq!(info.state, SandboxState::Failed, "{info:?}");
    assert!(
        info.failure
            .as_deref()
            .is_some_and(|f| f.contains("killed by SIGKILL")),
        "{info:?}"
    );
    assert!(wait_until(Duration::from_secs(10), || !process_exists(pid)));
    assert!(!dir.exists(), "{} is still there", dir.display());
    assert!(t.sandbox_dirs().is_empty(), "{:?}", t.sandbox_dirs());
    assert_eq!(network_leftovers(&id).await, Vec::<String>::new());
    // A later exec is refused at once, naming the state.
    let e = sandbox.execute_command("true").await.unwrap_err();
    assert!(
        matches!(e, ExecError::NotRunning(SandboxState::Failed)),
        "{e:?}"
    );
    sandbox.stop(true).await.unwrap();
}

/// The guest's answer to `echo alive` after a fault: it answers, or the
/// sandbox is failed with a reason, or (a guest still overloaded) the host
/// gives up on the command past its timeout and says so. Never a hang.
async fn answers_or_failed(sandbox: &nova_core::sandbox::Sandbox, fault: &str) {
    let asked = std::time::Instant::now();
    let next = tokio::time::timeout(
        HANG * 2,
        sandbox.execute_command(ExecRequest::shell("echo alive").timeout(Duration::from_secs(10))),
    )
    .await
    .unwrap_or_else(|_| panic!("after {fault}, the next exec hung"));
    match next {
        Ok(out) => {
            assert_eq!(out.stdout_lossy(), "alive\n", "after {fault}: {out:?}");
            eprintln!(
                "after {fault}: the next exec answered in {:?}",
                asked.elapsed()
            );
        }
        Err(e) if error_chain(&e).contains("overloaded") => {
            eprintln!(
                "after {fault}: the guest is still overloaded: {}",
                error_chain(&e)
            );
        }
        Err(e) => {
            let info = sandbox.refresh().await.unwrap();
            assert_eq!(info.state, SandboxState::Failed, "after {fault}: {e}");
            assert!(info.failure.is_some(), "after {fault}: {info:?}");
            eprintln!("after {fault}: failed: {:?}", info.failure);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_bomb_and_an_oom_in_the_guest_leave_it_answering() {
    let Some(t) = setup("a_fork_bomb_and_an_oom_in_the_guest", &["minimal"]) else {
        return;
    };
    let sandbox = t
        .hypervisor
        .create_sandbox(config("minimal"))
        .await
        .unwrap();

    // A fork bomb, stopped by the exec's own timeout (the agent kills the
    // command's process group).
    let bomb = tokio::time::timeout(
        HANG * 2,
        sandbox.execute_command(
            ExecRequest::shell("bomb() { bomb | bomb & }; bomb; sleep 60")
                .timeout(Duration::from_secs(5)),
        ),
    )
    .await
    .expect("the fork bomb's exec hung past its timeout");
    // The guest ends it (timed out), or, too overloaded to, the host gives
    // up on it past its timeout and says why.
    match &bomb {
        Ok(out) => assert_eq!(out.status, ExitStatus::TimedOut, "{out:?}"),
        Err(e) => {
            let text = error_chain(e);
            assert!(text.contains("overloaded"), "{text}");
            eprintln!("fork bomb: {text}");
        }
    }
    answers_or_failed(&sandbox, "a fork bomb").await;

    // More memory than the guest has (256 MiB), touched page by page by
    // four readers of 100 MiB each (one allocation that large is refused
    // at once): the kernel's OOM killer picks commands, the agent (PID 1)
    // stays.
    let oom = tokio::time::timeout(
        HANG * 2,
        sandbox.execute_command(
            ExecRequest::shell(
                "for i in 1 2 3 4; do dd if=/dev/zero of=/dev/null bs=100M count=1 & done; \
                 wait; dmesg | grep -ci 'out of memory'",
            )
            .timeout(Duration::from_secs(60)),
        ),
    )
    .await
    .expect("the OOM's exec hung");
    match &oom {
        Ok(out) => {
            eprintln!(
                "oom: {:?} {} {}",
                out.status,
                out.stdout_lossy(),
                out.stderr_lossy()
            );
            assert_ne!(out.stdout_lossy().trim(), "0", "no OOM happened: {out:?}");
        }
        Err(e) => eprintln!("oom: {e}"),
    }
    answers_or_failed(&sandbox, "an out-of-memory command").await;

    let pid = sandbox.info().vmm_pid.unwrap();
    sandbox.stop(true).await.unwrap();
    assert!(!process_exists(pid));
    assert!(t.sandbox_dirs().is_empty(), "{:?}", t.sandbox_dirs());
}

/// A tmpfs of `size` mounted at `at`, unmounted (lazily) on drop.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> std::io::Result<Self> {
        let status = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ])
            .arg(at)
            .status()?;
        if status.success() {
            Ok(Self(at.to_owned()))
        } else {
            Err(std::io::Error::other(format!("mount tmpfs: {status}")))
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Fills the filesystem under `dir` until a write fails with ENOSPC.
fn fill(dir: &Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(dir.join("filler")).unwrap();
    let block = vec![0xa5u8; 1 << 16];
    loop {
        match f.write_all(&block) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc_enospc()) => break,
            Err(e) => panic!("filling {}: {e}", dir.display()),
        }
    }
    let _ = f.sync_all();
}

fn libc_enospc() -> i32 {
    rustix::io::Errno::NOSPC.raw_os_error()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_nova_home_fails_the_create_clearly_and_leaves_nothing() {
    let test = "a_full_nova_home_fails_the_create";
    if !rustix::process::geteuid().is_root() {
        eprintln!("SKIP {test}: mounting a small tmpfs needs root");
        return;
    }
    let Some(t) = setup(test, &["minimal"]) else {
        return;
    };
    let home = t.home();
    let sandboxes = home.sandboxes_dir();
    std::fs::create_dir_all(&sandboxes).unwrap();
    let _tmpfs = Tmpfs::mount(&sandboxes, "8m").unwrap();
    fill(&sandboxes);

    let err = tokio::time::timeout(HANG, t.hypervisor.create_sandbox(config("minimal")))
        .await
        .expect("a create on a full disk hung")
        .expect_err("a create on a full disk cannot succeed");
    let text = error_chain(&err);
    eprintln!("{test}: {text}");
    assert!(
        text.contains("No space left on device") || text.contains("no space"),
        "{text}"
    );
    assert!(
        text.contains("free space there"),
        "the error says what to do: {text}"
    );
    assert!(
        !matches!(err, CreateSandboxError::Config(_)),
        "a host fault is not a config error: {err:?}"
    );
    // Nothing half-written: no sandbox directory (the filler aside), no
    // VMM of this home.
    let left: Vec<_> = std::fs::read_dir(&sandboxes)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n != "filler")
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    assert!(
        no_process_naming(t.dir.path()),
        "a VMM of this home survived"
    );
}

/// `err` and its sources, joined with ": ".
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Whether no process has `dir` on its command line.
fn no_process_naming(dir: &Path) -> bool {
    let needle = dir.to_string_lossy().into_owned();
    std::fs::read_dir("/proc").unwrap().flatten().all(|entry| {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        !String::from_utf8_lossy(&cmdline).contains(&needle)
    })
}
