//! The async host client of the guest agent.
//!
//! [`AgentClient::connect`] performs the handshake on any byte stream (a vsock
//! connection, a Unix socket, a virtio-serial port's host socket) and then
//! hands the stream to a background task (see the `connection` module); the client is a
//! cheap, cloneable handle that talks to that task through a channel, so it can
//! be shared between tasks and no lock is held across an `.await`.
//!
//! # A hostile agent
//!
//! The guest is untrusted, and so is everything the agent sends. The
//! connection enforces the flow-control window and the request table (see
//! the `connection` module): an agent that sends past its credit, returns
//! credit it was not owed, or sends data for a request that is not in flight
//! gets its connection closed with a [`ProtocolViolation`]. Pending and later
//! calls then fail with [`ClientError::Disconnected`] carrying
//! [`ConnectionEnd::Violation`], and [`AgentClient::closed`] resolves with it,
//! so the owner of the sandbox can mark it failed. Calls that gather a whole
//! output or file in memory ([`AgentClient::run`], [`ExecHandle::output`],
//! [`AgentClient::read_file_to_vec`]) stop at a cap
//! ([`DEFAULT_OUTPUT_LIMIT`], [`DEFAULT_READ_LIMIT`], or one given to their
//! `_limited` forms) with [`ClientError::TooLarge`]; the streaming calls have
//! no cap, only the window.
//!
//! ```no_run
//! # async fn demo() -> Result<(), nova_protocol::client::ClientError> {
//! use std::time::Duration;
//! use nova_protocol::{ExecSpec, client::AgentClient};
//!
//! let stream = tokio::net::UnixStream::connect("/tmp/agent.sock").await?;
//! let (client, hello) = AgentClient::connect(stream, Duration::from_secs(5)).await?;
//! println!("agent {} on kernel {}", hello.agent_version, hello.kernel_release);
//! let out = client.run(ExecSpec::shell("echo hello")).await?;
//! assert_eq!(out.stdout, b"hello\n");
//! # Ok(()) }
//! ```

mod chunks;
mod connection;
mod error;
mod exec;
mod files;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Semaphore, mpsc, oneshot};

pub use error::{ClientError, ConnectionEnd, ProtocolViolation};
pub use exec::{ExecController, ExecHandle, ExecOutput, OutputStream, StdinWriter};
pub use files::FileDownload;

use crate::exec::{ExecInfo, ExecSpec};
use crate::frame::{FrameReader, FrameWriter};
use crate::fs::{DirListing, FileStat};
use crate::handshake::{Hello, HelloInfo, HelloReply};
use crate::messages::{ClientMessage, Request, Response, StreamKind};
use crate::stats::GuestStats;
use crate::{STREAM_WINDOW, SUPPORTED_VERSIONS};
use connection::{CloseReason, Command, Route};

/// Default cap of [`AgentClient::run`] and [`ExecHandle::output`]: each of
/// stdout and stderr may bring this many bytes into memory.
pub const DEFAULT_OUTPUT_LIMIT: u64 = 64 * 1024 * 1024;

/// Default cap of [`AgentClient::read_file_to_vec`].
pub const DEFAULT_READ_LIMIT: u64 = 256 * 1024 * 1024;

/// A connection to a guest agent. Cheap to clone; all clones share one stream.
#[derive(Debug, Clone)]
pub struct AgentClient {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    commands: mpsc::UnboundedSender<Command>,
    next_id: AtomicU64,
    info: HelloInfo,
    closed: CloseReason,
}

