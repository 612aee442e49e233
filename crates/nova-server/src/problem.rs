//! Errors as `application/problem+json` (RFC 9457).
//!
//! Every failure the API answers is a [`Problem`]: an HTTP status, a stable
//! machine-readable [`code`](Problem::code) (`sandbox_not_found`,
//! `invalid_config`, `not_running`, ...), a short title and a detail that says
//! what to do. The runtime's typed errors are mapped here, in one place, so a
//! caller's mistake is a 4xx naming it and only a failure of the host, the VMM
//! or the guest is a 5xx.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use nova_core::error::{
    CreateSandboxError, ExecError, FileError, SandboxError, UpdateNetworkError,
};
use nova_core::id::SandboxId;
use nova_core::snapshot::SnapshotError;
use nova_core::template::TemplateError;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The media type of an error body.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// Stable error codes: the `code` member of every problem. Clients match on
/// these; the titles and details are for people.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ProblemCode {
    /// The request could not be parsed: malformed JSON, an unknown field, a
    /// bad query parameter (400).
    InvalidRequest,
    /// The sandbox config is out of range or not allowed (400).
    InvalidConfig,
    /// A guest path is not absolute or contains NUL (400).
    InvalidPath,
    /// No bearer token, or a wrong one (401).
    Unauthorized,
    /// The operator's policy forbids this (a template, a volume) (403).
    Forbidden,
    /// No sandbox has this id (404).
    SandboxNotFound,
    /// No template has this name (404).
    TemplateNotFound,
    /// No exec has this id in the sandbox (404).
    ExecNotFound,
    /// The guest path does not exist (404).
    FileNotFound,
    /// No such route (404).
    NotFound,
    /// The HTTP method is not allowed on this route (405).
    MethodNotAllowed,
    /// The sandbox is not in a state that allows the operation (409).
    NotRunning,
    /// The guest path exists, is a directory, is not a directory, is not
    /// empty, or its file system refuses the change (409).
    FileConflict,
    /// Another stream already follows this command (409).
    ExecBusy,
    /// A host port to publish is in use on the host (409).
    PortInUse,
    /// The sandbox has no network (409).
    NoNetwork,
    /// The guest denied access to the path (403).
    PermissionDenied,
    /// The body, or a whole-file read, is larger than allowed (413).
    PayloadTooLarge,
    /// The body's media type is not accepted (415).
    UnsupportedMediaType,
    /// A limit of the operator's policy is reached (sandboxes, memory,
    /// vCPUs) (429).
    QuotaExceeded,
    /// Too many creates are waiting; retry later (429).
    Busy,
    /// The backend cannot do this on this host (501).
    Unsupported,
    /// The guest agent failed or broke off (502).
    AgentError,
    /// The VMM failed (500).
    VmmError,
    /// The guest did not become ready in time (504).
    BootTimeout,
    /// A host resource (directory, network, process) failed (500).
    HostError,
}

