//! The Firecracker process: its command line (directly or through the
//! jailer), spawning it as the runtime's [`VmmProcess`], and waiting until
//! its API answers.
//!
//! Firecracker runs with its working directory in the sandbox directory (or
//! the jail root), and every per-sandbox file is named relative to it:
//! `--api-sock api.sock`, the vsock socket, the scratch disk, metrics and
//! log. That keeps paths short (Unix socket paths are limited to 107 bytes
//! for the VMM) and makes a snapshot portable: a snapshot names its vsock
//! socket and scratch disk relatively, so loading it into a fresh process in
//! another sandbox directory binds that sandbox's own files.
//!
//! Through the jailer with a new PID namespace the jailer forks and exits;
//! Firecracker's PID then comes from the jailer's pid file and the runtime
//! adopts it ([`Launch::adopt`]), so the PID in `state.json` is always
//! Firecracker's. (Without `--new-pid-ns` the jailer execs Firecracker in
//! place: the spawned PID is Firecracker's.) The jailer's child is PID 1 of
//! its namespace, stays in the jailer's process group (the jailer is not a
//! session leader, so it does not `setsid`), and inherits the jailer's
//! stdout and stderr: the sandbox's `console.log` itself when the provider
//! is detached, so nothing it writes depends on the provider's process.

use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nova_core::error::CreateSandboxError;
use nova_core::hypervisor::HypervisorKind;
use nova_runtime::backend::Launch;
use nova_runtime::console::DEFAULT_LOG_CAP;
use nova_runtime::retry::{RetryError, retry_until, socket_not_ready};
pub use nova_runtime::vmm::VmmExit;
use nova_runtime::vmm::{VmmCommand, VmmProcess};
use tokio::time::Instant;

use crate::api::{ApiClient, ApiError};
use crate::jailer::{Jail, JailLimits};

/// Name of the API socket in the VMM's working directory.
pub const API_SOCKET: &str = "api.sock";
pub use nova_runtime::dir::MAX_SOCKET_PATH;
/// How long the jailer may take to set up a jail and fork.
const JAILER_TIMEOUT: Duration = Duration::from_secs(10);

/// How to start one Firecracker process.
#[derive(Clone, Debug)]
pub struct SpawnSpec<'a> {
    /// The `firecracker` binary.
    pub firecracker: &'a Path,
    /// Instance id (`--id`), reported by `GET /`.
    pub id: &'a str,
    /// The VMM's working directory on the host (ignored with a jail, whose
    /// root is the working directory).
    pub workdir: &'a Path,
    /// Run through the jailer.
    pub jail: Option<&'a Jail>,
    /// Memory and vCPUs, for the jail's cgroup limits.
    pub limits: JailLimits,
    /// File that receives Firecracker's stdout and stderr (the guest serial
    /// console, and its log until the logger is configured), capped.
    pub output: &'a Path,
    /// Pass `--boot-timer`: Firecracker logs the time from `InstanceStart` to
    /// the guest's boot-timer write.
    pub boot_timer: bool,
    /// Extra Firecracker arguments (for example `--no-seccomp` with a debug
    /// build).
    pub extra_args: &'a [OsString],
    /// The sandbox's network namespace, to start Firecracker in (without a
    /// jail; a jail joins it through the jailer's `--netns`).
    pub netns: Option<&'a Arc<OwnedFd>>,
}

impl SpawnSpec<'_> {
    /// Firecracker's own arguments. Through the jailer they leave out
    /// `--id`: the jailer passes its own `--id` (the jail's, which is the
    /// sandbox's) ahead of them, and Firecracker refuses an argument given
    /// twice (exit code 153).
    pub fn firecracker_args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec!["--api-sock".into(), API_SOCKET.into()];
        if self.jail.is_none() {
            args.push("--id".into());
            args.push(self.id.into());
        }
        if self.boot_timer {
            args.push("--boot-timer".into());
        }
        args.extend(self.extra_args.iter().cloned());
        args
    }

    /// The VMM's working directory as seen from the host.
    pub fn host_workdir(&self) -> PathBuf {
        match self.jail {
            Some(jail) => jail.root(),
            None => self.workdir.to_owned(),
        }
    }
}

