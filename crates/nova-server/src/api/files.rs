//! `/v1/sandboxes/{id}/files`: streamed upload and download, list, stat,
//! mkdir, remove. Paths are absolute guest paths, given in the `path` query
//! parameter.
//!
//! Transfers stream: an upload goes from the request body to the guest file
//! chunk by chunk (never whole in memory, capped by the policy's
//! `max_upload_bytes`), and a download from the guest file to the response
//! body the same way.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::{StreamExt, TryStreamExt};
use nova_core::error::FileError;
use nova_core::fs::{DirListing, FileDownload, FileKind, FileStat};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::api::{ApiJson, ApiPath, ApiQuery};
use crate::daemon::Daemon;
use crate::problem::{Problem, ProblemCode};

/// Header of a download: the file's size when the guest opened it.
pub const FILE_SIZE_HEADER: &str = "x-nova-file-size";

/// A guest path.
#[derive(Clone, Debug, Deserialize, Serialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct PathQuery {
    /// Absolute guest path.
    pub path: String,
}

/// Where and how to write an upload.
#[derive(Clone, Debug, Deserialize, Serialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct UploadQuery {
    /// Absolute guest path; the file is created or replaced.
    pub path: String,
    /// Permission bits, octal digits (`644` or `0755`); default `644`.
    #[serde(default)]
    pub mode: Option<String>,
}

/// What to remove.
#[derive(Clone, Debug, Deserialize, Serialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct RemoveQuery {
    /// Absolute guest path.
    pub path: String,
    /// Remove a directory and everything in it.
    #[serde(default)]
    pub recursive: bool,
}

/// A directory to make, with its missing parents.
#[derive(Clone, Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MkdirRequest {
    /// Absolute guest path.
    pub path: String,
    /// Permission bits, octal digits; default `755`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
}

/// The type of a guest file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FileKindView {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link (in listings; stat follows links).
    Symlink,
    /// A device, socket or FIFO.
    Other,
}

impl From<FileKind> for FileKindView {
    fn from(kind: FileKind) -> Self {
        match kind {
            FileKind::File => Self::File,
            FileKind::Dir => Self::Dir,
            FileKind::Symlink => Self::Symlink,
            FileKind::Other => Self::Other,
        }
    }
}

/// Metadata of a guest path.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct FileStatView {
    /// Its type.
    pub kind: FileKindView,
    /// Size, bytes.
    pub size: u64,
    /// Permission bits (decimal here; `0o644` is 420).
    pub mode: u32,
    /// Owner user id.
    pub uid: u32,
    /// Owner group id.
    pub gid: u32,
    /// Last modification, milliseconds since the Unix epoch (guest clock).
    pub modified_ms: i64,
}

impl From<FileStat> for FileStatView {
    fn from(s: FileStat) -> Self {
        Self {
            kind: s.kind.into(),
            size: s.size,
            mode: s.mode,
            uid: s.uid,
            gid: s.gid,
            modified_ms: s.modified_ms,
        }
    }
}

/// One directory entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DirEntryView {
    /// File name.
    pub name: String,
    /// Its type (links not followed).
    pub kind: FileKindView,
    /// Size, bytes.
    pub size: u64,
    /// Permission bits.
    pub mode: u32,
}

/// A directory's entries, sorted by name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DirListingView {
    /// The entries, without `.` and `..`.
    pub entries: Vec<DirEntryView>,
    /// The directory had more entries than one listing carries.
    pub truncated: bool,
}

impl From<DirListing> for DirListingView {
    fn from(l: DirListing) -> Self {
        Self {
            entries: l
                .entries
                .into_iter()
                .map(|e| DirEntryView {
                    name: e.name,
                    kind: e.kind.into(),
                    size: e.size,
                    mode: e.mode,
                })
                .collect(),
            truncated: l.truncated,
        }
    }
}

/// The bytes an upload wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct UploadResult {
    /// Bytes written to the guest file.
    pub bytes: u64,
}

