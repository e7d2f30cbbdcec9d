//! `hearth-bench files`: moving file contents through the API (upload and download of a file)
//! against the raw throughput of the same agent channel (bytes written straight onto it, no
//! framing, no daemon in between, into and out of the same guest file, measured on the same
//! machine in the same run); the exec round trip; a process's start → its first output byte.

use super::{image_artifact, median, ms, Daemon};
use anyhow::{Context, Result};
use futures_util::StreamExt;
use hearth_api::client::UploadOptions;
use hearth_api::{
    CreateMachineRequest, ExecRequest, FileOp, FileOperation, OutputEvent, StartProcess,
};
use hearthd::agent::AgentClient;
use hearthd::service::machine_paths;
use std::path::Path;
use std::time::{Duration, Instant};

/// In the guest's tmpfs: the benchmark measures the channel, not the guest's disk under TCG.
const BENCH_FILE: &str = "/dev/shm/bench.bin";

pub async fn run(image: &Path, mib: u64, rounds: usize) -> Result<()> {
    let work = tempfile::Builder::new()
        .prefix("hbench")
        .tempdir_in("/tmp")?;
    let root = work.path().join("root");
    let mut daemon = Daemon::start(&root, image).await?;
    let c = daemon.client.clone();
    let id = "files";
    c.create_machine(&CreateMachineRequest {
        machine_id: id.into(),
        artifact: image_artifact(image),
        memory_mib: Some(1024),
        storage_bytes: Some(2 << 30),
        ..Default::default()
    })
    .await?;
    let bytes = mib << 20;
    let data = bytes::Bytes::from(
        (0..bytes)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect::<Vec<u8>>(),
    );

    let (mut up, mut down) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let t = Instant::now();
        c.upload(
            id,
            BENCH_FILE,
            UploadOptions::default(),
            std::io::Cursor::new(data.clone()),
            bytes,
            |_, _| {},
        )
        .await?;
        up.push(t.elapsed());
        let t = Instant::now();
        let n = c
            .download(
                id,
                BENCH_FILE,
                None,
                None,
                &mut tokio::io::sink(),
                |_, _| {},
            )
            .await?;
        down.push(t.elapsed());
        anyhow::ensure!(n == bytes, "downloaded {n} of {bytes} bytes");
        c.file_op(id, &FileOp::new(FileOperation::Remove, BENCH_FILE))
            .await?;
    }

    let mut rtts = Vec::new();
    for _ in 0..30 {
        let t = Instant::now();
        c.exec(
            id,
            &ExecRequest {
                command: vec!["true".into()],
                ..Default::default()
            },
        )
        .await?;
        rtts.push(t.elapsed());
    }
    let mut first_bytes = Vec::new();
    for _ in 0..10 {
        let t = Instant::now();
        let p = c
            .start_process(
                id,
                &StartProcess {
                    command: vec!["echo".into(), "hi".into()],
                    ..Default::default()
                },
            )
            .await?;
        let mut events = c.process_output(id, &p.pid.to_string(), 0, true).await?;
        while let Some(ev) = events.next().await {
            if matches!(ev?, OutputEvent::Output { .. }) {
                break;
            }
        }
        first_bytes.push(t.elapsed());
    }

    // The raw channel: the daemon steps aside (its machines run on), the bench speaks to the
    // agent itself.
    daemon.stop();
    let agent = AgentClient::new(
        tokio::net::UnixStream::connect(machine_paths(&root, id).agent_socket()).await?,
    );
    agent
        .handshake(
            "bench",
            Instant::now() + Duration::from_secs(10),
            || true,
            || None,
        )
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let (mut raw_up, mut raw_down) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let t = Instant::now();
        agent
            .raw_sink(bytes, Some(BENCH_FILE.into()))
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        raw_up.push(t.elapsed());
        let t = Instant::now();
        agent
            .raw_source(bytes, Some(BENCH_FILE.into()))
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        raw_down.push(t.elapsed());
    }
    drop(agent);
    daemon.restart().await.context("restarting hearthd")?;
    daemon.client.delete_machine(id).await?;

    let rate = |d: Duration| bytes as f64 / (1 << 20) as f64 / d.as_secs_f64();
    let (up, down) = (median(&mut up), median(&mut down));
    let (raw_up, raw_down) = (median(&mut raw_up), median(&mut raw_down));
    println!("files benchmark ({mib} MiB, {rounds} rounds, medians)");
    for (what, api, raw) in [("upload", up, raw_up), ("download", down, raw_down)] {
        let ratio = rate(api) / rate(raw);
        println!(
            "  {what:<9} API {:>8.1} MiB/s  raw channel {:>8.1} MiB/s  ratio {ratio:.2} (target ≥ 0.7: {})",
            rate(api),
            rate(raw),
            if ratio >= 0.7 { "met" } else { "NOT met" }
        );
    }
    println!(
        "  exec round trip                 {:>10}  (median of 30)",
        ms(median(&mut rtts))
    );
    println!(
        "  process start → first byte     {:>10}  (median of 10)",
        ms(median(&mut first_bytes))
    );
    Ok(())
}
