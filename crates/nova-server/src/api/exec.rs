//! `/v1/sandboxes/{id}/exec`: run a command to completion, or stream it over
//! a WebSocket with stdin, signals and a PTY.
//!
//! The WebSocket protocol (`GET .../exec/stream`, upgraded):
//!
//! ```text
//! client -> text   {ExecBody as JSON}                 first message: what to run
//! server -> text   {"event":"started","exec_id":7}
//! server -> binary [1] ++ bytes                        stdout (the terminal, with a tty)
//! server -> binary [2] ++ bytes                        stderr
//! client -> binary bytes                               stdin (with "interactive": true)
//! client -> text   {"type":"stdin_eof"}                close stdin
//! client -> text   {"type":"signal","signal":15}       signal the command's process group
//! client -> text   {"type":"resize","rows":40,"cols":120}
//! server -> text   {"event":"exit", ...ExecExit}       then the server closes
//! server -> text   {"event":"error", ...Problem}       instead of started/exit; then close
//! ```
//!
//! Closing the WebSocket before the exit kills the command. Output keeps the
//! runtime's back-pressure: a client that stops reading stops the command's
//! output at its source.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::extract::ws::{
    Message, WebSocket, WebSocketUpgrade, rejection::WebSocketUpgradeRejection,
};
use axum::response::Response;
use nova_core::error::ExecError;
use nova_core::exec::{
    Command, ExecEvent, ExecInfo, ExecOutput, ExecRequest, ExecState, ExecStream, ExitStatus,
    TerminalSize,
};
use nova_core::id::SandboxId;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::api::{ApiJson, ApiPath};
use crate::daemon::Daemon;
use crate::problem::{Problem, ProblemCode, chain};

/// The first byte of a binary WebSocket frame carrying stdout.
pub const STDOUT_TAG: u8 = 1;
/// The first byte of a binary WebSocket frame carrying stderr.
pub const STDERR_TAG: u8 = 2;
/// How long a new WebSocket may take to send what to run.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A command to run. Give exactly one of `cmd` and `shell`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecBody {
    /// Program and arguments, looked up in `PATH`, no shell.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    /// A script run with `/bin/sh -c`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shell: Option<String>,
    /// Extra environment variables (over the sandbox's).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Working directory in the guest (default `/root`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// Text written to stdin, which is then closed (unless `interactive`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
    /// Kill the command's process group after this many milliseconds; it
    /// then ends with exit code 124.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1)]
    pub timeout_ms: Option<u64>,
    /// Most output (stdout and stderr together) a run to completion gathers,
    /// bytes (default 64 MiB); past it the command is killed and the call
    /// answers 413.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1)]
    pub max_output_bytes: Option<u64>,
    /// Run on a pseudo-terminal of this size (streamed exec only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tty: Option<TtySize>,
    /// Keep stdin open for the client's binary frames (streamed exec only).
    #[serde(default)]
    pub interactive: bool,
    /// Run as this user, as `docker exec -u` takes it: `USER[:GROUP]` or
    /// `UID[:GID]` (`root`, `0`, `app:staff`, `1000:1000`); names are
    /// looked up in the guest's `/etc/passwd` and `/etc/group`. Default: the
    /// template's user (its image's `User`, its Dockerfile's `USER`), else
    /// root. A user the guest does not know ends the command `not_started`
    /// (exit code 126).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = "1000:1000")]
    pub user: Option<String>,
}

/// A terminal size in character cells.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TtySize {
    /// Rows.
    #[schema(minimum = 1)]
    pub rows: u16,
    /// Columns.
    #[schema(minimum = 1)]
    pub cols: u16,
}

/// How a command ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ExitKind {
    /// It exited (see `code`).
    Exited,
    /// A signal ended it (see `signal`).
    Signaled,
    /// Its timeout expired; its process group was killed.
    TimedOut,
    /// It could not start (not found, not executable, bad cwd).
    NotStarted,
}

/// The end of a command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ExecExit {
    /// The exit code a shell would report: the code, 128 + signal, 124 on
    /// timeout, 127 / 126 when it could not start.
    pub exit_code: i32,
    /// How it ended.
    pub kind: ExitKind,
    /// The signal that ended it, with `signaled`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// Why it could not start, with `not_started`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl ExecExit {
    /// The wire form of `status`.
    pub fn new(status: ExitStatus, error: Option<String>) -> Self {
        let (kind, signal) = match status {
            ExitStatus::Code(_) => (ExitKind::Exited, None),
            ExitStatus::Signal(s) => (ExitKind::Signaled, Some(s)),
            ExitStatus::TimedOut => (ExitKind::TimedOut, None),
            ExitStatus::NotStarted(_) => (ExitKind::NotStarted, None),
        };
        Self {
            exit_code: status.shell_code(),
            kind,
            signal,
            error,
        }
    }
}