/// Parses permission bits written in octal (`644`, `0755`, `0o600`).
pub fn parse_mode(raw: Option<&str>, default: u32) -> Result<u32, Problem> {
    let Some(raw) = raw else { return Ok(default) };
    let digits = raw.strip_prefix("0o").unwrap_or(raw);
    match u32::from_str_radix(digits, 8) {
        Ok(mode) if mode <= 0o7777 && !digits.is_empty() => Ok(mode),
        _ => Err(Problem::invalid_request(format!(
            "mode {raw:?} is not permission bits: use octal digits up to 7777, like 644"
        ))),
    }
}

fn check_path(path: &str) -> Result<(), Problem> {
    FileError::check_path(path).map_err(Problem::from)
}

/// Streams a guest file out.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/files", tag = "files",
    operation_id = "download_file",
    params(("id" = String, Path, description = "Sandbox id"), PathQuery),
    responses(
        (status = 200, description = "The file's bytes", body = Vec<u8>, content_type = "application/octet-stream"),
        (status = "4XX", description = "Bad path, no such file or sandbox", body = Problem, content_type = "application/problem+json"),
        (status = "5XX", description = "The guest agent failed", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn download_file(
    State(daemon): State<Arc<Daemon>>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(query): ApiQuery<PathQuery>,
) -> Result<Response, Problem> {
    check_path(&query.path)?;
    let sid = daemon.known(&id).await?;
    let download = daemon.hypervisor().download(&sid, &query.path).await?;
    let size = download.size();
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
            (
                header::HeaderName::from_static(FILE_SIZE_HEADER),
                size.to_string(),
            ),
        ],
        download_body(download),
    )
        .into_response())
}

/// A response body that streams `download` chunk by chunk; an error in the
/// middle ends the body early (the client sees a short transfer).
pub(crate) fn download_body(download: FileDownload) -> Body {
    Body::from_stream(futures_util::stream::unfold(
        download,
        |mut download| async move {
            match download.next().await {
                Ok(Some(chunk)) => Some((Ok(bytes::Bytes::from(chunk)), download)),
                Ok(None) => None,
                Err(e) => Some((Err(std::io::Error::other(e)), download)),
            }
        },
    ))
}

