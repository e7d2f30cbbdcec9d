//! The host side of the agent channel: one connection per machine to the VMM's agent socket,
//! requests multiplexed by id, a reader task that routes replies and stream data.
//!
//! The reader never waits on a consumer: a reply's content is queued per stream, and the guest
//! may not have more than a credit window of it in flight (more breaks the stream), so a guest
//! cannot grow the daemon's memory by sending. Request bodies go out as credit allows.

use crate::error::{Error, Result};
use bytes::Bytes;
use hearth_proto::credit::{RecvWindow, SendWindow};
use hearth_proto::frame::{self, Decoder, Event, MAX_PAYLOAD};
use hearth_proto::{encode, ErrorKind, GuestMessage, Identity, Op, Reply, Request, MAX_MESSAGE};
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot, Notify};

/// How often the host repeats its hello while the guest boots.
const HELLO_RETRY: Duration = Duration::from_millis(250);

/// A reply and, when the reply has one, its content.
type Answer = (Reply, Option<Content>);

enum Chunk {
    Data(Bytes),
    End,
}

struct Inbound {
    tx: mpsc::UnboundedSender<Chunk>,
    window: Arc<Mutex<RecvWindow>>,
}

#[derive(Default)]
struct Outbound {
    state: Mutex<(SendWindow, bool)>,
    changed: Notify,
}

#[derive(Default)]
struct Tables {
    pending: HashMap<u64, oneshot::Sender<Answer>>,
    inbound: HashMap<u64, Inbound>,
    outbound: HashMap<u64, Arc<Outbound>>,
}

struct Shared {
    writer: Arc<tokio::sync::Mutex<OwnedWriteHalf>>,
    tables: Mutex<Tables>,
    closed: AtomicBool,
    ready: Notify,
    /// Streams to cancel towards the guest, written by one task; bounded, so a guest that
    /// floods us with replies nobody waits for cannot pile up work.
    aborts: mpsc::Sender<u64>,
    /// Benchmark calls whose reply is followed by raw bytes.
    raw: Mutex<std::collections::HashSet<u64>>,
}

impl Shared {
    fn tables(&self) -> MutexGuard<'_, Tables> {
        self.tables.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn write(&self, parts: &[&[u8]]) -> std::io::Result<()> {
        let mut w = self.writer.lock().await;
        let mut slices: Vec<std::io::IoSlice> =
            parts.iter().map(|p| std::io::IoSlice::new(p)).collect();
        let mut bufs = &mut slices[..];
        while !bufs.is_empty() {
            match w.write_vectored(bufs).await? {
                0 => return Err(std::io::ErrorKind::WriteZero.into()),
                n => std::io::IoSlice::advance_slices(&mut bufs, n),
            }
        }
        Ok(())
    }

    /// Cancels stream `id` towards the guest without waiting (for `Drop`).
    fn abort_later(&self, id: u64) {
        if !self.closed.load(Ordering::SeqCst) {
            let _ = self.aborts.try_send(id);
        }
    }

    fn close(&self) {
        let tables = {
            let mut t = self.tables();
            self.closed.store(true, Ordering::SeqCst);
            std::mem::take(&mut *t)
        };
        // Dropping the senders fails every waiting call and every open content stream at once.
        drop(tables.pending);
        drop(tables.inbound);
        for out in tables.outbound.values() {
            out.state.lock().unwrap_or_else(|e| e.into_inner()).1 = true;
            out.changed.notify_waiters();
        }
        self.ready.notify_waiters();
    }
}

pub struct AgentClient {
    shared: Arc<Shared>,
    next_id: AtomicU64,
    identity: Mutex<Option<Identity>>,
    reader: tokio::task::AbortHandle,
}

impl Drop for AgentClient {
    /// The connection ends with its client: the VMM's socket takes one host at a time, and the
    /// next client must find it free.
    fn drop(&mut self) {
        self.reader.abort();
        self.shared.close();
    }
}

