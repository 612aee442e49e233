//! `/v1/sandboxes`: create, list, get, stop, delete, pause, resume, lifetime,
//! stats and console logs.
//!
//! The wire types here are the API's own: a [`CreateSandboxRequest`] is
//! what an untrusted caller may ask for (no host paths, kernel arguments or
//! drives), turned into a runtime config only by
//! [`Policy::admit`](crate::policy::Policy::admit).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use nova_core::metadata::SandboxInfo;
use nova_core::network::{EgressConfig, PortProtocol};
use nova_core::state::SandboxState;
use nova_core::stats::SandboxStats;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::api::{ApiJson, ApiPath, ApiQuery};
use crate::daemon::Daemon;
use crate::problem::Problem;
use crate::records::Record;

/// A caller's request for a sandbox. Every field is optional; unknown fields
/// are refused.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSandboxRequest {
    /// Template id (`GET /v1/templates`); the policy's default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// Guest memory in MiB (128 up to the policy's per-sandbox limit); when
    /// absent, the size the template's snapshot was taken with (so the
    /// create restores it), else the template's recommended size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 128)]
    pub memory_mb: Option<u32>,
    /// vCPUs (1 up to the policy's per-sandbox limit); when absent, as for
    /// `memory_mb`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1)]
    pub vcpus: Option<u8>,
    /// Give the sandbox a network (NAT to the outside); the policy's default
    /// when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<bool>,
    /// Published ports: `host_port` on the host (all addresses, and
    /// 127.0.0.1) forwards to `guest_port` in the guest. A host port in use
    /// is refused with 409 `port_in_use`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortMapping>,
    /// What the sandbox may reach outside (needs a network); everything
    /// but the always-denied ranges when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<EgressView>,
    /// Labels for finding the sandbox, with Kubernetes label syntax; keys
    /// starting with `nova.` are the daemon's.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Environment variables for every command run in the sandbox.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Lifetime in seconds: the sandbox is stopped this long after its
    /// create (or its last `POST .../timeout`). The policy's default when
    /// absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1)]
    pub timeout_secs: Option<u64>,
    /// Named volumes the operator's policy offers, attached as extra block
    /// devices (`/dev/vdc`, ... in order).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VolumeMount>,
    /// Restore the template's snapshot (`snapshot`), boot the kernel
    /// (`cold`), or restore when a snapshot fits (`auto`, the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<StartModeView>,
}

/// A published port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PortMapping {
    /// Port on the host (and on 127.0.0.1).
    #[schema(minimum = 1, maximum = 65535)]
    pub host_port: u16,
    /// Port in the guest.
    #[schema(minimum = 1, maximum = 65535)]
    pub guest_port: u16,
    /// `tcp` (the default) or `udp`.
    #[serde(default)]
    pub protocol: PortProtocolView,
}

/// A published port's protocol.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum PortProtocolView {
    /// TCP.
    #[default]
    Tcp,
    /// UDP.
    Udp,
}

impl From<PortProtocolView> for PortProtocol {
    fn from(p: PortProtocolView) -> Self {
        match p {
            PortProtocolView::Tcp => Self::Tcp,
            PortProtocolView::Udp => Self::Udp,
        }
    }
}

impl From<PortProtocol> for PortProtocolView {
    fn from(p: PortProtocol) -> Self {
        match p {
            PortProtocol::Udp => Self::Udp,
            _ => Self::Tcp,
        }
    }
}

/// What a sandbox may reach outside: rules the host enforces (nftables),
/// whatever the guest does. Other sandboxes, the host's own addresses and
/// 169.254.169.254 are always denied unless allowed explicitly.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EgressView {
    /// Deny everything not in `allow`.
    #[serde(default)]
    pub block_all: bool,
    /// Allowed IPv4 CIDRs (`10.0.0.0/8`, `192.0.2.7`). Domain names are
    /// checked but not yet enforced.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Denied IPv4 CIDRs; a deny wins over an allow.
    #[serde(default)]
    pub deny: Vec<String>,
}

impl From<EgressView> for EgressConfig {
    fn from(e: EgressView) -> Self {
        Self {
            block_all: e.block_all,
            allow: e.allow,
            deny: e.deny,
        }
    }
}

impl From<&EgressConfig> for EgressView {
    fn from(e: &EgressConfig) -> Self {
        Self {
            block_all: e.block_all,
            allow: e.allow.clone(),
            deny: e.deny.clone(),
        }
    }
}