impl ProblemCode {
    /// The HTTP status that goes with this code.
    pub fn status(self) -> StatusCode {
        use ProblemCode::*;
        match self {
            InvalidRequest | InvalidConfig | InvalidPath => StatusCode::BAD_REQUEST,
            Unauthorized => StatusCode::UNAUTHORIZED,
            Forbidden | PermissionDenied => StatusCode::FORBIDDEN,
            SandboxNotFound | TemplateNotFound | ExecNotFound | FileNotFound | NotFound => {
                StatusCode::NOT_FOUND
            }
            MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            NotRunning | FileConflict | ExecBusy | PortInUse | NoNetwork => StatusCode::CONFLICT,
            PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            QuotaExceeded | Busy => StatusCode::TOO_MANY_REQUESTS,
            Unsupported => StatusCode::NOT_IMPLEMENTED,
            AgentError => StatusCode::BAD_GATEWAY,
            BootTimeout => StatusCode::GATEWAY_TIMEOUT,
            VmmError | HostError => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The code as it appears on the wire (`sandbox_not_found`).
    pub fn as_str(self) -> &'static str {
        use ProblemCode::*;
        match self {
            InvalidRequest => "invalid_request",
            InvalidConfig => "invalid_config",
            InvalidPath => "invalid_path",
            Unauthorized => "unauthorized",
            Forbidden => "forbidden",
            SandboxNotFound => "sandbox_not_found",
            TemplateNotFound => "template_not_found",
            ExecNotFound => "exec_not_found",
            FileNotFound => "file_not_found",
            NotFound => "not_found",
            MethodNotAllowed => "method_not_allowed",
            NotRunning => "not_running",
            FileConflict => "file_conflict",
            ExecBusy => "exec_busy",
            PortInUse => "port_in_use",
            NoNetwork => "no_network",
            PermissionDenied => "permission_denied",
            PayloadTooLarge => "payload_too_large",
            UnsupportedMediaType => "unsupported_media_type",
            QuotaExceeded => "quota_exceeded",
            Busy => "busy",
            Unsupported => "unsupported",
            AgentError => "agent_error",
            VmmError => "vmm_error",
            BootTimeout => "boot_timeout",
            HostError => "host_error",
        }
    }
}

/// An RFC 9457 problem document, as every error response carries it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Problem {
    /// A URI naming the problem type: `urn:nova:problem:<code>`.
    #[serde(rename = "type")]
    pub type_uri: String,
    /// A short summary of the problem type.
    pub title: String,
    /// The HTTP status code.
    pub status: u16,
    /// What went wrong in this case, and what to do.
    pub detail: String,
    /// The stable code; clients match on it.
    pub code: ProblemCode,
    /// Seconds to wait before retrying (with `busy`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_secs: Option<u64>,
}

impl Problem {
    /// A problem with `code` and the detail `detail`.
    pub fn new(code: ProblemCode, detail: impl Into<String>) -> Self {
        Self {
            type_uri: format!("urn:nova:problem:{}", code.as_str()),
            title: title(code).to_owned(),
            status: code.status().as_u16(),
            detail: detail.into(),
            code,
            retry_after_secs: None,
        }
    }

    /// Shorthand for [`ProblemCode::InvalidRequest`].
    pub fn invalid_request(detail: impl Into<String>) -> Self {
        Self::new(ProblemCode::InvalidRequest, detail)
    }

    /// Shorthand for [`ProblemCode::InvalidConfig`].
    pub fn invalid_config(detail: impl Into<String>) -> Self {
        Self::new(ProblemCode::InvalidConfig, detail)
    }

    /// `sandbox_not_found` for `id`.
    pub fn sandbox_not_found(id: &str) -> Self {
        Self::new(
            ProblemCode::SandboxNotFound,
            format!(
                "no sandbox with id {id}: it was deleted, its lifetime ended (a sandbox is \
                 stopped timeout_secs after its create, 300 s unless the create or the \
                 policy says otherwise), or the id is wrong; `nova ls -a` \
                 (GET /v1/sandboxes) lists them"
            ),
        )
    }

    /// Sets the retry hint.
    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after_secs = Some(secs);
        self
    }
}

