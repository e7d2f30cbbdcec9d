use super::Store;
use crate::error::{Error, Result};
use crate::vmm::VmProcess;
use chrono::{DateTime, Utc};
use hearth_api::{ArtifactRef, Egress, Phase, VmmKind};
use rusqlite::{params, OptionalExtension, Row};
use serde::{Deserialize, Serialize};

/// What a machine was created with; fixed for its life (resize aside).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MachineSpec {
    pub artifact: ArtifactRef,
    pub memory_mib: u32,
    pub vcpus: u32,
    pub storage_bytes: u64,
    pub hostname: String,
    /// The guest's /etc/machine-id.
    pub machine_uuid: String,
    pub kernel_sha256: String,
    pub initrd_sha256: Option<String>,
    pub rootfs_sha256: String,
    pub vmm: VmmKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored_from: Option<String>,
    /// Records written before machines had networks have none.
    #[serde(default)]
    pub network: NetworkSpec,
}

#[cfg(test)]
impl MachineSpec {
    /// A spec for tests of logic that only looks at the image digests.
    pub fn for_tests(kernel: &str, initrd: Option<&str>) -> MachineSpec {
        MachineSpec {
            artifact: ArtifactRef {
                kernel_image_url: "file:///k".into(),
                rootfs_url: "file:///r".into(),
                initrd_url: None,
            },
            memory_mib: 256,
            vcpus: 1,
            storage_bytes: 1 << 30,
            hostname: "h".into(),
            machine_uuid: "0".repeat(32),
            kernel_sha256: kernel.into(),
            initrd_sha256: initrd.map(str::to_string),
            rootfs_sha256: "r".into(),
            vmm: VmmKind::Qemu,
            restored_from: None,
            network: NetworkSpec::default(),
        }
    }
}

/// Whether a machine has a network interface, and what its guest may reach.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct NetworkSpec {
    pub enabled: bool,
    #[serde(default)]
    pub egress: Egress,
    #[serde(default)]
    pub allow_cidrs: Vec<String>,
    #[serde(default)]
    pub deny_cidrs: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MachineRecord {
    pub id: String,
    pub spec: MachineSpec,
    pub phase: Phase,
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub process: Option<VmProcess>,
    /// The machine's slot in the network pool (set by [`Store::allocate_net_slot`]).
    pub net_slot: Option<u32>,
}

impl MachineRecord {
    /// A new machine about to start.
    pub fn starting(id: &str, spec: MachineSpec) -> MachineRecord {
        MachineRecord {
            id: id.to_string(),
            spec,
            phase: Phase::Starting,
            error: None,
            created_at: chrono::Utc::now(),
            started_at: None,
            process: None,
            net_slot: None,
        }
    }

    fn from_row(row: &Row) -> rusqlite::Result<MachineRecord> {
        let spec: String = row.get("spec")?;
        let phase: String = row.get("phase")?;
        let pid: Option<i32> = row.get("pid")?;
        let start: Option<i64> = row.get("pid_start_time")?;
        let bad = |what: String| {
            rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, what.into())
        };
        Ok(MachineRecord {
            id: row.get("id")?,
            spec: serde_json::from_str(&spec).map_err(|e| bad(e.to_string()))?,
            phase: Phase::parse(&phase).ok_or_else(|| bad(format!("phase {phase}")))?,
            error: row.get("error")?,
            created_at: row.get("created_at")?,
            started_at: row.get("started_at")?,
            process: pid.zip(start).map(|(pid, s)| VmProcess {
                pid,
                start_time: s as u64,
            }),
            net_slot: row.get("net_slot")?,
        })
    }
}

