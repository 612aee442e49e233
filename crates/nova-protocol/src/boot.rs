//! The boot contract between the host and the guest: what every backend puts
//! on the guest's kernel command line and what the agent reads back from it.
//!
//! Everything a backend and the agent must agree on before the first byte of
//! the agent protocol flows lives here, once:
//!
//! * where the agent is ([`AGENT_PATH`]) and where it listens
//!   ([`AGENT_VSOCK_PORT`], [`AGENT_SERIAL_PORT`]);
//! * the guest's block devices ([`ROOT_DEVICE`], [`SCRATCH_DEVICE`]) and the
//!   serial console ([`SERIAL_CONSOLE`]);
//! * every `nova.*` kernel parameter ([`NovaParams`]), with one formatter
//!   ([`NovaParams::to_words`]) and one parser ([`NovaParams::parse`]);
//! * the assembly of the whole command line ([`KernelCmdline::assemble`]):
//!   the backend's console, the user's `kernel_args` (checked once, here, for
//!   anything that would break the contract), then the words NovaSandbox
//!   owns, then the backend's own tuning words.
//!
//! | parameter | effect in the guest |
//! |---|---|
//! | `nova.hostname=NAME` | hostname (default [`DEFAULT_HOSTNAME`]) |
//! | `nova.overlay=/dev/vdX` | scratch disk (ext4) for the writable overlay over the read-only root |
//! | `nova.env.KEY=VALUE` | extra default environment variable for every command (repeatable) |
//! | `nova.listen=ADDR` | where the agent listens (`vsock:PORT`, `serial:NAME`, `unix:PATH`); repeatable, replaces the defaults |
//! | `nova.net=ADDR/PREFIX,gw=GATEWAY[,mtu=N][,dns=IP+IP...]` | configure [`GUEST_NET_DEVICE`] (address, default route, MTU) and write `/etc/resolv.conf` ([`GuestNet`]); absent: no network |
//!
//! An assembled command line looks like this (QEMU, with a scratch disk):
//!
//! ```text
//! console=ttyS0 reboot=k panic=1 quiet root=/dev/vda rootfstype=ext4 ro init=/sbin/nova-agent nova.hostname=sb-1 nova.overlay=/dev/vdb tsc_early_khz=2400000
//! ^ backend     ^ the user's kernel_args   ^ the contract                                       ^ nova.* parameters                   ^ backend extras
//! ```

use std::fmt;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::str::FromStr;

/// Path of the agent in every rootfs; the kernel runs it as PID 1.
pub const AGENT_PATH: &str = "/sbin/nova-agent";
/// The vsock port the agent listens on (Firecracker, Apple VZ).
pub const AGENT_VSOCK_PORT: u32 = 1024;
/// The name of the virtio-serial port the agent listens on (QEMU).
pub const AGENT_SERIAL_PORT: &str = "org.nova.agent";
/// Guest device of the root filesystem: the first disk, attached read-only.
pub const ROOT_DEVICE: &str = "/dev/vda";
/// File system type of the root device.
pub const ROOT_FS_TYPE: &str = "ext4";
/// Guest device of the scratch disk for the writable overlay: the second disk.
pub const SCRATCH_DEVICE: &str = "/dev/vdb";
/// The serial console backends log the guest on.
pub const SERIAL_CONSOLE: &str = "ttyS0";
/// The serial console of an arm64 guest on QEMU's `virt` machine (its
/// PL011 UART).
pub const PL011_CONSOLE: &str = "ttyAMA0";
/// The guest's network interface that `nova.net=` configures.
pub const GUEST_NET_DEVICE: &str = "eth0";
/// The guest's hostname when the command line names none.
pub const DEFAULT_HOSTNAME: &str = "nova";
/// Longest command line [`KernelCmdline::assemble`] produces. The kernel
/// takes 2048 bytes on x86_64 and arm64, and the VMM appends its own words
/// (one `virtio_mmio.device=` per device), so a quarter is left to it.
pub const MAX_CMDLINE_LEN: usize = 1536;

/// Names of the `nova.*` parameters.
pub mod param {
    /// `nova.hostname=NAME`.
    pub const HOSTNAME: &str = "nova.hostname";
    /// `nova.overlay=DEVICE`.
    pub const OVERLAY: &str = "nova.overlay";
    /// `nova.listen=ADDR`.
    pub const LISTEN: &str = "nova.listen";
    /// `nova.env.KEY=VALUE`.
    pub const ENV_PREFIX: &str = "nova.env.";
    /// `nova.net=ADDR/PREFIX,gw=GATEWAY[,mtu=N][,dns=IP+IP]`.
    pub const NET: &str = "nova.net";
}

/// Where the agent listens.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ListenAddr {
    /// A Unix socket at this path (host tests).
    Unix(PathBuf),
    /// An `AF_VSOCK` port, any CID.
    Vsock(u32),
    /// The virtio-serial port with this name.
    Serial(String),
}

