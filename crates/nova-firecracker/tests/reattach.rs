//! A daemon restart loses nothing, with Firecracker (`NOVA_FIRECRACKER_BIN`):
//! a detached provider's owner process is SIGKILLed and a new detached
//! provider re-attaches its sandbox (in the state it was in), or reports it
//! failed when its VMM died meanwhile; a detached provider that is dropped
//! leaves its VM for the next one, and one that is not detached kills its
//! VMs; jailed too, where the host allows a jail (root, a static
//! Firecracker with a `jailer` beside it). The VMM tests boot the test guest of `common/mod.rs` (any KVM); the
//! agent test (a command that outlives its owner) needs hardware KVM and a
//! template: `NOVA_TEST_KVM=1`, `NOVA_TEST_TEMPLATE` (default `minimal`).
//!
//! The owner is the `fc_detached_owner` example of this crate, built by
//! `cargo test` with the tests (with `cargo test --test reattach`, build it
//! first: `cargo build -p nova-firecracker --example fc_detached_owner`).
#![allow(clippy::unwrap_used, clippy::print_stdout, reason = "test code")]

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nova_core::exec::{ExecRequest, ExitStatus};
use nova_core::home::NovaHome;
use nova_core::hypervisor::Hypervisor;
use nova_core::id::SandboxId;
use nova_core::state::SandboxState;
use nova_firecracker::api::InstanceState;
use nova_firecracker::binary::FirecrackerBinary;
use nova_firecracker::jailer::JailerConfig;
use nova_firecracker::{FirecrackerHypervisor, FirecrackerOptions, FirecrackerSandboxes};

/// The owner process; killed (SIGKILL) when dropped.
struct Owner {
    child: Child,
    sandbox: SandboxId,
    exec_id: Option<u64>,
    vmm: u32,
}

