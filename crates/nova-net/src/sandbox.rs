//! [`SandboxNetwork`]: one sandbox's namespace, links, addresses and rules,
//! from creation to teardown.
//!
//! ```text
//! host netns                                 netns nova-<id>                  guest
//! ----------                                 ---------------                  -----
//! eth0 (default route)                       lo
//!   ^ masquerade (table inet nova-<id>)      veth0  <pool>.2/30 ----- default route via <pool>.1
//!   |                                          ^ masquerade 169.254.0.21 -> <pool>.2
//! nova<hash>  <pool>.1/30  <===== veth =====>  | DNAT published guest ports -> 169.254.0.21
//!   route_localnet=1 (DNAT from 127.0.0.1)   tap0   169.254.0.22/30 <== VMM ==> eth0 169.254.0.21/30
//! ```
//!
//! Creation order: check the spec, hold the host ports, lease a /30, make the
//! namespace, the veth (its peer born inside the namespace), the host-side
//! address, then everything inside the namespace on one thread that entered
//! it (loopback, veth0, default route, the tap, forwarding, the namespace's
//! nft table), and last the host's nft table. A failure at any step undoes
//! the steps before it, so nothing is left behind. [`SandboxNetwork::teardown`]
//! removes the host table, the tap, the veth and the namespace; `Drop` does
//! the same, blocking, if teardown was not called.

use std::fs;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use nova_core::SandboxId;
use tracing::{debug, info, warn};

use crate::dns::{DnsState, DomainFilter, Resolver, SharedDnsState};
use crate::error::{
    CountersError, CreateNetworkError, HostError, OpenTapError, TeardownError, UpdateEgressError,
};
use crate::firewall::{self, HostTable};
use crate::link;
use crate::netns::{self, CreateNetnsError};
use crate::pool::{AddressPool, SubnetLease};
use crate::spec::{EgressPolicy, Ipv4Cidr, NetworkSpec, PortReservation, reserve_ports};
use crate::tap::{self, TapOwner};
use crate::{
    ALIAS_PREFIX, GATEWAY_ADDR, GATEWAY_MAC, GUEST_ADDR, GUEST_PREFIX, NAME_PREFIX, NETNS_VETH,
    TAP_NAME, VETH_GUEST_NAME,
};

/// How the guest is attached inside the namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum GuestLink {
    /// A persistent tap device, [`TAP_NAME`], for a VMM (the normal case).
    #[default]
    Tap,
    /// A veth pair instead of the tap: `guest0` in the sandbox namespace,
    /// `eth0` in the namespace at `guest_netns`, configured as the agent
    /// configures a guest (169.254.0.21/30, default route via 169.254.0.22).
    /// For tests without a VM, and for a container-style guest. The caller
    /// owns `guest_netns`; teardown removes only the veth.
    Veth {
        /// The guest's namespace (a `/run/netns/...` path).
        guest_netns: PathBuf,
    },
}

/// Settings of [`SandboxNetwork::create_with`] beyond the spec.
#[derive(Clone, Debug)]
pub struct CreateOptions {
    /// How the guest is attached.
    pub guest_link: GuestLink,
    /// Who may open the tap (the VMM's user); default the current process's.
    pub tap_owner: TapOwner,
}

impl Default for CreateOptions {
    fn default() -> Self {
        Self {
            guest_link: GuestLink::Tap,
            tap_owner: TapOwner::current(),
        }
    }
}

/// A sandbox's traffic, counted on its veth, from the guest's side: `rx` is
/// what the sandbox received, `tx` what it sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetCounters {
    /// Bytes into the sandbox.
    pub rx_bytes: u64,
    /// Bytes out of the sandbox.
    pub tx_bytes: u64,
    /// Packets into the sandbox.
    pub rx_packets: u64,
    /// Packets out of the sandbox.
    pub tx_packets: u64,
}

/// The names of everything a sandbox network is made of, and which of them
/// this process created: all teardown needs, cloneable into `Drop`'s thread.
#[derive(Clone, Debug)]
struct Objects {
    netns_name: String,
    netns_path: PathBuf,
    table: String,
    host_veth: String,
    guest_dev: &'static str,
    netns_created: bool,
    veth_created: bool,
    table_created: bool,
}

