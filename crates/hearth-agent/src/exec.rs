//! Running a command for the host: captured output with a cap, a timeout that kills everything
//! the command started, and the exit status from the reaper.

use crate::workload::{self, Cell};
use crate::{reaper, threads, users};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hearth_proto::{ExecReply, ExecRequest};
use nix::sys::signal::{killpg, Signal};
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// The PATH commands start with, unless the request sets one.
pub(crate) const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// After the command exits, how long its output pipes may stay open (held by a background
/// process it left behind) before the agent replies with what it has.
pub(crate) const DRAIN_GRACE: Duration = Duration::from_millis(200);
/// When nothing the command started is left, its pipes end as soon as they are read: only a
/// reader starved of CPU for this long (a guest flooded with work) gives up.
const DRAIN_LIMIT: Duration = Duration::from_secs(10);

/// How long, once a command has exited, to wait for the end of its output: the grace while
/// what it left behind still runs (and may hold its pipes), else until the readers are done.
pub(crate) fn drain_wait(cell: Option<&Cell>) -> Duration {
    match cell.map(Cell::populated) {
        Some(Ok(false)) => DRAIN_LIMIT,
        _ => DRAIN_GRACE,
    }
}

pub fn run(req: ExecRequest) -> Result<ExecReply, String> {
    let Some((program, args)) = req.command.split_first() else {
        return Err("command is empty".into());
    };
    let stdin = match &req.stdin_base64 {
        Some(b) => Some(B64.decode(b).map_err(|e| format!("stdin_base64: {e}"))?),
        None => None,
    };
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_clear()
        .env("PATH", PATH)
        .env("HOME", "/root")
        .envs(&req.env)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so a timeout kills what it started too.
        .process_group(0);
    if let Some(cwd) = &req.cwd {
        cmd.current_dir(cwd);
    }
    let user = req.user.as_deref().map(users::lookup).transpose()?;
    if let Some(user) = &user {
        cmd.env("HOME", &user.home);
    }
    let cell = workload::confine(&mut cmd, user.as_ref())
        .map_err(|e| format!("cannot prepare the command: {e}"))?;

    let started = Instant::now();
    let mut spawned = match reaper::spawn(&mut cmd) {
        Ok(s) => s,
        // What a shell does: status 127 and the reason on stderr.
        Err(e) => {
            return Ok(ExecReply {
                exit_code: 127,
                stderr_base64: B64.encode(format!("hearth-agent: {program}: {e}\n")),
                duration_ms: started.elapsed().as_millis() as u64,
                ..Default::default()
            })
        }
    };
    let pgid = Pid::from_raw(spawned.child.id() as i32);
    let kill = || {
        let _ = killpg(pgid, Signal::SIGKILL);
        if let Some(cell) = &cell {
            let _ = cell.kill();
        }
    };
    let (stdout, stderr, stdin_pipe) = (
        spawned.child.stdout.take(),
        spawned.child.stderr.take(),
        spawned.child.stdin.take(),
    );
    let helpers = (|| {
        let out = capture(stdout, req.output_limit)?;
        let err = capture(stderr, req.output_limit)?;
        if let (Some(data), Some(mut pipe)) = (stdin, stdin_pipe) {
            threads::helper("exec-stdin", move || {
                let _ = pipe.write_all(&data);
            })?;
        }
        Ok::<_, std::io::Error>((out, err))
    })();
    let (out, err) = match helpers {
        Ok(receivers) => receivers,
        Err(e) => {
            kill();
            let _ = spawned.status.recv();
            return Err(format!("the agent cannot start a thread: {e}"));
        }
    };

    let mut timed_out = false;
    let status = match req.timeout_ms {
        Some(ms) => match spawned.status.recv_timeout(Duration::from_millis(ms)) {
            Ok(s) => Some(s),
            Err(RecvTimeoutError::Timeout) => {
                timed_out = true;
                kill();
                spawned.status.recv().ok()
            }
            Err(RecvTimeoutError::Disconnected) => None,
        },
        None => spawned.status.recv().ok(),
    };
    let (exit_code, signal) = match status {
        Some(WaitStatus::Exited(_, code)) => (code, None),
        Some(WaitStatus::Signaled(_, sig, _)) => (128 + sig as i32, Some(sig as i32)),
        _ => return Err("lost the command's exit status".into()),
    };
    let deadline = Instant::now() + drain_wait(cell.as_ref());
    let (stdout, stdout_truncated) = collect(&out, deadline);
    let (stderr, stderr_truncated) = collect(&err, deadline);
    Ok(ExecReply {
        exit_code,
        signal,
        stdout_base64: B64.encode(stdout),
        stderr_base64: B64.encode(stderr),
        stdout_truncated,
        stderr_truncated,
        timed_out,
        duration_ms: started.elapsed().as_millis() as u64,
    })
}

type Captured = (Vec<u8>, bool);

/// Reads a pipe to its end on a thread, keeping at most `limit` bytes (and draining the rest so
/// the writer never blocks).
fn capture(
    pipe: Option<impl Read + Send + 'static>,
    limit: usize,
) -> std::io::Result<Receiver<Captured>> {
    let (tx, rx) = channel();
    threads::helper("exec-output", move || {
        let mut kept = Vec::new();
        let mut truncated = false;
        if let Some(mut pipe) = pipe {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match pipe.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let room = limit.saturating_sub(kept.len());
                        kept.extend_from_slice(&buf[..n.min(room)]);
                        truncated |= n > room;
                    }
                }
            }
        }
        let _ = tx.send((kept, truncated));
    })?;
    Ok(rx)
}

fn collect(rx: &Receiver<Captured>, deadline: Instant) -> Captured {
    let wait = deadline.saturating_duration_since(Instant::now());
    rx.recv_timeout(wait).unwrap_or_default()
}
