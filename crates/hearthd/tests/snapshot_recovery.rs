//! The daemon killed (SIGKILL) in the middle of a snapshot or a restore: a restart leaves no
//! trace of the half-done work and the source machine runs on.

mod common;

use common::*;
use hearth_api::{ErrorCode, Phase, SnapshotKind};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread")]
async fn crash_in_the_middle_of_a_snapshot_and_of_a_restore() {
    let mut d = Daemon::start().await;
    d.client.create_machine(&create_req("src")).await.unwrap();
    start_counter(&d.client, "src").await;

    // Killed while the machine is paused and its filesystem frozen, mid-snapshot.
    d.env = vec![("HEARTH_STALL_AT".into(), "snapshot-paused".into())];
    d.restart().await;
    let client = d.client.clone();
    let pending = tokio::spawn(async move {
        client
            .create_snapshot("src", "half", SnapshotKind::Memory)
            .await
    });
    let dir = d.path().join("snapshots/half");
    assert!(
        eventually(Duration::from_secs(30), async || dir
            .join("system.img")
            .exists())
        .await,
        "the snapshot never reached its paused phase"
    );
    d.env.clear();
    d.restart().await;
    let _ = pending.await;

    let err = d.client.get_snapshot("half").await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound));
    assert!(!dir.exists(), "partial snapshot files left");
    assert!(d.client.list_snapshots(None).await.unwrap().is_empty());
    // Resumed and thawed: its counter moves and its disk takes writes.
    let a = read_counter(&d.client, "src").await;
    assert!(
        counter_passes(&d.client, "src", a).await,
        "the source is still paused"
    );
    let r = sh(
        &d.client,
        "src",
        "echo ok > /root/after-crash && cat /root/after-crash",
    )
    .await;
    assert_eq!(r.stdout, "ok\n");

    // Killed while a restored machine is running but not yet handed over.
    d.client
        .create_snapshot("src", "snap", SnapshotKind::Memory)
        .await
        .unwrap();
    d.env = vec![("HEARTH_STALL_AT".into(), "restore-running".into())];
    d.restart().await;
    let client = d.client.clone();
    let pending = tokio::spawn(async move {
        client
            .restore("snap", &restore_req("snap", "partial"))
            .await
    });
    let client = d.client.clone();
    let started = eventually(Duration::from_secs(30), async || {
        client
            .get_machine("partial")
            .await
            .is_ok_and(|m| m.phase == Phase::Starting)
    })
    .await;
    assert!(started, "the restore never started");
    assert!(
        eventually(Duration::from_secs(30), async || d.vmm_pids().len() == 2).await,
        "the restored VMM never ran"
    );
    d.env.clear();
    d.restart().await;
    let _ = pending.await;
    d.assert_nothing_left("partial").await;
    assert_eq!(
        d.vmm_pids().len(),
        1,
        "the partial machine's VMM is still running"
    );
    assert_eq!(
        d.client.get_machine("src").await.unwrap().phase,
        Phase::Running
    );
    assert!(
        d.client.get_snapshot("snap").await.is_ok(),
        "the snapshot itself is intact"
    );

    // A snapshot is ready before its files are on disk; the background flush clears its mark.
    let db = d.path().join("state/hearth.db");
    let mark = |id: &str| -> Option<String> {
        rusqlite::Connection::open(&db)
            .unwrap()
            .query_row(
                "SELECT unflushed_boot FROM snapshots WHERE id = ?1",
                [id],
                |r| r.get(0),
            )
            .unwrap()
    };
    assert!(
        eventually(Duration::from_secs(60), async || mark("snap").is_none()).await,
        "the snapshot's files were never flushed"
    );
    // The daemon dies with two snapshots not flushed: one written in this host boot (its
    // files are still in the page cache), one in a boot before (the host went down: its
    // files may be torn).
    d.client
        .create_snapshot("src", "lost", SnapshotKind::Memory)
        .await
        .unwrap();
    d.kill9();
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    let set = |id: &str, boot: &str| {
        rusqlite::Connection::open(&db)
            .unwrap()
            .execute(
                "UPDATE snapshots SET unflushed_boot = ?2 WHERE id = ?1",
                [id, boot],
            )
            .unwrap()
    };
    assert_eq!(set("snap", boot.trim()), 1);
    assert_eq!(set("lost", "a-boot-before-this-one"), 1);
    d.restart().await;
    let err = d.client.get_snapshot("lost").await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound));
    assert!(!d.path().join("snapshots/lost").exists());
    assert_eq!(
        d.log_count("before this snapshot's files reached the disk"),
        1
    );
    assert!(d.client.get_snapshot("snap").await.is_ok());
    assert!(
        eventually(Duration::from_secs(60), async || mark("snap").is_none()).await,
        "the snapshot of this boot was not flushed after the restart"
    );

    d.client.delete_machine("src").await.unwrap();
    d.client.delete_snapshot("snap").await.unwrap();
    assert!(d.vmm_pids().is_empty());
}
