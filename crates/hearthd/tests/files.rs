//! Files through the API on a real machine: every buffered operation and its error codes, a
//! 1 GiB upload and download compared by sha256 with the daemon's and the agent's memory
//! sampled, an upload cut short, ranges, a tar round trip, watch events.

mod common;

use common::*;
use futures_util::StreamExt;
use hearth_api::client::{Client, ClientError, UploadOptions};
use hearth_api::{
    Edit, EntryType, ErrorCode, FileOp, FileOperation as Op, FileResult, WatchEventKind,
};
use sha2::{Digest, Sha256};

use std::time::{Duration, Instant};
use tokio::io::AsyncRead;

const M: &str = "f1";

async fn op(c: &Client, op: FileOp) -> Result<FileResult, ClientError> {
    c.file_op(M, &op).await
}

fn with(operation: Op, path: &str, f: impl FnOnce(&mut FileOp)) -> FileOp {
    let mut o = FileOp::new(operation, path);
    f(&mut o);
    o
}

fn code(r: Result<FileResult, ClientError>) -> ErrorCode {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.code().unwrap_or_else(|| panic!("not an API error: {e}")),
    }
}

#[tokio::test]
async fn files_in_the_guest() {
    let d = Daemon::start().await;
    let c = d.client.clone();
    let mut req = create_req(M);
    req.storage_bytes = Some(3 << 30);
    c.create_machine(&req).await.unwrap();

    buffered_operations(&c).await;
    archives_and_watch(&c).await;
    large_transfers(&d, &c).await;
}

