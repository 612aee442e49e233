//! Freezes the wire format: one sample of every message variant, encoded, is
//! compared against `tests/wire_schema.txt`.
//!
//! If this test fails you changed what crosses the host/guest boundary. If
//! that was deliberate, bump `PROTOCOL_VERSION` (unless only the handshake
//! samples' version numbers changed) and regenerate the file with
//! `NOVA_UPDATE_WIRE_SCHEMA=1 cargo test -p nova-protocol --test wire_schema`.
//! The handshake types (`Hello`, `HelloReply`) must never change.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use nova_protocol::*;

/// Names each variant; exhaustive on purpose, so that adding a variant fails
/// to compile here until a sample is added below.
fn client_name(msg: &ClientMessage) -> String {
    match msg {
        ClientMessage::Request { request, .. } => format!(
            "ClientMessage::Request/{}",
            match request {
                Request::Exec(_) => "Exec",
                Request::WriteFile { .. } => "WriteFile",
                Request::ReadFile { .. } => "ReadFile",
                Request::ListDir { .. } => "ListDir",
                Request::Stat { .. } => "Stat",
                Request::Remove { .. } => "Remove",
                Request::MkdirP { .. } => "MkdirP",
                Request::Stats => "Stats",
                Request::Ping => "Ping",
                Request::Shutdown => "Shutdown",
                Request::SetClock { .. } => "SetClock",
                Request::Refresh { .. } => "Refresh",
                Request::ListExecs => "ListExecs",
                Request::AttachExec { .. } => "AttachExec",
            }
        ),
        ClientMessage::Data { .. } => "ClientMessage::Data".into(),
        ClientMessage::Eof { .. } => "ClientMessage::Eof".into(),
        ClientMessage::Credit { .. } => "ClientMessage::Credit".into(),
        ClientMessage::Signal { .. } => "ClientMessage::Signal".into(),
        ClientMessage::Resize { .. } => "ClientMessage::Resize".into(),
        ClientMessage::Cancel { .. } => "ClientMessage::Cancel".into(),
    }
}

fn agent_name(msg: &AgentMessage) -> String {
    if let AgentMessage::Done { result: Err(e), .. } = msg {
        // Exhaustive on purpose: a new error kind needs a sample below.
        let kind = match e.kind {
            RemoteErrorKind::NotFound => "NotFound",
            RemoteErrorKind::PermissionDenied => "PermissionDenied",
            RemoteErrorKind::AlreadyExists => "AlreadyExists",
            RemoteErrorKind::InvalidInput => "InvalidInput",
            RemoteErrorKind::Spawn(_) => "Spawn",
            RemoteErrorKind::UnknownRequest => "UnknownRequest",
            RemoteErrorKind::Protocol => "Protocol",
            RemoteErrorKind::Busy => "Busy",
            RemoteErrorKind::Io => "Io",
            RemoteErrorKind::IsADirectory => "IsADirectory",
            RemoteErrorKind::NotADirectory => "NotADirectory",
            RemoteErrorKind::NoSpace => "NoSpace",
            RemoteErrorKind::ReadOnly => "ReadOnly",
            RemoteErrorKind::DirectoryNotEmpty => "DirectoryNotEmpty",
        };
        return format!("AgentMessage::Done/Err/{kind}");
    }
    match msg {
        AgentMessage::Started { .. } => "AgentMessage::Started".into(),
        AgentMessage::Opened { .. } => "AgentMessage::Opened".into(),
        AgentMessage::Data { .. } => "AgentMessage::Data".into(),
        AgentMessage::Credit { .. } => "AgentMessage::Credit".into(),
        AgentMessage::ProtocolError { .. } => "AgentMessage::ProtocolError".into(),
        AgentMessage::Done { result, .. } => format!(
            "AgentMessage::Done/{}",
            match result {
                Err(_) => "Err",
                Ok(Response::Exited(_)) => "Exited",
                Ok(Response::Written { .. }) => "Written",
                Ok(Response::ReadDone { .. }) => "ReadDone",
                Ok(Response::DirListing(_)) => "DirListing",
                Ok(Response::Stat(_)) => "Stat",
                Ok(Response::Removed) => "Removed",
                Ok(Response::Created) => "Created",
                Ok(Response::Stats(_)) => "Stats",
                Ok(Response::Pong) => "Pong",
                Ok(Response::ShuttingDown) => "ShuttingDown",
                Ok(Response::ClockSet { .. }) => "ClockSet",
                Ok(Response::Refreshed { .. }) => "Refreshed",
                Ok(Response::Execs(_)) => "Execs",
            }
        ),
    }
}

