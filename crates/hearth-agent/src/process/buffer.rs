//! A process's output as the agent keeps it: the most recent bytes, up to a capacity, with the
//! stream each byte came from, addressed by offsets that count every byte the process produced.

use hearth_proto::process::OutputStream;
use std::collections::VecDeque;

/// Most runs (stretches of one stream) kept: 16 bytes each, so a process that alternates
/// stdout and stderr one byte at a time cannot grow the agent's memory past the data's own bound
/// by more than this. Only output averaging under 32 bytes per run loses bytes before the data
/// itself is full.
pub const MAX_RUNS: usize = 32 * 1024;

pub struct OutputBuffer {
    data: VecDeque<u8>,
    /// Where each run of one stream begins, oldest first; the first may begin before the oldest
    /// kept byte.
    runs: VecDeque<(u64, OutputStream)>,
    /// Offset of the next byte: every byte produced so far, kept or not.
    end: u64,
    capacity: usize,
    max_runs: usize,
}

/// Bytes of one stream from `offset` on.
#[derive(Debug, PartialEq, Eq)]
pub struct Chunk {
    pub stream: OutputStream,
    pub offset: u64,
    pub data: Vec<u8>,
}

impl OutputBuffer {
    pub fn new(capacity: usize, max_runs: usize) -> OutputBuffer {
        OutputBuffer {
            data: VecDeque::new(),
            runs: VecDeque::new(),
            end: 0,
            capacity,
            max_runs: max_runs.max(1),
        }
    }

    /// Offset of the oldest kept byte.
    pub fn start(&self) -> u64 {
        self.end - self.data.len() as u64
    }

    /// Offset of the next byte (bytes produced so far).
    pub fn end(&self) -> u64 {
        self.end
    }

    /// Bytes kept.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Appends output, dropping the oldest bytes past the capacity.
    pub fn push(&mut self, stream: OutputStream, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        if self.runs.back().map(|&(_, s)| s) != Some(stream) {
            self.runs.push_back((self.end, stream));
        }
        self.end += bytes.len() as u64;
        let keep = &bytes[bytes.len().saturating_sub(self.capacity)..];
        // Make room first, so the deque never grows past the capacity.
        let excess = (self.data.len() + keep.len()).saturating_sub(self.capacity);
        self.data.drain(..excess);
        self.data.extend(keep);
        self.trim_runs();
        while self.runs.len() > self.max_runs {
            let next = self.runs[1].0;
            let drop = (next.saturating_sub(self.start()) as usize).min(self.data.len());
            self.data.drain(..drop);
            self.runs.pop_front();
        }
    }

    /// Forgets runs that end before the oldest kept byte.
    fn trim_runs(&mut self) {
        let start = self.start();
        while self.runs.len() > 1 && self.runs[1].0 <= start {
            self.runs.pop_front();
        }
    }

    /// Up to `max` bytes from `from` (which lies between `start` and `end`), one chunk per run.
    pub fn read(&self, from: u64, max: usize) -> Vec<Chunk> {
        let start = self.start();
        let from = from.clamp(start, self.end);
        let stop = self.end.min(from.saturating_add(max as u64));
        let mut chunks = Vec::new();
        // The run holding `from`: the last one that begins at or before it.
        let mut run = self
            .runs
            .partition_point(|&(at, _)| at <= from)
            .saturating_sub(1);
        let mut at = from;
        while at < stop {
            let Some(&(_, stream)) = self.runs.get(run) else {
                break;
            };
            let run_end = self
                .runs
                .get(run + 1)
                .map_or(self.end, |&(o, _)| o)
                .min(stop);
            chunks.push(Chunk {
                stream,
                offset: at,
                data: self.copy((at - start) as usize, (run_end - start) as usize),
            });
            at = run_end;
            run += 1;
        }
        chunks
    }

    fn copy(&self, lo: usize, hi: usize) -> Vec<u8> {
        let (a, b) = self.data.as_slices();
        let mut out = Vec::with_capacity(hi - lo);
        if lo < a.len() {
            out.extend_from_slice(&a[lo..hi.min(a.len())]);
        }
        if hi > a.len() {
            out.extend_from_slice(&b[lo.saturating_sub(a.len())..hi - a.len()]);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use OutputStream::{Stderr, Stdout};

    fn chunk(stream: OutputStream, offset: u64, data: &[u8]) -> Chunk {
        Chunk {
            stream,
            offset,
            data: data.to_vec(),
        }
    }

    #[test]
    fn runs_of_one_stream_merge_and_reads_split_at_stream_changes() {
        let mut buf = OutputBuffer::new(100, MAX_RUNS);
        buf.push(Stdout, b"ab");
        buf.push(Stdout, b"cd");
        buf.push(Stderr, b"E");
        buf.push(Stdout, b"ef");
        assert_eq!(buf.end(), 7);
        assert_eq!(
            buf.read(0, 100),
            vec![
                chunk(Stdout, 0, b"abcd"),
                chunk(Stderr, 4, b"E"),
                chunk(Stdout, 5, b"ef")
            ]
        );
        assert_eq!(
            buf.read(3, 3),
            vec![
                chunk(Stdout, 3, b"d"),
                chunk(Stderr, 4, b"E"),
                chunk(Stdout, 5, b"e")
            ]
        );
        assert_eq!(buf.read(7, 100), vec![]);
    }

    #[test]
    fn the_oldest_bytes_go_first_splitting_a_chunk() {
        let mut buf = OutputBuffer::new(4, MAX_RUNS);
        buf.push(Stdout, b"abc");
        buf.push(Stderr, b"de");
        buf.push(Stdout, b"f");
        assert_eq!((buf.start(), buf.end(), buf.len()), (2, 6, 4));
        assert_eq!(
            buf.read(0, 100),
            vec![
                chunk(Stdout, 2, b"c"),
                chunk(Stderr, 3, b"de"),
                chunk(Stdout, 5, b"f")
            ]
        );
        // A single write larger than the buffer keeps its tail.
        buf.push(Stderr, b"0123456789");
        assert_eq!((buf.start(), buf.end()), (12, 16));
        assert_eq!(buf.read(0, 100), vec![chunk(Stderr, 12, b"6789")]);
    }

    #[test]
    fn wrapped_data_reads_back_in_order() {
        let mut buf = OutputBuffer::new(8, MAX_RUNS);
        for i in 0..20u8 {
            buf.push(Stdout, &[i, i]);
        }
        let data: Vec<u8> = buf.read(0, 100).into_iter().flat_map(|c| c.data).collect();
        assert_eq!(data, vec![16, 16, 17, 17, 18, 18, 19, 19]);
        assert_eq!(buf.read(37, 2), vec![chunk(Stdout, 37, &[18, 19])]);
    }

    #[test]
    fn too_many_runs_drop_the_oldest_runs() {
        let mut buf = OutputBuffer::new(1000, 3);
        for stream in [Stdout, Stderr, Stdout, Stderr, Stdout] {
            buf.push(stream, b"xy");
        }
        assert_eq!((buf.start(), buf.end(), buf.len()), (4, 10, 6));
        assert_eq!(buf.runs.len(), 3);
        assert_eq!(buf.read(0, 100)[0], chunk(Stdout, 4, b"xy"));
    }
}
