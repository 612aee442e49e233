//! The agent's side of a connection, up to dispatch: the `Hello`, then a
//! stream of `ClientMessage` frames, read and decoded as
//! `nova-agent/src/session.rs` does (its `FrameReader`, `decode::<Hello>`
//! and `negotiate`, `zero_copy::decode_client_message`, and the check that
//! tells a new host's `Hello` from a message).
//!
//! Dispatch itself is not fuzzed: `nova-agent` is a binary crate (no library
//! to link), and what it dispatches to runs commands and writes files, which
//! a fuzzer must not do on the machine it runs on. Everything the session
//! does with a frame before it acts on the request is here.
//!
//! Properties: nothing panics; every message that decodes re-encodes and
//! decodes to the same bytes; no payload is both a message and a `Hello` (the
//! session's `End::NewHost` relies on that).
#![no_main]

mod common;

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use nova_protocol::frame::{self, FrameReader};
use nova_protocol::handshake::negotiate;
use nova_protocol::zero_copy::decode_client_message;
use nova_protocol::{ClientMessage, HELLO_MAGIC, Hello, SUPPORTED_VERSIONS};

fuzz_target!(|data: &[u8]| {
    common::runtime().block_on(async move {
        let mut reader = FrameReader::new(common::ChunkedReader::new(data));
        let mut first = true;
        while let Ok(Some(payload)) = reader.read_frame().await {
            if first {
                first = false;
                if let Ok(hello) = frame::decode::<Hello>(&payload)
                    && hello.magic == HELLO_MAGIC
                {
                    let _ = negotiate(SUPPORTED_VERSIONS, &hello.versions);
                }
                continue;
            }
            match decode_client_message(payload.clone()) {
                Ok(msg) => {
                    assert!(
                        !is_hello(&payload),
                        "a payload is both a message and a Hello"
                    );
                    let _ = msg.request_id();
                    round_trip(&msg);
                }
                Err(_) => {
                    let _ = is_hello(&payload);
                }
            }
        }
    });
});

/// The agent session's test for a new host's `Hello` (session.rs `is_hello`).
fn is_hello(payload: &[u8]) -> bool {
    payload.starts_with(&HELLO_MAGIC) && frame::decode::<Hello>(payload).is_ok()
}

fn round_trip(msg: &ClientMessage) {
    let Ok(again) = frame::encode(msg) else {
        return;
    };
    let back = decode_client_message(Bytes::copy_from_slice(&again[frame::HEADER_LEN..]))
        .expect("a re-encoded message decodes");
    // Compared as bytes: a float (guest stats) may be NaN, which is not
    // equal to itself.
    let twice = frame::encode(&back).expect("a decoded message re-encodes");
    assert_eq!(twice, again, "{msg:?} does not survive a round trip");
}
