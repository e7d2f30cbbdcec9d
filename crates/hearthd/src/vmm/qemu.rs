//! The QEMU backend: `qemu-system-x86_64 -M microvm`, booting the uncompressed `vmlinux`
//! through its PVH entry point, guest RAM in a file, virtio-mmio disks, the agent on a
//! virtio-serial port, QMP for control. QEMU runs in a session of its own, so it outlives a
//! daemon restart; confined: as an unprivileged user, under its seccomp sandbox, in the
//! machine's cgroup and network namespace.
//!
//! Snapshots use migration with `x-ignore-shared`: guest RAM in a shared file stays out of the
//! stream (the file itself is copied), so the device state is some 60 KB and is written in
//! milliseconds. A restore starts QEMU with `-incoming defer -S` on the snapshot's memory file
//! mapped private, loads the device state and continues. The device state travels through a
//! descriptor the daemon opens (`fd:` migration), as the sandbox forbids `exec:`.
//!
//! A restored machine's RAM is that private mapping, which migration would stream whole (RAM
//! is left out only when it is shared). Its snapshot takes the device state alone
//! (`xen-save-devices-state`, which any QEMU has: it writes every section but the RAM blocks,
//! ROMs included, which a PVH guest does not read again) and builds
//! the memory file from a clone of the file the machine was restored from plus the pages the
//! machine wrote since ([`pagemap`]): as fast as an original's, and a full file again, so
//! machines restored from it share its pages and nothing depends on the snapshot before.

use super::{
    console, pagemap, process, qmp::Qmp, user::VmmUser, MachinePaths, StateFile, StateKind,
    VmProcess, VmSpec, Vmm, VmmError,
};
use crate::config::CloneMode;
use crate::error::Error;
use crate::host::Accel;
use crate::storage;
use async_trait::async_trait;
use hearth_api::VmmKind;
use hearth_proto::AGENT_PORT_NAME;
use serde_json::json;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::net::UnixStream;
use tokio::process::Command;

type Result<T, E = VmmError> = std::result::Result<T, E>;

/// The device state's name in a snapshot directory.
const VMSTATE: &str = "vmstate";
/// Guest RAM's name in a snapshot directory, when it is not in the device state.
const MEMORY: &str = "memory";

/// A migration stream's first section after its 8-byte header, when QEMU wrote the machine's
/// configuration (it does in every `migrate`; `xen-save-devices-state` never does).
const CONFIGURATION_SECTION: u8 = 0x07;

/// How QEMU starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Boots the kernel.
    Boot,
    /// Waits paused for a migration stream.
    Incoming,
    /// Waits paused for device state without a configuration section (what
    /// `xen-save-devices-state` writes): told not to expect one.
    IncomingDevices,
}

/// Where guest RAM lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemoryBacking {
    /// A file mapped shared: a cold boot. A snapshot copies the file instead of streaming RAM.
    SharedFile(PathBuf),
    /// A snapshot's memory file mapped private (copy-on-write, paged in lazily): a restore.
    /// Many machines restored from one snapshot share its unmodified pages.
    PrivateFile(PathBuf),
    /// Anonymous memory, filled from the device state stream.
    Anonymous,
}

pub struct Qemu {
    pub binary: PathBuf,
    pub accel: Accel,
    pub tsc_khz: u64,
    pub version: String,
    /// Bytes of serial console (and of QEMU's own log) kept per file (`console.log`, then
    /// `console.log.1`).
    pub console_log_bytes: u64,
    /// Whom QEMU runs as; None keeps it root.
    pub user: Option<VmmUser>,
    /// How a snapshot copies a booted machine's RAM file.
    pub clone: CloneMode,
}

/// Kernel flags for a fast, quiet microVM boot. Under TCG the guest is also told the TSC rate:
/// without it the kernel's clock calibration sometimes hangs at boot (5 boots in 10, measured).
pub(super) const BASE_CMDLINE: &str = "console=ttyS0 root=/dev/vda rw panic=-1 quiet \
    cryptomgr.notests lsm=capability random.trust_cpu=on 8250.nr_uarts=1 pci=off";

/// How long loading or saving device state may take. The state is small unless RAM travels
/// in it (a snapshot of a restored machine), which is bounded by the guest's size.
const MIGRATION_LIMIT: Duration = Duration::from_secs(300);

