//! `nova bench`: benchmarks a user runs on their own host.
//!
//! `nova bench boot` boots N sandboxes one after another through
//! NovaSandbox and N times the same kernel, rootfs and command line through
//! QEMU by hand, interleaved so that both see the same machine load, and
//! prints p50 / p99 of each, NovaSandbox's boot breakdown, and the overhead
//! (NovaSandbox's p50 over the hand-driven p50).
//!
//! `nova bench start` creates N sandboxes each way, cold boot, restore
//! from a snapshot and a claim from a warm pool (of its own daemon, the one
//! `nova bench api` starts), interleaved, and prints p50 / p99 of each, the
//! phases of the first two, and each one's ratio to the cold boot; then it
//! keeps a number of idle sandboxes of each kind and reports
//! their VMMs' memory (RSS and PSS, from `/proc/PID/smaps_rollup`).
//!
//! `nova bench api` measures the daemon's HTTP API against the library
//! in-process: create -> first exec, exec round trips, concurrent execs and
//! warm pool claims ([`api`]).

mod api;
mod soak;

use std::time::{Duration, Instant};

use anyhow::Context;
#[cfg(target_os = "linux")]
use novasandbox::core::{Hypervisor, TemplateManager};
use novasandbox::core::{NovaHome, SandboxConfig};
#[cfg(target_os = "linux")]
use novasandbox::providers::{QemuHypervisor, QemuOptions};

/// `nova bench` subcommands.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum BenchCommand {
    /// Cold-boot latency: create -> ready through NovaSandbox vs QEMU by hand.
    Boot(BootArgs),
    /// Create latency, cold boot vs restore from a snapshot vs warm pool
    /// claim, and idle memory.
    Start(StartArgs),
    /// The seed's benchmark table: boot (cold and restored), config
    /// creation, pause, resume and stats against the seed's targets.
    Seed(SeedArgs),
    /// The daemon's API against the library in-process: create -> first
    /// exec, exec round trip, concurrent execs, warm pool claims.
    Api(api::ApiArgs),
    /// Create -> exec -> file write and read -> stop, many times, with a
    /// leak ledger (processes, directories, network objects, mounts, file
    /// descriptors, RSS) before, after warm-up and at the end.
    Soak(soak::SoakArgs),
}

/// Arguments of `nova bench seed`.
#[derive(Debug, clap::Args)]
pub(crate) struct SeedArgs {
    #[command(flatten)]
    guest: GuestArgs,
    /// Samples of each row (config creation takes 1000 times as many).
    #[arg(long, short = 'n', default_value_t = 10)]
    iterations: usize,
    /// Print the table as JSON instead.
    #[arg(long)]
    json: bool,
}

/// Arguments of `nova bench start`.
#[derive(Debug, clap::Args)]
pub(crate) struct StartArgs {
    #[command(flatten)]
    guest: GuestArgs,
    /// Creates of each kind.
    #[arg(long, short = 'n', default_value_t = 10)]
    iterations: usize,
    /// Idle sandboxes of each kind kept at once for the memory figures (0
    /// skips them).
    #[arg(long, default_value_t = 10)]
    idle: usize,
    /// Sandboxes the bench's own daemon keeps in its warm pool, whose
    /// claims are measured as a third way to start (0 skips them).
    #[arg(long, default_value_t = 2)]
    pool: usize,
}

/// The guest every `nova bench` measures.
#[derive(Debug, clap::Args)]
pub(crate) struct GuestArgs {
    /// Template to boot.
    #[arg(long, short = 't', default_value = "minimal")]
    template: String,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    memory: u32,
    /// vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
}

/// Arguments of `nova bench boot`.
#[derive(Debug, clap::Args)]
pub(crate) struct BootArgs {
    #[command(flatten)]
    guest: GuestArgs,
    /// Boots of each kind.
    #[arg(long, short = 'n', default_value_t = 10)]
    iterations: usize,
}

