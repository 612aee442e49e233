//! The host's side of a sandbox's guest: core operations run through the
//! guest agent.
//!
//! Every provider (QEMU, Firecracker, Apple VZ) ends up with an
//! [`AgentClient`] on some byte stream; this crate maps the backend-neutral
//! operations of `nova-core` ([`ExecRequest`], files, guest stats) onto that
//! client, so the providers only own their VMM and the stream.
//!
//! Streaming output keeps the agent protocol's back-pressure: stdout and
//! stderr chunks are forwarded into a bounded channel, so a consumer that
//! stops reading stops the guest command's output at its source. A consumer
//! that drops its [`ExecStream`] before the command ended has the command's
//! process group killed in the guest.
//!
//! The guest is untrusted: whole-file reads stop at a cap
//! ([`Guest::with_read_limit`]), and the agent connection closes itself on a
//! protocol violation ([`AgentClient::closed`] says why). Guest errors on
//! files arrive typed ([`FileError::NoSuchFile`], ...), mapped from the
//! agent's error kind in one place.
//!
//! [`scratch`] makes the sparse ext4 scratch disk every provider gives a
//! sandbox for its writable overlay.

#![forbid(unsafe_code)]

pub mod leftovers;
pub mod registry;
pub mod scratch;
pub mod task;

use std::time::Duration;

use nova_core::error::{ExecError, FileError};
use nova_core::exec::{Command, ExecEvent, ExecRequest, ExecStream, ExitStatus};
use nova_core::stats::GuestStats;
use nova_protocol::client::{
    AgentClient, ClientError, DEFAULT_READ_LIMIT, FileDownload, OutputStream,
};
use nova_protocol::{ExecSpec, RemoteErrorKind};
use tokio::sync::mpsc;

/// How many output chunks may wait for the consumer of an [`ExecStream`].
const EVENT_BUFFER: usize = 16;

/// A ready guest: its agent client and the sandbox-wide environment.
#[derive(Clone, Debug)]
pub struct Guest {
    client: AgentClient,
    env: Vec<(String, String)>,
    read_limit: u64,
}

impl Guest {
    /// Wraps a connected agent client; `env` is set for every command (the
    /// sandbox config's `env`), under each request's own variables.
    /// Whole-file reads are capped at
    /// [`DEFAULT_READ_LIMIT`].
    pub fn new(client: AgentClient, env: impl IntoIterator<Item = (String, String)>) -> Self {
        Self {
            client,
            env: env.into_iter().collect(),
            read_limit: DEFAULT_READ_LIMIT,
        }
    }

    /// Sets the cap of [`Guest::read_file`], in bytes.
    pub fn with_read_limit(mut self, bytes: u64) -> Self {
        self.read_limit = bytes;
        self
    }

    /// The agent client.
    pub fn client(&self) -> &AgentClient {
        &self.client
    }

    /// Starts `request` and streams its output.
    pub async fn exec_stream(&self, request: ExecRequest) -> Result<ExecStream, ExecError> {
        let stdin = request.stdin.clone();
        let spec = self.spec(request)?;
        let mut handle = self
            .client
            .exec(spec)
            .await
            .map_err(|e| ExecError::Agent(Box::new(e)))?;
        let stdout = handle.take_stdout();
        let stderr = handle.take_stderr();
        if let (Some(bytes), Some(mut writer)) = (stdin, handle.take_stdin()) {
            tokio::spawn(async move {
                // A command that exits without reading its stdin makes this
                // fail; that is the command's business, not an error here.
                if let Err(e) = writer.write(bytes).await {
                    tracing::debug!(error = %e, "stdin not fully delivered");
                }
                writer.close();
            });
        }
        let (tx, rx) = mpsc::channel(EVENT_BUFFER);
        let consumer = tx.clone();
        tokio::spawn(kill_when_abandoned(consumer, async move {
            let out = forward(stdout, tx.clone(), ExecEvent::Stdout);
            let err = forward(stderr, tx.clone(), ExecEvent::Stderr);
            tokio::join!(out, err);
            match handle.wait().await {
                Ok(result) => {
                    let status = if result.timed_out {
                        ExitStatus::TimedOut
                    } else {
                        match result.status {
                            nova_protocol::ExitStatus::Exited(code) => ExitStatus::Code(code),
                            nova_protocol::ExitStatus::Signaled(sig) => ExitStatus::Signal(sig),
                        }
                    };
                    let _ = tx.send(ExecEvent::Exited(status)).await;
                }
                // The stream then ends without an exit status, which the
                // consumer reports as the agent going away.
                Err(e) => tracing::warn!(error = %e, "lost a command's exit status"),
            }
        }));
        Ok(ExecStream::new(rx))
    }

    fn spec(&self, request: ExecRequest) -> Result<ExecSpec, ExecError> {
        build_spec(&self.env, request)
    }
}

