//! What a caller asks of a sandbox's network: [`NetworkSpec`].
//!
//! A spec is plain data (serde, so it can come from a config file or an API
//! body) and [`NetworkSpec::validate`] checks it without touching the host:
//! ports are not 0 and do not collide, CIDRs are IPv4 networks with no host
//! bits set, domain names are well formed, DNS servers are unicast. Every
//! error names the field it is about (`ports[1].host_port`,
//! `egress.allow[0]`), so a user can fix the input without guessing. Whether a
//! host port is free is a question for the host, asked by
//! [`NetworkSpec::check_ports_free`] (and again, holding the port, when the
//! network is created).
//!
//! Egress rules are CIDRs or domain names. CIDRs are enforced by nftables
//! sets; domain names by the sandbox's resolver ([`crate::dns`]), which
//! answers only allowed names and opens the addresses it answered with.

use std::collections::BTreeSet;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, UdpSocket};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::SpecError;

/// The most entries one list (ports, an egress list, DNS servers) may hold.
pub const MAX_LIST_LEN: usize = 4096;

/// Everything a sandbox's network is made from.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkSpec {
    /// Host ports forwarded to the guest.
    pub ports: Vec<PortMapping>,
    /// What the guest may reach.
    pub egress: EgressPolicy,
    /// The resolvers the guest is told to use. They stay reachable on port 53
    /// (UDP and TCP) whatever the egress policy says, unless `egress.deny`
    /// names them. Empty: the caller picks (see
    /// [`host_resolvers`](crate::host_resolvers)).
    pub dns_servers: Vec<Ipv4Addr>,
}

/// One published port: `host_ip:host_port` on the host reaches `guest_port`
/// in the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortMapping {
    /// Port on the host, 1..=65535.
    pub host_port: u16,
    /// Port in the guest, 1..=65535.
    pub guest_port: u16,
    /// TCP or UDP.
    #[serde(default)]
    pub protocol: Protocol,
    /// Host address the port is published on; `0.0.0.0` (the default) means
    /// every address of the host, `127.0.0.1` the host itself only.
    #[serde(default = "unspecified")]
    pub host_ip: Ipv4Addr,
}

fn unspecified() -> Ipv4Addr {
    Ipv4Addr::UNSPECIFIED
}

impl PortMapping {
    /// A TCP mapping on every host address.
    pub fn tcp(host_port: u16, guest_port: u16) -> Self {
        Self {
            host_port,
            guest_port,
            protocol: Protocol::Tcp,
            host_ip: Ipv4Addr::UNSPECIFIED,
        }
    }

    /// A UDP mapping on every host address.
    pub fn udp(host_port: u16, guest_port: u16) -> Self {
        Self {
            protocol: Protocol::Udp,
            ..Self::tcp(host_port, guest_port)
        }
    }

    /// The same mapping published on `host_ip` only.
    pub fn on(self, host_ip: Ipv4Addr) -> Self {
        Self { host_ip, ..self }
    }

    /// Whether two mappings claim the same host socket.
    fn collides_with(&self, other: &PortMapping) -> bool {
        self.protocol == other.protocol
            && self.host_port == other.host_port
            && (self.host_ip == other.host_ip
                || self.host_ip.is_unspecified()
                || other.host_ip.is_unspecified())
    }
}

/// Transport protocol of a published port.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP.
    #[default]
    Tcp,
    /// UDP.
    Udp,
}

impl Protocol {
    /// `"tcp"` or `"udp"`, as nftables spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the guest may reach, besides answering on its published ports.
///
/// Precedence, first match wins:
/// 1. `deny` entries are dropped.
/// 2. `allow` entries that lie *inside* an always-denied range lift that
///    deny: the metadata address (`169.254.169.254/32`), the sandbox address
///    pool (other sandboxes) and, for the host's own addresses, single
///    addresses (`/32`). So `allow 0.0.0.0/0` never opens the host or another
///    sandbox; `allow 10.200.0.6/32` does.
/// 3. The always-denied ranges are dropped.
/// 4. The DNS servers, on port 53, are accepted.
/// 5. `allow` entries are accepted.
/// 6. When `allow` names domains: addresses the sandbox's resolver
///    answered for them are accepted, everything else dropped.
/// 7. Everything else: dropped when `block_all`, accepted otherwise.
///
/// Domain names are matched by the sandbox's resolver ([`crate::dns`]):
/// `example.com` itself, `*.example.com` every name under it. A name in
/// `deny` gets `NXDOMAIN`; when `allow` names domains, so does every name
/// it does not match. Domain rules govern names only: an address reached
/// without asking the resolver falls under the CIDR rules (steps 1-5, 7).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EgressPolicy {
    /// Drop everything not allowed.
    pub block_all: bool,
    /// Destinations the guest may reach.
    pub allow: Vec<EgressRule>,
    /// Destinations the guest may not reach.
    pub deny: Vec<EgressRule>,
}

