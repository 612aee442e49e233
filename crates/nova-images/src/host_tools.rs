//! The host programs and files an image build needs, and installing them.
//!
//! Each build step names what it needs as [`HostTool`]s: a program looked up on
//! `PATH` (plus the `sbin` directories, which an unprivileged `PATH` often
//! lacks) or a file at a fixed path, each with the Debian package providing it.
//! [`ensure`] checks them all at once; when some are missing and we run as
//! root on Debian it installs their packages with `apt-get` (non-interactive),
//! otherwise it fails naming every package to install, so a user fixes the
//! host in one go instead of one tool per attempt.

use std::collections::BTreeSet;
use std::env;
use std::path::{Path, PathBuf};

use tokio::process::Command;

use crate::command::{self, RunCommandError};

/// Directories searched after `PATH`: `mkfs.ext4`, `debugfs` and `debootstrap`
/// live in `sbin`, which is not on an ordinary user's `PATH`.
const EXTRA_DIRS: &[&str] = &["/usr/local/sbin", "/usr/sbin", "/sbin"];

/// Something on the host that a build step uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostTool {
    /// What to look for.
    pub need: Need,
    /// The Debian package that provides it.
    pub package: &'static str,
}

/// How a [`HostTool`] is found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// A program name, looked up on `PATH` and the `sbin` directories.
    Program(&'static str),
    /// A file at an absolute path (a source tarball, a header).
    File(&'static str),
}

impl HostTool {
    /// A program provided by `package`.
    pub const fn program(name: &'static str, package: &'static str) -> Self {
        Self {
            need: Need::Program(name),
            package,
        }
    }

    /// A file provided by `package`.
    pub const fn file(path: &'static str, package: &'static str) -> Self {
        Self {
            need: Need::File(path),
            package,
        }
    }

    /// Whether it is present on this host.
    pub fn is_present(&self) -> bool {
        match self.need {
            Need::Program(name) => find_program(name).is_some(),
            Need::File(path) => Path::new(path).exists(),
        }
    }
}

/// Host tools are missing and could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum EnsureToolsError {
    /// Missing, and this host cannot install them by itself.
    #[error(
        "missing host tools: {missing}; install them with: apt-get install {packages}{hint}",
        missing = .missing.join(", "),
        packages = .packages.join(" ")
    )]
    Missing {
        /// What was looked for and not found.
        missing: Vec<String>,
        /// The Debian packages that provide them.
        packages: Vec<String>,
        /// Why they were not installed automatically.
        hint: String,
    },
    /// `apt-get install` failed.
    #[error("installing host packages {packages} with apt-get failed", packages = .packages.join(" "))]
    Install {
        /// The packages.
        packages: Vec<String>,
        /// The cause.
        #[source]
        source: RunCommandError,
    },
    /// apt-get reported success but some tools are still missing.
    #[error("still missing after apt-get install: {}", .0.join(", "))]
    StillMissing(Vec<String>),
}

/// Finds `name` on `PATH`, then in the `sbin` directories.
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH").unwrap_or_default();
    env::split_paths(&path)
        .chain(EXTRA_DIRS.iter().map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    rustix::fs::access(path, rustix::fs::Access::EXEC_OK).is_ok() && path.is_file()
}

/// Makes sure every tool in `tools` is present, installing the missing ones'
/// packages when running as root on Debian. `log` receives apt-get's output.
pub async fn ensure(tools: &[HostTool], log: &Path) -> Result<(), EnsureToolsError> {
    let missing: Vec<&HostTool> = tools.iter().filter(|t| !t.is_present()).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let names: Vec<String> = missing.iter().map(|t| describe(t)).collect();
    let packages: Vec<String> = missing
        .iter()
        .map(|t| t.package.to_owned())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    install_packages(names, packages, log).await?;
    let still: Vec<String> = missing
        .iter()
        .filter(|t| !t.is_present())
        .map(|t| describe(t))
        .collect();
    if still.is_empty() {
        Ok(())
    } else {
        Err(EnsureToolsError::StillMissing(still))
    }
}

/// Installs `packages` with apt-get when running as root on Debian; else
/// fails naming `missing` (what was looked for) and the packages to install.
pub async fn install_packages(
    missing: Vec<String>,
    packages: Vec<String>,
    log: &Path,
) -> Result<(), EnsureToolsError> {
    let is_root = rustix::process::geteuid().is_root();
    let is_debian = Path::new("/etc/debian_version").exists();
    let apt = find_program("apt-get");
    let Some(apt) = apt.filter(|_| is_root && is_debian) else {
        let hint = if !is_debian {
            " (not a Debian host: install the equivalents)".to_owned()
        } else {
            " (run as root to have them installed automatically)".to_owned()
        };
        return Err(EnsureToolsError::Missing {
            missing,
            packages,
            hint,
        });
    };
    tracing::info!(packages = %packages.join(" "), "installing missing host packages with apt-get");
    let install = |update: bool| {
        let mut cmd = Command::new(&apt);
        cmd.env("DEBIAN_FRONTEND", "noninteractive");
        if update {
            cmd.arg("update");
        } else {
            cmd.args(["install", "-y", "--no-install-recommends"])
                .args(&packages);
        }
        cmd
    };
    if command::run_logged(&mut install(false), log).await.is_err() {
        // A stale package index is the usual cause; refresh it and retry once.
        command::run_logged(&mut install(true), log)
            .await
            .map_err(|source| EnsureToolsError::Install {
                packages: packages.clone(),
                source,
            })?;
        command::run_logged(&mut install(false), log)
            .await
            .map_err(|source| EnsureToolsError::Install {
                packages: packages.clone(),
                source,
            })?;
    }
    Ok(())
}

fn describe(tool: &HostTool) -> String {
    match tool.need {
        Need::Program(name) => format!("{name} (package {})", tool.package),
        Need::File(path) => format!("{path} (package {})", tool.package),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_programs_in_sbin_even_off_path() {
        // `sh` is on every PATH; a name that exists nowhere is not found.
        assert!(find_program("sh").is_some());
        assert!(find_program("nova-no-such-tool-xyz").is_none());
    }

    #[test]
    fn presence_of_files_and_programs() {
        assert!(HostTool::file("/", "base-files").is_present());
        assert!(!HostTool::file("/nonexistent/nova", "nope").is_present());
        assert!(HostTool::program("sh", "dash").is_present());
    }

    #[tokio::test]
    async fn all_present_is_ok_without_touching_apt() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("apt.log");
        ensure(&[HostTool::program("sh", "dash")], &log)
            .await
            .unwrap();
        assert!(
            !log.exists(),
            "apt-get must not run when nothing is missing"
        );
    }

    #[test]
    fn missing_error_names_every_package_once() {
        let err = EnsureToolsError::Missing {
            missing: vec!["a (package p)".into(), "b (package p)".into()],
            packages: vec!["p".into()],
            hint: String::new(),
        };
        let text = err.to_string();
        assert!(text.contains("apt-get install p"), "{text}");
        assert!(text.contains("a (package p), b (package p)"), "{text}");
    }
}
