//! The TCP listener: TLS (rustls) when a certificate is given, the bearer token always, and a
//! log line for every request refused for want of it. Plain HTTP is served only on a loopback
//! address, where the token never crosses a network, unless `--insecure-tcp` says the network is
//! trusted.

use crate::config::Config;
use anyhow::{bail, ensure, Context, Result};
use axum::extract::connect_info::Connected;
use axum::serve::IncomingStream;
use axum::Router;
use std::io::Read;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
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

/// The bound TCP listener and the token its requests must carry.
pub struct TcpApi {
    listener: Listener,
    token: String,
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
        Ok(TcpApi { listener, token })
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
        stop: impl std::future::Future<Output = ()> + Send + 'static,
        servers: &mut tokio::task::JoinSet<std::io::Result<()>>,
    ) -> std::io::Result<()> {
        let addr = self.local_addr()?;
        let service = app
            .layer(axum::middleware::from_fn_with_state(
                Arc::new(self.token),
                crate::api::require_bearer,
            ))
            .into_make_service_with_connect_info::<RemoteAddr>();
        match self.listener {
            Listener::Tls(l) => {
                tracing::info!(%addr, "hearthd listening on TCP with TLS (bearer token required)");
                let server = axum::serve(l, service).with_graceful_shutdown(stop);
                servers.spawn(std::future::IntoFuture::into_future(server));
            }
            Listener::Plain(l) => {
                if addr.ip().is_loopback() {
                    tracing::info!(%addr, "hearthd listening on loopback TCP without TLS (bearer token required)");
                } else {
                    tracing::warn!(%addr, "hearthd listening on TCP without TLS (--insecure-tcp): the bearer token crosses the network in the clear");
                }
                let server = axum::serve(l, service).with_graceful_shutdown(stop);
                servers.spawn(std::future::IntoFuture::into_future(server));
            }
        }
        Ok(())
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

impl Connected<IncomingStream<'_, TcpListener>> for RemoteAddr {
    fn connect_info(stream: IncomingStream<'_, TcpListener>) -> RemoteAddr {
        RemoteAddr(*stream.remote_addr())
    }
}

impl Connected<IncomingStream<'_, TlsListener>> for RemoteAddr {
    fn connect_info(stream: IncomingStream<'_, TlsListener>) -> RemoteAddr {
        RemoteAddr(*stream.remote_addr())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
