//! Templates: creates that restore instead of booting. The first machine made of an image
//! (with a given VMM and its version, memory, vCPUs, disk size and network device) boots, and
//! is snapshotted once its agent answered; later creates of the same kind restore that
//! snapshot with disks, identity, clock and entropy of their own, as any restore does — in a
//! fraction of a boot's time, sharing the template's memory pages. A template is found by a
//! key hashed from all of that, so a changed image, kernel or VMM finds none and makes its
//! own; the templates the same image URLs made before are removed then. A template that fails
//! to restore is removed, and the create boots.

use super::restore::Source;
use super::snapshots::{MEMORY, SYSTEM_DISK, VMSTATE};
use super::{nonce, Service};
use crate::error::{Error, Result};
use crate::storage;
use crate::store::{MachineRecord, MachineSpec};
use chrono::Utc;
use hearth_api::{ArtifactRef, SnapshotKind, VmmKind};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// Written last into a template's directory: a directory without it is not a template.
const INFO: &str = "template.json";
/// Suffix of a template's directory while it is written.
const PARTIAL: &str = ".partial-";

/// What a template was made of, for whoever looks at the data root and for invalidation.
#[derive(Debug, Serialize, Deserialize)]
struct TemplateInfo {
    artifact: ArtifactRef,
    kernel_sha256: String,
    initrd_sha256: Option<String>,
    rootfs_sha256: String,
    vmm: VmmKind,
    vmm_version: String,
    memory_mib: u32,
    vcpus: u32,
    storage_bytes: u64,
    network: bool,
    created_at: chrono::DateTime<Utc>,
}

impl Service {
    fn templates_dir(&self) -> PathBuf {
        self.cfg.root.join("templates")
    }

    /// The template key of machines like `spec` (its images' digests known), unless templates
    /// are off.
    pub(super) fn template_key(&self, spec: &MachineSpec) -> Result<Option<String>> {
        if !self.cfg.templates {
            return Ok(None);
        }
        let vmm = self.vmm(spec.vmm)?;
        let inputs = format!(
            "{}\n{}\n{}\n{}\n{}\n{}\n{}\n{}\n{}",
            spec.kernel_sha256,
            spec.initrd_sha256.as_deref().unwrap_or("-"),
            spec.rootfs_sha256,
            spec.vmm,
            vmm.version(),
            spec.memory_mib,
            spec.vcpus,
            spec.storage_bytes,
            spec.network.enabled,
        );
        Ok(Some(hex::encode(&Sha256::digest(inputs.as_bytes())[..16])))
    }

    /// The directory of the template for `key`, when there is one.
    pub(super) fn template(&self, key: &str) -> Option<PathBuf> {
        let dir = self.templates_dir().join(key);
        dir.join(INFO).exists().then_some(dir)
    }

    /// Makes `rec` (a new machine, its images fetched) by restoring the template in `dir`. On
    /// failure what the attempt made is undone, the record and network kept for a boot, and
    /// the template removed.
    pub(super) async fn create_from_template(
        &self,
        rec: &mut MachineRecord,
        dir: &Path,
    ) -> Result<()> {
        let src = Source {
            id: format!("template {}", dir.display()),
            kind: SnapshotKind::Memory,
            memory_in_vmstate: false,
            spec: rec.spec.clone(),
            vmstate: dir.join(VMSTATE),
            memory: dir.join(MEMORY),
            disk: dir.join(SYSTEM_DISK),
        };
        let Err(e) = self.restore_into(rec, &src).await else {
            return Ok(());
        };
        tracing::warn!(machine = %rec.id, template = %dir.display(), "restoring the template failed; it is removed, and the machine boots: {}", e.message);
        if let Some(proc) = rec.process.take() {
            self.vmm(rec.spec.vmm)?
                .kill(&self.paths(&rec.id), &proc)
                .await;
        }
        self.clear_runtime_files(&rec.id).await;
        let paths = self.paths(&rec.id);
        storage::remove_tree(&paths.state_dir()).await?;
        storage::remove_file(&paths.system_disk()).await?;
        self.store.update_machine(rec)?;
        storage::remove_tree(dir).await?;
        Err(e)
    }

