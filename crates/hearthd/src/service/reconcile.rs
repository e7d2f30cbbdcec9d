//! Reconcile: bring the records and the host back in line. At start-up it also finishes or
//! undoes the operations a crash interrupted (journal rows). Every pass marks machines whose VMM
//! died as failed and removes runtime leftovers of machines that no longer exist. It never acts
//! on a machine that has an operation under way, and re-reads each record under the machine's
//! lock before it acts. One bad record never stops the rest.

use super::Service;
use crate::failpoint;
use crate::storage;
use crate::store::{MachineRecord, OpKind, OpRecord};
use crate::vmm::{console, MachinePaths};
use hearth_api::Phase;
use std::collections::HashSet;

impl Service {
    /// The start-up pass: interrupted operations first, snapshots not yet on disk, stale
    /// templates, then a regular pass.
    pub async fn recover(&self) {
        match self.store.pending_ops() {
            Ok(ops) => {
                for op in ops {
                    tracing::info!(machine = %op.machine_id, kind = ?op.kind, "finishing an interrupted operation");
                    self.recover_op(&op).await;
                    if let Err(e) = self.store.end_op(op.id) {
                        tracing::warn!("clearing journal row {}: {}", op.id, e.message);
                    }
                }
            }
            Err(e) => tracing::error!("reading the journal: {}", e.message),
        }
        self.reattach_all().await;
        self.recover_unflushed_snapshots().await;
        self.sweep_templates().await;
        self.reconcile_pass().await;
    }

    /// Finishes or undoes one operation a crash interrupted.
    pub(super) async fn recover_op(&self, op: &OpRecord) {
        let rec = self.store.get_machine(&op.machine_id).ok().flatten();
        match (op.kind, rec) {
            // A machine that was being made and never ran is undone; one that was running, its
            // network complete, when the crash came is kept (its operation had finished but
            // for the journal).
            (OpKind::Create | OpKind::Restore | OpKind::Fork, Some(rec))
                if rec.phase == Phase::Running && self.network_complete(&rec).await =>
            {
                if op.kind == OpKind::Fork {
                    self.recover_fork_source(op).await;
                }
            }
            (OpKind::Create | OpKind::Restore | OpKind::Fork | OpKind::Delete, Some(rec)) => {
                self.destroy(&rec.id, Some(&rec)).await;
                if op.kind == OpKind::Fork {
                    self.recover_fork_source(op).await;
                }
            }
            (OpKind::Snapshot, rec) => {
                if let Some(id) = &op.snapshot_id {
                    let ready = self
                        .store
                        .get_snapshot(id)
                        .ok()
                        .flatten()
                        .is_some_and(|s| s.ready);
                    if !ready {
                        self.discard_partial_snapshot(id).await;
                    }
                }
                if let Some(rec) = rec {
                    self.resume_after_crash(&rec).await;
                }
            }
            (OpKind::Network, Some(rec)) => {
                // The record says what the rules must be.
                if let Err(e) = self.apply_network_policy(&rec).await {
                    tracing::warn!(machine = %rec.id, "egress policy: {}", e.message);
                }
            }
            // Relays are opened from the records at start; a half-made port has no record.
            (OpKind::Port, Some(_)) => {}
            // The start ended but for the journal.
            (OpKind::Start, Some(rec)) if rec.phase == Phase::Running && self.vmm_alive(&rec) => {}
            // The crash came before the start changed anything but, perhaps, a VMM it spawned.
            (OpKind::Start, Some(rec)) if matches!(rec.phase, Phase::Stopped | Phase::Failed) => {
                self.clear_runtime_files(&rec.id).await
            }
            (OpKind::Start, Some(rec)) => {
                self.mark_failed(rec, "the daemon stopped while the machine was starting")
                    .await
            }
            (OpKind::Stop, Some(mut rec)) => {
                let alive = self.vmm_alive(&rec);
                if let (Some(p), Ok(vmm)) = (rec.process.take(), self.vmm(rec.spec.vmm)) {
                    // The guest may not have been asked to power off yet: ask, as the stop would.
                    if rec.phase == Phase::Running && alive {
                        self.power_off(&rec.id, vmm.as_ref(), &p).await;
                    }
                    vmm.kill(&self.paths(&rec.id), &p).await;
                }
                self.clear_runtime_files(&rec.id).await;
                rec.phase = Phase::Stopped;
                rec.error = None;
                if let Err(e) = self.store.update_machine(&rec) {
                    tracing::warn!(machine = %rec.id, "{}", e.message);
                }
            }
            (_, None) => {
                self.destroy(&op.machine_id, None).await;
                if op.kind == OpKind::Fork {
                    self.recover_fork_source(op).await;
                }
            }
        }
    }

