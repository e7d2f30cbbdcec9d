//! A minimal QMP client: greeting, capabilities negotiation, commands; events are skipped.

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};
use serde_json::{json, Value};
use std::io::IoSlice;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Interest};
use tokio::net::UnixStream;

pub struct Qmp {
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
}

const TIMEOUT: Duration = Duration::from_secs(10);

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

    async fn read(&mut self) -> Result<Value, String> {
        tokio::time::timeout(TIMEOUT, self.read_line())
            .await
            .map_err(|_| "QMP read timed out".to_string())?
    }

    async fn read_line(&mut self) -> Result<Value, String> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .await
            .map_err(|e| format!("QMP read: {e}"))?;
        if n == 0 {
            return Err("QMP connection closed".into());
        }
        serde_json::from_str(&line).map_err(|e| format!("QMP: bad JSON: {e}"))
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
        let line = Self::message("getfd", Some(json!({ "fdname": name })));
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
        self.reply("getfd").await.map(|_| ())
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

    async fn reply(&mut self, command: &str) -> Result<Value, String> {
        loop {
            let v = self.read().await?;
            if let Some(ret) = v.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = v.get("error") {
                let desc = err.get("desc").and_then(Value::as_str).unwrap_or("unknown");
                return Err(format!("QMP {command}: {desc}"));
            }
            // An event: skip it.
        }
    }
}
