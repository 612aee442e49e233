//! Errors the agent reports for a request.
//!
//! The agent classifies every OS error it hits ([`RemoteError::from_io`]) so
//! the host can tell "no such file" from "disk full" without parsing text;
//! the message keeps the OS's own words.

use serde::{Deserialize, Serialize};

use crate::exec::SpawnErrorKind;

/// Broad class of a failed request, so callers can match without parsing text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RemoteErrorKind {
    /// A path or program does not exist.
    NotFound,
    /// The guest refused access.
    PermissionDenied,
    /// Something already exists where it should not.
    AlreadyExists,
    /// The request itself was invalid (empty argv, bad mode, ...).
    InvalidInput,
    /// The agent could not start the command, for this reason (the
    /// message names the program, interpreter or directory at fault).
    Spawn(SpawnErrorKind),
    /// The request id is unknown or already finished.
    UnknownRequest,
    /// The peer broke the protocol (malformed frame, credit overrun, ...);
    /// the agent closes the connection after reporting it.
    Protocol,
    /// The agent is at a limit (too many requests in flight).
    Busy,
    /// Any other I/O error.
    Io,
    /// A directory where a file was needed (`EISDIR`).
    IsADirectory,
    /// A path component that should be a directory is not one (`ENOTDIR`).
    NotADirectory,
    /// The guest's file system or quota is full (`ENOSPC`, `EDQUOT`).
    NoSpace,
    /// The file system is read-only (`EROFS`).
    ReadOnly,
    /// A directory to remove still has entries (`ENOTEMPTY`).
    DirectoryNotEmpty,
}

/// A request failed inside the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct RemoteError {
    /// The class of error.
    pub kind: RemoteErrorKind,
    /// What failed, in words (includes the OS error text).
    pub message: String,
}

impl RemoteError {
    /// Builds an error.
    pub fn new(kind: RemoteErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    /// Builds an error from an I/O error, with `context` saying what was being done.
    pub fn from_io(context: impl std::fmt::Display, err: &std::io::Error) -> Self {
        use std::io::ErrorKind as K;
        let kind = match err.kind() {
            K::NotFound => RemoteErrorKind::NotFound,
            K::PermissionDenied => RemoteErrorKind::PermissionDenied,
            K::AlreadyExists => RemoteErrorKind::AlreadyExists,
            K::InvalidInput | K::InvalidData => RemoteErrorKind::InvalidInput,
            K::IsADirectory => RemoteErrorKind::IsADirectory,
            K::NotADirectory => RemoteErrorKind::NotADirectory,
            K::StorageFull | K::QuotaExceeded => RemoteErrorKind::NoSpace,
            K::ReadOnlyFilesystem => RemoteErrorKind::ReadOnly,
            K::DirectoryNotEmpty => RemoteErrorKind::DirectoryNotEmpty,
            _ => RemoteErrorKind::Io,
        };
        Self::new(kind, format!("{context}: {err}"))
    }
}

#[cfg(test)]
mod tests {
    use std::io::Error;

    use super::*;

    #[test]
    fn os_errors_map_to_their_kind_and_keep_the_os_words() {
        for (errno, kind) in [
            (2, RemoteErrorKind::NotFound),
            (13, RemoteErrorKind::PermissionDenied),
            (17, RemoteErrorKind::AlreadyExists),
            (21, RemoteErrorKind::IsADirectory),
            (20, RemoteErrorKind::NotADirectory),
            (28, RemoteErrorKind::NoSpace),
            (122, RemoteErrorKind::NoSpace),
            (30, RemoteErrorKind::ReadOnly),
            (39, RemoteErrorKind::DirectoryNotEmpty),
            (5, RemoteErrorKind::Io),
        ] {
            let e = RemoteError::from_io("open /x", &Error::from_raw_os_error(errno));
            assert_eq!(e.kind, kind, "errno {errno}");
            assert!(e.message.starts_with("open /x: "), "{}", e.message);
        }
    }
}
