//! The Firecracker backend against the real binaries (`HEARTH_FIRECRACKER`, `HEARTH_JAILER`):
//! boots plain and jailed (as `hearth-vmm`, in a network namespace and a cgroup), pause,
//! snapshot files, a restore into a fresh jailed process in another namespace that finds its
//! own disk, reattach, kill, and every refusal leaving nothing behind. Nested KVM on the test
//! hosts cannot run a guest far (it dies after some 35 s and its agent never answers), so these
//! tests assert what the VMM does, and kill it early.

mod common;

use hearthd::cgroup::{Cgroups, Limits, Mode};
use hearthd::vmm::firecracker::{FcError, Firecracker, Jail};
use hearthd::vmm::user::VmmUser;
use hearthd::vmm::{MachinePaths, NetAttach, VmSpec};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Firecracker guests burn CPU: one test at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const MEMORY_MIB: u32 = 128;

struct Binaries {
    firecracker: PathBuf,
    jailer: PathBuf,
}

fn binaries() -> Option<Binaries> {
    let found = std::env::var_os("HEARTH_FIRECRACKER").zip(std::env::var_os("HEARTH_JAILER"));
    if found.is_none() {
        println!("skipped: no firecracker");
    }
    found.map(|(f, j)| Binaries {
        firecracker: f.into(),
        jailer: j.into(),
    })
}

/// A data root of the test's own: the image's files copied in (the VMM user is given them), the
/// machines' cgroups, network namespaces made here.
struct Host {
    root: tempfile::TempDir,
    bins: Binaries,
    kernel: PathBuf,
    initrd: PathBuf,
    cgroups: Cgroups,
    namespaces: Vec<String>,
}

impl Host {
    fn new(bins: Binaries) -> Host {
        let root = tempfile::tempdir().unwrap();
        let images = root.path().join("images");
        std::fs::create_dir(&images).unwrap();
        let image = common::image_dir();
        for name in ["vmlinux", "initrd.img"] {
            std::fs::copy(image.join(name), images.join(name)).unwrap();
        }
        // Not four hex digits: no daemon's tag, so purging it touches no daemon's machines.
        let tag = format!("fctest{}", std::process::id());
        Host {
            kernel: images.join("vmlinux"),
            initrd: images.join("initrd.img"),
            cgroups: Cgroups::setup(Mode::Auto, &tag).unwrap().unwrap(),
            root,
            bins,
            namespaces: Vec::new(),
        }
    }

    fn path(&self) -> &Path {
        self.root.path()
    }

    fn jail_base(&self) -> PathBuf {
        self.path().join("jail")
    }

    fn jailed(&self) -> Firecracker {
        Firecracker {
            binary: self.bins.firecracker.clone(),
            version: String::new(),
            jail: Some(Jail {
                jailer: self.bins.jailer.clone(),
                chroot_base: self.jail_base(),
            }),
            user: Some(vmm_user()),
            console_log_bytes: 1 << 20,
            clone: hearthd::config::CloneMode::Auto,
        }
    }

    fn plain(&self) -> Firecracker {
        Firecracker {
            binary: self.bins.firecracker.clone(),
            version: String::new(),
            jail: None,
            user: None,
            console_log_bytes: 1 << 20,
            clone: hearthd::config::CloneMode::Auto,
        }
    }

    /// Machine `id`'s paths, as the daemon lays them out, with a system disk.
    fn machine(&self, id: &str) -> MachinePaths {
        let paths = hearthd::service::machine_paths(self.path(), id);
        std::fs::create_dir_all(&paths.dir).unwrap();
        std::fs::copy(common::image_dir().join("rootfs.ext4"), paths.system_disk()).unwrap();
        paths
    }

    /// A network namespace holding a tap named as the daemon names it, made as the daemon
    /// makes it (persistent, without an owner: any user in the namespace may attach).
    fn namespace(&mut self, suffix: &str) -> NetAttach {
        let name = format!("hearth-fctest-{}-{suffix}", std::process::id());
        run("ip", &["netns", "add", &name]);
        self.namespaces.push(name.clone());
        run(
            "ip",
            &["-n", &name, "tuntap", "add", "dev", "tap0", "mode", "tap"],
        );
        NetAttach {
            netns: PathBuf::from("/run/netns").join(&name),
            tap: "tap0".into(),
            mac: "02:68:72:74:00:01".into(),
        }
    }

