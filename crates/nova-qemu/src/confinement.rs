//! How QEMU is confined: a seccomp filter (`-sandbox`) and, when nova runs
//! as root, a privilege drop to an unprivileged user (`-runas`).
//!
//! Secure by default: both apply unless the host makes one impossible or
//! the operator turns it off, and [`Confinement::protections`] says for
//! each whether it applies and why not (`nova doctor` prints it).
//!
//! **Seccomp.** QEMU's `-sandbox on` installs a filter that kills QEMU on
//! syscalls a VMM never needs (`mount`, `kexec_load`, `reboot`, …), plus the
//! groups we deny as libvirt does by default: `obsolete` (old syscalls),
//! `spawn` (`fork`/`execve`: no helper scripts, so a tap device must be set
//! up with `script=no` or passed as a file descriptor, and migration must go
//! to an `fd:`, never to `exec:`), `resourcecontrol` (scheduler and CPU
//! affinity changes) and `elevateprivileges` (`set*uid`/`set*gid`).
//!
//! **Privilege drop.** As root, QEMU is started with `-runas USER`: it opens
//! everything on its command line first (kernel, disks, `/dev/kvm`, the
//! console log, the QMP and agent sockets, which it creates and listens on),
//! then calls `setgid`, `initgroups` and `setuid` and runs the guest as
//! `USER`. The kernel marks a process that changed its uid as not dumpable,
//! so QEMUs that share `USER` still cannot trace or read one another. QEMU
//! opens nothing by path after the drop while a sandbox runs; anything added
//! later (a migration file, a hot-plugged disk) must be passed to it as a
//! file descriptor over QMP (`getfd`, `add-fd`), not named by path.
//!
//! The two interact: QEMU 7.2 installs its filter *before* it drops
//! privileges, so with `elevateprivileges=deny` its own `setgid` kills it.
//! With a privilege drop the filter therefore allows those calls: once QEMU
//! is no longer root they cannot raise its privileges again (it has no
//! capabilities and `spawn=deny` forbids executing a set-uid program).

use std::ffi::OsString;
use std::path::Path;
use std::sync::OnceLock;

/// The environment variable that turns the seccomp filter off (`off`) or on.
pub const SECCOMP_ENV: &str = "NOVA_QEMU_SECCOMP";
/// The environment variable naming the user QEMU runs as when nova is root:
/// a user name, `UID:GID`, or `off` to keep root.
pub const RUNAS_ENV: &str = "NOVA_QEMU_RUNAS";
/// The user QEMU runs as when nova is root and nothing else is configured.
pub const DEFAULT_RUNAS_USER: &str = "nobody";

/// The seccomp groups denied when QEMU also drops privileges.
const SECCOMP_WITH_RUNAS: &str =
    "on,obsolete=deny,elevateprivileges=allow,spawn=deny,resourcecontrol=deny";
/// The seccomp groups denied when QEMU keeps nova's user.
const SECCOMP_ALONE: &str =
    "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// What the operator asks for. The default is the most protection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfinementPolicy {
    /// Whether QEMU runs under its seccomp filter.
    pub seccomp: bool,
    /// The user QEMU drops to when nova runs as root; `None` keeps root.
    pub run_as: Option<RunAs>,
    /// Settings that were not understood and so left at their default.
    pub ignored: Vec<String>,
}

impl Default for ConfinementPolicy {
    fn default() -> Self {
        Self {
            seccomp: true,
            run_as: Some(RunAs::PerSandbox),
            ignored: Vec::new(),
        }
    }
}

impl ConfinementPolicy {
    /// The policy from [`SECCOMP_ENV`] and [`RUNAS_ENV`], each defaulting to
    /// the most protection.
    pub fn from_env() -> Self {
        Self::from_values(
            std::env::var(SECCOMP_ENV).ok().as_deref(),
            std::env::var(RUNAS_ENV).ok().as_deref(),
        )
    }

