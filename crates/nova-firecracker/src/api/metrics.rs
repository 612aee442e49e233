//! `/metrics`: where Firecracker writes its metrics (one JSON object per
//! flush; see [`crate::stats`] for reading them).

use serde::{Deserialize, Serialize};

/// The body of `PUT /metrics`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metrics {
    /// File or named pipe, as the VMM sees its path.
    pub metrics_path: String,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn request_body() {
        let m = Metrics {
            metrics_path: "metrics.json".into(),
        };
        assert_eq!(
            serde_json::to_value(&m).unwrap(),
            json!({"metrics_path": "metrics.json"})
        );
    }
}
