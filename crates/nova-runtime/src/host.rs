//! What this host can run, and which backend to choose.
//!
//! [`HostReport::probe`] looks at `/dev/kvm`, the CPU's virtualization flags,
//! the loaded KVM modules and the VMM binaries; [`HostReport::choose_backend`]
//! turns that into a [`BackendChoice`] with the reason, in the order DESIGN.md
//! gives: Firecracker (binary found and hardware KVM usable), QEMU with KVM,
//! QEMU with TCG (software emulation, development and CI only).
//!
//! A `/dev/kvm` without `vmx`/`svm` in the CPU flags is a paravirtualized KVM
//! (PVM, `kvm_pvm` module): it runs only guest kernels built for PVM, and a
//! standard kernel does not boot on it at usable speed. That case is detected
//! here and treated as "no hardware KVM", so no backend hangs on it.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Serialize;

/// Environment variable naming the Firecracker binary.
pub const FIRECRACKER_BIN_ENV: &str = "NOVA_FIRECRACKER_BIN";
/// Environment variable naming the QEMU binary.
pub const QEMU_BIN_ENV: &str = "NOVA_QEMU_BIN";
/// Default QEMU binary name.
pub const QEMU_BIN: &str = "qemu-system-x86_64";
/// Default Firecracker binary name.
pub const FIRECRACKER_BIN: &str = "firecracker";

/// The state of KVM on this host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum KvmStatus {
    /// `/dev/kvm` does not exist.
    Missing,
    /// `/dev/kvm` exists but this user cannot open it.
    NoAccess {
        /// The OS error.
        reason: String,
    },
    /// Usable KVM backed by hardware virtualization (VT-x or AMD-V).
    Hardware,
    /// Usable KVM without hardware virtualization: a paravirtualized KVM
    /// (PVM) that boots only PVM guest kernels.
    Paravirtualized {
        /// Whether the `kvm_pvm` module is loaded (else it was inferred from
        /// the missing CPU flags).
        pvm_module: bool,
    },
}

impl KvmStatus {
    /// Classifies KVM from what was observed.
    pub fn classify(
        dev_exists: bool,
        open: Result<(), std::io::Error>,
        cpu_has_virt: bool,
        pvm_module: bool,
    ) -> Self {
        if !dev_exists {
            return Self::Missing;
        }
        if let Err(e) = open {
            return Self::NoAccess {
                reason: e.to_string(),
            };
        }
        if cpu_has_virt && !pvm_module {
            Self::Hardware
        } else {
            Self::Paravirtualized { pvm_module }
        }
    }

    /// Looks at `/dev/kvm`, the CPU flags and the loaded KVM modules.
    pub fn probe() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let dev = Path::new("/dev/kvm");
        let open = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(dev)
            .map(drop);
        Self::classify(
            dev.exists(),
            open,
            cpu_has_virt_flags(&cpuinfo),
            Path::new("/sys/module/kvm_pvm").exists(),
        )
    }

    /// Whether standard guest kernels boot at hardware speed.
    pub fn is_hardware(&self) -> bool {
        *self == Self::Hardware
    }
}

impl fmt::Display for KvmStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Missing => f.write_str(
                "no /dev/kvm: hardware virtualization is off or the kvm module is not loaded",
            ),
            Self::NoAccess { reason } => write!(
                f,
                "/dev/kvm exists but cannot be opened ({reason}): run as root or join the `kvm` group"
            ),
            Self::Hardware => f.write_str("usable, backed by hardware virtualization"),
            Self::Paravirtualized { pvm_module: true } => f.write_str(
                "usable but paravirtualized (kvm_pvm, no vmx/svm): only PVM guest kernels run; a \
                 standard kernel does not boot at usable speed",
            ),
            Self::Paravirtualized { pvm_module: false } => f.write_str(
                "usable but the CPU shows no vmx/svm: not hardware-backed; a standard kernel does \
                 not boot at usable speed",
            ),
        }
    }
}

/// A VMM binary that was found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BinaryInfo {
    /// Where it is.
    pub path: PathBuf,
    /// The first line of its `--version` output, if it ran.
    pub version: Option<String>,
}

/// Where a binary was looked for and not found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NotFound {
    /// Every place that was tried, in order.
    pub searched: Vec<String>,
}

/// What this host can do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HostReport {
    /// KVM.
    pub kvm: KvmStatus,
    /// Whether the CPU flags show `vmx` or `svm`.
    pub cpu_virt_flags: bool,
    /// The Firecracker binary.
    pub firecracker: Result<BinaryInfo, NotFound>,
    /// The QEMU binary.
    pub qemu: Result<BinaryInfo, NotFound>,
}

