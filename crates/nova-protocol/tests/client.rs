//! The client against scripted fake agents (in-memory streams): handshake
//! outcomes, timeouts, and a disconnect in the middle of a request.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use nova_protocol::client::{AgentClient, ClientError};
use nova_protocol::frame::{FrameReader, FrameWriter};
use nova_protocol::{
    AgentMessage, ClientMessage, HELLO_MAGIC, Hello, HelloInfo, HelloReply, PROTOCOL_VERSION,
    Response, SUPPORTED_VERSIONS,
};
use tokio::io::DuplexStream;

fn info(version: u32) -> HelloInfo {
    HelloInfo {
        protocol_version: version,
        agent_version: "fake".into(),
        kernel_release: "6.1.0".into(),
        agent_started_us: 1,
        agent_ready_us: 2,
        pid1: true,
        hostname: "nova".into(),
    }
}

type FakeEnds = (
    FrameReader<tokio::io::ReadHalf<DuplexStream>>,
    FrameWriter<tokio::io::WriteHalf<DuplexStream>>,
);

/// A fake agent: reads the Hello (after `delay`), checks it and answers
/// `reply`; the task returns its stream ends so the test decides when they close.
fn fake_agent(
    delay: Duration,
    reply: Option<HelloReply>,
) -> (DuplexStream, tokio::task::JoinHandle<FakeEnds>) {
    let (host, guest) = tokio::io::duplex(64 * 1024);
    let task = tokio::spawn(async move {
        let (read, write) = tokio::io::split(guest);
        let mut reader = FrameReader::new(read);
        let mut writer = FrameWriter::new(write);
        tokio::time::sleep(delay).await;
        let hello: Hello = reader.read_message().await.unwrap().unwrap();
        assert_eq!(hello.magic, HELLO_MAGIC);
        assert_eq!(hello.versions, SUPPORTED_VERSIONS);
        if let Some(reply) = reply {
            writer.send(&reply).await.unwrap();
        }
        (reader, writer)
    });
    (host, task)
}

#[tokio::test]
async fn client_speaks_first_and_waits_for_a_slow_agent() {
    // Like virtio-serial: the guest opens its port (reads the Hello) late.
    let (stream, agent) = fake_agent(
        Duration::from_millis(300),
        Some(HelloReply::Welcome(info(PROTOCOL_VERSION))),
    );
    let (client, hello) = AgentClient::connect(stream, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(hello, info(PROTOCOL_VERSION));
    assert_eq!(client.info().agent_version, "fake");
    agent.await.unwrap();
}

#[tokio::test]
async fn refusal_without_a_common_version_is_a_version_mismatch() {
    let (stream, _agent) = fake_agent(
        Duration::ZERO,
        Some(HelloReply::Refused {
            supported: vec![999],
            message: "no".into(),
        }),
    );
    match AgentClient::connect(stream, Duration::from_secs(5)).await {
        Err(ClientError::VersionMismatch { ours, theirs }) => {
            assert_eq!(ours, SUPPORTED_VERSIONS);
            assert_eq!(theirs, vec![999]);
        }
        other => panic!("expected VersionMismatch, got {other:?}"),
    }
}

#[tokio::test]
async fn welcome_with_an_unknown_version_is_a_version_mismatch() {
    let (stream, _agent) = fake_agent(Duration::ZERO, Some(HelloReply::Welcome(info(999))));
    let err = AgentClient::connect(stream, Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::VersionMismatch { .. }), "{err}");
}

#[tokio::test]
async fn other_refusals_carry_the_message() {
    let (stream, _agent) = fake_agent(
        Duration::ZERO,
        Some(HelloReply::Refused {
            supported: SUPPORTED_VERSIONS.to_vec(),
            message: "busy".into(),
        }),
    );
    let err = AgentClient::connect(stream, Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::Refused(m) if m == "busy"),
        "{err}"
    );
}

#[tokio::test]
async fn silent_agent_times_out() {
    let (stream, agent) = fake_agent(Duration::ZERO, None);
    let err = AgentClient::connect(stream, Duration::from_millis(200))
        .await
        .unwrap_err();
    drop(agent);
    assert!(matches!(err, ClientError::TimedOut(_)), "{err}");
}

#[tokio::test]
async fn garbage_reply_is_a_protocol_error_not_a_panic() {
    let (host, guest) = tokio::io::duplex(1024);
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut guest = guest;
        let mut buf = [0u8; 64];
        let _ = guest.read(&mut buf).await;
        let _ = guest.write_all(&[0, 0, 0, 3, 0xff, 0xff, 0xff]).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
    });
    let err = AgentClient::connect(host, Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Protocol(_)), "{err}");
}

#[tokio::test]
async fn responses_are_routed_by_request_id() {
    let (host, guest) = tokio::io::duplex(64 * 1024);
    let fake = tokio::spawn(async move {
        let (read, write) = tokio::io::split(guest);
        let mut reader = FrameReader::new(read);
        let mut writer = FrameWriter::new(write);
        let _: Hello = reader.read_message().await.unwrap().unwrap();
        writer
            .send(&HelloReply::Welcome(info(PROTOCOL_VERSION)))
            .await
            .unwrap();
        // Collect three pings, answer them in reverse order.
        let mut ids = Vec::new();
        for _ in 0..3 {
            match reader
                .read_message::<ClientMessage>()
                .await
                .unwrap()
                .unwrap()
            {
                ClientMessage::Request { id, .. } => ids.push(id),
                other => panic!("unexpected {other:?}"),
            }
        }
        for id in ids.into_iter().rev() {
            writer
                .send(&AgentMessage::Done {
                    id,
                    result: Ok(Response::Pong),
                })
                .await
                .unwrap();
        }
        // Then close: later calls must fail with Disconnected.
        drop(writer);
        drop(reader);
    });
    let (client, _) = AgentClient::connect(host, Duration::from_secs(5))
        .await
        .unwrap();
    let (a, b, c) = tokio::join!(client.ping(), client.ping(), client.ping());
    a.unwrap();
    b.unwrap();
    c.unwrap();
    fake.await.unwrap();
    let err = client.ping().await.unwrap_err();
    assert!(matches!(err, ClientError::Disconnected { .. }), "{err}");
    assert!(
        client.is_closed() || matches!(client.ping().await, Err(ClientError::Disconnected { .. }))
    );
}
