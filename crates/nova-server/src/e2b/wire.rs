//! envd's messages (`process.*`, `filesystem.*`) in the proto3 JSON mapping,
//! which is what E2B's SDKs put on the wire.
//!
//! The schema is in `crates/nova-server/proto/e2b/{process,filesystem}.proto`
//! (written for NovaSandbox from the field numbers in the `e2b` package's
//! generated descriptors). The JSON mapping rules applied here: fields are
//! lowerCamelCase (the original snake_case names are accepted too), `bytes`
//! are standard base64, `int64` is written as a string, enums are written by
//! name (numbers are accepted), a oneof is the one key that is set, and
//! fields at their default may be left out.

use std::collections::BTreeMap;

use base64::Engine;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// `bytes`: base64 in JSON.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct B64(pub Vec<u8>);

impl Serialize for B64 {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for B64 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let trimmed = text.trim_end_matches('=');
        // proto3 JSON parsers accept standard and URL-safe base64, padded or not.
        base64::engine::general_purpose::STANDARD_NO_PAD
            .decode(trimmed)
            .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(trimmed))
            .map(B64)
            .map_err(serde::de::Error::custom)
    }
}

/// `int64`: a string in JSON (a number is accepted).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct I64(pub i64);

impl Serialize for I64 {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0.to_string())
    }
}

/// `google.protobuf.Timestamp`, held as milliseconds since the Unix epoch:
/// RFC 3339 in JSON.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timestamp(pub i64);

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&rfc3339_ms(self.0))
    }
}

/// An enum field: its name, or its number.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum EnumValue {
    /// By number.
    Number(i32),
    /// By name.
    Name(String),
}

impl Default for EnumValue {
    fn default() -> Self {
        Self::Number(0)
    }
}

// ---------------------------------------------------------------- process

/// `process.PTY`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct Pty {
    /// Its size.
    pub size: Option<PtySize>,
}

/// `process.PTY.Size`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct PtySize {
    /// Columns.
    pub cols: u32,
    /// Rows.
    pub rows: u32,
}

/// `process.ProcessConfig`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ProcessConfig {
    /// The program.
    pub cmd: String,
    /// Its arguments.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Extra environment.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub envs: BTreeMap<String, String>,
    /// Working directory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
}

/// `process.StartRequest`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct StartRequest {
    /// What to run.
    pub process: Option<ProcessConfig>,
    /// Run it on a terminal of this size.
    pub pty: Option<Pty>,
    /// A caller's name for it.
    pub tag: Option<String>,
    /// Keep its stdin open for `SendInput`.
    pub stdin: Option<bool>,
}

/// `process.ProcessSelector`: by pid or by tag.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct ProcessSelector {
    /// The pid.
    pub pid: Option<u32>,
    /// The tag.
    pub tag: Option<String>,
}

/// `process.ConnectRequest`, `process.CloseStdinRequest`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct SelectRequest {
    /// Which process.
    pub process: Option<ProcessSelector>,
}

/// `process.ProcessInput` (a oneof).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct ProcessInput {
    /// Bytes for stdin.
    pub stdin: Option<B64>,
    /// Bytes for the terminal.
    pub pty: Option<B64>,
}

/// `process.SendInputRequest`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct SendInputRequest {
    /// Which process.
    pub process: Option<ProcessSelector>,
    /// What to write.
    pub input: Option<ProcessInput>,
}

/// `process.SendSignalRequest`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct SendSignalRequest {
    /// Which process.
    pub process: Option<ProcessSelector>,
    /// `process.Signal`: `SIGNAL_SIGTERM` (15) or `SIGNAL_SIGKILL` (9).
    pub signal: EnumValue,
}

impl SendSignalRequest {
    /// The signal number asked for.
    pub fn signal_number(&self) -> Option<i32> {
        match &self.signal {
            EnumValue::Number(n @ (9 | 15)) => Some(*n),
            EnumValue::Name(name) => match name.as_str() {
                "SIGNAL_SIGTERM" => Some(15),
                "SIGNAL_SIGKILL" => Some(9),
                _ => None,
            },
            EnumValue::Number(_) => None,
        }
    }
}

