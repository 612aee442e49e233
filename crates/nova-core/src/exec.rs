//! Running commands in a sandbox: what is asked ([`ExecRequest`]) and what
//! comes back, either all at once ([`ExecOutput`]) or as it is produced
//! ([`ExecStream`], whose [`ExecStdin`] feeds stdin as the caller produces
//! it when the request asked for [`ExecRequest::stream_stdin`]).
//!
//! A command that cannot start is an error,
//! [`ExecError::Spawn`], with the kind of
//! failure; [`ExitStatus::NotStarted`] is the status to report in its place
//! where a caller wants one status for every outcome, and
//! [`ExitStatus::shell_code`] turns it into the shell's 127 / 126.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::error::{ExecError, SpawnErrorKind, StdinClosed};

/// The default cap on output gathered in memory by `execute_command` and
/// [`ExecStream::collect`]: stdout and stderr together.
pub const DEFAULT_MAX_OUTPUT: u64 = 64 * 1024 * 1024;

/// The program to run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    /// Run `argv[0]` with these arguments, looked up in `PATH`, no shell.
    Argv(Vec<String>),
    /// Run this string with `/bin/sh -c`.
    Shell(String),
}

/// A command to run in a sandbox.
///
/// `From<&str>` makes a shell command, so `sandbox.execute_command("ls /")`
/// works as in the seed API.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    /// What to run.
    pub command: Command,
    /// Extra environment variables, on top of the sandbox's.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory in the guest; the agent's default (`/root`) if unset.
    #[serde(default)]
    pub cwd: Option<String>,
    /// Bytes written to the command's stdin, which is then closed; stdin is
    /// closed at once when `None` (unless [`stream_stdin`](Self::stream_stdin)).
    #[serde(default)]
    pub stdin: Option<Vec<u8>>,
    /// Keep stdin open after [`stdin`](Self::stdin)'s bytes: the caller
    /// writes the rest as it has it through [`ExecStream::take_stdin`], and
    /// stdin closes when that writer is dropped.
    #[serde(default)]
    pub stream_stdin: bool,
    /// Kill the command's whole process group after this long.
    #[serde(default, with = "opt_duration_ms")]
    pub timeout: Option<Duration>,
    /// Most bytes of output (stdout and stderr together) `execute_command`
    /// gathers in memory; [`DEFAULT_MAX_OUTPUT`] when unset. Past it the
    /// command is killed and the call fails with
    /// [`ExecError::OutputTooLarge`]. A stream (`exec_stream`) has no cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_output: Option<u64>,
    /// Run the command on a pseudo-terminal of this size (stdout then
    /// carries the terminal; stderr is empty). Resize it with
    /// [`ExecStream::resize`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pty: Option<TerminalSize>,
    /// Run as this user, written as `docker exec -u` takes it:
    /// `USER[:GROUP]` or `UID[:GID]` (`root`, `0`, `app:staff`,
    /// `1000:1000`). Names are looked up in the guest's `/etc/passwd` and
    /// `/etc/group`; `HOME`, `USER` and `LOGNAME` follow the user unless
    /// [`env`](Self::env) sets them. Unset: the template's default user (an
    /// OCI image's `User`, a Dockerfile's `USER`), else root. A user the
    /// guest does not know fails the command with
    /// [`SpawnErrorKind::UnknownUser`]; text that is not a user at all is
    /// [`ExecError::Invalid`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// The size of a command's pseudo-terminal, in character cells.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TerminalSize {
    /// Rows.
    pub rows: u16,
    /// Columns.
    pub cols: u16,
}

/// Controls a running command: what a provider attaches to an
/// [`ExecStream`] so its caller can signal the command or resize its
/// terminal.
pub trait ExecControl: Send + Sync + fmt::Debug {
    /// Sends signal number `signal` to the command's whole process group.
    fn signal(&self, signal: i32) -> Result<(), ExecError>;

    /// Resizes the command's pseudo-terminal (a command without one ignores
    /// it).
    fn resize(&self, size: TerminalSize) -> Result<(), ExecError>;
}

impl ExecRequest {
    /// Runs `script` with `/bin/sh -c`.
    pub fn shell(script: impl Into<String>) -> Self {
        Self::new(Command::Shell(script.into()))
    }

    /// Runs `argv` directly, without a shell.
    pub fn argv<I, S>(argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self::new(Command::Argv(argv.into_iter().map(Into::into).collect()))
    }

