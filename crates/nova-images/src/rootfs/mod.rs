//! Root filesystem images: staging a directory tree and packing it as ext4.
//!
//! Every rootfs is built the same way whatever its content: a staging
//! directory is filled (busybox for [`minimal`], a debootstrap tree for
//! [`debian`]), then [`finish_staging`] adds what every NovaSandbox guest
//! needs — the mountpoints nova-agent mounts on, the few `/etc` files a shell
//! expects (from `images/rootfs/etc/`), and the agent itself as
//! `/sbin/nova-agent` with `/sbin/init` pointing at it — and [`make_ext4`]
//! packs the tree with `mkfs.ext4 -d`: no mount, no loop device, no root
//! needed for the minimal image. The image is then shrunk to its minimum
//! (`resize2fs -M`): templates are shared read-only, each sandbox writes to
//! its own overlay, so free space in the image would be dead weight.

pub mod debian;
pub mod minimal;

use std::fs;
use std::io;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use tokio::process::Command;

use nova_core::template::GuestArch;

use crate::command::{self, RunCommandError};
use crate::elf::{self, ReadElfError};
use crate::host_tools::{self, EnsureToolsError, HostTool};

/// Bump when staging or packing changes what an image contains; part of the
/// template cache key.
pub const RECIPE_VERSION: &str = "1";

/// Where the agent is installed in every rootfs.
pub const AGENT_PATH: &str = "sbin/nova-agent";

/// Host tools every rootfs build needs.
pub const EXT4_TOOLS: &[HostTool] = &[
    HostTool::program("mkfs.ext4", "e2fsprogs"),
    HostTool::program("e2fsck", "e2fsprogs"),
    HostTool::program("resize2fs", "e2fsprogs"),
];

/// Directories every guest has: the agent mounts proc, sysfs, devtmpfs,
/// tmpfs and the overlay on these, so they must exist on a read-only root.
const MOUNTPOINTS: &[(&str, u32)] = &[
    ("proc", 0o555),
    ("sys", 0o555),
    ("dev", 0o755),
    ("run", 0o755),
    ("tmp", 0o1777),
    ("root", 0o700),
    ("etc", 0o755),
    ("mnt", 0o755),
    ("home", 0o755),
    ("var", 0o755),
    ("var/tmp", 0o1777),
    ("usr/local/bin", 0o755),
];

/// Files from `images/rootfs/etc/`, embedded; written by [`finish_staging`].
pub mod etc_files {
    /// `/etc/hostname`.
    pub const HOSTNAME: &str = include_str!("../../../../images/rootfs/etc/hostname");
    /// `/etc/hosts`.
    pub const HOSTS: &str = include_str!("../../../../images/rootfs/etc/hosts");
    /// `/etc/resolv.conf` (placeholder; the agent writes the real one).
    pub const RESOLV_CONF: &str = include_str!("../../../../images/rootfs/etc/resolv.conf");
    /// `/etc/passwd` for images without their own.
    pub const PASSWD: &str = include_str!("../../../../images/rootfs/etc/passwd");
    /// `/etc/group` for images without their own.
    pub const GROUP: &str = include_str!("../../../../images/rootfs/etc/group");
    /// `/etc/os-release` of the minimal image.
    pub const OS_RELEASE: &str = include_str!("../../../../images/rootfs/etc/os-release");
    /// `/etc/profile` for images without their own.
    pub const PROFILE: &str = include_str!("../../../../images/rootfs/etc/profile");
    /// `/etc/nsswitch.conf` for images without their own.
    pub const NSSWITCH: &str = include_str!("../../../../images/rootfs/etc/nsswitch.conf");
    /// `/etc/dpkg/dpkg.cfg.d/01-nova-nodoc` for Debian images.
    pub const DPKG_NODOC: &str = include_str!("../../../../images/rootfs/etc/dpkg-nodoc.cfg");
}

