//! The VM a sandbox gets under Apple VZ, as plain data: [`VzMachineSpec`].
//!
//! The host side ([`crate::Vz`]) builds it from the sandbox's config and
//! template ([`SpecInput`]) and writes it as JSON into the sandbox
//! directory ([`SPEC_FILE`]); the helper process (`nova-vz-vmm`, macOS only)
//! reads it and turns it into a `VZVirtualMachineConfiguration` field by
//! field. Every decision is made here, where it is unit-tested on any host:
//!
//! | field | VZ object | guest sees |
//! |---|---|---|
//! | `kernel`, `cmdline` | `VZLinuxBootLoader` | an uncompressed arm64 `Image` |
//! | `memory_bytes` | `memorySize` (whole MiB, within VZ's bounds) | RAM |
//! | `cpus` | `CPUCount` (within VZ's bounds) | vCPUs |
//! | `disks[0]` | `VZVirtioBlockDeviceConfiguration`, read-only image | `/dev/vda` (template rootfs) |
//! | `disks[1]` | the same, writable | `/dev/vdb` (scratch for the overlay) |
//! | `agent_port` | `VZVirtioSocketDeviceConfiguration` | vsock port of the agent |
//! | `network` | `VZVirtioNetworkDeviceConfiguration` + `VZNATNetworkDeviceAttachment` | `eth0` |
//! | `balloon` | `VZVirtioTraditionalMemoryBalloonDeviceConfiguration` | virtio-balloon |
//! | (always) | `VZVirtioConsoleDeviceSerialPortConfiguration` on the helper's stdout, which the runtime caps into `console.log` | `hvc0` |
//! | `restore` | `restoreMachineStateFromURL:` (macOS 14+) instead of a cold start | — |
//!
//! The kernel command line follows the boot contract
//! ([`nova_protocol::boot::KernelCmdline`]): VZ's serial port is a virtio
//! console (`hvc0`), not a UART, so the contract's console is
//! [`GuestConsole::Off`] with `console=hvc0` added as the backend's word.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use nova_core::config::DriveConfig;
use nova_protocol::boot::{
    AGENT_VSOCK_PORT, GuestConsole, GuestNet, KernelArgsError, KernelCmdline, ListenAddr,
    NovaParams, SCRATCH_DEVICE,
};
use serde::{Deserialize, Serialize};

/// One mebibyte: VZ wants the memory size in whole MiB.
pub const MIB: u64 = 1024 * 1024;

/// The file in the sandbox directory that holds the helper's spec.
pub const SPEC_FILE: &str = "vz.json";

/// The guest's console device under VZ (a virtio console port).
pub const VZ_CONSOLE: &str = "hvc0";

/// The subnet of VZ's NAT (vmnet's shared mode) on a Mac left at its
/// defaults: the host is `.1`, which also answers DNS.
pub const NAT_SUBNET: Ipv4Addr = Ipv4Addr::new(192, 168, 64, 0);

/// The limits VZ puts on a Linux VM (`VZVirtualMachineConfiguration`'s
/// `minimumAllowed…`/`maximumAllowed…` class properties): asked of VZ on
/// macOS, given by hand in tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VzLimits {
    /// Smallest memory size, bytes.
    pub min_memory_bytes: u64,
    /// Largest memory size, bytes.
    pub max_memory_bytes: u64,
    /// Fewest vCPUs.
    pub min_cpus: u32,
    /// Most vCPUs.
    pub max_cpus: u32,
}

/// One virtio block device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VzDisk {
    /// The raw disk image on the host.
    pub path: PathBuf,
    /// Attached read-only.
    pub read_only: bool,
}

/// The guest's NIC on VZ's NAT.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VzNetwork {
    /// Its MAC address, `xx:xx:xx:xx:xx:xx`, locally administered.
    pub mac: String,
    /// What the guest configures (`nova.net=`).
    pub guest: VzGuestAddr,
}

/// The guest's static address on VZ's NAT (the agent has no DHCP client).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VzGuestAddr {
    /// The guest's address.
    pub addr: Ipv4Addr,
    /// The NAT's gateway (and resolver).
    pub gateway: Ipv4Addr,
}

