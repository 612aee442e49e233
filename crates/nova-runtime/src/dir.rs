//! A sandbox's directory: made private, owned through an `flock`, its
//! `state.json` written atomically.
//!
//! `$NOVA_HOME/sandboxes/<id>/` holds everything one sandbox has on the host
//! (sockets, scratch disk, logs, `state.json`). Which process owns it is
//! decided by an exclusive `flock(2)` on the directory, taken when it is
//! made and held until it is removed: the kernel drops the lock when the
//! owner dies, however it dies, so [`crate::leftovers`] can tell an abandoned
//! directory from one in use without guessing from process trees (which is
//! wrong inside containers, and blind to a VMM orphaned mid-boot). The lock's
//! descriptor is close-on-exec, so a VMM never inherits it.
//!
//! `state.json` is written with a temporary file and a rename, so a reader
//! sees the old or the new state, never half of one. The runtime writes it
//! right after the VMM is spawned (with its PID and start time), before the
//! boot finishes, and again on every state change.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use nova_core::home::SandboxPaths;
use nova_core::metadata::SandboxInfo;
use rustix::fs::FlockOperation;
use serde::{Deserialize, Serialize};

/// Longest Unix socket path a VMM can bind or a client connect to
/// (`sun_path` is 108 bytes with its NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// Refuses a socket path longer than [`MAX_SOCKET_PATH`], saying what to do.
pub fn check_socket_path(path: &Path) -> Result<(), String> {
    if path.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(format!(
            "socket path {} is longer than {MAX_SOCKET_PATH} bytes; use a shorter NOVA_HOME",
            path.display()
        ));
    }
    Ok(())
}

/// A sandbox's persisted record: its info plus what identifies its VMM
/// process beyond the PID.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SandboxRecord {
    /// The sandbox as last published.
    #[serde(flatten)]
    pub info: SandboxInfo,
    /// The VMM's start time in clock ticks since boot, so a reused PID is
    /// never taken for the VMM.
    #[serde(default)]
    pub vmm_start_ticks: Option<u64>,
    /// Whether the VMM was started to outlive its provider (a detached
    /// provider: its output goes to files, not through the provider), so
    /// that a later provider may re-attach it. Absent in older records:
    /// false.
    #[serde(default)]
    pub detached: bool,
    /// The sandbox network's host-side addresses, so that a provider that
    /// re-attaches the sandbox can own its network again. Absent without a
    /// network (and in older records).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkRecord>,
}

/// What identifies a sandbox's network beyond its id (from which the
/// namespace, veth and nft table names derive).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkRecord {
    /// The host end of the veth (`.1` of the sandbox's /30); `None` for a
    /// user-mode network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_addr: Option<std::net::Ipv4Addr>,
    /// A user-mode network (passt, named by the directory's `passt.pid`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub user: bool,
}

/// A sandbox directory this process owns (see the module docs). Dropping it
/// removes the directory; [`SandboxDir::remove`] does so and reports errors.
#[derive(Debug)]
pub struct SandboxDir {
    paths: SandboxPaths,
    /// The directory, opened and `flock`ed; `None` once removed.
    lock: Option<File>,
}

impl SandboxDir {
    /// Creates the directory (and `sandboxes/` above it), mode 0700 — it
    /// holds the agent socket, through which anyone could run commands in the
    /// guest — and locks it. Fails if it exists. On error, the path that
    /// could not be made.
    pub fn create(paths: SandboxPaths) -> Result<Self, (PathBuf, std::io::Error)> {
        use std::os::unix::fs::DirBuilderExt;
        let dir = paths.dir().to_owned();
        if let Some(parent) = dir.parent() {
            std::fs::create_dir_all(parent).map_err(|e| (parent.to_owned(), e))?;
        }
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|e| (dir.clone(), e))?;
        let mut this = Self { paths, lock: None };
        match try_lock(&dir) {
            Ok(Some(file)) => this.lock = Some(file),
            Ok(None) => {
                return Err((
                    dir,
                    std::io::Error::new(
                        std::io::ErrorKind::WouldBlock,
                        "another process locked this new sandbox directory",
                    ),
                ));
            }
            Err(e) => return Err((dir, e)),
        }
        Ok(this)
    }

    /// Takes over the existing directory of a sandbox whose owner died,
    /// with its lock, which the caller took ([`try_lock`]).
    pub fn adopt(paths: SandboxPaths, lock: File) -> Self {
        Self {
            paths,
            lock: Some(lock),
        }
    }

    /// Lets go of the directory without removing it (its VM outlives this
    /// provider): the lock is released, so a later provider can take the
    /// directory over.
    pub fn leave(&mut self) {
        self.lock = None;
    }

    /// The sandbox's file names.
    pub fn paths(&self) -> &SandboxPaths {
        &self.paths
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        self.paths.dir()
    }

    /// Writes `state.json` atomically (temporary file, fsync-free rename).
    pub fn persist(&self, record: &SandboxRecord) -> std::io::Result<()> {
        write_atomic(&self.paths.state_json(), record)
    }

    /// [`persist`](Self::persist), logging a failure instead of returning
    /// it: a sandbox keeps running when its record cannot be written.
    pub fn persist_or_warn(&self, record: &SandboxRecord) {
        if let Err(e) = self.persist(record) {
            tracing::warn!(path = %self.paths.state_json().display(), error = %e, "cannot write sandbox state");
        }
    }

    /// [`persist_or_warn`](Self::persist_or_warn) on the blocking pool, for
    /// async paths.
    pub async fn persist_in_background(&self, record: &SandboxRecord) {
        let path = self.paths.state_json();
        let record = record.clone();
        let written = tokio::task::spawn_blocking(move || write_atomic(&path, &record)).await;
        match written {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(path = %self.paths.state_json().display(), error = %e, "cannot write sandbox state");
            }
            Err(e) => tracing::warn!(error = %e, "the state writer did not finish"),
        }
    }

    /// Removes the directory and everything in it, then lets go of the
    /// lock. Idempotent.
    pub async fn remove(&mut self) -> Result<(), (PathBuf, std::io::Error)> {
        if self.lock.is_none() {
            return Ok(());
        }
        let dir = self.path().to_owned();
        match tokio::fs::remove_dir_all(&dir).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err((dir, e)),
            _ => {
                self.lock = None;
                Ok(())
            }
        }
    }
}

