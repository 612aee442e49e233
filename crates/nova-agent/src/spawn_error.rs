//! Why a command could not start, in the words a shell would use.
//!
//! `fork` + `exec` report one `errno` for many different faults, and the
//! standard library reports a failed `chdir` to the working directory through
//! the same channel as a failed `exec`. So when a spawn fails, [`explain`]
//! looks at the guest the way `exec` did, in the order it did:
//!
//! 1. the working directory, if one was asked for (missing, not a directory,
//!    not enterable);
//! 2. the program: looked up in `PATH` as `execvp` does (a bare name), or
//!    relative to the working directory (a name with a `/`); missing, a
//!    directory, without execute permission, on a `noexec` mount;
//! 3. its contents: a `#!` line naming a missing or unusable interpreter
//!    (including one with a DOS line ending), an ELF binary whose interpreter
//!    (dynamic loader) is missing or that is built for another architecture,
//!    or neither an ELF binary nor a script.
//!
//! The result is a [`RemoteErrorKind::Spawn`] error whose
//! [`SpawnErrorKind`] gives the shell's exit status (127 / 126) and whose
//! message names what is missing. All of this runs only on the error path.

use std::fs::{File, Metadata};
use std::io;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nova_protocol::{RemoteError, RemoteErrorKind, SpawnErrorKind};

/// `PATH` used by `execvp` when the environment has none (glibc's default).
const DEFAULT_EXEC_PATH: &str = "/bin:/usr/bin";
/// How much of a file's start is read to recognize a script or an ELF binary.
const HEAD_LEN: usize = 256;
/// Longest program-header table or interpreter path read from an ELF file.
const ELF_READ_MAX: u64 = 64 * 1024;

/// What the agent tried to start.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SpawnAttempt<'a> {
    /// The program as the request named it (`argv[0]`, or `/bin/sh` for a
    /// shell command line).
    pub(crate) program: &'a str,
    /// The `PATH` a bare program name was looked up in (`None`: the agent's
    /// own environment's).
    pub(crate) path_env: Option<&'a str>,
    /// The working directory asked for (`None`: the agent's own).
    pub(crate) cwd: Option<&'a str>,
}

/// Turns the error of a failed spawn into one that says what is missing.
pub(crate) fn explain(attempt: &SpawnAttempt<'_>, err: &io::Error) -> RemoteError {
    let (kind, message) = diagnose(attempt, err);
    RemoteError::new(RemoteErrorKind::Spawn(kind), message)
}

fn diagnose(attempt: &SpawnAttempt<'_>, err: &io::Error) -> (SpawnErrorKind, String) {
    let program = attempt.program;
    if let Some(cwd) = attempt.cwd
        && let Some(fault) = check_cwd(cwd, program)
    {
        return fault;
    }
    let errno = err.raw_os_error();
    let base = match attempt.cwd {
        Some(cwd) => PathBuf::from(cwd),
        None => std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/")),
    };
    let path = if program.contains('/') {
        base.join(program)
    } else {
        let own_path = std::env::var("PATH").ok();
        let search = attempt
            .path_env
            .or(own_path.as_deref())
            .unwrap_or(DEFAULT_EXEC_PATH);
        match search_path(program, search, &base) {
            Some(found) => found,
            None => {
                return (
                    SpawnErrorKind::NotFound,
                    format!("{program}: command not found in $PATH"),
                );
            }
        }
    };
    // Name the file as the user did, or where the lookup found it.
    let shown = if program.contains('/') {
        program.to_owned()
    } else {
        path.display().to_string()
    };
    let meta = match std::fs::metadata(&path) {
        Ok(meta) => meta,
        Err(e) if is_missing(&e) => {
            return (
                SpawnErrorKind::NotFound,
                format!("{shown}: no such file or directory"),
            );
        }
        Err(e) => {
            return (
                SpawnErrorKind::NotExecutable,
                format!("{shown}: {}", os_text(&e)),
            );
        }
    };
    if let Some(fault) = check_executable(&shown, &meta) {
        return fault;
    }
    if let Some(fault) = check_contents(&shown, &path, &base, errno) {
        return fault;
    }
    match errno {
        Some(libc::ENOENT) => (
            SpawnErrorKind::NotFound,
            format!("{shown}: no such file or directory"),
        ),
        Some(libc::EACCES | libc::EPERM) => {
            let why = if on_noexec_mount(&path) {
                "permission denied (its file system is mounted noexec)"
            } else {
                "permission denied"
            };
            (SpawnErrorKind::NotExecutable, format!("{shown}: {why}"))
        }
        Some(libc::ENOEXEC) => (
            SpawnErrorKind::ExecFormat,
            format!("{shown}: exec format error"),
        ),
        Some(libc::ETXTBSY) => (
            SpawnErrorKind::NotExecutable,
            format!("{shown}: text file busy (it is open for writing)"),
        ),
        _ => (
            SpawnErrorKind::Other,
            format!("cannot run {program}: {}", os_text(err)),
        ),
    }
}