impl AgentClient {
    pub async fn connect(socket: &Path) -> Result<AgentClient> {
        let stream = UnixStream::connect(socket)
            .await
            .map_err(|e| Error::unavailable(format!("agent socket {}: {e}", socket.display())))?;
        let (reader, writer) = stream.into_split();
        let writer = Arc::new(tokio::sync::Mutex::new(writer));
        // The preamble puts the guest's reader back in step and voids whatever a previous
        // connection left. It goes first (the lock is taken here) but is not waited for: a
        // guest that dies at boot never reads it, and that shows as a closed connection.
        let mut first = writer
            .clone()
            .try_lock_owned()
            .expect("a new connection's writer is free");
        let (aborts, mut abort_rx) = mpsc::channel(1024);
        let shared = Arc::new(Shared {
            writer,
            tables: Mutex::default(),
            closed: AtomicBool::new(false),
            ready: Notify::new(),
            aborts,
            raw: Mutex::default(),
        });
        let weak = Arc::downgrade(&shared);
        tokio::spawn(async move {
            while let Some(id) = abort_rx.recv().await {
                let Some(shared) = weak.upgrade() else { break };
                let _ = shared.write(&[&frame::encode_abort(id)]).await;
            }
        });
        let weak = Arc::downgrade(&shared);
        tokio::spawn(async move {
            if first.write_all(&frame::resync_preamble()).await.is_err() {
                if let Some(shared) = weak.upgrade() {
                    shared.close();
                }
            }
        });
        let reader = tokio::spawn(read_loop(reader, shared.clone())).abort_handle();
        Ok(AgentClient {
            shared,
            // Ids of a new connection must not meet the replies of an old one still on their
            // way out of the guest (a daemon restart, a restored snapshot).
            next_id: AtomicU64::new(rand::random::<u64>() >> 1),
            identity: Mutex::new(None),
            reader,
        })
    }

