//! The operations journal: the daemon killed with SIGKILL in the middle of each machine
//! operation, then restarted. Each interrupted operation is finished or undone and nothing is
//! left behind; a guest that never powers off is killed after the stop timeout.

mod common;

use common::*;
use hearth_api::Phase;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread")]
async fn every_machine_operation_recovers_from_a_crash() {
    let mut d = Daemon::start_env(&[], &[("HEARTH_STALL_AT", "vmm-spawned")]).await;

    // Create, killed once its VMM runs but before the record names its pid: only the pid file
    // leads to it.
    let client = d.client.clone();
    let create = tokio::spawn(async move { client.create_machine(&create_req("m1")).await });
    d.await_stall("vmm-spawned").await;
    assert_eq!(d.vmm_pids().len(), 1);
    d.set_env(&[("HEARTH_STALL_AT", "stop-powered-off")]);
    d.restart().await;
    assert!(
        create.await.unwrap().is_err(),
        "the create cannot have succeeded"
    );
    d.assert_nothing_left("m1").await;

    // Stop, killed after the guest powered off but before the record says so.
    d.client.create_machine(&create_req("m2")).await.unwrap();
    let client = d.client.clone();
    let stop = tokio::spawn(async move { client.stop_machine("m2").await });
    d.await_stall("stop-powered-off").await;
    d.set_env(&[("HEARTH_STALL_AT", "vmm-spawned")]);
    d.restart().await;
    assert!(stop.await.unwrap().is_err());
    let m = d.client.get_machine("m2").await.unwrap();
    assert_eq!(m.phase, Phase::Stopped, "{m:?}");
    assert!(d.vmm_pids().is_empty(), "the stop was not finished");

    // Start, killed while the VMM boots: the machine is failed, its VMM gone.
    let client = d.client.clone();
    let start = tokio::spawn(async move { client.start_machine("m2").await });
    d.await_stall("vmm-spawned").await;
    assert_eq!(d.vmm_pids().len(), 1);
    d.set_env(&[("HEARTH_STALL_AT", "destroy-killed")]);
    d.restart().await;
    assert!(start.await.unwrap().is_err());
    let m = d.client.get_machine("m2").await.unwrap();
    assert_eq!(m.phase, Phase::Failed, "{m:?}");
    assert!(
        m.error.as_deref().unwrap_or("").contains("starting"),
        "{:?}",
        m.error
    );
    assert!(
        d.vmm_pids().is_empty(),
        "the half-started VMM is still there"
    );

    // A failed machine starts again; then delete, killed after its VMM was killed but before
    // its files and record went.
    let m = d.client.start_machine("m2").await.unwrap();
    assert_eq!(m.phase, Phase::Running);
    let client = d.client.clone();
    let delete = tokio::spawn(async move { client.delete_machine("m2").await });
    d.await_stall("destroy-killed").await;
    d.set_env(&[]);
    d.restart().await;
    assert!(delete.await.unwrap().is_err());
    d.assert_nothing_left("m2").await;
    assert!(
        std::fs::read_dir(d.path().join("machines"))
            .unwrap()
            .next()
            .is_none(),
        "machine directories left"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn stop_kills_a_guest_that_never_powers_off() {
    let d = Daemon::start_with(&["--stop-timeout-secs", "2"]).await;
    d.client
        .create_machine(&create_req("frozen"))
        .await
        .unwrap();
    let pids = d.vmm_pids();
    assert_eq!(pids.len(), 1);
    // A stopped VMM runs no guest: the agent cannot answer and nothing powers off.
    unsafe { libc::kill(pids[0], libc::SIGSTOP) };
    let t = Instant::now();
    d.client.stop_machine("frozen").await.unwrap();
    let took = t.elapsed();
    let m = d.client.get_machine("frozen").await.unwrap();
    assert_eq!(m.phase, Phase::Stopped);
    assert!(d.vmm_pids().is_empty(), "the VMM was not killed");
    assert!(
        d.log_count("did not power off in time") == 1,
        "the stop did not fall back to SIGKILL"
    );
    assert!(took >= Duration::from_secs(2), "gave up before the timeout");
    d.client.delete_machine("frozen").await.unwrap();
    d.assert_nothing_left("frozen").await;
}
