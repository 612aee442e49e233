//! A daemon restart loses nothing: a detached provider's owner process is
//! SIGKILLed mid-command, and a new detached provider re-attaches its
//! sandbox (the command finishes and its exit code and output are read),
//! or reports it failed when its VMM died meanwhile. Real guests under
//! QEMU (TCG here).
//!
//! The owner is the `detached_owner` example of this crate, built by
//! `cargo test` with the tests (with `cargo test --test reattach`, build it
//! first: `cargo build -p nova-qemu --example detached_owner`).
#![allow(clippy::unwrap_used, reason = "test code")]

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{process_exists, wait_until};
use nova_core::exec::{ExecRequest, ExitStatus};
use nova_core::hypervisor::Hypervisor;
use nova_core::id::SandboxId;
use nova_core::state::SandboxState;
use nova_qemu::{QemuHypervisor, QemuOptions};

/// The owner process; killed (SIGKILL) when dropped.
struct Owner {
    child: Child,
    sandbox: SandboxId,
    exec_id: u64,
    vmm: u32,
}

impl Drop for Owner {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn owner_binary() -> PathBuf {
    // target/<profile>/deps/<test> -> target/<profile>/examples/detached_owner
    let exe = std::env::current_exe().expect("the test's path");
    exe.parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>")
        .join("examples/detached_owner")
}

/// Starts the owner on `home` and waits for it to print what it made.
fn start_owner(home: &std::path::Path, command: &str) -> Owner {
    start_owner_with(home, command, None)
}

/// [`start_owner`], with `extra` as the owner's fourth argument.
fn start_owner_with(home: &std::path::Path, command: &str, extra: Option<&str>) -> Owner {
    let mut child = Command::new(owner_binary())
        .arg(home)
        .arg("minimal")
        .arg(command)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .process_group(0)
        .spawn()
        .expect("the detached_owner example (built by cargo test)");
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
    let exec_id = field("EXEC").parse().expect("an exec id");
    let vmm = field("VMM").parse().expect("a pid");
    Owner {
        child,
        sandbox,
        exec_id,
        vmm,
    }
}

use std::os::unix::process::CommandExt;

/// Whether `pid` is gone or a zombie (an orphaned VMM is reaped by init).
fn dead(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rfind(')')
            .is_some_and(|i| stat[i + 1..].trim_start().starts_with('Z')),
    }
}

