//! Booting a kernel + rootfs under QEMU `microvm` and timing it from the host.
//!
//! Used by the template build (to record `boot_time_ms`), the image tests
//! (the kernel must reach init) and the boot benchmark (our kernel against
//! Debian's cloud kernel). The clock starts just before QEMU is spawned and
//! stops when a marker line appears on the serial console; the time of the
//! kernel's own `Run <init> as init process` line is kept too. QEMU is killed
//! as soon as the marker is seen, and when the probe is dropped.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use nova_protocol::boot::{self, GuestConsole, KernelCmdline};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

/// The user part of the kernel command line templates are probed with.
pub const PROBE_KERNEL_ARGS: &str = "reboot=k panic=1";

/// The kernel command line the project boots templates with under QEMU: the
/// boot contract's (serial console, read-only root, the agent as init,
/// default `nova.*` parameters) around [`PROBE_KERNEL_ARGS`].
pub fn default_cmdline() -> String {
    KernelCmdline::new(GuestConsole::Serial)
        .assemble(PROBE_KERNEL_ARGS)
        .expect("PROBE_KERNEL_ARGS is a constant that keeps the boot contract")
}

/// The QEMU machine templates boot on: microvm, devices on the kernel command line.
pub const DEFAULT_MACHINE: &str = "microvm,acpi=off";

/// The console line that proves the kernel handed over to a root-fs init.
pub const KERNEL_INIT_LINE: &str = "as init process";

/// The parts of nova-agent's console line once it listens (`nova-agent 0.1.0 ready`).
pub const AGENT_READY_MARKER: &[&str] = &["nova-agent", "ready"];

/// How to boot one VM and what to wait for.
#[derive(Debug, Clone)]
pub struct BootProbe {
    /// `qemu-system-x86_64`.
    pub qemu: PathBuf,
    /// The kernel (`vmlinux` with a PVH note, or a bzImage).
    pub kernel: PathBuf,
    /// The root filesystem, attached read-only as `/dev/vda` (virtio-blk over MMIO).
    pub rootfs: PathBuf,
    /// An initrd, for stock kernels whose virtio drivers are modules.
    pub initrd: Option<PathBuf>,
    /// The kernel command line.
    pub cmdline: String,
    /// Appended to the command line as `tsc_early_khz=`: the host's TSC rate,
    /// which is the guest's under TCG. Without it a guest on a loaded host
    /// can fail to calibrate its TSC against the PIT and, having no HPET or
    /// ACPI PM timer on microvm, hang before init. `None` appends nothing.
    pub tsc_khz: Option<u64>,
    /// The `-M` value. Our kernel is built without ACPI and finds its
    /// virtio-mmio devices on the command line, which QEMU writes there only
    /// with `acpi=off` (the default, [`DEFAULT_MACHINE`]); stock kernels find
    /// them through ACPI (`microvm,pit=on,pic=on,rtc=on` boots Debian's).
    pub machine: String,
    /// Guest memory.
    pub memory_mb: u32,
    /// Extra QEMU arguments (e.g. a virtio-serial channel).
    pub extra_args: Vec<OsString>,
    /// A virtio-serial port named [`boot::AGENT_SERIAL_PORT`], exposed as this host
    /// Unix socket (QEMU listens; connect after the agent is ready).
    pub agent_socket: Option<PathBuf>,
    /// The probe ends at the first console line containing all of these.
    pub marker: Vec<String>,
    /// Give up after this long.
    pub timeout: Duration,
}

impl BootProbe {
    /// A probe for `kernel` + `rootfs` with the project's defaults: TCG,
    /// no ACPI, 512 MiB, [`default_cmdline`], stop at the kernel's init line.
    pub fn new(qemu: PathBuf, kernel: PathBuf, rootfs: PathBuf) -> Self {
        Self {
            qemu,
            kernel,
            rootfs,
            initrd: None,
            cmdline: default_cmdline(),
            machine: DEFAULT_MACHINE.to_owned(),
            tsc_khz: nova_runtime::host::host_cpu_khz(),
            memory_mb: 512,
            extra_args: Vec::new(),
            agent_socket: None,
            marker: vec![KERNEL_INIT_LINE.to_owned()],
            timeout: Duration::from_secs(60),
        }
    }

