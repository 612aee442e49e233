//! Running Firecracker through its `jailer`.
//!
//! The jailer (shipped with each Firecracker release) sets up a jail and then
//! execs Firecracker inside it: a chroot at
//! `<chroot_base>/<exec-file-name>/<id>/root`, a cgroup with memory and CPU
//! limits, optionally a new PID namespace and a network namespace, and a
//! switch to an unprivileged uid/gid. Firecracker then sees only the chroot,
//! so every file it needs (kernel, rootfs, scratch disk) is placed inside the
//! jail root and named relative to it; its sockets appear there too.
//!
//! This module builds the jailer's command line ([`Jail::command_args`]) and
//! knows the jail's layout; [`crate::process`] runs it.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// Default base directory for jails (the jailer's own default).
pub const DEFAULT_CHROOT_BASE: &str = "/srv/jailer";

/// Which cgroup hierarchy the jailer writes limits to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CgroupVersion {
    /// cgroup v1 (per-controller hierarchies).
    V1,
    /// cgroup v2 (the unified hierarchy; every current distribution).
    #[default]
    V2,
}

/// How sandboxes are jailed. Set
/// `FirecrackerOptions::jailer` to use it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JailerConfig {
    /// The `jailer` binary.
    pub jailer_bin: PathBuf,
    /// User Firecracker runs as inside the jail.
    pub uid: u32,
    /// Group Firecracker runs as inside the jail.
    pub gid: u32,
    /// Where jails are made.
    pub chroot_base: PathBuf,
    /// Which cgroup hierarchy to use.
    pub cgroup_version: CgroupVersion,
    /// Parent cgroup of each sandbox's cgroup (the jailer's default is the
    /// name of the Firecracker binary).
    pub parent_cgroup: Option<String>,
    /// Exec Firecracker in a new PID namespace. The jailer then forks, and
    /// Firecracker's PID is read from the pid file the jailer writes.
    pub new_pid_ns: bool,
    /// Network namespace to join (a path such as `/var/run/netns/NAME`).
    pub netns: Option<PathBuf>,
    /// Host memory the VMM may use beyond guest memory (device buffers,
    /// page tables), in MiB; the cgroup limit is guest memory plus this.
    pub memory_overhead_mib: u64,
    /// Limit CPU time to one host CPU per vCPU.
    pub limit_cpu: bool,
}

/// The environment variable naming the `jailer` binary.
pub const JAILER_BIN_ENV: &str = "NOVA_JAILER_BIN";
/// The uid and gid jailed Firecrackers run as by default (`nobody`).
pub const DEFAULT_JAIL_ID: u32 = 65534;

impl JailerConfig {
    /// The jail used by default, secure by default: when nova runs as root
    /// and a `jailer` is found (`NOVA_JAILER_BIN`, next to `firecracker`, or
    /// on `PATH`), every Firecracker runs jailed as uid/gid 65534. Otherwise
    /// the reason it cannot be, for `nova doctor` and the logs.
    pub fn for_host(firecracker: &Path) -> Result<Self, String> {
        if !rustix::process::geteuid().is_root() {
            return Err(
                "nova does not run as root, and the jailer needs root to chroot, \
                        set cgroup limits and drop privileges; Firecracker runs unjailed as \
                        this user"
                    .into(),
            );
        }
        let beside = firecracker.with_file_name("jailer");
        let found = match std::env::var_os(JAILER_BIN_ENV).filter(|v| !v.is_empty()) {
            Some(path) => Some(PathBuf::from(path)),
            None if beside.is_file() => Some(beside),
            None => nova_runtime::host::find_binary(JAILER_BIN_ENV, "jailer")
                .ok()
                .map(|b| b.path),
        };
        if is_dynamically_linked(firecracker) {
            return Err(format!(
                "{} is dynamically linked, and its loader and libraries are not in the \
                 jailer's chroot; use a static (musl) release build to run jailed",
                firecracker.display()
            ));
        }
        let cgroup_version = host_cgroup_version(Path::new("/sys/fs/cgroup"))?;
        match found {
            Some(jailer) => Ok(Self {
                cgroup_version,
                ..Self::new(jailer, DEFAULT_JAIL_ID, DEFAULT_JAIL_ID)
            }),
            None => Err(format!(
                "no `jailer` binary found (set {JAILER_BIN_ENV}, or install it next to \
                 firecracker); Firecracker runs unjailed as root"
            )),
        }
    }

