//! Moving snapshots through object storage. Upload: every part PUT straight from its section of
//! the artifact file with an exact Content-Length, in parallel under a bound, transient failures
//! retried with exponential backoff and jitter. Download: parallel ranged GETs into a staging
//! file (one streaming GET of the whole object from a server that ignores Range), bodies
//! streamed and capped at the length asked for, zero blocks left as holes, sha256 checked before
//! the file joins the content-addressed blob store (so a second restore of the same artifacts
//! downloads nothing).

use super::Service;
use crate::access;
use crate::blobs::{Lease, Leases};
use crate::error::{Error, Result};
use crate::storage;
use hearth_api::{CompletedPart, ErrorCode, UploadRequest, UploadResponse, UploadedArtifact};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::Semaphore;

const ATTEMPTS: u32 = 5;
const BACKOFF_BASE: Duration = Duration::from_millis(100);
/// Size of one ranged GET.
pub const CHUNK: u64 = 8 << 20;

/// Why one HTTP exchange failed, and whether trying again may help.
struct Failure {
    message: String,
    transient: bool,
}

fn from_reqwest(e: reqwest::Error) -> Failure {
    let mut message = e.to_string();
    let mut cur = std::error::Error::source(&e);
    while let Some(inner) = cur {
        message.push_str(": ");
        message.push_str(&inner.to_string());
        cur = inner.source();
    }
    // Connection refused or reset, timeouts, a body cut short: all worth another try.
    Failure {
        message,
        transient: true,
    }
}

fn from_status(status: reqwest::StatusCode, body: &str) -> Failure {
    let snippet: String = body.chars().take(300).collect();
    Failure {
        message: format!("HTTP {status}: {}", snippet.trim()),
        transient: status.is_server_error() || status.as_u16() == 429 || status.as_u16() == 408,
    }
}

/// Runs `attempt` until it succeeds, fails for good, or runs out of tries; waits 100 ms, 200 ms,
/// 400 ms… (plus up to 100 ms of jitter) between tries.
async fn with_retries<T, F, Fut>(mut attempt: F) -> std::result::Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<T, Failure>>,
{
    let mut last = String::new();
    for n in 0..ATTEMPTS {
        match attempt().await {
            Ok(v) => return Ok(v),
            Err(f) if f.transient && n + 1 < ATTEMPTS => {
                let jitter = Duration::from_millis(rand::random::<u64>() % 100);
                tokio::time::sleep(BACKOFF_BASE * 2u32.pow(n) + jitter).await;
                last = f.message;
            }
            Err(f) => return Err(f.message),
        }
    }
    Err(format!("{last} (after {ATTEMPTS} attempts)"))
}

impl Service {
    /// Marks a snapshot in use by a transfer; a snapshot being deleted is refused.
    pub(super) fn use_snapshot(self: &Arc<Self>, id: &str) -> Result<SnapshotUse> {
        let mut uses = self.snapshot_uses.lock().unwrap_or_else(|e| e.into_inner());
        let n = uses.entry(id.to_string()).or_insert(0);
        if *n < 0 {
            return Err(Error::conflict(format!("snapshot {id} is being deleted")));
        }
        *n += 1;
        Ok(SnapshotUse {
            svc: self.clone(),
            id: id.to_string(),
        })
    }

    /// Claims a snapshot for deletion; one in use by a transfer is refused rather than torn.
    pub(super) fn claim_for_delete(&self, id: &str) -> Result<()> {
        let mut uses = self.snapshot_uses.lock().unwrap_or_else(|e| e.into_inner());
        match uses.get(id).copied().unwrap_or(0) {
            0 => {
                uses.insert(id.to_string(), -1);
                Ok(())
            }
            n if n > 0 => Err(Error::conflict(format!(
                "snapshot {id} is being uploaded or restored; delete it afterwards"
            ))),
            _ => Err(Error::conflict(format!(
                "snapshot {id} is already being deleted"
            ))),
        }
    }

    pub(super) fn release_delete(&self, id: &str) {
        self.snapshot_uses
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }

    pub async fn upload_snapshot(
        self: &Arc<Self>,
        id: &str,
        req: UploadRequest,
    ) -> Result<UploadResponse> {
        let snap = self.ready_snapshot(id)?;
        let _in_use = self.use_snapshot(id)?;
        let dir = self.snapshot_dir(id);
        let mut jobs = Vec::new();
        for a in &req.artifacts {
            let art = snap
                .artifacts
                .iter()
                .find(|x| x.id == a.artifact_id)
                .ok_or_else(|| {
                    Error::not_found(format!("snapshot {id} has no artifact {}", a.artifact_id))
                })?;
            if a.parts.is_empty() {
                return Err(Error::invalid(format!(
                    "artifact {}: no parts",
                    a.artifact_id
                )));
            }
            let mut numbers = std::collections::HashSet::new();
            for p in &a.parts {
                let end = p.offset_bytes.checked_add(p.size_bytes);
                if !(1..=10_000).contains(&p.part_number)
                    || !numbers.insert(p.part_number)
                    || p.size_bytes == 0
                    || end.is_none_or(|e| e > art.size_bytes)
                {
                    return Err(Error::invalid(format!(
                        "artifact {} part {}: part numbers run 1..10000 once each, and every part \
                         lies within the artifact's {} bytes",
                        a.artifact_id, p.part_number, art.size_bytes
                    )));
                }
                access::object_url(
                    &format!(
                        "artifact {} part {}: upload_url",
                        a.artifact_id, p.part_number
                    ),
                    &p.upload_url,
                )?;
                jobs.push((a.artifact_id.clone(), dir.join(&art.name), p.clone()));
            }
        }
        let sem = Arc::new(Semaphore::new(self.cfg.transfer_concurrency.max(1)));
        let mut set = tokio::task::JoinSet::new();
        for (artifact, path, part) in jobs {
            let (sem, http) = (sem.clone(), self.http.clone());
            set.spawn(async move {
                let _permit = sem.acquire_owned().await;
                let etag = with_retries(|| put_part(&http, &path, &part)).await;
                (artifact, part.part_number, etag)
            });
        }
        let mut done: Vec<UploadedArtifact> = req
            .artifacts
            .iter()
            .map(|a| UploadedArtifact {
                artifact_id: a.artifact_id.clone(),
                completed_parts: Vec::new(),
                sha256_hex: None,
            })
            .collect();
        // Digests not known yet are computed while the parts travel.
        let (hashed, uploaded) = tokio::join!(
            self.hashed_snapshot(id),
            Self::finish_parts(&mut set, &mut done)
        );
        uploaded?;
        let hashed = hashed?;
        for d in &mut done {
            d.completed_parts.sort_by_key(|p| p.part_number);
            d.sha256_hex = hashed
                .artifacts
                .iter()
                .find(|a| a.id == d.artifact_id)
                .and_then(|a| a.sha256_hex.clone());
        }
        Ok(UploadResponse { artifacts: done })
    }

    /// Collects the parts' etags as their uploads finish.
    async fn finish_parts(
        set: &mut tokio::task::JoinSet<(String, u32, std::result::Result<String, String>)>,
        done: &mut [UploadedArtifact],
    ) -> Result<()> {
        while let Some(joined) = set.join_next().await {
            let (artifact, part_number, etag) =
                joined.map_err(|e| Error::internal(e.to_string()))?;
            let etag = etag.map_err(|e| {
                Error::upstream(format!(
                    "uploading artifact {artifact} part {part_number}: {e}"
                ))
            })?;
            let entry = done
                .iter_mut()
                .find(|d| d.artifact_id == artifact)
                .expect("known");
            entry
                .completed_parts
                .push(CompletedPart { part_number, etag });
        }
        Ok(())
    }

    /// The blob with this sha256, downloading it from `url` when the store lacks it, leased to
    /// the operation that `leases` belong to (public for the transfer benchmark).
    pub async fn fetch_verified(
        &self,
        name: &str,
        url: &str,
        sha256: &str,
        size: u64,
        leases: &Leases,
    ) -> Result<PathBuf> {
        let valid = sha256.len() == 64 && sha256.bytes().all(|b| b.is_ascii_hexdigit());
        if !valid {
            return Err(Error::invalid(format!(
                "artifact {name}: sha256_hex must be 64 hex digits"
            )));
        }
        access::object_url(&format!("artifact {name}: download_url"), url)?;
        let sha256 = sha256.to_ascii_lowercase();
        let blobs = self.artifacts.blobs();
        let mut lease = blobs.lease(&sha256);
        let key = format!("sha256:{sha256}");
        let path = blobs
            .one_at_a_time(&key, self.download_blob(name, url, size, &mut lease))
            .await?;
        leases.hold(lease);
        blobs.evict_over_budget().await;
        Ok(path)
    }

