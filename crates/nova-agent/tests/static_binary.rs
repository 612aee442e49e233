//! The guest rootfs has no C library, so the agent must be a static binary.
//!
//! This test runs exactly the command the image builder runs:
//!
//! ```text
//! RUSTFLAGS="-C target-feature=+crt-static" \
//!   cargo build -p nova-agent --profile agent --target x86_64-unknown-linux-gnu
//! ```
//!
//! (a no-op when it is up to date), then checks the ELF file at
//! `target/x86_64-unknown-linux-gnu/agent/nova-agent` has no program
//! interpreter and needs no shared library, and that it runs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;
const DT_NULL: u64 = 0;
const DT_NEEDED: u64 = 1;

/// Why an ELF file is not a static executable.
#[derive(Debug, PartialEq, Eq)]
enum NotStatic {
    NotElf64,
    HasInterpreter,
    NeedsLibraries(usize),
    Truncated,
}

fn u16_at(b: &[u8], at: usize) -> Result<u16, NotStatic> {
    Ok(u16::from_le_bytes(
        b.get(at..at + 2)
            .ok_or(NotStatic::Truncated)?
            .try_into()
            .unwrap(),
    ))
}
fn u32_at(b: &[u8], at: usize) -> Result<u32, NotStatic> {
    Ok(u32::from_le_bytes(
        b.get(at..at + 4)
            .ok_or(NotStatic::Truncated)?
            .try_into()
            .unwrap(),
    ))
}
fn u64_at(b: &[u8], at: usize) -> Result<u64, NotStatic> {
    Ok(u64::from_le_bytes(
        b.get(at..at + 8)
            .ok_or(NotStatic::Truncated)?
            .try_into()
            .unwrap(),
    ))
}

/// Checks a little-endian ELF64 executable for static linking: no
/// `PT_INTERP` segment and no `DT_NEEDED` entry (a static-pie keeps a
/// `PT_DYNAMIC` for its own relocations, but needs nothing).
fn check_static(elf: &[u8]) -> Result<(), NotStatic> {
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" || elf[4] != 2 || elf[5] != 1 {
        return Err(NotStatic::NotElf64);
    }
    let phoff = u64_at(elf, 0x20)? as usize;
    let phentsize = u16_at(elf, 0x36)? as usize;
    let phnum = u16_at(elf, 0x38)? as usize;
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        match u32_at(elf, ph)? {
            PT_INTERP => return Err(NotStatic::HasInterpreter),
            PT_DYNAMIC => {
                let offset = u64_at(elf, ph + 8)? as usize;
                let size = u64_at(elf, ph + 32)? as usize;
                let mut needed = 0;
                for entry in (offset..offset + size).step_by(16) {
                    match u64_at(elf, entry)? {
                        DT_NULL => break,
                        DT_NEEDED => needed += 1,
                        _ => {}
                    }
                }
                if needed > 0 {
                    return Err(NotStatic::NeedsLibraries(needed));
                }
            }
            _ => {}
        }
    }
    Ok(())
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("crates/nova-agent is two levels below the workspace root")
        .to_path_buf()
}

#[test]
fn agent_builds_as_a_static_binary() {
    let root = workspace_root();
    let status = Command::new(env!("CARGO"))
        .args([
            "build",
            "-p",
            "nova-agent",
            "--profile",
            "agent",
            "--target",
            "x86_64-unknown-linux-gnu",
        ])
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .current_dir(&root)
        .status()
        .expect("run cargo");
    assert!(status.success(), "static build failed: {status}");
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let binary = target_dir.join("x86_64-unknown-linux-gnu/agent/nova-agent");
    let elf = std::fs::read(&binary).unwrap_or_else(|e| panic!("read {}: {e}", binary.display()));
    assert_eq!(
        check_static(&elf),
        Ok(()),
        "{} is not static",
        binary.display()
    );
    let out = Command::new(&binary).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("nova-agent "));
}

#[test]
fn the_check_rejects_dynamic_binaries_and_non_elf_files() {
    // This test binary itself is dynamically linked.
    let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
    let verdict = check_static(&me);
    assert!(
        matches!(
            verdict,
            Err(NotStatic::HasInterpreter | NotStatic::NeedsLibraries(_))
        ),
        "{verdict:?}"
    );
    assert_eq!(check_static(b"#!/bin/sh\n"), Err(NotStatic::NotElf64));
    let mut cut = me[..64].to_vec();
    cut[0x20..0x28].copy_from_slice(&10_000u64.to_le_bytes());
    assert_eq!(check_static(&cut), Err(NotStatic::Truncated));
}