impl EgressPolicy {
    /// Nothing but what `allow` names.
    pub fn block_all() -> Self {
        Self {
            block_all: true,
            ..Self::default()
        }
    }

    /// Parses allow and deny lists of strings (CIDRs, addresses or domain
    /// names), naming the entry that is wrong.
    pub fn parse<A: AsRef<str>, D: AsRef<str>>(
        block_all: bool,
        allow: &[A],
        deny: &[D],
    ) -> Result<Self, SpecError> {
        Ok(Self {
            block_all,
            allow: parse_rules("egress.allow", allow)?,
            deny: parse_rules("egress.deny", deny)?,
        })
    }

    /// Whether any rule names a domain (the sandbox then gets a resolver).
    pub fn has_domain_rules(&self) -> bool {
        self.allow
            .iter()
            .chain(&self.deny)
            .any(|r| matches!(r, EgressRule::Domain(_)))
    }

    /// The CIDRs of `allow`, nested ones folded into their parent.
    pub fn allow_cidrs(&self) -> Vec<Ipv4Cidr> {
        fold_cidrs(self.allow.iter().filter_map(EgressRule::cidr))
    }

    /// The CIDRs of `deny`, nested ones folded into their parent.
    pub fn deny_cidrs(&self) -> Vec<Ipv4Cidr> {
        fold_cidrs(self.deny.iter().filter_map(EgressRule::cidr))
    }

    /// Checks the lists' lengths.
    pub fn validate(&self) -> Result<(), SpecError> {
        check_len("egress.allow", self.allow.len())?;
        check_len("egress.deny", self.deny.len())
    }
}

fn parse_rules<S: AsRef<str>>(field: &str, list: &[S]) -> Result<Vec<EgressRule>, SpecError> {
    check_len(field, list.len())?;
    list.iter()
        .enumerate()
        .map(|(i, s)| {
            s.as_ref()
                .parse::<EgressRule>()
                .map_err(|e| e.at(format!("{field}[{i}]")))
        })
        .collect()
}

fn check_len(field: &str, len: usize) -> Result<(), SpecError> {
    if len > MAX_LIST_LEN {
        return Err(SpecError::TooMany {
            field: field.to_owned(),
            len,
            max: MAX_LIST_LEN,
        });
    }
    Ok(())
}

/// Sorts CIDRs and drops those inside another, so an nftables interval set
/// takes them (it refuses overlapping elements).
pub(crate) fn fold_cidrs(cidrs: impl IntoIterator<Item = Ipv4Cidr>) -> Vec<Ipv4Cidr> {
    let mut all: Vec<Ipv4Cidr> = cidrs
        .into_iter()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    // Shorter prefixes first, so a parent is kept before its children.
    all.sort_by_key(|c| c.prefix);
    let mut kept: Vec<Ipv4Cidr> = Vec::with_capacity(all.len());
    for c in all {
        if !kept.iter().any(|k| k.contains_cidr(&c)) {
            kept.push(c);
        }
    }
    kept.sort();
    kept
}

/// One egress destination.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum EgressRule {
    /// An IPv4 network (a bare address is a `/32`).
    Cidr(Ipv4Cidr),
    /// A domain name, `*.` for its subdomains. Not enforced yet.
    Domain(DomainName),
}

impl EgressRule {
    /// The CIDR, if this rule is one.
    pub fn cidr(&self) -> Option<Ipv4Cidr> {
        match self {
            EgressRule::Cidr(c) => Some(*c),
            EgressRule::Domain(_) => None,
        }
    }
}

impl FromStr for EgressRule {
    type Err = SpecError;

    /// A string that starts like an address (a digit, or contains `:` or `/`)
    /// is a CIDR; anything else a domain name.
    fn from_str(s: &str) -> Result<Self, SpecError> {
        if nova_core::network::looks_like_cidr(s) {
            s.parse().map(EgressRule::Cidr)
        } else {
            s.parse().map(EgressRule::Domain)
        }
    }
}

impl TryFrom<String> for EgressRule {
    type Error = SpecError;
    fn try_from(s: String) -> Result<Self, SpecError> {
        s.parse()
    }
}

impl From<EgressRule> for String {
    fn from(r: EgressRule) -> String {
        r.to_string()
    }
}

