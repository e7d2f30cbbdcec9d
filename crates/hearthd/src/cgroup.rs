//! Each machine's VMM in a cgroup of its own, limited in memory (guest RAM plus a fixed
//! overhead), CPU (as many CPUs as it has vCPUs) and pids. cgroup v2 where the unified hierarchy
//! has the memory, cpu and pids controllers, v1 otherwise (a hierarchy per controller, as on
//! hosts that mount v2 only for systemd or hugetlb).
//!
//! Machines' cgroups are `vm-<machine id>` in a `hearth-<tag>` cgroup under the daemon's own, so
//! whatever bounds the daemon (a systemd unit's limits, a session's cgroup) bounds its VMMs too,
//! and two daemons on one host never meet. The VMM joins its cgroup between fork and exec
//! ([`Cgroup::join_self`]): every page it ever touches is charged there.

use std::collections::HashMap;
use std::ffi::CString;
use std::io::ErrorKind;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// What every machine's cgroup limits.
pub const CONTROLLERS: [&str; 3] = ["memory", "cpu", "pids"];

/// Threads a VMM may have: QEMU makes one per vCPU plus its main loop, RCU and a pool of at
/// most 64 I/O workers; its sandbox forbids new processes.
pub const PIDS_MAX: u64 = 1024;

/// The CFS period CPU quotas are given in (the kernel's default).
const CPU_PERIOD_US: u64 = 100_000;

/// Which cgroup version to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// v2 where its controllers are available, else v1; an error where neither is.
    Auto,
    V2,
    V1,
    /// No cgroups: VMMs run without memory, CPU or pids limits.
    Off,
}

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Unavailable(String),
}

type Result<T> = std::result::Result<T, CgroupError>;

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> CgroupError {
    let path = path.to_path_buf();
    move |source| CgroupError::Io { what, path, source }
}

/// One machine's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub memory_bytes: u64,
    pub cpus: u32,
    pub pids: u64,
}

impl Limits {
    /// Guest RAM plus `overhead_mib` for the VMM itself; a CPU per vCPU.
    pub fn for_machine(memory_mib: u32, vcpus: u32, overhead_mib: u64) -> Limits {
        Limits {
            memory_bytes: (u64::from(memory_mib) + overhead_mib) << 20,
            cpus: vcpus,
            pids: PIDS_MAX,
        }
    }

    fn cpu_quota_us(&self) -> u64 {
        u64::from(self.cpus) * CPU_PERIOD_US
    }
}

/// Where the daemon's own cgroup is, in the hierarchies that hold the three controllers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// The unified hierarchy: one directory has every controller.
    V2(PathBuf),
    /// A directory per controller (two may share a hierarchy, and so a directory).
    V1 {
        memory: PathBuf,
        cpu: PathBuf,
        pids: PathBuf,
    },
}

impl Layout {
    fn dirs(&self) -> Vec<&Path> {
        match self {
            Layout::V2(dir) => vec![dir],
            Layout::V1 { memory, cpu, pids } => {
                let mut dirs: Vec<&Path> = Vec::new();
                for d in [memory, cpu, pids] {
                    if !dirs.contains(&d.as_path()) {
                        dirs.push(d);
                    }
                }
                dirs
            }
        }
    }

    fn map(&self, f: impl Fn(&Path) -> PathBuf) -> Layout {
        match self {
            Layout::V2(dir) => Layout::V2(f(dir)),
            Layout::V1 { memory, cpu, pids } => Layout::V1 {
                memory: f(memory),
                cpu: f(cpu),
                pids: f(pids),
            },
        }
    }

    pub fn version(&self) -> u8 {
        match self {
            Layout::V2(_) => 2,
            Layout::V1 { .. } => 1,
        }
    }
}

/// A line of /proc/self/mountinfo that matters here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// The path of the filesystem (here: the cgroup) mounted, from its root.
    pub root: String,
    pub point: PathBuf,
    pub fstype: String,
    pub super_options: Vec<String>,
}

