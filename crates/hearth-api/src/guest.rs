//! Processes and files in a machine: the API's shapes are the agent protocol's (the daemon passes
//! them through), plus the events of output and watch streams.

use serde::{Deserialize, Serialize};

pub use hearth_proto::files::{
    Edit, Entry, EntryType, FileOp, FileResult, Match, Operation as FileOperation, WatchEvent,
    WatchEventKind,
};
pub use hearth_proto::process::{OutputStream, ProcessInfo, PtySize, StartProcess};

/// `POST /machines/{id}/processes` → 201, `GET /machines/{id}/processes/{pid|tag}` → 200.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProcessEnvelope {
    pub process: ProcessInfo,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProcessList {
    pub processes: Vec<ProcessInfo>,
}

/// One line of `GET /machines/{id}/processes/{pid|tag}/output` (NDJSON), and the JSON text
/// messages of the attach WebSocket.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum OutputEvent {
    Output {
        stream: OutputStream,
        offset: u64,
        data_base64: String,
    },
    /// Output from `from` to `to` was dropped from the agent's buffer before it was read.
    Dropped { from: u64, to: u64 },
    /// The process exited and all its output was sent.
    Exit {
        exit_code: i32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        signal: Option<i32>,
    },
}

impl OutputEvent {
    /// The bytes an `output` event carries (none for the other events).
    pub fn data(&self) -> Result<Vec<u8>, base64::DecodeError> {
        use base64::Engine;
        match self {
            OutputEvent::Output { data_base64, .. } => {
                base64::engine::general_purpose::STANDARD.decode(data_base64)
            }
            _ => Ok(Vec::new()),
        }
    }
}

/// A signal by name (`"TERM"`, `"SIGTERM"`) or number.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum SignalName {
    Number(i32),
    Name(String),
}

impl SignalName {
    /// The signal's number on Linux.
    pub fn number(&self) -> Result<i32, String> {
        match self {
            SignalName::Number(n) if (1..=64).contains(n) => Ok(*n),
            SignalName::Number(n) => Err(format!("no signal {n}")),
            SignalName::Name(name) => {
                let upper = name.to_ascii_uppercase();
                let bare = upper.strip_prefix("SIG").unwrap_or(&upper);
                SIGNALS
                    .iter()
                    .find(|(n, _)| *n == bare)
                    .map(|(_, num)| *num)
                    .or_else(|| bare.parse().ok().filter(|n| (1..=64).contains(n)))
                    .ok_or_else(|| format!("no signal {name:?}"))
            }
        }
    }
}

/// The name of signal `n` without its `SIG` prefix (`TERM`), for the common ones.
pub fn signal_name(n: i32) -> Option<&'static str> {
    SIGNALS
        .iter()
        .find(|(_, num)| *num == n)
        .map(|(name, _)| *name)
}

const SIGNALS: [(&str, i32); 20] = [
    ("HUP", 1),
    ("INT", 2),
    ("QUIT", 3),
    ("ILL", 4),
    ("TRAP", 5),
    ("ABRT", 6),
    ("BUS", 7),
    ("FPE", 8),
    ("KILL", 9),
    ("USR1", 10),
    ("SEGV", 11),
    ("USR2", 12),
    ("PIPE", 13),
    ("ALRM", 14),
    ("TERM", 15),
    ("CHLD", 17),
    ("CONT", 18),
    ("STOP", 19),
    ("TSTP", 20),
    ("WINCH", 28),
];

/// `POST /machines/{id}/processes/{pid|tag}/signal`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SignalRequest {
    pub signal: SignalName,
}

/// `POST /machines/{id}/processes/{pid|tag}/resize`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ResizeRequest {
    pub cols: u16,
    pub rows: u16,
}

/// What a client sends as a text message on the attach WebSocket (binary messages are stdin).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AttachControl {
    Resize { cols: u16, rows: u16 },
    Signal { signal: SignalName },
    CloseStdin,
}

/// The first byte of a binary message from the attach WebSocket: which output follows.
pub fn attach_stream_byte(stream: OutputStream) -> u8 {
    match stream {
        OutputStream::Stdout => 1,
        OutputStream::Stderr => 2,
        OutputStream::Pty => 3,
    }
}

/// `PUT /machines/{id}/files/content` → 201.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileUploadResponse {
    pub path: String,
    pub size_bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_by_name_or_number() {
        assert_eq!(SignalName::Name("TERM".into()).number(), Ok(15));
        assert_eq!(SignalName::Name("sigint".into()).number(), Ok(2));
        assert_eq!(SignalName::Name("9".into()).number(), Ok(9));
        assert_eq!(SignalName::Number(28).number(), Ok(28));
        assert!(SignalName::Name("NOPE".into()).number().is_err());
        assert!(SignalName::Number(0).number().is_err());
    }
}