impl AgentClient {
    /// Performs the handshake on `stream` and starts the connection's
    /// background task.
    ///
    /// Writes a [`Hello`] at once and waits up to `timeout` for the agent's
    /// answer (over virtio-serial the answer only comes once the guest has
    /// booted far enough to open its port, so size `timeout` for a boot).
    /// Must be called inside a tokio runtime.
    pub async fn connect<S>(stream: S, timeout: Duration) -> Result<(Self, HelloInfo), ClientError>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let (read_half, write_half) = tokio::io::split(stream);
        let mut reader = FrameReader::new(read_half);
        let mut writer = FrameWriter::new(write_half);
        let handshake = async {
            writer.send(&Hello::new()).await?;
            match reader.read_message::<HelloReply>().await? {
                Some(reply) => Ok(reply),
                None => Err(ClientError::disconnected(ConnectionEnd::AgentClosed)),
            }
        };
        let reply = tokio::time::timeout(timeout, handshake)
            .await
            .map_err(|_| ClientError::TimedOut(timeout))??;
        let info = match reply {
            HelloReply::Welcome(info) => info,
            HelloReply::Refused { supported, message } => {
                return Err(
                    if crate::handshake::negotiate(SUPPORTED_VERSIONS, &supported).is_none() {
                        ClientError::VersionMismatch {
                            ours: SUPPORTED_VERSIONS.to_vec(),
                            theirs: supported,
                        }
                    } else {
                        ClientError::Refused(message)
                    },
                );
            }
        };
        if !SUPPORTED_VERSIONS.contains(&info.protocol_version) {
            return Err(ClientError::VersionMismatch {
                ours: SUPPORTED_VERSIONS.to_vec(),
                theirs: vec![info.protocol_version],
            });
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let closed = connection::spawn(reader, writer, rx);
        let client = Self {
            inner: Arc::new(Inner {
                commands: tx,
                next_id: AtomicU64::new(1),
                info: info.clone(),
                closed,
            }),
        };
        Ok((client, info))
    }

    /// What the agent said about itself in the handshake.
    pub fn info(&self) -> &HelloInfo {
        &self.inner.info
    }

    /// Whether the connection has ended (calls will fail with
    /// [`ClientError::Disconnected`]).
    pub fn is_closed(&self) -> bool {
        self.inner.commands.is_closed()
    }

    /// Why the connection ended, or `None` while it is open.
    pub fn close_reason(&self) -> Option<ConnectionEnd> {
        connection::end_of(&self.inner.closed)
    }

    /// Waits until the connection ends and says why. A
    /// [`ConnectionEnd::Violation`] means the agent broke the protocol (sent
    /// past its credit, ...): treat the guest as failed. Cancel-safe; any
    /// number of callers may wait.
    pub async fn closed(&self) -> ConnectionEnd {
        let mut rx = self.inner.closed.clone();
        // An error means the router was dropped without saying why.
        let _ = rx.wait_for(Option::is_some).await;
        connection::end_of(&rx).unwrap_or(ConnectionEnd::TaskGone)
    }

    /// Starts a command. Returns once the process runs in the guest (or with
    /// the error that prevented it, e.g. [`crate::RemoteErrorKind::NotFound`]).
    ///
    /// The command outlives this connection if the connection ends without
    /// the handle killing it (the host process died): a later connection
    /// finds it by [`ExecHandle::exec_id`] ([`AgentClient::attach_exec`]).
    pub async fn exec(&self, spec: ExecSpec) -> Result<ExecHandle, ClientError> {
        let stdin = spec.stdin;
        self.stream_command(Request::Exec(spec), stdin).await
    }

    /// Streams command `exec_id` (started on this or an earlier connection):
    /// the output the agent held for it while no host read it, its further
    /// output, and its exit status. A command that already ended yields
    /// what is left of its output and its status at once. The handle has no
    /// stdin (the agent closed it when the starting host went away); like
    /// any [`ExecHandle`], dropping it before the end kills the command.
    ///
    /// An unknown id is [`crate::RemoteErrorKind::NotFound`]; a command
    /// another request streams is [`crate::RemoteErrorKind::Busy`].
    pub async fn attach_exec(&self, exec_id: u64) -> Result<ExecHandle, ClientError> {
        self.stream_command(Request::AttachExec { exec_id }, false)
            .await
    }

