//! A guest that floods its serial console: `console.log` stays within its cap (one previous
//! file kept), the daemon's memory stays flat, nothing the guest writes while the daemon is
//! down is lost, and the console's last lines still explain a machine's death.

mod common;

use common::*;
use hearth_api::Phase;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::time::Duration;

const CAP: u64 = 64 << 10;

/// `tick-N` lines in the console files, in order.
fn ticks(d: &Daemon, id: &str) -> Vec<u64> {
    let dir = d.path().join("machines").join(id);
    let text = ["console.log.1", "console.log"]
        .iter()
        .map(|f| {
            String::from_utf8_lossy(&std::fs::read(dir.join(f)).unwrap_or_default()).into_owned()
        })
        .collect::<String>();
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("tick-")?.parse().ok())
        .collect()
}

/// Bytes waiting in the machine's console pipe (written by the guest, not yet read).
fn pending_in_pipe(d: &Daemon, id: &str) -> usize {
    let run = hearthd::service::machine_paths(d.path(), id).sock_dir;
    let pipe = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(run.join("console.out"))
        .unwrap();
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int through the pointer; the descriptor is open.
    assert_eq!(
        unsafe { libc::ioctl(pipe.as_raw_fd(), libc::FIONREAD, &mut n) },
        0
    );
    n as usize
}

#[tokio::test(flavor = "multi_thread")]
async fn a_console_flood_stays_within_its_cap() {
    let mut d = Daemon::start_with(&["--console-log-bytes", &CAP.to_string()]).await;
    d.client.create_machine(&create_req("m")).await.unwrap();
    let dir = d.path().join("machines/m");
    let before = rss_of(d.pid());

    // A million bytes through the serial port (28-byte lines), as fast as the guest writes;
    // the API and the guest's agent answer meanwhile.
    let client = d.client.clone();
    let flood = tokio::spawn(async move {
        sh(
            &client,
            "m",
            "yes hostile-guest-console-flood | head -n 35715 > /dev/ttyS0; echo written",
        )
        .await
    });
    let rotating = eventually(Duration::from_secs(30), async || {
        dir.join("console.log.1").exists()
    })
    .await;
    assert!(rotating, "the console never reached its cap");
    let t = std::time::Instant::now();
    d.client.list_machines().await.unwrap();
    let api = t.elapsed();
    let t = std::time::Instant::now();
    assert_eq!(sh(&d.client, "m", "echo ok").await.stdout, "ok\n");
    let exec = t.elapsed();
    eprintln!("during the flood: list {api:?}, exec {exec:?}");
    let r = flood.await.unwrap();
    assert_eq!(r.stdout, "written\n", "{r:?}");
    let size = |f: &str| std::fs::metadata(dir.join(f)).map_or(0, |m| m.len());
    let flooded = eventually(Duration::from_secs(30), async || {
        std::fs::read(dir.join("console.log")).is_ok_and(|t| {
            String::from_utf8_lossy(&t)
                .trim_end()
                .ends_with("\nhostile-guest-console-flood")
        })
    })
    .await;
    assert!(flooded, "the flood's end never reached console.log");
    assert!(size("console.log") <= CAP, "{}", size("console.log"));
    assert_eq!(size("console.log.1"), CAP);
    let grown = rss_of(d.pid()).saturating_sub(before);
    eprintln!("daemon memory grew by {} KiB over the flood", grown >> 10);
    assert!(grown < 8 << 20, "the daemon grew by {grown} bytes");

    // A guest writing while the daemon is down: its lines wait in the pipe, and the next
    // daemon copies them on, none lost.
    sh(
        &d.client,
        "m",
        "(i=0; while true; do i=$((i+1)); echo tick-$i > /dev/console; sleep 0.1; done) >/dev/null 2>&1 &",
    )
    .await;
    assert!(
        eventually(Duration::from_secs(30), async || !ticks(&d, "m").is_empty()).await,
        "no tick reached the console"
    );
    d.kill9();
    let waiting = eventually(Duration::from_secs(30), async || {
        pending_in_pipe(&d, "m") > 0
    })
    .await;
    assert!(waiting, "the guest wrote nothing while the daemon was down");
    let seen_before = *ticks(&d, "m").last().unwrap();
    d.restart().await;
    let caught_up = eventually(Duration::from_secs(30), async || {
        ticks(&d, "m").last().is_some_and(|&t| t > seen_before + 5)
    })
    .await;
    assert!(
        caught_up,
        "the console was not taken up again after the restart"
    );
    let t = ticks(&d, "m");
    assert!(
        t.windows(2).all(|w| w[1] == w[0] + 1),
        "ticks were lost across the restart: {t:?}"
    );

    // The last lines explain a death, read from the end of the files.
    let m = d.client.get_machine("m").await.unwrap();
    assert_eq!(m.phase, Phase::Running);
    for p in d.vmm_pids() {
        // SAFETY: plain kill of the test daemon's own VMM.
        unsafe { libc::kill(p, libc::SIGKILL) };
    }
    let failed = eventually(Duration::from_secs(30), async || {
        d.client
            .get_machine("m")
            .await
            .is_ok_and(|m| m.phase == Phase::Failed)
    })
    .await;
    assert!(failed, "the machine was not marked failed");
    let error = d.client.get_machine("m").await.unwrap().error.unwrap();
    assert!(error.contains("tick-"), "{error}");
    d.client.delete_machine("m").await.unwrap();
    d.assert_nothing_left("m").await;
}
