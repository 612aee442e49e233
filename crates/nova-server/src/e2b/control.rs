//! E2B's control plane (the REST API at `E2B_API_URL`) over the daemon.
//!
//! ```text
//! POST   /sandboxes | /v2/sandboxes          create (201 Sandbox)
//! GET    /sandboxes | /v2/sandboxes          list (ListedSandbox[]; ?state=, ?metadata=)
//! GET    /sandboxes/{id}                     get (SandboxDetail)
//! DELETE /sandboxes/{id}                     kill (204)
//! POST   /sandboxes/{id}/timeout             set timeout (204)
//! POST   /sandboxes/{id}/refreshes           extend the lifetime (204)
//! POST   /sandboxes/{id}/pause               pause (204; 409 when paused)
//! POST   /sandboxes/{id}/resume              resume (201 Sandbox)
//! POST   /sandboxes/{id}/connect | /v2/...   resume if paused, set timeout (200/201 Sandbox)
//! GET    /sandboxes/{id}/metrics             metrics (SandboxMetric[], one sample: now)
//! anything else                              501 {"code":501,"message":"... is not served ..."}
//! ```
//!
//! Every request carries `X-API-Key` (or `Authorization: Bearer`) with the
//! daemon's token, compared in constant time. A create goes through
//! [`Daemon::create`](crate::daemon::Daemon::create), so the operator's policy applies exactly as on
//! `/v1`: `templateID` is a NovaSandbox template id (E2B's default `base`
//! is the policy's default template unless one is named so), `timeout` the
//! lifetime, `envVars` the sandbox's environment, `metadata` its labels
//! (entries that are not valid label keys/values are dropped, with a
//! warning), `allow_internet_access` its network.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use nova_core::metadata::now_ms;
use serde::{Deserialize, Serialize};

use crate::api::sandboxes::{CreateSandboxRequest, SandboxStateView, SandboxView};
use crate::e2b::E2b;
use crate::e2b::wire::rfc3339_ms;
use crate::problem::{Problem, ProblemCode};

/// The envd version NovaSandbox answers as: recent enough that the SDKs use
/// stdin, default users and octet-stream uploads.
pub const ENVD_VERSION: &str = "0.5.7";
/// The template E2B's SDKs ask for when the caller names none.
const E2B_DEFAULT_TEMPLATE: &str = "base";
/// The `clientID` of every sandbox.
const CLIENT_ID: &str = "novasandbox";

/// An E2B API error: `{"code": <status>, "message": ...}`.
#[derive(Debug)]
pub struct ApiError(pub StatusCode, pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "code": self.0.as_u16(), "message": self.1 });
        (self.0, Json(body)).into_response()
    }
}

