//! `switchyard backfill`: copies the history of one table from OLD to NEW.
//! NEW holds only what was written since dual-writing began; this reads a
//! time range of OLD in key order, a chunk at a time, and writes each chunk
//! to NEW in one transaction with the checkpoint that covers it
//! (`switchyard_backfill_checkpoint`), so it resumes where it stopped and a
//! finished range is a no-op. Inserts are idempotent on the unique key, so
//! running beside live ingest, or again, changes nothing; a row NEW holds
//! with other content is reported and kept unless `--overwrite`.
//!
//! OLD is read one chunk ahead while NEW writes the current one, so each
//! side waits on the other as little as possible.

pub mod cli;
pub mod metrics;

use std::collections::VecDeque;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::db::keyset::{self, BackfillCheckpoint, Backfilled, ChunkWrite, ReadRow, TimeRange};
use crate::db::{Bound, Db, DbError, DeadLetter, TableRows};
use crate::schema::{Schema, Table};
use crate::shutdown::Backoff;
pub use metrics::BackfillMetrics;

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressMode {
    /// A progress bar on standard error.
    Bar,
    /// A log line now and then.
    Log,
}

impl ProgressMode {
    /// A bar when standard error is a terminal, log lines otherwise.
    pub fn auto() -> ProgressMode {
        if std::io::stderr().is_terminal() {
            ProgressMode::Bar
        } else {
            ProgressMode::Log
        }
    }
}

#[derive(Debug, Clone)]
pub struct BackfillOptions {
    /// A declared table.
    pub table: String,
    pub range: TimeRange,
    /// Rows per chunk (one read, one transaction), at most.
    pub chunk_rows: usize,
    /// Bytes of row data per transaction, at most (a single bigger row still goes).
    pub chunk_bytes: usize,
    /// Rows written per second, at most; None: as fast as NEW takes them.
    pub max_rows_per_sec: Option<f64>,
    pub overwrite: bool,
    /// Forget the range's checkpoint and start from its first key.
    pub restart: bool,
    /// Conflicting keys named (in the log and the summary), at most.
    pub max_conflict_keys: usize,
    pub progress: ProgressMode,
    /// With [`ProgressMode::Log`]: a line this often.
    pub log_every: Duration,
    /// PostgreSQL: `COPY` through a staging table (else multi-row inserts).
    pub copy: bool,
}

/// What a run did, and where the range stands.
#[derive(Debug, Clone, Default)]
pub struct BackfillSummary {
    /// The range was finished by an earlier run: nothing was done.
    pub already_done: bool,
    /// Every row of the range is covered now.
    pub done: bool,
    pub read: u64,
    pub inserted: u64,
    pub duplicates: u64,
    pub conflicts: u64,
    pub overwritten: u64,
    pub rejected: u64,
    /// The first conflicting keys (up to `max_conflict_keys`).
    pub conflict_keys: Vec<String>,
    /// The stored checkpoint at the end (every run's totals).
    pub checkpoint: BackfillCheckpoint,
}

#[derive(Debug, thiserror::Error)]
pub enum BackfillError {
    #[error("table {0:?} is not declared in the configuration")]
    UnknownTable(String),
    #[error(transparent)]
    Db(#[from] DbError),
    /// The checkpoint is not where this run left it.
    #[error(
        "the checkpoint of {0} was moved by someone else: is another backfill of the same table \
         and range running?"
    )]
    Raced(String),
}

impl BackfillError {
    /// A configuration to fix (exit 2), not a failure at run time.
    pub fn is_config(&self) -> bool {
        match self {
            BackfillError::UnknownTable(_) => true,
            BackfillError::Db(e) => e.is_config(),
            BackfillError::Raced(_) => false,
        }
    }
}