/// Parses /proc/self/mountinfo: `id parent maj:min root point options [tags…] - type source
/// super-options`, paths with octal escapes (`\040` for a space).
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let left: Vec<&str> = left.split(' ').collect();
            let right: Vec<&str> = right.split(' ').collect();
            Some(Mount {
                root: unescape(left.get(3)?),
                point: PathBuf::from(unescape(left.get(4)?)),
                fstype: right.first()?.to_string(),
                super_options: right
                    .get(2)
                    .map(|o| o.split(',').map(str::to_string).collect())
                    .unwrap_or_default(),
            })
        })
        .collect()
}

fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], octal) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroups a process is in (/proc/PID/cgroup): its v2 path and, per v1 controller, its path.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Membership {
    pub v2: Option<String>,
    pub v1: HashMap<String, String>,
}

pub fn parse_proc_cgroup(text: &str) -> Membership {
    let mut m = Membership::default();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if id == "0" && controllers.is_empty() {
            m.v2 = Some(path.to_string());
        } else {
            for c in controllers.split(',').filter(|c| !c.is_empty()) {
                m.v1.insert(c.to_string(), path.to_string());
            }
        }
    }
    m
}

/// `path` (a cgroup path as /proc/PID/cgroup gives it) under mount `m`.
fn dir_in(m: &Mount, path: &str) -> PathBuf {
    // A hierarchy mounted from a cgroup below its root (in a container, say) shows paths from
    // that cgroup down.
    let rel = Path::new(path)
        .strip_prefix(&m.root)
        .unwrap_or(Path::new(path.trim_start_matches('/')));
    if rel.as_os_str().is_empty() {
        m.point.clone()
    } else {
        m.point.join(rel)
    }
}

/// Where the daemon's cgroup is in hierarchies holding every controller of [`CONTROLLERS`],
/// by `mode`; `controllers_of` reads a v2 directory's `cgroup.controllers`. None for `Off`.
pub fn locate(
    mode: Mode,
    mounts: &[Mount],
    own: &Membership,
    controllers_of: impl Fn(&Path) -> Option<String>,
) -> Result<Option<Layout>> {
    if mode == Mode::Off {
        return Ok(None);
    }
    let mut found = Vec::new();
    let v2 = mounts.iter().find(|m| m.fstype == "cgroup2").and_then(|m| {
        let dir = dir_in(m, own.v2.as_deref()?);
        let available = controllers_of(&dir).unwrap_or_default();
        let has_all = CONTROLLERS
            .iter()
            .all(|c| available.split_whitespace().any(|a| a == *c));
        found.push(format!(
            "cgroup2 at {} offers [{}]",
            dir.display(),
            available.trim()
        ));
        has_all.then_some(Layout::V2(dir))
    });
    let v1_dir = |controller: &str| {
        let m = mounts
            .iter()
            .find(|m| m.fstype == "cgroup" && m.super_options.iter().any(|o| o == controller))?;
        Some(dir_in(m, own.v1.get(controller)?))
    };
    let v1 = match (v1_dir("memory"), v1_dir("cpu"), v1_dir("pids")) {
        (Some(memory), Some(cpu), Some(pids)) => Some(Layout::V1 { memory, cpu, pids }),
        (memory, cpu, pids) => {
            let have: Vec<&str> = [("memory", memory), ("cpu", cpu), ("pids", pids)]
                .into_iter()
                .filter_map(|(name, dir)| dir.map(|_| name))
                .collect();
            found.push(format!("cgroup v1 hierarchies for [{}]", have.join(" ")));
            None
        }
    };
    let layout = match mode {
        Mode::Auto => v2.or(v1),
        Mode::V2 => v2,
        Mode::V1 => v1,
        Mode::Off => None,
    };
    layout.map(Some).ok_or_else(|| {
        CgroupError::Unavailable(format!(
            "no cgroup hierarchy ({}) has the memory, cpu and pids controllers this daemon's \
             cgroup can use: {}; run with --cgroups off to run VMMs without limits",
            match mode {
                Mode::V2 => "v2",
                Mode::V1 => "v1",
                _ => "v2 or v1",
            },
            found.join("; ")
        ))
    })
}

