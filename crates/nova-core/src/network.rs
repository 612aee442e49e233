//! What a caller asks of a sandbox's network beyond `enable_network`:
//! published ports ([`PortSpec`]) and an egress policy ([`EgressConfig`]).
//!
//! These are plain data, deserialized from configs, API bodies and
//! `state.json`, and checked by
//! [`SandboxConfig::validate`](crate::config::SandboxConfig::validate), with errors naming the field
//! (`ports[1].host_port`, `egress.allow[0]`). The host side (`nova-net`)
//! turns them into nftables rules; the parsing of an egress entry
//! ([`parse_cidr`], [`normalize_domain`], [`looks_like_cidr`]) lives here so
//! that both crates accept exactly the same strings.
//!
//! Neither ports nor the egress policy are seen by the guest: they are host
//! rules, so a snapshot restores whatever they say.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

use serde::{Deserialize, Serialize};

/// The most entries `ports`, `egress.allow` or `egress.deny` may hold.
pub const MAX_NETWORK_LIST_LEN: usize = 4096;

/// One published port: `host_ip:host_port` on the host reaches `guest_port`
/// in the guest, also at `127.0.0.1:host_port` from the host itself when
/// `host_ip` is unset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortSpec {
    /// Port on the host, 1..=65535.
    pub host_port: u16,
    /// Port in the guest, 1..=65535.
    pub guest_port: u16,
    /// TCP (the default) or UDP.
    #[serde(default)]
    pub protocol: PortProtocol,
    /// Host address the port is published on; unset means every address
    /// of the host (`0.0.0.0`), `127.0.0.1` the host itself only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_ip: Option<Ipv4Addr>,
}

impl PortSpec {
    /// A TCP port on every host address.
    pub fn tcp(host_port: u16, guest_port: u16) -> Self {
        Self {
            host_port,
            guest_port,
            protocol: PortProtocol::Tcp,
            host_ip: None,
        }
    }

    /// A UDP port on every host address.
    pub fn udp(host_port: u16, guest_port: u16) -> Self {
        Self {
            protocol: PortProtocol::Udp,
            ..Self::tcp(host_port, guest_port)
        }
    }

    /// The host address, `0.0.0.0` when unset.
    pub fn host_addr(&self) -> Ipv4Addr {
        self.host_ip.unwrap_or(Ipv4Addr::UNSPECIFIED)
    }

    /// Whether two ports claim the same host socket.
    pub fn collides_with(&self, other: &PortSpec) -> bool {
        let (a, b) = (self.host_addr(), other.host_addr());
        self.protocol == other.protocol
            && self.host_port == other.host_port
            && (a == b || a.is_unspecified() || b.is_unspecified())
    }
}

/// Transport protocol of a published port.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum PortProtocol {
    /// TCP.
    #[default]
    Tcp,
    /// UDP.
    Udp,
}

impl fmt::Display for PortProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PortProtocol::Tcp => "tcp",
            PortProtocol::Udp => "udp",
        })
    }
}

/// What the guest may reach. Entries are IPv4 CIDRs (`10.0.0.0/8`, a bare
/// address is a `/32`) or domain names (`example.com`, `*.example.com`).
///
/// Deny wins over allow; with `block_all` nothing but `allow` (and the DNS
/// servers) is reachable. Other sandboxes, the host's own addresses and
/// `169.254.169.254` stay closed unless an `allow` CIDR names them inside
/// that range. Domain names act through a per-sandbox resolver that the
/// guest's DNS is redirected to: a denied name (or, when `allow` names
/// domains, any name it does not match) gets `NXDOMAIN`, and an allowed
/// name's answers are opened for the answer's TTL (60 s to 1 h). With
/// domains in `allow`, everything else is closed unless an `allow` CIDR
/// opens it. Domain rules cannot govern a program that connects to a
/// hard-coded address or resolves names another way (DNS over HTTPS); the
/// CIDR rules do.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EgressConfig {
    /// Drop everything not allowed.
    pub block_all: bool,
    /// Destinations the guest may reach.
    pub allow: Vec<String>,
    /// Destinations the guest may not reach.
    pub deny: Vec<String>,
}

impl EgressConfig {
    /// Checks every entry; the error names it (`egress.allow[2]`).
    pub fn validate(&self) -> Result<(), crate::ConfigError> {
        for (list, entries) in [("egress.allow", &self.allow), ("egress.deny", &self.deny)] {
            if entries.len() > MAX_NETWORK_LIST_LEN {
                return Err(crate::ConfigError::TooMany {
                    field: list,
                    len: entries.len(),
                    max: MAX_NETWORK_LIST_LEN,
                });
            }
            for (i, entry) in entries.iter().enumerate() {
                let checked = if looks_like_cidr(entry) {
                    parse_cidr(entry).map(drop)
                } else {
                    normalize_domain(entry).map(drop)
                };
                if let Err(reason) = checked {
                    return Err(crate::ConfigError::Egress {
                        field: format!("{list}[{i}]"),
                        value: entry.clone(),
                        reason,
                    });
                }
            }
        }
        Ok(())
    }
}

