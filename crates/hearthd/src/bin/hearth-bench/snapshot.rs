//! hearth snapshot/restore against plain QEMU migration with RAM in the stream, same guest,
//! same run; a snapshot tree (a restored machine snapshotted and restored in turn) against
//! the previous path, which streamed a restored machine's RAM; agent ready and the first exec
//! after a restore; fork end to end; create from the template against a boot; each on /tmp's
//! filesystem and on XFS with reflinks; then the PSS of clones sharing one snapshot's memory.

use super::{image_artifact, ms, qemu, Daemon};
use anyhow::{bail, Context, Result};
use hearth_api::{
    CreateMachineRequest, ExecRequest, ForkRequest, LocalSnapshotRef, RestoreRequest, SnapshotKind,
};
use hearthd::service::machine_paths;
use hearthd::vmm::process;
use hearthd::vmm::qemu::{MemoryBacking, Start};
use hearthd::vmm::qmp::Qmp;
use serde_json::json;
use std::path::Path;
use std::time::{Duration, Instant};

fn phase(t: &[(String, f64)], name: &str) -> Duration {
    t.iter()
        .find(|(n, _)| n == name)
        .map(|(_, ms)| Duration::from_secs_f64(ms / 1000.0))
        .unwrap_or_default()
}

fn caps(on: bool) -> serde_json::Value {
    json!({ "capabilities": [ { "capability": "x-ignore-shared", "state": on } ] })
}

async fn wait_migration(qmp: &mut Qmp) -> Result<()> {
    loop {
        let info = qmp
            .execute("query-migrate", None)
            .await
            .map_err(anyhow::Error::msg)?;
        match info["status"].as_str().unwrap_or("") {
            "completed" => return Ok(()),
            "failed" | "cancelled" => bail!("migration failed: {info}"),
            _ => tokio::time::sleep(Duration::from_millis(2)).await,
        }
    }
}

/// Plain QEMU migration through a file: RAM in the stream, `command` (`migrate` or
/// `migrate-incoming`) on `uri`, wait for it, continue.
async fn plain_migration(qmp: &mut Qmp, command: &str, file: std::fs::File) -> Result<()> {
    qmp.execute("migrate-set-capabilities", Some(caps(false)))
        .await
        .map_err(anyhow::Error::msg)?;
    // QEMU's sandbox forbids `exec:` migrations: the stream goes through a descriptor.
    qmp.pass_fd("plain", std::os::fd::AsFd::as_fd(&file))
        .await
        .map_err(anyhow::Error::msg)?;
    drop(file);
    qmp.execute(command, Some(json!({ "uri": "fd:plain" })))
        .await
        .map_err(anyhow::Error::msg)?;
    wait_migration(qmp).await?;
    qmp.execute("cont", None)
        .await
        .map_err(anyhow::Error::msg)?;
    Ok(())
}

/// Fills half the guest's RAM with non-zero data in a tmpfs (zero pages would let plain
/// migration skip them).
async fn dirty_half(d: &Daemon, id: &str, memory_mib: u32) -> Result<()> {
    dirty(d, id, "data", memory_mib as u64 / 2).await
}

/// Writes `mib` MiB of non-zero data into `/mnt/fill/NAME`, a tmpfs.
async fn dirty(d: &Daemon, id: &str, name: &str, mib: u64) -> Result<()> {
    let script = format!(
        "mkdir -p /mnt/fill && (grep -q ' /mnt/fill ' /proc/mounts || mount -t tmpfs -o size=90% tmpfs /mnt/fill) && \
         yes hearth-bench-dirty-page-{name} | head -c {} > /mnt/fill/{name}",
        mib << 20
    );
    let r = d
        .client
        .exec(
            id,
            &ExecRequest {
                command: vec!["sh".into(), "-c".into(), script],
                ..Default::default()
            },
        )
        .await?;
    anyhow::ensure!(r.exit_code == 0, "dirtying memory failed: {}", r.stderr);
    Ok(())
}

