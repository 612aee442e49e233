//! Commands that cannot start: every way `exec` can fail comes back as a
//! `Spawn` error whose kind gives the shell's exit status (127 / 126) and
//! whose message names what is missing. The agent runs as a normal process
//! here; the same code runs as PID 1 in the guest.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::TestAgent;
use nova_protocol::client::{AgentClient, ClientError};
use nova_protocol::{ExecSpec, RemoteErrorKind, SpawnErrorKind};

/// Starts `spec`, which must fail to start; returns the kind and message.
async fn spawn_failure(client: &AgentClient, spec: ExecSpec) -> (SpawnErrorKind, String) {
    match client.exec(spec).await {
        Err(ClientError::Remote {
            kind: RemoteErrorKind::Spawn(kind),
            message,
        }) => (kind, message),
        Err(other) => panic!("expected a spawn error, got {other}"),
        Ok(_) => panic!("the command started"),
    }
}

fn write_executable(path: &Path, content: &[u8], mode: u32) {
    std::fs::write(path, content).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A minimal x86-64-style ELF executable header with a `PT_INTERP` naming
/// `interpreter` and machine type `machine`.
fn elf_with_interpreter(interpreter: &str, machine: u16) -> Vec<u8> {
    let mut interp = interpreter.as_bytes().to_vec();
    interp.push(0);
    let phoff = 64u64;
    let interp_off = phoff + 2 * 56;
    let total = interp_off + interp.len() as u64;
    let mut elf = Vec::new();
    elf.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&machine.to_le_bytes());
    elf.extend_from_slice(&1u32.to_le_bytes()); // EV_CURRENT
    elf.extend_from_slice(&0x40_0000u64.to_le_bytes()); // entry
    elf.extend_from_slice(&phoff.to_le_bytes());
    elf.extend_from_slice(&0u64.to_le_bytes()); // no section headers
    elf.extend_from_slice(&0u32.to_le_bytes()); // flags
    elf.extend_from_slice(&64u16.to_le_bytes()); // ehsize
    elf.extend_from_slice(&56u16.to_le_bytes()); // phentsize
    elf.extend_from_slice(&2u16.to_le_bytes()); // phnum
    elf.extend_from_slice(&[0; 6]); // shentsize, shnum, shstrndx
    // PT_INTERP
    elf.extend_from_slice(&3u32.to_le_bytes());
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
    // PT_LOAD of the whole file
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&5u32.to_le_bytes());
    for v in [0, 0x40_0000, 0x40_0000, total, total, 0x1000] {
        elf.extend_from_slice(&v.to_le_bytes());
    }
    elf.extend_from_slice(&interp);
    elf
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_not_found_is_127_and_names_the_program() {
    let agent = TestAgent::start().await;
    let (client, _) = agent.connect().await;
    let (kind, message) = spawn_failure(&client, ExecSpec::argv(["no-such-cmd"])).await;
    assert_eq!(kind, SpawnErrorKind::NotFound);
    assert_eq!(kind.shell_code(), 127);
    assert!(message.starts_with("no-such-cmd: "), "{message}");
    assert!(message.contains("not found"), "{message}");

    // With an explicit PATH (as PID 1 always has) the same.
    let (kind, message) = spawn_failure(
        &client,
        ExecSpec::argv(["no-such-cmd", "arg"]).env("PATH", "/usr/bin:/bin"),
    )
    .await;
    assert_eq!(kind, SpawnErrorKind::NotFound, "{message}");

    // A path to nothing.
    let (kind, message) = spawn_failure(&client, ExecSpec::argv(["/nonexistent/program"])).await;
    assert_eq!(kind, SpawnErrorKind::NotFound);
    assert!(message.contains("/nonexistent/program"), "{message}");
    assert!(message.contains("no such file"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_that_is_not_executable_is_126_and_says_why() {
    let agent = TestAgent::start().await;
    let (client, _) = agent.connect().await;
    let script = agent.dir().join("no-x-bit.sh");
    write_executable(&script, b"#!/bin/sh\necho hi\n", 0o644);
    let (kind, message) = spawn_failure(&client, ExecSpec::argv([script.to_str().unwrap()])).await;
    assert_eq!(kind, SpawnErrorKind::NotExecutable);
    assert_eq!(kind.shell_code(), 126);
    assert!(message.contains("no-x-bit.sh"), "{message}");
    assert!(message.contains("not executable"), "{message}");

    let dir = agent.dir().to_str().unwrap().to_owned();
    let (kind, message) = spawn_failure(&client, ExecSpec::argv([dir.as_str()])).await;
    assert_eq!(kind, SpawnErrorKind::NotExecutable);
    assert!(message.contains("is a directory"), "{message}");

    // Found in PATH, but not executable: execvp's EACCES, named.
    let (kind, message) =
        spawn_failure(&client, ExecSpec::argv(["no-x-bit.sh"]).env("PATH", &dir)).await;
    assert_eq!(kind, SpawnErrorKind::NotExecutable, "{message}");
    assert!(message.contains("no-x-bit.sh"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_script_with_a_missing_interpreter_is_a_bad_interpreter_named() {
    let agent = TestAgent::start().await;
    let (client, _) = agent.connect().await;
    let script = agent.dir().join("bad-interp.sh");
    write_executable(&script, b"#!/nonexistent/interp -x\necho hi\n", 0o755);
    let (kind, message) = spawn_failure(&client, ExecSpec::argv([script.to_str().unwrap()])).await;
    assert_eq!(kind, SpawnErrorKind::BadInterpreter);
    assert_eq!(kind.shell_code(), 126);
    assert!(message.contains("bad-interp.sh"), "{message}");
    assert!(message.contains("/nonexistent/interp"), "{message}");

    // The classic: a script saved with DOS line endings.
    let script = agent.dir().join("dos.sh");
    write_executable(&script, b"#!/bin/sh\r\necho hi\r\n", 0o755);
    let (kind, message) = spawn_failure(&client, ExecSpec::argv([script.to_str().unwrap()])).await;
    assert_eq!(kind, SpawnErrorKind::BadInterpreter);
    assert!(message.contains("/bin/sh\\r"), "{message}");
    assert!(message.contains("DOS line endings"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_binary_whose_elf_interpreter_is_missing_names_the_loader() {
    let agent = TestAgent::start().await;
    let (client, _) = agent.connect().await;
    let binary = agent.dir().join("needs-musl");
    let native = if cfg!(target_arch = "aarch64") {
        183
    } else {
        62
    };
    write_executable(
        &binary,
        &elf_with_interpreter("/lib/ld-musl-nova.so.1", native),
        0o755,
    );
    let (kind, message) = spawn_failure(&client, ExecSpec::argv([binary.to_str().unwrap()])).await;
    assert_eq!(kind, SpawnErrorKind::BadInterpreter, "{message}");
    assert!(message.contains("needs-musl"), "{message}");
    assert!(message.contains("/lib/ld-musl-nova.so.1"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_format_errors_are_126_and_say_what_the_file_is() {
    let agent = TestAgent::start().await;
    let (client, _) = agent.connect().await;
    // An ELF binary for a machine no kernel runs.
    let binary = agent.dir().join("foreign");
    write_executable(&binary, &elf_with_interpreter("/lib/ld.so", 0x1234), 0o755);
    let (kind, message) = spawn_failure(&client, ExecSpec::argv([binary.to_str().unwrap()])).await;
    assert_eq!(kind, SpawnErrorKind::ExecFormat, "{message}");
    assert_eq!(kind.shell_code(), 126);
    assert!(message.contains("foreign"), "{message}");
    assert!(message.contains("machine type 4660"), "{message}");

    // Neither ELF nor a #! script.
    let data = agent.dir().join("data.bin");
    write_executable(&data, &[0xde, 0xad, 0xbe, 0xef, 0, 1, 2, 3], 0o755);
    let (kind, message) = spawn_failure(&client, ExecSpec::argv([data.to_str().unwrap()])).await;
    assert_eq!(kind, SpawnErrorKind::ExecFormat, "{message}");
    assert!(message.contains("exec format error"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_working_directory_is_named_not_the_program() {
    let agent = TestAgent::start().await;
    let (client, _) = agent.connect().await;
    let (kind, message) = spawn_failure(&client, ExecSpec::argv(["pwd"]).cwd("/nonexistent")).await;
    assert_eq!(kind, SpawnErrorKind::CwdNotFound);
    assert_eq!(kind.shell_code(), 127);
    assert!(message.contains("/nonexistent"), "{message}");
    assert!(message.contains("working directory"), "{message}");
    assert!(message.contains("does not exist"), "{message}");

    // Shell command lines the same.
    let (kind, message) =
        spawn_failure(&client, ExecSpec::shell("pwd").cwd("/nonexistent/dir")).await;
    assert_eq!(kind, SpawnErrorKind::CwdNotFound);
    assert!(message.contains("/nonexistent/dir"), "{message}");

    // A file is not a working directory.
    let file = agent.dir().join("plain-file");
    std::fs::write(&file, b"x").unwrap();
    let (kind, message) =
        spawn_failure(&client, ExecSpec::argv(["pwd"]).cwd(file.to_str().unwrap())).await;
    assert_eq!(kind, SpawnErrorKind::CwdUnusable);
    assert_eq!(kind.shell_code(), 126);
    assert!(message.contains("plain-file"), "{message}");
    assert!(message.contains("not a directory"), "{message}");

    // The agent is still fine.
    let out = client.run(ExecSpec::argv(["true"])).await.unwrap();
    assert!(out.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawn_failures_on_a_pty_are_diagnosed_too() {
    let agent = TestAgent::start().await;
    let (client, _) = agent.connect().await;
    let (kind, message) = spawn_failure(
        &client,
        ExecSpec::argv(["no-such-cmd"]).pty(nova_protocol::PtySize::default()),
    )
    .await;
    assert_eq!(kind, SpawnErrorKind::NotFound, "{message}");
    let (kind, _) = spawn_failure(
        &client,
        ExecSpec::argv(["true"])
            .cwd("/nonexistent")
            .pty(nova_protocol::PtySize::default()),
    )
    .await;
    assert_eq!(kind, SpawnErrorKind::CwdNotFound);
}
