//! Snapshot directories on disk: the manifest, the scratch-disk copy, and
//! the checks made before a restore.
//!
//! The VMM writes its own files (machine state, memory) through
//! [`crate::backend::Vm::snapshot`]; the runtime adds the scratch disk and
//! [`SNAPSHOT_MANIFEST`], and refuses to restore a snapshot made by another
//! VMM or for another build of its template ([`check_restorable`]).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nova_core::config::SandboxConfig;
use nova_core::hypervisor::HypervisorKind;
use nova_core::snapshot::{
    SNAPSHOT_FORMAT, SNAPSHOT_FORMAT_OLDEST, SNAPSHOT_MANIFEST, Snapshot, SnapshotError,
    SnapshotManifest, TemplateIdentity,
};
use nova_core::template::{Template, TemplateManager};
use sha2::{Digest, Sha256};

/// File name of the scratch-disk copy inside a snapshot directory.
pub const SCRATCH_FILE: &str = "scratch.ext4";

/// Writes `snapshot.manifest` into its directory, atomically.
pub async fn write_manifest(snapshot: &Snapshot) -> Result<(), SnapshotError> {
    let path = snapshot.dir.join(SNAPSHOT_MANIFEST);
    let manifest = snapshot.manifest.clone();
    let target = path.clone();
    tokio::task::spawn_blocking(move || crate::dir::write_atomic(&target, &manifest))
        .await
        .map_err(std::io::Error::other)
        .and_then(|r| r)
        .map_err(|source| SnapshotError::Io { path, source })
}

/// Reads the snapshot in `dir` (made absolute).
pub async fn read(dir: &Path) -> Result<Snapshot, SnapshotError> {
    let dir = std::path::absolute(dir).map_err(|source| SnapshotError::Io {
        path: dir.to_owned(),
        source,
    })?;
    let path = dir.join(SNAPSHOT_MANIFEST);
    let invalid = |reason: String| SnapshotError::Invalid {
        dir: dir.clone(),
        reason,
    };
    let bytes = match tokio::fs::read(&path).await {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(invalid(format!(
                "it has no {SNAPSHOT_MANIFEST}; take a snapshot into it first"
            )));
        }
        Err(source) => return Err(SnapshotError::Io { path, source }),
    };
    let manifest: SnapshotManifest = serde_json::from_slice(&bytes)
        .map_err(|e| invalid(format!("{SNAPSHOT_MANIFEST} does not parse: {e}")))?;
    if !(SNAPSHOT_FORMAT_OLDEST..=SNAPSHOT_FORMAT).contains(&manifest.format) {
        return Err(invalid(format!(
            "its format is {}, this build reads {SNAPSHOT_FORMAT_OLDEST} to {SNAPSHOT_FORMAT}; \
             take a new snapshot",
            manifest.format
        )));
    }
    Ok(Snapshot { dir, manifest })
}

/// Refuses a snapshot that `provider` cannot restore: made by another VMM,
/// or for a template that was rebuilt or removed since.
pub fn check_restorable(
    snapshot: &Snapshot,
    provider: HypervisorKind,
    templates: &TemplateManager,
) -> Result<(), SnapshotError> {
    let manifest = &snapshot.manifest;
    if manifest.vmm != provider {
        return Err(SnapshotError::WrongVmm {
            dir: snapshot.dir.clone(),
            made_by: manifest.vmm,
            provider,
        });
    }
    if let Some(identity) = &manifest.template {
        let changed = |reason: String| SnapshotError::TemplateChanged {
            dir: snapshot.dir.clone(),
            template: identity.id.clone(),
            reason,
        };
        let template = templates
            .load(&identity.id)
            .map_err(|e| changed(format!("it cannot be loaded: {e}")))?;
        let now = template_content_hash(&template)
            .map_err(|e| changed(format!("its files cannot be read: {e}")))?;
        if now != identity.content_hash {
            return Err(changed(format!(
                "content hash {} then, {} now",
                short(&identity.content_hash),
                short(&now)
            )));
        }
    }
    Ok(())
}