    fn new(command: Command) -> Self {
        Self {
            command,
            env: BTreeMap::new(),
            cwd: None,
            stdin: None,
            stream_stdin: false,
            timeout: None,
            max_output: None,
            pty: None,
            user: None,
        }
    }

    /// Adds an environment variable.
    pub fn env(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.insert(name.into(), value.into());
        self
    }

    /// Sets the working directory.
    pub fn cwd(mut self, cwd: impl Into<String>) -> Self {
        self.cwd = Some(cwd.into());
        self
    }

    /// Feeds `bytes` to stdin.
    pub fn stdin(mut self, bytes: impl Into<Vec<u8>>) -> Self {
        self.stdin = Some(bytes.into());
        self
    }

    /// Keeps stdin open for [`ExecStream::take_stdin`] (see
    /// [`stream_stdin`](Self::stream_stdin)). The timeout applies however
    /// long the caller keeps stdin open.
    pub fn stream_stdin(mut self) -> Self {
        self.stream_stdin = true;
        self
    }

    /// Runs the command on a pseudo-terminal of `rows` x `cols`.
    pub fn pty(mut self, rows: u16, cols: u16) -> Self {
        self.pty = Some(TerminalSize { rows, cols });
        self
    }

    /// Runs the command as `user` (`USER[:GROUP]` or `UID[:GID]`, see
    /// [`user`](Self::user)).
    pub fn user(mut self, user: impl Into<String>) -> Self {
        self.user = Some(user.into());
        self
    }

    /// Sets a timeout.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Sets the cap on output `execute_command` gathers in memory.
    pub fn max_output(mut self, bytes: u64) -> Self {
        self.max_output = Some(bytes);
        self
    }
}

impl From<&str> for ExecRequest {
    fn from(script: &str) -> Self {
        Self::shell(script)
    }
}

impl From<String> for ExecRequest {
    fn from(script: String) -> Self {
        Self::shell(script)
    }
}

/// Where a command the sandbox knows stands ([`ExecInfo::state`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExecState {
    /// It runs (or its output is still being read).
    Running,
    /// It ended so.
    Exited(ExitStatus),
}

/// A command a sandbox's agent knows: a running one (whichever caller
/// started it, including one whose caller is gone) or one of the last that
/// ended. See [`Hypervisor::list_execs`](crate::hypervisor::Hypervisor::list_execs).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecInfo {
    /// Its id in the sandbox ([`ExecStream::exec_id`]).
    pub exec_id: u64,
    /// Its main process id in the guest.
    pub pid: u32,
    /// What it runs.
    pub command: Command,
    /// Running, or how it ended.
    pub state: ExecState,
    /// Whether a stream follows it now.
    pub attached: bool,
    /// Output the sandbox holds for the next
    /// [`attach_exec`](crate::hypervisor::Hypervisor::attach_exec) (bounded:
    /// past the bound the command blocks on its output).
    pub buffered_bytes: u64,
}

/// How a command ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitStatus {
    /// It exited with this code.
    Code(i32),
    /// A signal ended it.
    Signal(i32),
    /// Its timeout expired and its process group was killed.
    TimedOut,
    /// It never started (see [`SpawnError`](crate::error::SpawnError), which
    /// says what is missing).
    NotStarted(SpawnErrorKind),
}

impl ExitStatus {
    /// Whether it exited with code 0.
    pub fn success(self) -> bool {
        self == Self::Code(0)
    }

    /// The exit code a shell would report: the code, 128 + signal, 124 for a
    /// timeout (as `timeout(1)` does), 127 / 126 for a command that could not
    /// start (see [`SpawnErrorKind::shell_code`]).
    pub fn shell_code(self) -> i32 {
        match self {
            Self::Code(c) => c,
            Self::Signal(s) => 128 + s,
            Self::TimedOut => 124,
            Self::NotStarted(kind) => kind.shell_code(),
        }
    }
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Code(c) => write!(f, "exit code {c}"),
            Self::Signal(s) => write!(f, "killed by signal {s}"),
            Self::TimedOut => f.write_str("timed out"),
            Self::NotStarted(kind) => write!(
                f,
                "not started ({}, exit code {})",
                match kind {
                    SpawnErrorKind::NotFound => "command not found",
                    SpawnErrorKind::NotExecutable => "not executable",
                    SpawnErrorKind::BadInterpreter => "bad interpreter",
                    SpawnErrorKind::ExecFormat => "exec format error",
                    SpawnErrorKind::CwdNotFound => "working directory not found",
                    SpawnErrorKind::CwdUnusable => "working directory unusable",
                    SpawnErrorKind::Other => "spawn failed",
                    SpawnErrorKind::UnknownUser => "unknown user",
                    SpawnErrorKind::SwitchUser => "cannot switch user",
                },
                kind.shell_code()
            ),
        }
    }
}

