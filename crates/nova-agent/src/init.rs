//! PID 1 duties: the file systems, the writable overlay, the guest's identity and `lo`.
//!
//! The guest has no init system and no udev; the agent is the first and only
//! long-running process. [`setup`] runs once, before the async runtime and
//! before any command, in this order:
//!
//! 1. mount `/proc` (to read the kernel command line) and `/dev` (devtmpfs, to
//!    find the scratch disk);
//! 2. with `nova.overlay=/dev/vdX`: mount that ext4 disk, stack an overlayfs
//!    (lower = the read-only root, upper/work on the disk) and make it the new
//!    root with `pivot_root` (falling back to `MS_MOVE` + `chroot`), carrying
//!    `/proc` and `/dev` along. From then on every write lands on the scratch
//!    disk, and the template's root file system is never modified;
//! 3. mount `/sys`, `/dev/pts`, `/dev/shm`, `/tmp`, `/run` and cgroup2 at
//!    `/sys/fs/cgroup`;
//! 4. the guest's identity ([`identity`]): the hostname (`nova.hostname=`,
//!    default `nova`), `/etc/hostname`, `/etc/hosts` and a new
//!    `/etc/machine-id`, also on a read-only root (and `/etc/resolv.conf`
//!    with `nova.net=`); then bring up `lo`;
//! 5. with `nova.net=`: configure the NIC ([`netdev::configure`]).
//!
//! A step that fails is logged and skipped: a guest with a missing mount
//! point is still more useful with a reachable agent than without one.
//!
//! The rootfs must provide the mount points `/proc`, `/sys`, `/dev`, `/run`
//! and `/tmp` (the overlay staging area lives in a tmpfs on `/run`).

use std::ffi::CString;
use std::io;
use std::path::Path;

use nova_protocol::boot::NovaParams;
use rustix::fs::Mode;
use rustix::mount::{MountFlags, UnmountFlags, mount, mount_move, unmount};

use crate::{identity, netdev};

/// Where the overlay is assembled before it becomes `/`.
const STAGING: &str = "/run/nova";
/// Where the scratch disk stays mounted inside the new root.
pub(crate) const SCRATCH_MOUNT: &str = "/.nova/scratch";

/// What [`setup`] did, for the log.
#[derive(Debug, Default)]
pub(crate) struct InitReport {
    pub(crate) overlay: Option<String>,
    pub(crate) hostname: String,
    pub(crate) machine_id: String,
    pub(crate) net: Option<String>,
    pub(crate) failures: Vec<String>,
}

/// Performs the PID 1 set-up and returns the `nova.*` parameters it read.
pub(crate) fn setup() -> (NovaParams, InitReport) {
    let mut report = InitReport::default();
    let mut failures = Vec::new();
    let mut attempt = |what: &str, result: io::Result<()>| {
        if let Err(e) = result {
            tracing::warn!(error = %e, "init: {what} failed");
            failures.push(format!("{what}: {e}"));
        }
    };

    let nosuid_nodev_noexec = MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
    attempt(
        "mount /proc",
        mount_fs("proc", "/proc", "proc", nosuid_nodev_noexec, None),
    );
    attempt(
        "mount /dev",
        mount_fs(
            "devtmpfs",
            "/dev",
            "devtmpfs",
            MountFlags::NOSUID,
            Some("mode=0755"),
        ),
    );
    let cmdline = read_params();

    if let Some(device) = cmdline.overlay.clone() {
        match switch_to_overlay(&device) {
            Ok(()) => report.overlay = Some(device),
            Err(e) => {
                tracing::error!(error = %e, %device, "init: writable overlay failed; the root stays as the kernel mounted it");
                attempt("writable overlay", Err(e));
            }
        }
    }

    attempt(
        "mount /sys",
        mount_fs("sysfs", "/sys", "sysfs", nosuid_nodev_noexec, None),
    );
    attempt(
        "mount /dev/pts",
        mkdir_mount(
            "devpts",
            "/dev/pts",
            "devpts",
            MountFlags::NOSUID | MountFlags::NOEXEC,
            Some("gid=5,mode=0620,ptmxmode=0666"),
        ),
    );
    attempt(
        "mount /dev/shm",
        mkdir_mount(
            "tmpfs",
            "/dev/shm",
            "tmpfs",
            MountFlags::NOSUID | MountFlags::NODEV,
            Some("mode=1777"),
        ),
    );
    attempt(
        "mount /tmp",
        mount_fs(
            "tmpfs",
            "/tmp",
            "tmpfs",
            MountFlags::NOSUID | MountFlags::NODEV,
            Some("mode=1777"),
        ),
    );
    attempt(
        "mount /run",
        mount_fs(
            "tmpfs",
            "/run",
            "tmpfs",
            MountFlags::NOSUID | MountFlags::NODEV,
            Some("mode=0755"),
        ),
    );
    attempt(
        "mount /sys/fs/cgroup",
        mount_fs(
            "cgroup2",
            "/sys/fs/cgroup",
            "cgroup2",
            nosuid_nodev_noexec,
            None,
        ),
    );

    if let Some(net) = &cmdline.net {
        identity::set_resolv_conf(net.resolv_conf());
    }
    match identity::apply(Some(cmdline.hostname_or_default())) {
        Ok(identity) => {
            if identity.overlaid {
                tracing::debug!("read-only root: identity files overlaid on /etc");
            }
            report.hostname = identity.hostname;
            report.machine_id = identity.machine_id;
        }
        Err(e) => attempt("set the guest identity", Err(e)),
    }
    attempt("bring up lo", netdev::bring_up("lo"));
    if let Some(net) = &cmdline.net {
        let device = nova_protocol::boot::GUEST_NET_DEVICE;
        attempt("configure the network", netdev::configure(device, net));
        report.net = Some(format!("{device} {net}"));
    }
    report.failures = failures;
    (cmdline, report)
}