/// A named volume to attach.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VolumeMount {
    /// The volume's name in the operator's policy.
    pub name: String,
    /// Attach it read-only (the policy may force this).
    #[serde(default)]
    pub read_only: bool,
}

/// How a sandbox starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StartModeView {
    /// Restore the template's snapshot when one fits, else boot.
    Auto,
    /// Restore the template's snapshot or fail.
    Snapshot,
    /// Boot the kernel.
    Cold,
}

/// Where a sandbox is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SandboxStateView {
    /// Booting.
    Creating,
    /// Ready for commands.
    Running,
    /// vCPUs paused.
    Paused,
    /// Being stopped.
    Stopping,
    /// Gone; nothing of it is left on the host.
    Stopped,
    /// Its VMM died or could not be driven (see `failure`).
    Failed,
}

impl From<SandboxState> for SandboxStateView {
    fn from(state: SandboxState) -> Self {
        match state {
            SandboxState::Creating => Self::Creating,
            SandboxState::Running => Self::Running,
            SandboxState::Paused => Self::Paused,
            SandboxState::Stopping => Self::Stopping,
            SandboxState::Stopped => Self::Stopped,
            SandboxState::Failed => Self::Failed,
        }
    }
}

/// How long a sandbox took to start, measured on the host, in milliseconds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct BootView {
    /// VMM spawn to the agent's `ready`.
    pub boot_time_ms: f64,
    /// VMM spawn until its control socket answered.
    pub spawn_ms: f64,
    /// Configuring the VMM.
    pub configure_ms: f64,
    /// Guest start (or restore) until the agent answered.
    pub guest_ms: f64,
    /// Restored from the template's snapshot rather than booted.
    pub restored: bool,
}

/// A sandbox as the API shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SandboxView {
    /// Its id (`sb-` and 13 characters).
    pub id: String,
    /// Its template.
    pub template: String,
    /// Its state.
    pub state: SandboxStateView,
    /// The VMM running it (`firecracker`, `qemu`).
    pub backend: String,
    /// Guest memory, MiB.
    pub memory_mb: u32,
    /// vCPUs.
    pub vcpus: u8,
    /// Whether it has a network.
    pub network: bool,
    /// Its published ports.
    pub ports: Vec<PortMapping>,
    /// Its egress rules, when it has any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<EgressView>,
    /// The caller's labels.
    pub labels: BTreeMap<String, String>,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_at_ms: u64,
    /// When its lifetime ends (milliseconds since the Unix epoch), while it
    /// runs or is paused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<u64>,
    /// How it started, once it is ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<BootView>,
    /// Claimed from the warm pool rather than started for this create.
    pub from_pool: bool,
    /// Paused to disk: no VMM runs for it until it is resumed (`state` is
    /// `paused`).
    #[serde(default)]
    pub persisted: bool,
    /// Why it is `failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    /// The guest agent's version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    /// The guest kernel's release.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_release: Option<String>,
}

impl SandboxView {
    /// The view of `info` with the daemon's `record` of it.
    pub fn new(info: &SandboxInfo, record: Option<&Record>) -> Self {
        let config = &info.config;
        Self {
            id: info.id.to_string(),
            template: config.template_id.clone(),
            state: info.state.into(),
            backend: info.hypervisor.to_string(),
            memory_mb: config.memory_mb,
            vcpus: config.vcpus,
            network: config.enable_network,
            ports: config
                .published_ports()
                .into_iter()
                .map(|p| PortMapping {
                    host_port: p.host_port,
                    guest_port: p.guest_port,
                    protocol: p.protocol.into(),
                })
                .collect(),
            egress: config.egress.as_ref().map(EgressView::from),
            labels: record.map(|r| r.labels.clone()).unwrap_or_default(),
            created_at_ms: info.created_at_ms,
            expires_at_ms: record
                .filter(|_| {
                    matches!(
                        info.state,
                        SandboxState::Creating | SandboxState::Running | SandboxState::Paused
                    )
                })
                .and_then(|r| r.expires_at_ms),
            boot: info.boot.as_ref().map(|b| BootView {
                boot_time_ms: b.boot_time_ms,
                spawn_ms: b.spawn_ms,
                configure_ms: b.configure_ms,
                guest_ms: b.guest_ms,
                restored: b.from_snapshot,
            }),
            from_pool: record.is_some_and(|r| r.from_pool),
            persisted: info.persisted,
            failure: info.failure.clone(),
            agent_version: info.agent_version.clone(),
            kernel_release: info.kernel_release.clone(),
        }
    }
}

