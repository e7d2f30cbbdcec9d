//! Machine commands.

use crate::image::{default_image_dir, Manifest};
use crate::network::NetworkArgs;
use crate::{output, size, Ctx};
use anyhow::{bail, Context, Result};
use clap::Args;
use hearth_api::{ArtifactRef, CreateMachineRequest, GuestConfig};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::Path;
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct CreateArgs {
    pub name: String,
    /// Guest memory in MiB.
    #[arg(long)]
    pub memory: Option<u32>,
    #[arg(long)]
    pub vcpus: Option<u32>,
    /// System disk size (e.g. 2G).
    #[arg(long, value_parser = size::parse_bytes)]
    pub disk: Option<u64>,
    #[arg(long)]
    pub hostname: Option<String>,
    /// The image: `default` (built by `hearth image build`). Ignored when URLs are given.
    #[arg(long, default_value = "default")]
    pub image: String,
    /// Kernel URL (http, https or file), instead of an image.
    #[arg(long, requires = "rootfs")]
    pub kernel: Option<String>,
    /// Root filesystem URL, instead of an image.
    #[arg(long, requires = "kernel")]
    pub rootfs: Option<String>,
    #[arg(long)]
    pub initrd: Option<String>,
    /// No network device at all.
    #[arg(long, conflicts_with_all = ["publish", "egress"])]
    pub no_network: bool,
    #[command(flatten)]
    pub net: NetworkArgs,
    /// The VMM that runs it, `qemu` or `firecracker` (by default the daemon's).
    #[arg(long)]
    pub vmm: Option<hearth_api::VmmKind>,
    /// Boot the machine, even where a template of its image could be restored.
    #[arg(long)]
    pub cold: bool,
}

/// The artifact URLs of the image built under `root`.
pub fn image_artifact(root: &Path, image: &str) -> Result<ArtifactRef> {
    if image != "default" {
        bail!("unknown image {image:?}: only `default` is built by hearth");
    }
    let dir = default_image_dir(root);
    let not_built = || {
        format!(
            "the default image is not built in {}: run `hearth image build`",
            dir.display()
        )
    };
    Manifest::load(&dir).with_context(not_built)?;
    // The daemon resolves file:// URLs itself, from another working directory.
    let dir = std::fs::canonicalize(&dir).with_context(not_built)?;
    // Percent-encoded as hearthd takes file URLs (it refuses any it would have to repair).
    let url = |f: &str| {
        reqwest::Url::from_file_path(dir.join(f))
            .map(String::from)
            .map_err(|()| anyhow::anyhow!("{} is not an absolute path", dir.display()))
    };
    Ok(ArtifactRef {
        kernel_image_url: url("vmlinux")?,
        rootfs_url: url("rootfs.ext4")?,
        initrd_url: Some(url("initrd.img")?),
    })
}

/// Prints a machine that an operation left running: JSON, or one line with the time taken.
pub fn report_machine(ctx: &Ctx, m: &hearth_api::Machine, what: &str, started: Instant) {
    if ctx.json {
        output::print_json(m);
    } else {
        let secs = started.elapsed().as_secs_f64();
        println!("{} {what} ({secs:.2} s)", m.id);
    }
}

pub fn spinner(msg: String) -> ProgressBar {
    let bar = ProgressBar::new_spinner();
    bar.set_style(ProgressStyle::with_template("{spinner} {msg} ({elapsed})").unwrap());
    bar.set_message(msg);
    bar.enable_steady_tick(Duration::from_millis(100));
    bar
}

pub async fn create(ctx: &Ctx, args: CreateArgs) -> Result<()> {
    let artifact = match (args.kernel, args.rootfs) {
        (Some(kernel_image_url), Some(rootfs_url)) => ArtifactRef {
            kernel_image_url,
            rootfs_url,
            initrd_url: args.initrd,
        },
        _ => image_artifact(&ctx.root, &args.image)?,
    };
    let req = CreateMachineRequest {
        machine_id: args.name.clone(),
        artifact,
        memory_mib: args.memory,
        vcpus: args.vcpus,
        storage_bytes: args.disk,
        user_volume_ids: None,
        guest_config: args.hostname.map(|h| GuestConfig {
            hostname: Some(h),
            ..Default::default()
        }),
        network: args.net.request(args.no_network),
        ports: args.net.ports()?,
        vmm: args.vmm,
        cold: args.cold.then_some(true),
    };
    let bar = spinner(format!("creating {}", args.name));
    let t = Instant::now();
    let res = ctx.client.create_machine(&req).await;
    bar.finish_and_clear();
    report_machine(ctx, &res?, "is running", t);
    Ok(())
}

pub async fn list(ctx: &Ctx) -> Result<()> {
    let list = ctx.client.list_machines().await?;
    if ctx.json {
        output::print_json(&list);
    } else {
        output::machines(&list);
    }
    Ok(())
}

pub async fn get(ctx: &Ctx, name: &str) -> Result<()> {
    let m = ctx.client.get_machine(name).await?;
    if ctx.json {
        output::print_json(&m);
    } else {
        output::machine(&m);
    }
    Ok(())
}

pub async fn stop(ctx: &Ctx, name: &str) -> Result<()> {
    let bar = spinner(format!("stopping {name}"));
    let res = ctx.client.stop_machine(name).await;
    bar.finish_and_clear();
    res?;
    if !ctx.json {
        println!("{name} stopped");
    }
    Ok(())
}

pub async fn start(ctx: &Ctx, name: &str) -> Result<()> {
    let bar = spinner(format!("starting {name}"));
    let res = ctx.client.start_machine(name).await;
    bar.finish_and_clear();
    let m = res?;
    if ctx.json {
        output::print_json(&m);
    } else {
        println!("{} is {}", m.id, m.phase.as_str());
    }
    Ok(())
}

pub async fn remove(ctx: &Ctx, names: &[String]) -> Result<()> {
    for name in names {
        ctx.client.delete_machine(name).await?;
        if !ctx.json {
            println!("{name} deleted");
        }
    }
    Ok(())
}
