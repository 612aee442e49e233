//! `nova` run by an unprivileged user (`nobody`, through `setpriv`) picks the
//! user-mode network by itself: `nova doctor` says so, `nova run` boots a
//! networked sandbox with a published port through passt, and an egress
//! policy is refused with a message that says to run as root. The guest
//! sends no traffic.
//!
//! Needs root (to become `nobody`), `setpriv`, `passt`, the minimal
//! template (`NOVA_TEMPLATES_DIR`, else `$NOVA_HOME/templates`), and a
//! `nova` binary and templates that `nobody` can read; otherwise it prints
//! a SKIP line.

#![allow(clippy::unwrap_used, reason = "test code")]

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use novasandbox::core::NovaHome;

const NOBODY: u32 = 65534;

/// `nova ARGS` as `nobody`, with `home` as its `NOVA_HOME`.
fn as_nobody(home: &Path, args: &[&str]) -> Output {
    Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--",
            env!("CARGO_BIN_EXE_nova"),
        ])
        .args(args)
        .env("NOVA_HOME", home)
        .env("HOME", home)
        .env_remove("NOVA_NET_MODE")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Why this test cannot run here, if it cannot.
fn unavailable(templates: &Path) -> Option<String> {
    if !rustix::process::geteuid().is_root() {
        return Some("needs root to run nova as nobody".into());
    }
    if nova_runtime_passt_missing() {
        return Some("passt is not installed (make deps)".into());
    }
    if !templates.join("minimal/minimal.json").is_file() {
        return Some(format!(
            "the minimal template is not built in {}",
            templates.display()
        ));
    }
    let readable = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .args([
            "sh",
            "-c",
            "test -x \"$0\" && test -r \"$1\"/minimal/rootfs.ext4",
        ])
        .arg(env!("CARGO_BIN_EXE_nova"))
        .arg(templates)
        .status();
    match readable {
        Ok(s) if s.success() => None,
        Ok(_) => Some("nobody cannot run the nova binary or read the templates".into()),
        Err(e) => Some(format!("setpriv cannot be run: {e}")),
    }
}

fn nova_runtime_passt_missing() -> bool {
    novasandbox::runtime::network::user_mode_unsupported_reason().is_some()
}

/// The passt processes `nobody` runs.
fn nobodys_passts() -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            comm.starts_with("passt")
                && status
                    .lines()
                    .find_map(|l| l.strip_prefix("Uid:"))
                    .and_then(|ids| ids.split_whitespace().next())
                    .and_then(|uid| uid.parse::<u32>().ok())
                    == Some(NOBODY)
        })
        .collect()
}

#[test]
fn an_unprivileged_user_gets_the_user_mode_network() {
    let test = "an_unprivileged_user_gets_the_user_mode_network";
    let templates = match std::env::var_os("NOVA_TEMPLATES_DIR") {
        Some(dir) => dir.into(),
        None => NovaHome::resolve().unwrap().templates_dir(),
    };
    if let Some(why) = unavailable(&templates) {
        eprintln!("SKIP {test}: {why}");
        return;
    }
    let home = tempfile::Builder::new()
        .prefix("nova-rootless-")
        .tempdir_in("/tmp")
        .unwrap();
    std::os::unix::fs::symlink(&templates, home.path().join("templates")).unwrap();
    rustix::fs::chown(
        home.path(),
        Some(rustix::process::Uid::from_raw(NOBODY)),
        Some(rustix::process::Gid::from_raw(NOBODY)),
    )
    .unwrap();

    let doctor = as_nobody(home.path(), &["doctor", "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&doctor.stdout).unwrap_or_else(|e| {
        panic!(
            "doctor --json: {e}: {}",
            String::from_utf8_lossy(&doctor.stderr)
        )
    });
    assert_eq!(
        report["sandbox_network"]["mode"], "user",
        "{:#}",
        report["sandbox_network"]
    );
    assert_eq!(report["sandbox_network"]["namespace"]["available"], false);

    let before = nobodys_passts();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let publish = format!("{port}:80");
    let run = as_nobody(
        home.path(),
        &[
            "run",
            "--template",
            "minimal",
            "--memory",
            "256",
            "--vcpus",
            "1",
            "--boot-timeout-ms",
            "90000",
            "--publish",
            &publish,
            "--sh",
            "grep -c 169.254.0.21 /proc/net/fib_trie && cat /sys/class/net/eth0/mtu",
        ],
    );
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "nova run as nobody: {:?}\n{stdout}\n{}",
        run.status,
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(
        stdout.lines().last() == Some("1500"),
        "the guest has eth0 with the namespace mode's MTU: {stdout}"
    );
    // passt goes with the VMM when `nova run` stops its sandbox.
    let deadline = Instant::now() + Duration::from_secs(10);
    while nobodys_passts().len() > before.len() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(nobodys_passts().len(), before.len(), "no passt is left");

    let refused = as_nobody(
        home.path(),
        &[
            "run",
            "--template",
            "minimal",
            "--allow-egress",
            "198.18.0.0/15",
            "--",
            "true",
        ],
    );
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "an egress policy is refused");
    assert!(
        stderr.contains("egress policy") && stderr.contains("CAP_NET_ADMIN"),
        "{stderr}"
    );
    // Nothing of the refused sandbox stays.
    let left: Vec<_> = std::fs::read_dir(home.path().join("sandboxes"))
        .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
}
