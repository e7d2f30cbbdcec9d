//! The Firecracker backend: one Firecracker process per machine, booted from one
//! configuration file the daemon writes (`--config-file`), controlled through its HTTP API on
//! a Unix socket, the agent reached through its hybrid vsock (a Unix socket on which the host
//! says `CONNECT <port>`).
//!
//! Every path Firecracker is given is relative to a directory of the VMM's own: its working
//! directory (plain mode, `<runtime dir>/fc`) or its chroot (jailed mode, made by the
//! `jailer` under the jail root), holding hard links to the kernel, initrd and disks under
//! fixed names (`system.img`, …). A snapshot bakes those names in, so the same snapshot loads
//! into another machine's directory and finds that machine's disks, with no drive overrides.
//! The VMM binds its sockets (`control.sock`, the API; `agent.sock`, the vsock) in that
//! directory, which its user may write; the daemon reaches them through hard links in the
//! machine's runtime directory, made only when the name is a socket of the VMM's user (not a
//! symlink the VMM put there, which the daemon would follow to anything on the host).
//!
//! Like QEMU, Firecracker runs in a session of its own (it outlives the daemon), in the
//! machine's network namespace and cgroup, as the VMM user; its standard output (the serial
//! console) and its log go through FIFOs that the daemon copies into capped files.

mod api;

pub use api::InstanceInfo;

use super::{
    console, process, qemu, user::VmmUser, vsock, MachinePaths, StateFile, StateKind, VmProcess,
    VmSpec, Vmm, VmmError,
};

use crate::config::CloneMode;
use crate::storage;
use api::{Api, VmState};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::process::Command;

/// The Firecracker backend. With `jail`, every VMM runs through the jailer.
pub struct Firecracker {
    pub binary: PathBuf,
    /// `firecracker --version`'s first line, for snapshot manifests.
    pub version: String,
    pub jail: Option<Jail>,
    /// Whom Firecracker runs as; None keeps it root.
    pub user: Option<VmmUser>,
    /// Bytes of serial console (and of Firecracker's log) kept per file.
    pub console_log_bytes: u64,
    /// How a diff snapshot's base memory is cloned.
    pub clone: CloneMode,
}

