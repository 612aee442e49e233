//! The operator's `policy.toml`: what untrusted callers may ask for.
//!
//! A caller's [`CreateSandboxRequest`] never becomes a
//! [`SandboxConfig`] directly: [`Policy::admit`] checks it against the
//! per-sandbox limits, the allowed templates and the named volumes, and only
//! then builds the config the runtime trusts. No host path, kernel argument
//! or raw drive comes from a caller; a volume is a name that only this file
//! maps to a host image.
//!
//! ```toml
//! # $NOVA_HOME/policy.toml (every key optional; these are the defaults)
//! [limits]
//! max_memory_mb = 4096          # per sandbox
//! max_vcpus = 4                 # per sandbox
//! max_sandboxes = 100           # live sandboxes in this daemon
//! max_total_memory_mb = 65536   # all live sandboxes together
//! max_total_vcpus = 256
//! default_timeout_secs = 300    # lifetime when a create names none
//! max_timeout_secs = 86400
//! max_pending_creates = 64      # creates waiting beyond this get 429
//! max_concurrent_creates = 8    # creates booting at once
//! max_upload_bytes = 1073741824
//! boot_timeout_ms = 30000       # VMM spawn to agent ready, per create
//!
//! [templates]
//! allowed = []                  # empty: every installed template
//! default = "python"
//!
//! [network]
//! default = true                # sandboxes get a network unless asked
//! allowed = true                # false: no caller gets one
//!
//! [volumes.data]                # a caller asks for "data"
//! path = "/srv/nova/data.ext4"  # a raw ext4 image on the host
//! read_only = true
//!
//! [pool]                        # warm pool: template = sandboxes kept paused
//! python = 2
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use nova_core::config::{
    DEFAULT_TEMPLATE, DriveConfig, MAX_BOOT_TIMEOUT_MS, MIN_BOOT_TIMEOUT_MS, SandboxConfig,
    StartMode,
};
use nova_core::network::PortSpec;
use serde::Deserialize;

use crate::api::sandboxes::CreateSandboxRequest;
use crate::problem::{Problem, ProblemCode};

/// Label keys a caller may not set: the daemon's own marks.
pub const RESERVED_LABEL_PREFIX: &str = "nova.";

/// The operator's rules. Every section and key is optional.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Policy {
    /// Resource and rate limits.
    pub limits: Limits,
    /// Which templates callers may use.
    pub templates: TemplatePolicy,
    /// Whether sandboxes get a network.
    pub network: NetworkPolicy,
    /// Named volumes callers may attach, by name.
    pub volumes: BTreeMap<String, Volume>,
    /// Warm pool sizes: template id to the number of paused sandboxes kept
    /// ready for it.
    pub pool: BTreeMap<String, usize>,
}

/// Per-sandbox and daemon-wide limits.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Most memory one sandbox may have, MiB.
    pub max_memory_mb: u32,
    /// Most vCPUs one sandbox may have.
    pub max_vcpus: u8,
    /// Most live sandboxes (the warm pool's included).
    pub max_sandboxes: usize,
    /// Most memory of all live sandboxes together, MiB.
    pub max_total_memory_mb: u64,
    /// Most vCPUs of all live sandboxes together.
    pub max_total_vcpus: u64,
    /// A sandbox's lifetime when its create names none, seconds.
    pub default_timeout_secs: u64,
    /// The longest lifetime a caller may ask for, seconds.
    pub max_timeout_secs: u64,
    /// Creates that may wait for a boot slot; one more is answered 429.
    pub max_pending_creates: usize,
    /// Creates that may boot at once.
    pub max_concurrent_creates: usize,
    /// Largest file upload, bytes.
    pub max_upload_bytes: u64,
    /// How long a create may take from VMM spawn to the agent's `ready`,
    /// milliseconds (generous by default: under emulation, or on a loaded
    /// host, a boot takes seconds).
    pub boot_timeout_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_memory_mb: 4096,
            max_vcpus: 4,
            max_sandboxes: 100,
            max_total_memory_mb: 64 * 1024,
            max_total_vcpus: 256,
            default_timeout_secs: 300,
            max_timeout_secs: 24 * 3600,
            max_pending_creates: 64,
            max_concurrent_creates: 8,
            max_upload_bytes: 1 << 30,
            boot_timeout_ms: 30_000,
        }
    }
}

