//! Failpoints for crash tests: `HEARTH_STALL_AT=name[,name…]` makes the daemon stop forever at
//! those points, so a test can kill it there with SIGKILL and check what a restart recovers.

/// Never returns when `name` is listed in `HEARTH_STALL_AT`.
pub async fn stall(name: &str) {
    let listed =
        std::env::var("HEARTH_STALL_AT").is_ok_and(|v| v.split(',').any(|n| n.trim() == name));
    if listed {
        tracing::warn!(failpoint = name, "stalling at failpoint");
        std::future::pending::<()>().await;
    }
}
