//! The TCP listener: TLS (rustls) when a certificate is given, the bearer token always, and a
//! log line for every request refused for want of it. Plain HTTP is served only on a loopback
//! address, where the token never crosses a network, unless `--insecure-tcp` says the network is
//! trusted.

use crate::config::Config;
use anyhow::{bail, ensure, Context, Result};
use axum::extract::{ConnectInfo, Request};
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::future::Future;
use std::io::Read;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{self, ServerConfig};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// Connections in their TLS handshake or waiting to be served; further ones wait in the
/// kernel's backlog.
const MAX_HANDSHAKES: usize = 256;
/// How long a client has to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client has to send a request's headers, counted from the end of the previous
/// answer on a kept-alive connection (so also how long a connection may sit idle).
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// The bound TCP listener and the token its requests must carry.
pub struct TcpApi {
    listener: Listener,
    token: String,
    limits: ConnLimits,
}

/// What the clients of the TCP listener may hold.
#[derive(Clone, Copy, Debug)]
struct ConnLimits {
    header_timeout: Duration,
    max_connections: u32,
}

enum Listener {
    Plain(TcpListener),
    Tls(TlsListener),
}

impl TcpApi {
    /// Reads the token and the TLS material and binds `addr`; refuses what would be unsafe.
    pub async fn bind(cfg: &Config, addr: SocketAddr) -> Result<TcpApi> {
        let path = cfg
            .token_file
            .as_ref()
            .context("--listen needs --token-file: the TCP API always requires a bearer token")?;
        let token = read_token(path)?;
        let tls = match (&cfg.tls_cert, &cfg.tls_key) {
            (Some(cert), Some(key)) => Some(tls_acceptor(cert, key)?),
            _ => None,
        };
        if tls.is_none() && !addr.ip().is_loopback() && !cfg.insecure_tcp {
            bail!(
                "--listen {addr} without TLS would send the bearer token in the clear: give \
                 --tls-cert and --tls-key, listen on a loopback address, or pass --insecure-tcp \
                 on a network that is encrypted already"
            );
        }
        let tcp = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        let listener = match tls {
            Some(acceptor) => Listener::Tls(TlsListener::new(tcp, acceptor)?),
            None => Listener::Plain(tcp),
        };
        let limits = ConnLimits {
            header_timeout: HEADER_TIMEOUT,
            max_connections: cfg.max_tcp_connections,
        };
        Ok(TcpApi {
            listener,
            token,
            limits,
        })
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        match &self.listener {
            Listener::Plain(l) => l.local_addr(),
            Listener::Tls(l) => Ok(l.local),
        }
    }

    /// Serves `app`, behind the bearer token, until `stop` completes.
    pub fn spawn(
        self,
        app: Router,
        stop: impl Future<Output = ()> + Send + 'static,
        servers: &mut tokio::task::JoinSet<std::io::Result<()>>,
    ) -> std::io::Result<()> {
        let addr = self.local_addr()?;
        let app = app.layer(axum::middleware::from_fn_with_state(
            Arc::new(self.token),
            crate::api::require_bearer,
        ));
        match self.listener {
            Listener::Tls(l) => {
                tracing::info!(%addr, "hearthd listening on TCP with TLS (bearer token required)");
                servers.spawn(serve(l, app, self.limits, stop));
            }
            Listener::Plain(l) => {
                if addr.ip().is_loopback() {
                    tracing::info!(%addr, "hearthd listening on loopback TCP without TLS (bearer token required)");
                } else {
                    tracing::warn!(%addr, "hearthd listening on TCP without TLS (--insecure-tcp): the bearer token crosses the network in the clear");
                }
                servers.spawn(serve(l, app, self.limits, stop));
            }
        }
        Ok(())
    }
}