/// How QEMU runs guest code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Accel {
    /// Hardware virtualization through KVM.
    Kvm,
    /// Software emulation (TCG): boots take seconds.
    Tcg,
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Kvm => "kvm",
            Self::Tcg => "tcg",
        })
    }
}

/// The backend `detect()` picks, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "backend", rename_all = "snake_case")]
pub enum BackendChoice {
    /// Firecracker with hardware KVM.
    Firecracker {
        /// The binary.
        binary: PathBuf,
    },
    /// QEMU's microvm machine.
    Qemu {
        /// The binary.
        binary: PathBuf,
        /// KVM or TCG.
        accel: Accel,
    },
}

/// No backend can run on this host.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("no backend can run on this host: {reasons}", reasons = reasons.join("; "))]
pub struct NoBackend {
    /// Why each backend was ruled out, and what to do.
    pub reasons: Vec<String>,
}

impl HostReport {
    /// Looks at this host.
    pub fn probe() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_virt_flags = cpu_has_virt_flags(&cpuinfo);
        let dev = Path::new("/dev/kvm");
        let open = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(dev)
            .map(drop);
        let pvm_module = Path::new("/sys/module/kvm_pvm").exists();
        Self {
            kvm: KvmStatus::classify(dev.exists(), open, cpu_virt_flags, pvm_module),
            cpu_virt_flags,
            firecracker: find_binary(FIRECRACKER_BIN_ENV, FIRECRACKER_BIN),
            qemu: find_binary(QEMU_BIN_ENV, QEMU_BIN),
        }
    }

    /// How QEMU runs guests here: KVM when it is backed by hardware
    /// virtualization, else TCG (software emulation). The one place this is
    /// decided.
    pub fn qemu_accel(&self) -> Accel {
        if self.kvm.is_hardware() {
            Accel::Kvm
        } else {
            Accel::Tcg
        }
    }

    /// Picks the backend and says why, or why none can run.
    pub fn choose_backend(&self) -> Result<(BackendChoice, String), NoBackend> {
        let hw = self.qemu_accel() == Accel::Kvm;
        if let (Ok(fc), true) = (&self.firecracker, hw) {
            return Ok((
                BackendChoice::Firecracker {
                    binary: fc.path.clone(),
                },
                "Firecracker found and KVM is hardware-backed".to_owned(),
            ));
        }
        let mut reasons = Vec::new();
        match &self.firecracker {
            Ok(_) => reasons.push(format!("Firecracker found, but KVM is {}", self.kvm)),
            Err(nf) => reasons.push(format!(
                "Firecracker not found (looked in {}); set {FIRECRACKER_BIN_ENV} or put \
                 `firecracker` on PATH",
                nf.searched.join(", ")
            )),
        }
        match &self.qemu {
            Ok(q) if hw => Ok((
                BackendChoice::Qemu {
                    binary: q.path.clone(),
                    accel: Accel::Kvm,
                },
                format!("{}; using QEMU with KVM", reasons.join("; ")),
            )),
            Ok(q) => Ok((
                BackendChoice::Qemu {
                    binary: q.path.clone(),
                    accel: Accel::Tcg,
                },
                format!(
                    "{}; KVM: {}; using QEMU with TCG (software emulation: boots take seconds, \
                     for development and CI only)",
                    reasons.join("; "),
                    self.kvm
                ),
            )),
            Err(nf) => {
                reasons.push(format!(
                    "QEMU not found (looked in {}); install it with `apt-get install \
                     qemu-system-x86` or set {QEMU_BIN_ENV}",
                    nf.searched.join(", ")
                ));
                Err(NoBackend { reasons })
            }
        }
    }
}

/// Whether `/proc/cpuinfo` text shows hardware virtualization flags.
pub fn cpu_has_virt_flags(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .flat_map(|l| l.split_once(':').map(|(_, f)| f).into_iter())
        .any(|flags| {
            flags
                .split_ascii_whitespace()
                .any(|f| f == "vmx" || f == "svm")
        })
}