/// One sandbox's network, live until [`teardown`](Self::teardown) (or drop).
#[derive(Debug)]
pub struct SandboxNetwork {
    id: SandboxId,
    objects: Objects,
    guest_link: GuestLink,
    lease: Option<SubnetLease>,
    host_addr: Ipv4Addr,
    netns_addr: Ipv4Addr,
    pool_range: Ipv4Cidr,
    spec: NetworkSpec,
    _ports: Option<PortReservation>,
    /// The resolver, while the egress policy names domains.
    resolver: Option<Resolver>,
    /// The domain filter and learned addresses the resolver shares.
    dns: SharedDnsState,
    /// Bumped by every egress update; see [`firewall::learned_mark`].
    generation: u32,
    torn_down: bool,
}

/// The host end of a sandbox's veth: `nova` and 11 hex digits of a hash of
/// the id (interface names stop at 15 bytes; ids may be 64). The full id is
/// in the link's alias, `nova-net:<id>`.
pub fn host_veth_name(id: &str) -> String {
    // FNV-1a, 64 bits: stable across builds, unlike std's hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("nova{:011x}", h >> 20)
}

/// Writes a sysctl under `/proc/sys` (in the calling thread's namespace for
/// `net.*`).
fn write_sysctl(path: &str, value: &str) -> Result<(), HostError> {
    fs::write(path, value).map_err(|e| HostError::io(format!("writing {value} to {path}"), e))
}

/// Turns on IPv4 forwarding on the host if it is off (Docker does the same).
fn ensure_host_forwarding() -> Result<(), HostError> {
    const PATH: &str = "/proc/sys/net/ipv4/ip_forward";
    let now = fs::read_to_string(PATH).map_err(|e| HostError::io(format!("reading {PATH}"), e))?;
    if now.trim() != "1" {
        info!(
            "turning on IPv4 forwarding on the host (net.ipv4.ip_forward = 1) for sandbox networking"
        );
        write_sysctl(PATH, "1")?;
    }
    Ok(())
}

async fn blocking<T, F>(op: &str, f: F) -> Result<T, HostError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, HostError> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| HostError::ThreadPanicked { op: op.to_owned() })?
}

impl SandboxNetwork {
    /// Creates the network of sandbox `id` with a tap for a VMM; see
    /// [`create_with`](Self::create_with).
    pub async fn create(
        id: &SandboxId,
        spec: &NetworkSpec,
        pool: &AddressPool,
    ) -> Result<Self, CreateNetworkError> {
        Self::create_with(id, spec, pool, CreateOptions::default()).await
    }

    /// Creates the network of sandbox `id`: namespace `nova-<id>`, veth,
    /// guest link, addresses, routes and both nft tables. Needs root (or
    /// CAP_NET_ADMIN + CAP_SYS_ADMIN) and the `nft` binary. On error nothing
    /// made here is left behind.
    pub async fn create_with(
        id: &SandboxId,
        spec: &NetworkSpec,
        pool: &AddressPool,
        options: CreateOptions,
    ) -> Result<Self, CreateNetworkError> {
        spec.validate()?;
        let ports = reserve_ports(&spec.ports)?;
        let host = link::connect()?;
        let taken = link::ipv4_addresses(&host).await?;
        let lease = pool
            .lease(&taken)
            .ok_or(CreateNetworkError::PoolExhausted { pool: pool.range() })?;

        let name = format!("{NAME_PREFIX}{id}");
        let guest_dev = match options.guest_link {
            GuestLink::Tap => TAP_NAME,
            GuestLink::Veth { .. } => VETH_GUEST_NAME,
        };
        let mut net = SandboxNetwork {
            id: id.clone(),
            objects: Objects {
                netns_path: netns::netns_path(&name),
                netns_name: name.clone(),
                table: name.clone(),
                host_veth: host_veth_name(id.as_str()),
                guest_dev,
                netns_created: false,
                veth_created: false,
                table_created: false,
            },
            guest_link: options.guest_link.clone(),
            host_addr: lease.host_addr(),
            netns_addr: lease.netns_addr(),
            lease: Some(lease),
            pool_range: pool.range(),
            spec: spec.clone(),
            _ports: Some(ports),
            resolver: None,
            dns: DnsState::new(&name, DomainFilter::new(&spec.egress)),
            generation: 1,
            torn_down: false,
        };
        match net.build(&host, &options).await {
            Ok(()) => {
                let subnet = net
                    .lease
                    .as_ref()
                    .map(|l| l.subnet().to_string())
                    .unwrap_or_default();
                info!(sandbox = %id, netns = %name, veth = %net.objects.host_veth, %subnet, "sandbox network up");
                Ok(net)
            }
            Err(e) => {
                let failures = teardown_objects(net.objects.clone()).await;
                for f in &failures {
                    warn!(sandbox = %id, error = %f, "undoing a failed network set-up left something behind");
                }
                net.torn_down = true;
                Err(e)
            }
        }
    }

