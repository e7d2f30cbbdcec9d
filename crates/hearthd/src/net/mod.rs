//! Every machine on a network of its own. Each machine gets a network namespace holding a tap
//! (the same name, MAC and addresses in every machine, so a restored or forked guest needs no
//! re-addressing) and one end of a veth pair whose other end is on the host, with a per-machine
//! address pair from the pool. NAT in the namespace maps the guest to the namespace's address
//! (its `host_ip`, which the host reaches it at); the host masquerades the pool on the egress
//! interface. Nothing here knows which VMM runs: a backend is handed the namespace and the tap.
//!
//! ```text
//!  guest eth0 169.254.0.21 ── tap0 169.254.0.22 ┐ namespace hearth-<tag>-<key>
//!                                 SNAT/DNAT ↔ eth0 198.18.0.1 ┐ (veth)
//!                              host: h<tag><key> 198.18.0.0 ─┘── egress interface (masquerade)
//! ```

mod links;
pub use links::open_tap;
mod netns;
pub mod ports;
mod rules;

pub use rules::{host_table_name, EgressPolicy};

use crate::error::{Error, Result};
use ipnet::Ipv4Net;
use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::path::PathBuf;

/// The guest's address, the same in every machine.
pub const GUEST_ADDR: Ipv4Addr = Ipv4Addr::new(169, 254, 0, 21);
/// The tap's address in the namespace: the guest's gateway.
pub const GATEWAY_ADDR: Ipv4Addr = Ipv4Addr::new(169, 254, 0, 22);
pub const GUEST_PREFIX: u8 = 30;
/// Locally administered, the same in every machine so a resumed guest's ARP cache stays valid.
pub const GUEST_MAC: &str = "02:68:72:74:00:01";
pub const TAP: &str = "tap0";
/// The tap's MAC (the guest's gateway), also the same everywhere.
const TAP_MAC: [u8; 6] = [0x02, 0x68, 0x72, 0x74, 0x00, 0x02];
pub const MTU: u32 = 1500;
/// Length of a machine's key (hex digits of a hash of its id) in names.
pub const KEY_LEN: usize = 9;
/// Each machine takes a /31 of the pool: the host's end and the namespace's end.
const SLOT_PREFIX: u8 = 31;

#[derive(Debug, Clone)]
pub struct NetConfig {
    /// Four hex digits that tell this daemon's namespaces, links and table from another's on
    /// the same host (a hash of its data root).
    pub tag: String,
    pub pool: Ipv4Net,
    pub egress_interface: String,
    pub dns: Vec<Ipv4Addr>,
}

/// Where one machine's network is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    pub namespace: String,
    pub veth: String,
    /// The host's end of the veth pair.
    pub host_end: Ipv4Addr,
    /// The namespace's end: the address the guest is reached at, and appears as.
    pub host_ip: Ipv4Addr,
}

impl Attachment {
    pub fn netns_path(&self) -> PathBuf {
        netns::path(&self.namespace)
    }
}

pub struct Net {
    cfg: NetConfig,
    host: rtnetlink::Handle,
}

impl Net {
    /// Namespaces this daemon makes: `hearth-<tag>-<key>`.
    fn ns_prefix(&self) -> String {
        format!("hearth-{}-", self.cfg.tag)
    }

    /// Host veths this daemon makes: `h<tag><key>` (at most 14 bytes, and the peer's temporary
    /// name one more: link names hold 15).
    fn veth_prefix(&self) -> String {
        format!("h{}", self.cfg.tag)
    }

    /// Connects to netlink, lets the host forward and writes the host's table.
    pub async fn new(cfg: NetConfig) -> Result<Net> {
        if cfg.tag.len() != 4 {
            return Err(Error::internal("the network tag must be 4 characters"));
        }
        if cfg.pool.prefix_len() > 30 {
            return Err(Error::invalid(format!(
                "--net-pool {} is too small: it needs room for at least two machines",
                cfg.pool
            )));
        }
        let host = links::host_handle()?;
        let net = Net { cfg, host };
        net.write_host_table().await?;
        Ok(net)
    }

    /// Lets the host forward and writes its table (atomically: a daemon restart never leaves
    /// machines unguarded).
    async fn write_host_table(&self) -> Result<()> {
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
            .map_err(|e| Error::internal(format!("enabling IPv4 forwarding: {e}")))?;
        let table = rules::host_table(
            &rules::host_table_name(&self.cfg.tag),
            &format!("h{}*", self.cfg.tag),
            self.cfg.pool,
            &self.cfg.egress_interface,
        );
        tokio::task::spawn_blocking(move || rules::apply(&table, None))
            .await
            .map_err(|e| Error::internal(e.to_string()))?
    }

