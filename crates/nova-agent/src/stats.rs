//! Guest resource usage from `/proc` and `statvfs`.

use nova_protocol::{GuestStats, RemoteError, RemoteErrorKind};

/// Collects the stats (blocking reads run on the blocking pool).
pub(crate) async fn collect() -> Result<GuestStats, RemoteError> {
    tokio::task::spawn_blocking(collect_blocking)
        .await
        .unwrap_or_else(|e| {
            Err(RemoteError::new(
                RemoteErrorKind::Io,
                format!("stats task failed: {e}"),
            ))
        })
}

fn read(path: &str) -> Result<String, RemoteError> {
    std::fs::read_to_string(path).map_err(|e| RemoteError::from_io(format!("read {path}"), &e))
}

fn collect_blocking() -> Result<GuestStats, RemoteError> {
    let mem = parse_meminfo(&read("/proc/meminfo")?);
    let cpu = parse_stat(&read("/proc/stat")?, clock_ticks_per_second());
    let load_average = parse_loadavg(&read("/proc/loadavg")?);
    let uptime_ms = parse_uptime_ms(&read("/proc/uptime")?);
    let (root_fs_total_bytes, root_fs_used_bytes) = match rustix::fs::statvfs("/") {
        Ok(vfs) => {
            let total = vfs.f_blocks.saturating_mul(vfs.f_frsize);
            let free = vfs.f_bfree.saturating_mul(vfs.f_frsize);
            (total, total.saturating_sub(free))
        }
        Err(e) => {
            tracing::debug!(error = %e, "statvfs / failed");
            (0, 0)
        }
    };
    let process_count = std::fs::read_dir("/proc")
        .map(|dir| {
            dir.filter_map(Result::ok)
                .filter(|e| {
                    e.file_name()
                        .to_str()
                        .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
                })
                .count()
        })
        .unwrap_or(0);
    Ok(GuestStats {
        memory_total_bytes: mem.total,
        memory_used_bytes: mem.total.saturating_sub(mem.available),
        memory_available_bytes: mem.available,
        cpu_user_ms: cpu.user_ms,
        cpu_system_ms: cpu.system_ms,
        cpu_idle_ms: cpu.idle_ms,
        cpu_count: cpu.count,
        load_average,
        root_fs_total_bytes,
        root_fs_used_bytes,
        process_count: u32::try_from(process_count).unwrap_or(u32::MAX),
        uptime_ms,
    })
}

fn clock_ticks_per_second() -> u64 {
    // USER_HZ; 100 on every Linux architecture we run on.
    rustix::param::clock_ticks_per_second().max(1)
}

#[derive(Debug, Default, PartialEq, Eq)]
struct MemInfo {
    total: u64,
    available: u64,
}

fn parse_meminfo(text: &str) -> MemInfo {
    let mut mem = MemInfo::default();
    let mut free = None;
    for line in text.lines() {
        let mut parts = line.split_whitespace();
        let (Some(key), Some(value)) = (parts.next(), parts.next()) else {
            continue;
        };
        let Ok(kib) = value.parse::<u64>() else {
            continue;
        };
        match key {
            "MemTotal:" => mem.total = kib * 1024,
            "MemAvailable:" => mem.available = kib * 1024,
            "MemFree:" => free = Some(kib * 1024),
            _ => {}
        }
    }
    if mem.available == 0 {
        mem.available = free.unwrap_or(0);
    }
    mem
}

#[derive(Debug, Default, PartialEq, Eq)]
struct CpuTimes {
    user_ms: u64,
    system_ms: u64,
    idle_ms: u64,
    count: u32,
}

fn parse_stat(text: &str, hz: u64) -> CpuTimes {
    let mut cpu = CpuTimes::default();
    for line in text.lines() {
        let mut parts = line.split_whitespace();
        match parts.next() {
            Some("cpu") => {
                let v: Vec<u64> = parts.map(|p| p.parse().unwrap_or(0)).collect();
                let at = |i: usize| v.get(i).copied().unwrap_or(0);
                let ms = |ticks: u64| ticks.saturating_mul(1000) / hz;
                // user nice system idle iowait irq softirq ...
                cpu.user_ms = ms(at(0) + at(1));
                cpu.system_ms = ms(at(2) + at(5) + at(6));
                cpu.idle_ms = ms(at(3) + at(4));
            }
            Some(name) if name.starts_with("cpu") => cpu.count += 1,
            _ => {}
        }
    }
    cpu
}

fn parse_loadavg(text: &str) -> [f64; 3] {
    let mut out = [0.0; 3];
    for (slot, value) in out.iter_mut().zip(text.split_whitespace()) {
        *slot = value.parse().unwrap_or(0.0);
    }
    out
}

fn parse_uptime_ms(text: &str) -> u64 {
    text.split_whitespace()
        .next()
        .and_then(|v| v.parse::<f64>().ok())
        .map(|secs| (secs * 1000.0) as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_proc_files() {
        let mem = parse_meminfo("MemTotal:  2048 kB\nMemFree:  512 kB\nMemAvailable:  1024 kB\n");
        assert_eq!(
            mem,
            MemInfo {
                total: 2048 * 1024,
                available: 1024 * 1024
            }
        );
        let cpu = parse_stat(
            "cpu  100 20 30 400 50 6 4 0 0 0\ncpu0 50 10 15 200 25 3 2 0 0 0\ncpu1 50 10 15 200 25 3 2 0 0 0\nintr 1\n",
            100,
        );
        assert_eq!(
            cpu,
            CpuTimes {
                user_ms: 1200,
                system_ms: 400,
                idle_ms: 4500,
                count: 2
            }
        );
        assert_eq!(parse_loadavg("0.50 0.25 0.12 1/100 42"), [0.5, 0.25, 0.12]);
        assert_eq!(parse_uptime_ms("12.34 56.78\n"), 12340);
        assert_eq!(parse_uptime_ms("garbage"), 0);
    }

    #[tokio::test]
    async fn collects_real_stats() {
        let stats = collect().await.unwrap();
        assert!(stats.memory_total_bytes > 0);
        assert!(stats.memory_available_bytes <= stats.memory_total_bytes);
        assert!(stats.cpu_count >= 1);
        assert!(stats.process_count >= 1);
        assert!(stats.uptime_ms > 0);
        assert!(stats.root_fs_total_bytes >= stats.root_fs_used_bytes);
    }
}
