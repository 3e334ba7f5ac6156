//! The legacy loader's metrics: `switchyard_load_*`.

use prometheus::{Gauge, IntCounter, IntCounterVec, IntGauge, Registry};

use crate::db::SinkMetrics;
use crate::kafka::KafkaMetrics;
use crate::metrics::{counter, counter_vec, gauge, int_gauge, zero};

/// The legacy loader.
#[derive(Clone)]
pub struct LoadMetrics {
    pub sink: SinkMetrics,
    pub files_pending: IntGauge,
    pub bytes_pending: IntGauge,
    pub files_loaded: IntCounter,
    pub bytes_loaded: IntCounter,
    pub rows_per_second: Gauge,
    pub eta_seconds: Gauge,
    /// Fallback lines produced to Kafka, by original route (`kafka`, `dual`).
    pub replayed: IntCounterVec,
    /// Fallback lines whose Kafka leg was not replayed (`--no-replay`), by
    /// the payload's route: NEW will never hold these rows.
    pub replay_skipped: IntCounterVec,
    /// Lines in the replay spool, waiting for Kafka.
    pub replay_backlog: IntGauge,
    /// Age of the oldest line in the replay spool (0 when empty).
    pub replay_oldest_seconds: Gauge,
    pub kafka: KafkaMetrics,
}

impl LoadMetrics {
    pub fn new(reg: &Registry) -> prometheus::Result<LoadMetrics> {
        let m = LoadMetrics {
            sink: SinkMetrics::new(reg, "load")?,
            files_pending: int_gauge(
                reg,
                "switchyard_load_files_pending",
                "Closed offline files not yet fully loaded",
            )?,
            bytes_pending: int_gauge(
                reg,
                "switchyard_load_bytes_pending",
                "Bytes of offline files not yet loaded",
            )?,
            files_loaded: counter(
                reg,
                "switchyard_load_files_total",
                "Offline files fully loaded (then deleted or archived)",
            )?,
            bytes_loaded: counter(
                reg,
                "switchyard_load_bytes_total",
                "Bytes of offline files loaded",
            )?,
            rows_per_second: gauge(
                reg,
                "switchyard_load_rows_per_second",
                "Lines loaded per second over the last 10 s",
            )?,
            eta_seconds: gauge(
                reg,
                "switchyard_load_eta_seconds",
                "Estimated time to load the backlog at the current rate (-1: unknown)",
            )?,
            replayed: counter_vec(
                reg,
                "switchyard_load_replayed_total",
                "Kafka fallback lines produced to Kafka, by the payload's route",
                &["route"],
            )?,
            replay_skipped: counter_vec(
                reg,
                "switchyard_load_replay_skipped_total",
                "Kafka fallback lines not replayed to Kafka (--no-replay), by the payload's route: rows NEW will not have",
                &["route"],
            )?,
            replay_backlog: int_gauge(
                reg,
                "switchyard_load_replay_backlog_lines",
                "Kafka fallback lines in the replay spool, waiting for Kafka",
            )?,
            replay_oldest_seconds: gauge(
                reg,
                "switchyard_load_replay_oldest_seconds",
                "Age of the oldest line in the replay spool (0 when empty)",
            )?,
            kafka: KafkaMetrics::new(reg, "load")?,
        };
        zero(&m.replayed, &[&["kafka"], &["dual"]]);
        zero(&m.replay_skipped, &[&["kafka"], &["dual"]]);
        Ok(m)
    }
}
