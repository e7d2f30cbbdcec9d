//! The service: what the API does, independent of HTTP. Every mutating operation on a machine
//! runs through [`Service::operation`]: in a task of its own (a client that hangs up midway
//! cannot leave it half-done), under that machine's operation lock (a second one is refused
//! with 409), with its journal row written before it touches anything and cleared when it ends.

mod compat;
mod exec;
mod files;
pub use files::{ByteStream, Download};
mod processes;
pub use processes::MAX_STDIN;
mod fork;
mod gc;
mod limits;
mod machines;
mod network;
mod reconcile;
mod restore;
pub mod snapshots;
mod templates;
mod transfer;

use crate::agent::AgentClient;
use crate::artifacts::ArtifactCache;
use crate::cgroup::Cgroups;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::net::ports::Relays;
use crate::net::Net;
use crate::store::{OpKind, Store};
use crate::vmm::{MachinePaths, Vmm, Vmms};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Longest data root path for which every per-machine socket path fits in 107 bytes.
pub const MAX_ROOT_LEN: usize = 107 - "/run/".len() - 16 - "/control.sock".len();

pub struct Service {
    pub cfg: Config,
    store: Arc<Store>,
    artifacts: ArtifactCache,
    vmms: Vmms,
    runtimes: Mutex<HashMap<String, Arc<Runtime>>>,
    /// Held by the leftover sweep while it decides what no record owns, and by an operation
    /// while it writes its journal row: an operation's files appear only after its row, so the
    /// sweep never removes the work of one in flight.
    sweep: tokio::sync::Mutex<()>,
    /// Journal rows of ended operations that could not be cleared yet.
    unended: Mutex<Vec<i64>>,
    /// Transfers using each snapshot; -1 while it is being deleted.
    snapshot_uses: Mutex<HashMap<String, i64>>,
    /// For object-store transfers.
    http: reqwest::Client,
    /// Machines' networks; none with `--no-network`.
    net: Option<Arc<Net>>,
    /// Machines' cgroups; none with `--cgroups off`.
    cgroups: Option<Arc<Cgroups>>,
    /// The relays of published ports.
    relays: Relays,
    /// Boots under way, at most `--max-concurrent-boots`.
    boots: Arc<tokio::sync::Semaphore>,
    /// Held while a new machine's record is checked against `--max-machines` and inserted.
    admit: Mutex<()>,
    /// Held while a template directory is renamed in or out of place.
    templates_renamed: Mutex<()>,
}

/// In-memory state of one machine: its operation lock and its agent connection.
#[derive(Default)]
struct Runtime {
    op: Arc<tokio::sync::Mutex<()>>,
    agent: tokio::sync::Mutex<Option<Arc<AgentClient>>>,
}

/// An operation's hold on its machine's lock. The operation keeps it to its end unless the
/// body lets it go early (a snapshot, once its machine runs again, hashes outside the lock).
#[derive(Clone)]
struct OpLock(Arc<Mutex<Option<tokio::sync::OwnedMutexGuard<()>>>>);

impl OpLock {
    fn release(&self) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

/// What an operation is, for its journal row.
#[derive(Debug, Clone)]
struct Operation {
    kind: OpKind,
    machine_id: String,
    snapshot_id: Option<String>,
    source_id: Option<String>,
    /// The operation makes the machine: it must not exist yet.
    creates: bool,
}

impl Operation {
    fn on(kind: OpKind, machine_id: &str) -> Operation {
        Operation {
            kind,
            machine_id: machine_id.to_string(),
            snapshot_id: None,
            source_id: None,
            creates: matches!(kind, OpKind::Create | OpKind::Restore | OpKind::Fork),
        }
    }

    fn snapshot(self, id: &str) -> Operation {
        Operation {
            snapshot_id: Some(id.to_string()),
            ..self
        }
    }

    fn source(self, id: &str) -> Operation {
        Operation {
            source_id: Some(id.to_string()),
            ..self
        }
    }
}

impl Runtime {
    /// Takes machine `id`'s operation lock; with another operation under way, 409.
    fn begin(&self, id: &str) -> Result<tokio::sync::OwnedMutexGuard<()>> {
        self.op
            .clone()
            .try_lock_owned()
            .map_err(|_| Error::conflict(format!("machine {id} has an operation pending")))
    }
}

impl Service {
    pub fn new(
        cfg: Config,
        vmms: Vmms,
        net: Option<Net>,
        cgroups: Option<Cgroups>,
    ) -> Result<Arc<Service>> {
        let root = &cfg.root;
        if root.as_os_str().len() > MAX_ROOT_LEN {
            return Err(Error::invalid(format!(
                "data root {} is longer than {MAX_ROOT_LEN} bytes: machine sockets would not fit",
                root.display()
            )));
        }
        for dir in ["state", "images", "machines", "run", "snapshots"] {
            std::fs::create_dir_all(root.join(dir))?;
        }
        let store = Arc::new(Store::open(&root.join("state").join("hearth.db"))?);
        let artifacts = ArtifactCache::new(
            &cfg.images_dir(),
            store.clone(),
            cfg.cache_max_bytes,
            &cfg.artifact_dirs(),
            cfg.allow_file_urls_over_tcp,
            cfg.max_storage_bytes,
        )?;
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| Error::internal(format!("http client: {e}")))?;
        Ok(Arc::new(Service {
            store,
            artifacts,
            vmms,
            runtimes: Mutex::new(HashMap::new()),
            sweep: tokio::sync::Mutex::new(()),
            unended: Mutex::new(Vec::new()),
            snapshot_uses: Mutex::new(HashMap::new()),
            http,
            net: net.map(Arc::new),
            cgroups: cgroups.map(Arc::new),
            relays: Relays::default(),
            boots: Arc::new(tokio::sync::Semaphore::new(cfg.max_concurrent_boots)),
            admit: Mutex::new(()),
            templates_renamed: Mutex::new(()),
            cfg,
        }))
    }

