//! The session's front and routing, driven from a byte stream without
//! acting on any request, for the fuzz target `agent_dispatch`
//! (`fuzz/fuzz_targets/agent_dispatch.rs`): no command runs, no file is
//! touched, nothing is written back.
//!
//! It reads a host's stream as [`crate::session`] does: the handshake (a
//! `Hello` with a version in common, else the stream is refused), then
//! every frame through [`session::decode_message`] (a new host's `Hello`
//! starts a new session; anything malformed ends the stream, as the
//! protocol error does) and [`session::route`], against a table of the
//! requests in flight as the session keeps it: a request that takes
//! follow-up messages ([`session::takes_inbox`]) stays in it until its
//! session ends, the others end at once.

use std::collections::HashMap;

use nova_protocol::frame::{FrameReader, decode};
use nova_protocol::handshake::negotiate;
use nova_protocol::{HELLO_MAGIC, Hello, SUPPORTED_VERSIONS};
use tokio::io::AsyncRead;

use crate::session::{self, MAX_IN_FLIGHT, Route, Undecodable};

/// What one stream came to.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Sessions that passed the handshake.
    pub sessions: usize,
    /// Requests started.
    pub started: usize,
    /// Follow-up messages handed to a request.
    pub forwarded: usize,
    /// Requests refused as over the in-flight limit.
    pub busy: usize,
    /// Why the stream ended early (a refused handshake, a malformed frame
    /// or message, a request id reused), if it did.
    pub ended: Option<String>,
}

/// Reads `stream` to its end (or to the first error) as the agent's
/// session would, and says what it came to.
///
/// # Panics
///
/// When the routing breaks one of its promises: a request started under an
/// id already in flight, more than [`MAX_IN_FLIGHT`] requests in flight, a
/// request refused as busy below the limit, a message that is a `Hello`
/// and a request at once.
pub async fn route_stream<R: AsyncRead + Unpin>(stream: R) -> Summary {
    let mut reader = FrameReader::new(stream);
    let mut summary = Summary::default();
    let mut hello = match reader.read_frame().await {
        Ok(Some(payload)) => payload,
        Ok(None) => return summary,
        Err(e) => {
            summary.ended = Some(format!("malformed first frame: {e}"));
            return summary;
        }
    };
    loop {
        let accepted = decode::<Hello>(&hello)
            .ok()
            .filter(|h| h.magic == HELLO_MAGIC)
            .and_then(|h| negotiate(SUPPORTED_VERSIONS, &h.versions));
        if accepted.is_none() {
            summary.ended = Some("handshake refused".to_owned());
            return summary;
        }
        summary.sessions += 1;
        let mut in_flight: HashMap<u64, ()> = HashMap::new();
        loop {
            let payload = match reader.read_frame().await {
                Ok(Some(payload)) => payload,
                Ok(None) => return summary,
                Err(e) => {
                    summary.ended = Some(format!("malformed frame: {e}"));
                    return summary;
                }
            };
            let msg = match session::decode_message(payload) {
                Ok(msg) => msg,
                Err(Undecodable::NewHost(next)) => {
                    assert!(
                        nova_protocol::zero_copy::decode_client_message(next.clone()).is_err(),
                        "a payload is both a message and a Hello"
                    );
                    hello = next;
                    break;
                }
                Err(Undecodable::Malformed(why)) => {
                    summary.ended = Some(why);
                    return summary;
                }
            };
            let full = in_flight.len() >= MAX_IN_FLIGHT;
            match session::route(msg, &in_flight) {
                Ok(Route::Start { id, request }) => {
                    assert!(!full, "request {id} started over the limit");
                    summary.started += 1;
                    if session::takes_inbox(&request) {
                        assert!(
                            in_flight.insert(id, ()).is_none(),
                            "request {id} started while in flight"
                        );
                    }
                }
                Ok(Route::Forward { .. }) => summary.forwarded += 1,
                Ok(Route::Busy { id }) => {
                    assert!(full, "request {id} refused as busy below the limit");
                    summary.busy += 1;
                }
                Err(why) => {
                    summary.ended = Some(why);
                    return summary;
                }
            }
            assert!(in_flight.len() <= MAX_IN_FLIGHT);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nova_protocol::frame;
    use nova_protocol::{ClientMessage, Request};

    fn stream(messages: &[Vec<u8>]) -> Vec<u8> {
        messages.concat()
    }

    fn hello() -> Vec<u8> {
        frame::encode(&Hello {
            magic: HELLO_MAGIC,
            versions: SUPPORTED_VERSIONS.to_vec(),
            client: "fuzzing test".into(),
        })
        .unwrap()
    }

    fn request(id: u64, request: Request) -> Vec<u8> {
        frame::encode(&ClientMessage::Request { id, request }).unwrap()
    }

    #[tokio::test]
    async fn requests_are_routed_and_a_reused_id_ends_the_session() {
        let input = stream(&[
            hello(),
            request(1, Request::Ping),
            request(1, Request::Ping),
            request(
                2,
                Request::ReadFile {
                    path: "/etc/hostname".into(),
                },
            ),
            request(
                2,
                Request::ReadFile {
                    path: "/etc/hostname".into(),
                },
            ),
        ]);
        let summary = route_stream(input.as_slice()).await;
        assert_eq!(summary.sessions, 1);
        assert_eq!(summary.started, 3, "{summary:?}");
        assert_eq!(
            summary.ended.as_deref(),
            Some("request id 2 is already in flight")
        );
    }

    #[tokio::test]
    async fn a_new_hosts_hello_starts_a_new_session_and_garbage_ends_it() {
        let input = stream(&[
            hello(),
            request(7, Request::ReadFile { path: "/x".into() }),
            hello(),
            request(7, Request::ReadFile { path: "/x".into() }),
            frame::encode(&"not a message").unwrap(),
        ]);
        let summary = route_stream(input.as_slice()).await;
        assert_eq!(summary.sessions, 2, "{summary:?}");
        assert_eq!(summary.started, 2, "{summary:?}");
        assert!(
            summary
                .ended
                .as_deref()
                .is_some_and(|e| e.starts_with("unknown message type")),
            "{summary:?}"
        );
    }

    #[tokio::test]
    async fn a_stream_without_a_hello_is_refused() {
        let summary = route_stream(request(1, Request::Ping).as_slice()).await;
        assert_eq!(summary.sessions, 0);
        assert_eq!(summary.ended.as_deref(), Some("handshake refused"));
    }
}