/// The working directory's fault, if it has one.
fn check_cwd(cwd: &str, program: &str) -> Option<(SpawnErrorKind, String)> {
    match std::fs::metadata(cwd) {
        Ok(meta) if meta.is_dir() => None,
        Ok(_) => Some((
            SpawnErrorKind::CwdUnusable,
            format!("working directory {cwd} is not a directory (cannot run {program})"),
        )),
        Err(e) if is_missing(&e) => Some((
            SpawnErrorKind::CwdNotFound,
            format!("working directory {cwd} does not exist (cannot run {program})"),
        )),
        Err(e) => Some((
            SpawnErrorKind::CwdUnusable,
            format!(
                "working directory {cwd}: {} (cannot run {program})",
                os_text(&e)
            ),
        )),
    }
}

/// Looks `program` up in `search` as `execvp` does: the first regular file
/// with an execute bit wins; failing that, the first thing of that name (whose
/// fault is then reported); `None` if there is nothing of that name at all.
fn search_path(program: &str, search: &str, base: &Path) -> Option<PathBuf> {
    let candidates: Vec<PathBuf> = search
        .split(':')
        .map(|dir| {
            // An empty entry means the current directory.
            let dir = if dir.is_empty() { "." } else { dir };
            base.join(dir).join(program)
        })
        .collect();
    candidates
        .iter()
        .find(|c| std::fs::metadata(c).is_ok_and(|m| m.is_file() && is_executable(&m)))
        .or_else(|| candidates.iter().find(|c| std::fs::metadata(c).is_ok()))
        .cloned()
}

/// Faults visible in the file's metadata.
fn check_executable(shown: &str, meta: &Metadata) -> Option<(SpawnErrorKind, String)> {
    let why = if meta.is_dir() {
        "is a directory".to_owned()
    } else if !meta.is_file() {
        "is not a regular file".to_owned()
    } else if !is_executable(meta) {
        format!(
            "permission denied (not executable: mode {:o})",
            meta.permissions().mode() & 0o7777
        )
    } else {
        return None;
    };
    Some((SpawnErrorKind::NotExecutable, format!("{shown}: {why}")))
}

/// Faults visible in the file's contents: its `#!` line or ELF headers.
fn check_contents(
    shown: &str,
    path: &Path,
    base: &Path,
    errno: Option<i32>,
) -> Option<(SpawnErrorKind, String)> {
    let file = File::open(path).ok()?;
    let mut head = vec![0u8; HEAD_LEN];
    let n = read_at_most(&file, &mut head, 0);
    head.truncate(n);
    if let Some(interpreter) = shebang(&head) {
        return check_interpreter(shown, &interpreter, base, errno, "bad interpreter");
    }
    if head.starts_with(b"\x7fELF") {
        let elf = elf_info(&file, &head)?;
        if errno == Some(libc::ENOEXEC) && elf.machine != NATIVE_MACHINE {
            return Some((
                SpawnErrorKind::ExecFormat,
                format!(
                    "{shown}: exec format error (an ELF binary for {}, this guest runs {})",
                    machine_name(elf.machine),
                    machine_name(NATIVE_MACHINE)
                ),
            ));
        }
        if let Some(interpreter) = elf.interpreter {
            return check_interpreter(shown, &interpreter, base, errno, "ELF interpreter");
        }
        return None;
    }
    (errno == Some(libc::ENOEXEC)).then(|| {
        (
            SpawnErrorKind::ExecFormat,
            format!(
                "{shown}: exec format error (neither an ELF binary nor a script with a #! line)"
            ),
        )
    })
}

