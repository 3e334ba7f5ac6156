//! The replayer: drains the replay spool (Kafka-bound offline lines the loader
//! committed with their batch) to Kafka, oldest first. It runs beside the
//! loader, so OLD keeps loading while Kafka is down; the spool holds what is
//! due to Kafka until it is back.
//!
//! An entry leaves the spool only after Kafka acknowledged it (at least once:
//! a crash between the acknowledgement and the delete produces it again, and
//! the consumers insert idempotently on the key), or after Kafka refused it
//! for good (authorisation, a missing topic, a message too large): then it
//! moves to the dead-letter table with Kafka's reason, counted, instead of
//! being retried forever.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::KafkaSettings;
use crate::db::{Db, DbError, Spooled};
use crate::kafka::KafkaSink;
use crate::routing::Route;
use crate::shutdown::Backoff;

use super::LoadMetrics;

/// Entries produced per round.
const BATCH: usize = 500;
/// How often the backlog gauges are refreshed at most (a COUNT over the spool).
const BACKLOG_EVERY: Duration = Duration::from_secs(1);

/// Where Kafka-fallback lines are replayed. Without it they are loaded into
/// the old database like any other line.
#[derive(Clone)]
pub struct Replay {
    pub sink: KafkaSink,
}

impl Replay {
    pub fn new(
        brokers: &str,
        settings: &KafkaSettings,
        extra: &[(String, String)],
        metrics: &LoadMetrics,
    ) -> Result<Replay, crate::kafka::SinkError> {
        Ok(Replay {
            sink: KafkaSink::new(brokers, settings, extra, metrics.kafka.clone())?,
        })
    }
}

/// What the replayer did.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Replayed {
    pub delivered: u64,
    pub refused: u64,
}

/// Tells the replayer what the loader is doing.
pub(super) struct Signals {
    /// The loader committed new spool entries.
    pub spooled: Notify,
    /// The loader finished (`--once`): drain what is left, then stop.
    pub loading_done: AtomicBool,
}

impl Signals {
    pub fn new() -> Signals {
        Signals {
            spooled: Notify::new(),
            loading_done: AtomicBool::new(false),
        }
    }
}

pub(super) struct Replayer<'a> {
    pub db: &'a Db,
    pub replay: &'a Replay,
    pub metrics: &'a LoadMetrics,
    pub stop: &'a CancellationToken,
    pub signals: &'a Signals,
    pub poll: Duration,
}

impl Replayer<'_> {
    /// Runs until `stop` is cancelled, or the loader is done and the spool
    /// is empty.
    pub async fn run(&self) -> Replayed {
        let mut done = Replayed::default();
        let mut kafka = Backoff::default();
        let mut database = Backoff::default();
        let mut backlog_at: Option<Instant> = None;
        while !self.stop.is_cancelled() {
            if backlog_at.is_none_or(|t| t.elapsed() >= BACKLOG_EVERY) {
                self.refresh_backlog().await;
                backlog_at = Some(Instant::now());
            }
            let finishing = self.signals.loading_done.load(Ordering::Acquire);
            let batch = match self.db.replay_next(BATCH).await {
                Ok(b) => b,
                Err(e) => {
                    if !self.pause_db(&mut database, &e).await {
                        break;
                    }
                    continue;
                }
            };
            database = Backoff::default();
            if batch.is_empty() {
                if finishing {
                    break;
                }
                tokio::select! {
                    _ = self.stop.cancelled() => break,
                    _ = self.signals.spooled.notified() => {}
                    _ = tokio::time::sleep(self.poll) => {}
                }
                continue;
            }
            let round = self.produce(&batch).await;
            done.delivered += round.delivered.len() as u64;
            done.refused += round.refused.len() as u64;
            if !self.settle(&round).await {
                break;
            }
            backlog_at = None;
            match round.outage {
                Some(e) => {
                    if !kafka
                        .pause(self.stop, &self.metrics.sink.retries, "kafka", &e)
                        .await
                    {
                        break;
                    }
                }
                None => kafka = Backoff::default(),
            }
        }
        self.refresh_backlog().await;
        done
    }

    async fn produce<'b>(&self, batch: &'b [Spooled]) -> Round<'b> {
        let msgs: Vec<(u64, &[u8], Route)> = batch
            .iter()
            .map(|s| {
                let route = if s.route == Route::Dual.as_str() {
                    Route::Dual
                } else {
                    Route::Kafka
                };
                (s.account_id, s.envelope.as_bytes(), route)
            })
            .collect();
        let results = self.replay.sink.deliver(&msgs).await;
        let mut round = Round::default();
        for ((s, (_, _, route)), res) in batch.iter().zip(&msgs).zip(results) {
            match res {
                Ok(()) => {
                    self.metrics
                        .replayed
                        .with_label_values(&[route.as_str()])
                        .inc();
                    round.delivered.push(s.id);
                }
                Err(e) if e.is_permanent() => {
                    tracing::error!(source = %s.source, error = %e, "Kafka refused a spooled line for good; moved to the dead-letter table");
                    round.refused.push((s, e.message));
                }
                Err(e) => {
                    round.outage.get_or_insert(e);
                }
            }
        }
        round
    }

    /// Records the round in the spool, waiting out a database outage. False
    /// if stopped first (what was not recorded is produced again next time).
    async fn settle(&self, round: &Round<'_>) -> bool {
        let mut backoff = Backoff::default();
        loop {
            match self.db.replay_delivered(&round.delivered).await {
                Ok(()) => break,
                Err(e) => {
                    if !self.pause_db(&mut backoff, &e).await {
                        return false;
                    }
                }
            }
        }
        loop {
            match self.db.replay_refused(&round.refused).await {
                Ok(()) => break,
                Err(e) => {
                    if !self.pause_db(&mut backoff, &e).await {
                        return false;
                    }
                }
            }
        }
        self.metrics
            .sink
            .dead_letters
            .with_label_values(&["kafka_refused"])
            .inc_by(round.refused.len() as u64);
        true
    }

    async fn pause_db(&self, backoff: &mut Backoff, e: &DbError) -> bool {
        if !e.is_transient() {
            // The loader meets the same error and stops the role; until
            // then, do not spin.
            tracing::error!(error = %e, "replay spool");
        }
        backoff
            .pause(self.stop, &self.metrics.sink.retries, "database", e)
            .await
    }

    async fn refresh_backlog(&self) {
        match self.db.replay_backlog().await {
            Ok((lines, oldest)) => {
                self.metrics.replay_backlog.set(lines as i64);
                let age = oldest.map_or(0.0, |at| {
                    let now = SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .map_or(0, |d| d.as_micros() as i64);
                    (now - at).max(0) as f64 / 1e6
                });
                self.metrics.replay_oldest_seconds.set(age);
            }
            Err(e) => tracing::debug!(error = %e, "cannot read the replay backlog"),
        }
    }
}

#[derive(Default)]
struct Round<'b> {
    delivered: Vec<i64>,
    refused: Vec<(&'b Spooled, String)>,
    /// The first failure that says Kafka is unwell: wait before the next round.
    outage: Option<crate::kafka::DeliveryError>,
}
