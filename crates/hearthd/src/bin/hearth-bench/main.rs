//! Benchmarks that compare hearth with the naive way, measured in the same run (these machines
//! are noisy, so only ratios mean anything).
//!
//! `hearth-bench boot`: raw QEMU (the very command line hearthd uses, on a ready-made disk) from
//! spawn to the agent's first byte, against hearthd's create → running, alternating; plus the
//! exec round trip.
//!
//! `hearth-bench files`: file upload and download through the API against the raw agent channel;
//! exec round trip; process start → first output byte.
//!
//! `hearth-bench firecracker`: Firecracker beside QEMU through the `Vmm` trait: save_state and
//! restore → running at the same memory size.
//!
//! `hearth-bench hostile`: one machine attacks (console flood, memory hog, fork bomb, disk
//! filler, an endless message and a reply flood on its agent channel) while the host's memory, the API's latency and a quiet machine's exec are sampled.
//!
//! `hearth-bench snapshot`: on guests with half their memory dirtied, hearth's snapshot and
//! restore against plain QEMU save/restore with RAM in the migration stream (what `virsh save`
//! does) on the same guest; and the memory (PSS) of clones sharing one snapshot.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use hearth_api::client::Client;
use hearth_api::{ArtifactRef, CreateMachineRequest, ExecRequest};
use hearthd::config::AccelChoice;
use hearthd::vmm::qemu::Qemu;
use hearthd::vmm::qemu::{MemoryBacking, Start};
use hearthd::vmm::{MachinePaths, VmSpec};
use hearthd::{host, storage, vmm::process};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;

mod files;
mod firecracker;
mod hostile;
mod net;
mod snapshot;
mod transfer;

#[derive(Parser)]
#[command(
    name = "hearth-bench",
    about = "hearth benchmarks against the naive way"
)]
struct Args {
    /// The guest image directory (vmlinux, initrd.img, rootfs.ext4).
    #[arg(
        long,
        env = "HEARTH_BENCH_IMAGE",
        default_value = "/var/lib/hearth/images/default"
    )]
    image: PathBuf,
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// Boot: raw QEMU to the agent's first byte vs hearth create → running, booted and from
    /// the template; exec round trip.
    Boot {
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        #[arg(long, default_value_t = 256)]
        memory_mib: u32,
    },
    /// Upload and download of a 1 GiB artifact through a local S3 server vs raw baselines.
    Transfer {
        /// Non-zero data in the 1 GiB disk artifact, in MiB.
        #[arg(long, default_value_t = 900)]
        data_mib: u64,
    },
    /// Networks: TCP throughput through hearth's namespace and NAT vs a plain tap; what a
    /// network adds to create and restore.
    Net {
        /// MiB per transfer.
        #[arg(long, default_value_t = 64)]
        mib: u64,
        #[arg(long, default_value_t = 5)]
        rounds: usize,
    },
    /// Files: upload and download through the API vs the raw agent channel; exec round trip;
    /// process start → first output byte.
    Files {
        /// MiB per transfer.
        #[arg(long, default_value_t = 256)]
        mib: u64,
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// Firecracker beside QEMU through the Vmm trait: save_state and restore → running at the
    /// same memory size (needs HEARTH_FIRECRACKER; jailed with HEARTH_JAILER).
    Firecracker {
        #[arg(long, default_value_t = 256)]
        mib: u32,
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// Hostile guest: console flood, memory hog, fork bomb, disk filler, an endless message
    /// and a reply flood on the agent channel, in one machine; the host's memory, the API's
    /// and a quiet machine's latency meanwhile.
    Hostile {
        /// Seconds each attack runs.
        #[arg(long, default_value_t = 15)]
        seconds: u64,
        /// Only the attacks whose names contain one of these (all by default).
        #[arg(long)]
        only: Vec<String>,
    },
    /// Snapshot and restore against plain QEMU migration to a file, a snapshot tree against
    /// the previous path, agent ready, the first exec, fork end to end, create from the
    /// template against a boot: on /tmp's filesystem and on XFS in one run; PSS of clones.
    Snapshot {
        /// Guest sizes in MiB (half of each is filled: in a guest under 512 MiB the guest's
        /// workload limit kills the filler).
        #[arg(long, value_delimiter = ',', default_value = "1024")]
        sizes: Vec<u32>,
        #[arg(long, default_value_t = 5)]
        clones: usize,
        #[arg(long, default_value_t = 512)]
        clone_memory_mib: u32,
        /// Where the data root is, one run each, in one daemon each: `tmp` (/tmp's
        /// filesystem), `xfs` (a loop-mounted XFS with reflinks; needs mkfs.xfs).
        #[arg(
            long = "fs",
            value_enum,
            value_delimiter = ',',
            default_value = "tmp,xfs"
        )]
        filesystems: Vec<snapshot::Fs>,
    },
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut args = Args::parse();
    args.image = std::fs::canonicalize(&args.image)
        .with_context(|| format!("image directory {}", args.image.display()))?;
    for f in ["vmlinux", "initrd.img", "rootfs.ext4"] {
        if !args.image.join(f).exists() {
            bail!(
                "{} has no {f}: build the image first (hearth image build)",
                args.image.display()
            );
        }
    }
    match args.bench {
        Bench::Boot { rounds, memory_mib } => boot(&args.image, rounds, memory_mib).await,
        Bench::Transfer { data_mib } => transfer::run(&args.image, data_mib).await,
        Bench::Net { mib, rounds } => net::run(&args.image, mib, rounds).await,
        Bench::Files { mib, rounds } => files::run(&args.image, mib, rounds).await,
        Bench::Hostile { seconds, only } => hostile::run(&args.image, seconds, &only).await,
        Bench::Firecracker { mib, rounds } => firecracker::run(&args.image, mib, rounds).await,
        Bench::Snapshot {
            sizes,
            clones,
            clone_memory_mib,
            filesystems,
        } => snapshot::run(&args.image, &sizes, clones, clone_memory_mib, &filesystems).await,
    }
}

