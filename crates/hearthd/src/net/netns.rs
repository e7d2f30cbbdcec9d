//! Named network namespaces, as `ip netns` keeps them (a file under `/run/netns` with the
//! namespace bind-mounted on it), made and entered from threads of their own: a thread can
//! change namespace alone, so the daemon never forks to do it.

use crate::error::{Error, Result};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};
use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

pub const NETNS_DIR: &str = "/run/netns";

pub fn path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// Creates namespace `name`; an existing one is an error.
pub fn create(name: &str) -> Result<()> {
    std::fs::create_dir_all(NETNS_DIR)?;
    let target = path(name);
    File::options()
        .write(true)
        .create_new(true)
        .open(&target)
        .map_err(|e| Error::internal(format!("creating {}: {e}", target.display())))?;
    let made = std::thread::spawn({
        let target = target.clone();
        move || -> Result<()> {
            unshare(CloneFlags::CLONE_NEWNET)
                .map_err(|e| Error::internal(format!("unshare(CLONE_NEWNET): {e}")))?;
            // A new namespace copies the host's forwarding setting: off until its rules exist.
            set_forwarding(false)?;
            mount(
                Some("/proc/thread-self/ns/net"),
                &target,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(|e| Error::internal(format!("bind-mounting {}: {e}", target.display())))
        }
    })
    .join()
    .map_err(|_| Error::internal("the namespace thread panicked"))?;
    if made.is_err() {
        let _ = std::fs::remove_file(&target);
    }
    made
}

/// Removes namespace `name`: its links go with it once no process runs in it. A missing one is
/// already removed.
pub fn delete(name: &str) -> Result<()> {
    let target = path(name);
    match umount2(&target, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
        Err(e) => {
            return Err(Error::internal(format!(
                "unmounting {}: {e}",
                target.display()
            )))
        }
    }
    match std::fs::remove_file(&target) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::internal(format!(
            "removing {}: {e}",
            target.display()
        ))),
        _ => Ok(()),
    }
}

/// Names of the namespaces under `/run/netns` that start with `prefix`.
pub fn list(prefix: &str) -> Vec<String> {
    std::fs::read_dir(NETNS_DIR)
        .map(|it| {
            it.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default()
}

/// Runs `f` on a thread that has entered namespace `name`. Sockets `f` opens stay in that
/// namespace after the thread is gone.
pub fn run_in<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    run_at(&path(name), f)
}

/// [`run_in`] for the namespace bound at `ns`.
pub fn run_at<T: Send + 'static>(
    ns: &Path,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let file = File::open(ns)
        .map_err(|e| Error::internal(format!("network namespace {}: {e}", ns.display())))?;
    std::thread::spawn(move || {
        setns(file.as_fd(), CloneFlags::CLONE_NEWNET)
            .map_err(|e| Error::internal(format!("entering a network namespace: {e}")))?;
        f()
    })
    .join()
    .map_err(|_| Error::internal("the namespace thread panicked"))?
}

/// Turns IPv4 forwarding on or off in the calling thread's namespace.
pub fn set_forwarding(on: bool) -> Result<()> {
    std::fs::write("/proc/sys/net/ipv4/ip_forward", if on { "1" } else { "0" })
        .map_err(|e| Error::internal(format!("setting forwarding in a namespace: {e}")))
}

/// Whether the calling thread's namespace forwards.
pub fn forwarding() -> bool {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").is_ok_and(|v| v.trim() == "1")
}
