//! End-to-end egress policy and published ports under QEMU: an allowed
//! CIDR is reachable and nothing else is (another test host, another
//! sandbox, the host's own addresses), a policy change through
//! `update_network` takes effect while the sandbox runs, two ports are
//! published at once, and bad network input names its field and leaves
//! nothing behind.
//!
//! Needs root, `/dev/net/tun` and `nft`; otherwise each test prints a SKIP
//! line and passes. Traffic goes only to loopback and to test hosts these
//! tests create in namespaces of their own (198.18.201.0/30 and
//! 198.18.202.0/30, a benchmarking range), never off this machine: the
//! metadata address is checked in the sandbox's nft table, not by sending
//! to it.

#![allow(clippy::unwrap_used, reason = "test code")]

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::time::Duration;

use common::{config, setup};
use nova_core::config::{ConfigError, SandboxConfig};
use nova_core::error::{CreateSandboxError, UpdateNetworkError};
use nova_core::exec::ExecRequest;
use nova_core::hypervisor::Hypervisor;
use nova_core::network::{EgressConfig, PortSpec};
use nova_core::sandbox::Sandbox;
use nova_net::{Ipv4Cidr, testing};

/// One test at a time: they count network objects before and after.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

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

fn networked(template: &str) -> SandboxConfig {
    let mut c = config(template);
    c.enable_network = true;
    c
}

