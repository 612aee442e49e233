//! Finding and cleaning what a dead provider left behind.
//!
//! A provider kills its VMMs and removes their directories when it stops or
//! is dropped. If its process dies without unwinding (SIGKILL, a crash, the
//! host losing power), sandbox directories stay under
//! `$NOVA_HOME/sandboxes`, and VMMs may still run, orphaned. A provider that
//! starts calls [`clean_leftovers`], which removes only what provably belongs
//! to nobody: a directory whose owner's `flock` is gone (see [`crate::dir`]).
//! Its VMM, if `state.json` names one that still runs with the recorded start
//! time (so a reused PID is never killed), is killed first, and so is the
//! passt of a user-mode network that its `passt.pid` names. A directory whose
//! lock is held belongs to a living provider, whatever its process tree looks
//! like, and is never touched; a directory is locked from the moment it is
//! made, so a boot in progress is safe too.
//!
//! A VM started by a *detached* provider (see
//! [`Provider::detached`](crate::Provider::detached)) is meant to outlive
//! its provider and be re-attached ([`crate::reattach`]): a detached
//! provider does not clean leftovers when it is made (its
//! [`reattach`](crate::Provider::reattach) adopts the live ones and cleans
//! the dead), and a provider that is not detached leaves such a VM alone
//! while it runs ([`clean_leftovers_sparing`]): it is another daemon's to
//! take over.

use std::path::{Path, PathBuf};

use crate::dir::{read_record, try_lock};
use crate::vmm::process_start_ticks;

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
/// starting. Blocking (it reads directories); call it where blocking is
/// allowed.
pub fn clean_leftovers(sandboxes_dir: &Path) -> Cleaned {
    clean_leftovers_sparing(sandboxes_dir, false)
}

/// [`clean_leftovers`], sparing (with `spare_detached`) the sandboxes a
/// detached provider left whose VMM still runs, or that it paused to disk.
pub fn clean_leftovers_sparing(sandboxes_dir: &Path, spare_detached: bool) -> Cleaned {
    let mut cleaned = Cleaned::default();
    let Ok(entries) = std::fs::read_dir(sandboxes_dir) else {
        return cleaned;
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        if !dir.is_dir() {
            continue;
        }
        // Held until the directory is gone, so no other provider starts
        // cleaning it at the same time.
        let _lock = match try_lock(&dir) {
            Ok(Some(lock)) => lock,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot lock a sandbox directory; leaving it alone");
                continue;
            }
        };
        match read_record(&dir.join("state.json")) {
            Ok(record) => {
                let alive = record
                    .info
                    .vmm_pid
                    .is_some_and(|pid| is_same_process(pid, record.vmm_start_ticks));
                let on_disk = record.info.persisted
                    && record.info.state == nova_core::state::SandboxState::Paused;
                if spare_detached && record.detached && (alive || on_disk) {
                    tracing::info!(dir = %dir.display(), "leaving a detached provider's running sandbox for a daemon to re-attach");
                    continue;
                }
                if let Some(pid) = record.info.vmm_pid
                    && is_same_process(pid, record.vmm_start_ticks)
                {
                    match kill(pid) {
                        Ok(()) => cleaned.killed.push(pid),
                        Err(e) => {
                            tracing::warn!(pid, error = %e, "cannot kill an orphaned VMM; leaving its directory");
                            continue;
                        }
                    }
                }
            }
            // No record: the owner died before spawning a VMM.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "unreadable state.json; leaving the directory alone");
                continue;
            }
        }
        // Its user-mode network: passt exits with its VMM, unless that one
        // was left running; the pidfile names it.
        if let Some(pid) = nova_net::passt::kill_leftover(&dir) {
            tracing::info!(pid, dir = %dir.display(), "killed a leftover passt");
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

/// Whether `pid` runs and started at `start_ticks` (when recorded).
/// A zombie (exited, not yet reaped by its new parent) does not run.
pub(crate) fn is_same_process(pid: u32, start_ticks: Option<u64>) -> bool {
    if crate::vmm::process_exited(pid) {
        return false;
    }
    match (process_start_ticks(pid), start_ticks) {
        (Some(now), Some(recorded)) => now == recorded,
        // No recorded start time (an older record): refuse to guess.
        (Some(_), None) => false,
        (None, _) => false,
    }
}

pub(crate) fn kill(pid: u32) -> rustix::io::Result<()> {
    let pid = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .ok_or(rustix::io::Errno::SRCH)?;
    match rustix::process::kill_process(pid, rustix::process::Signal::KILL) {
        Err(rustix::io::Errno::SRCH) => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use nova_core::home::NovaHome;
    use nova_core::id::SandboxId;

    use super::*;
    use crate::dir::{SandboxDir, SandboxRecord, write_atomic};

    fn write_state(dir: &Path, pid: Option<u32>, start_ticks: Option<u64>) {
        std::fs::create_dir_all(dir).unwrap();
        let mut record: SandboxRecord = crate::dir::tests::record(dir);
        record.info.vmm_pid = pid;
        record.vmm_start_ticks = start_ticks;
        write_atomic(&dir.join("state.json"), &record).unwrap();
    }

    #[test]
    fn cleans_unlocked_sandboxes_kills_their_vmm_and_spares_locked_ones() {
        let home = tempfile::tempdir().unwrap();
        let home = NovaHome::at(home.path());
        let root = home.sandboxes_dir();
        let dead = root.join("sb-dead");
        write_state(&dead, Some(u32::MAX - 1), Some(1));
        let booting = root.join("sb-booting");
        std::fs::create_dir_all(&booting).unwrap();

        // An abandoned sandbox whose VMM still runs.
        let mut orphan = Command::new("sleep").arg("600").spawn().unwrap();
        let orphan_dir = root.join("sb-orphan");
        write_state(
            &orphan_dir,
            Some(orphan.id()),
            process_start_ticks(orphan.id()),
        );
        // A record naming a live process with another start time: a reused
        // PID, never killed.
        let mut stranger = Command::new("sleep").arg("600").spawn().unwrap();
        let reused_dir = root.join("sb-reused");
        write_state(&reused_dir, Some(stranger.id()), Some(1));

        // A sandbox whose owner (this test) holds its lock.
        let owned = SandboxDir::create(home.sandbox(&SandboxId::random())).unwrap();
        let mut owned_vmm = Command::new("sleep").arg("600").spawn().unwrap();
        write_state(
            owned.path(),
            Some(owned_vmm.id()),
            process_start_ticks(owned_vmm.id()),
        );

        let cleaned = clean_leftovers(&root);
        assert!(cleaned.removed.contains(&dead));
        assert!(cleaned.removed.contains(&booting), "{cleaned:?}");
        assert!(cleaned.removed.contains(&orphan_dir));
        assert_eq!(cleaned.killed, [orphan.id()]);
        assert!(
            orphan.wait().unwrap().code().is_none(),
            "killed by a signal"
        );
        assert!(cleaned.removed.contains(&reused_dir));
        assert!(
            stranger.try_wait().unwrap().is_none(),
            "a reused PID is spared"
        );
        assert!(owned.path().exists(), "a locked sandbox is left alone");
        assert!(owned_vmm.try_wait().unwrap().is_none());
        for mut child in [stranger, owned_vmm] {
            child.kill().unwrap();
            child.wait().unwrap();
        }
        assert!(clean_leftovers(&root.join("missing")).removed.is_empty());
    }
}
