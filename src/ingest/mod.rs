//! `switchyard ingest`: the Kafka ingestion consumer. Messages are gathered
//! into batches (up to `batch_size`, or `consumer_timeout` after the first
//! one), inserted into the NEW database in one transaction that also records
//! the batch's poison messages, and only then are the offsets committed. A
//! crash anywhere replays the batch, and the idempotent insert skips what was
//! already written.

pub mod cli;
mod context;
mod metrics;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;

use crate::admin::Health;
use crate::db::{self, row_values, Db, DbError, DeadLetter, TableRows};

use crate::schema::{Schema, Table};
use crate::shutdown::Backoff;

use context::IngestContext;
pub use metrics::IngestMetrics;

/// How the consumer runs (the seed's command line).
#[derive(Debug, Clone)]
pub struct IngestOptions {
    pub brokers: String,
    pub topics: Vec<String>,
    pub group: String,
    /// Messages per transaction.
    pub batch_size: usize,
    /// The longest a partial batch waits for more messages.
    pub consumer_timeout: Duration,
    /// Any librdkafka consumer property (`--kafka-config`); wins over defaults.
    pub extra: Vec<(String, String)>,
    /// Stop once every assigned partition is drained and idle this long
    /// (benchmarks and backfills); None runs until shutdown.
    pub idle_exit: Option<Duration>,
}

/// Why the consumer stopped.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("invalid Kafka consumer configuration: {0}")]
    Config(rdkafka::error::KafkaError),
    #[error("topic {topic:?} does not exist on {brokers}")]
    TopicMissing { topic: String, brokers: String },
    #[error("{0}")]
    Weakened(String),
    #[error("the Kafka brokers {brokers} refused the connection (TLS or SASL): {source}")]
    Refused {
        brokers: String,
        source: rdkafka::error::KafkaError,
    },
    #[error(transparent)]
    Db(#[from] DbError),
}

/// What a run did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct IngestSummary {
    pub messages: u64,
    pub inserted: u64,
    pub duplicates: u64,
    pub dead_letters: u64,
    pub batches: u64,
}

/// A consumed message, detached from the consumer.
struct Msg {
    topic: String,
    partition: i32,
    offset: i64,
    timestamp_ms: Option<i64>,
    payload: Vec<u8>,
    /// The revocation epoch when it was read.
    epoch: u64,
}

/// The envelope the router produces.
#[derive(serde::Deserialize)]
struct Envelope {
    table: String,
    row: Map<String, Value>,
}

pub async fn run(
    opts: IngestOptions,
    schema: &Schema,
    db: &Db,
    metrics: IngestMetrics,
    health: Health,
    shutdown: CancellationToken,
) -> Result<IngestSummary, IngestError> {
    crate::kafka::keeps_consumer_guarantees(&opts.extra).map_err(IngestError::Weakened)?;
    let ctx = IngestContext::new(metrics.clone());
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", &opts.brokers)
        .set("group.id", &opts.group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("statistics.interval.ms", "1000")
        // A batch of 2,000 rows of 2.5 KB is 5 MB: fetch in pieces that size,
        // not librdkafka's 1 MB per partition.
        .set("max.partition.fetch.bytes", "8388608")
        .set("fetch.max.bytes", "67108864");
    for (k, v) in &opts.extra {
        cfg.set(k, v);
    }
    let consumer: Arc<StreamConsumer<IngestContext>> =
        Arc::new(cfg.create_with_context(ctx).map_err(IngestError::Config)?);
    check_topics(&consumer, &opts).await?;
    let topics: Vec<&str> = opts.topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics).map_err(IngestError::Config)?;
    health.ready();
    tracing::info!(brokers = %opts.brokers, topics = ?opts.topics, group = %opts.group,
        batch_size = opts.batch_size, consumer_timeout_ms = opts.consumer_timeout.as_millis() as u64,
        "ingest consumer subscribed");

    let mut ingest = Ingest {
        schema,
        db,
        consumer: consumer.clone(),
        metrics,
        shutdown: &shutdown,
        summary: IngestSummary::default(),
    };
    let mut batch: Vec<Msg> = Vec::with_capacity(opts.batch_size);
    let mut deadline: Option<Instant> = None;
    let mut last_message = Instant::now();
    let idle_poll = Duration::from_millis(250);
    loop {
        let wait = deadline
            .map(|d| d.saturating_duration_since(Instant::now()))
            .unwrap_or(idle_poll);
        let received = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = tokio::time::timeout(wait, consumer.recv()) => r,
        };
        match received {
            Ok(Ok(m)) => {
                last_message = Instant::now();
                let msg = Msg {
                    topic: m.topic().to_string(),
                    partition: m.partition(),
                    offset: m.offset(),
                    timestamp_ms: m.timestamp().to_millis(),
                    payload: m.payload().unwrap_or_default().to_vec(),
                    epoch: consumer.context().epoch(),
                };
                batch.push(msg);
                deadline.get_or_insert_with(|| Instant::now() + opts.consumer_timeout);
            }
            Ok(Err(e)) if crate::kafka::is_refusal(&e) => {
                return Err(IngestError::Refused {
                    brokers: opts.brokers.clone(),
                    source: e,
                });
            }
            Ok(Err(e)) => {
                consumer.context().report_error(&e);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(_elapsed) => {
                if batch.is_empty() {
                    if let Some(idle) = opts.idle_exit {
                        if last_message.elapsed() >= idle && consumer.context().caught_up() {
                            break;
                        }
                    }
                }
            }
        }
        let due = deadline.is_some_and(|d| Instant::now() >= d);
        if batch.len() >= opts.batch_size || (due && !batch.is_empty()) {
            if !ingest.flush(std::mem::take(&mut batch)).await? {
                return Ok(ingest.summary);
            }
            deadline = None;
        }
    }
    // Shutting down: finish the batch in hand, commit, leave the group.
    if !batch.is_empty() {
        ingest.flush(batch).await?;
    }
    consumer.unsubscribe();
    Ok(ingest.summary)
}

