//! Host-side networking of NovaSandbox: one network namespace per sandbox, a
//! veth to the host, a tap for the VMM, NAT, published ports and an egress
//! policy.
//!
//! # Design
//!
//! Every guest sees the same addresses inside its own namespace — itself at
//! [`GUEST_ADDR`]`/30`, its gateway at [`GATEWAY_ADDR`] on the tap — so a
//! snapshot restores in any sandbox unchanged. What differs per sandbox is
//! on the host side: a namespace `nova-<id>` (bind-mounted at
//! `/run/netns/nova-<id>`, so `ip netns` sees it), a veth whose host end
//! (`nova<hash>`) gets a unique `/30` from an [`AddressPool`], and an nft
//! table `inet nova-<id>` holding all of the sandbox's host rules, so that
//! teardown is one `delete table`.
//!
//! ```text
//! runtime                       nova-net                              kernel
//! -------                       --------                              ------
//! NetworkSpec::validate() ----> field-named SpecError
//! SandboxNetwork::create() ---> hold host ports (bind), lease a /30
//!                               netns::create   (thread: unshare + bind mount)
//!                               link::add_veth  (rtnetlink, peer born in netns)
//!                               run_in_async(netns): lo, veth0, route, tap0,
//!                                   forwarding, nft table "nova"   (rtnetlink, ioctl, nft)
//!                               firewall::apply(host table)        (nft -j -f -)
//! backend: open_tap() --------> fd for QEMU -netdev tap,fd=N
//!          open_netns() ------> setns for Firecracker (opens tap0 by name)
//!                               dns::Resolver (policy names domains: sockets
//!                                   on the gateway address, a tokio task)
//! update_egress() ------------> flush sets + egress chain, one batch;
//!                               resolver filter, dns_redirect (netns)
//! counters() -----------------> veth Stats64 (rtnetlink)
//! teardown() / Drop ----------> delete table, tap, veth, netns
//! clean_leftovers(keep) ------> same, for names no live sandbox owns
//! ```
//!
//! Netlink work is [`rtnetlink`]; the one thing netlink cannot do, creating
//! a tap, is the tun driver's ioctls ([`tap`]); nftables rules are typed JSON
//! from the [`nftables`] crate, applied by its helper, which pipes them to
//! `nft -j -f -` (the library's documented path; the `nft` binary from the
//! `nftables` package must be installed). Nothing runs `ip` or `iptables`.
//!
//! Work inside a namespace happens on a short-lived thread that entered it
//! ([`netns::run_in_async`]); no thread of the caller's runtime ever changes
//! namespace, and there is no `fork()`.
//!
//! See [`firewall`] for the rules, [`dns`] for domain rules (and what they
//! cannot cover), and [`EgressPolicy`] for the order in
//! which egress rules apply. Always denied unless explicitly allowed: other
//! sandboxes (the whole pool), the host's own addresses and
//! [`METADATA_ADDR`].
//!
//! # Example
//!
//! ```no_run
//! use nova_net::{AddressPool, EgressPolicy, NetworkSpec, PortMapping, SandboxNetwork};
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let pool = AddressPool::default(); // 10.200.0.0/16, shared by all sandboxes
//! let spec = NetworkSpec {
//!     ports: vec![PortMapping::tcp(8080, 80)],
//!     egress: EgressPolicy::parse::<&str, &str>(false, &[], &["10.0.0.0/8"])?,
//!     dns_servers: nova_net::host_resolvers(),
//! };
//! let id = nova_core::SandboxId::random();
//! let mut net = SandboxNetwork::create(&id, &spec, &pool).await?;
//! let tap = net.open_tap(true).await?; // QEMU: -netdev tap,id=net0,fd=N
//! # drop(tap);
//! net.update_egress(EgressPolicy::block_all()).await?;
//! println!("{:?}", net.counters().await?);
//! net.teardown().await?;
//! # Ok(())
//! # }
//! ```
//!
//! # What is not here yet
//!
//! * IPv6 is not given to guests; the host drops IPv6 from sandboxes.
//! * The host's forward policy is not changed: an accept in the sandbox's
//!   table does not override a drop in another table (e.g. Docker's
//!   `DOCKER-USER`), so on such hosts forwarding for the pool must be allowed
//!   there too.
//! * Without root, the network is user-mode ([`passt`]: one passt process
//!   per sandbox, same guest addresses and published ports, no egress
//!   policy); the runtime chooses between the two.
//!
//! # Other hosts
//!
//! Everything above is Linux's. On other hosts (macOS, whose Apple VZ
//! backend attaches its own NAT device) only the pure types build — the
//! spec, the pool, the errors — and [`SandboxNetwork`] is a type with no
//! values whose constructors answer [`HostError::NotLinux`], so that the
//! runtime builds unchanged.
//!
//! # Requirements
//!
//! Root (or CAP_NET_ADMIN and CAP_SYS_ADMIN), `/dev/net/tun`, kernel
//! nf_tables with NAT, and `nft` on `PATH`. [`SandboxNetwork::create`] turns
//! on `net.ipv4.ip_forward` if it is off.

