//! A client for hearthd's Unix socket: one HTTP/1.1 connection per request, which costs well
//! under a millisecond locally and keeps the client free of pooling state. Transfers stream both
//! ways: request bodies are read from an `AsyncRead` as they are sent, response bodies are written
//! or parsed as they arrive.

use crate::{
    AttachControl, CreateMachineRequest, CreateSnapshotRequest, CreateSnapshotResponse, ErrorBody,
    ErrorCode, ExecRequest, ExecResponse, FileOp, FileResult, FileUploadResponse, ForkRequest,
    GcResponse, Health, Machine, MachineEnvelope, MachineList, NetworkRequest, OutputEvent,
    OutputStream, PortEnvelope, PortList, ProcessEnvelope, ProcessInfo, ProcessList,
    PublishPortRequest, PublishedPort, ResizeRequest, RestoreRequest, SignalName, SignalRequest,
    Snapshot, SnapshotEnvelope, SnapshotKind, SnapshotList, StartProcess, UploadRequest,
    UploadResponse, WatchEvent,
};
use bytes::Bytes;
use futures_util::stream::{BoxStream, SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt, TryStreamExt};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::path::{Path, PathBuf};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;
use tokio_util::codec::{FramedRead, LinesCodec};
use tokio_util::io::{ReaderStream, StreamReader};

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
    /// Reading or writing the local side of a transfer.
    #[error("local I/O: {0}")]
    Io(#[from] std::io::Error),
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

fn transport(e: impl std::fmt::Display) -> ClientError {
    ClientError::Transport(e.to_string())
}

/// The error a non-success answer stands for: its `{error, code}` body, else its status.
fn api_error(status: StatusCode, body: &[u8]) -> ClientError {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(e) => ClientError::Api {
            status: status.as_u16(),
            code: e.code,
            message: e.error,
        },
        Err(_) => match ErrorCode::from_status(status.as_u16()) {
            Some(code) if body.is_empty() => ClientError::Api {
                status: status.as_u16(),
                code,
                message: format!("HTTP {status}"),
            },
            _ => ClientError::Transport(format!(
                "HTTP {}: {}",
                status,
                String::from_utf8_lossy(body)
            )),
        },
    }
}

/// A request body: buffered, or streamed from a reader.
type Body = UnsyncBoxBody<Bytes, std::io::Error>;

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Reports how many bytes moved so far, and the total when it is known.
pub trait Progress: FnMut(u64, Option<u64>) + Send + 'static {}
impl<F: FnMut(u64, Option<u64>) + Send + 'static> Progress for F {}

/// A body read from `reader` as the connection sends it, chunk by chunk.
fn streamed(
    reader: impl AsyncRead + Send + 'static,
    total: Option<u64>,
    mut progress: impl Progress,
) -> Body {
    let mut done = 0u64;
    let frames = ReaderStream::with_capacity(reader, CHUNK).map_ok(move |chunk| {
        done += chunk.len() as u64;
        progress(done, total);
        Frame::data(chunk)
    });
    StreamBody::new(frames).boxed_unsync()
}

/// Read size of streamed request bodies.
const CHUNK: usize = 256 * 1024;
/// Longest error body read from a streaming endpoint, and longest JSON answer.
const MAX_JSON_BODY: usize = 64 << 20;
/// Longest line of an NDJSON stream (an output event carries at most 256 KiB, base64-encoded).
const MAX_EVENT_LINE: usize = 4 << 20;
/// Largest WebSocket message accepted from hearthd.
const MAX_WS_MESSAGE: usize = 8 << 20;

/// Percent-encodes one path segment or query value.
fn enc(s: &str) -> String {
    utf8_percent_encode(s, NON_ALPHANUMERIC).to_string()
}

/// `?k=v&…` of the pairs that have a value (empty when none has).
fn query(pairs: &[(&str, Option<String>)]) -> String {
    let parts: Vec<String> = pairs
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", enc(v))))
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!("?{}", parts.join("&"))
    }
}

