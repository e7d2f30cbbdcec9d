//! Streaming transfers: uploads written atomically, downloads read straight from the file.

use super::ops::open_regular;
use super::{absolute, conflict, creds, OnPath, COPY_BUFFER};
use crate::failure::Failure;
use hearth_proto::files::{DownloadRequest, UploadRequest};
use std::ffi::OsString;
use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Mode of an uploaded file that did not exist, when the request names none.
const DEFAULT_MODE: u32 = 0o644;

/// Writes `body` to `req.path` atomically, as the request's user: into a temporary file beside
/// it, flushed, then renamed over it. Whatever fails (the body too: a cancelled transfer), the
/// temporary file goes and the target is as it was. Returns the bytes written.
pub fn upload(req: &UploadRequest, body: &mut impl Read) -> Result<u64, Failure> {
    let path = absolute(Some(&req.path), "path")?;
    if req.mode.is_some_and(|m| m > 0o7777) {
        return Err(Failure::invalid("mode has bits beyond 07777"));
    }
    let _user = creds::as_user(req.user.as_deref())?;
    // Through a symlink to the file it names: the link stays.
    let target = fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let existing = match fs::metadata(&target) {
        Ok(meta) if meta.is_dir() => return Err(conflict(path, "is a directory")),
        Ok(meta) if !meta.is_file() => {
            return Err(Failure::invalid(format!(
                "{} is not a regular file",
                path.display()
            )))
        }
        Ok(meta) => Some(meta),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(Failure::io(path.display(), &e)),
    };
    let mut temp = TempFile::beside(&target).on(path)?;
    let mut buf = vec![0u8; COPY_BUFFER];
    let mut written = 0u64;
    loop {
        let n = match body.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Failure::io(format!("{}: the upload", path.display()), &e)),
        };
        temp.file.write_all(&buf[..n]).on(path)?;
        written += n as u64;
    }
    if let Some(meta) = &existing {
        // A replaced file keeps its owner where the user may give it (root always may).
        let _ = std::os::unix::fs::fchown(&temp.file, Some(meta.uid()), Some(meta.gid()));
    }
    let mode = req
        .mode
        .or(existing.map(|m| m.mode() & 0o7777))
        .unwrap_or(DEFAULT_MODE);
    temp.commit(&target, mode).on(path)?;
    Ok(written)
}

/// Opens a download as the request's user: the file's size, the length of the range, and a
/// reader of exactly that range (the user's permissions matter only for the open).
pub fn open_download(req: &DownloadRequest) -> Result<(u64, u64, impl Read), Failure> {
    let path = absolute(Some(&req.path), "path")?;
    let _user = creds::as_user(req.user.as_deref())?;
    let (mut file, meta) = open_regular(path)?;
    let size = meta.len();
    if req.offset > size {
        return Err(Failure::invalid(format!(
            "offset {} is past the end of {} ({size} bytes)",
            req.offset,
            path.display()
        )));
    }
    let available = size - req.offset;
    let length = req.length.map_or(available, |l| l.min(available));
    file.seek(SeekFrom::Start(req.offset)).on(path)?;
    Ok((size, length, file.take(length)))
}

/// A temporary file beside a target, removed when dropped unless committed.
pub struct TempFile {
    path: PathBuf,
    pub file: File,
    committed: bool,
}

/// Longest part of the target's name kept in the temporary name, so that stays under NAME_MAX.
const MAX_NAME_PART: usize = 200;
/// Temporary names drawn before giving up (random ones collide only by malice).
const TEMP_TRIES: usize = 100;

impl TempFile {
    /// Creates `.<name>.hearth-<random>` in the target's directory, readable by its owner only
    /// until it is committed.
    pub fn beside(target: &Path) -> io::Result<TempFile> {
        let (Some(dir), Some(name)) = (target.parent(), target.file_name()) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the path names no file",
            ));
        };
        let name = &name.as_bytes()[..name.len().min(MAX_NAME_PART)];
        for _ in 0..TEMP_TRIES {
            let mut temp = b".".to_vec();
            temp.extend_from_slice(name);
            temp.extend_from_slice(format!(".hearth-{:016x}", random()).as_bytes());
            let path = dir.join(OsString::from_vec(temp));
            match OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
            {
                Ok(file) => {
                    return Ok(TempFile {
                        path,
                        file,
                        committed: false,
                    })
                }
                // Someone else's name: draw another.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "no free temporary name beside the file",
        ))
    }

    /// Gives the file `mode`, flushes it, renames it over `target` and flushes the directory.
    pub fn commit(mut self, target: &Path, mode: u32) -> io::Result<()> {
        // After any fchown: a chown clears set-id bits.
        self.file.set_permissions(Permissions::from_mode(mode))?;
        self.file.sync_all()?;
        fs::rename(&self.path, target)?;
        self.committed = true;
        // The rename is durable once the directory is; a directory the user may not read
        // cannot be opened to flush it, and the rename stands anyway.
        if let Some(dir) = target.parent() {
            if let Ok(dir) = File::open(dir) {
                dir.sync_all()?;
            }
        }
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Unpredictable bits for temporary names (in a shared directory others could guess them).
fn random() -> u64 {
    let mut bytes = [0u8; 8];
    // SAFETY: the kernel writes at most `bytes.len()` bytes into the buffer.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), libc::GRND_NONBLOCK) };
    if n == bytes.len() as isize {
        return u64::from_ne_bytes(bytes);
    }
    // No entropy yet (early boot): still unique, since the name is created exclusively.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    now.as_nanos() as u64 ^ u64::from(std::process::id()) << 32
}
