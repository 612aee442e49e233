//! `nova run` as a user runs it, one regression test per reported fault:
//! a command that cannot start exits 127 with one line naming it; a missing
//! working directory is named; `-i` streams stdin so `--timeout` applies
//! however stdin behaves; nova's own lines start on a fresh line.

#![allow(clippy::unwrap_used, reason = "test code")]

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use novasandbox::core::NovaHome;

/// Generous bound on one `nova run` (a TCG boot on a loaded machine, the
/// command, the stop): only guards against a hang, never a timing check.
const RUN_LIMIT: Duration = Duration::from_secs(180);

/// A private `$NOVA_HOME` sharing the built templates; `None` (after a SKIP
/// line) when the minimal template is not built and NOVA_SKIP_VM_TESTS=1.
fn test_home(test: &str) -> Option<tempfile::TempDir> {
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
        .prefix("nova-run-")
        .tempdir_in("/tmp")
        .unwrap();
    std::os::unix::fs::symlink(&templates, home.path().join("templates")).unwrap();
    Some(home)
}

/// `nova run --template minimal ARGS...` in `home`, stdout and stderr piped.
fn nova_run(home: &tempfile::TempDir, args: &[&str], stdin: Stdio) -> Child {
    Command::new(env!("CARGO_BIN_EXE_nova"))
        .args([
            "run",
            "--template",
            "minimal",
            "--memory",
            "256",
            "--vcpus",
            "1",
        ])
        .args(args)
        .env("NOVA_HOME", home.path())
        .env_remove("NOVA_LOG")
        .env_remove("RUST_LOG")
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// What a finished `nova run` printed and how it exited.
struct Finished {
    code: Option<i32>,
    stdout: String,
    /// stderr without the log lines (e.g. the TCG warning).
    stderr: String,
}

/// Waits for `child` (killing it past [`RUN_LIMIT`]) and collects its output.
fn finish(mut child: Child) -> Finished {
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        out.read_to_string(&mut s).unwrap();
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        err.read_to_string(&mut s).unwrap();
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > RUN_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "nova run did not end within {RUN_LIMIT:?}; stderr:\n{}",
                err_reader.join().unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stderr = err_reader
        .join()
        .unwrap()
        .lines()
        // Log lines start with a timestamp (or its colour code).
        .filter(|l| !l.starts_with(|c: char| c == '\x1b' || c.is_ascii_digit()))
        .map(|l| format!("{l}\n"))
        .collect();
    Finished {
        code: status.code(),
        stdout: out_reader.join().unwrap(),
        stderr,
    }
}

/// nova's lines after the boot line.
fn lines_after_boot(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter(|l| {
            !(l.starts_with("nova: sandbox ")
                && (l.contains(" booted") || l.contains(" restored from")))
        })
        .collect()
}

#[test]
fn nova_run_of_a_missing_command_exits_127_with_one_line_naming_it() {
    let Some(home) = test_home("nova_run_of_a_missing_command_exits_127") else {
        return;
    };
    let run = finish(nova_run(&home, &["--", "no-such-cmd"], Stdio::null()));
    assert_eq!(run.code, Some(127), "stderr:\n{}", run.stderr);
    let lines = lines_after_boot(&run.stderr);
    assert_eq!(
        lines.len(),
        1,
        "one line, not an error chain:\n{}",
        run.stderr
    );
    assert!(lines[0].starts_with("nova: no-such-cmd: "), "{}", lines[0]);
    assert!(lines[0].contains("not found"), "{}", lines[0]);
    assert!(run.stdout.is_empty());
}

#[test]
fn nova_run_names_a_missing_working_directory() {
    let Some(home) = test_home("nova_run_names_a_missing_working_directory") else {
        return;
    };
    let run = finish(nova_run(
        &home,
        &["--cwd", "/nonexistent", "--", "pwd"],
        Stdio::null(),
    ));
    assert_eq!(run.code, Some(127), "stderr:\n{}", run.stderr);
    let lines = lines_after_boot(&run.stderr);
    assert_eq!(lines.len(), 1, "{}", run.stderr);
    assert!(lines[0].contains("/nonexistent"), "{}", lines[0]);
    assert!(lines[0].contains("does not exist"), "{}", lines[0]);
}

#[test]
fn nova_run_i_streams_stdin_so_timeout_applies_while_stdin_stays_open() {
    let Some(home) = test_home("nova_run_i_streams_stdin_so_timeout_applies") else {
        return;
    };
    // The input: `sleep 100 | nova run -i --timeout 3 -- echo hi`.
    // Our end of the pipe stays open (and silent) until nova has ended.
    let mut child = nova_run(
        &home,
        &["-i", "--timeout", "3", "--", "echo", "hi"],
        Stdio::piped(),
    );
    let stdin = child.stdin.take().unwrap();
    let run = finish(child);
    drop(stdin);
    assert_eq!(run.code, Some(0), "stderr:\n{}", run.stderr);
    assert_eq!(run.stdout, "hi\n");

    // A command that reads stdin sees each line as it is written, before
    // stdin ends, and --timeout ends it though stdin never does.
    let mut child = nova_run(
        &home,
        &["-i", "--timeout", "3", "--", "cat"],
        Stdio::piped(),
    );
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"streamed\n").unwrap();
    stdin.flush().unwrap();
    let run = finish(child);
    drop(stdin);
    assert_eq!(run.code, Some(124), "stderr:\n{}", run.stderr);
    assert_eq!(run.stdout, "streamed\n");
    let lines = lines_after_boot(&run.stderr);
    assert_eq!(lines.len(), 1, "{}", run.stderr);
    assert!(
        lines[0].starts_with("nova: command timed out"),
        "{}",
        lines[0]
    );
}

#[test]
fn nova_lines_start_on_a_fresh_line_after_output_without_a_newline() {
    let Some(home) = test_home("nova_lines_start_on_a_fresh_line") else {
        return;
    };
    // The input: `nova run -t minimal --sh 'printf tail >&2; exit 3'`.
    let run = finish(nova_run(
        &home,
        &["--sh", "printf tail >&2; exit 3"],
        Stdio::null(),
    ));
    assert_eq!(run.code, Some(3));
    assert!(
        run.stderr
            .contains("\ntail\nnova: command ended with exit code 3\n"),
        "stderr:\n{:?}",
        run.stderr
    );
    for line in run.stderr.lines() {
        assert!(
            line.starts_with("nova: ") || line == "tail",
            "a nova line ran into command output: {line:?}"
        );
    }
}
