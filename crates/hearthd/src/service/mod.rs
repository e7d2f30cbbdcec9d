//! The service: what the API does, independent of HTTP. Every mutating operation on a machine
//! holds that machine's operation lock (a second one is refused with 409), writes its journal
//! row first and clears it last, and runs in a task of its own so a client that hangs up midway
//! cannot leave it half-done.

mod exec;
mod gc;
mod machines;
mod reconcile;
mod restore;
pub mod snapshots;
mod transfer;

use crate::agent::AgentClient;
use crate::artifacts::ArtifactCache;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::store::Store;
use crate::vmm::{MachinePaths, Vmm};
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
    vmm: Arc<dyn Vmm>,
    runtimes: Mutex<HashMap<String, Arc<Runtime>>>,
    /// Transfers using each snapshot; -1 while it is being deleted.
    snapshot_uses: Mutex<HashMap<String, i64>>,
    /// For object-store transfers.
    http: reqwest::Client,
}

/// In-memory state of one machine: its operation lock and its agent connection.
#[derive(Default)]
struct Runtime {
    op: tokio::sync::Mutex<()>,
    agent: tokio::sync::Mutex<Option<Arc<AgentClient>>>,
}

impl Runtime {
    /// Takes machine `id`'s operation lock; with another operation under way, 409.
    fn begin(&self, id: &str) -> Result<tokio::sync::MutexGuard<'_, ()>> {
        self.op
            .try_lock()
            .map_err(|_| Error::conflict(format!("machine {id} has an operation pending")))
    }
}

impl Service {
    pub fn new(cfg: Config, vmm: Arc<dyn Vmm>) -> Result<Arc<Service>> {
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
        let artifacts =
            ArtifactCache::new(&root.join("images"), store.clone(), cfg.cache_max_bytes)?;
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| Error::internal(format!("http client: {e}")))?;
        Ok(Arc::new(Service {
            cfg,
            store,
            artifacts,
            vmm,
            runtimes: Mutex::new(HashMap::new()),
            snapshot_uses: Mutex::new(HashMap::new()),
            http,
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

    fn forget_runtime(&self, id: &str) {
        self.runtimes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }

    /// Runs `op` on a task of its own, so it completes even when the caller goes away.
    async fn detached<T: Send + 'static>(
        fut: impl Future<Output = Result<T>> + Send + 'static,
    ) -> Result<T> {
        tokio::spawn(fut)
            .await
            .map_err(|e| Error::internal(format!("operation task failed: {e}")))?
    }

    /// The machine's agent connection, (re)connecting and saying hello when there is none.
    async fn agent(&self, id: &str) -> Result<Arc<AgentClient>> {
        let rt = self.runtime(id);
        let mut slot = rt.agent.lock().await;
        if let Some(agent) = slot.as_ref().filter(|a| !a.is_closed()) {
            return Ok(agent.clone());
        }
        let agent = Arc::new(AgentClient::connect(&self.paths(id).agent_socket()).await?);
        let deadline = Instant::now() + Duration::from_secs(10);
        agent.handshake(&nonce(), deadline, || true).await?;
        *slot = Some(agent.clone());
        Ok(agent)
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
