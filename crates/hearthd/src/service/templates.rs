//! Templates: creates that restore instead of booting. The first machine made of an image
//! (with a given VMM and its version, memory, vCPUs, disk size and network device) boots, and
//! is snapshotted once its agent answered; later creates of the same kind restore that
//! snapshot with disks, identity, clock and entropy of their own, as any restore does — in a
//! fraction of a boot's time, sharing the template's memory pages. A template is found by a
//! key hashed from all of that, so a changed image, kernel or VMM finds none and makes its
//! own; the templates the same image URLs made before for machines of the same size are removed
//! then. A template that fails its checks or its restore is removed, and the create boots.
//!
//! The template is taken while its machine is still starting, so no client's exec, process or
//! file can end up in it (and in every machine made from it).

use super::restore::Source;
use super::snapshots::{MEMORY, SYSTEM_DISK, VMSTATE};
use super::{nonce, Service};
use crate::error::{Error, Result};
use crate::store::{MachineRecord, MachineSpec};
use crate::{host, storage};
use chrono::Utc;
use hearth_api::{ArtifactRef, SnapshotKind, VmmKind};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// Written last into a template's directory: a directory without it is not a template.
const INFO: &str = "template.json";
/// Suffix of a template's directory while it is written.
const PARTIAL: &str = ".partial-";
/// Suffix of a template's directory on its way out.
const TRASH: &str = ".trash-";

