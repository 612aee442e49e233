//! [`Vz`]: the runtime's [`Backend`] over Apple's Virtualization.framework,
//! and [`VzHypervisor`], the provider on it.
//!
//! Host side, plain Rust (it builds everywhere; it runs VMs only on macOS,
//! which [`Backend::check_host`] enforces): a start writes the
//! [`VzMachineSpec`] into the sandbox directory, spawns the helper
//! `nova-vz-vmm` through the runtime's [`Launch`] (so the helper is the
//! sandbox's VMM process: own process group, watched, killed on drop),
//! waits for its control socket, and from then on drives it over
//! [`crate::control`] and reaches the agent through [`crate::vsock`].
//!
//! The network is the backend's own ([`NetworkMode::Own`]): VZ's NAT, with
//! the config's published ports relayed on the host by [`crate::ports`],
//! bound before the helper is spawned and owned by the [`VzVm`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use nova_core::error::{BoxError, CreateSandboxError};
use nova_core::home::NovaHome;
use nova_core::hypervisor::HypervisorKind;
use nova_core::snapshot::{SnapshotError, SnapshotKind};
use nova_protocol::boot::AGENT_VSOCK_PORT;
use nova_runtime::Provider;
use nova_runtime::backend::{
    AgentConnector, Backend, BootSource, Launch, NetworkMode, Vm, VmStart, VmmCounters,
    kernel_args_error,
};
use nova_runtime::console::DEFAULT_LOG_CAP;
use nova_runtime::dir::{check_socket_path, write_atomic};
use nova_runtime::retry::connect_unix;
use nova_runtime::vmm::VmmCommand;

use crate::control::{ControlClient, ControlError, ControlRequest};
use crate::ports::{BoundPorts, PortRelays, RelayBindError, RelayLimits};
use crate::spec::{SPEC_FILE, SpecInput, VzLimits, VzMachineSpec, VzSpecError, nat_guest_addr};
use crate::state::VzState;

/// Default size of each sandbox's sparse scratch disk, MiB.
pub const DEFAULT_SCRATCH_MB: u64 = 4096;

/// The helper binary's name.
pub const HELPER_NAME: &str = "nova-vz-vmm";

/// Environment variable naming the helper binary.
pub const HELPER_ENV: &str = "NOVA_VZ_VMM";

/// The saved machine state in a snapshot directory.
pub const SNAPSHOT_STATE: &str = "vz.state";

/// The first macOS with `saveMachineStateToURL:` / `restoreMachineStateFromURL:`.
pub const SAVE_RESTORE_MACOS: u32 = 14;

/// How long one control request may take.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(30);

/// How long one vsock `CONNECT` may wait while the guest boots.
const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(500);

/// How the VZ provider runs.
#[derive(Clone, Debug)]
pub struct VzOptions {
    /// Data directory (templates, sandboxes).
    pub home: NovaHome,
    /// The `nova-vz-vmm` helper, signed with the virtualization entitlement.
    pub helper: PathBuf,
    /// Size of each sandbox's sparse scratch disk, MiB.
    pub scratch_size_mb: u64,
}

/// The VZ provider cannot be used on this host.
#[derive(Debug, thiserror::Error)]
#[error("Apple Virtualization.framework cannot run here: {reason}")]
pub struct VzUnavailable {
    /// Why, and what to do.
    pub reason: String,
}

impl VzOptions {
    /// Options for this host: `$NOVA_HOME` and the helper ([`helper_path`]).
    ///
    /// # Errors
    ///
    /// [`VzUnavailable`] when `$NOVA_HOME` cannot be resolved.
    pub fn detect() -> Result<Self, VzUnavailable> {
        let home = NovaHome::resolve().map_err(|e| VzUnavailable {
            reason: e.to_string(),
        })?;
        Ok(Self::new(home))
    }

    /// Options with `home` and the helper found by [`helper_path`].
    pub fn new(home: NovaHome) -> Self {
        Self {
            home,
            helper: helper_path(),
            scratch_size_mb: DEFAULT_SCRATCH_MB,
        }
    }
}

