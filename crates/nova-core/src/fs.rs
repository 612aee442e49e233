//! What file operations on a sandbox return: metadata, listings, and a file
//! streamed out of the guest.
//!
//! These are the caller's types; the agent protocol has its own wire types,
//! which the runtime maps onto these.

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::error::FileError;

/// The type of a file in the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link (listings only; [`FileStat`] follows links).
    Symlink,
    /// A device, socket or FIFO.
    Other,
}

/// Metadata of a guest path (following symbolic links).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStat {
    /// The file type.
    pub kind: FileKind,
    /// Size in bytes.
    pub size: u64,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    /// Owner user id.
    pub uid: u32,
    /// Owner group id.
    pub gid: u32,
    /// Last modification, milliseconds since the Unix epoch, by the guest's
    /// clock.
    pub modified_ms: i64,
}

/// One entry of a directory listing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    /// File name (lossily converted to UTF-8).
    pub name: String,
    /// The file type (a symbolic link is not followed).
    pub kind: FileKind,
    /// Size in bytes.
    pub size: u64,
    /// Permission bits.
    pub mode: u32,
}

/// A directory's entries.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirListing {
    /// Entries sorted by name, without `.` and `..`.
    pub entries: Vec<DirEntry>,
    /// Whether the directory had more entries than one listing carries.
    pub truncated: bool,
}

/// A guest file being streamed to the host, chunk by chunk (at most 1 MiB
/// each). Dropping it before the end cancels the transfer in the guest.
#[derive(Debug)]
pub struct FileDownload {
    size: u64,
    chunks: mpsc::Receiver<Result<Vec<u8>, FileError>>,
}

impl FileDownload {
    /// A download of a file of `size` bytes (when opened) whose chunks, or
    /// the error that ended it, arrive on `chunks`; the stream ends after the
    /// last chunk.
    pub fn new(size: u64, chunks: mpsc::Receiver<Result<Vec<u8>, FileError>>) -> Self {
        Self { size, chunks }
    }

    /// The file's size when the guest opened it (it may change meanwhile).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The next chunk; `Ok(None)` once the whole file arrived.
    pub async fn next(&mut self) -> Result<Option<Vec<u8>>, FileError> {
        self.chunks.recv().await.transpose()
    }
}
