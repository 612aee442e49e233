//! Benchmark (not a test): guest -> host TCP throughput through a sandbox
//! network, beside host loopback, in one run; and what the network adds to
//! a create (nova-net's part, p50 and p90).
//!
//! `cargo run --release -p nova-qemu --example net_bench [MiB] [ROUNDS]`,
//! as root, with the `minimal` template built (`make images`; templates
//! from `NOVA_TEMPLATES_DIR`, else `$NOVA_HOME/templates`).
//!
//! * **Throughput**: a sink in a test host namespace (198.18.231.2, the
//!   benchmarking range; traffic never leaves this machine) counts MiB bytes
//!   (default 64) that the guest sends with `dd | nc` through its tap, the
//!   namespace's NAT and the veth; the same sink on 127.0.0.1 receives the
//!   same bytes from a host thread. Each is timed by the sink from accept
//!   to the last byte; the figure printed is MiB/s and the ratio of the
//!   two. Under QEMU TCG the guest side is emulated, so the ratio says more
//!   about the emulator than about the network path.
//! * **User mode**: where `passt` is installed, the same guest send through
//!   a user-mode network (one passt, `NOVA_NET_MODE=user`'s network) to
//!   the same test host, and its ratio to the namespace network's rate.
//! * **Create cost**: ROUNDS (default 20) `SandboxNetwork::create` +
//!   `open_tap` + `teardown` of a network with a published port and an
//!   egress policy, as the runtime does for every networked create, p50 and
//!   p90.

#![allow(clippy::print_stdout, reason = "a benchmark prints its figures")]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nova_core::config::SandboxConfig;
use nova_core::exec::ExecRequest;
use nova_core::home::NovaHome;
use nova_core::hypervisor::Hypervisor;
use nova_net::{AddressPool, EgressPolicy, NetworkSpec, PortMapping, SandboxNetwork, testing};
use nova_qemu::{QemuHypervisor, QemuOptions};
use nova_runtime::host::HostReport;

type Error = Box<dyn std::error::Error>;

/// Accepts one connection on `listener`, reads until `bytes` arrived (or
/// EOF), and sends back the time from accept to the last byte and the
/// count.
fn sink(listener: TcpListener, bytes: u64) -> mpsc::Receiver<std::io::Result<(Duration, u64)>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let run = || -> std::io::Result<(Duration, u64)> {
            let (mut stream, _) = listener.accept()?;
            stream.set_read_timeout(Some(Duration::from_secs(120)))?;
            let started = Instant::now();
            let mut buf = vec![0u8; 256 * 1024];
            let mut got = 0u64;
            while got < bytes {
                let n = stream.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                got += n as u64;
            }
            Ok((started.elapsed(), got))
        };
        let _ = tx.send(run());
    });
    rx
}

