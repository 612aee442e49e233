//! The [`Sandbox`] handle: a sandbox id bound to the hypervisor that runs it,
//! with the seed API's methods.

use std::sync::Arc;

use crate::error::{CreateSandboxError, ExecError, FileError, SandboxError, UpdateNetworkError};
use crate::exec::{ExecOutput, ExecRequest, ExecStream};
use crate::fs::{DirListing, FileDownload, FileStat};
use crate::hypervisor::Hypervisor;
use crate::id::SandboxId;
use crate::metadata::SandboxInfo;
use crate::stats::SandboxStats;

/// A handle on one sandbox. Cheap to clone; every clone talks to the same
/// sandbox.
///
/// Dropping a handle does not stop the sandbox: call [`stop`](Self::stop).
/// (Dropping the hypervisor that runs it does kill its VMM.)
#[derive(Clone, Debug)]
pub struct Sandbox {
    hypervisor: Arc<dyn Hypervisor>,
    info: SandboxInfo,
}

impl Sandbox {
    /// Binds `info` (as returned by a successful create) to its hypervisor.
    /// Providers call this; users get handles from `create_sandbox`.
    pub fn new(hypervisor: Arc<dyn Hypervisor>, info: SandboxInfo) -> Self {
        Self { hypervisor, info }
    }

    /// The sandbox's id.
    pub fn id(&self) -> &SandboxId {
        &self.info.id
    }

    /// What was known about the sandbox when this handle was made (its
    /// config, boot timings, …). [`refresh`](Self::refresh) reads it anew.
    pub fn info(&self) -> &SandboxInfo {
        &self.info
    }

    /// The hypervisor running this sandbox.
    pub fn hypervisor(&self) -> &Arc<dyn Hypervisor> {
        &self.hypervisor
    }

    /// Boot time in milliseconds, from VMM spawn to agent ready.
    pub fn boot_time_ms(&self) -> u64 {
        self.info.boot_time_ms()
    }

    /// Reads the sandbox's current info from its hypervisor.
    pub async fn refresh(&self) -> Result<SandboxInfo, SandboxError> {
        self.hypervisor
            .get(self.id())
            .await
            .ok_or_else(|| SandboxError::NotFound(self.id().clone()))
    }

    /// Runs a command to completion; `"ls /"` runs through `/bin/sh -c`.
    pub async fn execute_command(
        &self,
        request: impl Into<ExecRequest>,
    ) -> Result<ExecOutput, ExecError> {
        self.hypervisor
            .execute_command(self.id(), request.into())
            .await
    }

    /// Runs a command and streams its output as it is produced.
    pub async fn exec_stream(
        &self,
        request: impl Into<ExecRequest>,
    ) -> Result<ExecStream, ExecError> {
        self.hypervisor.exec_stream(self.id(), request.into()).await
    }

    /// Writes a file in the guest.
    pub async fn write_file(
        &self,
        path: &str,
        data: impl Into<Vec<u8>>,
        mode: u32,
    ) -> Result<(), FileError> {
        self.hypervisor
            .write_file(self.id(), path, data.into(), mode)
            .await
    }

    /// Reads a file from the guest.
    pub async fn read_file(&self, path: &str) -> Result<Vec<u8>, FileError> {
        self.hypervisor.read_file(self.id(), path).await
    }

    /// Lists a guest directory.
    pub async fn list_dir(&self, path: &str) -> Result<DirListing, FileError> {
        self.hypervisor.list_dir(self.id(), path).await
    }

    /// Metadata of a guest path (links followed).
    pub async fn stat(&self, path: &str) -> Result<FileStat, FileError> {
        self.hypervisor.stat(self.id(), path).await
    }

    /// Removes a guest file or empty directory (a whole tree with
    /// `recursive`).
    pub async fn remove(&self, path: &str, recursive: bool) -> Result<(), FileError> {
        self.hypervisor.remove(self.id(), path, recursive).await
    }

    /// Creates a guest directory and its missing parents.
    pub async fn mkdir(&self, path: &str, mode: u32) -> Result<(), FileError> {
        self.hypervisor.mkdir(self.id(), path, mode).await
    }

