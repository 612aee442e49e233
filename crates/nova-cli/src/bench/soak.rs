//! `nova bench soak`: create -> exec -> file write and read -> stop, many
//! times over, with a leak ledger taken before the first cycle, after the
//! warm-up and after the last.
//!
//! The cycles run through a daemon's HTTP API when one runs on
//! `$NOVA_HOME/nova.sock` (or, with `--daemon`, through a `nova serve` this
//! bench starts in a private `$NOVA_HOME` when none runs), in-process
//! through the library otherwise (or with `--in-process`).
//!
//! The ledger counts what a sandbox makes and must give back: VMM processes
//! whose command line names the sandboxes directory, sandbox directories
//! (their sockets and disks inside), network namespaces, host links and
//! nftables tables named with nova-net's prefix, and the mounts, open file
//! descriptors and resident set of the process that owns the sandboxes (the
//! daemon, read from `/proc/<its pid>`, or this process). Any count higher
//! at the end than before is a leak and fails the command; the
//! resident set is reported (after warm-up vs the end, target within 10 %),
//! not judged, since the allocator may keep what it was given.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use http_body_util::BodyExt;
use nova_server::api::exec::ExecBody;
use nova_server::api::sandboxes::CreateSandboxRequest;
use novasandbox::core::{ExecRequest, Hypervisor, NovaHome, SandboxConfig};
use serde::Serialize;

use super::api::OwnDaemon;
use crate::client::{Client, full};

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
    /// Run the cycles through a daemon: the one on `$NOVA_HOME/nova.sock`
    /// when it runs, else a `nova serve` started for the run in a private
    /// `$NOVA_HOME` (the templates linked), stopped at the end.
    #[arg(long, conflicts_with = "in_process")]
    daemon: bool,
    /// Run the cycles in this process even when a daemon runs.
    #[arg(long)]
    in_process: bool,
    /// Print the ledger as JSON.
    #[arg(long)]
    json: bool,
}

/// Where the cycles run.
enum Driver {
    /// In this process, through the library.
    InProcess(Arc<dyn Hypervisor>),
    /// Through the HTTP API of the daemon with this pid.
    Daemon { client: Client, pid: u32 },
}

impl Driver {
    /// The process whose descriptors, mounts and resident set the ledger
    /// reads.
    fn proc_dir(&self) -> PathBuf {
        match self {
            Self::InProcess(_) => PathBuf::from("/proc/self"),
            Self::Daemon { pid, .. } => PathBuf::from(format!("/proc/{pid}")),
        }
    }

    fn describe(&self) -> String {
        match self {
            Self::InProcess(_) => "in-process".to_owned(),
            Self::Daemon { pid, .. } => format!("through the daemon (pid {pid})"),
        }
    }
}