/// A missing topic is a configuration error; an unreachable broker is not
/// (the consumer waits for it).
async fn check_topics(
    consumer: &Arc<StreamConsumer<IngestContext>>,
    opts: &IngestOptions,
) -> Result<(), IngestError> {
    let c = consumer.clone();
    let md = tokio::task::spawn_blocking(move || {
        c.fetch_metadata(None, rdkafka::util::Timeout::After(Duration::from_secs(10)))
    })
    .await;
    match md {
        Ok(Ok(md)) => {
            for t in &opts.topics {
                let found = md.topics().iter().any(|mt| {
                    mt.name() == t && mt.error().is_none() && !mt.partitions().is_empty()
                });
                if !found {
                    return Err(IngestError::TopicMissing {
                        topic: t.clone(),
                        brokers: opts.brokers.clone(),
                    });
                }
            }
            Ok(())
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, brokers = %opts.brokers, "cannot reach the brokers at start; waiting for them");
            Ok(())
        }
        Err(e) => {
            tracing::warn!(error = %e, "metadata check did not complete");
            Ok(())
        }
    }
}

struct Ingest<'a> {
    schema: &'a Schema,
    db: &'a Db,
    consumer: Arc<StreamConsumer<IngestContext>>,
    metrics: IngestMetrics,
    shutdown: &'a CancellationToken,
    summary: IngestSummary,
}

