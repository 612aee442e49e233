//! Running a command as another user ([`nova_protocol::ExecSpec::user`]).
//!
//! [`resolve`] turns the request's `USER[:GROUP]` into numeric ids against
//! the guest's `/etc/passwd` and `/etc/group`, as `docker exec -u` does:
//!
//! * a user name must be in `/etc/passwd`, a group name in `/etc/group`
//!   (else [`SpawnErrorKind::UnknownUser`], naming it);
//! * a number is used as it is; a uid that `/etc/passwd` lists gets that
//!   entry's name, home and primary group, one it does not list gets group
//!   0 and `HOME=/`;
//! * without a group, the supplementary groups are every `/etc/group` entry
//!   that lists the user's name; with one, there are none.
//!
//! [`Identity::apply`] sets `HOME`, `USER` and `LOGNAME` (the request's own
//! environment, applied after, still wins) and makes the child call
//! `setgroups`, `setgid`, `setuid`, in that order, between `fork` and
//! `exec`. Files the agent writes for the host (the file API) are still
//! written as root.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use nova_protocol::{ExecUser, IdOrName, RemoteError, RemoteErrorKind, SpawnErrorKind};
use rustix::process::{Gid, Uid};

/// Most groups a user is given (the kernel's `NGROUPS_MAX` is 65536; this
/// only bounds what a hostile `/etc/group` costs).
const MAX_GROUPS: usize = 1024;

/// A user resolved to what the kernel takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Identity {
    /// The user id.
    pub(crate) uid: u32,
    /// The primary group id.
    pub(crate) gid: u32,
    /// The supplementary group ids (the primary one included when
    /// `/etc/group` lists the user in it).
    pub(crate) groups: Vec<u32>,
    /// The user's name, when `/etc/passwd` lists the uid.
    pub(crate) name: Option<String>,
    /// The home directory (`/` when `/etc/passwd` does not list the uid).
    pub(crate) home: String,
}

/// One `/etc/passwd` line's fields this module uses.
struct PasswdEntry<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
    home: &'a str,
}

fn passwd_entries(passwd: &str) -> impl Iterator<Item = PasswdEntry<'_>> {
    passwd.lines().filter_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        if line.starts_with('#') || fields.len() < 6 {
            return None;
        }
        Some(PasswdEntry {
            name: fields[0],
            uid: fields[2].parse().ok()?,
            gid: fields[3].parse().ok()?,
            home: fields[5],
        })
    })
}

/// `(name, gid, members)` of each `/etc/group` line.
fn group_entries(group: &str) -> impl Iterator<Item = (&str, u32, &str)> {
    group.lines().filter_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        if line.starts_with('#') || fields.len() < 3 {
            return None;
        }
        Some((
            fields[0],
            fields[2].parse().ok()?,
            fields.get(3).copied().unwrap_or(""),
        ))
    })
}

fn unknown(what: &str, name: &str, file: &str) -> RemoteError {
    RemoteError::new(
        RemoteErrorKind::Spawn(SpawnErrorKind::UnknownUser),
        format!(
            "{what} {name:?} is not in the guest's {file}: name one it lists, or give a number \
             (UID[:GID])"
        ),
    )
}