/// `process.UpdateRequest`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct UpdateRequest {
    /// Which process.
    pub process: Option<ProcessSelector>,
    /// Its terminal's new size.
    pub pty: Option<Pty>,
}

/// `process.ProcessEvent` (a oneof), the payload of `StartResponse` and
/// `ConnectResponse` (`{"event": ProcessEvent}`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProcessEvent {
    /// The process started.
    Start {
        /// Its pid.
        pid: u32,
    },
    /// Output.
    Data(DataEvent),
    /// It ended.
    End(EndEvent),
    /// Nothing happened for a while.
    Keepalive {},
}

/// `process.ProcessEvent.DataEvent` (a oneof).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DataEvent {
    /// Bytes on stdout.
    Stdout(B64),
    /// Bytes on stderr.
    Stderr(B64),
    /// Bytes on the terminal.
    Pty(B64),
}

/// `process.ProcessEvent.EndEvent`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EndEvent {
    /// The exit code (128 + N for signal N, as a shell reports it).
    pub exit_code: i32,
    /// Whether it exited by itself (not by a signal).
    pub exited: bool,
    /// How it ended, in words (`exit status 1`, `signal: killed`).
    pub status: String,
    /// Why it failed to run, if it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `process.StartResponse` / `process.ConnectResponse`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EventResponse {
    /// The event.
    pub event: ProcessEvent,
}

/// `process.ProcessInfo`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ProcessInfo {
    /// What it runs.
    pub config: ProcessConfig,
    /// Its pid.
    pub pid: u32,
    /// Its tag.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
}

/// `process.ListResponse`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ListResponse {
    /// The running processes.
    pub processes: Vec<ProcessInfo>,
}

/// An empty message (`SendInputResponse`, `SendSignalResponse`, ...).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Empty {}

// ------------------------------------------------------------- filesystem

/// `filesystem.StatRequest`, `MakeDirRequest`, `RemoveRequest`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct PathRequest {
    /// The guest path.
    pub path: String,
}

/// `filesystem.ListDirRequest`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct ListDirRequest {
    /// The directory.
    pub path: String,
    /// How deep to list (0 and 1 both mean its entries only).
    pub depth: u32,
}

/// `filesystem.MoveRequest`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct MoveRequest {
    /// From.
    pub source: String,
    /// To.
    pub destination: String,
}

/// `filesystem.FileType`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum FileType {
    /// Something else.
    #[serde(rename = "FILE_TYPE_UNSPECIFIED")]
    Unspecified = 0,
    /// A file.
    #[serde(rename = "FILE_TYPE_FILE")]
    File = 1,
    /// A directory.
    #[serde(rename = "FILE_TYPE_DIRECTORY")]
    Directory = 2,
    /// A symbolic link.
    #[serde(rename = "FILE_TYPE_SYMLINK")]
    Symlink = 3,
}

/// `filesystem.EntryInfo`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EntryInfo {
    /// Its last path component.
    pub name: String,
    /// Its type.
    #[serde(rename = "type")]
    pub file_type: FileType,
    /// Its absolute path.
    pub path: String,
    /// Its size, bytes.
    pub size: I64,
    /// Its mode bits (type and permissions).
    pub mode: u32,
    /// `-rw-r--r--`.
    pub permissions: String,
    /// Its owner's name (or uid).
    pub owner: String,
    /// Its group's name (or gid).
    pub group: String,
    /// Last modification.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub modified_time: Option<Timestamp>,
    /// Whether it is a symbolic link.
    pub is_symlink: bool,
}

/// `filesystem.StatResponse`, `MakeDirResponse`, `MoveResponse`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EntryResponse {
    /// The entry.
    pub entry: EntryInfo,
}

/// `filesystem.ListDirResponse`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ListDirResponse {
    /// The entries.
    pub entries: Vec<EntryInfo>,
}

