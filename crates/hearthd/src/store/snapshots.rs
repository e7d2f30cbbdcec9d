use super::{MachineSpec, Store};
use crate::error::{Error, Result};
use chrono::{DateTime, Utc};
use hearth_api::{Snapshot, SnapshotArtifact, SnapshotKind};
use rusqlite::{params, OptionalExtension, Row};

#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotRecord {
    pub id: String,
    pub machine_id: String,
    pub kind: SnapshotKind,
    /// False while the snapshot is being written and hashed.
    pub ready: bool,
    /// The source machine's spec when the snapshot was taken.
    pub source: MachineSpec,
    /// The guest RAM travels inside the device state (the source's RAM was a private mapping),
    /// so there is no memory artifact.
    pub memory_in_vmstate: bool,
    pub artifacts: Vec<SnapshotArtifact>,
    pub created_at: DateTime<Utc>,
}

impl SnapshotRecord {
    pub fn to_api(&self) -> Snapshot {
        Snapshot {
            id: self.id.clone(),
            machine_id: self.machine_id.clone(),
            source_runtime_host: None,
            source_tap_device: None,
            created_at: self.created_at,
            kind: self.kind,
            memory_mib: self.source.memory_mib,
            artifact: self.source.artifact.clone(),
            artifacts: self.artifacts.clone(),
        }
    }

    fn from_row(row: &Row) -> rusqlite::Result<SnapshotRecord> {
        let bad = |what: String| {
            rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, what.into())
        };
        let kind: String = row.get("kind")?;
        let source: String = row.get("source")?;
        let artifacts: String = row.get("artifacts")?;
        Ok(SnapshotRecord {
            id: row.get("id")?,
            machine_id: row.get("machine_id")?,
            kind: serde_json::from_value(serde_json::Value::String(kind))
                .map_err(|e| bad(e.to_string()))?,
            ready: row.get("ready")?,
            source: serde_json::from_str(&source).map_err(|e| bad(e.to_string()))?,
            memory_in_vmstate: row.get("memory_in_vmstate")?,
            artifacts: serde_json::from_str(&artifacts).map_err(|e| bad(e.to_string()))?,
            created_at: row.get("created_at")?,
        })
    }
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| Error::internal(e.to_string()))
}

fn kind_str(kind: SnapshotKind) -> &'static str {
    match kind {
        SnapshotKind::Memory => "memory",
        SnapshotKind::Disk => "disk",
    }
}

impl Store {
    /// Reserves a snapshot id; an existing one is a conflict and is left untouched.
    pub fn insert_snapshot(&self, s: &SnapshotRecord) -> Result<()> {
        let res = self.conn().execute(
            "INSERT INTO snapshots (id, machine_id, kind, ready, source, memory_in_vmstate, artifacts, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                s.id,
                s.machine_id,
                kind_str(s.kind),
                s.ready,
                to_json(&s.source)?,
                s.memory_in_vmstate,
                to_json(&s.artifacts)?,
                s.created_at,
            ],
        );
        match res {
            Ok(_) => Ok(()),
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                Err(Error::conflict(format!("snapshot {} already exists", s.id)))
            }
            Err(e) => Err(e.into()),
        }
    }

    pub fn update_snapshot(&self, s: &SnapshotRecord) -> Result<()> {
        self.conn().execute(
            "UPDATE snapshots SET ready = ?2, memory_in_vmstate = ?3, artifacts = ?4 WHERE id = ?1",
            params![s.id, s.ready, s.memory_in_vmstate, to_json(&s.artifacts)?],
        )?;
        Ok(())
    }

    pub fn get_snapshot(&self, id: &str) -> Result<Option<SnapshotRecord>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT * FROM snapshots WHERE id = ?1",
                [id],
                SnapshotRecord::from_row,
            )
            .optional()?)
    }

    /// Ready snapshots, of one machine or of all.
    pub fn list_snapshots(&self, machine_id: Option<&str>) -> Result<Vec<SnapshotRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT * FROM snapshots WHERE ready = 1 AND (?1 IS NULL OR machine_id = ?1)
             ORDER BY created_at, id",
        )?;
        let rows = stmt.query_map([machine_id], SnapshotRecord::from_row)?;
        let mut out = Vec::new();
        for row in rows {
            match row {
                Ok(s) => out.push(s),
                Err(e) => tracing::warn!("skipping unreadable snapshot record: {e}"),
            }
        }
        Ok(out)
    }

    pub fn snapshot_ids(&self) -> Result<Vec<String>> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT id FROM snapshots")?;
        let ids = stmt.query_map([], |r| r.get(0))?;
        Ok(ids.collect::<rusqlite::Result<_>>()?)
    }

    /// Records that snapshot `id`'s files were written during host boot `boot` and are not
    /// all on disk yet (`None`: they are).
    pub fn set_snapshot_unflushed(&self, id: &str, boot: Option<&str>) -> Result<()> {
        self.conn().execute(
            "UPDATE snapshots SET unflushed_boot = ?2 WHERE id = ?1",
            params![id, boot],
        )?;
        Ok(())
    }

    /// Snapshots whose files are not all on disk, with the host boot they were written in.
    pub fn unflushed_snapshots(&self) -> Result<Vec<(String, String)>> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT id, unflushed_boot FROM snapshots WHERE unflushed_boot IS NOT NULL")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    pub fn delete_snapshot(&self, id: &str) -> Result<()> {
        self.conn()
            .execute("DELETE FROM snapshots WHERE id = ?1", [id])?;
        Ok(())
    }
}
