//! Failpoints for crash and race tests, named in environment variables:
//! - `HEARTH_STALL_AT=name[,name…]`: the daemon stops forever there, so a test can kill it with
//!   SIGKILL at that step and check what a restart recovers;
//! - `HEARTH_DELAY_AT=name:ms[,…]`: the daemon waits that long there, widening a race window;
//! - `HEARTH_FAIL_AT=name[,…]`: the step fails there, as a VMM that stops answering would.

use crate::error::{Error, Result};
use std::time::Duration;

fn listed(var: &str, name: &str) -> Option<String> {
    let value = std::env::var(var).ok()?;
    value.split(',').find_map(|entry| {
        let (n, arg) = entry.split_once(':').unwrap_or((entry, ""));
        (n.trim() == name).then(|| arg.trim().to_string())
    })
}

/// Never returns when `name` is listed in `HEARTH_STALL_AT`.
pub async fn stall(name: &str) {
    if listed("HEARTH_STALL_AT", name).is_some() {
        tracing::warn!(failpoint = name, "stalling at failpoint");
        std::future::pending::<()>().await;
    }
}

/// Waits as long as `HEARTH_DELAY_AT` says for `name`.
pub async fn delay(name: &str) {
    if let Some(ms) = listed("HEARTH_DELAY_AT", name).and_then(|ms| ms.parse().ok()) {
        tracing::debug!(failpoint = name, ms, "delaying at failpoint");
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
}

/// Fails when `name` is listed in `HEARTH_FAIL_AT`.
pub fn fail(name: &str) -> Result<()> {
    match listed("HEARTH_FAIL_AT", name) {
        Some(_) => Err(Error::unavailable(format!("failpoint {name}"))),
        None => Ok(()),
    }
}
