//! Processes that outlive the request that started them: the agent keeps a table of them, drains
//! their output into a bounded buffer that clients read from any offset, and takes stdin bytes,
//! signals and terminal sizes for them. Nothing here depends on the host's connection: a process
//! runs until it exits or is signalled, whoever reads its output.

mod buffer;
mod spawn;
#[cfg(test)]
mod tests;

use crate::exec::drain_wait;
use crate::failure::Failure;
use crate::workload::Cell;
use crate::{reaper, threads, users};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use buffer::OutputBuffer;
use hearth_proto::process::{
    Output, OutputChunk, OutputRequest, OutputStream, ProcessInfo, PtySize, ResizeRequest,
    SignalRequest, StartProcess, StdinRequest, EXITED_KEPT, MAX_OUTPUT_READ, OUTPUT_BUFFER,
};
use hearth_proto::ErrorKind;
use nix::pty::PtyMaster;
use nix::sys::signal::{killpg, Signal};
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;
use std::collections::{BTreeMap, VecDeque};
use std::io::{self, Read, Write};
use std::process::ChildStdin;
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How much one read of a pipe or terminal takes at most.
const READ_CHUNK: usize = 64 * 1024;
const MAX_TAG: usize = 64;
/// What a terminal reads as end of input (VEOF, ^D) at the start of a line.
const EOF_CHAR: u8 = 0x04;

pub fn start(req: StartProcess) -> Result<ProcessInfo, Failure> {
    global().start(req)
}

pub fn list() -> Vec<ProcessInfo> {
    global().list()
}

pub fn output(req: OutputRequest) -> Result<Output, Failure> {
    global().output(req)
}

pub fn stdin(req: StdinRequest) -> Result<(), Failure> {
    global().stdin(req)
}

pub fn signal(req: SignalRequest) -> Result<(), Failure> {
    global().signal(req)
}

pub fn resize(req: ResizeRequest) -> Result<(), Failure> {
    global().resize(req)
}

fn global() -> &'static Processes {
    static PROCESSES: OnceLock<Processes> = OnceLock::new();
    PROCESSES.get_or_init(Processes::default)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn conflict(message: impl Into<String>) -> Failure {
    Failure::new(ErrorKind::Conflict, message)
}

/// A table of processes (one for the agent; tests make their own).
#[derive(Default)]
pub struct Processes {
    table: Arc<Mutex<Table>>,
}

#[derive(Default)]
struct Table {
    next_seq: u64,
    /// By start order; a process stays here until its exit is reported.
    running: BTreeMap<u64, Arc<Proc>>,
    /// In the order they exited; the oldest go first past EXITED_KEPT.
    exited: VecDeque<Arc<Proc>>,
}

struct Proc {
    seq: u64,
    pid: u32,
    tag: Option<String>,
    command: Vec<String>,
    pty: Option<Arc<PtyMaster>>,
    started_unix_ms: u64,
    state: Mutex<State>,
    /// New output, the exit, the end of output.
    changed: Condvar,
    /// Held while writing, so writes from concurrent requests do not interleave; never while
    /// holding `state`'s lock, since a write may block as long as the process does not read.
    stdin: Mutex<Option<StdinSink>>,
}

enum StdinSink {
    Pipe(ChildStdin),
    Pty(Arc<PtyMaster>),
}

struct State {
    output: OutputBuffer,
    /// Reader threads not yet at the end of their pipe or terminal.
    readers: usize,
    /// The exit status has arrived: the process itself is gone.
    exit: Option<Exit>,
    /// Exited and its output complete (or the grace for output held open by what it left
    /// behind has passed): only now is it reported as exited, and no more output is kept.
    done: bool,
    stdin_open: bool,
}

struct Exit {
    code: Option<i32>,
    signal: Option<i32>,
    unix_ms: u64,
}

impl Proc {
    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn info(&self, state: &State) -> ProcessInfo {
        let exit = state.exit.as_ref().filter(|_| state.done);
        ProcessInfo {
            pid: self.pid,
            tag: self.tag.clone(),
            command: self.command.clone(),
            pty: self.pty.is_some(),
            stdin: state.stdin_open,
            running: !state.done,
            exit_code: exit.and_then(|e| e.code),
            signal: exit.and_then(|e| e.signal),
            started_unix_ms: self.started_unix_ms,
            ended_unix_ms: exit.map(|e| e.unix_ms),
            output_bytes: state.output.end(),
        }
    }