    /// The QEMU command this probe runs.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.qemu);
        cmd.args(["-M", &self.machine, "-accel", "tcg", "-cpu", "max", "-m"])
            .arg(self.memory_mb.to_string())
            .args([
                "-nodefaults",
                "-no-user-config",
                "-nographic",
                "-no-reboot",
                "-serial",
                "stdio",
            ])
            .arg("-kernel")
            .arg(&self.kernel)
            .arg("-append")
            .arg(match self.tsc_khz {
                Some(khz) => format!("{} tsc_early_khz={khz}", self.cmdline),
                None => self.cmdline.clone(),
            });
        if let Some(initrd) = &self.initrd {
            cmd.arg("-initrd").arg(initrd);
        }
        let mut drive = OsString::from("id=root,format=raw,if=none,read-only=on,file=");
        drive.push(&self.rootfs);
        cmd.arg("-drive")
            .arg(drive)
            .args(["-device", "virtio-blk-device,drive=root"]);
        if let Some(socket) = &self.agent_socket {
            let mut chardev = OsString::from("socket,id=agent,server=on,wait=off,path=");
            chardev.push(socket);
            cmd.args(["-device", "virtio-serial-device", "-chardev"])
                .arg(chardev)
                .args([
                    "-device",
                    &format!(
                        "virtserialport,chardev=agent,name={}",
                        boot::AGENT_SERIAL_PORT
                    ),
                ]);
        }
        cmd.args(&self.extra_args);
        cmd
    }

    /// Boots, waits for the marker, kills QEMU, and returns the timings.
    pub async fn run(&self) -> Result<BootTiming, BootProbeError> {
        let (timing, mut vm) = self.start().await?;
        vm.kill().await;
        Ok(timing)
    }

    /// Boots and waits for the marker, leaving the VM running (to talk to its
    /// agent); QEMU is killed when the returned [`RunningVm`] is dropped.
    pub async fn start(&self) -> Result<(BootTiming, RunningVm), BootProbeError> {
        let mut cmd = self.command();
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let started = Instant::now();
        let mut child = cmd.spawn().map_err(|source| BootProbeError::Spawn {
            qemu: self.qemu.clone(),
            source,
        })?;
        let Some(stdout) = child.stdout.take() else {
            return Err(BootProbeError::Spawn {
                qemu: self.qemu.clone(),
                source: std::io::Error::other("no stdout pipe"),
            });
        };
        let mut lines = BufReader::new(stdout).lines();
        let mut console = String::new();
        let mut to_kernel_init = None;
        let outcome = tokio::time::timeout(self.timeout, async {
            while let Ok(Some(line)) = lines.next_line().await {
                let line = line.trim_end_matches('\r');
                if to_kernel_init.is_none() && line.contains(KERNEL_INIT_LINE) {
                    to_kernel_init = Some(started.elapsed());
                }
                console.push_str(line);
                console.push('\n');
                if self.marker.iter().all(|part| line.contains(part.as_str())) {
                    return Some(started.elapsed());
                }
            }
            None
        })
        .await;
        let marker = self.marker.join(" .. ");
        match outcome {
            Ok(Some(to_marker)) => {
                // Keep draining the console so a chatty guest never blocks on a full pipe.
                tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
                let timing = BootTiming {
                    to_marker,
                    to_kernel_init,
                    console,
                };
                Ok((timing, RunningVm { child }))
            }
            Ok(None) => {
                let _ = child.start_kill();
                let status = child.wait().await.ok();
                let mut stderr = String::new();
                if let Some(mut pipe) = child.stderr.take() {
                    use tokio::io::AsyncReadExt as _;
                    let _ = pipe.read_to_string(&mut stderr).await;
                }
                Err(BootProbeError::Exited {
                    marker,
                    status: status.map_or_else(|| "unknown".to_owned(), |s| s.to_string()),
                    tail: tail(&format!("{console}{stderr}")),
                })
            }
            Err(_) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                Err(BootProbeError::Timeout {
                    marker,
                    after: self.timeout,
                    tail: tail(&console),
                })
            }
        }
    }
}

/// A VM started by [`BootProbe::start`]; QEMU is killed on drop.
#[derive(Debug)]
pub struct RunningVm {
    child: tokio::process::Child,
}