    async fn download_blob(
        &self,
        name: &str,
        url: &str,
        size: u64,
        lease: &mut Lease,
    ) -> Result<PathBuf> {
        if let Some(blob) = lease.find(size).await? {
            return Ok(blob.path);
        }
        let staged = self.artifacts.blobs().staging()?;
        staged
            .as_file()
            .set_len(size)
            .map_err(|e| storage::too_large_for_a_file(staged.path(), size, e))?;
        // One descriptor shared by every chunk: positioned writes need no seek.
        let file = Arc::new(staged.reopen()?);
        download(
            &self.http,
            name,
            url,
            size,
            self.cfg.transfer_concurrency,
            (file, staged.path()),
        )
        .await?;
        let path = staged.path().to_path_buf();
        let (_, got) = tokio::task::spawn_blocking(move || storage::sha256_sparse(&path))
            .await
            .map_err(|e| Error::internal(e.to_string()))??;
        let sha256 = lease.sha256();
        if got != sha256 {
            return Err(Error {
                code: ErrorCode::Integrity,
                message: format!("artifact {name}: sha256 {got} does not match {sha256}"),
            });
        }
        Ok(lease.commit(staged, size).await?.path)
    }
}

/// While alive, keeps its snapshot from being deleted.
pub struct SnapshotUse {
    svc: Arc<Service>,
    id: String,
}

impl Drop for SnapshotUse {
    fn drop(&mut self) {
        let mut uses = self
            .svc
            .snapshot_uses
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = uses.get_mut(&self.id) {
            *n -= 1;
            if *n == 0 {
                uses.remove(&self.id);
            }
        }
    }
}

/// PUTs one part from its section of the file; returns the ETag verbatim.
async fn put_part(
    http: &reqwest::Client,
    path: &Path,
    part: &hearth_api::UploadPart,
) -> std::result::Result<String, Failure> {
    let local = |e: std::io::Error| Failure {
        message: format!("reading {}: {e}", path.display()),
        transient: false,
    };
    let mut file = tokio::fs::File::open(path).await.map_err(local)?;
    file.seek(std::io::SeekFrom::Start(part.offset_bytes))
        .await
        .map_err(local)?;
    let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(
        file.take(part.size_bytes),
    ));
    let resp = http
        .put(&part.upload_url)
        .header(reqwest::header::CONTENT_LENGTH, part.size_bytes)
        .body(body)
        .send()
        .await
        .map_err(from_reqwest)?;
    let status = resp.status();
    if !status.is_success() {
        return Err(failure(resp).await);
    }
    let etag = resp
        .headers()
        .get(reqwest::header::ETAG)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    if etag.is_empty() {
        return Err(Failure {
            message: "the object store answered without an ETag".into(),
            transient: false,
        });
    }
    Ok(etag)
}

/// Fills `file` with the object of `size` bytes at `url`: parallel ranged GETs of [`CHUNK`]
/// bytes, or one GET of the whole object from a server that ignores Range.
async fn download(
    http: &reqwest::Client,
    name: &str,
    url: &str,
    size: u64,
    concurrency: usize,
    (file, path): (Arc<std::fs::File>, &Path),
) -> Result<()> {
    let upstream = |e: String| {
        let message = format!("downloading artifact {name}: {e}");
        // A chunk's failure arrives as text; a full disk must still read as one.
        if storage::reports_full_disk(&e) {
            Error::disk_full(path, &message)
        } else {
            Error::upstream(message)
        }
    };
    // At most `concurrency` chunks in flight, each a task: the count of tasks does not grow
    // with the size the caller claims.
    let mut set = tokio::task::JoinSet::new();
    let (chunks, mut next) = (size.div_ceil(CHUNK), 0);
    loop {
        while next < chunks && set.len() < concurrency.max(1) {
            let start = next * CHUNK;
            let len = CHUNK.min(size - start);
            let (http, url, file) = (http.clone(), url.to_string(), file.clone());
            set.spawn(async move {
                with_retries(|| get_chunk(&http, &url, start, len, size, &file)).await
            });
            next += 1;
        }
        let Some(joined) = set.join_next().await else {
            break;
        };
        let got = joined
            .map_err(|e| Error::internal(e.to_string()))?
            .map_err(upstream)?;
        if got == Chunk::WholeObject {
            // Every other chunk would bring the whole object too: one GET is enough.
            set.shutdown().await;
            tracing::info!(
                artifact = name,
                "the object store ignores Range: one GET of the whole object"
            );
            return with_retries(|| get_whole(http, url, size, &file))
                .await
                .map_err(upstream);
        }
    }
    Ok(())
}

