//! MCP (Model Context Protocol) tools over the daemon: what an agent that
//! speaks MCP uses instead of the HTTP API.
//!
//! ```text
//! MCP client --stdio (nova mcp) | streamable HTTP (/mcp on nova serve)--> rmcp
//!   -> NovaMcp (one per MCP session)        tool arguments: schemars types below
//!        -> Daemon::{create, list, delete, known, ...}   same policy, limits, records
//!             -> Arc<dyn Hypervisor>
//!   <- structured JSON, or a tool error (isError) carrying the daemon's problem
//! ```
//!
//! Tools: `create_sandbox`, `run_command`, `read_file`, `write_file`,
//! `list_files`, `get_stats`, `stop_sandbox`, `list_sandboxes`. Each calls
//! the same [`Daemon`] methods the HTTP handlers call, so a create goes
//! through [`Policy::admit`](crate::policy::Policy::admit) and every limit
//! applies as it does over HTTP. A failure is a tool result with `isError`
//! and the [`Problem`] (its stable `code` and a `detail` saying what to do),
//! never a protocol error, so a model can read it and recover.
//!
//! **Sessions.** Each MCP session gets its own [`NovaMcp`]; the sandboxes it
//! creates are stopped when the session ends (the stdio transport closes,
//! the HTTP session is deleted or idles out after [`HTTP_SESSION_IDLE`]),
//! unless `create_sandbox` was called with `keep: true`. Every sandbox also
//! has its lifetime (`timeout_secs`), as over HTTP. A streamable-HTTP
//! request without a session (the stateless `2026-07-28` protocol) binds
//! nothing: its sandboxes live until their lifetime ends or `stop_sandbox`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use nova_core::error::ExecError;
use nova_core::exec::{Command, ExecEvent, ExecRequest, ExitStatus};
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::{Json, Parameters};
use rmcp::model::{CallToolResult, Implementation, ServerCapabilities, ServerConfig};
use rmcp::service::RequestContext;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{RoleServer, ServerHandler, ServiceExt, tool, tool_handler, tool_router};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::api::sandboxes::{CreateSandboxRequest, SandboxView, StatsView};
use crate::daemon::Daemon;
use crate::problem::{Problem, ProblemCode};

/// Most bytes of a file `read_file` returns.
pub const MAX_READ_BYTES: u64 = 1024 * 1024;
/// Most bytes of `write_file` content (decoded).
pub const MAX_WRITE_BYTES: usize = 4 * 1024 * 1024;
/// Most bytes of each of stdout and stderr `run_command` returns: the first
/// and last half of it, with the middle cut out and counted.
pub const MAX_OUTPUT_BYTES: usize = 64 * 1024;
/// `run_command`'s timeout when none is given, seconds.
pub const DEFAULT_COMMAND_TIMEOUT_SECS: u64 = 60;
/// The longest `run_command` timeout, seconds.
pub const MAX_COMMAND_TIMEOUT_SECS: u64 = 3600;
/// An HTTP MCP session with no request for this long ends (and its
/// sandboxes are stopped).
pub const HTTP_SESSION_IDLE: Duration = Duration::from_secs(30 * 60);

const INSTRUCTIONS: &str = "NovaSandbox: disposable Linux microVMs for running untrusted code. \
Call create_sandbox first (template `python` has python3; `minimal` is a small shell system), \
then run_command / write_file / read_file / list_files with its sandbox_id, and stop_sandbox \
when done. Sandboxes this session creates are stopped when the session ends unless created \
with keep=true. Errors come back as tool errors with a `code` and a `detail` that says what to do.";

/// The sandboxes one MCP session created and must stop when it ends.
#[derive(Debug)]
struct SessionSandboxes {
    daemon: Arc<Daemon>,
    state: Mutex<SessionState>,
}

#[derive(Debug, Default)]
struct SessionState {
    owned: BTreeSet<String>,
    closed: bool,
}

impl SessionSandboxes {
    fn lock(&self) -> std::sync::MutexGuard<'_, SessionState> {
        // A set of ids: a poisoned lock still holds a whole set.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records `id` as this session's; `false` when the session already
    /// ended (the caller stops it).
    fn adopt(&self, id: &str) -> bool {
        let mut state = self.lock();
        if state.closed {
            return false;
        }
        state.owned.insert(id.to_owned());
        true
    }

    fn forget(&self, id: &str) {
        self.lock().owned.remove(id);
    }

