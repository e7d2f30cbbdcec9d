//! Snapshots through object storage: hearthd A uploads through presigned multipart URLs, and
//! hearthd B (another data root) restores from the store, verified byte for byte.

mod common;

use common::*;
use hearth_api::{ErrorCode, Snapshot, SnapshotKind, UploadArtifact, UploadPart, UploadRequest};
use hyper::Method;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// One running machine and one snapshot, moved through every S3 server the tests can run
/// (rclone answers ranges with 200; s3s-fs; moto), with faults on the way up and down.
#[tokio::test(flavor = "multi_thread")]
async fn a_snapshot_travels_to_another_host() {
    let a = Daemon::start().await;
    // A small machine keeps the store's traffic small: 128 MiB of RAM, a 128 MiB disk.
    let mut req = create_req("src");
    req.memory_mib = Some(128);
    req.storage_bytes = Some(128 << 20);
    a.client.create_machine(&req).await.unwrap();
    start_counter(&a.client, "src").await;
    sh(&a.client, "src", "echo from-host-a > /tmp/note").await;
    assert!(
        eventually(Duration::from_secs(10), async || {
            sh(&a.client, "src", "test -s /tmp/counter").await.exit_code == 0
        })
        .await
    );
    let before = read_counter(&a.client, "src").await;
    let snap = a
        .client
        .create_snapshot("src", "travel", SnapshotKind::Memory)
        .await
        .unwrap()
        .snapshot;

    for s3 in [S3Server::start_rclone().await, S3Server::start_s3s().await] {
        let b = travel(&a, &snap, &s3, before).await;
        b.client.delete_machine("moved").await.unwrap();
        assert!(b.vmm_pids().is_empty());
    }

    let s3 = S3Server::start().await;
    let b = travel(&a, &snap, &s3, before).await;
    let dest = format!("s3://{}/fleet", s3.bucket);
    let env = s3.env(&s3.endpoint);

    // A client that hangs up during the download does not cut the restore short: it is the
    // daemon's operation, finished on its own.
    let h = Daemon::start().await;
    let mut pull = std::process::Command::new(hearth_cli())
        .arg("--socket")
        .arg(h.client.socket())
        .args(["pull", &format!("{dest}/travel"), "abandoned"])
        .envs(env.iter().cloned())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let staging = h.path().join("images/tmp");
    let downloading = eventually(Duration::from_secs(30), async || {
        std::fs::read_dir(&staging).unwrap().count() > 0
    })
    .await;
    assert!(downloading, "the download never started");
    pull.kill().unwrap();
    pull.wait().unwrap();
    let restored = eventually(Duration::from_secs(120), async || {
        h.client
            .get_machine("abandoned")
            .await
            .is_ok_and(|m| m.phase == hearth_api::Phase::Running)
    })
    .await;
    assert!(restored, "the restore stopped when its client hung up");
    h.client.delete_machine("abandoned").await.unwrap();
    assert!(h.vmm_pids().is_empty());

    // A corrupted object fails the restore with 422 and leaves no machine and no staged file
    // (on a host whose cache does not have the good copy).
    let c = Daemon::start().await;
    s3.boto(
        "k = 'fleet/travel/manifest.json'\n\
         n = len(s3.get_object(Bucket=bucket, Key=k)['Body'].read())\n\
         s3.put_object(Bucket=bucket, Key=k, Body=b'x' * n)",
    );
    let (ok, _, err) = run_cli(&c, &env, &["pull", &format!("{dest}/travel"), "broken"]);
    assert!(!ok);
    assert!(err.contains("Integrity") && err.contains("sha256"), "{err}");
    c.assert_nothing_left("broken").await;
    // The manifest is checked before anything else is fetched.
    assert_eq!(
        std::fs::read_dir(c.path().join("images/blobs"))
            .unwrap()
            .count(),
        0
    );

    // A second restore of the same artifacts downloads nothing: with the artifact objects gone
    // from the store, it still works from B's cache.
    s3.boto(
        "for o in s3.list_objects_v2(Bucket=bucket, Prefix='fleet/travel/')['Contents']:\n    \
         k = o['Key']\n    \
         s3.delete_object(Bucket=bucket, Key=k) if not k.endswith('hearth-snapshot.json') else None",
    );
    let (ok, out, err) = run_cli(&b, &env, &["pull", &format!("{dest}/travel"), "again"]);
    assert!(ok, "second pull failed: {out}{err}");
    assert!(read_counter(&b.client, "again").await >= before);
    assert_eq!(
        std::fs::read_dir(b.path().join("images/tmp"))
            .unwrap()
            .count(),
        0
    );

    for m in ["moved", "again"] {
        b.client.delete_machine(m).await.unwrap();
    }
    a.client.delete_machine("src").await.unwrap();
    assert!(a.vmm_pids().is_empty() && b.vmm_pids().is_empty());
}

