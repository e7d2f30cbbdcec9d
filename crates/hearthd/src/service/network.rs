//! Machines' networks and published ports as the service sees them: the network a request asks
//! for, the namespace made before a VMM starts and removed with the machine, the egress policy
//! changed on a running machine, and ports relayed from the host to the guest.

use super::{Operation, Service};
use crate::error::{Error, Result};
use crate::net::{self, Attachment, EgressPolicy, Net};
use crate::store::{MachineRecord, NetworkSpec, OpKind};
use crate::vmm::NetAttach;
use chrono::Utc;
use hearth_api::{
    validate_id, Egress, Machine, MachineNetwork, MachinePort, NetworkRequest, PublishPortRequest,
    PublishedPort,
};
use ipnet::Ipv4Net;
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;

/// The short, fixed-length key a machine's network objects are named by.
pub(super) fn network_key(id: &str) -> String {
    hex::encode(Sha256::digest(id.as_bytes()))[..net::KEY_LEN].to_string()
}

fn parse_cidrs(field: &str, cidrs: &[String]) -> Result<Vec<Ipv4Net>> {
    cidrs
        .iter()
        .map(|c| {
            c.parse::<Ipv4Net>()
                .or_else(|_| c.parse::<std::net::Ipv4Addr>().map(Ipv4Net::from))
                .map(|n| n.trunc())
                .map_err(|_| {
                    Error::invalid(format!(
                        "network.{field}: {} is not an IPv4 CIDR",
                        hearth_api::excerpt(c)
                    ))
                })
        })
        .collect()
}

pub(super) fn egress_policy(spec: &NetworkSpec) -> Result<EgressPolicy> {
    Ok(EgressPolicy {
        allow: spec.egress == Egress::Allow,
        allow_cidrs: parse_cidrs("allow_cidrs", &spec.allow_cidrs)?,
        deny_cidrs: parse_cidrs("deny_cidrs", &spec.deny_cidrs)?,
    })
}

/// `spec` with the policy fields `req` gives; CIDRs checked.
fn with_policy(mut spec: NetworkSpec, req: &NetworkRequest) -> Result<NetworkSpec> {
    if let Some(egress) = req.egress {
        spec.egress = egress;
    }
    if let Some(cidrs) = &req.allow_cidrs {
        spec.allow_cidrs = cidrs.clone();
    }
    if let Some(cidrs) = &req.deny_cidrs {
        spec.deny_cidrs = cidrs.clone();
    }
    egress_policy(&spec)?;
    Ok(spec)
}

fn attach(a: &Attachment) -> NetAttach {
    NetAttach {
        netns: a.netns_path(),
        tap: net::TAP.to_string(),
        mac: net::GUEST_MAC.to_string(),
    }
}

/// Port ids are a machine's own: relays are known by machine and id.
fn relay_key(p: &PublishedPort) -> String {
    format!("{}/{}", p.machine_id, p.id)
}

/// A published port request, checked.
pub(super) fn check_port(req: &PublishPortRequest) -> Result<()> {
    validate_id("published port", &req.published_port_id).map_err(Error::invalid)?;
    if !(1..=65535).contains(&req.port) {
        return Err(Error::invalid(format!(
            "port {} is not a TCP port (1-65535)",
            req.port
        )));
    }
    if let Some(p) = req.host_port.filter(|p| !(1..=65535).contains(p)) {
        return Err(Error::invalid(format!(
            "host_port {p} is not a TCP port (1-65535)"
        )));
    }
    match req.protocol.as_deref() {
        None | Some("tcp") => Ok(()),
        Some(other) => Err(Error::invalid(format!(
            "protocol {other:?}: only tcp can be published"
        ))),
    }
}

impl Service {
    fn net(&self) -> Result<&Arc<Net>> {
        self.net
            .as_ref()
            .ok_or_else(|| Error::invalid("this hearthd runs without networking (--no-network)"))
    }

    /// The network of a new machine: one unless the request says `enabled: false`.
    pub(super) fn new_network(&self, req: Option<&NetworkRequest>) -> Result<NetworkSpec> {
        let req = req.cloned().unwrap_or_default();
        let enabled = req.enabled.unwrap_or(self.net.is_some());
        if enabled {
            self.net()?;
        }
        with_policy(
            NetworkSpec {
                enabled,
                ..NetworkSpec::default()
            },
            &req,
        )
    }

