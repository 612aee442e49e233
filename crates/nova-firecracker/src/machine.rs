//! A sandbox's VM as Firecracker sees it, and the requests that configure
//! it.
//!
//! [`MachineSpec`] holds every path *as the VMM sees it*: per-sandbox files
//! are relative to the VMM's working directory (see [`crate::process`]),
//! shared template files are absolute (or, in a jail, linked into it).
//! [`MachineSpec::configure`] sends the whole configuration in a fixed order
//! (logger and metrics first, so a refused request is logged), leaving the
//! VM ready for `InstanceStart`.
//!
//! Guest block device names follow the order drives are added: the shared
//! read-only rootfs is [`boot::ROOT_DEVICE`], the sandbox's scratch disk
//! [`boot::SCRATCH_DEVICE`], extra drives after. The kernel command line is
//! assembled by the boot contract ([`nova_protocol::boot`]): the config's
//! `kernel_args`, then `reboot=k` if absent (a reboot is how a Firecracker
//! guest ends its VM), `8250.nr_uarts=0` unless a serial console was asked
//! for (the UART costs boot time), and the root device, init and agent
//! parameters.

use nova_protocol::boot::{
    self, GuestConsole, GuestNet, KernelArgsError, KernelCmdline, NovaParams,
};

use crate::api::{
    ApiClient, ApiError, Balloon, BootSource, Drive, EntropyDevice, LogLevel, Logger,
    MachineConfig, Metrics, NetworkInterface, Vsock,
};

/// Drive id of the root filesystem.
pub const ROOT_DRIVE_ID: &str = "rootfs";
/// Drive id of the scratch disk.
pub const SCRATCH_DRIVE_ID: &str = "scratch";
/// The guest's vsock context id (each VM has its own vsock device, so every
/// guest can use the same one).
pub const GUEST_CID: u32 = 3;
/// Vsock socket name in the VMM's working directory.
pub const VSOCK_SOCKET: &str = "vsock.sock";
/// Scratch disk name in the VMM's working directory.
pub const SCRATCH_FILE: &str = "scratch.ext4";
/// Metrics file name in the VMM's working directory.
pub const METRICS_FILE: &str = "metrics.json";
/// The id of the guest's network interface (`PUT /network-interfaces/eth0`).
pub const GUEST_IFACE: &str = "eth0";
/// The guest NIC's MAC address, the same in every sandbox (each guest is
/// alone on its link, in its own namespace) and the same as QEMU's, so a
/// guest's view of its network does not depend on the sandbox.
pub const GUEST_MAC: &str = "52:54:00:4e:4f:56";
/// Log file name in the VMM's working directory.
pub const LOG_FILE: &str = "vmm.log";

/// An extra block device, after root and scratch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExtraDrive {
    /// Backing file as the VMM sees it.
    pub path: String,
    /// Attach read-only.
    pub read_only: bool,
}

/// The `PUT /network-interfaces/eth0` body for the tap `tap` (a sandbox
/// network's, which Firecracker opens by name in the namespace it runs in).
pub fn network_interface(tap: &str) -> NetworkInterface {
    NetworkInterface {
        iface_id: GUEST_IFACE.to_owned(),
        host_dev_name: tap.to_owned(),
        guest_mac: Some(GUEST_MAC.to_owned()),
        mtu: None,
        rx_rate_limiter: None,
        tx_rate_limiter: None,
    }
}

