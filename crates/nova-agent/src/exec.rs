//! Running one command: spawn, stream, flow control, timeout, exit.
//!
//! Each command runs in its own process group (`setpgid`; with a PTY, its own
//! session), so a timeout, a kill, or the host going away ends the whole group
//! with one `kill(-pgid, SIGKILL)`, grandchildren included.
//!
//! A command that cannot start (missing program, no execute permission, a
//! bad `#!` interpreter, an exec format error, a missing working directory)
//! ends the request with a [`nova_protocol::RemoteErrorKind::Spawn`] error
//! whose kind and message come from [`crate::spawn_error`].
//!
//! A command with a user ([`ExecSpec::user`]) runs as that user
//! ([`crate::user`]): resolved in the guest's `/etc/passwd` and
//! `/etc/group`, switched to in the child before `exec`.
//!
//! One task per command runs a `select!` loop over: the request's inbox
//! (stdin chunks, EOF, credit, signals, resizes), stdout and stderr (read only
//! while the host has granted credit, so a command that outpaces its reader
//! blocks on its pipe instead of filling memory), stdin writes, the exit
//! status from the [`crate::reaper::Reaper`], and the timeout.
//!
//! When the main process has exited, output still in the pipes is drained
//! with non-blocking reads until a pipe is empty or closed, then the request
//! ends: a background process that inherited the pipes does not keep the
//! request open forever (what it writes later is discarded).
//!
//! **Detached commands.** When the host that streams a command goes away
//! (its session ended: end of stream, a failed read, a new host on the
//! stream), the command is *not* killed: the task closes its stdin and goes
//! on reading its output into a buffer of at most
//! [`DETACHED_OUTPUT_LIMIT`] bytes, then stops reading (the command blocks
//! on its pipes, as with a host that stops taking output). Nothing is
//! written to the connection it came from: over virtio-serial a write to a
//! port without a host would wait for the next host and reach it ahead of
//! its handshake. A host that comes back attaches
//! ([`crate::execs::attach`]): the task streams the held output and then
//! the live output to that request, within its credit. A command that ends
//! while detached leaves its status and held output in the
//! [`crate::execs::ExecTable`]. Only an explicit signal (or the timeout)
//! kills a command.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use nova_protocol::{
    AgentMessage, ClientMessage, DETACHED_OUTPUT_LIMIT, ExecCommand, ExecResult, ExecSpec,
    ExitStatus, MAX_CHUNK, PtySize, RemoteError, RemoteErrorKind, Response, STREAM_WINDOW,
    StreamKind,
};
use rustix::process::{Pid, Signal, kill_process_group};
use tokio::sync::{mpsc, oneshot};

use crate::Agent;
use crate::execs::{Attach, LiveView};
use crate::fdio::{AsyncFdIo, ReadOutcome};
use crate::session::{Disconnected, Outbox};
use crate::spawn_error::{self, SpawnAttempt};

/// Pipe buffer size asked for stdout/stderr (fewer wake-ups for bulk output).
const PIPE_SIZE: usize = 1024 * 1024;
/// End-of-file character sent to a PTY when the host closes stdin.
const PTY_EOF: u8 = 0x04;

/// A spawned command's descriptors and exit notification.
struct Spawned {
    io: SpawnedIo,
    exit: oneshot::Receiver<ExitStatus>,
}

/// A spawned command's descriptors.
struct SpawnedIo {
    pid: i32,
    stdin: Option<Arc<AsyncFdIo>>,
    stdout: Arc<AsyncFdIo>,
    stderr: Option<Arc<AsyncFdIo>>,
    pty: bool,
}

