//! `switchyard ingest`: the Kafka ingestion consumer. Messages are gathered
//! into batches (up to `batch_size`, or `consumer_timeout` after the first
//! one), inserted into the NEW database in one transaction that also records
//! the batch's poison messages, and only then are the offsets committed. A
//! crash anywhere replays the batch, and the idempotent insert skips what was
//! already written.

pub mod cli;
mod context;
mod metrics;
pub mod rewind;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;

use crate::admin::Health;
use crate::db::{self, row_values_exact, Db, DbError, DeadLetter, TableRows};

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
    /// And at most this many payload bytes per transaction (at least one
    /// message); what arrives during a write is kept up to
    /// [`CARRY_BATCHES`] times this before partitions are paused.
    pub batch_bytes: usize,
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
    #[error("invalid Kafka consumer configuration: {}", crate::kafka::config_problem(.0))]
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
    #[error("cannot set where a paused partition resumes ({0}); stopping so that the group redelivers from the committed offsets")]
    Resume(String),
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
    /// Rows whose key was stored with other content (`on_conflict`).
    pub conflicts: u64,
    pub batches: u64,
}

/// A message's row: its table (index in the schema) and values, or why it
/// is poison (the dead-letter reason's label and text).
type Parsed = Result<(usize, Vec<db::Bound>), (&'static str, String)>;

/// A consumed message, detached from the consumer.
struct Msg {
    topic: String,
    partition: i32,
    offset: i64,
    timestamp_ms: Option<i64>,
    payload: Vec<u8>,
    /// The revocation epoch when it was read.
    epoch: u64,
    /// When it was read: a partial batch waits for more messages until
    /// `consumer_timeout` after its first one was.
    received: Instant,
    /// The payload parsed when the message was read (while the batch before
    /// it was being written); taken when its own batch is written.
    parsed: Option<Parsed>,
}

impl Msg {
    /// Detaches a message and parses its payload, and dates the partition's
    /// lag from it.
    fn of(m: &rdkafka::message::BorrowedMessage<'_>, ctx: &IngestContext, schema: &Schema) -> Msg {
        let payload = m.payload().unwrap_or_default();
        let msg = Msg {
            topic: m.topic().to_string(),
            partition: m.partition(),
            offset: m.offset(),
            timestamp_ms: m.timestamp().to_millis(),
            parsed: Some(classify(schema, payload)),
            payload: payload.to_vec(),
            epoch: ctx.epoch(),
            received: Instant::now(),
        };
        ctx.seen(&msg.topic, msg.partition, msg.timestamp_ms);
        msg
    }
}

/// The offset to commit per partition (one past the last message written),
/// leaving out partitions revoked since their messages were read: their new
/// owner commits them, and a late commit from here could move its offset
/// back. Each with the last message's timestamp.
fn offsets_to_commit(
    batch: &[Msg],
    revoked: impl Fn(&str, i32, u64) -> bool,
) -> BTreeMap<(String, i32), (i64, Option<i64>)> {
    let mut next: BTreeMap<(String, i32), (i64, Option<i64>)> = BTreeMap::new();
    for m in batch {
        if revoked(&m.topic, m.partition, m.epoch) {
            continue;
        }
        let e = next
            .entry((m.topic.clone(), m.partition))
            .or_insert((m.offset + 1, m.timestamp_ms));
        if m.offset + 1 >= e.0 {
            *e = (m.offset + 1, m.timestamp_ms);
        }
    }
    next
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
    let consumer: Arc<StreamConsumer<IngestContext>> = Arc::new(
        client_config(&opts)
            .create_with_context(ctx)
            .map_err(IngestError::Config)?,
    );
    check_topics(&consumer, &opts).await?;
    let topics: Vec<&str> = opts.topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics).map_err(IngestError::Config)?;
    health.ready();
    tracing::info!(brokers = %opts.brokers, topics = ?opts.topics, group = %opts.group,
        batch_size = opts.batch_size, consumer_timeout_ms = opts.consumer_timeout.as_millis() as u64,
        "ingest consumer subscribed");

    // Lag from the broker's watermarks on a timer of its own, so it keeps
    // moving while a batch waits on the database.
    let stop_lag = shutdown.child_token();
    let lag = tokio::spawn(measure_lag(consumer.clone(), stop_lag.clone()));

    let mut ingest = Ingest {
        schema,
        db,
        consumer: consumer.clone(),
        metrics,
        shutdown: &shutdown,
        summary: IngestSummary::default(),
    };
    let res = consume(&mut ingest, &consumer, &opts, &shutdown).await;
    stop_lag.cancel();
    let _ = lag.await;
    res?;
    Ok(ingest.summary)
}

