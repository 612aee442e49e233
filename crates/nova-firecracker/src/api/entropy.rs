//! `/entropy`: the virtio-rng device, feeding the guest's entropy pool.

use serde::{Deserialize, Serialize};

use super::RateLimiter;

/// The body of `PUT /entropy`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntropyDevice {
    /// Limits on the bytes the guest may draw.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn request_body() {
        assert_eq!(
            serde_json::to_value(EntropyDevice::default()).unwrap(),
            json!({})
        );
    }
}
