//! The agent's end of the channel: frames in and out, and the streams that carry request bodies
//! (host → guest) and reply contents (guest → host) under per-stream credit.
//!
//! One thread reads the channel and never blocks on a consumer: a stream's data is queued, and the
//! host cannot queue more than a window of it. Handlers run on their own threads and read bodies
//! ([`Body`]) or write contents ([`Content`]) at their own pace.
//!
//! The channel is a virtio-serial port (QEMU) or a vsock listener (Firecracker). The port is one
//! descriptor for the machine's life, whose reads return EOF while no host is connected; over
//! vsock each connection the host makes is a new host connection, and the newest replaces any
//! other. Both are served by the same code ([`Port::serve_connection`]): when a connection ends
//! (EOF on the port, a vsock connection closed, replaced, or reset by a snapshot or a restore)
//! everything of it is void, as when the host sends its reset.

use crate::failure::Failure;
use bytes::Bytes;
use hearth_proto::credit::{RecvWindow, SendWindow};
use hearth_proto::frame::{self, Decoder, Event, MAX_PAYLOAD};
use hearth_proto::{
    encode, GuestMessage, Identity, Reply, Request, AGENT_PORT_NAME, AGENT_VSOCK_PORT, MAX_MESSAGE,
};
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::signal::{SigSet, Signal};
use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// How long the serial reader waits for the port's signal that a host connected before it reads
/// again anyway: a safety net, the signal comes at once. Without the signal (a port that cannot
/// send it) the reader polls, at [`HOST_POLL`].
const HOST_SIGNAL_WAIT: Duration = Duration::from_secs(1);
const HOST_POLL: Duration = Duration::from_millis(20);
/// How often to look for the channel's device while its driver may still be probing.
const PROBE_INTERVAL: Duration = Duration::from_millis(50);
/// How long to wait after failing to listen on vsock, or to accept a connection (out of
/// descriptors, say): the agent retries, slowly enough not to fill the console.
const LISTEN_RETRY: Duration = Duration::from_secs(1);
const ACCEPT_RETRY: Duration = Duration::from_millis(200);

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

type Writer = Box<dyn Write + Send>;

pub struct Port {
    source: Source,
    /// Where frames to the host go: the port, or the vsock connection being served (none
    /// between connections).
    writer: Mutex<Option<Writer>>,
    streams: Mutex<Streams>,
}

/// Where the host's bytes come from.
enum Source {
    Serial(Mutex<File>),
    Listener(Arc<Handoff>),
}

/// A connected stream socket.
pub trait HostStream: Read + Write + Send + Sized + 'static {
    fn try_clone(&self) -> io::Result<Self>;
    /// Ends both directions: a read or a write blocked on it in another thread returns.
    fn shutdown(&self);
}

/// Where host connections come from: vsock in a guest, a Unix socket in tests.
pub trait Listener: Send + 'static {
    type Stream: HostStream;
    fn accept(&self) -> io::Result<Self::Stream>;
}

/// A host connection on its way from the accepting thread to the reader.
struct Connection {
    reader: Box<dyn Read + Send>,
    writer: Writer,
    close: Box<dyn Fn() + Send>,
}

impl Connection {
    fn new<S: HostStream>(stream: S) -> io::Result<Connection> {
        let reader = stream.try_clone()?;
        let closer = stream.try_clone()?;
        Ok(Connection {
            reader: Box::new(reader),
            writer: Box::new(stream),
            close: Box::new(move || closer.shutdown()),
        })
    }
}

/// Hands connections from the accepting thread to the reader: the newest wins.
#[derive(Default)]
struct Handoff {
    state: Mutex<HandoffState>,
    arrived: Condvar,
}

#[derive(Default)]
struct HandoffState {
    next: Option<Connection>,
    /// Ends the connection being served.
    current: Option<Box<dyn Fn() + Send>>,
}

impl Handoff {
    fn lock(&self) -> MutexGuard<'_, HandoffState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new connection replaces the one being served (its reader sees it end) and any not yet
    /// taken (closed as it is dropped).
    fn offer(&self, conn: Connection) {
        let mut st = self.lock();
        if let Some(close) = &st.current {
            close();
        }
        st.next = Some(conn);
        self.arrived.notify_one();
    }

