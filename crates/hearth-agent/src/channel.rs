//! The agent's end of the channel: frames in and out, and the streams that carry request bodies
//! (host → guest) and reply contents (guest → host) under per-stream credit.
//!
//! One thread reads the channel and never blocks on a consumer: a stream's data is queued, and the
//! host cannot queue more than a window of it. Handlers run on their own threads and read bodies
//! ([`Body`]) or write contents ([`Content`]) at their own pace.

use crate::failure::Failure;
use bytes::Bytes;
use hearth_proto::credit::{RecvWindow, SendWindow};
use hearth_proto::frame::{self, Decoder, Event, MAX_PAYLOAD};
use hearth_proto::{encode, GuestMessage, Reply, Request, AGENT_PORT_NAME, MAX_MESSAGE};
use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// How long to wait before reading again after EOF (no host connected).
const IDLE_RETRY: Duration = Duration::from_millis(20);

#[derive(Default)]
struct InState {
    queue: VecDeque<Bytes>,
    window: RecvWindow,
    ended: bool,
    aborted: bool,
}

#[derive(Default)]
struct OutState {
    window: SendWindow,
    aborted: bool,
}

#[derive(Default)]
struct Stream<S> {
    state: Mutex<S>,
    changed: Condvar,
}

impl<S> Stream<S> {
    fn lock(&self) -> MutexGuard<'_, S> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Default)]
struct Streams {
    inbound: HashMap<u64, Arc<Stream<InState>>>,
    outbound: HashMap<u64, Arc<Stream<OutState>>>,
}

pub struct Port {
    reader: Mutex<File>,
    writer: Mutex<File>,
    streams: Mutex<Streams>,
}

impl Port {
    /// Opens the agent port, waiting for the device to appear (its driver may still be probing).
    pub fn open_when_present() -> Arc<Port> {
        loop {
            if let Some(path) = find_port() {
                match OpenOptions::new().read(true).write(true).open(&path) {
                    Ok(file) => match file.try_clone() {
                        Ok(writer) => {
                            return Arc::new(Port {
                                reader: Mutex::new(file),
                                writer: Mutex::new(writer),
                                streams: Mutex::default(),
                            })
                        }
                        Err(e) => eprintln!("hearth-agent: dup {}: {e}", path.display()),
                    },
                    Err(e) => eprintln!("hearth-agent: open {}: {e}", path.display()),
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn streams(&self) -> MutexGuard<'_, Streams> {
        self.streams.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes bytes as one unit; what is lost because no host is listening the host retries.
    fn write(&self, parts: &[&[u8]]) -> io::Result<()> {
        let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        // One writev per frame: every write is a round through the virtqueue.
        let mut slices: Vec<io::IoSlice> = parts.iter().map(|p| io::IoSlice::new(p)).collect();
        let mut bufs = &mut slices[..];
        while !bufs.is_empty() {
            match w.write_vectored(bufs) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => io::IoSlice::advance_slices(&mut bufs, n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    pub fn send(&self, msg: &GuestMessage) {
        let mut wire = encode(msg);
        if wire.len() > MAX_MESSAGE + MAX_MESSAGE / MAX_PAYLOAD * frame::HEADER_LEN {
            if let GuestMessage::Reply { id, .. } = msg {
                wire = encode(&GuestMessage::Reply {
                    id: *id,
                    body: Reply::Error {
                        message: "the reply is too large for the channel".into(),
                        kind: hearth_proto::ErrorKind::TooLarge,
                    },
                    stream: false,
                });
            }
        }
        if let Err(e) = self.write(&[&wire]) {
            eprintln!("hearth-agent: write to host: {e}");
        }
    }

    pub fn reply(&self, id: u64, body: Reply) {
        self.send(&GuestMessage::Reply {
            id,
            body,
            stream: false,
        });
    }

    /// Answers a request that will not be served, forgetting its body.
    pub fn refuse(&self, id: u64, failure: crate::failure::Failure) {
        self.streams().inbound.remove(&id);
        self.reply(id, failure.into_reply());
    }

    /// Replies and opens the reply's content stream, which the caller writes and finishes.
    pub fn reply_streaming(self: &Arc<Self>, id: u64, body: Reply) -> Content {
        let stream = Arc::new(Stream::<OutState>::default());
        // Registered before the reply goes out: the host's first credit may come at once.
        self.streams().outbound.insert(id, stream.clone());
        self.send(&GuestMessage::Reply {
            id,
            body,
            stream: true,
        });
        Content {
            port: self.clone(),
            id,
            stream,
            finished: false,
        }
    }

    /// The body of request `id` (registered when the request arrived with `body: true`).
    pub fn body(self: &Arc<Self>, id: u64) -> Body {
        let stream = self.streams().inbound.get(&id).cloned();
        Body {
            port: self.clone(),
            id,
            stream,
        }
    }

    fn abort_all(&self) {
        let streams = std::mem::take(&mut *self.streams());
        for s in streams.inbound.values() {
            s.lock().aborted = true;
            s.changed.notify_all();
        }
        for s in streams.outbound.values() {
            s.lock().aborted = true;
            s.changed.notify_all();
        }
    }

    /// Reads requests forever, handing each to `handle`.
    pub fn serve(self: Arc<Self>, handle: impl Fn(Request, Arc<Port>)) -> ! {
        let mut decoder = Decoder::new(MAX_MESSAGE);
        let mut buf = vec![0u8; 1 << 20];
        let mut reader = self.reader.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            match reader.read(&mut buf) {
                Ok(0) => {
                    // No host on the other side: whatever it left half-sent is void.
                    decoder.reset();
                    self.abort_all();
                    std::thread::sleep(IDLE_RETRY);
                    continue;
                }
                Ok(n) => decoder.push(&buf[..n]),
                Err(e) => {
                    eprintln!("hearth-agent: read from host: {e}");
                    std::thread::sleep(IDLE_RETRY);
                    continue;
                }
            }
            while let Some(event) = decoder.next_event() {
                match event {
                    Event::Message(json) => match serde_json::from_slice::<Request>(&json) {
                        Ok(req) => {
                            if let hearth_proto::Op::RawSink { bytes, path } = &req.op {
                                let reply = match drain_raw(&mut decoder, &mut reader, *bytes, path)
                                {
                                    Ok(()) => Reply::Done,
                                    Err(e) => Failure::io("raw transfer", &e).into_reply(),
                                };
                                self.reply(req.id, reply);
                                continue;
                            }
                            if req.body {
                                self.streams().inbound.insert(req.id, Arc::default());
                            }
                            handle(req, self.clone());
                        }
                        Err(e) => eprintln!("hearth-agent: bad message: {e}"),
                    },
                    Event::Data { stream, payload } => self.on_data(stream, payload),
                    Event::End { stream } => {
                        if let Some(s) = self.streams().inbound.get(&stream) {
                            s.lock().ended = true;
                            s.changed.notify_all();
                        }
                    }
                    Event::Credit { stream, bytes } => {
                        if let Some(s) = self.streams().outbound.get(&stream) {
                            s.lock().window.grant(bytes);
                            s.changed.notify_all();
                        }
                    }
                    Event::Abort { stream } => {
                        let (i, o) = {
                            let mut st = self.streams();
                            (st.inbound.remove(&stream), st.outbound.remove(&stream))
                        };
                        if let Some(s) = i {
                            s.lock().aborted = true;
                            s.changed.notify_all();
                        }
                        if let Some(s) = o {
                            s.lock().aborted = true;
                            s.changed.notify_all();
                        }
                    }
                    Event::Reset => self.abort_all(),
                }
            }
        }
    }

    fn on_data(&self, id: u64, payload: Bytes) {
        // An empty frame carries nothing and costs no credit: queueing it would cost memory
        // for free, and a reader could take it for the end.
        if payload.is_empty() {
            return;
        }
        let Some(s) = self.streams().inbound.get(&id).cloned() else {
            return;
        };
        let mut st = s.lock();
        if st.window.received(payload.len()).is_err() {
            // More than its credit: the stream is broken; the handler sees it aborted.
            st.aborted = true;
            drop(st);
            s.changed.notify_all();
            self.streams().inbound.remove(&id);
            let _ = self.write(&[&frame::encode_abort(id)]);
            return;
        }
        st.queue.push_back(payload);
        drop(st);
        s.changed.notify_all();
    }
}

/// Reads the `bytes` raw bytes that follow a benchmark's message, into `path` when given. All
/// of them are read even when the file fails, so the channel stays in step.
fn drain_raw(
    decoder: &mut Decoder,
    reader: &mut File,
    bytes: u64,
    path: &Option<String>,
) -> io::Result<()> {
    let mut out = path.as_ref().map(File::create);
    let mut sink = |data: &[u8]| {
        if let Some(Ok(f)) = &mut out {
            if let Err(e) = f.write_all(data) {
                out = Some(Err(e));
            }
        }
    };
    let first = decoder.take_raw(bytes as usize);
    sink(&first);
    let mut left = bytes - first.len() as u64;
    let mut buf = vec![0u8; 1 << 20];
    while left > 0 {
        let want = buf.len().min(left as usize);
        let n = reader.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        sink(&buf[..n]);
        left -= n as u64;
    }
    match out {
        Some(Err(e)) => Err(e),
        _ => Ok(()),
    }
}

/// A request's body, read as it arrives; credit goes back to the host as it is consumed.
pub struct Body {
    port: Arc<Port>,
    id: u64,
    stream: Option<Arc<Stream<InState>>>,
}

impl Read for Body {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let Some(s) = &self.stream else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the request has no body",
            ));
        };
        let mut st = s.lock();
        loop {
            if st.aborted {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "the host cancelled the transfer",
                ));
            }
            if let Some(front) = st.queue.front_mut() {
                let n = out.len().min(front.len());
                out[..n].copy_from_slice(&front[..n]);
                bytes::Buf::advance(front, n);
                if front.is_empty() {
                    st.queue.pop_front();
                }
                let grant = st.window.consumed(n);
                drop(st);
                if let Some(grant) = grant {
                    let _ = self.port.write(&[&frame::encode_credit(self.id, grant)]);
                }
                return Ok(n);
            }
            if st.ended {
                return Ok(0);
            }
            st = s.changed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }
}

impl Drop for Body {
    fn drop(&mut self) {
        let Some(s) = self.stream.take() else { return };
        let unfinished = {
            let st = s.lock();
            !st.ended && !st.aborted
        };
        self.port.streams().inbound.remove(&self.id);
        if unfinished {
            // Tell the host to stop sending what nobody will read.
            let _ = self.port.write(&[&frame::encode_abort(self.id)]);
        }
    }
}

/// A reply's content: written in frames as credit allows; finish it, or dropping it aborts.
pub struct Content {
    port: Arc<Port>,
    id: u64,
    stream: Arc<Stream<OutState>>,
    finished: bool,
}

impl Content {
    /// Whether the host cancelled the stream or went away: a writer with nothing to write can
    /// stop.
    pub fn cancelled(&self) -> bool {
        self.stream.lock().aborted
    }

