//! The background tasks that own the agent stream.
//!
//! Two tasks per connection:
//!
//! * the **router** owns the read half and the table of requests in flight.
//!   Every caller action arrives as a [`Command`] on one unbounded channel (so
//!   a request is always registered before any of its stdin chunks are sent,
//!   and messages leave in the order callers issued them). Frames from the
//!   agent are dispatched by request id into per-request queues.
//! * the **writer** owns the write half; it batches queued frames into one
//!   write and flushes when its queue runs dry. Writing on its own task means
//!   a full socket buffer towards the agent never stops us from reading what
//!   the agent sends (which would deadlock both sides).
//!
//! **The agent is not trusted.** The router keeps, per request, the bytes
//! the agent sent on each stream and the host has not credited back, and
//! the stdin / upload bytes the host sent and the agent has not credited
//! back. An agent that sends past its window ([`crate::STREAM_WINDOW`]),
//! returns credit it was never owed, or sends data for a request that is not
//! in flight has broken the protocol: the router closes the connection with
//! [`ConnectionEnd::Violation`], which every pending call and
//! [`super::AgentClient::closed`] report. So the host never buffers more
//! than a window per stream (and [`super::chunks`] keeps that window in a
//! bounded number of chunks), and no credit count can overflow.
//!
//! If a consumer went away, the router returns the credit itself and drops
//! the bytes, so an abandoned stream never stalls the command behind it.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Semaphore, mpsc, oneshot, watch};

use super::ClientError;
use super::chunks::ChunkSender;
use super::error::{ConnectionEnd, ProtocolViolation};
use crate::STREAM_WINDOW;
use crate::frame::{FrameError, FrameReader, FrameWriter};
use crate::messages::{AgentMessage, ClientMessage, Request, Response, StreamKind};

/// Most bytes the writer batches before it writes.
const WRITE_BATCH: usize = 256 * 1024;

/// A caller's instruction to the router.
#[derive(Debug)]
pub(crate) enum Command {
    /// Register `route` under `id`, then send the request.
    Start {
        id: u64,
        request: Request,
        route: Route,
    },
    /// Send a message for a request already started.
    Send(ClientMessage),
}

/// Where the agent's messages for one request go, and its credit ledger.
#[derive(Debug, Default)]
pub(crate) struct Route {
    /// Receives the pid and exec id of `Started`, or the size of `Opened`
    /// (exec id 0), or the error when the request fails before either.
    pub(crate) started: Option<oneshot::Sender<Result<(u64, u64), ClientError>>>,
    /// Receives stdout chunks (or file chunks).
    pub(crate) stdout: Option<ChunkSender>,
    /// Receives stderr chunks.
    pub(crate) stderr: Option<ChunkSender>,
    /// Gets permits when the agent returns stdin / upload credit; closed when
    /// the request ends.
    pub(crate) credit: Option<Arc<Semaphore>>,
    /// Receives the final outcome.
    pub(crate) done: Option<oneshot::Sender<Result<Response, ClientError>>>,
    /// Kept by the router (callers leave it at its default): bytes the
    /// agent sent per stream (by [`stream_slot`]) that the host
    /// has not credited back.
    pub(crate) unacked: [u64; 3],
    /// Kept by the router: stdin / upload bytes the host sent that the agent
    /// has not credited back.
    pub(crate) sent_unacked: u64,
}

impl Route {
    fn fail(mut self, err: &ClientError) {
        if let Some(tx) = self.started.take() {
            let _ = tx.send(Err(err.clone()));
        }
        if let Some(credit) = self.credit.take() {
            credit.close();
        }
        if let Some(tx) = self.done.take() {
            let _ = tx.send(Err(err.clone()));
        }
    }
}

fn stream_slot(stream: StreamKind) -> usize {
    match stream {
        StreamKind::Stdout => 0,
        StreamKind::Stderr => 1,
        StreamKind::File => 2,
    }
}

/// Why the connection ended: `None` while it is open, set once by the router
/// when it stops. A closed sender with `None` means the router task was
/// dropped without finishing ([`ConnectionEnd::TaskGone`]).
pub(crate) type CloseReason = watch::Receiver<Option<ConnectionEnd>>;

