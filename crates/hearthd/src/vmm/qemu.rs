//! The QEMU backend: `qemu-system-x86_64 -M microvm`, booting the uncompressed `vmlinux`
//! through its PVH entry point, guest RAM in a file, virtio-mmio disks, the agent on a
//! virtio-serial port, QMP for control. QEMU daemonizes, so it outlives a daemon restart.
//!
//! Snapshots use migration with `x-ignore-shared`: guest RAM in a shared file stays out of the
//! stream (the file itself is copied), so the device state is some 60 KB and is written in
//! milliseconds. A restore starts QEMU with `-incoming defer -S` on the snapshot's memory file
//! mapped private, loads the device state and continues.

use super::{console, process, qmp::Qmp, MachinePaths, MemoryBacking, VmSpec, Vmm};
use crate::error::{Error, Result};
use crate::host::Accel;
use crate::store::ProcessRecord;
use async_trait::async_trait;
use hearth_api::{ErrorCode, VmmKind};
use hearth_proto::AGENT_PORT_NAME;
use serde_json::json;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::process::Command;

pub struct Qemu {
    pub binary: PathBuf,
    pub accel: Accel,
    pub tsc_khz: u64,
    pub version: String,
    /// Bytes of serial console kept per file (`console.log`, then `console.log.1`).
    pub console_log_bytes: u64,
}

/// Kernel flags for a fast, quiet microVM boot. Under TCG the guest is also told the TSC rate:
/// without it the kernel's clock calibration sometimes hangs at boot (5 boots in 10, measured).
const BASE_CMDLINE: &str = "console=ttyS0 root=/dev/vda rw panic=-1 quiet \
    cryptomgr.notests lsm=capability random.trust_cpu=on 8250.nr_uarts=1 pci=off";

/// How long loading or saving device state may take. The state is small unless RAM travels
/// in it (a snapshot of a restored machine), which is bounded by the guest's size.
const MIGRATION_LIMIT: Duration = Duration::from_secs(300);

/// `qemu-system-x86_64 --version`'s first line.
pub fn version_of(binary: &Path) -> String {
    std::process::Command::new(binary)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_string)
        })
        .unwrap_or_else(|| "unknown".into())
}

/// A path for an `exec:` migration URI, which QEMU runs through /bin/sh.
fn shell_quoted(path: &Path) -> Result<String> {
    let s = path.to_string_lossy();
    if s.contains('\'') {
        return Err(Error::invalid(format!("path {s} holds a quote")));
    }
    Ok(format!("'{s}'"))
}

/// Guest RAM in a shared file stays out of the migration stream; both ends must agree on it.
fn ignore_shared() -> serde_json::Value {
    json!({ "capabilities": [ { "capability": "x-ignore-shared", "state": true } ] })
}

impl Qemu {
    pub fn kernel_cmdline(&self) -> String {
        match self.accel {
            Accel::Tcg => format!("{BASE_CMDLINE} tsc_early_khz={} tsc=reliable", self.tsc_khz),
            Accel::Kvm => BASE_CMDLINE.to_string(),
        }
    }