/// The VMM process could not be started.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SpawnError {
    /// The API socket path would be too long for a Unix socket.
    #[error(
        "socket path {} is longer than {MAX_SOCKET_PATH} bytes; use a shorter NOVA_HOME",
        .0.display()
    )]
    SocketPathTooLong(PathBuf),
    /// The jailer failed to set up the jail.
    #[error("the jailer failed ({0}); see the sandbox's console.log")]
    Jailer(String),
    /// The jailer did not fork Firecracker in time.
    #[error("the jailer did not start Firecracker within {0:?}")]
    JailerTimeout(Duration),
    /// The jailer's pid file could not be read.
    #[error("cannot read Firecracker's PID from {}", .path.display())]
    PidFile {
        /// The pid file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// How Firecracker ended, with its documented exit codes in words.
pub fn describe_exit(exit: VmmExit) -> String {
    match exit {
        VmmExit::Code(code) => format!("exit code {code}: {}", describe_exit_code(code)),
        other => other.to_string(),
    }
}

/// Firecracker's documented process exit codes, in words.
pub fn describe_exit_code(code: i32) -> &'static str {
    match code {
        0 => "clean exit (the guest rebooted, or the VMM was asked to stop)",
        1 => "generic error (see the sandbox's vmm.log)",
        2 => "unexpected error (a Firecracker bug)",
        148 => "a system call outside Firecracker's seccomp filter was intercepted",
        149 => "SIGBUS intercepted (the memory file or a disk shrank or vanished?)",
        150 => "SIGSEGV intercepted",
        151 => "SIGXFSZ intercepted (a file size limit was exceeded)",
        152 => "bad configuration file",
        153 => "bad command-line arguments",
        154 => "SIGXCPU intercepted (the CPU time limit was exceeded)",
        155 => "SIGPIPE intercepted",
        156 => "SIGHUP intercepted",
        157 => "SIGILL intercepted",
        _ => "undocumented exit code",
    }
}

/// The runtime's command for `spec`: Firecracker itself, or the jailer
/// that becomes it.
pub fn command(spec: &SpawnSpec<'_>) -> Result<VmmCommand, SpawnError> {
    let workdir = spec.host_workdir();
    let api_socket = workdir.join(API_SOCKET);
    if api_socket.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(SpawnError::SocketPathTooLong(api_socket));
    }
    let (program, args) = match spec.jail {
        Some(jail) => (
            jail.config().jailer_bin.clone(),
            jail.command_args(spec.limits, &spec.firecracker_args()),
        ),
        None => (spec.firecracker.to_owned(), spec.firecracker_args()),
    };
    Ok(VmmCommand {
        program,
        args,
        cwd: spec.jail.is_none().then_some(workdir),
        stdout: spec.output.to_owned(),
        stderr: spec.output.to_owned(),
        log_cap: DEFAULT_LOG_CAP,
        fds: Vec::new(),
    })
}

/// Starts Firecracker as `spec` says, through `launch`. With a jail in a new
/// PID namespace this waits until the jailer has forked Firecracker, and
/// hands the runtime Firecracker's PID.
pub async fn spawn(
    spec: &SpawnSpec<'_>,
    launch: &mut Launch<'_>,
) -> Result<(), CreateSandboxError> {
    let command = command(spec).map_err(start_error)?;
    launch.spawn_in_netns(&command, spec.netns)?;
    let Some(jail) = spec.jail.filter(|j| j.config().new_pid_ns) else {
        return Ok(());
    };
    let jailer: &mut VmmProcess = launch.vmm().expect("the jailer was spawned just above");
    let exit = tokio::time::timeout(JAILER_TIMEOUT, jailer.wait())
        .await
        .map_err(|_| start_error(SpawnError::JailerTimeout(JAILER_TIMEOUT)))?;
    if exit != VmmExit::Code(0) {
        return Err(start_error(SpawnError::Jailer(describe_exit(exit))));
    }
    let path = jail.pid_file();
    let text = tokio::fs::read_to_string(&path).await.map_err(|source| {
        start_error(SpawnError::PidFile {
            path: path.clone(),
            source,
        })
    })?;
    let pid = text.trim().parse::<u32>().map_err(|e| {
        start_error(SpawnError::PidFile {
            path,
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        })
    })?;
    launch.adopt(pid)
}

fn start_error(e: SpawnError) -> CreateSandboxError {
    CreateSandboxError::Vmm {
        vmm: HypervisorKind::Firecracker.vmm_name(),
        action: "start".into(),
        source: Box::new(e),
    }
}

