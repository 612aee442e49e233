//! The sandboxes a provider runs, and the routing of operations to them.
//!
//! The provider owns each sandbox in one task that receives
//! [`SandboxAction`]s (CONVENTIONS.md, item 2). [`SandboxRegistry`] keeps,
//! per sandbox, the sender of that task's channel, a `watch` of its published
//! [`SandboxInfo`] and its [`Guest`]; it answers [`ask`](SandboxRegistry::ask)
//! (send a command, await the reply) with the state machine's error when the
//! task is gone, and routes exec and file operations straight to the guest
//! agent when the sandbox is running, so command traffic never queues behind
//! lifecycle commands. A sandbox's task retires it from the registry when it
//! ends ([`SandboxRegistry::retire`]). Stopped sandboxes are remembered (a
//! bounded number, the oldest forgotten first) so that an operation on one
//! says "it is stopped" rather than "no such sandbox". The lock is never
//! held across an `.await`.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Mutex, MutexGuard};

use nova_core::error::{ExecError, FileError, SandboxError};
use nova_core::exec::{ExecRequest, ExecStream};
use nova_core::id::SandboxId;
use nova_core::metadata::SandboxInfo;
use nova_core::state::{InvalidTransition, SandboxState};
use tokio::sync::{mpsc, oneshot, watch};

use crate::Guest;
use crate::action::SandboxAction;

/// How many stopped sandboxes are remembered.
const STOPPED_KEPT: usize = 1024;

/// A live sandbox as its provider sees it.
#[derive(Debug)]
pub struct Entry<V> {
    /// The sandbox task's command channel.
    pub commands: mpsc::Sender<SandboxAction<V>>,
    /// The sandbox's info as its task last published it.
    pub info: watch::Receiver<SandboxInfo>,
    /// Its agent, when the provider waited for one.
    pub guest: Option<Guest>,
}

impl<V> Clone for Entry<V> {
    fn clone(&self) -> Self {
        Self {
            commands: self.commands.clone(),
            info: self.info.clone(),
            guest: self.guest.clone(),
        }
    }
}

/// Why a sandbox's guest cannot take a request.
#[derive(Debug)]
enum Unavailable {
    NotFound,
    NotRunning(SandboxState),
    NoAgent,
}

/// The sandboxes of one provider.
#[derive(Debug)]
pub struct SandboxRegistry<V> {
    maps: Mutex<Maps<V>>,
}

#[derive(Debug)]
struct Maps<V> {
    live: BTreeMap<SandboxId, Entry<V>>,
    stopped: BTreeMap<SandboxId, SandboxInfo>,
    /// Ids in `stopped`, oldest retired first.
    stopped_order: VecDeque<SandboxId>,
}

impl<V> Default for SandboxRegistry<V> {
    fn default() -> Self {
        Self {
            maps: Mutex::new(Maps {
                live: BTreeMap::new(),
                stopped: BTreeMap::new(),
                stopped_order: VecDeque::new(),
            }),
        }
    }
}

impl<V> SandboxRegistry<V> {
    fn maps(&self) -> MutexGuard<'_, Maps<V>> {
        // Every critical section is one map operation, so a poisoned lock
        // still guards a consistent registry.
        self.maps
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Registers a sandbox that just became ready.
    pub fn insert(&self, id: SandboxId, entry: Entry<V>) {
        self.maps().live.insert(id, entry);
    }

    /// Replaces the agent of the live sandbox `id` (a sandbox restored from
    /// disk has a new one); nothing happens for an unknown id.
    pub fn set_guest(&self, id: &SandboxId, guest: Option<Guest>) {
        if let Some(entry) = self.maps().live.get_mut(id) {
            entry.guest = guest;
        }
    }

    /// The live sandbox `id`; a stopped one answers with the state error
    /// for `to`, an unknown one with `NotFound`.
    pub fn entry(&self, id: &SandboxId, to: SandboxState) -> Result<Entry<V>, SandboxError> {
        let maps = self.maps();
        if let Some(entry) = maps.live.get(id) {
            return Ok(entry.clone());
        }
        match maps.stopped.get(id) {
            Some(info) => Err(InvalidTransition {
                from: info.state,
                to,
            }
            .into()),
            None => Err(SandboxError::NotFound(id.clone())),
        }
    }

