//! Bulk output through the agent with bounded memory on both sides.
//!
//! This is its own test binary so that the test process's peak RSS measures
//! the client alone (other tests move 50 MB files around).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::{TestAgent, status_field};
use nova_protocol::{ExecSpec, STREAM_WINDOW};

const GIB: u64 = 1024 * 1024 * 1024;
/// Generous bound on peak RSS for either side while a gigabyte streams.
const RSS_LIMIT_KIB: u64 = 64 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gigabyte_of_output_streams_with_bounded_memory() {
    let agent = TestAgent::start().await;
    let (client, _) = agent.connect().await;
    let mut handle = client
        .exec(ExecSpec::shell(format!(
            "head -c {GIB} /dev/zero; echo done >&2"
        )))
        .await
        .unwrap();
    let mut stdout = handle.take_stdout().unwrap();
    let stderr = handle.take_stderr().unwrap();
    let started = Instant::now();
    let mut total = 0u64;
    let mut nonzero = false;
    let mut stalled_once = false;
    while let Some(chunk) = stdout.recv().await {
        total += chunk.len() as u64;
        nonzero |= chunk.iter().any(|&b| b != 0);
        if !stalled_once && total > 64 * 1024 * 1024 {
            // A consumer that stops for a while: the command must block
            // instead of the agent or the client buffering its output.
            stalled_once = true;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    let elapsed = started.elapsed();
    let result = handle.wait().await.unwrap();
    assert!(result.status.success(), "{result:?}");
    assert_eq!(stderr.collect().await.unwrap(), b"done\n");
    assert_eq!(total, GIB);
    assert!(!nonzero);

    let agent_peak = agent.peak_rss_kib();
    let client_peak = status_field(std::process::id(), "VmHWM:").unwrap();
    eprintln!(
        "1 GiB in {elapsed:?} ({:.2} GB/s, debug build); peak RSS agent {} MiB, client {} MiB",
        GIB as f64 / elapsed.as_secs_f64() / 1e9,
        agent_peak / 1024,
        client_peak / 1024
    );
    assert!(
        agent_peak < RSS_LIMIT_KIB,
        "agent peak RSS {agent_peak} KiB"
    );
    assert!(
        client_peak < RSS_LIMIT_KIB,
        "client peak RSS {client_peak} KiB"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unread_stream_holds_at_most_one_window() {
    let agent = TestAgent::start().await;
    let (client, _) = agent.connect().await;
    // The command writes far more than a window while nobody reads stdout.
    let mut handle = client
        .exec(ExecSpec::shell(
            "head -c 268435456 /dev/zero; echo finished >&2",
        ))
        .await
        .unwrap();
    let stdout = handle.take_stdout().unwrap();
    let mut stderr = handle.take_stderr().unwrap();
    let agent_before = agent.peak_rss_kib();
    // Give the command time to fill the window and block.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let blocked = tokio::time::timeout(Duration::from_millis(300), stderr.recv()).await;
    assert!(
        blocked.is_err(),
        "command finished although nobody read its output"
    );
    let agent_after = agent.peak_rss_kib();
    assert!(
        agent_after < agent_before + 2 * u64::from(STREAM_WINDOW) / 1024 + 8 * 1024,
        "agent grew from {agent_before} to {agent_after} KiB while the host did not read"
    );
    // Now drain it: everything arrives and the command finishes.
    assert_eq!(stdout.drain().await, 268_435_456);
    assert_eq!(stderr.recv().await.as_deref(), Some(&b"finished\n"[..]));
    assert!(handle.wait().await.unwrap().status.success());
}
