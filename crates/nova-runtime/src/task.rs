//! The task that owns one sandbox's VM after boot, for every provider.
//!
//! A provider implements [`SandboxTask`] for its booted VM (how to carry out
//! its commands, how to wait for its VMM process, how to release it); [`drive`]
//! runs the loop every provider needs around it:
//!
//! - commands are carried out one at a time, in order;
//! - the new [`SandboxInfo`] is persisted (`state.json`) and published on the
//!   `watch` *before* the command's answer is sent, so a caller never sees a
//!   stale state after its own command returned;
//! - a VMM that exits on its own turns the sandbox `failed` (its console tail
//!   is logged) until it is stopped;
//! - when every command sender is gone (the hypervisor was dropped), the VM is
//!   released: nothing outlives its provider;
//! - once a command left the sandbox `stopped`, the task ends.

use std::future::Future;
use std::path::{Path, PathBuf};

use nova_core::error::SandboxError;
use nova_core::metadata::SandboxInfo;
use nova_core::state::SandboxState;
use tokio::sync::{mpsc, watch};

/// An answer to a command, sent after the new state is published.
pub type Reply = Box<dyn FnOnce() + Send>;

/// Wraps a oneshot answer as a deferred [`Reply`].
pub fn reply<T: Send + 'static>(tx: tokio::sync::oneshot::Sender<T>, value: T) -> Reply {
    Box::new(move || {
        // A caller that gave up waiting dropped its receiver; nothing to do.
        let _ = tx.send(value);
    })
}

/// A booted VM, as its provider drives it.
pub trait SandboxTask: Send + 'static {
    /// The provider's command type.
    type Command: Send + 'static;

    /// Carries out `command` and returns its answer, to be sent once the
    /// new state is published.
    fn handle(&mut self, command: Self::Command) -> impl Future<Output = Reply> + Send;

    /// Waits until the VMM process exits and says how; never resolves when
    /// there is no process.
    fn vmm_exit(&mut self) -> impl Future<Output = String> + Send;

    /// Forgets the VMM process after it exited on its own.
    fn forget_vmm(&mut self);

    /// Whether a VMM process is there to watch.
    fn has_vmm(&self) -> bool;

    /// Kills the VMM (reaping it) and removes the sandbox's files; on error,
    /// the path that could not be removed.
    fn release(&mut self) -> impl Future<Output = Result<(), (PathBuf, std::io::Error)>> + Send;

    /// Asks the guest to end (resuming it first if it was `was = paused`)
    /// and waits a bounded time for the VMM to exit; returns either way, and
    /// [`stop`](Self::stop) then kills what is left.
    fn graceful_shutdown(&mut self, was: SandboxState) -> impl Future<Output = ()> + Send;

    /// Stops the sandbox: any live state → `stopping` → `stopped` (or
    /// `failed` if its files cannot be removed). Graceful unless `force` or
    /// the VMM is already gone; either way the VMM is killed and reaped and
    /// the sandbox's files removed before this returns.
    fn stop(&mut self, force: bool) -> impl Future<Output = Result<(), SandboxError>> + Send {
        async move {
            let was = self.info().state;
            self.info_mut()
                .state
                .transition_to(SandboxState::Stopping)?;
            if !force && self.has_vmm() && was != SandboxState::Failed {
                self.graceful_shutdown(was).await;
            }
            let result = self.release().await;
            let info = self.info_mut();
            info.vmm_pid = None;
            match result {
                Ok(()) => Ok(info.state.transition_to(SandboxState::Stopped)?),
                Err((path, source)) => {
                    let _ = info.state.transition_to(SandboxState::Failed);
                    Err(SandboxError::Io {
                        action: "remove",
                        path,
                        source,
                    })
                }
            }
        }
    }

    /// The last lines of the guest console and VMM log.
    fn console_tail(&self) -> String;

    /// The sandbox's info.
    fn info(&self) -> &SandboxInfo;

    /// The sandbox's info, to change.
    fn info_mut(&mut self) -> &mut SandboxInfo;

    /// Where the info is persisted.
    fn state_path(&self) -> PathBuf;
}