/// Parses a response body of JSON lines as it arrives.
fn ndjson<T: DeserializeOwned + Send + 'static>(
    resp: Response<Incoming>,
) -> BoxStream<'static, Result<T, ClientError>> {
    let bytes = resp
        .into_body()
        .into_data_stream()
        .map_err(std::io::Error::other);
    let lines = FramedRead::new(
        StreamReader::new(bytes),
        LinesCodec::new_with_max_length(MAX_EVENT_LINE),
    );
    lines
        .map_err(transport)
        .try_filter(|line| std::future::ready(!line.trim().is_empty()))
        .and_then(|line| {
            std::future::ready(
                serde_json::from_str(&line)
                    .map_err(|e| ClientError::Transport(format!("bad event {line:?}: {e}"))),
            )
        })
        .boxed()
}

/// Writes a response body to `out` as it arrives; returns its length.
async fn copy_body(
    resp: Response<Incoming>,
    out: &mut (impl AsyncWrite + Unpin),
    mut progress: impl FnMut(u64, Option<u64>),
) -> Result<u64, ClientError> {
    let total = resp
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse().ok());
    let mut body = resp.into_body();
    let mut done = 0u64;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.map_err(transport)?.into_data() {
            out.write_all(&data).await?;
            done += data.len() as u64;
            progress(done, total);
        }
    }
    out.flush().await?;
    Ok(done)
}

async fn json_body<T: DeserializeOwned>(resp: Response<Incoming>) -> Result<T, ClientError> {
    let body = Limited::new(resp.into_body(), MAX_JSON_BODY)
        .collect()
        .await
        .map_err(transport)?
        .to_bytes();
    serde_json::from_slice(&body)
        .map_err(|e| ClientError::Transport(format!("bad response body: {e}")))
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

/// How an upload writes its file.
#[derive(Debug, Clone, Copy, Default)]
pub struct UploadOptions<'a> {
    /// Permission bits; by default 0644, or the replaced file's.
    pub mode: Option<u32>,
    /// Written as this user (name or uid); root by default.
    pub user: Option<&'a str>,
}

/// What an attached client receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttachEvent {
    Output {
        stream: OutputStream,
        data: Bytes,
    },
    /// Output from `from` to `to` was dropped from the agent's buffer before it was read.
    Dropped {
        from: u64,
        to: u64,
    },
    /// The process exited and all its output was sent; the server closes next.
    Exit {
        exit_code: i32,
        signal: Option<i32>,
    },
}

type Ws = WebSocketStream<UnixStream>;

/// An attached process (`GET …/processes/{pid|tag}/attach`): stdin and controls go one way,
/// output and the exit status come back. Split it to read and write from different tasks.
pub struct Attach {
    pub sender: AttachSender,
    pub receiver: AttachReceiver,
}

pub struct AttachSender(SplitSink<Ws, Message>);
pub struct AttachReceiver(SplitStream<Ws>);

fn ws_error(e: tungstenite::Error) -> ClientError {
    match e {
        tungstenite::Error::Http(resp) => {
            api_error(resp.status(), resp.body().as_deref().unwrap_or_default())
        }
        tungstenite::Error::Io(e) => ClientError::Transport(e.to_string()),
        e => transport(e),
    }
}

impl AttachSender {
    /// Bytes for the process's stdin (its terminal, on a pty).
    pub async fn send_stdin(&mut self, data: impl Into<Bytes>) -> Result<(), ClientError> {
        self.0
            .send(Message::Binary(data.into()))
            .await
            .map_err(ws_error)
    }

    pub async fn send_control(&mut self, control: &AttachControl) -> Result<(), ClientError> {
        let text = serde_json::to_string(control).expect("controls serialize");
        self.0
            .send(Message::Text(text.into()))
            .await
            .map_err(ws_error)
    }

    /// Closes the connection; the process runs on.
    pub async fn close(&mut self) -> Result<(), ClientError> {
        self.0.close().await.map_err(ws_error)
    }
}

