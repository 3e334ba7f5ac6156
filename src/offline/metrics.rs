//! Offline file writer metrics (`switchyard_route_offline_*`: the router writes).

use prometheus::{Histogram, IntCounter, IntCounterVec, IntGauge, Registry};

use crate::metrics::{counter, counter_vec, histogram, int_gauge, zero};

/// Offline file writer metrics.
#[derive(Clone)]
pub struct OfflineMetrics {
    pub rotations: IntCounterVec,
    pub fsync_seconds: Histogram,
    pub write_errors: IntCounter,
    pub repaired_files: IntCounter,
    pub torn_bytes: IntCounter,
    pub lines: IntCounter,
    pub bytes: IntCounter,
    pub current_file_bytes: IntGauge,
    pub close_retries: IntCounterVec,
}

impl OfflineMetrics {
    pub fn new(reg: &Registry) -> prometheus::Result<OfflineMetrics> {
        let m = OfflineMetrics {
            rotations: counter_vec(
                reg,
                "switchyard_route_offline_rotations_total",
                "Offline files closed, by reason (size, age, shutdown, error)",
                &["reason"],
            )?,
            fsync_seconds: histogram(
                reg,
                "switchyard_route_offline_fsync_duration_seconds",
                "Time spent in fdatasync of the offline file",
            )?,
            write_errors: counter(
                reg,
                "switchyard_route_offline_write_errors_total",
                "Offline file writes or syncs that failed (disk full, unwritable)",
            )?,
            repaired_files: counter(
                reg,
                "switchyard_route_offline_repaired_files_total",
                "Files left open by a crash and closed at start",
            )?,
            torn_bytes: counter(
                reg,
                "switchyard_route_offline_torn_bytes_total",
                "Bytes of torn tails cut from files left open by a crash",
            )?,
            lines: counter(
                reg,
                "switchyard_route_offline_lines_total",
                "Lines written to offline files",
            )?,
            bytes: counter(
                reg,
                "switchyard_route_offline_bytes_total",
                "Bytes written to offline files",
            )?,
            current_file_bytes: int_gauge(
                reg,
                "switchyard_route_offline_current_file_bytes",
                "Size of the offline file being written",
            )?,
            close_retries: counter_vec(
                reg,
                "switchyard_route_offline_close_retries_total",
                "Retried closes of offline files left open by a failed sync, rename or folder sync, by outcome (ok, failed)",
                &["outcome"],
            )?,
        };
        zero(&m.close_retries, &[&["ok"], &["failed"]]);
        Ok(m)
    }
}