/// Whether an egress entry is meant as an address or network (it has a
/// `/` or `:`, or only digits and dots) rather than a domain name.
pub fn looks_like_cidr(s: &str) -> bool {
    s.contains('/') || s.contains(':') || s.bytes().all(|b| b.is_ascii_digit() || b == b'.')
}

/// Parses `a.b.c.d/n` (a bare address is `/32`) into the network address and
/// prefix; refuses IPv6, a prefix over 32 and host bits set past the prefix,
/// with the reason.
pub fn parse_cidr(s: &str) -> Result<(Ipv4Addr, u8), &'static str> {
    let (addr, prefix) = match s.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (s, None),
    };
    let addr: IpAddr = addr
        .parse()
        .map_err(|_| "not an IP address (expected a.b.c.d or a.b.c.d/n)")?;
    let IpAddr::V4(addr) = addr else {
        return Err("IPv6 is not supported: sandboxes have IPv4 only");
    };
    let prefix = match prefix {
        None => 32,
        Some(p) => p
            .parse::<u8>()
            .map_err(|_| "the prefix length is not a number from 0 to 32")?,
    };
    if prefix > 32 {
        return Err("the prefix length is over 32");
    }
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    };
    if addr.to_bits() & !mask != 0 {
        return Err("host bits are set past the prefix; write the network address");
    }
    Ok((addr, prefix))
}

/// Checks a domain name of an egress rule and returns it lowercase without
/// a trailing dot: letters, digits and `-` in dot-separated labels of 1 to
/// 63 characters, 253 at most, at least two labels, optionally `*.` first
/// (every subdomain).
pub fn normalize_domain(s: &str) -> Result<String, &'static str> {
    let name = s.strip_suffix('.').unwrap_or(s).to_ascii_lowercase();
    let bare = name.strip_prefix("*.").unwrap_or(&name);
    if bare.is_empty() {
        return Err("empty name");
    }
    if name.len() > 253 {
        return Err("longer than 253 characters");
    }
    for label in bare.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err("each label must be 1 to 63 characters");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err("use letters, digits and '-' only ('*.' only as the first label)");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("a label may not start or end with '-'");
        }
    }
    if !bare.contains('.') {
        return Err("a single label is not a domain name (write example.com)");
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_and_domains_parse_as_nova_net_expects() {
        assert_eq!(
            parse_cidr("10.0.0.0/8"),
            Ok((Ipv4Addr::new(10, 0, 0, 0), 8))
        );
        assert_eq!(parse_cidr("1.2.3.4"), Ok((Ipv4Addr::new(1, 2, 3, 4), 32)));
        for bad in ["10.0.0.1/8", "10.0.0.0/33", "::/0", "10.0.0/8", ""] {
            assert!(parse_cidr(bad).is_err(), "{bad}");
        }
        assert_eq!(normalize_domain("Example.COM."), Ok("example.com".into()));
        assert!(normalize_domain("*.pypi.org").is_ok());
        for bad in ["localhost", "a..b", "-a.com", "a_b.com", "*.", "a.*.com"] {
            assert!(normalize_domain(bad).is_err(), "{bad}");
        }
        assert!(looks_like_cidr("300.1.1.1") && !looks_like_cidr("example.com"));
    }

    #[test]
    fn ports_collide_on_the_same_host_socket() {
        let a = PortSpec::tcp(8080, 80);
        assert!(a.collides_with(&PortSpec::tcp(8080, 81)));
        assert!(!a.collides_with(&PortSpec::udp(8080, 80)));
        let lo = PortSpec {
            host_ip: Some(Ipv4Addr::LOCALHOST),
            ..a
        };
        assert!(lo.collides_with(&a), "0.0.0.0 covers 127.0.0.1");
        let other = PortSpec {
            host_ip: Some(Ipv4Addr::new(127, 0, 0, 2)),
            ..a
        };
        assert!(!lo.collides_with(&other));
    }

    #[test]
    fn serde_defaults() {
        let p: PortSpec = serde_json::from_str(r#"{"host_port":1,"guest_port":2}"#).unwrap();
        assert_eq!(p, PortSpec::tcp(1, 2));
        let p: PortSpec = serde_json::from_str(
            r#"{"host_port":1,"guest_port":2,"protocol":"udp","host_ip":"127.0.0.1"}"#,
        )
        .unwrap();
        assert_eq!(p.protocol, PortProtocol::Udp);
        let e: EgressConfig = serde_json::from_str(r#"{"allow":["10.0.0.0/8"]}"#).unwrap();
        assert!(!e.block_all);
        assert!(serde_json::from_str::<EgressConfig>(r#"{"alow":[]}"#).is_err());
    }
}
