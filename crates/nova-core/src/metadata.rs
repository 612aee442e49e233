//! What is known about a sandbox: [`SandboxInfo`], persisted as the
//! sandbox directory's `state.json`, and the boot-time breakdown.

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::config::SandboxConfig;
use crate::hypervisor::HypervisorKind;
use crate::id::SandboxId;
use crate::state::SandboxState;

/// How long a sandbox took to become ready, measured on the host.
///
/// `boot_time_ms` runs from "VMM process spawned" to "agent answered ready":
/// the whole wait a user sees. The phases split it; they add up to it, up to
/// rounding.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BootTimings {
    /// Total: VMM spawn to agent ready, in milliseconds.
    pub boot_time_ms: f64,
    /// Host-side preparation before the VMM was spawned (sandbox directory,
    /// scratch disk); not part of `boot_time_ms`.
    #[serde(default)]
    pub prepare_ms: f64,
    /// VMM spawn until its control socket (API or QMP) answered.
    pub spawn_ms: f64,
    /// Configuring the VMM until the guest was started (zero for VMMs that
    /// take their whole configuration on the command line).
    pub configure_ms: f64,
    /// Guest start until the agent answered ready: kernel boot plus agent
    /// start-up.
    pub guest_ms: f64,
    /// The guest's own view: time from kernel start to the agent's start, as
    /// the agent reported it (from the guest's boot clock), if it did.
    pub guest_kernel_ms: Option<f64>,
    /// Restored from a snapshot rather than cold-booted.
    #[serde(default)]
    pub from_snapshot: bool,
}

impl BootTimings {
    /// Milliseconds in `d`, with microsecond precision.
    pub fn ms(d: Duration) -> f64 {
        (d.as_micros() as f64) / 1000.0
    }
}

/// Everything the host knows about one sandbox.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SandboxInfo {
    /// Its id.
    pub id: SandboxId,
    /// Which backend runs it.
    pub hypervisor: HypervisorKind,
    /// Its lifecycle state when this was taken.
    pub state: SandboxState,
    /// The config it was created with (validated).
    pub config: SandboxConfig,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_at_ms: u64,
    /// How long it took to boot; `None` until it is ready.
    pub boot: Option<BootTimings>,
    /// PID of its VMM process, while it has one.
    pub vmm_pid: Option<u32>,
    /// Its directory under `$NOVA_HOME/sandboxes`.
    pub dir: PathBuf,
    /// Version string the guest agent reported, once ready.
    pub agent_version: Option<String>,
    /// Guest kernel release the agent reported, once ready.
    pub kernel_release: Option<String>,
    /// Why the sandbox is `failed`, when it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    /// Whether the sandbox is paused to disk
    /// ([`Hypervisor::pause_sandbox_to_disk`](crate::Hypervisor::pause_sandbox_to_disk)):
    /// its memory, VM state and disk are saved under its directory and no
    /// VMM runs for it (`vmm_pid` is `None`) until it is resumed. Only
    /// ever true while `state` is `paused`.
    #[serde(default)]
    pub persisted: bool,
}

impl SandboxInfo {
    /// Boot time in whole milliseconds (0 before the sandbox is ready), the
    /// figure the seed API calls `boot_time_ms`.
    pub fn boot_time_ms(&self) -> u64 {
        self.boot
            .as_ref()
            .map_or(0, |b| b.boot_time_ms.round() as u64)
    }

    /// Milliseconds since creation, by the wall clock.
    pub fn age_ms(&self) -> u64 {
        now_ms().saturating_sub(self.created_at_ms)
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_json_and_rounds_boot_time() {
        let info = SandboxInfo {
            id: SandboxId::random(),
            hypervisor: HypervisorKind::Qemu,
            state: SandboxState::Running,
            config: SandboxConfig::default(),
            created_at_ms: now_ms(),
            boot: Some(BootTimings {
                boot_time_ms: 123.6,
                prepare_ms: 4.0,
                spawn_ms: 3.0,
                configure_ms: 0.5,
                guest_ms: 120.1,
                guest_kernel_ms: Some(80.0),
                from_snapshot: false,
            }),
            vmm_pid: Some(42),
            dir: "/tmp/x".into(),
            agent_version: Some("0.1.0".into()),
            kernel_release: Some("6.1.0".into()),
            failure: None,
            persisted: false,
        };
        let json = serde_json::to_string(&info).unwrap();
        assert_eq!(serde_json::from_str::<SandboxInfo>(&json).unwrap(), info);
        assert_eq!(info.boot_time_ms(), 124);
        assert!(info.age_ms() < 60_000);
        assert_eq!(BootTimings::ms(Duration::from_micros(1500)), 1.5);
    }
}
