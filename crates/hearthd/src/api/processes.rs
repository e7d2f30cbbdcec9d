//! Process routes: start, list, output (NDJSON), stdin, signal, resize, and the attach
//! WebSocket that an interactive client (`hearth exec -it`) holds.

use super::{query, ApiJson};
use crate::error::{Error, Result};
use crate::service::Service;
use axum::body::{Body, Bytes};
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use futures_util::{SinkExt, Stream, StreamExt};
use hearth_api::{
    attach_stream_byte, AttachControl, OutputEvent, ProcessEnvelope, ProcessList, ResizeRequest,
    SignalRequest, StartProcess,
};
use serde::Deserialize;
use std::sync::Arc;

type Svc = State<Arc<Service>>;

pub async fn start(
    State(svc): Svc,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<StartProcess>,
) -> Result<(StatusCode, Json<ProcessEnvelope>)> {
    let process = svc.start_process(&id, req).await?;
    Ok((StatusCode::CREATED, Json(ProcessEnvelope { process })))
}

pub async fn list(State(svc): Svc, Path(id): Path<String>) -> Result<Json<ProcessList>> {
    Ok(Json(ProcessList {
        processes: svc.list_processes(&id).await?,
    }))
}

pub async fn get(
    State(svc): Svc,
    Path((id, process)): Path<(String, String)>,
) -> Result<Json<ProcessEnvelope>> {
    Ok(Json(ProcessEnvelope {
        process: svc.get_process(&id, &process).await?,
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputQuery {
    #[serde(default)]
    offset: u64,
    #[serde(default)]
    follow: bool,
}

/// The output as NDJSON events; an error before the first event is an error status.
pub async fn output(
    State(svc): Svc,
    Path((id, process)): Path<(String, String)>,
    q: std::result::Result<Query<OutputQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response> {
    let Query(q) = query(q)?;
    let mut events = Box::pin(svc.process_output(&id, &process, q.offset, q.follow));
    let first = events.next().await.transpose()?;
    let lines = futures_util::stream::iter(first.map(Ok))
        .chain(events)
        .map(|ev| ev.map(ndjson_line).map_err(std::io::Error::other));
    Ok(ndjson(lines))
}

pub(super) fn ndjson_line<T: serde::Serialize>(ev: T) -> Bytes {
    let mut line = serde_json::to_vec(&ev).expect("events serialize");
    line.push(b'\n');
    Bytes::from(line)
}

pub(super) fn ndjson(
    lines: impl Stream<Item = std::io::Result<Bytes>> + Send + 'static,
) -> Response {
    let mut resp = Response::new(Body::from_stream(lines));
    resp.headers_mut().insert(
        "content-type",
        HeaderValue::from_static("application/x-ndjson"),
    );
    resp
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StdinQuery {
    #[serde(default)]
    close: bool,
}

pub async fn stdin(
    State(svc): Svc,
    Path((id, process)): Path<(String, String)>,
    q: std::result::Result<Query<StdinQuery>, axum::extract::rejection::QueryRejection>,
    body: Body,
) -> Result<StatusCode> {
    let Query(q) = query(q)?;
    let limit = crate::service::MAX_STDIN;
    let data = axum::body::to_bytes(body, limit).await.map_err(|_| {
        Error::too_large(format!(
            "a stdin write may carry at most {limit} bytes (or the body could not be read)"
        ))
    })?;
    svc.process_stdin(&id, &process, &data, q.close).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn signal(
    State(svc): Svc,
    Path((id, process)): Path<(String, String)>,
    ApiJson(req): ApiJson<SignalRequest>,
) -> Result<StatusCode> {
    let signal = req.signal.number().map_err(Error::invalid)?;
    svc.signal_process(&id, &process, signal).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn resize(
    State(svc): Svc,
    Path((id, process)): Path<(String, String)>,
    ApiJson(req): ApiJson<ResizeRequest>,
) -> Result<StatusCode> {
    svc.resize_process(&id, &process, req.cols, req.rows)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachQuery {
    #[serde(default)]
    offset: u64,
}

/// Upgrades to a WebSocket once the process is known (a missing one is a plain 404).
pub async fn attach(
    State(svc): Svc,
    Path((id, process)): Path<(String, String)>,
    q: std::result::Result<Query<AttachQuery>, axum::extract::rejection::QueryRejection>,
    ws: WebSocketUpgrade,
) -> Result<Response> {
    let Query(q) = query(q)?;
    let info = svc.get_process(&id, &process).await?;
    // The pid, not the tag: a tag may pass to a newer process while this one is attached.
    let pid = info.pid.to_string();
    Ok(ws
        .on_upgrade(move |socket| session(svc, id, pid, q.offset, socket))
        .into_response())
}

/// Output goes to the client while its input goes to the process, until the process exits
/// (the server closes) or the client goes away (the process runs on).
async fn session(svc: Arc<Service>, id: String, pid: String, offset: u64, socket: WebSocket) {
    let (mut tx, mut rx) = socket.split();
    let output = async {
        let mut events = Box::pin(svc.process_output(&id, &pid, offset, true));
        while let Some(ev) = events.next().await {
            let msg = match ev {
                Ok(OutputEvent::Output {
                    stream,
                    data_base64,
                    ..
                }) => {
                    let Ok(data) = B64.decode(data_base64) else {
                        continue;
                    };
                    let mut frame = Vec::with_capacity(data.len() + 1);
                    frame.push(attach_stream_byte(stream));
                    frame.extend_from_slice(&data);
                    Message::Binary(frame.into())
                }
                Ok(ev) => Message::Text(
                    String::from_utf8_lossy(&ndjson_line(ev))
                        .trim_end()
                        .to_string()
                        .into(),
                ),
                Err(e) => {
                    let _ = tx
                        .send(Message::Text(
                            serde_json::json!({"type": "error", "error": e.message})
                                .to_string()
                                .into(),
                        ))
                        .await;
                    break;
                }
            };
            if tx.send(msg).await.is_err() {
                return;
            }
        }
        let _ = tx.send(Message::Close(None)).await;
    };
    let input = async {
        while let Some(Ok(msg)) = rx.next().await {
            let done = match msg {
                Message::Binary(data) => svc.process_stdin(&id, &pid, &data, false).await,
                Message::Text(text) => match serde_json::from_str::<AttachControl>(&text) {
                    Ok(AttachControl::Resize { cols, rows }) => {
                        svc.resize_process(&id, &pid, cols, rows).await
                    }
                    Ok(AttachControl::Signal { signal }) => match signal.number() {
                        Ok(n) => svc.signal_process(&id, &pid, n).await,
                        Err(e) => Err(Error::invalid(e)),
                    },
                    Ok(AttachControl::CloseStdin) => svc.process_stdin(&id, &pid, &[], true).await,
                    Err(e) => Err(Error::invalid(format!("bad control message: {e}"))),
                },
                Message::Close(_) => break,
                Message::Ping(_) | Message::Pong(_) => Ok(()),
            };
            // A write to a process that already exited is not the client's error to end on.
            if let Err(e) = done {
                tracing::debug!(machine = %id, pid, "attach input: {}", e.message);
            }
        }
    };
    tokio::select! {
        _ = output => {}
        _ = input => {}
    }
}
