//! `hearth-bench hostile`: what a hostile guest costs everyone else. One machine runs each
//! attack in turn — a console flood, a memory hog, a fork bomb, a disk filler — while the bench
//! samples the host's memory (the daemon's and both VMMs' RSS), the daemon's API latency
//! (`GET /machines`) and a second, quiet machine's exec latency, against the same figures with
//! the hostile machine idle, in the same run. After each attack the hostile machine must still
//! answer an exec.

use super::{image_artifact, median, ms, Daemon};
use anyhow::{Context, Result};
use hearth_api::client::Client;
use hearth_api::{CreateMachineRequest, ExecRequest};
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

pub async fn run(image: &Path, seconds: u64) -> Result<()> {
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
    let attacks: [(&str, &str); 4] = [
        ("console flood", "yes hostile-console-flood > /dev/console"),
        ("memory hog", "a=x; while true; do a=$a$a; done"),
        ("fork bomb", "b(){ b|b& }; b"),
        ("disk filler", "cat /dev/zero > /var/tmp/fill; sleep 1000"),
    ];
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
    for (name, script) in attacks {
        let hostile = {
            let c = c.clone();
            let script = script.to_string();
            let ms = seconds * 1000;
            tokio::spawn(async move { c.exec("hostile", &sh(&script, Some(ms))).await })
        };
        let s = sample(&c, &root, daemon.pid(), span).await?;
        let _ = tokio::time::timeout(Duration::from_secs(120), hostile).await;
        let t = Instant::now();
        let after = match tokio::time::timeout(
            Duration::from_secs(60),
            c.exec("hostile", &sh("rm -f /var/tmp/fill; echo ok", None)),
        )
        .await
        {
            Ok(Ok(r)) if r.stdout == "ok\n" => ms(t.elapsed()),
            Ok(Ok(r)) => format!("odd: {:?}", r.stdout),
            Ok(Err(e)) => format!("failed: {e}"),
            Err(_) => "no answer in 60 s".into(),
        };
        line(name, s, after);
    }
    for id in ["hostile", "quiet"] {
        let _ = c.delete_machine(id).await;
    }
    Ok(())
}
