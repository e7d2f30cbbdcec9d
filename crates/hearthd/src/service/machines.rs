//! Machine lifecycle: create, start, stop, delete.

use super::network::check_port;
use super::{nonce, Operation, Service};
use crate::access::Caller;
use crate::agent::AgentClient;
use crate::blobs::Leases;
use crate::cgroup::{Cgroup, Limits};
use crate::error::{Error, Result};
use crate::store::{MachineRecord, MachineSpec, OpKind};
use crate::vmm::{console, MachinePaths, NetAttach, VmProcess, VmSpec, Vmm, VmmError};
use crate::{failpoint, storage};
use base64::Engine;
use chrono::Utc;
use hearth_api::{
    validate_id, CreateMachineRequest, ErrorCode, GuestConfig, Machine, Phase, PublishPortRequest,
};
use hearth_proto::{Configure, Op, FEATURE_CONFIGURE_THAW, FEATURE_HELLO_CONFIGURE};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long a guest gets to power off after the agent was asked to.
const AGENT_CALL: Duration = Duration::from_secs(5);

impl Service {
    pub fn get_machine(&self, id: &str) -> Result<Machine> {
        validate_id("machine", id).map_err(Error::invalid)?;
        self.record(id).map(|r| self.machine_api(&r))
    }

    pub fn list_machines(&self) -> Result<Vec<Machine>> {
        Ok(self
            .store
            .list_machines()?
            .iter()
            .map(|r| self.machine_api(r))
            .collect())
    }

    pub(super) fn record(&self, id: &str) -> Result<MachineRecord> {
        self.store
            .get_machine(id)?
            .ok_or_else(|| Error::not_found(format!("machine {id} not found")))
    }

    /// Creates and boots a machine; returns once its agent answered. On any failure nothing is
    /// left: no process, file, socket or record.
    pub async fn create_machine(
        self: &Arc<Self>,
        req: CreateMachineRequest,
        caller: Caller,
    ) -> Result<Machine> {
        let spec = self.validate_create(&req)?;
        let cold = req.cold.unwrap_or(false);
        self.artifacts.check(&req.artifact, caller)?;
        let ports = req.ports.unwrap_or_default();
        ports.iter().try_for_each(check_port)?;
        let boot = self.boot_permit()?;
        self.check_room()?;
        self.operation(
            Operation::on(OpKind::Create, &req.machine_id),
            move |svc, id, _| async move {
                let _boot = boot;
                let mut rec = MachineRecord::starting(&id, spec);
                svc.insert_new_machine(&rec)?;
                let leases = Leases::default();
                let mut result = svc
                    .provision_and_boot(&mut rec, caller, &leases, cold)
                    .await;
                if result.is_ok() {
                    result = svc.publish_all(&rec, &ports).await;
                }
                if let Err(e) = &result {
                    tracing::info!(machine = %id, "create failed: {}", e.message);
                    svc.destroy(&id, Some(&rec)).await;
                    leases.discard().await;
                }
                result.map(|()| svc.machine_api(&rec))
            },
        )
        .await
    }

    fn validate_create(&self, req: &CreateMachineRequest) -> Result<MachineSpec> {
        validate_id("machine", &req.machine_id).map_err(Error::invalid)?;
        let memory_mib = req.memory_mib.unwrap_or(self.cfg.default_memory_mib);
        let vcpus = req.vcpus.unwrap_or(self.cfg.default_vcpus);
        let storage_bytes = req.storage_bytes.unwrap_or(self.cfg.default_storage_bytes);
        self.check_size(memory_mib, vcpus, storage_bytes)?;
        if req.user_volume_ids.as_ref().is_some_and(|v| !v.is_empty()) {
            return Err(Error::invalid(
                "user_volume_ids: this hearthd has no volume support yet",
            ));
        }
        let hostname = guest_hostname(&req.machine_id, req.guest_config.as_ref())?;
        Ok(MachineSpec {
            artifact: req.artifact.clone(),
            memory_mib,
            vcpus,
            storage_bytes,
            hostname,
            machine_uuid: nonce(),
            kernel_sha256: String::new(),
            initrd_sha256: None,
            rootfs_sha256: String::new(),
            vmm: req.vmm.unwrap_or(self.vmms.default_kind()),
            restored_from: None,
            network: self.new_network(req.network.as_ref())?,
        })
    }

    /// Publishes the ports a create, restore or fork asked for.
    pub(super) async fn publish_all(
        &self,
        rec: &MachineRecord,
        ports: &[PublishPortRequest],
    ) -> Result<()> {
        for p in ports {
            self.publish(rec, p).await?;
        }
        Ok(())
    }

