//! The host side of the agent channel: one connection per machine to the VMM's agent socket,
//! requests multiplexed by id, a reader task that routes replies and stream data.
//!
//! The reader never waits on a consumer: a reply's content is queued per stream, and the guest
//! may not have more than a credit window of it in flight (more breaks the stream), so a guest
//! cannot grow the daemon's memory by sending: a message past [`MAX_MESSAGE`] is dropped as it
//! arrives, replies nobody waits for and data for streams nobody reads are dropped, and a
//! stream exists only for a call the host made. Request bodies go out as credit allows. A guest
//! that stops reading cannot hold the host either: a write that makes no progress for
//! [`WRITE_STALL`] closes the connection, failing every call on it.

use crate::error::{Error, Result};
use bytes::{Bytes, BytesMut};
use futures_util::stream::{FuturesUnordered, StreamExt};
use hearth_proto::credit::{RecvWindow, SendWindow};
use hearth_proto::frame::{self, Decoder, Event, HEADER_LEN, MAX_PAYLOAD, RESYNC_PADDING};
use hearth_proto::{
    encode, Configure, ErrorKind, GuestMessage, Identity, Op, Reply, Request, MAX_MESSAGE,
};
use nix::sys::socket::{setsockopt, sockopt};
use std::collections::{HashMap, VecDeque};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot, Notify};

/// How often the host repeats its hello while the guest boots.
const HELLO_RETRY: Duration = Duration::from_millis(250);

/// How long a write to the guest may wait for it to read before the connection is given up.
/// Generous: a guest under load, or paused for a snapshot, reads late.
pub const WRITE_STALL: Duration = Duration::from_secs(30);

/// A reply and, when the reply has one, its content.
type Answer = (Reply, Option<Content>);

/// A reply's content between the reader task and its consumer: the pieces not taken yet, and
/// how the stream ended. Data that arrives while the last piece waits is appended to it, up to
/// a frame's size, so what a stream holds is about its bytes whatever the frames: queued one
/// by one, a guest's one-byte frames would cost some 80 bytes of memory per byte of credit.
#[derive(Default)]
struct Pipe {
    state: Mutex<PipeState>,
    ready: Notify,
}

#[derive(Default)]
struct PipeState {
    pieces: VecDeque<BytesMut>,
    /// `Some(true)` once the stream ended, `Some(false)` once it was cut short.
    end: Option<bool>,
}

impl Pipe {
    fn state(&self) -> MutexGuard<'_, PipeState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, data: &[u8]) {
        {
            let mut st = self.state();
            match st.pieces.back_mut() {
                Some(last) if last.len() + data.len() <= MAX_PAYLOAD => {
                    last.extend_from_slice(data)
                }
                // A copy: a slice would keep the whole read buffer it came from alive.
                _ => st.pieces.push_back(BytesMut::from(data)),
            }
        }
        self.ready.notify_one();
    }

    /// The stream ended (`clean`) or was cut short; the first word stands.
    fn end(&self, clean: bool) {
        self.state().end.get_or_insert(clean);
        self.ready.notify_one();
    }
}

struct Inbound {
    pipe: Arc<Pipe>,
    window: Arc<Mutex<RecvWindow>>,
}

impl Drop for Inbound {
    /// A stream forgotten before its end (cancelled by the guest, past its credit, the channel
    /// closed) ends its content in an error.
    fn drop(&mut self) {
        self.pipe.end(false);
    }
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
    /// The connection's socket, to shut down both ways when it is given up: the reader then
    /// ends, a write stuck on a guest that does not read fails, and the VMM sees the host gone.
    /// Open as long as `writer` is, which `Shared` owns.
    fd: std::os::fd::RawFd,
    write_stall: Duration,
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

    /// Writes one frame (or message) whole. Waiting for the writer is not limited (the writer
    /// ahead makes progress or is cut off), but once this one writes, the guest must take some
    /// bytes every [`WRITE_STALL`] or the connection is closed.
    async fn write(&self, parts: &[&[u8]]) -> std::io::Result<()> {
        let mut w = self.writer.lock().await;
        if self.closed.load(Ordering::SeqCst) {
            return Err(std::io::ErrorKind::BrokenPipe.into());
        }
        self.write_locked(&mut w, parts).await
    }

