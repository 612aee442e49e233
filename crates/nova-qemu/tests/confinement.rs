//! End-to-end: a sandbox's QEMU really runs confined (seccomp, and as an
//! unprivileged user when the test runs as root), and the guest still boots,
//! writes to its cloned scratch disk, pauses, resumes and stops cleanly.

#![allow(clippy::unwrap_used, reason = "test code")]

mod common;

use common::{config, process_exists, setup, wait_until};
use nova_core::hypervisor::Hypervisor;
use nova_qemu::confinement::Confinement;

/// A `Name:\tvalue` line of `/proc/<pid>/status`.
fn status_field(pid: u32, name: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
        .trim()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_runs_under_seccomp_and_as_an_unprivileged_user() {
    let Some(t) = setup("qemu_runs_under_seccomp", &["minimal"]) else {
        return;
    };
    let confinement = Confinement::for_host();
    for p in confinement.protections() {
        eprintln!(
            "{} {}: {}",
            if p.applies {
                "applies"
            } else {
                "does not apply"
            },
            p.name,
            p.detail
        );
    }
    let sandbox = t
        .hypervisor
        .create_sandbox(config("minimal"))
        .await
        .unwrap();
    let pid = sandbox.info().vmm_pid.unwrap();

    // Seccomp mode 2 is a filter.
    assert_eq!(
        status_field(pid, "Seccomp"),
        if confinement.has_seccomp() { "2" } else { "0" }
    );
    let uids: Vec<u32> = status_field(pid, "Uid")
        .split_whitespace()
        .map(|u| u.parse().unwrap())
        .collect();
    match (confinement.run_as(), confinement.per_sandbox()) {
        (_, true) => {
            let range = nova_qemu::confinement::PER_SANDBOX_IDS;
            assert!(
                uids.iter().all(|u| range.contains(u)),
                "QEMU runs as its sandbox's own uid: Uid {uids:?}"
            );
            eprintln!("QEMU runs as uid {uids:?}, its sandbox's own");
        }
        (Some(_), false) => {
            assert!(uids.iter().all(|&u| u != 0), "QEMU kept root: Uid {uids:?}");
            eprintln!("QEMU runs as uid {uids:?}");
        }
        (None, false) => {
            let own = rustix::process::geteuid().as_raw();
            assert_eq!(uids[1], own, "QEMU runs as nova's user");
            eprintln!("SKIP privilege-drop check: this test does not run as root (or it is off)");
        }
    }

    // The guest works: a write lands on the scratch overlay, pause/resume
    // go through QMP, and a graceful stop powers the VM off.
    let out = sandbox
        .execute_command("echo confined > /etc/confined && cat /etc/confined")
        .await
        .unwrap();
    assert_eq!(out.stdout_lossy(), "confined\n");
    sandbox.pause().await.unwrap();
    sandbox.resume().await.unwrap();
    let out = sandbox.execute_command("cat /etc/confined").await.unwrap();
    assert_eq!(out.stdout_lossy(), "confined\n");
    sandbox.stop(false).await.unwrap();
    assert!(wait_until(std::time::Duration::from_secs(10), || {
        !process_exists(pid)
    }));
    assert!(t.sandbox_dirs().is_empty());
}
