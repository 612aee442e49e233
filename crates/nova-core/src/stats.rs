//! Resource usage of a sandbox, merged from the VMM, the host and the guest.

use serde::{Deserialize, Serialize};

/// One snapshot of a sandbox's resource usage.
///
/// The top-level fields are the ones the seed's monitoring example reads;
/// `vmm` and `guest` keep the detail of each source.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SandboxStats {
    /// Guest memory in use (total minus available), in MiB; falls back to the
    /// VMM's resident set when the agent cannot answer.
    pub memory_usage_mb: f64,
    /// Guest memory size as configured, in MiB.
    pub memory_limit_mb: u64,
    /// CPU time the sandbox has used, in microseconds: the VMM process's user
    /// plus system time, which includes every vCPU thread.
    pub cpu_usage_us: u64,
    /// Milliseconds since the sandbox was created.
    pub uptime_ms: u64,
    /// The VMM process as the host sees it.
    pub vmm: VmmStats,
    /// The guest's own view, when the agent answered.
    pub guest: Option<GuestStats>,
}

/// The VMM process as the host sees it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct VmmStats {
    /// Resident set size in bytes.
    pub rss_bytes: u64,
    /// User CPU time in microseconds.
    pub cpu_user_us: u64,
    /// System CPU time in microseconds.
    pub cpu_system_us: u64,
    /// Block device bytes read, where the VMM reports it.
    pub block_read_bytes: Option<u64>,
    /// Block device bytes written, where the VMM reports it.
    pub block_write_bytes: Option<u64>,
    /// Network bytes received, where the VMM reports it.
    pub net_rx_bytes: Option<u64>,
    /// Network bytes sent, where the VMM reports it.
    pub net_tx_bytes: Option<u64>,
}

/// The guest's view of itself, as reported by its agent.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GuestStats {
    /// Total memory the guest kernel manages, in bytes.
    pub memory_total_bytes: u64,
    /// Memory in use (total minus available), in bytes.
    pub memory_used_bytes: u64,
    /// Memory available for new work, in bytes.
    pub memory_available_bytes: u64,
    /// CPU time spent in user mode, all CPUs, in microseconds.
    pub cpu_user_us: u64,
    /// CPU time spent in kernel mode, all CPUs, in microseconds.
    pub cpu_system_us: u64,
    /// Load averages over 1, 5 and 15 minutes.
    pub load_avg: [f64; 3],
    /// Bytes used on the root filesystem.
    pub disk_used_bytes: u64,
    /// Size of the root filesystem in bytes.
    pub disk_total_bytes: u64,
    /// Number of processes.
    pub process_count: u64,
    /// Guest uptime in milliseconds.
    pub uptime_ms: u64,
}