    fn is_owned(&self, id: &str) -> bool {
        self.lock().owned.contains(id)
    }

    fn take_all(&self) -> Vec<String> {
        let mut state = self.lock();
        state.closed = true;
        std::mem::take(&mut state.owned).into_iter().collect()
    }

    /// Ends the session: stops (force) and forgets every sandbox it owns.
    async fn close(&self) {
        stop_all(&self.daemon, self.take_all()).await;
    }
}

async fn stop_all(daemon: &Daemon, ids: Vec<String>) {
    let stops = ids.iter().map(|id| async move {
        match daemon.delete(id, true).await {
            Ok(()) => tracing::info!(sandbox = %id, "MCP session ended; sandbox stopped"),
            Err(p) if p.code == ProblemCode::SandboxNotFound => {}
            Err(p) => {
                tracing::warn!(sandbox = %id, detail = %p.detail, "cannot stop an MCP session's sandbox");
            }
        }
    });
    futures_util::future::join_all(stops).await;
}

/// Stops (force) and forgets every sandbox `daemon` shows: what a process
/// whose VMs cannot outlive it does at exit (`nova mcp`).
pub async fn stop_every_sandbox(daemon: &Daemon) {
    let ids = daemon.list().await.into_iter().map(|v| v.id).collect();
    stop_all(daemon, ids).await;
}

impl Drop for SessionSandboxes {
    fn drop(&mut self) {
        let ids = self.take_all();
        if ids.is_empty() {
            return;
        }
        // The session's last handle is gone (an HTTP session ended): stop its
        // sandboxes on the daemon's runtime.
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                let daemon = self.daemon.clone();
                runtime.spawn(async move { stop_all(&daemon, ids).await });
            }
            Err(_) => {
                tracing::warn!(
                    ?ids,
                    "MCP session ended outside a runtime; its sandboxes run until their lifetime ends"
                );
            }
        }
    }
}

/// The MCP server of one session over a [`Daemon`].
#[derive(Debug, Clone)]
pub struct NovaMcp {
    daemon: Arc<Daemon>,
    session: Arc<SessionSandboxes>,
    #[allow(
        dead_code,
        reason = "read by the code #[tool_handler] generates, which the lint does not see"
    )]
    tool_router: ToolRouter<Self>,
}

/// A stdio MCP session that ends when its client closes the pipe.
#[derive(Debug)]
pub struct StdioSession {
    session: Arc<SessionSandboxes>,
}

impl StdioSession {
    /// Serves MCP on `transport` (stdin and stdout for `nova mcp`) until
    /// the client closes it, then stops the session's sandboxes.
    pub async fn serve<T, E, A>(daemon: Arc<Daemon>, transport: T) -> Result<(), McpError>
    where
        T: rmcp::transport::IntoTransport<RoleServer, E, A>,
        E: std::error::Error + Send + Sync + 'static,
    {
        let server = NovaMcp::new(daemon);
        let this = Self {
            session: server.session.clone(),
        };
        let result = match server.serve(transport).await {
            Ok(running) => running
                .waiting()
                .await
                .map(|_| ())
                .map_err(|e| McpError(e.to_string())),
            Err(e) => Err(McpError(e.to_string())),
        };
        this.session.close().await;
        result
    }
}

/// The MCP session could not start or broke off.
#[derive(Debug, thiserror::Error)]
#[error("MCP session failed: {0}")]
pub struct McpError(String);

/// The streamable-HTTP MCP endpoint: a new [`NovaMcp`] per MCP session.
///
/// Mounted at `/mcp` by [`crate::api::router`], behind the same
/// authentication as the rest of the API (none on the Unix socket, the
/// bearer token over TCP), so the `Host` check rmcp makes against DNS
/// rebinding is off: a browser page cannot present the token.
pub fn http_service(daemon: Arc<Daemon>) -> StreamableHttpService<NovaMcp, LocalSessionManager> {
    let mut sessions = LocalSessionManager::default();
    sessions.session_config.keep_alive = Some(HTTP_SESSION_IDLE);
    let config = StreamableHttpServerConfig::default().disable_allowed_hosts();
    StreamableHttpService::new(
        move || Ok(NovaMcp::new(daemon.clone())),
        Arc::new(sessions),
        config,
    )
}

// ---- tool arguments -------------------------------------------------------

