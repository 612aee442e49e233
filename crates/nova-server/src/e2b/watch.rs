//! Directory watching (`filesystem.Filesystem/WatchDir`, and the
//! `CreateWatcher` / `GetWatcherEvents` / `RemoveWatcher` polling RPCs the
//! sync SDK uses), by polling: the guest agent has no inotify channel, so
//! the watched directory is listed every [`POLL_EVERY`] and compared with
//! the listing before.
//!
//! What a poll can see: an entry that appears (`CREATE`), disappears
//! (`REMOVE`), changes size (`WRITE`) or mode (`CHMOD`). Changes that undo
//! themselves between two polls, writes that keep the size, and renames (a
//! `REMOVE` and a `CREATE`) are reported as such or not at all. Listings are
//! bounded ([`MAX_ENTRIES`], [`MAX_DEPTH`]), and so are the events a watcher
//! keeps ([`MAX_PENDING`]; the oldest go) and the watchers a daemon keeps
//! ([`MAX_WATCHERS`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::HeaderMap;
use axum::response::Response;
use bytes::Bytes;
use nova_core::fs::FileKind;
use nova_core::id::SandboxId;
use serde::{Deserialize, Serialize};

use crate::daemon::Daemon;
use crate::e2b::connect::{self, Code, Codec, ConnectError, end_frame, message_frame};
use crate::e2b::filesystem::{file_error, resolve};
use crate::e2b::proto::{Decode, DecodeError, Encode, Value};
use crate::e2b::wire::{EntryInfo, FileType, I64, permissions};

/// How often a watched directory is listed.
pub const POLL_EVERY: Duration = Duration::from_millis(300);
/// Most entries one listing holds.
pub const MAX_ENTRIES: usize = 10_000;
/// Deepest a recursive watch looks.
pub const MAX_DEPTH: u32 = 8;
/// Most events a watcher keeps for `GetWatcherEvents`.
pub const MAX_PENDING: usize = 10_000;
/// Most watchers (`CreateWatcher`) the daemon keeps.
pub const MAX_WATCHERS: usize = 256;
/// Keepalive of a `WatchDir` stream when the client names none.
const KEEPALIVE: Duration = Duration::from_secs(50);

/// `filesystem.WatchDirRequest` / `CreateWatcherRequest`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct WatchRequest {
    /// The directory.
    pub path: String,
    /// Watch its subdirectories too.
    pub recursive: bool,
    /// Put the entry's info in each event.
    pub include_entry: bool,
}

/// `filesystem.GetWatcherEventsRequest` / `RemoveWatcherRequest`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct WatcherRequest {
    /// The watcher.
    pub watcher_id: String,
}

/// `filesystem.EventType`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum EventType {
    /// It appeared.
    #[serde(rename = "EVENT_TYPE_CREATE")]
    Create = 1,
    /// Its size changed.
    #[serde(rename = "EVENT_TYPE_WRITE")]
    Write = 2,
    /// It disappeared.
    #[serde(rename = "EVENT_TYPE_REMOVE")]
    Remove = 3,
    /// Its mode changed.
    #[serde(rename = "EVENT_TYPE_CHMOD")]
    Chmod = 5,
}

/// `filesystem.FilesystemEvent`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FsEvent {
    /// The path relative to the watched directory.
    pub name: String,
    /// What happened.
    #[serde(rename = "type")]
    pub kind: EventType,
    /// The entry, when asked for and it still exists.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entry: Option<EntryInfo>,
}

/// `filesystem.WatchDirResponse` (a oneof).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WatchDirResponse {
    /// The watch started.
    Start {},
    /// Something changed.
    Filesystem(FsEvent),
    /// Nothing happened for a while.
    Keepalive {},
}

/// `filesystem.CreateWatcherResponse`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateWatcherResponse {
    /// The new watcher.
    pub watcher_id: String,
}

/// `filesystem.GetWatcherEventsResponse`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct GetWatcherEventsResponse {
    /// What happened since the last call.
    pub events: Vec<FsEvent>,
}

/// One entry of a listing: (kind, size, mode).
type Seen = (FileKind, u64, u32);

/// A listing of the watched tree, by path relative to its root.
type Listing = BTreeMap<String, Seen>;