fn mib_per_s(bytes: u64, took: Duration) -> f64 {
    bytes as f64 / (1024.0 * 1024.0) / took.as_secs_f64().max(1e-9)
}

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Error> {
    if let Some(why) = nova_runtime::network::unsupported_reason() {
        println!("SKIP net_bench: {why}");
        return Ok(());
    }
    let mut args = std::env::args().skip(1);
    let mib: u64 = args.next().map(|n| n.parse()).transpose()?.unwrap_or(64);
    let rounds: usize = args.next().map(|n| n.parse()).transpose()?.unwrap_or(20);
    let (mib, rounds) = (mib.clamp(1, 4096), rounds.clamp(1, 1000));
    let bytes = mib * 1024 * 1024;

    // What the network adds to a create.
    let pool = AddressPool::new("10.253.0.0/16".parse()?)?;
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let spec = NetworkSpec {
        ports: vec![PortMapping::tcp(port, 80)],
        egress: EgressPolicy::parse::<&str, &str>(false, &[], &["198.18.1.0/24"])?,
        dns_servers: Vec::new(),
    };
    let mut create = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let id = nova_core::SandboxId::random();
        let t = Instant::now();
        let mut net = SandboxNetwork::create(&id, &spec, &pool).await?;
        let tap = net.open_tap(true).await?;
        create.push(t.elapsed());
        drop(tap);
        net.teardown().await?;
    }
    create.sort();
    println!(
        "network create (+ tap open), {rounds} rounds: p50 {:.1} ms, p90 {:.1} ms",
        percentile(&create, 50).as_secs_f64() * 1e3,
        percentile(&create, 90).as_secs_f64() * 1e3
    );

    // Guest -> test host through the sandbox network.
    let templates: PathBuf = match std::env::var_os("NOVA_TEMPLATES_DIR") {
        Some(dir) => dir.into(),
        None => NovaHome::resolve()?.templates_dir(),
    };
    let report = HostReport::probe();
    let accel = report.qemu_accel();
    let qemu = report.qemu.map_err(|_| "qemu-system-x86_64 not found")?;
    let dir = tempfile::Builder::new()
        .prefix("nova-netbench-")
        .tempdir_in("/tmp")?;
    std::os::unix::fs::symlink(&templates, dir.path().join("templates"))?;
    let hypervisor = QemuHypervisor::new(QemuOptions {
        home: NovaHome::at(dir.path()),
        qemu_bin: qemu.path,
        accel,
        scratch_size_mb: 1024,
    });
    let pid = std::process::id();
    let host = testing::TestHost::create(
        &format!("nvb{pid}-sink"),
        &format!("nvbs{}", pid % 100_000),
        "198.18.231.0/30".parse()?,
    )
    .await?;
    let (guest_took, guest_got) = guest_to_sink(
        &hypervisor,
        &host,
        SocketAddrV4::new(host.addr(), 5001),
        mib,
    )
    .await?;
    let user = if nova_runtime::network::user_mode_unsupported_reason().is_none() {
        hypervisor.set_net_mode(nova_runtime::network::NetModeChoice::User);
        Some(
            guest_to_sink(
                &hypervisor,
                &host,
                SocketAddrV4::new(host.addr(), 5002),
                mib,
            )
            .await?,
        )
    } else {
        println!("SKIP user-mode throughput: passt is not installed");
        None
    };

    // The same bytes over host loopback.
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let to = listener.local_addr()?;
    let done = sink(listener, bytes);
    let sender = std::thread::spawn(move || -> std::io::Result<()> {
        let mut stream = TcpStream::connect(to)?;
        let chunk = vec![0u8; 65536];
        for _ in 0..bytes / 65536 {
            stream.write_all(&chunk)?;
        }
        Ok(())
    });
    let (host_took, host_got) = done.recv_timeout(Duration::from_secs(120))??;
    sender
        .join()
        .map_err(|_| "the loopback sender panicked")??;

    let guest_rate = mib_per_s(guest_got, guest_took);
    let host_rate = mib_per_s(host_got, host_took);
    println!(
        "guest -> test host through NAT: {:.1} MiB in {:.2} s = {guest_rate:.1} MiB/s ({})",
        guest_got as f64 / 1048576.0,
        guest_took.as_secs_f64(),
        HostReport::probe().qemu_accel()
    );
    println!(
        "host loopback:                  {:.1} MiB in {:.3} s = {host_rate:.1} MiB/s",
        host_got as f64 / 1048576.0,
        host_took.as_secs_f64()
    );
    println!(
        "ratio guest/loopback: {:.4}",
        guest_rate / host_rate.max(1e-9)
    );
    if let Some((user_took, user_got)) = user {
        let user_rate = mib_per_s(user_got, user_took);
        println!(
            "guest -> test host through passt: {:.1} MiB in {:.2} s = {user_rate:.1} MiB/s",
            user_got as f64 / 1048576.0,
            user_took.as_secs_f64(),
        );
        println!(
            "ratio user-mode/namespace: {:.3}",
            user_rate / guest_rate.max(1e-9)
        );
    }
    Ok(())
}

/// Boots a networked sandbox of `hypervisor` (in whichever network mode it
/// picks), has its guest send `mib` MiB to a sink at `at` on the test host,
/// and returns the sink's time and byte count.
async fn guest_to_sink(
    hypervisor: &QemuHypervisor,
    host: &testing::TestHost,
    at: SocketAddrV4,
    mib: u64,
) -> Result<(Duration, u64), Error> {
    let listener = nova_net::netns::run_in(host.netns(), "binding the sink", move || {
        Ok(TcpListener::bind(at))
    })
    .await??;
    let config = SandboxConfig::builder()
        .template_id("minimal")
        .memory_mb(256)
        .vcpus(1)
        .boot_timeout_ms(90_000)
        .enable_network(true)
        .build()?;
    let sandbox = hypervisor.create_sandbox(config).await?;
    let done = sink(listener, mib * 1024 * 1024);
    let send = format!(
        "dd if=/dev/zero bs=65536 count={} 2>/dev/null | nc {at}",
        mib * 16
    );
    let out = sandbox
        .execute_command(ExecRequest::shell(send).timeout(Duration::from_secs(600)))
        .await?;
    let guest = done.recv_timeout(Duration::from_secs(5));
    sandbox.stop(true).await?;
    match guest {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(e)) => Err(format!("the sink failed: {e}").into()),
        Err(_) => Err(format!(
            "the guest sent nothing the sink saw ({:?}): {}",
            out.status,
            out.stderr_lossy()
        )
        .into()),
    }
}
