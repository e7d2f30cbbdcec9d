//! `hearth demo`: the README's main job against a running daemon, with timings: create, exec,
//! snapshot, restore, fork, stop, start, delete.

use crate::machines::image_artifact;
use crate::snapshots::restore_request;
use crate::{output, Ctx};
use anyhow::{ensure, Result};
use clap::Args;
use hearth_api::{
    CreateMachineRequest, ExecRequest, ExecResponse, ForkRequest, PublishPortRequest, SnapshotKind,
};
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct DemoArgs {
    /// Name of the demo machine (replaced if it exists; its clones get suffixes).
    #[arg(long, default_value = "demo")]
    pub name: String,
    /// Keep the machines at the end instead of deleting them.
    #[arg(long)]
    pub keep: bool,
}

#[derive(Default)]
struct Report {
    rows: Vec<Vec<String>>,
}

impl Report {
    fn step(&mut self, what: &str, took: Duration, note: impl Into<String>) {
        let ms = format!("{:.1} ms", took.as_secs_f64() * 1000.0);
        let note = note.into();
        println!("  {what:<30} {ms:>11}  {note}");
        self.rows.push(vec![what.to_string(), ms, note]);
    }

    fn note(&mut self, what: &str, note: impl Into<String>) {
        let note = note.into();
        println!("  {what:<30} {:>11}  {note}", "");
        self.rows.push(vec![what.to_string(), String::new(), note]);
    }
}

fn phase(timings: &[(String, f64)], name: &str) -> String {
    timings
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, ms)| format!("{ms:.1} ms"))
        .unwrap_or_else(|| "?".into())
}

