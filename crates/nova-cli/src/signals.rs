//! Waiting for the signals that end a long-running command (`serve`, `mcp`).

/// Completes on the first SIGTERM or SIGINT; never, when the handlers
/// cannot be installed (the process then runs until killed).
pub(crate) async fn terminate_or_interrupt() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
