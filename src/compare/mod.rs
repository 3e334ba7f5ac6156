//! `switchyard compare`: the shadow comparator. It reads the topic with its
//! own consumer (manual assignment, no offset ever committed, so the ingest
//! group is untouched), learns from each message what was sent dual or
//! Kafka-only, and once a window of the time column has settled, looks every
//! expected key up in OLD and NEW (batched, on the unique index). A window
//! still short after the settle delay is pending until the maximum lateness,
//! then a mismatch; a row found once and missing later is a mismatch at once.

pub mod cli;
pub mod group;
mod metrics;
pub mod range;
mod report;
pub mod state;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, ConsumerContext, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;

use crate::db::digest::{self, Digest, KeySum};
use crate::db::{Db, DbError};
use crate::kafka::{QuietContext, ROUTE_HEADER};
use crate::schema::{ColumnType, Schema, Table};
pub use metrics::CompareMetrics;

pub use report::{Parity, TableParity, WindowReport};
use state::{
    judge, AckError, Drill, Expected, Position, Reads, Reread, Sent, Snapshot, Status, Windows,
};

/// How the comparator runs.
#[derive(Debug, Clone)]
pub struct CompareOptions {
    pub brokers: String,
    pub topic: String,
    /// Its own group id (never committed; keeps broker-side tools readable).
    pub group: String,
    pub extra: Vec<(String, String)>,
    /// Width of a window of the time column, in its unit (seconds).
    pub window_secs: i64,
    /// A window is checked this long after its end and its last row.
    pub settle: Duration,
    /// Missing rows are pending this long after the window was due, then a mismatch.
    pub max_lateness: Duration,
    /// A judged window is checked again this often (a row deleted later is found).
    pub recheck: Duration,
    /// How often due windows are looked for.
    pub check_interval: Duration,
    /// Windows whose last row is older than this are forgotten.
    pub retain: Duration,
    /// Missing ids listed per window and database.
    pub max_ids: usize,
}

/// Why the comparator stopped.
#[derive(Debug, thiserror::Error)]
pub enum CompareError {
    #[error("invalid Kafka consumer configuration: {}", crate::kafka::config_problem(.0))]
    Config(rdkafka::error::KafkaError),
    #[error("topic {topic:?} is not readable on {brokers}: {message}")]
    Topic {
        topic: String,
        brokers: String,
        message: String,
    },
    #[error("the Kafka brokers {brokers} refused the connection (TLS or SASL): {source}")]
    Refused {
        brokers: String,
        source: rdkafka::error::KafkaError,
    },
    #[error(transparent)]
    Db(#[from] DbError),
}

fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// `GET /parity[?from=T&to=T]`: the last report, optionally only the windows
/// overlapping `[from, to)`. `POST /parity/ack?table=T&window=START[&by=WHO]`
/// acknowledges a mismatched window: 200, 404 for no such window, 409 for a
/// window that is not mismatched.
pub fn parity_router(cmp: Arc<Comparator>) -> axum::Router {
    use axum::extract::{Query, State};
    use axum::http::StatusCode;
    #[derive(serde::Deserialize)]
    struct Range {
        from: Option<i64>,
        to: Option<i64>,
        /// Only windows that received a row at or after this Unix time (the
        /// comparator's clock: the rollout controller asks for every window
        /// written since its step started, whatever the rows' own times).
        arrived_since: Option<f64>,
    }
    #[derive(serde::Deserialize)]
    struct AckQuery {
        table: String,
        window: i64,
        by: Option<String>,
    }
    async fn parity(
        State(cmp): State<Arc<Comparator>>,
        Query(r): Query<Range>,
    ) -> axum::Json<Parity> {
        axum::Json(match (r.from, r.to, r.arrived_since) {
            (None, None, None) => cmp.parity(),
            (from, to, since) => {
                cmp.parity_filtered(from.unwrap_or(i64::MIN), to.unwrap_or(i64::MAX), since)
            }
        })
    }
    async fn ack(
        State(cmp): State<Arc<Comparator>>,
        Query(q): Query<AckQuery>,
    ) -> (StatusCode, axum::Json<Value>) {
        let by = q.by.as_deref().unwrap_or("unknown");
        match cmp.ack(&q.table, q.window, by).await {
            Ok(()) => (
                StatusCode::OK,
                axum::Json(
                    serde_json::json!({"acknowledged": {"table": q.table, "window": q.window, "by": by}}),
                ),
            ),
            Err(AckError::NoSuchWindow) => (
                StatusCode::NOT_FOUND,
                axum::Json(
                    serde_json::json!({"error": format!("no window of table {:?} starts at {}", q.table, q.window)}),
                ),
            ),
            Err(AckError::NotMismatched(status)) => (
                StatusCode::CONFLICT,
                axum::Json(
                    serde_json::json!({"error": format!("the window is {}, not a mismatch", status.as_str())}),
                ),
            ),
            Err(AckError::Unavailable(e)) => (
                StatusCode::SERVICE_UNAVAILABLE,
                axum::Json(
                    serde_json::json!({"error": format!("the acknowledgement could not be recorded for the group: {e}")}),
                ),
            ),
        }
    }
    axum::Router::new()
        .route("/parity", axum::routing::get(parity))
        .route("/parity/ack", axum::routing::post(ack))
        .with_state(cmp)
}

/// The shared comparator: windows fed by the stream, checked against both databases.
pub struct Comparator {
    schema: Schema,
    old: Db,
    new: Db,
    opts: CompareOptions,
    windows: Mutex<Windows>,
    metrics: CompareMetrics,
    parity: RwLock<Parity>,
    /// Messages read so far (the one-shot mode checks every so many).
    messages: AtomicU64,
    /// Running `--once`: no change of a database's rows is tracked.
    one_shot: AtomicBool,
    /// Running as one member of a group (`--scale-out`).
    group: OnceLock<Arc<group::GroupState>>,
}

/// A window to check, copied out of the lock.
struct DueWindow {
    key: (String, i64),
    snap: Snapshot,
}

/// The topic's partition count and the (low, high) watermarks of `only`
/// its partitions (all of them when None), read off the runtime's threads:
/// an error names why (no such topic, a broker not answering).
async fn partition_marks<C: ConsumerContext + 'static>(
    c: &Arc<StreamConsumer<C>>,
    topic: &str,
    only: Option<Vec<i32>>,
) -> Result<(usize, Vec<(i32, (i64, i64))>), String> {
    let (c, topic) = (c.clone(), topic.to_string());
    tokio::task::spawn_blocking(move || {
        let timeout = rdkafka::util::Timeout::After(Duration::from_secs(10));
        let md = c
            .fetch_metadata(Some(&topic), timeout)
            .map_err(|e| e.to_string())?;
        let t = md
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .ok_or("no metadata for the topic")?;
        if t.error().is_some() || t.partitions().is_empty() {
            return Err("the topic does not exist".to_string());
        }
        let parts = only.unwrap_or_else(|| t.partitions().iter().map(|p| p.id()).collect());
        let mut marks = Vec::with_capacity(parts.len());
        for p in parts {
            marks.push((
                p,
                c.fetch_watermarks(&topic, p, timeout)
                    .map_err(|e| e.to_string())?,
            ));
        }
        Ok((t.partitions().len(), marks))
    })
    .await
    .map_err(|e| e.to_string())?
}

