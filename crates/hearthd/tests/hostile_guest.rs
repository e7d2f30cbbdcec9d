//! A guest that turns on its own agent: a fork bomb and a memory hog run through exec. The
//! agent (PID 1) answers throughout, the workload's cgroup takes the blow, the process API still
//! works, and the machine still powers off cleanly.

mod common;

use common::*;
use hearth_api::{client::Client, ExecRequest, ExecResponse, Phase, SignalName, StartProcess};
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;

/// The bomb: every shell starts two more in the background and returns, forever; the first one
/// then becomes a `sleep` (no fork needed), so the exec lasts until its timeout kills the lot.
const FORK_BOMB: &str = "b(){ b|b& }; b; exec sleep 600";
const BOMB_MS: u64 = 15_000;
/// What an exec may take while the bomb runs (about 1 s here, under TCG).
const SLOWEST_EXEC: Duration = Duration::from_secs(10);
/// `tail` keeps the last line, and /dev/zero has no end of line: it grows until killed.
const MEMORY_HOG: &str = "cat /dev/zero | tail";
/// Counts the guest's processes without forking (a glob, in the shell the agent starts).
const COUNT: &str = "set -- /proc/[0-9]*; echo $#";
/// What the agent keeps out of the workload's reach (crates/hearth-agent/src/workload.rs).
const MEMORY_RESERVE: u64 = 48 << 20;

async fn timed_exec(c: &Client, req: &ExecRequest) -> (ExecResponse, Duration) {
    let t = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(60), c.exec("m1", req))
        .await
        .expect("exec answered within a minute")
        .expect("exec succeeded");
    (r, t.elapsed())
}

/// Runs `req` in the background.
fn spawn_exec(c: &Client, req: ExecRequest) -> JoinHandle<ExecResponse> {
    let c = c.clone();
    tokio::spawn(async move { timed_exec(&c, &req).await.0 })
}

async fn count(c: &Client) -> (u64, Duration) {
    let (r, took) = timed_exec(c, &cmd(&["sh", "-c", COUNT])).await;
    assert_eq!(r.exit_code, 0, "{r:?}");
    let n = r.stdout.trim().parse();
    (n.unwrap_or_else(|_| panic!("not a count: {r:?}")), took)
}

async fn read(c: &Client, path: &str) -> String {
    let r = sh(c, "m1", &format!("cat {path}")).await;
    assert_eq!(r.exit_code, 0, "{path}: {r:?}");
    r.stdout.trim().to_string()
}

async fn number(c: &Client, path: &str) -> u64 {
    let text = read(c, path).await;
    text.parse()
        .unwrap_or_else(|_| panic!("{path} is not a number: {text}"))
}

fn vmm_rss(d: &Daemon) -> u64 {
    d.vmm_pids().iter().map(|&p| rss_of(p as u32)).sum()
}

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

/// What the machine and the daemon did while a hostile command ran.
struct Load {
    /// An exec (a command started in the guest) after another.
    execs: Vec<Duration>,
    /// The agent's own work: the process list, no command started.
    lists: Vec<Duration>,
    /// The daemon's API: GET /machines.
    api: Vec<Duration>,
    most_processes: u64,
    vmm_rss: u64,
}

impl Load {
    /// Probes the machine and the daemon, one call after another, until `task` ends.
    async fn during<T>(d: &Daemon, task: &JoinHandle<T>) -> Load {
        let c = &d.client;
        let mut load = Load {
            execs: Vec::new(),
            lists: Vec::new(),
            api: Vec::new(),
            most_processes: 0,
            vmm_rss: 0,
        };
        while !task.is_finished() {
            let (n, took) = count(c).await;
            load.execs.push(took);
            load.most_processes = load.most_processes.max(n);
            let t = Instant::now();
            c.list_processes("m1").await.unwrap();
            load.lists.push(t.elapsed());
            let t = Instant::now();
            c.list_machines().await.unwrap();
            load.api.push(t.elapsed());
            load.vmm_rss = load.vmm_rss.max(vmm_rss(d));
        }
        load
    }