/// Resolves `user` against the text of `/etc/passwd` and `/etc/group` (see
/// the module docs).
pub(crate) fn resolve(user: &ExecUser, passwd: &str, group: &str) -> Result<Identity, RemoteError> {
    let (uid, entry) = match &user.user {
        IdOrName::Name(name) => {
            let entry = passwd_entries(passwd)
                .find(|e| e.name == name)
                .ok_or_else(|| unknown("user", name, "/etc/passwd"))?;
            (entry.uid, Some(entry))
        }
        IdOrName::Id(uid) => (*uid, passwd_entries(passwd).find(|e| e.uid == *uid)),
    };
    let (gid, groups) = match &user.group {
        Some(IdOrName::Id(gid)) => (*gid, Vec::new()),
        Some(IdOrName::Name(name)) => {
            let gid = group_entries(group)
                .find(|(n, _, _)| n == name)
                .map(|(_, gid, _)| gid)
                .ok_or_else(|| unknown("group", name, "/etc/group"))?;
            (gid, Vec::new())
        }
        None => {
            let gid = entry.as_ref().map_or(0, |e| e.gid);
            let groups = match &entry {
                Some(e) => group_entries(group)
                    .filter(|(_, _, members)| members.split(',').any(|m| m == e.name))
                    .map(|(_, gid, _)| gid)
                    .take(MAX_GROUPS)
                    .collect(),
                None => Vec::new(),
            };
            (gid, groups)
        }
    };
    Ok(Identity {
        uid,
        gid,
        groups,
        name: entry.as_ref().map(|e| e.name.to_owned()),
        home: entry
            .as_ref()
            .map(|e| e.home)
            .filter(|h| !h.is_empty())
            .unwrap_or("/")
            .to_owned(),
    })
}

/// Resolves `user` against `etc/passwd` and `etc/group`; a file that cannot
/// be read lists nobody (so only numbers resolve).
pub(crate) fn resolve_in(user: &ExecUser, etc: &Path) -> Result<Identity, RemoteError> {
    let read = |name: &str| std::fs::read_to_string(etc.join(name)).unwrap_or_default();
    resolve(user, &read("passwd"), &read("group"))
}

