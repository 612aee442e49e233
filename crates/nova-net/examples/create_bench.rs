//! Benchmark (not a test): what a sandbox network costs at create and at
//! teardown, with a published port and an egress policy, p50 and p90 over
//! N rounds (default 20): `cargo run --release -p nova-net --example
//! create_bench [N]`, as root. No VM; no traffic.
//!
//! The nft parts run `nft -j -f -` (the `nftables` crate's helper), one
//! process per table: two at create (the namespace's table, the host's),
//! one at teardown.
//!
//! Where `passt` is installed, the same rounds for the user-mode network
//! (one passt per sandbox, the same published port, no policy) follow, and
//! the ratio of the two creates' p50 (user / namespace) is printed.

#![allow(clippy::print_stdout, reason = "a benchmark prints its figures")]

use std::time::{Duration, Instant};

use nova_net::{
    AddressPool, EgressPolicy, NetworkSpec, PortMapping, SandboxNetwork, UserNetwork, UserOptions,
};

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

fn report(what: &str, v: &mut [Duration], rounds: usize) {
    v.sort();
    println!(
        "{what:>14}: p50 {:>7.2} ms  p90 {:>7.2} ms  ({rounds} rounds)",
        percentile(v, 50).as_secs_f64() * 1e3,
        percentile(v, 90).as_secs_f64() * 1e3
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    if let Some(why) = nova_net::testing::unsupported_reason() {
        println!("SKIP create_bench: {why}");
        return Ok(());
    }
    let rounds: usize = std::env::args()
        .nth(1)
        .map(|n| n.parse())
        .transpose()?
        .unwrap_or(20)
        .clamp(1, 1000);
    let pool = AddressPool::default();
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    drop(listener);
    let spec = NetworkSpec {
        ports: vec![PortMapping::tcp(port, 80)],
        egress: EgressPolicy::parse::<&str, &str>(true, &["198.18.0.0/15"], &["198.18.1.0/24"])?,
        dns_servers: Vec::new(),
    };
    let (mut create, mut teardown, mut update) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        let id = nova_core::SandboxId::random();
        let t = Instant::now();
        let mut net = SandboxNetwork::create(&id, &spec, &pool).await?;
        create.push(t.elapsed());
        let t = Instant::now();
        net.update_egress(EgressPolicy::block_all()).await?;
        update.push(t.elapsed());
        let t = Instant::now();
        net.teardown().await?;
        teardown.push(t.elapsed());
    }
    for (what, v) in [
        ("create", &mut create),
        ("update_egress", &mut update),
        ("teardown", &mut teardown),
    ] {
        report(what, v, rounds);
    }
    if std::process::Command::new("passt")
        .arg("--version")
        .output()
        .is_err()
    {
        println!("SKIP user-mode rounds: passt is not installed");
        return Ok(());
    }
    let dir = std::env::temp_dir().join(format!("nova-create-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let user_spec = NetworkSpec {
        egress: EgressPolicy::default(),
        ..spec
    };
    let (mut user_create, mut user_teardown) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let id = nova_core::SandboxId::random();
        let t = Instant::now();
        let mut net = UserNetwork::create(&id, &user_spec, &dir, &UserOptions::default())?;
        user_create.push(t.elapsed());
        let t = Instant::now();
        net.teardown();
        user_teardown.push(t.elapsed());
    }
    std::fs::remove_dir_all(&dir)?;
    report("user create", &mut user_create, rounds);
    report("user teardown", &mut user_teardown, rounds);
    println!(
        "user / namespace create p50: {:.2}",
        percentile(&user_create, 50).as_secs_f64() / percentile(&create, 50).as_secs_f64()
    );
    Ok(())
}