    /// What the agent said of itself in the handshake.
    pub fn identity(&self) -> Option<Identity> {
        self.identity
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::SeqCst)
    }

    /// A new request id with its answer awaited (and its body's credit tracked, with `body`).
    fn register(&self, body: bool) -> Result<Call> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let outbound = body.then(|| Arc::new(Outbound::default()));
        let mut t = self.shared.tables();
        if self.is_closed() {
            return Err(Error::unavailable("agent connection closed"));
        }
        t.pending.insert(id, tx);
        if let Some(out) = &outbound {
            t.outbound.insert(id, out.clone());
        }
        Ok(Call {
            shared: self.shared.clone(),
            id,
            answer: Some(rx),
            outbound,
            finished: !body,
        })
    }

    /// Sends `op`; with `body`, the caller then sends the request's body through the [`Call`].
    pub async fn request(&self, op: Op, body: bool) -> Result<Call> {
        let call = self.register(body)?;
        let wire = encode(&Request {
            id: call.id,
            op,
            body,
        });
        self.shared
            .write(&[&wire])
            .await
            .map_err(|e| Error::unavailable(format!("writing to the agent: {e}")))?;
        Ok(call)
    }

    /// Sends `op` and waits for its reply, up to `timeout` when given.
    /// The timeout covers sending too: a guest that stops reading holds the channel's writes.
    pub async fn call(&self, op: Op, timeout: Option<Duration>) -> Result<Reply> {
        let exchange = async {
            let mut call = self.request(op, false).await?;
            call.answer(None).await.map(|(reply, _)| reply)
        };
        match timeout {
            Some(t) => tokio::time::timeout(t, exchange).await.map_err(|_| {
                Error::unavailable(format!("the guest agent did not answer within {t:?}"))
            })?,
            None => exchange.await,
        }
    }

    /// Benchmark only: asks the agent for `bytes` raw bytes (of the guest's file `path`, when
    /// given), which follow its reply outside any framing; returns once they were read.
    pub async fn raw_source(&self, bytes: u64, path: Option<String>) -> Result<()> {
        let mut call = self.register(false)?;
        self.shared
            .raw
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(call.id);
        let wire = encode(&Request {
            id: call.id,
            op: Op::RawSource { bytes, path },
            body: false,
        });
        self.shared.write(&[&wire]).await?;
        call.answer(None).await.map(|_| ())
    }

    /// Benchmark only: sends `bytes` raw bytes right after a [`Op::RawSink`], outside any framing
    /// (holding the channel meanwhile), and waits for the agent to have read them (into the
    /// guest's file `path`, when given).
    pub async fn raw_sink(&self, bytes: u64, path: Option<String>) -> Result<()> {
        let mut call = self.register(false)?;
        let wire = encode(&Request {
            id: call.id,
            op: Op::RawSink { bytes, path },
            body: false,
        });
        let chunk = vec![0u8; 256 * 1024];
        {
            let mut w = self.shared.writer.lock().await;
            w.write_all(&wire).await?;
            let mut left = bytes;
            while left > 0 {
                let n = chunk.len().min(left as usize);
                w.write_all(&chunk[..n]).await?;
                left -= n as u64;
            }
        }
        call.answer(None).await.map(|_| ())
    }

    /// Says hello until the agent echoes `nonce`, the connection closes, `alive` reports the
    /// VMM gone, or `deadline` passes.
    pub async fn handshake(
        &self,
        nonce: &str,
        deadline: Instant,
        alive: impl Fn() -> bool,
    ) -> Result<()> {
        loop {
            let ready = self.shared.ready.notified();
            let mut call = self
                .request(
                    Op::Hello {
                        nonce: nonce.to_string(),
                    },
                    false,
                )
                .await?;
            let wait = HELLO_RETRY.min(deadline.saturating_duration_since(Instant::now()));
            tokio::select! {
                answer = call.answer(None) => match answer {
                    Ok((Reply::Hello { nonce: n, identity }, _)) if n == nonce => {
                        *self.identity.lock().unwrap_or_else(|e| e.into_inner()) = Some(identity);
                        return Ok(());
                    }
                    Ok((other, _)) => {
                        return Err(Error::internal(format!("unexpected hello reply: {other:?}")))
                    }
                    Err(_) => {}
                },
                // The agent just opened its port: say hello again right away.
                _ = ready => {}
                _ = tokio::time::sleep(wait) => {}
            }
            if self.is_closed() || !alive() {
                return Err(Error::unavailable(
                    "the VM exited before its agent answered",
                ));
            }
            if Instant::now() >= deadline {
                return Err(Error::unavailable("the guest agent did not answer in time"));
            }
        }
    }
}

/// One request in flight: its body (when it has one) goes out through it, its answer comes back.
/// Dropping it forgets the request and cancels an unfinished body.
pub struct Call {
    shared: Arc<Shared>,
    id: u64,
    answer: Option<oneshot::Receiver<Answer>>,
    outbound: Option<Arc<Outbound>>,
    finished: bool,
}

impl Call {
    /// Sends body bytes as the agent's credit allows; fails when the agent gave up on the body
    /// (its answer then says why) or the channel closed.
    pub async fn send(&mut self, mut data: &[u8]) -> Result<()> {
        let out = self
            .outbound
            .clone()
            .ok_or_else(|| Error::internal("this request has no body"))?;
        while !data.is_empty() {
            let changed = out.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let n = {
                let mut st = out.state.lock().unwrap_or_else(|e| e.into_inner());
                if st.1 {
                    return Err(Error::unavailable(
                        "the guest agent stopped reading the body",
                    ));
                }
                st.0.take(data.len().min(MAX_PAYLOAD))
            };
            if n == 0 {
                changed.await;
                continue;
            }
            self.shared
                .write(&[&frame::data_header(self.id, n), &data[..n]])
                .await
                .map_err(|e| Error::unavailable(format!("writing to the agent: {e}")))?;
            data = &data[n..];
        }
        Ok(())
    }

