//! Directories as tar streams both ways (`hearth cp`).

use super::walk::{self, Errors};
use super::{absolute, creds, OnPath};
use crate::failure::Failure;
use hearth_proto::files::{TarRequest, MAX_ENTRIES};
use hearth_proto::ErrorKind;
use nix::fcntl::AT_FDCWD;
use nix::sys::stat::{utimensat, UtimensatFlags};
use nix::sys::time::TimeSpec;
use std::cell::Cell;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::path::{Component, Path};
use std::rc::Rc;

/// Most bytes the tar reader may take between two entries: headers, padding and the extension
/// records (long names, pax) it holds in memory.
const MAX_HEADERS: u64 = 1 << 20;

/// Writes a tar archive of `req.path` as the request's user: entries named from the path's last
/// component, a directory with everything under it, symlinks as symlinks, with modes, mtimes and
/// numeric owners. `start` opens the output once the path is known to exist, so that a missing
/// one is an error reply rather than a broken stream. Returns the output.
pub fn tar_create<W: Write>(req: &TarRequest, start: impl FnOnce() -> W) -> Result<W, Failure> {
    let root = absolute(Some(&req.path), "path")?;
    let Some(name) = root.file_name() else {
        return Err(Failure::invalid(format!(
            "{} names no file or directory to archive",
            root.display()
        )));
    };
    let _user = creds::as_user(req.user.as_deref())?;
    fs::symlink_metadata(root).on(root)?;
    let mut tar = tar::Builder::new(start());
    tar.follow_symlinks(false);
    tar.mode(tar::HeaderMode::Complete);
    let mut failed = None;
    walk::each(root, Errors::Stop, &mut |path, meta, _| {
        // A socket has nothing to archive (and tar cannot hold one).
        if meta.file_type().is_socket() {
            return Ok(());
        }
        let relative = path.strip_prefix(root).unwrap_or(path);
        let entry = if relative.as_os_str().is_empty() {
            Path::new(name).to_path_buf()
        } else {
            Path::new(name).join(relative)
        };
        tar.append_path_with_name(path, &entry)
            .inspect_err(|_| failed = Some(path.to_path_buf()))
    })
    .map_err(|e| Failure::io(failed.as_deref().unwrap_or(root).display(), &e))?;
    tar.into_inner().on(root)
}

/// Unpacks a tar archive into directory `req.path` (created with its parents when missing) as
/// the request's user: nothing lands outside it (no `..`, no absolute names, no writing through
/// a symlink the archive made), modes and symlinks are kept, and owners when the user is root
/// (otherwise everything belongs to the user).
pub fn tar_extract(req: &TarRequest, body: &mut impl Read) -> Result<(), Failure> {
    let dest = absolute(Some(&req.path), "path")?;
    let user = creds::as_user(req.user.as_deref())?;
    fs::create_dir_all(dest).on(dest)?;
    let dest = &fs::canonicalize(dest).on(dest)?;
    let allowance = Rc::new(Cell::new(None));
    let mut archive = tar::Archive::new(Metered {
        inner: body,
        allowance: allowance.clone(),
    });
    archive.set_preserve_permissions(true);
    archive.set_preserve_mtime(true);
    archive.set_preserve_ownerships(user.is_root());
    archive.set_overwrite(true);
    let fail = |e: io::Error| {
        Failure::new(
            ErrorKind::of_io(&e),
            format!("unpacking into {}: {}", dest.display(), causes(&e)),
        )
    };
    // Directories last, deepest first, as tar's own unpack does: a read-only directory must not
    // stop its contents from being written, and writing them must not change its mtime.
    let mut directories = Vec::new();
    let mut entries = archive.entries().map_err(fail)?;
    loop {
        allowance.set(Some(MAX_HEADERS));
        let Some(entry) = entries.next() else { break };
        allowance.set(None);
        let mut entry = entry.map_err(fail)?;
        if entry.header().entry_type().is_dir() {
            if directories.len() == MAX_ENTRIES {
                return Err(Failure::new(
                    ErrorKind::TooLarge,
                    format!("the archive holds more than {MAX_ENTRIES} directories"),
                ));
            }
            directories.push(entry);
            continue;
        }
        // An entry that would land outside is skipped (`false`) or refused (an error).
        entry.unpack_in(dest).map_err(fail)?;
        // What unpacking left unread, so the next header is where the reader expects it.
        io::copy(&mut entry, &mut io::sink()).map_err(fail)?;
    }
    directories.sort_by(|a, b| b.path_bytes().cmp(&a.path_bytes()));
    for mut dir in directories {
        if dir.unpack_in(dest).map_err(fail)? {
            set_mtime(dest, &dir).map_err(fail)?;
        }
    }
    Ok(())
}

