//! File operations on a running guest beyond whole-file reads and writes:
//! listings, metadata, removal, directories, and streaming transfers, mapped
//! from the agent protocol's wire types onto `nova-core`'s.

use nova_core::error::FileError;
use nova_core::fs::{DirEntry, DirListing, FileDownload, FileKind, FileStat};
use tokio::io::AsyncRead;
use tokio::sync::mpsc;

use crate::{Guest, file_error};

/// How many downloaded chunks (up to 1 MiB each) may wait for the consumer.
const DOWNLOAD_BUFFER: usize = 4;

fn kind(kind: nova_protocol::FileKind) -> FileKind {
    match kind {
        nova_protocol::FileKind::File => FileKind::File,
        nova_protocol::FileKind::Dir => FileKind::Dir,
        nova_protocol::FileKind::Symlink => FileKind::Symlink,
        nova_protocol::FileKind::Other => FileKind::Other,
    }
}

impl Guest {
    /// Lists the directory `path`.
    pub async fn list_dir(&self, path: &str) -> Result<DirListing, FileError> {
        FileError::check_path(path)?;
        let listing = self
            .client()
            .list_dir(path)
            .await
            .map_err(|e| file_error(path, e))?;
        Ok(DirListing {
            entries: listing
                .entries
                .into_iter()
                .map(|e| DirEntry {
                    name: e.name,
                    kind: kind(e.kind),
                    size: e.size,
                    mode: e.mode,
                })
                .collect(),
            truncated: listing.truncated,
        })
    }

    /// Metadata of `path`, links followed.
    pub async fn stat(&self, path: &str) -> Result<FileStat, FileError> {
        FileError::check_path(path)?;
        let s = self
            .client()
            .stat(path)
            .await
            .map_err(|e| file_error(path, e))?;
        Ok(FileStat {
            kind: kind(s.kind),
            size: s.size,
            mode: s.mode,
            uid: s.uid,
            gid: s.gid,
            modified_ms: s.modified_ms,
        })
    }

    /// Removes `path` (a tree with `recursive`).
    pub async fn remove(&self, path: &str, recursive: bool) -> Result<(), FileError> {
        FileError::check_path(path)?;
        if path.trim_end_matches('/').is_empty() {
            return Err(FileError::InvalidPath {
                path: path.to_owned(),
                reason: "the root directory cannot be removed",
            });
        }
        self.client()
            .remove(path, recursive)
            .await
            .map_err(|e| file_error(path, e))
    }

    /// Creates the directory `path` and its missing parents.
    pub async fn mkdir(&self, path: &str, mode: u32) -> Result<(), FileError> {
        FileError::check_path(path)?;
        check_mode(path, mode)?;
        self.client()
            .mkdir_p(path, mode)
            .await
            .map_err(|e| file_error(path, e))
    }

    /// Streams `data` into `path`; returns the bytes written.
    pub async fn upload(
        &self,
        path: &str,
        mode: u32,
        data: Box<dyn AsyncRead + Send + Unpin>,
    ) -> Result<u64, FileError> {
        FileError::check_path(path)?;
        check_mode(path, mode)?;
        self.client()
            .write_file_from(path, data, mode)
            .await
            .map_err(|e| file_error(path, e))
    }

    /// Opens `path` for streaming to the host. The transfer keeps the
    /// protocol's back-pressure: a consumer that stops reading stops the
    /// guest's reads.
    pub async fn download(&self, path: &str) -> Result<FileDownload, FileError> {
        FileError::check_path(path)?;
        let mut download = self
            .client()
            .read_file(path)
            .await
            .map_err(|e| file_error(path, e))?;
        let size = download.size();
        let (tx, rx) = mpsc::channel(DOWNLOAD_BUFFER);
        let path = path.to_owned();
        tokio::spawn(async move {
            loop {
                let item = match download.recv().await {
                    Ok(Some(chunk)) => Ok(chunk.to_vec()),
                    Ok(None) => return,
                    Err(e) => Err(file_error(&path, e)),
                };
                let failed = item.is_err();
                // A consumer that went away drops `download`, which cancels
                // the transfer in the guest.
                if tx.send(item).await.is_err() || failed {
                    return;
                }
            }
        });
        Ok(FileDownload::new(size, rx))
    }
}

/// Refuses permission bits above `0o7777`.
pub(crate) fn check_mode(path: &str, mode: u32) -> Result<(), FileError> {
    if mode > 0o7777 {
        return Err(FileError::InvalidPath {
            path: path.to_owned(),
            reason: "mode is above 0o7777",
        });
    }
    Ok(())
}
