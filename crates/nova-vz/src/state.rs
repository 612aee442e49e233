//! The VM's execution state as VZ reports it ([`VzState`], the raw values
//! of `VZVirtualMachineState`), and what it means for a sandbox.
//!
//! The helper reports the raw value over its control socket; the host maps
//! it with [`VzState::from_raw`] (an unknown value from a newer macOS is
//! kept, not guessed) and [`VzState::sandbox_state`].

use nova_core::state::SandboxState;
use serde::{Deserialize, Serialize};

/// `VZVirtualMachineState`, by its raw values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VzState {
    /// Not started, or stopped (0).
    Stopped,
    /// Running (1).
    Running,
    /// Paused (2).
    Paused,
    /// VZ hit an internal error (3); the VM is unusable.
    Error,
    /// Configuring the hardware and starting (4).
    Starting,
    /// Between running and paused (5).
    Pausing,
    /// Between paused and running (6).
    Resuming,
    /// Between running and stopped (7).
    Stopping,
    /// Saving its state while paused (8).
    Saving,
    /// Restoring a saved state (9).
    Restoring,
    /// A value this build does not know (a newer macOS).
    Unknown(i64),
}

impl VzState {
    /// The state of raw `VZVirtualMachineState` value `raw`.
    pub fn from_raw(raw: i64) -> Self {
        match raw {
            0 => Self::Stopped,
            1 => Self::Running,
            2 => Self::Paused,
            3 => Self::Error,
            4 => Self::Starting,
            5 => Self::Pausing,
            6 => Self::Resuming,
            7 => Self::Stopping,
            8 => Self::Saving,
            9 => Self::Restoring,
            other => Self::Unknown(other),
        }
    }

    /// The sandbox state a VM in this state belongs to: transitions count
    /// as the state they leave (a pausing VM still runs, a saving one is
    /// still paused), so that the runtime never sees a sandbox jump ahead
    /// of what VZ has confirmed. `None` for an unknown value.
    pub fn sandbox_state(self) -> Option<SandboxState> {
        Some(match self {
            Self::Starting | Self::Restoring => SandboxState::Creating,
            Self::Running | Self::Pausing => SandboxState::Running,
            Self::Paused | Self::Resuming | Self::Saving => SandboxState::Paused,
            Self::Stopping => SandboxState::Stopping,
            Self::Stopped => SandboxState::Stopped,
            Self::Error => SandboxState::Failed,
            Self::Unknown(_) => return None,
        })
    }

    /// Whether the VM has ended (stopped, or failed in VZ): the helper
    /// exits then.
    pub fn has_ended(self) -> bool {
        matches!(self, Self::Stopped | Self::Error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_values_match_vz_and_unknown_ones_are_kept() {
        let all: Vec<VzState> = (0..=10).map(VzState::from_raw).collect();
        assert_eq!(
            all,
            [
                VzState::Stopped,
                VzState::Running,
                VzState::Paused,
                VzState::Error,
                VzState::Starting,
                VzState::Pausing,
                VzState::Resuming,
                VzState::Stopping,
                VzState::Saving,
                VzState::Restoring,
                VzState::Unknown(10),
            ]
        );
        assert_eq!(VzState::Unknown(10).sandbox_state(), None);
    }

    #[test]
    fn transitions_count_as_the_state_they_leave() {
        assert_eq!(
            VzState::Pausing.sandbox_state(),
            Some(SandboxState::Running)
        );
        assert_eq!(
            VzState::Resuming.sandbox_state(),
            Some(SandboxState::Paused)
        );
        assert_eq!(VzState::Saving.sandbox_state(), Some(SandboxState::Paused));
        assert_eq!(
            VzState::Restoring.sandbox_state(),
            Some(SandboxState::Creating)
        );
        assert_eq!(VzState::Error.sandbox_state(), Some(SandboxState::Failed));
    }

    #[test]
    fn only_stopped_and_error_end_the_helper() {
        let ended: Vec<VzState> = (0..=9)
            .map(VzState::from_raw)
            .filter(|s| s.has_ended())
            .collect();
        assert_eq!(ended, [VzState::Stopped, VzState::Error]);
    }
}
