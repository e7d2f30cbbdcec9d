//! Processes in a machine: started, listed, read, written and signalled through its agent. They
//! live in the guest; nothing here holds state about them, so a client (or the daemon) may go away
//! and come back to the same process from any offset.

use super::Service;
use crate::agent::AgentClient;
use crate::error::{Error, Result};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use futures_util::Stream;
use hearth_api::{validate_id, OutputEvent, Phase, ProcessInfo, StartProcess};
use hearth_proto::process::{
    Output, OutputRequest, ResizeRequest, SignalRequest, StdinRequest, MAX_OUTPUT_READ,
};
use hearth_proto::{Op, Reply};
use std::sync::Arc;
use std::time::Duration;

/// How long one output call waits in the guest for new output before the daemon asks again.
const OUTPUT_WAIT: Duration = Duration::from_secs(10);
/// Margin over a guest-side wait for the agent's answer to arrive.
const REPLY_MARGIN: Duration = Duration::from_secs(30);
/// Most stdin bytes one call carries.
pub const MAX_STDIN: usize = 8 << 20;

impl Service {
    /// The agent of a running machine; 409 when the machine is not running.
    pub(super) async fn running_agent(&self, id: &str) -> Result<Arc<AgentClient>> {
        validate_id("machine", id).map_err(Error::invalid)?;
        let rec = self.record(id)?;
        if rec.phase != Phase::Running {
            return Err(Error::conflict(format!(
                "machine {id} is {}, not running",
                rec.phase.as_str()
            )));
        }
        self.agent(id).await
    }

    pub async fn start_process(&self, id: &str, req: StartProcess) -> Result<ProcessInfo> {
        if req.command.first().is_none_or(|c| c.is_empty()) {
            return Err(Error::invalid("command must name a program"));
        }
        if let Some(pty) = req.pty {
            if pty.cols == 0 || pty.rows == 0 {
                return Err(Error::invalid("a pty needs at least one column and row"));
            }
        }
        let agent = self.running_agent(id).await?;
        match agent
            .call(Op::ProcessStart(req), Some(REPLY_MARGIN))
            .await?
        {
            Reply::Process(info) => Ok(info),
            other => Err(unexpected(other)),
        }
    }

    pub async fn list_processes(&self, id: &str) -> Result<Vec<ProcessInfo>> {
        let agent = self.running_agent(id).await?;
        match agent.call(Op::ProcessList, Some(REPLY_MARGIN)).await? {
            Reply::Processes { processes } => Ok(processes),
            other => Err(unexpected(other)),
        }
    }

    pub async fn get_process(&self, id: &str, process: &str) -> Result<ProcessInfo> {
        let out = self.read_output(id, process, 0, 0, Duration::ZERO).await?;
        Ok(out.process)
    }

    async fn read_output(
        &self,
        id: &str,
        process: &str,
        offset: u64,
        max_bytes: u32,
        wait: Duration,
    ) -> Result<Output> {
        let agent = self.running_agent(id).await?;
        let op = Op::ProcessOutput(OutputRequest {
            process: process.to_string(),
            offset,
            max_bytes,
            wait_ms: wait.as_millis() as u64,
        });
        match agent.call(op, Some(wait + REPLY_MARGIN)).await? {
            Reply::Output(out) => Ok(out),
            other => Err(unexpected(other)),
        }
    }

    /// A process's output from `offset` as events; with `follow`, until it exits (the last
    /// event), else what is there now. An error ends the stream.
    pub fn process_output(
        self: &Arc<Self>,
        id: &str,
        process: &str,
        offset: u64,
        follow: bool,
    ) -> impl Stream<Item = Result<OutputEvent>> + Send + 'static {
        struct Cursor {
            svc: Arc<Service>,
            id: String,
            process: String,
            offset: u64,
            follow: bool,
            queue: std::collections::VecDeque<OutputEvent>,
            done: bool,
        }
        let cursor = Cursor {
            svc: self.clone(),
            id: id.to_string(),
            process: process.to_string(),
            offset,
            follow,
            queue: Default::default(),
            done: false,
        };
        futures_util::stream::unfold(cursor, |mut c| async move {
            loop {
                if let Some(ev) = c.queue.pop_front() {
                    return Some((Ok(ev), c));
                }
                if c.done {
                    return None;
                }
                let wait = if c.follow {
                    OUTPUT_WAIT
                } else {
                    Duration::ZERO
                };
                let out = match c
                    .svc
                    .read_output(&c.id, &c.process, c.offset, MAX_OUTPUT_READ, wait)
                    .await
                {
                    Ok(out) => out,
                    Err(e) => {
                        c.done = true;
                        return Some((Err(e), c));
                    }
                };
                if let Some(to) = out.dropped_until {
                    c.queue
                        .push_back(OutputEvent::Dropped { from: c.offset, to });
                }
                let got_any = !out.chunks.is_empty();
                c.queue
                    .extend(out.chunks.into_iter().map(|ch| OutputEvent::Output {
                        stream: ch.stream,
                        offset: ch.offset,
                        data_base64: ch.data_base64,
                    }));
                c.offset = out.next_offset;
                let complete = !out.process.running && c.offset >= out.process.output_bytes;
                if complete {
                    c.queue.push_back(OutputEvent::Exit {
                        exit_code: out.process.exit_code.unwrap_or(-1),
                        signal: out.process.signal,
                    });
                    c.done = true;
                } else if !c.follow && !got_any {
                    c.done = true;
                }
            }
        })
    }

    pub async fn process_stdin(
        &self,
        id: &str,
        process: &str,
        data: &[u8],
        close: bool,
    ) -> Result<()> {
        if data.len() > MAX_STDIN {
            return Err(Error::too_large(format!(
                "one stdin write may carry at most {MAX_STDIN} bytes"
            )));
        }
        let agent = self.running_agent(id).await?;
        let op = Op::ProcessStdin(StdinRequest {
            process: process.to_string(),
            data_base64: B64.encode(data),
            close,
        });
        // A process that does not read its stdin holds the write: no timeout here, the client's
        // hang-up cancels the call.
        agent.call(op, None).await.map(|_| ())
    }

    pub async fn signal_process(&self, id: &str, process: &str, signal: i32) -> Result<()> {
        let agent = self.running_agent(id).await?;
        let op = Op::ProcessSignal(SignalRequest {
            process: process.to_string(),
            signal,
        });
        agent.call(op, Some(REPLY_MARGIN)).await.map(|_| ())
    }

    pub async fn resize_process(
        &self,
        id: &str,
        process: &str,
        cols: u16,
        rows: u16,
    ) -> Result<()> {
        if cols == 0 || rows == 0 {
            return Err(Error::invalid("a pty needs at least one column and row"));
        }
        let agent = self.running_agent(id).await?;
        let op = Op::ProcessResize(ResizeRequest {
            process: process.to_string(),
            cols,
            rows,
        });
        agent.call(op, Some(REPLY_MARGIN)).await.map(|_| ())
    }
}

pub(super) fn unexpected(reply: Reply) -> Error {
    Error::internal(format!("unexpected agent reply: {reply:?}"))
}
