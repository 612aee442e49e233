//! The binary protobuf codec for envd's messages, written by hand for the
//! few messages served (no build script, no `protoc`): requests decode,
//! responses encode. Field numbers are those of
//! `proto/e2b/{process,filesystem}.proto`; the tests pin them with bytes
//! worked out from the protobuf encoding rules.
//!
//! Decoding skips unknown fields of any wire type and refuses truncated or
//! malformed input; every length is checked against what is left.

use std::collections::BTreeMap;

use crate::e2b::wire::{
    B64, DataEvent, Empty, EndEvent, EntryInfo, EntryResponse, EnumValue, EventResponse,
    ListDirRequest, ListDirResponse, ListResponse, MoveRequest, PathRequest, ProcessConfig,
    ProcessEvent, ProcessInfo, ProcessInput, ProcessSelector, Pty, PtySize, SelectRequest,
    SendInputRequest, SendSignalRequest, StartRequest, UpdateRequest,
};

/// A protobuf message that can be read.
pub trait Decode: Sized + Default {
    /// Applies field `field` (already read) to `self`.
    fn field(&mut self, field: u32, value: Value<'_>) -> Result<(), DecodeError>;

    /// Decodes a whole message.
    fn decode(mut buf: &[u8]) -> Result<Self, DecodeError> {
        let mut m = Self::default();
        while !buf.is_empty() {
            let key = varint(&mut buf)?;
            let field =
                u32::try_from(key >> 3).map_err(|_| DecodeError("field number out of range"))?;
            let value = match key & 7 {
                0 => Value::Varint(varint(&mut buf)?),
                1 => Value::Fixed(take(&mut buf, 8)?),
                2 => {
                    let len = usize::try_from(varint(&mut buf)?)
                        .map_err(|_| DecodeError("length out of range"))?;
                    Value::Bytes(take(&mut buf, len)?)
                }
                5 => Value::Fixed(take(&mut buf, 4)?),
                _ => return Err(DecodeError("unsupported wire type (groups)")),
            };
            if field == 0 {
                return Err(DecodeError("field number 0"));
            }
            m.field(field, value)?;
        }
        Ok(m)
    }
}

/// A protobuf message that can be written.
pub trait Encode {
    /// Appends the message's fields to `out`.
    fn encode(&self, out: &mut Vec<u8>);

    /// The message's bytes.
    fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(&mut out);
        out
    }
}

/// Malformed protobuf input.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("bad protobuf message: {0}")]
pub struct DecodeError(&'static str);

/// A field's value as read.
#[derive(Clone, Copy, Debug)]
pub enum Value<'a> {
    /// Wire type 0.
    Varint(u64),
    /// Wire type 2.
    Bytes(&'a [u8]),
    /// Wire types 1 and 5 (never used by these messages; skipped).
    Fixed(&'a [u8]),
}

impl<'a> Value<'a> {
    pub(crate) fn u64(self) -> Result<u64, DecodeError> {
        match self {
            Value::Varint(v) => Ok(v),
            _ => Err(DecodeError("expected a varint")),
        }
    }
    pub(crate) fn u32(self) -> Result<u32, DecodeError> {
        // Out-of-range varints are truncated, as protobuf does for uint32.
        Ok(self.u64()? as u32)
    }
    pub(crate) fn bool(self) -> Result<bool, DecodeError> {
        Ok(self.u64()? != 0)
    }
    pub(crate) fn bytes(self) -> Result<&'a [u8], DecodeError> {
        match self {
            Value::Bytes(b) => Ok(b),
            _ => Err(DecodeError("expected a length-delimited field")),
        }
    }
    pub(crate) fn string(self) -> Result<String, DecodeError> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| DecodeError("string is not UTF-8"))
    }
    pub(crate) fn message<M: Decode>(self) -> Result<M, DecodeError> {
        M::decode(self.bytes()?)
    }
}

fn varint(buf: &mut &[u8]) -> Result<u64, DecodeError> {
    let mut v: u64 = 0;
    for i in 0..10 {
        let (&b, rest) = buf.split_first().ok_or(DecodeError("truncated varint"))?;
        *buf = rest;
        v |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(DecodeError("varint longer than 10 bytes"))
}

fn take<'a>(buf: &mut &'a [u8], n: usize) -> Result<&'a [u8], DecodeError> {
    if buf.len() < n {
        return Err(DecodeError("truncated field"));
    }
    let (head, rest) = buf.split_at(n);
    *buf = rest;
    Ok(head)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_key(out: &mut Vec<u8>, field: u32, wire: u8) {
    put_varint(out, (u64::from(field) << 3) | u64::from(wire));
}

