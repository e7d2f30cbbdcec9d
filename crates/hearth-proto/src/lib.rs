//! The protocol between `hearthd` and `hearth-agent`.
//!
//! The agent channel is a single byte stream (virtio-serial or vsock) that outlives the host-side
//! connection: the daemon may restart, a restored machine may wake up mid-frame. It carries binary
//! frames ([`frame`]) that a reader joining at any point finds again: JSON messages (requests,
//! replies) and raw data of numbered streams with per-stream credit ([`credit`]), so file contents
//! move without base64 and one large transfer cannot starve other calls.
//!
//! Requests carry an id; the agent serves them concurrently and tags each reply with the id of
//! its request. A request's body (an upload) and a reply's content (a download, a watch) travel as
//! the stream with the request's id. The agent also sends [`GuestMessage::Ready`] when it opens the
//! channel (over vsock, on each connection), so the host can say hello at once instead of
//! waiting for its next retry.

pub mod credit;
pub mod files;
pub mod frame;
pub mod process;

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Name of the virtio-serial port the agent listens on.
pub const AGENT_PORT_NAME: &str = "org.hearth.agent";

/// The vsock port the agent listens on where the machine has vsock and no virtio-serial
/// (Firecracker).
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// Default cap on captured stdout and on captured stderr of one exec, each.
pub const DEFAULT_OUTPUT_LIMIT: usize = 1 << 20;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Request {
    pub id: u64,
    #[serde(flatten)]
    pub op: Op,
    /// The request's body follows as the stream with this request's id.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub body: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// Readiness handshake: the agent answers with the same nonce. An agent that lists
    /// [`FEATURE_HELLO_CONFIGURE`] applies `configure` first (the start's fix-ups then take no
    /// round trip of their own) and answers an error when it fails; others ignore it.
    Hello {
        nonce: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        configure: Option<Configure>,
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
    /// Start a process that outlives the call → [`Reply::Process`].
    ProcessStart(process::StartProcess),
    /// Running and recently exited processes → [`Reply::Processes`].
    ProcessList,
    /// Output of a process from an offset, waiting for some when there is none yet →
    /// [`Reply::Output`].
    ProcessOutput(process::OutputRequest),
    ProcessStdin(process::StdinRequest),
    ProcessSignal(process::SignalRequest),
    ProcessResize(process::ResizeRequest),
    /// A buffered file operation → [`Reply::Files`].
    Files(files::FileOp),
    /// Write the request's body to a file, atomically → [`Reply::Written`].
    Upload(files::UploadRequest),
    /// A file's content as the reply's stream → [`Reply::Download`].
    Download(files::DownloadRequest),
    /// A tar archive of a path as the reply's stream → [`Reply::Streaming`].
    TarCreate(files::TarRequest),
    /// Unpack the request's body (a tar archive) into a directory → [`Reply::Done`].
    TarExtract(files::TarRequest),
    /// File system events under a path, one JSON line each, as the reply's stream →
    /// [`Reply::Streaming`].
    Watch(files::WatchRequest),
    /// Benchmark only: the agent reads this many raw bytes off the channel, outside any framing,
    /// into `path` when given (else nowhere), then replies [`Reply::Done`].
    RawSink {
        bytes: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        path: Option<String>,
    },
    /// Benchmark only: the agent replies [`Reply::Raw`] and then writes this many raw bytes
    /// (read from `path` when given, else zeros).
    RawSource {
        bytes: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        path: Option<String>,
    },
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
    /// Thaw the root filesystem first (a restore: the snapshot caught it frozen). Only for an
    /// agent that lists [`FEATURE_CONFIGURE_THAW`]; others ignore it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub thaw: bool,
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
    Reply {
        id: u64,
        body: Reply,
        /// The reply's content follows as the stream with the request's id.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        stream: bool,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Identity {
    pub agent_version: String,
    pub kernel_release: String,
    pub hostname: String,
    /// What this agent does beyond the first protocol (agents in older snapshots list none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub features: Vec<String>,
}

/// [`Configure::thaw`] is understood: a restore's thaw and fix-ups take one round trip.
pub const FEATURE_CONFIGURE_THAW: &str = "configure-thaw";

/// [`Op::Hello::configure`] is understood: a start's handshake and fix-ups are one round trip.
pub const FEATURE_HELLO_CONFIGURE: &str = "hello-configure";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    Hello {
        nonce: String,
        identity: Identity,
    },
    Exec(ExecReply),
    Done,
    Error {
        message: String,
        #[serde(default)]
        kind: ErrorKind,
    },
    Process(process::ProcessInfo),
    Processes {
        processes: Vec<process::ProcessInfo>,
    },
    Output(process::Output),
    Files(files::FileResult),
    Written {
        bytes: u64,
    },
    /// A download follows as the reply's stream: `length` bytes of a file of `size`.
    Download {
        size: u64,
        length: u64,
    },
    /// The reply's stream follows.
    Streaming,
    /// `bytes` raw bytes follow, outside any framing.
    Raw {
        bytes: u64,
    },
}

/// What kind of failure an error reply reports; the host maps it to an HTTP status.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    #[default]
    Failed,
    Invalid,
    NotFound,
    PermissionDenied,
    /// Exists, not a directory, is a directory, not empty, a tag in use.
    Conflict,
    TooLarge,
    /// The guest's disk is full or over quota.
    NoSpace,
}