/// Lists `root` (and, when `recursive`, what is under it).
async fn list(
    daemon: &Daemon,
    id: &SandboxId,
    root: &str,
    recursive: bool,
) -> Result<Listing, ConnectError> {
    let mut out = Listing::new();
    let mut queue = vec![(String::new(), 0u32)];
    while let Some((rel, depth)) = queue.pop() {
        let dir = if rel.is_empty() {
            root.to_owned()
        } else {
            format!("{root}/{rel}")
        };
        let listing = match daemon.hypervisor().list_dir(id, &dir).await {
            Ok(l) => l,
            // A subdirectory that went between two listings.
            Err(nova_core::error::FileError::NoSuchFile { .. }) if !rel.is_empty() => continue,
            Err(e) => return Err(file_error(e)),
        };
        for e in listing.entries {
            let path = if rel.is_empty() {
                e.name.clone()
            } else {
                format!("{rel}/{}", e.name)
            };
            if recursive && e.kind == FileKind::Dir && depth + 1 < MAX_DEPTH {
                queue.push((path.clone(), depth + 1));
            }
            out.insert(path, (e.kind, e.size, e.mode));
            if out.len() >= MAX_ENTRIES {
                return Ok(out);
            }
        }
    }
    Ok(out)
}

fn entry(root: &str, name: &str, seen: Seen) -> EntryInfo {
    let t = match seen.0 {
        FileKind::File => FileType::File,
        FileKind::Dir => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        FileKind::Other => FileType::Unspecified,
    };
    let path = if root == "/" {
        format!("/{name}")
    } else {
        format!("{root}/{name}")
    };
    EntryInfo {
        name: name.rsplit('/').next().unwrap_or(name).to_owned(),
        file_type: t,
        path,
        size: I64(i64::try_from(seen.1).unwrap_or(i64::MAX)),
        mode: seen.2,
        permissions: permissions(seen.2, t),
        owner: String::new(),
        group: String::new(),
        modified_time: None,
        is_symlink: t == FileType::Symlink,
    }
}

/// What changed from `old` to `new`.
fn diff(root: &str, old: &Listing, new: &Listing, include_entry: bool) -> Vec<FsEvent> {
    let mut events = Vec::new();
    let with = |name: &str, seen: Seen| include_entry.then(|| entry(root, name, seen));
    for (name, &now) in new {
        match old.get(name) {
            None => events.push(FsEvent {
                name: name.clone(),
                kind: EventType::Create,
                entry: with(name, now),
            }),
            Some(&before) => {
                if before.0 != FileKind::Dir && before.1 != now.1 {
                    events.push(FsEvent {
                        name: name.clone(),
                        kind: EventType::Write,
                        entry: with(name, now),
                    });
                }
                if before.2 != now.2 {
                    events.push(FsEvent {
                        name: name.clone(),
                        kind: EventType::Chmod,
                        entry: with(name, now),
                    });
                }
            }
        }
    }
    for name in old.keys().filter(|n| !new.contains_key(*n)) {
        events.push(FsEvent {
            name: name.clone(),
            kind: EventType::Remove,
            entry: None,
        });
    }
    events
}

/// The watched directory, resolved, after checking it is one.
async fn watched_dir(daemon: &Daemon, id: &SandboxId, path: &str) -> Result<String, ConnectError> {
    let root = resolve(path)?;
    let stat = daemon
        .hypervisor()
        .stat(id, &root)
        .await
        .map_err(file_error)?;
    if stat.kind != FileKind::Dir {
        return Err(ConnectError::new(
            Code::InvalidArgument,
            format!("{root} is not a directory"),
        ));
    }
    Ok(root)
}

