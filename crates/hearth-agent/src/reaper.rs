//! Zombie reaping for PID 1, and exit statuses for the agent's own children.
//!
//! As PID 1 the agent inherits every orphan and must reap it. A reaper that calls `waitpid(-1)`
//! also collects the children `exec` started, so those statuses are handed over through a table:
//! `spawn` registers the child under the table's lock, so the reaper never sees a pid it can't
//! place.

use crate::threads;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;
use std::collections::HashMap;
use std::process::{Child, Command};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::Duration;

struct Table {
    waiters: HashMap<i32, Sender<WaitStatus>>,
    /// Bumped on every spawn, so a reaper that just found no children knows whether one came
    /// since it looked.
    generation: u64,
}

struct Reaper {
    table: Mutex<Table>,
    spawned: Condvar,
}

static REAPER: OnceLock<&'static Reaper> = OnceLock::new();

/// Starts reaping; without its thread, each child gets a waiting thread of its own.
pub fn start() {
    let reaper: &'static Reaper = Box::leak(Box::new(Reaper {
        table: Mutex::new(Table {
            waiters: HashMap::new(),
            generation: 0,
        }),
        spawned: Condvar::new(),
    }));
    // Reaping must go on whatever happens: a panic in a round starts the next one.
    let started = threads::helper("reaper", move || loop {
        let _ = std::panic::catch_unwind(|| reap(reaper));
    });
    match started {
        Ok(()) => {
            let _ = REAPER.set(reaper);
        }
        Err(e) => eprintln!("hearth-agent: cannot start the reaper: {e}"),
    }
}

/// Waits for one child (any) and hands its status over, or sleeps while there are none.
fn reap(reaper: &Reaper) {
    let seen = reaper
        .table
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .generation;
    match waitpid(Pid::from_raw(-1), None) {
        Ok(status) => {
            if let Some(pid) = status.pid() {
                let mut table = reaper.table.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(tx) = table.waiters.remove(&pid.as_raw()) {
                    let _ = tx.send(status);
                }
            }
        }
        Err(_) => {
            // No children: sleep until the agent spawns one. Orphans re-parented to us are
            // picked up on the timeout.
            let table = reaper.table.lock().unwrap_or_else(|e| e.into_inner());
            if table.generation == seen {
                let _ = reaper.spawned.wait_timeout(table, Duration::from_secs(1));
            }
        }
    }
}

/// A child whose exit status arrives on `status`.
pub struct Spawned {
    pub child: Child,
    pub status: Receiver<WaitStatus>,
}

/// Spawns `cmd`. When the reaper runs (PID 1) its status comes through the table; otherwise
/// (the agent run by hand, in tests) a thread waits for this one child.
pub fn spawn(cmd: &mut Command) -> std::io::Result<Spawned> {
    let (tx, rx) = channel();
    match REAPER.get() {
        Some(reaper) => {
            let mut table = reaper.table.lock().unwrap_or_else(|e| e.into_inner());
            let child = cmd.spawn()?;
            table.waiters.insert(child.id() as i32, tx);
            table.generation += 1;
            drop(table);
            reaper.spawned.notify_all();
            Ok(Spawned { child, status: rx })
        }
        None => {
            let mut child = cmd.spawn()?;
            let pid = Pid::from_raw(child.id() as i32);
            let waiter = threads::helper("exit-waiter", move || {
                if let Ok(status) = waitpid(pid, None) {
                    let _ = tx.send(status);
                }
            });
            if let Err(e) = waiter {
                // Nobody would collect its status: it must not run.
                let _ = child.kill();
                let _ = child.wait();
                return Err(e);
            }
            Ok(Spawned { child, status: rx })
        }
    }
}
