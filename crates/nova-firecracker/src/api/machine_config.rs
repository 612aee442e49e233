//! `/machine-config`: vCPUs, memory, SMT, dirty-page tracking, huge pages.

use serde::{Deserialize, Serialize};

/// Which huge pages back guest memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum HugePages {
    /// Normal 4 KiB pages.
    #[default]
    None,
    /// 2 MiB hugetlbfs pages (`mem_size_mib` must then be even).
    #[serde(rename = "2M")]
    Huge2M,
}

/// The body of `PUT /machine-config` and the answer of `GET /machine-config`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineConfig {
    /// Number of vCPUs (1 to 32; 1 or even with SMT).
    pub vcpu_count: u8,
    /// Guest memory in MiB.
    pub mem_size_mib: u32,
    /// Simultaneous multithreading (x86 only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smt: Option<bool>,
    /// Track dirty pages, which diff snapshots need.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub track_dirty_pages: Option<bool>,
    /// Huge pages for guest memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huge_pages: Option<HugePages>,
    /// A static CPU template name (deprecated by Firecracker; `"None"` when
    /// reported back).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<String>,
}

impl MachineConfig {
    /// `vcpus` vCPUs and `memory_mib` MiB, everything else at Firecracker's
    /// defaults.
    pub fn new(vcpus: u8, memory_mib: u32) -> Self {
        Self {
            vcpu_count: vcpus,
            mem_size_mib: memory_mib,
            smt: None,
            track_dirty_pages: None,
            huge_pages: None,
            cpu_template: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn request_body_has_only_what_was_set() {
        let mut config = MachineConfig::new(2, 1024);
        assert_eq!(
            serde_json::to_value(&config).unwrap(),
            json!({"vcpu_count": 2, "mem_size_mib": 1024})
        );
        config.track_dirty_pages = Some(true);
        config.huge_pages = Some(HugePages::Huge2M);
        config.smt = Some(false);
        assert_eq!(
            serde_json::to_value(&config).unwrap(),
            json!({"vcpu_count": 2, "mem_size_mib": 1024, "smt": false,
                   "track_dirty_pages": true, "huge_pages": "2M"})
        );
    }

    #[test]
    fn parses_the_get_answer() {
        let answer = r#"{"vcpu_count":1,"mem_size_mib":128,"smt":false,
            "track_dirty_pages":false,"huge_pages":"None","cpu_template":"None"}"#;
        let config: MachineConfig = serde_json::from_str(answer).unwrap();
        assert_eq!(config.vcpu_count, 1);
        assert_eq!(config.mem_size_mib, 128);
        assert_eq!(config.huge_pages, Some(HugePages::None));
        assert_eq!(config.cpu_template.as_deref(), Some("None"));
    }
}