/// Arguments of `create_sandbox`.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateArgs {
    /// Template id: `python` (Debian with python3) or `minimal` (busybox
    /// shell); the operator's default when absent.
    #[serde(default)]
    pub template: Option<String>,
    /// Guest memory in MiB (at least 128; the operator caps it). Default:
    /// the template's.
    #[serde(default)]
    pub memory_mb: Option<u32>,
    /// Virtual CPUs (at least 1; the operator caps it). Default: the
    /// template's.
    #[serde(default)]
    pub vcpus: Option<u8>,
    /// Give the sandbox outbound network access (NAT). Default: the
    /// operator's (often off).
    #[serde(default)]
    pub network: Option<bool>,
    /// Lifetime in seconds: the sandbox is stopped this long after creation.
    /// Default: the operator's (300 s unless configured).
    #[serde(default)]
    #[schemars(range(min = 1))]
    pub timeout_secs: Option<u64>,
    /// Keep the sandbox when this MCP session ends (it still stops when its
    /// lifetime ends). Default false: the session's sandboxes are stopped
    /// when it ends.
    #[serde(default)]
    pub keep: bool,
}

/// Arguments of `run_command`.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RunArgs {
    /// The sandbox (`sb-...`), from create_sandbox or list_sandboxes.
    pub sandbox_id: String,
    /// A shell command line, run with `/bin/sh -c` (pipes, redirects, `&&`
    /// work). Give this or `argv`.
    #[serde(default)]
    pub command: Option<String>,
    /// Program and arguments, run without a shell. Give this or `command`.
    #[serde(default)]
    pub argv: Option<Vec<String>>,
    /// Kill the command after this many seconds (exit code 124). Default
    /// 60, at most 3600.
    #[serde(default)]
    #[schemars(range(min = 1, max = 3600))]
    pub timeout_secs: Option<u64>,
    /// Working directory in the guest (absolute). Default `/root`.
    #[serde(default)]
    pub cwd: Option<String>,
    /// Extra environment variables.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Text written to the command's stdin, which is then closed.
    #[serde(default)]
    pub stdin: Option<String>,
}

/// Arguments of `read_file`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReadArgs {
    /// The sandbox (`sb-...`).
    pub sandbox_id: String,
    /// Absolute guest path, e.g. `/root/out.txt`.
    pub path: String,
    /// `text` (default: UTF-8; a binary file is refused) or `base64` (any
    /// file).
    #[serde(default)]
    pub encoding: Encoding,
}

/// How file content is carried.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Encoding {
    /// UTF-8 text.
    #[default]
    Text,
    /// Base64 of the bytes (standard alphabet, padded).
    Base64,
}

/// Arguments of `write_file`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WriteArgs {
    /// The sandbox (`sb-...`).
    pub sandbox_id: String,
    /// Absolute guest path; the file is created or replaced, and missing
    /// parent directories are made.
    pub path: String,
    /// The content: text, or base64 with `encoding: base64`. At most 4 MiB.
    pub content: String,
    /// `text` (default) or `base64`.
    #[serde(default)]
    pub encoding: Encoding,
    /// Permission bits in octal, e.g. `755` for a script. Default `644`.
    #[serde(default)]
    pub mode: Option<String>,
}

/// Arguments of `list_files`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListFilesArgs {
    /// The sandbox (`sb-...`).
    pub sandbox_id: String,
    /// Absolute guest directory. Default `/root`.
    #[serde(default)]
    pub path: Option<String>,
}

/// Arguments of the tools that name only a sandbox.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SandboxArgs {
    /// The sandbox (`sb-...`).
    pub sandbox_id: String,
}

/// Arguments of `list_sandboxes` (none).
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NoArgs {}

// ---- tool results ---------------------------------------------------------

/// A sandbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SandboxOut {
    /// Its id: pass it as `sandbox_id` to the other tools.
    pub sandbox_id: String,
    /// Its template.
    pub template: String,
    /// `creating`, `running`, `paused`, `stopping`, `stopped` or `failed`.
    pub state: String,
    /// Guest memory, MiB.
    pub memory_mb: u32,
    /// vCPUs.
    pub vcpus: u8,
    /// Whether it has outbound network access.
    pub network: bool,
    /// When its lifetime ends, milliseconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<u64>,
    /// How long it took to start, milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_time_ms: Option<f64>,
    /// Whether it is stopped when this MCP session ends.
    pub stops_with_session: bool,
    /// Why it failed, when `failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
}

