//! A sandbox's network, for every backend: the runtime makes it with
//! `nova-net` before the VMM starts, hands it to the backend in
//! [`VmStart::network`](crate::backend::VmStart::network), tears it down
//! when the sandbox is released (and on every failed create), and reads its
//! counters for stats.
//!
//! With `enable_network = true` (the default) a sandbox gets its own
//! network namespace, NAT out through the host, every port of
//! [`SandboxConfig::published_ports`] (the seed's `host_port` ->
//! `guest_port` and `ports`) DNATed to the guest (reachable at
//! `127.0.0.1:host_port` too), and the config's `egress` policy as nftables
//! sets in the sandbox's host table ([`egress_policy`]); other sandboxes,
//! the host's own addresses and 169.254.169.254 stay closed unless an
//! `allow` CIDR names them. `update` replaces the policy of a running
//! sandbox in one nft transaction. The guest sees [`nova_net::GUEST_ADDR`] on
//! `eth0` with [`nova_net::GATEWAY_ADDR`] as its gateway, and the DNS
//! servers ([`dns_servers`]: `NOVA_DNS_SERVERS`, else the host's
//! resolvers), through the boot contract's `nova.net=` ([`guest_net`]).
//! When the egress policy names domains, the guest's DNS is redirected to
//! a resolver of the sandbox's own that forwards allowed names to those
//! servers (see [`nova_net::dns`]).
//!
//! The namespace network needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN),
//! `/dev/net/tun` and `nft`. Without them, a backend that can attach a
//! stream socket (QEMU) gets a user-mode network instead
//! ([`nova_net::passt`]: one passt process per sandbox): the same guest
//! addresses, gateway, MTU and published ports, NAT out through the host's
//! own sockets, but no egress policy (a config that sets one is refused with
//! [`CreateSandboxError::Unsupported`] saying so) and no traffic counters.
//! [`NET_MODE_VAR`] (`NOVA_NET_MODE=auto|namespace|user`) or
//! [`Provider::set_net_mode`](crate::Provider::set_net_mode) forces a mode
//! ([`NetModeChoice`]); [`choose_mode`] says which one a create gets and
//! why. Where neither can be had, create fails with
//! [`CreateSandboxError::Unsupported`] naming what is missing and saying to
//! set `enable_network = false`: a sandbox never silently lacks the network
//! its config asked for.

use std::path::Path;

use nova_core::config::{ConfigError, SandboxConfig};
use nova_core::error::{CreateSandboxError, UpdateNetworkError};
use nova_core::hypervisor::HypervisorKind;
use nova_core::id::SandboxId;
use nova_core::network::{EgressConfig, PortProtocol, PortSpec};
use nova_net::{
    AddressPool, CreateNetworkError, EgressPolicy, NetworkSpec, PortMapping, Protocol,
    SandboxNetwork, SpecError, UserNetwork, UserOptions,
};
use nova_protocol::boot::{GuestNet, MAX_DNS_SERVERS};

use crate::backend::NetworkMode;

/// The variable that picks how sandboxes get their network:
/// `auto` (the default), `namespace` or `user` ([`NetModeChoice`]).
pub const NET_MODE_VAR: &str = "NOVA_NET_MODE";

/// Which host network a sandbox of a backend with
/// [`NetworkMode::Namespace`] gets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NetModeChoice {
    /// The namespace network where this process can make one (root or
    /// CAP_NET_ADMIN, `nft`), else the user-mode network where `passt` is
    /// installed.
    #[default]
    Auto,
    /// Always the namespace network (create fails where it cannot be made).
    Namespace,
    /// Always the user-mode network (passt), even as root.
    User,
}

impl NetModeChoice {
    /// The choice [`NET_MODE_VAR`] names (unset or empty: `Auto`); the
    /// error says what the variable may hold.
    pub fn from_env() -> Result<Self, String> {
        match std::env::var(NET_MODE_VAR) {
            Err(_) => Ok(Self::Auto),
            Ok(value) => value.parse(),
        }
    }
}

impl std::str::FromStr for NetModeChoice {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, String> {
        match value.trim().to_ascii_lowercase().as_str() {
            "" | "auto" => Ok(Self::Auto),
            "namespace" | "netns" => Ok(Self::Namespace),
            "user" | "passt" => Ok(Self::User),
            _ => Err(format!(
                "{NET_MODE_VAR} = {value:?} is not a network mode: use auto, namespace or user"
            )),
        }
    }
}

