//! The host runtime every VMM backend shares.
//!
//! [`Provider<B>`](Provider) implements the `nova-core`
//! [`Hypervisor`](nova_core::hypervisor::Hypervisor) trait once; a backend
//! (QEMU, Firecracker, Apple VZ) supplies only what is VMM-specific through
//! [`Backend`] and [`Vm`](backend::Vm). The command path:
//!
//! ```text
//! Hypervisor::pause_sandbox(id)                 (caller, any task)
//!   -> Provider: SandboxRegistry::ask(id, SandboxAction::Pause(reply))
//!        -> mpsc -> the sandbox's task (task::drive, one per sandbox)
//!             -> Vm::pause()                    (backend: QMP stop, PATCH /vm)
//!                  -> VMM process               (VmmProcess: own group, pidfd)
//!             <- state published (watch + state.json), then reply
//!   <- Ok(())
//! Hypervisor::exec_stream(id, request)
//!   -> SandboxRegistry -> Guest (agent client)  (no queueing behind lifecycle actions)
//!        -> nova-agent in the guest, over vsock / virtio-serial
//! ```
//!
//! Streaming output keeps the agent protocol's back-pressure: stdout and
//! stderr chunks are forwarded into a bounded channel, so a consumer that
//! stops reading stops the guest command's output at its source. A consumer
//! that drops its [`ExecStream`] before the command ended has the command's
//! process group killed in the guest.
//!
//! The guest is untrusted: whole-file reads stop at a cap
//! ([`Guest::with_read_limit`]), and the agent connection closes itself on a
//! protocol violation ([`AgentClient::closed`] says why). Guest errors on
//! files arrive typed ([`FileError::NoSuchFile`], ...), mapped from the
//! agent's error kind in one place.
//!
//! Creating a sandbox ([`Provider`]): check the config, lay out the sandbox
//! directory ([`dir`]: 0700, `flock`ed by its owner, `state.json` written
//! atomically), prepare the scratch disk ([`scratch`]: a clone of a cached empty image), then
//! [`Backend::start`] spawns the VMM through a [`backend::Launch`] (which
//! records its PID at once and bounds every wait by the boot deadline and
//! the VMM's exit), the runtime opens the agent channel ([`retry`]) and
//! completes the handshake, and the sandbox's task takes over ([`task`]).
//!
//! With `enable_network`, the sandbox's network ([`network`]: namespace,
//! tap, NAT, published port) is made before the VMM starts and torn down
//! with the sandbox.
//!
//! A [detached](Provider::detached) provider's VMs outlive it (a daemon
//! that restarts): its VMMs write their logs themselves, and dropping the
//! provider (or its process dying) leaves VMMs, directories and networks in
//! place. The next detached provider calls [`Provider::reattach`]
//! ([`reattach`]): it adopts every live sandbox (VMM by pidfd, directory
//! lock, network, the backend's control channel, the agent; commands in the
//! guest keep running and are found with `Hypervisor::list_execs` /
//! `attach_exec`) and reports the dead ones failed, with the reason.
//!
//! Also here: the VMM process type ([`vmm`]), capped console logs
//! ([`console`]), snapshot bookkeeping ([`snapshot`]), leftovers of dead
//! providers ([`leftovers`]), and host probing ([`host`]: KVM, binaries,
//! process accounting, the backend choice).
//!
//! [`Guest`] maps the backend-neutral operations of `nova-core`
//! ([`ExecRequest`], files, guest stats) onto the agent client. Streaming
//! output keeps the agent protocol's back-pressure: stdout and stderr chunks
//! are forwarded into a bounded channel, so a consumer that stops reading
//! stops the guest command's output at its source.

// One `unsafe` block (registering the VMM's pidfd with tokio, in `vmm`).
#![deny(unsafe_code)]

pub mod action;
pub mod backend;
pub mod console;
pub mod dir;
mod files;
pub mod host;
pub mod hybrid_vsock;
pub mod leftovers;
pub mod network;
mod provider;
pub mod reattach;
pub mod registry;
pub mod retry;
pub mod scratch;
pub mod snapshot;
pub mod task;
pub mod vmm;

pub use backend::Backend;
pub use provider::Provider;
pub use reattach::{ReattachError, ReattachFailure, ReattachReport};
pub use task::Timeouts;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nova_core::error::{ExecError, FileError, SpawnError, SpawnErrorKind};
use nova_core::exec::{
    Command, ExecEvent, ExecInfo, ExecRequest, ExecState, ExecStdin, ExecStream, ExitStatus,
};
use nova_core::stats::GuestStats;
use nova_protocol::client::{
    AgentClient, ClientError, ClockStep, DEFAULT_READ_LIMIT, FileDownload, OutputStream,
};
use nova_protocol::{ExecSpec, RemoteErrorKind};
use tokio::sync::mpsc;