impl Store {
    /// Inserts a new machine; an existing id is a conflict.
    pub fn insert_machine(&self, m: &MachineRecord) -> Result<()> {
        let spec = serde_json::to_string(&m.spec).map_err(|e| Error::internal(e.to_string()))?;
        let res = self.conn().execute(
            "INSERT INTO machines (id, spec, phase, error, created_at, started_at, pid, pid_start_time)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                m.id,
                spec,
                m.phase.as_str(),
                m.error,
                m.created_at,
                m.started_at,
                m.process.map(|p| p.pid),
                m.process.map(|p| p.start_time as i64),
            ],
        );
        match res {
            Ok(_) => Ok(()),
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                Err(Error::conflict(format!("machine {} already exists", m.id)))
            }
            Err(e) => Err(e.into()),
        }
    }

    pub fn update_machine(&self, m: &MachineRecord) -> Result<()> {
        let spec = serde_json::to_string(&m.spec).map_err(|e| Error::internal(e.to_string()))?;
        self.conn().execute(
            "UPDATE machines SET spec = ?2, phase = ?3, error = ?4, started_at = ?5, pid = ?6,
             pid_start_time = ?7 WHERE id = ?1",
            params![
                m.id,
                spec,
                m.phase.as_str(),
                m.error,
                m.started_at,
                m.process.map(|p| p.pid),
                m.process.map(|p| p.start_time as i64),
            ],
        )?;
        Ok(())
    }

    pub fn get_machine(&self, id: &str) -> Result<Option<MachineRecord>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT * FROM machines WHERE id = ?1",
                [id],
                MachineRecord::from_row,
            )
            .optional()?)
    }

    /// How many machines there are, whatever their phase.
    pub fn machine_count(&self) -> Result<usize> {
        let n: i64 = self
            .conn()
            .query_row("SELECT COUNT(*) FROM machines", [], |r| r.get(0))?;
        Ok(n as usize)
    }

    /// Every machine; a record that no longer parses is skipped with a warning, so one bad row
    /// never hides the rest.
    pub fn list_machines(&self) -> Result<Vec<MachineRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT * FROM machines ORDER BY created_at, id")?;
        let rows = stmt.query_map([], MachineRecord::from_row)?;
        let mut out = Vec::new();
        for row in rows {
            match row {
                Ok(m) => out.push(m),
                Err(e) => tracing::warn!("skipping unreadable machine record: {e}"),
            }
        }
        Ok(out)
    }

    /// Gives machine `id` a free slot below `slots` (or the one it has), the next after the
    /// last one given: a slot a machine just left is taken last, so connections the host still
    /// tracks for its address are long gone when another machine gets it. None free is a
    /// conflict.
    pub fn allocate_net_slot(&self, id: &str, slots: u32) -> Result<u32> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let current: Option<u32> = tx
            .query_row("SELECT net_slot FROM machines WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .optional()?
            .flatten();
        if let Some(slot) = current {
            return Ok(slot);
        }
        let used: std::collections::HashSet<u32> = {
            let mut stmt =
                tx.prepare("SELECT net_slot FROM machines WHERE net_slot IS NOT NULL")?;
            let rows = stmt.query_map([], |r| r.get::<_, u32>(0))?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        let last: Option<u32> = tx
            .query_row("SELECT last_slot FROM net_state WHERE id = 0", [], |r| {
                r.get(0)
            })
            .optional()?;
        let start = last.map_or(0, |l| (l + 1) % slots.max(1));
        let free = (0..slots)
            .map(|i| (start + i) % slots)
            .find(|s| !used.contains(s))
            .ok_or_else(|| {
                Error::conflict(format!(
                    "the network pool is full ({slots} machines have networks)"
                ))
            })?;
        tx.execute(
            "UPDATE machines SET net_slot = ?2 WHERE id = ?1",
            params![id, free],
        )?;
        tx.execute(
            "INSERT INTO net_state (id, last_slot) VALUES (0, ?1)
             ON CONFLICT (id) DO UPDATE SET last_slot = ?1",
            [free],
        )?;
        tx.commit()?;
        Ok(free)
    }

    pub fn delete_machine(&self, id: &str) -> Result<()> {
        self.conn()
            .execute("DELETE FROM machines WHERE id = ?1", [id])?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub fn record(id: &str) -> MachineRecord {
        MachineRecord {
            id: id.into(),
            spec: MachineSpec {
                hostname: id.into(),
                ..MachineSpec::for_tests("k", None)
            },
            phase: Phase::Starting,
            error: None,
            created_at: Utc::now(),
            started_at: None,
            process: None,
            net_slot: None,
        }
    }

    #[test]
    fn net_slots_go_round_and_run_out() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.db")).unwrap();
        for id in ["a", "b", "c", "d", "e"] {
            store.insert_machine(&record(id)).unwrap();
        }
        assert_eq!(store.allocate_net_slot("a", 3).unwrap(), 0);
        assert_eq!(store.allocate_net_slot("b", 3).unwrap(), 1);
        assert_eq!(store.allocate_net_slot("a", 3).unwrap(), 0, "kept");
        store.delete_machine("a").unwrap();
        assert_eq!(
            store.allocate_net_slot("c", 3).unwrap(),
            2,
            "the freed slot waits"
        );
        assert_eq!(
            store.allocate_net_slot("d", 3).unwrap(),
            0,
            "then comes round"
        );
        let err = store.allocate_net_slot("e", 3).unwrap_err();
        assert_eq!(err.code, hearth_api::ErrorCode::Conflict);
    }

    #[test]
    fn insert_get_update_delete() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.db")).unwrap();
        let mut m = record("m1");
        store.insert_machine(&m).unwrap();
        let err = store.insert_machine(&m).unwrap_err();
        assert_eq!(err.code, hearth_api::ErrorCode::Conflict);
        m.phase = Phase::Running;
        m.process = Some(VmProcess {
            pid: 42,
            start_time: 7,
        });
        store.update_machine(&m).unwrap();
        let back = store.get_machine("m1").unwrap().unwrap();
        assert_eq!(back.phase, Phase::Running);
        assert_eq!(back.process, m.process);
        assert_eq!(store.list_machines().unwrap().len(), 1);
        store.delete_machine("m1").unwrap();
        assert!(store.get_machine("m1").unwrap().is_none());
    }

    #[test]
    fn a_corrupt_record_does_not_hide_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.db")).unwrap();
        store.insert_machine(&record("good")).unwrap();
        store
            .conn()
            .execute(
                "INSERT INTO machines (id, spec, phase, created_at) VALUES ('bad', '{', 'running', '2026-01-01T00:00:00Z')",
                [],
            )
            .unwrap();
        let all = store.list_machines().unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].id, "good");
    }
}