/// `filesystem.Filesystem/WatchDir`: a start event, then events as polls see them.
pub async fn watch_dir(
    daemon: &Arc<Daemon>,
    id: &SandboxId,
    (codec, headers): (Codec, &HeaderMap),
    request: WatchRequest,
) -> Result<Response, ConnectError> {
    let root = watched_dir(daemon, id, &request.path).await?;
    let first = list(daemon, id, &root, request.recursive).await?;
    let keepalive = headers
        .get("keepalive-ping-interval")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|s| *s > 0)
        .map(Duration::from_secs)
        .unwrap_or(KEEPALIVE);
    struct State {
        daemon: Arc<Daemon>,
        id: SandboxId,
        root: String,
        request: WatchRequest,
        last: Listing,
        started: bool,
        done: bool,
        quiet: Duration,
        keepalive: Duration,
    }
    let state = State {
        daemon: daemon.clone(),
        id: id.clone(),
        root,
        request,
        last: first,
        started: false,
        done: false,
        quiet: Duration::ZERO,
        keepalive,
    };
    let frames = futures_util::stream::unfold(state, move |mut s| async move {
        if s.done {
            return None;
        }
        if !s.started {
            s.started = true;
            return Some((message_frame(codec, &WatchDirResponse::Start {}), s));
        }
        loop {
            tokio::time::sleep(POLL_EVERY).await;
            match list(&s.daemon, &s.id, &s.root, s.request.recursive).await {
                Ok(now) => {
                    let events = diff(&s.root, &s.last, &now, s.request.include_entry);
                    s.last = now;
                    if !events.is_empty() {
                        s.quiet = Duration::ZERO;
                        let mut out = Vec::new();
                        for e in events {
                            out.extend_from_slice(&message_frame(
                                codec,
                                &WatchDirResponse::Filesystem(e),
                            ));
                        }
                        return Some((Bytes::from(out), s));
                    }
                    s.quiet += POLL_EVERY;
                    if s.quiet >= s.keepalive {
                        s.quiet = Duration::ZERO;
                        return Some((message_frame(codec, &WatchDirResponse::Keepalive {}), s));
                    }
                }
                Err(e) => {
                    s.done = true;
                    return Some((end_frame(Some(&e)), s));
                }
            }
        }
    });
    Ok(connect::stream_response(codec, frames))
}

/// A watcher made by `CreateWatcher`.
#[derive(Debug)]
struct Watcher {
    sandbox: SandboxId,
    pending: Arc<Mutex<Vec<FsEvent>>>,
    /// Why its polling stopped, once it did.
    failed: Arc<Mutex<Option<ConnectError>>>,
    task: tokio::task::AbortHandle,
}

/// The daemon's watchers, by id.
#[derive(Debug, Default)]
pub struct Watchers {
    by_id: Mutex<HashMap<String, Watcher>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Plain data under the lock: a poisoned lock is still whole.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn watcher_not_found(id: &str) -> ConnectError {
    ConnectError::new(Code::NotFound, format!("watcher {id} not found"))
}

impl Watchers {
    /// `CreateWatcher`: starts polling, returns the watcher's id.
    pub async fn create(
        &self,
        daemon: &Arc<Daemon>,
        id: &SandboxId,
        request: WatchRequest,
    ) -> Result<CreateWatcherResponse, ConnectError> {
        if lock(&self.by_id).len() >= MAX_WATCHERS {
            return Err(ConnectError::new(
                Code::ResourceExhausted,
                format!("{MAX_WATCHERS} watchers exist already: remove some (stop())"),
            ));
        }
        let root = watched_dir(daemon, id, &request.path).await?;
        let mut last = list(daemon, id, &root, request.recursive).await?;
        let pending = Arc::new(Mutex::new(Vec::new()));
        let failed = Arc::new(Mutex::new(None));
        let (d, sid, p, f) = (daemon.clone(), id.clone(), pending.clone(), failed.clone());
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(POLL_EVERY).await;
                match list(&d, &sid, &root, request.recursive).await {
                    Ok(now) => {
                        let events = diff(&root, &last, &now, request.include_entry);
                        last = now;
                        let mut pending = lock(&p);
                        pending.extend(events);
                        let over = pending.len().saturating_sub(MAX_PENDING);
                        pending.drain(..over);
                    }
                    Err(e) => {
                        *lock(&f) = Some(e);
                        return;
                    }
                }
            }
        })
        .abort_handle();
        let watcher_id = SandboxId::random().as_str().replacen("sb-", "w-", 1);
        lock(&self.by_id).insert(
            watcher_id.clone(),
            Watcher {
                sandbox: id.clone(),
                pending,
                failed,
                task,
            },
        );
        Ok(CreateWatcherResponse { watcher_id })
    }

    /// `GetWatcherEvents`: what happened since the last call.
    pub fn events(
        &self,
        id: &SandboxId,
        request: &WatcherRequest,
    ) -> Result<GetWatcherEventsResponse, ConnectError> {
        let by_id = lock(&self.by_id);
        let w = by_id
            .get(&request.watcher_id)
            .filter(|w| &w.sandbox == id)
            .ok_or_else(|| watcher_not_found(&request.watcher_id))?;
        let events = std::mem::take(&mut *lock(&w.pending));
        if events.is_empty()
            && let Some(e) = lock(&w.failed).clone()
        {
            return Err(e);
        }
        Ok(GetWatcherEventsResponse { events })
    }

    /// `RemoveWatcher`.
    pub fn remove(&self, id: &SandboxId, request: &WatcherRequest) -> Result<(), ConnectError> {
        let mut by_id = lock(&self.by_id);
        match by_id.get(&request.watcher_id) {
            Some(w) if &w.sandbox == id => {
                w.task.abort();
                by_id.remove(&request.watcher_id);
                Ok(())
            }
            _ => Err(watcher_not_found(&request.watcher_id)),
        }
    }

    /// Stops and forgets the watchers of sandbox `id`.
    pub fn forget(&self, id: &SandboxId) {
        lock(&self.by_id).retain(|_, w| {
            let keep = &w.sandbox != id;
            if !keep {
                w.task.abort();
            }
            keep
        });
    }
}

