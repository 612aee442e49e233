//! What a caller asks for when creating a sandbox.
//!
//! [`SandboxConfig`] carries every field of the seed API with its default. It
//! deserializes with defaults for missing fields and refuses unknown ones, so a
//! typo in a JSON request is an error rather than a silently ignored option.
//! [`SandboxConfig::validate`] checks every value against the range the
//! backends can honour and answers with a [`ConfigError`] that names the field,
//! the value and what is allowed. The builder validates on
//! [`SandboxConfigBuilder::build`], so a built config is always a valid one.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::network::{EgressConfig, MAX_NETWORK_LIST_LEN, PortProtocol, PortSpec};

/// The template a sandbox boots when the caller names none: a Debian-based
/// image with python3, curl and wget.
pub const DEFAULT_TEMPLATE: &str = "python";
/// Default guest memory in MiB.
pub const DEFAULT_MEMORY_MB: u32 = 512;
/// Default number of vCPUs.
pub const DEFAULT_VCPUS: u8 = 2;
/// Default time allowed from VMM spawn to the agent's `ready`, in milliseconds.
pub const DEFAULT_BOOT_TIMEOUT_MS: u64 = 5_000;
/// Default guest port a host port forwards to.
pub const DEFAULT_GUEST_PORT: u16 = 8080;

/// Smallest guest memory our kernel and agent boot in, in MiB.
pub const MIN_MEMORY_MB: u32 = 128;
/// Largest guest memory accepted, in MiB (256 GiB); more is almost certainly a
/// unit mistake (bytes or KiB given as MiB).
pub const MAX_MEMORY_MB: u32 = 256 * 1024;
/// Largest vCPU count accepted; Firecracker's own limit.
pub const MAX_VCPUS: u8 = 32;
/// Shortest boot timeout accepted, in milliseconds.
pub const MIN_BOOT_TIMEOUT_MS: u64 = 100;
/// Longest boot timeout accepted, in milliseconds (10 minutes).
pub const MAX_BOOT_TIMEOUT_MS: u64 = 600_000;
/// Most extra drives a sandbox may have (virtio-mmio slots are limited).
pub const MAX_EXTRA_DRIVES: usize = 16;

/// The guest kernel command line used when the caller gives none, tuned for
/// boot speed. Providers append what they own (root device, console, agent
/// channel, virtio-mmio device list); this is the part a user may replace.
///
/// Option by option:
/// - `reboot=k`: reboot through the keyboard controller, which Firecracker
///   and QEMU's microvm turn into a VM exit, so a guest reboot ends its VMM;
/// - `panic=1`: reboot one second after a kernel panic, so a crashed guest
///   ends its VMM instead of hanging with it;
/// - `pci=off`: skip PCI bus probing; every device is virtio-mmio;
/// - `i8042.noaux i8042.nomux i8042.dumbkbd i8042.nopnp`: skip the PS/2
///   controller probes, which cost tens of milliseconds on a microVM;
/// - `random.trust_cpu=on`: seed the kernel's RNG from the CPU's, so programs
///   calling `getrandom` early do not block;
/// - `tsc=reliable`: trust the TSC instead of running clocksource checks;
/// - `quiet`: print only warnings and worse; the serial console is slow,
///   especially under emulation, and a panic is still printed.
pub const DEFAULT_KERNEL_ARGS: &str = "reboot=k panic=1 pci=off i8042.noaux i8042.nomux \
     i8042.dumbkbd i8042.nopnp random.trust_cpu=on tsc=reliable quiet";

/// One extra block device attached to the sandbox, after its root and scratch
/// disks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveConfig {
    /// Host path of the raw disk image. Must exist.
    pub path: PathBuf,
    /// Attach read-only: the guest cannot write to it.
    #[serde(default)]
    pub read_only: bool,
}

impl DriveConfig {
    /// A read-write drive backed by `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            read_only: false,
        }
    }

    /// A read-only drive backed by `path`.
    pub fn read_only(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            read_only: true,
        }
    }
}