    /// The network of a machine restored or forked from one with `source`: the same device
    /// (its state is in the snapshot), the policy the request gives or the source's.
    pub(super) fn inherited_network(
        &self,
        source: &NetworkSpec,
        req: Option<&NetworkRequest>,
    ) -> Result<NetworkSpec> {
        let req = req.cloned().unwrap_or_default();
        if req.enabled.is_some_and(|e| e != source.enabled) {
            return Err(Error::invalid(format!(
                "network.enabled: the snapshot's machine {} a network device, and a restored \
                 machine keeps its devices",
                if source.enabled { "has" } else { "has no" }
            )));
        }
        if source.enabled {
            self.net()?;
        }
        with_policy(source.clone(), &req)
    }

    /// Where machine `rec`'s network is, once it has a slot.
    pub(super) fn attachment(&self, rec: &MachineRecord) -> Option<Attachment> {
        let net = self.net.as_ref()?;
        let slot = rec.net_slot.filter(|_| rec.spec.network.enabled)?;
        Some(net.attachment(&network_key(&rec.id), slot))
    }

    /// Gives the machine its slot in the pool (once): where its network is to be.
    pub(super) fn allocate_network(&self, rec: &mut MachineRecord) -> Result<Option<Attachment>> {
        if !rec.spec.network.enabled {
            return Ok(None);
        }
        let net = self.net()?;
        rec.net_slot = Some(self.store.allocate_net_slot(&rec.id, net.slots())?);
        Ok(self.attachment(rec))
    }

    /// Makes the machine's network where it is missing or half made (a new machine; a start
    /// after the host rebooted or a crash): what the VMM attaches to.
    pub(super) async fn ensure_network(
        &self,
        a: Option<&Attachment>,
        spec: &NetworkSpec,
    ) -> Result<Option<NetAttach>> {
        let Some(a) = a else {
            return Ok(None);
        };
        let net = self.net()?;
        if !net.exists(a).await {
            net.teardown(a).await;
            net.setup(a, &egress_policy(spec)?).await?;
        }
        Ok(Some(attach(a)))
    }

    /// For a new machine about to be restored: its namespace and tap only, so its VMM can load
    /// while [`Service::connect_network`] does the rest.
    pub(super) async fn prepare_network(
        &self,
        a: Option<&Attachment>,
    ) -> Result<Option<NetAttach>> {
        let Some(a) = a else {
            return Ok(None);
        };
        self.net()?.prepare(a).await?;
        Ok(Some(attach(a)))
    }

    pub(super) async fn connect_network(
        &self,
        a: Option<Attachment>,
        spec: NetworkSpec,
    ) -> Result<()> {
        match a {
            Some(a) => self.net()?.connect(&a, &egress_policy(&spec)?).await,
            None => Ok(()),
        }
    }

    /// Removes machine `id`'s published ports and network namespace. Never fails.
    pub(super) async fn detach_network(&self, id: &str) {
        for port in self.store.list_ports(Some(id)).unwrap_or_default() {
            self.relays.close(&relay_key(&port));
            if let Err(e) = self.store.delete_port(id, &port.id) {
                tracing::warn!(machine = id, port = %port.id, "{}", e.message);
            }
        }
        if let Some(net) = &self.net {
            net.teardown_key(&network_key(id)).await;
        }
    }

    /// Removes network objects and ports that belong to no machine in `known`, and guards the
    /// host again if its table went missing.
    pub(super) async fn remove_network_leftovers(&self, known: &HashSet<String>) {
        if let Some(net) = &self.net {
            net.guard_host().await;
        }
        for port in self.store.list_ports(None).unwrap_or_default() {
            if !known.contains(&port.machine_id) {
                tracing::info!(port = %port.id, "removing a published port of a machine that is gone");
                self.relays.close(&relay_key(&port));
                let _ = self.store.delete_port(&port.machine_id, &port.id);
            }
        }
        if let Some(net) = &self.net {
            let keys = known.iter().map(|id| network_key(id)).collect();
            net.remove_leftovers(&keys).await;
        }
    }

