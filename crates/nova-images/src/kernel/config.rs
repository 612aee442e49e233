//! The project's kernel config fragment and checking a final `.config` against it.
//!
//! The fragment (`images/kernel/microvm-x86_64.config`, embedded at compile
//! time so the `nova` binary is self-contained) is applied on top of
//! `make allnoconfig` through `KCONFIG_ALLCONFIG`. Kconfig silently drops an
//! option whose dependencies are off, so after configuring we compare: every
//! `CONFIG_X=y` of the fragment must be `=y` in the final `.config` and every
//! `# CONFIG_X is not set` must be off; otherwise the build stops and names
//! the options that did not survive.

use std::collections::BTreeMap;

/// The config fragment text, as checked into `images/kernel/`.
pub const FRAGMENT: &str = include_str!("../../../../images/kernel/microvm-x86_64.config");

/// The options the issue requires of every guest kernel (see the crate docs):
/// the fragment must ask for each, and the build verifies each ended up `=y`.
pub const REQUIRED_OPTIONS: &[&str] = &[
    "CONFIG_64BIT",
    "CONFIG_VIRTIO_MMIO",
    "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES",
    "CONFIG_VIRTIO_BLK",
    "CONFIG_VIRTIO_NET",
    "CONFIG_VSOCKETS",
    "CONFIG_VIRTIO_VSOCKETS",
    "CONFIG_VIRTIO_CONSOLE",
    "CONFIG_BLK_DEV",
    "CONFIG_EXT4_FS",
    "CONFIG_OVERLAY_FS",
    "CONFIG_TMPFS",
    "CONFIG_DEVTMPFS",
    "CONFIG_DEVTMPFS_MOUNT",
    "CONFIG_SERIAL_8250",
    "CONFIG_SERIAL_8250_CONSOLE",
    "CONFIG_PRINTK",
    "CONFIG_PVH",
    "CONFIG_HYPERVISOR_GUEST",
    "CONFIG_PARAVIRT",
    "CONFIG_KVM_GUEST",
    "CONFIG_CGROUPS",
    "CONFIG_MEMCG",
    "CONFIG_CGROUP_PIDS",
    "CONFIG_NAMESPACES",
    "CONFIG_UTS_NS",
    "CONFIG_IPC_NS",
    "CONFIG_USER_NS",
    "CONFIG_PID_NS",
    "CONFIG_NET_NS",
    "CONFIG_SECCOMP",
    "CONFIG_SECCOMP_FILTER",
    "CONFIG_NET",
    "CONFIG_UNIX",
    "CONFIG_INET",
    "CONFIG_IPV6",
    "CONFIG_NETFILTER",
    "CONFIG_NF_TABLES",
    "CONFIG_NF_TABLES_INET",
    "CONFIG_NETFILTER_XTABLES",
    "CONFIG_IP_NF_IPTABLES",
    "CONFIG_IP_NF_FILTER",
    "CONFIG_IP6_NF_IPTABLES",
    "CONFIG_IP6_NF_FILTER",
    "CONFIG_UNIX98_PTYS",
    "CONFIG_RANDOM_TRUST_CPU",
    "CONFIG_FUTEX",
    "CONFIG_EPOLL",
    "CONFIG_SIGNALFD",
    "CONFIG_TIMERFD",
    "CONFIG_EVENTFD",
    "CONFIG_INOTIFY_USER",
    "CONFIG_FILE_LOCKING",
    "CONFIG_PROC_FS",
    "CONFIG_SYSFS",
];

/// Options that must stay off: each would slow boot or has no use in a sandbox.
pub const FORBIDDEN_OPTIONS: &[&str] = &[
    "CONFIG_MODULES",
    "CONFIG_BLK_DEV_INITRD",
    "CONFIG_PCI",
    "CONFIG_DEBUG_INFO",
    "CONFIG_SOUND",
];

/// A Kconfig value as written in a `.config` or fragment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigValue {
    /// `=y`.
    Yes,
    /// `=m`.
    Module,
    /// `# CONFIG_X is not set`.
    NotSet,
    /// Anything else (`="string"`, `=64`).
    Other(String),
}

/// Parses `.config`-format text into option name -> value.
pub fn parse(text: &str) -> BTreeMap<String, ConfigValue> {
    let mut options = BTreeMap::new();
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("# ") {
            if let Some(name) = rest.strip_suffix(" is not set")
                && name.starts_with("CONFIG_")
            {
                options.insert(name.to_owned(), ConfigValue::NotSet);
            }
        } else if let Some((name, value)) = line.split_once('=')
            && name.starts_with("CONFIG_")
        {
            let value = match value {
                "y" => ConfigValue::Yes,
                "m" => ConfigValue::Module,
                "n" => ConfigValue::NotSet,
                other => ConfigValue::Other(other.to_owned()),
            };
            options.insert(name.to_owned(), value);
        }
    }
    options
}

