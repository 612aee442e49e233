//! Running commands in a sandbox: what is asked ([`ExecRequest`]) and what
//! comes back, either all at once ([`ExecOutput`]) or as it is produced
//! ([`ExecStream`]).

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

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
    /// closed at once when `None`.
    #[serde(default)]
    pub stdin: Option<Vec<u8>>,
    /// Kill the command's whole process group after this long.
    #[serde(default, with = "opt_duration_ms")]
    pub timeout: Option<Duration>,
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
            timeout: None,
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

    /// Sets a timeout.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
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
}

impl ExitStatus {
    /// Whether it exited with code 0.
    pub fn success(self) -> bool {
        self == Self::Code(0)
    }

    /// The exit code a shell would report: the code, 128 + signal, or 124
    /// for a timeout (as `timeout(1)` does).
    pub fn shell_code(self) -> i32 {
        match self {
            Self::Code(c) => c,
            Self::Signal(s) => 128 + s,
            Self::TimedOut => 124,
        }
    }
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Code(c) => write!(f, "exit code {c}"),
            Self::Signal(s) => write!(f, "killed by signal {s}"),
            Self::TimedOut => f.write_str("timed out"),
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
/// output at the source (back-pressure), rather than buffering it. Dropping
/// the stream abandons the output; the command runs on until it ends or its
/// timeout kills it.
#[derive(Debug)]
pub struct ExecStream {
    events: mpsc::Receiver<ExecEvent>,
}

impl ExecStream {
    /// Wraps the receiving end of a provider's event channel.
    pub fn new(events: mpsc::Receiver<ExecEvent>) -> Self {
        Self { events }
    }

    /// The next event; `None` once the stream ended (after `Exited`, or if
    /// the sandbox went away, in which case no `Exited` came).
    pub async fn next(&mut self) -> Option<ExecEvent> {
        self.events.recv().await
    }

    /// Collects the rest of the stream into an [`ExecOutput`].
    ///
    /// Returns `None` if the stream ended without an exit status.
    pub async fn collect(mut self) -> Option<ExecOutput> {
        let start = std::time::Instant::now();
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        while let Some(event) = self.next().await {
            match event {
                ExecEvent::Stdout(b) => stdout.extend_from_slice(&b),
                ExecEvent::Stderr(b) => stderr.extend_from_slice(&b),
                ExecEvent::Exited(status) => {
                    let duration_ms = start.elapsed().as_millis() as u64;
                    return Some(ExecOutput {
                        status,
                        stdout,
                        stderr,
                        duration_ms,
                    });
                }
            }
        }
        None
    }
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
        assert_eq!(serde_json::from_str::<ExecRequest>(&json).unwrap(), r);
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
        assert_eq!(ExecStream::new(rx).collect().await, None);
    }
}
