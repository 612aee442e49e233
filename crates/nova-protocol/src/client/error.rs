//! Errors of the host client.

use std::time::Duration;

use crate::frame::FrameError;
use crate::remote_error::{RemoteError, RemoteErrorKind};

/// Why a call on [`super::AgentClient`] failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// The connection to the agent is closed (the VM stopped, the agent
    /// exited, or the stream broke); make a new connection.
    #[error("connection to the agent is closed: {reason}")]
    Disconnected {
        /// What ended the connection.
        reason: String,
    },
    /// The agent did not answer in time.
    #[error("the agent did not answer within {0:?}")]
    TimedOut(Duration),
    /// The agent speaks no protocol version we speak.
    #[error(
        "protocol version mismatch: we speak {ours:?}, the agent speaks {theirs:?}; use matching host and guest builds"
    )]
    VersionMismatch {
        /// Versions this build speaks.
        ours: Vec<u32>,
        /// Versions the agent speaks.
        theirs: Vec<u32>,
    },
    /// The agent refused the connection for another reason.
    #[error("the agent refused the connection: {0}")]
    Refused(String),
    /// The request failed inside the guest.
    #[error("the guest reported an error: {message}")]
    Remote {
        /// Class of the error.
        kind: RemoteErrorKind,
        /// The guest's message.
        message: String,
    },
    /// Reading from or writing to the stream failed.
    #[error("I/O error on the agent stream: {0}")]
    Io(String),
    /// A frame was over [`crate::MAX_FRAME_SIZE`].
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    FrameTooLarge {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The agent sent something that breaks the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl ClientError {
    pub(crate) fn disconnected(reason: impl Into<String>) -> Self {
        Self::Disconnected {
            reason: reason.into(),
        }
    }

    /// The remote error kind, if this is [`ClientError::Remote`].
    pub fn remote_kind(&self) -> Option<RemoteErrorKind> {
        match self {
            Self::Remote { kind, .. } => Some(*kind),
            _ => None,
        }
    }
}

impl From<RemoteError> for ClientError {
    fn from(e: RemoteError) -> Self {
        Self::Remote {
            kind: e.kind,
            message: e.message,
        }
    }
}

impl From<FrameError> for ClientError {
    fn from(e: FrameError) -> Self {
        match e {
            FrameError::Io(io) => Self::Io(io.to_string()),
            FrameError::TooLarge { len, max } => Self::FrameTooLarge { len, max },
            other => Self::Protocol(other.to_string()),
        }
    }
}

impl From<std::io::Error> for ClientError {
    fn from(e: std::io::Error) -> Self {
        Self::Io(e.to_string())
    }
}