fn create(id: &str, image: &Path, memory_mib: u32) -> CreateMachineRequest {
    CreateMachineRequest {
        machine_id: id.into(),
        artifact: image_artifact(image),
        memory_mib: Some(memory_mib),
        vcpus: Some(1),
        storage_bytes: None,
        user_volume_ids: None,
        guest_config: None,
        // The plain baselines' QEMU has no network device; the compared machines neither.
        network: Some(hearth_api::NetworkRequest {
            enabled: Some(false),
            ..Default::default()
        }),
        ports: None,
        vmm: None,
        // An original: booted, its RAM a shared file of its own.
        cold: Some(true),
    }
}

fn restore(snap: &str, id: &str, image: &Path) -> RestoreRequest {
    RestoreRequest {
        machine_id: id.into(),
        artifact: image_artifact(image),
        memory_mib: None,
        storage_bytes: None,
        local_snapshot: Some(LocalSnapshotRef {
            snapshot_id: snap.into(),
        }),
        snapshot: None,
        guest_config: None,
        network: None,
        ports: None,
        vmm: None,
    }
}

/// Where a run keeps its data root.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Fs {
    /// /tmp's filesystem (ext4 here: no reflinks, clones are copies).
    Tmp,
    /// A loop-mounted XFS with reflinks (needs mkfs.xfs).
    Xfs,
}

impl Fs {
    fn name(self) -> &'static str {
        match self {
            Fs::Tmp => "/tmp's filesystem",
            Fs::Xfs => "XFS with reflinks",
        }
    }
}

pub async fn run(
    image: &Path,
    sizes: &[u32],
    clones: usize,
    clone_mib: u32,
    filesystems: &[Fs],
) -> Result<()> {
    let mut runs = Vec::new();
    for &fs in filesystems {
        // The clones' PSS does not depend on the filesystem: measured once.
        let clones = if runs.is_empty() { clones } else { 0 };
        runs.push((fs, run_on(fs, image, sizes, clones, clone_mib).await?));
    }
    for (fs, (lines, pss)) in &runs {
        print(*fs, lines, *pss, clones, clone_mib);
    }
    Ok(())
}

async fn run_on(
    fs: Fs,
    image: &Path,
    sizes: &[u32],
    clones: usize,
    clone_mib: u32,
) -> Result<(Vec<Line>, Option<u64>)> {
    let work = tempfile::Builder::new()
        .prefix("hbench")
        .tempdir_in("/tmp")?;
    let mount = match fs {
        Fs::Xfs => Some(XfsMount::new(work.path())?),
        Fs::Tmp => None,
    };
    let root = match &mount {
        Some(m) => m.dir.join("root"),
        None => work.path().join("root"),
    };
    let daemon = Daemon::start(&root, image).await?;
    let mut lines = Vec::new();
    for &mib in sizes {
        eprintln!(
            "{}: {mib} MiB guest: booting and dirtying half its memory…",
            fs.name()
        );
        lines.push(compare(&daemon, image, mib, work.path()).await?);
    }
    let pss = if clones > 0 {
        eprintln!("{clones} clones of a {clone_mib} MiB guest…");
        Some(clones_pss(&daemon, image, clones, clone_mib).await?)
    } else {
        None
    };
    // The daemon goes before its filesystem.
    drop(daemon);
    drop(mount);
    Ok((lines, pss))
}

