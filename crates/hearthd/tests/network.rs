//! Every machine on a network of its own, with real namespaces, veths, taps and nftables. All
//! traffic stays on this host: machines leave only through a fake uplink namespace the test
//! makes (its HTTP server is the only thing they may reach), and the host reaches them through
//! published ports on loopback and their host-side addresses.

mod common;

use common::*;
use hearth_api::client::Client;
use hearth_api::{Egress, ErrorCode, NetworkRequest, Phase, PublishPortRequest, SnapshotKind};
use std::process::Command;

fn port_req(id: &str, port: u32, host_port: Option<u32>) -> PublishPortRequest {
    PublishPortRequest {
        published_port_id: id.to_string(),
        name: None,
        port,
        protocol: None,
        host_port,
    }
}

/// Starts busybox httpd on port 80 of machine `id`, serving `page` (kept on its disk).
async fn serve(c: &Client, id: &str, page: &str) {
    let r = sh(
        c,
        id,
        &format!("mkdir -p /www && echo {page} > /www/index.html && httpd -p 80 -h /www"),
    )
    .await;
    assert_eq!(r.exit_code, 0, "{r:?}");
}

/// What machine `id` gets from `GET /` at `addr:port`, or None when it cannot connect. (The
/// image's busybox wget crashes at start, a bug of Debian's static build; `nc` speaks HTTP.)
async fn fetch(c: &Client, id: &str, addr: &str, port: u16) -> Option<String> {
    let r = sh(
        c,
        id,
        &format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {addr} {port}"),
    )
    .await;
    let body = r.stdout.split("\r\n\r\n").nth(1)?;
    Some(body.trim().to_string())
}

async fn page_at(url: &str) -> Option<String> {
    http_get(url).await.map(|b| b.trim().to_string())
}

fn egress(policy: Egress, allow: &[&str]) -> NetworkRequest {
    NetworkRequest {
        enabled: None,
        egress: Some(policy),
        allow_cidrs: Some(allow.iter().map(|s| s.to_string()).collect()),
        deny_cidrs: None,
    }
}

/// Names of network namespaces and links on the host.
fn netns_names() -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