/// How many output chunks may wait for the consumer of an [`ExecStream`].
const EVENT_BUFFER: usize = 16;
/// How many stdin chunks may wait between an [`ExecStdin`] and the agent
/// connection (which then waits for the agent's credit).
const STDIN_BUFFER: usize = 4;
/// How long [`Guest::sync_clock`] waits for the agent.
pub const CLOCK_SYNC_TIMEOUT: Duration = Duration::from_secs(5);

/// A ready guest: its agent client and the sandbox-wide environment.
#[derive(Clone, Debug)]
pub struct Guest {
    client: AgentClient,
    env: Vec<(String, String)>,
    /// The template's default working directory, for requests without one.
    cwd: Option<String>,
    /// The template's default user (`USER[:GROUP]`), for requests without
    /// one.
    user: Option<String>,
    /// The template's default command (an image's `Entrypoint` then its
    /// `Cmd`), for a request whose argv is empty.
    command: Vec<String>,
    read_limit: u64,
}

impl Guest {
    /// Wraps a connected agent client; `env` is set for every command (the
    /// sandbox config's `env`), under each request's own variables.
    /// Whole-file reads are capped at
    /// [`DEFAULT_READ_LIMIT`].
    pub fn new(client: AgentClient, env: impl IntoIterator<Item = (String, String)>) -> Self {
        Self {
            client,
            env: env.into_iter().collect(),
            cwd: None,
            user: None,
            command: Vec::new(),
            read_limit: DEFAULT_READ_LIMIT,
        }
    }

    /// Applies a template's exec defaults (an OCI image's `Env`,
    /// `WorkingDir` and `User`, a Dockerfile's `ENV`, `WORKDIR` and
    /// `USER`): its variables go under the sandbox's (which stay under each
    /// request's), its directory is the working directory of a request that
    /// names none, its user the user of a request that names none, and its
    /// `Entrypoint` + `Cmd` the command of a request with an empty argv (as
    /// `docker run IMAGE` without a command; a request with a command runs
    /// that command alone, as `docker exec` does). This is the one place
    /// they are applied.
    pub fn with_exec_defaults(mut self, defaults: &nova_core::template::ExecDefaults) -> Self {
        self.env = env_with_defaults(std::mem::take(&mut self.env), defaults);
        self.cwd = defaults.cwd.clone();
        self.user = defaults.user.clone();
        self.command = defaults
            .entrypoint
            .iter()
            .chain(&defaults.cmd)
            .cloned()
            .collect();
        self
    }

    /// Sets the cap of [`Guest::read_file`], in bytes.
    pub fn with_read_limit(mut self, bytes: u64) -> Self {
        self.read_limit = bytes;
        self
    }

    /// The agent client.
    pub fn client(&self) -> &AgentClient {
        &self.client
    }

    /// Starts `request` and streams its output (and, with
    /// [`ExecRequest::stream_stdin`], takes its stdin as the caller writes
    /// it).
    ///
    /// A command that cannot start is [`ExecError::Spawn`], with the
    /// guest's diagnosis of what is missing.
    pub async fn exec_stream(&self, request: ExecRequest) -> Result<ExecStream, ExecError> {
        let stdin = request.stdin.clone();
        let stream_stdin = request.stream_stdin;
        let request_pty = request.pty.is_some();
        let program = match &request.command {
            Command::Argv(argv) => argv.first().cloned().unwrap_or_default(),
            Command::Shell(_) => "/bin/sh".to_owned(),
        };
        let spec = self.spec(request)?;
        let handle = self
            .client
            .exec(spec)
            .await
            .map_err(|e| exec_error(program, e))?;
        Ok(stream_command(handle, stdin, stream_stdin, request_pty))
    }

    /// The commands the guest's agent knows, oldest first (see
    /// [`Hypervisor::list_execs`](nova_core::hypervisor::Hypervisor::list_execs)).
    pub async fn list_execs(&self) -> Result<Vec<ExecInfo>, ExecError> {
        let execs = self
            .client
            .list_execs()
            .await
            .map_err(|e| ExecError::Agent(Box::new(e)))?;
        Ok(execs.into_iter().map(exec_info).collect())
    }

