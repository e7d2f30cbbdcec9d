//! The initrd: busybox, the kernel's virtio modules, and an `/init` that loads them, mounts the
//! ext4 root and switches to it. Uncompressed: under TCG, decompressing costs more than reading.

use super::BUSYBOX;
use anyhow::{Context, Result};
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};

/// Loaded in this order (each after its dependencies). The cloud kernel builds these as modules
/// and has no virtio-mmio command-line devices, so the initrd must load them itself.
pub const MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_mmio",
    "virtio_blk",
    "failover",
    "net_failover",
    "virtio_net",
    "vsock",
    "vmw_vsock_virtio_transport_common",
    "vmw_vsock_virtio_transport",
    "virtio_console",
    "virtio-rng",
];

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox mkdir -p /proc /dev /newroot
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t devtmpfs devtmpfs /dev
for m in $(/bin/busybox cat /modules); do
    /bin/busybox insmod /lib/modules/$m.ko
done
root=/dev/vda
for arg in $(/bin/busybox cat /proc/cmdline); do
    case "$arg" in root=*) root="${arg#root=}" ;; esac
done
i=0
while [ ! -b "$root" ] && [ $i -lt 1000 ]; do /bin/busybox sleep 0.01; i=$((i+1)); done
if ! /bin/busybox mount -t ext4 -o rw "$root" /newroot; then
    echo "hearth-initrd: cannot mount the root filesystem $root" >&2
    /bin/busybox poweroff -f
fi
/bin/busybox mount --move /dev /newroot/dev
/bin/busybox umount /proc
exec /bin/busybox switch_root /newroot /sbin/init
"#;

pub fn build(modules_dir: &Path, tree: &Path, out: &Path) -> Result<()> {
    fs::create_dir_all(tree.join("bin"))?;
    fs::create_dir_all(tree.join("lib/modules"))?;
    fs::copy(BUSYBOX, tree.join("bin/busybox"))?;
    std::os::unix::fs::symlink("busybox", tree.join("bin/sh"))?;
    let mut loaded = Vec::new();
    for name in MODULES {
        if let Some(path) = find_module(modules_dir, name)? {
            fs::copy(&path, tree.join("lib/modules").join(format!("{name}.ko")))?;
            loaded.push(*name);
        }
    }
    fs::write(tree.join("modules"), loaded.join("\n") + "\n")?;
    let init = tree.join("init");
    fs::write(&init, INIT)?;
    fs::set_permissions(&init, fs::Permissions::from_mode(0o755))?;

    let list = super::output(Command::new("find").arg(".").current_dir(tree))?;
    let file = fs::File::create(out)?;
    let mut cpio = Command::new("cpio")
        .args(["--quiet", "-o", "-H", "newc", "--owner", "0:0"])
        .current_dir(tree)
        .stdin(Stdio::piped())
        .stdout(file)
        .spawn()
        .context("running cpio")?;
    cpio.stdin.take().unwrap().write_all(list.as_bytes())?;
    let status = cpio.wait()?;
    anyhow::ensure!(status.success(), "cpio failed: {status}");
    Ok(())
}

/// A module built in (listed in `modules.builtin`) or absent is skipped.
fn find_module(modules_dir: &Path, name: &str) -> Result<Option<std::path::PathBuf>> {
    let file = format!("{name}.ko");
    let mut stack = vec![modules_dir.join("kernel")];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.file_name().is_some_and(|f| f == file.as_str()) {
                return Ok(Some(path));
            }
        }
    }
    Ok(None)
}