/// Building a root filesystem image failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildRootfsError {
    /// Host tools are missing.
    #[error("the rootfs build needs host tools")]
    Tools(#[from] EnsureToolsError),
    /// The agent binary is missing.
    #[error(
        "guest agent not found at {0}; build it with `make agent` (static: \
         RUSTFLAGS='-C target-feature=+crt-static' cargo build -p nova-agent --profile agent \
         --target x86_64-unknown-linux-gnu), or `make agent-arm64` for an arm64 template, \
         and name it with --agent or NOVA_AGENT_BIN when running nova outside the repository"
    )]
    AgentMissing(PathBuf),
    /// A binary that must run without a dynamic loader is dynamic.
    #[error(
        "{path} must be a static x86-64 or arm64 binary (it runs in a rootfs without a dynamic \
         loader)"
    )]
    NotStatic {
        /// The binary.
        path: PathBuf,
    },
    /// A binary is for another architecture than the template's.
    #[error(
        "{path} is a {found} binary, but the template is {expected}; build the agent for \
         {expected} (`make agent-arm64` for arm64, `make agent` for x86_64) and pass it with --agent"
    )]
    WrongArch {
        /// The binary.
        path: PathBuf,
        /// The template's architecture.
        expected: GuestArch,
        /// The binary's (`e_machine`, when not a guest architecture).
        found: String,
    },
    /// A binary could not be inspected.
    #[error("cannot inspect a binary for the rootfs")]
    Elf(#[from] ReadElfError),
    /// The image needs root (debootstrap creates device nodes and chowns).
    #[error(
        "building the {template} rootfs needs root (debootstrap); run `sudo nova template build {template}`"
    )]
    NeedsRoot {
        /// The template id.
        template: String,
    },
    /// The Debian mirror could not be found.
    #[error(
        "cannot find a Debian mirror for {suite} in /etc/apt/sources.list(.d); set NOVA_DEBIAN_MIRROR"
    )]
    NoMirror {
        /// The suite looked for.
        suite: String,
    },
    /// The host's busybox-static (whose applet list the arm64 image uses)
    /// and the arm64 one differ in version.
    #[error(
        "the host's busybox-static is {host} but the arm64 one is {arm64}; rebuild with \
         --rebuild-all to fetch the matching arm64 package"
    )]
    BusyboxVersion {
        /// The host's version.
        host: String,
        /// The arm64 binary's.
        arm64: String,
    },
    /// arm64 packages cannot be listed and this is not root.
    #[error(
        "the arm64 busybox needs arm64 in dpkg's architectures; run as root, or `dpkg \
         --add-architecture arm64 && apt-get update` once"
    )]
    Arm64Packages,
    /// A build command failed.
    #[error("rootfs build step `{step}` failed")]
    Step {
        /// The step.
        step: &'static str,
        /// The cause, with the log's last lines.
        #[source]
        source: RunCommandError,
    },
    /// Filesystem work in the staging tree or cache failed.
    #[error("rootfs I/O failed at {path}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(io::Error) -> BuildRootfsError + '_ {
    move |source| BuildRootfsError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Checks that `path` is a static binary of a guest architecture (x86-64 or
/// AArch64; [`ensure_static_for`] names which).
pub fn ensure_static(path: &Path) -> Result<(), BuildRootfsError> {
    let info = elf::read_elf(path)?;
    if info.has_interpreter || info.guest_arch().is_none() {
        return Err(BuildRootfsError::NotStatic {
            path: path.to_owned(),
        });
    }
    Ok(())
}

/// Checks that `path` is a static binary for `arch`.
pub fn ensure_static_for(path: &Path, arch: GuestArch) -> Result<(), BuildRootfsError> {
    ensure_static(path)?;
    let info = elf::read_elf(path)?;
    match info.guest_arch() {
        Some(found) if found == arch => Ok(()),
        found => Err(BuildRootfsError::WrongArch {
            path: path.to_owned(),
            expected: arch,
            found: found.map_or_else(|| format!("e_machine {}", info.machine), |a| a.to_string()),
        }),
    }
}

/// How [`finish_staging`] treats `/etc` files the base tree already has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EtcPolicy {
    /// A bare tree (busybox): write every file, including passwd, group, os-release.
    Bare,
    /// A distribution tree: keep its passwd, group, os-release, profile and
    /// nsswitch.conf; write only the sandbox-specific files.
    Distribution,
    /// An OCI image's tree: keep everything it has; write only the
    /// sandbox-specific files.
    Image,
}

