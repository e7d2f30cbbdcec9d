//! The agent's channel over AF_VSOCK, for machines that have no virtio-serial (Firecracker): a
//! listener on [`hearth_proto::AGENT_VSOCK_PORT`] of any CID (a restored machine keeps serving
//! whatever CID its VMM gives it).

use crate::channel::{HostStream, Listener};
use nix::sys::socket::{self, AddressFamily, Backlog, SockFlag, SockType, VsockAddr};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

/// Virtio device ids (virtio specification, "Device Types").
const VIRTIO_ID_CONSOLE: u32 = 3;
const VIRTIO_ID_VSOCK: u32 = 19;

/// Whether vsock is the channel: the machine has a virtio vsock device and no virtio console
/// (whose agent port, once its driver has named it, would be the channel), and the vsock core
/// is up (`/dev/vsock`).
pub fn is_channel() -> bool {
    let devices = virtio_devices(Path::new("/sys/bus/virtio/devices"));
    devices.contains(&VIRTIO_ID_VSOCK)
        && !devices.contains(&VIRTIO_ID_CONSOLE)
        && Path::new("/dev/vsock").exists()
}

/// The device ids of the virtio devices under `bus` (`0x0013` in each device's `device` file).
fn virtio_devices(bus: &Path) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir(bus) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let id = std::fs::read_to_string(entry.path().join("device")).ok()?;
            u32::from_str_radix(id.trim().trim_start_matches("0x"), 16).ok()
        })
        .collect()
}

pub struct VsockListener(OwnedFd);

impl VsockListener {
    pub fn bind(port: u32) -> io::Result<VsockListener> {
        let fd = socket::socket(
            AddressFamily::Vsock,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        socket::bind(fd.as_raw_fd(), &VsockAddr::new(libc::VMADDR_CID_ANY, port))?;
        socket::listen(&fd, Backlog::new(8)?)?;
        Ok(VsockListener(fd))
    }
}

impl Listener for VsockListener {
    type Stream = VsockStream;

    fn accept(&self) -> io::Result<VsockStream> {
        let fd = socket::accept4(self.0.as_raw_fd(), SockFlag::SOCK_CLOEXEC)?;
        // SAFETY: accept4 returned a new descriptor that nothing else owns.
        Ok(VsockStream(unsafe { OwnedFd::from_raw_fd(fd) }))
    }
}

pub struct VsockStream(OwnedFd);

impl Read for VsockStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        Ok(nix::unistd::read(&self.0, buf)?)
    }
}

impl Write for VsockStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(nix::unistd::write(&self.0, buf)?)
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        Ok(nix::sys::uio::writev(&self.0, bufs)?)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl HostStream for VsockStream {
    fn try_clone(&self) -> io::Result<Self> {
        self.0.try_clone().map(VsockStream)
    }

    fn shutdown(&self) {
        // A connection already reset or closed has nothing left to end.
        let _ = socket::shutdown(self.0.as_raw_fd(), socket::Shutdown::Both);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtio_devices_are_read_by_id() {
        let bus = tempfile::tempdir().unwrap();
        for (name, id) in [
            ("virtio0", "0x0013\n"),
            ("virtio1", "0x0002\n"),
            ("virtio2", "junk"),
        ] {
            std::fs::create_dir(bus.path().join(name)).unwrap();
            std::fs::write(bus.path().join(name).join("device"), id).unwrap();
        }
        let mut ids = virtio_devices(bus.path());
        ids.sort();
        assert_eq!(ids, [2, VIRTIO_ID_VSOCK]);
        assert!(virtio_devices(&bus.path().join("missing")).is_empty());
    }
}