impl From<Problem> for ApiError {
    fn from(p: Problem) -> Self {
        let status = StatusCode::from_u16(p.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        Self(status, p.detail)
    }
}

fn not_found(id: &str) -> ApiError {
    ApiError(StatusCode::NOT_FOUND, format!("sandbox {id} was not found"))
}

/// Middleware: the daemon's token in `X-API-Key` (or a bearer token).
pub async fn require_api_key(
    State(e2b): State<Arc<E2b>>,
    request: Request,
    next: Next,
) -> Response {
    let presented = request
        .headers()
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .or_else(|| {
            request
                .headers()
                .get(axum::http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
        });
    let refused = match presented {
        Some(key) if e2b.token.matches(key.trim()) => return next.run(request).await,
        Some(_) => ApiError(StatusCode::UNAUTHORIZED, "invalid API key".into()),
        None => ApiError(
            StatusCode::UNAUTHORIZED,
            "missing X-API-Key: set E2B_API_KEY to the daemon's token ($NOVA_HOME/token)".into(),
        ),
    };
    // Answered before the body is read.
    crate::e2b::closing(refused.into_response())
}

/// The control plane's routes.
pub fn router(e2b: Arc<E2b>) -> Router {
    Router::new()
        .route("/sandboxes", post(create).get(list))
        .route("/v2/sandboxes", post(create).get(list))
        .route("/sandboxes/{id}", get(get_one).delete(kill))
        .route("/sandboxes/{id}/timeout", post(set_timeout))
        .route("/sandboxes/{id}/refreshes", post(refresh))
        .route("/sandboxes/{id}/pause", post(pause))
        .route("/sandboxes/{id}/resume", post(resume))
        .route("/sandboxes/{id}/connect", post(connect))
        .route("/v2/sandboxes/{id}/connect", post(connect))
        .route("/sandboxes/{id}/metrics", get(metrics))
        .fallback(unserved)
        .layer(axum::middleware::from_fn_with_state(
            e2b.clone(),
            require_api_key,
        ))
        .with_state(e2b)
}

async fn unserved(request: Request) -> ApiError {
    ApiError(
        StatusCode::NOT_IMPLEMENTED,
        format!(
            "{} {} is not served by NovaSandbox's E2B API (served: sandboxes create, list, get, kill, timeout, pause, resume/connect, metrics)",
            request.method(),
            request.uri().path()
        ),
    )
}

/// `NewSandbox` / `NewSandboxV2`: the fields NovaSandbox uses; the rest
/// (autoPause, mcp, network rules, volumes, ...) are ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NewSandbox {
    /// The template.
    #[serde(rename = "templateID")]
    pub template_id: String,
    /// Lifetime, seconds.
    #[serde(default)]
    pub timeout: Option<u64>,
    /// The caller's metadata.
    #[serde(default)]
    pub metadata: Option<BTreeMap<String, String>>,
    /// Environment for every command.
    #[serde(default)]
    pub env_vars: Option<BTreeMap<String, String>>,
    /// Whether the sandbox may reach the internet.
    #[serde(default, rename = "allow_internet_access")]
    pub allow_internet_access: Option<bool>,
}

/// Whether `key` = `value` is a valid NovaSandbox label (Kubernetes syntax).
fn valid_label(key: &str, value: &str) -> bool {
    fn name(s: &str) -> bool {
        !s.is_empty()
            && s.len() <= 63
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && s.starts_with(|c: char| c.is_ascii_alphanumeric())
            && s.ends_with(|c: char| c.is_ascii_alphanumeric())
    }
    let key_ok = match key.split_once('/') {
        Some((prefix, rest)) => {
            !prefix.is_empty()
                && prefix.len() <= 253
                && prefix.split('.').all(|l| {
                    !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                })
                && name(rest)
        }
        None => name(key),
    };
    key_ok && !key.starts_with("nova.") && (value.is_empty() || name(value))
}

impl NewSandbox {
    fn to_request(&self) -> CreateSandboxRequest {
        let mut labels = BTreeMap::new();
        for (k, v) in self.metadata.iter().flatten() {
            if valid_label(k, v) {
                labels.insert(k.clone(), v.clone());
            } else {
                tracing::warn!(key = %k, "E2B metadata entry is not a valid NovaSandbox label; dropped");
            }
        }
        CreateSandboxRequest {
            template: Some(self.template_id.clone()).filter(|t| !t.is_empty()),
            network: self.allow_internet_access,
            labels,
            env: self.env_vars.clone().unwrap_or_default(),
            timeout_secs: self.timeout.filter(|t| *t > 0),
            ..CreateSandboxRequest::default()
        }
    }
}

/// `Sandbox`: what create, connect and resume answer.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CreatedSandbox {
    #[serde(rename = "templateID")]
    template_id: String,
    #[serde(rename = "sandboxID")]
    sandbox_id: String,
    #[serde(rename = "clientID")]
    client_id: &'static str,
    alias: String,
    envd_version: &'static str,
    envd_access_token: String,
    domain: String,
}

/// `ListedSandbox` / `SandboxDetail`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ListedSandbox {
    #[serde(rename = "templateID")]
    template_id: String,
    alias: String,
    #[serde(rename = "sandboxID")]
    sandbox_id: String,
    #[serde(rename = "clientID")]
    client_id: &'static str,
    started_at: String,
    end_at: String,
    cpu_count: u32,
    #[serde(rename = "memoryMB")]
    memory_mb: u32,
    #[serde(rename = "diskSizeMB")]
    disk_size_mb: u32,
    envd_version: &'static str,
    envd_access_token: String,
    metadata: BTreeMap<String, String>,
    state: &'static str,
}

fn e2b_state(state: SandboxStateView) -> Option<&'static str> {
    match state {
        SandboxStateView::Paused => Some("paused"),
        SandboxStateView::Creating | SandboxStateView::Running => Some("running"),
        SandboxStateView::Stopping | SandboxStateView::Stopped | SandboxStateView::Failed => None,
    }
}

impl E2b {
    fn created(&self, view: &SandboxView) -> CreatedSandbox {
        CreatedSandbox {
            template_id: view.template.clone(),
            sandbox_id: view.id.clone(),
            client_id: CLIENT_ID,
            alias: view.template.clone(),
            envd_version: ENVD_VERSION,
            envd_access_token: self.access_token(&view.id),
            domain: self.domain.clone(),
        }
    }

    fn listed(&self, view: &SandboxView) -> Option<ListedSandbox> {
        let state = e2b_state(view.state)?;
        Some(ListedSandbox {
            template_id: view.template.clone(),
            alias: view.template.clone(),
            sandbox_id: view.id.clone(),
            client_id: CLIENT_ID,
            started_at: rfc3339_ms(i64::try_from(view.created_at_ms).unwrap_or(i64::MAX)),
            end_at: rfc3339_ms(
                i64::try_from(view.expires_at_ms.unwrap_or_else(now_ms)).unwrap_or(i64::MAX),
            ),
            cpu_count: u32::from(view.vcpus),
            memory_mb: view.memory_mb,
            disk_size_mb: 0,
            envd_version: ENVD_VERSION,
            envd_access_token: self.access_token(&view.id),
            metadata: view.labels.clone(),
            state,
        })
    }

