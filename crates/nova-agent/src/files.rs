//! File requests: streamed write and read, listing, stat, remove, mkdir -p.
//!
//! Transfers use the same credit scheme as command output: a download reads
//! the next chunk only while the host has credit left, an upload returns
//! credit after each chunk is written, so a 50 GB file moves through a few
//! megabytes of memory. Blocking file-system calls run on tokio's blocking
//! pool.

use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::Path;

use nova_protocol::{
    AgentMessage, ClientMessage, DirEntry, DirListing, FileKind, FileStat, MAX_CHUNK,
    MAX_FRAME_SIZE, RemoteError, RemoteErrorKind, Response, STREAM_WINDOW, StreamKind,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::session::{Disconnected, Outbox};

/// Streams the host's chunks into `path`.
pub(crate) async fn write(
    id: u64,
    path: String,
    mode: u32,
    append: bool,
    out: Outbox,
    mut inbox: mpsc::UnboundedReceiver<ClientMessage>,
) {
    let result = write_inner(id, &path, mode, append, &out, &mut inbox).await;
    let result = match result {
        Ok(result) => result,
        Err(Disconnected) => return,
    };
    let _ = out.done(id, result).await;
}

async fn write_inner(
    id: u64,
    path: &str,
    mode: u32,
    append: bool,
    out: &Outbox,
    inbox: &mut mpsc::UnboundedReceiver<ClientMessage>,
) -> Result<Result<Response, RemoteError>, Disconnected> {
    let mut options = tokio::fs::OpenOptions::new();
    options.write(true).create(true).mode(mode & 0o7777);
    if append {
        options.append(true);
    } else {
        options.truncate(true);
    }
    let mut file = match options.open(path).await {
        Ok(file) => file,
        Err(e) => return Ok(Err(RemoteError::from_io(format!("open {path}"), &e))),
    };
    file.set_max_buf_size(MAX_CHUNK);
    let mut written = 0u64;
    loop {
        match inbox.recv().await {
            None => return Err(Disconnected),
            Some(ClientMessage::Data { data, .. }) => {
                if let Err(e) = file.write_all(&data).await {
                    return Ok(Err(RemoteError::from_io(format!("write {path}"), &e)));
                }
                written += data.len() as u64;
                let bytes = u32::try_from(data.len()).unwrap_or(u32::MAX);
                out.send(AgentMessage::Credit { id, bytes }).await?;
            }
            Some(ClientMessage::Eof { .. }) => break,
            Some(ClientMessage::Cancel { .. }) => {
                return Ok(Err(RemoteError::new(
                    RemoteErrorKind::Io,
                    format!("upload to {path} cancelled"),
                )));
            }
            Some(_) => {}
        }
    }
    let finish = async {
        file.flush().await?;
        // The mode given at creation is masked by the umask, and an existing
        // file keeps its old mode; set it explicitly.
        file.set_permissions(std::fs::Permissions::from_mode(mode & 0o7777))
            .await
    };
    Ok(match finish.await {
        Ok(()) => Ok(Response::Written { bytes: written }),
        Err(e) => Err(RemoteError::from_io(format!("finish writing {path}"), &e)),
    })
}

/// Streams `path` to the host.
pub(crate) async fn read(
    id: u64,
    path: String,
    out: Outbox,
    mut inbox: mpsc::UnboundedReceiver<ClientMessage>,
) {
    if let Ok(result) = read_inner(id, &path, &out, &mut inbox).await {
        let _ = out.done(id, result).await;
    }
}

async fn read_inner(
    id: u64,
    path: &str,
    out: &Outbox,
    inbox: &mut mpsc::UnboundedReceiver<ClientMessage>,
) -> Result<Result<Response, RemoteError>, Disconnected> {
    let opened = async {
        let file = tokio::fs::File::open(path).await?;
        let meta = file.metadata().await?;
        if meta.is_dir() {
            return Err(io::Error::from(io::ErrorKind::IsADirectory));
        }
        Ok((file, meta.len()))
    };
    let (mut file, size) = match opened.await {
        Ok(opened) => opened,
        Err(e) => return Ok(Err(RemoteError::from_io(format!("open {path}"), &e))),
    };
    file.set_max_buf_size(MAX_CHUNK);
    out.send(AgentMessage::Opened { id, size }).await?;
    let mut credit = u64::from(STREAM_WINDOW);
    let mut sent = 0u64;
    loop {
        // Take every message already there before reading on.
        while let Ok(msg) = inbox.try_recv() {
            if let Some(result) = on_download_message(msg, &mut credit, path) {
                return Ok(result);
            }
        }
        if credit == 0 {
            match inbox.recv().await {
                None => return Err(Disconnected),
                Some(msg) => {
                    if let Some(result) = on_download_message(msg, &mut credit, path) {
                        return Ok(result);
                    }
                }
            }
            continue;
        }
        let max = credit.min(MAX_CHUNK as u64) as usize;
        let mut buf = vec![0u8; max];
        let n = match file.read(&mut buf).await {
            Ok(0) => return Ok(Ok(Response::ReadDone { bytes: sent })),
            Ok(n) => n,
            Err(e) => return Ok(Err(RemoteError::from_io(format!("read {path}"), &e))),
        };
        buf.truncate(n);
        credit -= n as u64;
        sent += n as u64;
        out.send(AgentMessage::Data {
            id,
            stream: StreamKind::File,
            data: buf.into(),
        })
        .await?;
    }
}

/// Applies a host message to a download; returns the outcome if it ends it.
fn on_download_message(
    msg: ClientMessage,
    credit: &mut u64,
    path: &str,
) -> Option<Result<Response, RemoteError>> {
    match msg {
        ClientMessage::Credit { bytes, .. } => {
            *credit += u64::from(bytes);
            None
        }
        ClientMessage::Cancel { .. } => Some(Err(RemoteError::new(
            RemoteErrorKind::Io,
            format!("download of {path} cancelled"),
        ))),
        _ => None,
    }
}

/// Runs a blocking file-system call and reports its outcome as request `id`.
async fn blocking<F>(id: u64, out: Outbox, f: F)
where
    F: FnOnce() -> Result<Response, RemoteError> + Send + 'static,
{
    let result = tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(RemoteError::new(
            RemoteErrorKind::Io,
            format!("file task failed: {e}"),
        ))
    });
    let _ = out.done(id, result).await;
}

