//! The one connect-and-retry loop: sockets a VMM is about to create (QMP,
//! Firecracker's API, the agent channel) are tried with a short exponential
//! back-off until they answer, the error is permanent, or a deadline passes.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

/// First pause between attempts.
const FIRST_DELAY: Duration = Duration::from_micros(200);
/// Longest pause between attempts.
const MAX_DELAY: Duration = Duration::from_millis(20);

/// [`retry_until`] gave up.
#[derive(Debug)]
pub enum RetryError<E> {
    /// An attempt failed for good.
    Failed(E),
    /// The deadline passed; the last transient error, if any attempt was
    /// made.
    TimedOut(Option<E>),
}

/// Calls `attempt` until it succeeds, fails with an error `transient` says
/// is permanent, or `deadline` passes (a running attempt is cut off then).
pub async fn retry_until<T, E, F, Fut>(
    deadline: Instant,
    mut attempt: F,
    transient: impl Fn(&E) -> bool,
) -> Result<T, RetryError<E>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut delay = FIRST_DELAY;
    let mut last = None;
    loop {
        match tokio::time::timeout_at(deadline, attempt()).await {
            Err(_) => return Err(RetryError::TimedOut(last)),
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(e)) if transient(&e) => last = Some(e),
            Ok(Err(e)) => return Err(RetryError::Failed(e)),
        }
        if Instant::now() + delay >= deadline {
            return Err(RetryError::TimedOut(last));
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(MAX_DELAY);
    }
}

/// Whether connecting to a Unix socket failed only because its server is
/// not there yet (the file is missing or nobody listens).
pub fn socket_not_ready(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
    )
}

/// Connects to the Unix socket at `path`, retrying while it is not ready,
/// until `deadline`.
pub async fn connect_unix(
    path: &std::path::Path,
    deadline: Instant,
) -> std::io::Result<tokio::net::UnixStream> {
    match retry_until(
        deadline,
        || tokio::net::UnixStream::connect(path),
        socket_not_ready,
    )
    .await
    {
        Ok(stream) => Ok(stream),
        Err(RetryError::Failed(e)) => Err(e),
        Err(RetryError::TimedOut(_)) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("{} did not accept a connection in time", path.display()),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn retries_transient_errors_and_stops_on_permanent_ones() {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut calls = 0;
        let r: Result<u32, RetryError<&str>> = retry_until(
            deadline,
            || {
                calls += 1;
                let n = calls;
                async move { if n < 3 { Err("not yet") } else { Ok(n) } }
            },
            |e| *e == "not yet",
        )
        .await;
        assert_eq!(r.unwrap(), 3);
        let r: Result<u32, _> =
            retry_until(deadline, || async { Err("broken") }, |e| *e == "not yet").await;
        assert!(matches!(r, Err(RetryError::Failed("broken"))));
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_at_the_deadline_even_inside_an_attempt() {
        let deadline = Instant::now() + Duration::from_secs(1);
        let r: Result<(), RetryError<()>> =
            retry_until(deadline, std::future::pending, |_| true).await;
        assert!(matches!(r, Err(RetryError::TimedOut(None))));
        let dir = tempfile::tempdir().unwrap();
        let e = connect_unix(
            &dir.path().join("none.sock"),
            Instant::now() + Duration::from_secs(1),
        )
        .await
        .unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
    }
}
