//! A machine's serial console and its VMM's own log, each kept within a size. The VMM writes
//! each into a pipe, a FIFO in the machine's runtime directory, and the daemon copies it into
//! its file (`console.log` in the machine's directory, `vmm.log` in the runtime one): past
//! `cap` bytes the file becomes `<file>.1` (replacing the one before) and a new one starts, so a
//! guest that writes without end (or makes its VMM warn without end) costs the host at most
//! twice `cap` of disk per log, and a copy buffer of memory. Tails are read from the files' end.
//!
//! Why a FIFO rather than QEMU writing the file itself (which nothing could bound: the daemon
//! could only cut the file now and then, and not at all while it is down) or a socket (where
//! QEMU drops what the guest writes while no daemon is connected, and the first words of a
//! boot): the FIFO outlives the daemon (QEMU holds it open), so across a daemon restart nothing
//! is lost. While no daemon reads, the pipe's buffer (64 KiB) fills, and then the guest's
//! console waits: a guest that writes that much while the daemon is away is held back, not the
//! host's disk filled. The new daemon opens the FIFO again when it reattaches the machine.

use super::MachinePaths;
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::watch;

/// The copiers running, by the log file they write: each drops its sender when its VMM's
/// pipe ends, so that [`drained`] can wait for the last words of a VMM that exited.
static COPIERS: LazyLock<Mutex<HashMap<PathBuf, Copier>>> = LazyLock::new(Mutex::default);

/// Ends (its sender is dropped) when its copier has copied the whole pipe.
type Copier = Arc<watch::Receiver<()>>;

/// The least a console file may be capped at.
const MIN_CAP: u64 = 4096;
/// How much of a file's end a tail reads: enough for the lines an error message quotes.
const TAIL_BYTES: u64 = 64 << 10;

/// One of the two logs a machine keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Log {
    /// The guest's serial console.
    Console,
    /// What the VMM itself reports on its standard error.
    Vmm,
}

impl MachinePaths {
    /// QEMU's `pipe` chardev path: it writes `console.out` and reads `console.in`.
    pub fn console_pipe(&self) -> PathBuf {
        self.sock_dir.join("console")
    }

    pub(super) fn console_fifo(&self, end: &str) -> PathBuf {
        self.sock_dir.join(format!("console.{end}"))
    }

    /// The FIFO the VMM writes `log` into.
    pub fn log_fifo(&self, log: Log) -> PathBuf {
        match log {
            Log::Console => self.console_fifo("out"),
            Log::Vmm => self.sock_dir.join("vmm.out"),
        }
    }

    fn log_file(&self, log: Log) -> PathBuf {
        match log {
            Log::Console => self.console(),
            Log::Vmm => self.vmm_log(),
        }
    }

    fn log_previous(&self, log: Log) -> PathBuf {
        let mut name = self.log_file(log).into_os_string();
        name.push(".1");
        name.into()
    }
}

/// Makes the FIFOs of the console and the VMM's log for a VMM about to start (stale ones
/// from an earlier run go).
pub fn prepare(paths: &MachinePaths) -> Result<()> {
    std::fs::create_dir_all(&paths.sock_dir)?;
    for fifo in [
        paths.console_fifo("in"),
        paths.console_fifo("out"),
        paths.log_fifo(Log::Vmm),
    ] {
        let _ = std::fs::remove_file(&fifo);
        nix::unistd::mkfifo(
            &fifo,
            nix::sys::stat::Mode::S_IRUSR | nix::sys::stat::Mode::S_IWUSR,
        )
        .map_err(|e| Error::internal(format!("making {}: {e}", fifo.display())))?;
    }
    Ok(())
}

/// The write end of `log`'s FIFO, for a VMM that writes it on a descriptor (QEMU's standard
/// error; Firecracker's standard output, its serial console). Opened for reading too, so that
/// it never blocks and the VMM never meets a pipe without a reader (while no daemon reads, a
/// VMM that fills the pipe waits).
pub fn writer(paths: &MachinePaths, log: Log) -> Result<File> {
    let fifo = paths.log_fifo(log);
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(&fifo)
        .map_err(|e| Error::io("opening", &fifo, e))
}