impl Ingest<'_> {
    /// Writes one batch and commits its offsets. False if shutdown came while
    /// waiting out an outage (nothing committed; the batch is redelivered).
    async fn flush(&mut self, mut batch: Vec<Msg>) -> Result<bool, IngestError> {
        let ctx = self.consumer.context();
        let before = batch.len();
        batch.retain(|m| !ctx.revoked_since(&m.topic, m.partition, m.epoch));
        let dropped = before - batch.len();
        if dropped > 0 {
            self.metrics.dropped_revoked.inc_by(dropped as u64);
            tracing::info!(
                dropped,
                "dropped messages of revoked partitions (their new owner reads them)"
            );
        }
        if batch.is_empty() {
            return Ok(true);
        }
        // Once per partition and batch, not per message: the oldest message
        // not yet committed, for the lag in seconds.
        let mut first: HashMap<(&str, i32), Option<i64>> = HashMap::new();
        for m in &batch {
            first
                .entry((m.topic.as_str(), m.partition))
                .or_insert(m.timestamp_ms);
        }
        for ((topic, partition), ts) in first {
            ctx.seen(topic, partition, ts);
        }
        self.metrics.messages.inc_by(batch.len() as u64);
        let mut rows: BTreeMap<usize, (TableRows, Vec<usize>)> = BTreeMap::new();
        let mut dead: Vec<DeadLetter> = Vec::new();
        for (i, m) in batch.iter().enumerate() {
            match self.classify(&m.payload) {
                Ok((t, values)) => {
                    let e = rows.entry(t).or_default();
                    e.0.rows.push(values);
                    e.1.push(i);
                }
                Err((reason, why)) => {
                    self.metrics
                        .sink
                        .dead_letters
                        .with_label_values(&[reason])
                        .inc();
                    dead.push(poison(m, why));
                }
            }
        }
        let mut backoff = Backoff::default();
        loop {
            let tables: Vec<(&Table, &TableRows)> = rows
                .iter()
                .map(|(t, (r, _))| (&self.schema.tables()[*t], r))
                .collect();
            let started = Instant::now();
            match self.db.write_batch(&tables, &dead, &[], None).await {
                Ok(written) => {
                    let tables = rows
                        .keys()
                        .map(|t| self.schema.tables()[*t].name.as_str())
                        .zip(&written);
                    let total = self
                        .metrics
                        .sink
                        .committed(started.elapsed(), batch.len(), tables);
                    self.summary.inserted += total.inserted;
                    self.summary.duplicates += total.duplicates;
                    tracing::debug!(
                        messages = batch.len(),
                        dead_letters = dead.len(),
                        "batch committed"
                    );
                    self.summary.messages += batch.len() as u64;
                    self.summary.dead_letters += dead.len() as u64;
                    self.summary.batches += 1;
                    break;
                }
                Err(DbError::Rejected(reason)) => {
                    tracing::warn!(%reason, "the database rejected a row; finding which");
                    let mut found = 0;
                    for (t, (r, idx)) in rows.iter_mut() {
                        let table = &self.schema.tables()[*t];
                        let bad = match db::find_rejected(self.db, table, r).await {
                            Ok(b) => b,
                            Err(e) if e.is_transient() => break,
                            Err(e) => return Err(e.into()),
                        };
                        for (i, why) in bad.into_iter().rev() {
                            r.rows.remove(i);
                            let m = &batch[idx.remove(i)];
                            dead.push(poison(m, format!("rejected by the database: {why}")));
                            found += 1;
                        }
                    }
                    self.metrics
                        .sink
                        .dead_letters
                        .with_label_values(&["rejected"])
                        .inc_by(found);
                    if found == 0
                        && !backoff
                            .pause(
                                self.shutdown,
                                &self.metrics.sink.retries,
                                "database",
                                &reason,
                            )
                            .await
                    {
                        return Ok(false);
                    }
                }
                Err(e) if e.is_transient() => {
                    if !backoff
                        .pause(self.shutdown, &self.metrics.sink.retries, "database", &e)
                        .await
                    {
                        return Ok(false);
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        self.commit_offsets(&batch).await;
        Ok(true)
    }

    fn classify(&self, payload: &[u8]) -> Result<(usize, Vec<db::Bound>), (&'static str, String)> {
        let env: Envelope = serde_json::from_slice(payload)
            .map_err(|e| ("parse", format!("not a switchyard envelope: {e}")))?;
        let Some(t) = self
            .schema
            .tables()
            .iter()
            .position(|t| t.name == env.table)
        else {
            return Err(("schema", format!("unknown table {:?}", env.table)));
        };
        let values = row_values(&self.schema.tables()[t], &env.row)
            .map_err(|e| ("schema", e.to_string()))?;
        Ok((t, values))
    }

    /// Commits the next offset of every partition in the batch, after the
    /// database commit. A failure here only means a redelivery, which the
    /// idempotent insert absorbs.
    async fn commit_offsets(&self, batch: &[Msg]) {
        let mut next: HashMap<(&str, i32), i64> = HashMap::new();
        for m in batch {
            let e = next
                .entry((m.topic.as_str(), m.partition))
                .or_insert(m.offset + 1);
            *e = (*e).max(m.offset + 1);
        }
        let mut tpl = TopicPartitionList::new();
        for ((t, p), o) in &next {
            if let Err(e) = tpl.add_partition_offset(t, *p, Offset::Offset(*o)) {
                tracing::error!(error = %e, "cannot build the offset list");
                return;
            }
        }
        let c = self.consumer.clone();
        let res = tokio::task::spawn_blocking(move || c.commit(&tpl, CommitMode::Sync)).await;
        match res {
            Ok(Ok(())) => {
                for m in batch {
                    self.consumer
                        .context()
                        .committed(&m.topic, m.partition, m.timestamp_ms);
                }
            }
            Ok(Err(e)) => {
                self.metrics.commit_errors.inc();
                tracing::warn!(error = %e, "offset commit failed after the database commit; the batch will be redelivered and skipped as duplicates");
            }
            Err(e) => {
                self.metrics.commit_errors.inc();
                tracing::warn!(error = %e, "offset commit did not complete");
            }
        }
    }
}

/// A NUL byte would make PostgreSQL reject the dead letter itself.
fn poison(m: &Msg, reason: String) -> DeadLetter {
    DeadLetter {
        source: format!("{}/{}/{}", m.topic, m.partition, m.offset),
        reason: reason.replace('\0', "\u{fffd}"),
        payload: String::from_utf8_lossy(&m.payload).replace('\0', "\u{fffd}"),
    }
}

/// The consumer can run on a spawned task (the demo runs every role in one process).
#[cfg(test)]
#[allow(dead_code)]
fn run_is_send(
    o: IngestOptions,
    s: &Schema,
    d: &Db,
    m: IngestMetrics,
    h: Health,
    t: CancellationToken,
) {
    fn is_send<T: Send>(_: &T) {}
    is_send(&run(o, s, d, m, h, t));
}