/// Pushes `snap` (of machine "src" on `a`, whose counter read `before`) to `s3` and pulls it
/// into a new host as machine "moved", two 500s and two connection resets failing part uploads
/// on the way up and chunk downloads on the way down; returns the new host.
async fn travel(a: &Daemon, snap: &Snapshot, s3: &S3Server, before: u64) -> Daemon {
    let dest = format!("s3://{}/fleet", s3.bucket);
    let up = FaultProxy::start(&s3.endpoint, Faults::Puts, 2, 2).await;
    let (ok, out, err) = run_cli(a, &s3.env(&up.endpoint), &["push", "travel", &dest]);
    assert!(ok, "push failed: {out}{err}");
    assert_eq!(
        up.faults_served.load(Ordering::SeqCst),
        4,
        "faults not all hit"
    );

    // Every object equals its local artifact, whose digest the upload computed and recorded.
    let snap = a.client.get_snapshot(&snap.id).await.unwrap();
    for art in &snap.artifacts {
        let sha = s3.boto(&format!(
            "print(hashlib.sha256(s3.get_object(Bucket=bucket, Key='fleet/travel/{}')['Body'].read()).hexdigest())",
            art.name
        ));
        assert_eq!(Some(sha), art.sha256_hex, "{}", art.name);
    }

    // Host B restores it: the process running on A continues on B.
    let b = Daemon::start().await;
    let down = FaultProxy::start(&s3.endpoint, Faults::RangedGets, 2, 2).await;
    let source = format!("{dest}/travel");
    let (ok, out, err) = run_cli(&b, &s3.env(&down.endpoint), &["pull", &source, "moved"]);
    assert!(ok, "pull failed: {out}{err}");
    assert_eq!(
        down.faults_served.load(Ordering::SeqCst),
        4,
        "faults not all hit"
    );
    let on_b = read_counter(&b.client, "moved").await;
    assert!(on_b >= before, "counter {on_b} < {before}");
    assert!(
        eventually(Duration::from_secs(10), async || {
            read_counter(&b.client, "moved").await > on_b
        })
        .await,
        "the counter stopped at {on_b}"
    );
    assert_eq!(
        sh(&b.client, "moved", "cat /tmp/note").await.stdout,
        "from-host-a\n"
    );
    assert_eq!(
        sh(&b.client, "moved", "hostname").await.stdout.trim(),
        "moved"
    );
    // Its network came along: the host reaches a server in it at its new host-side address.
    let moved = b.client.get_machine("moved").await.unwrap();
    let host_ip = moved.runtime_host.expect("a network");
    sh(
        &b.client,
        "moved",
        "mkdir -p /www && echo moved > /www/index.html && httpd -p 80 -h /www",
    )
    .await;
    let page = http_get(&format!("http://{host_ip}/")).await;
    assert_eq!(page.as_deref().map(str::trim), Some("moved"));
    b
}