    fn spec(&self, paths: &MachinePaths, machine: &str, network: Option<NetAttach>) -> VmSpec {
        let cgroup = self
            .cgroups
            .create(machine, &Limits::for_machine(MEMORY_MIB, 1, 256))
            .unwrap();
        VmSpec {
            kernel: self.kernel.clone(),
            initrd: Some(self.initrd.clone()),
            memory_mib: MEMORY_MIB,
            vcpus: 1,
            disks: vec![paths.system_disk()],
            paths: paths.clone(),
            network,
            cgroup: Some(cgroup),
        }
    }

    /// No VMM, jail, socket or pid file of `paths` is left, and machine `machine`'s cgroup
    /// empties (a VMM just killed counts until its parent reaps it) and goes.
    async fn assert_nothing_left(&self, paths: &MachinePaths, machine: &str) {
        let id = paths.sock_dir.file_name().unwrap();
        let vmms: Vec<_> = common::processes_mentioning(Path::new(id))
            .into_iter()
            .filter(|(_, cmdline)| cmdline.contains("firecracker") || cmdline.contains("jailer"))
            .collect();
        assert!(vmms.is_empty(), "VMMs left: {vmms:?}");
        for left in [
            self.jail_base().join("firecracker").join(id),
            paths.sock_dir.join("fc"),
            paths.control_socket(),
            paths.agent_socket(),
            paths.pidfile(),
        ] {
            assert!(!left.exists(), "{} left", left.display());
        }
        assert!(
            common::eventually(Duration::from_secs(10), async || self
                .cgroups
                .procs(machine)
                .is_empty())
            .await,
            "in {machine}'s cgroup: {:?}",
            self.cgroups.procs(machine)
        );
        self.cgroups.remove(machine).unwrap();
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        for name in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
        self.cgroups.purge();
    }
}

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn vmm_user() -> VmmUser {
    VmmUser::lookup("hearth-vmm")
        .unwrap()
        .expect("the hearth-vmm user (scripts/install-deps makes it)")
}

fn status_field(pid: i32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

/// The inode of the network namespace process `pid` is in.
fn netns_of(pid: i32) -> u64 {
    std::fs::metadata(format!("/proc/{pid}/ns/net"))
        .unwrap()
        .ino()
}

fn ino(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().ino()
}

/// The inodes of the files process `pid` has open under `name` (as it sees the path).
fn open_files(pid: i32, name: &str) -> Vec<u64> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t.ends_with(name)))
        .map(|fd| std::fs::metadata(fd.path()).unwrap().ino())
        .collect()
}

async fn state(fc: &Firecracker, paths: &MachinePaths) -> String {
    fc.describe(paths).await.unwrap().state
}