impl RunningVm {
    /// Kills QEMU and waits for it to exit.
    pub async fn kill(&mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}

/// What a boot took, measured on the host from just before QEMU's spawn.
#[derive(Debug, Clone)]
pub struct BootTiming {
    /// Until the marker line.
    pub to_marker: Duration,
    /// Until the kernel's `Run ... as init process` line, if it printed one.
    pub to_kernel_init: Option<Duration>,
    /// The console output up to the marker.
    pub console: String,
}

/// A probe boot failed.
#[derive(Debug, thiserror::Error)]
pub enum BootProbeError {
    /// QEMU could not be started.
    #[error("cannot start {qemu}")]
    Spawn {
        /// The QEMU binary.
        qemu: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// QEMU exited before the marker appeared.
    #[error(
        "QEMU exited ({status}) before the console showed {marker:?}; last console lines:\n{tail}"
    )]
    Exited {
        /// The awaited marker.
        marker: String,
        /// QEMU's exit status.
        status: String,
        /// The end of the console output and QEMU's stderr.
        tail: String,
    },
    /// The marker did not appear in time.
    #[error("the console did not show {marker:?} within {after:?}; last console lines:\n{tail}")]
    Timeout {
        /// The awaited marker.
        marker: String,
        /// The timeout.
        after: Duration,
        /// The end of the console output.
        tail: String,
    },
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_boots_microvm_without_acpi_and_with_a_readonly_virtio_root() {
        let probe = BootProbe::new(
            "qemu-system-x86_64".into(),
            "/k/vmlinux".into(),
            "/t/rootfs.ext4".into(),
        );
        let cmd = probe.command();
        let args: Vec<String> = cmd
            .as_std()
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let joined = args.join(" ");
        assert!(
            joined.contains("-M microvm,acpi=off -accel tcg -cpu max -m 512"),
            "{joined}"
        );
        assert!(joined.contains("-kernel /k/vmlinux"), "{joined}");
        assert!(joined.contains("file=/t/rootfs.ext4"), "{joined}");
        assert!(joined.contains("read-only=on"), "{joined}");
        assert!(
            joined.contains("-device virtio-blk-device,drive=root"),
            "{joined}"
        );
        let append = args
            .iter()
            .position(|a| a == "-append")
            .map(|i| args[i + 1].clone());
        let cmdline = default_cmdline();
        match probe.tsc_khz {
            Some(khz) => assert_eq!(append, Some(format!("{cmdline} tsc_early_khz={khz}"))),
            None => assert_eq!(append.as_deref(), Some(cmdline.as_str())),
        }
        // What the agent reads from it: the defaults, serial port included.
        let params = nova_protocol::boot::NovaParams::parse(&cmdline).unwrap();
        assert_eq!(params.hostname_or_default(), boot::DEFAULT_HOSTNAME);
        assert!(
            params
                .listen_or_default()
                .contains(&boot::ListenAddr::Serial(
                    boot::AGENT_SERIAL_PORT.to_owned()
                ))
        );
        assert!(
            cmdline.contains("init=/sbin/nova-agent") && cmdline.contains("root=/dev/vda"),
            "{cmdline}"
        );
        assert!(!joined.contains("-initrd"));
        assert!(!joined.contains("virtio-serial"));

        let mut probe = probe;
        probe.agent_socket = Some("/s/agent.sock".into());
        let args: Vec<String> = probe
            .command()
            .as_std()
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let joined = args.join(" ");
        assert!(
            joined.contains(
                "-device virtio-serial-device -chardev socket,id=agent,server=on,wait=off,\
                 path=/s/agent.sock -device virtserialport,chardev=agent,name=org.nova.agent"
            ),
            "{joined}"
        );
    }

    #[tokio::test]
    async fn a_program_that_exits_early_reports_its_output() {
        // `/bin/sh` stands in for QEMU and rejects `-M` at once: the probe
        // must report the exit, not wait for its timeout.
        let mut probe = BootProbe::new("/bin/sh".into(), "k".into(), "r".into());
        probe.marker = vec!["never printed".into()];
        let err = probe.run().await.unwrap_err();
        assert!(matches!(err, BootProbeError::Exited { .. }), "{err:?}");
    }
}
