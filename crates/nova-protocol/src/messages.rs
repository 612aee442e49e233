//! The messages exchanged after the handshake.
//!
//! The host sends [`ClientMessage`]s, the agent [`AgentMessage`]s. A request
//! starts with [`ClientMessage::Request`] under an id the host picks (unique
//! on the connection) and ends with exactly one [`AgentMessage::Done`] for that
//! id. In between:
//!
//! * `exec`: the agent sends [`AgentMessage::Started`] once the process runs
//!   (or `Done` with an error if it could not start: a
//!   [`crate::RemoteErrorKind::Spawn`] whose kind gives the shell's 127 / 126
//!   and whose message names what is missing), then
//!   [`AgentMessage::Data`] for stdout / stderr; the host may send
//!   [`ClientMessage::Data`] / [`ClientMessage::Eof`] (stdin),
//!   [`ClientMessage::Signal`] and [`ClientMessage::Resize`]. `Done` carries
//!   [`Response::Exited`] and comes after the last output chunk.
//! * `write_file`: the host streams [`ClientMessage::Data`] then
//!   [`ClientMessage::Eof`]; `Done` carries [`Response::Written`].
//! * `read_file`: the agent sends [`AgentMessage::Opened`], then
//!   [`AgentMessage::Data`] chunks ([`StreamKind::File`]), then `Done`.
//! * `attach_exec`: like `exec` for a command already started (on this or
//!   an earlier connection): `Started`, then the output the agent held for
//!   it, then its further output, then `Done` with [`Response::Exited`]; a
//!   command that already ended gets `Started`, what is left of its output
//!   and `Done` at once. Signals and resizes work as for `exec`; stdin was
//!   closed when the host that started the command went away.
//! * everything else (including `set_clock`, `refresh` and `list_execs`):
//!   just `Done`.
//!
//! **Commands outlive their connection.** When the host goes away (end of
//! stream, a failed read), the commands it started keep running: their
//! stdin is closed, and their output is held in the agent, up to
//! [`crate::DETACHED_OUTPUT_LIMIT`] bytes per command (then the agent stops
//! reading their pipes, so they block, as with a host that stops taking
//! output). Only an explicit [`ClientMessage::Signal`] (or the timeout)
//! ends a command.
//!
//! **Credit.** Each byte stream starts with [`crate::STREAM_WINDOW`] bytes of
//! credit for its sender. The receiver returns credit as its consumer takes
//! data: the host with [`ClientMessage::Credit`] for output and file chunks,
//! the agent with [`AgentMessage::Credit`] for stdin and upload chunks. A
//! sender never has more than a window of unacknowledged bytes on a stream.
//!
//! The order of variants and fields here **is** the wire format (postcard);
//! the `wire_schema` test pins it. Changing it means bumping
//! [`crate::PROTOCOL_VERSION`].

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::exec::{ExecInfo, ExecResult, ExecSpec, PtySize};
use crate::fs::{DirListing, FileStat};
use crate::remote_error::RemoteError;
use crate::stats::GuestStats;

/// Which byte stream of a request a chunk or credit belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum StreamKind {
    /// A command's standard output (or its terminal, with a PTY).
    Stdout,
    /// A command's standard error.
    Stderr,
    /// The contents of a file being read.
    File,
}

