//! The host data layout, rooted at `$NOVA_HOME`.
//!
//! ```text
//! $NOVA_HOME/
//!   templates/<id>/{<id>.json, vmlinux, rootfs.ext4, snapshot/}
//!   sandboxes/<sandbox-id>/{api.sock, vsock.sock, scratch.ext4, vmm.log,
//!                           console.log, metrics.json, state.json}
//!   cache/   (kernel build, debootstrap, downloads)
//! ```
//!
//! `$NOVA_HOME` is the `NOVA_HOME` environment variable when set and not
//! empty; else `/var/lib/nova` for root; else `$XDG_DATA_HOME/nova`, else
//! `~/.local/share/nova`.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::id::SandboxId;

/// No data directory could be chosen.
#[derive(Debug, thiserror::Error)]
pub enum HomeError {
    /// Neither `NOVA_HOME` nor `HOME` is set for a non-root user.
    #[error("cannot choose a data directory: set NOVA_HOME (or HOME)")]
    NoHome,
    /// A relative `NOVA_HOME` could not be made absolute.
    #[error("cannot resolve the relative NOVA_HOME {0:?}")]
    Relative(PathBuf, #[source] std::io::Error),
}

/// The root of NovaSandbox's files on this host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NovaHome {
    root: PathBuf,
}

impl NovaHome {
    /// Uses `root` as `$NOVA_HOME`.
    pub fn at(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// Resolves `$NOVA_HOME` from this process's environment and user.
    pub fn resolve() -> Result<Self, HomeError> {
        Self::resolve_from(
            std::env::var_os("NOVA_HOME"),
            rustix::process::geteuid().is_root(),
            std::env::var_os("XDG_DATA_HOME"),
            std::env::var_os("HOME"),
        )
    }

    /// Resolves `$NOVA_HOME` from the given environment values (testable
    /// form of [`resolve`](Self::resolve)).
    pub fn resolve_from(
        nova_home: Option<OsString>,
        is_root: bool,
        xdg_data_home: Option<OsString>,
        home: Option<OsString>,
    ) -> Result<Self, HomeError> {
        let non_empty = |v: Option<OsString>| v.filter(|v| !v.is_empty()).map(PathBuf::from);
        if let Some(path) = non_empty(nova_home) {
            if path.is_relative() {
                let cwd =
                    std::env::current_dir().map_err(|e| HomeError::Relative(path.clone(), e))?;
                return Ok(Self::at(cwd.join(path)));
            }
            return Ok(Self::at(path));
        }
        if is_root {
            return Ok(Self::at("/var/lib/nova"));
        }
        if let Some(xdg) = non_empty(xdg_data_home).filter(|p| p.is_absolute()) {
            return Ok(Self::at(xdg.join("nova")));
        }
        match non_empty(home) {
            Some(home) => Ok(Self::at(home.join(".local/share/nova"))),
            None => Err(HomeError::NoHome),
        }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where templates are installed.
    pub fn templates_dir(&self) -> PathBuf {
        self.root.join("templates")
    }

    /// Where the directory of each live sandbox is.
    pub fn sandboxes_dir(&self) -> PathBuf {
        self.root.join("sandboxes")
    }

    /// Where build artifacts and downloads are cached.
    pub fn cache_dir(&self) -> PathBuf {
        self.root.join("cache")
    }

    /// The directory of template `id`.
    pub fn template_dir(&self, id: &str) -> PathBuf {
        self.templates_dir().join(id)
    }

    /// The files of sandbox `id`.
    pub fn sandbox(&self, id: &SandboxId) -> SandboxPaths {
        SandboxPaths {
            dir: self.sandboxes_dir().join(id.as_str()),
        }
    }
}

/// The files of one sandbox, all inside its directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SandboxPaths {
    dir: PathBuf,
}

impl SandboxPaths {
    /// The sandbox directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The VMM's control socket (Firecracker API or QMP).
    pub fn api_socket(&self) -> PathBuf {
        self.dir.join("api.sock")
    }

