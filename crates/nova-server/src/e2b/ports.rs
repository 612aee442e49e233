//! Guest ports other than envd's: an HTTP request for `<port>-<id>.<domain>`
//! (or `E2b-Sandbox-Port: <port>`) is proxied to `127.0.0.1:<port>` in the
//! guest, which is how E2B users reach a server they started in a sandbox
//! (`sandbox.get_host(port)`).
//!
//! The path does not need the sandbox to have a network: each request runs
//! a relay in the guest (busybox `nc`, else `python3`, else bash's
//! `/dev/tcp`) through the daemon's exec channel, and speaks HTTP/1.1 to it:
//!
//! ```text
//! client --HTTP--> E2B listener --hyper client--> duplex <--pump--> exec stream (stdin/stdout)
//!                                                                     `nc 127.0.0.1 PORT` in the guest
//! ```
//!
//! One relay per request (`Connection: close`), so this suits requests,
//! not throughput. WebSocket upgrades are not proxied. As in E2B (public
//! traffic), no token is asked: guest ports are reachable by whoever can
//! reach the listener and knows the sandbox id.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;
use nova_core::exec::{Command, ExecEvent, ExecRequest};
use nova_core::id::SandboxId;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::daemon::Daemon;

/// Bytes buffered between the hyper client and the relay.
const DUPLEX_BUFFER: usize = 64 * 1024;

/// The guest command that connects its stdin/stdout to `127.0.0.1:port`.
pub fn relay_script(port: u16) -> String {
    format!(
        r#"if command -v nc >/dev/null 2>&1; then exec nc 127.0.0.1 {port}
elif command -v python3 >/dev/null 2>&1; then exec python3 -c '
import os, socket, sys, threading
s = socket.create_connection(("127.0.0.1", {port}))
def up():
    while True:
        d = os.read(0, 65536)
        if not d:
            s.shutdown(socket.SHUT_WR)
            return
        s.sendall(d)
threading.Thread(target=up, daemon=True).start()
while True:
    d = s.recv(65536)
    if not d:
        break
    os.write(1, d)
'
else exec bash -c 'exec 3<>/dev/tcp/127.0.0.1/{port} && {{ cat <&3 & exec cat >&3; }}'
fi"#
    )
}

fn not_open(port: u16, id: &SandboxId, why: &str) -> Response {
    let body = serde_json::json!({
        "code": 502,
        "message": format!("port is not open: nothing answered HTTP on port {port} in sandbox {id} ({why})"),
    });
    (StatusCode::BAD_GATEWAY, axum::Json(body)).into_response()
}

/// Proxies `request` to `port` in the guest of `id`.
pub async fn proxy(
    daemon: &Arc<Daemon>,
    id: &SandboxId,
    port: u16,
    mut request: Request,
) -> Response {
    let exec = ExecRequest {
        command: Command::Shell(relay_script(port)),
        env: Default::default(),
        cwd: None,
        stdin: None,
        stream_stdin: true,
        timeout: None,
        max_output: None,
        pty: None,
        // As root: the relay must reach any port the guest listens on.
        user: Some("0".to_owned()),
    };
    let mut stream = match daemon.hypervisor().exec_stream(id, exec).await {
        Ok(s) => s,
        Err(e) => return not_open(port, id, &e.to_string()),
    };
    let Some(stdin) = stream.take_stdin() else {
        return not_open(port, id, "the relay has no stdin");
    };
    let (ours, theirs) = tokio::io::duplex(DUPLEX_BUFFER);
    let (mut from_client, mut to_client) = tokio::io::split(theirs);
    // The pump owns the exec stream: when the client side closes, it ends
    // and dropping the stream kills the relay.
    tokio::spawn(async move {
        let mut stdin = Some(stdin);
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            tokio::select! {
                n = from_client.read(&mut buf) => match n {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let Some(w) = &stdin else { continue };
                        if w.write(buf[..n].to_vec()).await.is_err() {
                            stdin = None;
                        }
                    }
                },
                event = stream.next() => match event {
                    Some(ExecEvent::Stdout(bytes)) => {
                        if to_client.write_all(&bytes).await.is_err() {
                            break;
                        }
                    }
                    Some(ExecEvent::Stderr(_)) => {}
                    Some(ExecEvent::Exited(_)) | None => {
                        let _ = to_client.shutdown().await;
                        break;
                    }
                },
            }
        }
    });
    let (mut sender, connection) =
        match hyper::client::conn::http1::handshake::<_, Body>(TokioIo::new(ours)).await {
            Ok(pair) => pair,
            Err(e) => return not_open(port, id, &e.to_string()),
        };
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let headers = request.headers_mut();
    headers.remove("e2b-sandbox-id");
    headers.remove("e2b-sandbox-port");
    headers.remove("x-access-token");
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    match sender.send_request(request).await {
        Ok(response) => response.map(Body::new),
        Err(e) => not_open(port, id, &e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_relay_names_the_port_everywhere() {
        let s = relay_script(8080);
        assert!(s.contains("nc 127.0.0.1 8080"));
        assert!(s.contains(r#"("127.0.0.1", 8080)"#));
        assert!(s.contains("/dev/tcp/127.0.0.1/8080"));
    }
}
