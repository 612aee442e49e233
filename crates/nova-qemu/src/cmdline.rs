//! The QEMU command line and the guest kernel command line of one sandbox.
//!
//! QEMU takes its whole VM configuration on the command line, so this module
//! is where a [`VmSpec`] becomes arguments. For an x86_64 guest the machine
//! is `microvm` with ACPI off: QEMU then lists every virtio-mmio device on
//! the kernel command line itself, and the guest needs neither PCI nor ACPI.
//! For an arm64 guest ([`GuestArch::Arm64`], run by `qemu-system-aarch64`)
//! it is `virt`, whose device tree lists the same virtio-mmio devices, with
//! the console on its PL011 UART ([`boot::PL011_CONSOLE`]). Disks are attached
//! in a fixed order, which fixes their guest names: the shared read-only
//! rootfs is [`boot::ROOT_DEVICE`], the sandbox's scratch disk
//! [`boot::SCRATCH_DEVICE`], extra drives follow. The agent channel is a
//! virtio-serial port named [`boot::AGENT_SERIAL_PORT`] whose host end is a
//! Unix socket QEMU listens on. The guest kernel command line is assembled
//! by the boot contract ([`nova_protocol::boot`]) with a serial console
//! (QEMU writes it to its stdout, which the runtime caps into the
//! sandbox's `console.log`). With a network, the guest's NIC is a
//! virtio-net device on the sandbox's tap, which QEMU inherits as an open
//! descriptor (`-netdev tap,fd=N`: it needs no privilege to attach it), and
//! the guest learns its addresses from `nova.net=`. QEMU runs confined ([`Confinement`]: seccomp,
//! and a privilege drop when nova is root), which works because every file
//! and socket a sandbox uses is named here and opened by QEMU at startup.

use std::ffi::OsString;
use std::os::fd::RawFd;
use std::path::PathBuf;

use nova_core::config::DriveConfig;
use nova_core::template::GuestArch;
use nova_protocol::boot::{
    self, GuestConsole, GuestNet, KernelArgsError, KernelCmdline, NovaParams,
};
use nova_runtime::host::Accel;

use crate::confinement::Confinement;

/// Everything needed to start one sandbox's VM.
#[derive(Clone, Debug)]
pub struct VmSpec {
    /// The guest's architecture: picks the machine, CPU and console (the
    /// caller picks the matching QEMU binary).
    pub arch: GuestArch,
    /// Guest kernel (x86_64: uncompressed `vmlinux` with a PVH entry;
    /// arm64: uncompressed `Image`).
    pub kernel: PathBuf,
    /// Root filesystem image, attached read-only.
    pub rootfs: PathBuf,
    /// The sandbox's writable scratch disk; `None` for a read-only root.
    pub scratch: Option<PathBuf>,
    /// Extra drives, after the scratch disk.
    pub extra_drives: Vec<DriveConfig>,
    /// Guest memory in MiB.
    pub memory_mb: u32,
    /// vCPU count.
    pub vcpus: u8,
    /// KVM or TCG.
    pub accel: Accel,
    /// QMP socket QEMU listens on.
    pub qmp_socket: PathBuf,
    /// Agent channel socket QEMU listens on.
    pub agent_socket: PathBuf,
    /// The user part of the kernel command line.
    pub kernel_args: String,
    /// Guest hostname.
    pub hostname: String,
    /// The host TSC rate in kHz, given to emulated guests as
    /// `tsc_early_khz=` so they need not calibrate it (see
    /// [`nova_runtime::host::host_cpu_khz`]).
    pub tsc_khz: Option<u64>,
    /// Seccomp and privilege drop (see [`crate::confinement`]); normally
    /// [`Confinement::for_host`].
    pub confinement: Confinement,
    /// The sandbox's own uid and gid, when the confinement drops QEMU to one
    /// per sandbox.
    pub run_as_ids: Option<(u32, u32)>,
    /// Start paused, waiting for a saved VM state (`-incoming defer`), which
    /// [`crate::qmp::QmpClient::load_from`] then loads.
    pub incoming: bool,
    /// The guest's network, if it has one.
    pub net: Option<VmNet>,
    /// Where the guest's RAM lives.
    pub memory: GuestMemory,
}

