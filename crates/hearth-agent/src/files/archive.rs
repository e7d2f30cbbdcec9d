//! Directories as tar streams both ways (`hearth cp`).

use super::walk::{self, Errors};
use super::{absolute, creds, OnPath};
use crate::failure::Failure;
use hearth_proto::files::{TarRequest, MAX_ENTRIES};
use hearth_proto::ErrorKind;
use std::cell::Cell;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::path::Path;
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
    let fail = |e: io::Error| Failure::io(format!("unpacking into {}", dest.display()), &e);
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
        dir.unpack_in(dest).map_err(fail)?;
    }
    Ok(())
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
