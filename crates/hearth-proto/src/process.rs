//! Processes that outlive the call that started them: started with an optional pty and tag,
//! their output kept by the agent in a bounded buffer that a client reads from any offset.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Output the agent keeps per process; older bytes are dropped (and said to be).
pub const OUTPUT_BUFFER: usize = 1 << 20;
/// Exited processes the agent remembers (with their output) for late readers.
pub const EXITED_KEPT: usize = 64;
/// Most bytes one output call returns.
pub const MAX_OUTPUT_READ: u32 = 256 * 1024;

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct PtySize {
    pub cols: u16,
    pub rows: u16,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StartProcess {
    pub command: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// A name to find the process by; unique among running processes, never all digits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// Keep stdin open for the client to write to (otherwise it is /dev/null).
    #[serde(default)]
    pub stdin: bool,
    /// Run on a pseudo-terminal of this size: stdin, stdout and stderr are the terminal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pty: Option<PtySize>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProcessInfo {
    pub pid: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    pub command: Vec<String>,
    pub pty: bool,
    /// Stdin is open for writing.
    pub stdin: bool,
    pub running: bool,
    /// The exit status; for a process killed by a signal, 128 + the signal number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// Guest wall clock, milliseconds since the Unix epoch.
    pub started_unix_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_unix_ms: Option<u64>,
    /// Bytes of output produced so far (the offset the next byte will have).
    pub output_bytes: u64,
}

/// Which output a chunk came from.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OutputStream {
    Stdout,
    Stderr,
    /// The terminal of a pty process (stdout and stderr together).
    Pty,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct OutputRequest {
    /// A pid (all digits) or a tag.
    pub process: String,
    /// Offset in the process's output (stdout and stderr counted together, in order).
    pub offset: u64,
    pub max_bytes: u32,
    /// When nothing is there past `offset` and the process runs, wait this long for output.
    pub wait_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct OutputChunk {
    pub stream: OutputStream,
    pub offset: u64,
    pub data_base64: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Output {
    pub chunks: Vec<OutputChunk>,
    /// Where the next read continues.
    pub next_offset: u64,
    /// Set when output between the requested offset and this one was dropped from the buffer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dropped_until: Option<u64>,
    /// The process as of this reply; when it has exited and `next_offset` reached its
    /// `output_bytes`, the output is complete.
    pub process: ProcessInfo,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StdinRequest {
    pub process: String,
    #[serde(default)]
    pub data_base64: String,
    /// Close stdin after writing (EOF for the process).
    #[serde(default)]
    pub close: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SignalRequest {
    pub process: String,
    pub signal: i32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ResizeRequest {
    pub process: String,
    pub cols: u16,
    pub rows: u16,
}