/// Runs request `id`'s command to its end, streaming to request `id` and,
/// after that host went away, to whichever host attaches (see the module
/// docs).
pub(crate) async fn run(
    id: u64,
    spec: ExecSpec,
    agent: Arc<Agent>,
    out: Outbox,
    inbox: mpsc::UnboundedReceiver<ClientMessage>,
) {
    let started = Instant::now();
    let spawned = match spawn(&spec, &agent) {
        Ok(spawned) => spawned,
        Err(err) => {
            tracing::debug!(id, error = %err, "exec failed to start");
            let _ = out.done(id, Err(err)).await;
            return;
        }
    };
    let pid = spawned.io.pid;
    let pid_u32 = u32::try_from(pid).unwrap_or(0);
    let Spawned { io, exit } = spawned;
    let mut registration = agent.execs.register(pid_u32, spec.command.clone());
    let exec_id = registration.exec_id;
    tracing::debug!(id, pid, exec_id, "exec started");
    let mut exec = Exec::new(
        id,
        io,
        out,
        spec.timeout_ms,
        started,
        exec_id,
        registration.view.clone(),
    );
    let mut inbox = Some(inbox);
    if exec
        .send(AgentMessage::Started {
            id,
            pid: pid_u32,
            exec_id,
        })
        .await
        .is_err()
    {
        exec.detach(&mut inbox);
    }
    let result = exec.run(&mut inbox, exit, &mut registration.attach).await;
    tracing::debug!(exec_id, pid, status = %result.status, "exec finished");
    let delivered = match exec.out.clone() {
        Some(out) => out
            .done(exec.id, Ok(Response::Exited(result)))
            .await
            .is_ok(),
        None => false,
    };
    let held = if delivered {
        Vec::new()
    } else {
        exec.pending.drain(..).collect()
    };
    if let Some(finished) = exec.finished.take() {
        let _ = finished.send(exec.id);
    }
    agent.execs.finish(exec_id, result, held);
    // Attach requests that came as the command ended are answered from the
    // finished list.
    registration.attach.close();
    while let Ok(late) = registration.attach.try_recv() {
        crate::execs::attach(&agent.execs, exec_id, late).await;
    }
}