/// Which windows a check looks at.
#[derive(Debug, Clone, Copy)]
enum Select {
    /// Those due: settled, not checked since `recheck` (the running mode).
    Due,
    /// Every window overlapping the range, judged finally (the one-shot mode).
    All(Option<(i64, i64)>),
    /// Every window with pending rows, verified on the way (the one-shot
    /// mode): no lateness judged yet, and no change of a database's rows
    /// tracked, as the one-shot mode reads a topic whose rows are all
    /// stored already (its verdict is of what the databases held while it
    /// read).
    OnTheWay,
}

/// Messages the one-shot mode reads between checks of what it has read:
/// what it holds pending stays bounded by this, not by the topic. (Windows
/// do not go quiet in a topic read from the beginning: each partition
/// brings its share of every window in turn.)
const ONCE_QUIET_MESSAGES: u64 = 50_000;

/// Keys a drill-down looks up at once.
const DRILL_CHUNK: usize = 5_000;

/// The longest a drill-down may take to read a window's messages.
const DRILL_DEADLINE: Duration = Duration::from_secs(120);

/// A drill-down that hears nothing for this long starts the partitions it
/// has not begun reading earlier.
const DRILL_QUIET: Duration = Duration::from_secs(1);

/// A drill-down that hears nothing for this long gives up (and the window
/// is checked again).
const DRILL_SILENCE: Duration = Duration::from_secs(15);

/// Where to read a partition again from when reading from `at` did not
/// bring the window's first offset `first`: twice as far back each time
/// (at least 128 offsets), never below the low watermark.
fn earlier_start(first: i64, at: i64, low: i64) -> i64 {
    (at - 1 - (first - at + 1).max(64) * 2).max(low)
}