    fn gone(&self, state: &State) -> Result<(), Failure> {
        match state.exit {
            Some(_) => Err(conflict(format!("process {} has exited", self.pid))),
            None => Ok(()),
        }
    }
}

impl Processes {
    pub fn start(&self, req: StartProcess) -> Result<ProcessInfo, Failure> {
        let Some(program) = req.command.first() else {
            return Err(Failure::invalid("command is empty"));
        };
        if let Some(tag) = &req.tag {
            check_tag(tag)?;
        }
        if let Some((key, _)) = req
            .env
            .iter()
            .find(|(k, _)| k.is_empty() || k.contains(['=', '\0']))
        {
            return Err(Failure::invalid(format!(
                "bad environment variable name {key:?}"
            )));
        }
        if let Some(size) = req.pty {
            check_size(size)?;
        }
        let user = match &req.user {
            Some(name) => Some(users::lookup(name).map_err(Failure::invalid)?),
            None => None,
        };
        if let Some(cwd) = &req.cwd {
            match std::fs::metadata(cwd) {
                Ok(meta) if meta.is_dir() => {}
                Ok(_) => return Err(conflict(format!("cwd {cwd} is not a directory"))),
                Err(e) => return Err(Failure::io(format!("cwd {cwd}"), &e)),
            }
        }
        let pty = req
            .pty
            .map(|size| spawn::open_pty(size, user.as_ref()))
            .transpose()?;
        let (mut cmd, cell) = spawn::command(&req, user.as_ref(), pty.as_ref())
            .map_err(|e| Failure::io("cannot set up the process", &e))?;

        // Held from the tag check until the process is in the table, so two starts cannot take
        // the same tag, and its exit cannot be reported before it is listed.
        let mut table = lock(&self.table);
        if let Some(tag) = &req.tag {
            if table.running.values().any(|p| p.tag.as_ref() == Some(tag)) {
                return Err(conflict(format!("a running process has the tag {tag}")));
            }
        }
        let mut spawned = reaper::spawn(&mut cmd).map_err(|e| {
            Failure::new(ErrorKind::of_io(&e), format!("cannot start {program}: {e}"))
        })?;
        // Our copies of the slave close here, so the master reads its end when the process's
        // copies close.
        drop(cmd);
        let master = pty.map(|p| Arc::new(p.master));
        let mut sources: Vec<(Box<dyn Read + Send>, OutputStream)> = Vec::new();
        let sink = match &master {
            Some(master) => {
                sources.push((Box::new(MasterReader(master.clone())), OutputStream::Pty));
                req.stdin.then(|| StdinSink::Pty(master.clone()))
            }
            None => {
                if let Some(out) = spawned.child.stdout.take() {
                    sources.push((Box::new(out), OutputStream::Stdout));
                }
                if let Some(err) = spawned.child.stderr.take() {
                    sources.push((Box::new(err), OutputStream::Stderr));
                }
                spawned.child.stdin.take().map(StdinSink::Pipe)
            }
        };
        let seq = table.next_seq;
        table.next_seq += 1;
        let proc = Arc::new(Proc {
            seq,
            pid: spawned.child.id(),
            tag: req.tag,
            command: req.command,
            pty: master,
            started_unix_ms: now_unix_ms(),
            state: Mutex::new(State {
                output: OutputBuffer::new(OUTPUT_BUFFER, buffer::MAX_RUNS),
                readers: sources.len(),
                exit: None,
                done: false,
                stdin_open: sink.is_some(),
            }),
            changed: Condvar::new(),
            stdin: Mutex::new(sink),
        });
        let started = (|| {
            for (source, stream) in sources {
                let proc = proc.clone();
                threads::helper("process-output", move || drain(&proc, source, stream))?;
            }
            let (table, proc) = (self.table.clone(), proc.clone());
            // The watcher keeps the cell until the process is gone.
            threads::helper("process-exit", move || {
                watch(&table, &proc, spawned.status, cell.as_ref());
            })
        })();
        if let Err(e) = started {
            // Without its threads nobody would drain or reap it: better not to run it at all.
            let _ = killpg(Pid::from_raw(proc.pid as i32), Signal::SIGKILL);
            return Err(Failure::io("cannot start a thread for the process", &e));
        }
        table.running.insert(seq, proc.clone());
        drop(table);
        let info = proc.info(&proc.lock());
        Ok(info)
    }

