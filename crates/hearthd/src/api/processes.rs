//! Process routes: start, list, output (NDJSON), stdin, signal, resize, and the attach
//! WebSocket that an interactive client (`hearth exec -it`) holds.

use super::{query, ApiJson};
use crate::error::{Error, Result};
use crate::service::{Service, MAX_STDIN};
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
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

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
    // A missing process or machine is an error status; after the headers, the events (which
    // may be long in coming) carry the rest.
    svc.get_process(&id, &process).await?;
    let events = svc.process_output(&id, &process, q.offset, q.follow);
    let lines = events.map(|ev| ev.map(ndjson_line).map_err(std::io::Error::other));
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
    let data = read_stdin(body).await?;
    svc.process_stdin(&id, &process, &data, q.close).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A stdin body, whole: 413 past [`MAX_STDIN`], 400 when it could not be read (the client went
/// away in the middle of it).
async fn read_stdin(body: Body) -> Result<Bytes> {
    axum::body::to_bytes(body, MAX_STDIN).await.map_err(|e| {
        let e = e.into_inner();
        if e.is::<http_body_util::LengthLimitError>() {
            Error::too_large(format!("a stdin write may carry at most {MAX_STDIN} bytes"))
        } else {
            Error::invalid(format!("reading the stdin body: {e}"))
        }
    })
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
    Ok(limited(ws)
        .on_upgrade(move |socket| session(svc, id, pid, q.offset, socket))
        .into_response())
}

/// A client's message, and each frame of it, is at most what one stdin write carries (axum's
/// default, 64 MiB, is what it would make the daemon hold).
fn limited(ws: WebSocketUpgrade) -> WebSocketUpgrade {
    ws.max_message_size(MAX_STDIN).max_frame_size(MAX_STDIN)
}

/// Stdin from an attached client on its way to the process, in order, its close included (a
/// close that overtook data still queued would lose it). At most `bytes` (and [`STDIN_QUEUE`]
/// messages) wait: a client that sends faster than the process reads is held back, not
/// buffered. Each message's share is given back once it was written.
struct StdinQueue {
    tx: mpsc::Sender<StdinItem>,
    room: Arc<Semaphore>,
    bytes: usize,
}

/// Messages an attach session queues for the process, whatever their size.
const STDIN_QUEUE: usize = 64;

/// Bytes for the process, whether its stdin closes after them, and their share of the queue.
type StdinItem = (Bytes, bool, OwnedSemaphorePermit);

fn stdin_queue(bytes: usize) -> (StdinQueue, mpsc::Receiver<StdinItem>) {
    let (tx, rx) = mpsc::channel(STDIN_QUEUE);
    let room = Arc::new(Semaphore::new(bytes));
    (StdinQueue { tx, room, bytes }, rx)
}

impl StdinQueue {
    /// Queues `data` once there is room for it; false when nobody writes any more.
    async fn push(&self, data: Bytes) -> bool {
        self.send(data, false).await
    }

    /// Queues the close of stdin, behind what was queued before it.
    async fn close(&self) -> bool {
        self.send(Bytes::new(), true).await
    }

    async fn send(&self, data: Bytes, close: bool) -> bool {
        // A message is never larger than the queue (`limited`); were it, it waits for an empty
        // queue rather than for ever.
        let share = u32::try_from(data.len().min(self.bytes)).unwrap_or(u32::MAX);
        let Ok(permit) = self.room.clone().acquire_many_owned(share).await else {
            return false;
        };
        self.tx.send((data, close, permit)).await.is_ok()
    }
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
    // Stdin is written in order by one task; controls (a resize, a signal) do not wait behind a
    // write that a process is slow to read.
    let (stdin_tx, mut stdin_rx) = stdin_queue(MAX_STDIN);
    let stdin = async {
        while let Some((data, close, _share)) = stdin_rx.recv().await {
            if let Err(e) = svc.process_stdin(&id, &pid, &data, close).await {
                tracing::debug!(machine = %id, pid, "attach stdin: {}", e.message);
            }
        }
        std::future::pending::<()>().await
    };
    let input = async {
        while let Some(Ok(msg)) = rx.next().await {
            let done = match msg {
                Message::Binary(data) => {
                    if !stdin_tx.push(data).await {
                        break;
                    }
                    Ok(())
                }
                Message::Text(text) => match serde_json::from_str::<AttachControl>(&text) {
                    Ok(AttachControl::Resize { cols, rows }) => {
                        svc.resize_process(&id, &pid, cols, rows).await
                    }
                    Ok(AttachControl::Signal { signal }) => match signal.number() {
                        Ok(n) => svc.signal_process(&id, &pid, n).await,
                        Err(e) => Err(Error::invalid(e)),
                    },
                    Ok(AttachControl::CloseStdin) => {
                        if !stdin_tx.close().await {
                            break;
                        }
                        Ok(())
                    }
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
        _ = stdin => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hearth_api::ErrorCode;
    use tokio_tungstenite::tungstenite::Message as ClientMessage;

    #[tokio::test]
    async fn a_stdin_body_past_the_limit_is_413_and_one_cut_short_400() {
        let whole = read_stdin(Body::from(vec![7u8; MAX_STDIN])).await.unwrap();
        assert_eq!(whole.len(), MAX_STDIN);
        let err = read_stdin(Body::from(vec![7u8; MAX_STDIN + 1]))
            .await
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::TooLarge, "{err}");
        // A client that hangs up in the middle of its body.
        let cut = futures_util::stream::iter([
            Ok(Bytes::from_static(b"abc")),
            Err(std::io::Error::from(std::io::ErrorKind::ConnectionReset)),
        ]);
        let err = read_stdin(Body::from_stream(cut)).await.unwrap_err();
        assert_eq!(err.code, ErrorCode::Invalid, "{err}");
    }

    #[tokio::test]
    async fn an_attach_message_past_the_stdin_limit_ends_the_session() {
        // The attach route's limits on a session that answers each message with its length.
        let app = axum::Router::new().route(
            "/ws",
            axum::routing::get(|ws: WebSocketUpgrade| async {
                limited(ws).on_upgrade(|mut socket| async move {
                    while let Some(Ok(Message::Binary(data))) = socket.recv().await {
                        let len = Message::Text(data.len().to_string().into());
                        if socket.send(len).await.is_err() {
                            break;
                        }
                    }
                })
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut ws, _) = tokio_tungstenite::client_async(format!("ws://{addr}/ws"), tcp)
            .await
            .unwrap();
        ws.send(ClientMessage::binary(vec![1u8; MAX_STDIN]))
            .await
            .unwrap();
        let answer = ws.next().await.unwrap().unwrap();
        assert_eq!(answer, ClientMessage::text(MAX_STDIN.to_string()));
        // One byte more: refused from its header, never read whole; the session ends.
        let _ = ws
            .send(ClientMessage::binary(vec![1u8; MAX_STDIN + 1]))
            .await;
        match ws.next().await {
            Some(Ok(ClientMessage::Text(len))) => panic!("a message of {len} bytes was taken"),
            end => assert!(
                matches!(end, None | Some(Err(_)) | Some(Ok(ClientMessage::Close(_)))),
                "{end:?}"
            ),
        }
    }

    #[tokio::test]
    async fn attached_stdin_waits_for_room_counted_in_bytes() {
        let (queue, mut rx) = stdin_queue(100);
        assert!(queue.push(Bytes::from(vec![0u8; 60])).await);
        // 60 more bytes do not fit beside the first 60: the client is held back…
        let second = queue.push(Bytes::from(vec![1u8; 60]));
        tokio::pin!(second);
        assert!(futures_util::poll!(second.as_mut()).is_pending());
        // …until the first was written.
        let (first, _, share) = rx.recv().await.unwrap();
        assert_eq!(first.len(), 60);
        assert!(futures_util::poll!(second.as_mut()).is_pending());
        drop(share);
        assert!(second.await);
        assert_eq!(rx.recv().await.unwrap().0.len(), 60);
        // A close queues behind the data before it.
        assert!(queue.close().await);
        let (data, close, _) = rx.recv().await.unwrap();
        assert!(data.is_empty() && close);
        // Once nobody writes, a push says so instead of waiting.
        drop(rx);
        assert!(!queue.push(Bytes::from_static(b"x")).await);
    }
}