    /// Sends the command `make` builds to the sandbox's task and waits for
    /// its answer. `to` is the state the command aims at, for the error when
    /// the task is gone.
    pub async fn ask<T>(
        &self,
        id: &SandboxId,
        to: SandboxState,
        make: impl FnOnce(oneshot::Sender<Result<T, SandboxError>>) -> SandboxAction<V>,
    ) -> Result<T, SandboxError> {
        let entry = self.entry(id, to)?;
        let gone = |entry: &Entry<V>| -> SandboxError {
            InvalidTransition {
                from: entry.info.borrow().state,
                to,
            }
            .into()
        };
        let (tx, rx) = oneshot::channel();
        if entry.commands.send(make(tx)).await.is_err() {
            return Err(gone(&entry));
        }
        rx.await.unwrap_or_else(|_| Err(gone(&entry)))
    }

    /// Forgets the live sandbox `id`, whose task ended, remembering `info`
    /// (its last state) among the stopped sandboxes; the oldest of those is
    /// forgotten past 1024 of them.
    pub fn retire(&self, id: &SandboxId, info: SandboxInfo) {
        let mut maps = self.maps();
        maps.live.remove(id);
        if maps.stopped.insert(id.clone(), info).is_none() {
            maps.stopped_order.push_back(id.clone());
        }
        while maps.stopped_order.len() > STOPPED_KEPT {
            if let Some(oldest) = maps.stopped_order.pop_front() {
                maps.stopped.remove(&oldest);
            }
        }
    }

    fn guest(&self, id: &SandboxId) -> Result<Guest, Unavailable> {
        let maps = self.maps();
        match (maps.live.get(id), maps.stopped.get(id)) {
            (Some(entry), _) => {
                let state = entry.info.borrow().state;
                match (&entry.guest, state) {
                    (Some(guest), SandboxState::Running) => Ok(guest.clone()),
                    (None, SandboxState::Running) => Err(Unavailable::NoAgent),
                    (_, state) => Err(Unavailable::NotRunning(state)),
                }
            }
            (None, Some(info)) => Err(Unavailable::NotRunning(info.state)),
            (None, None) => Err(Unavailable::NotFound),
        }
    }

    /// Runs a command in the running sandbox `id`.
    pub async fn exec_stream(
        &self,
        id: &SandboxId,
        request: ExecRequest,
    ) -> Result<ExecStream, ExecError> {
        match self.guest(id) {
            Ok(guest) => guest.exec_stream(request).await,
            Err(Unavailable::NotFound) => Err(ExecError::NotFound(id.clone())),
            Err(Unavailable::NotRunning(state)) => Err(ExecError::NotRunning(state)),
            Err(Unavailable::NoAgent) => Err(ExecError::Agent(no_agent())),
        }
    }

    /// The agent of the running sandbox `id`, for a command operation (list,
    /// attach); the error says why there is none.
    pub fn exec_guest(&self, id: &SandboxId) -> Result<Guest, ExecError> {
        self.guest(id).map_err(|e| match e {
            Unavailable::NotFound => ExecError::NotFound(id.clone()),
            Unavailable::NotRunning(state) => ExecError::NotRunning(state),
            Unavailable::NoAgent => ExecError::Agent(no_agent()),
        })
    }

    /// The agent of the running sandbox `id`, for a file operation on
    /// `path`; the error says why there is none.
    pub fn file_guest(&self, id: &SandboxId, path: &str) -> Result<Guest, FileError> {
        self.guest(id).map_err(|e| match e {
            Unavailable::NotFound => FileError::NotFound(id.clone()),
            Unavailable::NotRunning(state) => FileError::NotRunning(state),
            Unavailable::NoAgent => FileError::Agent {
                path: path.to_owned(),
                source: no_agent(),
            },
        })
    }

    /// Every sandbox, live and stopped, in creation order.
    pub fn list(&self) -> Vec<SandboxInfo> {
        let maps = self.maps();
        let mut all: Vec<SandboxInfo> = maps
            .live
            .values()
            .map(|e| e.info.borrow().clone())
            .chain(maps.stopped.values().cloned())
            .collect();
        all.sort_by_key(|i| i.created_at_ms);
        all
    }

    /// The sandbox `id`, live or stopped.
    pub fn get(&self, id: &SandboxId) -> Option<SandboxInfo> {
        let maps = self.maps();
        maps.live
            .get(id)
            .map(|e| e.info.borrow().clone())
            .or_else(|| maps.stopped.get(id).cloned())
    }
}

fn no_agent() -> Box<dyn std::error::Error + Send + Sync> {
    "this sandbox was started without waiting for its agent, so it has no agent connection".into()
}

