//! The blob store: files named by their sha256 under `images/blobs/`. A file joins it only
//! hashed, flushed (the file and its directory before the rename, the store's directory after)
//! and then recorded, so after a power loss a recorded blob is whole; a file without a record,
//! or whose size disagrees with its record, is hashed again before use and removed when it
//! does not match its name.
//!
//! Machines and snapshots reference the kernels and initrds they boot from, and an operation
//! pins each blob it uses with a [`Lease`]; every other blob is cache: `gc` removes it, and
//! past the cache budget the least recently used go first. An operation that fails discards
//! the blobs it fetched fresh ([`Leases::discard`]). A machine restored from a durable snapshot
//! maps its memory blob privately: removing that file leaves the mapping whole, and the space
//! returns when the VMM exits.

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

    /// Where blobs are written before they are committed.
    pub fn tmp_dir(&self) -> &Path {
        &self.tmp
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
                let (file, dir) = (path.clone(), self.dir.clone());
                // Hashed from the page cache, it must reach the disk before it is vouched for.
                let (_, got) = tokio::task::spawn_blocking(move || {
                    storage::sync_file(&file)?;
                    storage::sync_dir(&dir)?;
                    storage::sha256_sparse(&file)
                })
                .await
                .map_err(|e| Error::internal(e.to_string()))??;
                if got != sha256 {
                    tracing::warn!(
                        blob = sha256,
                        "removing a blob whose content is not {sha256}"
                    );
                    // The file off the async threads (it may be large), then its records.
                    storage::remove_file(&path).await?;
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
    /// records of files that are gone; returns what it did and the digests it removed.
    pub fn gc(&self) -> Result<(GcResponse, Vec<String>)> {
        let pins = self.pins();
        let referenced = self.store.referenced_blobs()?;
        let mut report = GcResponse::default();
        let mut removed = Vec::new();
        for (sha256, _) in self.files()? {
            if pins.contains_key(&sha256) || referenced.contains(&sha256) {
                continue;
            }
            report.freed_bytes += self.remove(&sha256);
            report.removed_blobs += 1;
            removed.push(sha256);
        }
        for rec in self.store.blobs_by_last_use()? {
            if !self.path(&rec.sha256).exists() {
                self.store.forget_blob(&rec.sha256)?;
            }
        }
        Ok((report, removed))
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
    /// Removing large files blocks: it runs off the async threads.
    pub async fn discard(&self) {
        let leases = std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()));
        let removed = storage::blocking(move || {
            let mut done = HashSet::new();
            for lease in leases.iter().filter(|l| l.fresh) {
                if done.insert(&lease.sha256) {
                    let own = leases.iter().filter(|l| l.sha256 == lease.sha256).count();
                    lease.blobs.discard(&lease.sha256, own);
                }
            }
        })
        .await;
        if let Err(e) = removed {
            tracing::warn!("discarding blobs: {}", e.message);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{CachedArtifact, MachineRecord, MachineSpec, SnapshotRecord};
    use hearth_api::SnapshotKind;
    use sha2::{Digest, Sha256};
    use std::io::Write;

    fn open(dir: &Path, max: Option<u64>) -> (Arc<Blobs>, Arc<Store>) {
        let store = Arc::new(Store::open(&dir.join("s.db")).unwrap());
        let blobs = Blobs::open(&dir.join("images"), store.clone(), max).unwrap();
        (blobs, store)
    }

    fn sha(data: &[u8]) -> String {
        hex::encode(Sha256::digest(data))
    }

    /// Stages `data` and commits it as a fresh blob, the way a fetch does.
    async fn put(blobs: &Arc<Blobs>, data: &[u8]) -> Lease {
        let mut staged = blobs.staging().unwrap();
        staged.write_all(data).unwrap();
        let mut lease = blobs.lease(&sha(data));
        lease.commit(staged, data.len() as u64).await.unwrap();
        lease
    }

    fn files(blobs: &Blobs) -> HashSet<String> {
        blobs.files().unwrap().into_iter().map(|(s, _)| s).collect()
    }

    /// Data of `n` KiB, every byte non-zero, different per `seed`.
    fn data(seed: u8, n: usize) -> Vec<u8> {
        vec![seed.max(1); n << 10]
    }

    #[tokio::test]
    async fn a_committed_blob_is_in_place_and_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let (blobs, store) = open(dir.path(), None);
        let body = data(7, 12);
        let lease = put(&blobs, &body).await;
        let path = blobs.path(&sha(&body));
        assert_eq!(std::fs::read(&path).unwrap(), body);
        let rec = store.blob(&sha(&body)).unwrap().unwrap();
        assert_eq!(rec.size_bytes, body.len() as u64);
        assert!(lease.fresh);
        assert_eq!(
            std::fs::read_dir(dir.path().join("images/tmp"))
                .unwrap()
                .count(),
            0
        );
        let found = lease.find(body.len() as u64).await.unwrap().unwrap();
        assert_eq!(found.path, path);
        // Asked for with another size, it is not the blob wanted.
        assert!(lease.find(1).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn blobs_the_records_do_not_vouch_for_are_hashed_again() {
        let dir = tempfile::tempdir().unwrap();
        let (blobs, store) = open(dir.path(), None);
        let body = data(3, 64);
        let (digest, len) = (sha(&body), body.len() as u64);
        let lease = blobs.lease(&digest);

        // A whole file without a record (renamed in before a crash): hashed, then recorded.
        std::fs::write(blobs.path(&digest), &body).unwrap();
        assert!(lease.find(len).await.unwrap().is_some());
        assert_eq!(store.blob(&digest).unwrap().unwrap().size_bytes, len);

        // Zero-filled at the right size, as after a power loss before the data reached the
        // disk, with no record: removed, never used.
        store.forget_blob(&digest).unwrap();
        std::fs::write(blobs.path(&digest), vec![0u8; body.len()]).unwrap();
        assert!(lease.find(len).await.unwrap().is_none());
        assert!(!blobs.path(&digest).exists());

        // A record that disagrees with the file's size: the file is hashed, and a short one
        // removed along with its record and the cache index rows that lead to it.
        store.put_blob(&digest, len).unwrap();
        let hit = CachedArtifact {
            sha256: digest.clone(),
            size_bytes: len,
        };
        store.put_cached_artifact("file:///k", "v", &hit).unwrap();
        std::fs::write(blobs.path(&digest), &body[..100]).unwrap();
        assert!(lease.find(len).await.unwrap().is_none());
        assert!(!blobs.path(&digest).exists());
        assert_eq!(store.blob(&digest).unwrap(), None);
        assert_eq!(store.cached_artifact("file:///k", "v").unwrap(), None);
    }

    #[tokio::test]
    async fn gc_keeps_referenced_and_pinned_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let (blobs, store) = open(dir.path(), None);
        let (machine, snapshot, pinned, cache) = (data(1, 8), data(2, 8), data(3, 8), data(4, 8));
        for body in [&machine, &snapshot, &cache] {
            drop(put(&blobs, body).await);
        }
        let lease = put(&blobs, &pinned).await;
        // A file an older hearthd left, with no record and nothing using it.
        let stray = data(5, 4);
        std::fs::write(blobs.path(&sha(&stray)), &stray).unwrap();
        store
            .insert_machine(&MachineRecord::starting(
                "m",
                MachineSpec::for_tests(&sha(&machine), None),
            ))
            .unwrap();
        store
            .insert_snapshot(&SnapshotRecord {
                id: "s".into(),
                machine_id: "gone".into(),
                kind: SnapshotKind::Disk,
                ready: true,
                source: MachineSpec::for_tests(&sha(&snapshot), None),
                memory_in_vmstate: false,
                artifacts: Vec::new(),
                created_at: chrono::Utc::now(),
            })
            .unwrap();
        let allocated =
            |body: &[u8]| std::fs::metadata(blobs.path(&sha(body))).unwrap().blocks() * 512;
        let expect_freed = allocated(&cache) + allocated(&stray);

        let (report, _) = blobs.gc().unwrap();
        assert_eq!(report.removed_blobs, 2);
        assert_eq!(report.freed_bytes, expect_freed);
        let left = files(&blobs);
        let want: HashSet<String> = [&machine, &snapshot, &pinned].map(|b| sha(b)).into();
        assert_eq!(left, want);
        assert_eq!(store.blob(&sha(&cache)).unwrap(), None);

        // Once unpinned and unreferenced, they go too.
        drop(lease);
        store.delete_machine("m").unwrap();
        store.delete_snapshot("s").unwrap();
        assert_eq!(blobs.gc().unwrap().0.removed_blobs, 3);
        assert!(files(&blobs).is_empty());
        assert!(store.blobs_by_last_use().unwrap().is_empty());
    }

    #[tokio::test]
    async fn the_budget_evicts_the_least_recently_used_cache_first() {
        let dir = tempfile::tempdir().unwrap();
        // Room for two 8 KiB blobs of cache.
        let (blobs, store) = open(dir.path(), Some(16 << 10));
        let [a, b, c, d, kernel] = [1, 2, 3, 4, 5].map(|s| data(s, 8));
        for body in [&a, &b, &c] {
            drop(put(&blobs, body).await);
        }
        // A referenced blob is not cache: it neither counts nor goes.
        drop(put(&blobs, &kernel).await);
        store
            .insert_machine(&MachineRecord::starting(
                "m",
                MachineSpec::for_tests(&sha(&kernel), None),
            ))
            .unwrap();
        // `a` used again: now `b` is the least recently used, then `c`.
        let lease_a = blobs.lease(&sha(&a));
        assert!(lease_a.find(8 << 10).await.unwrap().is_some());
        drop(lease_a);
        let report = blobs.enforce_budget().unwrap();
        assert_eq!(report.removed_blobs, 1);
        let want: HashSet<String> = [&a, &c, &kernel].map(|x| sha(x)).into();
        assert_eq!(files(&blobs), want);

        // Pinned blobs are passed over: with `c` pinned and `d` leased by the fetch that just
        // made it, `a` goes although `c` is older.
        let lease_d = put(&blobs, &d).await;
        let lease_c = blobs.lease(&sha(&c));
        let report = blobs.enforce_budget().unwrap();
        assert_eq!(report.removed_blobs, 1);
        let want: HashSet<String> = [&c, &d, &kernel].map(|x| sha(x)).into();
        assert_eq!(files(&blobs), want);
        drop((lease_c, lease_d));
    }

    #[tokio::test]
    async fn a_failed_operation_discards_only_what_it_fetched_and_nobody_else_needs() {
        let dir = tempfile::tempdir().unwrap();
        let (blobs, store) = open(dir.path(), None);
        let [found, fresh, shared, referenced] = [1, 2, 3, 4].map(|s| data(s, 4));
        drop(put(&blobs, &found).await);

        let op = Leases::default();
        // Found in the store: not this operation's to remove.
        let lease = blobs.lease(&sha(&found));
        assert!(lease.find(4 << 10).await.unwrap().is_some());
        op.hold(lease);
        op.hold(put(&blobs, &fresh).await);
        // Fetched fresh, but another operation uses it too.
        op.hold(put(&blobs, &shared).await);
        let other = blobs.lease(&sha(&shared));
        // Fetched fresh, but a machine record names it.
        op.hold(put(&blobs, &referenced).await);
        store
            .insert_machine(&MachineRecord::starting(
                "m",
                MachineSpec::for_tests(&sha(&referenced), None),
            ))
            .unwrap();

        op.discard().await;
        let want: HashSet<String> = [&found, &shared, &referenced].map(|x| sha(x)).into();
        assert_eq!(files(&blobs), want);
        assert_eq!(store.blob(&sha(&fresh)).unwrap(), None);
        // Every lease of the operation is released.
        assert_eq!(blobs.pins().get(&sha(&shared)), Some(&1));
        assert_eq!(blobs.pins().get(&sha(&found)), None);
        drop(other);
        assert!(blobs.pins().is_empty());
    }
}
