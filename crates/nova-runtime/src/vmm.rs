//! The VMM process, one type for every backend.
//!
//! A [`VmmProcess`] is a VMM (QEMU, Firecracker, or the jailer that becomes
//! Firecracker) that this process started:
//!
//! - it runs in its own process group, so whatever it forks is killed with it
//!   and a terminal's Ctrl-C does not reach it;
//! - it is watched through a pidfd (`pidfd_open(2)`): waiting is an epoll
//!   readiness, not polling, and signals go through the pidfd, so a recycled
//!   PID is never signalled (off Linux, on macOS, a kqueue `NOTE_EXIT`
//!   filter stands in for the pidfd and signals go by PID);
//! - it is killed when dropped (the process group, then the pidfd), and a
//!   child is reaped by tokio's orphan queue; [`VmmProcess::kill`] kills and
//!   waits.
//!
//! - it inherits exactly the descriptors its [`VmmCommand::fds`] name (a
//!   tap for QEMU's `-netdev tap,fd=N`), at the numbers given there: they
//!   are duplicated onto those numbers, without `FD_CLOEXEC`, in the child
//!   only (the `command-fds` crate's `pre_exec` hook), so no other child
//!   of this process ever sees them.
//!
//! A VMM that opens its network device by name (Firecracker's tap) is
//! started inside the sandbox's network namespace
//! ([`VmmProcess::spawn_in_netns`]): the child calls `setns(2)` on the
//! namespace's descriptor between fork and exec, so no thread of this
//! process changes namespace.
//!
//! A process this one did not fork (Firecracker forked by the jailer into a
//! new PID namespace, or a VMM a dead provider left running) is
//! [adopted](VmmProcess::adopt) by PID: watched and killed through a pidfd
//! the same way, but its exit status is not ours to read.
//!
//! **Detached VMMs** ([`SpawnMode::Detached`]) are for a provider whose VMs
//! must outlive it (a daemon that restarts): their stdout and stderr go
//! straight to their files (appended, not through pipes this process pumps,
//! which would die with it: a VMM writing to a pipe without a reader gets
//! `EPIPE`, or blocks), so the size cap of [`crate::console`] does not
//! apply to them. Such a process is still killed when dropped until
//! [`VmmProcess::set_kill_on_drop`] turns that off (once its sandbox is
//! registered), so a failed boot leaves nothing.

use std::ffi::OsString;
use std::fmt;
use std::os::fd::{OwnedFd, RawFd};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;

use command_fds::{CommandFdExt, FdMapping};

use rustix::process::{Pid, Signal};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::process::{Child, Command};

/// How a VMM process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmmExit {
    /// It exited with this code.
    Code(i32),
    /// A signal killed it.
    Signal(i32),
    /// It was not our child (adopted by PID): it is gone, but its status is
    /// not known.
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
            Self::Code(code) => write!(f, "exit code {code}"),
            Self::Signal(9) => f.write_str("killed by SIGKILL"),
            Self::Signal(signal) => write!(f, "killed by signal {signal}"),
            Self::Unknown => f.write_str("exited, status unknown (not our child)"),
        }
    }
}

/// How to start a VMM process.
#[derive(Clone, Debug)]
pub struct VmmCommand {
    /// The binary.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<OsString>,
    /// Its working directory (inherited when `None`).
    pub cwd: Option<PathBuf>,
    /// File that receives its stdout (created or appended to, up to
    /// `log_cap` bytes: see [`crate::console`]).
    pub stdout: PathBuf,
    /// File that receives its stderr (may be the same as `stdout`).
    pub stderr: PathBuf,
    /// Most bytes written to each of those files.
    pub log_cap: u64,
    /// Descriptors the process inherits (everything else of ours is
    /// close-on-exec).
    pub fds: Vec<InheritedFd>,
}

