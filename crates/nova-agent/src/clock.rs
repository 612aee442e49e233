//! The guest's clocks: time since boot for the boot-time breakdown in the
//! handshake, and the wall clock the host corrects after the guest missed
//! time.
//!
//! A paused VM's clocks stop with it (and a restored snapshot wakes up with
//! the time it was taken at), so after a resume the guest's wall clock is
//! behind by as long as it was stopped. The host sends its own time in a
//! [`nova_protocol::Request::SetClock`] (or, after a snapshot restore, a
//! [`nova_protocol::Request::Refresh`]); [`step_to_host`] steps
//! `CLOCK_REALTIME` to it. Monotonic clocks are left alone: they measure the
//! guest's own running time, which did stop.

use nova_protocol::{RemoteError, Response};
use rustix::time::{ClockId, Timespec, clock_gettime, clock_settime};

/// Offsets smaller than this are left alone: the host's time is already a
/// little old when it arrives, so stepping by less would be noise.
const STEP_THRESHOLD_NS: i64 = 5_000_000;
const NANOS_PER_SEC: i64 = 1_000_000_000;

/// Microseconds since the guest booted (`CLOCK_BOOTTIME`, which keeps counting
/// while suspended), the same clock `/proc/uptime` reports.
pub(crate) fn boottime_us() -> u64 {
    let ts = clock_gettime(ClockId::Boottime);
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000
        + u64::try_from(ts.tv_nsec).unwrap_or(0) / 1_000
}

/// What [`step_to_host`] found and did.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Step {
    /// How far the guest's clock was behind the host's (negative: ahead).
    pub(crate) offset_ns: i64,
    /// Whether the clock was stepped.
    pub(crate) stepped: bool,
}

/// Answers [`nova_protocol::Request::SetClock`] (see [`step_to_host`]).
pub(crate) fn set_from_host(host_unix_ns: u64, step: bool) -> Result<Response, RemoteError> {
    let Step { offset_ns, stepped } = step_to_host(host_unix_ns, step)?;
    Ok(Response::ClockSet { offset_ns, stepped })
}

/// Measures how far the wall clock is behind `host_unix_ns` and, when
/// `step` (the agent is PID 1, so the clock is the guest's own) and the
/// offset is noticeable, steps it.
pub(crate) fn step_to_host(host_unix_ns: u64, step: bool) -> Result<Step, RemoteError> {
    let host = i128::from(host_unix_ns);
    let now = clock_gettime(ClockId::Realtime);
    let guest = i128::from(now.tv_sec) * i128::from(NANOS_PER_SEC) + i128::from(now.tv_nsec);
    let offset = host - guest;
    let offset_ns = i64::try_from(offset).unwrap_or(if offset < 0 { i64::MIN } else { i64::MAX });
    let stepped = step && offset_ns.unsigned_abs() >= STEP_THRESHOLD_NS.unsigned_abs();
    if stepped {
        let host_ns = i64::try_from(host_unix_ns).unwrap_or(i64::MAX);
        let target = Timespec {
            tv_sec: host_ns / NANOS_PER_SEC,
            tv_nsec: host_ns % NANOS_PER_SEC,
        };
        clock_settime(ClockId::Realtime, target)
            .map_err(|e| RemoteError::from_io("set the guest clock", &e.into()))?;
        tracing::info!(
            offset_ms = offset_ns / 1_000_000,
            "wall clock stepped to the host's time"
        );
    }
    Ok(Step { offset_ns, stepped })
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

    #[test]
    fn without_step_the_offset_is_only_measured() {
        // One hour ahead of this machine's clock; `step` is false, so the
        // host's clock is not touched.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        let ahead = u64::try_from(now.as_nanos()).unwrap() + 3_600 * 1_000_000_000;
        let Response::ClockSet { offset_ns, stepped } = set_from_host(ahead, false).unwrap() else {
            panic!("not a ClockSet");
        };
        assert!(!stepped);
        let hour = 3_600 * NANOS_PER_SEC;
        assert!(
            (offset_ns - hour).abs() < 60 * NANOS_PER_SEC,
            "offset {offset_ns} ns for a host one hour ahead"
        );
        // Far outside i64 nanoseconds: reported saturated, not a panic.
        assert!(set_from_host(u64::MAX, false).is_ok());
        assert!(set_from_host(0, false).is_ok());
    }
}
