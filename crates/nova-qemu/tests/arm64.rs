//! End-to-end test of the arm64 guest: the `minimal-arm64` template (the
//! arm64 kernel, busybox and agent that Apple Virtualization.framework
//! boots on a Mac) booted here under `qemu-system-aarch64 -M virt` with TCG,
//! through the same QEMU backend and runtime as the x86_64 guests.
//!
//! Gated: prints SKIP and returns when the template is not built
//! (`make images-arm64`) or `qemu-system-aarch64` is not installed
//! (`apt-get install qemu-system-arm`). `make test` builds the template
//! first, so there it runs.

#![allow(clippy::unwrap_used, reason = "test code")]

mod common;

use std::time::Duration;

use common::{config, process_exists, setup, shared_templates, wait_until};
use nova_core::config::StartMode;
use nova_core::error::ExecError;
use nova_core::exec::ExitStatus;
use nova_core::hypervisor::Hypervisor;
use nova_core::state::SandboxState;
use nova_core::template::{GuestArch, TemplateManager};
use nova_qemu::{QEMU_AARCH64_BIN, QEMU_AARCH64_BIN_ENV};
use nova_runtime::host::find_binary;

/// The arm64 template `make images-arm64` builds.
const TEMPLATE: &str = "minimal-arm64";

/// Whether the arm64 guest can run here; prints why not.
fn arm64_ready(test: &str) -> bool {
    let templates = shared_templates();
    match TemplateManager::new(&templates).load(TEMPLATE) {
        Ok(template) => assert_eq!(
            template.manifest.arch,
            GuestArch::Arm64,
            "{TEMPLATE} must be an arm64 template"
        ),
        Err(e) => {
            eprintln!(
                "SKIP {test}: template {TEMPLATE} not usable in {} ({e}); build it with `make \
                 images-arm64`",
                templates.display()
            );
            return false;
        }
    }
    if let Err(nf) = find_binary(QEMU_AARCH64_BIN_ENV, QEMU_AARCH64_BIN) {
        eprintln!(
            "SKIP {test}: {QEMU_AARCH64_BIN} not found ({}); install qemu-system-arm",
            nf.searched.join(", ")
        );
        return false;
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_arm64_guest_boots_runs_commands_moves_files_pauses_and_stops() {
    let test = "the_arm64_guest_boots_runs_commands_moves_files_pauses_and_stops";
    if !arm64_ready(test) {
        return;
    }
    let Some(t) = setup(test, &[TEMPLATE]) else {
        return;
    };
    // Boot to the agent's ready: `create_sandbox` returns once it answered.
    let mut cold = config(TEMPLATE);
    cold.start = StartMode::Cold;
    let sandbox = t.hypervisor.create_sandbox(cold).await.unwrap();
    let info = sandbox.info();
    let boot = info.boot.clone().unwrap();
    assert!(!boot.from_snapshot && boot.guest_ms > 0.0, "{boot:?}");
    let pid = info.vmm_pid.unwrap();
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(
        cmdline.contains("qemu-system-aarch64") && cmdline.contains("virt,gic-version=3"),
        "{cmdline}"
    );

    // Exec: the guest is an arm64 Linux, its kernel ours, output and exit
    // codes as on x86_64.
    let out = sandbox.execute_command("uname -m; uname -r").await.unwrap();
    assert!(out.success(), "{}", out.stderr_lossy());
    let text = out.stdout_lossy();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("aarch64"));
    assert!(lines.next().unwrap_or("").ends_with("-nova"), "{text}");
    let out = sandbox
        .execute_command("echo out; echo err >&2; exit 7")
        .await
        .unwrap();
    assert_eq!(
        (out.stdout.as_slice(), out.stderr.as_slice()),
        (&b"out\n"[..], &b"err\n"[..])
    );
    assert_eq!(out.status, ExitStatus::Code(7));
    // The root is the read-only template with the scratch overlay on it.
    let out = sandbox
        .execute_command(
            "echo hi > /etc/written && cat /etc/written && grep -c ' / overlay ' /proc/mounts",
        )
        .await
        .unwrap();
    assert_eq!(out.stdout_lossy(), "hi\n1\n", "{}", out.stderr_lossy());

    // Files: upload, check in the guest, download.
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 13 % 251) as u8).collect();
    sandbox
        .write_file("/tmp/upload.bin", data.clone(), 0o600)
        .await
        .unwrap();
    let out = sandbox
        .execute_command("stat -c %a /tmp/upload.bin && wc -c < /tmp/upload.bin")
        .await
        .unwrap();
    assert_eq!(out.stdout_lossy(), "600\n300000\n");
    assert_eq!(sandbox.read_file("/tmp/upload.bin").await.unwrap(), data);

    // Stats: the VMM's and the agent's view.
    let stats = sandbox.get_stats().await.unwrap();
    let guest = stats.guest.clone().expect("the agent reports guest stats");
    assert!(
        guest.memory_total_bytes > 0 && guest.memory_total_bytes <= 256 << 20,
        "{guest:?}"
    );
    assert!(guest.process_count >= 1, "{guest:?}");
    assert!(
        stats.vmm.rss_bytes > 0 && stats.cpu_usage_us > 0,
        "{stats:?}"
    );

    // Pause and resume: paused, the guest answers nothing; resumed, it
    // runs commands again and its files are intact.
    sandbox.pause().await.unwrap();
    assert_eq!(sandbox.refresh().await.unwrap().state, SandboxState::Paused);
    assert!(matches!(
        sandbox.execute_command("true").await,
        Err(ExecError::NotRunning(SandboxState::Paused))
    ));
    assert!(sandbox.get_stats().await.unwrap().guest.is_none());
    sandbox.resume().await.unwrap();
    assert_eq!(
        sandbox.refresh().await.unwrap().state,
        SandboxState::Running
    );
    let out = sandbox
        .execute_command("wc -c < /tmp/upload.bin")
        .await
        .unwrap();
    assert_eq!(out.stdout_lossy(), "300000\n");

    // Stop, gracefully: the agent syncs and ends the VM; nothing is left.
    let dir = sandbox.info().dir.clone();
    sandbox.stop(false).await.unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || !process_exists(pid)),
        "QEMU {pid} is still there after a graceful stop"
    );
    assert!(!dir.exists(), "{} is still there", dir.display());
    assert!(t.sandbox_dirs().is_empty());
    assert!(!sandbox.is_running().await);
}