/// Refuses a snapshot whose VM differs from what `config` asks for: the
/// restored guest keeps the snapshot's memory, vCPUs, disks and kernel
/// command line, so those must be the same. Published ports (`host_port`,
/// `ports`) and the egress policy are not compared: they are host-side
/// nftables rules the guest never sees (every guest has the same address
/// and gateway), so a snapshot restores under any of them.
pub fn fits(snapshot: &Snapshot, config: &SandboxConfig) -> Result<(), SnapshotError> {
    let made = &snapshot.manifest.config;
    let differs = |what: &str, then: String, now: String| SnapshotError::Invalid {
        dir: snapshot.dir.clone(),
        reason: format!(
            "it was made with {what} = {then}, and this sandbox asks for {now}; make a \
             snapshot with the same {what}, or start with start = \"cold\""
        ),
    };
    if made.memory_mb != config.memory_mb {
        return Err(differs(
            "memory_mb",
            made.memory_mb.to_string(),
            config.memory_mb.to_string(),
        ));
    }
    if made.vcpus != config.vcpus {
        return Err(differs(
            "vcpus",
            made.vcpus.to_string(),
            config.vcpus.to_string(),
        ));
    }
    // The restored VM must have the devices of the one the snapshot was
    // taken of; whether that had a network is on its command line.
    let had_network = crate::network::snapshot_has_network(&snapshot.manifest.kernel_cmdline);
    if had_network != config.enable_network {
        return Err(differs(
            "enable_network",
            had_network.to_string(),
            config.enable_network.to_string(),
        ));
    }
    if made.read_only_rootfs != config.read_only_rootfs {
        return Err(differs(
            "read_only_rootfs",
            made.read_only_rootfs.to_string(),
            config.read_only_rootfs.to_string(),
        ));
    }
    if made.kernel_args != config.kernel_args {
        return Err(differs(
            "kernel_args",
            format!("{:?}", made.kernel_args),
            format!("{:?}", config.kernel_args),
        ));
    }
    if made.rootfs_path != config.rootfs_path || made.extra_drives != config.extra_drives {
        return Err(differs(
            "disks (rootfs_path, extra_drives)",
            format!("{:?} {:?}", made.rootfs_path, made.extra_drives),
            format!("{:?} {:?}", config.rootfs_path, config.extra_drives),
        ));
    }
    Ok(())
}

fn short(hash: &str) -> &str {
    hash.get(..12).unwrap_or(hash)
}

/// The identity of `template`'s current build, for a snapshot manifest.
pub fn template_identity(template: &Template) -> std::io::Result<TemplateIdentity> {
    Ok(TemplateIdentity {
        id: template.id().to_owned(),
        content_hash: template_content_hash(template)?,
    })
}