/// What a caller asks for when creating a sandbox.
///
/// Missing fields take their defaults (see the `DEFAULT_*` constants); build
/// one with [`SandboxConfig::builder`] or deserialize it from JSON, then call
/// [`validate`](Self::validate) (the builder does it for you).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SandboxConfig {
    /// Template to boot (a directory under `$NOVA_HOME/templates`).
    pub template_id: String,
    /// Guest memory in MiB.
    pub memory_mb: u32,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Time allowed from VMM spawn to the agent's `ready`, in milliseconds.
    pub boot_timeout_ms: u64,
    /// Guest kernel command line (the user-tunable part; see
    /// [`DEFAULT_KERNEL_ARGS`]).
    pub kernel_args: String,
    /// Give the sandbox a network interface.
    pub enable_network: bool,
    /// Host port forwarded to [`guest_port`](Self::guest_port), if any.
    pub host_port: Option<u16>,
    /// Guest port that [`host_port`](Self::host_port) forwards to.
    pub guest_port: u16,
    /// More published ports; with `host_port` they make
    /// [`published_ports`](Self::published_ports).
    pub ports: Vec<PortSpec>,
    /// What the guest may reach; `None`: everything but other sandboxes,
    /// the host and the metadata address. Changeable while the sandbox runs
    /// ([`Hypervisor::update_network`](crate::Hypervisor::update_network)).
    pub egress: Option<EgressConfig>,
    /// Root filesystem image to boot instead of the template's.
    pub rootfs_path: Option<PathBuf>,
    /// Extra block devices, attached in order after the root and scratch disks.
    pub extra_drives: Vec<DriveConfig>,
    /// Free-form labels for finding sandboxes (`key` → `value`), with the
    /// syntax of Kubernetes labels.
    pub labels: BTreeMap<String, String>,
    /// Boot with the template rootfs read-only and no writable overlay: every
    /// write outside tmpfs mounts fails.
    pub read_only_rootfs: bool,
    /// Environment variables set for every command run in the sandbox.
    pub env: BTreeMap<String, String>,
    /// Restore the template's snapshot or boot the kernel (see
    /// [`StartMode`]).
    pub start: StartMode,
}

/// How a sandbox starts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StartMode {
    /// Restore the template's snapshot when there is one that fits the
    /// config (same VMM and template build, memory, vCPUs, disks, kernel
    /// arguments), else boot the kernel.
    #[default]
    Auto,
    /// Restore the template's snapshot, or fail saying why it cannot.
    Snapshot,
    /// Always boot the kernel.
    Cold,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        Self {
            template_id: DEFAULT_TEMPLATE.to_owned(),
            memory_mb: DEFAULT_MEMORY_MB,
            vcpus: DEFAULT_VCPUS,
            boot_timeout_ms: DEFAULT_BOOT_TIMEOUT_MS,
            kernel_args: DEFAULT_KERNEL_ARGS.to_owned(),
            enable_network: true,
            host_port: None,
            guest_port: DEFAULT_GUEST_PORT,
            ports: Vec::new(),
            egress: None,
            rootfs_path: None,
            extra_drives: Vec::new(),
            labels: BTreeMap::new(),
            read_only_rootfs: false,
            env: BTreeMap::new(),
            start: StartMode::Auto,
        }
    }
}