/// A listen address could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("listen address {addr:?}: {reason}")]
pub struct ListenAddrError {
    /// The text given.
    pub addr: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl FromStr for ListenAddr {
    type Err = ListenAddrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| ListenAddrError {
            addr: s.to_owned(),
            reason,
        };
        let (scheme, rest) = s
            .split_once(':')
            .ok_or_else(|| err("expected unix:PATH, vsock:PORT or serial:NAME"))?;
        match scheme {
            "unix" if !rest.is_empty() => Ok(Self::Unix(PathBuf::from(rest))),
            "vsock" => rest
                .parse()
                .map(Self::Vsock)
                .map_err(|_| err("the vsock port is not a number")),
            "serial" if !rest.is_empty() => Ok(Self::Serial(rest.to_owned())),
            _ => Err(err("expected unix:PATH, vsock:PORT or serial:NAME")),
        }
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
            Self::Vsock(port) => write!(f, "vsock:{port}"),
            Self::Serial(name) => write!(f, "serial:{name}"),
        }
    }
}

/// Every `nova.*` kernel parameter, typed.
///
/// The host builds one and formats it with [`NovaParams::to_words`]; the
/// agent gets it back with [`NovaParams::parse`]. Fields left empty take the
/// agent's defaults ([`NovaParams::hostname_or_default`],
/// [`NovaParams::listen_or_default`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NovaParams {
    /// `nova.hostname`: the guest's hostname.
    pub hostname: Option<String>,
    /// `nova.overlay`: the scratch disk for the writable overlay; a
    /// read-only root when `None`.
    pub overlay: Option<String>,
    /// `nova.env.KEY=VALUE`: default environment of every command, in order.
    pub env: Vec<(String, String)>,
    /// `nova.listen`: where the agent listens; the defaults when empty.
    pub listen: Vec<ListenAddr>,
    /// `nova.net`: the guest's network; none (only `lo`) when `None`.
    pub net: Option<GuestNet>,
}

/// Most DNS servers `nova.net=` carries (glibc reads three).
pub const MAX_DNS_SERVERS: usize = 3;

/// The guest's IPv4 network, as `nova.net=` gives it to the agent:
/// [`GUEST_NET_DEVICE`] gets `addr/prefix` and `mtu`, a default route via
/// `gateway`, and `/etc/resolv.conf` lists `dns`.
///
/// ```
/// use nova_protocol::boot::GuestNet;
/// let net: GuestNet = "169.254.0.21/30,gw=169.254.0.22,mtu=1500,dns=10.0.0.2+10.0.0.3"
///     .parse()
///     .unwrap();
/// assert_eq!(net.prefix, 30);
/// assert_eq!(net.to_string(), "169.254.0.21/30,gw=169.254.0.22,mtu=1500,dns=10.0.0.2+10.0.0.3");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestNet {
    /// The guest's address.
    pub addr: Ipv4Addr,
    /// Its prefix length (1..=30).
    pub prefix: u8,
    /// The default gateway, inside `addr/prefix`.
    pub gateway: Ipv4Addr,
    /// The interface MTU; the driver's default when `None`.
    pub mtu: Option<u16>,
    /// Resolvers for `/etc/resolv.conf`, at most [`MAX_DNS_SERVERS`].
    pub dns: Vec<Ipv4Addr>,
}

impl GuestNet {
    /// The netmask of `prefix`.
    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(
            u32::MAX
                .checked_shl(32 - u32::from(self.prefix))
                .unwrap_or(0),
        )
    }

    /// `/etc/resolv.conf` for [`GuestNet::dns`].
    pub fn resolv_conf(&self) -> String {
        let mut out = String::from("# written by nova-agent from nova.net=\n");
        for server in &self.dns {
            out.push_str(&format!("nameserver {server}\n"));
        }
        out
    }

    fn check(&self) -> Result<(), &'static str> {
        if !(1..=30).contains(&self.prefix) {
            return Err("the prefix must be 1..=30");
        }
        let mask = u32::from(self.netmask());
        if u32::from(self.addr) & mask != u32::from(self.gateway) & mask {
            return Err("the gateway must be inside the guest's subnet");
        }
        if self.addr == self.gateway {
            return Err("the gateway must differ from the guest's address");
        }
        if self.mtu.is_some_and(|m| m < 68) {
            return Err("the MTU must be at least 68");
        }
        if self.dns.len() > MAX_DNS_SERVERS {
            return Err("at most 3 dns servers");
        }
        Ok(())
    }
}

impl fmt::Display for GuestNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{},gw={}", self.addr, self.prefix, self.gateway)?;
        if let Some(mtu) = self.mtu {
            write!(f, ",mtu={mtu}")?;
        }
        if !self.dns.is_empty() {
            let dns: Vec<String> = self.dns.iter().map(ToString::to_string).collect();
            write!(f, ",dns={}", dns.join("+"))?;
        }
        Ok(())
    }
}

