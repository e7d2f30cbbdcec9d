//! Firecracker's HTTP API on its Unix socket, and the JSON it takes: the boot configuration
//! (one file, `--config-file`), VM state, snapshot create and load. One request per
//! connection; an answer is read only up to a bound (the VMM is not trusted to be brief).

use super::FcError;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;
use tokio::net::UnixStream;

/// The most of an answer that is read: Firecracker's are a few hundred bytes.
const MAX_ANSWER: usize = 64 << 10;

/// Everything a boot needs, as `--config-file` takes it. Paths are relative to the VMM's
/// directory (its working directory, or its chroot).
#[derive(Debug, Serialize)]
pub struct Config {
    #[serde(rename = "machine-config")]
    pub machine: MachineConfig,
    #[serde(rename = "boot-source")]
    pub boot_source: BootSource,
    pub drives: Vec<Drive>,
    #[serde(rename = "network-interfaces")]
    pub network_interfaces: Vec<NetworkInterface>,
    pub vsock: Vsock,
    pub entropy: Entropy,
}

#[derive(Debug, Serialize)]
pub struct MachineConfig {
    pub vcpu_count: u32,
    pub mem_size_mib: u32,
    pub smt: bool,
}

#[derive(Debug, Serialize)]
pub struct BootSource {
    pub kernel_image_path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<String>,
    pub boot_args: String,
}

#[derive(Debug, Serialize)]
pub struct Drive {
    /// Alphanumerics and `_` only.
    pub drive_id: String,
    pub path_on_host: String,
    pub is_root_device: bool,
    pub is_read_only: bool,
}

#[derive(Debug, Serialize)]
pub struct NetworkInterface {
    pub iface_id: String,
    pub host_dev_name: String,
    pub guest_mac: String,
}

#[derive(Debug, Serialize)]
pub struct Vsock {
    pub guest_cid: u32,
    pub uds_path: String,
}

/// A virtio-rng device; nothing to configure.
#[derive(Debug, Serialize)]
pub struct Entropy {}

/// `GET /`: Firecracker has no `GET /vm`; the state is here.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct InstanceInfo {
    pub id: String,
    /// `Not started`, `Running` or `Paused`.
    pub state: String,
    pub vmm_version: String,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub enum VmState {
    Paused,
    Resumed,
}

#[derive(Debug, Serialize)]
struct Vm {
    state: VmState,
}

#[derive(Debug, Serialize)]
pub struct SnapshotCreate {
    pub snapshot_type: &'static str,
    pub snapshot_path: String,
    pub mem_file_path: String,
}

#[derive(Debug, Serialize)]
pub struct SnapshotLoad {
    pub snapshot_path: String,
    pub mem_backend: MemBackend,
    /// KVM's dirty log on, so that later snapshots can be `Diff`s.
    pub track_dirty_pages: bool,
    pub resume_vm: bool,
}

#[derive(Debug, Serialize)]
pub struct MemBackend {
    /// `File`: the memory file mapped private, so restored machines share its pages.
    pub backend_type: &'static str,
    pub backend_path: String,
}

#[derive(Debug, Deserialize)]
struct Fault {
    fault_message: String,
}

/// A client of one VMM's API socket.
pub struct Api {
    socket: PathBuf,
}

impl Api {
    pub fn new(socket: PathBuf) -> Api {
        Api { socket }
    }

    pub async fn describe(&self, limit: Duration) -> Result<InstanceInfo, FcError> {
        let body = self.send(Method::GET, "/", None, limit).await?;
        serde_json::from_slice(&body).map_err(|source| FcError::Json {
            request: "GET /".into(),
            source,
        })
    }

    pub async fn set_state(&self, state: VmState, limit: Duration) -> Result<(), FcError> {
        self.send_json(Method::PATCH, "/vm", &Vm { state }, limit)
            .await
    }

    pub async fn create_snapshot(
        &self,
        params: &SnapshotCreate,
        limit: Duration,
    ) -> Result<(), FcError> {
        self.send_json(Method::PUT, "/snapshot/create", params, limit)
            .await
    }

