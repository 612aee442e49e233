//! Pause to disk end to end: a sandbox's memory, VM state and disk are
//! saved under its directory and its VMM ends; a new detached provider on
//! the same `$NOVA_HOME` (a restarted daemon) adopts it as paused, and its
//! resume restores it in a new QEMU, where a process started before the
//! pause still runs and what was written is there. Real guests under QEMU
//! (TCG here), with a network where the host allows one.

#![allow(clippy::unwrap_used, reason = "test code")]

mod common;

use std::path::Path;
use std::time::Duration;

use common::{TestHome, config, setup, wait_until};
use nova_core::hypervisor::Hypervisor;
use nova_core::id::SandboxId;
use nova_core::sandbox::Sandbox;
use nova_core::state::SandboxState;
use nova_qemu::{QemuHypervisor, QemuOptions};

/// Kills, when dropped, every VMM the test home's sandboxes still record
/// (a detached provider's VMs outlive it, and a failed assertion must not
/// leave one running).
struct KillVmmsOnDrop<'a>(&'a TestHome);

impl Drop for KillVmmsOnDrop<'_> {
    fn drop(&mut self) {
        for dir in self.0.sandbox_dirs() {
            let Ok(text) = std::fs::read_to_string(dir.join("state.json")) else {
                continue;
            };
            let Ok(json) = serde_json::from_str::<serde_json::Value>(&text) else {
                continue;
            };
            if let Some(pid) = json["vmm_pid"].as_u64()
                && let Some(pid) = rustix::process::Pid::from_raw(pid as i32)
            {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
        }
    }
}

fn detached(test: &TestHome) -> QemuHypervisor {
    let options: QemuOptions = test.hypervisor.options().clone();
    QemuHypervisor::detached(options)
}

async fn sh(sandbox: &Sandbox, script: &str) -> String {
    let out = sandbox.execute_command(script).await.unwrap();
    assert!(
        out.success(),
        "{script}: {:?}\n{}",
        out.status,
        out.stderr_lossy()
    );
    out.stdout_lossy()
}

/// The counter the background loop writes, once it wrote one.
async fn counter(provider: &QemuHypervisor, id: &SandboxId) -> Option<u64> {
    let bytes = provider.read_file(id, "/root/counter").await.ok()?;
    String::from_utf8_lossy(&bytes).trim().parse().ok()
}