/// Where the helper is: `$NOVA_VZ_VMM`, else `nova-vz-vmm` next to the
/// running executable (where `cargo build` and the install put it).
pub fn helper_path() -> PathBuf {
    if let Some(path) = std::env::var_os(HELPER_ENV) {
        return PathBuf::from(path);
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(HELPER_NAME)))
        .unwrap_or_else(|| PathBuf::from(HELPER_NAME))
}

/// The major version of a `sw_vers -productVersion` answer (`"14.5"` ->
/// 14).
pub fn macos_major(product_version: &str) -> Option<u32> {
    product_version.trim().split('.').next()?.parse().ok()
}

/// The VZ backend of the runtime: one `nova-vz-vmm` helper process per
/// sandbox, driven over its control socket.
#[derive(Debug)]
pub struct Vz {
    options: VzOptions,
    /// macOS's major version; `None` off macOS or when unknown.
    macos: Option<u32>,
    /// VZ's limits; `None` off macOS.
    limits: Option<VzLimits>,
}

/// Runs sandboxes as Apple VZ VMs: the runtime's [`Provider`] over [`Vz`].
pub type VzHypervisor = Provider<Vz>;

impl Vz {
    fn unsupported(reason: impl Into<String>) -> CreateSandboxError {
        CreateSandboxError::Unsupported {
            reason: reason.into(),
        }
    }
}

impl Backend for Vz {
    type Options = VzOptions;
    type Vm = VzVm;

    fn from_options(options: VzOptions) -> Self {
        let macos = if cfg!(target_os = "macos") {
            std::process::Command::new("sw_vers")
                .arg("-productVersion")
                .output()
                .ok()
                .and_then(|out| macos_major(&String::from_utf8_lossy(&out.stdout)))
        } else {
            None
        };
        Self {
            options,
            macos,
            limits: crate::host_limits(),
        }
    }

    fn options(&self) -> &VzOptions {
        &self.options
    }

    fn kind(&self) -> HypervisorKind {
        HypervisorKind::AppleVz
    }

    fn vmm_version(&self) -> String {
        match self.macos {
            Some(major) => format!("Virtualization.framework (macOS {major})"),
            None => "Virtualization.framework (unknown macOS)".to_owned(),
        }
    }

    fn home(&self) -> &NovaHome {
        &self.options.home
    }

    fn scratch_size_mb(&self) -> u64 {
        self.options.scratch_size_mb
    }

    fn network_mode(&self) -> NetworkMode {
        NetworkMode::Own
    }

    fn check_host(&self) -> Result<(), CreateSandboxError> {
        if !cfg!(all(target_os = "macos", target_arch = "aarch64")) {
            return Err(Self::unsupported(
                "the Apple VZ backend runs on macOS on Apple Silicon only; use QEMU or \
                 Firecracker on Linux",
            ));
        }
        if !self.options.helper.is_file() {
            return Err(Self::unsupported(format!(
                "the VZ helper {} is missing; build it (cargo build -p nova-vz) and sign it \
                 (make sign-macos), or set {HELPER_ENV}",
                self.options.helper.display()
            )));
        }
        Ok(())
    }

    fn snapshot_support(&self) -> Result<(), String> {
        match self.macos {
            Some(major) if major >= SAVE_RESTORE_MACOS => Ok(()),
            _ => Err(format!(
                "saving a VZ machine state needs macOS {SAVE_RESTORE_MACOS} or later"
            )),
        }
    }