    pub async fn load_snapshot(
        &self,
        params: &SnapshotLoad,
        limit: Duration,
    ) -> Result<(), FcError> {
        self.send_json(Method::PUT, "/snapshot/load", params, limit)
            .await
    }

    async fn send_json(
        &self,
        method: Method,
        path: &str,
        body: &impl Serialize,
        limit: Duration,
    ) -> Result<(), FcError> {
        let body = serde_json::to_vec(body).expect("API types serialize");
        self.send(method, path, Some(body), limit).await.map(drop)
    }

    /// Sends one request and returns the answer's body, or Firecracker's `fault_message`.
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        limit: Duration,
    ) -> Result<Bytes, FcError> {
        let request = format!("{method} {path}");
        tokio::time::timeout(limit, self.exchange(method, path, body, &request))
            .await
            .map_err(|_| FcError::Timeout {
                request: request.clone(),
                limit,
            })?
    }

    async fn exchange(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        request: &str,
    ) -> Result<Bytes, FcError> {
        let http = |source| FcError::Http {
            request: request.to_string(),
            source,
        };
        let stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|source| FcError::Connect {
                    path: self.socket.clone(),
                    source,
                })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(http)?;
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "localhost")
            .header("accept", "application/json");
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .expect("a valid request");
        let work = async {
            let resp = sender.send_request(req).await.map_err(http)?;
            let status = resp.status();
            let body = Limited::new(resp.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map_err(|source| FcError::Answer {
                    request: request.to_string(),
                    source,
                })?
                .to_bytes();
            if status.is_success() {
                return Ok(body);
            }
            Err(FcError::Refused {
                request: request.to_string(),
                status: status.as_u16(),
                fault: fault_of(&body),
            })
        };
        // The connection is driven here rather than on a task of its own, so that nothing of
        // it outlives the request (or its timeout).
        tokio::pin!(work, conn);
        tokio::select! {
            biased;
            answer = &mut work => answer,
            _ = &mut conn => work.await,
        }
    }
}

/// Firecracker's `{"fault_message": …}`, or the body itself when it is not one.
fn fault_of(body: &[u8]) -> String {
    serde_json::from_slice::<Fault>(body)
        .map(|f| f.fault_message)
        .unwrap_or_else(|_| String::from_utf8_lossy(body).trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_serializes_as_firecracker_reads_it() {
        let config = Config {
            machine: MachineConfig {
                vcpu_count: 2,
                mem_size_mib: 256,
                smt: false,
            },
            boot_source: BootSource {
                kernel_image_path: "vmlinux".into(),
                initrd_path: None,
                boot_args: "console=ttyS0".into(),
            },
            drives: vec![Drive {
                drive_id: "system".into(),
                path_on_host: "system.img".into(),
                is_root_device: true,
                is_read_only: false,
            }],
            network_interfaces: vec![],
            vsock: Vsock {
                guest_cid: 3,
                uds_path: "agent.sock".into(),
            },
            entropy: Entropy {},
        };
        let v = serde_json::to_value(&config).unwrap();
        assert_eq!(v["machine-config"]["mem_size_mib"], 256);
        assert_eq!(v["boot-source"]["kernel_image_path"], "vmlinux");
        assert!(v["boot-source"].get("initrd_path").is_none());
        assert_eq!(v["drives"][0]["path_on_host"], "system.img");
        assert_eq!(v["network-interfaces"], serde_json::json!([]));
        assert_eq!(v["vsock"]["guest_cid"], 3);
        assert_eq!(v["entropy"], serde_json::json!({}));
        assert_eq!(
            serde_json::to_value(Vm {
                state: VmState::Paused
            })
            .unwrap(),
            serde_json::json!({"state": "Paused"})
        );
    }

    #[test]
    fn a_fault_is_quoted_from_its_message() {
        assert_eq!(
            fault_of(br#"{"fault_message":"Load snapshot error: bitcode error"}"#),
            "Load snapshot error: bitcode error"
        );
        assert_eq!(fault_of(b" not json \n"), "not json");
    }
}
