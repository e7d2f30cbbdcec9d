mod image;

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "hearth",
    version,
    about = "Drive hearthd, the microVM host daemon"
)]
struct Cli {
    /// Data root of the daemon (images are built under it).
    #[arg(
        long,
        env = "HEARTH_ROOT",
        default_value = "/var/lib/hearth",
        global = true
    )]
    root: PathBuf,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Guest images.
    #[command(subcommand)]
    Image(ImageCmd),
}

#[derive(Subcommand)]
enum ImageCmd {
    /// Build the default guest image from Debian packages.
    Build {
        /// The static hearth-agent binary to install as /sbin/init.
        #[arg(long)]
        agent: Option<PathBuf>,
        /// Rebuild even when nothing changed.
        #[arg(long)]
        force: bool,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Image(ImageCmd::Build { agent, force }) => {
            let agent = agent.unwrap_or_else(default_agent_path);
            let opts = image::BuildOptions {
                dest: image::default_image_dir(&cli.root),
                agent,
                force,
            };
            image::build(&opts)?;
        }
    }
    Ok(())
}

fn default_agent_path() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("hearth-agent")))
        .unwrap_or_else(|| PathBuf::from("hearth-agent"))
}
