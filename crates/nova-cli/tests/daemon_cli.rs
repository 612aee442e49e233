//! The `nova` client commands end to end against a real daemon: `nova serve`
//! in a private `$NOVA_HOME` (sharing the built templates), owned by a guard
//! that removes its sandboxes and stops it on drop.
//!
//! One sandbox is booted for the whole flow (create, ls, exec, cp, stats,
//! pause/resume, logs, inspect, stop, rm), to keep the number of TCG boots
//! small.

#![allow(clippy::unwrap_used, reason = "test code")]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use novasandbox::core::NovaHome;

/// Bound on a daemon starting: a guard against a hang, not a timing.
const START_LIMIT: Duration = Duration::from_secs(60);

fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if condition() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    condition()
}

/// `nova ARGS` with `$NOVA_HOME` = `home` and no `NOVA_URL`.
fn nova(home: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_nova"));
    command
        .args(args)
        .env("NOVA_HOME", home)
        .env_remove("NOVA_URL")
        .env_remove("NOVA_TOKEN")
        .env_remove("NOVA_LOG")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null());
    command
}

/// A `nova serve` of its own, stopped with its sandboxes on drop.
struct Daemon {
    home: tempfile::TempDir,
    child: Child,
}

impl Daemon {
    /// Starts a daemon (no network by default, also on TCP at an ephemeral
    /// port); `None` (after a SKIP line) when the minimal template is not
    /// built and NOVA_SKIP_VM_TESTS=1.
    fn start(test: &str) -> Option<Self> {
        let templates = NovaHome::resolve().unwrap().templates_dir();
        if !templates.join("minimal/minimal.json").is_file() {
            if std::env::var_os("NOVA_SKIP_VM_TESTS").is_some_and(|v| v == "1") {
                eprintln!("SKIP {test}: no minimal template (NOVA_SKIP_VM_TESTS=1)");
                return None;
            }
            panic!(
                "the minimal template is not built in {}; run `make images`",
                templates.display()
            );
        }
        let home = tempfile::Builder::new()
            .prefix("nova-cli-")
            .tempdir_in("/tmp")
            .unwrap();
        std::os::unix::fs::symlink(&templates, home.path().join("templates")).unwrap();
        std::fs::write(
            home.path().join("policy.toml"),
            "[network]\ndefault = false\n",
        )
        .unwrap();
        let log = std::fs::File::create(home.path().join("serve.log")).unwrap();
        let child = nova(home.path(), &["serve", "--listen", "127.0.0.1:0"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut daemon = Self { home, child };
        let up = wait_until(START_LIMIT, || {
            daemon.child.try_wait().unwrap().is_none()
                && daemon.log().contains("listening on")
                && daemon.nova(&["ls"]).output().unwrap().status.success()
        });
        assert!(up, "nova serve did not start: {}", daemon.log());
        Some(daemon)
    }

    fn home(&self) -> &Path {
        self.home.path()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.home().join("serve.log")).unwrap_or_default()
    }

    /// The daemon's TCP URL, from its start line.
    fn url(&self) -> String {
        let log = self.log();
        let at = log.find("http://").expect("the daemon listens on TCP");
        log[at..].split_whitespace().next().unwrap().to_owned()
    }

    fn nova(&self, args: &[&str]) -> Command {
        nova(self.home(), args)
    }

    /// `nova ARGS`, which must succeed; its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.nova(args).output().unwrap();
        assert!(
            out.status.success(),
            "nova {args:?} failed: {}\n$NOVA_HOME {} exists: {}; daemon log: {}",
            text(&out),
            self.home().display(),
            self.home().exists(),
            self.log()
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Sandboxes outlive a daemon that stops (for the next to re-attach):
        // remove them first.
        if let Ok(out) = self.nova(&["ls", "-a", "-q"]).output() {
            for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = self.nova(&["rm", "-f", id]).output();
            }
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let stopped = wait_until(Duration::from_secs(30), || {
            self.child.try_wait().ok().flatten().is_some()
        });
        if !stopped {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // Last resort: any VMM still named in a sandbox directory.
        for pid in vmm_pids(&self.home().join("sandboxes")) {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    }
}

/// The `vmm_pid`s in `sandboxes/*/state.json`.
fn vmm_pids(dir: &Path) -> Vec<u64> {
    fn find(value: &serde_json::Value, out: &mut Vec<u64>) {
        match value {
            serde_json::Value::Object(map) => {
                for (k, v) in map {
                    match (k.as_str(), v.as_u64()) {
                        ("vmm_pid", Some(pid)) if pid > 1 => out.push(pid),
                        _ => find(v, out),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| find(v, out)),
            _ => {}
        }
    }
    let mut pids = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let state: PathBuf = entry.path().join("state.json");
        if let Ok(text) = std::fs::read_to_string(state)
            && let Ok(value) = serde_json::from_str(&text)
        {
            find(&value, &mut pids);
        }
    }
    pids
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `len` bytes that do not compress or repeat (xorshift).
fn random_bytes(len: usize) -> Vec<u8> {
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

#[test]
fn ls_without_a_daemon_says_how_to_start_one() {
    let home = tempfile::tempdir().unwrap();
    let out = nova(home.path(), &["ls"]).output().unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let expected = format!(
        "no daemon at {}: start one with `nova serve` (or set NOVA_URL)",
        home.path().join("nova.sock").display()
    );
    assert!(stderr.contains(&expected), "{}", text(&out));
}

#[test]
fn the_client_commands_drive_one_sandbox_through_its_life() {
    let Some(d) = Daemon::start("the_client_commands_drive_one_sandbox_through_its_life") else {
        return;
    };
    // create prints the id only.
    let id = d.ok(&[
        "create",
        "-t",
        "minimal",
        "--memory",
        "256",
        "--vcpus",
        "1",
        "--no-network",
        "-l",
        "team=a",
        "-e",
        "GREETING=hello",
    ]);
    let id = id.trim().to_owned();
    assert!(
        id.starts_with("sb-") && !id.contains(char::is_whitespace),
        "{id:?}"
    );

    // ls: table, ids, JSON, label filters.
    let table = d.ok(&["ls"]);
    let mut lines = table.lines();
    assert!(lines.next().unwrap().starts_with("ID "), "{table}");
    let row = lines.next().unwrap();
    assert!(row.starts_with(&id), "{table}");
    for cell in ["minimal", "running", "ago", "team=a"] {
        assert!(row.contains(cell), "{cell} missing: {table}");
    }
    assert_eq!(d.ok(&["ls", "-q"]).trim(), id);
    let json: serde_json::Value = serde_json::from_str(&d.ok(&["ls", "--json"])).unwrap();
    assert_eq!(json[0]["id"], id.as_str());
    assert_eq!(json[0]["state"], "running");
    assert_eq!(d.ok(&["ls", "-q", "-l", "team=b"]).trim(), "");
    assert_eq!(d.ok(&["ls", "-q", "--filter", "label=team=a"]).trim(), id);

    // exec: exit code, stdout and stderr each to their own fd, env.
    let out = d
        .nova(&[
            "exec",
            &id,
            "--",
            "sh",
            "-c",
            "echo out $GREETING; echo err >&2; exit 3",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "out hello\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");
    let out = d
        .nova(&["exec", &id, "--", "no-such-program"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(127), "{}", text(&out));
    let out = d
        .nova(&[
            "exec",
            "-w",
            "/tmp",
            "-e",
            "X=1",
            &id,
            "--",
            "sh",
            "-c",
            "echo $PWD $X",
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "/tmp 1\n",
        "{}",
        text(&out)
    );
    // exec -u: as another user (a uid the guest does not list: group 0,
    // HOME=/), and an unknown name ends with 126, naming it.
    let out = d
        .nova(&[
            "exec",
            "-u",
            "4242",
            &id,
            "--",
            "sh",
            "-c",
            "echo $(id -u) $(id -g) $HOME",
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "4242 0 /\n",
        "{}",
        text(&out)
    );
    let out = d
        .nova(&["exec", "--user", "no-such-user", &id, "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(126), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no-such-user"),
        "{}",
        text(&out)
    );

    // exec -i: stdin forwarded, EOF closes it.
    let mut child = d
        .nova(&["exec", "-i", &id, "--", "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"hi\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi\n");

    // exec -t (stdin not a terminal here: the command still gets one).
    let out = d.nova(&["exec", "-t", &id, "--", "tty"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("/dev/pts/"),
        "{}",
        text(&out)
    );

    // Ctrl-C (SIGINT) without -t is forwarded to the command, as docker does.
    let mut child = d
        .nova(&["exec", &id, "--", "sh", "-c", "echo ready; exec sleep 60"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    assert_eq!(line, "ready\n");
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", text(&out));

    // cp both ways, byte for byte, with a directory as the destination.
    let work = tempfile::tempdir().unwrap();
    let blob = random_bytes(3 * 1024 * 1024 + 17);
    let local = work.path().join("blob.bin");
    std::fs::write(&local, &blob).unwrap();
    d.ok(&["cp", local.to_str().unwrap(), &format!("{id}:/tmp/")]);
    let size = d.ok(&["exec", &id, "--", "stat", "-c", "%s", "/tmp/blob.bin"]);
    assert_eq!(size.trim(), blob.len().to_string());
    let back = work.path().join("back");
    std::fs::create_dir(&back).unwrap();
    d.ok(&["cp", &format!("{id}:/tmp/blob.bin"), back.to_str().unwrap()]);
    assert!(
        std::fs::read(back.join("blob.bin")).unwrap() == blob,
        "copy differs"
    );
    let stdout = d
        .nova(&["cp", &format!("{id}:/tmp/blob.bin"), "-"])
        .output()
        .unwrap();
    assert!(
        stdout.status.success() && stdout.stdout == blob,
        "cp to stdout differs"
    );
    let out = d
        .nova(&["cp", work.path().to_str().unwrap(), &format!("{id}:/tmp/x")])
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("copies files only"),
        "{}",
        text(&out)
    );
    let out = d
        .nova(&["cp", &format!("{id}:/nope"), "-"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", text(&out));

    // stats: table and JSON.
    let stats = d.ok(&["stats", &id]);
    assert!(stats.starts_with("ID "), "{stats}");
    assert!(
        stats.contains(&id) && stats.contains("MiB / 256.0MiB"),
        "{stats}"
    );
    let json: serde_json::Value = serde_json::from_str(&d.ok(&["stats", "--json", &id])).unwrap();
    assert_eq!(json[0]["id"], id.as_str());
    assert!(
        json[0]["stats"]["cpu_usage_us"].as_u64().unwrap() > 0,
        "{json}"
    );

    // pause / resume, as inspect sees them.
    assert_eq!(d.ok(&["pause", &id]).trim(), id);
    let view: serde_json::Value = serde_json::from_str(&d.ok(&["inspect", &id])).unwrap();
    assert_eq!(view["state"], "paused");
    assert_eq!(d.ok(&["resume", &id]).trim(), id);
    let view: serde_json::Value = serde_json::from_str(&d.ok(&["inspect", &id])).unwrap();
    assert_eq!(view["state"], "running");
    assert_eq!(view["labels"]["team"], "a");

    // logs: the console's tail.
    let logs = d.nova(&["logs", &id, "--tail", "4096"]).output().unwrap();
    assert!(
        logs.status.success() && !logs.stdout.is_empty(),
        "{}",
        text(&logs)
    );
    assert!(logs.stdout.len() <= 2 * 4096, "{}", logs.stdout.len());

    // The same daemon over TCP, with the token from $NOVA_HOME/token.
    let out = d
        .nova(&["ls", "-q"])
        .env("NOVA_URL", d.url())
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        id,
        "{}",
        text(&out)
    );
    let out = d
        .nova(&["ls", "-q"])
        .env("NOVA_URL", d.url())
        .env("NOVA_TOKEN", "wrong")
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", text(&out));

    // rm refuses a running sandbox, like docker.
    let out = d.nova(&["rm", &id]).output().unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("nova rm -f"),
        "{}",
        text(&out)
    );

    // stop: gone from ls, kept by ls -a; then rm.
    assert_eq!(d.ok(&["stop", &id]).trim(), id);
    assert_eq!(d.ok(&["ls", "-q"]).trim(), "");
    assert_eq!(d.ok(&["ls", "-a", "-q"]).trim(), id);
    let view: serde_json::Value = serde_json::from_str(&d.ok(&["inspect", &id])).unwrap();
    assert_eq!(view["state"], "stopped");
    assert_eq!(d.ok(&["rm", &id]).trim(), id);
    assert_eq!(d.ok(&["ls", "-a", "-q"]).trim(), "");

    // A daemon's problem prints its detail.
    let out = d.nova(&["exec", &id, "--", "true"]).output().unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no sandbox with id"),
        "{}",
        text(&out)
    );
}
