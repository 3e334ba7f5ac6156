//! The ingestion consumer's metrics: `switchyard_ingest_*`.

use prometheus::{GaugeVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry};

use crate::db::SinkMetrics;
use crate::metrics::{counter, counter_vec, zero};

/// The Kafka ingestion consumer.
#[derive(Clone)]
pub struct IngestMetrics {
    pub sink: SinkMetrics,
    pub messages: IntCounter,
    pub lag_messages: IntGaugeVec,
    pub lag_seconds: GaugeVec,
    pub rebalances: IntCounterVec,
    pub commit_errors: IntCounter,
    pub dropped_revoked: IntCounter,
}

impl IngestMetrics {
    pub fn new(reg: &Registry) -> prometheus::Result<IngestMetrics> {
        let lag_messages = IntGaugeVec::new(
            Opts::new(
                "switchyard_ingest_lag_messages",
                "Messages between the committed offset and the end of the partition",
            ),
            &["topic", "partition"],
        )?;
        reg.register(Box::new(lag_messages.clone()))?;
        let lag_seconds = GaugeVec::new(
            Opts::new(
                "switchyard_ingest_lag_seconds",
                "Age of the oldest message not yet committed (0 when caught up)",
            ),
            &["topic", "partition"],
        )?;
        reg.register(Box::new(lag_seconds.clone()))?;
        let m = IngestMetrics {
            sink: SinkMetrics::new(reg, "ingest")?,
            messages: counter(
                reg,
                "switchyard_ingest_messages_total",
                "Messages consumed",
            )?,
            lag_messages,
            lag_seconds,
            rebalances: counter_vec(
                reg,
                "switchyard_ingest_rebalances_total",
                "Partition assignments and revocations",
                &["kind"],
            )?,
            commit_errors: counter(
                reg,
                "switchyard_ingest_offset_commit_errors_total",
                "Offset commits that failed after the database commit (rows are redelivered and skipped as duplicates)",
            )?,
            dropped_revoked: counter(
                reg,
                "switchyard_ingest_revoked_dropped_total",
                "Messages dropped uncommitted from a batch because their partition was revoked",
            )?,
        };
        zero(&m.rebalances, &[&["assign"], &["revoke"]]);
        Ok(m)
    }
}
