//! Command execution types: what to run ([`ExecSpec`]), how it ended
//! ([`ExecResult`]), and why it could not start ([`SpawnErrorKind`]).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::user::ExecUser;

/// What program to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExecCommand {
    /// Run `argv[0]` (looked up in `PATH`) with the given arguments.
    Argv(Vec<String>),
    /// Run a shell command line with `/bin/sh -c`.
    Shell(String),
}

/// Terminal size for a command run on a pseudo-terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PtySize {
    /// Rows.
    pub rows: u16,
    /// Columns.
    pub cols: u16,
}

impl Default for PtySize {
    fn default() -> Self {
        Self { rows: 24, cols: 80 }
    }
}

/// A command to run in the guest.
///
/// Each command runs in its own process group (its own session with a PTY);
/// a timeout or [`crate::client::ExecHandle::kill`] ends the whole group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecSpec {
    /// The program.
    pub command: ExecCommand,
    /// Extra environment variables, applied over the agent's defaults
    /// (`PATH`, `HOME`, ...).
    pub env: Vec<(String, String)>,
    /// Working directory; the agent's own (`/` as PID 1) when `None`.
    pub cwd: Option<String>,
    /// Whether stdin is a pipe fed by the client (`true`) or closed (`false`).
    pub stdin: bool,
    /// Kill the process group with `SIGKILL` after this long, in milliseconds.
    pub timeout_ms: Option<u64>,
    /// Run on a pseudo-terminal of this size (stdout and stderr are then
    /// one stream, delivered as stdout).
    pub pty: Option<PtySize>,
    /// Run as this user (see [`ExecUser`]); as the agent (root) when `None`.
    /// The agent resolves names in the guest, switches groups, group and
    /// user in the child before `exec`, and refuses an unknown user with
    /// [`SpawnErrorKind::UnknownUser`].
    pub user: Option<ExecUser>,
}

impl ExecSpec {
    /// Runs `argv` directly.
    pub fn argv<I, S>(argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self::with_command(ExecCommand::Argv(
            argv.into_iter().map(Into::into).collect(),
        ))
    }

    /// Runs a shell command line with `/bin/sh -c`.
    pub fn shell(line: impl Into<String>) -> Self {
        Self::with_command(ExecCommand::Shell(line.into()))
    }

    fn with_command(command: ExecCommand) -> Self {
        Self {
            command,
            env: Vec::new(),
            cwd: None,
            stdin: false,
            timeout_ms: None,
            pty: None,
            user: None,
        }
    }

    /// Adds an environment variable.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Sets the working directory.
    pub fn cwd(mut self, cwd: impl Into<String>) -> Self {
        self.cwd = Some(cwd.into());
        self
    }

    /// Makes stdin a pipe the caller writes to (see
    /// [`crate::client::ExecHandle::take_stdin`]).
    pub fn stdin_piped(mut self) -> Self {
        self.stdin = true;
        self
    }

    /// Kills the command's process group after `timeout`.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout_ms = Some(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX));
        self
    }

    /// Runs the command on a pseudo-terminal.
    pub fn pty(mut self, size: PtySize) -> Self {
        self.pty = Some(size);
        self
    }

    /// Runs the command as `user`.
    pub fn user(mut self, user: ExecUser) -> Self {
        self.user = Some(user);
        self
    }
}

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitStatus {
    /// It exited with this code.
    Exited(i32),
    /// A signal with this number terminated it.
    Signaled(i32),
}

impl ExitStatus {
    /// The exit code, if it exited normally.
    pub fn code(self) -> Option<i32> {
        match self {
            Self::Exited(code) => Some(code),
            Self::Signaled(_) => None,
        }
    }

    /// The terminating signal, if a signal ended it.
    pub fn signal(self) -> Option<i32> {
        match self {
            Self::Exited(_) => None,
            Self::Signaled(signal) => Some(signal),
        }
    }

    /// Whether it exited with code 0.
    pub fn success(self) -> bool {
        self == Self::Exited(0)
    }
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Exited(code) => write!(f, "exit code {code}"),
            Self::Signaled(signal) => write!(f, "killed by signal {signal}"),
        }
    }
}