/// Everything the helper needs to make and start one VM; see the module
/// docs for how each field maps onto VZ.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VzMachineSpec {
    /// The uncompressed arm64 kernel `Image`.
    pub kernel: PathBuf,
    /// The whole kernel command line.
    pub cmdline: String,
    /// Guest memory, bytes (a whole number of MiB).
    pub memory_bytes: u64,
    /// vCPUs.
    pub cpus: u32,
    /// Block devices in guest order: `/dev/vda`, `/dev/vdb`, ...
    pub disks: Vec<VzDisk>,
    /// The vsock port the agent listens on.
    pub agent_port: u32,
    /// The NIC, when the sandbox has a network.
    pub network: Option<VzNetwork>,
    /// Whether a memory balloon device is attached.
    pub balloon: bool,
    /// A saved machine state to restore instead of booting (macOS 14+).
    pub restore: Option<PathBuf>,
}

/// What [`VzMachineSpec::build`] is made from.
#[derive(Clone, Debug)]
pub struct SpecInput<'a> {
    /// The template's arm64 kernel.
    pub kernel: &'a Path,
    /// The template's rootfs (attached read-only).
    pub rootfs: &'a Path,
    /// The sandbox's scratch disk; `None` with a read-only root.
    pub scratch: Option<&'a Path>,
    /// More disks, in order.
    pub extra_drives: &'a [DriveConfig],
    /// Memory, MiB.
    pub memory_mb: u32,
    /// vCPUs.
    pub vcpus: u8,
    /// The user's `kernel_args`.
    pub kernel_args: &'a str,
    /// The guest's hostname (`nova.hostname=`).
    pub hostname: &'a str,
    /// The guest's NAT address, when it has a network.
    pub network: Option<VzGuestAddr>,
    /// A saved machine state to restore.
    pub restore: Option<&'a Path>,
}

/// The sandbox's config does not fit VZ.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VzSpecError {
    /// Memory outside VZ's bounds.
    #[error(
        "memory_mb = {memory_mb} is outside what Virtualization.framework allows on this Mac \
         ({min_mb}..={max_mb} MiB); pick a size in that range"
    )]
    Memory {
        /// What was asked.
        memory_mb: u32,
        /// VZ's floor, MiB.
        min_mb: u64,
        /// VZ's ceiling, MiB.
        max_mb: u64,
    },
    /// vCPUs outside VZ's bounds.
    #[error(
        "vcpus = {vcpus} is outside what Virtualization.framework allows on this Mac \
         ({min}..={max}); pick a count in that range"
    )]
    Cpus {
        /// What was asked.
        vcpus: u8,
        /// VZ's floor.
        min: u32,
        /// VZ's ceiling.
        max: u32,
    },
    /// The user's `kernel_args` break the boot contract.
    #[error(transparent)]
    KernelArgs(#[from] KernelArgsError),
}

impl VzMachineSpec {
    /// Builds the spec of one VM from `input`, checked against `limits`.
    ///
    /// # Errors
    ///
    /// [`VzSpecError`] when memory or vCPUs are outside `limits`, or the
    /// `kernel_args` break the boot contract.
    pub fn build(input: &SpecInput<'_>, limits: &VzLimits) -> Result<Self, VzSpecError> {
        let memory_bytes = u64::from(input.memory_mb) * MIB;
        if memory_bytes < limits.min_memory_bytes || memory_bytes > limits.max_memory_bytes {
            return Err(VzSpecError::Memory {
                memory_mb: input.memory_mb,
                min_mb: limits.min_memory_bytes.div_ceil(MIB),
                max_mb: limits.max_memory_bytes / MIB,
            });
        }
        let cpus = u32::from(input.vcpus);
        if cpus < limits.min_cpus || cpus > limits.max_cpus {
            return Err(VzSpecError::Cpus {
                vcpus: input.vcpus,
                min: limits.min_cpus,
                max: limits.max_cpus,
            });
        }
        let mut disks = vec![VzDisk {
            path: input.rootfs.to_owned(),
            read_only: true,
        }];
        disks.extend(input.scratch.map(|path| VzDisk {
            path: path.to_owned(),
            read_only: false,
        }));
        disks.extend(input.extra_drives.iter().map(|d| VzDisk {
            path: d.path.clone(),
            read_only: d.read_only,
        }));
        let cmdline = boot_cmdline(input).assemble(input.kernel_args)?;
        Ok(Self {
            kernel: input.kernel.to_owned(),
            cmdline,
            memory_bytes,
            cpus,
            disks,
            agent_port: AGENT_VSOCK_PORT,
            network: input.network.map(|guest| VzNetwork {
                mac: guest_mac(input.hostname),
                guest,
            }),
            balloon: true,
            restore: input.restore.map(ToOwned::to_owned),
        })
    }
}