/// The network a sandbox gets on this host ([`choose_mode`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostNetMode {
    /// A network namespace, veth, tap and nftables ([`SandboxNetwork`]).
    Namespace,
    /// One passt process ([`UserNetwork`]).
    User,
}

impl std::fmt::Display for HostNetMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HostNetMode::Namespace => "namespace",
            HostNetMode::User => "user (passt)",
        })
    }
}

/// Why the user-mode network cannot run here, if it cannot.
pub fn user_mode_unsupported_reason() -> Option<String> {
    (!on_path(nova_net::passt::PASST_BIN))
        .then(|| "the user-mode network needs `passt` on PATH (apt-get install passt)".to_owned())
}

/// The network a sandbox gets under `choice` on this host, for a backend
/// that can (`user_ok`) or cannot attach a user-mode network. The error
/// names what is missing and what to do.
pub fn choose_mode(choice: NetModeChoice, user_ok: bool) -> Result<HostNetMode, String> {
    let user = if user_ok {
        (!on_path(nova_net::passt::PASST_BIN))
            .then(|| "`passt` on PATH (apt-get install passt)".to_owned())
    } else {
        Some("a backend that attaches it (QEMU; this one attaches only a tap)".to_owned())
    };
    pick_mode(choice, namespace_missing(), user)
}

/// [`choose_mode`] given what each mode lacks (`None`: nothing).
fn pick_mode(
    choice: NetModeChoice,
    namespace: Option<String>,
    user: Option<String>,
) -> Result<HostNetMode, String> {
    const NO_NETWORK: &str =
        "set enable_network = false (`nova run --no-network`) to run without a network";
    match (choice, namespace, user) {
        (NetModeChoice::Namespace | NetModeChoice::Auto, None, _) => Ok(HostNetMode::Namespace),
        (NetModeChoice::User, _, None) | (NetModeChoice::Auto, Some(_), None) => {
            Ok(HostNetMode::User)
        }
        (NetModeChoice::Namespace, Some(what), _) => Err(format!(
            "{NET_MODE_VAR}=namespace: the namespace network needs {what}; unset \
             {NET_MODE_VAR} for the user-mode network, or {NO_NETWORK}"
        )),
        (NetModeChoice::User, _, Some(what)) => Err(format!(
            "{NET_MODE_VAR}=user: the user-mode network needs {what}; {NO_NETWORK}"
        )),
        (NetModeChoice::Auto, Some(namespace), Some(user)) => Err(format!(
            "no sandbox network can be made here: the namespace network needs {namespace}, \
             and the user-mode network needs {user}; {NO_NETWORK}"
        )),
    }
}

/// What `nova doctor` says of sandbox networks on this host.
#[derive(Clone, Debug)]
pub struct HostNetworkReport {
    /// The mode [`NET_MODE_VAR`] asks for (an error: the variable is bad).
    pub choice: Result<NetModeChoice, String>,
    /// What the namespace network lacks here (`None`: nothing).
    pub namespace_missing: Option<String>,
    /// `net.ipv4.ip_forward` (the namespace network turns it on).
    pub ip_forward: Option<bool>,
    /// Why the user-mode network cannot run here (`None`: passt is on PATH).
    pub user_missing: Option<String>,
    /// The network a QEMU sandbox would get, or why none.
    pub chosen: Result<HostNetMode, String>,
}

/// Probes this host for [`HostNetworkReport`].
pub fn host_network_report() -> HostNetworkReport {
    let choice = NetModeChoice::from_env();
    let chosen = choice.clone().and_then(|choice| choose_mode(choice, true));
    HostNetworkReport {
        choice,
        namespace_missing: namespace_missing(),
        ip_forward: ip_forward(),
        user_missing: user_mode_unsupported_reason(),
        chosen,
    }
}