// Off Linux, the helpers that only the host side uses (leases, I/O errors)
// have no caller.
#![cfg_attr(not(target_os = "linux"), allow(dead_code))]
// The design notes above link the Linux-only modules.
#![cfg_attr(not(target_os = "linux"), allow(rustdoc::broken_intra_doc_links))]

use std::net::Ipv4Addr;

#[cfg(target_os = "linux")]
pub mod dns;
pub mod error;
#[cfg(target_os = "linux")]
pub mod firewall;
#[cfg(target_os = "linux")]
mod leftovers;
#[cfg(target_os = "linux")]
mod link;
#[cfg(target_os = "linux")]
pub mod netns;
pub mod passt;
pub mod pool;
#[cfg(target_os = "linux")]
mod sandbox;
pub mod spec;
#[cfg(target_os = "linux")]
pub mod tap;
#[cfg(target_os = "linux")]
pub mod testing;
#[cfg(not(target_os = "linux"))]
mod unsupported;

pub use error::{
    CountersError, CreateNetworkError, HostError, LeftoverError, OpenTapError, SpecError,
    TeardownError, UpdateEgressError,
};
#[cfg(target_os = "linux")]
pub use leftovers::{LeftoverReport, clean_leftovers};
pub use passt::{UserNetwork, UserOptions};
pub use pool::{AddressPool, DEFAULT_POOL, PoolTooSmall};
#[cfg(target_os = "linux")]
pub use sandbox::{CreateOptions, GuestLink, NetCounters, SandboxNetwork, host_veth_name};
pub use spec::{
    DomainName, EgressPolicy, EgressRule, Ipv4Cidr, NetworkSpec, PortMapping, Protocol,
};
#[cfg(target_os = "linux")]
pub use tap::TapOwner;
#[cfg(not(target_os = "linux"))]
pub use unsupported::{LeftoverReport, NetCounters, SandboxNetwork, clean_leftovers};

/// The guest's address, the same in every sandbox.
pub const GUEST_ADDR: Ipv4Addr = Ipv4Addr::new(169, 254, 0, 21);
/// The guest's gateway, on the tap in the namespace.
pub const GATEWAY_ADDR: Ipv4Addr = Ipv4Addr::new(169, 254, 0, 22);

/// The hardware address of the gateway (the tap) in every sandbox: fixed, so
/// that a guest restored from a snapshot, whose ARP cache names it, reaches
/// the gateway of whichever namespace it is restored into. Locally
/// administered, unicast.
pub const GATEWAY_MAC: [u8; 6] = [0x02, 0x4e, 0x4f, 0x56, 0x41, 0x01];
/// Prefix length of the guest link.
pub const GUEST_PREFIX: u8 = 30;
/// The cloud metadata address, always denied unless explicitly allowed.
pub const METADATA_ADDR: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
/// The tap's name inside every sandbox namespace.
pub const TAP_NAME: &str = "tap0";
/// The namespace end of the veth, inside every sandbox namespace.
pub const NETNS_VETH: &str = "veth0";
/// The guest-side device in the namespace with [`GuestLink::Veth`].
pub const VETH_GUEST_NAME: &str = "guest0";
/// Prefix of namespace and nft table names: `nova-<id>`.
pub const NAME_PREFIX: &str = "nova-";
/// Prefix of the alias that labels a host veth with its sandbox id.
pub const ALIAS_PREFIX: &str = "nova-net:";

/// The host's IPv4 resolvers, for guests whose spec names none: the
/// `nameserver` lines of `/etc/resolv.conf`, or of systemd-resolved's
/// upstream list when that file only points at a loopback stub (a guest
/// cannot reach the host's loopback).
pub fn host_resolvers() -> Vec<Ipv4Addr> {
    let parse = |path: &str| -> Vec<Ipv4Addr> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().strip_prefix("nameserver"))
            .filter_map(|rest| rest.trim().parse::<Ipv4Addr>().ok())
            .collect()
    };
    let mut servers: Vec<Ipv4Addr> = parse("/etc/resolv.conf")
        .into_iter()
        .filter(|a| !a.is_loopback())
        .collect();
    if servers.is_empty() {
        servers = parse("/run/systemd/resolve/resolv.conf")
            .into_iter()
            .filter(|a| !a.is_loopback())
            .collect();
    }
    servers
}
