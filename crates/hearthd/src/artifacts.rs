//! The artifact cache: kernels, initrds and root filesystems named by URL, stored by content
//! (`images/blobs/<sha256>`). Concurrent requests for one URL fetch it once; a failed fetch
//! leaves no partial file (it is written to a temporary file that is removed unless renamed).

use crate::error::{Error, Result};
use crate::store::{CachedArtifact, Store};
use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::future::Future;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Blob {
    pub path: PathBuf,
    pub sha256: String,
    pub size_bytes: u64,
}

pub struct ArtifactCache {
    blobs: PathBuf,
    tmp: PathBuf,
    store: Arc<Store>,
    http: reqwest::Client,
    inflight: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// Chunk size for local imports; an all-zero chunk becomes a hole.
const CHUNK: usize = 1 << 20;

impl ArtifactCache {
    pub fn new(images_dir: &Path, store: Arc<Store>) -> Result<ArtifactCache> {
        let blobs = images_dir.join("blobs");
        let tmp = images_dir.join("tmp");
        std::fs::create_dir_all(&blobs)?;
        // Anything in tmp is from a fetch a crash interrupted.
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp)?;
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| Error::internal(format!("http client: {e}")))?;
        Ok(ArtifactCache {
            blobs,
            tmp,
            store,
            http,
            inflight: Mutex::new(HashMap::new()),
        })
    }

    /// The blob for `url`, fetched if it is not cached. `field` names the request field in errors.
    pub async fn fetch(&self, field: &str, url: &str) -> Result<Blob> {
        let source = Source::parse(url).map_err(|e| Error::invalid(format!("{field}: {e}")))?;
        self.one_at_a_time(url, self.fetch_locked(field, url, &source))
            .await
    }

    /// Runs `work` under the lock for `key`, so one fetch of a thing runs at a time and the
    /// callers that waited find its result. The lock goes once nobody holds or awaits it.
    pub async fn one_at_a_time<T>(&self, key: &str, work: impl Future<Output = T>) -> T {
        let gate = {
            let mut map = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
            map.entry(key.to_string()).or_default().clone()
        };
        let result = {
            let _held = gate.lock().await;
            work.await
        };
        let mut map = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        // One reference in the map, one here: nobody else waits.
        if Arc::strong_count(&gate) == 2 {
            map.remove(key);
        }
        result
    }

    async fn fetch_locked(&self, field: &str, url: &str, source: &Source) -> Result<Blob> {
        let validator = match source {
            Source::File(path) => {
                let meta = std::fs::metadata(path)
                    .map_err(|e| Error::invalid(format!("{field}: {}: {e}", path.display())))?;
                if !meta.is_file() {
                    return Err(Error::invalid(format!(
                        "{field}: {} is not a file",
                        path.display()
                    )));
                }
                format!(
                    "{}:{}:{}:{}",
                    meta.dev(),
                    meta.ino(),
                    meta.len(),
                    meta.mtime_nsec() + meta.mtime() * 1_000_000_000
                )
            }
            Source::Http(_) => String::new(),
        };
        if let Some(hit) = self.store.cached_artifact(url, &validator)? {
            let path = self.blobs.join(&hit.sha256);
            if std::fs::metadata(&path).is_ok_and(|m| m.len() == hit.size_bytes) {
                return Ok(Blob {
                    path,
                    sha256: hit.sha256,
                    size_bytes: hit.size_bytes,
                });
            }
        }
        let tmp = tempfile::NamedTempFile::new_in(&self.tmp)?;
        let (sha256, size_bytes) = match source {
            Source::File(path) => {
                let (path, file) = (path.clone(), tmp.reopen()?);
                tokio::task::spawn_blocking(move || import_sparse(&path, file))
                    .await
                    .map_err(|e| Error::internal(e.to_string()))?
                    .map_err(|e| Error::invalid(format!("{field}: reading {url}: {e}")))?
            }
            Source::Http(url) => self.download(field, url, tmp.reopen()?).await?,
        };
        let path = self.blobs.join(&sha256);
        if !path.exists() {
            tmp.persist(&path)
                .map_err(|e| Error::internal(e.to_string()))?;
        }
        let hit = CachedArtifact {
            sha256: sha256.clone(),
            size_bytes,
        };
        self.store.put_cached_artifact(url, &validator, &hit)?;
        Ok(Blob {
            path,
            sha256,
            size_bytes,
        })
    }

    async fn download(
        &self,
        field: &str,
        url: &reqwest::Url,
        file: std::fs::File,
    ) -> Result<(String, u64)> {
        let fail = |e: String| Error::upstream(format!("{field}: GET {url}: {e}"));
        let resp = self
            .http
            .get(url.clone())
            .send()
            .await
            .map_err(|e| fail(error_chain(&e)))?;
        if !resp.status().is_success() {
            return Err(fail(format!("HTTP {}", resp.status())));
        }
        let mut file = tokio::fs::File::from_std(file);
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        let mut body = resp.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| fail(error_chain(&e)))?;
            hasher.update(&chunk);
            size += chunk.len() as u64;
            tokio::io::AsyncWriteExt::write_all(&mut file, &chunk).await?;
        }
        file.sync_data().await?;
        Ok((hex::encode(hasher.finalize()), size))
    }
}