#[tokio::test]
async fn jailed_boot_snapshot_restore_in_another_namespace_reattach_and_kill() {
    let Some(bins) = binaries() else { return };
    let _one = ONE_AT_A_TIME.lock().await;
    let mut host = Host::new(bins);
    let fc = host.jailed();
    let user = vmm_user();

    let net_a = host.namespace("a");
    let p1 = host.machine("m1");
    let spec1 = host.spec(&p1, "m1", Some(net_a.clone()));
    let m1 = fc.boot(&spec1).await.unwrap();
    let id1 = p1
        .sock_dir
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert!(fc.is_alive(&m1));
    let info = fc.describe(&p1).await.unwrap();
    assert_eq!(
        (info.id.as_str(), info.state.as_str()),
        (id1.as_str(), "Running")
    );
    assert_eq!(
        std::fs::read_to_string(p1.pidfile()).unwrap(),
        format!("{} {}\n", m1.pid, m1.start_time)
    );
    // Jailed: as the VMM user, PID 1 of a namespace of its own, in the machine's network
    // namespace and cgroup, chrooted where its disk is the machine's.
    assert_eq!(
        status_field(m1.pid, "Uid")
            .split_whitespace()
            .next()
            .unwrap(),
        user.uid.to_string()
    );
    assert_eq!(status_field(m1.pid, "NSpid"), format!("{}\t1", m1.pid));
    assert_eq!(netns_of(m1.pid), ino(&net_a.netns));
    assert_eq!(host.cgroups.procs("m1"), [m1.pid]);
    let jail1 = host.jail_base().join("firecracker").join(&id1).join("root");
    assert_eq!(open_files(m1.pid, "system.img"), [ino(&p1.system_disk())]);
    assert_eq!(
        open_files(m1.pid, "dev/net/tun").len(),
        1,
        "attached to its tap"
    );
    assert_eq!(ino(&jail1.join("system.img")), ino(&p1.system_disk()));
    // Its sockets, reached through the runtime directory.
    tokio::net::UnixStream::connect(fc.agent_socket(&p1))
        .await
        .unwrap();
    // Firecracker's log goes to vmm.log, not into the console.
    assert!(
        common::eventually(Duration::from_secs(10), async || {
            std::fs::read_to_string(p1.vmm_log()).is_ok_and(|l| l.contains("Running Firecracker v"))
        })
        .await
    );
    assert!(!fc.wait_exit(&m1, Duration::from_millis(100)).await);

    fc.pause(&p1).await.unwrap();
    assert_eq!(state(&fc, &p1).await, "Paused");
    let snap = host.path().join("snapshot");
    std::fs::create_dir(&snap).unwrap();
    let files = fc.save_state(&p1, &snap).await.unwrap();
    assert_eq!(files, ["vmstate", "memory"]);
    let memory = std::fs::metadata(snap.join("memory")).unwrap();
    assert_eq!(memory.len(), u64::from(MEMORY_MIB) << 20);
    let vmstate = std::fs::metadata(snap.join("vmstate")).unwrap();
    assert!(vmstate.len() > 0);
    assert_eq!(
        (memory.uid(), vmstate.uid()),
        (0, 0),
        "the snapshot is root's"
    );
    assert!(!jail1.join("memory").exists() && !jail1.join("vmstate").exists());
    fc.resume(&p1).await.unwrap();
    assert_eq!(state(&fc, &p1).await, "Running");

    // A snapshot Firecracker cannot load: its reason, and nothing left.
    let net_b = host.namespace("b");
    let broken = host.path().join("broken");
    std::fs::create_dir(&broken).unwrap();
    let bytes = std::fs::read(snap.join("vmstate")).unwrap();
    std::fs::write(broken.join("vmstate"), &bytes[..bytes.len() / 3]).unwrap();
    std::fs::hard_link(snap.join("memory"), broken.join("memory")).unwrap();
    let p3 = host.machine("m3");
    let spec3 = host.spec(&p3, "m3", Some(net_b.clone()));
    let e = fc.restore(&spec3, &broken).await.unwrap_err();
    assert!(matches!(e, FcError::Load { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.starts_with("Firecracker could not load the snapshot: \"Load snapshot error"),
        "{msg}"
    );
    host.assert_nothing_left(&p3, "m3").await;

    // Restored into a fresh jailed process, with another runtime directory and namespace: the
    // snapshot's `system.img` is the new machine's disk.
    let p2 = host.machine("m2");
    let spec2 = host.spec(&p2, "m2", Some(net_b.clone()));
    let m2 = fc.restore(&spec2, &snap).await.unwrap();
    let id2 = p2
        .sock_dir
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let info = fc.describe(&p2).await.unwrap();
    assert_eq!(
        (info.id.as_str(), info.state.as_str()),
        (id2.as_str(), "Running")
    );
    assert_eq!(status_field(m2.pid, "NSpid"), format!("{}\t1", m2.pid));
    assert_eq!(netns_of(m2.pid), ino(&net_b.netns));
    assert_eq!(host.cgroups.procs("m2"), [m2.pid]);
    assert_eq!(open_files(m2.pid, "system.img"), [ino(&p2.system_disk())]);
    assert_eq!(
        open_files(m2.pid, "dev/net/tun").len(),
        1,
        "attached to its tap"
    );
    // The memory is the snapshot's file, mapped (the link into the jail is gone).
    let jail2 = host.jail_base().join("firecracker").join(&id2).join("root");
    assert!(!jail2.join("memory").exists());
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", m2.pid)).unwrap();
    let mapped = ino(&snap.join("memory")).to_string();
    assert!(
        maps.lines()
            .any(|l| l.split_whitespace().nth(4) == Some(&mapped)),
        "{maps}"
    );
    tokio::net::UnixStream::connect(fc.agent_socket(&p2))
        .await
        .unwrap();

    // A daemon restarted: a new backend value finds the VMM by its record.
    let again = host.jailed();
    again.reattach(&p2, &m2).await.unwrap();
    let reused = hearthd::vmm::VmProcess {
        start_time: m2.start_time + 1,
        ..m2
    };
    assert!(matches!(
        again.reattach(&p2, &reused).await,
        Err(FcError::Gone)
    ));

    again.kill(&p2, &m2).await;
    assert!(!again.is_alive(&m2));
    assert!(again.wait_exit(&m2, Duration::ZERO).await);
    assert!(matches!(again.reattach(&p2, &m2).await, Err(FcError::Gone)));
    host.assert_nothing_left(&p2, "m2").await;

    // A VMM that only its jail knows (a daemon stopped before it wrote the pid file).
    std::fs::remove_file(p1.pidfile()).unwrap();
    fc.kill_unrecorded(&p1).await;
    assert!(!fc.is_alive(&m1));
    host.assert_nothing_left(&p1, "m1").await;
}

#[tokio::test]
async fn plain_boot_and_a_vmm_known_only_by_its_pid_file() {
    let Some(bins) = binaries() else { return };
    let _one = ONE_AT_A_TIME.lock().await;
    let host = Host::new(bins);
    let fc = host.plain();
    assert!(hearthd::vmm::version_of(&host.bins.firecracker).starts_with("Firecracker v"));

    // A kernel that is not there: said, and nothing made.
    let p = host.machine("p1");
    let mut spec = host.spec(&p, "p1", None);
    spec.kernel = host.path().join("no-such-vmlinux");
    let e = fc.boot(&spec).await.unwrap_err().to_string();
    assert!(e.contains("no-such-vmlinux"), "{e}");
    host.assert_nothing_left(&p, "p1").await;

    let spec = host.spec(&p, "p1", None);
    let vmm = fc.boot(&spec).await.unwrap();
    assert_eq!(state(&fc, &p).await, "Running");
    // Plain: the daemon's child, working in the runtime directory's `fc`, in the cgroup.
    assert_eq!(
        status_field(vmm.pid, "PPid"),
        std::process::id().to_string()
    );
    assert_eq!(
        std::fs::read_link(format!("/proc/{}/cwd", vmm.pid)).unwrap(),
        p.sock_dir.join("fc")
    );
    assert_eq!(host.cgroups.procs("p1"), [vmm.pid]);
    assert_eq!(
        open_files(vmm.pid, "fc/system.img"),
        [ino(&p.system_disk())]
    );
    tokio::net::UnixStream::connect(fc.agent_socket(&p))
        .await
        .unwrap();

    // Only the pid file knows it (a daemon stopped before recording it).
    fc.kill_unrecorded(&p).await;
    assert!(!fc.is_alive(&vmm));
    host.assert_nothing_left(&p, "p1").await;
}

#[tokio::test]
async fn refusals_leave_nothing() {
    let Some(bins) = binaries() else { return };
    let _one = ONE_AT_A_TIME.lock().await;
    let host = Host::new(bins);
    let fc = host.jailed();
    let p = host.machine("r1");

    // A kernel Firecracker cannot load.
    let garbage = host.path().join("images").join("garbage");
    std::fs::write(&garbage, vec![0u8; 4096]).unwrap();
    let mut spec = host.spec(&p, "r1", None);
    spec.kernel = garbage;
    let e = fc.boot(&spec).await.unwrap_err();
    assert!(matches!(e, FcError::Exited { .. }), "{e:?}");
    assert!(e.to_string().contains("Invalid Elf magic number"), "{e}");
    host.assert_nothing_left(&p, "r1").await;

    // A configuration it refuses.
    let mut spec = host.spec(&p, "r1", None);
    spec.vcpus = 64;
    let e = fc.boot(&spec).await.unwrap_err().to_string();
    assert!(e.contains("The number of vCPUs must be"), "{e}");
    host.assert_nothing_left(&p, "r1").await;

    // A namespace that is not there.
    let missing = PathBuf::from("/run/netns/hearth-fctest-none");
    let net = NetAttach {
        netns: missing.clone(),
        tap: "tap0".into(),
        mac: "02:68:72:74:00:01".into(),
    };
    let spec = host.spec(&p, "r1", Some(net));
    let e = fc.boot(&spec).await.unwrap_err().to_string();
    assert!(e.contains(&*missing.to_string_lossy()), "{e}");
    host.assert_nothing_left(&p, "r1").await;

    // A Firecracker binary that is not there: the jailer says so.
    let mut broken = host.jailed();
    broken.binary = host.path().join("bin").join("firecracker");
    let spec = host.spec(&p, "r1", None);
    let e = broken.boot(&spec).await.unwrap_err();
    assert!(matches!(e, FcError::Jailer { .. }), "{e:?}");
    assert!(e.to_string().contains("bin/firecracker"), "{e}");
    host.assert_nothing_left(&p, "r1").await;

    // A snapshot directory without the files.
    let spec = host.spec(&p, "r1", None);
    let e = fc
        .restore(&spec, &host.path().join("no-snapshot"))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("no-snapshot/vmstate"), "{e}");
    host.assert_nothing_left(&p, "r1").await;
}

/// Processes whose root directory lies under `dir`: jailed VMMs (their command lines name only
/// their jail ids).
fn jailed_under(dir: &Path) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/root")).is_ok_and(|r| r.starts_with(dir))
        })
        .collect()
}

