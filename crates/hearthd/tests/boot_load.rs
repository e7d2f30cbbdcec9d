//! 20 boots in a row while every core is busy: none may hang.

mod common;

use common::*;
use hearth_api::Phase;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread")]
async fn twenty_boots_under_a_busy_cpu() {
    let d = Daemon::start().await;
    let stop = Arc::new(AtomicBool::new(false));
    let burners: Vec<_> = (0..std::thread::available_parallelism().unwrap().get())
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut x = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                }
            })
        })
        .collect();
    let mut times = Vec::new();
    for i in 0..20 {
        let id = format!("boot-{i}");
        let t = Instant::now();
        let m = d.client.create_machine(&create_req(&id)).await;
        let m = m.unwrap_or_else(|e| panic!("boot {i} failed: {e}"));
        assert_eq!(m.phase, Phase::Running);
        times.push(t.elapsed());
        assert_eq!(sh(&d.client, &id, "echo ok").await.stdout, "ok\n");
        d.client.delete_machine(&id).await.unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    for b in burners {
        b.join().unwrap();
    }
    times.sort();
    eprintln!(
        "boot times under load: min {:?} median {:?} max {:?}",
        times[0], times[10], times[19]
    );
    assert!(times[19] < Duration::from_secs(60));
    assert!(d.vmm_pids().is_empty());
}
