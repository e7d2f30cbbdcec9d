//! System duties of PID 1: mounts, identity, clock, entropy, power-off.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hearth_proto::Configure;
use nix::mount::{mount, MsFlags};
use nix::sys::reboot::{reboot, RebootMode};
use nix::sys::time::TimeSpec;
use nix::time::{clock_settime, ClockId};
use std::fs;
use std::os::fd::AsRawFd;
use std::sync::Mutex;

const DEFAULT_HOSTNAME: &str = "hearth";

pub fn init() {
    let mounts: [(&str, &str, &str, MsFlags, Option<&str>); 8] = [
        (
            "proc",
            "/proc",
            "proc",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            None,
        ),
        (
            "sysfs",
            "/sys",
            "sysfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            None,
        ),
        // For the workload's cgroup (workload.rs).
        (
            "cgroup2",
            "/sys/fs/cgroup",
            "cgroup2",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            None,
        ),
        (
            "devtmpfs",
            "/dev",
            "devtmpfs",
            MsFlags::MS_NOSUID,
            Some("mode=0755"),
        ),
        (
            "devpts",
            "/dev/pts",
            "devpts",
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("gid=5,mode=620,ptmxmode=666"),
        ),
        (
            "tmpfs",
            "/dev/shm",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=1777"),
        ),
        (
            "tmpfs",
            "/run",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=0755"),
        ),
        (
            "tmpfs",
            "/tmp",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=1777"),
        ),
    ];
    for (src, target, fstype, flags, data) in mounts {
        let _ = fs::create_dir_all(target);
        // The initrd may already have mounted /dev; a second devtmpfs mount there is harmless.
        if let Err(e) = mount(Some(src), target, Some(fstype), flags, data) {
            eprintln!("hearth-agent: mount {target}: {e}");
        }
    }
    let hostname = fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| DEFAULT_HOSTNAME.to_string());
    let _ = nix::unistd::sethostname(&hostname);
}

/// Applies the fix-ups a hello carries. The host repeats its hello until one is answered, each
/// with fix-ups made as it was sent, and the agent answers each on a thread of its own: of one
/// handshake's (one nonce's), only fix-ups newer than those applied are applied, so a late
/// thread cannot set the clock back.
pub fn configure_for_hello(nonce: &str, cfg: &Configure) -> Result<(), String> {
    static APPLIED: Mutex<Option<(String, Option<u64>)>> = Mutex::new(None);
    let mut applied = APPLIED.lock().unwrap_or_else(|e| e.into_inner());
    if !newer(&applied, nonce, cfg.wall_clock_unix_ns) {
        return Ok(());
    }
    configure(cfg)?;
    *applied = Some((nonce.to_string(), cfg.wall_clock_unix_ns));
    Ok(())
}

/// Fix-ups sent at `clock` with a hello of `nonce` are newer than those `applied`.
fn newer(applied: &Option<(String, Option<u64>)>, nonce: &str, clock: Option<u64>) -> bool {
    match applied {
        Some((n, at)) if n == nonce => clock > *at,
        _ => true,
    }
}

pub fn configure(cfg: &Configure) -> Result<(), String> {
    if cfg.thaw {
        freeze_root(false)?;
    }
    if let Some(ns) = cfg.wall_clock_unix_ns {
        let ts = TimeSpec::new((ns / 1_000_000_000) as i64, (ns % 1_000_000_000) as i64);
        clock_settime(ClockId::CLOCK_REALTIME, ts).map_err(|e| format!("set clock: {e}"))?;
    }
    if let Some(entropy) = &cfg.entropy_base64 {
        let bytes = B64
            .decode(entropy)
            .map_err(|e| format!("entropy_base64: {e}"))?;
        add_entropy(&bytes)?;
    }
    if let Some(hostname) = &cfg.hostname {
        nix::unistd::sethostname(hostname).map_err(|e| format!("sethostname: {e}"))?;
        fs::write("/etc/hostname", format!("{hostname}\n"))
            .map_err(|e| format!("write /etc/hostname: {e}"))?;
    }
    if let Some(id) = &cfg.machine_id {
        fs::write("/etc/machine-id", format!("{id}\n"))
            .map_err(|e| format!("write /etc/machine-id: {e}"))?;
    }
    if let Some(net) = &cfg.network {
        crate::net::configure(net).map_err(|e| format!("network: {e}"))?;
    }
    Ok(())
}

