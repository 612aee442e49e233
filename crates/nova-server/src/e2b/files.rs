//! envd's `/files` endpoints: `GET /files?path=` downloads a file (streamed
//! from the guest), `POST /files[?path=]` uploads one or more files, as
//! `application/octet-stream` (streamed to the guest) or as
//! `multipart/form-data` with one `file` part per file (held in memory, up
//! to 256 MiB or the policy's `max_upload_bytes`; the part's filename is the
//! path when the query has none). Parent directories are created, as envd does.
//! Errors are JSON `{"code": <status>, "message": ...}`, which the SDK maps
//! to its exceptions by status.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use nova_core::error::FileError;
use nova_core::id::SandboxId;
use serde::{Deserialize, Serialize};

use crate::daemon::Daemon;
use crate::e2b::connect::{Code, ConnectError};
use crate::e2b::filesystem::{file_error, resolve};

/// Largest multipart upload (held in memory), bytes.
const MAX_MULTIPART_BYTES: u64 = 256 * 1024 * 1024;

/// A `/files` error: the status and a message, as JSON.
#[derive(Debug)]
pub struct FilesError(pub StatusCode, pub String);

impl IntoResponse for FilesError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "code": self.0.as_u16(), "message": self.1 });
        (self.0, axum::Json(body)).into_response()
    }
}

impl From<ConnectError> for FilesError {
    fn from(e: ConnectError) -> Self {
        let status = match e.code {
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::InvalidArgument | Code::FailedPrecondition | Code::AlreadyExists => {
                StatusCode::BAD_REQUEST
            }
            Code::PermissionDenied => StatusCode::FORBIDDEN,
            Code::Unauthenticated => StatusCode::UNAUTHORIZED,
            Code::ResourceExhausted => StatusCode::PAYLOAD_TOO_LARGE,
            Code::Unavailable => StatusCode::BAD_GATEWAY,
            _ => e.code.http_status(),
        };
        Self(status, e.message)
    }
}

fn from_file(e: FileError) -> FilesError {
    let no_space = matches!(e, FileError::NoSpace { .. });
    let f: FilesError = file_error(e).into();
    if no_space {
        FilesError(StatusCode::INSUFFICIENT_STORAGE, f.1)
    } else {
        f
    }
}

/// The query of `/files`.
#[derive(Debug, Default, Deserialize)]
pub struct FilesQuery {
    /// The guest path.
    #[serde(default)]
    pub path: Option<String>,
    /// The E2B user (ignored: files belong to the agent's user).
    #[serde(default)]
    pub username: Option<String>,
}

/// What envd answers an upload with, per file.
#[derive(Debug, Serialize)]
pub struct WriteInfo {
    /// Its name.
    pub name: String,
    /// `file`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Its absolute path.
    pub path: String,
}

fn write_info(path: &str) -> WriteInfo {
    WriteInfo {
        name: path.rsplit('/').next().unwrap_or("").to_owned(),
        kind: "file",
        path: path.to_owned(),
    }
}

/// `GET /files?path=`.
pub async fn download(
    daemon: &Arc<Daemon>,
    id: &SandboxId,
    query: FilesQuery,
) -> Result<Response, FilesError> {
    let path = resolve(query.path.as_deref().unwrap_or(""))?;
    let download = daemon
        .hypervisor()
        .download(id, &path)
        .await
        .map_err(from_file)?;
    let size = download.size();
    Ok((
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
            (header::CONTENT_LENGTH, size.to_string()),
        ],
        crate::api::files::download_body(download),
    )
        .into_response())
}

/// Creates the parent directory of `path`.
async fn make_parent(daemon: &Daemon, id: &SandboxId, path: &str) -> Result<(), FilesError> {
    match path.rsplit_once('/') {
        Some((parent, _)) if !parent.is_empty() => daemon
            .hypervisor()
            .mkdir(id, parent, 0o755)
            .await
            .map_err(from_file),
        _ => Ok(()),
    }
}

/// `POST /files`.
pub async fn upload(
    daemon: &Arc<Daemon>,
    id: &SandboxId,
    query: FilesQuery,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, FilesError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    if headers.contains_key(header::CONTENT_ENCODING) {
        return Err(FilesError(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "compressed uploads (Content-Encoding) are not served by NovaSandbox's E2B API; upload without gzip".into(),
        ));
    }
    let limit = daemon.policy().limits.max_upload_bytes;
    let media = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if media == "multipart/form-data" {
        let boundary = boundary(&content_type).ok_or_else(|| {
            FilesError(
                StatusCode::BAD_REQUEST,
                "multipart/form-data without a boundary".into(),
            )
        })?;
        // A multipart body is held in memory: bounded below the policy's
        // limit for streamed uploads.
        let cap = limit.min(MAX_MULTIPART_BYTES);
        let bytes = axum::body::to_bytes(body, usize::try_from(cap).unwrap_or(usize::MAX))
            .await
            .map_err(|_| {
                FilesError(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!(
                        "a multipart upload is limited to {cap} bytes here: upload larger files as \
                         application/octet-stream (the SDK's use_octet_stream=True, or a file object)"
                    ),
                )
            })?;
        let parts = parse_multipart(&bytes, &boundary)
            .map_err(|e| FilesError(StatusCode::BAD_REQUEST, format!("bad multipart body: {e}")))?;
        let files: Vec<&Part<'_>> = parts.iter().filter(|p| p.name == "file").collect();
        if files.is_empty() {
            return Err(FilesError(
                StatusCode::BAD_REQUEST,
                "no `file` part in the upload".into(),
            ));
        }
        let mut written = Vec::with_capacity(files.len());
        for part in files {
            let raw = match (&query.path, files_len_is_one(&parts)) {
                (Some(p), true) => p.clone(),
                _ => part.filename.clone().ok_or_else(|| {
                    FilesError(
                        StatusCode::BAD_REQUEST,
                        "a `file` part without a filename (the path)".into(),
                    )
                })?,
            };
            let path = resolve(&raw)?;
            make_parent(daemon, id, &path).await?;
            daemon
                .hypervisor()
                .write_file(id, &path, part.data.to_vec(), 0o644)
                .await
                .map_err(from_file)?;
            written.push(write_info(&path));
        }
        Ok(axum::Json(written).into_response())
    } else if media == "application/octet-stream" || media.is_empty() {
        let raw = query.path.clone().ok_or_else(|| {
            FilesError(
                StatusCode::BAD_REQUEST,
                "an octet-stream upload needs ?path=".into(),
            )
        })?;
        let path = resolve(&raw)?;
        make_parent(daemon, id, &path).await?;
        let mut seen: u64 = 0;
        let stream = body.into_data_stream().map(move |chunk| {
            let chunk = chunk.map_err(std::io::Error::other)?;
            seen += chunk.len() as u64;
            if seen > limit {
                Err(std::io::Error::other("upload over the limit"))
            } else {
                Ok(chunk)
            }
        });
        let reader = tokio_util::io::StreamReader::new(stream);
        daemon
            .hypervisor()
            .upload(id, &path, 0o644, Box::new(reader))
            .await
            .map_err(from_file)?;
        Ok(axum::Json(vec![write_info(&path)]).into_response())
    } else {
        Err(FilesError(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!(
                "content type {content_type:?}: upload multipart/form-data or application/octet-stream"
            ),
        ))
    }
}