impl AttachReceiver {
    /// The next event; `None` when the connection closed without an exit (the process may
    /// still run). Cancel-safe.
    pub async fn next_event(&mut self) -> Result<Option<AttachEvent>, ClientError> {
        while let Some(msg) = self.0.next().await {
            match msg.map_err(ws_error)? {
                Message::Binary(b) => {
                    let stream = match b.first() {
                        Some(1) => OutputStream::Stdout,
                        Some(2) => OutputStream::Stderr,
                        Some(3) => OutputStream::Pty,
                        other => {
                            return Err(ClientError::Transport(format!(
                                "attach: output message with stream byte {other:?}"
                            )))
                        }
                    };
                    return Ok(Some(AttachEvent::Output {
                        stream,
                        data: b.slice(1..),
                    }));
                }
                Message::Text(t) => {
                    let event: OutputEvent = serde_json::from_str(t.as_str()).map_err(|e| {
                        ClientError::Transport(format!("attach: bad event {:?}: {e}", t.as_str()))
                    })?;
                    return Ok(Some(match event {
                        OutputEvent::Output { stream, .. } => AttachEvent::Output {
                            stream,
                            data: event.data().map_err(transport)?.into(),
                        },
                        OutputEvent::Dropped { from, to } => AttachEvent::Dropped { from, to },
                        OutputEvent::Exit { exit_code, signal } => {
                            AttachEvent::Exit { exit_code, signal }
                        }
                    }));
                }
                Message::Close(_) => return Ok(None),
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
            }
        }
        Ok(None)
    }
}

impl Attach {
    pub async fn send_stdin(&mut self, data: impl Into<Bytes>) -> Result<(), ClientError> {
        self.sender.send_stdin(data).await
    }

    pub async fn send_control(&mut self, control: &AttachControl) -> Result<(), ClientError> {
        self.sender.send_control(control).await
    }

    pub async fn next_event(&mut self) -> Result<Option<AttachEvent>, ClientError> {
        self.receiver.next_event().await
    }
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

    fn request(method: Method, path: &str) -> hyper::http::request::Builder {
        Request::builder()
            .method(method)
            .uri(format!("http://hearthd{path}"))
            .header("host", "hearthd")
    }

