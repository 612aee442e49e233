//! Errors of the sandbox operations, one enum per operation family.
//!
//! Provider-specific causes (a QMP error, a Firecracker `fault_message`, an
//! agent protocol error) travel as the `#[source]` of these variants, so the
//! caller sees one typed error per operation and can still walk the chain.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::config::ConfigError;
use crate::exec::ExitStatus;
use crate::id::SandboxId;
use crate::state::{InvalidTransition, SandboxState};
use crate::template::TemplateError;

/// A provider-specific error kept as a cause.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Creating (laying out and booting) a sandbox failed. Whatever the sandbox
/// had made on the host was removed before this was returned.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CreateSandboxError {
    /// The config was rejected.
    #[error("invalid sandbox config")]
    Config(#[from] ConfigError),
    /// The template is missing or broken.
    #[error("cannot use template")]
    Template(#[from] TemplateError),
    /// This host cannot run the backend (no KVM access, binary missing, …).
    #[error("{reason}")]
    Unsupported {
        /// What is missing and what to do about it.
        reason: String,
    },
    /// The sandbox's network (namespace, veth, tap, NAT, published ports)
    /// could not be set up; nothing of it was left behind.
    #[error("cannot set up the sandbox's network")]
    Network(#[source] BoxError),
    /// A published host port cannot be bound: another process (or
    /// sandbox) holds it, or `host_ip` is not the host's. Nothing was left
    /// behind.
    #[error(
        "{field} = {host_ip}:{port}/{protocol} cannot be published on this host: use another \
         host port"
    )]
    PortUnavailable {
        /// The config field: `host_port` or `ports[N]`.
        field: String,
        /// The host port.
        port: u16,
        /// Its protocol.
        protocol: crate::network::PortProtocol,
        /// The host address it was to be bound on.
        host_ip: std::net::Ipv4Addr,
        /// Why binding failed (`EADDRINUSE`: in use).
        #[source]
        source: std::io::Error,
    },
    /// The sandbox directory or one of its files could not be made. A full
    /// disk says so, and what to free.
    #[error("cannot prepare {path}{}", disk_full_hint(source))]
    Prepare {
        /// The path that failed.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The VMM process could not be started.
    #[error("cannot start {program}")]
    Spawn {
        /// The VMM binary.
        program: PathBuf,
        /// Why `exec` failed.
        #[source]
        source: std::io::Error,
    },
    /// The VMM refused its configuration or failed to start the guest.
    #[error("{vmm} failed to {action}")]
    Vmm {
        /// Which VMM.
        vmm: &'static str,
        /// What it was asked to do.
        action: String,
        /// Its error.
        #[source]
        source: BoxError,
    },
    /// The VMM exited before the guest was ready.
    #[error(
        "the VMM exited ({status}) before the guest was ready; last console lines:\n{console_tail}"
    )]
    VmmExited {
        /// Its exit status, in words.
        status: String,
        /// The last lines of the guest console / VMM log.
        console_tail: String,
    },
    /// The agent did not answer `ready` in time.
    #[error(
        "the guest was not ready within {timeout_ms} ms (raise boot_timeout_ms if the host is \
         slow); last console lines:\n{console_tail}"
    )]
    BootTimeout {
        /// The timeout that expired.
        timeout_ms: u64,
        /// The last lines of the guest console / VMM log.
        console_tail: String,
    },
    /// The agent answered, but the handshake failed.
    #[error("the guest agent failed its handshake")]
    Agent(#[source] BoxError),
    /// The snapshot to restore was refused or could not be loaded.
    #[error("cannot restore the snapshot")]
    Snapshot(#[from] crate::snapshot::SnapshotError),
}

/// A lifecycle operation (pause, resume, stop, stats) on an existing sandbox
/// failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SandboxError {
    /// No sandbox has this id.
    #[error("no sandbox with id {0} in this hypervisor")]
    NotFound(SandboxId),
    /// The sandbox is not in a state that allows the operation.
    #[error(transparent)]
    State(#[from] InvalidTransition),
    /// The VMM failed to carry out the operation.
    #[error("{vmm} failed to {action}")]
    Vmm {
        /// Which VMM.
        vmm: &'static str,
        /// What it was asked to do.
        action: String,
        /// Its error.
        #[source]
        source: BoxError,
    },
    /// The guest agent failed to carry out the operation.
    #[error("the guest agent failed to {action}")]
    Agent {
        /// What it was asked to do.
        action: String,
        /// Its error.
        #[source]
        source: BoxError,
    },
    /// A host resource could not be read or released.
    #[error("cannot {action} {path}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Saving the sandbox's state to disk failed (it stays as it was, or
    /// `failed` if the VMM broke on the way).
    #[error("cannot save the sandbox to disk")]
    Snapshot(#[from] crate::snapshot::SnapshotError),
    /// Restoring a sandbox paused to disk failed; it stays paused on disk,
    /// so the resume can be tried again (or the sandbox stopped).
    #[error("cannot restore the sandbox paused to disk")]
    Restore(#[source] Box<CreateSandboxError>),
}

/// Changing a running sandbox's network policy
/// ([`Hypervisor::update_network`](crate::Hypervisor::update_network)) failed;
/// the policy in force before stays in force.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpdateNetworkError {
    /// No sandbox has this id.
    #[error("no sandbox with id {0} in this hypervisor")]
    NotFound(SandboxId),
    /// The policy is invalid (the error names the entry).
    #[error("invalid egress policy")]
    Config(#[from] ConfigError),
    /// The sandbox has no network (`enable_network = false`, or a backend
    /// that does not attach one).
    #[error("sandbox {0} has no network to change")]
    NoNetwork(SandboxId),
    /// The sandbox is not running or paused.
    #[error("cannot change the network of a sandbox that is {0}")]
    NotRunning(SandboxState),
    /// This provider cannot change a network while it runs.
    #[error("{0}")]
    Unsupported(String),
    /// The host refused the change (nftables).
    #[error("applying the egress policy failed")]
    Network(#[source] BoxError),
}

/// What to do when `source` is a full disk (or quota); empty otherwise.
fn disk_full_hint(source: &std::io::Error) -> &'static str {
    match source.kind() {
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded => {
            ": the disk holding $NOVA_HOME is full; free space there (stop sandboxes, \
             delete unused templates, snapshots or $NOVA_HOME/cache) or move NOVA_HOME \
             to a larger disk"
        }
        _ => "",
    }
}

/// Running a command in a sandbox failed (the command itself failing is not
/// an error: see [`ExitStatus`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExecError {
    /// No sandbox has this id.
    #[error("no sandbox with id {0}")]
    NotFound(SandboxId),
    /// The sandbox is not running.
    #[error("cannot run a command in a sandbox that is {0}; it must be running")]
    NotRunning(SandboxState),
    /// The request itself is invalid (empty argv, NUL in an argument, …).
    #[error("invalid command: {0}")]
    Invalid(String),
    /// The command could not start in the guest (not found, not executable,
    /// a missing working directory, …); a shell would exit with
    /// [`SpawnError::shell_code`].
    #[error(transparent)]
    Spawn(#[from] SpawnError),
    /// The guest agent failed or went away.
    #[error("the guest agent failed to run the command")]
    Agent(#[source] BoxError),
    /// The sandbox's VM exited while the command ran (its VMM was killed or
    /// crashed); the sandbox is now `failed` and its resources are released.
    #[error("the VM exited while the command ran: {reason}; create a new sandbox")]
    VmExited {
        /// Why, as the sandbox's `failure` says it (e.g. "the VMM exited on
        /// its own (killed by signal 9)").
        reason: String,
    },
    /// The command's output passed the cap on output gathered in memory
    /// (`execute_command`, [`ExecStream::collect`](crate::exec::ExecStream::collect));
    /// the command was killed.
    #[error(
        "the command's output passed {limit} bytes, the cap on collected output; \
         read it as it comes with exec_stream (or raise ExecRequest::max_output)"
    )]
    OutputTooLarge {
        /// The cap, in bytes.
        limit: u64,
    },
    /// No command with this exec id in the sandbox (never started, or
    /// forgotten: the agent keeps the last 256 that ended).
    #[error("no command with exec id {exec_id} in the sandbox")]
    NoSuchExec {
        /// The exec id asked for.
        exec_id: u64,
    },
    /// Another stream already follows this command; only one may.
    #[error("command {exec_id} is already streamed by another caller")]
    ExecBusy {
        /// The exec id asked for.
        exec_id: u64,
    },
    /// This provider cannot do that with commands.
    #[error("{0}")]
    Unsupported(String),
}

impl ExecError {
    /// The status a shell would report for this failure, if it is one a
    /// shell has a status for: a command that could not start (127 / 126).
    pub fn exit_status(&self) -> Option<ExitStatus> {
        match self {
            Self::Spawn(e) => Some(e.exit_status()),
            _ => None,
        }
    }
}

/// Why a command could not start; each kind has the exit status a shell and
/// `docker exec` report for it ([`SpawnErrorKind::shell_code`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum SpawnErrorKind {
    /// The program does not exist: not found in `PATH`, or no file at the
    /// path given (127).
    NotFound,
    /// The program exists but cannot be executed: no execute permission, a
    /// directory, a `noexec` mount (126).
    NotExecutable,
    /// The program's interpreter (its `#!` line, or a binary's dynamic
    /// loader) is missing or unusable (126).
    BadInterpreter,
    /// Not a format the guest kernel can execute: neither an ELF binary nor
    /// a `#!` script, or a binary for another architecture (126).
    ExecFormat,
    /// The working directory does not exist (127).
    CwdNotFound,
    /// The working directory exists but cannot be used: not a directory,
    /// permission denied (126).
    CwdUnusable,
    /// Anything else that stopped the process from starting (126).
    Other,
    /// The user or group to run as ([`crate::ExecRequest::user`]) is not in
    /// the guest's `/etc/passwd` / `/etc/group` (126, as `docker exec -u`).
    UnknownUser,
    /// The guest could not switch to the user to run as (126).
    SwitchUser,
}

impl SpawnErrorKind {
    /// 127 when something named does not exist (the program, the working
    /// directory), 126 when it exists but cannot be run, or the user to run
    /// it as cannot be had.
    pub fn shell_code(self) -> i32 {
        match self {
            Self::NotFound | Self::CwdNotFound => 127,
            Self::NotExecutable
            | Self::BadInterpreter
            | Self::ExecFormat
            | Self::CwdUnusable
            | Self::Other
            | Self::UnknownUser
            | Self::SwitchUser => 126,
        }
    }
}

/// A command could not start in the guest.
///
/// The message is the guest's diagnosis and names what is missing, e.g.
/// `no-such-cmd: command not found in $PATH` or `working directory /x does
/// not exist (cannot run pwd)`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct SpawnError {
    /// Why it could not start.
    pub kind: SpawnErrorKind,
    /// The program that was to run (`argv[0]`, or `/bin/sh` for a shell
    /// command line).
    pub program: String,
    /// What is missing, in words.
    pub message: String,
}

