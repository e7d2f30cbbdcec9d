//! The blob store: files named by their sha256 under `images/blobs/`. A file joins it only
//! hashed, flushed (the file and its directory before the rename, the store's directory after)
//! and then recorded, so after a power loss a recorded blob is whole; a file without a record,
//! or whose size disagrees with its record, is hashed again before use and removed when it
//! does not match its name.
//!
//! Machines and snapshots reference the kernels and initrds they boot from, and an operation
//! pins each blob it uses with a [`Lease`]; every other blob is cache: `gc` removes it, and
//! past the cache budget the least recently used go first. An operation that fails discards
//! the blobs it fetched fresh ([`Leases::discard`]).

use crate::error::{is_disk_full, Error, Result};
use crate::storage;
use crate::store::Store;
use hearth_api::GcResponse;
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

#[derive(Debug, Clone)]
pub struct Blob {
    pub path: PathBuf,
    pub sha256: String,
    pub size_bytes: u64,
}

pub struct Blobs {
    dir: PathBuf,
    tmp: PathBuf,
    store: Arc<Store>,
    /// Leases held on each digest; a pinned blob is never removed.
    pins: Mutex<HashMap<String, usize>>,
    inflight: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Bytes on disk that unreferenced blobs may take; unlimited when None.
    max_cache_bytes: Option<u64>,
}

impl Blobs {
    /// The store under `images_dir`; partial files a crash left in its staging directory go.
    pub fn open(
        images_dir: &Path,
        store: Arc<Store>,
        max_cache_bytes: Option<u64>,
    ) -> Result<Arc<Blobs>> {
        let dir = images_dir.join("blobs");
        let tmp = images_dir.join("tmp");
        std::fs::create_dir_all(&dir)?;
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp)?;
        Ok(Arc::new(Blobs {
            dir,
            tmp,
            store,
            pins: Mutex::new(HashMap::new()),
            inflight: Mutex::new(HashMap::new()),
            max_cache_bytes,
        }))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn path(&self, sha256: &str) -> PathBuf {
        self.dir.join(sha256)
    }

    /// A new file to write a blob into before it is committed; removed when dropped.
    pub fn staging(&self) -> Result<tempfile::NamedTempFile> {
        tempfile::NamedTempFile::new_in(&self.tmp).map_err(|e| Error::io("creating", &self.tmp, e))
    }

    /// Pins blob `sha256` (whether or not the store has it yet) until the lease is dropped.
    pub fn lease(self: &Arc<Self>, sha256: &str) -> Lease {
        *self.pins().entry(sha256.to_string()).or_insert(0) += 1;
        Lease {
            blobs: self.clone(),
            sha256: sha256.to_string(),
            fresh: false,
        }
    }

    fn pins(&self) -> MutexGuard<'_, HashMap<String, usize>> {
        self.pins.lock().unwrap_or_else(|e| e.into_inner())
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

    /// The blob, if the store holds a good copy of `size` bytes. A file the records do not
    /// vouch for is hashed; one that does not match is removed.
    async fn find(&self, sha256: &str, size: u64) -> Result<Option<Blob>> {
        let path = self.path(sha256);
        let key = format!("blob:{sha256}");
        self.one_at_a_time(&key, async {
            let len = match std::fs::metadata(&path) {
                Ok(m) => m.len(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    self.store.forget_blob(sha256)?;
                    return Ok(None);
                }
                Err(e) => return Err(Error::io("reading", &path, e)),
            };
            let vouched = self
                .store
                .blob(sha256)?
                .is_some_and(|r| r.size_bytes == len);
            if vouched {
                self.store.touch_blob(sha256)?;
            } else {
                // Written before a crash, or by an older hearthd: it may be short or zero-filled.
                let file = path.clone();
                let (_, got) = tokio::task::spawn_blocking(move || storage::sha256_sparse(&file))
                    .await
                    .map_err(|e| Error::internal(e.to_string()))??;
                if got != sha256 {
                    tracing::warn!(
                        blob = sha256,
                        "removing a blob whose content is not {sha256}"
                    );
                    self.remove(sha256);
                    return Ok(None);
                }
                self.store.put_blob(sha256, len)?;
            }
            Ok((len == size).then(|| Blob {
                path: path.clone(),
                sha256: sha256.to_string(),
                size_bytes: len,
            }))
        })
        .await
    }