    /// Ends the body.
    pub async fn finish(&mut self) -> Result<()> {
        if self.finished {
            return Ok(());
        }
        self.finished = true;
        self.shared.tables().outbound.remove(&self.id);
        self.shared
            .write(&[&frame::encode_end(self.id)])
            .await
            .map_err(|e| Error::unavailable(format!("writing to the agent: {e}")))
    }

    /// The reply (an error reply becomes an `Err` of its kind) and its content, if any.
    pub async fn answer(&mut self, timeout: Option<Duration>) -> Result<Answer> {
        let rx = self
            .answer
            .take()
            .ok_or_else(|| Error::internal("the answer was already taken"))?;
        let answer = match timeout {
            Some(t) => tokio::time::timeout(t, rx).await.map_err(|_| {
                Error::unavailable(format!("the guest agent did not answer within {t:?}"))
            })?,
            None => rx.await,
        };
        match answer {
            Ok((Reply::Error { message, kind }, _)) => Err(agent_error(kind, message)),
            Ok(answer) => Ok(answer),
            Err(_) => Err(Error::unavailable(
                "the guest agent went away (VM stopped or crashed)",
            )),
        }
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        let unfinished = {
            let mut t = self.shared.tables();
            t.pending.remove(&self.id);
            t.outbound.remove(&self.id).is_some() && !self.finished
        };
        if unfinished {
            self.shared.abort_later(self.id);
        }
    }
}

/// The content of a reply, as the guest sends it; credit goes back as it is consumed.
/// Dropping it before the end cancels the stream.
pub struct Content {
    shared: Arc<Shared>,
    id: u64,
    rx: mpsc::UnboundedReceiver<Chunk>,
    window: Arc<Mutex<RecvWindow>>,
    ended: bool,
}

impl Content {
    /// The next piece; `None` at the end. A stream cut short (cancelled by the guest, the
    /// channel closed) is an error.
    pub async fn next(&mut self) -> Option<Result<Bytes>> {
        if self.ended {
            return None;
        }
        match self.rx.recv().await {
            Some(Chunk::Data(bytes)) => {
                let grant = self
                    .window
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .consumed(bytes.len());
                if let Some(grant) = grant {
                    if let Err(e) = self
                        .shared
                        .write(&[&frame::encode_credit(self.id, grant)])
                        .await
                    {
                        return Some(Err(Error::unavailable(format!(
                            "writing to the agent: {e}"
                        ))));
                    }
                }
                Some(Ok(bytes))
            }
            Some(Chunk::End) => {
                self.ended = true;
                None
            }
            None => {
                self.ended = true;
                Some(Err(Error::unavailable(
                    "the guest agent cut the transfer short",
                )))
            }
        }
    }
}

impl Drop for Content {
    fn drop(&mut self) {
        if !self.ended && self.shared.tables().inbound.remove(&self.id).is_some() {
            self.shared.abort_later(self.id);
        }
    }
}

/// An error reply of the agent as the API error of its kind.
fn agent_error(kind: ErrorKind, message: String) -> Error {
    let message = format!("guest agent: {message}");
    match kind {
        ErrorKind::NotFound => Error::not_found(message),
        ErrorKind::PermissionDenied => Error::forbidden(message),
        ErrorKind::Conflict => Error::conflict(message),
        ErrorKind::TooLarge => Error::too_large(message),
        ErrorKind::NoSpace => Error::insufficient_storage(message),
        ErrorKind::Invalid | ErrorKind::Failed => Error::invalid(message),
    }
}

async fn read_loop(mut reader: OwnedReadHalf, shared: Arc<Shared>) {
    let mut decoder = Decoder::new(MAX_MESSAGE);
    loop {
        decoder.buf_mut().reserve(1 << 20);
        match reader.read_buf(decoder.buf_mut()).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        while let Some(event) = decoder.next_event() {
            if !on_event(event, &shared, &mut decoder, &mut reader).await {
                shared.close();
                return;
            }
        }
    }
    shared.close();
}

