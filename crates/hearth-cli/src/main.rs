//! `hearth`: the command-line client of hearthd, and the guest image builder.

mod cp;
mod demo;
mod image;
mod machines;
mod network;
mod output;
mod processes;
mod remote;
mod size;
mod snapshots;
mod terminal;

use anyhow::Result;
use clap::{Parser, Subcommand};
use hearth_api::client::Client;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "hearth",
    version,
    about = "Drive hearthd, the microVM host daemon"
)]
struct Cli {
    /// Data root of the daemon; the default image is built under it.
    #[arg(
        long,
        env = "HEARTH_ROOT",
        default_value = "/var/lib/hearth",
        global = true
    )]
    root: PathBuf,
    /// The daemon's API socket (default: <root>/hearthd.sock).
    #[arg(long, env = "HEARTH_SOCKET", global = true)]
    socket: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Guest images.
    #[command(subcommand)]
    Image(ImageCmd),
    /// Check that the daemon answers.
    Health,
    /// Create a machine and wait until it runs.
    Create(machines::CreateArgs),
    /// List machines.
    Ls,
    /// Show one machine.
    Get { name: String },
    /// Run a command in a machine: its output streams as it comes, its exit status is passed
    /// through (`-d` in the background, `-it` attached to a terminal; `--json` or `--timeout`:
    /// buffered, all output at the end).
    Exec(processes::ExecArgs),
    /// Processes started in a machine: running ones and recently exited ones.
    Ps { name: String },
    /// A process's output from its start (stdout and stderr kept apart).
    Logs {
        name: String,
        /// A pid or a tag.
        process: String,
        /// Go on printing output as it comes, until the process exits.
        #[arg(long, short = 'f')]
        follow: bool,
    },
    /// Send a signal to a process (and its process group).
    Kill {
        name: String,
        /// A pid or a tag.
        process: String,
        /// A signal name (TERM, SIGKILL) or number.
        #[arg(long, short = 's', default_value = "TERM")]
        signal: String,
    },
    /// Copy files or directories between this host and a machine, as `docker cp` does.
    Cp(cp::CpArgs),
    /// Stop a machine (the guest powers off; killed after a timeout).
    Stop { name: String },
    /// Start a stopped or failed machine.
    Start { name: String },
    /// Delete a machine and everything it has.
    Rm { names: Vec<String> },
    /// Snapshots.
    #[command(subcommand)]
    Snapshot(snapshots::SnapshotCmd),
    /// Restore a snapshot into a new machine.
    Restore(snapshots::RestoreArgs),
    /// Fork a running machine: a new machine continuing from its present instant.
    Fork(snapshots::ForkArgs),
    /// Published ports.
    #[command(subcommand)]
    Port(network::PortCmd),
    /// Machines' networks.
    #[command(subcommand)]
    Network(network::NetworkCmd),
    /// Upload a snapshot to s3://bucket/prefix (endpoint and keys from AWS_* variables).
    Push { snapshot: String, dest: String },
    /// Restore s3://bucket/prefix/SNAPSHOT as a new machine.
    Pull { source: String, name: String },
    /// Remove cached blobs (kernels, root filesystems, downloaded snapshot artifacts) that no
    /// machine or snapshot needs and no operation is using, and the templates of their images.
    Gc,
    /// Walk through the main job: create, exec, snapshot, restore, fork, stop, start, delete,
    /// with timings.
    Demo(demo::DemoArgs),
}

#[derive(Subcommand)]
enum ImageCmd {
    /// Build the default guest image from Debian packages.
    Build {
        /// The static hearth-agent binary to install as /sbin/init (default: next to `hearth`).
        #[arg(long)]
        agent: Option<PathBuf>,
        /// Rebuild even when nothing changed.
        #[arg(long)]
        force: bool,
    },
}

pub struct Ctx {
    pub root: PathBuf,
    pub client: Client,
    pub json: bool,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let socket = cli
        .socket
        .clone()
        .unwrap_or_else(|| cli.root.join("hearthd.sock"));
    let ctx = Ctx {
        root: cli.root.clone(),
        client: Client::new(socket),
        json: cli.json,
    };
    match run(cli.command, &ctx).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("hearth: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cmd: Cmd, ctx: &Ctx) -> Result<ExitCode> {
    match cmd {
        Cmd::Image(ImageCmd::Build { agent, force }) => {
            let opts = image::BuildOptions {
                dest: image::default_image_dir(&ctx.root),
                agent: agent.unwrap_or_else(default_agent_path),
                force,
            };
            let outcome = tokio::task::spawn_blocking(move || image::build(&opts)).await??;
            let (built, manifest) = match outcome {
                image::Outcome::Built(m) => (true, m),
                image::Outcome::UpToDate(m) => (false, m),
            };
            if ctx.json {
                output::print_json(&serde_json::json!({ "built": built, "manifest": manifest }));
            } else {
                output::print_manifest(&manifest);
            }
        }
        Cmd::Health => {
            let h = ctx.client.health().await?;
            if ctx.json {
                output::print_json(&h);
            } else {
                println!("hearthd at {} is up", ctx.client.socket().display());
            }
        }
        Cmd::Create(args) => machines::create(ctx, args).await?,
        Cmd::Ls => machines::list(ctx).await?,
        Cmd::Get { name } => machines::get(ctx, &name).await?,
        Cmd::Exec(args) => return processes::exec(ctx, args).await,
        Cmd::Ps { name } => processes::ps(ctx, &name).await?,
        Cmd::Logs {
            name,
            process,
            follow,
        } => processes::logs(ctx, &name, &process, follow).await?,
        Cmd::Kill {
            name,
            process,
            signal,
        } => processes::kill(ctx, &name, &process, &signal).await?,
        Cmd::Cp(args) => cp::cp(ctx, args).await?,
        Cmd::Stop { name } => machines::stop(ctx, &name).await?,
        Cmd::Start { name } => machines::start(ctx, &name).await?,
        Cmd::Rm { names } => machines::remove(ctx, &names).await?,
        Cmd::Snapshot(cmd) => snapshots::run(ctx, cmd).await?,
        Cmd::Restore(args) => snapshots::restore(ctx, args).await?,
        Cmd::Fork(args) => snapshots::fork(ctx, args).await?,
        Cmd::Port(cmd) => network::port(ctx, cmd).await?,
        Cmd::Network(cmd) => network::network(ctx, cmd).await?,
        Cmd::Push { snapshot, dest } => remote::push(ctx, &snapshot, &dest).await?,
        Cmd::Pull { source, name } => remote::pull(ctx, &source, &name).await?,
        Cmd::Gc => {
            let r = ctx.client.gc().await?;
            if ctx.json {
                output::print_json(&r);
            } else {
                println!(
                    "removed {} blob(s) and {} template(s), freed {}",
                    r.removed_blobs,
                    r.removed_templates,
                    size::human(r.freed_bytes)
                );
            }
        }
        Cmd::Demo(args) => demo::run(ctx, args).await?,
    }
    Ok(ExitCode::SUCCESS)
}

fn default_agent_path() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("hearth-agent")))
        .unwrap_or_else(|| PathBuf::from("hearth-agent"))
}
