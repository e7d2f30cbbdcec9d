//! Restore compatibility: a snapshot's manifest against what a restore would run, checked
//! before anything is spawned. A memory snapshot resumes a running guest, so the VMM must be the
//! very one that saved its device state, the CPU must have every feature the guest may already
//! use (one it lacks crashes the guest later, not now), and RAM, kernel and initrd must be the
//! snapshot's. A disk snapshot cold-boots: only the images its disk was set up with matter.

use super::snapshots::{first_manifest_version, SnapshotManifest, MANIFEST, MANIFEST_VERSION};
use super::Service;
use crate::error::{Error, Result};
use crate::host;
use crate::store::SnapshotRecord;
use hearth_api::{ErrorCode, SnapshotKind, VmmKind};
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// At most this many missing CPU flags are named; a manifest may list hundreds.
const FLAGS_NAMED: usize = 16;

/// One way a snapshot does not fit what a restore would run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Mismatch {
    #[error("VMM: the snapshot was taken with {snapshot}, and cannot run on {host}")]
    VmmKind { snapshot: VmmKind, host: VmmKind },
    #[error("VMM version: the snapshot was taken with {snapshot:?}, this host runs {host:?}")]
    VmmVersion { snapshot: String, host: String },
    #[error("CPU flags: this host lacks {}, which the snapshot's host had", named(.0))]
    CpuFlags(Vec<String>),
    #[error("RAM: the snapshot has {snapshot} MiB, the restore would run {restore} MiB")]
    Memory { snapshot: u32, restore: u32 },
    #[error("kernel: the snapshot's has sha256 {snapshot}, the restore would run {restore}")]
    Kernel { snapshot: String, restore: String },
    #[error(
        "initrd: the snapshot's is {}, the restore would run {}",
        or_none(.snapshot),
        or_none(.restore)
    )]
    Initrd {
        snapshot: Option<String>,
        restore: Option<String>,
    },
}

fn named(flags: &[String]) -> String {
    let mut text = flags
        .iter()
        .take(FLAGS_NAMED)
        .cloned()
        .collect::<Vec<_>>()
        .join(" ");
    if flags.len() > FLAGS_NAMED {
        text.push_str(&format!(" and {} more", flags.len() - FLAGS_NAMED));
    }
    text
}

fn or_none(sha: &Option<String>) -> String {
    sha.as_ref()
        .map(|s| format!("sha256 {s}"))
        .unwrap_or_else(|| "none".into())
}

/// What a restore would run: this host's VMM and CPU, and the new machine's RAM and images.
pub struct Target<'a> {
    pub vmm: VmmKind,
    pub vmm_version: &'a str,
    pub cpu_flags: &'a [String],
    pub memory_mib: u32,
    pub kernel_sha256: &'a str,
    pub initrd_sha256: Option<&'a str>,
}

/// Every way `m` does not fit `t`; none means the restore may go ahead.
pub fn mismatches(m: &SnapshotManifest, t: &Target) -> Vec<Mismatch> {
    let mut found = Vec::new();
    if m.kind == SnapshotKind::Memory {
        if m.vmm.kind != t.vmm {
            found.push(Mismatch::VmmKind {
                snapshot: m.vmm.kind,
                host: t.vmm,
            });
        } else if m.vmm.version != t.vmm_version {
            found.push(Mismatch::VmmVersion {
                snapshot: m.vmm.version.clone(),
                host: t.vmm_version.to_string(),
            });
        }
        let lacking: Vec<String> = m
            .host
            .cpu_flags
            .iter()
            .filter(|f| !t.cpu_flags.contains(f))
            .cloned()
            .collect();
        if !lacking.is_empty() {
            found.push(Mismatch::CpuFlags(lacking));
        }
        if m.memory_mib != t.memory_mib {
            found.push(Mismatch::Memory {
                snapshot: m.memory_mib,
                restore: t.memory_mib,
            });
        }
    }
    // A disk snapshot's root filesystem was set up for its kernel and initrd too.
    if m.images.kernel_sha256 != t.kernel_sha256 {
        found.push(Mismatch::Kernel {
            snapshot: m.images.kernel_sha256.clone(),
            restore: t.kernel_sha256.to_string(),
        });
    }
    if m.images.initrd_sha256.as_deref() != t.initrd_sha256 {
        found.push(Mismatch::Initrd {
            snapshot: m.images.initrd_sha256.clone(),
            restore: t.initrd_sha256.map(str::to_string),
        });
    }
    found
}

fn integrity(message: String) -> Error {
    Error {
        code: ErrorCode::Integrity,
        message,
    }
}

/// Parses snapshot `id`'s manifest; one in a format this hearthd does not know is refused (422)
/// before the rest of it is read, since a newer format may not parse as this one.
pub fn parse_manifest(id: &str, bytes: &[u8]) -> Result<SnapshotManifest> {
    #[derive(Deserialize)]
    struct Format {
        #[serde(default = "first_manifest_version")]
        format_version: u32,
    }
    let unreadable = |e: serde_json::Error| {
        Error::invalid(format!("the snapshot's manifest does not parse: {e}"))
    };
    let version = serde_json::from_slice::<Format>(bytes)
        .map_err(unreadable)?
        .format_version;
    if !(1..=MANIFEST_VERSION).contains(&version) {
        return Err(integrity(format!(
            "snapshot {id}: its manifest has format version {version}; this hearthd reads 1 to \
             {MANIFEST_VERSION}"
        )));
    }
    serde_json::from_slice(bytes).map_err(unreadable)
}

