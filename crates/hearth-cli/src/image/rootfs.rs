//! The root filesystem: busybox with its applet links, `hearth-agent` as `/sbin/init`, and the
//! few files a shell expects. `mkfs.ext4 -d` fills the image from that tree without a mount.

use super::{output, run, BUSYBOX};
use anyhow::Result;
use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;
use std::process::Command;

/// Size of the image file; machines grow their copy to their own disk size.
pub const ROOTFS_SIZE: &str = "128M";
pub const LABEL: &str = "hearth-root";

pub fn build(agent: &Path, tree: &Path, out: &Path) -> Result<()> {
    for dir in [
        "bin", "sbin", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "run", "tmp", "root",
        "var/tmp", "home", "mnt",
    ] {
        fs::create_dir_all(tree.join(dir))?;
    }
    fs::set_permissions(tree.join("tmp"), fs::Permissions::from_mode(0o1777))?;
    fs::set_permissions(tree.join("root"), fs::Permissions::from_mode(0o700))?;
    fs::copy(BUSYBOX, tree.join("bin/busybox"))?;
    let applets = output(Command::new(BUSYBOX).arg("--list-full"))?;
    for applet in applets.lines().map(str::trim).filter(|a| !a.is_empty()) {
        // The agent is init; busybox's own init, halt and friends would only confuse.
        if applet.ends_with("/init") || applet == "linuxrc" {
            continue;
        }
        let link = tree.join(applet);
        if !link.exists() {
            let depth = applet.matches('/').count();
            symlink(format!("{}bin/busybox", "../".repeat(depth)), link)?;
        }
    }
    fs::copy(agent, tree.join("sbin/init"))?;
    fs::set_permissions(tree.join("sbin/init"), fs::Permissions::from_mode(0o755))?;
    fs::write(tree.join("etc/hostname"), "hearth\n")?;
    fs::write(tree.join("etc/machine-id"), "")?;
    fs::write(
        tree.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    )?;
    fs::write(
        tree.join("etc/group"),
        "root:x:0:\ntty:x:5:\nnogroup:x:65534:\n",
    )?;
    fs::write(tree.join("etc/hosts"), "127.0.0.1 localhost\n")?;
    fs::write(tree.join("etc/fstab"), "")?;

    let _ = fs::remove_file(out);
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", LABEL, "-E", "root_owner=0:0", "-d"])
        .arg(tree)
        .arg(out)
        .arg(ROOTFS_SIZE))
}
