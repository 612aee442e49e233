//! The host client's decoding of what an agent sends: the handshake reply,
//! then a stream of `AgentMessage` frames, through the same `FrameReader`
//! and decoders `AgentClient` uses, with the stream cut into reads of
//! input-chosen size.
//!
//! Properties: nothing panics; every message that decodes re-encodes and
//! decodes to the same bytes (the zero-copy data path and postcard agree).
#![no_main]

mod common;

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use nova_protocol::frame::{self, FrameReader};
use nova_protocol::zero_copy::decode_agent_message;
use nova_protocol::{AgentMessage, HelloReply};

fuzz_target!(|data: &[u8]| {
    common::runtime().block_on(async move {
        let mut reader = FrameReader::new(common::ChunkedReader::new(data));
        let mut first = true;
        while let Ok(Some(payload)) = reader.read_frame().await {
            if first {
                first = false;
                if let Ok(reply) = frame::decode::<HelloReply>(&payload) {
                    let again = frame::encode(&reply).expect("a decoded reply re-encodes");
                    let back: HelloReply = frame::decode(&again[frame::HEADER_LEN..])
                        .expect("a re-encoded reply decodes");
                    let twice = frame::encode(&back).expect("a decoded reply re-encodes");
                    assert_eq!(twice, again, "{reply:?} does not survive a round trip");
                }
                continue;
            }
            if let Ok(msg) = decode_agent_message(payload) {
                round_trip(&msg);
            }
        }
    });
});

fn round_trip(msg: &AgentMessage) {
    // Too large to re-encode is fine (the decoder accepts what fits a frame).
    let Ok(again) = frame::encode(msg) else {
        return;
    };
    let back = decode_agent_message(Bytes::copy_from_slice(&again[frame::HEADER_LEN..]))
        .expect("a re-encoded message decodes");
    // Compared as bytes: a float (guest stats) may be NaN, which is not
    // equal to itself.
    let twice = frame::encode(&back).expect("a decoded message re-encodes");
    assert_eq!(twice, again, "{msg:?} does not survive a round trip");
}