    /// Every command the agent knows: running ones (whichever connection
    /// started them) and the last [`crate::FINISHED_EXECS_KEPT`] that ended,
    /// oldest first.
    pub async fn list_execs(&self) -> Result<Vec<ExecInfo>, ClientError> {
        match self.request(Request::ListExecs).await? {
            Response::Execs(execs) => Ok(execs),
            other => Err(unexpected("list_execs", &other)),
        }
    }

    /// Starts `request` (an exec or an attach) with a route for its output.
    async fn stream_command(
        &self,
        request: Request,
        stdin: bool,
    ) -> Result<ExecHandle, ClientError> {
        let id = self.next_id();
        let (started_tx, started_rx) = oneshot::channel();
        let (stdout_tx, stdout_rx) = chunks::chunk_queue();
        let (stderr_tx, stderr_rx) = chunks::chunk_queue();
        let (done_tx, done_rx) = oneshot::channel();
        let credit = stdin.then(|| Arc::new(Semaphore::new(STREAM_WINDOW as usize)));
        let route = Route {
            started: Some(started_tx),
            stdout: Some(stdout_tx),
            stderr: Some(stderr_tx),
            credit: credit.clone(),
            done: Some(done_tx),
            ..Route::default()
        };
        self.start(id, request, route)?;
        let (pid, exec_id) = self.await_reply(started_rx).await??;
        let sender = self.inner.commands.clone();
        Ok(ExecHandle::new(
            id,
            u32::try_from(pid).unwrap_or(u32::MAX),
            exec_id,
            OutputStream::new(id, StreamKind::Stdout, stdout_rx, sender.clone()),
            OutputStream::new(id, StreamKind::Stderr, stderr_rx, sender.clone()),
            credit.map(|c| StdinWriter::new(id, c, sender.clone(), self.inner.closed.clone())),
            done_rx,
            sender,
            self.inner.closed.clone(),
        ))
    }

    /// Runs a command to completion and collects its output. Stdin is
    /// closed. Stops with [`ClientError::TooLarge`] (and kills the command)
    /// when stdout or stderr passes [`DEFAULT_OUTPUT_LIMIT`].
    pub async fn run(&self, spec: ExecSpec) -> Result<ExecOutput, ClientError> {
        self.exec(spec).await?.output().await
    }

    /// Writes `data` to `path` (created or truncated) with permission bits `mode`.
    pub async fn write_file(
        &self,
        path: &str,
        data: impl Into<Bytes>,
        mode: u32,
    ) -> Result<u64, ClientError> {
        let data: Bytes = data.into();
        files::upload(self, path, mode, false, files::Source::Bytes(data)).await
    }

    /// Streams everything `reader` yields into `path` (created or truncated)
    /// with permission bits `mode`. Returns the bytes written.
    pub async fn write_file_from<R>(
        &self,
        path: &str,
        reader: R,
        mode: u32,
    ) -> Result<u64, ClientError>
    where
        R: AsyncRead + Unpin + Send,
    {
        files::upload(
            self,
            path,
            mode,
            false,
            files::Source::Reader(Box::new(reader)),
        )
        .await
    }

    /// Appends `data` to `path` (created if missing, with `mode`).
    pub async fn append_file(
        &self,
        path: &str,
        data: impl Into<Bytes>,
        mode: u32,
    ) -> Result<u64, ClientError> {
        let data: Bytes = data.into();
        files::upload(self, path, mode, true, files::Source::Bytes(data)).await
    }

    /// Opens `path` for streaming its contents back.
    pub async fn read_file(&self, path: &str) -> Result<FileDownload, ClientError> {
        files::download(self, path).await
    }

    /// Reads the whole of `path` into memory; a file over
    /// [`DEFAULT_READ_LIMIT`] is [`ClientError::TooLarge`] (use
    /// [`AgentClient::read_file`] to stream it).
    pub async fn read_file_to_vec(&self, path: &str) -> Result<Vec<u8>, ClientError> {
        self.read_file_to_vec_limited(path, DEFAULT_READ_LIMIT)
            .await
    }