    /// A config with the jailer's defaults: `/srv/jailer`, cgroup v2, a new
    /// PID namespace, 128 MiB of memory overhead, CPU limited to the vCPUs.
    pub fn new(jailer_bin: impl Into<PathBuf>, uid: u32, gid: u32) -> Self {
        Self {
            jailer_bin: jailer_bin.into(),
            uid,
            gid,
            chroot_base: DEFAULT_CHROOT_BASE.into(),
            cgroup_version: CgroupVersion::V2,
            parent_cgroup: None,
            new_pid_ns: true,
            netns: None,
            memory_overhead_mib: 128,
            limit_cpu: true,
        }
    }
}

/// Which cgroup hierarchy under `root` offers the memory and CPU
/// controllers the jail's limits need: v2 when the unified hierarchy lists
/// them, else v1 when it has them mounted per controller; an error naming
/// what is missing otherwise.
pub fn host_cgroup_version(root: &Path) -> Result<CgroupVersion, String> {
    let v2 = std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
    let has = |c: &str| v2.split_whitespace().any(|w| w == c);
    if has("memory") && has("cpu") {
        return Ok(CgroupVersion::V2);
    }
    if root.join("memory").is_dir() && root.join("cpu").exists() {
        return Ok(CgroupVersion::V1);
    }
    Err(format!(
        "neither cgroup v2 ({}/cgroup.controllers) nor v1 offers the memory and cpu \
         controllers the jail's limits need",
        root.display()
    ))
}

/// Whether the ELF executable at `path` asks for a program interpreter
/// (a dynamic loader): its program headers include `PT_INTERP`. Unreadable
/// or non-ELF files count as static (the jailer then reports its own error).
pub fn is_dynamically_linked(path: &Path) -> bool {
    use std::io::Read;
    const PT_INTERP: u32 = 3;
    let mut head = Vec::new();
    let read = std::fs::File::open(path).and_then(|f| f.take(64 * 1024).read_to_end(&mut head));
    if read.is_err() || head.len() < 64 || &head[..4] != b"\x7fELF" || head[4] != 2 {
        return false;
    }
    let le = head[5] == 1;
    let u16_at = |o: usize| {
        let b = [head[o], head[o + 1]];
        if le {
            u16::from_le_bytes(b)
        } else {
            u16::from_be_bytes(b)
        }
    };
    let u64_at = |o: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&head[o..o + 8]);
        if le {
            u64::from_le_bytes(b)
        } else {
            u64::from_be_bytes(b)
        }
    };
    let (phoff, phentsize, phnum) = (
        u64_at(0x20),
        usize::from(u16_at(0x36)),
        usize::from(u16_at(0x38)),
    );
    let Ok(phoff) = usize::try_from(phoff) else {
        return false;
    };
    (0..phnum).any(|i| {
        let at = phoff + i * phentsize;
        head.get(at..at + 4).is_some_and(|t| {
            let b = [t[0], t[1], t[2], t[3]];
            let p_type = if le {
                u32::from_le_bytes(b)
            } else {
                u32::from_be_bytes(b)
            };
            p_type == PT_INTERP
        })
    })
}

/// What the cgroup limits are computed from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JailLimits {
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// vCPUs.
    pub vcpus: u8,
}

/// A jail id or path the jailer would refuse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JailError {
    /// The jailer accepts ids of 1 to 64 ASCII letters, digits and `-`.
    #[error("invalid jail id {0:?}: use 1 to 64 ASCII letters, digits or `-`")]
    InvalidId(String),
    /// The Firecracker path has no file name.
    #[error("the Firecracker path {0:?} has no file name")]
    NoExecFileName(PathBuf),
}

/// CFS period used for the CPU limit, in microseconds.
const CPU_PERIOD_US: u64 = 100_000;

/// One sandbox's jail.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Jail {
    config: JailerConfig,
    id: String,
    firecracker: PathBuf,
    exec_file_name: OsString,
}

