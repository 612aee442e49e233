//! One host connection: handshake, then request dispatch.
//!
//! The session task owns the read half of the stream. It answers the
//! handshake, then reads [`ClientMessage`]s and either starts a request task
//! (exec, file transfer, or a one-shot query) or forwards the message to the
//! running request it names, through that request's inbox. A writer task owns
//! the write half; every task sends its [`AgentMessage`]s through one bounded
//! queue to it, and it batches frames into large writes.
//!
//! Malformed input (oversized length, a frame cut short, an undecodable
//! payload, an unknown message type, anything but a `Hello` first) is answered
//! with an error frame — [`HelloReply::Refused`] before the handshake,
//! [`AgentMessage::ProtocolError`] after — and the connection is closed; the
//! agent keeps serving other connections.
//!
//! When a session ends, every transfer stops, and every command it started
//! is detached, not killed: the session drops the request inboxes, a file
//! task that finds its inbox or the writer queue closed ends its request,
//! and a command task goes on without a host (stdin closed, output held up
//! to a bound; see [`crate::exec`]) until a later host attaches to it by
//! its exec id ([`Request::AttachExec`], served by [`crate::execs`]). Only
//! an explicit signal from a host ends a command. When the host went away (end of stream, a failed
//! read), the writer is stopped at once, whatever it still holds: over
//! virtio-serial a write to a port without a host waits for the next host
//! and would reach it ahead of its handshake. A session the agent ends itself
//! (shutdown, protocol error) has written its last word already and gives
//! the writer a bounded time for what else is queued. Then the stream is
//! closed, except in one case: a new host's `Hello` in the middle of a
//! session (virtio-serial, a host that reconnected before the guest saw it
//! leave; see [`End::NewHost`]) ends the old session the same way and is
//! answered on the same stream, as long as nothing of the old session's
//! output was on its way out.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use nova_protocol::frame::{FrameError, FrameReader, FrameWriter, decode};
use nova_protocol::handshake::negotiate;
use nova_protocol::{
    AgentMessage, ClientMessage, HELLO_MAGIC, Hello, HelloReply, RemoteError, RemoteErrorKind,
    Request, Response, SUPPORTED_VERSIONS,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};

use crate::Agent;
use crate::refresh::{self, Refresh};
use crate::{clock, exec, files, stats};

/// Most requests in flight on one connection.
pub(crate) const MAX_IN_FLIGHT: usize = 4096;
/// Capacity of the queue to the writer task (messages, not bytes; data
/// messages are bounded by credit anyway).
const OUT_QUEUE: usize = 512;
/// The writer batches up to this many bytes into one write.
const WRITE_BATCH: usize = 512 * 1024;
/// How long a session that the agent ends (shutdown, protocol error) waits
/// for its last words to be written before it closes the stream anyway.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// What the writer task is asked to do.
#[derive(Debug)]
pub(crate) enum Outgoing {
    /// Send a message.
    Message(AgentMessage),
    /// Write out everything queued so far, then acknowledge.
    Flush(oneshot::Sender<()>),
}

/// The sending side of the writer queue, as request tasks see it.
#[derive(Debug, Clone)]
pub(crate) struct Outbox(mpsc::Sender<Outgoing>);

/// The connection is gone; the request task should stop.
#[derive(Debug)]
pub(crate) struct Disconnected;

impl Outbox {
    /// Queues `msg` for the host, waiting while the queue is full.
    pub(crate) async fn send(&self, msg: AgentMessage) -> Result<(), Disconnected> {
        self.0
            .send(Outgoing::Message(msg))
            .await
            .map_err(|_| Disconnected)
    }

    /// Queues the final message of request `id`.
    pub(crate) async fn done(
        &self,
        id: u64,
        result: Result<Response, RemoteError>,
    ) -> Result<(), Disconnected> {
        self.send(AgentMessage::Done { id, result }).await
    }

    /// Waits until everything queued before has been written, at most
    /// [`DRAIN_TIMEOUT`] (a host that stopped reading must not hold the
    /// session, nor a shutdown).
    async fn flush(&self) {
        let flushed = async {
            let (tx, rx) = oneshot::channel();
            if self.0.send(Outgoing::Flush(tx)).await.is_ok() {
                let _ = rx.await;
            }
        };
        if tokio::time::timeout(DRAIN_TIMEOUT, flushed).await.is_err() {
            tracing::debug!("the host does not take what is queued for it");
        }
    }
}

