//! The consumer's callbacks: rebalances (so a batch never commits for a
//! partition this process no longer owns), statistics (lag per partition) and
//! librdkafka's own logs, throttled.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::statistics::Statistics;

use super::IngestMetrics;
use crate::kafka::QuietContext;

type Tp = (String, i32);

#[derive(Default)]
struct PartitionState {
    /// Epoch at which this partition was last revoked.
    revoked_at: u64,
    /// Timestamp (ms) of the last message whose offset was committed.
    committed_ts: Option<i64>,
    /// Timestamp (ms) of the first message seen since the last commit.
    first_pending_ts: Option<i64>,
    /// Lag from the last statistics.
    lag: Option<i64>,
}

pub struct IngestContext {
    metrics: IngestMetrics,
    quiet: QuietContext,
    epoch: AtomicU64,
    partitions: Mutex<HashMap<Tp, PartitionState>>,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl IngestContext {
    pub fn new(metrics: IngestMetrics) -> IngestContext {
        IngestContext {
            metrics,
            quiet: QuietContext::default(),
            epoch: AtomicU64::new(0),
            partitions: Mutex::new(HashMap::new()),
        }
    }

    fn parts(&self) -> std::sync::MutexGuard<'_, HashMap<Tp, PartitionState>> {
        self.partitions.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// Was the partition revoked after a message read at `epoch`?
    pub fn revoked_since(&self, topic: &str, partition: i32, epoch: u64) -> bool {
        self.parts()
            .get(&(topic.to_string(), partition))
            .is_some_and(|p| p.revoked_at > epoch)
    }

    pub fn seen(&self, topic: &str, partition: i32, ts: Option<i64>) {
        let mut parts = self.parts();
        let p = parts.entry((topic.to_string(), partition)).or_default();
        if p.first_pending_ts.is_none() {
            p.first_pending_ts = ts;
        }
    }

    pub fn committed(&self, topic: &str, partition: i32, ts: Option<i64>) {
        let mut parts = self.parts();
        let p = parts.entry((topic.to_string(), partition)).or_default();
        if ts.is_some() {
            p.committed_ts = ts;
        }
        p.first_pending_ts = None;
    }

    /// Every partition known from the statistics has no lag.
    pub fn caught_up(&self) -> bool {
        let parts = self.parts();
        let known: Vec<i64> = parts.values().filter_map(|p| p.lag).collect();
        !known.is_empty() && known.iter().all(|l| *l == 0)
    }

    pub fn report_error(&self, e: &KafkaError) {
        self.quiet.error(e.clone(), "consumer error");
    }
}

impl ClientContext for IngestContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        self.quiet.log(level, fac, log_message)
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.quiet.error(error, reason)
    }

    /// Lag per partition: the end of the partition minus the committed
    /// offset; in seconds, the age of the oldest message not committed
    /// (estimated from the first one this process saw after its last commit,
    /// or the last committed one when none is in hand).
    fn stats(&self, stats: Statistics) {
        let now = now_ms();
        let mut parts = self.parts();
        for (topic, t) in &stats.topics {
            for (pid, p) in &t.partitions {
                if *pid < 0 || !p.desired {
                    continue;
                }
                let end = p.hi_offset;
                let from = if p.committed_offset >= 0 {
                    p.committed_offset
                } else if p.lo_offset >= 0 {
                    p.lo_offset
                } else {
                    continue;
                };
                if end < 0 {
                    continue;
                }
                let lag = (end - from).max(0);
                let state = parts.entry((topic.clone(), *pid)).or_default();
                state.lag = Some(lag);
                let secs = if lag == 0 {
                    0.0
                } else {
                    state
                        .first_pending_ts
                        .or(state.committed_ts)
                        .map(|ts| ((now - ts).max(0) as f64) / 1000.0)
                        .unwrap_or(0.0)
                };
                let labels = [topic.as_str(), &pid.to_string()];
                self.metrics
                    .lag_messages
                    .with_label_values(&labels)
                    .set(lag);
                self.metrics
                    .lag_seconds
                    .with_label_values(&labels)
                    .set(secs);
            }
        }
    }
}

impl ConsumerContext for IngestContext {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                let epoch = self.epoch.fetch_add(1, Ordering::SeqCst) + 1;
                let mut parts = self.parts();
                for e in tpl.elements() {
                    let p = parts
                        .entry((e.topic().to_string(), e.partition()))
                        .or_default();
                    p.revoked_at = epoch;
                    p.lag = None;
                    p.first_pending_ts = None;
                    let labels = [e.topic(), &e.partition().to_string()];
                    // This process no longer reports for it.
                    let _ = self.metrics.lag_messages.remove_label_values(&labels);
                    let _ = self.metrics.lag_seconds.remove_label_values(&labels);
                }
                self.metrics.rebalances.with_label_values(&["revoke"]).inc();
                tracing::info!(partitions = tpl.count(), "partitions revoked");
            }
            Rebalance::Assign(tpl) => {
                self.metrics.rebalances.with_label_values(&["assign"]).inc();
                tracing::info!(partitions = tpl.count(), "partitions assigned");
            }
            Rebalance::Error(e) => {
                tracing::warn!(error = %e, "rebalance error");
            }
        }
    }
}