    async fn build(
        &mut self,
        host: &rtnetlink::Handle,
        options: &CreateOptions,
    ) -> Result<(), CreateNetworkError> {
        blocking("enabling forwarding", ensure_host_forwarding).await?;

        let name = self.objects.netns_name.clone();
        let made = tokio::task::spawn_blocking(move || netns::create(&name))
            .await
            .map_err(|_| HostError::ThreadPanicked {
                op: "creating the namespace".into(),
            })?;
        match made {
            Ok(_) => self.objects.netns_created = true,
            Err(CreateNetnsError::Exists) => {
                return Err(CreateNetworkError::AlreadyExists {
                    name: self.objects.netns_name.clone(),
                });
            }
            Err(CreateNetnsError::Host(e)) => return Err(e.into()),
        }

        let ns_fd = netns::open(&self.objects.netns_path)?;
        let veth = self.objects.host_veth.clone();
        let alias = format!("{ALIAS_PREFIX}{}", self.id);
        let index = link::add_veth(host, &veth, NETNS_VETH, ns_fd.as_raw_fd(), &alias).await?;
        self.objects.veth_created = true;
        drop(ns_fd);
        // DNAT from 127.0.0.1 routes loopback-sourced packets out of this
        // interface; the kernel allows that only with route_localnet.
        write_sysctl(
            &format!("/proc/sys/net/ipv4/conf/{veth}/route_localnet"),
            "1",
        )?;
        link::add_address(host, index, &veth, self.host_addr, 30).await?;
        link::up(host, index, &veth).await?;

        let inside = InsideSetup {
            host_addr: self.host_addr,
            netns_addr: self.netns_addr,
            guest_link: options.guest_link.clone(),
            tap_owner: options.tap_owner,
            ports: self.spec.ports.clone(),
            redirect_dns: DomainFilter::new(&self.spec.egress).is_active(),
        };
        // The namespace's inside (links, routes, its own table) and the host
        // table touch different namespaces and objects: set both up at once,
        // so a create pays for one `nft` process, not two in a row.
        let batch = self.host_table(&self.spec.egress, &[]).create();
        self.objects.table_created = true;
        tokio::try_join!(
            netns::run_in_async(
                &self.objects.netns_path,
                "configuring the sandbox namespace",
                move || inside.run(),
            ),
            blocking("applying the host nft table", move || {
                firewall::apply(&batch, "creating the sandbox's host table")
            }),
        )?;
        if DomainFilter::new(&self.spec.egress).is_active() {
            self.resolver = Some(self.start_resolver()?);
        }
        Ok(())
    }

    fn start_resolver(&self) -> Result<Resolver, HostError> {
        Resolver::start(
            &self.objects.netns_path,
            self.spec.dns_servers.clone(),
            self.dns.clone(),
        )
    }