impl ErrorKind {
    /// The kind of an I/O error from the guest's file system.
    pub fn of_io(e: &std::io::Error) -> ErrorKind {
        use std::io::ErrorKind as K;
        match e.kind() {
            K::NotFound => ErrorKind::NotFound,
            K::PermissionDenied => ErrorKind::PermissionDenied,
            K::AlreadyExists
            | K::NotADirectory
            | K::IsADirectory
            | K::DirectoryNotEmpty
            | K::CrossesDevices
            | K::ReadOnlyFilesystem
            | K::ResourceBusy
            | K::ExecutableFileBusy => ErrorKind::Conflict,
            K::StorageFull | K::QuotaExceeded => ErrorKind::NoSpace,
            K::InvalidInput | K::InvalidFilename => ErrorKind::Invalid,
            K::FileTooLarge => ErrorKind::TooLarge,
            // EPERM (chown, chmod of another's file) and ELOOP (a symlink where none may be).
            _ => match e.raw_os_error() {
                Some(1) => ErrorKind::PermissionDenied,
                Some(40) => ErrorKind::Conflict,
                _ => ErrorKind::Failed,
            },
        }
    }
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

/// Largest JSON message either side accepts; bigger content travels as a stream. It bounds
/// what a peer can make the other buffer for one message, and holds the largest ones there
/// are: a buffered file (16 MiB, as base64) or an exec's output (8 MiB of each stream, as
/// base64). A multiple of [`frame::MAX_PAYLOAD`].
pub const MAX_MESSAGE: usize = 24 << 20;

/// Encodes a message as frames.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    let json = serde_json::to_vec(msg).expect("protocol types always serialize");
    let mut out = Vec::with_capacity(json.len() + frame::HEADER_LEN);
    frame::encode_message(&json, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use frame::{Decoder, Event};

    fn decode_one(wire: &[u8]) -> bytes::Bytes {
        let mut dec = Decoder::new(MAX_MESSAGE);
        dec.push(wire);
        match dec.next_event() {
            Some(Event::Message(json)) => json,
            other => panic!("expected a message, got {other:?}"),
        }
    }

    #[test]
    fn request_round_trips_through_frames() {
        let req = Request {
            id: 7,
            op: Op::Exec(ExecRequest {
                command: vec!["echo".into(), "a\nb".into()],
                output_limit: 10,
                ..Default::default()
            }),
            body: false,
        };
        let back: Request = serde_json::from_slice(&decode_one(&encode(&req))).unwrap();
        assert_eq!(back, req);
        // The body flag is left out when false, so older frames still parse.
        assert!(!String::from_utf8_lossy(&encode(&req)).contains("body"));
    }

    #[test]
    fn guest_messages_are_tagged() {
        let msg = GuestMessage::Reply {
            id: 9,
            body: Reply::Error {
                message: "boom".into(),
                kind: ErrorKind::NotFound,
            },
            stream: false,
        };
        let text = serde_json::to_string(&msg).unwrap();
        assert!(text.contains("\"type\":\"reply\""), "{text}");
        assert!(text.contains("\"kind\":\"not_found\""), "{text}");
        assert_eq!(serde_json::from_str::<GuestMessage>(&text).unwrap(), msg);
    }

    #[test]
    fn io_errors_map_to_kinds() {
        use std::io::{Error, ErrorKind as K};
        assert_eq!(
            ErrorKind::of_io(&Error::from(K::NotFound)),
            ErrorKind::NotFound
        );
        assert_eq!(
            ErrorKind::of_io(&Error::from_raw_os_error(13)),
            ErrorKind::PermissionDenied
        );
        assert_eq!(
            ErrorKind::of_io(&Error::from_raw_os_error(20)),
            ErrorKind::Conflict
        );
        assert_eq!(
            ErrorKind::of_io(&Error::from_raw_os_error(5)),
            ErrorKind::Failed
        );
    }
}