impl HostNetworkReport {
    /// The report as JSON: `mode` (`namespace`, `user` or null), `reason`,
    /// and what each mode needs.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "available": self.chosen.is_ok(),
            "mode": match &self.chosen {
                Ok(HostNetMode::Namespace) => Some("namespace"),
                Ok(HostNetMode::User) => Some("user"),
                Err(_) => None,
            },
            "reason": self.chosen.as_ref().err(),
            "override": match &self.choice {
                Ok(NetModeChoice::Auto) => serde_json::json!("auto"),
                Ok(NetModeChoice::Namespace) => serde_json::json!("namespace"),
                Ok(NetModeChoice::User) => serde_json::json!("user"),
                Err(e) => serde_json::json!({"error": e}),
            },
            "namespace": {
                "available": self.namespace_missing.is_none(),
                "missing": self.namespace_missing,
                "ip_forward": self.ip_forward,
            },
            "user": {
                "available": self.user_missing.is_none(),
                "missing": self.user_missing,
            },
        })
    }

    /// The report as `nova doctor` lines.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write as _;
        let why = match &self.choice {
            Ok(NetModeChoice::Auto) => "auto".to_owned(),
            Ok(_) => format!("forced by {NET_MODE_VAR}"),
            Err(e) => e.clone(),
        };
        let _ = match &self.chosen {
            Ok(HostNetMode::Namespace) => writeln!(
                out,
                "[ ok ] sandbox network: namespace mode ({why}): a namespace, veth, tap and \
                 nftables rules per sandbox (QEMU, Firecracker); published ports, egress policy"
            ),
            Ok(HostNetMode::User) => writeln!(
                out,
                "[ ok ] sandbox network: user mode ({why}): one passt per sandbox (QEMU only); \
                 published ports, NAT through the host's sockets, no egress policy (run as \
                 root or with CAP_NET_ADMIN for it)"
            ),
            Err(reason) => writeln!(
                out,
                "[warn] sandbox network: unavailable ({reason}); create sandboxes with \
                 enable_network = false"
            ),
        };
        let _ = match &self.namespace_missing {
            None => writeln!(
                out,
                "[ ok ] namespace network: root or CAP_NET_ADMIN+CAP_SYS_ADMIN, /dev/net/tun, \
                 nft present; ip_forward {}",
                match self.ip_forward {
                    Some(true) => "on",
                    Some(false) => "off (turned on at the first sandbox)",
                    None => "unknown",
                }
            ),
            Some(what) => writeln!(
                out,
                "[info] namespace network: unavailable: it needs {what}"
            ),
        };
        let _ = match &self.user_missing {
            None => writeln!(out, "[ ok ] user-mode network: passt installed"),
            Some(why) => writeln!(out, "[info] user-mode network: unavailable: {why}"),
        };
    }
}

/// A sandbox's network, in whichever mode it was made.
#[derive(Debug)]
// Off Linux the namespace network is an empty stand-in (nova-net's
// `unsupported`), so the variants differ in size only there; a sandbox holds
// one of these, so boxing would buy nothing.
#[cfg_attr(not(target_os = "linux"), allow(clippy::large_enum_variant))]
pub enum SandboxNet {
    /// The namespace network.
    Namespace(SandboxNetwork),
    /// The user-mode network.
    User(UserNetwork),
}

impl SandboxNet {
    /// Which mode this is.
    pub fn mode(&self) -> HostNetMode {
        match self {
            SandboxNet::Namespace(_) => HostNetMode::Namespace,
            SandboxNet::User(_) => HostNetMode::User,
        }
    }

    /// The boot contract's `nova.net=` for the guest: the same address,
    /// gateway and MTU in both modes.
    pub fn guest_net(&self) -> GuestNet {
        match self {
            SandboxNet::Namespace(net) => guest_net(net),
            SandboxNet::User(net) => contract(net.guest_addr(), net.gateway(), net.guest_dns()),
        }
    }

    /// What the sandbox's record keeps of it, for a provider that
    /// re-attaches the sandbox.
    pub(crate) fn record(&self) -> crate::dir::NetworkRecord {
        match self {
            SandboxNet::Namespace(net) => crate::dir::NetworkRecord {
                host_addr: Some(net.host_addr()),
                user: false,
            },
            SandboxNet::User(_) => crate::dir::NetworkRecord {
                host_addr: None,
                user: true,
            },
        }
    }

    /// The sandbox's traffic (rx: into the guest); `None` where the mode
    /// counts none (the user-mode network).
    pub(crate) async fn counters(
        &self,
    ) -> Result<Option<nova_net::NetCounters>, nova_net::CountersError> {
        match self {
            SandboxNet::Namespace(net) => net.counters().await.map(Some),
            SandboxNet::User(_) => Ok(None),
        }
    }

    /// The VMM is gone for a while (paused to disk): a user-mode network's
    /// passt, which exits with it, is reaped and its ports held (a new one
    /// starts with the next VMM); a namespace network stays as it is.
    pub(crate) fn vmm_stopped(&self) {
        if let SandboxNet::User(net) = self {
            net.pause();
        }
    }

    /// Leaves the network in place (a provider leaving its VMs running).
    pub(crate) fn forget(self) {
        match self {
            SandboxNet::Namespace(net) => net.forget(),
            SandboxNet::User(net) => net.forget(),
        }
    }
}