/// A request from the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Run a command.
    Exec(ExecSpec),
    /// Create (or truncate, or append to) a file; contents follow as
    /// [`ClientMessage::Data`] chunks ended by [`ClientMessage::Eof`].
    WriteFile {
        /// Absolute path in the guest.
        path: String,
        /// Permission bits for the file.
        mode: u32,
        /// Append instead of truncating.
        append: bool,
    },
    /// Stream a file's contents back.
    ReadFile {
        /// Absolute path in the guest.
        path: String,
    },
    /// List a directory.
    ListDir {
        /// Absolute path in the guest.
        path: String,
    },
    /// Metadata of a path (following links).
    Stat {
        /// Absolute path in the guest.
        path: String,
    },
    /// Remove a file, a symlink or a directory.
    Remove {
        /// Absolute path in the guest.
        path: String,
        /// Remove a non-empty directory and everything in it.
        recursive: bool,
    },
    /// Create a directory and any missing parents (`mkdir -p`).
    MkdirP {
        /// Absolute path in the guest.
        path: String,
        /// Permission bits for the directories created.
        mode: u32,
    },
    /// Report guest resource usage.
    Stats,
    /// Answer at once.
    Ping,
    /// Sync file systems and power the VM off (as PID 1), or exit (otherwise).
    Shutdown,
    /// Step the guest's wall clock (`CLOCK_REALTIME`) to the host's time.
    ///
    /// The host sends it when the guest may have missed time: after a
    /// resume from pause, after a snapshot restore. Only an agent running as
    /// PID 1 sets the clock; otherwise (host tests) it only reports the
    /// offset.
    SetClock {
        /// The host's wall clock when it sent the request, in nanoseconds
        /// since the Unix epoch.
        unix_ns: u64,
    },
    /// Make a guest restored from a snapshot a machine of its own.
    ///
    /// Every guest restored from one snapshot wakes up with the same
    /// hostname, machine id, random-generator state and (stale) wall clock.
    /// The host sends this first on its connection to a restored guest; the
    /// agent, in this order:
    ///
    /// 1. checks the request (a bad `hostname`, an `entropy` outside
    ///    [`crate::REFRESH_ENTROPY_MIN`]..=[`crate::REFRESH_ENTROPY_MAX`]
    ///    bytes or too many `dns` servers is refused with [`crate::RemoteErrorKind::InvalidInput`],
    ///    and nothing is changed);
    /// 2. writes `entropy` to `/dev/urandom` (mixed into the kernel's input
    ///    pool, not credited) and forces the kernel's generator to reseed
    ///    from that pool (`RNDRESEEDCRNG`), so that this guest's random
    ///    numbers part from its siblings' at once;
    /// 3. steps the wall clock to `unix_ns`, as [`Request::SetClock`] does;
    /// 4. sets the hostname and rewrites `/etc/hostname`, `/etc/hosts` and a
    ///    new random `/etc/machine-id` (also on a read-only root), as at boot,
    ///    and, when `dns` is `Some`, `/etc/resolv.conf` listing those servers
    ///    (from then on, as if `nova.net=` had named them at boot).
    ///
    /// An agent that is not PID 1 (host tests) leaves the machine it runs on
    /// alone: it mixes the entropy in (harmless to any machine) but does not
    /// reseed, step the clock or set the hostname, and writes the identity
    /// files only into the directory given by its `--etc` option, if any. It
    /// still answers with the new machine id. If a later step fails, the
    /// earlier ones stay done; the request may be sent again.
    Refresh {
        /// The new hostname: 1 to 64 letters, digits, `-` and `.`, not
        /// starting with `-` or `.`.
        hostname: String,
        /// Random bytes from the host.
        #[serde(with = "serde_bytes")]
        entropy: Vec<u8>,
        /// The host's wall clock when it sent the request, in nanoseconds
        /// since the Unix epoch (as in [`Request::SetClock`]).
        unix_ns: u64,
        /// The DNS servers a cold boot would get now (`nova.net=`'s `dns`),
        /// at most [`crate::boot::MAX_DNS_SERVERS`] (more is refused with
        /// [`crate::RemoteErrorKind::InvalidInput`]); `None` for a guest
        /// without a network, whose `/etc/resolv.conf` is left alone.
        dns: Option<Vec<std::net::Ipv4Addr>>,
    },
    /// List the commands the agent knows: the running ones and the last
    /// [`crate::FINISHED_EXECS_KEPT`] that ended.
    ListExecs,
    /// Stream command `exec_id`'s held and further output and its end to
    /// this request (see the module docs); refused with
    /// [`crate::RemoteErrorKind::NotFound`] for an unknown id and
    /// [`crate::RemoteErrorKind::Busy`] while another request streams it.
    AttachExec {
        /// The command, as [`AgentMessage::Started`] named it.
        exec_id: u64,
    },
}