/// The pid of the daemon answering on the Unix socket `socket`, from the
/// socket's peer credentials; `None` when no daemon answers there.
async fn daemon_pid(socket: &Path) -> Option<u32> {
    let stream = tokio::net::UnixStream::connect(socket).await.ok()?;
    let pid = stream.peer_cred().ok()?.pid()?;
    let pid = u32::try_from(pid).ok()?;
    Client::unix(socket).health().await.ok()?;
    Some(pid)
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
    /// The ledger of the sandboxes under `home`, owned by the process whose
    /// `/proc` directory is `proc_dir`.
    fn take(home: &NovaHome, proc_dir: &Path) -> Self {
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
            mounts: std::fs::read_to_string(proc_dir.join("mountinfo"))
                .map_or(0, |t| t.lines().count()),
            fds: count_dir(&proc_dir.join("fd"), |_| true),
            rss_kib: rss_kib(proc_dir),
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

    /// The counts that grew from `self` (before) to `after`. One that
    /// shrank is no leak: a daemon just started may still hold descriptors
    /// of its start-up when the first ledger is taken.
    fn leaks(&self, after: &Self) -> Vec<String> {
        self.counts()
            .iter()
            .zip(after.counts())
            .filter(|((_, a), (_, b))| b > a)
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

fn rss_kib(proc_dir: &Path) -> u64 {
    std::fs::read_to_string(proc_dir.join("status"))
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
    /// `in-process`, or `through the daemon (pid N)`.
    driver: String,
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
    let socket = home.root().join(nova_server::SOCKET_FILE);
    let running = if args.in_process {
        None
    } else {
        daemon_pid(&socket).await
    };
    let mut own = None;
    let (driver, home) = match running {
        Some(pid) => (
            Driver::Daemon {
                client: Client::unix(&socket),
                pid,
            },
            home,
        ),
        None if args.daemon => {
            eprintln!("soak: no daemon on {}; starting one", socket.display());
            let daemon = OwnDaemon::start_with("nova-soak-", "").await?;
            let pid = daemon
                .pid()
                .context("the daemon started for the soak exited")?;
            let driver = Driver::Daemon {
                client: Client::unix(&daemon.socket),
                pid,
            };
            let home = daemon.home();
            own = Some(daemon);
            (driver, home)
        }
        None => (
            Driver::InProcess(novasandbox::detect_in(home.clone())?),
            home,
        ),
    };
    // Interrupted (Ctrl-C, SIGTERM), the daemon this run started is still
    // stopped, with its sandboxes.
    let result = tokio::select! {
        result = soak(&args, &driver, &home) => result,
        () = crate::signals::terminate_or_interrupt() => {
            Err(anyhow::anyhow!("interrupted; the ledger was not completed"))
        }
    };
    if let Some(daemon) = own {
        daemon.shutdown().await;
    }
    let report = result?;
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

/// The cycles, and the ledger around them.
async fn soak(args: &SoakArgs, driver: &Driver, home: &NovaHome) -> anyhow::Result<Report> {
    let config = SandboxConfig::builder()
        .template_id(args.template.clone())
        .memory_mb(args.memory)
        .vcpus(args.vcpus)
        .enable_network(!args.no_network)
        .boot_timeout_ms(60_000)
        .build()?;
    let request = CreateSandboxRequest {
        template: Some(args.template.clone()),
        memory_mb: Some(args.memory),
        vcpus: Some(args.vcpus),
        network: Some(!args.no_network),
        ..CreateSandboxRequest::default()
    };
    let warmup = (args.cycles / 10).max(1);
    let payload: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
    let proc_dir = driver.proc_dir();
    if !args.json {
        eprintln!("soak: {} cycles {}", args.cycles, driver.describe());
    }
    let before = Ledger::take(home, &proc_dir);
    let mut after_warmup = before;
    let started = Instant::now();
    for cycle in 1..=args.cycles {
        match driver {
            Driver::InProcess(hypervisor) => {
                in_process_cycle(hypervisor.as_ref(), config.clone(), &payload).await
            }
            Driver::Daemon { client, .. } => daemon_cycle(client, &request, &payload).await,
        }
        .with_context(|| format!("cycle {cycle}"))?;
        if cycle == warmup {
            after_warmup = Ledger::take(home, &proc_dir);
        }
        if !args.json && cycle % 10 == 0 {
            eprintln!("soak: {cycle}/{} cycles", args.cycles);
        }
    }
    // A stopped VMM's process may take a moment to be reaped.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut after = Ledger::take(home, &proc_dir);
    while !before.leaks(&after).is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        after = Ledger::take(home, &proc_dir);
    }
    Ok(Report {
        driver: driver.describe(),
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
    })
}

/// One cycle through the library; the sandbox is stopped whatever failed.
async fn in_process_cycle(
    hypervisor: &dyn Hypervisor,
    config: SandboxConfig,
    payload: &[u8],
) -> anyhow::Result<()> {
    let sandbox = hypervisor.create_sandbox(config).await.context("create")?;
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
            .write_file("/tmp/soak", payload.to_vec(), 0o644)
            .await?;
        let back = sandbox.read_file("/tmp/soak").await?;
        anyhow::ensure!(back == payload, "the file read back differs");
        Ok(())
    }
    .await;
    sandbox.stop(true).await.context("stop")?;
    result
}

/// One cycle through the daemon's API; the sandbox is deleted whatever
/// failed.
async fn daemon_cycle(
    client: &Client,
    request: &CreateSandboxRequest,
    payload: &[u8],
) -> anyhow::Result<()> {
    let view = client.create(request).await.context("create")?;
    let result = async {
        let out = client
            .exec(
                &view.id,
                &ExecBody {
                    shell: Some("echo ok".into()),
                    ..ExecBody::default()
                },
            )
            .await?;
        anyhow::ensure!(out.stdout == "ok\n", "exec answered {:?}", out.stdout);
        client
            .upload(
                &view.id,
                "/tmp/soak",
                Some(0o644),
                Some(payload.len() as u64),
                full(payload.to_vec()),
            )
            .await?;
        let back = client
            .download(&view.id, "/tmp/soak")
            .await?
            .into_body()
            .collect()
            .await?
            .to_bytes();
        anyhow::ensure!(back == payload, "the file read back differs");
        Ok(())
    }
    .await;
    client.delete(&view.id, true).await.context("stop")?;
    result
}

fn print_report(r: &Report) {
    println!(
        "soak: {} cycles (create -> exec -> 4 KiB write + read -> stop) {} in {:.1} s",
        r.cycles, r.driver, r.seconds
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
    fn a_ledger_names_every_count_that_grew() {
        let before = Ledger {
            vmm_processes: 0,
            netns: 2,
            mounts: 20,
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
        // Fewer is no leak.
        after.mounts = 19;
        assert_eq!(
            before.leaks(&after),
            vec![
                "network namespaces: 2 before, 3 after".to_owned(),
                "file descriptors: 10 before, 11 after".to_owned()
            ]
        );
    }
}
