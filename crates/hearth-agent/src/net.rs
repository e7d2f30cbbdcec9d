//! The guest's network, set up from what the host sends: the kernel has no IP autoconfiguration
//! and the guest runs no DHCP client. Done with the classic interface ioctls, which need no
//! tools in the image; every step is idempotent, because it runs again after each restore.

use hearth_proto::GuestNetwork;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

fn socket() -> Result<OwnedFd, String> {
    // SAFETY: plain socket(2); the result is checked before it is owned.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(format!("socket: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: fd is a new descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ifreq(name: &str) -> Result<libc::ifreq, String> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(format!("bad interface name {name:?}"));
    }
    // SAFETY: ifreq is plain data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    Ok(req)
}

fn sockaddr(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size; the family says which it is.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn raw_ioctl<T>(sock: &OwnedFd, request: libc::c_ulong, arg: &mut T) -> std::io::Result<()> {
    // SAFETY: each request below takes a pointer to the struct type passed with it.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), request, arg as *mut T) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn ioctl<T>(sock: &OwnedFd, request: libc::c_ulong, arg: &mut T, what: &str) -> Result<(), String> {
    raw_ioctl(sock, request, arg).map_err(|e| format!("{what}: {e}"))
}

fn set_up(sock: &OwnedFd, name: &str) -> Result<(), String> {
    let mut req = ifreq(name)?;
    ioctl(sock, libc::SIOCGIFFLAGS, &mut req, "SIOCGIFFLAGS")?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    ioctl(sock, libc::SIOCSIFFLAGS, &mut req, "SIOCSIFFLAGS")
}

/// Brings up loopback and `net.interface` with its address, MTU and default route, and writes
/// /etc/resolv.conf.
pub fn configure(net: &GuestNetwork) -> Result<(), String> {
    let addr: Ipv4Addr = net
        .address
        .parse()
        .map_err(|e| format!("address {}: {e}", net.address))?;
    let gateway: Ipv4Addr = net
        .gateway
        .parse()
        .map_err(|e| format!("gateway {}: {e}", net.gateway))?;
    if net.prefix_len > 32 {
        return Err(format!("prefix length {}", net.prefix_len));
    }
    let mask = Ipv4Addr::from(
        u32::MAX
            .checked_shl(32 - net.prefix_len as u32)
            .unwrap_or(0),
    );
    let sock = socket()?;
    let name = net.interface.as_str();
    // After a restore the interface is as it was: reconfiguring it would restart its link.
    if !configured(&sock, name, addr)? {
        set_up(&sock, "lo")?;
        let mut req = ifreq(name)?;
        req.ifr_ifru.ifru_mtu = net.mtu as libc::c_int;
        ioctl(&sock, libc::SIOCSIFMTU, &mut req, "SIOCSIFMTU")?;
        let mut req = ifreq(name)?;
        req.ifr_ifru.ifru_addr = sockaddr(addr);
        ioctl(&sock, libc::SIOCSIFADDR, &mut req, "SIOCSIFADDR")?;
        let mut req = ifreq(name)?;
        req.ifr_ifru.ifru_netmask = sockaddr(mask);
        ioctl(&sock, libc::SIOCSIFNETMASK, &mut req, "SIOCSIFNETMASK")?;
        set_up(&sock, name)?;
    }

    // SAFETY: rtentry is plain data; all zeroes is a valid value.
    let mut route: libc::rtentry = unsafe { std::mem::zeroed() };
    route.rt_dst = sockaddr(Ipv4Addr::UNSPECIFIED);
    route.rt_genmask = sockaddr(Ipv4Addr::UNSPECIFIED);
    route.rt_gateway = sockaddr(gateway);
    route.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
    match raw_ioctl(&sock, libc::SIOCADDRT, &mut route) {
        // After a restore the route is there already.
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
        other => other.map_err(|e| format!("SIOCADDRT: {e}"))?,
    }

    let resolv: String = net
        .dns
        .iter()
        .map(|d| format!("nameserver {d}\n"))
        .collect();
    if std::fs::read_to_string("/etc/resolv.conf").ok().as_deref() == Some(resolv.as_str()) {
        return Ok(());
    }
    std::fs::write("/etc/resolv.conf", resolv).map_err(|e| format!("/etc/resolv.conf: {e}"))
}

/// `name` is up with address `addr` already.
fn configured(sock: &OwnedFd, name: &str, addr: Ipv4Addr) -> Result<bool, String> {
    let mut req = ifreq(name)?;
    ioctl(sock, libc::SIOCGIFFLAGS, &mut req, "SIOCGIFFLAGS")?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    if unsafe { req.ifr_ifru.ifru_flags } & libc::IFF_UP as libc::c_short == 0 {
        return Ok(false);
    }
    let mut req = ifreq(name)?;
    if raw_ioctl(sock, libc::SIOCGIFADDR, &mut req).is_err() {
        return Ok(false);
    }
    // SAFETY: SIOCGIFADDR filled the address member with an AF_INET sockaddr.
    let have =
        unsafe { std::mem::transmute::<libc::sockaddr, libc::sockaddr_in>(req.ifr_ifru.ifru_addr) };
    Ok(u32::from_be(have.sin_addr.s_addr) == u32::from(addr))
}
