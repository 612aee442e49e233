//! The NovaSandbox host <-> guest agent protocol.
//!
//! Every sandbox VM runs `nova-agent` as PID 1. The host talks to it over one
//! byte stream: vsock under Firecracker and Apple VZ, virtio-serial under QEMU
//! without vhost-vsock, a Unix socket in host tests. This crate defines what
//! crosses that stream and provides the async host client,
//! [`client::AgentClient`].
//!
//! # Wire format
//!
//! * **Frames** ([`frame`]): a `u32` big-endian payload length followed by the
//!   payload. A payload longer than [`MAX_FRAME_SIZE`] is a protocol error; the
//!   receiver answers with an error and closes the stream instead of
//!   allocating what the peer asked for.
//! * **Payloads** are [`postcard`]-encoded serde values. postcard is a
//!   well-kept, stable (1.0 wire format is frozen by its authors), compact
//!   format: varint integers, a varint index per enum variant, raw bytes for
//!   byte buffers (`serde_bytes`), no field names. That makes the encoding
//!   cheap enough for gigabytes of command output and makes the schema exactly
//!   the order of fields and variants in [`messages`], which the
//!   `wire_schema` test freezes in a checked-in file.
//! * **Handshake** ([`handshake`]): the host (client) writes a [`Hello`] first,
//!   then waits. Over virtio-serial the host's bytes may sit in a buffer until
//!   the guest opens its port, so the client never waits for the agent to speak
//!   first. The agent reads the `Hello`, picks the highest protocol version
//!   both sides speak and answers [`HelloReply::Welcome`] with its version,
//!   kernel release and guest boot timing, or [`HelloReply::Refused`]. The two
//!   handshake types are frozen across protocol versions so that a mismatch is
//!   always reported as a mismatch, never as garbage.
//! * **Multiplexing** ([`messages`]): after the handshake, the host sends
//!   [`ClientMessage`]s and the agent [`AgentMessage`]s. Each request carries a
//!   `u64` id chosen by the host; everything the agent sends about it (start,
//!   output chunks, credit, the final [`AgentMessage::Done`]) carries that id,
//!   so any number of requests are in flight on one stream.
//! * **Flow control**: every byte stream (command stdout / stderr, a file being
//!   read, command stdin, a file being written) is credit-based. The sender may
//!   have at most [`STREAM_WINDOW`] bytes outstanding per stream; the receiver
//!   hands credit back ([`ClientMessage::Credit`], [`AgentMessage::Credit`]) as
//!   its consumer takes the bytes. A command writing gigabytes therefore blocks
//!   on its pipe in the guest when the host consumer is slow, and neither side
//!   ever buffers more than a window per stream. One slow stream never stalls
//!   the others (no head-of-line blocking).
//!
//! * **Boot contract** ([`boot`]): what the host puts on the guest's kernel
//!   command line (agent path, listen ports, devices, `nova.*` parameters) and
//!   how the agent reads it back, formatted and parsed in one place.
//!
//! Output and file contents are always bytes ([`bytes::Bytes`]), never assumed
//! to be UTF-8.
#![forbid(unsafe_code)]

pub mod boot;
pub mod client;
pub mod exec;
pub mod frame;
pub mod fs;
pub mod handshake;
pub mod messages;
pub mod remote_error;
pub mod stats;
pub mod user;
pub mod zero_copy;

pub use exec::{
    ExecCommand, ExecInfo, ExecResult, ExecSpec, ExecState, ExitStatus, PtySize, SpawnErrorKind,
};
pub use frame::{FrameError, FrameReader, FrameWriter};
pub use fs::{DirEntry, DirListing, FileKind, FileStat};
pub use handshake::{Hello, HelloInfo, HelloReply};
pub use messages::{AgentMessage, ClientMessage, Request, Response, StreamKind};
pub use remote_error::{RemoteError, RemoteErrorKind};
pub use stats::GuestStats;
pub use user::{ExecUser, IdOrName, ParseUserError};

/// The protocol version this build speaks. Bump it whenever anything in
/// [`messages`] changes (the `wire_schema` test fails until you do).
///
/// 2: [`RemoteErrorKind`] gained `IsADirectory`, `NotADirectory`, `NoSpace`,
/// `ReadOnly` and `DirectoryNotEmpty`, and `Spawn` carries a
/// [`SpawnErrorKind`]; [`Request::SetClock`] sets the
/// guest's wall clock (a version-1 peer can decode none of these).
///
/// 3: [`Request::Refresh`] and [`Response::Refreshed`] make a guest restored
/// from a snapshot distinct (hostname, machine id, a reseeded random
/// generator, the wall clock).
///
/// 4: commands outlive the host connection that started them. `Started`
/// carries the command's [`exec_id`](AgentMessage::Started) (stable for the
/// agent's lifetime); [`Request::ListExecs`] lists the agent's commands
/// ([`Response::Execs`]), and [`Request::AttachExec`] streams a command's
/// buffered and further output and its exit status to a host that came back.
///
/// 5: [`ExecSpec::user`] runs a command as another user ([`ExecUser`],
/// resolved in the guest), refused with the new [`SpawnErrorKind`]s
/// `UnknownUser` and `SwitchUser`; [`Request::Refresh`] carries the DNS
/// servers a cold boot would get now, which the agent writes to
/// `/etc/resolv.conf`.
pub const PROTOCOL_VERSION: u32 = 5;

/// All protocol versions this build can speak, lowest first.
pub const SUPPORTED_VERSIONS: &[u32] = &[PROTOCOL_VERSION];

/// Magic bytes at the start of a [`Hello`], so that a peer speaking something
/// else entirely is recognized at once.
pub const HELLO_MAGIC: [u8; 4] = *b"NOVA";

/// Largest data chunk carried by one [`ClientMessage::Data`] or
/// [`AgentMessage::Data`] frame.
pub const MAX_CHUNK: usize = 1024 * 1024;

/// Largest frame payload either side accepts (1 MiB plus room for headers).
/// Larger length prefixes are rejected before anything is allocated.
pub const MAX_FRAME_SIZE: usize = 1024 * 1024 + 64 * 1024;

/// Fewest bytes of host entropy a [`Request::Refresh`] may carry (128 bits):
/// without fresh entropy, guests restored from one snapshot would keep
/// drawing the same random numbers, which is what the request is there to
/// prevent.
pub const REFRESH_ENTROPY_MIN: usize = 16;

/// Most bytes of host entropy a [`Request::Refresh`] may carry; the agent
/// refuses more ([`RemoteErrorKind::InvalidInput`]). 64 bytes is plenty to
/// reseed the kernel's generator; the bound only keeps the request small.
pub const REFRESH_ENTROPY_MAX: usize = 4096;

/// Bytes a sender may have in flight on one stream before it must wait for
/// credit. The receiver's buffering per stream is bounded by this.
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;

/// Most output bytes (stdout and stderr together) the agent holds for one
/// command whose host went away; past it the agent stops reading the
/// command's pipes, so the command blocks on them until a host attaches.
/// Smaller than [`STREAM_WINDOW`], so a host that attaches can take it all
/// at once.
pub const DETACHED_OUTPUT_LIMIT: usize = 1024 * 1024;

/// How many ended commands the agent remembers ([`Request::ListExecs`],
/// [`Request::AttachExec`]); the oldest is forgotten first.
pub const FINISHED_EXECS_KEPT: usize = 256;

/// Most output bytes the agent holds for all ended commands together; the
/// output of the oldest is dropped first (their exit status is kept).
pub const FINISHED_OUTPUT_LIMIT: usize = 16 * 1024 * 1024;
