//! Regression: the first handshake with a restored guest's agent went
//! unanswered about once in 20 to 30 restores (hidden by a retry on a new
//! connection after 1 s). The agent closed its virtio-serial port after
//! each empty poll, and the guest's driver discards what a port holds when
//! it is closed: a host that connected between the poll's end of stream
//! and that close lost its `Hello`. The agent now keeps the port open.
//!
//! The test restores the `minimal` template's snapshot in a loop
//! (`NOVA_RESTORE_LOOPS`, default 30) and counts the handshakes the
//! runtime had to try again, from its own log, printing the guest console
//! of each. Real guests under QEMU (TCG here); the templates must have
//! been built with the fixed agent. Measured here: 3 of 60 restores
//! retried with the old agent, 1 of 260 with the fixed one; a rarer race
//! is left, so the test is a reproducer run by hand (`--ignored`), not
//! part of `make test`.

#![allow(clippy::unwrap_used, reason = "test code")]

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use nova_core::config::{SandboxConfig, StartMode};
use nova_core::hypervisor::Hypervisor;

/// The runtime's log lines, kept for counting.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn count(&self, needle: &str) -> usize {
        let text = self.0.lock().unwrap_or_else(|p| p.into_inner());
        String::from_utf8_lossy(&text).matches(needle).count()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a loop reproducer (about 35 s for 60 restores): run with --ignored"]
async fn a_restored_agent_answers_the_first_handshake() {
    let test = "a_restored_agent_answers_the_first_handshake";
    let Some(t) = common::setup(test, &["minimal"]) else {
        return;
    };
    let log = Captured::default();
    let writer = log.clone();
    tracing_subscriber::fmt()
        .with_env_filter("nova_runtime=debug")
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .init();
    // The snapshot's resources, so that it fits; a network if it has one.
    let template = nova_core::template::TemplateManager::new(t.home().templates_dir())
        .load("minimal")
        .unwrap();
    let snapshot = nova_runtime::snapshot::read(&template.snapshot_dir()).await;
    let Ok(snapshot) = snapshot else {
        eprintln!("SKIP {test}: the minimal template has no snapshot ({snapshot:?})");
        return;
    };
    let networked = snapshot.manifest.config.enable_network;
    if networked && let Some(why) = nova_runtime::network::unsupported_reason() {
        eprintln!("SKIP {test}: the snapshot has a network and this host gives none ({why})");
        return;
    }
    let config = SandboxConfig::builder()
        .template_id("minimal")
        .memory_mb(snapshot.manifest.config.memory_mb)
        .vcpus(snapshot.manifest.config.vcpus)
        .enable_network(networked)
        .start(StartMode::Snapshot)
        .boot_timeout_ms(90_000)
        .build()
        .unwrap();
    let loops: usize = std::env::var("NOVA_RESTORE_LOOPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let mut seen = 0;
    for _ in 0..loops {
        let sandbox = t.hypervisor.create_sandbox(config.clone()).await.unwrap();
        assert!(sandbox.info().boot.as_ref().unwrap().from_snapshot);
        let before = log.count("the restored agent did not answer");
        if before > seen {
            seen = before;
            let console =
                std::fs::read_to_string(sandbox.info().dir.join("console.log")).unwrap_or_default();
            eprintln!(
                "a retried handshake; console tail:\n{}",
                &console[console.len().saturating_sub(3000)..]
            );
        }
        sandbox.stop(true).await.unwrap();
    }
    let retried = log.count("the restored agent did not answer");
    eprintln!("{retried} of {loops} restores needed a second handshake");
    assert_eq!(
        retried, 0,
        "{retried} of {loops} first handshakes went unanswered"
    );
    assert!(t.sandbox_dirs().is_empty(), "{:?}", t.sandbox_dirs());
}