    pub fn paths(&self, id: &str) -> MachinePaths {
        machine_paths(&self.cfg.root, id)
    }

    fn machines_dir(&self) -> PathBuf {
        self.cfg.root.join("machines")
    }

    fn runtime(&self, id: &str) -> Arc<Runtime> {
        self.runtimes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(id.to_string())
            .or_default()
            .clone()
    }

    /// Clears journal row `row`; one that cannot be cleared now is tried again by every
    /// reconcile pass, so that no later start replays an operation that ended.
    fn end_row(&self, row: i64) {
        if let Err(e) = self.store.end_op(row) {
            tracing::warn!("clearing journal row {row}: {}", e.message);
            self.unended
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(row);
        }
    }

    /// Tries again to clear the journal rows of operations that ended.
    fn retry_unended_rows(&self) {
        let rows = std::mem::take(&mut *self.unended.lock().unwrap_or_else(|e| e.into_inner()));
        for row in rows {
            self.end_row(row);
        }
    }

    /// Drops machine `id`'s in-memory state once nobody uses it and it has no record, so ids
    /// that were only asked about (or whose machine is gone) do not accumulate.
    fn release_runtime(&self, id: &str) {
        let mut map = self.runtimes.lock().unwrap_or_else(|e| e.into_inner());
        let unused = map.get(id).is_some_and(|rt| Arc::strong_count(rt) == 1);
        if unused && matches!(self.store.get_machine(id), Ok(None)) {
            map.remove(id);
        }
    }

    /// Runs a mutating operation on machine `id` on a task of its own, so it completes even when
    /// the caller goes away: under the machine's operation lock (409 when another holds it),
    /// with a journal row written before `body` (given the service and the machine id) runs and
    /// cleared after it ends, whatever the
    /// outcome. An operation that `creates` the machine is refused (409) when it exists. A crash
    /// leaves the row for [`Service::recover`] to finish or undo the operation.
    async fn operation<T, F, Fut>(self: &Arc<Self>, op: Operation, body: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(Arc<Service>, String, OpLock) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T>> + Send + 'static,
    {
        let svc = self.clone();
        let Operation {
            kind,
            machine_id: id,
            snapshot_id: snapshot,
            source_id: source,
            creates,
        } = op;
        let task = tokio::spawn(async move {
            let rt = svc.runtime(&id);
            let result = async {
                let lock = OpLock(Arc::new(Mutex::new(Some(rt.begin(&id)?))));
                if creates && svc.store.get_machine(&id)?.is_some() {
                    return Err(Error::conflict(format!("machine {id} already exists")));
                }
                let row = {
                    let _sweep = svc.sweep.lock().await;
                    svc.store
                        .begin_op(kind, &id, snapshot.as_deref(), source.as_deref())?
                };
                let result = match tokio::spawn(body(svc.clone(), id.clone(), lock.clone())).await {
                    Ok(result) => result,
                    // A panic leaves the operation half-done: finish or undo it now, as a
                    // restart would, rather than leave its row for a later start to replay.
                    Err(e) => {
                        tracing::error!(machine = %id, "operation {kind:?} failed: {e}");
                        let op = svc
                            .store
                            .pending_ops()
                            .ok()
                            .and_then(|ops| ops.into_iter().find(|op| op.id == row));
                        if let Some(op) = op {
                            svc.recover_op(&op).await;
                        }
                        Err(Error::internal(format!("operation {kind:?} failed: {e}")))
                    }
                };
                svc.end_row(row);
                lock.release();
                result
            }
            .await;
            drop(rt);
            svc.release_runtime(&id);
            result
        });
        task.await
            .map_err(|e| Error::internal(format!("operation task failed: {e}")))?
    }

    /// The machine's agent connection, (re)connecting and saying hello when there is none.
    async fn agent(&self, id: &str) -> Result<Arc<AgentClient>> {
        let rt = self.runtime(id);
        let mut slot = rt.agent.lock().await;
        if let Some(agent) = slot.as_ref().filter(|a| !a.is_closed()) {
            return Ok(agent.clone());
        }
        let rec = self.record(id)?;
        let process = rec
            .process
            .ok_or_else(|| Error::conflict(format!("machine {id} is not running")))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let stream = self
            .vmm(rec.spec.vmm)?
            .connect_agent(&self.paths(id), &process, deadline)
            .await?;
        let agent = Arc::new(AgentClient::new(stream));
        agent
            .handshake(&nonce(), deadline, || true, || None)
            .await?;
        *slot = Some(agent.clone());
        Ok(agent)
    }

    /// The backend of `kind`; 400 when this daemon runs without it.
    fn vmm(&self, kind: hearth_api::VmmKind) -> Result<&Arc<dyn Vmm>> {
        Ok(self.vmms.get(kind)?)
    }

    /// Starts the periodic reconcile pass.
    pub fn spawn_reconciler(self: &Arc<Self>) {
        let svc = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(svc.cfg.reconcile_interval());
            tick.tick().await;
            loop {
                tick.tick().await;
                svc.reconcile_pass().await;
            }
        });
    }
}