    /// Writes the host's table again if something removed it (`nft flush ruleset`, a firewall
    /// service restarting): machines are not left unguarded until the daemon restarts.
    pub async fn guard_host(&self) {
        let name = rules::host_table_name(&self.cfg.tag);
        let present = tokio::task::spawn_blocking(move || rules::table_exists(&name))
            .await
            .unwrap_or(true);
        if !present {
            tracing::warn!("the host's hearth table was removed; writing it again");
            if let Err(e) = self.write_host_table().await {
                tracing::error!("writing the host's table: {}", e.message);
            }
        }
    }

    pub fn config(&self) -> &NetConfig {
        &self.cfg
    }

    /// How many machines the pool holds.
    pub fn slots(&self) -> u32 {
        1u32 << (SLOT_PREFIX - self.cfg.pool.prefix_len())
    }

    /// The attachment of the machine whose key (a hash of its id) is `key`, in pool slot `slot`.
    pub fn attachment(&self, key: &str, slot: u32) -> Attachment {
        let base = u32::from(self.cfg.pool.network()) + 2 * slot;
        Attachment {
            namespace: format!("{}{key}", self.ns_prefix()),
            veth: format!("{}{key}", self.veth_prefix()),
            host_end: Ipv4Addr::from(base),
            host_ip: Ipv4Addr::from(base + 1),
        }
    }

    /// Makes the machine's namespace, links and rules; on failure removes what it made.
    pub async fn setup(&self, a: &Attachment, policy: &EgressPolicy) -> Result<()> {
        self.prepare(a).await?;
        self.connect(a, policy).await
    }

    /// Makes the namespace and its tap, all a VMM needs to start; on failure removes them.
    /// The rest ([`Net::connect`]) can run while the VMM loads.
    pub async fn prepare(&self, a: &Attachment) -> Result<()> {
        let ns = a.namespace.clone();
        let made = tokio::task::spawn_blocking(move || {
            netns::create(&ns)?;
            links::prepare(&ns, TAP)
        })
        .await
        .map_err(|e| Error::internal(e.to_string()))?;
        if made.is_err() {
            self.teardown(a).await;
        }
        made.map_err(|e| e.context(format!("setting up network namespace {}", a.namespace)))
    }

    /// Links a prepared namespace to the host, writes its rules, and lets it forward, last; on
    /// failure removes it.
    pub async fn connect(&self, a: &Attachment, policy: &EgressPolicy) -> Result<()> {
        let made = self.connect_inner(a, policy).await;
        if made.is_err() {
            self.teardown(a).await;
        }
        made.map_err(|e| e.context(format!("setting up network namespace {}", a.namespace)))
    }

    async fn connect_inner(&self, a: &Attachment, policy: &EgressPolicy) -> Result<()> {
        let l = links::NsLinks {
            ns: &a.namespace,
            veth_host: &a.veth,
            host_addr: a.host_end,
            ns_addr: a.host_ip,
            veth_prefix: SLOT_PREFIX,
            tap: TAP,
            tap_mac: TAP_MAC,
            tap_addr: GATEWAY_ADDR,
            tap_prefix: GUEST_PREFIX,
        };
        // Rules first (they name links that need not exist yet), forwarding last.
        self.apply_policy(a, policy).await?;
        links::connect(&self.host, &l).await?;
        let ns = a.namespace.clone();
        tokio::task::spawn_blocking(move || links::enable_forwarding(&ns))
            .await
            .map_err(|e| Error::internal(e.to_string()))?
    }

    /// Writes (or rewrites, atomically) the namespace's rules with the egress policy.
    pub async fn apply_policy(&self, a: &Attachment, policy: &EgressPolicy) -> Result<()> {
        let table = rules::machine_table(links::NS_UPLINK, TAP, a.host_ip, GUEST_ADDR, policy);
        let ns = a.namespace.clone();
        tokio::task::spawn_blocking(move || rules::apply(&table, Some(&ns)))
            .await
            .map_err(|e| Error::internal(e.to_string()))?
    }

    /// The namespace exists and was set up to the end (it does not survive a host reboot, and
    /// a crash may leave one half made).
    pub async fn exists(&self, a: &Attachment) -> bool {
        if !a.netns_path().exists()
            || !matches!(links::index_of(&self.host, &a.veth).await, Ok(Some(_)))
        {
            return false;
        }
        // Forwarding is turned on last: a namespace that forwards was set up to the end.
        let ns = a.namespace.clone();
        tokio::task::spawn_blocking(move || links::forwards(&ns))
            .await
            .unwrap_or(false)
    }