/// Adds what every guest needs to the staged tree at `root`: mountpoints,
/// `/etc` files, and the agent as `/sbin/nova-agent` with `/sbin/init` -> it.
pub fn finish_staging(
    root: &Path,
    agent: &Path,
    policy: EtcPolicy,
) -> Result<(), BuildRootfsError> {
    if !agent.is_file() {
        return Err(BuildRootfsError::AgentMissing(agent.to_owned()));
    }
    ensure_static(agent)?;
    for (dir, mode) in MOUNTPOINTS {
        let path = root.join(dir);
        // Debian trees may have these as symlinks (e.g. /var/run); leave those.
        if fs::symlink_metadata(&path).is_err() {
            fs::create_dir_all(&path).map_err(io_err(&path))?;
            fs::set_permissions(&path, fs::Permissions::from_mode(*mode)).map_err(io_err(&path))?;
        }
    }
    let sbin = root.join("sbin");
    if fs::symlink_metadata(&sbin).is_err() {
        fs::create_dir_all(&sbin).map_err(io_err(&sbin))?;
    }

    let mut files: Vec<(&str, &str, u32)> = vec![
        ("etc/hostname", etc_files::HOSTNAME, 0o644),
        ("etc/hosts", etc_files::HOSTS, 0o644),
        ("etc/resolv.conf", etc_files::RESOLV_CONF, 0o644),
    ];
    match policy {
        EtcPolicy::Bare => files.extend([
            ("etc/passwd", etc_files::PASSWD, 0o644),
            ("etc/group", etc_files::GROUP, 0o644),
            ("etc/os-release", etc_files::OS_RELEASE, 0o644),
            ("etc/profile", etc_files::PROFILE, 0o644),
            ("etc/nsswitch.conf", etc_files::NSSWITCH, 0o644),
        ]),
        EtcPolicy::Distribution => {
            files.push((
                "etc/dpkg/dpkg.cfg.d/01-nova-nodoc",
                etc_files::DPKG_NODOC,
                0o644,
            ));
        }
        EtcPolicy::Image => {}
    }
    for (rel, content, mode) in files {
        write_file(&root.join(rel), content.as_bytes(), mode)?;
    }

    // The agent is PID 1: `/sbin/nova-agent`, and `/sbin/init` for VMMs and
    // kernels that ignore `init=`. In merged-/usr trees `sbin` is a relative
    // symlink to `usr/sbin`, which keeps these writes inside `root`.
    let agent_dest = root.join(AGENT_PATH);
    replace_path(&agent_dest)?;
    fs::copy(agent, &agent_dest).map_err(io_err(&agent_dest))?;
    fs::set_permissions(&agent_dest, fs::Permissions::from_mode(0o755))
        .map_err(io_err(&agent_dest))?;
    let init = root.join("sbin/init");
    replace_path(&init)?;
    symlink("nova-agent", &init).map_err(io_err(&init))?;
    Ok(())
}

/// Writes `content` to `path` (replacing a file or symlink there) with `mode`.
pub(crate) fn write_file(path: &Path, content: &[u8], mode: u32) -> Result<(), BuildRootfsError> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(io_err(parent))?;
    }
    replace_path(path)?;
    fs::write(path, content).map_err(io_err(path))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(io_err(path))
}

/// Removes a file or symlink at `path` so it can be written afresh (a
/// symlink, e.g. Debian's `/etc/resolv.conf`, must not be written through).
fn replace_path(path: &Path) -> Result<(), BuildRootfsError> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path).map_err(io_err(path)),
        Ok(_) => fs::remove_file(path).map_err(io_err(path)),
        Err(_) => Ok(()),
    }
}

/// What is in a staged tree, for sizing its image.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TreeUsage {
    /// Bytes in 4 KiB blocks (files rounded up, one block per directory).
    pub block_bytes: u64,
    /// Number of inodes (files, directories, links, devices).
    pub inodes: u64,
}

/// Walks `root` (not following symlinks) and sums what ext4 will need.
pub fn tree_usage(root: &Path) -> io::Result<TreeUsage> {
    let mut usage = TreeUsage::default();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        usage.inodes += 1;
        usage.block_bytes += 4096;
        for entry in fs::read_dir(&dir)? {
            let entry = entry?;
            let meta = entry.metadata()?;
            if meta.is_dir() {
                stack.push(entry.path());
            } else {
                usage.inodes += 1;
                usage.block_bytes += meta.len().div_ceil(4096) * 4096;
            }
        }
    }
    Ok(usage)
}

