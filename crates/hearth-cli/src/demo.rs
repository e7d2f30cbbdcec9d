//! `hearth demo`: the README's main job against a running daemon, with timings.

use crate::machines::image_artifact;
use crate::{output, Ctx};
use anyhow::{ensure, Result};
use clap::Args;
use hearth_api::{CreateMachineRequest, ExecRequest};
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct DemoArgs {
    /// Name of the demo machine (replaced if it exists).
    #[arg(long, default_value = "demo")]
    pub name: String,
    /// Keep the machine at the end instead of deleting it.
    #[arg(long)]
    pub keep: bool,
}

struct Report {
    rows: Vec<Vec<String>>,
}

impl Report {
    fn step(&mut self, what: &str, took: Duration, note: impl Into<String>) {
        println!(
            "  {what:<26} {:>9.1} ms  {}",
            took.as_secs_f64() * 1000.0,
            note.into()
        );
        self.rows.push(vec![
            what.to_string(),
            format!("{:.1} ms", took.as_secs_f64() * 1000.0),
        ]);
    }
}

fn exec_req(cmd: &[&str]) -> ExecRequest {
    ExecRequest {
        command: cmd.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

pub async fn run(ctx: &Ctx, args: DemoArgs) -> Result<()> {
    let c = &ctx.client;
    c.health().await?;
    let artifact = image_artifact(&ctx.root, "default")?;
    let name = args.name;
    c.delete_machine(&name).await?;
    let mut report = Report { rows: Vec::new() };
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
        })
        .await?;
    report.step(
        "create → running",
        t.elapsed(),
        format!("{} MiB, {} vCPU", m.memory_mib, m.vcpus),
    );

    let t = Instant::now();
    let r = c.exec(&name, &exec_req(&["uname", "-r"])).await?;
    ensure!(r.exit_code == 0, "uname failed: {}", r.stderr);
    report.step(
        "exec uname -r",
        t.elapsed(),
        format!("kernel {}", r.stdout.trim()),
    );

    let mut rtts = Vec::new();
    for _ in 0..10 {
        let t = Instant::now();
        c.exec(&name, &exec_req(&["true"])).await?;
        rtts.push(t.elapsed());
    }
    rtts.sort();
    report.step(
        "exec round trip (median)",
        rtts[rtts.len() / 2],
        "of 10 × `true`",
    );

    c.exec(
        &name,
        &exec_req(&["sh", "-c", "echo written-before-stop > /root/demo.txt"]),
    )
    .await?;
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

    let r = c.exec(&name, &exec_req(&["cat", "/root/demo.txt"])).await?;
    ensure!(
        r.stdout.trim() == "written-before-stop",
        "the file written before the stop is gone: {:?}",
        r.stdout
    );
    println!(
        "  {:<26} {:>12}  {}",
        "disk survived stop+start",
        "",
        r.stdout.trim()
    );

    if !args.keep {
        let t = Instant::now();
        c.delete_machine(&name).await?;
        report.step("delete", t.elapsed(), "");
    }
    if ctx.json {
        output::print_json(&report.rows);
    }
    println!("demo finished");
    Ok(())
}
