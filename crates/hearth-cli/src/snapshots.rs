//! Snapshot commands: create, list, delete, restore, fork.

use crate::machines::{report_machine, spinner};
use crate::network::NetworkArgs;
use crate::size::human;
use crate::{output, Ctx};
use anyhow::Result;
use clap::{Args, Subcommand};
use hearth_api::{ForkRequest, LocalSnapshotRef, RestoreRequest, Snapshot, SnapshotKind};
use std::time::Instant;

#[derive(Subcommand)]
pub enum SnapshotCmd {
    /// Snapshot a running machine (memory, device state and disks; --disk-only for disks).
    Create {
        machine: String,
        snapshot: String,
        #[arg(long)]
        disk_only: bool,
    },
    /// List snapshots, of one machine or of all.
    Ls { machine: Option<String> },
    /// Delete a snapshot (machines restored from it keep running).
    Rm { snapshots: Vec<String> },
}

#[derive(Args)]
pub struct RestoreArgs {
    pub snapshot: String,
    pub name: String,
    #[arg(long)]
    pub hostname: Option<String>,
    #[command(flatten)]
    pub net: NetworkArgs,
}

#[derive(Args)]
pub struct ForkArgs {
    pub source: String,
    pub name: String,
    #[arg(long)]
    pub hostname: Option<String>,
    #[command(flatten)]
    pub net: NetworkArgs,
}

pub async fn run(ctx: &Ctx, cmd: SnapshotCmd) -> Result<()> {
    match cmd {
        SnapshotCmd::Create {
            machine,
            snapshot,
            disk_only,
        } => {
            let kind = if disk_only {
                SnapshotKind::Disk
            } else {
                SnapshotKind::Memory
            };
            let bar = spinner(format!("snapshotting {machine}"));
            let t = Instant::now();
            let res = ctx.client.create_snapshot(&machine, &snapshot, kind).await;
            bar.finish_and_clear();
            let resp = res?;
            if ctx.json {
                output::print_json(&resp);
            } else {
                println!(
                    "snapshot {snapshot} of {machine} ({:.2} s)",
                    t.elapsed().as_secs_f64()
                );
                print_artifacts(&resp.snapshot);
            }
        }
        SnapshotCmd::Ls { machine } => {
            let list = ctx.client.list_snapshots(machine.as_deref()).await?;
            if ctx.json {
                output::print_json(&list);
            } else {
                let rows: Vec<Vec<String>> = list
                    .iter()
                    .map(|s| {
                        let bytes = s.artifacts.iter().map(|a| a.size_bytes).sum();
                        vec![
                            s.id.clone(),
                            s.machine_id.clone(),
                            format!("{:?}", s.kind).to_lowercase(),
                            format!("{} MiB", s.memory_mib),
                            human(bytes),
                            s.created_at.format("%Y-%m-%d %H:%M:%S").to_string(),
                        ]
                    })
                    .collect();
                output::table(
                    &["NAME", "MACHINE", "KIND", "MEMORY", "SIZE", "CREATED"],
                    &rows,
                );
            }
        }
        SnapshotCmd::Rm { snapshots } => {
            for s in snapshots {
                ctx.client.delete_snapshot(&s).await?;
                if !ctx.json {
                    println!("snapshot {s} deleted");
                }
            }
        }
    }
    Ok(())
}

fn print_artifacts(s: &Snapshot) {
    let rows: Vec<Vec<String>> = s
        .artifacts
        .iter()
        .map(|a| {
            vec![
                a.name.clone(),
                human(a.size_bytes),
                a.sha256_hex.clone().unwrap_or_default(),
            ]
        })
        .collect();
    output::table(&["ARTIFACT", "SIZE", "SHA256"], &rows);
}

/// Restores `snapshot` into a new machine `name`.
pub async fn restore_local(
    ctx: &Ctx,
    snapshot: &str,
    name: &str,
    hostname: Option<String>,
    net: &NetworkArgs,
) -> Result<hearth_api::Machine> {
    let mut req = restore_request(ctx, snapshot, name, hostname).await?;
    req.network = net.request(false);
    req.ports = net.ports()?;
    Ok(ctx.client.restore(snapshot, &req).await?)
}

/// A request restoring this host's `snapshot` as `name`, with the source's artifact.
pub async fn restore_request(
    ctx: &Ctx,
    snapshot: &str,
    name: &str,
    hostname: Option<String>,
) -> Result<RestoreRequest> {
    let snap = ctx.client.get_snapshot(snapshot).await?;
    Ok(RestoreRequest {
        machine_id: name.to_string(),
        artifact: snap.artifact,
        memory_mib: None,
        storage_bytes: None,
        local_snapshot: Some(LocalSnapshotRef {
            snapshot_id: snapshot.to_string(),
        }),
        snapshot: None,
        guest_config: hostname.map(|h| hearth_api::GuestConfig {
            hostname: Some(h),
            ..Default::default()
        }),
        network: None,
        ports: None,
        vmm: None,
    })
}

pub async fn restore(ctx: &Ctx, args: RestoreArgs) -> Result<()> {
    let bar = spinner(format!("restoring {} from {}", args.name, args.snapshot));
    let t = Instant::now();
    let res = restore_local(ctx, &args.snapshot, &args.name, args.hostname, &args.net).await;
    bar.finish_and_clear();
    report_machine(ctx, &res?, &format!("restored from {}", args.snapshot), t);
    Ok(())
}

/// A new machine continuing from `source`'s present instant: one server operation, undone as a
/// whole if it fails (or the daemon dies) midway.
pub async fn fork(ctx: &Ctx, args: ForkArgs) -> Result<()> {
    let (source, name) = (&args.source, &args.name);
    let bar = spinner(format!("forking {source} into {name}"));
    let t = Instant::now();
    let req = ForkRequest {
        machine_id: name.to_string(),
        guest_config: args.hostname.map(|h| hearth_api::GuestConfig {
            hostname: Some(h),
            ..Default::default()
        }),
        network: args.net.request(false),
        ports: args.net.ports()?,
    };
    let res = ctx.client.fork(source, &req).await;
    bar.finish_and_clear();
    report_machine(ctx, &res?, &format!("forked from {source}"), t);
    Ok(())
}