fn client_samples() -> Vec<ClientMessage> {
    let full_spec = ExecSpec {
        command: ExecCommand::Argv(vec!["ls".into(), "-l".into()]),
        env: vec![("K".into(), "V".into())],
        cwd: Some("/tmp".into()),
        stdin: true,
        timeout_ms: Some(1500),
        pty: Some(PtySize { rows: 24, cols: 80 }),
        user: Some(ExecUser {
            user: IdOrName::Name("app".into()),
            group: Some(IdOrName::Id(1001)),
        }),
    };
    let requests = vec![
        Request::Exec(full_spec),
        Request::Exec(ExecSpec::shell("echo hi")),
        Request::WriteFile {
            path: "/f".into(),
            mode: 0o644,
            append: false,
        },
        Request::ReadFile { path: "/f".into() },
        Request::ListDir { path: "/".into() },
        Request::Stat { path: "/f".into() },
        Request::Remove {
            path: "/d".into(),
            recursive: true,
        },
        Request::MkdirP {
            path: "/a/b".into(),
            mode: 0o755,
        },
        Request::Stats,
        Request::Ping,
        Request::Shutdown,
        Request::SetClock {
            unix_ns: 1_700_000_000_123_456_789,
        },
        Request::Refresh {
            hostname: "sb-2".into(),
            entropy: vec![0, 1, 0xfe, 0xff],
            unix_ns: 1_700_000_000_123_456_789,
            dns: Some(vec![
                std::net::Ipv4Addr::new(198, 18, 0, 53),
                std::net::Ipv4Addr::new(10, 0, 0, 2),
            ]),
        },
        Request::ListExecs,
        Request::AttachExec { exec_id: 9 },
        // Version 5's: a user by id with a group by name; a refresh of a
        // guest without a network.
        Request::Exec(ExecSpec::shell("id").user(ExecUser {
            user: IdOrName::Id(1000),
            group: Some(IdOrName::Name("staff".into())),
        })),
        Request::Refresh {
            hostname: "sb-3".into(),
            entropy: vec![7; 16],
            unix_ns: 1,
            dns: None,
        },
    ];
    let mut out: Vec<ClientMessage> = requests
        .into_iter()
        .enumerate()
        .map(|(i, request)| ClientMessage::Request {
            id: 300 + i as u64,
            request,
        })
        .collect();
    out.extend([
        ClientMessage::Data {
            id: 7,
            data: Bytes::from_static(&[0, 1, 0xff]),
        },
        ClientMessage::Eof { id: 7 },
        ClientMessage::Credit {
            id: 7,
            stream: StreamKind::Stderr,
            bytes: 65536,
        },
        ClientMessage::Signal { id: 7, signal: 15 },
        ClientMessage::Resize {
            id: 7,
            size: PtySize {
                rows: 50,
                cols: 132,
            },
        },
        ClientMessage::Cancel { id: 7 },
    ]);
    out
}

