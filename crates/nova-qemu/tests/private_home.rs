//! Regression: with `$NOVA_HOME` under a directory only root may enter
//! (0700), a restore failed at `cont` ("Could not open .../scratch.ext4:
//! Permission denied"): QEMU, already running as the sandbox's own uid,
//! reopened the scratch disk by its path when the restored guest resumed.
//! The disk is now handed to QEMU as descriptors (an fd set), on cold boots
//! and restores alike. Real guests under QEMU (TCG here).

#![allow(clippy::unwrap_used, reason = "test code")]

mod common;

use std::os::unix::fs::PermissionsExt;

use nova_core::config::{SandboxConfig, StartMode};
use nova_core::home::NovaHome;
use nova_core::hypervisor::Hypervisor;
use nova_qemu::{QemuHypervisor, QemuOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_home_under_a_private_directory_boots_restores_and_resumes_from_disk() {
    let test = "a_home_under_a_private_directory_boots_restores_and_resumes_from_disk";
    let Some(t) = common::setup(test, &["minimal"]) else {
        return;
    };
    let private = t.dir.path().join("private");
    let home = private.join("home");
    std::fs::create_dir_all(&home).unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::symlink(common::shared_templates(), home.join("templates")).unwrap();
    let options = QemuOptions {
        home: NovaHome::at(&home),
        ..t.hypervisor.options().clone()
    };
    let provider = QemuHypervisor::new(options);

    // A cold boot.
    let cold = provider
        .create_sandbox(common::config("minimal"))
        .await
        .unwrap();
    let out = cold
        .execute_command("echo cold > /root/f && cat /root/f")
        .await
        .unwrap();
    assert_eq!(out.stdout_lossy(), "cold\n");
    cold.stop(false).await.unwrap();

    // A restore of the template's snapshot, when it has one.
    let template = nova_core::template::TemplateManager::new(home.join("templates"))
        .load("minimal")
        .unwrap();
    match nova_runtime::snapshot::read(&template.snapshot_dir()).await {
        Ok(snapshot)
            if !snapshot.manifest.config.enable_network
                || nova_runtime::network::unsupported_reason().is_none() =>
        {
            let config = SandboxConfig::builder()
                .template_id("minimal")
                .memory_mb(snapshot.manifest.config.memory_mb)
                .vcpus(snapshot.manifest.config.vcpus)
                .enable_network(snapshot.manifest.config.enable_network)
                .start(StartMode::Snapshot)
                .boot_timeout_ms(90_000)
                .build()
                .unwrap();
            let restored = provider.create_sandbox(config).await.unwrap();
            assert!(restored.info().boot.as_ref().unwrap().from_snapshot);
            let out = restored
                .execute_command("echo restored > /root/f && cat /root/f")
                .await
                .unwrap();
            assert_eq!(out.stdout_lossy(), "restored\n");
            restored.stop(false).await.unwrap();
        }
        other => eprintln!("{test}: no template snapshot to restore here ({other:?})"),
    }

    // A pause to disk and its resume, which restores too.
    let sandbox = provider
        .create_sandbox(common::config("minimal"))
        .await
        .unwrap();
    sandbox
        .execute_command("echo kept > /root/f")
        .await
        .unwrap();
    sandbox.pause_to_disk().await.unwrap();
    sandbox.resume().await.unwrap();
    let out = sandbox.execute_command("cat /root/f").await.unwrap();
    assert_eq!(out.stdout_lossy(), "kept\n");
    sandbox.stop(false).await.unwrap();
    assert!(
        std::fs::read_dir(home.join("sandboxes"))
            .map(|mut d| d.next().is_none())
            .unwrap_or(true),
        "sandbox directories left behind"
    );
}
