//! `hearth-bench net`: TCP throughput through a machine's network — guest → an uplink (a
//! namespace of the bench's own, standing in for the world) and host → guest through a
//! published port — against the same guest image on a plain tap in the host's namespace, with
//! no namespace and no NAT, in the same run; and what a network adds to create → running and
//! to restore → running. All traffic stays on this host.

use super::{image_artifact, median, ms, qemu, Daemon};
use anyhow::{ensure, Context, Result};
use hearth_api::{
    CreateMachineRequest, ExecRequest, NetworkRequest, PublishPortRequest, RestoreRequest,
    SnapshotKind,
};
use hearth_proto::{Configure, GuestNetwork, Op, Reply};
use hearthd::agent::AgentClient;
use hearthd::vmm::qemu::{MemoryBacking, Start};
use hearthd::vmm::{process, NetAttach};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const SINK_PORT: u16 = 9000;
const GUEST_PORT: u16 = 5000;

fn ip(args: &[&str]) -> Result<()> {
    let ok = Command::new("ip").args(args).status()?;
    ensure!(ok.success(), "ip {} failed", args.join(" "));
    Ok(())
}

/// The bench's links and namespace, removed when dropped.
struct Links {
    uplink_ns: String,
    uplink_veth: String,
    tap: String,
}

impl Drop for Links {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.uplink_veth])
            .status();
        let _ = Command::new("ip").args(["link", "del", &self.tap]).status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.uplink_ns])
            .status();
    }
}

/// A TCP sink on `addr` inside namespace `ns` (the host's when None): accepts one connection,
/// reads it to the end, and returns the bytes and the time from its first byte to its end.
fn sink(ns: Option<String>, addr: String) -> std::sync::mpsc::Receiver<Result<(u64, Duration)>> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let run = || -> Result<(u64, Duration)> {
            if let Some(ns) = ns {
                let f = std::fs::File::open(format!("/run/netns/{ns}"))?;
                nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)?;
            }
            let listener = TcpListener::bind(&addr)?;
            let (mut conn, _) = listener.accept()?;
            let mut buf = vec![0u8; 1 << 20];
            let n = conn.read(&mut buf)?;
            let t = Instant::now();
            let mut total = n as u64;
            loop {
                match conn.read(&mut buf)? {
                    0 => break,
                    n => total += n as u64,
                }
            }
            Ok((total, t.elapsed()))
        };
        let _ = tx.send(run());
    });
    rx
}

fn mib_per_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / d.as_secs_f64()
}

/// Writes `mib` MiB to `addr` (retrying the connect while the listener comes up) and waits
/// for the far end to close; returns the time from connect to close.
fn push(addr: &str, mib: u64) -> Result<Duration> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut conn = loop {
        match TcpStream::connect(addr) {
            Ok(c) => break c,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(e).context(format!("connecting {addr}")),
        }
    };
    let t = Instant::now();
    let block = vec![0x5au8; 1 << 20];
    for _ in 0..mib {
        conn.write_all(&block)?;
    }
    conn.shutdown(std::net::Shutdown::Write)?;
    let mut rest = Vec::new();
    conn.read_to_end(&mut rest)?;
    Ok(t.elapsed())
}

/// Guest → sink at `addr`: `mib` MiB of zeros through busybox nc; the sink's throughput.
fn send_script(addr: &str, mib: u64) -> String {
    format!(
        "dd if=/dev/zero bs=64k count={} 2>/dev/null | nc -w 5 {addr} {SINK_PORT}",
        mib * 16
    )
}

/// A sink on the guest's port 5000, in a session of its own (it outlives the exec), and
/// listening before the exec returns.
const LISTEN_SCRIPT: &str = "setsid nc -l -p 5000 >/dev/null 2>&1 & \
    for i in $(seq 100); do netstat -ltn | grep -q ':5000 ' && exit 0; sleep 0.05; done; exit 1";

