//! Finding and cleaning what a dead provider left behind.
//!
//! A provider kills its VMMs and removes their directories when it stops or
//! is dropped. If its process dies without unwinding (SIGKILL, a crash, the
//! host losing power), sandbox directories stay under
//! `$NOVA_HOME/sandboxes`, and VMMs may still run, orphaned. A provider that
//! starts calls [`clean_leftovers`], which removes only what provably belongs
//! to nobody:
//!
//! - a directory whose `state.json` names a VMM process that is gone, or that
//!   is an orphan (its parent is PID 1, so the provider that spawned it died)
//!   and whose command line names that very sandbox (so a reused PID is never
//!   killed): the orphan is killed and the directory removed;
//! - a directory without `state.json` (a boot that never finished) older than
//!   [`UNFINISHED_GRACE`], so that another process's boot in progress is
//!   left alone.
//!
//! Sandboxes whose VMM still has a living parent belong to another running
//! provider sharing this `$NOVA_HOME`, and are never touched. Re-attaching to
//! a leftover VM (rather than cleaning it) is not supported: the agent
//! connection and VMM control socket cannot be taken over safely.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use nova_core::metadata::SandboxInfo;

/// How old a directory without `state.json` must be before it counts as an
/// abandoned boot.
pub const UNFINISHED_GRACE: Duration = Duration::from_secs(600);

/// What [`clean_leftovers`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Cleaned {
    /// Sandbox directories removed.
    pub removed: Vec<PathBuf>,
    /// Orphaned VMM processes killed.
    pub killed: Vec<u32>,
}

/// Removes abandoned sandboxes under `sandboxes_dir`; see the module docs.
/// Failures are logged and skipped: cleaning never stops a provider from
/// starting.
pub fn clean_leftovers(sandboxes_dir: &Path) -> Cleaned {
    let mut cleaned = Cleaned::default();
    let Ok(entries) = std::fs::read_dir(sandboxes_dir) else {
        return cleaned;
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        if !dir.is_dir() {
            continue;
        }
        match std::fs::read(dir.join("state.json")) {
            Ok(json) => {
                let Ok(info) = serde_json::from_slice::<SandboxInfo>(&json) else {
                    tracing::warn!(dir = %dir.display(), "unreadable state.json; leaving the directory alone");
                    continue;
                };
                match info.vmm_pid.map(|pid| (pid, owner(pid, &dir))) {
                    Some((_, Owner::Parent)) => continue,
                    Some((pid, Owner::Orphan)) => {
                        let killed = i32::try_from(pid)
                            .ok()
                            .and_then(rustix::process::Pid::from_raw)
                            .ok_or(rustix::io::Errno::SRCH)
                            .and_then(|p| {
                                rustix::process::kill_process(p, rustix::process::Signal::KILL)
                            });
                        if let Err(e) = killed {
                            tracing::warn!(pid, error = %e, "cannot kill an orphaned VMM");
                            continue;
                        }
                        cleaned.killed.push(pid);
                    }
                    Some((_, Owner::Gone)) | None => {}
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let old = entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| SystemTime::now().duration_since(t).ok())
                    .is_some_and(|age| age > UNFINISHED_GRACE);
                if !old {
                    continue;
                }
            }
            Err(_) => continue,
        }
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {
                tracing::info!(dir = %dir.display(), "removed a leftover sandbox");
                cleaned.removed.push(dir);
            }
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot remove a leftover sandbox")
            }
        }
    }
    cleaned
}

/// Who a sandbox's VMM process belongs to.
#[derive(Debug, PartialEq, Eq)]
enum Owner {
    /// It runs and its parent is alive: another provider owns it.
    Parent,
    /// It runs, reparented to PID 1, and is this sandbox's VMM.
    Orphan,
    /// No such process, or one that is not this sandbox's VMM.
    Gone,
}