    /// A fork's source may have been left paused and frozen by the crash.
    async fn recover_fork_source(&self, op: &OpRecord) {
        let source = op.source_id.as_deref();
        if let Some(rec) = source.and_then(|id| self.store.get_machine(id).ok().flatten()) {
            self.resume_after_crash(&rec).await;
        }
    }

    /// Removes a snapshot that a crash or a failure interrupted (or whose files a host crash
    /// may have torn), files and record.
    pub(super) async fn discard_partial_snapshot(&self, id: &str) {
        if let Err(e) = storage::remove_tree(&self.snapshot_dir(id)).await {
            tracing::warn!(snapshot = id, "{}", e.message);
        }
        if let Err(e) = self.store.delete_snapshot(id) {
            tracing::warn!(snapshot = id, "{}", e.message);
        }
    }

    /// A machine whose snapshot a crash interrupted may be paused and frozen: resume and thaw
    /// (one that cannot be is marked failed).
    async fn resume_after_crash(&self, rec: &MachineRecord) {
        if !self.vmm_alive(rec) {
            return;
        }
        if self.resume_or_fail(rec).await.is_ok() && self.thaw_or_fail(rec).await.is_ok() {
            tracing::info!(machine = %rec.id, "resumed after an interrupted snapshot");
        }
    }

    /// Finds the VMMs of running machines again after a daemon restart; one that does not
    /// answer on its control socket is marked failed.
    async fn reattach_all(&self) {
        for rec in self.store.list_machines().unwrap_or_default() {
            let Some(proc) = rec.process.filter(|_| rec.phase == Phase::Running) else {
                continue;
            };
            let reattached = match self.vmm(rec.spec.vmm) {
                Ok(vmm) => vmm
                    .reattach(&self.paths(&rec.id), &proc)
                    .await
                    .map_err(Into::into),
                Err(e) => Err(e),
            };
            match reattached {
                Ok(()) => {
                    tracing::info!(machine = %rec.id, pid = proc.pid, "reattached");
                    if let Err(e) = self.confine_again(&rec, proc.pid) {
                        tracing::warn!(machine = %rec.id, "{}", e.message);
                    }
                }
                Err(e) => {
                    let reason = format!("lost the VMM across a daemon restart: {}", e.message);
                    self.mark_failed(rec, &reason).await;
                }
            }
        }
    }

    pub async fn reconcile_pass(&self) {
        self.retry_unended_rows();
        let records = match self.store.list_machines() {
            Ok(r) => r,
            Err(e) => {
                tracing::error!("reconcile: listing machines: {}", e.message);
                return;
            }
        };
        failpoint::delay("reconcile-listed").await;
        for listed in &records {
            if !matches!(listed.phase, Phase::Running | Phase::Starting) {
                continue;
            }
            // A machine with an operation under way is that operation's business.
            let rt = self.runtime(&listed.id);
            let Ok(_op) = rt.op.try_lock() else { continue };
            // The list may be stale: an operation may have ended since it was read.
            let Ok(Some(rec)) = self.store.get_machine(&listed.id) else {
                continue;
            };
            let running = matches!(rec.phase, Phase::Running | Phase::Starting);
            if running && !self.vmm_alive(&rec) {
                let paths = self.paths(&rec.id);
                console::drained(&paths, console::Log::Console).await;
                let console = paths.console_tail(5);
                let reason = format!("the VMM process exited unexpectedly; console:\n{console}");
                self.mark_failed(rec, &reason).await;
            }
        }
        self.remove_leftovers().await;
        self.reopen_ports().await;
        let ids: Vec<String> = self
            .runtimes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect();
        for id in ids {
            self.release_runtime(&id);
        }
    }

    /// The machine's recorded VMM still runs.
    pub(super) fn vmm_alive(&self, rec: &MachineRecord) -> bool {
        match (&rec.process, self.vmm(rec.spec.vmm)) {
            (Some(p), Ok(vmm)) => vmm.is_alive(p),
            _ => false,
        }
    }

    pub(super) async fn mark_failed(&self, mut rec: MachineRecord, reason: &str) {
        tracing::warn!(machine = %rec.id, "machine failed: {reason}");
        if let (Some(p), Ok(vmm)) = (rec.process.take(), self.vmm(rec.spec.vmm)) {
            vmm.kill(&self.paths(&rec.id), &p).await;
        }
        self.clear_runtime_files(&rec.id).await;
        rec.phase = Phase::Failed;
        rec.error = Some(reason.to_string());
        if let Err(e) = self.store.update_machine(&rec) {
            tracing::warn!(machine = %rec.id, "{}", e.message);
        }
    }

