//! File-system types returned by the agent's file requests.

use serde::{Deserialize, Serialize};

/// The type of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileKind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link (only in listings; [`FileStat`] follows links).
    Symlink,
    /// Anything else (device, socket, FIFO).
    Other,
}

/// Metadata of a path, following symbolic links.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
    /// Last modification, milliseconds since the Unix epoch (guest clock).
    pub modified_ms: i64,
}

/// One entry of a directory listing (metadata of the entry itself, not of a
/// link's target).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    /// File name (lossily converted to UTF-8).
    pub name: String,
    /// The file type.
    pub kind: FileKind,
    /// Size in bytes.
    pub size: u64,
    /// Permission bits.
    pub mode: u32,
}

/// A directory listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirListing {
    /// Entries, sorted by name; `.` and `..` are left out.
    pub entries: Vec<DirEntry>,
    /// Whether the directory had more entries than fit in one frame.
    pub truncated: bool,
}
