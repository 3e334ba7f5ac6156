//! The backfill's metrics: `switchyard_backfill_*`. One process copies one
//! table, so no series carries a table label; `outcome` and `database` are
//! fixed sets.

use prometheus::{Counter, Gauge, Histogram, IntCounter, IntCounterVec, IntGauge, Registry};

use crate::metrics::{counter, counter_vec, gauge, histogram, int_gauge, zero};

/// What became of a row read from OLD.
pub const OUTCOMES: [&str; 5] = [
    "inserted",
    "duplicate",
    "conflict",
    "overwritten",
    "rejected",
];

#[derive(Clone)]
pub struct BackfillMetrics {
    pub rows_read: IntCounter,
    /// By outcome: [`OUTCOMES`].
    pub rows: IntCounterVec,
    pub chunks: IntCounter,
    /// Rows of OLD the stored checkpoint covers, this run and earlier ones.
    pub checkpoint_rows: IntGauge,
    pub remaining_rows: IntGauge,
    pub rate: Gauge,
    pub eta: Gauge,
    pub done: IntGauge,
    /// By database: `old`, `new`.
    pub retries: IntCounterVec,
    pub throttled: Counter,
    pub chunk_seconds: Histogram,
}

impl BackfillMetrics {
    pub fn new(reg: &Registry) -> prometheus::Result<BackfillMetrics> {
        let throttled = Counter::new(
            "switchyard_backfill_throttled_seconds_total",
            "Time spent waiting for --max-rows-per-sec",
        )?;
        reg.register(Box::new(throttled.clone()))?;
        let m = BackfillMetrics {
            rows_read: counter(
                reg,
                "switchyard_backfill_rows_read_total",
                "Rows read from OLD",
            )?,
            rows: counter_vec(
                reg,
                "switchyard_backfill_rows_total",
                "Rows handled in NEW, by outcome: inserted, duplicate (same content there), \
                 conflict (other content there, kept), overwritten (other content, replaced), \
                 rejected (dead-lettered)",
                &["outcome"],
            )?,
            chunks: counter(
                reg,
                "switchyard_backfill_chunks_total",
                "Chunks committed to NEW with their checkpoint",
            )?,
            checkpoint_rows: int_gauge(
                reg,
                "switchyard_backfill_checkpoint_rows",
                "Rows of the range the stored checkpoint covers (every run)",
            )?,
            remaining_rows: int_gauge(
                reg,
                "switchyard_backfill_remaining_rows",
                "Rows of the range above the checkpoint, as counted at start less those done since",
            )?,
            rate: gauge(
                reg,
                "switchyard_backfill_rate_rows_per_second",
                "Rows per second over the last seconds",
            )?,
            eta: gauge(
                reg,
                "switchyard_backfill_eta_seconds",
                "Seconds left at the current rate (-1 while no rate is known)",
            )?,
            done: int_gauge(
                reg,
                "switchyard_backfill_done",
                "1 once every row of the range is covered",
            )?,
            retries: counter_vec(
                reg,
                "switchyard_backfill_retries_total",
                "Transient database errors retried, by database",
                &["database"],
            )?,
            throttled,
            chunk_seconds: histogram(
                reg,
                "switchyard_backfill_chunk_write_seconds",
                "Time to write one chunk and its checkpoint to NEW",
            )?,
        };
        let outcomes: Vec<[&str; 1]> = OUTCOMES.iter().map(|o| [*o]).collect();
        let outcomes: Vec<&[&str]> = outcomes.iter().map(|o| &o[..]).collect();
        zero(&m.rows, &outcomes);
        zero(&m.retries, &[&["old"], &["new"]]);
        m.eta.set(-1.0);
        Ok(m)
    }
}
