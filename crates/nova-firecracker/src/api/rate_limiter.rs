//! Rate limiters (`RateLimiter`, `TokenBucket`), shared by drives, network
//! interfaces and the entropy device.

use serde::{Deserialize, Serialize};

/// A token bucket: `size` tokens refilled every `refill_time` ms, with an
/// optional initial burst.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenBucket {
    /// Tokens the bucket holds when full.
    pub size: u64,
    /// Extra tokens available once, at the start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_time_burst: Option<u64>,
    /// Milliseconds to refill the bucket from empty.
    pub refill_time: u64,
}

/// Independent limits on bytes per second and operations per second.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimiter {
    /// Bucket whose tokens are bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<TokenBucket>,
    /// Bucket whose tokens are operations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<TokenBucket>,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn omits_what_is_unset() {
        let limiter = RateLimiter {
            bandwidth: Some(TokenBucket {
                size: 1_048_576,
                one_time_burst: None,
                refill_time: 1000,
            }),
            ops: None,
        };
        assert_eq!(
            serde_json::to_value(&limiter).unwrap(),
            json!({"bandwidth": {"size": 1048576, "refill_time": 1000}})
        );
        let parsed: RateLimiter = serde_json::from_value(json!({
            "ops": {"size": 100, "one_time_burst": 10, "refill_time": 100}
        }))
        .unwrap();
        assert_eq!(parsed.ops.unwrap().one_time_burst, Some(10));
        assert_eq!(parsed.bandwidth, None);
    }
}