    /// The policy from the two settings' values (`None`: unset).
    pub fn from_values(seccomp: Option<&str>, run_as: Option<&str>) -> Self {
        let mut policy = Self::default();
        match seccomp.map(str::trim).filter(|v| !v.is_empty()) {
            None => {}
            Some(v) if is_off(v) => policy.seccomp = false,
            Some(v) if is_on(v) => policy.seccomp = true,
            Some(v) => policy
                .ignored
                .push(format!("{SECCOMP_ENV}={v:?} (expected on or off)")),
        }
        match run_as.map(str::trim).filter(|v| !v.is_empty()) {
            None => {}
            Some(v) if is_off(v) => policy.run_as = None,
            Some(v) => policy.run_as = Some(RunAs::parse(v)),
        }
        policy
    }
}

fn is_off(v: &str) -> bool {
    ["off", "0", "false", "no"].contains(&v.to_ascii_lowercase().as_str())
}

fn is_on(v: &str) -> bool {
    ["on", "1", "true", "yes"].contains(&v.to_ascii_lowercase().as_str())
}

/// Whom QEMU runs as after dropping root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunAs {
    /// A user name, looked up in `/etc/passwd`; QEMU also takes on the
    /// user's supplementary groups.
    User(String),
    /// Numeric ids, for a user that has no `/etc/passwd` entry.
    Ids {
        /// User id.
        uid: u32,
        /// Group id.
        gid: u32,
    },
    /// A uid and gid of its own for each sandbox (from
    /// [`PER_SANDBOX_IDS`]), which owns that sandbox's writable disk: no
    /// sandbox's QEMU can open, trace or signal another's. The default.
    PerSandbox,
}

/// The range per-sandbox uids and gids are drawn from: high, unnamed ids
/// that no account on the host uses.
pub const PER_SANDBOX_IDS: std::ops::Range<u32> = 3_000_000_000..3_016_777_216;

impl RunAs {
    /// `UID:GID` when both are numbers, `per-sandbox`, else a user name.
    pub fn parse(value: &str) -> Self {
        if value == "per-sandbox" {
            return Self::PerSandbox;
        }
        if let Some((uid, gid)) = value.split_once(':')
            && let (Ok(uid), Ok(gid)) = (uid.parse(), gid.parse())
        {
            return Self::Ids { uid, gid };
        }
        Self::User(value.to_owned())
    }

    /// The value of QEMU's `-runas` option.
    fn qemu_value(&self) -> String {
        match self {
            Self::User(name) => name.clone(),
            Self::Ids { uid, gid } => format!("{uid}:{gid}"),
            Self::PerSandbox => "per-sandbox".into(),
        }
    }
}

impl std::fmt::Display for RunAs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::User(name) => f.write_str(name),
            Self::Ids { uid, gid } => write!(f, "uid {uid}, gid {gid}"),
            Self::PerSandbox => write!(
                f,
                "a uid and gid of its own per sandbox ({}..{})",
                PER_SANDBOX_IDS.start, PER_SANDBOX_IDS.end
            ),
        }
    }
}

/// What the host looks like to the decision.
#[derive(Clone, Debug)]
pub struct HostFacts {
    /// Whether nova runs as root (effective uid 0).
    pub is_root: bool,
    /// `/etc/passwd`'s text, to look user names up in; `None` if unreadable.
    pub passwd: Option<String>,
}

impl HostFacts {
    /// This process's facts. Reads `/etc/passwd` (blocking, small).
    pub fn probe() -> Self {
        Self {
            is_root: rustix::process::geteuid().is_root(),
            passwd: std::fs::read_to_string("/etc/passwd").ok(),
        }
    }

    /// The uid of `name` in `/etc/passwd`.
    fn uid_of(&self, name: &str) -> Option<u32> {
        self.passwd.as_deref()?.lines().find_map(|line| {
            let mut fields = line.split(':');
            (fields.next()? == name).then_some(())?;
            fields.nth(1)?.parse().ok()
        })
    }
}

/// One protection and whether it applies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Protection {
    /// What it is, e.g. `seccomp filter`.
    pub name: &'static str,
    /// Whether QEMU runs with it.
    pub applies: bool,
    /// What it does when it applies; why it cannot (and what to do) when not.
    pub detail: String,
}

