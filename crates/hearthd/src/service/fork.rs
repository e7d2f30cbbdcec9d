//! Fork: a new machine that continues from a running machine's present instant. One journaled
//! operation — the source's state is taken straight into the new machine's directory and
//! restored from there — so a crash anywhere in it is undone as a whole: no half-made machine,
//! no snapshot nobody asked for, and the source resumed.

use super::machines::guest_hostname;
use super::network::check_port;
use super::snapshots::{Timings, SYSTEM_DISK, VMSTATE};
use super::{nonce, Operation, Service};
use crate::error::{Error, Result};
use crate::failpoint;
use crate::storage;
use crate::store::{MachineRecord, MachineSpec, OpKind};
use hearth_api::{
    validate_id, ForkRequest, Machine, NetworkRequest, Phase, PublishPortRequest, SnapshotKind,
};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::OwnedMutexGuard;

/// What the new machine gets of its own.
struct Wanted {
    hostname: String,
    network: Option<NetworkRequest>,
    ports: Vec<PublishPortRequest>,
}

impl Service {
    pub async fn fork_machine(
        self: &Arc<Self>,
        source: &str,
        req: ForkRequest,
    ) -> Result<(Machine, Timings)> {
        validate_id("machine", source).map_err(Error::invalid)?;
        validate_id("machine", &req.machine_id).map_err(Error::invalid)?;
        if source == req.machine_id {
            return Err(Error::invalid("a fork needs a machine_id of its own"));
        }
        let hostname = guest_hostname(&req.machine_id, req.guest_config.as_ref())?;
        let ports = req.ports.clone().unwrap_or_default();
        ports.iter().try_for_each(check_port)?;
        let boot = self.boot_permit()?;
        self.check_room()?;
        let op = Operation::on(OpKind::Fork, &req.machine_id).source(source);
        let source = source.to_string();
        self.operation(op, move |svc, id, _| async move {
            let _boot = boot;
            let started = Instant::now();
            let src_rt = svc.runtime(&source);
            let result = match src_rt.begin(&source) {
                Ok(src_lock) => {
                    let want = Wanted {
                        hostname,
                        network: req.network,
                        ports,
                    };
                    svc.fork_locked(&source, &id, want, src_lock, started).await
                }
                Err(e) => Err(e),
            };
            drop(src_rt);
            svc.release_runtime(&source);
            result
        })
        .await
    }

    async fn fork_locked(
        &self,
        source: &str,
        id: &str,
        want: Wanted,
        src_lock: OwnedMutexGuard<()>,
        started: Instant,
    ) -> Result<(Machine, Timings)> {
        let src = self.record(source)?;
        if src.phase != Phase::Running {
            return Err(Error::conflict(format!(
                "machine {source} is {}; only a running machine can be forked",
                src.phase.as_str()
            )));
        }
        let spec = MachineSpec {
            hostname: want.hostname,
            machine_uuid: nonce(),
            restored_from: None,
            network: self.inherited_network(&src.spec.network, want.network.as_ref())?,
            ..src.spec.clone()
        };
        let mut rec = MachineRecord::starting(id, spec);
        self.insert_new_machine(&rec)?;
        let mut result = self.fork_into(&src, &mut rec, src_lock).await;
        if result.is_ok() {
            if let Err(e) = self.publish_all(&rec, &want.ports).await {
                result = Err(e);
            }
        }
        if let Err(e) = &result {
            tracing::info!(machine = %id, source, "fork failed: {}", e.message);
            self.destroy(id, Some(&rec)).await;
        }
        let mut timings = result?;
        timings.push(("total", started.elapsed()));
        Ok((self.machine_api(&rec), timings))
    }

    /// Takes the source's memory, device state and disk into the new machine's directory
    /// (the source runs again as soon as they are written) and resumes the new machine there.
    /// Its RAM maps the copy privately; the file goes with the machine.
    async fn fork_into(
        &self,
        src: &MachineRecord,
        rec: &mut MachineRecord,
        src_lock: OwnedMutexGuard<()>,
    ) -> Result<Timings> {
        let state = self.paths(&rec.id).state_dir();
        let a = self.allocate_network(rec)?;
        // The new machine's namespace is made while the source's state is taken, and linked
        // while its VMM loads it.
        let (taken, network) = tokio::join!(
            self.take(src, SnapshotKind::Memory, &state),
            self.prepare_network(a.as_ref())
        );
        drop(src_lock);
        let (_, mut timings) = taken?;
        let network = network?;
        // The disk's clone becomes the machine's own.
        let (from, to) = (state.join(SYSTEM_DISK), self.paths(&rec.id).system_disk());
        std::fs::rename(&from, &to).map_err(|e| Error::io("moving", &from, e))?;
        failpoint::stall("fork-taken").await;
        let spec = rec.spec.network.clone();
        let (resumed, connected) = tokio::join!(
            self.resume_from(rec, &state, network),
            self.connect_network(a, spec)
        );
        connected?;
        timings.extend(resumed?);
        // Loaded; only the memory file is still in use.
        let _ = storage::remove_file(&state.join(VMSTATE)).await;
        Ok(timings)
    }
}
