//! End-to-end regression tests: commands and the guest behave as a shell and
//! a Docker user expect. Each test is named after a fault users of sandbox
//! systems have reported: commands that cannot start, a missing working
//! directory, a hostname that does not resolve, a clock left behind by a
//! pause. Real microVMs under QEMU, from the templates `make images` built.

#![allow(clippy::unwrap_used, reason = "test code")]

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{config, setup};
use nova_core::error::{ExecError, SpawnError, SpawnErrorKind};
use nova_core::exec::{ExecRequest, ExitStatus};
use nova_core::hypervisor::Hypervisor;
use nova_core::sandbox::Sandbox;

/// Runs `request`, which must fail to start; returns the spawn error.
async fn spawn_failure(sandbox: &Sandbox, request: ExecRequest) -> SpawnError {
    match sandbox.execute_command(request).await {
        Err(ExecError::Spawn(e)) => e,
        Err(other) => panic!("expected a spawn error, got {other:?}"),
        Ok(out) => panic!("the command ran: {out:?}"),
    }
}

/// A minimal ELF executable header for this machine whose `PT_INTERP`
/// (dynamic loader) is `interpreter`.
fn elf_needing(interpreter: &str) -> Vec<u8> {
    let machine: u16 = if cfg!(target_arch = "aarch64") {
        183
    } else {
        62
    };
    let mut interp = interpreter.as_bytes().to_vec();
    interp.push(0);
    let interp_off = 64u64 + 2 * 56;
    let total = interp_off + interp.len() as u64;
    let mut elf = b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0".to_vec();
    elf.extend_from_slice(&2u16.to_le_bytes());
    elf.extend_from_slice(&machine.to_le_bytes());
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&0x40_0000u64.to_le_bytes());
    elf.extend_from_slice(&64u64.to_le_bytes());
    elf.extend_from_slice(&0u64.to_le_bytes());
    elf.extend_from_slice(&0u32.to_le_bytes());
    for v in [64u16, 56, 2, 0, 0, 0] {
        elf.extend_from_slice(&v.to_le_bytes());
    }
    elf.extend_from_slice(&3u32.to_le_bytes()); // PT_INTERP
    elf.extend_from_slice(&4u32.to_le_bytes());
    for v in [
        interp_off,
        0,
        0,
        interp.len() as u64,
        interp.len() as u64,
        1,
    ] {
        elf.extend_from_slice(&v.to_le_bytes());
    }
    elf.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    elf.extend_from_slice(&5u32.to_le_bytes());
    for v in [0, 0x40_0000, 0x40_0000, total, total, 0x1000] {
        elf.extend_from_slice(&v.to_le_bytes());
    }
    elf.extend_from_slice(&interp);
    elf
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_that_cannot_start_exits_127_or_126_naming_what_is_missing() {
    let Some(t) = setup(
        "a_command_that_cannot_start_exits_127_or_126_naming_what_is_missing",
        &["minimal"],
    ) else {
        return;
    };
    let sandbox = t
        .hypervisor
        .create_sandbox(config("minimal"))
        .await
        .unwrap();

    // The input: `nova run -t minimal -- no-such-cmd`.
    let e = spawn_failure(&sandbox, ExecRequest::argv(["no-such-cmd"])).await;
    assert_eq!(e.kind, SpawnErrorKind::NotFound);
    assert_eq!(e.program, "no-such-cmd");
    assert_eq!(e.shell_code(), 127);
    assert_eq!(
        e.exit_status(),
        ExitStatus::NotStarted(SpawnErrorKind::NotFound)
    );
    assert_eq!(e.exit_status().shell_code(), 127);
    assert!(e.message.contains("no-such-cmd"), "{e}");
    assert!(e.message.contains("not found"), "{e}");

    let e = spawn_failure(&sandbox, ExecRequest::argv(["/opt/missing/tool", "-v"])).await;
    assert_eq!(e.kind, SpawnErrorKind::NotFound);
    assert!(e.message.contains("/opt/missing/tool"), "{e}");

    // Not executable.
    sandbox
        .write_file("/tmp/plain.sh", b"#!/bin/sh\necho hi\n".to_vec(), 0o644)
        .await
        .unwrap();
    let e = spawn_failure(&sandbox, ExecRequest::argv(["/tmp/plain.sh"])).await;
    assert_eq!(e.kind, SpawnErrorKind::NotExecutable);
    assert_eq!(e.shell_code(), 126);
    assert!(e.message.contains("/tmp/plain.sh"), "{e}");
    let e = spawn_failure(&sandbox, ExecRequest::argv(["/tmp"])).await;
    assert_eq!(e.kind, SpawnErrorKind::NotExecutable);
    assert!(e.message.contains("is a directory"), "{e}");

    // Bad interpreter: a missing one, and DOS line endings.
    sandbox
        .write_file(
            "/tmp/bad.sh",
            b"#!/usr/bin/python9\nprint(1)\n".to_vec(),
            0o755,
        )
        .await
        .unwrap();
    let e = spawn_failure(&sandbox, ExecRequest::argv(["/tmp/bad.sh"])).await;
    assert_eq!(e.kind, SpawnErrorKind::BadInterpreter);
    assert_eq!(e.shell_code(), 126);
    assert!(e.message.contains("/usr/bin/python9"), "{e}");
    sandbox
        .write_file("/tmp/dos.sh", b"#!/bin/sh\r\necho hi\r\n".to_vec(), 0o755)
        .await
        .unwrap();
    let e = spawn_failure(&sandbox, ExecRequest::argv(["/tmp/dos.sh"])).await;
    assert_eq!(e.kind, SpawnErrorKind::BadInterpreter);
    assert!(e.message.contains("DOS line endings"), "{e}");

    // A dynamically linked binary whose loader the image does not have.
    sandbox
        .write_file(
            "/tmp/glibc-tool",
            elf_needing("/lib/ld-nova-missing.so.2"),
            0o755,
        )
        .await
        .unwrap();
    let e = spawn_failure(&sandbox, ExecRequest::argv(["/tmp/glibc-tool"])).await;
    assert_eq!(e.kind, SpawnErrorKind::BadInterpreter, "{e}");
    assert!(e.message.contains("/lib/ld-nova-missing.so.2"), "{e}");

    // Exec format error.
    sandbox
        .write_file(
            "/tmp/data.bin",
            vec![0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0],
            0o755,
        )
        .await
        .unwrap();
    let e = spawn_failure(&sandbox, ExecRequest::argv(["/tmp/data.bin"])).await;
    assert_eq!(e.kind, SpawnErrorKind::ExecFormat);
    assert_eq!(e.shell_code(), 126);
    assert!(e.message.contains("/tmp/data.bin"), "{e}");

    // Through a shell the shell itself reports, with the same codes.
    let out = sandbox.execute_command("no-such-cmd").await.unwrap();
    assert_eq!(out.exit_code(), 127, "{out:?}");
    let out = sandbox.execute_command("/tmp/plain.sh").await.unwrap();
    assert_eq!(out.exit_code(), 126, "{out:?}");

    // The sandbox is fine afterwards.
    let out = sandbox.execute_command("echo ok").await.unwrap();
    assert_eq!(out.stdout_lossy(), "ok\n");
    sandbox.stop(true).await.unwrap();
    assert!(t.sandbox_dirs().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_working_directory_is_named_not_the_program() {
    let Some(t) = setup(
        "a_missing_working_directory_is_named_not_the_program",
        &["minimal"],
    ) else {
        return;
    };
    let sandbox = t
        .hypervisor
        .create_sandbox(config("minimal"))
        .await
        .unwrap();
    // The input: `nova run -t minimal --cwd /nonexistent -- pwd`.
    let e = spawn_failure(&sandbox, ExecRequest::argv(["pwd"]).cwd("/nonexistent")).await;
    assert_eq!(e.kind, SpawnErrorKind::CwdNotFound);
    assert_eq!(e.shell_code(), 127);
    assert!(e.message.contains("/nonexistent"), "{e}");
    assert!(e.message.contains("does not exist"), "{e}");
    assert!(
        !e.message.starts_with("pwd:"),
        "the program is not what is missing: {e}"
    );
    // Shell command lines the same; a file is not a directory.
    let e = spawn_failure(&sandbox, ExecRequest::shell("pwd").cwd("/no/such/dir")).await;
    assert_eq!(e.kind, SpawnErrorKind::CwdNotFound);
    assert!(e.message.contains("/no/such/dir"), "{e}");
    let e = spawn_failure(&sandbox, ExecRequest::argv(["pwd"]).cwd("/etc/hostname")).await;
    assert_eq!(e.kind, SpawnErrorKind::CwdUnusable);
    assert_eq!(e.shell_code(), 126);
    assert!(e.message.contains("/etc/hostname"), "{e}");
    // And an existing one works.
    let out = sandbox
        .execute_command(ExecRequest::argv(["pwd"]).cwd("/tmp"))
        .await
        .unwrap();
    assert_eq!(out.stdout_lossy(), "/tmp\n");
    sandbox.stop(true).await.unwrap();
}

/// What the guest says about its own identity.
struct Identity {
    hostname: String,
    resolved: String,
    etc_hostname: String,
    machine_id: String,
    hosts: String,
}

async fn identity(sandbox: &Sandbox) -> Identity {
    // The input, plus the files that must agree with it.
    let out = sandbox
        .execute_command(ExecRequest::argv([
            "python3",
            "-c",
            "import socket as s; print(s.gethostname()); print(s.gethostbyname(s.gethostname()))",
        ]))
        .await
        .unwrap();
    assert!(out.success(), "{}", out.stderr_lossy());
    let text = out.stdout_lossy();
    let mut lines = text.lines();
    let hostname = lines.next().unwrap_or_default().to_owned();
    let resolved = lines.next().unwrap_or_default().to_owned();
    let read = |path: &'static str| async move {
        String::from_utf8(sandbox.read_file(path).await.unwrap()).unwrap()
    };
    Identity {
        hostname,
        resolved,
        etc_hostname: read("/etc/hostname").await,
        machine_id: read("/etc/machine-id").await,
        hosts: read("/etc/hosts").await,
    }
}

fn check_identity(sandbox: &Sandbox, id: &Identity) {
    assert_eq!(id.hostname, sandbox.id().to_string());
    assert!(
        id.resolved.starts_with("127."),
        "{} resolves to {:?}; /etc/hosts:\n{}",
        id.hostname,
        id.resolved,
        id.hosts
    );
    assert_eq!(id.etc_hostname, format!("{}\n", id.hostname));
    assert!(
        id.hosts
            .lines()
            .any(|l| l.split_whitespace().next() == Some("127.0.0.1")
                && l.split_whitespace().any(|w| w == "localhost")),
        "{}",
        id.hosts
    );
    let machine_id = id.machine_id.trim_end();
    assert_eq!(machine_id.len(), 32, "{:?}", id.machine_id);
    assert!(
        machine_id.bytes().all(|b| b.is_ascii_hexdigit()),
        "{machine_id}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guest_hostname_resolves_and_its_identity_is_its_own() {
    let Some(t) = setup(
        "the_guest_hostname_resolves_and_its_identity_is_its_own",
        &["python"],
    ) else {
        return;
    };
    let writable = t.hypervisor.create_sandbox(config("python")).await.unwrap();
    let mut c = config("python");
    c.read_only_rootfs = true;
    let read_only = t.hypervisor.create_sandbox(c).await.unwrap();

    let a = identity(&writable).await;
    check_identity(&writable, &a);
    let b = identity(&read_only).await;
    check_identity(&read_only, &b);
    assert_ne!(
        a.machine_id, b.machine_id,
        "machine ids must differ per sandbox"
    );

    // The read-only root stays read-only, /etc included.
    let out = read_only.execute_command("echo x > /etc/x").await.unwrap();
    assert!(!out.success());
    let out = read_only
        .execute_command("echo x > /etc/hosts")
        .await
        .unwrap();
    assert!(!out.success());
    writable.stop(true).await.unwrap();
    read_only.stop(true).await.unwrap();
    assert!(t.sandbox_dirs().is_empty());
}

fn host_now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guest_clock_is_right_after_a_pause() {
    let Some(t) = setup("the_guest_clock_is_right_after_a_pause", &["minimal"]) else {
        return;
    };
    let sandbox = t
        .hypervisor
        .create_sandbox(config("minimal"))
        .await
        .unwrap();
    sandbox.pause().await.unwrap();
    // The input: paused for 10 s.
    tokio::time::sleep(Duration::from_secs(10)).await;
    sandbox.resume().await.unwrap();
    let before = host_now_secs();
    let out = sandbox.execute_command("date +%s").await.unwrap();
    let after = host_now_secs();
    let guest: f64 = out.stdout_lossy().trim().parse().unwrap();
    // `date +%s` truncates to the second: the guest's clock read somewhere
    // in [before, after] shows as floor(...). Within 1 s of the host:
    assert!(
        guest >= before.floor() - 1.0 && guest <= after + 1.0,
        "guest clock {guest} vs host {before:.3}..{after:.3} right after resume"
    );
    sandbox.stop(true).await.unwrap();
}
