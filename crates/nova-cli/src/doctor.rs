//! `nova doctor`: what this host can do, in plain words.
//!
//! Probes KVM, the CPU's virtualization flags, the VMM binaries, the data
//! directory and the installed templates, then says which backend
//! `detect()` would pick and why. Exits non-zero when no backend can run.

use std::fmt::Write as _;
use std::path::Path;
use std::process::ExitCode;

use novasandbox::core::{NovaHome, TemplateManager};
#[cfg(target_os = "linux")]
use novasandbox::providers::qemu_confinement::{self, Confinement};
#[cfg(target_os = "linux")]
use novasandbox::runtime::host::{HostReport, KvmStatus};

/// Arguments of `nova doctor`.
#[derive(Debug, clap::Args)]
pub(crate) struct DoctorArgs {
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// Runs `nova doctor`.
#[cfg(target_os = "linux")]
pub(crate) fn run(args: &DoctorArgs) -> anyhow::Result<ExitCode> {
    let report = HostReport::probe();
    let home = NovaHome::resolve();
    let choice = report.choose_backend();
    // How QEMU would be confined, and whether this QEMU can filter at all.
    let confinement = report.qemu.as_ref().ok().map(|q| {
        (
            Confinement::for_host(),
            qemu_confinement::seccomp_supported(&q.path),
        )
    });
    // Whether sandboxes can have a network here: the namespace network
    // (root, /dev/net/tun, nft), the user-mode one (passt), and which one a
    // QEMU sandbox would get.
    let net = novasandbox::runtime::network::host_network_report();
    // The sandboxes' DNS servers (NOVA_DNS_SERVERS, else the host's).
    let dns = novasandbox::runtime::network::dns_servers();
    if args.json {
        let value = serde_json::json!({
            "host": report,
            "sandbox_network": net.to_json(),
            "dns_servers": match &dns {
                Ok(servers) => serde_json::json!(servers),
                Err(why) => serde_json::json!({"error": why}),
            },
            "nova_home": home.as_ref().map(|h| h.root().display().to_string()).ok(),
            "backend": choice.as_ref().ok().map(|(c, why)| serde_json::json!({"choice": c, "reason": why})),
            "no_backend": choice.as_ref().err().map(|e| e.reasons.clone()),
            "qemu_confinement": confinement.as_ref().map(|(c, seccomp)| serde_json::json!({
                "protections": c.protections().iter().map(|p| serde_json::json!({
                    "name": p.name, "applies": p.applies, "detail": p.detail,
                })).collect::<Vec<_>>(),
                "seccomp_supported": seccomp.as_ref().err(),
            })),
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        let mut out = String::new();
        render(&mut out, &report, home.as_ref().ok());
        if let Some((c, seccomp)) = &confinement {
            render_confinement(&mut out, c, seccomp.as_ref().err().map(String::as_str));
        }
        net.render(&mut out);
        let _ = match &dns {
            Ok(servers) if servers.is_empty() => writeln!(
                out,
                "[warn] DNS servers: none (the host's resolvers are loopback only); set \
                 NOVA_DNS_SERVERS"
            ),
            Ok(servers) => writeln!(
                out,
                "[ ok ] DNS servers for sandboxes: {}",
                servers
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Err(why) => writeln!(out, "[fail] DNS servers: {why}"),
        };
        if let Err(e) = &home {
            let _ = writeln!(out, "[fail] data directory: {e}");
        }
        print!("{out}");
    }
    Ok(if choice.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn mark(ok: bool) -> &'static str {
    if ok { "[ ok ]" } else { "[fail]" }
}

/// Runs `nova doctor` on macOS, where Apple's Virtualization.framework is
/// the one backend: the CPU, the signed VZ helper, the data directory and
/// the templates.
#[cfg(target_os = "macos")]
pub(crate) fn run(args: &DoctorArgs) -> anyhow::Result<ExitCode> {
    let home = NovaHome::resolve();
    let helper = novasandbox::providers::vz_helper_path();
    let apple_silicon = cfg!(target_arch = "aarch64");
    let helper_ok = helper.is_file();
    if args.json {
        let value = serde_json::json!({
            "backend": "apple-vz",
            "apple_silicon": apple_silicon,
            "vz_helper": {"path": helper.display().to_string(), "present": helper_ok},
            "nova_home": home.as_ref().map(|h| h.root().display().to_string()).ok(),
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{} cpu: {}",
            mark(apple_silicon),
            if apple_silicon {
                "Apple Silicon"
            } else {
                "Intel: the VZ backend boots arm64 guests and needs Apple Silicon"
            }
        );
        let _ = writeln!(
            out,
            "{} VZ helper: {}{}",
            mark(helper_ok),
            helper.display(),
            if helper_ok {
                " (it must be signed with the virtualization entitlement: make sign-macos)"
            } else {
                " missing; build it with `cargo build -p nova-vz` and sign it (make sign-macos)"
            }
        );
        match &home {
            Ok(home) => {
                let writable = check_writable(home.root());
                let _ = writeln!(
                    out,
                    "{} NOVA_HOME: {}",
                    mark(writable.is_ok()),
                    home.root().display()
                );
                render_templates(&mut out, &TemplateManager::new(home.templates_dir()));
            }
            Err(e) => {
                let _ = writeln!(out, "[fail] data directory: {e}");
            }
        }
        let _ = writeln!(
            out,
            "[warn] sandbox network: VZ's NAT only (no published ports or egress rules)"
        );
        print!("{out}");
    }
    Ok(if apple_silicon && helper_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Writes the human-readable report.
#[cfg(target_os = "linux")]
fn render(out: &mut String, report: &HostReport, home: Option<&NovaHome>) {
    let kvm_ok = matches!(report.kvm, KvmStatus::Hardware);
    let kvm_mark = match report.kvm {
        KvmStatus::Hardware => "[ ok ]",
        KvmStatus::Paravirtualized { .. } => "[warn]",
        _ => "[fail]",
    };
    let _ = writeln!(out, "{kvm_mark} /dev/kvm: {}", report.kvm);
    let _ = writeln!(
        out,
        "{} hardware virtualization: {}",
        if report.cpu_virt_flags {
            "[ ok ]"
        } else {
            "[warn]"
        },
        if report.cpu_virt_flags {
            "vmx/svm present"
        } else {
            "no vmx/svm in the CPU flags"
        }
    );
    match &report.firecracker {
        Ok(b) => {
            let usable = if kvm_ok {
                ""
            } else {
                " (needs hardware KVM, which this host lacks)"
            };
            let _ = writeln!(
                out,
                "{} firecracker: {} ({}){usable}",
                if kvm_ok { "[ ok ]" } else { "[warn]" },
                b.path.display(),
                b.version.as_deref().unwrap_or("version unknown")
            );
            let _ = match novasandbox::providers::JailerConfig::for_host(&b.path) {
                Ok(jail) => writeln!(
                    out,
                    "[ ok ] firecracker jail: runs through {} as uid {}",
                    jail.jailer_bin.display(),
                    jail.uid
                ),
                Err(reason) => writeln!(out, "[warn] firecracker jail: not used: {reason}"),
            };
        }
        Err(nf) => {
            let _ = writeln!(
                out,
                "[warn] firecracker: not found (looked in {})",
                nf.searched.join(", ")
            );
        }
    }
    match &report.qemu {
        Ok(b) => {
            let _ = writeln!(
                out,
                "[ ok ] qemu: {} ({})",
                b.path.display(),
                b.version.as_deref().unwrap_or("version unknown")
            );
        }
        Err(nf) => {
            let _ = writeln!(
                out,
                "[fail] qemu: not found (looked in {}); install with `apt-get install qemu-system-x86`",
                nf.searched.join(", ")
            );
        }
    }
    if let Some(home) = home {
        let writable = check_writable(home.root());
        let _ = writeln!(
            out,
            "{} NOVA_HOME: {} ({})",
            mark(writable.is_ok()),
            home.root().display(),
            match &writable {
                Ok(()) => "writable".to_owned(),
                Err(e) => format!("not writable: {e}; set NOVA_HOME to a writable directory"),
            }
        );
        render_templates(out, &TemplateManager::new(home.templates_dir()));
    }
    match report.choose_backend() {
        Ok((choice, why)) => {
            let _ = writeln!(out, "[ ok ] backend: {}", describe(&choice));
            let _ = writeln!(out, "       why: {why}");
        }
        Err(e) => {
            let _ = writeln!(out, "[fail] backend: none can run");
            for reason in e.reasons {
                let _ = writeln!(out, "       - {reason}");
            }
        }
    }
}

/// One line per QEMU protection: whether it applies, and why not.
/// `unsupported` is why this QEMU cannot filter, when it cannot.
#[cfg(target_os = "linux")]
fn render_confinement(out: &mut String, confinement: &Confinement, unsupported: Option<&str>) {
    for p in confinement.protections() {
        let (mark, detail) = match (p.name, unsupported) {
            ("seccomp filter", Some(why)) if p.applies => ("[fail]", why.to_owned()),
            _ if p.applies => ("[ ok ]", p.detail.clone()),
            _ if p.detail.starts_with("not needed") => ("[ ok ]", p.detail.clone()),
            _ => ("[warn]", p.detail.clone()),
        };
        let _ = writeln!(out, "{mark} qemu {}: {detail}", p.name);
    }
}

fn render_templates(out: &mut String, manager: &TemplateManager) {
    match manager.list() {
        Ok(list) if list.is_empty() => {
            let _ = writeln!(
                out,
                "[warn] templates: none in {}; build one with `nova template build python` or `make images`",
                manager.dir().display()
            );
        }
        Ok(list) => {
            for t in list {
                match t {
                    Ok(t) => {
                        let _ = writeln!(out, "[ ok ] template {}: {}", t.id(), t.manifest.name);
                    }
                    Err(e) => {
                        let _ = writeln!(out, "[fail] template: {e}");
                    }
                }
            }
        }
        Err(e) => {
            let _ = writeln!(out, "[fail] templates: {e}");
        }
    }
}

#[cfg(target_os = "linux")]
fn describe(choice: &novasandbox::runtime::host::BackendChoice) -> String {
    use novasandbox::runtime::host::BackendChoice;
    match choice {
        BackendChoice::Firecracker { binary } => format!("firecracker ({})", binary.display()),
        BackendChoice::Qemu { binary, accel } => {
            format!("qemu microvm, accel {accel} ({})", binary.display())
        }
    }
}

/// Creates `dir` if needed and writes and removes a probe file in it.
fn check_writable(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let probe = dir.join(format!(".doctor-probe-{}", std::process::id()));
    std::fs::write(&probe, b"")?;
    std::fs::remove_file(probe)
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use novasandbox::runtime::host::{BinaryInfo, NotFound};

    use super::*;

    #[test]
    fn paravirtualized_kvm_is_reported_with_tcg_fallback() {
        let report = HostReport {
            kvm: KvmStatus::Paravirtualized { pvm_module: true },
            cpu_virt_flags: false,
            firecracker: Err(NotFound {
                searched: vec!["$PATH for `firecracker`".into()],
            }),
            qemu: Ok(BinaryInfo {
                path: "/usr/bin/qemu-system-x86_64".into(),
                version: Some("QEMU 7.2".into()),
            }),
        };
        let home_dir = tempfile::tempdir().unwrap();
        let home = NovaHome::at(home_dir.path());
        let mut out = String::new();
        render(&mut out, &report, Some(&home));
        assert!(
            out.contains("[warn] /dev/kvm: usable but paravirtualized"),
            "{out}"
        );
        assert!(out.contains("no vmx/svm"), "{out}");
        assert!(
            out.contains("[ ok ] qemu: /usr/bin/qemu-system-x86_64 (QEMU 7.2)"),
            "{out}"
        );
        assert!(out.contains("writable"), "{out}");
        assert!(out.contains("templates: none"), "{out}");
        assert!(out.contains("backend: qemu microvm, accel tcg"), "{out}");
    }

    #[test]
    fn qemu_confinement_says_what_applies_and_why_not() {
        use novasandbox::providers::qemu_confinement::{ConfinementPolicy, HostFacts};
        let root = HostFacts {
            is_root: true,
            passwd: Some("nobody:x:65534:65534::/:/bin/false\n".into()),
        };
        let mut out = String::new();
        render_confinement(
            &mut out,
            &Confinement::decide(&ConfinementPolicy::default(), &root),
            None,
        );
        assert!(
            out.contains(
                "[ ok ] qemu privilege drop: QEMU opens its files as root, then runs as a uid \
                 and gid of its own per sandbox"
            ),
            "{out}"
        );
        assert!(
            out.contains("[ ok ] qemu seccomp filter: -sandbox on,"),
            "{out}"
        );

        let mut out = String::new();
        let missing = ConfinementPolicy::from_values(None, Some("ghost"));
        render_confinement(
            &mut out,
            &Confinement::decide(&missing, &root),
            Some("no seccomp here"),
        );
        assert!(
            out.contains("[warn] qemu privilege drop: user ghost does not exist"),
            "{out}"
        );
        assert!(
            out.contains("[fail] qemu seccomp filter: no seccomp here"),
            "{out}"
        );
    }

    #[test]
    fn no_backend_is_a_failure() {
        let report = HostReport {
            kvm: KvmStatus::Missing,
            cpu_virt_flags: false,
            firecracker: Err(NotFound {
                searched: vec!["x".into()],
            }),
            qemu: Err(NotFound {
                searched: vec!["y".into()],
            }),
        };
        let mut out = String::new();
        render(&mut out, &report, None);
        assert!(out.contains("[fail] backend: none can run"), "{out}");
        assert!(out.contains("apt-get install qemu-system-x86"), "{out}");
    }
}