    /// Removes the machine's namespace (its tap, rules and veth end go with it) and the host's
    /// veth end. Never fails: what cannot be removed now is a leftover for reconcile.
    pub async fn teardown(&self, a: &Attachment) {
        self.remove(&a.namespace, &a.veth).await;
    }

    async fn remove(&self, namespace: &str, veth: &str) {
        let ns = namespace.to_string();
        match tokio::task::spawn_blocking(move || netns::delete(&ns)).await {
            Ok(Err(e)) => tracing::warn!(namespace, "{}", e.message),
            Err(e) => tracing::warn!(namespace, "{e}"),
            Ok(Ok(())) => {}
        }
        // Deleting the namespace takes the pair with it; a pair whose peer never moved into it
        // stays on the host.
        if let Err(e) = links::delete(&self.host, veth).await {
            tracing::warn!(veth, "{}", e.message);
        }
    }

    /// Removes the network of the machine whose key is `key`, wherever its slot was.
    pub async fn teardown_key(&self, key: &str) {
        let (ns, veth) = (self.ns_prefix(), self.veth_prefix());
        self.remove(&format!("{ns}{key}"), &format!("{veth}{key}"))
            .await;
    }

    /// Removes namespaces and veths this daemon made whose key no machine has.
    pub async fn remove_leftovers(&self, keys: &HashSet<String>) {
        let (ns_prefix, veth_prefix) = (self.ns_prefix(), self.veth_prefix());
        for ns in netns::list(&ns_prefix) {
            let key = &ns[ns_prefix.len()..];
            if !keys.contains(key) {
                tracing::info!(namespace = %ns, "removing a leftover network namespace");
                self.remove(&ns, &format!("{veth_prefix}{key}")).await;
            }
        }
        match links::list(&self.host, &veth_prefix).await {
            Ok(names) => {
                for veth in names {
                    let key = veth[veth_prefix.len()..].trim_end_matches('p');
                    if !keys.contains(key) {
                        tracing::info!(%veth, "removing a leftover veth");
                        if let Err(e) = links::delete(&self.host, &veth).await {
                            tracing::warn!(%veth, "{}", e.message);
                        }
                    }
                }
            }
            Err(e) => tracing::warn!("listing links: {}", e.message),
        }
    }

    /// What the guest's agent sets up.
    pub fn guest_config(&self) -> hearth_proto::GuestNetwork {
        hearth_proto::GuestNetwork {
            interface: "eth0".into(),
            address: GUEST_ADDR.to_string(),
            prefix_len: GUEST_PREFIX,
            gateway: GATEWAY_ADDR.to_string(),
            mtu: MTU,
            dns: self.cfg.dns.iter().map(|a| a.to_string()).collect(),
        }
    }
}

/// The tag of the daemon whose data root is `root` (made already): four hex digits of a hash
/// of its canonical path.
pub fn tag_of(root: &std::path::Path) -> std::io::Result<String> {
    use sha2::Digest;
    let root = std::fs::canonicalize(root)?;
    Ok(hex::encode(sha2::Sha256::digest(root.as_os_str().as_encoded_bytes()))[..4].to_string())
}

/// Removes everything the daemon tagged `tag` made on the host's network: its namespaces (their
/// veths go with them once no VMM runs in them) and its host table. For a daemon that is gone
/// with its machines, such as a test's or a benchmark's.
pub fn remove_all(tag: &str) {
    for ns in netns::list(&format!("hearth-{tag}-")) {
        if let Err(e) = netns::delete(&ns) {
            tracing::warn!(namespace = %ns, "{}", e.message);
        }
    }
    let _ = rules::delete_table(&rules::host_table_name(tag));
}

/// The nameservers of the host's /etc/resolv.conf a guest can reach (not loopback ones).
pub fn host_dns() -> Vec<Ipv4Addr> {
    std::fs::read_to_string("/etc/resolv.conf")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|a| a.trim().parse::<Ipv4Addr>().ok())
        .filter(|a| !a.is_loopback())
        .collect()
}

/// The interface of the host's default route, for egress.
pub fn default_route_interface() -> Option<String> {
    // /proc/net/route: Iface Destination Gateway …, hex; the default route has destination 0.
    std::fs::read_to_string("/proc/net/route")
        .ok()?
        .lines()
        .skip(1)
        .find_map(|l| {
            let mut f = l.split_whitespace();
            let iface = f.next()?;
            (f.next()? == "00000000").then(|| iface.to_string())
        })
}