/// Everything a finished command produced.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecOutput {
    /// How it ended.
    pub status: ExitStatus,
    /// Its stdout, as bytes.
    pub stdout: Vec<u8>,
    /// Its stderr, as bytes.
    pub stderr: Vec<u8>,
    /// Wall time from request to exit, in milliseconds.
    pub duration_ms: u64,
}

impl ExecOutput {
    /// The exit code a shell would report (see [`ExitStatus::shell_code`]).
    pub fn exit_code(&self) -> i32 {
        self.status.shell_code()
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

/// One piece of a running command's life.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExecEvent {
    /// Bytes it wrote to stdout.
    Stdout(Vec<u8>),
    /// Bytes it wrote to stderr.
    Stderr(Vec<u8>),
    /// It ended; no event follows.
    Exited(ExitStatus),
}

/// Output of a running command, delivered as it is produced.
///
/// The channel is bounded: a consumer that stops reading stops the command's
/// output at the source (back-pressure), rather than buffering it.
///
/// **Dropping the stream before [`ExecEvent::Exited`] kills the command**:
/// the provider notices that nobody listens any more and has the guest send
/// `SIGKILL` to the command's whole process group (its children included).
/// Read the stream to its end (or [`collect`](Self::collect) it) for the
/// command to run to completion.
#[derive(Debug)]
pub struct ExecStream {
    events: mpsc::Receiver<ExecEvent>,
    stdin: Option<ExecStdin>,
    control: Option<Box<dyn ExecControl>>,
    exec_id: Option<u64>,
}

impl ExecStream {
    /// Wraps the receiving end of a provider's event channel. The provider
    /// must kill the command when the channel closes early (see
    /// [`mpsc::Sender::closed`]).
    pub fn new(events: mpsc::Receiver<ExecEvent>) -> Self {
        Self {
            events,
            stdin: None,
            control: None,
            exec_id: None,
        }
    }

    /// Like [`new`](Self::new), for a request with
    /// [`ExecRequest::stream_stdin`]: `stdin` is handed out by
    /// [`take_stdin`](Self::take_stdin).
    pub fn with_stdin(events: mpsc::Receiver<ExecEvent>, stdin: ExecStdin) -> Self {
        Self {
            events,
            stdin: Some(stdin),
            control: None,
            exec_id: None,
        }
    }

    /// Attaches the provider's control of the command, which
    /// [`signal`](Self::signal) and [`resize`](Self::resize) use.
    pub fn with_control(mut self, control: Box<dyn ExecControl>) -> Self {
        self.control = Some(control);
        self
    }

    /// Records the command's exec id (see [`ExecStream::exec_id`]).
    pub fn with_exec_id(mut self, exec_id: u64) -> Self {
        self.exec_id = Some(exec_id);
        self
    }

    /// The command's id in the sandbox, where the provider has one: a
    /// caller that loses this stream without it killing the command (its
    /// process died) finds the command again with
    /// [`Hypervisor::attach_exec`](crate::hypervisor::Hypervisor::attach_exec)
    /// and [`Hypervisor::list_execs`](crate::hypervisor::Hypervisor::list_execs).
    pub fn exec_id(&self) -> Option<u64> {
        self.exec_id
    }

    /// Sends signal number `signal` (15 for `SIGTERM`, 2 for `SIGINT`, ...)
    /// to the command's whole process group. Fails when the command already
    /// ended or the provider cannot signal it.
    pub fn signal(&self, signal: i32) -> Result<(), ExecError> {
        self.control()?.signal(signal)
    }

    /// Resizes the command's pseudo-terminal (see [`ExecRequest::pty`]).
    pub fn resize(&self, rows: u16, cols: u16) -> Result<(), ExecError> {
        self.control()?.resize(TerminalSize { rows, cols })
    }

    fn control(&self) -> Result<&dyn ExecControl, ExecError> {
        self.control.as_deref().ok_or_else(|| {
            ExecError::Agent("this provider cannot control a running command".into())
        })
    }

