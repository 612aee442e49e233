//! The project's kernel config fragments and checking a final `.config` against one.
//!
//! A fragment per guest architecture (`images/kernel/microvm-x86_64.config`
//! and `images/kernel/microvm-arm64.config`, embedded at compile time so the
//! `nova` binary is self-contained; [`for_arch`] picks one) is applied on top of
//! `make allnoconfig` through `KCONFIG_ALLCONFIG`. Kconfig silently drops an
//! option whose dependencies are off, so after configuring we compare: every
//! `CONFIG_X=y` of the fragment must be `=y` in the final `.config` and every
//! `# CONFIG_X is not set` must be off; otherwise the build stops and names
//! the options that did not survive.

use std::collections::BTreeMap;

use nova_core::template::GuestArch;

/// The x86_64 config fragment text, as checked into `images/kernel/`.
pub const FRAGMENT: &str = include_str!("../../../../images/kernel/microvm-x86_64.config");
/// The arm64 config fragment text, as checked into `images/kernel/`.
pub const FRAGMENT_ARM64: &str = include_str!("../../../../images/kernel/microvm-arm64.config");

/// How the kernel of one guest architecture is configured and built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArchConfig {
    /// The guest architecture.
    pub arch: GuestArch,
    /// The fragment's text.
    pub fragment: &'static str,
    /// The fragment's path in the repository (for messages).
    pub fragment_path: &'static str,
    /// Options that must end up `=y`, whatever the fragment says.
    pub required: &'static [&'static str],
    /// Options the architecture itself selects (the fragment need not ask
    /// for them) that must still end up `=y`.
    pub selected: &'static [&'static str],
    /// Options that must end up off, whatever the fragment says.
    pub forbidden: &'static [&'static str],
    /// The kernel's `ARCH=`.
    pub make_arch: &'static str,
    /// `CROSS_COMPILE=` on an x86_64 build host (`None`: the host's gcc).
    pub cross_compile: Option<&'static str>,
    /// The `make` target that builds the bootable kernel.
    pub make_target: &'static str,
    /// Where that target leaves it, relative to the source tree.
    pub output: &'static str,
}

/// The x86_64 kernel: an uncompressed `vmlinux` with a PVH entry.
pub const X86_64: ArchConfig = ArchConfig {
    arch: GuestArch::X86_64,
    fragment: FRAGMENT,
    fragment_path: "images/kernel/microvm-x86_64.config",
    required: REQUIRED_OPTIONS,
    selected: &[],
    forbidden: FORBIDDEN_OPTIONS,
    make_arch: "x86_64",
    cross_compile: None,
    make_target: "vmlinux",
    output: "vmlinux",
};

/// The arm64 kernel: an uncompressed `Image`, cross-built with Debian's
/// `gcc-aarch64-linux-gnu`.
pub const ARM64: ArchConfig = ArchConfig {
    arch: GuestArch::Arm64,
    fragment: FRAGMENT_ARM64,
    fragment_path: "images/kernel/microvm-arm64.config",
    required: ARM64_REQUIRED_OPTIONS,
    selected: ARM64_SELECTED_OPTIONS,
    forbidden: ARM64_FORBIDDEN_OPTIONS,
    make_arch: "arm64",
    cross_compile: Some("aarch64-linux-gnu-"),
    make_target: "Image",
    output: "arch/arm64/boot/Image",
};

/// The build description of `arch`'s kernel.
pub fn for_arch(arch: GuestArch) -> &'static ArchConfig {
    match arch {
        GuestArch::X86_64 => &X86_64,
        GuestArch::Arm64 => &ARM64,
    }
}

/// A required-options list: the platform's own options, then what every
/// guest kernel needs whatever its architecture (64-bit virtio block, net,
/// vsock and console; the userspace ABI; cgroups and namespaces; seccomp;
/// the filesystems; IPv4/IPv6 and netfilter), written once here.
macro_rules! required_options {
    ($($platform:literal),* $(,)?) => {
        &[
            $($platform,)*
            "CONFIG_64BIT",
            "CONFIG_VIRTIO_MMIO",
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
            "CONFIG_PRINTK",
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
            "CONFIG_FUTEX",
            "CONFIG_EPOLL",
            "CONFIG_SIGNALFD",
            "CONFIG_TIMERFD",
            "CONFIG_EVENTFD",
            "CONFIG_INOTIFY_USER",
            "CONFIG_FILE_LOCKING",
            "CONFIG_PROC_FS",
            "CONFIG_SYSFS",
        ]
    };
}

/// The options the issue requires of every guest kernel (see the crate docs):
/// the fragment must ask for each, and the build verifies each ended up `=y`.
pub const REQUIRED_OPTIONS: &[&str] = required_options![
    "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES",
    "CONFIG_SERIAL_8250",
    "CONFIG_SERIAL_8250_CONSOLE",
    "CONFIG_PVH",
    "CONFIG_HYPERVISOR_GUEST",
    "CONFIG_PARAVIRT",
    "CONFIG_KVM_GUEST",
    "CONFIG_RANDOM_TRUST_CPU",
];

/// What the issue requires of the arm64 guest kernel: the same userspace
/// ABI, isolation, filesystems and networking as x86_64, on a device-tree
/// machine with a PL011 UART and virtio over both MMIO (QEMU `virt`) and
/// PCI (Apple Virtualization.framework).
pub const ARM64_REQUIRED_OPTIONS: &[&str] = required_options![
    "CONFIG_SMP",
    "CONFIG_ARM_PSCI_FW",
    "CONFIG_SERIAL_AMBA_PL011",
    "CONFIG_SERIAL_AMBA_PL011_CONSOLE",
    "CONFIG_PCI",
    "CONFIG_PCI_HOST_GENERIC",
    "CONFIG_VIRTIO_PCI",
    "CONFIG_VIRTIO_BALLOON",
];

