//! File operations in the guest, in the shape of the API's `POST /machines/{id}/files/ops`
//! (the daemon passes them through), and the streaming transfers.

use serde::{Deserialize, Deserializer, Serialize};

/// Largest content a buffered operation reads or writes; streaming transfers have no limit.
pub const MAX_BUFFERED: u64 = 16 << 20;
/// Most entries one `list` returns, and most matches one `grep` returns.
pub const MAX_ENTRIES: usize = 100_000;

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    ReadText,
    ReadBytes,
    WriteText,
    WriteBytes,
    Remove,
    List,
    Stat,
    Exists,
    Patch,
    ReadRange,
    WriteRange,
    Mkdir,
    Move,
    Grep,
    Chmod,
    Chown,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Edit {
    pub find: String,
    pub replace: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FileOp {
    pub operation: Operation,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Destination of `move`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_base64: Option<String>,
    /// Permission bits: a number, or a string of octal digits ("0644").
    #[serde(
        default,
        deserialize_with = "mode_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub mode: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recursive: Option<bool>,
    /// `list`: how many levels below `path` (1 = its entries; `recursive` means unlimited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub depth: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub length: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edits: Option<Vec<Edit>>,
    /// `patch`: answer with the patched content.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set_contents: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pattern: Option<String>,
    /// `grep`: `pattern` is a regular expression (otherwise a literal string).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub case_insensitive: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_matches: Option<u32>,
    /// `chown`: new owner and group (either may be left out).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
    /// Run as this user (name or uid) with its permissions; root when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

impl FileOp {
    pub fn new(operation: Operation, path: impl Into<String>) -> FileOp {
        FileOp {
            operation,
            path: Some(path.into()),
            to: None,
            content: None,
            content_base64: None,
            mode: None,
            recursive: None,
            depth: None,
            offset: None,
            length: None,
            edits: None,
            set_contents: None,
            pattern: None,
            regex: None,
            case_insensitive: None,
            max_matches: None,
            uid: None,
            gid: None,
            user: None,
        }
    }
}

fn mode_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Mode {
        Number(u32),
        Octal(String),
    }
    let mode = match Option::<Mode>::deserialize(d)? {
        None => return Ok(None),
        Some(Mode::Number(n)) => n,
        Some(Mode::Octal(s)) => u32::from_str_radix(s.trim_start_matches("0o"), 8)
            .map_err(|_| serde::de::Error::custom(format!("mode {s:?} is not octal")))?,
    };
    if mode > 0o7777 {
        return Err(serde::de::Error::custom(format!(
            "mode {mode:o} has bits beyond 07777"
        )));
    }
    Ok(Some(mode))
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum EntryType {
    File,
    Directory,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Entry {
    pub path: String,
    pub name: String,
    /// What the entry is, following a symlink (a dangling one is a `file`).
    #[serde(rename = "type")]
    pub kind: EntryType,
    pub size_bytes: u64,
    /// Permission bits (07777).
    pub mode: u32,
    pub symlink: bool,
    /// A symlink's target, as written in the link.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    pub uid: u32,
    pub gid: u32,
    /// RFC 3339, UTC.
    pub mtime: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Match {
    pub path: String,
    pub line_number: u64,
    pub line: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileResult {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_base64: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entries: Option<Vec<Entry>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stat: Option<Entry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exists: Option<bool>,
    /// sha256 (hex) of the file's content after a read, write or patch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matches: Option<Vec<Match>>,
    /// `list` or `grep` stopped at its limit.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct UploadRequest {
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DownloadRequest {
    pub path: String,
    #[serde(default)]
    pub offset: u64,
    /// To the end when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub length: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TarRequest {
    /// `TarCreate`: the file or directory archived (named by its last component);
    /// `TarExtract`: the directory unpacked into (created when missing).
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct WatchRequest {
    pub path: String,
    #[serde(default)]
    pub recursive: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum WatchEventKind {
    Create,
    Write,
    Remove,
    Rename,
    Chmod,
    /// The kernel's event queue overflowed: events were lost.
    Overflow,
}

/// One line of a watch stream.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct WatchEvent {
    #[serde(rename = "type")]
    pub kind: WatchEventKind,
    pub path: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub directory: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mode_accepts_numbers_and_octal_strings() {
        let op: FileOp =
            serde_json::from_str(r#"{"operation":"chmod","path":"/a","mode":"0755"}"#).unwrap();
        assert_eq!(op.mode, Some(0o755));
        let op: FileOp =
            serde_json::from_str(r#"{"operation":"chmod","path":"/a","mode":420}"#).unwrap();
        assert_eq!(op.mode, Some(0o644));
        assert!(
            serde_json::from_str::<FileOp>(r#"{"operation":"chmod","path":"/a","mode":"9"}"#)
                .is_err()
        );
        assert!(serde_json::from_str::<FileOp>(r#"{"operation":"nope","path":"/a"}"#).is_err());
        assert!(
            serde_json::from_str::<FileOp>(r#"{"operation":"stat","path":"/a","x":1}"#).is_err()
        );
    }
}
