//! The client against scripted agents that break the protocol, flood it, or
//! send more than a caller wants in memory. Nothing an agent sends may panic
//! the host or make it buffer without bound: an agent past its credit gets
//! its connection closed with a typed violation.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bytes::Bytes;
use nova_protocol::client::{AgentClient, ClientError, ConnectionEnd, ProtocolViolation};
use nova_protocol::frame::{FrameReader, FrameWriter};
use nova_protocol::{
    AgentMessage, ClientMessage, ExecResult, ExecSpec, ExitStatus, Hello, HelloInfo, HelloReply,
    MAX_CHUNK, PROTOCOL_VERSION, Request, Response, STREAM_WINDOW, StreamKind,
};
use tokio::io::{DuplexStream, ReadHalf, WriteHalf};

/// The guest end of a connection, after the handshake.
struct FakeAgent {
    reader: FrameReader<ReadHalf<DuplexStream>>,
    writer: FrameWriter<WriteHalf<DuplexStream>>,
}

impl FakeAgent {
    /// Connects a client to a fake agent that accepts the handshake.
    async fn start() -> (AgentClient, FakeAgent) {
        let (host, guest) = tokio::io::duplex(256 * 1024);
        let agent = tokio::spawn(async move {
            let (read, write) = tokio::io::split(guest);
            let mut reader = FrameReader::new(read);
            let mut writer = FrameWriter::new(write);
            let _: Hello = reader.read_message().await.unwrap().unwrap();
            writer
                .send(&HelloReply::Welcome(HelloInfo {
                    protocol_version: PROTOCOL_VERSION,
                    agent_version: "scripted".into(),
                    kernel_release: "6.1.0".into(),
                    agent_started_us: 1,
                    agent_ready_us: 2,
                    pid1: false,
                    hostname: "nova".into(),
                }))
                .await
                .unwrap();
            FakeAgent { reader, writer }
        });
        let (client, _) = AgentClient::connect(host, Duration::from_secs(10))
            .await
            .unwrap();
        (client, agent.await.unwrap())
    }

    /// The next message from the host; `None` once the host closed the stream.
    async fn next(&mut self) -> Option<ClientMessage> {
        self.reader.read_message().await.unwrap()
    }

    /// Waits for the next request; returns its id.
    async fn request(&mut self) -> (u64, Request) {
        loop {
            match self.next().await.expect("a request") {
                ClientMessage::Request { id, request } => return (id, request),
                _ => continue,
            }
        }
    }

    async fn send(&mut self, msg: AgentMessage) {
        self.writer.send(&msg).await.unwrap();
    }

    /// Sends `msg` without waiting for the host to read it (the host may
    /// close the stream at any point).
    async fn send_lossy(&mut self, msg: AgentMessage) -> bool {
        self.writer.send(&msg).await.is_ok()
    }

    /// Reads until the host closes the stream; returns what it sent meanwhile.
    async fn until_closed(&mut self) -> Vec<ClientMessage> {
        let mut seen = Vec::new();
        while let Ok(Some(msg)) = self.reader.read_message::<ClientMessage>().await {
            seen.push(msg);
        }
        seen
    }
}

fn data(id: u64, stream: StreamKind, len: usize) -> AgentMessage {
    AgentMessage::Data {
        id,
        stream,
        data: Bytes::from(vec![b'x'; len]),
    }
}

fn exited(id: u64) -> AgentMessage {
    AgentMessage::Done {
        id,
        result: Ok(Response::Exited(ExecResult {
            status: ExitStatus::Exited(0),
            timed_out: false,
            duration_us: 1,
        })),
    }
}

#[tokio::test]
async fn an_agent_sending_past_its_credit_is_cut_off_with_a_credit_overrun() {
    let (client, mut agent) = FakeAgent::start().await;
    let host = tokio::spawn({
        let client = client.clone();
        async move {
            // Stdout is held but never read: no credit ever goes back.
            let mut handle = client.exec(ExecSpec::shell("yes")).await.unwrap();
            let _stdout = handle.take_stdout();
            handle.wait().await.unwrap_err()
        }
    });
    let (id, _) = agent.request().await;
    agent
        .send(AgentMessage::Started {
            id,
            pid: 7,
            exec_id: 1,
        })
        .await;
    let chunks = STREAM_WINDOW as usize / MAX_CHUNK + 1;
    for _ in 0..chunks {
        if !agent
            .send_lossy(data(id, StreamKind::Stdout, MAX_CHUNK))
            .await
        {
            break;
        }
    }
    // The host closed the connection on the chunk past the window.
    let seen = agent.until_closed().await;
    assert!(
        !seen
            .iter()
            .any(|m| matches!(m, ClientMessage::Credit { .. })),
        "no credit was due: {seen:?}"
    );

    let end = client.closed().await;
    match &end {
        ConnectionEnd::Violation(ProtocolViolation::CreditOverrun {
            id: bad,
            stream,
            outstanding,
            window,
        }) => {
            assert_eq!(
                (*bad, *stream, *window),
                (id, StreamKind::Stdout, STREAM_WINDOW)
            );
            assert!(*outstanding > u64::from(STREAM_WINDOW));
        }
        other => panic!("expected a credit overrun, got {other:?}"),
    }
    assert_eq!(client.close_reason(), Some(end.clone()));
    // The pending call and every later one say why.
    let err = host.await.unwrap();
    assert_eq!(err.violation(), end.violation(), "{err}");
    let err = client.ping().await.unwrap_err();
    assert!(err.violation().is_some(), "{err}");
    assert!(err.to_string().contains("broke the protocol"), "{err}");
}

