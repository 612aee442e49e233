//! Re-attaching to a Firecracker microVM that a dead detached provider left
//! running (the runtime's `Backend::reattach`), and cleaning up after one
//! that died (`Backend::release_dead`).
//!
//! ```text
//! start (vm.rs), before the VMM is spawned:
//!   <sandbox dir>/firecracker.json  <- VmRecord: the jail (directory, uid,
//!                                      gid) if any, the kernel command
//!                                      line, dirty-page tracking
//! reattach (the runtime verified the VMM's PID and start time):
//!   VmRecord::read                  -> the VMM's working directory (the
//!                                      jail root, or the sandbox directory)
//!   api.sock: SO_PEERCRED pid       == the recorded VMM (not a stranger
//!                                      that bound the path)
//!   GET /                           -> id is the sandbox's, state Running
//!                                      or Paused (set to the recorded one)
//!   FirecrackerVm                   (the runtime then opens the agent
//!                                      channel: a new `CONNECT <port>` on
//!                                      the vsock socket)
//! release_dead:
//!   VmRecord::read -> the jail directory removed (cgroups are left as the
//!                     jailer made them, as on every stop)
//! ```
//!
//! Nothing here needs the dead provider: a detached Firecracker writes its
//! stdout and stderr to the sandbox's `console.log` itself, its log and
//! metrics to files in its working directory, and its sockets stay bound
//! there; a detached provider that goes away forgets its jail
//! (`Vm::leave`) instead of removing it. The sandbox's network (namespace,
//! veth, tap, nft tables) is taken back by the runtime
//! (`SandboxNetwork::adopt`); Firecracker keeps its tap open meanwhile.

use std::path::{Path, PathBuf};

use nova_core::error::BoxError;
use nova_core::state::SandboxState;
use nova_runtime::backend::ReattachVm;
use serde::{Deserialize, Serialize};

use crate::api::InstanceState;
use crate::machine::METRICS_FILE;
use crate::process::API_SOCKET;
use crate::stats::MetricsReader;
use crate::vm::{FirecrackerVm, JailDir};

/// Name of the [`VmRecord`] in the sandbox directory.
pub const RECORD_FILE: &str = "firecracker.json";

/// What a later provider needs to know of a Firecracker VM beyond the
/// runtime's `state.json`, written to [`RECORD_FILE`] before the VMM
/// starts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    /// The jail, when the VMM runs through the jailer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jail: Option<JailRecord>,
    /// The guest kernel command line the VM booted with.
    pub kernel_cmdline: String,
    /// Whether the VM tracks dirty pages.
    #[serde(default)]
    pub track_dirty_pages: bool,
}

/// A jailed VMM's jail.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JailRecord {
    /// The jail directory (`<chroot_base>/<exec-file-name>/<id>`); its
    /// `root` is the VMM's working directory.
    pub dir: PathBuf,
    /// The uid the VMM runs as.
    pub uid: u32,
    /// The gid the VMM runs as.
    pub gid: u32,
}

impl JailRecord {
    /// The VMM's `/` and working directory.
    pub fn root(&self) -> PathBuf {
        self.dir.join("root")
    }
}

impl VmRecord {
    /// Writes the record into the sandbox directory `dir` (a temporary file
    /// renamed over it, so a reader sees all of it or nothing).
    pub async fn write(&self, dir: &Path) -> std::io::Result<()> {
        let json = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        let tmp = dir.join(format!("{RECORD_FILE}.tmp"));
        tokio::fs::write(&tmp, json).await?;
        tokio::fs::rename(&tmp, dir.join(RECORD_FILE)).await
    }