    /// Streams `data` into a guest file; returns the bytes written.
    pub async fn upload(
        &self,
        path: &str,
        mode: u32,
        data: impl tokio::io::AsyncRead + Send + Unpin + 'static,
    ) -> Result<u64, FileError> {
        self.hypervisor
            .upload(self.id(), path, mode, Box::new(data))
            .await
    }

    /// Opens a guest file for streaming to the host.
    pub async fn download(&self, path: &str) -> Result<FileDownload, FileError> {
        self.hypervisor.download(self.id(), path).await
    }

    /// Resource usage.
    pub async fn get_stats(&self) -> Result<SandboxStats, SandboxError> {
        self.hypervisor.get_sandbox_stats(self.id()).await
    }

    /// Stops the sandbox (see [`Hypervisor::stop_sandbox`]).
    pub async fn stop(&self, force: bool) -> Result<(), SandboxError> {
        self.hypervisor.stop_sandbox(self.id(), force).await
    }

    /// Replaces the egress policy while the sandbox runs (see
    /// [`Hypervisor::update_network`]).
    pub async fn update_network(
        &self,
        egress: crate::network::EgressConfig,
    ) -> Result<(), UpdateNetworkError> {
        self.hypervisor.update_network(self.id(), egress).await
    }

    /// Pauses the sandbox.
    pub async fn pause(&self) -> Result<(), SandboxError> {
        self.hypervisor.pause_sandbox(self.id()).await
    }

    /// Pauses the sandbox to disk: saves its memory, VM state and disk under
    /// its directory and ends its VMM; [`resume`](Self::resume) restores it,
    /// also from a later provider. See
    /// [`Hypervisor::pause_sandbox_to_disk`].
    pub async fn pause_to_disk(&self) -> Result<(), SandboxError> {
        self.hypervisor.pause_sandbox_to_disk(self.id()).await
    }

    /// Resumes a paused sandbox (one paused to disk is restored first).
    pub async fn resume(&self) -> Result<(), SandboxError> {
        self.hypervisor.resume_sandbox(self.id()).await
    }

    /// Whether the sandbox is running now (not paused, stopped or failed).
    pub async fn is_running(&self) -> bool {
        self.hypervisor
            .get(self.id())
            .await
            .is_some_and(|info| info.state.is_running())
    }

    /// Forks this running sandbox into `n` new ones (see
    /// [`Hypervisor::fork_sandbox`]).
    pub async fn fork(&self, n: usize) -> Result<Vec<Sandbox>, CreateSandboxError> {
        self.hypervisor.fork_sandbox(self.id(), n).await
    }

    /// Turns this sandbox into a new template `name` that later creates start
    /// from (see [`Hypervisor::snapshot_as_template`]).
    pub async fn snapshot_as_template(
        &self,
        name: &str,
    ) -> Result<crate::template::Template, crate::snapshot::SnapshotError> {
        self.hypervisor.snapshot_as_template(self.id(), name).await
    }

    /// Milliseconds since the sandbox was created.
    pub fn get_uptime_ms(&self) -> u64 {
        self.info.age_ms()
    }
}

#[cfg(test)]
mod tests {
    //! The trait is exercised through an in-memory provider that keeps the
    //! state machine and echoes commands, to check object safety, the
    //! handle's delegation and the trait's default methods.

    use std::collections::BTreeMap;
    use std::sync::Mutex;

    use async_trait::async_trait;
    use tokio::sync::mpsc;

    use super::*;
    use crate::config::SandboxConfig;
    use crate::error::CreateSandboxError;
    use crate::exec::{Command, ExecEvent, ExitStatus};
    use crate::hypervisor::HypervisorKind;
    use crate::metadata::{BootTimings, now_ms};
    use crate::state::{InvalidTransition, SandboxState};

    #[derive(Debug, Default)]
    struct Memory {
        this: Mutex<Option<std::sync::Weak<Memory>>>,
        boxes: Mutex<BTreeMap<SandboxId, SandboxInfo>>,
        files: Mutex<BTreeMap<String, Vec<u8>>>,
    }

    impl Memory {
        fn new() -> Arc<Self> {
            let m = Arc::new(Self::default());
            *m.this.lock().unwrap() = Some(Arc::downgrade(&m));
            m
        }

