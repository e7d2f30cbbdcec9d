//! The buffered file operations of `POST /machines/{id}/files/ops`.

use super::transfer::{TempFile, DEFAULT_MODE};
use super::walk::{self, Errors, Sorted};
use super::{absolute, conflict, creds, too_large, version, OnPath};
use crate::failure::Failure;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use chrono::{DateTime, SecondsFormat};
use hearth_proto::files::{
    Entry, EntryType, FileOp, FileResult, Match, Operation, MAX_BUFFERED, MAX_ENTRIES,
};
use regex::bytes::RegexBuilder;
use std::fs::{self, File, Metadata, OpenOptions, Permissions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// `grep`'s matches when the request names no limit.
const DEFAULT_MAX_MATCHES: u32 = 1000;
/// Longest line a match carries (longer ones are cut at a character boundary).
const MAX_LINE: usize = 4096;
/// Most bytes of matched lines one `grep` returns, so its reply fits a message.
const MAX_MATCHED_BYTES: usize = MAX_BUFFERED as usize;

/// Runs one buffered operation as its user.
pub fn op(req: &FileOp) -> Result<FileResult, Failure> {
    let path = absolute(req.path.as_deref(), "path")?;
    let _user = creds::as_user(req.user.as_deref())?;
    match req.operation {
        Operation::ReadText => read(path, true),
        Operation::ReadBytes => read(path, false),
        Operation::WriteText => write(req, path, Payload::Text),
        Operation::WriteBytes => write(req, path, Payload::Base64),
        Operation::Remove => remove(path, req.recursive.unwrap_or(false)),
        Operation::List => list(path, req),
        Operation::Stat => {
            let meta = fs::symlink_metadata(path).on(path)?;
            Ok(FileResult {
                stat: Some(entry(path, &meta)),
                ..FileResult::default()
            })
        }
        Operation::Exists => exists(path),
        Operation::Patch => patch(path, req),
        Operation::ReadRange => read_range(path, req),
        Operation::WriteRange => write_range(path, req),
        Operation::Mkdir => mkdir(path, req),
        Operation::Move => {
            let to = absolute(req.to.as_deref(), "to")?;
            fs::rename(path, to).map_err(|e| match e.kind() {
                io::ErrorKind::CrossesDevices => conflict(
                    path,
                    format!(
                        "{} is on another file system; move does not copy",
                        to.display()
                    ),
                ),
                _ => Failure::io(format!("{} -> {}", path.display(), to.display()), &e),
            })?;
            Ok(FileResult::default())
        }
        Operation::Grep => grep(path, req),
        Operation::Chmod => chmod(path, req),
        Operation::Chown => chown(path, req),
    }
}

fn read(path: &Path, text: bool) -> Result<FileResult, Failure> {
    let (data, _) = read_whole(path)?;
    let mut result = FileResult {
        version: Some(version(&data)),
        ..FileResult::default()
    };
    if text {
        let text = String::from_utf8(data)
            .map_err(|_| Failure::invalid(format!("{} is not UTF-8 text", path.display())))?;
        result.content = Some(text);
    } else {
        result.content_base64 = Some(B64.encode(&data));
    }
    Ok(result)
}

/// Opens a regular file for reading (a FIFO does not block the open).
pub(super) fn open_regular(path: &Path) -> Result<(File, Metadata), Failure> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .on(path)?;
    let meta = file.metadata().on(path)?;
    if meta.is_dir() {
        return Err(conflict(path, "is a directory"));
    }
    if !meta.is_file() {
        return Err(Failure::invalid(format!(
            "{} is not a regular file",
            path.display()
        )));
    }
    Ok((file, meta))
}

/// A whole regular file, at most [`MAX_BUFFERED`] bytes of it.
fn read_whole(path: &Path) -> Result<(Vec<u8>, Metadata), Failure> {
    let (file, meta) = open_regular(path)?;
    if meta.len() > MAX_BUFFERED {
        return Err(too_large(path, meta.len()));
    }
    let mut data = Vec::with_capacity(meta.len() as usize);
    // It may have grown since the stat.
    file.take(MAX_BUFFERED + 1)
        .read_to_end(&mut data)
        .on(path)?;
    if data.len() as u64 > MAX_BUFFERED {
        return Err(too_large(path, data.len() as u64));
    }
    Ok((data, meta))
}

