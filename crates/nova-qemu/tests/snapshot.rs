//! QEMU snapshots end to end: a sandbox saved to a directory (its VM state
//! through migration to a file, and its scratch disk) is restored into a
//! fresh QEMU, where what the first one wrote is there and commands run.

#![allow(clippy::unwrap_used, reason = "test code")]

mod common;

use common::{config, setup};
use nova_core::hypervisor::Hypervisor;
use nova_core::snapshot::SnapshotError;
use nova_core::state::SandboxState;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_restores_into_a_new_sandbox_with_its_files() {
    let Some(t) = setup(
        "a_snapshot_restores_into_a_new_sandbox_with_its_files",
        &["minimal"],
    ) else {
        return;
    };
    let source = t
        .hypervisor
        .create_sandbox(config("minimal"))
        .await
        .unwrap();
    source
        .execute_command("echo before-snapshot > /root/mark && sync")
        .await
        .unwrap();
    let dir = t.dir.path().join("snap");
    // Only a paused sandbox can be snapshotted.
    let e = t.hypervisor.snapshot_sandbox(source.id(), &dir).await;
    assert!(
        matches!(e, Err(SnapshotError::NotPaused(SandboxState::Running))),
        "{e:?}"
    );
    source.pause().await.unwrap();
    let started = std::time::Instant::now();
    let snapshot = match t.hypervisor.snapshot_sandbox(source.id(), &dir).await {
        Ok(s) => s,
        Err(e) => {
            let log =
                std::fs::read_to_string(source.info().dir.join("vmm.log")).unwrap_or_default();
            let console =
                std::fs::read_to_string(source.info().dir.join("console.log")).unwrap_or_default();
            panic!(
                "{e:?}\nvmm.log: {log}\nconsole tail: {}",
                &console[console.len().saturating_sub(500)..]
            );
        }
    };
    eprintln!("snapshot written in {:?}", started.elapsed());
    assert!(snapshot.manifest.scratch);
    for file in ["vmstate", "scratch.ext4", "snapshot.json"] {
        assert!(dir.join(file).is_file(), "{file} missing");
    }
    // The source goes on after its snapshot.
    source.resume().await.unwrap();
    let out = source.execute_command("cat /root/mark").await.unwrap();
    assert_eq!(out.stdout_lossy(), "before-snapshot\n");

    let restored = t
        .hypervisor
        .create_sandbox_from_snapshot(&dir)
        .await
        .unwrap();
    let boot = restored.info().boot.clone().unwrap();
    eprintln!("restored: {boot:?}");
    assert!(boot.from_snapshot);
    let out = restored.execute_command("cat /root/mark").await.unwrap();
    assert_eq!(out.stdout_lossy(), "before-snapshot\n");
    // Writes in one do not reach the other.
    restored
        .execute_command("echo restored > /root/mark")
        .await
        .unwrap();
    let out = source.execute_command("cat /root/mark").await.unwrap();
    assert_eq!(out.stdout_lossy(), "before-snapshot\n");
    restored.stop(false).await.unwrap();
    source.stop(false).await.unwrap();
    assert!(t.sandbox_dirs().is_empty());
}

