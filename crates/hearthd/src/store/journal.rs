//! The operations journal: a mutating operation writes its row first and clears it last, so a
//! row found at start-up is an operation a crash interrupted, for reconcile to finish or undo.

use super::Store;
use crate::error::Result;
use chrono::{DateTime, Utc};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    Create,
    Start,
    Stop,
    Delete,
    Snapshot,
    Restore,
    Fork,
    /// An egress policy change.
    Network,
    /// A port published or removed.
    Port,
}

impl OpKind {
    fn as_str(self) -> &'static str {
        match self {
            OpKind::Create => "create",
            OpKind::Start => "start",
            OpKind::Stop => "stop",
            OpKind::Delete => "delete",
            OpKind::Snapshot => "snapshot",
            OpKind::Restore => "restore",
            OpKind::Fork => "fork",
            OpKind::Network => "network",
            OpKind::Port => "port",
        }
    }

    fn parse(s: &str) -> Option<OpKind> {
        Some(match s {
            "create" => OpKind::Create,
            "start" => OpKind::Start,
            "stop" => OpKind::Stop,
            "delete" => OpKind::Delete,
            "snapshot" => OpKind::Snapshot,
            "restore" => OpKind::Restore,
            "fork" => OpKind::Fork,
            "network" => OpKind::Network,
            "port" => OpKind::Port,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone)]
pub struct OpRecord {
    pub id: i64,
    pub kind: OpKind,
    pub machine_id: String,
    pub snapshot_id: Option<String>,
    /// The machine an operation reads from (a fork's source).
    pub source_id: Option<String>,
    pub started_at: DateTime<Utc>,
}

impl Store {
    /// Writes the journal row of an operation on `machine_id`, naming the snapshot it makes or
    /// reads and the machine it reads from, if any.
    pub fn begin_op(
        &self,
        kind: OpKind,
        machine_id: &str,
        snapshot_id: Option<&str>,
        source_id: Option<&str>,
    ) -> Result<i64> {
        let conn = self.conn();
        conn.execute(
            "INSERT INTO operations (kind, machine_id, snapshot_id, source_machine_id, started_at)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            rusqlite::params![
                kind.as_str(),
                machine_id,
                snapshot_id,
                source_id,
                Utc::now()
            ],
        )?;
        Ok(conn.last_insert_rowid())
    }

    pub fn end_op(&self, id: i64) -> Result<()> {
        self.conn()
            .execute("DELETE FROM operations WHERE id = ?1", [id])?;
        Ok(())
    }

    pub fn pending_ops(&self) -> Result<Vec<OpRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, kind, machine_id, snapshot_id, source_machine_id, started_at
             FROM operations ORDER BY id",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, Option<String>>(3)?,
                r.get::<_, Option<String>>(4)?,
                r.get::<_, DateTime<Utc>>(5)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, kind, machine_id, snapshot_id, source_id, started_at) = row?;
            match OpKind::parse(&kind) {
                Some(kind) => out.push(OpRecord {
                    id,
                    kind,
                    machine_id,
                    snapshot_id,
                    source_id,
                    started_at,
                }),
                None => tracing::warn!("journal row {id} has unknown kind {kind}"),
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_live_until_ended() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.db")).unwrap();
        let a = store.begin_op(OpKind::Create, "m1", None, None).unwrap();
        let b = store
            .begin_op(OpKind::Fork, "m2", None, Some("m1"))
            .unwrap();
        store.end_op(a).unwrap();
        let pending = store.pending_ops().unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].id, b);
        assert_eq!(pending[0].kind, OpKind::Fork);
        assert_eq!(pending[0].machine_id, "m2");
        assert_eq!(pending[0].source_id.as_deref(), Some("m1"));
    }
}
