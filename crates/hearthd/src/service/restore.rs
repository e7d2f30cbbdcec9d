//! Restore: a new machine from a snapshot, on this host (`local_snapshot`) or from object
//! storage (`snapshot`, artifacts downloaded and verified first). From a memory snapshot it
//! continues at the snapshot's instant (QEMU loads the device state over the snapshot's memory
//! file, mapped private and paged in lazily); from a disk snapshot it cold-boots from copies of
//! the disks. Either way its disks are its own and it gets its own identity, clock and entropy.

use super::network::check_port;
use super::snapshots::{SnapshotManifest, Timings, MEMORY, SYSTEM_DISK, VMSTATE};
use super::{compat, machines::guest_hostname, nonce, Operation, Service};
use crate::access::{self, Caller};
use crate::blobs::Leases;
use crate::error::{Error, Result};
use crate::failpoint;
use crate::storage;
use crate::store::{MachineRecord, MachineSpec, OpKind, SnapshotRecord};
use crate::vmm::NetAttach;
use hearth_api::{
    excerpt, validate_id, ArtifactKind, DurableSnapshotRef, ErrorCode, Machine, RestoreRequest,
    SnapshotKind,
};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// A snapshot's files, wherever they are, and what it was taken of.
pub(super) struct Source {
    pub id: String,
    pub kind: SnapshotKind,
    pub memory_in_vmstate: bool,
    pub spec: MachineSpec,
    pub vmstate: PathBuf,
    pub memory: PathBuf,
    pub disk: PathBuf,
}

impl Service {
    pub async fn restore(
        self: &Arc<Self>,
        snapshot_id: &str,
        req: RestoreRequest,
        caller: Caller,
    ) -> Result<(Machine, Timings)> {
        validate_id("machine", &req.machine_id).map_err(Error::invalid)?;
        validate_id("snapshot", snapshot_id).map_err(Error::invalid)?;
        let given = |id: &str, field: &str| {
            if id == snapshot_id {
                Ok(())
            } else {
                Err(Error::invalid(format!(
                    "{field}.snapshot_id {id} is not the snapshot in the path ({snapshot_id})"
                )))
            }
        };
        match (&req.local_snapshot, &req.snapshot) {
            (Some(local), None) => given(&local.snapshot_id, "local_snapshot")?,
            (None, Some(durable)) => {
                given(&durable.snapshot_id, "snapshot")?;
                validate_id("machine", &durable.machine_id).map_err(Error::invalid)?;
            }
            _ => {
                return Err(Error::invalid(
                    "give exactly one of local_snapshot and snapshot",
                ))
            }
        }
        // Every URL is checked before anything is fetched.
        self.artifacts.check(&req.artifact, caller)?;
        for a in req.snapshot.iter().flat_map(|d| &d.artifacts) {
            if let Some(url) = &a.download_url {
                access::object_url(&format!("artifact {}: download_url", a.name), url)?;
            }
        }
        let ports = req.ports.clone().unwrap_or_default();
        ports.iter().try_for_each(check_port)?;
        guest_hostname(&req.machine_id, req.guest_config.as_ref())?;
        if let Some(durable) = &req.snapshot {
            check_claimed_sizes(durable)?;
        }
        let boot = self.boot_permit()?;
        self.check_room()?;
        let op = Operation::on(OpKind::Restore, &req.machine_id).snapshot(snapshot_id);
        let snapshot_id = snapshot_id.to_string();
        // The download is part of the operation: a client that hangs up does not cut it short.
        self.operation(op, move |svc, id, _| async move {
            let _boot = boot;
            // What a durable restore downloads, dropped again if the restore fails.
            let leases = Leases::default();
            let prepared = async {
                let (source, in_use) = match &req.snapshot {
                    Some(durable) => (
                        svc.download_source(durable, &req, caller, &leases).await?,
                        None,
                    ),
                    None => {
                        // In use first: a delete cannot then slip in between the check and the
                        // use.
                        let in_use = svc.use_snapshot(&snapshot_id)?;
                        let snap = svc.ready_snapshot(&snapshot_id)?;
                        svc.verify_local_artifacts(&snap).await?;
                        svc.check_local_restorable(&snap, req.vmm)?;
                        (svc.local_source(snap), Some(in_use))
                    }
                };
                let mut spec = restored_spec(&source, &req)?;
                // Before anything is made: a disk snapshot asked onto a backend not enabled.
                svc.vmm(spec.vmm)?;
                svc.check_size(spec.memory_mib, spec.vcpus, spec.storage_bytes)?;
                spec.network = svc.inherited_network(&source.spec.network, req.network.as_ref())?;
                let rec = MachineRecord::starting(&id, spec);
                svc.insert_new_machine(&rec)?;
                Ok((source, in_use, rec))
            }
            .await;
            let (source, _in_use, mut rec) = match prepared {
                Ok(prepared) => prepared,
                Err(e) => {
                    leases.discard().await;
                    return Err(e);
                }
            };
            let mut result = svc.restore_into(&mut rec, &source).await;
            if result.is_ok() {
                if let Err(e) = svc.publish_all(&rec, &ports).await {
                    result = Err(e);
                }
            }
            if let Err(e) = &result {
                tracing::info!(machine = %id, snapshot = %source.id, "restore failed: {}", e.message);
                svc.destroy(&id, Some(&rec)).await;
                leases.discard().await;
            }
            result.map(|timings| (svc.machine_api(&rec), timings))
        })
        .await
    }

