//! The host client (`AgentClient`) against a hostile agent: after a valid
//! `Welcome`, the fuzz input is everything the agent sends, while the
//! client has eight requests in flight (ids 1 to 8: exec, read file, list
//! dir, stat, stats, write file, ping, list execs), so frames naming those
//! ids reach the client's request table, flow control and stream routing.
//!
//! Properties: nothing panics; once the agent closes its end, every call
//! returns and the connection ends (no hang); memory stays bounded by the
//! input (libFuzzer's `-rss_limit_mb`).
#![no_main]

mod common;

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use nova_protocol::client::AgentClient;
use nova_protocol::frame;
use nova_protocol::{ExecSpec, HelloInfo, HelloReply, PROTOCOL_VERSION};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fuzz_target!(|data: &[u8]| {
    let data = data.to_vec();
    common::runtime().block_on(async move {
        tokio::time::timeout(common::HANG, session(data))
            .await
            .expect("the client hung after the agent closed its end");
    });
});

async fn session(data: Vec<u8>) {
    let (host, agent) = tokio::io::duplex(64 * 1024);
    let (mut agent_read, mut agent_write) = tokio::io::split(agent);
    // The agent never reads what the host sends; it only keeps the pipe
    // from filling up.
    let drain = tokio::spawn(async move {
        let mut sink = vec![0u8; 64 * 1024];
        while matches!(agent_read.read(&mut sink).await, Ok(n) if n > 0) {}
    });
    let speak = tokio::spawn(async move {
        let welcome = HelloReply::Welcome(HelloInfo {
            protocol_version: PROTOCOL_VERSION,
            agent_version: "fuzz".into(),
            kernel_release: "fuzz".into(),
            agent_started_us: 1,
            agent_ready_us: 2,
            pid1: false,
            hostname: "fuzz".into(),
        });
        let hello = frame::encode(&welcome).expect("the welcome encodes");
        let _ = agent_write.write_all(&hello).await;
        let _ = agent_write.write_all(&data).await;
        let _ = agent_write.shutdown().await;
    });
    let Ok((client, _)) = AgentClient::connect(host, Duration::from_secs(5)).await else {
        panic!("the handshake with a valid welcome failed");
    };
    let _ = tokio::join!(
        client.run(ExecSpec::shell("true")),
        client.read_file_to_vec_limited("/f", 1 << 20),
        client.list_dir("/"),
        client.stat("/f"),
        client.stats(),
        client.write_file("/g", &b"0123456789"[..], 0o644),
        client.ping(),
        client.list_execs(),
    );
    let _ = client.closed().await;
    drop(client);
    let _ = speak.await;
    let _ = drain.await;
}