/// The machines' cgroups of one daemon.
#[derive(Debug)]
pub struct Cgroups {
    /// The directories machines' cgroups are made in: `hearth-<tag>` in each hierarchy.
    parent: Layout,
    /// On v2, the daemon's own cgroup and whether it is the hierarchy's root.
    own_v2: Option<(PathBuf, bool)>,
}

/// A machine's cgroup, made and limited; the VMM joins it before it execs.
#[derive(Debug, Clone)]
pub struct Cgroup {
    dirs: Vec<PathBuf>,
    /// Each hierarchy's `cgroup.procs` of this cgroup, ready for use between fork and exec.
    procs: Vec<CString>,
}

const PREFIX: &str = "vm-";

impl Cgroups {
    /// Where the machines' cgroups of the daemon tagged `tag` are, by `mode`, without making
    /// anything; None with `Mode::Off`.
    pub fn find(mode: Mode, tag: &str) -> Result<Option<Cgroups>> {
        let read = |p: &str| std::fs::read_to_string(p).map_err(io("reading", Path::new(p)));
        let mounts = parse_mountinfo(&read("/proc/self/mountinfo")?);
        let own = parse_proc_cgroup(&read("/proc/self/cgroup")?);
        let layout = locate(mode, &mounts, &own, |dir| {
            std::fs::read_to_string(dir.join("cgroup.controllers")).ok()
        })?;
        Ok(layout.map(|layout| {
            let own_v2 = match &layout {
                Layout::V2(dir) => {
                    let root = mounts.iter().find(|m| m.fstype == "cgroup2");
                    Some((dir.clone(), root.is_some_and(|m| m.point == *dir)))
                }
                Layout::V1 { .. } => None,
            };
            Cgroups {
                parent: layout.map(|d| d.join(format!("hearth-{tag}"))),
                own_v2,
            }
        }))
    }

    /// [`Cgroups::find`], then makes `hearth-<tag>` under the daemon's cgroup, ready for
    /// machines' cgroups.
    pub fn setup(mode: Mode, tag: &str) -> Result<Option<Cgroups>> {
        let Some(cgroups) = Cgroups::find(mode, tag)? else {
            return Ok(None);
        };
        if let Some((own, is_root)) = &cgroups.own_v2 {
            delegate_v2(own, *is_root)?;
        }
        for dir in cgroups.parent.dirs() {
            mkdir(dir)?;
        }
        if let Layout::V2(dir) = &cgroups.parent {
            enable_controllers(dir)?;
        }
        tracing::info!(version = cgroups.version(), parent = ?cgroups.parent.dirs(), "machine cgroups");
        Ok(Some(cgroups))
    }

    /// The cgroups of a daemon whose parent is `parent` (for tests).
    pub fn at(parent: Layout) -> Cgroups {
        Cgroups {
            parent,
            own_v2: None,
        }
    }

    pub fn version(&self) -> u8 {
        self.parent.version()
    }

    fn layout_of(&self, machine: &str) -> Layout {
        self.parent.map(|d| d.join(format!("{PREFIX}{machine}")))
    }

