//! Creating a sandbox spawns no process but the VMM: no `mkfs` per sandbox,
//! no `cp` for disks, no helper tools. Without a network, that is: a
//! sandbox's network is set up with `nft` (two runs per create), which this
//! test keeps out with `--no-network`. Checked by running `nova run` with a
//! `PATH` holding only a logging wrapper around QEMU, so any program the
//! create path started by name would be missing (and fail the run), and the
//! wrapper's log shows every QEMU start.

#![allow(clippy::unwrap_used, reason = "test code")]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};

use novasandbox::core::NovaHome;
use novasandbox::runtime::host::HostReport;

fn nova_run(home: &Path, path_env: &str, qemu: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_nova"))
        .args([
            "run",
            "--template",
            "minimal",
            "--memory",
            "256",
            "--vcpus",
            "1",
            "--no-network",
            "--",
            "true",
        ])
        .env("NOVA_HOME", home)
        .env("NOVA_QEMU_BIN", qemu)
        .env("PATH", path_env)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn creating_a_sandbox_spawns_only_the_vmm() {
    let templates = NovaHome::resolve().unwrap().templates_dir();
    if !templates.join("minimal/minimal.json").is_file() {
        if std::env::var_os("NOVA_SKIP_VM_TESTS").is_some_and(|v| v == "1") {
            eprintln!("SKIP creating_a_sandbox_spawns_only_the_vmm: no minimal template");
            return;
        }
        panic!(
            "the minimal template is not built in {}; run `make images`",
            templates.display()
        );
    }
    let real_qemu = HostReport::probe()
        .qemu
        .expect("qemu-system-x86_64 is installed (make deps)")
        .path;
    let home = tempfile::Builder::new()
        .prefix("nova-spawn-")
        .tempdir_in("/tmp")
        .unwrap();
    std::os::unix::fs::symlink(&templates, home.path().join("templates")).unwrap();
    let spy = home.path().join("spy");
    std::fs::create_dir(&spy).unwrap();
    let log = spy.join("qemu.log");
    let wrapper = spy.join("qemu-system-x86_64");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\necho \"$*\" >> {}\nexec {} \"$@\"\n",
            log.display(),
            real_qemu.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();

    // The first run on this NOVA_HOME may make the empty scratch image
    // (mkfs, once per home); it has the normal PATH.
    let first = nova_run(home.path(), &std::env::var("PATH").unwrap(), &wrapper);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    std::fs::remove_file(&log).unwrap();

    // Now nothing but the wrapper can be found by name.
    let second = nova_run(home.path(), spy.to_str().unwrap(), &wrapper);
    assert!(
        second.status.success(),
        "a create needed a program besides the VMM: {}",
        String::from_utf8_lossy(&second.stderr)
    );
    let starts = std::fs::read_to_string(&log).unwrap();
    let vmm_starts: Vec<&str> = starts.lines().filter(|l| l.contains("microvm")).collect();
    let others: Vec<&str> = starts
        .lines()
        .filter(|l| !l.contains("microvm") && !l.contains("version"))
        .collect();
    assert_eq!(vmm_starts.len(), 1, "{starts}");
    assert!(
        others.is_empty(),
        "QEMU was run for more than the VM and version probes: {others:?}"
    );
}
