//! The host's end of a hybrid vsock (Firecracker): a Unix socket the VMM listens on, where a
//! connection asks for a guest port with `CONNECT <port>\n` and becomes a stream to the guest once
//! the VMM answers `OK <host port>\n` (when the guest accepted it). Before the guest's driver and
//! listener are up a CONNECT gets no answer, or the connection closes: the caller retries.
//!
//! The answer comes from an untrusted VMM and guest: at most one line of [`MAX_ANSWER`] bytes
//! is read, a byte at a time so that nothing past it is taken from the stream (the agent's frames
//! follow at once).

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// The longest answer line taken: `OK 2147483647\n` is 14 bytes.
const MAX_ANSWER: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("vsock socket {} does not exist", uds.display())]
    Missing { uds: PathBuf },
    #[error("vsock socket {}: {source}", uds.display())]
    Unreachable {
        uds: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("vsock port {port} at {}: the connection closed before the guest accepted it", uds.display())]
    Closed {
        uds: PathBuf,
        port: u32,
        #[source]
        source: Option<io::Error>,
    },
    #[error("vsock port {port} at {}: {source}", uds.display())]
    Io {
        uds: PathBuf,
        port: u32,
        #[source]
        source: io::Error,
    },
    #[error("vsock port {port} at {}: no answer within {timeout:?}", uds.display())]
    Timeout {
        uds: PathBuf,
        port: u32,
        timeout: Duration,
    },
    #[error("vsock port {port} at {}: answered {answer:?}, not `OK <port>`", uds.display())]
    Malformed {
        uds: PathBuf,
        port: u32,
        /// What was read of the answer (at most [`MAX_ANSWER`] bytes), escaped.
        answer: String,
    },
}

/// Connects to guest port `port` through the hybrid vsock socket `uds`, within `timeout`. The
/// stream returned carries the guest's bytes from the first one after the answer.
pub async fn connect(uds: &Path, port: u32, timeout: Duration) -> Result<UnixStream, VsockError> {
    tokio::time::timeout(timeout, handshake(uds, port))
        .await
        .unwrap_or_else(|_| {
            Err(VsockError::Timeout {
                uds: uds.to_path_buf(),
                port,
                timeout,
            })
        })
}

async fn handshake(uds: &Path, port: u32) -> Result<UnixStream, VsockError> {
    let mut stream = UnixStream::connect(uds).await.map_err(|source| {
        let uds = uds.to_path_buf();
        match source.kind() {
            io::ErrorKind::NotFound => VsockError::Missing { uds },
            _ => VsockError::Unreachable { uds, source },
        }
    })?;
    let failed = |source: io::Error| match source.kind() {
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => VsockError::Closed {
            uds: uds.to_path_buf(),
            port,
            source: Some(source),
        },
        _ => VsockError::Io {
            uds: uds.to_path_buf(),
            port,
            source,
        },
    };
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await
        .map_err(failed)?;
    let mut answer = [0u8; MAX_ANSWER];
    let mut len = 0;
    while len == 0 || answer[len - 1] != b'\n' {
        if len == MAX_ANSWER {
            return Err(malformed(uds, port, &answer));
        }
        match stream.read(&mut answer[len..=len]).await.map_err(failed)? {
            0 => {
                return Err(VsockError::Closed {
                    uds: uds.to_path_buf(),
                    port,
                    source: None,
                })
            }
            n => len += n,
        }
    }
    let line = &answer[..len - 1];
    let host_port = line
        .strip_prefix(b"OK ")
        .filter(|digits| !digits.is_empty() && digits.iter().all(u8::is_ascii_digit))
        .and_then(|digits| std::str::from_utf8(digits).ok()?.parse::<u32>().ok());
    match host_port {
        Some(_) => Ok(stream),
        None => Err(malformed(uds, port, &answer[..len])),
    }
}

