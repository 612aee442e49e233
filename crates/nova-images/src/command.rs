//! Running the host tools an image build needs, with their output in a log file.
//!
//! Image builds run long, chatty programs (`make`, `debootstrap`, `mkfs.ext4`).
//! Their stdout and stderr never reach the user's terminal: both go to one log
//! file per build step, and a failure carries the last lines of that log so the
//! error says what went wrong without the user having to go and find it.

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write as _};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};

use tokio::process::Command;

/// How many lines of a failed command's log an error shows.
pub const LOG_TAIL_LINES: usize = 25;

/// A host command failed to start or exited unsuccessfully.
#[derive(Debug, thiserror::Error)]
pub enum RunCommandError {
    /// The log file could not be opened.
    #[error("cannot open log file {path}")]
    OpenLog {
        /// The log file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The program could not be started (missing, not executable).
    #[error("cannot start `{program}`")]
    Spawn {
        /// The program.
        program: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The program ran and failed.
    #[error("`{program}` failed ({status}); full log: {log}\n--- last lines ---\n{tail}")]
    Failed {
        /// The program.
        program: String,
        /// Its exit status.
        status: ExitStatus,
        /// The log file holding its full output.
        log: PathBuf,
        /// The last lines of the log.
        tail: String,
    },
}

/// Runs `cmd` to completion with stdout and stderr appended to `log`.
///
/// A header line naming the command is written first, so one log can hold
/// several steps. Fails with the log's last [`LOG_TAIL_LINES`] lines when the
/// command exits non-zero.
pub async fn run_logged(cmd: &mut Command, log: &Path) -> Result<(), RunCommandError> {
    let program = describe(cmd);
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|source| RunCommandError::OpenLog {
            path: log.to_owned(),
            source,
        })?;
    // A failed header write is not worth failing the build over; the command's
    // own output still lands in the log.
    let _ = writeln!(file, "\n$ {program}");
    let stderr = file
        .try_clone()
        .map_err(|source| RunCommandError::OpenLog {
            path: log.to_owned(),
            source,
        })?;
    tracing::debug!(command = %program, log = %log.display(), "running");
    let status = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::from(file))
        .stderr(Stdio::from(stderr))
        .kill_on_drop(true)
        .status()
        .await
        .map_err(|source| RunCommandError::Spawn {
            program: program.clone(),
            source,
        })?;
    if status.success() {
        Ok(())
    } else {
        Err(RunCommandError::Failed {
            program,
            status,
            log: log.to_owned(),
            tail: log_tail(log, LOG_TAIL_LINES),
        })
    }
}

/// Runs `cmd` and returns its stdout as text, for short queries such as
/// `dpkg-query` or `make kernelrelease`. Stderr is kept in the error.
pub async fn capture(cmd: &mut Command) -> Result<String, RunCommandError> {
    let program = describe(cmd);
    let output = cmd
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|source| RunCommandError::Spawn {
            program: program.clone(),
            source,
        })?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(RunCommandError::Failed {
            program,
            status: output.status,
            log: PathBuf::from("(captured)"),
            tail: String::from_utf8_lossy(&output.stderr)
                .trim_end()
                .to_owned(),
        })
    }
}

/// The program and its arguments, for messages and log headers.
fn describe(cmd: &Command) -> String {
    let std = cmd.as_std();
    let mut text = std.get_program().to_string_lossy().into_owned();
    for arg in std.get_args() {
        text.push(' ');
        text.push_str(&quote(arg));
    }
    text
}

fn quote(arg: &OsStr) -> String {
    let s = arg.to_string_lossy();
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c))
    {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// The last `lines` lines of the file at `path` (reading at most its last 64 KiB).
pub fn log_tail(path: &Path, lines: usize) -> String {
    const WINDOW: u64 = 64 * 1024;
    let read = || -> io::Result<String> {
        let mut file = File::open(path)?;
        let len = file.metadata()?.len();
        file.seek(SeekFrom::Start(len.saturating_sub(WINDOW)))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    match read() {
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            let mut out = String::new();
            for line in &all[all.len().saturating_sub(lines)..] {
                let _ = writeln!(out, "{line}");
            }
            out.trim_end().to_owned()
        }
        Err(err) => format!("(cannot read {}: {err})", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn failure_carries_the_tail_of_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("step.log");
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg("for i in $(seq 1 40); do echo line$i; done; echo oops >&2; exit 3");
        let err = run_logged(&mut cmd, &log).await.unwrap_err();
        let RunCommandError::Failed { tail, status, .. } = &err else {
            panic!("expected Failed, got {err:?}");
        };
        assert_eq!(status.code(), Some(3));
        assert!(tail.ends_with("oops"), "{tail}");
        assert!(tail.contains("line40"));
        assert!(!tail.contains("line10\n"), "tail is bounded: {tail}");
        assert_eq!(tail.lines().count(), LOG_TAIL_LINES);
    }

    #[tokio::test]
    async fn success_appends_to_the_log_with_a_header() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("step.log");
        run_logged(Command::new("echo").arg("hello world"), &log)
            .await
            .unwrap();
        run_logged(Command::new("echo").arg("second"), &log)
            .await
            .unwrap();
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(
            text.contains("$ echo 'hello world'\nhello world\n"),
            "{text}"
        );
        assert!(text.contains("second"));
    }

    #[tokio::test]
    async fn a_missing_program_is_a_spawn_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = run_logged(
            &mut Command::new("/nonexistent/nova-tool"),
            &dir.path().join("l"),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, RunCommandError::Spawn { .. }), "{err:?}");
    }

    #[tokio::test]
    async fn capture_returns_stdout() {
        let out = capture(Command::new("printf").arg("a\\nb")).await.unwrap();
        assert_eq!(out, "a\nb");
    }
}
