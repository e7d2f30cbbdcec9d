//! File system events under a path (inotify), one JSON line each.

use super::walk::{self, Errors};
use super::{absolute, creds, OnPath};
use crate::failure::Failure;
use hearth_proto::files::{WatchEvent, WatchEventKind, WatchRequest, MAX_ENTRIES};
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::inotify::{AddWatchFlags as F, InitFlags, Inotify, InotifyEvent, WatchDescriptor};
use std::collections::HashMap;
use std::fs;
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

/// How often an idle watch checks whether the host cancelled it.
const IDLE_CHECK_MS: u16 = 200;

/// Most directories one watch follows (each holds a kernel watch and its path here); past it,
/// new directories go unwatched and an overflow event says events are being lost.
const MAX_WATCHES: usize = MAX_ENTRIES;

/// Writes events under `req.path` as JSON lines to the output `start` opens (once the path is
/// watched, so that a missing one is an error reply), until a write fails, `cancelled` says so,
/// or the path itself goes away. Writes are `IN_MODIFY`s (repeats in one read coalesced), so a
/// file that stays open still shows its writes. A recursive watch follows directories created
/// later too: it watches a new directory before it reports it, and reports what was already in
/// it as created. Returns the output.
pub fn watch<W: Write>(
    req: &WatchRequest,
    start: impl FnOnce() -> W,
    cancelled: impl Fn(&W) -> bool,
) -> Result<W, Failure> {
    let root = absolute(Some(&req.path), "path")?;
    let _user = creds::as_user(req.user.as_deref())?;
    let meta = fs::metadata(root).on(root)?;
    let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
        .map_err(io::Error::from)
        .on(root)?;
    let mut watcher = Watcher {
        inotify,
        dirs: HashMap::new(),
        root: root.to_path_buf(),
        root_wd: None,
        root_is_dir: meta.is_dir(),
        recursive: req.recursive && meta.is_dir(),
        full: false,
    };
    let wd = watcher.add(root, F::empty()).on(root)?;
    watcher.root_wd = Some(wd);
    if watcher.recursive {
        watcher.add_tree(root, &mut |_| Ok(())).on(root)?;
    }
    let mut out = start();
    let mut line = Vec::new();
    let mut emit = |out: &mut W, event: WatchEvent| {
        line.clear();
        serde_json::to_writer(&mut line, &event).map_err(io::Error::from)?;
        line.push(b'\n');
        out.write_all(&line)
    };
    if let Err(e) = watcher.run(&mut out, &mut emit, &cancelled) {
        // The host went away (a write failed) or inotify did: either way the stream ends.
        if !cancelled(&out) {
            eprintln!("hearth-agent: watch {}: {e}", root.display());
        }
    }
    Ok(out)
}

struct Watcher {
    inotify: Inotify,
    dirs: HashMap<WatchDescriptor, PathBuf>,
    root: PathBuf,
    root_wd: Option<WatchDescriptor>,
    root_is_dir: bool,
    recursive: bool,
    /// A directory went unwatched at [`MAX_WATCHES`] since the last overflow event said so.
    full: bool,
}

fn mask() -> F {
    F::IN_CREATE
        | F::IN_MODIFY
        | F::IN_DELETE
        | F::IN_MOVED_FROM
        | F::IN_MOVED_TO
        | F::IN_ATTRIB
        | F::IN_DELETE_SELF
        | F::IN_MOVE_SELF
}

impl Watcher {
    fn add(&mut self, path: &Path, extra: F) -> io::Result<WatchDescriptor> {
        let wd = self.inotify.add_watch(path, mask() | extra)?;
        // Adding a watch on a watched inode (a directory moved back in) gives its old descriptor.
        self.dirs.insert(wd, path.to_path_buf());
        Ok(wd)
    }

