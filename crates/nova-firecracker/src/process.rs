//! The Firecracker process: spawning it (directly or through the jailer),
//! waiting until its API answers, watching it exit, killing it.
//!
//! Firecracker runs with its working directory in the sandbox directory (or
//! the jail root), and every per-sandbox file is named relative to it:
//! `--api-sock api.sock`, the vsock socket, the scratch disk, metrics and
//! log. That keeps paths short (Unix socket paths are limited to 107 bytes
//! for the VMM) and makes a snapshot portable: a snapshot names its vsock
//! socket and scratch disk relatively, so loading it into a fresh process in
//! another sandbox directory binds that sandbox's own files.
//!
//! The process is put in its own process group and killed on drop. Through
//! the jailer with a new PID namespace the jailer forks and exits; the
//! Firecracker PID then comes from the jailer's pid file and the process is
//! watched and signalled by PID.

use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::api::{ApiClient, ApiError};
use crate::jailer::{Jail, JailLimits};

/// Name of the API socket in the VMM's working directory.
pub const API_SOCKET: &str = "api.sock";
/// Longest Unix socket path (`sun_path` is 108 bytes with its NUL).
pub const MAX_SOCKET_PATH: usize = 107;
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
    /// console, and its log until the logger is configured).
    pub output: &'a Path,
    /// Pass `--boot-timer`: Firecracker logs the time from `InstanceStart` to
    /// the guest's boot-timer write.
    pub boot_timer: bool,
    /// Extra Firecracker arguments (for example `--no-seccomp` with a debug
    /// build).
    pub extra_args: &'a [OsString],
}

impl SpawnSpec<'_> {
    /// Firecracker's own arguments.
    pub fn firecracker_args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec![
            "--api-sock".into(),
            API_SOCKET.into(),
            "--id".into(),
            self.id.into(),
        ];
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
    /// `exec` failed.
    #[error("cannot start {}", .program.display())]
    Exec {
        /// The program.
        program: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The output file could not be opened.
    #[error("cannot open {}", .path.display())]
    Output {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The API socket path would be too long for a Unix socket.
    #[error(
        "socket path {} is longer than {MAX_SOCKET_PATH} bytes; use a shorter NOVA_HOME",
        .0.display()
    )]
    SocketPathTooLong(PathBuf),
    /// The jailer failed to set up the jail.
    #[error("the jailer failed ({0}); see the sandbox's console.log")]
    Jailer(VmmExit),
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

/// Firecracker did not become ready to take API requests.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiReadyError {
    /// It exited first.
    #[error("Firecracker exited ({0}) before its API answered")]
    Exited(VmmExit),
    /// Time ran out.
    #[error("Firecracker's API did not answer in time")]
    Timeout,
    /// The socket appeared but the API failed.
    #[error("Firecracker's API failed")]
    Api(#[source] ApiError),
}

/// How a Firecracker process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmmExit {
    /// It exited with this code.
    Code(i32),
    /// A signal killed it.
    Signal(i32),
    /// It was not our child (jailed in a new PID namespace): it is gone, but
    /// its status is not known.
    Unknown,
}

impl VmmExit {
    fn from_status(status: std::process::ExitStatus) -> Self {
        use std::os::unix::process::ExitStatusExt;
        match (status.code(), status.signal()) {
            (Some(code), _) => Self::Code(code),
            (None, Some(signal)) => Self::Signal(signal),
            (None, None) => Self::Unknown,
        }
    }
}

impl fmt::Display for VmmExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Code(code) => write!(f, "exit code {code}: {}", describe_exit_code(*code)),
            Self::Signal(9) => f.write_str("killed by SIGKILL"),
            Self::Signal(signal) => write!(f, "killed by signal {signal}"),
            Self::Unknown => f.write_str("exited, status unknown (not our child)"),
        }
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

/// A running (or exited) Firecracker process.
#[derive(Debug)]
pub struct VmmProcess {
    /// Our child: Firecracker itself, or the jailer that execs into it.
    child: Option<Child>,
    /// Firecracker's PID when it is not our child (new PID namespace).
    detached: Option<u32>,
    api_socket: PathBuf,
    workdir: PathBuf,
    exit: Option<VmmExit>,
}