    /// At a clean shutdown: a daemon none of whose machines has a network leaves no rules on
    /// the host (they would guard its pool for nobody). Machines with networks keep them.
    pub fn release_host_network(&self) {
        let Some(net) = &self.net else {
            return;
        };
        let networked = self
            .store
            .list_machines()
            .map_or(true, |ms| ms.iter().any(|m| m.net_slot.is_some()));
        if !networked {
            net::remove_all(&net.config().tag);
        }
    }

    /// The machine has no network, or its network was set up to the end.
    pub(super) async fn network_complete(&self, rec: &MachineRecord) -> bool {
        match (&self.net, self.attachment(rec)) {
            (Some(net), Some(a)) => net.exists(&a).await,
            _ => !rec.spec.network.enabled,
        }
    }

    /// The API's view of a machine: its record with its network and ports.
    pub fn machine_api(&self, rec: &MachineRecord) -> Machine {
        let network = self.attachment(rec).map(|a| MachineNetwork {
            guest_ip: net::GUEST_ADDR.to_string(),
            host_ip: a.host_ip.to_string(),
            mac: net::GUEST_MAC.to_string(),
            namespace: a.namespace,
            egress: rec.spec.network.egress,
            allow_cidrs: rec.spec.network.allow_cidrs.clone(),
            deny_cidrs: rec.spec.network.deny_cidrs.clone(),
        });
        let ports = self
            .store
            .list_ports(Some(&rec.id))
            .unwrap_or_default()
            .into_iter()
            .map(|p| MachinePort {
                name: p.name.unwrap_or_else(|| p.id.clone()),
                port: p.port,
                host_port: Some(p.host_port),
                protocol: p.protocol,
            })
            .collect();
        Machine {
            id: rec.id.clone(),
            artifact: rec.spec.artifact.clone(),
            system_volume_id: None,
            user_volume_ids: Vec::new(),
            runtime_host: network.as_ref().map(|n| n.host_ip.clone()),
            ports,
            guest_ssh_host_public_key: None,
            phase: rec.phase,
            error: rec.error.clone(),
            created_at: rec.created_at,
            started_at: rec.started_at,
            memory_mib: rec.spec.memory_mib,
            vcpus: rec.spec.vcpus,
            storage_bytes: rec.spec.storage_bytes,
            vmm: rec.spec.vmm,
            restored_from: rec.spec.restored_from.clone(),
            network,
        }
    }

    /// Changes a machine's egress policy; on a running machine it takes effect at once.
    pub async fn set_network_policy(
        self: &Arc<Self>,
        id: &str,
        req: NetworkRequest,
    ) -> Result<Machine> {
        validate_id("machine", id).map_err(Error::invalid)?;
        if req.enabled.is_some() {
            return Err(Error::invalid(
                "network.enabled cannot change: a machine keeps its devices",
            ));
        }
        self.operation(
            Operation::on(OpKind::Network, id),
            |svc, id, _| async move {
                let mut rec = svc.record(&id)?;
                if !rec.spec.network.enabled {
                    return Err(Error::conflict(format!("machine {id} has no network")));
                }
                rec.spec.network = with_policy(rec.spec.network.clone(), &req)?;
                // The record first: a crash before the rules are written is finished by recovery.
                svc.store.update_machine(&rec)?;
                svc.apply_network_policy(&rec).await?;
                Ok(svc.machine_api(&rec))
            },
        )
        .await
    }

    /// Writes the machine's rules from its record, where its namespace exists.
    pub(super) async fn apply_network_policy(&self, rec: &MachineRecord) -> Result<()> {
        let (Some(net), Some(a)) = (&self.net, self.attachment(rec)) else {
            return Ok(());
        };
        if a.netns_path().exists() {
            net.apply_policy(&a, &egress_policy(&rec.spec.network)?)
                .await?;
        }
        Ok(())
    }

    pub fn list_ports(&self, machine_id: &str) -> Result<Vec<PublishedPort>> {
        validate_id("machine", machine_id).map_err(Error::invalid)?;
        self.record(machine_id)?;
        self.store.list_ports(Some(machine_id))
    }

    pub async fn publish_port(
        self: &Arc<Self>,
        machine_id: &str,
        req: PublishPortRequest,
    ) -> Result<PublishedPort> {
        validate_id("machine", machine_id).map_err(Error::invalid)?;
        check_port(&req)?;
        self.operation(
            Operation::on(OpKind::Port, machine_id),
            |svc, id, _| async move {
                let rec = svc.record(&id)?;
                svc.publish(&rec, &req).await
            },
        )
        .await
    }

