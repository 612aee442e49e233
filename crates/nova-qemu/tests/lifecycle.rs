//! End-to-end tests: real microVMs under QEMU (TCG on hosts without hardware
//! KVM), booted from the templates `make images` built.

#![allow(clippy::unwrap_used, reason = "test code")]

mod common;

use std::time::Duration;

use common::{config, process_exists, setup, wait_until};
use nova_core::error::{CreateSandboxError, ExecError, FileError};
use nova_core::exec::{ExecEvent, ExecRequest, ExitStatus};
use nova_core::fs::FileKind;
use nova_core::hypervisor::Hypervisor;
use nova_core::state::SandboxState;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_output_exit_codes_stdin_and_files() {
    let Some(t) = setup("command_output_exit_codes_stdin_and_files", &["minimal"]) else {
        return;
    };
    let sandbox = t
        .hypervisor
        .create_sandbox(config("minimal"))
        .await
        .unwrap();
    let boot = sandbox.info().boot.clone().unwrap();
    assert!(
        boot.boot_time_ms > 0.0 && boot.spawn_ms > 0.0 && boot.guest_ms > 0.0,
        "{boot:?}"
    );
    assert!(
        (boot.spawn_ms + boot.configure_ms + boot.guest_ms - boot.boot_time_ms).abs() < 1.0,
        "{boot:?}"
    );

    let out = sandbox
        .execute_command("echo out; echo err >&2; exit 3")
        .await
        .unwrap();
    assert_eq!(out.stdout, b"out\n");
    assert_eq!(out.stderr, b"err\n");
    assert_eq!(out.status, ExitStatus::Code(3));

    let out = sandbox
        .execute_command(ExecRequest::argv(["cat"]).stdin(b"piped\0bytes".to_vec()))
        .await
        .unwrap();
    assert_eq!(out.stdout, b"piped\0bytes");
    assert!(out.success());

    let out = sandbox
        .execute_command(ExecRequest::argv(["sh", "-c", "echo $FOO"]).env("FOO", "bar"))
        .await
        .unwrap();
    assert_eq!(out.stdout_lossy(), "bar\n");

    let out = sandbox
        .execute_command(ExecRequest::shell("sleep 30").timeout(Duration::from_millis(500)))
        .await
        .unwrap();
    assert_eq!(out.status, ExitStatus::TimedOut);

    let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    sandbox
        .write_file("/tmp/upload.bin", data.clone(), 0o640)
        .await
        .unwrap();
    assert_eq!(sandbox.read_file("/tmp/upload.bin").await.unwrap(), data);
    let out = sandbox
        .execute_command("stat -c %a /tmp/upload.bin && wc -c < /tmp/upload.bin")
        .await
        .unwrap();
    assert_eq!(out.stdout_lossy(), "640\n200000\n");
    // A new user reading a missing file is told so first.
    let err = sandbox.read_file("/nonexistent/file").await.unwrap_err();
    assert!(matches!(err, FileError::NoSuchFile { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        "/nonexistent/file does not exist in the guest"
    );
    let err = sandbox.read_file("/tmp").await.unwrap_err();
    assert!(matches!(err, FileError::IsADirectory { .. }), "{err:?}");

    let stats = sandbox.get_stats().await.unwrap();
    assert!(
        stats.memory_usage_mb > 0.0 && stats.memory_usage_mb <= 256.0,
        "{stats:?}"
    );
    let guest = stats.guest.expect("the agent reports guest stats");
    assert!(
        guest.memory_total_bytes > 0 && guest.memory_total_bytes <= 256 << 20,
        "{guest:?}"
    );
    assert!(guest.process_count >= 1);
    assert!(stats.vmm.rss_bytes > 0);
    assert!(stats.cpu_usage_us > 0);

    let pid = sandbox.info().vmm_pid.unwrap();
    let dir = sandbox.info().dir.clone();
    sandbox.stop(false).await.unwrap();
    assert!(
        !process_exists(pid),
        "QEMU {pid} is still there after a graceful stop"
    );
    assert!(!dir.exists(), "{} is still there", dir.display());
    assert!(t.sandbox_dirs().is_empty());
    assert!(!sandbox.is_running().await);
    assert!(matches!(
        sandbox.execute_command("true").await,
        Err(ExecError::NotRunning(SandboxState::Stopped))
    ));
    let e = sandbox.pause().await.unwrap_err();
    assert_eq!(
        e.to_string(),
        "cannot pause a sandbox that is stopped; its resources are gone, create a new sandbox"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_runs_in_the_python_template() {
    let Some(t) = setup("python_runs_in_the_python_template", &["python"]) else {
        return;
    };
    let sandbox = t.hypervisor.create_sandbox(config("python")).await.unwrap();
    let out = sandbox
        .execute_command(ExecRequest::argv([
            "python3",
            "-c",
            "import sys; print(sum(range(10)), sys.version_info[0])",
        ]))
        .await
        .unwrap();
    assert_eq!(
        out.stdout_lossy(),
        "45 3\n",
        "stderr: {}",
        out.stderr_lossy()
    );
    let out = sandbox
        .execute_command("command -v curl && command -v wget")
        .await
        .unwrap();
    assert_eq!(
        out.stdout_lossy().lines().count(),
        2,
        "{}",
        out.stdout_lossy()
    );
    sandbox.stop(true).await.unwrap();
    assert!(t.sandbox_dirs().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_guest_makes_no_progress() {
    let Some(t) = setup("a_paused_guest_makes_no_progress", &["minimal"]) else {
        return;
    };
    let sandbox = t
        .hypervisor
        .create_sandbox(config("minimal"))
        .await
        .unwrap();
    sandbox
        .execute_command("setsid sh -c 'i=0; while true; do i=$((i+1)); echo $i > /tmp/n; sleep 0.05; done' >/dev/null 2>&1 &")
        .await
        .unwrap();
    let read = || async {
        let text = String::from_utf8(sandbox.read_file("/tmp/n").await.unwrap()).unwrap();
        text.trim().parse::<u64>().unwrap_or(0)
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = read().await;
    assert!(before > 0, "the counter runs");
    sandbox.pause().await.unwrap();
    assert_eq!(sandbox.refresh().await.unwrap().state, SandboxState::Paused);
    assert!(matches!(
        sandbox.execute_command("true").await,
        Err(ExecError::NotRunning(SandboxState::Paused))
    ));
    assert!(sandbox.pause().await.is_err(), "pausing twice is an error");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let stats = sandbox.get_stats().await.unwrap();
    assert!(stats.guest.is_none(), "a paused guest cannot answer");
    sandbox.resume().await.unwrap();
    let after = read().await;
    // 3 s paused would be ~60 ticks; allow what runs between the reads and
    // the pause/resume.
    assert!(
        after - before < 20,
        "counter advanced from {before} to {after} across a 3 s pause"
    );
    let mut last = after;
    for _ in 0..100 {
        if last > after + 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        last = read().await;
    }
    assert!(
        last > after + 5,
        "counter stuck at {last} after resume (was {after})"
    );
    // A paused sandbox can be stopped, gracefully.
    sandbox.pause().await.unwrap();
    sandbox.stop(false).await.unwrap();
    assert!(t.sandbox_dirs().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_sandboxes_at_once_are_isolated_and_leave_the_template_alone() {
    let Some(t) = setup("three_sandboxes_at_once", &["minimal"]) else {
        return;
    };
    let rootfs = common::shared_templates().join("minimal/rootfs.ext4");
    let digest_before = file_digest(&rootfs);
    let (a, b, c) = tokio::join!(
        t.hypervisor.create_sandbox(config("minimal")),
        t.hypervisor.create_sandbox(config("minimal")),
        t.hypervisor.create_sandbox(config("minimal")),
    );
    let boxes = [a.unwrap(), b.unwrap(), c.unwrap()];
    let mut ids: Vec<_> = boxes.iter().map(|b| b.id().clone()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 3);
    for (i, b) in boxes.iter().enumerate() {
        let out = b
            .execute_command(format!("echo {i} > /etc/whoami && hostname"))
            .await
            .unwrap();
        assert_eq!(out.stdout_lossy().trim(), b.id().as_str());
    }
    for (i, b) in boxes.iter().enumerate() {
        let out = b.execute_command("cat /etc/whoami").await.unwrap();
        assert_eq!(out.stdout_lossy(), format!("{i}\n"));
    }
    assert_eq!(t.hypervisor.list().await.len(), 3);
    for b in &boxes {
        b.stop(true).await.unwrap();
    }
    // A fresh sandbox from the same template sees none of those writes.
    let fresh = t
        .hypervisor
        .create_sandbox(config("minimal"))
        .await
        .unwrap();
    let out = fresh
        .execute_command("test -e /etc/whoami; echo $?")
        .await
        .unwrap();
    assert_eq!(out.stdout_lossy(), "1\n");
    fresh.stop(true).await.unwrap();
    assert_eq!(
        file_digest(&rootfs),
        digest_before,
        "the template rootfs changed"
    );
    assert!(t.sandbox_dirs().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_rootfs_refuses_writes() {
    let Some(t) = setup("read_only_rootfs_refuses_writes", &["minimal"]) else {
        return;
    };
    let mut c = config("minimal");
    c.read_only_rootfs = true;
    let sandbox = t.hypervisor.create_sandbox(c).await.unwrap();
    let out = sandbox.execute_command("echo x > /etc/x").await.unwrap();
    assert!(!out.success());
    let out = sandbox
        .execute_command("echo x > /tmp/x && cat /tmp/x")
        .await
        .unwrap();
    assert_eq!(out.stdout_lossy(), "x\n", "tmpfs stays writable");
    sandbox.stop(true).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boot_failures_explain_themselves_and_leave_nothing() {
    let Some(t) = setup("boot_failures_explain_themselves", &["minimal"]) else {
        return;
    };
    // A template whose kernel is not a kernel.
    let real = common::shared_templates().join("minimal");
    let broken = t.dir.path().join("broken-templates");
    let bad = broken.join("badkernel");
    std::fs::create_dir_all(&bad).unwrap();
    let manifest = std::fs::read_to_string(real.join("minimal.json")).unwrap();
    std::fs::write(
        bad.join("badkernel.json"),
        manifest.replace("\"minimal\"", "\"badkernel\""),
    )
    .unwrap();
    std::fs::write(bad.join("vmlinux"), b"this is not a kernel").unwrap();
    std::os::unix::fs::symlink(real.join("rootfs.ext4"), bad.join("rootfs.ext4")).unwrap();
    // Point a provider at a templates dir holding only the broken one.
    let home = tempfile::Builder::new()
        .prefix("nova-e2e-")
        .tempdir_in("/tmp")
        .unwrap();
    std::os::unix::fs::symlink(&broken, home.path().join("templates")).unwrap();
    let mut options = t.hypervisor.options().clone();
    options.home = nova_core::home::NovaHome::at(home.path());
    let hv = nova_qemu::QemuHypervisor::new(options);
    let e = hv.create_sandbox(config("badkernel")).await.unwrap_err();
    assert!(matches!(e, CreateSandboxError::VmmExited { .. }), "{e:?}");
    assert!(
        e.to_string().contains("qemu:"),
        "the error quotes QEMU's complaint: {e}"
    );
    let left: Vec<_> = std::fs::read_dir(home.path().join("sandboxes"))
        .unwrap()
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");

    // A template whose kernel path does not exist: refused before anything
    // is spawned, naming the missing file.
    let nokernel = broken.join("nokernel");
    std::fs::create_dir_all(&nokernel).unwrap();
    std::fs::write(
        nokernel.join("nokernel.json"),
        manifest.replace("\"minimal\"", "\"nokernel\""),
    )
    .unwrap();
    std::os::unix::fs::symlink(real.join("rootfs.ext4"), nokernel.join("rootfs.ext4")).unwrap();
    let e = hv.create_sandbox(config("nokernel")).await.unwrap_err();
    assert!(matches!(e, CreateSandboxError::Template(_)), "{e:?}");
    let cause = std::error::Error::source(&e).unwrap().to_string();
    assert!(
        cause.contains("vmlinux") && cause.contains("nova template build nokernel"),
        "{cause}"
    );
    assert!(
        std::fs::read_dir(home.path().join("sandboxes"))
            .unwrap()
            .next()
            .is_none()
    );

    // A boot that cannot finish in time.
    let mut c = config("minimal");
    c.boot_timeout_ms = 200;
    let e = t.hypervisor.create_sandbox(c).await.unwrap_err();
    assert!(
        matches!(
            e,
            CreateSandboxError::BootTimeout {
                timeout_ms: 200,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("raise boot_timeout_ms"), "{e}");
    assert!(
        t.sandbox_dirs().is_empty(),
        "left behind: {:?}",
        t.sandbox_dirs()
    );
    assert!(
        wait_until(Duration::from_secs(5), || no_qemu_under(t.dir.path())),
        "a QEMU process survived"
    );

    // An unknown template names the installed ones.
    let e = t
        .hypervisor
        .create_sandbox(config("nope"))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("cannot use template"), "{e}");
    let cause = std::error::Error::source(&e).unwrap().to_string();
    assert!(cause.contains("nova template build nope"), "{cause}");
}

/// Whether no process has `dir` on its command line.
fn no_qemu_under(dir: &std::path::Path) -> bool {
    let needle = dir.to_string_lossy().into_owned();
    std::fs::read_dir("/proc").unwrap().flatten().all(|entry| {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        !String::from_utf8_lossy(&cmdline).contains(&needle)
    })
}

fn file_digest(path: &std::path::Path) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    std::fs::read(path).unwrap().hash(&mut h);
    h.finish()
}

/// Listing, metadata, directories, removal and streaming transfers through
/// the trait, on a real guest; a missing path and the root are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_operations_list_stat_mkdir_remove_and_stream() {
    let Some(t) = setup(
        "file_operations_list_stat_mkdir_remove_and_stream",
        &["minimal"],
    ) else {
        return;
    };
    let sandbox = t
        .hypervisor
        .create_sandbox(config("minimal"))
        .await
        .unwrap();
    sandbox.mkdir("/work/a/b", 0o750).await.unwrap();
    let stat = sandbox.stat("/work/a/b").await.unwrap();
    assert_eq!((stat.kind, stat.mode), (FileKind::Dir, 0o750));

    // 3 MiB (more than one chunk and one flow-control window) streamed in
    // from a reader and back out.
    let data: Vec<u8> = (0..3 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let written = sandbox
        .upload("/work/a/b/blob", 0o600, std::io::Cursor::new(data.clone()))
        .await
        .unwrap();
    assert_eq!(written, data.len() as u64);
    let listing = sandbox.list_dir("/work/a/b").await.unwrap();
    assert_eq!(listing.entries.len(), 1);
    assert_eq!(listing.entries[0].name, "blob");
    assert_eq!(listing.entries[0].size, data.len() as u64);
    let mut download = sandbox.download("/work/a/b/blob").await.unwrap();
    assert_eq!(download.size(), data.len() as u64);
    let mut back = Vec::new();
    let mut chunks = 0;
    while let Some(chunk) = download.next().await.unwrap() {
        back.extend_from_slice(&chunk);
        chunks += 1;
    }
    assert!(back == data, "the download matches the upload");
    assert!(chunks > 1, "it arrived in chunks");

    assert!(sandbox.remove("/work/a", false).await.is_err(), "not empty");
    sandbox.remove("/work/a", true).await.unwrap();
    assert!(sandbox.stat("/work/a").await.is_err());
    assert!(
        sandbox.remove("/", true).await.is_err(),
        "the root is refused"
    );
    assert!(sandbox.list_dir("relative").await.is_err());
    sandbox.stop(true).await.unwrap();
}

/// A caller signals a running command through its stream, and runs one on
/// a pseudo-terminal it resizes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_command_is_signalled_and_its_terminal_resized() {
    let Some(t) = setup(
        "a_running_command_is_signalled_and_its_terminal_resized",
        &["minimal"],
    ) else {
        return;
    };
    let sandbox = t
        .hypervisor
        .create_sandbox(config("minimal"))
        .await
        .unwrap();
    let mut stream = sandbox
        .exec_stream("echo started; exec sleep 600")
        .await
        .unwrap();
    assert!(matches!(stream.next().await, Some(ExecEvent::Stdout(b)) if b == b"started\n"));
    assert!(stream.signal(0).is_err() && stream.signal(999).is_err());
    stream.signal(15).unwrap();
    let status = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match stream.next().await {
                Some(ExecEvent::Exited(status)) => return Some(status),
                Some(_) => {}
                None => return None,
            }
        }
    })
    .await
    .expect("SIGTERM ends sleep");
    assert_eq!(status, Some(ExitStatus::Signal(15)));
    // Nothing left to signal, no terminal to resize, no such signal.
    assert!(stream.signal(15).is_err(), "the command already ended");
    assert!(stream.resize(10, 10).is_err(), "it had no terminal");

    // On a terminal: the size given, then the size set by resize.
    let mut stream = sandbox
        .exec_stream(
            ExecRequest::shell("stty size; read line; stty size")
                .pty(30, 100)
                .stream_stdin(),
        )
        .await
        .unwrap();
    let stdin = stream.take_stdin().unwrap();
    let mut seen = String::new();
    while !seen.contains("30 100") {
        match stream.next().await {
            Some(ExecEvent::Stdout(b)) => seen.push_str(&String::from_utf8_lossy(&b)),
            other => panic!("unexpected {other:?} after {seen:?}"),
        }
    }
    stream.resize(50, 132).unwrap();
    stdin.write(b"go\n".to_vec()).await.unwrap();
    let out = stream.collect().await.unwrap();
    let rest = String::from_utf8_lossy(&out.stdout);
    assert!(rest.contains("50 132"), "{seen:?} then {rest:?}");
    sandbox.stop(true).await.unwrap();
}