/// How a connection [`serve`]d ended, for a listener that serves its
/// next host on the same device (virtio-serial).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Served {
    /// The host went away (end of stream, a failed read): everything it
    /// sent was read.
    HostLeft,
    /// The agent ended it (refused handshake, protocol error, shutdown)
    /// while the host may still be sending: what it sent past that point
    /// was not read.
    AgentEnded,
}

/// Serves one connection until it closes; says how it ended.
///
/// Normally one host session; but when a new host's `Hello` arrives in the
/// middle of a session (see [`End::NewHost`]), the old session is ended and
/// the new one starts on the same stream.
pub(crate) async fn serve<S>(stream: S, agent: Arc<Agent>, peer: String) -> Served
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (read_half, write_half) = tokio::io::split(stream);
    let mut reader = FrameReader::new(read_half);
    let mut writer = FrameWriter::new(write_half);
    let mut hello = None;
    loop {
        let version = match handshake(&mut reader, &mut writer, &agent, hello.take()).await {
            Ok(version) => version,
            Err(served) => return served,
        };
        tracing::info!(%peer, version, "host connected");
        match session(&mut reader, writer, &agent, &peer).await {
            Ok((same_writer, next_hello)) => {
                writer = same_writer;
                hello = Some(next_hello);
            }
            // The stream is closed as both halves are dropped.
            Err(served) => return served,
        }
    }
}

/// Runs one host session after its handshake. Returns the writer and the
/// new host's `Hello` when a new host took the stream over, so that it can
/// be answered on the same stream; otherwise how it ended.
async fn session<R, W>(
    reader: &mut FrameReader<R>,
    writer: FrameWriter<W>,
    agent: &Arc<Agent>,
    peer: &str,
) -> Result<(FrameWriter<W>, Bytes), Served>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (out_tx, out_rx) = mpsc::channel(OUT_QUEUE);
    // Held until the writer task is done (dropping it does not stop it).
    let (stop_tx, stop_rx) = oneshot::channel();
    let mut writer_task = tokio::spawn(write_loop(writer, out_rx, stop_rx));
    let mut session = Session {
        agent: agent.clone(),
        out: Outbox(out_tx),
        inboxes: HashMap::new(),
        finished: mpsc::unbounded_channel(),
    };
    let end = session.run(reader).await;
    match &end {
        End::HostGone(reason) | End::Closed(reason) => {
            tracing::info!(%peer, %reason, "host disconnected");
        }
        End::NewHost(_) => {
            tracing::info!(%peer, "a new host took the stream over; ending the previous session");
        }
    }
    // Dropping the inboxes tells every request task the host is gone: a
    // command is detached (it keeps running), a transfer stops.
    session.inboxes.clear();
    drop(session);
    let drained = match end {
        // What is queued (replies of requests that finished as the session
        // ended) goes out if the host takes it in time.
        End::Closed(_) => tokio::time::timeout(DRAIN_TIMEOUT, &mut writer_task)
            .await
            .ok(),
        // Nothing more is written for the old host: it is gone, and over
        // virtio-serial a write would not fail but wait for the port's
        // next host (after a snapshot restore, a new one) and reach it
        // ahead of its handshake. Request tasks blocked on a full queue see
        // it closed and stop (commands detach and hold their output).
        End::HostGone(_) | End::NewHost(_) => None,
    };
    let writer = match drained {
        Some(finished) => finished.ok().flatten(),
        None => {
            let _ = stop_tx.send(());
            writer_task.await.ok().flatten()
        }
    };
    let hello = match end {
        End::NewHost(hello) => hello,
        End::HostGone(_) => return Err(Served::HostLeft),
        End::Closed(_) => return Err(Served::AgentEnded),
    };
    match writer {
        Some(writer) => Ok((writer, hello)),
        None => {
            // Output for the old host was being written when the new one
            // came: the new host may have part of it, ahead of anything the
            // agent could answer now. Close the stream; the host connects
            // again.
            tracing::warn!(%peer, "a new host came while output for the previous one was being written; closing the stream");
            Err(Served::AgentEnded)
        }
    }
}