async fn buffered_operations(c: &Client) {
    // Write, read, version, stat.
    let w = op(
        c,
        with(Op::WriteText, "/srv/a.txt", |o| {
            o.content = Some("one two one\n".into())
        }),
    )
    .await;
    assert_eq!(code(w), ErrorCode::NotFound, "a missing parent");
    op(c, with(Op::Mkdir, "/srv", |o| o.mode = Some(0o750)))
        .await
        .unwrap();
    let w = op(
        c,
        with(Op::WriteText, "/srv/a.txt", |o| {
            o.content = Some("one two three\n".into());
            o.mode = Some(0o600);
        }),
    )
    .await
    .unwrap();
    let r = op(c, FileOp::new(Op::ReadText, "/srv/a.txt"))
        .await
        .unwrap();
    assert_eq!(r.content.as_deref(), Some("one two three\n"));
    assert_eq!(r.version, w.version);
    assert_eq!(
        r.version.as_deref(),
        Some(hex::encode(Sha256::digest(b"one two three\n")).as_str())
    );
    let st = op(c, FileOp::new(Op::Stat, "/srv/a.txt"))
        .await
        .unwrap()
        .stat
        .unwrap();
    assert_eq!(
        (st.kind, st.size_bytes, st.mode, st.uid, st.symlink),
        (EntryType::File, 14, 0o600, 0, false)
    );
    assert_eq!(st.name, "a.txt");

    // Bytes, ranges.
    op(
        c,
        with(Op::WriteBytes, "/srv/b.bin", |o| {
            o.content_base64 = Some("AAEC/w==".into())
        }),
    )
    .await
    .unwrap();
    let r = op(c, FileOp::new(Op::ReadBytes, "/srv/b.bin"))
        .await
        .unwrap();
    assert_eq!(r.content_base64.as_deref(), Some("AAEC/w=="));
    op(
        c,
        with(Op::WriteRange, "/srv/b.bin", |o| {
            o.offset = Some(1);
            o.content = Some("xy".into());
        }),
    )
    .await
    .unwrap();
    let r = op(
        c,
        with(Op::ReadRange, "/srv/b.bin", |o| {
            o.offset = Some(1);
            o.length = Some(3);
        }),
    )
    .await
    .unwrap();
    assert_eq!(r.content_base64.as_deref(), Some("eHn/"));
    let e = op(c, FileOp::new(Op::ReadText, "/srv/b.bin")).await;
    assert_eq!(code(e), ErrorCode::Invalid, "not UTF-8");

    // Patch.
    let p = op(
        c,
        with(Op::Patch, "/srv/a.txt", |o| {
            o.edits = Some(vec![Edit {
                find: "two".into(),
                replace: "2".into(),
            }]);
            o.set_contents = Some(true);
        }),
    )
    .await
    .unwrap();
    assert_eq!(p.content.as_deref(), Some("one 2 three\n"));
    let e = op(
        c,
        with(Op::Patch, "/srv/a.txt", |o| {
            o.edits = Some(vec![Edit {
                find: "absent".into(),
                replace: "x".into(),
            }]);
        }),
    )
    .await;
    assert_eq!(code(e), ErrorCode::Conflict);

    // List, exists, grep, move, chmod, chown, symlinks.
    sh(
        c,
        M,
        "ln -s a.txt /srv/link && mkdir -p /srv/d/e && echo deep one > /srv/d/e/f",
    )
    .await;
    let l = op(c, FileOp::new(Op::List, "/srv"))
        .await
        .unwrap()
        .entries
        .unwrap();
    let names: Vec<&str> = l.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["a.txt", "b.bin", "d", "link"]);
    let link = l.iter().find(|e| e.name == "link").unwrap();
    assert!(
        link.symlink && link.target.as_deref() == Some("a.txt") && link.kind == EntryType::File
    );
    let all = op(c, with(Op::List, "/srv", |o| o.recursive = Some(true)))
        .await
        .unwrap();
    assert!(all.entries.unwrap().iter().any(|e| e.path == "/srv/d/e/f"));
    let two = op(c, with(Op::List, "/srv", |o| o.depth = Some(2)))
        .await
        .unwrap();
    let two = two.entries.unwrap();
    assert!(
        two.iter().any(|e| e.path == "/srv/d/e") && !two.iter().any(|e| e.path == "/srv/d/e/f")
    );
    assert_eq!(
        op(c, FileOp::new(Op::Exists, "/srv/nope"))
            .await
            .unwrap()
            .exists,
        Some(false)
    );
    assert_eq!(
        op(c, FileOp::new(Op::Exists, "/srv/d"))
            .await
            .unwrap()
            .exists,
        Some(true)
    );
    let g = op(
        c,
        with(Op::Grep, "/srv", |o| {
            o.pattern = Some("O[Nn]E".into());
            o.regex = Some(true);
            o.case_insensitive = Some(true);
        }),
    )
    .await
    .unwrap();
    let hits: Vec<(String, u64)> = g
        .matches
        .unwrap()
        .into_iter()
        .map(|m| (m.path, m.line_number))
        .collect();
    assert!(
        hits.contains(&("/srv/a.txt".into(), 1)) && hits.contains(&("/srv/d/e/f".into(), 1)),
        "{hits:?}"
    );
    op(
        c,
        with(Op::Move, "/srv/b.bin", |o| {
            o.to = Some("/srv/d/b.bin".into())
        }),
    )
    .await
    .unwrap();
    op(c, with(Op::Chmod, "/srv/d/b.bin", |o| o.mode = Some(0o640)))
        .await
        .unwrap();
    op(
        c,
        with(Op::Chown, "/srv/d/b.bin", |o| {
            o.uid = Some(65534);
            o.gid = Some(65534);
        }),
    )
    .await
    .unwrap();
    let st = op(c, FileOp::new(Op::Stat, "/srv/d/b.bin"))
        .await
        .unwrap()
        .stat
        .unwrap();
    assert_eq!((st.mode, st.uid, st.gid), (0o640, 65534, 65534));

    // Errors: 400, 403, 404, 409, 413.
    assert_eq!(
        code(op(c, FileOp::new(Op::Stat, "srv/a.txt")).await),
        ErrorCode::Invalid
    );
    assert_eq!(
        code(op(c, FileOp::new(Op::Stat, "/srv/none")).await),
        ErrorCode::NotFound
    );
    let as_nobody = with(Op::ReadText, "/srv/a.txt", |o| {
        o.user = Some("nobody".into())
    });
    assert_eq!(code(op(c, as_nobody).await), ErrorCode::Forbidden);
    assert_eq!(
        code(op(c, FileOp::new(Op::Mkdir, "/srv/d")).await),
        ErrorCode::Conflict
    );
    assert_eq!(
        code(op(c, FileOp::new(Op::Remove, "/srv/d")).await),
        ErrorCode::Conflict
    );
    assert_eq!(
        code(op(c, FileOp::new(Op::List, "/srv/a.txt")).await),
        ErrorCode::Conflict
    );
    let big = "x".repeat(17 << 20);
    let e = op(
        c,
        with(Op::WriteText, "/srv/big", |o| o.content = Some(big)),
    )
    .await;
    assert_eq!(code(e), ErrorCode::TooLarge);
    sh(c, M, "head -c 17000000 /dev/zero > /srv/big0").await;
    assert_eq!(
        code(op(c, FileOp::new(Op::ReadBytes, "/srv/big0")).await),
        ErrorCode::TooLarge
    );
    let bad = c
        .raw(
            hyper::Method::POST,
            &format!("/machines/{M}/files/ops"),
            Some(br#"{"operation":"frobnicate","path":"/srv"}"#.to_vec()),
        )
        .await
        .unwrap();
    assert_eq!(bad.status, 400);
    let e = c
        .file_op("nope", &FileOp::new(Op::Stat, "/"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::NotFound));
    op(c, with(Op::Remove, "/srv/d", |o| o.recursive = Some(true)))
        .await
        .unwrap();
    assert_eq!(
        op(c, FileOp::new(Op::Exists, "/srv/d"))
            .await
            .unwrap()
            .exists,
        Some(false)
    );
}