impl SandboxOut {
    fn new(view: SandboxView, stops_with_session: bool) -> Self {
        let state = serde_json::to_value(view.state)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        Self {
            sandbox_id: view.id,
            template: view.template,
            state,
            memory_mb: view.memory_mb,
            vcpus: view.vcpus,
            network: view.network,
            expires_at_ms: view.expires_at_ms,
            boot_time_ms: view.boot.map(|b| b.boot_time_ms),
            stops_with_session,
            failure: view.failure,
        }
    }
}

/// The sandboxes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SandboxList {
    /// Every sandbox the daemon shows, oldest first.
    pub sandboxes: Vec<SandboxOut>,
}

/// A finished command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CommandOut {
    /// The exit code a shell reports: 0 is success; 124 timed out; 126/127
    /// could not start; 128+N killed by signal N.
    pub exit_code: i32,
    /// Whether the timeout killed it.
    pub timed_out: bool,
    /// Its stdout (UTF-8, invalid bytes replaced).
    pub stdout: String,
    /// Its stderr (UTF-8, invalid bytes replaced).
    pub stderr: String,
    /// Whether stdout or stderr was cut (the middle is replaced by a marker
    /// that counts the bytes left out; redirect to a file and read_file or
    /// grep it for all of it).
    pub truncated: bool,
    /// Wall time, milliseconds.
    pub duration_ms: u64,
}

/// A file's content.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct FileOut {
    /// The guest path.
    pub path: String,
    /// Its size, bytes.
    pub size: u64,
    /// How `content` is encoded.
    pub encoding: Encoding,
    /// The content.
    pub content: String,
}

/// What a write did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct WriteOut {
    /// The guest path.
    pub path: String,
    /// Bytes written.
    pub bytes: u64,
}

/// A directory's entries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ListingOut {
    /// The directory.
    pub path: String,
    /// Its entries, sorted by name.
    pub entries: Vec<EntryOut>,
    /// Whether the directory had more entries than one listing carries.
    pub truncated: bool,
}

/// One directory entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct EntryOut {
    /// File name.
    pub name: String,
    /// `file`, `dir`, `symlink` or `other`.
    pub kind: String,
    /// Size, bytes.
    pub size: u64,
    /// Permission bits in octal, e.g. `644`.
    pub mode: String,
}

/// Resource usage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct StatsOut {
    /// Guest memory in use, MiB.
    pub memory_usage_mb: f64,
    /// Guest memory size, MiB.
    pub memory_limit_mb: u64,
    /// CPU time used, microseconds.
    pub cpu_usage_us: u64,
    /// Time since creation, milliseconds.
    pub uptime_ms: u64,
    /// Processes in the guest, when the guest answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process_count: Option<u64>,
    /// Bytes used on the guest's root file system, when the guest answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_used_bytes: Option<u64>,
    /// 1-minute load average in the guest, when the guest answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_avg_1m: Option<f64>,
}

impl From<StatsView> for StatsOut {
    fn from(s: StatsView) -> Self {
        Self {
            memory_usage_mb: s.memory_usage_mb,
            memory_limit_mb: s.memory_limit_mb,
            cpu_usage_us: s.cpu_usage_us,
            uptime_ms: s.uptime_ms,
            process_count: s.process_count,
            disk_used_bytes: s.disk_used_bytes,
            load_avg_1m: s.load_avg_1m,
        }
    }
}

/// What `stop_sandbox` did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct StopOut {
    /// The sandbox.
    pub sandbox_id: String,
    /// Always true: it is stopped and gone from list_sandboxes.
    pub stopped: bool,
}

/// A tool's result: structured output, or a tool error with the problem.
type ToolResult<T> = Result<Json<T>, CallToolResult>;

/// The tool error a model sees: the problem document as JSON.
fn tool_error(mut problem: Problem) -> CallToolResult {
    if problem.code == ProblemCode::SandboxNotFound {
        problem.detail =
            "no such sandbox: it was stopped, its lifetime ended, or the id is wrong; \
                          list_sandboxes lists them, create_sandbox makes a new one"
                .to_owned();
    }
    match serde_json::to_value(&problem) {
        Ok(value) => CallToolResult::structured_error(value),
        Err(_) => CallToolResult::error(vec![rmcp::model::ContentBlock::text(format!(
            "{}: {}",
            problem.code.as_str(),
            problem.detail
        ))]),
    }
}

// ---- the tools ------------------------------------------------------------