/// A descriptor a VMM inherits, and the number it has in the VMM.
#[derive(Clone, Debug)]
pub struct InheritedFd {
    /// Our descriptor (shared: a [`VmmCommand`] may be spawned again).
    pub fd: Arc<OwnedFd>,
    /// Its number in the child, which the VMM's arguments name; 3 or more,
    /// each number once.
    pub child_fd: RawFd,
}

/// Whether a VMM's life and output depend on this process.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SpawnMode {
    /// Output pumped into capped files by this process; the VMM is killed
    /// with its [`VmmProcess`] (the default).
    #[default]
    Owned,
    /// Output written by the VMM to its files directly (no cap); the VMM
    /// can outlive this process (see the module docs).
    Detached,
}

/// The first descriptor number after stdin, stdout and stderr.
pub const FIRST_INHERITED_FD: RawFd = 3;

/// A VMM process could not be started.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VmmSpawnError {
    /// `exec` failed (not found, not executable, ...).
    #[error("cannot start {}", .program.display())]
    Exec {
        /// The binary.
        program: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// An output file could not be opened.
    #[error("cannot open {}", .path.display())]
    Output {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A descriptor to inherit could not be prepared (duplicated, or two
    /// of them want the same number).
    #[error("cannot pass descriptor {child_fd} to the VMM")]
    Fds {
        /// The number it was to have in the VMM.
        child_fd: RawFd,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The process could not be watched (`pidfd_open` failed: Linux older
    /// than 5.3, or the process is already gone).
    #[error("cannot watch process {pid} (pidfd_open)")]
    Pidfd {
        /// The process.
        pid: u32,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// A running (or exited) VMM process; see the module docs.
#[derive(Debug)]
pub struct VmmProcess {
    /// Our child, when we forked it.
    child: Option<Child>,
    pid: u32,
    /// Process group to kill with it (our child's own group).
    group: Option<Pid>,
    pidfd: AsyncFd<OwnedFd>,
    /// Start time in clock ticks since boot (`/proc/PID/stat` field 22), so
    /// a later reader of `state.json` can tell this process from a PID reuse.
    start_ticks: Option<u64>,
    exit: Option<VmmExit>,
    /// Whether dropping it kills the VMM.
    kill_on_drop: bool,
}

#[cfg(target_os = "linux")]
fn pidfd(pid: u32) -> Result<AsyncFd<OwnedFd>, VmmSpawnError> {
    use rustix::process::PidfdFlags;
    let err = |source: std::io::Error| VmmSpawnError::Pidfd { pid, source };
    let raw = raw_pid(pid).ok_or_else(|| err(rustix::io::Errno::SRCH.into()))?;
    let fd = rustix::process::pidfd_open(raw, PidfdFlags::NONBLOCK).map_err(|e| err(e.into()))?;
    register(fd).map_err(err)
}

/// Off Linux (macOS, for the Apple VZ helper) there is no pidfd: a kqueue
/// holding one `EVFILT_PROC`/`NOTE_EXIT` filter on the PID turns readable
/// when the process exits, which is all [`VmmProcess::wait`] needs.
#[cfg(not(target_os = "linux"))]
fn pidfd(pid: u32) -> Result<AsyncFd<OwnedFd>, VmmSpawnError> {
    use rustix::event::kqueue::{Event, EventFilter, EventFlags, ProcessEvents, kevent, kqueue};
    let err = |source: std::io::Error| VmmSpawnError::Pidfd { pid, source };
    let raw = raw_pid(pid).ok_or_else(|| err(rustix::io::Errno::SRCH.into()))?;
    let kq = kqueue().map_err(|e| err(e.into()))?;
    let exit = Event::new(
        EventFilter::Proc {
            pid: raw,
            flags: ProcessEvents::EXIT,
        },
        EventFlags::ADD | EventFlags::ONESHOT,
        std::ptr::null_mut(),
    );
    let mut none: Vec<Event> = Vec::new();
    #[allow(unsafe_code, reason = "kevent is unsafe in rustix")]
    // SAFETY: the one change names a process, not a file descriptor, so no
    // descriptor has to stay open for the kqueue's lifetime (kevent's only
    // requirement); the event list is an empty, owned vector.
    let added = unsafe { kevent(&kq, &[exit], &mut none, Some(std::time::Duration::ZERO)) };
    added.map_err(|e| err(e.into()))?;
    register(kq).map_err(err)
}

fn raw_pid(pid: u32) -> Option<Pid> {
    i32::try_from(pid).ok().and_then(Pid::from_raw)
}

fn register(fd: OwnedFd) -> std::io::Result<AsyncFd<OwnedFd>> {
    #[allow(
        unsafe_code,
        reason = "tokio's registration of a raw descriptor is unsafe"
    )]
    // SAFETY: the `OwnedFd` is moved into the `AsyncFd`, which owns it until
    // it is dropped: the descriptor is valid and open for the whole
    // registration, nothing else can close it, and `as_raw_fd` on an
    // `OwnedFd` always returns that same descriptor.
    let registered = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) };
    registered.map_err(Into::into)
}

impl VmmProcess {
    /// Starts `command` in its own process group with stdin from
    /// `/dev/null`, and opens a pidfd on it. Must be called inside a tokio
    /// runtime.
    pub fn spawn(command: &VmmCommand) -> Result<Self, VmmSpawnError> {
        Self::spawn_with(command, SpawnMode::Owned)
    }

    /// [`spawn`](Self::spawn), detached from this process when `mode` says
    /// so (see the module docs).
    pub fn spawn_with(command: &VmmCommand, mode: SpawnMode) -> Result<Self, VmmSpawnError> {
        Self::spawn_in_netns(command, mode, None)
    }

    /// [`spawn_with`](Self::spawn_with), the child entering the network
    /// namespace `netns` (an open `/run/netns/...` file) before it execs.
    pub fn spawn_in_netns(
        command: &VmmCommand,
        mode: SpawnMode,
        netns: Option<&Arc<OwnedFd>>,
    ) -> Result<Self, VmmSpawnError> {
        if mode == SpawnMode::Detached {
            return Self::spawn_detached(command, netns);
        }
        let output_err = |path: &PathBuf| {
            let path = path.clone();
            move |source| VmmSpawnError::Output { path, source }
        };
        // stdout and stderr are pipes pumped into capped files; when both go
        // to one file they share one pipe, so their lines interleave as
        // written. The pumps end when the VMM (and whatever it forked)
        // closed the pipes, so they never outlive it.
        let (out_rx, out_tx) = std::io::pipe().map_err(output_err(&command.stdout))?;
        let (err_rx, err_tx) = if command.stderr == command.stdout {
            (
                None,
                out_tx.try_clone().map_err(output_err(&command.stderr))?,
            )
        } else {
            let (rx, tx) = std::io::pipe().map_err(output_err(&command.stderr))?;
            (Some(rx), tx)
        };
        let mut cmd = Command::new(&command.program);
        cmd.args(&command.args)
            .stdin(Stdio::null())
            .stdout(out_tx)
            .stderr(err_tx)
            .kill_on_drop(true)
            .process_group(0);
        if let Some(cwd) = &command.cwd {
            cmd.current_dir(cwd);
        }
        inherit_fds(&mut cmd, &command.fds)?;
        enter_netns(&mut cmd, netns);
        let child = cmd.spawn().map_err(|source| VmmSpawnError::Exec {
            program: command.program.clone(),
            source,
        })?;
        // Our copies of the write ends live in `cmd`; close them so the pumps
        // see end-of-file when the VMM is gone.
        drop(cmd);
        for (reader, path) in [(Some(out_rx), &command.stdout), (err_rx, &command.stderr)] {
            let Some(reader) = reader else { continue };
            let receiver = tokio::net::unix::pipe::Receiver::from_owned_fd(OwnedFd::from(reader))
                .map_err(output_err(path))?;
            tokio::spawn(crate::console::pump(
                receiver,
                path.clone(),
                command.log_cap,
            ));
        }
        let pid = child
            .id()
            .expect("a child that was just spawned and not waited for has a PID");
        let pidfd = pidfd(pid)?;
        Ok(Self {
            child: Some(child),
            pid,
            group: i32::try_from(pid).ok().and_then(Pid::from_raw),
            pidfd,
            start_ticks: process_start_ticks(pid),
            exit: None,
            kill_on_drop: true,
        })
    }

    fn spawn_detached(
        command: &VmmCommand,
        netns: Option<&Arc<OwnedFd>>,
    ) -> Result<Self, VmmSpawnError> {
        let open = |path: &PathBuf| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| VmmSpawnError::Output {
                    path: path.clone(),
                    source,
                })
        };
        let stdout = open(&command.stdout)?;
        let stderr = if command.stderr == command.stdout {
            stdout.try_clone().map_err(|source| VmmSpawnError::Output {
                path: command.stderr.clone(),
                source,
            })?
        } else {
            open(&command.stderr)?
        };
        let mut cmd = Command::new(&command.program);
        cmd.args(&command.args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .kill_on_drop(false)
            .process_group(0);
        if let Some(cwd) = &command.cwd {
            cmd.current_dir(cwd);
        }
        inherit_fds(&mut cmd, &command.fds)?;
        enter_netns(&mut cmd, netns);
        let child = cmd.spawn().map_err(|source| VmmSpawnError::Exec {
            program: command.program.clone(),
            source,
        })?;
        drop(cmd);
        let pid = child
            .id()
            .expect("a child that was just spawned and not waited for has a PID");
        let pidfd = pidfd(pid)?;
        Ok(Self {
            child: Some(child),
            pid,
            group: i32::try_from(pid).ok().and_then(Pid::from_raw),
            pidfd,
            start_ticks: process_start_ticks(pid),
            exit: None,
            kill_on_drop: true,
        })
    }

    /// Watches a VMM this process did not fork (it is not our child), by
    /// PID. Killed when dropped, unless [`set_kill_on_drop`](Self::set_kill_on_drop)
    /// says otherwise.
    pub fn adopt(pid: u32) -> Result<Self, VmmSpawnError> {
        let pidfd = pidfd(pid)?;
        Ok(Self {
            child: None,
            pid,
            group: None,
            pidfd,
            start_ticks: process_start_ticks(pid),
            exit: None,
            kill_on_drop: true,
        })
    }

    /// Adopts the VMM `pid` that a dead provider left running, if it is
    /// still the process that started at `start_ticks` (a reused PID is
    /// never taken for it). The pidfd is opened first and the start time
    /// checked after, so the pidfd cannot name a newer process. Its process
    /// group is killed with it, as the group it was spawned in.
    pub fn adopt_verified(pid: u32, start_ticks: u64) -> Result<Self, VmmSpawnError> {
        let mut vmm = Self::adopt(pid)?;
        if vmm.start_ticks != Some(start_ticks) || process_exited(pid) {
            vmm.kill_on_drop = false;
            return Err(VmmSpawnError::Pidfd {
                pid,
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "the process with this PID is not the VMM that was recorded (its start \
                     time differs): the VMM exited",
                ),
            });
        }
        // Spawned with `process_group(0)`: its group id is its PID, and the
        // group cannot be another's while the leader lives.
        vmm.group = i32::try_from(pid).ok().and_then(Pid::from_raw);
        Ok(vmm)
    }

    /// Whether dropping this kills the VMM (it does by default). A detached
    /// provider turns it off for a VMM whose sandbox is registered, so that
    /// the VMM outlives the provider.
    pub fn set_kill_on_drop(&mut self, kill: bool) {
        self.kill_on_drop = kill;
    }

    /// Its PID, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.exit.is_none().then_some(self.pid)
    }

    /// Its start time in clock ticks since boot, if it could be read.
    pub fn start_ticks(&self) -> Option<u64> {
        self.start_ticks
    }

    /// How it exited, once it has.
    pub fn exit_status(&self) -> Option<VmmExit> {
        self.exit
    }

    /// Waits for the process to exit and says how. Cancel-safe; returns at
    /// once if it already exited.
    pub async fn wait(&mut self) -> VmmExit {
        if let Some(exit) = self.exit {
            return exit;
        }
        // The pidfd turns readable when the process exits.
        loop {
            match self.pidfd.readable().await {
                Ok(mut guard) => {
                    guard.retain_ready();
                    break;
                }
                Err(e) => {
                    tracing::warn!(pid = self.pid, error = %e, "cannot poll the VMM's pidfd");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
            }
        }
        let exit = match self.child.as_mut() {
            Some(child) => match child.wait().await {
                Ok(status) => VmmExit::from_status(status),
                Err(e) => {
                    tracing::warn!(pid = self.pid, error = %e, "cannot reap the VMM");
                    VmmExit::Unknown
                }
            },
            None => VmmExit::Unknown,
        };
        self.exit = Some(exit);
        exit
    }

    /// Sends SIGKILL to its process group and to it, without waiting.
    pub fn start_kill(&mut self) {
        if self.exit.is_some() {
            return;
        }
        // Until we reap it, the leader's PID (and so its group id) cannot be
        // reused, so the group signal cannot reach a stranger.
        if let Some(group) = self.group
            && let Err(e) = rustix::process::kill_process_group(group, Signal::KILL)
            && e != rustix::io::Errno::SRCH
        {
            tracing::warn!(pid = self.pid, error = %e, "cannot kill the VMM's process group");
        }
        if let Err(e) = self.signal_kill()
            && e != rustix::io::Errno::SRCH
        {
            tracing::warn!(pid = self.pid, error = %e, "cannot kill the VMM");
        }
    }

    /// SIGKILL through the pidfd, which cannot name a recycled PID.
    #[cfg(target_os = "linux")]
    fn signal_kill(&self) -> rustix::io::Result<()> {
        rustix::process::pidfd_send_signal(self.pidfd.get_ref(), Signal::KILL)
    }

    /// SIGKILL by PID (no pidfd off Linux). A child's PID cannot be reused
    /// until it is reaped, which [`Self::wait`] does only after its exit.
    #[cfg(not(target_os = "linux"))]
    fn signal_kill(&self) -> rustix::io::Result<()> {
        match raw_pid(self.pid) {
            Some(pid) => rustix::process::kill_process(pid, Signal::KILL),
            None => Err(rustix::io::Errno::SRCH),
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
        // A child is also killed by `kill_on_drop` (unless detached), and
        // reaped by tokio.
        if self.kill_on_drop {
            self.start_kill();
        }
    }
}

/// Has the child of `cmd` enter the network namespace `netns` before exec.
#[cfg(target_os = "linux")]
#[expect(unsafe_code, reason = "a pre_exec hook is unsafe")]
fn enter_netns(cmd: &mut Command, netns: Option<&Arc<OwnedFd>>) {
    let Some(netns) = netns else { return };
    let netns = netns.clone();
    // SAFETY: the hook runs in the child between fork and exec, where only
    // async-signal-safe calls are allowed: it makes one raw system call,
    // setns(2) (rustix, no libc wrapper state), on a descriptor the closure
    // owns (an `Arc` clone, alive in the child's copy of memory), and
    // allocates nothing and takes no lock (an error is a plain errno).
    unsafe {
        cmd.pre_exec(move || {
            rustix::thread::move_into_link_name_space(
                std::os::fd::AsFd::as_fd(&*netns),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )
            .map_err(std::io::Error::from)
        });
    }
}

/// Off Linux there are no network namespaces (nova-net makes none there),
/// so a caller never has one to enter.
#[cfg(not(target_os = "linux"))]
fn enter_netns(_cmd: &mut Command, netns: Option<&Arc<OwnedFd>>) {
    debug_assert!(netns.is_none(), "network namespaces exist only on Linux");
}

/// Has `cmd` inherit `fds` at their numbers (see the module docs).
fn inherit_fds(cmd: &mut Command, fds: &[InheritedFd]) -> Result<(), VmmSpawnError> {
    if !fds.is_empty() {
        let mut mappings = Vec::with_capacity(fds.len());
        for inherited in fds {
            let child_fd = inherited.child_fd;
            let fds_err = |source| VmmSpawnError::Fds { child_fd, source };
            if child_fd < FIRST_INHERITED_FD {
                return Err(fds_err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "0, 1 and 2 are the VMM's standard streams",
                )));
            }
            mappings.push(FdMapping {
                parent_fd: inherited.fd.try_clone().map_err(fds_err)?,
                child_fd,
            });
        }
        let first = mappings.first().map_or(FIRST_INHERITED_FD, |m| m.child_fd);
        cmd.fd_mappings(mappings).map_err(|e| VmmSpawnError::Fds {
            child_fd: first,
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
        })?;
    }
    Ok(())
}