async fn archives_and_watch(c: &Client) {
    // A tree with a symlink, modes and an empty file goes out as tar and back in elsewhere.
    sh(
        c,
        M,
        "mkdir -p /t/app/sub && echo hi > /t/app/sub/x && chmod 0600 /t/app/sub/x && \
         chmod 0750 /t/app/sub && : > /t/app/empty && ln -s sub/x /t/app/ln && mkdir /t/app/void",
    )
    .await;
    let mut tar = Vec::new();
    c.get_archive(M, "/t/app", None, &mut tar, |_, _| {})
        .await
        .unwrap();
    c.put_archive(M, "/t/copy", None, std::io::Cursor::new(tar), |_, _| {})
        .await
        .unwrap();
    let listing = |root: &'static str| async move {
        let r = op(c, with(Op::List, root, |o| o.recursive = Some(true)))
            .await
            .unwrap();
        r.entries
            .unwrap()
            .into_iter()
            .map(|e| {
                (
                    e.path.replacen(root, "", 1),
                    e.kind,
                    e.mode,
                    e.size_bytes,
                    e.symlink,
                    e.target,
                )
            })
            .collect::<Vec<_>>()
    };
    let (a, b) = (listing("/t/app").await, listing("/t/copy/app").await);
    assert_eq!(a, b);
    assert_eq!(a.len(), 5, "{a:?}");

    // Watch: events in a subdirectory made after the watch began.
    sh(c, M, "mkdir -p /w").await;
    let mut events = c.watch(M, "/w", true, None).await.unwrap();
    sh(
        c,
        M,
        "mkdir /w/sub && sleep 0.3 && echo a > /w/sub/f && mv /w/sub/f /w/sub/g && rm /w/sub/g",
    )
    .await;
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !seen.contains(&(WatchEventKind::Remove, "/w/sub/g".to_string())) {
        let ev = tokio::time::timeout_at(deadline.into(), events.next())
            .await
            .unwrap_or_else(|_| panic!("events so far: {seen:?}"))
            .unwrap()
            .unwrap();
        seen.push((ev.kind, ev.path));
    }
    for want in [
        (WatchEventKind::Create, "/w/sub"),
        (WatchEventKind::Create, "/w/sub/f"),
        (WatchEventKind::Write, "/w/sub/f"),
        (WatchEventKind::Rename, "/w/sub/f"),
    ] {
        assert!(
            seen.contains(&(want.0, want.1.to_string())),
            "{want:?} not in {seen:?}"
        );
    }
}

/// Bytes from a seeded generator, hashed as they are produced.
struct Pattern {
    left: u64,
    state: u64,
}

impl AsyncRead for Pattern {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let n = (buf.remaining() as u64).min(self.left).min(1 << 16) as usize / 8 * 8;
        let mut chunk = Vec::with_capacity(n);
        for _ in 0..n / 8 {
            self.state = self
                .state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            chunk.extend_from_slice(&self.state.to_le_bytes());
        }
        buf.put_slice(&chunk);
        self.left -= n as u64;
        std::task::Poll::Ready(Ok(()))
    }
}

fn pattern_sha(len: u64) -> String {
    let mut h = Sha256::new();
    let mut state = 7u64;
    let mut chunk = Vec::with_capacity(1 << 16);
    let mut left = len;
    while left > 0 {
        chunk.clear();
        for _ in 0..(left.min(1 << 16) / 8) {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            chunk.extend_from_slice(&state.to_le_bytes());
        }
        h.update(&chunk);
        left -= chunk.len() as u64;
    }
    hex::encode(h.finalize())
}

