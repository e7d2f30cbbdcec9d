//! The guest's workload, kept where it cannot take the agent down: every process the agent
//! starts (exec and the process API) runs in a cgroup of its own, a cell, under
//! `/sys/fs/cgroup/workload`, whose limits leave the agent (PID 1, in the root cgroup) the
//! memory and the tasks it needs. A fork bomb meets the workload's `pids.max` and a memory hog its
//! `memory.max` (the kernel OOM-kills inside it); the agent, which forks in the root cgroup and
//! moves each child into its cell before it runs anything, can still start commands meanwhile.
//! With the cpu controller the workload weighs as much as one of the agent's threads and each
//! cell in it as much as another, so the agent and a command the host runs get their share
//! beside a thousand forks. A cell also makes a timeout complete: `cgroup.kill` ends everything
//! the command started, even what left its process group.

use crate::users::User;
use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// Memory the workload leaves the agent and the kernel: the agent's threads, buffers and
/// binary, the kernel's own allocations and enough page cache to keep running.
const MEMORY_RESERVE: u64 = 48 << 20;
/// The part of the tasks the kernel can make (threads-max, pid_max) kept out of the workload's
/// reach, for the agent's threads and the kernel's.
const TASKS_RESERVE_DIVISOR: u64 = 4;
const MIN_TASKS_RESERVE: u64 = 64;

/// The agent lowered its own OOM score, which every child inherits: each one puts it back.
static PROTECTED: AtomicBool = AtomicBool::new(false);
static WORKLOAD: OnceLock<Workload> = OnceLock::new();

struct Workload {
    dir: PathBuf,
    next: AtomicU64,
    /// Cells whose command left processes behind: removed once those are gone.
    leftover: Mutex<Vec<PathBuf>>,
}

/// What the workload may use in all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub memory_bytes: u64,
    pub pids: u64,
}

impl Limits {
    /// From the guest's RAM (`MemTotal`) and the kernel's task limits.
    pub fn of(mem_total: u64, threads_max: u64, pid_max: u64) -> Limits {
        // A guest too small for the reserve still gives its workload half of what it has.
        let memory_bytes = mem_total.saturating_sub(MEMORY_RESERVE).max(mem_total / 2);
        let tasks = threads_max.min(pid_max);
        let reserve = (tasks / TASKS_RESERVE_DIVISOR).max(MIN_TASKS_RESERVE);
        Limits {
            memory_bytes,
            pids: tasks.saturating_sub(reserve).max(1),
        }
    }
}

/// Sets up PID 1's protection and the workload's cgroup (cgroup2 is mounted by
/// `system::init`). Without cgroups (a kernel built without them) commands run unconfined.
pub fn init() {
    match fs::write("/proc/self/oom_score_adj", "-1000") {
        Ok(()) => PROTECTED.store(true, Ordering::Relaxed),
        Err(e) => eprintln!("hearth-agent: oom_score_adj: {e}"),
    }
    match create(Path::new(CGROUP_ROOT)) {
        Ok((workload, limits)) => {
            eprintln!(
                "hearth-agent: workload cgroup: memory.max {} MiB, pids.max {}",
                limits.memory_bytes >> 20,
                limits.pids
            );
            let _ = WORKLOAD.set(workload);
        }
        Err(e) => eprintln!("hearth-agent: no workload cgroup, commands run unconfined: {e}"),
    }
}

fn create(root: &Path) -> io::Result<(Workload, Limits)> {
    let available = fs::read_to_string(root.join("cgroup.controllers"))?;
    let has = |c: &str| available.split_whitespace().any(|a| a == c);
    for needed in ["memory", "pids"] {
        if !has(needed) {
            return Err(io::Error::other(format!("no {needed} controller")));
        }
    }
    // The cpu controller only shares the CPU more fairly: the workload runs without it.
    let controllers: Vec<&str> = ["memory", "pids", "cpu"]
        .into_iter()
        .filter(|c| has(c))
        .collect();
    let dir = root.join("workload");
    enable(root, &controllers)?;
    match fs::create_dir(&dir) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
        _ => {}
    }
    let limits = Limits::of(
        meminfo_total()?,
        read_number("/proc/sys/kernel/threads-max")?,
        read_number("/proc/sys/kernel/pid_max")?,
    );
    fs::write(dir.join("memory.max"), limits.memory_bytes.to_string())?;
    fs::write(dir.join("pids.max"), limits.pids.to_string())?;
    enable(&dir, &controllers)?;
    let workload = Workload {
        dir,
        next: AtomicU64::new(0),
        leftover: Mutex::default(),
    };
    Ok((workload, limits))
}