/// Jailed mode: the jailer chroots each VMM into `<chroot_base>/<binary name>/<id>/root`,
/// in a PID namespace of its own.
pub struct Jail {
    pub jailer: PathBuf,
    pub chroot_base: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum FcError {
    #[error(
        "runtime directory name {0:?} cannot be a Firecracker id (alphanumerics and '-', at \
         most 64)"
    )]
    BadId(String),
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Setup(#[from] crate::error::Error),
    #[error("cannot run {}: {source}", binary.display())]
    Spawn {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the jailer failed ({status}): {log}")]
    Jailer {
        status: std::process::ExitStatus,
        log: String,
    },
    #[error("the jailer's pid file {} names no VMM it started", path.display())]
    NoProcess { path: PathBuf },
    #[error("Firecracker exited while starting: {log}")]
    Exited { log: String },
    #[error("Firecracker did not answer on its API socket within {} s", .0.as_secs())]
    StartTimeout(Duration),
    #[error("{} is not a socket the VMM bound; refusing to connect through it", path.display())]
    NotItsSocket { path: PathBuf },
    #[error("{} is not the file Firecracker wrote (a link, or another owner's)", path.display())]
    NotItsFile { path: PathBuf },
    #[error("connecting to Firecracker at {}: {source}", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{request}: {source}")]
    Http {
        request: String,
        #[source]
        source: hyper::Error,
    },
    #[error("{request}: reading the answer: {source}")]
    Answer {
        request: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{request}: an answer that is not Firecracker's: {source}")]
    Json {
        request: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{request}: no answer within {} s", limit.as_secs())]
    Timeout { request: String, limit: Duration },
    #[error("Firecracker refused {request} ({status}): \"{fault}\"")]
    Refused {
        request: String,
        status: u16,
        fault: String,
    },
    #[error("Firecracker could not load the snapshot: \"{fault}\"")]
    Load { fault: String },
    #[error("the VMM process is gone")]
    Gone,
    #[error("the API socket answers for VM {found:?}, not {expected:?}")]
    WrongVm { expected: String, found: String },
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> FcError {
    let path = path.to_path_buf();
    move |source| FcError::Io { what, path, source }
}

/// Names in the VMM's directory. The disks' are baked into every snapshot.
const KERNEL: &str = "vmlinux";
const INITRD: &str = "initrd.img";
const CONFIG: &str = "config.json";
const API_SOCKET: &str = "control.sock";
const AGENT_SOCKET: &str = "agent.sock";
/// Firecracker's log (`--log-path`): a link to the FIFO of the machine's `vmm.log`.
const LOG: &str = "vmm.out";
const VMSTATE: &str = "vmstate";
const MEMORY: &str = "memory";
/// A `Diff` snapshot's memory: only the pages written since the last snapshot or the load.
const DIFF: &str = "memory.diff";
/// In a restored machine's state directory: a link to the memory of its last snapshot, which
/// the next `Diff` is laid over (Firecracker clears its dirty log at each snapshot).
const LAST_MEMORY: &str = "last-memory";
/// In a restored machine's state directory: the dirty log lost its meaning (a snapshot after
/// which the merge failed); the next snapshot is `Full`.
const FULL_NEXT: &str = "full-next";

fn disk_name(i: usize) -> String {
    if i == 0 {
        "system.img".into()
    } else {
        format!("disk{i}.img")
    }
}

/// The guest's CID on its vsock; 0-2 are reserved.
const GUEST_CID: u32 = 3;

/// Firecracker ends when its guest resets through the keyboard controller (`reboot=k`; a panic
/// resets at once, `panic=-1`); the i8042 flags skip probing the rest of a controller it does
/// not emulate.
const CMDLINE_EXTRA: &str = "reboot=k i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkb";

/// How long Firecracker may take to set up before it answers on its API socket.
const START_LIMIT: Duration = Duration::from_secs(30);
/// A control call (state, pause, resume).
const CALL_LIMIT: Duration = Duration::from_secs(10);
/// Writing or loading a snapshot: its memory file is as large as the guest's RAM.
const SNAPSHOT_LIMIT: Duration = Duration::from_secs(300);

/// Whether `version` (`Firecracker vX.Y.Z`) is one this backend drives: 1.13 or later, for
/// its ACPI device descriptions and `snapshot/load`'s memory backend.
pub fn supported(version: &str) -> bool {
    let Some(number) = version.strip_prefix("Firecracker v") else {
        return false;
    };
    let mut parts = number.split('.').map(|p| p.parse::<u32>());
    match (parts.next(), parts.next()) {
        (Some(Ok(major)), Some(Ok(minor))) => (major, minor) >= (1, 13),
        _ => false,
    }
}

/// What a new Firecracker process starts with.
enum Start<'a> {
    /// Boots from the configuration file.
    Boot(&'a api::Config),
    /// Waits, unconfigured, for `snapshot/load` of the files in this directory.
    Restore(&'a Path),
}

impl Firecracker {
    /// Starts Firecracker with the guest booting.
    pub async fn boot(&self, spec: &VmSpec) -> Result<VmProcess, FcError> {
        let config = self.config(spec);
        let proc = self.spawn(spec, Start::Boot(&config)).await?;
        if let Err(e) = self.link_socket(&spec.paths, AGENT_SOCKET) {
            self.kill(&spec.paths, &proc).await;
            return Err(e);
        }
        Ok(proc)
    }

    /// Starts a fresh Firecracker on the files [`Firecracker::save_state`] wrote into
    /// `state`, running. On failure nothing is left (process, jail, sockets, links).
    pub async fn restore(&self, spec: &VmSpec, state: &Path) -> Result<VmProcess, FcError> {
        let proc = self.spawn(spec, Start::Restore(state)).await?;
        if let Err(e) = self.load(&spec.paths).await {
            // A failed load ends Firecracker (its reason is in the error); one that did not
            // answer in time is killed.
            process::wait_gone(&proc, Duration::from_secs(5)).await;
            self.kill(&spec.paths, &proc).await;
            return Err(e);
        }
        Ok(proc)
    }

    /// Checks that a recorded VMM is alive and answers for this machine on its API socket, as
    /// after a daemon restart, and takes up its console and log again.
    pub async fn reattach(&self, paths: &MachinePaths, p: &VmProcess) -> Result<(), FcError> {
        if !process::is_alive(p) {
            return Err(FcError::Gone);
        }
        let expected = vm_id(paths)?;
        let info = self.describe(paths).await?;
        if info.id != expected {
            return Err(FcError::WrongVm {
                expected,
                found: info.id,
            });
        }
        tracing::debug!(?info, "reattached to Firecracker");
        console::follow(paths, console::Log::Console, self.console_log_bytes);
        console::follow(paths, console::Log::Vmm, self.console_log_bytes);
        Ok(())
    }

    /// The recorded process still runs.
    pub fn is_alive(&self, p: &VmProcess) -> bool {
        process::is_alive(p)
    }

    /// What the VMM says of itself: its id, state (`Running`, `Paused`) and version.
    pub async fn describe(&self, paths: &MachinePaths) -> Result<InstanceInfo, FcError> {
        api(paths).describe(CALL_LIMIT).await
    }

    pub async fn pause(&self, paths: &MachinePaths) -> Result<(), FcError> {
        api(paths).set_state(VmState::Paused, CALL_LIMIT).await
    }

    pub async fn resume(&self, paths: &MachinePaths) -> Result<(), FcError> {
        api(paths).set_state(VmState::Resumed, CALL_LIMIT).await
    }

    /// For a paused machine: writes its snapshot into `dir` (a directory on the filesystem of
    /// the VMM's directory), its state as `vmstate` and guest RAM as `memory`, both root's;
    /// returns their names. On failure neither is left.
    ///
    /// A restored machine (its state directory holds the memory it was restored from, loaded
    /// with the dirty log on) takes a `Diff`: Firecracker writes only the pages written since
    /// its last snapshot or its load, which are laid over a clone of that snapshot's memory
    /// (or the restore's) into a full memory file. A booted machine takes a `Full` one.
    pub async fn save_state(
        &self,
        paths: &MachinePaths,
        dir: &Path,
    ) -> Result<Vec<&'static str>, FcError> {
        let state = paths.state_dir();
        if !state.join(MEMORY).exists() {
            return self.save_full(paths, dir).await;
        }
        let base = [state.join(LAST_MEMORY), state.join(MEMORY)]
            .into_iter()
            .find(|p| p.exists())
            .filter(|_| !state.join(FULL_NEXT).exists());
        let saved = match base {
            Some(base) => match self.save_diff(paths, dir, &base).await {
                Ok(names) => Ok(names),
                Err(e) => {
                    // Whatever Firecracker's dirty log said is spent: the next is full.
                    tracing::warn!(dir = %dir.display(), "diff snapshot: {e}");
                    std::fs::write(state.join(FULL_NEXT), b"")
                        .map_err(io("marking", &state.join(FULL_NEXT)))?;
                    return Err(e);
                }
            },
            None => self.save_full(paths, dir).await,
        }?;
        // The next diff goes over this one's memory.
        let (link, tmp) = (state.join(LAST_MEMORY), state.join("last-memory.new"));
        let _ = std::fs::remove_file(&tmp);
        std::fs::hard_link(dir.join(MEMORY), &tmp)
            .and_then(|()| std::fs::rename(&tmp, &link))
            .map_err(io("linking", &link))?;
        let _ = std::fs::remove_file(state.join(FULL_NEXT));
        Ok(saved)
    }

    /// A `Diff` snapshot merged over a clone of `base` (see [`Firecracker::save_state`]).
    async fn save_diff(
        &self,
        paths: &MachinePaths,
        dir: &Path,
        base: &Path,
    ) -> Result<Vec<&'static str>, FcError> {
        let wd = self.workdir(paths)?;
        let names = [VMSTATE, DIFF];
        for name in names {
            remove_file(&wd.join(name))?;
        }
        let written = api(paths)
            .create_snapshot(
                &api::SnapshotCreate {
                    snapshot_type: "Diff",
                    snapshot_path: VMSTATE.into(),
                    mem_file_path: DIFF.into(),
                },
                SNAPSHOT_LIMIT,
            )
            .await;
        let merged = match written {
            Ok(()) => match self.take_files(&wd, dir, &names) {
                Ok(()) => {
                    let (base, diff, memory) =
                        (base.to_path_buf(), dir.join(DIFF), dir.join(MEMORY));
                    let mode = self.clone;
                    tokio::task::spawn_blocking(move || {
                        storage::clone_file(&base, &memory, mode)?;
                        storage::copy_data_over(&diff, &memory)
                    })
                    .await
                    .map_err(|e| FcError::Io {
                        what: "merging the diff snapshot",
                        path: dir.to_path_buf(),
                        source: std::io::Error::other(e.to_string()),
                    })?
                    .map_err(|e| FcError::Io {
                        what: "merging the diff snapshot",
                        path: dir.to_path_buf(),
                        source: std::io::Error::other(e.message),
                    })
                }
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        let _ = std::fs::remove_file(dir.join(DIFF));
        if let Err(e) = merged {
            for name in [VMSTATE, DIFF] {
                let _ = std::fs::remove_file(wd.join(name));
            }
            for name in [VMSTATE, MEMORY] {
                let _ = std::fs::remove_file(dir.join(name));
            }
            return Err(e);
        }
        Ok(vec![VMSTATE, MEMORY])
    }

    /// A `Full` snapshot: all of guest RAM written.
    async fn save_full(
        &self,
        paths: &MachinePaths,
        dir: &Path,
    ) -> Result<Vec<&'static str>, FcError> {
        let wd = self.workdir(paths)?;
        let names = [VMSTATE, MEMORY];
        // Firecracker writes into its own directory (a jailed one sees nothing else), where an
        // earlier attempt may have left these names.
        for name in names {
            remove_file(&wd.join(name))?;
        }
        let written = api(paths)
            .create_snapshot(
                &api::SnapshotCreate {
                    snapshot_type: "Full",
                    snapshot_path: VMSTATE.into(),
                    mem_file_path: MEMORY.into(),
                },
                SNAPSHOT_LIMIT,
            )
            .await;
        let moved = match written {
            Ok(()) => self.take_files(&wd, dir, &names),
            Err(e) => Err(e),
        };
        if let Err(e) = moved {
            for name in names {
                let _ = std::fs::remove_file(wd.join(name));
                let _ = std::fs::remove_file(dir.join(name));
            }
            return Err(e);
        }
        Ok(names.to_vec())
    }

    /// Waits up to `timeout` for the VMM to exit by itself (the guest powered off).
    pub async fn wait_exit(&self, p: &VmProcess, timeout: Duration) -> bool {
        process::wait_gone(p, timeout).await
    }

    /// Kills the VMM, waits until it is gone and removes its directory (the jail) and the
    /// links to its sockets.
    pub async fn kill(&self, paths: &MachinePaths, p: &VmProcess) {
        process::kill_and_wait(p).await;
        self.clear(paths);
    }

    /// Kills a VMM that only the runtime directory's pid file names (a daemon stopped before
    /// it recorded it), or in jailed mode one that only its jail knows (stopped before the
    /// pid file was written), then removes what it leaves.
    pub async fn kill_unrecorded(&self, paths: &MachinePaths) {
        process::kill_vmm_of(&paths.sock_dir, &paths.pidfile()).await;
        if let (Some(_), Ok(id), Ok(root)) = (&self.jail, vm_id(paths), self.workdir(paths)) {
            let (uid, exec) = (self.vmm_uid(), self.exec_name());
            for pid in pids().filter(|&pid| is_jailed_vmm(pid, &id, uid, exec, &root)) {
                if let Some(p) = process::record(pid) {
                    process::kill_and_wait(&p).await;
                }
            }
        }
        self.clear(paths);
    }

    /// The hybrid-vsock socket the host connects to (`CONNECT <port>\n`).
    pub fn agent_socket(&self, paths: &MachinePaths) -> PathBuf {
        paths.agent_socket()
    }

    fn config(&self, spec: &VmSpec) -> api::Config {
        api::Config {
            machine: api::MachineConfig {
                vcpu_count: spec.vcpus,
                mem_size_mib: spec.memory_mib,
                smt: false,
            },
            boot_source: api::BootSource {
                kernel_image_path: KERNEL.into(),
                initrd_path: spec.initrd.as_ref().map(|_| INITRD.into()),
                boot_args: format!("{} {CMDLINE_EXTRA}", qemu::BASE_CMDLINE),
            },
            drives: (0..spec.disks.len())
                .map(|i| api::Drive {
                    drive_id: if i == 0 {
                        "system".into()
                    } else {
                        format!("disk{i}")
                    },
                    path_on_host: disk_name(i),
                    is_root_device: i == 0,
                    is_read_only: false,
                })
                .collect(),
            network_interfaces: spec
                .network
                .iter()
                .map(|net| api::NetworkInterface {
                    iface_id: "eth0".into(),
                    host_dev_name: net.tap.clone(),
                    guest_mac: net.mac.clone(),
                })
                .collect(),
            vsock: api::Vsock {
                guest_cid: GUEST_CID,
                uds_path: AGENT_SOCKET.into(),
            },
            entropy: api::Entropy {},
        }
    }

    /// The binary's file name: the jailer names the chroot after it.
    fn exec_name(&self) -> &std::ffi::OsStr {
        self.binary.file_name().unwrap_or(self.binary.as_os_str())
    }

    /// The jail of a jailed VMM (`<chroot_base>/<binary name>/<id>`).
    fn jail_dir(&self, jail: &Jail, paths: &MachinePaths) -> Result<PathBuf, FcError> {
        Ok(jail.chroot_base.join(self.exec_name()).join(vm_id(paths)?))
    }

    /// The directory every path given to Firecracker is relative to.
    fn workdir(&self, paths: &MachinePaths) -> Result<PathBuf, FcError> {
        match &self.jail {
            Some(jail) => Ok(self.jail_dir(jail, paths)?.join("root")),
            None => Ok(paths.sock_dir.join("fc")),
        }
    }

    /// Removes the VMM's directory, the links to its sockets and its pid file: what a VMM
    /// that no longer runs leaves.
    fn clear(&self, paths: &MachinePaths) {
        let dir = match &self.jail {
            Some(jail) => self.jail_dir(jail, paths),
            None => self.workdir(paths),
        };
        if let Ok(dir) = dir {
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!("removing {}: {e}", dir.display());
                }
            }
        }
        for path in [
            paths.control_socket(),
            paths.agent_socket(),
            paths.pidfile(),
        ] {
            let _ = std::fs::remove_file(path);
        }
    }

    /// The uid files the VMM makes belong to.
    fn vmm_uid(&self) -> u32 {
        self.user.as_ref().map_or(0, |u| u.uid.as_raw())
    }

    /// Links the socket `name` that the VMM bound in its directory into the runtime directory,
    /// where the daemon connects. Only a socket of the VMM's user is linked: anything else
    /// under that name was put there by the VMM, to be followed by the daemon.
    fn link_socket(&self, paths: &MachinePaths, name: &str) -> Result<(), FcError> {
        let at = paths.sock_dir.join(name);
        remove_file(&at)?;
        // linkat without AT_SYMLINK_FOLLOW: a symlink would be linked as itself, and refused.
        std::fs::hard_link(self.workdir(paths)?.join(name), &at)
            .map_err(io("linking the VMM's socket to", &at))?;
        let meta = std::fs::symlink_metadata(&at).map_err(io("checking", &at))?;
        if meta.file_type().is_socket() && meta.uid() == self.vmm_uid() && meta.nlink() == 2 {
            return Ok(());
        }
        let _ = std::fs::remove_file(&at);
        Err(FcError::NotItsSocket { path: at })
    }

    /// Moves the snapshot files Firecracker wrote from its directory into `dir`, checked to be
    /// plain files it made, and makes them root's.
    fn take_files(&self, wd: &Path, dir: &Path, names: &[&str]) -> Result<(), FcError> {
        for name in names {
            let to = dir.join(name);
            std::fs::rename(wd.join(name), &to).map_err(io("moving the snapshot file to", &to))?;
            let meta = std::fs::symlink_metadata(&to).map_err(io("checking", &to))?;
            if !meta.file_type().is_file() || meta.nlink() != 1 || meta.uid() != self.vmm_uid() {
                return Err(FcError::NotItsFile { path: to });
            }
            std::os::unix::fs::chown(&to, Some(0), Some(0))
                .and_then(|()| std::fs::set_permissions(&to, PermissionsExt::from_mode(0o600)))
                .map_err(io("making root's", &to))?;
        }
        Ok(())
    }

    /// Makes the VMM's directory afresh, holding what Firecracker opens by name: links to the
    /// kernel, initrd and disks (or a snapshot's files), its log's FIFO, and the configuration.
    fn prepare_dir(&self, spec: &VmSpec, start: &Start<'_>) -> Result<PathBuf, FcError> {
        let wd = self.workdir(&spec.paths)?;
        std::fs::create_dir_all(&wd).map_err(io("making", &wd))?;
        if let Some(user) = &self.user {
            // The VMM binds its sockets and writes snapshots here (the jailer makes a chroot
            // its user's too).
            std::os::unix::fs::chown(&wd, Some(user.uid.as_raw()), Some(user.gid.as_raw()))
                .map_err(io("giving the VMM user", &wd))?;
        }
        std::fs::set_permissions(&wd, PermissionsExt::from_mode(0o700))
            .map_err(io("setting the mode of", &wd))?;
        let link = |from: &Path, name: &str| {
            let to = wd.join(name);
            std::fs::hard_link(from, &to)
                .map_err(io(
                    "linking into the VMM's directory (same filesystem?)",
                    from,
                ))
                .map(|()| to)
        };
        for (i, disk) in spec.disks.iter().enumerate() {
            link(disk, &disk_name(i))?;
            if let Some(user) = &self.user {
                user.own(disk)?;
            }
        }
        let log = spec.paths.log_fifo(console::Log::Vmm);
        link(&log, LOG)?;
        if let Some(user) = &self.user {
            user.own(&log)?;
        }
        let readable: Vec<(PathBuf, &str)> = match start {
            Start::Boot(config) => {
                let path = wd.join(CONFIG);
                let text = serde_json::to_vec_pretty(config).expect("the config serializes");
                std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o644)
                    .open(&path)
                    .and_then(|mut f| std::io::Write::write_all(&mut f, &text))
                    .map_err(io("writing", &path))?;
                std::iter::once((spec.kernel.clone(), KERNEL))
                    .chain(spec.initrd.clone().map(|i| (i, INITRD)))
                    .collect()
            }
            Start::Restore(state) => {
                vec![(state.join(VMSTATE), VMSTATE), (state.join(MEMORY), MEMORY)]
            }
        };
        for (file, name) in readable {
            link(&file, name)?;
            if let Some(user) = &self.user {
                user.let_read(&file)?;
            }
        }
        Ok(wd)
    }

    /// Starts Firecracker for `spec` (through the jailer in jailed mode) in the background: in
    /// a session of its own, in the machine's network namespace and cgroup, as the VMM user.
    /// Returns once it answers on its API socket (booted, or waiting for a snapshot); on
    /// failure nothing is left.
    async fn spawn(&self, spec: &VmSpec, start: Start<'_>) -> Result<VmProcess, FcError> {
        let p = &spec.paths;
        let id = vm_id(p)?;
        std::fs::create_dir_all(&p.sock_dir).map_err(io("making", &p.sock_dir))?;
        // A plain VMM's directory is in here: it may pass through, not list or write.
        let mode = if self.user.is_some() { 0o711 } else { 0o700 };
        std::fs::set_permissions(&p.sock_dir, PermissionsExt::from_mode(mode))
            .map_err(io("setting the mode of", &p.sock_dir))?;
        self.clear(p);
        let started = async {
            console::prepare(p)?;
            self.prepare_dir(spec, &start)?;
            self.start_process(spec, &id, &start).await
        };
        match started.await {
            Ok(proc) => Ok(proc),
            Err(e) => {
                self.clear(p);
                Err(e)
            }
        }
    }

    async fn start_process(
        &self,
        spec: &VmSpec,
        id: &str,
        start: &Start<'_>,
    ) -> Result<VmProcess, FcError> {
        let p = &spec.paths;
        // Everything Firecracker and the jailer report, from the first line, and the log
        // Firecracker writes into the same FIFO.
        for old in [p.vmm_log(), p.vmm_log().with_extension("log.1")] {
            let _ = std::fs::remove_file(old);
        }
        let stderr = console::writer(p, console::Log::Vmm)?;
        console::follow(p, console::Log::Vmm, self.console_log_bytes);
        let stdout = console::writer(p, console::Log::Console)?;
        let mut fc_args: Vec<String> = vec![
            "--api-sock".into(),
            API_SOCKET.into(),
            "--log-path".into(),
            LOG.into(),
        ];
        if let Start::Boot(_) = start {
            fc_args.extend(["--config-file".into(), CONFIG.into()]);
        }
        let netns = spec.network.as_ref().map(|n| n.netns.clone());
        let mut cmd = match &self.jail {
            Some(jail) => {
                let (uid, gid) = self
                    .user
                    .as_ref()
                    .map_or((0, 0), |u| (u.uid.as_raw(), u.gid.as_raw()));
                let mut cmd = Command::new(&jail.jailer);
                cmd.arg("--id")
                    .arg(id)
                    .arg("--exec-file")
                    .arg(&self.binary)
                    .arg("--uid")
                    .arg(uid.to_string())
                    .arg("--gid")
                    .arg(gid.to_string())
                    .arg("--chroot-base-dir")
                    .arg(&jail.chroot_base)
                    .arg("--new-pid-ns");
                if let Some(ns) = &netns {
                    cmd.arg("--netns").arg(ns);
                }
                cmd.arg("--").args(&fc_args);
                // The jailer enters the namespace, chroots and drops to the user itself (it
                // must be root). It joins the machine's cgroup before it execs, rather than
                // through its own --cgroup flags: that cgroup is made and limited already (v1
                // or v2, as the daemon found), the jailer and everything it starts are charged
                // to it from their first page, and it is removed the one way every machine's is.
                // The jailer enters the namespace and takes the user itself.
                process::Confinement {
                    cgroup: spec.cgroup.clone(),
                    ..Default::default()
                }
                .apply(&mut cmd);
                cmd
            }
            None => {
                let mut cmd = Command::new(&self.binary);
                cmd.arg("--id")
                    .arg(id)
                    .args(&fc_args)
                    .current_dir(self.workdir(p)?);
                let ns: Option<OwnedFd> = match &netns {
                    Some(ns) => Some(
                        std::fs::File::open(ns)
                            .map_err(io("opening the network namespace", ns))?
                            .into(),
                    ),
                    None => None,
                };
                process::Confinement {
                    netns: ns,
                    cgroup: spec.cgroup.clone(),
                    inherit: Vec::new(),
                    user: self.user.clone(),
                }
                .apply(&mut cmd);
                cmd
            }
        };
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(stdout))
            .stderr(Stdio::from(stderr));
        let spawned = cmd.spawn();
        // The child holds the pipes' write ends now: when the VMM exits, they close.
        drop(cmd);
        let launcher = self.jail.as_ref().map_or(&self.binary, |j| &j.jailer);
        let mut child = spawned.map_err(|source| FcError::Spawn {
            binary: launcher.clone(),
            source,
        })?;
        let proc = match &self.jail {
            None => {
                let proc = child.id().and_then(|pid| process::record(pid as i32));
                // Reaps it when it exits, while this daemon runs.
                tokio::spawn(async move {
                    let _ = child.wait().await;
                });
                proc.ok_or_else(|| FcError::Exited { log: String::new() })
            }
            Some(_) => self.jailed_process(p, id, &mut child).await,
        };
        let proc = match proc {
            Ok(proc) => proc,
            Err(FcError::Exited { .. }) => {
                return Err(FcError::Exited {
                    log: last_words(p).await,
                })
            }
            Err(e) => return Err(e),
        };
        // For a daemon that stops before the process is recorded.
        let record = format!("{} {}\n", proc.pid, proc.start_time);
        if let Err(e) = std::fs::write(p.pidfile(), record) {
            tracing::warn!(pid = proc.pid, "writing {}: {e}", p.pidfile().display());
        }
        match self.await_ready(p, &proc, start).await {
            Ok(()) => {
                console::follow(p, console::Log::Console, self.console_log_bytes);
                Ok(proc)
            }
            Err(e) => {
                let exited = !process::is_alive(&proc);
                process::kill_and_wait(&proc).await;
                if exited {
                    return Err(FcError::Exited {
                        log: last_words(p).await,
                    });
                }
                Err(e)
            }
        }
    }

    /// The Firecracker process the jailer started: the jailer forks it into a new PID
    /// namespace, writes its pid into the jail and exits.
    async fn jailed_process(
        &self,
        p: &MachinePaths,
        id: &str,
        jailer: &mut tokio::process::Child,
    ) -> Result<VmProcess, FcError> {
        let status = match tokio::time::timeout(START_LIMIT, jailer.wait()).await {
            Ok(status) => status.map_err(|source| FcError::Spawn {
                binary: self
                    .jail
                    .as_ref()
                    .map(|j| j.jailer.clone())
                    .unwrap_or_default(),
                source,
            })?,
            Err(_) => {
                let _ = jailer.start_kill();
                let _ = jailer.wait().await;
                return Err(FcError::StartTimeout(START_LIMIT));
            }
        };
        if !status.success() {
            return Err(FcError::Jailer {
                status,
                log: p.vmm_log_tail(5).await,
            });
        }
        let mut name = self.exec_name().to_os_string();
        name.push(".pid");
        let root = self.workdir(p)?;
        let pidfile = root.join(name);
        let named: Option<i32> = std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|t| t.trim().parse().ok());
        // The pid file is in a directory the VMM may write: the daemon would kill whatever it
        // names. So the process must be this jail's VMM: Firecracker, the VMM user's, the
        // first of a PID namespace, started with this id.
        // The jailer's child has exec'd Firecracker by now, or will in a moment.
        let (uid, exec) = (self.vmm_uid(), self.exec_name());
        let deadline = Instant::now() + START_LIMIT;
        while let Some(proc) = named.and_then(process::record) {
            if is_jailed_vmm(proc.pid, id, uid, exec, &root) {
                return Ok(proc);
            }
            if Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let found: Vec<i32> = pids()
            .filter(|&pid| is_jailed_vmm(pid, id, uid, exec, &root))
            .collect();
        if found.is_empty() {
            // It exited already (and was reaped): its log says why.
            return Err(FcError::Exited { log: String::new() });
        }
        for pid in found {
            // SAFETY: kill takes plain integers.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        Err(FcError::NoProcess { path: pidfile })
    }

    /// Waits until the VMM has bound its API socket, links it, and the VMM says it has booted
    /// (or waits for a snapshot).
    async fn await_ready(
        &self,
        p: &MachinePaths,
        proc: &VmProcess,
        start: &Start<'_>,
    ) -> Result<(), FcError> {
        let (booting, state) = match start {
            Start::Boot(_) => (true, "Running"),
            Start::Restore(_) => (false, "Not started"),
        };
        let deadline = Instant::now() + START_LIMIT;
        let bound = self.workdir(p)?.join(API_SOCKET);
        let mut linked = false;
        loop {
            if !process::is_alive(proc) {
                return Err(FcError::Exited { log: String::new() });
            }
            if !linked && std::fs::symlink_metadata(&bound).is_ok_and(|m| m.file_type().is_socket())
            {
                self.link_socket(p, API_SOCKET)?;
                linked = true;
            }
            // Firecracker builds a boot's machine before it serves the API, and a request that
            // arrives while that fails takes it down before it logs why: it is asked only once
            // its vCPUs run.
            if linked && (!booting || runs_vcpus(proc.pid)) {
                let limit = deadline.saturating_duration_since(Instant::now());
                if let Ok(info) = api(p).describe(limit.min(CALL_LIMIT)).await {
                    if info.state == state {
                        return Ok(());
                    }
                }
            }
            if Instant::now() >= deadline {
                return Err(FcError::StartTimeout(START_LIMIT));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Loads the snapshot linked into the VMM's directory and resumes it.
    async fn load(&self, paths: &MachinePaths) -> Result<(), FcError> {
        let params = api::SnapshotLoad {
            snapshot_path: VMSTATE.into(),
            mem_backend: api::MemBackend {
                backend_type: "File",
                backend_path: MEMORY.into(),
            },
            track_dirty_pages: true,
            resume_vm: true,
        };
        match api(paths).load_snapshot(&params, SNAPSHOT_LIMIT).await {
            Ok(()) => {}
            Err(FcError::Refused { fault, .. }) => return Err(FcError::Load { fault }),
            Err(e) => return Err(e),
        }
        // Loaded (the memory mapped): the links to the snapshot's files go, so that nothing
        // this VMM writes later lands in them.
        let wd = self.workdir(paths)?;
        for name in [VMSTATE, MEMORY] {
            remove_file(&wd.join(name))?;
        }
        self.link_socket(paths, AGENT_SOCKET)
    }
}

fn api(paths: &MachinePaths) -> Api {
    Api::new(paths.control_socket())
}

/// The machine's id for Firecracker: its runtime directory's name.
fn vm_id(paths: &MachinePaths) -> Result<String, FcError> {
    let name = paths
        .sock_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let valid = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if valid {
        Ok(name)
    } else {
        Err(FcError::BadId(name))
    }
}

/// Why a VMM that exited did: the error lines at the end of its log (Firecracker's own, then
/// what it printed as it exited; its API thread may complain after them), or the last lines.
async fn last_words(p: &MachinePaths) -> String {
    let tail = p.vmm_log_tail(20).await;
    let errors: Vec<&str> = tail
        .lines()
        .filter(|l| l.to_ascii_lowercase().contains("error"))
        .collect();
    if errors.is_empty() {
        let lines: Vec<&str> = tail.lines().collect();
        lines[lines.len().saturating_sub(5)..].join("\n")
    } else {
        errors.join("\n")
    }
}

/// Process `pid` has started its vCPU threads (Firecracker names them `fc_vcpu <n>`).
fn runs_vcpus(pid: i32) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .any(|task| {
            std::fs::read_to_string(task.path().join("comm"))
                .is_ok_and(|c| c.starts_with("fc_vcpu"))
        })
}

/// Every process's pid.
fn pids() -> impl Iterator<Item = i32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
}

/// Process `pid` is a jailed Firecracker of id `id`: `exec` run by `uid`, PID 1 of its own PID
/// namespace, `--id <id>` on its command line (which the jailer puts there).
fn is_jailed_vmm(pid: i32, id: &str, uid: u32, exec: &std::ffi::OsStr, root: &Path) -> bool {
    // Its root is this daemon's jail: ids are per data root, and another daemon's VMM may
    // have the same one.
    // The jailer pivots into its chroot in a mount namespace of its own, where the link reads
    // "/": the directory itself is compared.
    let id_of = |m: std::fs::Metadata| (m.dev(), m.ino());
    let theirs = std::fs::metadata(format!("/proc/{pid}/root")).map(id_of);
    match (theirs, std::fs::metadata(root).map(id_of)) {
        (Ok(theirs), Ok(ours)) if theirs == ours => {}
        _ => return false,
    }
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.split_whitespace().collect::<Vec<_>>())
            .unwrap_or_default()
    };
    let owner = field("Uid:").first().and_then(|u| u.parse().ok()) == Some(uid);
    let nspid = field("NSpid:");
    let first_in_namespace = nspid.len() > 1 && nspid.last() == Some(&"1");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let mut args = cmdline.split(|&b| b == 0);
    let program = args
        .next()
        .map(|a| Path::new(std::ffi::OsStr::from_bytes(a)));
    let is_exec = program.and_then(Path::file_name) == Some(exec);
    let args: Vec<&[u8]> = args.collect();
    let named = args
        .windows(2)
        .any(|w| w[0] == b"--id" && w[1] == id.as_bytes());
    owner && first_in_namespace && is_exec && named
}

