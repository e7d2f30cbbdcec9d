//! Snapshots: memory, device state and disks of a running machine, taken in a fraction of a
//! second while it is paused. A snapshot is usable once its files are written: the small ones
//! (manifest, device state) are hashed at once, for the integrity checks of local restores;
//! memory and disks only when an upload needs their digests ([`Service::hashed_snapshot`]),
//! all files in parallel, and the result is kept. Files reach the disk in the background.

use super::{Operation, Service};
use crate::error::{Error, Result};
use crate::storage;
use crate::store::{MachineRecord, NetworkSpec, OpKind, SnapshotRecord};
use crate::vmm::{StateKind, Vmm};
use crate::{failpoint, host};
use chrono::Utc;
use hearth_api::{
    validate_id, ArtifactKind, ArtifactRef, CreateSnapshotRequest, CreateSnapshotResponse, Phase,
    Snapshot, SnapshotArtifact, SnapshotKind, VmmKind,
};
use hearth_proto::Op;
use serde::{Deserialize, Serialize};

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const MEMORY: &str = "memory";
pub const VMSTATE: &str = "vmstate";
pub const SYSTEM_DISK: &str = "system.img";
pub const MANIFEST: &str = "manifest.json";

/// The format of `manifest.json` this hearthd writes and the newest it reads. Bumped when a
/// field is added or changes meaning; a restore refuses a newer one rather than misread it.
/// 2: a memory snapshot's device state may be QEMU's devices alone, without the configuration
/// section a migration stream starts with (a restored machine's: see `vmm::qemu`), which an
/// older hearthd would hand to QEMU and fail on.
pub const MANIFEST_VERSION: u32 = 2;

/// `manifest.json`: what a snapshot needs to be restored anywhere.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotManifest {
    /// Absent from manifests written before the field existed. Those are version 1: they
    /// already hold every field a restore compares, so snapshots taken (and uploaded) before
    /// still restore.
    #[serde(default = "first_manifest_version")]
    pub format_version: u32,
    pub snapshot_id: String,
    pub machine_id: String,
    pub kind: SnapshotKind,
    pub created_at: chrono::DateTime<Utc>,
    pub vmm: VmmInfo,
    pub memory_mib: u32,
    pub vcpus: u32,
    pub storage_bytes: u64,
    pub memory_in_vmstate: bool,
    pub artifact: ArtifactRef,
    pub images: ImageDigests,
    pub disks: Vec<DiskEntry>,
    pub guest_kernel: Option<String>,
    pub host: HostInfo,
    /// The machine's network: whether it has a device (its state is in the snapshot, so a
    /// restore has one too) and its egress policy. Manifests from before networking have none.
    #[serde(default)]
    pub network: NetworkSpec,
}