    /// Fetches the artifacts, then restores the template of machines like this one, or makes
    /// the system disk and boots (`cold`: boots in any case) and makes the template. What it
    /// fetches stays leased to the create until it ends.
    async fn provision_and_boot(
        &self,
        rec: &mut MachineRecord,
        caller: Caller,
        leases: &Leases,
        cold: bool,
    ) -> Result<()> {
        let artifact = rec.spec.artifact.clone();
        let kernel = self
            .artifacts
            .fetch(
                "kernel_image_url",
                &artifact.kernel_image_url,
                caller,
                leases,
            )
            .await?;
        let rootfs = self
            .artifacts
            .fetch("rootfs_url", &artifact.rootfs_url, caller, leases)
            .await?;
        let initrd = match &artifact.initrd_url {
            Some(url) => Some(
                self.artifacts
                    .fetch("initrd_url", url, caller, leases)
                    .await?,
            ),
            None => None,
        };
        rec.spec.kernel_sha256 = kernel.sha256;
        rec.spec.rootfs_sha256 = rootfs.sha256;
        rec.spec.initrd_sha256 = initrd.map(|b| b.sha256);
        self.store.update_machine(rec)?;

        if !storage::is_ext4(&rootfs.path)? {
            return Err(Error::invalid(format!(
                "rootfs_url: {} is not an ext4 filesystem",
                artifact.rootfs_url
            )));
        }
        if rec.spec.storage_bytes < rootfs.size_bytes {
            return Err(Error::invalid(format!(
                "storage_bytes ({}) is smaller than the root filesystem ({} bytes)",
                rec.spec.storage_bytes, rootfs.size_bytes
            )));
        }
        let template = self.template_key(&rec.spec)?.filter(|_| !cold);
        if let Some((dir, info)) = template.as_deref().and_then(|k| self.use_template(k)) {
            if self.create_from_template(rec, &dir, &info).await.is_ok() {
                return Ok(());
            }
        }
        let a = self.allocate_network(rec)?;
        let (disk, network) = tokio::join!(
            self.make_system_disk(rec, &rootfs.path),
            self.ensure_network(a.as_ref(), &rec.spec.network)
        );
        disk?;
        let make = template.filter(|k| self.template(k).is_none());
        self.boot_as(rec, network?, make.as_deref()).await
    }

    /// The machine's system disk: a clone of `src` grown to the machine's storage size.
    pub(super) async fn make_system_disk(&self, rec: &MachineRecord, src: &Path) -> Result<()> {
        let paths = self.paths(&rec.id);
        std::fs::create_dir_all(&paths.dir)?;
        let (src, dst, mode, size) = (
            src.to_path_buf(),
            paths.system_disk(),
            self.cfg.clone,
            rec.spec.storage_bytes,
        );
        tokio::task::spawn_blocking(move || {
            storage::clone_file(&src, &dst, mode)?;
            storage::grow_ext4(&dst, size)
        })
        .await
        .map_err(|e| Error::internal(e.to_string()))?
    }

    /// Boots the machine from its disks and waits for its agent; on success the record says
    /// running. On failure the VMM is killed (the record keeps the pid until then).
    pub(super) async fn boot(
        &self,
        rec: &mut MachineRecord,
        network: Option<NetAttach>,
    ) -> Result<()> {
        self.boot_as(rec, network, None).await
    }

    /// [`Service::boot`]; with `template`, the machine is snapshotted as the template of that
    /// key once its agent answered, before anyone else may use it (see `templates`).
    async fn boot_as(
        &self,
        rec: &mut MachineRecord,
        network: Option<NetAttach>,
        template: Option<&str>,
    ) -> Result<()> {
        let paths = self.paths(&rec.id);
        let spec = self.vm_spec(rec, network)?;
        let started = Instant::now();
        let proc = self.vmm(rec.spec.vmm)?.boot(&spec).await?;
        // A crash here leaves a VMM that only its runtime directory names.
        failpoint::stall("vmm-spawned").await;
        rec.process = Some(proc);
        self.store.update_machine(rec)?;
        self.finish_start(rec, &paths, proc, false, started, template)
            .await
    }

