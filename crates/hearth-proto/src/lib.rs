//! The protocol between `hearthd` and `hearth-agent`.
//!
//! One frame is one line of JSON; bytes travel as base64, so no frame ever holds a newline. The
//! agent channel is a single byte stream (virtio-serial or vsock) that outlives the host-side
//! connection: the daemon may restart, a restored machine may wake up mid-frame. A reader that
//! joins at any point drops the partial line and is in step again at the next newline, which is
//! why frames are lines rather than a stateful framing such as HTTP/2.
//!
//! Requests carry an id; the agent serves them concurrently and tags each reply with the id of
//! its request. The agent also sends [`GuestMessage::Ready`] when it opens the channel, so the host
//! can say hello at once instead of waiting for its next retry.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Name of the virtio-serial port the agent listens on.
pub const AGENT_PORT_NAME: &str = "org.hearth.agent";

/// Default cap on captured stdout and on captured stderr of one exec, each.
pub const DEFAULT_OUTPUT_LIMIT: usize = 1 << 20;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Request {
    pub id: u64,
    #[serde(flatten)]
    pub op: Op,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// Readiness handshake: the agent answers with the same nonce.
    Hello {
        nonce: String,
    },
    /// Identity and clock fix-ups; each field is applied only when present.
    Configure(Configure),
    Exec(ExecRequest),
    /// Flush the guest's dirty data to its disks.
    Sync,
    /// Sync and freeze the root filesystem (FIFREEZE) so a disk clone is clean.
    Freeze,
    /// Thaw the root filesystem; thawing one that is not frozen is not an error.
    Thaw,
    /// Sync, remount the root read-only and power off; the reply comes before the power-off.
    PowerOff,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Configure {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_id: Option<String>,
    /// Host wall clock, nanoseconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wall_clock_unix_ns: Option<u64>,
    /// Host randomness mixed into the guest's pool (and the CRNG reseeded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entropy_base64: Option<String>,
    /// The guest's network, set up (again) on every configure: after a boot and a restore.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<GuestNetwork>,
}

/// How the agent sets up the guest's network interface: no DHCP, no kernel autoconfiguration.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct GuestNetwork {
    pub interface: String,
    pub address: String,
    pub prefix_len: u8,
    pub gateway: String,
    pub mtu: u32,
    /// Nameservers for /etc/resolv.conf.
    pub dns: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ExecRequest {
    pub command: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin_base64: Option<String>,
    /// Cap on captured stdout and on captured stderr, each, in bytes.
    pub output_limit: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum GuestMessage {
    Ready(Identity),
    Reply { id: u64, body: Reply },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Identity {
    pub agent_version: String,
    pub kernel_release: String,
    pub hostname: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Reply {
    Hello { nonce: String, identity: Identity },
    Exec(ExecReply),
    Done,
    Error { message: String },
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ExecReply {
    /// The exit status; for a process killed by a signal, 128 + the signal number.
    pub exit_code: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    pub stdout_base64: String,
    pub stderr_base64: String,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    pub timed_out: bool,
    pub duration_ms: u64,
}

/// Encodes a frame as one line, newline included.
pub fn encode_line<T: Serialize>(msg: &T) -> Vec<u8> {
    let mut line = serde_json::to_vec(msg).expect("protocol types always serialize");
    line.push(b'\n');
    line
}

/// Splits a byte stream into lines, keeping the unfinished tail for the next read.
#[derive(Default)]
pub struct LineBuffer {
    pending: Vec<u8>,
}

/// A line longer than this is garbage (or an attack); it is dropped rather than buffered.
pub const MAX_LINE: usize = 64 << 20;

impl LineBuffer {
    /// Appends `data` and returns every complete line in it, without the newline.
    pub fn push(&mut self, data: &[u8]) -> Vec<Vec<u8>> {
        let mut lines = Vec::new();
        let mut rest = data;
        while let Some(pos) = rest.iter().position(|&b| b == b'\n') {
            self.pending.extend_from_slice(&rest[..pos]);
            lines.push(std::mem::take(&mut self.pending));
            rest = &rest[pos + 1..];
        }
        self.pending.extend_from_slice(rest);
        if self.pending.len() > MAX_LINE {
            self.pending.clear();
        }
        lines
    }

    /// Forgets a partial line, as when the peer on the other end of the stream changed.
    pub fn reset(&mut self) {
        self.pending.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trips_through_a_line() {
        let req = Request {
            id: 7,
            op: Op::Exec(ExecRequest {
                command: vec!["echo".into(), "a\nb".into()],
                output_limit: 10,
                ..Default::default()
            }),
        };
        let line = encode_line(&req);
        assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
        assert_eq!(*line.last().unwrap(), b'\n');
        let back: Request = serde_json::from_slice(&line[..line.len() - 1]).unwrap();
        assert_eq!(back, req);
    }

    #[test]
    fn line_buffer_resynchronises_after_a_partial_frame() {
        let mut buf = LineBuffer::default();
        assert!(buf.push(b"{\"id\":1,\"op\":\"sy").is_empty());
        // The host reconnected: the guest sees the rest of a new stream.
        buf.reset();
        let lines = buf.push(b"\n{\"id\":2,\"op\":\"sync\"}\n{\"id\":3");
        assert_eq!(lines.len(), 2);
        assert!(lines[0].is_empty());
        let req: Request = serde_json::from_slice(&lines[1]).unwrap();
        assert_eq!(
            req,
            Request {
                id: 2,
                op: Op::Sync
            }
        );
        let lines = buf.push(b",\"op\":\"power_off\"}\n");
        let req: Request = serde_json::from_slice(&lines[0]).unwrap();
        assert_eq!(req.op, Op::PowerOff);
    }

    #[test]
    fn guest_messages_are_tagged() {
        let msg = GuestMessage::Reply {
            id: 9,
            body: Reply::Error {
                message: "boom".into(),
            },
        };
        let text = serde_json::to_string(&msg).unwrap();
        assert!(text.contains("\"type\":\"reply\""), "{text}");
        assert_eq!(serde_json::from_str::<GuestMessage>(&text).unwrap(), msg);
    }
}
