//! Confined VMMs: QEMU runs as the unprivileged `hearth-vmm`, under its seccomp sandbox, in a
//! cgroup of its machine's with memory, CPU and pids limits; a guest that touches all its RAM
//! stays within its limit; confinement holds across snapshots, restores, forks, a stop and start
//! and a daemon restart; the daemon refuses to start where it cannot confine.

mod common;

use common::*;
use hearth_api::{ForkRequest, Phase, SnapshotKind};
use hearthd::cgroup::{Cgroups, Layout, Limits, Mode};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";
/// The daemon's default `--vmm-memory-overhead-mib`.
const OVERHEAD_MIB: u64 = 256;

fn vmm_user() -> nix::unistd::User {
    nix::unistd::User::from_name("hearth-vmm")
        .unwrap()
        .expect("the hearth-vmm user (scripts/install-deps makes it)")
}

/// The VMM of machine `id` (its command line names the machine's directory).
fn vmm_pid(d: &Daemon, id: &str) -> i32 {
    let pids: Vec<i32> = processes_mentioning(&d.path().join("machines").join(id))
        .into_iter()
        .filter(|(_, cmdline)| cmdline.contains("qemu-system"))
        .map(|(pid, _)| pid)
        .collect();
    assert_eq!(pids.len(), 1, "VMMs of {id}: {pids:?}");
    pids[0]
}

fn status_field(pid: i32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in the status of {pid}"))
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

fn cgroups(d: &Daemon) -> Cgroups {
    Cgroups::find(Mode::Auto, &d.net_tag()).unwrap().unwrap()
}

fn read_u64(dir: &Path, file: &str) -> u64 {
    let text = std::fs::read_to_string(dir.join(file)).unwrap();
    text.trim()
        .parse()
        .unwrap_or_else(|_| panic!("{}: {text:?}", dir.join(file).display()))
}

/// The memory limit, CPU quota (µs per 100 ms) and pids limit of machine `id`'s cgroup.
fn limits_of(cg: &Cgroups, id: &str) -> (u64, u64, u64) {
    match cg.dirs_of(id) {
        Layout::V2(dir) => {
            let cpu = std::fs::read_to_string(dir.join("cpu.max")).unwrap();
            assert!(cpu.trim().ends_with(" 100000"), "cpu.max {cpu:?}");
            let quota = cpu.split_whitespace().next().unwrap().parse().unwrap();
            (
                read_u64(&dir, "memory.max"),
                quota,
                read_u64(&dir, "pids.max"),
            )
        }
        Layout::V1 { memory, cpu, pids } => {
            assert_eq!(read_u64(&cpu, "cpu.cfs_period_us"), 100_000);
            (
                read_u64(&memory, "memory.limit_in_bytes"),
                read_u64(&cpu, "cpu.cfs_quota_us"),
                read_u64(&pids, "pids.max"),
            )
        }
    }
}

/// The memory machine `id`'s cgroup uses now and at its peak.
fn memory_of(cg: &Cgroups, id: &str) -> (u64, u64) {
    match cg.dirs_of(id) {
        Layout::V2(dir) => (
            read_u64(&dir, "memory.current"),
            read_u64(&dir, "memory.peak"),
        ),
        Layout::V1 { memory, .. } => (
            read_u64(&memory, "memory.usage_in_bytes"),
            read_u64(&memory, "memory.max_usage_in_bytes"),
        ),
    }
}

/// Machine `id`'s VMM runs as hearth-vmm, sandboxed, alone in its cgroup with the limits of
/// a machine of `memory_mib` and `vcpus` (and `overhead_mib` for the VMM). Returns its pid.
fn assert_confined(d: &Daemon, id: &str, memory_mib: u64, vcpus: u64, overhead_mib: u64) -> i32 {
    let pid = vmm_pid(d, id);
    let user = vmm_user();
    let (uid, gid) = (user.uid.as_raw(), user.gid.as_raw());
    assert_eq!(status_field(pid, "Uid"), format!("{uid} {uid} {uid} {uid}"));
    assert_eq!(status_field(pid, "Gid"), format!("{gid} {gid} {gid} {gid}"));
    assert_eq!(status_field(pid, "Seccomp"), "2", "no seccomp filter");
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    assert!(
        args.windows(2)
            .any(|w| w[0] == b"-sandbox" && w[1] == SANDBOX.as_bytes()),
        "no -sandbox {SANDBOX}"
    );
    let cg = cgroups(d);
    assert_eq!(cg.procs(id), [pid], "the cgroup of {id}");
    // The kernel says so too.
    let theirs = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(
        theirs.lines().any(|l| l.ends_with(&format!("/vm-{id}"))),
        "{theirs}"
    );
    assert_eq!(
        limits_of(&cg, id),
        ((memory_mib + overhead_mib) << 20, vcpus * 100_000, 1024)
    );
    // Its files are the VMM user's (a booted machine's RAM file too, and the console's pipes it
    // opens; the log they feed is the daemon's); their directories, its sockets root's. It may
    // pass through the run directory to its pipes, not list or write it.
    let paths = hearthd::service::machine_paths(d.path(), id);
    let owner = |path: &Path| {
        let meta =
            std::fs::metadata(path).unwrap_or_else(|e| panic!("{} of {id}: {e}", path.display()));
        (meta.uid(), meta.mode() & 0o7777)
    };
    let mut theirs = vec![
        paths.system_disk(),
        paths.sock_dir.join("console.in"),
        paths.sock_dir.join("console.out"),
    ];
    theirs.extend(Some(paths.memory()).filter(|m| m.exists()));
    for f in &theirs {
        assert_eq!(owner(f), (uid, 0o600), "{}", f.display());
    }
    // (A restored guest may have written nothing to its console yet.)
    if paths.console().exists() {
        assert_eq!(owner(&paths.console()).0, 0);
    }
    assert_eq!(owner(&paths.dir).0, 0);
    assert_eq!(owner(&paths.sock_dir), (0, 0o711));
    for sock in [paths.control_socket(), paths.agent_socket()] {
        assert_eq!(owner(&sock), (0, 0o600), "{}", sock.display());
    }
    pid
}

/// What filling its guest's RAM did to a VMM's memory.
struct Filled {
    pid: i32,
    /// Bytes the guest wrote into a tmpfs.
    fill: u64,
    limit: u64,
    /// The cgroup's usage once booted, after the fill, at its peak; the highest usage and the
    /// VMM's highest RSS sampled meanwhile.
    booted: u64,
    after: u64,
    peak: u64,
    sampled: u64,
    rss: u64,
}

impl std::fmt::Display for Filled {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(
            f,
            "{} MiB filled: cgroup at boot {} MiB, after {} MiB, peak {} MiB (sampled {} MiB), \
             VMM RSS peak {} MiB; limit {} MiB",
            self.fill >> 20,
            self.booted >> 20,
            self.after >> 20,
            self.peak >> 20,
            self.sampled >> 20,
            self.rss >> 20,
            self.limit >> 20
        )
    }
}