fn kind_of(ft: std::fs::FileType) -> FileKind {
    if ft.is_symlink() {
        FileKind::Symlink
    } else if ft.is_dir() {
        FileKind::Dir
    } else if ft.is_file() {
        FileKind::File
    } else {
        FileKind::Other
    }
}

/// Lists `path`, sorted by name, truncated to what fits in one frame.
pub(crate) async fn list_dir(id: u64, path: String, out: Outbox) {
    blocking(id, out, move || {
        list_dir_blocking(&path).map(Response::DirListing)
    })
    .await;
}

fn list_dir_blocking(path: &str) -> Result<DirListing, RemoteError> {
    let ctx = || format!("list {path}");
    let mut entries = Vec::new();
    // Rough encoded size: name + a few varints per entry.
    let budget = MAX_FRAME_SIZE - 64 * 1024;
    let mut used = 0usize;
    let mut truncated = false;
    for entry in std::fs::read_dir(path).map_err(|e| RemoteError::from_io(ctx(), &e))? {
        let entry = entry.map_err(|e| RemoteError::from_io(ctx(), &e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let cost = name.len() + 32;
        if used + cost > budget {
            truncated = true;
            break;
        }
        used += cost;
        // An entry removed meanwhile is listed without metadata.
        let (kind, size, mode) = match entry.metadata() {
            Ok(meta) => (kind_of(meta.file_type()), meta.len(), meta.mode() & 0o7777),
            Err(_) => (FileKind::Other, 0, 0),
        };
        entries.push(DirEntry {
            name,
            kind,
            size,
            mode,
        });
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(DirListing { entries, truncated })
}

/// Metadata of `path`.
pub(crate) async fn stat(id: u64, path: String, out: Outbox) {
    blocking(id, out, move || {
        let meta = std::fs::metadata(&path)
            .map_err(|e| RemoteError::from_io(format!("stat {path}"), &e))?;
        Ok(Response::Stat(FileStat {
            kind: kind_of(meta.file_type()),
            size: meta.len(),
            mode: meta.mode() & 0o7777,
            uid: meta.uid(),
            gid: meta.gid(),
            modified_ms: meta.mtime() * 1000 + meta.mtime_nsec() / 1_000_000,
        }))
    })
    .await;
}

/// Removes `path` (a tree with `recursive`).
pub(crate) async fn remove(id: u64, path: String, recursive: bool, out: Outbox) {
    blocking(id, out, move || {
        let p = Path::new(&path);
        let meta = std::fs::symlink_metadata(p)
            .map_err(|e| RemoteError::from_io(format!("remove {path}"), &e))?;
        let result = if meta.is_dir() {
            if recursive {
                std::fs::remove_dir_all(p)
            } else {
                std::fs::remove_dir(p)
            }
        } else {
            std::fs::remove_file(p)
        };
        result
            .map(|()| Response::Removed)
            .map_err(|e| RemoteError::from_io(format!("remove {path}"), &e))
    })
    .await;
}

/// Creates `path` and its missing parents.
pub(crate) async fn mkdir_p(id: u64, path: String, mode: u32, out: Outbox) {
    blocking(id, out, move || {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(mode & 0o7777)
            .create(&path)
            .map(|()| Response::Created)
            .map_err(|e| RemoteError::from_io(format!("mkdir -p {path}"), &e))
    })
    .await;
}