/// Runs `nova bench`.
pub(crate) async fn run(command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Boot(args) => boot(args).await,
        BenchCommand::Start(args) => start(args).await,
        BenchCommand::Seed(args) => seed(args).await,
        BenchCommand::Api(args) => api::run(args).await,
        BenchCommand::Soak(args) => soak::run(args).await,
    }
}

/// One row of the seed's table: what was measured, against which target.
struct SeedRow {
    name: &'static str,
    samples: Samples,
    target_ms: f64,
}

async fn seed(args: SeedArgs) -> anyhow::Result<()> {
    use novasandbox::core::{HypervisorKind, StartMode};
    anyhow::ensure!(args.iterations > 0, "--iterations must be at least 1");
    let home = NovaHome::resolve()?;
    let hypervisor = novasandbox::detect_in(home.clone())?;
    let kind = hypervisor.kind();
    let accel = match kind {
        HypervisorKind::Qemu => novasandbox::runtime::host::HostReport::probe()
            .qemu_accel()
            .to_string(),
        HypervisorKind::Firecracker => "kvm".to_owned(),
        HypervisorKind::AppleVz => "vz".to_owned(),
    };
    let emulated = accel == "tcg";
    // The seed's targets: boot under 150 ms (200 on Apple VZ), config
    // creation under 1 ms, pause and resume under 100 ms (150 on VZ),
    // stats under 50 ms.
    let vz = kind == HypervisorKind::AppleVz;
    let (boot_target, pause_target) = if vz { (200.0, 150.0) } else { (150.0, 100.0) };
    let build_config = |start: StartMode| {
        SandboxConfig::builder()
            .template_id(&args.guest.template)
            .memory_mb(args.guest.memory)
            .vcpus(args.guest.vcpus)
            .boot_timeout_ms(120_000)
            .enable_network(false)
            .start(start)
            .build()
    };

    let mut config_ms = Samples::default();
    for _ in 0..args.iterations * 1000 {
        let started = Instant::now();
        let built = build_config(StartMode::Auto);
        config_ms.push(started.elapsed());
        built?;
    }
    let cold = build_config(StartMode::Cold)?;
    let mut boot_cold = Samples::default();
    for _ in 0..args.iterations {
        let started = Instant::now();
        let sandbox = hypervisor.create_sandbox(cold.clone()).await?;
        boot_cold.push(started.elapsed());
        sandbox.stop(true).await?;
    }
    // Restored boots from a private snapshot, when the backend has them.
    let workdir = tempfile::Builder::new()
        .prefix("nova-bench-seed-")
        .tempdir_in(home.root())?;
    let snapshot = workdir.path().join("snapshot");
    let sandbox = hypervisor.create_sandbox(cold.clone()).await?;
    sandbox.pause().await?;
    let snapshotted = hypervisor.snapshot_sandbox(sandbox.id(), &snapshot).await;
    sandbox.resume().await?;
    let mut boot_restored = Samples::default();
    if snapshotted.is_ok() {
        for _ in 0..args.iterations {
            let started = Instant::now();
            let restored = hypervisor.create_sandbox_from_snapshot(&snapshot).await?;
            boot_restored.push(started.elapsed());
            restored.stop(true).await?;
        }
    }
    let (mut pause, mut resume, mut stats) =
        (Samples::default(), Samples::default(), Samples::default());
    for _ in 0..args.iterations {
        let started = Instant::now();
        sandbox.pause().await?;
        pause.push(started.elapsed());
        let started = Instant::now();
        sandbox.resume().await?;
        resume.push(started.elapsed());
        let started = Instant::now();
        sandbox.get_stats().await?;
        stats.push(started.elapsed());
    }
    sandbox.stop(true).await?;

    let rows = [
        SeedRow {
            name: "boot (cold)",
            samples: boot_cold,
            target_ms: boot_target,
        },
        SeedRow {
            name: "boot (from a snapshot)",
            samples: boot_restored,
            target_ms: boot_target,
        },
        SeedRow {
            name: "config creation",
            samples: config_ms,
            target_ms: 1.0,
        },
        SeedRow {
            name: "pause",
            samples: pause,
            target_ms: pause_target,
        },
        SeedRow {
            name: "resume",
            samples: resume,
            target_ms: pause_target,
        },
        SeedRow {
            name: "stats",
            samples: stats,
            target_ms: 50.0,
        },
    ];
    if args.json {
        let rows: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| {
                let measured = !r.samples.0.is_empty();
                serde_json::json!({
                    "name": r.name,
                    "samples": r.samples.0.len(),
                    "p50_ms": measured.then(|| r.samples.percentile(50.0)),
                    "p99_ms": measured.then(|| r.samples.percentile(99.0)),
                    "max_ms": measured.then(|| r.samples.percentile(100.0)),
                    "target_ms": r.target_ms,
                    "pass": measured.then(|| r.samples.percentile(50.0) < r.target_ms),
                })
            })
            .collect();
        let report = serde_json::json!({
            "backend": kind.to_string(),
            "accel": accel,
            "template": args.guest.template,
            "memory_mb": args.guest.memory,
            "vcpus": args.guest.vcpus,
            "rows": rows,
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "nova bench seed: {kind} backend, accel {accel}, template {}, {} MiB, {} vCPU, {} samples a row{}",
        args.guest.template,
        args.guest.memory,
        args.guest.vcpus,
        args.iterations,
        if emulated {
            " (TCG emulation: boots are expected to miss targets set for hardware KVM)"
        } else {
            ""
        }
    );
    println!(
        "{:<24} {:>10} {:>10} {:>10} {:>10}  verdict",
        "", "p50 ms", "p99 ms", "max ms", "target"
    );
    for r in &rows {
        if r.samples.0.is_empty() {
            println!(
                "{:<24} {:>43}  not measured (no snapshots here)",
                r.name, ""
            );
            continue;
        }
        let p50 = r.samples.percentile(50.0);
        let verdict = match (p50 < r.target_ms, emulated && r.name.starts_with("boot")) {
            (true, _) => "pass",
            (false, true) => "miss (expected under TCG)",
            (false, false) => "miss",
        };
        println!(
            "{:<24} {:>10.3} {:>10.3} {:>10.3} {:>7} ms  {verdict}",
            r.name,
            p50,
            r.samples.percentile(99.0),
            r.samples.percentile(100.0),
            format!("< {}", r.target_ms)
        );
    }
    Ok(())
}

async fn start(args: StartArgs) -> anyhow::Result<()> {
    use novasandbox::core::StartMode;
    anyhow::ensure!(args.iterations > 0, "--iterations must be at least 1");
    let home = NovaHome::resolve()?;
    let hypervisor = novasandbox::detect_in(home.clone())?;
    let config = SandboxConfig::builder()
        .template_id(&args.guest.template)
        .memory_mb(args.guest.memory)
        .vcpus(args.guest.vcpus)
        .boot_timeout_ms(120_000)
        .enable_network(false)
        .start(StartMode::Cold)
        .build()?;
    // A private snapshot, so the template's own is left alone.
    let workdir = tempfile::Builder::new()
        .prefix("nova-bench-start-")
        .tempdir_in(home.root())?;
    let snapshot = workdir.path().join("snapshot");
    let source = hypervisor.create_sandbox(config.clone()).await?;
    source.pause().await?;
    let saved = Instant::now();
    let taken = hypervisor.snapshot_sandbox(source.id(), &snapshot).await;
    let saved = saved.elapsed();
    source.stop(true).await?;
    taken.context("cannot take the snapshot to restore from")?;
    eprintln!(
        "nova bench start: {} backend, template {}, {} MiB, {} vCPU, {} creates each way \
         (interleaved); snapshot written in {:.1} ms",
        hypervisor.kind(),
        args.guest.template,
        args.guest.memory,
        args.guest.vcpus,
        args.iterations,
        ms(saved)
    );
    // The warm pool: the daemon `nova bench api` starts, in a private
    // $NOVA_HOME, keeping --pool sandboxes of the template; a claim is an
    // HTTP create it serves from the pool.
    let daemon = if args.pool > 0 {
        eprintln!(
            "nova bench start: starting a daemon with a warm pool of {}",
            args.pool
        );
        Some(api::OwnDaemon::start(&args.guest.template, args.pool).await?)
    } else {
        None
    };
    let rounds = start_rounds(&args, &hypervisor, &config, &snapshot, daemon.as_ref()).await;
    if let Some(daemon) = daemon {
        daemon.shutdown().await;
    }
    let rounds = rounds?;
    println!("{:<44} {:>10} {:>10}", "", "p50 ms", "p99 ms");
    for (name, s) in [
        ("cold boot: create_sandbox() call", &rounds.cold.call),
        ("  spawn -> agent ready", &rounds.cold.ready),
        ("    spawn -> QMP answers", &rounds.cold.spawn),
        ("    guest start -> agent ready", &rounds.cold.guest),
        (
            "restore: create_sandbox_from_snapshot()",
            &rounds.restored.call,
        ),
        ("  spawn -> agent ready", &rounds.restored.ready),
        ("    spawn -> QMP answers", &rounds.restored.spawn),
        ("    load the state, resume", &rounds.restored.configure),
        (
            "    resume -> agent ready (+ refresh)",
            &rounds.restored.guest,
        ),
        ("warm pool: claim (HTTP create)", &rounds.claim),
    ] {
        if s.0.is_empty() {
            continue;
        }
        println!(
            "{name:<44} {:>10.1} {:>10.1}",
            s.percentile(50.0),
            s.percentile(99.0)
        );
    }
    let cold_p50 = rounds.cold.call.percentile(50.0);
    for (name, s) in [
        ("restore", &rounds.restored.call),
        ("warm pool claim", &rounds.claim),
    ] {
        if s.0.is_empty() {
            continue;
        }
        println!(
            "{name} / cold boot at p50: {:.3} (1/{:.1})",
            s.percentile(50.0) / cold_p50,
            cold_p50 / s.percentile(50.0)
        );
    }
    if rounds.not_from_pool > 0 {
        println!(
            "note: {} of the pool creates were not served from the pool",
            rounds.not_from_pool
        );
    }
    if args.idle > 0 {
        let mut kept = Vec::new();
        let mut figures = Vec::new();
        for restore in [false, true] {
            let mut pids = Vec::new();
            for _ in 0..args.idle {
                let sandbox = if restore {
                    hypervisor.create_sandbox_from_snapshot(&snapshot).await?
                } else {
                    hypervisor.create_sandbox(config.clone()).await?
                };
                pids.extend(sandbox.info().vmm_pid);
                kept.push(sandbox);
            }
            // Let the guests settle into idleness.
            tokio::time::sleep(Duration::from_secs(2)).await;
            let (rss, pss) = pids
                .iter()
                .filter_map(|pid| memory_kib(*pid))
                .fold((0u64, 0u64), |(r, p), (r2, p2)| (r + r2, p + p2));
            figures.push((restore, pids.len(), rss, pss));
        }
        for sandbox in kept {
            sandbox.stop(true).await?;
        }
        for (restore, n, rss, pss) in figures {
            println!(
                "{:<10} {n} idle sandboxes: VMM RSS {:.1} MiB in all ({:.1} each), PSS {:.1} MiB in all ({:.1} each)",
                if restore { "restored:" } else { "cold:" },
                rss as f64 / 1024.0,
                rss as f64 / 1024.0 / n.max(1) as f64,
                pss as f64 / 1024.0,
                pss as f64 / 1024.0 / n.max(1) as f64,
            );
        }
    }
    Ok(())
}

/// The phases of one way of starting, in milliseconds (see
/// [`novasandbox::core::BootTimings`]).
#[derive(Default)]
struct StartSamples {
    /// The whole create call.
    call: Samples,
    /// VMM spawn -> agent ready.
    ready: Samples,
    /// VMM spawn -> control socket answers.
    spawn: Samples,
    /// Configuring the VMM (for a restore: loading the state, resuming).
    configure: Samples,
    /// Guest start -> agent ready.
    guest: Samples,
}

impl StartSamples {
    fn push(&mut self, call: Duration, sandbox: &novasandbox::core::Sandbox) {
        self.call.push(call);
        let boot = sandbox.info().boot.clone().unwrap_or_default();
        self.ready.push_ms(boot.boot_time_ms);
        self.spawn.push_ms(boot.spawn_ms);
        self.configure.push_ms(boot.configure_ms);
        self.guest.push_ms(boot.guest_ms);
    }
}

/// What the rounds of `nova bench start` measured.
#[derive(Default)]
struct StartRounds {
    cold: StartSamples,
    restored: StartSamples,
    claim: Samples,
    not_from_pool: usize,
}

/// Runs `args.iterations` rounds, each a cold create, a restore from
/// `snapshot` and, with `daemon`, a warm pool claim from it, one after the
/// other, each sandbox removed before the next start. The pool is full
/// before each claim and before each cold create, so no refill boots
/// while something is measured.
async fn start_rounds(
    args: &StartArgs,
    hypervisor: &std::sync::Arc<dyn novasandbox::core::Hypervisor>,
    config: &SandboxConfig,
    snapshot: &std::path::Path,
    daemon: Option<&api::OwnDaemon>,
) -> anyhow::Result<StartRounds> {
    use nova_server::api::sandboxes::CreateSandboxRequest;
    let mut rounds = StartRounds::default();
    let client = daemon.map(|d| crate::client::Client::unix(&d.socket));
    // What the pool's sandboxes are made with: the template and the
    // policy's defaults.
    let pooled = CreateSandboxRequest {
        template: Some(args.guest.template.clone()),
        ..CreateSandboxRequest::default()
    };
    for i in 0..args.iterations {
        if let Some(client) = &client {
            api::pool_filled(client, args.pool).await?;
        }
        let started = Instant::now();
        let sandbox = hypervisor.create_sandbox(config.clone()).await?;
        rounds.cold.push(started.elapsed(), &sandbox);
        sandbox.stop(true).await?;
        let started = Instant::now();
        let sandbox = hypervisor.create_sandbox_from_snapshot(snapshot).await?;
        rounds.restored.push(started.elapsed(), &sandbox);
        sandbox.stop(true).await?;
        let mut line = format!(
            "  round {:>3}: cold {:>8.1} ms   restore {:>8.1} ms",
            i + 1,
            rounds.cold.call.0[i],
            rounds.restored.call.0[i]
        );
        if let Some(client) = &client {
            api::pool_filled(client, args.pool).await?;
            let started = Instant::now();
            let view = client.create(&pooled).await?;
            rounds.claim.push(started.elapsed());
            rounds.not_from_pool += usize::from(!view.from_pool);
            client.delete(&view.id, true).await?;
            line.push_str(&format!("   pool claim {:>8.1} ms", rounds.claim.0[i]));
        }
        eprintln!("{line}");
    }
    Ok(rounds)
}

/// A process's resident and proportional set sizes in KiB, from
/// `/proc/PID/smaps_rollup`.
fn memory_kib(pid: u32) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((field("Rss:")?, field("Pss:")?))
}