/// What a ranged GET brought.
#[derive(Debug, PartialEq)]
enum Chunk {
    /// The requested bytes, written.
    Written,
    /// Nothing written: the server answers with the whole object (it ignores Range).
    WholeObject,
}

/// GETs bytes `start..start+len` of an object of `total` bytes and writes them at the same
/// offset. The answer may be a 206 or a 200 (some stores, such as `rclone serve s3`, answer a
/// range with 200); either way its `Content-Range`, when present, must name exactly these bytes.
async fn get_chunk(
    http: &reqwest::Client,
    url: &str,
    start: u64,
    len: u64,
    total: u64,
    file: &Arc<std::fs::File>,
) -> std::result::Result<Chunk, Failure> {
    let last = start + len - 1;
    let resp = http
        .get(url)
        .header(reqwest::header::RANGE, format!("bytes={start}-{last}"))
        .send()
        .await
        .map_err(from_reqwest)?;
    let status = resp.status();
    if !status.is_success() {
        return Err(failure(resp).await);
    }
    let partial = status == reqwest::StatusCode::PARTIAL_CONTENT;
    let length = resp.content_length();
    let bad = |message: String| Failure {
        message,
        transient: false,
    };
    if !partial && status != reqwest::StatusCode::OK {
        return Err(bad(format!(
            "HTTP {status} to a GET of bytes {start}-{last}"
        )));
    }
    match resp.headers().get(reqwest::header::CONTENT_RANGE) {
        Some(v) => {
            let named = v.to_str().ok().and_then(parse_content_range);
            if named
                .is_none_or(|(a, b, n)| (a, b) != (start, last) || n.is_some_and(|n| n != total))
            {
                return Err(bad(format!(
                    "asked for bytes {start}-{last} of {total}, the server sent Content-Range {v:?}"
                )));
            }
        }
        // Without Content-Range, only the length tells a 200 for the range from one for the
        // whole object; when even that is missing, the whole object is the safe guess.
        None if partial || len == total || length == Some(len) => {}
        None => match length {
            Some(n) if n != total => {
                return Err(bad(format!(
                    "asked for bytes {start}-{last} of {total}, the server sent {n} bytes with \
                     HTTP {status}"
                )))
            }
            _ => return Ok(Chunk::WholeObject),
        },
    }
    if let Some(n) = length.filter(|&n| n != len) {
        return Err(bad(format!(
            "asked for bytes {start}-{last}, the server announced {n} bytes"
        )));
    }
    write_body(resp, file, start, len).await?;
    Ok(Chunk::Written)
}

/// GETs the whole object of `size` bytes into `file`, for servers that ignore Range.
async fn get_whole(
    http: &reqwest::Client,
    url: &str,
    size: u64,
    file: &Arc<std::fs::File>,
) -> std::result::Result<(), Failure> {
    let resp = http.get(url).send().await.map_err(from_reqwest)?;
    if resp.status() != reqwest::StatusCode::OK {
        return Err(failure(resp).await);
    }
    if let Some(n) = resp.content_length().filter(|&n| n != size) {
        return Err(Failure {
            message: format!("the object is {n} bytes, expected {size} (is size_bytes right?)"),
            transient: false,
        });
    }
    write_body(resp, file, 0, size).await
}

/// Block in which a body is written; an all-zero block is skipped, so it stays a hole.
const BLOCK: usize = 1 << 20;