pub async fn run(ctx: &Ctx, args: DemoArgs) -> Result<()> {
    let c = &ctx.client;
    c.health().await?;
    let artifact = image_artifact(&ctx.root, "default")?;
    let name = args.name;
    let (restored, forked, snap) = (
        format!("{name}-restored"),
        format!("{name}-fork"),
        format!("{name}-snap"),
    );
    for m in [&name, &restored, &forked] {
        c.delete_machine(m).await?;
    }
    if c.get_snapshot(&snap).await.is_ok() {
        c.delete_snapshot(&snap).await?;
    }
    let exec = |m: &str, script: &str| {
        let req = ExecRequest {
            command: vec!["sh".into(), "-c".into(), script.into()],
            ..Default::default()
        };
        let m = m.to_string();
        async move { c.exec(&m, &req).await }
    };
    let mut report = Report::default();
    println!("hearth demo: machine {name} from the default image");

    let t = Instant::now();
    let m = c
        .create_machine(&CreateMachineRequest {
            machine_id: name.clone(),
            artifact,
            memory_mib: None,
            vcpus: None,
            storage_bytes: None,
            user_volume_ids: None,
            guest_config: None,
            network: None,
            ports: Some(vec![PublishPortRequest {
                published_port_id: "http".into(),
                name: None,
                port: 80,
                protocol: None,
                host_port: None,
            }]),
            vmm: None,
            cold: None,
        })
        .await?;
    report.step(
        "create → running",
        t.elapsed(),
        format!("{} MiB, {} vCPU", m.memory_mib, m.vcpus),
    );

    // Its own network: a web server in the guest, reached from the host through the published
    // port on loopback (no packet leaves this host).
    if let (Some(net), Some(port)) = (&m.network, m.ports.first().and_then(|p| p.host_port)) {
        let r = exec(
            &name,
            "mkdir -p /www && echo served-by-the-guest > /www/index.html && httpd -p 80 -h /www",
        )
        .await?;
        ensure!(r.exit_code == 0, "httpd failed: {}", r.stderr);
        let t = Instant::now();
        let page = http_get(port).await?;
        report.step(
            "published port (host → guest)",
            t.elapsed(),
            format!(
                "127.0.0.1:{port} → {}:80 answers {:?}; guest {} in namespace {}",
                net.host_ip,
                page.trim(),
                net.guest_ip,
                net.namespace
            ),
        );
    }

    let t = Instant::now();
    let r = exec(&name, "uname -r").await?;
    ensure!(r.exit_code == 0, "uname failed: {}", r.stderr);
    report.step(
        "exec uname -r",
        t.elapsed(),
        format!("kernel {}", r.stdout.trim()),
    );

    let mut rtts = Vec::new();
    for _ in 0..10 {
        let t = Instant::now();
        exec(&name, "true").await?;
        rtts.push(t.elapsed());
    }
    rtts.sort();
    report.step(
        "exec round trip (median)",
        rtts[rtts.len() / 2],
        "of 10 × `true`",
    );

    // A counter in tmpfs: memory only, so it survives a restore only if memory does.
    exec(
        &name,
        "(i=0; while true; do i=$((i+1)); echo $i > /tmp/counter.new; mv /tmp/counter.new /tmp/counter; sleep 0.1; done) >/dev/null 2>&1 &",
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let before = counter(&exec(&name, "cat /tmp/counter").await?);
    let t = Instant::now();
    let (_, timings) = c
        .create_snapshot_timed(&name, &snap, SnapshotKind::Memory)
        .await?;
    report.step(
        "snapshot (memory)",
        t.elapsed(),
        format!(
            "paused {} ; memory and disk hashed when an upload needs them",
            phase(&timings, "paused")
        ),
    );

    let t = Instant::now();
    let req = restore_request(ctx, &snap, &restored, None).await?;
    let (_, timings) = c.restore_timed(&snap, &req).await?;
    report.step(
        "restore → agent ready",
        t.elapsed(),
        format!("VM running after {}", phase(&timings, "running")),
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = exec(&restored, "cat /tmp/counter; hostname").await?;
    let lines: Vec<&str> = r.stdout.lines().collect();
    let restored_counter: u64 = lines.first().and_then(|l| l.parse().ok()).unwrap_or(0);
    ensure!(
        restored_counter >= before,
        "the counter did not continue in the restored machine: {restored_counter} < {before}"
    );
    report.note(
        "process continued after restore",
        format!(
            "counter {restored_counter} (was {before} just before the snapshot), hostname {}",
            lines.get(1).unwrap_or(&"?")
        ),
    );

    let t = Instant::now();
    let fork = ForkRequest {
        machine_id: forked.clone(),
        guest_config: None,
        network: None,
        ports: None,
    };
    let (_, timings) = c.fork_timed(&name, &fork).await?;
    report.step(
        "fork (one operation)",
        t.elapsed(),
        format!(
            "{name} → {forked}; source paused {}",
            phase(&timings, "paused")
        ),
    );
    exec(&forked, "echo only-in-fork > /root/f").await?;
    let seen = exec(&name, "cat /root/f 2>/dev/null || echo absent").await?;
    report.note(
        "fork is independent",
        format!(
            "file written in the fork, in {name}: {}",
            seen.stdout.trim()
        ),
    );

    exec(&name, "echo written-before-stop > /root/demo.txt && sync").await?;
    let t = Instant::now();
    c.stop_machine(&name).await?;
    report.step("stop (guest power-off)", t.elapsed(), "");
    let t = Instant::now();
    c.start_machine(&name).await?;
    report.step(
        "start → running",
        t.elapsed(),
        "cold boot from the same disk",
    );
    let r = exec(&name, "cat /root/demo.txt").await?;
    ensure!(
        r.stdout.trim() == "written-before-stop",
        "the file written before the stop is gone"
    );
    report.note("disk survived stop + start", r.stdout.trim());

    if !args.keep {
        let t = Instant::now();
        for m in [&forked, &restored, &name] {
            c.delete_machine(m).await?;
        }
        c.delete_snapshot(&snap).await?;
        report.step("delete 3 machines + snapshot", t.elapsed(), "");
    }
    if ctx.json {
        output::print_json(&report.rows);
    }
    println!("demo finished");
    Ok(())
}

fn counter(r: &ExecResponse) -> u64 {
    r.stdout.trim().parse().unwrap_or(0)
}

/// The body of `GET /` on 127.0.0.1:`port`, over a plain TCP connection.
async fn http_get(port: u16) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    conn.write_all(b"GET / HTTP/1.0\r\n\r\n").await?;
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut answer)).await??;
    let answer = String::from_utf8_lossy(&answer);
    Ok(answer
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default())
}