/// A token bucket: `rate` tokens a second, at most `burst` saved up. A take
/// larger than what is there leaves a debt that later takes wait out, so a
/// chunk bigger than the burst still goes, and the long-run rate holds.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    /// Starts empty, so a run's first second is paced like the others.
    pub fn new(rate: f64, burst: f64, now: Instant) -> TokenBucket {
        let rate = rate.max(f64::MIN_POSITIVE);
        TokenBucket {
            rate,
            burst: burst.max(1.0),
            tokens: 0.0,
            at: now,
        }
    }

    /// Takes `n` tokens at `now`: how long to wait before using them.
    pub fn take(&mut self, n: u64, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = self.at.max(now);
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.tokens -= n as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

/// Rows to ask OLD for next: `chunk_rows`, fewer when rows of `avg_bytes`
/// would pass `chunk_bytes`, and at most a second's worth under a rate limit
/// (so the limiter paces chunks evenly). At least one.
pub fn next_limit(
    chunk_rows: usize,
    chunk_bytes: usize,
    avg_bytes: f64,
    max_rows_per_sec: Option<f64>,
) -> usize {
    let mut n = chunk_rows.max(1);
    if avg_bytes > 0.0 {
        n = n.min((chunk_bytes as f64 / avg_bytes).floor().max(1.0) as usize);
    }
    if let Some(r) = max_rows_per_sec {
        n = n.min(r.floor().max(1.0) as usize);
    }
    n.max(1)
}

/// How many of the leading rows of `sizes` fit in `max_bytes` together: at
/// least one (a single bigger row goes alone).
pub fn rows_within_bytes(sizes: &[usize], max_bytes: usize) -> usize {
    let mut total = 0usize;
    for (i, s) in sizes.iter().enumerate() {
        total = total.saturating_add(*s);
        if total > max_bytes && i > 0 {
            return i;
        }
    }
    sizes.len()
}

/// A chunk covers the rest of the range when OLD returned fewer rows than
/// asked and none was held back for the byte bound.
pub fn is_last_chunk(returned: usize, asked: usize, kept: usize) -> bool {
    returned < asked && kept == returned
}

/// Whether the next chunk tries `COPY` straight into the table: while the
/// chunks find none of their keys in NEW. Once one does (live ingest got
/// there, or an earlier run), the staging table takes the chunks until one
/// finds nothing again.
pub fn try_direct_next(last: &Backfilled) -> bool {
    last.duplicates == 0 && last.conflicts.is_empty()
}

/// Rows per second over `samples` (when, rows) up to `now`: over at least
/// one second, so the first chunk does not read as a spike.
pub fn rate(samples: &VecDeque<(Instant, u64)>, now: Instant) -> f64 {
    let Some((first, _)) = samples.front() else {
        return 0.0;
    };
    let span = now.saturating_duration_since(*first).as_secs_f64().max(1.0);
    samples.iter().map(|(_, n)| *n).sum::<u64>() as f64 / span
}

/// Seconds left for `remaining` rows at `rate`; None with no rate yet.
pub fn eta(remaining: u64, rate: f64) -> Option<f64> {
    if remaining == 0 {
        Some(0.0)
    } else if rate > 0.0 {
        Some(remaining as f64 / rate)
    } else {
        None
    }
}

/// The rate is measured over this window.
const RATE_WINDOW: Duration = Duration::from_secs(10);

/// Rate, ETA, and how they are shown.
struct Progress {
    metrics: BackfillMetrics,
    samples: VecDeque<(Instant, u64)>,
    remaining: u64,
    handled: u64,
    bar: Option<indicatif::ProgressBar>,
    log_every: Duration,
    logged: Instant,
    table: String,
}

impl Progress {
    fn new(opts: &BackfillOptions, metrics: BackfillMetrics, remaining: u64) -> Progress {
        let bar = (opts.progress == ProgressMode::Bar).then(|| {
            let style = indicatif::ProgressStyle::with_template(
                "{prefix} [{bar:40}] {human_pos}/{human_len} rows, {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> ");
            let bar = indicatif::ProgressBar::new(remaining).with_style(style);
            bar.set_prefix(format!("backfill {}", opts.table));
            bar
        });
        metrics.remaining_rows.set(clamp_i64(remaining));
        Progress {
            metrics,
            samples: VecDeque::new(),
            remaining,
            handled: 0,
            bar,
            log_every: opts.log_every,
            logged: Instant::now(),
            table: opts.table.clone(),
        }
    }

    fn advance(&mut self, rows: u64) {
        let now = Instant::now();
        self.handled += rows;
        self.samples.push_back((now, rows));
        while self
            .samples
            .front()
            .is_some_and(|(t, _)| now.saturating_duration_since(*t) > RATE_WINDOW)
        {
            self.samples.pop_front();
        }
        let left = self.remaining.saturating_sub(self.handled);
        let r = rate(&self.samples, now);
        let e = eta(left, r);
        self.metrics.remaining_rows.set(clamp_i64(left));
        self.metrics.rate.set(r);
        self.metrics.eta.set(e.unwrap_or(-1.0));
        let eta_text = e.map_or("unknown".to_string(), |s| format!("{s:.0} s"));
        match &self.bar {
            Some(bar) => {
                // Rows that arrived in OLD since the count lengthen the bar.
                if self.handled > bar.length().unwrap_or(0) {
                    bar.set_length(self.handled);
                }
                bar.set_position(self.handled);
                bar.set_message(format!("{r:.0} rows/s, ETA {eta_text}"));
            }
            None if now.saturating_duration_since(self.logged) >= self.log_every => {
                self.logged = now;
                tracing::info!(
                    table = %self.table,
                    rows = self.handled,
                    remaining = left,
                    rows_per_sec = r.round(),
                    eta = %eta_text,
                    "backfill progress"
                );
            }
            None => {}
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}

fn clamp_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Runs `f` until it succeeds, retrying transient errors with backoff.
/// None when shut down while waiting.
async fn retrying<T, F, Fut>(
    shutdown: &CancellationToken,
    metrics: &BackfillMetrics,
    database: &'static str,
    mut f: F,
) -> Result<Option<T>, DbError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, DbError>>,
{
    let mut backoff = Backoff::default();
    loop {
        match f().await {
            Ok(v) => return Ok(Some(v)),
            Err(e) if e.is_transient() => {
                if !backoff
                    .pause(shutdown, &metrics.retries, database, &e)
                    .await
                {
                    return Ok(None);
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// One chunk read from OLD, split into what is written and what is
/// dead-lettered.
struct Chunk {
    rows: Vec<Vec<Bound>>,
    dead: Vec<DeadLetter>,
    last_key: Option<String>,
    read: usize,
    bytes: usize,
    done: bool,
}

/// Cuts what OLD returned (asked for `asked` rows) to the byte bound, and
/// sets aside rows whose values do not fit the declaration.
fn prepare_chunk(
    table: &Table,
    mut read: Vec<ReadRow>,
    asked: usize,
    chunk_bytes: usize,
    prev: Option<&str>,
) -> Chunk {
    let sizes: Vec<usize> = read
        .iter()
        .map(|r| match &r.values {
            Ok(v) => keyset::row_bytes(v),
            Err(_) => r.key.len(),
        })
        .collect();
    let keep = rows_within_bytes(&sizes, chunk_bytes);
    let done = is_last_chunk(read.len(), asked, keep);
    read.truncate(keep);
    let bytes = sizes.iter().take(keep).sum();
    let last_key = read
        .last()
        .map(|r| r.key.clone())
        .or_else(|| prev.map(str::to_string));
    let mut rows = Vec::with_capacity(read.len());
    let mut dead = Vec::new();
    let n = read.len();
    for r in read {
        match r.values {
            Ok(v) => rows.push(v),
            Err(why) => {
                tracing::warn!(table = %table.name, key = %crate::db::short(&r.key), reason = %why,
                    "a row of OLD does not fit the declared table; dead-lettered in NEW");
                dead.push(keyset::dead_letter(table, &r.key, &why, None));
            }
        }
    }
    Chunk {
        rows,
        dead,
        last_key,
        read: n,
        bytes,
        done,
    }
}

/// What [`write_chunk`] did: the rows' fate, or "committed by an earlier
/// attempt whose answer was lost" (counts then come from the checkpoint).
struct Wrote {
    result: Backfilled,
    rejected: u64,
    uncertain: bool,
}

struct WriteCtx<'a> {
    new: &'a Db,
    table: &'a Table,
    opts: &'a BackfillOptions,
    metrics: &'a BackfillMetrics,
    shutdown: &'a CancellationToken,
}

/// Writes a chunk with its checkpoint, retrying transient errors; rows NEW
/// refuses are found by halving and dead-lettered with the rest.
async fn write_chunk(
    cx: &WriteCtx<'_>,
    mut chunk: Chunk,
    prev: Option<&str>,
    direct: bool,
) -> Result<Option<Wrote>, BackfillError> {
    let mut copy = cx.opts.copy;
    let mut backoff = Backoff::default();
    let mut retried = false;
    loop {
        let w = ChunkWrite {
            table: cx.table,
            range: cx.opts.range,
            rows: &chunk.rows,
            dead: &chunk.dead,
            prev_key: prev,
            last_key: chunk.last_key.as_deref(),
            done: chunk.done,
            overwrite: cx.opts.overwrite,
            copy,
            direct,
        };
        let started = Instant::now();
        let res = cx.new.backfill_chunk(&w).await;
        cx.metrics
            .chunk_seconds
            .observe(started.elapsed().as_secs_f64());
        match res {
            Ok(result) => {
                return Ok(Some(Wrote {
                    result,
                    rejected: chunk.dead.len() as u64,
                    uncertain: false,
                }))
            }
            Err(e) if e.is_transient() => {
                retried = true;
                if !backoff
                    .pause(cx.shutdown, &cx.metrics.retries, "new", &e)
                    .await
                {
                    return Ok(None);
                }
            }
            Err(DbError::Rejected(reason)) => {
                let data = TableRows {
                    rows: chunk.rows.clone(),
                    sources: Vec::new(),
                };
                let Some(bad) = retrying(cx.shutdown, cx.metrics, "new", || {
                    crate::db::find_rejected(cx.new, cx.table, &data)
                })
                .await?
                else {
                    return Ok(None);
                };
                if bad.is_empty() {
                    // Refused as a whole but not row by row: the COPY path's
                    // own limit. The plain inserts take it.
                    if copy {
                        copy = false;
                        continue;
                    }
                    return Err(DbError::Rejected(reason).into());
                }
                for (i, why) in bad.iter().rev() {
                    let row = chunk.rows.remove(*i);
                    let key = keyset::row_key(cx.table, &row);
                    tracing::warn!(table = %cx.table.name, key = %crate::db::short(&key), reason = %why,
                        "NEW refused a row; dead-lettered");
                    chunk
                        .dead
                        .push(keyset::dead_letter(cx.table, &key, why, Some(&row)));
                }
            }
            Err(DbError::Conflict(what)) => {
                // An earlier attempt may have committed before its answer was
                // lost: then the checkpoint is exactly where this one leads.
                if retried {
                    let stored = retrying(cx.shutdown, cx.metrics, "new", || {
                        cx.new.backfill_checkpoint(&cx.table.name, cx.opts.range)
                    })
                    .await?
                    .flatten();
                    if let Some(cp) = stored {
                        if cp.last_key == chunk.last_key && cp.done == chunk.done {
                            return Ok(Some(Wrote {
                                result: Backfilled::default(),
                                rejected: 0,
                                uncertain: true,
                            }));
                        }
                    }
                }
                return Err(BackfillError::Raced(what));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// The chunk a read-ahead task produced; None when shut down first.
async fn joined(
    task: tokio::task::JoinHandle<Result<Option<Chunk>, DbError>>,
) -> Result<Option<Chunk>, BackfillError> {
    match task.await {
        Ok(r) => Ok(r?),
        Err(e) => Err(DbError::Unavailable(format!("the read of OLD stopped: {e}")).into()),
    }
}

/// Copies the range. Ok with `done` false when shut down before the end
/// (the checkpoint keeps what was done).
pub async fn run(
    opts: &BackfillOptions,
    schema: &Schema,
    old: &Db,
    new: &Db,
    metrics: BackfillMetrics,
    shutdown: CancellationToken,
) -> Result<BackfillSummary, BackfillError> {
    let table = schema
        .table(&opts.table)
        .ok_or_else(|| BackfillError::UnknownTable(opts.table.clone()))?;
    let range = opts.range;
    let mut summary = BackfillSummary::default();
    let Some(start) = retrying(&shutdown, &metrics, "new", || {
        new.backfill_start(&table.name, range, opts.restart)
    })
    .await?
    else {
        return Ok(summary);
    };
    metrics.checkpoint_rows.set(clamp_i64(start.rows()));
    if start.done {
        metrics.done.set(1);
        metrics.remaining_rows.set(0);
        metrics.eta.set(0.0);
        summary.already_done = true;
        summary.done = true;
        summary.checkpoint = start;
        return Ok(summary);
    }
    let mut prev = start.last_key.clone();
    let Some(remaining) = retrying(&shutdown, &metrics, "old", || {
        old.keyset_count(table, range, prev.as_deref())
    })
    .await?
    else {
        return Ok(summary);
    };
    tracing::info!(
        table = %table.name,
        range = %range,
        remaining,
        resume_after = %prev.as_deref().map(crate::db::short).unwrap_or_default(),
        "backfill starting"
    );
    let mut progress = Progress::new(opts, metrics.clone(), remaining);
    let mut bucket = opts
        .max_rows_per_sec
        .map(|r| TokenBucket::new(r, r, Instant::now()));
    let cx = WriteCtx {
        new,
        table,
        opts,
        metrics: &metrics,
        shutdown: &shutdown,
    };
    // The first chunk assumes the largest rows the table accepts, so its
    // memory is bounded before any row size is known.
    let worst = table.max_row_bytes.max(1) as f64;
    let mut asked = next_limit(
        opts.chunk_rows,
        opts.chunk_bytes,
        worst,
        opts.max_rows_per_sec,
    );
    // Reads run in a task of their own, so decoding OLD's rows and encoding
    // NEW's use two threads.
    let read_ahead = |after: Option<String>, limit: usize| {
        let (old, table, shutdown, metrics) = (
            old.clone(),
            table.clone(),
            shutdown.clone(),
            metrics.clone(),
        );
        let chunk_bytes = opts.chunk_bytes;
        tokio::spawn(async move {
            let rows = retrying(&shutdown, &metrics, "old", || {
                old.keyset_chunk(&table, range, after.as_deref(), limit)
            })
            .await?;
            Ok(rows.map(|rows| prepare_chunk(&table, rows, limit, chunk_bytes, after.as_deref())))
        })
    };
    let Some(mut chunk) = joined(read_ahead(prev.clone(), asked)).await? else {
        return Ok(summary);
    };
    let (mut rows_seen, mut bytes_seen) = (0u64, 0u64);
    let mut direct = true;
    loop {
        if let Some(b) = bucket.as_mut() {
            let wait = b.take(chunk.read as u64, Instant::now());
            if !wait.is_zero() {
                metrics.throttled.inc_by(wait.as_secs_f64());
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
        metrics.rows_read.inc_by(chunk.read as u64);
        summary.read += chunk.read as u64;
        rows_seen += chunk.read as u64;
        bytes_seen += chunk.bytes as u64;
        let avg = bytes_seen as f64 / rows_seen.max(1) as f64;
        asked = next_limit(
            opts.chunk_rows,
            opts.chunk_bytes,
            avg,
            opts.max_rows_per_sec,
        );
        let done = chunk.done;
        let last_key = chunk.last_key.clone();
        let handled = chunk.read as u64;
        // Read the next chunk while this one is written.
        let (wrote, next) = if done {
            (
                write_chunk(&cx, chunk, prev.as_deref(), direct).await?,
                None,
            )
        } else {
            let next = read_ahead(last_key.clone(), asked);
            (
                write_chunk(&cx, chunk, prev.as_deref(), direct).await?,
                Some(next),
            )
        };
        let Some(wrote) = wrote else { break };
        metrics.chunks.inc();
        let r = &wrote.result;
        let kept = r.conflicts.len() as u64 - r.overwritten;
        for (outcome, n) in [
            ("inserted", r.inserted),
            ("duplicate", r.duplicates),
            ("conflict", kept),
            ("overwritten", r.overwritten),
            ("rejected", wrote.rejected),
        ] {
            metrics.rows.with_label_values(&[outcome]).inc_by(n);
        }
        direct = try_direct_next(r);
        summary.inserted += r.inserted;
        summary.duplicates += r.duplicates;
        summary.conflicts += r.conflicts.len() as u64;
        summary.overwritten += r.overwritten;
        summary.rejected += wrote.rejected;
        for key in &r.conflicts {
            if summary.conflict_keys.len() >= opts.max_conflict_keys {
                break;
            }
            tracing::warn!(
                table = %table.name,
                key = %crate::db::short(key),
                resolution = if opts.overwrite { "overwritten" } else { "kept" },
                "NEW holds this key with other content"
            );
            summary.conflict_keys.push(key.clone());
        }
        if wrote.uncertain {
            tracing::info!(table = %table.name, "a chunk committed before its answer was lost; counts come from the checkpoint");
        }
        prev = last_key;
        progress.advance(handled);
        metrics
            .checkpoint_rows
            .set(clamp_i64(start.rows() + summary.read));
        if done {
            summary.done = true;
            metrics.done.set(1);
            break;
        }
        if shutdown.is_cancelled() {
            break;
        }
        let Some(next) = next else { break };
        let Some(c) = joined(next).await? else { break };
        chunk = c;
    }
    progress.finish();
    if let Ok(Some(cp)) = new.backfill_checkpoint(&table.name, range).await {
        metrics.checkpoint_rows.set(clamp_i64(cp.rows()));
        summary.checkpoint = cp;
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_holds_the_rate_over_time() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(100.0, 100.0, t0);
        // No burst at the start: each row waits its share.
        assert_eq!(b.take(50, t0), Duration::from_millis(500));
        // A second saved up goes at once.
        let mut b = TokenBucket::new(100.0, 100.0, t0);
        assert_eq!(b.take(100, t0 + Duration::from_secs(1)), Duration::ZERO);
        assert_eq!(
            b.take(50, t0 + Duration::from_secs(1)),
            Duration::from_millis(500)
        );
        // A take beyond the burst goes, and the debt is waited out.
        let later = t0 + Duration::from_millis(1500);
        assert_eq!(b.take(300, later), Duration::from_secs(3));
        // 1,000 rows in chunks of 100, waiting as told: ten seconds, not less.
        let mut b = TokenBucket::new(100.0, 100.0, t0);
        let mut now = t0;
        for _ in 0..10 {
            now += b.take(100, now);
        }
        assert_eq!(now - t0, Duration::from_secs(10));
        // Saving up never exceeds the burst.
        let mut b = TokenBucket::new(10.0, 10.0, t0);
        assert_eq!(b.take(10, t0 + Duration::from_secs(3600)), Duration::ZERO);
        assert_eq!(
            b.take(10, t0 + Duration::from_secs(3600)),
            Duration::from_secs(1)
        );
    }

    #[test]
    fn chunk_sizes_follow_rows_bytes_and_rate() {
        assert_eq!(next_limit(5000, 8 << 20, 0.0, None), 5000);
        assert_eq!(next_limit(5000, 8 << 20, 2_500.0, None), 3355);
        assert_eq!(next_limit(5000, 100, 1e6, None), 1);
        assert_eq!(next_limit(5000, 8 << 20, 100.0, Some(250.5)), 250);
        assert_eq!(next_limit(5000, 8 << 20, 100.0, Some(0.1)), 1);
        assert_eq!(next_limit(0, 8 << 20, 100.0, None), 1);
    }

    #[test]
    fn the_byte_bound_cuts_after_the_row_that_fits() {
        assert_eq!(rows_within_bytes(&[10, 10, 10], 25), 2);
        assert_eq!(rows_within_bytes(&[10, 10, 10], 30), 3);
        assert_eq!(rows_within_bytes(&[100, 1], 10), 1, "a big row goes alone");
        assert_eq!(rows_within_bytes(&[], 10), 0);
        // The last chunk: fewer rows than asked, none held back.
        assert!(is_last_chunk(3, 5, 3));
        assert!(
            !is_last_chunk(5, 5, 5),
            "a full chunk may have more behind it"
        );
        assert!(!is_last_chunk(3, 5, 2), "rows held back are read again");
        assert!(is_last_chunk(0, 5, 0));
    }

    #[test]
    fn copy_goes_straight_in_until_a_key_is_found() {
        assert!(try_direct_next(&Backfilled {
            inserted: 10,
            ..Default::default()
        }));
        assert!(!try_direct_next(&Backfilled {
            inserted: 9,
            duplicates: 1,
            ..Default::default()
        }));
        assert!(!try_direct_next(&Backfilled {
            conflicts: vec!["k".into()],
            ..Default::default()
        }));
    }

    #[test]
    fn rate_and_eta() {
        let t0 = Instant::now();
        let mut s = VecDeque::new();
        assert_eq!(rate(&s, t0), 0.0);
        assert_eq!(eta(10, 0.0), None);
        assert_eq!(eta(0, 0.0), Some(0.0));
        s.push_back((t0, 500));
        // Never over less than a second.
        assert_eq!(rate(&s, t0), 500.0);
        s.push_back((t0 + Duration::from_secs(2), 500));
        assert_eq!(rate(&s, t0 + Duration::from_secs(4)), 250.0);
        assert_eq!(eta(1000, 250.0), Some(4.0));
    }

    fn table() -> Table {
        let cfg: crate::schema::TableConfig = toml::from_str(
            r#"
            name = "t"
            key = "k"
            time = "ts"
            group = "ts"
            [columns]
            k = "string"
            ts = "int"
            "#,
        )
        .unwrap();
        Schema::from_config(&[cfg]).unwrap().tables()[0].clone()
    }

    #[test]
    fn a_chunk_resumes_after_its_last_key_and_sets_aside_bad_rows() {
        let t = table();
        let row = |k: &str, ok: bool| ReadRow {
            key: k.into(),
            values: if ok {
                Ok(vec![Bound::Text(Some(k.into())), Bound::Int(Some(1))])
            } else {
                Err("column ts: missing and not nullable".into())
            },
        };
        let c = prepare_chunk(
            &t,
            vec![row("a", true), row("b", false), row("c", true)],
            3,
            1 << 20,
            None,
        );
        assert_eq!(c.rows.len(), 2);
        assert_eq!(c.dead.len(), 1);
        assert_eq!(c.dead[0].source, "backfill:t:b");
        assert_eq!(c.last_key.as_deref(), Some("c"));
        assert!(!c.done, "a full chunk");
        // An empty read keeps the previous key and finishes the range.
        let c = prepare_chunk(&t, vec![], 3, 1 << 20, Some("c"));
        assert_eq!(c.last_key.as_deref(), Some("c"));
        assert!(c.done);
        // Held back by the byte bound: resumes after the last row kept.
        let c = prepare_chunk(&t, vec![row("a", true), row("b", true)], 5, 30, None);
        assert_eq!(c.last_key.as_deref(), Some("a"));
        assert!(!c.done);
    }
}