fn spawn(spec: &ExecSpec, agent: &Agent) -> Result<Spawned, RemoteError> {
    let (mut cmd, program) = match &spec.command {
        ExecCommand::Argv(argv) => {
            let Some((program, args)) = argv.split_first() else {
                return Err(RemoteError::new(
                    RemoteErrorKind::InvalidInput,
                    "empty argv",
                ));
            };
            let resolved = resolve_program(program, effective_path(spec, agent));
            let mut cmd = Command::new(resolved.as_deref().unwrap_or(program.as_str()));
            cmd.args(args);
            (cmd, program.clone())
        }
        ExecCommand::Shell(line) => {
            let mut cmd = Command::new("/bin/sh");
            cmd.arg("-c").arg(line);
            (cmd, "/bin/sh".to_owned())
        }
    };
    if let Some(env) = &agent.base_env {
        cmd.env_clear();
        cmd.envs(env.iter().map(|(k, v)| (k, v)));
    }
    if let Some(user) = &spec.user {
        let identity = crate::user::resolve_in(user, agent.etc_dir())?;
        identity.apply(&mut cmd, &user.to_string())?;
    }
    cmd.envs(spec.env.iter().map(|(k, v)| (k, v)));
    if let Some(cwd) = &spec.cwd {
        cmd.current_dir(cwd);
    }
    let spawn_err = |e: io::Error| {
        let attempt = SpawnAttempt {
            program: &program,
            path_env: effective_path(spec, agent),
            cwd: spec.cwd.as_deref(),
        };
        spawn_error::explain(&attempt, &e)
    };

    match spec.pty {
        None => {
            cmd.stdin(if spec.stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            });
            cmd.stdout(Stdio::piped());
            cmd.stderr(Stdio::piped());
            cmd.process_group(0);
            let (mut child, exit) = agent.reaper.spawn(&mut cmd).map_err(spawn_err)?;
            drop(cmd);
            let pid = i32::try_from(child.id()).unwrap_or(-1);
            let register =
                |fd: Option<OwnedFd>, what: &str| -> Result<Arc<AsyncFdIo>, RemoteError> {
                    let fd = fd.ok_or_else(|| {
                        RemoteError::new(RemoteErrorKind::Io, format!("no {what} pipe"))
                    })?;
                    if what != "stdin" {
                        // Best effort: a bigger pipe means fewer wake-ups.
                        let _ = rustix::pipe::fcntl_setpipe_size(&fd, PIPE_SIZE);
                    }
                    AsyncFdIo::new(fd, false)
                        .map(Arc::new)
                        .map_err(|e| RemoteError::from_io(format!("register {what}"), &e))
                };
            let io = (|| {
                let stdin = if spec.stdin {
                    Some(register(child.stdin.take().map(OwnedFd::from), "stdin")?)
                } else {
                    None
                };
                let stdout = register(child.stdout.take().map(OwnedFd::from), "stdout")?;
                let stderr = register(child.stderr.take().map(OwnedFd::from), "stderr")?;
                Ok((stdin, stdout, stderr))
            })();
            match io {
                Ok((stdin, stdout, stderr)) => Ok(Spawned {
                    io: SpawnedIo {
                        pid,
                        stdin,
                        stdout,
                        stderr: Some(stderr),
                        pty: false,
                    },
                    exit,
                }),
                Err(e) => {
                    kill_group(pid, Signal::KILL);
                    Err(e)
                }
            }
        }
        Some(size) => {
            let (master, slave) =
                open_pty(size).map_err(|e| RemoteError::from_io("open a pseudo-terminal", &e))?;
            let dup = |fd: &OwnedFd| {
                fd.try_clone()
                    .map_err(|e| RemoteError::from_io("duplicate the terminal", &e))
            };
            cmd.stdin(Stdio::from(dup(&slave)?));
            cmd.stdout(Stdio::from(dup(&slave)?));
            cmd.stderr(Stdio::from(slave));
            if !spec.env.iter().any(|(k, _)| k == "TERM") {
                cmd.env("TERM", "xterm-256color");
            }
            // SAFETY: the closure runs in the child between fork and exec; it
            // only makes two async-signal-safe system calls (setsid, ioctl)
            // and touches no memory shared with the parent.
            unsafe {
                cmd.pre_exec(|| {
                    rustix::process::setsid()?;
                    rustix::process::ioctl_tiocsctty(rustix::stdio::stdin())?;
                    Ok(())
                });
            }
            let (child, exit) = agent.reaper.spawn(&mut cmd).map_err(spawn_err)?;
            // Close our copies of the terminal's slave side, so that reading
            // the master reports EOF once the command's processes are gone.
            drop(cmd);
            let pid = i32::try_from(child.id()).unwrap_or(-1);
            let master = match AsyncFdIo::new(master, true) {
                Ok(master) => Arc::new(master),
                Err(e) => {
                    kill_group(pid, Signal::KILL);
                    return Err(RemoteError::from_io("register the terminal", &e));
                }
            };
            Ok(Spawned {
                io: SpawnedIo {
                    pid,
                    stdin: Some(master.clone()),
                    stdout: master,
                    stderr: None,
                    pty: true,
                },
                exit,
            })
        }
    }
}

/// The `PATH` a command gets when the agent sets it explicitly (from the
/// request or the PID 1 defaults); `None` when it inherits the agent's own.
fn effective_path<'a>(spec: &'a ExecSpec, agent: &'a Agent) -> Option<&'a str> {
    let find = |env: &'a [(String, String)]| {
        env.iter()
            .rev()
            .find(|(k, _)| k == "PATH")
            .map(|(_, v)| v.as_str())
    };
    find(&spec.env).or_else(|| agent.base_env.as_deref().and_then(find))
}

/// Looks `program` up in `path` ourselves when the environment sets `PATH`.
///
/// The standard library only uses the fast `posix_spawn` (a `vfork`) when it
/// does not have to search a `PATH` it was given; otherwise it falls back to
/// `fork`, which copies the agent's page tables. Handing it an absolute path
/// keeps every spawn on the fast path. `None`: use `program` as it is.
fn resolve_program(program: &str, path: Option<&str>) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    if program.contains('/') {
        return None;
    }
    path?
        .split(':')
        .filter(|dir| !dir.is_empty())
        .find_map(|dir| {
            let candidate = format!("{dir}/{program}");
            let meta = std::fs::metadata(&candidate).ok()?;
            (meta.is_file() && meta.permissions().mode() & 0o111 != 0).then_some(candidate)
        })
}