/// Removes a file; one already gone is fine.
fn remove_file(path: &Path) -> Result<(), FcError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io("removing", path)(e)),
        _ => Ok(()),
    }
}

impl From<FcError> for VmmError {
    fn from(e: FcError) -> VmmError {
        const VMM: &str = "Firecracker";
        let reason = e.to_string();
        match e {
            FcError::Io { what, path, source } => VmmError::Io { what, path, source },
            FcError::Setup(e) => VmmError::Host(e),
            FcError::Spawn { binary, source } => VmmError::Spawn { binary, source },
            // Firecracker refusing what it was given, or ending on it: the request's fault.
            FcError::Exited { log } => VmmError::Refused {
                vmm: VMM,
                reason: log,
            },
            // A refused configuration is the machine's; a refused pause, resume or snapshot is
            // the host's (a full disk, a VMM in a bad state).
            FcError::Refused { ref request, .. }
                if request.starts_with("PUT /snapshot/create")
                    || request.starts_with("PATCH /vm") =>
            {
                VmmError::Control {
                    what: "Firecracker",
                    reason,
                }
            }
            FcError::Refused { .. } => VmmError::Refused { vmm: VMM, reason },
            FcError::BadId(_) | FcError::Jailer { .. } => {
                VmmError::Host(crate::error::Error::internal(reason))
            }
            FcError::Load { fault } => VmmError::StateRejected {
                vmm: VMM,
                reason: fault,
            },
            FcError::StartTimeout(limit) => VmmError::StartTimeout {
                vmm: VMM,
                limit,
                detail: "its API socket never answered".into(),
            },
            FcError::Gone => VmmError::Gone,
            FcError::NoProcess { .. }
            | FcError::NotItsSocket { .. }
            | FcError::NotItsFile { .. }
            | FcError::Connect { .. }
            | FcError::Http { .. }
            | FcError::Answer { .. }
            | FcError::Json { .. }
            | FcError::Timeout { .. }
            | FcError::WrongVm { .. } => VmmError::Control {
                what: "Firecracker",
                reason,
            },
        }
    }
}

