//! [`Qemu`]: the runtime's [`Backend`] over QEMU's microvm, and
//! [`QemuHypervisor`], the provider on it.

use std::os::fd::{OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use nova_core::error::BoxError;
use nova_core::error::CreateSandboxError;
use nova_core::home::NovaHome;
use nova_core::hypervisor::HypervisorKind;
use nova_core::snapshot::SnapshotError;
use nova_core::template::GuestArch;
use nova_runtime::Provider;
use nova_runtime::backend::{
    Backend, BootSource, Launch, NetworkMode, ReattachVm, VmStart, kernel_args_error,
};
use nova_runtime::console::DEFAULT_LOG_CAP;
use nova_runtime::dir::check_socket_path;
use nova_runtime::host::{Accel, BackendChoice, HostReport, find_binary};
use nova_runtime::network::SandboxNet;
use nova_runtime::retry::connect_unix;
use nova_runtime::vmm::{FIRST_INHERITED_FD, InheritedFd, VmmCommand};

use crate::cmdline::{GuestMemory, NetTransport, VmNet, VmSpec, tcg_tsc_khz};
use crate::qmp::QmpClient;
use crate::vm::{QemuVm, SNAPSHOT_MEMORY, SNAPSHOT_STATE};

/// Environment variable naming the QEMU binary for arm64 guests.
pub const QEMU_AARCH64_BIN_ENV: &str = "NOVA_QEMU_AARCH64_BIN";
/// Default binary for arm64 guests (Debian package `qemu-system-arm`).
pub const QEMU_AARCH64_BIN: &str = "qemu-system-aarch64";

/// The QEMU binary and accelerator for a guest of `arch`: the configured
/// binary and accelerator for the host's own architecture; for another,
/// `qemu-system-aarch64` (or `$NOVA_QEMU_AARCH64_BIN`) under TCG, since KVM
/// runs only guests of the host's architecture.
pub fn qemu_for(
    options: &QemuOptions,
    arch: GuestArch,
) -> Result<(PathBuf, Accel), CreateSandboxError> {
    if GuestArch::host() == Some(arch) {
        return Ok((options.qemu_bin.clone(), options.accel));
    }
    match arch {
        GuestArch::Arm64 => {
            let found = find_binary(QEMU_AARCH64_BIN_ENV, QEMU_AARCH64_BIN).map_err(|nf| {
                CreateSandboxError::Unsupported {
                    reason: format!(
                        "this template is arm64 and needs {QEMU_AARCH64_BIN} (looked in {}); \
                         install it with `apt-get install qemu-system-arm` or set \
                         {QEMU_AARCH64_BIN_ENV}",
                        nf.searched.join(", ")
                    ),
                }
            })?;
            Ok((found.path, Accel::Tcg))
        }
        GuestArch::X86_64 => Err(CreateSandboxError::Unsupported {
            reason: format!(
                "this template is x86_64; the QEMU backend runs x86_64 guests on x86_64 hosts \
                 only, and this host is {}",
                std::env::consts::ARCH
            ),
        }),
    }
}

/// Default size of each sandbox's scratch disk (sparse: only what the guest
/// writes takes space).
pub const DEFAULT_SCRATCH_MB: u64 = 4096;

/// How the QEMU provider runs.
#[derive(Clone, Debug)]
pub struct QemuOptions {
    /// Data directory (templates, sandboxes).
    pub home: NovaHome,
    /// The `qemu-system-x86_64` binary.
    pub qemu_bin: PathBuf,
    /// KVM or TCG.
    pub accel: Accel,
    /// Size of each sandbox's sparse scratch disk in MiB.
    pub scratch_size_mb: u64,
}

/// QEMU cannot be used on this host.
#[derive(Debug, thiserror::Error)]
#[error("QEMU cannot run here: {reason}")]
pub struct QemuUnavailable {
    /// Why, and what to do.
    pub reason: String,
}

impl QemuOptions {
    /// Options for this host: `$NOVA_HOME`, the QEMU binary found by
    /// [`HostReport::probe`], KVM when hardware KVM is usable, else TCG
    /// (with a warning: boots take seconds).
    pub fn detect() -> Result<Self, QemuUnavailable> {
        let home = NovaHome::resolve().map_err(|e| QemuUnavailable {
            reason: e.to_string(),
        })?;
        let report = HostReport::probe();
        let accel = report.qemu_accel();
        let qemu = report.qemu.map_err(|nf| QemuUnavailable {
            reason: format!(
                "qemu-system-x86_64 not found (looked in {}); install it with `apt-get install \
                 qemu-system-x86`",
                nf.searched.join(", ")
            ),
        })?;
        if accel == Accel::Tcg {
            tracing::warn!(
                kvm = %report.kvm,
                "no hardware KVM: QEMU will emulate the guest (TCG); boots take seconds"
            );
        }
        Ok(Self {
            home,
            qemu_bin: qemu.path,
            accel,
            scratch_size_mb: DEFAULT_SCRATCH_MB,
        })
    }

    /// Options from a [`BackendChoice`] that picked QEMU.
    pub fn from_choice(home: NovaHome, choice: &BackendChoice) -> Option<Self> {
        match choice {
            BackendChoice::Qemu { binary, accel } => Some(Self {
                home,
                qemu_bin: binary.clone(),
                accel: *accel,
                scratch_size_mb: DEFAULT_SCRATCH_MB,
            }),
            BackendChoice::Firecracker { .. } => None,
        }
    }
}

/// The QEMU backend of the runtime: one `qemu-system-x86_64 -M microvm`
/// process per sandbox, configured on its command line, driven over QMP.
#[derive(Debug)]
pub struct Qemu {
    options: QemuOptions,
    version: String,
}

/// Runs sandboxes as QEMU `microvm` VMs: the runtime's [`Provider`] over
/// [`Qemu`]. Cheap to clone; clones share the same sandboxes. Dropping the
/// last clone kills every VM it still runs and removes their directories.
pub type QemuHypervisor = Provider<Qemu>;

/// The real uid of process `pid` (`/proc/PID/status`).
fn process_uid(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The guest kernel command line QEMU `pid` was started with (its
/// `-append` argument).
fn appended_cmdline(pid: u32) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let mut args = raw.split(|&b| b == 0);
    args.by_ref().find(|a| *a == b"-append")?;
    args.next().map(|a| String::from_utf8_lossy(a).into_owned())
}

/// Where the RAM of QEMU `pid` lives, from its command line: the shared
/// memfd of a cold boot (see [`GuestMemory`]), or a snapshot's file mapped
/// private, or anonymous memory.
fn memory_of(pid: u32) -> GuestMemory {
    match std::fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(raw) => memory_in_cmdline(&raw),
        Err(_) => GuestMemory::Anonymous,
    }
}

/// [`memory_of`] from `raw`, a `/proc/PID/cmdline` (arguments ending in
/// NUL bytes).
fn memory_in_cmdline(raw: &[u8]) -> GuestMemory {
    let args: Vec<&[u8]> = raw.split(|&b| b == 0).collect();
    let objects: Vec<String> = args
        .windows(2)
        .filter(|w| w[0] == b"-object")
        .map(|w| String::from_utf8_lossy(w[1]).into_owned())
        .collect();
    if objects
        .iter()
        .any(|o| o.starts_with("memory-backend-memfd,") && o.contains(",share=on"))
    {
        return GuestMemory::SharedMemfd;
    }
    let Some(object) = objects
        .into_iter()
        .find(|o| o.starts_with("memory-backend-file,"))
    else {
        return GuestMemory::Anonymous;
    };
    // `,` in a value is written `,,`: split on single commas only.
    let mut fields = Vec::new();
    let mut field = String::new();
    let mut chars = object.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            ',' if chars.peek() == Some(&',') => {
                chars.next();
                field.push(',');
            }
            ',' => fields.push(std::mem::take(&mut field)),
            c => field.push(c),
        }
    }
    fields.push(field);
    let value = |key: &str| {
        fields
            .iter()
            .find_map(|f| f.strip_prefix(key)?.strip_prefix('='))
    };
    match value("mem-path") {
        Some(path) => GuestMemory::PrivateFile(path.into()),
        None => GuestMemory::Anonymous,
    }
}

