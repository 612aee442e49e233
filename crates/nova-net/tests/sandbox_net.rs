//! Real sandbox networks, as root: namespaces, veths, taps, nft tables and
//! traffic between a guest, the host and test hosts.
//!
//! Traffic goes only to loopback and to test hosts these tests make in
//! namespaces of their own (198.18.0.0/15, the benchmarking range, on veths
//! with no route beyond their /30). The guest is a namespace joined by
//! `GuestLink::Veth` instead of a tap, so a process can play it. Each test
//! prints `SKIP` and passes when not root or without `nft` / nf_tables.
//!
//! Tests that count every sandbox object on the host take the write side of
//! `HOST`; the others the read side.

// SKIP lines go to stdout, where `cargo test` shows them.
#![allow(clippy::print_stdout)]

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::path::PathBuf;
use std::sync::LazyLock;
use std::time::Duration;

use hickory_proto::op::ResponseCode;
use nova_core::SandboxId;
use nova_net::testing::{self, Namespace, TestHost};
use nova_net::{
    AddressPool, CreateNetworkError, CreateOptions, EgressPolicy, GATEWAY_ADDR, GUEST_ADDR,
    GuestLink, Ipv4Cidr, NetworkSpec, PortMapping, SandboxNetwork, SpecError, TAP_NAME,
};
use tokio::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

/// A pool of its own, away from the default 10.200.0.0/16 a daemon on this
/// machine may use.
static POOL: LazyLock<AddressPool> =
    LazyLock::new(|| AddressPool::new(cidr("10.251.0.0/16")).expect("a /16 pool"));

static HOST: RwLock<()> = RwLock::const_new(());

const OK: Duration = Duration::from_secs(5);
/// How long a connection that must fail is given (drops time out).
const DENIED: Duration = Duration::from_millis(1500);

fn cidr(s: &str) -> Ipv4Cidr {
    s.parse().expect("test CIDR")
}

async fn shared(test: &str) -> Option<RwLockReadGuard<'static, ()>> {
    if let Some(why) = testing::unsupported_reason() {
        println!("SKIP: {test}: {why}");
        return None;
    }
    Some(HOST.read().await)
}

async fn exclusive(test: &str) -> Option<RwLockWriteGuard<'static, ()>> {
    if let Some(why) = testing::unsupported_reason() {
        println!("SKIP: {test}: {why}");
        return None;
    }
    Some(HOST.write().await)
}

/// `t<pid>-<name>`: unique per test run, so leftovers of a crashed run do
/// not collide.
fn id(name: &str) -> SandboxId {
    format!("t{}-{name}", std::process::id())
        .parse()
        .expect("valid sandbox id")
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local addr").port()
}

/// A sandbox whose guest is a namespace the test can run code in.
async fn veth_sandbox(name: &str, spec: &NetworkSpec) -> (Namespace, SandboxNetwork) {
    let guest = Namespace::create(&format!("nvt{}-{name}-guest", std::process::id()))
        .await
        .expect("guest namespace");
    let options = CreateOptions {
        guest_link: GuestLink::Veth {
            guest_netns: guest.path().to_path_buf(),
        },
        ..CreateOptions::default()
    };
    let net = SandboxNetwork::create_with(&id(name), spec, &POOL, options)
        .await
        .expect("create the sandbox network");
    (guest, net)
}

async fn test_host(name: &str, n: u8) -> TestHost {
    TestHost::create(
        &format!("nvt{}-{name}", std::process::id()),
        &format!("nvth{}{n}", std::process::id() % 10000),
        Ipv4Cidr::new(Ipv4Addr::new(198, 18, n, 0), 30).expect("/30"),
    )
    .await
    .expect("test host")
}

