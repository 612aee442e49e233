//! The REST API under `/v1`, its OpenAPI document, and the extractors that
//! turn every malformed request into a 4xx problem.
//!
//! ```text
//! POST   /v1/sandboxes                       create_sandbox  (201, or 429 when busy)
//! GET    /v1/sandboxes?label=k=v&state=s     list_sandboxes
//! GET    /v1/sandboxes/{id}                  get_sandbox
//! DELETE /v1/sandboxes/{id}?force=           delete_sandbox
//! POST   /v1/sandboxes/{id}/stop?force=      stop
//! POST   /v1/sandboxes/{id}/pause | /resume  pause, resume
//! POST   /v1/sandboxes/{id}/timeout          set_timeout
//! GET    /v1/sandboxes/{id}/stats            get_stats
//! POST   /v1/sandboxes/{id}/network          update_network (egress rules, live)
//! GET    /v1/sandboxes/{id}/logs             get_logs
//! POST   /v1/sandboxes/{id}/exec             execute_command (to completion)
//! GET    /v1/sandboxes/{id}/exec/stream      exec_stream (WebSocket)
//! GET    /v1/sandboxes/{id}/execs[/{exec_id}] list_execs, get_exec (survive restarts)
//! GET    /v1/sandboxes/{id}/execs/{exec_id}/stream  attach_exec (WebSocket)
//! GET|PUT|DELETE /v1/sandboxes/{id}/files?path=   download, upload, remove
//! GET    /v1/sandboxes/{id}/files/list|stat?path= list_dir, stat
//! POST   /v1/sandboxes/{id}/files/mkdir      mkdir
//! GET    /v1/templates                       list_templates
//! GET    /v1/health                          health
//! GET    /v1/openapi.json                    this document
//! GET    /metrics                            Prometheus text format
//! POST|GET|DELETE /mcp                       MCP, streamable HTTP (crate::mcp)
//! ```

pub mod exec;
pub mod files;
pub mod sandboxes;
pub mod system;

use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::routing::{get, post};
use axum::{Router, middleware};
use serde::de::DeserializeOwned;
use utoipa::OpenApi;

use crate::daemon::Daemon;
use crate::problem::{Problem, ProblemCode};

/// Largest JSON body, bytes.
pub const MAX_JSON_BODY: usize = 1024 * 1024;

/// The OpenAPI document of the API.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "NovaSandbox API",
        description = "Sandboxes (microVMs) for running untrusted code: create, exec, files, lifecycle. \
                       Errors are application/problem+json (RFC 9457) with a stable `code`.",
        license(name = "Apache-2.0"),
    ),
    paths(
        sandboxes::create_sandbox, sandboxes::list_sandboxes, sandboxes::get_sandbox,
        sandboxes::delete_sandbox, sandboxes::stop_sandbox, sandboxes::pause_sandbox,
        sandboxes::resume_sandbox, sandboxes::set_timeout, sandboxes::get_stats,
        sandboxes::get_logs, sandboxes::update_network,
        exec::execute_command, exec::exec_stream, exec::list_execs, exec::get_exec,
        exec::attach_exec,
        files::download_file, files::upload_file, files::list_dir, files::stat,
        files::mkdir, files::remove,
        system::health, system::list_templates, system::openapi_json, system::metrics,
    ),
    components(schemas(crate::problem::Problem, crate::problem::ProblemCode)),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
    tags(
        (name = "sandboxes", description = "Sandbox lifecycle"),
        (name = "exec", description = "Commands in a sandbox"),
        (name = "files", description = "Guest files"),
        (name = "system", description = "Health, templates, metrics"),
    )
)]
#[derive(Debug)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "Over TCP only: the token in $NOVA_HOME/token. The Unix socket needs none.",
                    ))
                    .build(),
            ),
        );
    }
}

/// The OpenAPI document, pretty-printed, as checked in at
/// `crates/nova-server/openapi.json`.
pub fn openapi_json() -> String {
    let mut text = ApiDoc::openapi()
        .to_pretty_json()
        .expect("the OpenAPI document is plain data and serializes");
    text.push('\n');
    text
}

