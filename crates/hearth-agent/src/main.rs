//! hearth-agent: PID 1 of the default guest image.
//!
//! It prepares the system (mounts, hostname, zombie reaping), then serves the host over the agent
//! channel. The channel is a virtio-serial port whose reads return EOF while no host is connected,
//! so the agent never treats EOF as the end: it waits and reads again.

mod channel;
mod exec;
mod net;
mod reaper;
mod system;

use hearth_proto::{GuestMessage, Identity, Op, Reply, Request};
use std::sync::Arc;

fn main() {
    let pid1 = std::process::id() == 1;
    if pid1 {
        system::init();
        reaper::start();
    }
    let port = channel::Port::open_when_present();
    port.send(&GuestMessage::Ready(identity()));
    port.serve(|req: Request, port: Arc<channel::Port>| {
        // Each request runs on its own thread so a long exec never holds up a hello or a sync.
        std::thread::spawn(move || {
            let after = match &req.op {
                Op::PowerOff => Some(()),
                _ => None,
            };
            let body = handle(req.op);
            port.send(&GuestMessage::Reply { id: req.id, body });
            if after.is_some() {
                system::power_off(pid1);
            }
        });
    });
}

fn handle(op: Op) -> Reply {
    match op {
        Op::Hello { nonce } => Reply::Hello {
            nonce,
            identity: identity(),
        },
        Op::Configure(cfg) => match system::configure(&cfg) {
            Ok(()) => Reply::Done,
            Err(message) => Reply::Error { message },
        },
        Op::Exec(req) => match exec::run(req) {
            Ok(reply) => Reply::Exec(reply),
            Err(message) => Reply::Error { message },
        },
        Op::Sync => {
            nix::unistd::sync();
            Reply::Done
        }
        Op::Freeze => match system::freeze_root(true) {
            Ok(()) => Reply::Done,
            Err(message) => Reply::Error { message },
        },
        Op::Thaw => match system::freeze_root(false) {
            Ok(()) => Reply::Done,
            Err(message) => Reply::Error { message },
        },
        Op::PowerOff => {
            system::prepare_power_off();
            Reply::Done
        }
    }
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
    }
}