/// Through the daemon: the machine names its VMM. A Firecracker machine boots jailed in its
/// network namespace; its agent never answers here, so the create fails when the boot times
/// out and leaves nothing (record, files, sockets, jail, process). A QEMU snapshot asked to
/// run on Firecracker is refused before anything is spawned.
#[tokio::test]
async fn the_daemon_drives_firecracker_machines_and_a_failed_one_leaves_nothing() {
    let Some(_bins) = binaries() else { return };
    let _one = ONE_AT_A_TIME.lock().await;
    let d = common::Daemon::start_with(&["--vmm", "firecracker", "--boot-timeout-secs", "6"]).await;
    let c = &d.client;
    let create = |id: &str, vmm| hearth_api::CreateMachineRequest {
        machine_id: id.into(),
        artifact: common::artifact(),
        memory_mib: Some(MEMORY_MIB),
        vmm,
        ..Default::default()
    };
    let started = std::time::Instant::now();
    let err = c.create_machine(&create("fc1", None)).await.unwrap_err();
    assert_eq!(
        err.code(),
        Some(hearth_api::ErrorCode::Unavailable),
        "{err}"
    );
    assert!(err.to_string().contains("vsock"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    d.assert_nothing_left("fc1").await;
    let jails = d.path().join("jail");
    assert!(jailed_under(&jails).is_empty(), "jailed VMMs left");
    let left: Vec<_> = std::fs::read_dir(jails.join("firecracker"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "jails left: {left:?}");

    // A QEMU machine beside it, by name; its snapshot is QEMU's.
    let m = c
        .create_machine(&create("q1", Some(hearth_api::VmmKind::Qemu)))
        .await
        .unwrap();
    assert_eq!(m.vmm, hearth_api::VmmKind::Qemu);
    c.create_snapshot("q1", "qs", hearth_api::SnapshotKind::Memory)
        .await
        .unwrap();
    let mut req = common::restore_req("qs", "on-fc");
    req.vmm = Some(hearth_api::VmmKind::Firecracker);
    let err = c.restore("qs", &req).await.unwrap_err();
    assert_eq!(err.code(), Some(hearth_api::ErrorCode::Integrity), "{err}");
    assert!(err.to_string().contains("firecracker"), "{err}");
    d.assert_nothing_left("on-fc").await;
    c.delete_machine("q1").await.unwrap();
    assert!(d.vmm_pids().is_empty());
}

/// A restored machine's snapshots are `Diff`s laid over its base: the memory they give is
/// byte for byte what a `Full` snapshot of the same paused machine writes, again after it ran
/// on (each diff goes over the last snapshot's memory); a merge that fails leaves nothing and
/// makes the next snapshot `Full`.
#[tokio::test]
async fn restored_machines_take_diff_snapshots_merged_over_their_base() {
    let Some(bins) = binaries() else { return };
    let _one = ONE_AT_A_TIME.lock().await;
    let host = Host::new(bins);
    let fc = host.plain();
    let p1 = host.machine("d1");
    let m1 = fc.boot(&host.spec(&p1, "d1", None)).await.unwrap();
    fc.pause(&p1).await.unwrap();
    let dir = |name: &str| {
        let d = host.path().join(name);
        std::fs::create_dir(&d).unwrap();
        d
    };
    let base = dir("base");
    fc.save_state(&p1, &base).await.unwrap();
    fc.kill(&p1, &m1).await;

    // Restored as the daemon restores: the snapshot's files linked into the state directory,
    // the machine's disk its own.
    let p2 = host.machine("d2");
    let state = p2.state_dir();
    std::fs::create_dir_all(&state).unwrap();
    for f in ["vmstate", "memory"] {
        std::fs::hard_link(base.join(f), state.join(f)).unwrap();
    }
    let m2 = fc
        .restore(&host.spec(&p2, "d2", None), &state)
        .await
        .unwrap();
    std::fs::remove_file(state.join("vmstate")).unwrap();

    fc.pause(&p2).await.unwrap();
    let first = dir("first");
    assert_eq!(
        fc.save_state(&p2, &first).await.unwrap(),
        ["vmstate", "memory"]
    );
    assert!(!first.join("memory.diff").exists());
    assert_eq!(
        ino(&state.join("last-memory")),
        ino(&first.join("memory")),
        "the next diff goes over this one"
    );
    assert!(
        std::fs::read(first.join("memory")).unwrap()
            == full_memory(&fc, &p2, &dir("first-full")).await,
        "the merged memory differs from a full snapshot's"
    );

    // It runs on; the next diff holds what changed since, over the first one's memory.
    fc.resume(&p2).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    fc.pause(&p2).await.unwrap();
    let second = dir("second");
    fc.save_state(&p2, &second).await.unwrap();
    assert!(
        std::fs::read(second.join("memory")).unwrap()
            == full_memory(&fc, &p2, &dir("second-full")).await,
        "the second merged memory differs from a full snapshot's"
    );

    // A merge that fails (its memory's name taken by a directory): nothing of it is left, and
    // the next is full (its memory whole, as a full snapshot writes it).
    let failed = dir("failed");
    std::fs::create_dir(failed.join("memory")).unwrap();
    fc.save_state(&p2, &failed).await.unwrap_err();
    assert_eq!(
        std::fs::read_dir(&failed).unwrap().count(),
        1,
        "the failed snapshot left files: {:?}",
        std::fs::read_dir(&failed).unwrap().collect::<Vec<_>>()
    );
    assert!(state.join("full-next").exists());
    let after = dir("after");
    fc.save_state(&p2, &after).await.unwrap();
    assert!(!state.join("full-next").exists());
    assert_eq!(ino(&state.join("last-memory")), ino(&after.join("memory")));
    assert!(
        std::fs::read(after.join("memory")).unwrap()
            == full_memory(&fc, &p2, &dir("after-full")).await
    );

    fc.kill(&p2, &m2).await;
    host.assert_nothing_left(&p2, "d2").await;
}

/// The memory of a `Full` snapshot of paused machine `p` into `out`: with its state directory's
/// memory links set aside, the backend takes one (and links nothing).
async fn full_memory(fc: &Firecracker, p: &MachinePaths, out: &Path) -> Vec<u8> {
    let state = p.state_dir();
    let aside = state.with_file_name("aside");
    std::fs::create_dir(&aside).unwrap();
    for f in ["memory", "last-memory"] {
        if state.join(f).exists() {
            std::fs::rename(state.join(f), aside.join(f)).unwrap();
        }
    }
    fc.save_state(p, out).await.unwrap();
    for f in ["memory", "last-memory"] {
        if aside.join(f).exists() {
            std::fs::rename(aside.join(f), state.join(f)).unwrap();
        }
    }
    std::fs::remove_dir(&aside).unwrap();
    std::fs::read(out.join("memory")).unwrap()
}
