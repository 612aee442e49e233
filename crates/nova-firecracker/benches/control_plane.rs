//! Control-plane overhead of NovaSandbox's Firecracker provider.
//!
//! Side by side, in one run, against the same `firecracker` binary and the
//! same guest (the minimal test guest of `tests/common`):
//!
//! - cold start: Firecracker spawned → every resource configured →
//!   `InstanceStart` accepted, through `FirecrackerHypervisor::create_sandbox`
//!   (with `wait_for_agent = false`, its `boot_time_ms`) and through a plain
//!   hand-written sequence (hyper over the same Unix socket, the same JSON
//!   bodies as literals);
//! - snapshot load: spawned → logger and metrics configured →
//!   `PUT /snapshot/load` (resumed) accepted, through
//!   `create_sandbox_from_snapshot` and by hand.
//!
//! Host-side preparation (sandbox directory, scratch disk) is outside both
//! timings. Runs are interleaved so drift affects both paths alike; the
//! table shows medians and means. Needs `NOVA_FIRECRACKER_BIN`.
//!
//! `cargo bench -p nova-firecracker` (set `NOVA_BENCH_RUNS` to change the
//! number of runs, default 15).

#![allow(
    clippy::unwrap_used,
    clippy::print_stdout,
    unreachable_pub,
    reason = "benchmark code"
)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use nova_core::config::SandboxConfig;
use nova_core::hypervisor::Hypervisor;
use nova_core::snapshot::SnapshotKind;
use nova_firecracker::FirecrackerHypervisor;
use tokio::net::UnixStream;

/// A hand-written client: one HTTP/1.1 connection, literal JSON bodies.
struct ByHand {
    sender: SendRequest<Full<Bytes>>,
}

impl ByHand {
    async fn connect(socket: &Path) -> Self {
        let stream = loop {
            match UnixStream::connect(socket).await {
                Ok(s) => break s,
                Err(_) => tokio::time::sleep(Duration::from_micros(100)).await,
            }
        };
        let (sender, connection) = http1::handshake(TokioIo::new(stream)).await.unwrap();
        tokio::spawn(connection);
        Self { sender }
    }