    /// Waits for the next connection, which becomes the current one.
    fn take(&self) -> (Box<dyn Read + Send>, Writer) {
        let mut st = self.lock();
        loop {
            if let Some(conn) = st.next.take() {
                st.current = Some(conn.close);
                return (conn.reader, conn.writer);
            }
            st = self.arrived.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn end_current(&self) {
        if let Some(close) = self.lock().current.take() {
            close();
        }
    }
}

/// Accepts host connections for the reader, for ever.
fn accept_forever<L: Listener>(listener: L, handoff: &Handoff) -> ! {
    loop {
        match listener.accept().and_then(Connection::new) {
            Ok(conn) => handoff.offer(conn),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                eprintln!("hearth-agent: accept a host connection: {e}");
                std::thread::sleep(ACCEPT_RETRY);
            }
        }
    }
}

/// The reader's state between reads: a decoder that outlives a read error on the serial port.
struct Inbound {
    decoder: Decoder,
    buf: Vec<u8>,
}

impl Port {
    /// The channel is a vsock (Firecracker's only one) rather than a virtio-serial port.
    pub fn is_vsock(&self) -> bool {
        matches!(self.source, Source::Listener(_))
    }

    /// Opens the agent's channel, waiting for its device to appear (its driver may still be
    /// probing): the virtio-serial port when the machine has one, else vsock.
    pub fn open_when_present() -> Arc<Port> {
        loop {
            if let Some(path) = find_port() {
                match Port::serial(&path) {
                    Ok(port) => return Arc::new(port),
                    Err(e) => eprintln!("hearth-agent: open {}: {e}", path.display()),
                }
            } else if crate::vsock::is_channel() {
                match crate::vsock::VsockListener::bind(AGENT_VSOCK_PORT).and_then(Port::listen) {
                    Ok(port) => return port,
                    Err(e) => {
                        eprintln!("hearth-agent: listen on vsock port {AGENT_VSOCK_PORT}: {e}");
                        std::thread::sleep(LISTEN_RETRY);
                    }
                }
            }
            std::thread::sleep(PROBE_INTERVAL);
        }
    }

    fn serial(path: &Path) -> io::Result<Port> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let writer = file.try_clone()?;
        Ok(Port {
            source: Source::Serial(Mutex::new(file)),
            writer: Mutex::new(Some(Box::new(writer))),
            streams: Mutex::default(),
        })
    }

    /// A port whose host connections come from `listener`, accepted on a thread of their own.
    pub fn listen<L: Listener>(listener: L) -> io::Result<Arc<Port>> {
        let handoff = Arc::new(Handoff::default());
        let accepting = handoff.clone();
        crate::threads::helper("accept", move || accept_forever(listener, &accepting))?;
        Ok(Arc::new(Port {
            source: Source::Listener(handoff),
            writer: Mutex::new(None),
            streams: Mutex::default(),
        }))
    }