/// `ls -l`'s permission string of `mode` (type character included).
pub fn permissions(mode: u32, file_type: FileType) -> String {
    let kind = match file_type {
        FileType::Directory => 'd',
        FileType::Symlink => 'l',
        _ => '-',
    };
    let mut s = String::with_capacity(10);
    s.push(kind);
    for shift in [6, 3, 0] {
        let bits = (mode >> shift) & 7;
        s.push(if bits & 4 != 0 { 'r' } else { '-' });
        s.push(if bits & 2 != 0 { 'w' } else { '-' });
        s.push(if bits & 1 != 0 { 'x' } else { '-' });
    }
    s
}

/// RFC 3339 (UTC, milliseconds) of `ms` since the Unix epoch.
pub fn rfc3339_ms(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_events_have_the_sdks_json_shape() {
        let v = serde_json::to_value(EventResponse {
            event: ProcessEvent::Start { pid: 7 },
        })
        .unwrap();
        assert_eq!(v, serde_json::json!({"event": {"start": {"pid": 7}}}));
        let v = serde_json::to_value(ProcessEvent::Data(DataEvent::Stdout(B64(b"hi\n".to_vec()))))
            .unwrap();
        assert_eq!(v, serde_json::json!({"data": {"stdout": "aGkK"}}));
        let v = serde_json::to_value(ProcessEvent::End(EndEvent {
            exit_code: 1,
            exited: true,
            status: "exit status 1".into(),
            error: None,
        }))
        .unwrap();
        assert_eq!(
            v,
            serde_json::json!({"end": {"exitCode": 1, "exited": true, "status": "exit status 1"}})
        );
        let v = serde_json::to_value(ProcessEvent::Keepalive {}).unwrap();
        assert_eq!(v, serde_json::json!({"keepalive": {}}));
    }

    #[test]
    fn a_start_request_as_the_python_sdk_sends_it() {
        let r: StartRequest = serde_json::from_str(
            r#"{"process":{"cmd":"/bin/bash","args":["-l","-c","echo hi"],"envs":{"A":"1"}},"stdin":false}"#,
        )
        .unwrap();
        let p = r.process.unwrap();
        assert_eq!(p.cmd, "/bin/bash");
        assert_eq!(p.args, ["-l", "-c", "echo hi"]);
        assert_eq!(p.envs["A"], "1");
        assert_eq!(r.stdin, Some(false));
    }

    #[test]
    fn inputs_and_signals_decode() {
        let r: SendInputRequest =
            serde_json::from_str(r#"{"process":{"pid":42},"input":{"stdin":"aGk="}}"#).unwrap();
        assert_eq!(r.process.unwrap().pid, Some(42));
        assert_eq!(r.input.unwrap().stdin, Some(B64(b"hi".to_vec())));
        let r: SendSignalRequest =
            serde_json::from_str(r#"{"process":{"pid":1},"signal":"SIGNAL_SIGKILL"}"#).unwrap();
        assert_eq!(r.signal_number(), Some(9));
        let r: SendSignalRequest = serde_json::from_str(r#"{"signal":15}"#).unwrap();
        assert_eq!(r.signal_number(), Some(15));
        let r: SendSignalRequest = serde_json::from_str(r#"{}"#).unwrap();
        assert_eq!(r.signal_number(), None);
    }

    #[test]
    fn entries_write_int64_as_a_string_and_enums_by_name() {
        let v = serde_json::to_value(EntryInfo {
            name: "a".into(),
            file_type: FileType::File,
            path: "/a".into(),
            size: I64(5),
            mode: 0o644,
            permissions: permissions(0o644, FileType::File),
            owner: "root".into(),
            group: "root".into(),
            modified_time: None,
            is_symlink: false,
        })
        .unwrap();
        assert_eq!(v["size"], "5");
        assert_eq!(v["type"], "FILE_TYPE_FILE");
        assert_eq!(v["permissions"], "-rw-r--r--");
        assert_eq!(v["isSymlink"], false);
        assert_eq!(
            serde_json::to_value(Timestamp(0)).unwrap(),
            "1970-01-01T00:00:00.000Z"
        );
    }

    #[test]
    fn timestamps_are_rfc3339() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(1_709_251_199_123), "2024-02-29T23:59:59.123Z");
    }
}