    /// Watches the directories under `dir` (not `dir` itself), passing every entry found to
    /// `found`; what vanished or may not be read is left out.
    fn add_tree(
        &mut self,
        dir: &Path,
        found: &mut dyn FnMut(WatchEvent) -> io::Result<()>,
    ) -> io::Result<()> {
        walk::each(dir, Errors::Skip, &mut |path, meta, depth| {
            if depth == 0 {
                return Ok(());
            }
            if meta.is_dir() {
                self.add_within_limit(path);
            }
            found(WatchEvent {
                kind: WatchEventKind::Create,
                path: path.to_string_lossy().into_owned(),
                directory: meta.is_dir(),
            })
        })
    }

    fn add_within_limit(&mut self, dir: &Path) {
        if self.dirs.len() >= MAX_WATCHES {
            self.full = true;
            return;
        }
        // Not through a symlink put there meanwhile; one that vanished is simply not watched.
        let _ = self.add(dir, F::IN_ONLYDIR | F::IN_DONT_FOLLOW);
    }

    fn run<W>(
        &mut self,
        out: &mut W,
        emit: &mut impl FnMut(&mut W, WatchEvent) -> io::Result<()>,
        cancelled: &impl Fn(&W) -> bool,
    ) -> io::Result<()> {
        loop {
            if cancelled(out) {
                return Ok(());
            }
            let mut fds = [PollFd::new(self.inotify.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::from(IDLE_CHECK_MS)) {
                Ok(0) | Err(Errno::EINTR) => continue,
                Ok(_) => {}
                Err(e) => return Err(e.into()),
            }
            let events = match self.inotify.read_events() {
                Ok(events) => events,
                Err(Errno::EAGAIN | Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            };
            let mut last: Option<WatchEvent> = None;
            let mut send = |event: WatchEvent| {
                // A burst of writes to one file is one event.
                if event.kind == WatchEventKind::Write && last.as_ref() == Some(&event) {
                    return Ok(());
                }
                emit(out, event.clone())?;
                last = Some(event);
                Ok(())
            };
            for event in events {
                if !self.translate(event, &mut send)? {
                    return Ok(());
                }
                if std::mem::take(&mut self.full) {
                    send(self.overflow())?;
                }
            }
        }
    }

    fn overflow(&self) -> WatchEvent {
        WatchEvent {
            kind: WatchEventKind::Overflow,
            path: self.root.to_string_lossy().into_owned(),
            directory: false,
        }
    }

    /// Sends what one inotify event means; false when the watched path went away.
    fn translate(
        &mut self,
        event: InotifyEvent,
        send: &mut dyn FnMut(WatchEvent) -> io::Result<()>,
    ) -> io::Result<bool> {
        let m = event.mask;
        if m.contains(F::IN_Q_OVERFLOW) {
            send(self.overflow())?;
            return Ok(true);
        }
        let is_root = Some(event.wd) == self.root_wd;
        if m.contains(F::IN_IGNORED) {
            self.dirs.remove(&event.wd);
            return Ok(!is_root);
        }
        let Some(dir) = self.dirs.get(&event.wd) else {
            return Ok(true);
        };
        let path = match &event.name {
            Some(name) => dir.join(name),
            None => dir.clone(),
        };
        let directory = m.contains(F::IN_ISDIR);
        let event_of = |kind| WatchEvent {
            kind,
            path: path.to_string_lossy().into_owned(),
            directory,
        };
        if m.intersects(F::IN_DELETE_SELF | F::IN_MOVE_SELF) {
            // A subdirectory's own end is reported by its parent's watch.
            if is_root {
                let kind = if m.contains(F::IN_DELETE_SELF) {
                    WatchEventKind::Remove
                } else {
                    WatchEventKind::Rename
                };
                send(WatchEvent {
                    directory: self.root_is_dir,
                    ..event_of(kind)
                })?;
            }
            return Ok(!is_root);
        }
        let kind = if m.contains(F::IN_CREATE) {
            WatchEventKind::Create
        } else if m.contains(F::IN_MODIFY) {
            WatchEventKind::Write
        } else if m.contains(F::IN_DELETE) {
            WatchEventKind::Remove
        } else if m.intersects(F::IN_MOVED_FROM | F::IN_MOVED_TO) {
            WatchEventKind::Rename
        } else if m.contains(F::IN_ATTRIB) {
            WatchEventKind::Chmod
        } else {
            return Ok(true);
        };
        let new_dir = self.recursive && directory && m.intersects(F::IN_CREATE | F::IN_MOVED_TO);
        if self.recursive && directory && m.contains(F::IN_MOVED_FROM) {
            // Its watches would report under the old name; a move within the tree re-adds them.
            self.forget(&path);
        }
        if new_dir {
            // Watched before it is reported, so whoever waits for the report misses nothing
            // written in it after.
            self.add_within_limit(&path);
        }
        send(event_of(kind))?;
        if new_dir {
            // What is already in it, as created; a walk that fails because the directory went
            // away ends quietly, one that fails because the output did ends the watch.
            let mut failed = None;
            let _ = self.add_tree(&path, &mut |found| {
                send(found).inspect_err(|e| failed = Some(e.kind()))
            });
            if let Some(kind) = failed {
                return Err(kind.into());
            }
        }
        Ok(true)
    }

    /// Stops watching `dir` and everything under it.
    fn forget(&mut self, dir: &Path) {
        let gone: Vec<WatchDescriptor> = self
            .dirs
            .iter()
            .filter(|(_, p)| p.starts_with(dir))
            .map(|(wd, _)| *wd)
            .collect();
        for wd in gone {
            self.dirs.remove(&wd);
            let _ = self.inotify.rm_watch(wd);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::files::testing::*;
    use hearth_proto::ErrorKind;
    use std::fs::Permissions;
    use std::os::unix::fs::PermissionsExt;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::mpsc::{channel, Receiver, Sender};
    use std::sync::Arc;
    use std::thread::JoinHandle;
    use std::time::{Duration, Instant};

    /// Collects the lines of a watch stream as events.
    struct Lines(Sender<WatchEvent>);

    impl Write for Lines {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            for line in buf.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                let event = serde_json::from_slice(line).expect("a JSON line per write");
                let _ = self.0.send(event);
            }
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    struct Running {
        events: Receiver<WatchEvent>,
        cancel: Arc<AtomicBool>,
        thread: JoinHandle<Result<(), Failure>>,
        /// Everything received so far, for messages.
        seen: Vec<WatchEvent>,
    }

    const PATIENCE: Duration = Duration::from_secs(10);

    fn start(path: &Path, recursive: bool) -> Running {
        let req = WatchRequest {
            path: path.to_str().unwrap().into(),
            recursive,
            user: None,
        };
        let (tx, events) = channel();
        let (started_tx, started) = channel();
        let cancel = Arc::new(AtomicBool::new(false));
        let flag = cancel.clone();
        let thread = std::thread::spawn(move || {
            let out = watch(
                &req,
                || {
                    let _ = started_tx.send(());
                    Lines(tx)
                },
                move |_| flag.load(Ordering::SeqCst),
            )?;
            drop(out);
            Ok(())
        });
        started.recv_timeout(PATIENCE).expect("the watch started");
        Running {
            events,
            cancel,
            thread,
            seen: Vec::new(),
        }
    }

    impl Running {
        /// Waits for an event of `kind` on `path`, passing over others.
        fn expect(&mut self, kind: WatchEventKind, path: &Path) -> WatchEvent {
            let deadline = Instant::now() + PATIENCE;
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                match self.events.recv_timeout(left) {
                    Ok(event) => {
                        self.seen.push(event.clone());
                        if event.kind == kind && Path::new(&event.path) == path {
                            return event;
                        }
                    }
                    Err(_) => panic!("no {kind:?} of {} among {:#?}", path.display(), self.seen),
                }
            }
        }

        /// Waits for the watch to end by itself or, with `cancel`, once cancelled.
        fn end(self, cancel: bool) {
            if cancel {
                self.cancel.store(true, Ordering::SeqCst);
            }
            let deadline = Instant::now() + PATIENCE;
            while !self.thread.is_finished() {
                assert!(Instant::now() < deadline, "the watch did not end");
                std::thread::sleep(Duration::from_millis(10));
            }
            self.thread.join().unwrap().unwrap();
        }
    }

    #[test]
    fn a_recursive_watch_follows_new_directories() {
        let dir = scratch();
        let root = dir.path();
        let mut w = start(root, true);

        let sub = root.join("sub");
        fs::create_dir(&sub).unwrap();
        assert!(w.expect(WatchEventKind::Create, &sub).directory);
        let file = sub.join("f");
        fs::write(&file, "one").unwrap();
        assert!(!w.expect(WatchEventKind::Create, &file).directory);
        w.expect(WatchEventKind::Write, &file);
        fs::set_permissions(&file, Permissions::from_mode(0o600)).unwrap();
        w.expect(WatchEventKind::Chmod, &file);
        let moved = sub.join("g");
        fs::rename(&file, &moved).unwrap();
        w.expect(WatchEventKind::Rename, &file);
        w.expect(WatchEventKind::Rename, &moved);
        fs::remove_file(&moved).unwrap();
        w.expect(WatchEventKind::Remove, &moved);

        // A tree made at once: what its directories held before they were watched is reported
        // as created, and what comes after is seen.
        fs::create_dir_all(sub.join("a/b/c")).unwrap();
        let c = sub.join("a/b/c");
        w.expect(WatchEventKind::Create, &c);
        fs::write(c.join("deep"), "x").unwrap();
        w.expect(WatchEventKind::Create, &c.join("deep"));

        // A directory moved away is no longer watched under its old name.
        let away = root.join("away");
        fs::rename(&sub, &away).unwrap();
        w.expect(WatchEventKind::Rename, &away);
        fs::write(away.join("a/after"), "x").unwrap();
        w.expect(WatchEventKind::Create, &away.join("a/after"));
        w.end(true);
    }

    #[test]
    fn a_plain_watch_sees_only_its_directory_and_ends_with_it() {
        let dir = scratch();
        let root = dir.path().join("watched");
        fs::create_dir(&root).unwrap();
        let mut w = start(&root, false);
        fs::create_dir(root.join("sub")).unwrap();
        fs::write(root.join("sub/inner"), "x").unwrap();
        fs::write(root.join("marker"), "x").unwrap();
        w.expect(WatchEventKind::Create, &root.join("marker"));
        let inner = root.join("sub/inner");
        assert!(
            !w.seen.iter().any(|e| Path::new(&e.path) == inner),
            "{:?}",
            w.seen
        );

        fs::remove_dir_all(&root).unwrap();
        assert!(w.expect(WatchEventKind::Remove, &root).directory);
        w.end(false);
    }

    #[test]
    fn a_watch_fails_before_its_stream_on_a_bad_path() {
        let req = |path: &str| WatchRequest {
            path: path.into(),
            recursive: true,
            user: None,
        };
        let never = || -> Vec<u8> { panic!("started") };
        let dir = scratch();
        let missing = dir.path().join("missing");
        let err = watch(&req(missing.to_str().unwrap()), never, |_| false).unwrap_err();
        assert_eq!(err.kind, ErrorKind::NotFound);
        let err = watch(&req("relative"), never, |_| false).unwrap_err();
        assert_eq!(err.kind, ErrorKind::Invalid);
        let closed = dir.path().join("closed");
        fs::create_dir(&closed).unwrap();
        fs::set_permissions(&closed, Permissions::from_mode(0o700)).unwrap();
        let mut nobody = req(closed.to_str().unwrap());
        nobody.user = Some(NOBODY.into());
        let err = watch(&nobody, never, |_| false).unwrap_err();
        assert_eq!(err.kind, ErrorKind::PermissionDenied);
    }
}