    /// Follows command `exec_id` (see
    /// [`Hypervisor::attach_exec`](nova_core::hypervisor::Hypervisor::attach_exec)).
    pub async fn attach_exec(&self, exec_id: u64) -> Result<ExecStream, ExecError> {
        let handle = self
            .client
            .attach_exec(exec_id)
            .await
            .map_err(|e| match e.remote_kind() {
                Some(RemoteErrorKind::NotFound) => ExecError::NoSuchExec { exec_id },
                Some(RemoteErrorKind::Busy) => ExecError::ExecBusy { exec_id },
                _ => ExecError::Agent(Box::new(e)),
            })?;
        // The agent knows whether the command runs on a terminal; allow a
        // resize, which it ignores otherwise.
        Ok(stream_command(handle, None, false, true))
    }
}

/// Maps the agent's view of a command onto core's.
fn exec_info(e: nova_protocol::ExecInfo) -> ExecInfo {
    ExecInfo {
        exec_id: e.exec_id,
        pid: e.pid,
        command: match e.command {
            nova_protocol::ExecCommand::Argv(argv) => Command::Argv(argv),
            nova_protocol::ExecCommand::Shell(line) => Command::Shell(line),
        },
        state: match e.state {
            nova_protocol::ExecState::Running => ExecState::Running,
            nova_protocol::ExecState::Ended(result) => ExecState::Exited(exit_status(result)),
        },
        attached: e.attached,
        buffered_bytes: e.buffered_bytes,
    }
}

fn exit_status(result: nova_protocol::ExecResult) -> ExitStatus {
    if result.timed_out {
        ExitStatus::TimedOut
    } else {
        match result.status {
            nova_protocol::ExitStatus::Exited(code) => ExitStatus::Code(code),
            nova_protocol::ExitStatus::Signaled(sig) => ExitStatus::Signal(sig),
        }
    }
}

/// Turns a started command's handle into the [`ExecStream`] its caller
/// reads: output forwarded with back-pressure, stdin fed from `stdin` and
/// (with `stream_stdin`) the caller's writer, the command killed when the
/// stream is dropped early.
fn stream_command(
    mut handle: nova_protocol::client::ExecHandle,
    stdin: Option<Vec<u8>>,
    stream_stdin: bool,
    request_pty: bool,
) -> ExecStream {
    let exec_id = handle.exec_id();
    let control = Control {
        command: handle.controller(),
        ended: Arc::new(AtomicBool::new(false)),
        has_pty: request_pty,
    };
    let exited = control.ended.clone();
    let stdout = handle.take_stdout();
    let stderr = handle.take_stderr();
    let mut caller_stdin = None;
    // Dropped when the command ended: the stdin task then stops waiting
    // for the caller, so the caller's next write fails.
    let (ended_tx, mut ended) = tokio::sync::oneshot::channel::<()>();
    if let Some(mut writer) = handle.take_stdin() {
        let more = stream_stdin.then(|| {
            let (tx, rx) = mpsc::channel(STDIN_BUFFER);
            caller_stdin = Some(ExecStdin::new(tx));
            rx
        });
        tokio::spawn(async move {
            // A command that exits without reading its stdin makes these
            // writes fail; that is the command's business, not an error
            // here. Dropping `more` then fails the caller's writes.
            if let Some(bytes) = stdin
                && let Err(e) = writer.write(bytes).await
            {
                tracing::debug!(error = %e, "stdin not fully delivered");
                return;
            }
            if let Some(mut more) = more {
                loop {
                    let chunk = tokio::select! {
                        chunk = more.recv() => chunk,
                        _ = &mut ended => return,
                    };
                    let Some(chunk) = chunk else { break };
                    if let Err(e) = writer.write(chunk).await {
                        tracing::debug!(error = %e, "stdin not fully delivered");
                        return;
                    }
                }
            }
            writer.close();
        });
    }
    let (tx, rx) = mpsc::channel(EVENT_BUFFER);
    let consumer = tx.clone();
    tokio::spawn(kill_when_abandoned(consumer, async move {
        let out = forward(stdout, tx.clone(), ExecEvent::Stdout);
        let err = forward(stderr, tx.clone(), ExecEvent::Stderr);
        tokio::join!(out, err);
        let result = handle.wait().await;
        // From here on there is no command to signal.
        exited.store(true, Ordering::SeqCst);
        match result {
            Ok(result) => {
                let _ = tx.send(ExecEvent::Exited(exit_status(result))).await;
            }
            // The stream then ends without an exit status, which the
            // consumer reports as the agent going away.
            Err(e) => tracing::warn!(error = %e, "lost a command's exit status"),
        }
        drop(ended_tx);
    }));
    let stream = match caller_stdin {
        Some(stdin) => ExecStream::with_stdin(rx, stdin),
        None => ExecStream::new(rx),
    };
    stream.with_control(Box::new(control)).with_exec_id(exec_id)
}

