//! `/network-interfaces/{iface_id}`: virtio-net devices backed by host tap
//! devices (made by the networking layer, not here).

use serde::{Deserialize, Serialize};

use super::RateLimiter;

/// The body of `PUT /network-interfaces/{iface_id}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkInterface {
    /// Its id; also the last path segment of the request.
    pub iface_id: String,
    /// The host tap device.
    pub host_dev_name: String,
    /// The guest's MAC address (`aa:bb:cc:dd:ee:ff`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
    /// MTU advertised to the guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u16>,
    /// Limits on what the guest receives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiter>,
    /// Limits on what the guest sends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiter>,
}

/// The body of `PATCH /network-interfaces/{iface_id}`: new rate limits after
/// boot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartialNetworkInterface {
    /// Which interface.
    pub iface_id: String,
    /// New receive limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiter>,
    /// New transmit limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiter>,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::api::TokenBucket;

    #[test]
    fn request_bodies() {
        let iface = NetworkInterface {
            iface_id: "eth0".into(),
            host_dev_name: "nova-tap0".into(),
            guest_mac: Some("06:00:ac:10:00:02".into()),
            mtu: None,
            rx_rate_limiter: None,
            tx_rate_limiter: None,
        };
        assert_eq!(
            serde_json::to_value(&iface).unwrap(),
            json!({"iface_id": "eth0", "host_dev_name": "nova-tap0",
                   "guest_mac": "06:00:ac:10:00:02"})
        );
        let patch = PartialNetworkInterface {
            iface_id: "eth0".into(),
            rx_rate_limiter: None,
            tx_rate_limiter: Some(RateLimiter {
                bandwidth: Some(TokenBucket {
                    size: 10,
                    one_time_burst: Some(5),
                    refill_time: 100,
                }),
                ops: None,
            }),
        };
        assert_eq!(
            serde_json::to_value(&patch).unwrap(),
            json!({"iface_id": "eth0", "tx_rate_limiter":
                   {"bandwidth": {"size": 10, "one_time_burst": 5, "refill_time": 100}}})
        );
    }
}