/// The options of a sandbox's user-mode network: the guest's MTU, and
/// with no DNS server to give the guest (the host has only a loopback
/// resolver), the gateway's port 53 forwarded to the host's first resolver.
fn user_options(spec: &NetworkSpec) -> UserOptions {
    let dns_forward = if spec.dns_servers.is_empty() {
        first_resolver()
    } else {
        None
    };
    UserOptions {
        mtu: GUEST_MTU,
        dns_forward,
        ..UserOptions::default()
    }
}

/// The first `nameserver` of `/etc/resolv.conf`, loopback included (passt
/// reaches it from the host).
fn first_resolver() -> Option<std::net::Ipv4Addr> {
    std::fs::read_to_string("/etc/resolv.conf")
        .ok()?
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .find_map(|rest| rest.trim().parse().ok())
}

/// The guest's MTU: the tap's and the veth's default.
pub const GUEST_MTU: u16 = 1500;

/// Why this host cannot give sandboxes the namespace network, if it
/// cannot: what is missing, and what to do.
pub fn unsupported_reason() -> Option<String> {
    namespace_missing().map(|what| {
        format!(
            "sandbox networking needs {what}; set enable_network = false (`nova run \
             --no-network`) to run without a network"
        )
    })
}

/// What the namespace network lacks here, if anything.
fn namespace_missing() -> Option<String> {
    if !rustix::process::geteuid().is_root() && !has_net_admin_caps() {
        Some("root (or CAP_NET_ADMIN and CAP_SYS_ADMIN)".to_owned())
    } else if !Path::new("/dev/net/tun").exists() {
        Some("/dev/net/tun (the tun module)".to_owned())
    } else if !on_path("nft") {
        Some("`nft` on PATH (apt-get install nftables)".to_owned())
    } else {
        None
    }
}

/// Whether this process holds CAP_NET_ADMIN and CAP_SYS_ADMIN (the
/// namespace network needs both: links and rules, and mounting the
/// namespace), from `CapEff` in `/proc/self/status`.
fn has_net_admin_caps() -> bool {
    const CAP_NET_ADMIN: u32 = 12;
    const CAP_SYS_ADMIN: u32 = 21;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let hex = status
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))?
                .trim()
                .to_owned();
            u64::from_str_radix(&hex, 16).ok()
        })
        .is_some_and(|eff| eff & (1 << CAP_NET_ADMIN) != 0 && eff & (1 << CAP_SYS_ADMIN) != 0)
}

/// Whether the kernel forwards IPv4 (`net.ipv4.ip_forward`); `None` when
/// it cannot be read. The namespace network turns it on when it is off.
pub fn ip_forward() -> Option<bool> {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")
        .ok()
        .map(|v| v.trim() == "1")
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(dir.join(program))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    })
}

/// The variable naming the DNS servers of every sandbox: IPv4 addresses
/// separated by commas or spaces. Unset or empty: the host's resolvers.
pub const DNS_SERVERS_VAR: &str = "NOVA_DNS_SERVERS";

/// The DNS servers sandboxes use: [`DNS_SERVERS_VAR`] when set, else the
/// host's resolvers ([`nova_net::host_resolvers`]). The error says which
/// entry of the variable is not an IPv4 address.
pub fn dns_servers() -> Result<Vec<std::net::Ipv4Addr>, String> {
    let Some(value) = std::env::var_os(DNS_SERVERS_VAR) else {
        return Ok(nova_net::host_resolvers());
    };
    let servers = parse_dns_servers(&value.to_string_lossy())?;
    Ok(if servers.is_empty() {
        nova_net::host_resolvers()
    } else {
        servers
    })
}

/// Parses a [`DNS_SERVERS_VAR`] value: IPv4 addresses separated by commas
/// or spaces, none loopback or unspecified.
fn parse_dns_servers(value: &str) -> Result<Vec<std::net::Ipv4Addr>, String> {
    value
        .split([',', ' '])
        .filter(|s| !s.is_empty())
        .map(|s| {
            let ip: std::net::Ipv4Addr = s.parse().map_err(|_| {
                format!(
                    "{DNS_SERVERS_VAR} = {value:?}: {s:?} is not an IPv4 address; list IPv4 \
                     addresses separated by commas, or unset it to use the host's resolvers"
                )
            })?;
            if ip.is_loopback() || ip.is_unspecified() {
                // Queries leave from inside the sandbox's namespace, where
                // 127.0.0.0/8 is the sandbox's own loopback, not the host.
                return Err(format!(
                    "{DNS_SERVERS_VAR} = {value:?}: {s} cannot be reached from a sandbox (its \
                     loopback is its own); name a resolver on another address, e.g. the host's \
                     address on its LAN"
                ));
            }
            Ok(ip)
        })
        .collect()
}

