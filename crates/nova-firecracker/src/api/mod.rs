//! Firecracker's HTTP API, typed.
//!
//! [`ApiClient`] speaks HTTP/1.1 (hyper) over the Unix socket Firecracker
//! listens on (`--api-sock`), keeping one connection open and reopening it
//! if Firecracker closed it. Each API resource has its own file with the
//! request and response bodies the OpenAPI spec
//! (`src/firecracker/swagger/firecracker.yaml`) defines; optional fields are
//! `Option`s left out of the JSON when unset, so Firecracker applies its own
//! defaults. Responses are parsed leniently (unknown fields ignored), so a
//! newer Firecracker in the supported range still parses.
//!
//! Every refusal carries Firecracker's `fault_message` in an
//! [`ApiError::Fault`].

mod actions;
mod balloon;
mod boot_source;
mod client;
mod drive;
mod entropy;
mod instance;
mod logger;
mod machine_config;
mod metrics;
mod network;
mod rate_limiter;
mod snapshot;
mod vsock;

pub use actions::{ActionType, InstanceActionInfo};
pub use balloon::{Balloon, BalloonStats, BalloonStatsUpdate, BalloonUpdate};
pub use boot_source::BootSource;
pub use client::{ApiClient, ApiError, DEFAULT_API_TIMEOUT, InvalidResourceId, check_resource_id};
pub use drive::{CacheType, Drive, IoEngine, PartialDrive};
pub use entropy::EntropyDevice;
pub use instance::{FirecrackerVersion, InstanceInfo, InstanceState, Vm, VmState};
pub use logger::{LogLevel, Logger};
pub use machine_config::{HugePages, MachineConfig};
pub use metrics::Metrics;
pub use network::{NetworkInterface, PartialNetworkInterface};
pub use rate_limiter::{RateLimiter, TokenBucket};
pub use snapshot::{
    MemoryBackend, MemoryBackendType, NetworkOverride, SnapshotCreateParams, SnapshotLoadParams,
    SnapshotType, VsockOverride,
};
pub use vsock::Vsock;