/// Where a guest's RAM lives, which decides how a snapshot saves it and how
/// a restore loads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuestMemory {
    /// Anonymous memory (QEMU's default): a snapshot streams all of it
    /// into its VM state file.
    Anonymous,
    /// A memfd QEMU maps shared (`memory-backend-memfd,share=on`): every
    /// guest write lands in it, so a snapshot copies it (QEMU's descriptor,
    /// through `/proc/PID/fd`) and its VM state stream carries the devices
    /// only (`x-ignore-shared`). A cold boot's RAM. Being shmem, it costs a
    /// boot nothing over anonymous memory (a shared file on a disk
    /// filesystem made cold boots ~20 % slower: every first write allocated
    /// a block), and it goes with QEMU: nothing to remove.
    SharedMemfd,
    /// A snapshot's memory file mapped private, copy-on-write
    /// (`share=off`): the guest reads the file's pages (one page cache for
    /// every sandbox restored from it) and its writes go to private pages,
    /// never to the file.
    PrivateFile(PathBuf),
}

/// The QEMU object id of the guest RAM backend of a guest of `arch`: the
/// machine's own `default-ram-id` (`query-machines`), the name plain `-m`
/// gives its RAM. The migration stream names RAM blocks by it, so with it a
/// state saved from a VM with a memory file loads into a VM without one and
/// back (a snapshot of a restored sandbox; a snapshot made before memory
/// files).
fn ram_backend_id(arch: GuestArch) -> &'static str {
    match arch {
        GuestArch::X86_64 => "microvm.ram",
        GuestArch::Arm64 => "mach-virt.ram",
    }
}

/// The MAC address of every guest's NIC: each guest is alone on its link
/// (in its own network namespace), so they need not differ.
pub const GUEST_MAC: &str = "52:54:00:4e:4f:56";

/// A guest NIC on a descriptor QEMU inherits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmNet {
    /// The descriptor's number in QEMU.
    pub fd: RawFd,
    /// What the descriptor is.
    pub transport: NetTransport,
    /// What the guest configures (`nova.net=`).
    pub guest: GuestNet,
}

/// What a [`VmNet`]'s descriptor is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetTransport {
    /// The sandbox's tap (namespace mode): `-netdev tap,fd=N`.
    Tap,
    /// A stream socket connected to passt (user mode):
    /// `-netdev stream,addr.type=fd,addr.str=N` (QEMU 7.2 and later).
    Stream,
}

impl VmSpec {
    /// The boot contract's view of this VM: a serial console (the 8250's
    /// `ttyS0` on x86_64, the PL011's `ttyAMA0` on arm64), the hostname, the
    /// overlay when there is a scratch disk, and `tsc_early_khz=` for an
    /// emulated x86_64 guest.
    pub fn boot_cmdline(&self) -> KernelCmdline {
        KernelCmdline {
            console: match self.arch {
                GuestArch::X86_64 => GuestConsole::Serial,
                GuestArch::Arm64 => GuestConsole::Pl011,
            },
            params: NovaParams {
                hostname: Some(self.hostname.clone()),
                overlay: self
                    .scratch
                    .as_ref()
                    .map(|_| boot::SCRATCH_DEVICE.to_owned()),
                net: self.net.as_ref().map(|n| n.guest.clone()),
                ..NovaParams::default()
            },
            extra: self
                .tsc_khz
                .filter(|_| self.arch == GuestArch::X86_64)
                .map(|khz| format!("tsc_early_khz={khz}"))
                .into_iter()
                .collect(),
        }
    }

    /// The full guest kernel command line: the user's `kernel_args` checked
    /// against the boot contract and assembled with what this provider owns
    /// (see [`KernelCmdline::assemble`]).
    pub fn kernel_cmdline(&self) -> Result<String, KernelArgsError> {
        self.boot_cmdline().assemble(&self.kernel_args)
    }

