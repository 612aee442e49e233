//! Firecracker's metrics file (`--metrics-path`, one JSON object per
//! flush), read by `nova_firecracker::stats::MetricsReader` as a sandbox's
//! `get_stats` does: the input is written in two appends with a read after
//! each, so a line cut at the append is seen whole only the second time.
//! The counters are the VMM's, but several of them (bytes, packets, exits)
//! are driven by the guest.
//!
//! Properties: nothing panics (sums of counters included).
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use nova_firecracker::stats::MetricsReader;

fuzz_target!(|data: &[u8]| {
    let path = common::scratch().join("metrics.json");
    let half = data.len() / 2;
    std::fs::write(&path, &data[..half]).expect("write the metrics file");
    let mut reader = MetricsReader::new(&path);
    let _ = reader.read_new().map(|t| t.vcpu.exits());
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .expect("open the metrics file");
    std::io::Write::write_all(&mut file, &data[half..]).expect("append to the metrics file");
    let _ = reader.read_new().map(|t| t.vcpu.exits());
    let _ = reader.bad_lines();
});