/// A clear error unless `binary` has the seccomp sandbox (QEMU built with libseccomp): it
/// refuses `-sandbox` then, before it would print its version.
pub fn check_sandbox(binary: &Path) -> Result<()> {
    let out = std::process::Command::new(binary)
        .args(["-sandbox", SANDBOX, "-version"])
        .output()
        .map_err(|source| VmmError::Spawn {
            binary: binary.to_path_buf(),
            source,
        })?;
    if out.status.success() {
        return Ok(());
    }
    Err(VmmError::Refused {
        vmm: "QEMU",
        reason: format!(
            "{} has no seccomp sandbox (a QEMU built without libseccomp?): {}",
            binary.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ),
    })
}

/// Guest RAM in a shared file stays out of the migration stream; both ends must agree on it.
fn ignore_shared() -> serde_json::Value {
    json!({ "capabilities": [ { "capability": "x-ignore-shared", "state": true } ] })
}

/// QEMU's seccomp sandbox: no obsolete system calls, no privilege changes, no new processes,
/// no scheduler or resource-limit changes. It is applied before QEMU sets up, so whatever it
/// forbids must be done before QEMU starts: privileges are dropped and QEMU put in the
/// background by the daemon, and migrations go to descriptors, not to commands.
const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// TCG with its translated-code buffer capped: by default it grows to 1 GiB (an eighth of the
/// host's RAM at most), memory the VMM's cgroup would have to hold beyond the guest's RAM. A
/// booted guest has translated some 50 MB, measured.
const TCG: &str = "tcg,tb-size=128";

/// How long QEMU may take to set up before it answers on its control socket.
const START_LIMIT: Duration = Duration::from_secs(60);

/// The descriptors a VMM inherits: what it may not or cannot open itself.
struct Inherited {
    qmp: OwnedFd,
    agent: OwnedFd,
    tap: Option<OwnedFd>,
}

impl Inherited {
    fn raw(&self) -> Vec<RawFd> {
        [Some(&self.qmp), Some(&self.agent), self.tap.as_ref()]
            .into_iter()
            .flatten()
            .map(|fd| fd.as_raw_fd())
            .collect()
    }
}