/// How long one hybrid-vsock `CONNECT` waits for the guest: before its agent listens there is
/// no answer at all, so the connection is tried again until the caller's deadline.
const CONNECT_TRY: Duration = Duration::from_millis(500);

#[async_trait::async_trait]
impl Vmm for Firecracker {
    fn kind(&self) -> hearth_api::VmmKind {
        hearth_api::VmmKind::Firecracker
    }

    fn version(&self) -> String {
        self.version.clone()
    }

    async fn boot(&self, spec: &VmSpec) -> Result<VmProcess, VmmError> {
        Ok(Firecracker::boot(self, spec).await?)
    }

    async fn restore(&self, spec: &VmSpec, state: &Path) -> Result<VmProcess, VmmError> {
        Ok(Firecracker::restore(self, spec, state).await?)
    }

    async fn reattach(&self, paths: &MachinePaths, p: &VmProcess) -> Result<(), VmmError> {
        Ok(Firecracker::reattach(self, paths, p).await?)
    }

    fn is_alive(&self, p: &VmProcess) -> bool {
        Firecracker::is_alive(self, p)
    }

    async fn pause(&self, paths: &MachinePaths) -> Result<(), VmmError> {
        Ok(Firecracker::pause(self, paths).await?)
    }

    async fn resume(&self, paths: &MachinePaths) -> Result<(), VmmError> {
        Ok(Firecracker::resume(self, paths).await?)
    }

