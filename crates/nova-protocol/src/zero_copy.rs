//! Copy-free handling of the two bulk messages, [`AgentMessage::Data`] and
//! [`ClientMessage::Data`].
//!
//! Generic postcard encoding copies a chunk into the frame buffer, and
//! decoding copies it out again. For the data messages, which carry almost
//! every byte on the wire, these functions produce and parse exactly the same
//! bytes by hand (postcard's format is frozen: a varint variant index, varint
//! integers, and a byte string as a varint length followed by the bytes), so
//! the writer can pass the chunk to `writev` by reference and the reader can
//! hand out a slice of the frame it read. Everything else, and anything
//! unusual, goes through postcard. The `wire_schema` test checks both paths
//! agree.

use bytes::Bytes;

use crate::frame::{self, FrameError};
use crate::messages::{AgentMessage, ClientMessage, StreamKind};

/// Variant index of [`AgentMessage::Data`].
const AGENT_DATA: u64 = 2;
/// Variant index of [`ClientMessage::Data`].
const CLIENT_DATA: u64 = 1;
/// Chunks smaller than this are simply copied.
pub(crate) const SPLICE_MIN: usize = 8 * 1024;

fn push_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn read_varint(buf: &[u8], pos: &mut usize) -> Option<u64> {
    let mut value = 0u64;
    for i in 0..10 {
        let byte = *buf.get(*pos)?;
        *pos += 1;
        value |= u64::from(byte & 0x7f).checked_shl(7 * i)?;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

fn stream_index(stream: StreamKind) -> u64 {
    match stream {
        StreamKind::Stdout => 0,
        StreamKind::Stderr => 1,
        StreamKind::File => 2,
    }
}

/// If `msg` is a large data message: the payload bytes that precede the
/// chunk, and the chunk.
pub(crate) fn agent_data_parts(msg: &AgentMessage) -> Option<(Vec<u8>, Bytes)> {
    match msg {
        AgentMessage::Data { id, stream, data } if data.len() >= SPLICE_MIN => {
            let mut prefix = Vec::with_capacity(24);
            push_varint(&mut prefix, AGENT_DATA);
            push_varint(&mut prefix, *id);
            push_varint(&mut prefix, stream_index(*stream));
            push_varint(&mut prefix, data.len() as u64);
            Some((prefix, data.clone()))
        }
        _ => None,
    }
}

/// Like [`agent_data_parts`], for the host's messages.
pub(crate) fn client_data_parts(msg: &ClientMessage) -> Option<(Vec<u8>, Bytes)> {
    match msg {
        ClientMessage::Data { id, data } if data.len() >= SPLICE_MIN => {
            let mut prefix = Vec::with_capacity(24);
            push_varint(&mut prefix, CLIENT_DATA);
            push_varint(&mut prefix, *id);
            push_varint(&mut prefix, data.len() as u64);
            Some((prefix, data.clone()))
        }
        _ => None,
    }
}

/// Decodes an agent frame; a data chunk is a slice of `payload`, not a copy.
pub fn decode_agent_message(payload: Bytes) -> Result<AgentMessage, FrameError> {
    let fast = || {
        let mut pos = 0;
        if read_varint(&payload, &mut pos)? != AGENT_DATA {
            return None;
        }
        let id = read_varint(&payload, &mut pos)?;
        let stream = match read_varint(&payload, &mut pos)? {
            0 => StreamKind::Stdout,
            1 => StreamKind::Stderr,
            2 => StreamKind::File,
            _ => return None,
        };
        let len = usize::try_from(read_varint(&payload, &mut pos)?).ok()?;
        (payload.len().checked_sub(pos)? == len).then(|| AgentMessage::Data {
            id,
            stream,
            data: payload.slice(pos..),
        })
    };
    match fast() {
        Some(msg) => Ok(msg),
        None => frame::decode(&payload),
    }
}

/// Decodes a host frame; a data chunk is a slice of `payload`, not a copy.
pub fn decode_client_message(payload: Bytes) -> Result<ClientMessage, FrameError> {
    let fast = || {
        let mut pos = 0;
        if read_varint(&payload, &mut pos)? != CLIENT_DATA {
            return None;
        }
        let id = read_varint(&payload, &mut pos)?;
        let len = usize::try_from(read_varint(&payload, &mut pos)?).ok()?;
        (payload.len().checked_sub(pos)? == len).then(|| ClientMessage::Data {
            id,
            data: payload.slice(pos..),
        })
    };
    match fast() {
        Some(msg) => Ok(msg),
        None => frame::decode(&payload),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn payload_of(frame: &[u8]) -> Bytes {
        Bytes::copy_from_slice(&frame[frame::HEADER_LEN..])
    }

    #[test]
    fn hand_encoding_matches_postcard() {
        for len in [SPLICE_MIN, 70_000, 1 << 20] {
            for id in [0u64, 1, 127, 128, 300, u64::MAX] {
                for stream in [StreamKind::Stdout, StreamKind::Stderr, StreamKind::File] {
                    let data = Bytes::from(vec![0xa5; len]);
                    let msg = AgentMessage::Data {
                        id,
                        stream,
                        data: data.clone(),
                    };
                    let generic = frame::encode(&msg).unwrap();
                    let (prefix, chunk) = agent_data_parts(&msg).unwrap();
                    let mut manual = prefix;
                    manual.extend_from_slice(&chunk);
                    assert_eq!(manual, generic[frame::HEADER_LEN..]);
                    assert_eq!(decode_agent_message(payload_of(&generic)).unwrap(), msg);

                    let msg = ClientMessage::Data { id, data };
                    let generic = frame::encode(&msg).unwrap();
                    let (prefix, chunk) = client_data_parts(&msg).unwrap();
                    let mut manual = prefix;
                    manual.extend_from_slice(&chunk);
                    assert_eq!(manual, generic[frame::HEADER_LEN..]);
                    assert_eq!(decode_client_message(payload_of(&generic)).unwrap(), msg);
                }
            }
        }
    }

    #[test]
    fn small_and_other_messages_take_the_generic_path() {
        let small = AgentMessage::Data {
            id: 1,
            stream: StreamKind::Stdout,
            data: Bytes::from_static(b"hi"),
        };
        assert!(agent_data_parts(&small).is_none());
        let frame = frame::encode(&small).unwrap();
        assert_eq!(decode_agent_message(payload_of(&frame)).unwrap(), small);
        let credit = AgentMessage::Credit { id: 3, bytes: 5 };
        let frame = frame::encode(&credit).unwrap();
        assert_eq!(decode_agent_message(payload_of(&frame)).unwrap(), credit);
    }

    #[test]
    fn malformed_data_frames_are_errors() {
        // Length says 10 bytes, 2 present; bad stream index; endless varint.
        for bad in [
            &[2u8, 1, 0, 10, 1, 2][..],
            &[2, 1, 9, 1, 0],
            &[
                2, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            ],
        ] {
            assert!(
                decode_agent_message(Bytes::copy_from_slice(bad)).is_err(),
                "{bad:?}"
            );
        }
        assert!(decode_client_message(Bytes::from_static(&[1, 1, 10, 0])).is_err());
    }
}
