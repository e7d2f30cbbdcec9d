//! Memory snapshots, restore and fork on one host, with real machines.

mod common;

use common::*;
use hearth_api::{ArtifactKind, ErrorCode, Phase, SnapshotKind};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[tokio::test(flavor = "multi_thread")]
async fn restore_continues_and_forks_are_independent() {
    let d = Daemon::start().await;
    let c = &d.client;
    c.create_machine(&create_req("src")).await.unwrap();
    start_counter(c, "src").await;
    sh(c, "src", "echo memory-only > /tmp/note").await;
    assert!(counter_passes(c, "src", 0).await, "the counter never ran");
    let before = read_counter(c, "src").await;

    let resp = c
        .create_snapshot("src", "s1", SnapshotKind::Memory)
        .await
        .unwrap();
    let snap = &resp.snapshot;
    assert_eq!(
        (snap.machine_id.as_str(), snap.kind, snap.memory_mib),
        ("src", SnapshotKind::Memory, 256)
    );
    let kinds: Vec<ArtifactKind> = snap.artifacts.iter().map(|a| a.kind).collect();
    assert_eq!(
        kinds,
        [
            ArtifactKind::Vmstate,
            ArtifactKind::Memory,
            ArtifactKind::Disk,
            ArtifactKind::Manifest
        ]
    );
    let dir = d.path().join("snapshots/s1");
    // Usable at once: the small files are hashed (local restores check them), memory and
    // disk only when an upload needs their digests.
    for a in &snap.artifacts {
        let meta = std::fs::metadata(dir.join(&a.name)).unwrap();
        assert_eq!(meta.len(), a.size_bytes, "{}", a.name);
        let small = matches!(a.kind, ArtifactKind::Vmstate | ArtifactKind::Manifest);
        assert_eq!(
            a.sha256_hex.as_ref().map(String::len),
            small.then_some(64),
            "{}",
            a.name
        );
    }
    let vmstate = snap
        .artifacts
        .iter()
        .find(|a| a.kind == ArtifactKind::Vmstate)
        .unwrap();
    assert!(
        vmstate.size_bytes < 1 << 20,
        "device state holds RAM: {} bytes",
        vmstate.size_bytes
    );
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["memory_mib"], 256);
    assert_eq!(manifest["vmm"]["kind"], "qemu");
    assert!(
        manifest["vmm"]["version"]
            .as_str()
            .unwrap()
            .contains("QEMU"),
        "{manifest}"
    );
    assert_eq!(manifest["guest_kernel"], kernel_release());
    assert!(manifest["host"]["cpu_flags"]
        .as_array()
        .is_some_and(|f| !f.is_empty()));
    assert_eq!(c.list_snapshots(Some("src")).await.unwrap().len(), 1);
    assert_eq!(c.get_snapshot("s1").await.unwrap(), *snap);

    // The same snapshot id again is a conflict and leaves the first untouched.
    let err = c
        .create_snapshot("src", "s1", SnapshotKind::Memory)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Conflict), "{err}");
    assert_eq!(c.get_snapshot("s1").await.unwrap(), *snap);
    assert!(dir.join("vmstate").exists());

    // The source keeps running after its snapshot.
    let after = read_counter(c, "src").await;
    assert!(
        counter_passes(c, "src", after).await,
        "the source stopped at {after}"
    );

    // 5 s later, a fork: it continues from the snapshot's instant, with its own identity.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let m = c.restore("s1", &restore_req("s1", "clone")).await.unwrap();
    assert_eq!(m.phase, Phase::Running);
    assert_eq!(m.restored_from.as_deref(), Some("s1"));
    let host_now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let guest_now: f64 = sh(c, "clone", "date +%s")
        .await
        .stdout
        .trim()
        .parse()
        .unwrap();
    assert!(
        (guest_now - host_now).abs() <= 2.0,
        "clock off by {}",
        guest_now - host_now
    );
    let at_restore = read_counter(c, "clone").await;
    assert!(
        at_restore >= before,
        "counter went back: {at_restore} < {before}"
    );
    assert!(
        at_restore < before + 40,
        "counter did not start at the snapshot: {at_restore}"
    );
    assert!(
        counter_passes(c, "clone", at_restore).await,
        "the counter process is not running"
    );
    assert_eq!(
        sh(c, "clone", "cat /tmp/note").await.stdout,
        "memory-only\n"
    );

    let ident = |id: &'static str| async move {
        let r = sh(c, id, "hostname; cat /etc/machine-id").await;
        r.stdout
    };
    let (src_id, clone_id) = (ident("src").await, ident("clone").await);
    assert_ne!(src_id, clone_id);
    assert!(clone_id.starts_with("clone\n"), "{clone_id}");

    // Writes in one are absent in the other, on disk and in memory.
    sh(
        c,
        "clone",
        "echo c > /root/only-clone; echo c > /tmp/only-clone; sync",
    )
    .await;
    sh(c, "src", "echo s > /root/only-src; sync").await;
    assert_eq!(
        sh(
            c,
            "src",
            "ls /root/only-clone /tmp/only-clone 2>&1 | grep -c 'No such'"
        )
        .await
        .stdout
        .trim(),
        "2"
    );
    assert_eq!(
        sh(c, "clone", "ls /root/only-src 2>&1 | grep -c 'No such'")
            .await
            .stdout
            .trim(),
        "1"
    );

    // Two clones of one snapshot draw different random bytes right after restore.
    c.restore("s1", &restore_req("s1", "clone2")).await.unwrap();
    let rand_of = |id: &'static str| async move {
        sh(c, id, "head -c 16 /dev/urandom | od -An -tx1")
            .await
            .stdout
    };
    let (r1, r2) = (rand_of("clone2").await, rand_of("clone").await);
    assert_eq!(r1.split_whitespace().count(), 16);
    assert_ne!(r1, r2);

    // A restore into an existing machine id is a conflict.
    let err = c
        .restore("s1", &restore_req("s1", "clone"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Conflict), "{err}");

    // A tree: the clone's snapshot, its restore, that one's snapshot and restore. A restored
    // machine maps its snapshot's memory private; its own snapshot is a full memory file again
    // (the base's clone plus the pages it wrote) with a small device state, and no longer
    // needs the snapshot it came from.
    let r = sh(
        c,
        "clone",
        "dd if=/dev/urandom of=/tmp/big bs=1M count=24 2>/dev/null && sha256sum < /tmp/big",
    )
    .await;
    let written = r.stdout;
    assert_eq!(written.len(), 64 + 4, "{written:?} {}", r.stderr);
    let mark = read_counter(c, "clone").await;
    let s2 = c
        .create_snapshot("clone", "s2", SnapshotKind::Memory)
        .await
        .unwrap();
    assert_layered_snapshot(&s2.snapshot);
    c.delete_snapshot("s1").await.unwrap();
    c.restore("s2", &restore_req("s2", "grandchild"))
        .await
        .unwrap();
    let g = read_counter(c, "grandchild").await;
    assert!(g >= mark, "grandchild counter {g} < {mark}");
    assert!(
        counter_passes(c, "grandchild", g).await,
        "grandchild stalled"
    );
    assert_eq!(
        sh(c, "grandchild", "cat /root/only-clone /tmp/only-clone")
            .await
            .stdout,
        "c\nc\n"
    );
    // Reading what the clone wrote copies none of it: the pages stay the snapshot's, shared.
    assert_eq!(
        sh(c, "grandchild", "sha256sum < /tmp/big").await.stdout,
        written
    );
    let own = private_ram_mib(&d, "grandchild");
    assert!(own < 16, "the grandchild holds {own} MiB of RAM of its own");

    sh(c, "grandchild", "echo g > /tmp/only-grandchild").await;
    let s3 = c
        .create_snapshot("grandchild", "s3", SnapshotKind::Memory)
        .await
        .unwrap();
    assert_layered_snapshot(&s3.snapshot);
    c.restore("s3", &restore_req("s3", "great")).await.unwrap();
    assert_eq!(
        sh(
            c,
            "great",
            "cat /tmp/only-clone /tmp/only-grandchild; sha256sum < /tmp/big"
        )
        .await
        .stdout,
        format!("c\ng\n{written}")
    );
    let gg = read_counter(c, "great").await;
    assert!(counter_passes(c, "great", gg).await, "great stalled");
    // Its disk works after a restore from a device state written without RAM.
    let r = sh(
        c,
        "great",
        "echo disk > /root/great && sync && cat /root/great",
    )
    .await;
    assert_eq!(
        (r.exit_code, r.stdout.as_str()),
        (0, "disk\n"),
        "{}",
        r.stderr
    );

    for m in ["great", "grandchild", "clone2", "clone", "src"] {
        c.delete_machine(m).await.unwrap();
    }
    for s in ["s2", "s3"] {
        c.delete_snapshot(s).await.unwrap();
        assert!(!d.path().join("snapshots").join(s).exists());
    }
    let err = c.delete_snapshot("s1").await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound));
    assert!(d.vmm_pids().is_empty());
}