#[tokio::test(flavor = "multi_thread")]
async fn upload_errors_name_the_artifact_and_part() {
    let s3 = S3Server::start().await;
    let d = Daemon::start().await;
    let snap = disk_snapshot(&d).await;
    let manifest = snap.artifacts.iter().find(|a| a.id == "manifest").unwrap();
    let upload = |artifact_id: &str, url: String| UploadRequest {
        artifacts: vec![UploadArtifact {
            artifact_id: artifact_id.into(),
            object_key: "k".into(),
            upload_id: "u".into(),
            parts: vec![UploadPart {
                part_number: 1,
                offset_bytes: 0,
                size_bytes: manifest.size_bytes,
                upload_url: url,
            }],
        }],
    };
    // A tampered URL (an upload the store never opened): 502 naming the artifact and part.
    let url = format!(
        "{}/{}/k?partNumber=1&uploadId=forged",
        s3.endpoint, s3.bucket
    );
    let err = d
        .client
        .upload_snapshot("s", &upload("manifest", url.clone()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Upstream), "{err}");
    assert!(
        err.to_string().contains("artifact manifest part 1"),
        "{err}"
    );
    // An unknown artifact is 404; a part past the end of the file is 400.
    let err = d
        .client
        .upload_snapshot("s", &upload("nope", url.clone()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound), "{err}");
    let mut req = upload("manifest", url);
    req.artifacts[0].parts[0].size_bytes += 1;
    let err = d.client.upload_snapshot("s", &req).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Invalid), "{err}");

    // A snapshot with an upload under way cannot be deleted: the upload is never torn.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hanging = format!("http://{}/slow", listener.local_addr().unwrap());
    let client = d.client.clone();
    let req = upload("manifest", hanging);
    let pending = tokio::spawn(async move { client.upload_snapshot("s", &req).await });
    let (conn, _) = listener.accept().await.unwrap();
    let err = d.client.delete_snapshot("s").await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Conflict), "{err}");
    drop((conn, listener));
    let err = pending.await.unwrap().unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Upstream), "{err}");
    assert!(d.client.get_snapshot("s").await.is_ok());

    // A durable restore needs the manifest, and URLs and hashes for what it downloads.
    let mut durable = hearth_api::DurableSnapshotRef {
        snapshot_id: "s".into(),
        machine_id: "m".into(),
        image_id: "default".into(),
        source_runtime_host: None,
        source_tap_device: None,
        artifacts: snap
            .artifacts
            .iter()
            .filter(|a| a.id != "manifest")
            .cloned()
            .collect(),
    };
    let mut restore = restore_req("s", "durable");
    restore.local_snapshot = None;
    restore.snapshot = Some(durable.clone());
    let err = d.client.restore("s", &restore).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Invalid), "{err}");
    assert!(err.to_string().contains("manifest"), "{err}");
    durable.artifacts = snap.artifacts.clone();
    restore.snapshot = Some(durable);
    let err = d.client.restore("s", &restore).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Invalid), "{err}");
    assert!(err.to_string().contains("download_url"), "{err}");
    d.assert_nothing_left("durable").await;

    // Serving: whole artifacts and byte ranges.
    let path = format!("/snapshots/s/artifacts/{}", manifest.id);
    let whole = d.client.raw(Method::GET, &path, None).await.unwrap();
    assert_eq!(whole.status.as_u16(), 200);
    let local = std::fs::read(d.path().join("snapshots/s/manifest.json")).unwrap();
    assert_eq!(whole.body.as_ref(), local.as_slice());
    let (status, content_range, part) = ranged(&d, &path, "bytes=10-19").await;
    assert_eq!(status, 206);
    assert_eq!(content_range, Some(format!("bytes 10-19/{}", local.len())));
    assert_eq!(part, local[10..20]);
    // A range that starts past the end: 416, naming the size.
    let (status, content_range, _) = ranged(&d, &path, &format!("bytes={}-", local.len())).await;
    assert_eq!(status, 416);
    assert_eq!(content_range, Some(format!("bytes */{}", local.len())));
    let missing = d
        .client
        .raw(Method::GET, "/snapshots/s/artifacts/nope", None)
        .await
        .unwrap();
    assert_eq!(missing.status.as_u16(), 404);
    d.client.delete_machine("m").await.unwrap();
}