/// Maps a core request onto the agent's exec spec, refusing what no process
/// could receive.
fn build_spec(base_env: &[(String, String)], request: ExecRequest) -> Result<ExecSpec, ExecError> {
    let mut spec = match request.command {
        Command::Argv(argv) => {
            if argv.first().is_none_or(String::is_empty) {
                return Err(ExecError::Invalid("argv is empty".into()));
            }
            if argv.iter().any(|a| a.contains('\0')) {
                return Err(ExecError::Invalid("an argument contains NUL".into()));
            }
            ExecSpec::argv(argv)
        }
        Command::Shell(script) => {
            if script.contains('\0') {
                return Err(ExecError::Invalid("the command contains NUL".into()));
            }
            ExecSpec::shell(script)
        }
    };
    let mut env = base_env.to_vec();
    for (k, v) in request.env {
        if k.is_empty() || k.contains(['=', '\0']) || v.contains('\0') {
            return Err(ExecError::Invalid(format!(
                "invalid environment variable {k:?}"
            )));
        }
        env.retain(|(existing, _)| *existing != k);
        env.push((k, v));
    }
    spec.env = env;
    spec.cwd = request.cwd;
    spec.stdin = request.stdin.is_some();
    spec.timeout_ms = request.timeout.map(|t| t.as_millis().max(1) as u64);
    Ok(spec)
}

impl Guest {
    /// Writes a whole file.
    pub async fn write_file(&self, path: &str, data: Vec<u8>, mode: u32) -> Result<(), FileError> {
        FileError::check_path(path)?;
        if mode > 0o7777 {
            return Err(FileError::InvalidPath {
                path: path.to_owned(),
                reason: "mode is above 0o7777",
            });
        }
        self.client
            .write_file(path, data, mode)
            .await
            .map(drop)
            .map_err(|e| file_error(path, e))
    }

    /// Reads a whole file, up to the read cap ([`Guest::with_read_limit`]);
    /// a larger file is [`FileError::TooLarge`] (stream it with
    /// [`Guest::read_file_stream`]).
    pub async fn read_file(&self, path: &str) -> Result<Vec<u8>, FileError> {
        FileError::check_path(path)?;
        self.client
            .read_file_to_vec_limited(path, self.read_limit)
            .await
            .map_err(|e| file_error(path, e))
    }

    /// Opens a file for streaming its contents back, in chunks, with no cap.
    pub async fn read_file_stream(&self, path: &str) -> Result<FileDownload, FileError> {
        FileError::check_path(path)?;
        self.client
            .read_file(path)
            .await
            .map_err(|e| file_error(path, e))
    }

    /// The guest's view of its resources, within `timeout`.
    pub async fn stats(&self, timeout: Duration) -> Result<GuestStats, ClientError> {
        let s = tokio::time::timeout(timeout, self.client.stats())
            .await
            .map_err(|_| ClientError::TimedOut(timeout))??;
        Ok(GuestStats {
            memory_total_bytes: s.memory_total_bytes,
            memory_used_bytes: s.memory_used_bytes,
            memory_available_bytes: s.memory_available_bytes,
            cpu_user_us: s.cpu_user_ms * 1000,
            cpu_system_us: s.cpu_system_ms * 1000,
            load_avg: s.load_average,
            disk_used_bytes: s.root_fs_used_bytes,
            disk_total_bytes: s.root_fs_total_bytes,
            process_count: s.process_count.into(),
            uptime_ms: s.uptime_ms,
        })
    }

    /// Asks the agent to sync and power the guest off.
    pub async fn shutdown(&self) -> Result<(), ClientError> {
        self.client.shutdown().await
    }
}

/// Maps a failed file request onto core's typed [`FileError`], by the error
/// kind the agent derived from the guest's errno.
fn file_error(path: &str, e: ClientError) -> FileError {
    let path = path.to_owned();
    if let ClientError::TooLarge { limit, .. } = e {
        return FileError::TooLarge {
            path,
            limit,
            instead: "stream it with Guest::read_file_stream",
        };
    }
    let Some(kind) = e.remote_kind() else {
        return FileError::Agent {
            path,
            source: Box::new(e),
        };
    };
    let source = Box::new(e);
    match kind {
        RemoteErrorKind::NotFound => FileError::NoSuchFile { path, source },
        RemoteErrorKind::PermissionDenied => FileError::PermissionDenied { path, source },
        RemoteErrorKind::IsADirectory => FileError::IsADirectory { path, source },
        RemoteErrorKind::NotADirectory => FileError::NotADirectory { path, source },
        RemoteErrorKind::AlreadyExists => FileError::AlreadyExists { path, source },
        RemoteErrorKind::NoSpace => FileError::NoSpace { path, source },
        RemoteErrorKind::ReadOnly => FileError::ReadOnly { path, source },
        RemoteErrorKind::DirectoryNotEmpty => FileError::DirectoryNotEmpty { path, source },
        RemoteErrorKind::InvalidInput
        | RemoteErrorKind::Spawn
        | RemoteErrorKind::UnknownRequest
        | RemoteErrorKind::Protocol
        | RemoteErrorKind::Busy
        | RemoteErrorKind::Io => FileError::Agent { path, source },
    }
}

