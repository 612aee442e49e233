//! `/balloon` and `/balloon/statistics`: the memory balloon, which lets the
//! host reclaim guest memory.

use serde::{Deserialize, Serialize};

/// The body of `PUT /balloon` and the answer of `GET /balloon`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Balloon {
    /// Target balloon size in MiB.
    pub amount_mib: u32,
    /// Deflate when the guest is under memory pressure.
    pub deflate_on_oom: bool,
    /// Seconds between statistics refreshes; 0 (the default) disables them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats_polling_interval_s: Option<u32>,
    /// Free page hinting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free_page_hinting: Option<bool>,
    /// Free page reporting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free_page_reporting: Option<bool>,
}

/// The body of `PATCH /balloon`: a new target size.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonUpdate {
    /// Target balloon size in MiB.
    pub amount_mib: u32,
}

/// The body of `PATCH /balloon/statistics`: a new polling interval.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonStatsUpdate {
    /// Seconds between statistics refreshes.
    pub stats_polling_interval_s: u32,
}

/// The answer of `GET /balloon/statistics`. Byte counts the guest did not
/// report are `None`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonStats {
    /// Pages the balloon aims to hold.
    pub target_pages: u64,
    /// Pages it holds.
    pub actual_pages: u64,
    /// MiB it aims to hold.
    pub target_mib: u64,
    /// MiB it holds.
    pub actual_mib: u64,
    /// Bytes swapped in.
    #[serde(default)]
    pub swap_in: Option<u64>,
    /// Bytes swapped out.
    #[serde(default)]
    pub swap_out: Option<u64>,
    /// Major page faults.
    #[serde(default)]
    pub major_faults: Option<u64>,
    /// Minor page faults.
    #[serde(default)]
    pub minor_faults: Option<u64>,
    /// Bytes not used for anything.
    #[serde(default)]
    pub free_memory: Option<u64>,
    /// Bytes the guest has.
    #[serde(default)]
    pub total_memory: Option<u64>,
    /// Bytes available for new work without swapping.
    #[serde(default)]
    pub available_memory: Option<u64>,
    /// Bytes of reclaimable caches.
    #[serde(default)]
    pub disk_caches: Option<u64>,
    /// Successful hugetlb allocations.
    #[serde(default)]
    pub hugetlb_allocations: Option<u64>,
    /// Failed hugetlb allocations.
    #[serde(default)]
    pub hugetlb_failures: Option<u64>,
    /// OOM killer invocations.
    #[serde(default)]
    pub oom_kill: Option<u64>,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn request_bodies() {
        let b = Balloon {
            amount_mib: 64,
            deflate_on_oom: true,
            stats_polling_interval_s: Some(1),
            free_page_hinting: None,
            free_page_reporting: None,
        };
        assert_eq!(
            serde_json::to_value(&b).unwrap(),
            json!({"amount_mib": 64, "deflate_on_oom": true, "stats_polling_interval_s": 1})
        );
        assert_eq!(
            serde_json::to_value(BalloonUpdate { amount_mib: 8 }).unwrap(),
            json!({"amount_mib": 8})
        );
        assert_eq!(
            serde_json::to_value(BalloonStatsUpdate {
                stats_polling_interval_s: 5
            })
            .unwrap(),
            json!({"stats_polling_interval_s": 5})
        );
    }

    #[test]
    fn parses_statistics_with_and_without_guest_figures() {
        let s: BalloonStats = serde_json::from_value(json!({
            "target_pages": 2048, "actual_pages": 1024, "target_mib": 8, "actual_mib": 4,
            "free_memory": 1000, "total_memory": 4000, "available_memory": 2000,
            "some_future_field": 1
        }))
        .unwrap();
        assert_eq!(s.actual_mib, 4);
        assert_eq!(s.total_memory, Some(4000));
        assert_eq!(s.swap_in, None);
        let bare: BalloonStats = serde_json::from_value(json!({
            "target_pages": 0, "actual_pages": 0, "target_mib": 0, "actual_mib": 0
        }))
        .unwrap();
        assert_eq!(bare, BalloonStats::default());
    }
}
