//! Bad input gets a clear error with the right status and leaves nothing behind.

mod common;

use common::*;
use hearth_api::{ArtifactRef, ErrorCode};
use hyper::Method;
use std::time::{Duration, Instant};

async fn post_raw(d: &Daemon, path: &str, body: &str) -> (u16, serde_json::Value) {
    let r = d
        .client
        .raw(Method::POST, path, Some(body.as_bytes().to_vec()))
        .await
        .unwrap();
    (
        r.status.as_u16(),
        serde_json::from_slice(&r.body).unwrap_or_default(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_are_validated() {
    let d = Daemon::start().await;
    let c = &d.client;
    let art = serde_json::to_string(&artifact()).unwrap();

    for (body, want) in [
        (
            format!(r#"{{"machine_id":"Bad_Id","artifact":{art}}}"#),
            400,
        ),
        (format!(r#"{{"machine_id":"..","artifact":{art}}}"#), 400),
        (
            format!(r#"{{"machine_id":"ok","artifact":{art},"surprise":1}}"#),
            400,
        ),
        (
            format!(r#"{{"machine_id":"ok","artifact":{art},"memory_mib":1}}"#),
            400,
        ),
        (
            format!(r#"{{"machine_id":"ok","artifact":{art},"vcpus":0}}"#),
            400,
        ),
        (
            format!(r#"{{"machine_id":"ok","artifact":{art},"user_volume_ids":["v1"]}}"#),
            400,
        ),
        (r#"{"machine_id":"ok"}"#.to_string(), 400),
        ("not json".to_string(), 400),
    ] {
        let (status, err) = post_raw(&d, "/machines", &body).await;
        assert_eq!(status, want, "{body}: {err}");
        assert_eq!(err["code"], "invalid", "{body}: {err}");
        assert!(err["error"].as_str().is_some_and(|m| !m.is_empty()));
    }
    let (status, err) = post_raw(&d, "/machines/nope/exec", r#"{"command":["true"]}"#).await;
    assert_eq!((status, err["code"].as_str()), (404, Some("not_found")));
    let (status, _) = post_raw(&d, "/machines/nope/exec", r#"{"command":["true"],"x":1}"#).await;
    assert_eq!(status, 400);
    let err = c.get_machine("nope").await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound));
    let r = c.raw(Method::GET, "/machines/UPPER", None).await.unwrap();
    assert_eq!(r.status.as_u16(), 400);
    d.assert_nothing_left("ok").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_artifacts_fail_cleanly() {
    // The junk is in an artifact directory of the daemon's, next to the image's.
    let junk_dir = tempfile::tempdir().unwrap();
    let d = Daemon::start_with(&[
        "--artifact-dir",
        image_dir().to_str().unwrap(),
        "--artifact-dir",
        junk_dir.path().to_str().unwrap(),
    ])
    .await;
    let c = &d.client;
    let junk = junk_dir.path().join("junk");
    std::fs::write(&junk, vec![0x5a; 4 << 20]).unwrap();
    let good = artifact();

    // Unreachable artifact URL: 502, nothing fetched.
    let mut req = create_req("unreachable");
    req.artifact.kernel_image_url = "http://127.0.0.1:9/vmlinux".into();
    let err = c.create_machine(&req).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Upstream), "{err}");
    assert!(err.to_string().contains("kernel_image_url"), "{err}");
    d.assert_nothing_left("unreachable").await;

    // A missing local file.
    let mut req = create_req("missing");
    req.artifact.rootfs_url = file_url(&junk_dir.path().join("nonexistent.ext4"));
    let err = c.create_machine(&req).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Invalid), "{err}");
    d.assert_nothing_left("missing").await;

    // A rootfs that is not ext4.
    let mut req = create_req("notext4");
    req.artifact.rootfs_url = file_url(&junk);
    let err = c.create_machine(&req).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Invalid), "{err}");
    assert!(err.to_string().contains("ext4"), "{err}");
    d.assert_nothing_left("notext4").await;
    // The kernel and the junk these failed creates fetched are gone again.
    let blobs = std::fs::read_dir(d.path().join("images/blobs")).unwrap();
    assert_eq!(blobs.count(), 0, "a failed create left blobs");

    // A kernel QEMU cannot load.
    let t = Instant::now();
    let mut req = create_req("badkernel");
    req.artifact.kernel_image_url = file_url(&junk);
    let err = c.create_machine(&req).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Invalid), "{err}");
    assert!(err.to_string().contains("QEMU"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
    d.assert_nothing_left("badkernel").await;

    // A kernel that starts but cannot boot (its initrd is garbage): the guest panics and the
    // error comes back well before the boot timeout, with the console's last words.
    let t = Instant::now();
    let req = hearth_api::CreateMachineRequest {
        artifact: ArtifactRef {
            initrd_url: Some(file_url(&junk)),
            ..good.clone()
        },
        ..create_req("panics")
    };
    let err = c.create_machine(&req).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Invalid), "{err}");
    assert!(err.to_string().contains("console"), "{err}");
    assert!(err.to_string().contains("Kernel panic"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(45), "{:?}", t.elapsed());
    d.assert_nothing_left("panics").await;

    assert!(c.list_machines().await.unwrap().is_empty());
    assert!(d.vmm_pids().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn tcp_listener_requires_the_bearer_token() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let token_dir = tempfile::tempdir().unwrap();
    let token_file = token_dir.path().join("token");
    std::fs::write(&token_file, "s3cret-token\n").unwrap();
    std::fs::set_permissions(
        &token_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let listen = format!("127.0.0.1:{port}");
    let d = Daemon::start_with(&[
        "--listen",
        &listen,
        "--token-file",
        token_file.to_str().unwrap(),
    ])
    .await;
    let http = reqwest::Client::new();
    let url = format!("http://{listen}/machines");
    let resp = http.get(&url).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    let resp = http.get(&url).bearer_auth("wrong").send().await.unwrap();
    assert_eq!(resp.status(), 401);
    let resp = http
        .get(&url)
        .bearer_auth("s3cret-token")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["machines"], serde_json::json!([]));
    // The Unix socket needs no token (its file mode guards it).
    assert!(d.client.list_machines().await.unwrap().is_empty());
}