pub(super) fn first_manifest_version() -> u32 {
    1
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmmInfo {
    pub kind: VmmKind,
    pub version: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageDigests {
    pub kernel_sha256: String,
    pub initrd_sha256: Option<String>,
    pub rootfs_sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiskEntry {
    pub name: String,
    pub role: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostInfo {
    pub cpu_model: String,
    pub cpu_flags: Vec<String>,
}

/// Named durations of the phases of an operation, for `Server-Timing`.
pub type Timings = Vec<(&'static str, Duration)>;

const AGENT_CALL: Duration = Duration::from_secs(10);
/// Tries to resume (or thaw) a machine after a snapshot before it is given up.
const RESUME_ATTEMPTS: u32 = 3;

/// A file of a snapshot before it is hashed.
pub(super) struct Written {
    id: &'static str,
    kind: ArtifactKind,
    name: &'static str,
}

impl Service {
    pub fn snapshot_dir(&self, id: &str) -> PathBuf {
        self.cfg.root.join("snapshots").join(id)
    }

    pub fn get_snapshot(&self, id: &str) -> Result<Snapshot> {
        self.ready_snapshot(id).map(|s| s.to_api())
    }

    /// [`Service::get_snapshot`] with every artifact's digest, computed where not known yet.
    pub async fn get_snapshot_hashed(self: &Arc<Self>, id: &str) -> Result<Snapshot> {
        self.ready_snapshot(id)?;
        let _in_use = self.use_snapshot(id)?;
        Ok(self.hashed_snapshot(id).await?.to_api())
    }

    /// A snapshot that is complete; one still being written is a conflict.
    pub(super) fn ready_snapshot(&self, id: &str) -> Result<SnapshotRecord> {
        validate_id("snapshot", id).map_err(Error::invalid)?;
        let snap = self
            .store
            .get_snapshot(id)?
            .ok_or_else(|| Error::not_found(format!("snapshot {id} not found")))?;
        if !snap.ready {
            return Err(Error::conflict(format!(
                "snapshot {id} is still being taken"
            )));
        }
        Ok(snap)
    }

    /// The file behind one artifact of a ready snapshot, and its size.
    pub fn artifact_file(&self, id: &str, artifact_id: &str) -> Result<(PathBuf, u64)> {
        let snap = self.ready_snapshot(id)?;
        let a = snap
            .artifacts
            .iter()
            .find(|a| a.id == artifact_id)
            .ok_or_else(|| {
                Error::not_found(format!("snapshot {id} has no artifact {artifact_id}"))
            })?;
        Ok((self.snapshot_dir(id).join(&a.name), a.size_bytes))
    }

    pub fn list_snapshots(&self, machine_id: Option<&str>) -> Result<Vec<Snapshot>> {
        if let Some(id) = machine_id {
            validate_id("machine", id).map_err(Error::invalid)?;
        }
        Ok(self
            .store
            .list_snapshots(machine_id)?
            .iter()
            .map(SnapshotRecord::to_api)
            .collect())
    }

    /// Deletes a snapshot. Machines restored from it keep running: their private mappings hold
    /// the memory pages they use, and their disks are their own.
    pub async fn delete_snapshot(&self, id: &str) -> Result<()> {
        self.ready_snapshot(id)?;
        self.claim_for_delete(id)?;
        let result = match storage::remove_tree(&self.snapshot_dir(id)).await {
            Ok(()) => self.store.delete_snapshot(id),
            Err(e) => Err(e),
        };
        self.release_delete(id);
        result
    }

    pub async fn create_snapshot(
        self: &Arc<Self>,
        machine_id: &str,
        req: CreateSnapshotRequest,
    ) -> Result<(CreateSnapshotResponse, Timings)> {
        validate_id("machine", machine_id).map_err(Error::invalid)?;
        validate_id("snapshot", &req.snapshot_id).map_err(Error::invalid)?;
        let kind = req.kind.unwrap_or(SnapshotKind::Memory);
        let op = Operation::on(OpKind::Snapshot, machine_id).snapshot(&req.snapshot_id);
        self.operation(op, move |svc, machine_id, lock| async move {
            let started = Instant::now();
            let rec = svc.record(&machine_id)?;
            if rec.phase != Phase::Running {
                return Err(Error::conflict(format!(
                    "machine {machine_id} is {}; only a running machine can be snapshotted",
                    rec.phase.as_str()
                )));
            }
            let mut snap = SnapshotRecord {
                id: req.snapshot_id.clone(),
                machine_id: machine_id.clone(),
                kind,
                ready: false,
                source: rec.spec.clone(),
                // Known once the VMM wrote its state.
                memory_in_vmstate: false,
                artifacts: Vec::new(),
                created_at: Utc::now(),
            };
            svc.store.insert_snapshot(&snap)?;
            let dir = svc.snapshot_dir(&snap.id);
            let taken = svc.take(&rec, kind, &dir).await;
            // The machine runs again: hashing needs no lock on it.
            lock.release();
            let result = match taken {
                Ok((written, mut timings)) => {
                    snap.memory_in_vmstate = kind == SnapshotKind::Memory
                        && !written.iter().any(|w| w.kind == ArtifactKind::Memory);
                    let t = Instant::now();
                    let done = svc.finish(&rec, &mut snap, &dir, written).await;
                    timings.push(("hash", t.elapsed()));
                    done.map(|()| timings)
                }
                Err(e) => Err(e),
            };
            match result {
                Ok(mut timings) => {
                    timings.push(("total", started.elapsed()));
                    let snapshot = snap.to_api();
                    let artifacts = snapshot.artifacts.clone();
                    Ok((
                        CreateSnapshotResponse {
                            snapshot,
                            artifacts,
                        },
                        timings,
                    ))
                }
                Err(e) => {
                    svc.discard_partial_snapshot(&snap.id).await;
                    Err(e)
                }
            }
        })
        .await
    }

    /// Sync and freeze the guest, pause, write the VMM's state (for a memory snapshot) and a
    /// clone of the system disk into `dir`, resume, thaw. The machine is resumed (and thawed)
    /// whatever fails; a machine that cannot be resumed is marked failed, as it is. The caller
    /// removes what a failure left in `dir`.
    pub(super) async fn take(
        &self,
        rec: &MachineRecord,
        kind: SnapshotKind,
        dir: &Path,
    ) -> Result<(Vec<Written>, Timings)> {
        std::fs::create_dir_all(dir)?;
        let paths = self.paths(&rec.id);
        let agent = self.agent(&rec.id).await?;
        let vmm = self.vmm(rec.spec.vmm)?;
        let mut timings = Vec::new();
        if kind == SnapshotKind::Memory {
            // While the guest runs, not even frozen.
            let t = Instant::now();
            vmm.prepare_state(&paths, dir).await?;
            timings.push(("prepare", t.elapsed()));
        }
        let t = Instant::now();
        agent.call(Op::Sync, Some(AGENT_CALL)).await?;
        // A frozen filesystem is clean on disk; where freezing is not supported a synced one
        // is the next best thing.
        if let Err(e) = agent.call(Op::Freeze, Some(AGENT_CALL)).await {
            tracing::warn!(machine = %rec.id, "freeze: {}", e.message);
        }
        timings.push(("quiesce", t.elapsed()));

        let paused_at = Instant::now();
        let written = match vmm.pause(&paths).await {
            Ok(()) => self.write_paused(rec, vmm.as_ref(), kind, dir).await,
            Err(e) => Err(e.into()),
        };
        failpoint::stall("snapshot-paused").await;
        self.resume_or_fail(rec).await?;
        timings.push(("paused", paused_at.elapsed()));
        // Even after a freeze that seemed to fail: one that timed out may have frozen the guest
        // all the same, and thawing a filesystem that is not frozen does nothing.
        self.thaw_or_fail(rec).await?;
        Ok((written?, timings))
    }

    /// Resumes a paused machine (see [`Service::or_fail`]).
    pub(super) async fn resume_or_fail(&self, rec: &MachineRecord) -> Result<()> {
        let (vmm, paths) = (self.vmm(rec.spec.vmm)?, &self.paths(&rec.id));
        self.or_fail(
            rec,
            "the VMM did not resume after a snapshot",
            move || async move {
                failpoint::fail("resume")?;
                Ok(vmm.resume(paths).await?)
            },
        )
        .await
    }

    /// Thaws the guest's root filesystem (see [`Service::or_fail`]).
    pub(super) async fn thaw_or_fail(&self, rec: &MachineRecord) -> Result<()> {
        let what = "the guest's filesystem could not be thawed after a snapshot";
        self.or_fail(rec, what, || async {
            let agent = self.agent(&rec.id).await?;
            agent.call(Op::Thaw, Some(AGENT_CALL)).await.map(|_| ())
        })
        .await
    }

    /// Runs `step` (a resume, a thaw) up to a few times. A machine left paused or frozen is of
    /// no use to anybody and its record must not say running: when every try fails it is
    /// marked failed, its VMM stopped, with `what` as the reason (a start boots it again).
    async fn or_fail<F, Fut>(&self, rec: &MachineRecord, what: &str, mut step: F) -> Result<()>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<()>>,
    {
        let mut last = None;
        for attempt in 0..RESUME_ATTEMPTS {
            match step().await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    tracing::warn!(machine = %rec.id, attempt, "{what}: {}", e.message);
                    last = Some(e);
                }
            }
            tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
        }
        let e = last.expect("at least one attempt");
        let reason = format!("{what} ({}); it was stopped", e.message);
        self.mark_failed(rec.clone(), &reason).await;
        Err(Error::unavailable(format!("machine {}: {reason}", rec.id)))
    }

    /// The part done while the machine is paused.
    async fn write_paused(
        &self,
        rec: &MachineRecord,
        vmm: &dyn Vmm,
        kind: SnapshotKind,
        dir: &Path,
    ) -> Result<Vec<Written>> {
        let paths = self.paths(&rec.id);
        let mut written = Vec::new();
        if kind == SnapshotKind::Memory {
            let process = rec
                .process
                .ok_or_else(|| Error::conflict(format!("machine {} has no VMM", rec.id)))?;
            for file in vmm.save_state(&paths, &process, dir).await? {
                written.push(match file.kind {
                    StateKind::DeviceState => Written {
                        id: "vmstate",
                        kind: ArtifactKind::Vmstate,
                        name: file.name,
                    },
                    StateKind::Memory => Written {
                        id: "memory",
                        kind: ArtifactKind::Memory,
                        name: file.name,
                    },
                });
            }
        }
        let (disk, copy, mode) = (paths.system_disk(), dir.join(SYSTEM_DISK), self.cfg.clone);
        storage::blocking(move || storage::clone_file(&disk, &copy, mode).map(drop)).await??;
        written.push(Written {
            id: "system",
            kind: ArtifactKind::Disk,
            name: SYSTEM_DISK,
        });
        Ok(written)
    }

    /// Writes the manifest, hashes the small artifacts, and marks the snapshot ready; its files
    /// are flushed to disk in the background.
    async fn finish(
        &self,
        rec: &MachineRecord,
        snap: &mut SnapshotRecord,
        dir: &Path,
        mut written: Vec<Written>,
    ) -> Result<()> {
        let guest_kernel = self
            .agent(&rec.id)
            .await
            .ok()
            .and_then(|a| a.identity())
            .map(|i| i.kernel_release);
        let (cpu_model, cpu_flags) = host::cpu_model_and_flags();
        let manifest = SnapshotManifest {
            format_version: MANIFEST_VERSION,
            snapshot_id: snap.id.clone(),
            machine_id: snap.machine_id.clone(),
            kind: snap.kind,
            created_at: snap.created_at,
            vmm: VmmInfo {
                kind: rec.spec.vmm,
                version: self.vmm(rec.spec.vmm)?.version(),
            },
            memory_mib: snap.source.memory_mib,
            vcpus: snap.source.vcpus,
            storage_bytes: snap.source.storage_bytes,
            memory_in_vmstate: snap.memory_in_vmstate,
            artifact: snap.source.artifact.clone(),
            images: ImageDigests {
                kernel_sha256: snap.source.kernel_sha256.clone(),
                initrd_sha256: snap.source.initrd_sha256.clone(),
                rootfs_sha256: snap.source.rootfs_sha256.clone(),
            },
            disks: vec![DiskEntry {
                name: SYSTEM_DISK.into(),
                role: "system".into(),
            }],
            guest_kernel,
            host: HostInfo {
                cpu_model,
                cpu_flags,
            },
            network: snap.source.network.clone(),
        };
        let text =
            serde_json::to_vec_pretty(&manifest).map_err(|e| Error::internal(e.to_string()))?;
        let path = dir.join(MANIFEST);
        std::fs::write(&path, text).map_err(|e| Error::io("writing", &path, e))?;
        written.push(Written {
            id: "manifest",
            kind: ArtifactKind::Manifest,
            name: MANIFEST,
        });

        let mut artifacts = Vec::new();
        for w in &written {
            let path = dir.join(w.name);
            let size = std::fs::metadata(&path)
                .map_err(|e| Error::io("reading", &path, e))?
                .len();
            let sha = if matches!(w.kind, ArtifactKind::Manifest | ArtifactKind::Vmstate) {
                Some(
                    storage::blocking(move || storage::sha256_sparse(&path))
                        .await??
                        .1,
                )
            } else {
                None
            };
            artifacts.push(SnapshotArtifact {
                id: w.id.to_string(),
                kind: w.kind,
                name: w.name.to_string(),
                size_bytes: size,
                sha256_hex: sha,
                object_key: None,
                download_url: None,
            });
        }
        // Marked before it is ready: a host that goes down before the flush below ends must
        // not leave a ready snapshot with torn files (see `recover_unflushed_snapshots`).
        self.store
            .set_snapshot_unflushed(&snap.id, Some(&host::boot_id()))?;
        snap.artifacts = artifacts;
        snap.ready = true;
        self.store.update_snapshot(snap)?;
        self.flush_in_background(&snap.id);
        Ok(())
    }

    /// Flushes snapshot `id`'s files and directory to disk, off the caller's path (a restore on
    /// this host reads through the page cache and needs none of it on disk), then clears its
    /// mark.
    fn flush_in_background(&self, id: &str) {
        let (store, id, dir) = (self.store.clone(), id.to_string(), self.snapshot_dir(id));
        tokio::task::spawn_blocking(move || {
            let files = std::fs::read_dir(&dir)
                .map(|entries| entries.flatten().map(|e| e.path()).collect::<Vec<_>>())
                .map_err(|e| Error::io("reading", &dir, e));
            // A snapshot deleted meanwhile has nothing left to flush.
            let synced = files
                .and_then(|files| files.iter().try_for_each(|f| storage::sync_file_gently(f)))
                .and_then(|()| storage::sync_dir(&dir))
                .and_then(|()| dir.parent().map_or(Ok(()), storage::sync_dir))
                .and_then(|()| store.set_snapshot_unflushed(&id, None));
            if let Err(e) = synced {
                tracing::debug!(snapshot = %id, "flushing: {}", e.message);
            }
        });
    }

    /// At start: snapshots whose files were not all on disk when the daemon stopped. Within
    /// the same host boot the page cache still holds them, and they are flushed; after the host
    /// went down they may be torn (their large files are hashed only on demand, so nothing else
    /// would notice), and they are deleted.
    pub(super) async fn recover_unflushed_snapshots(&self) {
        let unflushed = match self.store.unflushed_snapshots() {
            Ok(u) => u,
            Err(e) => {
                tracing::error!("reading snapshots: {}", e.message);
                return;
            }
        };
        let boot = host::boot_id();
        for (id, written_in) in unflushed {
            if written_in == boot {
                self.flush_in_background(&id);
                continue;
            }
            tracing::warn!(snapshot = %id, "the host went down before this snapshot's files reached the disk: it is deleted");
            self.discard_partial_snapshot(&id).await;
        }
    }

    /// A ready snapshot with the digest of every artifact: those not known yet are computed,
    /// each file on a thread of its own, and recorded. One hashing of a snapshot runs at a
    /// time: callers that waited for it find its digests recorded. The caller keeps the
    /// snapshot from being deleted meanwhile ([`Service::use_snapshot`]).
    pub(super) async fn hashed_snapshot(&self, id: &str) -> Result<SnapshotRecord> {
        self.artifacts
            .blobs()
            .one_at_a_time(&format!("hash:{id}"), self.hash_missing(id))
            .await
    }

    async fn hash_missing(&self, id: &str) -> Result<SnapshotRecord> {
        let mut snap = self.ready_snapshot(id)?;
        let dir = self.snapshot_dir(id);
        let jobs: Vec<_> = snap
            .artifacts
            .iter()
            .enumerate()
            .filter(|(_, a)| a.sha256_hex.is_none())
            .map(|(i, a)| {
                let path = dir.join(&a.name);
                (
                    i,
                    tokio::task::spawn_blocking(move || storage::sha256_sparse(&path)),
                )
            })
            .collect();
        if jobs.is_empty() {
            return Ok(snap);
        }
        for (i, job) in jobs {
            let (_, sha) = job.await.map_err(|e| Error::internal(e.to_string()))??;
            snap.artifacts[i].sha256_hex = Some(sha);
        }
        self.store.update_snapshot(&snap)?;
        Ok(snap)
    }
}