        fn transition(&self, id: &SandboxId, to: SandboxState) -> Result<(), SandboxError> {
            let mut boxes = self.boxes.lock().unwrap();
            let info = boxes
                .get_mut(id)
                .ok_or_else(|| SandboxError::NotFound(id.clone()))?;
            info.state.transition_to(to)?;
            Ok(())
        }
    }

    #[async_trait]
    impl Hypervisor for Memory {
        fn kind(&self) -> HypervisorKind {
            HypervisorKind::Qemu
        }

        async fn create_sandbox(
            &self,
            config: SandboxConfig,
        ) -> Result<Sandbox, CreateSandboxError> {
            config.validate()?;
            let info = SandboxInfo {
                id: SandboxId::random(),
                hypervisor: self.kind(),
                state: SandboxState::Running,
                config,
                created_at_ms: now_ms(),
                boot: Some(BootTimings {
                    boot_time_ms: 12.4,
                    ..Default::default()
                }),
                vmm_pid: None,
                dir: "/nonexistent".into(),
                agent_version: None,
                kernel_release: None,
                failure: None,
                persisted: false,
            };
            self.boxes
                .lock()
                .unwrap()
                .insert(info.id.clone(), info.clone());
            let this = self
                .this
                .lock()
                .unwrap()
                .as_ref()
                .and_then(|w| w.upgrade())
                .unwrap();
            Ok(Sandbox::new(this, info))
        }

        async fn stop_sandbox(&self, id: &SandboxId, _force: bool) -> Result<(), SandboxError> {
            self.transition(id, SandboxState::Stopping)?;
            self.transition(id, SandboxState::Stopped)
        }

        async fn pause_sandbox(&self, id: &SandboxId) -> Result<(), SandboxError> {
            self.transition(id, SandboxState::Paused)
        }

        async fn resume_sandbox(&self, id: &SandboxId) -> Result<(), SandboxError> {
            self.transition(id, SandboxState::Running)
        }

        async fn get_sandbox_stats(&self, id: &SandboxId) -> Result<SandboxStats, SandboxError> {
            let boxes = self.boxes.lock().unwrap();
            let info = boxes
                .get(id)
                .ok_or_else(|| SandboxError::NotFound(id.clone()))?;
            Ok(SandboxStats {
                memory_limit_mb: info.config.memory_mb.into(),
                ..Default::default()
            })
        }

        async fn exec_stream(
            &self,
            id: &SandboxId,
            request: ExecRequest,
        ) -> Result<ExecStream, ExecError> {
            let state = self
                .get(id)
                .await
                .ok_or_else(|| ExecError::NotFound(id.clone()))?
                .state;
            if !state.is_running() {
                return Err(ExecError::NotRunning(state));
            }
            let Command::Shell(script) = request.command else {
                return Err(ExecError::Invalid(
                    "this test provider runs shell strings only".into(),
                ));
            };
            let (tx, rx) = mpsc::channel(2);
            tokio::spawn(async move {
                let _ = tx.send(ExecEvent::Stdout(script.into_bytes())).await;
                let _ = tx.send(ExecEvent::Exited(ExitStatus::Code(0))).await;
            });
            Ok(ExecStream::new(rx))
        }

        async fn write_file(
            &self,
            _: &SandboxId,
            path: &str,
            data: Vec<u8>,
            _: u32,
        ) -> Result<(), FileError> {
            FileError::check_path(path)?;
            self.files.lock().unwrap().insert(path.to_owned(), data);
            Ok(())
        }

        async fn read_file(&self, _: &SandboxId, path: &str) -> Result<Vec<u8>, FileError> {
            self.files
                .lock()
                .unwrap()
                .get(path)
                .cloned()
                .ok_or_else(|| FileError::Agent {
                    path: path.to_owned(),
                    source: "no such file".into(),
                })
        }

        async fn list(&self) -> Vec<SandboxInfo> {
            self.boxes.lock().unwrap().values().cloned().collect()
        }

        async fn get(&self, id: &SandboxId) -> Option<SandboxInfo> {
            self.boxes.lock().unwrap().get(id).cloned()
        }
    }