    /// Makes `staged`, already written and checked to hold `sha256`, that blob: flushes it and
    /// the staging directory, renames it into the store, flushes the store's directory, and
    /// only then records it.
    async fn commit(
        &self,
        staged: tempfile::NamedTempFile,
        sha256: &str,
        size: u64,
    ) -> Result<Blob> {
        let path = self.path(sha256);
        let key = format!("blob:{sha256}");
        self.one_at_a_time(&key, async {
            let (dst, tmp, dir) = (path.clone(), self.tmp.clone(), self.dir.clone());
            tokio::task::spawn_blocking(move || -> Result<()> {
                staged
                    .as_file()
                    .sync_all()
                    .map_err(|e| Error::io("flushing", staged.path(), e))?;
                storage::sync_dir(&tmp)?;
                staged
                    .persist(&dst)
                    .map_err(|e| Error::io("moving a blob to", &dst, e.error))?;
                storage::sync_dir(&dir)
            })
            .await
            .map_err(|e| Error::internal(e.to_string()))??;
            self.store.put_blob(sha256, size)?;
            Ok(Blob {
                path: path.clone(),
                sha256: sha256.to_string(),
                size_bytes: size,
            })
        })
        .await
    }

    /// Removes a blob's file, record and cache index rows; returns the bytes it took on disk.
    fn remove(&self, sha256: &str) -> u64 {
        let path = self.path(sha256);
        let bytes = std::fs::metadata(&path).map_or(0, |m| m.blocks() * 512);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!("removing {}: {e}", path.display());
                return 0;
            }
        }
        if let Err(e) = self.store.forget_blob(sha256) {
            tracing::warn!(blob = sha256, "forgetting: {}", e.message);
        }
        bytes
    }

    /// Every file in the store with the bytes it takes on disk, by name.
    fn files(&self) -> Result<Vec<(String, u64)>> {
        let entries =
            std::fs::read_dir(&self.dir).map_err(|e| Error::io("listing", &self.dir, e))?;
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_file() {
                let name = entry.file_name().to_string_lossy().into_owned();
                out.push((name, meta.blocks() * 512));
            }
        }
        Ok(out)
    }

    /// Removes every blob that no machine or snapshot references and no lease pins, and the
    /// records of files that are gone.
    pub fn gc(&self) -> Result<GcResponse> {
        let pins = self.pins();
        let referenced = self.store.referenced_blobs()?;
        let mut report = GcResponse::default();
        for (sha256, _) in self.files()? {
            if pins.contains_key(&sha256) || referenced.contains(&sha256) {
                continue;
            }
            report.freed_bytes += self.remove(&sha256);
            report.removed_blobs += 1;
        }
        for rec in self.store.blobs_by_last_use()? {
            if !self.path(&rec.sha256).exists() {
                self.store.forget_blob(&rec.sha256)?;
            }
        }
        Ok(report)
    }

    /// Evicts unreferenced, unpinned blobs, least recently used first (a file without a record
    /// before any recorded one), until the unreferenced blobs fit in the cache budget.
    pub fn enforce_budget(&self) -> Result<GcResponse> {
        let mut report = GcResponse::default();
        let Some(max) = self.max_cache_bytes else {
            return Ok(report);
        };
        let pins = self.pins();
        let referenced = self.store.referenced_blobs()?;
        let cached: HashMap<String, u64> = self
            .files()?
            .into_iter()
            .filter(|(sha256, _)| !referenced.contains(sha256))
            .collect();
        let mut total: u64 = cached.values().sum();
        if total <= max {
            return Ok(report);
        }
        let recorded: Vec<String> = self
            .store
            .blobs_by_last_use()?
            .into_iter()
            .map(|r| r.sha256)
            .filter(|s| cached.contains_key(s))
            .collect();
        let known: HashSet<&String> = recorded.iter().collect();
        let mut unrecorded: Vec<&String> = cached.keys().filter(|s| !known.contains(s)).collect();
        unrecorded.sort();
        for sha256 in unrecorded.into_iter().chain(&recorded) {
            if total <= max {
                break;
            }
            if pins.contains_key(sha256) {
                continue;
            }
            report.freed_bytes += self.remove(sha256);
            report.removed_blobs += 1;
            total -= cached[sha256];
        }
        Ok(report)
    }

    /// `enforce_budget` off the async threads; a failure is logged, never the caller's.
    pub async fn evict_over_budget(self: &Arc<Self>) {
        if self.max_cache_bytes.is_none() {
            return;
        }
        let blobs = self.clone();
        match tokio::task::spawn_blocking(move || blobs.enforce_budget()).await {
            Ok(Ok(r)) if r.removed_blobs > 0 => tracing::info!(
                blobs = r.removed_blobs,
                bytes = r.freed_bytes,
                "evicted cached blobs over the budget"
            ),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!("evicting cached blobs: {}", e.message),
            Err(e) => tracing::warn!("evicting cached blobs: {e}"),
        }
    }

    /// Removes a blob that a failed operation fetched, unless something still needs it: a
    /// machine or snapshot references it, or leases other than the operation's own `own` pin it.
    fn discard(&self, sha256: &str, own: usize) {
        let pins = self.pins();
        if pins.get(sha256).copied().unwrap_or(0) > own {
            return;
        }
        match self.store.referenced_blobs() {
            Ok(refs) if refs.contains(sha256) => return,
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(blob = sha256, "not discarded: {}", e.message);
                return;
            }
        }
        tracing::info!(
            blob = sha256,
            "discarding a blob its failed operation fetched"
        );
        self.remove(sha256);
    }

    /// The error for a write into the store that failed.
    pub fn write_error(&self, e: std::io::Error) -> Error {
        if is_disk_full(&e) {
            Error::disk_full(&self.dir, &e)
        } else {
            Error::internal(format!("writing into {}: {e}", self.dir.display()))
        }
    }
}