/// The `nova.*` parameters of `/proc/cmdline`. A command line this agent
/// cannot read (a host from another build) is logged and replaced by the
/// defaults, so that the agent still comes up and can be reached.
fn read_params() -> NovaParams {
    let text = match std::fs::read_to_string("/proc/cmdline") {
        Ok(text) => text,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read /proc/cmdline; using the defaults");
            return NovaParams::default();
        }
    };
    match NovaParams::parse(&text) {
        Ok(params) => params,
        Err(e) => {
            tracing::error!(error = %e, cmdline = %text.trim_end(), "init: the nova.* boot parameters are invalid; using the defaults");
            NovaParams::default()
        }
    }
}

/// Mounts a file system; "already mounted there" counts as success (the
/// kernel may have mounted devtmpfs itself).
fn mount_fs(
    source: &str,
    target: &str,
    fstype: &str,
    flags: MountFlags,
    data: Option<&str>,
) -> io::Result<()> {
    let data = data
        .map(CString::new)
        .transpose()
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "mount options contain NUL"))?;
    match mount(source, target, fstype, flags, data.as_deref()) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::BUSY) => Ok(()),
        Err(e) => Err(io::Error::other(format!("mount {fstype} on {target}: {e}"))),
    }
}

/// Creates the mount point (it may live on a fresh devtmpfs) and mounts.
fn mkdir_mount(
    source: &str,
    target: &str,
    fstype: &str,
    flags: MountFlags,
    data: Option<&str>,
) -> io::Result<()> {
    ensure_dir(target)?;
    mount_fs(source, target, fstype, flags, data)
}

fn ensure_dir(path: &str) -> io::Result<()> {
    match std::fs::create_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if Path::new(path).is_dir() => {
            tracing::debug!(error = %e, path, "create_dir_all failed on an existing directory");
            Ok(())
        }
        Err(e) => Err(io::Error::new(e.kind(), format!("mkdir {path}: {e}"))),
    }
}

/// Mounts `device` (ext4) and makes an overlay over the current root the new root.
fn switch_to_overlay(device: &str) -> io::Result<()> {
    let scratch = format!("{STAGING}/scratch");
    let newroot = format!("{STAGING}/root");
    // A tmpfs on /run gives us writable mount points on a read-only root.
    mount_fs(
        "tmpfs",
        "/run",
        "tmpfs",
        MountFlags::NOSUID | MountFlags::NODEV,
        Some("mode=0755"),
    )?;
    ensure_dir(&scratch)?;
    ensure_dir(&newroot)?;
    mount_fs(device, &scratch, "ext4", MountFlags::NOATIME, None)?;
    let upper = format!("{scratch}/upper");
    let work = format!("{scratch}/work");
    ensure_dir(&upper)?;
    ensure_dir(&work)?;
    let options = format!("lowerdir=/,upperdir={upper},workdir={work}");
    mount_fs(
        "overlay",
        &newroot,
        "overlay",
        MountFlags::empty(),
        Some(&options),
    )?;

    // Carry the scratch disk, /proc and /dev into the new root.
    let inside = |p: &str| format!("{newroot}{p}");
    ensure_dir(&inside(SCRATCH_MOUNT))?;
    move_mount(&scratch, &inside(SCRATCH_MOUNT))?;
    for path in ["/proc", "/dev"] {
        ensure_dir(&inside(path))?;
        move_mount(path, &inside(path))?;
    }

    std::env::set_current_dir(&newroot)?;
    let old_root = ".nova/oldroot";
    ensure_dir(&format!("{newroot}/{old_root}"))?;
    match rustix::process::pivot_root(".", old_root) {
        Ok(()) => {
            rustix::process::chroot(".")?;
            std::env::set_current_dir("/")?;
            let old = format!("/{old_root}");
            if let Err(e) = unmount(old.as_str(), UnmountFlags::DETACH) {
                tracing::warn!(error = %e, "cannot detach the old root");
            } else if let Err(e) = std::fs::remove_dir(&old) {
                tracing::debug!(error = %e, "cannot remove the old root mount point");
            }
        }
        Err(e) => {
            // pivot_root refuses e.g. an initramfs root; the classic
            // switch_root move works everywhere.
            tracing::info!(error = %e, "pivot_root failed; using MS_MOVE + chroot");
            let _ = std::fs::remove_dir(old_root);
            mount_move(".", "/")
                .map_err(|e| io::Error::other(format!("move new root onto /: {e}")))?;
            rustix::process::chroot(".")?;
            std::env::set_current_dir("/")?;
        }
    }
    // Keep the scratch root private to us.
    let _ = rustix::fs::chmod(SCRATCH_MOUNT, Mode::from_raw_mode(0o700));
    Ok(())
}

fn move_mount(from: &str, to: &str) -> io::Result<()> {
    mount_move(from, to).map_err(|e| io::Error::other(format!("move mount {from} to {to}: {e}")))
}
