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
pub const DEFAULT_MODE: u32 = 0o644;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::files::copy_exact;
    use crate::files::testing::*;
    use hearth_proto::ErrorKind;

    fn upload_req(path: &Path) -> UploadRequest {
        UploadRequest {
            path: path.to_str().unwrap().into(),
            mode: None,
            user: None,
        }
    }

    /// A body that gives `good` bytes, then fails as a cancelled transfer does.
    struct Broken {
        good: usize,
    }

    impl Read for Broken {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.good == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "the host cancelled the transfer",
                ));
            }
            let n = buf.len().min(self.good);
            buf[..n].fill(b'x');
            self.good -= n;
            Ok(n)
        }
    }

    #[test]
    fn upload_creates_and_replaces_whole_files() {
        let dir = scratch();
        let path = dir.path().join("up");
        let body = vec![7u8; 3 * COPY_BUFFER + 5];
        assert_eq!(
            upload(&upload_req(&path), &mut &body[..]).unwrap(),
            body.len() as u64
        );
        assert_eq!(fs::read(&path).unwrap(), body);
        assert_eq!(mode_of(&path), DEFAULT_MODE);

        // A replaced file keeps its mode and owner, unless a mode is asked for.
        fs::set_permissions(&path, Permissions::from_mode(0o600)).unwrap();
        std::os::unix::fs::chown(&path, Some(NOBODY_ID), Some(NOBODY_ID)).unwrap();
        assert_eq!(upload(&upload_req(&path), &mut &b"new"[..]).unwrap(), 3);
        assert_eq!(fs::read(&path).unwrap(), b"new");
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(
            (meta.mode() & 0o7777, meta.uid(), meta.gid()),
            (0o600, NOBODY_ID, NOBODY_ID)
        );
        let mut req = upload_req(&path);
        req.mode = Some(0o750);
        upload(&req, &mut &b""[..]).unwrap();
        assert_eq!((fs::read(&path).unwrap().len(), mode_of(&path)), (0, 0o750));
        assert_eq!(names(dir.path()), ["up"], "no temporary file left");

        // Through a symlink: the link stays and its target changes.
        symlink_to(&path, &dir.path().join("link"));
        upload(&upload_req(&dir.path().join("link")), &mut &b"via"[..]).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"via");
        assert!(fs::symlink_metadata(dir.path().join("link"))
            .unwrap()
            .file_type()
            .is_symlink());
    }

    fn symlink_to(target: &Path, link: &Path) {
        std::os::unix::fs::symlink(target, link).unwrap();
    }

    #[test]
    fn a_failed_upload_leaves_no_partial_file() {
        let dir = scratch();
        let path = dir.path().join("new");
        let err = upload(
            &upload_req(&path),
            &mut Broken {
                good: 5 * COPY_BUFFER,
            },
        )
        .unwrap_err();
        assert!(err.message.contains("cancelled"), "{err:?}");
        assert!(names(dir.path()).is_empty(), "{:?}", names(dir.path()));

        let old = dir.path().join("old");
        fs::write(&old, "before").unwrap();
        upload(&upload_req(&old), &mut Broken { good: 10 }).unwrap_err();
        assert_eq!(fs::read_to_string(&old).unwrap(), "before");
        assert_eq!(names(dir.path()), ["old"]);
    }

    #[test]
    fn upload_errors() {
        let dir = scratch();
        let fails = |req: &UploadRequest| upload(req, &mut &b"x"[..]).unwrap_err().kind;
        assert_eq!(fails(&upload_req(dir.path())), ErrorKind::Conflict);
        assert_eq!(
            fails(&upload_req(&dir.path().join("no/such"))),
            ErrorKind::NotFound
        );
        assert_eq!(fails(&upload_req(Path::new("rel"))), ErrorKind::Invalid);
        let mut req = upload_req(&dir.path().join("f"));
        req.mode = Some(0o10000);
        assert_eq!(fails(&req), ErrorKind::Invalid);

        // Nobody may not write into root's directory, but into its own.
        let mut req = upload_req(&dir.path().join("f"));
        req.user = Some(NOBODY.into());
        assert_eq!(fails(&req), ErrorKind::PermissionDenied);
        assert!(names(dir.path()).is_empty());
        let own = nobodys(dir.path(), "own");
        let mut req = upload_req(&own.join("f"));
        req.user = Some(NOBODY.into());
        upload(&req, &mut &b"mine"[..]).unwrap();
        assert_eq!(fs::metadata(own.join("f")).unwrap().uid(), NOBODY_ID);
    }

    fn download_req(path: &Path, offset: u64, length: Option<u64>) -> DownloadRequest {
        DownloadRequest {
            path: path.to_str().unwrap().into(),
            offset,
            length,
            user: None,
        }
    }

    fn download(req: &DownloadRequest) -> Result<(u64, u64, Vec<u8>), ErrorKind> {
        let (size, length, mut reader) = open_download(req).map_err(|f| f.kind)?;
        let mut out = Vec::new();
        copy_exact(&mut reader, &mut out, length).unwrap();
        assert_eq!(
            reader.read(&mut [0u8; 1]).unwrap(),
            0,
            "no more than the range"
        );
        Ok((size, length, out))
    }

    #[test]
    fn downloads_read_ranges() {
        let dir = scratch();
        let path = dir.path().join("d");
        let data: Vec<u8> = (0..=255u8).cycle().take(COPY_BUFFER * 2 + 3).collect();
        fs::write(&path, &data).unwrap();
        let size = data.len() as u64;
        assert_eq!(
            download(&download_req(&path, 0, None)),
            Ok((size, size, data.clone()))
        );
        assert_eq!(
            download(&download_req(&path, 10, Some(5))),
            Ok((size, 5, data[10..15].to_vec()))
        );
        assert_eq!(
            download(&download_req(&path, size - 2, Some(100))),
            Ok((size, 2, data[data.len() - 2..].to_vec()))
        );
        assert_eq!(
            download(&download_req(&path, size, None)),
            Ok((size, 0, vec![]))
        );
        assert_eq!(
            download(&download_req(&path, size + 1, None)),
            Err(ErrorKind::Invalid)
        );
        assert_eq!(
            download(&download_req(dir.path(), 0, None)),
            Err(ErrorKind::Conflict)
        );
        assert_eq!(
            download(&download_req(&dir.path().join("x"), 0, None)),
            Err(ErrorKind::NotFound)
        );
        fs::set_permissions(&path, Permissions::from_mode(0o600)).unwrap();
        let mut req = download_req(&path, 0, None);
        req.user = Some(NOBODY.into());
        assert_eq!(download(&req), Err(ErrorKind::PermissionDenied));
    }

    #[test]
    fn a_file_that_shrinks_fails_the_copy() {
        let mut out = Vec::new();
        let err = copy_exact(&mut &b"abc"[..], &mut out, 5).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }
}
