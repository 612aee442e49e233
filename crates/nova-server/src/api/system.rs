//! Health, templates, the OpenAPI document and Prometheus metrics.

use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::daemon::Daemon;
use crate::problem::{Problem, ProblemCode};

/// The daemon's health.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// `ok` while the daemon serves.
    pub status: String,
    /// The daemon's version.
    pub version: String,
    /// The VMM sandboxes run on (`firecracker`, `qemu`).
    pub backend: String,
    /// Live sandboxes (the warm pool's included).
    pub sandboxes: usize,
    /// Sandboxes waiting in the warm pool, all templates together.
    pub pool_ready: usize,
    /// Seconds since the daemon started.
    pub uptime_secs: u64,
}

/// An installed template a caller may use.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TemplateView {
    /// Its id (the `template` of a create).
    pub id: String,
    /// Human-readable name.
    pub name: String,
    /// Recommended memory, MiB.
    pub memory_mb: u32,
    /// Recommended vCPUs.
    pub vcpus: u8,
    /// Guest kernel release.
    pub kernel_version: String,
    /// Whether it has a snapshot to restore from.
    pub snapshot: bool,
    /// Sandboxes of it waiting in the warm pool.
    pub pool_ready: usize,
}

/// Whether the daemon serves, and what it runs.
#[utoipa::path(get, path = "/v1/health", tag = "system", operation_id = "health",
    responses((status = 200, description = "Serving", body = Health)))]
pub async fn health(State(daemon): State<Arc<Daemon>>) -> axum::Json<Health> {
    axum::Json(daemon.health().await)
}

/// The templates callers may use (the policy's allowed ones that are
/// installed).
#[utoipa::path(get, path = "/v1/templates", tag = "system", operation_id = "list_templates",
    responses(
        (status = 200, description = "The templates", body = [TemplateView]),
        (status = "5XX", description = "The template directory cannot be read", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn list_templates(
    State(daemon): State<Arc<Daemon>>,
) -> Result<axum::Json<Vec<TemplateView>>, Problem> {
    let templates = daemon
        .templates()
        .map_err(|e| Problem::new(ProblemCode::HostError, crate::problem::chain(&e)))?;
    Ok(axum::Json(templates))
}

/// This API's OpenAPI 3.1 document.
#[utoipa::path(get, path = "/v1/openapi.json", tag = "system", operation_id = "openapi",
    responses((status = 200, description = "The document", body = Object)))]
pub async fn openapi_json() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        crate::api::openapi_json(),
    )
        .into_response()
}

/// Prometheus metrics (text exposition format): sandboxes by state, create
/// and boot latency, execs, errors, the warm pool, per-sandbox CPU and
/// memory.
#[utoipa::path(get, path = "/metrics", tag = "system", operation_id = "metrics",
    responses((status = 200, description = "Metrics", body = String, content_type = "text/plain")))]
pub async fn metrics(State(daemon): State<Arc<Daemon>>) -> Response {
    let text = daemon.render_metrics().await;
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}
