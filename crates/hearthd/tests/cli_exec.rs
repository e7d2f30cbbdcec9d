//! The `hearth` CLI's processes and files against a real daemon and machine: `exec` streaming
//! with the exit status and Ctrl-C passed through, `exec -d` with `ps`, `logs` and `kill`, `cp`
//! of a tree both ways, and `exec -it` on a real terminal (tmux).

mod common;

use common::*;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

fn cli(d: &Daemon) -> Command {
    let mut c = Command::new(hearth_cli());
    c.arg("--socket").arg(d.client.socket());
    c
}

/// Runs the CLI; returns its exit code, stdout and stderr.
fn run(d: &Daemon, args: &[&str]) -> (i32, String, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = cli(d).args(args).stdin(Stdio::null()).output().unwrap();
    (
        status.code().expect("the CLI was killed by a signal"),
        String::from_utf8_lossy(&stdout).into_owned(),
        String::from_utf8_lossy(&stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn cli_processes_and_files() {
    let d = Daemon::start().await;
    d.client.create_machine(&create_req("m1")).await.unwrap();
    exec_streams(&d).await;
    background(&d).await;
    cp_round_trip(&d).await;
    interactive(&d).await;
}

/// `exec` passes stdout, stderr and the exit status through; output shows while the command
/// runs, and Ctrl-C interrupts the command (not the CLI).
async fn exec_streams(d: &Daemon) {
    let (code, out, err) = run(
        d,
        &[
            "exec",
            "m1",
            "--",
            "sh",
            "-c",
            "echo out; echo err >&2; exit 5",
        ],
    );
    assert_eq!((code, out.as_str(), err.as_str()), (5, "out\n", "err\n"));

    // Stdin streams in with -i; its end closes the command's stdin.
    let mut cat = cli(d)
        .args(["exec", "-i", "m1", "--", "sh", "-c", "cat; echo done"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    cat.stdin.take().unwrap().write_all(b"piped in\n").unwrap();
    let out = cat.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "piped in\ndone\n");

    // --json keeps the buffered exec.
    let (code, out, _) = run(d, &["--json", "exec", "m1", "--", "echo", "hi"]);
    assert_eq!(code, 0);
    let r: hearth_api::ExecResponse = serde_json::from_str(&out).unwrap();
    assert_eq!((r.exit_code, r.stdout.as_str()), (0, "hi\n"));

    let mut child = cli(d)
        .args([
            "exec",
            "m1",
            "--",
            "sh",
            "-c",
            "echo first; sleep 100; echo never",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let _ = tx.send(line.unwrap());
        }
    });
    let first = rx.recv_timeout(Duration::from_secs(60));
    assert_eq!(
        first.as_deref(),
        Ok("first"),
        "no output while the command runs"
    );
    assert!(child.try_wait().unwrap().is_none(), "the CLI ended early");
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(130),
        "SIGINT reached the command, the CLI waited for it"
    );
    assert!(
        rx.recv_timeout(Duration::from_secs(5)).is_err(),
        "the command went on"
    );
}

/// `exec -d` starts in the background; `ps`, `logs` and `kill` find the process by pid or tag.
async fn background(d: &Daemon) {
    let (code, out, err) = run(
        d,
        &[
            "exec",
            "-d",
            "--tag",
            "bg",
            "m1",
            "--",
            "sh",
            "-c",
            "echo hello; echo oops >&2; sleep 1000",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let pid: u32 = out
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("not a pid: {out:?}"));

    let (code, out, err) = run(d, &["ps", "m1"]);
    assert_eq!(code, 0, "{err}");
    let row = out
        .lines()
        .find(|l| l.split_whitespace().next() == Some(&pid.to_string()))
        .unwrap_or_else(|| panic!("{pid} not in\n{out}"));
    assert!(out.starts_with("PID"), "{out}");
    assert!(
        row.contains(" bg ") && row.contains("running") && row.contains("sh -c echo hello"),
        "{row}"
    );

    let logged = eventually(Duration::from_secs(30), async || {
        let (_, out, err) = run(d, &["logs", "m1", "bg"]);
        out == "hello\n" && err == "oops\n"
    })
    .await;
    assert!(
        logged,
        "logs: {:?}",
        run(d, &["logs", "m1", &pid.to_string()])
    );

    // logs -f follows until the process ends, which kill brings about.
    let follower = cli(d)
        .args(["logs", "-f", "m1", &pid.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (code, _, err) = run(d, &["kill", "m1", "bg"]);
    assert_eq!(code, 0, "{err}");
    let followed = follower.wait_with_output().unwrap();
    assert_eq!(followed.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&followed.stdout), "hello\n");

    let (_, out, _) = run(d, &["ps", "m1"]);
    let row = out
        .lines()
        .find(|l| l.starts_with(&pid.to_string()))
        .unwrap();
    assert!(row.contains("killed by SIGTERM"), "{row}");
    let (_, out, _) = run(d, &["--json", "ps", "m1"]);
    let list: Vec<hearth_api::ProcessInfo> = serde_json::from_str(&out).unwrap();
    let p = list.iter().find(|p| p.pid == pid).unwrap();
    assert_eq!(
        (p.running, p.exit_code, p.signal),
        (false, Some(143), Some(15))
    );

    // -d --json prints the process; kill takes a signal by number.
    let (code, out, _) = run(d, &["--json", "exec", "-d", "m1", "--", "sleep", "1000"]);
    assert_eq!(code, 0);
    let p: hearth_api::ProcessInfo = serde_json::from_str(&out).unwrap();
    assert!(p.running && p.command == ["sleep", "1000"], "{p:?}");
    let (code, _, err) = run(d, &["kill", "-s", "9", "m1", &p.pid.to_string()]);
    assert_eq!(code, 0, "{err}");
    let gone = eventually(Duration::from_secs(30), async || {
        !d.client
            .get_process("m1", &p.pid.to_string())
            .await
            .unwrap()
            .running
    })
    .await;
    assert!(gone, "SIGKILL did not end {}", p.pid);

    // Bad input: a clear error, a failure status.
    let (code, _, err) = run(d, &["kill", "m1", "nosuch"]);
    assert!(code != 0 && err.contains("nosuch"), "{err}");
    let (code, _, err) = run(d, &["kill", "-s", "NOPE", "m1", "bg"]);
    assert!(code != 0 && err.contains("NOPE"), "{err}");
    let (code, _, err) = run(d, &["logs", "nope", "1"]);
    assert!(code != 0 && err.contains("nope"), "{err}");
}

/// What a tree holds, comparably: per path, the kind, the permission bits and the content or
/// link target.
fn tree(root: &Path) -> Vec<(PathBuf, String, u32, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let meta = std::fs::symlink_metadata(&p).unwrap();
        let rel = p.strip_prefix(root).unwrap().to_path_buf();
        let mode = meta.permissions().mode() & 0o7777;
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&p).unwrap();
            out.push((
                rel,
                "link".into(),
                0,
                target.into_os_string().into_encoded_bytes(),
            ));
        } else if meta.is_dir() {
            out.push((rel, "dir".into(), mode, Vec::new()));
            for e in std::fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
        } else {
            out.push((rel, "file".into(), mode, std::fs::read(&p).unwrap()));
        }
    }
    out.sort();
    out
}

/// `cp` a directory with a symlink, a 0600 file and an empty file into the machine and back.
async fn cp_round_trip(d: &Daemon) {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("tree");
    std::fs::create_dir_all(src.join("sub/deeper")).unwrap();
    std::fs::write(src.join("secret"), "hush\n").unwrap();
    std::fs::set_permissions(src.join("secret"), std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(src.join("sub/empty"), "").unwrap();
    std::fs::write(src.join("sub/deeper/big"), vec![7u8; 3 << 20]).unwrap();
    std::fs::set_permissions(
        src.join("sub/deeper/big"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::os::unix::fs::symlink("../secret", src.join("sub/link")).unwrap();
    let src_arg = src.to_str().unwrap();

    // Into an existing directory: copied under its name.
    let (code, _, err) = run(d, &["cp", src_arg, "m1:/tmp"]);
    assert_eq!(code, 0, "{err}");
    let r = sh(
        &d.client,
        "m1",
        "cd /tmp/tree && stat -c '%a %s' secret sub/empty && readlink sub/link && cat sub/link",
    )
    .await;
    assert_eq!(r.stdout, "600 5\n644 0\n../secret\nhush\n", "{}", r.stderr);
    // To a path that does not exist: created, with the directory's contents.
    let (code, _, err) = run(d, &["cp", src_arg, "m1:/tmp/copy"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        sh(&d.client, "m1", "cat /tmp/copy/secret").await.stdout,
        "hush\n"
    );

    // Back out, to a path that does not exist, and into an existing directory.
    let back = tmp.path().join("back");
    let (code, _, err) = run(d, &["cp", "m1:/tmp/tree", back.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(tree(&back), tree(&src));
    let into = tmp.path().join("into");
    std::fs::create_dir(&into).unwrap();
    let (code, _, err) = run(d, &["cp", "m1:/tmp/copy/.", into.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(tree(&into), tree(&src), "the contents of /tmp/copy");
    // One file into a directory.
    let (code, _, err) = run(
        d,
        &[
            "cp",
            "m1:/tmp/tree/secret",
            into.join("sub").to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(std::fs::read(into.join("sub/secret")).unwrap(), b"hush\n");
    let mode = std::fs::metadata(into.join("sub/secret"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    // docker cp's refusals.
    let (code, _, err) = run(d, &["cp", src_arg, "m1:/tmp/tree/secret"]);
    assert!(
        code != 0 && err.contains("cannot copy a directory to a file"),
        "{err}"
    );
    let (code, _, err) = run(d, &["cp", "m1:/no/such", tmp.path().to_str().unwrap()]);
    assert!(code != 0 && err.contains("/no/such"), "{err}");
    let (code, _, err) = run(
        d,
        &[
            "cp",
            src.join("secret").to_str().unwrap(),
            "m1:/no/such/dir/",
        ],
    );
    assert!(code != 0 && err.contains("no such directory"), "{err}");
    let (code, _, err) = run(d, &["cp", src_arg, tmp.path().join("x").to_str().unwrap()]);
    assert!(code != 0 && err.contains("MACHINE:PATH"), "{err}");
}

/// A tmux server of the test's own, killed when dropped.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn start(size: (u16, u16)) -> Tmux {
        let tmux = Tmux {
            socket: format!("hearth-test-{}", std::process::id()),
        };
        let (cols, rows) = (size.0.to_string(), size.1.to_string());
        tmux.run(&[
            "new-session",
            "-d",
            "-s",
            "t",
            "-x",
            &cols,
            "-y",
            &rows,
            "env -i PATH=/usr/bin:/bin TERM=xterm PS1='local$ ' bash --norc --noprofile",
        ]);
        tmux
    }

    fn run(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .args(["-L", &self.socket])
            .args(args)
            .env("TERM", "xterm")
            .output()
            .expect("tmux (scripts/install-deps installs it)");
        assert!(
            out.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Types `keys` (tmux key names: "Enter", "C-c") into the pane.
    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", "t"];
        args.extend(keys);
        self.run(&args);
    }

    fn screen(&self) -> String {
        self.run(&["capture-pane", "-p", "-t", "t"])
    }

    /// Waits until the pane shows `needle`.
    async fn shows(&self, needle: &str) {
        let seen = eventually(Duration::from_secs(60), async || {
            self.screen().contains(needle)
        })
        .await;
        assert!(seen, "the pane never showed {needle:?}:\n{}", self.screen());
    }
}

impl Tmux {
    /// Waits until the last line the pane shows is `prompt` (trailing blanks are not shown).
    async fn at_prompt(&self, prompt: &str) {
        let last = |s: String| {
            s.lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .map(str::to_string)
        };
        let seen = eventually(Duration::from_secs(60), async || {
            last(self.screen()).as_deref() == Some(prompt)
        })
        .await;
        assert!(
            seen,
            "the pane never came to {prompt:?}:\n{}",
            self.screen()
        );
    }

    /// "ROWS COLS" of the pane, as `stty size` says it.
    fn pane_size(&self) -> String {
        self.run(&[
            "display-message",
            "-p",
            "-t",
            "t",
            "#{pane_height} #{pane_width}",
        ])
        .trim()
        .to_string()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .status();
    }
}

/// `exec -it` in a real terminal: the guest's prompt and output, its size at start and after
/// a resize, Ctrl-C reaching the guest's foreground command, the exit status, and the local
/// terminal as it was.
async fn interactive(d: &Daemon) {
    let tmux = Tmux::start((100, 30));
    tmux.at_prompt("local$").await;
    let command = format!(
        "{} --socket {} exec -it -e 'PS1=guest# ' m1 -- sh",
        hearth_cli().display(),
        d.client.socket().display()
    );
    tmux.keys(&[&command, "Enter"]);
    tmux.at_prompt("guest#").await;
    tmux.keys(&["echo $((6 * 7)) && stty size", "Enter"]);
    tmux.shows(&format!("42\n{}", tmux.pane_size())).await;

    tmux.run(&["resize-window", "-t", "t", "-x", "90", "-y", "25"]);
    tmux.keys(&["clear; stty size", "Enter"]);
    tmux.shows(&tmux.pane_size()).await;
    assert!(tmux.pane_size().ends_with(" 90"));

    // A path, so that the shell runs the program rather than a builtin.
    tmux.keys(&["/bin/sleep 100", "Enter"]);
    // (The image has no pgrep.)
    let sleeping = eventually(Duration::from_secs(30), async || {
        sh(&d.client, "m1", "ps")
            .await
            .stdout
            .contains("/bin/sleep 100")
    })
    .await;
    assert!(sleeping, "sleep never started:\n{}", tmux.screen());
    tmux.keys(&["C-c"]);
    tmux.at_prompt("guest#").await;
    tmux.keys(&["echo slept=$?", "Enter"]);
    tmux.shows("slept=130").await;

    tmux.keys(&["exit 3", "Enter"]);
    tmux.at_prompt("local$").await;
    tmux.keys(&["echo status=$?", "Enter"]);
    tmux.shows("status=3").await;
    tmux.keys(&["clear; stty -a", "Enter"]);
    tmux.shows("icanon").await;
    let flags: Vec<String> = tmux
        .screen()
        .split_whitespace()
        .map(str::to_string)
        .collect();
    for flag in ["icanon", "echo", "isig", "icrnl", "opost"] {
        assert!(
            flags.iter().any(|f| f == flag),
            "the terminal lost {flag}:\n{}",
            tmux.screen()
        );
    }
}
