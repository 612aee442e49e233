//! The user a command runs as ([`ExecUser`]), as `docker exec -u` takes it:
//! `USER[:GROUP]`, each part a name or a number.
//!
//! The host sends what the caller wrote (parsed, not resolved): names are
//! looked up by the agent in the guest's own `/etc/passwd` and `/etc/group`,
//! which the host does not read. A template's default user is usually
//! numeric already (`uid:gid`, resolved against the image's files when the
//! template was built), so the agent only reads the files for `HOME`, the
//! user's name and the supplementary groups.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A user or group: a number, or a name to look up in the guest.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum IdOrName {
    /// A numeric id (uid or gid), used as it is (it need not exist in the
    /// guest's files).
    Id(u32),
    /// A name, which must exist in the guest's `/etc/passwd` (a user) or
    /// `/etc/group` (a group).
    Name(String),
}

impl fmt::Display for IdOrName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Id(id) => write!(f, "{id}"),
            Self::Name(name) => f.write_str(name),
        }
    }
}

/// Who a command runs as: a user and, optionally, a group.
///
/// Without a group, the command gets the user's primary group from
/// `/etc/passwd` (0 for a uid the file does not list) and the user's
/// supplementary groups from `/etc/group`; with one, that group alone.
/// `HOME`, `USER` and `LOGNAME` come from the user's `/etc/passwd` entry
/// unless the command's environment sets them (`HOME=/` for a uid the file
/// does not list), as `docker exec -u` does.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ExecUser {
    /// The user.
    pub user: IdOrName,
    /// The group; the user's own when `None`.
    pub group: Option<IdOrName>,
}

impl ExecUser {
    /// A numeric user, with the user's own group.
    pub fn uid(uid: u32) -> Self {
        Self {
            user: IdOrName::Id(uid),
            group: None,
        }
    }
}

impl fmt::Display for ExecUser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.group {
            Some(group) => write!(f, "{}:{group}", self.user),
            None => write!(f, "{}", self.user),
        }
    }
}

/// Why a `USER[:GROUP]` text is not a user.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid user {given:?}: {reason}; write USER, USER:GROUP, UID or UID:GID (e.g. root, 1000:1000)"
)]
pub struct ParseUserError {
    /// The text as given (at most 80 characters of it).
    pub given: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// Longest user or group name accepted (the guest's tools accept 32; the
/// bound only keeps requests small).
pub const MAX_NAME_LEN: usize = 256;

fn parse_part(part: &str) -> Result<IdOrName, &'static str> {
    if part.is_empty() {
        return Err("an empty user or group");
    }
    if part.len() > MAX_NAME_LEN {
        return Err("a name longer than 256 bytes");
    }
    if part.bytes().all(|b| b.is_ascii_digit()) {
        return match part.parse::<u32>() {
            // (uid_t)-1 means "unchanged" to setuid/setgid.
            Ok(u32::MAX) | Err(_) => Err("an id above 4294967294"),
            Ok(id) => Ok(IdOrName::Id(id)),
        };
    }
    if part
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == '/')
    {
        return Err("a name with a space, a control character or '/'");
    }
    Ok(IdOrName::Name(part.to_owned()))
}

impl FromStr for ExecUser {
    type Err = ParseUserError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let fail = |reason| ParseUserError {
            given: s.chars().take(80).collect(),
            reason,
        };
        let (user, group) = match s.split_once(':') {
            Some((user, group)) => (user, Some(group)),
            None => (s, None),
        };
        if group.is_some_and(|g| g.contains(':')) {
            return Err(fail("more than one ':'"));
        }
        Ok(Self {
            user: parse_part(user).map_err(fail)?,
            group: group.map(parse_part).transpose().map_err(fail)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_parse_as_docker_exec_takes_them() {
        let parse = |s: &str| s.parse::<ExecUser>().unwrap();
        assert_eq!(parse("0"), ExecUser::uid(0));
        assert_eq!(
            parse("app:staff"),
            ExecUser {
                user: IdOrName::Name("app".into()),
                group: Some(IdOrName::Name("staff".into())),
            }
        );
        assert_eq!(
            parse("1000:50"),
            ExecUser {
                user: IdOrName::Id(1000),
                group: Some(IdOrName::Id(50)),
            }
        );
        for text in ["root", "1000:50", "app:staff", "app:0", "7"] {
            assert_eq!(parse(text).to_string(), text);
        }
    }

    #[test]
    fn bad_users_are_refused_with_what_to_write() {
        for (text, reason) in [
            ("", "empty"),
            (":0", "empty"),
            ("app:", "empty"),
            ("a:b:c", "more than one"),
            ("4294967295", "above"),
            ("99999999999", "above"),
            ("a b", "space"),
            ("../x", "'/'"),
        ] {
            let err = text.parse::<ExecUser>().unwrap_err();
            assert!(err.reason.contains(reason), "{text:?}: {err}");
            assert!(err.to_string().contains("USER:GROUP"), "{err}");
        }
        let long = "x".repeat(1000);
        let err = long.parse::<ExecUser>().unwrap_err();
        assert!(err.to_string().len() < 300, "{err}");
    }
}
