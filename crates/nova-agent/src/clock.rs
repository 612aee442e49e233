//! Guest time since boot, for the boot-time breakdown in the handshake.

use rustix::time::{ClockId, clock_gettime};

/// Microseconds since the guest booted (`CLOCK_BOOTTIME`, which keeps counting
/// while suspended), the same clock `/proc/uptime` reports.
pub(crate) fn boottime_us() -> u64 {
    let ts = clock_gettime(ClockId::Boottime);
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000
        + u64::try_from(ts.tv_nsec).unwrap_or(0) / 1_000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boottime_is_monotonic_and_matches_proc_uptime() {
        let a = boottime_us();
        let uptime: f64 = std::fs::read_to_string("/proc/uptime")
            .ok()
            .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
            .unwrap_or(0.0);
        let b = boottime_us();
        assert!(b >= a);
        assert!(
            (b as f64 / 1e6 - uptime).abs() < 5.0,
            "boottime {b}us vs uptime {uptime}s"
        );
    }
}