/// Filters of `GET /v1/sandboxes`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Label selector: `key=value` pairs joined by commas, all of which must
    /// match (`team=a,stage=ci`); a bare `key` matches any value.
    #[serde(default)]
    pub label: Option<String>,
    /// Only sandboxes in this state.
    #[serde(default)]
    pub state: Option<SandboxStateView>,
}

/// Options of stop and delete.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct StopQuery {
    /// Kill the VMM at once instead of asking the guest to power off.
    #[serde(default)]
    pub force: bool,
}

/// The query of `POST /v1/sandboxes/{id}/pause`.
#[derive(Clone, Copy, Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct PauseQuery {
    /// Pause to disk: save the sandbox's memory, VM state and disk under
    /// the daemon's data directory and end its VMM, freeing its memory;
    /// `resume` restores it, also after the daemon or the host restarted.
    #[serde(default)]
    pub persist: bool,
}

/// A new lifetime.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TimeoutRequest {
    /// Seconds from now until the sandbox is stopped.
    #[schema(minimum = 1)]
    pub timeout_secs: u64,
}

/// Options of `GET .../logs`.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct LogsQuery {
    /// Only the last this many bytes (default 65536, at most 4 MiB).
    #[serde(default)]
    #[param(minimum = 1)]
    pub tail_bytes: Option<u64>,
}

/// A sandbox's resource usage.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct StatsView {
    /// Guest memory in use, MiB (the VMM's resident set when the agent
    /// cannot answer).
    pub memory_usage_mb: f64,
    /// Guest memory size, MiB.
    pub memory_limit_mb: u64,
    /// CPU time used by the VMM (every vCPU included), microseconds.
    pub cpu_usage_us: u64,
    /// Milliseconds since creation.
    pub uptime_ms: u64,
    /// The VMM's resident set, bytes.
    pub vmm_rss_bytes: u64,
    /// Network bytes received by the guest, where the VMM reports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net_rx_bytes: Option<u64>,
    /// Network bytes sent by the guest, where the VMM reports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net_tx_bytes: Option<u64>,
    /// Processes in the guest, when the agent answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process_count: Option<u64>,
    /// Bytes used on the guest's root file system, when the agent answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_used_bytes: Option<u64>,
    /// 1-minute load average in the guest, when the agent answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_avg_1m: Option<f64>,
}

impl From<SandboxStats> for StatsView {
    fn from(s: SandboxStats) -> Self {
        Self {
            memory_usage_mb: s.memory_usage_mb,
            memory_limit_mb: s.memory_limit_mb,
            cpu_usage_us: s.cpu_usage_us,
            uptime_ms: s.uptime_ms,
            vmm_rss_bytes: s.vmm.rss_bytes,
            net_rx_bytes: s.vmm.net_rx_bytes,
            net_tx_bytes: s.vmm.net_tx_bytes,
            process_count: s.guest.as_ref().map(|g| g.process_count),
            disk_used_bytes: s.guest.as_ref().map(|g| g.disk_used_bytes),
            load_avg_1m: s.guest.as_ref().map(|g| g.load_avg[0]),
        }
    }
}