/// Which templates callers may use.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TemplatePolicy {
    /// Allowed template ids; empty allows every installed one.
    pub allowed: Vec<String>,
    /// The template of a create that names none.
    pub default: String,
}

impl Default for TemplatePolicy {
    fn default() -> Self {
        Self {
            allowed: Vec::new(),
            default: DEFAULT_TEMPLATE.to_owned(),
        }
    }
}

/// Whether sandboxes get a network.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkPolicy {
    /// A create that does not say gets a network when this is true.
    pub default: bool,
    /// When false, no caller gets a network (a create asking for one is
    /// refused).
    pub allowed: bool,
}

impl Default for NetworkPolicy {
    fn default() -> Self {
        Self {
            default: true,
            allowed: true,
        }
    }
}

/// A named volume: a raw disk image on the host, attached as an extra
/// virtio block device (`/dev/vdc`, `/dev/vdd`, ... in request order).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Volume {
    /// The image file on the host.
    pub path: PathBuf,
    /// Attach it read-only whatever the caller asks.
    #[serde(default)]
    pub read_only: bool,
}

/// `policy.toml` could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a valid policy.
    #[error("{path} is not a valid policy (see `nova serve --help` for its keys)")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong, with its line.
        #[source]
        source: toml::de::Error,
    },
    /// A value is unusable.
    #[error("{path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong and what to do.
        reason: String,
    },
}

/// What a sandbox will hold, for the daemon-wide totals.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Live sandboxes.
    pub sandboxes: usize,
    /// Their memory, MiB.
    pub memory_mb: u64,
    /// Their vCPUs.
    pub vcpus: u64,
}

impl Usage {
    /// The usage of one sandbox with `config`.
    pub fn of(config: &SandboxConfig) -> Self {
        Self {
            sandboxes: 1,
            memory_mb: u64::from(config.memory_mb),
            vcpus: u64::from(config.vcpus),
        }
    }

    /// `self` plus `other`.
    pub fn plus(self, other: Self) -> Self {
        Self {
            sandboxes: self.sandboxes + other.sandboxes,
            memory_mb: self.memory_mb + other.memory_mb,
            vcpus: self.vcpus + other.vcpus,
        }
    }
}

/// A caller's create, checked: the config to boot and what the daemon keeps
/// beside it.
#[derive(Clone, Debug, PartialEq)]
pub struct Admitted {
    /// The config the runtime gets (no caller env or labels: those are the
    /// daemon's record, so a pooled sandbox can take them on when claimed).
    pub config: SandboxConfig,
    /// The caller's labels.
    pub labels: BTreeMap<String, String>,
    /// The caller's environment for every command.
    pub env: BTreeMap<String, String>,
    /// Lifetime in seconds.
    pub timeout_secs: u64,
}

