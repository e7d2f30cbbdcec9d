//! Limits with clear answers, through a real daemon (none of these boots a machine): sizes past
//! what the host allows are 400, a full host 409, too many boots at once 429, a JSON body past
//! its limit 413; a durable restore's claimed sizes, and its manifest's, are checked before
//! anything is downloaded, and a server that sends without end does not grow the daemon's
//! memory.

mod common;

use common::*;
use futures_util::StreamExt;
use hearth_api::client::ClientError;
use hearth_api::{ArtifactKind, DurableSnapshotRef, ErrorCode, RestoreRequest, SnapshotArtifact};
use hyper::Method;
use sha2::{Digest, Sha256};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

async fn post(d: &Daemon, path: &str, body: Vec<u8>) -> (u16, serde_json::Value) {
    let r = d.client.raw(Method::POST, path, Some(body)).await.unwrap();
    (
        r.status.as_u16(),
        serde_json::from_slice(&r.body).unwrap_or_default(),
    )
}

/// Machine `id` has no record and no directory (while another operation may be under way).
async fn no_machine(d: &Daemon, id: &str) {
    let err = d.client.get_machine(id).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound), "{err}");
    assert!(!d.path().join("machines").join(id).exists());
}

/// The error's code and message.
fn refused(e: ClientError) -> (ErrorCode, String) {
    (e.code().expect("an API error"), e.to_string())
}

/// A loopback HTTP server that takes connections and never answers, until dropped.
struct Silent {
    url: String,
    task: tokio::task::JoinHandle<()>,
}

impl Silent {
    async fn start() -> Silent {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/artifact", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((conn, _)) = listener.accept().await {
                held.push(conn);
            }
        });
        Silent { url, task }
    }
}

