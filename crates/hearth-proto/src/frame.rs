//! Framing of the agent channel: binary frames that a reader joining mid-stream can find again.
//!
//! A frame is a 24-byte header (magic, kind, stream id, payload length, CRC-32 of the header)
//! followed by at most [`MAX_PAYLOAD`] bytes. Payloads are never inspected to find frame
//! boundaries, so data moves without escaping or base64; a reader that lost its place (a daemon
//! restart, a machine restored while a frame was half read) scans for the magic and accepts a
//! header only when its checksum holds. To put the guest's reader back in step deterministically,
//! a host that connects first sends [`RESYNC_PADDING`] zero bytes (enough to complete any frame
//! the guest was in the middle of) and a [`Frame::Reset`], which also ends every stream of the
//! previous connection.

use bytes::{Buf, Bytes, BytesMut};

pub const MAGIC: [u8; 4] = *b"HRTH";
pub const HEADER_LEN: usize = 24;
/// Largest payload of one frame; messages above it are split into parts. Large enough that a
/// transfer's per-frame costs (a virtqueue round, a wake-up) stay small next to its bytes.
pub const MAX_PAYLOAD: usize = 256 * 1024;
/// Zero bytes a new host connection starts with: completes any frame the peer was reading.
pub const RESYNC_PADDING: usize = HEADER_LEN + MAX_PAYLOAD;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Kind {
    /// A piece of a JSON message that continues in the next frame.
    Part = 1,
    /// A JSON message, or its last piece.
    Message = 2,
    Data = 3,
    End = 4,
    Credit = 5,
    Abort = 6,
    Reset = 7,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Part,
            2 => Kind::Message,
            3 => Kind::Data,
            4 => Kind::End,
            5 => Kind::Credit,
            6 => Kind::Abort,
            7 => Kind::Reset,
            _ => return None,
        })
    }
}

/// What a reader gets out of the channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A whole JSON message (requests, replies, notices).
    Message(Bytes),
    /// Bytes of stream `stream` (a request's body or a reply's content).
    Data { stream: u64, payload: Bytes },
    /// The sender finished stream `stream`.
    End { stream: u64 },
    /// The receiver of stream `stream` may take `bytes` more.
    Credit { stream: u64, bytes: u32 },
    /// Stream `stream` is cancelled, by whichever side.
    Abort { stream: u64 },
    /// A new host connection: everything of the previous one is void.
    Reset,
}

