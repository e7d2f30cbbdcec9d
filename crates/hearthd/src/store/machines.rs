use super::Store;
use crate::error::{Error, Result};
use chrono::{DateTime, Utc};
use hearth_api::{ArtifactRef, Machine, Phase, VmmKind};
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
}

/// The VMM process of a running machine. The start time (from /proc) tells a live process
/// from a later one that reused its pid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessRecord {
    pub pid: i32,
    pub start_time: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MachineRecord {
    pub id: String,
    pub spec: MachineSpec,
    pub phase: Phase,
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub process: Option<ProcessRecord>,
    /// The running boot's RAM is a shared file (a cold boot) rather than a private mapping of a
    /// snapshot's memory (a restore); only shared RAM can stay out of a snapshot's device state.
    pub ram_shared: bool,
}

impl MachineRecord {
    /// A new machine about to start, on shared RAM (a boot) or not (a restore).
    pub fn starting(id: &str, spec: MachineSpec, ram_shared: bool) -> MachineRecord {
        MachineRecord {
            id: id.to_string(),
            spec,
            phase: Phase::Starting,
            error: None,
            created_at: chrono::Utc::now(),
            started_at: None,
            process: None,
            ram_shared,
        }
    }

    pub fn to_api(&self) -> Machine {
        Machine {
            id: self.id.clone(),
            artifact: self.spec.artifact.clone(),
            system_volume_id: None,
            user_volume_ids: Vec::new(),
            runtime_host: None,
            ports: Vec::new(),
            guest_ssh_host_public_key: None,
            phase: self.phase,
            error: self.error.clone(),
            created_at: self.created_at,
            started_at: self.started_at,
            memory_mib: self.spec.memory_mib,
            vcpus: self.spec.vcpus,
            storage_bytes: self.spec.storage_bytes,
            vmm: self.spec.vmm,
            restored_from: self.spec.restored_from.clone(),
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
            process: pid.zip(start).map(|(pid, s)| ProcessRecord {
                pid,
                start_time: s as u64,
            }),
            ram_shared: row.get("ram_shared")?,
        })
    }
}

impl Store {
    /// Inserts a new machine; an existing id is a conflict.
    pub fn insert_machine(&self, m: &MachineRecord) -> Result<()> {
        let spec = serde_json::to_string(&m.spec).map_err(|e| Error::internal(e.to_string()))?;
        let res = self.conn().execute(
            "INSERT INTO machines (id, spec, phase, error, created_at, started_at, pid, pid_start_time, ram_shared)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                m.id,
                spec,
                m.phase.as_str(),
                m.error,
                m.created_at,
                m.started_at,
                m.process.map(|p| p.pid),
                m.process.map(|p| p.start_time as i64),
                m.ram_shared,
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
             pid_start_time = ?7, ram_shared = ?8 WHERE id = ?1",
            params![
                m.id,
                spec,
                m.phase.as_str(),
                m.error,
                m.started_at,
                m.process.map(|p| p.pid),
                m.process.map(|p| p.start_time as i64),
                m.ram_shared,
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
                artifact: ArtifactRef {
                    kernel_image_url: "file:///k".into(),
                    rootfs_url: "file:///r".into(),
                    initrd_url: None,
                },
                memory_mib: 256,
                vcpus: 1,
                storage_bytes: 1 << 30,
                hostname: id.into(),
                machine_uuid: "0".repeat(32),
                kernel_sha256: "k".into(),
                initrd_sha256: None,
                rootfs_sha256: "r".into(),
                vmm: VmmKind::Qemu,
                restored_from: None,
            },
            phase: Phase::Starting,
            error: None,
            created_at: Utc::now(),
            started_at: None,
            process: None,
            ram_shared: true,
        }
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
        m.process = Some(ProcessRecord {
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