    /// Running processes and the recently exited ones, in start order.
    pub fn list(&self) -> Vec<ProcessInfo> {
        let table = lock(&self.table);
        let mut procs: Vec<&Arc<Proc>> =
            table.running.values().chain(table.exited.iter()).collect();
        procs.sort_by_key(|p| p.seq);
        procs.into_iter().map(|p| p.info(&p.lock())).collect()
    }

    pub fn output(&self, req: OutputRequest) -> Result<Output, Failure> {
        let proc = self.find(&req.process)?;
        let max = req.max_bytes.min(MAX_OUTPUT_READ) as usize;
        let mut state = proc.lock();
        if req.offset > state.output.end() {
            return Err(Failure::invalid(format!(
                "offset {} is past the {} bytes of output",
                req.offset,
                state.output.end()
            )));
        }
        if max > 0 {
            state = proc
                .changed
                .wait_timeout_while(state, Duration::from_millis(req.wait_ms), |s| {
                    !s.done && req.offset.max(s.output.start()) >= s.output.end()
                })
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        let from = req.offset.max(state.output.start());
        let chunks = state.output.read(from, max);
        let info = proc.info(&state);
        drop(state);
        let next_offset = from + chunks.iter().map(|c| c.data.len() as u64).sum::<u64>();
        Ok(Output {
            chunks: chunks
                .into_iter()
                .map(|c| OutputChunk {
                    stream: c.stream,
                    offset: c.offset,
                    data_base64: B64.encode(c.data),
                })
                .collect(),
            next_offset,
            dropped_until: (req.offset < from).then_some(from),
            process: info,
        })
    }

    pub fn stdin(&self, req: StdinRequest) -> Result<(), Failure> {
        let data = B64
            .decode(&req.data_base64)
            .map_err(|e| Failure::invalid(format!("data_base64: {e}")))?;
        let proc = self.find(&req.process)?;
        let mut sink = lock(&proc.stdin);
        proc.gone(&proc.lock())?;
        let Some(open) = sink.as_mut() else {
            return Err(conflict(format!(
                "stdin of process {} is not open",
                proc.pid
            )));
        };
        let written = match open {
            StdinSink::Pipe(pipe) => pipe.write_all(&data),
            StdinSink::Pty(master) => {
                let mut master = &**master;
                master.write_all(&data).and_then(|()| {
                    // A terminal stays open for output: closing its input is an end-of-file
                    // character, as a user would type it.
                    match req.close {
                        true => master.write_all(&[EOF_CHAR]),
                        false => Ok(()),
                    }
                })
            }
        };
        if let Err(e) = written {
            return Err(match e.kind() {
                io::ErrorKind::BrokenPipe => {
                    conflict(format!("process {} no longer reads its stdin", proc.pid))
                }
                _ => Failure::io(format!("writing to process {}", proc.pid), &e),
            });
        }
        if req.close {
            *sink = None;
            proc.lock().stdin_open = false;
        }
        Ok(())
    }

    pub fn signal(&self, req: SignalRequest) -> Result<(), Failure> {
        let signal = Signal::try_from(req.signal)
            .map_err(|_| Failure::invalid(format!("no such signal: {}", req.signal)))?;
        let proc = self.find(&req.process)?;
        let state = proc.lock();
        proc.gone(&state)?;
        // To the whole group, so what the process started goes too.
        killpg(Pid::from_raw(proc.pid as i32), signal).map_err(|e| match e {
            nix::Error::ESRCH => conflict(format!("process {} has exited", proc.pid)),
            e => Failure::from(format!("signalling process {}: {e}", proc.pid)),
        })
    }

    pub fn resize(&self, req: ResizeRequest) -> Result<(), Failure> {
        let size = PtySize {
            cols: req.cols,
            rows: req.rows,
        };
        check_size(size)?;
        let proc = self.find(&req.process)?;
        let Some(master) = &proc.pty else {
            return Err(conflict(format!("process {} has no terminal", proc.pid)));
        };
        proc.gone(&proc.lock())?;
        spawn::set_size(master, size)
            .map_err(|e| Failure::io(format!("resizing the terminal of {}", proc.pid), &e))
    }

    /// A process by pid (all digits) or tag: a running one first, else the one that exited last.
    fn find(&self, key: &str) -> Result<Arc<Proc>, Failure> {
        if key.is_empty() {
            return Err(Failure::invalid("process is empty"));
        }
        let not_found = || Failure::new(ErrorKind::NotFound, format!("no process {key}"));
        let pid = match key.bytes().all(|b| b.is_ascii_digit()) {
            true => Some(key.parse::<u32>().map_err(|_| not_found())?),
            false => None,
        };
        let matches = |p: &&Arc<Proc>| match pid {
            Some(pid) => p.pid == pid,
            None => p.tag.as_deref() == Some(key),
        };
        let table = lock(&self.table);
        let found = table
            .running
            .values()
            .find(matches)
            .or_else(|| table.exited.iter().rev().find(matches));
        found.cloned().ok_or_else(not_found)
    }
}

fn check_tag(tag: &str) -> Result<(), Failure> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if tag.is_empty() || tag.len() > MAX_TAG || !tag.chars().all(allowed) {
        return Err(Failure::invalid(format!(
            "tag {tag:?} must be 1 to {MAX_TAG} of A-Z a-z 0-9 . _ -"
        )));
    }
    if tag.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Failure::invalid(format!(
            "tag {tag} is all digits, which names a pid"
        )));
    }
    Ok(())
}