impl FromStr for GuestNet {
    type Err = BootParamError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason| invalid(param::NET, s, reason);
        let mut parts = s.split(',');
        let (addr, prefix) = parts
            .next()
            .and_then(|p| p.split_once('/'))
            .ok_or_else(|| bad("it must start with ADDR/PREFIX"))?;
        let addr = addr.parse().map_err(|_| bad("the address is not IPv4"))?;
        let prefix = prefix
            .parse()
            .map_err(|_| bad("the prefix is not a number"))?;
        let (mut gateway, mut mtu, mut dns) = (None, None, Vec::new());
        for part in parts {
            match part.split_once('=') {
                Some(("gw", v)) if gateway.is_none() => {
                    gateway = Some(v.parse().map_err(|_| bad("gw is not IPv4"))?);
                }
                Some(("mtu", v)) if mtu.is_none() => {
                    mtu = Some(v.parse().map_err(|_| bad("mtu is not a number"))?);
                }
                Some(("dns", v)) if dns.is_empty() => {
                    dns = v
                        .split('+')
                        .map(str::parse)
                        .collect::<Result<_, _>>()
                        .map_err(|_| bad("a dns server is not IPv4"))?;
                }
                _ => return Err(bad("unknown or repeated field (gw=, mtu=, dns= once each)")),
            }
        }
        let net = Self {
            addr,
            prefix,
            gateway: gateway.ok_or_else(|| bad("gw= is missing"))?,
            mtu,
            dns,
        };
        net.check().map_err(bad)?;
        Ok(net)
    }
}

/// A `nova.*` parameter that cannot be formatted or parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BootParamError {
    /// The value cannot be written as one kernel command-line word, or is
    /// not a valid value of the parameter.
    #[error("{param}={value:?} is invalid: {reason}")]
    InvalidValue {
        /// The parameter.
        param: String,
        /// The value.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A parameter that takes one value appears twice.
    #[error("{param} is given twice ({first:?}, then {second:?})")]
    Duplicate {
        /// The parameter.
        param: &'static str,
        /// The first value.
        first: String,
        /// The second value.
        second: String,
    },
    /// A `nova.*` word this build does not know (host and guest built from
    /// different sources?).
    #[error("unknown boot parameter {word:?} (host and guest agent from different builds?)")]
    Unknown {
        /// The word.
        word: String,
    },
    /// A `nova.listen` value is not a listen address.
    #[error("invalid {}", param::LISTEN)]
    Listen(#[from] ListenAddrError),
}

impl NovaParams {
    /// The kernel command-line words for these parameters (the formatter).
    ///
    /// Fails when a value cannot be one word (whitespace, quotes, control
    /// characters) or is not a valid value (a hostname with a `/`, an
    /// environment variable name with `=`).
    pub fn to_words(&self) -> Result<Vec<String>, BootParamError> {
        let mut words = Vec::new();
        if let Some(hostname) = &self.hostname {
            check_hostname(hostname)?;
            words.push(format!("{}={hostname}", param::HOSTNAME));
        }
        if let Some(device) = &self.overlay {
            check_device(device)?;
            words.push(format!("{}={device}", param::OVERLAY));
        }
        for (key, value) in &self.env {
            check_env(key, value)?;
            words.push(format!("{}{key}={value}", param::ENV_PREFIX));
        }
        for addr in &self.listen {
            let value = addr.to_string();
            check_word(param::LISTEN, &value)?;
            words.push(format!("{}={value}", param::LISTEN));
        }
        if let Some(net) = &self.net {
            let value = net.to_string();
            net.check()
                .map_err(|reason| invalid(param::NET, &value, reason))?;
            words.push(format!("{}={value}", param::NET));
        }
        Ok(words)
    }

    /// Reads the `nova.*` words of a kernel command line (the parser).
    /// Every other word is ignored; a `nova.*` word that is unknown,
    /// malformed or repeated (other than `nova.env.*` and `nova.listen`) is
    /// an error.
    pub fn parse(cmdline: &str) -> Result<Self, BootParamError> {
        let mut out = Self::default();
        for word in cmdline.split_ascii_whitespace() {
            if !word.starts_with("nova.") {
                continue;
            }
            let Some((key, value)) = word.split_once('=') else {
                return Err(BootParamError::Unknown {
                    word: word.to_owned(),
                });
            };
            match key {
                param::HOSTNAME => {
                    check_hostname(value)?;
                    set_once(&mut out.hostname, param::HOSTNAME, value)?;
                }
                param::OVERLAY => {
                    check_device(value)?;
                    set_once(&mut out.overlay, param::OVERLAY, value)?;
                }
                param::LISTEN => out.listen.push(value.parse()?),
                param::NET => {
                    let net: GuestNet = value.parse()?;
                    if let Some(first) = &out.net {
                        return Err(BootParamError::Duplicate {
                            param: param::NET,
                            first: first.to_string(),
                            second: value.to_owned(),
                        });
                    }
                    out.net = Some(net);
                }
                _ => match key.strip_prefix(param::ENV_PREFIX) {
                    Some(name) => {
                        check_env(name, value)?;
                        out.env.retain(|(k, _)| k != name);
                        out.env.push((name.to_owned(), value.to_owned()));
                    }
                    None => {
                        return Err(BootParamError::Unknown {
                            word: word.to_owned(),
                        });
                    }
                },
            }
        }
        Ok(out)
    }

    /// The hostname the agent sets.
    pub fn hostname_or_default(&self) -> &str {
        self.hostname.as_deref().unwrap_or(DEFAULT_HOSTNAME)
    }

    /// Where the agent listens as PID 1: `nova.listen` if given, else both
    /// [`AGENT_VSOCK_PORT`] and [`AGENT_SERIAL_PORT`] (whichever exists in
    /// the guest).
    pub fn listen_or_default(&self) -> Vec<ListenAddr> {
        if self.listen.is_empty() {
            vec![
                ListenAddr::Vsock(AGENT_VSOCK_PORT),
                ListenAddr::Serial(AGENT_SERIAL_PORT.to_owned()),
            ]
        } else {
            self.listen.clone()
        }
    }
}

fn set_once(
    slot: &mut Option<String>,
    param: &'static str,
    value: &str,
) -> Result<(), BootParamError> {
    match slot {
        Some(first) => Err(BootParamError::Duplicate {
            param,
            first: first.clone(),
            second: value.to_owned(),
        }),
        None => {
            *slot = Some(value.to_owned());
            Ok(())
        }
    }
}

fn invalid(param: &str, value: &str, reason: &'static str) -> BootParamError {
    BootParamError::InvalidValue {
        param: param.to_owned(),
        value: value.to_owned(),
        reason,
    }
}

/// A value must be one non-empty word the kernel passes through unchanged.
fn check_word(param: &str, value: &str) -> Result<(), BootParamError> {
    if value.is_empty() {
        return Err(invalid(param, value, "it is empty"));
    }
    if value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(invalid(
            param,
            value,
            "it contains whitespace or a control character",
        ));
    }
    if value.contains('"') {
        return Err(invalid(param, value, "it contains a quote"));
    }
    Ok(())
}