/// Copies a running VMM's `log` into its file, rotated at `cap` bytes, on a thread of its own
/// until the VMM exits. Call it once per VMM process and log: after it starts, or when the
/// daemon reattaches it.
pub fn follow(paths: &MachinePaths, log: Log, cap: u64) {
    let fifo = paths.log_fifo(log);
    // Non-blocking, so that a VMM already gone (no writer) cannot hold the open.
    let pipe = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
    {
        Ok(pipe) => pipe,
        Err(e) => {
            tracing::warn!("{} is not followed: {e}", fifo.display());
            return;
        }
    };
    if let Err(e) = nix::fcntl::fcntl(
        &pipe,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::empty()),
    ) {
        tracing::warn!("{} is not followed: {e}", fifo.display());
        return;
    }
    let key = paths.log_file(log);
    let writer = Rotating {
        path: key.clone(),
        previous: paths.log_previous(log),
        cap: cap.max(MIN_CAP),
        file: None,
        size: 0,
    };
    let (running, done) = watch::channel(());
    let done = Arc::new(done);
    copiers().insert(key.clone(), done.clone());
    let spawned = std::thread::Builder::new()
        .name(format!("{log:?}-log").to_lowercase())
        .stack_size(64 << 10)
        .spawn(move || {
            copy(pipe, writer);
            drop(running);
            let mut map = copiers();
            if map.get(&key).is_some_and(|d| Arc::ptr_eq(d, &done)) {
                map.remove(&key);
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("{} is not followed: {e}", fifo.display());
        copiers().remove(&paths.log_file(log));
    }
}

fn copiers() -> MutexGuard<'static, HashMap<PathBuf, Copier>> {
    COPIERS.lock().unwrap_or_else(|e| e.into_inner())
}

/// For a VMM that exited: waits (a few seconds at most) until its `log` is copied to the
/// end, so that its tail holds the last words.
pub async fn drained(paths: &MachinePaths, log: Log) {
    let done = copiers().get(&paths.log_file(log)).cloned();
    if let Some(done) = done {
        let mut done = (*done).clone();
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while done.changed().await.is_ok() {}
        })
        .await;
    }
}

/// A log file that starts over past `cap` bytes, keeping one previous file.
struct Rotating {
    path: PathBuf,
    previous: PathBuf,
    cap: u64,
    file: Option<File>,
    size: u64,
}

impl Rotating {
    fn write(&mut self, mut data: &[u8]) -> std::io::Result<()> {
        while !data.is_empty() {
            if self.file.is_none() {
                let file = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.path)?;
                self.size = file.metadata()?.len();
                self.file = Some(file);
            }
            if self.size >= self.cap {
                std::fs::rename(&self.path, &self.previous)?;
                self.file = None;
                continue;
            }
            let n = ((self.cap - self.size) as usize).min(data.len());
            let file = self.file.as_mut().expect("opened above");
            file.write_all(&data[..n])?;
            self.size += n as u64;
            data = &data[n..];
        }
        Ok(())
    }
}

/// Until the VMM closes the pipe (it exited): whatever cannot be written (the machine is being
/// removed, the disk is full) is read and dropped, so the guest's console never waits on it.
fn copy(mut pipe: File, mut log: Rotating) {
    let mut buf = vec![0u8; 64 << 10];
    let mut failing = false;
    loop {
        let n = match pipe.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!("reading the console for {}: {e}", log.path.display());
                return;
            }
        };
        match log.write(&buf[..n]) {
            Ok(()) => failing = false,
            Err(e) => {
                log.file = None;
                if !failing {
                    tracing::warn!(
                        "writing {}: {e}; console output dropped",
                        log.path.display()
                    );
                    failing = true;
                }
            }
        }
    }
}

/// The last `lines` non-empty lines of `log`, from the current file and, when it holds
/// fewer, the previous one.
pub fn tail(paths: &MachinePaths, log: Log, lines: usize) -> String {
    let mut text = end_of(&paths.log_file(log));
    if text.lines().filter(|l| !l.trim().is_empty()).count() < lines {
        text = end_of(&paths.log_previous(log)) + &text;
    }
    last_lines(&text, lines)
}