/// Reads the `Hello` (unless the session already read it: `first`) and
/// answers it; returns the chosen version, or how the connection ended.
async fn handshake<R, W>(
    reader: &mut FrameReader<R>,
    writer: &mut FrameWriter<W>,
    agent: &Agent,
    first: Option<Bytes>,
) -> Result<u32, Served>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let frame = match first {
        Some(payload) => Ok(Some(payload)),
        None => reader.read_frame().await,
    };
    let refusal = match frame {
        Ok(Some(payload)) => match decode::<Hello>(&payload) {
            Ok(hello) if hello.magic == HELLO_MAGIC => {
                match negotiate(SUPPORTED_VERSIONS, &hello.versions) {
                    Some(version) => {
                        let reply = HelloReply::Welcome(agent.hello_info(version));
                        return match writer.send(&reply).await {
                            Ok(()) => Ok(version),
                            Err(e) => {
                                tracing::debug!(error = %e, "could not answer the handshake");
                                Err(Served::HostLeft)
                            }
                        };
                    }
                    None => format!(
                        "no common protocol version: the host speaks {:?}, this agent {:?}",
                        hello.versions, SUPPORTED_VERSIONS
                    ),
                }
            }
            Ok(_) | Err(_) => {
                "the first frame must be a Hello (request before handshake?)".to_owned()
            }
        },
        Ok(None) => return Err(Served::HostLeft),
        Err(FrameError::Io(e)) => {
            tracing::debug!(error = %e, "connection failed before the handshake");
            return Err(Served::HostLeft);
        }
        Err(e) => format!("malformed first frame: {e}"),
    };
    tracing::warn!(reason = %refusal, "refusing a connection");
    let reply = HelloReply::Refused {
        supported: SUPPORTED_VERSIONS.to_vec(),
        message: refusal,
    };
    let _ = writer.send(&reply).await;
    let _ = writer.shutdown().await;
    Err(Served::AgentEnded)
}

/// Writes what the session's tasks queue, batching frames, until every
/// sender is gone (then shuts the stream down) or `stop` fires. Returns the
/// writer when it stopped between batches, with nothing of a frame left
/// half-written, so that the stream can serve a new host; `None` otherwise.
async fn write_loop<W: AsyncWrite + Unpin>(
    mut writer: FrameWriter<W>,
    mut rx: mpsc::Receiver<Outgoing>,
    mut stop: oneshot::Receiver<()>,
) -> Option<FrameWriter<W>> {
    let mut acks = Vec::new();
    loop {
        let first = tokio::select! {
            biased;
            _ = &mut stop => return Some(writer),
            item = rx.recv() => match item {
                Some(item) => item,
                None => break,
            },
        };
        let mut next = Some(first);
        while let Some(item) = next.take() {
            match item {
                Outgoing::Message(msg) => {
                    if let Err(e) = writer.queue_agent_message(&msg) {
                        // Only an oversized message can fail; tell the host
                        // its request failed instead of dropping it silently.
                        tracing::warn!(error = %e, "message too large to send");
                        if let Some(id) = msg.request_id() {
                            let done = AgentMessage::Done {
                                id,
                                result: Err(RemoteError::new(
                                    RemoteErrorKind::Io,
                                    format!("reply not sendable: {e}"),
                                )),
                            };
                            let _ = writer.queue(&done);
                        }
                    }
                }
                Outgoing::Flush(ack) => acks.push(ack),
            }
            if writer.pending() < WRITE_BATCH && acks.is_empty() {
                next = rx.try_recv().ok();
            }
        }
        tokio::select! {
            biased;
            // Part of the batch may be out: the stream is of no further use.
            _ = &mut stop => return None,
            written = writer.flush() => {
                if let Err(e) = written {
                    tracing::debug!(error = %e, "writing to the host failed");
                    return None;
                }
            }
        }
        for ack in acks.drain(..) {
            let _ = ack.send(());
        }
    }
    let _ = writer.shutdown().await;
    None
}

struct Session {
    agent: Arc<Agent>,
    out: Outbox,
    /// Inboxes of requests that take follow-up messages, by id.
    inboxes: HashMap<u64, mpsc::UnboundedSender<ClientMessage>>,
    /// Request tasks report their id here when they finish.
    finished: (mpsc::UnboundedSender<u64>, mpsc::UnboundedReceiver<u64>),
}