    pub fn finish(mut self) -> io::Result<()> {
        self.finished = true;
        self.port.streams().outbound.remove(&self.id);
        self.port.write(&[&frame::encode_end(self.id)])
    }
}

impl Write for Content {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if data.is_empty() {
            return Ok(0);
        }
        let want = data.len().min(MAX_PAYLOAD);
        let mut st = self.stream.lock();
        let n = loop {
            if st.aborted {
                return Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "the host cancelled the transfer",
                ));
            }
            let n = st.window.take(want);
            if n > 0 {
                break n;
            }
            st = self
                .stream
                .changed
                .wait(st)
                .unwrap_or_else(|e| e.into_inner());
        };
        drop(st);
        self.port
            .write(&[&frame::data_header(self.id, n), &data[..n]])?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for Content {
    fn drop(&mut self) {
        if !self.finished {
            self.port.streams().outbound.remove(&self.id);
            let _ = self.port.write(&[&frame::encode_abort(self.id)]);
        }
    }
}

/// Writes a benchmark's raw bytes right after its reply, holding the channel meanwhile: read
/// from `path` when given, else zeros.
pub fn send_raw(port: &Port, id: u64, bytes: u64, path: &Option<String>) -> io::Result<()> {
    let mut file = path.as_ref().map(File::open).transpose()?;
    let reply = encode(&GuestMessage::Reply {
        id,
        body: Reply::Raw { bytes },
        stream: false,
    });
    let mut chunk = vec![0u8; 1 << 20];
    let mut w = port.writer.lock().unwrap_or_else(|e| e.into_inner());
    w.write_all(&reply)?;
    let mut left = bytes;
    while left > 0 {
        let want = chunk.len().min(left as usize);
        let n = match &mut file {
            // A short file is padded with what the buffer holds: the host counts bytes.
            Some(f) => f.read(&mut chunk[..want])?.max(1).min(want),
            None => want,
        };
        w.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    Ok(())
}

/// Finds `/dev/vportNpM` whose port name is the agent's.
fn find_port() -> Option<PathBuf> {
    let entries = std::fs::read_dir("/sys/class/virtio-ports").ok()?;
    for entry in entries.flatten() {
        let name = std::fs::read_to_string(entry.path().join("name")).unwrap_or_default();
        if name.trim() == AGENT_PORT_NAME {
            return Some(PathBuf::from("/dev").join(entry.file_name()));
        }
    }
    None
}