    /// Machine, snapshot and socket directories that belong to no record and to no operation
    /// in flight, and any VMM still running from one of them. Decided and done under the sweep
    /// lock, which an operation takes to write its journal row before it makes any file.
    async fn remove_leftovers(&self) {
        let _sweep = self.sweep.lock().await;
        // The journal first: no row can begin while the sweep lock is held, so an operation
        // that ends after this read has its record in the lists read next.
        let (ops, records, snapshot_ids) = match (
            self.store.pending_ops(),
            self.store.list_machines(),
            self.store.snapshot_ids(),
        ) {
            (Ok(o), Ok(r), Ok(s)) => (o, r, s),
            _ => {
                tracing::warn!("reconcile: cannot read the records; no leftovers removed");
                return;
            }
        };
        let mut known: HashSet<String> = records.into_iter().map(|r| r.id).collect();
        let mut snapshots: HashSet<String> = snapshot_ids.into_iter().collect();
        for op in ops {
            known.insert(op.machine_id);
            snapshots.extend(op.snapshot_id);
        }
        self.remove_network_leftovers(&known).await;
        self.remove_cgroup_leftovers(&known).await;
        let sock_dirs: HashSet<_> = known.iter().map(|id| self.paths(id).sock_dir).collect();
        for entry in read_dir(&self.machines_dir()) {
            if !known.contains(entry.file_name().to_string_lossy().as_ref()) {
                tracing::info!(
                    "removing leftover machine directory {}",
                    entry.path().display()
                );
                let _ = storage::remove_tree(&entry.path()).await;
            }
        }
        for entry in read_dir(&self.cfg.root.join("snapshots")) {
            if !snapshots.contains(entry.file_name().to_string_lossy().as_ref()) {
                tracing::info!(
                    "removing leftover snapshot directory {}",
                    entry.path().display()
                );
                let _ = storage::remove_tree(&entry.path()).await;
            }
        }
        for entry in read_dir(&self.cfg.root.join("run")) {
            let dir = entry.path();
            if sock_dirs.contains(&dir) {
                continue;
            }
            tracing::info!("removing leftover runtime directory {}", dir.display());
            // Its machine directory, if any, went above.
            let paths = MachinePaths {
                dir: dir.clone(),
                sock_dir: dir,
            };
            for vmm in self.vmms.all() {
                vmm.clean_up(&paths).await;
            }
            let _ = storage::remove_tree(&paths.sock_dir).await;
        }
        // Jails (`jail/<VMM binary>/<runtime directory's name>`) of machines no record owns:
        // the Firecracker backend's clean-up above removes its own, but a daemon started
        // without that backend does not run it.
        let owned: HashSet<String> = sock_dirs
            .iter()
            .filter_map(|d| d.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .collect();
        for binary in read_dir(&self.cfg.root.join("jail")) {
            for jail in read_dir(&binary.path()) {
                if !owned.contains(jail.file_name().to_string_lossy().as_ref()) {
                    tracing::info!("removing leftover jail {}", jail.path().display());
                    let _ = storage::remove_tree(&jail.path()).await;
                }
            }
        }
    }
}

impl Service {
    /// The cgroups of machines that no record or operation owns, and any process in them (a
    /// VMM whose machine is gone, say one a crash left before its pid was recorded).
    async fn remove_cgroup_leftovers(&self, known: &HashSet<String>) {
        let Some(cgroups) = self.cgroups.clone() else {
            return;
        };
        for machine in cgroups.machines() {
            if known.contains(&machine) {
                continue;
            }
            tracing::info!(machine = %machine, "removing a leftover cgroup");
            let cgroups = cgroups.clone();
            let removed = tokio::task::spawn_blocking(move || {
                cgroups.kill_members(&machine);
                cgroups.remove(&machine)
            })
            .await;
            if let Ok(Err(e)) = removed {
                tracing::warn!("{e}");
            }
        }
    }

    /// Removes the daemon's cgroup for machines once none is left in it.
    pub fn release_cgroups(&self) {
        if let Some(cgroups) = &self.cgroups {
            cgroups.release();
        }
    }
}

fn read_dir(dir: &std::path::Path) -> Vec<std::fs::DirEntry> {
    std::fs::read_dir(dir)
        .map(|it| it.flatten().collect())
        .unwrap_or_default()
}
