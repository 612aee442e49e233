//! `cargo bench -p nova-agent`: agent overhead and streaming throughput.
//!
//! Runs the (optimized) agent as a normal process on a Unix socket and, side
//! by side in one run:
//!
//! * round trip of `exec true` through the agent (spawn, pipes, exit status)
//!   vs. spawning `true` directly with `tokio::process` (`output()`, so both
//!   set up stdout/stderr pipes), p50/p99 over `NOVA_BENCH_ITERS` (500);
//! * the same `exec true` as another user (uid 65534, `nobody`: the agent
//!   reads `/etc/passwd`, and the child calls setgroups/setgid/setuid, so
//!   the spawn takes `fork` instead of `posix_spawn`), as a ratio to root's
//!   (only as root; SKIP otherwise);
//! * `ping` round trip (pure protocol overhead);
//! * streamed output: `head -c 2G /dev/zero` through the agent vs. read
//!   directly from a `tokio::process` pipe, in GB/s (`NOVA_BENCH_STREAM_MIB`
//!   sets the size).
//!
//! Targets: agent overhead under 1 ms p50 over the direct spawn; over 1 GB/s
//! streamed.
#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::time::{Duration, Instant};

use nova_protocol::ExecSpec;
use nova_protocol::client::AgentClient;
use tokio::io::AsyncReadExt;

struct Agent {
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_agent() -> (Agent, AgentClient) {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_nova-agent"))
        .arg("--listen")
        .arg(format!("unix:{}", socket.display()))
        .env(
            "NOVA_AGENT_LOG",
            std::env::var("NOVA_AGENT_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("spawn nova-agent");
    let agent = Agent { child, _dir: dir };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "agent did not start");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let stream = tokio::net::UnixStream::connect(&socket).await.unwrap();
    let (client, _) = AgentClient::connect(stream, Duration::from_secs(10))
        .await
        .unwrap();
    (agent, client)
}

struct Summary {
    p50: Duration,
    p99: Duration,
    mean: Duration,
}

fn summarize(mut samples: Vec<Duration>) -> Summary {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
    let mean = samples.iter().sum::<Duration>() / samples.len() as u32;
    Summary {
        p50: at(0.50),
        p99: at(0.99),
        mean,
    }
}

async fn time_n<F, Fut>(n: usize, mut f: F) -> Summary
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    for _ in 0..n / 10 {
        f().await;
    }
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        f().await;
        samples.push(start.elapsed());
    }
    summarize(samples)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument is not supported.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(bench());
}

async fn bench() {
    let iters = env_usize("NOVA_BENCH_ITERS", 500);
    let stream_mib = env_usize("NOVA_BENCH_STREAM_MIB", 2048);
    let (_agent, client) = start_agent().await;

    // Interleaved, so that load from other processes hits both sides alike.
    let (mut direct, mut via_agent, mut to_started, mut guest) = (vec![], vec![], vec![], vec![]);
    let as_user = rustix::process::geteuid().is_root();
    let mut via_agent_user = vec![];
    for i in 0..iters + iters / 10 {
        let start = Instant::now();
        let out = tokio::process::Command::new("true")
            .stdin(Stdio::null())
            .output()
            .await
            .unwrap();
        assert!(out.status.success());
        let direct_time = start.elapsed();

        let start = Instant::now();
        let handle = client.exec(ExecSpec::argv(["true"])).await.unwrap();
        let started = start.elapsed();
        let out = handle.output().await.unwrap();
        assert!(out.success());
        let agent_time = start.elapsed();

        let user_time = if as_user {
            let start = Instant::now();
            let spec = ExecSpec::argv(["true"]).user(nova_protocol::ExecUser::uid(65534));
            let out = client.exec(spec).await.unwrap().output().await.unwrap();
            assert!(out.success());
            Some(start.elapsed())
        } else {
            None
        };
        if i >= iters / 10 {
            via_agent_user.extend(user_time);
            // The first tenth is warm-up.
            direct.push(direct_time);
            via_agent.push(agent_time);
            to_started.push(started);
            guest.push(out.duration);
        }
    }
    let (direct, via_agent) = (summarize(direct), summarize(via_agent));
    let (to_started, guest) = (summarize(to_started), summarize(guest));
    let ping = time_n(iters, || async {
        client.ping().await.unwrap();
    })
    .await;

    let bytes = stream_mib as u64 * 1024 * 1024;
    let command = format!("head -c {bytes} /dev/zero");
    let start = Instant::now();
    let mut child = tokio::process::Command::new("sh")
        .args(["-c", &command])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut buf = vec![0u8; 256 * 1024];
    let mut direct_total = 0u64;
    loop {
        let n = stdout.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        direct_total += n as u64;
    }
    child.wait().await.unwrap();
    let direct_stream = start.elapsed();
    assert_eq!(direct_total, bytes);

    let start = Instant::now();
    let mut handle = client.exec(ExecSpec::shell(&command)).await.unwrap();
    let agent_total = handle.take_stdout().unwrap().drain().await;
    assert!(handle.wait().await.unwrap().status.success());
    let agent_stream = start.elapsed();
    assert_eq!(agent_total, bytes);

    let gbps = |d: Duration| bytes as f64 / d.as_secs_f64() / 1e9;
    println!();
    println!("nova-agent benchmark ({iters} iterations, {stream_mib} MiB streamed)");
    println!(
        "{:<34} {:>10} {:>10} {:>10}",
        "round trip", "p50 ms", "p99 ms", "mean ms"
    );
    for (name, s) in [
        ("spawn `true` directly (tokio)", &direct),
        ("exec `true` through the agent", &via_agent),
        ("  of which: request to Started", &to_started),
        ("  of which: spawn to exit (agent)", &guest),
        ("ping through the agent", &ping),
    ] {
        println!(
            "{:<34} {:>10.3} {:>10.3} {:>10.3}",
            name,
            ms(s.p50),
            ms(s.p99),
            ms(s.mean)
        );
    }
    println!(
        "{:<34} {:>10.3} {:>10.3} {:>10.3}",
        "agent overhead (agent - direct)",
        ms(via_agent.p50) - ms(direct.p50),
        ms(via_agent.p99) - ms(direct.p99),
        ms(via_agent.mean) - ms(direct.mean)
    );
    if via_agent_user.is_empty() {
        println!("SKIP exec as another user: the benchmark is not running as root");
    } else {
        let user = summarize(via_agent_user);
        println!(
            "{:<34} {:>10.3} {:>10.3} {:>10.3}",
            "exec `true` as uid 65534",
            ms(user.p50),
            ms(user.p99),
            ms(user.mean)
        );
        println!(
            "{:<34} {:>10.2} {:>10.2} {:>10.2}",
            "  ratio to exec as root",
            ms(user.p50) / ms(via_agent.p50),
            ms(user.p99) / ms(via_agent.p99),
            ms(user.mean) / ms(via_agent.mean)
        );
    }
    println!();
    println!("{:<34} {:>10} {:>10}", "streamed output", "seconds", "GB/s");
    println!(
        "{:<34} {:>10.3} {:>10.2}",
        "pipe read directly (tokio)",
        direct_stream.as_secs_f64(),
        gbps(direct_stream)
    );
    println!(
        "{:<34} {:>10.3} {:>10.2}",
        "through the agent",
        agent_stream.as_secs_f64(),
        gbps(agent_stream)
    );
}
