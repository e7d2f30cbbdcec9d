//! The QEMU backend: `qemu-system-x86_64 -M microvm`, booting the uncompressed `vmlinux`
//! through its PVH entry point, guest RAM in a shared file, virtio-mmio disks, the agent on a
//! virtio-serial port, QMP for control. QEMU daemonizes, so it outlives a daemon restart.

use super::{process, qmp::Qmp, MachinePaths, VmSpec, Vmm};
use crate::error::{Error, Result};
use crate::host::Accel;
use crate::store::ProcessRecord;
use async_trait::async_trait;
use hearth_api::VmmKind;
use hearth_proto::AGENT_PORT_NAME;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;
use tokio::process::Command;

pub struct Qemu {
    pub binary: PathBuf,
    pub accel: Accel,
    pub tsc_khz: u64,
}

/// Kernel flags for a fast, quiet microVM boot. Under TCG the guest is also told the TSC rate:
/// without it the kernel's clock calibration sometimes hangs at boot (5 boots in 10, measured).
const BASE_CMDLINE: &str = "console=ttyS0 root=/dev/vda rw panic=-1 quiet \
    cryptomgr.notests lsm=capability random.trust_cpu=on 8250.nr_uarts=1 pci=off";

impl Qemu {
    pub fn kernel_cmdline(&self) -> String {
        match self.accel {
            Accel::Tcg => format!("{BASE_CMDLINE} tsc_early_khz={} tsc=reliable", self.tsc_khz),
            Accel::Kvm => BASE_CMDLINE.to_string(),
        }
    }

    /// The full command line for `spec`, daemonizing. Public so the benchmark can run the very
    /// same QEMU without the daemon.
    pub fn command(&self, spec: &VmSpec) -> Command {
        let p = &spec.paths;
        let mut cmd = Command::new(&self.binary);
        let mem = spec.memory_mib;
        cmd.arg("-M")
            .arg("microvm,memory-backend=mem,isa-serial=on,rtc=on,acpi=on")
            .args(match self.accel {
                Accel::Kvm => ["-accel", "kvm", "-cpu", "host"],
                Accel::Tcg => ["-accel", "tcg", "-cpu", "max"],
            })
            .arg("-smp")
            .arg(spec.vcpus.to_string())
            .arg("-m")
            .arg(format!("{mem}M"))
            .args([
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-no-reboot",
            ])
            .arg("-object")
            .arg(format!(
                "memory-backend-file,id=mem,size={mem}M,mem-path={},share=on",
                p.memory().display()
            ))
            .arg("-kernel")
            .arg(&spec.kernel)
            .arg("-append")
            .arg(self.kernel_cmdline());
        if let Some(initrd) = &spec.initrd {
            cmd.arg("-initrd").arg(initrd);
        }
        cmd.arg("-chardev")
            .arg(format!(
                "file,id=console,path={},append=on",
                p.console().display()
            ))
            .args(["-serial", "chardev:console"]);
        for (i, disk) in spec.disks.iter().enumerate() {
            cmd.arg("-drive")
                .arg(format!(
                    "id=disk{i},file={},format=raw,if=none,discard=unmap",
                    disk.display()
                ))
                .arg("-device")
                .arg(format!("virtio-blk-device,drive=disk{i}"));
        }
        cmd.args([
            "-device",
            "virtio-rng-device",
            "-device",
            "virtio-serial-device",
        ])
        .arg("-chardev")
        .arg(format!(
            "socket,id=agent,path={},server=on,wait=off",
            p.agent_socket().display()
        ))
        .arg("-device")
        .arg(format!(
            "virtserialport,chardev=agent,name={AGENT_PORT_NAME}"
        ))
        .arg("-qmp")
        .arg(format!(
            "unix:{},server=on,wait=off",
            p.control_socket().display()
        ))
        .arg("-daemonize")
        .arg("-pidfile")
        .arg(p.pidfile());
        cmd
    }
}

#[async_trait]
impl Vmm for Qemu {
    fn kind(&self) -> VmmKind {
        VmmKind::Qemu
    }

    async fn boot(&self, spec: &VmSpec) -> Result<ProcessRecord> {
        let p = &spec.paths;
        std::fs::create_dir_all(&p.sock_dir)?;
        for stale in [p.agent_socket(), p.control_socket(), p.pidfile()] {
            let _ = std::fs::remove_file(stale);
        }
        let mut cmd = self.command(spec);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let child = cmd
            .spawn()
            .map_err(|e| Error::internal(format!("cannot run {}: {e}", self.binary.display())))?;
        // The foreground QEMU exits once the daemonized one has set up (or failed to).
        let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
            .await
            .map_err(|_| Error::unavailable("QEMU did not finish starting within 60 s"))??;
        if !out.status.success() {
            return Err(Error::invalid(format!(
                "QEMU refused to start the machine: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let pid: i32 = std::fs::read_to_string(p.pidfile())
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| Error::internal("QEMU started but wrote no pid file"))?;
        process::record(pid).ok_or_else(|| {
            Error::invalid(format!(
                "QEMU exited right after starting; console:\n{}",
                p.console_tail(20)
            ))
        })
    }

    async fn reattach(&self, paths: &MachinePaths, proc: &ProcessRecord) -> Result<()> {
        if !process::is_alive(proc) {
            return Err(Error::unavailable("the VMM process is gone"));
        }
        let mut qmp = Qmp::connect(&paths.control_socket())
            .await
            .map_err(Error::unavailable)?;
        let status = qmp
            .execute("query-status", None)
            .await
            .map_err(Error::unavailable)?;
        tracing::debug!(?status, "reattached to QEMU");
        Ok(())
    }
}
