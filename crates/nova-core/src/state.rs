//! The sandbox lifecycle as a state machine.
//!
//! ```text
//!   Creating ──► Running ◄──► Paused
//!      │            │            │
//!      └──────┬─────┴────────────┘
//!             ▼
//!          Stopping ──► Stopped
//!
//!   any live state ──► Failed ──► Stopping (cleanup)
//! ```
//!
//! Every legal move is listed in [`SandboxState::can_transition_to`]; every
//! other one is an [`InvalidTransition`] whose message says what was asked
//! and why it cannot happen. Providers change a sandbox's state only through
//! [`SandboxState::transition_to`], so pausing a stopped sandbox is an error
//! everywhere, never a silent no-op.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Where a sandbox is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SandboxState {
    /// Its directory and VMM are being set up and the guest is booting.
    Creating,
    /// The guest's agent answered `ready`; commands can run.
    Running,
    /// The VMM has paused the guest's vCPUs; it makes no progress.
    Paused,
    /// A stop was requested; resources are being released.
    Stopping,
    /// Its VMM has exited and every host resource is gone.
    Stopped,
    /// Its VMM died or could not be driven; it must be stopped to release
    /// what is left.
    Failed,
}

impl SandboxState {
    /// Whether the VMM process may still exist.
    pub fn is_live(self) -> bool {
        !matches!(self, Self::Stopped)
    }

    /// Whether a sandbox in this state can run commands.
    pub fn is_running(self) -> bool {
        self == Self::Running
    }

    /// Whether moving from `self` to `next` is legal.
    pub fn can_transition_to(self, next: Self) -> bool {
        use SandboxState::*;
        matches!(
            (self, next),
            (Creating, Running | Stopping | Failed)
                | (Running, Paused | Stopping | Failed)
                | (Paused, Running | Stopping | Failed)
                | (Stopping, Stopped | Failed)
                | (Failed, Stopping)
        )
    }

    /// Checks that moving to `next` is legal, without moving.
    pub fn check_transition(self, next: Self) -> Result<(), InvalidTransition> {
        if self.can_transition_to(next) {
            Ok(())
        } else {
            Err(InvalidTransition {
                from: self,
                to: next,
            })
        }
    }

    /// Moves to `next` if that is legal, else leaves `self` unchanged and
    /// explains why not.
    pub fn transition_to(&mut self, next: Self) -> Result<(), InvalidTransition> {
        if self.can_transition_to(next) {
            *self = next;
            Ok(())
        } else {
            Err(InvalidTransition {
                from: *self,
                to: next,
            })
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::Creating => "creating",
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Stopping => "stopping",
            Self::Stopped => "stopped",
            Self::Failed => "failed",
        }
    }
}

impl fmt::Display for SandboxState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A state change that the lifecycle does not allow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("cannot {action} a sandbox that is {from}{hint}", action = self.action(), hint = self.hint())]
pub struct InvalidTransition {
    /// The state the sandbox is in.
    pub from: SandboxState,
    /// The state that was asked for.
    pub to: SandboxState,
}

impl InvalidTransition {
    fn action(&self) -> &'static str {
        match (self.from, self.to) {
            (SandboxState::Paused, SandboxState::Running) => "resume",
            (_, SandboxState::Running) => "start",
            (_, SandboxState::Paused) => "pause",
            (_, SandboxState::Stopping | SandboxState::Stopped) => "stop",
            (_, SandboxState::Failed) => "mark as failed",
            (_, SandboxState::Creating) => "re-create",
        }
    }

    fn hint(&self) -> &'static str {
        match (self.from, self.to) {
            (SandboxState::Stopped, _) => "; its resources are gone, create a new sandbox",
            (SandboxState::Failed, _) => "; stop it to release its resources",
            (SandboxState::Running, SandboxState::Running) => "; it is already running",
            (SandboxState::Paused, SandboxState::Paused) => "; it is already paused",
            (SandboxState::Creating, SandboxState::Paused) => "; wait until it is running",
            (SandboxState::Stopping, _) => "; it is already being stopped",
            _ => "",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::SandboxState::*;
    use super::*;

    const ALL: [SandboxState; 6] = [Creating, Running, Paused, Stopping, Stopped, Failed];

    #[test]
    fn legal_transitions_are_exactly_the_documented_ones() {
        let legal = [
            (Creating, Running),
            (Creating, Stopping),
            (Creating, Failed),
            (Running, Paused),
            (Running, Stopping),
            (Running, Failed),
            (Paused, Running),
            (Paused, Stopping),
            (Paused, Failed),
            (Stopping, Stopped),
            (Stopping, Failed),
            (Failed, Stopping),
        ];
        for from in ALL {
            for to in ALL {
                let mut state = from;
                assert_eq!(
                    from.check_transition(to).is_ok(),
                    legal.contains(&(from, to))
                );
                let result = state.transition_to(to);
                if legal.contains(&(from, to)) {
                    assert_eq!(result, Ok(()), "{from} -> {to}");
                    assert_eq!(state, to);
                } else {
                    assert_eq!(
                        result,
                        Err(InvalidTransition { from, to }),
                        "{from} -> {to}"
                    );
                    assert_eq!(state, from, "a refused transition changes nothing");
                }
            }
        }
    }

    #[test]
    fn pausing_a_stopped_sandbox_says_so() {
        let mut s = Stopped;
        let e = s.transition_to(Paused).unwrap_err();
        assert_eq!(
            e.to_string(),
            "cannot pause a sandbox that is stopped; its resources are gone, create a new sandbox"
        );
    }

    #[test]
    fn messages_name_the_action() {
        let msg = |from, to| InvalidTransition { from, to }.to_string();
        assert_eq!(
            msg(Running, Running),
            "cannot start a sandbox that is running; it is already running"
        );
        assert_eq!(
            msg(Paused, Paused),
            "cannot pause a sandbox that is paused; it is already paused"
        );
        assert_eq!(
            msg(Stopped, Running),
            "cannot start a sandbox that is stopped; its resources are gone, create a new sandbox"
        );
        assert_eq!(
            msg(Creating, Paused),
            "cannot pause a sandbox that is creating; wait until it is running"
        );
        assert_eq!(
            msg(Stopped, Stopping),
            "cannot stop a sandbox that is stopped; its resources are gone, create a new sandbox"
        );
    }

    #[test]
    fn serializes_in_snake_case() {
        assert_eq!(serde_json::to_string(&Running).unwrap(), "\"running\"");
        assert_eq!(
            serde_json::from_str::<SandboxState>("\"paused\"").unwrap(),
            Paused
        );
        for s in ALL {
            assert_eq!(serde_json::to_string(&s).unwrap(), format!("\"{s}\""));
        }
    }

    #[test]
    fn liveness() {
        assert!(Running.is_running());
        assert!(!Paused.is_running());
        assert!(Failed.is_live());
        assert!(!Stopped.is_live());
    }
}