    async fn start(
        &self,
        start: VmStart<'_>,
        launch: &mut Launch<'_>,
    ) -> Result<VzVm, CreateSandboxError> {
        let limits = self.limits.ok_or_else(|| {
            Self::unsupported("Virtualization.framework's limits cannot be read on this host")
        })?;
        let paths = start.paths;
        for socket in [paths.api_socket(), paths.vsock_socket()] {
            check_socket_path(&socket).map_err(Self::unsupported)?;
        }
        let config = &start.info.config;
        // As with QEMU: a restored VM keeps the command line (and so the
        // hostname and NAT address) of the VM its snapshot was taken of.
        let (hostname, kernel_args, restore) = match start.source {
            BootSource::Cold => (start.info.id.to_string(), config.kernel_args.clone(), None),
            BootSource::Restore(snapshot) => (
                snapshot.manifest.source.to_string(),
                snapshot.manifest.config.kernel_args.clone(),
                Some(snapshot.dir.join(SNAPSHOT_STATE)),
            ),
        };
        let guest_addr = config.enable_network.then(|| nat_guest_addr(&hostname));
        let spec = VzMachineSpec::build(
            &SpecInput {
                kernel: &start.image.kernel,
                rootfs: &start.image.rootfs,
                scratch: start.scratch,
                extra_drives: &start.image.extra_drives,
                memory_mb: config.memory_mb,
                vcpus: config.vcpus,
                kernel_args: &kernel_args,
                hostname: &hostname,
                network: guest_addr,
                restore: restore.as_deref(),
            },
            &limits,
        )
        .map_err(|e| match e {
            VzSpecError::KernelArgs(e) => kernel_args_error(e),
            other => Self::unsupported(other.to_string()),
        })?;
        let spec_path = paths.dir().join(SPEC_FILE);
        write_atomic(&spec_path, &spec).map_err(|source| CreateSandboxError::Prepare {
            path: spec_path.clone(),
            source,
        })?;
        // The published ports, before anything runs: one in use refuses
        // the create, naming it. Dropped (closed) on any error below.
        let ports = match guest_addr {
            Some(guest) => BoundPorts::bind(&config.published_ports(), guest.addr)
                .await
                .map_err(|e| port_error(config, e))?,
            None => BoundPorts::default(),
        };
        launch.spawn(&VmmCommand {
            program: self.options.helper.clone(),
            args: helper_args(&spec_path, &paths.api_socket(), &paths.vsock_socket()),
            cwd: None,
            // The guest's console is the helper's stdout.
            stdout: paths.console_log(),
            stderr: paths.vmm_log(),
            log_cap: DEFAULT_LOG_CAP,
            fds: Vec::new(),
        })?;
        // The helper makes the VM, starts (or restores and resumes) it, and
        // only then listens: an answering control socket is a running guest.
        let deadline = launch.deadline();
        let api = paths.api_socket();
        let mut control = launch
            .step("answer on its control socket", async move {
                let stream = connect_unix(&api, deadline).await?;
                Ok::<_, std::io::Error>(ControlClient::new(stream, CONTROL_TIMEOUT))
            })
            .await?;
        launch.vmm_ready();
        let state = launch
            .step(
                "report the VM's state",
                control.call(&ControlRequest::State),
            )
            .await?;
        if state != VzState::Running {
            return Err(CreateSandboxError::Vmm {
                vmm: HypervisorKind::AppleVz.vmm_name(),
                action: "start the VM".into(),
                source: format!("the VM is {state:?} after its start").into(),
            });
        }
        launch.guest_started();
        Ok(VzVm {
            control,
            vsock_socket: paths.vsock_socket(),
            kernel_cmdline: spec.cmdline,
            relays: ports.serve(RelayLimits::default()),
        })
    }
}

/// A published port that cannot be bound, named by its config field.
fn port_error(config: &nova_core::config::SandboxConfig, e: RelayBindError) -> CreateSandboxError {
    CreateSandboxError::PortUnavailable {
        field: config.published_port_field(e.index),
        port: e.port,
        protocol: e.protocol,
        host_ip: e.host_ip,
        source: e.source,
    }
}

/// The helper's command line.
pub fn helper_args(spec: &Path, control: &Path, vsock: &Path) -> Vec<std::ffi::OsString> {
    vec![
        "--spec".into(),
        spec.into(),
        "--control".into(),
        control.into(),
        "--vsock".into(),
        vsock.into(),
    ]
}

