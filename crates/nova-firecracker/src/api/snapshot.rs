//! `/snapshot/create` and `/snapshot/load`.
//!
//! A snapshot is two files: the microVM state (devices, vCPUs) and the guest
//! memory. It can only be taken of a paused VM, and only loaded into a fresh
//! Firecracker process that has not been configured (logger and metrics
//! aside). Block devices are not part of it: the same backing files must be
//! at the same paths (as the VMM sees them) when it is loaded.

use serde::{Deserialize, Serialize};

/// Which memory a snapshot holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotType {
    /// All guest memory.
    #[default]
    Full,
    /// Only memory dirtied since the previous snapshot (needs
    /// `track_dirty_pages`); it is applied on top of a full memory file.
    Diff,
}

/// The body of `PUT /snapshot/create`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotCreateParams {
    /// Where to write the microVM state, as the VMM sees the path.
    pub snapshot_path: String,
    /// Where to write guest memory, as the VMM sees the path.
    pub mem_file_path: String,
    /// Full or diff.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_type: Option<SnapshotType>,
}

/// Where the guest memory of a loaded snapshot comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemoryBackendType {
    /// A memory file, mapped privately.
    File,
    /// A userfaultfd handler listening on a Unix socket.
    Uffd,
}

/// The memory backend of a snapshot load.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryBackend {
    /// File or userfaultfd.
    pub backend_type: MemoryBackendType,
    /// The memory file, or the handler's socket.
    pub backend_path: String,
}

/// Points a restored vsock device at a new host socket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockOverride {
    /// The new host Unix socket.
    pub uds_path: String,
}

/// Points a restored network interface at a new tap device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkOverride {
    /// The interface.
    pub iface_id: String,
    /// Its new tap device.
    pub host_dev_name: String,
}

/// The body of `PUT /snapshot/load`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotLoadParams {
    /// The microVM state file.
    pub snapshot_path: String,
    /// The guest memory.
    pub mem_backend: MemoryBackend,
    /// Keep tracking dirty pages, for further diff snapshots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub track_dirty_pages: Option<bool>,
    /// Resume the vCPUs once loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume_vm: Option<bool>,
    /// New tap devices (Firecracker 1.12 and later).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub network_overrides: Vec<NetworkOverride>,
    /// A new vsock socket (Firecracker 1.16 and later).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_override: Option<VsockOverride>,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn create_bodies() {
        let full = SnapshotCreateParams {
            snapshot_path: "/s/vmstate".into(),
            mem_file_path: "/s/memory".into(),
            snapshot_type: None,
        };
        assert_eq!(
            serde_json::to_value(&full).unwrap(),
            json!({"snapshot_path": "/s/vmstate", "mem_file_path": "/s/memory"})
        );
        let diff = SnapshotCreateParams {
            snapshot_type: Some(SnapshotType::Diff),
            ..full
        };
        assert_eq!(
            serde_json::to_value(&diff).unwrap(),
            json!({"snapshot_path": "/s/vmstate", "mem_file_path": "/s/memory",
                   "snapshot_type": "Diff"})
        );
    }

    #[test]
    fn load_bodies() {
        let load = SnapshotLoadParams {
            snapshot_path: "/s/vmstate".into(),
            mem_backend: MemoryBackend {
                backend_type: MemoryBackendType::File,
                backend_path: "/s/memory".into(),
            },
            track_dirty_pages: None,
            resume_vm: Some(true),
            network_overrides: Vec::new(),
            vsock_override: None,
        };
        assert_eq!(
            serde_json::to_value(&load).unwrap(),
            json!({"snapshot_path": "/s/vmstate",
                   "mem_backend": {"backend_type": "File", "backend_path": "/s/memory"},
                   "resume_vm": true})
        );
        let overridden = SnapshotLoadParams {
            network_overrides: vec![NetworkOverride {
                iface_id: "eth0".into(),
                host_dev_name: "tap9".into(),
            }],
            vsock_override: Some(VsockOverride {
                uds_path: "/n/sandboxes/b/vsock.sock".into(),
            }),
            track_dirty_pages: Some(true),
            ..load
        };
        assert_eq!(
            serde_json::to_value(&overridden).unwrap(),
            json!({"snapshot_path": "/s/vmstate",
                   "mem_backend": {"backend_type": "File", "backend_path": "/s/memory"},
                   "track_dirty_pages": true, "resume_vm": true,
                   "network_overrides": [{"iface_id": "eth0", "host_dev_name": "tap9"}],
                   "vsock_override": {"uds_path": "/n/sandboxes/b/vsock.sock"}})
        );
    }
}
