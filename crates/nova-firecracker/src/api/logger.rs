//! `/logger`: where and how much Firecracker logs.

use serde::{Deserialize, Serialize};

/// Firecracker's log levels.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum LogLevel {
    /// Errors only.
    Error,
    /// Warnings and errors.
    #[default]
    Warning,
    /// Informational messages and above.
    Info,
    /// Debug messages and above.
    Debug,
    /// Everything.
    Trace,
    /// Nothing.
    Off,
}

/// The body of `PUT /logger`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Logger {
    /// File or named pipe for the log, as the VMM sees its path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_path: Option<String>,
    /// Level.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<LogLevel>,
    /// Prefix each line with its level.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_level: Option<bool>,
    /// Prefix each line with its source file and line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_log_origin: Option<bool>,
    /// Only log from this module path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn request_body() {
        let logger = Logger {
            log_path: Some("vmm.log".into()),
            level: Some(LogLevel::Warning),
            show_level: Some(true),
            ..Logger::default()
        };
        assert_eq!(
            serde_json::to_value(&logger).unwrap(),
            json!({"log_path": "vmm.log", "level": "Warning", "show_level": true})
        );
    }
}