    fn host_table<'a>(
        &'a self,
        egress: &'a EgressPolicy,
        learned: &'a [(Ipv4Addr, u32)],
    ) -> HostTable<'a> {
        HostTable {
            table: &self.objects.table,
            veth: &self.objects.host_veth,
            netns_addr: self.netns_addr,
            pool: self.pool_range,
            ports: &self.spec.ports,
            egress,
            dns: &self.spec.dns_servers,
            learned,
            generation: self.generation,
        }
    }

    /// Replaces the egress policy while the sandbox runs. The host rules
    /// change in one atomic nft batch: on error the old policy stays.
    /// Connections already open to a destination the new policy denies are
    /// cut too. Domain rules take effect for the next query: the resolver
    /// starts or stops as the policy gains or loses domain rules, and
    /// addresses learned for names the new policy refuses are closed.
    pub async fn update_egress(&mut self, egress: EgressPolicy) -> Result<(), UpdateEgressError> {
        if self.torn_down {
            return Err(UpdateEgressError::TornDown);
        }
        egress.validate()?;
        let filter = DomainFilter::new(&egress);
        let dns = self.dns.clone();
        // Held across the update so that the resolver adds no address of a
        // name the new policy refuses once it is in force.
        let mut state = dns.lock().await;
        let was_active = state.filter().is_active();
        if filter.is_active() && self.resolver.is_none() {
            self.resolver = Some(self.start_resolver()?);
        }
        let kept = state.retained(&filter);
        self.generation = self.generation.wrapping_add(1);
        let batch = self.host_table(&egress, &kept).update_egress();
        blocking("updating the egress policy", move || {
            firewall::apply(&batch, "updating the egress policy")
        })
        .await?;
        state.replace(filter.clone(), &kept);
        self.spec.egress = egress;
        if filter.is_active() != was_active {
            let on = filter.is_active();
            let redirect = firewall::netns_dns_redirect(on);
            netns::run_in(
                &self.objects.netns_path,
                "redirecting the guest's DNS",
                move || firewall::apply(&redirect, "redirecting the guest's DNS"),
            )
            .await?;
            if !on {
                self.resolver = None;
            }
        }
        debug!(sandbox = %self.id, "egress policy updated");
        Ok(())
    }

    /// The sandbox's traffic so far, read from the host end of its veth.
    pub async fn counters(&self) -> Result<NetCounters, CountersError> {
        if self.torn_down {
            return Err(CountersError::TornDown);
        }
        let host = link::connect()?;
        let s = link::stats(&host, &self.objects.host_veth).await?;
        // What the host end received, the sandbox sent.
        Ok(NetCounters {
            rx_bytes: s.tx_bytes,
            tx_bytes: s.rx_bytes,
            rx_packets: s.tx_packets,
            tx_packets: s.rx_packets,
        })
    }

    /// Opens a queue of the tap from inside the namespace, for QEMU's
    /// `-netdev tap,id=net0,fd=N` (clear `FD_CLOEXEC` on the copy the child
    /// gets). With `vnet_hdr` the fd carries virtio-net headers (QEMU detects
    /// it and turns on offloads; use it with virtio-net). The fd works
    /// wherever the VMM runs: a tap fd is bound to its device, not to a
    /// namespace.
    pub async fn open_tap(&self, vnet_hdr: bool) -> Result<OwnedFd, OpenTapError> {
        if self.torn_down {
            return Err(OpenTapError::TornDown);
        }
        if self.guest_link != GuestLink::Tap {
            return Err(OpenTapError::NoTap);
        }
        let fd = netns::run_in(&self.objects.netns_path, "opening the tap", move || {
            tap::open_queue(TAP_NAME, vnet_hdr)
        })
        .await?;
        Ok(fd)
    }

    /// Gives the tap to `owner`, for a VMM that opens it by name as another
    /// user (Firecracker under its jailer). Needs CAP_NET_ADMIN.
    pub async fn set_tap_owner(&self, owner: TapOwner) -> Result<(), OpenTapError> {
        if self.torn_down {
            return Err(OpenTapError::TornDown);
        }
        if self.guest_link != GuestLink::Tap {
            return Err(OpenTapError::NoTap);
        }
        netns::run_in(
            &self.objects.netns_path,
            "setting the tap's owner",
            move || tap::create_persistent(TAP_NAME, owner),
        )
        .await?;
        Ok(())
    }

    /// Opens the namespace, for a VMM that opens the tap itself by name
    /// (Firecracker): spawn it with a `pre_exec` that calls
    /// `setns(fd, CLONE_NEWNET)`, or pass [`netns_path`](Self::netns_path) to
    /// the jailer's `--netns`.
    pub fn open_netns(&self) -> Result<OwnedFd, HostError> {
        netns::open(&self.objects.netns_path)
    }

    /// Removes everything: the host nft table, the guest link, the veth and
    /// the namespace (which goes once no process is left in it). Every step
    /// is tried; the first failures are reported. Idempotent.
    pub async fn teardown(&mut self) -> Result<(), TeardownError> {
        if self.torn_down {
            return Ok(());
        }
        let failures = teardown_objects(self.objects.clone()).await;
        self.finish_teardown();
        if failures.is_empty() {
            info!(sandbox = %self.id, "sandbox network removed");
            Ok(())
        } else {
            Err(TeardownError { failures })
        }
    }

    /// Takes over the network a dead owner left for sandbox `id`, made with
    /// `spec` and whose veth's host end is `host_addr` (as
    /// [`host_addr`](Self::host_addr) reported it then): its namespace,
    /// veth and nft table are this value's again, removed by
    /// [`teardown`](Self::teardown) or drop. Checks that the namespace
    /// exists; the published host ports are not reserved again (their nft
    /// rules stand), so a clash with a later sandbox's port is found when
    /// that one is made.
    pub fn adopt(
        id: &SandboxId,
        spec: &NetworkSpec,
        pool: &AddressPool,
        host_addr: Ipv4Addr,
    ) -> Result<Self, CreateNetworkError> {
        let name = format!("{NAME_PREFIX}{id}");
        let netns_path = netns::netns_path(&name);
        if !netns_path.exists() {
            return Err(HostError::io(
                format!("finding the namespace {name} of a sandbox to re-attach"),
                std::io::Error::from(std::io::ErrorKind::NotFound),
            )
            .into());
        }
        let lease = pool
            .lease_at(host_addr)
            .ok_or(CreateNetworkError::PoolExhausted { pool: pool.range() })?;
        let name_for_dns = name.clone();
        Ok(SandboxNetwork {
            id: id.clone(),
            objects: Objects {
                netns_path,
                netns_name: name.clone(),
                table: name,
                host_veth: host_veth_name(id.as_str()),
                guest_dev: TAP_NAME,
                netns_created: true,
                veth_created: true,
                table_created: true,
            },
            guest_link: GuestLink::Tap,
            host_addr: lease.host_addr(),
            netns_addr: lease.netns_addr(),
            lease: Some(lease),
            pool_range: pool.range(),
            spec: spec.clone(),
            _ports: None,
            resolver: None,
            dns: DnsState::new(&name_for_dns, DomainFilter::new(&spec.egress)),
            generation: 1,
            torn_down: false,
        }
        .with_resolver())
    }

    /// Restarts the resolver of an adopted network whose policy names
    /// domains (its redirect rule stands). Without a tokio runtime, or if
    /// its sockets cannot be opened, the guest's DNS goes unanswered, which
    /// fails closed; the reason is logged.
    fn with_resolver(mut self) -> Self {
        if DomainFilter::new(&self.spec.egress).is_active() {
            match self.start_resolver() {
                Ok(r) => self.resolver = Some(r),
                Err(e) => {
                    warn!(sandbox = %self.id, error = %e, "cannot restart the resolver of a re-attached sandbox; its DNS goes unanswered")
                }
            }
        }
        self
    }

    /// Lets go of the network without removing it (its VM outlives this
    /// process; a later owner takes it over with [`adopt`](Self::adopt)).
    pub fn forget(mut self) {
        self.finish_teardown();
    }

    fn finish_teardown(&mut self) {
        self.torn_down = true;
        self.resolver = None;
        self._ports = None;
        self.lease = None;
    }

    /// The sandbox's id.
    pub fn id(&self) -> &SandboxId {
        &self.id
    }

    /// The namespace's name, `nova-<id>`.
    pub fn netns_name(&self) -> &str {
        &self.objects.netns_name
    }

    /// `/run/netns/nova-<id>`.
    pub fn netns_path(&self) -> &Path {
        &self.objects.netns_path
    }

    /// The tap's name inside the namespace ([`TAP_NAME`]); `None` for a veth
    /// guest link.
    pub fn tap_name(&self) -> Option<&'static str> {
        match self.guest_link {
            GuestLink::Tap => Some(TAP_NAME),
            GuestLink::Veth { .. } => None,
        }
    }

    /// The name of the host end of the veth.
    pub fn host_veth(&self) -> &str {
        &self.objects.host_veth
    }

    /// The nft table on the host, `inet nova-<id>`.
    pub fn nft_table(&self) -> &str {
        &self.objects.table
    }

    /// The host end's address (`.1` of the sandbox's /30).
    pub fn host_addr(&self) -> Ipv4Addr {
        self.host_addr
    }

    /// The namespace end's address (`.2`); published ports are DNATed here.
    pub fn netns_addr(&self) -> Ipv4Addr {
        self.netns_addr
    }

    /// The guest's address, the same in every sandbox.
    pub fn guest_addr(&self) -> (Ipv4Addr, u8) {
        (GUEST_ADDR, GUEST_PREFIX)
    }

    /// The guest's gateway, on the tap; the same in every sandbox.
    pub fn gateway(&self) -> Ipv4Addr {
        GATEWAY_ADDR
    }

    /// The spec in force (its egress part as last updated).
    pub fn spec(&self) -> &NetworkSpec {
        &self.spec
    }
}