    /// What the VMM needs to run this machine; its cgroup is made here.
    pub(super) fn vm_spec(
        &self,
        rec: &MachineRecord,
        network: Option<NetAttach>,
    ) -> Result<VmSpec> {
        let paths = self.paths(&rec.id);
        let blob = |sha: &str| self.cfg.root.join("images").join("blobs").join(sha);
        Ok(VmSpec {
            kernel: blob(&rec.spec.kernel_sha256),
            initrd: rec.spec.initrd_sha256.as_deref().map(blob),
            memory_mib: rec.spec.memory_mib,
            vcpus: rec.spec.vcpus,
            disks: vec![paths.system_disk()],
            paths,
            network,
            cgroup: self.machine_cgroup(rec)?,
        })
    }

    /// Machine `rec`'s cgroup, made (again) with its limits: its RAM plus the VMM's overhead,
    /// a CPU per vCPU, a pids limit. None with `--cgroups off`.
    fn machine_cgroup(&self, rec: &MachineRecord) -> Result<Option<Cgroup>> {
        let Some(cgroups) = &self.cgroups else {
            return Ok(None);
        };
        let limits = Limits::for_machine(
            rec.spec.memory_mib,
            rec.spec.vcpus,
            self.cfg.vmm_memory_overhead_mib,
        );
        cgroups
            .create(&rec.id, &limits)
            .map(Some)
            .map_err(|e| Error::internal(format!("machine {}: {e}", rec.id)))
    }

    /// Puts the VMM of a running machine found again after a restart into its cgroup (made
    /// again, should it be missing; a VMM started by an older daemon is confined from now on).
    pub(super) fn confine_again(&self, rec: &MachineRecord, pid: i32) -> Result<()> {
        if let (Some(cgroups), Some(_)) = (&self.cgroups, self.machine_cgroup(rec)?) {
            cgroups
                .attach(&rec.id, pid)
                .map_err(|e| Error::internal(format!("machine {}: {e}", rec.id)))?;
        }
        Ok(())
    }

    /// Removes machine `id`'s cgroup, its VMM gone; one that cannot go now is a leftover for
    /// reconcile.
    async fn remove_cgroup(&self, id: &str) {
        let Some(cgroups) = self.cgroups.clone() else {
            return;
        };
        let machine = id.to_string();
        match tokio::task::spawn_blocking(move || cgroups.remove(&machine)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(machine = %id, "{e}"),
            Err(e) => tracing::warn!(machine = %id, "removing the cgroup: {e}"),
        }
    }

    /// Waits for the agent of a VMM that has just started (booted or restored), sets the
    /// guest up, and marks the machine running. On failure the VMM is killed.
    pub(super) async fn finish_start(
        &self,
        rec: &mut MachineRecord,
        paths: &MachinePaths,
        proc: VmProcess,
        restored: bool,
        started: Instant,
        template: Option<&str>,
    ) -> Result<()> {
        match self.await_agent(rec, paths, proc, restored).await {
            Ok(agent) => {
                *self.runtime(&rec.id).agent.lock().await = Some(agent);
                if let Some(key) = template {
                    // Still starting: no client's exec or file can end up in the template.
                    self.make_template(rec, key).await?;
                }
                rec.phase = Phase::Running;
                rec.error = None;
                rec.started_at = Some(Utc::now());
                self.store.update_machine(rec)?;
                tracing::info!(machine = %rec.id, elapsed = ?started.elapsed(), "machine running");
                Ok(())
            }
            Err(e) => {
                self.vmm(rec.spec.vmm)?.kill(paths, &proc).await;
                Err(e)
            }
        }
    }