// ------------------------------------------------------------ protobuf

impl Decode for WatchRequest {
    fn field(&mut self, field: u32, v: Value<'_>) -> Result<(), DecodeError> {
        match field {
            1 => self.path = v.string()?,
            2 => self.recursive = v.bool()?,
            3 => self.include_entry = v.bool()?,
            _ => {}
        }
        Ok(())
    }
}

impl Decode for WatcherRequest {
    fn field(&mut self, field: u32, v: Value<'_>) -> Result<(), DecodeError> {
        if field == 1 {
            self.watcher_id = v.string()?;
        }
        Ok(())
    }
}

impl Encode for FsEvent {
    fn encode(&self, out: &mut Vec<u8>) {
        crate::e2b::proto::put_str(out, 1, &self.name);
        crate::e2b::proto::put_u64(out, 2, self.kind as u64);
        if let Some(e) = &self.entry {
            crate::e2b::proto::put_msg(out, 3, e);
        }
    }
}

impl Encode for WatchDirResponse {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            WatchDirResponse::Start {} => {
                crate::e2b::proto::put_msg(out, 1, &crate::e2b::wire::Empty {})
            }
            WatchDirResponse::Filesystem(e) => crate::e2b::proto::put_msg(out, 2, e),
            WatchDirResponse::Keepalive {} => {
                crate::e2b::proto::put_msg(out, 3, &crate::e2b::wire::Empty {})
            }
        }
    }
}

impl Encode for CreateWatcherResponse {
    fn encode(&self, out: &mut Vec<u8>) {
        crate::e2b::proto::put_str(out, 1, &self.watcher_id);
    }
}

impl Encode for GetWatcherEventsResponse {
    fn encode(&self, out: &mut Vec<u8>) {
        for e in &self.events {
            crate::e2b::proto::put_msg(out, 1, e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polls_are_compared_into_events() {
        let old: Listing = [
            ("a".to_owned(), (FileKind::File, 1, 0o644)),
            ("d".to_owned(), (FileKind::Dir, 4096, 0o755)),
            ("gone".to_owned(), (FileKind::File, 0, 0o644)),
        ]
        .into();
        let new: Listing = [
            ("a".to_owned(), (FileKind::File, 2, 0o600)),
            ("d".to_owned(), (FileKind::Dir, 8192, 0o755)),
            ("d/new".to_owned(), (FileKind::File, 0, 0o644)),
        ]
        .into();
        let events = diff("/w", &old, &new, true);
        let kinds: Vec<(&str, EventType)> =
            events.iter().map(|e| (e.name.as_str(), e.kind)).collect();
        assert_eq!(
            kinds,
            [
                ("a", EventType::Write),
                ("a", EventType::Chmod),
                ("d/new", EventType::Create),
                ("gone", EventType::Remove),
            ]
        );
        assert_eq!(
            events[2].entry.as_ref().map(|e| e.path.as_str()),
            Some("/w/d/new")
        );
        assert!(events[3].entry.is_none());
        assert!(diff("/w", &new, &new, false).is_empty());
    }

    #[test]
    fn watch_events_have_the_sdks_shape() {
        let v = serde_json::to_value(WatchDirResponse::Filesystem(FsEvent {
            name: "x".into(),
            kind: EventType::Create,
            entry: None,
        }))
        .unwrap();
        assert_eq!(
            v,
            serde_json::json!({"filesystem": {"name": "x", "type": "EVENT_TYPE_CREATE"}})
        );
        assert_eq!(
            serde_json::to_value(WatchDirResponse::Start {}).unwrap(),
            serde_json::json!({"start": {}})
        );
        let start = WatchDirResponse::Start {}.to_bytes();
        assert_eq!(start, [0x0a, 0x00]);
        let r: WatchRequest =
            serde_json::from_str(r#"{"path":"/tmp","recursive":true,"includeEntry":true}"#)
                .unwrap();
        assert!(r.recursive && r.include_entry);
    }
}