/// A field of [`SandboxConfig`] holds a value no backend can honour.
///
/// Every variant names the field, the value and what is allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// `template_id` is not a valid template id.
    #[error(
        "template_id {value:?} is invalid: use 1 to 64 characters of a-z, 0-9, '.', '_' or '-', \
         starting with a letter or digit"
    )]
    TemplateId {
        /// The rejected value.
        value: String,
    },
    /// `memory_mb` is out of range.
    #[error("memory_mb = {value} is out of range: use {min}..={max} MiB")]
    Memory {
        /// The rejected value.
        value: u32,
        /// Smallest accepted value.
        min: u32,
        /// Largest accepted value.
        max: u32,
    },
    /// `vcpus` is out of range.
    #[error("vcpus = {value} is out of range: use 1..={max}")]
    Vcpus {
        /// The rejected value.
        value: u8,
        /// Largest accepted value.
        max: u8,
    },
    /// `boot_timeout_ms` is out of range.
    #[error("boot_timeout_ms = {value} is out of range: use {min}..={max}")]
    BootTimeout {
        /// The rejected value.
        value: u64,
        /// Smallest accepted value.
        min: u64,
        /// Largest accepted value.
        max: u64,
    },
    /// `kernel_args` cannot be passed to a kernel.
    #[error("kernel_args is invalid: {reason}")]
    KernelArgs {
        /// What is wrong with it.
        reason: String,
    },
    /// A port is 0.
    #[error("{field} = 0 is invalid: use a port in 1..=65535")]
    Port {
        /// `host_port` or `guest_port`.
        field: &'static str,
    },
    /// `host_port` is set while `enable_network` is false.
    #[error("host_port = {port} needs enable_network = true")]
    PortWithoutNetwork {
        /// The requested host port.
        port: u16,
    },
    /// A published port in `ports` is 0.
    #[error("{field} = 0 is invalid: use a port in 1..=65535")]
    PortZero {
        /// The field, e.g. `ports[1].host_port`.
        field: String,
    },
    /// Two published ports claim the same host port.
    #[error("{field} = {port}/{protocol} is already published by {other}: use another host port")]
    DuplicatePort {
        /// The later port's field (`host_port` or `ports[N].host_port`).
        field: String,
        /// The earlier port's field.
        other: String,
        /// The host port.
        port: u16,
        /// Its protocol.
        protocol: PortProtocol,
    },
    /// A published port's `host_ip` cannot publish anything.
    #[error("{field} = {ip} is not a unicast address: use 0.0.0.0, 127.0.0.1 or one of the host's")]
    HostIp {
        /// The field, e.g. `ports[0].host_ip`.
        field: String,
        /// The rejected address.
        ip: std::net::Ipv4Addr,
    },
    /// An egress entry is neither an IPv4 CIDR nor a domain name.
    #[error("{field} = {value:?} is invalid: {reason}")]
    Egress {
        /// The field, e.g. `egress.allow[2]`.
        field: String,
        /// The rejected entry.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A network list is too long.
    #[error("{field} has {len} entries: at most {max} are supported")]
    TooMany {
        /// `ports`, `egress.allow` or `egress.deny`.
        field: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// `ports` or `egress` is set while `enable_network` is false.
    #[error("{field} needs enable_network = true")]
    NeedsNetwork {
        /// `ports` or `egress`.
        field: &'static str,
    },
    /// `rootfs_path` or a drive path does not exist or is not a file.
    #[error("{field} = {path:?} does not exist or is not a regular file")]
    MissingPath {
        /// `rootfs_path` or `extra_drives[N].path`.
        field: String,
        /// The rejected path.
        path: PathBuf,
    },
    /// Too many extra drives.
    #[error("extra_drives has {count} entries: at most {max} are supported")]
    TooManyDrives {
        /// Number of drives given.
        count: usize,
        /// Largest accepted number.
        max: usize,
    },
    /// A label key is not a valid label key.
    #[error(
        "label key {key:?} is invalid: use an optional DNS-subdomain prefix and '/', then 1 to 63 \
         characters of a-z, A-Z, 0-9, '-', '_' or '.', starting and ending with a letter or digit"
    )]
    LabelKey {
        /// The rejected key.
        key: String,
    },
    /// A label value is not a valid label value.
    #[error(
        "label {key:?} has invalid value {value:?}: use at most 63 characters of a-z, A-Z, 0-9, \
         '-', '_' or '.', starting and ending with a letter or digit (or an empty value)"
    )]
    LabelValue {
        /// The label's key.
        key: String,
        /// The rejected value.
        value: String,
    },
    /// An environment variable name is invalid.
    #[error(
        "env name {name:?} is invalid: use a non-empty name without '=' or NUL, of at most 256 \
         bytes"
    )]
    EnvName {
        /// The rejected name.
        name: String,
    },
    /// An environment variable value contains NUL.
    #[error("env {name:?} has a value containing NUL, which no process can receive")]
    EnvValue {
        /// The variable's name.
        name: String,
    },
}

impl SandboxConfig {
    /// A builder starting from the defaults.
    pub fn builder() -> SandboxConfigBuilder {
        SandboxConfigBuilder::default()
    }

