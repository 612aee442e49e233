//! Version handshake.
//!
//! The host writes a [`Hello`] as the first frame and waits for the agent's
//! [`HelloReply`]. The host never waits for the agent to speak first: over
//! virtio-serial the host's bytes may sit in a buffer until the guest opens its
//! port, and the agent answers as soon as it has read them.
//!
//! These two types are **frozen across protocol versions** (only the message
//! types in [`crate::messages`] change with [`crate::PROTOCOL_VERSION`]), so a
//! client and an agent of different versions always understand each other's
//! handshake and report a version mismatch cleanly.

use serde::{Deserialize, Serialize};

use crate::{HELLO_MAGIC, SUPPORTED_VERSIONS};

/// The first frame on every connection, sent by the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Always [`HELLO_MAGIC`].
    pub magic: [u8; 4],
    /// Protocol versions the host speaks.
    pub versions: Vec<u32>,
    /// Free-form description of the client (crate version), for logs.
    pub client: String,
}

impl Hello {
    /// A `Hello` offering every version this build speaks.
    pub fn new() -> Self {
        Self {
            magic: HELLO_MAGIC,
            versions: SUPPORTED_VERSIONS.to_vec(),
            client: format!("nova-protocol/{}", env!("CARGO_PKG_VERSION")),
        }
    }
}

impl Default for Hello {
    fn default() -> Self {
        Self::new()
    }
}

/// What the agent tells about itself when it accepts a connection. Receiving
/// it means the sandbox is ready.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloInfo {
    /// The protocol version chosen for this connection.
    pub protocol_version: u32,
    /// The agent's own version (`nova-agent x.y.z`).
    pub agent_version: String,
    /// The guest kernel release (`uname -r`).
    pub kernel_release: String,
    /// Guest monotonic time since boot (`CLOCK_BOOTTIME`), in microseconds,
    /// at which the agent process started.
    pub agent_started_us: u64,
    /// Guest monotonic time since boot, in microseconds, at which the agent
    /// finished its PID 1 duties and began listening.
    pub agent_ready_us: u64,
    /// Whether the agent runs as PID 1 (false in host tests).
    pub pid1: bool,
    /// The guest hostname.
    pub hostname: String,
}

/// The agent's answer to a [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HelloReply {
    /// The connection is accepted; [`crate::messages`] traffic follows.
    Welcome(HelloInfo),
    /// The connection is refused (no common version, or the first frame was
    /// not a `Hello`); the agent closes the stream after this frame.
    Refused {
        /// Protocol versions the agent speaks.
        supported: Vec<u32>,
        /// Why, in words.
        message: String,
    },
}

/// Picks the highest version in both lists.
pub fn negotiate(ours: &[u32], theirs: &[u32]) -> Option<u32> {
    ours.iter().copied().filter(|v| theirs.contains(v)).max()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation_picks_highest_common_version() {
        assert_eq!(negotiate(&[1, 2, 3], &[2, 3, 4]), Some(3));
        assert_eq!(negotiate(&[1], &[2]), None);
        assert_eq!(negotiate(&[], &[1]), None);
    }
}