/// Streams a body of exactly `len` bytes into `file` at `offset`, one block in memory at a
/// time; a body that runs longer is cut off and refused, whatever its headers said.
async fn write_body(
    mut resp: reqwest::Response,
    file: &Arc<std::fs::File>,
    offset: u64,
    len: u64,
) -> std::result::Result<(), Failure> {
    let mut block = Vec::with_capacity(BLOCK.min(len as usize));
    let mut at = offset;
    let mut received = 0u64;
    while let Some(piece) = resp.chunk().await.map_err(from_reqwest)? {
        received += piece.len() as u64;
        if received > len {
            return Err(Failure {
                message: format!(
                    "bytes {offset}..{}: the server sent more than the {len} bytes asked for",
                    offset + len
                ),
                transient: false,
            });
        }
        let mut rest = &piece[..];
        while !rest.is_empty() {
            let n = (BLOCK - block.len()).min(rest.len());
            block.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
            if block.len() == BLOCK {
                block = write_block(file, at, block).await?;
                at += BLOCK as u64;
            }
        }
    }
    if received != len {
        return Err(Failure {
            message: format!(
                "bytes {offset}..{}: got {received} bytes, expected {len} (is size_bytes right?)",
                offset + len
            ),
            // A body cut short is most often the connection's doing.
            transient: true,
        });
    }
    write_block(file, at, block).await?;
    Ok(())
}

/// Writes `block` at `at` unless it is all zeros; hands the buffer back, emptied, for reuse.
async fn write_block(
    file: &Arc<std::fs::File>,
    at: u64,
    mut block: Vec<u8>,
) -> std::result::Result<Vec<u8>, Failure> {
    let failed = |message: String| Failure {
        message,
        transient: false,
    };
    if block.iter().any(|&b| b != 0) {
        let file = file.clone();
        block = tokio::task::spawn_blocking(move || file.write_all_at(&block, at).map(|()| block))
            .await
            .map_err(|e| failed(e.to_string()))?
            .map_err(|e| failed(format!("writing the staged file: {e}")))?;
    }
    block.clear();
    Ok(block)
}

/// `bytes a-b/n` or `bytes a-b/*` as (a, b, n).
fn parse_content_range(v: &str) -> Option<(u64, u64, Option<u64>)> {
    let (range, total) = v.trim().strip_prefix("bytes ")?.split_once('/')?;
    let (a, b) = range.split_once('-')?;
    let total = match total.trim() {
        "*" => None,
        n => Some(n.parse().ok()?),
    };
    Some((a.trim().parse().ok()?, b.trim().parse().ok()?, total))
}

