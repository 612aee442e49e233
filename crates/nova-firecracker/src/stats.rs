//! Firecracker's metrics, as written to the metrics file.
//!
//! Firecracker writes one JSON object per flush (on `FlushMetrics`, and
//! every 60 s on its own) to the file given in `PUT /metrics`. Its counters
//! are *deltas*: each flush reports what happened since the previous one.
//! [`MetricsReader`] therefore reads only the lines added since its last
//! call and adds them into running [`MetricsTotals`]. Only the fields the
//! sandbox stats need are typed; the rest of each object is ignored, so
//! newer Firecrackers with more metrics still parse.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// One flush's counters (each a delta since the previous flush).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct MetricsSample {
    /// All block devices together.
    #[serde(default)]
    pub block: BlockMetrics,
    /// All network devices together.
    #[serde(default)]
    pub net: NetMetrics,
    /// All vCPUs together.
    #[serde(default)]
    pub vcpu: VcpuMetrics,
}

/// Block device counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct BlockMetrics {
    /// Bytes read by the guest.
    #[serde(default)]
    pub read_bytes: u64,
    /// Bytes written by the guest.
    #[serde(default)]
    pub write_bytes: u64,
    /// Read requests.
    #[serde(default)]
    pub read_count: u64,
    /// Write requests.
    #[serde(default)]
    pub write_count: u64,
}

/// Network device counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct NetMetrics {
    /// Bytes received by the guest.
    #[serde(default)]
    pub rx_bytes_count: u64,
    /// Bytes sent by the guest.
    #[serde(default)]
    pub tx_bytes_count: u64,
    /// Packets received.
    #[serde(default)]
    pub rx_packets_count: u64,
    /// Packets sent.
    #[serde(default)]
    pub tx_packets_count: u64,
}

/// vCPU exit counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct VcpuMetrics {
    /// Port I/O reads.
    #[serde(default)]
    pub exit_io_in: u64,
    /// Port I/O writes.
    #[serde(default)]
    pub exit_io_out: u64,
    /// MMIO reads.
    #[serde(default)]
    pub exit_mmio_read: u64,
    /// MMIO writes.
    #[serde(default)]
    pub exit_mmio_write: u64,
    /// vCPU failures.
    #[serde(default)]
    pub failures: u64,
}

impl VcpuMetrics {
    /// All exits counted here (saturating, like [`MetricsTotals::add`]).
    pub fn exits(&self) -> u64 {
        self.exit_io_in
            .saturating_add(self.exit_io_out)
            .saturating_add(self.exit_mmio_read)
            .saturating_add(self.exit_mmio_write)
    }
}

/// Counters summed over every flush read so far.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MetricsTotals {
    /// Flushes read.
    pub flushes: u64,
    /// Block counters.
    pub block: BlockMetrics,
    /// Network counters.
    pub net: NetMetrics,
    /// vCPU counters.
    pub vcpu: VcpuMetrics,
}

impl MetricsTotals {
    /// Adds one flush. Sums saturate at `u64::MAX`: the file is written by
    /// the VMM but its counters are driven by the guest, and a line with a
    /// huge value must not wrap the totals around (or panic a debug build).
    pub fn add(&mut self, s: &MetricsSample) {
        fn sum(total: &mut u64, delta: u64) {
            *total = total.saturating_add(delta);
        }
        sum(&mut self.flushes, 1);
        let b = &mut self.block;
        sum(&mut b.read_bytes, s.block.read_bytes);
        sum(&mut b.write_bytes, s.block.write_bytes);
        sum(&mut b.read_count, s.block.read_count);
        sum(&mut b.write_count, s.block.write_count);
        let n = &mut self.net;
        sum(&mut n.rx_bytes_count, s.net.rx_bytes_count);
        sum(&mut n.tx_bytes_count, s.net.tx_bytes_count);
        sum(&mut n.rx_packets_count, s.net.rx_packets_count);
        sum(&mut n.tx_packets_count, s.net.tx_packets_count);
        let v = &mut self.vcpu;
        sum(&mut v.exit_io_in, s.vcpu.exit_io_in);
        sum(&mut v.exit_io_out, s.vcpu.exit_io_out);
        sum(&mut v.exit_mmio_read, s.vcpu.exit_mmio_read);
        sum(&mut v.exit_mmio_write, s.vcpu.exit_mmio_write);
        sum(&mut v.failures, s.vcpu.failures);
    }
}

/// Parses one flushed metrics object.
pub fn parse_sample(line: &str) -> Result<MetricsSample, serde_json::Error> {
    serde_json::from_str(line)
}

/// Reads a metrics file incrementally, summing what it finds.
#[derive(Debug)]
pub struct MetricsReader {
    path: PathBuf,
    offset: u64,
    partial: Vec<u8>,
    totals: MetricsTotals,
    bad_lines: u64,
}

