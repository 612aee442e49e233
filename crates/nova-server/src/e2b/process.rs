//! envd's `process.Process` service over the daemon's exec streams.
//!
//! E2B's processes outlive the call that started them: a client may drop the
//! `Start` stream and later `Connect` to the pid, signal it or write its
//! stdin. A NovaSandbox [`ExecStream`] kills its command when dropped, so
//! each process started here is owned by a pump task that holds the stream
//! until the command exits:
//!
//! ```text
//! Start ──> Daemon's hypervisor.exec_stream ──> pump task (owns ExecStream)
//!                                                 │ events ──> the subscriber (Start or Connect stream)
//! SendSignal / Update ──> control channel ──────> │ (output with no subscriber is dropped)
//! SendInput / CloseStdin ──> stdin task ──> ExecStdin
//! ```
//!
//! Processes are named by their guest pid (looked up from the exec id with
//! `list_execs`). A command the table does not hold (started through
//! `/v1/.../exec`, or before a daemon restart) is adopted with `attach_exec`
//! on `Connect` or `SendSignal`. A process outlives its `Start` stream (a
//! client that hangs up or times out leaves it running, as envd does; kill
//! it with `SendSignal`). One subscriber at a time: a second
//! `Connect` takes the output over, and the earlier stream ends with an
//! error saying so.
//!
//! **User.** E2B's SDKs name the user a process runs as in a Basic
//! `Authorization` header (`user:`). `e2b_user` maps it: `root` runs as
//! root (uid 0), `user` (the SDKs' default user) as the template's default
//! user (its image's `User`; root for a template without one), any other
//! name as that user of the guest (an unknown one fails the call, naming
//! it). No header: the template's default.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::HeaderMap;
use axum::response::Response;
use bytes::Bytes;
use nova_core::error::ExecError;
use nova_core::exec::{
    Command, ExecEvent, ExecInfo, ExecRequest, ExecState, ExecStream, ExitStatus, TerminalSize,
};
use nova_core::id::SandboxId;
use tokio::sync::{mpsc, oneshot};

use crate::daemon::Daemon;
use crate::e2b::connect::{self, Code, Codec, ConnectError, end_frame, message_frame};
use crate::e2b::wire::{
    B64, DataEvent, Empty, EndEvent, EventResponse, ListResponse, ProcessConfig, ProcessEvent,
    ProcessInfo, ProcessSelector, SelectRequest, SendInputRequest, SendSignalRequest, StartRequest,
    UpdateRequest,
};

/// Events buffered for a subscriber before the command's output waits.
const SUBSCRIBER_BUFFER: usize = 64;
/// Keepalive interval when the client names none.
const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(50);

/// What the pump task is asked to do.
enum Control {
    Signal(i32, oneshot::Sender<Result<(), ExecError>>),
    Resize(TerminalSize, oneshot::Sender<Result<(), ExecError>>),
    Subscribe(mpsc::Sender<ProcessEvent>),
}

/// A process the table holds.
#[derive(Debug)]
struct Proc {
    pid: u32,
    tag: Option<String>,
    config: ProcessConfig,
    pty: bool,
    control: mpsc::Sender<Control>,
    stdin: Mutex<Option<mpsc::Sender<Vec<u8>>>>,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Signal(..) => "Signal",
            Self::Resize(..) => "Resize",
            Self::Subscribe(..) => "Subscribe",
        })
    }
}

/// The processes started or adopted through the E2B API, per sandbox.
#[derive(Debug, Default)]
pub struct Processes {
    table: Mutex<HashMap<SandboxId, HashMap<u32, Arc<Proc>>>>,
    /// Sandboxes seen without bash: their bash command lines go straight
    /// to `/bin/sh` (saves a failed spawn per command).
    no_bash: Mutex<HashSet<SandboxId>>,
}