    /// The view of a sandbox E2B callers can see (live).
    async fn live_view(&self, id: &str) -> Result<SandboxView, ApiError> {
        match self.daemon.view(id).await {
            Ok(view) if e2b_state(view.state).is_some() => Ok(view),
            Ok(_) => Err(not_found(id)),
            Err(p) if p.code == ProblemCode::SandboxNotFound || p.status == 400 => {
                Err(not_found(id))
            }
            Err(p) => Err(p.into()),
        }
    }
}

async fn create(
    State(e2b): State<Arc<E2b>>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let new: NewSandbox = serde_json::from_slice(&body)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("bad sandbox request: {e}")))?;
    let mut request = new.to_request();
    // The SDKs' default template is E2B's `base`: without a NovaSandbox
    // template of that name, it is the policy's default template.
    if request.template.as_deref() == Some(E2B_DEFAULT_TEMPLATE)
        && !e2b
            .daemon
            .templates()
            .is_ok_and(|ts| ts.iter().any(|t| t.id == E2B_DEFAULT_TEMPLATE))
    {
        request.template = None;
    }
    let view = e2b.daemon.create(request).await?;
    Ok((StatusCode::CREATED, Json(e2b.created(&view))).into_response())
}

/// The query of a list.
#[derive(Debug, Default, Deserialize)]
pub struct ListQuery {
    /// `running,paused`.
    #[serde(default)]
    state: Option<String>,
    /// URL-encoded `k=v&k2=v2`.
    #[serde(default)]
    metadata: Option<String>,
}

/// `a=1&b=2` decoded (percent and `+`).
fn parse_metadata_query(raw: &str) -> Vec<(String, String)> {
    fn decode(s: &str) -> String {
        let bytes = s.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'+' => out.push(b' '),
                b'%' if i + 2 < bytes.len() => {
                    let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz");
                    match u8::from_str_radix(hex, 16) {
                        Ok(b) => {
                            out.push(b);
                            i += 2;
                        }
                        Err(_) => out.push(b'%'),
                    }
                }
                b => out.push(b),
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }
    raw.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (decode(k), decode(v)),
            None => (decode(p), String::new()),
        })
        .collect()
}

async fn list(
    State(e2b): State<Arc<E2b>>,
    Query(query): Query<ListQuery>,
) -> Json<Vec<ListedSandbox>> {
    let states: Vec<String> = query
        .state
        .as_deref()
        .map(|s| {
            s.split(',')
                .map(|x| x.trim().to_owned())
                .filter(|x| !x.is_empty())
                .collect()
        })
        .unwrap_or_default();
    let wanted = query
        .metadata
        .as_deref()
        .map(parse_metadata_query)
        .unwrap_or_default();
    let out = e2b
        .daemon
        .list()
        .await
        .iter()
        .filter_map(|v| e2b.listed(v))
        .filter(|s| states.is_empty() || states.iter().any(|w| w == s.state))
        .filter(|s| wanted.iter().all(|(k, v)| s.metadata.get(k) == Some(v)))
        .collect();
    Json(out)
}

async fn get_one(
    State(e2b): State<Arc<E2b>>,
    Path(id): Path<String>,
) -> Result<Json<ListedSandbox>, ApiError> {
    let view = e2b.live_view(&id).await?;
    e2b.listed(&view).map(Json).ok_or_else(|| not_found(&id))
}

async fn kill(State(e2b): State<Arc<E2b>>, Path(id): Path<String>) -> Result<StatusCode, ApiError> {
    e2b.live_view(&id).await?;
    e2b.daemon.delete(&id, true).await?;
    if let Ok(sid) = id.parse() {
        e2b.processes.forget(&sid);
        e2b.watchers.forget(&sid);
    }
    Ok(StatusCode::NO_CONTENT)
}

/// `SandboxTimeoutRequest`.
#[derive(Debug, Deserialize)]
pub struct TimeoutBody {
    timeout: u64,
}