/// The consumer's librdkafka configuration: manual commits only, from the
/// start of a partition the group has never committed, the operator's
/// properties (`--kafka-config`) last.
pub fn client_config(opts: &IngestOptions) -> ClientConfig {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", &opts.brokers)
        .set("group.id", &opts.group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        // The ends of partitions as fetches see them, one source of the lag.
        .set("statistics.interval.ms", "1000")
        // A batch of 2,000 rows of 2.5 KB is 5 MB: fetch in pieces that size,
        // not librdkafka's 1 MB per partition.
        .set("max.partition.fetch.bytes", "8388608")
        .set("fetch.max.bytes", "67108864")
        // librdkafka prefetches up to 64 MiB a partition by default: two
        // fetches' worth keep it busy and its memory bounded.
        .set("queued.max.messages.kbytes", "16384")
        // Once that queue is full librdkafka postpones the next fetch by
        // this much (1 s by default): a partition would then run dry for most
        // of a second whenever the database is slower than the broker, and
        // ingest ran at a third of its write speed. A queue of 16 MiB takes
        // the database a fifth of a second or more to drain.
        .set("fetch.queue.backoff.ms", "20");
    for (k, v) in &opts.extra {
        cfg.set(k, v);
    }
    cfg
}

/// The consume loop: gathers batches and flushes them.
async fn consume(
    ingest: &mut Ingest<'_>,
    consumer: &Arc<StreamConsumer<IngestContext>>,
    opts: &IngestOptions,
    shutdown: &CancellationToken,
) -> Result<(), IngestError> {
    let mut batch: Vec<Msg> = Vec::with_capacity(opts.batch_size);
    let mut batch_bytes = 0usize;
    let mut deadline: Option<Instant> = None;
    let mut last_message = Instant::now();
    let idle_poll = Duration::from_millis(250);
    loop {
        let due = deadline.is_some_and(|d| Instant::now() >= d);
        let full = batch.len() >= opts.batch_size || batch_bytes >= opts.batch_bytes;
        if full || (due && !batch.is_empty()) {
            // One transaction takes at most one batch's worth; what is
            // left (kept during the last write) goes in the next ones.
            let lens: Vec<usize> = batch.iter().map(|m| m.payload.len()).collect();
            let cut = batch_len(&lens, opts.batch_size, opts.batch_bytes);
            let rest = batch.split_off(cut);
            let write = std::mem::replace(&mut batch, rest);
            // What arrived while the batch was written follows the rest.
            let Some(mut next) = ingest
                .flush(
                    write,
                    opts.batch_size.saturating_mul(CARRY_BATCHES),
                    opts.batch_bytes.saturating_mul(CARRY_BATCHES),
                )
                .await?
            else {
                return Ok(());
            };
            batch.append(&mut next);
            batch_bytes = batch.iter().map(|m| m.payload.len()).sum();
            // Its first message has waited since it was read (during the
            // write): the batch is due `consumer_timeout` after that, not
            // after the write. (Restarting the clock held the last, partial
            // batch of a backlog for a whole timeout more.)
            deadline = batch.first().map(|m| m.received + opts.consumer_timeout);
            continue;
        }
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
                let msg = Msg::of(&m, consumer.context(), ingest.schema);
                batch_bytes += msg.payload.len();
                deadline.get_or_insert(msg.received + opts.consumer_timeout);
                batch.push(msg);
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
    }
    // Shutting down: finish the batch in hand, commit, leave the group.
    // (What arrives meanwhile is left uncommitted for the next owner.)
    if !batch.is_empty() {
        ingest.flush(batch, usize::MAX, usize::MAX).await?;
    }
    consumer.unsubscribe();
    Ok(())
}

/// How many of the messages (their payload sizes, in order) one transaction
/// takes: up to `max_rows`, and up to the first that brings the bytes to
/// `max_bytes` — at least one, so a message bigger than the limit still goes.
fn batch_len(sizes: &[usize], max_rows: usize, max_bytes: usize) -> usize {
    let mut bytes = 0usize;
    for (i, n) in sizes.iter().enumerate() {
        if i >= max_rows {
            return i;
        }
        bytes = bytes.saturating_add(*n);
        if bytes >= max_bytes {
            return i + 1;
        }
    }
    sizes.len()
}

/// While a batch is written, what arrives is kept for the next batches up
/// to this many batches (by count and by bytes); past that the consumer
/// waits for the write, and only a write longer than [`PAUSE_AFTER`] pauses
/// the partitions. Resuming makes librdkafka fetch again from the position
/// after the last message held, so it is kept for stalls.
const CARRY_BATCHES: usize = 4;

/// A write that takes longer than this, with the batches after it already
/// in hand, pauses the partitions (and the consumer keeps polling).
const PAUSE_AFTER: Duration = Duration::from_secs(1);

/// How often the lag is measured, and how long one measurement may take.
const LAG_EVERY: Duration = Duration::from_secs(1);
const LAG_TIMEOUT: Duration = Duration::from_secs(5);

async fn measure_lag(consumer: Arc<StreamConsumer<IngestContext>>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(LAG_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let c = consumer.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || measure_once(&c)).await {
            tracing::debug!(error = %e, "lag measurement did not complete");
        }
    }
}