/// A finished command's output. Output is text with invalid UTF-8 replaced;
/// stream the command for its exact bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ExecResult {
    /// How it ended.
    #[serde(flatten)]
    pub exit: ExecExit,
    /// Its stdout.
    pub stdout: String,
    /// Its stderr.
    pub stderr: String,
    /// Wall time from request to exit, milliseconds.
    pub duration_ms: u64,
}

impl ExecResult {
    fn new(out: ExecOutput) -> Self {
        Self {
            exit: ExecExit::new(out.status, None),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            duration_ms: out.duration_ms,
        }
    }
}

/// A control message a streamed exec's client sends as a text frame.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientControl {
    /// Close the command's stdin.
    StdinEof,
    /// Send this signal number to the command's process group.
    Signal {
        /// The signal number (1..=64).
        signal: i32,
    },
    /// Resize the command's terminal.
    Resize {
        /// Rows.
        rows: u16,
        /// Columns.
        cols: u16,
    },
}

/// A message the server sends a streamed exec's client as a text frame.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum ServerEvent {
    /// The command started (or a stream attached to it); `exec_id` names
    /// it for `GET .../execs/{exec_id}` later.
    Started {
        /// The command's id in the sandbox, where the backend keeps one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        exec_id: Option<u64>,
    },
    /// The command ended; the server closes the socket next.
    Exit(ExecExit),
    /// The command could not be run; the server closes the socket next.
    Error(Problem),
}

impl ExecBody {
    /// The runtime request this body asks for, with the sandbox-wide `env`
    /// under the body's own.
    pub fn to_request(&self, env: &BTreeMap<String, String>) -> Result<ExecRequest, Problem> {
        let command = match (&self.cmd, &self.shell) {
            (Some(argv), None) if !argv.is_empty() => Command::Argv(argv.clone()),
            (Some(_), None) => {
                return Err(Problem::invalid_request(
                    "cmd is empty: give the program and its arguments",
                ));
            }
            (None, Some(script)) => Command::Shell(script.clone()),
            (Some(_), Some(_)) => {
                return Err(Problem::invalid_request(
                    "give either cmd (an argv) or shell (a script), not both",
                ));
            }
            (None, None) => {
                return Err(Problem::invalid_request(
                    "nothing to run: give cmd (an argv) or shell (a script)",
                ));
            }
        };
        if self.timeout_ms == Some(0) || self.max_output_bytes == Some(0) {
            return Err(Problem::invalid_request(
                "timeout_ms and max_output_bytes must be at least 1",
            ));
        }
        if let Some(tty) = self.tty
            && (tty.rows == 0 || tty.cols == 0)
        {
            return Err(Problem::invalid_request(
                "tty rows and cols must be at least 1",
            ));
        }
        let mut merged = env.clone();
        merged.extend(self.env.clone());
        Ok(ExecRequest {
            command,
            env: merged,
            cwd: self.cwd.clone(),
            stdin: self.stdin.clone().map(String::into_bytes),
            stream_stdin: self.interactive,
            timeout: self.timeout_ms.map(Duration::from_millis),
            max_output: self.max_output_bytes,
            pty: self.tty.map(|t| TerminalSize {
                rows: t.rows,
                cols: t.cols,
            }),
            user: self.user.clone(),
        })
    }
}