/// The end of `closed`, if the connection has ended.
pub(crate) fn end_of(closed: &CloseReason) -> Option<ConnectionEnd> {
    if let Some(end) = closed.borrow().clone() {
        return Some(end);
    }
    closed
        .has_changed()
        .is_err()
        .then_some(ConnectionEnd::TaskGone)
}

/// Starts the router and writer tasks over an already handshaken stream;
/// returns the receiver of why the connection ended.
pub(crate) fn spawn<S>(
    reader: FrameReader<tokio::io::ReadHalf<S>>,
    writer: FrameWriter<tokio::io::WriteHalf<S>>,
    commands: mpsc::UnboundedReceiver<Command>,
) -> CloseReason
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (out_tx, out_rx) = mpsc::unbounded_channel();
    let (closed_tx, closed_rx) = watch::channel(None);
    tokio::spawn(write_loop(writer, out_rx));
    let router = Router {
        routes: HashMap::new(),
        out: out_tx,
    };
    tokio::spawn(router.run(reader, commands, closed_tx));
    closed_rx
}

async fn write_loop<W: AsyncWrite + Unpin>(
    mut writer: FrameWriter<W>,
    mut rx: mpsc::UnboundedReceiver<ClientMessage>,
) {
    while let Some(msg) = rx.recv().await {
        let mut result = writer.queue_client_message(&msg);
        while result.is_ok() && writer.pending() < WRITE_BATCH {
            match rx.try_recv() {
                Ok(msg) => result = writer.queue_client_message(&msg),
                Err(_) => break,
            }
        }
        if let Err(e) = result {
            tracing::warn!(error = %e, "dropping a message that could not be encoded");
        }
        if let Err(e) = writer.flush().await {
            tracing::debug!(error = %e, "writing to the agent failed; closing the connection");
            return;
        }
    }
    // Every sender is gone: the client and all handles were dropped, or the
    // router stopped.
    let _ = writer.shutdown().await;
}

struct Router {
    routes: HashMap<u64, Route>,
    out: mpsc::UnboundedSender<ClientMessage>,
}

impl Router {
    async fn run<R: AsyncRead + Unpin>(
        mut self,
        mut reader: FrameReader<R>,
        mut commands: mpsc::UnboundedReceiver<Command>,
        closed: watch::Sender<Option<ConnectionEnd>>,
    ) {
        // `commands` reports "closed" once the client and every handle
        // (which all hold a sender) are dropped.
        let end = loop {
            tokio::select! {
                biased;
                cmd = commands.recv() => match cmd {
                    Some(cmd) => {
                        if let Err(end) = self.command(cmd) {
                            break end;
                        }
                    }
                    None => break ConnectionEnd::ClientDropped,
                },
                frame = reader.read_frame() => match frame {
                    Ok(Some(payload)) => match crate::zero_copy::decode_agent_message(payload) {
                        Ok(msg) => {
                            if let Err(end) = self.message(msg) {
                                break end;
                            }
                        }
                        Err(e) => break violation(ProtocolViolation::Malformed(e.to_string())),
                    },
                    Ok(None) => break ConnectionEnd::AgentClosed,
                    Err(FrameError::Io(e)) => break ConnectionEnd::ReadFailed(e.to_string()),
                    Err(FrameError::TooLarge { len, max }) => {
                        break violation(ProtocolViolation::FrameTooLarge { len, max });
                    }
                    Err(e) => break violation(ProtocolViolation::Malformed(e.to_string())),
                },
            }
        };
        match &end {
            ConnectionEnd::Violation(_) | ConnectionEnd::RejectedByAgent(_) => {
                tracing::warn!(%end, "closing the agent connection");
            }
            end => tracing::debug!(%end, "agent connection closed"),
        }
        let err = ClientError::disconnected(end.clone());
        // Set before failing the routes, so that a caller woken by its
        // route sees the reason too.
        closed.send_replace(Some(end));
        for (_, route) in self.routes.drain() {
            route.fail(&err);
        }
        // Dropping `self.out` lets the writer finish what is queued and shut
        // the stream down; dropping `reader` closes the read half.
    }

    fn send(&self, msg: ClientMessage) -> Result<(), ConnectionEnd> {
        self.out.send(msg).map_err(|_| ConnectionEnd::WriteFailed)
    }