fn check_hostname(value: &str) -> Result<(), BootParamError> {
    check_word(param::HOSTNAME, value)?;
    if value.len() > 64 {
        return Err(invalid(param::HOSTNAME, value, "it is over 64 bytes"));
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
    {
        return Err(invalid(
            param::HOSTNAME,
            value,
            "only letters, digits, '-', '_' and '.' are allowed",
        ));
    }
    Ok(())
}

fn check_device(value: &str) -> Result<(), BootParamError> {
    check_word(param::OVERLAY, value)?;
    if !value.starts_with("/dev/") {
        return Err(invalid(param::OVERLAY, value, "it must be under /dev/"));
    }
    Ok(())
}

fn check_env(key: &str, value: &str) -> Result<(), BootParamError> {
    let name = format!("{}{key}", param::ENV_PREFIX);
    let mut chars = key.chars();
    let valid_name = matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid_name {
        return Err(invalid(
            &name,
            value,
            "the variable name must be letters, digits and '_', not starting with a digit",
        ));
    }
    // An empty value is a valid environment variable.
    if value.is_empty() {
        return Ok(());
    }
    check_word(&name, value)
}

/// How a backend wires the guest's console.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestConsole {
    /// The guest has a serial port ([`SERIAL_CONSOLE`]) whose output the
    /// backend keeps (the sandbox's `console.log`): `console=ttyS0` is on the
    /// command line, and a user `console=` naming another device, or
    /// `8250.nr_uarts=`, would take it away.
    Serial,
    /// Like [`GuestConsole::Serial`] on the PL011 UART of an arm64 guest
    /// (QEMU `virt`): `console=ttyAMA0` ([`PL011_CONSOLE`]) is on the
    /// command line, and a user `console=` naming another device would take
    /// it away.
    Pl011,
    /// The backend does not keep a console (it costs boot time): the UART is
    /// switched off with `8250.nr_uarts=0`, unless the user's `kernel_args`
    /// ask for a `console=` themselves.
    Off,
}

impl GuestConsole {
    /// The console device the backend keeps (`ttyS0`, `ttyAMA0`), if any.
    pub fn device(self) -> Option<&'static str> {
        match self {
            GuestConsole::Serial => Some(SERIAL_CONSOLE),
            GuestConsole::Pl011 => Some(PL011_CONSOLE),
            GuestConsole::Off => None,
        }
    }
}