/// What `config` asks of the network: every published port, the egress
/// policy, and the DNS servers ([`dns_servers`]; a bad variable falls back
/// to the host's resolvers here, and is refused by create). `config` must
/// be valid (an invalid egress entry is answered as the [`ConfigError`]
/// validation gives).
pub fn spec(config: &SandboxConfig) -> Result<NetworkSpec, ConfigError> {
    Ok(NetworkSpec {
        ports: config.published_ports().iter().map(port_mapping).collect(),
        egress: match &config.egress {
            Some(egress) => egress_policy(egress)?,
            None => EgressPolicy::default(),
        },
        dns_servers: dns_servers().unwrap_or_else(|_| nova_net::host_resolvers()),
    })
}

fn port_mapping(p: &PortSpec) -> PortMapping {
    let mapping = match p.protocol {
        PortProtocol::Tcp => PortMapping::tcp(p.host_port, p.guest_port),
        PortProtocol::Udp => PortMapping::udp(p.host_port, p.guest_port),
    };
    mapping.on(p.host_addr())
}

/// The nftables policy of a config's `egress`; the error names the entry.
pub fn egress_policy(egress: &EgressConfig) -> Result<EgressPolicy, ConfigError> {
    egress.validate()?;
    EgressPolicy::parse(egress.block_all, &egress.allow, &egress.deny).map_err(|e| {
        // Validation accepted every entry with the same parser; this is
        // only reached if the two ever disagree.
        ConfigError::Egress {
            field: e.field().to_owned(),
            value: String::new(),
            reason: "refused by the network layer",
        }
    })
}

/// A network error of create, with a host port that cannot be bound told
/// apart and named by its config field.
fn create_error(config: &SandboxConfig, e: CreateNetworkError) -> CreateSandboxError {
    match e {
        CreateNetworkError::Spec(SpecError::PortUnavailable {
            port,
            protocol,
            host_ip,
            source,
            ..
        }) => {
            let protocol = match protocol {
                Protocol::Udp => PortProtocol::Udp,
                Protocol::Tcp => PortProtocol::Tcp,
            };
            let index = config
                .published_ports()
                .iter()
                .position(|p| {
                    p.host_port == port && p.protocol == protocol && p.host_addr() == host_ip
                })
                .unwrap_or(0);
            CreateSandboxError::PortUnavailable {
                field: config.published_port_field(index),
                port,
                protocol,
                host_ip,
                source,
            }
        }
        CreateNetworkError::EgressNeedsNamespace => CreateSandboxError::Unsupported {
            reason: CreateNetworkError::EgressNeedsNamespace.to_string(),
        },
        other => CreateSandboxError::Network(Box::new(other)),
    }
}

/// Makes the network of sandbox `id` (whose directory is `dir`) when
/// `config` asks for one and the backend's `mode` is
/// [`NetworkMode::Namespace`]: the namespace or the user-mode network, as
/// [`choose_mode`] picks under `choice` (`user_ok`: the backend can attach
/// a user-mode network). A backend with its own network gets none from
/// here; one without any runs the sandbox without a network, with a
/// warning (the provider refused a published port or an egress rule for
/// both already, [`refuse_unsupported`]).
pub(crate) async fn create(
    id: &SandboxId,
    config: &SandboxConfig,
    pool: &AddressPool,
    mode: NetworkMode,
    net: NetChoice<'_>,
) -> Result<Option<SandboxNet>, CreateSandboxError> {
    if !config.enable_network {
        return Ok(None);
    }
    match mode {
        NetworkMode::Namespace => {}
        NetworkMode::Own => return Ok(None),
        NetworkMode::None => {
            tracing::warn!(
                "this backend does not attach sandbox networks yet; the sandbox has none"
            );
            return Ok(None);
        }
    }
    let host_mode = choose_mode(net.choice, net.user_ok)
        .map_err(|reason| CreateSandboxError::Unsupported { reason })?;
    dns_servers().map_err(|reason| CreateSandboxError::Unsupported { reason })?;
    let started = std::time::Instant::now();
    let spec = spec(config)?;
    let made =
        match host_mode {
            HostNetMode::Namespace => SandboxNet::Namespace(
                SandboxNetwork::create(id, &spec, pool)
                    .await
                    .map_err(|e| create_error(config, e))?,
            ),
            HostNetMode::User => {
                if config.egress.as_ref().is_some_and(|e| {
                    egress_policy(e).map_or(true, |p| p != EgressPolicy::default())
                }) {
                    return Err(CreateSandboxError::Unsupported {
                        reason: CreateNetworkError::EgressNeedsNamespace.to_string(),
                    });
                }
                let (id, dir) = (id.clone(), net.dir.to_owned());
                // passt's start is waited for by polling (milliseconds).
                let user = tokio::task::spawn_blocking(move || {
                    UserNetwork::create(&id, &spec, &dir, &user_options(&spec))
                })
                .await
                .map_err(|e| CreateSandboxError::Network(Box::new(e)))?;
                SandboxNet::User(user.map_err(|e| create_error(config, e))?)
            }
        };
    tracing::debug!(
        elapsed_us = started.elapsed().as_micros() as u64,
        mode = %made.mode(),
        "sandbox network ready"
    );
    Ok(Some(made))
}

