//! hearthd: the hearth host daemon.

pub mod access;
pub mod agent;
pub mod api;
pub mod artifacts;
pub mod blobs;
pub mod cgroup;
pub mod config;
pub mod error;
pub mod failpoint;
pub mod host;
pub mod net;
pub mod service;
pub mod storage;
pub mod store;
pub mod tcp;
pub mod vmm;

use access::Caller;
use anyhow::{Context, Result};
use config::Config;
use service::Service;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;

/// Builds the configured VMM backends. QEMU must have its seccomp sandbox; it runs as
/// `--vmm-user`, which must exist and be able to reach the data root (and /dev/kvm under KVM).
pub fn make_vmms(cfg: &Config) -> Result<vmm::Vmms> {
    let accel = host::choose_accel(cfg.accel);
    let tsc_khz = cfg.tsc_khz.unwrap_or_else(host::measure_tsc_khz);
    vmm::qemu::check_sandbox(&cfg.qemu)?;
    let user = vmm::user::VmmUser::lookup(&cfg.vmm_user).map_err(|e| anyhow::anyhow!(e.message))?;
    match &user {
        Some(user) => {
            std::fs::create_dir_all(&cfg.root)
                .with_context(|| format!("creating {}", cfg.root.display()))?;
            user.check_reaches(&cfg.root)
                .map_err(|e| anyhow::anyhow!(e.message))?;
            if accel == host::Accel::Kvm {
                user.check_kvm().map_err(|e| anyhow::anyhow!(e.message))?;
            }
        }
        None => tracing::warn!(
            "VMMs run as root (--vmm-user {}), jailed or not: a guest that escapes into its VMM \
             owns the host",
            cfg.vmm_user
        ),
    }
    tracing::info!(?accel, tsc_khz, user = %cfg.vmm_user, "QEMU backend");
    let mut backends: Vec<Arc<dyn vmm::Vmm>> = vec![Arc::new(vmm::qemu::Qemu {
        version: vmm::version_of(&cfg.qemu),
        binary: cfg.qemu.clone(),
        accel,
        tsc_khz,
        console_log_bytes: cfg.console_log_bytes,
        user: user.clone(),
        clone: cfg.clone,
    })];
    let firecracker = match (&cfg.firecracker, cfg.vmm) {
        (Some(binary), _) => Some(binary.clone()),
        (None, hearth_api::VmmKind::Firecracker) => Some(on_path("firecracker")?),
        (None, hearth_api::VmmKind::Qemu) => None,
    };
    if let Some(binary) = firecracker {
        let version = vmm::version_of(&binary);
        anyhow::ensure!(
            vmm::firecracker::supported(&version),
            "{} is not Firecracker 1.13 or later (`--version` says {version:?})",
            binary.display()
        );
        tracing::info!(%version, jailed = cfg.jailer.is_some(), "Firecracker backend");
        backends.push(Arc::new(vmm::firecracker::Firecracker {
            // The jailer copies it into each chroot by this path: absolute, not looked up.
            binary: std::fs::canonicalize(&binary)
                .with_context(|| format!("finding {}", binary.display()))?,
            version,
            jail: cfg.jailer.clone().map(|jailer| vmm::firecracker::Jail {
                jailer,
                chroot_base: cfg.root.join("jail"),
            }),
            user,
            console_log_bytes: cfg.console_log_bytes,
            clone: cfg.clone,
        }));
    }
    Ok(vmm::Vmms::new(cfg.vmm, backends))
}

/// `name` as found on `PATH`.
fn on_path(name: &str) -> Result<PathBuf> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(name))
        .find(|path| path.is_file())
        .with_context(|| format!("no {name} on PATH (give its path with --{name})"))
}

/// Runs the daemon until SIGINT or SIGTERM. Machines keep running after it exits.
pub async fn run(cfg: Config) -> Result<()> {
    // First, so that a token file others may read stops the daemon before it does anything.
    // Every listener is bound before any serves: a client that sees one answer sees all.
    let tcp = match cfg.listen {
        Some(addr) => Some(tcp::TcpApi::bind(&cfg, addr).await?),
        None => None,
    };
    let vmms = make_vmms(&cfg)?;
    std::fs::create_dir_all(&cfg.root)
        .with_context(|| format!("creating {}", cfg.root.display()))?;
    let tag = net::tag_of(&cfg.root)?;
    let net = if cfg.no_network {
        None
    } else {
        let egress = cfg
            .egress_interface
            .clone()
            .or_else(net::default_route_interface)
            .context("no default route to take egress from: give --egress-interface")?;
        let dns = cfg.dns.clone().unwrap_or_else(net::host_dns);
        tracing::info!(pool = %cfg.net_pool, %egress, ?dns, "machine networks");
        let cfg = net::NetConfig {
            tag: tag.clone(),
            pool: cfg.net_pool,
            egress_interface: egress,
            dns,
        };
        Some(
            net::Net::new(cfg)
                .await
                .map_err(|e| anyhow::anyhow!("{} (or run with --no-network)", e.message))?,
        )
    };
    let cgroups = cgroup::Cgroups::setup(cfg.cgroups, &tag)?;
    if cgroups.is_none() {
        tracing::warn!("--cgroups off: VMMs run without memory, CPU or pids limits");
    }
    let svc =
        Service::new(cfg.clone(), vmms, net, cgroups).map_err(|e| anyhow::anyhow!(e.message))?;
    svc.recover().await;
    svc.spawn_reconciler();

    let socket = cfg.socket_path();
    if let Some(parent) = socket.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let _ = std::fs::remove_file(&socket);
    let unix = tokio::net::UnixListener::bind(&socket)
        .with_context(|| format!("binding {}", socket.display()))?;
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o660))?;

    let mut servers = tokio::task::JoinSet::new();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown().await;
        let _ = stop_tx.send(true);
    });
    if let Some(tcp) = tcp {
        let app = api::router(svc.clone(), Caller::Remote);
        tcp.spawn(app, stopped(stop_rx.clone()), &mut servers)?;
    }
    let app = api::router(svc.clone(), Caller::Local);
    tracing::info!(socket = %socket.display(), root = %cfg.root.display(), "hearthd listening");
    let unix_server = axum::serve(unix, app).with_graceful_shutdown(stopped(stop_rx.clone()));
    servers.spawn(std::future::IntoFuture::into_future(unix_server));
    // Followed output, watches and attached terminals never end by themselves: they get a
    // moment to finish, then the daemon exits under them (the processes run on in the guests).
    let deadline = async {
        stopped(stop_rx).await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            res = servers.join_next() => match res {
                Some(res) => res??,
                None => break,
            },
            _ = &mut deadline => {
                tracing::info!("closing the connections still open");
                break;
            }
        }
    }
    svc.release_host_network();
    svc.release_cgroups();
    let _ = std::fs::remove_file(&socket);
    Ok(())
}

/// How long open connections may run on after a shutdown signal.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

async fn stopped(mut rx: tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

async fn shutdown() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down; machines keep running");
}
