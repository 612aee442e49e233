//! [`nova_protocol::Request::Refresh`]: a guest restored from a snapshot becomes a machine
//! of its own.
//!
//! Every guest restored from one snapshot wakes up as the guest the snapshot
//! was taken of: its hostname, machine id, kernel random state and a wall
//! clock stopped at the moment of the snapshot. The host sends `Refresh`
//! first on its connection to a restored guest, and [`run`] changes all of
//! it, in an order that matters:
//!
//! 1. check everything ([`check`]): a bad request changes nothing;
//! 2. the host's entropy into the kernel's pool, and a reseed ([`entropy`]),
//!    before anything in the guest draws a random number for this guest;
//! 3. the wall clock ([`clock`]);
//! 4. the identity ([`identity`]): hostname, `/etc/hosts` and a new machine
//!    id, drawn from the reseeded generator (and mixed with the host's bytes),
//!    and `/etc/resolv.conf` when the host names DNS servers.
//!
//! The work is blocking (file writes, `mount`), so it runs on tokio's
//! blocking pool; the session keeps reading meanwhile.

use std::sync::Arc;

use std::net::Ipv4Addr;

use nova_protocol::boot::MAX_DNS_SERVERS;
use nova_protocol::{
    REFRESH_ENTROPY_MAX, REFRESH_ENTROPY_MIN, RemoteError, RemoteErrorKind, Response,
};

use crate::session::Outbox;
use crate::{Agent, clock, entropy, identity};

/// The fields of a [`nova_protocol::Request::Refresh`].
#[derive(Debug)]
pub(crate) struct Refresh {
    pub(crate) hostname: String,
    pub(crate) entropy: Vec<u8>,
    pub(crate) unix_ns: u64,
    pub(crate) dns: Option<Vec<Ipv4Addr>>,
}

/// Answers request `id`.
pub(crate) async fn run(id: u64, refresh: Refresh, agent: Arc<Agent>, out: Outbox) {
    let result = match tokio::task::spawn_blocking(move || apply(&refresh, &agent)).await {
        Ok(result) => result,
        Err(e) => Err(RemoteError::new(
            RemoteErrorKind::Io,
            format!("the refresh failed: {e}"),
        )),
    };
    if let Err(e) = &result {
        tracing::warn!(error = %e, "refresh failed");
    }
    let _ = out.done(id, result).await;
}

/// Checks `refresh` and applies it (see the module docs).
fn apply(refresh: &Refresh, agent: &Agent) -> Result<Response, RemoteError> {
    check(refresh)?;
    let reseeded = entropy::mix_in(&refresh.entropy, agent.pid1)
        .map_err(|e| RemoteError::from_io("mix in the host's entropy", &e))?;
    let step = clock::step_to_host(refresh.unix_ns, agent.pid1)?;
    let machine_id = identity::refresh(
        agent.identity.as_ref(),
        &refresh.hostname,
        &refresh.entropy,
        refresh.dns.as_deref(),
    )
    .map_err(|e| RemoteError::from_io("set the guest identity", &e))?;
    Ok(Response::Refreshed {
        machine_id,
        reseeded,
        clock_offset_ns: step.offset_ns,
        clock_stepped: step.stepped,
    })
}

/// Refuses a bad hostname, an entropy size out of bounds or too many DNS
/// servers.
fn check(refresh: &Refresh) -> Result<(), RemoteError> {
    if !identity::valid_hostname(&refresh.hostname) {
        // The name may be anything the host sent; quote only its start.
        let shown: String = refresh.hostname.chars().take(80).collect();
        return Err(RemoteError::new(
            RemoteErrorKind::InvalidInput,
            format!(
                "invalid hostname {shown:?} ({} bytes): use 1 to 64 letters, digits, '-' and '.', not starting with '-' or '.'",
                refresh.hostname.len()
            ),
        ));
    }
    let n = refresh.entropy.len();
    if !(REFRESH_ENTROPY_MIN..=REFRESH_ENTROPY_MAX).contains(&n) {
        return Err(RemoteError::new(
            RemoteErrorKind::InvalidInput,
            format!(
                "{n} bytes of entropy: send {REFRESH_ENTROPY_MIN} to {REFRESH_ENTROPY_MAX} (64 is plenty)"
            ),
        ));
    }
    if let Some(dns) = &refresh.dns
        && dns.len() > MAX_DNS_SERVERS
    {
        return Err(RemoteError::new(
            RemoteErrorKind::InvalidInput,
            format!(
                "{} DNS servers: send at most {MAX_DNS_SERVERS} (the guest's resolver reads no more)",
                dns.len()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refresh(hostname: &str, entropy: usize) -> Refresh {
        Refresh {
            hostname: hostname.to_owned(),
            entropy: vec![1; entropy],
            unix_ns: 0,
            dns: None,
        }
    }

    #[test]
    fn bad_requests_are_refused_as_invalid_input() {
        assert!(check(&refresh("sb-1", 64)).is_ok());
        assert!(check(&refresh("sb-1", REFRESH_ENTROPY_MIN)).is_ok());
        assert!(check(&refresh("sb-1", REFRESH_ENTROPY_MAX)).is_ok());
        for (hostname, entropy) in [
            ("sb-1", REFRESH_ENTROPY_MAX + 1),
            ("sb-1", REFRESH_ENTROPY_MIN - 1),
            ("sb-1", 0),
            ("", 64),
            ("a b", 64),
            ("-x", 64),
            ("a\nb", 64),
        ] {
            let err = check(&refresh(hostname, entropy)).unwrap_err();
            assert_eq!(err.kind, RemoteErrorKind::InvalidInput, "{err}");
        }
        let mut many = refresh("sb-1", 64);
        many.dns = Some(vec![Ipv4Addr::new(198, 18, 0, 53); MAX_DNS_SERVERS + 1]);
        let err = check(&many).unwrap_err();
        assert_eq!(err.kind, RemoteErrorKind::InvalidInput, "{err}");
        assert!(err.message.contains("DNS servers"), "{err}");
        many.dns = Some(vec![Ipv4Addr::new(198, 18, 0, 53); MAX_DNS_SERVERS]);
        assert!(check(&many).is_ok());
        let long = "x".repeat(100_000);
        let err = check(&refresh(&long, 64)).unwrap_err();
        assert!(err.message.len() < 300, "{}", err.message);
        assert!(err.message.contains("100000 bytes"), "{}", err.message);
    }
}
