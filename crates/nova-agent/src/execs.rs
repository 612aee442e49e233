//! The agent's table of commands, which outlive the host connection that
//! started them.
//!
//! Every command gets an exec id when it starts (unique for the agent's
//! lifetime, never reused) and an entry here. While a command runs, its
//! entry holds the sending side of the command task's attach channel: a
//! host that comes back on a new connection ([`nova_protocol::Request::AttachExec`])
//! hands its request to the task through it, and the task streams to that
//! request from then on (see [`crate::exec`]: what it held while no host
//! read it first, then its further output, then its end). When a command
//! ends, its entry moves to the finished list with its exit status and the
//! output no host took; the last [`FINISHED_EXECS_KEPT`] are kept, and their
//! held output together is bounded by [`FINISHED_OUTPUT_LIMIT`] (the oldest
//! one's output is dropped first, its status kept). A finished command's
//! output goes to the first host that attaches to it.
//!
//! The lock is a plain mutex held for one map operation, never across an
//! `.await`.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use nova_protocol::{
    AgentMessage, ClientMessage, ExecCommand, ExecInfo, ExecResult, ExecState, FINISHED_EXECS_KEPT,
    FINISHED_OUTPUT_LIMIT, RemoteError, RemoteErrorKind, Response, StreamKind,
};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;

use crate::session::Outbox;

/// A host's request to stream a command ([`nova_protocol::Request::AttachExec`]).
#[derive(Debug)]
pub(crate) struct Attach {
    /// The attach request's id on its connection.
    pub(crate) id: u64,
    /// That connection's writer queue.
    pub(crate) out: Outbox,
    /// The request's follow-up messages (credit, signals, resizes).
    pub(crate) inbox: mpsc::UnboundedReceiver<ClientMessage>,
    /// Told `id` when the request ends, so that its session forgets the
    /// inbox.
    pub(crate) finished: mpsc::UnboundedSender<u64>,
}

impl Attach {
    /// Ends the request with `err` (it streams nothing).
    async fn refuse(self, err: RemoteError) {
        let _ = self.out.done(self.id, Err(err)).await;
        let _ = self.finished.send(self.id);
    }
}

/// What a running command's task shares with the table, for listings.
#[derive(Debug, Default)]
pub(crate) struct LiveView {
    /// Whether a request streams the command's output now.
    pub(crate) attached: AtomicBool,
    /// Output bytes held for the next host.
    pub(crate) buffered: AtomicU64,
}

#[derive(Debug)]
struct Running {
    pid: u32,
    command: ExecCommand,
    view: Arc<LiveView>,
    attach: mpsc::Sender<Attach>,
}

#[derive(Debug)]
struct Finished {
    exec_id: u64,
    pid: u32,
    command: ExecCommand,
    result: ExecResult,
    /// Output no host took, in the order it was produced.
    output: Vec<(StreamKind, Bytes)>,
    output_len: usize,
}

/// Every command the agent started; see the module docs.
#[derive(Debug, Default)]
pub(crate) struct ExecTable {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// The last exec id given out (ids start at 1).
    last_id: u64,
    running: BTreeMap<u64, Running>,
    /// Oldest first.
    finished: VecDeque<Finished>,
    /// Bytes of output held by `finished`.
    finished_bytes: usize,
}

/// A command's place in the table, for its task.
#[derive(Debug)]
pub(crate) struct Registration {
    /// Its exec id.
    pub(crate) exec_id: u64,
    /// What listings show of it.
    pub(crate) view: Arc<LiveView>,
    /// Where attach requests for it arrive.
    pub(crate) attach: mpsc::Receiver<Attach>,
}

/// What an attach request found.
enum Lookup {
    Running(mpsc::Sender<Attach>, Arc<LiveView>),
    Finished {
        pid: u32,
        result: ExecResult,
        output: Vec<(StreamKind, Bytes)>,
    },
    NotFound,
}