// From <linux/random.h>.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Credits host randomness to the kernel pool and reseeds the CRNG, so two machines restored
/// from one snapshot stop sharing a random stream.
fn add_entropy(bytes: &[u8]) -> Result<(), String> {
    let dev = fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")
        .map_err(|e| format!("open /dev/urandom: {e}"))?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = Vec::with_capacity(8 + bytes.len());
    info.extend_from_slice(&((bytes.len() * 8) as i32).to_ne_bytes());
    info.extend_from_slice(&(bytes.len() as i32).to_ne_bytes());
    info.extend_from_slice(bytes);
    // SAFETY: the buffer is a complete rand_pool_info of the size it declares.
    let rc = unsafe { libc::ioctl(dev.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) };
    if rc != 0 {
        return Err(format!(
            "RNDADDENTROPY: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    let rc = unsafe { libc::ioctl(dev.as_raw_fd(), RNDRESEEDCRNG) };
    if rc != 0 {
        return Err(format!(
            "RNDRESEEDCRNG: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

// From <linux/fs.h>: _IOWR('X', 119, int) and _IOWR('X', 120, int).
const FIFREEZE: libc::c_ulong = 0xC004_5877;
const FITHAW: libc::c_ulong = 0xC004_5878;

/// Freezes (after a sync) or thaws the root filesystem. Thawing a filesystem that is not frozen
/// answers EINVAL, which is what the caller wanted anyway.
pub fn freeze_root(freeze: bool) -> Result<(), String> {
    let root = fs::File::open("/").map_err(|e| format!("open /: {e}"))?;
    if freeze {
        nix::unistd::sync();
    }
    let req = if freeze { FIFREEZE } else { FITHAW };
    // SAFETY: FIFREEZE and FITHAW take an int argument that the kernel ignores.
    let rc = unsafe { libc::ioctl(root.as_raw_fd(), req, 0) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        if freeze || err.raw_os_error() != Some(libc::EINVAL) {
            return Err(format!(
                "{}: {err}",
                if freeze { "FIFREEZE" } else { "FITHAW" }
            ));
        }
    }
    Ok(())
}

/// Flushes and freezes the root before power-off, so the next boot finds a clean filesystem.
pub fn prepare_power_off() {
    nix::unistd::sync();
    let _ = mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None::<&str>,
    );
    nix::unistd::sync();
}

/// Ends the machine. On a vsock channel the VMM is Firecracker, which on x86 has no power-off
/// device: a halted guest would leave it running, but a reset (through the keyboard
/// controller, `reboot=k`) ends it. QEMU powers off through ACPI.
pub fn power_off(pid1: bool, vsock: bool) {
    if pid1 {
        // Give the reply a moment to leave the port before the machine goes away.
        std::thread::sleep(std::time::Duration::from_millis(50));
        let _ = reboot(if vsock {
            RebootMode::RB_AUTOBOOT
        } else {
            RebootMode::RB_POWER_OFF
        });
    }
}

#[cfg(test)]
mod tests {
    use super::newer;

    #[test]
    fn a_late_hello_of_the_same_handshake_does_not_set_the_clock_back() {
        let applied = Some(("n".to_string(), Some(200)));
        assert!(!newer(&applied, "n", Some(100)), "older, same handshake");
        assert!(!newer(&applied, "n", Some(200)), "the same hello again");
        assert!(newer(&applied, "n", Some(300)), "newer, same handshake");
        // Another handshake (a later restore of a snapshot, on a host whose clock is behind).
        assert!(newer(&applied, "m", Some(100)));
        assert!(newer(&None, "n", None));
    }
}