impl SpawnError {
    /// The exit code a shell reports for it: 127 or 126.
    pub fn shell_code(&self) -> i32 {
        self.kind.shell_code()
    }

    /// The status to report in place of a command's exit status
    /// ([`ExitStatus::NotStarted`]).
    pub fn exit_status(&self) -> ExitStatus {
        ExitStatus::NotStarted(self.kind)
    }
}

/// Writing to a command's stdin failed: the command exited, closed its
/// stdin, or the sandbox went away.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the command's stdin is closed (it exited, or stopped reading)")]
pub struct StdinClosed;

/// Moving a file into or out of a sandbox failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FileError {
    /// No sandbox has this id.
    #[error("no sandbox with id {0}")]
    NotFound(SandboxId),
    /// The sandbox is not running.
    #[error("cannot move files in a sandbox that is {0}; it must be running")]
    NotRunning(SandboxState),
    /// The guest path is invalid (relative, contains NUL, …).
    #[error("invalid guest path {path:?}: {reason}")]
    InvalidPath {
        /// The path given.
        path: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The path does not exist in the guest (`ENOENT`).
    #[error("{path} does not exist in the guest")]
    NoSuchFile {
        /// The guest path.
        path: String,
        /// The guest's error.
        #[source]
        source: BoxError,
    },
    /// The guest refused access to the path (`EACCES`, `EPERM`).
    #[error("permission denied on {path} in the guest")]
    PermissionDenied {
        /// The guest path.
        path: String,
        /// The guest's error.
        #[source]
        source: BoxError,
    },
    /// The path is a directory where a file was needed (`EISDIR`).
    #[error("{path} is a directory in the guest")]
    IsADirectory {
        /// The guest path.
        path: String,
        /// The guest's error.
        #[source]
        source: BoxError,
    },
    /// A component of the path is not a directory (`ENOTDIR`).
    #[error("{path}, or a directory on the way to it, is not a directory in the guest")]
    NotADirectory {
        /// The guest path.
        path: String,
        /// The guest's error.
        #[source]
        source: BoxError,
    },
    /// Something already exists at the path (`EEXIST`).
    #[error("{path} already exists in the guest")]
    AlreadyExists {
        /// The guest path.
        path: String,
        /// The guest's error.
        #[source]
        source: BoxError,
    },
    /// The guest's disk (or quota) is full (`ENOSPC`, `EDQUOT`).
    #[error("no space left in the guest for {path}")]
    NoSpace {
        /// The guest path.
        path: String,
        /// The guest's error.
        #[source]
        source: BoxError,
    },
    /// The path is on a read-only file system (`EROFS`; e.g. a sandbox with
    /// `read_only_rootfs`).
    #[error("{path} is on a read-only file system in the guest")]
    ReadOnly {
        /// The guest path.
        path: String,
        /// The guest's error.
        #[source]
        source: BoxError,
    },
    /// A directory to remove is not empty (`ENOTEMPTY`).
    #[error("directory {path} is not empty in the guest")]
    DirectoryNotEmpty {
        /// The guest path.
        path: String,
        /// The guest's error.
        #[source]
        source: BoxError,
    },
    /// The file is larger than the cap on whole-file reads; nothing was kept
    /// and the transfer was cancelled.
    #[error("{path} is larger than {limit} bytes, the cap on whole-file reads; {instead}")]
    TooLarge {
        /// The guest path.
        path: String,
        /// The cap, in bytes.
        limit: u64,
        /// The streaming call to use instead.
        instead: &'static str,
    },
    /// The guest agent failed in another way (an I/O error, the connection
    /// went away, …).
    #[error("the guest agent failed on {path}")]
    Agent {
        /// The guest path.
        path: String,
        /// Its error.
        #[source]
        source: BoxError,
    },
}

