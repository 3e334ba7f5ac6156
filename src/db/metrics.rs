//! What every database-writing role reports: `switchyard_<role>_*`.

use prometheus::{Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, Registry};

use crate::metrics::{counter, counter_vec, gauge, histogram, zero};

/// Rows per batch: 1 to 10,000.
const BATCH_BUCKETS: &[f64] = &[
    1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2000.0, 3000.0, 5000.0, 10000.0,
];

/// What every database-writing role reports: `switchyard_<role>_*`.
#[derive(Clone)]
pub struct SinkMetrics {
    /// Rows by table and outcome (`inserted`, `duplicate`).
    pub rows: IntCounterVec,
    pub batches: IntCounter,
    pub batch_rows: Histogram,
    pub insert_seconds: Histogram,
    /// Retries by reason (`database`, `kafka`).
    pub retries: IntCounterVec,
    /// Dead-lettered inputs by reason (`parse`, `schema`, `rejected`).
    pub dead_letters: IntCounterVec,
    /// Unix time of the last database commit.
    pub last_commit: Gauge,
    /// Rows whose key was stored with other content, by table and what was
    /// done (`kept`: the stored row stays; `replaced`: last write wins).
    pub conflicts: IntCounterVec,
}

impl SinkMetrics {
    pub fn new(reg: &Registry, role: &str) -> prometheus::Result<SinkMetrics> {
        let batch_rows = Histogram::with_opts(
            HistogramOpts::new(
                format!("switchyard_{role}_batch_rows"),
                "Rows per committed batch",
            )
            .buckets(BATCH_BUCKETS.to_vec()),
        )?;
        reg.register(Box::new(batch_rows.clone()))?;
        let m = SinkMetrics {
            rows: counter_vec(
                reg,
                &format!("switchyard_{role}_rows_total"),
                "Rows written, by table and outcome (inserted, duplicate: key already present)",
                &["table", "outcome"],
            )?,
            batches: counter(
                reg,
                &format!("switchyard_{role}_batches_total"),
                "Batches committed",
            )?,
            batch_rows,
            insert_seconds: histogram(
                reg,
                &format!("switchyard_{role}_insert_duration_seconds"),
                "Time to write and commit one batch",
            )?,
            retries: counter_vec(
                reg,
                &format!("switchyard_{role}_retries_total"),
                "Batches retried after a transient failure, by what failed",
                &["reason"],
            )?,
            dead_letters: counter_vec(
                reg,
                &format!("switchyard_{role}_dead_letters_total"),
                "Inputs sent to the dead letter, by reason (parse, schema, rejected; for load also kafka_refused)",
                &["reason"],
            )?,
            conflicts: counter_vec(
                reg,
                &format!("switchyard_{role}_conflicts_total"),
                "Rows whose key was already stored with other content, by table and resolution (kept: the stored row stays and the arriving one is dead-lettered; replaced: last write wins)",
                &["table", "resolution"],
            )?,
            last_commit: gauge(
                reg,
                &format!("switchyard_{role}_last_commit_timestamp_seconds"),
                "Unix time of the last successful database commit",
            )?,
        };
        zero(&m.retries, &[&["database"], &["kafka"]]);
        zero(
            &m.dead_letters,
            &[&["parse"], &["schema"], &["rejected"], &["kafka_refused"]],
        );
        Ok(m)
    }

    /// Records a committed batch: its duration and size, and per table what
    /// was inserted or skipped. Returns the totals.
    pub fn committed<'t>(
        &self,
        elapsed: std::time::Duration,
        batch_rows: usize,
        tables: impl IntoIterator<Item = (&'t str, &'t super::Written)>,
    ) -> super::Written {
        self.insert_seconds.observe(elapsed.as_secs_f64());
        self.batch_rows.observe(batch_rows as f64);
        let mut total = super::Written::default();
        for (table, w) in tables {
            self.rows
                .with_label_values(&[table, "inserted"])
                .inc_by(w.inserted);
            self.rows
                .with_label_values(&[table, "duplicate"])
                .inc_by(w.duplicates);
            for c in &w.conflicts {
                let how = if c.replaced { "replaced" } else { "kept" };
                self.conflicts.with_label_values(&[table, how]).inc();
            }
            total.inserted += w.inserted;
            total.duplicates += w.duplicates;
            total.conflicts.extend(w.conflicts.iter().cloned());
        }
        self.batches.inc();
        self.last_commit.set(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
        );
        total
    }
}
