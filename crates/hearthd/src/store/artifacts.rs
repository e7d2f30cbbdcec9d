//! The index of the artifact cache: which source (URL) gave which blob. A `file://` source is
//! re-read when its size or mtime changes; an `http(s)://` URL is taken to name fixed content.

use super::Store;
use crate::error::Result;
use chrono::Utc;
use rusqlite::OptionalExtension;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedArtifact {
    pub sha256: String,
    pub size_bytes: u64,
}

impl Store {
    pub fn cached_artifact(&self, source: &str, validator: &str) -> Result<Option<CachedArtifact>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT sha256, size_bytes FROM artifact_cache WHERE source = ?1 AND validator = ?2",
                [source, validator],
                |r| {
                    Ok(CachedArtifact {
                        sha256: r.get(0)?,
                        size_bytes: r.get::<_, i64>(1)? as u64,
                    })
                },
            )
            .optional()?)
    }

    pub fn put_cached_artifact(
        &self,
        source: &str,
        validator: &str,
        a: &CachedArtifact,
    ) -> Result<()> {
        self.conn().execute(
            "INSERT OR REPLACE INTO artifact_cache (source, validator, sha256, size_bytes, fetched_at)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            rusqlite::params![source, validator, a.sha256, a.size_bytes as i64, Utc::now()],
        )?;
        Ok(())
    }
}
