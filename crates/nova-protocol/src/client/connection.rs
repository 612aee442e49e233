//! The background tasks that own the agent stream.
//!
//! Two tasks per connection:
//!
//! * the **router** owns the read half and the table of requests in flight.
//!   Every caller action arrives as a [`Command`] on one unbounded channel (so
//!   a request is always registered before any of its stdin chunks are sent,
//!   and messages leave in the order callers issued them). Frames from the
//!   agent are dispatched by request id into per-request channels.
//! * the **writer** owns the write half; it batches queued frames into one
//!   write and flushes when its queue runs dry. Writing on its own task means
//!   a full socket buffer towards the agent never stops us from reading what
//!   the agent sends (which would deadlock both sides).
//!
//! Memory stays bounded without bounded channels: the agent never has more
//! than [`crate::STREAM_WINDOW`] unacknowledged bytes per stream, and credit
//! is only returned when a consumer takes a chunk out of its channel. If a
//! consumer went away, the router returns the credit itself and drops the
//! bytes, so an abandoned stream never stalls the command behind it.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Semaphore, mpsc, oneshot};

use super::ClientError;
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

/// Where the agent's messages for one request go.
#[derive(Debug, Default)]
pub(crate) struct Route {
    /// Receives the pid of `Started` or the size of `Opened` (or the error
    /// when the request fails before either).
    pub(crate) started: Option<oneshot::Sender<Result<u64, ClientError>>>,
    /// Receives stdout chunks (or file chunks).
    pub(crate) stdout: Option<mpsc::UnboundedSender<Bytes>>,
    /// Receives stderr chunks.
    pub(crate) stderr: Option<mpsc::UnboundedSender<Bytes>>,
    /// Gets permits when the agent returns stdin / upload credit; closed when
    /// the request ends.
    pub(crate) credit: Option<Arc<Semaphore>>,
    /// Receives the final outcome.
    pub(crate) done: Option<oneshot::Sender<Result<Response, ClientError>>>,
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

/// Why the connection ended, set once by the router when it stops.
pub(crate) type CloseReason = Arc<OnceLock<String>>;

/// Starts the router and writer tasks over an already handshaken stream.
pub(crate) fn spawn<S>(
    reader: FrameReader<tokio::io::ReadHalf<S>>,
    writer: FrameWriter<tokio::io::WriteHalf<S>>,
    commands: mpsc::UnboundedReceiver<Command>,
    closed: CloseReason,
) where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (out_tx, out_rx) = mpsc::unbounded_channel();
    tokio::spawn(write_loop(writer, out_rx));
    let router = Router {
        routes: HashMap::new(),
        out: out_tx,
    };
    tokio::spawn(router.run(reader, commands, closed));
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
    // Every sender is gone: the client and all handles were dropped.
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
        closed: CloseReason,
    ) {
        // `commands` reports "closed" once the client and every handle
        // (which all hold a sender) are dropped.
        let reason = loop {
            tokio::select! {
                biased;
                cmd = commands.recv() => match cmd {
                    Some(cmd) => {
                        if let Err(reason) = self.command(cmd) {
                            break reason;
                        }
                    }
                    None => break "client dropped".to_owned(),
                },
                frame = reader.read_frame() => match frame {
                    Ok(Some(payload)) => match crate::zero_copy::decode_agent_message(payload) {
                        Ok(msg) => {
                            if let Err(reason) = self.message(msg) {
                                break reason;
                            }
                        }
                        Err(e) => break format!("agent sent a malformed frame: {e}"),
                    },
                    Ok(None) => break "the agent closed the connection".to_owned(),
                    Err(FrameError::Io(e)) => break format!("reading from the agent failed: {e}"),
                    Err(e) => break format!("agent sent a malformed frame: {e}"),
                },
            }
        };
        tracing::debug!(%reason, "agent connection closed");
        let err = ClientError::disconnected(reason.clone());
        let _ = closed.set(reason);
        for (_, route) in self.routes.drain() {
            route.fail(&err);
        }
        // Dropping `self.out` lets the writer finish what is queued and stop.
    }

    fn send(&self, msg: ClientMessage) -> Result<(), String> {
        self.out
            .send(msg)
            .map_err(|_| "writing to the agent failed".to_owned())
    }

    fn command(&mut self, cmd: Command) -> Result<(), String> {
        match cmd {
            Command::Start { id, request, route } => {
                self.routes.insert(id, route);
                self.send(ClientMessage::Request { id, request })
            }
            Command::Send(msg) => self.send(msg),
        }
    }

    fn message(&mut self, msg: AgentMessage) -> Result<(), String> {
        match msg {
            AgentMessage::Started { id, pid } => self.started(id, u64::from(pid)),

            AgentMessage::Opened { id, size } => self.started(id, size),

            AgentMessage::Data { id, stream, data } => {
                let len = data.len();
                let delivered = self.routes.get(&id).and_then(|route| {
                    let tx = match stream {
                        StreamKind::Stdout | StreamKind::File => route.stdout.as_ref(),
                        StreamKind::Stderr => route.stderr.as_ref(),
                    };
                    tx.map(|tx| tx.send(data).is_ok())
                });
                if delivered != Some(true) && len > 0 {
                    // Nobody consumes this stream: drop the bytes but return
                    // the credit so the command is not blocked by it.
                    let bytes = u32::try_from(len).unwrap_or(u32::MAX);
                    self.send(ClientMessage::Credit { id, stream, bytes })?;
                }
            }
            AgentMessage::Credit { id, bytes } => {
                if let Some(credit) = self.routes.get(&id).and_then(|r| r.credit.as_ref()) {
                    credit.add_permits(bytes as usize);
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
                tracing::warn!(%message, "the agent reported a protocol error");
                return Err(format!("the agent reported a protocol error: {message}"));
            }
        }
        Ok(())
    }

    fn started(&mut self, id: u64, value: u64) {
        if let Some(tx) = self.routes.get_mut(&id).and_then(|r| r.started.take()) {
            let _ = tx.send(Ok(value));
        }
    }
}