fn files_len_is_one(parts: &[Part<'_>]) -> bool {
    parts.iter().filter(|p| p.name == "file").count() == 1
}

/// The boundary parameter of a multipart content type.
fn boundary(content_type: &str) -> Option<String> {
    content_type.split(';').skip(1).find_map(|param| {
        let (k, v) = param.trim().split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case("boundary")
            .then(|| v.trim().trim_matches('"').to_owned())
            .filter(|b| !b.is_empty())
    })
}

/// One part of a multipart body.
#[derive(Debug, PartialEq, Eq)]
struct Part<'a> {
    name: String,
    filename: Option<String>,
    data: &'a [u8],
}

fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    (from..=hay.len() - needle.len()).find(|&i| &hay[i..i + needle.len()] == needle)
}

/// The parts of a `multipart/form-data` body (RFC 7578).
fn parse_multipart<'a>(body: &'a [u8], boundary: &str) -> Result<Vec<Part<'a>>, &'static str> {
    let delimiter = format!("--{boundary}");
    let delimiter = delimiter.as_bytes();
    let mut pos = find(body, delimiter, 0).ok_or("no boundary")? + delimiter.len();
    let mut parts = Vec::new();
    loop {
        if body[pos..].starts_with(b"--") {
            return Ok(parts);
        }
        if !body[pos..].starts_with(b"\r\n") {
            return Err("boundary not followed by CRLF");
        }
        pos += 2;
        let head_end = find(body, b"\r\n\r\n", pos).ok_or("part without headers' end")?;
        let head = std::str::from_utf8(&body[pos..head_end]).map_err(|_| "headers not UTF-8")?;
        let data_start = head_end + 4;
        let mut close = Vec::with_capacity(delimiter.len() + 2);
        close.extend_from_slice(b"\r\n");
        close.extend_from_slice(delimiter);
        let data_end = find(body, &close, data_start).ok_or("part without a closing boundary")?;
        let mut name = String::new();
        let mut filename = None;
        for line in head.split("\r\n") {
            let Some((k, v)) = line.split_once(':') else {
                continue;
            };
            if !k.trim().eq_ignore_ascii_case("content-disposition") {
                continue;
            }
            for param in v.split(';').skip(1) {
                let Some((pk, pv)) = param.trim().split_once('=') else {
                    continue;
                };
                let pv = pv.trim().trim_matches('"').to_owned();
                match pk.trim() {
                    "name" => name = pv,
                    "filename" => filename = Some(pv),
                    _ => {}
                }
            }
        }
        parts.push(Part {
            name,
            filename,
            data: &body[data_start..data_end],
        });
        pos = data_end + close.len();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_multipart_body_as_httpx_sends_it() {
        let body = b"--abc\r\nContent-Disposition: form-data; name=\"file\"; filename=\"/tmp/a.txt\"\r\nContent-Type: application/octet-stream\r\n\r\nhello\r\nworld\r\n--abc\r\nContent-Disposition: form-data; name=\"file\"; filename=\"b\"\r\n\r\n\r\n--abc--\r\n";
        let parts = parse_multipart(body, "abc").unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].name, "file");
        assert_eq!(parts[0].filename.as_deref(), Some("/tmp/a.txt"));
        assert_eq!(parts[0].data, b"hello\r\nworld");
        assert_eq!(parts[1].data, b"");
    }

    #[test]
    fn broken_multipart_bodies_are_refused() {
        assert!(parse_multipart(b"nothing", "abc").is_err());
        assert!(
            parse_multipart(
                b"--abc\r\nContent-Disposition: form-data; name=\"f\"\r\n\r\ndata",
                "abc"
            )
            .is_err()
        );
    }

    #[test]
    fn the_boundary_is_read_from_the_content_type() {
        assert_eq!(
            boundary("multipart/form-data; boundary=xyz").as_deref(),
            Some("xyz")
        );
        assert_eq!(
            boundary("multipart/form-data; charset=utf-8; boundary=\"q r\"").as_deref(),
            Some("q r")
        );
        assert_eq!(boundary("multipart/form-data"), None);
    }
}