async fn agent_rss(c: &Client) -> u64 {
    rss_in(&sh(c, M, "cat /proc/1/status").await.stdout)
}

async fn large_transfers(d: &Daemon, c: &Client) {
    const GIB: u64 = 1 << 30;
    let (daemon0, agent0) = (rss_of(d.pid()), agent_rss(c).await);

    // Upload 1 GiB while sampling both sides' memory and timing execs that run meanwhile.
    let upload = {
        let c = c.clone();
        tokio::spawn(async move {
            let body = Pattern {
                left: GIB,
                state: 7,
            };
            c.upload(
                M,
                "/srv/big.bin",
                UploadOptions {
                    mode: Some(0o640),
                    user: None,
                },
                body,
                GIB,
                |_, _| {},
            )
            .await
        })
    };
    let (mut daemon_peak, mut agent_peak, mut slowest) = (0, 0, Duration::ZERO);
    while !upload.is_finished() {
        daemon_peak = daemon_peak.max(rss_of(d.pid()));
        let t = Instant::now();
        agent_peak = agent_peak.max(agent_rss(c).await);
        slowest = slowest.max(t.elapsed());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let up = upload.await.unwrap().unwrap();
    assert_eq!(up.size_bytes, GIB);
    eprintln!(
        "1 GiB upload: daemon RSS {} → peak {} MiB, agent {} → {} MiB, slowest exec meanwhile {slowest:?}",
        daemon0 >> 20, daemon_peak >> 20, agent0 >> 20, agent_peak >> 20
    );
    assert!(
        daemon_peak < daemon0 + (64 << 20),
        "the daemon grew to {daemon_peak}"
    );
    assert!(
        agent_peak < agent0 + (64 << 20),
        "the agent grew to {agent_peak}"
    );
    // Not queued behind the upload, which takes tens of seconds here: with a debug daemon and
    // a TCG guest such an exec took 0.6–0.7 s alone and up to 1.4 s during a full test run.
    assert!(
        slowest < Duration::from_secs(3),
        "an exec during the upload took {slowest:?}"
    );
    let want = pattern_sha(GIB);
    let r = sh(
        c,
        M,
        "sha256sum /srv/big.bin; stat -c %a /srv/big.bin; ls -a /srv",
    )
    .await;
    assert!(r.stdout.starts_with(&want), "{} vs {want}", r.stdout);
    assert!(r.stdout.contains("\n640\n"), "{}", r.stdout);
    assert!(
        !r.stdout.contains(".hearth"),
        "a temporary file is left: {}",
        r.stdout
    );

    // Download it back, hashing on the way, sampling the daemon.
    let (mut hash, mut daemon_peak) = (Sha256::new(), 0);
    let mut sink = HashWriter(&mut hash);
    let pid = d.pid();
    let n = c
        .download(M, "/srv/big.bin", None, None, &mut sink, move |_, _| {
            daemon_peak = daemon_peak.max(rss_of(pid));
        })
        .await
        .unwrap();
    assert_eq!(n, GIB);
    assert_eq!(hex::encode(hash.finalize()), want);

    // A range, and one past the end.
    let mut part = Vec::new();
    c.download(
        M,
        "/srv/a.txt",
        None,
        Some((4, Some(4))),
        &mut part,
        |_, _| {},
    )
    .await
    .unwrap();
    assert_eq!(part, b"2");
    let e = c
        .download(
            M,
            "/srv/a.txt",
            None,
            Some((100, None)),
            &mut Vec::new(),
            |_, _| {},
        )
        .await
        .unwrap_err();
    assert!(e.to_string().contains("416"), "{e}");

    // An upload cut short leaves nothing: not the file, not a temporary one.
    let cut = Pattern {
        left: 64 << 20,
        state: 1,
    };
    let e = c
        .upload(
            M,
            "/srv/cut.bin",
            UploadOptions::default(),
            cut,
            128 << 20,
            |_, _| {},
        )
        .await
        .unwrap_err();
    eprintln!("cut upload: {e}");
    assert!(
        eventually(Duration::from_secs(10), async || {
            sh(c, M, "ls -a /srv")
                .await
                .stdout
                .lines()
                .all(|l| !l.contains("cut") && !l.contains(".hearth"))
        })
        .await,
        "{}",
        sh(c, M, "ls -a /srv").await.stdout
    );
}

struct HashWriter<'a>(&'a mut Sha256);

impl tokio::io::AsyncWrite for HashWriter<'_> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.get_mut().0.update(buf);
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}