/// Opens a pseudo-terminal pair with the given window size.
fn open_pty(size: PtySize) -> io::Result<(OwnedFd, OwnedFd)> {
    use rustix::pty::{OpenptFlags, grantpt, openpt, ptsname, unlockpt};
    let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)?;
    grantpt(&master)?;
    unlockpt(&master)?;
    let name = ptsname(&master, Vec::new())?;
    let slave = rustix::fs::open(
        name.as_c_str(),
        rustix::fs::OFlags::RDWR | rustix::fs::OFlags::NOCTTY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )?;
    set_winsize(&master, size)?;
    Ok((master, slave))
}

fn set_winsize(fd: impl AsFd, size: PtySize) -> io::Result<()> {
    rustix::termios::tcsetwinsize(
        fd,
        rustix::termios::Winsize {
            ws_row: size.rows,
            ws_col: size.cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        },
    )?;
    Ok(())
}

/// Sends `signal` to process group `pgid`, ignoring "no such process".
pub(crate) fn kill_group(pgid: i32, signal: Signal) {
    let Some(pid) = Pid::from_raw(pgid) else {
        return;
    };
    match kill_process_group(pid, signal) {
        Ok(()) | Err(rustix::io::Errno::SRCH) => {}
        Err(e) => tracing::warn!(pgid, error = %e, "cannot signal process group"),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StreamState {
    /// Read as data arrives.
    Open,
    /// The main process exited: read what is left without waiting.
    Draining,
    /// Done.
    Closed,
}

/// One output stream of a command.
struct Output {
    kind: StreamKind,
    io: Option<Arc<AsyncFdIo>>,
    state: StreamState,
    /// Bytes the host still lets us send.
    credit: u64,
}

impl Output {
    fn new(kind: StreamKind, io: Option<Arc<AsyncFdIo>>) -> Self {
        let state = if io.is_some() {
            StreamState::Open
        } else {
            StreamState::Closed
        };
        Self {
            kind,
            io,
            state,
            credit: u64::from(STREAM_WINDOW),
        }
    }

    /// Whether to read now, `room` bytes at most.
    fn readable(&self, room: usize) -> bool {
        self.state != StreamState::Closed && room > 0
    }

    async fn read(
        io: Option<Arc<AsyncFdIo>>,
        state: StreamState,
        max: usize,
    ) -> io::Result<ReadOutcome> {
        let Some(io) = io else {
            return Ok(ReadOutcome::Eof);
        };
        match state {
            StreamState::Open => io.read(max).await,
            _ => io.read_now(max),
        }
    }

    fn close(&mut self) {
        self.state = StreamState::Closed;
        self.io = None;
    }
}

struct Exec {
    /// The request streaming the command (the one that started it, or the
    /// last attach).
    id: u64,
    exec_id: u64,
    pid: i32,
    /// That request's writer queue; `None` while no host streams it.
    out: Option<Outbox>,
    /// Told `id` when an attach request ends.
    finished: Option<mpsc::UnboundedSender<u64>>,
    view: Arc<LiveView>,
    stdout: Output,
    stderr: Output,
    stdin: Option<Arc<AsyncFdIo>>,
    pty: bool,
    /// Stdin chunks received and not yet written.
    stdin_queue: VecDeque<Bytes>,
    stdin_queued: usize,
    stdin_eof: bool,
    /// Output read while no host streamed the command, oldest first.
    pending: VecDeque<(StreamKind, Bytes)>,
    pending_len: usize,
    status: Option<ExitStatus>,
    deadline: Option<tokio::time::Instant>,
    timed_out: bool,
    started: Instant,
    duration: Duration,
    overrun_warned: bool,
}

impl Exec {
    fn new(
        id: u64,
        spawned: SpawnedIo,
        out: Outbox,
        timeout_ms: Option<u64>,
        started: Instant,
        exec_id: u64,
        view: Arc<LiveView>,
    ) -> Self {
        Self {
            id,
            exec_id,
            pid: spawned.pid,
            out: Some(out),
            finished: None,
            view,
            stdout: Output::new(StreamKind::Stdout, Some(spawned.stdout)),
            stderr: Output::new(StreamKind::Stderr, spawned.stderr),
            stdin: spawned.stdin,
            pty: spawned.pty,
            stdin_queue: VecDeque::new(),
            stdin_queued: 0,
            stdin_eof: false,
            pending: VecDeque::new(),
            pending_len: 0,
            status: None,
            deadline: timeout_ms.map(|ms| tokio::time::Instant::now() + Duration::from_millis(ms)),
            timed_out: false,
            started,
            duration: Duration::ZERO,
            overrun_warned: false,
        }
    }

    /// Sends `msg` to the streaming host, if there is one.
    async fn send(&self, msg: AgentMessage) -> Result<(), Disconnected> {
        match &self.out {
            Some(out) => out.send(msg).await,
            None => Err(Disconnected),
        }
    }

    /// How many bytes of `kind` may be read now: within the host's credit
    /// while one streams the command, within the held-output bound
    /// otherwise.
    fn room(&self, kind: StreamKind) -> usize {
        let output = match kind {
            StreamKind::Stderr => &self.stderr,
            _ => &self.stdout,
        };
        let room = if self.out.is_some() {
            usize::try_from(output.credit).unwrap_or(usize::MAX)
        } else {
            DETACHED_OUTPUT_LIMIT.saturating_sub(self.pending_len)
        };
        room.min(MAX_CHUNK)
    }

    /// The host went away: the command keeps running, without stdin, its
    /// output held (see the module docs).
    fn detach(&mut self, inbox: &mut Option<mpsc::UnboundedReceiver<ClientMessage>>) {
        if self.out.take().is_some() {
            tracing::debug!(
                exec_id = self.exec_id,
                pid = self.pid,
                "host gone; the command keeps running, its output held"
            );
        }
        *inbox = None;
        self.stdin = None;
        self.stdin_queue.clear();
        self.stdin_queued = 0;
        self.stdin_eof = false;
        if let Some(finished) = self.finished.take() {
            let _ = finished.send(self.id);
        }
        self.view.attached.store(false, Ordering::SeqCst);
    }

    /// A host attached: it gets `Started`, the held output, then the live
    /// output.
    async fn attach(
        &mut self,
        attach: Attach,
        inbox: &mut Option<mpsc::UnboundedReceiver<ClientMessage>>,
    ) {
        tracing::debug!(exec_id = self.exec_id, id = attach.id, "a host attached");
        self.id = attach.id;
        self.out = Some(attach.out);
        self.finished = Some(attach.finished);
        *inbox = Some(attach.inbox);
        self.stdout.credit = u64::from(STREAM_WINDOW);
        self.stderr.credit = u64::from(STREAM_WINDOW);
        self.view.attached.store(true, Ordering::SeqCst);
        let started = AgentMessage::Started {
            id: self.id,
            pid: u32::try_from(self.pid).unwrap_or(0),
            exec_id: self.exec_id,
        };
        if self.send(started).await.is_err() {
            self.detach(inbox);
            return;
        }
        // What is held fits in the fresh window (it is at most
        // DETACHED_OUTPUT_LIMIT bytes).
        while let Some((kind, data)) = self.pending.pop_front() {
            let len = data.len();
            let msg = AgentMessage::Data {
                id: self.id,
                stream: kind,
                data: data.clone(),
            };
            if self.send(msg).await.is_err() {
                self.pending.push_front((kind, data));
                self.detach(inbox);
                return;
            }
            self.pending_len -= len;
            self.view
                .buffered
                .store(self.pending_len as u64, Ordering::SeqCst);
            let output = match kind {
                StreamKind::Stderr => &mut self.stderr,
                _ => &mut self.stdout,
            };
            output.credit = output.credit.saturating_sub(len as u64);
        }
    }

    async fn run(
        &mut self,
        inbox: &mut Option<mpsc::UnboundedReceiver<ClientMessage>>,
        exit: oneshot::Receiver<ExitStatus>,
        attaches: &mut mpsc::Receiver<Attach>,
    ) -> ExecResult {
        let mut exit = Some(exit);
        loop {
            if self.status.is_some()
                && self.out.is_none()
                && self.pending_len >= DETACHED_OUTPUT_LIMIT
            {
                // Nobody will read what a background process still writes
                // past the bound; the command is over.
                self.stdout.close();
                self.stderr.close();
            }
            if let Some(status) = self.status
                && self.stdout.state == StreamState::Closed
                && self.stderr.state == StreamState::Closed
            {
                return ExecResult {
                    status,
                    timed_out: self.timed_out,
                    duration_us: u64::try_from(self.duration.as_micros()).unwrap_or(u64::MAX),
                };
            }
            let stdout_max = self.room(StreamKind::Stdout);
            let stderr_max = self.room(StreamKind::Stderr);
            let stdin_front = self.stdin_queue.front().cloned();
            let stdin_io = self.stdin.clone();
            let deadline = self
                .deadline
                .filter(|_| !self.timed_out && self.status.is_none());
            let detached = self.out.is_none();
            tokio::select! {
                msg = recv_inbox(inbox), if inbox.is_some() => match msg {
                    Some(msg) => self.on_message(msg),
                    None => self.detach(inbox),
                },
                attach = attaches.recv(), if detached => {
                    if let Some(attach) = attach {
                        self.attach(attach, inbox).await;
                    }
                }
                r = Output::read(self.stdout.io.clone(), self.stdout.state, stdout_max), if self.stdout.readable(stdout_max) => {
                    self.on_output(StreamKind::Stdout, r, inbox).await;
                }
                r = Output::read(self.stderr.io.clone(), self.stderr.state, stderr_max), if self.stderr.readable(stderr_max) => {
                    self.on_output(StreamKind::Stderr, r, inbox).await;
                }
                w = write_some(stdin_io, stdin_front), if !self.stdin_queue.is_empty() => {
                    self.on_stdin_written(w);
                }
                status = wait_exit(&mut exit), if exit.is_some() => {
                    exit = None;
                    self.duration = self.started.elapsed();
                    self.status = Some(status.unwrap_or(ExitStatus::Signaled(9)));
                    for output in [&mut self.stdout, &mut self.stderr] {
                        if output.state == StreamState::Open {
                            output.state = StreamState::Draining;
                        }
                    }
                }
                () = sleep_until(deadline), if deadline.is_some() => {
                    tracing::debug!(id = self.id, pid = self.pid, "timeout; killing the process group");
                    self.timed_out = true;
                    kill_group(self.pid, Signal::KILL);
                }
            }
        }
    }

    fn on_message(&mut self, msg: ClientMessage) {
        match msg {
            ClientMessage::Data { data, .. } => {
                if self.stdin.is_none() {
                    // Stdin is closed (or was never piped): discard, but give
                    // the credit back so the host is not stuck.
                    self.credit_stdin(data.len());
                } else if self.stdin_queued + data.len() > STREAM_WINDOW as usize {
                    if !self.overrun_warned {
                        tracing::warn!(
                            id = self.id,
                            "host sent stdin beyond its credit; dropping the excess"
                        );
                        self.overrun_warned = true;
                    }
                } else if !data.is_empty() {
                    self.stdin_queued += data.len();
                    self.stdin_queue.push_back(data);
                }
            }
            ClientMessage::Eof { .. } => {
                self.stdin_eof = true;
                self.maybe_close_stdin();
            }
            ClientMessage::Credit { stream, bytes, .. } => match stream {
                StreamKind::Stdout | StreamKind::File => self.stdout.credit += u64::from(bytes),
                StreamKind::Stderr => self.stderr.credit += u64::from(bytes),
            },
            ClientMessage::Signal { signal, .. } => match Signal::from_named_raw(signal) {
                Some(signal) => kill_group(self.pid, signal),
                None => tracing::debug!(id = self.id, signal, "ignoring an unknown signal number"),
            },
            ClientMessage::Resize { size, .. } => {
                if self.pty
                    && let Some(io) = &self.stdin
                    && let Err(e) = set_winsize(io.get_ref(), size)
                {
                    tracing::debug!(id = self.id, error = %e, "resize failed");
                }
            }
            ClientMessage::Cancel { .. } => kill_group(self.pid, Signal::KILL),
            ClientMessage::Request { .. } => {}
        }
    }

    async fn on_output(
        &mut self,
        kind: StreamKind,
        r: io::Result<ReadOutcome>,
        inbox: &mut Option<mpsc::UnboundedReceiver<ClientMessage>>,
    ) {
        let output = match kind {
            StreamKind::Stderr => &mut self.stderr,
            _ => &mut self.stdout,
        };
        match r {
            Ok(ReadOutcome::Data(data)) => {
                let stream = output.kind;
                if self.out.is_some() {
                    output.credit = output.credit.saturating_sub(data.len() as u64);
                    let msg = AgentMessage::Data {
                        id: self.id,
                        stream,
                        data: data.clone(),
                    };
                    if self.send(msg).await.is_ok() {
                        return;
                    }
                    // The host went away: this chunk is the first held.
                    self.detach(inbox);
                }
                self.pending_len += data.len();
                self.pending.push_back((stream, data));
                self.view
                    .buffered
                    .store(self.pending_len as u64, Ordering::SeqCst);
            }
            Ok(ReadOutcome::Eof) | Ok(ReadOutcome::Empty) => output.close(),
            Err(e) => {
                tracing::debug!(id = self.id, error = %e, "reading command output failed");
                output.close();
            }
        }
    }

    fn on_stdin_written(&mut self, written: io::Result<usize>) {
        match written {
            Ok(n) => {
                if let Some(front) = self.stdin_queue.front_mut() {
                    front.advance(n);
                    if front.is_empty() {
                        self.stdin_queue.pop_front();
                    }
                }
                self.stdin_queued -= n;
                self.credit_stdin(n);
                self.maybe_close_stdin();
            }
            Err(e) => {
                // Typically EPIPE: the command closed its stdin.
                tracing::debug!(id = self.id, error = %e, "stdin closed by the command");
                let dropped = self.stdin_queued;
                self.stdin_queue.clear();
                self.stdin_queued = 0;
                self.stdin = None;
                self.credit_stdin(dropped);
            }
        }
    }

    fn maybe_close_stdin(&mut self) {
        if !self.stdin_eof || !self.stdin_queue.is_empty() {
            return;
        }
        if self.pty {
            // The master is also the output; send the EOF character instead.
            if let Some(io) = &self.stdin {
                let _ = rustix::io::write(io.get_ref(), &[PTY_EOF]);
            }
            self.stdin_eof = false;
        } else {
            self.stdin = None;
        }
    }

    /// Returns stdin credit to the host (fire and forget: the outbox has room
    /// or the host is gone).
    fn credit_stdin(&self, bytes: usize) {
        if bytes == 0 {
            return;
        }
        let Some(out) = self.out.clone() else { return };
        let msg = AgentMessage::Credit {
            id: self.id,
            bytes: u32::try_from(bytes).unwrap_or(u32::MAX),
        };
        tokio::spawn(async move {
            let _ = out.send(msg).await;
        });
    }
}

async fn write_some(io: Option<Arc<AsyncFdIo>>, data: Option<Bytes>) -> io::Result<usize> {
    match (io, data) {
        (Some(io), Some(data)) => io.write(&data).await,
        _ => Err(io::Error::from(io::ErrorKind::BrokenPipe)),
    }
}

async fn recv_inbox(
    inbox: &mut Option<mpsc::UnboundedReceiver<ClientMessage>>,
) -> Option<ClientMessage> {
    match inbox {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn wait_exit(exit: &mut Option<oneshot::Receiver<ExitStatus>>) -> Option<ExitStatus> {
    match exit {
        Some(rx) => rx.await.ok(),
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_are_resolved_only_when_path_is_set() {
        assert_eq!(resolve_program("sh", None), None);
        assert_eq!(resolve_program("/bin/sh", Some("/usr/bin:/bin")), None);
        let found = resolve_program("sh", Some("/nonexistent::/usr/bin:/bin")).expect("sh on PATH");
        assert!(found.ends_with("/sh") && found.starts_with('/'), "{found}");
        assert_eq!(
            resolve_program("no-such-program-nova", Some("/usr/bin:/bin")),
            None
        );
    }
}