    /// Reads the record of the sandbox directory `dir`; `Ok(None)` when
    /// there is none (its provider died before writing it).
    pub async fn read(dir: &Path) -> std::io::Result<Option<Self>> {
        match tokio::fs::read(dir.join(RECORD_FILE)).await {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// Whether `jail` may be removed as the jail of the sandbox whose
/// directory is `sandbox_dir`: a jail directory is named after its sandbox,
/// so a record naming any other directory is not acted on.
fn owns_jail(sandbox_dir: &Path, jail: &JailRecord) -> bool {
    jail.dir.is_absolute()
        && sandbox_dir.file_name().is_some()
        && jail.dir.file_name() == sandbox_dir.file_name()
}

/// Rebuilds the [`FirecrackerVm`] of a running VMM; see the module docs.
pub(crate) async fn reattach(reattach: ReattachVm<'_>) -> Result<FirecrackerVm, BoxError> {
    let dir = reattach.paths.dir();
    let record = VmRecord::read(dir)
        .await
        .map_err(|e| format!("cannot read its {RECORD_FILE}: {e}"))?;
    let jail = record.as_ref().and_then(|r| r.jail.clone());
    if let Some(jail) = &jail
        && !owns_jail(dir, jail)
    {
        return Err(format!(
            "its {RECORD_FILE} names a jail ({}) that is not this sandbox's",
            jail.dir.display()
        )
        .into());
    }
    let workdir = jail
        .as_ref()
        .map_or_else(|| dir.to_owned(), JailRecord::root);
    let socket = workdir.join(API_SOCKET);

    // The socket must be the recorded VMM's own, not a path some other
    // process bound since.
    let probe = tokio::net::UnixStream::connect(&socket)
        .await
        .map_err(|e| format!("cannot connect to its API socket {}: {e}", socket.display()))?;
    let peer = probe
        .peer_cred()
        .map_err(|e| format!("cannot tell who serves {}: {e}", socket.display()))?;
    drop(probe);
    let peer_pid = peer.pid().and_then(|p| u32::try_from(p).ok());
    if peer_pid != Some(reattach.vmm_pid) {
        return Err(format!(
            "its API socket {} is served by pid {peer_pid:?}, not by its VMM (pid {})",
            socket.display(),
            reattach.vmm_pid
        )
        .into());
    }

    let mut api = crate::process::connect_api(&socket, reattach.deadline).await?;
    let instance = api.instance_info().await?;
    let id = reattach.info.id.as_str();
    if instance.id != id {
        return Err(format!(
            "the VMM behind its API socket is instance {:?}, not {id:?}",
            instance.id
        )
        .into());
    }
    // Leave the VM as its provider last recorded it: a provider that died
    // between pausing (or resuming) the VM and recording it would
    // otherwise leave the two apart.
    match (instance.state, reattach.info.state) {
        (InstanceState::NotStarted, _) => {
            return Err("Firecracker says the guest was never started".into());
        }
        (InstanceState::Running, SandboxState::Paused) => api.pause().await?,
        (InstanceState::Paused, SandboxState::Running) => api.resume().await?,
        _ => {}
    }
    let (kernel_cmdline, track_dirty_pages) = match record {
        Some(record) => (record.kernel_cmdline, record.track_dirty_pages),
        None => {
            tracing::warn!(sandbox = %id, "no {RECORD_FILE}; its kernel command line is unknown");
            let dirty = api
                .machine_config()
                .await
                .ok()
                .and_then(|c| c.track_dirty_pages)
                .unwrap_or(false);
            (String::new(), dirty)
        }
    };
    Ok(FirecrackerVm {
        api,
        metrics: MetricsReader::new(workdir.join(METRICS_FILE)),
        kernel_cmdline,
        jail_dir: JailDir::new(jail.as_ref().map(|j| j.dir.clone())),
        jailed: jail.as_ref().map(|j| (j.uid, j.gid)),
        workdir,
        track_dirty_pages,
    })
}

/// Removes the jail of a dead sandbox whose directory is `dir`, if it had
/// one; see the module docs.
pub(crate) async fn release_dead(dir: &Path) {
    let jail = match VmRecord::read(dir).await {
        Ok(Some(VmRecord {
            jail: Some(jail), ..
        })) => jail,
        Ok(_) => return,
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot read a dead sandbox's {RECORD_FILE}; its jail, if any, is left");
            return;
        }
    };
    if !owns_jail(dir, &jail) {
        tracing::warn!(dir = %dir.display(), jail = %jail.dir.display(), "a dead sandbox's {RECORD_FILE} names another jail; leaving it");
        return;
    }
    match tokio::fs::remove_dir_all(&jail.dir).await {
        Ok(()) => tracing::info!(jail = %jail.dir.display(), "removed a dead sandbox's jail"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(jail = %jail.dir.display(), error = %e, "cannot remove a dead sandbox's jail")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_record_round_trips_and_a_missing_one_is_none() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(VmRecord::read(dir.path()).await.unwrap(), None);
        let record = VmRecord {
            jail: Some(JailRecord {
                dir: "/srv/jailer/firecracker/sb-1".into(),
                uid: 65534,
                gid: 65534,
            }),
            kernel_cmdline: "reboot=k panic=1".into(),
            track_dirty_pages: true,
        };
        record.write(dir.path()).await.unwrap();
        assert_eq!(VmRecord::read(dir.path()).await.unwrap(), Some(record));
        assert!(!dir.path().join(format!("{RECORD_FILE}.tmp")).exists());
        std::fs::write(dir.path().join(RECORD_FILE), "{").unwrap();
        assert!(VmRecord::read(dir.path()).await.is_err());
    }

    #[tokio::test]
    async fn release_dead_removes_only_the_sandboxs_own_jail() {
        let base = tempfile::tempdir().unwrap();
        let sandbox = base.path().join("sandboxes").join("sb-1");
        std::fs::create_dir_all(&sandbox).unwrap();
        let jail = base.path().join("jails").join("firecracker").join("sb-1");
        std::fs::create_dir_all(jail.join("root")).unwrap();
        let other = base.path().join("jails").join("firecracker").join("sb-2");
        std::fs::create_dir_all(&other).unwrap();

        let record = |dir: &Path| VmRecord {
            jail: Some(JailRecord {
                dir: dir.to_owned(),
                uid: 1,
                gid: 1,
            }),
            kernel_cmdline: String::new(),
            track_dirty_pages: false,
        };
        record(&other).write(&sandbox).await.unwrap();
        release_dead(&sandbox).await;
        assert!(other.exists(), "another sandbox's jail was removed");

        record(&jail).write(&sandbox).await.unwrap();
        release_dead(&sandbox).await;
        assert!(!jail.exists());
        // Gone already, or never recorded: nothing to do.
        release_dead(&sandbox).await;
        release_dead(base.path()).await;
    }
}
