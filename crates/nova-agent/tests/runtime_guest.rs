//! The host runtime's [`Guest`] over the real agent (a normal process on a
//! Unix socket): what a sandbox user sees of exec streams and file errors.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{TestAgent, process_gone, wait_until};
use nova_core::error::{ExecError, FileError};
use nova_core::exec::{ExecEvent, ExecRequest};
use nova_runtime::Guest;

async fn guest(agent: &TestAgent) -> Guest {
    let (client, _) = agent.connect().await;
    Guest::new(client, [])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_an_exec_stream_kills_the_command_process_group() {
    let agent = TestAgent::start().await;
    let guest = guest(&agent).await;
    let mut stream = guest
        .exec_stream(ExecRequest::shell("sleep 1000 & echo $!; echo $$; wait"))
        .await
        .unwrap();
    let mut text = String::new();
    while text.lines().count() < 2 || !text.ends_with('\n') {
        match stream.next().await.expect("the command prints its pids") {
            ExecEvent::Stdout(bytes) => text.push_str(std::str::from_utf8(&bytes).unwrap()),
            other => panic!("unexpected {other:?}"),
        }
    }
    let pids: Vec<u32> = text.lines().map(|l| l.trim().parse().unwrap()).collect();
    assert!(pids.iter().all(|&pid| !process_gone(pid)), "{pids:?}");

    drop(stream);
    assert!(
        wait_until(Duration::from_secs(10), || pids
            .iter()
            .all(|&pid| process_gone(pid)))
        .await,
        "the command's process group {pids:?} outlived its dropped stream; log:\n{}",
        agent.log()
    );
    guest.client().ping().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn execute_command_output_past_its_cap_is_refused_and_the_command_killed() {
    let agent = TestAgent::start().await;
    let guest = guest(&agent).await;
    let pid_file = agent.dir().join("pid");
    let script = format!(
        "echo $$ > {}; while true; do echo 0123456789abcdef; done",
        pid_file.display()
    );
    let err = guest
        .exec_stream(ExecRequest::shell(script))
        .await
        .unwrap()
        .collect_limited(64 * 1024)
        .await
        .unwrap_err();
    assert!(
        matches!(err, ExecError::OutputTooLarge { limit: 65536 }),
        "{err}"
    );
    let pid: u32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || process_gone(pid)).await,
        "the endless command {pid} outlived the refused collect"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_errors_name_what_is_wrong_with_the_path() {
    let agent = TestAgent::start().await;
    let guest = guest(&agent).await;
    let dir = agent.dir().to_str().unwrap().to_owned();

    let err = guest.read_file("/nonexistent/file").await.unwrap_err();
    assert!(matches!(err, FileError::NoSuchFile { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        "/nonexistent/file does not exist in the guest"
    );

    let err = guest.read_file(&dir).await.unwrap_err();
    assert!(matches!(err, FileError::IsADirectory { .. }), "{err:?}");

    let file = format!("{dir}/plain");
    guest.write_file(&file, b"x".to_vec(), 0o644).await.unwrap();
    let err = guest
        .write_file(&format!("{file}/below"), b"y".to_vec(), 0o644)
        .await
        .unwrap_err();
    assert!(matches!(err, FileError::NotADirectory { .. }), "{err:?}");

    // The cap on whole-file reads names the streaming call.
    let small = guest.clone().with_read_limit(0);
    let err = small.read_file(&file).await.unwrap_err();
    assert!(
        matches!(err, FileError::TooLarge { limit: 0, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("read_file_stream"), "{err}");
    let mut download = small.read_file_stream(&file).await.unwrap();
    assert_eq!(&download.recv().await.unwrap().unwrap()[..], b"x");
}