/// Runs a command to completion and returns its output. A command that
/// cannot start is not an error: it ends `not_started` with exit code 127 or
/// 126, as in a shell.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/exec", tag = "exec",
    operation_id = "execute_command",
    params(("id" = String, Path, description = "Sandbox id")),
    request_body = ExecBody,
    responses(
        (status = 200, description = "The command ended", body = ExecResult),
        (status = "4XX", description = "Bad command, no such sandbox, not running, output too large", body = Problem, content_type = "application/problem+json"),
        (status = "5XX", description = "The guest agent failed", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn execute_command(
    State(daemon): State<Arc<Daemon>>,
    ApiPath(id): ApiPath<String>,
    ApiJson(body): ApiJson<ExecBody>,
) -> Result<axum::Json<ExecResult>, Problem> {
    if body.tty.is_some() || body.interactive {
        return Err(Problem::invalid_request(
            "tty and interactive need a stream: use GET /v1/sandboxes/{id}/exec/stream (WebSocket)",
        ));
    }
    let sid = daemon.known(&id).await?;
    let request = body.to_request(&daemon.sandbox_env(&sid))?;
    let result = daemon.hypervisor().execute_command(&sid, request).await;
    daemon.metrics().exec_done(result.is_ok());
    match result {
        Ok(out) => Ok(axum::Json(ExecResult::new(out))),
        Err(ExecError::Spawn(e)) => Ok(axum::Json(ExecResult {
            exit: ExecExit::new(e.exit_status(), Some(e.message.clone())),
            stdout: String::new(),
            stderr: e.message,
            duration_ms: 0,
        })),
        Err(e) => Err(e.into()),
    }
}

/// Runs a command streamed over a WebSocket (see the module docs for the
/// frames): output as it comes, stdin, signals, terminal resizes.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/exec/stream", tag = "exec",
    operation_id = "exec_stream",
    params(("id" = String, Path, description = "Sandbox id")),
    responses(
        (status = 101, description = "Switching to the WebSocket protocol"),
        (status = "4XX", description = "Not a WebSocket upgrade, or no such sandbox", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn exec_stream(
    State(daemon): State<Arc<Daemon>>,
    ApiPath(id): ApiPath<String>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, Problem> {
    let sid = daemon.known(&id).await?;
    let upgrade = upgrade.map_err(not_a_websocket)?;
    Ok(upgrade.on_upgrade(move |socket| run_socket(daemon, sid, socket)))
}

/// The problem of a request to a WebSocket endpoint that is no upgrade.
fn not_a_websocket(e: WebSocketUpgradeRejection) -> Problem {
    Problem::invalid_request(format!(
        "{e}: this endpoint speaks WebSocket (send Connection: upgrade, Upgrade: websocket)"
    ))
}

async fn send_event(socket: &mut WebSocket, event: &ServerEvent) -> bool {
    match serde_json::to_string(event) {
        Ok(text) => socket.send(Message::Text(text.into())).await.is_ok(),
        Err(_) => false,
    }
}

async fn fail(mut socket: WebSocket, problem: Problem) {
    let _ = send_event(&mut socket, &ServerEvent::Error(problem)).await;
    let _ = socket.send(Message::Close(None)).await;
}

/// Drives one streamed exec until the command ends or the client leaves.
async fn run_socket(daemon: Arc<Daemon>, id: SandboxId, mut socket: WebSocket) {
    let body = match tokio::time::timeout(START_TIMEOUT, socket.recv()).await {
        Ok(Some(Ok(Message::Text(text)))) => match serde_json::from_str::<ExecBody>(&text) {
            Ok(body) => body,
            Err(e) => {
                return fail(
                    socket,
                    Problem::invalid_request(format!("bad exec body: {e}")),
                )
                .await;
            }
        },
        Ok(Some(Ok(_))) => {
            return fail(
                socket,
                Problem::invalid_request("the first message must be a text frame: the exec body"),
            )
            .await;
        }
        Ok(_) => return,
        Err(_) => {
            return fail(
                socket,
                Problem::invalid_request("no exec body within 30 s of the upgrade"),
            )
            .await;
        }
    };
    let request = match body.to_request(&daemon.sandbox_env(&id)) {
        Ok(request) => request,
        Err(problem) => return fail(socket, problem).await,
    };
    let stream = match daemon.hypervisor().exec_stream(&id, request).await {
        Ok(stream) => stream,
        Err(ExecError::Spawn(e)) => {
            daemon.metrics().exec_done(true);
            let exit = ExecExit::new(e.exit_status(), Some(e.message.clone()));
            let _ = send_event(&mut socket, &ServerEvent::Started { exec_id: None }).await;
            let _ = send_event(&mut socket, &ServerEvent::Exit(exit)).await;
            let _ = socket.send(Message::Close(None)).await;
            return;
        }
        Err(e) => {
            daemon.metrics().exec_done(false);
            return fail(socket, e.into()).await;
        }
    };
    pump(daemon, stream, socket).await;
}

/// Forwards a command's output to the socket and the socket's stdin,
/// signals and resizes to the command, until it ends or the client leaves.
async fn pump(daemon: Arc<Daemon>, mut stream: ExecStream, mut socket: WebSocket) {
    let started = ServerEvent::Started {
        exec_id: stream.exec_id(),
    };
    if !send_event(&mut socket, &started).await {
        return;
    }
    // Stdin goes through its own task, so a command that is slow to read its
    // input never holds up its output (or the client's signals).
    let (stdin_tx, mut stdin_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
    let mut stdin_tx = Some(stdin_tx);
    if let Some(stdin) = stream.take_stdin() {
        tokio::spawn(async move {
            while let Some(chunk) = stdin_rx.recv().await {
                if stdin.write(chunk).await.is_err() {
                    break;
                }
            }
        });
    } else {
        stdin_tx = None;
    }
    let mut pending: Option<Vec<u8>> = None;
    loop {
        // A clone to reserve on, so the branches below may drop `stdin_tx`
        // (end of stdin) while a reservation is being waited for.
        let stdin_for_send = stdin_tx.clone();
        tokio::select! {
            event = stream.next() => match event {
                Some(ExecEvent::Stdout(bytes)) => {
                    if !send_output(&mut socket, STDOUT_TAG, bytes).await { return; }
                }
                Some(ExecEvent::Stderr(bytes)) => {
                    if !send_output(&mut socket, STDERR_TAG, bytes).await { return; }
                }
                Some(ExecEvent::Exited(status)) => {
                    daemon.metrics().exec_done(true);
                    let _ = send_event(&mut socket, &ServerEvent::Exit(ExecExit::new(status, None))).await;
                    let _ = socket.send(Message::Close(None)).await;
                    return;
                }
                None => {
                    daemon.metrics().exec_done(false);
                    let problem = Problem::new(ProblemCode::AgentError,
                        "the guest agent connection ended before the command did");
                    return fail(socket, problem).await;
                }
            },
            permit = async {
                match &stdin_for_send {
                    Some(tx) => tx.reserve().await.ok(),
                    None => None,
                }
            }, if pending.is_some() => {
                match permit {
                    Some(permit) => permit.send(pending.take().unwrap_or_default()),
                    None => { pending = None; stdin_tx = None; }
                }
            }
            message = socket.recv(), if pending.is_none() => match message {
                Some(Ok(Message::Binary(bytes))) => {
                    if stdin_tx.is_some() { pending = Some(bytes.to_vec()); }
                }
                Some(Ok(Message::Text(text))) => {
                    match serde_json::from_str::<ClientControl>(&text) {
                        Ok(ClientControl::StdinEof) => stdin_tx = None,
                        Ok(ClientControl::Signal { signal }) => {
                            if !(1..=64).contains(&signal) {
                                let p = Problem::invalid_request(format!("signal {signal} is out of range: use 1..=64"));
                                return fail(socket, p).await;
                            }
                            if let Err(e) = stream.signal(signal) {
                                tracing::debug!(error = %chain(&e), "signal not delivered");
                            }
                        }
                        Ok(ClientControl::Resize { rows, cols }) => {
                            if let Err(e) = stream.resize(rows.max(1), cols.max(1)) {
                                tracing::debug!(error = %chain(&e), "resize not delivered");
                            }
                        }
                        Err(e) => {
                            let p = Problem::invalid_request(format!("bad control message: {e}"));
                            return fail(socket, p).await;
                        }
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                    // The client left: dropping the stream kills the command.
                    return;
                }
                Some(Ok(_)) => {}
            },
        }
    }
}

async fn send_output(socket: &mut WebSocket, tag: u8, bytes: Vec<u8>) -> bool {
    let mut frame = Vec::with_capacity(bytes.len() + 1);
    frame.push(tag);
    frame.extend_from_slice(&bytes);
    socket.send(Message::Binary(frame.into())).await.is_ok()
}

/// A command the sandbox knows: running (whoever started it, even a caller
/// or a daemon that is gone) or one of the last that ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ExecInfoView {
    /// Its id in the sandbox.
    pub exec_id: u64,
    /// Its main process id in the guest.
    pub pid: u32,
    /// What it runs, as an argv (a shell script as `/bin/sh -c SCRIPT`).
    pub command: Vec<String>,
    /// Whether it still runs.
    pub running: bool,
    /// How it ended, once it has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit: Option<ExecExit>,
    /// Whether a stream follows it now.
    pub attached: bool,
    /// Output held for the next attach, bytes.
    pub buffered_bytes: u64,
}

impl From<ExecInfo> for ExecInfoView {
    fn from(info: ExecInfo) -> Self {
        let command = match info.command {
            Command::Argv(argv) => argv,
            Command::Shell(script) => vec!["/bin/sh".into(), "-c".into(), script],
        };
        let (running, exit) = match info.state {
            ExecState::Running => (true, None),
            ExecState::Exited(status) => (false, Some(ExecExit::new(status, None))),
        };
        Self {
            exec_id: info.exec_id,
            pid: info.pid,
            command,
            running,
            exit,
            attached: info.attached,
            buffered_bytes: info.buffered_bytes,
        }
    }
}

/// The commands a sandbox knows: running ones and the last that ended.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/execs", tag = "exec",
    operation_id = "list_execs",
    params(("id" = String, Path, description = "Sandbox id")),
    responses(
        (status = 200, description = "The commands", body = [ExecInfoView]),
        (status = "4XX", description = "No such sandbox, or not running", body = Problem, content_type = "application/problem+json"),
        (status = "5XX", description = "The guest agent failed, or the backend keeps no commands", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn list_execs(
    State(daemon): State<Arc<Daemon>>,
    ApiPath(id): ApiPath<String>,
) -> Result<axum::Json<Vec<ExecInfoView>>, Problem> {
    let sid = daemon.known(&id).await?;
    let execs = daemon.hypervisor().list_execs(&sid).await?;
    Ok(axum::Json(execs.into_iter().map(Into::into).collect()))
}

/// One command: whether it runs, and its exit once it ended (also for a
/// command started before a daemon restart).
#[utoipa::path(get, path = "/v1/sandboxes/{id}/execs/{exec_id}", tag = "exec",
    operation_id = "get_exec",
    params(("id" = String, Path, description = "Sandbox id"), ("exec_id" = u64, Path, description = "Exec id")),
    responses(
        (status = 200, description = "The command", body = ExecInfoView),
        (status = "4XX", description = "No such sandbox or exec", body = Problem, content_type = "application/problem+json"),
        (status = "5XX", description = "The guest agent failed", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn get_exec(
    State(daemon): State<Arc<Daemon>>,
    ApiPath((id, exec_id)): ApiPath<(String, u64)>,
) -> Result<axum::Json<ExecInfoView>, Problem> {
    let sid = daemon.known(&id).await?;
    let execs = daemon.hypervisor().list_execs(&sid).await?;
    execs
        .into_iter()
        .find(|e| e.exec_id == exec_id)
        .map(|e| axum::Json(e.into()))
        .ok_or_else(|| ExecError::NoSuchExec { exec_id }.into())
}

/// Attaches a WebSocket to a command (same frames as `exec/stream`, without
/// the first message): the output it holds, then live output, then its
/// exit. Stdin is closed for an attached command.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/execs/{exec_id}/stream", tag = "exec",
    operation_id = "attach_exec",
    params(("id" = String, Path, description = "Sandbox id"), ("exec_id" = u64, Path, description = "Exec id")),
    responses(
        (status = 101, description = "Switching to the WebSocket protocol"),
        (status = "4XX", description = "Not a WebSocket upgrade, no such sandbox or exec, or already attached", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn attach_exec(
    State(daemon): State<Arc<Daemon>>,
    ApiPath((id, exec_id)): ApiPath<(String, u64)>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, Problem> {
    let sid = daemon.known(&id).await?;
    let upgrade = upgrade.map_err(not_a_websocket)?;
    let stream = daemon.hypervisor().attach_exec(&sid, exec_id).await?;
    Ok(upgrade.on_upgrade(move |socket| pump(daemon, stream, socket)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exactly_one_of_cmd_and_shell() {
        let env = BTreeMap::new();
        let mut body = ExecBody::default();
        assert!(body.to_request(&env).is_err());
        body.cmd = Some(vec![]);
        assert!(body.to_request(&env).is_err());
        body.cmd = Some(vec!["ls".into()]);
        body.shell = Some("ls".into());
        assert!(body.to_request(&env).is_err());
        body.shell = None;
        assert_eq!(
            body.to_request(&env).unwrap().command,
            Command::Argv(vec!["ls".into()])
        );
    }

    #[test]
    fn the_body_env_overrides_the_sandbox_env() {
        let env = BTreeMap::from([("A".into(), "1".into()), ("B".into(), "1".into())]);
        let body = ExecBody {
            shell: Some("env".into()),
            env: BTreeMap::from([("B".into(), "2".into())]),
            ..ExecBody::default()
        };
        let request = body.to_request(&env).unwrap();
        assert_eq!(request.env["A"], "1");
        assert_eq!(request.env["B"], "2");
    }

    #[test]
    fn exits_carry_the_shell_code() {
        let e = ExecExit::new(ExitStatus::Signal(9), None);
        assert_eq!(
            (e.exit_code, e.kind, e.signal),
            (137, ExitKind::Signaled, Some(9))
        );
        let json =
            serde_json::to_value(ServerEvent::Exit(ExecExit::new(ExitStatus::Code(3), None)))
                .unwrap();
        assert_eq!(json["event"], "exit");
        assert_eq!(json["exit_code"], 3);
        let c: ClientControl =
            serde_json::from_str(r#"{"type":"resize","rows":2,"cols":3}"#).unwrap();
        assert_eq!(c, ClientControl::Resize { rows: 2, cols: 3 });
    }
}