impl Session {
    /// Runs until the connection ends; returns why.
    async fn run<R: AsyncRead + Unpin>(&mut self, reader: &mut FrameReader<R>) -> End {
        loop {
            tokio::select! {
                biased;
                Some(id) = self.finished.1.recv() => {
                    self.inboxes.remove(&id);
                }
                frame = reader.read_frame() => {
                    let payload = match frame {
                        Ok(Some(payload)) => payload,
                        Ok(None) => return End::HostGone("end of stream".to_owned()),
                        Err(FrameError::Io(e)) => return End::HostGone(format!("read failed: {e}")),
                        Err(e) => return self.protocol_error(format!("malformed frame: {e}")).await,
                    };
                    let msg = match decode_message(payload) {
                        Ok(msg) => msg,
                        Err(Undecodable::NewHost(hello)) => return End::NewHost(hello),
                        Err(Undecodable::Malformed(what)) => return self.protocol_error(what).await,
                    };
                    match self.dispatch(msg).await {
                        Ok(Flow::Continue) => {}
                        Ok(Flow::Stop(reason)) => return End::Closed(reason),
                        Err(reason) => return self.protocol_error(reason).await,
                    }
                }
            }
        }
    }

    async fn protocol_error(&self, message: String) -> End {
        tracing::warn!(%message, "protocol error from the host; closing the connection");
        let _ = self
            .out
            .send(AgentMessage::ProtocolError {
                message: message.clone(),
            })
            .await;
        self.out.flush().await;
        End::Closed(message)
    }

    async fn dispatch(&mut self, msg: ClientMessage) -> Result<Flow, String> {
        let (id, request) = match route(msg, &self.inboxes)? {
            Route::Start { id, request } => (id, request),
            Route::Forward { id, msg } => {
                if let Some(inbox) = self.inboxes.get(&id) {
                    // The task may have just finished; then the message is moot.
                    let _ = inbox.send(msg);
                } else {
                    tracing::trace!(id, "message for a finished or unknown request");
                }
                return Ok(Flow::Continue);
            }
            Route::Busy { id } => {
                let err = RemoteError::new(
                    RemoteErrorKind::Busy,
                    format!("more than {MAX_IN_FLIGHT} requests in flight"),
                );
                self.out
                    .done(id, Err(err))
                    .await
                    .map_err(|_| "writer gone".to_owned())?;
                return Ok(Flow::Continue);
            }
        };
        let out = self.out.clone();
        let agent = self.agent.clone();
        match request {
            Request::Exec(spec) => {
                let inbox = self.open_inbox(id);
                self.spawn_tracked(id, exec::run(id, spec, agent, out, inbox));
            }
            Request::WriteFile { path, mode, append } => {
                let inbox = self.open_inbox(id);
                self.spawn_tracked(id, files::write(id, path, mode, append, out, inbox));
            }
            Request::ReadFile { path } => {
                let inbox = self.open_inbox(id);
                self.spawn_tracked(id, files::read(id, path, out, inbox));
            }
            Request::ListDir { path } => {
                tokio::spawn(async move { files::list_dir(id, path, out).await });
            }
            Request::Stat { path } => {
                tokio::spawn(async move { files::stat(id, path, out).await });
            }
            Request::Remove { path, recursive } => {
                tokio::spawn(async move { files::remove(id, path, recursive, out).await });
            }
            Request::MkdirP { path, mode } => {
                tokio::spawn(async move { files::mkdir_p(id, path, mode, out).await });
            }
            Request::Stats => {
                tokio::spawn(async move {
                    let result = stats::collect().await;
                    let _ = out.done(id, result.map(Response::Stats)).await;
                });
            }
            Request::SetClock { unix_ns } => {
                let result = clock::set_from_host(unix_ns, self.agent.pid1);
                out.done(id, result)
                    .await
                    .map_err(|_| "writer gone".to_owned())?;
            }
            Request::Refresh {
                hostname,
                entropy,
                unix_ns,
                dns,
            } => {
                let refresh = Refresh {
                    hostname,
                    entropy,
                    unix_ns,
                    dns,
                };
                tokio::spawn(refresh::run(id, refresh, agent, out));
            }
            Request::ListExecs => {
                out.done(id, Ok(Response::Execs(self.agent.execs.list())))
                    .await
                    .map_err(|_| "writer gone".to_owned())?;
            }
            Request::AttachExec { exec_id } => {
                let attach = crate::execs::Attach {
                    id,
                    out,
                    inbox: self.open_inbox(id),
                    finished: self.finished.0.clone(),
                };
                tokio::spawn(
                    async move { crate::execs::attach(&agent.execs, exec_id, attach).await },
                );
            }
            Request::Ping => {
                out.done(id, Ok(Response::Pong))
                    .await
                    .map_err(|_| "writer gone".to_owned())?;
            }
            Request::Shutdown => {
                tracing::info!("shutdown requested by the host");
                let _ = out.done(id, Ok(Response::ShuttingDown)).await;
                out.flush().await;
                self.agent.request_shutdown();
                return Ok(Flow::Stop("shutdown requested".to_owned()));
            }
        }
        Ok(Flow::Continue)
    }