/// Reads one window from both databases: the pending rows' content, and
/// each database's range scan of the window reduced to a [`KeySum`]. A range
/// that holds mostly pending rows is read whole, content and all, in one
/// scan; otherwise its keys are streamed into the sum and the pending rows
/// looked up by key, so a recheck of a verified window reads keys only.
async fn read_window(
    new: &Db,
    old: &Db,
    table: &Table,
    start: i64,
    end: i64,
    snap: &Snapshot,
) -> Result<Reads, DbError> {
    let pending: Vec<&str> = snap.rows.iter().map(|(k, _)| k.as_str()).collect();
    let dual: Vec<&str> = snap
        .rows
        .iter()
        .filter(|(_, e)| e.sent == Sent::Dual)
        .map(|(k, _)| k.as_str())
        .collect();
    let read_new = async {
        let whole = !pending.is_empty()
            && snap
                .scanned_new
                .is_none_or(|b| (pending.len() as u64) * 4 >= b.count);
        if whole {
            let m = new.digests_in_time_range(table, start, end).await?;
            let s = KeySum::of(m.keys().map(String::as_str));
            return Ok::<_, DbError>((m, s));
        }
        let (s, m) = tokio::try_join!(new.key_sum_in_time_range(table, start, end), async {
            if pending.is_empty() {
                Ok(HashMap::new())
            } else {
                new.digests_of_keys(table, &pending).await
            }
        })?;
        Ok((m, s))
    };
    let read_old = async {
        let d = &snap.defects;
        let needed = !dual.is_empty()
            || snap.verified.old > 0
            || snap.scanned_old.is_some()
            || d.lost_old + d.differs_old > 0;
        if !needed {
            return Ok::<_, DbError>((HashMap::new(), None));
        }
        // OLD also holds every legacy row: read the range whole only when
        // dual rows are a good share of it.
        let in_range = match snap.scanned_old {
            Some(b) => b.count,
            None if dual.is_empty() => 0,
            None => old.count_time_range(table, start, end).await?.max(0) as u64,
        };
        if !dual.is_empty() && (dual.len() as u64) * 4 >= in_range {
            let m = old.digests_in_time_range(table, start, end).await?;
            let s = KeySum::of(m.keys().map(String::as_str));
            return Ok((m, Some(s)));
        }
        let (s, m) = tokio::try_join!(old.key_sum_in_time_range(table, start, end), async {
            if dual.is_empty() {
                Ok(HashMap::new())
            } else {
                old.digests_of_keys(table, &dual).await
            }
        })?;
        Ok((m, Some(s)))
    };
    let ((new_rows, scan_new), (old_rows, scan_old)) = tokio::try_join!(read_new, read_old)?;
    Ok(Reads {
        new: new_rows,
        old: old_rows,
        scan_new,
        scan_old,
    })
}

/// A message as the comparator reads it.
#[derive(serde::Deserialize)]
struct Envelope {
    table: String,
    row: Map<String, Value>,
}

/// Where a message was sent: dual or Kafka-only, from its header.
fn route_of<M: Message>(m: &M) -> Sent {
    let route = m.headers().and_then(|h| {
        h.iter()
            .find(|h| h.key == ROUTE_HEADER)
            .and_then(|h| h.value)
    });
    match route {
        Some(b"dual") => Sent::Dual,
        _ => Sent::Kafka,
    }
}

/// A key's text form, as the databases return it.
fn key_text(col: ColumnType, v: &Value) -> Option<String> {
    match (col, v) {
        (ColumnType::Uuid, Value::String(s)) => Some(s.to_ascii_lowercase()),
        (_, Value::String(s)) => Some(s.clone()),
        (_, Value::Number(n)) => Some(n.to_string()),
        (_, Value::Bool(b)) => Some(b.to_string()),
        _ => None,
    }
}

impl Comparator {
    pub fn new(
        schema: Schema,
        old: Db,
        new: Db,
        opts: CompareOptions,
        metrics: CompareMetrics,
    ) -> Arc<Comparator> {
        Arc::new(Comparator {
            windows: Mutex::new(Windows::new(opts.window_secs)),
            schema,
            old,
            new,
            opts,
            metrics,
            parity: RwLock::new(Parity::default()),
            messages: AtomicU64::new(0),
            one_shot: AtomicBool::new(false),
            group: OnceLock::new(),
        })
    }

