//! The hybrid vsock handshake against the real Firecracker binary (`HEARTH_FIRECRACKER`), before
//! the agent listens: configured but not started, Firecracker takes the connection and never
//! answers; started, on a kernel that never brings up its vsock driver (no initrd: the image's
//! kernel has vsock as modules), the same. `vsock::connect` says so within its timeout; once
//! Firecracker is gone its socket file refuses.

mod common;

use common::*;
use hearth_api::client::Client;
use hearth_proto::AGENT_VSOCK_PORT;
use hearthd::vmm::vsock::{self, VsockError};
use hyper::Method;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(1);

/// A Firecracker process, killed and reaped when dropped.
struct Firecracker {
    child: Child,
    log: PathBuf,
}

impl Firecracker {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        self.child.wait().unwrap();
    }
}

impl Drop for Firecracker {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn put(api: &Client, path: &str, body: serde_json::Value) {
    let resp = api
        .raw(Method::PUT, path, Some(body.to_string().into_bytes()))
        .await
        .unwrap();
    assert_eq!(
        resp.status.as_u16(),
        204,
        "PUT {path}: {}",
        String::from_utf8_lossy(&resp.body)
    );
}

/// `connect` gives up within its timeout, for want of an answer.
async fn assert_times_out(uds: &Path, fc: &Firecracker) {
    let started = Instant::now();
    let err = vsock::connect(uds, AGENT_VSOCK_PORT, TIMEOUT)
        .await
        .expect_err("nothing listens in the guest");
    let took = started.elapsed();
    assert!(
        matches!(err, VsockError::Timeout { .. }),
        "{err}\n{}",
        fc.log()
    );
    assert!(took < TIMEOUT + Duration::from_millis(500), "{took:?}");
}

#[tokio::test]
async fn connect_fails_clearly_until_the_guest_listens() {
    let Some(binary) = std::env::var_os("HEARTH_FIRECRACKER") else {
        println!("skipped: no firecracker");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (api_sock, uds, log) = (
        dir.path().join("api.sock"),
        dir.path().join("v.sock"),
        dir.path().join("firecracker.log"),
    );
    let out = std::fs::File::create(&log).unwrap();
    let mut fc = Firecracker {
        child: Command::new(binary)
            .arg("--api-sock")
            .arg(&api_sock)
            .arg("--no-seccomp")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap(),
        log,
    };
    assert!(
        eventually(Duration::from_secs(10), async || api_sock.exists()).await,
        "no API socket: {}",
        fc.log()
    );
    let api = Client::new(&api_sock);
    put(
        &api,
        "/machine-config",
        serde_json::json!({"vcpu_count": 1, "mem_size_mib": 128}),
    )
    .await;
    put(
        &api,
        "/boot-source",
        serde_json::json!({
            "kernel_image_path": image_dir().join("vmlinux"),
            "boot_args": "console=ttyS0",
        }),
    )
    .await;
    put(
        &api,
        "/vsock",
        serde_json::json!({"guest_cid": 3, "uds_path": uds}),
    )
    .await;

    assert_times_out(&uds, &fc).await;
    put(
        &api,
        "/actions",
        serde_json::json!({"action_type": "InstanceStart"}),
    )
    .await;
    assert_times_out(&uds, &fc).await;

    fc.kill();
    let err = vsock::connect(&uds, AGENT_VSOCK_PORT, TIMEOUT)
        .await
        .expect_err("Firecracker is gone");
    assert!(
        matches!(&err, VsockError::Unreachable { source, .. }
            if source.kind() == std::io::ErrorKind::ConnectionRefused),
        "{err}"
    );
    let pid = fc.child.id();
    drop(fc);
    let path = dir.path().to_path_buf();
    drop(dir);
    assert!(!path.exists());
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
}
