//! Every route of the API against real sandboxes, one daemon, two VMs: a
//! long-lived one most checks share, and one with a 1-second lifetime for
//! the reaper.

use std::time::Duration;

use hyper::Method;
use serde_json::{Value, json};

use crate::harness::{
    Api, Daemon, DaemonOptions, Transcript, cheap_policy, chunked, full, wait_until,
};

/// The OpenAPI document as checked in.
const OPENAPI: &str = include_str!("../../../nova-server/openapi.json");

/// The value of the sample `name` (labels included, as written) in a
/// Prometheus text, 0 when absent.
fn sample(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Pseudo-random bytes (xorshift), so a transfer that reorders or drops a
/// chunk cannot pass.
fn noise(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_against_a_real_sandbox() {
    let Some(daemon) = Daemon::start(
        "every_endpoint_against_a_real_sandbox",
        DaemonOptions {
            policy: cheap_policy(""),
            tcp: false,
        },
    )
    .await
    else {
        return;
    };
    let api = daemon.api();

    system_routes(&api).await;
    let metrics_before = api.get("/metrics").await.expect(200).text();

    let sb = api
        .create(json!({
            "labels": {"team": "a", "stage": "ci"},
            "env": {"GREETING": "hello-from-create"},
        }))
        .await;
    let id = sb["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("sb-"), "{sb}");
    assert_eq!(sb["state"], "running", "{sb}");
    assert_eq!(sb["template"], "minimal");
    assert_eq!(sb["memory_mb"], 256);
    assert_eq!(sb["vcpus"], 1);
    assert_eq!(sb["network"], false);
    assert_eq!(sb["backend"], "qemu");
    assert_eq!(sb["labels"], json!({"team": "a", "stage": "ci"}));
    assert_eq!(sb["from_pool"], false);
    assert!(sb["expires_at_ms"].as_u64().unwrap() > sb["created_at_ms"].as_u64().unwrap());
    assert!(sb["boot"]["boot_time_ms"].as_f64().unwrap() > 0.0, "{sb}");
    assert!(sb.get("env").is_none(), "the env is not echoed: {sb}");

    let got = api
        .get(&format!("/v1/sandboxes/{id}"))
        .await
        .expect(200)
        .json();
    assert_eq!(got["id"], sb["id"]);
    assert_eq!(got["labels"], sb["labels"]);

    list_filters(&api, &id).await;
    exec_to_completion(&api, &id).await;
    streamed_exec(&api, &id).await;
    files(&api, &id).await;
    pause_resume_stats_logs(&api, &id).await;

    // A new lifetime moves expires_at.
    let before = got["expires_at_ms"].as_u64().unwrap();
    let moved = api
        .post(
            &format!("/v1/sandboxes/{id}/timeout"),
            &json!({"timeout_secs": 3600}),
        )
        .await
        .expect(200)
        .json();
    assert!(
        moved["expires_at_ms"].as_u64().unwrap() > before + 3_000_000,
        "{moved}"
    );
    api.post(
        &format!("/v1/sandboxes/{id}/timeout"),
        &json!({"timeout_secs": 0}),
    )
    .await
    .problem(400, "invalid_config");

    // A 1-second lifetime: the reaper stops the sandbox and forgets it.
    let short = api.create(json!({"timeout_secs": 1})).await;
    let short_id = short["id"].as_str().unwrap().to_owned();
    let reaped = wait_until(Duration::from_secs(30), || async {
        api.get(&format!("/v1/sandboxes/{short_id}")).await.status == 404
    })
    .await;
    assert!(
        reaped,
        "the 1 s sandbox outlived its lifetime:\n{}",
        daemon.log()
    );
    let listed = api.get("/v1/sandboxes").await.expect(200).json();
    assert!(
        !listed
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["id"] == short_id),
        "{listed}"
    );
    assert!(
        !daemon.sandbox_dirs().iter().any(|d| d.ends_with(&short_id)),
        "the reaped sandbox's directory is left"
    );

    // Metrics: the creates are counted, sandboxes are reported by state.
    let metrics = api.get("/metrics").await.expect(200).text();
    assert!(metrics.contains("nova_sandboxes"), "{metrics}");
    let count = r#"nova_create_duration_seconds_count{source="boot"}"#;
    assert_eq!(
        sample(&metrics, count),
        sample(&metrics_before, count) + 2.0,
        "{metrics}"
    );
    assert!(
        sample(&metrics, "nova_sandboxes_expired_total") >= 1.0,
        "{metrics}"
    );
    assert!(metrics.contains(&format!("sandbox=\"{id}\"")), "{metrics}");

    // Stop keeps the record (listed stopped); delete forgets it.
    let stopped = api
        .send(
            Method::POST,
            &format!("/v1/sandboxes/{id}/stop"),
            None,
            full(""),
        )
        .await
        .expect(200)
        .json();
    assert_eq!(stopped["state"], "stopped", "{stopped}");
    assert!(stopped.get("expires_at_ms").is_none(), "{stopped}");
    api.post(
        &format!("/v1/sandboxes/{id}/exec"),
        &json!({"cmd": ["true"]}),
    )
    .await
    .problem(409, "not_running");
    let listed = api
        .get("/v1/sandboxes?state=stopped")
        .await
        .expect(200)
        .json();
    assert!(listed.as_array().unwrap().iter().any(|s| s["id"] == id));
    api.delete(&format!("/v1/sandboxes/{id}")).await.expect(204);
    api.get(&format!("/v1/sandboxes/{id}"))
        .await
        .problem(404, "sandbox_not_found");
    api.delete(&format!("/v1/sandboxes/{id}"))
        .await
        .problem(404, "sandbox_not_found");
    assert!(
        wait_until(Duration::from_secs(10), || async {
            daemon.qemu_pids().is_empty() && daemon.sandbox_dirs().is_empty()
        })
        .await,
        "a VMM or sandbox directory is left: {:?} {:?}",
        daemon.processes(),
        daemon.sandbox_dirs()
    );
    let health = api.get("/v1/health").await.expect(200).json();
    assert_eq!(health["sandboxes"], 0, "{health}");
}

async fn system_routes(api: &Api) {
    let health = api.get("/v1/health").await.expect(200).json();
    assert_eq!(health["status"], "ok");
    assert_eq!(health["backend"], "qemu");
    assert_eq!(health["sandboxes"], 0);

    let templates = api.get("/v1/templates").await.expect(200).json();
    let minimal = templates
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == "minimal")
        .unwrap_or_else(|| panic!("no minimal template: {templates}"));
    assert_eq!(minimal["memory_mb"], 256);
    assert_eq!(minimal["snapshot"], true);

    let doc = api.get("/v1/openapi.json").await.expect(200);
    assert!(doc.content_type().starts_with("application/json"));
    assert!(
        doc.text() == OPENAPI,
        "the served OpenAPI document differs from crates/nova-server/openapi.json"
    );

    let metrics = api.get("/metrics").await.expect(200);
    assert!(
        metrics.content_type().contains("text"),
        "{:?}",
        metrics.headers
    );
}

async fn list_filters(api: &Api, id: &str) {
    let ids = |v: Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let all = ids(api.get("/v1/sandboxes").await.expect(200).json());
    assert_eq!(all, vec![id.to_owned()]);
    for (query, listed) in [
        ("label=team=a", true),
        ("label=team=a,stage=ci", true),
        ("label=stage", true),
        ("label=team=b", false),
        ("label=team=a,stage=prod", false),
        ("label=other", false),
        ("state=running", true),
        ("state=paused", false),
        ("state=running&label=team=a", true),
    ] {
        let got = ids(api
            .get(&format!("/v1/sandboxes?{query}"))
            .await
            .expect(200)
            .json());
        assert_eq!(got.contains(&id.to_owned()), listed, "?{query}: {got:?}");
    }
    api.get("/v1/sandboxes?state=sleeping")
        .await
        .problem(400, "invalid_request");
    api.get("/v1/sandboxes?label==x")
        .await
        .problem(400, "invalid_request");
}

async fn exec_to_completion(api: &Api, id: &str) {
    let out = api.sh(id, "echo out; echo err >&2; exit 3").await;
    assert_eq!(out["exit_code"], 3, "{out}");
    assert_eq!(out["kind"], "exited");
    assert_eq!(out["stdout"], "out\n");
    assert_eq!(out["stderr"], "err\n");
    assert!(out["duration_ms"].is_u64());

    // The create's env reaches every command; the exec's own env wins.
    let out = api.sh(id, "echo $GREETING").await;
    assert_eq!(out["stdout"], "hello-from-create\n", "{out}");
    let out = api
        .post(
            &format!("/v1/sandboxes/{id}/exec"),
            &json!({"shell": "echo $GREETING $OTHER", "env": {"GREETING": "mine", "OTHER": "x"}}),
        )
        .await
        .expect(200)
        .json();
    assert_eq!(out["stdout"], "mine x\n", "{out}");

    let out = api
        .post(
            &format!("/v1/sandboxes/{id}/exec"),
            &json!({"cmd": ["pwd"], "cwd": "/tmp", "stdin": "ignored"}),
        )
        .await
        .expect(200)
        .json();
    assert_eq!(out["stdout"], "/tmp\n", "{out}");
    let out = api
        .post(
            &format!("/v1/sandboxes/{id}/exec"),
            &json!({"cmd": ["cat"], "stdin": "piped in"}),
        )
        .await
        .expect(200)
        .json();
    assert_eq!(out["stdout"], "piped in", "{out}");

    // A program that does not exist is an exit status, as in a shell.
    let out = api
        .post(
            &format!("/v1/sandboxes/{id}/exec"),
            &json!({"cmd": ["/no/such/program"]}),
        )
        .await
        .expect(200)
        .json();
    assert_eq!(out["exit_code"], 127, "{out}");
    assert_eq!(out["kind"], "not_started", "{out}");
    assert!(out["error"].is_string(), "{out}");

    let out = api
        .post(
            &format!("/v1/sandboxes/{id}/exec"),
            &json!({"shell": "sleep 30", "timeout_ms": 300}),
        )
        .await
        .expect(200)
        .json();
    assert_eq!(out["exit_code"], 124, "{out}");
    assert_eq!(out["kind"], "timed_out", "{out}");

    let out = api
        .post(
            &format!("/v1/sandboxes/{id}/exec"),
            &json!({"shell": "head -c 4096 /dev/zero", "max_output_bytes": 100}),
        )
        .await;
    out.problem(413, "payload_too_large");

    for body in [
        json!({}),
        json!({"cmd": []}),
        json!({"cmd": ["true"], "shell": "true"}),
        json!({"cmd": ["true"], "tty": {"rows": 2, "cols": 2}}),
        json!({"cmd": ["true"], "timeout_ms": 0}),
    ] {
        api.post(&format!("/v1/sandboxes/{id}/exec"), &body)
            .await
            .problem(400, "invalid_request");
    }
    api.post(
        "/v1/sandboxes/sb-0000000000000/exec",
        &json!({"cmd": ["true"]}),
    )
    .await
    .problem(404, "sandbox_not_found");
}

async fn streamed_exec(api: &Api, id: &str) {
    let stream = format!("/v1/sandboxes/{id}/exec/stream");

    // Interactive stdin: `cat` echoes what it is sent, ends at stdin_eof.
    let mut ws = api.websocket(&stream).await;
    ws.send_json(&json!({"cmd": ["cat"], "interactive": true}))
        .await;
    let mut t = Transcript::default();
    assert!(
        ws.read_until(&mut t, Duration::from_secs(30), |t| t.exec_id.is_some())
            .await,
        "{t:?}"
    );
    ws.send_bytes(b"hello\n").await;
    assert!(
        ws.read_until(&mut t, Duration::from_secs(30), |t| t.stdout == b"hello\n")
            .await,
        "{t:?}"
    );
    ws.send_bytes(b"world").await;
    ws.send_json(&json!({"type": "stdin_eof"})).await;
    ws.finish(&mut t, Duration::from_secs(30)).await;
    assert_eq!(t.stdout_text(), "hello\nworld");
    assert_eq!(t.exit.as_ref().unwrap()["exit_code"], 0, "{t:?}");

    // Stdout and stderr frames apart, and the exit code.
    let mut ws = api.websocket(&stream).await;
    ws.send_json(&json!({"shell": "echo o; echo e >&2; exit 9"}))
        .await;
    let mut t = Transcript::default();
    ws.finish(&mut t, Duration::from_secs(30)).await;
    assert_eq!(
        (t.stdout.as_slice(), t.stderr.as_slice()),
        (&b"o\n"[..], &b"e\n"[..]),
        "{t:?}"
    );
    assert_eq!(t.exit.as_ref().unwrap()["exit_code"], 9, "{t:?}");
    let exec_id = t.exec_id.expect("an exec id in started");

    // A PTY of the asked size; a resize changes it.
    let mut ws = api.websocket(&stream).await;
    ws.send_json(&json!({
        "shell": "stty size; while read l; do [ \"$l\" = q ] && exit 5; stty size; done",
        "tty": {"rows": 24, "cols": 80},
        "interactive": true,
    }))
    .await;
    let mut t = Transcript::default();
    assert!(
        ws.read_until(&mut t, Duration::from_secs(30), |t| t
            .stdout_text()
            .contains("24 80"))
            .await,
        "{t:?}"
    );
    ws.send_json(&json!({"type": "resize", "rows": 40, "cols": 120}))
        .await;
    let mut resized = false;
    for _ in 0..50 {
        ws.send_bytes(b"\n").await;
        if ws
            .read_until(&mut t, Duration::from_millis(200), |t| {
                t.stdout_text().contains("40 120")
            })
            .await
        {
            resized = true;
            break;
        }
    }
    assert!(resized, "stty never saw the resize: {:?}", t.stdout_text());
    ws.send_bytes(b"q\n").await;
    ws.finish(&mut t, Duration::from_secs(30)).await;
    assert_eq!(t.exit.as_ref().unwrap()["exit_code"], 5, "{t:?}");
    assert!(t.stderr.is_empty(), "a tty has no separate stderr: {t:?}");

    // A signal to the command's process group.
    let mut ws = api.websocket(&stream).await;
    ws.send_json(&json!({"cmd": ["sleep", "100"]})).await;
    let sleep_id = ws.started().await.expect("an exec id");
    ws.send_json(&json!({"type": "signal", "signal": 15})).await;
    let mut t = Transcript::default();
    ws.finish(&mut t, Duration::from_secs(30)).await;
    let exit = t.exit.expect("an exit event");
    assert_eq!(exit["exit_code"], 143, "{exit}");
    assert_eq!(exit["kind"], "signaled");
    assert_eq!(exit["signal"], 15);

    // A command that cannot start: started (no id), then exit 127.
    let mut ws = api.websocket(&stream).await;
    ws.send_json(&json!({"cmd": ["/no/such/program"]})).await;
    let mut t = Transcript::default();
    ws.finish(&mut t, Duration::from_secs(30)).await;
    assert_eq!(t.exit.as_ref().unwrap()["exit_code"], 127, "{t:?}");

    // A bad body is an error event, not a hang.
    let mut ws = api.websocket(&stream).await;
    ws.send_json(&json!({"cmd": ["true"], "kernel_args": "x"}))
        .await;
    let mut t = Transcript::default();
    ws.finish(&mut t, Duration::from_secs(30)).await;
    let error = t.error.expect("an error event");
    assert_eq!(error["code"], "invalid_request", "{error}");
    assert!(
        error["detail"].as_str().unwrap().contains("kernel_args"),
        "{error}"
    );

    // The sandbox remembers its commands.
    let execs = api
        .get(&format!("/v1/sandboxes/{id}/execs"))
        .await
        .expect(200)
        .json();
    assert!(
        execs
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["exec_id"] == exec_id),
        "{execs}"
    );
    let one = api
        .get(&format!("/v1/sandboxes/{id}/execs/{sleep_id}"))
        .await
        .expect(200)
        .json();
    assert_eq!(one["running"], false, "{one}");
    assert_eq!(one["exit"]["exit_code"], 143, "{one}");
    assert_eq!(one["command"], json!(["sleep", "100"]), "{one}");
    api.get(&format!("/v1/sandboxes/{id}/execs/987654321"))
        .await
        .problem(404, "exec_not_found");
    // Not a WebSocket upgrade.
    api.get(&stream).await.problem(400, "invalid_request");
}