    /// Snapshots `rec`, a machine just booted whose agent answered, as the template for `key`.
    /// A template that cannot be made is logged, not the create's failure: the machine runs.
    pub(super) async fn make_template(&self, rec: &MachineRecord, key: &str) {
        let root = self.templates_dir();
        let partial = root.join(format!("{key}{PARTIAL}{}", nonce()));
        let made = async {
            let (_, timings) = self.take(rec, SnapshotKind::Memory, &partial).await?;
            let info = TemplateInfo {
                artifact: rec.spec.artifact.clone(),
                kernel_sha256: rec.spec.kernel_sha256.clone(),
                initrd_sha256: rec.spec.initrd_sha256.clone(),
                rootfs_sha256: rec.spec.rootfs_sha256.clone(),
                vmm: rec.spec.vmm,
                vmm_version: self.vmm(rec.spec.vmm)?.version(),
                memory_mib: rec.spec.memory_mib,
                vcpus: rec.spec.vcpus,
                storage_bytes: rec.spec.storage_bytes,
                network: rec.spec.network.enabled,
                created_at: Utc::now(),
            };
            let text =
                serde_json::to_vec_pretty(&info).map_err(|e| Error::internal(e.to_string()))?;
            let path = partial.join(INFO);
            std::fs::write(&path, text).map_err(|e| Error::io("writing", &path, e))?;
            let dir = root.join(key);
            // Another create of the same kind may have been first: its template stays.
            if std::fs::rename(&partial, &dir).is_err() {
                storage::remove_tree(&partial).await?;
                return Ok(());
            }
            tracing::info!(machine = %rec.id, template = %key, ?timings, "template made");
            self.remove_older_templates(key, &info.artifact).await;
            Ok::<_, Error>(())
        }
        .await;
        if let Err(e) = made {
            tracing::warn!(machine = %rec.id, "making a template: {}", e.message);
            if let Err(e) = storage::remove_tree(&partial).await {
                tracing::warn!("{}", e.message);
            }
        }
    }

    /// Removes the templates made before of the same image URLs: their images changed since.
    async fn remove_older_templates(&self, key: &str, artifact: &ArtifactRef) {
        for (dir, info) in self.templates() {
            if dir.file_name().is_some_and(|n| n != key) && info.artifact == *artifact {
                tracing::info!(template = %dir.display(), "removing a template of an image that changed");
                if let Err(e) = storage::remove_tree(&dir).await {
                    tracing::warn!("{}", e.message);
                }
            }
        }
    }

    /// Every complete template, with what it was made of.
    fn templates(&self) -> Vec<(PathBuf, TemplateInfo)> {
        let Ok(entries) = std::fs::read_dir(self.templates_dir()) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| {
                let text = std::fs::read(e.path().join(INFO)).ok()?;
                Some((e.path(), serde_json::from_slice(&text).ok()?))
            })
            .collect()
    }

    /// At start: removes templates left half-written by a crash, and templates of a VMM
    /// version this daemon does not run (no key can find them again).
    pub(super) async fn sweep_templates(&self) {
        let Ok(entries) = std::fs::read_dir(self.templates_dir()) else {
            return;
        };
        for entry in entries.flatten() {
            let dir = entry.path();
            let stale = match std::fs::read(dir.join(INFO)) {
                Err(_) => true,
                Ok(text) => match serde_json::from_slice::<TemplateInfo>(&text) {
                    Err(_) => true,
                    Ok(info) => self
                        .vmm(info.vmm)
                        .map(|v| v.version() != info.vmm_version)
                        .unwrap_or(true),
                },
            };
            if stale {
                tracing::info!(template = %dir.display(), "removing a stale template");
                if let Err(e) = storage::remove_tree(&dir).await {
                    tracing::warn!("{}", e.message);
                }
            }
        }
    }
}