fn title(code: ProblemCode) -> &'static str {
    use ProblemCode::*;
    match code {
        InvalidRequest => "Invalid request",
        InvalidConfig => "Invalid sandbox config",
        InvalidPath => "Invalid guest path",
        Unauthorized => "Unauthorized",
        Forbidden => "Forbidden by policy",
        SandboxNotFound => "Sandbox not found",
        TemplateNotFound => "Template not found",
        ExecNotFound => "Exec not found",
        FileNotFound => "File not found",
        NotFound => "Not found",
        MethodNotAllowed => "Method not allowed",
        NotRunning => "Sandbox not in the right state",
        FileConflict => "Guest file conflict",
        ExecBusy => "Command already attached",
        PortInUse => "Host port in use",
        NoNetwork => "No network",
        PermissionDenied => "Permission denied in the guest",
        PayloadTooLarge => "Payload too large",
        UnsupportedMediaType => "Unsupported media type",
        QuotaExceeded => "Quota exceeded",
        Busy => "Too many creates waiting",
        Unsupported => "Not supported here",
        AgentError => "Guest agent failed",
        VmmError => "VMM failed",
        BootTimeout => "Guest not ready in time",
        HostError => "Host failure",
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = self.code.status();
        if status.is_server_error() {
            tracing::warn!(code = self.code.as_str(), detail = %self.detail, "request failed");
        }
        let retry = self.retry_after_secs;
        let body = serde_json::to_vec(&self).unwrap_or_default();
        let mut response = (status, body).into_response();
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        // For the metrics layer, which counts errors by code.
        response.extensions_mut().insert(self.code);
        if let Some(secs) = retry {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

/// An error and every cause under it, joined with ": ".
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = cause.source();
    }
    text
}

impl From<CreateSandboxError> for Problem {
    fn from(e: CreateSandboxError) -> Self {
        Self::new(create_code(&e), chain(&e))
    }
}

/// The problem code of a failed create (or restore).
fn create_code(e: &CreateSandboxError) -> ProblemCode {
    match e {
        CreateSandboxError::Config(_) => ProblemCode::InvalidConfig,
        CreateSandboxError::Template(TemplateError::NotFound { .. }) => {
            ProblemCode::TemplateNotFound
        }
        CreateSandboxError::Template(TemplateError::InvalidId(_)) => ProblemCode::InvalidConfig,
        CreateSandboxError::Unsupported { .. } => ProblemCode::Unsupported,
        CreateSandboxError::PortUnavailable { .. } => ProblemCode::PortInUse,
        CreateSandboxError::BootTimeout { .. } => ProblemCode::BootTimeout,
        CreateSandboxError::Agent(_) => ProblemCode::AgentError,
        CreateSandboxError::Vmm { .. } | CreateSandboxError::VmmExited { .. } => {
            ProblemCode::VmmError
        }
        CreateSandboxError::Snapshot(s) => snapshot_code(s),
        _ => ProblemCode::HostError,
    }
}

fn snapshot_problem(e: &SnapshotError) -> Problem {
    Problem::new(snapshot_code(e), chain(e))
}

/// The problem code of a failed snapshot.
fn snapshot_code(e: &SnapshotError) -> ProblemCode {
    match e {
        SnapshotError::NotFound(_) => ProblemCode::SandboxNotFound,
        SnapshotError::NotPaused(_) => ProblemCode::NotRunning,
        SnapshotError::Unsupported { .. } => ProblemCode::Unsupported,
        SnapshotError::WrongVmm { .. }
        | SnapshotError::TemplateChanged { .. }
        | SnapshotError::Invalid { .. } => ProblemCode::InvalidConfig,
        SnapshotError::Vmm { .. } => ProblemCode::VmmError,
        _ => ProblemCode::HostError,
    }
}

impl From<SnapshotError> for Problem {
    fn from(e: SnapshotError) -> Self {
        snapshot_problem(&e)
    }
}

impl From<SandboxError> for Problem {
    fn from(e: SandboxError) -> Self {
        let code = match &e {
            SandboxError::NotFound(id) => return Self::sandbox_not_found(id.as_str()),
            SandboxError::State(_) => ProblemCode::NotRunning,
            SandboxError::Vmm { .. } => ProblemCode::VmmError,
            SandboxError::Agent { .. } => ProblemCode::AgentError,
            SandboxError::Snapshot(s) => snapshot_code(s),
            SandboxError::Restore(c) => create_code(c),
            _ => ProblemCode::HostError,
        };
        Self::new(code, chain(&e))
    }
}