/// Packs the tree at `root` into an ext4 image at `image`, shrunk to its
/// minimum. Returns the image size in bytes.
///
/// Run as root, the tree's owners are kept (root-owned Debian files stay so).
/// Run as a user, `mkfs.ext4` runs under `fakeroot` after a `chown -R 0:0`,
/// so the image is root-owned either way.
pub async fn make_ext4(
    root: &Path,
    image: &Path,
    label: &str,
    log: &Path,
) -> Result<u64, BuildRootfsError> {
    let is_root = rustix::process::geteuid().is_root();
    let mut tools = EXT4_TOOLS.to_vec();
    if !is_root {
        tools.push(HostTool::program("fakeroot", "fakeroot"));
    }
    host_tools::ensure(&tools, log).await?;
    let usage = tree_usage(root).map_err(io_err(root))?;
    // ext4 fixes inodes per block group at mkfs time, and resize2fs -M can
    // only drop groups whose inodes are free: an image made much bigger than
    // its content keeps its extra groups. So start tight (10% slack for
    // directories, extent blocks and bitmaps) and only grow when mkfs runs
    // out of room.
    let inodes = usage.inodes + usage.inodes / 10 + 256;
    let mkfs_program = host_tools::find_program("mkfs.ext4").unwrap_or_else(|| "mkfs.ext4".into());
    let mut attempts = [10u64, 2].into_iter().peekable();
    while let Some(slack_divisor) = attempts.next() {
        let size =
            usage.block_bytes + usage.block_bytes / slack_divisor + inodes * 256 + (16 << 20);
        let file = fs::File::create(image).map_err(io_err(image))?;
        file.set_len(size).map_err(io_err(image))?;
        drop(file);
        let mut mkfs = if is_root {
            Command::new(&mkfs_program)
        } else {
            let mut cmd = Command::new("fakeroot");
            cmd.args([
                "--",
                "sh",
                "-c",
                r#"chown -R 0:0 "$1" && shift && exec "$@""#,
                "sh",
            ])
            .arg(root)
            .arg(&mkfs_program);
            cmd
        };
        mkfs.args([
            "-F",
            "-q",
            "-t",
            "ext4",
            "-b",
            "4096",
            "-m",
            "0",
            "-O",
            "^has_journal",
            "-L",
            label,
        ])
        .arg("-N")
        .arg(inodes.to_string())
        .arg("-E")
        .arg("root_owner=0:0")
        .arg("-d")
        .arg(root)
        .arg(image);
        match command::run_logged(&mut mkfs, log).await {
            Ok(()) => break,
            Err(err) if attempts.peek().is_some() => {
                tracing::debug!(error = %err, "mkfs.ext4 ran out of room; retrying with more slack");
            }
            Err(source) => {
                return Err(BuildRootfsError::Step {
                    step: "mkfs.ext4 -d",
                    source,
                });
            }
        }
    }
    let tool = |name: &str| host_tools::find_program(name).unwrap_or_else(|| name.into());
    // resize2fs insists on a freshly checked filesystem.
    command::run_logged(
        Command::new(tool("e2fsck")).args(["-f", "-y"]).arg(image),
        log,
    )
    .await
    .map_err(|source| BuildRootfsError::Step {
        step: "e2fsck",
        source,
    })?;
    command::run_logged(Command::new(tool("resize2fs")).arg("-M").arg(image), log)
        .await
        .map_err(|source| BuildRootfsError::Step {
            step: "resize2fs -M",
            source,
        })?;
    let len = fs::metadata(image).map_err(io_err(image))?.len();
    Ok(len)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A static x86-64 binary on the test host to stand in for the agent:
    /// busybox-static when installed; tests needing it skip loudly otherwise.
    pub(crate) fn stand_in_agent() -> Option<PathBuf> {
        let busybox = PathBuf::from(minimal::BUSYBOX_PATH);
        match elf::read_elf(&busybox) {
            Ok(info) if info.is_static_x86_64() => Some(busybox),
            _ => {
                eprintln!(
                    "SKIP: no static busybox at {} to stand in for nova-agent",
                    busybox.display()
                );
                None
            }
        }
    }

    #[test]
    fn finish_staging_lays_out_a_bare_tree() {
        let Some(agent) = stand_in_agent() else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        finish_staging(dir.path(), &agent, EtcPolicy::Bare).unwrap();
        let root = dir.path();
        for (d, _) in MOUNTPOINTS {
            assert!(root.join(d).is_dir(), "{d}");
        }
        assert_eq!(
            fs::metadata(root.join("tmp")).unwrap().permissions().mode() & 0o7777,
            0o1777
        );
        assert_eq!(
            fs::read_link(root.join("sbin/init")).unwrap(),
            Path::new("nova-agent")
        );
        assert_eq!(
            fs::metadata(root.join(AGENT_PATH))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o755
        );
        assert!(
            elf::read_elf(&root.join(AGENT_PATH))
                .unwrap()
                .is_static_x86_64()
        );
        assert!(
            fs::read_to_string(root.join("etc/passwd"))
                .unwrap()
                .starts_with("root:x:0:0:")
        );
        assert_eq!(
            fs::read_to_string(root.join("etc/hostname")).unwrap(),
            "nova\n"
        );
    }

    #[test]
    fn distribution_trees_keep_their_own_etc_but_not_symlinked_resolv_conf() {
        let Some(agent) = stand_in_agent() else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("etc")).unwrap();
        fs::create_dir_all(root.join("usr/sbin")).unwrap();
        symlink("usr/sbin", root.join("sbin")).unwrap();
        fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/bash\n").unwrap();
        symlink(
            "/run/systemd/resolve/stub-resolv.conf",
            root.join("etc/resolv.conf"),
        )
        .unwrap();
        finish_staging(root, &agent, EtcPolicy::Distribution).unwrap();
        assert!(
            fs::read_to_string(root.join("etc/passwd"))
                .unwrap()
                .ends_with("/bin/bash\n")
        );
        assert!(
            !fs::symlink_metadata(root.join("etc/resolv.conf"))
                .unwrap()
                .is_symlink()
        );
        assert!(
            root.join("usr/sbin/nova-agent").is_file(),
            "agent lands through the merged-usr link"
        );
        assert!(root.join("etc/dpkg/dpkg.cfg.d/01-nova-nodoc").is_file());
    }

    #[test]
    fn a_dynamic_agent_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = finish_staging(dir.path(), Path::new("/bin/sh"), EtcPolicy::Bare).unwrap_err();
        assert!(matches!(err, BuildRootfsError::NotStatic { .. }), "{err:?}");
        let err = finish_staging(dir.path(), Path::new("/nonexistent/agent"), EtcPolicy::Bare)
            .unwrap_err();
        assert!(matches!(err, BuildRootfsError::AgentMissing(_)), "{err:?}");
        assert!(err.to_string().contains("make agent"));
    }

    #[test]
    fn tree_usage_counts_blocks_and_inodes() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("a"), vec![0u8; 5000]).unwrap();
        fs::create_dir(dir.path().join("d")).unwrap();
        symlink("a", dir.path().join("d/l")).unwrap();
        let usage = tree_usage(dir.path()).unwrap();
        assert_eq!(usage.inodes, 4);
        assert_eq!(usage.block_bytes, 2 * 4096 + 4096 + 4096 + 4096);
    }

    #[tokio::test]
    async fn make_ext4_packs_a_tree_that_debugfs_can_read() {
        if host_tools::find_program("mkfs.ext4").is_none()
            || host_tools::find_program("debugfs").is_none()
        {
            eprintln!("SKIP: e2fsprogs not installed");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        fs::create_dir_all(tree.join("etc")).unwrap();
        fs::write(tree.join("etc/hello"), "hi from the image\n").unwrap();
        let image = dir.path().join("rootfs.ext4");
        let log = dir.path().join("build.log");
        let size = make_ext4(&tree, &image, "nova-test", &log).await.unwrap();
        assert!(size < 8 << 20, "shrunk to its minimum, got {size} bytes");
        let out = std::process::Command::new(host_tools::find_program("debugfs").unwrap())
            .args(["-R", "cat /etc/hello"])
            .arg(&image)
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "hi from the image\n");
        let stat = std::process::Command::new(host_tools::find_program("debugfs").unwrap())
            .args(["-R", "stat /etc/hello"])
            .arg(&image)
            .output()
            .unwrap();
        let stat = String::from_utf8_lossy(&stat.stdout);
        assert!(
            stat.contains("User:     0   Group:     0"),
            "root-owned: {stat}"
        );
    }
}
