//! Helpers shared by the Firecracker integration tests and the benchmark.
//!
//! The tests run against a real `firecracker` named by `NOVA_FIRECRACKER_BIN`
//! and skip loudly without one. They boot [`write_test_kernel`]'s guest: a
//! 150-byte ELF whose entry point polls the i8042 status port and, once a key
//! is waiting (Firecracker's `SendCtrlAltDel`), pulses the reset line. It
//! needs no hardware virtualization to be fast, so the VMM lifecycle
//! (configure, start, pause, snapshot, restore, graceful and forced stop) is
//! testable on a host whose KVM cannot boot a standard kernel.

#![allow(
    clippy::unwrap_used,
    clippy::print_stdout,
    dead_code,
    unreachable_pub,
    reason = "test code"
)]

use std::path::{Path, PathBuf};

use nova_core::home::NovaHome;
use nova_firecracker::binary::FirecrackerBinary;
use nova_firecracker::{FirecrackerHypervisor, FirecrackerOptions};

/// The Firecracker binary to test with, or `None` after printing why the
/// test is skipped.
pub fn firecracker(test: &str) -> Option<FirecrackerBinary> {
    match std::env::var_os("NOVA_FIRECRACKER_BIN").filter(|v| !v.is_empty()) {
        Some(path) => Some(FirecrackerBinary::at(PathBuf::from(path)).unwrap()),
        None => {
            println!("SKIP {test}: NOVA_FIRECRACKER_BIN not set");
            eprintln!("SKIP {test}: NOVA_FIRECRACKER_BIN not set");
            None
        }
    }
}

/// Load address of the test guest (1 MiB, where Linux kernels load too).
const LOAD_ADDR: u64 = 0x10_0000;

/// x86-64 code of the test guest, run from its ELF entry point in 64-bit
/// mode:
///
/// ```text
/// 0:  mov ecx, 0x10000      ; delay, so the vCPU is not in a tight exit loop
/// 5:  pause
///     dec ecx
///     jnz 5
/// 11: in al, 0x64           ; i8042 status
///     test al, 1            ; output buffer full?
///     jz 0
/// 17: mov al, 0xfe          ; i8042 "pulse reset line"
///     out 0x64, al          ; Firecracker ends the VM (exit code 0)
/// 21: hlt
///     jmp 21
/// ```
const GUEST_CODE: [u8; 24] = [
    0xB9, 0x00, 0x00, 0x01, 0x00, // mov ecx, 0x10000
    0xF3, 0x90, // pause
    0xFF, 0xC9, // dec ecx
    0x75, 0xFA, // jnz -6
    0xE4, 0x64, // in al, 0x64
    0xA8, 0x01, // test al, 1
    0x74, 0xEF, // jz -17
    0xB0, 0xFE, // mov al, 0xfe
    0xE6, 0x64, // out 0x64, al
    0xF4, // hlt
    0xEB, 0xFD, // jmp -3
];

/// Writes the test guest as an ELF64 executable with one loadable segment.
pub fn write_test_kernel(path: &Path) {
    const EHDR: u16 = 64;
    const PHDR: u16 = 56;
    let offset = u64::from(EHDR + PHDR);
    let mut elf = Vec::new();
    elf.extend_from_slice(b"\x7fELF");
    elf.extend_from_slice(&[2, 1, 1, 0]); // 64-bit, little-endian, v1, SysV
    elf.extend_from_slice(&[0; 8]);
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&0x3Eu16.to_le_bytes()); // x86-64
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // entry
    elf.extend_from_slice(&u64::from(EHDR).to_le_bytes()); // phoff
    elf.extend_from_slice(&0u64.to_le_bytes()); // shoff
    elf.extend_from_slice(&0u32.to_le_bytes()); // flags
    for half in [EHDR, PHDR, 1, 64, 0, 0] {
        elf.extend_from_slice(&half.to_le_bytes());
    }
    elf.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    elf.extend_from_slice(&5u32.to_le_bytes()); // R+X
    for word in [
        offset,
        LOAD_ADDR,
        LOAD_ADDR,
        GUEST_CODE.len() as u64,
        GUEST_CODE.len() as u64,
        0x1000,
    ] {
        elf.extend_from_slice(&word.to_le_bytes());
    }
    elf.extend_from_slice(&GUEST_CODE);
    std::fs::write(path, elf).unwrap();
}

/// Installs template `id` (the test guest and a 1 MiB blank rootfs) under
/// `home`.
pub fn install_test_template(home: &Path, id: &str) {
    let dir = home.join("templates").join(id);
    std::fs::create_dir_all(&dir).unwrap();
    write_test_kernel(&dir.join("vmlinux"));
    let rootfs = std::fs::File::create(dir.join("rootfs.ext4")).unwrap();
    rootfs.set_len(1024 * 1024).unwrap();
    let manifest = serde_json::json!({
        "name": "Firecracker test guest", "template_id": id, "os_type": "linux",
        "memory_mb": 128, "vcpus": 1, "boot_time_ms": 0, "disk_size_gb": 0.001,
        "kernel_version": "none", "required_files": ["vmlinux", "rootfs.ext4"],
        "packages": []
    });
    std::fs::write(
        dir.join(format!("{id}.json")),
        serde_json::to_vec_pretty(&manifest).unwrap(),
    )
    .unwrap();
}

/// A provider in `home` that runs the VMM without waiting for an agent and
/// accepts a paravirtualized KVM.
pub fn vmm_only(home: &Path, binary: FirecrackerBinary) -> FirecrackerHypervisor {
    FirecrackerHypervisor::new(vmm_only_options(home, binary))
}

/// The options of [`vmm_only`].
pub fn vmm_only_options(home: &Path, binary: FirecrackerBinary) -> FirecrackerOptions {
    let mut options = FirecrackerOptions::new(NovaHome::at(home), binary);
    options.wait_for_agent = false;
    options.allow_non_hardware_kvm = true;
    options.scratch_size_mb = 64;
    // Unjailed even as root with a jailer around: these tests are about the
    // VMM's lifecycle, and a jail needs a cgroup set-up of its own.
    options.jailer = None;
    options
}

/// Whether process `pid` still exists (zombies count as gone).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let state = s[s.rfind(')')? + 1..].split_whitespace().next()?.to_owned();
            Some(state != "Z")
        })
        .unwrap_or(false)
}

/// Entries left in `$NOVA_HOME/sandboxes`.
pub fn leftovers(home: &Path) -> Vec<PathBuf> {
    match std::fs::read_dir(home.join("sandboxes")) {
        Ok(entries) => entries.map(|e| e.unwrap().path()).collect(),
        Err(_) => Vec::new(),
    }
}
