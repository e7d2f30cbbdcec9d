//! VMM backends behind one trait, so the service never depends on which runs a machine.

pub mod console;
pub mod error;
pub mod firecracker;
pub mod pagemap;
pub mod process;
pub mod qemu;
pub mod qmp;
pub mod user;
pub mod vsock;

pub use error::VmmError;
pub use process::VmProcess;

use async_trait::async_trait;
use hearth_api::VmmKind;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::UnixStream;

type Result<T, E = VmmError> = std::result::Result<T, E>;

/// A VMM binary's `--version` first line (`QEMU emulator version 7.2.…`, `Firecracker
/// v1.16.1`), for snapshot manifests.
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

/// Everything a backend needs to boot a machine.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub memory_mib: u32,
    pub vcpus: u32,
    /// The system disk first; it is the guest's /dev/vda.
    pub disks: Vec<PathBuf>,
    pub paths: MachinePaths,
    /// The machine's network interface, if it has one.
    pub network: Option<NetAttach>,
    /// The cgroup the VMM runs in, if any.
    pub cgroup: Option<crate::cgroup::Cgroup>,
}

/// A network interface for the VMM: a tap inside a network namespace the VMM runs in. The
/// same tap name and MAC serve every machine (each in its own namespace).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetAttach {
    pub netns: PathBuf,
    pub tap: String,
    pub mac: String,
}

/// Where one machine's files live. Sockets sit in a short per-machine directory because a Unix
/// socket path is limited to 107 bytes and machine ids may be 63.
#[derive(Debug, Clone)]
pub struct MachinePaths {
    pub dir: PathBuf,
    pub sock_dir: PathBuf,
}

impl MachinePaths {
    pub fn memory(&self) -> PathBuf {
        self.dir.join("memory")
    }
    /// The snapshot state a restored or forked machine started from (links to a snapshot's
    /// files, or a fork's own).
    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }
    pub fn console(&self) -> PathBuf {
        self.dir.join("console.log")
    }
    pub fn system_disk(&self) -> PathBuf {
        self.dir.join("system.img")
    }
    pub fn agent_socket(&self) -> PathBuf {
        self.sock_dir.join("agent.sock")
    }
    pub fn control_socket(&self) -> PathBuf {
        self.sock_dir.join("control.sock")
    }
    /// The VMM's pid and start time, written as soon as it runs.
    pub fn pidfile(&self) -> PathBuf {
        self.sock_dir.join("vmm.pid")
    }
    /// What the VMM itself reports (its standard error), capped like the console.
    pub fn vmm_log(&self) -> PathBuf {
        self.sock_dir.join("vmm.log")
    }

    /// The last lines of the serial console, for error messages.
    pub fn console_tail(&self, lines: usize) -> String {
        console::tail(self, console::Log::Console, lines)
    }

    /// The last lines of the VMM's own log, for error messages about a VMM that exited (once
    /// its log is copied to the end).
    pub async fn vmm_log_tail(&self, lines: usize) -> String {
        console::drained(self, console::Log::Vmm).await;
        console::tail(self, console::Log::Vmm, lines)
    }
}

/// A file a backend wrote into a snapshot directory: the device state, or guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateFile {
    pub name: &'static str,
    pub kind: StateKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateKind {
    /// The device state (with RAM in it, where the backend streams RAM).
    DeviceState,
    /// Guest RAM as a file, mapped by the machines restored from it.
    Memory,
}

/// One VMM backend: the whole lifecycle of its processes and the layout of the state its
/// snapshots hold. The service never learns which backend drives a machine.
#[async_trait]
pub trait Vmm: Send + Sync {
    fn kind(&self) -> VmmKind;

    /// The VMM's version, for snapshot manifests.
    fn version(&self) -> String;

    /// Starts the VMM with the guest booting. Returns once the process runs; the guest agent
    /// answers later. On failure no process is left.
    async fn boot(&self, spec: &VmSpec) -> Result<VmProcess>;

    /// Starts the VMM from the state files [`Vmm::save_state`] wrote into `state` (a snapshot
    /// directory, or a copy of one) and lets it run. On failure no process is left.
    async fn restore(&self, spec: &VmSpec, state: &Path) -> Result<VmProcess>;

    /// Checks that a recorded VMM process is alive and answering, as after a daemon restart,
    /// and takes up its console again.
    async fn reattach(&self, paths: &MachinePaths, process: &VmProcess) -> Result<()>;

    /// The recorded VMM process still runs.
    fn is_alive(&self, process: &VmProcess) -> bool;

    async fn pause(&self, paths: &MachinePaths) -> Result<()>;

    async fn resume(&self, paths: &MachinePaths) -> Result<()>;

    /// Writes into `dir` what of a machine's state is already fixed while it runs (the base
    /// memory a restored machine maps), so that less is left for [`Vmm::save_state`] to do
    /// while it is paused.
    async fn prepare_state(&self, _paths: &MachinePaths, _dir: &Path) -> Result<()> {
        Ok(())
    }

    /// Writes the state of a paused machine (device state and guest RAM, in the backend's
    /// layout) into `dir`; returns what it wrote.
    async fn save_state(
        &self,
        paths: &MachinePaths,
        process: &VmProcess,
        dir: &Path,
    ) -> Result<Vec<StateFile>>;

    /// Waits up to `limit` for the VMM to exit by itself (its guest powered off); true when it
    /// did.
    async fn wait_exit(&self, process: &VmProcess, limit: Duration) -> bool;

    /// Kills the VMM and waits until it is gone.
    async fn kill(&self, paths: &MachinePaths, process: &VmProcess);

    /// Kills a VMM of this machine that no record names (a daemon that stopped between its
    /// start and the record of its pid leaves only the runtime directory to find it by) and
    /// removes what only this backend's running VMM needs (a RAM file, a jail). The caller
    /// removes the machine's runtime and state directories afterwards.
    async fn clean_up(&self, paths: &MachinePaths);

    /// A new connection to the guest agent's channel, tried until `deadline` where the VMM
    /// answers only once the guest listens (a hybrid vsock).
    /// Gives up early when `process` is gone.
    async fn connect_agent(
        &self,
        paths: &MachinePaths,
        process: &VmProcess,
        deadline: Instant,
    ) -> Result<UnixStream>;
}

/// The backends this daemon drives, one per kind, and the one new machines get by default.
#[derive(Clone)]
pub struct Vmms {
    default: VmmKind,
    backends: Vec<Arc<dyn Vmm>>,
}

impl Vmms {
    /// `backends` holds one of kind `default`.
    pub fn new(default: VmmKind, backends: Vec<Arc<dyn Vmm>>) -> Vmms {
        debug_assert!(backends.iter().any(|b| b.kind() == default));
        Vmms { default, backends }
    }

    pub fn default_kind(&self) -> VmmKind {
        self.default
    }

    /// The backend of `kind`, or why there is none.
    pub fn get(&self, kind: VmmKind) -> Result<&Arc<dyn Vmm>> {
        self.backends
            .iter()
            .find(|b| b.kind() == kind)
            .ok_or(VmmError::NotConfigured(kind))
    }

    pub fn all(&self) -> impl Iterator<Item = &Arc<dyn Vmm>> {
        self.backends.iter()
    }
}