fn netns_path(net: &SandboxNetwork) -> PathBuf {
    net.netns_path().to_path_buf()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_makes_namespace_links_addresses_and_rules_and_teardown_removes_them() {
    let Some(_lock) = shared("create_makes_namespace_links_addresses_and_rules").await else {
        return;
    };
    let host_port = free_port();
    let spec = NetworkSpec {
        ports: vec![PortMapping::tcp(host_port, 80)],
        dns_servers: vec![Ipv4Addr::new(198, 18, 9, 53)],
        ..NetworkSpec::default()
    };
    let mut net = SandboxNetwork::create(&id("layout"), &spec, &POOL)
        .await
        .expect("create");
    let ns = netns_path(&net);
    assert!(ns.exists(), "{} exists", ns.display());
    assert_eq!(net.netns_name(), format!("nova-{}", id("layout")));
    assert_eq!(net.tap_name(), Some(TAP_NAME));

    // Host side: the veth with the pool's .1.
    let host_links = testing::links_with_addresses(None)
        .await
        .expect("host links");
    let (_, addrs) = host_links
        .iter()
        .find(|(n, _)| n == net.host_veth())
        .expect("host veth exists");
    assert_eq!(addrs, &vec![(net.host_addr(), 30)]);
    assert!(POOL.range().contains(net.host_addr()));
    let route_localnet = std::fs::read_to_string(format!(
        "/proc/sys/net/ipv4/conf/{}/route_localnet",
        net.host_veth()
    ))
    .expect("sysctl");
    assert_eq!(route_localnet.trim(), "1");

    // Namespace side: lo, veth0 with .2, tap0 with the gateway.
    let inner = testing::links_with_addresses(Some(&ns))
        .await
        .expect("netns links");
    let names: BTreeSet<&str> = inner.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, BTreeSet::from(["lo", "veth0", "tap0"]), "{inner:?}");
    let addr_of = |dev: &str| inner.iter().find(|(n, _)| n == dev).map(|(_, a)| a.clone());
    assert_eq!(addr_of("veth0"), Some(vec![(net.netns_addr(), 30)]));
    assert_eq!(addr_of("tap0"), Some(vec![(GATEWAY_ADDR, 30)]));

    // The tap opens, as QEMU would get it.
    let fd = net.open_tap(true).await.expect("open the tap");
    drop(fd);

    // Rules: the host table and the namespace's.
    let host_rules = nova_net::firewall::list_table_text(net.nft_table()).expect("host table");
    for needle in [
        format!("dnat ip to {}:80", net.netns_addr()),
        format!("tcp dport {host_port}"),
        "masquerade".to_owned(),
        "169.254.169.254".to_owned(),
        "10.251.0.0/16".to_owned(),
        "198.18.9.53".to_owned(),
        "fib daddr type local".to_owned(),
    ] {
        assert!(
            host_rules.contains(&needle),
            "host table lacks {needle:?}:\n{host_rules}"
        );
    }
    let ns_rules = testing::nft_list_in(&ns, "nova")
        .await
        .expect("netns table");
    assert!(
        ns_rules.contains(&format!("dnat ip to {GUEST_ADDR}")),
        "{ns_rules}"
    );
    assert!(ns_rules.contains("tcp dport 80"), "{ns_rules}");

    // Teardown removes everything, and a namespace held open by an fd (as a
    // VMM would hold it) is left with loopback only.
    let held = net.open_netns().expect("open the namespace");
    net.teardown().await.expect("teardown");
    assert!(!ns.exists());
    let host_links = testing::links_with_addresses(None)
        .await
        .expect("host links");
    assert!(!host_links.iter().any(|(n, _)| n == net.host_veth()));
    assert!(
        !testing::host_nft_tables()
            .expect("tables")
            .contains(&net.nft_table().to_owned())
    );
    let fd_path = PathBuf::from(format!(
        "/proc/self/fd/{}",
        std::os::fd::AsRawFd::as_raw_fd(&held)
    ));
    let left = testing::links_with_addresses(Some(&fd_path))
        .await
        .expect("held netns links");
    let left: Vec<&str> = left.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        left,
        vec!["lo"],
        "tap and veth are gone even while the namespace lives"
    );
    net.teardown().await.expect("teardown is idempotent");
    assert!(matches!(
        net.open_tap(false).await,
        Err(nova_net::OpenTapError::TornDown)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_reaches_a_test_host_through_nat_and_counters_count_it() {
    let Some(_lock) = shared("guest_reaches_a_test_host_through_nat").await else {
        return;
    };
    let upstream = test_host("nat-up", 1).await;
    let body: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let server = testing::serve_http(
        Some(upstream.netns()),
        SocketAddrV4::new(upstream.addr(), 8080),
        body.clone(),
    )
    .await
    .expect("server");
    let (guest, mut net) = veth_sandbox("nat", &NetworkSpec::default()).await;

    let got = testing::http_get(Some(guest.path()), server.addr(), OK)
        .await
        .expect("the guest reaches the test host");
    assert_eq!(got, body, "byte-exact body");
    // Masqueraded twice: the test host sees the host's address on its link.
    let peers = server.peers();
    assert!(
        peers
            .iter()
            .all(|p| p.ip() == std::net::IpAddr::V4(upstream.host_side())),
        "{peers:?}"
    );

    let c = net.counters().await.expect("counters");
    assert!(c.rx_bytes >= body.len() as u64, "{c:?}");
    assert!(
        c.tx_bytes > 0 && c.tx_packets > 0 && c.rx_packets > 0,
        "{c:?}"
    );
    net.teardown().await.expect("teardown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_port_reaches_the_guest_from_host_loopback_and_from_outside() {
    let Some(_lock) = shared("published_port_reaches_the_guest").await else {
        return;
    };
    let host_port = free_port();
    let udp_port = free_port();
    let spec = NetworkSpec {
        ports: vec![
            PortMapping::tcp(host_port, 80),
            PortMapping::udp(udp_port, 53),
        ],
        ..NetworkSpec::default()
    };
    let (guest, mut net) = veth_sandbox("ports", &spec).await;
    let _web = testing::serve_http(
        Some(guest.path()),
        SocketAddrV4::new(GUEST_ADDR, 80),
        b"hello from the guest".to_vec(),
    )
    .await
    .expect("guest server");

    // The host itself, at 127.0.0.1 (output-chain DNAT + route_localnet).
    let got = testing::http_get(None, SocketAddrV4::new(Ipv4Addr::LOCALHOST, host_port), OK)
        .await
        .expect("127.0.0.1:host_port reaches the guest");
    assert_eq!(got, b"hello from the guest");

    // UDP too.
    let echo = testing::serve_udp_echo(guest.path(), SocketAddrV4::new(GUEST_ADDR, 53))
        .await
        .expect("guest UDP echo");
    let client = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp client");
    client.set_read_timeout(Some(OK)).expect("timeout");
    client
        .send_to(b"ping over udp", ("127.0.0.1", udp_port))
        .expect("send");
    let mut buf = [0u8; 64];
    let (n, _) = client
        .recv_from(&mut buf)
        .expect("the guest echoes over UDP");
    assert_eq!(&buf[..n], b"ping over udp");
    drop(echo);

    // The port is held: nothing else can bind it while the sandbox lives.
    assert!(TcpListener::bind(("127.0.0.1", host_port)).is_err());

    // From outside: a test host reaching the host's address on its link.
    let client = test_host("ports-client", 2).await;
    let got = testing::http_get(
        Some(client.netns()),
        SocketAddrV4::new(client.host_side(), host_port),
        OK,
    )
    .await
    .expect("a client outside the host reaches the published port");
    assert_eq!(got, b"hello from the guest");

    // An unpublished port of the guest is not reachable.
    let _other = testing::serve_http(
        Some(guest.path()),
        SocketAddrV4::new(GUEST_ADDR, 81),
        b"no".to_vec(),
    )
    .await
    .expect("second guest server");
    assert!(
        testing::http_get(None, SocketAddrV4::new(net.netns_addr(), 81), DENIED)
            .await
            .is_err(),
        "an unpublished guest port must not be reachable"
    );

    net.teardown().await.expect("teardown");
    TcpListener::bind(("127.0.0.1", host_port)).expect("the port is free again after teardown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandboxes_are_isolated_from_each_other_and_from_the_host() {
    let Some(_lock) = shared("sandboxes_are_isolated").await else {
        return;
    };
    let upstream = test_host("iso-up", 3).await;
    let _server = testing::serve_http(
        Some(upstream.netns()),
        SocketAddrV4::new(upstream.addr(), 8080),
        b"upstream".to_vec(),
    )
    .await
    .expect("server");
    let b_port = free_port();
    let (guest_a, mut a) = veth_sandbox("iso-a", &NetworkSpec::default()).await;
    let (guest_b, mut b) = veth_sandbox(
        "iso-b",
        &NetworkSpec {
            ports: vec![PortMapping::tcp(b_port, 80)],
            ..NetworkSpec::default()
        },
    )
    .await;
    let _web_b = testing::serve_http(
        Some(guest_b.path()),
        SocketAddrV4::new(GUEST_ADDR, 80),
        b"b".to_vec(),
    )
    .await
    .expect("B's server");

    // Same guest address, side by side: both reach the test host.
    for guest in [&guest_a, &guest_b] {
        let got = testing::http_get(
            Some(guest.path()),
            SocketAddrV4::new(upstream.addr(), 8080),
            OK,
        )
        .await
        .expect("each guest reaches the test host");
        assert_eq!(got, b"upstream");
    }

    // A cannot reach B, not even B's published port at B's address.
    assert!(
        testing::http_get(
            Some(guest_a.path()),
            SocketAddrV4::new(b.netns_addr(), 80),
            DENIED
        )
        .await
        .is_err(),
        "sandbox A reached sandbox B"
    );
    // A cannot reach a service on the host, on any of the host's addresses
    // it can route to (its own link's, another sandbox's link's).
    let host_service = TcpListener::bind("0.0.0.0:0").expect("host service");
    let port = host_service.local_addr().expect("addr").port();
    for host_ip in [a.host_addr(), b.host_addr(), upstream.host_side()] {
        assert!(
            testing::http_get(
                Some(guest_a.path()),
                SocketAddrV4::new(host_ip, port),
                DENIED
            )
            .await
            .is_err(),
            "sandbox A reached a host service at {host_ip}:{port}"
        );
    }
    // The metadata address is rejected by rule (no traffic is sent there:
    // it may exist beyond this machine).
    let rules = nova_net::firewall::list_table_text(a.nft_table()).expect("rules");
    assert!(rules.contains("ip daddr 169.254.169.254 reject"), "{rules}");

    a.teardown().await.expect("teardown A");
    b.teardown().await.expect("teardown B");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_allow_and_deny_lists_apply_and_change_while_running() {
    let Some(_lock) = shared("egress_allow_and_deny").await else {
        return;
    };
    let one = test_host("egress-1", 4).await;
    let two = test_host("egress-2", 5).await;
    let s1 = testing::serve_http(
        Some(one.netns()),
        SocketAddrV4::new(one.addr(), 8080),
        b"one".to_vec(),
    )
    .await
    .expect("server one");
    let s2 = testing::serve_http(
        Some(two.netns()),
        SocketAddrV4::new(two.addr(), 8080),
        b"two".to_vec(),
    )
    .await
    .expect("server two");
    let allow_one =
        EgressPolicy::parse::<_, &str>(true, &[format!("{}/32", one.addr())], &[]).expect("policy");
    let (guest, mut net) = veth_sandbox(
        "egress",
        &NetworkSpec {
            egress: allow_one,
            ..NetworkSpec::default()
        },
    )
    .await;
    let reach = |to: SocketAddrV4| {
        let g = guest.path().to_path_buf();
        async move { testing::http_get(Some(&g), to, DENIED).await.is_ok() }
    };

    assert!(reach(s1.addr()).await, "allowed CIDR reachable");
    assert!(!reach(s2.addr()).await, "everything else blocked");

    // Flip the allow list without a restart.
    let allow_two = EgressPolicy::parse::<_, &str>(true, &[cidr("198.18.5.0/24").to_string()], &[])
        .expect("policy");
    net.update_egress(allow_two).await.expect("update");
    assert!(!reach(s1.addr()).await, "no longer allowed");
    assert!(reach(s2.addr()).await, "newly allowed");

    // Open by default, with one deny.
    let deny_one =
        EgressPolicy::parse::<&str, _>(false, &[], &[one.addr().to_string()]).expect("policy");
    net.update_egress(deny_one).await.expect("update");
    assert!(!reach(s1.addr()).await, "denied");
    assert!(reach(s2.addr()).await, "not denied");
    assert_eq!(net.spec().egress.deny.len(), 1);

    net.teardown().await.expect("teardown");
    assert!(matches!(
        net.update_egress(EgressPolicy::default()).await,
        Err(nova_net::UpdateEgressError::TornDown)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn domain_allowlist_resolves_and_opens_only_allowed_names_and_changes_live() {
    let Some(_lock) = shared("domain_allowlist").await else {
        return;
    };
    let dns_host = test_host("dns", 6).await;
    let allowed_host = test_host("dom-allowed", 7).await;
    let blocked_host = test_host("dom-blocked", 8).await;
    let dns = testing::serve_dns(
        dns_host.netns(),
        SocketAddrV4::new(dns_host.addr(), 53),
        vec![
            ("allowed.nova.test".into(), allowed_host.addr()),
            ("blocked.nova.test".into(), blocked_host.addr()),
        ],
        5,
    )
    .await
    .expect("test resolver");
    let allowed = testing::serve_http(
        Some(allowed_host.netns()),
        SocketAddrV4::new(allowed_host.addr(), 80),
        b"allowed body\n".to_vec(),
    )
    .await
    .expect("allowed server");
    let blocked = testing::serve_http(
        Some(blocked_host.netns()),
        SocketAddrV4::new(blocked_host.addr(), 80),
        b"blocked body\n".to_vec(),
    )
    .await
    .expect("blocked server");
    // Not block_all: an allowlist of domains closes everything else anyway.
    let only_allowed =
        EgressPolicy::parse::<_, &str>(false, &["allowed.nova.test"], &[]).expect("policy");
    let (guest, mut net) = veth_sandbox(
        "domains",
        &NetworkSpec {
            egress: only_allowed,
            dns_servers: vec![dns_host.addr()],
            ..NetworkSpec::default()
        },
    )
    .await;
    let g = guest.path().to_path_buf();
    let ask = |name: &'static str, server: Ipv4Addr, tcp: bool| {
        let g = g.clone();
        async move {
            testing::resolve(&g, server, name, tcp, OK)
                .await
                .expect("the sandbox's resolver answers")
        }
    };
    let get = |to: SocketAddrV4, timeout: Duration| {
        let g = g.clone();
        async move { testing::http_get(Some(&g), to, timeout).await }
    };

    let answer = ask("allowed.nova.test", dns_host.addr(), false).await;
    assert_eq!(answer.code, ResponseCode::NoError);
    assert_eq!(answer.addrs, vec![allowed_host.addr()]);
    let body = get(allowed.addr(), OK)
        .await
        .expect("an allowed name's address is open");
    assert_eq!(body, b"allowed body\n");
    // Over TCP, and to a server the guest picks: redirected all the same.
    let answer = ask("ALLOWED.nova.test.", Ipv4Addr::new(198, 18, 99, 1), true).await;
    assert_eq!(answer.addrs, vec![allowed_host.addr()]);

    let answer = ask("blocked.nova.test", dns_host.addr(), false).await;
    assert_eq!(answer.code, ResponseCode::NXDomain);
    assert!(answer.addrs.is_empty());
    assert!(
        !dns.queries().iter().any(|q| q == "blocked.nova.test"),
        "a refused name never reaches upstream: {:?}",
        dns.queries()
    );
    assert!(
        get(blocked.addr(), DENIED).await.is_err(),
        "a hard-coded address of no allowed name stays closed"
    );
    let learned = nova_net::firewall::list_table_text(net.nft_table()).expect("host table");
    assert!(
        learned.contains(&allowed_host.addr().to_string()),
        "the answer is in the set: {learned}"
    );

    // Allow the second name while the sandbox runs.
    let both = EgressPolicy::parse::<_, &str>(false, &["allowed.nova.test", "*.nova.test"], &[])
        .expect("policy");
    net.update_egress(both).await.expect("update");
    let answer = ask("blocked.nova.test", dns_host.addr(), false).await;
    assert_eq!(answer.addrs, vec![blocked_host.addr()]);
    assert_eq!(
        get(blocked.addr(), OK).await.expect("newly allowed"),
        b"blocked body\n"
    );
    get(allowed.addr(), OK)
        .await
        .expect("an address learned before the update is kept");

    // Deny one name under the wildcard: its learned address is closed.
    let deny =
        EgressPolicy::parse(false, &["*.nova.test"], &["blocked.nova.test"]).expect("policy");
    net.update_egress(deny).await.expect("update");
    assert_eq!(
        ask("blocked.nova.test", dns_host.addr(), false).await.code,
        ResponseCode::NXDomain
    );
    assert!(get(blocked.addr(), DENIED).await.is_err(), "closed again");

    // Back to CIDRs only: no resolver, the guest's DNS goes upstream itself.
    let cidrs = EgressPolicy::parse::<_, &str>(true, &[format!("{}/32", blocked_host.addr())], &[])
        .expect("policy");
    net.update_egress(cidrs).await.expect("update");
    assert_eq!(
        ask("blocked.nova.test", dns_host.addr(), false).await.addrs,
        vec![blocked_host.addr()]
    );
    get(blocked.addr(), OK).await.expect("allowed by CIDR");
    assert!(
        get(allowed.addr(), DENIED).await.is_err(),
        "not allowed any more"
    );

    net.teardown().await.expect("teardown");
}

#[derive(Debug, PartialEq, Eq)]
struct Census {
    netns: usize,
    veths: usize,
    tables: usize,
}

async fn census() -> Census {
    // Only this test process's objects (ids `t<pid>-…`), so networks other
    // nova processes make on the host meanwhile do not count.
    let ours = format!("t{}-", std::process::id());
    let netns = testing::namespaces()
        .expect("namespaces")
        .iter()
        .filter(|n| n.starts_with(&format!("nova-{ours}")))
        .count();
    let veths = testing::sandbox_veths()
        .await
        .expect("veths")
        .iter()
        .filter(|(_, alias)| alias.contains(&ours))
        .count();
    let tables = testing::host_nft_tables()
        .expect("tables")
        .iter()
        .filter(|t| t.starts_with(&format!("nova-{ours}")))
        .count();
    Census {
        netns,
        veths,
        tables,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_create_teardown_cycles_leave_nothing() {
    let Some(_lock) = exclusive("twenty_create_teardown_cycles_leave_nothing").await else {
        return;
    };
    let before = census().await;
    let leased = POOL.leased();
    let (mut create_ms, mut teardown_ms) = (Vec::new(), Vec::new());
    for i in 0..20 {
        let spec = NetworkSpec {
            ports: vec![
                PortMapping::tcp(free_port(), 80),
                PortMapping::udp(free_port(), 53),
            ],
            egress: EgressPolicy::parse::<&str, &str>(
                i % 2 == 0,
                &["198.18.0.0/15"],
                &["198.18.7.0/24"],
            )
            .expect("policy"),
            ..NetworkSpec::default()
        };
        let started = std::time::Instant::now();
        let mut net = SandboxNetwork::create(&id(&format!("cycle{i}")), &spec, &POOL)
            .await
            .expect("create");
        create_ms.push(started.elapsed().as_secs_f64() * 1000.0);
        let during = census().await;
        assert_eq!(during.netns, before.netns + 1);
        assert_eq!(during.veths, before.veths + 1);
        assert_eq!(during.tables, before.tables + 1);
        let started = std::time::Instant::now();
        net.teardown().await.expect("teardown");
        teardown_ms.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    create_ms.sort_by(f64::total_cmp);
    teardown_ms.sort_by(f64::total_cmp);
    // A figure for the report, not an assertion (timings are benchmarks).
    println!(
        "create p50 {:.1} ms (max {:.1}), teardown p50 {:.1} ms (max {:.1})",
        create_ms[10], create_ms[19], teardown_ms[10], teardown_ms[19]
    );
    let after = census().await;
    println!("census before {before:?}, after {after:?}");
    assert_eq!(after, before, "20 cycles left objects behind");
    assert_eq!(POOL.leased(), leased, "every /30 went back to the pool");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_tears_down_and_leftover_cleaning_finds_orphans() {
    let Some(_lock) = exclusive("drop_tears_down_and_leftover_cleaning").await else {
        return;
    };
    let before = census().await;
    let net = SandboxNetwork::create(&id("dropped"), &NetworkSpec::default(), &POOL)
        .await
        .expect("create");
    drop(net);
    assert_eq!(census().await, before, "Drop removed everything");

    // A sandbox whose owner died: its objects stay until leftover cleaning.
    let orphan = SandboxNetwork::create(&id("orphan"), &NetworkSpec::default(), &POOL)
        .await
        .expect("create");
    let (name, veth, table) = (
        orphan.netns_name().to_owned(),
        orphan.host_veth().to_owned(),
        orphan.nft_table().to_owned(),
    );
    let _leaked = std::mem::ManuallyDrop::new(orphan);
    let kept = SandboxNetwork::create(&id("kept"), &NetworkSpec::default(), &POOL)
        .await
        .expect("create");
    let mine = format!("t{}-", std::process::id());
    let kept_id = id("kept").to_string();
    let report = nova_net::clean_leftovers(|sid| !sid.starts_with(&mine) || sid == kept_id)
        .await
        .expect("clean");
    assert_eq!(report.netns, vec![name]);
    assert_eq!(report.links, vec![veth]);
    assert_eq!(report.tables, vec![table]);
    assert!(kept.netns_path().exists(), "a kept sandbox is untouched");
    drop(kept);
    assert_eq!(census().await, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_by_field_and_leaves_nothing() {
    let Some(_lock) = exclusive("bad_input_is_refused_by_field").await else {
        return;
    };
    let before = census().await;

    let busy = TcpListener::bind("0.0.0.0:0").expect("busy port");
    let port = busy.local_addr().expect("addr").port();
    let spec = NetworkSpec {
        ports: vec![
            PortMapping::tcp(free_port(), 80),
            PortMapping::tcp(port, 81),
        ],
        ..NetworkSpec::default()
    };
    match SandboxNetwork::create(&id("busy"), &spec, &POOL).await {
        Err(CreateNetworkError::Spec(SpecError::PortUnavailable { field, port: p, .. })) => {
            assert_eq!(field, "ports[1].host_port");
            assert_eq!(p, port);
        }
        other => panic!("expected PortUnavailable, got {other:?}"),
    }

    let spec = NetworkSpec {
        ports: vec![PortMapping::tcp(0, 80)],
        ..NetworkSpec::default()
    };
    let err = SandboxNetwork::create(&id("zero"), &spec, &POOL)
        .await
        .expect_err("port 0");
    assert!(err.to_string().contains("ports[0].host_port"), "{err}");

    let spec = NetworkSpec {
        ports: vec![PortMapping::tcp(18080, 80), PortMapping::tcp(18080, 90)],
        ..NetworkSpec::default()
    };
    let err = SandboxNetwork::create(&id("dup"), &spec, &POOL)
        .await
        .expect_err("duplicate");
    assert!(err.to_string().contains("ports[1].host_port"), "{err}");

    let err = EgressPolicy::parse::<&str, &str>(false, &["10.0.0.0/8", "10.1.2.3/8"], &[])
        .expect_err("host bits");
    assert_eq!(err.field(), "egress.allow[1]");

    assert_eq!(census().await, before, "refused input left nothing");

    // A second network with the same id fails without harming the first.
    let mut first = SandboxNetwork::create(&id("twice"), &NetworkSpec::default(), &POOL)
        .await
        .expect("first");
    let err = SandboxNetwork::create(&id("twice"), &NetworkSpec::default(), &POOL)
        .await
        .expect_err("same id");
    assert!(
        matches!(err, CreateNetworkError::AlreadyExists { .. }),
        "{err:?}"
    );
    assert!(first.netns_path().exists());
    let links = testing::links_with_addresses(None).await.expect("links");
    assert!(
        links.iter().any(|(n, _)| n == first.host_veth()),
        "first's veth survives"
    );
    first.teardown().await.expect("teardown");
    assert_eq!(census().await, before);
}