/// One VM's whole configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MachineSpec {
    /// Guest kernel (`vmlinux`).
    pub kernel: String,
    /// Root filesystem, attached read-only.
    pub rootfs: String,
    /// Scratch disk for the writable overlay; `None` for a read-only root.
    pub scratch: Option<String>,
    /// Extra drives.
    pub extra_drives: Vec<ExtraDrive>,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// vCPUs.
    pub vcpus: u8,
    /// The user part of the kernel command line.
    pub kernel_args: String,
    /// Guest hostname (the sandbox id).
    pub hostname: String,
    /// Keep the serial console (written to the VMM's stdout).
    pub serial_console: bool,
    /// Track dirty pages, for diff snapshots.
    pub track_dirty_pages: bool,
    /// Hybrid vsock socket.
    pub vsock_uds: String,
    /// Metrics file, if metrics are wanted.
    pub metrics_path: Option<String>,
    /// Log file, if a log is wanted.
    pub log_path: Option<String>,
    /// Log level.
    pub log_level: LogLevel,
    /// Attach a virtio-rng device.
    pub entropy: bool,
    /// Attach a memory balloon.
    pub balloon: Option<Balloon>,
    /// Network interfaces (set up by the networking layer).
    pub network: Vec<NetworkInterface>,
    /// What the agent configures on `eth0` (`nova.net=`), with a network.
    pub guest_net: Option<GuestNet>,
}

impl MachineSpec {
    /// The boot contract's view of this VM: a serial console if asked for,
    /// the hostname, and the overlay when there is a scratch disk.
    pub fn boot_cmdline(&self) -> KernelCmdline {
        KernelCmdline {
            console: if self.serial_console {
                GuestConsole::Serial
            } else {
                GuestConsole::Off
            },
            params: NovaParams {
                hostname: Some(self.hostname.clone()),
                overlay: self
                    .scratch
                    .as_ref()
                    .map(|_| boot::SCRATCH_DEVICE.to_owned()),
                net: self.guest_net.clone(),
                ..NovaParams::default()
            },
            extra: Vec::new(),
        }
    }

    /// The full guest kernel command line: the user's `kernel_args` checked
    /// against the boot contract and assembled with what this provider owns
    /// (see [`KernelCmdline::assemble`]).
    pub fn kernel_cmdline(&self) -> Result<String, KernelArgsError> {
        self.boot_cmdline().assemble(&self.kernel_args)
    }

    /// `PUT /machine-config`.
    pub fn machine_config(&self) -> MachineConfig {
        let mut config = MachineConfig::new(self.vcpus, self.memory_mib);
        if self.track_dirty_pages {
            config.track_dirty_pages = Some(true);
        }
        config
    }

    /// `PUT /boot-source`; fails when the user's `kernel_args` break the
    /// boot contract.
    pub fn boot_source(&self) -> Result<BootSource, KernelArgsError> {
        Ok(BootSource {
            kernel_image_path: self.kernel.clone(),
            boot_args: Some(self.kernel_cmdline()?),
            initrd_path: None,
        })
    }

    /// Every `PUT /drives/…`, in guest order.
    pub fn drives(&self) -> Vec<Drive> {
        let mut drives = vec![Drive::new(ROOT_DRIVE_ID, &self.rootfs, true, true)];
        if let Some(scratch) = &self.scratch {
            drives.push(Drive::new(SCRATCH_DRIVE_ID, scratch, false, false));
        }
        for (i, extra) in self.extra_drives.iter().enumerate() {
            drives.push(Drive::new(
                format!("extra{i}"),
                &extra.path,
                false,
                extra.read_only,
            ));
        }
        drives
    }

    /// `PUT /vsock`.
    pub fn vsock(&self) -> Vsock {
        Vsock {
            guest_cid: GUEST_CID,
            uds_path: self.vsock_uds.clone(),
        }
    }

    /// `PUT /logger`, if a log is wanted.
    pub fn logger(&self) -> Option<Logger> {
        self.log_path.as_ref().map(|path| Logger {
            log_path: Some(path.clone()),
            level: Some(self.log_level),
            show_level: Some(true),
            show_log_origin: None,
            module: None,
        })
    }

    /// `PUT /metrics`, if metrics are wanted.
    pub fn metrics(&self) -> Option<Metrics> {
        self.metrics_path.as_ref().map(|path| Metrics {
            metrics_path: path.clone(),
        })
    }