/// How [`create`] picks the host network, and where a user-mode network
/// keeps its files.
#[derive(Clone, Copy, Debug)]
pub(crate) struct NetChoice<'a> {
    /// The provider's setting.
    pub(crate) choice: NetModeChoice,
    /// Whether the backend can attach a user-mode network.
    pub(crate) user_ok: bool,
    /// The sandbox's directory.
    pub(crate) dir: &'a Path,
}

/// Takes over the network of a sandbox a dead provider left running (or on
/// disk), as its record describes it.
pub(crate) fn adopt(
    id: &SandboxId,
    config: &SandboxConfig,
    pool: &AddressPool,
    recorded: &crate::dir::NetworkRecord,
    dir: &Path,
) -> Result<SandboxNet, String> {
    let spec = spec(config).map_err(|e| format!("its recorded network config is invalid: {e}"))?;
    match (recorded.user, recorded.host_addr) {
        (true, _) => UserNetwork::adopt(id, &spec, dir, &user_options(&spec))
            .map(SandboxNet::User)
            .map_err(|e| e.to_string()),
        (false, Some(host_addr)) => SandboxNetwork::adopt(id, &spec, pool, host_addr)
            .map(SandboxNet::Namespace)
            .map_err(|e| e.to_string()),
        (false, None) => Err("its record names no host address".to_owned()),
    }
}

/// Refuses what `config` asks of the network that a backend in `mode`
/// (of kind `backend`) cannot give, naming the config field: with no
/// network, a published port or an egress rule; with its own network, an
/// egress rule (those are nftables sets in the sandbox's namespace).
pub(crate) fn refuse_unsupported(
    config: &SandboxConfig,
    mode: NetworkMode,
    backend: HypervisorKind,
) -> Result<(), CreateSandboxError> {
    let reason = match mode {
        NetworkMode::Namespace => None,
        NetworkMode::Own => config.egress.as_ref().map(|_| {
            format!(
                "egress asks for egress rules (CIDRs, domains), which need the Linux network \
                 namespace mode (QEMU or Firecracker); the {backend} backend's own NAT network \
                 has none: leave egress unset"
            )
        }),
        NetworkMode::None => {
            let field = match config.published_ports().first() {
                Some(port) => Some(format!(
                    "{} = {}",
                    config.published_port_field(0),
                    port.host_port
                )),
                None => config.egress.as_ref().map(|_| "egress".to_owned()),
            };
            field.map(|field| {
                format!(
                    "{field} asks for a sandbox network rule, and the {backend} backend does \
                     not attach sandbox networks yet; leave it unset or use QEMU"
                )
            })
        }
    };
    match reason {
        Some(reason) => Err(CreateSandboxError::Unsupported { reason }),
        None => Ok(()),
    }
}