    /// QEMU's arguments (without the program name); fails when the user's
    /// `kernel_args` break the boot contract.
    pub fn try_qemu_args(&self) -> Result<Vec<OsString>, KernelArgsError> {
        Ok(self.args_with_cmdline(self.kernel_cmdline()?))
    }

    fn args_with_cmdline(&self, cmdline: String) -> Vec<OsString> {
        let mut args: Vec<OsString> = Vec::new();
        let mut push = |a: &str| args.push(a.into());
        // The machine: microvm without ACPI (devices on the kernel command
        // line), no option ROMs; or, for arm64, `virt` with a GICv3 (more
        // than 8 vCPUs) and its devices in the device tree. Either exits
        // instead of rebooting.
        push("-M");
        match self.memory {
            GuestMemory::Anonymous => push(machine(self.arch)),
            GuestMemory::SharedMemfd | GuestMemory::PrivateFile(_) => push(&format!(
                "{},memory-backend={}",
                machine(self.arch),
                ram_backend_id(self.arch)
            )),
        }
        push("-nodefaults");
        push("-no-user-config");
        push("-nographic");
        push("-no-reboot");
        args.extend(self.confinement.qemu_args(self.run_as_ids));
        let mut push = |a: &str| args.push(a.into());
        match self.accel {
            Accel::Kvm => {
                push("-accel");
                push("kvm");
                push("-cpu");
                push("host");
            }
            Accel::Tcg => {
                push("-accel");
                push("tcg");
                push("-cpu");
                // `max` with QEMU's own pointer-authentication algorithm:
                // the architected one costs much time under emulation.
                push(match self.arch {
                    GuestArch::X86_64 => "max",
                    GuestArch::Arm64 => "max,pauth-impdef=on",
                });
            }
        }
        push("-m");
        push(&format!("{}M", self.memory_mb));
        push("-smp");
        push(&self.vcpus.to_string());
        match &self.memory {
            GuestMemory::Anonymous => {}
            GuestMemory::SharedMemfd => {
                push("-object");
                push(&format!(
                    "memory-backend-memfd,id={},size={}M,share=on",
                    ram_backend_id(self.arch),
                    self.memory_mb,
                ));
            }
            GuestMemory::PrivateFile(path) => {
                push("-object");
                push(&format!(
                    "memory-backend-file,id={},size={}M,mem-path={},share=off",
                    ram_backend_id(self.arch),
                    self.memory_mb,
                    escape(path),
                ));
            }
        }
        push("-kernel");
        args.push(self.kernel.clone().into());
        let mut push = |a: &str| args.push(a.into());
        push("-append");
        push(&cmdline);
        // Serial console on QEMU's stdout, which the runtime caps into the
        // sandbox's console.log.
        push("-chardev");
        push("stdio,id=console,signal=off");
        push("-serial");
        push("chardev:console");
        // Control socket.
        push("-qmp");
        push(&format!(
            "unix:{},server=on,wait=off",
            escape(&self.qmp_socket)
        ));
        // Disks: root (read-only), scratch, extras, in guest order. On
        // `virt` the guest probes the virtio-mmio transports in the reverse
        // of their order on the command line (the first `-device` lands on
        // the highest address, and Linux probes from the lowest), so there
        // the disks are given last to first.
        let mut disks: Vec<(String, &PathBuf, bool)> = vec![("root".into(), &self.rootfs, true)];
        if let Some(scratch) = &self.scratch {
            disks.push(("scratch".into(), scratch, false));
        }
        for (i, extra) in self.extra_drives.iter().enumerate() {
            disks.push((format!("extra{i}"), &extra.path, extra.read_only));
        }
        if self.arch == GuestArch::Arm64 {
            disks.reverse();
        }
        for (id, path, read_only) in disks {
            // The scratch disk is this sandbox's alone (its directory is
            // locked) and comes as an fd set holding a read-write and a
            // read-only descriptor; QEMU's image locks taken through the two
            // conflict when a guest resumes after a snapshot ("Failed to get
            // \"write\" lock" at `cont`), so it goes without them.
            let locking = if id == "scratch" {
                ",file.locking=off"
            } else {
                ""
            };
            args.push("-drive".into());
            args.push(
                format!(
                    "id={id},file={},format=raw,if=none,read-only={}{locking}",
                    escape(path),
                    if read_only { "on" } else { "off" }
                )
                .into(),
            );
            args.push("-device".into());
            args.push(format!("virtio-blk-device,drive={id}").into());
        }
        // Agent channel: a virtio-serial port backed by a listening socket.
        let mut push = |a: &str| args.push(a.into());
        push("-device");
        push("virtio-serial-device,max_ports=2");
        push("-chardev");
        push(&format!(
            "socket,id=agent,path={},server=on,wait=off",
            escape(&self.agent_socket)
        ));
        push("-device");
        push(&format!(
            "virtserialport,chardev=agent,name={}",
            boot::AGENT_SERIAL_PORT
        ));
        // The NIC last, so the devices before it keep their places.
        if let Some(net) = &self.net {
            push("-netdev");
            push(&match net.transport {
                NetTransport::Tap => format!("tap,id=net0,fd={}", net.fd),
                NetTransport::Stream => {
                    format!("stream,id=net0,server=off,addr.type=fd,addr.str={}", net.fd)
                }
            });
            push("-device");
            push(&format!("virtio-net-device,netdev=net0,mac={GUEST_MAC}"));
        }
        if self.incoming {
            args.push("-incoming".into());
            args.push("defer".into());
        }
        args
    }
}

