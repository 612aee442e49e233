//! Errors, one enum per operation, joined by [`HostError`] for what the
//! kernel or `nft` refused.

use std::net::Ipv4Addr;

use crate::spec::{Ipv4Cidr, Protocol};

/// A [`NetworkSpec`](crate::NetworkSpec) that cannot be used; each variant
/// names the field.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SpecError {
    /// A port is 0.
    #[error("{field} = 0 is invalid: use a port in 1..=65535")]
    PortZero {
        /// The field, e.g. `ports[1].host_port`.
        field: String,
    },
    /// Two mappings claim the same host port.
    #[error("{field} = {port}/{protocol} is already published by {other}: use another host port")]
    DuplicatePort {
        /// The later mapping's field.
        field: String,
        /// The earlier mapping's field.
        other: String,
        /// The port.
        port: u16,
        /// Its protocol.
        protocol: Protocol,
    },
    /// A host port cannot be bound: in use, or the address is not the host's.
    #[error("{field} = {host_ip}:{port}/{protocol} cannot be published: {source}")]
    PortUnavailable {
        /// The field, e.g. `ports[0].host_port`.
        field: String,
        /// The port.
        port: u16,
        /// Its protocol.
        protocol: Protocol,
        /// The host address it was to be bound on.
        host_ip: Ipv4Addr,
        /// Why binding failed (`EADDRINUSE`: in use).
        #[source]
        source: std::io::Error,
    },
    /// A host address that cannot publish a port.
    #[error("{field} = {ip} is not a unicast address: use 0.0.0.0, 127.0.0.1 or one of the host's")]
    InvalidHostIp {
        /// The field.
        field: String,
        /// The address.
        ip: Ipv4Addr,
    },
    /// Not an IPv4 network.
    #[error("{field}{sep}{value:?} is not a valid CIDR: {reason}", sep = if field.is_empty() { "" } else { " = " })]
    InvalidCidr {
        /// The field, e.g. `egress.allow[2]` (empty before it is known).
        field: String,
        /// What was given.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Not a domain name.
    #[error("{field}{sep}{value:?} is not a valid domain name: {reason}", sep = if field.is_empty() { "" } else { " = " })]
    InvalidDomain {
        /// The field.
        field: String,
        /// What was given.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A DNS server that is not a unicast address.
    #[error("{field} = {ip} is not a usable DNS server: give a unicast address")]
    InvalidDnsServer {
        /// The field.
        field: String,
        /// The address.
        ip: Ipv4Addr,
    },
    /// A list is too long.
    #[error("{field} has {len} entries: at most {max} are supported")]
    TooMany {
        /// The list.
        field: String,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
}

impl SpecError {
    /// The field the error is about.
    pub fn field(&self) -> &str {
        match self {
            SpecError::PortZero { field }
            | SpecError::DuplicatePort { field, .. }
            | SpecError::PortUnavailable { field, .. }
            | SpecError::InvalidHostIp { field, .. }
            | SpecError::InvalidCidr { field, .. }
            | SpecError::InvalidDomain { field, .. }
            | SpecError::InvalidDnsServer { field, .. }
            | SpecError::TooMany { field, .. } => field,
        }
    }

    /// The same error, about `field`.
    pub(crate) fn at(mut self, at: String) -> Self {
        match &mut self {
            SpecError::PortZero { field }
            | SpecError::DuplicatePort { field, .. }
            | SpecError::PortUnavailable { field, .. }
            | SpecError::InvalidHostIp { field, .. }
            | SpecError::InvalidCidr { field, .. }
            | SpecError::InvalidDomain { field, .. }
            | SpecError::InvalidDnsServer { field, .. }
            | SpecError::TooMany { field, .. } => *field = at,
        }
        self
    }
}

/// Something the kernel, a mount or `nft` refused while changing the host.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HostError {
    /// A netlink request failed.
    #[cfg(target_os = "linux")]
    #[error("netlink: {op}")]
    Netlink {
        /// What was being done.
        op: String,
        /// The kernel's answer.
        #[source]
        source: rtnetlink::Error,
    },
    /// A system call or file operation failed.
    #[error("{op}")]
    Io {
        /// What was being done.
        op: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// `nft` refused a ruleset or could not be run (is the `nftables`
    /// package installed?).
    #[cfg(target_os = "linux")]
    #[error("nftables: {op}")]
    Nft {
        /// What was being done.
        op: String,
        /// What `nft` said.
        #[source]
        source: nftables::helper::NftablesError,
    },
    /// An expected object was missing.
    #[error("{op}: not found")]
    NotFound {
        /// What was looked for.
        op: String,
    },
    /// This host cannot make sandbox networks (they need Linux: network
    /// namespaces, netlink, nftables).
    #[error(
        "{op}: sandbox networks need a Linux host; run without a network (enable_network = false)"
    )]
    NotLinux {
        /// What was being done.
        op: String,
    },
    /// A helper thread (the one that enters a namespace) died.
    #[error("{op}: the helper thread panicked")]
    ThreadPanicked {
        /// What it was doing.
        op: String,
    },
}

