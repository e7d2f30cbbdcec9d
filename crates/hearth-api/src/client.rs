//! A client for hearthd's Unix socket: one HTTP/1.1 connection per request, which costs well
//! under a millisecond locally and keeps the client free of pooling state.

use crate::{
    CreateMachineRequest, CreateSnapshotRequest, CreateSnapshotResponse, ErrorBody, ErrorCode,
    ExecRequest, ExecResponse, ForkRequest, GcResponse, Health, Machine, MachineEnvelope,
    MachineList, NetworkRequest, PortEnvelope, PortList, PublishPortRequest, PublishedPort,
    RestoreRequest, Snapshot, SnapshotEnvelope, SnapshotKind, SnapshotList, UploadRequest,
    UploadResponse,
};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach hearthd at {path}: {error} (is the daemon running?)")]
    Connect {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{message} ({code:?}, HTTP {status})")]
    Api {
        status: u16,
        code: ErrorCode,
        message: String,
    },
    #[error("talking to hearthd: {0}")]
    Transport(String),
}

impl ClientError {
    /// The API error code, when the daemon answered with one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Api { code, .. } => Some(*code),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
}

/// A raw answer: status and body, for callers (tests) that look at both.
#[derive(Debug)]
pub struct RawResponse {
    pub status: StatusCode,
    pub body: Bytes,
    /// The `Server-Timing` header as (phase, milliseconds).
    pub timings: Vec<(String, f64)>,
}

/// Parses `name;dur=12.5, other;dur=3`.
fn parse_server_timing(v: &str) -> Vec<(String, f64)> {
    v.split(',')
        .filter_map(|part| {
            let mut fields = part.trim().split(';');
            let name = fields.next()?.trim().to_string();
            let dur = fields.find_map(|f| f.trim().strip_prefix("dur=")?.parse().ok())?;
            Some((name, dur))
        })
        .collect()
}