    fn print(self, what: &str) {
        fn summary(mut v: Vec<Duration>) -> String {
            v.sort();
            match v.len() {
                0 => "none".into(),
                n => format!("median {} ms, max {} ms", ms(v[n / 2]), ms(v[n - 1])),
            }
        }
        println!(
            "{what}: up to {} processes; {} execs: {}; process list: {}; GET /machines: {}; \
             VMM RSS up to {} MiB",
            self.most_processes,
            self.execs.len(),
            summary(self.execs),
            summary(self.lists),
            summary(self.api),
            self.vmm_rss >> 20
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_survives_its_guest() {
    let d = Daemon::start().await;
    let c = &d.client;
    c.create_machine(&create_req("m1")).await.unwrap();
    let (quiet, _) = count(c).await;
    let (_, quiet_exec) = count(c).await;
    println!(
        "quiet: {quiet} processes, exec {} ms, VMM RSS {} MiB",
        ms(quiet_exec),
        vmm_rss(&d) >> 20
    );

    // A process started before the bomb, in a cell of its own: neither the bomb's end (its
    // whole cell killed) nor the OOM killer touches it.
    let sleeper = StartProcess {
        command: ["sleep", "600"].map(String::from).to_vec(),
        tag: Some("sleeper".into()),
        ..Default::default()
    };
    c.start_process("m1", &sleeper).await.unwrap();

    // The fork bomb, killed by its timeout; meanwhile exec and the API answer.
    let bomb = spawn_exec(
        c,
        ExecRequest {
            timeout_ms: Some(BOMB_MS),
            ..cmd(&["sh", "-c", FORK_BOMB])
        },
    );
    let load = Load::during(&d, &bomb).await;
    let r = bomb.await.unwrap();
    assert!(r.timed_out, "{r:?}");
    // The bomb really went off: it filled the guest with shells.
    let most = load.most_processes;
    assert!(most > 300, "at most {most} processes during the bomb");
    // And the agent kept starting commands, each in well under the bomb's lifetime (without
    // the workload's limits one waited for the bomb's end, when the machine survived at all).
    let slowest = load.execs.iter().max().copied().unwrap_or_default();
    load.print("fork bomb");
    assert!(
        slowest < SLOWEST_EXEC,
        "an exec took {slowest:?} during the bomb"
    );
    // The timeout killed every shell of it, wherever it had put itself.
    let settled = eventually(Duration::from_secs(30), async || {
        count(c).await.0 <= quiet + 5
    })
    .await;
    assert!(
        settled,
        "the bomb outlived its timeout: {}",
        count(c).await.0
    );
    println!("exec after the bomb: {} ms", ms(count(c).await.1));

    // The memory hog: the workload's cgroup OOM-kills it.
    let hog = spawn_exec(c, cmd(&["sh", "-c", MEMORY_HOG]));
    let load = Load::during(&d, &hog).await;
    let r = hog.await.unwrap();
    assert_eq!(r.exit_code, 137, "{r:?}");
    load.print("memory hog");
    println!("exec after the hog: {} ms", ms(count(c).await.1));

    // The workload's limits: memory leaves the agent and kernel their reserve, pids stay below
    // what the kernel can make at all.
    let mem_total: u64 = read(c, "/proc/meminfo")
        .await
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("MemTotal");
    let memory_max = number(c, "/sys/fs/cgroup/workload/memory.max").await;
    assert_eq!(memory_max, mem_total * 1024 - MEMORY_RESERVE);
    let pids_max = number(c, "/sys/fs/cgroup/workload/pids.max").await;
    let threads_max = number(c, "/proc/sys/kernel/threads-max").await;
    assert!(pids_max < threads_max, "{pids_max} of {threads_max}");
    println!(
        "workload: memory.max {} of {} MiB, pids.max {pids_max} of {threads_max} threads",
        memory_max >> 20,
        mem_total >> 10
    );
    // The bomb and the hog met them: forks refused, a process OOM-killed, inside the workload.
    let log = sh(c, "m1", "dmesg").await.stdout;
    assert!(
        log.contains("fork rejected by pids controller in /workload/"),
        "the bomb never met pids.max: {log}"
    );
    let events = read(c, "/sys/fs/cgroup/workload/memory.events").await;
    let kills: u64 = events
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(kills >= 1, "{events}");
    // Commands run in cgroups of their own under the workload's, at the usual OOM score; the
    // agent is the one process the OOM killer never picks.
    let cgroup = read(c, "/proc/self/cgroup").await;
    assert!(cgroup.starts_with("0::/workload/"), "{cgroup}");
    assert_eq!(read(c, "/proc/self/oom_score_adj").await, "0");
    assert_eq!(read(c, "/proc/1/oom_score_adj").await, "-1000");
    // The cells of the hundreds of commands run so far are gone: only the sleeper's and this
    // command's are left.
    let cells = sh(c, "m1", "echo /sys/fs/cgroup/workload/*/").await.stdout;
    assert_eq!(cells.split_whitespace().count(), 2, "{cells}");

    // The process API: the sleeper lived through both, a new process runs, signals work.
    let p = c.get_process("m1", "sleeper").await.unwrap();
    assert!(p.running, "{p:?}");
    let echo = StartProcess {
        command: ["echo", "alive"].map(String::from).to_vec(),
        ..Default::default()
    };
    let pid = c.start_process("m1", &echo).await.unwrap().pid.to_string();
    let exited = eventually(Duration::from_secs(30), async || {
        !c.get_process("m1", &pid).await.unwrap().running
    })
    .await;
    assert!(exited, "echo never exited");
    let p = c.get_process("m1", &pid).await.unwrap();
    assert_eq!((p.exit_code, p.output_bytes), (Some(0), 6), "{p:?}");
    c.signal_process("m1", "sleeper", SignalName::Name("TERM".into()))
        .await
        .unwrap();
    let stopped = eventually(Duration::from_secs(30), async || {
        !c.get_process("m1", "sleeper").await.unwrap().running
    })
    .await;
    assert!(stopped, "the sleeper ignored SIGTERM");

    // And the machine powers off cleanly, through its agent.
    c.stop_machine("m1").await.unwrap();
    assert_eq!(c.get_machine("m1").await.unwrap().phase, Phase::Stopped);
    assert_eq!(d.log_count("did not power off in time"), 0, "{}", d.log());
}