/// The API's routes over `daemon`, without authentication (see
/// [`crate::auth`]).
pub fn router(daemon: Arc<Daemon>) -> Router {
    let sandbox = "/v1/sandboxes/{id}";
    let files = Router::new()
        .route(
            &format!("{sandbox}/files"),
            get(files::download_file)
                .put(files::upload_file)
                .delete(files::remove),
        )
        // Uploads stream and are capped by the policy, not by the JSON limit.
        .layer(DefaultBodyLimit::disable());
    Router::new()
        .route(
            "/v1/sandboxes",
            post(sandboxes::create_sandbox).get(sandboxes::list_sandboxes),
        )
        .route(
            sandbox,
            get(sandboxes::get_sandbox).delete(sandboxes::delete_sandbox),
        )
        .route(&format!("{sandbox}/stop"), post(sandboxes::stop_sandbox))
        .route(&format!("{sandbox}/pause"), post(sandboxes::pause_sandbox))
        .route(
            &format!("{sandbox}/resume"),
            post(sandboxes::resume_sandbox),
        )
        .route(&format!("{sandbox}/timeout"), post(sandboxes::set_timeout))
        .route(&format!("{sandbox}/stats"), get(sandboxes::get_stats))
        .route(
            &format!("{sandbox}/network"),
            post(sandboxes::update_network),
        )
        .route(&format!("{sandbox}/logs"), get(sandboxes::get_logs))
        .route(&format!("{sandbox}/exec"), post(exec::execute_command))
        .route(&format!("{sandbox}/exec/stream"), get(exec::exec_stream))
        .route(&format!("{sandbox}/execs"), get(exec::list_execs))
        .route(&format!("{sandbox}/execs/{{exec_id}}"), get(exec::get_exec))
        .route(
            &format!("{sandbox}/execs/{{exec_id}}/stream"),
            get(exec::attach_exec),
        )
        .route(&format!("{sandbox}/files/list"), get(files::list_dir))
        .route(&format!("{sandbox}/files/stat"), get(files::stat))
        .route(&format!("{sandbox}/files/mkdir"), post(files::mkdir))
        .route("/v1/templates", get(system::list_templates))
        .route("/v1/health", get(system::health))
        .route("/v1/openapi.json", get(system::openapi_json))
        .route("/metrics", get(system::metrics))
        .layer(DefaultBodyLimit::max(MAX_JSON_BODY))
        .merge(files)
        .nest_service("/mcp", crate::mcp::http_service(daemon.clone()))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(
            daemon.clone(),
            crate::metrics::count_responses,
        ))
        .with_state(daemon)
}

async fn not_found() -> Problem {
    Problem::new(
        ProblemCode::NotFound,
        "no such route; GET /v1/openapi.json lists them",
    )
}

async fn method_not_allowed() -> Problem {
    Problem::new(
        ProblemCode::MethodNotAllowed,
        "this route does not take this method; GET /v1/openapi.json lists them",
    )
}

/// A JSON body; any rejection (malformed, unknown field, wrong type, wrong
/// media type, too large) is a problem that names it.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(value)) => Ok(Self(value)),
            Err(rejection) => Err(json_problem(&rejection)),
        }
    }
}

fn json_problem(rejection: &JsonRejection) -> Problem {
    let code = match rejection {
        JsonRejection::MissingJsonContentType(_) => ProblemCode::UnsupportedMediaType,
        JsonRejection::BytesRejection(_)
            if rejection.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE =>
        {
            ProblemCode::PayloadTooLarge
        }
        _ => ProblemCode::InvalidRequest,
    };
    let detail = match code {
        ProblemCode::UnsupportedMediaType => {
            "send the body as JSON with Content-Type: application/json".to_owned()
        }
        ProblemCode::PayloadTooLarge => {
            format!("the JSON body is larger than {MAX_JSON_BODY} bytes")
        }
        _ => rejection.body_text(),
    };
    Problem::new(code, detail)
}

/// Query parameters; a bad or unknown one is a problem that names it.
#[derive(Debug)]
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| Self(q.0))
            .map_err(|e: QueryRejection| Problem::invalid_request(e.body_text()))
    }
}

/// Path parameters; a bad one is a problem that names it.
#[derive(Debug)]
pub struct ApiPath<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| Self(p.0))
            .map_err(|e: PathRejection| Problem::invalid_request(e.body_text()))
    }
}