async fn set_timeout(
    State(e2b): State<Arc<E2b>>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<StatusCode, ApiError> {
    let body: TimeoutBody = serde_json::from_slice(&body)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("bad timeout request: {e}")))?;
    e2b.live_view(&id).await?;
    e2b.daemon.set_timeout(&id, body.timeout.max(1)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `SandboxRefreshRequest`.
#[derive(Debug, Default, Deserialize)]
pub struct RefreshBody {
    #[serde(default)]
    duration: Option<u64>,
}

async fn refresh(
    State(e2b): State<Arc<E2b>>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<StatusCode, ApiError> {
    let body: RefreshBody = if body.is_empty() {
        RefreshBody::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("bad refresh request: {e}")))?
    };
    let view = e2b.live_view(&id).await?;
    let left = view.expires_at_ms.unwrap_or(0).saturating_sub(now_ms()) / 1000;
    let secs = body.duration.unwrap_or(60).max(left);
    e2b.daemon.set_timeout(&id, secs.max(1)).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn pause(
    State(e2b): State<Arc<E2b>>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let view = e2b.live_view(&id).await?;
    if view.state == SandboxStateView::Paused {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!("sandbox {id} is already paused"),
        ));
    }
    let sid = e2b.daemon.known(&id).await?;
    e2b.daemon
        .hypervisor()
        .pause_sandbox(&sid)
        .await
        .map_err(Problem::from)?;
    Ok(StatusCode::NO_CONTENT)
}

/// `ConnectSandbox` / `ResumedSandbox`.
#[derive(Debug, Default, Deserialize)]
pub struct ConnectBody {
    #[serde(default)]
    timeout: Option<u64>,
}

async fn resume_or_connect(
    e2b: &E2b,
    id: &str,
    body: &[u8],
    resume_only: bool,
) -> Result<Response, ApiError> {
    let body: ConnectBody = if body.is_empty() {
        ConnectBody::default()
    } else {
        serde_json::from_slice(body)
            .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("bad request: {e}")))?
    };
    let view = e2b.live_view(id).await?;
    let resumed = view.state == SandboxStateView::Paused;
    if resumed {
        let sid = e2b.daemon.known(id).await?;
        e2b.daemon
            .hypervisor()
            .resume_sandbox(&sid)
            .await
            .map_err(Problem::from)?;
    } else if resume_only {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!("sandbox {id} is not paused"),
        ));
    }
    let view = match body.timeout.filter(|t| *t > 0) {
        Some(t) => e2b.daemon.set_timeout(id, t).await?,
        None => e2b.live_view(id).await?,
    };
    let status = if resumed {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(e2b.created(&view))).into_response())
}

async fn resume(
    State(e2b): State<Arc<E2b>>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    resume_or_connect(&e2b, &id, &body, true).await
}

async fn connect(
    State(e2b): State<Arc<E2b>>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    resume_or_connect(&e2b, &id, &body, false).await
}

/// `SandboxMetric`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Metric {
    timestamp: String,
    timestamp_unix: u64,
    cpu_count: u32,
    cpu_used_pct: f64,
    mem_used: u64,
    mem_total: u64,
    mem_cache: u64,
    disk_used: u64,
    disk_total: u64,
}

async fn metrics(
    State(e2b): State<Arc<E2b>>,
    Path(id): Path<String>,
    _h: HeaderMap,
) -> Result<Json<Vec<Metric>>, ApiError> {
    let view = e2b.live_view(&id).await?;
    let sid = e2b.daemon.known(&id).await?;
    let stats = e2b
        .daemon
        .hypervisor()
        .get_sandbox_stats(&sid)
        .await
        .map_err(Problem::from)?;
    let now = now_ms();
    let cpus = u64::from(view.vcpus.max(1));
    let cpu_used_pct = if stats.uptime_ms > 0 {
        stats.cpu_usage_us as f64 / (stats.uptime_ms as f64 * 1000.0 * cpus as f64) * 100.0
    } else {
        0.0
    };
    Ok(Json(vec![Metric {
        timestamp: rfc3339_ms(i64::try_from(now).unwrap_or(i64::MAX)),
        timestamp_unix: now / 1000,
        cpu_count: u32::from(view.vcpus),
        cpu_used_pct,
        mem_used: (stats.memory_usage_mb * 1024.0 * 1024.0) as u64,
        mem_total: stats.memory_limit_mb * 1024 * 1024,
        mem_cache: 0,
        disk_used: 0,
        disk_total: 0,
    }]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_becomes_labels_where_valid() {
        let new: NewSandbox = serde_json::from_str(
            r#"{"templateID":"python","timeout":300,"metadata":{"team":"ml","bad key":"x","nova.pool":"y"},"envVars":{"A":"1"},"autoPause":false}"#,
        )
        .unwrap();
        let r = new.to_request();
        assert_eq!(r.template.as_deref(), Some("python"));
        assert_eq!(r.timeout_secs, Some(300));
        assert_eq!(r.labels.len(), 1);
        assert_eq!(r.labels["team"], "ml");
        assert_eq!(r.env["A"], "1");
        assert_eq!(r.network, None);
    }

    #[test]
    fn the_metadata_filter_is_url_decoded() {
        assert_eq!(
            parse_metadata_query("team=ml&x=a%20b+c"),
            vec![("team".into(), "ml".into()), ("x".into(), "a b c".into())]
        );
    }
}