enum Payload {
    Text,
    Base64,
    Either,
}

/// The content a write carries, at most [`MAX_BUFFERED`] bytes.
fn payload(req: &FileOp, path: &Path, kind: Payload) -> Result<Vec<u8>, Failure> {
    let data = match (kind, &req.content, &req.content_base64) {
        (Payload::Text | Payload::Either, Some(text), None) => text.as_bytes().to_vec(),
        (Payload::Base64 | Payload::Either, None, Some(b64)) => B64
            .decode(b64)
            .map_err(|e| Failure::invalid(format!("content_base64: {e}")))?,
        (Payload::Text, _, _) => return Err(Failure::invalid("content is required")),
        (Payload::Base64, _, _) => return Err(Failure::invalid("content_base64 is required")),
        (Payload::Either, _, _) => {
            return Err(Failure::invalid(
                "one of content and content_base64 is required",
            ))
        }
    };
    if data.len() as u64 > MAX_BUFFERED {
        return Err(too_large(path, data.len() as u64));
    }
    Ok(data)
}

/// Opens a file for writing, creating it with `mode` (0644 when absent) when it is missing.
fn open_for_write(path: &Path, mode: Option<u32>, truncate: bool) -> io::Result<File> {
    match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode.unwrap_or(0o644))
        .open(path)
    {
        Ok(file) => {
            // Exactly the mode asked for, whatever the umask took away.
            if let Some(mode) = mode {
                file.set_permissions(Permissions::from_mode(mode))?;
            }
            Ok(file)
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            OpenOptions::new().write(true).truncate(truncate).open(path)
        }
        Err(e) => Err(e),
    }
}

/// Writes a whole file through a temporary one renamed into place, so a write that fails (a
/// full disk) leaves the old content: an existing file keeps its owner and mode, a new one gets
/// `mode`.
fn write(req: &FileOp, path: &Path, kind: Payload) -> Result<FileResult, Failure> {
    let data = payload(req, path, kind)?;
    match fs::metadata(path) {
        Ok(meta) if meta.is_file() => {
            // Through a symlink to the file it names: the link stays.
            let target = fs::canonicalize(path).on(path)?;
            replace_contents(&target, &data, &meta)?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let mut temp = TempFile::beside(path).on(path)?;
            temp.file.write_all(&data).on(path)?;
            temp.commit(path, req.mode.unwrap_or(DEFAULT_MODE))
                .on(path)?;
        }
        // A directory or a device: opening it says what is wrong.
        _ => {
            let mut file = open_for_write(path, req.mode, true).on(path)?;
            file.write_all(&data).on(path)?;
        }
    }
    Ok(FileResult {
        version: Some(version(&data)),
        ..FileResult::default()
    })
}

fn remove(path: &Path, recursive: bool) -> Result<FileResult, Failure> {
    if path.parent().is_none() {
        return Err(Failure::invalid("refusing to remove /"));
    }
    let meta = fs::symlink_metadata(path).on(path)?;
    if meta.is_dir() {
        if recursive {
            fs::remove_dir_all(path)
        } else {
            fs::remove_dir(path)
        }
    } else {
        fs::remove_file(path)
    }
    .on(path)?;
    Ok(FileResult::default())
}