    async fn await_agent(
        &self,
        rec: &MachineRecord,
        paths: &MachinePaths,
        proc: VmProcess,
        restored: bool,
    ) -> Result<Arc<AgentClient>> {
        let deadline = Instant::now() + self.cfg.boot_timeout();
        let vmm = self.vmm(rec.spec.vmm)?;
        let agent = match vmm.connect_agent(paths, &proc, deadline).await {
            Ok(stream) => AgentClient::new(stream),
            Err(VmmError::Gone) => {
                console::drained(paths, console::Log::Console).await;
                return Err(Error::invalid(format!(
                    "the machine shut down during boot; console:\n{}",
                    paths.console_tail(15)
                )));
            }
            Err(e) => return Err(e.into()),
        };
        // A restored guest's clock stood still since the snapshot and its entropy pool is its
        // source's: both are reset, with its own identity. The snapshot caught the filesystem
        // frozen: nothing may write before the thaw, which comes first.
        let configure = |thaw: bool| Configure {
            hostname: Some(rec.spec.hostname.clone()),
            machine_id: Some(rec.spec.machine_uuid.clone()),
            wall_clock_unix_ns: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .ok(),
            entropy_base64: Some(
                base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 64]>()),
            ),
            network: self
                .net
                .as_ref()
                .filter(|_| rec.spec.network.enabled)
                .map(|net| net.guest_config()),
            thaw,
        };
        let t = Instant::now();
        let shaken = agent
            .handshake(
                &nonce(),
                deadline,
                || vmm.is_alive(&proc),
                // A restore's fix-ups go with its hello. A boot's come after it: the hellos
                // repeated while the guest boots wait for it, and each would apply its own.
                || restored.then(|| configure(true)),
            )
            .await;
        tracing::debug!(machine = %rec.id, elapsed = ?t.elapsed(), "agent handshake");
        if let Err(e) = shaken {
            // The agent socket closes when the VMM exits, a moment before the process is gone.
            let exited = agent.is_closed() || !vmm.is_alive(&proc);
            if exited {
                console::drained(paths, console::Log::Console).await;
            }
            let console = paths.console_tail(15);
            let msg = if exited {
                format!("the machine shut down during boot; console:\n{console}")
            } else {
                format!("{}; console:\n{console}", e.message)
            };
            // A guest that dies at boot is almost always a bad kernel, initrd or rootfs.
            return Err(if exited {
                Error::invalid(msg)
            } else if e.code != ErrorCode::Unavailable {
                // The agent answered: its fix-ups failed.
                Error { message: msg, ..e }
            } else {
                Error::unavailable(msg)
            });
        }
        if !restored || !agent.has_feature(FEATURE_HELLO_CONFIGURE) {
            // A boot, or an agent of an older snapshot: the fix-ups in calls of their own.
            let thaw_in_configure = restored && agent.has_feature(FEATURE_CONFIGURE_THAW);
            if restored && !thaw_in_configure {
                agent.call(Op::Thaw, Some(AGENT_CALL)).await?;
            }
            agent
                .call(
                    Op::Configure(configure(thaw_in_configure)),
                    Some(AGENT_CALL),
                )
                .await?;
        }
        Ok(Arc::new(agent))
    }

    /// Graceful stop: the agent syncs and powers off; the VMM is killed if it has not exited
    /// after the stop timeout. Stopping a stopped machine does nothing.
    pub async fn stop_machine(self: &Arc<Self>, id: &str) -> Result<()> {
        validate_id("machine", id).map_err(Error::invalid)?;
        self.operation(Operation::on(OpKind::Stop, id), |svc, id, _| async move {
            let mut rec = svc.record(&id)?;
            if rec.phase == Phase::Stopped {
                return Ok(());
            }
            if let Some(proc) = rec.process {
                let vmm = svc.vmm(rec.spec.vmm)?;
                if rec.phase == Phase::Running {
                    svc.power_off(&id, vmm.as_ref(), &proc).await;
                }
                failpoint::stall("stop-powered-off").await;
                vmm.kill(&svc.paths(&id), &proc).await;
            }
            svc.clear_runtime_files(&id).await;
            rec.phase = Phase::Stopped;
            rec.process = None;
            rec.error = None;
            svc.store.update_machine(&rec)
        })
        .await
    }

    pub(super) async fn power_off(&self, id: &str, vmm: &dyn Vmm, proc: &VmProcess) {
        // Bounded: a guest that does not answer gets the stop timeout, then the kill.
        let agent = tokio::time::timeout(AGENT_CALL, self.agent(id))
            .await
            .unwrap_or_else(|_| {
                Err(Error::unavailable(format!(
                    "the guest agent did not answer within {AGENT_CALL:?}"
                )))
            });
        match agent {
            Ok(agent) => {
                if let Err(e) = agent.call(Op::PowerOff, Some(AGENT_CALL)).await {
                    tracing::warn!(machine = %id, "agent power-off: {}", e.message);
                }
            }
            Err(e) => tracing::warn!(machine = %id, "no agent for power-off: {}", e.message),
        }
        if !vmm.wait_exit(proc, self.cfg.stop_timeout()).await {
            tracing::warn!(machine = %id, "guest did not power off in time; killing the VMM");
        }
    }

    /// Boots a stopped or failed machine again from its own disks.
    pub async fn start_machine(self: &Arc<Self>, id: &str) -> Result<Machine> {
        validate_id("machine", id).map_err(Error::invalid)?;
        let boot = self.boot_permit()?;
        self.operation(Operation::on(OpKind::Start, id), |svc, id, _| async move {
            let _boot = boot;
            let mut rec = svc.record(&id)?;
            if !matches!(rec.phase, Phase::Stopped | Phase::Failed) {
                return Err(Error::conflict(format!(
                    "machine {id} is {}; only a stopped or failed machine can be started",
                    rec.phase.as_str()
                )));
            }
            if let Some(proc) = rec.process.take() {
                svc.vmm(rec.spec.vmm)?.kill(&svc.paths(&id), &proc).await;
            }
            svc.clear_runtime_files(&id).await;
            rec.phase = Phase::Starting;
            rec.error = None;
            svc.store.update_machine(&rec)?;
            let result = match svc.allocate_network(&mut rec) {
                Ok(a) => match svc.ensure_network(a.as_ref(), &rec.spec.network).await {
                    Ok(network) => svc.boot(&mut rec, network).await,
                    Err(e) => Err(e),
                },
                Err(e) => Err(e),
            };
            if let Err(e) = &result {
                rec.phase = Phase::Failed;
                rec.error = Some(e.message.clone());
                rec.process = None;
                svc.clear_runtime_files(&id).await;
                svc.store.update_machine(&rec)?;
            }
            result.map(|()| svc.machine_api(&rec))
        })
        .await
    }

    /// Destroys a machine and everything it has. A missing machine is already deleted.
    pub async fn delete_machine(self: &Arc<Self>, id: &str) -> Result<()> {
        validate_id("machine", id).map_err(Error::invalid)?;
        self.operation(Operation::on(OpKind::Delete, id), |svc, id, _| async move {
            if let Some(rec) = svc.store.get_machine(&id)? {
                svc.destroy(&id, Some(&rec)).await;
            }
            Ok(())
        })
        .await
    }

    /// Kills the VMM, removes the machine's files, sockets and record.
    pub(super) async fn destroy(&self, id: &str, rec: Option<&MachineRecord>) {
        if let Some((rec, proc)) = rec.and_then(|r| r.process.as_ref().map(|p| (r, p))) {
            match self.vmm(rec.spec.vmm) {
                Ok(vmm) => vmm.kill(&self.paths(id), proc).await,
                Err(e) => tracing::warn!(machine = %id, "{}", e.message),
            }
        }
        failpoint::stall("destroy-killed").await;
        self.clear_runtime_files(id).await;
        self.detach_network(id).await;
        if let Err(e) = storage::remove_tree(&self.paths(id).dir).await {
            tracing::warn!(machine = %id, "{}", e.message);
        }
        if let Err(e) = self.store.delete_machine(id) {
            tracing::warn!(machine = %id, "deleting record: {}", e.message);
        }
    }

    /// Drops the agent connection and removes what only a running VMM needs: its sockets, its
    /// RAM file (a cold boot starts from fresh memory), its cgroup.
    pub(super) async fn clear_runtime_files(&self, id: &str) {
        if let Some(rt) = self
            .runtimes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
        {
            if let Ok(mut agent) = rt.agent.try_lock() {
                *agent = None;
            }
        }
        let paths = self.paths(id);
        // Every backend's: the record that would say which may be gone (a crash between the
        // VMM's start and the record of its pid leaves only its runtime directory).
        for vmm in self.vmms.all() {
            vmm.clean_up(&paths).await;
        }
        for removed in [
            storage::remove_tree(&paths.sock_dir).await,
            storage::remove_tree(&paths.state_dir()).await,
        ] {
            if let Err(e) = removed {
                tracing::warn!(machine = %id, "{}", e.message);
            }
        }
        self.remove_cgroup(id).await;
    }
}

/// The hostname a guest config asks for (the machine id by default); other fields are refused.
pub(super) fn guest_hostname(machine_id: &str, guest: Option<&GuestConfig>) -> Result<String> {
    let guest = guest.cloned().unwrap_or_default();
    if guest.authorized_keys.is_some()
        || guest.trusted_user_ca_keys.is_some()
        || guest.login_webhook.is_some()
    {
        return Err(Error::invalid(
            "guest_config: only hostname is supported (the default image has no SSH server)",
        ));
    }
    let hostname = guest.hostname.unwrap_or_else(|| machine_id.to_string());
    validate_hostname(&hostname)?;
    Ok(hostname)
}

fn validate_hostname(h: &str) -> Result<()> {
    let ok = !h.is_empty()
        && h.len() <= 64
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
        && !h.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "guest_config.hostname {} is not a valid hostname",
            hearth_api::excerpt(h)
        )))
    }
}