/// Polls the counter until it exceeds `above` (the loop runs), for up to
/// 30 s of an emulated guest on a loaded host.
async fn counter_exceeds(provider: &QemuHypervisor, id: &SandboxId, above: u64) -> Option<u64> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::time::Instant::now() < deadline {
        if let Some(n) = counter(provider, id).await
            && n > above
        {
            return Some(n);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// Whether no provider holds the sandbox directory's lock (a dropped
/// detached provider's task lets go of it as it ends).
fn unlocked(dir: &Path) -> bool {
    matches!(nova_runtime::dir::try_lock(dir), Ok(Some(_)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandbox_paused_to_disk_resumes_under_a_restarted_provider_with_its_processes() {
    let test_name = "a_sandbox_paused_to_disk_resumes_under_a_restarted_provider";
    let Some(test) = setup(test_name, &["minimal"]) else {
        return;
    };
    let _cleanup = KillVmmsOnDrop(&test);
    let mut cfg = config("minimal");
    match nova_runtime::network::unsupported_reason() {
        None => cfg.enable_network = true,
        Some(why) => eprintln!("{test_name}: without a network ({why})"),
    }

    let first = detached(&test);
    first.reattach().await.unwrap();
    let sandbox = first.create_sandbox(cfg).await.unwrap();
    let id = sandbox.id().clone();
    let old_vmm = sandbox.info().vmm_pid.unwrap();
    // A process that outlives the command that started it, counting.
    sh(
        &sandbox,
        "sh -c 'i=0; while true; do i=$((i+1)); echo $i > /root/counter; sleep 0.2; done' \
         </dev/null >/dev/null 2>&1 & echo $! > /root/loop.pid; \
         echo before-pause > /root/mark; sync",
    )
    .await;
    let before = counter_exceeds(&first, &id, 0)
        .await
        .expect("the loop counts before the pause");

    let started = std::time::Instant::now();
    first.pause_sandbox_to_disk(&id).await.unwrap();
    eprintln!("paused to disk in {:?}", started.elapsed());
    let info = first.get(&id).await.unwrap();
    assert_eq!(info.state, SandboxState::Paused);
    assert!(info.persisted, "{info:?}");
    assert_eq!(info.vmm_pid, None);
    assert!(
        wait_until(Duration::from_secs(10), || !common::process_exists(old_vmm)),
        "the VMM {old_vmm} outlived the pause to disk"
    );
    let saved = info.dir.join("persisted");
    for file in ["vmstate", "snapshot.json"] {
        assert!(saved.join(file).is_file(), "{file} missing in {saved:?}");
    }
    // Pausing again changes nothing; commands are refused while on disk.
    first.pause_sandbox_to_disk(&id).await.unwrap();
    assert!(first.read_file(&id, "/root/mark").await.is_err());

    // The provider goes away (a daemon restart); a new one adopts the
    // sandbox, still on disk.
    drop(sandbox);
    drop(first);
    assert!(
        wait_until(Duration::from_secs(10), || unlocked(&info.dir)),
        "the dropped provider kept the sandbox directory locked"
    );
    let second = detached(&test);
    let report = second.reattach().await.unwrap();
    assert_eq!(report.adopted, vec![id.clone()], "{report:?}");
    let adopted = second.get(&id).await.unwrap();
    assert_eq!(adopted.state, SandboxState::Paused);
    assert!(adopted.persisted);

    let started = std::time::Instant::now();
    second.resume_sandbox(&id).await.unwrap();
    eprintln!("resumed from disk in {:?}", started.elapsed());
    let resumed = second.get(&id).await.unwrap();
    assert_eq!(resumed.state, SandboxState::Running);
    assert!(!resumed.persisted);
    let new_vmm = resumed.vmm_pid.expect("a new VMM");
    assert_ne!(new_vmm, old_vmm);
    assert!(!saved.exists(), "the spent saved state is removed");

    // The process started before the pause runs on, and the file is there.
    let after = counter(&second, &id).await.expect("the counter survived");
    assert!(after >= before, "counter went back: {before} -> {after}");
    counter_exceeds(&second, &id, after)
        .await
        .expect("the loop counts after the resume");
    let out = second
        .execute_command(
            &id,
            nova_core::exec::ExecRequest::shell("kill -0 $(cat /root/loop.pid) && cat /root/mark"),
        )
        .await
        .unwrap();
    assert!(out.success(), "{out:?}");
    assert_eq!(out.stdout_lossy(), "before-pause\n");

    // Paused to disk again, a stop removes everything.
    second.pause_sandbox_to_disk(&id).await.unwrap();
    second.stop_sandbox(&id, false).await.unwrap();
    assert_eq!(second.get(&id).await.unwrap().state, SandboxState::Stopped);
    assert!(
        wait_until(Duration::from_secs(10), || !common::process_exists(new_vmm)),
        "the VMM {new_vmm} outlived the pause to disk"
    );
    assert!(test.sandbox_dirs().is_empty(), "{:?}", test.sandbox_dirs());
}

/// A sandbox paused to disk whose template was rebuilt meanwhile is not
/// restored on a changed image: the resume says why and the sandbox stays
/// paused on disk, to be stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_from_disk_after_the_template_changed_is_refused_and_loses_nothing() {
    let test_name = "a_resume_from_disk_after_the_template_changed_is_refused";
    let Some(test) = setup(test_name, &["minimal"]) else {
        return;
    };
    let _cleanup = KillVmmsOnDrop(&test);
    // A private copy of the template to "rebuild": its manifest and root
    // filesystem copied (4.5 MiB), the rest linked to the shared build.
    let shared = common::shared_templates().join("minimal");
    let templates = test.dir.path().join("templates");
    std::fs::remove_file(&templates).unwrap();
    let own = templates.join("minimal");
    std::fs::create_dir_all(&own).unwrap();
    for entry in std::fs::read_dir(&shared).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        if !entry.file_type().unwrap().is_file() {
            continue;
        }
        if name == "rootfs.ext4" || name == "minimal.json" {
            std::fs::copy(entry.path(), own.join(&name)).unwrap();
        } else {
            std::os::unix::fs::symlink(entry.path(), own.join(&name)).unwrap();
        }
    }
    let provider = test.hypervisor.clone();
    let mut cfg = config("minimal");
    cfg.start = nova_core::config::StartMode::Cold;
    let sandbox = provider.create_sandbox(cfg).await.unwrap();
    let id = sandbox.id().clone();
    sandbox.pause_to_disk().await.unwrap();

    // The template is rebuilt: a new root filesystem file.
    let rootfs = own.join("rootfs.ext4");
    let rebuilt = own.join("rootfs.ext4.new");
    std::fs::copy(&rootfs, &rebuilt).unwrap();
    std::fs::rename(&rebuilt, &rootfs).unwrap();

    let e = sandbox.resume().await.unwrap_err();
    let chain = error_chain(&e);
    assert!(
        matches!(
            &e,
            nova_core::error::SandboxError::Restore(c)
                if matches!(**c, nova_core::error::CreateSandboxError::Snapshot(
                    nova_core::snapshot::SnapshotError::TemplateChanged { .. }
                ))
        ),
        "{chain}"
    );
    let info = provider.get(&id).await.unwrap();
    assert_eq!(info.state, SandboxState::Paused);
    assert!(info.persisted);
    assert!(info.dir.join("persisted/vmstate").is_file());
    sandbox.stop(false).await.unwrap();
    assert!(test.sandbox_dirs().is_empty(), "{:?}", test.sandbox_dirs());
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
