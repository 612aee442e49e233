//! Named network namespaces, made the way iproute2 makes them.
//!
//! A namespace is created by a fresh thread that calls `unshare(CLONE_NEWNET)`
//! (which moves only that thread) and bind-mounts its
//! `/proc/thread-self/ns/net` onto `/run/netns/<name>`; the mount keeps the
//! namespace alive after the thread exits, and `ip netns` sees it. No
//! `fork()`: this runs inside a multi-threaded tokio process. `/run/netns` is
//! made a shared mount point first, as `ip netns add` does, so the
//! namespaces show in mount namespaces made later.
//!
//! Work inside a namespace ([`run_in`], [`run_in_async`]) also runs on a
//! fresh thread that `setns`-es into it and then exits, so no thread of the
//! caller's pools ever changes namespace. A netlink socket opened on that
//! thread belongs to the namespace, as does a process spawned from it (`nft`).

use std::fs::{DirBuilder, OpenOptions};
use std::future::Future;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rustix::mount::{MountPropagationFlags, UnmountFlags};
use rustix::thread::{LinkNameSpaceType, UnshareFlags};

use crate::error::HostError;

/// Where named network namespaces are bind-mounted (iproute2's place).
pub const NETNS_DIR: &str = "/run/netns";

/// Serializes the one-time set-up of [`NETNS_DIR`] within this process.
static NETNS_DIR_SETUP: Mutex<()> = Mutex::new(());

/// The path of the namespace called `name`.
pub fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// Makes `/run/netns` exist and be a shared mount point.
fn ensure_netns_dir() -> Result<(), HostError> {
    let _guard = NETNS_DIR_SETUP
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    match DirBuilder::new()
        .mode(0o755)
        .recursive(true)
        .create(NETNS_DIR)
    {
        Ok(()) => {}
        Err(e) => return Err(HostError::io(format!("creating {NETNS_DIR}"), e)),
    }
    let shared = MountPropagationFlags::SHARED | MountPropagationFlags::REC;
    match rustix::mount::mount_change(NETNS_DIR, shared) {
        Ok(()) => Ok(()),
        // Not a mount point yet: bind it onto itself, as iproute2 does.
        Err(rustix::io::Errno::INVAL) => {
            rustix::mount::mount_bind(NETNS_DIR, NETNS_DIR).map_err(|e| {
                HostError::io(format!("bind-mounting {NETNS_DIR} onto itself"), e.into())
            })?;
            rustix::mount::mount_change(NETNS_DIR, shared)
                .map_err(|e| HostError::io(format!("making {NETNS_DIR} a shared mount"), e.into()))
        }
        Err(e) => Err(HostError::io(
            format!("making {NETNS_DIR} a shared mount"),
            e.into(),
        )),
    }
}

/// Why [`create`] failed.
#[derive(Debug)]
pub(crate) enum CreateNetnsError {
    Exists,
    Host(HostError),
}

/// Creates the namespace `/run/netns/<name>`; fails with
/// [`CreateNetnsError::Exists`] if the name is taken.
pub(crate) fn create(name: &str) -> Result<PathBuf, CreateNetnsError> {
    ensure_netns_dir().map_err(CreateNetnsError::Host)?;
    let path = netns_path(name);
    match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o444)
        .open(&path)
    {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Err(CreateNetnsError::Exists),
        Err(e) => {
            return Err(CreateNetnsError::Host(HostError::io(
                format!("creating {}", path.display()),
                e,
            )));
        }
    }
    let target = path.clone();
    let made = std::thread::Builder::new()
        .name("nova-net-unshare".into())
        .spawn(move || -> io::Result<()> {
            // SAFETY: CLONE_NEWNET only moves this thread, which exits right
            // after, into a new network namespace. It touches neither the file
            // descriptor table nor the filesystem context shared with the
            // process's other threads (the hazards of CLONE_FILES / CLONE_FS
            // that make `unshare` unsafe in general).
            unsafe { rustix::thread::unshare_unsafe(UnshareFlags::NEWNET) }?;
            rustix::mount::mount_bind("/proc/thread-self/ns/net", &target)?;
            Ok(())
        })
        .map_err(|e| HostError::io("spawning the namespace thread", e))
        .map_err(CreateNetnsError::Host)?
        .join();
    let result = match made {
        Ok(Ok(())) => return Ok(path),
        Ok(Err(e)) => HostError::io(format!("creating network namespace {name}"), e),
        Err(_) => HostError::ThreadPanicked {
            op: format!("creating network namespace {name}"),
        },
    };
    let _ = std::fs::remove_file(&path);
    Err(CreateNetnsError::Host(result))
}

/// Removes `/run/netns/<name>`: detaches the mount and deletes the file. The
/// namespace itself goes when nothing else holds it (a process inside it, an
/// open fd). Absent is not an error.
pub(crate) fn delete(name: &str) -> Result<(), HostError> {
    let path = netns_path(name);
    match rustix::mount::unmount(&path, UnmountFlags::DETACH) {
        Ok(()) | Err(rustix::io::Errno::INVAL) | Err(rustix::io::Errno::NOENT) => {}
        Err(e) => {
            return Err(HostError::io(
                format!("unmounting {}", path.display()),
                e.into(),
            ));
        }
    }
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(HostError::io(format!("removing {}", path.display()), e)),
    }
}

/// The names under `/run/netns` (none if it does not exist).
pub(crate) fn list() -> Result<Vec<String>, HostError> {
    let entries = match std::fs::read_dir(NETNS_DIR) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(HostError::io(format!("listing {NETNS_DIR}"), e)),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| HostError::io(format!("listing {NETNS_DIR}"), e))?;
        if let Some(name) = entry.file_name().to_str() {
            names.push(name.to_owned());
        }
    }
    Ok(names)
}

/// Opens a namespace file, for `setns` or for IFLA_NET_NS_FD.
pub fn open(path: &Path) -> Result<OwnedFd, HostError> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map(OwnedFd::from)
        .map_err(|e| HostError::io(format!("opening network namespace {}", path.display()), e))
}

/// Runs `f` on a fresh thread inside the namespace at `path` and returns its
/// result, without blocking the async caller.
pub async fn run_in<T, F>(path: &Path, op: &str, f: F) -> Result<T, HostError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, HostError> + Send + 'static,
{
    let fd = open(path)?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("nova-net-netns".into())
        .spawn(move || {
            let result = rustix::thread::move_into_link_name_space(
                fd.as_fd(),
                Some(LinkNameSpaceType::Network),
            )
            .map_err(|e| HostError::io("entering the sandbox's network namespace", e.into()))
            .and_then(|()| f());
            let _ = tx.send(result);
        })
        .map_err(|e| HostError::io("spawning a namespace thread", e))?;
    rx.await
        .map_err(|_| HostError::ThreadPanicked { op: op.to_owned() })?
}

/// Runs the future made by `f` on a fresh thread inside the namespace at
/// `path`, on a current-thread runtime of its own: netlink sockets it opens
/// belong to the namespace.
pub async fn run_in_async<T, F, Fut>(path: &Path, op: &str, f: F) -> Result<T, HostError>
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, HostError>>,
{
    let op_owned = op.to_owned();
    run_in(path, op, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| HostError::io(format!("{op_owned}: building a runtime"), e))?;
        rt.block_on(f())
    })
    .await
}