impl From<ExecError> for Problem {
    fn from(e: ExecError) -> Self {
        let code = match &e {
            ExecError::NotFound(id) => return Self::sandbox_not_found(id.as_str()),
            ExecError::NotRunning(_) => ProblemCode::NotRunning,
            ExecError::Invalid(_) => ProblemCode::InvalidRequest,
            ExecError::OutputTooLarge { .. } => ProblemCode::PayloadTooLarge,
            ExecError::NoSuchExec { .. } => ProblemCode::ExecNotFound,
            ExecError::ExecBusy { .. } => ProblemCode::ExecBusy,
            ExecError::Unsupported(_) => ProblemCode::Unsupported,
            ExecError::Agent(_) => ProblemCode::AgentError,
            // A command that cannot start is an exit status, not an error;
            // callers map it before it gets here.
            _ => ProblemCode::AgentError,
        };
        Self::new(code, chain(&e))
    }
}

impl From<UpdateNetworkError> for Problem {
    fn from(e: UpdateNetworkError) -> Self {
        let code = match &e {
            UpdateNetworkError::NotFound(id) => return Self::sandbox_not_found(id.as_str()),
            UpdateNetworkError::Config(_) => ProblemCode::InvalidConfig,
            UpdateNetworkError::NoNetwork(_) => ProblemCode::NoNetwork,
            UpdateNetworkError::NotRunning(_) => ProblemCode::NotRunning,
            UpdateNetworkError::Unsupported(_) => ProblemCode::Unsupported,
            _ => ProblemCode::HostError,
        };
        Self::new(code, chain(&e))
    }
}

impl From<FileError> for Problem {
    fn from(e: FileError) -> Self {
        let code = match &e {
            FileError::NotFound(id) => return Self::sandbox_not_found(id.as_str()),
            FileError::NotRunning(_) => ProblemCode::NotRunning,
            FileError::InvalidPath { .. } => ProblemCode::InvalidPath,
            FileError::NoSuchFile { .. } => ProblemCode::FileNotFound,
            FileError::PermissionDenied { .. } => ProblemCode::PermissionDenied,
            FileError::IsADirectory { .. }
            | FileError::NotADirectory { .. }
            | FileError::AlreadyExists { .. }
            | FileError::NoSpace { .. }
            | FileError::ReadOnly { .. }
            | FileError::DirectoryNotEmpty { .. } => ProblemCode::FileConflict,
            FileError::TooLarge { .. } => ProblemCode::PayloadTooLarge,
            _ => ProblemCode::AgentError,
        };
        // The guest's own words (the source) are kept for the caller; they
        // are the guest's, so bounded.
        let mut detail = chain(&e);
        detail.truncate(detail.floor_char_boundary(1024));
        Self::new(code, detail)
    }
}

/// Parses a sandbox id from a path segment: a malformed one is simply not
/// found (it names no sandbox), as for any other unknown id.
pub fn parse_id(raw: &str) -> Result<SandboxId, Problem> {
    raw.parse::<SandboxId>()
        .map_err(|_| Problem::sandbox_not_found(raw))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_maps_to_its_status_and_wire_name() {
        let p = Problem::new(ProblemCode::SandboxNotFound, "x");
        assert_eq!(p.status, 404);
        assert_eq!(p.type_uri, "urn:nova:problem:sandbox_not_found");
        let json = serde_json::to_value(&p).unwrap();
        assert_eq!(json["code"], "sandbox_not_found");
        assert_eq!(json["type"], "urn:nova:problem:sandbox_not_found");
        assert!(ProblemCode::Busy.status() == StatusCode::TOO_MANY_REQUESTS);
    }

    #[test]
    fn a_problem_response_has_the_problem_media_type_and_retry_after() {
        let r = Problem::new(ProblemCode::Busy, "full")
            .retry_after(2)
            .into_response();
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()[header::CONTENT_TYPE], PROBLEM_JSON);
        assert_eq!(r.headers()[header::RETRY_AFTER], "2");
    }
}