/// The confinement QEMU runs under, decided once from a
/// [`ConfinementPolicy`] and [`HostFacts`]; part of every sandbox's
/// [`VmSpec`](crate::cmdline::VmSpec).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Confinement {
    /// The `-sandbox` option's value; `None` without a filter.
    seccomp: Option<&'static str>,
    /// The `-runas` option's value; `None` to keep nova's user (or to run
    /// each sandbox as its own, with `per_sandbox`).
    run_as: Option<String>,
    /// Drop to a uid and gid of each sandbox's own (given per VM).
    per_sandbox: bool,
    protections: Vec<Protection>,
}

impl Confinement {
    /// Decides what applies. Pure: the tests feed it made-up hosts.
    pub fn decide(policy: &ConfinementPolicy, host: &HostFacts) -> Self {
        let mut protections = Vec::new();
        let run_as = match (&policy.run_as, host.is_root) {
            (_, false) => {
                protections.push(Protection {
                    name: "privilege drop",
                    applies: false,
                    detail: "not needed: nova does not run as root, so QEMU runs as nova's \
                             own unprivileged user"
                        .into(),
                });
                None
            }
            (None, true) => {
                protections.push(Protection {
                    name: "privilege drop",
                    applies: false,
                    detail: format!(
                        "turned off ({RUNAS_ENV}=off): QEMU runs as root; set {RUNAS_ENV} to a \
                         user (default {DEFAULT_RUNAS_USER}) to drop privileges"
                    ),
                });
                None
            }
            (Some(RunAs::PerSandbox), true) => {
                protections.push(Protection {
                    name: "privilege drop",
                    applies: true,
                    detail: format!(
                        "QEMU opens its files as root, then runs as {} (-runas)",
                        RunAs::PerSandbox
                    ),
                });
                None
            }
            (Some(user), true) => match resolve(user, host) {
                Ok(()) => {
                    protections.push(Protection {
                        name: "privilege drop",
                        applies: true,
                        detail: format!(
                            "QEMU opens its files as root, then runs as {user} (-runas)"
                        ),
                    });
                    Some(user.qemu_value())
                }
                Err(why) => {
                    protections.push(Protection {
                        name: "privilege drop",
                        applies: false,
                        detail: format!(
                            "{why}: QEMU runs as root; set {RUNAS_ENV} to an existing \
                             unprivileged user or UID:GID"
                        ),
                    });
                    None
                }
            },
        };
        let per_sandbox = host.is_root && policy.run_as == Some(RunAs::PerSandbox);
        let seccomp = if policy.seccomp {
            let options = if run_as.is_some() || per_sandbox {
                SECCOMP_WITH_RUNAS
            } else {
                SECCOMP_ALONE
            };
            let mut detail = format!("-sandbox {options}");
            if run_as.is_some() || per_sandbox {
                detail.push_str(
                    " (set*id calls stay allowed: QEMU 7.2 filters before it drops privileges, \
                     and once it has they cannot raise them)",
                );
            }
            protections.push(Protection {
                name: "seccomp filter",
                applies: true,
                detail,
            });
            Some(options)
        } else {
            protections.push(Protection {
                name: "seccomp filter",
                applies: false,
                detail: format!(
                    "turned off ({SECCOMP_ENV}=off); unset it to run QEMU under -sandbox"
                ),
            });
            None
        };
        for ignored in &policy.ignored {
            protections.push(Protection {
                name: "setting ignored",
                applies: false,
                detail: ignored.clone(),
            });
        }
        Self {
            seccomp,
            run_as,
            per_sandbox,
            protections,
        }
    }

