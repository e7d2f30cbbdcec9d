//! A minimal QMP client: greeting, capabilities negotiation, commands; events are skipped.
//! QEMU runs the guest's device models, so what it sends is bounded like a guest's: a line is
//! at most [`MAX_LINE`] bytes, and a command's reply comes within its time, events or not.

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};
use serde_json::{json, Value};
use std::io::IoSlice;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Interest};
use tokio::net::UnixStream;

pub struct Qmp {
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
    /// How long a command waits for its reply, the events before it included.
    reply_within: Duration,
}

const TIMEOUT: Duration = Duration::from_secs(10);

/// The longest line QEMU may send: its replies and events here are well under a kilobyte.
pub const MAX_LINE: usize = 1 << 20;

impl Qmp {
    pub async fn connect(path: &Path) -> Result<Qmp, String> {
        Qmp::connect_within(path, TIMEOUT).await
    }

    /// Connects, waiting up to `greeting` for QEMU to greet: it does once its main loop runs,
    /// that is once it has set everything up.
    pub async fn connect_within(path: &Path, greeting: Duration) -> Result<Qmp, String> {
        let stream = tokio::time::timeout(TIMEOUT, UnixStream::connect(path))
            .await
            .map_err(|_| "QMP connect timed out".to_string())?
            .map_err(|e| format!("QMP connect {}: {e}", path.display()))?;
        let (r, w) = stream.into_split();
        let mut qmp = Qmp {
            reader: BufReader::new(r),
            writer: w,
            reply_within: TIMEOUT,
        };
        let greeting = tokio::time::timeout(greeting, qmp.read_line())
            .await
            .map_err(|_| "QEMU did not greet on QMP in time".to_string())??;
        if greeting.get("QMP").is_none() {
            return Err(format!("unexpected QMP greeting: {greeting}"));
        }
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    /// The next line as JSON; a line past [`MAX_LINE`] is an error once that much has come.
    async fn read_line(&mut self) -> Result<Value, String> {
        let mut line = Vec::new();
        let n = (&mut self.reader)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)
            .await
            .map_err(|e| format!("QMP read: {e}"))?;
        if n == 0 {
            return Err("QMP connection closed".into());
        }
        if line.len() > MAX_LINE && line.last() != Some(&b'\n') {
            return Err(format!("QMP: a line longer than {MAX_LINE} bytes"));
        }
        serde_json::from_slice(&line).map_err(|e| format!("QMP: bad JSON: {e}"))
    }

    /// Runs a command and returns its `return` value.
    pub async fn execute(&mut self, command: &str, args: Option<Value>) -> Result<Value, String> {
        let line = Self::message(command, args);
        self.writer
            .write_all(&line)
            .await
            .map_err(|e| format!("QMP write: {e}"))?;
        self.reply(command).await
    }

    /// Hands QEMU a file descriptor under `name` (`getfd`), for a later command to use (a
    /// migration to or from `fd:NAME`): QEMU needs to open nothing itself, which its sandbox
    /// and its unprivileged user might forbid.
    pub async fn pass_fd(&mut self, name: &str, fd: BorrowedFd<'_>) -> Result<(), String> {
        self.execute_with_fd("getfd", json!({ "fdname": name }), fd)
            .await
            .map(drop)
    }

    /// Adds a file descriptor to a new fd set (`add-fd`) and returns the set's id: commands
    /// that take a file name open it as `/dev/fdset/ID`.
    pub async fn add_fd(&mut self, fd: BorrowedFd<'_>) -> Result<u64, String> {
        let ret = self.execute_with_fd("add-fd", json!({}), fd).await?;
        ret.get("fdset-id")
            .and_then(Value::as_u64)
            .ok_or_else(|| format!("QMP add-fd: no fdset-id in {ret}"))
    }

    /// Runs `command` with `fd` attached to it.
    async fn execute_with_fd(
        &mut self,
        command: &str,
        args: Value,
        fd: BorrowedFd<'_>,
    ) -> Result<Value, String> {
        let line = Self::message(command, Some(args));
        let stream: &UnixStream = self.writer.as_ref();
        let fds = [fd.as_raw_fd()];
        // The descriptor travels with the command's first byte; the rest follows plainly.
        let sent = loop {
            stream
                .writable()
                .await
                .map_err(|e| format!("QMP write: {e}"))?;
            let res = stream.try_io(Interest::WRITABLE, || {
                sendmsg::<UnixAddr>(
                    stream.as_raw_fd(),
                    &[IoSlice::new(&line)],
                    &[ControlMessage::ScmRights(&fds)],
                    MsgFlags::MSG_NOSIGNAL,
                    None,
                )
                .map_err(std::io::Error::from)
            });
            match res {
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(format!("QMP sendmsg: {e}")),
            }
        };
        self.writer
            .write_all(&line[sent..])
            .await
            .map_err(|e| format!("QMP write: {e}"))?;
        self.reply(command).await
    }