pub async fn run(image: &Path, mib: u64, rounds: usize) -> Result<()> {
    let pid = std::process::id() % 100_000;
    let links = Links {
        uplink_ns: format!("hbench-up{pid}"),
        uplink_veth: format!("hbu{pid}"),
        tap: format!("hbt{pid}"),
    };
    let (up_host, up_addr) = ("198.19.127.1", "198.19.127.2");
    ip(&["netns", "add", &links.uplink_ns])?;
    ip(&[
        "link",
        "add",
        &links.uplink_veth,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        &links.uplink_ns,
    ])?;
    ip(&[
        "addr",
        "add",
        &format!("{up_host}/30"),
        "dev",
        &links.uplink_veth,
    ])?;
    ip(&["link", "set", &links.uplink_veth, "up"])?;
    ip(&[
        "-n",
        &links.uplink_ns,
        "addr",
        "add",
        &format!("{up_addr}/30"),
        "dev",
        "eth0",
    ])?;
    ip(&["-n", &links.uplink_ns, "link", "set", "eth0", "up"])?;

    let work = tempfile::Builder::new()
        .prefix("hbench")
        .tempdir_in("/tmp")?;
    let daemon = Daemon::start_with(
        &work.path().join("root"),
        image,
        &[
            "--egress-interface",
            &links.uplink_veth,
            "--dns",
            up_addr,
            "--net-pool",
            "198.19.201.0/24",
        ],
    )
    .await?;
    let c = &daemon.client;
    let artifact = image_artifact(image);
    let create = |id: &str, network: bool| CreateMachineRequest {
        machine_id: id.to_string(),
        artifact: artifact.clone(),
        memory_mib: Some(512),
        vcpus: Some(1),
        storage_bytes: None,
        user_volume_ids: None,
        guest_config: None,
        network: (!network).then(|| NetworkRequest {
            enabled: Some(false),
            ..Default::default()
        }),
        ports: network.then(|| {
            vec![PublishPortRequest {
                published_port_id: "bench".into(),
                name: None,
                port: GUEST_PORT.into(),
                protocol: None,
                host_port: None,
            }]
        }),
        vmm: None,
        // Booted, as the plain tap's guest is.
        cold: Some(true),
    };

    // Through hearth's network, and the same guest on a plain tap in the host's namespace (no
    // namespace, veth or NAT), alternating; the medians of three.
    let (mut hearth_out, mut hearth_in, mut plain_out, mut plain_in) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..3 {
        let id = format!("net{i}");
        let m = c.create_machine(&create(&id, true)).await?;
        let host_port = m.ports[0].host_port.context("a host port")?;
        let rx = sink(
            Some(links.uplink_ns.clone()),
            format!("{up_addr}:{SINK_PORT}"),
        );
        std::thread::sleep(Duration::from_millis(100));
        let req = |script: String| ExecRequest {
            command: vec!["sh".into(), "-c".into(), script],
            ..Default::default()
        };
        let r = c.exec(&id, &req(send_script(up_addr, mib))).await?;
        ensure!(r.exit_code == 0, "guest send: {}", r.stderr);
        let (bytes, took) = rx.recv()??;
        ensure!(bytes == mib << 20, "the uplink got {bytes} bytes");
        hearth_out.push(mib_per_s(bytes, took));
        let r = c.exec(&id, &req(LISTEN_SCRIPT.into())).await?;
        ensure!(r.exit_code == 0, "the guest's listener did not start");
        let addr = format!("127.0.0.1:{host_port}");
        let took = tokio::task::spawn_blocking(move || push(&addr, mib)).await??;
        hearth_in.push(mib_per_s(mib << 20, took));
        c.delete_machine(&id).await?;

        let (out, inward) = plain_tap(
            image,
            &links.tap,
            &work.path().join(format!("plain{i}")),
            mib,
        )
        .await?;
        plain_out.push(out);
        plain_in.push(inward);
    }
    let mid = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (hearth_out, hearth_in) = (mid(&mut hearth_out), mid(&mut hearth_in));
    let (plain_out, plain_in) = (mid(&mut plain_out), mid(&mut plain_in));

    // create → running with and without a network, alternating.
    let (mut with, mut without) = (Vec::new(), Vec::new());
    for i in 0..rounds {
        for (network, times) in [(true, &mut with), (false, &mut without)] {
            let id = format!("c{i}{}", if network { "n" } else { "x" });
            let t = Instant::now();
            c.create_machine(&create(&id, network)).await?;
            times.push(t.elapsed());
            c.delete_machine(&id).await?;
        }
    }
    let (create_with, create_without) = (median(&mut with), median(&mut without));

    // restore → running, from a snapshot of a machine with a network and of one without.
    for (id, network) in [("src-n", true), ("src-x", false)] {
        c.create_machine(&create(id, network)).await?;
        c.create_snapshot(id, &format!("{id}-s"), SnapshotKind::Memory)
            .await?;
        c.delete_machine(id).await?;
    }
    let restore = |snap: &str, id: &str| RestoreRequest {
        machine_id: id.to_string(),
        artifact: artifact.clone(),
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
    };
    let (mut rwith, mut rwithout) = (Vec::new(), Vec::new());
    // The daemon's own phases (Server-Timing), to tell the namespace's cost from the NIC's.
    let (mut pwith, mut pwithout): (Vec<Vec<(String, f64)>>, Vec<_>) = (Vec::new(), Vec::new());
    for i in 0..rounds {
        for (snap, times, phases) in [
            ("src-n-s", &mut rwith, &mut pwith),
            ("src-x-s", &mut rwithout, &mut pwithout),
        ] {
            let id = format!("r{i}{snap}");
            let t = Instant::now();
            let (_, timing) = c.restore_timed(snap, &restore(snap, &id)).await?;
            times.push(t.elapsed());
            phases.push(timing);
            c.delete_machine(&id).await?;
        }
    }
    let (restore_with, restore_without) = (median(&mut rwith), median(&mut rwithout));
    let phase = |runs: &[Vec<(String, f64)>], name: &str| {
        let mut v: Vec<f64> = runs
            .iter()
            .filter_map(|r| r.iter().find(|(n, _)| n == name).map(|(_, ms)| *ms))
            .collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };

    println!(
        "network benchmark ({mib} MiB per transfer, medians of 3; {rounds} rounds of create and restore; 512 MiB guest)"
    );
    let line = |what: &str, hearth: f64, plain: f64, target: f64| {
        let ratio = hearth / plain;
        println!(
            "  {what:<32} hearth {hearth:>7.1} MiB/s  plain tap {plain:>7.1} MiB/s  ratio {ratio:.2} (target ≥ {target}: {})",
            if ratio >= target { "met" } else { "NOT met" }
        );
    };
    line("guest → uplink (NAT out)", hearth_out, plain_out, 0.9);
    line("host → guest (published port)", hearth_in, plain_in, 0.9);
    let ratio = create_with.as_secs_f64() / create_without.as_secs_f64();
    println!(
        "  create → running                 with {:>10}  without {:>10}  ratio {ratio:.3} (target ≤ 1.1: {})",
        ms(create_with),
        ms(create_without),
        if ratio <= 1.1 { "met" } else { "NOT met" }
    );
    let added = restore_with.as_secs_f64() - restore_without.as_secs_f64();
    println!(
        "  restore → agent ready            with {:>10}  without {:>10}  added {:.1} ms (target ≤ 20 ms: {})",
        ms(restore_with),
        ms(restore_without),
        added * 1000.0,
        if added <= 0.020 { "met" } else { "NOT met" }
    );
    for (what, runs) in [("with", &pwith), ("without", &pwithout)] {
        println!(
            "    phases {what:<8} disks (and namespace) {:>6.1} ms  VMM running {:>6.1} ms  agent {:>6.1} ms",
            phase(runs, "disks"),
            phase(runs, "running"),
            phase(runs, "agent"),
        );
    }
    drop(daemon);
    drop(links);
    Ok(())
}

