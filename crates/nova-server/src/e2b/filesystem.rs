//! envd's `filesystem.Filesystem` service over the daemon's file calls.
//!
//! Stat, ListDir, MakeDir and Remove map to the runtime's own file
//! operations. The runtime has no rename, so Move runs `mv` in the guest
//! (through the same exec path as commands). Watching is in [`super::watch`].
//!
//! Relative paths are relative to the guest user's home, as in E2B; here
//! that is [`HOME`], the guest agent's working directory.

use std::sync::Arc;

use nova_core::error::FileError;
use nova_core::exec::{Command, ExecRequest};
use nova_core::fs::{FileKind, FileStat};
use nova_core::id::SandboxId;

use crate::daemon::Daemon;
use crate::e2b::connect::{Code, ConnectError};
use crate::e2b::wire::{
    EntryInfo, EntryResponse, FileType, I64, ListDirRequest, ListDirResponse, MoveRequest,
    PathRequest, Timestamp, permissions,
};
use crate::problem::Problem;

/// The guest user's home: where relative paths start.
pub const HOME: &str = "/root";
/// Most entries a recursive `ListDir` returns.
const MAX_LIST_ENTRIES: usize = 10_000;
/// Deepest recursive `ListDir`.
const MAX_DEPTH: u32 = 32;

/// `path` made absolute (relative to [`HOME`]) and without `.`, `..` or
/// repeated slashes.
pub fn resolve(path: &str) -> Result<String, ConnectError> {
    if path.contains('\0') {
        return Err(ConnectError::new(
            Code::InvalidArgument,
            "path contains a NUL byte",
        ));
    }
    let joined = if path.starts_with('/') {
        path.to_owned()
    } else if path.is_empty() {
        HOME.to_owned()
    } else {
        let rest = path
            .strip_prefix("~/")
            .unwrap_or(if path == "~" { "" } else { path });
        format!("{HOME}/{rest}")
    };
    let mut parts: Vec<&str> = Vec::new();
    for part in joined.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    Ok(format!("/{}", parts.join("/")))
}

/// The file error as a Connect error (`not_found`, `already_exists`, ...).
pub fn file_error(e: FileError) -> ConnectError {
    match &e {
        FileError::NoSuchFile { .. } => ConnectError::new(Code::NotFound, e.to_string()),
        FileError::AlreadyExists { .. } => ConnectError::new(Code::AlreadyExists, e.to_string()),
        FileError::InvalidPath { .. } => ConnectError::new(Code::InvalidArgument, e.to_string()),
        FileError::PermissionDenied { .. } => {
            ConnectError::new(Code::PermissionDenied, e.to_string())
        }
        _ => Problem::from(e).into(),
    }
}

fn name_of(path: &str) -> String {
    path.rsplit('/').next().unwrap_or("").to_owned()
}

fn file_type(kind: FileKind) -> FileType {
    match kind {
        FileKind::File => FileType::File,
        FileKind::Dir => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        FileKind::Other => FileType::Unspecified,
    }
}

fn id_name(id: u32) -> String {
    if id == 0 {
        "root".into()
    } else {
        id.to_string()
    }
}

/// The entry of `path` from its stat.
pub fn entry_of(path: &str, stat: &FileStat) -> EntryInfo {
    let t = file_type(stat.kind);
    EntryInfo {
        name: name_of(path),
        file_type: t,
        path: path.to_owned(),
        size: I64(i64::try_from(stat.size).unwrap_or(i64::MAX)),
        mode: stat.mode,
        permissions: permissions(stat.mode, t),
        owner: id_name(stat.uid),
        group: id_name(stat.gid),
        modified_time: Some(Timestamp(stat.modified_ms)),
        is_symlink: t == FileType::Symlink,
    }
}

async fn stat_entry(
    daemon: &Daemon,
    id: &SandboxId,
    path: &str,
) -> Result<EntryInfo, ConnectError> {
    let stat = daemon
        .hypervisor()
        .stat(id, path)
        .await
        .map_err(file_error)?;
    Ok(entry_of(path, &stat))
}

/// `filesystem.Filesystem/Stat`.
pub async fn stat(
    daemon: &Arc<Daemon>,
    id: &SandboxId,
    r: PathRequest,
) -> Result<EntryResponse, ConnectError> {
    let path = resolve(&r.path)?;
    Ok(EntryResponse {
        entry: stat_entry(daemon, id, &path).await?,
    })
}

