//! The Connect RPC protocol, as much of it as E2B's SDKs speak: unary and
//! server-streaming calls over HTTP/1.1 with the JSON codec.
//!
//! ```text
//! unary:   POST /pkg.Service/Method   Content-Type: application/json
//!          body: the request message (proto3 JSON)
//!   <- 200 application/json           body: the response message
//!   <- 4xx/5xx application/json       body: {"code":"not_found","message":"..."}
//!
//! server-streaming:  POST /pkg.Service/Method   Content-Type: application/connect+json
//!          body: one envelope
//!   <- 200 application/connect+json   body: envelopes, the last one flagged end-of-stream
//!
//! envelope: flags (1 byte) | length (4 bytes, big-endian) | payload (length bytes)
//!   flags 0x00  a message
//!   flags 0x02  end of stream; payload {} or {"error":{"code":..,"message":..}}
//!   flags 0x01  compressed (never sent; refused when received)
//! ```
//!
//! Both codecs are served, chosen by the request's content type: JSON
//! (`application/json`, `application/connect+json`; what E2B's SDKs send: the
//! Python SDK's `ENVD_JSON_CODEC`, the JS SDK's `useBinaryFormat: false`)
//! and binary protobuf (`application/proto`, `application/connect+proto`;
//! [`super::proto`]). Errors and end-of-stream messages are JSON whatever
//! the codec, as the protocol says.

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::{BufMut, Bytes, BytesMut};
use futures_util::Stream;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::e2b::proto::{Decode, Encode};

/// Largest request message accepted, bytes.
pub const MAX_MESSAGE: usize = 4 * 1024 * 1024;

/// The envelope flag of a compressed message.
const FLAG_COMPRESSED: u8 = 0x01;
/// The envelope flag of the end-of-stream message.
pub const FLAG_END_STREAM: u8 = 0x02;

/// A Connect error code (the protocol's names, which are gRPC's).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    /// The caller cancelled.
    Canceled,
    /// Something else.
    Unknown,
    /// A bad request.
    InvalidArgument,
    /// It took too long.
    DeadlineExceeded,
    /// No such thing.
    NotFound,
    /// It exists already.
    AlreadyExists,
    /// Not allowed.
    PermissionDenied,
    /// Out of a quota or busy.
    ResourceExhausted,
    /// Not in a state for this.
    FailedPrecondition,
    /// Not served here.
    Unimplemented,
    /// The server failed.
    Internal,
    /// The sandbox cannot be reached.
    Unavailable,
    /// No or wrong credentials.
    Unauthenticated,
}

impl Code {
    /// The code's name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Canceled => "canceled",
            Self::Unknown => "unknown",
            Self::InvalidArgument => "invalid_argument",
            Self::DeadlineExceeded => "deadline_exceeded",
            Self::NotFound => "not_found",
            Self::AlreadyExists => "already_exists",
            Self::PermissionDenied => "permission_denied",
            Self::ResourceExhausted => "resource_exhausted",
            Self::FailedPrecondition => "failed_precondition",
            Self::Unimplemented => "unimplemented",
            Self::Internal => "internal",
            Self::Unavailable => "unavailable",
            Self::Unauthenticated => "unauthenticated",
        }
    }

    /// The HTTP status of a unary error with this code (Connect's table).
    pub fn http_status(self) -> StatusCode {
        match self {
            Self::Canceled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
            Self::Unknown | Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            Self::InvalidArgument | Self::FailedPrecondition => StatusCode::BAD_REQUEST,
            Self::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::AlreadyExists => StatusCode::CONFLICT,
            Self::PermissionDenied => StatusCode::FORBIDDEN,
            Self::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            Self::Unimplemented => StatusCode::NOT_IMPLEMENTED,
            Self::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::Unauthenticated => StatusCode::UNAUTHORIZED,
        }
    }
}

/// A Connect error: a code and a message for the caller.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}: {message}", code.as_str())]
pub struct ConnectError {
    /// What kind of failure.
    pub code: Code,
    /// What failed and what to do.
    pub message: String,
}

impl ConnectError {
    /// An error with `code`.
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// The part of E2B's API named `what` is not served by NovaSandbox.
    pub fn unimplemented(what: &str) -> Self {
        Self::new(
            Code::Unimplemented,
            format!("{what} is not served by NovaSandbox's E2B API"),
        )
    }

    /// The error as Connect's JSON object.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({ "code": self.code.as_str(), "message": self.message })
    }
}

impl From<crate::problem::Problem> for ConnectError {
    fn from(p: crate::problem::Problem) -> Self {
        let code = match p.status {
            400 | 422 => Code::InvalidArgument,
            401 => Code::Unauthenticated,
            403 => Code::PermissionDenied,
            404 => Code::NotFound,
            409 => match p.code {
                crate::problem::ProblemCode::FileConflict => Code::AlreadyExists,
                _ => Code::FailedPrecondition,
            },
            413 | 429 => Code::ResourceExhausted,
            501 => Code::Unimplemented,
            502 | 503 => Code::Unavailable,
            504 => Code::DeadlineExceeded,
            _ => Code::Internal,
        };
        Self::new(code, p.detail)
    }
}