/// How a final `.config` differs from what the fragment asked for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigMismatch {
    /// Asked `=y`, not `=y` in the result (a dependency is missing).
    pub missing: Vec<String>,
    /// Asked off, on in the result (something selects it).
    pub unwanted: Vec<String>,
}

impl ConfigMismatch {
    /// Whether the result honours the fragment.
    pub fn is_empty(&self) -> bool {
        self.missing.is_empty() && self.unwanted.is_empty()
    }
}

/// Compares the final `.config` with the fragment (and [`REQUIRED_OPTIONS`] /
/// [`FORBIDDEN_OPTIONS`], which hold even if the fragment forgets them).
pub fn verify(fragment: &str, final_config: &str) -> ConfigMismatch {
    let wanted = parse(fragment);
    let got = parse(final_config);
    let is = |name: &str, value: ConfigValue| got.get(name) == Some(&value);
    let is_on = |name: &str| matches!(got.get(name), Some(ConfigValue::Yes | ConfigValue::Module));

    let mut mismatch = ConfigMismatch::default();
    let required = wanted
        .iter()
        .filter(|(_, v)| **v == ConfigValue::Yes)
        .map(|(k, _)| k.as_str())
        .chain(REQUIRED_OPTIONS.iter().copied());
    for name in required {
        if !is(name, ConfigValue::Yes) && !mismatch.missing.iter().any(|m| m == name) {
            mismatch.missing.push(name.to_owned());
        }
    }
    let forbidden = wanted
        .iter()
        .filter(|(_, v)| **v == ConfigValue::NotSet)
        .map(|(k, _)| k.as_str())
        .chain(FORBIDDEN_OPTIONS.iter().copied());
    for name in forbidden {
        if is_on(name) && !mismatch.unwanted.iter().any(|m| m == name) {
            mismatch.unwanted.push(name.to_owned());
        }
    }
    mismatch
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fragment_asks_for_every_required_option() {
        let fragment = parse(FRAGMENT);
        let absent: Vec<_> = REQUIRED_OPTIONS
            .iter()
            .filter(|name| fragment.get(**name) != Some(&ConfigValue::Yes))
            .collect();
        assert!(
            absent.is_empty(),
            "fragment lacks required options: {absent:?}"
        );
    }

    #[test]
    fn the_fragment_turns_off_what_slows_boot() {
        let fragment = parse(FRAGMENT);
        for name in FORBIDDEN_OPTIONS {
            assert_eq!(fragment.get(*name), Some(&ConfigValue::NotSet), "{name}");
        }
        assert!(
            !fragment.values().any(|v| *v == ConfigValue::Module),
            "no option may be built as a module"
        );
    }

    #[test]
    fn parse_reads_every_line_kind() {
        let parsed = parse(
            "CONFIG_A=y\nCONFIG_B=m\n# CONFIG_C is not set\nCONFIG_D=\"x\"\n# comment\nFOO=y\n",
        );
        assert_eq!(parsed.get("CONFIG_A"), Some(&ConfigValue::Yes));
        assert_eq!(parsed.get("CONFIG_B"), Some(&ConfigValue::Module));
        assert_eq!(parsed.get("CONFIG_C"), Some(&ConfigValue::NotSet));
        assert_eq!(
            parsed.get("CONFIG_D"),
            Some(&ConfigValue::Other("\"x\"".into()))
        );
        assert_eq!(parsed.len(), 4);
    }

    #[test]
    fn verify_names_dropped_and_unwanted_options() {
        // Build a "final config" that satisfies everything, then break it.
        let mut good = String::new();
        for name in REQUIRED_OPTIONS {
            good.push_str(&format!("{name}=y\n"));
        }
        let fragment = "CONFIG_EXTRA=y\n# CONFIG_MODULES is not set\n";
        let ok = format!("{good}CONFIG_EXTRA=y\n");
        assert!(verify(fragment, &ok).is_empty());

        let broken = ok
            .replace("CONFIG_PVH=y\n", "# CONFIG_PVH is not set\n")
            .replace("CONFIG_EXTRA=y\n", "")
            + "CONFIG_MODULES=y\nCONFIG_PCI=y\n";
        let mismatch = verify(fragment, &broken);
        assert!(
            mismatch.missing.contains(&"CONFIG_PVH".to_owned()),
            "{mismatch:?}"
        );
        assert!(
            mismatch.missing.contains(&"CONFIG_EXTRA".to_owned()),
            "{mismatch:?}"
        );
        assert_eq!(
            mismatch.unwanted,
            vec!["CONFIG_MODULES".to_owned(), "CONFIG_PCI".to_owned()]
        );
    }
}