fn malformed(uds: &Path, port: u32, answer: &[u8]) -> VsockError {
    VsockError::Malformed {
        uds: uds.to_path_buf(),
        port,
        answer: answer.escape_ascii().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;
    use tokio::io::AsyncBufReadExt;
    use tokio::net::UnixListener;

    const PORT: u32 = 1024;

    /// A fake hybrid vsock: takes one connection and, if it asks for `CONNECT 1024`, answers
    /// `answer`, then holds the connection open until the test ends, or closes it.
    struct Vmm {
        dir: tempfile::TempDir,
        server: tokio::task::JoinHandle<()>,
    }

    impl Vmm {
        fn start(answer: &[u8], hold: bool) -> Vmm {
            let answer = answer.to_vec();
            let dir = tempfile::tempdir().unwrap();
            let listener = UnixListener::bind(dir.path().join("v.sock")).unwrap();
            let server = tokio::spawn(async move {
                let (stream, _) = listener.accept().await.unwrap();
                let mut stream = tokio::io::BufReader::new(stream);
                let mut line = String::new();
                stream.read_line(&mut line).await.unwrap();
                if line != format!("CONNECT {PORT}\n") {
                    return;
                }
                stream.get_mut().write_all(&answer).await.unwrap();
                if hold {
                    std::future::pending::<()>().await;
                }
            });
            Vmm { dir, server }
        }

        fn uds(&self) -> PathBuf {
            self.dir.path().join("v.sock")
        }

        async fn connect(&self, timeout: Duration) -> Result<UnixStream, VsockError> {
            connect(&self.uds(), PORT, timeout).await
        }
    }

    impl Drop for Vmm {
        fn drop(&mut self) {
            self.server.abort();
        }
    }

    #[tokio::test]
    async fn ok_gives_the_stream_with_every_byte_after_the_answer() {
        let vmm = Vmm::start(b"OK 1073741824\nHRTH and what follows", true);
        let mut stream = vmm.connect(Duration::from_secs(5)).await.unwrap();
        let mut rest = [0u8; 21];
        stream.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"HRTH and what follows");
    }

    #[tokio::test]
    async fn a_connection_closed_before_ok_is_closed() {
        let vmm = Vmm::start(b"", false);
        let err = vmm.connect(Duration::from_secs(5)).await.unwrap_err();
        assert!(
            matches!(err, VsockError::Closed { port: PORT, .. }),
            "{err}"
        );
        // Cut mid-answer: the same.
        let vmm = Vmm::start(b"OK 10", false);
        let err = vmm.connect(Duration::from_secs(5)).await.unwrap_err();
        assert!(matches!(err, VsockError::Closed { .. }), "{err}");
    }

    #[tokio::test]
    async fn silence_times_out() {
        let vmm = Vmm::start(b"", true);
        let timeout = Duration::from_millis(300);
        let started = Instant::now();
        let err = vmm.connect(timeout).await.unwrap_err();
        let took = started.elapsed();
        assert!(matches!(err, VsockError::Timeout { .. }), "{err}");
        assert!(took >= timeout && took < timeout * 4, "{took:?}");
        assert!(err.to_string().contains("no answer within 300ms"), "{err}");
    }

    #[tokio::test]
    async fn an_answer_without_end_is_malformed_and_quoted_briefly() {
        let vmm = Vmm::start(&vec![b'A'; 1 << 20], true);
        let err = vmm.connect(Duration::from_secs(5)).await.unwrap_err();
        let VsockError::Malformed { answer, .. } = &err else {
            panic!("{err}");
        };
        assert_eq!(answer, &"A".repeat(MAX_ANSWER));
    }

    #[tokio::test]
    async fn answers_other_than_ok_are_malformed() {
        for answer in [
            &b"ERR no such port\n"[..],
            b"OK\n",
            b"OK \n",
            b"OK 12x\n",
            b"OK 99999999999\n",
            b"ok 12\n",
            b"\x00\xff\n",
        ] {
            let vmm = Vmm::start(answer, true);
            let err = vmm.connect(Duration::from_secs(5)).await.unwrap_err();
            let VsockError::Malformed { answer: quoted, .. } = &err else {
                panic!("{answer:?}: {err}");
            };
            assert_eq!(quoted, &answer.escape_ascii().to_string());
        }
    }

    #[tokio::test]
    async fn a_missing_or_dead_socket_is_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let err = connect(&uds, PORT, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(err, VsockError::Missing { .. }), "{err}");
        // A socket file whose VMM is gone.
        drop(std::os::unix::net::UnixListener::bind(&uds).unwrap());
        let err = connect(&uds, PORT, Duration::from_secs(5))
            .await
            .unwrap_err();
        let VsockError::Unreachable { source, .. } = &err else {
            panic!("{err}");
        };
        assert_eq!(source.kind(), io::ErrorKind::ConnectionRefused);
    }
}
