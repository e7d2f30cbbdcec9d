//! Daemon configuration, from flags and `HEARTH_*` environment variables.

use clap::{Parser, ValueEnum};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AccelChoice {
    /// KVM where the CPU flags show vmx or svm and /dev/kvm exists, else TCG.
    Auto,
    Kvm,
    Tcg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CloneMode {
    /// Reflink where the filesystem supports it, else a sparse copy.
    Auto,
    Reflink,
    Copy,
}

#[derive(Debug, Clone, Parser)]
#[command(name = "hearthd", version, about = "hearth host daemon for microVMs")]
pub struct Config {
    /// Data root: state, images, machines.
    #[arg(long, env = "HEARTH_ROOT", default_value = "/var/lib/hearth")]
    pub root: PathBuf,
    /// API socket (default: <root>/hearthd.sock).
    #[arg(long, env = "HEARTH_SOCKET")]
    pub socket: Option<PathBuf>,
    /// Also serve the API on this TCP address; every request must then carry the bearer token.
    #[arg(long, env = "HEARTH_LISTEN")]
    pub listen: Option<std::net::SocketAddr>,
    /// File holding the bearer token for the TCP listener (readable by its owner only).
    #[arg(long, env = "HEARTH_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// TLS certificate chain for the TCP listener (PEM).
    #[arg(long, env = "HEARTH_TLS_CERT", requires_all = ["tls_key", "listen"])]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key for the TCP listener (PEM).
    #[arg(long, env = "HEARTH_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Serve plain HTTP on a TCP address that is not loopback (the token then crosses the
    /// network in the clear): for networks that are encrypted already.
    #[arg(long, env = "HEARTH_INSECURE_TCP")]
    pub insecure_tcp: bool,
    /// TCP connections served at once (an attached terminal holds one as long as it lasts);
    /// further ones wait in the kernel's backlog.
    #[arg(long, env = "HEARTH_MAX_TCP_CONNECTIONS", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_tcp_connections: u32,
    /// Where `file://` artifact URLs may point (repeatable; `:`-separated in the environment).
    /// Default: <root>/images.
    #[arg(
        long = "artifact-dir",
        env = "HEARTH_ARTIFACT_DIRS",
        value_delimiter = ':'
    )]
    pub artifact_dirs: Vec<PathBuf>,
    /// Accept `file://` artifact URLs from callers on the TCP listener too.
    #[arg(long, env = "HEARTH_ALLOW_FILE_URLS_OVER_TCP")]
    pub allow_file_urls_over_tcp: bool,
    #[arg(long, env = "HEARTH_ACCEL", value_enum, default_value = "auto")]
    pub accel: AccelChoice,
    #[arg(long, env = "HEARTH_CLONE", value_enum, default_value = "auto")]
    pub clone: CloneMode,
    /// Create machines from templates: the first machine of an image (per VMM, size and
    /// network) is snapshotted once its agent answers, and later creates restore that
    /// snapshot instead of booting. `false` boots every machine.
    #[arg(long, env = "HEARTH_TEMPLATES", default_value_t = true, action = clap::ArgAction::Set)]
    pub templates: bool,
    /// Templates kept at most: making one more removes the least recently used.
    #[arg(long, env = "HEARTH_MAX_TEMPLATES", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_templates: u32,
    #[arg(long, env = "HEARTH_QEMU", default_value = "qemu-system-x86_64")]
    pub qemu: PathBuf,
    /// The VMM of machines that do not name one: `qemu` or `firecracker`.
    #[arg(long, env = "HEARTH_VMM", default_value = "qemu")]
    pub vmm: hearth_api::VmmKind,
    /// Firecracker's binary (1.13 or later): the Firecracker backend is enabled when it is
    /// given, or with `--vmm firecracker` (then `firecracker` is looked up on PATH).
    #[arg(long, env = "HEARTH_FIRECRACKER")]
    pub firecracker: Option<PathBuf>,
    /// Firecracker's jailer: every Firecracker VMM runs jailed (a chroot under
    /// `<root>/jail`, a PID namespace of its own, the VMM user) when it is given; without it,
    /// plainly (for development).
    #[arg(long, env = "HEARTH_JAILER")]
    pub jailer: Option<PathBuf>,
    /// The unprivileged user VMMs run as (`root` keeps them root, with a warning).
    #[arg(long, env = "HEARTH_VMM_USER", default_value = "hearth-vmm")]
    pub vmm_user: String,
    /// Which cgroups limit each VMM: v2 where its controllers are available, else v1; `off`
    /// runs VMMs without limits.
    #[arg(long, env = "HEARTH_CGROUPS", value_enum, default_value = "auto")]
    pub cgroups: crate::cgroup::Mode,
    /// Memory a VMM may use beyond its guest's RAM (MiB): QEMU itself, its device buffers and,
    /// under TCG, its translated code.
    #[arg(long, env = "HEARTH_VMM_MEMORY_OVERHEAD_MIB", default_value_t = 256)]
    pub vmm_memory_overhead_mib: u64,
    #[arg(long, env = "HEARTH_DEFAULT_MEMORY_MIB", default_value_t = 256)]
    pub default_memory_mib: u32,
    #[arg(long, env = "HEARTH_DEFAULT_VCPUS", default_value_t = 1)]
    pub default_vcpus: u32,
    #[arg(long, env = "HEARTH_DEFAULT_STORAGE_BYTES", default_value_t = 1 << 30)]
    pub default_storage_bytes: u64,
    /// Machines this host keeps at most, whatever their phase; a create, restore or fork past
    /// it is refused (409).
    #[arg(long, env = "HEARTH_MAX_MACHINES", default_value_t = 256)]
    pub max_machines: usize,
    /// Creates, restores, forks and starts under way at once; one more is refused (429).
    #[arg(long, env = "HEARTH_MAX_CONCURRENT_BOOTS", default_value_t = 8)]
    pub max_concurrent_boots: usize,
    /// Most memory one machine may have (MiB); default: this host's RAM.
    #[arg(long, env = "HEARTH_MAX_MEMORY_MIB")]
    pub max_memory_mib: Option<u32>,
    /// Most vCPUs one machine may have; default: this host's CPUs.
    #[arg(long, env = "HEARTH_MAX_VCPUS")]
    pub max_vcpus: Option<u32>,
    /// Largest system disk one machine may have (bytes).
    #[arg(long, env = "HEARTH_MAX_STORAGE_BYTES", default_value_t = 1 << 40)]
    pub max_storage_bytes: u64,
    /// Bytes of a machine's serial console kept in `console.log` (and of its VMM's own log in
    /// `vmm.log`); past it the file becomes `<file>.1` (replacing the previous one) and a new
    /// one starts.
    #[arg(long, env = "HEARTH_CONSOLE_LOG_BYTES", default_value_t = 1 << 20)]
    pub console_log_bytes: u64,
    /// How long a boot may take before the machine is given up (seconds).
    #[arg(long, env = "HEARTH_BOOT_TIMEOUT", default_value_t = 60)]
    pub boot_timeout_secs: u64,
    /// How long a graceful stop may take before the VMM is killed (seconds).
    #[arg(long, env = "HEARTH_STOP_TIMEOUT", default_value_t = 15)]
    pub stop_timeout_secs: u64,
    /// Seconds between reconcile passes.
    #[arg(long, env = "HEARTH_RECONCILE_INTERVAL", default_value_t = 5)]
    pub reconcile_interval_secs: u64,
    /// Parts uploaded, or chunks downloaded, at once by one transfer.
    #[arg(long, env = "HEARTH_TRANSFER_CONCURRENCY", default_value_t = 8)]
    pub transfer_concurrency: usize,
    /// Bytes on disk that cached blobs (those no machine or snapshot needs) may take; past it
    /// the least recently used are evicted after each fetch. Unlimited when not given.
    #[arg(long, env = "HEARTH_CACHE_MAX_BYTES")]
    pub cache_max_bytes: Option<u64>,
    /// Give machines no network at all (the host needs nothing from nftables then).
    #[arg(long, env = "HEARTH_NO_NETWORK")]
    pub no_network: bool,
    /// Addresses for machines' host-side veth pairs: a /31 each. The default, part of the
    /// range kept for benchmarking networks (RFC 2544), rarely collides with a real one.
    #[arg(long, env = "HEARTH_NET_POOL", default_value = "198.18.0.0/16")]
    pub net_pool: ipnet::Ipv4Net,
    /// Where machines' traffic leaves the host (masqueraded); default: the default route's.
    #[arg(long, env = "HEARTH_EGRESS_INTERFACE")]
    pub egress_interface: Option<String>,
    /// Nameservers for guests (comma-separated); default: the host's non-loopback ones.
    #[arg(long, env = "HEARTH_DNS", value_delimiter = ',')]
    pub dns: Option<Vec<std::net::Ipv4Addr>>,
    /// Address published ports listen on.
    #[arg(long, env = "HEARTH_PUBLISH_ADDRESS", default_value = "127.0.0.1")]
    pub publish_address: std::net::IpAddr,
    /// Host ports a published port gets one from, when it names none (`FIRST-LAST`).
    #[arg(long, env = "HEARTH_PORT_RANGE", default_value = "20000-39999", value_parser = parse_port_range)]
    pub port_range: (u16, u16),
    /// Host TSC frequency in kHz for TCG guests (measured when not given).
    #[arg(long, env = "HEARTH_TSC_KHZ")]
    pub tsc_khz: Option<u64>,
}