impl HostError {
    pub(crate) fn io(op: impl Into<String>, source: std::io::Error) -> Self {
        HostError::Io {
            op: op.into(),
            source,
        }
    }

    #[cfg(target_os = "linux")]
    pub(crate) fn netlink(op: impl Into<String>, source: rtnetlink::Error) -> Self {
        HostError::Netlink {
            op: op.into(),
            source,
        }
    }

    /// `nft`'s own message (its stderr) is kept in `op`: the helper's error
    /// does not show it.
    #[cfg(target_os = "linux")]
    pub(crate) fn nft(op: impl Into<String>, source: nftables::helper::NftablesError) -> Self {
        let mut op = op.into();
        if let nftables::helper::NftablesError::NftFailed { stderr, .. } = &source {
            let stderr = stderr.trim();
            if !stderr.is_empty() {
                op = format!("{op}: {}", stderr.lines().next().unwrap_or(stderr));
            }
        }
        HostError::Nft { op, source }
    }
}

/// [`SandboxNetwork::create`](crate::SandboxNetwork::create) failed; nothing
/// it made is left behind.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CreateNetworkError {
    /// The spec is invalid or a host port is taken.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// Every subnet of the pool is in use.
    #[error("the address pool {pool} has no free /30 left: widen it or stop sandboxes")]
    PoolExhausted {
        /// The pool.
        pool: Ipv4Cidr,
    },
    /// A network namespace of that name exists already (another sandbox with
    /// the same id, or a leftover: run leftover cleaning).
    #[error(
        "network namespace {name} exists already: another sandbox uses this id, or it is a leftover"
    )]
    AlreadyExists {
        /// The namespace's name.
        name: String,
    },
    /// The host refused a step.
    #[error("setting up the sandbox network failed")]
    Host(#[from] HostError),
    /// A user-mode network (passt) was asked for an egress policy: passt
    /// relays every flow through the host's own sockets and cannot filter.
    #[error(
        "the egress policy cannot be enforced by the user-mode network (passt relays every flow \
         through the host's sockets and cannot filter): run nova as root or with CAP_NET_ADMIN \
         for the namespace network (NOVA_NET_MODE=namespace), or leave egress unset"
    )]
    EgressNeedsNamespace,
    /// passt could not be started or did not come up.
    #[error("starting the user-mode network (passt) failed: {reason}")]
    Passt {
        /// What went wrong, with passt's own message where it gave one.
        reason: String,
    },
}

/// [`SandboxNetwork::update_egress`](crate::SandboxNetwork::update_egress)
/// failed; the previous policy stays in force (nftables applies a batch
/// atomically).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpdateEgressError {
    /// The policy is invalid.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// The network was torn down.
    #[error("the sandbox network was torn down")]
    TornDown,
    /// `nft` refused the change.
    #[error("applying the egress policy failed")]
    Host(#[from] HostError),
}

/// [`SandboxNetwork::teardown`](crate::SandboxNetwork::teardown) could not
/// remove everything; it tried every step.
#[derive(Debug, thiserror::Error)]
#[error("tearing down the sandbox network left {} object(s) behind; first: {}", failures.len(), failures.first().map(|f| f.to_string()).unwrap_or_default())]
pub struct TeardownError {
    /// Each step that failed.
    pub failures: Vec<HostError>,
}

/// Reading a sandbox's traffic counters failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CountersError {
    /// The network was torn down.
    #[error("the sandbox network was torn down")]
    TornDown,
    /// The kernel refused.
    #[error("reading network counters failed")]
    Host(#[from] HostError),
}

/// Opening the sandbox's tap device failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenTapError {
    /// The sandbox has no tap (it was created with a veth guest link).
    #[error("this sandbox network has no tap device (it was created with GuestLink::Veth)")]
    NoTap,
    /// The network was torn down.
    #[error("the sandbox network was torn down")]
    TornDown,
    /// The kernel refused.
    #[error("opening the tap device failed")]
    Host(#[from] HostError),
}

/// Leftover cleaning could not list or remove something.
#[derive(Debug, thiserror::Error)]
#[error("cleaning leftover sandbox networks failed")]
pub struct LeftoverError(#[from] pub HostError);