/// The fault of a script's or a binary's interpreter, if it has one.
fn check_interpreter(
    shown: &str,
    interpreter: &str,
    base: &Path,
    errno: Option<i32>,
    what: &str,
) -> Option<(SpawnErrorKind, String)> {
    let path = base.join(interpreter);
    let shown_interpreter = interpreter.escape_debug().to_string();
    let why = match std::fs::metadata(&path) {
        Err(e) if is_missing(&e) => {
            let hint = if interpreter.ends_with('\r') {
                " (the script has DOS line endings)"
            } else if what == "ELF interpreter" {
                " (the binary needs a C library this image does not have)"
            } else {
                ""
            };
            format!("no such file or directory{hint}")
        }
        Err(e) => os_text(&e),
        Ok(meta) if meta.is_dir() => "is a directory".to_owned(),
        Ok(meta) if !meta.is_file() || !is_executable(&meta) => "permission denied".to_owned(),
        Ok(_) if errno == Some(libc::ENOEXEC) => "exec format error".to_owned(),
        Ok(_) => return None,
    };
    Some((
        SpawnErrorKind::BadInterpreter,
        format!("{shown}: {what} {shown_interpreter}: {why}"),
    ))
}

/// The interpreter named by a `#!` line, as the kernel reads it: the first
/// word after `#!` (spaces and tabs skipped), up to a space, tab or newline.
fn shebang(head: &[u8]) -> Option<String> {
    let rest = head.strip_prefix(b"#!")?;
    let line = rest.split(|&b| b == b'\n').next().unwrap_or(rest);
    let word = line
        .split(|&b| b == b' ' || b == b'\t')
        .find(|w| !w.is_empty())?;
    Some(String::from_utf8_lossy(word).into_owned())
}

/// What the ELF headers say about running the file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ElfInfo {
    /// `e_machine`.
    machine: u16,
    /// The `PT_INTERP` path (the dynamic loader), if any.
    interpreter: Option<String>,
}

/// `e_machine` of the architecture the agent was built for.
const NATIVE_MACHINE: u16 = if cfg!(target_arch = "aarch64") {
    183
} else if cfg!(target_arch = "riscv64") {
    243
} else {
    62
};

fn machine_name(machine: u16) -> String {
    match machine {
        3 => "x86 (32-bit)".to_owned(),
        8 => "MIPS".to_owned(),
        20 => "PowerPC".to_owned(),
        21 => "PowerPC 64".to_owned(),
        22 => "s390".to_owned(),
        40 => "ARM (32-bit)".to_owned(),
        62 => "x86-64".to_owned(),
        183 => "AArch64".to_owned(),
        243 => "RISC-V".to_owned(),
        other => format!("machine type {other}"),
    }
}

/// Reads the machine and the `PT_INTERP` path of an ELF file whose first
/// bytes are `head`; `None` if the headers are cut short or malformed.
fn elf_info(file: &File, head: &[u8]) -> Option<ElfInfo> {
    const PT_INTERP: u32 = 3;
    let wide = match head.get(4)? {
        1 => false,
        2 => true,
        _ => return None,
    };
    let little = match head.get(5)? {
        1 => true,
        2 => false,
        _ => return None,
    };
    let u16_at = |b: &[u8], at: usize| -> Option<u16> {
        let bytes: [u8; 2] = b.get(at..at + 2)?.try_into().ok()?;
        Some(if little {
            u16::from_le_bytes(bytes)
        } else {
            u16::from_be_bytes(bytes)
        })
    };
    let u32_at = |b: &[u8], at: usize| -> Option<u32> {
        let bytes: [u8; 4] = b.get(at..at + 4)?.try_into().ok()?;
        Some(if little {
            u32::from_le_bytes(bytes)
        } else {
            u32::from_be_bytes(bytes)
        })
    };
    let u64_at = |b: &[u8], at: usize| -> Option<u64> {
        let bytes: [u8; 8] = b.get(at..at + 8)?.try_into().ok()?;
        Some(if little {
            u64::from_le_bytes(bytes)
        } else {
            u64::from_be_bytes(bytes)
        })
    };
    let machine = u16_at(head, 18)?;
    let (phoff, phentsize, phnum) = if wide {
        (u64_at(head, 32)?, u16_at(head, 54)?, u16_at(head, 56)?)
    } else {
        (
            u64::from(u32_at(head, 28)?),
            u16_at(head, 42)?,
            u16_at(head, 44)?,
        )
    };
    let table_len = u64::from(phentsize) * u64::from(phnum);
    if table_len > ELF_READ_MAX || phentsize < if wide { 56 } else { 32 } {
        return Some(ElfInfo {
            machine,
            interpreter: None,
        });
    }
    let mut table = vec![0u8; usize::try_from(table_len).ok()?];
    if read_at_most(file, &mut table, phoff) < table.len() {
        return None;
    }
    let mut interpreter = None;
    for entry in table.chunks_exact(usize::from(phentsize)) {
        if u32_at(entry, 0)? != PT_INTERP {
            continue;
        }
        let (offset, size) = if wide {
            (u64_at(entry, 8)?, u64_at(entry, 32)?)
        } else {
            (u64::from(u32_at(entry, 4)?), u64::from(u32_at(entry, 16)?))
        };
        if size == 0 || size > ELF_READ_MAX {
            return None;
        }
        let mut path = vec![0u8; usize::try_from(size).ok()?];
        let n = read_at_most(file, &mut path, offset);
        path.truncate(n);
        let end = path.iter().position(|&b| b == 0).unwrap_or(path.len());
        interpreter = Some(String::from_utf8_lossy(&path[..end]).into_owned());
        break;
    }
    Some(ElfInfo {
        machine,
        interpreter,
    })
}

