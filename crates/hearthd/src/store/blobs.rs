//! Blob records: which files of the blob store were verified (hashed, flushed, renamed into
//! place), when each was last used (for least-recently-used eviction), and which ones the
//! machines and snapshots need to boot again.

use super::Store;
use crate::error::Result;
use chrono::{DateTime, Utc};
use rusqlite::{params, OptionalExtension};
use std::collections::HashSet;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobRecord {
    pub sha256: String,
    pub size_bytes: u64,
    pub verified_at: DateTime<Utc>,
    /// A strictly increasing use stamp (nanoseconds since the epoch, bumped past the latest
    /// one), so the order of uses is exact even within one clock tick.
    pub last_used: i64,
}

/// The next use stamp: now, or just after the latest recorded use if the clock says otherwise.
const NEXT_USE: &str = "max(?2, (SELECT coalesce(max(last_used), 0) + 1 FROM blobs))";

fn now_nanos() -> i64 {
    Utc::now().timestamp_nanos_opt().unwrap_or(i64::MAX)
}

impl Store {
    pub fn blob(&self, sha256: &str) -> Result<Option<BlobRecord>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT sha256, size_bytes, verified_at, last_used FROM blobs WHERE sha256 = ?1",
                [sha256],
                |r| {
                    Ok(BlobRecord {
                        sha256: r.get(0)?,
                        size_bytes: r.get::<_, i64>(1)? as u64,
                        verified_at: r.get(2)?,
                        last_used: r.get(3)?,
                    })
                },
            )
            .optional()?)
    }

    /// Records a blob whose content was just checked against its digest, as used now.
    pub fn put_blob(&self, sha256: &str, size_bytes: u64) -> Result<()> {
        self.conn().execute(
            &format!(
                "INSERT OR REPLACE INTO blobs (sha256, size_bytes, verified_at, last_used)
                 VALUES (?1, ?3, ?4, {NEXT_USE})"
            ),
            params![sha256, now_nanos(), size_bytes as i64, Utc::now()],
        )?;
        Ok(())
    }

    pub fn touch_blob(&self, sha256: &str) -> Result<()> {
        self.conn().execute(
            &format!("UPDATE blobs SET last_used = {NEXT_USE} WHERE sha256 = ?1"),
            params![sha256, now_nanos()],
        )?;
        Ok(())
    }

    /// Every record, least recently used first.
    pub fn blobs_by_last_use(&self) -> Result<Vec<BlobRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT sha256, size_bytes, verified_at, last_used FROM blobs ORDER BY last_used",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(BlobRecord {
                sha256: r.get(0)?,
                size_bytes: r.get::<_, i64>(1)? as u64,
                verified_at: r.get(2)?,
                last_used: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Forgets a blob: its record and every cache index row that leads to it.
    pub fn forget_blob(&self, sha256: &str) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute("DELETE FROM blobs WHERE sha256 = ?1", [sha256])?;
        tx.execute("DELETE FROM artifact_cache WHERE sha256 = ?1", [sha256])?;
        tx.commit()?;
        Ok(())
    }

    /// The blobs machines and snapshots need to boot again: their kernels and initrds. Read in
    /// one statement, so it is one consistent view. A record that is not JSON names none.
    pub fn referenced_blobs(&self) -> Result<HashSet<String>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT json_extract(spec, '$.kernel_sha256'), json_extract(spec, '$.initrd_sha256')
               FROM machines WHERE json_valid(spec)
             UNION ALL
             SELECT json_extract(source, '$.kernel_sha256'), json_extract(source, '$.initrd_sha256')
               FROM snapshots WHERE json_valid(source)",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok([
                r.get::<_, Option<String>>(0)?,
                r.get::<_, Option<String>>(1)?,
            ])
        })?;
        let mut out = HashSet::new();
        for row in rows {
            out.extend(row?.into_iter().flatten().filter(|s| !s.is_empty()));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{CachedArtifact, MachineRecord, MachineSpec};

    #[test]
    fn records_keep_the_order_of_use() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.db")).unwrap();
        for sha in ["a", "b", "c"] {
            store.put_blob(sha, 10).unwrap();
        }
        store.touch_blob("a").unwrap();
        let order: Vec<String> = store
            .blobs_by_last_use()
            .unwrap()
            .into_iter()
            .map(|b| b.sha256)
            .collect();
        assert_eq!(order, ["b", "c", "a"]);
        assert_eq!(store.blob("b").unwrap().unwrap().size_bytes, 10);

        let hit = CachedArtifact {
            sha256: "b".into(),
            size_bytes: 10,
        };
        store.put_cached_artifact("file:///x", "v", &hit).unwrap();
        store.forget_blob("b").unwrap();
        assert_eq!(store.blob("b").unwrap(), None);
        assert_eq!(store.cached_artifact("file:///x", "v").unwrap(), None);
    }

    #[test]
    fn machines_and_snapshots_reference_their_kernel_and_initrd() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.db")).unwrap();
        let rec = MachineRecord::starting("m", MachineSpec::for_tests("k1", Some("i1")));
        store.insert_machine(&rec).unwrap();
        let snap = crate::store::SnapshotRecord {
            id: "s".into(),
            machine_id: "gone".into(),
            kind: hearth_api::SnapshotKind::Disk,
            ready: true,
            source: MachineSpec::for_tests("k2", None),
            memory_in_vmstate: false,
            artifacts: Vec::new(),
            created_at: Utc::now(),
        };
        store.insert_snapshot(&snap).unwrap();
        // A machine whose create has not fetched its kernel yet names nothing.
        let fresh = MachineRecord::starting("n", MachineSpec::for_tests("", None));
        store.insert_machine(&fresh).unwrap();
        let refs = store.referenced_blobs().unwrap();
        let want: HashSet<String> = ["k1", "i1", "k2"].map(String::from).into();
        assert_eq!(refs, want);
    }
}
