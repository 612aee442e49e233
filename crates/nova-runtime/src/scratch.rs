//! The sandbox's private writable disk, shared by every provider.
//!
//! A sparse file formatted as ext4 without a journal (the disk dies with the
//! sandbox, so crash consistency buys nothing) and with lazy inode-table
//! initialisation, so formatting writes only a few megabytes whatever the
//! size. The guest agent mounts it and stacks an overlay on the read-only
//! template rootfs.

use std::path::Path;

use nova_core::error::CreateSandboxError;
use tokio::process::Command;

/// Formats a new sparse ext4 image of `size_mb` MiB at `path`.
pub async fn create_scratch_disk(path: &Path, size_mb: u64) -> Result<(), CreateSandboxError> {
    let prepare = |source| CreateSandboxError::Prepare {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::create_new(path).map_err(prepare)?;
    file.set_len(size_mb * 1024 * 1024).map_err(prepare)?;
    drop(file);
    let output = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-m", "0", "-O", "^has_journal", "-E"])
        .arg("lazy_itable_init=1,lazy_journal_init=1,nodiscard")
        .arg(path)
        .output()
        .await
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                CreateSandboxError::Unsupported {
                    reason: "mkfs.ext4 not found; install it with `apt-get install e2fsprogs`"
                        .into(),
                }
            } else {
                prepare(e)
            }
        })?;
    if !output.status.success() {
        return Err(prepare(std::io::Error::other(format!(
            "mkfs.ext4 failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ))));
    }
    Ok(())
}

/// Copies the disk image `from` to the new file `to`.
pub async fn clone_disk(from: &Path, to: &Path) -> std::io::Result<()> {
    tokio::fs::copy(from, to).await.map(drop)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    #[tokio::test]
    async fn makes_a_sparse_ext4_image() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("scratch.ext4");
        create_scratch_disk(&path, 1024).await.unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 1024 * 1024 * 1024);
        assert!(
            meta.blocks() * 512 < 64 * 1024 * 1024,
            "{} bytes allocated",
            meta.blocks() * 512
        );
        let mut image = [0u8; 2048];
        std::io::Read::read_exact(&mut std::fs::File::open(&path).unwrap(), &mut image).unwrap();
        // The ext4 superblock magic 0xEF53 at offset 1024 + 56.
        assert_eq!(&image[1024 + 56..1024 + 58], &[0x53, 0xEF]);
        // An existing file is never overwritten.
        assert!(create_scratch_disk(&path, 16).await.is_err());
    }
}
