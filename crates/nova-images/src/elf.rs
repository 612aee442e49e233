//! Just enough ELF parsing to check what we build and bake in.
//!
//! Two questions matter to image builds, and both are answered from the ELF64
//! header and program headers alone (never the whole file, a kernel is tens of
//! megabytes):
//!
//! * Is this `vmlinux` an x86-64 executable with a PVH entry point? QEMU boots
//!   an uncompressed kernel only through the Xen `PHYS32_ENTRY` ELF note
//!   (name `"Xen"`, type 18), which `CONFIG_PVH` adds; Firecracker reads the
//!   same note.
//! * Is this binary static? A guest rootfs may have no dynamic loader, so the
//!   agent and busybox must have no `PT_INTERP` (static-pie is fine).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// `e_machine` of x86-64.
pub const EM_X86_64: u16 = 62;
/// `e_machine` of AArch64.
pub const EM_AARCH64: u16 = 183;
/// Note type of the Xen PVH 32-bit entry point (`XEN_ELFNOTE_PHYS32_ENTRY`).
pub const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

const PT_INTERP: u32 = 3;
const PT_NOTE: u32 = 4;
/// Notes larger than this are not plausible in a kernel; refuse to read them.
const MAX_NOTE_SEGMENT: u64 = 1 << 20;

/// The facts about an ELF file that image checks use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElfInfo {
    /// `e_machine`.
    pub machine: u16,
    /// `e_type` (2 = executable, 3 = shared object / PIE).
    pub file_type: u16,
    /// The entry point from the header.
    pub entry: u64,
    /// Whether a `PT_INTERP` segment names a dynamic loader.
    pub has_interpreter: bool,
    /// The PVH entry point from the Xen `PHYS32_ENTRY` note, if present.
    pub pvh_entry: Option<u64>,
}

impl ElfInfo {
    /// An x86-64 binary that needs no dynamic loader.
    pub fn is_static_x86_64(&self) -> bool {
        self.machine == EM_X86_64 && !self.has_interpreter
    }

    /// The guest architecture this binary runs on, if it is one.
    pub fn guest_arch(&self) -> Option<nova_core::template::GuestArch> {
        use nova_core::template::GuestArch;
        match self.machine {
            EM_X86_64 => Some(GuestArch::X86_64),
            EM_AARCH64 => Some(GuestArch::Arm64),
            _ => None,
        }
    }
}

/// A file is not an ELF file we can use.
#[derive(Debug, thiserror::Error)]
pub enum ReadElfError {
    /// The file could not be read.
    #[error("cannot read {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The bytes are not a 64-bit little-endian ELF file, or are inconsistent.
    #[error("{path} is not a valid 64-bit little-endian ELF file: {reason}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// Reads the header, program headers and notes of the ELF file at `path`.
pub fn read_elf(path: &Path) -> Result<ElfInfo, ReadElfError> {
    let io_err = |source| ReadElfError::Io {
        path: path.to_owned(),
        source,
    };
    let bad = |reason: &str| ReadElfError::Malformed {
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    let file = File::open(path).map_err(io_err)?;
    let len = file.metadata().map_err(io_err)?.len();

    let mut header = [0u8; 64];
    if len < 64 {
        return Err(bad("shorter than an ELF64 header"));
    }
    file.read_exact_at(&mut header, 0).map_err(io_err)?;
    if header[..4] != *b"\x7fELF" {
        return Err(bad("no ELF magic"));
    }
    if header[4] != 2 {
        return Err(bad("not ELFCLASS64"));
    }
    if header[5] != 1 {
        return Err(bad("not little-endian"));
    }
    let file_type = u16_at(&header, 16);
    let machine = u16_at(&header, 18);
    let entry = u64_at(&header, 24);
    let phoff = u64_at(&header, 32);
    let phentsize = u64::from(u16_at(&header, 54));
    let phnum = u64::from(u16_at(&header, 56));
    if phnum > 0 && phentsize < 56 {
        return Err(bad("program header entries too small"));
    }
    let table_len = phentsize * phnum;
    if phoff.checked_add(table_len).is_none_or(|end| end > len) {
        return Err(bad("program header table past end of file"));
    }
    let mut table = vec![0u8; usize::try_from(table_len).map_err(|_| bad("huge table"))?];
    file.read_exact_at(&mut table, phoff).map_err(io_err)?;

    let mut info = ElfInfo {
        machine,
        file_type,
        entry,
        has_interpreter: false,
        pvh_entry: None,
    };
    for ph in table.chunks_exact(usize::try_from(phentsize).map_err(|_| bad("huge entry"))?) {
        match u32_at(ph, 0) {
            PT_INTERP => info.has_interpreter = true,
            PT_NOTE => {
                let offset = u64_at(ph, 8);
                let size = u64_at(ph, 32);
                if size > MAX_NOTE_SEGMENT || offset.checked_add(size).is_none_or(|end| end > len) {
                    return Err(bad("note segment out of bounds"));
                }
                let mut notes = vec![0u8; usize::try_from(size).map_err(|_| bad("huge note"))?];
                file.read_exact_at(&mut notes, offset).map_err(io_err)?;
                if let Some(entry) = find_pvh_note(&notes).map_err(&bad)? {
                    info.pvh_entry = Some(entry);
                }
            }
            _ => {}
        }
    }
    Ok(info)
}

/// Walks the notes of one `PT_NOTE` segment looking for Xen's `PHYS32_ENTRY`.
fn find_pvh_note(mut notes: &[u8]) -> Result<Option<u64>, &'static str> {
    let align4 = |n: usize| n.div_ceil(4) * 4;
    while notes.len() >= 12 {
        let namesz = u32_at(notes, 0) as usize;
        let descsz = u32_at(notes, 4) as usize;
        let kind = u32_at(notes, 8);
        let name_end = 12 + align4(namesz);
        let desc_end = name_end
            .checked_add(align4(descsz))
            .ok_or("note size overflow")?;
        if desc_end > notes.len() {
            return Err("note runs past its segment");
        }
        let name = &notes[12..12 + namesz];
        let desc = &notes[name_end..name_end + descsz];
        if name == b"Xen\0" && kind == XEN_ELFNOTE_PHYS32_ENTRY {
            return match descsz {
                4 => Ok(Some(u64::from(u32_at(desc, 0)))),
                8 => Ok(Some(u64_at(desc, 0))),
                _ => Err("PHYS32_ENTRY note has an odd size"),
            };
        }
        notes = &notes[desc_end..];
    }
    Ok(None)
}

fn u16_at(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([bytes[at], bytes[at + 1]])
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(b)
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn note(name: &[u8], kind: u32, desc: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend((name.len() as u32).to_le_bytes());
        out.extend((desc.len() as u32).to_le_bytes());
        out.extend(kind.to_le_bytes());
        out.extend(name);
        out.resize(out.len().div_ceil(4) * 4, 0);
        out.extend(desc);
        out.resize(out.len().div_ceil(4) * 4, 0);
        out
    }

    /// A minimal ELF64 file: header, program headers, then the payloads.
    fn elf(machine: u16, segments: &[(u32, Vec<u8>)]) -> Vec<u8> {
        let phoff = 64u64;
        let data_start = phoff + 56 * segments.len() as u64;
        let mut header = vec![0u8; 64];
        header[..4].copy_from_slice(b"\x7fELF");
        header[4] = 2;
        header[5] = 1;
        header[16..18].copy_from_slice(&2u16.to_le_bytes());
        header[18..20].copy_from_slice(&machine.to_le_bytes());
        header[24..32].copy_from_slice(&0x0100_0000_u64.to_le_bytes());
        header[32..40].copy_from_slice(&phoff.to_le_bytes());
        header[54..56].copy_from_slice(&56u16.to_le_bytes());
        header[56..58].copy_from_slice(&(segments.len() as u16).to_le_bytes());
        let mut phdrs = Vec::new();
        let mut data = Vec::new();
        for (kind, payload) in segments {
            let mut ph = vec![0u8; 56];
            ph[..4].copy_from_slice(&kind.to_le_bytes());
            ph[8..16].copy_from_slice(&(data_start + data.len() as u64).to_le_bytes());
            ph[32..40].copy_from_slice(&(payload.len() as u64).to_le_bytes());
            phdrs.extend(ph);
            data.extend(payload);
        }
        [header, phdrs, data].concat()
    }

    fn write(bytes: &[u8]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, bytes).unwrap();
        (dir, path)
    }