    /// The writer of the command's stdin, if the request asked for
    /// [`ExecRequest::stream_stdin`] and it was not taken yet. Stdin closes
    /// when it is dropped (or when this stream is, while it is still here).
    pub fn take_stdin(&mut self) -> Option<ExecStdin> {
        self.stdin.take()
    }

    /// The next event; `None` once the stream ended (after `Exited`, or if
    /// the sandbox went away, in which case no `Exited` came).
    pub async fn next(&mut self) -> Option<ExecEvent> {
        self.events.recv().await
    }

    /// Collects the rest of the stream into an [`ExecOutput`], keeping at
    /// most [`DEFAULT_MAX_OUTPUT`] bytes (see
    /// [`collect_limited`](Self::collect_limited)).
    pub async fn collect(self) -> Result<ExecOutput, ExecError> {
        self.collect_limited(DEFAULT_MAX_OUTPUT).await
    }

    /// Collects the rest of the stream into an [`ExecOutput`].
    ///
    /// When stdout and stderr together pass `limit` bytes this stops with
    /// [`ExecError::OutputTooLarge`], which drops the stream and so kills the
    /// command. Fails with [`ExecError::Agent`] if the stream ended without
    /// an exit status (the agent or the sandbox went away).
    pub async fn collect_limited(mut self, limit: u64) -> Result<ExecOutput, ExecError> {
        // Stdin still held here closes now, or a command reading it would
        // wait forever.
        self.stdin = None;
        let start = std::time::Instant::now();
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        let mut total = 0u64;
        while let Some(event) = self.next().await {
            let (out, bytes) = match event {
                ExecEvent::Stdout(b) => (&mut stdout, b),
                ExecEvent::Stderr(b) => (&mut stderr, b),
                ExecEvent::Exited(status) => {
                    let duration_ms =
                        u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
                    return Ok(ExecOutput {
                        status,
                        stdout,
                        stderr,
                        duration_ms,
                    });
                }
            };
            total += bytes.len() as u64;
            if total > limit {
                return Err(ExecError::OutputTooLarge { limit });
            }
            out.extend_from_slice(&bytes);
        }
        Err(ExecError::Agent(
            "the agent connection closed before the command ended".into(),
        ))
    }
}

/// Feeds a running command's stdin (see [`ExecRequest::stream_stdin`]).
///
/// Writes wait while the command is not reading (the channel to the
/// provider is bounded), so a producer faster than the command is slowed
/// down rather than buffered. Dropping it, or [`close`](Self::close),
/// closes stdin: the command reads end-of-file after what was written.
#[derive(Debug)]
pub struct ExecStdin {
    chunks: mpsc::Sender<Vec<u8>>,
}

impl ExecStdin {
    /// Wraps the sending end of a provider's stdin channel; the provider
    /// delivers each chunk in order and closes the command's stdin when the
    /// channel closes.
    pub fn new(chunks: mpsc::Sender<Vec<u8>>) -> Self {
        Self { chunks }
    }

    /// Sends `bytes` to the command's stdin, waiting while it is not
    /// reading. Fails once the command exited or closed its stdin.
    pub async fn write(&self, bytes: impl Into<Vec<u8>>) -> Result<(), StdinClosed> {
        let bytes = bytes.into();
        if bytes.is_empty() {
            return Ok(());
        }
        self.chunks.send(bytes).await.map_err(|_| StdinClosed)
    }

    /// Closes stdin (the same as dropping it).
    pub fn close(self) {}
}

mod opt_duration_ms {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&(d.as_millis() as u64)),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        Ok(Option::<u64>::deserialize(d)?.map(Duration::from_millis))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_codes() {
        assert_eq!(ExitStatus::Code(3).shell_code(), 3);
        assert_eq!(ExitStatus::Signal(9).shell_code(), 137);
        assert_eq!(ExitStatus::TimedOut.shell_code(), 124);
        let not_found = ExitStatus::NotStarted(SpawnErrorKind::NotFound);
        assert_eq!(not_found.shell_code(), 127);
        assert!(!not_found.success());
        assert_eq!(
            not_found.to_string(),
            "not started (command not found, exit code 127)"
        );
        assert_eq!(
            ExitStatus::NotStarted(SpawnErrorKind::ExecFormat).shell_code(),
            126
        );
        let json = serde_json::to_string(&not_found).unwrap();
        assert_eq!(json, r#"{"not_started":"not_found"}"#);
        assert!(ExitStatus::Code(0).success());
        assert!(!ExitStatus::Signal(0).success());
    }