    /// Machine `machine`'s cgroup, made if missing, with `limits` written (again).
    pub fn create(&self, machine: &str, limits: &Limits) -> Result<Cgroup> {
        let layout = self.layout_of(machine);
        for dir in layout.dirs() {
            mkdir(dir)?;
        }
        match &layout {
            Layout::V2(dir) => {
                write(dir, "memory.max", limits.memory_bytes)?;
                // No swap beyond the limit (where the host has swap and its accounting).
                write_if_present(dir, "memory.swap.max", 0)?;
                write(
                    dir,
                    "cpu.max",
                    format!("{} {CPU_PERIOD_US}", limits.cpu_quota_us()),
                )?;
                write(dir, "pids.max", limits.pids)?;
            }
            Layout::V1 { memory, cpu, pids } => {
                set_v1_memory(memory, limits.memory_bytes)?;
                write(cpu, "cpu.cfs_period_us", CPU_PERIOD_US)?;
                write(cpu, "cpu.cfs_quota_us", limits.cpu_quota_us())?;
                write(pids, "pids.max", limits.pids)?;
            }
        }
        let dirs: Vec<PathBuf> = layout.dirs().into_iter().map(Path::to_path_buf).collect();
        let procs = dirs
            .iter()
            .map(|d| CString::new(d.join("cgroup.procs").as_os_str().as_bytes()))
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| CgroupError::Unavailable(format!("cgroup path: {e}")))?;
        Ok(Cgroup { dirs, procs })
    }

    /// Removes machine `machine`'s cgroup, which its VMM has left (it exited).
    pub fn remove(&self, machine: &str) -> Result<()> {
        for dir in self.layout_of(machine).dirs() {
            rmdir(dir)?;
        }
        Ok(())
    }

    /// The machines that have a cgroup here.
    pub fn machines(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .parent
            .dirs()
            .iter()
            .flat_map(|d| std::fs::read_dir(d).into_iter().flatten().flatten())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.strip_prefix(PREFIX).map(str::to_string)
            })
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// The processes in machine `machine`'s cgroup, in any hierarchy.
    pub fn procs(&self, machine: &str) -> Vec<i32> {
        let mut pids: Vec<i32> = self
            .layout_of(machine)
            .dirs()
            .iter()
            .flat_map(|d| read_pids(d))
            .collect();
        pids.sort();
        pids.dedup();
        pids
    }

    /// SIGKILLs every process in machine `machine`'s cgroup (a VMM whose machine is gone) and
    /// waits, a few seconds at most, until none is left. Blocks.
    pub fn kill_members(&self, machine: &str) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let pids = self.procs(machine);
            if pids.is_empty() || std::time::Instant::now() > deadline {
                return;
            }
            for pid in pids {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    /// Puts a running process into machine `machine`'s cgroup (a VMM found again after a
    /// daemon restart; one already there stays).
    pub fn attach(&self, machine: &str, pid: i32) -> Result<()> {
        for dir in self.layout_of(machine).dirs() {
            write(dir, "cgroup.procs", pid)?;
        }
        Ok(())
    }

    /// The directories of machine `machine`'s cgroup: the unified one, or memory, cpu, pids.
    pub fn dirs_of(&self, machine: &str) -> Layout {
        self.layout_of(machine)
    }

    /// Removes `hearth-<tag>` when no machine has a cgroup left in it.
    pub fn release(&self) {
        if !self.machines().is_empty() {
            return;
        }
        for dir in self.parent.dirs() {
            if let Err(e) = rmdir(dir) {
                tracing::warn!("{e}");
            }
        }
    }

    /// Kills every process in this daemon's cgroups and removes them all (for a daemon that is
    /// gone with its machines, such as a test's).
    pub fn purge(&self) {
        for machine in self.machines() {
            for pid in self.procs(&machine) {
                // SAFETY: kill takes plain integers.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            let _ = self.remove(&machine);
        }
        self.release();
    }
}

impl Cgroup {
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Moves the calling process into this cgroup. It allocates nothing and makes only system
    /// calls, so it may run between fork and exec.
    pub fn join_self(&self) -> std::io::Result<()> {
        for procs in &self.procs {
            // SAFETY: a NUL-terminated path; the fd is closed on every path below.
            let fd = unsafe { libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // "0" is the writing process itself.
            // SAFETY: two bytes from a static buffer.
            let n = unsafe { libc::write(fd, b"0\n".as_ptr().cast(), 2) };
            let err = std::io::Error::last_os_error();
            // SAFETY: fd is ours.
            unsafe { libc::close(fd) };
            if n < 0 {
                return Err(err);
            }
        }
        Ok(())
    }
}

/// Removes a cgroup that has no process and no child left. The kernel lets go of a process
/// that has just exited, or of a child just removed, a moment later (asynchronously): until
/// then the cgroup is busy, so it is tried again for a second.
fn rmdir(dir: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(io("removing cgroup", dir)(e)),
        }
    }
}

fn mkdir(dir: &Path) -> Result<()> {
    match std::fs::create_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) => Err(io("making cgroup", dir)(e)),
    }
}

fn write(dir: &Path, file: &str, value: impl std::fmt::Display) -> Result<()> {
    let path = dir.join(file);
    std::fs::write(&path, value.to_string()).map_err(io("writing", &path))
}