/// The helper's parsed command line ([`helper_args`] read back).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HelperArgs {
    /// The [`VzMachineSpec`] file.
    pub spec: PathBuf,
    /// The control socket to listen on.
    pub control: PathBuf,
    /// The vsock socket to listen on.
    pub vsock: PathBuf,
}

impl HelperArgs {
    /// Parses the helper's arguments (without the program name).
    ///
    /// # Errors
    ///
    /// What is wrong, for the usage message: an unknown flag, a flag
    /// without its value, a missing flag.
    pub fn parse(mut args: impl Iterator<Item = std::ffi::OsString>) -> Result<Self, String> {
        let (mut spec, mut control, mut vsock) = (None, None, None);
        while let Some(flag) = args.next() {
            let slot = match flag.to_str() {
                Some("--spec") => &mut spec,
                Some("--control") => &mut control,
                Some("--vsock") => &mut vsock,
                _ => return Err(format!("unknown argument {flag:?}")),
            };
            let value = args
                .next()
                .ok_or_else(|| format!("{flag:?} needs a value"))?;
            *slot = Some(PathBuf::from(value));
        }
        let need = |v: Option<PathBuf>, name: &str| v.ok_or_else(|| format!("missing {name}"));
        Ok(Self {
            spec: need(spec, "--spec")?,
            control: need(control, "--control")?,
            vsock: need(vsock, "--vsock")?,
        })
    }
}

/// One VZ VM: its helper's control connection and vsock socket, and the
/// relays of its published ports (closed when it is released or dropped).
#[derive(Debug)]
pub struct VzVm {
    control: ControlClient,
    vsock_socket: PathBuf,
    kernel_cmdline: String,
    relays: PortRelays,
}

impl VzVm {
    async fn expect(&mut self, request: ControlRequest, want: VzState) -> Result<(), ControlError> {
        let state = self.control.call(&request).await?;
        if state == want {
            Ok(())
        } else {
            Err(ControlError::Vz(crate::error::VzFailure::helper(format!(
                "the VM is {state:?}, not {want:?}, after {request:?}"
            ))))
        }
    }
}

impl Vm for VzVm {
    fn agent_connector(&self) -> AgentConnector {
        nova_runtime::hybrid_vsock::agent_connector(
            self.vsock_socket.clone(),
            AGENT_VSOCK_PORT,
            ATTEMPT_TIMEOUT,
        )
    }

    async fn pause(&mut self) -> Result<(), BoxError> {
        Ok(self.expect(ControlRequest::Pause, VzState::Paused).await?)
    }

    async fn resume(&mut self) -> Result<(), BoxError> {
        Ok(self
            .expect(ControlRequest::Resume, VzState::Running)
            .await?)
    }

    async fn counters(&mut self) -> VmmCounters {
        // VZ exposes no device counters.
        VmmCounters::default()
    }

    async fn request_power_off(&mut self) -> Result<(), BoxError> {
        self.control.call(&ControlRequest::RequestStop).await?;
        Ok(())
    }

    async fn snapshot(&mut self, dir: &Path, kind: SnapshotKind) -> Result<(), SnapshotError> {
        if kind == SnapshotKind::Diff {
            return Err(SnapshotError::Unsupported {
                vmm: HypervisorKind::AppleVz,
                reason: "VZ saves whole machine states only; take a full snapshot".into(),
            });
        }
        let path = dir.join(SNAPSHOT_STATE);
        self.expect(ControlRequest::Save { path }, VzState::Paused)
            .await
            .map_err(|e| SnapshotError::Vmm {
                vmm: HypervisorKind::AppleVz,
                action: "save the machine state".into(),
                source: Box::new(e),
            })
    }

    fn kernel_cmdline(&self) -> String {
        self.kernel_cmdline.clone()
    }