    #[test]
    fn request_from_str_is_a_shell_command_and_round_trips() {
        let r: ExecRequest = "echo hi".into();
        assert_eq!(r.command, Command::Shell("echo hi".into()));
        let r = ExecRequest::argv(["ls", "-l"])
            .env("A", "1")
            .timeout(Duration::from_secs(2));
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains("\"timeout\":2000"), "{json}");
        assert!(!json.contains("max_output"), "{json}");
        assert_eq!(serde_json::from_str::<ExecRequest>(&json).unwrap(), r);
        let r = r.max_output(5);
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<ExecRequest>(&json).unwrap(), r);
        let r: ExecRequest = serde_json::from_str(r#"{"command":{"shell":"cat"}}"#).unwrap();
        assert!(!r.stream_stdin);
        assert!(ExecRequest::shell("cat").stream_stdin().stream_stdin);
    }

    #[tokio::test]
    async fn stream_collects_until_exit() {
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            tx.send(ExecEvent::Stdout(b"a".to_vec())).await.unwrap();
            tx.send(ExecEvent::Stderr(b"e".to_vec())).await.unwrap();
            tx.send(ExecEvent::Stdout(b"b".to_vec())).await.unwrap();
            tx.send(ExecEvent::Exited(ExitStatus::Code(2)))
                .await
                .unwrap();
        });
        let out = ExecStream::new(rx).collect().await.unwrap();
        assert_eq!(out.stdout, b"ab");
        assert_eq!(out.stderr, b"e");
        assert_eq!(out.exit_code(), 2);

        let (tx, rx) = mpsc::channel(1);
        drop(tx);
        assert!(matches!(
            ExecStream::new(rx).collect().await,
            Err(ExecError::Agent(_))
        ));
    }

    #[tokio::test]
    async fn collecting_past_the_cap_is_output_too_large_and_drops_the_stream() {
        let (tx, rx) = mpsc::channel(4);
        let producer = tokio::spawn(async move {
            for _ in 0..3 {
                if tx.send(ExecEvent::Stderr(vec![0; 4])).await.is_err() {
                    break;
                }
            }
            // The provider's signal to kill the command.
            tx.closed().await;
        });
        let err = ExecStream::new(rx).collect_limited(10).await.unwrap_err();
        assert!(
            matches!(err, ExecError::OutputTooLarge { limit: 10 }),
            "{err}"
        );
        assert!(err.to_string().contains("exec_stream"), "{err}");
        producer.await.unwrap();
    }

    #[tokio::test]
    async fn stdin_is_handed_out_once_and_closes_when_dropped() {
        let (_events_tx, events) = mpsc::channel(1);
        let (stdin_tx, mut stdin_rx) = mpsc::channel(2);
        let mut stream = ExecStream::with_stdin(events, ExecStdin::new(stdin_tx));
        let stdin = stream.take_stdin().expect("stdin");
        assert!(stream.take_stdin().is_none());
        stdin.write(b"a".to_vec()).await.unwrap();
        stdin.write(Vec::new()).await.unwrap();
        stdin.write(&b"b"[..]).await.unwrap();
        stdin.close();
        assert_eq!(stdin_rx.recv().await, Some(b"a".to_vec()));
        assert_eq!(stdin_rx.recv().await, Some(b"b".to_vec()));
        assert_eq!(stdin_rx.recv().await, None, "closed after the last chunk");

        // The provider stopped reading: writes fail instead of hanging.
        let (stdin_tx, stdin_rx) = mpsc::channel(1);
        drop(stdin_rx);
        let stdin = ExecStdin::new(stdin_tx);
        assert_eq!(stdin.write(b"x".to_vec()).await, Err(StdinClosed));
    }

    #[tokio::test]
    async fn collecting_closes_stdin_left_in_the_stream() {
        let (events_tx, events) = mpsc::channel(1);
        let (stdin_tx, mut stdin_rx) = mpsc::channel::<Vec<u8>>(1);
        let stream = ExecStream::with_stdin(events, ExecStdin::new(stdin_tx));
        // A command that exits once its stdin closes.
        tokio::spawn(async move {
            assert_eq!(stdin_rx.recv().await, None);
            events_tx
                .send(ExecEvent::Exited(ExitStatus::Code(0)))
                .await
                .unwrap();
        });
        let out = stream.collect().await.unwrap();
        assert!(out.success());
    }
}