/// Runs `task` until it is stopped or its provider is dropped; see the
/// module docs.
pub async fn drive<T: SandboxTask>(
    mut task: T,
    mut commands: mpsc::Receiver<T::Command>,
    published: watch::Sender<SandboxInfo>,
) {
    loop {
        let watch_vmm = task.has_vmm() && task.info().state != SandboxState::Failed;
        tokio::select! {
            command = commands.recv() => {
                let Some(command) = command else {
                    tracing::debug!("hypervisor dropped; releasing the VM");
                    if let Err((path, e)) = task.release().await {
                        tracing::warn!(path = %path.display(), error = %e, "cannot remove the sandbox's files");
                    }
                    return;
                };
                let reply = task.handle(command).await;
                let stopped = task.info().state == SandboxState::Stopped;
                if !stopped {
                    persist(&task.state_path(), task.info());
                }
                published.send_replace(task.info().clone());
                reply();
                if stopped {
                    return;
                }
            }
            status = task.vmm_exit(), if watch_vmm => {
                tracing::warn!(%status, console = %task.console_tail(), "the VMM exited on its own; the sandbox failed");
                task.forget_vmm();
                let info = task.info_mut();
                let _ = info.state.transition_to(SandboxState::Failed);
                info.vmm_pid = None;
                persist(&task.state_path(), task.info());
                published.send_replace(task.info().clone());
            }
        }
    }
}

/// Writes `info` as JSON to `path` (a sandbox's `state.json`), so a restarted
/// daemon can find the sandbox; a failure is logged, not fatal.
pub fn persist(path: &Path, info: &SandboxInfo) {
    let result = serde_json::to_vec_pretty(info)
        .map_err(std::io::Error::other)
        .and_then(|json| std::fs::write(path, json));
    if let Err(e) = result {
        tracing::warn!(path = %path.display(), error = %e, "cannot write sandbox state");
    }
}