impl Identity {
    /// Makes `cmd` run as this identity, and sets `HOME`, `USER` and
    /// `LOGNAME` (call before applying the request's own environment, which
    /// wins). `shown` names the user in errors, as the request gave it.
    ///
    /// An agent that is not root can only run commands as itself: anything
    /// else is refused here with [`SpawnErrorKind::SwitchUser`].
    pub(crate) fn apply(&self, cmd: &mut Command, shown: &str) -> Result<(), RemoteError> {
        cmd.env("HOME", &self.home);
        if let Some(name) = &self.name {
            cmd.env("USER", name);
            cmd.env("LOGNAME", name);
        }
        let euid = rustix::process::geteuid();
        if !euid.is_root() {
            let egid = rustix::process::getegid();
            if self.uid == euid.as_raw() && self.gid == egid.as_raw() {
                // Already who the command is to be; setgroups would need root.
                return Ok(());
            }
            return Err(RemoteError::new(
                RemoteErrorKind::Spawn(SpawnErrorKind::SwitchUser),
                format!(
                    "cannot run as user {shown} ({}:{}): nova-agent runs as uid {}, not root, \
                     and can only run commands as itself",
                    self.uid,
                    self.gid,
                    euid.as_raw()
                ),
            ));
        }
        let groups: Vec<Gid> = self.groups.iter().map(|&g| Gid::from_raw(g)).collect();
        let gid = Gid::from_raw(self.gid);
        let uid = Uid::from_raw(self.uid);
        // SAFETY: the closure runs in the child between fork and exec, where
        // only the forking thread exists. It makes three async-signal-safe
        // system calls on data prepared before the fork (no allocation, no
        // lock). rustix's thread-level calls are the raw system calls, which
        // with one thread change the whole process's credentials.
        unsafe {
            cmd.pre_exec(move || {
                rustix::thread::set_thread_groups(&groups)?;
                rustix::thread::set_thread_gid(gid)?;
                rustix::thread::set_thread_uid(uid)?;
                Ok(())
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
        # a comment\n\
        app:x:1000:1001:App:/home/app:/bin/sh\n\
        nohome:x:1002:1002::::\n\
        broken:x:notanumber:1:::\n";
    const GROUP: &str = "root:x:0:\n\
        appgroup:x:1001:\n\
        staff:x:50:app,other\n\
        audio:x:29:other,app\n\
        video:x:44:other\n";

    fn parse(text: &str) -> ExecUser {
        text.parse().unwrap()
    }

    #[test]
    fn a_name_gets_its_ids_home_and_supplementary_groups() {
        let id = resolve(&parse("app"), PASSWD, GROUP).unwrap();
        assert_eq!(
            id,
            Identity {
                uid: 1000,
                gid: 1001,
                groups: vec![50, 29],
                name: Some("app".into()),
                home: "/home/app".into(),
            }
        );
        // Its uid resolves to the same.
        assert_eq!(resolve(&parse("1000"), PASSWD, GROUP).unwrap(), id);
        let root = resolve(&parse("root"), PASSWD, GROUP).unwrap();
        assert_eq!((root.uid, root.gid, root.home.as_str()), (0, 0, "/root"));
        assert_eq!(resolve(&parse("0"), PASSWD, GROUP).unwrap(), root);
    }

    #[test]
    fn a_group_replaces_the_primary_and_supplementary_groups() {
        let id = resolve(&parse("app:staff"), PASSWD, GROUP).unwrap();
        assert_eq!((id.uid, id.gid), (1000, 50));
        assert!(id.groups.is_empty());
        let id = resolve(&parse("app:7"), PASSWD, GROUP).unwrap();
        assert_eq!((id.uid, id.gid), (1000, 7));
        let id = resolve(&parse("0:video"), PASSWD, GROUP).unwrap();
        assert_eq!((id.uid, id.gid), (0, 44));
    }

    #[test]
    fn an_unlisted_uid_runs_with_group_0_and_home_slash() {
        let id = resolve(&parse("4242"), PASSWD, GROUP).unwrap();
        assert_eq!(
            id,
            Identity {
                uid: 4242,
                gid: 0,
                groups: Vec::new(),
                name: None,
                home: "/".into(),
            }
        );
        let id = resolve(&parse("4242:4243"), "", "").unwrap();
        assert_eq!((id.uid, id.gid), (4242, 4243));
        // An entry without a home gets `/`.
        assert_eq!(resolve(&parse("nohome"), PASSWD, GROUP).unwrap().home, "/");
    }

    #[test]
    fn an_unknown_user_or_group_is_refused_naming_it() {
        for (text, named) in [
            ("nobody-here", "user \"nobody-here\""),
            ("broken", "user \"broken\""),
            ("app:wheel", "group \"wheel\""),
            ("1000:wheel", "group \"wheel\""),
        ] {
            let err = resolve(&parse(text), PASSWD, GROUP).unwrap_err();
            assert_eq!(
                err.kind,
                RemoteErrorKind::Spawn(SpawnErrorKind::UnknownUser),
                "{text}: {err}"
            );
            assert!(err.message.contains(named), "{text}: {err}");
            assert!(err.message.contains("UID[:GID]"), "{text}: {err}");
        }
        // Without readable files only numbers resolve.
        let dir = std::env::temp_dir().join("nova-agent-user-test-no-such-etc");
        assert!(resolve_in(&parse("app"), &dir).is_err());
        assert_eq!(resolve_in(&parse("5"), &dir).unwrap().uid, 5);
    }

    #[test]
    fn home_user_and_logname_come_from_the_entry() {
        let id = resolve(&parse("app"), PASSWD, GROUP).unwrap();
        let mut cmd = Command::new("true");
        let euid = rustix::process::geteuid();
        let applied = id.apply(&mut cmd, "app");
        if euid.is_root() {
            applied.unwrap();
        } else {
            let err = applied.unwrap_err();
            assert_eq!(
                err.kind,
                RemoteErrorKind::Spawn(SpawnErrorKind::SwitchUser),
                "{err}"
            );
            assert!(err.message.contains("user app (1000:1001)"), "{err}");
        }
        let envs: Vec<(String, String)> = cmd
            .get_envs()
            .filter_map(|(k, v)| Some((k.to_str()?.to_owned(), v?.to_str()?.to_owned())))
            .collect();
        for (k, v) in [("HOME", "/home/app"), ("USER", "app"), ("LOGNAME", "app")] {
            assert!(envs.contains(&(k.to_owned(), v.to_owned())), "{envs:?}");
        }
    }
}