/// A hash that changes whenever the template is rebuilt: SHA-256 over its
/// manifest and, for its kernel and rootfs, the size, inode and modification
/// time (nanoseconds). Builds write new files, so a rebuild changes it;
/// hashing the gigabyte rootfs itself on every restore would cost seconds.
pub fn template_content_hash(template: &Template) -> std::io::Result<String> {
    let mut hasher = Sha256::new();
    let manifest = serde_json::to_vec(&template.manifest).map_err(std::io::Error::other)?;
    hasher.update((manifest.len() as u64).to_le_bytes());
    hasher.update(&manifest);
    let files: [PathBuf; 2] = [template.kernel_path(), template.rootfs_path()];
    for file in files {
        let meta = std::fs::metadata(&file)?;
        for n in [
            meta.len(),
            meta.ino(),
            meta.dev(),
            meta.mtime() as u64,
            meta.mtime_nsec() as u64,
        ] {
            hasher.update(n.to_le_bytes());
        }
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

#[cfg(test)]
mod tests {
    use nova_core::config::SandboxConfig;
    use nova_core::id::SandboxId;
    use nova_core::snapshot::SnapshotKind;
    use nova_core::template::TemplateManifest;

    use super::*;

    fn install_template(root: &Path) -> TemplateManager {
        let dir = root.join("t");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("vmlinux"), b"kernel").unwrap();
        std::fs::write(dir.join("rootfs.ext4"), b"rootfs").unwrap();
        let manifest = TemplateManifest {
            name: "t".into(),
            template_id: "t".into(),
            os_type: "linux".into(),
            memory_mb: 256,
            vcpus: 1,
            boot_time_ms: 0,
            disk_size_gb: 0.0,
            kernel_version: "6.1".into(),
            required_files: vec!["vmlinux".into(), "rootfs.ext4".into()],
            packages: vec![],
            arch: Default::default(),
            exec_defaults: Default::default(),
        };
        TemplateManager::write_manifest(&dir, &manifest).unwrap();
        TemplateManager::new(root)
    }

    #[tokio::test]
    async fn a_rebuilt_template_or_another_vmm_is_refused_with_the_reason() {
        let root = tempfile::tempdir().unwrap();
        let templates = install_template(root.path());
        let template = templates.load("t").unwrap();
        let dir = root.path().join("snap");
        std::fs::create_dir_all(&dir).unwrap();
        let snapshot = Snapshot {
            dir: dir.clone(),
            manifest: SnapshotManifest {
                format: SNAPSHOT_FORMAT,
                vmm: HypervisorKind::Firecracker,
                vmm_version: "1.16.1".into(),
                kind: SnapshotKind::Full,
                source: SandboxId::random(),
                config: SandboxConfig::default(),
                template: Some(template_identity(&template).unwrap()),
                kernel_cmdline: String::new(),
                created_at_ms: 1,
                scratch: false,
                track_dirty_pages: false,
            },
        };
        write_manifest(&snapshot).await.unwrap();
        let read_back = read(&dir).await.unwrap();
        assert_eq!(read_back, snapshot);
        check_restorable(&read_back, HypervisorKind::Firecracker, &templates).unwrap();
        let e = check_restorable(&read_back, HypervisorKind::Qemu, &templates).unwrap_err();
        assert!(matches!(e, SnapshotError::WrongVmm { .. }), "{e}");

        // Rebuild the template: new rootfs file.
        let rootfs = template.rootfs_path();
        std::fs::remove_file(&rootfs).unwrap();
        std::fs::write(&rootfs, b"rootfs, rebuilt").unwrap();
        let e = check_restorable(&read_back, HypervisorKind::Firecracker, &templates).unwrap_err();
        assert!(matches!(e, SnapshotError::TemplateChanged { .. }), "{e}");
        assert!(e.to_string().contains("make a new snapshot"), "{e}");

        let e = read(&root.path().join("none")).await.unwrap_err();
        assert!(
            e.to_string().contains("take a snapshot into it first"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn only_format_4_reads() {
        let root = tempfile::tempdir().unwrap();
        let mut snapshot = Snapshot {
            dir: root.path().to_owned(),
            manifest: SnapshotManifest {
                format: SNAPSHOT_FORMAT,
                vmm: HypervisorKind::Qemu,
                vmm_version: "7.2.22".into(),
                kind: SnapshotKind::Full,
                source: SandboxId::random(),
                config: SandboxConfig::default(),
                template: None,
                kernel_cmdline: String::new(),
                created_at_ms: 1,
                scratch: false,
                track_dirty_pages: false,
            },
        };
        for (format, readable) in [(1, false), (3, false), (4, true), (5, false)] {
            snapshot.manifest.format = format;
            write_manifest(&snapshot).await.unwrap();
            match read(root.path()).await {
                Ok(back) => {
                    assert!(readable, "format {format} was read");
                    assert_eq!(back.manifest.format, format);
                }
                Err(e) => {
                    assert!(!readable, "format {format}: {e}");
                    assert!(e.to_string().contains("take a new snapshot"), "{e}");
                }
            }
        }
    }
}
