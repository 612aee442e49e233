//! The MCP tools against real VMs (QEMU, TCG in CI), through a real rmcp
//! client on an in-memory pipe: every tool once, and what a session's end
//! stops (and what `keep: true` spares).
//!
//! Each test has a private `$NOVA_HOME` in /tmp whose `templates` links to
//! the built ones (`NOVA_TEMPLATES_DIR`, else `$NOVA_HOME/templates`).
//! Without the `minimal` template the tests fail with the command to build
//! it, unless `NOVA_SKIP_VM_TESTS=1`, which makes them print SKIP.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use nova_core::home::NovaHome;
use nova_core::id::SandboxId;
use nova_core::state::SandboxState;
use nova_server::mcp::{NovaMcp, StdioSession};
use nova_server::{Daemon, Policy};
use novasandbox::providers::{QemuHypervisor, QemuOptions};
use novasandbox::runtime::host::HostReport;
use rmcp::model::{CallToolRequestParams, CallToolResult};
use rmcp::service::{RoleClient, RunningService};
use rmcp::{ServiceError, ServiceExt};
use serde_json::{Value, json};

struct TestDaemon {
    _dir: tempfile::TempDir,
    daemon: Arc<Daemon>,
}

fn setup(test: &str) -> Option<TestDaemon> {
    let templates = match std::env::var_os("NOVA_TEMPLATES_DIR") {
        Some(dir) => dir.into(),
        None => NovaHome::resolve().expect("a NOVA_HOME").templates_dir(),
    };
    if !templates.join("minimal/minimal.json").is_file() {
        if std::env::var_os("NOVA_SKIP_VM_TESTS").is_some_and(|v| v == "1") {
            eprintln!(
                "SKIP {test}: template minimal not built in {} (NOVA_SKIP_VM_TESTS=1)",
                templates.display()
            );
            return None;
        }
        panic!(
            "{test}: template minimal is not built in {}; run `make images` (or set \
             NOVA_SKIP_VM_TESTS=1 to skip VM tests)",
            templates.display()
        );
    }
    let report = HostReport::probe();
    let accel = report.qemu_accel();
    let qemu = report
        .qemu
        .expect("qemu-system-x86_64 must be installed: run `make deps`");
    // Short paths keep the Unix sockets under the 108-byte limit.
    let dir = tempfile::Builder::new()
        .prefix("nova-mcp-")
        .tempdir_in("/tmp")
        .unwrap();
    std::os::unix::fs::symlink(&templates, dir.path().join("templates")).unwrap();
    let home = NovaHome::at(dir.path());
    let hv = QemuHypervisor::new(QemuOptions {
        home: home.clone(),
        qemu_bin: qemu.path,
        accel,
        scratch_size_mb: 1024,
    });
    let daemon = Daemon::new(Arc::new(hv), home, Policy::default()).unwrap();
    Some(TestDaemon { _dir: dir, daemon })
}

async fn call(
    client: &RunningService<RoleClient, ()>,
    tool: &str,
    args: Value,
) -> Result<CallToolResult, ServiceError> {
    let args = args.as_object().cloned().unwrap_or_default();
    client
        .call_tool(CallToolRequestParams::new(tool.to_owned()).with_arguments(args))
        .await
}

/// The structured output of a call that must succeed.
async fn ok(client: &RunningService<RoleClient, ()>, tool: &str, args: Value) -> Value {
    let result = call(client, tool, args).await.expect("no protocol error");
    assert_ne!(result.is_error, Some(true), "{tool} failed: {result:?}");
    result.structured_content.expect("structured output")
}

fn create_args(keep: bool) -> Value {
    json!({"template": "minimal", "memory_mb": 256, "vcpus": 1, "network": false, "keep": keep})
}