    /// Writes `parts` whole on the writer, which the caller holds; closes the connection when
    /// the guest takes nothing for the stall timeout.
    async fn write_locked(&self, w: &mut OwnedWriteHalf, parts: &[&[u8]]) -> std::io::Result<()> {
        let mut slices: Vec<std::io::IoSlice> =
            parts.iter().map(|p| std::io::IoSlice::new(p)).collect();
        let mut bufs = &mut slices[..];
        while !bufs.is_empty() {
            let written = tokio::time::timeout(self.write_stall, w.write_vectored(bufs)).await;
            match written {
                Err(_) => {
                    tracing::warn!(
                        "the guest agent read nothing for {:?}: closing its connection",
                        self.write_stall
                    );
                    self.close();
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("the guest did not read for {:?}", self.write_stall),
                    ));
                }
                Ok(Ok(0)) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(Ok(n)) => std::io::IoSlice::advance_slices(&mut bufs, n),
                Ok(Err(e)) => return Err(e),
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

    /// A call got no answer in its time: the channel is closed, so that the next call
    /// connects again and resynchronises. A guest that lost its replies (one that wrote
    /// garbage onto its own port, measured: its channel stayed silent until the daemon
    /// reconnected) thus answers again; the calls still waiting fail now rather than later.
    fn unanswered(&self, limit: Duration) -> Error {
        tracing::warn!("the guest agent did not answer within {limit:?}; reconnecting");
        self.close();
        Error::unavailable(format!("the guest agent did not answer within {limit:?}"))
    }

    fn close(&self) {
        let tables = {
            let mut t = self.tables();
            self.closed.store(true, Ordering::SeqCst);
            std::mem::take(&mut *t)
        };
        // `fd` is open: `self` owns the write half.
        let _ = nix::sys::socket::shutdown(self.fd, nix::sys::socket::Shutdown::Both);
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
    /// A client on a new connection to the agent's channel (from [`crate::vmm::Vmm`]).
    pub fn new(stream: UnixStream) -> AgentClient {
        // Room for the preamble in the kernel: QEMU reads nothing until the guest opens its
        // port, and a guest still booting has not stopped reading. Where the kernel allows less,
        // the preamble waits for the guest, under the stall timeout like every write.
        let room = 2 * (RESYNC_PADDING + HEADER_LEN);
        if setsockopt(&stream, sockopt::SndBufForce, &room).is_err() {
            let _ = setsockopt(&stream, sockopt::SndBuf, &room);
        }
        AgentClient::over(stream, WRITE_STALL)
    }

    /// A client on a connected stream, giving up on a guest that reads nothing for
    /// `write_stall`.
    pub fn over(stream: UnixStream, write_stall: Duration) -> AgentClient {
        let fd = stream.as_raw_fd();
        let (reader, writer) = stream.into_split();
        let writer = Arc::new(tokio::sync::Mutex::new(writer));
        // The preamble puts the guest's reader back in step and voids whatever a previous
        // connection left. It goes first (the lock is taken here) but is not waited for: a
        // guest that dies at boot never reads it, and that shows as a closed connection; one
        // that does not read it is cut off like any other write.
        let mut first = writer
            .clone()
            .try_lock_owned()
            .expect("a new connection's writer is free");
        let (aborts, mut abort_rx) = mpsc::channel(1024);
        let shared = Arc::new(Shared {
            writer,
            fd,
            write_stall,
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
            let Some(shared) = weak.upgrade() else { return };
            if shared
                .write_locked(&mut first, &[&frame::resync_preamble()])
                .await
                .is_err()
            {
                shared.close();
            }
        });
        let reader = tokio::spawn(read_loop(reader, shared.clone())).abort_handle();
        AgentClient {
            shared,
            // Ids of a new connection must not meet the replies of an old one still on their
            // way out of the guest (a daemon restart, a restored snapshot).
            next_id: AtomicU64::new(rand::random::<u64>() >> 1),
            identity: Mutex::new(None),
            reader,
        }
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
        // The agent drops a larger message unread: the call would wait for nothing.
        if wire.len() > MAX_MESSAGE + MAX_MESSAGE / MAX_PAYLOAD * HEADER_LEN {
            return Err(Error::too_large(format!(
                "the request is about {} bytes, more than the guest agent takes in one message \
                 ({MAX_MESSAGE})",
                wire.len()
            )));
        }
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
            Some(t) => tokio::time::timeout(t, exchange)
                .await
                .map_err(|_| self.shared.unanswered(t))?,
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
    /// VMM gone, or `deadline` passes: whatever the guest does, it returns by `deadline` (a
    /// guest that reads nothing holds a hello's write, not the caller). Each hello carries
    /// `configure()` (made anew, so its clock is the moment it is sent): an agent that lists
    /// [`hearth_proto::FEATURE_HELLO_CONFIGURE`] applies it before it answers, and answers an
    /// error, returned here, when that fails; others ignore it.
    pub async fn handshake(
        &self,
        nonce: &str,
        deadline: Instant,
        alive: impl Fn() -> bool,
        configure: impl Fn() -> Option<Configure>,
    ) -> Result<()> {
        let late = || Error::unavailable("the guest agent did not answer in time");
        // Every hello sent stays awaited: a slow guest's answer to an earlier one counts.
        let mut answers = FuturesUnordered::new();
        tokio::time::timeout_at(deadline.into(), async {
            loop {
                let ready = self.shared.ready.notified();
                let mut call = self
                    .request(
                        Op::Hello {
                            nonce: nonce.to_string(),
                            configure: configure(),
                        },
                        false,
                    )
                    .await?;
                answers.push(async move { call.answer(None).await });
                let wait = HELLO_RETRY.min(deadline.saturating_duration_since(Instant::now()));
                tokio::select! {
                    Some(answer) = answers.next() => match answer {
                        Ok((Reply::Hello { nonce: n, identity }, _)) if n == nonce => {
                            *self.identity.lock().unwrap_or_else(|e| e.into_inner()) =
                                Some(identity);
                            return Ok(());
                        }
                        Ok((other, _)) => {
                            return Err(Error::internal(format!(
                                "unexpected hello reply: {other:?}"
                            )))
                        }
                        // The agent answered, with the error its configure met.
                        Err(e) if !self.is_closed() => return Err(e),
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
                    return Err(late());
                }
            }
        })
        .await
        .unwrap_or_else(|_| Err(late()))
    }

    /// The agent listed `feature` in its hello (`hearth_proto::FEATURE_*`).
    pub fn has_feature(&self, feature: &str) -> bool {
        self.identity()
            .is_some_and(|i| i.features.iter().any(|f| f == feature))
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
            Some(t) => tokio::time::timeout(t, rx)
                .await
                .map_err(|_| self.shared.unanswered(t))?,
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
        self.shared
            .raw
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
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
    pipe: Arc<Pipe>,
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
        let bytes = loop {
            {
                let mut st = self.pipe.state();
                if let Some(piece) = st.pieces.pop_front() {
                    break piece.freeze();
                }
                match st.end {
                    Some(true) => {
                        self.ended = true;
                        return None;
                    }
                    Some(false) => {
                        self.ended = true;
                        return Some(Err(Error::unavailable(
                            "the guest agent cut the transfer short",
                        )));
                    }
                    None => {}
                }
            }
            self.pipe.ready.notified().await;
        };
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
                    let pipe = Arc::new(Pipe::default());
                    let window = Arc::new(Mutex::new(RecvWindow::default()));
                    shared.tables().inbound.insert(
                        id,
                        Inbound {
                            pipe: pipe.clone(),
                            window: window.clone(),
                        },
                    );
                    Content {
                        shared: shared.clone(),
                        id,
                        pipe,
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
                    inb.pipe.push(&payload);
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
                inb.pipe.end(true);
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

#[cfg(test)]
mod tests {
    //! The host side against a guest played by the test on the other end of a socket pair:
    //! what a hostile or broken guest sends, and a guest that stops reading.

    use super::*;
    use hearth_proto::credit::WINDOW;
    use hearth_proto::{FEATURE_CONFIGURE_THAW, FEATURE_HELLO_CONFIGURE};

    struct Guest {
        stream: UnixStream,
        decoder: Decoder,
    }

    impl Guest {
        /// Reads until the host's next request (skipping its preamble and other frames).
        async fn request(&mut self) -> Request {
            loop {
                while let Some(event) = self.decoder.next_event() {
                    if let Event::Message(json) = event {
                        return serde_json::from_slice(&json).unwrap();
                    }
                }
                self.decoder.buf_mut().reserve(1 << 16);
                let n = self.stream.read_buf(self.decoder.buf_mut()).await.unwrap();
                assert!(n > 0, "the host closed the connection");
            }
        }

        /// Reads until `want` holds for an event, or the host closes the connection.
        async fn until(&mut self, want: impl Fn(&Event) -> bool) -> bool {
            loop {
                while let Some(event) = self.decoder.next_event() {
                    if want(&event) {
                        return true;
                    }
                }
                self.decoder.buf_mut().reserve(1 << 16);
                match self.stream.read_buf(self.decoder.buf_mut()).await {
                    Ok(0) | Err(_) => return false,
                    Ok(_) => {}
                }
            }
        }

        async fn send(&mut self, wire: &[u8]) {
            self.stream.write_all(wire).await.unwrap();
        }

        async fn reply(&mut self, id: u64, body: Reply, stream: bool) {
            self.send(&encode(&GuestMessage::Reply { id, body, stream }))
                .await;
        }
    }

    fn connected(write_stall: Duration) -> (AgentClient, Guest) {
        let (host, guest) = UnixStream::pair().unwrap();
        let guest = Guest {
            stream: guest,
            decoder: Decoder::new(MAX_MESSAGE),
        };
        (AgentClient::over(host, write_stall), guest)
    }

    fn tables_empty(client: &AgentClient) -> bool {
        let t = client.shared.tables();
        t.pending.is_empty() && t.inbound.is_empty() && t.outbound.is_empty()
    }

    const LONG: Option<Duration> = Some(Duration::from_secs(60));

    /// A first frame (a part) and a last frame of a message, to send a message of any length.
    fn message_frames() -> (Vec<u8>, Vec<u8>) {
        let mut wire = Vec::new();
        frame::encode_message(&vec![b' '; 2 * MAX_PAYLOAD], &mut wire);
        let (part, last) = wire.split_at(HEADER_LEN + MAX_PAYLOAD);
        (part.to_vec(), last.to_vec())
    }

    #[tokio::test]
    async fn an_endless_message_is_dropped_and_the_channel_goes_on() {
        let (client, mut guest) = connected(WRITE_STALL);
        let guest_side = async {
            let req = guest.request().await;
            // Twice the largest message, frame after frame, then its end.
            let (part, last) = message_frames();
            for _ in 0..2 * MAX_MESSAGE / MAX_PAYLOAD {
                guest.send(&part).await;
            }
            guest.send(&last).await;
            guest.reply(req.id, Reply::Done, false).await;
        };
        let (reply, ()) = tokio::join!(client.call(Op::Sync, LONG), guest_side);
        assert_eq!(reply.unwrap(), Reply::Done);
        assert!(tables_empty(&client));
    }

    #[tokio::test]
    async fn replies_and_data_nobody_asked_for_are_dropped() {
        let (client, mut guest) = connected(WRITE_STALL);
        let guest_side = async {
            let req = guest.request().await;
            for id in 0..5000 {
                guest.reply(req.id + 1 + id, Reply::Done, id % 2 == 0).await;
            }
            let payload = vec![7u8; MAX_PAYLOAD];
            for stream in 0..200 {
                guest.send(&frame::data_header(stream, payload.len())).await;
                guest.send(&payload).await;
                guest.send(&frame::encode_end(stream)).await;
                guest.send(&frame::encode_credit(stream, u32::MAX)).await;
                guest.send(&frame::encode_abort(stream)).await;
            }
            guest.reply(req.id, Reply::Done, false).await;
        };
        let (reply, ()) = tokio::join!(client.call(Op::Sync, LONG), guest_side);
        assert_eq!(reply.unwrap(), Reply::Done);
        assert!(tables_empty(&client));
        // The channel still serves calls.
        let guest_side = async {
            let req = guest.request().await;
            guest.reply(req.id, Reply::Done, false).await;
        };
        let (reply, ()) = tokio::join!(client.call(Op::Sync, LONG), guest_side);
        assert_eq!(reply.unwrap(), Reply::Done);
        assert!(tables_empty(&client));
    }

    #[tokio::test]
    async fn content_past_its_credit_ends_the_stream_and_no_more_is_held() {
        let (client, mut guest) = connected(WRITE_STALL);
        let guest_side = async {
            let req = guest.request().await;
            guest.reply(req.id, Reply::Streaming, true).await;
            let payload = vec![1u8; MAX_PAYLOAD];
            // A window's worth and then more, without waiting for credit.
            for _ in 0..WINDOW as usize / MAX_PAYLOAD + 8 {
                guest.send(&frame::data_header(req.id, payload.len())).await;
                guest.send(&payload).await;
            }
            guest.send(&frame::encode_end(req.id)).await;
            // The host cancels the stream it could not hold.
            let id = req.id;
            assert!(guest.until(|e| *e == Event::Abort { stream: id }).await);
        };
        let host_side = async {
            let mut call = client.request(Op::Sync, false).await.unwrap();
            let (_, content) = call.answer(None).await.unwrap();
            (call, content.unwrap())
        };
        let ((_call, mut content), ()) = tokio::join!(host_side, guest_side);
        let mut received = 0;
        let ended = loop {
            match content.next().await {
                Some(Ok(bytes)) => received += bytes.len(),
                Some(Err(e)) => break e,
                None => panic!("the stream ended normally after {received} bytes"),
            }
        };
        assert_eq!(received, WINDOW as usize, "{ended}");
        drop(content);
        drop(_call);
        assert!(tables_empty(&client));
    }

    /// This process's resident memory, in bytes.
    fn rss() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap();
        kb << 10
    }

    #[tokio::test]
    async fn a_window_of_one_byte_frames_costs_about_its_bytes() {
        let (client, mut guest) = connected(WRITE_STALL);
        let guest_side = async {
            let req = guest.request().await;
            guest.reply(req.id, Reply::Streaming, true).await;
            // A whole window in frames of one byte each, as fast as the socket takes them,
            // then the answer to a later call: by then the host has taken every frame in.
            let mut batch = Vec::new();
            for i in 0..1 << 16 {
                batch.extend_from_slice(&frame::data_header(req.id, 1));
                batch.push(i as u8);
            }
            for _ in 0..WINDOW >> 16 {
                guest.send(&batch).await;
            }
            let later = guest.request().await;
            guest.reply(later.id, Reply::Done, false).await;
        };
        let host_side = async {
            let mut call = client.request(Op::Sync, false).await.unwrap();
            let (_, content) = call.answer(None).await.unwrap();
            let before = rss();
            let later = client.call(Op::Sync, LONG).await.unwrap();
            assert_eq!(later, Reply::Done);
            (call, content.unwrap(), rss().saturating_sub(before))
        };
        let ((_call, mut content, grown), ()) = tokio::join!(host_side, guest_side);
        eprintln!("{} MiB held for a window of one-byte frames", grown >> 20);
        assert!(
            grown < 64 << 20,
            "the host grew by {} MiB holding {} bytes of content",
            grown >> 20,
            WINDOW
        );
        // Every byte is there, in order.
        let mut received = 0usize;
        while received < WINDOW as usize {
            let piece = content.next().await.unwrap().unwrap();
            for (k, b) in piece.iter().enumerate() {
                assert_eq!(*b, (received + k) as u8, "byte {}", received + k);
            }
            received += piece.len();
        }
        assert_eq!(received, WINDOW as usize);
    }

    #[tokio::test]
    async fn a_guest_that_stops_reading_is_cut_off() {
        let stall = Duration::from_millis(300);
        let (client, mut guest) = connected(stall);
        // It reads the preamble, and nothing after it.
        let mut preamble = vec![0u8; RESYNC_PADDING + HEADER_LEN];
        guest.stream.read_exact(&mut preamble).await.unwrap();
        let big = Op::Hello {
            nonce: "x".repeat(MAX_MESSAGE / 2),
            configure: None,
        };
        let started = Instant::now();
        let err = tokio::time::timeout(Duration::from_secs(20), client.call(big, None))
            .await
            .expect("the call hung on a guest that reads nothing")
            .unwrap_err();
        assert_eq!(err.code, hearth_api::ErrorCode::Unavailable, "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
        assert!(client.is_closed());
        assert!(tables_empty(&client));
        // The socket was shut down: the guest reads what was queued, then the end.
        let drained = tokio::time::timeout(Duration::from_secs(10), async {
            let mut buf = vec![0u8; 1 << 16];
            while guest.stream.read(&mut buf).await.unwrap() > 0 {}
        })
        .await;
        assert!(drained.is_ok(), "the connection stayed open");
        // Later calls fail at once.
        let err = client.call(Op::Sync, None).await.unwrap_err();
        assert_eq!(err.code, hearth_api::ErrorCode::Unavailable, "{err}");
    }

    /// A client on a socket pair whose send buffer holds less than the preamble, and the
    /// guest's end, which the test never reads: a guest whose port is not open, or that
    /// stopped reading.
    fn connected_to_a_deaf_guest(write_stall: Duration) -> (AgentClient, UnixStream) {
        let (host, guest) = UnixStream::pair().unwrap();
        setsockopt(&host, sockopt::SndBuf, &(64 << 10)).unwrap();
        (AgentClient::over(host, write_stall), guest)
    }

    fn identity_with(features: &[&str]) -> Identity {
        Identity {
            agent_version: "test".into(),
            kernel_release: "test".into(),
            hostname: "test".into(),
            features: features.iter().map(|f| f.to_string()).collect(),
        }
    }

    /// Answers hello `req` as an agent listing `features`.
    async fn answer_hello(guest: &mut Guest, req: Request, features: &[&str]) {
        let Op::Hello { nonce, .. } = req.op else {
            panic!("expected a hello, got {:?}", req.op)
        };
        let identity = identity_with(features);
        guest
            .reply(req.id, Reply::Hello { nonce, identity }, false)
            .await;
    }

    fn fix_ups() -> Option<Configure> {
        Some(Configure {
            hostname: Some("h".into()),
            thaw: true,
            ..Default::default()
        })
    }

    #[tokio::test]
    async fn a_hello_carries_the_fix_ups_and_their_failure_ends_the_handshake() {
        let (client, mut guest) = connected(WRITE_STALL);
        let deadline = Instant::now() + Duration::from_secs(10);
        let answered = async {
            let req = guest.request().await;
            let Op::Hello { configure, .. } = req.op else {
                panic!("expected a hello, got {:?}", req.op)
            };
            assert_eq!(configure, fix_ups());
            let body = Reply::Error {
                message: "set clock: EPERM".into(),
                kind: ErrorKind::Failed,
            };
            guest.reply(req.id, body, false).await;
        };
        let (shaken, ()) =
            tokio::join!(client.handshake("n", deadline, || true, fix_ups), answered);
        // Not retried until the deadline: the agent's answer is the error.
        let err = shaken.unwrap_err();
        assert!(err.message.contains("set clock: EPERM"), "{err}");
        assert!(!client.is_closed());
    }

    #[tokio::test]
    async fn a_late_answer_to_an_earlier_hello_ends_the_handshake() {
        let (client, mut guest) = connected(WRITE_STALL);
        let deadline = Instant::now() + Duration::from_secs(10);
        let answered = async {
            let first = guest.request().await;
            // The host says hello again before this guest answers the first.
            let second = guest.request().await;
            assert!(matches!(second.op, Op::Hello { .. }), "{:?}", second.op);
            answer_hello(&mut guest, first, &[FEATURE_HELLO_CONFIGURE]).await;
        };
        let (shaken, ()) =
            tokio::join!(client.handshake("n", deadline, || true, fix_ups), answered);
        shaken.unwrap();
        assert!(client.has_feature(FEATURE_HELLO_CONFIGURE));
    }

    #[tokio::test]
    async fn an_agent_that_ignores_fix_ups_in_its_hello_says_so() {
        for (features, in_hello) in [
            (vec![FEATURE_CONFIGURE_THAW], false),
            (vec![FEATURE_CONFIGURE_THAW, FEATURE_HELLO_CONFIGURE], true),
        ] {
            let (client, mut guest) = connected(WRITE_STALL);
            let deadline = Instant::now() + Duration::from_secs(10);
            let answered = async {
                let req = guest.request().await;
                answer_hello(&mut guest, req, &features).await;
            };
            let (shaken, ()) =
                tokio::join!(client.handshake("n", deadline, || true, fix_ups), answered);
            shaken.unwrap();
            assert_eq!(
                client.has_feature(FEATURE_HELLO_CONFIGURE),
                in_hello,
                "{features:?}"
            );
            assert!(client.has_feature(FEATURE_CONFIGURE_THAW));
        }
    }

    #[tokio::test]
    async fn a_handshake_ends_by_its_deadline_when_the_guest_reads_nothing() {
        let (client, _guest) = connected_to_a_deaf_guest(WRITE_STALL);
        let started = Instant::now();
        let deadline = started + Duration::from_millis(500);
        let err = tokio::time::timeout(
            Duration::from_secs(10),
            client.handshake("n", deadline, || true, || None),
        )
        .await
        .expect("the handshake outlived its deadline")
        .unwrap_err();
        assert_eq!(err.code, hearth_api::ErrorCode::Unavailable, "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        assert!(tables_empty(&client));
    }

    #[tokio::test]
    async fn a_preamble_the_guest_does_not_read_closes_the_connection() {
        let (client, mut guest) = connected_to_a_deaf_guest(Duration::from_millis(300));
        let closed = tokio::time::timeout(Duration::from_secs(10), async {
            while !client.is_closed() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(
            closed.is_ok(),
            "the connection stayed open behind its preamble"
        );
        // Shut down both ways: the guest reads what was queued, then the end.
        let mut buf = vec![0u8; 1 << 16];
        while guest.read(&mut buf).await.unwrap() > 0 {}
        let err = client.call(Op::Sync, None).await.unwrap_err();
        assert_eq!(err.code, hearth_api::ErrorCode::Unavailable, "{err}");
    }

    #[tokio::test]
    async fn a_guest_still_booting_does_not_hold_the_first_requests() {
        // The guest's port is not open yet: nothing is read from the socket.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let (stream, accepted) = tokio::join!(UnixStream::connect(&path), listener.accept());
        let (client, _guest) = (AgentClient::new(stream.unwrap()), accepted.unwrap());
        let sent = tokio::time::timeout(Duration::from_secs(5), client.request(Op::Sync, false))
            .await
            .expect("a request waited behind the preamble for a guest that has not read yet");
        drop(sent.unwrap());
        assert!(!client.is_closed());
    }

    #[tokio::test]
    async fn a_timed_out_call_leaves_nothing_behind_and_closes_the_channel() {
        let (client, mut guest) = connected(WRITE_STALL);
        let short = Some(Duration::from_millis(200));
        // Another call is waiting on the same channel: it fails with it.
        let (other, _) = tokio::join!(client.request(Op::Sync, false), guest.request());
        let mut other = other.unwrap();
        let (err, _) = tokio::join!(client.call(Op::Sync, short), guest.request());
        assert_eq!(err.unwrap_err().code, hearth_api::ErrorCode::Unavailable);
        assert!(client.is_closed());
        assert!(tables_empty(&client));
        assert!(other.answer(LONG).await.is_err());
        assert!(!guest.until(|_| false).await, "the connection stayed open");
        // So does one whose answer timed out.
        let (client, mut guest) = connected(WRITE_STALL);
        let (call, _) = tokio::join!(client.request(Op::Sync, false), guest.request());
        let mut call = call.unwrap();
        assert!(call.answer(short).await.is_err());
        drop(call);
        assert!(client.is_closed());
        assert!(tables_empty(&client));
    }

    #[tokio::test]
    async fn a_request_too_large_for_the_agent_is_refused_before_it_is_sent() {
        let (client, mut guest) = connected(WRITE_STALL);
        let huge = Op::Hello {
            nonce: "x".repeat(MAX_MESSAGE + 1),
            configure: None,
        };
        let err = tokio::time::timeout(Duration::from_secs(20), client.call(huge, None))
            .await
            .expect("the call waited for an answer to a request the agent drops")
            .unwrap_err();
        assert_eq!(err.code, hearth_api::ErrorCode::TooLarge, "{err}");
        assert!(tables_empty(&client));
        // Nothing of it went out: the next request is the first the guest sees.
        let guest_side = async {
            let req = guest.request().await;
            assert_eq!(req.op, Op::Sync);
            guest.reply(req.id, Reply::Done, false).await;
        };
        let (reply, ()) = tokio::join!(client.call(Op::Sync, LONG), guest_side);
        assert_eq!(reply.unwrap(), Reply::Done);
    }
}