    #[test]
    fn finds_the_pvh_note_among_others() {
        let notes = [
            note(b"GNU\0", 3, &[1, 2, 3, 4, 5, 6, 7, 8]),
            note(b"Xen\0", 6, b"linux\0"),
            note(
                b"Xen\0",
                XEN_ELFNOTE_PHYS32_ENTRY,
                &0x0100_0abc_u32.to_le_bytes(),
            ),
        ]
        .concat();
        let (_d, path) = write(&elf(EM_X86_64, &[(PT_NOTE, notes)]));
        let info = read_elf(&path).unwrap();
        assert_eq!(info.pvh_entry, Some(0x0100_0abc));
        assert!(info.is_static_x86_64());
    }

    #[test]
    fn no_pvh_note_and_an_interpreter_are_reported() {
        let (_d, path) = write(&elf(EM_X86_64, &[(PT_INTERP, b"/lib/ld.so\0".to_vec())]));
        let info = read_elf(&path).unwrap();
        assert_eq!(info.pvh_entry, None);
        assert!(info.has_interpreter);
        assert!(!info.is_static_x86_64());
    }

    #[test]
    fn other_machines_are_not_x86_64() {
        let (_d, path) = write(&elf(183, &[]));
        assert!(!read_elf(&path).unwrap().is_static_x86_64());
    }

    #[test]
    fn garbage_and_truncation_are_errors_not_panics() {
        let (_d, path) = write(b"#!/bin/sh\necho not elf, but long enough to hold a header.......");
        assert!(matches!(
            read_elf(&path),
            Err(ReadElfError::Malformed { .. })
        ));
        let mut truncated = elf(EM_X86_64, &[(PT_NOTE, note(b"Xen\0", 18, &[0; 4]))]);
        truncated.truncate(100);
        let (_d2, path) = write(&truncated);
        assert!(matches!(
            read_elf(&path),
            Err(ReadElfError::Malformed { .. })
        ));
        // A note claiming more bytes than its segment holds.
        let mut lying = note(b"Xen\0", 18, &[0; 4]);
        lying[4..8].copy_from_slice(&4096u32.to_le_bytes());
        let (_d3, path) = write(&elf(EM_X86_64, &[(PT_NOTE, lying)]));
        assert!(matches!(
            read_elf(&path),
            Err(ReadElfError::Malformed { .. })
        ));
    }

    #[test]
    fn the_host_shell_is_an_x86_64_elf() {
        // /bin/sh on the x86-64 build hosts is dynamic: interpreter present.
        if cfg!(target_arch = "x86_64") {
            let info = read_elf(Path::new("/bin/sh")).unwrap();
            assert_eq!(info.machine, EM_X86_64);
            assert!(info.has_interpreter);
        }
    }
}