/// A user's `kernel_args` would break the boot contract, or the command line
/// cannot be assembled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KernelArgsError {
    /// The word sets something NovaSandbox owns.
    #[error("kernel_args: {word:?} is set by NovaSandbox itself ({owner}); remove it")]
    Reserved {
        /// The word.
        word: String,
        /// What NovaSandbox uses it for.
        owner: &'static str,
    },
    /// A `reboot=` other than `reboot=k`: a guest reboot (through the
    /// keyboard controller) is how the guest ends its VM.
    #[error(
        "kernel_args: {word:?} changes how the guest ends its VM; NovaSandbox needs reboot=k \
         (leave reboot= out and it is added)"
    )]
    Reboot {
        /// The word.
        word: String,
    },
    /// The word takes the console away from the backend's log.
    #[error(
        "kernel_args: {word:?} conflicts with the console this backend logs (console={console}); \
         remove it"
    )]
    ConsoleConflict {
        /// The word.
        word: String,
        /// The console the backend logs.
        console: &'static str,
    },
    /// A bare `--`: the kernel would hand every word after it (NovaSandbox's
    /// own) to the agent as arguments.
    #[error("kernel_args: \"--\" would hand NovaSandbox's own parameters to init; remove it")]
    InitSeparator,
    /// A quote: the kernel would read NovaSandbox's words as part of a
    /// quoted value.
    #[error("kernel_args: {word:?} contains a quote; quoted values are not supported")]
    Quote {
        /// The word.
        word: String,
    },
    /// A control character (a newline, a tab, ...).
    #[error("kernel_args contains the control character {0:?}")]
    ControlCharacter(char),
    /// The assembled command line is too long for the kernel.
    #[error(
        "the kernel command line would be {len} bytes, over the limit of {max}; shorten kernel_args"
    )]
    TooLong {
        /// Its length.
        len: usize,
        /// [`MAX_CMDLINE_LEN`].
        max: usize,
    },
    /// NovaSandbox's own `nova.*` parameters are invalid (a bug in the
    /// caller, not in the user's `kernel_args`).
    #[error("the nova.* boot parameters are invalid")]
    Params(#[from] BootParamError),
}

/// Checks a user's `kernel_args` against the boot contract, for a backend
/// whose console is `console`. [`KernelCmdline::assemble`] does this itself;
/// call it directly to refuse a config before anything is started.
pub fn check_user_args(user_args: &str, console: GuestConsole) -> Result<(), KernelArgsError> {
    if let Some(c) = user_args.chars().find(|c| c.is_control()) {
        return Err(KernelArgsError::ControlCharacter(c));
    }
    for word in user_args.split_ascii_whitespace() {
        check_user_word(word, console)?;
    }
    Ok(())
}

/// Words (or `key=` prefixes) NovaSandbox owns, and what for.
const RESERVED: &[(&str, &str)] = &[
    ("root=", "the root device"),
    ("rootfstype=", "the root device"),
    ("rootflags=", "the root device"),
    ("ro", "the read-only root"),
    ("rw", "the read-only root"),
    ("init=", "the agent is PID 1"),
    ("rdinit=", "the agent is PID 1"),
    ("nova.", "the agent's parameters"),
];

fn check_user_word(word: &str, console: GuestConsole) -> Result<(), KernelArgsError> {
    if word == "--" {
        return Err(KernelArgsError::InitSeparator);
    }
    if word.contains('"') {
        return Err(KernelArgsError::Quote {
            word: word.to_owned(),
        });
    }
    for (owned, owner) in RESERVED {
        let hit = if owned.ends_with('=') || owned.ends_with('.') {
            word.starts_with(owned)
        } else {
            word == *owned
        };
        if hit {
            return Err(KernelArgsError::Reserved {
                word: word.to_owned(),
                owner,
            });
        }
    }
    if let Some(value) = word.strip_prefix("reboot=")
        && value != "k"
    {
        return Err(KernelArgsError::Reboot {
            word: word.to_owned(),
        });
    }
    if let Some(device) = console.device() {
        let conflict = match word.strip_prefix("console=") {
            Some(value) => console_device(value) != device,
            None => console == GuestConsole::Serial && word.starts_with("8250.nr_uarts="),
        };
        if conflict {
            return Err(KernelArgsError::ConsoleConflict {
                word: word.to_owned(),
                console: device,
            });
        }
    }
    Ok(())
}

/// The device of a `console=` value (`ttyS0,115200n8` -> `ttyS0`).
fn console_device(value: &str) -> &str {
    value.split(',').next().unwrap_or(value)
}

/// The whole guest kernel command line of one VM, as a backend describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelCmdline {
    /// How the backend wires the console.
    pub console: GuestConsole,
    /// The `nova.*` parameters.
    pub params: NovaParams,
    /// The backend's own tuning words, last (e.g. QEMU's `tsc_early_khz=`).
    pub extra: Vec<String>,
}