impl ExecTable {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every critical section leaves the maps consistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Enters a command that just started (streamed by the request that
    /// started it).
    pub(crate) fn register(&self, pid: u32, command: ExecCommand) -> Registration {
        let (tx, rx) = mpsc::channel(1);
        let view = Arc::new(LiveView {
            attached: AtomicBool::new(true),
            buffered: AtomicU64::new(0),
        });
        let mut inner = self.lock();
        inner.last_id += 1;
        let exec_id = inner.last_id;
        inner.running.insert(
            exec_id,
            Running {
                pid,
                command,
                view: view.clone(),
                attach: tx,
            },
        );
        Registration {
            exec_id,
            view,
            attach: rx,
        }
    }

    /// Moves command `exec_id` to the finished list with `result` and the
    /// output no host took, forgetting what falls past the bounds.
    pub(crate) fn finish(
        &self,
        exec_id: u64,
        result: ExecResult,
        output: Vec<(StreamKind, Bytes)>,
    ) {
        let mut inner = self.lock();
        let Some(running) = inner.running.remove(&exec_id) else {
            return;
        };
        let output_len = output.iter().map(|(_, b)| b.len()).sum();
        inner.finished_bytes += output_len;
        inner.finished.push_back(Finished {
            exec_id,
            pid: running.pid,
            command: running.command,
            result,
            output,
            output_len,
        });
        while inner.finished.len() > FINISHED_EXECS_KEPT {
            if let Some(old) = inner.finished.pop_front() {
                inner.finished_bytes -= old.output_len;
            }
        }
        let mut i = 0;
        while inner.finished_bytes > FINISHED_OUTPUT_LIMIT && i < inner.finished.len() {
            let dropped = std::mem::take(&mut inner.finished[i].output_len);
            inner.finished[i].output.clear();
            inner.finished_bytes -= dropped;
            i += 1;
        }
    }

    /// Every command, oldest first.
    pub(crate) fn list(&self) -> Vec<ExecInfo> {
        let inner = self.lock();
        let mut all: Vec<ExecInfo> = inner
            .finished
            .iter()
            .map(|f| ExecInfo {
                exec_id: f.exec_id,
                pid: f.pid,
                command: f.command.clone(),
                state: ExecState::Ended(f.result),
                attached: false,
                buffered_bytes: f.output_len as u64,
            })
            .chain(inner.running.iter().map(|(&exec_id, r)| ExecInfo {
                exec_id,
                pid: r.pid,
                command: r.command.clone(),
                state: ExecState::Running,
                attached: r.view.attached.load(Ordering::SeqCst),
                buffered_bytes: r.view.buffered.load(Ordering::SeqCst),
            }))
            .collect();
        all.sort_by_key(|e| e.exec_id);
        all
    }

    fn lookup(&self, exec_id: u64) -> Lookup {
        let mut inner = self.lock();
        if let Some(r) = inner.running.get(&exec_id) {
            return Lookup::Running(r.attach.clone(), r.view.clone());
        }
        let Some(f) = inner.finished.iter_mut().find(|f| f.exec_id == exec_id) else {
            return Lookup::NotFound;
        };
        let output = std::mem::take(&mut f.output);
        let len = std::mem::take(&mut f.output_len);
        let (pid, result) = (f.pid, f.result);
        inner.finished_bytes -= len;
        Lookup::Finished {
            pid,
            result,
            output,
        }
    }
}

/// Serves `attach` for command `exec_id`: hands it to the command's task
/// while it runs, or answers it from the finished list.
pub(crate) async fn attach(table: &ExecTable, exec_id: u64, mut attach: Attach) {
    // At most twice: a command that ends between the lookup and the
    // hand-over is looked up again among the finished ones.
    for _ in 0..2 {
        match table.lookup(exec_id) {
            Lookup::Running(tx, view) => {
                if view.attached.load(Ordering::SeqCst) {
                    return attach.refuse(busy(exec_id)).await;
                }
                match tx.try_send(attach) {
                    Ok(()) => return,
                    Err(TrySendError::Full(a)) => return a.refuse(busy(exec_id)).await,
                    Err(TrySendError::Closed(a)) => attach = a,
                }
            }
            Lookup::Finished {
                pid,
                result,
                output,
            } => return serve_finished(attach, exec_id, pid, result, output).await,
            Lookup::NotFound => {
                return attach
                    .refuse(RemoteError::new(
                        RemoteErrorKind::NotFound,
                        format!("no command with exec id {exec_id} (unknown, or forgotten)"),
                    ))
                    .await;
            }
        }
    }
    attach
        .refuse(RemoteError::new(
            RemoteErrorKind::Busy,
            format!("command {exec_id} is ending; ask again"),
        ))
        .await;
}

fn busy(exec_id: u64) -> RemoteError {
    RemoteError::new(
        RemoteErrorKind::Busy,
        format!("another request streams command {exec_id}"),
    )
}

/// Answers an attach to a command that ended: `Started`, the output it
/// left (within the fresh window: it is at most
/// [`nova_protocol::DETACHED_OUTPUT_LIMIT`]), then its end.
async fn serve_finished(
    attach: Attach,
    exec_id: u64,
    pid: u32,
    result: ExecResult,
    output: Vec<(StreamKind, Bytes)>,
) {
    let id = attach.id;
    let out = &attach.out;
    let sent = async {
        out.send(AgentMessage::Started { id, pid, exec_id }).await?;
        for (stream, data) in output {
            out.send(AgentMessage::Data { id, stream, data }).await?;
        }
        out.done(id, Ok(Response::Exited(result))).await
    };
    if sent.await.is_err() {
        tracing::debug!(
            exec_id,
            "the host went away while it was sent a finished command"
        );
    }
    let _ = attach.finished.send(id);
}

#[cfg(test)]
mod tests {
    use nova_protocol::ExitStatus;