fn print(fs: Fs, lines: &[Line], pss: Option<u64>, clones: usize, clone_mib: u32) {
    println!(
        "snapshot benchmark, data root on {} (half of guest memory dirtied; plain = QEMU migration with RAM in the stream)",
        fs.name()
    );
    for l in lines {
        println!("  {} MiB guest", l.mib);
        println!(
            "    snapshot pause → resumed   hearth {:>10}   plain {:>10}   {:>6.1}×",
            ms(l.hearth_paused),
            ms(l.plain_paused),
            l.plain_paused.as_secs_f64() / l.hearth_paused.as_secs_f64()
        );
        println!(
            "    snapshot total              hearth {:>10}",
            ms(l.hearth_total)
        );
        println!(
            "    restore → running          hearth {:>10}   plain {:>10}   {:>6.1}×",
            ms(l.hearth_running),
            ms(l.plain_running),
            l.plain_running.as_secs_f64() / l.hearth_running.as_secs_f64()
        );
        println!(
            "    restore → agent ready      hearth {:>10}",
            ms(l.hearth_agent)
        );
        println!(
            "    first exec after the restore {:>10}   the next {:>10}   (QEMU translated {} code blocks for the first, {} for the next: TCG)",
            ms(l.first_exec.0),
            ms(l.next_exec.0),
            l.first_exec.1,
            l.next_exec.1
        );
        let t = &l.tree;
        println!(
            "    a restored machine (it wrote {} MiB more), snapshotted and restored in turn; previous = its RAM streamed",
            l.mib / 4
        );
        println!(
            "      snapshot pause → resumed   hearth {:>10}   previous {:>10}   {:>6.1}×   ({:.2}× the original's)",
            ms(t.paused),
            ms(t.prev_paused),
            t.prev_paused.as_secs_f64() / t.paused.as_secs_f64(),
            t.paused.as_secs_f64() / l.hearth_paused.as_secs_f64()
        );
        println!(
            "      snapshot total             hearth {:>10}",
            ms(t.total)
        );
        println!(
            "      restore → running          hearth {:>10}   previous {:>10}   {:>6.1}×   ({:.2}× the original's)",
            ms(t.running),
            ms(t.prev_running),
            t.prev_running.as_secs_f64() / t.running.as_secs_f64(),
            t.running.as_secs_f64() / l.hearth_running.as_secs_f64()
        );
        println!(
            "      restore → agent ready      hearth {:>10}",
            ms(t.agent)
        );
        println!(
            "      RAM of its own, restored   hearth {:>7} MiB   previous {:>7} MiB",
            t.own_kib >> 10,
            t.prev_own_kib >> 10
        );
        println!(
            "    fork → running, end to end   of the original {:>10}   of the restored machine {:>10}",
            ms(l.fork_original),
            ms(t.fork)
        );
        println!(
            "    create → running             from the template {:>10}   booted {:>10}   {:>6.1}×   (the first create of its kind, which boots and makes the template: {})",
            ms(l.templated),
            ms(l.booted),
            l.booted.as_secs_f64() / l.templated.as_secs_f64(),
            ms(l.template_made)
        );
    }
    if let Some(l) = lines.iter().find(|l| l.mib == 1024) {
        let snap = l.plain_paused.as_secs_f64() / l.hearth_paused.as_secs_f64();
        let rest = l.plain_running.as_secs_f64() / l.hearth_running.as_secs_f64();
        println!(
            "  targets at 1 GiB: snapshot ≥ 10× ({snap:.1}×: {}), restore → running ≥ 20× ({rest:.1}×: {})",
            if snap >= 10.0 { "met" } else { "NOT met" },
            if rest >= 20.0 { "met" } else { "NOT met" }
        );
    }
    let Some(pss) = pss else { return };
    println!(
        "  PSS of {clones} clones of a {clone_mib} MiB guest (each read its {} MiB of dirtied memory): \
         {:.0} MiB total, against {} MiB for {clones} separate copies ({:.1}×)",
        clone_mib / 2,
        pss as f64 / 1024.0,
        clones as u32 * clone_mib,
        (clones as u64 * clone_mib as u64 * 1024) as f64 / pss as f64
    );
}

struct Line {
    mib: u32,
    hearth_paused: Duration,
    hearth_total: Duration,
    plain_paused: Duration,
    hearth_running: Duration,
    hearth_agent: Duration,
    plain_running: Duration,
    fork_original: Duration,
    /// The first exec on the restored machine and the next, with the code blocks QEMU
    /// translated for each.
    first_exec: (Duration, u64),
    next_exec: (Duration, u64),
    tree: Tree,
    templated: Duration,
    booted: Duration,
    template_made: Duration,
}

/// A restored machine snapshotted and restored in turn.
struct Tree {
    paused: Duration,
    total: Duration,
    running: Duration,
    agent: Duration,
    /// KiB of guest RAM the machine restored from the tree's snapshot holds privately.
    own_kib: u64,
    prev_paused: Duration,
    prev_running: Duration,
    prev_own_kib: u64,
    fork: Duration,
}

