//! Machines outlive the daemon; reconcile notices VMMs that died.

mod common;

use common::*;
use hearth_api::Phase;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread")]
async fn daemon_crash_and_vmm_death() {
    let mut d = Daemon::start().await;
    d.client
        .create_machine(&create_req("survivor"))
        .await
        .unwrap();
    sh(&d.client, "survivor", "echo 1 > /tmp/mark").await;
    let pids = d.vmm_pids();
    assert_eq!(pids.len(), 1);

    // The daemon dies with SIGKILL; the machine keeps running and the new daemon reattaches.
    d.restart().await;
    assert_eq!(d.vmm_pids(), pids, "the VMM must survive the daemon");
    let m = d.client.get_machine("survivor").await.unwrap();
    assert_eq!(m.phase, Phase::Running);
    // tmpfs content proves it is the same boot, not a new one.
    assert_eq!(
        sh(&d.client, "survivor", "cat /tmp/mark").await.stdout,
        "1\n"
    );

    // The VMM dies with SIGKILL: reconcile marks the machine failed, with a reason.
    unsafe { libc::kill(pids[0], libc::SIGKILL) };
    let client = d.client.clone();
    let failed = eventually(Duration::from_secs(15), async || {
        client.get_machine("survivor").await.unwrap().phase == Phase::Failed
    })
    .await;
    assert!(failed, "machine not marked failed");
    let m = d.client.get_machine("survivor").await.unwrap();
    assert!(
        m.error.as_deref().unwrap_or("").contains("exited"),
        "{:?}",
        m.error
    );

    // A failed machine starts again from its disk.
    let m = d.client.start_machine("survivor").await.unwrap();
    assert_eq!(m.phase, Phase::Running);
    assert!(m.error.is_none());
    d.client.delete_machine("survivor").await.unwrap();
    d.assert_nothing_left("survivor").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn leftovers_of_unknown_machines_are_removed() {
    let d = Daemon::start().await;
    let stray = d.path().join("machines").join("ghost");
    std::fs::create_dir_all(&stray).unwrap();
    std::fs::write(stray.join("system.img"), b"x").unwrap();
    let stray_run = d.path().join("run").join("0123456789abcdef");
    std::fs::create_dir_all(&stray_run).unwrap();
    let stray_snapshot = d.path().join("snapshots").join("ghost-snap");
    std::fs::create_dir_all(&stray_snapshot).unwrap();
    // A Firecracker jail of a machine gone while the daemon ran without that backend.
    let stray_jail = d.path().join("jail/firecracker/0123456789abcdef");
    std::fs::create_dir_all(stray_jail.join("root/dev")).unwrap();
    std::fs::write(stray_jail.join("root/vmstate"), b"x").unwrap();
    let cleaned = eventually(Duration::from_secs(10), async || {
        !stray.exists() && !stray_run.exists() && !stray_snapshot.exists() && !stray_jail.exists()
    })
    .await;
    assert!(cleaned, "reconcile left the stray directories");
}
