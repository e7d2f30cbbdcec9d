//! Processes in a machine: `exec` (buffered, streamed, in the background or attached), `ps`,
//! `logs` and `kill`.

use crate::terminal::{self, RawMode};
use crate::{output, Ctx};
use anyhow::{bail, Context, Result};
use base64::Engine;
use clap::Args;
use futures_util::StreamExt;
use hearth_api::client::AttachEvent;
use hearth_api::{
    signal_name, AttachControl, ExecRequest, OutputEvent, OutputStream, ProcessInfo, PtySize,
    SignalName, StartProcess,
};
use std::collections::BTreeMap;
use std::io::{IsTerminal, Read, Write};
use std::process::ExitCode;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

#[derive(Args)]
pub struct ExecArgs {
    pub name: String,
    /// Start in the background and print the pid (with --json, the process).
    #[arg(long, short = 'd')]
    pub detach: bool,
    /// Pass this terminal's stdin to the command as it is typed (with --json or --timeout:
    /// read it whole first).
    #[arg(long, short = 'i')]
    pub interactive: bool,
    /// Run the command on a pseudo-terminal the size of this one.
    #[arg(long, short = 't')]
    pub tty: bool,
    /// A name to find the process by (`ps`, `logs`, `kill`).
    #[arg(long, conflicts_with = "timeout")]
    pub tag: Option<String>,
    /// Kill the command after this many seconds (buffered exec: the output comes at the end).
    #[arg(long, conflicts_with_all = ["detach", "tty"])]
    pub timeout: Option<f64>,
    #[arg(long, short = 'w', visible_alias = "workdir")]
    pub cwd: Option<String>,
    /// KEY=VALUE, repeatable.
    #[arg(long = "env", short = 'e')]
    pub env: Vec<String>,
    #[arg(long, short = 'u')]
    pub user: Option<String>,
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

fn exit_code(code: i32) -> ExitCode {
    ExitCode::from(code.clamp(0, 255) as u8)
}

pub async fn exec(ctx: &Ctx, args: ExecArgs) -> Result<ExitCode> {
    let mut env = BTreeMap::new();
    for kv in &args.env {
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("--env {kv:?}: want KEY=VALUE"))?;
        env.insert(k.to_string(), v.to_string());
    }
    if !args.detach && (ctx.json || args.timeout.is_some()) {
        if args.tty {
            bail!("-t needs a streamed exec: leave out --json");
        }
        return buffered(ctx, args, env).await;
    }
    let pty = args
        .tty
        .then(|| terminal::size().unwrap_or(PtySize { cols: 80, rows: 24 }));
    let start = StartProcess {
        command: args.command,
        env,
        cwd: args.cwd,
        user: args.user,
        tag: args.tag,
        stdin: args.interactive,
        pty,
    };
    let p = ctx.client.start_process(&args.name, &start).await?;
    if args.detach {
        if ctx.json {
            output::print_json(&p);
        } else {
            println!("{}", p.pid);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let pid = p.pid.to_string();
    if args.interactive || args.tty {
        let res = attached(ctx, &args.name, &pid, args.interactive, args.tty).await;
        if res.is_err() {
            // Nobody is left to talk to the process: do not leave it waiting on its stdin.
            let kill = SignalName::Name("KILL".into());
            let _ = ctx.client.signal_process(&args.name, &pid, kill).await;
        }
        return res;
    }
    match follow(ctx, &args.name, &pid, true, true).await? {
        Some(code) => Ok(exit_code(code)),
        None => bail!("the output of process {pid} ended before it exited"),
    }
}

/// `POST /exec`: the command runs to completion and its output comes back at once.
async fn buffered(ctx: &Ctx, args: ExecArgs, env: BTreeMap<String, String>) -> Result<ExitCode> {
    let stdin_base64 = if args.interactive {
        let mut buf = Vec::new();
        std::io::stdin().read_to_end(&mut buf)?;
        Some(base64::engine::general_purpose::STANDARD.encode(buf))
    } else {
        None
    };
    let req = ExecRequest {
        command: args.command,
        cwd: args.cwd,
        env: (!env.is_empty()).then_some(env),
        timeout_ms: args.timeout.map(|s| (s * 1000.0) as u64),
        user: args.user,
        stdin_base64,
        max_output_bytes: None,
    };
    let r = ctx.client.exec(&args.name, &req).await?;
    if ctx.json {
        output::print_json(&r);
    } else {
        std::io::stdout().write_all(r.stdout.as_bytes())?;
        std::io::stderr().write_all(r.stderr.as_bytes())?;
        if r.stdout_truncated || r.stderr_truncated {
            eprintln!("hearth: output was truncated");
        }
        if r.timed_out {
            eprintln!("hearth: command timed out and was killed");
        }
    }
    Ok(exit_code(r.exit_code))
}

/// Writes output where it belongs: stderr to stderr, stdout and a terminal to stdout.
fn write_output(stream: OutputStream, data: &[u8]) -> std::io::Result<()> {
    match stream {
        OutputStream::Stderr => {
            let mut err = std::io::stderr().lock();
            err.write_all(data)?;
            err.flush()
        }
        OutputStream::Stdout | OutputStream::Pty => {
            let mut out = std::io::stdout().lock();
            out.write_all(data)?;
            out.flush()
        }
    }
}

/// Prints a process's output from its start; with `follow`, until it exits, and then returns
/// its exit status. With `interrupt`, Ctrl-C sends SIGINT to the process and the output goes on.
async fn follow(
    ctx: &Ctx,
    machine: &str,
    process: &str,
    follow: bool,
    interrupt: bool,
) -> Result<Option<i32>> {
    let mut events = ctx
        .client
        .process_output(machine, process, 0, follow)
        .await?;
    let mut sigint = if interrupt {
        Some(signal(SignalKind::interrupt())?)
    } else {
        None
    };
    loop {
        tokio::select! {
            event = events.next() => match event.transpose()? {
                None => return Ok(None),
                Some(OutputEvent::Dropped { from, to }) => {
                    eprintln!("hearth: {} bytes of output dropped (offsets {from} to {to})", to - from);
                }
                Some(OutputEvent::Exit { exit_code, .. }) => return Ok(Some(exit_code)),
                Some(event @ OutputEvent::Output { stream, .. }) => {
                    let data = event.data().context("bad output from hearthd")?;
                    write_output(stream, &data)?;
                }
            },
            Some(()) = async { sigint.as_mut()?.recv().await } => {
                ctx.client
                    .signal_process(machine, process, SignalName::Name("INT".into()))
                    .await?;
            }
        }
    }
}

/// Reads stdin on a thread of its own (a read of a terminal cannot be cancelled, and must not
/// hold up the exit); the channel closes at end of file.
fn stdin_reader() -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel(16);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if tx.blocking_send(buf[..n].to_vec()).is_err() {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    });
    rx
}