/// A snapshot of a restored machine: its RAM in a memory file, not in the device state.
fn assert_layered_snapshot(snap: &hearth_api::Snapshot) {
    let size = |kind| {
        snap.artifacts
            .iter()
            .find(|a| a.kind == kind)
            .map(|a| a.size_bytes)
    };
    assert_eq!(size(ArtifactKind::Memory), Some(256 << 20), "{snap:?}");
    let vmstate = size(ArtifactKind::Vmstate).unwrap();
    assert!(vmstate < 1 << 20, "device state holds RAM: {vmstate} bytes");
}

/// MiB of the machine's guest RAM that its VMM holds privately (the pages it wrote since its
/// restore); the rest reads from the snapshot's memory file, shared.
fn private_ram_mib(d: &Daemon, id: &str) -> u64 {
    let ram = d.path().join("machines").join(id).join("state/memory");
    let (pid, _) = processes_mentioning(&d.path().join("machines").join(id))
        .into_iter()
        .next()
        .expect("the machine's VMM");
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let mut in_ram = false;
    let mut kib = None;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            in_ram = line.ends_with(&*ram.to_string_lossy());
        } else if in_ram && first == "Anonymous:" {
            let n: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
            kib = Some(kib.unwrap_or(0) + n);
        }
    }
    kib.unwrap_or_else(|| panic!("{} is not mapped by {pid}", ram.display())) >> 10
}