/// Connects to Firecracker's API socket, retrying while it is not there
/// yet, and checks that the API answers `GET /`; gives up at `deadline`.
pub async fn connect_api(socket: &Path, deadline: Instant) -> Result<ApiClient, ApiError> {
    let transient =
        |e: &ApiError| matches!(e, ApiError::Connect { source, .. } if socket_not_ready(source));
    let attempt = || async {
        let mut client = ApiClient::connect(socket).await?;
        client.instance_info().await?;
        Ok(client)
    };
    match retry_until(deadline, attempt, transient).await {
        Ok(client) => Ok(client),
        Err(RetryError::Failed(e)) => Err(e),
        Err(RetryError::TimedOut(last)) => Err(last.unwrap_or_else(|| ApiError::Connect {
            socket: socket.to_owned(),
            source: std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "Firecracker's API did not answer in time",
            ),
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jailer::JailerConfig;

    #[test]
    fn exit_codes_in_words() {
        assert_eq!(
            describe_exit(VmmExit::Code(148)),
            "exit code 148: a system call outside Firecracker's seccomp filter was intercepted"
        );
        assert!(describe_exit(VmmExit::Code(0)).contains("clean exit"));
        assert!(describe_exit(VmmExit::Code(153)).contains("command-line"));
        assert_eq!(describe_exit(VmmExit::Signal(9)), "killed by SIGKILL");
        assert_eq!(describe_exit_code(77), "undocumented exit code");
    }

    fn spec<'a>(jail: Option<&'a Jail>, workdir: &'a Path, output: &'a Path) -> SpawnSpec<'a> {
        SpawnSpec {
            firecracker: Path::new("/opt/firecracker"),
            id: "sb-1",
            workdir,
            jail,
            limits: JailLimits {
                memory_mib: 128,
                vcpus: 1,
            },
            output,
            boot_timer: true,
            extra_args: &[],
            netns: None,
        }
    }

    #[test]
    fn firecracker_arguments_workdir_and_command() {
        let s = spec(None, Path::new("/n/sandboxes/sb-1"), Path::new("/dev/null"));
        assert_eq!(
            s.firecracker_args(),
            ["--api-sock", "api.sock", "--id", "sb-1", "--boot-timer"].map(OsString::from)
        );
        assert_eq!(s.host_workdir(), Path::new("/n/sandboxes/sb-1"));
        let c = command(&s).unwrap();
        assert_eq!(c.program, Path::new("/opt/firecracker"));
        assert_eq!(c.cwd.as_deref(), Some(Path::new("/n/sandboxes/sb-1")));
        let jail = Jail::new(
            JailerConfig::new("/j", 1, 1),
            "sb-1",
            Path::new("/opt/firecracker"),
        )
        .unwrap();
        let s = spec(Some(&jail), Path::new("/ignored"), Path::new("/dev/null"));
        assert_eq!(
            s.host_workdir(),
            Path::new("/srv/jailer/firecracker/sb-1/root")
        );
        let c = command(&s).unwrap();
        assert_eq!(c.program, Path::new("/j"));
        assert_eq!(c.cwd, None, "the jailer chroots; it picks the directory");
        // The jailer gives Firecracker `--id` itself; a second one would
        // make Firecracker exit with code 153.
        let ids = c.args.iter().filter(|a| *a == "--id").count();
        assert_eq!(ids, 1, "{:?}", c.args);
        let tail = c.args.iter().position(|a| a == "--").unwrap();
        assert_eq!(
            c.args[tail + 1..],
            ["--api-sock", "api.sock", "--boot-timer"].map(OsString::from)
        );
    }

    #[test]
    fn a_long_socket_path_is_refused() {
        let long = PathBuf::from("/").join("x".repeat(120));
        let s = spec(None, &long, Path::new("/dev/null"));
        assert!(matches!(command(&s), Err(SpawnError::SocketPathTooLong(_))));
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_for_a_missing_api_socket_ends_at_the_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let deadline = Instant::now() + Duration::from_secs(2);
        let e = connect_api(&dir.path().join(API_SOCKET), deadline)
            .await
            .unwrap_err();
        assert!(matches!(e, ApiError::Connect { .. }), "{e}");
    }
}
