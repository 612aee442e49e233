//! Errors of the sandbox operations, one enum per operation family.
//!
//! Provider-specific causes (a QMP error, a Firecracker `fault_message`, an
//! agent protocol error) travel as the `#[source]` of these variants, so the
//! caller sees one typed error per operation and can still walk the chain.

use std::path::PathBuf;

use crate::config::ConfigError;
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
    /// The sandbox directory or one of its files could not be made.
    #[error("cannot prepare {path}")]
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
}

/// Running a command in a sandbox failed (the command itself failing is not
/// an error: see [`ExitStatus`](crate::exec::ExitStatus)).
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
    /// The guest agent failed or went away.
    #[error("the guest agent failed to run the command")]
    Agent(#[source] BoxError),
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
}

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
    #[error("a parent of {path} is not a directory in the guest")]
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