    /// Records port `req` of machine `rec` and opens its relay; on failure neither is left.
    pub(super) async fn publish(
        &self,
        rec: &MachineRecord,
        req: &PublishPortRequest,
    ) -> Result<PublishedPort> {
        let Some(a) = self.attachment(rec) else {
            return Err(Error::conflict(format!(
                "machine {} has no network to publish a port on",
                rec.id
            )));
        };
        if self
            .store
            .get_port(&rec.id, &req.published_port_id)?
            .is_some()
        {
            return Err(Error::conflict(format!(
                "machine {} already has published port {}",
                rec.id, req.published_port_id
            )));
        }
        let target = SocketAddr::from((a.host_ip, req.port as u16));
        let candidates: Vec<u16> = match req.host_port {
            Some(p) => vec![p as u16],
            None => self.free_host_ports()?,
        };
        let mut last = Error::conflict("no free host port in --port-range");
        for host_port in candidates {
            let port = PublishedPort {
                id: req.published_port_id.clone(),
                machine_id: rec.id.clone(),
                name: req.name.clone(),
                port: req.port as u16,
                host_port,
                protocol: "tcp".into(),
                created_at: Utc::now(),
            };
            let listen = SocketAddr::new(self.cfg.publish_address, host_port);
            match self.relays.open(&relay_key(&port), listen, target).await {
                Ok(()) => {}
                Err(e) if req.host_port.is_none() => {
                    last = e;
                    continue;
                }
                Err(e) => return Err(e),
            }
            if let Err(e) = self.store.insert_port(&port) {
                self.relays.close(&relay_key(&port));
                return Err(e);
            }
            return Ok(port);
        }
        Err(last)
    }

    /// Host ports of the range no published port has, from a random point so that daemons
    /// sharing a host rarely race for one.
    fn free_host_ports(&self) -> Result<Vec<u16>> {
        let (first, last) = self.cfg.port_range;
        let used: HashSet<u16> = self.store.used_host_ports()?.into_iter().collect();
        let span = u32::from(last - first) + 1;
        let start = rand::random::<u32>() % span;
        Ok((0..span)
            .map(|i| first + ((start + i) % span) as u16)
            .filter(|p| !used.contains(p))
            .take(64)
            .collect())
    }

    pub async fn unpublish_port(self: &Arc<Self>, machine_id: &str, port_id: &str) -> Result<()> {
        validate_id("machine", machine_id).map_err(Error::invalid)?;
        validate_id("published port", port_id).map_err(Error::invalid)?;
        let port_id = port_id.to_string();
        self.operation(
            Operation::on(OpKind::Port, machine_id),
            |svc, id, _| async move {
                svc.record(&id)?;
                match svc.store.get_port(&id, &port_id)? {
                    Some(p) => {
                        svc.relays.close(&relay_key(&p));
                        svc.store.delete_port(&id, &p.id)
                    }
                    None => Err(Error::not_found(format!(
                        "machine {id} has no published port {port_id}"
                    ))),
                }
            },
        )
        .await
    }

    /// Opens the relays of published ports that have none: every one at start-up, then one
    /// that could not bind before (its host port was busy) on each reconcile pass.
    pub(super) async fn reopen_ports(&self) {
        for port in self.store.list_ports(None).unwrap_or_default() {
            if self.relays.is_open(&relay_key(&port)) {
                continue;
            }
            // A port being published or removed is that operation's business.
            let rt = self.runtime(&port.machine_id);
            let Ok(_op) = rt.op.try_lock() else {
                continue;
            };
            let still = self.store.get_port(&port.machine_id, &port.id);
            let rec = match (still, self.store.get_machine(&port.machine_id)) {
                (Ok(Some(_)), Ok(Some(rec))) => rec,
                _ => continue,
            };
            let Some(a) = self.attachment(&rec) else {
                continue;
            };
            let listen = SocketAddr::new(self.cfg.publish_address, port.host_port);
            let target = SocketAddr::from((a.host_ip, port.port));
            if let Err(e) = self.relays.open(&relay_key(&port), listen, target).await {
                tracing::warn!(port = %port.id, "reopening a published port: {}", e.message);
            }
        }
    }
}
