//! Per-stream flow control: a sender may have at most [`WINDOW`] bytes of a stream unacknowledged,
//! and the receiver gives credit back as it consumes. The bytes of all streams in flight are
//! bounded, so a large upload cannot hold a hello or an exec behind megabytes of queued data, and a
//! receiver never buffers more than a window per stream.

/// Bytes of one stream a sender may have in flight before it waits for credit.
pub const WINDOW: u32 = 4 << 20;

/// The receiver returns credit in batches of at least this many bytes.
const GRANT_BATCH: u32 = WINDOW / 4;

/// The sender's side: how much it may still send.
#[derive(Debug)]
pub struct SendWindow {
    available: u64,
}

impl Default for SendWindow {
    fn default() -> Self {
        SendWindow {
            available: WINDOW as u64,
        }
    }
}

impl SendWindow {
    /// Takes up to `want` bytes of credit and returns how many were taken (0: wait for credit).
    pub fn take(&mut self, want: usize) -> usize {
        let n = (want as u64).min(self.available);
        self.available -= n;
        n as usize
    }

    pub fn grant(&mut self, bytes: u32) {
        self.available = self.available.saturating_add(bytes as u64);
    }

    pub fn available(&self) -> u64 {
        self.available
    }
}

/// The receiver's side: what the sender may still have in flight, and credit owed back.
#[derive(Debug, Default)]
pub struct RecvWindow {
    /// Received and not yet given back as credit.
    held: u64,
    /// Consumed since the last grant.
    consumed: u64,
}

/// The peer sent more than its credit allowed: the stream is broken (or the peer hostile).
#[derive(Debug, PartialEq, Eq)]
pub struct Overrun;

impl RecvWindow {
    /// Accounts for `n` bytes received.
    pub fn received(&mut self, n: usize) -> Result<(), Overrun> {
        if self.held + n as u64 > WINDOW as u64 {
            return Err(Overrun);
        }
        self.held += n as u64;
        Ok(())
    }

    /// Accounts for `n` bytes consumed; returns the credit to send back, when a batch is due.
    pub fn consumed(&mut self, n: usize) -> Option<u32> {
        self.consumed += n as u64;
        if self.consumed < GRANT_BATCH as u64 {
            return None;
        }
        let grant = self.consumed.min(self.held) as u32;
        self.held -= grant as u64;
        self.consumed = 0;
        (grant > 0).then_some(grant)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sender_stops_at_the_window_and_resumes_with_credit() {
        let mut send = SendWindow::default();
        let mut recv = RecvWindow::default();
        let mut sent = 0usize;
        loop {
            let n = send.take(64 * 1024);
            if n == 0 {
                break;
            }
            recv.received(n).unwrap();
            sent += n;
        }
        assert_eq!(sent, WINDOW as usize);
        // Consuming less than a batch owes nothing yet; a batch returns that much.
        assert_eq!(recv.consumed(1000), None);
        let grant = recv.consumed(GRANT_BATCH as usize).unwrap();
        assert_eq!(grant, GRANT_BATCH + 1000);
        send.grant(grant);
        assert_eq!(send.take(usize::MAX), grant as usize);
        recv.received(grant as usize).unwrap();
    }

    #[test]
    fn a_sender_past_its_credit_is_an_overrun() {
        let mut recv = RecvWindow::default();
        recv.received(WINDOW as usize).unwrap();
        assert_eq!(recv.received(1), Err(Overrun));
    }

    #[test]
    fn consumption_over_many_small_reads_returns_everything() {
        let mut send = SendWindow::default();
        let mut recv = RecvWindow::default();
        let mut total = 0u64;
        for _ in 0..10 {
            let n = send.take(usize::MAX);
            recv.received(n).unwrap();
            for _ in 0..n / 4096 {
                if let Some(g) = recv.consumed(4096) {
                    send.grant(g);
                }
            }
            total += n as u64;
        }
        assert!(total > 5 * WINDOW as u64, "{total}");
    }
}
