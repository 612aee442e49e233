//! `nova bench soak`: create -> exec -> file write and read -> stop, many
//! times over, in-process, with a leak ledger taken before the first cycle,
//! after the warm-up and after the last.
//!
//! The ledger counts what a sandbox makes and must give back: VMM processes
//! whose command line names this `$NOVA_HOME`, sandbox directories (their
//! sockets and disks inside), network namespaces, host links and nftables
//! tables named with nova-net's prefix, and this process's mounts, open file
//! descriptors and resident set. Any count that differs at the end from
//! before is a leak and fails the command; the resident set is reported
//! (after warm-up vs the end, target within 10 %), not judged, since the
//! allocator may keep what it was given.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use novasandbox::core::{ExecRequest, NovaHome, SandboxConfig};
use serde::Serialize;

/// Arguments of `nova bench soak`.
#[derive(Debug, clap::Args)]
pub(crate) struct SoakArgs {
    /// Cycles to run.
    #[arg(long, short = 'n', default_value_t = 100)]
    cycles: usize,
    /// Template to boot.
    #[arg(long, short = 't', default_value = "minimal")]
    template: String,
    /// Guest memory in MiB (the default is what the template snapshots are
    /// taken with, so each create restores).
    #[arg(long, default_value_t = 512)]
    memory: u32,
    /// vCPUs.
    #[arg(long, default_value_t = 2)]
    vcpus: u8,
    /// Give each sandbox no network (the ledger then has no network objects
    /// to watch).
    #[arg(long)]
    no_network: bool,
    /// Print the ledger as JSON.
    #[arg(long)]
    json: bool,
}

/// What the host holds that a sandbox could leak, at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
struct Ledger {
    vmm_processes: usize,
    sandbox_dirs: usize,
    netns: usize,
    links: usize,
    nft_tables: usize,
    mounts: usize,
    fds: usize,
    rss_kib: u64,
}

impl Ledger {
    fn take(home: &NovaHome) -> Self {
        let sandboxes = home.sandboxes_dir();
        Self {
            vmm_processes: processes_naming(&sandboxes),
            sandbox_dirs: count_dir(&sandboxes, |_| true),
            netns: count_dir(Path::new("/run/netns"), |n| n.starts_with("nova-")),
            // Host veth ends are `nova` + 11 hex digits (nova-net's
            // `host_veth_name`), not `nova-...`.
            links: count_dir(Path::new("/sys/class/net"), |n| {
                n.strip_prefix("nova").is_some_and(|hex| {
                    hex.len() == 11 && hex.bytes().all(|b| b.is_ascii_hexdigit())
                })
            }),
            nft_tables: nft_tables(),
            mounts: std::fs::read_to_string("/proc/self/mountinfo")
                .map_or(0, |t| t.lines().count()),
            fds: count_dir(Path::new("/proc/self/fd"), |_| true),
            rss_kib: rss_kib(),
        }
    }

    /// The counts a leak shows in, by name (the resident set is not one of
    /// them: it is reported, not judged).
    fn counts(&self) -> [(&'static str, u64); 7] {
        [
            ("VMM processes", self.vmm_processes as u64),
            ("sandbox directories", self.sandbox_dirs as u64),
            ("network namespaces", self.netns as u64),
            ("host links", self.links as u64),
            ("nftables tables", self.nft_tables as u64),
            ("mounts", self.mounts as u64),
            ("file descriptors", self.fds as u64),
        ]
    }

    /// The counts that differ between `self` (before) and `after`.
    fn leaks(&self, after: &Self) -> Vec<String> {
        self.counts()
            .iter()
            .zip(after.counts())
            .filter(|((_, a), (_, b))| a != b)
            .map(|((what, a), (_, b))| format!("{what}: {a} before, {b} after"))
            .collect()
    }
}

fn count_dir(dir: &Path, keep: impl Fn(&str) -> bool) -> usize {
    std::fs::read_dir(dir).map_or(0, |entries| {
        entries
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_str().is_some_and(&keep))
            .count()
    })
}

