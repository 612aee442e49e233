//! `nova bench api`: what the daemon's HTTP API costs over calling the
//! library in-process, on the same host, in one run.
//!
//! ```text
//! own daemon (nova serve, private $NOVA_HOME, policy: no network, pool = 2)
//!   | or --socket PATH: a running daemon
//! 1. create -> first exec `true`   API (POST create + POST exec) vs library
//!                                  (create_sandbox + execute_command), -n each,
//!                                  interleaved; overhead = p50 API - p50 library
//! 2. exec `true` round trip        --execs each way on one sandbox
//! 3. concurrent execs              --concurrent execs at once over --sandboxes
//!                                  sandboxes: throughput, p50/p99
//! 4. warm pool                     a create that claims from the pool vs one
//!                                  that cold boots (own daemon only)
//! ```
//!
//! The library side runs in a second private `$NOVA_HOME` (sharing the
//! built templates), so it never touches the daemon's sandboxes. Figures are
//! reported, never asserted: a bench has no pass/fail beyond the targets it
//! names.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::future::join_all;
use nova_server::api::exec::ExecBody;
use nova_server::api::sandboxes::{CreateSandboxRequest, SandboxView, StartModeView};
use novasandbox::core::{ExecRequest, NovaHome, SandboxConfig};

use super::{GuestArgs, Samples};
use crate::client::Client;

/// Arguments of `nova bench api`.
#[derive(Debug, clap::Args)]
pub(crate) struct ApiArgs {
    #[command(flatten)]
    guest: GuestArgs,
    /// Creates (each followed by a first exec) each way.
    #[arg(long, short = 'n', default_value_t = 5)]
    iterations: usize,
    /// Exec round trips each way.
    #[arg(long, default_value_t = 50)]
    execs: usize,
    /// Execs run at once in the concurrency row.
    #[arg(long, default_value_t = 100)]
    concurrent: usize,
    /// Sandboxes the concurrent execs are spread over.
    #[arg(long, default_value_t = 10)]
    sandboxes: usize,
    /// Sandboxes the own daemon keeps in its warm pool (0 skips the pool
    /// row).
    #[arg(long, default_value_t = 2)]
    pool: usize,
    /// Measure a running daemon on this socket instead of starting one (the
    /// pool row then needs that daemon's pool of the template).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Print the report as JSON instead.
    #[arg(long)]
    json: bool,
}

/// Generous bound on a daemon starting or a pool filling (TCG boots on a
/// loaded machine): a guard against a hang, not a timing.
const WAIT_LIMIT: Duration = Duration::from_secs(180);

/// A `nova serve` this bench started, in its own `$NOVA_HOME`; stopped
/// (its sandboxes first) by [`OwnDaemon::shutdown`], killed on drop.
#[derive(Debug)]
pub(super) struct OwnDaemon {
    child: tokio::process::Child,
    home: tempfile::TempDir,
    pub(super) socket: PathBuf,
}

/// A private `$NOVA_HOME` under /tmp (short socket paths) whose templates
/// are the user's.
fn private_home(prefix: &str) -> anyhow::Result<tempfile::TempDir> {
    let templates = NovaHome::resolve()?.templates_dir();
    let home = tempfile::Builder::new().prefix(prefix).tempdir_in("/tmp")?;
    std::os::unix::fs::symlink(&templates, home.path().join("templates"))
        .with_context(|| format!("cannot link {} into the bench's home", templates.display()))?;
    Ok(home)
}

impl OwnDaemon {
    /// A daemon whose policy gives no network and keeps `pool` sandboxes of
    /// `template` warm (none with 0).
    pub(super) async fn start(template: &str, pool: usize) -> anyhow::Result<Self> {
        let mut policy = String::from("[network]\ndefault = false\n");
        if pool > 0 {
            policy.push_str(&format!("\n[pool]\n{template} = {pool}\n"));
        }
        Self::start_with("nova-bench-api-", &policy).await
    }