/// How long a QMP command may take.
const QMP_TIMEOUT: Duration = Duration::from_secs(10);

/// The QEMU fd set (`-add-fd ...,set=N`, `/dev/fdset/N`) that holds the
/// sandbox's scratch disk.
const SCRATCH_FDSET: u32 = 1;

impl Backend for Qemu {
    type Options = QemuOptions;
    type Vm = QemuVm;

    fn from_options(options: QemuOptions) -> Self {
        let version = nova_runtime::host::binary_version(&options.qemu_bin)
            .unwrap_or_else(|| "unknown".to_owned());
        Self { options, version }
    }

    fn options(&self) -> &QemuOptions {
        &self.options
    }

    fn kind(&self) -> HypervisorKind {
        HypervisorKind::Qemu
    }

    fn vmm_version(&self) -> String {
        self.version.clone()
    }

    fn home(&self) -> &NovaHome {
        &self.options.home
    }

    fn scratch_size_mb(&self) -> u64 {
        self.options.scratch_size_mb
    }

    fn network_mode(&self) -> NetworkMode {
        NetworkMode::Namespace
    }

    /// A `-netdev stream` socket to passt where there is no namespace.
    fn user_network(&self) -> bool {
        true
    }

    fn snapshot_support(&self) -> Result<(), String> {
        Ok(())
    }

