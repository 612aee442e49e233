//! Shared set-up of the end-to-end tests: a private `$NOVA_HOME` per test
//! whose `templates/` points at the templates `make images` built, and a
//! QEMU provider on it.
//!
//! Without built templates the tests fail with the command to build them,
//! unless `NOVA_SKIP_VM_TESTS=1`, which makes them print a SKIP line and
//! return.

#![allow(
    dead_code,
    unreachable_pub,
    reason = "each test file uses a different part"
)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nova_core::config::SandboxConfig;
use nova_core::home::NovaHome;
use nova_qemu::{QemuHypervisor, QemuOptions};
use nova_runtime::host::HostReport;

/// A test's private data directory and the provider using it.
pub struct TestHome {
    pub dir: tempfile::TempDir,
    pub hypervisor: QemuHypervisor,
}

impl TestHome {
    pub fn home(&self) -> NovaHome {
        NovaHome::at(self.dir.path())
    }

    /// The sandboxes directory, which must be empty once every sandbox
    /// stopped.
    pub fn sandbox_dirs(&self) -> Vec<PathBuf> {
        match std::fs::read_dir(self.home().sandboxes_dir()) {
            Ok(entries) => entries.map(|e| e.unwrap().path()).collect(),
            Err(_) => Vec::new(),
        }
    }
}

/// The templates directory that `make images` filled.
pub fn shared_templates() -> PathBuf {
    match std::env::var_os("NOVA_TEMPLATES_DIR") {
        Some(dir) => dir.into(),
        None => NovaHome::resolve().expect("a NOVA_HOME").templates_dir(),
    }
}

/// Sets up a test home if the templates `needed` are built; `None` (after
/// printing SKIP) when they are not and NOVA_SKIP_VM_TESTS=1.
pub fn setup(test: &str, needed: &[&str]) -> Option<TestHome> {
    let templates = shared_templates();
    let missing: Vec<&str> = needed
        .iter()
        .copied()
        .filter(|id| !templates.join(id).join(format!("{id}.json")).is_file())
        .collect();
    if !missing.is_empty() {
        if std::env::var_os("NOVA_SKIP_VM_TESTS").is_some_and(|v| v == "1") {
            eprintln!(
                "SKIP {test}: templates {missing:?} not built in {} (NOVA_SKIP_VM_TESTS=1)",
                templates.display()
            );
            return None;
        }
        panic!(
            "{test}: templates {missing:?} are not built in {}; run `make images` (or set \
             NOVA_SKIP_VM_TESTS=1 to skip VM tests)",
            templates.display()
        );
    }
    let report = HostReport::probe();
    let accel = report.qemu_accel();
    let qemu = report
        .qemu
        .expect("qemu-system-x86_64 must be installed: run `make deps`");
    // Short paths keep the Unix sockets under the 108-byte limit.
    let dir = tempfile::Builder::new()
        .prefix("nova-e2e-")
        .tempdir_in("/tmp")
        .unwrap();
    std::os::unix::fs::symlink(&templates, dir.path().join("templates")).unwrap();
    let options = QemuOptions {
        home: NovaHome::at(dir.path()),
        qemu_bin: qemu.path,
        accel,
        scratch_size_mb: 1024,
    };
    Some(TestHome {
        dir,
        hypervisor: QemuHypervisor::new(options),
    })
}

/// A config for tests: generous boot timeout (emulated boots on a loaded
/// 2-core machine), small memory, no network.
pub fn config(template: &str) -> SandboxConfig {
    SandboxConfig::builder()
        .template_id(template)
        .memory_mb(256)
        .vcpus(1)
        .boot_timeout_ms(90_000)
        .enable_network(false)
        .build()
        .unwrap()
}

/// Polls `condition` every 20 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if condition() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    condition()
}

/// Whether a process with this pid exists (zombies included).
pub fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}
