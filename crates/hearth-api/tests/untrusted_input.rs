//! Property tests of what clients and guests send: every request decoder (the API's bodies, the
//! agent protocol's messages) and the id rule, given arbitrary JSON-ish input, never panics,
//! and allocates no more than a small multiple of the input.

use hearth_api::{
    validate_id, AttachControl, CreateMachineRequest, CreateSnapshotRequest, ExecRequest,
    ForkRequest, NetworkRequest, PublishPortRequest, RestoreRequest, SignalRequest, UploadRequest,
};
use hearth_proto::files::FileOp;
use hearth_proto::process::StartProcess;
use hearth_proto::{GuestMessage, Request};
use proptest::prelude::*;
use serde_json::Value;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// Counts this thread's live heap bytes and their peak, to measure what one decode allocates.
struct Counting;

thread_local! {
    static LIVE: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

fn grew(n: usize) {
    LIVE.with(|live| {
        live.set(live.get() + n);
        PEAK.with(|peak| peak.set(peak.get().max(live.get())));
    });
}

fn shrank(n: usize) {
    LIVE.with(|live| live.set(live.get().saturating_sub(n)));
}

// SAFETY: every call is passed to the system allocator unchanged; only counted on the way.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        grew(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        shrank(layout.size());
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new: usize) -> *mut u8 {
        grew(new);
        shrank(layout.size());
        unsafe { System.realloc(ptr, layout, new) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Peak bytes allocated while `f` runs, above what was live before.
fn peak_of(f: impl FnOnce()) -> usize {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    f();
    PEAK.with(Cell::get) - base
}

/// Field names and values the decoders know, so that cases reach past the first field.
const WORDS: &[&str] = &[
    "machine_id",
    "artifact",
    "kernel_image_url",
    "rootfs_url",
    "initrd_url",
    "memory_mib",
    "vcpus",
    "storage_bytes",
    "guest_config",
    "hostname",
    "network",
    "enabled",
    "egress",
    "allow_cidrs",
    "deny_cidrs",
    "ports",
    "published_port_id",
    "port",
    "host_port",
    "protocol",
    "snapshot",
    "local_snapshot",
    "snapshot_id",
    "image_id",
    "artifacts",
    "id",
    "kind",
    "name",
    "size_bytes",
    "sha256_hex",
    "download_url",
    "command",
    "env",
    "cwd",
    "user",
    "tag",
    "stdin",
    "pty",
    "cols",
    "rows",
    "timeout_ms",
    "stdin_base64",
    "max_output_bytes",
    "operation",
    "path",
    "to",
    "content",
    "content_base64",
    "mode",
    "offset",
    "length",
    "edits",
    "find",
    "replace",
    "recursive",
    "depth",
    "pattern",
    "regex",
    "signal",
    "type",
    "op",
    "body",
    "reply",
    "nonce",
    "memory",
    "disk",
    "vmstate",
    "manifest",
    "allow",
    "deny",
    "tcp",
    "read_text",
    "write_bytes",
    "patch",
    "list",
    "grep",
    "chmod",
    "TERM",
    "SIGKILL",
    "resize",
    "close_stdin",
    "hello",
    "exec",
    "files",
    "upload",
    "parts",
    "part_number",
    "offset_bytes",
    "upload_url",
    "0644",
];

fn word() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(WORDS).prop_map(str::to_string),
        1 => any::<String>(),
    ]
}

fn number() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<u64>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        prop::sample::select(vec![
            0u64,
            1,
            63,
            64,
            65535,
            65536,
            1 << 32,
            1 << 62,
            u64::MAX
        ])
        .prop_map(Value::from),
    ]
}

fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        number(),
        word().prop_map(Value::String),
    ];
    leaf.prop_recursive(6, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::btree_map(word(), inner, 0..8)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// JSON-ish bytes: a JSON value, or one cut short, or with bytes spliced in, or raw bytes.
fn input() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => json().prop_map(|v| serde_json::to_vec(&v).unwrap()),
        1 => (json(), any::<prop::sample::Index>()).prop_map(|(v, cut)| {
            let text = serde_json::to_vec(&v).unwrap();
            text[..cut.index(text.len() + 1)].to_vec()
        }),
        1 => (json(), any::<prop::sample::Index>(), prop::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(v, at, junk)| {
                let mut text = serde_json::to_vec(&v).unwrap();
                let at = at.index(text.len() + 1);
                text.splice(at..at, junk);
                text
            }),
        1 => prop::collection::vec(any::<u8>(), 0..256),
    ]
}

/// Decodes `bytes` as `T`: never a panic, and at most this much memory.
fn decodes_within_bounds<T: serde::de::DeserializeOwned>(bytes: &[u8]) {
    let peak = peak_of(|| {
        let _ = serde_json::from_slice::<T>(bytes);
    });
    let bound = 16 * bytes.len() + (16 << 10);
    assert!(
        peak <= bound,
        "{peak} bytes allocated decoding {} bytes",
        bytes.len()
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn api_request_decoders_take_anything(bytes in input()) {
        decodes_within_bounds::<CreateMachineRequest>(&bytes);
        decodes_within_bounds::<RestoreRequest>(&bytes);
        decodes_within_bounds::<ForkRequest>(&bytes);
        decodes_within_bounds::<ExecRequest>(&bytes);
        decodes_within_bounds::<CreateSnapshotRequest>(&bytes);
        decodes_within_bounds::<UploadRequest>(&bytes);
        decodes_within_bounds::<NetworkRequest>(&bytes);
        decodes_within_bounds::<PublishPortRequest>(&bytes);
        decodes_within_bounds::<SignalRequest>(&bytes);
        decodes_within_bounds::<AttachControl>(&bytes);
        decodes_within_bounds::<FileOp>(&bytes);
        decodes_within_bounds::<StartProcess>(&bytes);
    }

    #[test]
    fn agent_message_decoders_take_anything(bytes in input()) {
        decodes_within_bounds::<Request>(&bytes);
        decodes_within_bounds::<GuestMessage>(&bytes);
    }

    #[test]
    fn ids_are_exactly_the_documented_shape(id in prop_oneof![
        "[a-z0-9][a-z0-9._-]{0,62}",
        "[a-z0-9._-]{0,70}",
        any::<String>(),
    ]) {
        let shaped = id.len() <= 63
            && id != "."
            && id != ".."
            && id.bytes().next().is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
            && id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
        match validate_id("machine", &id) {
            Ok(()) => prop_assert!(shaped, "{id:?} accepted"),
            Err(e) => {
                prop_assert!(!shaped, "{id:?} refused");
                prop_assert!(e.len() < 300, "{e}");
            }
        }
    }
}
