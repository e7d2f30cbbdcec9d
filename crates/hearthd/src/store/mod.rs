//! State in SQLite: one file under the data root, WAL mode, schema migrations by
//! `PRAGMA user_version`. Every call is short; a std mutex serialises them.

mod artifacts;
mod blobs;
mod journal;
mod machines;
mod ports;
mod snapshots;

pub use artifacts::CachedArtifact;
pub use blobs::BlobRecord;
pub use journal::{OpKind, OpRecord};
pub use machines::{MachineRecord, MachineSpec, NetworkSpec};
pub use snapshots::SnapshotRecord;

use crate::error::Result;
use rusqlite::Connection;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

/// Each entry moves the schema one version up; applied in order, each in a transaction.
const MIGRATIONS: &[&str] = &[
    "CREATE TABLE machines (
        id TEXT PRIMARY KEY,
        spec TEXT NOT NULL,
        phase TEXT NOT NULL,
        error TEXT,
        created_at TEXT NOT NULL,
        started_at TEXT,
        pid INTEGER,
        pid_start_time INTEGER
    );
    CREATE TABLE operations (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        kind TEXT NOT NULL,
        machine_id TEXT NOT NULL,
        started_at TEXT NOT NULL
    );
    CREATE TABLE artifact_cache (
        source TEXT PRIMARY KEY,
        validator TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        size_bytes INTEGER NOT NULL,
        fetched_at TEXT NOT NULL
    );",
    "CREATE TABLE snapshots (
        id TEXT PRIMARY KEY,
        machine_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        ready INTEGER NOT NULL,
        source TEXT NOT NULL,
        memory_in_vmstate INTEGER NOT NULL,
        artifacts TEXT NOT NULL,
        created_at TEXT NOT NULL
    );
    CREATE INDEX snapshots_by_machine ON snapshots (machine_id);
    ALTER TABLE operations ADD COLUMN snapshot_id TEXT;
    ALTER TABLE machines ADD COLUMN ram_shared INTEGER NOT NULL DEFAULT 1;",
    "ALTER TABLE operations ADD COLUMN source_machine_id TEXT;",
    // Blobs verified and flushed into the store; a file without a record is hashed again.
    "CREATE TABLE blobs (
        sha256 TEXT PRIMARY KEY,
        size_bytes INTEGER NOT NULL,
        verified_at TEXT NOT NULL,
        last_used INTEGER NOT NULL
    );",
    "ALTER TABLE machines ADD COLUMN net_slot INTEGER;
    CREATE UNIQUE INDEX machines_by_net_slot ON machines (net_slot);
    CREATE TABLE net_state (id INTEGER PRIMARY KEY CHECK (id = 0), last_slot INTEGER NOT NULL);
    CREATE TABLE published_ports (
        id TEXT NOT NULL,
        machine_id TEXT NOT NULL,
        name TEXT,
        port INTEGER NOT NULL,
        host_port INTEGER NOT NULL UNIQUE,
        protocol TEXT NOT NULL,
        created_at TEXT NOT NULL,
        PRIMARY KEY (machine_id, id)
    );",
    // Which RAM a machine runs on is its backend's business now (see `vmm::Vmm::save_state`).
    "ALTER TABLE machines DROP COLUMN ram_shared;",
    // The host boot during which a ready snapshot's files were written and not yet flushed.
    "ALTER TABLE snapshots ADD COLUMN unflushed_boot TEXT;",
];

pub struct Store {
    conn: Mutex<Connection>,
}

impl Store {
    pub fn open(path: &Path) -> Result<Store> {
        let mut conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        migrate(&mut conn)?;
        Ok(Store {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn migrate(conn: &mut Connection) -> Result<()> {
    let version: usize = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version > MIGRATIONS.len() {
        return Err(crate::error::Error::internal(format!(
            "state schema version {version} is newer than this hearthd ({})",
            MIGRATIONS.len()
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i + 1)?;
        tx.commit()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_apply_once_and_reopen_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        drop(Store::open(&path).unwrap());
        let store = Store::open(&path).unwrap();
        let v: usize = store
            .conn()
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(v, MIGRATIONS.len());
    }

    #[test]
    fn refuses_a_newer_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.pragma_update(None, "user_version", 99).unwrap();
        }
        let err = Store::open(&path).err().unwrap();
        assert!(err.message.contains("newer"), "{}", err.message);
    }
}