fn write_if_present(dir: &Path, file: &str, value: impl std::fmt::Display) -> Result<()> {
    if dir.join(file).exists() {
        write(dir, file, value)
    } else {
        Ok(())
    }
}

/// The memory limit, and memory+swap where the kernel accounts swap: the latter must never be
/// below the former, so the order depends on whether the limits rise or fall.
fn set_v1_memory(dir: &Path, bytes: u64) -> Result<()> {
    let memsw = dir.join("memory.memsw.limit_in_bytes");
    if !memsw.exists() {
        return write(dir, "memory.limit_in_bytes", bytes);
    }
    let current: u64 = std::fs::read_to_string(&memsw)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(u64::MAX);
    if bytes > current {
        write(dir, "memory.memsw.limit_in_bytes", bytes)?;
        write(dir, "memory.limit_in_bytes", bytes)
    } else {
        write(dir, "memory.limit_in_bytes", bytes)?;
        write(dir, "memory.memsw.limit_in_bytes", bytes)
    }
}

fn read_pids(dir: &Path) -> Vec<i32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Lets the daemon's own v2 cgroup hand the controllers down. Below the root a cgroup with
/// processes cannot (the "no internal processes" rule), so the daemon first moves itself into a
/// leaf of its own, `hearthd`, as a delegated service does.
fn delegate_v2(own: &Path, is_root: bool) -> Result<()> {
    if is_root || enable_controllers(own).is_ok() {
        return Ok(());
    }
    let leaf = own.join("hearthd");
    mkdir(&leaf)?;
    write(&leaf, "cgroup.procs", std::process::id())?;
    enable_controllers(own)
}