#[tool_router]
impl NovaMcp {
    /// A server for one MCP session over `daemon`.
    pub fn new(daemon: Arc<Daemon>) -> Self {
        Self {
            session: Arc::new(SessionSandboxes {
                daemon: daemon.clone(),
                state: Mutex::new(SessionState::default()),
            }),
            daemon,
            tool_router: Self::tool_router(),
        }
    }

    /// Stops the sandboxes this session created (not those created with
    /// `keep: true`), as when the session ends.
    pub async fn end_session(&self) {
        self.session.close().await;
    }

    #[tool(
        description = "Create a new Linux microVM sandbox and wait until it is ready (about 1-3 s). \
Returns its sandbox_id: pass it to run_command, write_file, read_file, list_files, get_stats, stop_sandbox. \
Templates: `python` (python3 installed), `minimal` (busybox shell). Units: memory_mb in MiB, timeout_secs is \
the sandbox's lifetime in seconds. The sandbox is stopped when this MCP session ends unless keep=true. \
On a `quota_exceeded` or `busy` error, stop sandboxes you no longer need (list_sandboxes) or retry shortly."
    )]
    async fn create_sandbox(
        &self,
        Parameters(args): Parameters<CreateArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> ToolResult<SandboxOut> {
        let request = CreateSandboxRequest {
            template: args.template,
            memory_mb: args.memory_mb,
            vcpus: args.vcpus,
            network: args.network,
            timeout_secs: args.timeout_secs,
            ..CreateSandboxRequest::default()
        };
        let view = self.daemon.create(request).await.map_err(tool_error)?;
        let bound = !args.keep && has_session(&ctx);
        if bound && !self.session.adopt(&view.id) {
            // The session ended while this create ran.
            stop_all(&self.daemon, vec![view.id.clone()]).await;
            return Err(tool_error(Problem::new(
                ProblemCode::NotRunning,
                "the MCP session ended while the sandbox was being created; it was stopped",
            )));
        }
        Ok(Json(SandboxOut::new(view, bound)))
    }

    #[tool(
        description = "Run a command in a sandbox to completion and return exit_code, stdout and stderr. \
Give `command` (a shell line run with /bin/sh -c) or `argv` (no shell). Default timeout 60 s (timeout_secs, \
max 3600); a command that runs longer is killed with exit_code 124. Each of stdout and stderr is returned up to \
64 KiB (first and last 32 KiB, `truncated` says so): for large output, redirect it to a file and use read_file, \
grep or tail. Commands in one sandbox share its files; each starts in /root unless `cwd` is given."
    )]
    async fn run_command(&self, Parameters(args): Parameters<RunArgs>) -> ToolResult<CommandOut> {
        run(&self.daemon, args).await.map(Json).map_err(tool_error)
    }

    #[tool(
        description = "Read a file from a sandbox. Text by default (UTF-8); a binary file is refused unless \
encoding=base64. At most 1 MiB: for a larger file use run_command with head, tail, grep or split."
    )]
    async fn read_file(&self, Parameters(args): Parameters<ReadArgs>) -> ToolResult<FileOut> {
        read(&self.daemon, args).await.map(Json).map_err(tool_error)
    }

    #[tool(
        description = "Write a file in a sandbox (created or replaced; missing parent directories are made). \
`content` is text, or base64 with encoding=base64; at most 4 MiB. mode is octal permission bits (default 644; \
755 for a script)."
    )]
    async fn write_file(&self, Parameters(args): Parameters<WriteArgs>) -> ToolResult<WriteOut> {
        write(&self.daemon, args)
            .await
            .map(Json)
            .map_err(tool_error)
    }

    #[tool(
        description = "List a directory in a sandbox (default /root): name, kind (file, dir, symlink, other), \
size in bytes and octal mode of each entry."
    )]
    async fn list_files(
        &self,
        Parameters(args): Parameters<ListFilesArgs>,
    ) -> ToolResult<ListingOut> {
        list_files(&self.daemon, args)
            .await
            .map(Json)
            .map_err(tool_error)
    }

    #[tool(
        description = "Resource usage of a sandbox: memory in use and its size (MiB), CPU time (microseconds), \
uptime (milliseconds), and the guest's process count, disk use (bytes) and 1-minute load average."
    )]
    async fn get_stats(&self, Parameters(args): Parameters<SandboxArgs>) -> ToolResult<StatsOut> {
        let stats = async {
            let id = self.daemon.known(&args.sandbox_id).await?;
            let stats = self.daemon.hypervisor().get_sandbox_stats(&id).await?;
            Ok::<_, Problem>(StatsOut::from(StatsView::from(stats)))
        };
        stats.await.map(Json).map_err(tool_error)
    }

    #[tool(
        description = "Stop a sandbox: its VM is shut down, everything in it is lost, and it disappears from \
list_sandboxes. Copy out what you need first (read_file)."
    )]
    async fn stop_sandbox(&self, Parameters(args): Parameters<SandboxArgs>) -> ToolResult<StopOut> {
        self.daemon
            .delete(&args.sandbox_id, false)
            .await
            .map_err(tool_error)?;
        self.session.forget(&args.sandbox_id);
        Ok(Json(StopOut {
            sandbox_id: args.sandbox_id,
            stopped: true,
        }))
    }

    #[tool(
        description = "List the sandboxes (this session's and others the daemon runs): id, template, state, \
resources, when each one's lifetime ends, and whether it stops with this session."
    )]
    async fn list_sandboxes(
        &self,
        Parameters(_args): Parameters<NoArgs>,
    ) -> ToolResult<SandboxList> {
        let sandboxes = self
            .daemon
            .list()
            .await
            .into_iter()
            .map(|view| {
                let bound = self.session.is_owned(&view.id);
                SandboxOut::new(view, bound)
            })
            .collect();
        Ok(Json(SandboxList { sandboxes }))
    }
}