/// Off Linux there is no QEMU run by hand to compare with.
#[cfg(not(target_os = "linux"))]
async fn boot(args: BootArgs) -> anyhow::Result<()> {
    let _ = args;
    anyhow::bail!(
        "nova bench boot compares with QEMU run by hand, which is Linux's; use `nova bench start` \
         or `nova bench seed` here"
    )
}

#[cfg(target_os = "linux")]
async fn boot(args: BootArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.iterations > 0, "--iterations must be at least 1");
    let options = QemuOptions::detect()?;
    let home = options.home.clone();
    let template = TemplateManager::new(home.templates_dir()).load(&args.guest.template)?;
    let config = SandboxConfig::builder()
        .template_id(&args.guest.template)
        .memory_mb(args.guest.memory)
        .vcpus(args.guest.vcpus)
        .boot_timeout_ms(120_000)
        .enable_network(false)
        // A cold boot, even when the template has a snapshot that fits.
        .start(novasandbox::core::StartMode::Cold)
        .build()?;
    let hypervisor = QemuHypervisor::new(options.clone());
    let workdir = tempfile::Builder::new()
        .prefix("nova-bench-")
        .tempdir_in(bench_tmp(&home))?;

    eprintln!(
        "nova bench boot: template {}, {} MiB, {} vCPU, accel {}, {} boots each (interleaved)",
        args.guest.template, args.guest.memory, args.guest.vcpus, options.accel, args.iterations
    );
    let mut nova = Samples::default();
    let mut create = Samples::default();
    let mut spawn = Samples::default();
    let mut guest = Samples::default();
    let mut prepare = Samples::default();
    let mut raw = Samples::default();
    for i in 0..args.iterations {
        let started = Instant::now();
        let sandbox = hypervisor
            .create_sandbox(config.clone())
            .await
            .context("NovaSandbox boot failed")?;
        create.push(started.elapsed());
        let b = sandbox
            .info()
            .boot
            .clone()
            .context("a ready sandbox has boot timings")?;
        nova.push_ms(b.boot_time_ms);
        spawn.push_ms(b.spawn_ms);
        guest.push_ms(b.guest_ms);
        prepare.push_ms(b.prepare_ms);
        sandbox.stop(true).await?;

        let r = novasandbox::providers::raw_boot(&options, &template, &config, workdir.path())
            .await
            .map_err(|e| anyhow::anyhow!("raw QEMU boot failed: {e}"))?;
        raw.push(r);
        eprintln!(
            "  boot {:>3}: nova {:>8.1} ms   raw qemu {:>8.1} ms",
            i + 1,
            b.boot_time_ms,
            ms(r)
        );
    }
    println!("{:<36} {:>10} {:>10}", "", "p50 ms", "p99 ms");
    for (name, s) in [
        ("nova: spawn -> agent ready", &nova),
        ("  spawn -> QMP ready", &spawn),
        ("  QMP ready -> agent ready", &guest),
        ("  prepare (dir, scratch disk)", &prepare),
        ("nova: create_sandbox() call", &create),
        ("raw qemu: spawn -> agent ready", &raw),
    ] {
        println!(
            "{name:<36} {:>10.1} {:>10.1}",
            s.percentile(50.0),
            s.percentile(99.0)
        );
    }
    let overhead = nova.percentile(50.0) / raw.percentile(50.0) - 1.0;
    println!(
        "overhead (p50 nova / p50 raw - 1): {:+.1}%",
        overhead * 100.0
    );
    Ok(())
}