fn enable_controllers(dir: &Path) -> Result<()> {
    let enable: Vec<String> = CONTROLLERS.iter().map(|c| format!("+{c}")).collect();
    write(dir, "cgroup.subtree_control", enable.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This host's shape: v1 controllers, v2 mounted for hugetlb only.
    const MOUNTINFO_V1: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const CGROUP_V1: &str = "\
9:name=systemd:/
8:pids:/
4:memory:/process_api/98b5
2:cpuacct:/
1:cpu:/
0::/
";

    /// A systemd host on the unified hierarchy alone.
    const MOUNTINFO_V2: &str = "\
25 30 0:23 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";
    const CGROUP_V2: &str = "0::/system.slice/hearthd.service\n";

    #[test]
    fn parses_mountinfo_with_optional_fields_and_escapes() {
        let mounts = parse_mountinfo(MOUNTINFO_V2);
        assert_eq!(
            mounts,
            vec![Mount {
                root: "/".into(),
                point: "/sys/fs/cgroup".into(),
                fstype: "cgroup2".into(),
                super_options: vec![
                    "rw".into(),
                    "nsdelegate".into(),
                    "memory_recursiveprot".into()
                ],
            }]
        );
        let odd = parse_mountinfo("36 35 98:0 /docker/ab /sys/fs/cgroup/cpu\\040cpuacct rw - cgroup cgroup rw,cpu,cpuacct\nnonsense\n");
        assert_eq!(odd.len(), 1);
        assert_eq!(odd[0].point, Path::new("/sys/fs/cgroup/cpu cpuacct"));
        assert_eq!(odd[0].root, "/docker/ab");
        assert_eq!(odd[0].super_options, ["rw", "cpu", "cpuacct"]);
        assert_eq!(unescape("a\\134b\\9"), "a\\b\\9");
    }

    #[test]
    fn parses_proc_cgroup() {
        let m = parse_proc_cgroup(CGROUP_V1);
        assert_eq!(m.v2.as_deref(), Some("/"));
        assert_eq!(m.v1["memory"], "/process_api/98b5");
        assert_eq!(m.v1["name=systemd"], "/");
        let combined = parse_proc_cgroup("3:cpu,cpuacct:/a/b:c\n");
        assert_eq!(combined.v1["cpu"], "/a/b:c");
        assert_eq!(combined.v1["cpuacct"], "/a/b:c");
        assert_eq!(combined.v2, None);
    }

    fn controllers(list: &'static str) -> impl Fn(&Path) -> Option<String> {
        move |_| Some(list.to_string())
    }

    #[test]
    fn picks_v1_when_v2_lacks_the_controllers() {
        let (mounts, own) = (parse_mountinfo(MOUNTINFO_V1), parse_proc_cgroup(CGROUP_V1));
        let v1 = Layout::V1 {
            memory: "/sys/fs/cgroup/memory/process_api/98b5".into(),
            cpu: "/sys/fs/cgroup/cpu".into(),
            pids: "/sys/fs/cgroup/pids".into(),
        };
        let auto = locate(Mode::Auto, &mounts, &own, controllers("hugetlb\n")).unwrap();
        assert_eq!(auto, Some(v1.clone()));
        assert_eq!(
            locate(Mode::V1, &mounts, &own, controllers("")).unwrap(),
            Some(v1)
        );
        let err = locate(Mode::V2, &mounts, &own, controllers("hugetlb\n")).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("/sys/fs/cgroup/unified offers [hugetlb]"),
            "{msg}"
        );
        assert!(msg.contains("--cgroups off"), "{msg}");
        assert_eq!(
            locate(Mode::Off, &mounts, &own, controllers("")).unwrap(),
            None
        );
    }

    #[test]
    fn picks_v2_where_it_has_the_controllers() {
        let (mounts, own) = (parse_mountinfo(MOUNTINFO_V2), parse_proc_cgroup(CGROUP_V2));
        let seen = std::cell::RefCell::new(Vec::new());
        let layout = locate(Mode::Auto, &mounts, &own, |dir| {
            seen.borrow_mut().push(dir.to_path_buf());
            Some("cpuset cpu io memory hugetlb pids rdma misc\n".into())
        })
        .unwrap();
        let dir = PathBuf::from("/sys/fs/cgroup/system.slice/hearthd.service");
        assert_eq!(layout, Some(Layout::V2(dir.clone())));
        assert_eq!(*seen.borrow(), [dir]);
        // Without pids in it, and no v1 hierarchies, there is nothing to use.
        let err = locate(Mode::Auto, &mounts, &own, controllers("cpu memory")).unwrap_err();
        assert!(err.to_string().contains("v1 hierarchies for []"), "{err}");
    }

    #[test]
    fn a_hierarchy_mounted_below_its_root_is_followed() {
        let mounts = parse_mountinfo(
            "1 0 0:1 /docker/ab /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n\
             2 0 0:2 /docker/ab /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n\
             3 0 0:3 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids\n",
        );
        let own = parse_proc_cgroup("3:pids:/x\n2:cpu,cpuacct:/docker/ab\n1:memory:/docker/ab/y\n");
        assert_eq!(
            locate(Mode::Auto, &mounts, &own, controllers("")).unwrap(),
            Some(Layout::V1 {
                memory: "/sys/fs/cgroup/memory/y".into(),
                cpu: "/sys/fs/cgroup/cpu,cpuacct".into(),
                pids: "/sys/fs/cgroup/pids/x".into(),
            })
        );
    }

    #[test]
    fn limits_are_ram_plus_overhead_and_a_cpu_per_vcpu() {
        let l = Limits::for_machine(512, 2, 256);
        assert_eq!(l.memory_bytes, 768 << 20);
        assert_eq!(l.cpu_quota_us(), 200_000);
        assert_eq!(l.pids, PIDS_MAX);
    }

    /// The v2 files a machine's cgroup gets, written into a directory tree standing in for the
    /// unified hierarchy (this host has no v2 controllers to try them on).
    #[test]
    fn writes_v2_limits() {
        let root = tempfile::tempdir().unwrap();
        let parent = root.path().join("hearth-abcd");
        let cgroups = Cgroups::at(Layout::V2(parent.clone()));
        let cg = cgroups
            .create("m1", &Limits::for_machine(256, 1, 256))
            .unwrap();
        let dir = parent.join("vm-m1");
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
        assert_eq!(read("memory.max"), (512u64 << 20).to_string());
        assert_eq!(read("cpu.max"), "100000 100000");
        assert_eq!(read("pids.max"), "1024");
        assert!(!dir.join("memory.swap.max").exists());
        assert_eq!(cg.dirs(), std::slice::from_ref(&dir));
        assert_eq!(cgroups.machines(), ["m1"]);
        // Not a machine's: ignored.
        std::fs::create_dir(parent.join("other")).unwrap();
        assert_eq!(cgroups.machines(), ["m1"]);
    }

    /// The real thing, on this host's hierarchies (needs root): a process joins a machine's
    /// cgroup before it execs, the limits read back, and the cgroup goes once it is empty.
    #[test]
    fn a_real_cgroup_limits_and_holds_a_process() {
        use std::os::unix::process::CommandExt;
        let tag = format!("t{}", std::process::id());
        let cgroups = Cgroups::setup(Mode::Auto, &tag).unwrap().unwrap();
        let limits = Limits::for_machine(100, 2, 28);
        let cg = cgroups.create("m.1", &limits).unwrap();
        let joiner = cg.clone();
        // SAFETY: join_self only makes system calls.
        let mut child = unsafe {
            std::process::Command::new("sleep")
                .arg("30")
                .pre_exec(move || joiner.join_self())
                .spawn()
                .unwrap()
        };
        let pid = child.id() as i32;
        assert_eq!(cgroups.procs("m.1"), [pid]);
        assert_eq!(cgroups.machines(), ["m.1"]);
        let theirs =
            parse_proc_cgroup(&std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap());
        let read = |dir: &Path, f: &str| {
            std::fs::read_to_string(dir.join(f))
                .unwrap()
                .trim()
                .to_string()
        };
        match cgroups.dirs_of("m.1") {
            Layout::V2(dir) => {
                assert!(dir.ends_with(theirs.v2.unwrap().trim_start_matches('/')));
                assert_eq!(read(&dir, "memory.max"), (128u64 << 20).to_string());
                assert_eq!(read(&dir, "cpu.max"), "200000 100000");
                assert_eq!(read(&dir, "pids.max"), "1024");
            }
            Layout::V1 { memory, cpu, pids } => {
                assert!(memory.ends_with(theirs.v1["memory"].trim_start_matches('/')));
                assert!(cpu.ends_with(theirs.v1["cpu"].trim_start_matches('/')));
                assert!(pids.ends_with(theirs.v1["pids"].trim_start_matches('/')));
                assert_eq!(
                    read(&memory, "memory.limit_in_bytes"),
                    (128u64 << 20).to_string()
                );
                if memory.join("memory.memsw.limit_in_bytes").exists() {
                    let memsw = read(&memory, "memory.memsw.limit_in_bytes");
                    assert_eq!(memsw, (128u64 << 20).to_string());
                }
                assert_eq!(read(&cpu, "cpu.cfs_quota_us"), "200000");
                assert_eq!(read(&cpu, "cpu.cfs_period_us"), "100000");
                assert_eq!(read(&pids, "pids.max"), "1024");
            }
        }
        // Made again (a daemon restart, perhaps with another overhead: the limits rise, then
        // fall): the same cgroup, the process still in it.
        cgroups
            .create("m.1", &Limits::for_machine(100, 2, 128))
            .unwrap();
        cgroups.create("m.1", &limits).unwrap();
        assert_eq!(cgroups.procs("m.1"), [pid]);
        // A busy cgroup cannot go.
        assert!(cgroups.remove("m.1").is_err());
        child.kill().unwrap();
        child.wait().unwrap();
        cgroups.remove("m.1").unwrap();
        assert!(cgroups.machines().is_empty());
        for dir in cg.dirs() {
            assert!(!dir.exists(), "{} left", dir.display());
        }
        cgroups.release();
        for dir in cgroups.parent.dirs() {
            assert!(!dir.exists(), "{} left", dir.display());
        }
        // What a daemon killed with its machines leaves, purged.
        let cgroups = Cgroups::setup(Mode::Auto, &tag).unwrap().unwrap();
        cgroups.create("m2", &limits).unwrap();
        let found = Cgroups::find(Mode::Auto, &tag).unwrap().unwrap();
        assert_eq!(found.machines(), ["m2"]);
        found.purge();
        for dir in cgroups.parent.dirs() {
            assert!(!dir.exists(), "{} left", dir.display());
        }
    }
}