/// The boot contract's view of a VZ guest: no UART (`console=hvc0`
/// instead), the agent on vsock, the overlay on the scratch disk, and the
/// NAT address.
fn boot_cmdline(input: &SpecInput<'_>) -> KernelCmdline {
    KernelCmdline {
        console: GuestConsole::Off,
        params: NovaParams {
            hostname: Some(input.hostname.to_owned()),
            overlay: input.scratch.map(|_| SCRATCH_DEVICE.to_owned()),
            listen: vec![ListenAddr::Vsock(AGENT_VSOCK_PORT)],
            net: input.network.map(|n| GuestNet {
                addr: n.addr,
                prefix: 24,
                gateway: n.gateway,
                mtu: None,
                dns: vec![n.gateway],
            }),
            ..NovaParams::default()
        },
        extra: vec![format!("console={VZ_CONSOLE}")],
    }
}

/// Where the VM's platform identifier is kept next to saved state `state`
/// (`vz.state` -> `vz.machine-id`): VZ restores a state only into a VM with
/// the identifier it was saved from.
pub fn machine_id_path(state: &Path) -> PathBuf {
    state.with_extension("machine-id")
}

/// The guest's address on VZ's NAT for sandbox `id`: in the default
/// shared subnet ([`NAT_SUBNET`]), host part 100..=253 from a hash of the
/// id (vmnet's DHCP hands out the low addresses first). Two live sandboxes
/// can draw the same address; see the crate docs.
pub fn nat_guest_addr(id: &str) -> VzGuestAddr {
    let [a, b, c, _] = NAT_SUBNET.octets();
    let host = 100 + (fnv1a(id) % 154) as u8;
    VzGuestAddr {
        addr: Ipv4Addr::new(a, b, c, host),
        gateway: Ipv4Addr::new(a, b, c, 1),
    }
}

/// A locally administered, unicast MAC from a hash of `seed`.
pub fn guest_mac(seed: &str) -> String {
    let h = fnv1a(seed).to_be_bytes();
    format!(
        "02:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        h[3], h[4], h[5], h[6], h[7]
    )
}

