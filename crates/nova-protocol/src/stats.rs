//! The guest's own view of its resources.

use serde::{Deserialize, Serialize};

/// Guest resource usage, as the agent reads it from `/proc` and `statvfs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuestStats {
    /// `MemTotal`, bytes.
    pub memory_total_bytes: u64,
    /// `MemTotal - MemAvailable`, bytes.
    pub memory_used_bytes: u64,
    /// `MemAvailable`, bytes.
    pub memory_available_bytes: u64,
    /// CPU time in user mode (user + nice), all CPUs, milliseconds.
    pub cpu_user_ms: u64,
    /// CPU time in kernel mode (system + irq + softirq), all CPUs, milliseconds.
    pub cpu_system_ms: u64,
    /// Idle CPU time (idle + iowait), all CPUs, milliseconds.
    pub cpu_idle_ms: u64,
    /// Number of online CPUs.
    pub cpu_count: u32,
    /// Load averages over 1, 5 and 15 minutes.
    pub load_average: [f64; 3],
    /// Size of the root file system, bytes.
    pub root_fs_total_bytes: u64,
    /// Used space on the root file system, bytes.
    pub root_fs_used_bytes: u64,
    /// Number of processes.
    pub process_count: u32,
    /// Time since guest boot, milliseconds.
    pub uptime_ms: u64,
}