    fn local_source(&self, snap: SnapshotRecord) -> Source {
        let dir = self.snapshot_dir(&snap.id);
        Source {
            id: snap.id,
            kind: snap.kind,
            memory_in_vmstate: snap.memory_in_vmstate,
            spec: snap.source,
            vmstate: dir.join(VMSTATE),
            memory: dir.join(MEMORY),
            disk: dir.join(SYSTEM_DISK),
        }
    }

    /// Downloads (or finds in the blob store) every artifact of a durable snapshot, verified.
    /// The sizes the request claims are checked against the manifest before the large
    /// downloads, and the machine it describes against this host's limits.
    async fn download_source(
        &self,
        d: &DurableSnapshotRef,
        req: &RestoreRequest,
        caller: Caller,
        leases: &Leases,
    ) -> Result<Source> {
        let artifact = &req.artifact;
        let find = |kind: ArtifactKind| d.artifacts.iter().find(|a| a.kind == kind);
        let fetch = |a: &hearth_api::SnapshotArtifact| {
            let a = a.clone();
            async move {
                let (Some(url), Some(sha)) = (&a.download_url, &a.sha256_hex) else {
                    return Err(Error::invalid(format!(
                        "artifact {}: download_url and sha256_hex are required",
                        a.name
                    )));
                };
                self.fetch_verified(&a.name, url, sha, a.size_bytes, leases)
                    .await
            }
        };
        let manifest = find(ArtifactKind::Manifest)
            .ok_or_else(|| Error::invalid("the snapshot's manifest artifact is required"))?;
        let text = std::fs::read(fetch(manifest).await?)?;
        let m = compat::parse_manifest(&d.snapshot_id, &text)?;
        // The manifest is the guest's word as much as the request's: the machine it describes
        // (whose disk and memory are what gets downloaded) is held to this host's limits, and
        // the restore to the manifest, before anything large is fetched.
        let (memory_mib, storage_bytes) =
            restored_sizes(m.kind, m.memory_mib, m.storage_bytes, req)?;
        self.check_size(memory_mib, m.vcpus, storage_bytes)?;
        self.inherited_network(&m.network, req.network.as_ref())?;
        for a in &d.artifacts {
            check_against_manifest(a, &m)?;
        }
        let mut missing = Vec::new();
        if find(ArtifactKind::Disk).is_none() {
            missing.push("disk");
        }
        if m.kind == SnapshotKind::Memory {
            if find(ArtifactKind::Vmstate).is_none() {
                missing.push("vmstate");
            }
            if !m.memory_in_vmstate && find(ArtifactKind::Memory).is_none() {
                missing.push("memory");
            }
        }
        if !missing.is_empty() {
            return Err(Error::invalid(format!(
                "a {:?} snapshot needs its {} artifact(s)",
                m.kind,
                missing.join(", ")
            )));
        }
        let kernel = self
            .artifacts
            .fetch(
                "kernel_image_url",
                &artifact.kernel_image_url,
                caller,
                leases,
            )
            .await?;
        let initrd = match &artifact.initrd_url {
            Some(url) => Some(
                self.artifacts
                    .fetch("initrd_url", url, caller, leases)
                    .await?
                    .sha256,
            ),
            None => None,
        };
        // Before the large downloads: a snapshot that cannot run here is not fetched.
        self.check_restorable(&m, req.vmm, m.memory_mib, &kernel.sha256, initrd.as_deref())?;
        // Only what the restore uses: a disk snapshot cold-boots from its disk alone, and a
        // memory snapshot whose RAM travels in its device state has no memory file.
        let needed = |kind| match kind {
            ArtifactKind::Vmstate => m.kind == SnapshotKind::Memory,
            _ => m.kind == SnapshotKind::Memory && !m.memory_in_vmstate,
        };
        let optional = |kind| async move {
            match find(kind).filter(|_| needed(kind)) {
                Some(a) => fetch(a).await.map(Some),
                None => Ok(None),
            }
        };
        let (disk, vmstate, memory) = tokio::try_join!(
            fetch(find(ArtifactKind::Disk).expect("checked")),
            optional(ArtifactKind::Vmstate),
            optional(ArtifactKind::Memory),
        )?;
        Ok(Source {
            id: d.snapshot_id.clone(),
            kind: m.kind,
            memory_in_vmstate: m.memory_in_vmstate,
            spec: MachineSpec {
                artifact: artifact.clone(),
                memory_mib: m.memory_mib,
                vcpus: m.vcpus,
                storage_bytes: m.storage_bytes,
                hostname: String::new(),
                machine_uuid: String::new(),
                kernel_sha256: kernel.sha256,
                initrd_sha256: initrd,
                rootfs_sha256: m.images.rootfs_sha256,
                vmm: m.vmm.kind,
                restored_from: None,
                network: m.network,
            },
            vmstate: vmstate.unwrap_or_default(),
            memory: memory.unwrap_or_default(),
            disk,
        })
    }

