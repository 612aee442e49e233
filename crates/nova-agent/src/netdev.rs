//! Bringing a network interface up with `SIOCSIFFLAGS`.
//!
//! The only interface the agent itself configures is the loopback `lo`
//! (without it, `localhost` servers inside the sandbox are unreachable);
//! the real NIC is configured by the kernel command line (`ip=`) or by the
//! networking layer. Two ioctls on a throwaway UDP socket are all it takes,
//! far less than a netlink client.

use std::io;
use std::os::fd::AsRawFd;

use rustix::net::{AddressFamily, SocketType, socket};

/// Sets `IFF_UP` on interface `name`.
pub(crate) fn bring_up(name: &str) -> io::Result<()> {
    let sock = socket(AddressFamily::INET, SocketType::DGRAM, None)?;
    let mut ifr = ifreq_for(name)?;
    // SAFETY: `sock` is a valid open socket for the duration of the call, and
    // `ifr` is a properly initialized `ifreq` that SIOCGIFFLAGS reads the
    // name from and writes the flags into; it outlives the call.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFFLAGS succeeded, so the `ifru_flags` member of the union
    // is the one the kernel initialized.
    let flags = unsafe { ifr.ifr_ifru.ifru_flags };
    let up = libc::IFF_UP as libc::c_short;
    if flags & up != 0 {
        return Ok(());
    }
    ifr.ifr_ifru.ifru_flags = flags | up;
    // SAFETY: as above; SIOCSIFFLAGS only reads `ifr`.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn ifreq_for(name: &str) -> io::Result<libc::ifreq> {
    // SAFETY: `ifreq` is a plain C struct of integers, arrays and a union of
    // such; all-zero bytes are a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= ifr.ifr_name.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "invalid interface name",
        ));
    }
    for (dst, src) in ifr.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    Ok(ifr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_interface_names() {
        assert!(ifreq_for("").is_err());
        assert!(ifreq_for("a-name-that-is-far-too-long").is_err());
        assert!(ifreq_for("lo").is_ok());
    }

    #[test]
    fn unknown_interface_is_an_error() {
        assert!(bring_up("novanotexist0").is_err());
    }
}