/// Finds a binary: the path in `env_var` if set, else `name` on `PATH`.
pub fn find_binary(env_var: &str, name: &str) -> Result<BinaryInfo, NotFound> {
    let mut searched = Vec::new();
    if let Some(path) = std::env::var_os(env_var).filter(|v| !v.is_empty()) {
        let path = PathBuf::from(path);
        if is_executable(&path) {
            return Ok(BinaryInfo {
                version: binary_version(&path),
                path,
            });
        }
        searched.push(format!("{env_var}={}", path.display()));
        return Err(NotFound { searched });
    }
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path_var) {
        let candidate = dir.join(name);
        if is_executable(&candidate) {
            return Ok(BinaryInfo {
                version: binary_version(&candidate),
                path: candidate,
            });
        }
    }
    searched.push(format!("$PATH for `{name}`"));
    Err(NotFound { searched })
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// First non-empty line of `binary --version`, if it runs and succeeds.
pub fn binary_version(binary: &Path) -> Option<String> {
    let out = Command::new(binary).arg("--version").output().ok()?;
    if !out.status.success() {
        return None;
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bin(p: &str) -> Result<BinaryInfo, NotFound> {
        Ok(BinaryInfo {
            path: p.into(),
            version: Some("v1".into()),
        })
    }

    fn missing() -> Result<BinaryInfo, NotFound> {
        Err(NotFound {
            searched: vec!["$PATH".into()],
        })
    }

    #[test]
    fn cpu_flags() {
        assert!(cpu_has_virt_flags("processor: 0\nflags\t\t: fpu vmx sse\n"));
        assert!(cpu_has_virt_flags("flags: fpu svm\n"));
        assert!(!cpu_has_virt_flags(
            "flags\t: fpu vmmcall hypervisor svm_lock\n"
        ));
        assert!(!cpu_has_virt_flags("model name: svm\n"));
    }

    #[test]
    fn kvm_classification() {
        let denied = || Err(std::io::Error::from(std::io::ErrorKind::PermissionDenied));
        assert_eq!(
            KvmStatus::classify(false, Ok(()), true, false),
            KvmStatus::Missing
        );
        assert!(matches!(
            KvmStatus::classify(true, denied(), true, false),
            KvmStatus::NoAccess { .. }
        ));
        assert!(
            KvmStatus::classify(true, denied(), true, false)
                .to_string()
                .contains("kvm` group")
        );
        assert_eq!(
            KvmStatus::classify(true, Ok(()), true, false),
            KvmStatus::Hardware
        );
        assert_eq!(
            KvmStatus::classify(true, Ok(()), false, true),
            KvmStatus::Paravirtualized { pvm_module: true }
        );
        assert_eq!(
            KvmStatus::classify(true, Ok(()), false, false),
            KvmStatus::Paravirtualized { pvm_module: false }
        );
        assert_eq!(
            KvmStatus::classify(true, Ok(()), true, true),
            KvmStatus::Paravirtualized { pvm_module: true }
        );
    }

    fn report(
        kvm: KvmStatus,
        fc: Result<BinaryInfo, NotFound>,
        qemu: Result<BinaryInfo, NotFound>,
    ) -> HostReport {
        HostReport {
            cpu_virt_flags: kvm == KvmStatus::Hardware,
            kvm,
            firecracker: fc,
            qemu,
        }
    }

    #[test]
    fn firecracker_first_with_hardware_kvm() {
        let r = report(KvmStatus::Hardware, bin("/fc"), bin("/q"));
        let (choice, _) = r.choose_backend().unwrap();
        assert_eq!(
            choice,
            BackendChoice::Firecracker {
                binary: "/fc".into()
            }
        );
    }

    #[test]
    fn qemu_kvm_without_firecracker() {
        let r = report(KvmStatus::Hardware, missing(), bin("/q"));
        let (choice, why) = r.choose_backend().unwrap();
        assert_eq!(
            choice,
            BackendChoice::Qemu {
                binary: "/q".into(),
                accel: Accel::Kvm
            }
        );
        assert!(why.contains("Firecracker not found"), "{why}");
    }

    #[test]
    fn paravirtualized_kvm_falls_back_to_tcg_even_with_firecracker() {
        let r = report(
            KvmStatus::Paravirtualized { pvm_module: true },
            bin("/fc"),
            bin("/q"),
        );
        let (choice, why) = r.choose_backend().unwrap();
        assert_eq!(
            choice,
            BackendChoice::Qemu {
                binary: "/q".into(),
                accel: Accel::Tcg
            }
        );
        assert!(why.contains("paravirtualized"), "{why}");
        assert!(why.contains("TCG"), "{why}");
    }

    #[test]
    fn no_backend_says_what_to_install() {
        let r = report(KvmStatus::Missing, missing(), missing());
        let e = r.choose_backend().unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("apt-get install qemu-system-x86"), "{msg}");
        assert!(msg.contains(FIRECRACKER_BIN_ENV), "{msg}");
    }

    #[test]
    fn find_binary_honours_env_and_path() {
        // `sh` exists on every host this runs on; a bogus env path is reported.
        let sh = find_binary("NOVA_TEST_UNSET_VARIABLE_XYZ", "sh").unwrap();
        assert!(sh.path.ends_with("sh"));
        let none = find_binary("NOVA_TEST_UNSET_VARIABLE_XYZ", "no-such-binary-nova").unwrap_err();
        assert!(none.searched[0].contains("no-such-binary-nova"));
    }

    /// This machine's `/dev/kvm` is paravirtualized (PVM); the probe must say
    /// so rather than claim hardware KVM. Elsewhere the check is that the
    /// classification agrees with the CPU flags.
    #[test]
    fn probe_matches_this_host() {
        let r = HostReport::probe();
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        if Path::new("/sys/module/kvm_pvm").exists() && Path::new("/dev/kvm").exists() {
            assert!(
                matches!(
                    r.kvm,
                    KvmStatus::Paravirtualized { pvm_module: true } | KvmStatus::NoAccess { .. }
                ),
                "{:?}",
                r.kvm
            );
        }
        if r.kvm == KvmStatus::Hardware {
            assert!(cpu_has_virt_flags(&cpuinfo));
        }
    }
}