    /// Reads the whole of `path` into memory, up to `limit` bytes; a larger
    /// file is [`ClientError::TooLarge`].
    pub async fn read_file_to_vec_limited(
        &self,
        path: &str,
        limit: u64,
    ) -> Result<Vec<u8>, ClientError> {
        self.read_file(path).await?.collect_limited(limit).await
    }

    /// Lists a directory.
    pub async fn list_dir(&self, path: &str) -> Result<DirListing, ClientError> {
        match self
            .request(Request::ListDir {
                path: path.to_owned(),
            })
            .await?
        {
            Response::DirListing(listing) => Ok(listing),
            other => Err(unexpected("list_dir", &other)),
        }
    }

    /// Metadata of `path` (following symbolic links).
    pub async fn stat(&self, path: &str) -> Result<FileStat, ClientError> {
        match self
            .request(Request::Stat {
                path: path.to_owned(),
            })
            .await?
        {
            Response::Stat(stat) => Ok(stat),
            other => Err(unexpected("stat", &other)),
        }
    }

    /// Removes a file, symlink or empty directory; with `recursive`, a whole tree.
    pub async fn remove(&self, path: &str, recursive: bool) -> Result<(), ClientError> {
        match self
            .request(Request::Remove {
                path: path.to_owned(),
                recursive,
            })
            .await?
        {
            Response::Removed => Ok(()),
            other => Err(unexpected("remove", &other)),
        }
    }

    /// Creates a directory and its missing parents with permission bits `mode`.
    pub async fn mkdir_p(&self, path: &str, mode: u32) -> Result<(), ClientError> {
        match self
            .request(Request::MkdirP {
                path: path.to_owned(),
                mode,
            })
            .await?
        {
            Response::Created => Ok(()),
            other => Err(unexpected("mkdir_p", &other)),
        }
    }

    /// The guest's view of its memory, CPU, load, disk and processes.
    pub async fn stats(&self) -> Result<GuestStats, ClientError> {
        match self.request(Request::Stats).await? {
            Response::Stats(stats) => Ok(stats),
            other => Err(unexpected("stats", &other)),
        }
    }

    /// Round trip to the agent; returns how long it took.
    pub async fn ping(&self) -> Result<Duration, ClientError> {
        let start = Instant::now();
        match self.request(Request::Ping).await? {
            Response::Pong => Ok(start.elapsed()),
            other => Err(unexpected("ping", &other)),
        }
    }

    /// Steps the guest's wall clock to `now` (the host's wall clock), e.g.
    /// after a resume from pause. Returns how far the guest was behind
    /// (negative: ahead) and whether the agent stepped its clock (only an
    /// agent running as PID 1 does).
    pub async fn set_clock(&self, now: SystemTime) -> Result<ClockStep, ClientError> {
        let unix_ns = unix_ns(now)?;
        match self.request(Request::SetClock { unix_ns }).await? {
            Response::ClockSet { offset_ns, stepped } => Ok(ClockStep { offset_ns, stepped }),
            other => Err(unexpected("set_clock", &other)),
        }
    }

    /// Makes a guest restored from a snapshot a machine of its own (see
    /// [`Request::Refresh`]): mixes `entropy` (fresh random bytes from the
    /// host, [`crate::REFRESH_ENTROPY_MIN`] to [`crate::REFRESH_ENTROPY_MAX`]
    /// of them; 64 is plenty) into the guest kernel's random pool and
    /// reseeds it, steps the wall clock to `now` (the host's wall clock), and
    /// gives the guest `hostname` and a new machine id, and, with `dns`
    /// (the servers a cold boot would get now; `None` for a guest without
    /// a network), rewrites its `/etc/resolv.conf`. Send it before
    /// anything else on the first connection after a restore.
    ///
    /// A bad hostname, an entropy size out of bounds or more than
    /// [`crate::boot::MAX_DNS_SERVERS`] servers is
    /// [`ClientError::Remote`] with [`crate::RemoteErrorKind::InvalidInput`],
    /// and the guest is left as it was.
    pub async fn refresh(
        &self,
        hostname: &str,
        entropy: &[u8],
        now: SystemTime,
        dns: Option<&[std::net::Ipv4Addr]>,
    ) -> Result<Refreshed, ClientError> {
        let request = Request::Refresh {
            hostname: hostname.to_owned(),
            entropy: entropy.to_vec(),
            unix_ns: unix_ns(now)?,
            dns: dns.map(<[_]>::to_vec),
        };
        match self.request(request).await? {
            Response::Refreshed {
                machine_id,
                reseeded,
                clock_offset_ns,
                clock_stepped,
            } => Ok(Refreshed {
                machine_id,
                reseeded,
                clock: ClockStep {
                    offset_ns: clock_offset_ns,
                    stepped: clock_stepped,
                },
            }),
            other => Err(unexpected("refresh", &other)),
        }
    }