async fn files(api: &Api, id: &str) {
    let files = format!("/v1/sandboxes/{id}/files");
    api.post(
        &format!("{files}/mkdir"),
        &json!({"path": "/tmp/up/deep", "mode": "750"}),
    )
    .await
    .expect(204);

    // A few MiB streamed in chunks, and back byte for byte.
    let data = noise(3 * 1024 * 1024 + 123);
    let up = api
        .send(
            Method::PUT,
            &format!("{files}?path=/tmp/up/deep/blob.bin&mode=600"),
            Some("application/octet-stream"),
            chunked(data.clone(), 64 * 1024),
        )
        .await
        .expect(200)
        .json();
    assert_eq!(up["bytes"], data.len(), "{up}");
    let down = api
        .get(&format!("{files}?path=/tmp/up/deep/blob.bin"))
        .await
        .expect(200);
    assert_eq!(down.content_type(), "application/octet-stream");
    assert_eq!(
        down.headers["x-nova-file-size"].to_str().unwrap(),
        data.len().to_string()
    );
    assert!(down.body == data, "the download differs from the upload");

    let stat = api
        .get(&format!("{files}/stat?path=/tmp/up/deep/blob.bin"))
        .await
        .expect(200)
        .json();
    assert_eq!(stat["kind"], "file", "{stat}");
    assert_eq!(stat["size"], data.len());
    assert_eq!(stat["mode"], 0o600, "{stat}");
    let dir = api
        .get(&format!("{files}/stat?path=/tmp/up/deep"))
        .await
        .expect(200)
        .json();
    assert_eq!(dir["kind"], "dir", "{dir}");
    assert_eq!(dir["mode"].as_u64().unwrap() & 0o777, 0o750, "{dir}");
    let listing = api
        .get(&format!("{files}/list?path=/tmp/up/deep"))
        .await
        .expect(200)
        .json();
    assert_eq!(listing["truncated"], false);
    assert_eq!(
        listing["entries"],
        json!([{"name": "blob.bin", "kind": "file", "size": data.len(), "mode": 0o600}]),
        "{listing}"
    );

    // A small upload with a Content-Length, seen by commands too.
    api.send(
        Method::PUT,
        &format!("{files}?path=/tmp/up/hello.txt"),
        None,
        full("hi there"),
    )
    .await
    .expect(200);
    assert_eq!(
        api.sh(id, "cat /tmp/up/hello.txt").await["stdout"],
        "hi there"
    );

    // Bad paths, missing files, conflicts.
    for path in [
        format!("{files}?path=tmp/x"),
        format!("{files}/stat?path=relative"),
        format!("{files}/list?path=."),
    ] {
        let detail = api.get(&path).await.problem(400, "invalid_path");
        assert!(detail.contains("absolute"), "{detail}");
    }
    api.post(&format!("{files}/mkdir"), &json!({"path": "x/y"}))
        .await
        .problem(400, "invalid_path");
    api.send(Method::PUT, &format!("{files}?path=rel"), None, full("x"))
        .await
        .problem(400, "invalid_path");
    api.send(
        Method::PUT,
        &format!("{files}?path=/tmp/m&mode=999"),
        None,
        full("x"),
    )
    .await
    .problem(400, "invalid_request");
    api.get(&files).await.problem(400, "invalid_request");
    api.get(&format!("{files}?path=/no/such/file"))
        .await
        .problem(404, "file_not_found");
    api.get(&format!("{files}/stat?path=/no/such/file"))
        .await
        .problem(404, "file_not_found");
    api.get(&format!("{files}/list?path=/no/such/dir"))
        .await
        .problem(404, "file_not_found");
    api.delete(&format!("{files}?path=/no/such/file"))
        .await
        .problem(404, "file_not_found");
    api.delete(&format!("{files}?path=/tmp/up"))
        .await
        .problem(409, "file_conflict");

    api.delete(&format!("{files}?path=/tmp/up/deep/blob.bin"))
        .await
        .expect(204);
    api.get(&format!("{files}/stat?path=/tmp/up/deep/blob.bin"))
        .await
        .problem(404, "file_not_found");
    api.delete(&format!("{files}?path=/tmp/up&recursive=true"))
        .await
        .expect(204);
    api.get(&format!("{files}/stat?path=/tmp/up"))
        .await
        .problem(404, "file_not_found");
}

