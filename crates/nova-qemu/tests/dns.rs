//! End-to-end domain egress rules under QEMU: a guest whose policy allows
//! one domain resolves it through the sandbox's resolver and fetches from
//! it; another name does not resolve and its address stays closed even by
//! IP; an `update_network` allowing the second name opens it without a
//! restart; stopping leaves no network object behind.
//!
//! Needs root, `/dev/net/tun` and `nft`; otherwise it prints a SKIP line
//! and passes. The sandboxes' upstream DNS server is a test resolver in a
//! namespace of this test (`NOVA_DNS_SERVERS`); traffic goes only to test
//! hosts in 198.18.211.0/30 - 198.18.213.0/30, never off this machine.
//! This file holds one test: it sets `NOVA_DNS_SERVERS` for its process.

#![allow(clippy::unwrap_used, reason = "test code")]

mod common;

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use common::{config, setup};
use nova_core::exec::ExecRequest;
use nova_core::hypervisor::Hypervisor;
use nova_core::network::EgressConfig;
use nova_core::sandbox::Sandbox;
use nova_net::{Ipv4Cidr, testing};

/// The body of `GET url` fetched by the guest with `curl` (name
/// resolution included, through the guest's glibc), or its stderr when
/// that fails within 10 s. (Not the minimal template's busybox `wget`:
/// that static binary crashes in glibc's resolver.)
async fn guest_get(sandbox: &Sandbox, url: &str) -> Result<String, String> {
    let request =
        ExecRequest::shell(format!("curl -sS --max-time 5 {url}")).timeout(Duration::from_secs(10));
    let out = sandbox.execute_command(request).await.unwrap();
    if out.success() {
        Ok(out.stdout_lossy())
    } else {
        Err(out.stderr_lossy())
    }
}

fn allow(entries: &[&str]) -> EgressConfig {
    EgressConfig {
        block_all: false,
        allow: entries.iter().map(|e| e.to_string()).collect(),
        deny: Vec::new(),
    }
}

async fn test_host(pid: u32, name: &str, third: u8) -> testing::TestHost {
    testing::TestHost::create(
        &format!("nvd{pid}-{name}"),
        &format!("nvd{name}{}", pid % 10_000),
        Ipv4Cidr::new(Ipv4Addr::new(198, 18, third, 0), 30).unwrap(),
    )
    .await
    .unwrap()
}

#[test]
fn a_domain_allowlist_resolves_and_opens_only_allowed_names_in_a_guest() {
    let test = "a_domain_allowlist_resolves_and_opens_only_allowed_names_in_a_guest";
    if let Some(why) = nova_runtime::network::unsupported_reason() {
        println!("SKIP {test}: {why}");
        return;
    }
    let dns_addr = Ipv4Addr::new(198, 18, 211, 2);
    // SAFETY: this binary's only test sets the variable before it starts a
    // runtime or any thread of its own; the test harness's threads do not
    // read the environment meanwhile.
    unsafe { std::env::set_var(nova_runtime::network::DNS_SERVERS_VAR, dns_addr.to_string()) };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run(test, dns_addr));
}

async fn run(test: &str, dns_addr: Ipv4Addr) {
    let Some(t) = setup(test, &["python"]) else {
        return;
    };
    let pid = std::process::id();
    let dns_host = test_host(pid, "d", 211).await;
    assert_eq!(dns_host.addr(), dns_addr);
    let allowed_host = test_host(pid, "a", 212).await;
    let blocked_host = test_host(pid, "b", 213).await;
    let dns = testing::serve_dns(
        dns_host.netns(),
        SocketAddrV4::new(dns_addr, 53),
        vec![
            ("allowed.nova.test".into(), allowed_host.addr()),
            ("blocked.nova.test".into(), blocked_host.addr()),
        ],
        30,
    )
    .await
    .unwrap();
    let _allowed = testing::serve_http(
        Some(allowed_host.netns()),
        SocketAddrV4::new(allowed_host.addr(), 80),
        b"allowed, byte for byte\n".to_vec(),
    )
    .await
    .unwrap();
    let _blocked = testing::serve_http(
        Some(blocked_host.netns()),
        SocketAddrV4::new(blocked_host.addr(), 80),
        b"blocked host\n".to_vec(),
    )
    .await
    .unwrap();

    let mut c = config("python");
    c.enable_network = true;
    c.egress = Some(allow(&["allowed.nova.test"]));
    let sandbox = t.hypervisor.create_sandbox(c).await.unwrap();
    let id = sandbox.id().to_string();

    assert_eq!(
        guest_get(&sandbox, "http://allowed.nova.test/")
            .await
            .unwrap(),
        "allowed, byte for byte\n"
    );
    let err = guest_get(&sandbox, "http://blocked.nova.test/")
        .await
        .expect_err("a name the policy does not allow");
    assert!(
        !dns.queries().iter().any(|q| q == "blocked.nova.test"),
        "refused by the sandbox's resolver, not upstream: {err}"
    );
    guest_get(&sandbox, &format!("http://{}/", blocked_host.addr()))
        .await
        .expect_err("the blocked host's address is closed by IP too");

    t.hypervisor
        .update_network(
            sandbox.id(),
            allow(&["allowed.nova.test", "blocked.nova.test"]),
        )
        .await
        .unwrap();
    assert_eq!(
        guest_get(&sandbox, "http://blocked.nova.test/")
            .await
            .unwrap(),
        "blocked host\n",
        "allowed by a live update"
    );
    let stats = sandbox.get_stats().await.unwrap();
    assert!(
        stats.vmm.net_rx_bytes.unwrap_or(0) > 0 && stats.vmm.net_tx_bytes.unwrap_or(0) > 0,
        "traffic is counted"
    );

    let netns = format!("nova-{id}");
    sandbox.stop(true).await.unwrap();
    assert!(
        !testing::namespaces().unwrap().contains(&netns),
        "the namespace is gone"
    );
    assert!(
        !testing::host_nft_tables().unwrap().contains(&netns),
        "the nft table is gone"
    );
}