fn check_size(size: PtySize) -> Result<(), Failure> {
    if size.cols == 0 || size.rows == 0 {
        return Err(Failure::invalid(
            "a terminal needs at least one column and one row",
        ));
    }
    Ok(())
}

/// Reads a terminal's master; its reads fail with EIO once every copy of the slave is closed,
/// which is the end of the output.
struct MasterReader(Arc<PtyMaster>);

impl Read for MasterReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match (&*self.0).read(buf) {
            Err(e) if e.raw_os_error() == Some(libc::EIO) => Ok(0),
            r => r,
        }
    }
}

/// Reads one pipe or terminal to its end, so the process never blocks on output nobody reads.
fn drain(proc: &Proc, mut source: Box<dyn Read + Send>, stream: OutputStream) {
    let mut buf = vec![0; READ_CHUNK];
    loop {
        let n = match source.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        let mut state = proc.lock();
        // Once the exit is reported the output is complete: what a process left behind writes
        // afterwards is drained but not kept.
        if !state.done {
            state.output.push(stream, &buf[..n]);
            drop(state);
            proc.changed.notify_all();
        }
    }
    proc.lock().readers -= 1;
    proc.changed.notify_all();
}

/// Waits for the process's exit status, then for its output to end (briefly while what it left
/// behind may hold it open: `drain_wait`), and reports it exited.
fn watch(
    table: &Mutex<Table>,
    proc: &Arc<Proc>,
    status: Receiver<WaitStatus>,
    cell: Option<&Cell>,
) {
    let (code, signal) = match status.recv() {
        Ok(WaitStatus::Exited(_, code)) => (Some(code), None),
        Ok(WaitStatus::Signaled(_, sig, _)) => (Some(128 + sig as i32), Some(sig as i32)),
        // The status was lost: exited, with no code to tell.
        _ => (None, None),
    };
    let wait = drain_wait(cell);
    let mut state = proc.lock();
    state.exit = Some(Exit {
        code,
        signal,
        unix_ms: now_unix_ms(),
    });
    let state = proc
        .changed
        .wait_timeout_while(state, wait, |s| s.readers > 0)
        .unwrap_or_else(|e| e.into_inner())
        .0;
    drop(state);
    let mut table = lock(table);
    {
        let mut state = proc.lock();
        state.done = true;
        state.stdin_open = false;
    }
    table.running.remove(&proc.seq);
    table.exited.push_back(proc.clone());
    while table.exited.len() > EXITED_KEPT {
        table.exited.pop_front();
    }
    drop(table);
    proc.changed.notify_all();
    // Close stdin now unless a write holds it; that write finds the process gone.
    if let Ok(mut sink) = proc.stdin.try_lock() {
        *sink = None;
    }
}
