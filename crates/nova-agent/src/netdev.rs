//! Configuring network interfaces with the classic `SIOC*` ioctls.
//!
//! The agent brings up the loopback `lo` (without it, `localhost` servers
//! inside the sandbox are unreachable) and, when the kernel command line
//! carries `nova.net=` ([`GuestNet`]), the guest's NIC
//! ([`nova_protocol::boot::GUEST_NET_DEVICE`]): address, netmask, MTU, up,
//! and a default route via the gateway. A handful of ioctls on a throwaway
//! UDP socket are all it takes, far less than a netlink client.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};

use nova_protocol::boot::GuestNet;

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

/// Configures interface `name` from `net`: address, netmask, MTU, up, and
/// a default route via the gateway (an existing one is kept).
pub(crate) fn configure(name: &str, net: &GuestNet) -> io::Result<()> {
    let sock = socket(AddressFamily::INET, SocketType::DGRAM, None)?;
    let step = |what: &str, r: io::Result<()>| {
        r.map_err(|e| io::Error::new(e.kind(), format!("{what} on {name}: {e}")))
    };
    step(
        "set the address",
        set_addr(&sock, name, libc::SIOCSIFADDR, net.addr),
    )?;
    step(
        "set the netmask",
        set_addr(&sock, name, libc::SIOCSIFNETMASK, net.netmask()),
    )?;
    if let Some(mtu) = net.mtu {
        let mut ifr = ifreq_for(name)?;
        ifr.ifr_ifru.ifru_mtu = libc::c_int::from(mtu);
        // SAFETY: `sock` is open for the call; `ifr` is an initialized
        // `ifreq` holding the name and the MTU, which SIOCSIFMTU only reads.
        let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFMTU, &ifr) };
        step("set the MTU", ioctl_result(rc))?;
    }
    step("bring up", bring_up(name))?;
    step(
        "add the default route",
        add_default_route(&sock, net.gateway),
    )
}

fn ioctl_result(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn sockaddr_in(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: `sockaddr_in` and `sockaddr` are both 16-byte plain C structs
    // (the kernel reads a `sockaddr` as the `sockaddr_in` its family says).
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn set_addr(sock: &OwnedFd, name: &str, request: libc::c_ulong, addr: Ipv4Addr) -> io::Result<()> {
    let mut ifr = ifreq_for(name)?;
    ifr.ifr_ifru.ifru_addr = sockaddr_in(addr);
    // SAFETY: `sock` is open for the call; `ifr` is an initialized `ifreq`
    // with the name and an AF_INET address, which the SIOCSIF* address
    // requests only read.
    ioctl_result(unsafe { libc::ioctl(sock.as_raw_fd(), request, &ifr) })
}

/// The kernel's `struct rtentry` (`<linux/route.h>`), which glibc's `libc`
/// bindings do not have.
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr,
    rt_gateway: libc::sockaddr,
    rt_genmask: libc::sockaddr,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_pad4: *mut libc::c_void,
    rt_metric: libc::c_short,
    rt_dev: *mut libc::c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

fn add_default_route(sock: &OwnedFd, gateway: Ipv4Addr) -> io::Result<()> {
    let route = RtEntry {
        rt_pad1: 0,
        rt_dst: sockaddr_in(Ipv4Addr::UNSPECIFIED),
        rt_gateway: sockaddr_in(gateway),
        rt_genmask: sockaddr_in(Ipv4Addr::UNSPECIFIED),
        rt_flags: libc::RTF_UP | libc::RTF_GATEWAY,
        rt_pad2: 0,
        rt_pad3: 0,
        rt_pad4: std::ptr::null_mut(),
        rt_metric: 0,
        rt_dev: std::ptr::null_mut(),
        rt_mtu: 0,
        rt_window: 0,
        rt_irtt: 0,
    };
    // SAFETY: `sock` is open for the call; `route` has the kernel's layout
    // of `struct rtentry`, is fully initialized (no device name: the kernel
    // finds the interface from the gateway), and SIOCADDRT only reads it.
    match ioctl_result(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCADDRT, &route) }) {
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        other => other,
    }
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
        let net: GuestNet = "10.9.9.1/30,gw=10.9.9.2".parse().unwrap();
        assert!(configure("novanotexist0", &net).is_err());
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn rtentry_has_the_kernels_size() {
        assert_eq!(std::mem::size_of::<RtEntry>(), 120);
    }
}