    /// A daemon in a private `$NOVA_HOME` (named with `prefix`) whose
    /// `policy.toml` is `policy`, once it answers `/v1/health`.
    pub(super) async fn start_with(prefix: &str, policy: &str) -> anyhow::Result<Self> {
        let home = private_home(prefix)?;
        std::fs::write(home.path().join(nova_server::POLICY_FILE), policy)?;
        let log = std::fs::File::create(home.path().join("serve.log"))?;
        let exe = std::env::current_exe().context("cannot find the nova binary to run")?;
        let child = tokio::process::Command::new(exe)
            .arg("serve")
            .env("NOVA_HOME", home.path())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("cannot start nova serve")?;
        let socket = home.path().join(nova_server::SOCKET_FILE);
        let mut daemon = Self {
            child,
            home,
            socket,
        };
        let client = Client::unix(&daemon.socket);
        let started = Instant::now();
        loop {
            if client.health().await.is_ok() {
                return Ok(daemon);
            }
            if let Some(status) = daemon.child.try_wait()? {
                bail!(
                    "nova serve exited ({status}) before it answered: {}",
                    daemon.log_tail()
                );
            }
            if started.elapsed() > WAIT_LIMIT {
                bail!("nova serve did not answer within {WAIT_LIMIT:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The daemon's pid, while it runs.
    pub(super) fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Its `$NOVA_HOME`.
    pub(super) fn home(&self) -> NovaHome {
        NovaHome::at(self.home.path())
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.home.path().join("serve.log")).unwrap_or_default();
        let start = text.len().saturating_sub(2000);
        text.get(start..).unwrap_or_default().trim().to_owned()
    }

    /// Removes every sandbox, then stops the daemon (SIGTERM; it drains its
    /// pool), bounded; kills it past the bound.
    pub(super) async fn shutdown(mut self) {
        let client = Client::unix(&self.socket);
        if let Ok(views) = client.list(None).await {
            for v in views {
                let _ = client.delete(&v.id, true).await;
            }
        }
        if let Some(pid) = self.child.id() {
            let _ = rustix::process::kill_process(
                rustix::process::Pid::from_raw(pid as i32)
                    .expect("a running child's pid is positive"),
                rustix::process::Signal::TERM,
            );
        }
        if tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// The report of one run.
#[derive(Debug, Default, serde::Serialize)]
struct Report {
    backend: String,
    template: String,
    memory_mb: u32,
    vcpus: u8,
    rows: Vec<Row>,
    /// Ratios and differences worth reading first.
    summary: Vec<(String, f64)>,
    notes: Vec<String>,
}

#[derive(Debug, serde::Serialize)]
struct Row {
    name: String,
    samples: usize,
    p50_ms: f64,
    p99_ms: f64,
}

impl Report {
    fn row(&mut self, name: &str, s: &Samples) {
        self.rows.push(Row {
            name: name.to_owned(),
            samples: s.0.len(),
            p50_ms: s.percentile(50.0),
            p99_ms: s.percentile(99.0),
        });
    }
}

/// Runs `nova bench api`.
pub(crate) async fn run(args: ApiArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.iterations > 0 && args.execs > 0 && args.concurrent > 0 && args.sandboxes > 0,
        "-n, --execs, --concurrent and --sandboxes must be at least 1"
    );
    let own = match &args.socket {
        Some(_) => None,
        None => {
            eprintln!("nova bench api: starting a daemon in a private NOVA_HOME");
            Some(OwnDaemon::start(&args.guest.template, args.pool).await?)
        }
    };
    let socket = own
        .as_ref()
        .map(|d| d.socket.clone())
        .or_else(|| args.socket.clone())
        .context("no daemon to measure")?;
    let lib_home = private_home("nova-bench-lib-")?;
    let result = measure(
        &args,
        &Client::unix(&socket),
        lib_home.path(),
        own.is_some(),
    )
    .await;
    if let Some(own) = own {
        own.shutdown().await;
    }
    let report = result?;
    print_report(&report, args.json)
}

async fn measure(
    args: &ApiArgs,
    client: &Client,
    lib_home: &Path,
    own: bool,
) -> anyhow::Result<Report> {
    let health = client.health().await?;
    let lib = novasandbox::detect_in(NovaHome::at(lib_home))?;
    let g = &args.guest;
    let mut report = Report {
        backend: health.backend.clone(),
        template: g.template.clone(),
        memory_mb: g.memory,
        vcpus: g.vcpus,
        ..Report::default()
    };
    let request = CreateSandboxRequest {
        template: Some(g.template.clone()),
        memory_mb: Some(g.memory),
        vcpus: Some(g.vcpus),
        network: Some(false),
        ..CreateSandboxRequest::default()
    };
    let config = SandboxConfig::builder()
        .template_id(&g.template)
        .memory_mb(g.memory)
        .vcpus(g.vcpus)
        .boot_timeout_ms(120_000)
        .enable_network(false)
        .build()?;
    let true_body = ExecBody {
        cmd: Some(vec!["true".into()]),
        ..ExecBody::default()
    };
    let true_request = || ExecRequest::argv(["true"]);

    // 1. create -> first exec, interleaved.
    eprintln!(
        "nova bench api: {} backend; create -> first exec x{} each way",
        health.backend, args.iterations
    );
    let (mut api_first, mut lib_first) = (Samples::default(), Samples::default());
    let mut restored = 0;
    for _ in 0..args.iterations {
        let started = Instant::now();
        let view = client.create(&request).await?;
        let out = client.exec(&view.id, &true_body).await;
        api_first.push(started.elapsed());
        restored += usize::from(view.boot.as_ref().is_some_and(|b| b.restored));
        client.delete(&view.id, true).await?;
        anyhow::ensure!(out?.exit.exit_code == 0, "`true` failed through the API");

        let started = Instant::now();
        let sandbox = lib.create_sandbox(config.clone()).await?;
        let out = lib.execute_command(sandbox.id(), true_request()).await;
        lib_first.push(started.elapsed());
        sandbox.stop(true).await?;
        anyhow::ensure!(out?.exit_code() == 0, "`true` failed in-process");
    }
    report.row("create -> first exec: API", &api_first);
    report.row("create -> first exec: library", &lib_first);
    report.summary.push((
        "create -> first exec: API overhead at p50, ms (target < 5)".into(),
        api_first.percentile(50.0) - lib_first.percentile(50.0),
    ));
    report.notes.push(format!(
        "{restored} of {} API creates restored a snapshot",
        args.iterations
    ));

    // 2. exec round trip on one sandbox each way.
    eprintln!(
        "nova bench api: exec `true` round trip x{} each way",
        args.execs
    );
    let view = client.create(&request).await?;
    let sandbox = lib.create_sandbox(config.clone()).await?;
    let (mut api_exec, mut lib_exec) = (Samples::default(), Samples::default());
    let measured: anyhow::Result<()> = async {
        for _ in 0..args.execs {
            let started = Instant::now();
            client.exec(&view.id, &true_body).await?;
            api_exec.push(started.elapsed());
            let started = Instant::now();
            lib.execute_command(sandbox.id(), true_request()).await?;
            lib_exec.push(started.elapsed());
        }
        Ok(())
    }
    .await;
    let _ = client.delete(&view.id, true).await;
    sandbox.stop(true).await?;
    measured?;
    report.row("exec true: API (POST /exec)", &api_exec);
    report.row("exec true: library", &lib_exec);
    report.summary.push((
        "exec round trip: API overhead at p50, ms".into(),
        api_exec.percentile(50.0) - lib_exec.percentile(50.0),
    ));
    report.summary.push((
        "exec round trip: API p50 / library p50".into(),
        api_exec.percentile(50.0) / lib_exec.percentile(50.0),
    ));

    // 3. concurrent execs over several sandboxes.
    eprintln!(
        "nova bench api: {} concurrent execs over {} sandboxes",
        args.concurrent, args.sandboxes
    );
    let mut views: Vec<SandboxView> = Vec::new();
    let measured: anyhow::Result<(Samples, Duration)> = async {
        for _ in 0..args.sandboxes {
            views.push(client.create(&request).await?);
        }
        let client = Arc::new(client.clone());
        let started = Instant::now();
        let runs = (0..args.concurrent).map(|i| {
            let client = client.clone();
            let id = views[i % views.len()].id.clone();
            let body = true_body.clone();
            async move {
                let started = Instant::now();
                client.exec(&id, &body).await.map(|_| started.elapsed())
            }
        });
        let results = join_all(runs).await;
        let wall = started.elapsed();
        let mut samples = Samples::default();
        for r in results {
            samples.push(r?);
        }
        Ok((samples, wall))
    }
    .await;
    for v in &views {
        let _ = client.delete(&v.id, true).await;
    }
    let (concurrent, wall) = measured?;
    report.row(
        &format!(
            "{} concurrent execs / {} sandboxes: each",
            args.concurrent, args.sandboxes
        ),
        &concurrent,
    );
    let throughput = args.concurrent as f64 / wall.as_secs_f64();
    let sequential = 1000.0 / api_exec.percentile(50.0);
    report
        .summary
        .push(("concurrent execs: throughput, execs/s".into(), throughput));
    report.summary.push((
        "concurrent throughput / sequential (1 / API exec p50)".into(),
        throughput / sequential,
    ));

    // 4. the warm pool.
    if own && args.pool > 0 {
        pool_row(args, client, &mut report).await?;
    } else {
        report
            .notes
            .push("warm pool row skipped (it needs the bench's own daemon and --pool > 0)".into());
    }
    Ok(report)
}

/// Waits (bounded) until the daemon's pool holds `want` sandboxes.
pub(super) async fn pool_filled(client: &Client, want: usize) -> anyhow::Result<()> {
    let started = Instant::now();
    while client.health().await?.pool_ready < want {
        if started.elapsed() > WAIT_LIMIT {
            bail!("the warm pool did not fill within {WAIT_LIMIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

async fn pool_row(args: &ApiArgs, client: &Client, report: &mut Report) -> anyhow::Result<()> {
    eprintln!(
        "nova bench api: warm pool claims vs cold boots x{}",
        args.iterations
    );
    // What the pool's sandboxes are made with: the template and the
    // policy's defaults.
    let pooled = CreateSandboxRequest {
        template: Some(args.guest.template.clone()),
        ..CreateSandboxRequest::default()
    };
    let cold = CreateSandboxRequest {
        start: Some(StartModeView::Cold),
        ..pooled.clone()
    };
    let (mut claim, mut boot) = (Samples::default(), Samples::default());
    let mut not_from_pool = 0;
    for _ in 0..args.iterations {
        pool_filled(client, args.pool).await?;
        let started = Instant::now();
        let view = client.create(&pooled).await?;
        claim.push(started.elapsed());
        not_from_pool += usize::from(!view.from_pool);
        client.delete(&view.id, true).await?;
        // The refill boots in the background: let it finish first, so the
        // cold boot is not measured against it.
        pool_filled(client, args.pool).await?;
        let started = Instant::now();
        let view = client.create(&cold).await?;
        boot.push(started.elapsed());
        client.delete(&view.id, true).await?;
    }
    report.row("create: claimed from the warm pool", &claim);
    report.row("create: cold boot (start=cold)", &boot);
    report.summary.push((
        "warm pool claim p50 / cold boot p50".into(),
        claim.percentile(50.0) / boot.percentile(50.0),
    ));
    if not_from_pool > 0 {
        report.notes.push(format!(
            "{not_from_pool} pool creates were not served from the pool"
        ));
    }
    Ok(())
}

fn print_report(report: &Report, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
        return Ok(());
    }
    println!(
        "nova bench api: {} backend, template {}, {} MiB, {} vCPU",
        report.backend, report.template, report.memory_mb, report.vcpus
    );
    println!("{:<48} {:>7} {:>10} {:>10}", "", "n", "p50 ms", "p99 ms");
    for r in &report.rows {
        println!(
            "{:<48} {:>7} {:>10.3} {:>10.3}",
            r.name, r.samples, r.p50_ms, r.p99_ms
        );
    }
    for (name, value) in &report.summary {
        println!("{name:<64} {value:>10.3}");
    }
    for note in &report.notes {
        println!("note: {note}");
    }
    Ok(())
}