/// GETs `path` with a Range header: the status, the Content-Range and the body.
async fn ranged(d: &Daemon, path: &str, range: &str) -> (u16, Option<String>, Vec<u8>) {
    let stream = tokio::net::UnixStream::connect(d.client.socket())
        .await
        .unwrap();
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::get(format!("http://h{path}"))
        .header("host", "h")
        .header("range", range)
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let content_range = resp
        .headers()
        .get("content-range")
        .map(|v| v.to_str().unwrap().to_string());
    use http_body_util::BodyExt;
    let body = resp
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .to_vec();
    (status, content_range, body)
}

#[tokio::test(flavor = "multi_thread")]
async fn expired_and_tampered_urls_fail_naming_the_part() {
    // rclone checks SigV4 signatures and expiry, as a real object store does.
    let s3 = S3Server::start_rclone().await;
    let d = Daemon::start().await;
    let snap = disk_snapshot(&d).await;
    d.client.delete_machine("m").await.unwrap();
    let manifest = snap.artifacts.iter().find(|a| a.id == "manifest").unwrap();
    let presign = |expires: u32| {
        s3.boto(&format!(
            "u = s3.create_multipart_upload(Bucket=bucket, Key='s/manifest.json')['UploadId']\n\
             print(u)\n\
             print(s3.generate_presigned_url('upload_part', Params={{'Bucket': bucket, \
             'Key': 's/manifest.json', 'UploadId': u, 'PartNumber': 1}}, ExpiresIn={expires}))"
        ))
    };
    let request = |plan: String| {
        let (upload_id, url) = plan.split_once('\n').unwrap();
        UploadRequest {
            artifacts: vec![UploadArtifact {
                artifact_id: "manifest".into(),
                object_key: "s/manifest.json".into(),
                upload_id: upload_id.into(),
                parts: vec![UploadPart {
                    part_number: 1,
                    offset_bytes: 0,
                    size_bytes: manifest.size_bytes,
                    upload_url: url.trim().into(),
                }],
            }],
        }
    };

    // A good URL works against the signature-checking store.
    let done = d
        .client
        .upload_snapshot("s", &request(presign(600)))
        .await
        .unwrap();
    assert!(!done.artifacts[0].completed_parts[0].etag.is_empty());

    // A tampered signature and an expired URL fail at once (4xx is not retried), naming the part.
    let mut tampered = request(presign(600));
    let url = &mut tampered.artifacts[0].parts[0].upload_url;
    *url = url.replace("X-Amz-Signature=", "X-Amz-Signature=0");
    let err = d.client.upload_snapshot("s", &tampered).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Upstream), "{err}");
    assert!(
        err.to_string().contains("artifact manifest part 1"),
        "{err}"
    );
    assert!(err.to_string().contains("SignatureDoesNotMatch"), "{err}");

    let expiring = request(presign(1));
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let err = d.client.upload_snapshot("s", &expiring).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Upstream), "{err}");
    assert!(
        err.to_string().contains("artifact manifest part 1"),
        "{err}"
    );
    assert!(err.to_string().contains("AccessDenied"), "{err}");
}

/// Machine "m" and its disk-only snapshot "s" (small artifacts to move around).
async fn disk_snapshot(d: &Daemon) -> hearth_api::Snapshot {
    d.client.create_machine(&create_req("m")).await.unwrap();
    d.client
        .create_snapshot("m", "s", SnapshotKind::Disk)
        .await
        .unwrap()
        .snapshot
}