fn owner(pid: u32, dir: &Path) -> Owner {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return Owner::Gone;
    };
    // Every VMM's command line names its sandbox: QEMU by the directory's
    // paths, Firecracker by `--id <sandbox id>` (the directory's name).
    let Some(needle) = dir.file_name().map(|n| n.to_string_lossy()) else {
        return Owner::Gone;
    };
    if !String::from_utf8_lossy(&cmdline).contains(needle.as_ref()) {
        return Owner::Gone;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| parent_pid(&s))
    {
        Some(1) => Owner::Orphan,
        Some(_) => Owner::Parent,
        None => Owner::Gone,
    }
}

/// The parent pid (field 4) of `/proc/<pid>/stat` text.
fn parent_pid(stat: &str) -> Option<u32> {
    stat[stat.rfind(')')? + 1..]
        .split_ascii_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use nova_core::config::SandboxConfig;
    use nova_core::hypervisor::HypervisorKind;
    use nova_core::id::SandboxId;
    use nova_core::state::SandboxState;

    use super::*;

    fn write_state(dir: &Path, pid: Option<u32>) {
        std::fs::create_dir_all(dir).unwrap();
        let info = SandboxInfo {
            id: SandboxId::random(),
            hypervisor: HypervisorKind::Qemu,
            state: SandboxState::Running,
            config: SandboxConfig::default(),
            created_at_ms: 1,
            boot: None,
            vmm_pid: pid,
            dir: dir.to_owned(),
            agent_version: None,
            kernel_release: None,
        };
        std::fs::write(dir.join("state.json"), serde_json::to_vec(&info).unwrap()).unwrap();
    }

    #[test]
    fn parses_the_parent_pid() {
        assert_eq!(parent_pid("42 (qemu (a) b) S 1 42 42 0"), Some(1));
        assert_eq!(parent_pid("42 (x) R 977 1"), Some(977));
        assert_eq!(parent_pid("garbage"), None);
    }

    #[test]
    fn cleans_dead_and_orphaned_sandboxes_and_spares_owned_ones() {
        let root = tempfile::tempdir().unwrap();
        let dead = root.path().join("sb-dead");
        write_state(&dead, Some(u32::MAX - 1));
        let no_pid = root.path().join("sb-nopid");
        write_state(&no_pid, None);
        let booting = root.path().join("sb-booting");
        std::fs::create_dir_all(&booting).unwrap();

        // An orphan whose command line names its directory (`exec -a` keeps
        // it one process): its parent shell exits at once, so it is
        // reparented (to PID 1, or to a subreaper, in which case it counts
        // as owned and is spared).
        let orphan_dir = root.path().join("sb-orphan");
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "bash -c \"exec -a 'vmm {}' sleep 1000\" >/dev/null 2>&1 & echo $!",
                orphan_dir.display()
            ))
            .output()
            .unwrap();
        let orphan: u32 = String::from_utf8(out.stdout)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        write_state(&orphan_dir, Some(orphan));
        let reparented_to_init = std::fs::read_to_string(format!("/proc/{orphan}/stat"))
            .ok()
            .and_then(|s| parent_pid(&s))
            == Some(1);

        // A VMM whose parent (this test) is alive.
        let owned_dir = root.path().join("sb-owned");
        let mut child = Command::new("bash")
            .arg("-c")
            .arg(format!("exec -a 'vmm {}' sleep 1000", owned_dir.display()))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        write_state(&owned_dir, Some(child.id()));

        let cleaned = clean_leftovers(root.path());
        assert!(cleaned.removed.contains(&dead));
        assert!(cleaned.removed.contains(&no_pid));
        assert!(booting.exists(), "a recent boot in progress is left alone");
        assert!(
            owned_dir.exists(),
            "a sandbox with a living owner is left alone"
        );
        assert!(!cleaned.killed.contains(&child.id()));
        if reparented_to_init {
            assert_eq!(cleaned.killed, [orphan]);
            assert!(!orphan_dir.exists());
        } else {
            eprintln!(
                "note: orphans are reparented to a subreaper here; the orphan case was not exercised"
            );
            let _ = rustix::process::kill_process(
                rustix::process::Pid::from_raw(orphan as i32).unwrap(),
                rustix::process::Signal::KILL,
            );
        }
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(
            clean_leftovers(&root.path().join("missing"))
                .removed
                .is_empty()
        );
    }
}