impl Drop for SandboxNetwork {
    /// Best effort: tears down on a thread of its own (blocking the dropping
    /// thread for a few milliseconds) and logs what it could not remove. Call
    /// [`SandboxNetwork::teardown`] instead where an error matters.
    fn drop(&mut self) {
        if self.torn_down {
            return;
        }
        let objects = self.objects.clone();
        let id = self.id.clone();
        let joined = std::thread::Builder::new()
            .name("nova-net-drop".into())
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt.block_on(teardown_objects(objects)),
                    Err(e) => vec![HostError::io("building a runtime for teardown", e)],
                }
            })
            .map(|t| t.join());
        match joined {
            Ok(Ok(failures)) => {
                for f in failures {
                    warn!(sandbox = %id, error = %f, "dropped sandbox network left something behind");
                }
            }
            Ok(Err(_)) | Err(_) => {
                warn!(sandbox = %id, "dropped sandbox network could not be torn down")
            }
        }
        self.finish_teardown();
    }
}

/// What runs inside the namespace at creation.
struct InsideSetup {
    host_addr: Ipv4Addr,
    netns_addr: Ipv4Addr,
    guest_link: GuestLink,
    tap_owner: TapOwner,
    ports: Vec<crate::spec::PortMapping>,
    redirect_dns: bool,
}