impl IntoResponse for ConnectError {
    /// The unary form: an HTTP error status with the JSON error body.
    fn into_response(self) -> Response {
        let body = self.to_json().to_string();
        (
            self.code.http_status(),
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            body,
        )
            .into_response()
    }
}

/// How a request is framed, from its `Content-Type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// A unary call: the body is the message.
    Unary,
    /// A streaming call: the body is enveloped.
    Stream,
}

/// A message codec.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codec {
    /// proto3 JSON.
    Json,
    /// Binary protobuf.
    Proto,
}

impl Codec {
    /// The content type of a message with this codec and `framing`.
    pub fn content_type(self, framing: Framing) -> &'static str {
        match (self, framing) {
            (Codec::Json, Framing::Unary) => "application/json",
            (Codec::Proto, Framing::Unary) => "application/proto",
            (Codec::Json, Framing::Stream) => "application/connect+json",
            (Codec::Proto, Framing::Stream) => "application/connect+proto",
        }
    }
}

/// A message both codecs can write.
pub trait Message: Serialize + Encode {}
impl<T: Serialize + Encode> Message for T {}

/// A message both codecs can read.
pub trait Request: DeserializeOwned + Decode {}
impl<T: DeserializeOwned + Decode> Request for T {}

/// The codec of a request with `framing`, from its `Content-Type`.
pub fn codec_of(headers: &HeaderMap, framing: Framing) -> Result<Codec, ConnectError> {
    let raw = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let media = raw
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    for codec in [Codec::Json, Codec::Proto] {
        if media == codec.content_type(framing) {
            return Ok(codec);
        }
    }
    Err(ConnectError::new(
        Code::InvalidArgument,
        format!(
            "content type {raw:?} is neither {:?} nor {:?}",
            Codec::Json.content_type(framing),
            Codec::Proto.content_type(framing)
        ),
    ))
}

/// Decodes a unary request body.
pub fn decode_unary<T: Request>(codec: Codec, body: &[u8]) -> Result<T, ConnectError> {
    match codec {
        Codec::Json => {
            let body = if body.is_empty() {
                b"{}".as_slice()
            } else {
                body
            };
            serde_json::from_slice(body).map_err(|e| {
                ConnectError::new(Code::InvalidArgument, format!("bad request message: {e}"))
            })
        }
        Codec::Proto => {
            T::decode(body).map_err(|e| ConnectError::new(Code::InvalidArgument, e.to_string()))
        }
    }
}

/// A message's bytes in `codec`.
pub fn encode<T: Message>(codec: Codec, message: &T) -> Vec<u8> {
    match codec {
        // Serializing our own wire types cannot fail (string keys, no
        // non-finite floats).
        Codec::Json => serde_json::to_vec(message).unwrap_or_else(|_| b"{}".to_vec()),
        Codec::Proto => message.to_bytes(),
    }
}

/// Decodes the single enveloped message of a server-streaming request.
pub fn decode_stream_request<T: Request>(codec: Codec, body: &[u8]) -> Result<T, ConnectError> {
    let (flags, payload, rest) = split_envelope(body)?;
    if flags & FLAG_COMPRESSED != 0 {
        return Err(ConnectError::unimplemented("compressed Connect messages"));
    }
    if !rest.is_empty() {
        return Err(ConnectError::new(
            Code::InvalidArgument,
            "a server-streaming call takes exactly one request message",
        ));
    }
    decode_unary(codec, payload)
}

/// Splits the first envelope off `buf`: its flags, payload and what follows.
pub fn split_envelope(buf: &[u8]) -> Result<(u8, &[u8], &[u8]), ConnectError> {
    let bad =
        |what: &str| ConnectError::new(Code::InvalidArgument, format!("bad envelope: {what}"));
    if buf.len() < 5 {
        return Err(bad("shorter than its 5-byte header"));
    }
    let flags = buf[0];
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if len > MAX_MESSAGE {
        return Err(ConnectError::new(
            Code::ResourceExhausted,
            format!("message of {len} bytes is over the {MAX_MESSAGE}-byte limit"),
        ));
    }
    let rest = &buf[5..];
    if rest.len() < len {
        return Err(bad("shorter than its length"));
    }
    Ok((flags, &rest[..len], &rest[len..]))
}

/// One envelope around `payload`.
pub fn envelope(flags: u8, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(5 + payload.len());
    out.put_u8(flags);
    // Payloads are our own messages, far below 4 GiB.
    out.put_u32(u32::try_from(payload.len()).unwrap_or(u32::MAX));
    out.put_slice(payload);
    out.freeze()
}

/// The envelope of one streamed message.
pub fn message_frame<T: Message>(codec: Codec, message: &T) -> Bytes {
    envelope(0, &encode(codec, message))
}

/// The end-of-stream envelope, carrying `error` if the call failed.
pub fn end_frame(error: Option<&ConnectError>) -> Bytes {
    let payload = match error {
        Some(e) => serde_json::json!({ "error": e.to_json() }),
        None => serde_json::json!({}),
    };
    envelope(FLAG_END_STREAM, payload.to_string().as_bytes())
}

