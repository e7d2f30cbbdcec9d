//! Fork as one server operation: a new machine from a running one's present instant, with its
//! own disk and identity, undone as a whole when the daemon dies midway; and a machine that
//! cannot be resumed after a snapshot is reported as it is.

mod common;

use common::*;
use hearth_api::{ErrorCode, ForkRequest, Phase, SnapshotKind};
use std::time::Duration;

fn fork_req(id: &str) -> ForkRequest {
    ForkRequest {
        machine_id: id.to_string(),
        guest_config: None,
        network: None,
        ports: None,
    }
}

/// The machine runs, its filesystem is writable (thawed), and its counter advances.
async fn assert_runs(d: &Daemon, id: &str) {
    let c = &d.client;
    assert_eq!(c.get_machine(id).await.unwrap().phase, Phase::Running);
    let before = read_counter(c, id).await;
    let advanced = eventually(Duration::from_secs(10), async || {
        read_counter(c, id).await > before
    })
    .await;
    assert!(advanced, "{id} is not running on");
    let mut write = cmd(&["sh", "-c", "echo w > /root/w && sync"]);
    write.timeout_ms = Some(10_000);
    let r = c.exec(id, &write).await.unwrap();
    assert_eq!((r.exit_code, r.timed_out), (0, false), "{id}: {r:?}");
}

/// No snapshot anywhere: no record, no directory.
async fn assert_no_snapshots(d: &Daemon) {
    assert!(d.client.list_snapshots(None).await.unwrap().is_empty());
    let snapshot_dirs = std::fs::read_dir(d.path().join("snapshots"))
        .unwrap()
        .count();
    assert_eq!(snapshot_dirs, 0, "a snapshot directory was left");
}

/// No machine `id`, no snapshot.
async fn assert_fork_undone(d: &Daemon, id: &str) {
    d.assert_nothing_left(id).await;
    assert_no_snapshots(d).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn fork_is_one_operation_undone_as_a_whole() {
    let mut d = Daemon::start_env(&[], &[("HEARTH_STALL_AT", "snapshot-paused")]).await;
    d.client.create_machine(&create_req("src")).await.unwrap();
    start_counter(&d.client, "src").await;

    // Killed while the source is paused and frozen for the fork.
    let client = d.client.clone();
    let fork = tokio::spawn(async move { client.fork("src", &fork_req("f1")).await });
    d.await_stall("snapshot-paused").await;
    d.set_env(&[("HEARTH_STALL_AT", "restore-running")]);
    d.restart().await;
    assert!(fork.await.unwrap().is_err());
    assert_fork_undone(&d, "f1").await;
    assert_runs(&d, "src").await;

    // Killed once the fork's VMM runs, before its agent answered.
    let client = d.client.clone();
    let fork = tokio::spawn(async move { client.fork("src", &fork_req("f1")).await });
    d.await_stall("restore-running").await;
    assert_eq!(d.vmm_pids().len(), 2);
    d.set_env(&[]);
    d.restart().await;
    assert!(fork.await.unwrap().is_err());
    assert_fork_undone(&d, "f1").await;
    assert_eq!(d.vmm_pids().len(), 1);
    assert_runs(&d, "src").await;

    // A whole fork: it continues from the source's instant, with its own identity and disk.
    let before = read_counter(&d.client, "src").await;
    let f1 = d.client.fork("src", &fork_req("f1")).await.unwrap();
    assert_eq!(f1.phase, Phase::Running);
    assert!(read_counter(&d.client, "f1").await >= before);
    assert_runs(&d, "f1").await;
    assert_eq!(sh(&d.client, "f1", "hostname").await.stdout.trim(), "f1");
    sh(&d.client, "f1", "echo only-in-f1 > /root/mine && sync").await;
    let seen = sh(
        &d.client,
        "src",
        "cat /root/mine 2>/dev/null || echo absent",
    )
    .await;
    assert_eq!(seen.stdout.trim(), "absent");
    assert_no_snapshots(&d).await;

    // The CLI forks through the same operation.
    let (ok, _, err) = run_cli(&d, &[], &["fork", "f1", "f2"]);
    assert!(ok, "{err}");
    assert_runs(&d, "f2").await;

    // Bad forks: refused, nothing made.
    let cases = [
        ("ghost", "f3", ErrorCode::NotFound),
        ("src", "f1", ErrorCode::Conflict),
        ("src", "src", ErrorCode::Invalid),
        ("src", "Bad/Id", ErrorCode::Invalid),
    ];
    for (source, id, code) in cases {
        let err = d.client.fork(source, &fork_req(id)).await.unwrap_err();
        assert_eq!(err.code(), Some(code), "fork {source} → {id}: {err}");
    }
    d.assert_nothing_left("f3").await;
    for id in ["f1", "f2"] {
        d.client.delete_machine(id).await.unwrap();
        d.assert_nothing_left(id).await;
    }

    // A VMM that does not resume after a snapshot: the machine is reported failed and its VMM
    // stopped, not left paused under a record that says running; a start brings it back.
    d.set_env(&[("HEARTH_FAIL_AT", "resume")]);
    d.restart().await;
    let err = d
        .client
        .create_snapshot("src", "s1", SnapshotKind::Memory)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Unavailable), "{err}");
    let m = d.client.get_machine("src").await.unwrap();
    assert_eq!(m.phase, Phase::Failed);
    assert!(
        m.error.as_deref().unwrap_or("").contains("did not resume"),
        "{:?}",
        m.error
    );
    assert!(d.vmm_pids().is_empty());
    assert_no_snapshots(&d).await;
    d.set_env(&[]);
    d.restart().await;
    let m = d.client.start_machine("src").await.unwrap();
    assert_eq!(m.phase, Phase::Running);
    d.client.delete_machine("src").await.unwrap();
    d.assert_nothing_left("src").await;
}