fn detached(test: &common::TestHome) -> QemuHypervisor {
    let options: QemuOptions = test.hypervisor.options().clone();
    QemuHypervisor::detached(options)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_owners_sandbox_is_reattached_and_its_command_finishes() {
    let Some(test) = common::setup("reattach", &["minimal"]) else {
        return;
    };
    let owner = start_owner(test.dir.path(), "sleep 3; echo done; echo err >&2; exit 7");
    let (id, exec_id, vmm) = (owner.sandbox.clone(), owner.exec_id, owner.vmm);
    // The owner dies without unwinding, mid-command.
    drop(owner);
    assert!(process_exists(vmm), "the VMM died with its detached owner");

    let provider = detached(&test);
    let report = provider.reattach().await.unwrap();
    assert_eq!(report.adopted, vec![id.clone()], "{report:?}");
    assert!(report.failed.is_empty(), "{report:?}");
    let info = provider.get(&id).await.unwrap();
    assert_eq!(info.state, SandboxState::Running);
    assert_eq!(info.vmm_pid, Some(vmm));
    assert!(provider.list().await.iter().any(|i| i.id == id), "listed");

    // The command the dead owner started runs on; its end is read here.
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

    // A new command works.
    let out = provider
        .execute_command(&id, ExecRequest::shell("echo again"))
        .await
        .unwrap();
    assert_eq!(out.stdout, b"again\n");

    // Stop removes everything.
    provider.stop_sandbox(&id, false).await.unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || dead(vmm)),
        "the VMM {vmm} outlived stop"
    );
    assert!(test.sandbox_dirs().is_empty(), "{:?}", test.sandbox_dirs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandbox_whose_vmm_died_with_no_owner_is_reported_failed() {
    let Some(test) = common::setup("reattach-dead", &["minimal"]) else {
        return;
    };
    let owner = start_owner(test.dir.path(), "sleep 100");
    let (id, vmm) = (owner.sandbox.clone(), owner.vmm);
    drop(owner);
    // The VMM dies too while nobody owns it.
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(vmm as i32).expect("a pid"),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    assert!(wait_until(Duration::from_secs(10), || dead(vmm)));

    let provider = detached(&test);
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
    assert!(test.sandbox_dirs().is_empty(), "{:?}", test.sandbox_dirs());
}

/// A user-mode sandbox's passt outlives its killed owner with the VMM, is
/// taken over by the provider that re-attaches (the published port still
/// answers), and goes at stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_owners_user_mode_sandbox_keeps_its_passt_and_port() {
    let test_name = "a_killed_owners_user_mode_sandbox_keeps_its_passt_and_port";
    if let Some(why) = nova_runtime::network::user_mode_unsupported_reason() {
        eprintln!("SKIP {test_name}: {why}");
        return;
    }
    let Some(test) = common::setup("reattach-user", &["minimal"]) else {
        return;
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let owner = start_owner_with(
        test.dir.path(),
        "mkdir -p /tmp/w && echo served > /tmp/w/index.html && httpd -p 80 -h /tmp/w && \
         sleep 100",
        Some(&format!("user:{port}")),
    );
    let (id, vmm) = (owner.sandbox.clone(), owner.vmm);
    let pidfile = test
        .home()
        .sandbox(&id)
        .dir()
        .join(nova_net::passt::PIDFILE);
    let passt: u32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    drop(owner);
    assert!(!dead(passt), "passt died with its detached owner");

    let provider = detached(&test);
    let report = provider.reattach().await.unwrap();
    assert_eq!(report.adopted, vec![id.clone()], "{report:?}");
    let got = tokio::task::spawn_blocking(move || {
        let mut last = String::new();
        let ok = wait_until(Duration::from_secs(30), || {
            match http_get(std::net::SocketAddrV4::new(
                std::net::Ipv4Addr::LOCALHOST,
                port,
            )) {
                Ok(body) => {
                    last = body;
                    true
                }
                Err(e) => {
                    last = e.to_string();
                    false
                }
            }
        });
        assert!(ok, "the published port after re-attach: {last}");
        last
    })
    .await
    .unwrap();
    assert!(got.ends_with("served\n"), "{got:?}");

    provider.stop_sandbox(&id, false).await.unwrap();
    assert!(wait_until(Duration::from_secs(10), || dead(vmm)));
    assert!(
        wait_until(Duration::from_secs(10), || dead(passt)),
        "passt {passt} outlived stop"
    );
    assert!(test.sandbox_dirs().is_empty(), "{:?}", test.sandbox_dirs());
}

/// `GET /` over HTTP/1.0, the whole response.
fn http_get(to: std::net::SocketAddrV4) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&to.into(), Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET / HTTP/1.0\r\nHost: {to}\r\n\r\n")?;
    let mut response = String::new();
    s.read_to_string(&mut response)?;
    if response.starts_with("HTTP/1.") {
        Ok(response)
    } else {
        Err(std::io::Error::other(format!("not HTTP: {response:?}")))
    }
}

/// A provider that is not detached still kills its VMs when dropped, and
/// refuses to re-attach.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_that_is_not_detached_kills_its_vms_on_drop() {
    let Some(test) = common::setup("not-detached", &["minimal"]) else {
        return;
    };
    let provider = test.hypervisor.clone();
    assert!(provider.reattach().await.is_err());
    let sandbox = provider
        .create_sandbox(common::config("minimal"))
        .await
        .unwrap();
    let vmm = provider.get(sandbox.id()).await.unwrap().vmm_pid.unwrap();
    drop(sandbox);
    drop(provider);
    let common::TestHome { dir, hypervisor } = test;
    drop(hypervisor);
    assert!(
        wait_until(Duration::from_secs(10), || dead(vmm)),
        "the VMM {vmm} outlived its provider"
    );
    let sandboxes = dir.path().join("sandboxes");
    assert!(wait_until(Duration::from_secs(10), || std::fs::read_dir(
        &sandboxes
    )
    .map(|mut d| d.next().is_none())
    .unwrap_or(true)));
}