impl Drop for Silent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A loopback server answering every GET with `n` bytes of a body without a length (it runs
/// until the connection closes), whatever was asked; counts the GETs.
async fn flood(n: usize) -> (String, Arc<AtomicUsize>) {
    let gets = Arc::new(AtomicUsize::new(0));
    let counter = gets.clone();
    let app = axum::Router::new().route(
        "/o",
        axum::routing::get(move || {
            counter.fetch_add(1, Ordering::SeqCst);
            async move {
                let blocks = futures_util::stream::iter(0..n / (1 << 20))
                    .map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![1u8; 1 << 20])));
                axum::body::Body::from_stream(blocks)
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/o", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, gets)
}

fn artifact(kind: ArtifactKind, name: &str, size: u64, url: &str, sha: &str) -> SnapshotArtifact {
    SnapshotArtifact {
        id: name.into(),
        kind,
        name: name.into(),
        size_bytes: size,
        sha256_hex: Some(sha.into()),
        object_key: None,
        download_url: Some(url.into()),
    }
}

/// A durable restore of snapshot `s` as machine `id` from these artifacts.
fn durable(id: &str, artifacts: Vec<SnapshotArtifact>) -> RestoreRequest {
    let mut req = restore_req("s", id);
    req.local_snapshot = None;
    req.snapshot = Some(DurableSnapshotRef {
        snapshot_id: "s".into(),
        machine_id: "src".into(),
        image_id: "default".into(),
        source_runtime_host: None,
        source_tap_device: None,
        artifacts,
    });
    req
}

/// A manifest as a snapshot of a 256 MiB machine with a 1 GiB disk would have.
fn manifest() -> Vec<u8> {
    serde_json::to_vec(&manifest_json()).unwrap()
}

fn manifest_json() -> serde_json::Value {
    serde_json::json!({
        "format_version": 1,
        "snapshot_id": "s",
        "machine_id": "src",
        "kind": "memory",
        "created_at": "2026-11-26T00:00:00Z",
        "vmm": {"kind": "qemu", "version": "QEMU emulator version 7.2.22"},
        "memory_mib": 256,
        "vcpus": 1,
        "storage_bytes": 1u64 << 30,
        "memory_in_vmstate": false,
        "artifact": artifact_ref(),
        "images": {"kernel_sha256": "k", "initrd_sha256": null, "rootfs_sha256": "r"},
        "disks": [{"name": "system.img", "role": "system"}],
        "guest_kernel": null,
        "host": {"cpu_model": "x", "cpu_flags": []},
    })
}

/// A manifest of a memory snapshot this host could restore from the test image: its kernel,
/// initrd and QEMU.
fn restorable_manifest() -> serde_json::Value {
    let sha = |name| {
        hex::encode(Sha256::digest(
            std::fs::read(image_dir().join(name)).unwrap(),
        ))
    };
    let qemu = std::process::Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .unwrap();
    let mut m = manifest_json();
    m["vmm"]["version"] = String::from_utf8_lossy(&qemu.stdout).lines().next().into();
    m["images"]["kernel_sha256"] = sha("vmlinux").into();
    m["images"]["initrd_sha256"] = sha("initrd.img").into();
    m
}

fn artifact_ref() -> serde_json::Value {
    serde_json::to_value(common::artifact()).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn sizes_past_the_limits_and_large_bodies_are_refused() {
    let d = Daemon::start_with(&[
        "--max-memory-mib",
        "512",
        "--max-vcpus",
        "2",
        "--max-storage-bytes",
        "2147483648",
    ])
    .await;
    let c = &d.client;
    for (memory, vcpus, storage, flag) in [
        (Some(1024), None, None, "--max-memory-mib"),
        (Some(32), None, None, "--max-memory-mib"),
        (None, Some(3), None, "--max-vcpus"),
        (None, Some(0), None, "--max-vcpus"),
        (None, None, Some(1u64 << 62), "--max-storage-bytes"),
        (
            None,
            None,
            Some(1_000_000_000_000_000),
            "--max-storage-bytes",
        ),
        (None, None, Some((2 << 30) + 1), "--max-storage-bytes"),
    ] {
        let mut req = create_req("m");
        (req.memory_mib, req.vcpus, req.storage_bytes) = (memory, vcpus, storage);
        let (code, msg) = refused(c.create_machine(&req).await.unwrap_err());
        assert_eq!(code, ErrorCode::Invalid, "{msg}");
        assert!(msg.contains(flag), "{msg}");
        d.assert_nothing_left("m").await;
    }

    // Under the JSON limit (and over axum's default 2 MiB): parsed, and refused for what it
    // says, quoting only the start of the 3 MiB value.
    let mut req = serde_json::to_value(create_req("m")).unwrap();
    req["guest_config"] = serde_json::json!({ "hostname": "h".repeat(3 << 20) });
    let (status, err) = post(&d, "/machines", serde_json::to_vec(&req).unwrap()).await;
    assert_eq!(
        (status, err["code"].as_str()),
        (400, Some("invalid")),
        "{err}"
    );
    assert!(err["error"].as_str().unwrap().len() < 1000, "{err}");
    // Past it: 413, naming the limit in force.
    let (status, err) = post(&d, "/machines", vec![b' '; (32 << 20) + 1]).await;
    assert_eq!(
        (status, err["code"].as_str()),
        (413, Some("too_large")),
        "{err}"
    );
    assert!(err["error"].as_str().unwrap().contains("33554432"), "{err}");
    d.assert_nothing_left("m").await;

    // Within the limits but past what the filesystem holds in one file: 400, not 500.
    let d = Daemon::start_with(&["--max-storage-bytes", "18446744073709551615"]).await;
    let mut req = create_req("huge");
    req.storage_bytes = Some(1_000_000_000_000_000);
    let (code, msg) = refused(d.client.create_machine(&req).await.unwrap_err());
    assert_eq!(code, ErrorCode::Invalid, "{msg}");
    assert!(msg.contains("allows in one file"), "{msg}");
    d.assert_nothing_left("huge").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_durable_restore_checks_claimed_sizes_before_downloading() {
    let d = Daemon::start().await;
    let c = &d.client;
    let (flood_url, gets) = flood(256 << 20).await;
    let zeros = "0".repeat(64);
    let manifest_of = |size| {
        artifact(
            ArtifactKind::Manifest,
            "manifest.json",
            size,
            &flood_url,
            &zeros,
        )
    };
    for (artifacts, says) in [
        (vec![manifest_of(0)], "at least 1"),
        (vec![manifest_of(1 << 62)], "larger than a manifest may be"),
        (
            vec![
                manifest_of(1000),
                artifact(ArtifactKind::Disk, "system.img", 0, &flood_url, &zeros),
            ],
            "at least 1",
        ),
    ] {
        let (code, msg) = refused(c.restore("s", &durable("r", artifacts)).await.unwrap_err());
        assert_eq!(code, ErrorCode::Invalid, "{msg}");
        assert!(msg.contains(says), "{msg}");
    }
    assert_eq!(gets.load(Ordering::SeqCst), 0, "something was downloaded");

    // A real manifest: every other size is checked against it before its download.
    let dir = tempfile::tempdir().unwrap();
    let text = manifest();
    std::fs::write(dir.path().join("manifest.json"), &text).unwrap();
    let files = FileServer::start(dir.path().to_path_buf()).await;
    let real = artifact(
        ArtifactKind::Manifest,
        "manifest.json",
        text.len() as u64,
        &format!("{}/manifest.json", files.endpoint),
        &hex::encode(Sha256::digest(&text)),
    );
    for (kind, name, size) in [
        (ArtifactKind::Disk, "system.img", 1u64 << 62),
        (ArtifactKind::Disk, "system.img", (1 << 30) - 1),
        (ArtifactKind::Memory, "memory", 1 << 40),
        (ArtifactKind::Vmstate, "vmstate", 1 << 40),
    ] {
        let bad = artifact(kind, name, size, &flood_url, &zeros);
        let (code, msg) = refused(
            c.restore("s", &durable("r", vec![real.clone(), bad]))
                .await
                .unwrap_err(),
        );
        assert_eq!(code, ErrorCode::Invalid, "{msg}");
        assert!(msg.contains("does not fit its manifest"), "{msg}");
    }
    assert_eq!(gets.load(Ordering::SeqCst), 0, "something was downloaded");
    d.assert_nothing_left("r").await;

    // A server that answers 256 MiB to a request for 1000 bytes: cut off at once, and the
    // daemon's memory never holds it.
    let (code, msg) = refused(
        c.restore("s", &durable("r", vec![manifest_of(1000)]))
            .await
            .unwrap_err(),
    );
    assert_eq!(code, ErrorCode::Upstream, "{msg}");
    assert!(msg.contains("more than the 1000 bytes asked for"), "{msg}");
    let status = std::fs::read_to_string(format!("/proc/{}/status", d.pid())).unwrap();
    let peak: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    eprintln!("daemon peak memory: {} MiB", peak >> 10);
    assert!(peak < 100 << 10, "the daemon's peak memory was {peak} kB");
    d.assert_nothing_left("r").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_durable_restore_holds_its_manifest_to_the_host_limits() {
    let d = Daemon::start_with(&[
        "--max-storage-bytes",
        "2147483648",
        "--max-memory-mib",
        "512",
    ])
    .await;
    let c = &d.client;
    let (flood_url, gets) = flood(256 << 20).await;
    let zeros = "0".repeat(64);
    let from_flood = |kind, name: &str, size| artifact(kind, name, size, &flood_url, &zeros);
    let dir = tempfile::tempdir().unwrap();
    let files = FileServer::start(dir.path().to_path_buf()).await;
    // A manifest served under `name`, as its artifact.
    let serve = |name: &str, m: &serde_json::Value| {
        let text = serde_json::to_vec(m).unwrap();
        std::fs::write(dir.path().join(name), &text).unwrap();
        artifact(
            ArtifactKind::Manifest,
            "manifest.json",
            text.len() as u64,
            &format!("{}/{name}", files.endpoint),
            &hex::encode(Sha256::digest(&text)),
        )
    };

    // Snapshots this host could restore but for their size: a disk snapshot of a 10 TiB disk
    // and a memory snapshot of 1 TiB of RAM (their artifacts claiming as much), each restored
    // as it is and with sizes in the limits: refused before any download, whatever the
    // request says.
    let huge_disk = 10u64 << 40;
    let mut m = restorable_manifest();
    m["kind"] = "disk".into();
    m["storage_bytes"] = huge_disk.into();
    let disk_10t = vec![
        serve("disk-10t.json", &m),
        from_flood(ArtifactKind::Disk, "system.img", huge_disk),
    ];
    let mut m = restorable_manifest();
    m["memory_mib"] = (1u32 << 20).into();
    let ram_1t = vec![
        serve("ram-1t.json", &m),
        from_flood(ArtifactKind::Disk, "system.img", 1 << 30),
        from_flood(ArtifactKind::Vmstate, "vmstate", 1000),
        from_flood(ArtifactKind::Memory, "memory", 1 << 40),
    ];
    for (artifacts, memory, storage, says) in [
        (&disk_10t, None, None, "--max-storage-bytes"),
        (&disk_10t, None, Some(1 << 30), "disks never shrink"),
        (&ram_1t, None, None, "--max-memory-mib"),
        (
            &ram_1t,
            Some(256),
            None,
            "differs from the memory snapshot's",
        ),
    ] {
        let mut req = durable("r", artifacts.clone());
        (req.memory_mib, req.storage_bytes) = (memory, storage);
        let (code, msg) = refused(c.restore("s", &req).await.unwrap_err());
        assert_eq!(code, ErrorCode::Invalid, "{msg}");
        assert!(msg.contains(says), "{msg}");
        assert_eq!(gets.load(Ordering::SeqCst), 0, "something was downloaded");
        d.assert_nothing_left("r").await;
    }

    // A disk snapshot restorable here whose disk is corrupt: the memory artifact listed with
    // it is never fetched (a disk snapshot boots from its disk alone).
    let disk_bytes = 64u64 << 20;
    std::fs::File::create(dir.path().join("system.img"))
        .unwrap()
        .set_len(disk_bytes)
        .unwrap();
    let mut m = restorable_manifest();
    m["kind"] = "disk".into();
    m["storage_bytes"] = disk_bytes.into();
    let artifacts = vec![
        serve("disk-snapshot.json", &m),
        artifact(
            ArtifactKind::Disk,
            "system.img",
            disk_bytes,
            &format!("{}/system.img", files.endpoint),
            &zeros,
        ),
        // A digest of its own: a fetch of the same blob would wait for the disk's.
        artifact(
            ArtifactKind::Memory,
            "memory",
            256 << 20,
            &flood_url,
            &"1".repeat(64),
        ),
    ];
    let (code, msg) = refused(c.restore("s", &durable("r", artifacts)).await.unwrap_err());
    assert_eq!(code, ErrorCode::Integrity, "{msg}");
    assert!(msg.contains("system.img"), "{msg}");
    assert_eq!(
        gets.load(Ordering::SeqCst),
        0,
        "the memory artifact was fetched"
    );
    d.assert_nothing_left("r").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn boots_at_once_and_machines_per_host_are_limited() {
    // One boot at a time: a create stuck fetching its kernel holds the only place.
    let d = Daemon::start_with(&["--max-concurrent-boots", "1"]).await;
    let silent = Silent::start().await;
    let mut stuck = create_req("stuck");
    stuck.artifact.kernel_image_url = silent.url.clone();
    let client = d.client.clone();
    let pending = tokio::spawn(async move { client.create_machine(&stuck).await });
    let started = eventually(Duration::from_secs(30), async || {
        d.client.get_machine("stuck").await.is_ok()
    })
    .await;
    assert!(started, "the create never started");
    let (code, msg) = refused(
        d.client
            .create_machine(&create_req("next"))
            .await
            .unwrap_err(),
    );
    assert_eq!(code, ErrorCode::Busy, "{msg}");
    assert!(msg.contains("--max-concurrent-boots 1"), "{msg}");
    let r = d
        .client
        .raw(
            Method::POST,
            "/snapshots/s/restore",
            Some(serde_json::to_vec(&restore_req("s", "next")).unwrap()),
        )
        .await
        .unwrap();
    assert_eq!(r.status.as_u16(), 429);
    let (code, _) = refused(d.client.start_machine("next").await.unwrap_err());
    assert_eq!(code, ErrorCode::Busy);
    no_machine(&d, "next").await;
    // The server hangs up: the stuck create fails, and its place is free again.
    drop(silent);
    let (code, msg) = refused(pending.await.unwrap().unwrap_err());
    assert_eq!(code, ErrorCode::Upstream, "{msg}");
    d.assert_nothing_left("stuck").await;
    let mut next = create_req("next");
    next.artifact.kernel_image_url = "http://127.0.0.1:9/vmlinux".into();
    let (code, msg) = refused(d.client.create_machine(&next).await.unwrap_err());
    assert_eq!(code, ErrorCode::Upstream, "{msg}");
    d.assert_nothing_left("next").await;

    // One machine per host: the stuck create's record takes the only place.
    let d = Daemon::start_with(&["--max-machines", "1"]).await;
    let silent = Silent::start().await;
    let mut stuck = create_req("stuck");
    stuck.artifact.kernel_image_url = silent.url.clone();
    let client = d.client.clone();
    let pending = tokio::spawn(async move { client.create_machine(&stuck).await });
    let started = eventually(Duration::from_secs(30), async || {
        d.client.get_machine("stuck").await.is_ok()
    })
    .await;
    assert!(started, "the create never started");
    let (code, msg) = refused(
        d.client
            .create_machine(&create_req("next"))
            .await
            .unwrap_err(),
    );
    assert_eq!(code, ErrorCode::Conflict, "{msg}");
    assert!(msg.contains("--max-machines 1"), "{msg}");
    let (code, msg) = refused(
        d.client
            .restore("s", &restore_req("s", "next"))
            .await
            .unwrap_err(),
    );
    assert_eq!(code, ErrorCode::Conflict, "{msg}");
    no_machine(&d, "next").await;
    drop(silent);
    assert!(pending.await.unwrap().is_err());
    d.assert_nothing_left("stuck").await;
    let mut next = create_req("next");
    next.artifact.kernel_image_url = "http://127.0.0.1:9/vmlinux".into();
    let (code, msg) = refused(d.client.create_machine(&next).await.unwrap_err());
    assert_eq!(code, ErrorCode::Upstream, "{msg}");
}
