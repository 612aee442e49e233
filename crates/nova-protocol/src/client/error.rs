//! Errors of the host client, and why a connection ends.

use std::time::Duration;

use crate::frame::FrameError;
use crate::messages::StreamKind;
use crate::remote_error::{RemoteError, RemoteErrorKind};

/// Something the agent sent that a well-behaved agent never sends. The
/// client closes the connection on the first one (see
/// [`ConnectionEnd::Violation`]); the guest should be treated as broken or
/// hostile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolViolation {
    /// The agent sent more on a stream than the host had given it credit for.
    #[error(
        "request {id}: {outstanding} unacknowledged bytes on {stream:?}, over the window of {window}"
    )]
    CreditOverrun {
        /// The request.
        id: u64,
        /// The stream.
        stream: StreamKind,
        /// Bytes sent and not credited back, this chunk included.
        outstanding: u64,
        /// [`crate::STREAM_WINDOW`].
        window: u32,
    },
    /// The agent returned more stdin / upload credit than the host had used.
    #[error("request {id}: {bytes} bytes of credit returned with {outstanding} outstanding")]
    CreditOverflow {
        /// The request.
        id: u64,
        /// The credit returned.
        bytes: u32,
        /// Bytes the host had sent and not had credited back.
        outstanding: u64,
    },
    /// Data for a request that is not in flight (never started, or already done).
    #[error("data for request {id}, which is not in flight")]
    UnknownRequest {
        /// The request id.
        id: u64,
    },
    /// Data on a stream the request does not have (stderr of a download, ...).
    #[error("{stream:?} data for request {id}, which has no such stream")]
    UnexpectedStream {
        /// The request.
        id: u64,
        /// The stream.
        stream: StreamKind,
    },
    /// A frame's length prefix is over [`crate::MAX_FRAME_SIZE`].
    #[error("a frame of {len} bytes, over the maximum of {max}")]
    FrameTooLarge {
        /// The announced length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A frame that does not decode as an agent message.
    #[error("a malformed frame: {0}")]
    Malformed(String),
}

/// Why the connection to an agent ended
/// ([`super::AgentClient::closed`], [`ClientError::Disconnected`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectionEnd {
    /// The client and every handle were dropped.
    #[error("the client was dropped")]
    ClientDropped,
    /// The agent closed the stream (the VM stopped, or the agent exited).
    #[error("the agent closed the connection")]
    AgentClosed,
    /// Reading from the stream failed.
    #[error("reading from the agent failed: {0}")]
    ReadFailed(String),
    /// Writing to the stream failed.
    #[error("writing to the agent failed")]
    WriteFailed,
    /// The agent said the host broke the protocol, and closed the connection.
    #[error("the agent reported a protocol error: {0}")]
    RejectedByAgent(String),
    /// The agent broke the protocol; the client closed the connection.
    #[error("the agent broke the protocol: {0}")]
    Violation(ProtocolViolation),
    /// The connection's task is gone (its runtime shut down).
    #[error("the connection task ended")]
    TaskGone,
}

impl ConnectionEnd {
    /// The violation, if the agent broke the protocol.
    pub fn violation(&self) -> Option<&ProtocolViolation> {
        match self {
            Self::Violation(v) => Some(v),
            _ => None,
        }
    }
}

/// Why a call on [`super::AgentClient`] failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// The connection to the agent is closed (the VM stopped, the agent
    /// exited, the stream broke, or the agent broke the protocol); make a new
    /// connection.
    #[error("connection to the agent is closed: {end}")]
    Disconnected {
        /// What ended the connection.
        end: ConnectionEnd,
    },
    /// A whole-output or whole-file read reached its cap; nothing more was
    /// kept, and the transfer (or the command) was abandoned.
    #[error("{what} is over the {limit}-byte cap of {call}; {instead}")]
    TooLarge {
        /// What was being read.
        what: &'static str,
        /// The cap, in bytes.
        limit: u64,
        /// The call that has the cap.
        call: &'static str,
        /// The streaming call to use instead.
        instead: &'static str,
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
    pub(crate) fn disconnected(end: ConnectionEnd) -> Self {
        Self::Disconnected { end }
    }

    /// The protocol violation that ended the connection, if that is why
    /// this call failed.
    pub fn violation(&self) -> Option<&ProtocolViolation> {
        match self {
            Self::Disconnected { end } => end.violation(),
            _ => None,
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