/// A template with a snapshot: creates that fit restore from it, others boot
/// the kernel (`auto`), `snapshot` refuses what does not fit with the
/// reason, `cold` always boots.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creates_restore_from_the_template_snapshot_when_it_fits() {
    use nova_core::config::StartMode;
    use nova_core::error::CreateSandboxError;

    let Some(t) = setup(
        "creates_restore_from_the_template_snapshot_when_it_fits",
        &["minimal"],
    ) else {
        return;
    };
    // A private copy of the template: its snapshot goes inside it.
    let templates = t.dir.path().join("templates");
    let shared = std::fs::read_link(&templates).unwrap();
    std::fs::remove_file(&templates).unwrap();
    let own = templates.join("minimal");
    std::fs::create_dir_all(&own).unwrap();
    for entry in std::fs::read_dir(shared.join("minimal")).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), own.join(entry.file_name())).unwrap();
        }
    }

    let mut cold = config("minimal");
    cold.start = StartMode::Cold;
    let source = t.hypervisor.create_sandbox(cold.clone()).await.unwrap();
    source.pause().await.unwrap();
    t.hypervisor
        .snapshot_sandbox(source.id(), &own.join("snapshot"))
        .await
        .unwrap();
    source.stop(true).await.unwrap();

    let restored = t
        .hypervisor
        .create_sandbox(config("minimal"))
        .await
        .unwrap();
    assert!(restored.info().boot.as_ref().unwrap().from_snapshot);
    let out = restored.execute_command("echo ok").await.unwrap();
    assert_eq!(out.stdout_lossy(), "ok\n");
    restored.stop(true).await.unwrap();

    let booted = t.hypervisor.create_sandbox(cold).await.unwrap();
    assert!(!booted.info().boot.as_ref().unwrap().from_snapshot);
    booted.stop(true).await.unwrap();

    let mut bigger = config("minimal");
    bigger.memory_mb = 384;
    let booted = t.hypervisor.create_sandbox(bigger.clone()).await.unwrap();
    assert!(
        !booted.info().boot.as_ref().unwrap().from_snapshot,
        "auto boots what the snapshot does not fit"
    );
    booted.stop(true).await.unwrap();
    bigger.start = StartMode::Snapshot;
    let e = t.hypervisor.create_sandbox(bigger).await.unwrap_err();
    assert!(matches!(e, CreateSandboxError::Snapshot(_)), "{e:?}");
    let why = std::error::Error::source(&e).unwrap().to_string();
    assert!(why.contains("memory_mb = 256"), "{why}");

    // Rebuild the template (a new rootfs file): its snapshot is refused.
    let rootfs = own.join("rootfs.ext4");
    let copy = own.join("rootfs.new");
    std::fs::copy(&rootfs, &copy).unwrap();
    std::fs::rename(&copy, &rootfs).unwrap();
    let mut strict = config("minimal");
    strict.start = StartMode::Snapshot;
    let e = t.hypervisor.create_sandbox(strict).await.unwrap_err();
    let why = std::error::Error::source(&e).unwrap().to_string();
    assert!(why.contains("another build of template `minimal`"), "{why}");
    let booted = t
        .hypervisor
        .create_sandbox(config("minimal"))
        .await
        .unwrap();
    assert!(!booted.info().boot.as_ref().unwrap().from_snapshot);
    booted.stop(true).await.unwrap();
    assert!(t.sandbox_dirs().is_empty());
}

/// Fork: every child starts with what the parent had written, a write in
/// one child is invisible to the others, and the parent goes on with the
/// processes it had.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_copies_the_running_sandbox_into_independent_children() {
    let Some(t) = setup(
        "a_fork_copies_the_running_sandbox_into_independent_children",
        &["minimal"],
    ) else {
        return;
    };
    let parent = t
        .hypervisor
        .create_sandbox(config("minimal"))
        .await
        .unwrap();
    let out = parent
        .execute_command("echo parent > /root/file; sleep 600 >/dev/null 2>&1 & echo $!")
        .await
        .unwrap();
    let pid = out.stdout_lossy().trim().to_owned();
    let started = std::time::Instant::now();
    let children = parent.fork(2).await.unwrap();
    eprintln!("fork of 2 took {:?}", started.elapsed());
    assert_eq!(children.len(), 2);
    for child in &children {
        assert_ne!(child.id(), parent.id());
        let out = child.execute_command("cat /root/file").await.unwrap();
        assert_eq!(out.stdout_lossy(), "parent\n");
    }
    children[0]
        .execute_command("echo child0 > /root/file")
        .await
        .unwrap();
    let out = children[1].execute_command("cat /root/file").await.unwrap();
    assert_eq!(out.stdout_lossy(), "parent\n", "children are independent");
    let out = parent.execute_command("cat /root/file").await.unwrap();
    assert_eq!(out.stdout_lossy(), "parent\n");
    let out = parent
        .execute_command(format!("kill -0 {pid} && echo alive"))
        .await
        .unwrap();
    assert_eq!(
        out.stdout_lossy(),
        "alive\n",
        "the parent's process survived the fork"
    );
    for child in children {
        child.stop(true).await.unwrap();
    }
    parent.stop(true).await.unwrap();
    assert!(t.sandbox_dirs().is_empty());
    assert!(
        std::fs::read_dir(t.home().cache_dir().join("forks"))
            .map(|mut d| d.next().is_none())
            .unwrap_or(true),
        "the fork's snapshot is gone"
    );
}