    async fn call(&mut self, method: &str, path: &str, body: String) {
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header("Host", "localhost")
            .header("Content-Type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        self.sender.ready().await.unwrap();
        let response = self.sender.send_request(request).await.unwrap();
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert!(status.is_success(), "{method} {path}: {status} {body:?}");
    }
}

fn spawn_firecracker(binary: &Path, workdir: &Path, id: &str) -> tokio::process::Child {
    tokio::process::Command::new(binary)
        .args(["--api-sock", "api.sock", "--id", id])
        .current_dir(workdir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .process_group(0)
        .spawn()
        .unwrap()
}

/// Spawns Firecracker and sends, by hand, what every start begins with:
/// `GET /`, the logger and the metrics.
async fn start_by_hand(binary: &Path, workdir: &Path) -> (tokio::process::Child, ByHand) {
    let child = spawn_firecracker(binary, workdir, "by-hand");
    let mut api = ByHand::connect(&workdir.join("api.sock")).await;
    api.call("GET", "/", String::new()).await;
    api.call(
        "PUT",
        "/logger",
        r#"{"log_path":"vmm.log","level":"Warning","show_level":true}"#.into(),
    )
    .await;
    api.call(
        "PUT",
        "/metrics",
        r#"{"metrics_path":"metrics.json"}"#.into(),
    )
    .await;
    (child, api)
}

/// Cold start by hand: the same requests, in the same order, as
/// `MachineSpec::configure` sends for this template.
async fn cold_by_hand(binary: &Path, workdir: &Path, template: &Path, cmdline: &str) -> Duration {
    let started = Instant::now();
    let (mut child, mut api) = start_by_hand(binary, workdir).await;
    api.call(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count":1,"mem_size_mib":128}"#.into(),
    )
    .await;
    api.call(
        "PUT",
        "/boot-source",
        format!(
            r#"{{"kernel_image_path":"{}","boot_args":"{cmdline}"}}"#,
            template.join("vmlinux").display()
        ),
    )
    .await;
    api.call(
        "PUT",
        "/drives/rootfs",
        format!(
            r#"{{"drive_id":"rootfs","path_on_host":"{}","is_root_device":true,"is_read_only":true}}"#,
            template.join("rootfs.ext4").display()
        ),
    )
    .await;
    api.call(
        "PUT",
        "/drives/scratch",
        r#"{"drive_id":"scratch","path_on_host":"scratch.ext4","is_root_device":false,"is_read_only":false}"#.into(),
    )
    .await;
    api.call(
        "PUT",
        "/vsock",
        r#"{"guest_cid":3,"uds_path":"vsock.sock"}"#.into(),
    )
    .await;
    api.call("PUT", "/entropy", "{}".into()).await;
    api.call(
        "PUT",
        "/actions",
        r#"{"action_type":"InstanceStart"}"#.into(),
    )
    .await;
    let elapsed = started.elapsed();
    child.kill().await.unwrap();
    elapsed
}

/// Snapshot load by hand, into a fresh process whose working directory
/// holds the scratch copy.
async fn restore_by_hand(binary: &Path, workdir: &Path, snapshot: &Path) -> Duration {
    let started = Instant::now();
    let (mut child, mut api) = start_by_hand(binary, workdir).await;
    api.call(
        "PUT",
        "/snapshot/load",
        format!(
            r#"{{"snapshot_path":"{}","mem_backend":{{"backend_type":"File","backend_path":"{}"}},"resume_vm":true}}"#,
            snapshot.join("vmstate").display(),
            snapshot.join("memory").display()
        ),
    )
    .await;
    let elapsed = started.elapsed();
    child.kill().await.unwrap();
    elapsed
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len() as f64
}

fn row(name: &str, nova: &mut [f64], hand: &mut [f64]) {
    let (nm, hm) = (median(nova), median(hand));
    let (na, ha) = (mean(nova), mean(hand));
    println!(
        "| {name:<28} | {nm:>9.2} | {hm:>9.2} | {:>+7.1}% | {na:>9.2} | {ha:>9.2} | {:>+7.1}% |",
        (nm - hm) / hm * 100.0,
        (na - ha) / ha * 100.0
    );
}

#[tokio::main]
async fn main() {
    let Some(binary) = common::firecracker("control_plane benchmark") else {
        return;
    };
    let runs: usize = std::env::var("NOVA_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(15);
    let home = tempfile::tempdir().unwrap();
    common::install_test_template(home.path(), "bench");
    let template = home.path().join("templates/bench");
    let hv: FirecrackerHypervisor = common::vmm_only(home.path(), binary.clone());
    let config = SandboxConfig::builder()
        .template_id("bench")
        .memory_mb(128)
        .vcpus(1)
        .boot_timeout_ms(30_000)
        .build()
        .unwrap();

    // A sandbox to snapshot, and the by-hand working directory with the
    // same files the provider would lay out.
    let source = hv.create_sandbox(config.clone()).await.unwrap();
    let cmdline = {
        let state: serde_json::Value =
            serde_json::from_slice(&std::fs::read(source.info().dir.join("state.json")).unwrap())
                .unwrap();
        assert_eq!(state["state"], "running");
        // Same command line the provider built (it is deterministic but for
        // the hostname, which has the same length).
        format!(
            "{} reboot=k 8250.nr_uarts=0 root=/dev/vda rootfstype=ext4 ro \
             init=/sbin/nova-agent nova.hostname=sb-byhand000000 nova.overlay=/dev/vdb",
            config.kernel_args
        )
    };
    let snapshot = home.path().join("snapshot");
    source.pause().await.unwrap();
    hv.snapshot_sandbox_with(source.id(), &snapshot, SnapshotKind::Full)
        .await
        .unwrap();
    source.stop(true).await.unwrap();
    let hand_dir = home.path().join("by-hand");
    std::fs::create_dir(&hand_dir).unwrap();

    let mut cold_nova = Vec::new();
    let mut cold_create = Vec::new();
    let mut cold_hand = Vec::new();
    let mut load_nova = Vec::new();
    let mut load_hand = Vec::new();
    for _ in 0..runs {
        // NovaSandbox, cold.
        let started = Instant::now();
        let sandbox = hv.create_sandbox(config.clone()).await.unwrap();
        cold_create.push(ms(started.elapsed()));
        cold_nova.push(sandbox.info().boot.as_ref().unwrap().boot_time_ms);
        sandbox.stop(true).await.unwrap();

        // By hand, cold.
        let _ = std::fs::remove_dir_all(&hand_dir);
        std::fs::create_dir(&hand_dir).unwrap();
        std::fs::copy(snapshot.join("scratch.ext4"), hand_dir.join("scratch.ext4")).unwrap();
        cold_hand.push(ms(cold_by_hand(
            binary.path(),
            &hand_dir,
            &template,
            &cmdline,
        )
        .await));

        // NovaSandbox, snapshot load.
        let sandbox = hv.create_sandbox_from_snapshot(&snapshot).await.unwrap();
        let boot = sandbox.info().boot.clone().unwrap();
        assert!(boot.from_snapshot);
        load_nova.push(boot.boot_time_ms);
        sandbox.stop(true).await.unwrap();

        // By hand, snapshot load.
        let _ = std::fs::remove_dir_all(&hand_dir);
        std::fs::create_dir(&hand_dir).unwrap();
        std::fs::copy(snapshot.join("scratch.ext4"), hand_dir.join("scratch.ext4")).unwrap();
        load_hand.push(ms(
            restore_by_hand(binary.path(), &hand_dir, &snapshot).await
        ));
    }

    println!();
    println!(
        "Firecracker {} control plane, {runs} interleaved runs each (milliseconds)",
        binary.version
    );
    println!(
        "| {:<28} | {:>9} | {:>9} | {:>8} | {:>9} | {:>9} | {:>8} |",
        "phase", "nova med", "hand med", "overhead", "nova avg", "hand avg", "overhead"
    );
    println!(
        "|{:-<30}|{:-<11}|{:-<11}|{:-<10}|{:-<11}|{:-<11}|{:-<10}|",
        "", "", "", "", "", "", ""
    );
    row("spawn -> InstanceStart", &mut cold_nova, &mut cold_hand);
    row("spawn -> snapshot loaded", &mut load_nova, &mut load_hand);
    let create_median = median(&mut cold_create);
    println!();
    println!(
        "create_sandbox() wall time incl. host preparation (sandbox dir, 64 MiB scratch mkfs): \
         median {create_median:.2} ms"
    );
}