    /// Checks every field; answers with the first bad one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !is_valid_template_id(&self.template_id) {
            return Err(ConfigError::TemplateId {
                value: self.template_id.clone(),
            });
        }
        if !(MIN_MEMORY_MB..=MAX_MEMORY_MB).contains(&self.memory_mb) {
            return Err(ConfigError::Memory {
                value: self.memory_mb,
                min: MIN_MEMORY_MB,
                max: MAX_MEMORY_MB,
            });
        }
        if !(1..=MAX_VCPUS).contains(&self.vcpus) {
            return Err(ConfigError::Vcpus {
                value: self.vcpus,
                max: MAX_VCPUS,
            });
        }
        if !(MIN_BOOT_TIMEOUT_MS..=MAX_BOOT_TIMEOUT_MS).contains(&self.boot_timeout_ms) {
            return Err(ConfigError::BootTimeout {
                value: self.boot_timeout_ms,
                min: MIN_BOOT_TIMEOUT_MS,
                max: MAX_BOOT_TIMEOUT_MS,
            });
        }
        validate_kernel_args(&self.kernel_args)?;
        if self.host_port == Some(0) {
            return Err(ConfigError::Port { field: "host_port" });
        }
        if self.guest_port == 0 {
            return Err(ConfigError::Port {
                field: "guest_port",
            });
        }
        if let (Some(port), false) = (self.host_port, self.enable_network) {
            return Err(ConfigError::PortWithoutNetwork { port });
        }
        self.validate_network()?;
        if let Some(path) = &self.rootfs_path {
            check_file("rootfs_path".to_owned(), path)?;
        }
        if self.extra_drives.len() > MAX_EXTRA_DRIVES {
            return Err(ConfigError::TooManyDrives {
                count: self.extra_drives.len(),
                max: MAX_EXTRA_DRIVES,
            });
        }
        for (i, drive) in self.extra_drives.iter().enumerate() {
            check_file(format!("extra_drives[{i}].path"), &drive.path)?;
        }
        for (key, value) in &self.labels {
            if !is_valid_label_key(key) {
                return Err(ConfigError::LabelKey { key: key.clone() });
            }
            if !value.is_empty() && !is_valid_label_name(value) {
                return Err(ConfigError::LabelValue {
                    key: key.clone(),
                    value: value.clone(),
                });
            }
        }
        for (name, value) in &self.env {
            if name.is_empty() || name.len() > 256 || name.contains(['=', '\0']) {
                return Err(ConfigError::EnvName { name: name.clone() });
            }
            if value.contains('\0') {
                return Err(ConfigError::EnvValue { name: name.clone() });
            }
        }
        Ok(())
    }
}

impl SandboxConfig {
    /// Every published port: the seed's `host_port` -> `guest_port` (TCP,
    /// every host address) first, if set, then `ports`. The one place the
    /// two are merged; [`published_port_field`](Self::published_port_field)
    /// names an entry's field.
    pub fn published_ports(&self) -> Vec<PortSpec> {
        self.host_port
            .map(|host| PortSpec::tcp(host, self.guest_port))
            .into_iter()
            .chain(self.ports.iter().copied())
            .collect()
    }

    /// The config field of entry `index` of
    /// [`published_ports`](Self::published_ports): `host_port` for the
    /// seed's pair, `ports[N]` otherwise.
    pub fn published_port_field(&self, index: usize) -> String {
        match (self.host_port, index) {
            (Some(_), 0) => "host_port".to_owned(),
            (Some(_), i) => format!("ports[{}]", i - 1),
            (None, i) => format!("ports[{i}]"),
        }
    }

    fn validate_network(&self) -> Result<(), ConfigError> {
        if self.ports.len() > MAX_NETWORK_LIST_LEN {
            return Err(ConfigError::TooMany {
                field: "ports",
                len: self.ports.len(),
                max: MAX_NETWORK_LIST_LEN,
            });
        }
        if !self.enable_network {
            if !self.ports.is_empty() {
                return Err(ConfigError::NeedsNetwork { field: "ports" });
            }
            if self.egress.is_some() {
                return Err(ConfigError::NeedsNetwork { field: "egress" });
            }
        }
        let all = self.published_ports();
        let port_field = |i: usize, what: &str| {
            let base = self.published_port_field(i);
            if base == "host_port" {
                // The seed's pair has its own field names.
                if what == "host_ip" {
                    base
                } else {
                    what.to_owned()
                }
            } else {
                format!("{base}.{what}")
            }
        };
        for (i, p) in all.iter().enumerate() {
            if p.host_port == 0 {
                return Err(ConfigError::PortZero {
                    field: port_field(i, "host_port"),
                });
            }
            if p.guest_port == 0 {
                return Err(ConfigError::PortZero {
                    field: port_field(i, "guest_port"),
                });
            }
            let ip = p.host_addr();
            if ip.is_multicast() || ip.is_broadcast() {
                return Err(ConfigError::HostIp {
                    field: port_field(i, "host_ip"),
                    ip,
                });
            }
            if let Some(j) = all[..i].iter().position(|q| q.collides_with(p)) {
                return Err(ConfigError::DuplicatePort {
                    field: port_field(i, "host_port"),
                    other: port_field(j, "host_port"),
                    port: p.host_port,
                    protocol: p.protocol,
                });
            }
        }
        if let Some(egress) = &self.egress {
            egress.validate()?;
        }
        Ok(())
    }
}

