//! A snapshot's guest RAM as a file of its own: a cold-booted sandbox's
//! snapshot holds a `memory` file (a copy of the guest's RAM memfd, root's
//! alone) beside a devices-only VM state; a sandbox
//! restored from it maps that file private, so nothing it writes reaches
//! the file; a snapshot of the restored sandbox streams its memory instead
//! (it has no shared file) and restores too; and every memory file goes
//! with its sandbox.

#![allow(clippy::unwrap_used, reason = "test code")]

mod common;

use std::hash::Hasher;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use common::{config, setup};
use nova_core::hypervisor::Hypervisor;

/// A hash of the whole file, and its modification and change times
/// (nanoseconds): what must stay the same when no one writes the file.
fn fingerprint(path: &Path) -> (u64, i64, i64) {
    let mut file = std::fs::File::open(path).unwrap();
    let mut hasher = std::hash::DefaultHasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        hasher.write(&buf[..n]);
    }
    let meta = file.metadata().unwrap();
    (
        hasher.finish(),
        meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
        meta.ctime() * 1_000_000_000 + meta.ctime_nsec(),
    )
}

/// The bytes of data (not holes) a file holds on disk.
fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restored_guest_writes_never_reach_the_snapshot_memory_file() {
    let Some(t) = setup(
        "restored_guest_writes_never_reach_the_snapshot_memory_file",
        &["minimal"],
    ) else {
        return;
    };
    let source = t
        .hypervisor
        .create_sandbox(config("minimal"))
        .await
        .unwrap();
    // A cold boot's RAM is a memfd of QEMU's: nothing in its directory.
    assert!(!source.info().dir.join("memory").exists());
    source.pause().await.unwrap();
    let snap = t.dir.path().join("snap");
    t.hypervisor
        .snapshot_sandbox(source.id(), &snap)
        .await
        .unwrap();
    let memory = snap.join("memory");
    let state = std::fs::metadata(snap.join("vmstate")).unwrap().len();
    // The guest's RAM is in the memory file, not in the VM state: a booted
    // guest uses tens of MiB, the devices' state a few hundred KiB.
    assert!(
        allocated(&memory) > 4 * state,
        "memory file {} bytes on disk, VM state {state} bytes",
        allocated(&memory)
    );
    let meta = std::fs::metadata(&memory).unwrap();
    assert_eq!(meta.len(), 256 << 20);
    assert_eq!(meta.mode() & 0o777, 0o600, "guest memory is root's alone");
    source.stop(true).await.unwrap();
    let before = fingerprint(&memory);

    let restored = t
        .hypervisor
        .create_sandbox_from_snapshot(&snap)
        .await
        .unwrap();
    eprintln!("restored from the memory file: {:?}", restored.info().boot);
    assert!(
        !restored.info().dir.join("memory").exists(),
        "a restored sandbox maps the snapshot's file and has none of its own"
    );
    // Write 32 MiB of random data into guest RAM (a tmpfs), and change what
    // the snapshot's guest had in memory.
    let out = restored
        .execute_command(
            "mkdir -p /mnt/ram && mount -t tmpfs -o size=48m tmpfs /mnt/ram && \
             head -c 33554432 /dev/urandom > /mnt/ram/noise && echo gen1 > /mnt/ram/mark && \
             cat /mnt/ram/mark",
        )
        .await
        .unwrap();
    assert_eq!(out.exit_code(), 0, "{out:?}");
    assert_eq!(out.stdout_lossy(), "gen1\n");
    assert_eq!(
        fingerprint(&memory),
        before,
        "the guest's writes reached the snapshot's memory file"
    );

    // A snapshot of the restored sandbox: its RAM is no shared file, so the
    // VM state carries it and there is no memory file; it restores with
    // what the guest wrote.
    restored.pause().await.unwrap();
    let snap2 = t.dir.path().join("snap2");
    t.hypervisor
        .snapshot_sandbox(restored.id(), &snap2)
        .await
        .unwrap();
    assert!(!snap2.join("memory").exists());
    restored.stop(true).await.unwrap();
    let second = t
        .hypervisor
        .create_sandbox_from_snapshot(&snap2)
        .await
        .unwrap();
    eprintln!("restored from a streamed state: {:?}", second.info().boot);
    let out = second.execute_command("cat /mnt/ram/mark").await.unwrap();
    assert_eq!(out.stdout_lossy(), "gen1\n", "{out:?}");
    second.stop(true).await.unwrap();
    assert_eq!(fingerprint(&memory), before);

    // Every sandbox's files went with it; the snapshots' go with their
    // directories.
    assert!(
        common::wait_until(std::time::Duration::from_secs(10), || t
            .sandbox_dirs()
            .is_empty()),
        "left behind: {:?}",
        t.sandbox_dirs()
    );
    for dir in [&snap, &snap2] {
        std::fs::remove_dir_all(dir).unwrap();
    }
    assert!(!memory.exists());
}