/// Runs `pump` (which owns a command's handle and feeds `consumer`'s
/// stream) to its end, unless the consumer drops its [`ExecStream`] first:
/// then `pump` is dropped, and dropping the command's handle has the agent
/// kill the command's process group.
async fn kill_when_abandoned(
    consumer: mpsc::Sender<ExecEvent>,
    pump: impl std::future::Future<Output = ()>,
) {
    tokio::select! {
        biased;
        () = pump => {}
        () = consumer.closed() => {
            tracing::debug!("the exec stream was dropped; killing the command");
        }
    }
}

async fn forward(
    stream: Option<OutputStream>,
    tx: mpsc::Sender<ExecEvent>,
    wrap: fn(Vec<u8>) -> ExecEvent,
) {
    let Some(mut stream) = stream else { return };
    while let Some(chunk) = stream.recv().await {
        if tx.send(wrap(chunk.to_vec())).await.is_err() {
            // The consumer is gone: drain so the command is not blocked.
            stream.drain().await;
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use nova_protocol::ExecCommand;

    use super::*;

    /// A guest whose client is never used: `spec` only reads `env`.
    fn spec_of(env: &[(&str, &str)], request: ExecRequest) -> Result<ExecSpec, ExecError> {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        build_spec(&env, request)
    }

    #[test]
    fn request_env_overrides_sandbox_env_and_fields_carry_over() {
        let req = ExecRequest::argv(["python3", "-c", "print(1)"])
            .env("A", "request")
            .cwd("/tmp")
            .stdin(b"x".to_vec())
            .timeout(Duration::from_millis(1500));
        let spec = spec_of(&[("A", "sandbox"), ("B", "b")], req).unwrap();
        assert_eq!(
            spec.command,
            ExecCommand::Argv(vec!["python3".into(), "-c".into(), "print(1)".into()])
        );
        assert_eq!(
            spec.env,
            [
                ("B".to_owned(), "b".to_owned()),
                ("A".to_owned(), "request".to_owned())
            ]
        );
        assert_eq!(spec.cwd.as_deref(), Some("/tmp"));
        assert!(spec.stdin);
        assert_eq!(spec.timeout_ms, Some(1500));
        let spec = spec_of(&[], "echo hi".into()).unwrap();
        assert_eq!(spec.command, ExecCommand::Shell("echo hi".into()));
        assert!(!spec.stdin);
    }

    #[test]
    fn guest_errno_kinds_become_typed_file_errors() {
        let remote = |kind| ClientError::Remote {
            kind,
            message: "open /nonexistent/file: No such file or directory (os error 2)".into(),
        };
        let e = file_error("/nonexistent/file", remote(RemoteErrorKind::NotFound));
        assert!(matches!(e, FileError::NoSuchFile { .. }), "{e:?}");
        assert_eq!(
            e.to_string(),
            "/nonexistent/file does not exist in the guest"
        );
        // The guest's own words stay in the chain.
        let source = std::error::Error::source(&e).unwrap().to_string();
        assert!(source.contains("os error 2"), "{source}");

        for (kind, check) in [
            (
                RemoteErrorKind::PermissionDenied,
                (|e| matches!(e, FileError::PermissionDenied { .. })) as fn(&FileError) -> bool,
            ),
            (RemoteErrorKind::IsADirectory, |e| {
                matches!(e, FileError::IsADirectory { .. })
            }),
            (RemoteErrorKind::NotADirectory, |e| {
                matches!(e, FileError::NotADirectory { .. })
            }),
            (RemoteErrorKind::AlreadyExists, |e| {
                matches!(e, FileError::AlreadyExists { .. })
            }),
            (RemoteErrorKind::NoSpace, |e| {
                matches!(e, FileError::NoSpace { .. })
            }),
            (RemoteErrorKind::ReadOnly, |e| {
                matches!(e, FileError::ReadOnly { .. })
            }),
            (RemoteErrorKind::DirectoryNotEmpty, |e| {
                matches!(e, FileError::DirectoryNotEmpty { .. })
            }),
            (RemoteErrorKind::Io, |e| {
                matches!(e, FileError::Agent { .. })
            }),
        ] {
            let e = file_error("/p", remote(kind));
            assert!(check(&e), "{kind:?} -> {e:?}");
        }

        let e = file_error(
            "/big",
            ClientError::TooLarge {
                what: "the file",
                limit: 7,
                call: "read_file_to_vec",
                instead: "stream it with AgentClient::read_file",
            },
        );
        assert!(matches!(e, FileError::TooLarge { limit: 7, .. }), "{e:?}");
        assert!(e.to_string().contains("Guest::read_file_stream"), "{e}");
    }

    #[test]
    fn invalid_requests_are_refused_before_reaching_the_guest() {
        let empty: [&str; 0] = [];
        for bad in [
            ExecRequest::argv(empty),
            ExecRequest::argv([""]),
            ExecRequest::argv(["a\0b"]),
            ExecRequest::shell("a\0"),
            ExecRequest::shell("x").env("A=B", "1"),
            ExecRequest::shell("x").env("A", "1\0"),
        ] {
            assert!(matches!(spec_of(&[], bad), Err(ExecError::Invalid(_))));
        }
    }
}
