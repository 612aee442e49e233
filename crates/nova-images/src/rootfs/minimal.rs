//! The `minimal` rootfs: busybox-static, its applet links, and the agent.
//!
//! Debian's `busybox-static` is one static binary; `busybox --list-full`
//! names every applet with its install path (`bin/ls`, `usr/bin/awk`,
//! `sbin/ifconfig`), and each becomes a symlink to `/bin/busybox`. `init` and
//! `linuxrc` are skipped: `/sbin/init` is the agent.
//!
//! The arm64 image ([`stage_arm64`]) takes the same package for arm64:
//! [`arm64_busybox`] downloads `busybox-static:arm64` with `apt-get download`
//! (adding arm64 to dpkg's foreign architectures first, which is what lets
//! apt see it; nothing is installed), unpacks the binary with `dpkg-deb -x`
//! and caches it under `cache/busybox-arm64/`. The arm64 binary cannot run
//! here, so the applet list comes from the host's busybox-static: the same
//! Debian version is built with the same configuration on every
//! architecture, which [`stage_arm64`] checks by comparing package versions.

use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use tokio::process::Command;

use nova_core::template::GuestArch;

use super::{
    BuildRootfsError, EtcPolicy, ensure_static, ensure_static_for, finish_staging, io_err,
};
use crate::cache::{self, CacheDir};
use crate::command;
use crate::host_tools::{self, HostTool};

/// Where Debian's `busybox-static` installs the binary.
pub const BUSYBOX_PATH: &str = "/bin/busybox";

/// Host tools the minimal rootfs needs (besides the ext4 ones).
pub const MINIMAL_TOOLS: &[HostTool] = &[HostTool::file(BUSYBOX_PATH, "busybox-static")];

/// Applets not linked: the agent is init.
const SKIPPED_APPLETS: &[&str] = &["sbin/init", "linuxrc", "init"];

/// The Debian package of the static busybox.
pub const BUSYBOX_PACKAGE: &str = "busybox-static";

/// Host tools fetching the arm64 busybox needs.
pub const ARM64_TOOLS: &[HostTool] = &[
    HostTool::program("apt-get", "apt"),
    HostTool::program("dpkg-deb", "dpkg"),
];

/// Stages the minimal tree at `root` from the static busybox at `busybox`
/// and the agent at `agent`.
pub async fn stage(
    root: &Path,
    busybox: &Path,
    agent: &Path,
    log: &Path,
) -> Result<(), BuildRootfsError> {
    host_busybox(busybox, log).await?;
    stage_with_applets(root, busybox, busybox, agent).await
}

/// Stages the arm64 minimal tree at `root` from the arm64 busybox at
/// `busybox` (see [`arm64_busybox`]), with the applet list of the host's
/// busybox-static at `host_busybox` (the same Debian version), and the
/// arm64 agent at `agent`.
pub async fn stage_arm64(
    root: &Path,
    busybox: &Arm64Busybox,
    host_busybox_path: &Path,
    agent: &Path,
    log: &Path,
) -> Result<(), BuildRootfsError> {
    host_busybox(host_busybox_path, log).await?;
    let host_version = package_version(BUSYBOX_PACKAGE).await?;
    if host_version != busybox.version {
        return Err(BuildRootfsError::BusyboxVersion {
            host: host_version,
            arm64: busybox.version.clone(),
        });
    }
    ensure_static_for(&busybox.path, GuestArch::Arm64)?;
    ensure_static_for(agent, GuestArch::Arm64)?;
    stage_with_applets(root, &busybox.path, host_busybox_path, agent).await
}

/// Makes sure `busybox` is the host's static busybox.
async fn host_busybox(busybox: &Path, log: &Path) -> Result<(), BuildRootfsError> {
    host_tools::ensure(MINIMAL_TOOLS, log).await?;
    if ensure_static(busybox).is_err() {
        // Debian's dynamic `busybox` package also installs /bin/busybox;
        // busybox-static replaces it.
        host_tools::install_packages(
            vec![format!("a static busybox at {}", busybox.display())],
            vec!["busybox-static".to_owned()],
            log,
        )
        .await?;
        ensure_static(busybox)?;
    }
    Ok(())
}

/// Stages `busybox` with the applets `lister` (a busybox that runs here)
/// lists, and the agent.
async fn stage_with_applets(
    root: &Path,
    busybox: &Path,
    lister: &Path,
    agent: &Path,
) -> Result<(), BuildRootfsError> {
    let applets = command::capture(Command::new(lister).arg("--list-full"))
        .await
        .map_err(|source| BuildRootfsError::Step {
            step: "busybox --list-full",
            source,
        })?;
    let dest = root.join("bin/busybox");
    fs::create_dir_all(root.join("bin")).map_err(io_err(root))?;
    fs::copy(busybox, &dest).map_err(io_err(&dest))?;
    fs::set_permissions(&dest, fs::Permissions::from_mode(0o755)).map_err(io_err(&dest))?;
    for applet in applets.lines().map(str::trim).filter(|a| !a.is_empty()) {
        if SKIPPED_APPLETS.contains(&applet) || applet == "bin/busybox" || applet.contains("..") {
            continue;
        }
        let link = root.join(applet);
        if let Some(parent) = link.parent() {
            fs::create_dir_all(parent).map_err(io_err(parent))?;
        }
        if fs::symlink_metadata(&link).is_err() {
            symlink("/bin/busybox", &link).map_err(io_err(&link))?;
        }
    }
    finish_staging(root, agent, EtcPolicy::Bare)
}

/// The installed (or, for `pkg:arch`, candidate) Debian version of `package`.
async fn package_version(package: &str) -> Result<String, BuildRootfsError> {
    let out = command::capture(Command::new("dpkg-query").args(["-W", "-f=${Version}", package]))
        .await
        .map_err(|source| BuildRootfsError::Step {
            step: "dpkg-query busybox-static",
            source,
        })?;
    Ok(out.trim().to_owned())
}

