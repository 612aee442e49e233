//! Handles for a running command: its output streams, its stdin, its end.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};
use tokio::sync::{Semaphore, mpsc, oneshot};

use super::chunks::ChunkReceiver;
use super::connection::{CloseReason, Command};
use super::{ClientError, DEFAULT_OUTPUT_LIMIT, closed_error};
use crate::MAX_CHUNK;
use crate::exec::{ExecResult, ExitStatus, PtySize};
use crate::messages::{ClientMessage, Response, StreamKind};

/// Credit is returned to the agent in batches of at least this many bytes.
const CREDIT_BATCH: usize = 256 * 1024;
/// `SIGKILL` (the same number on every Linux architecture).
const SIGKILL: i32 = 9;

/// A stream of output chunks from the guest (a command's stdout or stderr, or
/// a file being read). Every chunk taken out returns credit to the agent, so
/// at most [`crate::STREAM_WINDOW`] bytes ever wait here. Dropping it discards
/// the rest of the stream without blocking the command.
///
/// Also implements [`AsyncRead`], so `tokio::io::copy` works on it.
#[derive(Debug)]
pub struct OutputStream {
    id: u64,
    kind: StreamKind,
    rx: ChunkReceiver,
    commands: mpsc::UnboundedSender<Command>,
    /// Bytes taken but not yet credited back.
    uncredited: usize,
    /// Leftover of a chunk partly consumed through `AsyncRead`.
    leftover: Bytes,
}

impl OutputStream {
    pub(crate) fn new(
        id: u64,
        kind: StreamKind,
        rx: ChunkReceiver,
        commands: mpsc::UnboundedSender<Command>,
    ) -> Self {
        Self {
            id,
            kind,
            rx,
            commands,
            uncredited: 0,
            leftover: Bytes::new(),
        }
    }

    /// The next chunk, or `None` at the end of the stream.
    pub async fn recv(&mut self) -> Option<Bytes> {
        if !self.leftover.is_empty() {
            return Some(std::mem::take(&mut self.leftover));
        }
        let chunk = self.rx.recv().await?;
        self.credit(chunk.len());
        Some(chunk)
    }

    /// Reads the rest of the stream into memory, up to
    /// [`DEFAULT_OUTPUT_LIMIT`] bytes (see [`OutputStream::collect_limited`]).
    pub async fn collect(self) -> Result<Vec<u8>, ClientError> {
        self.collect_limited(DEFAULT_OUTPUT_LIMIT).await
    }

    /// Reads the rest of the stream into memory. Past `limit` bytes it stops
    /// with [`ClientError::TooLarge`] and discards the rest of the stream
    /// (read it chunk by chunk with [`OutputStream::recv`] instead).
    pub async fn collect_limited(mut self, limit: u64) -> Result<Vec<u8>, ClientError> {
        let mut out = Vec::new();
        while let Some(chunk) = self.recv().await {
            if out.len() as u64 + chunk.len() as u64 > limit {
                return Err(ClientError::TooLarge {
                    what: match self.kind {
                        StreamKind::Stdout => "the command's stdout",
                        StreamKind::Stderr => "the command's stderr",
                        StreamKind::File => "the file",
                    },
                    limit,
                    call: "collect",
                    instead: "read it as it comes with OutputStream::recv",
                });
            }
            out.extend_from_slice(&chunk);
        }
        Ok(out)
    }

    /// Reads and discards the rest of the stream; returns how many bytes it had.
    pub async fn drain(mut self) -> u64 {
        let mut total = 0u64;
        while let Some(chunk) = self.recv().await {
            total += chunk.len() as u64;
        }
        total
    }

    fn credit(&mut self, len: usize) {
        self.uncredited += len;
        if self.uncredited >= CREDIT_BATCH || self.rx.is_empty() {
            self.flush_credit();
        }
    }

