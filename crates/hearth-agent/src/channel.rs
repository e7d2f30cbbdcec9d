//! The agent's end of the virtio-serial port.

use hearth_proto::{encode_line, LineBuffer, Request, AGENT_PORT_NAME};
use serde::Serialize;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub struct Port {
    reader: Mutex<File>,
    writer: Mutex<File>,
}

/// How long to wait before reading again after EOF (no host connected).
const IDLE_RETRY: Duration = Duration::from_millis(20);

impl Port {
    /// Opens the agent port, waiting for the device to appear (its driver may still be probing).
    pub fn open_when_present() -> Arc<Port> {
        loop {
            if let Some(path) = find_port() {
                match OpenOptions::new().read(true).write(true).open(&path) {
                    Ok(file) => {
                        let writer = file.try_clone().expect("dup of the agent port");
                        return Arc::new(Port {
                            reader: Mutex::new(file),
                            writer: Mutex::new(writer),
                        });
                    }
                    Err(e) => eprintln!("hearth-agent: open {}: {e}", path.display()),
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Writes one frame; a frame lost because no host is listening is retried by the host.
    pub fn send<T: Serialize>(&self, msg: &T) {
        let line = encode_line(msg);
        let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = w.write_all(&line) {
            eprintln!("hearth-agent: write to host: {e}");
        }
    }

    /// Reads requests forever, handing each to `handle`.
    pub fn serve(self: Arc<Self>, handle: impl Fn(Request, Arc<Port>)) -> ! {
        let mut lines = LineBuffer::default();
        let mut buf = vec![0u8; 256 * 1024];
        let mut reader = self.reader.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            match reader.read(&mut buf) {
                Ok(0) => {
                    // No host on the other side: whatever partial frame we held is from a host
                    // that is gone.
                    lines.reset();
                    std::thread::sleep(IDLE_RETRY);
                }
                Ok(n) => {
                    for line in lines.push(&buf[..n]) {
                        if line.is_empty() {
                            continue;
                        }
                        match serde_json::from_slice::<Request>(&line) {
                            Ok(req) => handle(req, self.clone()),
                            Err(e) => eprintln!("hearth-agent: bad frame: {e}"),
                        }
                    }
                }
                Err(e) => {
                    eprintln!("hearth-agent: read from host: {e}");
                    std::thread::sleep(IDLE_RETRY);
                }
            }
        }
    }
}

/// Finds `/dev/vportNpM` whose port name is the agent's.
fn find_port() -> Option<PathBuf> {
    let entries = std::fs::read_dir("/sys/class/virtio-ports").ok()?;
    for entry in entries.flatten() {
        let name = std::fs::read_to_string(entry.path().join("name")).unwrap_or_default();
        if name.trim() == AGENT_PORT_NAME {
            return Some(PathBuf::from("/dev").join(entry.file_name()));
        }
    }
    None
}
