//! How a process is set up: its command, environment, user, and optionally a pseudo-terminal.

use crate::exec;
use crate::failure::Failure;
use crate::users::User;
use crate::workload::{self, Cell};
use hearth_proto::process::{PtySize, StartProcess};
use hearth_proto::ErrorKind;
use nix::fcntl::OFlag;
use nix::pty::{grantpt, posix_openpt, ptsname_r, unlockpt, PtyMaster};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

/// A terminal for a process: the agent keeps the master, the process gets the slave.
pub struct Pty {
    pub master: PtyMaster,
    pub slave: File,
}

/// Opens a pseudo-terminal of `size`, its slave owned by `user` as a login's would be. Both ends
/// are close-on-exec, so no other child inherits them (a stray copy of the slave would keep the
/// master from ever seeing the end).
pub fn open_pty(size: PtySize, user: Option<&User>) -> Result<Pty, Failure> {
    let fail = |e: nix::Error| Failure::new(ErrorKind::Failed, format!("cannot open a pty: {e}"));
    let master = posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC).map_err(fail)?;
    grantpt(&master).map_err(fail)?;
    unlockpt(&master).map_err(fail)?;
    let name = ptsname_r(&master).map_err(fail)?;
    let slave = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(&name)
        .map_err(|e| Failure::io(format!("cannot open the pty {name}"), &e))?;
    if let Some(user) = user {
        std::os::unix::fs::fchown(&slave, Some(user.uid), Some(user.gid))
            .map_err(|e| Failure::io(format!("cannot give {name} to the user"), &e))?;
    }
    set_size(&master, size).map_err(|e| Failure::io("cannot size the pty", &e))?;
    Ok(Pty { master, slave })
}

/// Sets a terminal's window size; the kernel sends SIGWINCH to its foreground process group.
pub fn set_size(master: &PtyMaster, size: PtySize) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from the pointer, which outlives the call.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The command for `req`, with the same base environment as exec (then the request's on top),
/// confined as exec's are (its cell comes with it). Without a pty it gets its own process group;
/// with one, its own session with the terminal as its controlling terminal. Either way a signal
/// to the group reaches what it started.
pub fn command(
    req: &StartProcess,
    user: Option<&User>,
    pty: Option<&Pty>,
) -> io::Result<(Command, Option<Cell>)> {
    let (program, args) = req
        .command
        .split_first()
        .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_clear()
        .env("PATH", exec::PATH)
        .env("HOME", user.map_or("/root", |u| u.home.as_str()));
    if pty.is_some() {
        cmd.env("TERM", "xterm-256color");
    }
    cmd.envs(&req.env);
    if let Some(cwd) = &req.cwd {
        cmd.current_dir(cwd);
    }
    // First, so that the child is in its cell and is the user before anything below.
    let cell = workload::confine(&mut cmd, user)?;
    match pty {
        Some(pty) => {
            cmd.stdin(Stdio::from(pty.slave.try_clone()?))
                .stdout(Stdio::from(pty.slave.try_clone()?))
                .stderr(Stdio::from(pty.slave.try_clone()?));
            // SAFETY: only async-signal-safe calls between fork and exec.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        None => {
            cmd.stdin(if req.stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        }
    }
    Ok((cmd, cell))
}