    /// Always a full snapshot: the device state and guest RAM as a file.
    async fn save_state(
        &self,
        paths: &MachinePaths,
        _: &VmProcess,
        dir: &Path,
    ) -> Result<Vec<StateFile>, VmmError> {
        Firecracker::save_state(self, paths, dir).await?;
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

    async fn wait_exit(&self, p: &VmProcess, limit: Duration) -> bool {
        Firecracker::wait_exit(self, p, limit).await
    }

    async fn kill(&self, paths: &MachinePaths, p: &VmProcess) {
        Firecracker::kill(self, paths, p).await
    }

    async fn clean_up(&self, paths: &MachinePaths) {
        self.kill_unrecorded(paths).await;
    }

    /// Tried until the deadline, or until the VMM is gone (a guest that died while booting:
    /// the caller then reports its console).
    async fn connect_agent(
        &self,
        paths: &MachinePaths,
        p: &VmProcess,
        deadline: Instant,
    ) -> Result<tokio::net::UnixStream, VmmError> {
        let socket = self.agent_socket(paths);
        loop {
            let tried = Instant::now();
            let limit = CONNECT_TRY.min(deadline.saturating_duration_since(tried));
            match vsock::connect(&socket, hearth_proto::AGENT_VSOCK_PORT, limit).await {
                Ok(stream) => return Ok(stream),
                Err(_) if !self.is_alive(p) => return Err(VmmError::Gone),
                Err(e) if Instant::now() >= deadline => {
                    return Err(VmmError::control("connecting to the agent over vsock", e))
                }
                // Refused or closed at once (no socket yet, no listener): not a busy loop.
                Err(_) => {
                    let pause = CONNECT_TRY.saturating_sub(tried.elapsed());
                    tokio::time::sleep(
                        pause.min(deadline.saturating_duration_since(Instant::now())),
                    )
                    .await
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_from_1_13_are_supported() {
        assert!(supported("Firecracker v1.16.1"));
        assert!(supported("Firecracker v1.13.0"));
        assert!(supported("Firecracker v2.0.0"));
        assert!(!supported("Firecracker v1.12.1"));
        assert!(!supported("Firecracker v1"));
        assert!(!supported("QEMU emulator version 7.2.0"));
    }

    fn paths(sock_dir: &str) -> MachinePaths {
        MachinePaths {
            dir: "/data/machines/m".into(),
            sock_dir: sock_dir.into(),
        }
    }

    #[test]
    fn the_id_is_the_runtime_directory_name_when_firecracker_takes_it() {
        assert_eq!(
            vm_id(&paths("/data/run/0123abcd-ef")).unwrap(),
            "0123abcd-ef"
        );
        for bad in ["/data/run/a_b", "/data/run/a.b", "/"] {
            assert!(
                matches!(vm_id(&paths(bad)), Err(FcError::BadId(_))),
                "{bad}"
            );
        }
        let long = format!("/data/run/{}", "a".repeat(65));
        assert!(vm_id(&paths(&long)).is_err());
    }

    #[test]
    fn a_process_outside_a_pid_namespace_is_no_jailed_vmm() {
        let mut child = std::process::Command::new("sh")
            .args(["-c", "sleep 30", "sh", "--id", "abc"])
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        // SAFETY: getuid cannot fail.
        let uid = unsafe { libc::getuid() };
        assert!(pids().any(|p| p == pid));
        assert!(!is_jailed_vmm(
            pid,
            "abc",
            uid,
            "sh".as_ref(),
            Path::new("/")
        ));
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