    fn streams(&self) -> MutexGuard<'_, Streams> {
        self.streams.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn writer(&self) -> MutexGuard<'_, Option<Writer>> {
        self.writer.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes bytes as one unit; what is lost because no host is listening the host retries.
    fn write(&self, parts: &[&[u8]]) -> io::Result<()> {
        let mut guard = self.writer();
        let w = guard.as_mut().ok_or_else(not_connected)?;
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

    /// Reads requests forever, handing each to `handle`; announces the agent (with `identity`)
    /// when it opens the port, and on each vsock connection.
    pub fn serve(
        self: Arc<Self>,
        identity: impl Fn() -> Identity,
        handle: impl Fn(Request, Arc<Port>),
    ) -> ! {
        let mut inbound = Inbound {
            decoder: Decoder::new(MAX_MESSAGE),
            buf: vec![0u8; 1 << 20],
        };
        match &self.source {
            Source::Serial(reader) => {
                let mut reader = reader.lock().unwrap_or_else(|e| e.into_inner());
                let host = HostSignal::arm(&reader);
                self.send(&GuestMessage::Ready(identity()));
                loop {
                    match self.serve_connection(&mut inbound, &mut *reader, &handle) {
                        // No host on the other side: whatever it left half-sent is void.
                        Ok(()) => {
                            inbound.decoder.reset();
                            self.abort_all();
                        }
                        Err(e) => eprintln!("hearth-agent: read from host: {e}"),
                    }
                    host.wait();
                }
            }
            Source::Listener(handoff) => {
                // A reader that failed and starts again here gives up its connection: the host
                // sees it end and connects anew.
                handoff.end_current();
                loop {
                    let (mut reader, writer) = handoff.take();
                    *self.writer() = Some(writer);
                    self.send(&GuestMessage::Ready(identity()));
                    if let Err(e) = self.serve_connection(&mut inbound, &mut reader, &handle) {
                        eprintln!("hearth-agent: read from host: {e}");
                    }
                    handoff.end_current();
                    *self.writer() = None;
                    inbound.decoder.reset();
                    self.abort_all();
                }
            }
        }
    }

    /// Serves requests from `reader` until it ends (`Ok`) or fails.
    fn serve_connection(
        self: &Arc<Self>,
        inbound: &mut Inbound,
        reader: &mut impl Read,
        handle: &impl Fn(Request, Arc<Port>),
    ) -> io::Result<()> {
        let Inbound { decoder, buf } = inbound;
        loop {
            match reader.read(buf) {
                Ok(0) => return Ok(()),
                Ok(n) => decoder.push(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            while let Some(event) = decoder.next_event() {
                match event {
                    Event::Message(json) => match serde_json::from_slice::<Request>(&json) {
                        Ok(req) => {
                            if let hearth_proto::Op::RawSink { bytes, path } = &req.op {
                                let reply = match drain_raw(decoder, reader, *bytes, path) {
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
    reader: &mut impl Read,
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
    let mut guard = port.writer();
    let w = guard.as_mut().ok_or_else(not_connected)?;
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

fn not_connected() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "no host is connected")
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

/// Wakes the serial reader when a host connects. A virtio-serial port whose reads return EOF
/// while no host is connected cannot be waited on with `poll` (it reports a hang-up until the
/// host comes), but it sends SIGIO to its owner when the host connects or data arrives. The
/// reader's thread owns the port and keeps SIGIO blocked, so the signal stays pending until
/// `sigtimedwait` takes it: one that comes between the EOF and the wait is not lost. Threads
/// the reader starts inherit the mask, harmlessly: the signal is directed at this thread only,
/// and `std::process::Command` clears the mask of what the agent runs.
struct HostSignal {
    armed: bool,
}

impl HostSignal {
    fn arm(port: &File) -> HostSignal {
        match arm_sigio(port) {
            Ok(()) => HostSignal { armed: true },
            Err(e) => {
                eprintln!("hearth-agent: the port cannot signal its host, polling for it: {e}");
                HostSignal { armed: false }
            }
        }
    }

    /// Returns when a host may have connected.
    fn wait(&self) {
        if !self.armed {
            std::thread::sleep(HOST_POLL);
            return;
        }
        let mut set = SigSet::empty();
        set.add(Signal::SIGIO);
        let timeout = libc::timespec {
            tv_sec: HOST_SIGNAL_WAIT.as_secs() as libc::time_t,
            tv_nsec: 0,
        };
        // SAFETY: a valid signal set and timeout; no siginfo is asked for. A timeout or an
        // interruption is as good as the signal: the caller reads again either way.
        unsafe { libc::sigtimedwait(set.as_ref(), std::ptr::null_mut(), &timeout) };
    }
}

/// Blocks SIGIO in this thread, then has the port send it here.
fn arm_sigio(port: &File) -> io::Result<()> {
    // From <fcntl.h>; not in the libc crate for every target.
    const F_SETOWN_EX: libc::c_int = 15;
    const F_OWNER_TID: libc::c_int = 0;
    #[repr(C)]
    struct FOwnerEx {
        kind: libc::c_int,
        pid: libc::pid_t,
    }
    let mut set = SigSet::empty();
    set.add(Signal::SIGIO);
    set.thread_block()?;
    let owner = FOwnerEx {
        kind: F_OWNER_TID,
        pid: nix::unistd::gettid().as_raw(),
    };
    // SAFETY: F_SETOWN_EX reads one `struct f_owner_ex`, which `owner` is laid out as.
    if unsafe { libc::fcntl(port.as_raw_fd(), F_SETOWN_EX, &owner) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let flags = OFlag::from_bits_retain(fcntl(port, FcntlArg::F_GETFL)?);
    fcntl(port, FcntlArg::F_SETFL(flags | OFlag::O_ASYNC))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    //! This host has no vsock peer (no vsock loopback, no vhost-vsock in its QEMU): the
    //! listener's handling is driven over Unix sockets, through the same code.

    use super::*;
    use hearth_proto::Op;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::mpsc;
    use std::time::Instant;

    const WAIT: Duration = Duration::from_secs(10);

    impl HostStream for UnixStream {
        fn try_clone(&self) -> io::Result<Self> {
            UnixStream::try_clone(self)
        }

        fn shutdown(&self) {
            let _ = UnixStream::shutdown(self, std::net::Shutdown::Both);
        }
    }

    impl Listener for UnixListener {
        type Stream = UnixStream;

        fn accept(&self) -> io::Result<UnixStream> {
            UnixListener::accept(self).map(|(stream, _)| stream)
        }
    }

    fn identity() -> Identity {
        Identity {
            agent_version: "test".into(),
            kernel_release: "test".into(),
            hostname: "test".into(),
            features: Vec::new(),
        }
    }

    /// An agent serving connections from a Unix listener, restarting its reader after a panic
    /// as `main` does. Requests with a body report how their body ended on `bodies`; `Thaw`
    /// panics the reader; `RawSource` writes its bytes; others answer at once.
    struct Agent {
        _dir: tempfile::TempDir,
        socket: PathBuf,
        bodies: mpsc::Receiver<io::Result<Vec<u8>>>,
    }

    fn agent() -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        agent_on(dir, socket.clone(), UnixListener::bind(&socket).unwrap())
    }

    fn agent_on(dir: tempfile::TempDir, socket: PathBuf, listener: impl Listener) -> Agent {
        let port = Port::listen(listener).unwrap();
        let (tx, bodies) = mpsc::channel();
        std::thread::spawn(move || loop {
            let (port, tx) = (port.clone(), tx.clone());
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                port.serve(identity, move |req, port| {
                    if matches!(req.op, Op::Thaw) {
                        panic!("the reader fails");
                    }
                    let tx = tx.clone();
                    std::thread::spawn(move || serve_one(req, &port, &tx));
                })
            }));
        });
        Agent {
            _dir: dir,
            socket,
            bodies,
        }
    }

    fn serve_one(req: Request, port: &Arc<Port>, bodies: &mpsc::Sender<io::Result<Vec<u8>>>) {
        if req.body {
            let mut data = Vec::new();
            let read = port.body(req.id).read_to_end(&mut data).map(|_| data);
            let _ = bodies.send(read);
            return;
        }
        match req.op {
            Op::Hello { nonce, .. } => port.reply(
                req.id,
                Reply::Hello {
                    nonce,
                    identity: identity(),
                },
            ),
            Op::RawSource { bytes, path } => {
                let _ = send_raw(port, req.id, bytes, &path);
            }
            _ => port.reply(req.id, Reply::Done),
        }
    }

    /// The daemon's end of a connection.
    struct Host {
        stream: UnixStream,
        decoder: Decoder,
    }

    impl Host {
        /// Connects and sends the preamble, as the daemon does.
        fn connect(socket: &Path) -> Host {
            let mut stream = UnixStream::connect(socket).unwrap();
            stream.set_read_timeout(Some(WAIT)).unwrap();
            stream.set_write_timeout(Some(WAIT)).unwrap();
            stream.write_all(&frame::resync_preamble()).unwrap();
            Host {
                stream,
                decoder: Decoder::new(MAX_MESSAGE),
            }
        }

        fn send(&mut self, id: u64, op: Op, body: bool) {
            let wire = encode(&Request { id, op, body });
            self.stream.write_all(&wire).unwrap();
        }

        /// The agent's next message; `None` when it ended the connection.
        fn next(&mut self) -> Option<GuestMessage> {
            let mut buf = vec![0u8; 1 << 16];
            loop {
                while let Some(event) = self.decoder.next_event() {
                    if let Event::Message(json) = event {
                        return Some(serde_json::from_slice(&json).unwrap());
                    }
                }
                match self.stream.read(&mut buf) {
                    Ok(0) => return None,
                    Ok(n) => self.decoder.push(&buf[..n]),
                    Err(e) => panic!("reading from the agent: {e}"),
                }
            }
        }

        fn ready(&mut self) {
            assert!(matches!(self.next(), Some(GuestMessage::Ready(_))));
        }

        fn hello(&mut self, id: u64) {
            let nonce = format!("nonce-{id}");
            self.send(
                id,
                Op::Hello {
                    nonce: nonce.clone(),
                    configure: None,
                },
                false,
            );
            match self.next() {
                Some(GuestMessage::Reply {
                    id: got,
                    body: Reply::Hello { nonce: echoed, .. },
                    ..
                }) => assert_eq!((got, echoed), (id, nonce)),
                other => panic!("expected the hello's reply, got {other:?}"),
            }
        }

        /// Starts a request whose body is left unfinished, and waits until the agent has it.
        fn start_body(&mut self, id: u64) {
            self.send(id, Op::Sync, true);
            self.stream
                .write_all(&frame::data_header(id, 3))
                .and_then(|()| self.stream.write_all(b"abc"))
                .unwrap();
            self.hello(id + 1);
        }
    }

    fn assert_aborted(agent: &Agent) {
        let body = agent
            .bodies
            .recv_timeout(WAIT)
            .expect("the body's reader returns");
        assert_eq!(
            body.expect_err("the body was never finished").kind(),
            io::ErrorKind::ConnectionAborted
        );
    }

    #[test]
    fn each_connection_is_announced_and_served() {
        let agent = agent();
        for id in [1, 2] {
            let mut host = Host::connect(&agent.socket);
            host.ready();
            host.hello(id);
        }
    }

    #[test]
    fn a_new_connection_replaces_the_previous_one_and_voids_its_streams() {
        let agent = agent();
        let mut old = Host::connect(&agent.socket);
        old.ready();
        old.start_body(10);
        let mut new = Host::connect(&agent.socket);
        assert!(old.next().is_none(), "the old connection ends");
        assert_aborted(&agent);
        new.ready();
        new.hello(20);
    }

    #[test]
    fn a_reset_connection_goes_back_to_accepting() {
        let agent = agent();
        let mut old = Host::connect(&agent.socket);
        old.ready();
        old.start_body(10);
        // Closing with unread data resets the connection: the agent's read fails (ECONNRESET),
        // as a vsock connection's does when the machine is snapshotted or restored.
        old.send(12, Op::Sync, false);
        let mut byte = [0u8];
        let peeked = nix::sys::socket::recv(
            old.stream.as_raw_fd(),
            &mut byte,
            nix::sys::socket::MsgFlags::MSG_PEEK,
        );
        assert_eq!(peeked, Ok(1));
        drop(old);
        assert_aborted(&agent);
        let mut new = Host::connect(&agent.socket);
        new.ready();
        new.hello(20);
    }

    #[test]
    fn a_host_that_stops_reading_does_not_hold_the_next_connection() {
        let agent = agent();
        let mut old = Host::connect(&agent.socket);
        old.ready();
        // Far more than the socket buffers: the agent's write blocks, holding the writer.
        old.send(
            1,
            Op::RawSource {
                bytes: 256 << 20,
                path: None,
            },
            false,
        );
        std::thread::sleep(Duration::from_millis(200));
        let mut new = Host::connect(&agent.socket);
        new.ready();
        new.hello(2);
    }

    #[test]
    fn a_reader_that_fails_gives_up_its_connection() {
        let agent = agent();
        let mut old = Host::connect(&agent.socket);
        old.ready();
        old.send(1, Op::Thaw, false);
        assert!(old.next().is_none(), "the connection ends");
        let mut new = Host::connect(&agent.socket);
        new.ready();
        new.hello(2);
    }

    /// Fails its first accepts, recording when each was tried.
    struct Flaky {
        inner: UnixListener,
        failures: AtomicU32,
        tried: Arc<Mutex<Vec<Instant>>>,
    }

    impl Listener for Flaky {
        type Stream = UnixStream;

        fn accept(&self) -> io::Result<UnixStream> {
            self.tried.lock().unwrap().push(Instant::now());
            let failing = self
                .failures
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
            if failing.is_ok() {
                return Err(io::Error::from_raw_os_error(libc::EMFILE));
            }
            Listener::accept(&self.inner)
        }
    }

    #[test]
    fn failed_accepts_are_retried_without_spinning() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let tried = Arc::default();
        let flaky = Flaky {
            inner: UnixListener::bind(&socket).unwrap(),
            failures: AtomicU32::new(3),
            tried: Arc::clone(&tried),
        };
        let agent = agent_on(dir, socket, flaky);
        let mut host = Host::connect(&agent.socket);
        host.ready();
        host.hello(1);
        // Three failures, then the connection (and the next accept, waiting).
        let tried = tried.lock().unwrap();
        assert!(tried.len() >= 4, "{} accepts", tried.len());
        for pair in tried[..4].windows(2) {
            assert!(pair[1] - pair[0] >= ACCEPT_RETRY);
        }
    }
}