pub(crate) fn put_u64(out: &mut Vec<u8>, field: u32, v: u64) {
    if v != 0 {
        put_key(out, field, 0);
        put_varint(out, v);
    }
}

fn put_bool(out: &mut Vec<u8>, field: u32, v: bool) {
    put_u64(out, field, u64::from(v));
}

fn put_bytes_always(out: &mut Vec<u8>, field: u32, b: &[u8]) {
    put_key(out, field, 2);
    put_varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

pub(crate) fn put_str(out: &mut Vec<u8>, field: u32, s: &str) {
    if !s.is_empty() {
        put_bytes_always(out, field, s.as_bytes());
    }
}

/// A set message field (written even when empty: presence matters).
pub(crate) fn put_msg<M: Encode + ?Sized>(out: &mut Vec<u8>, field: u32, m: &M) {
    put_bytes_always(out, field, &m.to_bytes());
}

fn zigzag32(v: i32) -> u64 {
    u64::from(((v << 1) ^ (v >> 31)) as u32)
}

// ----------------------------------------------------------------- decode

impl Decode for Empty {
    fn field(&mut self, _: u32, _: Value<'_>) -> Result<(), DecodeError> {
        Ok(())
    }
}

impl Decode for PtySize {
    fn field(&mut self, field: u32, v: Value<'_>) -> Result<(), DecodeError> {
        match field {
            1 => self.cols = v.u32()?,
            2 => self.rows = v.u32()?,
            _ => {}
        }
        Ok(())
    }
}

impl Decode for Pty {
    fn field(&mut self, field: u32, v: Value<'_>) -> Result<(), DecodeError> {
        if field == 1 {
            self.size = Some(v.message()?);
        }
        Ok(())
    }
}

/// A `map<string, string>` entry.
#[derive(Default)]
struct MapEntry {
    key: String,
    value: String,
}

impl Decode for MapEntry {
    fn field(&mut self, field: u32, v: Value<'_>) -> Result<(), DecodeError> {
        match field {
            1 => self.key = v.string()?,
            2 => self.value = v.string()?,
            _ => {}
        }
        Ok(())
    }
}

impl Decode for ProcessConfig {
    fn field(&mut self, field: u32, v: Value<'_>) -> Result<(), DecodeError> {
        match field {
            1 => self.cmd = v.string()?,
            2 => self.args.push(v.string()?),
            3 => {
                let e: MapEntry = v.message()?;
                self.envs.insert(e.key, e.value);
            }
            4 => self.cwd = Some(v.string()?),
            _ => {}
        }
        Ok(())
    }
}

impl Decode for StartRequest {
    fn field(&mut self, field: u32, v: Value<'_>) -> Result<(), DecodeError> {
        match field {
            1 => self.process = Some(v.message()?),
            2 => self.pty = Some(v.message()?),
            3 => self.tag = Some(v.string()?),
            4 => self.stdin = Some(v.bool()?),
            _ => {}
        }
        Ok(())
    }
}

impl Decode for ProcessSelector {
    fn field(&mut self, field: u32, v: Value<'_>) -> Result<(), DecodeError> {
        match field {
            1 => {
                self.pid = Some(v.u32()?);
                self.tag = None;
            }
            2 => {
                self.tag = Some(v.string()?);
                self.pid = None;
            }
            _ => {}
        }
        Ok(())
    }
}

impl Decode for SelectRequest {
    fn field(&mut self, field: u32, v: Value<'_>) -> Result<(), DecodeError> {
        if field == 1 {
            self.process = Some(v.message()?);
        }
        Ok(())
    }
}

impl Decode for ProcessInput {
    fn field(&mut self, field: u32, v: Value<'_>) -> Result<(), DecodeError> {
        match field {
            1 => self.stdin = Some(B64(v.bytes()?.to_vec())),
            2 => self.pty = Some(B64(v.bytes()?.to_vec())),
            _ => {}
        }
        Ok(())
    }
}

impl Decode for SendInputRequest {
    fn field(&mut self, field: u32, v: Value<'_>) -> Result<(), DecodeError> {
        match field {
            1 => self.process = Some(v.message()?),
            2 => self.input = Some(v.message()?),
            _ => {}
        }
        Ok(())
    }
}

impl Decode for SendSignalRequest {
    fn field(&mut self, field: u32, v: Value<'_>) -> Result<(), DecodeError> {
        match field {
            1 => self.process = Some(v.message()?),
            2 => self.signal = EnumValue::Number(v.u64()? as i32),
            _ => {}
        }
        Ok(())
    }
}

impl Decode for UpdateRequest {
    fn field(&mut self, field: u32, v: Value<'_>) -> Result<(), DecodeError> {
        match field {
            1 => self.process = Some(v.message()?),
            2 => self.pty = Some(v.message()?),
            _ => {}
        }
        Ok(())
    }
}

impl Decode for PathRequest {
    fn field(&mut self, field: u32, v: Value<'_>) -> Result<(), DecodeError> {
        if field == 1 {
            self.path = v.string()?;
        }
        Ok(())
    }
}

impl Decode for ListDirRequest {
    fn field(&mut self, field: u32, v: Value<'_>) -> Result<(), DecodeError> {
        match field {
            1 => self.path = v.string()?,
            2 => self.depth = v.u32()?,
            _ => {}
        }
        Ok(())
    }
}

impl Decode for MoveRequest {
    fn field(&mut self, field: u32, v: Value<'_>) -> Result<(), DecodeError> {
        match field {
            1 => self.source = v.string()?,
            2 => self.destination = v.string()?,
            _ => {}
        }
        Ok(())
    }
}

// ----------------------------------------------------------------- encode

impl Encode for Empty {
    fn encode(&self, _: &mut Vec<u8>) {}
}

fn put_map(out: &mut Vec<u8>, field: u32, map: &BTreeMap<String, String>) {
    for (k, v) in map {
        let mut entry = Vec::new();
        put_str(&mut entry, 1, k);
        put_str(&mut entry, 2, v);
        put_bytes_always(out, field, &entry);
    }
}

impl Encode for ProcessConfig {
    fn encode(&self, out: &mut Vec<u8>) {
        put_str(out, 1, &self.cmd);
        for a in &self.args {
            put_bytes_always(out, 2, a.as_bytes());
        }
        put_map(out, 3, &self.envs);
        if let Some(cwd) = &self.cwd {
            put_bytes_always(out, 4, cwd.as_bytes());
        }
    }
}

impl Encode for EndEvent {
    fn encode(&self, out: &mut Vec<u8>) {
        put_u64(out, 1, zigzag32(self.exit_code));
        put_bool(out, 2, self.exited);
        put_str(out, 3, &self.status);
        if let Some(e) = &self.error {
            put_bytes_always(out, 4, e.as_bytes());
        }
    }
}

impl Encode for ProcessEvent {
    fn encode(&self, out: &mut Vec<u8>) {
        let mut inner = Vec::new();
        let field = match self {
            ProcessEvent::Start { pid } => {
                put_u64(&mut inner, 1, u64::from(*pid));
                1
            }
            ProcessEvent::Data(d) => {
                let (f, b) = match d {
                    DataEvent::Stdout(b) => (1, b),
                    DataEvent::Stderr(b) => (2, b),
                    DataEvent::Pty(b) => (3, b),
                };
                put_bytes_always(&mut inner, f, &b.0);
                2
            }
            ProcessEvent::End(e) => {
                e.encode(&mut inner);
                3
            }
            ProcessEvent::Keepalive {} => 4,
        };
        put_bytes_always(out, field, &inner);
    }
}

impl Encode for EventResponse {
    fn encode(&self, out: &mut Vec<u8>) {
        put_msg(out, 1, &self.event);
    }
}

impl Encode for ProcessInfo {
    fn encode(&self, out: &mut Vec<u8>) {
        put_msg(out, 1, &self.config);
        put_u64(out, 2, u64::from(self.pid));
        if let Some(tag) = &self.tag {
            put_bytes_always(out, 3, tag.as_bytes());
        }
    }
}

impl Encode for ListResponse {
    fn encode(&self, out: &mut Vec<u8>) {
        for p in &self.processes {
            put_msg(out, 1, p);
        }
    }
}

impl Encode for EntryInfo {
    fn encode(&self, out: &mut Vec<u8>) {
        put_str(out, 1, &self.name);
        put_u64(out, 2, self.file_type as u64);
        put_str(out, 3, &self.path);
        // int64: two's complement in a varint.
        put_u64(out, 4, self.size.0 as u64);
        put_u64(out, 5, u64::from(self.mode));
        put_str(out, 6, &self.permissions);
        put_str(out, 7, &self.owner);
        put_str(out, 8, &self.group);
        if let Some(t) = self.modified_time {
            let mut ts = Vec::new();
            put_u64(&mut ts, 1, t.0.div_euclid(1000) as u64);
            put_u64(&mut ts, 2, (t.0.rem_euclid(1000) * 1_000_000) as u64);
            put_bytes_always(out, 9, &ts);
        }
        put_bool(out, 12, self.is_symlink);
    }
}

impl Encode for EntryResponse {
    fn encode(&self, out: &mut Vec<u8>) {
        put_msg(out, 1, &self.entry);
    }
}

impl Encode for ListDirResponse {
    fn encode(&self, out: &mut Vec<u8>) {
        for e in &self.entries {
            put_msg(out, 1, e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::e2b::wire::{FileType, I64, Timestamp};

    #[test]
    fn a_start_request_decodes_field_by_field() {
        // StartRequest{process: {cmd: "sh", args: ["-c"], envs: {A: "1"}}, stdin: true}
        let bytes = [
            0x0a, 0x10, // 1: process, 16 bytes
            0x0a, 0x02, b's', b'h', // cmd
            0x12, 0x02, b'-', b'c', // args
            0x1a, 0x06, 0x0a, 0x01, b'A', 0x12, 0x01, b'1', // envs entry
            0x20, 0x01, // 4: stdin = true
        ];
        let r = StartRequest::decode(&bytes).unwrap();
        let p = r.process.unwrap();
        assert_eq!(
            (p.cmd.as_str(), p.args.as_slice()),
            ("sh", ["-c".to_owned()].as_slice())
        );
        assert_eq!(p.envs["A"], "1");
        assert_eq!(r.stdin, Some(true));
    }

    #[test]
    fn unknown_fields_are_skipped_and_truncation_refused() {
        // 9: varint 300, 10: bytes "x", then 1: path "/a"
        let bytes = [0x48, 0xac, 0x02, 0x52, 0x01, b'x', 0x0a, 0x02, b'/', b'a'];
        assert_eq!(PathRequest::decode(&bytes).unwrap().path, "/a");
        assert!(PathRequest::decode(&[0x0a, 0x05, b'/']).is_err());
        assert!(PathRequest::decode(&[0x0a]).is_err());
        assert!(PathRequest::decode(&[0x0b]).is_err());
    }

    #[test]
    fn signals_and_selectors_decode() {
        // process: {pid: 42}, signal: 9
        let r = SendSignalRequest::decode(&[0x0a, 0x02, 0x08, 42, 0x10, 9]).unwrap();
        assert_eq!(r.signal_number(), Some(9));
        assert_eq!(r.process.unwrap().pid, Some(42));
    }

    #[test]
    fn process_events_encode_with_the_sdks_field_numbers() {
        let start = EventResponse {
            event: ProcessEvent::Start { pid: 7 },
        };
        assert_eq!(start.to_bytes(), [0x0a, 0x04, 0x0a, 0x02, 0x08, 7]);
        let data = EventResponse {
            event: ProcessEvent::Data(DataEvent::Stderr(B64(b"e".to_vec()))),
        };
        assert_eq!(data.to_bytes(), [0x0a, 0x05, 0x12, 0x03, 0x12, 0x01, b'e']);
        let end = EventResponse {
            event: ProcessEvent::End(EndEvent {
                exit_code: -1,
                exited: true,
                status: String::new(),
                error: None,
            }),
        };
        // exit_code is sint32: -1 zigzags to 1.
        assert_eq!(
            end.to_bytes(),
            [0x0a, 0x06, 0x1a, 0x04, 0x08, 0x01, 0x10, 0x01]
        );
        let keepalive = EventResponse {
            event: ProcessEvent::Keepalive {},
        };
        assert_eq!(keepalive.to_bytes(), [0x0a, 0x02, 0x22, 0x00]);
    }

    #[test]
    fn entries_encode_int64_and_the_timestamp() {
        let e = EntryInfo {
            name: "a".into(),
            file_type: FileType::Directory,
            path: String::new(),
            size: I64(300),
            mode: 0,
            permissions: String::new(),
            owner: String::new(),
            group: String::new(),
            modified_time: Some(Timestamp(1500)),
            is_symlink: false,
        };
        assert_eq!(
            e.to_bytes(),
            [
                0x0a, 0x01, b'a', // name
                0x10, 0x02, // type = DIRECTORY
                0x20, 0xac, 0x02, // size = 300
                0x4a, 0x08, 0x08, 0x01, 0x10, 0x80, 0xca, 0xb5, 0xee, 0x01, // 1 s + 500 ms
            ]
        );
    }
}