/// Whether `id` is a valid template id: 1 to 64 characters of `a-z`, `0-9`,
/// `.`, `_`, `-`, starting with a letter or digit. Such an id is safe as a
/// path component.
pub fn is_valid_template_id(id: &str) -> bool {
    let mut chars = id.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c.is_ascii_digit())
        && id.len() <= 64
        && chars
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'))
}

fn validate_kernel_args(args: &str) -> Result<(), ConfigError> {
    // x86's COMMAND_LINE_SIZE is 2048 including what providers append.
    const MAX_LEN: usize = 1024;
    if args.len() > MAX_LEN {
        return Err(ConfigError::KernelArgs {
            reason: format!("{} bytes is longer than the {MAX_LEN} allowed", args.len()),
        });
    }
    if let Some(c) = args.chars().find(|c| c.is_control() && *c != ' ') {
        return Err(ConfigError::KernelArgs {
            reason: format!("it contains the control character {c:?}"),
        });
    }
    for word in args.split_ascii_whitespace() {
        // These are set by the provider; a user value would break the boot.
        for owned in ["root=", "init=", "nova."] {
            if word.starts_with(owned) {
                return Err(ConfigError::KernelArgs {
                    reason: format!("{word:?} is set by NovaSandbox itself; remove it"),
                });
            }
        }
    }
    Ok(())
}

fn check_file(field: String, path: &std::path::Path) -> Result<(), ConfigError> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_file() => Ok(()),
        _ => Err(ConfigError::MissingPath {
            field,
            path: path.to_owned(),
        }),
    }
}

/// A label name: 1..=63 of `[A-Za-z0-9_.-]`, alphanumeric at both ends.
fn is_valid_label_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes[0].is_ascii_alphanumeric()
        && bytes[bytes.len() - 1].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// A label key: `[prefix/]name`, where prefix is a DNS subdomain.
fn is_valid_label_key(key: &str) -> bool {
    match key.split_once('/') {
        None => is_valid_label_name(key),
        Some((prefix, name)) => is_valid_dns_subdomain(prefix) && is_valid_label_name(name),
    }
}

fn is_valid_dns_subdomain(s: &str) -> bool {
    s.len() <= 253
        && s.split('.').all(|part| {
            let b = part.as_bytes();
            !b.is_empty()
                && b.len() <= 63
                && b[0].is_ascii_alphanumeric()
                && b[b.len() - 1].is_ascii_alphanumeric()
                && b.iter()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        })
}

/// Builds a [`SandboxConfig`] from the defaults; [`build`](Self::build)
/// validates it.
#[derive(Clone, Debug, Default)]
pub struct SandboxConfigBuilder {
    config: SandboxConfig,
}

impl SandboxConfigBuilder {
    /// Sets the template to boot.
    pub fn template_id(mut self, id: impl Into<String>) -> Self {
        self.config.template_id = id.into();
        self
    }

    /// Sets guest memory in MiB.
    pub fn memory_mb(mut self, mb: u32) -> Self {
        self.config.memory_mb = mb;
        self
    }

    /// Sets the number of vCPUs.
    pub fn vcpus(mut self, vcpus: u8) -> Self {
        self.config.vcpus = vcpus;
        self
    }

    /// Sets the boot timeout in milliseconds.
    pub fn boot_timeout_ms(mut self, ms: u64) -> Self {
        self.config.boot_timeout_ms = ms;
        self
    }

