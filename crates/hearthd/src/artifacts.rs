//! The artifact cache: kernels, initrds and root filesystems named by URL, stored by content in
//! the blob store. Concurrent requests for one URL fetch it once; a failed fetch leaves no
//! partial file (it is written to a staging file that is removed unless committed).

use crate::access::{ArtifactSource, Caller, UrlPolicy};
use crate::blobs::{Blob, Blobs, Leases};
use crate::error::{Error, Result};
use crate::store::{CachedArtifact, Store};
use futures_util::StreamExt;
use hearth_api::ArtifactRef;
use sha2::{Digest, Sha256};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub struct ArtifactCache {
    blobs: Arc<Blobs>,
    store: Arc<Store>,
    http: reqwest::Client,
    policy: UrlPolicy,
    /// The largest artifact fetched: a server that sends without end fills no disk.
    max_bytes: u64,
}

/// Chunk size for local imports; an all-zero chunk becomes a hole.
const CHUNK: usize = 1 << 20;

impl ArtifactCache {
    /// `file://` URLs may point under `artifact_dirs`, and come from TCP callers only when
    /// `file_urls_over_tcp`.
    pub fn new(
        images_dir: &Path,
        store: Arc<Store>,
        max_cache_bytes: Option<u64>,
        artifact_dirs: &[PathBuf],
        file_urls_over_tcp: bool,
        max_bytes: u64,
    ) -> Result<ArtifactCache> {
        let blobs = Blobs::open(images_dir, store.clone(), max_cache_bytes)?;
        let policy = UrlPolicy::new(
            artifact_dirs,
            &[blobs.dir(), blobs.tmp_dir()],
            file_urls_over_tcp,
        )?;
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| Error::internal(format!("http client: {e}")))?;
        Ok(ArtifactCache {
            blobs,
            store,
            http,
            policy,
            max_bytes,
        })
    }

    pub fn blobs(&self) -> &Arc<Blobs> {
        &self.blobs
    }

    /// Checks the URLs of `artifact` for `caller` without fetching anything: a request that
    /// names a URL it may not is refused before it starts.
    pub fn check(&self, artifact: &ArtifactRef, caller: Caller) -> Result<()> {
        self.policy
            .artifact("kernel_image_url", &artifact.kernel_image_url, caller)?;
        self.policy
            .artifact("rootfs_url", &artifact.rootfs_url, caller)?;
        if let Some(url) = &artifact.initrd_url {
            self.policy.artifact("initrd_url", url, caller)?;
        }
        Ok(())
    }

    /// The blob for `url`, fetched if it is not cached, leased to the operation that `leases`
    /// belong to. `field` names the request field in errors.
    pub async fn fetch(
        &self,
        field: &str,
        url: &str,
        caller: Caller,
        leases: &Leases,
    ) -> Result<Blob> {
        let source = self.policy.artifact(field, url, caller)?;
        let blob = self
            .blobs
            .one_at_a_time(
                &format!("url:{url}"),
                self.fetch_locked(field, url, source, leases),
            )
            .await?;
        self.blobs.evict_over_budget().await;
        Ok(blob)
    }

    async fn fetch_locked(
        &self,
        field: &str,
        url: &str,
        source: ArtifactSource,
        leases: &Leases,
    ) -> Result<Blob> {
        // A file is opened (and checked again) before anything is looked up for it.
        let (validator, opened) = match source {
            ArtifactSource::File(path) => {
                let (file, meta) = self.policy.open(field, &path)?;
                if meta.len() > self.max_bytes {
                    return Err(self.too_large(field));
                }
                let validator = format!(
                    "{}:{}:{}:{}",
                    meta.dev(),
                    meta.ino(),
                    meta.len(),
                    meta.mtime_nsec() + meta.mtime() * 1_000_000_000
                );
                (validator, Opened::File(file))
            }
            ArtifactSource::Http(url) => (String::new(), Opened::Http(url)),
        };
        if let Some(hit) = self.store.cached_artifact(url, &validator)? {
            let lease = self.blobs.lease(&hit.sha256);
            if let Some(blob) = lease.find(hit.size_bytes).await? {
                leases.hold(lease);
                return Ok(blob);
            }
        }
        let staged = self.blobs.staging()?;
        let (sha256, size_bytes) = match opened {
            Opened::File(file) => {
                let dst = staged.reopen()?;
                tokio::task::spawn_blocking(move || import_sparse(file, dst))
                    .await
                    .map_err(|e| Error::internal(e.to_string()))?
                    .map_err(|e| match e {
                        Copy::Read(e) => Error::invalid(format!("{field}: reading {url}: {e}")),
                        Copy::Write(e) => self.blobs.write_error(e),
                    })?
            }
            Opened::Http(url) => self.download(field, &url, staged.reopen()?).await?,
        };
        let mut lease = self.blobs.lease(&sha256);
        // The same content may be in the store already, fetched from another source.
        let blob = match lease.find(size_bytes).await? {
            Some(blob) => blob,
            None => lease.commit(staged, size_bytes).await?,
        };
        let hit = CachedArtifact { sha256, size_bytes };
        self.store.put_cached_artifact(url, &validator, &hit)?;
        leases.hold(lease);
        Ok(blob)
    }

    fn too_large(&self, field: &str) -> Error {
        Error::too_large(format!(
            "{field}: the artifact is larger than {} bytes, the most a machine's disk may have \
             here (--max-storage-bytes)",
            self.max_bytes
        ))
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
        if resp.content_length().is_some_and(|n| n > self.max_bytes) {
            return Err(self.too_large(field));
        }
        let mut file = tokio::fs::File::from_std(file);
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        let mut body = resp.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| fail(error_chain(&e)))?;
            hasher.update(&chunk);
            size += chunk.len() as u64;
            if size > self.max_bytes {
                return Err(self.too_large(field));
            }
            tokio::io::AsyncWriteExt::write_all(&mut file, &chunk)
                .await
                .map_err(|e| self.blobs.write_error(e))?;
        }
        tokio::io::AsyncWriteExt::flush(&mut file)
            .await
            .map_err(|e| self.blobs.write_error(e))?;
        Ok((hex::encode(hasher.finalize()), size))
    }
}

