//! `hearth-bench firecracker`: the two backends side by side through the `Vmm` trait, on the
//! same image and memory size, in one run. Each boots a machine, lets it run a moment, pauses
//! it and writes its state (`save_state`, timed), then starts a second machine from that state
//! (`restore`: spawn + load → running, timed), pauses that one and writes its state too (a
//! restored machine's: QEMU's device state and the pages it wrote over its base, Firecracker's
//! `Diff` merged over its base; against a `Full` of the same paused machine). Firecracker's
//! guest cannot get far under nested
//! KVM, but what is timed here is the VMM's own work. Needs `HEARTH_FIRECRACKER` (and runs
//! jailed with `HEARTH_JAILER`).

use super::{median, ms, qemu, raw_machine};
use anyhow::{Context, Result};
use hearthd::vmm::firecracker::{Firecracker, Jail};
use hearthd::vmm::user::VmmUser;
use hearthd::vmm::{StateKind, Vmm};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

struct Times {
    save: Vec<Duration>,
    restore: Vec<Duration>,
    state_bytes: u64,
    /// `save_state` of the restored machine.
    save_restored: Vec<Duration>,
    /// A full snapshot of the same paused restored machine (Firecracker only).
    full_restored: Vec<Duration>,
}

/// Boot, save, restore `rounds` times on `vmm`, in `work`.
async fn measure(
    vmm: &dyn Vmm,
    image: &Path,
    work: &Path,
    mib: u32,
    rounds: usize,
) -> Result<Times> {
    let mut t = Times {
        save: Vec::new(),
        restore: Vec::new(),
        state_bytes: 0,
        save_restored: Vec::new(),
        full_restored: Vec::new(),
    };
    for round in 0..rounds {
        let dir = work.join(format!("{}-{round}", vmm.kind()));
        let spec = raw_machine(image, &dir.join("source"), mib)?;
        let source = vmm.boot(&spec).await.map_err(|e| anyhow::anyhow!("{e}"))?;
        // Let the guest touch some memory before its state is taken.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let state = dir.join("state");
        std::fs::create_dir_all(&state)?;
        vmm.pause(&spec.paths)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let started = Instant::now();
        let files = vmm
            .save_state(&spec.paths, &source, &state)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        t.save.push(started.elapsed());
        vmm.kill(&spec.paths, &source).await;
        vmm.clean_up(&spec.paths).await;
        t.state_bytes = files
            .iter()
            .map(|f| {
                let meta = std::fs::metadata(state.join(f.name)).ok();
                match f.kind {
                    // Allocated bytes: a sparse memory file holds only what the guest touched.
                    StateKind::Memory => {
                        meta.map_or(0, |m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
                    }
                    StateKind::DeviceState => meta.map_or(0, |m| m.len()),
                }
            })
            .sum();
        // Restored as the daemon restores: the state linked into the machine's directory.
        let copy = raw_machine(image, &dir.join("copy"), mib)?;
        let linked = copy.paths.state_dir();
        std::fs::create_dir_all(&linked)?;
        for f in &files {
            std::fs::hard_link(state.join(f.name), linked.join(f.name))?;
        }
        let started = Instant::now();
        let restored = vmm
            .restore(&copy, &linked)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        t.restore.push(started.elapsed());
        let _ = std::fs::remove_file(linked.join("vmstate"));
        tokio::time::sleep(Duration::from_millis(500)).await;
        vmm.pause(&copy.paths)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let second = dir.join("second");
        std::fs::create_dir_all(&second)?;
        let started = Instant::now();
        vmm.save_state(&copy.paths, &restored, &second)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        t.save_restored.push(started.elapsed());
        if vmm.kind() == hearth_api::VmmKind::Firecracker {
            // Without its base in sight the backend writes a full snapshot.
            let (base, aside) = (linked.join("memory"), dir.join("aside"));
            std::fs::rename(&base, &aside)?;
            let full = dir.join("full");
            std::fs::create_dir_all(&full)?;
            let started = Instant::now();
            vmm.save_state(&copy.paths, &restored, &full)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            t.full_restored.push(started.elapsed());
            std::fs::rename(&aside, &base)?;
        }
        vmm.kill(&copy.paths, &restored).await;
        vmm.clean_up(&copy.paths).await;
        std::fs::remove_dir_all(&dir)?;
    }
    Ok(t)
}

pub async fn run(image: &Path, mib: u32, rounds: usize) -> Result<()> {
    let Some(binary) = std::env::var_os("HEARTH_FIRECRACKER").map(PathBuf::from) else {
        println!("skipped: no firecracker (set HEARTH_FIRECRACKER, and HEARTH_JAILER to jail it)");
        return Ok(());
    };
    let work = tempfile::Builder::new()
        .prefix("hbench-fc")
        .tempdir_in("/tmp")?;
    let jail = std::env::var_os("HEARTH_JAILER").map(|jailer| Jail {
        jailer: jailer.into(),
        chroot_base: work.path().join("jail"),
    });
    let user = match &jail {
        Some(_) => VmmUser::lookup("hearth-vmm")
            .map_err(|e| anyhow::anyhow!(e.message))
            .context("the jailer needs the VMM user (scripts/install-deps makes it)")?,
        None => None,
    };
    let firecracker = Firecracker {
        version: hearthd::vmm::version_of(&binary),
        binary,
        jail,
        user,
        console_log_bytes: 1 << 20,
        clone: hearthd::config::CloneMode::Auto,
    };
    let qemu = qemu();
    println!(
        "backends through the Vmm trait ({mib} MiB guests, {rounds} rounds; medians; {})",
        firecracker.version
    );
    println!(
        "  {:<12} {:>18} {:>22} {:>14} {:>26}",
        "backend",
        "save_state (paused)",
        "restore → running",
        "state on disk",
        "save_state of the restored"
    );
    let backends: [&dyn Vmm; 2] = [&qemu, &firecracker];
    for vmm in backends {
        let mut t = measure(vmm, image, work.path(), mib, rounds).await?;
        let full = if t.full_restored.is_empty() {
            String::new()
        } else {
            format!(
                " (Diff + merge; a Full of it {})",
                ms(median(&mut t.full_restored))
            )
        };
        println!(
            "  {:<12} {:>18} {:>22} {:>10} MiB {:>26}{full}",
            vmm.kind().to_string(),
            ms(median(&mut t.save)),
            ms(median(&mut t.restore)),
            t.state_bytes >> 20,
            ms(median(&mut t.save_restored)),
        );
    }
    Ok(())
}