impl Drop for Owner {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn owner_binary() -> PathBuf {
    // target/<profile>/deps/<test> -> target/<profile>/examples/<owner>
    let exe = std::env::current_exe().expect("the test's path");
    exe.parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>")
        .join("examples/fc_detached_owner")
}

/// Starts the owner on `home` and waits for it to print what it made.
fn start_owner(home: &Path, fc: &FirecrackerBinary, template: &str, mode: &str) -> Owner {
    let mut child = Command::new(owner_binary())
        .arg(home)
        .arg(fc.path())
        .arg(template)
        .arg(mode)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .process_group(0)
        .spawn()
        .expect("the fc_detached_owner example (built by cargo test)");
    let stdout = child.stdout.take().expect("piped");
    let mut lines = BufReader::new(stdout).lines();
    let mut field = |name: &str| -> String {
        let line = lines
            .next()
            .and_then(Result::ok)
            .unwrap_or_else(|| panic!("the owner printed no {name} line"));
        line.strip_prefix(&format!("{name} "))
            .unwrap_or_else(|| panic!("expected {name}, got {line:?}"))
            .to_owned()
    };
    let sandbox = field("SANDBOX").parse().expect("a sandbox id");
    let exec_id = field("EXEC").parse().ok();
    let vmm = field("VMM").parse().expect("a pid");
    Owner {
        child,
        sandbox,
        exec_id,
        vmm,
    }
}

/// Polls `condition` every 20 ms until it holds or `timeout` passes.
fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A detached provider like the owner's `vmm` mode.
fn detached_vmm_only(home: &Path, fc: FirecrackerBinary) -> FirecrackerHypervisor {
    FirecrackerHypervisor::detached(common::vmm_only_options(home, fc))
}

/// A temporary `NOVA_HOME` (short, for the sockets) with the test guest.
fn test_home() -> tempfile::TempDir {
    let home = tempfile::Builder::new()
        .prefix("fcr")
        .tempdir_in("/tmp")
        .unwrap();
    common::install_test_template(home.path(), "fctest");
    home
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_owners_vm_is_reattached_and_stops_cleanly() {
    let Some(fc) = common::firecracker("a_killed_owners_vm_is_reattached_and_stops_cleanly") else {
        return;
    };
    let home = test_home();
    let owner = start_owner(home.path(), &fc, "fctest", "vmm");
    let (id, vmm) = (owner.sandbox.clone(), owner.vmm);
    let dir = NovaHome::at(home.path()).sandbox(&id).dir().to_owned();
    // The owner dies without unwinding.
    drop(owner);
    assert!(common::alive(vmm), "the VMM died with its detached owner");
    for file in ["api.sock", "vsock.sock", "state.json", "firecracker.json"] {
        assert!(dir.join(file).exists(), "{file} is gone with the owner");
    }

    let provider = detached_vmm_only(home.path(), fc);
    let report = provider.reattach().await.unwrap();
    assert_eq!(report.adopted, vec![id.clone()], "{report:?}");
    assert!(report.failed.is_empty(), "{report:?}");
    let info = provider.get(&id).await.unwrap();
    assert_eq!(info.state, SandboxState::Running);
    assert_eq!(info.vmm_pid, Some(vmm));
    assert!(provider.list().await.iter().any(|i| i.id == id), "listed");
    assert_eq!(
        provider.instance_info(&id).await.unwrap().state,
        InstanceState::Running
    );
    // Its metrics file is read again from where the VMM writes it.
    let metrics = provider.vmm_metrics(&id).await.unwrap();
    assert!(metrics.flushes >= 1, "{metrics:?}");
    provider.pause_sandbox(&id).await.unwrap();
    assert_eq!(
        provider.instance_info(&id).await.unwrap().state,
        InstanceState::Paused
    );
    provider.resume_sandbox(&id).await.unwrap();

    // A graceful stop: Ctrl+Alt+Del, the test guest resets, Firecracker
    // exits; nothing is left.
    provider.stop_sandbox(&id, false).await.unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || !common::alive(vmm)),
        "the VMM {vmm} outlived stop"
    );
    assert!(
        common::leftovers(home.path()).is_empty(),
        "{:?}",
        common::leftovers(home.path())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_vm_is_reattached_paused() {
    let Some(fc) = common::firecracker("a_paused_vm_is_reattached_paused") else {
        return;
    };
    let home = test_home();
    let owner = start_owner(home.path(), &fc, "fctest", "vmm-paused");
    let (id, vmm) = (owner.sandbox.clone(), owner.vmm);
    drop(owner);

    let provider = detached_vmm_only(home.path(), fc);
    let report = provider.reattach().await.unwrap();
    assert_eq!(report.adopted, vec![id.clone()], "{report:?}");
    assert_eq!(provider.get(&id).await.unwrap().state, SandboxState::Paused);
    assert_eq!(
        provider.instance_info(&id).await.unwrap().state,
        InstanceState::Paused
    );
    provider.resume_sandbox(&id).await.unwrap();
    assert_eq!(
        provider.instance_info(&id).await.unwrap().state,
        InstanceState::Running
    );
    provider.stop_sandbox(&id, true).await.unwrap();
    assert!(wait_until(Duration::from_secs(10), || !common::alive(vmm)));
    assert!(common::leftovers(home.path()).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_whose_vmm_died_with_no_owner_is_reported_failed() {
    let Some(fc) = common::firecracker("a_vm_whose_vmm_died_with_no_owner_is_reported_failed")
    else {
        return;
    };
    let home = test_home();
    let owner = start_owner(home.path(), &fc, "fctest", "vmm");
    let (id, vmm) = (owner.sandbox.clone(), owner.vmm);
    drop(owner);
    // The VMM dies too while nobody owns it.
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(vmm as i32).expect("a pid"),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    assert!(wait_until(Duration::from_secs(10), || !common::alive(vmm)));

    let provider = detached_vmm_only(home.path(), fc);
    let report = provider.reattach().await.unwrap();
    assert!(report.adopted.is_empty(), "{report:?}");
    assert_eq!(report.failed.len(), 1, "{report:?}");
    assert_eq!(report.failed[0].id, id);
    assert!(
        report.failed[0].reason.contains("exited"),
        "{}",
        report.failed[0].reason
    );
    let info = provider.get(&id).await.unwrap();
    assert_eq!(info.state, SandboxState::Failed);
    assert_eq!(
        info.failure.as_deref(),
        Some(report.failed[0].reason.as_str())
    );
    assert!(common::leftovers(home.path()).is_empty());
}

/// Dropping a detached provider (not killing its process) leaves the VM,
/// its directory and its sockets in place, and the next provider takes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_detached_provider_leaves_its_vm_for_the_next() {
    let Some(fc) = common::firecracker("a_dropped_detached_provider_leaves_its_vm_for_the_next")
    else {
        return;
    };
    let home = test_home();
    let provider = detached_vmm_only(home.path(), fc.clone());
    let sandbox = provider
        .create_sandbox(common_config("fctest"))
        .await
        .unwrap();
    let id = sandbox.id().clone();
    let vmm = sandbox.info().vmm_pid.unwrap();
    let dir = sandbox.info().dir.clone();
    drop(sandbox);
    drop(provider);
    // The sandbox's task lets go of the directory's lock once it left.
    assert!(
        wait_until(Duration::from_secs(10), || {
            nova_runtime::dir::try_lock(&dir).is_ok_and(|lock| lock.is_some())
        }),
        "the dropped provider still holds the sandbox"
    );
    assert!(
        common::alive(vmm),
        "the VMM died with its detached provider"
    );
    for file in ["api.sock", "vsock.sock", "state.json"] {
        assert!(dir.join(file).exists(), "{file} is gone with the provider");
    }

    let provider = detached_vmm_only(home.path(), fc);
    let report = provider.reattach().await.unwrap();
    assert_eq!(report.adopted, vec![id.clone()], "{report:?}");
    assert_eq!(
        provider.instance_info(&id).await.unwrap().state,
        InstanceState::Running
    );
    provider.stop_sandbox(&id, false).await.unwrap();
    assert!(wait_until(Duration::from_secs(10), || !common::alive(vmm)));
    assert!(common::leftovers(home.path()).is_empty());
}

/// A provider that is not detached still kills its VMs when dropped, and
/// refuses to re-attach.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_that_is_not_detached_kills_its_vms_on_drop() {
    let Some(fc) = common::firecracker("a_provider_that_is_not_detached_kills_its_vms_on_drop")
    else {
        return;
    };
    let home = test_home();
    let provider = common::vmm_only(home.path(), fc);
    assert!(provider.reattach().await.is_err());
    let sandbox = provider
        .create_sandbox(common_config("fctest"))
        .await
        .unwrap();
    let vmm = sandbox.info().vmm_pid.unwrap();
    drop(sandbox);
    drop(provider);
    assert!(
        wait_until(Duration::from_secs(10), || !common::alive(vmm)),
        "the VMM {vmm} outlived its provider"
    );
    assert!(wait_until(Duration::from_secs(10), || common::leftovers(
        home.path()
    )
    .is_empty()));
}

/// Whether `fc` can run jailed here; prints SKIP for `test` otherwise.
fn jailable(test: &str, fc: &FirecrackerBinary) -> bool {
    match JailerConfig::for_host(fc.path()) {
        Ok(_) => true,
        Err(reason) => {
            println!("SKIP {test}: Firecracker cannot run jailed here: {reason}");
            eprintln!("SKIP {test}: Firecracker cannot run jailed here: {reason}");
            false
        }
    }
}

/// The jail of sandbox `id` that the owner's `vmm-jailed` mode makes.
fn jail_dir(home: &Path, fc: &FirecrackerBinary, id: &SandboxId) -> PathBuf {
    home.join("jails")
        .join(fc.path().file_name().unwrap())
        .join(id.as_str())
}

/// Through the jailer (a new PID namespace): the recorded PID is
/// Firecracker's, the jail outlives the killed owner, the next provider
/// re-attaches through the jail's API socket, and a stop removes the jail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jailed_vm_is_reattached_and_its_jail_removed_on_stop() {
    let test = "a_jailed_vm_is_reattached_and_its_jail_removed_on_stop";
    let Some(fc) = common::firecracker(test) else {
        return;
    };
    if !jailable(test, &fc) {
        return;
    }
    let home = test_home();
    let owner = start_owner(home.path(), &fc, "fctest", "vmm-jailed");
    let (id, vmm) = (owner.sandbox.clone(), owner.vmm);
    drop(owner);
    let jail = jail_dir(home.path(), &fc, &id);
    assert!(common::alive(vmm), "the jailed VMM died with its owner");
    assert!(
        jail.join("root/api.sock").exists(),
        "the jail went with the owner"
    );
    let exe = std::fs::read_link(format!("/proc/{vmm}/exe")).unwrap();
    assert!(
        exe.to_string_lossy().contains("firecracker"),
        "the recorded PID is not Firecracker's: {}",
        exe.display()
    );

    let mut options = common::vmm_only_options(home.path(), fc);
    options.jailer = None; // the record, not the options, says where the jail is
    let provider = FirecrackerHypervisor::detached(options);
    let report = provider.reattach().await.unwrap();
    assert_eq!(report.adopted, vec![id.clone()], "{report:?}");
    assert_eq!(
        provider.instance_info(&id).await.unwrap().state,
        InstanceState::Running
    );
    provider.stop_sandbox(&id, false).await.unwrap();
    assert!(wait_until(Duration::from_secs(10), || !common::alive(vmm)));
    assert!(!jail.exists(), "the jail outlived stop");
    assert!(common::leftovers(home.path()).is_empty());
}

/// A jailed VM whose VMM died while no one owned it: reported failed, and
/// its jail is removed with its directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_jailed_vm_is_reported_failed_and_its_jail_removed() {
    let test = "a_dead_jailed_vm_is_reported_failed_and_its_jail_removed";
    let Some(fc) = common::firecracker(test) else {
        return;
    };
    if !jailable(test, &fc) {
        return;
    }
    let home = test_home();
    let owner = start_owner(home.path(), &fc, "fctest", "vmm-jailed");
    let (id, vmm) = (owner.sandbox.clone(), owner.vmm);
    drop(owner);
    let jail = jail_dir(home.path(), &fc, &id);
    assert!(jail.exists());
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(vmm as i32).expect("a pid"),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    assert!(wait_until(Duration::from_secs(10), || !common::alive(vmm)));