/// One measurement: the committed offset of every assigned partition (from
/// the coordinator for those this process has not committed yet) against
/// the broker's high watermark.
fn measure_once(c: &StreamConsumer<IngestContext>) {
    let ctx = c.context();
    let epoch = ctx.epoch();
    let Ok(assignment) = c.assignment() else {
        return;
    };
    let mut unknown = TopicPartitionList::new();
    for e in assignment.elements() {
        if ctx.committed_offset(e.topic(), e.partition()).is_none() {
            unknown.add_partition(e.topic(), e.partition());
        }
    }
    if unknown.count() > 0 {
        match c.committed_offsets(unknown, rdkafka::util::Timeout::After(LAG_TIMEOUT)) {
            Ok(tpl) => {
                for e in tpl.elements() {
                    let offset = match e.offset() {
                        Offset::Offset(o) => o,
                        _ => -1,
                    };
                    ctx.learn_committed(e.topic(), e.partition(), epoch, offset);
                }
            }
            Err(e) => tracing::debug!(error = %e, "cannot read the committed offsets for the lag"),
        }
    }
    // How far this consumer has read: the partition reached at least that.
    let position = c.position().unwrap_or_default();
    for e in assignment.elements() {
        let read = position
            .find_partition(e.topic(), e.partition())
            .and_then(|p| match p.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            })
            .unwrap_or(0);
        match c.fetch_watermarks(
            e.topic(),
            e.partition(),
            rdkafka::util::Timeout::After(LAG_TIMEOUT),
        ) {
            Ok((low, high)) => ctx.measured(e.topic(), e.partition(), epoch, low, high.max(read)),
            Err(err) => {
                tracing::debug!(topic = e.topic(), partition = e.partition(), error = %err, "cannot read the watermarks for the lag")
            }
        }
    }
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
    /// Writes one batch and commits its offsets. While the database works
    /// the consumer keeps polling, so it stays in its group however long
    /// that takes (`max.poll.interval.ms`) and its callbacks run: messages
    /// that arrive meanwhile are kept for the next batches, up to `limit`
    /// messages; past that it waits for the write, and if the write lasts
    /// beyond [`PAUSE_AFTER`] the partitions are paused until it is done
    /// (polling on), then resume right after the last message kept.
    /// Returns those messages, or None if shutdown came while waiting out an
    /// outage (nothing committed; the batch is redelivered).
    async fn flush(
        &mut self,
        mut batch: Vec<Msg>,
        limit: usize,
        limit_bytes: usize,
    ) -> Result<Option<Vec<Msg>>, IngestError> {
        let consumer = self.consumer.clone();
        let ctx = consumer.context();
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
            return Ok(Some(Vec::new()));
        }
        let mut carry: Vec<Msg> = Vec::new();
        let mut carry_bytes = 0;
        let mut paused = TopicPartitionList::new();
        let started = Instant::now();
        let schema = self.schema;
        let written = {
            let write = self.write(&mut batch);
            tokio::pin!(write);
            // A fresh poll at least this often, even when nothing arrives.
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // Once `limit` is held, a write that ends soon is simply waited
            // for: librdkafka keeps prefetching meanwhile (its own queue is
            // bounded), and what it holds is read right after. Only a write
            // that stalls past `PAUSE_AFTER` pauses the partitions and polls
            // on, to stay in the group: pausing drops librdkafka's queue and
            // resuming fetches it again, a cost no ordinary batch should pay.
            let mut stalled = false;
            loop {
                let held = carry.len() >= limit || carry_bytes >= limit_bytes;
                tokio::select! {
                    biased;
                    r = &mut write => break r,
                    _ = tick.tick() => {
                        stalled = stalled || started.elapsed() >= PAUSE_AFTER;
                    }
                    m = consumer.recv(), if stalled || !held => match m {
                        Ok(m) => {
                            let msg = Msg::of(&m, ctx, schema);
                            carry_bytes += msg.payload.len();
                            // Read while `limit` was already held: stalled.
                            // (The message that brings the bytes to the
                            // limit does not pause: a pause then, at every
                            // batch whose carry the bytes bound, made the
                            // next batches wait for the refetch.)
                            if held {
                                let known = paused.elements().iter().any(|e| {
                                    e.topic() == msg.topic && e.partition() == msg.partition
                                });
                                if !known {
                                    let mut one = TopicPartitionList::new();
                                    one.add_partition(&msg.topic, msg.partition);
                                    match consumer.pause(&one) {
                                        Ok(()) => {
                                            paused.add_partition(&msg.topic, msg.partition);
                                        }
                                        Err(e) => tracing::warn!(error = %e, "cannot pause a partition"),
                                    };
                                }
                            }
                            carry.push(msg);
                        }
                        Err(e) => {
                            ctx.report_error(&e);
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    },
                }
            }
        };
        if paused.count() > 0 {
            // Only what is still assigned here; a revoked one is its new
            // owner's. Each resumes right after the last message held: a
            // paused partition's fetch position is not trusted (messages
            // fetched before the pause are dropped from the queue, and
            // resuming from where fetching had got to would skip them).
            let assigned = consumer.assignment().unwrap_or_default();
            let mut resume = TopicPartitionList::new();
            let mut from = TopicPartitionList::new();
            for e in paused.elements() {
                if assigned.find_partition(e.topic(), e.partition()).is_none() {
                    continue;
                }
                resume.add_partition(e.topic(), e.partition());
                let next = carry
                    .iter()
                    .filter(|m| m.topic == e.topic() && m.partition == e.partition())
                    .map(|m| m.offset + 1)
                    .max();
                if let Some(next) = next {
                    if let Err(err) =
                        from.add_partition_offset(e.topic(), e.partition(), Offset::Offset(next))
                    {
                        tracing::warn!(error = %err, "cannot build the resume positions");
                    }
                }
            }
            let c = consumer.clone();
            let sought = tokio::task::spawn_blocking(move || {
                c.seek_partitions(from, rdkafka::util::Timeout::After(Duration::from_secs(10)))
            })
            .await;
            // Resuming from anywhere else could skip messages: stop instead,
            // and the group redelivers from the committed offsets.
            let failed = match sought {
                Ok(Ok(tpl)) => tpl.elements().iter().find_map(|e| {
                    e.error()
                        .err()
                        .map(|err| format!("{} [{}]: {err}", e.topic(), e.partition()))
                }),
                Ok(Err(e)) => Some(e.to_string()),
                Err(e) => Some(e.to_string()),
            };
            if let Some(why) = failed {
                return Err(IngestError::Resume(why));
            }
            if let Err(e) = consumer.resume(&resume) {
                tracing::warn!(error = %e, "cannot resume the paused partitions");
            }
        }
        if !written? {
            return Ok(None);
        }
        self.commit_offsets(&batch).await;
        // Held since before that commit: still pending, and dating the lag.
        for m in &carry {
            ctx.seen(&m.topic, m.partition, m.timestamp_ms);
        }
        Ok(Some(carry))
    }

    /// Writes the batch, isolating rejected rows, retrying an outage. False
    /// if shutdown came first.
    async fn write(&mut self, batch: &mut [Msg]) -> Result<bool, IngestError> {
        self.metrics.messages.inc_by(batch.len() as u64);
        let mut rows: BTreeMap<usize, (TableRows, Vec<usize>)> = BTreeMap::new();
        let mut dead: Vec<DeadLetter> = Vec::new();
        for (i, m) in batch.iter_mut().enumerate() {
            let parsed = match m.parsed.take() {
                Some(p) => p,
                None => classify(self.schema, &m.payload),
            };
            match parsed {
                Ok((t, values)) => {
                    let e = rows.entry(t).or_default();
                    e.0.push(values, source_of(m));
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
                    let tables: Vec<(&str, &db::Written)> = rows
                        .keys()
                        .map(|t| self.schema.tables()[*t].name.as_str())
                        .zip(&written)
                        .collect();
                    for (table, w) in &tables {
                        db::log_conflicts(table, &w.conflicts);
                    }
                    let total = self.metrics.sink.committed(
                        started.elapsed(),
                        batch.len(),
                        tables.iter().copied(),
                    );
                    self.summary.inserted += total.inserted;
                    self.summary.duplicates += total.duplicates;
                    self.summary.conflicts += total.conflicts.len() as u64;
                    tracing::debug!(
                        messages = batch.len(),
                        dead_letters = dead.len(),
                        "batch committed"
                    );
                    self.summary.messages += batch.len() as u64;
                    self.summary.dead_letters += dead.len() as u64;
                    self.summary.batches += 1;
                    return Ok(true);
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
                            r.remove(i);
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
    }

    /// Commits the next offset of every partition in the batch that is
    /// still assigned here, after the database commit. A failure here only
    /// means a redelivery, which the idempotent insert absorbs.
    async fn commit_offsets(&self, batch: &[Msg]) {
        let ctx = self.consumer.context();
        let next = offsets_to_commit(batch, |t, p, epoch| ctx.revoked_since(t, p, epoch));
        let skipped = batch
            .iter()
            .filter(|m| !next.contains_key(&(m.topic.clone(), m.partition)))
            .count();
        if skipped > 0 {
            tracing::info!(
                messages = skipped,
                "written but not committed: their partitions were revoked meanwhile (the new owner skips them as duplicates)"
            );
        }
        if next.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for ((t, p), (o, _)) in &next {
            if let Err(e) = tpl.add_partition_offset(t, *p, Offset::Offset(*o)) {
                tracing::error!(error = %e, "cannot build the offset list");
                return;
            }
        }
        // Asynchronous: a synchronous commit waits for the coordinator
        // without limit, holding a thread (and, at shutdown, the runtime)
        // while it does. The group coordinator applies commits in order, and
        // closing the consumer waits for those still outstanding; one that
        // fails only means a redelivery, skipped as duplicates, and is
        // counted by the commit callback.
        match self.consumer.commit(&tpl, CommitMode::Async) {
            Ok(()) => {
                for ((t, p), (o, ts)) in &next {
                    ctx.committed(t, *p, *o, *ts);
                }
            }
            Err(e) => {
                self.metrics.commit_errors.inc();
                tracing::warn!(error = %e, "offset commit failed after the database commit; the batch will be redelivered and skipped as duplicates");
            }
        }
    }
}

/// A payload's table and values, or why it is poison.
fn classify(schema: &Schema, payload: &[u8]) -> Parsed {
    let env: Envelope = serde_json::from_slice(payload)
        .map_err(|e| ("parse", format!("not a switchyard envelope: {e}")))?;
    let Some(t) = schema.tables().iter().position(|t| t.name == env.table) else {
        return Err(("schema", format!("unknown table {:?}", env.table)));
    };
    let values = row_values_exact(&schema.tables()[t], &env.row, payload)
        .map_err(|e| ("schema", e.to_string()))?;
    Ok((t, values))
}

fn source_of(m: &Msg) -> String {
    format!("{}/{}/{}", m.topic, m.partition, m.offset)
}

/// A NUL byte would make PostgreSQL reject the dead letter itself.
fn poison(m: &Msg, reason: String) -> DeadLetter {
    DeadLetter {
        source: source_of(m),
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

#[cfg(test)]
mod tests {

    #[test]
    fn a_transaction_takes_one_batch_by_rows_or_bytes() {
        assert_eq!(super::batch_len(&[10; 5], 3, 1000), 3);
        assert_eq!(
            super::batch_len(&[10; 5], 10, 25),
            3,
            "the one reaching the bytes is in"
        );
        assert_eq!(super::batch_len(&[10; 5], 10, 1000), 5);
        assert_eq!(super::batch_len(&[5000, 1], 10, 100), 1, "one, however big");
        assert_eq!(super::batch_len(&[], 10, 100), 0);
    }

    use super::*;

    fn msg(partition: i32, offset: i64, epoch: u64) -> Msg {
        Msg {
            topic: "t".into(),
            partition,
            offset,
            timestamp_ms: Some(offset * 10),
            payload: Vec::new(),
            epoch,
            received: Instant::now(),
            parsed: None,
        }
    }

    #[test]
    fn commits_one_past_the_last_message_of_each_partition_still_owned() {
        let batch = [msg(0, 5, 1), msg(1, 7, 1), msg(0, 6, 1), msg(2, 3, 0)];
        // Partition 2 was revoked after its message was read at epoch 0.
        let next = offsets_to_commit(&batch, |_, p, epoch| p == 2 && epoch < 1);
        assert_eq!(
            next.into_iter().collect::<Vec<_>>(),
            vec![
                (("t".to_string(), 0), (7, Some(60))),
                (("t".to_string(), 1), (8, Some(70))),
            ]
        );
        assert!(offsets_to_commit(&batch, |_, _, _| true).is_empty());
    }
}
