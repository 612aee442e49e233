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
//! When a connection ends, every command it started is killed (its whole
//! process group) and every transfer stops: the session drops the request
//! inboxes, and a request task that finds its inbox or the writer queue
//! closed ends its request. When the host went away (end of stream, a failed
//! read), the writer is stopped at once, whatever it still holds: over
//! virtio-serial a write to a port without a host waits for the next host
//! and would reach it ahead of its handshake. A session the agent ends itself
//! (shutdown, protocol error) has written its last word already and gives
//! the writer a bounded time for what else is queued. Either way the stream
//! is closed when [`serve`] returns.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

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
const MAX_IN_FLIGHT: usize = 4096;
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

/// Serves one connection until it closes.
pub(crate) async fn serve<S>(stream: S, agent: Arc<Agent>, peer: String)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (read_half, write_half) = tokio::io::split(stream);
    let mut reader = FrameReader::new(read_half);
    let mut writer = FrameWriter::new(write_half);

    let version = match handshake(&mut reader, &mut writer, &agent).await {
        Some(version) => version,
        None => return,
    };
    tracing::info!(%peer, version, "host connected");

    let (out_tx, out_rx) = mpsc::channel(OUT_QUEUE);
    let mut writer_task = tokio::spawn(write_loop(writer, out_rx));
    let mut session = Session {
        agent,
        out: Outbox(out_tx),
        inboxes: HashMap::new(),
        finished: mpsc::unbounded_channel(),
    };
    let end = session.run(&mut reader).await;
    tracing::info!(%peer, reason = %end.reason, "host disconnected");
    // Dropping the inboxes tells every request task the host is gone: a
    // command's process group is killed, a transfer stops.
    session.inboxes.clear();
    drop(session);
    if end.host_gone {
        // Nobody reads any more. Over virtio-serial a write would not fail
        // but wait for the port's *next* host (after a snapshot restore, a
        // new one) and reach it ahead of its handshake; so nothing more is
        // written. Request tasks blocked on a full queue see it closed and
        // stop (commands are killed).
        writer_task.abort();
    } else if tokio::time::timeout(DRAIN_TIMEOUT, &mut writer_task)
        .await
        .is_err()
    {
        // What is queued (replies of requests that finished as the session
        // ended) goes out if the host takes it; a host that stopped reading
        // does not hold the session (nor, over virtio-serial, the port).
        tracing::debug!(%peer, "the host does not take the last replies; dropping them");
        writer_task.abort();
    }
    // Once the writer task is gone, so is the write half: the stream is
    // closed when this function returns, and a serial port can be reopened.
    let _ = writer_task.await;
}

/// Reads the `Hello` and answers it; returns the chosen version.
async fn handshake<R, W>(
    reader: &mut FrameReader<R>,
    writer: &mut FrameWriter<W>,
    agent: &Agent,
) -> Option<u32>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let refusal = match reader.read_frame().await {
        Ok(Some(payload)) => match decode::<Hello>(&payload) {
            Ok(hello) if hello.magic == HELLO_MAGIC => {
                match negotiate(SUPPORTED_VERSIONS, &hello.versions) {
                    Some(version) => {
                        let reply = HelloReply::Welcome(agent.hello_info(version));
                        return match writer.send(&reply).await {
                            Ok(()) => Some(version),
                            Err(e) => {
                                tracing::debug!(error = %e, "could not answer the handshake");
                                None
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
        Ok(None) => return None,
        Err(FrameError::Io(e)) => {
            tracing::debug!(error = %e, "connection failed before the handshake");
            return None;
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
    None
}

async fn write_loop<W: AsyncWrite + Unpin>(
    mut writer: FrameWriter<W>,
    mut rx: mpsc::Receiver<Outgoing>,
) {
    let mut acks = Vec::new();
    while let Some(first) = rx.recv().await {
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
        if let Err(e) = writer.flush().await {
            tracing::debug!(error = %e, "writing to the host failed");
            return;
        }
        for ack in acks.drain(..) {
            let _ = ack.send(());
        }
    }
    let _ = writer.shutdown().await;
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
                        Ok(None) => return End::host_gone("end of stream".to_owned()),
                        Err(FrameError::Io(e)) => return End::host_gone(format!("read failed: {e}")),
                        Err(e) => return self.protocol_error(format!("malformed frame: {e}")).await,
                    };
                    let msg = match nova_protocol::zero_copy::decode_client_message(payload.clone()) {
                        Ok(msg) => msg,
                        Err(e) => {
                            let what = match payload.first() {
                                Some(&tag) if tag > 6 => format!("unknown message type {tag}: {e}"),
                                _ => format!("malformed message: {e}"),
                            };
                            return self.protocol_error(what).await;
                        }
                    };
                    match self.dispatch(msg).await {
                        Ok(Flow::Continue) => {}
                        Ok(Flow::Stop(reason)) => return End::closed(reason),
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
        End::closed(message)
    }

    async fn dispatch(&mut self, msg: ClientMessage) -> Result<Flow, String> {
        let (id, request) = match msg {
            ClientMessage::Request { id, request } => (id, request),
            other => {
                let id = other.request_id();
                if let Some(inbox) = self.inboxes.get(&id) {
                    // The task may have just finished; then the message is moot.
                    let _ = inbox.send(other);
                } else {
                    tracing::trace!(id, "message for a finished or unknown request");
                }
                return Ok(Flow::Continue);
            }
        };
        if self.inboxes.contains_key(&id) {
            return Err(format!("request id {id} is already in flight"));
        }
        if self.inboxes.len() >= MAX_IN_FLIGHT {
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
            } => {
                let refresh = Refresh {
                    hostname,
                    entropy,
                    unix_ns,
                };
                tokio::spawn(refresh::run(id, refresh, agent, out));
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

/// Why a session ended.
struct End {
    /// In words, for the log.
    reason: String,
    /// The host went away (end of stream, a failed read): nothing more can
    /// reach it. Otherwise the agent ended the session, and its last replies
    /// may still be written.
    host_gone: bool,
}

impl End {
    fn host_gone(reason: String) -> Self {
        Self {
            reason,
            host_gone: true,
        }
    }

    fn closed(reason: String) -> Self {
        Self {
            reason,
            host_gone: false,
        }
    }
}
