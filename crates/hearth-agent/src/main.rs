//! hearth-agent: PID 1 of the default guest image.
//!
//! It prepares the system (mounts, hostname, zombie reaping), then serves the host over the agent
//! channel: a virtio-serial port whose reads return EOF while no host is connected (so the agent
//! never treats EOF as the end: it waits and reads again), or on a machine without one, a vsock
//! listener whose every connection is a new host connection.

mod channel;
mod exec;
mod failure;
mod files;
mod net;
mod process;
mod reaper;
mod system;
mod threads;
mod users;
mod vsock;
mod workload;

use channel::Port;
use failure::Failure;
use hearth_proto::{Identity, Op, Reply, Request};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

fn main() {
    let pid1 = std::process::id() == 1;
    if pid1 {
        system::init();
        workload::init();
        reaper::start();
    }
    let port = Port::open_when_present();
    // PID 1 must never end, or the kernel ends with it: a panic in the channel's reader starts
    // it again (its decoder finds the next frame), after a pause should it fail at once again.
    loop {
        let port = port.clone();
        let _ = std::panic::catch_unwind(AssertUnwindSafe(|| {
            port.serve(identity, move |req, port| dispatch(req, port, pid1));
        }));
        eprintln!("hearth-agent: the channel's reader failed; reading again");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Each request runs on its own thread so a long exec never holds up a hello or a sync. PID 1
/// must not die when the guest is out of threads: the request fails instead.
fn dispatch(req: Request, port: Arc<Port>, pid1: bool) {
    let (id, spare) = (req.id, port.clone());
    if let Err(e) = std::thread::Builder::new()
        .name("request".into())
        .spawn(move || serve(req, &port, pid1))
    {
        spare.refuse(
            id,
            Failure::from(format!("the agent cannot start a thread: {e}")),
        );
    }
}

fn serve(req: Request, port: &Arc<Port>, pid1: bool) {
    let id = req.id;
    let power_off = matches!(req.op, Op::PowerOff);
    match guarded(|| handle(req.op, id, port)) {
        Ok(Some(body)) => port.reply(id, body),
        // The handler answered itself (a streaming reply).
        Ok(None) => {}
        Err(failure) => port.reply(id, failure.into_reply()),
    }
    if power_off {
        system::power_off(pid1, port.is_vsock());
    }
}

/// Runs a handler: one that panics fails its request, not the agent.
fn guarded<T>(handler: impl FnOnce() -> Result<T, Failure>) -> Result<T, Failure> {
    std::panic::catch_unwind(AssertUnwindSafe(handler)).unwrap_or_else(|panic| {
        let message = match panic.downcast_ref::<&str>() {
            Some(s) => s,
            None => panic
                .downcast_ref::<String>()
                .map_or("a panic", String::as_str),
        };
        Err(Failure::from(format!("the agent failed: {message}")))
    })
}

/// Runs one request; `None` when the handler already replied.
fn handle(op: Op, id: u64, port: &Arc<Port>) -> Result<Option<Reply>, Failure> {
    let reply = match op {
        Op::Hello { nonce, configure } => {
            if let Some(cfg) = &configure {
                system::configure_for_hello(&nonce, cfg)?;
            }
            Reply::Hello {
                nonce,
                identity: identity(),
            }
        }
        Op::Configure(cfg) => {
            system::configure(&cfg)?;
            Reply::Done
        }
        Op::Exec(req) => Reply::Exec(exec::run(req)?),
        Op::Sync => {
            nix::unistd::sync();
            Reply::Done
        }
        Op::Freeze => {
            system::freeze_root(true)?;
            Reply::Done
        }
        Op::Thaw => {
            system::freeze_root(false)?;
            Reply::Done
        }
        Op::PowerOff => {
            system::prepare_power_off();
            Reply::Done
        }
        Op::ProcessStart(req) => Reply::Process(process::start(req)?),
        Op::ProcessList => Reply::Processes {
            processes: process::list(),
        },
        Op::ProcessOutput(req) => Reply::Output(process::output(req)?),
        Op::ProcessStdin(req) => {
            process::stdin(req)?;
            Reply::Done
        }
        Op::ProcessSignal(req) => {
            process::signal(req)?;
            Reply::Done
        }
        Op::ProcessResize(req) => {
            process::resize(req)?;
            Reply::Done
        }
        Op::RawSource { bytes, path } => {
            channel::send_raw(port, id, bytes, &path)
                .map_err(|e| Failure::io("raw transfer", &e))?;
            return Ok(None);
        }
        Op::Files(req) => Reply::Files(files::op(&req)?),
        Op::Upload(req) => Reply::Written {
            bytes: files::upload(&req, &mut port.body(id))?,
        },
        Op::Download(req) => return files::serve_download(&req, id, port),
        Op::TarCreate(req) => return files::serve_tar_create(&req, id, port),
        Op::TarExtract(req) => {
            files::tar_extract(&req, &mut port.body(id))?;
            Reply::Done
        }
        Op::Watch(req) => return files::serve_watch(&req, id, port),
        // The channel's reader consumes these itself.
        Op::RawSink { .. } => Reply::Done,
    };
    Ok(Some(reply))
}

fn identity() -> Identity {
    let uts = nix::sys::utsname::uname().ok();
    let field = |f: fn(&nix::sys::utsname::UtsName) -> &std::ffi::OsStr| {
        uts.as_ref()
            .map(|u| f(u).to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    Identity {
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        kernel_release: field(|u| u.release()),
        hostname: field(|u| u.nodename()),
        features: vec![
            hearth_proto::FEATURE_CONFIGURE_THAW.to_string(),
            hearth_proto::FEATURE_HELLO_CONFIGURE.to_string(),
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_handler_that_panics_fails_its_request() {
        let failed = guarded::<()>(|| panic!("out of {}", "luck")).unwrap_err();
        assert_eq!(failed.message, "the agent failed: out of luck");
        let failed = guarded::<()>(|| panic!("static")).unwrap_err();
        assert_eq!(failed.message, "the agent failed: static");
        assert_eq!(guarded(|| Ok(7)), Ok(7));
    }
}
