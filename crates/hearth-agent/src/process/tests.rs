//! Real processes on this host, each test with a table of its own.

use super::*;
use std::time::Instant;

/// Longest any test waits for a process to do what it should.
const PATIENCE: Duration = Duration::from_secs(60);

fn cmd(args: &[&str]) -> StartProcess {
    StartProcess {
        command: args.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

fn sh(script: &str) -> StartProcess {
    cmd(&["sh", "-c", script])
}

fn read(p: &Processes, key: &str, offset: u64, wait_ms: u64) -> Result<Output, Failure> {
    p.output(OutputRequest {
        process: key.into(),
        offset,
        max_bytes: MAX_OUTPUT_READ,
        wait_ms,
    })
}

fn bytes(chunks: &[OutputChunk], stream: OutputStream) -> String {
    let data: Vec<u8> = chunks
        .iter()
        .filter(|c| c.stream == stream)
        .flat_map(|c| B64.decode(&c.data_base64).unwrap())
        .collect();
    String::from_utf8(data).unwrap()
}

/// Reads a process's output to its end, checking that the chunks follow one another.
fn read_all(p: &Processes, key: &str) -> (Vec<OutputChunk>, ProcessInfo) {
    let deadline = Instant::now() + PATIENCE;
    let (mut chunks, mut offset) = (Vec::new(), 0);
    loop {
        let out = read(p, key, offset, 10_000).unwrap();
        assert_eq!(out.dropped_until, None);
        for c in &out.chunks {
            assert_eq!(c.offset, offset, "chunks are contiguous");
            offset += B64.decode(&c.data_base64).unwrap().len() as u64;
        }
        assert_eq!(out.next_offset, offset);
        chunks.extend(out.chunks);
        if !out.process.running && offset == out.process.output_bytes {
            return (chunks, out.process);
        }
        assert!(Instant::now() < deadline, "{key} did not finish");
    }
}

/// Waits for a process to be reported exited, without reading its output.
fn wait_exit(p: &Processes, key: &str) -> ProcessInfo {
    let proc = p.find(key).unwrap();
    let (state, timeout) = proc
        .changed
        .wait_timeout_while(proc.lock(), PATIENCE, |s| !s.done)
        .unwrap();
    assert!(!timeout.timed_out(), "{key} did not exit");
    proc.info(&state)
}

fn write(p: &Processes, key: &str, data: &[u8], close: bool) -> Result<(), Failure> {
    p.stdin(StdinRequest {
        process: key.into(),
        data_base64: B64.encode(data),
        close,
    })
}

fn kill(p: &Processes, key: &str, signal: i32) -> Result<(), Failure> {
    p.signal(SignalRequest {
        process: key.into(),
        signal,
    })
}

/// Reads on until the output of a terminal contains each of `want`; returns the offset past
/// them.
fn read_until(p: &Processes, key: &str, mut offset: u64, want: &[&str]) -> u64 {
    let deadline = Instant::now() + PATIENCE;
    let mut seen = String::new();
    loop {
        let out = read(p, key, offset, 10_000).unwrap();
        seen.push_str(&bytes(&out.chunks, OutputStream::Pty));
        offset = out.next_offset;
        if want.iter().all(|w| seen.contains(w)) {
            return offset;
        }
        assert!(
            out.process.running && Instant::now() < deadline,
            "no {want:?} in {seen:?}"
        );
    }
}

#[test]
fn stdout_and_stderr_come_back_with_their_streams_and_the_exit_code() {
    let p = Processes::default();
    let info = p.start(sh("echo out; echo err >&2; exit 3")).unwrap();
    assert!(info.running && !info.pty && !info.stdin);
    let (chunks, info) = read_all(&p, &info.pid.to_string());
    assert_eq!(bytes(&chunks, OutputStream::Stdout), "out\n");
    assert_eq!(bytes(&chunks, OutputStream::Stderr), "err\n");
    assert_eq!((info.exit_code, info.signal), (Some(3), None));
    assert_eq!(info.output_bytes, 8);
    assert!(info.ended_unix_ms.is_some());
}

#[test]
fn output_reads_from_zero_after_the_exit() {
    let p = Processes::default();
    let pid = p.start(cmd(&["echo", "hello"])).unwrap().pid.to_string();
    let info = wait_exit(&p, &pid);
    assert_eq!(
        (info.running, info.exit_code, info.output_bytes),
        (false, Some(0), 6)
    );
    let out = read(&p, &pid, 0, 0).unwrap();
    assert_eq!(bytes(&out.chunks, OutputStream::Stdout), "hello\n");
    assert_eq!((out.next_offset, out.dropped_until), (6, None));
    // From the middle, and with no data left (and no wait: the process is gone).
    let out = read(&p, &pid, 4, 60_000).unwrap();
    assert_eq!(bytes(&out.chunks, OutputStream::Stdout), "o\n");
    assert!(read(&p, &pid, 6, 60_000).unwrap().chunks.is_empty());
    assert_eq!(read(&p, &pid, 7, 0).unwrap_err().kind, ErrorKind::Invalid);
    assert_eq!(
        read(&p, "999999999", 0, 0).unwrap_err().kind,
        ErrorKind::NotFound
    );
    assert_eq!(
        read(&p, "nosuchtag", 0, 0).unwrap_err().kind,
        ErrorKind::NotFound
    );
}

#[test]
fn ten_megabytes_nobody_reads_stay_within_the_buffer() {
    let p = Processes::default();
    let total = 10 << 20;
    let pid = p
        .start(cmd(&["head", "-c", &total.to_string(), "/dev/zero"]))
        .unwrap()
        .pid
        .to_string();
    let info = wait_exit(&p, &pid);
    assert_eq!((info.exit_code, info.output_bytes), (Some(0), total));
    assert!(p.find(&pid).unwrap().lock().output.len() <= OUTPUT_BUFFER);
    let oldest = total - OUTPUT_BUFFER as u64;
    let out = read(&p, &pid, 0, 0).unwrap();
    assert_eq!(out.dropped_until, Some(oldest));
    assert_eq!(out.chunks[0].offset, oldest);
    assert_eq!(out.next_offset, oldest + u64::from(MAX_OUTPUT_READ));
    // The rest reads on from there without gaps.
    let out = read(&p, &pid, total - 10, 0).unwrap();
    assert_eq!((out.dropped_until, out.next_offset), (None, total));
}

#[test]
fn stdin_echoes_through_cat_and_closing_it_ends_cat() {
    let p = Processes::default();
    let info = p
        .start(StartProcess {
            stdin: true,
            ..cmd(&["cat"])
        })
        .unwrap();
    assert!(info.stdin);
    let pid = info.pid.to_string();
    write(&p, &pid, b"hello\n", false).unwrap();
    let out = read(&p, &pid, 0, 60_000).unwrap();
    assert_eq!(bytes(&out.chunks, OutputStream::Stdout), "hello\n");
    assert!(out.process.running);
    write(&p, &pid, b"bye\n", true).unwrap();
    let (chunks, info) = read_all(&p, &pid);
    assert_eq!(bytes(&chunks, OutputStream::Stdout), "hello\nbye\n");
    assert_eq!((info.exit_code, info.stdin), (Some(0), false));
    assert_eq!(
        write(&p, &pid, b"x", false).unwrap_err().kind,
        ErrorKind::Conflict
    );

    // A process started without stdin has none to write to.
    let pid = p.start(cmd(&["sleep", "1000"])).unwrap().pid.to_string();
    assert_eq!(
        write(&p, &pid, b"x", false).unwrap_err().kind,
        ErrorKind::Conflict
    );
    kill(&p, &pid, libc::SIGKILL).unwrap();
}

#[test]
fn a_signal_reaches_the_process_and_its_status_says_so() {
    let p = Processes::default();
    let pid = p.start(cmd(&["sleep", "1000"])).unwrap().pid.to_string();
    assert_eq!(kill(&p, &pid, 999).unwrap_err().kind, ErrorKind::Invalid);
    assert_eq!(kill(&p, &pid, 0).unwrap_err().kind, ErrorKind::Invalid);
    kill(&p, &pid, libc::SIGTERM).unwrap();
    let info = wait_exit(&p, &pid);
    assert_eq!((info.exit_code, info.signal), (Some(143), Some(15)));
    assert_eq!(
        kill(&p, &pid, libc::SIGTERM).unwrap_err().kind,
        ErrorKind::Conflict
    );
}

#[test]
fn a_signal_goes_to_the_whole_process_group() {
    let p = Processes::default();
    let pid = p
        .start(sh("sleep 1000 & echo started; wait"))
        .unwrap()
        .pid
        .to_string();
    // The shell has started its child.
    let out = read(&p, &pid, 0, 60_000).unwrap();
    assert_eq!(bytes(&out.chunks, OutputStream::Stdout), "started\n");
    kill(&p, &pid, libc::SIGKILL).unwrap();
    let info = wait_exit(&p, &pid);
    assert_eq!(info.signal, Some(9));
    // Had the shell's child lived on, it would hold the output open past the exit's grace.
    assert_eq!(p.find(&pid).unwrap().lock().readers, 0);
}

#[test]
fn a_pty_has_the_size_it_started_with_and_then_the_new_one() {
    let p = Processes::default();
    let info = p
        .start(StartProcess {
            stdin: true,
            pty: Some(PtySize { cols: 80, rows: 24 }),
            ..cmd(&["sh"])
        })
        .unwrap();
    assert!(info.pty && info.stdin);
    let pid = info.pid.to_string();
    // The master stays out of every other child the agent starts.
    let master = p.find(&pid).unwrap().pty.clone().unwrap();
    let flags = nix::fcntl::fcntl(&*master, nix::fcntl::FcntlArg::F_GETFD).unwrap();
    assert_ne!(flags & libc::FD_CLOEXEC, 0);
    write(&p, &pid, b"stty size; echo TERM=$TERM\n", false).unwrap();
    let offset = read_until(&p, &pid, 0, &["24 80", "TERM=xterm-256color"]);
    p.resize(ResizeRequest {
        process: pid.clone(),
        cols: 100,
        rows: 30,
    })
    .unwrap();
    write(&p, &pid, b"stty size\n", false).unwrap();
    read_until(&p, &pid, offset, &["30 100"]);
    // Closing a terminal's input is ^D: the shell reads the end of its input and exits.
    write(&p, &pid, b"", true).unwrap();
    let (chunks, info) = read_all(&p, &pid);
    assert!(chunks.iter().all(|c| c.stream == OutputStream::Pty));
    assert_eq!(info.exit_code, Some(0));
    let resize = |process: &str| {
        p.resize(ResizeRequest {
            process: process.into(),
            cols: 10,
            rows: 10,
        })
        .unwrap_err()
        .kind
    };
    assert_eq!(resize(&pid), ErrorKind::Conflict);

    // A process without a terminal cannot be resized.
    let pid = p.start(cmd(&["sleep", "1000"])).unwrap().pid.to_string();
    assert_eq!(resize(&pid), ErrorKind::Conflict);
    kill(&p, &pid, libc::SIGKILL).unwrap();
}

#[test]
fn tags_are_unique_among_running_processes_and_find_them() {
    let p = Processes::default();
    let tagged = |tag: &str| StartProcess {
        tag: Some(tag.into()),
        ..cmd(&["sleep", "1000"])
    };
    for bad in ["", "123", "a b", "é", &"x".repeat(65)] {
        assert_eq!(
            p.start(tagged(bad)).unwrap_err().kind,
            ErrorKind::Invalid,
            "{bad:?}"
        );
    }
    let first = p.start(tagged("job-1.x_y")).unwrap();
    assert_eq!(first.tag.as_deref(), Some("job-1.x_y"));
    assert_eq!(
        p.start(tagged("job-1.x_y")).unwrap_err().kind,
        ErrorKind::Conflict
    );
    assert_eq!(read(&p, "job-1.x_y", 0, 0).unwrap().process.pid, first.pid);
    kill(&p, "job-1.x_y", libc::SIGKILL).unwrap();
    wait_exit(&p, "job-1.x_y");
    // Exited, the tag still finds it; once another runs with it, that one.
    assert_eq!(read(&p, "job-1.x_y", 0, 0).unwrap().process.pid, first.pid);
    let second = p.start(tagged("job-1.x_y")).unwrap();
    let found = read(&p, "job-1.x_y", 0, 0).unwrap().process;
    assert_eq!((found.pid, found.running), (second.pid, true));
    kill(&p, "job-1.x_y", libc::SIGKILL).unwrap();
}

#[test]
fn a_read_waiting_for_output_wakes_when_it_comes() {
    let p = Processes::default();
    // The process prints the time it writes and runs on; the read started long before, with a
    // long wait.
    let pid = p
        .start(sh("sleep 0.5; date +%s%N; exec sleep 1000"))
        .unwrap()
        .pid
        .to_string();
    let out = read(&p, &pid, 0, u64::MAX).unwrap();
    kill(&p, &pid, libc::SIGKILL).unwrap();
    let returned = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let printed: u128 = bytes(&out.chunks, OutputStream::Stdout)
        .trim()
        .parse()
        .unwrap();
    let latency = Duration::from_nanos((returned.as_nanos() - printed) as u64);
    assert!(latency < Duration::from_secs(1), "woke {latency:?} late");

    // An exit with no output wakes a waiting read too.
    let pid = p.start(sh("sleep 0.5")).unwrap().pid.to_string();
    let asked = Instant::now();
    let out = read(&p, &pid, 0, 60_000).unwrap();
    assert!(!out.process.running && out.chunks.is_empty());
    assert!(asked.elapsed() < Duration::from_secs(10));
}

#[test]
fn a_process_runs_as_the_user_asked_for() {
    let p = Processes::default();
    let pid = p
        .start(StartProcess {
            user: Some("nobody".into()),
            ..sh("id -u; id -g; id -G; echo $HOME")
        })
        .unwrap()
        .pid
        .to_string();
    let (chunks, _) = read_all(&p, &pid);
    let home = users::lookup("nobody").unwrap().home;
    assert_eq!(
        bytes(&chunks, OutputStream::Stdout),
        // No supplementary group of the agent's is left.
        format!("65534\n65534\n65534\n{home}\n")
    );
    let unknown = StartProcess {
        user: Some("no-such-user".into()),
        ..cmd(&["true"])
    };
    assert_eq!(p.start(unknown).unwrap_err().kind, ErrorKind::Invalid);
}

#[test]
fn env_and_cwd_apply_on_top_of_the_base_environment() {
    let p = Processes::default();
    let mut req = sh("echo $PATH; echo $FOO; pwd");
    req.env.insert("FOO".into(), "bar".into());
    req.cwd = Some("/tmp".into());
    let pid = p.start(req).unwrap().pid.to_string();
    let (chunks, _) = read_all(&p, &pid);
    assert_eq!(
        bytes(&chunks, OutputStream::Stdout),
        format!("{}\nbar\n/tmp\n", crate::exec::PATH)
    );
    let mut bad = cmd(&["true"]);
    bad.env.insert("A=B".into(), "c".into());
    assert_eq!(p.start(bad).unwrap_err().kind, ErrorKind::Invalid);
    let nowhere = StartProcess {
        cwd: Some("/no/such/dir".into()),
        ..cmd(&["true"])
    };
    assert_eq!(p.start(nowhere).unwrap_err().kind, ErrorKind::NotFound);
}

#[test]
fn a_program_that_cannot_start_is_an_error_not_a_process() {
    let p = Processes::default();
    let err = p.start(cmd(&["/no/such/program"])).unwrap_err();
    assert_eq!(err.kind, ErrorKind::NotFound);
    assert!(err.message.contains("/no/such/program"), "{}", err.message);
    assert_eq!(p.start(cmd(&[])).unwrap_err().kind, ErrorKind::Invalid);
    assert!(p.list().is_empty());
}

#[test]
fn output_held_open_by_a_background_child_ends_after_the_grace() {
    let p = Processes::default();
    let pid = p
        .start(sh("sleep 1000 & echo started"))
        .unwrap()
        .pid
        .to_string();
    let (chunks, info) = read_all(&p, &pid);
    assert_eq!(bytes(&chunks, OutputStream::Stdout), "started\n");
    assert_eq!(info.exit_code, Some(0));
    // The shell's `sleep` is still in its group.
    killpg(Pid::from_raw(info.pid as i32), Signal::SIGKILL).unwrap();
}

#[test]
fn the_list_keeps_running_and_recently_exited_processes_in_start_order() {
    let p = Processes::default();
    let sleeper = p.start(cmd(&["sleep", "1000"])).unwrap();
    let mut exited = Vec::new();
    for _ in 0..EXITED_KEPT + 2 {
        let pid = p.start(cmd(&["true"])).unwrap().pid;
        wait_exit(&p, &pid.to_string());
        exited.push(pid);
    }
    let list = p.list();
    let pids: Vec<u32> = list.iter().map(|i| i.pid).collect();
    let mut want = vec![sleeper.pid];
    want.extend(&exited[2..]);
    assert_eq!(pids, want);
    assert!(list[0].running && list[1..].iter().all(|i| !i.running));
    kill(&p, &sleeper.pid.to_string(), libc::SIGKILL).unwrap();
}