/// Where machine `id` keeps its files under data root `root`.
pub fn machine_paths(root: &std::path::Path, id: &str) -> MachinePaths {
    let hash = hex::encode(Sha256::digest(id.as_bytes()));
    MachinePaths {
        dir: root.join("machines").join(id),
        sock_dir: root.join("run").join(&hash[..16]),
    }
}

/// A fresh random token: per-boot nonces, machine ids.
pub fn nonce() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::{StateFile, VmProcess, VmSpec, VmmError};
    use clap::Parser;
    use hearth_api::{CreateSnapshotRequest, ErrorCode, ForkRequest, VmmKind};
    use std::path::Path;

    /// A VMM that never starts anything: the operations below end before they would need one.
    struct NoVmm;

    fn none<T>() -> Result<T, VmmError> {
        Err(VmmError::control("testing", "no VMM in this test"))
    }

    #[async_trait::async_trait]
    impl Vmm for NoVmm {
        fn kind(&self) -> VmmKind {
            VmmKind::Qemu
        }
        fn version(&self) -> String {
            "none".into()
        }
        async fn boot(&self, _: &VmSpec) -> Result<VmProcess, VmmError> {
            none()
        }
        async fn reattach(&self, _: &MachinePaths, _: &VmProcess) -> Result<(), VmmError> {
            none()
        }
        async fn restore(&self, _: &VmSpec, _: &Path) -> Result<VmProcess, VmmError> {
            none()
        }
        fn is_alive(&self, _: &VmProcess) -> bool {
            false
        }
        async fn pause(&self, _: &MachinePaths) -> Result<(), VmmError> {
            none()
        }
        async fn resume(&self, _: &MachinePaths) -> Result<(), VmmError> {
            none()
        }
        async fn save_state(
            &self,
            _: &MachinePaths,
            _: &VmProcess,
            _: &Path,
        ) -> Result<Vec<StateFile>, VmmError> {
            none()
        }
        async fn wait_exit(&self, _: &VmProcess, _: Duration) -> bool {
            true
        }
        async fn kill(&self, _: &MachinePaths, _: &VmProcess) {}
        async fn clean_up(&self, _: &MachinePaths) {}
        async fn connect_agent(
            &self,
            _: &MachinePaths,
            _: &VmProcess,
            _: Instant,
        ) -> Result<tokio::net::UnixStream, VmmError> {
            none()
        }
    }

    #[tokio::test]
    async fn operations_on_missing_machines_leave_no_state_behind() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = Config::parse_from(["hearthd", "--root", dir.path().to_str().unwrap()]);
        let svc = Service::new(
            cfg,
            Vmms::new(VmmKind::Qemu, vec![Arc::new(NoVmm)]),
            None,
            None,
        )
        .unwrap();
        for i in 0..20 {
            let id = format!("ghost{i}");
            let snap = CreateSnapshotRequest {
                snapshot_id: format!("s{i}"),
                kind: None,
            };
            let fork = ForkRequest {
                machine_id: format!("fork{i}"),
                guest_config: None,
                network: None,
                ports: None,
            };
            let codes = [
                svc.stop_machine(&id).await.unwrap_err().code,
                svc.start_machine(&id).await.unwrap_err().code,
                svc.create_snapshot(&id, snap).await.unwrap_err().code,
                svc.fork_machine(&id, fork).await.unwrap_err().code,
            ];
            assert_eq!(codes, [ErrorCode::NotFound; 4]);
            svc.delete_machine(&id).await.unwrap();
        }
        assert!(svc.runtimes.lock().unwrap().is_empty());
        assert!(svc.store.pending_ops().unwrap().is_empty());
        assert!(svc.store.snapshot_ids().unwrap().is_empty());
    }
}