    /// The full command line for `spec`, daemonizing; `incoming` waits for device state.
    /// Public so the benchmark can run the very same QEMU without the daemon.
    pub fn command(&self, spec: &VmSpec, incoming: bool) -> Command {
        let p = &spec.paths;
        let mem = spec.memory_mib;
        let memory = match &spec.memory {
            MemoryBacking::SharedFile(path) => format!(
                "memory-backend-file,id=mem,size={mem}M,mem-path={},share=on",
                path.display()
            ),
            MemoryBacking::PrivateFile(path) => format!(
                "memory-backend-file,id=mem,size={mem}M,mem-path={},share=off",
                path.display()
            ),
            MemoryBacking::Anonymous => format!("memory-backend-ram,id=mem,size={mem}M"),
        };
        let mut cmd = Command::new(&self.binary);
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
            .args(["-object", &memory])
            .arg("-kernel")
            .arg(&spec.kernel)
            .arg("-append")
            .arg(self.kernel_cmdline());
        if let Some(initrd) = &spec.initrd {
            cmd.arg("-initrd").arg(initrd);
        }
        // The console goes into a FIFO that the daemon copies, capped, into console.log
        // (see `console`); it must exist first ([`console::prepare`]).
        cmd.arg("-chardev")
            .arg(format!(
                "pipe,id=console,path={}",
                p.console_pipe().display()
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
        if let Some(net) = &spec.network {
            // Userspace tap: no vhost here (`/dev/vhost-net` is absent on these hosts).
            cmd.arg("-netdev")
                .arg(format!(
                    "tap,id=net0,ifname={},script=no,downscript=no,vhost=off",
                    net.tap
                ))
                .arg("-device")
                .arg(format!("virtio-net-device,netdev=net0,mac={}", net.mac));
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
        .arg(p.pidfile())
        // Once daemonized, QEMU's stderr goes to the log file if one is open, and nowhere
        // otherwise; its reasons (why a device state did not load, say) are kept there.
        // `-d plugin` opens the file and logs nothing without TCG plugins.
        .arg("-D")
        .arg(p.vmm_log())
        .args(["-d", "plugin"]);
        if incoming {
            // Wait for the device state, and stay paused once it is loaded.
            cmd.args(["-incoming", "defer", "-S"]);
        }
        cmd
    }

    /// Starts QEMU daemonized and returns its process.
    async fn spawn(&self, spec: &VmSpec, incoming: bool) -> Result<ProcessRecord> {
        let p = &spec.paths;
        std::fs::create_dir_all(&p.sock_dir)?;
        for stale in [
            p.agent_socket(),
            p.control_socket(),
            p.pidfile(),
            p.vmm_log(),
        ] {
            let _ = std::fs::remove_file(stale);
        }
        console::prepare(p)?;
        let mut cmd = self.command(spec, incoming);
        if let Some(net) = &spec.network {
            // QEMU opens the tap by name, so it must run in the machine's namespace.
            let ns: OwnedFd = std::fs::File::open(&net.netns)
                .map_err(|e| {
                    Error::internal(format!("network namespace {}: {e}", net.netns.display()))
                })?
                .into();
            // SAFETY: the closure runs in the forked child before exec and makes one system
            // call.
            unsafe {
                cmd.pre_exec(move || {
                    nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                        .map_err(std::io::Error::from)
                });
            }
        }
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
            // Errors after it forked are in its log, not on stderr.
            let stderr = String::from_utf8_lossy(&out.stderr);
            let reasons: Vec<String> = [stderr.trim().to_string(), p.vmm_log_tail(10)]
                .into_iter()
                .filter(|r| !r.is_empty())
                .collect();
            return Err(Error::invalid(format!(
                "QEMU refused to start the machine: {}",
                reasons.join("\n")
            )));
        }
        console::follow(p, self.console_log_bytes);
        let pid: i32 = std::fs::read_to_string(p.pidfile())
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| Error::internal("QEMU started but wrote no pid file"))?;
        match process::record(pid) {
            Some(proc) => Ok(proc),
            None => {
                console::drained(p).await;
                Err(Error::invalid(format!(
                    "QEMU exited right after starting; console:\n{}",
                    p.console_tail(20)
                )))
            }
        }
    }

    async fn qmp(&self, paths: &MachinePaths) -> Result<Qmp> {
        Qmp::connect(&paths.control_socket())
            .await
            .map_err(Error::unavailable)
    }

    /// Polls `query-migrate` until the migration completes or fails.
    async fn await_migration(qmp: &mut Qmp, what: &str) -> Result<()> {
        let deadline = Instant::now() + MIGRATION_LIMIT;
        loop {
            let info = qmp
                .execute("query-migrate", None)
                .await
                .map_err(|e| Error::unavailable(format!("{what}: {e}")))?;
            match info.get("status").and_then(|s| s.as_str()).unwrap_or("") {
                "completed" => return Ok(()),
                "failed" | "cancelled" => {
                    let desc = info
                        .get("error-desc")
                        .and_then(|s| s.as_str())
                        .unwrap_or("no reason given");
                    return Err(Error::unavailable(format!("{what} failed: {desc}")));
                }
                _ => {}
            }
            if Instant::now() > deadline {
                return Err(Error::unavailable(format!("{what} timed out")));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Runs `command` (`migrate` or `migrate-incoming`) on `uri` with `x-ignore-shared` set,
    /// and waits for it; returns the QMP connection for what follows.
    async fn migrate(
        &self,
        paths: &MachinePaths,
        command: &str,
        uri: String,
        what: &str,
    ) -> Result<Qmp> {
        let mut qmp = self.qmp(paths).await?;
        let fail = |e: String| Error::unavailable(format!("{what}: {e}"));
        qmp.execute("migrate-set-capabilities", Some(ignore_shared()))
            .await
            .map_err(fail)?;
        qmp.execute(command, Some(json!({ "uri": uri })))
            .await
            .map_err(fail)?;
        Self::await_migration(&mut qmp, what).await?;
        Ok(qmp)
    }

    async fn load_and_run(&self, paths: &MachinePaths, vmstate: &Path) -> Result<()> {
        let what = "loading the device state";
        let uri = format!("exec:cat {}", shell_quoted(vmstate)?);
        let mut qmp = self.migrate(paths, "migrate-incoming", uri, what).await?;
        qmp.execute("cont", None)
            .await
            .map(|_| ())
            .map_err(|e| Error::unavailable(format!("{what}: {e}")))
    }
}

#[async_trait]
impl Vmm for Qemu {
    fn kind(&self) -> VmmKind {
        VmmKind::Qemu
    }

    fn version(&self) -> String {
        self.version.clone()
    }

    async fn boot(&self, spec: &VmSpec) -> Result<ProcessRecord> {
        self.spawn(spec, false).await
    }

    async fn reattach(&self, paths: &MachinePaths, proc: &ProcessRecord) -> Result<()> {
        if !process::is_alive(proc) {
            return Err(Error::unavailable("the VMM process is gone"));
        }
        let mut qmp = self.qmp(paths).await?;
        let status = qmp
            .execute("query-status", None)
            .await
            .map_err(Error::unavailable)?;
        tracing::debug!(?status, "reattached to QEMU");
        console::follow(paths, self.console_log_bytes);
        Ok(())
    }

    async fn restore(&self, spec: &VmSpec, vmstate: &Path) -> Result<ProcessRecord> {
        let proc = self.spawn(spec, true).await?;
        if let Err(e) = self.load_and_run(&spec.paths, vmstate).await {
            // QEMU exits when it cannot load a stream; the QMP error comes as it goes.
            let exited = process::wait_gone(&proc, Duration::from_secs(5)).await;
            process::kill_and_wait(&proc).await;
            if !exited {
                return Err(e);
            }
            let reason = spec.paths.vmm_log_tail(5);
            return Err(Error {
                code: ErrorCode::Integrity,
                message: format!(
                    "QEMU could not load the snapshot's device state (corrupt, or from another \
                     QEMU?): {}",
                    if reason.is_empty() { e.message } else { reason }
                ),
            });
        }
        Ok(proc)
    }

    async fn pause(&self, paths: &MachinePaths) -> Result<()> {
        let mut qmp = self.qmp(paths).await?;
        qmp.execute("stop", None)
            .await
            .map(|_| ())
            .map_err(|e| Error::unavailable(format!("pausing: {e}")))
    }

    async fn resume(&self, paths: &MachinePaths) -> Result<()> {
        let mut qmp = self.qmp(paths).await?;
        qmp.execute("cont", None)
            .await
            .map(|_| ())
            .map_err(|e| Error::unavailable(format!("resuming: {e}")))
    }

    async fn save_device_state(&self, paths: &MachinePaths, dest: &Path) -> Result<()> {
        let uri = format!("exec:cat > {}", shell_quoted(dest)?);
        self.migrate(paths, "migrate", uri, "saving the device state")
            .await
            .map(|_| ())
    }
}