async fn compare(d: &Daemon, image: &Path, mib: u32, work: &Path) -> Result<Line> {
    let (id, snap, clone) = (
        format!("src{mib}"),
        format!("snap{mib}"),
        format!("clone{mib}"),
    );
    d.client.create_machine(&create(&id, image, mib)).await?;
    dirty_half(d, &id, mib).await?;

    let (_, t) = d
        .client
        .create_snapshot_timed(&id, &snap, SnapshotKind::Memory)
        .await?;
    let (hearth_paused, hearth_total) = (phase(&t, "paused"), phase(&t, "total"));

    // Plain save of the same running guest: pause, RAM and devices into one stream, resume.
    let src = machine_paths(&d.root, &id);
    let plain_file = work.join(format!("plain{mib}.state"));
    let mut qmp = Qmp::connect(&src.control_socket())
        .await
        .map_err(anyhow::Error::msg)?;
    let t0 = Instant::now();
    qmp.execute("stop", None)
        .await
        .map_err(anyhow::Error::msg)?;
    plain_migration(&mut qmp, "migrate", std::fs::File::create(&plain_file)?).await?;
    let plain_paused = t0.elapsed();
    drop(qmp);

    let (_, t) = d
        .client
        .restore_timed(&snap, &restore(&snap, &clone, image))
        .await?;
    let (hearth_running, hearth_agent) = (phase(&t, "running"), phase(&t, "agent"));
    let first_exec = exec_translated(d, &clone).await?;
    let next_exec = exec_translated(d, &clone).await?;
    let fork_original = fork(d, &id, &format!("fork{mib}")).await?;

    // Plain restore: the same machine started on anonymous RAM, fed the whole stream.
    let spec = super::raw_spec(image, &work.join(format!("plain{mib}")), mib)?;
    let paths = spec.paths.clone();
    std::fs::copy(
        d.root.join("snapshots").join(&snap).join("system.img"),
        paths.system_disk(),
    )?;
    let t0 = Instant::now();
    let p = qemu()
        .spawn(&spec, &MemoryBacking::Anonymous, Start::Incoming)
        .await
        .map_err(|e| anyhow::anyhow!("plain restore QEMU failed to start: {e}"))?;
    let mut qmp = Qmp::connect(&paths.control_socket())
        .await
        .map_err(anyhow::Error::msg)?;
    let loaded = plain_migration(
        &mut qmp,
        "migrate-incoming",
        std::fs::File::open(&plain_file)?,
    )
    .await;
    if let Err(e) = loaded {
        bail!("plain restore: {e}: {}", paths.vmm_log_tail(10).await);
    }
    let plain_running = t0.elapsed();
    drop(qmp);
    process::kill_and_wait(&p).await;
    std::fs::remove_dir_all(&paths.dir)?;
    std::fs::remove_file(&plain_file)?;

    let tree = tree(d, image, mib, &clone, work).await?;
    d.client.delete_machine(&clone).await?;
    d.client.delete_machine(&id).await?;
    d.client.delete_snapshot(&snap).await?;
    let (template_made, templated, booted) = templates(d, image, mib).await?;
    Ok(Line {
        mib,
        hearth_paused,
        hearth_total,
        plain_paused,
        hearth_running,
        hearth_agent,
        plain_running,
        fork_original,
        first_exec,
        next_exec,
        tree,
        templated,
        booted,
        template_made,
    })
}

/// `true` run in `id`, timed, with the code blocks QEMU translated meanwhile (under TCG a
/// guest's first run of a code path pays its translation).
async fn exec_translated(d: &Daemon, id: &str) -> Result<(Duration, u64)> {
    let control = machine_paths(&d.root, id).control_socket();
    let blocks = || async {
        let mut qmp = Qmp::connect(&control).await.map_err(anyhow::Error::msg)?;
        let jit = qmp
            .execute(
                "human-monitor-command",
                Some(json!({ "command-line": "info jit" })),
            )
            .await
            .map_err(anyhow::Error::msg)?;
        let text = jit.as_str().unwrap_or_default().to_string();
        // "TB count            17134"; a KVM machine has no such line.
        Ok::<u64, anyhow::Error>(
            text.lines()
                .find(|l| l.starts_with("TB count"))
                .and_then(|l| l.split_whitespace().nth(2))
                .and_then(|n| n.parse().ok())
                .unwrap_or(0),
        )
    };
    let before = blocks().await?;
    let req = ExecRequest {
        command: vec!["true".into()],
        ..Default::default()
    };
    let t0 = Instant::now();
    d.client.exec(id, &req).await?;
    let took = t0.elapsed();
    Ok((took, blocks().await?.saturating_sub(before)))
}

