use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Where a machine's kernel, root filesystem and initrd come from: `http(s)://`, or `file://`
/// under one of the daemon's artifact directories.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ArtifactRef {
    pub kernel_image_url: String,
    pub rootfs_url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_url: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct GuestConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorized_keys: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trusted_user_ca_keys: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub login_webhook: Option<LoginWebhook>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LoginWebhook {
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bearer_token: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CreateMachineRequest {
    pub machine_id: String,
    pub artifact: ArtifactRef,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_volume_ids: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_config: Option<GuestConfig>,
    /// The machine's network (ext); by default it has one, with egress allowed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkRequest>,
    /// Ports to publish once it runs (ext).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<PublishPortRequest>>,
    /// The VMM that runs it (ext); by default the daemon's (`--vmm`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmm: Option<VmmKind>,
    /// Boot it, even where a template of its image could be restored (ext).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cold: Option<bool>,
}

/// Whether a guest may open connections out of its machine.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Egress {
    #[default]
    Allow,
    Deny,
}

/// `network` on create, restore and fork, and the body of `PATCH /machines/{id}/network`
/// (which takes the policy fields only).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct NetworkRequest {
    /// `false`: no network device at all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<Egress>,
    /// Destinations allowed even under `egress: deny` (IPv4 CIDRs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_cidrs: Option<Vec<String>>,
    /// Destinations refused even under `egress: allow`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deny_cidrs: Option<Vec<String>>,
}

/// A machine's network as it is.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MachineNetwork {
    /// The guest's address, the same in every machine.
    pub guest_ip: String,
    /// Where the host reaches the guest, and what the guest's traffic leaves as.
    pub host_ip: String,
    pub mac: String,
    pub namespace: String,
    pub egress: Egress,
    #[serde(default)]
    pub allow_cidrs: Vec<String>,
    #[serde(default)]
    pub deny_cidrs: Vec<String>,
}

