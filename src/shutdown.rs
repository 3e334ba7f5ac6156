//! One cancellation token per process: SIGTERM / SIGINT cancel it, every role
//! watches it and drains.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Waits between retries of something unavailable (a database, a broker):
/// 100 ms doubling to 10 s, cut short by shutdown.
pub struct Backoff(Duration);

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff(Duration::from_millis(100))
    }
}

impl Backoff {
    pub fn next_delay(&mut self) -> Duration {
        let d = self.0;
        self.0 = (self.0 * 2).min(Duration::from_secs(10));
        d
    }

    /// Counts the retry under `what`, logs `error`, sleeps the next step.
    /// False if `shutdown` came first.
    pub async fn pause(
        &mut self,
        shutdown: &CancellationToken,
        retries: &prometheus::IntCounterVec,
        what: &'static str,
        error: &(dyn std::fmt::Display + Sync),
    ) -> bool {
        let d = self.next_delay();
        retries.with_label_values(&[what]).inc();
        tracing::warn!(%error, retry_in_ms = d.as_millis() as u64, "{what} unavailable; retrying");
        tokio::select! {
            _ = shutdown.cancelled() => false,
            _ = tokio::time::sleep(d) => true,
        }
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_ten_seconds() {
        let mut b = Backoff::default();
        let steps: Vec<u64> = (0..10).map(|_| b.next_delay().as_millis() as u64).collect();
        assert_eq!(
            steps,
            [100, 200, 400, 800, 1600, 3200, 6400, 10000, 10000, 10000]
        );
    }
}