impl KernelCmdline {
    /// A command line for a backend with `console`, no parameters and no
    /// extra words.
    pub fn new(console: GuestConsole) -> Self {
        Self {
            console,
            params: NovaParams::default(),
            extra: Vec::new(),
        }
    }

    /// Assembles the command line around the user's `kernel_args`.
    ///
    /// The user's words are checked with [`check_user_args`] and kept in
    /// order; `console=ttyS0` (for [`GuestConsole::Serial`], `ttyAMA0` for
    /// [`GuestConsole::Pl011`], unless the user named it already), `reboot=k` (unless given) and
    /// `8250.nr_uarts=0` (for [`GuestConsole::Off`], unless the user asked
    /// for a console or set it) are added, then the root device, init and
    /// the `nova.*` words, then [`KernelCmdline::extra`].
    pub fn assemble(&self, user_args: &str) -> Result<String, KernelArgsError> {
        check_user_args(user_args, self.console)?;
        let user: Vec<&str> = user_args.split_ascii_whitespace().collect();
        let has = |prefix: &str| user.iter().any(|w| w.starts_with(prefix));
        let mut words: Vec<String> = Vec::with_capacity(user.len() + 12);
        if let Some(device) = self.console.device() {
            let user_named_it = user.iter().any(|w| {
                w.strip_prefix("console=")
                    .is_some_and(|v| console_device(v) == device)
            });
            if !user_named_it {
                words.push(format!("console={device}"));
            }
        }
        words.extend(user.iter().map(|w| (*w).to_owned()));
        if !has("reboot=") {
            words.push("reboot=k".to_owned());
        }
        if self.console == GuestConsole::Off && !has("console=") && !has("8250.nr_uarts=") {
            words.push("8250.nr_uarts=0".to_owned());
        }
        words.extend([
            format!("root={ROOT_DEVICE}"),
            format!("rootfstype={ROOT_FS_TYPE}"),
            "ro".to_owned(),
            format!("init={AGENT_PATH}"),
        ]);
        words.extend(self.params.to_words()?);
        words.extend(self.extra.iter().cloned());
        let cmdline = words.join(" ");
        if cmdline.len() > MAX_CMDLINE_LEN {
            return Err(KernelArgsError::TooLong {
                len: cmdline.len(),
                max: MAX_CMDLINE_LEN,
            });
        }
        Ok(cmdline)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn params() -> NovaParams {
        NovaParams {
            hostname: Some("sb-1".into()),
            overlay: Some(SCRATCH_DEVICE.into()),
            env: vec![
                ("LANG".into(), "C.UTF-8".into()),
                ("EMPTY".into(), "".into()),
            ],
            listen: vec![
                ListenAddr::Vsock(AGENT_VSOCK_PORT),
                ListenAddr::Serial(AGENT_SERIAL_PORT.into()),
            ],
            net: Some(GuestNet {
                addr: Ipv4Addr::new(169, 254, 0, 21),
                prefix: 30,
                gateway: Ipv4Addr::new(169, 254, 0, 22),
                mtu: Some(1500),
                dns: vec![Ipv4Addr::new(10, 0, 0, 2), Ipv4Addr::new(10, 0, 0, 3)],
            }),
        }
    }

    #[test]
    fn params_round_trip_through_a_command_line() {
        let words = params().to_words().unwrap();
        assert_eq!(
            words,
            [
                "nova.hostname=sb-1",
                "nova.overlay=/dev/vdb",
                "nova.env.LANG=C.UTF-8",
                "nova.env.EMPTY=",
                "nova.listen=vsock:1024",
                "nova.listen=serial:org.nova.agent",
                "nova.net=169.254.0.21/30,gw=169.254.0.22,mtu=1500,dns=10.0.0.2+10.0.0.3",
            ]
        );
        let line = format!("console=ttyS0 quiet {} panic=1", words.join(" "));
        assert_eq!(NovaParams::parse(&line).unwrap(), params());
        assert_eq!(NovaParams::parse("").unwrap(), NovaParams::default());
    }

    #[test]
    fn guest_net_round_trips_without_optional_fields() {
        let net: GuestNet = "10.1.2.5/24,gw=10.1.2.1".parse().unwrap();
        assert_eq!(net.mtu, None);
        assert!(net.dns.is_empty());
        assert_eq!(net.netmask(), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(net.to_string(), "10.1.2.5/24,gw=10.1.2.1");
        assert_eq!(
            net.resolv_conf()
                .lines()
                .filter(|l| l.starts_with("nameserver"))
                .count(),
            0
        );
    }

    #[test]
    fn defaults_apply_when_parameters_are_absent() {
        let p = NovaParams::parse("console=ttyS0 reboot=k").unwrap();
        assert_eq!(p.hostname_or_default(), DEFAULT_HOSTNAME);
        assert_eq!(
            p.listen_or_default(),
            [
                ListenAddr::Vsock(AGENT_VSOCK_PORT),
                ListenAddr::Serial(AGENT_SERIAL_PORT.into())
            ]
        );
        assert_eq!(params().listen_or_default(), params().listen);
    }

    #[test]
    fn env_values_may_contain_equals_and_later_values_win() {
        let p = NovaParams::parse("nova.env.A=x=y nova.env.B=1 nova.env.A=z").unwrap();
        assert_eq!(
            p.env,
            [("B".into(), "1".into()), ("A".into(), "z".into())] as [(String, String); 2]
        );
    }

    #[test]
    fn malformed_unknown_and_repeated_parameters_are_typed_errors() {
        for (line, want) in [
            ("nova.hostname", "Unknown"),
            ("nova.bogus=1", "Unknown"),
            ("nova.hostname=", "InvalidValue"),
            ("nova.hostname=a/b", "InvalidValue"),
            ("nova.overlay=vdb", "InvalidValue"),
            ("nova.env.=x", "InvalidValue"),
            ("nova.env.1A=x", "InvalidValue"),
            ("nova.listen=tcp:1", "Listen"),
            ("nova.hostname=a nova.hostname=b", "Duplicate"),
            ("nova.net=10.0.0.1", "InvalidValue"),
            ("nova.net=10.0.0.1/30", "InvalidValue"),
            ("nova.net=10.0.0.1/30,gw=10.0.1.2", "InvalidValue"),
            ("nova.net=10.0.0.1/31,gw=10.0.0.0", "InvalidValue"),
            ("nova.net=10.0.0.1/30,gw=10.0.0.2,mtu=x", "InvalidValue"),
            (
                "nova.net=10.0.0.1/30,gw=10.0.0.2,gw=10.0.0.2",
                "InvalidValue",
            ),
            (
                "nova.net=10.0.0.1/30,gw=10.0.0.2,dns=1.1.1.1+2.2.2.2+3.3.3.3+4.4.4.4",
                "InvalidValue",
            ),
            (
                "nova.net=10.0.0.1/30,gw=10.0.0.2 nova.net=10.0.0.1/30,gw=10.0.0.2",
                "Duplicate",
            ),
        ] {
            let err = NovaParams::parse(line).unwrap_err();
            let got = match err {
                BootParamError::Unknown { .. } => "Unknown",
                BootParamError::InvalidValue { .. } => "InvalidValue",
                BootParamError::Listen(_) => "Listen",
                BootParamError::Duplicate { .. } => "Duplicate",
            };
            assert_eq!(got, want, "{line}: {err}");
        }
    }

    #[test]
    fn values_that_are_not_one_word_are_refused_by_the_formatter() {
        for bad in [
            NovaParams {
                hostname: Some("a b".into()),
                ..NovaParams::default()
            },
            NovaParams {
                env: vec![("A".into(), "x y".into())],
                ..NovaParams::default()
            },
            NovaParams {
                env: vec![("A".into(), "\"q".into())],
                ..NovaParams::default()
            },
            NovaParams {
                listen: vec![ListenAddr::Unix("/tmp/a b".into())],
                ..NovaParams::default()
            },
        ] {
            assert!(
                matches!(bad.to_words(), Err(BootParamError::InvalidValue { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn listen_addresses_parse_and_print() {
        assert_eq!(
            "unix:/tmp/a.sock".parse(),
            Ok(ListenAddr::Unix("/tmp/a.sock".into()))
        );
        assert_eq!("vsock:1024".parse(), Ok(ListenAddr::Vsock(1024)));
        assert_eq!(
            "serial:org.nova.agent".parse(),
            Ok(ListenAddr::Serial("org.nova.agent".into()))
        );
        for bad in ["", "unix:", "vsock:x", "tcp:1", "serial:", "nothing"] {
            assert!(bad.parse::<ListenAddr>().is_err(), "{bad}");
        }
        assert_eq!(ListenAddr::Vsock(5).to_string(), "vsock:5");
    }

    fn serial() -> KernelCmdline {
        KernelCmdline {
            console: GuestConsole::Serial,
            params: NovaParams {
                hostname: Some("sb-1".into()),
                overlay: Some(SCRATCH_DEVICE.into()),
                ..NovaParams::default()
            },
            extra: vec!["tsc_early_khz=2000000".into()],
        }
    }

    #[test]
    fn assembly_orders_console_user_contract_params_extras() {
        assert_eq!(
            serial().assemble("reboot=k panic=1  quiet").unwrap(),
            "console=ttyS0 reboot=k panic=1 quiet root=/dev/vda rootfstype=ext4 ro \
             init=/sbin/nova-agent nova.hostname=sb-1 nova.overlay=/dev/vdb tsc_early_khz=2000000"
        );
        // A missing reboot=k is added; the user's own ttyS0 console is kept as given.
        assert_eq!(
            serial().assemble("console=ttyS0,115200 quiet").unwrap(),
            "console=ttyS0,115200 quiet reboot=k root=/dev/vda rootfstype=ext4 ro \
             init=/sbin/nova-agent nova.hostname=sb-1 nova.overlay=/dev/vdb tsc_early_khz=2000000"
        );
    }

    #[test]
    fn an_arm64_guest_logs_on_its_pl011_uart() {
        let pl011 = KernelCmdline {
            console: GuestConsole::Pl011,
            extra: Vec::new(),
            ..serial()
        };
        assert_eq!(
            pl011.assemble("panic=1").unwrap(),
            "console=ttyAMA0 panic=1 reboot=k root=/dev/vda rootfstype=ext4 ro \
             init=/sbin/nova-agent nova.hostname=sb-1 nova.overlay=/dev/vdb"
        );
        assert_eq!(
            pl011.assemble("console=ttyAMA0,115200").unwrap(),
            "console=ttyAMA0,115200 reboot=k root=/dev/vda rootfstype=ext4 ro \
             init=/sbin/nova-agent nova.hostname=sb-1 nova.overlay=/dev/vdb"
        );
        let err = pl011.assemble("console=ttyS0").unwrap_err();
        assert_eq!(
            err,
            KernelArgsError::ConsoleConflict {
                word: "console=ttyS0".into(),
                console: PL011_CONSOLE,
            }
        );
        // The 8250 UART is not the console there; its switch is the user's.
        assert!(pl011.assemble("8250.nr_uarts=0").is_ok());
    }

    #[test]
    fn without_a_console_the_uart_is_off_unless_the_user_wants_one() {
        let off = KernelCmdline::new(GuestConsole::Off);
        assert_eq!(
            off.assemble("").unwrap(),
            "reboot=k 8250.nr_uarts=0 root=/dev/vda rootfstype=ext4 ro init=/sbin/nova-agent"
        );
        assert_eq!(
            off.assemble("console=ttyS0 reboot=k").unwrap(),
            "console=ttyS0 reboot=k root=/dev/vda rootfstype=ext4 ro init=/sbin/nova-agent"
        );
        // Any console is the user's choice when the backend keeps none.
        assert!(off.assemble("console=hvc0").is_ok());
    }

    #[test]
    fn user_args_that_break_the_contract_are_refused() {
        let cases: &[(&str, GuestConsole, &str)] = &[
            ("init=/bin/sh", GuestConsole::Off, "Reserved"),
            ("quiet rdinit=/x", GuestConsole::Off, "Reserved"),
            ("root=/dev/sda", GuestConsole::Off, "Reserved"),
            ("rw", GuestConsole::Off, "Reserved"),
            ("nova.overlay=/dev/vdc", GuestConsole::Off, "Reserved"),
            ("reboot=t", GuestConsole::Off, "Reboot"),
            ("reboot=", GuestConsole::Serial, "Reboot"),
            ("console=hvc0", GuestConsole::Serial, "ConsoleConflict"),
            ("console=ttyS1", GuestConsole::Serial, "ConsoleConflict"),
            ("8250.nr_uarts=0", GuestConsole::Serial, "ConsoleConflict"),
            ("quiet -- x", GuestConsole::Off, "InitSeparator"),
            ("foo=\"a", GuestConsole::Off, "Quote"),
            ("a\nb", GuestConsole::Off, "ControlCharacter"),
        ];
        for (args, console, want) in cases {
            let err = KernelCmdline::new(*console).assemble(args).unwrap_err();
            let got = match &err {
                KernelArgsError::Reserved { .. } => "Reserved",
                KernelArgsError::Reboot { .. } => "Reboot",
                KernelArgsError::ConsoleConflict { .. } => "ConsoleConflict",
                KernelArgsError::InitSeparator => "InitSeparator",
                KernelArgsError::Quote { .. } => "Quote",
                KernelArgsError::ControlCharacter(_) => "ControlCharacter",
                other => panic!("{args:?}: unexpected {other:?}"),
            };
            assert_eq!(got, *want, "{args:?}: {err}");
        }
        // Words that merely start like a reserved one are the user's.
        assert!(
            serial()
                .assemble("rootwait roaming=1 initcall_debug")
                .is_ok()
        );
    }

    #[test]
    fn the_assembled_line_is_bounded_and_own_params_are_checked() {
        let long = "x".repeat(MAX_CMDLINE_LEN);
        assert!(matches!(
            serial().assemble(&long),
            Err(KernelArgsError::TooLong { .. })
        ));
        let mut bad = serial();
        bad.params.hostname = Some("two words".into());
        assert!(matches!(
            bad.assemble(""),
            Err(KernelArgsError::Params(BootParamError::InvalidValue { .. }))
        ));
    }
}