/// Enables `controllers` for the children of cgroup `dir`; cpu may fail alone.
fn enable(dir: &Path, controllers: &[&str]) -> io::Result<()> {
    let control = dir.join("cgroup.subtree_control");
    for c in controllers {
        if let Err(e) = fs::write(&control, format!("+{c}")) {
            if *c != "cpu" {
                return Err(io::Error::new(
                    e.kind(),
                    format!("enable {c} in {}: {e}", dir.display()),
                ));
            }
            eprintln!("hearth-agent: no cpu controller in {}: {e}", dir.display());
        }
    }
    Ok(())
}

fn read_number(path: &str) -> io::Result<u64> {
    fs::read_to_string(path)?
        .trim()
        .parse()
        .map_err(|e| io::Error::other(format!("{path}: {e}")))
}

fn meminfo_total() -> io::Result<u64> {
    fs::read_to_string("/proc/meminfo")?
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .ok_or_else(|| io::Error::other("no MemTotal in /proc/meminfo"))
}

/// A command's cgroup: removed when dropped, or once its leftover processes are gone.
pub struct Cell {
    dir: PathBuf,
}

impl Cell {
    /// Kills every process in the cell at once, forks in flight included.
    pub fn kill(&self) -> io::Result<()> {
        fs::write(self.dir.join("cgroup.kill"), "1")
    }

    /// Whether a process still runs in the cell.
    pub fn populated(&self) -> io::Result<bool> {
        let events = fs::read_to_string(self.dir.join("cgroup.events"))?;
        Ok(events.lines().any(|l| l == "populated 1"))
    }
}

impl Drop for Cell {
    fn drop(&mut self) {
        if fs::remove_dir(&self.dir).is_err() {
            if let Some(w) = WORKLOAD.get() {
                lock(&w.leftover).push(std::mem::take(&mut self.dir));
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Prepares `cmd` to run confined: in a new cell (when the workload has a cgroup), with the
/// OOM score a process normally has, and as `user`. The child does all three itself, between
/// fork and exec, in that order (joining a cell and resetting the score need root): so nothing
/// it runs, not even its first fork, happens outside the cell. Keep the cell until the command
/// and what it started are gone.
pub fn confine(cmd: &mut Command, user: Option<&User>) -> io::Result<Option<Cell>> {
    let (cell, procs) = match WORKLOAD.get() {
        Some(w) => {
            let (cell, procs) = w.cell()?;
            (Some(cell), Some(procs))
        }
        None => (None, None),
    };
    let reset_oom = PROTECTED.load(Ordering::Relaxed);
    let ids = user.map(|u| (u.uid, u.gid));
    // SAFETY: the closure makes only async-signal-safe system calls on what it owns.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(procs) = &procs {
                // "0" is the writer itself.
                check(libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1))?;
            }
            if reset_oom {
                let fd = libc::open(
                    c"/proc/self/oom_score_adj".as_ptr(),
                    libc::O_WRONLY | libc::O_CLOEXEC,
                );
                check(fd as isize)?;
                let written = libc::write(fd, b"0".as_ptr().cast(), 1);
                libc::close(fd);
                check(written)?;
            }
            if let Some((uid, gid)) = ids {
                // As Command::uid does: no supplementary groups, then the group, then the user.
                if libc::getuid() == 0 {
                    check(libc::setgroups(0, std::ptr::null()) as isize)?;
                }
                check(libc::setgid(gid) as isize)?;
                check(libc::setuid(uid) as isize)?;
            }
            Ok(())
        });
    }
    Ok(cell)
}

/// A system call's result: negative is the error in errno.
fn check(rc: isize) -> io::Result<()> {
    match rc < 0 {
        true => Err(io::Error::last_os_error()),
        false => Ok(()),
    }
}

impl Workload {
    /// A new cell and its `cgroup.procs`, opened by the agent (a write is checked against the
    /// opener's credentials) and closed in the command it starts.
    fn cell(&self) -> io::Result<(Cell, File)> {
        lock(&self.leftover).retain(|dir| fs::remove_dir(dir).is_err());
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let dir = self.dir.join(n.to_string());
        fs::create_dir(&dir)
            .map_err(|e| io::Error::new(e.kind(), format!("cgroup {}: {e}", dir.display())))?;
        let cell = Cell { dir };
        let procs = File::options()
            .write(true)
            .open(cell.dir.join("cgroup.procs"))?;
        Ok((cell, procs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_leave_the_agent_its_reserve() {
        // A 256 MiB guest: its kernel counts about 220 MiB and allows about 1800 tasks.
        let l = Limits::of(220 << 20, 1800, 32768);
        assert_eq!(l.memory_bytes, (220 - 48) << 20);
        assert_eq!(l.pids, 1350);
        // A tiny guest keeps half its memory for the workload.
        assert_eq!(Limits::of(64 << 20, 400, 32768).memory_bytes, 32 << 20);
        assert_eq!(Limits::of(64 << 20, 100, 32768).pids, 36);
        // pid_max can be the tighter bound.
        assert_eq!(Limits::of(8 << 30, 60000, 4096).pids, 3072);
    }
}
