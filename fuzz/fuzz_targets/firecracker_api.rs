//! What Firecracker sends back, as `nova-firecracker` reads it. The first
//! input byte picks the channel, the rest is what Firecracker sends on it:
//!
//! - 0: the HTTP API socket. The bytes are the raw HTTP answers, separated
//!   by `--next--\n`, to `ApiClient` calls (`GET /`, `/version`,
//!   `/machine-config`, `/balloon/statistics`, `/balloon`, `PATCH /vm`,
//!   `PUT /actions`), each sent once its request came.
//! - 1: the hybrid vsock socket's answer to `CONNECT <port>\n`
//!   (`vsock::connect`).
//!
//! The metrics file has its own target, `firecracker_metrics` (a file, not
//! a socket: two orders of magnitude more inputs a second).
//!
//! Properties: nothing panics; every call returns once Firecracker closed
//! its end (no hang).
#![no_main]

mod common;

use std::path::PathBuf;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use nova_firecracker::api::ApiClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;

fuzz_target!(|data: &[u8]| {
    let Some((&channel, rest)) = data.split_first() else {
        return;
    };
    let rest = rest.to_vec();
    common::runtime().block_on(async move {
        let work = async {
            if channel % 2 == 0 {
                api(rest).await;
            } else {
                vsock(rest).await;
            }
        };
        tokio::time::timeout(common::HANG, work)
            .await
            .expect("a Firecracker client hung after Firecracker closed its end");
    });
});

/// Separates the answers to successive API requests in an input.
const NEXT: &[u8] = b"--next--\n";

/// Listens on `name` and plays Firecracker: each request read gets the next
/// of `answers`. Like Firecracker it answers only after a request came (a
/// client that is sent bytes while idle drops the connection), and it
/// closes the connection when its answers are spent or when no further
/// request comes within a moment (the client waits for the rest of an
/// answer cut short). Later connections get the answers left.
fn serve(name: &str, answers: Vec<Vec<u8>>) -> (PathBuf, tokio::task::JoinHandle<()>) {
    let path = common::scratch().join(name);
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).expect("bind the fake Firecracker socket");
    let task = tokio::spawn(async move {
        let mut answers = answers.into_iter();
        let mut request = vec![0u8; 16 * 1024];
        while let Ok((mut stream, _)) = listener.accept().await {
            loop {
                let next =
                    tokio::time::timeout(Duration::from_millis(5), stream.read(&mut request));
                if !matches!(next.await, Ok(Ok(n)) if n > 0) {
                    break;
                }
                let Some(answer) = answers.next() else {
                    break;
                };
                if stream.write_all(&answer).await.is_err() {
                    break;
                }
            }
        }
    });
    (path, task)
}

async fn api(data: Vec<u8>) {
    let answers = split(&data, NEXT);
    let (path, server) = serve("api.sock", answers);
    let mut client = ApiClient::new(&path).with_timeout(Duration::from_secs(5));
    let _ = client.instance_info().await;
    let _ = client.version().await;
    let _ = client.machine_config().await;
    let _ = client.balloon_stats().await;
    let _ = client.balloon().await;
    let _ = client.pause().await;
    let _ = client.instance_start().await;
    drop(client);
    server.abort();
    let _ = server.await;
}

async fn vsock(data: Vec<u8>) {
    let (path, server) = serve_once("vsock.sock", data);
    if let Ok((mut stream, _port)) =
        nova_firecracker::vsock::connect(&path, 1024, Duration::from_secs(5)).await
    {
        // What follows the acknowledgement is the guest's, untouched.
        let mut rest = Vec::new();
        let _ = stream.read_to_end(&mut rest).await;
    }
    server.abort();
    let _ = server.await;
}

/// `data` cut at each `sep`.
fn split(data: &[u8], sep: &[u8]) -> Vec<Vec<u8>> {
    let mut parts = Vec::new();
    let mut rest = data;
    while let Some(at) = rest.windows(sep.len()).position(|w| w == sep) {
        parts.push(rest[..at].to_vec());
        rest = &rest[at + sep.len()..];
    }
    parts.push(rest.to_vec());
    parts
}

/// Listens on `name`; the first connection gets `data` (without waiting:
/// the vsock socket answers `CONNECT` at once) and then the end of stream,
/// later ones are closed at once.
fn serve_once(name: &str, data: Vec<u8>) -> (PathBuf, tokio::task::JoinHandle<()>) {
    let path = common::scratch().join(name);
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).expect("bind the fake Firecracker socket");
    let task = tokio::spawn(async move {
        let mut data = Some(data);
        while let Ok((stream, _)) = listener.accept().await {
            let Some(data) = data.take() else {
                continue;
            };
            let (mut read, mut write) = stream.into_split();
            tokio::spawn(async move {
                let _ = write.write_all(&data).await;
                let _ = write.shutdown().await;
                let mut sink = vec![0u8; 16 * 1024];
                while matches!(read.read(&mut sink).await, Ok(n) if n > 0) {}
            });
        }
    });
    (path, task)
}