impl InsideSetup {
    async fn run(self) -> Result<(), HostError> {
        write_sysctl("/proc/sys/net/ipv4/ip_forward", "1")?;
        for path in [
            "/proc/sys/net/ipv6/conf/all/disable_ipv6",
            "/proc/sys/net/ipv6/conf/default/disable_ipv6",
        ] {
            match fs::write(path, "1") {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(HostError::io(format!("writing 1 to {path}"), e)),
            }
        }
        let h = link::connect()?;
        let lo = link::index(&h, "lo").await?;
        link::up(&h, lo, "lo").await?;
        let veth = link::index(&h, NETNS_VETH).await?;
        link::add_address(&h, veth, NETNS_VETH, self.netns_addr, 30).await?;
        link::up(&h, veth, NETNS_VETH).await?;
        link::add_default_route(&h, self.host_addr).await?;

        let guest_dev = match &self.guest_link {
            GuestLink::Tap => {
                tap::create_persistent(TAP_NAME, self.tap_owner)?;
                TAP_NAME
            }
            GuestLink::Veth { guest_netns } => {
                let fd = netns::open(guest_netns)?;
                link::add_veth(
                    &h,
                    VETH_GUEST_NAME,
                    "eth0",
                    fd.as_raw_fd(),
                    "nova-net:guest",
                )
                .await?;
                drop(fd);
                netns::run_in_async(
                    guest_netns,
                    "configuring the test guest",
                    configure_veth_guest,
                )
                .await?;
                VETH_GUEST_NAME
            }
        };
        let dev = link::index(&h, guest_dev).await?;
        if matches!(self.guest_link, GuestLink::Tap) {
            // The same gateway hardware address in every sandbox: a guest
            // restored from a snapshot keeps its ARP entry for the gateway,
            // which must stay right in the namespace it lands in.
            link::set_address(&h, dev, guest_dev, GATEWAY_MAC).await?;
        }
        link::add_address(&h, dev, guest_dev, GATEWAY_ADDR, GUEST_PREFIX).await?;
        link::up(&h, dev, guest_dev).await?;

        let table = firewall::netns_table(
            guest_dev,
            NETNS_VETH,
            self.netns_addr,
            &self.ports,
            self.redirect_dns,
        );
        firewall::apply(&table, "creating the namespace's table")
    }
}