/// The last `lines` non-empty lines of a text file ("" if unreadable).
pub fn tail_lines(path: &Path, lines: usize) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use nova_core::config::SandboxConfig;
    use nova_core::hypervisor::HypervisorKind;
    use nova_core::id::SandboxId;
    use tokio::sync::oneshot;

    use super::*;

    enum Cmd {
        Stop(oneshot::Sender<Result<(), SandboxError>>),
        Crash,
    }

    struct Fake {
        info: SandboxInfo,
        dir: PathBuf,
        exit: Option<oneshot::Receiver<()>>,
        released: Arc<AtomicBool>,
        graceful: bool,
    }

    impl SandboxTask for Fake {
        type Command = Cmd;

        async fn handle(&mut self, command: Cmd) -> Reply {
            match command {
                Cmd::Stop(tx) => {
                    self.info
                        .state
                        .transition_to(SandboxState::Stopping)
                        .unwrap();
                    self.info
                        .state
                        .transition_to(SandboxState::Stopped)
                        .unwrap();
                    reply(tx, Ok(()))
                }
                Cmd::Crash => Box::new(|| {}),
            }
        }

        async fn vmm_exit(&mut self) -> String {
            match self.exit.as_mut() {
                Some(rx) => {
                    let _ = rx.await;
                    "exit status: 1".into()
                }
                None => std::future::pending().await,
            }
        }

        fn forget_vmm(&mut self) {
            self.exit = None;
        }

        fn has_vmm(&self) -> bool {
            self.exit.is_some()
        }

        async fn release(&mut self) -> Result<(), (PathBuf, std::io::Error)> {
            self.released.store(true, Ordering::SeqCst);
            self.exit = None;
            Ok(())
        }

        async fn graceful_shutdown(&mut self, _was: SandboxState) {
            self.graceful = true;
        }

        fn console_tail(&self) -> String {
            tail_lines(&self.dir.join("console.log"), 2)
        }

        fn info(&self) -> &SandboxInfo {
            &self.info
        }

        fn info_mut(&mut self) -> &mut SandboxInfo {
            &mut self.info
        }

        fn state_path(&self) -> PathBuf {
            self.dir.join("state.json")
        }
    }

    fn fake(dir: &Path) -> (Fake, oneshot::Sender<()>, Arc<AtomicBool>) {
        let (exit_tx, exit_rx) = oneshot::channel();
        let released = Arc::new(AtomicBool::new(false));
        let info = SandboxInfo {
            id: SandboxId::random(),
            hypervisor: HypervisorKind::Qemu,
            state: SandboxState::Running,
            config: SandboxConfig::default(),
            created_at_ms: 1,
            boot: None,
            vmm_pid: Some(1),
            dir: dir.to_owned(),
            agent_version: None,
            kernel_release: None,
        };
        let task = Fake {
            info,
            dir: dir.to_owned(),
            exit: Some(exit_rx),
            released: released.clone(),
            graceful: false,
        };
        (task, exit_tx, released)
    }

    #[tokio::test]
    async fn state_is_published_before_the_answer_and_stop_ends_the_task() {
        let dir = tempfile::tempdir().unwrap();
        let (task, _exit, _) = fake(dir.path());
        let (tx, rx) = mpsc::channel(1);
        let (published, watcher) = watch::channel(task.info.clone());
        let handle = tokio::spawn(drive(task, rx, published));
        let (reply_tx, reply_rx) = oneshot::channel();
        tx.send(Cmd::Stop(reply_tx)).await.unwrap();
        reply_rx.await.unwrap().unwrap();
        assert_eq!(
            watcher.borrow().state,
            SandboxState::Stopped,
            "published before the answer"
        );
        handle.await.unwrap();
        assert!(
            !dir.path().join("state.json").exists(),
            "a stopped sandbox is not persisted"
        );
    }

    #[tokio::test]
    async fn stop_is_graceful_unless_forced_and_refuses_a_stopped_sandbox() {
        let dir = tempfile::tempdir().unwrap();
        let (mut task, _exit, released) = fake(dir.path());
        task.stop(false).await.unwrap();
        assert!(task.graceful && released.load(Ordering::SeqCst));
        assert_eq!(
            (task.info.state, task.info.vmm_pid),
            (SandboxState::Stopped, None)
        );
        let e = task.stop(true).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            "cannot stop a sandbox that is stopped; its resources are gone, create a new sandbox"
        );

        let (mut task, _exit, _) = fake(dir.path());
        task.stop(true).await.unwrap();
        assert!(!task.graceful, "a forced stop skips the guest");
    }

    #[tokio::test]
    async fn a_vmm_exit_fails_the_sandbox_and_dropping_the_provider_releases_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("console.log"), "a\n\nb\nKernel panic\n").unwrap();
        let (task, exit, released) = fake(dir.path());
        let (tx, rx) = mpsc::channel(1);
        let (published, mut watcher) = watch::channel(task.info.clone());
        let handle = tokio::spawn(drive(task, rx, published));
        exit.send(()).unwrap();
        watcher
            .wait_for(|i| i.state == SandboxState::Failed)
            .await
            .unwrap();
        assert_eq!(watcher.borrow().vmm_pid, None);
        let saved: SandboxInfo =
            serde_json::from_slice(&std::fs::read(dir.path().join("state.json")).unwrap()).unwrap();
        assert_eq!(saved.state, SandboxState::Failed);
        tx.send(Cmd::Crash).await.unwrap();
        drop(tx);
        handle.await.unwrap();
        assert!(released.load(Ordering::SeqCst));
        assert_eq!(
            tail_lines(&dir.path().join("console.log"), 2),
            "b\nKernel panic"
        );
    }
}