/// Removes the network objects (namespace, veth, nft table) of the
/// sandboxes `ids`, which a dead provider abandoned; their directories are
/// already gone. Failures are logged.
pub(crate) async fn clean_abandoned(ids: Vec<String>) {
    if ids.is_empty() || unsupported_reason().is_some() {
        return;
    }
    match nova_net::clean_leftovers(|id| !ids.iter().any(|gone| gone == id)).await {
        Ok(report) if !report.is_empty() => {
            tracing::info!(?report, "removed the networks of abandoned sandboxes");
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot remove the networks of abandoned sandboxes"),
    }
}

/// Replaces the egress policy of `net` with `egress`, in one nft
/// transaction: on error the old one stays. A user-mode network has no
/// policy to replace: refused, saying why.
pub(crate) async fn update(
    net: &mut SandboxNet,
    egress: &EgressConfig,
) -> Result<(), UpdateNetworkError> {
    let policy = egress_policy(egress)?;
    match net {
        SandboxNet::Namespace(net) => net
            .update_egress(policy)
            .await
            .map_err(|e| UpdateNetworkError::Network(Box::new(e))),
        SandboxNet::User(_) if policy == EgressPolicy::default() => Ok(()),
        SandboxNet::User(_) => Err(UpdateNetworkError::Unsupported(
            CreateNetworkError::EgressNeedsNamespace.to_string(),
        )),
    }
}

/// Tears `net` down, logging what could not be removed.
pub(crate) async fn teardown(net: Option<SandboxNet>) {
    match net {
        Some(SandboxNet::Namespace(mut net)) => {
            if let Err(e) = net.teardown().await {
                tracing::warn!(error = %e, netns = net.netns_name(), "the sandbox network was not fully removed");
            }
        }
        Some(SandboxNet::User(mut net)) => net.teardown(),
        None => {}
    }
}

/// The boot contract's `nova.net=` for the guest of `net`.
pub fn guest_net(net: &SandboxNetwork) -> GuestNet {
    contract(
        net.guest_addr(),
        net.gateway(),
        net.spec().dns_servers.iter().copied(),
    )
}

/// The guest's `nova.net=`: its address and prefix, gateway, the MTU of
/// every sandbox network and at most [`MAX_DNS_SERVERS`] of `dns`.
fn contract(
    (addr, prefix): (std::net::Ipv4Addr, u8),
    gateway: std::net::Ipv4Addr,
    dns: impl IntoIterator<Item = std::net::Ipv4Addr>,
) -> GuestNet {
    GuestNet {
        addr,
        prefix,
        gateway,
        mtu: Some(GUEST_MTU),
        dns: dns.into_iter().take(MAX_DNS_SERVERS).collect(),
    }
}

/// Whether the VM a snapshot was taken of had a network device: its kernel
/// command line carried `nova.net=`. A VM is restored only with the same
/// devices.
pub fn snapshot_has_network(kernel_cmdline: &str) -> bool {
    nova_protocol::boot::NovaParams::parse(kernel_cmdline).is_ok_and(|p| p.net.is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_servers_a_sandbox_cannot_reach_are_refused() {
        assert_eq!(
            parse_dns_servers("192.0.2.1, 198.18.0.53").unwrap(),
            vec![
                std::net::Ipv4Addr::new(192, 0, 2, 1),
                std::net::Ipv4Addr::new(198, 18, 0, 53)
            ]
        );
        assert!(parse_dns_servers(" ,").unwrap().is_empty());
        let loopback = parse_dns_servers("192.0.2.1,127.0.0.53").unwrap_err();
        assert!(
            loopback.contains("127.0.0.53 cannot be reached"),
            "{loopback}"
        );
        assert!(parse_dns_servers("0.0.0.0").is_err());
        let bad = parse_dns_servers("dns.example").unwrap_err();
        assert!(bad.contains("is not an IPv4 address"), "{bad}");
    }

    #[test]
    fn the_seed_port_pair_is_one_published_tcp_port() {
        let mut config = SandboxConfig::default();
        assert!(spec(&config).unwrap().ports.is_empty());
        config.host_port = Some(18080);
        config.guest_port = 80;
        config.ports = vec![PortSpec {
            host_ip: Some(std::net::Ipv4Addr::LOCALHOST),
            ..PortSpec::udp(5353, 53)
        }];
        assert_eq!(
            spec(&config).unwrap().ports,
            vec![
                PortMapping::tcp(18080, 80),
                PortMapping::udp(5353, 53).on(std::net::Ipv4Addr::LOCALHOST)
            ]
        );
    }

    #[test]
    fn egress_becomes_the_nft_policy() {
        let config = SandboxConfig {
            egress: Some(EgressConfig {
                block_all: true,
                allow: vec!["10.0.0.0/8".into(), "example.com".into()],
                deny: vec!["10.1.0.0/16".into()],
            }),
            ..Default::default()
        };
        let policy = spec(&config).unwrap().egress;
        assert!(policy.block_all);
        assert_eq!(policy.allow_cidrs().len(), 1);
        assert_eq!(policy.deny_cidrs().len(), 1);
        assert!(policy.has_domain_rules());
    }

    #[test]
    fn a_port_in_use_is_named_by_its_config_field() {
        let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = busy.local_addr().unwrap().port();
        let config = SandboxConfig {
            host_port: Some(1),
            ports: vec![PortSpec {
                host_ip: Some(std::net::Ipv4Addr::LOCALHOST),
                ..PortSpec::tcp(port, 80)
            }],
            ..Default::default()
        };
        let err = spec(&config).unwrap().check_ports_free().unwrap_err();
        let err = create_error(&config, CreateNetworkError::Spec(err));
        assert!(
            matches!(&err, CreateSandboxError::PortUnavailable { field, port: p, .. }
                if field == "ports[0]" && *p == port),
            "{err:?}"
        );
        assert!(
            err.to_string()
                .contains(&format!("ports[0] = 127.0.0.1:{port}/tcp")),
            "{err}"
        );
    }

    #[test]
    fn each_network_mode_refuses_what_it_cannot_give() {
        let ports = SandboxConfig {
            host_port: Some(18080),
            ..Default::default()
        };
        let egress = SandboxConfig {
            egress: Some(EgressConfig {
                block_all: true,
                ..Default::default()
            }),
            ..Default::default()
        };
        let vz = HypervisorKind::AppleVz;
        for config in [&ports, &egress] {
            refuse_unsupported(config, NetworkMode::Namespace, vz).unwrap();
        }
        // Its own network publishes ports, and has no egress sets.
        refuse_unsupported(&ports, NetworkMode::Own, vz).unwrap();
        let e = refuse_unsupported(&egress, NetworkMode::Own, vz).unwrap_err();
        assert!(matches!(e, CreateSandboxError::Unsupported { .. }), "{e:?}");
        assert!(e.to_string().contains("network namespace"), "{e}");
        let e = refuse_unsupported(&ports, NetworkMode::None, vz).unwrap_err();
        assert!(e.to_string().contains("host_port = 18080"), "{e}");
        let e = refuse_unsupported(&egress, NetworkMode::None, vz).unwrap_err();
        assert!(e.to_string().contains("egress asks"), "{e}");
    }

    #[test]
    fn the_mode_follows_the_choice_and_what_each_mode_lacks() {
        let root = || None;
        let no_root = || Some("root".to_owned());
        let passt = || None;
        let no_passt = || Some("`passt` on PATH".to_owned());
        use HostNetMode::{Namespace, User};
        use NetModeChoice as C;
        assert_eq!(pick_mode(C::Auto, root(), passt()), Ok(Namespace));
        assert_eq!(pick_mode(C::Auto, no_root(), passt()), Ok(User));
        assert_eq!(pick_mode(C::User, root(), passt()), Ok(User));
        assert_eq!(pick_mode(C::Namespace, root(), no_passt()), Ok(Namespace));
        let e = pick_mode(C::Auto, no_root(), no_passt()).unwrap_err();
        assert!(
            e.contains("needs root") && e.contains("`passt` on PATH"),
            "{e}"
        );
        assert!(e.contains("enable_network = false"), "{e}");
        let e = pick_mode(C::User, root(), no_passt()).unwrap_err();
        assert!(e.starts_with("NOVA_NET_MODE=user"), "{e}");
        let e = pick_mode(C::Namespace, no_root(), passt()).unwrap_err();
        assert!(e.starts_with("NOVA_NET_MODE=namespace"), "{e}");
    }

    #[test]
    fn the_mode_variable_names_what_it_accepts() {
        assert_eq!("".parse::<NetModeChoice>(), Ok(NetModeChoice::Auto));
        assert_eq!(" User ".parse::<NetModeChoice>(), Ok(NetModeChoice::User));
        assert_eq!(
            "namespace".parse::<NetModeChoice>(),
            Ok(NetModeChoice::Namespace)
        );
        let e = "slirp".parse::<NetModeChoice>().unwrap_err();
        assert!(e.contains("auto, namespace or user"), "{e}");
    }

    #[test]
    fn a_user_mode_network_refuses_an_egress_policy_at_update_too() {
        // The message create and update give says what to do.
        let why = CreateNetworkError::EgressNeedsNamespace.to_string();
        assert!(
            why.contains("CAP_NET_ADMIN") && why.contains("leave egress unset"),
            "{why}"
        );
    }

    #[test]
    fn a_snapshot_has_a_network_when_its_command_line_says_so() {
        assert!(snapshot_has_network(
            "console=ttyS0 nova.net=169.254.0.21/30,gw=169.254.0.22"
        ));
        assert!(!snapshot_has_network("console=ttyS0 nova.hostname=a"));
    }
}
