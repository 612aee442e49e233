//! `/actions`: synchronous actions on the instance.

use serde::{Deserialize, Serialize};

/// What `PUT /actions` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActionType {
    /// Boot the configured guest. Legal once, before start.
    InstanceStart,
    /// Write the current metrics to the metrics file now. Legal once metrics
    /// are configured.
    FlushMetrics,
    /// Press Ctrl+Alt+Del on the guest's i8042 keyboard (x86 only); a Linux
    /// guest reboots, which with `reboot=k` ends the VMM.
    SendCtrlAltDel,
}

/// The body of `PUT /actions`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceActionInfo {
    /// The action.
    pub action_type: ActionType,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn request_bodies() {
        for (action, name) in [
            (ActionType::InstanceStart, "InstanceStart"),
            (ActionType::FlushMetrics, "FlushMetrics"),
            (ActionType::SendCtrlAltDel, "SendCtrlAltDel"),
        ] {
            assert_eq!(
                serde_json::to_value(InstanceActionInfo {
                    action_type: action
                })
                .unwrap(),
                json!({ "action_type": name })
            );
        }
    }
}