impl Drop for SandboxDir {
    fn drop(&mut self) {
        if self.lock.is_none() {
            return;
        }
        if let Err(e) = std::fs::remove_dir_all(self.paths.dir())
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(dir = %self.paths.dir().display(), error = %e, "cannot remove sandbox directory");
        }
    }
}

/// Takes the exclusive lock on the directory `dir` without waiting:
/// `Some(file)` holding it, or `None` when another process holds it.
pub fn try_lock(dir: &Path) -> std::io::Result<Option<File>> {
    let file = File::open(dir)?;
    match rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(Some(file)),
        Err(rustix::io::Errno::WOULDBLOCK) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Writes `value` as JSON to `path` through a temporary file in the same
/// directory and a rename.
pub fn write_atomic<T: Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    let json = serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(&json)?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// Reads a sandbox's `state.json`.
pub fn read_record(path: &Path) -> std::io::Result<SandboxRecord> {
    let json = std::fs::read(path)?;
    serde_json::from_slice(&json)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
pub(crate) mod tests {
    use nova_core::config::SandboxConfig;
    use nova_core::home::NovaHome;
    use nova_core::hypervisor::HypervisorKind;
    use nova_core::id::SandboxId;
    use nova_core::state::SandboxState;

    use super::*;

    pub(crate) fn record(dir: &Path) -> SandboxRecord {
        SandboxRecord {
            info: SandboxInfo {
                id: SandboxId::random(),
                hypervisor: HypervisorKind::Qemu,
                state: SandboxState::Creating,
                config: SandboxConfig::default(),
                created_at_ms: 1,
                boot: None,
                vmm_pid: Some(7),
                dir: dir.to_owned(),
                agent_version: None,
                kernel_release: None,
                failure: None,
                persisted: false,
            },
            vmm_start_ticks: Some(99),
            detached: false,
            network: None,
        }
    }

    #[tokio::test]
    async fn the_owner_holds_the_lock_until_it_removes_the_directory() {
        let home = tempfile::tempdir().unwrap();
        let home = NovaHome::at(home.path());
        let paths = home.sandbox(&SandboxId::random());
        let mut dir = SandboxDir::create(paths.clone()).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        // flock is per open file description: a second open cannot lock it.
        assert!(try_lock(dir.path()).unwrap().is_none());
        let rec = record(dir.path());
        dir.persist(&rec).unwrap();
        assert_eq!(read_record(&paths.state_json()).unwrap(), rec);
        assert!(SandboxDir::create(paths.clone()).is_err(), "exists already");
        dir.remove().await.unwrap();
        assert!(!paths.dir().exists());
        dir.remove().await.unwrap();
    }

    #[test]
    fn dropping_removes_the_directory() {
        let home = tempfile::tempdir().unwrap();
        let paths = NovaHome::at(home.path()).sandbox(&SandboxId::random());
        let dir = SandboxDir::create(paths.clone()).unwrap();
        std::fs::write(paths.console_log(), b"x").unwrap();
        drop(dir);
        assert!(!paths.dir().exists());
    }

    #[test]
    fn network_records_of_both_modes_read_back_and_older_ones_still_read() {
        let old: NetworkRecord =
            serde_json::from_str(r#"{"host_addr":"10.200.0.1"}"#).expect("an older record reads");
        assert_eq!(old.host_addr, Some(std::net::Ipv4Addr::new(10, 200, 0, 1)));
        assert!(!old.user);
        assert_eq!(
            serde_json::to_string(&old).expect("serializes"),
            r#"{"host_addr":"10.200.0.1"}"#,
            "a namespace record is written as before"
        );
        let user = NetworkRecord {
            host_addr: None,
            user: true,
        };
        let text = serde_json::to_string(&user).expect("serializes");
        assert_eq!(text, r#"{"user":true}"#);
        assert_eq!(
            serde_json::from_str::<NetworkRecord>(&text).expect("reads back"),
            user
        );
    }
}
