//! Who may read what: artifact URLs parsed strictly and confined to the artifact directories,
//! none from the TCP listener unless allowed; the TCP listener over TLS, behind the token, with
//! refusals logged; settings that would expose the token refused at start.

mod common;

use common::*;
use hearth_api::{ArtifactKind, DurableSnapshotRef, SnapshotArtifact};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const TOKEN: &str = "tok-5b1e0c7d9a-never-logged";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A token file only its owner may read, as hearthd requires.
fn token_file(dir: &Path) -> String {
    let path = dir.join("token");
    std::fs::write(&path, format!("{TOKEN}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path.to_str().unwrap().to_string()
}

/// Asserts that the daemon fetched and cached nothing: no blob, no partial file, no index row.
fn assert_nothing_cached(d: &Daemon) {
    for sub in ["images/blobs", "images/tmp"] {
        let names: Vec<_> = std::fs::read_dir(d.path().join(sub))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(names.is_empty(), "{sub} holds {names:?}");
    }
    let db = rusqlite::Connection::open(d.path().join("state/hearth.db")).unwrap();
    let rows: i64 = db
        .query_row("SELECT count(*) FROM artifact_cache", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, 0, "the artifact index has rows");
}

async fn post(d: &Daemon, path: &str, body: &serde_json::Value) -> (u16, String) {
    let r = d
        .client
        .raw(
            hyper::Method::POST,
            path,
            Some(serde_json::to_vec(body).unwrap()),
        )
        .await
        .unwrap();
    (r.status.as_u16(), String::from_utf8_lossy(&r.body).into())
}

#[tokio::test(flavor = "multi_thread")]
async fn artifact_urls_are_parsed_strictly_and_confined_to_the_artifact_directories() {
    // An artifact directory of the daemon's (besides the image's) holding a symlink to a file
    // outside it, and a subdirectory to climb out of.
    let art = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let (art_dir, out_dir) = (art.path(), outside.path());
    std::fs::write(out_dir.join("secret"), "not for API callers").unwrap();
    std::os::unix::fs::symlink(out_dir.join("secret"), art_dir.join("link")).unwrap();
    std::fs::create_dir(art_dir.join("sub")).unwrap();
    let d = Daemon::start_with(&[
        "--artifact-dir",
        image_dir().to_str().unwrap(),
        "--artifact-dir",
        art_dir.to_str().unwrap(),
    ])
    .await;
    let kernel = image_dir().join("vmlinux");
    let (k, a, o) = (kernel.display(), art_dir.display(), out_dir.display());
    let refused = [
        "file:etc/passwd".to_string(),
        "file:/etc/passwd".to_string(),
        "file://localhost/etc/passwd".to_string(),
        format!("file://localhost{k}"),
        format!(" file://{k}"),
        format!("file://{k}\n"),
        format!("FILE://{k}"),
        "file:///etc/shadow".to_string(),
        "file:///proc/self/environ".to_string(),
        file_url(&art_dir.join("link")),
        format!("file://{a}/sub/../link"),
        format!("file://{a}/sub/%2e%2e/link"),
        format!("file://{a}/..{o}/secret"),
        format!("file://{a}/sub%2F..%2F..{o}/secret"),
        format!("file://{o}/secret"),
    ];
    for url in &refused {
        for field in ["kernel_image_url", "rootfs_url", "initrd_url"] {
            let mut art = serde_json::to_value(artifact()).unwrap();
            art[field] = url.as_str().into();
            let body = serde_json::json!({"machine_id": "m", "artifact": art});
            let (status, err) = post(&d, "/machines", &body).await;
            assert_eq!(status, 400, "{field} {url:?}: {err}");
            assert!(err.contains(field), "{field} {url:?}: {err}");
            // A restore's artifact is checked as a create's, before the snapshot is looked up.
            let body = serde_json::json!({
                "machine_id": "r",
                "artifact": art,
                "local_snapshot": {"snapshot_id": "nosuch"},
            });
            let (status, err) = post(&d, "/snapshots/nosuch/restore", &body).await;
            assert_eq!(status, 400, "restore {field} {url:?}: {err}");
            assert!(err.contains(field), "restore {field} {url:?}: {err}");
        }
    }
    // A durable restore's download URLs are object-store URLs: http(s) only.
    for url in [
        "file:///etc/shadow".to_string(),
        file_url(&kernel),
        "file:etc/passwd".to_string(),
    ] {
        let mut req = restore_req("snap", "r");
        req.local_snapshot = None;
        req.snapshot = Some(DurableSnapshotRef {
            snapshot_id: "snap".into(),
            machine_id: "src".into(),
            image_id: "default".into(),
            source_runtime_host: None,
            source_tap_device: None,
            artifacts: vec![SnapshotArtifact {
                id: "manifest".into(),
                kind: ArtifactKind::Manifest,
                name: "manifest.json".into(),
                size_bytes: 100,
                sha256_hex: Some("0".repeat(64)),
                object_key: None,
                download_url: Some(url.clone()),
            }],
        });
        let err = d.client.restore("snap", &req).await.unwrap_err();
        assert_eq!(
            err.code(),
            Some(hearth_api::ErrorCode::Invalid),
            "{url}: {err}"
        );
        assert!(err.to_string().contains("download_url"), "{url}: {err}");
    }
    // An outside path gets the same answer whether or not it exists.
    let mut req = create_req("m");
    req.artifact.rootfs_url = "file:///nonexistent/rootfs".into();
    let missing = d.client.create_machine(&req).await.unwrap_err().to_string();
    assert!(
        missing.contains("not under an artifact directory"),
        "{missing}"
    );
    assert_nothing_cached(&d);
    d.assert_nothing_left("m").await;
    d.assert_nothing_left("r").await;
}

/// A CA of the test's own and a certificate it signed for 127.0.0.1, in PEM.
struct TestCerts {
    ca: String,
    cert: String,
    key: String,
}

fn test_certs() -> TestCerts {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let params = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    let cert = params.signed_by(&key, &ca).unwrap();
    TestCerts {
        ca: ca.pem(),
        cert: cert.pem(),
        key: key.serialize_pem(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_tcp_listener_speaks_tls_behind_the_token_and_logs_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let certs = test_certs();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, &certs.cert).unwrap();
    std::fs::write(&key, &certs.key).unwrap();
    let token = token_file(dir.path());
    let listen = format!("127.0.0.1:{}", free_port());
    let d = Daemon::start_with(&[
        "--listen",
        &listen,
        "--token-file",
        &token,
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ])
    .await;
    let https = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(certs.ca.as_bytes()).unwrap())
        .build()
        .unwrap();
    let url = format!("https://{listen}/machines");

    // A client that connects and never starts its handshake holds up nobody.
    let _stalled = tokio::net::TcpStream::connect(&listen).await.unwrap();
    let t = Instant::now();
    let resp = https.get(&url).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["machines"], serde_json::json!([]));
    let resp = https.get(&url).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    let resp = https
        .get(&url)
        .bearer_auth("wrong-guess-3f9a")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    // Plain HTTP to the TLS port gets no answer, even with the token.
    let plain = reqwest::Client::new()
        .get(format!("http://{listen}/machines"))
        .bearer_auth(TOKEN)
        .timeout(Duration::from_secs(10))
        .send()
        .await;
    assert!(plain.is_err(), "plain HTTP was answered: {plain:?}");
    // A client that does not trust the test's CA does not get through either.
    let untrusting = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .build()
        .unwrap();
    assert!(untrusting
        .get(&url)
        .bearer_auth(TOKEN)
        .send()
        .await
        .is_err());

    // File URLs are refused on the TCP listener, even into an artifact directory, and nothing
    // is read.
    let body = serde_json::json!({"machine_id": "m", "artifact": artifact()});
    let resp = https
        .post(&url)
        .bearer_auth(TOKEN)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let err: serde_json::Value = resp.json().await.unwrap();
    assert!(
        err["error"].as_str().unwrap().contains("TCP listener"),
        "{err}"
    );
    assert_nothing_cached(&d);
    d.assert_nothing_left("m").await;

    // Each refused request is logged with where it came from and what it asked for; no token,
    // right or wrong, is in the log.
    let logged = eventually(Duration::from_secs(10), async || {
        d.log()
            .lines()
            .filter(|l| {
                l.contains("refused a TCP request")
                    && l.contains("127.0.0.1:")
                    && l.contains("/machines")
            })
            .count()
            == 2
    })
    .await;
    assert!(logged, "refusals not logged:\n{}", d.log());
    let log = d.log();
    assert!(log.contains("no bearer token") && log.contains("wrong bearer token"));
    assert!(log.contains("TLS handshake failed"), "{log}");
    assert!(
        !log.contains(TOKEN) && !log.contains("wrong-guess-3f9a"),
        "{log}"
    );
}

/// Runs hearthd with `args`, expecting it to refuse to start; returns what it said.
fn refused_start(args: &[&str]) -> String {
    let root = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_hearthd"))
        .arg("--root")
        .arg(root.path())
        .args(["--no-network", "--tsc-khz", "1000000"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("hearthd started with {args:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into()
}

#[test]
fn settings_that_would_expose_the_host_are_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let token = token_file(dir.path());
    let listen = format!("127.0.0.1:{}", free_port());
    for mode in [0o644, 0o640] {
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(mode)).unwrap();
        let err = refused_start(&["--listen", &listen, "--token-file", &token]);
        assert!(
            err.contains(&format!("{token} has mode {mode:04o}")) && err.contains("chmod 600"),
            "{err}"
        );
        assert!(!err.contains(TOKEN), "{err}");
    }
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    // Plain HTTP beyond loopback would send the token in the clear.
    let err = refused_start(&["--listen", "0.0.0.0:0", "--token-file", &token]);
    assert!(
        err.contains("in the clear") && err.contains("--tls-cert"),
        "{err}"
    );
    // A certificate that is not one.
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate").unwrap();
    let junk = junk.to_str().unwrap();
    let err = refused_start(&[
        "--listen",
        &listen,
        "--token-file",
        &token,
        "--tls-cert",
        junk,
        "--tls-key",
        junk,
    ]);
    assert!(err.contains("TLS certificate"), "{err}");
    let err = refused_start(&["--artifact-dir", "/nonexistent/artifacts"]);
    assert!(err.contains("/nonexistent/artifacts"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_image_under_the_data_root_boots_from_the_cli_and_over_tcp_when_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let token = token_file(dir.path());
    let listen = format!("127.0.0.1:{}", free_port());
    // hearthd's defaults for file URLs (the data root's images only), plain HTTP on loopback,
    // and file URLs allowed on TCP.
    let d = Daemon::start_with_root_images(&[
        "--listen",
        &listen,
        "--token-file",
        &token,
        "--allow-file-urls-over-tcp",
    ])
    .await;
    let images = d.path().join("images/default");
    std::fs::create_dir_all(&images).unwrap();
    for f in ["vmlinux", "initrd.img", "rootfs.ext4", "manifest.json"] {
        std::fs::copy(image_dir().join(f), images.join(f)).unwrap();
    }
    // The test image's own directory is not one of this daemon's artifact directories.
    let err = d.client.create_machine(&create_req("m")).await.unwrap_err();
    assert!(
        err.to_string().contains("not under an artifact directory"),
        "{err}"
    );

    // The CLI's default: file URLs to the image under the data root.
    let out = Command::new(hearth_cli())
        .arg("--root")
        .arg(d.path())
        .args(["create", "cli"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "hearth create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cli = d.client.get_machine("cli").await.unwrap();
    assert_eq!(cli.phase, hearth_api::Phase::Running);
    assert!(
        cli.artifact
            .rootfs_url
            .starts_with(&file_url(&std::fs::canonicalize(&images).unwrap())),
        "{}",
        cli.artifact.rootfs_url
    );

    // The same URLs over TCP, which this daemon allows.
    let body = serde_json::json!({"machine_id": "tcp", "artifact": cli.artifact});
    let resp = reqwest::Client::new()
        .post(format!("http://{listen}/machines"))
        .bearer_auth(TOKEN)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status();
    assert_eq!(status, 201, "{}", resp.text().await.unwrap());
    let out = sh(&d.client, "tcp", "echo up").await;
    assert_eq!(out.stdout.trim(), "up");
    for id in ["cli", "tcp"] {
        d.client.delete_machine(id).await.unwrap();
        d.assert_nothing_left(id).await;
    }
}
