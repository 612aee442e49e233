//! The one place that collects exit statuses.
//!
//! As PID 1 the agent inherits every orphan in the guest and must reap them,
//! or they stay zombies forever. Reaping with `waitpid(-1)` would, however,
//! steal the statuses of the agent's own commands from whoever waits on them.
//! So there is exactly one reaper: on every `SIGCHLD` it calls
//! `waitpid(-1, WNOHANG)` until nothing is left and hands each status to the
//! exec that registered that pid; statuses of unknown pids (orphans) are just
//! dropped. Nothing else in the agent waits for children (no
//! `tokio::process`, no `Child::wait`).
//!
//! One lock orders spawning against reaping: [`Reaper::spawn`] holds it from
//! before `fork` until the pid is registered, and the reaper holds it while it
//! waits, so a child that dies instantly cannot be reaped before its waiter
//! exists — and the standard library's own `waitpid` on a child whose `exec`
//! failed (inside `Command::spawn`) never races with ours.

use std::collections::HashMap;
use std::io;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex, MutexGuard};

use nova_protocol::ExitStatus;
use rustix::io::Errno;
use rustix::process::{WaitOptions, wait};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::oneshot;

/// Dispatches child exit statuses to their waiters.
#[derive(Debug, Default)]
pub(crate) struct Reaper {
    waiters: Mutex<HashMap<i32, oneshot::Sender<ExitStatus>>>,
}

impl Reaper {
    /// Creates the reaper and starts its task. Must run inside the runtime,
    /// before any child is spawned.
    pub(crate) fn start() -> io::Result<Arc<Self>> {
        let mut sigchld = signal(SignalKind::child())?;
        let reaper = Arc::new(Self::default());
        let task_reaper = reaper.clone();
        tokio::spawn(async move {
            loop {
                task_reaper.reap_all();
                if sigchld.recv().await.is_none() {
                    tracing::error!("SIGCHLD stream ended; children will no longer be reaped");
                    return;
                }
            }
        });
        Ok(reaper)
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<i32, oneshot::Sender<ExitStatus>>> {
        // A panic while holding the lock cannot leave the map inconsistent
        // (every operation on it is a single insert or remove).
        self.waiters
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Spawns `command` and registers its pid; the receiver gets its exit status.
    pub(crate) fn spawn(
        &self,
        command: &mut Command,
    ) -> io::Result<(Child, oneshot::Receiver<ExitStatus>)> {
        let mut waiters = self.lock();
        let child = command.spawn()?;
        let (tx, rx) = oneshot::channel();
        let pid = i32::try_from(child.id()).map_err(|_| io::Error::other("pid out of range"))?;
        waiters.insert(pid, tx);
        Ok((child, rx))
    }

    /// Pids of the commands still running (each is its own process group).
    pub(crate) fn running(&self) -> Vec<i32> {
        self.lock().keys().copied().collect()
    }

    /// Reaps every child that has exited.
    fn reap_all(&self) {
        let mut waiters = self.lock();
        loop {
            // `wait` is `waitpid(-1)`: any child. (rustix's `waitpid(None)`
            // is `waitpid(0)`, only our own process group, which would miss
            // every command: each runs in a group of its own.)
            match wait(WaitOptions::NOHANG) {
                Ok(Some((pid, status))) => {
                    let pid = pid.as_raw_nonzero().get();
                    let status = if let Some(signal) = status.terminating_signal() {
                        ExitStatus::Signaled(signal)
                    } else {
                        ExitStatus::Exited(status.exit_status().unwrap_or(-1))
                    };
                    match waiters.remove(&pid) {
                        Some(tx) => {
                            // The exec may have given up waiting; fine.
                            let _ = tx.send(status);
                        }
                        None => tracing::trace!(pid, %status, "reaped an orphan"),
                    }
                }
                Ok(None) | Err(Errno::CHILD) => return,
                Err(Errno::INTR) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "waitpid failed");
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn statuses_reach_their_waiters_even_for_instant_exits() {
        let reaper = Reaper::start().unwrap();
        let mut waits = Vec::new();
        for code in 0..20 {
            // Half of them in process groups of their own, like commands.
            let mut command = Command::new("/bin/sh");
            command.args(["-c", &format!("exit {code}")]);
            if code % 2 == 0 {
                std::os::unix::process::CommandExt::process_group(&mut command, 0);
            }
            let (_child, rx) = reaper.spawn(&mut command).unwrap();
            waits.push((code, rx));
        }
        let (_child, killed) = reaper
            .spawn(Command::new("/bin/sh").args(["-c", "kill -KILL $$"]))
            .unwrap();
        for (code, rx) in waits {
            assert_eq!(rx.await.unwrap(), ExitStatus::Exited(code));
        }
        assert_eq!(killed.await.unwrap(), ExitStatus::Signaled(9));
    }

    #[tokio::test]
    async fn failed_exec_is_an_error_not_a_panic() {
        let reaper = Reaper::start().unwrap();
        let err = reaper
            .spawn(&mut Command::new("/nonexistent/nova-test-binary"))
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }
}