async fn wait_until_gone(daemon: &Daemon, id: &str, timeout: Duration) -> bool {
    let start = Instant::now();
    let sid: SandboxId = id.parse().unwrap();
    while start.elapsed() < timeout {
        let live = daemon
            .hypervisor()
            .get(&sid)
            .await
            .is_some_and(|i| i.state != SandboxState::Stopped);
        if !live && daemon.known(id).await.is_err() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_tool_works_against_a_real_vm() {
    let Some(test) = setup("every_tool_works_against_a_real_vm") else {
        return;
    };
    let (server_io, client_io) = tokio::io::duplex(1 << 20);
    let server = tokio::spawn(StdioSession::serve(
        test.daemon.clone(),
        tokio::io::split(server_io),
    ));
    let client = ().serve(tokio::io::split(client_io)).await.unwrap();

    let tools = client.list_all_tools().await.unwrap();
    let mut names: Vec<&str> = tools.iter().map(|t| t.name.as_ref()).collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "create_sandbox",
            "get_stats",
            "list_files",
            "list_sandboxes",
            "read_file",
            "run_command",
            "stop_sandbox",
            "write_file"
        ]
    );
    for tool in &tools {
        let description = tool.description.as_deref().unwrap_or_default();
        assert!(description.len() > 60, "{}: {description}", tool.name);
        assert_eq!(tool.input_schema.get("type"), Some(&json!("object")));
    }

    let sandbox = ok(&client, "create_sandbox", create_args(false)).await;
    let id = sandbox["sandbox_id"].as_str().unwrap().to_owned();
    assert_eq!(sandbox["state"], "running");
    assert_eq!(sandbox["stops_with_session"], true);

    let out = ok(
        &client,
        "run_command",
        json!({"sandbox_id": id, "command": "echo hi"}),
    )
    .await;
    assert_eq!(
        (out["exit_code"].as_i64(), out["stdout"].as_str()),
        (Some(0), Some("hi\n"))
    );
    let out = ok(
        &client,
        "run_command",
        json!({"sandbox_id": id, "argv": ["sh", "-c", "sleep 5"], "timeout_secs": 1}),
    )
    .await;
    assert_eq!(
        (out["exit_code"].as_i64(), out["timed_out"].as_bool()),
        (Some(124), Some(true))
    );
    let out = ok(
        &client,
        "run_command",
        json!({"sandbox_id": id, "command": "head -c 200000 /dev/zero | tr '\\0' x"}),
    )
    .await;
    assert_eq!(out["truncated"], true);
    assert!(out["stdout"].as_str().unwrap().len() < 70_000);

    let wrote = ok(
        &client,
        "write_file",
        json!({"sandbox_id": id, "path": "/root/dir/a.txt", "content": "héllo\n"}),
    )
    .await;
    assert_eq!(wrote["bytes"], "héllo\n".len());
    let read = ok(
        &client,
        "read_file",
        json!({"sandbox_id": id, "path": "/root/dir/a.txt"}),
    )
    .await;
    assert_eq!(read["content"], "héllo\n");
    ok(
        &client,
        "write_file",
        json!({"sandbox_id": id, "path": "/root/dir/b.bin", "content": "AP8A", "encoding": "base64"}),
    )
    .await;
    let binary = call(
        &client,
        "read_file",
        json!({"sandbox_id": id, "path": "/root/dir/b.bin"}),
    )
    .await
    .unwrap();
    assert_eq!(
        binary.is_error,
        Some(true),
        "binary read as text is refused"
    );
    let read = ok(
        &client,
        "read_file",
        json!({"sandbox_id": id, "path": "/root/dir/b.bin", "encoding": "base64"}),
    )
    .await;
    assert_eq!(read["content"], "AP8A");

    let listing = ok(
        &client,
        "list_files",
        json!({"sandbox_id": id, "path": "/root/dir"}),
    )
    .await;
    let entries: Vec<&str> = listing["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(entries, ["a.txt", "b.bin"]);

    let stats = ok(&client, "get_stats", json!({"sandbox_id": id})).await;
    assert_eq!(stats["memory_limit_mb"], 256);
    assert!(stats["uptime_ms"].as_u64().unwrap() > 0);

    let listed = ok(&client, "list_sandboxes", json!({})).await;
    assert_eq!(listed["sandboxes"][0]["sandbox_id"], id.as_str());

    let stopped = ok(&client, "stop_sandbox", json!({"sandbox_id": id})).await;
    assert_eq!(stopped["stopped"], true);
    assert!(wait_until_gone(&test.daemon, &id, Duration::from_secs(5)).await);

    // A mistake is a tool error with the problem, not a protocol error.
    let missing = call(
        &client,
        "run_command",
        json!({"sandbox_id": id, "command": "true"}),
    )
    .await
    .unwrap();
    assert_eq!(missing.is_error, Some(true));
    assert_eq!(
        missing.structured_content.unwrap()["code"],
        "sandbox_not_found"
    );
    let bad = call(&client, "create_sandbox", json!({"memory_mb": 1}))
        .await
        .unwrap();
    assert_eq!(bad.is_error, Some(true));
    assert_eq!(bad.structured_content.unwrap()["code"], "invalid_config");

    client.cancel().await.unwrap();
    server.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sessions_sandboxes_stop_when_it_ends_unless_kept() {
    let Some(test) = setup("a_sessions_sandboxes_stop_when_it_ends_unless_kept") else {
        return;
    };
    let (server_io, client_io) = tokio::io::duplex(1 << 20);
    // As over HTTP: the session's handler is dropped when the session ends.
    let server = tokio::spawn({
        let daemon = test.daemon.clone();
        async move {
            let running = NovaMcp::new(daemon)
                .serve(tokio::io::split(server_io))
                .await
                .unwrap();
            let _ = running.waiting().await;
        }
    });
    let client = ().serve(tokio::io::split(client_io)).await.unwrap();
    let bound = ok(&client, "create_sandbox", create_args(false)).await;
    let kept = ok(&client, "create_sandbox", create_args(true)).await;
    assert_eq!(kept["stops_with_session"], false);
    let (bound, kept) = (
        bound["sandbox_id"].as_str().unwrap().to_owned(),
        kept["sandbox_id"].as_str().unwrap().to_owned(),
    );

    drop(client);
    server.await.unwrap();
    assert!(
        wait_until_gone(&test.daemon, &bound, Duration::from_secs(30)).await,
        "the session's sandbox still runs after the session ended"
    );
    let view = test
        .daemon
        .view(&kept)
        .await
        .expect("the kept sandbox is known");
    assert_eq!(
        serde_json::to_value(view.state).unwrap(),
        "running",
        "keep: true survives the session"
    );
    test.daemon.delete(&kept, true).await.unwrap();
}