impl Jail {
    /// The jail of sandbox `id`, running the Firecracker binary
    /// `firecracker`.
    pub fn new(config: JailerConfig, id: &str, firecracker: &Path) -> Result<Self, JailError> {
        if id.is_empty()
            || id.len() > 64
            || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(JailError::InvalidId(id.to_owned()));
        }
        let exec_file_name = firecracker
            .file_name()
            .ok_or_else(|| JailError::NoExecFileName(firecracker.to_owned()))?
            .to_owned();
        Ok(Self {
            config,
            id: id.to_owned(),
            firecracker: firecracker.to_owned(),
            exec_file_name,
        })
    }

    /// The config.
    pub fn config(&self) -> &JailerConfig {
        &self.config
    }

    /// The directory the jailer makes for this sandbox
    /// (`<chroot_base>/<exec-file-name>/<id>`); removing it removes the jail.
    pub fn jail_dir(&self) -> PathBuf {
        self.config
            .chroot_base
            .join(&self.exec_file_name)
            .join(&self.id)
    }

    /// The chroot: Firecracker's `/` and working directory.
    pub fn root(&self) -> PathBuf {
        self.jail_dir().join("root")
    }

    /// The file the jailer writes Firecracker's PID to (with a new PID
    /// namespace), as seen from the host.
    pub fn pid_file(&self) -> PathBuf {
        let mut name = self.exec_file_name.clone();
        name.push(".pid");
        self.root().join(name)
    }

    /// The jailer's arguments (without the program name): the jail, then
    /// `--` and Firecracker's own arguments.
    pub fn command_args(&self, limits: JailLimits, firecracker_args: &[OsString]) -> Vec<OsString> {
        let c = &self.config;
        let mut args: Vec<OsString> = Vec::new();
        let mut push = |a: OsString| args.push(a);
        push("--id".into());
        push(self.id.clone().into());
        push("--exec-file".into());
        push(self.firecracker.clone().into());
        push("--uid".into());
        push(c.uid.to_string().into());
        push("--gid".into());
        push(c.gid.to_string().into());
        push("--chroot-base-dir".into());
        push(c.chroot_base.clone().into());
        push("--cgroup-version".into());
        push(
            match c.cgroup_version {
                CgroupVersion::V1 => "1",
                CgroupVersion::V2 => "2",
            }
            .into(),
        );
        if let Some(parent) = &c.parent_cgroup {
            push("--parent-cgroup".into());
            push(parent.into());
        }
        let memory_bytes = (u64::from(limits.memory_mib) + c.memory_overhead_mib) * 1024 * 1024;
        let quota_us = u64::from(limits.vcpus.max(1)) * CPU_PERIOD_US;
        let mut cgroups = Vec::new();
        match c.cgroup_version {
            CgroupVersion::V2 => {
                cgroups.push(format!("memory.max={memory_bytes}"));
                if c.limit_cpu {
                    cgroups.push(format!("cpu.max={quota_us} {CPU_PERIOD_US}"));
                }
            }
            CgroupVersion::V1 => {
                cgroups.push(format!("memory.limit_in_bytes={memory_bytes}"));
                if c.limit_cpu {
                    cgroups.push(format!("cpu.cfs_period_us={CPU_PERIOD_US}"));
                    cgroups.push(format!("cpu.cfs_quota_us={quota_us}"));
                }
            }
        }
        for cgroup in cgroups {
            push("--cgroup".into());
            push(cgroup.into());
        }
        if let Some(netns) = &c.netns {
            push("--netns".into());
            push(netns.clone().into());
        }
        if c.new_pid_ns {
            push("--new-pid-ns".into());
        }
        push("--".into());
        args.extend(firecracker_args.iter().cloned());
        args
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: &[OsString]) -> Vec<String> {
        args.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn v2_command_line_with_limits_and_pid_namespace() {
        let config = JailerConfig::new("/usr/bin/jailer", 1234, 1235);
        let jail = Jail::new(config, "sb-abc", Path::new("/opt/fc/firecracker")).unwrap();
        let args = jail.command_args(
            JailLimits {
                memory_mib: 512,
                vcpus: 2,
            },
            &["--api-sock".into(), "api.sock".into()],
        );
        assert_eq!(
            strings(&args),
            [
                "--id",
                "sb-abc",
                "--exec-file",
                "/opt/fc/firecracker",
                "--uid",
                "1234",
                "--gid",
                "1235",
                "--chroot-base-dir",
                "/srv/jailer",
                "--cgroup-version",
                "2",
                "--cgroup",
                "memory.max=671088640",
                "--cgroup",
                "cpu.max=200000 100000",
                "--new-pid-ns",
                "--",
                "--api-sock",
                "api.sock",
            ]
        );
        assert_eq!(
            jail.root(),
            Path::new("/srv/jailer/firecracker/sb-abc/root")
        );
        assert_eq!(
            jail.pid_file(),
            Path::new("/srv/jailer/firecracker/sb-abc/root/firecracker.pid")
        );
    }

    #[test]
    fn v1_command_line_with_parent_cgroup_and_netns() {
        let mut config = JailerConfig::new("/usr/bin/jailer", 0, 0);
        config.cgroup_version = CgroupVersion::V1;
        config.parent_cgroup = Some("nova".into());
        config.netns = Some("/var/run/netns/sb".into());
        config.new_pid_ns = false;
        config.memory_overhead_mib = 0;
        config.chroot_base = "/jails".into();
        let jail = Jail::new(config, "x1", Path::new("fc")).unwrap();
        let args = strings(&jail.command_args(
            JailLimits {
                memory_mib: 128,
                vcpus: 1,
            },
            &[],
        ));
        let tail: Vec<&str> = args[10..].iter().map(String::as_str).collect();
        assert_eq!(
            tail,
            [
                "--cgroup-version",
                "1",
                "--parent-cgroup",
                "nova",
                "--cgroup",
                "memory.limit_in_bytes=134217728",
                "--cgroup",
                "cpu.cfs_period_us=100000",
                "--cgroup",
                "cpu.cfs_quota_us=100000",
                "--netns",
                "/var/run/netns/sb",
                "--",
            ]
        );
        assert_eq!(jail.root(), Path::new("/jails/fc/x1/root"));
    }

    #[test]
    fn refuses_ids_the_jailer_would_refuse() {
        let config = JailerConfig::new("/j", 1, 1);
        for bad in ["", "a/b", "a_b", "é", &"a".repeat(65)] {
            assert_eq!(
                Jail::new(config.clone(), bad, Path::new("/fc")),
                Err(JailError::InvalidId(bad.to_owned()))
            );
        }
        assert!(matches!(
            Jail::new(config, "ok", Path::new("/")),
            Err(JailError::NoExecFileName(_))
        ));
    }

    #[test]
    fn cpu_limit_can_be_left_off() {
        let mut config = JailerConfig::new("/j", 1, 1);
        config.limit_cpu = false;
        let jail = Jail::new(config, "a", Path::new("/fc")).unwrap();
        let args = strings(&jail.command_args(
            JailLimits {
                memory_mib: 1,
                vcpus: 4,
            },
            &[],
        ));
        assert!(!args.iter().any(|a| a.starts_with("cpu.")), "{args:?}");
        assert!(args.iter().any(|a| a.starts_with("memory.max=")));
    }

    #[test]
    fn the_default_jail_checks_the_binary_and_the_cgroup_hierarchy() {
        // This test binary itself is dynamically linked (glibc).
        let me = std::env::current_exe().unwrap();
        assert!(is_dynamically_linked(&me));
        assert!(!is_dynamically_linked(Path::new("/nonexistent")));
        let dir = tempfile::tempdir().unwrap();
        assert!(host_cgroup_version(dir.path()).is_err());
        std::fs::write(
            dir.path().join("cgroup.controllers"),
            "cpuset cpu io memory pids\n",
        )
        .unwrap();
        assert_eq!(host_cgroup_version(dir.path()), Ok(CgroupVersion::V2));
        let v1 = tempfile::tempdir().unwrap();
        std::fs::write(v1.path().join("cgroup.controllers"), "hugetlb\n").unwrap();
        std::fs::create_dir(v1.path().join("memory")).unwrap();
        std::fs::create_dir(v1.path().join("cpu")).unwrap();
        assert_eq!(host_cgroup_version(v1.path()), Ok(CgroupVersion::V1));
    }
}