/// Create → running of a machine of this size: the first of its kind (booted, then made the
/// template), one from the template, one booted (`cold`). All deleted again.
async fn templates(d: &Daemon, image: &Path, mib: u32) -> Result<(Duration, Duration, Duration)> {
    let mut times = Vec::new();
    for (id, cold) in [("tfirst", false), ("tmade", false), ("tcold", true)] {
        let mut req = create(id, image, mib);
        req.cold = Some(cold);
        let t0 = Instant::now();
        d.client.create_machine(&req).await?;
        times.push(t0.elapsed());
        d.client.delete_machine(id).await?;
    }
    Ok((times[0], times[1], times[2]))
}

/// Fork of `source` into `id`, end to end as the client sees it; the fork is deleted again.
async fn fork(d: &Daemon, source: &str, id: &str) -> Result<Duration> {
    let req = ForkRequest {
        machine_id: id.into(),
        guest_config: None,
        network: None,
        ports: None,
    };
    let t0 = Instant::now();
    d.client.fork(source, &req).await?;
    let took = t0.elapsed();
    d.client.delete_machine(id).await?;
    Ok(took)
}

/// A loop-mounted XFS with reflinks, unmounted when dropped.
struct XfsMount {
    dir: std::path::PathBuf,
}

impl XfsMount {
    fn new(work: &Path) -> Result<XfsMount> {
        let (file, dir) = (work.join("xfs.img"), work.join("xfs"));
        std::fs::File::create(&file)?.set_len(24 << 30)?;
        std::fs::create_dir_all(&dir)?;
        let run = |cmd: &mut std::process::Command| -> Result<()> {
            let out = cmd.output().with_context(|| format!("{cmd:?}"))?;
            anyhow::ensure!(
                out.status.success(),
                "{cmd:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            Ok(())
        };
        run(std::process::Command::new("mkfs.xfs")
            .args(["-q", "-m", "reflink=1"])
            .arg(&file))?;
        run(std::process::Command::new("mount")
            .args(["-o", "loop"])
            .arg(&file)
            .arg(&dir))?;
        Ok(XfsMount { dir })
    }
}

impl Drop for XfsMount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.dir).status();
    }
}

/// Which of a process's mappings hold guest RAM.
enum Ram<'a> {
    /// The mappings of this file.
    File(&'a Path),
    /// Anonymous mappings of this size.
    Anonymous { mib: u32 },
}

/// KiB of anonymous (private, written) memory in `pid`'s guest RAM mappings.
fn anonymous_kib(pid: i32, ram: Ram) -> Result<u64> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    let mut kib = 0;
    // Blocks: a header line (range, perms, offset, device, inode, path), then "Key: value".
    let mut header = "";
    let mut size_kib = 0;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        let value = || {
            line.split_whitespace()
                .nth(1)
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0)
        };
        if first.contains('-') && !first.ends_with(':') {
            header = line;
        } else if first == "Size:" {
            size_kib = value();
        } else if first == "Anonymous:" {
            let counted = match ram {
                Ram::File(f) => header.ends_with(&*f.to_string_lossy()),
                Ram::Anonymous { mib } => {
                    header.split_whitespace().count() == 5 && size_kib == mib as u64 * 1024
                }
            };
            if counted {
                kib += value();
            }
        }
    }
    Ok(kib)
}

fn vmm_pid(d: &Daemon, id: &str) -> Result<i32> {
    let pidfile = machine_paths(&d.root, id).pidfile();
    let text = std::fs::read_to_string(&pidfile)?;
    text.split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .with_context(|| format!("no pid in {}", pidfile.display()))
}