/// A short directory for the hand-driven boots' sockets.
#[cfg(target_os = "linux")]
fn bench_tmp(home: &NovaHome) -> std::path::PathBuf {
    let tmp = std::env::temp_dir();
    if tmp.as_os_str().len() < 40 {
        tmp
    } else {
        home.root().to_owned()
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[derive(Debug, Default)]
struct Samples(Vec<f64>);

impl Samples {
    fn push(&mut self, d: Duration) {
        self.0.push(ms(d));
    }

    fn push_ms(&mut self, v: f64) {
        self.0.push(v);
    }

    /// Nearest-rank percentile.
    fn percentile(&self, p: f64) -> f64 {
        let mut v = self.0.clone();
        v.sort_by(f64::total_cmp);
        if v.is_empty() {
            return f64::NAN;
        }
        let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
        v[rank.clamp(1, v.len()) - 1]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let s = Samples((1..=100).map(f64::from).collect());
        assert_eq!(s.percentile(50.0), 50.0);
        assert_eq!(s.percentile(99.0), 99.0);
        assert_eq!(s.percentile(100.0), 100.0);
        let one = Samples(vec![7.0]);
        assert_eq!(one.percentile(50.0), 7.0);
        assert_eq!(one.percentile(99.0), 7.0);
        assert!(Samples::default().percentile(50.0).is_nan());
    }
}