async fn pause_resume_stats_logs(api: &Api, id: &str) {
    let sandbox = format!("/v1/sandboxes/{id}");
    let paused = api
        .send(Method::POST, &format!("{sandbox}/pause"), None, full(""))
        .await
        .expect(200)
        .json();
    assert_eq!(paused["state"], "paused", "{paused}");
    assert_eq!(
        api.get(&sandbox).await.expect(200).json()["state"],
        "paused"
    );
    let listed = api
        .get("/v1/sandboxes?state=paused")
        .await
        .expect(200)
        .json();
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    api.send(Method::POST, &format!("{sandbox}/pause"), None, full(""))
        .await
        .problem(409, "not_running");
    let exec = api
        .post(&format!("{sandbox}/exec"), &json!({"cmd": ["true"]}))
        .await;
    assert_eq!(
        exec.status,
        409,
        "exec in a paused sandbox: {}",
        exec.text()
    );
    let resumed = api
        .send(Method::POST, &format!("{sandbox}/resume"), None, full(""))
        .await
        .expect(200)
        .json();
    assert_eq!(resumed["state"], "running", "{resumed}");
    api.send(Method::POST, &format!("{sandbox}/resume"), None, full(""))
        .await
        .problem(409, "not_running");
    assert_eq!(api.sh(id, "echo back").await["stdout"], "back\n");

    let stats = api
        .get(&format!("{sandbox}/stats"))
        .await
        .expect(200)
        .json();
    assert_eq!(stats["memory_limit_mb"], 256, "{stats}");
    assert!(stats["uptime_ms"].as_u64().unwrap() > 0, "{stats}");
    assert!(stats["vmm_rss_bytes"].as_u64().unwrap() > 0, "{stats}");
    assert!(stats["cpu_usage_us"].as_u64().unwrap() > 0, "{stats}");
    assert!(stats["process_count"].as_u64().unwrap() >= 1, "{stats}");

    let logs = api.get(&format!("{sandbox}/logs")).await.expect(200);
    assert!(
        logs.content_type().starts_with("text/plain"),
        "{:?}",
        logs.headers
    );
    let tail = api
        .get(&format!("{sandbox}/logs?tail_bytes=10"))
        .await
        .expect(200);
    assert!(tail.body.len() <= 10 + "\n--- vmm.log ---\n".len() + 10);
    api.get(&format!("{sandbox}/logs?tail_bytes=0"))
        .await
        .problem(400, "invalid_request");
}