    fn flush_credit(&mut self) {
        if self.uncredited == 0 {
            return;
        }
        let bytes = u32::try_from(self.uncredited).unwrap_or(u32::MAX);
        self.uncredited = 0;
        // If the connection is gone there is nobody to credit.
        let _ = self.commands.send(Command::Send(ClientMessage::Credit {
            id: self.id,
            stream: self.kind,
            bytes,
        }));
    }
}

impl AsyncRead for OutputStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.leftover.is_empty() {
            match ready!(this.rx.poll_recv(cx)) {
                Some(chunk) => {
                    this.credit(chunk.len());
                    this.leftover = chunk;
                }
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = this.leftover.len().min(buf.remaining());
        buf.put_slice(&this.leftover[..n]);
        this.leftover.advance(n);
        Poll::Ready(Ok(()))
    }
}

/// Writes a command's stdin (or an upload). Each write waits for credit from
/// the agent, so a child that does not read its stdin slows the writer down
/// instead of filling memory. Dropping it closes stdin.
#[derive(Debug)]
pub struct StdinWriter {
    id: u64,
    credit: Arc<Semaphore>,
    commands: mpsc::UnboundedSender<Command>,
    connection: CloseReason,
    closed: bool,
}

impl StdinWriter {
    pub(crate) fn new(
        id: u64,
        credit: Arc<Semaphore>,
        commands: mpsc::UnboundedSender<Command>,
        connection: CloseReason,
    ) -> Self {
        Self {
            id,
            credit,
            commands,
            connection,
            closed: false,
        }
    }

    /// Sends `data`, waiting for credit as needed.
    ///
    /// Fails with [`ClientError::Disconnected`] if the connection is gone, or
    /// with [`ClientError::Protocol`] if the request already ended (the
    /// command exited).
    pub async fn write(&mut self, data: impl Into<Bytes>) -> Result<(), ClientError> {
        let mut data: Bytes = data.into();
        while !data.is_empty() {
            let chunk = data.split_to(data.len().min(MAX_CHUNK));
            self.send_chunk(chunk).await?;
        }
        Ok(())
    }

    /// Copies everything `reader` yields; returns the byte count.
    pub async fn write_from<R: AsyncRead + Unpin>(
        &mut self,
        mut reader: R,
    ) -> Result<u64, ClientError> {
        let mut total = 0u64;
        loop {
            let mut buf = Vec::with_capacity(MAX_CHUNK);
            let n = (&mut reader)
                .take(MAX_CHUNK as u64)
                .read_to_end(&mut buf)
                .await?;
            if n == 0 {
                return Ok(total);
            }
            total += n as u64;
            self.send_chunk(Bytes::from(buf)).await?;
        }
    }

    async fn send_chunk(&mut self, chunk: Bytes) -> Result<(), ClientError> {
        if self.closed {
            return Err(ClientError::Protocol("stdin is already closed".to_owned()));
        }
        let n = u32::try_from(chunk.len()).expect("chunks are at most MAX_CHUNK bytes");
        let permit = self.credit.acquire_many(n).await.map_err(|_| {
            ClientError::Protocol("the request has ended; its input is no longer read".to_owned())
        })?;
        permit.forget();
        self.commands
            .send(Command::Send(ClientMessage::Data {
                id: self.id,
                data: chunk,
            }))
            .map_err(|_| closed_error(&self.connection))
    }

    /// Closes stdin: the command reads end-of-file once it consumed what was sent.
    pub fn close(mut self) {
        self.send_eof();
    }

    fn send_eof(&mut self) {
        if !self.closed {
            self.closed = true;
            let _ = self
                .commands
                .send(Command::Send(ClientMessage::Eof { id: self.id }));
        }
    }
}

impl Drop for StdinWriter {
    fn drop(&mut self) {
        self.send_eof();
    }
}

/// Everything a finished command produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    /// Its standard output.
    pub stdout: Vec<u8>,
    /// Its standard error.
    pub stderr: Vec<u8>,
    /// How it ended.
    pub status: ExitStatus,
    /// Whether the agent killed it for running past its timeout.
    pub timed_out: bool,
    /// Run time measured in the guest.
    pub duration: Duration,
}