fn link_names() -> Vec<String> {
    let out = Command::new("ip").args(["-o", "link"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .collect()
}

/// The daemon's namespaces and veths (named by its tag) are exactly those of `machines`.
async fn assert_networks_of(d: &Daemon, tag: &str, machines: &[&str]) {
    let mut want: Vec<String> = Vec::new();
    for id in machines {
        let m = d.client.get_machine(id).await.unwrap();
        want.push(m.network.expect("a network").namespace);
    }
    want.sort();
    let mut have: Vec<String> = netns_names()
        .into_iter()
        .filter(|n| n.starts_with(&format!("hearth-{tag}-")))
        .collect();
    have.sort();
    assert_eq!(have, want, "network namespaces");
    let veths = link_names()
        .into_iter()
        .filter(|n| n.starts_with(&format!("h{tag}")))
        .count();
    assert_eq!(veths, machines.len(), "host veths");
}

#[tokio::test(flavor = "multi_thread")]
async fn machines_on_networks_of_their_own() {
    let up = Uplink::start().await;
    let mut d = Daemon::start_with(&up.daemon_args()).await;
    let c = d.client.clone();

    // A machine with a published port: the same guest address as every machine, its own
    // host-side address.
    let mut req = create_req("web");
    req.ports = Some(vec![port_req("http", 80, None)]);
    let web = c.create_machine(&req).await.unwrap();
    let net = web.network.clone().expect("a network");
    assert_eq!(net.guest_ip, "169.254.0.21");
    assert_eq!(web.runtime_host.as_deref(), Some(net.host_ip.as_str()));
    let tag = net.namespace.split('-').nth(1).unwrap().to_string();
    let web_port = web.ports[0].host_port.unwrap();
    serve(&c, "web", "web").await;

    // The guest fetches a page from the uplink; the host reaches the guest's server through the
    // published port and at its host-side address.
    assert_eq!(
        fetch(&c, "web", &up.addr, up.port).await.as_deref(),
        Some(UPLINK_PAGE)
    );
    let web_url = format!("http://127.0.0.1:{web_port}/");
    assert_eq!(page_at(&web_url).await.as_deref(), Some("web"));
    let direct = format!("http://{}/", net.host_ip);
    assert_eq!(page_at(&direct).await.as_deref(), Some("web"));

    // Isolation: a server on every host address, which the guest must not reach; nor the
    // metadata address.
    let host_server = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let host_port = host_server.local_addr().unwrap().port();
    let pool_host_end = {
        let ip: std::net::Ipv4Addr = net.host_ip.parse().unwrap();
        std::net::Ipv4Addr::from(u32::from(ip) - 1).to_string()
    };
    for target in [up.host_addr.as_str(), pool_host_end.as_str()] {
        assert_eq!(fetch(&c, "web", target, host_port).await, None, "{target}");
    }
    assert_eq!(fetch(&c, "web", "169.254.169.254", 80).await, None);

    // Egress policy, changed live: deny blocks the uplink while the published port answers;
    // an allowed CIDR opens it again.
    let m = c
        .set_network("web", &egress(Egress::Deny, &[]))
        .await
        .unwrap();
    assert_eq!(m.network.unwrap().egress, Egress::Deny);
    assert_eq!(fetch(&c, "web", &up.addr, up.port).await, None);
    assert_eq!(page_at(&web_url).await.as_deref(), Some("web"));
    let allowed = format!("{}/32", up.addr);
    c.set_network("web", &egress(Egress::Deny, &[&allowed]))
        .await
        .unwrap();
    assert_eq!(
        fetch(&c, "web", &up.addr, up.port).await.as_deref(),
        Some(UPLINK_PAGE)
    );
    c.set_network("web", &egress(Egress::Allow, &[]))
        .await
        .unwrap();
    let bad = NetworkRequest {
        deny_cidrs: Some(vec!["10.0.0.0/33".into()]),
        ..Default::default()
    };
    let err = c.set_network("web", &bad).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Invalid), "{err}");

    // Two machines from one snapshot taken while the server ran: side by side with the same
    // guest address, each serving through its own port, both reaching the uplink at once.
    c.create_snapshot("web", "s1", SnapshotKind::Memory)
        .await
        .unwrap();
    let mut ports = Vec::new();
    for id in ["a", "b"] {
        let mut r = restore_req("s1", id);
        r.ports = Some(vec![port_req("http", 80, None)]);
        let m = c.restore("s1", &r).await.unwrap();
        assert_eq!(m.network.as_ref().unwrap().guest_ip, "169.254.0.21");
        ports.push(m.ports[0].host_port.unwrap());
    }
    for (id, port) in [("a", ports[0]), ("b", ports[1])] {
        let url = format!("http://127.0.0.1:{port}/");
        assert_eq!(page_at(&url).await.as_deref(), Some("web"), "{id}");
        sh(&c, id, &format!("echo {id} > /www/index.html")).await;
        assert_eq!(page_at(&url).await.as_deref(), Some(id));
    }
    assert_eq!(page_at(&web_url).await.as_deref(), Some("web"));
    let (fa, fb) = tokio::join!(
        fetch(&c, "a", &up.addr, up.port),
        fetch(&c, "b", &up.addr, up.port)
    );
    assert_eq!(
        (fa.as_deref(), fb.as_deref()),
        (Some(UPLINK_PAGE), Some(UPLINK_PAGE))
    );
    let b_ip = c.get_machine("b").await.unwrap().runtime_host.unwrap();
    assert_eq!(fetch(&c, "a", &b_ip, 80).await, None, "a reached b");
    assert_eq!(
        fetch(&c, "a", &net.host_ip, 80).await,
        None,
        "a reached web"
    );

    // A fork starts with no ports unless it asks for them.
    let f = c
        .fork(
            "web",
            &hearth_api::ForkRequest {
                machine_id: "f".into(),
                guest_config: None,
                network: None,
                ports: None,
            },
        )
        .await
        .unwrap();
    assert!(f.ports.is_empty());
    assert!(f.network.is_some());
    c.delete_machine("f").await.unwrap();

    // Published ports: bad input is refused and changes nothing.
    let cases = [
        (port_req("p0", 0, None), ErrorCode::Invalid),
        (port_req("big", 65536, None), ErrorCode::Invalid),
        (port_req("Bad/Id", 81, None), ErrorCode::Invalid),
        (port_req("http", 81, None), ErrorCode::Conflict),
        (
            port_req("taken", 81, Some(ports[0] as u32)),
            ErrorCode::Conflict,
        ),
        (port_req("hp0", 81, Some(70000)), ErrorCode::Invalid),
    ];
    for (req, code) in cases {
        let err = c.publish_port("web", &req).await.unwrap_err();
        assert_eq!(err.code(), Some(code), "{req:?}: {err}");
    }
    let mut udp = port_req("dns", 53, None);
    udp.protocol = Some("udp".into());
    let err = c.publish_port("web", &udp).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Invalid), "{err}");
    let err = c
        .publish_port("ghost", &port_req("x", 80, None))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound), "{err}");
    assert_eq!(c.list_ports("web").await.unwrap().len(), 1);
    let p2 = c
        .publish_port("web", &port_req("again", 80, None))
        .await
        .unwrap();
    assert_eq!(
        page_at(&format!("http://127.0.0.1:{}/", p2.host_port))
            .await
            .as_deref(),
        Some("web")
    );
    c.unpublish_port("web", "again").await.unwrap();
    let err = c.unpublish_port("web", "again").await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound));
    assert_eq!(c.list_ports("web").await.unwrap().len(), 1);

    // A create that fails once its network is made (its port's host port is taken) leaves
    // no namespace, veth or rule.
    let mut clash = create_req("clash");
    clash.ports = Some(vec![port_req("clash", 80, Some(ports[1] as u32))]);
    let err = c.create_machine(&clash).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Conflict), "{err}");
    d.assert_nothing_left("clash").await;
    assert_networks_of(&d, &tag, &["web", "a", "b"]).await;

    // Ports and networks outlive a daemon restart, and a stop and start.
    d.restart().await;
    assert_eq!(page_at(&web_url).await.as_deref(), Some("web"));
    c.stop_machine("web").await.unwrap();
    assert_eq!(page_at(&web_url).await, None);
    c.start_machine("web").await.unwrap();
    sh(&c, "web", "httpd -p 80 -h /www").await;
    assert_eq!(page_at(&web_url).await.as_deref(), Some("web"));
    assert_eq!(
        fetch(&c, "web", &up.addr, up.port).await.as_deref(),
        Some(UPLINK_PAGE)
    );

    // The daemon killed mid-create and mid-restore: after a restart nothing of either is
    // left, and the running machines still answer.
    d.set_env(&[("HEARTH_STALL_AT", "vmm-spawned")]);
    d.restart().await;
    let client = c.clone();
    let mut doomed = create_req("doomed");
    doomed.ports = Some(vec![port_req("doomed", 80, None)]);
    let create = tokio::spawn(async move { client.create_machine(&doomed).await });
    d.await_stall("vmm-spawned").await;
    d.set_env(&[("HEARTH_STALL_AT", "restore-running")]);
    d.restart().await;
    assert!(create.await.unwrap().is_err());
    d.assert_nothing_left("doomed").await;
    let client = c.clone();
    let restore =
        tokio::spawn(async move { client.restore("s1", &restore_req("s1", "doomed")).await });
    d.await_stall("restore-running").await;
    d.set_env(&[]);
    d.restart().await;
    assert!(restore.await.unwrap().is_err());
    d.assert_nothing_left("doomed").await;
    assert_networks_of(&d, &tag, &["web", "a", "b"]).await;
    let a_url = format!("http://127.0.0.1:{}/", ports[0]);
    assert_eq!(page_at(&a_url).await.as_deref(), Some("a"));
    assert_eq!(page_at(&web_url).await.as_deref(), Some("web"));

    // The host's table, removed by someone else, is written again by reconcile.
    let table = hearthd::net::host_table_name(&tag);
    let listed = || {
        Command::new("nft")
            .args(["list", "table", "inet", &table])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap()
            .success()
    };
    assert!(Command::new("nft")
        .args(["delete", "table", "inet", &table])
        .status()
        .unwrap()
        .success());
    let guarded = eventually(std::time::Duration::from_secs(15), async || listed()).await;
    assert!(guarded, "the host's table was not written again");

    // A namespace of this daemon's that no machine owns is removed by reconcile; another
    // daemon's (another tag) is not touched.
    let stray = format!("hearth-{tag}-000000000");
    let foreign = "hearth-ffff-000000000";
    for ns in [stray.as_str(), foreign] {
        assert!(Command::new("ip")
            .args(["netns", "add", ns])
            .status()
            .unwrap()
            .success());
    }
    let swept = eventually(std::time::Duration::from_secs(15), async || {
        !netns_names().contains(&stray)
    })
    .await;
    let foreign_kept = netns_names().iter().any(|n| n == foreign);
    let _ = Command::new("ip").args(["netns", "del", foreign]).status();
    assert!(swept, "the stray namespace was not removed");
    assert!(foreign_kept, "another daemon's namespace was removed");

    // Deleted machines leave no namespace, veth or port.
    for id in ["web", "a", "b"] {
        c.delete_machine(id).await.unwrap();
        d.assert_nothing_left(id).await;
    }
    assert_networks_of(&d, &tag, &[]).await;
    assert_eq!(page_at(&a_url).await, None);
    // The pool is reached only through machines' veths: a gone machine's address is not
    // routed anywhere else (the host's default route included).
    let gone: std::net::SocketAddr = format!("{}:80", net.host_ip).parse().unwrap();
    let connect = tokio::time::timeout(
        std::time::Duration::from_secs(3),
        tokio::net::TcpStream::connect(gone),
    )
    .await;
    assert!(!matches!(connect, Ok(Ok(_))), "{gone} answered");
    let phase = c.get_machine("web").await.map(|m| m.phase);
    assert!(phase.is_err() || phase.unwrap() != Phase::Running);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_machine_without_a_network_has_no_device() {
    let d = Daemon::start().await;
    let mut req = create_req("offline");
    req.network = Some(NetworkRequest {
        enabled: Some(false),
        ..Default::default()
    });
    let m = d.client.create_machine(&req).await.unwrap();
    assert!(m.network.is_none() && m.runtime_host.is_none());
    let r = sh(&d.client, "offline", "ls /sys/class/net").await;
    assert_eq!(r.stdout.split_whitespace().collect::<Vec<_>>(), ["lo"]);
    let err = d
        .client
        .publish_port("offline", &port_req("p", 80, None))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Conflict), "{err}");
    // Its restores and forks have none either, and cannot ask for one.
    let mut fork = hearth_api::ForkRequest {
        machine_id: "still-offline".into(),
        guest_config: None,
        network: Some(NetworkRequest {
            enabled: Some(true),
            ..Default::default()
        }),
        ports: None,
    };
    let err = d.client.fork("offline", &fork).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Invalid), "{err}");
    fork.network = None;
    let f = d.client.fork("offline", &fork).await.unwrap();
    assert!(f.network.is_none());
    for id in ["offline", "still-offline"] {
        d.client.delete_machine(id).await.unwrap();
        d.assert_nothing_left(id).await;
    }
}