#[tool_handler]
impl ServerHandler for NovaMcp {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new(
                "novasandbox",
                env!("CARGO_PKG_VERSION"),
            ))
            .with_instructions(INSTRUCTIONS)
    }
}

/// Whether the request belongs to a session that ends: always over stdio;
/// over streamable HTTP only with an `Mcp-Session-Id` (a stateless request
/// has no session to end).
fn has_session(ctx: &RequestContext<RoleServer>) -> bool {
    match ctx.extensions.get::<axum::http::request::Parts>() {
        Some(parts) => parts.headers.contains_key("mcp-session-id"),
        None => true,
    }
}

async fn run(daemon: &Daemon, args: RunArgs) -> Result<CommandOut, Problem> {
    let command = match (args.command, args.argv) {
        (Some(line), None) if !line.trim().is_empty() => Command::Shell(line),
        (None, Some(argv)) if !argv.is_empty() => Command::Argv(argv),
        (Some(_), Some(_)) => {
            return Err(Problem::invalid_request(
                "give either command (a shell line) or argv, not both",
            ));
        }
        _ => {
            return Err(Problem::invalid_request(
                "nothing to run: give command (a shell line, e.g. \"ls -la\") or argv",
            ));
        }
    };
    let timeout_secs = args.timeout_secs.unwrap_or(DEFAULT_COMMAND_TIMEOUT_SECS);
    if !(1..=MAX_COMMAND_TIMEOUT_SECS).contains(&timeout_secs) {
        return Err(Problem::invalid_request(format!(
            "timeout_secs {timeout_secs} is out of range: use 1..={MAX_COMMAND_TIMEOUT_SECS}"
        )));
    }
    let id = daemon.known(&args.sandbox_id).await?;
    let mut env = daemon.sandbox_env(&id);
    env.extend(args.env);
    let timeout = Duration::from_secs(timeout_secs);
    let request = ExecRequest {
        command,
        env,
        cwd: args.cwd,
        stdin: args.stdin.map(String::into_bytes),
        stream_stdin: false,
        timeout: Some(timeout),
        max_output: None,
        pty: None,
        user: None,
    };
    let started = std::time::Instant::now();
    let mut stream = match daemon.hypervisor().exec_stream(&id, request).await {
        Ok(stream) => stream,
        Err(ExecError::Spawn(e)) => {
            daemon.metrics().exec_done(true);
            return Ok(CommandOut {
                exit_code: e.exit_status().shell_code(),
                timed_out: false,
                stdout: String::new(),
                stderr: e.message,
                truncated: false,
                duration_ms: 0,
            });
        }
        Err(e) => {
            daemon.metrics().exec_done(false);
            return Err(e.into());
        }
    };
    let (mut stdout, mut stderr) = (Bounded::default(), Bounded::default());
    // The guest kills the command at its timeout; this bounds a guest that
    // does not answer.
    let deadline = tokio::time::Instant::now() + timeout + Duration::from_secs(30);
    let status = loop {
        match tokio::time::timeout_at(deadline, stream.next()).await {
            Ok(Some(ExecEvent::Stdout(bytes))) => stdout.push(&bytes),
            Ok(Some(ExecEvent::Stderr(bytes))) => stderr.push(&bytes),
            Ok(Some(ExecEvent::Exited(status))) => break status,
            Ok(None) => {
                daemon.metrics().exec_done(false);
                return Err(Problem::new(
                    ProblemCode::AgentError,
                    "the guest agent connection ended before the command did; check the sandbox with get_stats",
                ));
            }
            Err(_) => {
                daemon.metrics().exec_done(false);
                return Err(Problem::new(
                    ProblemCode::AgentError,
                    "the guest did not end the command at its timeout; the sandbox may be wedged: stop it",
                ));
            }
        }
    };
    daemon.metrics().exec_done(true);
    let truncated = stdout.cut() > 0 || stderr.cut() > 0;
    Ok(CommandOut {
        exit_code: status.shell_code(),
        timed_out: status == ExitStatus::TimedOut,
        stdout: stdout.into_text(),
        stderr: stderr.into_text(),
        truncated,
        duration_ms: started.elapsed().as_millis().try_into().unwrap_or(u64::MAX),
    })
}