/// QEMU's `-M` for a guest of `arch`.
pub fn machine(arch: GuestArch) -> &'static str {
    match arch {
        GuestArch::X86_64 => "microvm,acpi=off,x-option-roms=off",
        GuestArch::Arm64 => "virt,gic-version=3",
    }
}

/// The `tsc_khz` a guest under `accel` needs: the host's rate under TCG,
/// nothing under KVM (which has kvmclock).
pub fn tcg_tsc_khz(accel: Accel) -> Option<u64> {
    match accel {
        Accel::Tcg => nova_runtime::host::host_cpu_khz(),
        Accel::Kvm => None,
    }
}

/// Escapes a path for a QEMU option value, where `,` must be doubled.
fn escape(path: &std::path::Path) -> String {
    path.display().to_string().replace(',', ",,")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::confinement::{ConfinementPolicy, HostFacts};

    fn spec() -> VmSpec {
        VmSpec {
            arch: GuestArch::X86_64,
            kernel: "/t/vmlinux".into(),
            rootfs: "/t/rootfs.ext4".into(),
            scratch: Some("/s/scratch.ext4".into()),
            extra_drives: vec![DriveConfig::read_only("/data/a,b.img")],
            memory_mb: 512,
            vcpus: 2,
            accel: Accel::Tcg,
            qmp_socket: "/s/api.sock".into(),
            agent_socket: "/s/vsock.sock".into(),
            kernel_args: "reboot=k panic=1 quiet".into(),
            hostname: "sb-1".into(),
            tsc_khz: None,
            incoming: false,
            run_as_ids: None,
            net: None,
            memory: GuestMemory::Anonymous,
            confinement: Confinement::decide(
                &ConfinementPolicy::default(),
                &HostFacts {
                    is_root: true,
                    passwd: Some("nobody:x:65534:65534::/:/bin/false\n".into()),
                },
            ),
        }
    }

    fn args(spec: &VmSpec) -> Vec<String> {
        spec.try_qemu_args()
            .unwrap()
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect()
    }

    fn after<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn kernel_cmdline_has_root_init_and_overlay() {
        let s = spec();
        assert_eq!(
            s.kernel_cmdline().unwrap(),
            "console=ttyS0 reboot=k panic=1 quiet root=/dev/vda rootfstype=ext4 ro \
             init=/sbin/nova-agent nova.hostname=sb-1 nova.overlay=/dev/vdb"
        );
        let ro = VmSpec {
            scratch: None,
            tsc_khz: Some(2_000_000),
            ..spec()
        };
        let cmdline = ro.kernel_cmdline().unwrap();
        assert!(!cmdline.contains("nova.overlay"), "{cmdline}");
        assert!(cmdline.ends_with(" tsc_early_khz=2000000"), "{cmdline}");
    }

    #[test]
    fn what_qemu_is_given_is_what_the_agent_reads() {
        let a = args(&spec());
        let append = after(&a, "-append");
        let params = NovaParams::parse(append[0]).unwrap();
        assert_eq!(params.hostname_or_default(), "sb-1");
        // The overlay names the second disk, which is the scratch disk.
        assert_eq!(params.overlay.as_deref(), Some(boot::SCRATCH_DEVICE));
        assert_eq!(boot::SCRATCH_DEVICE, "/dev/vdb");
        assert!(after(&a, "-drive")[1].starts_with("id=scratch,"));
        // The agent's default listeners include the port QEMU exposes.
        let port = after(&a, "-device")
            .into_iter()
            .find_map(|d| d.strip_prefix("virtserialport,chardev=agent,name="))
            .unwrap();
        assert!(
            params
                .listen_or_default()
                .contains(&boot::ListenAddr::Serial(port.to_owned()))
        );
    }

    #[test]
    fn a_network_is_a_nic_on_the_inherited_tap_and_nova_net_for_the_agent() {
        let guest: GuestNet = "169.254.0.21/30,gw=169.254.0.22,mtu=1500,dns=10.0.0.2"
            .parse()
            .unwrap();
        let a = args(&VmSpec {
            net: Some(VmNet {
                fd: 3,
                transport: NetTransport::Tap,
                guest: guest.clone(),
            }),
            ..spec()
        });
        assert_eq!(after(&a, "-netdev"), ["tap,id=net0,fd=3"]);
        let user = args(&VmSpec {
            net: Some(VmNet {
                fd: 4,
                transport: NetTransport::Stream,
                guest: guest.clone(),
            }),
            ..spec()
        });
        assert_eq!(
            after(&user, "-netdev"),
            ["stream,id=net0,server=off,addr.type=fd,addr.str=4"]
        );
        let devices = after(&a, "-device");
        assert_eq!(
            devices.last().copied(),
            Some(format!("virtio-net-device,netdev=net0,mac={GUEST_MAC}").as_str()),
            "the NIC comes after every other device"
        );
        let params = NovaParams::parse(after(&a, "-append")[0]).unwrap();
        assert_eq!(params.net, Some(guest));

        let none = args(&spec());
        assert!(after(&none, "-netdev").is_empty());
        assert_eq!(
            NovaParams::parse(after(&none, "-append")[0]).unwrap().net,
            None
        );
    }

    #[test]
    fn kernel_args_that_break_the_contract_are_refused() {
        for bad in ["console=hvc0", "reboot=t", "init=/bin/sh", "quiet -- x"] {
            let s = VmSpec {
                kernel_args: bad.into(),
                ..spec()
            };
            assert!(s.kernel_cmdline().is_err(), "{bad}");
            assert!(s.try_qemu_args().is_err(), "{bad}");
        }
    }

    #[test]
    fn machine_accel_memory_and_sockets() {
        let a = args(&spec());
        assert_eq!(after(&a, "-M"), ["microvm,acpi=off,x-option-roms=off"]);
        assert_eq!(after(&a, "-accel"), ["tcg"]);
        assert_eq!(after(&a, "-cpu"), ["max"]);
        assert_eq!(after(&a, "-m"), ["512M"]);
        assert_eq!(after(&a, "-smp"), ["2"]);
        assert_eq!(after(&a, "-kernel"), ["/t/vmlinux"]);
        assert_eq!(after(&a, "-qmp"), ["unix:/s/api.sock,server=on,wait=off"]);
        assert!(a.contains(&"-no-reboot".to_owned()));
        assert!(a.contains(&"-nodefaults".to_owned()));
        assert_eq!(
            after(&a, "-sandbox"),
            ["on,obsolete=deny,elevateprivileges=allow,spawn=deny,resourcecontrol=deny"]
        );
        assert_eq!(after(&a, "-runas"), [] as [&str; 0], "no ids given");
        let own = args(&VmSpec {
            run_as_ids: Some((3_000_000_001, 3_000_000_001)),
            ..spec()
        });
        assert_eq!(after(&own, "-runas"), ["3000000001:3000000001"]);
        let bare = args(&VmSpec {
            confinement: Confinement::none(),
            incoming: false,
            run_as_ids: None,
            ..spec()
        });
        assert!(after(&bare, "-sandbox").is_empty() && after(&bare, "-runas").is_empty());
        let kvm = args(&VmSpec {
            accel: Accel::Kvm,
            ..spec()
        });
        assert_eq!(after(&kvm, "-accel"), ["kvm"]);
        assert_eq!(after(&kvm, "-cpu"), ["host"]);
    }

    #[test]
    fn guest_ram_in_a_file_is_the_machine_memory_backend_shared_or_private() {
        assert!(after(&args(&spec()), "-object").is_empty());
        let shared = args(&VmSpec {
            memory: GuestMemory::SharedMemfd,
            ..spec()
        });
        assert_eq!(
            after(&shared, "-M"),
            ["microvm,acpi=off,x-option-roms=off,memory-backend=microvm.ram"]
        );
        assert_eq!(
            after(&shared, "-object"),
            ["memory-backend-memfd,id=microvm.ram,size=512M,share=on"]
        );
        assert_eq!(after(&shared, "-m"), ["512M"], "the sizes agree");
        let private = args(&VmSpec {
            memory: GuestMemory::PrivateFile("/snap/mem,1".into()),
            ..spec()
        });
        assert_eq!(
            after(&private, "-object"),
            ["memory-backend-file,id=microvm.ram,size=512M,mem-path=/snap/mem,,1,share=off"]
        );
    }

    #[test]
    fn disks_in_guest_order_with_escaped_commas() {
        let a = args(&spec());
        let drives = after(&a, "-drive");
        assert_eq!(drives.len(), 3);
        assert!(
            drives[0].starts_with("id=root,file=/t/rootfs.ext4,")
                && drives[0].contains("read-only=on")
        );
        assert!(
            drives[1].starts_with("id=scratch,file=/s/scratch.ext4,")
                && drives[1].contains("read-only=off")
        );
        assert!(
            drives[2].starts_with("id=extra0,file=/data/a,,b.img,"),
            "{}",
            drives[2]
        );
        let devices = after(&a, "-device");
        assert_eq!(
            devices,
            [
                "virtio-blk-device,drive=root",
                "virtio-blk-device,drive=scratch",
                "virtio-blk-device,drive=extra0",
                "virtio-serial-device,max_ports=2",
                "virtserialport,chardev=agent,name=org.nova.agent",
            ]
        );
        assert!(
            after(&a, "-chardev")
                .contains(&"socket,id=agent,path=/s/vsock.sock,server=on,wait=off")
        );
    }

    #[test]
    fn an_arm64_guest_is_a_virt_machine_with_its_console_on_the_pl011() {
        let arm = VmSpec {
            arch: GuestArch::Arm64,
            tsc_khz: Some(2_000_000),
            ..spec()
        };
        let a = args(&arm);
        assert_eq!(after(&a, "-M"), ["virt,gic-version=3"]);
        assert_eq!(after(&a, "-cpu"), ["max,pauth-impdef=on"]);
        let cmdline = after(&a, "-append")[0];
        assert!(cmdline.starts_with("console=ttyAMA0 "), "{cmdline}");
        assert!(!cmdline.contains("tsc_early_khz"), "{cmdline}");
        // The same devices as on microvm, the disks last to first, which
        // `virt` probes first to last: the boot contract's device names
        // (root /dev/vda, scratch /dev/vdb) hold on both.
        assert_eq!(
            after(&a, "-device"),
            [
                "virtio-blk-device,drive=extra0",
                "virtio-blk-device,drive=scratch",
                "virtio-blk-device,drive=root",
                "virtio-serial-device,max_ports=2",
                "virtserialport,chardev=agent,name=org.nova.agent",
            ]
        );
        let kvm = args(&VmSpec {
            accel: Accel::Kvm,
            ..arm
        });
        assert_eq!(after(&kvm, "-cpu"), ["host"]);
    }
}
