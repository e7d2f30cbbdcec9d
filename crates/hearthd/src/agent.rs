//! The host side of the agent channel: one connection per machine to the VMM's agent socket,
//! requests multiplexed by id, a reader task that routes replies.

use crate::error::{Error, Result};
use hearth_proto::{encode_line, GuestMessage, Identity, LineBuffer, Op, Reply, Request};
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::{oneshot, Notify};

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Reply>>>>;

pub struct AgentClient {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    pending: Pending,
    next_id: AtomicU64,
    closed: Arc<AtomicBool>,
    ready: Arc<Notify>,
    identity: Mutex<Option<Identity>>,
}

/// How often the host repeats its hello while the guest boots.
const HELLO_RETRY: Duration = Duration::from_millis(250);

impl AgentClient {
    pub async fn connect(socket: &Path) -> Result<AgentClient> {
        let stream = UnixStream::connect(socket)
            .await
            .map_err(|e| Error::unavailable(format!("agent socket {}: {e}", socket.display())))?;
        let (mut reader, mut writer) = stream.into_split();
        // Ends whatever partial frame a previous host connection left in the guest's buffer.
        writer.write_all(b"\n").await?;
        let pending: Pending = Arc::default();
        let closed = Arc::new(AtomicBool::new(false));
        let ready = Arc::new(Notify::new());
        let (p, c, r) = (pending.clone(), closed.clone(), ready.clone());
        tokio::spawn(async move {
            let mut lines = LineBuffer::default();
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                let n = match reader.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                for line in lines.push(&buf[..n]) {
                    match serde_json::from_slice::<GuestMessage>(&line) {
                        Ok(GuestMessage::Reply { id, body }) => {
                            let tx = p.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
                            if let Some(tx) = tx {
                                let _ = tx.send(body);
                            }
                        }
                        Ok(GuestMessage::Ready(identity)) => {
                            tracing::debug!(?identity, "agent ready");
                            r.notify_waiters();
                        }
                        Err(e) if !line.is_empty() => tracing::debug!("bad agent frame: {e}"),
                        Err(_) => {}
                    }
                }
            }
            c.store(true, Ordering::SeqCst);
            // Dropping the senders fails every waiting call at once.
            p.lock().unwrap_or_else(|e| e.into_inner()).clear();
            r.notify_waiters();
        });
        Ok(AgentClient {
            writer: tokio::sync::Mutex::new(writer),
            pending,
            next_id: AtomicU64::new(1),
            closed,
            ready,
            identity: Mutex::new(None),
        })
    }

    /// What the agent said of itself in the handshake.
    pub fn identity(&self) -> Option<Identity> {
        self.identity
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    async fn send(&self, op: Op) -> Result<oneshot::Receiver<Reply>> {
        if self.is_closed() {
            return Err(Error::unavailable("agent connection closed"));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, tx);
        let line = encode_line(&Request { id, op });
        let mut w = self.writer.lock().await;
        if let Err(e) = w.write_all(&line).await {
            self.pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
            return Err(Error::unavailable(format!("writing to the agent: {e}")));
        }
        Ok(rx)
    }

    /// Sends `op` and waits for its reply, up to `timeout` when given.
    pub async fn call(&self, op: Op, timeout: Option<Duration>) -> Result<Reply> {
        let rx = self.send(op).await?;
        let reply = match timeout {
            Some(t) => tokio::time::timeout(t, rx).await.map_err(|_| {
                Error::unavailable(format!("the guest agent did not answer within {t:?}"))
            })?,
            None => rx.await,
        };
        match reply {
            Ok(Reply::Error { message }) => Err(Error::invalid(format!("guest agent: {message}"))),
            Ok(reply) => Ok(reply),
            Err(_) => Err(Error::unavailable(
                "the guest agent went away (VM stopped or crashed)",
            )),
        }
    }

    /// Says hello until the agent echoes `nonce`, the connection closes, `alive` reports the
    /// VMM gone, or `deadline` passes.
    pub async fn handshake(
        &self,
        nonce: &str,
        deadline: Instant,
        alive: impl Fn() -> bool,
    ) -> Result<()> {
        loop {
            let ready = self.ready.notified();
            let rx = self
                .send(Op::Hello {
                    nonce: nonce.to_string(),
                })
                .await?;
            let wait = HELLO_RETRY.min(deadline.saturating_duration_since(Instant::now()));
            tokio::select! {
                reply = rx => match reply {
                                        Ok(Reply::Hello { nonce: n, identity }) if n == nonce => {
                        *self.identity.lock().unwrap_or_else(|e| e.into_inner()) = Some(identity);
                        return Ok(());
                    }
                    Ok(other) => return Err(Error::internal(format!("unexpected hello reply: {other:?}"))),
                    Err(_) => {}
                },
                // The agent just opened its port: say hello again right away.
                _ = ready => {}
                _ = tokio::time::sleep(wait) => {}
            }
            if self.is_closed() || !alive() {
                return Err(Error::unavailable(
                    "the VM exited before its agent answered",
                ));
            }
            if Instant::now() >= deadline {
                return Err(Error::unavailable("the guest agent did not answer in time"));
            }
        }
    }
}
