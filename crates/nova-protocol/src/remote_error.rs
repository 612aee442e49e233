//! Errors the agent reports for a request.

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
            _ => RemoteErrorKind::Io,
        };
        Self::new(kind, format!("{context}: {err}"))
    }
}