/// Inside a [`GuestLink::Veth`] guest's namespace: what the agent does in a
/// VM.
async fn configure_veth_guest() -> Result<(), HostError> {
    let h = link::connect()?;
    let lo = link::index(&h, "lo").await?;
    link::up(&h, lo, "lo").await?;
    let eth0 = link::index(&h, "eth0").await?;
    link::add_address(&h, eth0, "eth0", GUEST_ADDR, GUEST_PREFIX).await?;
    link::up(&h, eth0, "eth0").await?;
    link::add_default_route(&h, GATEWAY_ADDR).await
}

/// Removes the objects this process made (undoing a failed or cancelled
/// create must not remove a namesake it collided with); absent ones are not
/// errors. Returns what failed.
async fn teardown_objects(o: Objects) -> Vec<HostError> {
    let mut failures = Vec::new();
    if o.table_created {
        let table = o.table.clone();
        let deleted = tokio::task::spawn_blocking(move || {
            firewall::apply(&firewall::delete_table(&table), "deleting the host table")
        })
        .await
        .unwrap_or_else(|_| {
            Err(HostError::ThreadPanicked {
                op: "deleting the host table".into(),
            })
        });
        match deleted {
            Err(e) if !firewall::is_missing_table(&e) => failures.push(e),
            _ => {}
        }
    }
    if o.netns_created && o.netns_path.exists() {
        let dev = o.guest_dev;
        let deleted = netns::run_in_async(
            &o.netns_path,
            "deleting the guest link",
            move || async move {
                let h = link::connect()?;
                link::delete(&h, dev).await.map(drop)
            },
        )
        .await;
        if let Err(e) = deleted {
            failures.push(e);
        }
    }
    if o.veth_created {
        match link::connect() {
            Ok(h) => {
                if let Err(e) = link::delete(&h, &o.host_veth).await {
                    failures.push(e);
                }
            }
            Err(e) => failures.push(e),
        }
    }
    if o.netns_created {
        let name = o.netns_name.clone();
        let deleted = tokio::task::spawn_blocking(move || netns::delete(&name))
            .await
            .unwrap_or_else(|_| {
                Err(HostError::ThreadPanicked {
                    op: "deleting the namespace".into(),
                })
            });
        if let Err(e) = deleted {
            failures.push(e);
        }
    }
    failures
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn veth_names_fit_and_differ() {
        let a = host_veth_name("sb-0123456789ab");
        let b = host_veth_name("sb-0123456789ac");
        assert_eq!(a.len(), 15);
        assert!(a.starts_with("nova"));
        assert_ne!(a, b);
        assert_eq!(a, host_veth_name("sb-0123456789ab"), "stable");
    }
}