/// Resource usage of a host process, read from `/proc/<pid>`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcessUsage {
    /// Resident set size in bytes.
    pub rss_bytes: u64,
    /// User CPU time in microseconds.
    pub cpu_user_us: u64,
    /// System CPU time in microseconds.
    pub cpu_system_us: u64,
}

/// Reads a process's resident memory and CPU time from `/proc/<pid>`.
pub fn process_usage(pid: u32) -> std::io::Result<ProcessUsage> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    parse_process_usage(&stat, &status, rustix::param::clock_ticks_per_second()).ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, "unexpected /proc format")
    })
}

/// Parses `/proc/<pid>/stat` and `/proc/<pid>/status` text.
fn parse_process_usage(stat: &str, status: &str, ticks_per_second: u64) -> Option<ProcessUsage> {
    // The command name (field 2) may contain spaces and parentheses; fields
    // after the last ')' are space-separated: state is field 3, utime 14,
    // stime 15.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_ascii_whitespace().collect();
    let ticks = |i: usize| fields.get(i)?.parse::<u64>().ok();
    let to_us = |t: u64| t.saturating_mul(1_000_000) / ticks_per_second.max(1);
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_ascii_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0);
    Some(ProcessUsage {
        rss_bytes: rss_kib * 1024,
        cpu_user_us: to_us(ticks(11)?),
        cpu_system_us: to_us(ticks(12)?),
    })
}

#[cfg(test)]
mod usage_tests {
    use super::*;

    #[test]
    fn parses_proc_stat_with_odd_command_names() {
        let stat = "1234 (qemu (x) y) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0";
        let status = "Name:\tqemu\nVmRSS:\t  20480 kB\n";
        let u = parse_process_usage(stat, status, 100).unwrap();
        assert_eq!(
            u,
            ProcessUsage {
                rss_bytes: 20480 * 1024,
                cpu_user_us: 2_500_000,
                cpu_system_us: 500_000
            }
        );
        assert_eq!(parse_process_usage("garbage", "", 100), None);
    }

    #[test]
    fn reads_this_process() {
        let u = process_usage(std::process::id()).unwrap();
        assert!(u.rss_bytes > 0);
        assert!(process_usage(u32::MAX).is_err());
    }
}

/// The host CPU's clock in kHz, from `/proc/cpuinfo` (x86 hosts), if known.
///
/// Emulated (TCG) guests get it as `tsc_early_khz=`: on a loaded host the
/// guest kernel can fail to calibrate its TSC against the emulated PIT and,
/// with no HPET or ACPI PM timer on a microVM, stall at boot.
pub fn host_cpu_khz() -> Option<u64> {
    parse_cpu_khz(&std::fs::read_to_string("/proc/cpuinfo").ok()?)
}

/// The first `cpu MHz` line of `/proc/cpuinfo` text, in kHz.
pub fn parse_cpu_khz(cpuinfo: &str) -> Option<u64> {
    let line = cpuinfo.lines().find(|l| l.starts_with("cpu MHz"))?;
    let mhz: f64 = line.split(':').nth(1)?.trim().parse().ok()?;
    (mhz > 0.0).then(|| (mhz * 1000.0).round() as u64)
}

#[cfg(test)]
mod khz_tests {
    use super::*;

    #[test]
    fn cpu_khz_comes_from_cpuinfo() {
        assert_eq!(
            parse_cpu_khz("processor\t: 0\ncpu MHz\t\t: 2596.150\n"),
            Some(2_596_150)
        );
        assert_eq!(parse_cpu_khz("processor : 0\n"), None);
        assert_eq!(parse_cpu_khz("cpu MHz : 0\n"), None);
    }
}