/// The first and last [`MAX_OUTPUT_BYTES`]/2 bytes of a stream, and how
/// many were left out between them.
#[derive(Debug, Default)]
struct Bounded {
    head: Vec<u8>,
    tail: VecDeque<u8>,
    total: u64,
}

impl Bounded {
    const HALF: usize = MAX_OUTPUT_BYTES / 2;

    fn push(&mut self, mut bytes: &[u8]) {
        self.total += bytes.len() as u64;
        let room = Self::HALF.saturating_sub(self.head.len());
        let (first, rest) = bytes.split_at(room.min(bytes.len()));
        self.head.extend_from_slice(first);
        bytes = rest;
        if bytes.len() >= Self::HALF {
            bytes = &bytes[bytes.len() - Self::HALF..];
            self.tail.clear();
        }
        let over = (self.tail.len() + bytes.len()).saturating_sub(Self::HALF);
        self.tail.drain(..over);
        self.tail.extend(bytes);
    }

    fn cut(&self) -> u64 {
        self.total - (self.head.len() + self.tail.len()) as u64
    }

    fn into_text(self) -> String {
        let cut = self.cut();
        let mut text = String::from_utf8_lossy(&self.head).into_owned();
        if cut > 0 {
            text.push_str(&format!(
                "\n[... {cut} bytes left out; redirect the output to a file to see all of it ...]\n"
            ));
        }
        let tail: Vec<u8> = self.tail.into_iter().collect();
        text.push_str(&String::from_utf8_lossy(&tail));
        text
    }
}

async fn read(daemon: &Daemon, args: ReadArgs) -> Result<FileOut, Problem> {
    nova_core::error::FileError::check_path(&args.path)?;
    let id = daemon.known(&args.sandbox_id).await?;
    let stat = daemon.hypervisor().stat(&id, &args.path).await?;
    if stat.kind == nova_core::fs::FileKind::Dir {
        return Err(Problem::new(
            ProblemCode::FileConflict,
            format!("{} is a directory: use list_files", args.path),
        ));
    }
    let too_large = |size: u64| {
        Problem::new(
            ProblemCode::PayloadTooLarge,
            format!(
                "{} is {size} bytes, more than read_file returns ({MAX_READ_BYTES}): \
                 use run_command with head -c, tail, grep or split",
                args.path
            ),
        )
    };
    if stat.size > MAX_READ_BYTES {
        return Err(too_large(stat.size));
    }
    let mut download = daemon.hypervisor().download(&id, &args.path).await?;
    let mut bytes = Vec::new();
    while let Some(chunk) = download.next().await? {
        bytes.extend_from_slice(&chunk);
        if bytes.len() as u64 > MAX_READ_BYTES {
            // It grew since the stat.
            return Err(too_large(bytes.len() as u64));
        }
    }
    let size = bytes.len() as u64;
    let content = match args.encoding {
        Encoding::Base64 => base64::engine::general_purpose::STANDARD.encode(&bytes),
        Encoding::Text => String::from_utf8(bytes).map_err(|_| {
            Problem::new(
                ProblemCode::InvalidRequest,
                format!(
                    "{} is not UTF-8 text: read it again with encoding=base64",
                    args.path
                ),
            )
        })?,
    };
    Ok(FileOut {
        path: args.path,
        size,
        encoding: args.encoding,
        content,
    })
}