    async fn reattach(&self, reattach: ReattachVm<'_>) -> Result<QemuVm, BoxError> {
        let stream = connect_unix(&reattach.paths.api_socket(), reattach.deadline).await?;
        let qmp = QmpClient::handshake(stream, QMP_TIMEOUT).await?;
        // The per-sandbox uid QEMU runs as is this sandbox's again.
        let lease = match process_uid(reattach.vmm_pid) {
            Some(uid) if crate::confinement::PER_SANDBOX_IDS.contains(&uid) => {
                Some(crate::ids::IdLease::claim(uid)?)
            }
            _ => None,
        };
        let kernel_cmdline = appended_cmdline(reattach.vmm_pid).unwrap_or_default();
        Ok(QemuVm::new(
            qmp,
            reattach.paths.vsock_socket(),
            kernel_cmdline,
            memory_of(reattach.vmm_pid),
            Some(reattach.vmm_pid),
            lease,
        ))
    }

    async fn start(
        &self,
        start: VmStart<'_>,
        launch: &mut Launch<'_>,
    ) -> Result<QemuVm, CreateSandboxError> {
        let restore = match start.source {
            BootSource::Cold => None,
            BootSource::Restore(snapshot) => Some(snapshot),
        };
        let image = start.image;
        let paths = start.paths;
        for socket in [paths.api_socket(), paths.vsock_socket()] {
            check_socket_path(&socket)
                .map_err(|reason| CreateSandboxError::Unsupported { reason })?;
        }
        let config = &start.info.config;
        let (qemu_bin, accel) = qemu_for(&self.options, image.arch)?;
        // A restored VM gets the very command line of the one its snapshot
        // was taken of (the guest kernel already runs; only the devices must
        // match); the agent then gives it its own identity.
        let (hostname, kernel_args) = match restore {
            Some(snapshot) => (
                snapshot.manifest.source.to_string(),
                snapshot.manifest.config.kernel_args.clone(),
            ),
            None => (start.info.id.to_string(), config.kernel_args.clone()),
        };
        // With a uid per sandbox, QEMU must be able to reopen its writable
        // disk after dropping root (it does when a snapshot hands the disk
        // over): the disk becomes the sandbox uid's, and the directory
        // traversable (its sockets stay root's, so no one else can connect).
        let confinement = crate::confinement::Confinement::for_host();
        let lease = if confinement.per_sandbox() {
            let lease =
                crate::ids::IdLease::take().map_err(|source| CreateSandboxError::Prepare {
                    path: paths.dir().to_owned(),
                    source,
                })?;
            let id = lease.id();
            if let Some(scratch) = start.scratch {
                std::os::unix::fs::chown(scratch, Some(id), Some(id)).map_err(|source| {
                    CreateSandboxError::Prepare {
                        path: scratch.to_owned(),
                        source,
                    }
                })?;
            }
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(paths.dir(), std::fs::Permissions::from_mode(0o711)).map_err(
                |source| CreateSandboxError::Prepare {
                    path: paths.dir().to_owned(),
                    source,
                },
            )?;
            Some(lease)
        } else {
            None
        };
        // The tap (namespace mode), opened here (as root), or the socket to
        // passt (user mode), inherited by QEMU, which then needs no
        // privilege to use it.
        let (net, tap) = match start.network {
            Some(network) => {
                let (fd, transport) = match network {
                    // Without the virtio-net header (`vnet_hdr`): passt's
                    // stream has none, and a guest whose device was offered
                    // it cannot be restored without it; so every guest gets
                    // the same device and a snapshot restores in either
                    // mode (snapshot format 4). Offloads are lost on the tap.
                    SandboxNet::Namespace(ns) => (
                        ns.open_tap(false)
                            .await
                            .map_err(|e| CreateSandboxError::Network(Box::new(e)))?,
                        NetTransport::Tap,
                    ),
                    SandboxNet::User(user) => (
                        user.connect_vmm()
                            .map_err(|e| CreateSandboxError::Network(Box::new(e)))?,
                        NetTransport::Stream,
                    ),
                };
                let net = VmNet {
                    fd: FIRST_INHERITED_FD,
                    transport,
                    guest: network.guest_net(),
                };
                let tap = InheritedFd {
                    fd: Arc::new(fd),
                    child_fd: FIRST_INHERITED_FD,
                };
                (Some(net), Some(tap))
            }
            None => (None, None),
        };
        // The scratch disk, opened here (as root) and handed over as an fd
        // set: QEMU reopens a writable disk when a restored guest resumes,
        // and by its path that would need the sandbox uid to reach it
        // through every parent directory (a root-owned $NOVA_HOME under a
        // 0700 directory does not let it). QEMU picks from the set the
        // descriptor whose access mode it asks for: one read-write, one
        // read-only.
        let scratch_fd = FIRST_INHERITED_FD + RawFd::from(tap.is_some());
        let mut scratch = Vec::new();
        if let Some(path) = start.scratch {
            for (write, child_fd) in [(true, scratch_fd), (false, scratch_fd + 1)] {
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(write)
                    .open(path)
                    .map_err(|source| CreateSandboxError::Prepare {
                        path: path.to_owned(),
                        source,
                    })?;
                scratch.push(InheritedFd {
                    fd: Arc::new(OwnedFd::from(file)),
                    child_fd,
                });
            }
        }
        // The guest's RAM: a cold boot's is a shared memfd, so that a
        // snapshot can copy it instead of streaming it; a restore maps the
        // snapshot's copy of it private, when the snapshot has one.
        let memory = match restore {
            None => GuestMemory::SharedMemfd,
            Some(snapshot) => {
                let path = snapshot.dir.join(SNAPSHOT_MEMORY);
                match std::fs::symlink_metadata(&path) {
                    Ok(meta) if meta.is_file() => GuestMemory::PrivateFile(path),
                    Ok(_) => {
                        return Err(SnapshotError::Invalid {
                            dir: snapshot.dir.clone(),
                            reason: format!(
                                "its {SNAPSHOT_MEMORY} is not a regular file; take a new snapshot"
                            ),
                        }
                        .into());
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => GuestMemory::Anonymous,
                    Err(source) => return Err(SnapshotError::Io { path, source }.into()),
                }
            }
        };
        let ignore_shared = matches!(memory, GuestMemory::PrivateFile(_));
        let spec = VmSpec {
            arch: image.arch,
            kernel: image.kernel.clone(),
            rootfs: image.rootfs.clone(),
            scratch: start
                .scratch
                .map(|_| PathBuf::from(format!("/dev/fdset/{SCRATCH_FDSET}"))),
            extra_drives: image.extra_drives.clone(),
            memory_mb: config.memory_mb,
            vcpus: config.vcpus,
            accel,
            qmp_socket: paths.api_socket(),
            agent_socket: paths.vsock_socket(),
            kernel_args,
            hostname,
            tsc_khz: tcg_tsc_khz(accel),
            confinement,
            incoming: restore.is_some(),
            run_as_ids: lease.as_ref().map(|l| (l.id(), l.id())),
            net,
            memory: memory.clone(),
        };
        let kernel_cmdline = spec.kernel_cmdline().map_err(kernel_args_error)?;
        let mut args = spec.try_qemu_args().map_err(kernel_args_error)?;
        for inherited in &scratch {
            args.push("-add-fd".into());
            args.push(format!("fd={},set={SCRATCH_FDSET}", inherited.child_fd).into());
        }
        launch.spawn(&VmmCommand {
            program: qemu_bin,
            args,
            cwd: None,
            stdout: paths.console_log(),
            stderr: paths.vmm_log(),
            log_cap: DEFAULT_LOG_CAP,
            fds: tap.into_iter().chain(scratch).collect(),
        })?;
        // QMP answers once QEMU has parsed its configuration and created its
        // sockets; QEMU takes its whole configuration on the command line, so
        // a cold guest is running from then on.
        let deadline = launch.deadline();
        let qmp_socket = spec.qmp_socket.clone();
        let mut qmp = launch
            .step("answer on QMP", async move {
                let stream = connect_unix(&qmp_socket, deadline).await?;
                QmpClient::handshake(stream, QMP_TIMEOUT).await
            })
            .await?;
        launch.vmm_ready();
        if let Some(snapshot) = restore {
            // QEMU waits (-incoming defer) for the saved state, handed to it
            // as an open file: it needs no access to the path.
            let path = snapshot.dir.join(SNAPSHOT_STATE);
            let file = match tokio::fs::File::open(&path).await {
                Ok(file) => file.into_std().await,
                Err(source) => {
                    return Err(SnapshotError::Io { path, source }.into());
                }
            };
            launch
                .step("load the snapshot", qmp.load_from(&file, ignore_shared))
                .await?;
            launch.step("resume the restored guest", qmp.cont()).await?;
        }
        launch.guest_started();
        let pid = launch.vmm().and_then(|vmm| vmm.pid());
        Ok(QemuVm::new(
            qmp,
            spec.agent_socket.clone(),
            kernel_cmdline,
            memory,
            pid,
            lease,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmdline(args: &[&str]) -> Vec<u8> {
        args.iter().flat_map(|a| a.bytes().chain([0])).collect()
    }

    #[test]
    fn a_reattached_qemus_memory_is_read_from_its_command_line() {
        let shared = cmdline(&[
            "qemu-system-x86_64",
            "-object",
            "memory-backend-memfd,id=microvm.ram,size=256M,share=on",
        ]);
        assert_eq!(memory_in_cmdline(&shared), GuestMemory::SharedMemfd);
        let private = cmdline(&[
            "qemu-system-x86_64",
            "-object",
            "memory-backend-file,id=microvm.ram,size=256M,mem-path=/s/a,,b/memory,share=off",
        ]);
        assert_eq!(
            memory_in_cmdline(&private),
            GuestMemory::PrivateFile("/s/a,b/memory".into())
        );
        let plain = cmdline(&["qemu-system-x86_64", "-m", "256M"]);
        assert_eq!(memory_in_cmdline(&plain), GuestMemory::Anonymous);
        assert_eq!(memory_in_cmdline(b""), GuestMemory::Anonymous);
    }
}