/// A failed answer: its status and the start of its body, read no further (a body may be
/// endless).
async fn failure(mut resp: reqwest::Response) -> Failure {
    const KEEP: usize = 1024;
    let status = resp.status();
    let mut body = Vec::new();
    while body.len() < KEEP {
        let Ok(Some(piece)) = resp.chunk().await else {
            break;
        };
        body.extend_from_slice(&piece[..piece.len().min(KEEP - body.len())]);
    }
    from_status(status, &String::from_utf8_lossy(&body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::{HeaderMap, StatusCode};
    use axum::response::IntoResponse;
    use std::os::unix::fs::MetadataExt;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// How the loopback object store answers a ranged GET.
    #[derive(Clone, Copy)]
    enum Answer {
        /// 206 with Content-Range, as S3 does.
        Partial,
        /// 200 with the range and its Content-Range, as `rclone serve s3` does.
        OkWithContentRange,
        /// 200 with the range and only its Content-Length.
        OkWithLength,
        /// 200 with the whole object.
        IgnoresRange,
        /// 206 naming bytes one past those asked for.
        WrongContentRange,
        /// 206 with the right Content-Range and a body that never ends.
        Endless,
    }

    struct Store {
        url: String,
        /// GETs without a Range header.
        whole_gets: Arc<AtomicUsize>,
    }

    async fn store(answer: Answer, object: Arc<Vec<u8>>) -> Store {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/o", listener.local_addr().unwrap());
        let whole_gets = Arc::new(AtomicUsize::new(0));
        let counter = whole_gets.clone();
        let app = axum::Router::new().route(
            "/o",
            axum::routing::get(move |headers: HeaderMap| {
                let (object, counter) = (object.clone(), counter.clone());
                async move {
                    let range = headers
                        .get("range")
                        .and_then(|v| v.to_str().ok()?.strip_prefix("bytes=")?.split_once('-'))
                        .map(|(a, b)| (a.parse::<usize>().unwrap(), b.parse::<usize>().unwrap()));
                    let n = object.len();
                    let Some((a, b)) = range else {
                        counter.fetch_add(1, Ordering::SeqCst);
                        return object.to_vec().into_response();
                    };
                    let named =
                        |a: usize, b: usize| [("content-range", format!("bytes {a}-{b}/{n}"))];
                    let part = object[a..=b].to_vec();
                    match answer {
                        Answer::Partial => {
                            (StatusCode::PARTIAL_CONTENT, named(a, b), part).into_response()
                        }
                        Answer::OkWithContentRange => {
                            (StatusCode::OK, named(a, b), part).into_response()
                        }
                        Answer::OkWithLength => part.into_response(),
                        Answer::IgnoresRange => object.to_vec().into_response(),
                        Answer::WrongContentRange => {
                            (StatusCode::PARTIAL_CONTENT, named(a + 1, b + 1), part).into_response()
                        }
                        Answer::Endless => {
                            let forever = futures_util::stream::repeat_with(|| {
                                Ok::<_, std::io::Error>(bytes::Bytes::from(vec![1u8; 64 << 10]))
                            });
                            let body = axum::body::Body::from_stream(forever);
                            (StatusCode::PARTIAL_CONTENT, named(a, b), body).into_response()
                        }
                    }
                }
            }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Store { url, whole_gets }
    }

    /// Three chunks, the middle one all zeros, the last one short.
    fn object() -> Arc<Vec<u8>> {
        let size = 2 * CHUNK as usize + 4097;
        Arc::new(
            (0..size)
                .map(|i| {
                    if (CHUNK as usize..2 * CHUNK as usize).contains(&i) {
                        0
                    } else {
                        (i % 251) as u8 + 1
                    }
                })
                .collect(),
        )
    }

    /// Downloads the store's object into a fresh staging file; returns the file and the result.
    async fn fetch(store: &Store, size: u64) -> (tempfile::NamedTempFile, Result<()>) {
        let staged = tempfile::NamedTempFile::new().unwrap();
        staged.as_file().set_len(size).unwrap();
        let file = Arc::new(staged.reopen().unwrap());
        let http = reqwest::Client::new();
        let res = tokio::time::timeout(
            Duration::from_secs(60),
            download(&http, "memory", &store.url, size, 4, (file, staged.path())),
        )
        .await
        .expect("the download did not end");
        (staged, res)
    }

    async fn downloads_whole(answer: Answer) -> usize {
        let object = object();
        let store = store(answer, object.clone()).await;
        let (staged, res) = fetch(&store, object.len() as u64).await;
        res.unwrap();
        assert!(std::fs::read(staged.path()).unwrap() == *object);
        // The zero chunk was not written.
        let allocated = staged.as_file().metadata().unwrap().blocks() * 512;
        assert!(
            allocated < object.len() as u64 - CHUNK / 2,
            "{allocated} bytes allocated"
        );
        store.whole_gets.load(Ordering::SeqCst)
    }

    #[tokio::test]
    async fn ranges_answered_with_206_or_200() {
        for answer in [
            Answer::Partial,
            Answer::OkWithContentRange,
            Answer::OkWithLength,
        ] {
            assert_eq!(downloads_whole(answer).await, 0);
        }
    }

    #[tokio::test]
    async fn a_server_ignoring_ranges_gets_one_whole_get() {
        assert_eq!(downloads_whole(Answer::IgnoresRange).await, 1);
    }

    #[tokio::test]
    async fn a_wrong_content_range_is_refused() {
        let object = object();
        let store = store(Answer::WrongContentRange, object.clone()).await;
        let err = fetch(&store, object.len() as u64).await.1.unwrap_err();
        assert_eq!(err.code, ErrorCode::Upstream, "{err}");
        assert!(
            err.message.contains("downloading artifact memory")
                && err
                    .message
                    .contains("the server sent Content-Range \"bytes 1-"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_body_longer_than_asked_is_cut_off() {
        let object = object();
        let store = store(Answer::Endless, object.clone()).await;
        let err = fetch(&store, object.len() as u64).await.1.unwrap_err();
        assert!(err.message.contains("more than the"), "{err}");
    }

    #[test]
    fn content_ranges() {
        assert_eq!(
            parse_content_range("bytes 0-9/100"),
            Some((0, 9, Some(100)))
        );
        assert_eq!(parse_content_range("bytes 5-9/*"), Some((5, 9, None)));
        assert_eq!(parse_content_range("bytes */100"), None);
        assert_eq!(parse_content_range("items 0-9/100"), None);
    }
}
