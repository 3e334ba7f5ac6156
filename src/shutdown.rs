//! One cancellation token per process: SIGTERM / SIGINT cancel it, every role
//! watches it and drains.

use tokio_util::sync::CancellationToken;

/// Cancels `token` on the first SIGTERM or SIGINT. A second signal is left to
/// the default handler's successor (the process keeps draining; operators who
/// want it gone use SIGKILL).
pub fn cancel_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut term) => {
                    tokio::select! {
                        _ = ctrl_c => tracing::info!(signal = "SIGINT", "shutdown requested"),
                        _ = term.recv() => tracing::info!(signal = "SIGTERM", "shutdown requested"),
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot install SIGTERM handler; only SIGINT stops the process");
                    let _ = ctrl_c.await;
                }
            }
        }
        #[cfg(not(unix))]
        {
            let _ = ctrl_c.await;
        }
        token.cancel();
    });
}