fn agent_samples() -> Vec<AgentMessage> {
    let responses = vec![
        Response::Exited(ExecResult {
            status: ExitStatus::Exited(3),
            timed_out: false,
            duration_us: 1234,
        }),
        Response::Exited(ExecResult {
            status: ExitStatus::Signaled(9),
            timed_out: true,
            duration_us: 5,
        }),
        Response::Written { bytes: 10 },
        Response::ReadDone { bytes: 10 },
        Response::DirListing(DirListing {
            entries: vec![
                DirEntry {
                    name: "a".into(),
                    kind: FileKind::File,
                    size: 1,
                    mode: 0o644,
                },
                DirEntry {
                    name: "l".into(),
                    kind: FileKind::Symlink,
                    size: 2,
                    mode: 0o777,
                },
            ],
            truncated: false,
        }),
        Response::Stat(FileStat {
            kind: FileKind::Dir,
            size: 4096,
            mode: 0o755,
            uid: 0,
            gid: 0,
            modified_ms: 1_700_000_000_000,
        }),
        Response::Removed,
        Response::Created,
        Response::Stats(GuestStats {
            memory_total_bytes: 1 << 30,
            memory_used_bytes: 1 << 20,
            memory_available_bytes: (1 << 30) - (1 << 20),
            cpu_user_ms: 10,
            cpu_system_ms: 20,
            cpu_idle_ms: 30,
            cpu_count: 2,
            load_average: [0.5, 0.25, 0.125],
            root_fs_total_bytes: 1 << 32,
            root_fs_used_bytes: 1 << 28,
            process_count: 7,
            uptime_ms: 1500,
        }),
        Response::Pong,
        Response::ShuttingDown,
        Response::ClockSet {
            offset_ns: -1_500_000_000,
            stepped: true,
        },
        Response::Refreshed {
            machine_id: "0123456789abcdef0123456789abcdef".into(),
            reseeded: true,
            clock_offset_ns: 2_000_000_000,
            clock_stepped: false,
        },
        Response::Execs(vec![
            ExecInfo {
                exec_id: 1,
                pid: 42,
                command: ExecCommand::Shell("sleep 3; exit 7".into()),
                state: ExecState::Running,
                attached: false,
                buffered_bytes: 5,
            },
            ExecInfo {
                exec_id: 2,
                pid: 43,
                command: ExecCommand::Argv(vec!["true".into()]),
                state: ExecState::Ended(ExecResult {
                    status: ExitStatus::Exited(7),
                    timed_out: false,
                    duration_us: 3_000_000,
                }),
                attached: true,
                buffered_bytes: 0,
            },
        ]),
    ];
    let mut out = vec![
        AgentMessage::Started {
            id: 1,
            pid: 42,
            exec_id: 7,
        },
        AgentMessage::Opened { id: 2, size: 99 },
        AgentMessage::Data {
            id: 1,
            stream: StreamKind::Stdout,
            data: Bytes::from_static(b"out\n\0"),
        },
        AgentMessage::Data {
            id: 2,
            stream: StreamKind::File,
            data: Bytes::from_static(b"x"),
        },
        AgentMessage::Credit { id: 1, bytes: 4096 },
        AgentMessage::ProtocolError {
            message: "bad".into(),
        },
        AgentMessage::Done {
            id: 9,
            result: Err(RemoteError::new(RemoteErrorKind::NotFound, "no such file")),
        },
        AgentMessage::Done {
            id: 9,
            result: Err(RemoteError::new(
                RemoteErrorKind::Spawn(SpawnErrorKind::CwdNotFound),
                "no /x",
            )),
        },
    ];
    // Every error kind, so that adding one changes the schema.
    out.extend(
        [
            RemoteErrorKind::NotFound,
            RemoteErrorKind::PermissionDenied,
            RemoteErrorKind::AlreadyExists,
            RemoteErrorKind::InvalidInput,
            RemoteErrorKind::Spawn(SpawnErrorKind::NotFound),
            RemoteErrorKind::Spawn(SpawnErrorKind::UnknownUser),
            RemoteErrorKind::Spawn(SpawnErrorKind::SwitchUser),
            RemoteErrorKind::UnknownRequest,
            RemoteErrorKind::Protocol,
            RemoteErrorKind::Busy,
            RemoteErrorKind::Io,
            RemoteErrorKind::IsADirectory,
            RemoteErrorKind::NotADirectory,
            RemoteErrorKind::NoSpace,
            RemoteErrorKind::ReadOnly,
            RemoteErrorKind::DirectoryNotEmpty,
        ]
        .into_iter()
        .map(|kind| AgentMessage::Done {
            id: 9,
            result: Err(RemoteError::new(kind, "e")),
        }),
    );
    out.extend(responses.into_iter().map(|r| AgentMessage::Done {
        id: 10,
        result: Ok(r),
    }));
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn render() -> String {
    let mut lines = vec![
        format!("# nova-protocol wire schema, PROTOCOL_VERSION = {PROTOCOL_VERSION}"),
        format!(
            "# constants: MAX_FRAME_SIZE = {MAX_FRAME_SIZE}, MAX_CHUNK = {MAX_CHUNK}, STREAM_WINDOW = {STREAM_WINDOW}"
        ),
        "# <name>: <frame bytes in hex (u32 BE length + postcard payload)>".to_owned(),
    ];
    let hello = Hello {
        magic: HELLO_MAGIC,
        versions: vec![1, 2],
        client: "c".into(),
    };
    lines.push(format!("Hello: {}", hex(&frame::encode(&hello).unwrap())));
    let welcome = HelloReply::Welcome(HelloInfo {
        protocol_version: 1,
        agent_version: "nova-agent 0.1.0".into(),
        kernel_release: "6.1.0".into(),
        agent_started_us: 1_000_000,
        agent_ready_us: 1_002_000,
        pid1: true,
        hostname: "nova".into(),
    });
    lines.push(format!(
        "HelloReply::Welcome: {}",
        hex(&frame::encode(&welcome).unwrap())
    ));
    let refused = HelloReply::Refused {
        supported: vec![1],
        message: "no".into(),
    };
    lines.push(format!(
        "HelloReply::Refused: {}",
        hex(&frame::encode(&refused).unwrap())
    ));
    for msg in client_samples() {
        let encoded = frame::encode(&msg).unwrap();
        let back: ClientMessage = frame::decode(&encoded[4..]).unwrap();
        assert_eq!(back, msg, "round trip of {}", client_name(&msg));
        lines.push(format!("{}: {}", client_name(&msg), hex(&encoded)));
    }
    for msg in agent_samples() {
        let encoded = frame::encode(&msg).unwrap();
        let back: AgentMessage = frame::decode(&encoded[4..]).unwrap();
        assert_eq!(back, msg, "round trip of {}", agent_name(&msg));
        lines.push(format!("{}: {}", agent_name(&msg), hex(&encoded)));
    }
    lines.join("\n") + "\n"
}

#[test]
fn wire_schema_is_frozen() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/wire_schema.txt");
    let current = render();
    if std::env::var_os("NOVA_UPDATE_WIRE_SCHEMA").is_some() {
        std::fs::write(&path, &current).unwrap();
        return;
    }
    let frozen = std::fs::read_to_string(&path)
        .expect("tests/wire_schema.txt is missing; generate it with NOVA_UPDATE_WIRE_SCHEMA=1");
    if frozen != current {
        let diff: Vec<String> = frozen
            .lines()
            .zip(current.lines())
            .filter(|(a, b)| a != b)
            .map(|(a, b)| format!("- {a}\n+ {b}"))
            .collect();
        panic!(
            "the wire format changed (bump PROTOCOL_VERSION and regenerate with \
             NOVA_UPDATE_WIRE_SCHEMA=1 if deliberate):\n{}\n(line counts: frozen {}, now {})",
            diff.join("\n"),
            frozen.lines().count(),
            current.lines().count()
        );
    }
}

#[test]
fn every_variant_has_a_sample() {
    // The name functions above are exhaustive matches; check each name occurs.
    let names: std::collections::HashSet<String> = client_samples()
        .iter()
        .map(client_name)
        .chain(agent_samples().iter().map(agent_name))
        .collect();
    assert_eq!(
        names.len(),
        20 + 18 + 14,
        "one sample per variant and error kind: {names:?}"
    );
}
