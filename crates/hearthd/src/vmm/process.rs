//! VMM processes run in sessions of their own and outlive the daemon that started them (and
//! are not a restarted daemon's children). They are tracked by pid plus start time: a pid alone
//! could be reused.

use super::user::VmmUser;
use crate::cgroup::Cgroup;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::os::fd::{OwnedFd, RawFd};
use std::path::Path;
use std::time::{Duration, Instant};
use tokio::process::Command;

/// What a VMM's process is confined to, set up in the child between fork and exec (a sandboxed
/// VMM can do none of it itself).
#[derive(Default)]
pub struct Confinement {
    /// The machine's network namespace, entered.
    pub netns: Option<OwnedFd>,
    /// The machine's cgroup, joined before anything runs.
    pub cgroup: Option<Cgroup>,
    /// Descriptors the VMM inherits: their close-on-exec flag is cleared.
    pub inherit: Vec<RawFd>,
    /// Whom it runs as, taken last; `None` keeps the daemon's user.
    pub user: Option<VmmUser>,
}

impl Confinement {
    /// Has `cmd`'s child take the confinement. It also gets a session of its own: no signal for
    /// the daemon's terminal or group reaches it, and it outlives the daemon.
    pub fn apply(self, cmd: &mut Command) {
        let Confinement {
            netns,
            cgroup,
            inherit,
            user,
        } = self;
        // SAFETY: the closure runs in the forked child before exec; it allocates nothing and
        // makes only system calls.
        unsafe {
            cmd.pre_exec(move || {
                nix::unistd::setsid()?;
                if let Some(ns) = &netns {
                    nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)?;
                }
                if let Some(cgroup) = &cgroup {
                    cgroup.join_self()?;
                }
                for &fd in &inherit {
                    if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if let Some(user) = &user {
                    nix::unistd::setgroups(&user.groups)?;
                    nix::unistd::setgid(user.gid)?;
                    nix::unistd::setuid(user.uid)?;
                }
                Ok(())
            });
        }
    }
}

/// A VMM process. The start time (from /proc) tells a live process from a later one that
/// reused its pid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmProcess {
    pub pid: i32,
    pub start_time: u64,
}

/// The start time (clock ticks since boot, field 22 of /proc/PID/stat) and state of a process.
fn stat(pid: i32) -> Option<(u64, char)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces; fields follow the last ')'.
    let rest = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((start, state))
}

pub fn record(pid: i32) -> Option<VmProcess> {
    stat(pid).map(|(start_time, _)| VmProcess { pid, start_time })
}

/// The recorded process still runs (a zombie counts as gone).
pub fn is_alive(p: &VmProcess) -> bool {
    matches!(stat(p.pid), Some((start, state)) if start == p.start_time && state != 'Z' && state != 'X')
}

/// The live process named by `pidfile` (a pid and a start time), or, in a pid file of QEMU's
/// own (a pid alone, as VMMs started by earlier daemons wrote), a live process whose command
/// line mentions `dir`: a VMM of ours, not a process that reused the pid.
pub fn vmm_of(dir: &Path, pidfile: &Path) -> Option<VmProcess> {
    let text = std::fs::read_to_string(pidfile).ok()?;
    let mut fields = text.split_whitespace();
    let pid: i32 = fields.next()?.parse().ok()?;
    if let Some(start_time) = fields.next() {
        let p = VmProcess {
            pid,
            start_time: start_time.parse().ok()?,
        };
        return is_alive(&p).then_some(p);
    }
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let needle = dir.as_os_str().as_encoded_bytes();
    let ours = !needle.is_empty() && cmdline.windows(needle.len()).any(|w| w == needle);
    record(pid).filter(|p| ours && is_alive(p))
}

/// Kills the VMM that `pidfile` in `dir` names, if it still runs.
pub async fn kill_vmm_of(dir: &Path, pidfile: &Path) {
    if let Some(p) = vmm_of(dir, pidfile) {
        tracing::info!(pid = p.pid, "killing a VMM found by its pid file");
        kill_and_wait(&p).await;
    }
}

/// SIGKILLs the process and waits until it is gone.
pub async fn kill_and_wait(p: &VmProcess) {
    if is_alive(p) {
        let _ = kill(Pid::from_raw(p.pid), Signal::SIGKILL);
    }
    wait_gone(p, Duration::from_secs(10)).await;
}

/// Waits up to `limit` for the process to end; true when it did.
pub async fn wait_gone(p: &VmProcess, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while is_alive(p) {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tracks_a_process_until_killed() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let rec = record(child.id() as i32).unwrap();
        assert!(is_alive(&rec));
        let reused = VmProcess {
            start_time: rec.start_time + 1,
            ..rec
        };
        assert!(!is_alive(&reused));
        let waiter = std::thread::spawn(move || child.wait());
        kill_and_wait(&rec).await;
        assert!(!is_alive(&rec));
        waiter.join().unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_pid_file_names_its_process_by_pid_and_start_time() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let rec = record(child.id() as i32).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("vmm.pid");
        std::fs::write(&pidfile, format!("{} {}\n", rec.pid, rec.start_time)).unwrap();
        assert_eq!(vmm_of(dir.path(), &pidfile), Some(rec));
        // The pid reused by another process: not ours.
        std::fs::write(&pidfile, format!("{} {}\n", rec.pid, rec.start_time + 1)).unwrap();
        assert_eq!(vmm_of(dir.path(), &pidfile), None);
        // A pid alone names a process whose command line mentions the directory; sleep's does not.
        std::fs::write(&pidfile, format!("{}\n", rec.pid)).unwrap();
        assert_eq!(vmm_of(dir.path(), &pidfile), None);
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