#[tokio::test(flavor = "multi_thread")]
async fn five_clones_share_one_snapshot() {
    let d = Daemon::start().await;
    let c = &d.client;
    c.create_machine(&create_req("base")).await.unwrap();
    start_counter(c, "base").await;
    let resp = c
        .create_snapshot("base", "gold", SnapshotKind::Memory)
        .await
        .unwrap();
    c.delete_machine("base").await.unwrap();
    assert!(resp
        .snapshot
        .artifacts
        .iter()
        .any(|a| a.kind == ArtifactKind::Memory));
    let memory_path = d.path().join("snapshots/gold/memory");
    let (_, before) = hearthd::storage::sha256_sparse(&memory_path).unwrap();

    let ids: Vec<String> = (1..=5).map(|i| format!("clone{i}")).collect();
    for id in &ids {
        c.restore("gold", &restore_req("gold", id)).await.unwrap();
    }
    for id in &ids {
        assert_eq!(c.get_machine(id).await.unwrap().phase, Phase::Running);
        sh(
            c,
            id,
            &format!("echo {id} > /tmp/who; head -c 4000000 /dev/urandom > /tmp/noise"),
        )
        .await;
    }
    for id in &ids {
        assert_eq!(sh(c, id, "cat /tmp/who").await.stdout.trim(), id);
        assert!(read_counter(c, id).await > 0);
    }
    assert_eq!(d.vmm_pids().len(), 5);
    // Writes went to each clone's private copy, never to the snapshot.
    let (_, sha) = hearthd::storage::sha256_sparse(&memory_path).unwrap();
    assert_eq!(sha, before);

    // Deleting the snapshot leaves the clones running from the pages they map.
    c.delete_snapshot("gold").await.unwrap();
    assert!(!memory_path.exists());
    for id in &ids {
        let before = read_counter(c, id).await;
        assert!(counter_passes(c, id, before).await, "{id} stalled");
        c.delete_machine(id).await.unwrap();
    }
    assert!(d.vmm_pids().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn disk_snapshots_and_bad_input() {
    let d = Daemon::start().await;
    let c = &d.client;

    let err = c
        .create_snapshot("nope", "s", SnapshotKind::Memory)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound));
    let err = c
        .create_snapshot("nope", "Bad/Id", SnapshotKind::Memory)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Invalid));
    let err = c
        .restore("nope", &restore_req("nope", "x"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound));

    // A disk no larger than the image: the durable restores below download it.
    let mut req = create_req("src");
    req.storage_bytes = Some(128 << 20);
    c.create_machine(&req).await.unwrap();
    sh(
        c,
        "src",
        "echo on-disk > /root/kept; echo in-memory > /tmp/lost",
    )
    .await;
    let resp = c
        .create_snapshot("src", "disk1", SnapshotKind::Disk)
        .await
        .unwrap();
    let kinds: Vec<ArtifactKind> = resp.artifacts.iter().map(|a| a.kind).collect();
    assert_eq!(kinds, [ArtifactKind::Disk, ArtifactKind::Manifest]);
    // The source's filesystem was thawed: it still takes writes.
    assert_eq!(
        sh(c, "src", "echo after > /root/after && cat /root/after")
            .await
            .stdout,
        "after\n"
    );

    // A disk-only snapshot cold-boots with the source's files (and not its memory).
    c.restore("disk1", &restore_req("disk1", "cold"))
        .await
        .unwrap();
    assert_eq!(sh(c, "cold", "cat /root/kept").await.stdout, "on-disk\n");
    assert_eq!(
        sh(c, "cold", "cat /tmp/lost 2>/dev/null || echo gone")
            .await
            .stdout,
        "gone\n"
    );
    assert_eq!(sh(c, "cold", "hostname").await.stdout.trim(), "cold");
    c.delete_machine("cold").await.unwrap();

    // Memory snapshot checks: a different memory size, a mismatched local id, both sources.
    c.create_snapshot("src", "mem1", SnapshotKind::Memory)
        .await
        .unwrap();
    let mut req = restore_req("mem1", "x");
    req.memory_mib = Some(512);
    assert_eq!(
        c.restore("mem1", &req).await.unwrap_err().code(),
        Some(ErrorCode::Invalid)
    );
    let req = restore_req("disk1", "x");
    assert_eq!(
        c.restore("mem1", &req).await.unwrap_err().code(),
        Some(ErrorCode::Invalid)
    );
    let mut req = restore_req("mem1", "x");
    req.local_snapshot = None;
    assert_eq!(
        c.restore("mem1", &req).await.unwrap_err().code(),
        Some(ErrorCode::Invalid)
    );
    d.assert_nothing_left("x").await;

    // A memory restore cannot grow the disk under the running kernel it resumes.
    let mut req = restore_req("mem1", "bigger");
    req.storage_bytes = Some(256 << 20);
    let err = c.restore("mem1", &req).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Invalid), "{err}");
    assert!(
        err.to_string()
            .contains("larger than the memory snapshot's disk"),
        "{err}"
    );
    d.assert_nothing_left("bigger").await;

    // A corrupted, then a truncated device state: 422, and no machine is left.
    let vmstate = d.path().join("snapshots/mem1/vmstate");
    let good = std::fs::read(&vmstate).unwrap();
    let mut bad = good.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0xff;
    std::fs::write(&vmstate, &bad).unwrap();
    let err = c
        .restore("mem1", &restore_req("mem1", "corrupt"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Integrity), "{err}");
    d.assert_nothing_left("corrupt").await;
    std::fs::write(&vmstate, &good[..good.len() / 3]).unwrap();
    let err = c
        .restore("mem1", &restore_req("mem1", "truncated"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Integrity), "{err}");
    d.assert_nothing_left("truncated").await;
    std::fs::write(&vmstate, &good).unwrap();

    // Asked to run a QEMU snapshot on another VMM (here one not even enabled): 422 naming it.
    let mut other_vmm = restore_req("mem1", "other-vmm");
    other_vmm.vmm = Some(hearth_api::VmmKind::Firecracker);
    let err = c.restore("mem1", &other_vmm).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Integrity), "{err}");
    assert!(err.to_string().contains("firecracker"), "{err}");
    d.assert_nothing_left("other-vmm").await;

    // Durable restores of mem1 from a store on loopback, each with one artifact replaced (and
    // given its true sha256, so hearth's own check passes). A manifest from another QEMU, or
    // from a host with a CPU flag this one lacks: 422 naming it, before anything is fetched
    // or spawned.
    // A durable restore needs every digest: computed on asking, and kept.
    let mem1 = c.get_snapshot("mem1").await.unwrap();
    assert!(mem1.artifacts.iter().any(|a| a.sha256_hex.is_none()));
    let mem1 = c.get_snapshot_hashed("mem1").await.unwrap();
    assert!(mem1.artifacts.iter().all(|a| a.sha256_hex.is_some()));
    assert_eq!(c.get_snapshot("mem1").await.unwrap(), mem1);
    for a in &mem1.artifacts {
        let path = d.path().join("snapshots/mem1").join(&a.name);
        let (_, sha) = hearthd::storage::sha256_sparse(&path).unwrap();
        assert_eq!(Some(sha), a.sha256_hex, "{}", a.name);
    }
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(d.path().join("snapshots/mem1/manifest.json")).unwrap(),
    )
    .unwrap();
    let mut other_qemu = manifest.clone();
    other_qemu["vmm"]["version"] = "QEMU emulator version 0.15.1".into();
    let mut other_cpu = manifest.clone();
    other_cpu["host"]["cpu_flags"]
        .as_array_mut()
        .unwrap()
        .push("hearth-test-flag".into());
    for (id, replaced, named) in [
        ("other-qemu", other_qemu, "QEMU emulator version 0.15.1"),
        ("other-cpu", other_cpu, "lacks hearth-test-flag"),
    ] {
        let bytes = serde_json::to_vec(&replaced).unwrap();
        let req = durable_restore(&d, &mem1, id, ("manifest", bytes)).await;
        let err = c.restore("mem1", &req).await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::Integrity), "{err}");
        assert!(err.to_string().contains(named), "{err}");
        d.assert_nothing_left(id).await;
    }
    assert_eq!(d.vmm_pids().len(), 1, "a VMM was spawned");

    // A device state whose sha256 is right but which QEMU itself refuses (not a migration
    // stream): 422 with QEMU's reason, and nothing left.
    let mut not_a_stream = good.clone();
    not_a_stream[..4].copy_from_slice(b"XXXX");
    let req = durable_restore(&d, &mem1, "refused", ("vmstate", not_a_stream)).await;
    let err = c.restore("mem1", &req).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Integrity), "{err}");
    assert!(err.to_string().contains("Not a migration stream"), "{err}");
    d.assert_nothing_left("refused").await;
    assert_eq!(d.vmm_pids().len(), 1, "the refused VMM is still running");

    // Only a running machine can be snapshotted.
    c.stop_machine("src").await.unwrap();
    let err = c
        .create_snapshot("src", "s3", SnapshotKind::Memory)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Conflict), "{err}");
    assert!(!d.path().join("snapshots/s3").exists());
    c.delete_machine("src").await.unwrap();
    assert!(d.vmm_pids().is_empty());
}