/// The successful outcome of a request, carried by [`AgentMessage::Done`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Response {
    /// A command ended.
    Exited(ExecResult),
    /// A file was written.
    Written {
        /// Bytes written.
        bytes: u64,
    },
    /// A file was read to its end.
    ReadDone {
        /// Bytes sent.
        bytes: u64,
    },
    /// A directory listing.
    DirListing(DirListing),
    /// Metadata of a path.
    Stat(FileStat),
    /// The path was removed.
    Removed,
    /// The directory exists now.
    Created,
    /// Guest resource usage.
    Stats(GuestStats),
    /// Answer to [`Request::Ping`].
    Pong,
    /// The agent is syncing and powering off; the stream closes next.
    ShuttingDown,
    /// Answer to [`Request::SetClock`].
    ClockSet {
        /// How far the guest's clock was behind the host's, in nanoseconds
        /// (negative: ahead), before the request.
        offset_ns: i64,
        /// Whether the agent stepped the clock (only as PID 1).
        stepped: bool,
    },
    /// Answer to [`Request::Refresh`]: the guest is a machine of its own.
    Refreshed {
        /// The guest's new machine id, as now in `/etc/machine-id`: 32
        /// lowercase hex digits.
        machine_id: String,
        /// Whether the kernel's random generator was reseeded with the host's
        /// entropy mixed in (only as PID 1; false also when the kernel
        /// refused, which the agent logs).
        reseeded: bool,
        /// How far the guest's clock was behind the host's, in nanoseconds
        /// (negative: ahead), before the request (as in
        /// [`Response::ClockSet`]).
        clock_offset_ns: i64,
        /// Whether the agent stepped the clock (only as PID 1).
        clock_stepped: bool,
    },
    /// Answer to [`Request::ListExecs`], oldest command first.
    Execs(Vec<ExecInfo>),
}

/// A frame from the host to the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientMessage {
    /// Start request `id`.
    Request {
        /// Request id, unique on this connection.
        id: u64,
        /// What to do.
        request: Request,
    },
    /// A chunk of stdin (exec) or file contents (write_file), at most
    /// [`crate::MAX_CHUNK`] bytes, within the sender's credit.
    Data {
        /// Request id.
        id: u64,
        /// The bytes.
        data: Bytes,
    },
    /// End of stdin (the command sees EOF) or of the uploaded file.
    Eof {
        /// Request id.
        id: u64,
    },
    /// The host consumed `bytes` of a stream; the agent may send that much more.
    Credit {
        /// Request id.
        id: u64,
        /// Which stream.
        stream: StreamKind,
        /// How many bytes.
        bytes: u32,
    },
    /// Send a signal to the command's process group.
    Signal {
        /// Request id.
        id: u64,
        /// Signal number (e.g. 15 for SIGTERM, 9 for SIGKILL).
        signal: i32,
    },
    /// Change the window size of the command's pseudo-terminal.
    Resize {
        /// Request id.
        id: u64,
        /// New size.
        size: PtySize,
    },
    /// Abandon a request (a download the host no longer wants, an upload it
    /// gave up on). Commands are ended with [`ClientMessage::Signal`] instead.
    Cancel {
        /// Request id.
        id: u64,
    },
}

/// A frame from the agent to the host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AgentMessage {
    /// The command of request `id` is running (or, for an attach, known).
    Started {
        /// Request id.
        id: u64,
        /// Its process id in the guest.
        pid: u32,
        /// The command's id in the agent's table, for
        /// [`Request::AttachExec`] on a later connection.
        exec_id: u64,
    },
    /// The file of request `id` is open; its contents follow.
    Opened {
        /// Request id.
        id: u64,
        /// File size when opened.
        size: u64,
    },
    /// A chunk of output or file contents, within the agent's credit.
    Data {
        /// Request id.
        id: u64,
        /// Which stream.
        stream: StreamKind,
        /// The bytes.
        data: Bytes,
    },
    /// The agent consumed `bytes` of stdin / upload; the host may send that much more.
    Credit {
        /// Request id.
        id: u64,
        /// How many bytes.
        bytes: u32,
    },
    /// Request `id` is finished; nothing more comes for it.
    Done {
        /// Request id.
        id: u64,
        /// Its outcome.
        result: Result<Response, RemoteError>,
    },
    /// The host broke the protocol; the agent closes the connection next.
    ProtocolError {
        /// What was wrong.
        message: String,
    },
}

impl AgentMessage {
    /// The request this message belongs to, if any.
    pub fn request_id(&self) -> Option<u64> {
        match self {
            Self::Started { id, .. }
            | Self::Opened { id, .. }
            | Self::Data { id, .. }
            | Self::Credit { id, .. }
            | Self::Done { id, .. } => Some(*id),
            Self::ProtocolError { .. } => None,
        }
    }
}

impl ClientMessage {
    /// The request this message belongs to.
    pub fn request_id(&self) -> u64 {
        match self {
            Self::Request { id, .. }
            | Self::Data { id, .. }
            | Self::Eof { id }
            | Self::Credit { id, .. }
            | Self::Signal { id, .. }
            | Self::Resize { id, .. }
            | Self::Cancel { id } => *id,
        }
    }
}