/// `POST /machines/{id}/published-ports`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PublishPortRequest {
    pub published_port_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The guest's port. Wider than u16 so that a bad value gets a clear 400.
    pub port: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// The host's port; chosen from `--port-range` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_port: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PublishedPort {
    pub id: String,
    pub machine_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub port: u16,
    pub host_port: u16,
    pub protocol: String,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PortEnvelope {
    pub port: PublishedPort,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PortList {
    pub ports: Vec<PublishedPort>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Starting,
    Running,
    Stopped,
    Failed,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Running => "running",
            Phase::Stopped => "stopped",
            Phase::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Phase> {
        Some(match s {
            "starting" => Phase::Starting,
            "running" => Phase::Running,
            "stopped" => Phase::Stopped,
            "failed" => Phase::Failed,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum VmmKind {
    Qemu,
    Firecracker,
}

impl std::str::FromStr for VmmKind {
    type Err = String;

    fn from_str(s: &str) -> Result<VmmKind, String> {
        match s {
            "qemu" => Ok(VmmKind::Qemu),
            "firecracker" => Ok(VmmKind::Firecracker),
            _ => Err(format!("unknown VMM {s:?}: qemu or firecracker")),
        }
    }
}

impl std::fmt::Display for VmmKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VmmKind::Qemu => "qemu",
            VmmKind::Firecracker => "firecracker",
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MachinePort {
    pub name: String,
    pub port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_port: Option<u16>,
    pub protocol: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Machine {
    pub id: String,
    pub artifact: ArtifactRef,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_volume_id: Option<String>,
    #[serde(default)]
    pub user_volume_ids: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_host: Option<String>,
    #[serde(default)]
    pub ports: Vec<MachinePort>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_ssh_host_public_key: Option<String>,
    pub phase: Phase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    pub memory_mib: u32,
    pub vcpus: u32,
    /// Size of the system disk (ext).
    pub storage_bytes: u64,
    pub vmm: VmmKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored_from: Option<String>,
    /// Absent for a machine without a network (ext).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<MachineNetwork>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MachineEnvelope {
    pub machine: Machine,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MachineList {
    pub machines: Vec<Machine>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    pub command: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Bytes fed to the command's stdin (ext).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin_base64: Option<String>,
    /// Cap on captured stdout and on captured stderr, each (ext; default 1 MiB, at most 8 MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_output_bytes: Option<usize>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExecResponse {
    /// For a command killed by a signal (a timeout included), 128 + the signal number.
    pub exit_code: i32,
    pub stdout: String,
    pub stderr: String,
    pub duration_ms: u64,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    /// The command ran past `timeout_ms` and was killed with everything it started (ext).
    pub timed_out: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Health {
    pub ok: bool,
}

/// What `POST /gc` removed: blobs no machine or snapshot needs and no operation is using.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct GcResponse {
    pub removed_blobs: u64,
    /// Templates of the images whose blobs were removed.
    #[serde(default)]
    pub removed_templates: u64,
    /// Bytes the removed blobs and templates occupied on disk.
    pub freed_bytes: u64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotKind {
    /// Memory, device state and disks: restores into a running machine at the same instant.
    Memory,
    /// Disks only: restores by a cold boot.
    Disk,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ArtifactKind {
    Memory,
    Vmstate,
    Disk,
    Manifest,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SnapshotArtifact {
    pub id: String,
    pub kind: ArtifactKind,
    pub name: String,
    pub size_bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256_hex: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub download_url: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Snapshot {
    pub id: String,
    pub machine_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_runtime_host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_tap_device: Option<String>,
    pub created_at: DateTime<Utc>,
    pub kind: SnapshotKind,
    pub memory_mib: u32,
    /// The artifact reference of the source machine, for restores (ext).
    pub artifact: ArtifactRef,
    pub artifacts: Vec<SnapshotArtifact>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSnapshotRequest {
    pub snapshot_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<SnapshotKind>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateSnapshotResponse {
    pub snapshot: Snapshot,
    pub artifacts: Vec<SnapshotArtifact>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotEnvelope {
    pub snapshot: Snapshot,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotList {
    pub snapshots: Vec<Snapshot>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LocalSnapshotRef {
    pub snapshot_id: String,
}

/// A snapshot held in object storage, restored by downloading its artifacts.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DurableSnapshotRef {
    pub snapshot_id: String,
    pub machine_id: String,
    pub image_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_runtime_host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_tap_device: Option<String>,
    pub artifacts: Vec<SnapshotArtifact>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreRequest {
    pub machine_id: String,
    pub artifact: ArtifactRef,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_snapshot: Option<LocalSnapshotRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<DurableSnapshotRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_config: Option<GuestConfig>,
    /// The egress policy (ext); whether there is a network at all is the snapshot's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkRequest>,
    /// Ports to publish (ext): a restored machine starts with none otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<PublishPortRequest>>,
    /// The VMM to run it on (ext): the snapshot's by default; another VMM's snapshot is
    /// refused (422).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmm: Option<VmmKind>,
}

/// `POST /machines/{id}/fork`: a new machine that continues from the source's present instant,
/// with its own disks and identity. The source keeps running.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForkRequest {
    pub machine_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_config: Option<GuestConfig>,
    /// The egress policy; the source's when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkRequest>,
    /// Ports to publish: a fork starts with none otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<PublishPortRequest>>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct UploadPart {
    pub part_number: u32,
    pub offset_bytes: u64,
    pub size_bytes: u64,
    pub upload_url: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct UploadArtifact {
    pub artifact_id: String,
    pub object_key: String,
    pub upload_id: String,
    pub parts: Vec<UploadPart>,
}

/// The caller (a control plane) opened a multipart upload per artifact and presigned its
/// parts; hearthd PUTs them and returns their ETags for the caller to complete the uploads.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UploadRequest {
    pub artifacts: Vec<UploadArtifact>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CompletedPart {
    pub part_number: u32,
    pub etag: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UploadedArtifact {
    pub artifact_id: String,
    pub completed_parts: Vec<CompletedPart>,
    /// The artifact's digest, computed during the upload if it was not known yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256_hex: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UploadResponse {
    pub artifacts: Vec<UploadedArtifact>,
}
