//! The agent's own session code from a host's byte stream to the routing
//! of each request: `nova_agent::fuzzing::route_stream` runs the handshake
//! check, `session::decode_message` (a new host's `Hello` told from a
//! message, the protocol error for anything else) and `session::route` (a
//! request id reused while in flight, the in-flight limit, follow-ups
//! handed to their request) against the table of requests in flight the
//! session keeps, without acting on any request: no command runs and no
//! file is touched on the fuzzing machine.
//!
//! Properties (asserted inside `route_stream`): nothing panics; no request
//! starts under an id in flight; the table never passes the limit and a
//! request is refused as busy only at it; no payload is both a message and
//! a `Hello`. Unlike `agent_request_frames`, which mirrors the session's
//! front with the protocol crate, this links the agent's code itself.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    common::runtime().block_on(async move {
        let summary = tokio::time::timeout(
            common::HANG,
            nova_agent::fuzzing::route_stream(common::ChunkedReader::new(data)),
        )
        .await
        .expect("routing a finite stream hung");
        assert!(summary.sessions <= data.len(), "{summary:?}");
    });
});