/// Boots machine `id` with `mib` of RAM on a daemon whose VMMs get `overhead_mib` beyond it,
/// and has the guest write all the RAM it has left but 16 MiB into a tmpfs (each page written,
/// so each is the host's to back) while its VMM's memory is sampled. The VMM lives through it.
async fn fill_ram(d: &Daemon, id: &str, mib: u64, overhead_mib: u64) -> Filled {
    let c = &d.client;
    let mut req = create_req(id);
    req.memory_mib = Some(mib as u32);
    c.create_machine(&req).await.unwrap();
    let pid = assert_confined(d, id, mib, 1, overhead_mib);
    let cg = cgroups(d);
    let (booted, _) = memory_of(&cg, id);
    let sampler = {
        let (cg, id) = (cgroups(d), id.to_string());
        tokio::spawn(async move {
            let (mut usage, mut rss) = (0u64, 0u64);
            while let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
                // A process that has exited has no VmRSS.
                if status.contains("VmRSS:") {
                    rss = rss.max(rss_in(&status));
                }
                if let Some(Layout::V1 { memory: dir, .. } | Layout::V2(dir)) =
                    Some(cg.dirs_of(&id)).filter(|_| cg.procs(&id) == [pid])
                {
                    let file = match cg.version() {
                        1 => "memory.usage_in_bytes",
                        _ => "memory.current",
                    };
                    if let Some(n) = std::fs::read_to_string(dir.join(file))
                        .ok()
                        .and_then(|t| t.trim().parse().ok())
                    {
                        usage = usage.max(n);
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (usage, rss)
        })
    };
    let r = sh(
        c,
        id,
        "fill=$(( $(awk '/MemAvailable/ {print $2}' /proc/meminfo) / 1024 - 16 )) && \
         mkdir -p /mnt/fill && mount -t tmpfs -o size=100% tmpfs /mnt/fill && \
         dd if=/dev/zero of=/mnt/fill/data bs=1M count=$fill 2>/dev/null && \
         wc -c < /mnt/fill/data",
    )
    .await;
    assert_eq!(r.exit_code, 0, "{}", r.stderr);
    let fill: u64 = r.stdout.trim().parse().unwrap();
    assert!(fill > (mib / 2) << 20, "only {fill} bytes filled");
    // The VMM lived through it, and its guest still answers, its data whole.
    assert_eq!(vmm_pid(d, id), pid);
    assert_eq!(
        sh(c, id, "wc -c < /mnt/fill/data").await.stdout.trim(),
        fill.to_string()
    );
    let (after, peak) = memory_of(&cg, id);
    let oom_kills = match cg.dirs_of(id) {
        Layout::V2(dir) => std::fs::read_to_string(dir.join("memory.events")).unwrap(),
        Layout::V1 { memory, .. } => {
            std::fs::read_to_string(memory.join("memory.oom_control")).unwrap()
        }
    };
    assert!(oom_kills.contains("oom_kill 0"), "{oom_kills}");
    c.delete_machine(id).await.unwrap();
    let (sampled, rss) = sampler.await.unwrap();
    assert!(
        !cg.machines().contains(&id.to_string()),
        "the cgroup of {id} left"
    );
    d.assert_nothing_left(id).await;
    Filled {
        pid,
        fill,
        limit: (mib + overhead_mib) << 20,
        booted,
        after,
        peak,
        sampled,
        rss,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_guest_touching_all_its_ram_stays_within_its_vmm_limit() {
    const MIB: u64 = 256;
    let d = Daemon::start().await;
    let f = fill_ram(&d, "m1", MIB, OVERHEAD_MIB).await;
    eprintln!("guest RAM {MIB} MiB, default overhead: {f}");
    assert!(f.pid > 0);
    // Charged to its cgroup: the guest's RAM is the VMM's memory, which its default overhead
    // holds with room to spare.
    assert!(
        f.peak >= f.booted + f.fill / 2,
        "the cgroup does not show the guest's RAM: {f}"
    );
    assert!(f.peak <= f.limit && f.sampled <= f.limit, "{f}");
    assert!(f.rss <= f.limit, "the VMM's RSS over its limit: {f}");

    // With less room than its guest and QEMU need, the VMM is held at its limit (the kernel
    // writes its RAM file's pages back to the file), and neither dies nor grows.
    let tight = Daemon::start_with(&["--vmm-memory-overhead-mib", "48"]).await;
    let f = fill_ram(&tight, "m1", MIB, 48).await;
    eprintln!("guest RAM {MIB} MiB, 48 MiB overhead: {f}");
    assert!(f.peak <= f.limit, "{f}");
    assert!(
        f.peak + (32 << 20) >= f.limit,
        "the limit was never reached: {f}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn confinement_holds_across_snapshots_restores_forks_and_restarts() {
    let mut d = Daemon::start().await;
    let c = &d.client;
    c.create_machine(&create_req("m1")).await.unwrap();
    assert_confined(&d, "m1", 256, 1, OVERHEAD_MIB);
    start_counter(c, "m1").await;

    // A memory snapshot (its device state written through a descriptor QEMU was handed), then a
    // restore from it and a fork: each VMM as confined as the first.
    c.create_snapshot("m1", "s1", SnapshotKind::Memory)
        .await
        .unwrap();
    let vmstate = std::fs::metadata(d.path().join("snapshots/s1/vmstate")).unwrap();
    assert!(vmstate.len() > 0);
    assert_eq!(vmstate.uid(), 0);
    c.restore("s1", &restore_req("s1", "m2")).await.unwrap();
    assert_confined(&d, "m2", 256, 1, OVERHEAD_MIB);
    // QEMU maps the snapshot's RAM file private, but opens it for writing.
    let memory = std::fs::metadata(d.path().join("snapshots/s1/memory")).unwrap();
    assert_eq!(memory.uid(), vmm_user().uid.as_raw());
    let mark = read_counter(c, "m2").await;
    assert!(
        counter_passes(c, "m2", mark).await,
        "the restored counter does not run"
    );
    let fork = ForkRequest {
        machine_id: "m3".into(),
        guest_config: None,
        network: None,
        ports: None,
    };
    c.fork("m1", &fork).await.unwrap();
    assert_confined(&d, "m3", 256, 1, OVERHEAD_MIB);

    // A daemon restart finds every VMM again, in its cgroup, limits in place.
    let before: Vec<i32> = ["m1", "m2", "m3"].map(|id| vmm_pid(&d, id)).to_vec();
    d.restart().await;
    let c = &d.client;
    for (id, pid) in ["m1", "m2", "m3"].into_iter().zip(before) {
        assert_eq!(c.get_machine(id).await.unwrap().phase, Phase::Running);
        assert_eq!(assert_confined(&d, id, 256, 1, OVERHEAD_MIB), pid);
        assert_eq!(sh(c, id, "echo hi").await.stdout.trim(), "hi");
    }

    // A stop removes the cgroup; a start makes it again.
    c.stop_machine("m1").await.unwrap();
    assert!(!cgroups(&d).machines().contains(&"m1".to_string()));
    c.start_machine("m1").await.unwrap();
    assert_confined(&d, "m1", 256, 1, OVERHEAD_MIB);

    // A cgroup no machine owns, with a process in it (a VMM whose machine is gone): reconcile
    // kills the process and removes the cgroup.
    let ghost = cgroups(&d)
        .create("ghost", &Limits::for_machine(64, 1, 64))
        .unwrap();
    let mut sleeper = {
        use std::os::unix::process::CommandExt;
        let joiner = ghost.clone();
        // SAFETY: join_self only makes system calls.
        unsafe {
            std::process::Command::new("sleep")
                .arg("600")
                .pre_exec(move || joiner.join_self())
                .spawn()
                .unwrap()
        }
    };
    let swept = eventually(Duration::from_secs(20), async || {
        !cgroups(&d).machines().contains(&"ghost".to_string())
    })
    .await;
    assert!(swept, "the leftover cgroup stayed");
    assert!(
        sleeper.wait().unwrap().code().is_none(),
        "the leftover process was not killed"
    );
    for dir in ghost.dirs() {
        assert!(!dir.exists(), "{} left", dir.display());
    }

    for id in ["m1", "m2", "m3"] {
        c.delete_machine(id).await.unwrap();
        d.assert_nothing_left(id).await;
    }
    assert!(cgroups(&d).machines().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_daemon_refuses_what_it_cannot_confine() {
    let missing = daemon_refuses(&["--vmm-user", "hearth-no-such-user"]);
    assert!(
        missing.contains("the VMM user hearth-no-such-user does not exist")
            && missing.contains("useradd --system")
            && missing.contains("--vmm-user root"),
        "{missing}"
    );
    // A QEMU without the sandbox (here, a script that refuses `-sandbox` as such a QEMU does).
    let bin = tempfile::tempdir().unwrap();
    let fake = bin.path().join("qemu-without-seccomp");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho \"qemu: -sandbox $2: There is no option group 'sandbox'\" >&2\nexit 1\n",
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let refused = daemon_refuses(&["--qemu", fake.to_str().unwrap()]);
    assert!(
        refused.contains("has no seccomp sandbox") && refused.contains("no option group 'sandbox'"),
        "{refused}"
    );
    // cgroup v2 asked for where the unified hierarchy lacks the controllers (as on hosts with v1
    // controllers): refused, saying what there is.
    if let Err(e) = Cgroups::find(Mode::V2, "x") {
        let refused = daemon_refuses(&["--cgroups", "v2"]);
        assert!(refused.contains(&e.to_string()), "{refused}");
    }
    // A data root the VMM user cannot enter.
    let closed = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        closed.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    let root = closed.path().join("root");
    let refused = daemon_refuses_at(&root, &[]);
    assert!(
        refused.contains(&format!("cannot enter {}", closed.path().display())),
        "{refused}"
    );

    // Root VMMs and no cgroups only when asked for, with warnings; still sandboxed.
    let d = Daemon::start_with(&["--vmm-user", "root", "--cgroups", "off"]).await;
    assert_eq!(d.log_count("VMMs run as root"), 1);
    assert_eq!(d.log_count("--cgroups off: VMMs run without"), 1);
    d.client.create_machine(&create_req("m1")).await.unwrap();
    let pid = vmm_pid(&d, "m1");
    assert_eq!(status_field(pid, "Uid"), "0 0 0 0");
    assert_eq!(status_field(pid, "Seccomp"), "2");
    let theirs = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(!theirs.contains("/vm-m1"), "{theirs}");
    d.client.delete_machine("m1").await.unwrap();
    d.assert_nothing_left("m1").await;
}