/// The last [`TAIL_BYTES`] of a file (nothing when it cannot be read), as text.
fn end_of(path: &Path) -> String {
    let read = || -> std::io::Result<Vec<u8>> {
        let mut f = File::open(path)?;
        let len = f.metadata()?.len();
        f.seek(SeekFrom::Start(len.saturating_sub(TAIL_BYTES)))?;
        let mut bytes = Vec::with_capacity(TAIL_BYTES.min(len) as usize);
        f.take(TAIL_BYTES).read_to_end(&mut bytes)?;
        Ok(bytes)
    };
    String::from_utf8_lossy(&read().unwrap_or_default()).into_owned()
}

fn last_lines(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths(dir: &Path) -> MachinePaths {
        let paths = MachinePaths {
            dir: dir.join("machine"),
            sock_dir: dir.join("run"),
        };
        std::fs::create_dir_all(&paths.dir).unwrap();
        paths
    }

    #[test]
    fn output_without_end_stays_within_two_files_of_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let paths = paths(dir.path());
        prepare(&paths).unwrap();
        // QEMU's end: it holds the FIFO open for reading and writing.
        let mut writer = OpenOptions::new()
            .read(true)
            .write(true)
            .open(paths.console_fifo("out"))
            .unwrap();
        follow(&paths, Log::Console, 64 << 10);
        let mut total = 0;
        for i in 0..20_000 {
            let line = format!("line {i} {}\n", "x".repeat(60));
            writer.write_all(line.as_bytes()).unwrap();
            total += line.len();
        }
        writer.write_all(b"the last words\n").unwrap();
        drop(writer);
        // The copier ends when the pipe closes; wait for the last line to land.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !tail(&paths, Log::Console, 1).contains("the last words") {
            assert!(std::time::Instant::now() < deadline, "the copy never ended");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let size = |p: &Path| std::fs::metadata(p).unwrap().len();
        assert!(total > 10 * (64 << 10));
        assert!(size(&paths.console()) <= 64 << 10);
        assert_eq!(size(&paths.log_previous(Log::Console)), 64 << 10);
        let tail = tail(&paths, Log::Console, 3);
        assert!(
            tail.starts_with("line 19998") && tail.ends_with("the last words"),
            "{tail}"
        );
    }

    #[tokio::test]
    async fn the_vmm_log_keeps_the_last_words_of_a_vmm_that_exited() {
        let dir = tempfile::tempdir().unwrap();
        let paths = paths(dir.path());
        prepare(&paths).unwrap();
        let mut stderr = writer(&paths, Log::Vmm).unwrap();
        follow(&paths, Log::Vmm, MIN_CAP);
        for i in 0..1000 {
            writeln!(stderr, "warning {i}").unwrap();
        }
        writeln!(stderr, "qemu: cannot start").unwrap();
        drop(stderr);
        assert_eq!(
            paths.vmm_log_tail(2).await,
            "warning 999\nqemu: cannot start"
        );
        let size = |p: &Path| std::fs::metadata(p).unwrap().len();
        assert!(size(&paths.vmm_log()) <= MIN_CAP);
        assert_eq!(size(&paths.log_previous(Log::Vmm)), MIN_CAP);
    }

    #[test]
    fn a_tail_reads_only_the_end_and_reaches_into_the_previous_file() {
        let dir = tempfile::tempdir().unwrap();
        let paths = paths(dir.path());
        let mut old = String::new();
        for i in 0..100_000 {
            old.push_str(&format!("old {i}\n"));
        }
        std::fs::write(paths.log_previous(Log::Console), old).unwrap();
        std::fs::write(paths.console(), "new 1\n\nnew 2\n").unwrap();
        assert_eq!(tail(&paths, Log::Console, 2), "new 1\nnew 2");
        assert_eq!(
            tail(&paths, Log::Console, 4),
            "old 99998\nold 99999\nnew 1\nnew 2"
        );
        assert_eq!(tail(&paths, Log::Vmm, 5), "");
    }
}