    /// Sends the logger and metrics configuration (also legal before a
    /// snapshot load).
    pub async fn configure_observability(&self, client: &mut ApiClient) -> Result<(), ApiError> {
        if let Some(logger) = self.logger() {
            client.put_logger(&logger).await?;
        }
        if let Some(metrics) = self.metrics() {
            client.put_metrics(&metrics).await?;
        }
        Ok(())
    }

    /// Sends the whole configuration; the VM is then ready for
    /// `InstanceStart`. A kernel command line that breaks the boot contract
    /// is [`ApiError::BootArgs`], found before anything is sent.
    pub async fn configure(&self, client: &mut ApiClient) -> Result<(), ApiError> {
        let boot_source = self.boot_source()?;
        self.configure_observability(client).await?;
        client.put_machine_config(&self.machine_config()).await?;
        client.put_boot_source(&boot_source).await?;
        for drive in self.drives() {
            client.put_drive(&drive).await?;
        }
        client.put_vsock(&self.vsock()).await?;
        if self.entropy {
            client.put_entropy(&EntropyDevice::default()).await?;
        }
        if let Some(balloon) = &self.balloon {
            client.put_balloon(balloon).await?;
        }
        for iface in &self.network {
            client.put_network_interface(iface).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn spec() -> MachineSpec {
        MachineSpec {
            kernel: "/n/templates/python/vmlinux".into(),
            rootfs: "/n/templates/python/rootfs.ext4".into(),
            scratch: Some(SCRATCH_FILE.into()),
            extra_drives: vec![ExtraDrive {
                path: "/data/ref.img".into(),
                read_only: true,
            }],
            memory_mib: 512,
            vcpus: 2,
            kernel_args: nova_core::config::DEFAULT_KERNEL_ARGS.into(),
            hostname: "sb-1".into(),
            serial_console: false,
            track_dirty_pages: false,
            vsock_uds: VSOCK_SOCKET.into(),
            metrics_path: Some(METRICS_FILE.into()),
            log_path: Some(LOG_FILE.into()),
            log_level: LogLevel::Warning,
            entropy: true,
            balloon: None,
            network: Vec::new(),
            guest_net: None,
        }
    }

    #[test]
    fn a_network_is_eth0_on_the_tap_and_nova_net_for_the_agent() {
        let iface = network_interface("tap0");
        assert_eq!(
            serde_json::to_value(&iface).unwrap(),
            serde_json::json!({"iface_id": "eth0", "host_dev_name": "tap0",
                               "guest_mac": "52:54:00:4e:4f:56"})
        );
        let mut spec = spec();
        assert!(!spec.kernel_cmdline().unwrap().contains("nova.net="));
        spec.guest_net = Some(
            "169.254.0.21/30,gw=169.254.0.22,mtu=1500,dns=10.0.0.2"
                .parse()
                .unwrap(),
        );
        let cmdline = spec.kernel_cmdline().unwrap();
        assert!(
            cmdline.contains(" nova.net=169.254.0.21/30,gw=169.254.0.22,mtu=1500,dns=10.0.0.2"),
            "{cmdline}"
        );
    }

    #[test]
    fn kernel_cmdline_defaults_to_no_serial_console() {
        let cmdline = spec().kernel_cmdline().unwrap();
        assert!(cmdline.starts_with("reboot=k panic=1 pci=off"), "{cmdline}");
        assert!(cmdline.ends_with(
            " 8250.nr_uarts=0 root=/dev/vda rootfstype=ext4 ro init=/sbin/nova-agent \
             nova.hostname=sb-1 nova.overlay=/dev/vdb"
        ));
        assert!(!cmdline.contains("console="), "{cmdline}");
        assert_eq!(cmdline.matches("reboot=").count(), 1);
    }

    #[test]
    fn kernel_cmdline_with_console_read_only_root_and_custom_args() {
        let mut s = spec();
        s.serial_console = true;
        s.scratch = None;
        s.kernel_args = "quiet".into();
        assert_eq!(
            s.kernel_cmdline().unwrap(),
            "console=ttyS0 quiet reboot=k root=/dev/vda rootfstype=ext4 ro \
             init=/sbin/nova-agent nova.hostname=sb-1"
        );
        // A console the user chose is kept, and the UART is not silenced.
        s.serial_console = false;
        s.kernel_args = "console=ttyS0 reboot=k".into();
        let c = s.kernel_cmdline().unwrap();
        assert!(c.starts_with("console=ttyS0 reboot=k root="), "{c}");
    }

    #[test]
    fn kernel_args_that_break_the_contract_are_refused_before_anything_is_sent() {
        let mut s = spec();
        s.kernel_args = "console=ttyS0 reboot=t".into();
        assert!(matches!(
            s.kernel_cmdline(),
            Err(KernelArgsError::Reboot { .. })
        ));
        s.serial_console = true;
        s.kernel_args = "console=hvc0".into();
        assert!(matches!(
            s.boot_source(),
            Err(KernelArgsError::ConsoleConflict { .. })
        ));
    }

    #[test]
    fn what_firecracker_is_given_is_what_the_agent_reads() {
        let boot = spec().boot_source().unwrap();
        let params = NovaParams::parse(boot.boot_args.as_deref().unwrap()).unwrap();
        assert_eq!(params.hostname_or_default(), "sb-1");
        // The overlay names the second drive, which is the scratch disk.
        assert_eq!(params.overlay.as_deref(), Some(boot::SCRATCH_DEVICE));
        assert_eq!(spec().drives()[1].drive_id, SCRATCH_DRIVE_ID);
        // The agent's default listeners include the vsock port the host dials.
        assert!(
            params
                .listen_or_default()
                .contains(&boot::ListenAddr::Vsock(crate::vsock::AGENT_VSOCK_PORT))
        );
    }

    #[test]
    fn drives_in_guest_order() {
        let drives: Vec<serde_json::Value> = spec()
            .drives()
            .iter()
            .map(|d| serde_json::to_value(d).unwrap())
            .collect();
        assert_eq!(
            drives,
            [
                json!({"drive_id": "rootfs", "path_on_host": "/n/templates/python/rootfs.ext4",
                       "is_root_device": true, "is_read_only": true}),
                json!({"drive_id": "scratch", "path_on_host": "scratch.ext4",
                       "is_root_device": false, "is_read_only": false}),
                json!({"drive_id": "extra0", "path_on_host": "/data/ref.img",
                       "is_root_device": false, "is_read_only": true}),
            ]
        );
    }

    #[test]
    fn resource_bodies() {
        let mut s = spec();
        assert_eq!(
            serde_json::to_value(s.machine_config()).unwrap(),
            json!({"vcpu_count": 2, "mem_size_mib": 512})
        );
        s.track_dirty_pages = true;
        assert_eq!(s.machine_config().track_dirty_pages, Some(true));
        assert_eq!(
            serde_json::to_value(s.vsock()).unwrap(),
            json!({"guest_cid": 3, "uds_path": "vsock.sock"})
        );
        assert_eq!(
            serde_json::to_value(s.logger().unwrap()).unwrap(),
            json!({"log_path": "vmm.log", "level": "Warning", "show_level": true})
        );
        assert_eq!(
            serde_json::to_value(s.metrics().unwrap()).unwrap(),
            json!({"metrics_path": "metrics.json"})
        );
        let boot = serde_json::to_value(s.boot_source().unwrap()).unwrap();
        assert_eq!(boot["kernel_image_path"], "/n/templates/python/vmlinux");
        assert!(
            boot["boot_args"]
                .as_str()
                .unwrap()
                .contains("init=/sbin/nova-agent")
        );
        s.log_path = None;
        s.metrics_path = None;
        assert!(s.logger().is_none() && s.metrics().is_none());
    }
}