impl Guest {
    /// Makes a guest restored from a snapshot a machine of its own: its
    /// hostname becomes `hostname` (with `/etc/hostname`, `/etc/hosts` and a
    /// new machine-id), the host's fresh random bytes are mixed into its
    /// kernel's pool (which is reseeded), and its clock is set from the
    /// host's. With `dns` (the servers a cold boot would get now; `None`
    /// for a sandbox without a network) its `/etc/resolv.conf` is
    /// rewritten to list them. Returns the new machine-id.
    pub async fn refresh(
        &self,
        hostname: &str,
        dns: Option<&[std::net::Ipv4Addr]>,
    ) -> Result<String, ClientError> {
        let mut entropy = [0u8; 64];
        getrandom::fill(&mut entropy)
            .map_err(|e| ClientError::Io(format!("no host randomness: {e}")))?;
        let refreshed = self
            .client
            .refresh(hostname, &entropy, std::time::SystemTime::now(), dns)
            .await?;
        if !refreshed.reseeded {
            tracing::warn!("the guest kernel did not reseed its random number generator");
        }
        Ok(refreshed.machine_id)
    }

    /// Steps the guest's wall clock to the host's, after anything that
    /// stopped the guest (a resume from pause, a snapshot restore): a
    /// stopped VM's clock stops with it. Bounded by [`CLOCK_SYNC_TIMEOUT`].
    ///
    /// Failure is logged here (a guest whose clock could not be corrected
    /// still runs); the error is returned for callers that want it.
    pub async fn sync_clock(&self) -> Result<ClockStep, ClientError> {
        let result = tokio::time::timeout(
            CLOCK_SYNC_TIMEOUT,
            self.client.set_clock(std::time::SystemTime::now()),
        )
        .await
        .map_err(|_| ClientError::TimedOut(CLOCK_SYNC_TIMEOUT))
        .and_then(|r| r);
        match &result {
            Ok(step) => tracing::debug!(
                offset_ms = step.offset_ns / 1_000_000,
                stepped = step.stepped,
                "guest clock synced"
            ),
            Err(e) => tracing::warn!(error = %e, "cannot correct the guest clock"),
        }
        result
    }

    fn spec(&self, request: ExecRequest) -> Result<ExecSpec, ExecError> {
        build_spec(
            &self.env,
            request_with_defaults(
                request,
                self.cwd.as_ref(),
                self.user.as_ref(),
                &self.command,
            ),
        )
    }
}

/// `request` with the template's working directory and user where it names
/// none, and the template's command where its argv is empty.
fn request_with_defaults(
    mut request: ExecRequest,
    cwd: Option<&String>,
    user: Option<&String>,
    command: &[String],
) -> ExecRequest {
    if let Command::Argv(argv) = &mut request.command
        && argv.is_empty()
    {
        argv.extend_from_slice(command);
    }
    if request.cwd.is_none() {
        request.cwd = cwd.cloned();
    }
    if request.user.is_none() {
        request.user = user.cloned();
    }
    request
}

