//! Sandbox identifiers.
//!
//! A [`SandboxId`] is `sb-` followed by 12 characters of lowercase base32
//! (Crockford's alphabet, no `i l o u`): 60 random bits from the OS, short
//! enough to type, and safe in a URL path segment, a file name, a tap device
//! suffix or a cgroup name. Ids given by callers are accepted when they use
//! the same safe alphabet.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

const ALPHABET: &[u8; 32] = b"0123456789abcdefghjkmnpqrstvwxyz";
const RANDOM_CHARS: usize = 12;
/// Longest id accepted from a caller.
pub const MAX_ID_LEN: usize = 64;

/// Identifies one sandbox for its whole life.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SandboxId(String);

/// A string that cannot be a [`SandboxId`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid sandbox id {0:?}: use 1 to {MAX_ID_LEN} characters of a-z, 0-9 and '-', starting \
     with a letter or digit"
)]
pub struct InvalidSandboxId(pub String);

impl SandboxId {
    /// A fresh random id.
    ///
    /// # Panics
    ///
    /// If the OS random source fails, which on Linux means `getrandom(2)` is
    /// missing: the host is unusable for sandboxes anyway.
    pub fn random() -> Self {
        let mut bytes = [0u8; 8];
        getrandom::fill(&mut bytes).expect("the OS random number generator must work");
        let mut bits = u64::from_le_bytes(bytes);
        let mut id = String::with_capacity(3 + RANDOM_CHARS);
        id.push_str("sb-");
        for _ in 0..RANDOM_CHARS {
            id.push(char::from(ALPHABET[(bits & 31) as usize]));
            bits >>= 5;
        }
        Self(id)
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SandboxId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for SandboxId {
    type Err = InvalidSandboxId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let b = s.as_bytes();
        let valid = !b.is_empty()
            && b.len() <= MAX_ID_LEN
            && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
            && b.iter()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-');
        if valid {
            Ok(Self(s.to_owned()))
        } else {
            Err(InvalidSandboxId(s.to_owned()))
        }
    }
}

impl TryFrom<String> for SandboxId {
    type Error = InvalidSandboxId;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<SandboxId> for String {
    fn from(id: SandboxId) -> Self {
        id.0
    }
}

impl AsRef<str> for SandboxId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn random_ids_are_short_safe_and_distinct() {
        let ids: HashSet<SandboxId> = (0..10_000).map(|_| SandboxId::random()).collect();
        assert_eq!(ids.len(), 10_000);
        for id in ids.iter().take(100) {
            assert_eq!(id.as_str().len(), 15);
            assert!(id.as_str().starts_with("sb-"));
            assert_eq!(id.as_str().parse::<SandboxId>().unwrap(), *id);
        }
    }

    #[test]
    fn parse_rejects_unsafe_strings() {
        for bad in ["", "../x", "a/b", "A", "-a", "a b", "a%2f", &"a".repeat(65)] {
            assert!(bad.parse::<SandboxId>().is_err(), "{bad:?}");
        }
        assert!("my-box-1".parse::<SandboxId>().is_ok());
    }

    #[test]
    fn serde_validates() {
        let id: SandboxId = serde_json::from_str("\"sb-abc\"").unwrap();
        assert_eq!(id.as_str(), "sb-abc");
        assert!(serde_json::from_str::<SandboxId>("\"../etc\"").is_err());
    }
}
