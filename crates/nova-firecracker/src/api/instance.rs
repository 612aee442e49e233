//! `GET /`, `PATCH /vm` and `GET /version`: the instance and its run state.

use serde::{Deserialize, Serialize};

/// What `PATCH /vm` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmState {
    /// Stop the vCPUs.
    Paused,
    /// Run them again.
    Resumed,
}

/// The body of `PATCH /vm`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vm {
    /// The state asked for.
    pub state: VmState,
}

/// The instance's state as `GET /` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum InstanceState {
    /// Configured or being configured; `InstanceStart` not yet sent.
    #[serde(rename = "Not started")]
    NotStarted,
    /// The guest runs.
    Running,
    /// The vCPUs are paused.
    Paused,
}

/// The answer of `GET /`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceInfo {
    /// The instance id (`--id`).
    pub id: String,
    /// The instance's state.
    pub state: InstanceState,
    /// Firecracker's version.
    pub vmm_version: String,
    /// The application name (`Firecracker`).
    pub app_name: String,
}

/// The answer of `GET /version`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirecrackerVersion {
    /// Firecracker's version, like `1.16.1`.
    pub firecracker_version: String,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn vm_bodies() {
        assert_eq!(
            serde_json::to_value(Vm {
                state: VmState::Paused
            })
            .unwrap(),
            json!({"state": "Paused"})
        );
        assert_eq!(
            serde_json::to_value(Vm {
                state: VmState::Resumed
            })
            .unwrap(),
            json!({"state": "Resumed"})
        );
    }

    #[test]
    fn parses_instance_info_in_every_state() {
        for (text, state) in [
            ("Not started", InstanceState::NotStarted),
            ("Running", InstanceState::Running),
            ("Paused", InstanceState::Paused),
        ] {
            let info: InstanceInfo = serde_json::from_value(json!({
                "id": "sb-1", "state": text, "vmm_version": "1.16.1", "app_name": "Firecracker"
            }))
            .unwrap();
            assert_eq!(info.state, state);
            assert_eq!(info.id, "sb-1");
        }
        assert!(
            serde_json::from_value::<InstanceInfo>(json!({
                "id": "x", "state": "Exploded", "vmm_version": "1", "app_name": "F"
            }))
            .is_err()
        );
        let v: FirecrackerVersion =
            serde_json::from_str(r#"{"firecracker_version":"1.16.1"}"#).unwrap();
        assert_eq!(v.firecracker_version, "1.16.1");
    }
}