fn processes_naming(dir: &Path) -> usize {
    let needle = dir.to_string_lossy().into_owned();
    std::fs::read_dir("/proc").map_or(0, |entries| {
        entries
            .filter_map(Result::ok)
            .filter(|e| {
                e.file_name()
                    .to_str()
                    .is_some_and(|n| n.parse::<u32>().is_ok())
            })
            .filter(|e| {
                std::fs::read(e.path().join("cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&needle))
            })
            .count()
    })
}

fn nft_tables() -> usize {
    std::process::Command::new("nft")
        .args(["list", "tables"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map_or(0, |o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter(|l| l.contains("nova-"))
                .count()
        })
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

#[derive(Debug, Serialize)]
struct Report {
    cycles: usize,
    seconds: f64,
    before: Ledger,
    after_warmup: Ledger,
    after: Ledger,
    leaks: Vec<String>,
    rss_growth_after_warmup_pct: f64,
}

/// Runs `nova bench soak`.
pub(crate) async fn run(args: SoakArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.cycles > 0, "--cycles must be at least 1");
    let home = NovaHome::resolve()?;
    let hypervisor = novasandbox::detect_in(home.clone())?;
    let config = SandboxConfig::builder()
        .template_id(args.template.clone())
        .memory_mb(args.memory)
        .vcpus(args.vcpus)
        .enable_network(!args.no_network)
        .boot_timeout_ms(60_000)
        .build()?;
    let warmup = (args.cycles / 10).max(1);
    let payload: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
    let before = Ledger::take(&home);
    let mut after_warmup = before;
    let started = Instant::now();
    for cycle in 1..=args.cycles {
        let sandbox = hypervisor
            .create_sandbox(config.clone())
            .await
            .with_context(|| format!("cycle {cycle}: create"))?;
        let result = async {
            let out = sandbox
                .execute_command(ExecRequest::shell("echo ok"))
                .await?;
            anyhow::ensure!(
                out.stdout_lossy() == "ok\n",
                "exec answered {:?}",
                out.stdout_lossy()
            );
            sandbox
                .write_file("/tmp/soak", payload.clone(), 0o644)
                .await?;
            let back = sandbox.read_file("/tmp/soak").await?;
            anyhow::ensure!(back == payload, "the file read back differs");
            Ok(())
        }
        .await;
        sandbox
            .stop(true)
            .await
            .with_context(|| format!("cycle {cycle}: stop"))?;
        result.with_context(|| format!("cycle {cycle}"))?;
        if cycle == warmup {
            after_warmup = Ledger::take(&home);
        }
        if !args.json && cycle % 10 == 0 {
            eprintln!("soak: {cycle}/{} cycles", args.cycles);
        }
    }
    // A stopped VMM's process may take a moment to be reaped.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut after = Ledger::take(&home);
    while !before.leaks(&after).is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        after = Ledger::take(&home);
    }
    let report = Report {
        cycles: args.cycles,
        seconds: started.elapsed().as_secs_f64(),
        leaks: before.leaks(&after),
        rss_growth_after_warmup_pct: if after_warmup.rss_kib == 0 {
            0.0
        } else {
            (after.rss_kib as f64 / after_warmup.rss_kib as f64 - 1.0) * 100.0
        },
        before,
        after_warmup,
        after,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    anyhow::ensure!(
        report.leaks.is_empty(),
        "leaks after {} cycles: {}",
        report.cycles,
        report.leaks.join("; ")
    );
    Ok(())
}

fn print_report(r: &Report) {
    println!(
        "soak: {} cycles (create -> exec -> 4 KiB write + read -> stop) in {:.1} s",
        r.cycles, r.seconds
    );
    println!(
        "{:<22} {:>10} {:>14} {:>10}",
        "", "before", "after warm-up", "after"
    );
    let rows = r
        .before
        .counts()
        .into_iter()
        .zip(r.after_warmup.counts())
        .zip(r.after.counts())
        .map(|(((name, a), (_, b)), (_, c))| (name, a, b, c))
        .chain([(
            "RSS (KiB)",
            r.before.rss_kib,
            r.after_warmup.rss_kib,
            r.after.rss_kib,
        )]);
    for (name, a, b, c) in rows {
        println!("{name:<22} {a:>10} {b:>14} {c:>10}");
    }
    println!(
        "RSS after warm-up to the end: {:+.1} % (target within 10 %); leaks: {}",
        r.rss_growth_after_warmup_pct,
        if r.leaks.is_empty() {
            "none".to_owned()
        } else {
            r.leaks.join("; ")
        }
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ledger_names_every_count_that_moved() {
        let before = Ledger {
            vmm_processes: 0,
            netns: 2,
            fds: 10,
            rss_kib: 100,
            ..Ledger::default()
        };
        let mut after = before;
        after.rss_kib = 900;
        assert!(
            before.leaks(&after).is_empty(),
            "RSS is reported, not a leak"
        );
        after.netns = 3;
        after.fds = 11;
        assert_eq!(
            before.leaks(&after),
            vec![
                "network namespaces: 2 before, 3 after".to_owned(),
                "file descriptors: 10 before, 11 after".to_owned()
            ]
        );
    }
}