impl Config {
    pub fn socket_path(&self) -> PathBuf {
        self.socket
            .clone()
            .unwrap_or_else(|| self.root.join("hearthd.sock"))
    }

    pub fn images_dir(&self) -> PathBuf {
        self.root.join("images")
    }

    /// The directories `file://` artifact URLs may point into.
    pub fn artifact_dirs(&self) -> Vec<PathBuf> {
        if self.artifact_dirs.is_empty() {
            vec![self.images_dir()]
        } else {
            self.artifact_dirs.clone()
        }
    }

    pub fn boot_timeout(&self) -> Duration {
        Duration::from_secs(self.boot_timeout_secs)
    }

    pub fn stop_timeout(&self) -> Duration {
        Duration::from_secs(self.stop_timeout_secs)
    }

    pub fn reconcile_interval(&self) -> Duration {
        Duration::from_secs(self.reconcile_interval_secs.max(1))
    }

    /// The most memory a machine may have: as configured, else the host's RAM.
    pub fn max_memory_mib(&self) -> u32 {
        self.max_memory_mib.unwrap_or_else(|| {
            let info = nix::sys::sysinfo::sysinfo().ok();
            info.map_or(u32::MAX, |i| {
                (i.ram_total() >> 20).min(u32::MAX as u64) as u32
            })
        })
    }

    /// The most vCPUs a machine may have: as configured, else the host's CPUs.
    pub fn max_vcpus(&self) -> u32 {
        self.max_vcpus
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get() as u32))
    }
}

fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| format!("{s}: expected FIRST-LAST"))?;
    let first: u16 = a.trim().parse().map_err(|e| format!("{a}: {e}"))?;
    let last: u16 = b.trim().parse().map_err(|e| format!("{b}: {e}"))?;
    if first == 0 || first > last {
        return Err(format!("{s}: expected 1 <= FIRST <= LAST"));
    }
    Ok((first, last))
}