/// What `ARCH=arm64` selects by itself and a `virt` or VZ guest needs: the
/// device tree, the GIC (v2 and v3) and the architected timer.
pub const ARM64_SELECTED_OPTIONS: &[&str] = &[
    "CONFIG_OF",
    "CONFIG_ARM_GIC",
    "CONFIG_ARM_GIC_V3",
    "CONFIG_ARM_ARCH_TIMER",
];

/// Options the arm64 kernel must not have: PCI is on (Virtualization.framework
/// needs it), the rest as on x86_64, plus 32-bit compat and the EFI stub
/// (the VMM loads the `Image` itself).
pub const ARM64_FORBIDDEN_OPTIONS: &[&str] = &[
    "CONFIG_MODULES",
    "CONFIG_BLK_DEV_INITRD",
    "CONFIG_DEBUG_INFO",
    "CONFIG_SOUND",
    "CONFIG_ACPI",
    "CONFIG_COMPAT",
    "CONFIG_EFI",
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

/// Compares the final x86_64 `.config` with the fragment (and
/// [`REQUIRED_OPTIONS`] / [`FORBIDDEN_OPTIONS`], which hold even if the
/// fragment forgets them).
pub fn verify(fragment: &str, final_config: &str) -> ConfigMismatch {
    verify_with(fragment, REQUIRED_OPTIONS, FORBIDDEN_OPTIONS, final_config)
}

/// Compares the final `.config` of `arch`'s kernel with its fragment and
/// its required, selected and forbidden options.
pub fn verify_arch(arch: &ArchConfig, final_config: &str) -> ConfigMismatch {
    let required: Vec<&str> = arch.required.iter().chain(arch.selected).copied().collect();
    verify_with(arch.fragment, &required, arch.forbidden, final_config)
}

/// Compares the final `.config` with `fragment`, `required` (must be `=y`)
/// and `forbidden` (must be off).
pub fn verify_with(
    fragment: &str,
    required: &[&str],
    forbidden: &[&str],
    final_config: &str,
) -> ConfigMismatch {
    let wanted = parse(fragment);
    let got = parse(final_config);
    let is = |name: &str, value: ConfigValue| got.get(name) == Some(&value);
    let is_on = |name: &str| matches!(got.get(name), Some(ConfigValue::Yes | ConfigValue::Module));

    let mut mismatch = ConfigMismatch::default();
    let required = wanted
        .iter()
        .filter(|(_, v)| **v == ConfigValue::Yes)
        .map(|(k, _)| k.as_str())
        .chain(required.iter().copied());
    for name in required {
        if !is(name, ConfigValue::Yes) && !mismatch.missing.iter().any(|m| m == name) {
            mismatch.missing.push(name.to_owned());
        }
    }
    let forbidden = wanted
        .iter()
        .filter(|(_, v)| **v == ConfigValue::NotSet)
        .map(|(k, _)| k.as_str())
        .chain(forbidden.iter().copied());
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
    fn each_arch_fragment_asks_for_its_options_and_builds_no_modules() {
        for arch in GuestArch::ALL {
            let config = for_arch(arch);
            assert_eq!(config.arch, arch);
            let fragment = parse(config.fragment);
            for name in config.required {
                assert_eq!(
                    fragment.get(*name),
                    Some(&ConfigValue::Yes),
                    "{arch}: {name}"
                );
            }
            for name in config.forbidden {
                assert_eq!(
                    fragment.get(*name),
                    Some(&ConfigValue::NotSet),
                    "{arch}: {name}"
                );
            }
            assert!(
                !fragment.values().any(|v| *v == ConfigValue::Module),
                "{arch}: no option may be built as a module"
            );
        }
    }

    #[test]
    fn the_arm64_fragment_has_the_x86_64_userspace_and_both_virtio_transports() {
        let x86 = parse(FRAGMENT);
        let arm = parse(FRAGMENT_ARM64);
        // Everything outside the platform (userspace ABI, isolation,
        // filesystems, networking, virtio devices) is asked for alike.
        let platform_only = [
            "CONFIG_X86_MPPARSE",
            "CONFIG_HYPERVISOR_GUEST",
            "CONFIG_PARAVIRT_SPINLOCKS",
            "CONFIG_KVM_GUEST",
            "CONFIG_PVH",
            "CONFIG_SERIAL_8250",
            "CONFIG_SERIAL_8250_CONSOLE",
            "CONFIG_SERIAL_8250_NR_UARTS",
            "CONFIG_SERIAL_8250_RUNTIME_UARTS",
            "CONFIG_PCI",
        ];
        let differing: Vec<_> = x86
            .iter()
            .filter(|(name, value)| {
                !platform_only.contains(&name.as_str()) && arm.get(*name) != Some(value)
            })
            .map(|(name, _)| name.as_str())
            .collect();
        assert!(differing.is_empty(), "arm64 differs in: {differing:?}");
        for name in [
            "CONFIG_VIRTIO_MMIO",
            "CONFIG_VIRTIO_PCI",
            "CONFIG_PCI_HOST_GENERIC",
        ] {
            assert_eq!(arm.get(name), Some(&ConfigValue::Yes), "{name}");
        }
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
