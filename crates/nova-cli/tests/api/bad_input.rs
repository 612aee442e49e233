//! What a caller gets wrong is a 4xx `application/problem+json` that names
//! it, never a 5xx; the operator's policy is enforced (memory, templates,
//! the number of sandboxes); over TCP every request needs the token.

use hyper::Method;
use serde_json::json;

use crate::harness::{Daemon, DaemonOptions, full};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_a_4xx_problem_and_the_policy_holds() {
    let policy = "[limits]\nmax_sandboxes = 1\nmax_memory_mb = 512\n\n\
                  [templates]\nallowed = [\"minimal\"]\ndefault = \"minimal\"\n\n\
                  [network]\ndefault = false\n"
        .to_owned();
    let Some(daemon) = Daemon::start(
        "bad_input_is_a_4xx_problem_and_the_policy_holds",
        DaemonOptions { policy, tcp: true },
    )
    .await
    else {
        return;
    };
    let api = daemon.api();

    // Malformed bodies and unknown fields name what is wrong.
    api.post_raw("/v1/sandboxes", "{\"template\": ")
        .await
        .problem(400, "invalid_request");
    api.post_raw("/v1/sandboxes", "[1, 2]")
        .await
        .problem(400, "invalid_request");
    api.post_raw("/v1/sandboxes", "{\"memory_mb\": \"lots\"}")
        .await
        .problem(400, "invalid_request");
    for (body, field) in [
        (json!({"kernel_args": "init=/bin/sh"}), "kernel_args"),
        (json!({"rootfs_path": "/etc/shadow"}), "rootfs_path"),
        (
            json!({"volumes": [{"name": "data", "path": "/etc"}]}),
            "path",
        ),
        (
            json!({"ports": [{"host_port": 8080, "guest_port": 80, "host_ip": "0.0.0.0"}]}),
            "host_ip",
        ),
    ] {
        let detail = api
            .post("/v1/sandboxes", &body)
            .await
            .problem(400, "invalid_request");
        assert!(detail.contains(field), "{body}: {detail}");
    }
    // A host path as a volume name is just a name the policy does not offer.
    let detail = api
        .post(
            "/v1/sandboxes",
            &json!({"volumes": [{"name": "/etc/shadow"}]}),
        )
        .await
        .problem(403, "forbidden");
    assert!(detail.contains("/etc/shadow"), "{detail}");

    // The policy's limits.
    let detail = api
        .post(
            "/v1/sandboxes",
            &json!({"memory_mb": 4096, "network": false}),
        )
        .await
        .problem(400, "invalid_config");
    assert!(
        detail.contains("memory_mb") && detail.contains("512"),
        "{detail}"
    );
    api.post("/v1/sandboxes", &json!({"vcpus": 64, "network": false}))
        .await
        .problem(400, "invalid_config");
    api.post(
        "/v1/sandboxes",
        &json!({"timeout_secs": 0, "network": false}),
    )
    .await
    .problem(400, "invalid_config");
    api.post(
        "/v1/sandboxes",
        &json!({"labels": {"nova.pool": "x"}, "network": false}),
    )
    .await
    .problem(400, "invalid_config");
    api.post(
        "/v1/sandboxes",
        &json!({"labels": {"bad key!": "x"}, "network": false}),
    )
    .await
    .problem(400, "invalid_config");
    let detail = api
        .post(
            "/v1/sandboxes",
            &json!({"template": "python", "network": false}),
        )
        .await
        .problem(403, "forbidden");
    assert!(detail.contains("python"), "{detail}");

    // Transport-level mistakes.
    api.send(Method::POST, "/v1/sandboxes", None, full("{}"))
        .await
        .problem(415, "unsupported_media_type");
    api.send(
        Method::POST,
        "/v1/sandboxes",
        Some("text/plain"),
        full("{}"),
    )
    .await
    .problem(415, "unsupported_media_type");
    let huge = format!("{{\"labels\": {{\"a\": \"{}\"}}}}", "x".repeat(2 << 20));
    api.post_early_answer("/v1/sandboxes", huge.into_bytes())
        .await
        .problem(413, "payload_too_large");
    api.send(Method::PUT, "/v1/sandboxes", None, full(""))
        .await
        .problem(405, "method_not_allowed");
    api.send(Method::DELETE, "/v1/health", None, full(""))
        .await
        .problem(405, "method_not_allowed");
    api.get("/v1/sandboxes/sb-0000000000000/stop")
        .await
        .problem(405, "method_not_allowed");
    api.get("/v1/nothing-here").await.problem(404, "not_found");
    api.get("/").await.problem(404, "not_found");
    api.get("/v1/sandboxes?colour=red")
        .await
        .problem(400, "invalid_request");
    for path in [
        "/v1/sandboxes/sb-0000000000000",
        "/v1/sandboxes/not-an-id",
        "/v1/sandboxes/..%2F..%2Fetc",
        "/v1/sandboxes/sb-0000000000000/stats",
        "/v1/sandboxes/sb-0000000000000/logs",
        "/v1/sandboxes/sb-0000000000000/execs",
        "/v1/sandboxes/sb-0000000000000/files/stat?path=/",
    ] {
        api.get(path).await.problem(404, "sandbox_not_found");
    }
    api.get("/v1/sandboxes/sb-0000000000000/execs/not-a-number")
        .await
        .problem(400, "invalid_request");

    // One sandbox is this daemon's limit.
    let sb = api.create(json!({})).await;
    let id = sb["id"].as_str().unwrap().to_owned();
    let detail = api
        .post("/v1/sandboxes", &json!({"network": false}))
        .await
        .problem(429, "quota_exceeded");
    assert!(detail.contains("max_sandboxes"), "{detail}");
    api.send(
        Method::POST,
        &format!("/v1/sandboxes/{id}/stop?force=maybe"),
        None,
        full(""),
    )
    .await
    .problem(400, "invalid_request");
    api.post(
        &format!("/v1/sandboxes/{id}/timeout"),
        &json!({"timeout_secs": -1}),
    )
    .await
    .problem(400, "invalid_request");
    api.post(
        &format!("/v1/sandboxes/{id}/timeout"),
        &json!({"timeout_secs": 1_000_000_000}),
    )
    .await
    .problem(400, "invalid_config");
    api.post(
        &format!("/v1/sandboxes/{id}/files/mkdir"),
        &json!({"path": "/tmp/x", "mode": "rwx"}),
    )
    .await
    .problem(400, "invalid_request");

    // TCP: the token or nothing.
    let detail = daemon
        .tcp_api(None)
        .get("/v1/health")
        .await
        .problem(401, "unauthorized");
    assert!(
        !detail.contains(&daemon.token()),
        "the token leaks: {detail}"
    );
    daemon
        .tcp_api(Some("not-the-token"))
        .get("/v1/sandboxes")
        .await
        .problem(401, "unauthorized");
    daemon
        .tcp_api(None)
        .post("/v1/sandboxes", &json!({}))
        .await
        .problem(401, "unauthorized");
    daemon
        .tcp_api(None)
        .get("/metrics")
        .await
        .problem(401, "unauthorized");
    let tcp = daemon.tcp_api(Some(&daemon.token()));
    assert_eq!(
        tcp.get("/v1/health").await.expect(200).json()["status"],
        "ok"
    );
    let listed = tcp.get("/v1/sandboxes").await.expect(200).json();
    assert_eq!(listed[0]["id"], id.as_str(), "{listed}");
    assert_eq!(tcp.sh(&id, "echo over tcp").await["stdout"], "over tcp\n");

    // Deleting frees the slot.
    api.delete(&format!("/v1/sandboxes/{id}")).await.expect(204);
    let again = api.create(json!({})).await;
    api.delete(&format!("/v1/sandboxes/{}", again["id"].as_str().unwrap()))
        .await
        .expect(204);
}