/// The start time of process `pid` in clock ticks since boot, from
/// `/proc/PID/stat`.
pub fn process_start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_start_ticks(&stat)
}

/// Whether process `pid` has exited but is not reaped yet (a zombie: its
/// `/proc/PID/stat` state is `Z` or `X`), or is gone.
pub fn process_exited(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return true;
    };
    stat.rfind(')')
        .and_then(|i| stat[i + 1..].trim_start().chars().next())
        .is_none_or(|state| matches!(state, 'Z' | 'X'))
}

/// Field 22 (`starttime`) of a `/proc/PID/stat` line; the command name
/// (field 2) may hold spaces and parentheses, so fields are counted after
/// its last `)`.
fn parse_start_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn sleep_command(dir: &Path) -> VmmCommand {
        VmmCommand {
            program: "sleep".into(),
            args: vec!["600".into()],
            cwd: None,
            stdout: dir.join("out.log"),
            stderr: dir.join("out.log"),
            log_cap: 1024,
            fds: Vec::new(),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_vmm_spawned_in_a_netns_runs_there_and_this_process_does_not() {
        if let Some(why) = nova_net::testing::unsupported_reason() {
            eprintln!("SKIP a_vmm_spawned_in_a_netns_runs_there: {why}");
            return;
        }
        let ns = nova_net::testing::Namespace::create(&format!("nvr{}-spawn", std::process::id()))
            .await
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("ns.txt");
        let mut command = sleep_command(dir.path());
        command.program = "sh".into();
        command.args = vec![
            "-c".into(),
            format!("readlink /proc/self/ns/net > {}", out.display()).into(),
        ];
        let fd = Arc::new(nova_net::netns::open(ns.path()).unwrap());
        for mode in [SpawnMode::Owned, SpawnMode::Detached] {
            let mut vmm = VmmProcess::spawn_in_netns(&command, mode, Some(&fd)).unwrap();
            assert_eq!(vmm.wait().await, VmmExit::Code(0));
            let inode = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(ns.path()).unwrap());
            assert_eq!(
                std::fs::read_to_string(&out).unwrap().trim(),
                format!("net:[{inode}]"),
                "{mode:?}"
            );
        }
        let ours = std::fs::read_link("/proc/self/ns/net").unwrap();
        let child = std::fs::read_to_string(&out).unwrap();
        assert_ne!(
            ours.to_string_lossy(),
            child.trim(),
            "this process stays put"
        );
    }

    #[tokio::test]
    async fn named_descriptors_are_inherited_at_their_numbers_and_no_others() {
        let dir = tempfile::tempdir().unwrap();
        let (reader, writer) = std::io::pipe().unwrap();
        let mut command = sleep_command(dir.path());
        command.program = "sh".into();
        // The child writes into descriptor 7, which is our pipe's write end.
        command.args = vec!["-c".into(), "echo through-7 >&7".into()];
        command.fds = vec![InheritedFd {
            fd: Arc::new(OwnedFd::from(writer)),
            child_fd: 7,
        }];
        let mut vmm = VmmProcess::spawn(&command).unwrap();
        assert_eq!(vmm.wait().await, VmmExit::Code(0));
        drop(command);
        let mut got = String::new();
        std::io::Read::read_to_string(&mut { reader }, &mut got).unwrap();
        assert_eq!(got, "through-7\n");

        // Without a mapping the same number is closed in the child.
        let mut command = sleep_command(dir.path());
        command.program = "sh".into();
        command.args = vec!["-c".into(), "echo x >&7".into()];
        let mut vmm = VmmProcess::spawn(&command).unwrap();
        assert_ne!(vmm.wait().await, VmmExit::Code(0));

        command.fds = vec![InheritedFd {
            fd: Arc::new(OwnedFd::from(std::io::pipe().unwrap().1)),
            child_fd: 2,
        }];
        assert!(matches!(
            VmmProcess::spawn(&command).unwrap_err(),
            VmmSpawnError::Fds { child_fd: 2, .. }
        ));
    }

    #[test]
    fn start_ticks_are_read_after_the_command_name() {
        let stat = "42 (a) b) S 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 98765 1000 10";
        assert_eq!(parse_start_ticks(stat), Some(98765));
        assert_eq!(parse_start_ticks("garbage"), None);
    }

    #[tokio::test]
    async fn kill_ends_the_process_and_its_group() {
        let dir = tempfile::tempdir().unwrap();
        let mut command = sleep_command(dir.path());
        // A shell that forks a grandchild into the same process group.
        command.program = "sh".into();
        command.args = vec![
            "-c".into(),
            format!(
                "sleep 600 & echo $! > {}/grandchild; wait",
                dir.path().display()
            )
            .into(),
        ];
        let mut vmm = VmmProcess::spawn(&command).unwrap();
        let pid = vmm.pid().unwrap();
        assert!(vmm.start_ticks().is_some());
        let grandchild_file = dir.path().join("grandchild");
        let mut grandchild = None;
        for _ in 0..500 {
            if let Ok(text) = std::fs::read_to_string(&grandchild_file)
                && let Ok(p) = text.trim().parse::<u32>()
            {
                grandchild = Some(p);
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let grandchild = grandchild.expect("the shell wrote its child's PID");
        assert_eq!(vmm.kill().await, VmmExit::Signal(9));
        assert_eq!(vmm.pid(), None);
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
        // The grandchild got SIGKILL with the group; it may linger as a
        // zombie of init for a moment, never as a running process.
        for _ in 0..500 {
            match std::fs::read_to_string(format!("/proc/{grandchild}/stat")) {
                Err(_) => break,
                Ok(stat) if stat.contains(") Z") => break,
                Ok(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
            }
        }
        let alive = std::fs::read_to_string(format!("/proc/{grandchild}/stat"))
            .is_ok_and(|s| !s.contains(") Z"));
        assert!(!alive, "the VMM's process group was killed with it");
    }

    #[tokio::test]
    async fn wait_reports_the_exit_code_and_drop_kills() {
        let dir = tempfile::tempdir().unwrap();
        let mut command = sleep_command(dir.path());
        command.program = "sh".into();
        command.args = vec!["-c".into(), "exit 3".into()];
        let mut vmm = VmmProcess::spawn(&command).unwrap();
        assert_eq!(vmm.wait().await, VmmExit::Code(3));
        assert_eq!(vmm.wait().await, VmmExit::Code(3), "wait is idempotent");

        let vmm = VmmProcess::spawn(&sleep_command(dir.path())).unwrap();
        let pid = vmm.pid().unwrap();
        let mut adopted = VmmProcess::adopt(pid).unwrap();
        drop(vmm);
        assert_eq!(adopted.wait().await, VmmExit::Unknown);
    }

    #[test]
    fn a_missing_binary_is_an_exec_error() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut command = sleep_command(dir.path());
        command.program = "/nonexistent/vmm".into();
        let err = rt.block_on(async { VmmProcess::spawn(&command).unwrap_err() });
        assert!(matches!(err, VmmSpawnError::Exec { .. }), "{err}");
    }
}