impl Policy {
    /// Reads `path`; a missing file is the default policy.
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(source) => {
                return Err(PolicyError::Read {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        let policy: Self = toml::from_str(&text).map_err(|source| PolicyError::Parse {
            path: path.to_owned(),
            source,
        })?;
        policy.check().map_err(|reason| PolicyError::Invalid {
            path: path.to_owned(),
            reason,
        })?;
        Ok(policy)
    }

    fn check(&self) -> Result<(), String> {
        let l = &self.limits;
        if !(MIN_BOOT_TIMEOUT_MS..=MAX_BOOT_TIMEOUT_MS).contains(&l.boot_timeout_ms) {
            return Err(format!(
                "limits.boot_timeout_ms = {} is out of range: use {MIN_BOOT_TIMEOUT_MS}..={MAX_BOOT_TIMEOUT_MS}",
                l.boot_timeout_ms
            ));
        }
        if l.max_concurrent_creates == 0 {
            return Err("limits.max_concurrent_creates must be at least 1".into());
        }
        if l.default_timeout_secs == 0 || l.default_timeout_secs > l.max_timeout_secs {
            return Err(format!(
                "limits.default_timeout_secs = {} must be in 1..=max_timeout_secs ({})",
                l.default_timeout_secs, l.max_timeout_secs
            ));
        }
        for (name, volume) in &self.volumes {
            if !volume.path.is_absolute() {
                return Err(format!(
                    "volumes.{name}.path = {:?} must be absolute",
                    volume.path
                ));
            }
        }
        // Summed checked: sizes near usize::MAX must be refused, not wrap
        // around to a small total (or panic a debug build).
        let pooled = self
            .pool
            .values()
            .try_fold(0usize, |total, &n| total.checked_add(n));
        match pooled {
            Some(pooled) if pooled <= l.max_sandboxes => {}
            Some(pooled) => {
                return Err(format!(
                    "the pool holds {pooled} sandboxes, more than limits.max_sandboxes ({})",
                    l.max_sandboxes
                ));
            }
            None => {
                return Err(format!(
                    "the pool sizes add up to more than limits.max_sandboxes ({})",
                    l.max_sandboxes
                ));
            }
        }
        Ok(())
    }

    /// Whether callers may use `template`.
    pub fn template_allowed(&self, template: &str) -> bool {
        self.templates.allowed.is_empty() || self.templates.allowed.iter().any(|t| t == template)
    }

    /// Checks a caller's create and builds the config to boot.
    ///
    /// Memory and vCPUs the caller leaves out are `template_defaults` (the
    /// size the template's snapshot was taken with, so the create restores
    /// rather than boots) when given and within the limits, else the
    /// runtime's defaults, capped by the limits.
    ///
    /// Errors: `invalid_config` for values out of range (naming the limit),
    /// `forbidden` for a template or volume the policy does not allow.
    pub fn admit(
        &self,
        request: &CreateSandboxRequest,
        template_defaults: Option<(u32, u8)>,
    ) -> Result<Admitted, Problem> {
        let l = &self.limits;
        let template = request
            .template
            .clone()
            .unwrap_or_else(|| self.templates.default.clone());
        if !self.template_allowed(&template) {
            return Err(Problem::new(
                ProblemCode::Forbidden,
                format!(
                    "template {template:?} is not allowed by the operator's policy; allowed: {}",
                    self.templates.allowed.join(", ")
                ),
            ));
        }
        let mut config = SandboxConfig {
            template_id: template,
            boot_timeout_ms: l.boot_timeout_ms,
            ..SandboxConfig::default()
        };
        if let Some((memory_mb, vcpus)) = template_defaults {
            if memory_mb <= l.max_memory_mb {
                config.memory_mb = memory_mb;
            }
            if vcpus <= l.max_vcpus {
                config.vcpus = vcpus;
            }
        }
        if let Some(memory_mb) = request.memory_mb {
            if memory_mb > l.max_memory_mb {
                return Err(Problem::invalid_config(format!(
                    "memory_mb = {memory_mb} is above this daemon's limit of {} MiB per sandbox",
                    l.max_memory_mb
                )));
            }
            config.memory_mb = memory_mb;
        }
        config.memory_mb = config.memory_mb.min(l.max_memory_mb);
        if let Some(vcpus) = request.vcpus {
            if vcpus > l.max_vcpus {
                return Err(Problem::invalid_config(format!(
                    "vcpus = {vcpus} is above this daemon's limit of {} per sandbox",
                    l.max_vcpus
                )));
            }
            config.vcpus = vcpus;
        }
        config.vcpus = config.vcpus.min(l.max_vcpus);
        let network = request.network.unwrap_or(self.network.default);
        if network && !self.network.allowed {
            return Err(Problem::new(
                ProblemCode::Forbidden,
                "the operator's policy gives sandboxes no network; create with \"network\": false",
            ));
        }
        config.enable_network = network;
        if !request.ports.is_empty() && !network {
            return Err(Problem::invalid_config(
                "ports need a network: drop \"network\": false",
            ));
        }
        config.ports = request
            .ports
            .iter()
            .map(|p| PortSpec {
                host_port: p.host_port,
                guest_port: p.guest_port,
                protocol: p.protocol.into(),
                host_ip: None,
            })
            .collect();
        if let Some(egress) = &request.egress {
            if !network {
                return Err(Problem::invalid_config(
                    "egress rules need a network: drop \"network\": false",
                ));
            }
            config.egress = Some(egress.clone().into());
        }
        for mount in &request.volumes {
            let Some(volume) = self.volumes.get(&mount.name) else {
                return Err(Problem::new(
                    ProblemCode::Forbidden,
                    format!(
                        "volume {:?} is not one the operator's policy offers; offered: {}",
                        mount.name,
                        self.volumes.keys().cloned().collect::<Vec<_>>().join(", ")
                    ),
                ));
            };
            config.extra_drives.push(DriveConfig {
                path: volume.path.clone(),
                read_only: volume.read_only || mount.read_only,
            });
        }
        if let Some(start) = request.start {
            config.start = start.into();
        }
        for key in request.labels.keys() {
            if key.starts_with(RESERVED_LABEL_PREFIX) {
                return Err(Problem::invalid_config(format!(
                    "label {key:?}: keys starting with {RESERVED_LABEL_PREFIX:?} are the daemon's"
                )));
            }
        }
        // The runtime's own checks (label syntax, ports, ranges) on a copy
        // carrying the caller's labels and env.
        let mut checked = config.clone();
        checked.labels = request.labels.clone();
        checked.env = request.env.clone();
        checked
            .validate()
            .map_err(|e| Problem::invalid_config(e.to_string()))?;
        let timeout_secs = request.timeout_secs.unwrap_or(l.default_timeout_secs);
        if timeout_secs == 0 || timeout_secs > l.max_timeout_secs {
            return Err(Problem::invalid_config(format!(
                "timeout_secs = {timeout_secs} is out of range: use 1..={}",
                l.max_timeout_secs
            )));
        }
        Ok(Admitted {
            config,
            labels: request.labels.clone(),
            env: request.env.clone(),
            timeout_secs,
        })
    }

    /// Checks a lifetime asked for later (`POST .../timeout`).
    pub fn check_timeout(&self, timeout_secs: u64) -> Result<(), Problem> {
        if timeout_secs == 0 || timeout_secs > self.limits.max_timeout_secs {
            return Err(Problem::invalid_config(format!(
                "timeout_secs = {timeout_secs} is out of range: use 1..={}",
                self.limits.max_timeout_secs
            )));
        }
        Ok(())
    }

    /// Whether `usage` fits the daemon-wide limits; the error names the
    /// limit that would be passed.
    pub fn check_totals(&self, usage: Usage) -> Result<(), Problem> {
        let l = &self.limits;
        let over = if usage.sandboxes > l.max_sandboxes {
            Some(format!("{} sandboxes (max_sandboxes)", l.max_sandboxes))
        } else if usage.memory_mb > l.max_total_memory_mb {
            Some(format!(
                "{} MiB of memory in all (max_total_memory_mb)",
                l.max_total_memory_mb
            ))
        } else if usage.vcpus > l.max_total_vcpus {
            Some(format!(
                "{} vCPUs in all (max_total_vcpus)",
                l.max_total_vcpus
            ))
        } else {
            None
        };
        match over {
            Some(limit) => Err(Problem::new(
                ProblemCode::QuotaExceeded,
                format!(
                    "this daemon's limit of {limit} is reached; stop a sandbox (`nova rm ID`) first"
                ),
            )),
            None => Ok(()),
        }
    }
}

/// The start mode a caller may choose, as `StartMode`.
impl From<crate::api::sandboxes::StartModeView> for StartMode {
    fn from(mode: crate::api::sandboxes::StartModeView) -> Self {
        use crate::api::sandboxes::StartModeView;
        match mode {
            StartModeView::Auto => Self::Auto,
            StartModeView::Snapshot => Self::Snapshot,
            StartModeView::Cold => Self::Cold,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::sandboxes::{PortMapping, VolumeMount};

    fn request() -> CreateSandboxRequest {
        serde_json::from_str("{}").unwrap()
    }

    #[test]
    fn an_empty_create_gets_the_defaults() {
        let policy = Policy::default();
        let admitted = policy.admit(&request(), None).unwrap();
        assert_eq!(admitted.config.template_id, DEFAULT_TEMPLATE);
        assert_eq!(admitted.timeout_secs, 300);
        assert!(admitted.config.enable_network);
        assert!(admitted.config.extra_drives.is_empty());
    }

    #[test]
    fn a_template_s_recommended_size_is_the_default_within_the_limits() {
        let policy: Policy = toml::from_str("[limits]\nmax_memory_mb = 1024\n").unwrap();
        let admitted = policy.admit(&request(), Some((256, 1))).unwrap();
        assert_eq!((admitted.config.memory_mb, admitted.config.vcpus), (256, 1));
        let admitted = policy.admit(&request(), Some((2048, 1))).unwrap();
        assert_eq!(admitted.config.memory_mb, 512);
        let mut r = request();
        r.memory_mb = Some(768);
        assert_eq!(
            policy.admit(&r, Some((256, 1))).unwrap().config.memory_mb,
            768
        );
    }

    #[test]
    fn limits_and_templates_are_enforced_with_errors_that_name_them() {
        let policy: Policy = toml::from_str(
            "[limits]\nmax_memory_mb = 1024\n[templates]\nallowed = [\"minimal\"]\ndefault = \"minimal\"\n",
        )
        .unwrap();
        let mut r = request();
        r.memory_mb = Some(2048);
        let e = policy.admit(&r, None).unwrap_err();
        assert_eq!(e.code, ProblemCode::InvalidConfig);
        assert!(e.detail.contains("1024 MiB"), "{}", e.detail);
        let mut r = request();
        r.template = Some("python".into());
        assert_eq!(
            policy.admit(&r, None).unwrap_err().code,
            ProblemCode::Forbidden
        );
        assert_eq!(
            policy.admit(&request(), None).unwrap().config.template_id,
            "minimal"
        );
    }

    #[test]
    fn volumes_are_names_the_policy_maps_to_host_paths() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("data.ext4");
        std::fs::write(&image, [0u8; 512]).unwrap();
        let policy: Policy = toml::from_str(&format!(
            "[volumes.data]\npath = {:?}\nread_only = true\n",
            image.display().to_string()
        ))
        .unwrap();
        let mut r = request();
        r.volumes = vec![VolumeMount {
            name: "data".into(),
            read_only: false,
        }];
        let admitted = policy.admit(&r, None).unwrap();
        assert_eq!(admitted.config.extra_drives[0].path, image);
        assert!(admitted.config.extra_drives[0].read_only);
    }

    #[test]
    fn unknown_volumes_reserved_labels_and_duplicate_ports_are_refused() {
        let policy = Policy::default();
        let mut r = request();
        r.volumes = vec![VolumeMount {
            name: "etc".into(),
            read_only: false,
        }];
        assert_eq!(
            policy.admit(&r, None).unwrap_err().code,
            ProblemCode::Forbidden
        );
        let mut r = request();
        r.labels.insert("nova.pool".into(), "x".into());
        assert_eq!(
            policy.admit(&r, None).unwrap_err().code,
            ProblemCode::InvalidConfig
        );
        let mut r = request();
        r.ports = vec![
            PortMapping {
                host_port: 8080,
                guest_port: 80,
                protocol: Default::default(),
            },
            PortMapping {
                host_port: 8080,
                guest_port: 81,
                protocol: Default::default(),
            },
        ];
        let e = policy.admit(&r, None).unwrap_err();
        assert_eq!(e.code, ProblemCode::InvalidConfig);
        assert!(e.detail.contains("ports[1]"), "{}", e.detail);
    }

    #[test]
    fn totals_name_the_limit_reached() {
        let policy: Policy = toml::from_str("[limits]\nmax_sandboxes = 1\n").unwrap();
        let one = Usage {
            sandboxes: 1,
            memory_mb: 512,
            vcpus: 2,
        };
        policy.check_totals(one).unwrap();
        let e = policy.check_totals(one.plus(one)).unwrap_err();
        assert_eq!(e.code, ProblemCode::QuotaExceeded);
        assert!(e.detail.contains("max_sandboxes"));
    }

    #[test]
    fn a_policy_with_unknown_keys_or_bad_values_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.toml");
        std::fs::write(&path, "[limits]\nmax_memroy_mb = 1\n").unwrap();
        assert!(matches!(
            Policy::load(&path),
            Err(PolicyError::Parse { .. })
        ));
        std::fs::write(&path, "[pool]\npython = 1000\n").unwrap();
        assert!(matches!(
            Policy::load(&path),
            Err(PolicyError::Invalid { .. })
        ));
        assert_eq!(
            Policy::load(&dir.path().join("none.toml")).unwrap(),
            Policy::default()
        );
    }

    /// Found by the `policy_toml` fuzz target: pool sizes whose sum passes
    /// `usize::MAX` panicked the daemon's start with "attempt to add with
    /// overflow" (and, in a release build, wrapped to a small total that
    /// passed the check).
    #[test]
    fn pool_sizes_that_overflow_their_sum_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.toml");
        let max = i64::MAX;
        std::fs::write(
            &path,
            format!("[limits]\nmax_sandboxes = {max}\n[pool]\na = {max}\nb = {max}\nc = {max}\n"),
        )
        .unwrap();
        match Policy::load(&path) {
            Err(PolicyError::Invalid { reason, .. }) => {
                assert!(reason.contains("max_sandboxes"), "{reason}");
            }
            other => panic!("expected Invalid, got {other:?}"),
        }
    }
}
