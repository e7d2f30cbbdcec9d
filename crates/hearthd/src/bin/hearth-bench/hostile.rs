//! `hearth-bench hostile`: what a hostile guest costs everyone else. One machine runs each
//! attack in turn — a console flood, a memory hog, a fork bomb, a disk filler, and on the agent
//! channel itself an endless message and a flood of replies nobody asked for (written by a root
//! process that takes the agent's port descriptor, `channel_attack.c`) — while the bench
//! samples the host's memory (the daemon's and both VMMs' RSS), the daemon's API latency
//! (`GET /machines`) and a second, quiet machine's exec latency, against the same figures with
//! the hostile machine idle, in the same run. After each attack the hostile machine must still
//! answer an exec.

use super::{image_artifact, median, ms, Daemon};
use anyhow::{Context, Result};
use hearth_api::client::{Client, UploadOptions};
use hearth_api::{CreateMachineRequest, ExecRequest};
use hearth_proto::frame::{self, MAX_PAYLOAD};
use hearth_proto::{encode, GuestMessage, Reply};
use std::path::Path;
use std::time::{Duration, Instant};

fn sh(script: &str, timeout_ms: Option<u64>) -> ExecRequest {
    ExecRequest {
        command: vec!["sh".into(), "-c".into(), script.into()],
        timeout_ms,
        ..Default::default()
    }
}

/// Resident memory of `pid` in MiB (0 when it is gone).
fn rss_mib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .unwrap_or(0)
        / 1024
}