/// An arm64 guest saved through QEMU's migration to a file restores into a
/// new `virt` VM with its files, as an x86_64 one does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_arm64_snapshot_restores_into_a_new_sandbox_with_its_files() {
    let test = "an_arm64_snapshot_restores_into_a_new_sandbox_with_its_files";
    if !arm64_ready(test) {
        return;
    }
    let Some(t) = setup(test, &[TEMPLATE]) else {
        return;
    };
    let mut cold = config(TEMPLATE);
    cold.start = StartMode::Cold;
    let source = t.hypervisor.create_sandbox(cold).await.unwrap();
    source
        .execute_command("echo before-snapshot > /root/mark && sync")
        .await
        .unwrap();
    source.pause().await.unwrap();
    let dir = t.dir.path().join("snap");
    let snapshot = t
        .hypervisor
        .snapshot_sandbox(source.id(), &dir)
        .await
        .unwrap();
    assert!(snapshot.manifest.scratch);
    source.stop(true).await.unwrap();

    let restored = t
        .hypervisor
        .create_sandbox_from_snapshot(&dir)
        .await
        .unwrap();
    let boot = restored.info().boot.clone().unwrap();
    assert!(boot.from_snapshot, "{boot:?}");
    let out = restored
        .execute_command("cat /root/mark; uname -m; hostname")
        .await
        .unwrap();
    assert_eq!(
        out.stdout_lossy(),
        format!("before-snapshot\naarch64\n{}\n", restored.id()),
        "the saved files, under the new sandbox's own name"
    );
    restored.stop(false).await.unwrap();
    assert!(t.sandbox_dirs().is_empty());
}