fn list(path: &Path, req: &FileOp) -> Result<FileResult, Failure> {
    let max_depth = match (req.recursive, req.depth) {
        (Some(true), _) => u32::MAX,
        (_, Some(0)) => return Err(Failure::invalid("depth must be at least 1")),
        (_, depth) => depth.unwrap_or(1),
    };
    let meta = fs::metadata(path).on(path)?;
    if !meta.is_dir() {
        return Err(conflict(path, "not a directory"));
    }
    let mut walk = Sorted::new(path, MAX_ENTRIES).on(path)?;
    let mut entries = Vec::new();
    let mut truncated = false;
    while let Some((child, depth)) = walk.next_path() {
        // Gone since its directory was read.
        let Ok(meta) = fs::symlink_metadata(&child) else {
            continue;
        };
        if meta.is_dir() && depth < max_depth {
            walk.descend(&child, depth + 1);
        }
        entries.push(entry(&child, &meta));
        if entries.len() == MAX_ENTRIES {
            truncated = walk.has_more();
            break;
        }
    }
    Ok(FileResult {
        entries: Some(entries),
        truncated: truncated || walk.truncated,
        ..FileResult::default()
    })
}

/// An entry from its own metadata (lstat); only its type follows a symlink.
fn entry(path: &Path, meta: &Metadata) -> Entry {
    let symlink = meta.file_type().is_symlink();
    let directory = if symlink {
        fs::metadata(path).is_ok_and(|m| m.is_dir())
    } else {
        meta.is_dir()
    };
    let target = symlink
        .then(|| fs::read_link(path).ok())
        .flatten()
        .map(|t| t.to_string_lossy().into_owned());
    let mtime = DateTime::from_timestamp(meta.mtime(), meta.mtime_nsec() as u32)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::AutoSi, true);
    Entry {
        path: path.to_string_lossy().into_owned(),
        name: path
            .file_name()
            .map_or_else(|| path.to_string_lossy(), |n| n.to_string_lossy())
            .into_owned(),
        kind: if directory {
            EntryType::Directory
        } else {
            EntryType::File
        },
        size_bytes: meta.len(),
        mode: meta.mode() & 0o7777,
        symlink,
        target,
        uid: meta.uid(),
        gid: meta.gid(),
        mtime,
    }
}

fn exists(path: &Path) -> Result<FileResult, Failure> {
    let exists = match fs::symlink_metadata(path) {
        Ok(_) => true,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
            ) =>
        {
            false
        }
        Err(e) => return Err(Failure::io(path.display(), &e)),
    };
    Ok(FileResult {
        exists: Some(exists),
        ..FileResult::default()
    })
}

fn patch(path: &Path, req: &FileOp) -> Result<FileResult, Failure> {
    let Some(edits) = req.edits.as_ref().filter(|e| !e.is_empty()) else {
        return Err(Failure::invalid("edits are required"));
    };
    // The file a symlink points to is patched, not replaced by a file.
    let real = fs::canonicalize(path).on(path)?;
    let (data, meta) = read_whole(&real)?;
    let mut text = String::from_utf8(data)
        .map_err(|_| Failure::invalid(format!("{} is not UTF-8 text", path.display())))?;
    for edit in edits {
        if edit.find.is_empty() {
            return Err(Failure::invalid("an edit's find is empty"));
        }
        let mut found = text.match_indices(&edit.find).map(|(at, _)| at);
        let at = match (found.next(), found.next()) {
            (Some(at), None) => at,
            (None, _) => {
                return Err(conflict(
                    path,
                    format!("{} does not occur", excerpt(&edit.find)),
                ))
            }
            (Some(_), Some(_)) => {
                return Err(conflict(
                    path,
                    format!("{} occurs more than once", excerpt(&edit.find)),
                ))
            }
        };
        text.replace_range(at..at + edit.find.len(), &edit.replace);
        if text.len() as u64 > MAX_BUFFERED {
            return Err(too_large(path, text.len() as u64));
        }
    }
    replace_contents(&real, text.as_bytes(), &meta)?;
    Ok(FileResult {
        version: Some(version(text.as_bytes())),
        content: req.set_contents.unwrap_or(false).then_some(text),
        ..FileResult::default()
    })
}

/// A string for a message, cut short.
fn excerpt(s: &str) -> String {
    const MAX: usize = 80;
    match s.char_indices().nth(MAX) {
        Some((at, _)) => format!("{:?}…", &s[..at]),
        None => format!("{s:?}"),
    }
}

