//! NovaSandbox: microVM sandboxes for AI agents.
//!
//! This is the crate users import. [`core`] holds the backend-independent
//! API (configs, the [`core::Hypervisor`] trait, the [`core::Sandbox`]
//! handle, templates); [`providers`] holds the backends; [`detect`] picks the
//! best backend this host can run.
//!
//! ```no_run
//! use novasandbox::core::SandboxConfig;
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let hypervisor = novasandbox::detect()?;
//! let config = SandboxConfig::builder().template_id("python").memory_mb(1024).build()?;
//! let sandbox = hypervisor.create_sandbox(config).await?;
//! let out = sandbox.execute_command("python3 -c 'print(6 * 7)'").await?;
//! assert_eq!(out.stdout_lossy(), "42\n");
//! println!("booted in {} ms", sandbox.boot_time_ms());
//! sandbox.stop(false).await?;
//! # Ok(()) }
//! ```

#![forbid(unsafe_code)]

use std::sync::Arc;

use nova_core::home::NovaHome;
use nova_core::hypervisor::Hypervisor;
use nova_runtime::host::NoBackend;
#[cfg(target_os = "linux")]
use nova_runtime::host::{BackendChoice, HostReport};

/// The backend-independent API: everything in `nova-core`.
pub mod core {
    pub use nova_core::*;
}

/// The host runtime the backends share: host probing ([`runtime::host`]),
/// the provider, the VMM process type.
pub mod runtime {
    pub use nova_runtime::*;
}

/// The backends: Firecracker and QEMU on Linux, Apple's
/// Virtualization.framework on macOS.
pub mod providers {
    #[cfg(target_os = "linux")]
    pub use nova_firecracker::jailer::JailerConfig;
    #[cfg(target_os = "linux")]
    pub use nova_firecracker::{
        FirecrackerHypervisor, FirecrackerOptions, FirecrackerSandboxes, FirecrackerUnavailable,
    };
    #[cfg(target_os = "linux")]
    pub use nova_qemu::baseline::raw_boot;
    #[cfg(target_os = "linux")]
    pub use nova_qemu::confinement as qemu_confinement;
    #[cfg(target_os = "linux")]
    pub use nova_qemu::{QemuHypervisor, QemuOptions};
    #[cfg(target_os = "macos")]
    pub use nova_vz::backend::helper_path as vz_helper_path;
    #[cfg(target_os = "macos")]
    pub use nova_vz::{Vz, VzHypervisor, VzOptions, VzUnavailable};
}