/// A source ready to be read.
enum Opened {
    File(std::fs::File),
    Http(url::Url),
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

/// Which side of a copy failed: reading the source is the request's fault, writing the store's.
enum Copy {
    Read(std::io::Error),
    Write(std::io::Error),
}

/// Copies a local file into the cache while hashing it; all-zero chunks are left as holes.
fn import_sparse(
    mut from: std::fs::File,
    mut dst: std::fs::File,
) -> std::result::Result<(String, u64), Copy> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut size = 0u64;
    loop {
        let n = read_full(&mut from, &mut buf).map_err(Copy::Read)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        if buf[..n].iter().all(|&b| b == 0) {
            dst.seek(SeekFrom::Current(n as i64)).map_err(Copy::Write)?;
        } else {
            dst.write_all(&buf[..n]).map_err(Copy::Write)?;
        }
        size += n as u64;
    }
    dst.set_len(size).map_err(Copy::Write)?;
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
        ArtifactCache::new(
            &dir.join("images"),
            store,
            None,
            &[dir.to_path_buf()],
            false,
            u64::MAX,
        )
        .unwrap()
    }

    #[tokio::test]
    async fn file_urls_are_imported_once_by_content() {
        let dir = tempfile::tempdir().unwrap();
        let cache = cache(dir.path());
        let leases = Leases::default();
        let src = dir.path().join("kernel");
        let mut data = vec![0u8; 3 * CHUNK];
        data[CHUNK + 5] = 1;
        std::fs::write(&src, &data).unwrap();
        let url = format!("file://{}", src.display());
        let (a, b) = tokio::join!(
            cache.fetch("kernel_image_url", &url, Caller::Local, &leases),
            cache.fetch("kernel_image_url", &url, Caller::Local, &leases)
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
        let c = cache
            .fetch("kernel_image_url", &url, Caller::Local, &leases)
            .await
            .unwrap();
        assert_ne!(c.sha256, a.sha256);
    }

    /// A loopback HTTP server: `/blob` serves `body` slowly (so fetches overlap), `/cut`
    /// promises more than it sends, `/unannounced` sends it 100 times without a length,
    /// anything else is 404. Returns its address and a hit count.
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
                    } else if line.starts_with("GET /unannounced ") {
                        // No length: the body runs until the connection closes.
                        conn.write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
                            .await
                            .unwrap();
                        for _ in 0..100 {
                            if conn.write_all(&body).await.is_err() {
                                return;
                            }
                        }
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
        let leases = Leases::default();
        let body: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
        let (addr, hits) = serve(body.clone()).await;
        let url = format!("http://{addr}/blob");
        let (a, b, c) = tokio::join!(
            cache.fetch("rootfs_url", &url, Caller::Local, &leases),
            cache.fetch("rootfs_url", &url, Caller::Local, &leases),
            cache.fetch("rootfs_url", &url, Caller::Local, &leases)
        );
        let (a, b, c) = (a.unwrap(), b.unwrap(), c.unwrap());
        assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!((a.path == b.path, b.path == c.path), (true, true));
        assert_eq!(std::fs::read(&a.path).unwrap(), body);
        assert_eq!(a.sha256, hex::encode(Sha256::digest(&body)));
        cache
            .fetch("rootfs_url", &url, Caller::Local, &leases)
            .await
            .unwrap();
        assert_eq!(
            hits.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "served from the cache"
        );
    }

    #[tokio::test]
    async fn a_zero_filled_blob_is_fetched_again() {
        let dir = tempfile::tempdir().unwrap();
        let cache = cache(dir.path());
        let leases = Leases::default();
        let body: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8 + 1).collect();
        let (addr, hits) = serve(body.clone()).await;
        let url = format!("http://{addr}/blob");
        let blob = cache
            .fetch("rootfs_url", &url, Caller::Local, &leases)
            .await
            .unwrap();
        // A data root from a hearthd that renamed blobs in without flushing them: after a power
        // loss the index still names the blob, whose file is zero-filled, and no record vouches
        // for it.
        std::fs::write(&blob.path, vec![0u8; body.len()]).unwrap();
        rusqlite::Connection::open(dir.path().join("s.db"))
            .unwrap()
            .execute("DELETE FROM blobs", [])
            .unwrap();
        let again = cache
            .fetch("rootfs_url", &url, Caller::Local, &leases)
            .await
            .unwrap();
        assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 2);
        assert_eq!(again.path, blob.path);
        assert_eq!(std::fs::read(&again.path).unwrap(), body);
    }

    #[tokio::test]
    async fn failed_downloads_leave_no_partial_file() {
        let dir = tempfile::tempdir().unwrap();
        let cache = cache(dir.path());
        let leases = Leases::default();
        let (addr, _) = serve(vec![1u8; 100_000]).await;
        for path in ["cut", "missing"] {
            let err = cache
                .fetch(
                    "kernel_image_url",
                    &format!("http://{addr}/{path}"),
                    Caller::Local,
                    &leases,
                )
                .await
                .unwrap_err();
            assert_eq!(err.code, ErrorCode::Upstream, "{path}: {}", err.message);
            assert!(err.message.contains("kernel_image_url"), "{}", err.message);
        }
        assert_nothing_stored(dir.path());
    }

    #[tokio::test]
    async fn artifacts_past_the_largest_disk_are_refused_and_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(&dir.path().join("s.db")).unwrap());
        let cache = ArtifactCache::new(
            &dir.path().join("images"),
            store,
            None,
            &[dir.path().to_path_buf()],
            false,
            150_000,
        )
        .unwrap();
        let leases = Leases::default();
        let (addr, _) = serve(vec![1u8; 100_000]).await;
        let big = dir.path().join("big");
        std::fs::write(&big, vec![1u8; 150_001]).unwrap();
        for url in [
            format!("http://{addr}/cut"),
            format!("http://{addr}/unannounced"),
            format!("file://{}", big.display()),
        ] {
            let err = cache
                .fetch("rootfs_url", &url, Caller::Local, &leases)
                .await
                .unwrap_err();
            assert_eq!(err.code, ErrorCode::TooLarge, "{url}: {}", err.message);
            assert!(err.message.contains("150000 bytes"), "{}", err.message);
        }
        assert_nothing_stored(dir.path());
        // Up to the limit is fine.
        cache
            .fetch(
                "rootfs_url",
                &format!("http://{addr}/blob"),
                Caller::Local,
                &leases,
            )
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn bad_sources_are_clear_errors_and_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let cache = cache(dir.path());
        let leases = Leases::default();
        let missing = cache
            .fetch(
                "rootfs_url",
                "file:///nonexistent/rootfs",
                Caller::Local,
                &leases,
            )
            .await
            .unwrap_err();
        assert_eq!(missing.code, ErrorCode::Invalid);
        assert!(
            missing.message.contains("rootfs_url"),
            "{}",
            missing.message
        );
        // Host files outside the artifact directory, named or through a symlink in it, from
        // either listener: nothing is read.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink("/etc/passwd", &link).unwrap();
        for url in [
            "file:///etc/shadow".to_string(),
            "file:///proc/self/environ".to_string(),
            url::Url::from_file_path(&link).unwrap().into(),
        ] {
            for caller in [Caller::Local, Caller::Remote] {
                let err = cache
                    .fetch("initrd_url", &url, caller, &leases)
                    .await
                    .unwrap_err();
                assert_eq!(err.code, ErrorCode::Invalid, "{url}: {err}");
            }
        }
        let scheme = cache
            .fetch("rootfs_url", "ftp://x/y", Caller::Local, &leases)
            .await
            .unwrap_err();
        assert_eq!(scheme.code, ErrorCode::Invalid);
        // Nothing listens on port 1 of loopback.
        let down = cache
            .fetch(
                "rootfs_url",
                "http://127.0.0.1:1/rootfs",
                Caller::Local,
                &leases,
            )
            .await
            .unwrap_err();
        assert_eq!(down.code, ErrorCode::Upstream);
        assert_nothing_stored(dir.path());
    }
}
