//! End-to-end user-mode networking (passt) under QEMU, forced with
//! `Provider::set_net_mode(NetModeChoice::User)` even as root: the guest
//! keeps the namespace mode's addresses, reaches a test host through
//! passt's sockets, serves published TCP and UDP ports at
//! `127.0.0.1:host_port` (UDP from a host address that is not loopback:
//! see `nova_net::passt`); an egress policy is refused at create and at
//! update; a port in use is refused before passt starts; a pause to disk
//! holds the ports and the resume starts a new passt on them; stopping
//! leaves no passt process behind (counted over create/stop cycles).
//!
//! Needs `passt` on PATH (`make deps`), and root for the test host (a
//! namespace of its own, 198.18.210.0/30); otherwise each test prints a SKIP
//! line. Traffic goes only to loopback and to that test host, never off
//! this machine.

#![allow(clippy::unwrap_used, reason = "test code")]

mod common;

use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, UdpSocket};
use std::time::Duration;

use common::{config, setup, wait_until};
use nova_core::config::SandboxConfig;
use nova_core::error::{CreateSandboxError, UpdateNetworkError};
use nova_core::hypervisor::Hypervisor;
use nova_core::network::{EgressConfig, PortSpec};
use nova_core::sandbox::Sandbox;
use nova_net::{Ipv4Cidr, testing};
use nova_runtime::network::NetModeChoice;

/// One test at a time: each counts this process's passt children.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Why user-mode networking cannot be tested here, printed as a SKIP line.
fn skip(test: &str, needs_root: bool) -> bool {
    let why = nova_runtime::network::user_mode_unsupported_reason().or_else(|| {
        (needs_root && testing::unsupported_reason().is_some())
            .then(|| "the test host needs root (a namespace and a veth)".to_owned())
    });
    match why {
        Some(why) => {
            eprintln!("SKIP {test}: {why}");
            true
        }
        None => false,
    }
}

/// The passt processes this test process started (they are its children).
fn our_passts() -> Vec<u32> {
    let me = std::process::id();
    nova_net::passt::passt_pids()
        .into_iter()
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| {
                    // pid (comm) state ppid ...
                    let after = stat.rsplit_once(')')?.1;
                    after.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(me)
        })
        .collect()
}

fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn networked(template: &str) -> SandboxConfig {
    let mut c = config(template);
    c.enable_network = true;
    c
}

async fn sh(sandbox: &Sandbox, script: &str) -> String {
    let out = sandbox.execute_command(script).await.unwrap();
    assert!(
        out.success(),
        "{script}: {:?}\n{}\n{}",
        out.status,
        out.stdout_lossy(),
        out.stderr_lossy()
    );
    out.stdout_lossy()
}

/// `GET /` at `to`, retried until a server answers or `timeout` passes.
async fn http_get(to: SocketAddrV4, timeout: Duration) -> String {
    tokio::task::spawn_blocking(move || {
        let mut last = String::new();
        let found = wait_until(timeout, || match testing_http_get(to) {
            Ok(body) => {
                last = body;
                true
            }
            Err(e) => {
                last = e.to_string();
                false
            }
        });
        assert!(found, "GET http://{to}/ failed until the deadline: {last}");
        last
    })
    .await
    .unwrap()
}

fn testing_http_get(to: SocketAddrV4) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&to.into(), Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET / HTTP/1.0\r\nHost: {to}\r\n\r\n")?;
    let mut response = Vec::new();
    s.read_to_end(&mut response)?;
    let text = String::from_utf8_lossy(&response).into_owned();
    match text.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.") => Ok(body.to_owned()),
        _ => Err(std::io::Error::other(format!(
            "not an HTTP response: {text:?}"
        ))),
    }
}

