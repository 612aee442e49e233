//! End-to-end networking under QEMU: a sandbox's guest reaches a test host
//! through NAT, a server in the guest is reached at `127.0.0.1:host_port`,
//! `enable_network = false` gives no `eth0`, and stopping leaves no
//! namespace, veth or nft table behind.
//!
//! Needs root, `/dev/net/tun` and `nft`; otherwise each test prints a SKIP
//! line and passes. Traffic goes only to loopback and to test hosts these
//! tests create in namespaces of their own (198.18.200.0/30, a benchmarking
//! range), never off this machine.

#![allow(clippy::unwrap_used, reason = "test code")]

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::{config, setup};
use nova_core::config::SandboxConfig;
use nova_core::hypervisor::Hypervisor;
use nova_core::sandbox::Sandbox;
use nova_net::{Ipv4Cidr, testing};

/// The tests of this file one at a time: some check that no network object
/// appeared, which another test's sandbox would break.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Why sandbox networking cannot run here, printed as a SKIP line.
fn skip(test: &str) -> bool {
    match nova_runtime::network::unsupported_reason() {
        Some(why) => {
            eprintln!("SKIP {test}: {why}");
            true
        }
        None => false,
    }
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

fn networked(template: &str, host_port: u16, guest_port: u16) -> SandboxConfig {
    let mut c = config(template);
    c.enable_network = true;
    c.host_port = Some(host_port);
    c.guest_port = guest_port;
    c.validate().unwrap();
    c
}

async fn sh(sandbox: &Sandbox, script: &str) -> String {
    let out = sandbox.execute_command(script).await.unwrap();
    assert!(
        out.success(),
        "{script}: {:?}\n{}",
        out.status,
        out.stderr_lossy()
    );
    out.stdout_lossy()
}

/// Whether anything of sandbox `id` is left on the host: its namespace,
/// its host veth (named from a hash of the id), its nft table.
async fn leftovers_of(id: &str) -> Vec<String> {
    let mut left = Vec::new();
    let name = format!("{}{id}", nova_net::NAME_PREFIX);
    if testing::namespaces().unwrap().contains(&name) {
        left.push(format!("namespace {name}"));
    }
    let veth = nova_net::host_veth_name(id);
    let links = testing::links_with_addresses(None).await.unwrap();
    if links.iter().any(|(l, _)| *l == veth) {
        left.push(format!("veth {veth}"));
    }
    if testing::host_nft_tables()
        .unwrap()
        .iter()
        .any(|t| t.contains(&name))
    {
        left.push(format!("nft table {name}"));
    }
    left
}

/// `GET /` at `to` over HTTP/1.0, the body of the answer; retried until a
/// server answers or `timeout` passes.
async fn http_body(to: SocketAddrV4, timeout: Duration) -> Vec<u8> {
    let deadline = Instant::now() + timeout;
    loop {
        let attempt = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<u8>> {
            let mut s = TcpStream::connect_timeout(&to.into(), Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            write!(s, "GET / HTTP/1.0\r\nHost: {to}\r\n\r\n")?;
            let mut response = Vec::new();
            s.read_to_end(&mut response)?;
            match response.windows(4).position(|w| w == b"\r\n\r\n") {
                Some(end) if response.starts_with(b"HTTP/1.") => Ok(response[end + 4..].to_vec()),
                _ => Err(std::io::Error::other(format!(
                    "not an HTTP response: {:?}",
                    String::from_utf8_lossy(&response)
                ))),
            }
        })
        .await
        .unwrap();
        match attempt {
            Ok(body) => return body,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("GET http://{to}/ failed until the deadline: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_reaches_a_test_host_through_nat_and_serves_a_published_port() {
    let test = "guest_reaches_a_test_host_through_nat_and_serves_a_published_port";
    if skip(test) {
        return;
    }
    let _serial = SERIAL.lock().await;
    let Some(t) = setup(test, &["minimal"]) else {
        return;
    };
    // A test host on a link of its own, serving a body with every byte value.
    let pid = std::process::id();
    let upstream = testing::TestHost::create(
        &format!("nvq{pid}-up"),
        &format!("nvqh{}", pid % 100_000),
        Ipv4Cidr::new(Ipv4Addr::new(198, 18, 200, 0), 30).unwrap(),
    )
    .await
    .unwrap();
    let body: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let server = testing::serve_http(
        Some(upstream.netns()),
        SocketAddrV4::new(upstream.addr(), 8080),
        body.clone(),
    )
    .await
    .unwrap();

    let host_port = free_port();
    let sandbox = t
        .hypervisor
        .create_sandbox(networked("minimal", host_port, 8000))
        .await
        .unwrap();
    let id = sandbox.id().to_string();
    assert!(
        leftovers_of(&id).await.len() == 3,
        "the sandbox has its namespace, veth and nft table"
    );

    // The guest's side, as nova.net= set it up.
    let links = sh(&sandbox, "ls /sys/class/net").await;
    assert!(links.split_whitespace().any(|l| l == "eth0"), "{links}");
    assert_eq!(
        sh(&sandbox, "cat /sys/class/net/eth0/mtu").await.trim(),
        "1500"
    );
    let routes = sh(&sandbox, "cat /proc/net/route").await;
    // Default route (destination 0) via 169.254.0.22 (little-endian hex).
    assert!(
        routes
            .lines()
            .any(|l| l.starts_with("eth0\t00000000\t1600FEA9")),
        "{routes}"
    );
    let resolv = sh(&sandbox, "cat /etc/resolv.conf").await;
    for server in nova_net::host_resolvers().iter().take(3) {
        assert!(resolv.contains(&format!("nameserver {server}")), "{resolv}");
    }

    // Out through NAT to the test host: the body arrives byte-exact.
    // (Plain `wget`: this busybox build's `wget -q -T N` dies of SIGSEGV.)
    sh(
        &sandbox,
        &format!("wget -O /tmp/body http://{}/", server.addr()),
    )
    .await;
    let got = sandbox.read_file("/tmp/body").await.unwrap();
    assert!(
        got == body,
        "byte-exact body ({} of {} bytes)",
        got.len(),
        body.len()
    );
    assert!(!server.peers().is_empty(), "the test host saw the guest");

    // In through the published port: a server in the guest, reached at
    // 127.0.0.1:host_port.
    let page = format!("hello from {id}\n");
    sh(&sandbox, "mkdir -p /tmp/www").await;
    sandbox
        .write_file("/tmp/www/index.html", page.as_bytes().to_vec(), 0o644)
        .await
        .unwrap();
    sh(&sandbox, "httpd -p 8000 -h /tmp/www").await;
    let got = http_body(
        SocketAddrV4::new(Ipv4Addr::LOCALHOST, host_port),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(String::from_utf8_lossy(&got), page);

    // The veth counted the traffic.
    let stats = sandbox.get_stats().await.unwrap();
    assert!(
        stats.vmm.net_rx_bytes.unwrap() >= body.len() as u64,
        "{:?}",
        stats.vmm
    );
    assert!(stats.vmm.net_tx_bytes.unwrap() > 0, "{:?}", stats.vmm);

    // A fork restores into a network of its own, with the same guest
    // addressing: the child reaches the test host too.
    let child = sandbox.fork(1).await.unwrap().pop().unwrap();
    let child_id = child.id().to_string();
    assert_eq!(leftovers_of(&child_id).await.len(), 3);
    sh(
        &child,
        &format!(
            "rm -f /tmp/body; wget -O /tmp/body http://{}/",
            server.addr()
        ),
    )
    .await;
    let got = child.read_file("/tmp/body").await.unwrap();
    assert!(
        got == body,
        "the restored child's NAT works ({} bytes)",
        got.len()
    );
    child.stop(true).await.unwrap();
    assert_eq!(leftovers_of(&child_id).await, Vec::<String>::new());

    sandbox.stop(false).await.unwrap();
    assert_eq!(leftovers_of(&id).await, Vec::<String>::new());
    assert!(t.sandbox_dirs().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_network_the_guest_has_only_lo_and_the_host_nothing() {
    let test = "without_network_the_guest_has_only_lo_and_the_host_nothing";
    let Some(t) = setup(test, &["minimal"]) else {
        return;
    };
    let sandbox = t
        .hypervisor
        .create_sandbox(config("minimal"))
        .await
        .unwrap();
    let id = sandbox.id().to_string();
    let links = sh(&sandbox, "ls /sys/class/net").await;
    assert_eq!(links.split_whitespace().collect::<Vec<_>>(), ["lo"]);
    if nova_runtime::network::unsupported_reason().is_none() {
        assert_eq!(leftovers_of(&id).await, Vec::<String>::new());
    }
    let stats = sandbox.get_stats().await.unwrap();
    assert_eq!(stats.vmm.net_rx_bytes, None);
    sandbox.stop(false).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_port_in_use_fails_the_create_and_leaves_nothing() {
    let test = "a_host_port_in_use_fails_the_create_and_leaves_nothing";
    if skip(test) {
        return;
    }
    let _serial = SERIAL.lock().await;
    let Some(t) = setup(test, &["minimal"]) else {
        return;
    };
    let taken = TcpListener::bind("0.0.0.0:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let before = testing::namespaces().unwrap();
    let err = t
        .hypervisor
        .create_sandbox(networked("minimal", port, 80))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, nova_core::error::CreateSandboxError::PortUnavailable { field, .. }
            if field == "host_port"),
        "{err:?}"
    );
    let chain = format!("{:?}", err);
    assert!(chain.contains(&port.to_string()), "names the port: {chain}");
    let after = testing::namespaces().unwrap();
    assert!(
        after
            .iter()
            .all(|n| before.contains(n) || !n.starts_with(nova_net::NAME_PREFIX)),
        "{before:?} -> {after:?}"
    );
    assert!(t.sandbox_dirs().is_empty());
}
