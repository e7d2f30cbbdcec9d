//! File operations for the host: buffered operations ([`op`]), streaming uploads and downloads,
//! tar archives both ways and inotify watches. Each runs as the request's user, with that user's
//! permissions ([`creds`]). The functions take plain readers and writers; the `serve_*` ones
//! connect those that stream a reply to the channel.

mod archive;
mod creds;
mod ops;
mod transfer;
mod walk;
mod watch;

pub use archive::{tar_create, tar_extract};
pub use ops::op;
pub use transfer::{open_download, upload};
pub use watch::watch;

use crate::channel::{Content, Port};
use crate::failure::Failure;
use hearth_proto::files::{DownloadRequest, TarRequest, WatchRequest, MAX_BUFFERED};
use hearth_proto::{ErrorKind, Reply};
use sha2::{Digest, Sha256};
use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::Arc;

/// Buffer of the streaming copies: big enough for the channel's frames, small enough to keep the
/// agent's memory flat however large the file.
const COPY_BUFFER: usize = 256 << 10;

/// Answers a download: the reply, then exactly the announced bytes as its stream.
pub fn serve_download(
    req: &DownloadRequest,
    id: u64,
    port: &Arc<Port>,
) -> Result<Option<Reply>, Failure> {
    let (size, length, mut file) = open_download(req)?;
    let mut content = port.reply_streaming(id, Reply::Download { size, length });
    match copy_exact(&mut file, &mut content, length) {
        Ok(()) => finish(content, "download"),
        // Dropping the content aborts the stream: the host sees the download fail.
        Err(e) => eprintln!("hearth-agent: download {}: {e}", req.path),
    }
    Ok(None)
}

/// Answers a tar archive of a path as the reply's stream.
pub fn serve_tar_create(
    req: &TarRequest,
    id: u64,
    port: &Arc<Port>,
) -> Result<Option<Reply>, Failure> {
    let mut started = false;
    let result = tar_create(req, || {
        started = true;
        port.reply_streaming(id, Reply::Streaming)
    });
    streamed(result, started, "tar", &req.path)
}

/// Answers a watch: events as JSON lines until the host cancels or the path goes away.
pub fn serve_watch(
    req: &WatchRequest,
    id: u64,
    port: &Arc<Port>,
) -> Result<Option<Reply>, Failure> {
    let mut started = false;
    let result = watch(
        req,
        || {
            started = true;
            port.reply_streaming(id, Reply::Streaming)
        },
        Content::cancelled,
    );
    streamed(result, started, "watch", &req.path)
}

/// A failure before the stream started is the reply; after, the reply has gone and the stream
/// was aborted (the content dropped), so it is only logged.
fn streamed(
    result: Result<Content, Failure>,
    started: bool,
    what: &str,
    path: &str,
) -> Result<Option<Reply>, Failure> {
    match result {
        Ok(content) if content.cancelled() => {}
        Ok(content) => finish(content, what),
        Err(failure) if !started => return Err(failure),
        Err(failure) => eprintln!("hearth-agent: {what} {path}: {}", failure.message),
    }
    Ok(None)
}

fn finish(content: Content, what: &str) {
    if let Err(e) = content.finish() {
        eprintln!("hearth-agent: {what}: {e}");
    }
}

/// Copies exactly `length` bytes; a reader that ends early (a file that shrank) is an error.
pub fn copy_exact(from: &mut impl Read, to: &mut impl Write, length: u64) -> io::Result<()> {
    let mut buf = vec![0u8; COPY_BUFFER];
    let mut left = length;
    while left > 0 {
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = match from.read(&mut buf[..want]) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("the file ended {left} bytes early"),
                ))
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(&buf[..n])?;
        left -= n as u64;
    }
    Ok(())
}

/// The request's path, which must be absolute.
fn absolute<'a>(path: Option<&'a str>, what: &str) -> Result<&'a Path, Failure> {
    let Some(path) = path.filter(|p| !p.is_empty()) else {
        return Err(Failure::invalid(format!("{what} is required")));
    };
    let path = Path::new(path);
    if !path.is_absolute() {
        return Err(Failure::invalid(format!(
            "{what} {} is not absolute",
            path.display()
        )));
    }
    Ok(path)
}

/// sha256 (hex) of a file's content: its version.
fn version(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn too_large(path: &Path, bytes: u64) -> Failure {
    Failure::new(
        ErrorKind::TooLarge,
        format!(
            "{}: {bytes} bytes is more than the {} MiB a buffered operation takes; use a \
             streaming transfer",
            path.display(),
            MAX_BUFFERED >> 20
        ),
    )
}

fn conflict(path: &Path, why: impl std::fmt::Display) -> Failure {
    Failure::new(ErrorKind::Conflict, format!("{}: {why}", path.display()))
}

/// I/O errors on a path become failures of the error's kind, naming the path.
trait OnPath<T> {
    fn on(self, path: &Path) -> Result<T, Failure>;
}

impl<T> OnPath<T> for io::Result<T> {
    fn on(self, path: &Path) -> Result<T, Failure> {
        self.map_err(|e| Failure::io(path.display(), &e))
    }
}

#[cfg(test)]
mod testing;