/// Keeps one blob from being removed while an operation uses it; knows whether that operation
/// put the blob into the store (fresh) or found it there.
pub struct Lease {
    blobs: Arc<Blobs>,
    sha256: String,
    fresh: bool,
}

impl Lease {
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// The leased blob, if the store holds a good copy of `size` bytes.
    pub async fn find(&self, size: u64) -> Result<Option<Blob>> {
        self.blobs.find(&self.sha256, size).await
    }

    /// Commits a staged file holding exactly the leased blob (already checked); it is fresh.
    pub async fn commit(&mut self, staged: tempfile::NamedTempFile, size: u64) -> Result<Blob> {
        let blob = self.blobs.commit(staged, &self.sha256, size).await?;
        self.fresh = true;
        Ok(blob)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut pins = self.blobs.pins();
        if let Some(n) = pins.get_mut(&self.sha256) {
            *n -= 1;
            if *n == 0 {
                pins.remove(&self.sha256);
            }
        }
    }
}

/// The blobs one operation uses, pinned until it ends.
#[derive(Default)]
pub struct Leases(Mutex<Vec<Lease>>);

impl Leases {
    pub fn hold(&self, lease: Lease) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(lease);
    }

    /// The operation failed: removes the blobs it fetched fresh unless a machine or snapshot
    /// references them or another operation pins them, and releases every lease. Call it once
    /// the operation's own records are gone.
    pub fn discard(&self) {
        let leases = std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()));
        let mut done = HashSet::new();
        for lease in leases.iter().filter(|l| l.fresh) {
            if done.insert(&lease.sha256) {
                let own = leases.iter().filter(|l| l.sha256 == lease.sha256).count();
                lease.blobs.discard(&lease.sha256, own);
            }
        }
    }
}