impl fmt::Display for EgressRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EgressRule::Cidr(c) => c.fmt(f),
            EgressRule::Domain(d) => d.fmt(f),
        }
    }
}

impl From<Ipv4Cidr> for EgressRule {
    fn from(c: Ipv4Cidr) -> Self {
        EgressRule::Cidr(c)
    }
}

/// An IPv4 network: an address with no bits set past the prefix, and the
/// prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ipv4Cidr {
    addr: Ipv4Addr,
    prefix: u8,
}

impl Ipv4Cidr {
    /// `addr/prefix`; refuses a prefix over 32 and host bits set.
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Result<Self, SpecError> {
        if prefix > 32 {
            return Err(SpecError::InvalidCidr {
                field: String::new(),
                value: format!("{addr}/{prefix}"),
                reason: "the prefix length is over 32",
            });
        }
        if u32::from(addr) & !mask(prefix) != 0 {
            return Err(SpecError::InvalidCidr {
                field: String::new(),
                value: format!("{addr}/{prefix}"),
                reason: "host bits are set past the prefix; write the network address",
            });
        }
        Ok(Self { addr, prefix })
    }

    /// `addr/prefix` in a const context; `None` where [`new`](Self::new)
    /// would refuse.
    pub const fn const_new(addr: Ipv4Addr, prefix: u8) -> Option<Self> {
        if prefix > 32 || addr.to_bits() & !mask(prefix) != 0 {
            return None;
        }
        Some(Self { addr, prefix })
    }

    /// One address, `/32`.
    pub fn host(addr: Ipv4Addr) -> Self {
        Self { addr, prefix: 32 }
    }

    /// The network of `prefix` bits that holds this one's address.
    pub fn with_prefix(self, prefix: u8) -> Self {
        let prefix = prefix.min(32);
        Self {
            addr: Ipv4Addr::from(u32::from(self.addr) & mask(prefix)),
            prefix,
        }
    }

    /// The network address.
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether `ip` is in this network.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & mask(self.prefix) == u32::from(self.addr)
    }

    /// Whether `other` lies entirely inside this network.
    pub fn contains_cidr(&self, other: &Ipv4Cidr) -> bool {
        other.prefix >= self.prefix && self.contains(other.addr)
    }

    /// The number of addresses, as a `u64` (a `/0` has 2^32).
    pub fn size(&self) -> u64 {
        1u64 << (32 - u32::from(self.prefix))
    }
}

pub(crate) const fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else if prefix >= 32 {
        u32::MAX
    } else {
        u32::MAX << (32 - prefix as u32)
    }
}

impl FromStr for Ipv4Cidr {
    type Err = SpecError;