    #[tokio::test]
    async fn handle_delegates_through_a_boxed_trait_object() {
        let hv: Box<dyn Hypervisor> = Box::new(MemoryHandle(Memory::new()));
        let sandbox = hv.create_sandbox(SandboxConfig::default()).await.unwrap();
        assert_eq!(sandbox.boot_time_ms(), 12);
        assert!(sandbox.is_running().await);
        let out = sandbox.execute_command("echo hi").await.unwrap();
        assert_eq!(out.stdout, b"echo hi");
        assert!(out.success());
        sandbox
            .write_file("/tmp/f", b"data".to_vec(), 0o644)
            .await
            .unwrap();
        assert_eq!(sandbox.read_file("/tmp/f").await.unwrap(), b"data");
        assert!(matches!(
            sandbox.write_file("relative", Vec::new(), 0o644).await,
            Err(FileError::InvalidPath { .. })
        ));
        assert_eq!(sandbox.get_stats().await.unwrap().memory_limit_mb, 512);
        assert!(sandbox.get_uptime_ms() < 60_000);
        assert_eq!(hv.list().await.len(), 1);

        sandbox.pause().await.unwrap();
        assert!(!sandbox.is_running().await);
        assert!(matches!(
            sandbox.execute_command("x").await,
            Err(ExecError::NotRunning(SandboxState::Paused))
        ));
        // The default start_sandbox resumes a paused sandbox.
        hv.start_sandbox(sandbox.id()).await.unwrap();
        assert!(sandbox.is_running().await);
        hv.start_sandbox(sandbox.id()).await.unwrap();

        sandbox.stop(false).await.unwrap();
        let e = sandbox.pause().await.unwrap_err();
        assert!(matches!(
            e,
            SandboxError::State(InvalidTransition {
                from: SandboxState::Stopped,
                to: SandboxState::Paused
            })
        ));
        assert!(matches!(
            hv.start_sandbox(sandbox.id()).await,
            Err(SandboxError::State(_))
        ));
        let unknown: SandboxId = "sb-unknown".parse().unwrap();
        assert!(matches!(
            hv.start_sandbox(&unknown).await,
            Err(SandboxError::NotFound(_))
        ));
        assert!(matches!(
            hv.create_sandbox(SandboxConfig {
                vcpus: 0,
                ..Default::default()
            })
            .await,
            Err(CreateSandboxError::Config(_))
        ));
    }

    /// `Box<dyn Hypervisor>` over the shared provider, as `detect()` returns.
    #[derive(Debug)]
    struct MemoryHandle(Arc<Memory>);

    #[async_trait]
    impl Hypervisor for MemoryHandle {
        fn kind(&self) -> HypervisorKind {
            self.0.kind()
        }
        async fn create_sandbox(&self, c: SandboxConfig) -> Result<Sandbox, CreateSandboxError> {
            self.0.create_sandbox(c).await
        }
        async fn stop_sandbox(&self, id: &SandboxId, force: bool) -> Result<(), SandboxError> {
            self.0.stop_sandbox(id, force).await
        }
        async fn pause_sandbox(&self, id: &SandboxId) -> Result<(), SandboxError> {
            self.0.pause_sandbox(id).await
        }
        async fn resume_sandbox(&self, id: &SandboxId) -> Result<(), SandboxError> {
            self.0.resume_sandbox(id).await
        }
        async fn get_sandbox_stats(&self, id: &SandboxId) -> Result<SandboxStats, SandboxError> {
            self.0.get_sandbox_stats(id).await
        }
        async fn exec_stream(
            &self,
            id: &SandboxId,
            r: ExecRequest,
        ) -> Result<ExecStream, ExecError> {
            self.0.exec_stream(id, r).await
        }
        async fn write_file(
            &self,
            id: &SandboxId,
            p: &str,
            d: Vec<u8>,
            m: u32,
        ) -> Result<(), FileError> {
            self.0.write_file(id, p, d, m).await
        }
        async fn read_file(&self, id: &SandboxId, p: &str) -> Result<Vec<u8>, FileError> {
            self.0.read_file(id, p).await
        }
        async fn list(&self) -> Vec<SandboxInfo> {
            self.0.list().await
        }
        async fn get(&self, id: &SandboxId) -> Option<SandboxInfo> {
            self.0.get(id).await
        }
    }
}