    fn open_inbox(&mut self, id: u64) -> mpsc::UnboundedReceiver<ClientMessage> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.inboxes.insert(id, tx);
        rx
    }

    fn spawn_tracked<F>(&self, id: u64, task: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let finished = self.finished.0.clone();
        tokio::spawn(async move {
            task.await;
            let _ = finished.send(id);
        });
    }
}

enum Flow {
    Continue,
    Stop(String),
}

/// Why a frame's payload is not a message.
#[derive(Debug)]
pub(crate) enum Undecodable {
    /// A new host's `Hello` (see [`End::NewHost`]).
    NewHost(Bytes),
    /// Anything else: the protocol error the session answers with.
    Malformed(String),
}

/// A frame's payload as a message, or why it is none: the session's
/// front, before any request is acted on.
pub(crate) fn decode_message(payload: Bytes) -> Result<ClientMessage, Undecodable> {
    match nova_protocol::zero_copy::decode_client_message(payload.clone()) {
        Ok(msg) => Ok(msg),
        Err(_) if is_hello(&payload) => Err(Undecodable::NewHost(payload)),
        Err(e) => Err(Undecodable::Malformed(match payload.first() {
            Some(&tag) if tag > 6 => format!("unknown message type {tag}: {e}"),
            _ => format!("malformed message: {e}"),
        })),
    }
}

/// Where a message goes: the routing half of dispatch.
#[derive(Debug)]
pub(crate) enum Route {
    /// Start `request` as request `id` (no request of that id is in flight).
    Start { id: u64, request: Request },
    /// Hand `msg` to the running request `id` (moot if it just finished).
    Forward { id: u64, msg: ClientMessage },
    /// Refuse request `id`: [`MAX_IN_FLIGHT`] requests are in flight.
    Busy { id: u64 },
}

/// Routes `msg` given the requests in flight on the session (`in_flight`,
/// by id). Pure: the session acts on the answer. An `Err` is a protocol
/// error that ends the session (a request id reused while in flight).
pub(crate) fn route<V>(msg: ClientMessage, in_flight: &HashMap<u64, V>) -> Result<Route, String> {
    let (id, request) = match msg {
        ClientMessage::Request { id, request } => (id, request),
        other => {
            let id = other.request_id();
            return Ok(Route::Forward { id, msg: other });
        }
    };
    if in_flight.contains_key(&id) {
        return Err(format!("request id {id} is already in flight"));
    }
    if in_flight.len() >= MAX_IN_FLIGHT {
        return Ok(Route::Busy { id });
    }
    Ok(Route::Start { id, request })
}

/// Whether request `request`, once started, takes follow-up messages (has
/// an inbox in the session until it ends), as [`Session::dispatch`] opens
/// them.
pub(crate) fn takes_inbox(request: &Request) -> bool {
    matches!(
        request,
        Request::Exec(_)
            | Request::WriteFile { .. }
            | Request::ReadFile { .. }
            | Request::AttachExec { .. }
    )
}

/// Whether `payload` is a host's `Hello` (see [`End::NewHost`]).
fn is_hello(payload: &[u8]) -> bool {
    payload.starts_with(&HELLO_MAGIC) && decode::<Hello>(payload).is_ok()
}

/// Why a session ended.
enum End {
    /// The host went away (end of stream, a failed read): nothing more can
    /// reach it.
    HostGone(String),
    /// The agent ended the session (shutdown, protocol error); its last
    /// replies may still be written.
    Closed(String),
    /// A new host's `Hello` (this payload) came instead of a message.
    ///
    /// Over virtio-serial the guest sees a host leave only as a port event,
    /// and a host that reconnects at once (or a snapshot restored with a
    /// session open, whose new VMM's host connects before the guest sees the
    /// old one gone) may send its `Hello` into the old session. A `Hello`
    /// starts with [`HELLO_MAGIC`], which no [`ClientMessage`] does (its
    /// first byte is the variant index, 0 to 6), so it cannot be mistaken.
    NewHost(Bytes),
}