async fn write(daemon: &Daemon, args: WriteArgs) -> Result<WriteOut, Problem> {
    nova_core::error::FileError::check_path(&args.path)?;
    let mode = crate::api::files::parse_mode(args.mode.as_deref(), 0o644)?;
    let data = match args.encoding {
        Encoding::Text => args.content.into_bytes(),
        Encoding::Base64 => base64::engine::general_purpose::STANDARD
            .decode(args.content.trim())
            .map_err(|e| Problem::invalid_request(format!("content is not valid base64 ({e})")))?,
    };
    let limit = (daemon.policy().limits.max_upload_bytes).min(MAX_WRITE_BYTES as u64);
    if data.len() as u64 > limit {
        return Err(Problem::new(
            ProblemCode::PayloadTooLarge,
            format!(
                "the content is {} bytes, more than write_file takes ({limit}): split it or \
                 generate the file in the sandbox with run_command",
                data.len()
            ),
        ));
    }
    let id = daemon.known(&args.sandbox_id).await?;
    if let Some((parent, _)) = args.path.rsplit_once('/')
        && !parent.is_empty()
    {
        daemon.hypervisor().mkdir(&id, parent, 0o755).await?;
    }
    let bytes = data.len() as u64;
    daemon
        .hypervisor()
        .write_file(&id, &args.path, data, mode)
        .await?;
    Ok(WriteOut {
        path: args.path,
        bytes,
    })
}

async fn list_files(daemon: &Daemon, args: ListFilesArgs) -> Result<ListingOut, Problem> {
    let path = args.path.unwrap_or_else(|| "/root".to_owned());
    nova_core::error::FileError::check_path(&path)?;
    let id = daemon.known(&args.sandbox_id).await?;
    let listing = daemon.hypervisor().list_dir(&id, &path).await?;
    let listing = crate::api::files::DirListingView::from(listing);
    Ok(ListingOut {
        path,
        entries: listing
            .entries
            .into_iter()
            .map(|e| EntryOut {
                name: e.name,
                kind: serde_json::to_value(e.kind)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default(),
                size: e.size,
                mode: format!("{:o}", e.mode & 0o7777),
            })
            .collect(),
        truncated: listing.truncated,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_output_keeps_head_and_tail() {
        let mut b = Bounded::default();
        b.push(b"hello\n");
        assert_eq!(b.cut(), 0);
        assert_eq!(b.into_text(), "hello\n");

        let mut b = Bounded::default();
        let big = vec![b'x'; MAX_OUTPUT_BYTES * 3];
        b.push(b"start");
        b.push(&big);
        b.push(b"end");
        assert_eq!(b.head.len(), Bounded::HALF);
        assert_eq!(b.tail.len(), Bounded::HALF);
        assert_eq!(b.cut(), (5 + big.len() + 3 - MAX_OUTPUT_BYTES) as u64);
        let text = b.into_text();
        assert!(text.starts_with("startx"));
        assert!(text.ends_with("xend"));
        assert!(text.contains("bytes left out"));
    }

    #[test]
    fn bounded_output_in_small_pieces() {
        let mut b = Bounded::default();
        for i in 0..(MAX_OUTPUT_BYTES / 10 + 1000) {
            b.push(format!("{:09}\n", i).as_bytes());
        }
        assert_eq!(b.head.len(), Bounded::HALF);
        assert_eq!(b.tail.len(), Bounded::HALF);
        assert!(b.cut() > 0);
    }

    #[test]
    fn problems_become_tool_errors_with_their_code() {
        let result = tool_error(Problem::sandbox_not_found("sb-x"));
        assert_eq!(result.is_error, Some(true));
        let value = result.structured_content.expect("structured");
        assert_eq!(value["code"], "sandbox_not_found");
        assert!(value["detail"].as_str().unwrap().contains("list_sandboxes"));
    }

    #[test]
    fn tool_arguments_refuse_unknown_fields() {
        let err = serde_json::from_value::<RunArgs>(serde_json::json!({
            "sandbox_id": "sb-x", "cmd": "ls"
        }));
        assert!(err.is_err());
        let ok: CreateArgs = serde_json::from_value(serde_json::json!({"keep": true})).unwrap();
        assert!(ok.keep);
    }
}