impl MetricsReader {
    /// A reader of the metrics file at `path` (which may not exist yet).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            offset: 0,
            partial: Vec::new(),
            totals: MetricsTotals::default(),
            bad_lines: 0,
        }
    }

    /// The metrics file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Totals so far, without reading.
    pub fn totals(&self) -> &MetricsTotals {
        &self.totals
    }

    /// Lines that did not parse (skipped).
    pub fn bad_lines(&self) -> u64 {
        self.bad_lines
    }

    /// Reads whatever was appended since the last call and returns the new
    /// totals. A line still being written is kept for the next call.
    pub fn read_new(&mut self) -> std::io::Result<&MetricsTotals> {
        let mut file = match std::fs::File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(&self.totals),
            Err(e) => return Err(e),
        };
        file.seek(SeekFrom::Start(self.offset))?;
        let mut added = Vec::new();
        let read = file.read_to_end(&mut added)?;
        self.offset += read as u64;
        self.partial.extend_from_slice(&added);
        let complete = match self.partial.iter().rposition(|&b| b == b'\n') {
            Some(end) => self.partial.drain(..=end).collect::<Vec<u8>>(),
            None => return Ok(&self.totals),
        };
        for line in complete.split(|&b| b == b'\n') {
            let line = String::from_utf8_lossy(line);
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            match parse_sample(line) {
                Ok(sample) => self.totals.add(&sample),
                Err(e) => {
                    self.bad_lines += 1;
                    tracing::debug!(error = %e, "skipping an unparsable metrics line");
                }
            }
        }
        Ok(&self.totals)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    /// The shape of a Firecracker 1.x flush, trimmed to a few sections plus
    /// per-device and unrelated ones that must be ignored.
    const FLUSH: &str = r#"{"utc_timestamp_ms":1700000000000,"api_server":{"process_startup_time_us":10},"block":{"activate_fails":0,"read_bytes":4096,"write_bytes":512,"read_count":2,"write_count":1,"read_agg":{"min_us":1,"max_us":3,"sum_us":4}},"block_rootfs":{"read_bytes":4096},"net":{"rx_bytes_count":100,"tx_bytes_count":60,"rx_packets_count":2,"tx_packets_count":1},"vcpu":{"exit_io_in":5,"exit_io_out":7,"exit_mmio_read":1,"exit_mmio_write":2,"failures":0,"exit_io_in_agg":{"min_us":0,"max_us":0,"sum_us":0}},"vmm":{"panic_count":0},"latencies_us":{"load_snapshot":0}}"#;

    #[test]
    fn parses_a_flush() {
        let s = parse_sample(FLUSH).unwrap();
        assert_eq!(s.block.read_bytes, 4096);
        assert_eq!(s.block.write_bytes, 512);
        assert_eq!(s.net.rx_bytes_count, 100);
        assert_eq!(s.net.tx_bytes_count, 60);
        assert_eq!(s.vcpu.exits(), 15);
        // A VM without network devices still reports the section, but an
        // object missing it parses too.
        let bare = parse_sample(r#"{"utc_timestamp_ms":1}"#).unwrap();
        assert_eq!(bare, MetricsSample::default());
        assert!(parse_sample("{").is_err());
    }

    #[test]
    fn sums_deltas_across_flushes_and_waits_for_whole_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.json");
        let mut reader = MetricsReader::new(&path);
        assert_eq!(reader.read_new().unwrap().flushes, 0);
        let mut file = std::fs::File::create(&path).unwrap();
        writeln!(file, "{FLUSH}").unwrap();
        let (head, tail) = FLUSH.split_at(40);
        write!(file, "{head}").unwrap();
        let t = reader.read_new().unwrap().clone();
        assert_eq!(t.flushes, 1);
        assert_eq!(t.block.read_bytes, 4096);
        writeln!(file, "{tail}").unwrap();
        writeln!(file, "not json").unwrap();
        let t = reader.read_new().unwrap().clone();
        assert_eq!(t.flushes, 2);
        assert_eq!(t.block.read_bytes, 8192);
        assert_eq!(t.net.tx_bytes_count, 120);
        assert_eq!(t.vcpu.exit_io_out, 14);
        assert_eq!(reader.bad_lines(), 1);
        assert_eq!(reader.read_new().unwrap().flushes, 2);
    }

    /// Found by the `firecracker_metrics` fuzz target: two flushes whose
    /// counters sum past `u64::MAX`, or one whose exits do, panicked with
    /// "attempt to add with overflow" (and wrapped in a release build).
    #[test]
    fn huge_counters_saturate_instead_of_overflowing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.json");
        let huge = r#"{"block":{"read_bytes":18446744073709551615},"vcpu":{"exit_io_in":18446744073709551615,"exit_io_out":1}}"#;
        std::fs::write(&path, format!("{huge}\n{huge}\n")).unwrap();
        let mut reader = MetricsReader::new(&path);
        let t = reader.read_new().unwrap();
        assert_eq!(t.flushes, 2);
        assert_eq!(t.block.read_bytes, u64::MAX);
        assert_eq!(t.vcpu.exit_io_out, 2);
        assert_eq!(t.vcpu.exits(), u64::MAX);
        assert_eq!(parse_sample(huge).unwrap().vcpu.exits(), u64::MAX);
    }
}
