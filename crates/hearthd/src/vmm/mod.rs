//! VMM backends behind one trait, so the service never depends on which runs a machine.

pub mod console;
pub mod firecracker;
pub mod process;
pub mod qemu;
pub mod qmp;
pub mod user;

use crate::error::Result;
use crate::store::ProcessRecord;
use async_trait::async_trait;
use hearth_api::VmmKind;
use std::path::{Path, PathBuf};

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

/// Everything a backend needs to boot a machine.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub memory_mib: u32,
    pub vcpus: u32,
    /// The system disk first; it is the guest's /dev/vda.
    pub disks: Vec<PathBuf>,
    pub memory: MemoryBacking,
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

#[async_trait]
pub trait Vmm: Send + Sync {
    fn kind(&self) -> VmmKind;

    /// The VMM's version, for snapshot manifests.
    fn version(&self) -> String;

    /// Starts the VMM with the guest booting. Returns once the process runs; the guest agent
    /// answers later.
    async fn boot(&self, spec: &VmSpec) -> Result<ProcessRecord>;

    /// Checks that a recorded VMM process is alive and answering on its control socket, as after
    /// a daemon restart, and takes up its console again.
    async fn reattach(&self, paths: &MachinePaths, process: &ProcessRecord) -> Result<()>;

    /// Starts the VMM from saved device state (and the memory `spec` names) and lets it run.
    /// On failure no process is left.
    async fn restore(&self, spec: &VmSpec, vmstate: &Path) -> Result<ProcessRecord>;

    async fn pause(&self, paths: &MachinePaths) -> Result<()>;

    async fn resume(&self, paths: &MachinePaths) -> Result<()>;

    /// Writes the device state of a paused machine to `dest`. Guest RAM in a shared file stays
    /// out of it; any other RAM is streamed into it.
    async fn save_device_state(&self, paths: &MachinePaths, dest: &Path) -> Result<()>;
}
