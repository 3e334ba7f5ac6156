//! The consumer's callbacks and what it knows per partition: rebalances (so
//! a batch never commits for a partition this process no longer owns), the
//! lag measured from the broker's watermarks, and librdkafka's own logs,
//! throttled.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::statistics::Statistics;
use rdkafka::TopicPartitionList;

use super::IngestMetrics;
use crate::kafka::QuietContext;

type Tp = (String, i32);

#[derive(Default)]
struct PartitionState {
    /// Epoch at which this partition was last revoked.
    revoked_at: u64,
    /// Timestamp (ms) of the last message whose offset was committed.
    committed_ts: Option<i64>,
    /// Timestamp (ms) of the first message received since the last commit.
    first_pending_ts: Option<i64>,
    /// The group's committed offset (the next to read) as this process
    /// knows it: read from the coordinator once, then what it committed.
    committed_offset: Option<i64>,
    /// The partition's end as the last fetch response gave it (librdkafka's
    /// statistics): a second source beside the broker's answer to a query.
    fetched_high: Option<i64>,
    /// Lag from the last measurement.
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

/// Messages between the group's committed offset and the end of the
/// partition; with no committed offset the group starts at the beginning
/// (`auto.offset.reset = earliest`).
pub fn lag_of(committed: Option<i64>, low: i64, high: i64) -> i64 {
    let from = committed.filter(|c| *c >= 0).unwrap_or(low).max(low);
    (high - from).max(0)
}

/// Age in seconds of the oldest message not committed: 0 when caught up;
/// else from the first message received since the last commit, or the last
/// committed one when none is in hand (an upper bound).
pub fn lag_seconds(
    lag: i64,
    first_pending_ts: Option<i64>,
    committed_ts: Option<i64>,
    now_ms: i64,
) -> f64 {
    if lag == 0 {
        return 0.0;
    }
    first_pending_ts
        .or(committed_ts)
        .map(|ts| ((now_ms - ts).max(0) as f64) / 1000.0)
        .unwrap_or(0.0)
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

    /// A message was received: the first since the last commit dates the lag.
    pub fn seen(&self, topic: &str, partition: i32, ts: Option<i64>) {
        let mut parts = self.parts();
        let p = parts.entry((topic.to_string(), partition)).or_default();
        if p.first_pending_ts.is_none() {
            p.first_pending_ts = ts;
        }
    }

    /// Offsets up to `next` were committed; `ts` is the last message's time.
    pub fn committed(&self, topic: &str, partition: i32, next: i64, ts: Option<i64>) {
        let mut parts = self.parts();
        let p = parts.entry((topic.to_string(), partition)).or_default();
        if ts.is_some() {
            p.committed_ts = ts;
        }
        p.committed_offset = Some(next);
        p.first_pending_ts = None;
    }

    /// The committed offset this process knows for a partition, if any.
    pub fn committed_offset(&self, topic: &str, partition: i32) -> Option<i64> {
        self.parts()
            .get(&(topic.to_string(), partition))
            .and_then(|p| p.committed_offset)
    }

    /// Records what the coordinator holds for a partition not committed here yet.
    pub fn learn_committed(&self, topic: &str, partition: i32, epoch: u64, offset: i64) {
        let mut parts = self.parts();
        let p = parts.entry((topic.to_string(), partition)).or_default();
        if p.revoked_at > epoch {
            return;
        }
        p.committed_offset.get_or_insert(offset);
    }

    /// A measurement of a partition's watermarks, taken for the assignment
    /// as it was at `epoch`: sets the lag gauges, unless the partition was
    /// revoked since.
    /// `high` is the larger of what the broker answered and how far this
    /// consumer has read (`position`): both are ends the partition reached.
    pub fn measured(&self, topic: &str, partition: i32, epoch: u64, low: i64, high: i64) {
        let now = now_ms();
        let mut parts = self.parts();
        let p = parts.entry((topic.to_string(), partition)).or_default();
        if p.revoked_at > epoch {
            return;
        }
        let high = high.max(p.fetched_high.unwrap_or(0));
        let lag = lag_of(p.committed_offset, low, high);
        p.lag = Some(lag);
        let secs = lag_seconds(lag, p.first_pending_ts, p.committed_ts, now);
        let labels = [topic, &partition.to_string()];
        self.metrics
            .lag_messages
            .with_label_values(&labels)
            .set(lag);
        self.metrics
            .lag_seconds
            .with_label_values(&labels)
            .set(secs);
    }

    /// Every assigned partition was measured and has no lag.
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

    fn stats(&self, stats: Statistics) {
        self.record_fetched(&stats);
    }
}

impl IngestContext {
    /// The end of each partition as the fetches saw it. The lag itself is
    /// measured on a timer ([`IngestContext::measured`]): statistics only
    /// arrive while the consumer polls, and not for paused partitions.
    fn record_fetched(&self, stats: &Statistics) {
        let mut parts = self.parts();
        for (topic, t) in &stats.topics {
            for (pid, p) in &t.partitions {
                if *pid < 0 || !p.desired || p.hi_offset < 0 {
                    continue;
                }
                if let Some(state) = parts.get_mut(&(topic.clone(), *pid)) {
                    state.fetched_high = Some(state.fetched_high.unwrap_or(0).max(p.hi_offset));
                }
            }
        }
    }
}

impl ConsumerContext for IngestContext {
    /// The coordinator's answer to an asynchronous commit.
    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        let refused = offsets.elements().iter().any(|e| e.error().is_err());
        if let Err(e) = result {
            self.metrics.commit_errors.inc();
            tracing::warn!(error = %e, "offset commit failed after the database commit; the batch will be redelivered and skipped as duplicates");
        } else if refused {
            self.metrics.commit_errors.inc();
            tracing::warn!("offset commit refused for some partitions after the database commit; their messages will be redelivered and skipped as duplicates");
        }
    }

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
                    // Its next owner commits from now on.
                    p.committed_offset = None;
                    p.fetched_high = None;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_counts_from_the_committed_offset_or_the_start() {
        assert_eq!(lag_of(Some(40), 0, 100), 60);
        assert_eq!(
            lag_of(None, 0, 100),
            100,
            "a new group reads from the start"
        );
        assert_eq!(lag_of(Some(-1001), 10, 100), 90, "no committed offset");
        assert_eq!(
            lag_of(Some(5), 10, 100),
            90,
            "retention removed what was committed"
        );
        assert_eq!(lag_of(Some(100), 0, 100), 0);
        assert_eq!(lag_of(Some(120), 0, 100), 0);
    }

    #[test]
    fn lag_seconds_date_from_the_oldest_message_in_hand() {
        assert_eq!(lag_seconds(0, Some(1_000), Some(500), 9_000), 0.0);
        assert_eq!(lag_seconds(3, Some(1_000), Some(500), 9_000), 8.0);
        assert_eq!(lag_seconds(3, None, Some(500), 9_000), 8.5);
        assert_eq!(lag_seconds(3, None, None, 9_000), 0.0);
    }
}