    /// Sends one request on a connection of its own.
    async fn send(&self, req: Request<Body>) -> Result<Response<Incoming>, ClientError> {
        let stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|error| ClientError::Connect {
                    path: self.socket.clone(),
                    error,
                })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(transport)?;
        tokio::spawn(conn);
        sender.send_request(req).await.map_err(transport)
    }

    /// Sends one request and turns a non-success answer into its error.
    async fn send_ok(
        &self,
        req: hyper::http::request::Builder,
        body: Body,
    ) -> Result<Response<Incoming>, ClientError> {
        let resp = self.send(req.body(body).map_err(transport)?).await?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_JSON_BODY)
            .collect()
            .await
            .map_err(transport)?
            .to_bytes();
        Err(api_error(status, &body))
    }

    /// Sends one request with an optional raw JSON body.
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<RawResponse, ClientError> {
        let mut req = Self::request(method, path);
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let req = req
            .body(full(body.unwrap_or_default()))
            .map_err(transport)?;
        let resp = self.send(req).await?;
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
            .map_err(transport)?
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
            return Err(api_error(resp.status, &resp.body));
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

    /// A snapshot with the sha256 of every artifact, computed by hearthd where not known yet.
    pub async fn get_snapshot_hashed(&self, id: &str) -> Result<Snapshot, ClientError> {
        let env: SnapshotEnvelope = self
            .call(
                Method::GET,
                &format!("/snapshots/{id}?hashes=true"),
                None::<&()>,
            )
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

    /// `POST /machines/{id}/processes`: starts a process that lives until it exits or is
    /// signalled.
    pub async fn start_process(
        &self,
        machine: &str,
        req: &StartProcess,
    ) -> Result<ProcessInfo, ClientError> {
        let env: ProcessEnvelope = self
            .call(
                Method::POST,
                &format!("/machines/{machine}/processes"),
                Some(req),
            )
            .await?;
        Ok(env.process)
    }

    /// Running and recently exited processes, by start.
    pub async fn list_processes(&self, machine: &str) -> Result<Vec<ProcessInfo>, ClientError> {
        let list: ProcessList = self
            .call(
                Method::GET,
                &format!("/machines/{machine}/processes"),
                None::<&()>,
            )
            .await?;
        Ok(list.processes)
    }

    /// One process by pid (all digits) or tag.
    pub async fn get_process(
        &self,
        machine: &str,
        process: &str,
    ) -> Result<ProcessInfo, ClientError> {
        let env: ProcessEnvelope = self
            .call(
                Method::GET,
                &process_path(machine, process, ""),
                None::<&()>,
            )
            .await?;
        Ok(env.process)
    }

    /// A process's output from `offset`, as it arrives: without `follow` up to what is there
    /// now, with it up to the `exit` event.
    pub async fn process_output(
        &self,
        machine: &str,
        process: &str,
        offset: u64,
        follow: bool,
    ) -> Result<BoxStream<'static, Result<OutputEvent, ClientError>>, ClientError> {
        let path = process_path(machine, process, "/output")
            + &query(&[
                ("offset", Some(offset.to_string())),
                ("follow", Some(follow.to_string())),
            ]);
        let resp = self
            .send_ok(Self::request(Method::GET, &path), full(Bytes::new()))
            .await?;
        Ok(ndjson(resp))
    }

    /// Writes `data` to a process's stdin; `close` closes it after them.
    pub async fn process_stdin(
        &self,
        machine: &str,
        process: &str,
        data: impl Into<Bytes>,
        close: bool,
    ) -> Result<(), ClientError> {
        let path = process_path(machine, process, "/stdin")
            + &query(&[("close", Some(close.to_string()))]);
        let req =
            Self::request(Method::POST, &path).header("content-type", "application/octet-stream");
        self.send_ok(req, full(data)).await?;
        Ok(())
    }

    /// Sends a signal to a process's group.
    pub async fn signal_process(
        &self,
        machine: &str,
        process: &str,
        signal: SignalName,
    ) -> Result<(), ClientError> {
        self.call(
            Method::POST,
            &process_path(machine, process, "/signal"),
            Some(&SignalRequest { signal }),
        )
        .await
    }

    /// Resizes a process's pty.
    pub async fn resize_process(
        &self,
        machine: &str,
        process: &str,
        cols: u16,
        rows: u16,
    ) -> Result<(), ClientError> {
        self.call(
            Method::POST,
            &process_path(machine, process, "/resize"),
            Some(&ResizeRequest { cols, rows }),
        )
        .await
    }

    /// Attaches to a process over a WebSocket: its output from `offset` on, then its exit.
    pub async fn attach(
        &self,
        machine: &str,
        process: &str,
        offset: u64,
    ) -> Result<Attach, ClientError> {
        let stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|error| ClientError::Connect {
                    path: self.socket.clone(),
                    error,
                })?;
        let url = format!(
            "ws://hearthd{}",
            process_path(machine, process, "/attach")
                + &query(&[("offset", Some(offset.to_string()))])
        );
        let config = WebSocketConfig::default()
            .max_message_size(Some(MAX_WS_MESSAGE))
            .max_frame_size(Some(MAX_WS_MESSAGE));
        let (ws, _) = tokio_tungstenite::client_async_with_config(url, stream, Some(config))
            .await
            .map_err(ws_error)?;
        let (sink, stream) = ws.split();
        Ok(Attach {
            sender: AttachSender(sink),
            receiver: AttachReceiver(stream),
        })
    }

    /// `POST /machines/{id}/files/ops`: one buffered file operation.
    pub async fn file_op(&self, machine: &str, op: &FileOp) -> Result<FileResult, ClientError> {
        self.call(
            Method::POST,
            &format!("/machines/{machine}/files/ops"),
            Some(op),
        )
        .await
    }

    /// Streams a file's content (from `range`: first byte and, inclusive, last) into `out`;
    /// returns how many bytes were written.
    pub async fn download(
        &self,
        machine: &str,
        path: &str,
        user: Option<&str>,
        range: Option<(u64, Option<u64>)>,
        out: &mut (impl AsyncWrite + Unpin),
        progress: impl FnMut(u64, Option<u64>),
    ) -> Result<u64, ClientError> {
        let mut req = Self::request(
            Method::GET,
            &files_path(machine, "content", path, user, &[]),
        );
        if let Some((first, last)) = range {
            let last = last.map(|l| l.to_string()).unwrap_or_default();
            req = req.header(hyper::header::RANGE, format!("bytes={first}-{last}"));
        }
        let resp = self.send_ok(req, full(Bytes::new())).await?;
        copy_body(resp, out, progress).await
    }

    /// Uploads `len` bytes read from `reader` to `path`, streamed; the daemon renames the file
    /// into place only once it is complete.
    pub async fn upload(
        &self,
        machine: &str,
        path: &str,
        opts: UploadOptions<'_>,
        reader: impl AsyncRead + Send + 'static,
        len: u64,
        progress: impl Progress,
    ) -> Result<FileUploadResponse, ClientError> {
        let mode = opts.mode.map(|m| format!("{m:04o}"));
        let req = Self::request(
            Method::PUT,
            &files_path(machine, "content", path, opts.user, &[("mode", mode)]),
        )
        .header("content-type", "application/octet-stream")
        .header(hyper::header::CONTENT_LENGTH, len);
        let resp = self
            .send_ok(req, streamed(reader, Some(len), progress))
            .await?;
        json_body(resp).await
    }

    /// Streams a tar archive of `path` (a file or a directory, named by its last component)
    /// into `out`; returns its length.
    pub async fn get_archive(
        &self,
        machine: &str,
        path: &str,
        user: Option<&str>,
        out: &mut (impl AsyncWrite + Unpin),
        progress: impl FnMut(u64, Option<u64>),
    ) -> Result<u64, ClientError> {
        let req = Self::request(
            Method::GET,
            &files_path(machine, "archive", path, user, &[]),
        );
        let resp = self.send_ok(req, full(Bytes::new())).await?;
        copy_body(resp, out, progress).await
    }

    /// Unpacks the tar stream read from `reader` into directory `dir` (created when missing).
    pub async fn put_archive(
        &self,
        machine: &str,
        dir: &str,
        user: Option<&str>,
        reader: impl AsyncRead + Send + 'static,
        progress: impl Progress,
    ) -> Result<(), ClientError> {
        let req = Self::request(Method::PUT, &files_path(machine, "archive", dir, user, &[]))
            .header("content-type", "application/x-tar");
        self.send_ok(req, streamed(reader, None, progress)).await?;
        Ok(())
    }

    /// Changes under `path` as they happen, until the stream is dropped.
    pub async fn watch(
        &self,
        machine: &str,
        path: &str,
        recursive: bool,
        user: Option<&str>,
    ) -> Result<BoxStream<'static, Result<WatchEvent, ClientError>>, ClientError> {
        let path = files_path(
            machine,
            "watch",
            path,
            user,
            &[("recursive", Some(recursive.to_string()))],
        );
        let resp = self
            .send_ok(Self::request(Method::GET, &path), full(Bytes::new()))
            .await?;
        Ok(ndjson(resp))
    }
}