impl VmmProcess {
    /// Starts Firecracker as `spec` says. With a jail in a new PID namespace
    /// this waits until the jailer has forked Firecracker.
    pub async fn spawn(spec: &SpawnSpec<'_>) -> Result<Self, SpawnError> {
        let workdir = spec.host_workdir();
        let api_socket = workdir.join(API_SOCKET);
        if api_socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(SpawnError::SocketPathTooLong(api_socket));
        }
        let output_err = |source| SpawnError::Output {
            path: spec.output.to_owned(),
            source,
        };
        let output = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(spec.output)
            .map_err(output_err)?;
        let output2 = output.try_clone().map_err(output_err)?;
        let (program, args) = match spec.jail {
            Some(jail) => (
                jail.config().jailer_bin.clone(),
                jail.command_args(spec.limits, &spec.firecracker_args()),
            ),
            None => (spec.firecracker.to_owned(), spec.firecracker_args()),
        };
        let mut command = Command::new(&program);
        command
            .args(&args)
            .stdin(Stdio::null())
            .stdout(output)
            .stderr(output2)
            .kill_on_drop(true)
            .process_group(0);
        if spec.jail.is_none() {
            command.current_dir(&workdir);
        }
        let mut child = command
            .spawn()
            .map_err(|source| SpawnError::Exec { program, source })?;
        let mut detached = None;
        if let Some(jail) = spec.jail.filter(|j| j.config().new_pid_ns) {
            let status = tokio::time::timeout(JAILER_TIMEOUT, child.wait())
                .await
                .map_err(|_| SpawnError::JailerTimeout(JAILER_TIMEOUT))?
                .map_err(|source| SpawnError::Exec {
                    program: jail.config().jailer_bin.clone(),
                    source,
                })?;
            if !status.success() {
                return Err(SpawnError::Jailer(VmmExit::from_status(status)));
            }
            let path = jail.pid_file();
            let text = std::fs::read_to_string(&path).map_err(|source| SpawnError::PidFile {
                path: path.clone(),
                source,
            })?;
            let pid = text
                .trim()
                .parse::<u32>()
                .map_err(|e| SpawnError::PidFile {
                    path,
                    source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
                })?;
            detached = Some(pid);
        }
        Ok(Self {
            child: (detached.is_none()).then_some(child),
            detached,
            api_socket,
            workdir,
            exit: None,
        })
    }

    /// Firecracker's PID, while it runs.
    pub fn pid(&self) -> Option<u32> {
        if self.exit.is_some() {
            return None;
        }
        self.detached
            .or_else(|| self.child.as_ref().and_then(Child::id))
    }

    /// The API socket, as seen from the host.
    pub fn api_socket(&self) -> &Path {
        &self.api_socket
    }

    /// The VMM's working directory, as seen from the host.
    pub fn workdir(&self) -> &Path {
        &self.workdir
    }

    /// How it exited, once it has.
    pub fn exit_status(&self) -> Option<VmmExit> {
        self.exit
    }

    /// Waits until the API socket answers `GET /`, or the process exits, or
    /// `deadline` passes.
    pub async fn wait_api(&mut self, deadline: Instant) -> Result<ApiClient, ApiReadyError> {
        let socket = self.api_socket.clone();
        let connect = async move {
            let mut delay = Duration::from_micros(200);
            loop {
                match ApiClient::connect(&socket).await {
                    Ok(mut client) => {
                        client.instance_info().await?;
                        return Ok(client);
                    }
                    Err(ApiError::Connect { source, .. })
                        if matches!(
                            source.kind(),
                            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                        ) =>
                    {
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_millis(10));
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        tokio::select! {
            r = tokio::time::timeout_at(deadline, connect) => match r {
                Ok(Ok(client)) => Ok(client),
                Ok(Err(e)) => Err(ApiReadyError::Api(e)),
                Err(_) => Err(ApiReadyError::Timeout),
            },
            exit = self.wait() => Err(ApiReadyError::Exited(exit)),
        }
    }

    /// Waits for the process to exit and says how. Cancel-safe; returns at
    /// once if it already exited.
    pub async fn wait(&mut self) -> VmmExit {
        if let Some(exit) = self.exit {
            return exit;
        }
        let exit = if let Some(pid) = self.detached {
            while pid_alive(pid) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            VmmExit::Unknown
        } else if let Some(child) = self.child.as_mut() {
            match child.wait().await {
                Ok(status) => VmmExit::from_status(status),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot wait for Firecracker");
                    VmmExit::Unknown
                }
            }
        } else {
            return std::future::pending().await;
        };
        self.exit = Some(exit);
        exit
    }

    /// Sends SIGKILL (if still running) without waiting.
    pub fn start_kill(&mut self) {
        if self.exit.is_some() {
            return;
        }
        if let Some(pid) = self.detached {
            kill_pid(pid);
        } else if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
    }

    /// Kills the process (if still running) and waits until it is gone.
    pub async fn kill(&mut self) -> VmmExit {
        self.start_kill();
        self.wait().await
    }
}

impl Drop for VmmProcess {
    fn drop(&mut self) {
        // A child is killed by `kill_on_drop`; a detached one needs a signal.
        if self.exit.is_none()
            && let Some(pid) = self.detached
        {
            kill_pid(pid);
        }
    }
}

fn kill_pid(pid: u32) {
    let Some(pid) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    else {
        return;
    };
    if let Err(e) = rustix::process::kill_process(pid, rustix::process::Signal::KILL)
        && e != rustix::io::Errno::SRCH
    {
        tracing::warn!(pid = pid.as_raw_nonzero().get(), error = %e, "cannot kill Firecracker");
    }
}

/// Whether `pid` names a process that has not exited (zombies count as
/// exited).
fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jailer::JailerConfig;

    #[test]
    fn exit_codes_in_words() {
        assert_eq!(
            VmmExit::Code(148).to_string(),
            "exit code 148: a system call outside Firecracker's seccomp filter was intercepted"
        );
        assert!(VmmExit::Code(0).to_string().contains("clean exit"));
        assert!(VmmExit::Code(153).to_string().contains("command-line"));
        assert_eq!(VmmExit::Signal(9).to_string(), "killed by SIGKILL");
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
        }
    }

    #[test]
    fn firecracker_arguments_and_workdir() {
        let s = spec(None, Path::new("/n/sandboxes/sb-1"), Path::new("/dev/null"));
        assert_eq!(
            s.firecracker_args(),
            ["--api-sock", "api.sock", "--id", "sb-1", "--boot-timer"].map(OsString::from)
        );
        assert_eq!(s.host_workdir(), Path::new("/n/sandboxes/sb-1"));
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
    }

    #[tokio::test]
    async fn reports_a_binary_that_cannot_run_and_a_long_socket_path() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out.log");
        let mut s = spec(None, dir.path(), &out);
        s.firecracker = Path::new("/nonexistent/firecracker");
        assert!(matches!(
            VmmProcess::spawn(&s).await,
            Err(SpawnError::Exec { .. })
        ));
        let long = dir.path().join("x".repeat(120));
        let s = spec(None, &long, &out);
        assert!(matches!(
            VmmProcess::spawn(&s).await,
            Err(SpawnError::SocketPathTooLong(_))
        ));
    }

    /// A process that exits before its API socket appears is reported with
    /// its exit status, not as a timeout.
    #[tokio::test]
    async fn early_exit_wins_over_waiting_for_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out.log");
        let mut s = spec(None, dir.path(), &out);
        s.firecracker = Path::new("/bin/false");
        let mut vmm = VmmProcess::spawn(&s).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        match vmm.wait_api(deadline).await {
            Err(ApiReadyError::Exited(VmmExit::Code(1))) => {}
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(vmm.pid(), None);
        assert_eq!(vmm.kill().await, VmmExit::Code(1));
    }

    #[tokio::test]
    async fn kill_ends_a_running_process() {
        let dir = tempfile::tempdir().unwrap();
        let mut command = Command::new("/bin/sh");
        command.args(["-c", "exec sleep 30"]).kill_on_drop(true);
        let mut vmm = VmmProcess {
            child: Some(command.spawn().unwrap()),
            detached: None,
            api_socket: dir.path().join(API_SOCKET),
            workdir: dir.path().to_owned(),
            exit: None,
        };
        let pid = vmm.pid().unwrap();
        assert!(pid_alive(pid));
        assert_eq!(vmm.kill().await, VmmExit::Signal(9));
        assert!(!pid_alive(pid));
        assert_eq!(vmm.wait().await, VmmExit::Signal(9));
    }
}