/// Two sandboxes restored from one snapshot are distinct machines: their
/// own hostnames, machine-ids and random bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restored_sandboxes_are_distinct_machines() {
    let Some(t) = setup("restored_sandboxes_are_distinct_machines", &["minimal"]) else {
        return;
    };
    let source = t
        .hypervisor
        .create_sandbox(config("minimal"))
        .await
        .unwrap();
    source.pause().await.unwrap();
    let dir = t.dir.path().join("snap");
    t.hypervisor
        .snapshot_sandbox(source.id(), &dir)
        .await
        .unwrap();
    source.stop(true).await.unwrap();
    let mut seen = Vec::new();
    for _ in 0..2 {
        let sandbox = t
            .hypervisor
            .create_sandbox_from_snapshot(&dir)
            .await
            .unwrap();
        let out = sandbox
            .execute_command(
                "hostname; cat /etc/machine-id; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'",
            )
            .await
            .unwrap();
        let text = out.stdout_lossy();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text:?}");
        assert_eq!(lines[0], sandbox.id().as_str(), "its hostname is its id");
        let resolved = sandbox
            .execute_command("grep -w \"$(hostname)\" /etc/hosts")
            .await
            .unwrap();
        assert!(resolved.success(), "/etc/hosts names it");
        seen.push((lines[1].to_owned(), lines[2].to_owned()));
        sandbox.stop(true).await.unwrap();
    }
    assert_ne!(seen[0].0, seen[1].0, "machine-ids differ");
    assert_ne!(seen[0].1, seen[1].1, "random bytes differ");
    assert!(t.sandbox_dirs().is_empty());
}

/// A sandbox turned into a template: creates of the new template start
/// where the sandbox was, each a machine of its own; a name in use is
/// refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandbox_becomes_a_template_that_creates_start_from() {
    let Some(t) = setup(
        "a_sandbox_becomes_a_template_that_creates_start_from",
        &["minimal"],
    ) else {
        return;
    };
    // A private templates directory: the new template goes into it.
    let templates = t.dir.path().join("templates");
    let shared = std::fs::read_link(&templates).unwrap();
    std::fs::remove_file(&templates).unwrap();
    let own = templates.join("minimal");
    std::fs::create_dir_all(&own).unwrap();
    for entry in std::fs::read_dir(shared.join("minimal")).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), own.join(entry.file_name())).unwrap();
        }
    }
    let sandbox = t
        .hypervisor
        .create_sandbox(config("minimal"))
        .await
        .unwrap();
    sandbox
        .execute_command("echo prepared > /root/state")
        .await
        .unwrap();
    let template = sandbox.snapshot_as_template("prepared").await.unwrap();
    assert_eq!(template.id(), "prepared");
    assert!(sandbox.is_running().await, "the sandbox goes on");
    let e = sandbox.snapshot_as_template("prepared").await.unwrap_err();
    assert!(e.to_string().contains("exists already"), "{e}");
    sandbox.stop(true).await.unwrap();

    let mut from_template = config("prepared");
    from_template.start = nova_core::config::StartMode::Snapshot;
    let child = t.hypervisor.create_sandbox(from_template).await.unwrap();
    assert!(child.info().boot.as_ref().unwrap().from_snapshot);
    let out = child
        .execute_command("cat /root/state; hostname")
        .await
        .unwrap();
    assert_eq!(
        out.stdout_lossy(),
        format!("prepared\n{}\n", child.id()),
        "the sandbox's state, under its own name"
    );
    child.stop(true).await.unwrap();
    assert!(t.sandbox_dirs().is_empty());
}
