//! The default guest image: a Debian cloud kernel, a busybox initrd that loads the virtio
//! modules and switches to the ext4 root, and a root filesystem whose `/sbin/init` is
//! `hearth-agent`. Built from Debian packages only; nothing else is downloaded.

mod agent;
mod bzimage;
mod initrd;
mod manifest;
mod rootfs;

pub use manifest::Manifest;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Debian package whose dependency is the kernel to use.
pub const KERNEL_PACKAGE: &str = "linux-image-cloud-amd64";
/// Bumped whenever the recipe below changes what it produces.
const RECIPE_VERSION: u32 = 1;
const BUSYBOX: &str = "/bin/busybox";

pub struct BuildOptions {
    /// Where the image goes: `<data root>/images/default`.
    pub dest: PathBuf,
    /// The agent, given or found next to `hearth`; either way it must be linked statically.
    pub agent: PathBuf,
    pub force: bool,
}

pub enum Outcome {
    Built(Manifest),
    UpToDate(Manifest),
}

/// The image directory under a data root.
pub fn default_image_dir(root: &Path) -> PathBuf {
    root.join("images").join("default")
}

pub fn build(opts: &BuildOptions) -> Result<Outcome> {
    let progress = Steps::new(7);
    progress.step("checking inputs");
    agent::ensure_static(&opts.agent)?;
    let inputs = manifest::Inputs {
        recipe: RECIPE_VERSION,
        kernel_package_version: candidate_version(KERNEL_PACKAGE)?,
        busybox_sha256: manifest::sha256_file(Path::new(BUSYBOX))
            .with_context(|| format!("{BUSYBOX} (install busybox-static)"))?,
        agent_sha256: manifest::sha256_file(&opts.agent)
            .with_context(|| format!("agent binary {}", opts.agent.display()))?,
    };
    if !opts.force {
        if let Ok(existing) = Manifest::load(&opts.dest) {
            if existing.inputs == inputs && existing.files_present(&opts.dest) {
                progress.finish("image is up to date; nothing to do");
                return Ok(Outcome::UpToDate(existing));
            }
        }
    }

    let parent = opts.dest.parent().context("image path has no parent")?;
    std::fs::create_dir_all(parent)?;
    let work = tempfile::Builder::new()
        .prefix(".image-build-")
        .tempdir_in(parent)?;
    let out = work.path().join("out");
    std::fs::create_dir(&out)?;

    progress.step(&format!("downloading {KERNEL_PACKAGE}"));
    let kernel = download_kernel(work.path())?;

    progress.step("extracting vmlinux from the bzImage");
    let vmlinux = bzimage::extract_vmlinux(&std::fs::read(&kernel.vmlinuz)?)?;
    std::fs::write(out.join("vmlinux"), vmlinux)?;

    progress.step("building the initrd");
    initrd::build(
        &kernel.modules_dir,
        &work.path().join("initrd"),
        &out.join("initrd.img"),
    )?;

    progress.step("building the root filesystem");
    rootfs::build(
        &opts.agent,
        &work.path().join("rootfs"),
        &out.join("rootfs.ext4"),
    )?;

    progress.step("hashing and writing the manifest");
    let manifest = Manifest::create(&out, &kernel.release, inputs)?;

    progress.step("installing");
    if opts.dest.exists() {
        std::fs::remove_dir_all(&opts.dest)?;
    }
    std::fs::rename(&out, &opts.dest)?;
    progress.finish(&format!("built image in {}", opts.dest.display()));
    Ok(Outcome::Built(manifest))
}

struct Kernel {
    release: String,
    vmlinuz: PathBuf,
    modules_dir: PathBuf,
}

/// `apt-get download` the meta package and the kernel package it depends on, then unpack.
fn download_kernel(work: &Path) -> Result<Kernel> {
    let debs = work.join("debs");
    std::fs::create_dir(&debs)?;
    run(Command::new("apt-get")
        .args(["download", "-q", KERNEL_PACKAGE])
        .current_dir(&debs))?;
    let meta = find_deb(&debs, KERNEL_PACKAGE)?;
    let depends = output(Command::new("dpkg-deb").arg("-f").arg(&meta).arg("Depends"))?;
    let image_pkg = depends
        .split([',', '|'])
        .map(|d| d.split_whitespace().next().unwrap_or(""))
        .find(|d| d.starts_with("linux-image-"))
        .with_context(|| format!("{KERNEL_PACKAGE} depends on no linux-image package"))?
        .to_string();
    run(Command::new("apt-get")
        .args(["download", "-q", &image_pkg])
        .current_dir(&debs))?;
    let deb = find_deb(&debs, &image_pkg)?;
    let unpacked = work.join("kernel");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;
    let release = image_pkg.trim_start_matches("linux-image-").to_string();
    let vmlinuz = unpacked.join("boot").join(format!("vmlinuz-{release}"));
    let mut modules_dir = unpacked.join("lib/modules").join(&release);
    if !modules_dir.exists() {
        modules_dir = unpacked.join("usr/lib/modules").join(&release);
    }
    if !vmlinuz.exists() || !modules_dir.exists() {
        bail!("{image_pkg} has no vmlinuz or modules for {release}");
    }
    Ok(Kernel {
        release,
        vmlinuz,
        modules_dir,
    })
}

fn find_deb(dir: &Path, package: &str) -> Result<PathBuf> {
    let prefix = format!("{package}_");
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if name.starts_with(&prefix) && name.ends_with(".deb") {
            return Ok(path);
        }
    }
    bail!("apt-get download {package} left no .deb")
}

/// The version apt would install now, so a newer kernel in the archive triggers a rebuild.
fn candidate_version(package: &str) -> Result<String> {
    let text = output(Command::new("apt-cache").args(["policy", package]))?;
    text.lines()
        .find_map(|l| l.trim().strip_prefix("Candidate:"))
        .map(|v| v.trim().to_string())
        .filter(|v| v != "(none)")
        .with_context(|| format!("apt has no candidate for {package} (run apt-get update)"))
}

pub(crate) fn run(cmd: &mut Command) -> Result<()> {
    output(cmd).map(|_| ())
}

pub(crate) fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("running {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{:?} failed ({}): {}",
            cmd.get_program(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A numbered step display: a spinner on a terminal, plain lines elsewhere.
struct Steps {
    bar: ProgressBar,
    total: u64,
}

impl Steps {
    fn new(total: u64) -> Steps {
        let bar = ProgressBar::new_spinner();
        bar.set_style(
            ProgressStyle::with_template("{spinner} [{pos}/{len}] {msg} ({elapsed})").unwrap(),
        );
        bar.set_length(total);
        bar.enable_steady_tick(Duration::from_millis(120));
        Steps { bar, total }
    }

    fn step(&self, msg: &str) {
        self.bar.inc(1);
        if self.bar.is_hidden() {
            eprintln!("[{}/{}] {msg}", self.bar.position(), self.total);
        }
        self.bar.set_message(msg.to_string());
    }

    fn finish(&self, msg: &str) {
        self.bar.finish_and_clear();
        eprintln!("{msg}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dynamic_agent_stops_the_build_before_anything_is_made() {
        let root = tempfile::tempdir().unwrap();
        let dest = default_image_dir(root.path());
        let opts = BuildOptions {
            dest: dest.clone(),
            agent: PathBuf::from("/bin/true"),
            force: true,
        };
        let err = match build(&opts) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("a dynamically linked agent was accepted"),
        };
        assert!(err.contains("linked dynamically"), "{err}");
        assert!(!dest.exists());
        assert!(!root.path().join("images").exists());
    }
}
