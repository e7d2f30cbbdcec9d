//! Links, addresses and routes through rtnetlink: the veth pair between the host and a
//! machine's namespace, and the tap the VMM attaches to inside it.

use super::netns;
use crate::error::{Error, Result};
use futures_util::TryStreamExt;
use rtnetlink::{Handle, LinkUnspec, LinkVeth, RouteMessageBuilder};
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

fn nl(what: &str) -> impl FnOnce(rtnetlink::Error) -> Error + '_ {
    move |e| Error::internal(format!("{what}: {e}"))
}

/// A netlink connection in the daemon's own namespace.
pub fn host_handle() -> Result<Handle> {
    let (conn, handle, _) =
        rtnetlink::new_connection().map_err(|e| Error::internal(format!("netlink: {e}")))?;
    tokio::spawn(conn);
    Ok(handle)
}

/// A netlink connection inside namespace `ns` (its socket is opened there).
pub fn ns_handle(ns: &str) -> Result<Handle> {
    let rt = tokio::runtime::Handle::current();
    let (conn, handle, _) = netns::run_in(ns, move || {
        let _rt = rt.enter();
        rtnetlink::new_connection().map_err(|e| Error::internal(format!("netlink: {e}")))
    })?;
    tokio::spawn(conn);
    Ok(handle)
}

pub async fn index_of(handle: &Handle, name: &str) -> Result<Option<u32>> {
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(link) => Ok(link.map(|l| l.header.index)),
        // No such device.
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
        Err(e) => Err(Error::internal(format!("looking up link {name}: {e}"))),
    }
}

async fn must_index(handle: &Handle, name: &str) -> Result<u32> {
    index_of(handle, name)
        .await?
        .ok_or_else(|| Error::internal(format!("link {name} is missing")))
}

async fn up_with_address(handle: &Handle, index: u32, addr: Ipv4Addr, len: u8) -> Result<()> {
    handle
        .address()
        .add(index, IpAddr::V4(addr), len)
        .execute()
        .await
        .map_err(nl("adding an address"))?;
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(nl("setting a link up"))
}

/// What one machine's namespace holds, by name and address.
pub struct NsLinks<'a> {
    pub ns: &'a str,
    /// The host end of the veth pair, in the daemon's namespace.
    pub veth_host: &'a str,
    pub host_addr: Ipv4Addr,
    /// The namespace end of the veth pair (named `eth0` inside).
    pub ns_addr: Ipv4Addr,
    /// /31 for the pair.
    pub veth_prefix: u8,
    pub tap: &'a str,
    pub tap_mac: [u8; 6],
    pub tap_addr: Ipv4Addr,
    pub tap_prefix: u8,
}

pub const NS_UPLINK: &str = "eth0";

/// Makes the persistent tap in namespace `ns`: all a VMM needs to start. The namespace does
/// not forward yet (made so), so its guest reaches nothing until [`connect`] and the rules
/// are done.
pub fn prepare(ns: &str, tap: &str) -> Result<()> {
    let tap = tap.to_string();
    netns::run_in(ns, move || make_tap(&tap))
}

/// Makes the veth pair into namespace `l.ns` (prepared already), addresses both ends, brings up
/// the namespace's loopback and tap, and routes the namespace's traffic to the host.
pub async fn connect(host: &Handle, l: &NsLinks<'_>) -> Result<()> {
    // The peer gets a temporary name that cannot clash in the host's namespace.
    let peer = format!("{}p", l.veth_host);
    host.link()
        .add(LinkVeth::new(l.veth_host, &peer).build())
        .execute()
        .await
        .map_err(nl("creating a veth pair"))?;
    let ns_file = std::fs::File::open(netns::path(l.ns))?;
    host.link()
        .set(
            LinkUnspec::new_with_name(&peer)
                .setns_by_fd(ns_file.as_raw_fd())
                .build(),
        )
        .execute()
        .await
        .map_err(nl("moving the veth peer into the namespace"))?;
    let index = must_index(host, l.veth_host).await?;
    up_with_address(host, index, l.host_addr, l.veth_prefix).await?;

    let ns = ns_handle(l.ns)?;
    let peer_index = must_index(&ns, &peer).await?;
    ns.link()
        .set(
            LinkUnspec::new_with_index(peer_index)
                .name(NS_UPLINK.to_string())
                .build(),
        )
        .execute()
        .await
        .map_err(nl("naming the namespace's uplink"))?;
    up_with_address(&ns, peer_index, l.ns_addr, l.veth_prefix).await?;
    let lo = must_index(&ns, "lo").await?;
    ns.link()
        .set(LinkUnspec::new_with_index(lo).up().build())
        .execute()
        .await
        .map_err(nl("setting loopback up"))?;
    let tap_index = must_index(&ns, l.tap).await?;
    // The same MAC in every namespace: a restored guest's ARP entry for its gateway stays right.
    ns.link()
        .set(
            LinkUnspec::new_with_index(tap_index)
                .address(l.tap_mac.to_vec())
                .build(),
        )
        .execute()
        .await
        .map_err(nl("setting the tap's MAC"))?;
    up_with_address(&ns, tap_index, l.tap_addr, l.tap_prefix).await?;
    ns.route()
        .add(
            RouteMessageBuilder::<Ipv4Addr>::new()
                .gateway(l.host_addr)
                .build(),
        )
        .execute()
        .await
        .map_err(nl("adding the namespace's default route"))
}

