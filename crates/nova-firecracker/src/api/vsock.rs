//! `/vsock`: the virtio-vsock device and its host Unix socket.

use serde::{Deserialize, Serialize};

/// The body of `PUT /vsock`.
///
/// Firecracker listens on `uds_path` for host-initiated connections (see
/// [`crate::vsock`]); guest-initiated connections to port `P` go to a Unix
/// socket the host listens on at `<uds_path>_P`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vsock {
    /// The guest's context id (3 or more).
    pub guest_cid: u32,
    /// Host Unix socket, as the VMM sees its path.
    pub uds_path: String,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn request_body() {
        let v = Vsock {
            guest_cid: 3,
            uds_path: "vsock.sock".into(),
        };
        assert_eq!(
            serde_json::to_value(&v).unwrap(),
            json!({"guest_cid": 3, "uds_path": "vsock.sock"})
        );
    }
}