#[cfg(test)]
mod tests {
    use nova_core::config::SandboxConfig;
    use nova_core::hypervisor::HypervisorKind;

    use super::*;

    /// The VM type does not matter to the registry.
    type Cmd = ();

    fn info(state: SandboxState) -> SandboxInfo {
        SandboxInfo {
            id: SandboxId::random(),
            hypervisor: HypervisorKind::Qemu,
            state,
            config: SandboxConfig::default(),
            created_at_ms: 1,
            boot: None,
            vmm_pid: None,
            dir: "/nonexistent".into(),
            agent_version: None,
            kernel_release: None,
            failure: None,
            persisted: false,
        }
    }

    #[tokio::test]
    async fn routes_commands_and_remembers_stopped_sandboxes() {
        let registry = SandboxRegistry::<Cmd>::default();
        let running = info(SandboxState::Running);
        let id = running.id.clone();
        let (commands, mut rx) = mpsc::channel(1);
        let (published, watcher) = watch::channel(running);
        registry.insert(
            id.clone(),
            Entry {
                commands,
                info: watcher,
                guest: None,
            },
        );

        // A task that pauses, then publishes `stopped` and exits.
        let task = tokio::spawn(async move {
            let Some(SandboxAction::Pause(reply)) = rx.recv().await else {
                panic!("expected a command")
            };
            let mut stopped = published.borrow().clone();
            stopped.state = SandboxState::Stopped;
            published.send_replace(stopped);
            reply.send(Ok(())).unwrap();
        });
        registry
            .ask(&id, SandboxState::Paused, SandboxAction::Pause)
            .await
            .unwrap();
        task.await.unwrap();

        // Its task is gone: the state machine's error, not a hang.
        let e = registry
            .ask(&id, SandboxState::Paused, SandboxAction::Pause)
            .await
            .unwrap_err();
        assert!(matches!(
            e,
            SandboxError::State(InvalidTransition {
                from: SandboxState::Stopped,
                ..
            })
        ));
        let last = registry.get(&id).unwrap();
        registry.retire(&id, last);
        assert_eq!(registry.get(&id).unwrap().state, SandboxState::Stopped);
        assert_eq!(registry.list().len(), 1);
        assert!(matches!(
            registry.exec_stream(&id, "true".into()).await,
            Err(ExecError::NotRunning(SandboxState::Stopped))
        ));
        assert!(matches!(
            registry.file_guest(&id, "/x").map(drop),
            Err(FileError::NotRunning(SandboxState::Stopped))
        ));

        let unknown = SandboxId::random();
        assert!(matches!(
            registry
                .ask(&unknown, SandboxState::Paused, SandboxAction::Pause)
                .await,
            Err(SandboxError::NotFound(_))
        ));
        assert!(matches!(
            registry.exec_stream(&unknown, "true".into()).await,
            Err(ExecError::NotFound(_))
        ));
        assert!(registry.get(&unknown).is_none());
    }

    #[tokio::test]
    async fn a_running_sandbox_without_an_agent_says_so() {
        let registry = SandboxRegistry::<Cmd>::default();
        let running = info(SandboxState::Running);
        let id = running.id.clone();
        let (commands, _rx) = mpsc::channel(1);
        let (_published, watcher) = watch::channel(running);
        registry.insert(
            id.clone(),
            Entry {
                commands,
                info: watcher,
                guest: None,
            },
        );
        let e = registry.exec_stream(&id, "true".into()).await.unwrap_err();
        assert!(matches!(e, ExecError::Agent(_)));
        assert!(
            std::error::Error::source(&e)
                .unwrap()
                .to_string()
                .contains("without waiting for its agent")
        );
        assert!(matches!(
            registry.file_guest(&id, "/x").map(drop),
            Err(FileError::Agent { .. })
        ));
    }

    #[test]
    fn the_oldest_stopped_sandboxes_are_forgotten_first() {
        let registry = SandboxRegistry::<Cmd>::default();
        let ids: Vec<SandboxId> = (0..STOPPED_KEPT + 2)
            .map(|_| {
                let info = info(SandboxState::Stopped);
                let id = info.id.clone();
                registry.retire(&id, info);
                id
            })
            .collect();
        assert!(registry.get(&ids[0]).is_none());
        assert!(registry.get(&ids[1]).is_none());
        assert!(registry.get(&ids[2]).is_some());
        assert!(registry.get(ids.last().unwrap()).is_some());
        assert_eq!(registry.list().len(), STOPPED_KEPT);
    }
}
