//! Streamed exec and attach: the daemon's WebSocket protocol (see
//! `nova_server::api::exec`) as typed frames.
//!
//! ```text
//! Client::exec_stream(id, body)   upgrade GET .../exec/stream, send the body
//! Client::attach(id, exec_id)     upgrade GET .../execs/{exec_id}/stream
//!   ExecSocket::next()   -> Frame::{Started, Stdout, Stderr, Exit}
//!                           (an `error` event is ClientError::Problem)
//!   ExecSocket::stdin() / stdin_eof() / signal() / resize()
//! ```
//!
//! A handshake the daemon refuses (no such sandbox, a bad token) carries a
//! problem document, which becomes [`ClientError::Problem`] as for any call.

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE};
use nova_server::api::exec::{
    ClientControl, ExecBody, ExecExit, STDERR_TAG, STDOUT_TAG, ServerEvent,
};
use nova_server::problem::{PROBLEM_JSON, Problem};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};

use super::{Client, ClientError, Conn, Endpoint, sandbox_path};

/// One thing the daemon said on a streamed exec.
#[derive(Debug, PartialEq)]
pub(crate) enum Frame {
    /// The command started (or the stream attached to it).
    Started {
        /// Its id in the sandbox, for `nova attach`.
        exec_id: Option<u64>,
    },
    /// Bytes of stdout (of the terminal, with a tty).
    Stdout(Bytes),
    /// Bytes of stderr.
    Stderr(Bytes),
    /// The command ended; nothing follows.
    Exit(ExecExit),
}

/// A streamed exec, upgraded.
pub(crate) struct ExecSocket {
    ws: WebSocketStream<Box<dyn Conn>>,
}

impl std::fmt::Debug for ExecSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecSocket").finish_non_exhaustive()
    }
}

fn ws_error(e: tungstenite::Error) -> ClientError {
    // A refused upgrade: the daemon's problem, when it sent one.
    if let tungstenite::Error::Http(response) = &e {
        let is_problem = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with(PROBLEM_JSON));
        if is_problem
            && let Some(body) = response.body()
            && let Ok(problem) = serde_json::from_slice::<Problem>(body)
        {
            return ClientError::Problem(Box::new(problem));
        }
    }
    ClientError::WebSocket(Box::new(e))
}

impl Client {
    /// Upgrades `path` to a WebSocket.
    async fn websocket(&self, path: &str) -> Result<ExecSocket, ClientError> {
        let conn = self.connect().await?;
        let host = match self.endpoint() {
            Endpoint::Unix(_) => "localhost",
            Endpoint::Tcp(authority) => authority.as_str(),
        };
        let mut request = format!("ws://{host}{path}")
            .into_client_request()
            .map_err(ws_error)?;
        if let Some(token) = &self.token {
            let value = format!("Bearer {token}")
                .parse()
                .map_err(|e: hyper::header::InvalidHeaderValue| ClientError::Request(e.into()))?;
            request.headers_mut().insert(AUTHORIZATION, value);
        }
        let (ws, _response) = tokio_tungstenite::client_async(request, conn)
            .await
            .map_err(ws_error)?;
        Ok(ExecSocket { ws })
    }

    /// Starts `body` in sandbox `id`, streamed.
    pub(crate) async fn exec_stream(
        &self,
        id: &str,
        body: &ExecBody,
    ) -> Result<ExecSocket, ClientError> {
        let mut socket = self.websocket(&sandbox_path(id, "/exec/stream")).await?;
        let json = serde_json::to_string(body).map_err(ClientError::Decode)?;
        socket.send(Message::text(json)).await?;
        Ok(socket)
    }

    /// Attaches to command `exec_id` of sandbox `id`: its held output, then
    /// live output, then its exit.
    pub(crate) async fn attach(&self, id: &str, exec_id: u64) -> Result<ExecSocket, ClientError> {
        self.websocket(&sandbox_path(id, &format!("/execs/{exec_id}/stream")))
            .await
    }
}

impl ExecSocket {
    async fn send(&mut self, message: Message) -> Result<(), ClientError> {
        self.ws
            .send(message)
            .await
            .map_err(|e| ClientError::WebSocket(Box::new(e)))
    }

    async fn control(&mut self, control: &ClientControl) -> Result<(), ClientError> {
        let json = serde_json::to_string(control).map_err(ClientError::Decode)?;
        self.send(Message::text(json)).await
    }

    /// The next frame. The stream ending before an exit is an error.
    /// Cancel-safe (the socket keeps a partly read message).
    pub(crate) async fn next(&mut self) -> Result<Frame, ClientError> {
        loop {
            let message = match self.ws.next().await {
                Some(Ok(message)) => message,
                Some(Err(e)) => return Err(ClientError::WebSocket(Box::new(e))),
                None => return Err(ended()),
            };
            match message {
                Message::Binary(bytes) => match bytes.first() {
                    Some(&STDOUT_TAG) => return Ok(Frame::Stdout(bytes.slice(1..))),
                    Some(&STDERR_TAG) => return Ok(Frame::Stderr(bytes.slice(1..))),
                    _ => tracing::debug!("ignoring a binary frame with an unknown tag"),
                },
                Message::Text(text) => {
                    match serde_json::from_str::<ServerEvent>(&text).map_err(ClientError::Decode)? {
                        ServerEvent::Started { exec_id } => return Ok(Frame::Started { exec_id }),
                        ServerEvent::Exit(exit) => return Ok(Frame::Exit(exit)),
                        ServerEvent::Error(problem) => {
                            return Err(ClientError::Problem(Box::new(problem)));
                        }
                    }
                }
                Message::Close(_) => return Err(ended()),
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
            }
        }
    }

    /// Writes `bytes` to the command's stdin (an interactive exec).
    pub(crate) async fn stdin(&mut self, bytes: Vec<u8>) -> Result<(), ClientError> {
        self.send(Message::binary(bytes)).await
    }

    /// Closes the command's stdin.
    pub(crate) async fn stdin_eof(&mut self) -> Result<(), ClientError> {
        self.control(&ClientControl::StdinEof).await
    }

    /// Sends `signal` to the command's process group.
    pub(crate) async fn signal(&mut self, signal: i32) -> Result<(), ClientError> {
        self.control(&ClientControl::Signal { signal }).await
    }

    /// Resizes the command's terminal.
    pub(crate) async fn resize(&mut self, rows: u16, cols: u16) -> Result<(), ClientError> {
        self.control(&ClientControl::Resize { rows, cols }).await
    }

    /// Closes the socket (which kills a command still running).
    pub(crate) async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}

fn ended() -> ClientError {
    ClientError::StreamEnded
}
