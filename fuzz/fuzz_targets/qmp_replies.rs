//! The QMP client (`nova_qemu::qmp::QmpClient`) against a hostile QEMU: the
//! fuzz input is everything QEMU sends on the socket (greeting, answers,
//! events, garbage), while the client negotiates capabilities and then runs
//! `query-status`, `query-blockstats`, `stop`, `cont` and `quit` in turn.
//! This covers the line reader, the JSON parse of each line, the event and
//! id bookkeeping, and the typed answers.
//!
//! Properties: nothing panics; every command returns once QEMU closed the
//! socket (no hang).
#![no_main]

mod common;

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use nova_qemu::qmp::QmpClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

fuzz_target!(|data: &[u8]| {
    let data = data.to_vec();
    common::runtime().block_on(async move {
        tokio::time::timeout(common::HANG, exchange(data))
            .await
            .expect("the QMP client hung after QEMU closed the socket");
    });
});

async fn exchange(data: Vec<u8>) {
    let (ours, qemu) = UnixStream::pair().expect("a socket pair");
    let (mut qemu_read, mut qemu_write) = qemu.into_split();
    let speak = tokio::spawn(async move {
        let _ = qemu_write.write_all(&data).await;
        let _ = qemu_write.shutdown().await;
    });
    let drain = tokio::spawn(async move {
        let mut sink = vec![0u8; 16 * 1024];
        while matches!(qemu_read.read(&mut sink).await, Ok(n) if n > 0) {}
    });
    if let Ok(mut client) = QmpClient::handshake(ours, Duration::from_secs(5)).await {
        let _ = client.query_status().await;
        let _ = client.block_bytes().await;
        let _ = client.stop().await;
        let _ = client.cont().await;
        let _ = client.quit().await;
        let _ = client.recent_events().count();
    }
    let _ = speak.await;
    let _ = drain.await;
}