    /// The syntax of [`nova_core::network::parse_cidr`], shared with config
    /// validation.
    fn from_str(s: &str) -> Result<Self, SpecError> {
        nova_core::network::parse_cidr(s)
            .map(|(addr, prefix)| Self { addr, prefix })
            .map_err(|reason| SpecError::InvalidCidr {
                field: String::new(),
                value: s.to_owned(),
                reason,
            })
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Serialize for Ipv4Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Ipv4Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A domain name in an egress rule: lowercase letters, digits and `-` in
/// dot-separated labels of 1 to 63 characters, 253 characters at most,
/// optionally starting with `*.` to mean every subdomain.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DomainName(String);

impl DomainName {
    /// The name, lowercase, without a trailing dot.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether the name is `*.suffix`.
    pub fn is_wildcard(&self) -> bool {
        self.0.starts_with("*.")
    }
}

impl FromStr for DomainName {
    type Err = SpecError;

    /// The syntax of [`nova_core::network::normalize_domain`], shared with
    /// config validation.
    fn from_str(s: &str) -> Result<Self, SpecError> {
        nova_core::network::normalize_domain(s)
            .map(Self)
            .map_err(|reason| SpecError::InvalidDomain {
                field: String::new(),
                value: s.to_owned(),
                reason,
            })
    }
}

impl fmt::Display for DomainName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl NetworkSpec {
    /// Checks the spec without touching the host; the first problem found
    /// is returned, naming its field.
    pub fn validate(&self) -> Result<(), SpecError> {
        check_len("ports", self.ports.len())?;
        check_len("dns_servers", self.dns_servers.len())?;
        for (i, p) in self.ports.iter().enumerate() {
            if p.host_port == 0 {
                return Err(SpecError::PortZero {
                    field: format!("ports[{i}].host_port"),
                });
            }
            if p.guest_port == 0 {
                return Err(SpecError::PortZero {
                    field: format!("ports[{i}].guest_port"),
                });
            }
            if p.host_ip.is_multicast() || p.host_ip.is_broadcast() {
                return Err(SpecError::InvalidHostIp {
                    field: format!("ports[{i}].host_ip"),
                    ip: p.host_ip,
                });
            }
            if let Some(j) = self.ports[..i].iter().position(|q| q.collides_with(p)) {
                return Err(SpecError::DuplicatePort {
                    field: format!("ports[{i}].host_port"),
                    other: format!("ports[{j}].host_port"),
                    port: p.host_port,
                    protocol: p.protocol,
                });
            }
        }
        self.egress.validate()?;
        for (i, d) in self.dns_servers.iter().enumerate() {
            if d.is_unspecified() || d.is_multicast() || d.is_broadcast() {
                return Err(SpecError::InvalidDnsServer {
                    field: format!("dns_servers[{i}]"),
                    ip: *d,
                });
            }
        }
        Ok(())
    }

    /// Checks that every published host port can be bound now, by binding
    /// and releasing it. [`SandboxNetwork::create`](crate::SandboxNetwork::create)
    /// does this again and holds the ports for the sandbox's life.
    pub fn check_ports_free(&self) -> Result<(), SpecError> {
        reserve_ports(&self.ports).map(drop)
    }
}

/// Sockets bound on published host ports, held so that no other process (and
/// no other sandbox) can take them while the sandbox lives. Packets never
/// reach them: nftables rewrites the destination before the socket lookup.
#[derive(Debug)]
pub(crate) struct PortReservation {
    _sockets: Vec<HeldSocket>,
}

#[derive(Debug)]
enum HeldSocket {
    Tcp(#[allow(dead_code)] TcpListener),
    Udp(#[allow(dead_code)] UdpSocket),
}

pub(crate) fn reserve_ports(ports: &[PortMapping]) -> Result<PortReservation, SpecError> {
    let mut sockets = Vec::with_capacity(ports.len());
    for (i, p) in ports.iter().enumerate() {
        let at = SocketAddrV4::new(p.host_ip, p.host_port);
        let held = match p.protocol {
            Protocol::Tcp => TcpListener::bind(at).map(HeldSocket::Tcp),
            Protocol::Udp => UdpSocket::bind(at).map(HeldSocket::Udp),
        };
        match held {
            Ok(s) => sockets.push(s),
            Err(source) => {
                return Err(SpecError::PortUnavailable {
                    field: format!("ports[{i}].host_port"),
                    port: p.host_port,
                    protocol: p.protocol,
                    host_ip: p.host_ip,
                    source,
                });
            }
        }
    }
    Ok(PortReservation { _sockets: sockets })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(s: &str) -> Ipv4Cidr {
        s.parse().expect("test CIDR parses")
    }

    #[test]
    fn cidrs_parse_and_refuse_host_bits_and_ipv6() {
        assert_eq!(cidr("10.0.0.0/8").prefix(), 8);
        assert_eq!(cidr("1.2.3.4"), Ipv4Cidr::host(Ipv4Addr::new(1, 2, 3, 4)));
        assert!(cidr("0.0.0.0/0").contains(Ipv4Addr::new(8, 8, 8, 8)));
        for bad in [
            "10.0.0.1/8",
            "10.0.0.0/33",
            "10.0.0/8",
            "::/0",
            "10.0.0.0/x",
            "",
        ] {
            assert!(
                matches!(bad.parse::<Ipv4Cidr>(), Err(SpecError::InvalidCidr { .. })),
                "{bad} must be refused"
            );
        }
    }

    #[test]
    fn rules_tell_cidrs_from_domains() {
        assert!(matches!(
            "10.1.0.0/16".parse::<EgressRule>(),
            Ok(EgressRule::Cidr(_))
        ));
        assert!(matches!(
            "8.8.8.8".parse::<EgressRule>(),
            Ok(EgressRule::Cidr(_))
        ));
        assert!(
            matches!("Example.COM.".parse::<EgressRule>(), Ok(EgressRule::Domain(d)) if d.as_str() == "example.com")
        );
        assert!(
            matches!("*.pypi.org".parse::<EgressRule>(), Ok(EgressRule::Domain(d)) if d.is_wildcard())
        );
        for bad in [
            "localhost",
            "a..b",
            "-a.com",
            "a_b.com",
            "*.",
            "ex ample.com",
            "a.*.com",
        ] {
            assert!(
                matches!(
                    bad.parse::<EgressRule>(),
                    Err(SpecError::InvalidDomain { .. })
                ),
                "{bad} must be refused"
            );
        }
        assert!(matches!(
            "300.1.1.1".parse::<EgressRule>(),
            Err(SpecError::InvalidCidr { .. })
        ));
    }

    #[test]
    fn parse_names_the_entry() {
        let err = EgressPolicy::parse(false, &["10.0.0.0/8"], &["1.1.1.1", "10.0.0.1/8"])
            .expect_err("host bits");
        assert_eq!(err.field(), "egress.deny[1]");
        assert!(err.to_string().contains("egress.deny[1]"), "{err}");
        let err = EgressPolicy::parse::<&str, &str>(false, &["no_such"], &[]).expect_err("domain");
        assert_eq!(err.field(), "egress.allow[0]");
    }

    #[test]
    fn nested_cidrs_fold() {
        let p = EgressPolicy::parse::<&str, &str>(
            true,
            &[
                "10.0.0.0/8",
                "10.1.0.0/16",
                "192.168.1.1",
                "10.0.0.0/8",
                "example.com",
            ],
            &[],
        )
        .expect("valid");
        assert_eq!(
            p.allow_cidrs(),
            vec![cidr("10.0.0.0/8"), cidr("192.168.1.1/32")]
        );
        assert!(p.has_domain_rules());
    }

    #[test]
    fn ports_zero_and_duplicates_are_refused_by_name() {
        let spec = NetworkSpec {
            ports: vec![PortMapping::tcp(8080, 80), PortMapping::tcp(0, 81)],
            ..Default::default()
        };
        let err = spec.validate().expect_err("port 0");
        assert!(matches!(&err, SpecError::PortZero { field } if field == "ports[1].host_port"));

        let spec = NetworkSpec {
            ports: vec![PortMapping::tcp(8080, 0)],
            ..Default::default()
        };
        assert_eq!(
            spec.validate().expect_err("guest 0").field(),
            "ports[0].guest_port"
        );

        let spec = NetworkSpec {
            ports: vec![
                PortMapping::tcp(8080, 80),
                PortMapping::udp(8080, 80),
                PortMapping::tcp(8080, 81).on(Ipv4Addr::LOCALHOST),
            ],
            ..Default::default()
        };
        let err = spec.validate().expect_err("overlap with 0.0.0.0");
        assert!(
            matches!(&err, SpecError::DuplicatePort { field, other, port: 8080, .. }
                if field == "ports[2].host_port" && other == "ports[0].host_port"),
            "{err}"
        );

        let spec = NetworkSpec {
            ports: vec![
                PortMapping::tcp(8080, 80).on(Ipv4Addr::LOCALHOST),
                PortMapping::tcp(8080, 80).on(Ipv4Addr::new(127, 0, 0, 2)),
            ],
            ..Default::default()
        };
        spec.validate()
            .expect("different host addresses do not collide");
    }

    #[test]
    fn dns_servers_must_be_unicast() {
        let spec = NetworkSpec {
            dns_servers: vec![Ipv4Addr::new(10, 0, 0, 2), Ipv4Addr::UNSPECIFIED],
            ..Default::default()
        };
        assert_eq!(
            spec.validate().expect_err("0.0.0.0").field(),
            "dns_servers[1]"
        );
    }

    #[test]
    fn a_port_in_use_is_refused_by_name() {
        let busy = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
        let port = busy.local_addr().expect("local addr").port();
        let spec = NetworkSpec {
            ports: vec![PortMapping::tcp(port, 80).on(Ipv4Addr::LOCALHOST)],
            ..Default::default()
        };
        spec.validate().expect("valid");
        let err = spec.check_ports_free().expect_err("in use");
        assert!(
            matches!(&err, SpecError::PortUnavailable { field, .. } if field == "ports[0].host_port")
        );
        assert!(err.to_string().contains(&port.to_string()), "{err}");
    }

    #[test]
    fn serde_round_trip() {
        let json = r#"{"ports":[{"host_port":8080,"guest_port":80}],
            "egress":{"block_all":true,"allow":["10.0.0.0/8","example.com"]},
            "dns_servers":["10.0.0.2"]}"#;
        let spec: NetworkSpec = serde_json::from_str(json).expect("parses");
        assert_eq!(spec.ports[0], PortMapping::tcp(8080, 80));
        assert!(spec.egress.block_all);
        let back = serde_json::to_string(&spec).expect("serializes");
        let again: NetworkSpec = serde_json::from_str(&back).expect("parses again");
        assert_eq!(spec, again);
        assert!(
            serde_json::from_str::<NetworkSpec>(r#"{"egress":{"allow":["10.0.0.1/8"]}}"#).is_err()
        );
    }
}