fn header(kind: Kind, stream: u64, len: usize) -> [u8; HEADER_LEN] {
    debug_assert!(len <= MAX_PAYLOAD);
    let mut h = [0u8; HEADER_LEN];
    h[..4].copy_from_slice(&MAGIC);
    h[4] = kind as u8;
    h[8..16].copy_from_slice(&stream.to_le_bytes());
    h[16..20].copy_from_slice(&(len as u32).to_le_bytes());
    let crc = crc32fast::hash(&h[..20]);
    h[20..24].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Appends a JSON message, split into parts of at most [`MAX_PAYLOAD`] bytes.
pub fn encode_message(json: &[u8], out: &mut Vec<u8>) {
    let mut chunks = json.chunks(MAX_PAYLOAD).peekable();
    if chunks.peek().is_none() {
        out.extend_from_slice(&header(Kind::Message, 0, 0));
    }
    while let Some(chunk) = chunks.next() {
        let kind = if chunks.peek().is_some() {
            Kind::Part
        } else {
            Kind::Message
        };
        out.extend_from_slice(&header(kind, 0, chunk.len()));
        out.extend_from_slice(chunk);
    }
}

/// The header of a data frame; the payload (at most [`MAX_PAYLOAD`] bytes) follows it.
pub fn data_header(stream: u64, len: usize) -> [u8; HEADER_LEN] {
    header(Kind::Data, stream, len)
}

pub fn encode_end(stream: u64) -> [u8; HEADER_LEN] {
    header(Kind::End, stream, 0)
}

pub fn encode_abort(stream: u64) -> [u8; HEADER_LEN] {
    header(Kind::Abort, stream, 0)
}

pub fn encode_credit(stream: u64, bytes: u32) -> Vec<u8> {
    let mut out = header(Kind::Credit, stream, 4).to_vec();
    out.extend_from_slice(&bytes.to_le_bytes());
    out
}

/// What a host writes first on a new connection: padding, then a reset.
pub fn resync_preamble() -> Vec<u8> {
    let mut out = vec![0u8; RESYNC_PADDING];
    out.extend_from_slice(&header(Kind::Reset, 0, 0));
    out
}

/// Turns a byte stream into [`Event`]s, resynchronising after garbage.
pub struct Decoder {
    buf: BytesMut,
    message: Vec<u8>,
    max_message: usize,
    /// The message being assembled grew past `max_message`: its parts are dropped to the end.
    oversized: bool,
    skipped: u64,
}

impl Decoder {
    /// A decoder that drops any message longer than `max_message` bytes.
    pub fn new(max_message: usize) -> Decoder {
        Decoder {
            buf: BytesMut::with_capacity(2 * RESYNC_PADDING),
            message: Vec::new(),
            max_message,
            oversized: false,
            skipped: 0,
        }
    }

    /// Bytes dropped so far while looking for a frame (garbage, or frames joined halfway).
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// Memory the decoder holds: its read buffer and the message being assembled. At most
    /// what was pushed and not yet decoded (a frame's worth when decoding keeps up) plus
    /// `max_message`, whatever the peer sends.
    pub fn held(&self) -> usize {
        self.buf.capacity() + self.message.capacity()
    }

    /// The buffer to read into directly (`tokio::io::AsyncReadExt::read_buf`), then decode.
    pub fn buf_mut(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    /// Takes up to `max` buffered bytes as they are, outside any frame (the benchmark's raw
    /// transfers follow a message directly).
    pub fn take_raw(&mut self, max: usize) -> Bytes {
        let n = max.min(self.buf.len());
        self.buf.split_to(n).freeze()
    }

    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// Forgets a partial frame and message, as when the peer's connection went away.
    pub fn reset(&mut self) {
        self.skipped += self.buf.len() as u64;
        self.buf.clear();
        self.message = Vec::new();
        self.oversized = false;
    }

    /// The next complete event, if the buffer holds one.
    pub fn next_event(&mut self) -> Option<Event> {
        loop {
            if !self.seek_header() {
                return None;
            }
            let h = &self.buf[..HEADER_LEN];
            let kind = Kind::from_u8(h[4]).expect("seek_header checked the kind");
            let stream = u64::from_le_bytes(h[8..16].try_into().expect("8 bytes"));
            let len = u32::from_le_bytes(h[16..20].try_into().expect("4 bytes")) as usize;
            if self.buf.len() < HEADER_LEN + len {
                self.buf.reserve(HEADER_LEN + len - self.buf.len());
                return None;
            }
            self.buf.advance(HEADER_LEN);
            let payload = self.buf.split_to(len).freeze();
            match kind {
                Kind::Part | Kind::Message => {
                    if !self.oversized {
                        let len = self.message.len() + payload.len();
                        if len > self.max_message {
                            // Dropped to its end; the memory goes at once.
                            self.oversized = true;
                            self.message = Vec::new();
                        } else {
                            if len > self.message.capacity() {
                                // Doubling, but never past the largest message.
                                let cap = (2 * self.message.capacity())
                                    .clamp(len, self.max_message.max(len));
                                self.message.reserve_exact(cap - self.message.len());
                            }
                            self.message.extend_from_slice(&payload);
                        }
                    }
                    if kind == Kind::Message {
                        let whole = std::mem::take(&mut self.message);
                        if std::mem::take(&mut self.oversized) {
                            continue;
                        }
                        return Some(Event::Message(Bytes::from(whole)));
                    }
                }
                Kind::Data => return Some(Event::Data { stream, payload }),
                Kind::End => return Some(Event::End { stream }),
                Kind::Abort => return Some(Event::Abort { stream }),
                Kind::Credit => {
                    let Ok(bytes) = <[u8; 4]>::try_from(&payload[..]) else {
                        continue;
                    };
                    return Some(Event::Credit {
                        stream,
                        bytes: u32::from_le_bytes(bytes),
                    });
                }
                Kind::Reset => {
                    self.message = Vec::new();
                    self.oversized = false;
                    return Some(Event::Reset);
                }
            }
        }
    }

    /// Drops bytes until the buffer starts with a valid header; false when it holds none yet.
    fn seek_header(&mut self) -> bool {
        loop {
            let start = candidate(&self.buf);
            self.skip(start);
            if self.buf.len() < HEADER_LEN {
                return false;
            }
            if valid_header(&self.buf[..HEADER_LEN]) {
                return true;
            }
            self.skip(1);
        }
    }

    fn skip(&mut self, n: usize) {
        if n > 0 {
            self.buf.advance(n);
            self.skipped += n as u64;
            // A frame joined halfway poisons the message being assembled.
            self.message = Vec::new();
            self.oversized = false;
        }
    }
}

fn valid_header(h: &[u8]) -> bool {
    let crc = u32::from_le_bytes(h[20..24].try_into().expect("4 bytes"));
    let len = u32::from_le_bytes(h[16..20].try_into().expect("4 bytes")) as usize;
    h[..4] == MAGIC
        && crc == crc32fast::hash(&h[..20])
        && len <= MAX_PAYLOAD
        && Kind::from_u8(h[4]).is_some()
}

/// Where a header may start: the first full magic, else a partial one at the very end.
fn candidate(buf: &[u8]) -> usize {
    if let Some(i) = buf.windows(MAGIC.len()).position(|w| w == MAGIC) {
        return i;
    }
    let tail = buf.len().saturating_sub(MAGIC.len() - 1);
    (tail..buf.len())
        .find(|&i| MAGIC.starts_with(&buf[i..]))
        .unwrap_or(buf.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(dec: &mut Decoder) -> Vec<Event> {
        std::iter::from_fn(|| dec.next_event()).collect()
    }

    fn data(stream: u64, payload: &[u8]) -> Vec<u8> {
        let mut out = data_header(stream, payload.len()).to_vec();
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn frames_round_trip_in_any_split() {
        let mut wire = Vec::new();
        encode_message(br#"{"a":1}"#, &mut wire);
        wire.extend(data(7, b"binary\n\0HRTH bytes"));
        wire.extend(encode_credit(7, 4096));
        wire.extend(encode_end(7));
        wire.extend(encode_abort(9));
        for split in 1..wire.len() {
            let mut dec = Decoder::new(1 << 20);
            dec.push(&wire[..split]);
            let mut got = events(&mut dec);
            dec.push(&wire[split..]);
            got.extend(events(&mut dec));
            assert_eq!(
                got,
                vec![
                    Event::Message(Bytes::from_static(br#"{"a":1}"#)),
                    Event::Data {
                        stream: 7,
                        payload: Bytes::from_static(b"binary\n\0HRTH bytes")
                    },
                    Event::Credit {
                        stream: 7,
                        bytes: 4096
                    },
                    Event::End { stream: 7 },
                    Event::Abort { stream: 9 },
                ],
                "split at {split}"
            );
            assert_eq!(dec.skipped(), 0);
        }
    }

    #[test]
    fn large_messages_travel_in_parts() {
        let json = vec![b'x'; 3 * MAX_PAYLOAD + 5];
        let mut wire = Vec::new();
        encode_message(&json, &mut wire);
        assert_eq!(wire.len(), json.len() + 4 * HEADER_LEN);
        let mut dec = Decoder::new(1 << 20);
        dec.push(&wire);
        assert_eq!(events(&mut dec), vec![Event::Message(Bytes::from(json))]);
    }

    #[test]
    fn oversized_messages_are_dropped_and_the_next_one_arrives() {
        let mut wire = Vec::new();
        encode_message(&vec![b'x'; 2 * MAX_PAYLOAD], &mut wire);
        encode_message(b"{}", &mut wire);
        let mut dec = Decoder::new(MAX_PAYLOAD);
        dec.push(&wire);
        assert_eq!(
            events(&mut dec),
            vec![Event::Message(Bytes::from_static(b"{}"))]
        );
    }

    #[test]
    fn a_reader_joining_mid_frame_finds_the_next_one() {
        let mut wire = data(1, &[b'H'; 1000]);
        encode_message(b"{}", &mut wire);
        for start in 1..HEADER_LEN + 1000 {
            let mut dec = Decoder::new(1 << 20);
            dec.push(&wire[start..]);
            assert_eq!(
                events(&mut dec),
                vec![Event::Message(Bytes::from_static(b"{}"))],
                "joined at {start}"
            );
        }
    }

    #[test]
    fn a_forged_magic_without_a_valid_header_is_skipped() {
        let mut wire = b"HRTHHRTH garbage HRT".to_vec();
        wire.extend(encode_end(3));
        let mut dec = Decoder::new(1 << 20);
        dec.push(&wire);
        assert_eq!(events(&mut dec), vec![Event::End { stream: 3 }]);
        assert_eq!(dec.skipped(), 20);
    }

    #[test]
    fn the_preamble_resynchronises_a_reader_stuck_in_a_payload() {
        // The guest was restored while reading the first bytes of a full-size data frame: it
        // still expects most of the payload, and the new host's bytes come instead.
        let old = data(5, &[1u8; MAX_PAYLOAD]);
        let mut wire = old[..HEADER_LEN + 10].to_vec();
        wire.extend(resync_preamble());
        encode_message(b"{\"hello\":1}", &mut wire);
        let mut dec = Decoder::new(1 << 20);
        dec.push(&wire);
        let got = events(&mut dec);
        assert_eq!(
            got[got.len() - 2..],
            [
                Event::Reset,
                Event::Message(Bytes::from_static(b"{\"hello\":1}"))
            ]
        );
    }

    #[test]
    fn a_partial_message_is_void_after_a_reset() {
        let mut first = Vec::new();
        encode_message(&vec![b'a'; MAX_PAYLOAD + 1], &mut first);
        let mut wire = first[..HEADER_LEN + MAX_PAYLOAD].to_vec();
        wire.extend(resync_preamble());
        encode_message(b"{}", &mut wire);
        let mut dec = Decoder::new(1 << 20);
        dec.push(&wire);
        assert_eq!(
            events(&mut dec),
            vec![Event::Reset, Event::Message(Bytes::from_static(b"{}"))]
        );
    }
}

#[cfg(test)]
mod props {
    //! Any bytes, split anywhere: the decoder never panics, holds no more than a frame and a
    //! message, and finds its place again after garbage.

    use super::*;
    use proptest::prelude::*;

    /// A small limit, so that cases exercise oversized messages without megabytes each.
    const MAX_MESSAGE: usize = 3 * MAX_PAYLOAD;

    /// An event a peer may send, and its bytes.
    fn frame() -> impl Strategy<Value = (Option<Event>, Vec<u8>)> {
        let payload = prop::collection::vec(any::<u8>(), 0..2048);
        prop_oneof![
            payload.clone().prop_map(|json| {
                let mut wire = Vec::new();
                encode_message(&json, &mut wire);
                (Some(Event::Message(Bytes::from(json))), wire)
            }),
            // Messages of several parts, some past the limit (dropped).
            (1..5usize, any::<u8>()).prop_map(|(parts, b)| {
                let json = vec![b; parts * MAX_PAYLOAD - 1];
                let mut wire = Vec::new();
                encode_message(&json, &mut wire);
                let event = (json.len() <= MAX_MESSAGE).then(|| Event::Message(Bytes::from(json)));
                (event, wire)
            }),
            (any::<u64>(), payload).prop_map(|(stream, payload)| {
                let mut wire = data_header(stream, payload.len()).to_vec();
                wire.extend_from_slice(&payload);
                let payload = Bytes::from(payload);
                (Some(Event::Data { stream, payload }), wire)
            }),
            any::<u64>().prop_map(|s| (Some(Event::End { stream: s }), encode_end(s).to_vec())),
            any::<u64>().prop_map(|s| (Some(Event::Abort { stream: s }), encode_abort(s).to_vec())),
            (any::<u64>(), any::<u32>()).prop_map(|(stream, bytes)| (
                Some(Event::Credit { stream, bytes }),
                encode_credit(stream, bytes)
            )),
        ]
    }

    /// What a reader may find before it is in step: random bytes, forged magics, and frames
    /// cut anywhere.
    fn garbage() -> impl Strategy<Value = Vec<u8>> {
        let piece = prop_oneof![
            prop::collection::vec(any::<u8>(), 0..512),
            prop::collection::vec(
                prop_oneof![Just(b'H'), Just(b'R'), Just(b'T'), any::<u8>()],
                0..64
            ),
            (frame(), any::<prop::sample::Index>())
                .prop_map(|((_, wire), cut)| wire[..cut.index(wire.len())].to_vec()),
        ];
        prop::collection::vec(piece, 0..6).prop_map(|p| p.concat())
    }

    /// Feeds `wire` in pieces cut at `cuts`, decoding after each; checks the memory bound: a
    /// message and, for the read buffer, twice a frame and the largest read (the buffer grows
    /// by doubling and keeps its allocation), however much was fed.
    fn decode(wire: &[u8], cuts: &[prop::sample::Index]) -> Vec<Event> {
        let mut at: Vec<usize> = cuts.iter().map(|c| c.index(wire.len() + 1)).collect();
        at.push(0);
        at.push(wire.len());
        at.sort_unstable();
        let mut dec = Decoder::new(MAX_MESSAGE);
        let mut events = Vec::new();
        let mut largest = 0;
        for w in at.windows(2) {
            let piece = &wire[w[0]..w[1]];
            largest = largest.max(piece.len());
            dec.push(piece);
            events.extend(std::iter::from_fn(|| dec.next_event()));
            let read_bound = 2 * (2 * RESYNC_PADDING + largest);
            assert!(
                dec.buf.capacity() <= read_bound,
                "{} > {read_bound}",
                dec.buf.capacity()
            );
            assert!(
                dec.message.capacity() <= MAX_MESSAGE,
                "{}",
                dec.message.capacity()
            );
            assert!(dec.held() <= MAX_MESSAGE + read_bound);
        }
        events
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        #[test]
        fn arbitrary_bytes_never_panic_and_stay_bounded(
            wire in prop::collection::vec(any::<u8>(), 0..(4 * MAX_PAYLOAD)),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
        ) {
            decode(&wire, &cuts);
        }

        #[test]
        fn frames_decode_the_same_however_they_are_split(
            frames in prop::collection::vec(frame(), 0..12),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..12),
        ) {
            let wire: Vec<u8> = frames.iter().flat_map(|(_, w)| w.clone()).collect();
            let want: Vec<Event> = frames.into_iter().filter_map(|(e, _)| e).collect();
            prop_assert_eq!(decode(&wire, &cuts), want);
        }

        #[test]
        fn the_preamble_resynchronises_after_any_garbage(
            junk in garbage(),
            frames in prop::collection::vec(frame(), 0..6),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
        ) {
            let mut wire = junk;
            wire.extend(resync_preamble());
            wire.extend(frames.iter().flat_map(|(_, w)| w.clone()));
            let got = decode(&wire, &cuts);
            let reset = got.iter().rposition(|e| *e == Event::Reset).expect("the reset arrives");
            let want: Vec<Event> = frames.into_iter().filter_map(|(e, _)| e).collect();
            prop_assert_eq!(&got[reset + 1..], &want[..]);
        }
    }
}