/// Lets namespace `ns` forward: the last step, once its rules are in place.
pub fn enable_forwarding(ns: &str) -> Result<()> {
    netns::run_in(ns, || netns::set_forwarding(true))
}

/// Whether namespace `ns` forwards: whether its setup ran to the end.
pub fn forwards(ns: &str) -> bool {
    netns::run_in(ns, || Ok(netns::forwarding())).unwrap_or(false)
}

/// Deletes a link of the host's namespace by name; a missing one is already deleted.
pub async fn delete(host: &Handle, name: &str) -> Result<()> {
    let Some(index) = index_of(host, name).await? else {
        return Ok(());
    };
    match host.link().del(index).execute().await {
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(()),
        other => other.map_err(nl("deleting a link")),
    }
}

/// Names of the host's links that start with `prefix`.
pub async fn list(host: &Handle, prefix: &str) -> Result<Vec<String>> {
    use rtnetlink::packet_route::link::LinkAttribute;
    let mut names = Vec::new();
    let mut links = host.link().get().execute();
    while let Some(link) = links.try_next().await.map_err(nl("listing links"))? {
        for attr in link.attributes {
            if let LinkAttribute::IfName(name) = attr {
                if name.starts_with(prefix) {
                    names.push(name);
                }
            }
        }
    }
    Ok(names)
}

// From <linux/if_tun.h>.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

/// Creates a persistent tap named `name` in the calling thread's namespace. The kernel has no
/// netlink request for this: it takes the tun device's ioctls.
fn make_tap(name: &str) -> Result<()> {
    let tun = attach_tap(name)?;
    // SAFETY: TUNSETPERSIST takes an integer flag.
    let rc = unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETPERSIST, 1 as libc::c_ulong) };
    if rc != 0 {
        return Err(Error::internal(format!(
            "TUNSETPERSIST {name}: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

/// Opens tap `name` in the calling thread's namespace (creating it unless it is persistent),
/// with the flags a VMM asks for.
fn attach_tap(name: &str) -> Result<std::fs::File> {
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(|e| Error::internal(format!("/dev/net/tun: {e}")))?;
    // struct ifreq { char ifr_name[16]; short ifr_flags; … } padded to 40 bytes.
    let mut ifreq = [0u8; 40];
    if name.len() >= 16 {
        return Err(Error::internal(format!("tap name {name} is too long")));
    }
    ifreq[..name.len()].copy_from_slice(name.as_bytes());
    // Vnet headers let the VMM offload.
    let flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
    ifreq[16..18].copy_from_slice(&flags.to_ne_bytes());
    // SAFETY: TUNSETIFF reads and writes a struct ifreq, which `ifreq` is large enough for.
    let rc = unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF, ifreq.as_mut_ptr()) };
    if rc != 0 {
        return Err(Error::internal(format!(
            "TUNSETIFF {name}: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(tun)
}

/// An open tap `name` of the namespace bound at `netns`, for a VMM that may not open it
/// itself (an unprivileged one: a tap belongs to whoever has CAP_NET_ADMIN).
pub fn open_tap(netns: &Path, name: &str) -> Result<OwnedFd> {
    let name = name.to_string();
    netns::run_at(netns, move || attach_tap(&name).map(OwnedFd::from))
}

/// An fd for namespace `ns`, for a VMM to enter before it execs.
pub fn ns_fd(ns: &str) -> Result<OwnedFd> {
    let file = std::fs::File::open(netns::path(ns))
        .map_err(|e| Error::internal(format!("network namespace {ns}: {e}")))?;
    Ok(file.into())
}