/// A listening Unix socket at `path` (none may be there) for QEMU to accept on; only root
/// may connect to it.
fn listen(path: &Path) -> Result<OwnedFd> {
    let listener = std::os::unix::net::UnixListener::bind(path)
        .map_err(|e| VmmError::io("binding", path, e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| VmmError::io("restricting", path, e))?;
    Ok(listener.into())
}

impl Qemu {
    pub fn kernel_cmdline(&self) -> String {
        match self.accel {
            Accel::Tcg => format!("{BASE_CMDLINE} tsc_early_khz={} tsc=reliable", self.tsc_khz),
            Accel::Kvm => BASE_CMDLINE.to_string(),
        }
    }

    /// The full command line for `spec`, given the descriptors it inherits.
    fn command(
        &self,
        spec: &VmSpec,
        memory: &MemoryBacking,
        start: Start,
        fds: &Inherited,
    ) -> Command {
        let p = &spec.paths;
        let mem = spec.memory_mib;
        let memory = match memory {
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
                Accel::Tcg => ["-accel", TCG, "-cpu", "max"],
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
                "-sandbox",
                SANDBOX,
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
        if let (Some(net), Some(tap)) = (&spec.network, &fds.tap) {
            // Userspace tap: no vhost here (`/dev/vhost-net` is absent on these hosts).
            cmd.arg("-netdev")
                .arg(format!("tap,id=net0,fd={},vhost=off", tap.as_raw_fd()))
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
            "socket,id=agent,fd={},server=on,wait=off",
            fds.agent.as_raw_fd()
        ))
        .arg("-device")
        .arg(format!(
            "virtserialport,chardev=agent,name={AGENT_PORT_NAME}"
        ))
        .arg("-chardev")
        .arg(format!(
            "socket,id=qmp,fd={},server=on,wait=off",
            fds.qmp.as_raw_fd()
        ))
        .args(["-mon", "chardev=qmp,mode=control"]);
        if start != Start::Boot {
            // Wait for the device state, and stay paused once it is loaded.
            cmd.args(["-incoming", "defer", "-S"]);
        }
        if start == Start::IncomingDevices {
            cmd.args(["-global", "migration.send-configuration=off"]);
        }
        cmd
    }

    /// Gives the VMM user the files QEMU opens by path: the kernel and initrd to read, and to
    /// write the disks, the RAM file (made here for a cold boot; a restore's, the snapshot's,
    /// is opened for writing too, though mapped private) and the console log. Their
    /// directories stay root's, so the VMM cannot put a link where the daemon will read.
    fn prepare_files(&self, spec: &VmSpec, memory: &MemoryBacking) -> Result<()> {
        let Some(user) = &self.user else {
            return Ok(());
        };
        let create = |path: &Path| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| VmmError::io("creating", path, e))
                .map(drop)
        };
        for file in std::iter::once(&spec.kernel).chain(&spec.initrd) {
            user.let_read(file)?;
        }
        // The console's pipes, made by console::prepare: QEMU opens them.
        for end in ["in", "out"] {
            user.own(&spec.paths.console_fifo(end))?;
        }
        for disk in &spec.disks {
            user.own(disk)?;
        }
        match memory {
            MemoryBacking::SharedFile(path) => {
                create(path)?;
                user.own(path)?;
            }
            MemoryBacking::PrivateFile(path) => user.own(path)?,
            MemoryBacking::Anonymous => {}
        }
        Ok(())
    }

    /// Starts QEMU for `spec` (waiting for device state unless it boots) in the background:
    /// in a session of its own, in the machine's network namespace and cgroup, as the VMM
    /// user, sandboxed. Returns once it has set up and answers on its control socket; on
    /// failure no process is left.
    pub async fn spawn(
        &self,
        spec: &VmSpec,
        memory: &MemoryBacking,
        start: Start,
    ) -> Result<VmProcess> {
        let p = &spec.paths;
        std::fs::create_dir_all(&p.sock_dir)
            .map_err(|e| VmmError::io("creating", &p.sock_dir, e))?;
        // An unprivileged QEMU opens its console's pipes here by name (it gets its sockets as
        // descriptors): it may pass through, not list or write.
        let mode = if self.user.is_some() { 0o711 } else { 0o700 };
        std::fs::set_permissions(&p.sock_dir, std::fs::Permissions::from_mode(mode))
            .map_err(|e| VmmError::io("restricting", &p.sock_dir, e))?;
        for stale in [p.agent_socket(), p.control_socket(), p.pidfile()] {
            let _ = std::fs::remove_file(stale);
        }
        console::prepare(p)?;
        self.prepare_files(spec, memory)?;
        let tap = match &spec.network {
            Some(net) => {
                let (ns, tap) = (net.netns.clone(), net.tap.clone());
                let fd = tokio::task::spawn_blocking(move || crate::net::open_tap(&ns, &tap))
                    .await
                    .map_err(|e| Error::internal(e.to_string()))??;
                Some(fd)
            }
            None => None,
        };
        let fds = Inherited {
            qmp: listen(&p.control_socket())?,
            agent: listen(&p.agent_socket())?,
            tap,
        };
        // Everything QEMU reports, from its first line: it has no terminal. Followed before
        // QEMU starts, so that the words of one that fails at once are kept.
        for old in [p.vmm_log(), p.vmm_log().with_extension("log.1")] {
            let _ = std::fs::remove_file(old);
        }
        let log = console::writer(p, console::Log::Vmm)?;
        console::follow(p, console::Log::Vmm, self.console_log_bytes);
        let mut cmd = self.command(spec, memory, start, &fds);
        let ns: Option<OwnedFd> = match &spec.network {
            Some(net) => Some(
                std::fs::File::open(&net.netns)
                    .map_err(|e| VmmError::io("opening", &net.netns, e))?
                    .into(),
            ),
            None => None,
        };
        process::Confinement {
            netns: ns,
            cgroup: spec.cgroup.clone(),
            inherit: fds.raw(),
            user: self.user.clone(),
        }
        .apply(&mut cmd);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log));
        let spawned = cmd.spawn();
        // QEMU holds the sockets, the tap and its log's pipe now; when it exits, they close.
        drop(cmd);
        drop(fds);
        let mut child = spawned.map_err(|source| VmmError::Spawn {
            binary: self.binary.clone(),
            source,
        })?;
        let pid = child.id().map(|pid| pid as i32);
        let proc = pid.and_then(process::record);
        if let Some(proc) = proc {
            // For the reconcile pass, should the daemon stop before the pid is recorded (the
            // machine's cgroup names the VMM too).
            let written =
                std::fs::write(p.pidfile(), format!("{} {}\n", proc.pid, proc.start_time));
            if let Err(e) = written {
                tracing::warn!(pid = proc.pid, "writing {}: {e}", p.pidfile().display());
            }
        }
        let control = p.control_socket();
        let ready = tokio::select! {
            status = child.wait() => Err(status.ok()),
            qmp = Qmp::connect_within(&control, START_LIMIT) => qmp.map_err(|_| None),
        };
        let exited = match (ready, proc) {
            (Ok(_), Some(proc)) => {
                console::follow(p, console::Log::Console, self.console_log_bytes);
                // Reaps it when it exits, while this daemon runs.
                tokio::spawn(async move {
                    let _ = child.wait().await;
                });
                return Ok(proc);
            }
            (Ok(_), None) | (Err(None), _) => None,
            (Err(Some(status)), _) => Some(status),
        };
        let status = match exited {
            Some(status) => status,
            None => match tokio::time::timeout(Duration::from_secs(5), child.wait()).await {
                Ok(status) => status.map_err(|e| VmmError::control("starting QEMU", e))?,
                Err(_) => {
                    let _ = child.start_kill();
                    let _ = child.wait().await;
                    return Err(VmmError::StartTimeout {
                        vmm: "QEMU",
                        limit: START_LIMIT,
                        detail: "its control socket never answered".into(),
                    });
                }
            },
        };
        let log = p.vmm_log_tail(10).await;
        // Killed (the cgroup's OOM killer, a signal from outside): the host's trouble, not the
        // request's. An exit of its own is QEMU refusing what it was given.
        match std::os::unix::process::ExitStatusExt::signal(&status) {
            Some(signal) => Err(VmmError::control(
                "starting QEMU",
                format!("killed by signal {signal}: {log}"),
            )),
            None => Err(VmmError::Refused {
                vmm: "QEMU",
                reason: log,
            }),
        }
    }

    async fn qmp(&self, paths: &MachinePaths) -> Result<Qmp> {
        Qmp::connect(&paths.control_socket())
            .await
            .map_err(|e| VmmError::control("connecting to QMP", e))
    }

    /// Polls `query-migrate` until the migration completes or fails.
    async fn await_migration(qmp: &mut Qmp, what: &'static str) -> Result<()> {
        let deadline = Instant::now() + MIGRATION_LIMIT;
        loop {
            let info = qmp
                .execute("query-migrate", None)
                .await
                .map_err(|e| VmmError::control(what, e))?;
            match info.get("status").and_then(|s| s.as_str()).unwrap_or("") {
                "completed" => return Ok(()),
                "failed" | "cancelled" => {
                    let desc = info
                        .get("error-desc")
                        .and_then(|s| s.as_str())
                        .unwrap_or("no reason given");
                    return Err(VmmError::control(what, format!("failed: {desc}")));
                }
                _ => {}
            }
            if Instant::now() > deadline {
                return Err(VmmError::control(what, "timed out"));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Runs `command` (`migrate` or `migrate-incoming`) to or from `file`, handed to QEMU as a
    /// descriptor, with `x-ignore-shared` set, and waits for it; returns the QMP connection for
    /// what follows.
    async fn migrate(
        &self,
        paths: &MachinePaths,
        command: &str,
        file: std::fs::File,
        what: &'static str,
    ) -> Result<Qmp> {
        let mut qmp = self.qmp(paths).await?;
        let fail = |e: String| VmmError::control(what, e);
        qmp.execute("migrate-set-capabilities", Some(ignore_shared()))
            .await
            .map_err(fail)?;
        qmp.pass_fd(MIGRATION_FD, file.as_fd())
            .await
            .map_err(fail)?;
        // QEMU has its own copy now.
        drop(file);
        qmp.execute(
            command,
            Some(json!({ "uri": format!("fd:{MIGRATION_FD}") })),
        )
        .await
        .map_err(fail)?;
        Self::await_migration(&mut qmp, what).await?;
        Ok(qmp)
    }

    /// A restored machine's state: its devices into `vmstate`, its RAM as a clone of `base`
    /// (the memory file it maps private; cloned already by [`Vmm::prepare_state`] unless a
    /// caller skipped it) with the pages it wrote copied over.
    async fn save_over_base(
        &self,
        paths: &MachinePaths,
        process: &VmProcess,
        vmstate: std::fs::File,
        base: &Path,
        dir: &Path,
    ) -> Result<Vec<StateFile>> {
        let copy = dir.join(MEMORY);
        if !copy.exists() {
            self.clone_base(base, &copy).await?;
        }
        let (pid, from, to) = (process.pid, base.to_path_buf(), copy.clone());
        let copied =
            tokio::task::spawn_blocking(move || pagemap::copy_written_pages(pid, &from, &to));
        let (copied, saved) = tokio::join!(copied, self.save_devices(paths, vmstate));
        saved?;
        let copied = copied
            .map_err(|e| Error::internal(e.to_string()))?
            .map_err(|e| VmmError::io("copying the pages written over", base, e))?;
        tracing::debug!(dir = %paths.dir.display(), bytes = copied, "memory written since the restore");
        Ok(vec![
            StateFile {
                name: VMSTATE,
                kind: StateKind::DeviceState,
            },
            StateFile {
                name: MEMORY,
                kind: StateKind::Memory,
            },
        ])
    }

    async fn clone_base(&self, base: &Path, copy: &Path) -> Result<()> {
        let (from, to, mode) = (base.to_path_buf(), copy.to_path_buf(), self.clone);
        tokio::task::spawn_blocking(move || storage::clone_file(&from, &to, mode))
            .await
            .map_err(|e| Error::internal(e.to_string()))??;
        Ok(())
    }

    /// Every device's state, RAM left out, into `file` (`xen-save-devices-state`, opened by
    /// QEMU as an fd set). Not `live`: that would hand the disks over to a migration target.
    async fn save_devices(&self, paths: &MachinePaths, file: std::fs::File) -> Result<()> {
        let what = "saving the device state";
        let fail = |e: String| VmmError::control(what, e);
        let mut qmp = self.qmp(paths).await?;
        let set = qmp.add_fd(file.as_fd()).await.map_err(fail)?;
        drop(file);
        let saved = qmp
            .execute(
                "xen-save-devices-state",
                Some(json!({ "filename": format!("/dev/fdset/{set}"), "live": false })),
            )
            .await;
        // QEMU's copy of the descriptor goes with its set.
        if let Err(e) = qmp
            .execute("remove-fd", Some(json!({ "fdset-id": set })))
            .await
        {
            tracing::warn!(dir = %paths.dir.display(), "removing fd set {set}: {e}");
        }
        saved.map(drop).map_err(fail)
    }

    async fn load_and_run(&self, paths: &MachinePaths, vmstate: &Path) -> Result<()> {
        let what = "loading the device state";
        let file = std::fs::File::open(vmstate).map_err(|e| VmmError::io("opening", vmstate, e))?;
        let mut qmp = self.migrate(paths, "migrate-incoming", file, what).await?;
        qmp.execute("cont", None)
            .await
            .map(|_| ())
            .map_err(|e| VmmError::control(what, e))
    }

    async fn run(&self, paths: &MachinePaths, command: &str, what: &'static str) -> Result<()> {
        let mut qmp = self.qmp(paths).await?;
        qmp.execute(command, None)
            .await
            .map(|_| ())
            .map_err(|e| VmmError::control(what, e))
    }
}

/// Whether the stream in `vmstate` starts with the machine's configuration (see
/// [`Start::IncomingDevices`]).
fn has_configuration(vmstate: &Path) -> std::io::Result<bool> {
    use std::io::Read;
    let mut head = [0u8; 9];
    std::fs::File::open(vmstate)?.read_exact(&mut head)?;
    Ok(head[8] == CONFIGURATION_SECTION)
}

/// The name a migration's descriptor has in QEMU.
const MIGRATION_FD: &str = "migration";

#[async_trait]
impl Vmm for Qemu {
    fn kind(&self) -> VmmKind {
        VmmKind::Qemu
    }

    fn version(&self) -> String {
        self.version.clone()
    }

    /// RAM in a shared file of the machine's own, so that a snapshot copies the file.
    async fn boot(&self, spec: &VmSpec) -> Result<VmProcess> {
        let memory = MemoryBacking::SharedFile(spec.paths.memory());
        self.spawn(spec, &memory, Start::Boot).await
    }

    async fn reattach(&self, paths: &MachinePaths, proc: &VmProcess) -> Result<()> {
        if !process::is_alive(proc) {
            return Err(VmmError::Gone);
        }
        let mut qmp = self.qmp(paths).await?;
        let status = qmp
            .execute("query-status", None)
            .await
            .map_err(|e| VmmError::control("querying the status", e))?;
        tracing::debug!(?status, "reattached to QEMU");
        console::follow(paths, console::Log::Console, self.console_log_bytes);
        console::follow(paths, console::Log::Vmm, self.console_log_bytes);
        Ok(())
    }

    /// The snapshot's memory file mapped private when it has one; else RAM comes in the
    /// device state.
    async fn restore(&self, spec: &VmSpec, state: &Path) -> Result<VmProcess> {
        let file = state.join(MEMORY);
        let memory = if file.exists() {
            MemoryBacking::PrivateFile(file)
        } else {
            MemoryBacking::Anonymous
        };
        let vmstate = state.join(VMSTATE);
        let start = match has_configuration(&vmstate) {
            Ok(true) => Start::Incoming,
            Ok(false) => Start::IncomingDevices,
            Err(e) => return Err(VmmError::io("reading", &vmstate, e)),
        };
        let started = Instant::now();
        let proc = self.spawn(spec, &memory, start).await?;
        let spawned = started.elapsed();
        let loaded = self.load_and_run(&spec.paths, &vmstate).await;
        tracing::debug!(dir = %spec.paths.dir.display(), ?spawned, loaded = ?started.elapsed() - spawned, "QEMU restore");
        if let Err(e) = loaded {
            // QEMU exits when it cannot load a stream; the QMP error comes as it goes.
            let exited = process::wait_gone(&proc, Duration::from_secs(5)).await;
            process::kill_and_wait(&proc).await;
            if !exited {
                return Err(e);
            }
            let reason = spec.paths.vmm_log_tail(5).await;
            return Err(VmmError::StateRejected {
                vmm: "QEMU",
                reason: if reason.is_empty() {
                    e.to_string()
                } else {
                    reason
                },
            });
        }
        Ok(proc)
    }

    fn is_alive(&self, proc: &VmProcess) -> bool {
        process::is_alive(proc)
    }

    async fn pause(&self, paths: &MachinePaths) -> Result<()> {
        self.run(paths, "stop", "pausing").await
    }

    async fn resume(&self, paths: &MachinePaths) -> Result<()> {
        self.run(paths, "cont", "resuming").await
    }

    /// A restored machine's base memory does not change: it is cloned before the pause.
    async fn prepare_state(&self, paths: &MachinePaths, dir: &Path) -> Result<()> {
        let base = paths.state_dir().join(MEMORY);
        if paths.memory().exists() || !base.exists() {
            return Ok(());
        }
        self.clone_base(&base, &dir.join(MEMORY)).await
    }

    /// A booted machine's RAM is its shared file: it stays out of the device state (some 60
    /// KB) and is cloned beside it. A restored machine's RAM, a private mapping of the memory
    /// file it was restored from, is that file's clone with the pages it wrote since. RAM of
    /// neither kind (a restore from a snapshot that had RAM in its device state) is streamed
    /// into the device state.
    async fn save_state(
        &self,
        paths: &MachinePaths,
        process: &VmProcess,
        dir: &Path,
    ) -> Result<Vec<StateFile>> {
        let dest = dir.join(VMSTATE);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(&dest)
            .map_err(|e| VmmError::io("creating", &dest, e))?;
        let base = paths.state_dir().join(MEMORY);
        let ram = paths.memory();
        if !ram.exists() && base.exists() {
            return self.save_over_base(paths, process, file, &base, dir).await;
        }
        self.migrate(paths, "migrate", file, "saving the device state")
            .await?;
        let mut written = vec![StateFile {
            name: VMSTATE,
            kind: StateKind::DeviceState,
        }];
        if ram.exists() {
            let (copy, mode) = (dir.join(MEMORY), self.clone);
            tokio::task::spawn_blocking(move || storage::clone_file(&ram, &copy, mode))
                .await
                .map_err(|e| Error::internal(e.to_string()))??;
            written.push(StateFile {
                name: MEMORY,
                kind: StateKind::Memory,
            });
        }
        Ok(written)
    }

    async fn wait_exit(&self, proc: &VmProcess, limit: Duration) -> bool {
        process::wait_gone(proc, limit).await
    }

    async fn kill(&self, _: &MachinePaths, proc: &VmProcess) {
        process::kill_and_wait(proc).await;
    }

    async fn clean_up(&self, paths: &MachinePaths) {
        process::kill_vmm_of(&paths.sock_dir, &paths.pidfile()).await;
        if let Err(e) = storage::remove_file(&paths.memory()).await {
            tracing::warn!(dir = %paths.dir.display(), "{}", e.message);
        }
    }

    /// QEMU listens for the host before the guest is up: the connection is at once.
    async fn connect_agent(
        &self,
        paths: &MachinePaths,
        _: &VmProcess,
        _: Instant,
    ) -> Result<UnixStream> {
        let socket = paths.agent_socket();
        UnixStream::connect(&socket)
            .await
            .map_err(|e| VmmError::control("connecting to the agent's socket", e))
    }
}