/// FNV-1a, 64 bits: stable across builds and hosts, unlike std's hasher.
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: VzLimits = VzLimits {
        min_memory_bytes: 128 * MIB,
        max_memory_bytes: 16 * 1024 * MIB,
        min_cpus: 1,
        max_cpus: 8,
    };

    fn input<'a>(extra: &'a [DriveConfig]) -> SpecInput<'a> {
        SpecInput {
            kernel: Path::new("/t/Image"),
            rootfs: Path::new("/t/rootfs.ext4"),
            scratch: Some(Path::new("/s/scratch.ext4")),
            extra_drives: extra,
            memory_mb: 512,
            vcpus: 2,
            kernel_args: "panic=1 quiet",
            hostname: "sb-1",
            network: None,
            restore: None,
        }
    }

    #[test]
    fn maps_config_onto_vz_devices_in_guest_order() {
        let extra = [DriveConfig::read_only("/data/ref.img")];
        let spec = VzMachineSpec::build(&input(&extra), &LIMITS).unwrap();
        assert_eq!(spec.memory_bytes, 512 * MIB);
        assert_eq!(spec.cpus, 2);
        assert_eq!(spec.agent_port, AGENT_VSOCK_PORT);
        assert!(spec.balloon);
        assert_eq!(spec.network, None);
        let disks: Vec<(&str, bool)> = spec
            .disks
            .iter()
            .map(|d| (d.path.to_str().unwrap(), d.read_only))
            .collect();
        assert_eq!(
            disks,
            [
                ("/t/rootfs.ext4", true),
                ("/s/scratch.ext4", false),
                ("/data/ref.img", true)
            ]
        );
    }

    #[test]
    fn cmdline_uses_the_virtio_console_vsock_and_the_overlay() {
        let spec = VzMachineSpec::build(&input(&[]), &LIMITS).unwrap();
        assert_eq!(
            spec.cmdline,
            "panic=1 quiet reboot=k 8250.nr_uarts=0 root=/dev/vda rootfstype=ext4 ro \
             init=/sbin/nova-agent nova.hostname=sb-1 nova.overlay=/dev/vdb \
             nova.listen=vsock:1024 console=hvc0"
        );
        let parsed = NovaParams::parse(&spec.cmdline).unwrap();
        assert_eq!(parsed.listen_or_default(), [ListenAddr::Vsock(1024)]);
    }

    #[test]
    fn read_only_root_has_no_scratch_disk_and_no_overlay() {
        let spec = VzMachineSpec::build(
            &SpecInput {
                scratch: None,
                ..input(&[])
            },
            &LIMITS,
        )
        .unwrap();
        assert_eq!(spec.disks.len(), 1);
        assert!(!spec.cmdline.contains("nova.overlay"), "{}", spec.cmdline);
    }

    #[test]
    fn memory_and_cpus_outside_vz_limits_say_the_range() {
        let e = VzMachineSpec::build(
            &SpecInput {
                memory_mb: 64,
                ..input(&[])
            },
            &LIMITS,
        )
        .unwrap_err();
        assert!(
            matches!(
                e,
                VzSpecError::Memory {
                    min_mb: 128,
                    max_mb: 16384,
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("128..=16384 MiB"), "{e}");
        let e = VzMachineSpec::build(
            &SpecInput {
                vcpus: 9,
                ..input(&[])
            },
            &LIMITS,
        )
        .unwrap_err();
        assert!(
            matches!(
                e,
                VzSpecError::Cpus {
                    vcpus: 9,
                    min: 1,
                    max: 8
                }
            ),
            "{e:?}"
        );
    }

    #[test]
    fn user_console_words_are_refused_by_the_boot_contract() {
        let e = VzMachineSpec::build(
            &SpecInput {
                kernel_args: "init=/bin/sh",
                ..input(&[])
            },
            &LIMITS,
        )
        .unwrap_err();
        assert!(
            matches!(e, VzSpecError::KernelArgs(KernelArgsError::Reserved { .. })),
            "{e:?}"
        );
    }

    #[test]
    fn network_gets_a_nat_address_a_mac_and_nova_net() {
        let addr = nat_guest_addr("sb-1");
        let spec = VzMachineSpec::build(
            &SpecInput {
                network: Some(addr),
                ..input(&[])
            },
            &LIMITS,
        )
        .unwrap();
        let net = spec.network.as_ref().unwrap();
        assert_eq!(net.guest, addr);
        assert_eq!(addr.gateway, Ipv4Addr::new(192, 168, 64, 1));
        assert!((100..=253).contains(&addr.addr.octets()[3]), "{addr:?}");
        let parsed = NovaParams::parse(&spec.cmdline).unwrap();
        let guest = parsed.net.unwrap();
        assert_eq!(
            (guest.addr, guest.prefix, guest.gateway),
            (addr.addr, 24, addr.gateway)
        );
        assert_eq!(guest.dns, [addr.gateway]);
    }

    #[test]
    fn macs_are_unicast_locally_administered_and_stable() {
        let mac = guest_mac("sb-1");
        assert_eq!(mac, guest_mac("sb-1"));
        assert_ne!(mac, guest_mac("sb-2"));
        let first = u8::from_str_radix(&mac[..2], 16).unwrap();
        assert_eq!(first & 0b11, 0b10, "{mac}");
        assert_eq!(mac.len(), 17);
    }

    #[test]
    fn the_machine_identifier_sits_next_to_the_state() {
        assert_eq!(
            machine_id_path(Path::new("/snap/vz.state")),
            Path::new("/snap/vz.machine-id")
        );
    }

    #[test]
    fn spec_round_trips_through_json() {
        let spec = VzMachineSpec::build(&input(&[]), &LIMITS).unwrap();
        let text = serde_json::to_string(&spec).unwrap();
        assert_eq!(serde_json::from_str::<VzMachineSpec>(&text).unwrap(), spec);
    }
}