/// `clone` (restored) writes a quarter of its RAM, then is snapshotted and restored; then the
/// previous path on the same machine: its whole RAM streamed, and loaded from the stream.
async fn tree(d: &Daemon, image: &Path, mib: u32, clone: &str, work: &Path) -> Result<Tree> {
    dirty(d, clone, "tree", mib as u64 / 4).await?;
    let (snap, grand) = (format!("tree{mib}"), format!("grand{mib}"));
    let (_, t) = d
        .client
        .create_snapshot_timed(clone, &snap, SnapshotKind::Memory)
        .await?;
    let (paused, total) = (phase(&t, "paused"), phase(&t, "total"));
    let (_, t) = d
        .client
        .restore_timed(&snap, &restore(&snap, &grand, image))
        .await?;
    let (running, agent) = (phase(&t, "running"), phase(&t, "agent"));
    let ram = machine_paths(&d.root, &grand).state_dir().join("memory");
    let own_kib = anonymous_kib(vmm_pid(d, &grand)?, Ram::File(&ram))?;
    d.client.delete_machine(&grand).await?;
    d.client.delete_snapshot(&snap).await?;
    let fork = fork(d, clone, &format!("tfork{mib}")).await?;

    let src = machine_paths(&d.root, clone);
    let stream = work.join(format!("prev{mib}.state"));
    let mut qmp = Qmp::connect(&src.control_socket())
        .await
        .map_err(anyhow::Error::msg)?;
    let t0 = Instant::now();
    qmp.execute("stop", None)
        .await
        .map_err(anyhow::Error::msg)?;
    plain_migration(&mut qmp, "migrate", std::fs::File::create(&stream)?).await?;
    let prev_paused = t0.elapsed();
    drop(qmp);
    let spec = super::raw_spec(image, &work.join(format!("prev{mib}")), mib)?;
    let paths = spec.paths.clone();
    std::fs::copy(src.system_disk(), paths.system_disk())?;
    let t0 = Instant::now();
    let p = qemu()
        .spawn(&spec, &MemoryBacking::Anonymous, Start::Incoming)
        .await
        .map_err(|e| anyhow::anyhow!("the previous path's QEMU failed to start: {e}"))?;
    let mut qmp = Qmp::connect(&paths.control_socket())
        .await
        .map_err(anyhow::Error::msg)?;
    let loaded = plain_migration(&mut qmp, "migrate-incoming", std::fs::File::open(&stream)?).await;
    if let Err(e) = loaded {
        bail!(
            "the previous path's restore: {e}: {}",
            paths.vmm_log_tail(10).await
        );
    }
    let prev_running = t0.elapsed();
    drop(qmp);
    let prev_own_kib = anonymous_kib(p.pid, Ram::Anonymous { mib })?;
    process::kill_and_wait(&p).await;
    std::fs::remove_dir_all(&paths.dir)?;
    std::fs::remove_file(&stream)?;
    Ok(Tree {
        paused,
        total,
        running,
        agent,
        own_kib,
        prev_paused,
        prev_running,
        prev_own_kib,
        fork,
    })
}

/// Total PSS (KiB) of `n` clones of one snapshot, after each read its dirtied memory.
async fn clones_pss(d: &Daemon, image: &Path, n: usize, mib: u32) -> Result<u64> {
    d.client
        .create_machine(&create("pss-src", image, mib))
        .await?;
    dirty_half(d, "pss-src", mib).await?;
    d.client
        .create_snapshot("pss-src", "pss-snap", SnapshotKind::Memory)
        .await?;
    d.client.delete_machine("pss-src").await?;
    let ids: Vec<String> = (0..n).map(|i| format!("pss-{i}")).collect();
    for id in &ids {
        d.client
            .restore("pss-snap", &restore("pss-snap", id, image))
            .await?;
        let read = ExecRequest {
            command: vec![
                "sh".into(),
                "-c".into(),
                "cat /mnt/fill/data > /dev/null".into(),
            ],
            ..Default::default()
        };
        d.client.exec(id, &read).await?;
    }
    let mut total = 0;
    for id in &ids {
        let pidfile = machine_paths(&d.root, id).pidfile();
        let pid = std::fs::read_to_string(&pidfile)?.trim().to_string();
        let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
        let pss: u64 = rollup
            .lines()
            .find_map(|l| l.strip_prefix("Pss:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .context("no Pss in smaps_rollup")?;
        total += pss;
    }
    for id in &ids {
        d.client.delete_machine(id).await?;
    }
    d.client.delete_snapshot("pss-snap").await?;
    Ok(total)
}