impl FileError {
    /// Checks that `path` can name a file in the guest: absolute, no NUL.
    pub fn check_path(path: &str) -> Result<(), Self> {
        if !path.starts_with('/') {
            return Err(Self::InvalidPath {
                path: path.to_owned(),
                reason: "it must be absolute",
            });
        }
        if path.contains('\0') {
            return Err(Self::InvalidPath {
                path: path.to_owned(),
                reason: "it contains NUL",
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_says_what_to_free() {
        let full = CreateSandboxError::Prepare {
            path: "/h/sandboxes/sb-1/scratch.ext4".into(),
            source: std::io::Error::from(std::io::ErrorKind::StorageFull),
        };
        let text = full.to_string();
        assert!(
            text.starts_with("cannot prepare /h/sandboxes/sb-1/scratch.ext4: the disk holding"),
            "{text}"
        );
        assert!(text.contains("free space there"), "{text}");
        let other = CreateSandboxError::Prepare {
            path: "/h/x".into(),
            source: std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        };
        assert_eq!(other.to_string(), "cannot prepare /h/x");
    }

    #[test]
    fn guest_paths_must_be_absolute_without_nul() {
        assert!(FileError::check_path("/tmp/a").is_ok());
        let e = FileError::check_path("tmp/a").unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid guest path \"tmp/a\": it must be absolute"
        );
        assert!(FileError::check_path("/a\0b").is_err());
    }

    #[test]
    fn spawn_errors_carry_the_shell_code_and_name_what_is_missing() {
        let e = ExecError::from(SpawnError {
            kind: SpawnErrorKind::NotFound,
            program: "no-such-cmd".into(),
            message: "no-such-cmd: command not found in $PATH".into(),
        });
        assert_eq!(e.to_string(), "no-such-cmd: command not found in $PATH");
        let status = e.exit_status().unwrap();
        assert_eq!(status, ExitStatus::NotStarted(SpawnErrorKind::NotFound));
        assert_eq!(status.shell_code(), 127);
        assert_eq!(SpawnErrorKind::CwdNotFound.shell_code(), 127);
        for kind in [
            SpawnErrorKind::NotExecutable,
            SpawnErrorKind::BadInterpreter,
            SpawnErrorKind::ExecFormat,
            SpawnErrorKind::CwdUnusable,
            SpawnErrorKind::Other,
            SpawnErrorKind::UnknownUser,
            SpawnErrorKind::SwitchUser,
        ] {
            assert_eq!(kind.shell_code(), 126, "{kind:?}");
        }
        assert_eq!(ExecError::Invalid("x".into()).exit_status(), None);
        let json = serde_json::to_string(&SpawnErrorKind::BadInterpreter).unwrap();
        assert_eq!(json, "\"bad_interpreter\"");
    }

    #[test]
    fn file_errors_say_what_is_wrong_with_the_path_first() {
        let cause: BoxError =
            "open /nonexistent/file: No such file or directory (os error 2)".into();
        let e = FileError::NoSuchFile {
            path: "/nonexistent/file".into(),
            source: cause,
        };
        assert_eq!(
            e.to_string(),
            "/nonexistent/file does not exist in the guest"
        );
        let e = FileError::TooLarge {
            path: "/big".into(),
            limit: 10,
            instead: "stream it",
        };
        assert_eq!(
            e.to_string(),
            "/big is larger than 10 bytes, the cap on whole-file reads; stream it"
        );
    }

    #[test]
    fn boot_timeout_quotes_console_and_says_what_to_do() {
        let e = CreateSandboxError::BootTimeout {
            timeout_ms: 5000,
            console_tail: "Kernel panic".into(),
        };
        let msg = e.to_string();
        assert!(msg.contains("5000 ms"));
        assert!(msg.contains("boot_timeout_ms"));
        assert!(msg.ends_with("Kernel panic"));
    }
}