    /// The confinement for this process: [`ConfinementPolicy::from_env`] on
    /// [`HostFacts::probe`], decided on first use and kept, so later calls
    /// do no I/O (safe on async paths). A protection that cannot apply is
    /// logged once, as a warning.
    pub fn for_host() -> Self {
        static HOST: OnceLock<Confinement> = OnceLock::new();
        HOST.get_or_init(|| {
            let confinement = Self::decide(&ConfinementPolicy::from_env(), &HostFacts::probe());
            for p in confinement.protections().iter().filter(|p| !p.applies) {
                if p.detail.starts_with("not needed") {
                    continue;
                }
                tracing::warn!(protection = p.name, "QEMU confinement: {}", p.detail);
            }
            confinement
        })
        .clone()
    }

    /// No confinement at all: for tests and for comparing against a bare
    /// QEMU. Never the default.
    pub fn none() -> Self {
        Self {
            seccomp: None,
            run_as: None,
            per_sandbox: false,
            protections: Vec::new(),
        }
    }

    /// Each protection, whether it applies and why (or why not).
    pub fn protections(&self) -> &[Protection] {
        &self.protections
    }

    /// The user QEMU drops to, if it does (`-runas`'s value).
    pub fn run_as(&self) -> Option<&str> {
        self.run_as.as_deref()
    }

    /// Whether each sandbox's QEMU drops to a uid and gid of its own, which
    /// the launcher then gives to [`qemu_args`](Self::qemu_args).
    pub fn per_sandbox(&self) -> bool {
        self.per_sandbox
    }

    /// Whether QEMU runs under its seccomp filter.
    pub fn has_seccomp(&self) -> bool {
        self.seccomp.is_some()
    }

    /// QEMU's arguments for this confinement; `ids` is the sandbox's own
    /// uid and gid when [`per_sandbox`](Self::per_sandbox) (ignored
    /// otherwise).
    pub fn qemu_args(&self, ids: Option<(u32, u32)>) -> Vec<OsString> {
        let mut args = Vec::new();
        if let Some(options) = self.seccomp {
            args.push("-sandbox".into());
            args.push(options.into());
        }
        let user = match (&self.run_as, ids) {
            (Some(user), _) => Some(user.clone()),
            (None, Some((uid, gid))) if self.per_sandbox => Some(format!("{uid}:{gid}")),
            _ => None,
        };
        if let Some(user) = user {
            args.push("-runas".into());
            args.push(user.into());
        }
        args
    }
}

/// Checks that `user` exists and is not root.
fn resolve(user: &RunAs, host: &HostFacts) -> Result<(), String> {
    let uid = match user {
        RunAs::Ids { uid, .. } => *uid,
        RunAs::PerSandbox => return Ok(()),
        RunAs::User(name) => match host.uid_of(name) {
            Some(uid) => uid,
            None if host.passwd.is_none() => {
                return Err(format!("cannot read /etc/passwd to look up user {name}"));
            }
            None => return Err(format!("user {name} does not exist in /etc/passwd")),
        },
    };
    if uid == 0 {
        return Err(format!("{user} is root, so running as it drops nothing"));
    }
    Ok(())
}