fn allow_only(cidrs: &[&str]) -> EgressConfig {
    EgressConfig {
        block_all: true,
        allow: cidrs.iter().map(|c| c.to_string()).collect(),
        deny: Vec::new(),
    }
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

/// The body of `GET http://to/` fetched by the guest, or `None` when it
/// cannot get it within 10 s (a drop makes `wget` wait: the request's
/// timeout kills it).
async fn guest_get(sandbox: &Sandbox, to: SocketAddrV4) -> Option<String> {
    let request =
        ExecRequest::shell(format!("wget -O - http://{to}/")).timeout(Duration::from_secs(10));
    let out = sandbox.execute_command(request).await.unwrap();
    out.success().then(|| out.stdout_lossy())
}

/// `GET /` at `to` from the host over HTTP/1.0 (busybox httpd answers
/// `HTTP/1.1`), the body; tried every 200 ms for up to 30 s.
async fn host_get(to: SocketAddrV4) -> Vec<u8> {
    let get = move || -> std::io::Result<Vec<u8>> {
        let mut s = TcpStream::connect_timeout(&to.into(), Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(s, "GET / HTTP/1.0\r\nHost: {to}\r\n\r\n")?;
        let mut response = Vec::new();
        s.read_to_end(&mut response)?;
        match response.windows(4).position(|w| w == b"\r\n\r\n") {
            Some(end) if response.starts_with(b"HTTP/1.1 200") => Ok(response[end + 4..].to_vec()),
            _ => Err(std::io::Error::other(format!(
                "not a 200 answer: {:?}",
                String::from_utf8_lossy(&response)
            ))),
        }
    };
    let mut last = None;
    for _ in 0..150 {
        match tokio::task::spawn_blocking(get).await.unwrap() {
            Ok(body) => return body,
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("GET http://{to}/ failed for 30 s: {last:?}");
}

/// Every network object on the host: namespaces, sandbox veths, inet nft
/// tables.
async fn network_objects() -> (Vec<String>, Vec<(String, String)>, Vec<String>) {
    let mut ns = testing::namespaces().unwrap();
    ns.sort();
    let mut veths = testing::sandbox_veths().await.unwrap();
    veths.sort();
    let mut tables = testing::host_nft_tables().unwrap();
    tables.sort();
    (ns, veths, tables)
}

/// The namespace end of sandbox `id`'s veth: the host end's address + 1.
async fn netns_addr_of(id: &str) -> Ipv4Addr {
    let veth = nova_net::host_veth_name(id);
    let links = testing::links_with_addresses(None).await.unwrap();
    let (_, addrs) = links
        .into_iter()
        .find(|(l, _)| *l == veth)
        .unwrap_or_else(|| panic!("no veth {veth} for {id}"));
    let (host, _) = addrs.first().copied().unwrap();
    Ipv4Addr::from(u32::from(host) + 1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_allows_a_cidr_closes_the_rest_and_changes_while_running() {
    let test = "egress_allows_a_cidr_closes_the_rest_and_changes_while_running";
    if skip(test) {
        return;
    }
    let _serial = SERIAL.lock().await;
    let Some(t) = setup(test, &["minimal"]) else {
        return;
    };
    let before = network_objects().await;
    let pid = std::process::id();
    let host_a = testing::TestHost::create(
        &format!("nve{pid}-a"),
        &format!("nvea{}", pid % 100_000),
        Ipv4Cidr::new(Ipv4Addr::new(198, 18, 201, 0), 30).unwrap(),
    )
    .await
    .unwrap();
    let host_b = testing::TestHost::create(
        &format!("nve{pid}-b"),
        &format!("nveb{}", pid % 100_000),
        Ipv4Cidr::new(Ipv4Addr::new(198, 18, 202, 0), 30).unwrap(),
    )
    .await
    .unwrap();
    let a = SocketAddrV4::new(host_a.addr(), 8080);
    let b = SocketAddrV4::new(host_b.addr(), 8080);
    let _server_a = testing::serve_http(Some(host_a.netns()), a, b"from A\n".to_vec())
        .await
        .unwrap();
    let _server_b = testing::serve_http(Some(host_b.netns()), b, b"from B\n".to_vec())
        .await
        .unwrap();
    // A service of the host itself, on an address inside the allowed /30.
    let on_host = SocketAddrV4::new(host_a.host_side(), free_port());
    let _server_host = testing::serve_http(None, on_host, b"from the host\n".to_vec())
        .await
        .unwrap();

    // Another sandbox, with a server the host can reach at its published
    // port: proof that it serves, so that sandbox 1 failing to reach it is
    // the policy's doing.
    let other_port = free_port();
    let mut other_config = networked("minimal");
    other_config.ports = vec![PortSpec::tcp(other_port, 8000)];
    let other = t.hypervisor.create_sandbox(other_config).await.unwrap();
    sh(
        &other,
        "mkdir -p /tmp/www && echo other > /tmp/www/index.html && httpd -p 8000 -h /tmp/www",
    )
    .await;
    let got = host_get(SocketAddrV4::new(Ipv4Addr::LOCALHOST, other_port)).await;
    assert_eq!(String::from_utf8_lossy(&got), "other\n");
    let other_addr = SocketAddrV4::new(netns_addr_of(other.id().as_str()).await, 8000);

    // Sandbox 1: only test host A's /30, two published ports.
    let (p1, p2) = (free_port(), free_port());
    let mut c = networked("minimal");
    c.ports = vec![PortSpec::tcp(p1, 8000), PortSpec::tcp(p2, 8001)];
    c.egress = Some(allow_only(&["198.18.201.0/30"]));
    let sandbox = t.hypervisor.create_sandbox(c).await.unwrap();
    let id = sandbox.id().to_string();

    assert_eq!(guest_get(&sandbox, a).await.as_deref(), Some("from A\n"));
    assert_eq!(guest_get(&sandbox, b).await, None, "test host B is closed");
    assert_eq!(
        guest_get(&sandbox, on_host).await,
        None,
        "the host's own address is closed though the allowed /30 holds it"
    );
    assert_eq!(
        guest_get(&sandbox, other_addr).await,
        None,
        "another sandbox is closed"
    );
    let table = nova_net::firewall::list_table_text(&format!("nova-{id}")).unwrap();
    assert!(
        table.contains("ip daddr 169.254.169.254 reject"),
        "the metadata address is rejected: {table}"
    );

    // Two published ports, each its own server.
    sh(
        &sandbox,
        "mkdir -p /tmp/w0 /tmp/w1 && echo zero > /tmp/w0/index.html && \
         echo one > /tmp/w1/index.html && httpd -p 8000 -h /tmp/w0 && httpd -p 8001 -h /tmp/w1",
    )
    .await;
    for (port, page) in [(p1, "zero\n"), (p2, "one\n")] {
        let got = host_get(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)).await;
        assert_eq!(String::from_utf8_lossy(&got), page, "port {port}");
    }

    // A new policy while it runs: B open, A closed; no restart.
    sandbox
        .update_network(allow_only(&["198.18.202.2/32"]))
        .await
        .unwrap();
    assert_eq!(guest_get(&sandbox, b).await.as_deref(), Some("from B\n"));
    assert_eq!(
        guest_get(&sandbox, a).await,
        None,
        "A closed after the update"
    );
    let info = sandbox.refresh().await.unwrap();
    assert_eq!(
        info.config.egress,
        Some(allow_only(&["198.18.202.2/32"])),
        "the config reports the policy in force"
    );

    // A bad policy is refused by field; the one in force stays.
    let err = sandbox
        .update_network(allow_only(&["198.18.202.2/32", "10.0.0.1/8"]))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, UpdateNetworkError::Config(ConfigError::Egress { field, .. }) if field == "egress.allow[1]"),
        "{err:?}"
    );
    assert_eq!(guest_get(&sandbox, b).await.as_deref(), Some("from B\n"));

    // A sandbox without a network has no policy to change.
    let plain = t
        .hypervisor
        .create_sandbox(config("minimal"))
        .await
        .unwrap();
    let err = plain
        .update_network(allow_only(&["198.18.202.2/32"]))
        .await
        .unwrap_err();
    assert!(matches!(err, UpdateNetworkError::NoNetwork(_)), "{err:?}");
    plain.stop(true).await.unwrap();

    sandbox.stop(false).await.unwrap();
    other.stop(true).await.unwrap();
    drop((host_a, host_b));
    assert_eq!(network_objects().await, before, "nothing left behind");
    assert!(t.sandbox_dirs().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_network_input_names_the_field_and_leaves_nothing() {
    let test = "bad_network_input_names_the_field_and_leaves_nothing";
    if skip(test) {
        return;
    }
    let _serial = SERIAL.lock().await;
    let Some(t) = setup(test, &["minimal"]) else {
        return;
    };
    let before = network_objects().await;
    let with = |f: &dyn Fn(&mut SandboxConfig)| {
        let mut c = networked("minimal");
        f(&mut c);
        c
    };
    let cases: Vec<(SandboxConfig, &str)> = vec![
        (
            with(&|c| c.ports = vec![PortSpec::tcp(18080, 80), PortSpec::tcp(18080, 81)]),
            "ports[1].host_port",
        ),
        (
            with(&|c| {
                c.host_port = Some(18081);
                c.ports = vec![PortSpec::tcp(18081, 81)];
            }),
            "ports[0].host_port",
        ),
        (
            with(&|c| c.ports = vec![PortSpec::tcp(0, 80)]),
            "ports[0].host_port",
        ),
        (
            with(&|c| {
                c.egress = Some(EgressConfig {
                    allow: vec!["10.0.0.0/8".into(), "10.0.0.1/8".into()],
                    ..Default::default()
                })
            }),
            "egress.allow[1]",
        ),
        (
            with(&|c| {
                c.egress = Some(EgressConfig {
                    deny: vec!["bad_name.example".into()],
                    ..Default::default()
                })
            }),
            "egress.deny[0]",
        ),
    ];
    for (c, field) in cases {
        let err = t.hypervisor.create_sandbox(c).await.unwrap_err();
        let CreateSandboxError::Config(e) = &err else {
            panic!("{field}: {err:?}");
        };
        assert!(e.to_string().starts_with(field), "{field}: {e}");
    }

    // A host port in use: refused at create, named by its field.
    let taken = TcpListener::bind("0.0.0.0:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let c = with(&|c| c.ports = vec![PortSpec::tcp(free_port(), 80), PortSpec::tcp(port, 81)]);
    let err = t.hypervisor.create_sandbox(c).await.unwrap_err();
    assert!(
        matches!(&err, CreateSandboxError::PortUnavailable { field, port: p, .. }
            if field == "ports[1]" && *p == port),
        "{err:?}"
    );
    assert!(err.to_string().contains(&port.to_string()), "{err}");

    assert_eq!(network_objects().await, before, "nothing left behind");
    assert!(t.sandbox_dirs().is_empty());
}
