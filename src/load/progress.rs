//! Backlog and rate of the loader: metrics always, a one-line display on a
//! terminal when asked.

use std::collections::VecDeque;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::LoadMetrics;

/// Rate over this window.
const WINDOW: Duration = Duration::from_secs(10);

pub struct Progress {
    metrics: LoadMetrics,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// (when, lines, bytes) per committed batch within the window.
    recent: VecDeque<(Instant, u64, u64)>,
    bytes_pending: u64,
    files_pending: u64,
}

/// Lines/s and bytes/s over `recent`, ending `now`.
pub(crate) fn rates(recent: &VecDeque<(Instant, u64, u64)>, now: Instant) -> (f64, f64) {
    let Some((first, _, _)) = recent.front() else {
        return (0.0, 0.0);
    };
    let span = now.duration_since(*first).as_secs_f64().max(1.0);
    let (lines, bytes) = recent
        .iter()
        .fold((0u64, 0u64), |(l, b), (_, dl, db)| (l + dl, b + db));
    (lines as f64 / span, bytes as f64 / span)
}

/// Seconds to load `pending` bytes at `bytes_per_sec`; None when no rate is known.
pub(crate) fn eta(pending: u64, bytes_per_sec: f64) -> Option<f64> {
    if pending == 0 {
        Some(0.0)
    } else if bytes_per_sec > 0.0 {
        Some(pending as f64 / bytes_per_sec)
    } else {
        None
    }
}

impl Progress {
    pub fn new(metrics: LoadMetrics) -> Progress {
        Progress {
            metrics,
            state: Mutex::new(State::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The backlog as a folder listing shows it.
    pub fn scanned(&self, files: &[PathBuf]) {
        let bytes: u64 = files
            .iter()
            .filter_map(|f| std::fs::metadata(f).ok())
            .map(|m| m.len())
            .sum();
        let mut s = self.state();
        s.bytes_pending = bytes;
        s.files_pending = files.len() as u64;
        self.publish(&mut s);
    }

    /// A batch was committed.
    pub fn loaded(&self, lines: u64, bytes: u64) {
        self.metrics.bytes_loaded.inc_by(bytes);
        let mut s = self.state();
        s.recent.push_back((Instant::now(), lines, bytes));
        s.bytes_pending = s.bytes_pending.saturating_sub(bytes);
        self.publish(&mut s);
    }

    fn publish(&self, s: &mut State) {
        let now = Instant::now();
        while s
            .recent
            .front()
            .is_some_and(|(t, _, _)| now.duration_since(*t) > WINDOW)
        {
            s.recent.pop_front();
        }
        let (lines, bytes) = rates(&s.recent, now);
        self.metrics.rows_per_second.set(lines);
        self.metrics.bytes_pending.set(s.bytes_pending as i64);
        self.metrics.files_pending.set(s.files_pending as i64);
        self.metrics
            .eta_seconds
            .set(eta(s.bytes_pending, bytes).unwrap_or(-1.0));
    }

    /// One status line, rewritten every second.
    pub fn line(&self) -> String {
        let mut s = self.state();
        self.publish(&mut s);
        let (lines, bytes) = rates(&s.recent, Instant::now());
        let eta = match eta(s.bytes_pending, bytes) {
            Some(e) => format_duration(e),
            None => "—".to_string(),
        };
        format!(
            "load: {} files, {:.1} MiB pending · {:.0} rows/s · ETA {eta}",
            s.files_pending,
            s.bytes_pending as f64 / (1 << 20) as f64,
            lines
        )
    }

    pub fn spawn_display(
        self: &std::sync::Arc<Self>,
        stop: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {
                        let mut err = std::io::stderr();
                        let _ = write!(err, "\r\x1b[2K{}", me.line());
                        let _ = err.flush();
                    }
                }
            }
        })
    }
}

pub(crate) fn format_duration(secs: f64) -> String {
    let s = secs.round() as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_and_eta() {
        let t0 = Instant::now();
        let mut q = VecDeque::new();
        q.push_back((t0, 1000, 2_500_000));
        q.push_back((t0 + Duration::from_secs(1), 1000, 2_500_000));
        let (lines, bytes) = rates(&q, t0 + Duration::from_secs(2));
        assert!((lines - 1000.0).abs() < 1e-6);
        assert!((bytes - 2_500_000.0).abs() < 1e-6);
        assert_eq!(eta(5_000_000, bytes), Some(2.0));
        assert_eq!(eta(0, 0.0), Some(0.0));
        assert_eq!(eta(1, 0.0), None);
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(format_duration(5.2), "5s");
        assert_eq!(format_duration(80.0), "1m20s");
        assert_eq!(format_duration(7260.0), "2h01m");
    }
}