/// Whether the QEMU at `qemu_bin` was built with seccomp support: runs
/// `QEMU -sandbox on -version`, which fails at once when it was not. For
/// `nova doctor`; a sandbox's boot reports the same failure in its VMM log.
pub fn seccomp_supported(qemu_bin: &Path) -> Result<(), String> {
    let output = std::process::Command::new(qemu_bin)
        .args(["-sandbox", "on", "-version"])
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", qemu_bin.display()))?;
    if output.status.success() {
        Ok(())
    } else {
        let stderr = String::from_utf8_lossy(&output.stderr);
        Err(format!(
            "{} has no seccomp support ({}); install a QEMU built with libseccomp, or set \
             {SECCOMP_ENV}=off",
            qemu_bin.display(),
            stderr.trim()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\n\
                          nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n\
                          toor:x:0:0::/:/bin/sh\n";

    fn root() -> HostFacts {
        HostFacts {
            is_root: true,
            passwd: Some(PASSWD.into()),
        }
    }

    fn args(c: &Confinement) -> Vec<String> {
        c.qemu_args(Some((3_000_000_007, 3_000_000_007)))
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect()
    }

    fn protection<'a>(c: &'a Confinement, name: &str) -> &'a Protection {
        c.protections()
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no {name} in {:?}", c.protections()))
    }

    #[test]
    fn as_root_by_default_qemu_is_filtered_and_runs_as_its_own_user() {
        let c = Confinement::decide(&ConfinementPolicy::default(), &root());
        assert_eq!(
            args(&c),
            [
                "-sandbox",
                "on,obsolete=deny,elevateprivileges=allow,spawn=deny,resourcecontrol=deny",
                "-runas",
                "3000000007:3000000007"
            ]
        );
        assert!(protection(&c, "privilege drop").applies);
        assert!(protection(&c, "seccomp filter").applies);
        assert!(c.per_sandbox());
        assert_eq!(c.run_as(), None);
        // A named user is still honoured.
        let policy = ConfinementPolicy::from_values(None, Some("nobody"));
        let c = Confinement::decide(&policy, &root());
        assert_eq!(c.run_as(), Some("nobody"));
        assert!(!c.per_sandbox());
        assert_eq!(args(&c)[3], "nobody");
    }

    #[test]
    fn without_root_the_filter_also_denies_set_id_calls() {
        let host = HostFacts {
            is_root: false,
            passwd: Some(PASSWD.into()),
        };
        let c = Confinement::decide(&ConfinementPolicy::default(), &host);
        assert_eq!(
            args(&c),
            [
                "-sandbox",
                "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
            ]
        );
        let drop = protection(&c, "privilege drop");
        assert!(!drop.applies);
        assert!(drop.detail.contains("does not run as root"), "{drop:?}");
    }

    #[test]
    fn a_missing_or_root_user_is_explained_and_not_used() {
        let policy = ConfinementPolicy::from_values(None, Some("qemu-sandbox"));
        let c = Confinement::decide(&policy, &root());
        assert_eq!(c.run_as(), None);
        let drop = protection(&c, "privilege drop");
        assert!(!drop.applies);
        assert!(
            drop.detail.contains("user qemu-sandbox does not exist")
                && drop.detail.contains(RUNAS_ENV),
            "{drop:?}"
        );
        // Without a drop the filter denies set*id calls too.
        assert!(args(&c)[1].contains("elevateprivileges=deny"));

        let c = Confinement::decide(&ConfinementPolicy::from_values(None, Some("toor")), &root());
        assert_eq!(c.run_as(), None);
        assert!(protection(&c, "privilege drop").detail.contains("is root"));

        let unreadable = HostFacts {
            is_root: true,
            passwd: None,
        };
        let policy = ConfinementPolicy::from_values(None, Some("nobody"));
        let c = Confinement::decide(&policy, &unreadable);
        assert!(
            protection(&c, "privilege drop")
                .detail
                .contains("cannot read /etc/passwd")
        );
    }

    #[test]
    fn numeric_ids_need_no_passwd_entry() {
        let policy = ConfinementPolicy::from_values(None, Some("4000:4000"));
        assert_eq!(
            policy.run_as,
            Some(RunAs::Ids {
                uid: 4000,
                gid: 4000
            })
        );
        let c = Confinement::decide(&policy, &root());
        assert_eq!(c.run_as(), Some("4000:4000"));
        assert!(protection(&c, "privilege drop").detail.contains("uid 4000"));
    }

    #[test]
    fn operators_can_turn_each_off_and_are_told_so() {
        let policy = ConfinementPolicy::from_values(Some("off"), Some("off"));
        let c = Confinement::decide(&policy, &root());
        assert!(args(&c).is_empty());
        for p in c.protections() {
            assert!(!p.applies);
            assert!(p.detail.contains("turned off"), "{p:?}");
        }
    }

    #[test]
    fn an_unknown_setting_keeps_the_protection_and_is_reported() {
        let policy = ConfinementPolicy::from_values(Some("maybe"), None);
        assert!(policy.seccomp);
        let c = Confinement::decide(&policy, &root());
        assert!(c.has_seccomp());
        assert!(
            protection(&c, "setting ignored")
                .detail
                .contains("NOVA_QEMU_SECCOMP=\"maybe\"")
        );
    }
}