impl Service {
    /// Refuses (422, naming every mismatch) to restore the snapshot `m` describes on `vmm`
    /// (by default the snapshot's) with this RAM, kernel and initrd.
    pub(super) fn check_restorable(
        &self,
        m: &SnapshotManifest,
        vmm: Option<VmmKind>,
        memory_mib: u32,
        kernel_sha256: &str,
        initrd_sha256: Option<&str>,
    ) -> Result<()> {
        let kind = vmm.unwrap_or(m.vmm.kind);
        let version = match self.vmms.get(kind) {
            Ok(backend) => backend.version(),
            Err(e) => {
                return Err(integrity(format!(
                    "snapshot {} cannot be restored here: {e}",
                    m.snapshot_id
                )))
            }
        };
        let (_, cpu_flags) = host::cpu_model_and_flags();
        let target = Target {
            vmm: kind,
            vmm_version: &version,
            cpu_flags: &cpu_flags,
            memory_mib,
            kernel_sha256,
            initrd_sha256,
        };
        let found = mismatches(m, &target);
        if found.is_empty() {
            return Ok(());
        }
        let reasons: Vec<String> = found.iter().map(Mismatch::to_string).collect();
        Err(integrity(format!(
            "snapshot {} cannot be restored here: {}",
            m.snapshot_id,
            reasons.join("; ")
        )))
    }

