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