    pub(super) async fn restore_into(
        &self,
        rec: &mut MachineRecord,
        src: &Source,
    ) -> Result<Timings> {
        let started = Instant::now();
        let a = self.allocate_network(rec)?;
        let (disk, network) = tokio::join!(
            self.make_system_disk(rec, &src.disk),
            self.prepare_network(a.as_ref())
        );
        disk?;
        let network = network?;
        let spec = rec.spec.network.clone();
        let mut timings = vec![("disks", started.elapsed())];

        if src.kind == SnapshotKind::Disk {
            self.connect_network(a, spec).await?;
            self.boot(rec, network).await?;
            timings.push(("agent", started.elapsed()));
            return Ok(timings);
        }
        // The VMM finds the snapshot's state in the machine's own directory, linked: a
        // snapshot deleted while the machine runs leaves its memory file to the machine.
        let state = self.paths(&rec.id).state_dir();
        let mut files = vec![(src.vmstate.clone(), state.join(VMSTATE))];
        if !src.memory_in_vmstate {
            files.push((src.memory.clone(), state.join(MEMORY)));
        }
        let dir = state.clone();
        storage::blocking(move || {
            std::fs::create_dir_all(&dir).map_err(|e| Error::io("creating", &dir, e))?;
            files
                .iter()
                .try_for_each(|(from, to)| storage::link_file(from, to))
        })
        .await??;
        // The namespace is linked and its rules written while the VMM loads the state.
        let (resumed, connected) = tokio::join!(
            self.resume_from(rec, &state, network),
            self.connect_network(a, spec)
        );
        connected?;
        timings.extend(resumed?);
        // Loaded: only the memory file is still in use (a device state may hold all the RAM
        // of a restored machine's snapshot).
        let _ = storage::remove_file(&state.join(VMSTATE)).await;
        Ok(timings)
    }

    /// Starts the machine's VMM from the state in `state`, on the machine's own disks, and
    /// waits for its agent; on failure no VMM is left.
    pub(super) async fn resume_from(
        &self,
        rec: &mut MachineRecord,
        state: &Path,
        network: Option<NetAttach>,
    ) -> Result<Timings> {
        let paths = self.paths(&rec.id);
        let spec = self.vm_spec(rec, network)?;
        let t = Instant::now();
        let proc = self.vmm(rec.spec.vmm)?.restore(&spec, state).await?;
        let mut timings = vec![("running", t.elapsed())];
        rec.process = Some(proc);
        self.store.update_machine(rec)?;
        failpoint::stall("restore-running").await;
        self.finish_start(rec, &paths, proc, true, t, None).await?;
        timings.push(("agent", t.elapsed()));
        Ok(timings)
    }

    /// The device state is checked byte for byte (it is small and QEMU trusts it, but holds the
    /// guest's RAM when it was taken of a restored machine: hashed off the async threads); the
    /// larger files by size.
    async fn verify_local_artifacts(&self, snap: &SnapshotRecord) -> Result<()> {
        let dir = self.snapshot_dir(&snap.id);
        let snap = snap.clone();
        storage::blocking(move || {
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
        })
        .await?
    }
}

/// A manifest is a few kilobytes of JSON; a claim of more is refused before any download.
const MAX_MANIFEST: u64 = 1 << 20;
/// Device state beyond guest RAM: some 65 KB with the default devices; this leaves room.
const MAX_DEVICE_STATE: u64 = 64 << 20;