/// Serves `app` on the connections `listener` hands out until `stop`, then lets them finish.
/// HTTP/1.1 through hyper, whose timer closes a connection whose client takes longer than the
/// header timeout to send a request's headers (or to start its next request); at most
/// `max_connections` at once, an attached terminal's included, further ones waiting in the
/// kernel's backlog. (`axum::serve` has neither: a client that sends nothing would hold its
/// connection for ever.)
async fn serve<L>(
    mut listener: L,
    app: Router,
    limits: ConnLimits,
    stop: impl Future<Output = ()>,
) -> std::io::Result<()>
where
    L: axum::serve::Listener<Addr = SocketAddr>,
    L::Io: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let places = Arc::new(Semaphore::new(limits.max_connections as usize));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let (stopping, stopped) = watch::channel(false);
    tokio::pin!(stop);
    loop {
        let place = tokio::select! {
            _ = &mut stop => break,
            place = places.clone().acquire_owned() => place.expect("never closed"),
        };
        let (io, remote) = tokio::select! {
            _ = &mut stop => break,
            conn = listener.accept() => conn,
        };
        let service = tower::ServiceExt::map_request(app.clone(), move |mut req: Request<_>| {
            req.extensions_mut().insert(ConnectInfo(RemoteAddr(remote)));
            req
        });
        let conn = http
            .serve_connection(
                TokioIo::new(Held { io, _place: place }),
                TowerToHyperService::new(service),
            )
            .with_upgrades();
        let mut stopped = stopped.clone();
        tokio::spawn(async move {
            tokio::pin!(conn);
            let served = tokio::select! {
                served = conn.as_mut() => served,
                _ = async { stopped.wait_for(|stop| *stop).await.map(drop) } => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = served {
                tracing::debug!(%remote, "TCP connection: {e}");
            }
        });
    }
    let _ = stopping.send(true);
    // A connection holds its place until it ends.
    let _ = places.acquire_many(limits.max_connections).await;
    Ok(())
}

/// A connection with its place among those served at once: the place is given back when the
/// connection closes, also after an upgrade (an attached terminal's WebSocket keeps it).
struct Held<I> {
    io: I,
    _place: OwnedSemaphorePermit,
}

impl<I: AsyncRead + Unpin> AsyncRead for Held<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Held<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// The token in `path`, which only its owner may read or write: anyone else who could read it
/// could call the API.
pub fn read_token(path: &Path) -> Result<String> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mode = file.metadata()?.permissions().mode();
    ensure!(
        mode & 0o077 == 0,
        "the token file {} has mode {:04o}: only its owner may have access to it \
         (chmod 600 {})",
        path.display(),
        mode & 0o7777,
        path.display()
    );
    let mut token = String::new();
    file.read_to_string(&mut token)
        .with_context(|| format!("reading {}", path.display()))?;
    let token = token.trim().to_string();
    ensure!(
        !token.is_empty(),
        "the token file {} is empty",
        path.display()
    );
    Ok(token)
}

/// A TLS acceptor for the certificate chain and key in these PEM files (HTTP/1.1 only, as
/// the API is served).
fn tls_acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor> {
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("reading the TLS certificate {}", cert.display()))?;
    ensure!(
        !certs.is_empty(),
        "the TLS certificate file {} holds no certificate",
        cert.display()
    );
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("reading the TLS key {}", key.display()))?;
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .context("the TLS certificate and key")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// A listener that hands out connections once their TLS handshake is done. Handshakes run
/// side by side, each with a deadline, so a client that stalls in one holds up nobody.
pub struct TlsListener {
    local: SocketAddr,
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
}