/// Routes one event; false when the channel broke.
async fn on_event(
    event: Event,
    shared: &Arc<Shared>,
    decoder: &mut Decoder,
    reader: &mut OwnedReadHalf,
) -> bool {
    match event {
        Event::Message(json) => match serde_json::from_slice::<GuestMessage>(&json) {
            Ok(GuestMessage::Reply { id, body, stream }) => {
                if let Reply::Raw { bytes } = body {
                    let expected = shared
                        .raw
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&id);
                    // Raw bytes nobody asked for: the channel cannot be trusted any more.
                    if !expected || !drain_raw(decoder, reader, bytes).await {
                        return false;
                    }
                }
                let Some(tx) = shared.tables().pending.remove(&id) else {
                    // Nobody waits (the call timed out or went away): stop its content.
                    if stream {
                        shared.abort_later(id);
                    }
                    return true;
                };
                let content = stream.then(|| {
                    let (tx, rx) = mpsc::unbounded_channel();
                    let window = Arc::new(Mutex::new(RecvWindow::default()));
                    shared.tables().inbound.insert(
                        id,
                        Inbound {
                            tx,
                            window: window.clone(),
                        },
                    );
                    Content {
                        shared: shared.clone(),
                        id,
                        rx,
                        window,
                        ended: false,
                    }
                });
                // A content whose caller left meanwhile is cancelled when the answer is dropped.
                let _ = tx.send((body, content));
            }
            Ok(GuestMessage::Ready(identity)) => {
                tracing::debug!(?identity, "agent ready");
                shared.ready.notify_waiters();
            }
            Err(e) => tracing::debug!("bad agent message: {e}"),
        },
        // An empty frame carries nothing and costs no credit: nothing to queue.
        Event::Data { payload, .. } if payload.is_empty() => {}
        Event::Data { stream, payload } => {
            let mut t = shared.tables();
            if let Some(inb) = t.inbound.get(&stream) {
                let ok = inb
                    .window
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .received(payload.len())
                    .is_ok();
                if ok {
                    // A copy: a slice would keep the whole read buffer it came from alive.
                    let _ = inb.tx.send(Chunk::Data(Bytes::copy_from_slice(&payload)));
                } else {
                    // Past its credit: the guest broke the stream; it ends in an error.
                    tracing::warn!(stream, "the guest agent sent past its credit");
                    t.inbound.remove(&stream);
                    drop(t);
                    shared.abort_later(stream);
                }
            }
        }
        Event::End { stream } => {
            if let Some(inb) = shared.tables().inbound.remove(&stream) {
                let _ = inb.tx.send(Chunk::End);
            }
        }
        Event::Credit { stream, bytes } => {
            if let Some(out) = shared.tables().outbound.get(&stream) {
                out.state
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .0
                    .grant(bytes);
                out.changed.notify_waiters();
            }
        }
        Event::Abort { stream } => {
            let (inb, out) = {
                let mut t = shared.tables();
                (t.inbound.remove(&stream), t.outbound.remove(&stream))
            };
            drop(inb);
            if let Some(out) = out {
                out.state.lock().unwrap_or_else(|e| e.into_inner()).1 = true;
                out.changed.notify_waiters();
            }
        }
        // Only a host resets the channel.
        Event::Reset => {}
    }
    true
}

/// Consumes a benchmark's raw bytes, which follow its reply outside any framing.
async fn drain_raw(decoder: &mut Decoder, reader: &mut OwnedReadHalf, bytes: u64) -> bool {
    let mut left = bytes - decoder.take_raw(bytes as usize).len() as u64;
    let mut buf = vec![0u8; 256 * 1024];
    while left > 0 {
        let want = buf.len().min(left as usize);
        match reader.read(&mut buf[..want]).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => left -= n as u64,
        }
    }
    true
}