    use super::*;

    fn result(code: i32) -> ExecResult {
        ExecResult {
            status: ExitStatus::Exited(code),
            timed_out: false,
            duration_us: 1,
        }
    }

    #[test]
    fn ids_are_unique_and_finished_commands_are_bounded() {
        let table = ExecTable::default();
        let a = table.register(10, ExecCommand::Shell("a".into()));
        let b = table.register(11, ExecCommand::Shell("b".into()));
        assert_ne!(a.exec_id, b.exec_id);
        table.finish(a.exec_id, result(7), vec![(StreamKind::Stdout, "x".into())]);
        let listed = table.list();
        assert_eq!(listed.len(), 2);
        assert_eq!(listed[0].state, ExecState::Ended(result(7)));
        assert_eq!(listed[0].buffered_bytes, 1);
        assert_eq!(listed[1].state, ExecState::Running);
        // Past the bound the oldest are forgotten; ids are never reused.
        for i in 0..FINISHED_EXECS_KEPT + 3 {
            let r = table.register(i as u32, ExecCommand::Shell("c".into()));
            assert!(r.exec_id > b.exec_id);
            table.finish(r.exec_id, result(0), Vec::new());
        }
        let listed = table.list();
        assert_eq!(listed.len(), FINISHED_EXECS_KEPT + 1, "the running one too");
        assert!(listed.iter().all(|e| e.exec_id != a.exec_id));
    }

    #[test]
    fn held_output_of_finished_commands_is_bounded_oldest_dropped_first() {
        let table = ExecTable::default();
        let chunk = Bytes::from(vec![0u8; 1024 * 1024]);
        let mut ids = Vec::new();
        for _ in 0..(FINISHED_OUTPUT_LIMIT / chunk.len() + 2) {
            let r = table.register(1, ExecCommand::Shell("big".into()));
            table.finish(
                r.exec_id,
                result(0),
                vec![(StreamKind::Stdout, chunk.clone())],
            );
            ids.push(r.exec_id);
        }
        let listed = table.list();
        let held: u64 = listed.iter().map(|e| e.buffered_bytes).sum();
        assert!(held <= FINISHED_OUTPUT_LIMIT as u64, "{held}");
        assert_eq!(listed[0].buffered_bytes, 0, "the oldest lost its output");
        assert_eq!(listed.last().unwrap().buffered_bytes, chunk.len() as u64);
        assert_eq!(
            listed[0].state,
            ExecState::Ended(result(0)),
            "its status stays"
        );
    }

    #[test]
    fn a_finished_commands_output_goes_to_the_first_attach_only() {
        let table = ExecTable::default();
        let r = table.register(5, ExecCommand::Shell("x".into()));
        table.finish(r.exec_id, result(3), vec![(StreamKind::Stderr, "e".into())]);
        let Lookup::Finished { output, pid, .. } = table.lookup(r.exec_id) else {
            panic!("finished")
        };
        assert_eq!((pid, output.len()), (5, 1));
        let Lookup::Finished { output, .. } = table.lookup(r.exec_id) else {
            panic!("finished")
        };
        assert!(output.is_empty());
        assert!(matches!(table.lookup(999), Lookup::NotFound));
    }
}
