//! `/drives/{drive_id}`: virtio block devices.
//!
//! Firecracker names guest devices in the order drives were added
//! (`/dev/vda`, `/dev/vdb`, …), with the root device first.

use serde::{Deserialize, Serialize};

use super::RateLimiter;

/// Host page-cache behaviour of a drive.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum CacheType {
    /// Flushes are ignored (Firecracker's default).
    #[default]
    Unsafe,
    /// Flushes reach the host disk.
    Writeback,
}

/// How Firecracker performs block I/O.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum IoEngine {
    /// Blocking I/O on the device thread (the default).
    #[default]
    Sync,
    /// io_uring (host kernel 5.10.51 or later).
    Async,
}

/// The body of `PUT /drives/{drive_id}` (a virtio-block drive).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drive {
    /// Its id; also the last path segment of the request.
    pub drive_id: String,
    /// Backing file as the VMM sees its path.
    pub path_on_host: String,
    /// Whether the kernel boots from it (`root=` is then set by Firecracker
    /// only if `boot_args` has none; we always pass `root=` ourselves).
    pub is_root_device: bool,
    /// Attach read-only.
    pub is_read_only: bool,
    /// Root partition UUID, for root devices with a partition table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    /// Host caching.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_type: Option<CacheType>,
    /// I/O engine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_engine: Option<IoEngine>,
    /// Rate limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
}

impl Drive {
    /// A drive with Firecracker's defaults for caching and I/O.
    pub fn new(
        id: impl Into<String>,
        path: impl Into<String>,
        is_root_device: bool,
        is_read_only: bool,
    ) -> Self {
        Self {
            drive_id: id.into(),
            path_on_host: path.into(),
            is_root_device,
            is_read_only,
            partuuid: None,
            cache_type: None,
            io_engine: None,
            rate_limiter: None,
        }
    }
}

/// The body of `PATCH /drives/{drive_id}`: swap the backing file or the rate
/// limits of a drive after boot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartialDrive {
    /// Which drive.
    pub drive_id: String,
    /// New backing file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_on_host: Option<String>,
    /// New rate limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::api::TokenBucket;

    #[test]
    fn root_and_scratch_bodies() {
        let root = Drive::new("rootfs", "/t/rootfs.ext4", true, true);
        assert_eq!(
            serde_json::to_value(&root).unwrap(),
            json!({"drive_id": "rootfs", "path_on_host": "/t/rootfs.ext4",
                   "is_root_device": true, "is_read_only": true})
        );
        let mut scratch = Drive::new("scratch", "scratch.ext4", false, false);
        scratch.cache_type = Some(CacheType::Writeback);
        scratch.io_engine = Some(IoEngine::Async);
        scratch.rate_limiter = Some(RateLimiter {
            bandwidth: None,
            ops: Some(TokenBucket {
                size: 1000,
                one_time_burst: None,
                refill_time: 1000,
            }),
        });
        assert_eq!(
            serde_json::to_value(&scratch).unwrap(),
            json!({"drive_id": "scratch", "path_on_host": "scratch.ext4",
                   "is_root_device": false, "is_read_only": false,
                   "cache_type": "Writeback", "io_engine": "Async",
                   "rate_limiter": {"ops": {"size": 1000, "refill_time": 1000}}})
        );
    }

    #[test]
    fn patch_body() {
        let patch = PartialDrive {
            drive_id: "extra0".into(),
            path_on_host: Some("/data/new.img".into()),
            rate_limiter: None,
        };
        assert_eq!(
            serde_json::to_value(&patch).unwrap(),
            json!({"drive_id": "extra0", "path_on_host": "/data/new.img"})
        );
    }
}