/// What a template was made of, for whoever looks at the data root and for invalidation.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct TemplateInfo {
    /// This template, not another made later under the same key.
    id: String,
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
    /// Checked before every restore: the device state byte for byte, the rest by size.
    vmstate_sha256: String,
    sizes: Vec<(String, u64)>,
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
        // A guest resumed on a CPU lacking a feature it saw at boot fails later, not at once.
        let (cpu_model, cpu_flags) = host::cpu_model_and_flags();
        let inputs = format!(
            "{}\n{}\n{}\n{}\n{}\n{}\n{}\n{}\n{}\n{cpu_model}\n{}",
            spec.kernel_sha256,
            spec.initrd_sha256.as_deref().unwrap_or("-"),
            spec.rootfs_sha256,
            spec.vmm,
            vmm.version(),
            spec.memory_mib,
            spec.vcpus,
            spec.storage_bytes,
            spec.network.enabled,
            cpu_flags.join(" "),
        );
        Ok(Some(hex::encode(&Sha256::digest(inputs.as_bytes())[..16])))
    }

    /// The template for `key`, when there is one: its directory and what it was made of.
    pub(super) fn template(&self, key: &str) -> Option<(PathBuf, TemplateInfo)> {
        let dir = self.templates_dir().join(key);
        let info = read_info(&dir)?;
        Some((dir, info))
    }

    /// Makes `rec` (a new machine, its images fetched) by restoring the template in `dir`. On
    /// failure what the attempt made is undone, the record and network kept for a boot, and
    /// the template removed.
    pub(super) async fn create_from_template(
        &self,
        rec: &mut MachineRecord,
        dir: &Path,
        info: &TemplateInfo,
    ) -> Result<()> {
        if let Err(e) = check_files(dir, info).await {
            tracing::warn!(template = %dir.display(), "a template that fails its checks is removed: {}", e.message);
            self.remove_template(dir, &info.id).await;
            return Err(e);
        }
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
        self.remove_template(dir, &info.id).await;
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
        Err(e)
    }

    /// Removes the template in `dir` if it is still the one with this id (not a newer one made
    /// under the same key meanwhile): renamed out of the way first, so no create finds it half
    /// removed. True when it went.
    async fn remove_template(&self, dir: &Path, id: &str) -> bool {
        let trash = dir.with_file_name(format!(
            "{}{TRASH}{}",
            dir.file_name().unwrap_or_default().to_string_lossy(),
            nonce()
        ));
        {
            // The check and the rename as one step against a new template renamed in.
            let _one = self.template_lock();
            if read_info(dir).is_none_or(|i| i.id != id) {
                return false;
            }
            if let Err(e) = std::fs::rename(dir, &trash) {
                tracing::warn!(template = %dir.display(), "removing: {e}");
                return false;
            }
        }
        if let Err(e) = storage::remove_tree(&trash).await {
            tracing::warn!("{}", e.message);
        }
        true
    }

    fn template_lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.templates_renamed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// The template for `key`, marked as used (the last to go when there are too many).
    pub(super) fn use_template(&self, key: &str) -> Option<(PathBuf, TemplateInfo)> {
        let (dir, info) = self.template(key)?;
        if let Err(e) = touch(&dir) {
            tracing::warn!(template = %dir.display(), "marking as used: {e}");
        }
        Some((dir, info))
    }

    /// Snapshots `rec`, a machine just booted whose agent answered, as the template for `key`.
    /// A template that cannot be made is logged, not the create's failure, unless the machine
    /// itself did not survive it (a VMM that would not resume: the machine is failed then).
    pub(super) async fn make_template(&self, rec: &MachineRecord, key: &str) -> Result<()> {
        let root = self.templates_dir();
        let partial = root.join(format!("{key}{PARTIAL}{}", nonce()));
        let made = async {
            let (_, timings) = self.take(rec, SnapshotKind::Memory, &partial).await?;
            let (vmstate_sha256, sizes) = seal(&partial).await?;
            let info = TemplateInfo {
                id: nonce(),
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
                vmstate_sha256,
                sizes,
            };
            let text =
                serde_json::to_vec_pretty(&info).map_err(|e| Error::internal(e.to_string()))?;
            let path = partial.join(INFO);
            std::fs::write(&path, text).map_err(|e| Error::io("writing", &path, e))?;
            storage::sync_file(&path)?;
            storage::sync_dir(&partial)?;
            let dir = root.join(key);
            let renamed = {
                let _one = self.template_lock();
                std::fs::rename(&partial, &dir)
            };
            match renamed {
                Ok(()) => storage::sync_dir(&root)?,
                // Another create of the same kind was first: its template stays.
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTEMPTY | libc::EEXIST)) => {
                    storage::remove_tree(&partial).await?;
                    return Ok(());
                }
                Err(e) => return Err(Error::io("renaming", &partial, e)),
            }
            tracing::info!(machine = %rec.id, template = %key, ?timings, "template made");
            self.remove_older_templates(key, &info).await;
            self.remove_least_used_templates().await;
            Ok::<_, Error>(())
        }
        .await;
        if let Err(e) = made {
            tracing::warn!(machine = %rec.id, "making a template: {}", e.message);
            if let Err(e) = storage::remove_tree(&partial).await {
                tracing::warn!("{}", e.message);
            }
        }
        match self.store.get_machine(&rec.id)? {
            Some(now) if now.phase == hearth_api::Phase::Failed => {
                Err(Error::unavailable(format!(
                    "machine {}: {}",
                    rec.id,
                    now.error
                        .unwrap_or_else(|| "failed while its template was taken".into())
                )))
            }
            _ => Ok(()),
        }
    }

    /// Removes the templates made before of the same image URLs for machines like `new`
    /// (VMM, size, network): their images or VMM changed since, and no key finds them again.
    async fn remove_older_templates(&self, key: &str, new: &TemplateInfo) {
        for (dir, old) in self.templates() {
            let same_kind = old.artifact == new.artifact
                && old.vmm == new.vmm
                && old.memory_mib == new.memory_mib
                && old.vcpus == new.vcpus
                && old.storage_bytes == new.storage_bytes
                && old.network == new.network;
            if dir.file_name().is_some_and(|n| n != key) && same_kind {
                tracing::info!(template = %dir.display(), "removing a template of an image that changed");
                self.remove_template(&dir, &old.id).await;
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
            .filter_map(|e| Some((e.path(), read_info(&e.path())?)))
            .collect()
    }

    /// At start: removes templates left half-written or half-removed by a crash, templates of
    /// a VMM version this daemon does not run (no key can find them again), and every
    /// template when templates are off.
    pub(super) async fn sweep_templates(&self) {
        let Ok(entries) = std::fs::read_dir(self.templates_dir()) else {
            return;
        };
        for entry in entries.flatten() {
            let dir = entry.path();
            let stale = !self.cfg.templates
                || match read_info(&dir) {
                    None => true,
                    Some(info) => self
                        .vmm(info.vmm)
                        .map(|v| v.version() != info.vmm_version)
                        .unwrap_or(true),
                };
            if stale {
                tracing::info!(template = %dir.display(), "removing a stale template");
                if let Err(e) = storage::remove_tree(&dir).await {
                    tracing::warn!("{}", e.message);
                }
            }
        }
        self.remove_least_used_templates().await;
    }

    /// Removes the least recently used templates past `--max-templates`.
    async fn remove_least_used_templates(&self) {
        let mut all: Vec<_> = self
            .templates()
            .into_iter()
            .map(|(dir, info)| (last_used(&dir), dir, info))
            .collect();
        // Newest first.
        all.sort_by_key(|t| std::cmp::Reverse(t.0));
        for (_, dir, info) in all.into_iter().skip(self.cfg.max_templates as usize) {
            tracing::info!(template = %dir.display(), max = self.cfg.max_templates, "removing the least recently used template");
            self.remove_template(&dir, &info.id).await;
        }
    }

    /// For `POST /gc`: removes the templates of the kernels and initrds in `removed` (blobs
    /// the collection removed: no machine or snapshot runs them); returns how many, and the
    /// bytes their files held. A root filesystem's blob says nothing: machines run on clones
    /// of it, which the blob store does not count as uses.
    pub(super) async fn remove_templates_of_removed_images(
        &self,
        removed: &[String],
    ) -> (u64, u64) {
        let (mut count, mut freed) = (0, 0);
        for (dir, info) in self.templates() {
            let gone = removed
                .iter()
                .any(|sha| *sha == info.kernel_sha256 || Some(sha) == info.initrd_sha256.as_ref());
            if gone {
                let bytes = allocated_bytes(&dir);
                if self.remove_template(&dir, &info.id).await {
                    count += 1;
                    freed += bytes;
                }
            }
        }
        (count, freed)
    }
}

/// When the template in `dir` was last found by a create (or made).
fn last_used(dir: &Path) -> SystemTime {
    std::fs::metadata(dir.join(INFO))
        .and_then(|m| m.modified())
        .unwrap_or(UNIX_EPOCH)
}

fn touch(dir: &Path) -> std::io::Result<()> {
    std::fs::File::options()
        .write(true)
        .open(dir.join(INFO))?
        .set_modified(SystemTime::now())
}

/// Bytes a template's files hold on disk (they are sparse).
fn allocated_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.blocks() * 512)
                .sum()
        })
        .unwrap_or(0)
}

