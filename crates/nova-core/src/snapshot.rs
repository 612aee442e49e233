//! Snapshots: what one records, and why one is refused.
//!
//! A snapshot is a directory holding the VMM's saved machine state, the
//! guest's memory, a copy of the sandbox's scratch disk (unless its root was
//! read-only) and [`SNAPSHOT_MANIFEST`], a [`SnapshotManifest`] saying which
//! VMM made it, for which template build, with which resources. Restoring
//! checks the manifest first, so a snapshot made by another VMM or for an
//! earlier build of its template is refused with a [`SnapshotError`] that
//! says why, before any process is started.
//!
//! Writing and reading the directory is the runtime's job; this module holds
//! the types only.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::config::SandboxConfig;
use crate::error::BoxError;
use crate::hypervisor::HypervisorKind;
use crate::id::SandboxId;
use crate::state::SandboxState;

/// File name of the manifest inside a snapshot directory.
pub const SNAPSHOT_MANIFEST: &str = "snapshot.json";

/// The manifest format this build writes. 2: the guest's network gateway
/// has a fixed hardware address, so a snapshot's ARP cache stays right
/// wherever it is restored (format 1 snapshots have a stale one). 3: a QEMU
/// snapshot may keep the guest's RAM in a `memory` file of its own beside a
/// VM state that holds the devices only, which a build reading format 2 at
/// most would load as a machine without memory. 4: a QEMU guest's
/// network device is attached without the tap's virtio-net header
/// (`vnet_hdr`) in both network modes, so a snapshot restores into a tap
/// (namespace mode) or passt (user mode) alike; one taken with the header
/// cannot be restored without it.
pub const SNAPSHOT_FORMAT: u32 = 4;

/// The oldest manifest format this build still reads: older snapshots'
/// network devices expect the tap's virtio-net header (see
/// [`SNAPSHOT_FORMAT`]).
pub const SNAPSHOT_FORMAT_OLDEST: u32 = 4;

/// Whether a snapshot holds all guest memory or only what changed since the
/// previous snapshot in the same directory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotKind {
    /// Every page of guest memory.
    #[default]
    Full,
    /// Only the pages written since the last snapshot, merged into the
    /// memory file already in the directory (needs dirty-page tracking).
    Diff,
}

/// The template build a snapshot was made from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateIdentity {
    /// The template id.
    pub id: String,
    /// Identity of the template's kernel and rootfs when the snapshot was
    /// made (see `nova_runtime::snapshot::template_content_hash`); a rebuilt
    /// template has another.
    pub content_hash: String,
}

/// What a snapshot directory holds (`snapshot.json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SnapshotManifest {
    /// Manifest format, [`SNAPSHOT_FORMAT`] when written by this build.
    pub format: u32,
    /// The VMM that wrote it; only that VMM can load it.
    pub vmm: HypervisorKind,
    /// That VMM's version, as it reported it.
    pub vmm_version: String,
    /// Full or diff.
    pub kind: SnapshotKind,
    /// The sandbox it was taken of.
    pub source: SandboxId,
    /// That sandbox's config (memory, vCPUs, ...); a restored sandbox gets
    /// the same.
    pub config: SandboxConfig,
    /// The template build, when the sandbox booted a template's rootfs.
    pub template: Option<TemplateIdentity>,
    /// The guest kernel command line it booted with.
    pub kernel_cmdline: String,
    /// When it was taken, milliseconds since the Unix epoch.
    pub created_at_ms: u64,
    /// Whether the directory holds a copy of the scratch disk.
    pub scratch: bool,
    /// Whether the VM tracked dirty pages (a restored VM keeps doing so).
    #[serde(default)]
    pub track_dirty_pages: bool,
}

/// A snapshot on disk: its directory and manifest.
#[derive(Clone, Debug, PartialEq)]
pub struct Snapshot {
    /// The snapshot directory.
    pub dir: PathBuf,
    /// What it holds.
    pub manifest: SnapshotManifest,
}

/// Taking, reading or restoring a snapshot failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// No sandbox has this id.
    #[error("no sandbox with id {0}")]
    NotFound(SandboxId),
    /// Snapshots are taken of paused sandboxes only.
    #[error("cannot snapshot a sandbox that is {0}; pause it first")]
    NotPaused(SandboxState),
    /// This backend cannot take or load snapshots (yet).
    #[error("{vmm} sandboxes cannot be snapshotted here: {reason}")]
    Unsupported {
        /// The backend.
        vmm: HypervisorKind,
        /// Why, and what to do instead.
        reason: String,
    },
    /// The snapshot was made by another VMM.
    #[error(
        "the snapshot in {} was made by {made_by}; only a {made_by} provider can restore it, \
         not {provider}", .dir.display()
    )]
    WrongVmm {
        /// The snapshot directory.
        dir: PathBuf,
        /// The VMM that wrote it.
        made_by: HypervisorKind,
        /// The provider asked to restore it.
        provider: HypervisorKind,
    },
    /// The template was rebuilt (or removed) since the snapshot was made.
    #[error(
        "the snapshot in {} was made for another build of template `{template}`; the template \
         changed since ({reason}), so make a new snapshot", .dir.display()
    )]
    TemplateChanged {
        /// The snapshot directory.
        dir: PathBuf,
        /// The template id.
        template: String,
        /// What differs.
        reason: String,
    },
    /// The manifest is missing, unreadable or of another format.
    #[error("{} is not a usable NovaSandbox snapshot: {reason}", .dir.display())]
    Invalid {
        /// The snapshot directory.
        dir: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A snapshot file could not be written, copied or read.
    #[error("cannot write or read {}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The VMM refused or failed.
    #[error("{vmm} failed to {action}")]
    Vmm {
        /// Which VMM.
        vmm: HypervisorKind,
        /// What it was asked to do.
        action: String,
        /// Its error.
        #[source]
        source: BoxError,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_round_trips_and_errors_say_what_to_do() {
        let manifest = SnapshotManifest {
            format: SNAPSHOT_FORMAT,
            vmm: HypervisorKind::Firecracker,
            vmm_version: "1.16.1".into(),
            kind: SnapshotKind::Full,
            source: SandboxId::random(),
            config: SandboxConfig::default(),
            template: Some(TemplateIdentity {
                id: "python".into(),
                content_hash: "abc".into(),
            }),
            kernel_cmdline: "console=ttyS0".into(),
            created_at_ms: 1,
            scratch: true,
            track_dirty_pages: false,
        };
        let json = serde_json::to_string(&manifest).unwrap();
        assert_eq!(
            serde_json::from_str::<SnapshotManifest>(&json).unwrap(),
            manifest
        );
        let e = SnapshotError::WrongVmm {
            dir: "/s".into(),
            made_by: HypervisorKind::Firecracker,
            provider: HypervisorKind::Qemu,
        };
        assert_eq!(
            e.to_string(),
            "the snapshot in /s was made by firecracker; only a firecracker provider can \
             restore it, not qemu"
        );
        let e = SnapshotError::NotPaused(SandboxState::Running);
        assert_eq!(
            e.to_string(),
            "cannot snapshot a sandbox that is running; pause it first"
        );
    }
}