#[tokio::test]
async fn an_agent_that_waits_for_credit_may_send_any_amount() {
    let (client, mut agent) = FakeAgent::start().await;
    let total = 3 * STREAM_WINDOW as usize + 12345;
    let host = tokio::spawn({
        let client = client.clone();
        async move { client.run(ExecSpec::shell("cat big")).await.unwrap() }
    });
    let (id, _) = agent.request().await;
    agent
        .send(AgentMessage::Started {
            id,
            pid: 7,
            exec_id: 1,
        })
        .await;
    let mut outstanding = 0usize;
    let mut sent = 0usize;
    while sent < total {
        let len = (total - sent).min(MAX_CHUNK / 3);
        while outstanding + len > STREAM_WINDOW as usize {
            if let Some(ClientMessage::Credit { bytes, stream, .. }) = agent.next().await {
                assert_eq!(stream, StreamKind::Stdout);
                outstanding -= bytes as usize;
            }
        }
        agent.send(data(id, StreamKind::Stdout, len)).await;
        outstanding += len;
        sent += len;
    }
    agent.send(exited(id)).await;
    let out = host.await.unwrap();
    assert_eq!(out.stdout.len(), total);
    assert!(client.close_reason().is_none());
    ping_ok(&client, &mut agent).await;
}

/// Pings while the fake agent answers, to show the connection still works.
async fn ping_ok(client: &AgentClient, agent: &mut FakeAgent) {
    let ping = tokio::spawn({
        let client = client.clone();
        async move { client.ping().await }
    });
    loop {
        let (id, request) = agent.request().await;
        if request == Request::Ping {
            agent
                .send(AgentMessage::Done {
                    id,
                    result: Ok(Response::Pong),
                })
                .await;
            break;
        }
    }
    ping.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_window_of_one_byte_chunks_is_accepted_and_delivered_in_order() {
    let (client, mut agent) = FakeAgent::start().await;
    let count = 200_000usize;
    let host = tokio::spawn({
        let client = client.clone();
        async move { client.run(ExecSpec::shell("trickle")).await.unwrap() }
    });
    let (id, _) = agent.request().await;
    agent
        .send(AgentMessage::Started {
            id,
            pid: 7,
            exec_id: 1,
        })
        .await;
    for i in 0..count {
        let msg = AgentMessage::Data {
            id,
            stream: StreamKind::Stderr,
            data: Bytes::from(vec![(i % 251) as u8]),
        };
        agent.writer.queue_agent_message(&msg).unwrap();
        if agent.writer.pending() > 64 * 1024 {
            agent.writer.flush().await.unwrap();
        }
    }
    agent.writer.flush().await.unwrap();
    agent.send(exited(id)).await;
    let out = host.await.unwrap();
    assert_eq!(out.stderr.len(), count);
    assert!(
        out.stderr
            .iter()
            .enumerate()
            .all(|(i, b)| *b == (i % 251) as u8)
    );
}

#[tokio::test]
async fn credit_the_agent_was_never_owed_is_a_violation_not_a_semaphore_overflow() {
    let (client, mut agent) = FakeAgent::start().await;
    let host = tokio::spawn({
        let client = client.clone();
        async move {
            let mut handle = client
                .exec(ExecSpec::shell("cat").stdin_piped())
                .await
                .unwrap();
            let mut stdin = handle.take_stdin().unwrap();
            stdin.write(&b"hello"[..]).await.unwrap();
            handle.wait().await.unwrap_err()
        }
    });
    let (id, _) = agent.request().await;
    agent
        .send(AgentMessage::Started {
            id,
            pid: 7,
            exec_id: 1,
        })
        .await;
    // Wait for the 5 stdin bytes, credit them back, then credit far more.
    loop {
        if let Some(ClientMessage::Data { data, .. }) = agent.next().await {
            assert_eq!(&data[..], b"hello");
            break;
        }
    }
    agent.send(AgentMessage::Credit { id, bytes: 5 }).await;
    for _ in 0..4 {
        if !agent
            .send_lossy(AgentMessage::Credit {
                id,
                bytes: u32::MAX,
            })
            .await
        {
            break;
        }
    }
    agent.until_closed().await;
    let err = host.await.unwrap();
    assert_eq!(
        err.violation(),
        Some(&ProtocolViolation::CreditOverflow {
            id,
            bytes: u32::MAX,
            outstanding: 0
        }),
        "{err}"
    );
}

#[tokio::test]
async fn data_for_a_request_not_in_flight_or_a_missing_stream_is_a_violation() {
    let (client, mut agent) = FakeAgent::start().await;
    agent.send(data(999, StreamKind::Stdout, 3)).await;
    assert_eq!(
        client.closed().await,
        ConnectionEnd::Violation(ProtocolViolation::UnknownRequest { id: 999 })
    );

    // Stderr is not a stream of a file download.
    let (client, mut agent) = FakeAgent::start().await;
    let host = tokio::spawn({
        let client = client.clone();
        async move { client.read_file_to_vec("/f").await.unwrap_err() }
    });
    let (id, _) = agent.request().await;
    agent.send(AgentMessage::Opened { id, size: 3 }).await;
    agent.send(data(id, StreamKind::Stderr, 3)).await;
    let err = host.await.unwrap();
    assert_eq!(
        err.violation(),
        Some(&ProtocolViolation::UnexpectedStream {
            id,
            stream: StreamKind::Stderr
        }),
        "{err}"
    );
}

#[tokio::test]
async fn an_oversized_or_garbage_frame_is_a_violation() {
    use tokio::io::AsyncWriteExt;
    let (client, agent) = FakeAgent::start().await;
    let mut raw = agent.writer.into_inner();
    raw.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
    assert!(matches!(
        client.closed().await,
        ConnectionEnd::Violation(ProtocolViolation::FrameTooLarge { .. })
    ));

    let (client, agent) = FakeAgent::start().await;
    let mut raw = agent.writer.into_inner();
    raw.write_all(&[0, 0, 0, 2, 0xff, 0xff]).await.unwrap();
    assert!(matches!(
        client.closed().await,
        ConnectionEnd::Violation(ProtocolViolation::Malformed(_))
    ));
}

#[tokio::test]
async fn closed_reports_an_ordinary_end_without_a_violation() {
    let (client, agent) = FakeAgent::start().await;
    assert_eq!(client.close_reason(), None);
    drop(agent);
    let end = client.closed().await;
    assert_eq!(end, ConnectionEnd::AgentClosed);
    assert!(end.violation().is_none());
    let err = client.ping().await.unwrap_err();
    assert!(
        matches!(
            &err,
            ClientError::Disconnected {
                end: ConnectionEnd::AgentClosed
            }
        ),
        "{err}"
    );
}

#[tokio::test]
async fn output_past_its_cap_is_too_large_and_the_command_is_killed() {
    let (client, mut agent) = FakeAgent::start().await;
    let host = tokio::spawn({
        let client = client.clone();
        async move {
            client
                .exec(ExecSpec::shell("noisy"))
                .await
                .unwrap()
                .output_limited(2048)
                .await
                .unwrap_err()
        }
    });
    let (id, _) = agent.request().await;
    agent
        .send(AgentMessage::Started {
            id,
            pid: 7,
            exec_id: 1,
        })
        .await;
    for _ in 0..3 {
        agent.send(data(id, StreamKind::Stdout, 1024)).await;
    }
    // The host gives up at the third chunk and kills the command.
    loop {
        match agent.next().await.expect("the host keeps the connection") {
            ClientMessage::Signal { id: sid, signal } => {
                assert_eq!((sid, signal), (id, 9));
                break;
            }
            ClientMessage::Credit { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    let err = host.await.unwrap();
    match &err {
        ClientError::TooLarge {
            limit,
            call,
            instead,
            ..
        } => {
            assert_eq!(*limit, 2048);
            assert_eq!(*call, "ExecHandle::output");
            assert!(instead.contains("take_stdout"), "{instead}");
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert!(err.to_string().contains("2048-byte cap"), "{err}");
    // The connection is fine.
    agent.send(exited(id)).await;
    ping_ok(&client, &mut agent).await;
}

#[tokio::test]
async fn a_file_over_the_read_cap_is_refused_and_its_transfer_cancelled() {
    let (client, mut agent) = FakeAgent::start().await;
    // Announced too large when opened.
    let host = tokio::spawn({
        let client = client.clone();
        async move { client.read_file_to_vec_limited("/big", 10).await }
    });
    let (id, _) = agent.request().await;
    agent.send(AgentMessage::Opened { id, size: 11 }).await;
    assert!(matches!(
        agent.next().await,
        Some(ClientMessage::Cancel { id: c }) if c == id
    ));
    let err = host.await.unwrap().unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::TooLarge {
                limit: 10,
                call: "read_file_to_vec",
                ..
            }
        ),
        "{err}"
    );
    agent
        .send(AgentMessage::Done {
            id,
            result: Ok(Response::ReadDone { bytes: 0 }),
        })
        .await;

    // Grown past the cap while being read.
    let host = tokio::spawn({
        let client = client.clone();
        async move { client.read_file_to_vec_limited("/growing", 10).await }
    });
    let (id, _) = agent.request().await;
    agent.send(AgentMessage::Opened { id, size: 4 }).await;
    agent.send(data(id, StreamKind::File, 8)).await;
    agent.send(data(id, StreamKind::File, 8)).await;
    let err = host.await.unwrap().unwrap_err();
    assert!(err.to_string().contains("AgentClient::read_file"), "{err}");
    loop {
        match agent.next().await {
            Some(ClientMessage::Cancel { id: c }) if c == id => break,
            Some(ClientMessage::Credit { .. }) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}