/// The arm64 static busybox, unpacked from Debian's package.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arm64Busybox {
    /// The binary.
    pub path: PathBuf,
    /// The package version it came from.
    pub version: String,
}

/// The arm64 `busybox-static` binary, from `cache/busybox-arm64/` or
/// downloaded there (`apt-get download busybox-static:arm64`, then
/// `dpkg-deb -x`). The host's own version is the one downloaded, so the
/// applet lists agree. With `refresh`, the cached copy is replaced.
pub async fn arm64_busybox(
    cache: &CacheDir,
    refresh: bool,
    log: &Path,
) -> Result<Arm64Busybox, BuildRootfsError> {
    let dir = cache
        .subdir("busybox-arm64")
        .map_err(io_err(cache.root()))?;
    let _lock = cache.lock("busybox-arm64").map_err(io_err(cache.root()))?;
    host_tools::ensure(MINIMAL_TOOLS, log).await?;
    let version = package_version(BUSYBOX_PACKAGE).await?;
    // One directory per version: a host upgrade fetches the matching one.
    let dest = dir.join(version.replace(':', "_"));
    let binary = dest.join("busybox");
    if !refresh && binary.is_file() {
        return Ok(Arm64Busybox {
            path: binary,
            version,
        });
    }
    host_tools::ensure(ARM64_TOOLS, log).await?;
    ensure_arm64_foreign_arch(log).await?;
    cache::sweep_leftovers(&dest).map_err(io_err(&dir))?;
    let staging = cache::staging_dir_for(&dest).map_err(io_err(&dir))?;
    let wanted = format!("{BUSYBOX_PACKAGE}:arm64={version}");
    let download = |log| {
        let mut cmd = Command::new("apt-get");
        cmd.current_dir(staging.path()).args([
            "download",
            "-o",
            "APT::Sandbox::User=root",
            &wanted,
        ]);
        async move { command::run_logged(&mut cmd, log).await }
    };
    if download(log).await.is_err() {
        // The package lists may predate arm64: refresh them once.
        command::run_logged(Command::new("apt-get").arg("update"), log)
            .await
            .map_err(|source| BuildRootfsError::Step {
                step: "apt-get update (for arm64 package lists)",
                source,
            })?;
        download(log)
            .await
            .map_err(|source| BuildRootfsError::Step {
                step: "apt-get download busybox-static:arm64",
                source,
            })?;
    }
    let deb = fs::read_dir(staging.path())
        .map_err(io_err(staging.path()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .ok_or_else(|| BuildRootfsError::Io {
            path: staging.path().to_owned(),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "apt-get download left no .deb",
            ),
        })?;
    let unpacked = staging.path().join("unpacked");
    command::run_logged(
        Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked),
        log,
    )
    .await
    .map_err(|source| BuildRootfsError::Step {
        step: "dpkg-deb -x busybox-static:arm64",
        source,
    })?;
    let staged = staging.path().join("busybox");
    let inside = unpacked.join("bin/busybox");
    fs::rename(&inside, &staged).map_err(io_err(&inside))?;
    ensure_static_for(&staged, GuestArch::Arm64)?;
    fs::remove_dir_all(&unpacked).map_err(io_err(&unpacked))?;
    fs::remove_file(&deb).map_err(io_err(&deb))?;
    cache::publish_dir(staging, &dest).map_err(io_err(&dest))?;
    Ok(Arm64Busybox {
        path: binary,
        version,
    })
}

/// Adds arm64 to dpkg's foreign architectures (so apt lists its packages)
/// and refreshes the package lists, unless it is there already.
async fn ensure_arm64_foreign_arch(log: &Path) -> Result<(), BuildRootfsError> {
    let step = |step| move |source| BuildRootfsError::Step { step, source };
    let foreign = command::capture(Command::new("dpkg").arg("--print-foreign-architectures"))
        .await
        .map_err(step("dpkg --print-foreign-architectures"))?;
    if foreign.lines().any(|a| a.trim() == "arm64") {
        return Ok(());
    }
    if !rustix::process::geteuid().is_root() {
        return Err(BuildRootfsError::Arm64Packages);
    }
    tracing::info!("adding arm64 to dpkg's architectures to download busybox-static:arm64");
    command::run_logged(
        Command::new("dpkg").args(["--add-architecture", "arm64"]),
        log,
    )
    .await
    .map_err(step("dpkg --add-architecture arm64"))?;
    command::run_logged(Command::new("apt-get").arg("update"), log)
        .await
        .map_err(step("apt-get update"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rootfs::tests::stand_in_agent;

    #[tokio::test]
    async fn stages_busybox_with_applets_and_the_agent_as_init() {
        let Some(agent) = stand_in_agent() else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let log = dir.path().join("log");
        stage(&root, Path::new(BUSYBOX_PATH), &agent, &log)
            .await
            .unwrap();
        assert!(root.join("bin/busybox").is_file());
        assert_eq!(
            fs::read_link(root.join("bin/sh")).unwrap(),
            Path::new("/bin/busybox")
        );
        assert!(
            fs::symlink_metadata(root.join("bin/ls"))
                .unwrap()
                .is_symlink()
        );
        assert_eq!(
            fs::read_link(root.join("sbin/init")).unwrap(),
            Path::new("nova-agent")
        );
        assert!(root.join("sbin/nova-agent").is_file());
        assert!(!root.join("linuxrc").exists());
        // The staged shell works: run it through the staged busybox.
        let out = std::process::Command::new(root.join("bin/busybox"))
            .args(["sh", "-c", "echo ok"])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "ok\n");
    }
}
