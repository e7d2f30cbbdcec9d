//! Restore: a new machine from a snapshot on this host. From a memory snapshot it continues at
//! the snapshot's instant (QEMU loads the device state over the snapshot's memory file, mapped
//! private and paged in lazily); from a disk snapshot it cold-boots from copies of the disks.
//! Either way its disks are its own and it gets its own identity, clock and entropy.

use super::snapshots::{Timings, MEMORY, SYSTEM_DISK, VMSTATE};
use super::{machines::guest_hostname, nonce, Service};
use crate::error::{Error, Result};
use crate::failpoint;
use crate::storage;
use crate::store::{MachineRecord, MachineSpec, OpKind, SnapshotRecord};
use crate::vmm::MemoryBacking;
use chrono::Utc;
use hearth_api::{validate_id, ErrorCode, Machine, Phase, RestoreRequest, SnapshotKind};
use std::sync::Arc;
use std::time::Instant;

impl Service {
    pub async fn restore(
        self: &Arc<Self>,
        snapshot_id: &str,
        req: RestoreRequest,
    ) -> Result<(Machine, Timings)> {
        validate_id("machine", &req.machine_id).map_err(Error::invalid)?;
        let snap = match (&req.local_snapshot, &req.snapshot) {
            (Some(local), None) => {
                if local.snapshot_id != snapshot_id {
                    return Err(Error::invalid(format!(
                        "local_snapshot.snapshot_id {} is not the snapshot in the path ({snapshot_id})",
                        local.snapshot_id
                    )));
                }
                self.ready_snapshot(snapshot_id)?
            }
            (None, Some(_)) => {
                return Err(Error::invalid(
                    "restore from object storage (snapshot) is not supported by this hearthd yet",
                ))
            }
            _ => {
                return Err(Error::invalid(
                    "give exactly one of local_snapshot and snapshot",
                ))
            }
        };
        let spec = self.restored_spec(&snap, &req)?;
        let (svc, id) = (self.clone(), req.machine_id.clone());
        Self::detached(async move {
            let rt = svc.runtime(&id);
            let Ok(_op) = rt.op.try_lock() else {
                return Err(Error::conflict(format!(
                    "machine {id} has an operation pending"
                )));
            };
            let mut rec = MachineRecord {
                id: id.clone(),
                spec,
                phase: Phase::Starting,
                error: None,
                created_at: Utc::now(),
                started_at: None,
                process: None,
                ram_shared: false,
            };
            svc.store.insert_machine(&rec)?;
            let op = svc
                .store
                .begin_snapshot_op(OpKind::Restore, &id, Some(&snap.id))?;
            let result = svc.restore_into(&mut rec, &snap).await;
            if let Err(e) = &result {
                tracing::info!(machine = %id, snapshot = %snap.id, "restore failed: {}", e.message);
                svc.destroy(&id, rec.process.as_ref()).await;
            }
            svc.store.end_op(op)?;
            result.map(|timings| (rec.to_api(), timings))
        })
        .await
    }

    /// The new machine's spec: the source's, with the request's identity and sizes.
    fn restored_spec(&self, snap: &SnapshotRecord, req: &RestoreRequest) -> Result<MachineSpec> {
        let src = &snap.source;
        let memory_mib = match (snap.kind, req.memory_mib) {
            (SnapshotKind::Memory, Some(m)) if m != src.memory_mib => {
                return Err(Error::invalid(format!(
                    "memory_mib {m} differs from the memory snapshot's {}",
                    src.memory_mib
                )))
            }
            (_, m) => m.unwrap_or(src.memory_mib),
        };
        let storage_bytes = req.storage_bytes.unwrap_or(src.storage_bytes);
        if storage_bytes < src.storage_bytes {
            return Err(Error::invalid(format!(
                "storage_bytes {storage_bytes} is smaller than the snapshot's disk ({}); disks never shrink",
                src.storage_bytes
            )));
        }
        Ok(MachineSpec {
            artifact: req.artifact.clone(),
            memory_mib,
            storage_bytes,
            hostname: guest_hostname(&req.machine_id, req.guest_config.as_ref())?,
            machine_uuid: nonce(),
            restored_from: Some(snap.id.clone()),
            ..src.clone()
        })
    }

    async fn restore_into(
        &self,
        rec: &mut MachineRecord,
        snap: &SnapshotRecord,
    ) -> Result<Timings> {
        let started = Instant::now();
        let snap_dir = self.snapshot_dir(&snap.id);
        self.verify_local_artifacts(snap)?;
        let paths = self.paths(&rec.id);
        std::fs::create_dir_all(&paths.dir)?;
        let (src, dst, mode, size) = (
            snap_dir.join(SYSTEM_DISK),
            paths.system_disk(),
            self.cfg.clone,
            rec.spec.storage_bytes,
        );
        tokio::task::spawn_blocking(move || {
            storage::clone_file(&src, &dst, mode)?;
            storage::grow_ext4(&dst, size)
        })
        .await
        .map_err(|e| Error::internal(e.to_string()))??;
        let mut timings = vec![("disks", started.elapsed())];

        if snap.kind == SnapshotKind::Disk {
            self.boot(rec).await?;
            timings.push(("agent", started.elapsed()));
            return Ok(timings);
        }
        let memory = if snap.memory_in_vmstate {
            MemoryBacking::Anonymous
        } else {
            MemoryBacking::PrivateFile(snap_dir.join(MEMORY))
        };
        let spec = self.vm_spec(rec, memory);
        let t = Instant::now();
        let proc = self.vmm.restore(&spec, &snap_dir.join(VMSTATE)).await?;
        timings.push(("running", t.elapsed()));
        rec.process = Some(proc);
        rec.ram_shared = false;
        self.store.update_machine(rec)?;
        failpoint::stall("restore-running").await;
        self.finish_start(rec, &paths, proc, true, t).await?;
        timings.push(("agent", t.elapsed()));
        Ok(timings)
    }

    /// The device state is checked byte for byte (it is small and QEMU trusts it); the larger
    /// files by size.
    fn verify_local_artifacts(&self, snap: &SnapshotRecord) -> Result<()> {
        let dir = self.snapshot_dir(&snap.id);
        for a in &snap.artifacts {
            let path = dir.join(&a.name);
            let integrity = |what: String| Error {
                code: ErrorCode::Integrity,
                message: format!("snapshot {} artifact {}: {what}", snap.id, a.name),
            };
            let size = std::fs::metadata(&path)
                .map_err(|e| integrity(format!("{e}")))?
                .len();
            if size != a.size_bytes {
                return Err(integrity(format!(
                    "{size} bytes, expected {}",
                    a.size_bytes
                )));
            }
            if a.name == VMSTATE {
                let (_, sha) = storage::sha256_sparse(&path)?;
                if Some(&sha) != a.sha256_hex.as_ref() {
                    return Err(integrity(format!(
                        "sha256 {sha} does not match the snapshot's"
                    )));
                }
            }
        }
        Ok(())
    }
}
