//! `hearth-bench firecracker`: the two backends side by side through the `Vmm` trait, on the
//! same image and memory size, in one run. Each boots a machine, lets it run a moment, pauses
//! it and writes its state (`save_state`, timed), then starts a second machine from that state
//! (`restore`: spawn + load → running, timed). Firecracker's guest cannot get far under nested
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
        let copy = raw_machine(image, &dir.join("copy"), mib)?;
        let started = Instant::now();
        let restored = vmm
            .restore(&copy, &state)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        t.restore.push(started.elapsed());
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
    };
    let qemu = qemu();
    println!(
        "backends through the Vmm trait ({mib} MiB guests, {rounds} rounds; medians; {})",
        firecracker.version
    );
    println!(
        "  {:<12} {:>18} {:>22} {:>14}",
        "backend", "save_state (paused)", "restore → running", "state on disk"
    );
    let backends: [&dyn Vmm; 2] = [&qemu, &firecracker];
    for vmm in backends {
        let mut t = measure(vmm, image, work.path(), mib, rounds).await?;
        println!(
            "  {:<12} {:>18} {:>22} {:>10} MiB",
            vmm.kind().to_string(),
            ms(median(&mut t.save)),
            ms(median(&mut t.restore)),
            t.state_bytes >> 20
        );
    }
    Ok(())
}