impl Processes {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SandboxId, HashMap<u32, Arc<Proc>>>> {
        // Map inserts and removes only: a poisoned lock is still whole.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn find(&self, id: &SandboxId, selector: &ProcessSelector) -> Option<Arc<Proc>> {
        let table = self.lock();
        let procs = table.get(id)?;
        match (selector.pid, &selector.tag) {
            (Some(pid), _) => procs.get(&pid).cloned(),
            (None, Some(tag)) => procs
                .values()
                .find(|p| p.tag.as_ref() == Some(tag))
                .cloned(),
            (None, None) => None,
        }
    }

    fn insert(&self, id: &SandboxId, proc: Arc<Proc>) {
        self.lock()
            .entry(id.clone())
            .or_default()
            .insert(proc.pid, proc);
    }

    fn remove(&self, id: &SandboxId, pid: u32) {
        let mut table = self.lock();
        if let Some(procs) = table.get_mut(id) {
            procs.remove(&pid);
            if procs.is_empty() {
                table.remove(id);
            }
        }
    }

    fn of(&self, id: &SandboxId) -> Vec<Arc<Proc>> {
        self.lock()
            .get(id)
            .map(|p| p.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Forgets every process of `id` (the sandbox is gone).
    pub fn forget(&self, id: &SandboxId) {
        self.lock().remove(id);
        self.no_bash_set().remove(id);
    }

    fn no_bash_set(&self) -> std::sync::MutexGuard<'_, HashSet<SandboxId>> {
        // Inserts and removes only: a poisoned lock is still whole.
        self.no_bash.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The selector of a request, or an `invalid_argument` error.
fn selector(s: Option<ProcessSelector>) -> Result<ProcessSelector, ConnectError> {
    match s {
        Some(s) if s.pid.is_some() || s.tag.is_some() => Ok(s),
        _ => Err(ConnectError::new(
            Code::InvalidArgument,
            "name the process: process.pid or process.tag",
        )),
    }
}

fn not_found(s: &ProcessSelector) -> ConnectError {
    let which = match (s.pid, &s.tag) {
        (Some(pid), _) => format!("pid {pid}"),
        (None, Some(tag)) => format!("tag {tag:?}"),
        (None, None) => "that selector".into(),
    };
    ConnectError::new(Code::NotFound, format!("process with {which} not found"))
}

/// What an exit looks like in an `EndEvent`.
fn end_event(status: ExitStatus, error: Option<String>) -> EndEvent {
    let (exited, words) = match status {
        ExitStatus::Code(c) => (true, format!("exit status {c}")),
        ExitStatus::Signal(s) => (false, format!("signal: {}", signal_name(s))),
        ExitStatus::TimedOut => (false, "signal: killed (timed out)".to_owned()),
        ExitStatus::NotStarted(_) => (false, "not started".to_owned()),
    };
    EndEvent {
        exit_code: status.shell_code(),
        exited,
        status: words,
        error,
    }
}

fn signal_name(s: i32) -> String {
    match s {
        9 => "killed".into(),
        15 => "terminated".into(),
        2 => "interrupt".into(),
        1 => "hangup".into(),
        n => format!("signal {n}"),
    }
}

/// The user an E2B SDK asked for in the Basic `Authorization` header,
/// mapped as the module docs say: `Some` user text for the request, `None`
/// for the template's default (no header, a Bearer token, or `user`).
fn e2b_user(headers: &HeaderMap) -> Result<Option<String>, ConnectError> {
    use base64::Engine as _;
    let Some(value) = headers.get(axum::http::header::AUTHORIZATION) else {
        return Ok(None);
    };
    let bad = |why: &str| {
        ConnectError::new(
            Code::InvalidArgument,
            format!(
                "the Authorization header {why}: send `Basic base64(USER:)`, USER being root, user or a user of the guest"
            ),
        )
    };
    let Some(encoded) = value.to_str().ok().and_then(|v| v.strip_prefix("Basic ")) else {
        // Not a Basic header (a Bearer token for the API): no user named.
        return Ok(None);
    };
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .map_err(|_| bad("is not base64"))?;
    let text = String::from_utf8(decoded).map_err(|_| bad("is not UTF-8"))?;
    let name = text.split_once(':').map_or(text.as_str(), |(user, _)| user);
    Ok(match name {
        "" | "user" => None,
        "root" => Some("0".to_owned()),
        other => Some(other.to_owned()),
    })
}

/// Turns E2B's process config into the daemon's request. `/bin/bash -l -c
/// SCRIPT` (what the SDKs send for `commands.run`) stays as it is; see
/// [`bash_fallback`] for guests without bash.
fn to_request(
    config: &ProcessConfig,
    sandbox_env: &std::collections::BTreeMap<String, String>,
    pty: Option<TerminalSize>,
    stdin: bool,
) -> Result<ExecRequest, ConnectError> {
    if config.cmd.is_empty() {
        return Err(ConnectError::new(
            Code::InvalidArgument,
            "process.cmd is empty",
        ));
    }
    let mut argv = vec![config.cmd.clone()];
    argv.extend(config.args.iter().cloned());
    let mut env = sandbox_env.clone();
    env.extend(config.envs.clone());
    Ok(ExecRequest {
        command: Command::Argv(argv),
        env,
        cwd: config.cwd.clone().filter(|c| !c.is_empty()),
        stdin: None,
        // Stdin stays open with a terminal, or when asked for.
        stream_stdin: stdin || pty.is_some(),
        timeout: None,
        max_output: None,
        pty,
        user: None,
    })
}

/// bash as `/bin/sh`, for guests without bash (the `minimal` template is
/// busybox): `/bin/bash [-l] -c SCRIPT` becomes `/bin/sh -c SCRIPT`, any
/// other bash command line (`-i -l` for a PTY) runs with `/bin/sh`.
fn bash_fallback(request: &ExecRequest) -> Option<ExecRequest> {
    let Command::Argv(argv) = &request.command else {
        return None;
    };
    let (cmd, rest) = argv.split_first()?;
    if cmd != "/bin/bash" && cmd != "bash" {
        return None;
    }
    let without_login: Vec<&String> = rest.iter().filter(|a| *a != "-l").collect();
    let command = match without_login.as_slice() {
        [c, script] if *c == "-c" => Command::Shell((*script).clone()),
        _ => {
            let mut sh = vec!["/bin/sh".to_owned()];
            sh.extend(rest.iter().cloned());
            Command::Argv(sh)
        }
    };
    Some(ExecRequest {
        command,
        ..request.clone()
    })
}

/// Starts `request` in `id`, falling back to `/bin/sh` when bash is absent.
async fn start_exec(
    daemon: &Daemon,
    processes: &Processes,
    id: &SandboxId,
    request: ExecRequest,
) -> Result<ExecStream, ExecError> {
    let fallback = bash_fallback(&request);
    if let Some(fallback) = &fallback
        && processes.no_bash_set().contains(id)
    {
        return daemon.hypervisor().exec_stream(id, fallback.clone()).await;
    }
    match daemon.hypervisor().exec_stream(id, request).await {
        Err(ExecError::Spawn(e)) if fallback.is_some() => {
            let Some(fallback) = fallback else {
                return Err(ExecError::Spawn(e));
            };
            tracing::debug!(sandbox = %id, error = %e.message, "no bash in the guest; running bash command lines with /bin/sh");
            let result = daemon.hypervisor().exec_stream(id, fallback).await;
            if result.is_ok() {
                processes.no_bash_set().insert(id.clone());
            }
            result
        }
        other => other,
    }
}

/// The guest pid of exec `exec_id`, from `list_execs` (the exec id when the
/// agent does not say).
async fn pid_of(daemon: &Daemon, id: &SandboxId, exec_id: Option<u64>) -> u32 {
    let Some(exec_id) = exec_id else {
        return 0;
    };
    match daemon.hypervisor().list_execs(id).await {
        Ok(execs) => execs
            .iter()
            .find(|e| e.exec_id == exec_id)
            .map(|e| e.pid)
            .unwrap_or(exec_id as u32),
        Err(_) => exec_id as u32,
    }
}

/// What the table keeps of a process besides its channels.
#[derive(Debug)]
struct Spec {
    pid: u32,
    tag: Option<String>,
    config: ProcessConfig,
    pty: bool,
}

/// Puts `stream` under a pump task and into the table; returns the process.
fn spawn_pump(
    processes: &Arc<Processes>,
    id: &SandboxId,
    mut stream: ExecStream,
    spec: Spec,
    subscriber: Option<mpsc::Sender<ProcessEvent>>,
) -> Arc<Proc> {
    let Spec {
        pid,
        tag,
        config,
        pty,
    } = spec;
    let (control_tx, mut control_rx) = mpsc::channel::<Control>(8);
    let stdin_tx = stream.take_stdin().map(|writer| {
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(16);
        tokio::spawn(async move {
            while let Some(chunk) = rx.recv().await {
                if writer.write(chunk).await.is_err() {
                    break;
                }
            }
        });
        tx
    });
    let proc = Arc::new(Proc {
        pid,
        tag,
        config,
        pty,
        control: control_tx,
        stdin: Mutex::new(stdin_tx),
    });
    processes.insert(id, proc.clone());
    let processes = Arc::downgrade(processes);
    let id = id.clone();
    tokio::spawn(async move {
        let mut subscriber = subscriber;
        let mut pending: Option<ProcessEvent> = None;
        let mut ended = false;
        let mut controlled = true;
        loop {
            if pending.is_some() && subscriber.is_none() {
                // Nobody listens: the output is dropped (as envd does).
                if matches!(pending, Some(ProcessEvent::End(_))) {
                    break;
                }
                pending = None;
            }
            if ended && pending.is_none() {
                break;
            }
            let sub = subscriber.clone();
            tokio::select! {
                event = stream.next(), if pending.is_none() && !ended => {
                    pending = Some(match event {
                        Some(ExecEvent::Stdout(b)) if pty => ProcessEvent::Data(DataEvent::Pty(B64(b))),
                        Some(ExecEvent::Stdout(b)) => ProcessEvent::Data(DataEvent::Stdout(B64(b))),
                        Some(ExecEvent::Stderr(b)) => ProcessEvent::Data(DataEvent::Stderr(B64(b))),
                        Some(ExecEvent::Exited(status)) => {
                            ended = true;
                            ProcessEvent::End(end_event(status, None))
                        }
                        None => {
                            ended = true;
                            ProcessEvent::End(EndEvent {
                                exit_code: -1,
                                exited: false,
                                status: "unknown".into(),
                                error: Some("the guest agent connection ended before the process did".into()),
                            })
                        }
                    });
                }
                permit = async {
                    match &sub {
                        Some(tx) => tx.reserve().await.ok(),
                        None => std::future::pending().await,
                    }
                }, if pending.is_some() => {
                    match permit {
                        Some(permit) => {
                            if let Some(event) = pending.take() {
                                permit.send(event);
                            }
                        }
                        None => subscriber = None,
                    }
                }
                control = control_rx.recv(), if controlled => match control {
                    Some(Control::Signal(sig, reply)) => { let _ = reply.send(stream.signal(sig)); }
                    Some(Control::Resize(size, reply)) => { let _ = reply.send(stream.resize(size.rows, size.cols)); }
                    Some(Control::Subscribe(tx)) => subscriber = Some(tx),
                    // The table dropped the process (its sandbox was
                    // killed): keep pumping to the end, uncontrolled.
                    None => controlled = false,
                },
            }
        }
        if let Some(processes) = processes.upgrade() {
            processes.remove(&id, pid);
        }
    });
    proc
}

/// Makes `tx` the subscriber of `proc`, which is already in the table.
async fn subscribe(proc: &Proc, tx: mpsc::Sender<ProcessEvent>) -> Result<(), ConnectError> {
    proc.control
        .send(Control::Subscribe(tx))
        .await
        .map_err(|_| ConnectError::new(Code::NotFound, format!("process {} ended", proc.pid)))
}

struct StreamState {
    first: Option<ProcessEvent>,
    rx: mpsc::Receiver<ProcessEvent>,
    tick: tokio::time::Interval,
    done: bool,
}

fn event_stream(
    codec: Codec,
    first: Option<ProcessEvent>,
    rx: mpsc::Receiver<ProcessEvent>,
    keepalive: Duration,
) -> Response {
    let mut tick = tokio::time::interval(keepalive);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let state = StreamState {
        first,
        rx,
        tick,
        done: false,
    };
    let frames = futures_util::stream::unfold(state, move |mut s| async move {
        if s.done {
            return None;
        }
        if let Some(event) = s.first.take() {
            s.tick.reset();
            return Some((message_frame(codec, &EventResponse { event }), s));
        }
        let frame: Bytes = tokio::select! {
            event = s.rx.recv() => match event {
                Some(event) => {
                    let end = matches!(event, ProcessEvent::End(_));
                    let mut frame = message_frame(codec, &EventResponse { event }).to_vec();
                    if end {
                        frame.extend_from_slice(&end_frame(None));
                        s.done = true;
                    }
                    s.tick.reset();
                    Bytes::from(frame)
                }
                None => {
                    s.done = true;
                    end_frame(Some(&ConnectError::new(
                        Code::Unavailable,
                        "another client connected to this process and took its output over",
                    )))
                }
            },
            _ = s.tick.tick() => message_frame(codec, &EventResponse { event: ProcessEvent::Keepalive {} }),
        };
        Some((frame, s))
    });
    connect::stream_response(codec, frames)
}

/// The keepalive interval the client asked for (`Keepalive-Ping-Interval`, seconds).
fn keepalive(headers: &HeaderMap) -> Duration {
    headers
        .get("keepalive-ping-interval")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|s| *s > 0)
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_KEEPALIVE)
}

/// `process.Process/Start`.
pub async fn start(
    daemon: &Arc<Daemon>,
    processes: &Arc<Processes>,
    id: &SandboxId,
    (codec, headers): (Codec, &HeaderMap),
    request: StartRequest,
) -> Result<Response, ConnectError> {
    let config = request
        .process
        .ok_or_else(|| ConnectError::new(Code::InvalidArgument, "process is missing"))?;
    let pty = request.pty.and_then(|p| p.size).map(|s| TerminalSize {
        rows: u16::try_from(s.rows).unwrap_or(u16::MAX).max(1),
        cols: u16::try_from(s.cols).unwrap_or(u16::MAX).max(1),
    });
    let mut exec = to_request(
        &config,
        &daemon.sandbox_env(id),
        pty,
        request.stdin.unwrap_or(false),
    )?;
    exec.user = e2b_user(headers)?;
    let stream = match start_exec(daemon, processes, id, exec).await {
        Ok(stream) => stream,
        Err(ExecError::Spawn(e)) => {
            // envd reports a command that cannot start as a failed call.
            daemon.metrics().exec_done(true);
            return Err(ConnectError::new(Code::InvalidArgument, e.message));
        }
        Err(e) => {
            daemon.metrics().exec_done(false);
            return Err(crate::problem::Problem::from(e).into());
        }
    };
    daemon.metrics().exec_done(true);
    let pid = pid_of(daemon, id, stream.exec_id()).await;
    // Subscribed from the start, so no early output is lost.
    let (tx, rx) = mpsc::channel(SUBSCRIBER_BUFFER);
    let spec = Spec {
        pid,
        tag: request.tag,
        config,
        pty: pty.is_some(),
    };
    spawn_pump(processes, id, stream, spec, Some(tx));
    Ok(event_stream(
        codec,
        Some(ProcessEvent::Start { pid }),
        rx,
        keepalive(headers),
    ))
}

/// Finds the process `selector` names, adopting a running command of the
/// sandbox that the table does not hold. `subscriber` becomes the
/// subscriber of a process it adopts (and is handed back otherwise).
async fn find_or_adopt(
    daemon: &Arc<Daemon>,
    processes: &Arc<Processes>,
    id: &SandboxId,
    selector: &ProcessSelector,
    subscriber: Option<mpsc::Sender<ProcessEvent>>,
) -> Result<(Arc<Proc>, Option<mpsc::Sender<ProcessEvent>>), ConnectError> {
    if let Some(proc) = processes.find(id, selector) {
        return Ok((proc, subscriber));
    }
    let Some(pid) = selector.pid else {
        return Err(not_found(selector));
    };
    let execs = daemon
        .hypervisor()
        .list_execs(id)
        .await
        .map_err(|e| ConnectError::from(crate::problem::Problem::from(e)))?;
    let Some(info) = execs
        .into_iter()
        .find(|e| e.pid == pid && e.state == ExecState::Running)
    else {
        return Err(not_found(selector));
    };
    let stream = daemon
        .hypervisor()
        .attach_exec(id, info.exec_id)
        .await
        .map_err(|e| match e {
            ExecError::NoSuchExec { .. } => not_found(selector),
            e => crate::problem::Problem::from(e).into(),
        })?;
    let spec = Spec {
        pid,
        tag: None,
        config: config_of(&info),
        pty: false,
    };
    let proc = spawn_pump(processes, id, stream, spec, subscriber);
    Ok((proc, None))
}

fn config_of(info: &ExecInfo) -> ProcessConfig {
    match &info.command {
        Command::Argv(argv) => ProcessConfig {
            cmd: argv.first().cloned().unwrap_or_default(),
            args: argv.iter().skip(1).cloned().collect(),
            ..ProcessConfig::default()
        },
        Command::Shell(script) => ProcessConfig {
            cmd: "/bin/sh".into(),
            args: vec!["-c".into(), script.clone()],
            ..ProcessConfig::default()
        },
    }
}

/// `process.Process/Connect`.
pub async fn connect(
    daemon: &Arc<Daemon>,
    processes: &Arc<Processes>,
    id: &SandboxId,
    (codec, headers): (Codec, &HeaderMap),
    request: SelectRequest,
) -> Result<Response, ConnectError> {
    let selector = selector(request.process)?;
    let (tx, rx) = mpsc::channel(SUBSCRIBER_BUFFER);
    let (proc, unused) = find_or_adopt(daemon, processes, id, &selector, Some(tx)).await?;
    if let Some(tx) = unused {
        subscribe(&proc, tx).await?;
    }
    Ok(event_stream(
        codec,
        Some(ProcessEvent::Start { pid: proc.pid }),
        rx,
        keepalive(headers),
    ))
}

/// `process.Process/List`: the table's processes and every other running
/// command of the sandbox.
pub async fn list(
    daemon: &Arc<Daemon>,
    processes: &Arc<Processes>,
    id: &SandboxId,
) -> Result<ListResponse, ConnectError> {
    let mut out: Vec<ProcessInfo> = processes
        .of(id)
        .iter()
        .map(|p| ProcessInfo {
            config: p.config.clone(),
            pid: p.pid,
            tag: p.tag.clone(),
        })
        .collect();
    if let Ok(execs) = daemon.hypervisor().list_execs(id).await {
        for info in execs {
            if info.state == ExecState::Running && !out.iter().any(|p| p.pid == info.pid) {
                out.push(ProcessInfo {
                    config: config_of(&info),
                    pid: info.pid,
                    tag: None,
                });
            }
        }
    }
    out.sort_by_key(|p| p.pid);
    Ok(ListResponse { processes: out })
}

/// `process.Process/SendSignal`.
pub async fn send_signal(
    daemon: &Arc<Daemon>,
    processes: &Arc<Processes>,
    id: &SandboxId,
    request: SendSignalRequest,
) -> Result<Empty, ConnectError> {
    let signal = request.signal_number().ok_or_else(|| {
        ConnectError::new(
            Code::InvalidArgument,
            "signal must be SIGNAL_SIGTERM or SIGNAL_SIGKILL",
        )
    })?;
    let selector = selector(request.process)?;
    let (proc, _) = find_or_adopt(daemon, processes, id, &selector, None).await?;
    let (tx, rx) = oneshot::channel();
    proc.control
        .send(Control::Signal(signal, tx))
        .await
        .map_err(|_| not_found(&selector))?;
    match rx.await {
        Ok(Ok(())) => Ok(Empty {}),
        Ok(Err(e)) => Err(ConnectError::new(
            Code::NotFound,
            format!("cannot signal process {}: {e}", proc.pid),
        )),
        Err(_) => Err(not_found(&selector)),
    }
}

/// `process.Process/SendInput`.
pub async fn send_input(
    processes: &Arc<Processes>,
    id: &SandboxId,
    request: SendInputRequest,
) -> Result<Empty, ConnectError> {
    let selector = selector(request.process)?;
    let proc = processes
        .find(id, &selector)
        .ok_or_else(|| not_found(&selector))?;
    let input = request.input.unwrap_or_default();
    let bytes = match (input.stdin, input.pty) {
        (Some(b), _) | (None, Some(b)) => b.0,
        (None, None) => return Ok(Empty {}),
    };
    let sender = proc
        .stdin
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
        .ok_or_else(|| {
            ConnectError::new(
                Code::FailedPrecondition,
                format!(
                    "process {} has no open stdin: start it with stdin=True (or a PTY)",
                    proc.pid
                ),
            )
        })?;
    sender.send(bytes).await.map_err(|_| {
        ConnectError::new(
            Code::FailedPrecondition,
            format!("stdin of process {} is closed", proc.pid),
        )
    })?;
    Ok(Empty {})
}

/// `process.Process/CloseStdin`.
pub fn close_stdin(
    processes: &Arc<Processes>,
    id: &SandboxId,
    request: SelectRequest,
) -> Result<Empty, ConnectError> {
    let selector = selector(request.process)?;
    let proc = processes
        .find(id, &selector)
        .ok_or_else(|| not_found(&selector))?;
    proc.stdin.lock().unwrap_or_else(|p| p.into_inner()).take();
    Ok(Empty {})
}

/// `process.Process/Update`: resizes the process's terminal.
pub async fn update(
    daemon: &Arc<Daemon>,
    processes: &Arc<Processes>,
    id: &SandboxId,
    request: UpdateRequest,
) -> Result<Empty, ConnectError> {
    let selector = selector(request.process)?;
    let (proc, _) = find_or_adopt(daemon, processes, id, &selector, None).await?;
    let Some(size) = request.pty.and_then(|p| p.size) else {
        return Ok(Empty {});
    };
    if !proc.pty {
        return Err(ConnectError::new(
            Code::FailedPrecondition,
            format!("process {} has no terminal to resize", proc.pid),
        ));
    }
    let size = TerminalSize {
        rows: u16::try_from(size.rows).unwrap_or(u16::MAX).max(1),
        cols: u16::try_from(size.cols).unwrap_or(u16::MAX).max(1),
    };
    let (tx, rx) = oneshot::channel();
    proc.control
        .send(Control::Resize(size, tx))
        .await
        .map_err(|_| not_found(&selector))?;
    match rx.await {
        Ok(Ok(())) => Ok(Empty {}),
        Ok(Err(e)) => Err(ConnectError::new(
            Code::Internal,
            format!("cannot resize: {e}"),
        )),
        Err(_) => Err(not_found(&selector)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_e2b_user_maps_root_to_0_and_user_to_the_template_default() {
        use base64::Engine as _;
        let with = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(
                axum::http::header::AUTHORIZATION,
                axum::http::HeaderValue::from_str(value).unwrap(),
            );
            headers
        };
        let basic = |text: &str| {
            with(&format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(text)
            ))
        };
        assert_eq!(e2b_user(&HeaderMap::new()).unwrap(), None);
        assert_eq!(e2b_user(&with("Bearer tok")).unwrap(), None);
        assert_eq!(e2b_user(&basic("user:")).unwrap(), None);
        assert_eq!(e2b_user(&basic("root:")).unwrap(), Some("0".into()));
        assert_eq!(e2b_user(&basic("app:")).unwrap(), Some("app".into()));
        assert_eq!(e2b_user(&basic("app")).unwrap(), Some("app".into()));
        let err = e2b_user(&with("Basic !!!")).unwrap_err();
        assert!(err.message.contains("base64"), "{}", err.message);
    }

    #[test]
    fn bash_scripts_fall_back_to_sh() {
        let config = ProcessConfig {
            cmd: "/bin/bash".into(),
            args: vec!["-l".into(), "-c".into(), "echo hi".into()],
            ..ProcessConfig::default()
        };
        let request = to_request(&config, &Default::default(), None, false).unwrap();
        assert_eq!(
            request.command,
            Command::Argv(vec![
                "/bin/bash".into(),
                "-l".into(),
                "-c".into(),
                "echo hi".into()
            ])
        );
        let fallback = bash_fallback(&request).unwrap();
        assert_eq!(fallback.command, Command::Shell("echo hi".into()));
        let pty = ProcessConfig {
            cmd: "/bin/bash".into(),
            args: vec!["-i".into(), "-l".into()],
            ..ProcessConfig::default()
        };
        let request = to_request(&pty, &Default::default(), None, false).unwrap();
        assert_eq!(
            bash_fallback(&request).unwrap().command,
            Command::Argv(vec!["/bin/sh".into(), "-i".into(), "-l".into()])
        );
        let other = ProcessConfig {
            cmd: "/usr/bin/python3".into(),
            ..ProcessConfig::default()
        };
        assert!(
            bash_fallback(&to_request(&other, &Default::default(), None, false).unwrap()).is_none()
        );
    }

    #[test]
    fn the_process_env_overrides_the_sandbox_env_and_stdin_follows_the_request() {
        let config = ProcessConfig {
            cmd: "env".into(),
            envs: [("B".to_owned(), "2".to_owned())].into(),
            ..ProcessConfig::default()
        };
        let sandbox = [
            ("A".to_owned(), "1".to_owned()),
            ("B".to_owned(), "1".to_owned()),
        ]
        .into();
        let r = to_request(&config, &sandbox, None, true).unwrap();
        assert_eq!((r.env["A"].as_str(), r.env["B"].as_str()), ("1", "2"));
        assert!(r.stream_stdin);
        assert!(to_request(&ProcessConfig::default(), &sandbox, None, false).is_err());
    }

    #[test]
    fn ends_read_like_envds() {
        let e = end_event(ExitStatus::Code(3), None);
        assert_eq!(
            (e.exit_code, e.exited, e.status.as_str()),
            (3, true, "exit status 3")
        );
        let e = end_event(ExitStatus::Signal(9), None);
        assert_eq!(
            (e.exit_code, e.exited, e.status.as_str()),
            (137, false, "signal: killed")
        );
    }

    #[tokio::test]
    async fn a_pumped_process_streams_to_its_subscriber_and_leaves_the_table() {
        let (tx, rx) = mpsc::channel(8);
        let stream = ExecStream::new(rx).with_exec_id(5);
        let processes = Arc::new(Processes::default());
        let id: SandboxId = "sb-aaaaaaaaaaaaa".parse().expect("a valid id");
        let (sub_tx, mut sub_rx) = mpsc::channel(8);
        let spec = Spec {
            pid: 42,
            tag: Some("t".into()),
            config: ProcessConfig::default(),
            pty: false,
        };
        spawn_pump(&processes, &id, stream, spec, Some(sub_tx));
        let by_tag = ProcessSelector {
            pid: None,
            tag: Some("t".into()),
        };
        assert_eq!(processes.find(&id, &by_tag).map(|p| p.pid), Some(42));
        tx.send(ExecEvent::Stdout(b"hi".to_vec())).await.unwrap();
        tx.send(ExecEvent::Exited(ExitStatus::Code(0)))
            .await
            .unwrap();
        assert_eq!(
            sub_rx.recv().await,
            Some(ProcessEvent::Data(DataEvent::Stdout(B64(b"hi".to_vec()))))
        );
        assert!(matches!(sub_rx.recv().await, Some(ProcessEvent::End(e)) if e.exit_code == 0));
        assert_eq!(sub_rx.recv().await, None);
        let by_pid = ProcessSelector {
            pid: Some(42),
            tag: None,
        };
        assert!(processes.find(&id, &by_pid).is_none());
    }
}