impl Client {
    pub fn new(socket: impl AsRef<Path>) -> Client {
        Client {
            socket: socket.as_ref().to_path_buf(),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Sends one request with an optional raw JSON body.
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<RawResponse, ClientError> {
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|error| ClientError::Connect {
                path: self.socket.clone(),
                error,
            })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(format!("http://hearthd{path}"))
            .header("host", "hearthd");
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        let status = resp.status();
        let timings = resp
            .headers()
            .get("server-timing")
            .and_then(|v| v.to_str().ok())
            .map(parse_server_timing)
            .unwrap_or_default();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| ClientError::Transport(e.to_string()))?
            .to_bytes();
        Ok(RawResponse {
            status,
            body,
            timings,
        })
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, ClientError> {
        self.call_timed(method, path, body).await.map(|(v, _)| v)
    }

    /// A call whose answer comes with the daemon's phase timings (ms).
    async fn call_timed<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<(T, Vec<(String, f64)>), ClientError> {
        let body = body.map(|b| serde_json::to_vec(b).expect("request types serialize"));
        let resp = self.raw(method, path, body).await?;
        if !resp.status.is_success() {
            return Err(match serde_json::from_slice::<ErrorBody>(&resp.body) {
                Ok(e) => ClientError::Api {
                    status: resp.status.as_u16(),
                    code: e.code,
                    message: e.error,
                },
                Err(_) => ClientError::Transport(format!(
                    "HTTP {}: {}",
                    resp.status,
                    String::from_utf8_lossy(&resp.body)
                )),
            });
        }
        let body = if resp.body.is_empty() {
            Bytes::from_static(b"null")
        } else {
            resp.body
        };
        let value = serde_json::from_slice(&body)
            .map_err(|e| ClientError::Transport(format!("bad response body: {e}")))?;
        Ok((value, resp.timings))
    }

    pub async fn health(&self) -> Result<Health, ClientError> {
        self.call(Method::GET, "/health", None::<&()>).await
    }

    pub async fn create_machine(&self, req: &CreateMachineRequest) -> Result<Machine, ClientError> {
        let env: MachineEnvelope = self.call(Method::POST, "/machines", Some(req)).await?;
        Ok(env.machine)
    }

    pub async fn list_machines(&self) -> Result<Vec<Machine>, ClientError> {
        let list: MachineList = self.call(Method::GET, "/machines", None::<&()>).await?;
        Ok(list.machines)
    }

    pub async fn get_machine(&self, id: &str) -> Result<Machine, ClientError> {
        let env: MachineEnvelope = self
            .call(Method::GET, &format!("/machines/{id}"), None::<&()>)
            .await?;
        Ok(env.machine)
    }

    pub async fn delete_machine(&self, id: &str) -> Result<(), ClientError> {
        self.call(Method::DELETE, &format!("/machines/{id}"), None::<&()>)
            .await
    }

    pub async fn stop_machine(&self, id: &str) -> Result<(), ClientError> {
        self.call(Method::POST, &format!("/machines/{id}/stop"), None::<&()>)
            .await
    }

    pub async fn start_machine(&self, id: &str) -> Result<Machine, ClientError> {
        let env: MachineEnvelope = self
            .call(Method::POST, &format!("/machines/{id}/start"), None::<&()>)
            .await?;
        Ok(env.machine)
    }

    pub async fn exec(&self, id: &str, req: &ExecRequest) -> Result<ExecResponse, ClientError> {
        self.call(Method::POST, &format!("/machines/{id}/exec"), Some(req))
            .await
    }

    pub async fn create_snapshot(
        &self,
        machine: &str,
        snapshot_id: &str,
        kind: SnapshotKind,
    ) -> Result<CreateSnapshotResponse, ClientError> {
        Ok(self
            .create_snapshot_timed(machine, snapshot_id, kind)
            .await?
            .0)
    }

    /// Also returns the phases (quiesce, paused, hash, total) in milliseconds.
    pub async fn create_snapshot_timed(
        &self,
        machine: &str,
        snapshot_id: &str,
        kind: SnapshotKind,
    ) -> Result<(CreateSnapshotResponse, Vec<(String, f64)>), ClientError> {
        let req = CreateSnapshotRequest {
            snapshot_id: snapshot_id.to_string(),
            kind: Some(kind),
        };
        self.call_timed(
            Method::POST,
            &format!("/machines/{machine}/snapshots"),
            Some(&req),
        )
        .await
    }

    /// Snapshots of one machine, or of every machine when `machine` is None.
    pub async fn list_snapshots(
        &self,
        machine: Option<&str>,
    ) -> Result<Vec<Snapshot>, ClientError> {
        let path = match machine {
            Some(m) => format!("/machines/{m}/snapshots"),
            None => "/snapshots".to_string(),
        };
        let list: SnapshotList = self.call(Method::GET, &path, None::<&()>).await?;
        Ok(list.snapshots)
    }

    pub async fn get_snapshot(&self, id: &str) -> Result<Snapshot, ClientError> {
        let env: SnapshotEnvelope = self
            .call(Method::GET, &format!("/snapshots/{id}"), None::<&()>)
            .await?;
        Ok(env.snapshot)
    }

    /// Asks hearthd to PUT a snapshot's artifacts to presigned part URLs.
    pub async fn upload_snapshot(
        &self,
        id: &str,
        req: &UploadRequest,
    ) -> Result<UploadResponse, ClientError> {
        self.call(Method::POST, &format!("/snapshots/{id}/upload"), Some(req))
            .await
    }

    pub async fn delete_snapshot(&self, id: &str) -> Result<(), ClientError> {
        self.call(Method::DELETE, &format!("/snapshots/{id}"), None::<&()>)
            .await
    }

    pub async fn restore(
        &self,
        snapshot: &str,
        req: &RestoreRequest,
    ) -> Result<Machine, ClientError> {
        Ok(self.restore_timed(snapshot, req).await?.0)
    }

    /// Also returns the phases (disks, running, agent) in milliseconds.
    pub async fn restore_timed(
        &self,
        snapshot: &str,
        req: &RestoreRequest,
    ) -> Result<(Machine, Vec<(String, f64)>), ClientError> {
        let (env, t): (MachineEnvelope, _) = self
            .call_timed(
                Method::POST,
                &format!("/snapshots/{snapshot}/restore"),
                Some(req),
            )
            .await?;
        Ok((env.machine, t))
    }

    pub async fn fork(&self, source: &str, req: &ForkRequest) -> Result<Machine, ClientError> {
        Ok(self.fork_timed(source, req).await?.0)
    }

    /// Also returns the phases (quiesce, paused, running, agent, total) in milliseconds.
    pub async fn fork_timed(
        &self,
        source: &str,
        req: &ForkRequest,
    ) -> Result<(Machine, Vec<(String, f64)>), ClientError> {
        let (env, t): (MachineEnvelope, _) = self
            .call_timed(Method::POST, &format!("/machines/{source}/fork"), Some(req))
            .await?;
        Ok((env.machine, t))
    }

    /// Removes the blobs no machine or snapshot needs and no operation is using.
    pub async fn gc(&self) -> Result<GcResponse, ClientError> {
        self.call(Method::POST, "/gc", None::<&()>).await
    }

    pub async fn publish_port(
        &self,
        machine: &str,
        req: &PublishPortRequest,
    ) -> Result<PublishedPort, ClientError> {
        let env: PortEnvelope = self
            .call(
                Method::POST,
                &format!("/machines/{machine}/published-ports"),
                Some(req),
            )
            .await?;
        Ok(env.port)
    }

    pub async fn list_ports(&self, machine: &str) -> Result<Vec<PublishedPort>, ClientError> {
        let list: PortList = self
            .call(
                Method::GET,
                &format!("/machines/{machine}/published-ports"),
                None::<&()>,
            )
            .await?;
        Ok(list.ports)
    }

    pub async fn unpublish_port(&self, machine: &str, port: &str) -> Result<(), ClientError> {
        self.call(
            Method::DELETE,
            &format!("/machines/{machine}/published-ports/{port}"),
            None::<&()>,
        )
        .await
    }

    /// Changes a machine's egress policy (`PATCH /machines/{id}/network`).
    pub async fn set_network(
        &self,
        machine: &str,
        req: &NetworkRequest,
    ) -> Result<Machine, ClientError> {
        let env: MachineEnvelope = self
            .call(
                Method::PATCH,
                &format!("/machines/{machine}/network"),
                Some(req),
            )
            .await?;
        Ok(env.machine)
    }
}
