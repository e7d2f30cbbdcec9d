//! Moving snapshots through object storage. Upload: every part PUT straight from its section of
//! the artifact file with an exact Content-Length, in parallel under a bound, transient failures
//! retried with exponential backoff and jitter. Download: parallel ranged GETs into a staging
//! file, zero chunks left as holes, sha256 checked before the file joins the content-addressed
//! blob store (so a second restore of the same artifacts downloads nothing).

use super::Service;
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
                reqwest::Url::parse(&p.upload_url).map_err(|e| {
                    Error::invalid(format!(
                        "artifact {} part {}: upload_url: {e}",
                        a.artifact_id, p.part_number
                    ))
                })?;
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
            })
            .collect();
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
        for d in &mut done {
            d.completed_parts.sort_by_key(|p| p.part_number);
        }
        Ok(UploadResponse { artifacts: done })
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
        reqwest::Url::parse(url)
            .map_err(|e| Error::invalid(format!("artifact {name}: download_url: {e}")))?;
        let staged = self.artifacts.blobs().staging()?;
        staged
            .as_file()
            .set_len(size)
            .map_err(|e| Error::io("sizing", staged.path(), e))?;
        let sem = Arc::new(Semaphore::new(self.cfg.transfer_concurrency.max(1)));
        let mut set = tokio::task::JoinSet::new();
        // One descriptor shared by every chunk: positioned writes need no seek.
        let file = Arc::new(staged.reopen()?);
        let chunks = size.div_ceil(CHUNK).max(1);
        for i in 0..chunks {
            let start = i * CHUNK;
            let len = CHUNK.min(size - start);
            let (sem, http, url, file) = (
                sem.clone(),
                self.http.clone(),
                url.to_string(),
                file.clone(),
            );
            set.spawn(async move {
                let _permit = sem.acquire_owned().await;
                with_retries(|| get_chunk(&http, &url, start, len, size, &file)).await
            });
        }
        while let Some(joined) = set.join_next().await {
            joined
                .map_err(|e| Error::internal(e.to_string()))?
                .map_err(|e| {
                    // A chunk's failure arrives as text; a full disk must still read as one.
                    if storage::reports_full_disk(&e) {
                        Error::disk_full(
                            staged.path(),
                            &format!("downloading artifact {name}: {e}"),
                        )
                    } else {
                        Error::upstream(format!("downloading artifact {name}: {e}"))
                    }
                })?;
        }
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
        let text = resp.text().await.unwrap_or_default();
        return Err(from_status(status, &text));
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

/// GETs bytes `start..start+len` of an object of `total` bytes and writes them at the same
/// offset; an all-zero chunk is not written, so it stays a hole.
async fn get_chunk(
    http: &reqwest::Client,
    url: &str,
    start: u64,
    len: u64,
    total: u64,
    file: &Arc<std::fs::File>,
) -> std::result::Result<(), Failure> {
    let whole = start == 0 && len == total;
    let resp = http
        .get(url)
        .header(
            reqwest::header::RANGE,
            format!("bytes={}-{}", start, start + len - 1),
        )
        .send()
        .await
        .map_err(from_reqwest)?;
    let status = resp.status();
    let ranged = status == reqwest::StatusCode::PARTIAL_CONTENT;
    if !(ranged || (status.is_success() && whole)) {
        let text = resp.text().await.unwrap_or_default();
        let mut f = from_status(status, &text);
        if status.is_success() {
            f.message = format!("the server ignored the Range header ({status})");
        }
        return Err(f);
    }
    let body = resp.bytes().await.map_err(from_reqwest)?;
    if body.len() as u64 != len {
        return Err(Failure {
            message: format!(
                "bytes {start}..{}: got {} bytes, expected {len} (is size_bytes right?)",
                start + len,
                body.len()
            ),
            transient: false,
        });
    }
    if body.iter().any(|&b| b != 0) {
        let file = file.clone();
        tokio::task::spawn_blocking(move || file.write_all_at(&body, start))
            .await
            .map_err(|e| Failure {
                message: e.to_string(),
                transient: false,
            })?
            .map_err(|e| Failure {
                message: format!("writing the staged file: {e}"),
                transient: false,
            })?;
    }
    Ok(())
}