/// A unary response carrying `message`.
pub fn unary_response<T: Message>(codec: Codec, message: &T) -> Response {
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static(codec.content_type(Framing::Unary)),
        )],
        encode(codec, message),
    )
        .into_response()
}

/// A streaming response whose body is `frames` (each already enveloped; the
/// stream's last frame must be an [`end_frame`]).
pub fn stream_response<S>(codec: Codec, frames: S) -> Response
where
    S: Stream<Item = Bytes> + Send + 'static,
{
    let body = Body::from_stream(futures_util::StreamExt::map(
        frames,
        Ok::<_, std::io::Error>,
    ));
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static(codec.content_type(Framing::Stream)),
        )],
        body,
    )
        .into_response()
}

/// A streaming call that failed before its first message: Connect sends
/// it as a stream holding only the end frame, with status 200.
pub fn stream_error(codec: Codec, error: ConnectError) -> Response {
    stream_response(codec, futures_util::stream::iter([end_frame(Some(&error))]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_envelope_round_trips() {
        let frame = envelope(0, br#"{"a":1}"#);
        assert_eq!(&frame[..5], &[0, 0, 0, 0, 7]);
        let (flags, payload, rest) = split_envelope(&frame).unwrap();
        assert_eq!(
            (flags, payload, rest),
            (0, br#"{"a":1}"#.as_slice(), [].as_slice())
        );
    }

    #[test]
    fn truncated_and_oversized_envelopes_are_refused() {
        assert!(split_envelope(&[0, 0, 0]).is_err());
        assert!(split_envelope(&[0, 0, 0, 0, 9, b'{']).is_err());
        let e = split_envelope(&[0, 0xff, 0xff, 0xff, 0xff]).unwrap_err();
        assert_eq!(e.code, Code::ResourceExhausted);
    }

    #[test]
    fn a_stream_request_is_one_message_in_either_codec() {
        use crate::e2b::wire::PathRequest;
        let m: PathRequest =
            decode_stream_request(Codec::Json, &envelope(0, br#"{"path":"/x"}"#)).unwrap();
        assert_eq!(m.path, "/x");
        let m: PathRequest =
            decode_stream_request(Codec::Proto, &envelope(0, &[0x0a, 0x02, b'/', b'y'])).unwrap();
        assert_eq!(m.path, "/y");
        let mut two = envelope(0, b"{}").to_vec();
        two.extend_from_slice(&envelope(0, b"{}"));
        assert!(decode_stream_request::<PathRequest>(Codec::Json, &two).is_err());
        let compressed = envelope(FLAG_COMPRESSED, b"{}");
        let e = decode_stream_request::<PathRequest>(Codec::Json, &compressed).unwrap_err();
        assert_eq!(e.code, Code::Unimplemented);
    }

    #[test]
    fn an_empty_unary_body_is_the_empty_message() {
        let v: crate::e2b::wire::PathRequest = decode_unary(Codec::Json, b"").unwrap();
        assert_eq!(v.path, "");
        let v: crate::e2b::wire::PathRequest = decode_unary(Codec::Proto, b"").unwrap();
        assert_eq!(v.path, "");
    }

    #[test]
    fn the_end_frame_carries_the_error() {
        let frame = end_frame(Some(&ConnectError::new(Code::NotFound, "no pid 7")));
        let (flags, payload, _) = split_envelope(&frame).unwrap();
        assert_eq!(flags, FLAG_END_STREAM);
        let v: serde_json::Value = serde_json::from_slice(payload).unwrap();
        assert_eq!(v["error"]["code"], "not_found");
        assert_eq!(v["error"]["message"], "no pid 7");
        let ok_frame = end_frame(None);
        let (_, ok, _) = split_envelope(&ok_frame).unwrap();
        assert_eq!(ok, b"{}");
    }

    #[test]
    fn the_codec_follows_the_content_type() {
        let mut h = HeaderMap::new();
        let ct = |v: &'static str| HeaderValue::from_static(v);
        h.insert(header::CONTENT_TYPE, ct("application/connect+proto"));
        assert_eq!(codec_of(&h, Framing::Stream).unwrap(), Codec::Proto);
        assert!(codec_of(&h, Framing::Unary).is_err());
        h.insert(header::CONTENT_TYPE, ct("application/json; charset=utf-8"));
        assert_eq!(codec_of(&h, Framing::Unary).unwrap(), Codec::Json);
        assert!(codec_of(&h, Framing::Stream).is_err());
        h.insert(header::CONTENT_TYPE, ct("text/plain"));
        let e = codec_of(&h, Framing::Unary).unwrap_err();
        assert_eq!(e.code, Code::InvalidArgument);
    }

    #[test]
    fn unary_errors_use_connects_status_table() {
        assert_eq!(Code::NotFound.http_status(), StatusCode::NOT_FOUND);
        assert_eq!(
            Code::Unimplemented.http_status(),
            StatusCode::NOT_IMPLEMENTED
        );
        assert_eq!(Code::Canceled.http_status().as_u16(), 499);
    }
}