/// Gives an unpacked directory its mtime from the archive, which tar leaves to the caller.
fn set_mtime<R: Read>(dest: &Path, dir: &tar::Entry<'_, R>) -> io::Result<()> {
    let mtime = dir.header().mtime()?;
    // Where unpack_in put it: the name's plain components under `dest`.
    let mut path = dest.to_path_buf();
    for part in dir.path()?.components() {
        if let Component::Normal(part) = part {
            path.push(part);
        }
    }
    let time = TimeSpec::new(i64::try_from(mtime).unwrap_or(i64::MAX), 0);
    // Not through a symlink that replaced it meanwhile.
    utimensat(
        AT_FDCWD,
        &path,
        &time,
        &time,
        UtimensatFlags::NoFollowSymlink,
    )
    .map_err(io::Error::from)
}

/// An error with its causes (tar's errors keep the reason in their source).
fn causes(e: &io::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// A reader that refuses to go past an allowance while one is set.
struct Metered<R> {
    inner: R,
    allowance: Rc<Cell<Option<u64>>>,
}

impl<R: Read> Read for Metered<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(left) = self.allowance.get() else {
            return self.inner.read(buf);
        };
        if left == 0 {
            return Err(io::Error::new(
                io::ErrorKind::FileTooLarge,
                format!("an entry's headers take more than {MAX_HEADERS} bytes"),
            ));
        }
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        self.allowance.set(Some(left - n as u64));
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::files::testing::*;
    use std::fs::{File, Permissions};
    use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
    use std::path::PathBuf;
    use std::time::{Duration, SystemTime};

    fn tar_req(path: &Path) -> TarRequest {
        TarRequest {
            path: path.to_str().unwrap().into(),
            user: None,
        }
    }

    fn pack(req: &TarRequest) -> Vec<u8> {
        tar_create(req, Vec::new).unwrap()
    }

    /// Everything under `root`, by relative path: type, mode, owner, mtime, content or target.
    fn describe(root: &Path) -> Vec<String> {
        let mut seen = Vec::new();
        walk::each(root, Errors::Stop, &mut |path, meta, _| {
            let rel = path.strip_prefix(root).unwrap().display().to_string();
            let what = if meta.file_type().is_symlink() {
                format!("link -> {}", fs::read_link(path)?.display())
            } else if meta.is_dir() {
                format!("dir mtime {}", meta.mtime())
            } else {
                format!(
                    "file {:?} mtime {}",
                    fs::read_to_string(path)?,
                    meta.mtime()
                )
            };
            let mode = if meta.file_type().is_symlink() {
                0
            } else {
                meta.mode() & 0o7777
            };
            seen.push(format!(
                "{rel}: {what} {mode:o} {}:{}",
                meta.uid(),
                meta.gid()
            ));
            Ok(())
        })
        .unwrap();
        seen.sort();
        seen
    }

    /// app/ with a 0750 directory, a 0600 file, an empty file, an empty directory, a symlink,
    /// a file of nobody's, and mtimes in the past.
    fn app(dir: &Path) -> PathBuf {
        let app = dir.join("app");
        fs::create_dir_all(app.join("conf")).unwrap();
        fs::create_dir(app.join("void")).unwrap();
        fs::write(app.join("conf/secret"), "s3cret").unwrap();
        fs::set_permissions(app.join("conf/secret"), Permissions::from_mode(0o600)).unwrap();
        fs::write(app.join("empty"), "").unwrap();
        fs::write(app.join("theirs"), "t").unwrap();
        std::os::unix::fs::chown(app.join("theirs"), Some(NOBODY_ID), Some(NOBODY_ID)).unwrap();
        symlink("conf/secret", app.join("link")).unwrap();
        let past = SystemTime::now() - Duration::from_secs(86_400 * 30);
        for f in ["conf/secret", "empty", "theirs"] {
            File::options()
                .write(true)
                .open(app.join(f))
                .unwrap()
                .set_modified(past)
                .unwrap();
        }
        // Directories last: writing into them changes their mtime.
        for d in ["conf", "void", ""] {
            File::open(app.join(d)).unwrap().set_modified(past).unwrap();
        }
        fs::set_permissions(app.join("conf"), Permissions::from_mode(0o750)).unwrap();
        app
    }

    #[test]
    fn a_directory_round_trips() {
        let src = scratch();
        let app = app(src.path());
        let archive = pack(&tar_req(&app));
        let dst = scratch();
        let into = dst.path().join("new/place");
        tar_extract(&tar_req(&into), &mut &archive[..]).unwrap();
        assert_eq!(names(&into), ["app"]);
        let before = describe(&app);
        assert_eq!(describe(&into.join("app")), before);
        assert_eq!(before.len(), 7, "{before:#?}");

        // A file alone is one entry named by it.
        let archive = pack(&tar_req(&app.join("conf/secret")));
        tar_extract(&tar_req(dst.path()), &mut &archive[..]).unwrap();
        assert_eq!(
            fs::read_to_string(dst.path().join("secret")).unwrap(),
            "s3cret"
        );
    }

    #[test]
    fn what_a_user_unpacks_is_theirs() {
        let src = scratch();
        let archive = pack(&tar_req(&app(src.path())));
        let dst = scratch();
        let own = nobodys(dst.path(), "own");
        let mut req = tar_req(&own);
        req.user = Some(NOBODY.into());
        tar_extract(&req, &mut &archive[..]).unwrap();
        for line in describe(&own.join("app")) {
            assert!(line.ends_with("65534:65534"), "{line}");
        }
        assert_eq!(mode_of(&own.join("app/conf")), 0o750);
        // Not into root's directory.
        let mut req = tar_req(&dst.path().join("x"));
        req.user = Some(NOBODY.into());
        let err = tar_extract(&req, &mut &archive[..]).unwrap_err();
        assert_eq!(err.kind, ErrorKind::PermissionDenied);
        // Nor can nobody archive what it may not read.
        let mut req = tar_req(&src.path().join("app"));
        req.user = Some(NOBODY.into());
        assert!(tar_create(&req, Vec::new).is_err());
    }

    #[test]
    fn a_missing_path_fails_before_the_stream_starts() {
        let dir = scratch();
        let err = tar_create(&tar_req(&dir.path().join("nope")), || -> Vec<u8> {
            panic!("started")
        })
        .unwrap_err();
        assert_eq!(err.kind, ErrorKind::NotFound);
        let err = tar_create(&tar_req(Path::new("/")), Vec::new).unwrap_err();
        assert_eq!(err.kind, ErrorKind::Invalid);
    }

    /// Appends an entry whose name the tar crate's own checks would refuse.
    fn raw_entry(tar: &mut tar::Builder<Vec<u8>>, name: &str, kind: tar::EntryType, data: &[u8]) {
        let mut header = tar::Header::new_gnu();
        header.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        header.set_entry_type(kind);
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(1);
        header.set_cksum();
        tar.append(&header, data).unwrap();
    }

    #[test]
    fn nothing_is_unpacked_outside_the_directory() {
        let dir = scratch();
        let dest = dir.path().join("dest");
        let outside = dir.path().join("outside");
        fs::create_dir(&outside).unwrap();

        let mut tar = tar::Builder::new(Vec::new());
        raw_entry(&mut tar, "../escaped", tar::EntryType::Regular, b"x");
        raw_entry(&mut tar, "/abs", tar::EntryType::Regular, b"y");
        let archive = tar.into_inner().unwrap();
        tar_extract(&tar_req(&dest), &mut &archive[..]).unwrap();
        assert!(!dir.path().join("escaped").exists());
        assert_eq!(names(&dest), ["abs"], "an absolute name lands inside");

        let mut tar = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Symlink);
        header.set_size(0);
        header.set_mode(0o777);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(1);
        tar.append_link(&mut header, "up", &outside).unwrap();
        raw_entry(&mut tar, "up/pwned", tar::EntryType::Regular, b"z");
        let archive = tar.into_inner().unwrap();
        let err = tar_extract(&tar_req(&dest), &mut &archive[..]).unwrap_err();
        assert!(err.message.contains("outside of destination"), "{err:?}");
        assert!(names(&outside).is_empty());
    }

    #[test]
    fn oversized_headers_are_refused() {
        let mut tar = tar::Builder::new(Vec::new());
        let long = vec![b'a'; (MAX_HEADERS + 1024) as usize];
        raw_entry(
            &mut tar,
            "././@LongLink",
            tar::EntryType::GNULongName,
            &long,
        );
        raw_entry(&mut tar, "short", tar::EntryType::Regular, b"x");
        let archive = tar.into_inner().unwrap();
        let dir = scratch();
        let err = tar_extract(&tar_req(dir.path()), &mut &archive[..]).unwrap_err();
        assert_eq!(err.kind, ErrorKind::TooLarge, "{err:?}");
        assert!(names(dir.path()).is_empty());
    }
}