impl TlsListener {
    fn new(tcp: TcpListener, acceptor: TlsAcceptor) -> std::io::Result<TlsListener> {
        let local = tcp.local_addr()?;
        let (tx, ready) = mpsc::channel(16);
        let permits = Arc::new(Semaphore::new(MAX_HANDSHAKES));
        // Ends when the server drops the listener.
        tokio::spawn(async move {
            loop {
                let permit = tokio::select! {
                    _ = tx.closed() => return,
                    permit = permits.clone().acquire_owned() => permit.expect("never closed"),
                };
                let (stream, remote) = tokio::select! {
                    _ = tx.closed() => return,
                    accepted = tcp.accept() => match accepted {
                        Ok(accepted) => accepted,
                        Err(e) => {
                            tracing::warn!("accepting a TCP connection: {e}");
                            // Out of descriptors, typically: give connections time to close.
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    },
                };
                let (tx, acceptor) = (tx.clone(), acceptor.clone());
                tokio::spawn(async move {
                    let handshake =
                        tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await;
                    match handshake {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, remote)).await;
                            drop(permit);
                        }
                        Ok(Err(e)) => tracing::info!(%remote, "TLS handshake failed: {e}"),
                        Err(_) => tracing::info!(%remote, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(TlsListener { local, ready })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(conn) => conn,
            // The accepting task only ends once this listener is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// The address a TCP request came from, plain or over TLS.
#[derive(Clone, Copy, Debug)]
pub struct RemoteAddr(pub SocketAddr);

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Reads until the connection closes, within `limit`; what came before the end.
    async fn until_closed(conn: &mut TcpStream, limit: Duration) -> Option<Vec<u8>> {
        let mut all = Vec::new();
        tokio::time::timeout(limit, async {
            let mut buf = [0u8; 4096];
            loop {
                match conn.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => all.extend_from_slice(&buf[..n]),
                }
            }
        })
        .await
        .ok()
        .map(|()| all)
    }

    /// Sends a whole GET and reads until its answer's body, `ok`, has come.
    async fn get(conn: &mut TcpStream) -> String {
        conn.write_all(b"GET / HTTP/1.1\r\nHost: hearth\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        while !answer.ends_with(b"\r\n\r\nok") {
            let n = conn.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&answer));
            answer.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&answer).into_owned()
    }

    #[tokio::test]
    async fn slow_and_idle_clients_are_cut_off_and_connections_are_capped() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = ConnLimits {
            header_timeout: Duration::from_millis(500),
            max_connections: 1,
        };
        let app = Router::new().route("/", axum::routing::get(|| async { "ok" }));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, app, limits, async {
            let _ = stopped.await;
        }));

        // Half a request's headers, then nothing: the only place is taken.
        let mut slow = TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET / HTTP/1.1\r\nHost: hearth\r\n")
            .await
            .unwrap();
        let started = Instant::now();
        // A second client waits in the backlog until the first is cut off.
        let second = tokio::spawn(async move {
            let mut conn = TcpStream::connect(addr).await.unwrap();
            let answer = get(&mut conn).await;
            (conn, answer, started.elapsed())
        });
        let said = until_closed(&mut slow, Duration::from_secs(10))
            .await
            .expect("a client that never finished its headers kept its connection");
        assert!(
            said.is_empty() || said.starts_with(b"HTTP/1.1 408"),
            "{}",
            String::from_utf8_lossy(&said)
        );
        let (mut idle, answer, waited) = second.await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(
            waited >= Duration::from_millis(400),
            "the second connection was served beside the first after {waited:?}"
        );
        // Kept alive and then idle: closed too.
        assert!(
            until_closed(&mut idle, Duration::from_secs(10))
                .await
                .is_some(),
            "an idle connection stayed open"
        );

        // The place is free again, and a stop ends the server.
        let mut conn = TcpStream::connect(addr).await.unwrap();
        assert!(get(&mut conn).await.starts_with("HTTP/1.1 200"));
        drop(conn);
        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("the server did not stop")
            .unwrap()
            .unwrap();
    }

    #[test]
    fn a_token_file_others_may_read_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "s3cret\n").unwrap();
        for mode in [0o644, 0o640, 0o604, 0o660, 0o602] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let err = read_token(&path).unwrap_err().to_string();
            assert!(
                err.contains(&format!("mode {mode:04o}")) && err.contains("chmod 600"),
                "{err}"
            );
            assert!(!err.contains("s3cret"), "{err}");
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_token(&path).unwrap(), "s3cret");
        std::fs::write(&path, "\n").unwrap();
        assert!(read_token(&path).unwrap_err().to_string().contains("empty"));
    }
}