    /// Reads a local snapshot's manifest (checked against its recorded sha256) and checks that
    /// the snapshot can be restored as its record says.
    pub(super) fn check_local_restorable(
        &self,
        snap: &SnapshotRecord,
        vmm: Option<VmmKind>,
    ) -> Result<()> {
        let recorded = snap
            .artifacts
            .iter()
            .find(|a| a.name == MANIFEST)
            .and_then(|a| a.sha256_hex.as_ref())
            .ok_or_else(|| integrity(format!("snapshot {} has no manifest", snap.id)))?;
        let path = self.snapshot_dir(&snap.id).join(MANIFEST);
        let bytes = std::fs::read(&path)
            .map_err(|e| integrity(format!("snapshot {} manifest: {e}", snap.id)))?;
        let sha = hex::encode(Sha256::digest(&bytes));
        if &sha != recorded {
            return Err(integrity(format!(
                "snapshot {} manifest: sha256 {sha} does not match the snapshot's",
                snap.id
            )));
        }
        let m = parse_manifest(&snap.id, &bytes)?;
        let from = &snap.source;
        self.check_restorable(
            &m,
            vmm,
            from.memory_mib,
            &from.kernel_sha256,
            from.initrd_sha256.as_deref(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::snapshots::{HostInfo, ImageDigests, VmmInfo};
    use crate::store::MachineSpec;
    use hearth_api::ArtifactRef;

    const QEMU: &str = "QEMU emulator version 7.2.19 (Debian 1:7.2+dfsg-7+deb12u16)";

    fn spec() -> MachineSpec {
        MachineSpec {
            artifact: ArtifactRef {
                kernel_image_url: "file:///k".into(),
                rootfs_url: "file:///r".into(),
                initrd_url: Some("file:///i".into()),
            },
            memory_mib: 256,
            vcpus: 1,
            storage_bytes: 1 << 30,
            hostname: "m".into(),
            machine_uuid: "u".into(),
            kernel_sha256: "k".repeat(64),
            initrd_sha256: Some("i".repeat(64)),
            rootfs_sha256: "r".repeat(64),
            vmm: VmmKind::Qemu,
            restored_from: None,
            network: Default::default(),
        }
    }

    fn manifest(kind: SnapshotKind) -> SnapshotManifest {
        let s = spec();
        SnapshotManifest {
            format_version: MANIFEST_VERSION,
            snapshot_id: "s".into(),
            machine_id: "m".into(),
            kind,
            created_at: chrono::Utc::now(),
            vmm: VmmInfo {
                kind: VmmKind::Qemu,
                version: QEMU.into(),
            },
            memory_mib: s.memory_mib,
            vcpus: s.vcpus,
            storage_bytes: s.storage_bytes,
            memory_in_vmstate: false,
            artifact: s.artifact,
            images: ImageDigests {
                kernel_sha256: s.kernel_sha256,
                initrd_sha256: s.initrd_sha256,
                rootfs_sha256: s.rootfs_sha256,
            },
            disks: Vec::new(),
            guest_kernel: Some("6.1.0-56-cloud-amd64".into()),
            host: HostInfo {
                cpu_model: "some CPU".into(),
                cpu_flags: flags(&["fpu", "sse2", "avx2"]),
            },
            network: Default::default(),
        }
    }

    fn flags(f: &[&str]) -> Vec<String> {
        f.iter().map(|s| s.to_string()).collect()
    }

    fn check(m: &SnapshotManifest, spec: &MachineSpec, host_flags: &[&str]) -> Vec<Mismatch> {
        let cpu_flags = flags(host_flags);
        mismatches(
            m,
            &Target {
                vmm: VmmKind::Qemu,
                vmm_version: QEMU,
                cpu_flags: &cpu_flags,
                memory_mib: spec.memory_mib,
                kernel_sha256: &spec.kernel_sha256,
                initrd_sha256: spec.initrd_sha256.as_deref(),
            },
        )
    }

    #[test]
    fn the_same_host_and_images_fit_and_extra_host_flags_do_no_harm() {
        let m = manifest(SnapshotKind::Memory);
        assert_eq!(check(&m, &spec(), &["fpu", "sse2", "avx2"]), []);
        assert_eq!(check(&m, &spec(), &["avx512f", "fpu", "avx2", "sse2"]), []);
    }

    #[test]
    fn every_memory_snapshot_mismatch_is_named() {
        let mut m = manifest(SnapshotKind::Memory);
        m.vmm.version = "QEMU emulator version 8.2.2".into();
        let mut s = spec();
        s.memory_mib = 512;
        s.kernel_sha256 = "x".repeat(64);
        s.initrd_sha256 = None;
        let found = check(&m, &s, &["fpu"]);
        assert_eq!(
            found,
            [
                Mismatch::VmmVersion {
                    snapshot: "QEMU emulator version 8.2.2".into(),
                    host: QEMU.into()
                },
                Mismatch::CpuFlags(flags(&["sse2", "avx2"])),
                Mismatch::Memory {
                    snapshot: 256,
                    restore: 512
                },
                Mismatch::Kernel {
                    snapshot: "k".repeat(64),
                    restore: "x".repeat(64)
                },
                Mismatch::Initrd {
                    snapshot: Some("i".repeat(64)),
                    restore: None
                },
            ]
        );
        let text: Vec<String> = found.iter().map(Mismatch::to_string).collect();
        assert!(
            text[0].contains("8.2.2") && text[0].contains("7.2.19"),
            "{text:?}"
        );
        assert_eq!(
            text[1],
            "CPU flags: this host lacks sse2 avx2, which the snapshot's host had"
        );
        assert!(text[4].ends_with("would run none"), "{text:?}");
    }

    #[test]
    fn another_vmm_is_named_rather_than_its_version() {
        let mut m = manifest(SnapshotKind::Memory);
        m.vmm = VmmInfo {
            kind: VmmKind::Firecracker,
            version: "Firecracker v1.7.0".into(),
        };
        assert_eq!(
            check(&m, &spec(), &["fpu", "sse2", "avx2"]),
            [Mismatch::VmmKind {
                snapshot: VmmKind::Firecracker,
                host: VmmKind::Qemu
            }]
        );
    }

    #[test]
    fn a_disk_snapshot_cold_boots_anywhere_but_keeps_its_images() {
        let mut m = manifest(SnapshotKind::Disk);
        m.vmm.version = "QEMU emulator version 8.2.2".into();
        m.host.cpu_flags = flags(&["avx512f"]);
        let mut s = spec();
        s.memory_mib = 1024;
        assert_eq!(check(&m, &s, &["fpu"]), []);
        s.kernel_sha256 = "x".repeat(64);
        assert!(matches!(
            check(&m, &s, &["fpu"])[..],
            [Mismatch::Kernel { .. }]
        ));
    }

    #[test]
    fn a_long_list_of_missing_flags_is_cut() {
        let lacking: Vec<String> = (0..40).map(|i| format!("f{i}")).collect();
        let text = Mismatch::CpuFlags(lacking).to_string();
        assert!(text.contains("f15 and 24 more"), "{text}");
        assert!(!text.contains("f16"), "{text}");
    }

    #[test]
    fn manifest_versions() {
        let m = manifest(SnapshotKind::Memory);
        let mut v = serde_json::to_value(&m).unwrap();
        // Written before the field existed: version 1, read as before.
        v.as_object_mut().unwrap().remove("format_version");
        let parsed = parse_manifest("s", v.to_string().as_bytes()).unwrap();
        assert_eq!(parsed.format_version, 1);
        assert_eq!(parsed.vmm.version, QEMU);

        // A newer format is refused, even when the rest would not parse as this one.
        let newer = serde_json::json!({ "format_version": MANIFEST_VERSION + 1, "vmm": 7 });
        let err = parse_manifest("s", newer.to_string().as_bytes()).unwrap_err();
        assert_eq!(err.code, ErrorCode::Integrity);
        let said = format!("format version {}", MANIFEST_VERSION + 1);
        assert!(err.message.contains(&said), "{}", err.message);
        v["format_version"] = 0.into();
        let err = parse_manifest("s", v.to_string().as_bytes()).unwrap_err();
        assert_eq!(err.code, ErrorCode::Integrity);

        let err = parse_manifest("s", b"{").unwrap_err();
        assert_eq!(err.code, ErrorCode::Invalid);
    }
}