/// Replaces a file's content, atomically (a temporary file renamed over it, with its mode and
/// owner) when the user may; in place otherwise: when the directory is not writable for the
/// user, or the file's owner or group could not be kept.
fn replace_contents(path: &Path, data: &[u8], meta: &Metadata) -> Result<(), Failure> {
    if creds::current_fsuid() == 0 || meta.uid() == creds::current_fsuid() {
        match TempFile::beside(path) {
            Ok(mut temp) => {
                temp.file.write_all(data).on(path)?;
                if std::os::unix::fs::fchown(&temp.file, Some(meta.uid()), Some(meta.gid())).is_ok()
                {
                    return temp.commit(path, meta.mode() & 0o7777).on(path);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {}
            Err(e) => return Err(Failure::io(path.display(), &e)),
        }
    }
    let mut file = OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .on(path)?;
    file.write_all(data).on(path)
}

fn read_range(path: &Path, req: &FileOp) -> Result<FileResult, Failure> {
    let offset = req.offset.unwrap_or(0);
    if req.length.is_some_and(|l| l > MAX_BUFFERED) {
        return Err(too_large(path, req.length.unwrap_or_default()));
    }
    let (file, meta) = open_regular(path)?;
    let available = meta.len().saturating_sub(offset);
    let length = req.length.map_or(available, |l| l.min(available));
    if length > MAX_BUFFERED {
        return Err(too_large(path, length));
    }
    let mut data = vec![0u8; length as usize];
    let mut filled = 0;
    while filled < data.len() {
        match file.read_at(&mut data[filled..], offset + filled as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Failure::io(path.display(), &e)),
        }
    }
    // It may have shrunk since the stat.
    data.truncate(filled);
    Ok(FileResult {
        content_base64: Some(B64.encode(&data)),
        ..FileResult::default()
    })
}

fn write_range(path: &Path, req: &FileOp) -> Result<FileResult, Failure> {
    let data = payload(req, path, Payload::Either)?;
    let file = open_for_write(path, req.mode, false).on(path)?;
    file.write_all_at(&data, req.offset.unwrap_or(0)).on(path)?;
    Ok(FileResult::default())
}

fn mkdir(path: &Path, req: &FileOp) -> Result<FileResult, Failure> {
    let recursive = req.recursive.unwrap_or(false);
    if recursive && fs::metadata(path).is_ok_and(|m| m.is_dir()) {
        return Ok(FileResult::default());
    }
    fs::DirBuilder::new()
        .recursive(recursive)
        .create(path)
        .on(path)?;
    if let Some(mode) = req.mode {
        // Exactly the mode asked for, whatever the umask took away.
        fs::set_permissions(path, Permissions::from_mode(mode)).on(path)?;
    }
    Ok(FileResult::default())
}

fn grep(path: &Path, req: &FileOp) -> Result<FileResult, Failure> {
    let Some(pattern) = req.pattern.as_deref().filter(|p| !p.is_empty()) else {
        return Err(Failure::invalid("pattern is required"));
    };
    let pattern = if req.regex.unwrap_or(false) {
        pattern.to_string()
    } else {
        regex::escape(pattern)
    };
    let re = RegexBuilder::new(&pattern)
        .case_insensitive(req.case_insensitive.unwrap_or(false))
        .build()
        .map_err(|e| Failure::invalid(format!("pattern: {e}")))?;
    let max = match req.max_matches {
        Some(0) => return Err(Failure::invalid("max_matches must be at least 1")),
        Some(n) => (n as usize).min(MAX_ENTRIES),
        None => DEFAULT_MAX_MATCHES as usize,
    };
    let mut grep = Grep {
        re,
        max,
        matches: Vec::new(),
        bytes: 0,
        truncated: false,
    };
    let meta = fs::metadata(path).on(path)?;
    if meta.is_dir() {
        let mut walk = Sorted::new(path, MAX_ENTRIES).on(path)?;
        while let Some((child, depth)) = walk.next_path() {
            // Symlinks are not followed, to files or to directories.
            let Ok(meta) = fs::symlink_metadata(&child) else {
                continue;
            };
            if meta.is_dir() {
                walk.descend(&child, depth + 1);
            } else if meta.is_file() && meta.len() <= MAX_BUFFERED {
                // One that cannot be read (the user may not) is left out, as grep -s does.
                if let Ok((data, _)) = read_whole(&child) {
                    if !grep.scan(&child, &data) {
                        break;
                    }
                }
            }
        }
        grep.truncated |= walk.truncated;
    } else {
        let (data, _) = read_whole(path)?;
        grep.scan(path, &data);
    }
    Ok(FileResult {
        matches: Some(grep.matches),
        truncated: grep.truncated,
        ..FileResult::default()
    })
}

struct Grep {
    re: regex::bytes::Regex,
    max: usize,
    matches: Vec<Match>,
    /// Bytes of the matched lines so far.
    bytes: usize,
    truncated: bool,
}

impl Grep {
    /// Adds a file's matching lines; false once the limits are reached. A binary file (one with
    /// a NUL byte) has none.
    fn scan(&mut self, path: &Path, data: &[u8]) -> bool {
        if data.contains(&0) {
            return true;
        }
        let name = path.to_string_lossy();
        for (n, line) in data.split(|&b| b == b'\n').enumerate() {
            if !self.re.is_match(line) {
                continue;
            }
            if self.matches.len() == self.max || self.bytes >= MAX_MATCHED_BYTES {
                self.truncated = true;
                return false;
            }
            let line = String::from_utf8_lossy(line);
            let line = match line.char_indices().find(|&(at, _)| at >= MAX_LINE) {
                Some((at, _)) => &line[..at],
                None => &line,
            };
            self.bytes += line.len() + name.len();
            self.matches.push(Match {
                path: name.clone().into_owned(),
                line_number: n as u64 + 1,
                line: line.to_string(),
            });
        }
        true
    }
}

fn chmod(path: &Path, req: &FileOp) -> Result<FileResult, Failure> {
    let Some(mode) = req.mode else {
        return Err(Failure::invalid("mode is required"));
    };
    // The root follows a symlink, as chmod does; below it symlinks are left alone (chmod would
    // change what they point to, perhaps outside the tree).
    fs::set_permissions(path, Permissions::from_mode(mode)).on(path)?;
    if req.recursive.unwrap_or(false) {
        below(path, &mut |p, meta| {
            if meta.file_type().is_symlink() {
                return Ok(());
            }
            fs::set_permissions(p, Permissions::from_mode(mode))
        })?;
    }
    Ok(FileResult::default())
}

fn chown(path: &Path, req: &FileOp) -> Result<FileResult, Failure> {
    if req.uid.is_none() && req.gid.is_none() {
        return Err(Failure::invalid("uid or gid is required"));
    }
    std::os::unix::fs::chown(path, req.uid, req.gid).on(path)?;
    if req.recursive.unwrap_or(false) {
        below(path, &mut |p, _| {
            std::os::unix::fs::lchown(p, req.uid, req.gid)
        })?;
    }
    Ok(FileResult::default())
}

/// Applies `f` to everything under directory `root`, without following symlinks.
fn below(
    root: &Path,
    f: &mut dyn FnMut(&Path, &Metadata) -> io::Result<()>,
) -> Result<(), Failure> {
    // The root may be a symlink to the directory: its tree is what the caller means.
    let root = &fs::canonicalize(root).on(root)?;
    if !fs::metadata(root).on(root)?.is_dir() {
        return Ok(());
    }
    let mut failed = None;
    let result = walk::each(root, Errors::Stop, &mut |p, meta, depth| {
        if depth == 0 {
            return Ok(());
        }
        f(p, meta).inspect_err(|_| failed = Some(p.to_path_buf()))
    });
    result.map_err(|e| {
        let at = failed.unwrap_or_else(|| root.to_path_buf());
        Failure::io(at.display(), &e)
    })
}

#[cfg(test)]
mod tests;