/// Creates a sandbox (or claims one from the warm pool) and waits until it
/// is ready.
#[utoipa::path(post, path = "/v1/sandboxes", tag = "sandboxes",
    operation_id = "create_sandbox",
    request_body = CreateSandboxRequest,
    responses(
        (status = 201, description = "Ready", body = SandboxView),
        (status = "4XX", description = "Bad request, forbidden, quota or busy", body = Problem, content_type = "application/problem+json"),
        (status = "5XX", description = "The VMM, guest or host failed", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn create_sandbox(
    State(daemon): State<Arc<Daemon>>,
    ApiJson(request): ApiJson<CreateSandboxRequest>,
) -> Result<(StatusCode, axum::Json<SandboxView>), Problem> {
    let view = daemon.create(request).await?;
    Ok((StatusCode::CREATED, axum::Json(view)))
}

/// Lists sandboxes (the warm pool's excepted), oldest first.
#[utoipa::path(get, path = "/v1/sandboxes", tag = "sandboxes",
    operation_id = "list_sandboxes",
    params(ListQuery),
    responses(
        (status = 200, description = "The sandboxes", body = [SandboxView]),
        (status = "4XX", description = "Bad filter", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn list_sandboxes(
    State(daemon): State<Arc<Daemon>>,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<axum::Json<Vec<SandboxView>>, Problem> {
    let selector = parse_selector(query.label.as_deref().unwrap_or(""))?;
    let views = daemon
        .list()
        .await
        .into_iter()
        .filter(|v| query.state.is_none_or(|s| v.state == s))
        .filter(|v| {
            selector.iter().all(|(k, want)| {
                v.labels
                    .get(k)
                    .is_some_and(|have| want.as_ref().is_none_or(|w| w == have))
            })
        })
        .collect();
    Ok(axum::Json(views))
}

/// `team=a,stage` as `[("team", Some("a")), ("stage", None)]`.
fn parse_selector(raw: &str) -> Result<Vec<(String, Option<String>)>, Problem> {
    raw.split(',')
        .map(str::trim)
        .filter(|part| !part.is_empty())
        .map(|part| match part.split_once('=') {
            Some(("", _)) => Err(Problem::invalid_request(format!(
                "label selector {part:?} has no key: use key=value"
            ))),
            Some((k, v)) => Ok((k.to_owned(), Some(v.to_owned()))),
            None => Ok((part.to_owned(), None)),
        })
        .collect()
}

/// One sandbox.
#[utoipa::path(get, path = "/v1/sandboxes/{id}", tag = "sandboxes",
    operation_id = "get_sandbox",
    params(("id" = String, Path, description = "Sandbox id")),
    responses(
        (status = 200, description = "The sandbox", body = SandboxView),
        (status = 404, description = "No such sandbox", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn get_sandbox(
    State(daemon): State<Arc<Daemon>>,
    ApiPath(id): ApiPath<String>,
) -> Result<axum::Json<SandboxView>, Problem> {
    Ok(axum::Json(daemon.view(&id).await?))
}

/// Stops a sandbox: its VMM exits and every host resource is released; it
/// stays listed as `stopped` until deleted.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/stop", tag = "sandboxes",
    operation_id = "stop",
    params(("id" = String, Path, description = "Sandbox id"), StopQuery),
    responses(
        (status = 200, description = "Stopped", body = SandboxView),
        (status = "4XX", description = "No such sandbox or bad query", body = Problem, content_type = "application/problem+json"),
        (status = "5XX", description = "The VMM failed", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn stop_sandbox(
    State(daemon): State<Arc<Daemon>>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(query): ApiQuery<StopQuery>,
) -> Result<axum::Json<SandboxView>, Problem> {
    Ok(axum::Json(daemon.stop(&id, query.force).await?))
}

/// Stops a sandbox if it is live and forgets it.
#[utoipa::path(delete, path = "/v1/sandboxes/{id}", tag = "sandboxes",
    operation_id = "delete_sandbox",
    params(("id" = String, Path, description = "Sandbox id"), StopQuery),
    responses(
        (status = 204, description = "Gone"),
        (status = "4XX", description = "No such sandbox or bad query", body = Problem, content_type = "application/problem+json"),
        (status = "5XX", description = "The VMM failed", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn delete_sandbox(
    State(daemon): State<Arc<Daemon>>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(query): ApiQuery<StopQuery>,
) -> Result<StatusCode, Problem> {
    daemon.delete(&id, query.force).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Pauses a running sandbox's vCPUs; with `persist`, saves it to disk and
/// ends its VMM (a paused one too).
#[utoipa::path(post, path = "/v1/sandboxes/{id}/pause", tag = "sandboxes",
    operation_id = "pause",
    params(("id" = String, Path, description = "Sandbox id"), PauseQuery),
    responses(
        (status = 200, description = "Paused", body = SandboxView),
        (status = "4XX", description = "No such sandbox, or not running", body = Problem, content_type = "application/problem+json"),
        (status = "5XX", description = "The VMM failed", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn pause_sandbox(
    State(daemon): State<Arc<Daemon>>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(query): ApiQuery<PauseQuery>,
) -> Result<axum::Json<SandboxView>, Problem> {
    let sid = daemon.known(&id).await?;
    if query.persist {
        daemon.hypervisor().pause_sandbox_to_disk(&sid).await?;
    } else {
        daemon.hypervisor().pause_sandbox(&sid).await?;
    }
    Ok(axum::Json(daemon.view(&id).await?))
}

/// Resumes a paused sandbox (one paused to disk is restored in a new VMM).
#[utoipa::path(post, path = "/v1/sandboxes/{id}/resume", tag = "sandboxes",
    operation_id = "resume",
    params(("id" = String, Path, description = "Sandbox id")),
    responses(
        (status = 200, description = "Running", body = SandboxView),
        (status = "4XX", description = "No such sandbox, or not paused", body = Problem, content_type = "application/problem+json"),
        (status = "5XX", description = "The VMM failed", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn resume_sandbox(
    State(daemon): State<Arc<Daemon>>,
    ApiPath(id): ApiPath<String>,
) -> Result<axum::Json<SandboxView>, Problem> {
    let sid = daemon.known(&id).await?;
    daemon.hypervisor().resume_sandbox(&sid).await?;
    Ok(axum::Json(daemon.view(&id).await?))
}

/// Sets a live sandbox's lifetime to `timeout_secs` from now.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/timeout", tag = "sandboxes",
    operation_id = "set_timeout",
    params(("id" = String, Path, description = "Sandbox id")),
    request_body = TimeoutRequest,
    responses(
        (status = 200, description = "The new lifetime", body = SandboxView),
        (status = "4XX", description = "No such sandbox, or out of range", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn set_timeout(
    State(daemon): State<Arc<Daemon>>,
    ApiPath(id): ApiPath<String>,
    ApiJson(request): ApiJson<TimeoutRequest>,
) -> Result<axum::Json<SandboxView>, Problem> {
    Ok(axum::Json(
        daemon.set_timeout(&id, request.timeout_secs).await?,
    ))
}

/// New egress rules for a sandbox.
#[derive(Clone, Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NetworkUpdate {
    /// The rules that replace the sandbox's, at once.
    pub egress: EgressView,
}

/// Replaces a running (or paused) sandbox's egress rules without a restart.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/network", tag = "sandboxes",
    operation_id = "update_network",
    params(("id" = String, Path, description = "Sandbox id")),
    request_body = NetworkUpdate,
    responses(
        (status = 200, description = "The rules are in force", body = SandboxView),
        (status = "4XX", description = "No such sandbox, no network, bad rules, not running", body = Problem, content_type = "application/problem+json"),
        (status = "5XX", description = "The host's firewall failed", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn update_network(
    State(daemon): State<Arc<Daemon>>,
    ApiPath(id): ApiPath<String>,
    ApiJson(update): ApiJson<NetworkUpdate>,
) -> Result<axum::Json<SandboxView>, Problem> {
    let sid = daemon.known(&id).await?;
    daemon
        .hypervisor()
        .update_network(&sid, update.egress.into())
        .await?;
    Ok(axum::Json(daemon.view(&id).await?))
}

/// Resource usage: the VMM's, the host's and the guest's view.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/stats", tag = "sandboxes",
    operation_id = "get_stats",
    params(("id" = String, Path, description = "Sandbox id")),
    responses(
        (status = 200, description = "Usage now", body = StatsView),
        (status = "4XX", description = "No such sandbox, or not live", body = Problem, content_type = "application/problem+json"),
        (status = "5XX", description = "The VMM failed", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn get_stats(
    State(daemon): State<Arc<Daemon>>,
    ApiPath(id): ApiPath<String>,
) -> Result<axum::Json<StatsView>, Problem> {
    let sid = daemon.known(&id).await?;
    let stats = daemon.hypervisor().get_sandbox_stats(&sid).await?;
    Ok(axum::Json(stats.into()))
}

/// The guest console and VMM log, as text: the last `tail_bytes` of each.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/logs", tag = "sandboxes",
    operation_id = "get_logs",
    params(("id" = String, Path, description = "Sandbox id"), LogsQuery),
    responses(
        (status = 200, description = "Console log", body = String, content_type = "text/plain"),
        (status = "4XX", description = "No such sandbox", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn get_logs(
    State(daemon): State<Arc<Daemon>>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(query): ApiQuery<LogsQuery>,
) -> Result<Response, Problem> {
    let tail = query.tail_bytes.unwrap_or(64 * 1024);
    if tail == 0 || tail > 4 * 1024 * 1024 {
        return Err(Problem::invalid_request(format!(
            "tail_bytes = {tail} is out of range: use 1..=4194304"
        )));
    }
    let text = daemon.logs(&id, tail).await?;
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_match_pairs_and_bare_keys() {
        assert_eq!(
            parse_selector("a=1, b").unwrap(),
            vec![("a".into(), Some("1".into())), ("b".into(), None)]
        );
        assert!(parse_selector("=x").is_err());
        assert!(parse_selector("").unwrap().is_empty());
    }

    #[test]
    fn a_create_with_an_unknown_field_is_refused() {
        let e = serde_json::from_str::<CreateSandboxRequest>(r#"{"kernel_args":"x"}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `kernel_args`"), "{e}");
    }
}
