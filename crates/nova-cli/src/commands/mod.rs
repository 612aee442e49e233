//! The Docker-like client commands: each talks to a running daemon (`nova
//! serve`) through [`crate::client`], never to a VMM.
//!
//! | command | API |
//! |---|---|
//! | `create` | `POST /v1/sandboxes` ([`create`]) |
//! | `ls` | `GET /v1/sandboxes` ([`list`]) |
//! | `exec`, `attach` | WebSocket `.../exec/stream`, `.../execs/{id}/stream` ([`exec`]) |
//! | `cp` | `PUT` / `GET .../files` streamed ([`cp`]) |
//! | `stats` | `GET .../stats` ([`stats`]) |
//! | `pause`, `resume`, `stop`, `rm`, `logs`, `inspect` | ([`lifecycle`]) |
//!
//! Each returns the process's exit code; errors go up to `main`, which
//! prints them (a daemon's problem prints as its detail).

pub(crate) mod cp;
pub(crate) mod create;
pub(crate) mod exec;
pub(crate) mod lifecycle;
pub(crate) mod list;
pub(crate) mod stats;

use std::collections::BTreeMap;

/// Parses `KEY=VALUE` (labels, environment variables).
pub(crate) fn key_value(raw: &str) -> Result<(String, String), String> {
    match raw.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{raw:?} is not KEY=VALUE")),
    }
}

/// `KEY=VALUE` pairs as a map (a later key wins).
pub(crate) fn to_map(pairs: &[(String, String)]) -> BTreeMap<String, String> {
    pairs.iter().cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_values_split_at_the_first_equals() {
        assert_eq!(key_value("a=b=c").unwrap(), ("a".into(), "b=c".into()));
        assert_eq!(key_value("a=").unwrap(), ("a".into(), String::new()));
        assert!(key_value("=x").is_err());
        assert!(key_value("novalue").is_err());
    }
}