    /// The host end of the agent channel (hybrid vsock or virtio-serial).
    pub fn vsock_socket(&self) -> PathBuf {
        self.dir.join("vsock.sock")
    }

    /// The sandbox's private writable disk.
    pub fn scratch_disk(&self) -> PathBuf {
        self.dir.join("scratch.ext4")
    }

    /// The VMM's log and the guest console.
    pub fn vmm_log(&self) -> PathBuf {
        self.dir.join("vmm.log")
    }

    /// The guest's serial console output.
    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }

    /// The VMM's metrics output.
    pub fn metrics(&self) -> PathBuf {
        self.dir.join("metrics.json")
    }

    /// The persisted [`SandboxInfo`](crate::metadata::SandboxInfo).
    pub fn state_json(&self) -> PathBuf {
        self.dir.join("state.json")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(s: &str) -> Option<OsString> {
        Some(s.into())
    }

    #[test]
    fn nova_home_env_wins() {
        let h = NovaHome::resolve_from(os("/srv/nova"), true, os("/x"), os("/home/u")).unwrap();
        assert_eq!(h.root(), Path::new("/srv/nova"));
    }

    #[test]
    fn empty_nova_home_is_ignored() {
        let h = NovaHome::resolve_from(os(""), true, None, None).unwrap();
        assert_eq!(h.root(), Path::new("/var/lib/nova"));
    }

    #[test]
    fn relative_nova_home_is_made_absolute() {
        let h = NovaHome::resolve_from(os("rel/dir"), false, None, None).unwrap();
        assert!(h.root().is_absolute());
        assert!(h.root().ends_with("rel/dir"));
    }

    #[test]
    fn root_uses_var_lib() {
        let h = NovaHome::resolve_from(None, true, os("/x"), os("/root")).unwrap();
        assert_eq!(h.root(), Path::new("/var/lib/nova"));
    }

    #[test]
    fn user_uses_xdg_then_home() {
        let h = NovaHome::resolve_from(None, false, os("/xdg"), os("/home/u")).unwrap();
        assert_eq!(h.root(), Path::new("/xdg/nova"));
        let h = NovaHome::resolve_from(None, false, os("relative"), os("/home/u")).unwrap();
        assert_eq!(h.root(), Path::new("/home/u/.local/share/nova"));
        let h = NovaHome::resolve_from(None, false, None, os("/home/u")).unwrap();
        assert_eq!(h.root(), Path::new("/home/u/.local/share/nova"));
        assert!(matches!(
            NovaHome::resolve_from(None, false, None, None),
            Err(HomeError::NoHome)
        ));
    }

    #[test]
    fn layout() {
        let h = NovaHome::at("/n");
        assert_eq!(h.templates_dir(), Path::new("/n/templates"));
        assert_eq!(h.template_dir("python"), Path::new("/n/templates/python"));
        assert_eq!(h.cache_dir(), Path::new("/n/cache"));
        let id: SandboxId = "sb-1".parse().unwrap();
        let s = h.sandbox(&id);
        assert_eq!(s.dir(), Path::new("/n/sandboxes/sb-1"));
        assert_eq!(s.api_socket(), Path::new("/n/sandboxes/sb-1/api.sock"));
        assert_eq!(s.vsock_socket(), Path::new("/n/sandboxes/sb-1/vsock.sock"));
        assert_eq!(
            s.scratch_disk(),
            Path::new("/n/sandboxes/sb-1/scratch.ext4")
        );
        assert_eq!(s.vmm_log(), Path::new("/n/sandboxes/sb-1/vmm.log"));
        assert_eq!(s.metrics(), Path::new("/n/sandboxes/sb-1/metrics.json"));
        assert_eq!(s.state_json(), Path::new("/n/sandboxes/sb-1/state.json"));
    }
}