fn vmm_pid(root: &Path, id: &str) -> Option<u32> {
    let paths = hearthd::service::machine_paths(root, id);
    // "pid start-time"
    std::fs::read_to_string(paths.sock_dir.join("vmm.pid"))
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

struct Sample {
    api: Vec<Duration>,
    exec: Vec<Duration>,
    host_mib: u64,
}

/// Samples for `span`: API and quiet-machine exec latency, and the peak of the daemon's and the
/// VMMs' RSS.
/// The channel attacker, compiled for the guest (static: the image has no C library to spare).
const ATTACKER_SOURCE: &str = include_str!("channel_attack.c");

/// Builds the channel attacker and its two payloads in `dir` and uploads them into the
/// hostile machine's /var/tmp: `endless` (one part of a message, sent again and again, so the
/// message never ends) and `replies` (replies and stream data for ids nobody asked about).
/// None when there is no C compiler.
async fn arm_channel_attacks(c: &Client, dir: &Path) -> Result<bool> {
    let source = dir.join("channel_attack.c");
    let binary = dir.join("channel-attack");
    std::fs::write(&source, ATTACKER_SOURCE)?;
    let built = tokio::process::Command::new("cc")
        .args(["-static", "-O2", "-o"])
        .arg(&binary)
        .arg(&source)
        .status()
        .await;
    if !built.is_ok_and(|s| s.success()) {
        return Ok(false);
    }
    let mut endless = Vec::new();
    frame::encode_message(&vec![b' '; 2 * MAX_PAYLOAD], &mut endless);
    endless.truncate(frame::HEADER_LEN + MAX_PAYLOAD);
    let mut replies = Vec::new();
    for i in 0..20_000u64 {
        let id = i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        replies.extend(encode(&GuestMessage::Reply {
            id,
            body: Reply::Done,
            stream: i % 2 == 0,
        }));
        replies.extend_from_slice(&frame::data_header(id, 64));
        replies.extend_from_slice(&[0u8; 64]);
    }
    std::fs::write(dir.join("endless"), endless)?;
    std::fs::write(dir.join("replies"), replies)?;
    for (name, mode) in [
        ("channel-attack", 0o755),
        ("endless", 0o644),
        ("replies", 0o644),
    ] {
        let file = tokio::fs::File::open(dir.join(name)).await?;
        let len = file.metadata().await?.len();
        let opts = UploadOptions {
            mode: Some(mode),
            user: None,
        };
        c.upload(
            "hostile",
            &format!("/var/tmp/{name}"),
            opts,
            file,
            len,
            |_, _| {},
        )
        .await
        .with_context(|| format!("uploading {name}"))?;
    }
    Ok(true)
}

/// How long after an attack until the hostile machine answers an exec again: tries of 5 s
/// each (a call whose reply the attack swallowed waits for nothing), for two minutes at most.
async fn recovery(c: &Client) -> String {
    let t = Instant::now();
    let mut tries = 0;
    let req = sh("rm -f /var/tmp/fill; echo ok", Some(4000));
    while t.elapsed() < Duration::from_secs(120) {
        tries += 1;
        let exec = c.exec("hostile", &req);
        match tokio::time::timeout(Duration::from_secs(5), exec).await {
            Ok(Ok(r)) if r.stdout == "ok\n" => {
                return match tries {
                    1 => ms(t.elapsed()),
                    n => format!("{} ({n} tries)", ms(t.elapsed())),
                }
            }
            Ok(Ok(r)) => return format!("odd: {:?}", r.stdout),
            Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(_) => {}
        }
    }
    format!("no answer in {tries} tries")
}

async fn sample(c: &Client, root: &Path, daemon_pid: u32, span: Duration) -> Result<Sample> {
    let mut s = Sample {
        api: Vec::new(),
        exec: Vec::new(),
        host_mib: 0,
    };
    let end = Instant::now() + span;
    while Instant::now() < end {
        let t = Instant::now();
        c.list_machines().await?;
        s.api.push(t.elapsed());
        let t = Instant::now();
        c.exec("quiet", &sh("true", None)).await?;
        s.exec.push(t.elapsed());
        let host = rss_mib(daemon_pid)
            + ["hostile", "quiet"]
                .iter()
                .filter_map(|m| vmm_pid(root, m))
                .map(rss_mib)
                .sum::<u64>();
        s.host_mib = s.host_mib.max(host);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(s)
}

pub async fn run(image: &Path, seconds: u64, only: &[String]) -> Result<()> {
    let work = tempfile::Builder::new()
        .prefix("hbench")
        .tempdir_in("/tmp")?;
    let root = work.path().join("root");
    let daemon = Daemon::start(&root, image).await?;
    let c = daemon.client.clone();
    for id in ["hostile", "quiet"] {
        c.create_machine(&CreateMachineRequest {
            machine_id: id.into(),
            artifact: image_artifact(image),
            memory_mib: Some(256),
            storage_bytes: Some(1 << 30),
            ..Default::default()
        })
        .await
        .with_context(|| format!("creating {id}"))?;
    }
    let span = Duration::from_secs(seconds);
    let endless = format!("/var/tmp/channel-attack /var/tmp/endless {seconds}");
    let replies = format!("/var/tmp/channel-attack /var/tmp/replies {seconds}");
    let mut attacks: Vec<(&str, &str)> = vec![
        ("console flood", "yes hostile-console-flood > /dev/console"),
        ("memory hog", "a=x; while true; do a=$a$a; done"),
        ("fork bomb", "b(){ b|b& }; b"),
        ("disk filler", "cat /dev/zero > /var/tmp/fill; sleep 1000"),
    ];
    if arm_channel_attacks(&c, work.path()).await? {
        attacks.push(("endless message", &endless));
        attacks.push(("reply flood", &replies));
    } else {
        println!("skipped: the agent channel attacks (no C compiler, `cc -static`)");
    }
    println!(
        "hostile guest benchmark ({seconds} s per attack, 256 MiB guests; medians, host peak RSS)"
    );
    println!(
        "  {:<14} {:>10} {:>14} {:>12} {:>18}",
        "attack", "API", "quiet exec", "host MiB", "hostile exec after"
    );
    let idle = sample(&c, &root, daemon.pid(), span).await?;
    let line = |name: &str, mut s: Sample, after: String| {
        println!(
            "  {:<14} {:>10} {:>14} {:>12} {:>18}",
            name,
            ms(median(&mut s.api)),
            ms(median(&mut s.exec)),
            s.host_mib,
            after
        )
    };
    line("(idle)", idle, String::new());
    let chosen = |name: &str| only.is_empty() || only.iter().any(|o| name.contains(o.as_str()));
    for (name, script) in attacks.into_iter().filter(|(name, _)| chosen(name)) {
        let hostile = {
            let c = c.clone();
            let script = script.to_string();
            let ms = seconds * 1000;
            tokio::spawn(async move { c.exec("hostile", &sh(&script, Some(ms))).await })
        };
        let s = sample(&c, &root, daemon.pid(), span).await?;
        let _ = tokio::time::timeout(Duration::from_secs(120), hostile).await;
        let after = recovery(&c).await;
        line(name, s, after);
    }
    for id in ["hostile", "quiet"] {
        let _ = c.delete_machine(id).await;
    }
    Ok(())
}