/// The template's variables under the sandbox's own `env` (which wins).
fn env_with_defaults(
    mut env: Vec<(String, String)>,
    defaults: &nova_core::template::ExecDefaults,
) -> Vec<(String, String)> {
    let mut merged: Vec<(String, String)> = defaults
        .env
        .iter()
        .filter(|(k, _)| !env.iter().any(|(own, _)| own == *k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    merged.append(&mut env);
    merged
}

/// Maps a core request onto the agent's exec spec, refusing what no process
/// could receive.
fn build_spec(base_env: &[(String, String)], request: ExecRequest) -> Result<ExecSpec, ExecError> {
    let mut spec = match request.command {
        Command::Argv(argv) => {
            if argv.is_empty() {
                return Err(ExecError::Invalid(
                    "no command given, and the sandbox's template has no default one \
                     (an image's Entrypoint or Cmd): give the command to run"
                        .into(),
                ));
            }
            if argv.first().is_some_and(String::is_empty) {
                return Err(ExecError::Invalid(
                    "the program name (argv[0]) is empty".into(),
                ));
            }
            if argv.iter().any(|a| a.contains('\0')) {
                return Err(ExecError::Invalid("an argument contains NUL".into()));
            }
            ExecSpec::argv(argv)
        }
        Command::Shell(script) => {
            if script.contains('\0') {
                return Err(ExecError::Invalid("the command contains NUL".into()));
            }
            ExecSpec::shell(script)
        }
    };
    let mut env = base_env.to_vec();
    for (k, v) in request.env {
        if k.is_empty() || k.contains(['=', '\0']) || v.contains('\0') {
            return Err(ExecError::Invalid(format!(
                "invalid environment variable {k:?}"
            )));
        }
        env.retain(|(existing, _)| *existing != k);
        env.push((k, v));
    }
    spec.env = env;
    spec.cwd = request.cwd;
    spec.stdin = request.stdin.is_some() || request.stream_stdin;
    spec.timeout_ms = request.timeout.map(|t| t.as_millis().max(1) as u64);
    spec.pty = request.pty.map(|t| nova_protocol::PtySize {
        rows: t.rows,
        cols: t.cols,
    });
    spec.user = request
        .user
        .as_deref()
        .map(str::parse::<nova_protocol::ExecUser>)
        .transpose()
        .map_err(|e| ExecError::Invalid(e.to_string()))?;
    Ok(spec)
}

impl Guest {
    /// Writes a whole file.
    pub async fn write_file(&self, path: &str, data: Vec<u8>, mode: u32) -> Result<(), FileError> {
        FileError::check_path(path)?;
        files::check_mode(path, mode)?;
        self.client
            .write_file(path, data, mode)
            .await
            .map(drop)
            .map_err(|e| file_error(path, e))
    }

    /// Reads a whole file, up to the read cap ([`Guest::with_read_limit`]);
    /// a larger file is [`FileError::TooLarge`] (stream it with
    /// [`Guest::read_file_stream`]).
    pub async fn read_file(&self, path: &str) -> Result<Vec<u8>, FileError> {
        FileError::check_path(path)?;
        self.client
            .read_file_to_vec_limited(path, self.read_limit)
            .await
            .map_err(|e| file_error(path, e))
    }

    /// Opens a file for streaming its contents back, in chunks, with no cap.
    pub async fn read_file_stream(&self, path: &str) -> Result<FileDownload, FileError> {
        FileError::check_path(path)?;
        self.client
            .read_file(path)
            .await
            .map_err(|e| file_error(path, e))
    }

    /// The guest's view of its resources, within `timeout`.
    pub async fn stats(&self, timeout: Duration) -> Result<GuestStats, ClientError> {
        let s = tokio::time::timeout(timeout, self.client.stats())
            .await
            .map_err(|_| ClientError::TimedOut(timeout))??;
        Ok(GuestStats {
            memory_total_bytes: s.memory_total_bytes,
            memory_used_bytes: s.memory_used_bytes,
            memory_available_bytes: s.memory_available_bytes,
            cpu_user_us: s.cpu_user_ms * 1000,
            cpu_system_us: s.cpu_system_ms * 1000,
            load_avg: s.load_average,
            disk_used_bytes: s.root_fs_used_bytes,
            disk_total_bytes: s.root_fs_total_bytes,
            process_count: s.process_count.into(),
            uptime_ms: s.uptime_ms,
        })
    }

    /// Asks the agent to sync and power the guest off.
    pub async fn shutdown(&self) -> Result<(), ClientError> {
        self.client.shutdown().await
    }
}

/// Maps a failed start onto the core error: the agent's spawn diagnosis
/// becomes [`ExecError::Spawn`], anything else an agent failure.
fn exec_error(program: String, e: ClientError) -> ExecError {
    match e {
        ClientError::Remote {
            kind: RemoteErrorKind::Spawn(kind),
            message,
        } => ExecError::Spawn(SpawnError {
            kind: spawn_kind(kind),
            program,
            message,
        }),
        other => ExecError::Agent(Box::new(other)),
    }
}

fn spawn_kind(kind: nova_protocol::SpawnErrorKind) -> SpawnErrorKind {
    use nova_protocol::SpawnErrorKind as Wire;
    match kind {
        Wire::NotFound => SpawnErrorKind::NotFound,
        Wire::NotExecutable => SpawnErrorKind::NotExecutable,
        Wire::BadInterpreter => SpawnErrorKind::BadInterpreter,
        Wire::ExecFormat => SpawnErrorKind::ExecFormat,
        Wire::CwdNotFound => SpawnErrorKind::CwdNotFound,
        Wire::CwdUnusable => SpawnErrorKind::CwdUnusable,
        Wire::Other => SpawnErrorKind::Other,
        Wire::UnknownUser => SpawnErrorKind::UnknownUser,
        Wire::SwitchUser => SpawnErrorKind::SwitchUser,
    }
}

/// Maps a failed file request onto core's typed [`FileError`], by the error
/// kind the agent derived from the guest's errno.
pub(crate) fn file_error(path: &str, e: ClientError) -> FileError {
    let path = path.to_owned();
    if let ClientError::TooLarge { limit, .. } = e {
        return FileError::TooLarge {
            path,
            limit,
            instead: "stream it with Guest::read_file_stream",
        };
    }
    let Some(kind) = e.remote_kind() else {
        return FileError::Agent {
            path,
            source: Box::new(e),
        };
    };
    let source = Box::new(e);
    match kind {
        RemoteErrorKind::NotFound => FileError::NoSuchFile { path, source },
        RemoteErrorKind::PermissionDenied => FileError::PermissionDenied { path, source },
        RemoteErrorKind::IsADirectory => FileError::IsADirectory { path, source },
        RemoteErrorKind::NotADirectory => FileError::NotADirectory { path, source },
        RemoteErrorKind::AlreadyExists => FileError::AlreadyExists { path, source },
        RemoteErrorKind::NoSpace => FileError::NoSpace { path, source },
        RemoteErrorKind::ReadOnly => FileError::ReadOnly { path, source },
        RemoteErrorKind::DirectoryNotEmpty => FileError::DirectoryNotEmpty { path, source },
        RemoteErrorKind::InvalidInput
        | RemoteErrorKind::Spawn(_)
        | RemoteErrorKind::UnknownRequest
        | RemoteErrorKind::Protocol
        | RemoteErrorKind::Busy
        | RemoteErrorKind::Io => FileError::Agent { path, source },
    }
}

/// The runtime's control of a running command, for its [`ExecStream`].
#[derive(Debug)]
struct Control {
    command: nova_protocol::client::ExecController,
    /// Set once the command's exit status is known.
    ended: Arc<AtomicBool>,
    /// Whether the command runs on a pseudo-terminal.
    has_pty: bool,
}

/// The highest signal number Linux has (`SIGRTMAX`).
const MAX_SIGNAL: i32 = 64;

impl Control {
    fn check_running(&self) -> Result<(), ExecError> {
        if self.ended.load(Ordering::SeqCst) {
            return Err(ExecError::Invalid(
                "the command already ended; there is nothing to signal or resize".into(),
            ));
        }
        Ok(())
    }
}

impl nova_core::exec::ExecControl for Control {
    fn signal(&self, signal: i32) -> Result<(), ExecError> {
        if !(1..=MAX_SIGNAL).contains(&signal) {
            return Err(ExecError::Invalid(format!(
                "signal {signal} does not exist: use 1..={MAX_SIGNAL} (15 is SIGTERM, 9 SIGKILL)"
            )));
        }
        self.check_running()?;
        self.command
            .signal(signal)
            .map_err(|e| ExecError::Agent(Box::new(e)))
    }

    fn resize(&self, size: nova_core::exec::TerminalSize) -> Result<(), ExecError> {
        if !self.has_pty {
            return Err(ExecError::Invalid(
                "the command has no terminal to resize; run it with ExecRequest::pty".into(),
            ));
        }
        self.check_running()?;
        let size = nova_protocol::PtySize {
            rows: size.rows,
            cols: size.cols,
        };
        self.command
            .resize(size)
            .map_err(|e| ExecError::Agent(Box::new(e)))
    }
}

/// Runs `pump` (which owns a command's handle and feeds `consumer`'s
/// stream) to its end, unless the consumer drops its [`ExecStream`] first:
/// then `pump` is dropped, and dropping the command's handle has the agent
/// kill the command's process group.
async fn kill_when_abandoned(
    consumer: mpsc::Sender<ExecEvent>,
    pump: impl std::future::Future<Output = ()>,
) {
    tokio::select! {
        biased;
        () = pump => {}
        () = consumer.closed() => {
            tracing::debug!("the exec stream was dropped; killing the command");
        }
    }
}

async fn forward(
    stream: Option<OutputStream>,
    tx: mpsc::Sender<ExecEvent>,
    wrap: fn(Vec<u8>) -> ExecEvent,
) {
    let Some(mut stream) = stream else { return };
    while let Some(chunk) = stream.recv().await {
        if tx.send(wrap(chunk.to_vec())).await.is_err() {
            // The consumer is gone: drain so the command is not blocked.
            stream.drain().await;
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use nova_protocol::ExecCommand;

    use super::*;

    /// A guest whose client is never used: `spec` only reads `env`.
    #[test]
    fn template_env_goes_under_the_sandbox_env_and_the_request_env() {
        let defaults = nova_core::template::ExecDefaults {
            env: [("PATH", "/image/bin"), ("A", "image"), ("B", "image")]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            cwd: Some("/work".into()),
            ..Default::default()
        };
        let env = env_with_defaults(vec![("A".into(), "sandbox".into())], &defaults);
        let spec = build_spec(&env, ExecRequest::shell("env").env("B", "request")).unwrap();
        let get = |k: &str| {
            spec.env
                .iter()
                .rev()
                .find(|(name, _)| name == k)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("PATH"), Some("/image/bin"));
        assert_eq!(get("A"), Some("sandbox"));
        assert_eq!(get("B"), Some("request"));
        assert_eq!(spec.env.iter().filter(|(k, _)| k == "A").count(), 1);
    }

    #[test]
    fn the_template_user_is_the_default_and_a_request_user_overrides_it() {
        let image_user = Some("1000:1001".to_owned());
        let spec = |request: ExecRequest| {
            build_spec(
                &[],
                request_with_defaults(request, None, image_user.as_ref(), &[]),
            )
        };
        let default = spec(ExecRequest::shell("id")).unwrap();
        assert_eq!(
            default.user,
            Some(nova_protocol::ExecUser {
                user: nova_protocol::IdOrName::Id(1000),
                group: Some(nova_protocol::IdOrName::Id(1001)),
            })
        );
        let root = spec(ExecRequest::shell("id").user("root")).unwrap();
        assert_eq!(
            root.user,
            Some(nova_protocol::ExecUser {
                user: nova_protocol::IdOrName::Name("root".into()),
                group: None,
            })
        );
        let plain = build_spec(
            &[],
            request_with_defaults(ExecRequest::shell("id"), None, None, &[]),
        );
        assert_eq!(plain.unwrap().user, None);
        let bad = spec(ExecRequest::shell("id").user("a:b:c")).unwrap_err();
        assert!(
            matches!(&bad, ExecError::Invalid(m) if m.contains("USER:GROUP")),
            "{bad}"
        );
    }

    #[test]
    fn an_empty_argv_runs_the_template_command_and_a_given_one_runs_alone() {
        let image: Vec<String> = ["/bin/sh", "-c", "echo hi"].map(String::from).into();
        let spec = |request: ExecRequest, command: &[String]| {
            build_spec(&[], request_with_defaults(request, None, None, command))
        };
        let default = spec(ExecRequest::argv(Vec::<String>::new()), &image).unwrap();
        assert_eq!(
            default.command,
            nova_protocol::ExecCommand::Argv(image.clone())
        );
        let given = spec(ExecRequest::argv(["true"]), &image).unwrap();
        assert_eq!(
            given.command,
            nova_protocol::ExecCommand::Argv(vec!["true".into()])
        );
        let none = spec(ExecRequest::argv(Vec::<String>::new()), &[]).unwrap_err();
        assert!(
            matches!(&none, ExecError::Invalid(m) if m.contains("no default one")),
            "{none}"
        );
        let blank = spec(ExecRequest::argv([""]), &image).unwrap_err();
        assert!(
            matches!(&blank, ExecError::Invalid(m) if m.contains("argv[0]")),
            "{blank}"
        );
    }

    fn spec_of(env: &[(&str, &str)], request: ExecRequest) -> Result<ExecSpec, ExecError> {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        build_spec(&env, request)
    }

    #[test]
    fn request_env_overrides_sandbox_env_and_fields_carry_over() {
        let req = ExecRequest::argv(["python3", "-c", "print(1)"])
            .env("A", "request")
            .cwd("/tmp")
            .stdin(b"x".to_vec())
            .timeout(Duration::from_millis(1500));
        let spec = spec_of(&[("A", "sandbox"), ("B", "b")], req).unwrap();
        assert_eq!(
            spec.command,
            ExecCommand::Argv(vec!["python3".into(), "-c".into(), "print(1)".into()])
        );
        assert_eq!(
            spec.env,
            [
                ("B".to_owned(), "b".to_owned()),
                ("A".to_owned(), "request".to_owned())
            ]
        );
        assert_eq!(spec.cwd.as_deref(), Some("/tmp"));
        assert!(spec.stdin);
        assert_eq!(spec.timeout_ms, Some(1500));
        let spec = spec_of(&[], "echo hi".into()).unwrap();
        assert_eq!(spec.command, ExecCommand::Shell("echo hi".into()));
        assert!(!spec.stdin);
    }

    #[test]
    fn a_streamed_stdin_is_piped_even_without_initial_bytes() {
        let spec = spec_of(&[], ExecRequest::shell("cat").stream_stdin()).unwrap();
        assert!(spec.stdin);
    }

    #[test]
    fn spawn_failures_become_typed_spawn_errors_naming_the_program() {
        let e = exec_error(
            "no-such-cmd".into(),
            ClientError::Remote {
                kind: RemoteErrorKind::Spawn(nova_protocol::SpawnErrorKind::NotFound),
                message: "no-such-cmd: command not found in $PATH".into(),
            },
        );
        let ExecError::Spawn(spawn) = &e else {
            panic!("not a spawn error: {e:?}");
        };
        assert_eq!(spawn.kind, SpawnErrorKind::NotFound);
        assert_eq!(spawn.program, "no-such-cmd");
        assert_eq!(e.exit_status().map(ExitStatus::shell_code), Some(127));
        // Every wire kind maps onto the core kind with the same shell code.
        use nova_protocol::SpawnErrorKind as Wire;
        for wire in [
            Wire::NotFound,
            Wire::NotExecutable,
            Wire::BadInterpreter,
            Wire::ExecFormat,
            Wire::CwdNotFound,
            Wire::CwdUnusable,
            Wire::Other,
        ] {
            assert_eq!(spawn_kind(wire).shell_code(), wire.shell_code(), "{wire:?}");
        }
        // Other guest errors stay agent failures.
        let e = exec_error(
            "x".into(),
            ClientError::Remote {
                kind: RemoteErrorKind::InvalidInput,
                message: "empty argv".into(),
            },
        );
        assert!(matches!(e, ExecError::Agent(_)));
    }

    #[test]
    fn guest_errno_kinds_become_typed_file_errors() {
        let remote = |kind| ClientError::Remote {
            kind,
            message: "open /nonexistent/file: No such file or directory (os error 2)".into(),
        };
        let e = file_error("/nonexistent/file", remote(RemoteErrorKind::NotFound));
        assert!(matches!(e, FileError::NoSuchFile { .. }), "{e:?}");
        assert_eq!(
            e.to_string(),
            "/nonexistent/file does not exist in the guest"
        );
        // The guest's own words stay in the chain.
        let source = std::error::Error::source(&e).unwrap().to_string();
        assert!(source.contains("os error 2"), "{source}");

        for (kind, check) in [
            (
                RemoteErrorKind::PermissionDenied,
                (|e| matches!(e, FileError::PermissionDenied { .. })) as fn(&FileError) -> bool,
            ),
            (RemoteErrorKind::IsADirectory, |e| {
                matches!(e, FileError::IsADirectory { .. })
            }),
            (RemoteErrorKind::NotADirectory, |e| {
                matches!(e, FileError::NotADirectory { .. })
            }),
            (RemoteErrorKind::AlreadyExists, |e| {
                matches!(e, FileError::AlreadyExists { .. })
            }),
            (RemoteErrorKind::NoSpace, |e| {
                matches!(e, FileError::NoSpace { .. })
            }),
            (RemoteErrorKind::ReadOnly, |e| {
                matches!(e, FileError::ReadOnly { .. })
            }),
            (RemoteErrorKind::DirectoryNotEmpty, |e| {
                matches!(e, FileError::DirectoryNotEmpty { .. })
            }),
            (RemoteErrorKind::Io, |e| {
                matches!(e, FileError::Agent { .. })
            }),
        ] {
            let e = file_error("/p", remote(kind));
            assert!(check(&e), "{kind:?} -> {e:?}");
        }

        let e = file_error(
            "/big",
            ClientError::TooLarge {
                what: "the file",
                limit: 7,
                call: "read_file_to_vec",
                instead: "stream it with AgentClient::read_file",
            },
        );
        assert!(matches!(e, FileError::TooLarge { limit: 7, .. }), "{e:?}");
        assert!(e.to_string().contains("Guest::read_file_stream"), "{e}");
    }

    #[test]
    fn invalid_requests_are_refused_before_reaching_the_guest() {
        let empty: [&str; 0] = [];
        for bad in [
            ExecRequest::argv(empty),
            ExecRequest::argv([""]),
            ExecRequest::argv(["a\0b"]),
            ExecRequest::shell("a\0"),
            ExecRequest::shell("x").env("A=B", "1"),
            ExecRequest::shell("x").env("A", "1\0"),
        ] {
            assert!(matches!(spec_of(&[], bad), Err(ExecError::Invalid(_))));
        }
    }
}
