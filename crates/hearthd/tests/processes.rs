//! Processes through the API on a real machine: background processes read back from any offset,
//! stdin, signals, a pty's size, a 10 MB flood that blocks nothing, and processes that outlive a
//! daemon restart and a snapshot + restore.

mod common;

use base64::Engine;
use common::*;
use futures_util::StreamExt;
use hearth_api::{
    client::Client, ErrorCode, OutputEvent, OutputStream, ProcessInfo, PtySize, SignalName,
    SnapshotKind, StartProcess,
};
use std::time::{Duration, Instant};

fn start(command: &[&str]) -> StartProcess {
    StartProcess {
        command: command.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// What reading a process's output gives: the bytes per stream, dropped ranges, the exit.
#[derive(Default, Debug)]
struct Read {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    pty: Vec<u8>,
    dropped: Vec<(u64, u64)>,
    exit: Option<(i32, Option<i32>)>,
}

async fn read(client: &Client, m: &str, p: &str, offset: u64, follow: bool) -> Read {
    let mut events = client.process_output(m, p, offset, follow).await.unwrap();
    let mut r = Read::default();
    while let Some(ev) = events.next().await {
        match ev.unwrap() {
            OutputEvent::Output {
                stream,
                data_base64,
                ..
            } => {
                let data = base64::engine::general_purpose::STANDARD
                    .decode(data_base64)
                    .unwrap();
                match stream {
                    OutputStream::Stdout => r.stdout.extend(data),
                    OutputStream::Stderr => r.stderr.extend(data),
                    OutputStream::Pty => r.pty.extend(data),
                }
            }
            OutputEvent::Dropped { from, to } => r.dropped.push((from, to)),
            OutputEvent::Exit { exit_code, signal } => r.exit = Some((exit_code, signal)),
        }
    }
    r
}

/// Follows a process's output from `offset` until it contains `needle`; returns the offset
/// after the output that did.
async fn follow_until(client: &Client, m: &str, p: &str, offset: u64, needle: &str) -> u64 {
    let mut events = client.process_output(m, p, offset, true).await.unwrap();
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Ok(Some(ev)) = tokio::time::timeout_at(deadline.into(), events.next()).await {
        if let OutputEvent::Output {
            offset,
            data_base64,
            ..
        } = ev.unwrap()
        {
            let data = base64::engine::general_purpose::STANDARD
                .decode(data_base64)
                .unwrap();
            seen.push_str(&String::from_utf8_lossy(&data));
            if seen.contains(needle) {
                return offset + data.len() as u64;
            }
        }
    }
    panic!("{p} never printed {needle:?}; it printed {seen:?}");
}

fn code(e: hearth_api::client::ClientError) -> ErrorCode {
    e.code().unwrap_or_else(|| panic!("not an API error: {e}"))
}

async fn info(client: &Client, m: &str, p: &str) -> ProcessInfo {
    client.get_process(m, p).await.unwrap()
}

#[tokio::test]
async fn processes_live_in_the_guest() {
    let mut d = Daemon::start().await;
    let c = d.client.clone();
    c.create_machine(&create_req("m1")).await.unwrap();

    // A background process whose client is gone: read back whole, from offset 0, by tag.
    let mut bg = start(&[
        "sh",
        "-c",
        "for i in $(seq 1 40); do echo out $i; echo err $i >&2; sleep 0.02; done; exit 7",
    ]);
    bg.tag = Some("lines".into());
    let p = c.start_process("m1", &bg).await.unwrap();
    assert!(p.running && p.tag.as_deref() == Some("lines"), "{p:?}");
    let all = read(&c, "m1", "lines", 0, true).await;
    let want_out: String = (1..=40).map(|i| format!("out {i}\n")).collect();
    let want_err: String = (1..=40).map(|i| format!("err {i}\n")).collect();
    assert_eq!(String::from_utf8_lossy(&all.stdout), want_out);
    assert_eq!(String::from_utf8_lossy(&all.stderr), want_err);
    assert_eq!(all.exit, Some((7, None)));
    // Reading again from an offset gives the rest, and the exit.
    let tail = read(&c, "m1", &p.pid.to_string(), 100, false).await;
    assert_eq!(
        tail.stdout.len() + tail.stderr.len() + 100,
        all.stdout.len() + all.stderr.len()
    );
    assert_eq!(tail.exit, Some((7, None)));

    // Stdin: echoed by cat, closed for its end.
    let mut cat = start(&["cat"]);
    cat.stdin = true;
    let cat = c.start_process("m1", &cat).await.unwrap().pid.to_string();
    c.process_stdin("m1", &cat, "hello\n", false).await.unwrap();
    c.process_stdin("m1", &cat, "world\n", true).await.unwrap();
    let r = read(&c, "m1", &cat, 0, true).await;
    assert_eq!(r.stdout, b"hello\nworld\n");
    assert_eq!(r.exit, Some((0, None)));
    let e = c
        .process_stdin("m1", &cat, "late", false)
        .await
        .unwrap_err();
    assert_eq!(code(e), ErrorCode::Conflict);

    // Signals go to the process group; the exit says which.
    let sleeper = c
        .start_process("m1", &start(&["sh", "-c", "sleep 1000 & wait"]))
        .await
        .unwrap()
        .pid
        .to_string();
    c.signal_process("m1", &sleeper, SignalName::Name("TERM".into()))
        .await
        .unwrap();
    let r = read(&c, "m1", &sleeper, 0, true).await;
    assert_eq!(r.exit, Some((143, Some(15))));
    let left = sh(&c, "m1", "pgrep -x sleep || true").await;
    assert_eq!(left.stdout, "", "the group's sleep survived");

    // A pty: its size is what the start and the resize said.
    let mut shell = start(&["sh"]);
    shell.stdin = true;
    shell.pty = Some(PtySize {
        cols: 100,
        rows: 30,
    });
    let shell = c.start_process("m1", &shell).await.unwrap().pid.to_string();
    c.process_stdin("m1", &shell, "stty size\n", false)
        .await
        .unwrap();
    let at = follow_until(&c, "m1", &shell, 0, "30 100").await;
    c.resize_process("m1", &shell, 120, 40).await.unwrap();
    c.process_stdin("m1", &shell, "stty size\n", false)
        .await
        .unwrap();
    follow_until(&c, "m1", &shell, at, "40 120").await;
    c.process_stdin("m1", &shell, "exit 3\n", false)
        .await
        .unwrap();
    let r = read(&c, "m1", &shell, 0, true).await;
    assert_eq!(r.exit, Some((3, None)));
    assert!(r.stdout.is_empty() && r.stderr.is_empty() && !r.pty.is_empty());

    // 10 MB nobody reads: the agent drains it, other calls answer meanwhile, and a late reader
    // learns what was dropped.
    let mut flood = start(&[
        "sh",
        "-c",
        "head -c 10000000 /dev/zero | tr '\\0' a; sleep 1",
    ]);
    flood.tag = Some("flood".into());
    c.start_process("m1", &flood).await.unwrap();
    let t = Instant::now();
    assert_eq!(sh(&c, "m1", "echo ok").await.stdout, "ok\n");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "exec took {:?}",
        t.elapsed()
    );
    assert!(
        eventually(Duration::from_secs(60), async || {
            !info(&c, "m1", "flood").await.running
        })
        .await,
        "the flood never ended"
    );
    let r = read(&c, "m1", "flood", 0, true).await;
    assert_eq!(r.exit, Some((0, None)));
    // A reader that comes late reads what the buffer still holds, and is told what it lost.
    let lost: u64 = r.dropped.iter().map(|(from, to)| to - from).sum();
    assert!(lost > 0, "{:?}", r.dropped);
    assert_eq!(lost + r.stdout.len() as u64, 10_000_000);
    assert!(r.stdout.iter().all(|&b| b == b'a'));

    // Bad requests.
    let e = c.get_process("m1", "99999").await.unwrap_err();
    assert_eq!(code(e), ErrorCode::NotFound);
    let e = c.start_process("m1", &start(&[])).await.unwrap_err();
    assert_eq!(code(e), ErrorCode::Invalid);
    let e = c
        .start_process("m1", &start(&["/no/such/program"]))
        .await
        .unwrap_err();
    assert_eq!(code(e), ErrorCode::NotFound);
    let e = c.resize_process("m1", &cat, 10, 10).await.unwrap_err();
    assert_eq!(code(e), ErrorCode::Conflict);
    let e = c
        .signal_process("m1", &cat, SignalName::Name("NOPE".into()))
        .await
        .unwrap_err();
    assert_eq!(code(e), ErrorCode::Invalid);
    let e = c.list_processes("nope").await.unwrap_err();
    assert_eq!(code(e), ErrorCode::NotFound);

    // A process outlives a daemon killed without warning, and is attachable after.
    let mut ticker = start(&[
        "sh",
        "-c",
        "i=0; while true; do i=$((i+1)); echo tick $i; sleep 0.2; done",
    ]);
    ticker.tag = Some("ticker".into());
    ticker.stdin = false;
    c.start_process("m1", &ticker).await.unwrap();
    let e = c.start_process("m1", &ticker).await.unwrap_err();
    assert_eq!(code(e), ErrorCode::Conflict, "a running tag is taken");
    follow_until(&c, "m1", "ticker", 0, "tick 2\n").await;
    d.kill9();
    d.restart().await;
    let c = d.client.clone();
    let t = info(&c, "m1", "ticker").await;
    assert!(t.running, "{t:?}");
    let ticks = read(&c, "m1", "ticker", 0, false).await.stdout;
    let n = ticks.iter().filter(|&&b| b == b'\n').count();
    follow_until(&c, "m1", "ticker", 0, &format!("tick {}\n", n + 2)).await;
    assert!(c
        .list_processes("m1")
        .await
        .unwrap()
        .iter()
        .any(|p| p.tag.as_deref() == Some("lines") && !p.running && p.exit_code == Some(7)));

    // A snapshot keeps it: the restored machine lists it, with its output, and it runs on.
    c.create_snapshot("m1", "s1", SnapshotKind::Memory)
        .await
        .unwrap();
    c.restore("s1", &restore_req("s1", "m2")).await.unwrap();
    let t2 = info(&c, "m2", "ticker").await;
    assert!(t2.running && t2.pid == t.pid, "{t2:?}");
    let r = read(&c, "m2", "ticker", 0, false).await;
    assert!(String::from_utf8_lossy(&r.stdout).starts_with("tick 1\n"));
    let grown = t2.output_bytes;
    assert!(
        eventually(Duration::from_secs(20), async || {
            info(&c, "m2", "ticker").await.output_bytes > grown
        })
        .await,
        "the restored ticker does not tick"
    );
    for m in ["m1", "m2"] {
        c.signal_process(m, "ticker", SignalName::Number(9))
            .await
            .unwrap();
        assert_eq!(
            read(&c, m, "ticker", 0, true).await.exit,
            Some((137, Some(9)))
        );
    }
}