/// A datagram from `from` to `to`, its echo back, retried until it comes
/// or `timeout` passes.
async fn udp_echo(
    from: Ipv4Addr,
    to: SocketAddrV4,
    payload: &'static [u8],
    timeout: Duration,
) -> Vec<u8> {
    tokio::task::spawn_blocking(move || {
        let socket = UdpSocket::bind(SocketAddrV4::new(from, 0)).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut got = Vec::new();
        let answered = wait_until(timeout, || {
            if socket.send_to(payload, to).is_err() {
                return false;
            }
            let mut buf = [0u8; 1500];
            match socket.recv_from(&mut buf) {
                Ok((n, _)) => {
                    got = buf[..n].to_vec();
                    true
                }
                Err(_) => false,
            }
        });
        assert!(answered, "no UDP echo from {to}");
        got
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_mode_guest_reaches_a_test_host_and_serves_tcp_and_udp_ports() {
    let test = "user_mode_guest_reaches_a_test_host_and_serves_tcp_and_udp_ports";
    if skip(test, true) {
        return;
    }
    let _serial = SERIAL.lock().await;
    let Some(t) = setup(test, &["python"]) else {
        return;
    };
    t.hypervisor.set_net_mode(NetModeChoice::User);
    let before = our_passts();
    // A test host on a link of its own. passt connects from the host's
    // own network stack, which routes to it over the test host's veth.
    let pid = std::process::id();
    let upstream = testing::TestHost::create(
        &format!("nvu{pid}-up"),
        &format!("nvuh{}", pid % 100_000),
        Ipv4Cidr::new(Ipv4Addr::new(198, 18, 210, 0), 30).unwrap(),
    )
    .await
    .unwrap();
    let server = testing::serve_http(
        Some(upstream.netns()),
        SocketAddrV4::new(upstream.addr(), 8080),
        b"hello through passt\n".to_vec(),
    )
    .await
    .unwrap();

    let (tcp_port, udp_port) = (free_tcp_port(), free_udp_port());
    let mut c = networked("python");
    c.ports = vec![
        PortSpec {
            host_ip: Some(Ipv4Addr::LOCALHOST),
            ..PortSpec::tcp(tcp_port, 8000)
        },
        PortSpec::udp(udp_port, 9000),
    ];
    c.validate().unwrap();
    let sandbox = t.hypervisor.create_sandbox(c).await.unwrap();
    let passts = our_passts();
    assert_eq!(
        passts.len(),
        before.len() + 1,
        "one passt for the sandbox: {passts:?}"
    );

    // The guest has the namespace mode's link: address, gateway, MTU.
    let addr = sh(&sandbox, "cat /proc/net/fib_trie").await;
    assert!(addr.contains("169.254.0.21"), "{addr}");
    let routes = sh(&sandbox, "cat /proc/net/route").await;
    assert!(
        routes
            .lines()
            .any(|l| l.starts_with("eth0\t00000000\t1600FEA9")),
        "default route via 169.254.0.22: {routes}"
    );
    assert_eq!(
        sh(&sandbox, "cat /sys/class/net/eth0/mtu").await.trim(),
        "1500"
    );

    // Out through passt to the test host.
    let body = sh(
        &sandbox,
        &format!("curl -sS --max-time 20 http://{}/", server.addr()),
    )
    .await;
    assert_eq!(body, "hello through passt\n");
    assert!(!server.peers().is_empty(), "the test host saw the guest");

    // In through published ports: TCP on 127.0.0.1, UDP on every address.
    sh(
        &sandbox,
        "mkdir -p /tmp/www && echo 'served by the guest' > /tmp/www/index.html && \
         (cd /tmp/www && nohup python3 -m http.server 8000 >/dev/null 2>&1 &) && \
         nohup python3 -c 'import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n\
         s.bind((\"0.0.0.0\",9000))\nwhile True:\n d,a=s.recvfrom(2048)\n s.sendto(d,a)' \
         >/dev/null 2>&1 &",
    )
    .await;
    let page = http_get(
        SocketAddrV4::new(Ipv4Addr::LOCALHOST, tcp_port),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(page, "served by the guest\n");
    // UDP from a host address that is not loopback: with --no-map-gw,
    // passt 2023's replies to a loopback client go nowhere (see
    // nova_net::passt).
    let echo = udp_echo(
        upstream.host_side(),
        SocketAddrV4::new(upstream.host_side(), udp_port),
        b"ping over udp",
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(echo, b"ping over udp");

    // No counters in user mode: unavailable, not 0.
    let stats = sandbox.get_stats().await.unwrap();
    assert_eq!(stats.vmm.net_rx_bytes, None, "{:?}", stats.vmm);
    assert_eq!(stats.vmm.net_tx_bytes, None, "{:?}", stats.vmm);

    // An egress policy cannot be applied to a running user-mode sandbox.
    let err = sandbox
        .update_network(EgressConfig {
            block_all: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        matches!(&err, UpdateNetworkError::Unsupported(why) if why.contains("CAP_NET_ADMIN")),
        "{err:?}"
    );

    sandbox.stop(false).await.unwrap();
    assert_eq!(our_passts(), before, "stop leaves no passt behind");
    assert!(t.sandbox_dirs().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_mode_refuses_an_egress_policy_and_a_taken_port_before_starting_passt() {
    let test = "user_mode_refuses_an_egress_policy_and_a_taken_port_before_starting_passt";
    if skip(test, false) {
        return;
    }
    let _serial = SERIAL.lock().await;
    let Some(t) = setup(test, &["minimal"]) else {
        return;
    };
    t.hypervisor.set_net_mode(NetModeChoice::User);
    let before = our_passts();

    let mut c = networked("minimal");
    c.egress = Some(EgressConfig {
        allow: vec!["198.18.210.0/30".into()],
        block_all: true,
        ..Default::default()
    });
    c.validate().unwrap();
    let err = t.hypervisor.create_sandbox(c).await.unwrap_err();
    assert!(
        matches!(&err, CreateSandboxError::Unsupported { reason }
            if reason.contains("egress policy") && reason.contains("CAP_NET_ADMIN")),
        "{err:?}"
    );

    let taken = TcpListener::bind("0.0.0.0:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let mut c = networked("minimal");
    c.host_port = Some(port);
    c.guest_port = 80;
    c.validate().unwrap();
    let err = t.hypervisor.create_sandbox(c).await.unwrap_err();
    assert!(
        matches!(&err, CreateSandboxError::PortUnavailable { port: p, .. } if *p == port),
        "{err:?}"
    );
    assert!(err.to_string().contains(&port.to_string()), "{err}");

    assert_eq!(our_passts(), before, "no passt was left running");
    assert!(t.sandbox_dirs().is_empty(), "no sandbox directory is left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_mode_create_and_stop_cycles_leave_no_passt() {
    let test = "user_mode_create_and_stop_cycles_leave_no_passt";
    if skip(test, false) {
        return;
    }
    let _serial = SERIAL.lock().await;
    let Some(t) = setup(test, &["minimal"]) else {
        return;
    };
    t.hypervisor.set_net_mode(NetModeChoice::User);
    let before = our_passts();
    for cycle in 0..3 {
        let mut c = networked("minimal");
        c.host_port = Some(free_tcp_port());
        c.guest_port = 80;
        c.validate().unwrap();
        let sandbox = t.hypervisor.create_sandbox(c).await.unwrap();
        let during = our_passts();
        assert_eq!(during.len(), before.len() + 1, "cycle {cycle}: {during:?}");
        let dir = t.sandbox_dirs().pop().unwrap();
        let pidfile = std::fs::read_to_string(dir.join(nova_net::passt::PIDFILE)).unwrap();
        assert!(
            during.contains(&pidfile.trim().parse().unwrap()),
            "cycle {cycle}: the pidfile names the sandbox's passt"
        );
        // Stop alternates between a clean power-off and a kill.
        sandbox.stop(cycle % 2 == 0).await.unwrap();
        assert_eq!(our_passts(), before, "cycle {cycle}: passt is gone");
        assert!(t.sandbox_dirs().is_empty(), "cycle {cycle}");
    }
}

/// A sandbox paused to disk loses its VMM and with it its passt (the
/// published port stays held, as in namespace mode); resuming starts a new
/// passt on the same port, and the guest's server, restored with its
/// memory, answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_mode_pause_to_disk_and_resume_start_a_new_passt_on_the_same_port() {
    let test = "user_mode_pause_to_disk_and_resume_start_a_new_passt_on_the_same_port";
    if skip(test, false) {
        return;
    }
    let _serial = SERIAL.lock().await;
    let Some(t) = setup(test, &["minimal"]) else {
        return;
    };
    t.hypervisor.set_net_mode(NetModeChoice::User);
    let before = our_passts();
    let port = free_tcp_port();
    let mut c = networked("minimal");
    c.host_port = Some(port);
    c.guest_port = 80;
    c.validate().unwrap();
    let sandbox = t.hypervisor.create_sandbox(c).await.unwrap();
    sh(
        &sandbox,
        "mkdir -p /tmp/w && echo 'before the pause' > /tmp/w/index.html && httpd -p 80 -h /tmp/w",
    )
    .await;
    let at = SocketAddrV4::new(Ipv4Addr::LOCALHOST, port);
    assert_eq!(
        http_get(at, Duration::from_secs(30)).await,
        "before the pause\n"
    );
    let first = our_passts();

    sandbox.pause_to_disk().await.unwrap();
    assert_eq!(our_passts(), before, "passt went with the VMM");
    assert!(
        TcpListener::bind(("127.0.0.1", port)).is_err(),
        "the published port stays held while the sandbox is on disk"
    );
    sandbox.resume().await.unwrap();
    let second = our_passts();
    assert_eq!(second.len(), before.len() + 1, "{second:?}");
    assert_ne!(first, second, "a new passt");
    assert_eq!(
        http_get(at, Duration::from_secs(30)).await,
        "before the pause\n"
    );

    sandbox.stop(false).await.unwrap();
    assert_eq!(our_passts(), before, "stop leaves no passt behind");
    assert!(t.sandbox_dirs().is_empty());
}

/// A snapshot taken in namespace mode (as root takes a template's) restores
/// in user mode and back: the guest's network device is the same in both
/// (no virtio-net header on the tap).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_restore_across_network_modes() {
    let test = "snapshots_restore_across_network_modes";
    if skip(test, true) {
        return;
    }
    let _serial = SERIAL.lock().await;
    let Some(t) = setup(test, &["minimal"]) else {
        return;
    };
    let snapshots = tempfile::tempdir().unwrap();
    for (taken_in, restored_in) in [
        (NetModeChoice::Namespace, NetModeChoice::User),
        (NetModeChoice::User, NetModeChoice::Namespace),
    ] {
        t.hypervisor.set_net_mode(taken_in);
        let source = t
            .hypervisor
            .create_sandbox(networked("minimal"))
            .await
            .unwrap();
        source.pause().await.unwrap();
        let dir = snapshots.path().join(format!("{taken_in:?}"));
        let taken = t.hypervisor.snapshot_sandbox(source.id(), &dir).await;
        source.stop(true).await.unwrap();
        taken.unwrap();

        t.hypervisor.set_net_mode(restored_in);
        let restored = t
            .hypervisor
            .create_sandbox_from_snapshot(&dir)
            .await
            .unwrap_or_else(|e| panic!("taken in {taken_in:?}, restored in {restored_in:?}: {e}"));
        let shown = sh(&restored, "cat /sys/class/net/eth0/operstate").await;
        assert_eq!(shown.trim(), "up", "{taken_in:?} -> {restored_in:?}");
        restored.stop(true).await.unwrap();
    }
    assert!(t.sandbox_dirs().is_empty());
}