/// The sizes a durable restore request claims, before anything is fetched: every artifact has
/// some bytes, and a manifest is small.
fn check_claimed_sizes(d: &DurableSnapshotRef) -> Result<()> {
    for a in &d.artifacts {
        if a.size_bytes == 0 {
            return Err(Error::invalid(format!(
                "artifact {}: size_bytes must be at least 1 (a snapshot's artifacts are never \
                 empty)",
                excerpt(&a.name)
            )));
        }
        if a.kind == ArtifactKind::Manifest && a.size_bytes > MAX_MANIFEST {
            return Err(Error::invalid(format!(
                "artifact {}: size_bytes {} is larger than a manifest may be ({MAX_MANIFEST} bytes)",
                excerpt(&a.name),
                a.size_bytes
            )));
        }
    }
    Ok(())
}

/// An artifact's claimed size against what its manifest implies: the disk is `storage_bytes`,
/// the memory file `memory_mib` MiB, and the device state holds at most the RAM (when RAM
/// travels in it) and some device state.
fn check_against_manifest(a: &hearth_api::SnapshotArtifact, m: &SnapshotManifest) -> Result<()> {
    let ram = u64::from(m.memory_mib) << 20;
    let (fits, expected) = match a.kind {
        ArtifactKind::Manifest => return Ok(()),
        ArtifactKind::Disk => (
            a.size_bytes == m.storage_bytes,
            format!("the snapshot's disk is {} bytes", m.storage_bytes),
        ),
        ArtifactKind::Memory => (
            a.size_bytes == ram,
            format!(
                "the snapshot's memory is {ram} bytes ({} MiB)",
                m.memory_mib
            ),
        ),
        ArtifactKind::Vmstate => {
            // RAM in the stream costs a few bytes per page on top of the page.
            let max = MAX_DEVICE_STATE
                + if m.memory_in_vmstate {
                    ram + ram / 64
                } else {
                    0
                };
            (
                a.size_bytes <= max,
                format!("the snapshot's device state is at most {max} bytes"),
            )
        }
    };
    if fits {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "artifact {}: size_bytes {} does not fit its manifest: {expected}",
            excerpt(&a.name),
            a.size_bytes
        )))
    }
}

/// The memory and disk of a machine restored by `req` from a snapshot of `kind` taken of a
/// machine with `memory_mib` and `storage_bytes`.
fn restored_sizes(
    kind: SnapshotKind,
    memory_mib: u32,
    storage_bytes: u64,
    req: &RestoreRequest,
) -> Result<(u32, u64)> {
    let memory = match (kind, req.memory_mib) {
        (SnapshotKind::Memory, Some(m)) if m != memory_mib => {
            return Err(Error::invalid(format!(
                "memory_mib {m} differs from the memory snapshot's {memory_mib}"
            )))
        }
        (_, m) => m.unwrap_or(memory_mib),
    };
    let storage = req.storage_bytes.unwrap_or(storage_bytes);
    if storage < storage_bytes {
        return Err(Error::invalid(format!(
            "storage_bytes {storage} is smaller than the snapshot's disk ({storage_bytes}); disks \
             never shrink"
        )));
    }
    // Growing the filesystem under a running kernel that mounted it at the old size would
    // corrupt it: only a cold boot (a disk snapshot) may grow the disk.
    if kind == SnapshotKind::Memory && storage > storage_bytes {
        return Err(Error::invalid(format!(
            "storage_bytes {storage} is larger than the memory snapshot's disk ({storage_bytes}): \
             the restored kernel has that filesystem mounted and would not see it grow; restore \
             at the snapshot's size, or from a disk snapshot"
        )));
    }
    Ok((memory, storage))
}

/// The new machine's spec: the source's, with the request's identity and sizes.
fn restored_spec(src: &Source, req: &RestoreRequest) -> Result<MachineSpec> {
    let from = &src.spec;
    let (memory_mib, storage_bytes) =
        restored_sizes(src.kind, from.memory_mib, from.storage_bytes, req)?;
    Ok(MachineSpec {
        artifact: req.artifact.clone(),
        memory_mib,
        storage_bytes,
        hostname: guest_hostname(&req.machine_id, req.guest_config.as_ref())?,
        machine_uuid: nonce(),
        restored_from: Some(src.id.clone()),
        // A memory snapshot runs on the VMM that wrote it (`check_restorable` refused any
        // other); a disk snapshot boots on whichever was asked.
        vmm: match src.kind {
            SnapshotKind::Disk => req.vmm.unwrap_or(from.vmm),
            SnapshotKind::Memory => from.vmm,
        },
        ..from.clone()
    })
}