/// No backend could be set up on this host.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DetectError {
    /// No VMM can run here.
    #[error(transparent)]
    NoBackend(#[from] NoBackend),
    /// No data directory could be chosen.
    #[error(transparent)]
    Home(#[from] nova_core::home::HomeError),
    /// The sandboxes of a previous daemon could not be looked for.
    #[error("cannot re-attach the sandboxes of a previous daemon")]
    Reattach(#[source] Box<nova_runtime::reattach::ReattachError>),
}

/// Picks the best backend this host can run, in DESIGN.md's order:
/// Firecracker with hardware KVM, QEMU with KVM, QEMU with TCG (which logs a
/// warning: boots take seconds). Sandboxes live under `$NOVA_HOME`.
///
/// A Firecracker binary outside the supported version range is skipped with
/// a warning (QEMU with KVM is used instead, if installed). On macOS the
/// backend is Apple's Virtualization.framework.
pub fn detect() -> Result<Arc<dyn Hypervisor>, DetectError> {
    let home = NovaHome::resolve()?;
    detect_in(home)
}

/// [`detect`] with an explicit data directory.
pub fn detect_in(home: NovaHome) -> Result<Arc<dyn Hypervisor>, DetectError> {
    Ok(match choose(home)? {
        #[cfg(target_os = "linux")]
        Chosen::Firecracker(options) => Arc::new(providers::FirecrackerHypervisor::new(options)),
        #[cfg(target_os = "linux")]
        Chosen::Qemu(options) => Arc::new(providers::QemuHypervisor::new(options)),
        #[cfg(target_os = "macos")]
        Chosen::Vz(options) => Arc::new(providers::VzHypervisor::new(options)),
    })
}

/// What a daemon runs on: the provider [`detect_in`] would pick, made so its
/// VMs outlive the daemon where the backend allows it, and what it took
/// over from a previous daemon.
#[derive(Debug)]
pub struct DaemonProvider {
    /// The provider.
    pub hypervisor: Arc<dyn Hypervisor>,
    /// The live sandboxes of a previous daemon it re-attached, and those it
    /// could not (reported failed with the reason); `None` where the
    /// backend cannot leave its VMs running (every backend [`detect_in`]
    /// picks can now: Firecracker and QEMU).
    pub reattached: Option<nova_runtime::reattach::ReattachReport>,
}

/// [`detect_in`] for a daemon (`nova serve`): a detached provider (its VMs
/// keep running when the daemon dies), Firecracker or QEMU, that has
/// re-attached every live sandbox a previous daemon left.
pub async fn detect_for_daemon(home: NovaHome) -> Result<DaemonProvider, DetectError> {
    Ok(match choose(home)? {
        #[cfg(target_os = "linux")]
        Chosen::Firecracker(options) => {
            reattached(providers::FirecrackerHypervisor::detached(options)).await?
        }
        #[cfg(target_os = "linux")]
        Chosen::Qemu(options) => reattached(providers::QemuHypervisor::detached(options)).await?,
        #[cfg(target_os = "macos")]
        Chosen::Vz(options) => reattached(providers::VzHypervisor::detached(options)).await?,
    })
}

/// `provider`, a detached one, once it re-attached what a previous daemon
/// left.
async fn reattached<B: nova_runtime::backend::Backend>(
    provider: nova_runtime::Provider<B>,
) -> Result<DaemonProvider, DetectError> {
    let report = provider
        .reattach()
        .await
        .map_err(|e| DetectError::Reattach(Box::new(e)))?;
    Ok(DaemonProvider {
        hypervisor: Arc::new(provider),
        reattached: Some(report),
    })
}

/// The backend [`choose`] picked, with its options.
enum Chosen {
    #[cfg(target_os = "linux")]
    Firecracker(providers::FirecrackerOptions),
    #[cfg(target_os = "linux")]
    Qemu(providers::QemuOptions),
    #[cfg(target_os = "macos")]
    Vz(providers::VzOptions),
}

/// On macOS the one backend is Apple's Virtualization.framework; whether
/// this Mac can run it (Apple Silicon, the signed helper) is checked when a
/// sandbox is created, with what to do.
#[cfg(target_os = "macos")]
fn choose(home: NovaHome) -> Result<Chosen, DetectError> {
    Ok(Chosen::Vz(providers::VzOptions::new(home)))
}

#[cfg(not(any(target_os = "linux", target_os = "macos")))]
fn choose(home: NovaHome) -> Result<Chosen, DetectError> {
    let _ = home;
    Err(NoBackend {
        reasons: vec![
            "NovaSandbox runs on Linux (Firecracker, QEMU) and macOS (Apple VZ)".to_owned(),
        ],
    }
    .into())
}

#[cfg(target_os = "linux")]
fn choose(home: NovaHome) -> Result<Chosen, DetectError> {
    let report = HostReport::probe();
    let (choice, why) = report.choose_backend()?;
    tracing::debug!(?choice, %why, "backend chosen");
    let choice = match choice {
        BackendChoice::Firecracker { binary } => {
            // The probe already ran `firecracker --version`; check its answer.
            let version_line = report
                .firecracker
                .as_ref()
                .ok()
                .and_then(|found| found.version.as_deref());
            match nova_firecracker::binary::FirecrackerBinary::from_version_line(
                binary,
                version_line,
            ) {
                Ok(firecracker) => {
                    let options = providers::FirecrackerOptions::new(home, firecracker);
                    return Ok(Chosen::Firecracker(options));
                }
                Err(e) => match &report.qemu {
                    Ok(qemu) => {
                        tracing::warn!(error = %e, "cannot use Firecracker; using QEMU with KVM");
                        BackendChoice::Qemu {
                            binary: qemu.path.clone(),
                            accel: nova_runtime::host::Accel::Kvm,
                        }
                    }
                    Err(_) => {
                        return Err(NoBackend {
                            reasons: vec![
                                e.to_string(),
                                "QEMU is not installed either; install it with `apt-get \
                                 install qemu-system-x86`"
                                    .to_owned(),
                            ],
                        }
                        .into());
                    }
                },
            }
        }
        qemu => qemu,
    };
    if let BackendChoice::Qemu {
        accel: nova_runtime::host::Accel::Tcg,
        ..
    } = choice
    {
        tracing::warn!(
            "no hardware KVM: guests run under QEMU's emulation (TCG); boots take seconds"
        );
    }
    let options = providers::QemuOptions::from_choice(home, &choice)
        .expect("the choice was narrowed to QEMU above");
    Ok(Chosen::Qemu(options))
}
