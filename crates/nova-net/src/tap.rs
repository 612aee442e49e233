//! The tap device a VMM attaches to, made with the tun driver's ioctls.
//!
//! The kernel refuses to create tun/tap devices over rtnetlink, so this is
//! the one place that uses `ioctl`: `TUNSETIFF` on `/dev/net/tun` makes the
//! device, `TUNSETOWNER` / `TUNSETGROUP` let the VMM's user attach to it, and
//! `TUNSETPERSIST` keeps it after the creating fd closes. These calls run on
//! a thread inside the sandbox's namespace ([`crate::netns::run_in`]), so the
//! device is born there. Everything else about the tap (address, up, delete)
//! is netlink.

use std::ffi::c_int;
use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

use crate::error::HostError;

const TUN_PATH: &str = "/dev/net/tun";

/// `struct ifreq` as the tun ioctls read it: a name and the flags, padded to
/// the kernel's 40 bytes.
#[repr(C)]
struct IfReqFlags {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl IfReqFlags {
    fn new(name: &str, flags: c_int) -> Result<Self, HostError> {
        let bytes = name.as_bytes();
        if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
            return Err(HostError::io(
                format!("tap name {name:?}"),
                std::io::Error::from(std::io::ErrorKind::InvalidInput),
            ));
        }
        let mut req = Self {
            name: [0; libc::IFNAMSIZ],
            // The flags fit in 16 bits: the kernel's field is a short.
            flags: flags as libc::c_short,
            _pad: [0; 22],
        };
        req.name[..bytes.len()].copy_from_slice(bytes);
        Ok(req)
    }
}

fn open_tun() -> Result<OwnedFd, HostError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(TUN_PATH)
        .map(OwnedFd::from)
        .map_err(|e| HostError::io(format!("opening {TUN_PATH}"), e))
}

fn check(ret: c_int, op: impl Into<String>) -> Result<(), HostError> {
    if ret < 0 {
        Err(HostError::io(op, std::io::Error::last_os_error()))
    } else {
        Ok(())
    }
}

/// Attaches `fd` to the tap `name` (creating it if absent) with `flags`.
fn set_iff(fd: &OwnedFd, name: &str, flags: c_int) -> Result<(), HostError> {
    let mut req = IfReqFlags::new(name, flags)?;
    // SAFETY: `fd` is an open /dev/net/tun descriptor and `req` a live,
    // properly sized `struct ifreq` (name NUL-terminated, flags set) that the
    // kernel reads and writes only for the duration of the call.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut req as *mut IfReqFlags) };
    check(ret, format!("TUNSETIFF on tap {name}"))
}

/// Who may attach to the tap (the VMM's user and group).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TapOwner {
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
}

impl TapOwner {
    /// The current process's effective user and group.
    pub fn current() -> Self {
        Self {
            uid: rustix::process::geteuid().as_raw(),
            gid: rustix::process::getegid().as_raw(),
        }
    }
}

/// Creates the persistent tap `name` in the calling thread's namespace, or,
/// if it exists, gives it to `owner` (the ioctls are the same).
pub(crate) fn create_persistent(name: &str, owner: TapOwner) -> Result<(), HostError> {
    let fd = open_tun()?;
    set_iff(&fd, name, libc::IFF_TAP | libc::IFF_NO_PI)?;
    // SAFETY: TUNSETOWNER / TUNSETGROUP / TUNSETPERSIST take their argument
    // by value (an id or a boolean), not a pointer; `fd` is attached to the
    // tap just made.
    let ret = unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            libc::TUNSETOWNER,
            owner.uid as libc::c_ulong,
        )
    };
    check(ret, format!("TUNSETOWNER on tap {name}"))?;
    // SAFETY: as above.
    let ret = unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            libc::TUNSETGROUP,
            owner.gid as libc::c_ulong,
        )
    };
    check(ret, format!("TUNSETGROUP on tap {name}"))?;
    // SAFETY: as above.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETPERSIST, 1 as libc::c_ulong) };
    check(ret, format!("TUNSETPERSIST on tap {name}"))
}

/// Opens a queue of the existing tap `name` in the calling thread's
/// namespace, as a VMM would: `IFF_TAP | IFF_NO_PI`, plus `IFF_VNET_HDR` when
/// asked (virtio-net offloads; QEMU detects it on the fd it is given).
pub(crate) fn open_queue(name: &str, vnet_hdr: bool) -> Result<OwnedFd, HostError> {
    let fd = open_tun()?;
    let mut flags = libc::IFF_TAP | libc::IFF_NO_PI;
    if vnet_hdr {
        flags |= libc::IFF_VNET_HDR;
    }
    set_iff(&fd, name, flags)?;
    Ok(fd)
}
