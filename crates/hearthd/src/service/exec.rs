//! Running commands in a machine through its agent.

use super::Service;
use crate::error::{Error, Result};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hearth_api::{validate_id, ExecRequest, ExecResponse, Phase};
use hearth_proto::{Op, Reply, DEFAULT_OUTPUT_LIMIT};
use std::time::Duration;

/// Both streams at this size, as base64, still fit in one message of the agent channel.
const MAX_OUTPUT_LIMIT: usize = 8 << 20;
/// Beyond the command's own timeout, how long the agent may take to report it.
const REPLY_MARGIN: Duration = Duration::from_secs(30);

impl Service {
    pub async fn exec(&self, id: &str, req: ExecRequest) -> Result<ExecResponse> {
        validate_id("machine", id).map_err(Error::invalid)?;
        if req.command.is_empty() || req.command[0].is_empty() {
            return Err(Error::invalid("command must name a program"));
        }
        let output_limit = req.max_output_bytes.unwrap_or(DEFAULT_OUTPUT_LIMIT);
        if output_limit > MAX_OUTPUT_LIMIT {
            return Err(Error::invalid(format!(
                "max_output_bytes may be at most {MAX_OUTPUT_LIMIT}"
            )));
        }
        if let Some(stdin) = &req.stdin_base64 {
            B64.decode(stdin)
                .map_err(|e| Error::invalid(format!("stdin_base64: {e}")))?;
        }
        let rec = self.record(id)?;
        if rec.phase != Phase::Running {
            return Err(Error::conflict(format!(
                "machine {id} is {}, not running",
                rec.phase.as_str()
            )));
        }
        let agent = self.agent(id).await?;
        let timeout = req
            .timeout_ms
            .map(|ms| Duration::from_millis(ms) + REPLY_MARGIN);
        let op = Op::Exec(hearth_proto::ExecRequest {
            command: req.command,
            env: req.env.unwrap_or_default(),
            cwd: req.cwd,
            timeout_ms: req.timeout_ms,
            user: req.user,
            stdin_base64: req.stdin_base64,
            output_limit,
        });
        match agent.call(op, timeout).await? {
            Reply::Exec(r) => Ok(ExecResponse {
                exit_code: r.exit_code,
                stdout: decode_text(&r.stdout_base64)?,
                stderr: decode_text(&r.stderr_base64)?,
                duration_ms: r.duration_ms,
                stdout_truncated: r.stdout_truncated,
                stderr_truncated: r.stderr_truncated,
                timed_out: r.timed_out,
                signal: r.signal,
            }),
            other => Err(Error::internal(format!(
                "unexpected agent reply: {other:?}"
            ))),
        }
    }
}

/// Output is returned as text; bytes that are not UTF-8 become U+FFFD.
fn decode_text(b64: &str) -> Result<String> {
    let bytes = B64
        .decode(b64)
        .map_err(|e| Error::internal(format!("agent sent bad base64: {e}")))?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}
