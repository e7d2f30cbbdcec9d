//! Published ports: a listener on the host (`--publish-address`, loopback by default) for each,
//! relaying every connection to the guest's port through the machine's host-side address. The
//! relay lives in the daemon, so it is opened again when the daemon starts; the guest's address
//! never changes, so a port survives stop and start.

use crate::error::{Error, Result};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Connections one published port relays at once; more wait to be accepted.
const MAX_CONNECTIONS: usize = 256;
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// How long a connection waits for the guest to accept it.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Default)]
pub struct Relays {
    open: Mutex<HashMap<String, JoinHandle<()>>>,
}

impl Relays {
    /// Binds `listen` and relays its connections to `target`; a port in use is a conflict.
    pub async fn open(&self, id: &str, listen: SocketAddr, target: SocketAddr) -> Result<()> {
        let listener = TcpListener::bind(listen).await.map_err(|e| {
            if e.kind() == std::io::ErrorKind::AddrInUse {
                Error::conflict(format!("host port {} is in use", listen.port()))
            } else {
                Error::internal(format!("binding {listen}: {e}"))
            }
        })?;
        let id_owned = id.to_string();
        let task = tokio::spawn(async move {
            // The connections belong to this task: stopping the port stops them too.
            let mut conns = tokio::task::JoinSet::new();
            loop {
                while conns.try_join_next().is_some() {}
                if conns.len() >= MAX_CONNECTIONS {
                    conns.join_next().await;
                    continue;
                }
                match listener.accept().await {
                    Ok((client, _)) => {
                        conns.spawn(relay(client, target));
                    }
                    Err(e) => {
                        // Out of descriptors, say: wait rather than spin.
                        tracing::warn!(port = %id_owned, "accept: {e}");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                    }
                }
            }
        });
        if let Some(old) = self.lock().insert(id.to_string(), task) {
            old.abort();
        }
        Ok(())
    }

    /// Stops relaying port `id`, and its connections with it.
    pub fn close(&self, id: &str) {
        if let Some(task) = self.lock().remove(id) {
            task.abort();
        }
    }

    pub fn is_open(&self, id: &str) -> bool {
        self.lock().contains_key(id)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, JoinHandle<()>>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }
}

async fn relay(mut client: TcpStream, target: SocketAddr) {
    let _ = client.set_nodelay(true);
    match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)).await {
        Err(_) => tracing::debug!(%target, "published port: the guest did not answer"),
        Ok(Ok(mut guest)) => {
            let _ = guest.set_nodelay(true);
            let _ = tokio::io::copy_bidirectional(&mut client, &mut guest).await;
        }
        Ok(Err(e)) => tracing::debug!(%target, "published port: {e}"),
    }
}