/// Streams the request body into a guest file (created or replaced).
#[utoipa::path(put, path = "/v1/sandboxes/{id}/files", tag = "files",
    operation_id = "upload_file",
    params(("id" = String, Path, description = "Sandbox id"), UploadQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses(
        (status = 200, description = "Written", body = UploadResult),
        (status = "4XX", description = "Bad path or mode, too large, no such sandbox", body = Problem, content_type = "application/problem+json"),
        (status = "5XX", description = "The guest agent failed", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn upload_file(
    State(daemon): State<Arc<Daemon>>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(query): ApiQuery<UploadQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<axum::Json<UploadResult>, Problem> {
    check_path(&query.path)?;
    let mode = parse_mode(query.mode.as_deref(), 0o644)?;
    let limit = daemon.policy().limits.max_upload_bytes;
    let too_large = || {
        Problem::new(
            ProblemCode::PayloadTooLarge,
            format!("the upload is larger than this daemon's limit of {limit} bytes"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    let sid = daemon.known(&id).await?;
    let seen = Arc::new(AtomicU64::new(0));
    let over = Arc::new(AtomicBool::new(false));
    let (seen_in, over_in) = (seen.clone(), over.clone());
    let stream = body
        .into_data_stream()
        .map_err(std::io::Error::other)
        .map(move |chunk| {
            let chunk = chunk?;
            let total =
                seen_in.fetch_add(chunk.len() as u64, Ordering::Relaxed) + chunk.len() as u64;
            if total > limit {
                over_in.store(true, Ordering::Relaxed);
                return Err(std::io::Error::other("upload over the limit"));
            }
            Ok(chunk)
        });
    let reader = tokio_util::io::StreamReader::new(stream);
    let result = daemon
        .hypervisor()
        .upload(&sid, &query.path, mode, Box::new(reader))
        .await;
    if over.load(Ordering::Relaxed) {
        return Err(too_large());
    }
    Ok(axum::Json(UploadResult { bytes: result? }))
}

/// Lists a guest directory.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/files/list", tag = "files",
    operation_id = "list_dir",
    params(("id" = String, Path, description = "Sandbox id"), PathQuery),
    responses(
        (status = 200, description = "The entries", body = DirListingView),
        (status = "4XX", description = "Bad path, not a directory, no such sandbox", body = Problem, content_type = "application/problem+json"),
        (status = "5XX", description = "The guest agent failed", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn list_dir(
    State(daemon): State<Arc<Daemon>>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(query): ApiQuery<PathQuery>,
) -> Result<axum::Json<DirListingView>, Problem> {
    check_path(&query.path)?;
    let sid = daemon.known(&id).await?;
    let listing = daemon.hypervisor().list_dir(&sid, &query.path).await?;
    Ok(axum::Json(listing.into()))
}

/// Metadata of a guest path (links followed).
#[utoipa::path(get, path = "/v1/sandboxes/{id}/files/stat", tag = "files",
    operation_id = "stat",
    params(("id" = String, Path, description = "Sandbox id"), PathQuery),
    responses(
        (status = 200, description = "Its metadata", body = FileStatView),
        (status = "4XX", description = "Bad path, no such file or sandbox", body = Problem, content_type = "application/problem+json"),
        (status = "5XX", description = "The guest agent failed", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn stat(
    State(daemon): State<Arc<Daemon>>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(query): ApiQuery<PathQuery>,
) -> Result<axum::Json<FileStatView>, Problem> {
    check_path(&query.path)?;
    let sid = daemon.known(&id).await?;
    let stat = daemon.hypervisor().stat(&sid, &query.path).await?;
    Ok(axum::Json(stat.into()))
}

/// Makes a guest directory and its missing parents.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/files/mkdir", tag = "files",
    operation_id = "mkdir",
    params(("id" = String, Path, description = "Sandbox id")),
    request_body = MkdirRequest,
    responses(
        (status = 204, description = "Made (or already there)"),
        (status = "4XX", description = "Bad path or mode, a file in the way, no such sandbox", body = Problem, content_type = "application/problem+json"),
        (status = "5XX", description = "The guest agent failed", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn mkdir(
    State(daemon): State<Arc<Daemon>>,
    ApiPath(id): ApiPath<String>,
    ApiJson(request): ApiJson<MkdirRequest>,
) -> Result<StatusCode, Problem> {
    check_path(&request.path)?;
    let mode = parse_mode(request.mode.as_deref(), 0o755)?;
    let sid = daemon.known(&id).await?;
    daemon.hypervisor().mkdir(&sid, &request.path, mode).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Removes a guest file or empty directory (or, `recursive`, a tree).
#[utoipa::path(delete, path = "/v1/sandboxes/{id}/files", tag = "files",
    operation_id = "remove",
    params(("id" = String, Path, description = "Sandbox id"), RemoveQuery),
    responses(
        (status = 204, description = "Removed"),
        (status = "4XX", description = "Bad path, no such file, not empty, no such sandbox", body = Problem, content_type = "application/problem+json"),
        (status = "5XX", description = "The guest agent failed", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn remove(
    State(daemon): State<Arc<Daemon>>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(query): ApiQuery<RemoveQuery>,
) -> Result<StatusCode, Problem> {
    check_path(&query.path)?;
    let sid = daemon.known(&id).await?;
    daemon
        .hypervisor()
        .remove(&sid, &query.path, query.recursive)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_are_octal_permission_bits() {
        assert_eq!(parse_mode(None, 0o644).unwrap(), 0o644);
        assert_eq!(parse_mode(Some("755"), 0).unwrap(), 0o755);
        assert_eq!(parse_mode(Some("0o600"), 0).unwrap(), 0o600);
        assert!(parse_mode(Some("999"), 0).is_err());
        assert!(parse_mode(Some("17777"), 0).is_err());
        assert!(parse_mode(Some(""), 0).is_err());
    }
}
