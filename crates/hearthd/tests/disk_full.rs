//! A full disk under the data root: a create, a snapshot and a download each fail with 507
//! `insufficient_storage`, say so, and leave nothing behind; then `hearth gc` collects what
//! nothing needs. The data root is a small loop-mounted ext4 (the tests run as root).

mod common;

use common::*;
use hearth_api::{DurableSnapshotRef, ErrorCode, Phase, RestoreRequest, SnapshotKind};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn assert_disk_full(err: &hearth_api::client::ClientError) {
    assert_eq!(err.code(), Some(ErrorCode::InsufficientStorage), "{err}");
    assert!(err.to_string().contains("disk is full"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_is_507_and_leaves_nothing() {
    let fs = LoopFs::mount(256 << 20);
    let d = Daemon::start_in(&fs.path(), &[]).await;
    let blobs = d.path().join("images/blobs");
    let mut req = create_req("m");
    req.memory_mib = Some(128);
    req.storage_bytes = Some(256 << 20);

    // A create that cannot fit: 20 MiB free, less than the kernel alone.
    fs.fill(20 << 20);
    let err = d.client.create_machine(&req).await.unwrap_err();
    assert_disk_full(&err);
    d.assert_nothing_left("m").await;
    assert_eq!(entries(&blobs), Vec::<String>::new(), "blobs left");

    // A running machine, a disk snapshot of it taken while there is room (the download's
    // source below), then a disk too full for a memory snapshot: 507, no snapshot left, and
    // the machine runs on. The guest keeps a little room, so touching fresh RAM pages (backed
    // by a file on this filesystem) cannot fail.
    fs.unfill();
    d.client.create_machine(&req).await.unwrap();
    d.client
        .create_snapshot("m", "good", SnapshotKind::Disk)
        .await
        .unwrap();
    let ram = std::fs::metadata(d.path().join("machines/m/memory"))
        .unwrap()
        .blocks()
        * 512;
    fs.fill((ram / 2).min(16 << 20));
    let err = d
        .client
        .create_snapshot("m", "full", SnapshotKind::Memory)
        .await
        .unwrap_err();
    assert_disk_full(&err);
    let missing = d.client.get_snapshot("full").await.unwrap_err();
    assert_eq!(missing.code(), Some(ErrorCode::NotFound), "{missing}");
    assert_eq!(entries(&d.path().join("snapshots")), ["good"]);
    assert_eq!(
        d.client.get_machine("m").await.unwrap().phase,
        Phase::Running
    );
    assert_eq!(sh(&d.client, "m", "echo alive").await.stdout, "alive\n");

    // A download that cannot fit: the snapshot's disk (over 8 MiB of data), served over
    // loopback HTTP, into 2 MiB (ext4 keeps 2% of this filesystem, 4 MiB, from every write).
    // 507, no machine, no staged file, and the manifest it fetched first is dropped again.
    d.client.delete_machine("m").await.unwrap();
    let cached = entries(&blobs);
    let server = FileServer::start(d.path().join("snapshots/good")).await;
    // A durable restore needs every digest; they are computed on asking (reading only).
    let good = d.client.get_snapshot_hashed("good").await.unwrap();
    let mut artifacts = good.artifacts.clone();
    for a in &mut artifacts {
        a.download_url = Some(format!("{}/{}", server.endpoint, a.name));
    }
    let restore = RestoreRequest {
        machine_id: "pulled".into(),
        artifact: artifact(),
        memory_mib: None,
        storage_bytes: None,
        local_snapshot: None,
        snapshot: Some(DurableSnapshotRef {
            snapshot_id: "good".into(),
            machine_id: "m".into(),
            image_id: "default".into(),
            source_runtime_host: None,
            source_tap_device: None,
            artifacts,
        }),
        guest_config: None,
        network: None,
        ports: None,
        vmm: None,
    };
    fs.fill(6 << 20);
    let err = d.client.restore("good", &restore).await.unwrap_err();
    assert_disk_full(&err);
    assert!(err.to_string().contains("artifact system.img"), "{err}");
    d.assert_nothing_left("pulled").await;
    assert_eq!(entries(&blobs), cached, "the failed restore left blobs");

    // gc: the root filesystem's blob is cache; the kernel and initrd stay while the snapshot
    // that boots from them exists.
    fs.unfill();
    let gc = |d: &Daemon| {
        let (ok, out, err) = run_cli(d, &[], &["--json", "gc"]);
        assert!(ok, "hearth gc: {out}{err}");
        serde_json::from_str::<hearth_api::GcResponse>(&out).unwrap()
    };
    let first = gc(&d);
    assert_eq!(first.removed_blobs, 1, "{first:?}");
    assert!(first.freed_bytes > 0);
    assert_eq!(entries(&blobs).len(), 2);
    d.client.delete_snapshot("good").await.unwrap();
    assert_eq!(gc(&d).removed_blobs, 2);
    assert_eq!(entries(&blobs), Vec::<String>::new());
}