    fn message(command: &str, args: Option<Value>) -> Vec<u8> {
        let mut msg = json!({ "execute": command });
        if let Some(args) = args {
            msg["arguments"] = args;
        }
        let mut line = serde_json::to_vec(&msg).expect("json");
        line.push(b'\n');
        line
    }

    /// The reply to `command`, events skipped, within `reply_within` in all.
    async fn reply(&mut self, command: &str) -> Result<Value, String> {
        let within = self.reply_within;
        let reply = async {
            loop {
                let v = self.read_line().await?;
                if let Some(ret) = v.get("return") {
                    return Ok(ret.clone());
                }
                if let Some(err) = v.get("error") {
                    let desc = err.get("desc").and_then(Value::as_str).unwrap_or("unknown");
                    return Err(format!("QMP {command}: {desc}"));
                }
                // An event: skip it.
            }
        };
        tokio::time::timeout(within, reply)
            .await
            .map_err(|_| format!("QMP {command}: no reply within {within:?}"))?
    }
}

#[cfg(test)]
mod tests {
    //! Against a QEMU played by the test on a Unix socket.

    use super::*;
    use std::future::Future;
    use tokio::net::UnixListener;

    /// A client connected to a fake QEMU that greets, accepts the capabilities, then reads
    /// one command and does `then` with the connection.
    async fn against<F, Fut>(then: F) -> (Qmp, tempfile::TempDir)
    where
        F: FnOnce(BufReader<UnixStream>) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send,
    {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (conn, _) = listener.accept().await.unwrap();
            let mut conn = BufReader::new(conn);
            conn.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
                .await
                .unwrap();
            let mut line = String::new();
            conn.read_line(&mut line).await.unwrap();
            conn.write_all(b"{\"return\": {}}\n").await.unwrap();
            line.clear();
            conn.read_line(&mut line).await.unwrap();
            then(conn).await;
        });
        (Qmp::connect(&path).await.unwrap(), dir)
    }

    #[tokio::test]
    async fn events_before_a_reply_are_skipped() {
        let (mut qmp, _dir) = against(|mut conn| async move {
            for _ in 0..3 {
                conn.write_all(b"{\"event\": \"STOP\"}\n").await.unwrap();
            }
            conn.write_all(b"{\"return\": {\"status\": \"paused\"}}\n")
                .await
                .unwrap();
            std::future::pending::<()>().await
        })
        .await;
        let status = qmp.execute("query-status", None).await.unwrap();
        assert_eq!(status["status"], "paused");
    }

    #[tokio::test]
    async fn a_line_without_end_is_refused_at_the_limit() {
        let (mut qmp, _dir) = against(|mut conn| async move {
            // Four times the limit without a newline, then the connection held open.
            let chunk = vec![b' '; 64 << 10];
            for _ in 0..4 * MAX_LINE / chunk.len() {
                if conn.write_all(&chunk).await.is_err() {
                    return;
                }
            }
            std::future::pending::<()>().await
        })
        .await;
        let err = tokio::time::timeout(Duration::from_secs(5), qmp.execute("query-status", None))
            .await
            .expect("the client waited for the end of an endless line")
            .unwrap_err();
        assert!(err.contains("longer than"), "{err}");
    }

    #[tokio::test]
    async fn events_without_end_do_not_hold_a_command() {
        let (mut qmp, _dir) = against(|mut conn| async move {
            let mut tick = tokio::time::interval(Duration::from_millis(5));
            loop {
                tick.tick().await;
                if conn
                    .write_all(b"{\"event\": \"RTC_CHANGE\"}\n")
                    .await
                    .is_err()
                {
                    return;
                }
            }
        })
        .await;
        qmp.reply_within = Duration::from_millis(500);
        let started = std::time::Instant::now();
        let err = tokio::time::timeout(Duration::from_secs(5), qmp.execute("stop", None))
            .await
            .expect("a flood of events held the command past its time")
            .unwrap_err();
        assert!(err.contains("no reply within"), "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    }
}