fn read_info(dir: &Path) -> Option<TemplateInfo> {
    let text = std::fs::read(dir.join(INFO)).ok()?;
    serde_json::from_slice(&text).ok()
}

/// Flushes a template's files and directory to disk (it outlives power losses, and a restore
/// trusts it), and returns the device state's sha256 and every file's size.
async fn seal(dir: &Path) -> Result<(String, Vec<(String, u64)>)> {
    let dir = dir.to_path_buf();
    storage::blocking(move || {
        let mut sizes = Vec::new();
        for name in [VMSTATE, MEMORY, SYSTEM_DISK] {
            let path = dir.join(name);
            storage::sync_file(&path)?;
            let len = std::fs::metadata(&path)
                .map_err(|e| Error::io("reading", &path, e))?
                .len();
            sizes.push((name.to_string(), len));
        }
        storage::sync_dir(&dir)?;
        let (_, sha) = storage::sha256_sparse(&dir.join(VMSTATE))?;
        Ok((sha, sizes))
    })
    .await?
}

/// The template's files are as it was made: sizes, and the device state byte for byte.
async fn check_files(dir: &Path, info: &TemplateInfo) -> Result<()> {
    let (dir, sizes, sha) = (
        dir.to_path_buf(),
        info.sizes.clone(),
        info.vmstate_sha256.clone(),
    );
    storage::blocking(move || {
        for (name, len) in &sizes {
            let path = dir.join(name);
            let found = std::fs::metadata(&path)
                .map_err(|e| Error::io("reading", &path, e))?
                .len();
            if found != *len {
                return Err(Error::internal(format!(
                    "{}: {found} bytes, made with {len}",
                    path.display()
                )));
            }
        }
        let (_, found) = storage::sha256_sparse(&dir.join(VMSTATE))?;
        if found != sha {
            return Err(Error::internal(format!(
                "{}: sha256 {found}, made with {sha}",
                dir.join(VMSTATE).display()
            )));
        }
        Ok(())
    })
    .await?
}