    let provider = detached_vmm_only(home.path(), fc);
    let report = provider.reattach().await.unwrap();
    assert_eq!(report.failed.len(), 1, "{report:?}");
    assert!(!jail.exists(), "a dead sandbox's jail was left");
    assert!(common::leftovers(home.path()).is_empty());
}

/// With the agent (hardware KVM and a real template): the owner is killed
/// mid-command; the command finishes under the new provider, its exit code
/// and output are read, and a new command runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_owners_command_finishes_after_reattach() {
    let Some(fc) = common::firecracker("a_killed_owners_command_finishes_after_reattach") else {
        return;
    };
    if std::env::var_os("NOVA_TEST_KVM").is_none_or(|v| v != "1") {
        println!("SKIP a_killed_owners_command_finishes_after_reattach: NOVA_TEST_KVM=1 not set");
        return;
    }
    let template = std::env::var("NOVA_TEST_TEMPLATE").unwrap_or_else(|_| "minimal".into());
    let templates = NovaHome::resolve().unwrap().templates_dir();
    let home = tempfile::Builder::new()
        .prefix("fcr")
        .tempdir_in("/tmp")
        .unwrap();
    std::os::unix::fs::symlink(&templates, home.path().join("templates")).unwrap();

    let owner = start_owner(
        home.path(),
        &fc,
        &template,
        "agent:sleep 3; echo done; echo err >&2; exit 7",
    );
    let (id, vmm) = (owner.sandbox.clone(), owner.vmm);
    let exec_id = owner.exec_id.expect("the owner started a command");
    drop(owner);
    assert!(common::alive(vmm), "the VMM died with its detached owner");

    let provider =
        FirecrackerHypervisor::detached(FirecrackerOptions::new(NovaHome::at(home.path()), fc));
    let report = provider.reattach().await.unwrap();
    assert_eq!(report.adopted, vec![id.clone()], "{report:?}");
    assert_eq!(provider.get(&id).await.unwrap().vmm_pid, Some(vmm));

    let execs = provider.list_execs(&id).await.unwrap();
    assert!(execs.iter().any(|e| e.exec_id == exec_id), "{execs:?}");
    let out = provider
        .attach_exec(&id, exec_id)
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert_eq!(out.status, ExitStatus::Code(7), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "done\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");

    let out = provider
        .execute_command(&id, ExecRequest::shell("echo again"))
        .await
        .unwrap();
    assert_eq!(out.stdout, b"again\n");

    provider.stop_sandbox(&id, false).await.unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || !common::alive(vmm)),
        "the VMM {vmm} outlived stop"
    );
    assert!(common::leftovers(home.path()).is_empty());
}

fn common_config(template: &str) -> nova_core::config::SandboxConfig {
    nova_core::config::SandboxConfig::builder()
        .template_id(template)
        .memory_mb(128)
        .vcpus(1)
        .boot_timeout_ms(20_000)
        .enable_network(false)
        .build()
        .unwrap()
}