    fn windows(&self) -> std::sync::MutexGuard<'_, Windows> {
        self.windows.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The last report (for `/parity`).
    pub fn parity(&self) -> Parity {
        self.parity
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The report over the windows overlapping `[from, to)` only, from every
    /// window held (the rollout controller asks about the windows written
    /// during one step, however many there are).
    pub fn parity_between(&self, from: i64, to: i64) -> Parity {
        self.parity_filtered(from, to, None)
    }

    /// The report over the windows overlapping `[from, to)` that received a
    /// row at or after `arrived_since` (Unix time, this process's clock).
    pub fn parity_filtered(&self, from: i64, to: i64, arrived_since: Option<f64>) -> Parity {
        let filter = report::Filter {
            from,
            to,
            arrived_since,
        };
        if let Some(g) = self.group.get() {
            return self.group_parity(g, filter);
        }
        let ws = self.windows();
        report::build(
            &ws,
            &self.schema,
            now_unix(),
            self.opts.settle.as_secs_f64(),
            Some(filter),
        )
    }

    /// Acknowledges a mismatched window: it stops counting in the overall
    /// verdict (a known, accepted difference) and may be forgotten.
    /// In a group, of the combined view: every member applies it.
    pub async fn ack(&self, table: &str, start: i64, by: &str) -> Result<(), AckError> {
        if let Some(g) = self.group.get() {
            self.group_ack(g, table, start, by).await?;
            self.metrics.acks.inc();
            tracing::warn!(
                table,
                window_start = start,
                by,
                "mismatch acknowledged for the group"
            );
            return Ok(());
        }
        self.windows().ack(table, start, by, now_unix())?;
        self.metrics.acks.inc();
        tracing::warn!(table, window_start = start, by, "mismatch acknowledged");
        self.publish(now_unix());
        Ok(())
    }

    /// Records one message. Returns false for a message it cannot read.
    pub fn observe(&self, payload: &[u8], route: Option<&[u8]>, now: f64) -> bool {
        self.observe_at(payload, route, now, None)
    }

    /// Records one message read at `at` in the topic (where a drill-down
    /// finds it again).
    pub fn observe_at(
        &self,
        payload: &[u8],
        route: Option<&[u8]>,
        now: f64,
        at: Option<Position>,
    ) -> bool {
        self.metrics.messages.inc();
        self.messages.fetch_add(1, Ordering::Relaxed);
        let Some((table, time, key, group, digest)) = self.parse(payload) else {
            self.metrics.bad_messages.inc();
            return false;
        };
        let sent = match route {
            Some(b"dual") => Sent::Dual,
            _ => Sent::Kafka,
        };
        self.windows().expect(
            &table.name,
            time,
            key,
            Expected::new(group, sent, digest, now),
            at,
        );
        true
    }

    /// Records a consumed message, its route taken from the header.
    fn observe_message<M: Message>(&self, m: &M, now: f64) -> bool {
        let route = m.headers().and_then(|h| {
            h.iter()
                .find(|h| h.key == ROUTE_HEADER)
                .and_then(|h| h.value)
        });
        let at = Position {
            partition: m.partition(),
            offset: m.offset(),
        };
        self.observe_at(m.payload().unwrap_or_default(), route, now, Some(at))
    }

    fn parse(&self, payload: &[u8]) -> Option<(&Table, i64, String, String, Option<Digest>)> {
        let env: Envelope = serde_json::from_slice(payload).ok()?;
        let table = self.schema.table(&env.table)?;
        let key_col = table.column(&table.key)?.ty;
        let key = key_text(key_col, env.row.get(&table.key)?)?;
        let time = env.row.get(&table.time)?.as_i64()?;
        let group = match env.row.get(&table.group) {
            Some(Value::String(s)) => s.clone(),
            Some(v) => v.to_string(),
            None => String::new(),
        };
        let digest = digest::canon_of_json(table, &env.row).map(|v| digest::digest(&v));
        Some((table, time, key, group, digest))
    }

    /// Checks every window that is due (all of them, at once, with `force`:
    /// the one-shot mode). Returns the rows verified.
    pub async fn check(&self, force: bool, range: Option<(i64, i64)>) -> Result<u64, DbError> {
        self.check_windows(if force {
            Select::All(range)
        } else {
            Select::Due
        })
        .await
    }

    async fn check_windows(&self, select: Select) -> Result<u64, DbError> {
        let started = Instant::now();
        let now = now_unix();
        let settle = self.opts.settle.as_secs_f64();
        let recheck = self.opts.recheck.as_secs_f64();
        // Snapshot what to check without holding the lock across I/O.
        let (todo, generation): (Vec<DueWindow>, u64) = {
            let ws = self.windows();
            let todo = ws
                .map
                .iter()
                .filter(|(_, w)| match select {
                    Select::All(Some((from, to))) => w.end > from && w.start < to,
                    Select::All(None) => true,
                    Select::OnTheWay => !w.rows.is_empty(),
                    Select::Due => {
                        now >= w.due_at(settle)
                            && match (&w.last, w.status) {
                                (None, _) | (_, Status::Open) => true,
                                (Some(_), Status::Pending) => true,
                                (Some(c), _) => now - c.at >= recheck,
                            }
                    }
                })
                .map(|(k, w)| DueWindow {
                    key: k.clone(),
                    snap: w.snapshot(),
                })
                .collect();
            (todo, ws.generation)
        };
        let lateness = match select {
            Select::Due => self.opts.max_lateness.as_secs_f64(),
            Select::All(_) => 0.0,
            Select::OnTheWay => f64::INFINITY,
        };
        let mut verified = 0u64;
        for DueWindow {
            key: (table_name, start),
            snap,
        } in todo
        {
            let Some(table) = self.schema.table(&table_name) else {
                continue;
            };
            let end = start + self.opts.window_secs;
            let reads = read_window(&self.new, &self.old, table, start, end, &snap).await?;
            let check_now = now_unix();
            let mut snap = snap;
            if self.one_shot.load(Ordering::Relaxed) {
                // The one-shot mode reads rows stored long before it reads
                // their messages: a scan holding rows announced later is
                // no change to explain. Its verdict is of what the
                // databases held while it read.
                snap.scanned_new = None;
                snap.scanned_old = None;
            }
            let mut j = judge(&snap, &reads, self.opts.max_ids, check_now);
            let mut drill = None;
            if j.changed_new || j.changed_old {
                // A database's rows for the window changed otherwise than by
                // the rows found: read the window again to say which.
                match self.drill(table, start, end, &snap).await {
                    Ok(Some(d)) => {
                        self.metrics.drill_downs.inc();
                        j = judge(
                            &state::recounted(&snap, &d),
                            &reads,
                            self.opts.max_ids,
                            check_now,
                        );
                        drill = Some(d);
                    }
                    Ok(None) => {
                        tracing::warn!(table = %table_name, window_start = start,
                            "the window's rows changed and its messages cannot be read again to say which: mismatch");
                    }
                    Err(e) => {
                        self.metrics.check_errors.inc();
                        tracing::warn!(table = %table_name, window_start = start, error = %e,
                            "drill-down failed; the window is checked again next interval");
                        // Its rows changed: until a drill-down says how, it
                        // is not vouched for.
                        let mut ws = self.windows();
                        if ws.generation != generation {
                            break;
                        }
                        if let Some(w) = ws.map.get_mut(&(table_name.clone(), start)) {
                            if w.status == Status::Ok {
                                w.status = Status::Pending;
                            }
                        }
                        continue;
                    }
                }
            }
            let c = &j.checked;
            verified += (c.expected_new + c.expected_old) as u64;
            let mut ws = self.windows();
            if ws.generation != generation {
                // Everything was forgotten meanwhile (a rebalance): what
                // was read is of windows no longer held.
                break;
            }
            let Some(w) = ws.map.get_mut(&(table_name.clone(), start)) else {
                continue;
            };
            let due = *w.due.get_or_insert(w.due_at(settle).min(check_now));
            let status = state::conclude(&j, check_now, due, lateness);
            if status == Status::Mismatch && w.status != Status::Mismatch {
                tracing::warn!(table = %table_name, window_start = start, missing_old = c.missing_old,
                    missing_new = c.missing_new, differs_old = c.differs_old, differs_new = c.differs_new,
                    unexplained = c.unexplained, differ_new = ?c.differing_ids_new.iter().take(5).collect::<Vec<_>>(),
                    differ_old = ?c.differing_ids_old.iter().take(5).collect::<Vec<_>>(), ids_new = ?c.missing_ids_new.iter().take(5).collect::<Vec<_>>(),
                    ids_old = ?c.missing_ids_old.iter().take(5).collect::<Vec<_>>(), "parity mismatch");
            }
            w.settle_check(&snap, &j, drill.as_ref(), status, self.opts.max_ids);
            w.last = Some(j.checked);
        }
        self.metrics.rows_verified.inc_by(verified);
        self.metrics
            .check_seconds
            .observe(started.elapsed().as_secs_f64());
        self.publish(now);
        Ok(verified)
    }

    /// Reads a window's messages again from the topic (its offset range in
    /// each partition) and looks every key that is not pending up in both
    /// databases: the exact count of its verified rows, and the name of
    /// every row lost or stored with other content. None when that cannot
    /// be done: the comparator was fed without a topic, or retention has
    /// deleted the messages.
    async fn drill(
        &self,
        table: &Table,
        start: i64,
        end: i64,
        snap: &Snapshot,
    ) -> Result<Option<Drill>, CompareError> {
        if self.opts.brokers.is_empty() || snap.positions.is_empty() {
            return Ok(None);
        }
        let pending: HashSet<&str> = snap.rows.iter().map(|(k, _)| k.as_str()).collect();
        // An offset retention has passed is an error, never a jump to the
        // end of the partition (which would skip the window's messages).
        let consumer = Arc::new(
            self.consumer_with(&[("auto.offset.reset", "error")], QuietContext::default())?,
        );
        let topic = self.opts.topic.clone();
        let parts: Vec<i32> = snap.positions.keys().copied().collect();
        let lows = {
            let (c, topic) = (consumer.clone(), topic.clone());
            tokio::task::spawn_blocking(move || -> Result<HashMap<i32, i64>, String> {
                let timeout = rdkafka::util::Timeout::After(Duration::from_secs(10));
                parts
                    .into_iter()
                    .map(|p| {
                        c.fetch_watermarks(&topic, p, timeout)
                            .map(|(lo, _)| (p, lo))
                            .map_err(|e| e.to_string())
                    })
                    .collect()
            })
            .await
            .map_err(|e| self.topic_error(e.to_string()))?
            .map_err(|m| self.topic_error(m))?
        };
        let mut from: HashMap<i32, i64> = HashMap::new();
        let mut tpl = TopicPartitionList::new();
        for (p, (first, _)) in &snap.positions {
            let low = lows.get(p).copied().unwrap_or(0);
            if low > *first {
                return Ok(None);
            }
            from.insert(*p, *first);
            tpl.add_partition_offset(&topic, *p, Offset::Offset(*first))
                .map_err(CompareError::Config)?;
        }
        consumer.assign(&tpl).map_err(CompareError::Config)?;
        let mut left: HashMap<i32, i64> =
            snap.positions.iter().map(|(p, (_, l))| (*p, *l)).collect();
        let mut started: HashSet<i32> = HashSet::new();
        // Keys seen, by their 60-bit hash: the one thing a drill-down holds
        // for each row of the window while it reads it.
        let mut seen: HashMap<u64, Sent> = HashMap::new();
        let deadline = Instant::now() + DRILL_DEADLINE;
        let mut chunk: Vec<Reread> = Vec::with_capacity(DRILL_CHUNK);
        let mut d = Drill::default();
        let seek = |p: i32, at: i64| {
            consumer
                .seek(
                    &topic,
                    p,
                    Offset::Offset(at),
                    rdkafka::util::Timeout::After(Duration::from_secs(10)),
                )
                .map_err(|e| self.topic_error(e.to_string()))
        };
        let mut last_message = Instant::now();
        while !left.is_empty() {
            if Instant::now() >= deadline {
                return Err(self.topic_error(format!(
                    "drill-down: the window's messages not read within {} s",
                    DRILL_DEADLINE.as_secs()
                )));
            }
            let m = match tokio::time::timeout(DRILL_QUIET, consumer.recv()).await {
                Err(_) if last_message.elapsed() >= DRILL_SILENCE => {
                    return Err(self.topic_error(format!(
                        "drill-down: no message for {} s before the window's last offset",
                        DRILL_SILENCE.as_secs()
                    )))
                }
                Err(_) => {
                    // A broker that answers a fetch from inside a record
                    // batch with the batches after it answers nothing when
                    // that batch is the partition's last: start every
                    // partition not begun yet earlier.
                    for p in left.keys().filter(|p| !started.contains(p)) {
                        let (at, low) = (from[p], lows.get(p).copied().unwrap_or(0));
                        if at <= low {
                            continue;
                        }
                        let earlier = earlier_start(snap.positions[p].0, at, low);
                        from.insert(*p, earlier);
                        seek(*p, earlier)?;
                    }
                    continue;
                }
                Ok(Err(e)) if crate::kafka::is_refusal(&e) => return Err(self.refused(e)),
                Ok(Err(_)) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                Ok(Ok(m)) => m,
            };
            last_message = Instant::now();
            let (p, offset) = (m.partition(), m.offset());
            let Some(last) = left.get(&p).copied() else {
                continue;
            };
            if started.insert(p) {
                let (first, _) = snap.positions[&p];
                let at = from[&p];
                let low = lows.get(&p).copied().unwrap_or(0);
                if offset > first && at <= low {
                    // Messages between the window's first offset and this
                    // one are not there to read: the window cannot be
                    // recounted.
                    return Ok(None);
                }
                if offset > first {
                    // The broker answered from after the offset asked for (a
                    // fetch from inside a record batch that skips the rest
                    // of it): start earlier, and skip up to the window again.
                    let earlier = earlier_start(first, at, low);
                    from.insert(p, earlier);
                    started.remove(&p);
                    seek(p, earlier)?;
                    continue;
                }
            }
            if offset >= last {
                left.remove(&p);
                // Done with it: stop fetching the live traffic behind it.
                let mut done = TopicPartitionList::new();
                done.add_partition(&topic, p);
                let _ = consumer.pause(&done);
            }
            if offset < snap.positions[&p].0 || offset > last {
                continue;
            }
            let Some((t, time, key, _group, digest)) = self.parse(m.payload().unwrap_or_default())
            else {
                continue;
            };
            if t.name != table.name || time < start || time >= end || pending.contains(key.as_str())
            {
                continue;
            }
            let sent = route_of(&m);
            let h = digest::key_hash(&key) as u64;
            let row = match seen.get(&h) {
                None => Reread {
                    key,
                    sent,
                    digest,
                    in_new: true,
                },
                Some(Sent::Kafka) if sent == Sent::Dual => Reread {
                    key,
                    sent,
                    digest,
                    in_new: false,
                },
                Some(_) => continue,
            };
            seen.insert(h, row.sent);
            chunk.push(row);
            if chunk.len() >= DRILL_CHUNK {
                self.drill_chunk(&mut d, table, &chunk).await?;
                chunk.clear();
            }
        }
        self.drill_chunk(&mut d, table, &chunk).await?;
        d.finish();
        Ok(Some(d))
    }

    /// Looks one chunk of re-read rows up in both databases.
    async fn drill_chunk(
        &self,
        d: &mut Drill,
        table: &Table,
        rows: &[Reread],
    ) -> Result<(), CompareError> {
        if rows.is_empty() {
            return Ok(());
        }
        let in_new: Vec<&str> = rows
            .iter()
            .filter(|r| r.in_new)
            .map(|r| r.key.as_str())
            .collect();
        let in_old: Vec<&str> = rows
            .iter()
            .filter(|r| r.sent == Sent::Dual)
            .map(|r| r.key.as_str())
            .collect();
        let (new, old) = tokio::try_join!(self.new.digests_of_keys(table, &in_new), async {
            if in_old.is_empty() {
                Ok(HashMap::new())
            } else {
                self.old.digests_of_keys(table, &in_old).await
            }
        })?;
        d.count(rows, &new, &old, self.opts.max_ids);
        Ok(())
    }

    fn topic_error(&self, message: String) -> CompareError {
        CompareError::Topic {
            topic: self.opts.topic.clone(),
            brokers: self.opts.brokers.clone(),
            message,
        }
    }

    /// Rebuilds the report and the gauges from the windows.
    fn publish(&self, now: f64) {
        if self.group.get().is_some() {
            // A member serves the group's combination, not its own share.
            self.metrics.pending.set(self.windows().pending() as i64);
            return;
        }
        let parity = {
            let ws = self.windows();
            self.metrics.pending.set(ws.pending() as i64);
            report::build(&ws, &self.schema, now, self.opts.settle.as_secs_f64(), None)
        };
        self.metrics.set(&parity, &self.schema);
        *self.parity.write().unwrap_or_else(|p| p.into_inner()) = parity;
    }

    fn consumer(&self) -> Result<StreamConsumer<QuietContext>, CompareError> {
        self.consumer_with(&[], QuietContext::default())
    }

    fn consumer_with<C: ConsumerContext + 'static>(
        &self,
        settings: &[(&str, &str)],
        context: C,
    ) -> Result<StreamConsumer<C>, CompareError> {
        let mut cfg = ClientConfig::new();
        cfg.set("bootstrap.servers", &self.opts.brokers)
            .set("group.id", &self.opts.group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("max.partition.fetch.bytes", "8388608")
            // What librdkafka prefetches is memory too: 8 MiB keeps the
            // comparator ahead of its checks without a 64 MiB queue a partition.
            .set("queued.max.messages.kbytes", "8192");
        for (k, v) in &self.opts.extra {
            cfg.set(k, v);
        }
        for (k, v) in settings {
            cfg.set(*k, *v);
        }
        cfg.create_with_context(context)
            .map_err(CompareError::Config)
    }

    fn refused(&self, source: rdkafka::error::KafkaError) -> CompareError {
        CompareError::Refused {
            brokers: self.opts.brokers.clone(),
            source,
        }
    }

    /// Assigns every partition of the topic from its beginning; returns the
    /// partitions' (low, high) watermarks at that moment.
    async fn assign_all(
        &self,
        c: &Arc<StreamConsumer<QuietContext>>,
    ) -> Result<HashMap<i32, (i64, i64)>, CompareError> {
        let topic_err = |message: String| CompareError::Topic {
            topic: self.opts.topic.clone(),
            brokers: self.opts.brokers.clone(),
            message,
        };
        let ends = partition_marks(c, &self.opts.topic, None)
            .await
            .map(|(_, marks)| marks.into_iter().collect::<HashMap<i32, (i64, i64)>>());
        let ends = match ends {
            Ok(ends) => ends,
            Err(message) => {
                // A refused TLS or SASL handshake waits in the consumer's
                // queue: name it rather than the timeout it caused.
                if let Ok(Err(e)) = tokio::time::timeout(Duration::from_secs(1), c.recv()).await {
                    if crate::kafka::is_refusal(&e) {
                        return Err(self.refused(e));
                    }
                }
                return Err(topic_err(message));
            }
        };
        let mut tpl = TopicPartitionList::new();
        for p in ends.keys() {
            tpl.add_partition_offset(&self.opts.topic, *p, Offset::Beginning)
                .map_err(CompareError::Config)?;
        }
        c.assign(&tpl).map_err(CompareError::Config)?;
        Ok(ends)
    }

    /// Reads the topic and checks windows until `shutdown`.
    pub async fn run(self: &Arc<Self>, shutdown: CancellationToken) -> Result<(), CompareError> {
        let consumer = Arc::new(self.consumer()?);
        self.assign_all(&consumer).await?;
        tracing::info!(topic = %self.opts.topic, window_secs = self.opts.window_secs,
            settle_secs = self.opts.settle.as_secs(), max_lateness_secs = self.opts.max_lateness.as_secs(),
            "comparator reading the topic");
        let checker = {
            let me = self.clone();
            let stop = shutdown.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(me.opts.check_interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tick.tick() => {}
                    }
                    let pruned = me
                        .windows()
                        .prune(now_unix() - me.opts.retain.as_secs_f64());
                    if pruned > 0 {
                        tracing::debug!(pruned, "forgot windows past retention");
                    }
                    if let Err(e) = me.check(false, None).await {
                        me.metrics.check_errors.inc();
                        tracing::warn!(error = %e, "parity check failed; retrying next interval");
                    }
                }
            })
        };
        let oldest = |now: f64| (now - self.opts.retain.as_secs_f64()) * 1000.0;
        loop {
            let m = tokio::select! {
                _ = shutdown.cancelled() => break,
                m = consumer.recv() => m,
            };
            match m {
                Ok(m) => {
                    let now = now_unix();
                    if m.timestamp()
                        .to_millis()
                        .is_some_and(|ts| (ts as f64) < oldest(now))
                    {
                        continue;
                    }
                    self.observe_message(&m, now);
                }
                Err(e) if crate::kafka::is_refusal(&e) => return Err(self.refused(e)),
                Err(e) => {
                    tracing::debug!(error = %e, "comparator consumer error");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        let _ = checker.await;
        Ok(())
    }

    /// One-shot: reads the topic up to its current end, checks every window
    /// overlapping `[from, to)` now, and returns the report.
    pub async fn once(self: &Arc<Self>, from: i64, to: i64) -> Result<Parity, CompareError> {
        self.one_shot.store(true, Ordering::Relaxed);
        let consumer = Arc::new(self.consumer()?);
        let ends = self.assign_all(&consumer).await?;
        // A partition whose retained log is empty (low = high, whatever
        // the offset) has nothing to read.
        let mut remaining: HashMap<i32, i64> = ends
            .into_iter()
            .filter(|(_, (lo, hi))| hi > lo)
            .map(|(p, (_, hi))| (p, hi))
            .collect();
        // Up to every partition's end, then on until the topic has been quiet
        // for a second: a broker whose high watermark lags its log (tansu's
        // memory engine does) must not cut the read short.
        loop {
            let wait = if remaining.is_empty() { 1 } else { 30 };
            let Ok(m) = tokio::time::timeout(Duration::from_secs(wait), consumer.recv()).await
            else {
                if remaining.is_empty() {
                    break;
                }
                return Err(CompareError::Topic {
                    topic: self.opts.topic.clone(),
                    brokers: self.opts.brokers.clone(),
                    message: "no message for 30 s before reaching the end of the topic".into(),
                });
            };
            let m = match m {
                Ok(m) => m,
                Err(e) if crate::kafka::is_refusal(&e) => return Err(self.refused(e)),
                Err(_) => continue,
            };
            self.observe_message(&m, now_unix());
            let n = self.messages.load(Ordering::Relaxed);
            if n.is_multiple_of(ONCE_QUIET_MESSAGES) {
                // Verify on the way what was read: the rows held pending
                // stay bounded whatever the topic holds.
                self.windows()
                    .map
                    .retain(|_, w| w.end > from && w.start < to);
                self.check_windows(Select::OnTheWay).await?;
            }
            if remaining
                .get(&m.partition())
                .is_some_and(|hi| m.offset() + 1 >= *hi)
            {
                remaining.remove(&m.partition());
            }
        }
        self.windows()
            .map
            .retain(|_, w| w.end > from && w.start < to);
        self.check(true, Some((from, to))).await?;
        Ok(self.parity())
    }
}

#[cfg(test)]
mod tests {
    use super::earlier_start;

    #[test]
    fn a_drill_down_starts_twice_as_far_back_each_time_and_never_below_the_low_watermark() {
        let first = 10_000;
        let a = earlier_start(first, first, 0);
        assert_eq!(a, first - 129);
        let b = earlier_start(first, a, 0);
        assert_eq!(b, a - 1 - 260);
        assert!(first - b > 2 * (first - a));
        assert_eq!(earlier_start(first, 9_990, 9_950), 9_950);
        assert_eq!(earlier_start(5, 5, 0), 0);
    }
}
