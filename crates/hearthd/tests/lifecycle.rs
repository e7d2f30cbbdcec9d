//! A real machine through its whole life: create, exec, stop, start, delete.

mod common;

use common::*;
use hearth_api::{ErrorCode, ExecRequest, Phase};
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread")]
async fn create_exec_stop_start_delete() {
    let d = Daemon::start().await;
    let c = &d.client;

    let m = c.create_machine(&create_req("m1")).await.unwrap();
    assert_eq!(m.phase, Phase::Running);
    assert!(m.started_at.is_some());

    // The guest runs the image's kernel.
    let r = c.exec("m1", &cmd(&["uname", "-r"])).await.unwrap();
    assert_eq!(r.exit_code, 0);
    assert_eq!(r.stdout.trim(), kernel_release());

    // Identity: the hostname defaults to the machine id.
    assert_eq!(sh(c, "m1", "hostname").await.stdout.trim(), "m1");

    // A failing command: its exit code and stderr come back.
    let r = sh(c, "m1", "echo to-stdout; echo to-stderr >&2; exit 7").await;
    assert_eq!(
        (r.exit_code, r.stdout.as_str(), r.stderr.as_str()),
        (7, "to-stdout\n", "to-stderr\n")
    );
    // A missing program is 127, as in a shell.
    let r = c.exec("m1", &cmd(&["/no/such/program"])).await.unwrap();
    assert_eq!(r.exit_code, 127);
    assert!(r.stderr.contains("/no/such/program"), "{}", r.stderr);

    // A command past its timeout is killed, with what it started, and reported as such.
    let t = Instant::now();
    let r = c
        .exec(
            "m1",
            &ExecRequest {
                timeout_ms: Some(500),
                ..cmd(&["sh", "-c", "echo started; sleep 30 & sleep 30"])
            },
        )
        .await
        .unwrap();
    assert!(r.timed_out);
    assert_eq!(r.exit_code, 137);
    assert_eq!(r.signal, Some(9));
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    let left = sh(c, "m1", "ps | grep -c '[s]leep 30'").await;
    assert_eq!(
        left.stdout.trim(),
        "0",
        "the timed-out command's children survived"
    );

    // env, cwd and stdin reach the command; output past the cap is truncated and flagged.
    let r = c
        .exec(
            "m1",
            &ExecRequest {
                env: Some([("GREETING".to_string(), "hi".to_string())].into()),
                cwd: Some("/tmp".into()),
                stdin_base64: Some("c3RkaW4tZGF0YQ==".into()),
                max_output_bytes: Some(1000),
                ..cmd(&[
                    "sh",
                    "-c",
                    "echo $GREETING $(pwd) $(cat); head -c 5000 /dev/zero | tr '\\0' x",
                ])
            },
        )
        .await
        .unwrap();
    assert!(
        r.stdout.starts_with("hi /tmp stdin-data\n"),
        "{:?}",
        &r.stdout[..40]
    );
    assert_eq!(r.stdout.len(), 1000);
    assert!(r.stdout_truncated && !r.stderr_truncated);

    // The same id again is a conflict, and leaves the running machine alone.
    let err = c.create_machine(&create_req("m1")).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Conflict), "{err}");
    assert_eq!(
        sh(c, "m1", "echo still-here").await.stdout.trim(),
        "still-here"
    );

    // A file written through exec survives stop + start.
    assert_eq!(
        sh(c, "m1", "echo persisted > /root/note && sync")
            .await
            .exit_code,
        0
    );
    c.stop_machine("m1").await.unwrap();
    let m = c.get_machine("m1").await.unwrap();
    assert_eq!(m.phase, Phase::Stopped);
    assert!(d.vmm_pids().is_empty(), "a stopped machine has no VMM");
    let err = c.exec("m1", &cmd(&["true"])).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Conflict));
    // Stopping again is a no-op.
    c.stop_machine("m1").await.unwrap();

    let m = c.start_machine("m1").await.unwrap();
    assert_eq!(m.phase, Phase::Running);
    assert_eq!(sh(c, "m1", "cat /root/note").await.stdout, "persisted\n");
    assert_eq!(sh(c, "m1", "hostname").await.stdout.trim(), "m1");
    let err = c.start_machine("m1").await.unwrap_err();
    assert_eq!(
        err.code(),
        Some(ErrorCode::Conflict),
        "start of a running machine"
    );

    // Delete leaves nothing, and is idempotent.
    c.delete_machine("m1").await.unwrap();
    d.assert_nothing_left("m1").await;
    c.delete_machine("m1").await.unwrap();
    assert!(c.list_machines().await.unwrap().is_empty());
}