/// Fills as much of `buf` as the file has from `offset`; returns the count.
fn read_at_most(file: &File, buf: &mut [u8], offset: u64) -> usize {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read_at(&mut buf[filled..], offset + filled as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    filled
}

fn is_executable(meta: &Metadata) -> bool {
    meta.permissions().mode() & 0o111 != 0
}

/// Whether `e` says the path (or one of its directories) does not exist.
fn is_missing(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR))
}

fn on_noexec_mount(path: &Path) -> bool {
    rustix::fs::statvfs(path)
        .is_ok_and(|s| s.f_flag.contains(rustix::fs::StatVfsMountFlags::NOEXEC))
}

/// The OS's description of `e`, without the standard library's
/// " (os error N)" suffix.
fn os_text(e: &io::Error) -> String {
    let text = e.to_string();
    match e.raw_os_error() {
        Some(code) => text
            .strip_suffix(&format!(" (os error {code})"))
            .unwrap_or(&text)
            .to_owned(),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shebang_lines_are_read_like_the_kernel_does() {
        assert_eq!(shebang(b"#!/bin/sh\necho"), Some("/bin/sh".into()));
        assert_eq!(
            shebang(b"#! /usr/bin/env python3\n"),
            Some("/usr/bin/env".into())
        );
        assert_eq!(shebang(b"#!/bin/sh\r\n"), Some("/bin/sh\r".into()));
        assert_eq!(shebang(b"#!\n"), None);
        assert_eq!(shebang(b"echo hi\n"), None);
        assert_eq!(shebang(b"#!/bin/bash"), Some("/bin/bash".into()));
    }

    #[test]
    fn elf_headers_of_the_agent_itself_parse() {
        // The test binary is an ELF for this machine.
        let exe = std::env::current_exe().unwrap();
        let file = File::open(&exe).unwrap();
        let mut head = vec![0u8; HEAD_LEN];
        let n = read_at_most(&file, &mut head, 0);
        head.truncate(n);
        let info = elf_info(&file, &head).expect("an ELF file");
        assert_eq!(info.machine, NATIVE_MACHINE);
        if let Some(interp) = info.interpreter {
            assert!(interp.starts_with('/'), "{interp}");
        }
    }

    #[test]
    fn truncated_or_garbage_elf_headers_do_not_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        for bytes in [
            &b"\x7fELF"[..],
            &b"\x7fELF\x02\x01\x01"[..],
            &[
                0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 62, 0,
            ][..],
            &[0xff; 64][..],
        ] {
            std::fs::write(&path, bytes).unwrap();
            let file = File::open(&path).unwrap();
            let _ = elf_info(&file, bytes);
        }
    }

    #[test]
    fn os_text_drops_the_error_number() {
        let e = io::Error::from_raw_os_error(libc::ENOENT);
        assert_eq!(os_text(&e), "No such file or directory");
    }

    #[test]
    fn a_missing_working_directory_is_named_not_the_program() {
        let attempt = SpawnAttempt {
            program: "pwd",
            path_env: Some("/usr/bin:/bin"),
            cwd: Some("/nonexistent-nova-dir"),
        };
        let err = explain(&attempt, &io::Error::from_raw_os_error(libc::ENOENT));
        assert_eq!(
            err.kind,
            RemoteErrorKind::Spawn(SpawnErrorKind::CwdNotFound)
        );
        assert!(
            err.message.contains("/nonexistent-nova-dir"),
            "{}",
            err.message
        );
        assert!(err.message.contains("does not exist"), "{}", err.message);
    }
}