/// The final report of a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecResult {
    /// How the command's main process ended.
    pub status: ExitStatus,
    /// Whether the agent killed it because its timeout ran out.
    pub timed_out: bool,
    /// Time from spawn to exit, measured in the guest, in microseconds.
    pub duration_us: u64,
}

/// Where a command the agent keeps in its table stands
/// ([`crate::Request::ListExecs`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExecState {
    /// Its main process runs (or its output is still being read).
    Running,
    /// It ended.
    Ended(ExecResult),
}

/// One command in the agent's table: every command started on any host
/// connection, running or among the last finished ones.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecInfo {
    /// Its id, unique for the agent's lifetime (also in
    /// [`crate::AgentMessage::Started`]).
    pub exec_id: u64,
    /// Its main process id in the guest.
    pub pid: u32,
    /// What it runs.
    pub command: ExecCommand,
    /// Running or ended.
    pub state: ExecState,
    /// Whether a host connection streams its output now.
    pub attached: bool,
    /// Output bytes the agent holds for the next host that attaches (at
    /// most [`crate::DETACHED_OUTPUT_LIMIT`] while it runs).
    pub buffered_bytes: u64,
}

/// Why a command could not start, as the agent diagnosed it.
///
/// Travels inside [`crate::RemoteErrorKind::Spawn`]; the error's message names
/// what is missing (the program, its interpreter, the working directory).
/// [`SpawnErrorKind::shell_code`] maps each kind onto the exit status a shell
/// (and `docker exec`) reports for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SpawnErrorKind {
    /// The program does not exist: not found in `PATH`, or no file at the
    /// path given.
    NotFound,
    /// The program exists but cannot be executed: no execute permission, a
    /// directory, a file on a `noexec` mount.
    NotExecutable,
    /// The program's interpreter (its `#!` line, or the ELF interpreter of a
    /// dynamically linked binary) is missing or cannot be executed.
    BadInterpreter,
    /// The kernel does not recognize the file as something it can execute
    /// (no `#!` line and not an ELF binary, or an ELF binary for another
    /// architecture).
    ExecFormat,
    /// The working directory does not exist.
    CwdNotFound,
    /// The working directory exists but cannot be used (not a directory,
    /// permission denied).
    CwdUnusable,
    /// Anything else that stopped `fork`/`exec` (out of memory, too many
    /// processes, argument list too long).
    Other,
    /// The user or group to run as ([`ExecSpec::user`]) is not in the
    /// guest's `/etc/passwd` / `/etc/group`.
    UnknownUser,
    /// The agent could not switch to the user ([`ExecSpec::user`]):
    /// `setgroups`, `setgid` or `setuid` failed (an agent that is not root
    /// can only run commands as itself).
    SwitchUser,
}

impl SpawnErrorKind {
    /// The exit status a shell reports for a command that failed this way:
    /// 127 when something named does not exist (the program, the working
    /// directory), 126 when it exists but cannot be run, and for a user
    /// that cannot be had (as `docker exec -u` reports it).
    pub fn shell_code(self) -> i32 {
        match self {
            Self::NotFound | Self::CwdNotFound => 127,
            Self::NotExecutable
            | Self::BadInterpreter
            | Self::ExecFormat
            | Self::CwdUnusable
            | Self::Other
            | Self::UnknownUser
            | Self::SwitchUser => 126,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spawn_failures_map_to_the_shell_codes() {
        assert_eq!(SpawnErrorKind::NotFound.shell_code(), 127);
        assert_eq!(SpawnErrorKind::CwdNotFound.shell_code(), 127);
        for kind in [
            SpawnErrorKind::NotExecutable,
            SpawnErrorKind::BadInterpreter,
            SpawnErrorKind::ExecFormat,
            SpawnErrorKind::CwdUnusable,
            SpawnErrorKind::Other,
            SpawnErrorKind::UnknownUser,
            SpawnErrorKind::SwitchUser,
        ] {
            assert_eq!(kind.shell_code(), 126, "{kind:?}");
        }
    }
}