/// The same transfers with the image booted by plain QEMU on a tap in the host's namespace
/// (the guest at 169.254.0.21, the host at .22 on the tap), configured through its agent.
async fn plain_tap(image: &Path, tap: &str, dir: &Path, mib: u64) -> Result<(f64, f64)> {
    if !Path::new("/sys/class/net").join(tap).exists() {
        ip(&["tuntap", "add", "dev", tap, "mode", "tap", "vnet_hdr"])?;
        ip(&["addr", "add", "169.254.0.22/30", "dev", tap])?;
        ip(&["link", "set", tap, "up"])?;
    }
    let mut spec = super::raw_machine(image, dir, 512)?;
    spec.network = Some(NetAttach {
        netns: "/proc/self/ns/net".into(),
        tap: tap.to_string(),
        mac: hearthd::net::GUEST_MAC.to_string(),
    });
    let paths = spec.paths.clone();
    let memory = MemoryBacking::SharedFile(paths.memory());
    let proc = qemu()
        .spawn(&spec, &memory, Start::Boot)
        .await
        .map_err(|e| anyhow::anyhow!("plain QEMU failed: {e}"))?;
    let result = async {
        let agent = AgentClient::new(tokio::net::UnixStream::connect(paths.agent_socket()).await?);
        let deadline = Instant::now() + Duration::from_secs(60);
        agent
            .handshake("bench", deadline, || process::is_alive(&proc), || None)
            .await
            .map_err(|e| anyhow::anyhow!(e.message))?;
        let network = GuestNetwork {
            interface: "eth0".into(),
            address: hearthd::net::GUEST_ADDR.to_string(),
            prefix_len: hearthd::net::GUEST_PREFIX,
            gateway: hearthd::net::GATEWAY_ADDR.to_string(),
            mtu: hearthd::net::MTU,
            dns: Vec::new(),
        };
        let configure = Op::Configure(Configure {
            network: Some(network),
            ..Default::default()
        });
        agent
            .call(configure, Some(Duration::from_secs(10)))
            .await
            .map_err(|e| anyhow::anyhow!(e.message))?;
        let sh = |script: String| {
            Op::Exec(hearth_proto::ExecRequest {
                command: vec!["sh".into(), "-c".into(), script],
                output_limit: 4096,
                ..Default::default()
            })
        };
        let rx = sink(None, format!("169.254.0.22:{SINK_PORT}"));
        std::thread::sleep(Duration::from_millis(100));
        let reply = agent
            .call(
                sh(send_script("169.254.0.22", mib)),
                Some(Duration::from_secs(300)),
            )
            .await
            .map_err(|e| anyhow::anyhow!(e.message))?;
        if let Reply::Exec(r) = reply {
            ensure!(r.exit_code == 0, "plain guest send failed");
        }
        let (bytes, took) = rx.recv()??;
        ensure!(bytes == mib << 20, "the plain sink got {bytes} bytes");
        let out = mib_per_s(bytes, took);
        let reply = agent
            .call(sh(LISTEN_SCRIPT.into()), Some(Duration::from_secs(10)))
            .await
            .map_err(|e| anyhow::anyhow!(e.message))?;
        if let Reply::Exec(r) = reply {
            ensure!(r.exit_code == 0, "the plain guest's listener did not start");
        }
        let addr = format!("{}:{GUEST_PORT}", hearthd::net::GUEST_ADDR);
        let took = tokio::task::spawn_blocking(move || push(&addr, mib)).await??;
        Ok::<_, anyhow::Error>((out, mib_per_s(mib << 20, took)))
    }
    .await;
    process::kill_and_wait(&proc).await;
    result
}