    /// Asks the agent to sync file systems and power the VM off (when it is
    /// not PID 1, e.g. in host tests, it just exits). Returns once the agent
    /// acknowledged; the connection closes right after.
    pub async fn shutdown(&self) -> Result<(), ClientError> {
        match self.request(Request::Shutdown).await {
            Ok(Response::ShuttingDown) | Err(ClientError::Disconnected { .. }) => Ok(()),
            Ok(other) => Err(unexpected("shutdown", &other)),
            Err(e) => Err(e),
        }
    }

    /// Sends a request that is answered by a single `Done`.
    async fn request(&self, request: Request) -> Result<Response, ClientError> {
        let id = self.next_id();
        let (done_tx, done_rx) = oneshot::channel();
        let route = Route {
            done: Some(done_tx),
            ..Route::default()
        };
        self.start(id, request, route)?;
        self.await_reply(done_rx).await?
    }

    fn next_id(&self) -> u64 {
        self.inner.next_id.fetch_add(1, Ordering::Relaxed)
    }

    fn start(&self, id: u64, request: Request, route: Route) -> Result<(), ClientError> {
        self.inner
            .commands
            .send(Command::Start { id, request, route })
            .map_err(|_| closed_error(&self.inner.closed))
    }

    fn send(&self, msg: ClientMessage) -> Result<(), ClientError> {
        self.inner
            .commands
            .send(Command::Send(msg))
            .map_err(|_| closed_error(&self.inner.closed))
    }

    async fn await_reply<T>(&self, rx: oneshot::Receiver<T>) -> Result<T, ClientError> {
        rx.await.map_err(|_| closed_error(&self.inner.closed))
    }
}

/// What [`AgentClient::set_clock`] found and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockStep {
    /// How far the guest's clock was behind the host's, in nanoseconds
    /// (negative: ahead), when the request arrived.
    pub offset_ns: i64,
    /// Whether the agent stepped the clock.
    pub stepped: bool,
}

/// What [`AgentClient::refresh`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refreshed {
    /// The guest's new machine id (32 lowercase hex digits).
    pub machine_id: String,
    /// Whether the guest kernel's random generator was reseeded (only an
    /// agent running as PID 1 does; false also when the kernel refused).
    pub reseeded: bool,
    /// The wall-clock correction, as [`AgentClient::set_clock`] reports it.
    pub clock: ClockStep,
}

/// `now` in nanoseconds since the Unix epoch, as the protocol carries it.
fn unix_ns(now: SystemTime) -> Result<u64, ClientError> {
    now.duration_since(std::time::UNIX_EPOCH)
        .ok()
        .and_then(|d| u64::try_from(d.as_nanos()).ok())
        .ok_or_else(|| {
            ClientError::Protocol("the host clock is outside what the protocol carries".into())
        })
}

/// The error for a call on a connection that has ended.
fn closed_error(closed: &CloseReason) -> ClientError {
    ClientError::disconnected(connection::end_of(closed).unwrap_or(ConnectionEnd::TaskGone))
}

fn unexpected(call: &str, response: &Response) -> ClientError {
    ClientError::Protocol(format!("unexpected response to {call}: {response:?}"))
}
