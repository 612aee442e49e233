//! `nova doctor` on the machine the tests run on.

use std::path::Path;
use std::process::Command;

#[test]
fn doctor_reports_this_host() {
    let home = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_nova"))
        .arg("doctor")
        .env("NOVA_HOME", home.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("/dev/kvm:"), "{text}");
    assert!(
        text.contains(&format!("NOVA_HOME: {}", home.path().display())),
        "{text}"
    );
    // This project's machines have a paravirtualized KVM (kvm_pvm); doctor
    // must say so and must not pick a hardware-KVM backend.
    if Path::new("/sys/module/kvm_pvm").exists() && Path::new("/dev/kvm").exists() {
        assert!(text.contains("paravirtualized"), "{text}");
        assert!(!text.contains("backend: firecracker"), "{text}");
    }
    let has_qemu = text.contains("[ ok ] qemu:");
    assert_eq!(
        out.status.success(),
        has_qemu || text.contains("backend: firecracker"),
        "{text}"
    );
    if has_qemu {
        assert!(text.contains("[ ok ] backend: qemu microvm"), "{text}");
    }
}

#[test]
fn doctor_json_is_valid() {
    let home = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_nova"))
        .args(["doctor", "--json"])
        .env("NOVA_HOME", home.path())
        .output()
        .unwrap();
    let value: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(value["host"]["kvm"]["status"].is_string(), "{value}");
}