/// `exec -i` / `-t`: attached over a WebSocket, stdin and window size forwarded, until the
/// process exits; its exit status is returned.
async fn attached(
    ctx: &Ctx,
    machine: &str,
    process: &str,
    interactive: bool,
    tty: bool,
) -> Result<ExitCode> {
    let mut attach = ctx.client.attach(machine, process, 0).await?;
    // Raw only when keys are forwarded to a pty: then Ctrl-C and the rest are the guest's.
    let raw = if tty && interactive && std::io::stdin().is_terminal() {
        Some(RawMode::enable()?)
    } else {
        None
    };
    // In raw mode the terminal no longer turns \n into \r\n for our own messages.
    let nl = if raw.is_some() { "\r\n" } else { "\n" };
    let mut stdin = interactive.then(stdin_reader);
    let mut winch = signal(SignalKind::window_change())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let code = loop {
        tokio::select! {
            event = attach.next_event() => match event? {
                Some(AttachEvent::Output { stream, data }) => write_output(stream, &data)?,
                Some(AttachEvent::Dropped { from, to }) => {
                    eprint!("hearth: {} bytes of output dropped{nl}", to - from);
                }
                Some(AttachEvent::Exit { exit_code, .. }) => break exit_code,
                None => bail!("hearthd closed the connection before process {process} exited"),
            },
            input = async { stdin.as_mut()?.recv().await.or(Some(Vec::new())) }, if stdin.is_some() => {
                match input {
                    Some(data) if !data.is_empty() => attach.send_stdin(data).await?,
                    _ => {
                        stdin = None;
                        attach.send_control(&AttachControl::CloseStdin).await?;
                    }
                }
            }
            _ = winch.recv(), if tty => {
                if let Some(PtySize { cols, rows }) = terminal::size() {
                    attach.send_control(&AttachControl::Resize { cols, rows }).await?;
                }
            }
            _ = sigint.recv() => {
                let signal = SignalName::Name("INT".into());
                attach.send_control(&AttachControl::Signal { signal }).await?;
            }
            // Hung up or told to stop: detach (the process runs on) and restore the terminal.
            _ = sigterm.recv() => break 128 + libc::SIGTERM,
            _ = sighup.recv() => break 128 + libc::SIGHUP,
        }
    };
    drop(raw);
    Ok(exit_code(code))
}

/// STATUS of `ps`: running, exited N, or killed by SIGNAL.
fn status(p: &ProcessInfo) -> String {
    if p.running {
        return "running".into();
    }
    match (p.signal, p.exit_code) {
        (Some(sig), _) => match signal_name(sig) {
            Some(name) => format!("killed by SIG{name}"),
            None => format!("killed by signal {sig}"),
        },
        (None, Some(code)) => format!("exited {code}"),
        (None, None) => "exited".into(),
    }
}

pub async fn ps(ctx: &Ctx, machine: &str) -> Result<()> {
    let list = ctx.client.list_processes(machine).await?;
    if ctx.json {
        output::print_json(&list);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|p| {
            let started = chrono::DateTime::from_timestamp_millis(p.started_unix_ms as i64)
                .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
                .unwrap_or_default();
            vec![
                p.pid.to_string(),
                p.tag.clone().unwrap_or_default(),
                status(p),
                started,
                p.command.join(" "),
            ]
        })
        .collect();
    output::table(&["PID", "TAG", "STATUS", "STARTED", "COMMAND"], &rows);
    Ok(())
}

pub async fn logs(ctx: &Ctx, machine: &str, process: &str, follow_output: bool) -> Result<()> {
    follow(ctx, machine, process, follow_output, false).await?;
    Ok(())
}

pub async fn kill(ctx: &Ctx, machine: &str, process: &str, sig: &str) -> Result<()> {
    let signal = match sig.parse::<i32>() {
        Ok(n) => SignalName::Number(n),
        Err(_) => SignalName::Name(sig.to_string()),
    };
    signal.number().map_err(anyhow::Error::msg)?;
    ctx.client.signal_process(machine, process, signal).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses() {
        let mut p = ProcessInfo {
            running: true,
            ..Default::default()
        };
        assert_eq!(status(&p), "running");
        p.running = false;
        p.exit_code = Some(3);
        assert_eq!(status(&p), "exited 3");
        p.exit_code = Some(143);
        p.signal = Some(15);
        assert_eq!(status(&p), "killed by SIGTERM");
    }
}