impl ExecOutput {
    /// The exit code, if it exited normally.
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Whether it exited with code 0.
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// Stdout as text, with invalid UTF-8 replaced.
    pub fn stdout_lossy(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// Stderr as text, with invalid UTF-8 replaced.
    pub fn stderr_lossy(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// A command running in the guest.
///
/// Take its streams with [`ExecHandle::take_stdout`], [`ExecHandle::take_stderr`]
/// and [`ExecHandle::take_stdin`] (a stream left in the handle is discarded by
/// [`ExecHandle::wait`], and stdin left in it is closed), then
/// [`ExecHandle::wait`].
///
/// **Dropping the handle before the command ended kills it**: the agent gets
/// `SIGKILL` for the command's whole process group (as with
/// [`ExecHandle::kill`]). That includes dropping the future of
/// [`ExecHandle::wait`] or [`ExecHandle::output`] before it finished, and a
/// [`ClientError::TooLarge`] from [`ExecHandle::output`]. Keep the handle (and
/// wait on it) for as long as the command should run; streams taken out of
/// it end when it is dropped.
#[derive(Debug)]
pub struct ExecHandle {
    id: u64,
    pid: u32,
    exec_id: u64,
    stdout: Option<OutputStream>,
    stderr: Option<OutputStream>,
    stdin: Option<StdinWriter>,
    done: oneshot::Receiver<Result<Response, ClientError>>,
    commands: mpsc::UnboundedSender<Command>,
    closed: CloseReason,
}

impl ExecHandle {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        id: u64,
        pid: u32,
        exec_id: u64,
        stdout: OutputStream,
        stderr: OutputStream,
        stdin: Option<StdinWriter>,
        done: oneshot::Receiver<Result<Response, ClientError>>,
        commands: mpsc::UnboundedSender<Command>,
        closed: CloseReason,
    ) -> Self {
        Self {
            id,
            pid,
            exec_id,
            stdout: Some(stdout),
            stderr: Some(stderr),
            stdin,
            done,
            commands,
            closed,
        }
    }

    /// The command's process id in the guest (also its process group id).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The command's id in the agent's table: what
    /// [`AgentClient::attach_exec`](super::AgentClient::attach_exec) takes
    /// on a later connection to find it again.
    pub fn exec_id(&self) -> u64 {
        self.exec_id
    }

    /// Takes the stdout stream (`None` if already taken).
    pub fn take_stdout(&mut self) -> Option<OutputStream> {
        self.stdout.take()
    }

    /// Takes the stderr stream (`None` if already taken).
    pub fn take_stderr(&mut self) -> Option<OutputStream> {
        self.stderr.take()
    }

    /// Takes the stdin writer (`None` if stdin was not piped or already taken).
    pub fn take_stdin(&mut self) -> Option<StdinWriter> {
        self.stdin.take()
    }

    /// A handle that signals the command and resizes its terminal, and can
    /// be kept apart from this one (for example while this one is waited
    /// on). It does not keep the command alive.
    pub fn controller(&self) -> ExecController {
        ExecController {
            id: self.id,
            commands: self.commands.clone(),
            closed: self.closed.clone(),
        }
    }

    /// Sends signal `signal` to the command's whole process group.
    pub fn signal(&self, signal: i32) -> Result<(), ClientError> {
        self.send(ClientMessage::Signal {
            id: self.id,
            signal,
        })
    }

    /// Kills the command's whole process group (`SIGKILL`).
    pub fn kill(&self) -> Result<(), ClientError> {
        self.signal(SIGKILL)
    }

    /// Changes the window size of the command's pseudo-terminal.
    pub fn resize(&self, size: PtySize) -> Result<(), ClientError> {
        self.send(ClientMessage::Resize { id: self.id, size })
    }

    fn send(&self, msg: ClientMessage) -> Result<(), ClientError> {
        self.commands
            .send(Command::Send(msg))
            .map_err(|_| closed_error(&self.closed))
    }

    /// Waits for the command to end. Streams still in the handle are
    /// discarded and stdin still in it is closed.
    pub async fn wait(mut self) -> Result<ExecResult, ClientError> {
        self.stdout = None;
        self.stderr = None;
        self.stdin = None;
        let closed = self.closed.clone();
        match (&mut self.done).await {
            Ok(Ok(Response::Exited(result))) => Ok(result),
            Ok(Ok(other)) => Err(ClientError::Protocol(format!(
                "unexpected response to exec: {other:?}"
            ))),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(closed_error(&closed)),
        }
    }

    /// Closes stdin, collects stdout and stderr and waits for the end. Each
    /// stream may bring [`DEFAULT_OUTPUT_LIMIT`] bytes into memory (see
    /// [`ExecHandle::output_limited`]).
    pub async fn output(self) -> Result<ExecOutput, ClientError> {
        self.output_limited(DEFAULT_OUTPUT_LIMIT).await
    }

    /// Closes stdin, collects stdout and stderr and waits for the end. When
    /// either stream passes `limit` bytes it stops with
    /// [`ClientError::TooLarge`] and the command is killed (the handle is
    /// dropped); take the streams out with [`ExecHandle::take_stdout`] and
    /// [`ExecHandle::take_stderr`] to read any amount.
    pub async fn output_limited(mut self, limit: u64) -> Result<ExecOutput, ClientError> {
        self.stdin = None;
        let stdout = self.stdout.take();
        let stderr = self.stderr.take();
        let collect = |s: Option<OutputStream>| async move {
            match s {
                Some(s) => s.collect_limited(limit).await.map_err(|e| match e {
                    ClientError::TooLarge {
                        what, limit, ..
                    } => ClientError::TooLarge {
                        what,
                        limit,
                        call: "ExecHandle::output",
                        instead: "read the output as it comes with ExecHandle::take_stdout / take_stderr",
                    },
                    other => other,
                }),
                None => Ok(Vec::new()),
            }
        };
        let (stdout, stderr) = tokio::try_join!(collect(stdout), collect(stderr))?;
        let result = self.wait().await?;
        Ok(ExecOutput {
            stdout,
            stderr,
            status: result.status,
            timed_out: result.timed_out,
            duration: Duration::from_micros(result.duration_us),
        })
    }
}

impl Drop for ExecHandle {
    fn drop(&mut self) {
        // Ended (the outcome arrived, or was taken by `wait`) or the
        // connection is gone: there is nothing to kill.
        if !matches!(
            self.done.try_recv(),
            Err(oneshot::error::TryRecvError::Empty)
        ) {
            return;
        }
        tracing::debug!(
            id = self.id,
            pid = self.pid,
            "exec handle dropped early; killing the command"
        );
        let _ = self.commands.send(Command::Send(ClientMessage::Signal {
            id: self.id,
            signal: SIGKILL,
        }));
    }
}

/// Signals a running command and resizes its terminal, apart from its
/// [`ExecHandle`] (see [`ExecHandle::controller`]). Once the command ended,
/// the agent answers nothing: a signal to an ended command is dropped.
#[derive(Clone, Debug)]
pub struct ExecController {
    id: u64,
    commands: mpsc::UnboundedSender<Command>,
    closed: CloseReason,
}

impl ExecController {
    /// Sends signal `signal` to the command's whole process group.
    pub fn signal(&self, signal: i32) -> Result<(), ClientError> {
        self.send(ClientMessage::Signal {
            id: self.id,
            signal,
        })
    }

    /// Changes the window size of the command's pseudo-terminal.
    pub fn resize(&self, size: PtySize) -> Result<(), ClientError> {
        self.send(ClientMessage::Resize { id: self.id, size })
    }

    fn send(&self, msg: ClientMessage) -> Result<(), ClientError> {
        self.commands
            .send(Command::Send(msg))
            .map_err(|_| closed_error(&self.closed))
    }
}