enum Source {
    File(PathBuf),
    Http(reqwest::Url),
}

impl Source {
    fn parse(url: &str) -> std::result::Result<Source, String> {
        let parsed = reqwest::Url::parse(url).map_err(|e| format!("bad URL {url:?}: {e}"))?;
        match parsed.scheme() {
            "file" => parsed
                .to_file_path()
                .map(Source::File)
                .map_err(|_| format!("bad file URL {url:?}")),
            "http" | "https" => Ok(Source::Http(parsed)),
            other => Err(format!(
                "unsupported URL scheme {other:?} in {url:?} (http, https, file)"
            )),
        }
    }
}

/// reqwest's top-level message hides the cause ("error sending request"); the chain has it.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        msg.push_str(": ");
        msg.push_str(&inner.to_string());
        cur = inner.source();
    }
    msg
}

/// Copies a local file into the cache while hashing it; all-zero chunks are left as holes.
fn import_sparse(src: &Path, mut dst: std::fs::File) -> std::io::Result<(String, u64)> {
    let mut from = std::fs::File::open(src)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut size = 0u64;
    loop {
        let n = read_full(&mut from, &mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        if buf[..n].iter().all(|&b| b == 0) {
            dst.seek(SeekFrom::Current(n as i64))?;
        } else {
            dst.write_all(&buf[..n])?;
        }
        size += n as u64;
    }
    dst.set_len(size)?;
    dst.sync_data()?;
    Ok((hex::encode(hasher.finalize()), size))
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hearth_api::ErrorCode;

    /// No blob and no partial download under the data root.
    fn assert_nothing_stored(root: &Path) {
        for sub in ["images/tmp", "images/blobs"] {
            let n = std::fs::read_dir(root.join(sub)).unwrap().count();
            assert_eq!(n, 0, "{sub} is not empty");
        }
    }

    fn cache(dir: &Path) -> ArtifactCache {
        let store = Arc::new(Store::open(&dir.join("s.db")).unwrap());
        ArtifactCache::new(&dir.join("images"), store).unwrap()
    }

    #[tokio::test]
    async fn file_urls_are_imported_once_by_content() {
        let dir = tempfile::tempdir().unwrap();
        let cache = cache(dir.path());
        let src = dir.path().join("kernel");
        let mut data = vec![0u8; 3 * CHUNK];
        data[CHUNK + 5] = 1;
        std::fs::write(&src, &data).unwrap();
        let url = format!("file://{}", src.display());
        let (a, b) = tokio::join!(
            cache.fetch("kernel_image_url", &url),
            cache.fetch("kernel_image_url", &url)
        );
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!(a.path, b.path);
        assert_eq!(a.sha256, hex::encode(Sha256::digest(&data)));
        assert_eq!(std::fs::read(&a.path).unwrap(), data);
        assert_eq!(
            std::fs::read_dir(dir.path().join("images/tmp"))
                .unwrap()
                .count(),
            0
        );
        // A changed file is read again.
        std::fs::write(&src, b"new").unwrap();
        let c = cache.fetch("kernel_image_url", &url).await.unwrap();
        assert_ne!(c.sha256, a.sha256);
    }

    /// A loopback HTTP server: `/blob` serves `body` slowly (so fetches overlap), `/cut`
    /// promises more than it sends, anything else is 404. Returns its address and a hit count.
    async fn serve(body: Vec<u8>) -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let counter = hits.clone();
        tokio::spawn(async move {
            loop {
                let (mut conn, _) = listener.accept().await.unwrap();
                let (body, hits) = (body.clone(), counter.clone());
                tokio::spawn(async move {
                    let mut req = vec![0u8; 4096];
                    let n = conn.read(&mut req).await.unwrap();
                    let line = String::from_utf8_lossy(&req[..n]).to_string();
                    hits.fetch_add(1, Ordering::SeqCst);
                    let head = |len: usize, status: &str| {
                        format!("HTTP/1.1 {status}\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n")
                    };
                    if line.starts_with("GET /blob ") {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        conn.write_all(head(body.len(), "200 OK").as_bytes())
                            .await
                            .unwrap();
                        conn.write_all(&body).await.unwrap();
                    } else if line.starts_with("GET /cut ") {
                        conn.write_all(head(body.len() * 2, "200 OK").as_bytes())
                            .await
                            .unwrap();
                        conn.write_all(&body).await.unwrap();
                    } else {
                        conn.write_all(head(0, "404 Not Found").as_bytes())
                            .await
                            .unwrap();
                    }
                });
            }
        });
        (addr, hits)
    }

    #[tokio::test]
    async fn http_urls_download_once_even_when_asked_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let cache = cache(dir.path());
        let body: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
        let (addr, hits) = serve(body.clone()).await;
        let url = format!("http://{addr}/blob");
        let (a, b, c) = tokio::join!(
            cache.fetch("rootfs_url", &url),
            cache.fetch("rootfs_url", &url),
            cache.fetch("rootfs_url", &url)
        );
        let (a, b, c) = (a.unwrap(), b.unwrap(), c.unwrap());
        assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!((a.path == b.path, b.path == c.path), (true, true));
        assert_eq!(std::fs::read(&a.path).unwrap(), body);
        assert_eq!(a.sha256, hex::encode(Sha256::digest(&body)));
        cache.fetch("rootfs_url", &url).await.unwrap();
        assert_eq!(
            hits.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "served from the cache"
        );
    }

    #[tokio::test]
    async fn failed_downloads_leave_no_partial_file() {
        let dir = tempfile::tempdir().unwrap();
        let cache = cache(dir.path());
        let (addr, _) = serve(vec![1u8; 100_000]).await;
        for path in ["cut", "missing"] {
            let err = cache
                .fetch("kernel_image_url", &format!("http://{addr}/{path}"))
                .await
                .unwrap_err();
            assert_eq!(err.code, ErrorCode::Upstream, "{path}: {}", err.message);
            assert!(err.message.contains("kernel_image_url"), "{}", err.message);
        }
        assert_nothing_stored(dir.path());
    }

    #[tokio::test]
    async fn bad_sources_are_clear_errors_and_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let cache = cache(dir.path());
        let missing = cache
            .fetch("rootfs_url", "file:///nonexistent/rootfs")
            .await
            .unwrap_err();
        assert_eq!(missing.code, ErrorCode::Invalid);
        assert!(
            missing.message.contains("rootfs_url"),
            "{}",
            missing.message
        );
        let scheme = cache.fetch("rootfs_url", "ftp://x/y").await.unwrap_err();
        assert_eq!(scheme.code, ErrorCode::Invalid);
        // Nothing listens on port 1 of loopback.
        let down = cache
            .fetch("rootfs_url", "http://127.0.0.1:1/rootfs")
            .await
            .unwrap_err();
        assert_eq!(down.code, ErrorCode::Upstream);
        assert_nothing_stored(dir.path());
    }
}