/// The QEMU backend as hearthd configures it by default.
fn qemu() -> Qemu {
    Qemu {
        version: String::new(),
        binary: "qemu-system-x86_64".into(),
        accel: host::choose_accel(AccelChoice::Auto),
        tsc_khz: host::measure_tsc_khz(),
        console_log_bytes: 1 << 20,
        user: None,
        clone: hearthd::config::CloneMode::Auto,
    }
}

/// The image's files as `file://` artifact URLs.
fn image_artifact(image: &Path) -> ArtifactRef {
    let url = |f: &str| String::from(url::Url::from_file_path(image.join(f)).expect("absolute"));
    ArtifactRef {
        kernel_image_url: url("vmlinux"),
        rootfs_url: url("rootfs.ext4"),
        initrd_url: Some(url("initrd.img")),
    }
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

async fn boot(image: &Path, rounds: usize, memory_mib: u32) -> Result<()> {
    let work = tempfile::Builder::new()
        .prefix("hbench")
        .tempdir_in("/tmp")?;
    let qemu = qemu();
    let daemon = Daemon::start(&work.path().join("root"), image).await?;
    let artifact = image_artifact(image);
    let create = |id: String, cold: bool| CreateMachineRequest {
        machine_id: id,
        artifact: artifact.clone(),
        memory_mib: Some(memory_mib),
        vcpus: Some(1),
        storage_bytes: None,
        user_volume_ids: None,
        guest_config: None,
        network: None,
        ports: None,
        vmm: None,
        cold: Some(cold),
    };
    // Warm-up: the artifact cache imports the image once, and the first create of it makes
    // the template.
    daemon
        .client
        .create_machine(&create("warmup".into(), false))
        .await?;
    daemon.client.delete_machine("warmup").await?;

    let (mut raw, mut hearth, mut templated) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..rounds {
        raw.push(
            raw_boot(
                &qemu,
                image,
                &work.path().join(format!("raw{i}")),
                memory_mib,
            )
            .await?,
        );
        let id = format!("bench-{i}");
        let t = Instant::now();
        daemon
            .client
            .create_machine(&create(id.clone(), true))
            .await?;
        hearth.push(t.elapsed());
        daemon.client.delete_machine(&id).await?;
        let t = Instant::now();
        daemon
            .client
            .create_machine(&create(id.clone(), false))
            .await?;
        templated.push(t.elapsed());
        daemon.client.delete_machine(&id).await?;
        eprintln!(
            "round {}: raw {} hearth {} from the template {}",
            i + 1,
            ms(raw[i]),
            ms(hearth[i]),
            ms(templated[i])
        );
    }

    daemon
        .client
        .create_machine(&create("rtt".into(), true))
        .await?;
    let mut rtts = Vec::new();
    let req = ExecRequest {
        command: vec!["true".into()],
        ..Default::default()
    };
    for _ in 0..50 {
        let t = Instant::now();
        daemon.client.exec("rtt", &req).await?;
        rtts.push(t.elapsed());
    }
    daemon.client.delete_machine("rtt").await?;

    let (raw_m, hearth_m) = (median(&mut raw), median(&mut hearth));
    let ratio = hearth_m.as_secs_f64() / raw_m.as_secs_f64();
    println!(
        "boot benchmark ({rounds} rounds, {memory_mib} MiB guest, {:?})",
        qemu.accel
    );
    println!(
        "  raw QEMU → agent's first byte   {:>10}  (median)",
        ms(raw_m)
    );
    println!(
        "  hearth create → running, booted {:>10}  (median)",
        ms(hearth_m)
    );
    println!(
        "  ratio hearth / raw              {:>10.3}  (target ≤ 1.25: {})",
        ratio,
        if ratio <= 1.25 { "met" } else { "NOT met" }
    );
    let templated_m = median(&mut templated);
    println!(
        "  create → running from template  {:>10}  (median; {:.1}× faster than the boot)",
        ms(templated_m),
        hearth_m.as_secs_f64() / templated_m.as_secs_f64()
    );
    println!(
        "  exec round trip                 {:>10}  (median of 50)",
        ms(median(&mut rtts))
    );
    Ok(())
}

/// A machine of the image's kernel and initrd for QEMU without hearthd, with its files in
/// `dir` (made here; its disk is the caller's to put there), RAM in a shared file, no network.
fn raw_spec(image: &Path, dir: &Path, memory_mib: u32) -> Result<VmSpec> {
    std::fs::create_dir_all(dir)?;
    let paths = MachinePaths {
        dir: dir.to_path_buf(),
        sock_dir: dir.to_path_buf(),
    };
    // QEMU's console pipe; nobody reads it (a quiet guest writes less than it holds).
    hearthd::vmm::console::prepare(&paths).map_err(|e| anyhow::anyhow!(e.message))?;
    Ok(VmSpec {
        kernel: image.join("vmlinux"),
        initrd: Some(image.join("initrd.img")),
        memory_mib,
        vcpus: 1,
        disks: vec![paths.system_disk()],
        paths,
        network: None,
        cgroup: None,
    })
}

/// [`raw_spec`] with a clone of the image's root filesystem as its disk.
fn raw_machine(image: &Path, dir: &Path, memory_mib: u32) -> Result<VmSpec> {
    let spec = raw_spec(image, dir, memory_mib)?;
    storage::clone_file(
        &image.join("rootfs.ext4"),
        &spec.paths.system_disk(),
        hearthd::config::CloneMode::Auto,
    )
    .map_err(|e| anyhow::anyhow!(e.message))?;
    Ok(spec)
}

/// Boots the same kernel, initrd and rootfs with the same QEMU command line, without hearthd,
/// and times spawn → the agent's first byte on its socket.
async fn raw_boot(qemu: &Qemu, image: &Path, dir: &Path, memory_mib: u32) -> Result<Duration> {
    let spec = raw_machine(image, dir, memory_mib)?;
    let paths = spec.paths.clone();
    let t = Instant::now();
    let memory = MemoryBacking::SharedFile(paths.memory());
    let p = qemu
        .spawn(&spec, &memory, Start::Boot)
        .await
        .map_err(|e| anyhow::anyhow!("raw QEMU failed: {e}"))?;
    let mut sock = tokio::net::UnixStream::connect(paths.agent_socket()).await?;
    let mut byte = [0u8; 1];
    tokio::time::timeout(Duration::from_secs(60), sock.read_exact(&mut byte))
        .await
        .context("raw boot timed out")??;
    let took = t.elapsed();
    process::kill_and_wait(&p).await;
    std::fs::remove_dir_all(dir)?;
    Ok(took)
}

/// A hearthd of the bench's own, on a scratch data root.
struct Daemon {
    child: std::process::Child,
    client: Client,
    root: PathBuf,
    args: Vec<String>,
}

impl Daemon {
    /// A daemon whose machines' networks reach nothing beyond their namespaces, on a pool of
    /// its own (not the default one a daemon of this host may guard).
    async fn start(root: &Path, image: &Path) -> Result<Daemon> {
        Daemon::start_with(
            root,
            image,
            &[
                "--egress-interface",
                "hearth-noegress",
                "--dns",
                "127.0.0.1",
                "--net-pool",
                "198.19.200.0/24",
            ],
        )
        .await
    }

    /// A daemon that takes `file://` artifacts from `image`.
    async fn start_with(root: &Path, image: &Path, args: &[&str]) -> Result<Daemon> {
        let image = image.to_str().context("the image directory is not UTF-8")?;
        let args: Vec<String> = ["--artifact-dir", image]
            .iter()
            .chain(args)
            .map(|a| a.to_string())
            .collect();
        let child = Daemon::spawn(root, &args).await?;
        Ok(Daemon {
            child,
            client: Client::new(root.join("hearthd.sock")),
            root: root.to_path_buf(),
            args,
        })
    }

    async fn spawn(root: &Path, args: &[String]) -> Result<std::process::Child> {
        let exe = std::env::current_exe()?;
        let hearthd = exe.with_file_name("hearthd");
        let child = std::process::Command::new(&hearthd)
            .arg("--root")
            .arg(root)
            .args(args)
            .env(
                "HEARTH_LOG",
                std::env::var("HEARTH_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .spawn()
            .with_context(|| format!("starting {}", hearthd.display()))?;
        let client = Client::new(root.join("hearthd.sock"));
        let deadline = Instant::now() + Duration::from_secs(20);
        while client.health().await.is_err() {
            if Instant::now() > deadline {
                bail!("hearthd did not start");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(child)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops the daemon; its machines run on.
    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    async fn restart(&mut self) -> Result<()> {
        self.child = Daemon::spawn(&self.root, &self.args).await?;
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A bench that failed midway may leave machines: their VMMs name the data root.
        let root = self.root.as_os_str().as_encoded_bytes().to_vec();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let pid = entry.file_name().to_string_lossy().parse::<i32>();
            if let (Ok(pid), true) = (pid, cmdline.windows(root.len()).any(|w| w == root)) {
                if let Some(p) = process::record(pid) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(p.pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
        // Its networks are the bench's to remove.
        if let Ok(tag) = hearthd::net::tag_of(&self.root) {
            hearthd::net::remove_all(&tag);
        }
    }
}