/// A durable restore of this daemon's snapshot `snap` as machine `id`, from object-store URLs
/// on loopback: every artifact is the daemon's own (`GET /snapshots/{id}/artifacts/{aid}`,
/// through a TCP relay to its socket) except `replaced`, served whole with its own sha256 and
/// size from a server of its own (so no pooled connection mixes the two).
async fn durable_restore(
    d: &Daemon,
    snap: &hearth_api::Snapshot,
    id: &str,
    replaced: (&str, Vec<u8>),
) -> hearth_api::RestoreRequest {
    use sha2::{Digest, Sha256};
    let relay = relay_to(d.client.socket().to_path_buf()).await;
    let (replaced_id, bytes) = replaced;
    let sha = hex::encode(Sha256::digest(&bytes));
    let size = bytes.len() as u64;
    let body = bytes::Bytes::from(bytes);
    let app = axum::Router::new().route(
        "/replaced",
        axum::routing::get(move || {
            let body = body.clone();
            async move { body }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let fixed = format!("http://{}/replaced", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let artifacts = snap
        .artifacts
        .iter()
        .map(|a| {
            let mut a = a.clone();
            if a.id == replaced_id {
                a.sha256_hex = Some(sha.clone());
                a.size_bytes = size;
                a.download_url = Some(fixed.clone());
            } else {
                a.download_url = Some(format!("{relay}/snapshots/{}/artifacts/{}", snap.id, a.id));
            }
            a
        })
        .collect();
    let mut req = restore_req(&snap.id, id);
    req.local_snapshot = None;
    req.snapshot = Some(hearth_api::DurableSnapshotRef {
        snapshot_id: snap.id.clone(),
        machine_id: snap.machine_id.clone(),
        image_id: "default".into(),
        source_runtime_host: None,
        source_tap_device: None,
        artifacts,
    });
    req
}

/// A loopback TCP address whose connections are passed through to the Unix socket `socket`.
async fn relay_to(socket: std::path::PathBuf) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let socket = socket.clone();
            tokio::spawn(async move {
                if let Ok(mut up) = tokio::net::UnixStream::connect(&socket).await {
                    let _ = tokio::io::copy_bidirectional(&mut conn, &mut up).await;
                }
            });
        }
    });
    endpoint
}