/// `/machines/{machine}/processes/{process}{rest}`.
fn process_path(machine: &str, process: &str, rest: &str) -> String {
    format!("/machines/{machine}/processes/{}{rest}", enc(process))
}

/// `/machines/{machine}/files/{endpoint}?path=…&user=…` and any further parameters.
fn files_path(
    machine: &str,
    endpoint: &str,
    path: &str,
    user: Option<&str>,
    more: &[(&str, Option<String>)],
) -> String {
    let mut params = vec![
        ("path", Some(path.to_string())),
        ("user", user.map(str::to_string)),
    ];
    params.extend(more.iter().cloned());
    format!("/machines/{machine}/files/{endpoint}{}", query(&params))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_are_encoded() {
        assert_eq!(
            files_path("m", "content", "/a b/ü&c", Some("1000"), &[("mode", None)]),
            "/machines/m/files/content?path=%2Fa%20b%2F%C3%BC%26c&user=1000"
        );
        assert_eq!(
            process_path("m", "my tag", "/output"),
            "/machines/m/processes/my%20tag/output"
        );
    }

    #[test]
    fn error_bodies_and_bare_statuses() {
        let e = api_error(
            StatusCode::CONFLICT,
            br#"{"error":"busy","code":"conflict"}"#,
        );
        assert_eq!(e.code(), Some(ErrorCode::Conflict));
        let e = api_error(StatusCode::NOT_FOUND, b"");
        assert_eq!(e.code(), Some(ErrorCode::NotFound));
        assert!(matches!(
            api_error(StatusCode::BAD_GATEWAY, b"<html>"),
            ClientError::Transport(_)
        ));
    }
}