/// `filesystem.Filesystem/ListDir`: entries to `depth` levels (1 when 0).
pub async fn list_dir(
    daemon: &Arc<Daemon>,
    id: &SandboxId,
    r: ListDirRequest,
) -> Result<ListDirResponse, ConnectError> {
    let root = resolve(&r.path)?;
    let depth = r.depth.clamp(1, MAX_DEPTH);
    // ListDir of a file is an error in envd.
    let top = daemon
        .hypervisor()
        .stat(id, &root)
        .await
        .map_err(file_error)?;
    if top.kind != FileKind::Dir {
        return Err(ConnectError::new(
            Code::InvalidArgument,
            format!("{root} is not a directory"),
        ));
    }
    let mut entries = Vec::new();
    let mut queue = vec![(root, 1u32)];
    while let Some((dir, level)) = queue.pop() {
        let listing = daemon
            .hypervisor()
            .list_dir(id, &dir)
            .await
            .map_err(file_error)?;
        for e in listing.entries {
            let path = if dir == "/" {
                format!("/{}", e.name)
            } else {
                format!("{dir}/{}", e.name)
            };
            let t = file_type(e.kind);
            if t == FileType::Directory && level < depth {
                queue.push((path.clone(), level + 1));
            }
            entries.push(EntryInfo {
                name: e.name,
                file_type: t,
                path,
                size: I64(i64::try_from(e.size).unwrap_or(i64::MAX)),
                mode: e.mode,
                permissions: permissions(e.mode, t),
                owner: String::new(),
                group: String::new(),
                modified_time: None,
                is_symlink: t == FileType::Symlink,
            });
            if entries.len() >= MAX_LIST_ENTRIES {
                return Err(ConnectError::new(
                    Code::ResourceExhausted,
                    format!("more than {MAX_LIST_ENTRIES} entries: list with a smaller depth"),
                ));
            }
        }
    }
    Ok(ListDirResponse { entries })
}

/// `filesystem.Filesystem/MakeDir`: `already_exists` when it does.
pub async fn make_dir(
    daemon: &Arc<Daemon>,
    id: &SandboxId,
    r: PathRequest,
) -> Result<EntryResponse, ConnectError> {
    let path = resolve(&r.path)?;
    match daemon.hypervisor().stat(id, &path).await {
        Ok(_) => {
            return Err(ConnectError::new(
                Code::AlreadyExists,
                format!("{path} already exists"),
            ));
        }
        Err(FileError::NoSuchFile { .. }) => {}
        Err(e) => return Err(file_error(e)),
    }
    daemon
        .hypervisor()
        .mkdir(id, &path, 0o755)
        .await
        .map_err(file_error)?;
    Ok(EntryResponse {
        entry: stat_entry(daemon, id, &path).await?,
    })
}

/// `filesystem.Filesystem/Remove` (recursive, as envd's).
pub async fn remove(
    daemon: &Arc<Daemon>,
    id: &SandboxId,
    r: PathRequest,
) -> Result<(), ConnectError> {
    let path = resolve(&r.path)?;
    daemon
        .hypervisor()
        .remove(id, &path, true)
        .await
        .map_err(file_error)
}

/// `filesystem.Filesystem/Move`: `mv` in the guest (the runtime has no
/// rename of its own).
pub async fn move_entry(
    daemon: &Arc<Daemon>,
    id: &SandboxId,
    r: MoveRequest,
) -> Result<EntryResponse, ConnectError> {
    let source = resolve(&r.source)?;
    let destination = resolve(&r.destination)?;
    // Missing sources are not_found, as in envd.
    daemon
        .hypervisor()
        .stat(id, &source)
        .await
        .map_err(file_error)?;
    let request = ExecRequest {
        command: Command::Argv(vec![
            "mv".into(),
            "-f".into(),
            "--".into(),
            source.clone(),
            destination.clone(),
        ]),
        env: Default::default(),
        cwd: None,
        stdin: None,
        stream_stdin: false,
        timeout: Some(std::time::Duration::from_secs(60)),
        max_output: Some(64 * 1024),
        pty: None,
        // As root, as the file API's other requests run.
        user: Some("0".to_owned()),
    };
    let out = daemon
        .hypervisor()
        .execute_command(id, request)
        .await
        .map_err(|e| ConnectError::from(Problem::from(e)))?;
    if !out.success() {
        return Err(ConnectError::new(
            Code::Internal,
            format!(
                "mv {source} {destination} failed: {}",
                out.stderr_lossy().trim()
            ),
        ));
    }
    Ok(EntryResponse {
        entry: stat_entry(daemon, id, &destination).await?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_resolve_against_the_home() {
        assert_eq!(resolve("a.txt").unwrap(), "/root/a.txt");
        assert_eq!(resolve("~/x/../y").unwrap(), "/root/y");
        assert_eq!(resolve("/tmp//a/./b/").unwrap(), "/tmp/a/b");
        assert_eq!(resolve("/../..").unwrap(), "/");
        assert_eq!(resolve("").unwrap(), "/root");
        assert!(resolve("a\0b").is_err());
    }

    #[test]
    fn entries_from_a_stat() {
        let stat = FileStat {
            kind: FileKind::Dir,
            size: 4096,
            mode: 0o755,
            uid: 0,
            gid: 0,
            modified_ms: 0,
        };
        let e = entry_of("/tmp/d", &stat);
        assert_eq!(e.name, "d");
        assert_eq!(e.file_type, FileType::Directory);
        assert_eq!(e.permissions, "drwxr-xr-x");
        assert_eq!(e.owner, "root");
    }
}
