//! The `minimal` rootfs: busybox-static, its applet links, and the agent.
//!
//! Debian's `busybox-static` is one static binary; `busybox --list-full`
//! names every applet with its install path (`bin/ls`, `usr/bin/awk`,
//! `sbin/ifconfig`), and each becomes a symlink to `/bin/busybox`. `init` and
//! `linuxrc` are skipped: `/sbin/init` is the agent.

use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;

use tokio::process::Command;

use super::{BuildRootfsError, EtcPolicy, ensure_static, finish_staging, io_err};
use crate::command;
use crate::host_tools::{self, HostTool};

/// Where Debian's `busybox-static` installs the binary.
pub const BUSYBOX_PATH: &str = "/bin/busybox";

/// Host tools the minimal rootfs needs (besides the ext4 ones).
pub const MINIMAL_TOOLS: &[HostTool] = &[HostTool::file(BUSYBOX_PATH, "busybox-static")];

/// Applets not linked: the agent is init.
const SKIPPED_APPLETS: &[&str] = &["sbin/init", "linuxrc", "init"];

/// Stages the minimal tree at `root` from the static busybox at `busybox`
/// and the agent at `agent`.
pub async fn stage(
    root: &Path,
    busybox: &Path,
    agent: &Path,
    log: &Path,
) -> Result<(), BuildRootfsError> {
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
    let applets = command::capture(Command::new(busybox).arg("--list-full"))
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
