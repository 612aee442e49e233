//! Bearer-token authentication for the TCP listener.
//!
//! The Unix socket needs none: it is mode 0600, so only its owner can
//! connect. Over TCP every request carries `Authorization: Bearer <token>`,
//! where the token is `$NOVA_HOME/token`, made at the first start (32 random
//! bytes, hex, mode 0600) and compared in constant time.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use crate::problem::{Problem, ProblemCode};

/// The token file's name under `$NOVA_HOME`.
pub const TOKEN_FILE: &str = "token";

/// A bearer token.
#[derive(Clone)]
pub struct Token(Arc<str>);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(..)")
    }
}

impl Token {
    /// The token in `path`, or a new one written there (mode 0600) when the
    /// file does not exist.
    pub fn load_or_create(path: &Path) -> std::io::Result<Self> {
        match std::fs::read_to_string(path) {
            Ok(text) if !text.trim().is_empty() => return Ok(Self(text.trim().into())),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).map_err(std::io::Error::other)?;
        let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)?;
        file.write_all(token.as_bytes())?;
        file.write_all(b"\n")?;
        Ok(Self(token.into()))
    }

    /// The token's text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `presented` is this token, in time independent of where they
    /// differ.
    pub fn matches(&self, presented: &str) -> bool {
        self.0.as_bytes().ct_eq(presented.as_bytes()).into()
    }
}

/// Middleware: refuses a request without the right bearer token (401).
pub async fn require_token(State(token): State<Token>, request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match presented {
        Some(p) if token.matches(p.trim()) => next.run(request).await,
        Some(_) => unauthorized("the bearer token is wrong"),
        None => unauthorized("send Authorization: Bearer <token>"),
    }
}

fn unauthorized(why: &str) -> Response {
    let mut response = Problem::new(
        ProblemCode::Unauthorized,
        format!("{why}; the token is in $NOVA_HOME/{TOKEN_FILE} on the daemon's host"),
    )
    .into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    response
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn a_token_is_made_once_private_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(TOKEN_FILE);
        let a = Token::load_or_create(&path).unwrap();
        assert_eq!(a.as_str().len(), 64);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let b = Token::load_or_create(&path).unwrap();
        assert_eq!(a.as_str(), b.as_str());
        assert!(a.matches(b.as_str()));
        assert!(!a.matches("nope"));
        assert!(!a.matches(""));
    }
}