    async fn release(&mut self) -> Result<(), (PathBuf, std::io::Error)> {
        self.relays.shutdown().await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macos_versions_parse_to_their_major() {
        assert_eq!(macos_major("14.5\n"), Some(14));
        assert_eq!(macos_major("13"), Some(13));
        assert_eq!(macos_major("sonoma"), None);
    }

    #[test]
    fn the_helper_gets_its_spec_and_sockets() {
        let args = helper_args(
            Path::new("/s/vz.json"),
            Path::new("/s/api.sock"),
            Path::new("/s/vsock.sock"),
        );
        let words: Vec<&str> = args.iter().map(|a| a.to_str().unwrap()).collect();
        assert_eq!(
            words,
            [
                "--spec",
                "/s/vz.json",
                "--control",
                "/s/api.sock",
                "--vsock",
                "/s/vsock.sock"
            ]
        );
        assert_eq!(
            HelperArgs::parse(args.into_iter()).unwrap(),
            HelperArgs {
                spec: "/s/vz.json".into(),
                control: "/s/api.sock".into(),
                vsock: "/s/vsock.sock".into(),
            }
        );
    }

    /// A helper stand-in: answers control requests from `answer`, and
    /// acknowledges vsock connections and echoes what comes.
    async fn fake_helper(
        dir: &Path,
        answer: impl Fn(&ControlRequest) -> crate::control::ControlResponse + Send + 'static,
    ) -> VzVm {
        use crate::control::{read_line, write_line};
        use tokio::io::BufReader;
        use tokio::net::UnixListener;
        let vsock_path = dir.join("vsock.sock");
        let vsock = UnixListener::bind(&vsock_path).unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = vsock.accept().await {
                tokio::spawn(async move {
                    let Ok(Some(port)) = crate::vsock::read_connect(&mut stream).await else {
                        return;
                    };
                    crate::vsock::write_ok(&mut stream, port).await.unwrap();
                    let (mut r, mut w) = stream.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        let (host, helper) = tokio::net::UnixStream::pair().unwrap();
        tokio::spawn(async move {
            let (read, mut write) = helper.into_split();
            let mut read = BufReader::new(read);
            while let Ok(Some(request)) = read_line::<_, ControlRequest>(&mut read).await {
                if write_line(&mut write, &answer(&request)).await.is_err() {
                    break;
                }
            }
        });
        VzVm {
            control: ControlClient::new(host, Duration::from_secs(10)),
            vsock_socket: vsock_path,
            kernel_cmdline: "console=hvc0".into(),
            relays: PortRelays::default(),
        }
    }

    #[tokio::test]
    async fn the_vm_drives_its_helper_and_checks_the_state_it_reports() {
        use crate::control::ControlResponse;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let dir = tempfile::tempdir().unwrap();
        let mut vm = fake_helper(dir.path(), |request| ControlResponse::Done {
            state: match request {
                ControlRequest::Pause | ControlRequest::Save { .. } => VzState::Paused,
                // A resume VZ did not carry out.
                _ => VzState::Paused,
            },
        })
        .await;
        vm.pause().await.unwrap();
        let e = vm.resume().await.unwrap_err();
        assert!(e.to_string().contains("not Running"), "{e}");
        vm.snapshot(dir.path(), SnapshotKind::Full).await.unwrap();
        let diff = vm
            .snapshot(dir.path(), SnapshotKind::Diff)
            .await
            .unwrap_err();
        assert!(
            matches!(diff, SnapshotError::Unsupported { .. }),
            "{diff:?}"
        );
        assert_eq!(vm.counters().await, VmmCounters::default());
        assert_eq!(vm.kernel_cmdline(), "console=hvc0");

        let mut agent = (vm.agent_connector())().await.unwrap();
        agent.write_all(b"ping").await.unwrap();
        let mut back = [0u8; 4];
        agent.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"ping");
    }

    #[tokio::test]
    async fn a_refused_save_is_a_snapshot_error_with_vz_s_reason() {
        use crate::control::ControlResponse;
        use crate::error::{VZ_ERROR_DOMAIN, VzFailure};
        let dir = tempfile::tempdir().unwrap();
        let mut vm = fake_helper(dir.path(), |_| ControlResponse::Failed {
            failure: VzFailure::from_ns_error_parts(VZ_ERROR_DOMAIN, 10, "Not supported."),
        })
        .await;
        let e = vm
            .snapshot(dir.path(), SnapshotKind::Full)
            .await
            .unwrap_err();
        assert!(matches!(e, SnapshotError::Vmm { .. }), "{e:?}");
        let chain = format!("{:?}", std::error::Error::source(&e));
        assert!(chain.contains("Not supported."), "{chain}");
        assert!(chain.contains("macOS 14"), "{chain}");
    }

    #[test]
    fn bad_helper_arguments_say_what_is_wrong() {
        let parse = |words: &[&str]| HelperArgs::parse(words.iter().map(|w| (*w).into()));
        assert_eq!(parse(&["--spec"]).unwrap_err(), "\"--spec\" needs a value");
        assert_eq!(
            parse(&["--bogus", "x"]).unwrap_err(),
            "unknown argument \"--bogus\""
        );
        assert_eq!(
            parse(&["--spec", "a", "--vsock", "b"]).unwrap_err(),
            "missing --control"
        );
    }

    #[tokio::test]
    async fn ports_pass_the_network_check_and_egress_is_refused() {
        use nova_core::config::SandboxConfig;
        use nova_core::hypervisor::Hypervisor;
        use nova_core::network::EgressConfig;
        let home = tempfile::tempdir().unwrap();
        let provider = VzHypervisor::new(VzOptions {
            home: NovaHome::at(home.path()),
            helper: "/nonexistent/nova-vz-vmm".into(),
            scratch_size_mb: DEFAULT_SCRATCH_MB,
        });
        let egress = SandboxConfig {
            egress: Some(EgressConfig {
                block_all: true,
                ..Default::default()
            }),
            ..Default::default()
        };
        let e = provider.create_sandbox(egress).await.unwrap_err();
        assert!(matches!(e, CreateSandboxError::Unsupported { .. }), "{e:?}");
        assert!(e.to_string().contains("network namespace"), "{e}");
        // A published port is this backend's to relay: the create gets past
        // the network check (and stops at the missing template).
        let ports = SandboxConfig {
            host_port: Some(18080),
            ..Default::default()
        };
        let e = provider.create_sandbox(ports).await.unwrap_err();
        assert!(
            !matches!(e, CreateSandboxError::Unsupported { .. }),
            "{e:?}"
        );
    }

    #[test]
    fn a_port_that_cannot_be_bound_is_named_by_its_config_field() {
        use nova_core::config::SandboxConfig;
        use nova_core::network::{PortProtocol, PortSpec};
        let config = SandboxConfig {
            host_port: Some(18080),
            ports: vec![PortSpec::udp(5353, 53)],
            ..Default::default()
        };
        let e = port_error(
            &config,
            RelayBindError {
                index: 1,
                port: 5353,
                protocol: PortProtocol::Udp,
                host_ip: std::net::Ipv4Addr::UNSPECIFIED,
                source: std::io::ErrorKind::AddrInUse.into(),
            },
        );
        assert!(
            matches!(&e, CreateSandboxError::PortUnavailable { field, port: 5353, .. }
                if field == "ports[0]"),
            "{e:?}"
        );
        assert_eq!(
            Vz::from_options(VzOptions::new(NovaHome::at("/n"))).network_mode(),
            NetworkMode::Own
        );
    }

    #[test]
    fn off_macos_the_backend_refuses_with_what_to_do() {
        let home = NovaHome::at("/nonexistent/nova");
        let vz = Vz::from_options(VzOptions {
            home,
            helper: "/nonexistent/nova-vz-vmm".into(),
            scratch_size_mb: DEFAULT_SCRATCH_MB,
        });
        assert_eq!(vz.kind(), HypervisorKind::AppleVz);
        let e = vz.check_host().unwrap_err();
        assert!(matches!(e, CreateSandboxError::Unsupported { .. }), "{e:?}");
        if cfg!(not(target_os = "macos")) {
            assert!(e.to_string().contains("macOS"), "{e}");
            assert!(vz.snapshot_support().is_err());
        }
    }
}
