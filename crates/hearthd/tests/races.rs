//! Reconcile passes overlapping operations. Every pass here lists the machines, then waits
//! 1.5 s (a failpoint) before it acts, and passes run back to back: each operation below runs
//! while a pass holds a stale list. Nothing may be lost: no create or restore has its files or
//! VMM removed, no stop is overwritten with `failed`.

mod common;

use common::*;
use hearth_api::{ErrorCode, Phase, SnapshotKind};

const PASS: &str = "delaying at failpoint failpoint=\"reconcile-listed\"";

#[tokio::test(flavor = "multi_thread")]
async fn reconcile_never_undoes_an_operation_in_flight() {
    let d = Daemon::start_env(&[], &[("HEARTH_DELAY_AT", "reconcile-listed:1500")]).await;
    let c = &d.client;
    c.create_machine(&create_req("m1")).await.unwrap();
    start_counter(c, "m1").await;
    c.create_snapshot("m1", "s1", SnapshotKind::Memory)
        .await
        .unwrap();
    let m2 = c.restore("s1", &restore_req("s1", "m2")).await.unwrap();
    assert_eq!(m2.phase, Phase::Running);

    // Two operations on one machine at once: one of them is refused with 409.
    let (stop, snap) = tokio::join!(
        c.stop_machine("m1"),
        c.create_snapshot("m1", "s2", SnapshotKind::Memory)
    );
    let refused = [stop.as_ref().err(), snap.as_ref().err()]
        .into_iter()
        .flatten()
        .map(|e| e.code())
        .collect::<Vec<_>>();
    assert_eq!(
        refused,
        vec![Some(ErrorCode::Conflict)],
        "{stop:?} {snap:?}"
    );
    if stop.is_err() {
        c.stop_machine("m1").await.unwrap();
    }

    // Two more whole passes, each of which listed the machines before or during the stop.
    let passes = d.log_count(PASS);
    let settled = eventually(std::time::Duration::from_secs(30), async || {
        d.log_count(PASS) >= passes + 2
    })
    .await;
    assert!(settled, "reconcile stopped running");
    let m1 = c.get_machine("m1").await.unwrap();
    assert_eq!(m1.phase, Phase::Stopped, "{:?}", m1.error);
    assert_eq!(c.get_machine("m2").await.unwrap().phase, Phase::Running);
    let before = read_counter(c, "m2").await;
    let advanced = eventually(std::time::Duration::from_secs(10), async || {
        read_counter(c, "m2").await > before
    })
    .await;
    assert!(advanced, "the restored machine does not run");
    assert!(c.get_snapshot("s1").await.is_ok());
    assert!(d.path().join("machines/m2/system.img").exists());

    for id in ["m1", "m2"] {
        c.delete_machine(id).await.unwrap();
        d.assert_nothing_left(id).await;
    }
}