    /// Replaces the kernel command line's user part.
    pub fn kernel_args(mut self, args: impl Into<String>) -> Self {
        self.config.kernel_args = args.into();
        self
    }

    /// Turns networking on or off.
    pub fn enable_network(mut self, enable: bool) -> Self {
        self.config.enable_network = enable;
        self
    }

    /// Forwards `host_port` on the host to `guest_port` in the guest.
    pub fn port_forward(mut self, host_port: u16, guest_port: u16) -> Self {
        self.config.host_port = Some(host_port);
        self.config.guest_port = guest_port;
        self
    }

    /// Publishes one more port.
    pub fn port(mut self, port: PortSpec) -> Self {
        self.config.ports.push(port);
        self
    }

    /// Sets the egress policy.
    pub fn egress(mut self, egress: EgressConfig) -> Self {
        self.config.egress = Some(egress);
        self
    }

    /// Boots `path` as the root filesystem instead of the template's.
    pub fn rootfs_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.config.rootfs_path = Some(path.into());
        self
    }

    /// Adds an extra drive.
    pub fn extra_drive(mut self, drive: DriveConfig) -> Self {
        self.config.extra_drives.push(drive);
        self
    }

    /// Adds a label.
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.config.labels.insert(key.into(), value.into());
        self
    }

    /// Boots without a writable overlay.
    pub fn read_only_rootfs(mut self, read_only: bool) -> Self {
        self.config.read_only_rootfs = read_only;
        self
    }

    /// Sets how the sandbox starts (snapshot or cold boot).
    pub fn start(mut self, start: StartMode) -> Self {
        self.config.start = start;
        self
    }

    /// Sets an environment variable for every command.
    pub fn env(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.config.env.insert(name.into(), value.into());
        self
    }

    /// Validates and returns the config.
    pub fn build(self) -> Result<SandboxConfig, ConfigError> {
        self.config.validate()?;
        Ok(self.config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(config: SandboxConfig) -> ConfigError {
        config.validate().expect_err("config should be rejected")
    }

    #[test]
    fn defaults_match_the_seed_api_and_are_valid() {
        let c = SandboxConfig::default();
        assert_eq!(c.template_id, "python");
        assert_eq!(c.memory_mb, 512);
        assert_eq!(c.vcpus, 2);
        assert_eq!(c.boot_timeout_ms, 5000);
        assert!(c.enable_network);
        assert_eq!(c.host_port, None);
        assert_eq!(c.guest_port, 8080);
        assert!(!c.read_only_rootfs);
        c.validate().unwrap();
    }

    #[test]
    fn builder_sets_fields_and_validates() {
        let c = SandboxConfig::builder()
            .template_id("minimal")
            .memory_mb(256)
            .vcpus(1)
            .port_forward(18080, 80)
            .label("team", "ml")
            .env("FOO", "bar")
            .read_only_rootfs(true)
            .build()
            .unwrap();
        assert_eq!(c.template_id, "minimal");
        assert_eq!(c.memory_mb, 256);
        assert_eq!(c.host_port, Some(18080));
        assert_eq!(c.guest_port, 80);
        assert_eq!(c.labels["team"], "ml");
        assert!(c.read_only_rootfs);
        assert!(SandboxConfig::builder().vcpus(0).build().is_err());
    }

    #[test]
    fn serde_fills_defaults_and_refuses_unknown_fields() {
        let c: SandboxConfig = serde_json::from_str(r#"{"memory_mb": 1024}"#).unwrap();
        assert_eq!(c.memory_mb, 1024);
        assert_eq!(c.vcpus, DEFAULT_VCPUS);
        let round: SandboxConfig =
            serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(round, c);
        let e = serde_json::from_str::<SandboxConfig>(r#"{"memroy_mb": 1}"#).unwrap_err();
        assert!(e.to_string().contains("memroy_mb"), "{e}");
    }

    #[test]
    fn rejects_bad_template_id() {
        for bad in ["", "Python", "../etc", "a/b", "-x", &"a".repeat(65)] {
            let c = SandboxConfig {
                template_id: bad.to_owned(),
                ..Default::default()
            };
            assert!(matches!(err(c), ConfigError::TemplateId { .. }), "{bad:?}");
        }
    }

    #[test]
    fn rejects_memory_out_of_range_naming_the_range() {
        for bad in [0, 64, MAX_MEMORY_MB + 1] {
            let c = SandboxConfig {
                memory_mb: bad,
                ..Default::default()
            };
            let e = err(c);
            assert!(matches!(e, ConfigError::Memory { value, .. } if value == bad));
            assert!(e.to_string().contains("128..=262144"), "{e}");
        }
    }

    #[test]
    fn rejects_zero_and_absurd_vcpus() {
        for bad in [0, 33, 255] {
            let c = SandboxConfig {
                vcpus: bad,
                ..Default::default()
            };
            assert!(matches!(err(c), ConfigError::Vcpus { value, .. } if value == bad));
        }
    }

    #[test]
    fn rejects_boot_timeout_out_of_range() {
        for bad in [0, 99, MAX_BOOT_TIMEOUT_MS + 1] {
            let c = SandboxConfig {
                boot_timeout_ms: bad,
                ..Default::default()
            };
            assert!(matches!(err(c), ConfigError::BootTimeout { .. }));
        }
    }

    #[test]
    fn rejects_kernel_args_owned_by_the_provider_or_malformed() {
        for bad in [
            "root=/dev/sda",
            "quiet init=/bin/sh",
            "nova.overlay=x",
            "a\nb",
        ] {
            let c = SandboxConfig {
                kernel_args: bad.to_owned(),
                ..Default::default()
            };
            assert!(matches!(err(c), ConfigError::KernelArgs { .. }), "{bad:?}");
        }
        let c = SandboxConfig {
            kernel_args: "x".repeat(2000),
            ..Default::default()
        };
        assert!(matches!(err(c), ConfigError::KernelArgs { .. }));
    }

    #[test]
    fn rejects_port_zero() {
        let c = SandboxConfig {
            host_port: Some(0),
            ..Default::default()
        };
        assert_eq!(err(c), ConfigError::Port { field: "host_port" });
        let c = SandboxConfig {
            guest_port: 0,
            ..Default::default()
        };
        assert_eq!(
            err(c),
            ConfigError::Port {
                field: "guest_port"
            }
        );
    }

    #[test]
    fn rejects_port_forward_without_network() {
        let c = SandboxConfig {
            host_port: Some(80),
            enable_network: false,
            ..Default::default()
        };
        assert_eq!(err(c), ConfigError::PortWithoutNetwork { port: 80 });
    }

    #[test]
    fn ports_merge_with_the_seed_pair_and_are_checked_by_field() {
        let c = SandboxConfig {
            host_port: Some(8080),
            guest_port: 80,
            ports: vec![PortSpec::tcp(8081, 81), PortSpec::udp(8080, 53)],
            ..Default::default()
        };
        c.validate().unwrap();
        assert_eq!(c.published_ports()[0], PortSpec::tcp(8080, 80));
        assert_eq!(c.published_ports().len(), 3);
        assert_eq!(c.published_port_field(2), "ports[1]");

        let c = SandboxConfig {
            host_port: Some(8080),
            ports: vec![PortSpec::tcp(8081, 81), PortSpec::tcp(8080, 82)],
            ..Default::default()
        };
        let e = err(c);
        assert_eq!(
            e,
            ConfigError::DuplicatePort {
                field: "ports[1].host_port".into(),
                other: "host_port".into(),
                port: 8080,
                protocol: PortProtocol::Tcp,
            }
        );
        assert!(
            e.to_string().contains("ports[1].host_port = 8080/tcp"),
            "{e}"
        );

        let c = SandboxConfig {
            ports: vec![PortSpec::tcp(1, 0)],
            ..Default::default()
        };
        assert_eq!(
            err(c),
            ConfigError::PortZero {
                field: "ports[0].guest_port".into()
            }
        );
        let c = SandboxConfig {
            ports: vec![PortSpec {
                host_ip: Some(std::net::Ipv4Addr::BROADCAST),
                ..PortSpec::tcp(1, 1)
            }],
            ..Default::default()
        };
        assert!(matches!(err(c), ConfigError::HostIp { field, .. } if field == "ports[0].host_ip"));
        let c = SandboxConfig {
            ports: vec![PortSpec::tcp(1, 1)],
            enable_network: false,
            ..Default::default()
        };
        assert_eq!(err(c), ConfigError::NeedsNetwork { field: "ports" });
    }

    #[test]
    fn egress_entries_are_checked_by_field() {
        let egress = |allow: &[&str], deny: &[&str]| SandboxConfig {
            egress: Some(EgressConfig {
                block_all: true,
                allow: allow.iter().map(|s| s.to_string()).collect(),
                deny: deny.iter().map(|s| s.to_string()).collect(),
            }),
            ..Default::default()
        };
        egress(&["10.0.0.0/8", "1.2.3.4", "*.pypi.org"], &["example.com"])
            .validate()
            .unwrap();
        let e = err(egress(&["10.0.0.0/8"], &["1.1.1.1", "10.0.0.1/8"]));
        assert!(matches!(&e, ConfigError::Egress { field, .. } if field == "egress.deny[1]"));
        assert!(
            e.to_string().starts_with("egress.deny[1] = \"10.0.0.1/8\""),
            "{e}"
        );
        let e = err(egress(&["no_such"], &[]));
        assert!(matches!(&e, ConfigError::Egress { field, .. } if field == "egress.allow[0]"));
    }

    #[test]
    fn old_configs_without_ports_or_egress_still_load() {
        let c: SandboxConfig =
            serde_json::from_str(r#"{"template_id":"minimal","host_port":8080}"#).unwrap();
        assert!(c.ports.is_empty() && c.egress.is_none());
        assert_eq!(c.published_ports(), vec![PortSpec::tcp(8080, 8080)]);
    }

    #[test]
    fn rejects_missing_rootfs_and_drive_paths() {
        let c = SandboxConfig {
            rootfs_path: Some("/nonexistent/rootfs.ext4".into()),
            ..Default::default()
        };
        assert!(matches!(err(c), ConfigError::MissingPath { field, .. } if field == "rootfs_path"));

        let dir = tempfile::tempdir().unwrap();
        let c = SandboxConfig {
            extra_drives: vec![DriveConfig::read_only(dir.path())],
            ..Default::default()
        };
        assert!(
            matches!(err(c), ConfigError::MissingPath { field, .. } if field == "extra_drives[0].path")
        );

        let file = dir.path().join("disk.img");
        std::fs::write(&file, b"").unwrap();
        let c = SandboxConfig {
            extra_drives: vec![DriveConfig::new(&file)],
            ..Default::default()
        };
        c.validate().unwrap();
        let c = SandboxConfig {
            extra_drives: vec![DriveConfig::new(&file); MAX_EXTRA_DRIVES + 1],
            ..Default::default()
        };
        assert!(matches!(
            err(c),
            ConfigError::TooManyDrives { count: 17, .. }
        ));
    }

    #[test]
    fn label_keys_and_values() {
        for good in ["app", "a.b-c_d", "example.com/app", "x/y"] {
            assert!(is_valid_label_key(good), "{good:?}");
        }
        for bad in [
            "",
            "-app",
            "app-",
            "a b",
            "Example.com/app",
            "/app",
            "a/",
            &"k".repeat(64),
        ] {
            let c = SandboxConfig {
                labels: [(bad.to_owned(), "v".to_owned())].into(),
                ..Default::default()
            };
            assert!(matches!(err(c), ConfigError::LabelKey { .. }), "{bad:?}");
        }
        let c = SandboxConfig {
            labels: [("app".to_owned(), "bad value".to_owned())].into(),
            ..Default::default()
        };
        assert!(matches!(err(c), ConfigError::LabelValue { .. }));
        let c = SandboxConfig {
            labels: [("app".to_owned(), String::new())].into(),
            ..Default::default()
        };
        c.validate().unwrap();
    }

    #[test]
    fn rejects_bad_env() {
        for bad in ["", "A=B", "A\0"] {
            let c = SandboxConfig {
                env: [(bad.to_owned(), "v".to_owned())].into(),
                ..Default::default()
            };
            assert!(matches!(err(c), ConfigError::EnvName { .. }), "{bad:?}");
        }
        let c = SandboxConfig {
            env: [("A".to_owned(), "x\0y".to_owned())].into(),
            ..Default::default()
        };
        assert!(matches!(err(c), ConfigError::EnvValue { .. }));
    }
}