    fn command(&mut self, cmd: Command) -> Result<(), ConnectionEnd> {
        match cmd {
            Command::Start { id, request, route } => {
                self.routes.insert(id, route);
                self.send(ClientMessage::Request { id, request })
            }
            Command::Send(msg) => {
                match &msg {
                    ClientMessage::Credit { id, stream, bytes } => {
                        if let Some(route) = self.routes.get_mut(id) {
                            let slot = &mut route.unacked[stream_slot(*stream)];
                            *slot = slot.saturating_sub(u64::from(*bytes));
                        }
                    }
                    ClientMessage::Data { id, data } => {
                        if let Some(route) = self.routes.get_mut(id) {
                            route.sent_unacked += data.len() as u64;
                        }
                    }
                    _ => {}
                }
                self.send(msg)
            }
        }
    }

    fn message(&mut self, msg: AgentMessage) -> Result<(), ConnectionEnd> {
        match msg {
            AgentMessage::Started { id, pid, exec_id } => {
                self.started(id, (u64::from(pid), exec_id))
            }

            AgentMessage::Opened { id, size } => self.started(id, (size, 0)),

            AgentMessage::Data { id, stream, data } => {
                let Some(route) = self.routes.get_mut(&id) else {
                    return Err(violation(ProtocolViolation::UnknownRequest { id }));
                };
                let queue = match stream {
                    StreamKind::Stdout | StreamKind::File => route.stdout.as_ref(),
                    StreamKind::Stderr => route.stderr.as_ref(),
                };
                let Some(queue) = queue else {
                    return Err(violation(ProtocolViolation::UnexpectedStream {
                        id,
                        stream,
                    }));
                };
                let len = data.len();
                let slot = &mut route.unacked[stream_slot(stream)];
                *slot += len as u64;
                if *slot > u64::from(STREAM_WINDOW) {
                    return Err(violation(ProtocolViolation::CreditOverrun {
                        id,
                        stream,
                        outstanding: *slot,
                        window: STREAM_WINDOW,
                    }));
                }
                if !queue.push(data) && len > 0 {
                    // Nobody consumes this stream: drop the bytes but return
                    // the credit so the command is not blocked by it.
                    *slot -= len as u64;
                    // `len` fits: it is within the window, a u32.
                    let bytes = u32::try_from(len).unwrap_or(u32::MAX);
                    self.send(ClientMessage::Credit { id, stream, bytes })?;
                }
            }
            AgentMessage::Credit { id, bytes } => {
                if let Some(route) = self.routes.get_mut(&id) {
                    if u64::from(bytes) > route.sent_unacked {
                        return Err(violation(ProtocolViolation::CreditOverflow {
                            id,
                            bytes,
                            outstanding: route.sent_unacked,
                        }));
                    }
                    route.sent_unacked -= u64::from(bytes);
                    if let Some(credit) = &route.credit {
                        // At most STREAM_WINDOW permits ever exist: the
                        // writer took as many as it sent.
                        credit.add_permits(bytes as usize);
                    }
                }
            }
            AgentMessage::Done { id, result } => {
                if let Some(mut route) = self.routes.remove(&id) {
                    let result = result.map_err(ClientError::from);
                    if let Some(tx) = route.started.take() {
                        let _ = tx.send(match &result {
                            Ok(_) => Err(ClientError::Protocol(format!(
                                "request {id} finished before it started"
                            ))),
                            Err(e) => Err(e.clone()),
                        });
                    }
                    if let Some(credit) = route.credit.take() {
                        credit.close();
                    }
                    if let Some(tx) = route.done.take() {
                        let _ = tx.send(result);
                    }
                }
            }
            AgentMessage::ProtocolError { message } => {
                return Err(ConnectionEnd::RejectedByAgent(message));
            }
        }
        Ok(())
    }

    fn started(&mut self, id: u64, value: (u64, u64)) {
        if let Some(tx) = self.routes.get_mut(&id).and_then(|r| r.started.take()) {
            let _ = tx.send(Ok(value));
        }
    }
}

fn violation(v: ProtocolViolation) -> ConnectionEnd {
    ConnectionEnd::Violation(v)
}
