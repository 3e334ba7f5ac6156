//! Keyset reads and checkpointed writes for `switchyard backfill`: one
//! table's rows read from OLD in key order, a chunk at a time (`WHERE key >
//! last ORDER BY key LIMIT n`, never OFFSET, so a chunk costs the same at the
//! start and at the end of a table), and written to NEW in one transaction
//! with the checkpoint that covers them, so a kill at any point neither loses
//! nor duplicates a row.
//!
//! Key order is only ever taken from OLD: the checkpoint's last key is
//! compared by OLD's own index, so both sides need not sort alike. On MySQL
//! a text key must use one of [`super::sql::MYSQL_EXACT_COLLATIONS`] (what
//! `check_tables` demands): under a case- or accent-insensitive collation a
//! unique key still orders its keys totally, but NEW (byte-exact) would hold
//! keys OLD calls one.

use std::collections::HashMap;

use sqlx::Row;

use super::digest::{self, Digest};
use super::sql::{self, placeholder, quote};
use super::{classify, key_of, now_micros, Bound, DbError, DeadLetter, Engine};
use super::{Db, ValueError};
use crate::schema::{ColumnType, Table};

/// Backfill checkpoints, by table and time range.
pub const BACKFILL_TABLE: &str = "switchyard_backfill_checkpoint";

/// The PostgreSQL staging table a chunk is copied into (one per
/// transaction, dropped at its commit).
const STAGE_TABLE: &str = "switchyard_backfill_stage";

/// A range of the time column, `[from, to)`; an absent end is unbounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TimeRange {
    pub from: Option<i64>,
    pub to: Option<i64>,
}

impl TimeRange {
    /// The range as the checkpoint table keys it: an open end stored as the
    /// extreme value (a row at exactly `i64::MAX` is still included).
    pub fn stored(&self) -> (i64, i64) {
        (self.from.unwrap_or(i64::MIN), self.to.unwrap_or(i64::MAX))
    }
}

impl std::fmt::Display for TimeRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.from, self.to) {
            (None, None) => f.write_str("all rows"),
            (Some(a), None) => write!(f, "[{a}, ∞)"),
            (None, Some(b)) => write!(f, "(-∞, {b})"),
            (Some(a), Some(b)) => write!(f, "[{a}, {b})"),
        }
    }
}

/// One row read from OLD: its key (text form) and its values, or why they
/// cannot be bound for the declared table.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadRow {
    pub key: String,
    pub values: Result<Vec<Bound>, String>,
}

/// A backfill's stored progress.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackfillCheckpoint {
    /// The last key copied (None: nothing yet).
    pub last_key: Option<String>,
    /// Rows written to NEW (overwritten ones included).
    pub copied: u64,
    /// Rows NEW already held with the same content.
    pub duplicates: u64,
    /// Rows NEW holds with other content, left as they were.
    pub conflicts: u64,
    /// Rows NEW held with other content, replaced (`--overwrite`).
    pub overwritten: u64,
    /// Rows not written: dead-lettered in NEW.
    pub rejected: u64,
    /// Every row of the range is covered.
    pub done: bool,
}

impl BackfillCheckpoint {
    /// Rows of OLD the checkpoint covers, whatever became of each.
    pub fn rows(&self) -> u64 {
        self.copied + self.duplicates + self.conflicts + self.rejected
    }
}

/// One chunk to write, with the checkpoint it moves.
pub struct ChunkWrite<'a> {
    pub table: &'a Table,
    pub range: TimeRange,
    pub rows: &'a [Vec<Bound>],
    /// Rows of the chunk that are not written (OLD's value does not fit the
    /// declaration, or NEW refused it): recorded in NEW's dead-letter table.
    pub dead: &'a [DeadLetter],
    /// The checkpoint's key before this chunk: it advances only from there.
    pub prev_key: Option<&'a str>,
    /// The checkpoint's key after it.
    pub last_key: Option<&'a str>,
    pub done: bool,
    /// Replace rows NEW holds under the same key with other content.
    pub overwrite: bool,
    /// PostgreSQL: `COPY` into a staging table, then one `INSERT … SELECT`.
    /// Otherwise (and on the other engines) multi-row inserts.
    pub copy: bool,
    /// With `copy`: first try `COPY` straight into the table (the raw
    /// load's speed), falling back to the staging table when a key is
    /// there already. Worth it where NEW holds none of the chunk's keys.
    pub direct: bool,
}

/// What one chunk did in NEW.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Backfilled {
    pub inserted: u64,
    /// Already there with the same content (live ingest got there first).
    pub duplicates: u64,
    /// Keys already there with other content (replaced with `overwrite`).
    pub conflicts: Vec<String>,
    pub overwritten: u64,
}

pub(super) fn create_sql(engine: Engine, collation: &str, options: &str) -> String {
    let (bigint, boolean, name, key) = match engine {
        Engine::Postgres => ("BIGINT", "BOOLEAN", "TEXT".to_string(), "TEXT".to_string()),
        // Exact names and keys: `a` and `A` are two keys to resume from.
        Engine::MySql => (
            "BIGINT",
            "BOOLEAN",
            format!("VARCHAR(64) CHARACTER SET utf8mb4 COLLATE {collation}"),
            format!("VARCHAR(1024) CHARACTER SET utf8mb4 COLLATE {collation}"),
        ),
        Engine::Sqlite => ("INTEGER", "INTEGER", "TEXT".to_string(), "TEXT".to_string()),
    };
    format!(
        "CREATE TABLE IF NOT EXISTS {} (table_name {name} NOT NULL, range_from {bigint} NOT NULL, \
         range_to {bigint} NOT NULL, last_key {key}, copied {bigint} NOT NULL, \
         duplicates {bigint} NOT NULL, conflicts {bigint} NOT NULL, overwritten {bigint} NOT NULL, \
         rejected {bigint} NOT NULL, done {boolean} NOT NULL, started_at {bigint} NOT NULL, \
         updated_at {bigint} NOT NULL, PRIMARY KEY (table_name, range_from, range_to)){options}",
        quote(engine, BACKFILL_TABLE)
    )
}

/// The conditions of a keyset read, with placeholders from 1: the range's
/// bounds (each only when given), then `key > last` when `after`.
fn keyset_where(engine: Engine, table: &Table, range: TimeRange, after: bool) -> String {
    let t = quote(engine, &table.time);
    let mut n = 0;
    let mut p = || {
        n += 1;
        placeholder(engine, n)
    };
    let mut conds = Vec::new();
    if range.from.is_some() {
        conds.push(format!("{t} >= {}", p()));
    }
    if range.to.is_some() {
        conds.push(format!("{t} < {}", p()));
    }
    if after {
        let cast = match (engine, table.column(&table.key).map(|c| c.ty)) {
            (Engine::Postgres, Some(ColumnType::Uuid)) => "::uuid",
            _ => "",
        };
        conds.push(format!("{} > {}{cast}", quote(engine, &table.key), p()));
    }
    if conds.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", conds.join(" AND "))
    }
}

/// `SELECT key, every column FROM t WHERE … ORDER BY key LIMIT n`: ordered
/// by the key column itself, so the unique index serves it.
pub fn keyset_select(
    engine: Engine,
    table: &Table,
    range: TimeRange,
    after: bool,
    limit: usize,
) -> String {
    format!(
        "SELECT {} FROM {}{} ORDER BY {} LIMIT {}",
        sql::key_and_content(engine, table),
        quote(engine, &table.name),
        keyset_where(engine, table, range, after),
        quote(engine, &table.key),
        limit.max(1)
    )
}

/// A key's text form as a bind value of the key's type.
enum KeyBind<'a> {
    Int(i64),
    Text(&'a str),
}

fn key_bind<'a>(table: &Table, key: &'a str) -> Result<KeyBind<'a>, DbError> {
    match table.column(&table.key).map(|c| c.ty) {
        Some(ColumnType::Int) => key.parse().map(KeyBind::Int).map_err(|_| {
            DbError::Schema(format!(
                "the backfill checkpoint of {} holds {:?}, which is not an integer key",
                table.name,
                super::short(key)
            ))
        }),
        _ => Ok(KeyBind::Text(key)),
    }
}

/// Decodes rows of [`sql::key_and_content`] into [`ReadRow`]s.
macro_rules! read_rows {
    ($rows:expr, $table:expr, $engine:expr) => {{
        let mut out = Vec::with_capacity($rows.len());
        for r in &$rows {
            let read = || -> Result<ReadRow, sqlx::Error> {
                let key: String = r.try_get(0)?;
                let mut values = Vec::with_capacity($table.columns.len());
                let mut problem = None;
                for (i, col) in $table.columns.iter().enumerate() {
                    let i = i + 1;
                    let v = match col.ty {
                        ColumnType::Int => Bound::Int(r.try_get::<Option<i64>, _>(i)?),
                        ColumnType::Float => Bound::Float(r.try_get::<Option<f64>, _>(i)?),
                        ColumnType::Bool => Bound::Bool(r.try_get::<Option<bool>, _>(i)?),
                        ColumnType::String | ColumnType::Json => {
                            Bound::Text(r.try_get::<Option<String>, _>(i)?)
                        }
                        ColumnType::Uuid => {
                            let u = r.try_get::<Option<String>, _>(i)?;
                            if u.as_ref().is_some_and(|u| u.len() != 36) {
                                problem.get_or_insert_with(|| {
                                    ValueError::Type {
                                        column: col.name.clone(),
                                        expected: "a uuid",
                                    }
                                    .to_string()
                                });
                            }
                            // One spelling in every engine, as the consumers bind it.
                            Bound::Text(u.map(|u| u.to_ascii_lowercase()))
                        }
                    };
                    if is_null(&v) && !col.nullable {
                        problem.get_or_insert_with(|| {
                            ValueError::Missing(col.name.clone()).to_string()
                        });
                    }
                    values.push(v);
                }
                Ok(ReadRow {
                    key,
                    values: match problem {
                        None => Ok(values),
                        Some(p) => Err(p),
                    },
                })
            };
            out.push(read().map_err(|e| classify($engine, e))?);
        }
        out
    }};
}

fn is_null(v: &Bound) -> bool {
    matches!(
        v,
        Bound::Int(None) | Bound::Float(None) | Bound::Bool(None) | Bound::Text(None)
    )
}

/// Binds a keyset read's parameters in [`keyset_where`]'s order.
macro_rules! bind_keyset {
    ($q:expr, $range:expr, $after:expr) => {{
        let mut q = $q;
        if let Some(f) = $range.from {
            q = q.bind(f);
        }
        if let Some(t) = $range.to {
            q = q.bind(t);
        }
        match $after {
            Some(KeyBind::Int(k)) => q = q.bind(k),
            Some(KeyBind::Text(k)) => q = q.bind(k),
            None => {}
        }
        q
    }};
}

/// Each row of the COPY text format: tab-separated, `\N` for NULL,
/// backslash escapes for the separators; floats in their shortest form
/// that reads back as the same double.
pub fn copy_text(rows: &[Vec<Bound>], out: &mut Vec<u8>) {
    use std::io::Write;
    for row in rows {
        for (i, v) in row.iter().enumerate() {
            if i > 0 {
                out.push(b'\t');
            }
            // Writing into a Vec cannot fail.
            let _ = match v {
                Bound::Int(None) | Bound::Float(None) | Bound::Bool(None) | Bound::Text(None) => {
                    out.write_all(b"\\N")
                }
                Bound::Int(Some(x)) => write!(out, "{x}"),
                Bound::Float(Some(x)) if x.is_nan() => out.write_all(b"NaN"),
                Bound::Float(Some(x)) if x.is_infinite() => {
                    out.write_all(if *x > 0.0 { b"Infinity" } else { b"-Infinity" })
                }
                Bound::Float(Some(x)) => write!(out, "{x:?}"),
                Bound::Bool(Some(b)) => out.write_all(if *b { b"t" } else { b"f" }),
                Bound::Text(Some(s)) => {
                    copy_escaped(s.as_bytes(), out);
                    Ok(())
                }
            };
        }
        out.push(b'\n');
    }
}

/// `s` with COPY's separators escaped, copied a run at a time between them.
/// Blocks of bytes are tested at once (most text has no separator at all),
/// and only a block that holds one is looked at byte by byte.
fn copy_escaped(s: &[u8], out: &mut Vec<u8>) {
    const BLOCK: usize = 32;
    let special = |b: u8| (b == b'\\') | (b == b'\t') | (b == b'\n') | (b == b'\r');
    out.reserve(s.len());
    // `s[copied..]` is not in `out` yet.
    let mut copied = 0;
    for (n, block) in s.chunks(BLOCK).enumerate() {
        if !block.iter().fold(false, |any, &b| any | special(b)) {
            continue;
        }
        for (j, &b) in block.iter().enumerate() {
            let escape: &[u8] = match b {
                b'\\' => b"\\\\",
                b'\t' => b"\\t",
                b'\n' => b"\\n",
                b'\r' => b"\\r",
                _ => continue,
            };
            let at = n * BLOCK + j;
            out.extend_from_slice(&s[copied..at]);
            out.extend_from_slice(escape);
            copied = at + 1;
        }
    }
    out.extend_from_slice(&s[copied..]);
}

/// Bytes a row takes in a statement (what `--chunk-bytes` bounds).
pub fn row_bytes(row: &[Bound]) -> usize {
    sql::row_bytes(row)
}

/// A bound row's key in its text form (as the checkpoint stores keys).
pub fn row_key(table: &Table, row: &[Bound]) -> String {
    key_of(table, row)
}

/// A row of OLD that is not written, as NEW's dead-letter table records
/// it: once per table and key, with the row as JSON when it was read.
pub fn dead_letter(table: &Table, key: &str, reason: &str, row: Option<&[Bound]>) -> DeadLetter {
    DeadLetter {
        source: format!("backfill:{}:{key}", table.name),
        reason: format!("backfill: {reason}"),
        payload: match row {
            Some(r) => super::value::row_json(table, r),
            None => serde_json::json!({ table.key.clone(): key }).to_string(),
        },
    }
}

/// The statements of the checkpoint table, per engine.
fn checkpoint_where(engine: Engine, first: usize) -> String {
    let p = |n| placeholder(engine, n);
    format!(
        "table_name = {} AND range_from = {} AND range_to = {}",
        p(first),
        p(first + 1),
        p(first + 2)
    )
}

fn checkpoint_select(engine: Engine) -> String {
    let last = match engine {
        // The exact collation makes the driver see bytes.
        Engine::MySql => "CAST(last_key AS CHAR)",
        _ => "last_key",
    };
    format!(
        "SELECT {last}, copied, duplicates, conflicts, overwritten, rejected, done FROM {} WHERE {}",
        quote(engine, BACKFILL_TABLE),
        checkpoint_where(engine, 1)
    )
}

fn checkpoint_start(engine: Engine) -> String {
    let p = |n| placeholder(engine, n);
    let head = format!(
        "INTO {} (table_name, range_from, range_to, last_key, copied, duplicates, conflicts, \
         overwritten, rejected, done, started_at, updated_at) \
         VALUES ({}, {}, {}, NULL, 0, 0, 0, 0, 0, {}, {}, {})",
        quote(engine, BACKFILL_TABLE),
        p(1),
        p(2),
        p(3),
        p(4),
        p(5),
        p(6)
    );
    match engine {
        Engine::MySql => format!("INSERT {head} ON DUPLICATE KEY UPDATE table_name = table_name"),
        Engine::Postgres | Engine::Sqlite => {
            format!("INSERT {head} ON CONFLICT (table_name, range_from, range_to) DO NOTHING")
        }
    }
}

fn checkpoint_reset(engine: Engine) -> String {
    let p = |n| placeholder(engine, n);
    format!(
        "UPDATE {} SET last_key = NULL, copied = 0, duplicates = 0, conflicts = 0, \
         overwritten = 0, rejected = 0, done = {}, started_at = {}, updated_at = {} WHERE {}",
        quote(engine, BACKFILL_TABLE),
        p(1),
        p(2),
        p(3),
        checkpoint_where(engine, 4)
    )
}

/// Moves the checkpoint only from the key this run read from: a second
/// backfill of the same range finds nothing to update and stops.
fn checkpoint_advance(engine: Engine, has_prev: bool) -> String {
    let p = |n| placeholder(engine, n);
    let prev = if has_prev {
        format!("last_key = {}", p(12))
    } else {
        "last_key IS NULL".to_string()
    };
    format!(
        "UPDATE {} SET last_key = {}, copied = copied + {}, duplicates = duplicates + {}, \
         conflicts = conflicts + {}, overwritten = overwritten + {}, rejected = rejected + {}, \
         done = {}, updated_at = {} WHERE {} AND NOT done AND {prev}",
        quote(engine, BACKFILL_TABLE),
        p(1),
        p(2),
        p(3),
        p(4),
        p(5),
        p(6),
        p(7),
        p(8),
        checkpoint_where(engine, 9)
    )
}

fn count(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The rest of a chunk's transaction, on any engine: tells duplicates from
/// conflicts among the rows the insert skipped (replacing conflicts with
/// `overwrite`), records dead letters, advances the checkpoint, commits.
macro_rules! finish_chunk {
    ($tx:expr, $DB:ty, $engine:expr, $w:expr, $inserted:expr, $skipped:expr, $candidates:expr) => {{
        let (engine, w) = ($engine, $w);
        let table = w.table;
        let mut done = Backfilled {
            inserted: $inserted,
            ..Backfilled::default()
        };
        let candidates: Vec<usize> = $candidates;
        if !candidates.is_empty() {
            let keys: Vec<String> = candidates
                .iter()
                .map(|&i| key_of(table, &w.rows[i]))
                .collect();
            let projection = sql::key_and_content(engine, table);
            let mut stored: HashMap<String, Digest> = HashMap::with_capacity(keys.len());
            for part in keys.chunks(5_000) {
                let refs: Vec<&str> = part.iter().map(String::as_str).collect();
                let found = sql::key_in_list::<$DB>(engine, &projection, table, &refs)
                    .build()
                    .fetch_all(&mut *$tx)
                    .await
                    .map_err(|e| classify(engine, e))?;
                digest_rows!(found, table, engine, stored);
            }
            for (&i, key) in candidates.iter().zip(&keys) {
                let row = &w.rows[i];
                let mine = digest::digest(&digest::canon_of_bound(table, row));
                match stored.get(key) {
                    Some(d) if *d != mine => {}
                    _ => continue,
                }
                if w.overwrite {
                    sql::update_row::<$DB>(engine, table, row)
                        .build()
                        .execute(&mut *$tx)
                        .await
                        .map_err(|e| classify(engine, e))?;
                    done.overwritten += 1;
                }
                done.conflicts.push(key.clone());
            }
        }
        let skipped: u64 = $skipped;
        done.duplicates = skipped.saturating_sub(done.conflicts.len() as u64);
        let now = now_micros();
        for d in w.dead {
            sqlx::query(&sql::dead_letter_insert(engine))
                .bind(&d.source)
                .bind(&d.reason)
                .bind(&d.payload)
                .bind(now)
                .execute(&mut *$tx)
                .await
                .map_err(|e| classify(engine, e))?;
        }
        let (from, to) = w.range.stored();
        let advance = checkpoint_advance(engine, w.prev_key.is_some());
        let kept = done.conflicts.len() as u64 - done.overwritten;
        let mut q = sqlx::query(&advance)
            .bind(w.last_key)
            .bind(count(done.inserted as usize + done.overwritten as usize))
            .bind(count(done.duplicates as usize))
            .bind(count(kept as usize))
            .bind(count(done.overwritten as usize))
            .bind(count(w.dead.len()))
            .bind(w.done)
            .bind(now)
            .bind(&table.name)
            .bind(from)
            .bind(to);
        if let Some(prev) = w.prev_key {
            q = q.bind(prev);
        }
        let moved = q
            .execute(&mut *$tx)
            .await
            .map_err(|e| classify(engine, e))?;
        if moved.rows_affected() != 1 {
            return Err(DbError::Conflict(format!(
                "backfill of {} {}",
                table.name, w.range
            )));
        }
        $tx.commit().await.map_err(|e| classify(engine, e))?;
        Ok(done)
    }};
}

impl Db {
    /// Up to `limit` rows of `table` in `range` whose key is above `after`,
    /// in key order.
    pub async fn keyset_chunk(
        &self,
        table: &Table,
        range: TimeRange,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<ReadRow>, DbError> {
        let engine = self.engine();
        let after = after.map(|k| key_bind(table, k)).transpose()?;
        let text = keyset_select(engine, table, range, after.is_some(), limit);
        with_pool!(self, pool, DB => {
            let rows = bind_keyset!(sqlx::query::<DB>(&text), range, after)
                .fetch_all(pool)
                .await
                .map_err(|e| classify(engine, e))?;
            Ok(read_rows!(rows, table, engine))
        })
    }

    /// Rows of `table` in `range` whose key is above `after` (progress).
    pub async fn keyset_count(
        &self,
        table: &Table,
        range: TimeRange,
        after: Option<&str>,
    ) -> Result<u64, DbError> {
        let engine = self.engine();
        let after = after.map(|k| key_bind(table, k)).transpose()?;
        let text = format!(
            "SELECT COUNT(*) FROM {}{}",
            quote(engine, &table.name),
            keyset_where(engine, table, range, after.is_some())
        );
        with_pool!(self, pool, DB => {
            let n: i64 = bind_keyset!(sqlx::query_scalar::<DB, i64>(&text), range, after)
                .fetch_one(pool)
                .await
                .map_err(|e| classify(engine, e))?;
            Ok(n.max(0) as u64)
        })
    }

    /// Fails with [`DbError::MissingTable`] when the checkpoint table is not
    /// there (`switchyard db init` creates it).
    pub async fn check_backfill_table(&self, url: &str) -> Result<(), DbError> {
        self.require_table(BACKFILL_TABLE, url).await
    }

    /// The stored checkpoint of a backfill.
    pub async fn backfill_checkpoint(
        &self,
        table: &str,
        range: TimeRange,
    ) -> Result<Option<BackfillCheckpoint>, DbError> {
        let engine = self.engine();
        let (from, to) = range.stored();
        let text = checkpoint_select(engine);
        with_pool!(self, pool, DB => {
            let row = sqlx::query(&text)
                .bind(table)
                .bind(from)
                .bind(to)
                .fetch_optional(pool)
                .await
                .map_err(|e| classify(engine, e))?;
            let Some(r) = row else { return Ok(None) };
            let read = || -> Result<BackfillCheckpoint, sqlx::Error> {
                let n = |i: usize| r.try_get::<i64, _>(i).map(|v| v.max(0) as u64);
                Ok(BackfillCheckpoint {
                    last_key: r.try_get::<Option<String>, _>(0)?,
                    copied: n(1)?,
                    duplicates: n(2)?,
                    conflicts: n(3)?,
                    overwritten: n(4)?,
                    rejected: n(5)?,
                    done: r.try_get::<bool, _>(6)?,
                })
            };
            read().map(Some).map_err(|e| classify(engine, e))
        })
    }

    /// The checkpoint to resume from, created empty when there is none;
    /// with `restart`, set back to the range's start.
    pub async fn backfill_start(
        &self,
        table: &str,
        range: TimeRange,
        restart: bool,
    ) -> Result<BackfillCheckpoint, DbError> {
        let engine = self.engine();
        let (from, to) = range.stored();
        let now = now_micros();
        let start = checkpoint_start(engine);
        let reset = checkpoint_reset(engine);
        with_pool!(self, pool, DB => {
            sqlx::query(&start)
                .bind(table)
                .bind(from)
                .bind(to)
                .bind(false)
                .bind(now)
                .bind(now)
                .execute(pool)
                .await
                .map_err(|e| classify(engine, e))?;
            if restart {
                sqlx::query(&reset)
                    .bind(false)
                    .bind(now)
                    .bind(now)
                    .bind(table)
                    .bind(from)
                    .bind(to)
                    .execute(pool)
                    .await
                    .map_err(|e| classify(engine, e))?;
            }
        });
        self.backfill_checkpoint(table, range)
            .await?
            .ok_or_else(|| DbError::Unavailable("the backfill checkpoint vanished".into()))
    }

    /// Writes one chunk idempotently (rows whose key NEW holds are skipped,
    /// and told apart into duplicates and conflicts), its dead letters, and
    /// advances the checkpoint, in one transaction. [`DbError::Conflict`]
    /// when the checkpoint is not where this run left it.
    pub async fn backfill_chunk(&self, w: &ChunkWrite<'_>) -> Result<Backfilled, DbError> {
        let engine = self.engine();
        let table = w.table;
        if let (Db::Postgres(pool, _), true) = (self, w.copy && !w.rows.is_empty()) {
            let mut tx = pool.begin().await.map_err(|e| classify(engine, e))?;
            let copied = w.direct && pg_copy_direct(&mut tx, table, w.rows).await?;
            let skipped_keys = if copied {
                Vec::new()
            } else {
                pg_copy_insert(&mut tx, table, w.rows).await?
            };
            let skipped = skipped_keys.len() as u64;
            let inserted = (w.rows.len() as u64).saturating_sub(skipped);
            let candidates = if skipped_keys.is_empty() {
                Vec::new()
            } else {
                let by_key: HashMap<String, usize> = w
                    .rows
                    .iter()
                    .enumerate()
                    .map(|(i, r)| (key_of(table, r), i))
                    .collect();
                skipped_keys
                    .iter()
                    .filter_map(|k| by_key.get(k).copied())
                    .collect()
            };
            return finish_chunk!(tx, sqlx::Postgres, engine, w, inserted, skipped, candidates);
        }
        let limit = self.statement_limit();
        let data = super::TableRows {
            rows: w.rows.to_vec(),
            sources: Vec::new(),
        };
        with_pool!(self, pool, DB => {
            let mut tx = pool.begin().await.map_err(|e| classify(engine, e))?;
            let mut dups_so_far = 0u64;
            if engine == Engine::MySql {
                sqlx::query(&format!("SET @{} = 0", sql::MYSQL_DUPS))
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| classify(engine, e))?;
            }
            let (mut inserted, mut skipped_total) = (0u64, 0u64);
            let mut candidates = Vec::new();
            let mut at = 0;
            for chunk in sql::chunks(engine, table, &data, limit) {
                let start = at;
                at += chunk.len();
                let n = chunk.len() as u64;
                let skipped = insert_counting_skipped!(tx, DB, engine, table, chunk, dups_so_far);
                inserted += n - skipped;
                skipped_total += skipped;
                if skipped > 0 {
                    // Which ones is not known: every row of the statement is read back.
                    candidates.extend(start..at);
                }
            }
            finish_chunk!(tx, DB, engine, w, inserted, skipped_total, candidates)
        })
    }
}

/// Column names of `table`, quoted, in declaration order.
fn pg_columns(table: &Table) -> String {
    let cols: Vec<String> = table
        .columns
        .iter()
        .map(|c| quote(Engine::Postgres, &c.name))
        .collect();
    cols.join(", ")
}

/// COPY text is sent in pieces of about this many bytes, each built while
/// the server reads the one before.
const COPY_PIECE_BYTES: usize = 256 << 10;

/// Sends `rows` (every column of the table, in declaration order) to a
/// `COPY … FROM STDIN` statement as COPY text.
async fn pg_copy(
    conn: &mut sqlx::PgConnection,
    statement: &str,
    rows: &[Vec<Bound>],
) -> Result<u64, sqlx::Error> {
    let mut copy = conn.copy_in_raw(statement).await?;
    let mut piece = Vec::with_capacity(COPY_PIECE_BYTES + (COPY_PIECE_BYTES >> 2));
    for row in rows {
        copy_text(std::slice::from_ref(row), &mut piece);
        if piece.len() >= COPY_PIECE_BYTES {
            copy.send(piece.as_slice()).await?;
            piece.clear();
        }
    }
    if !piece.is_empty() {
        copy.send(piece.as_slice()).await?;
    }
    copy.finish().await
}

/// The savepoint a direct `COPY` runs under, rolled back to when a key is
/// there already.
const DIRECT_SAVEPOINT: &str = "switchyard_copy_direct";

/// `COPY` of `rows` (each with every column of `table`, in declaration
/// order) straight into `table`, under a savepoint: true if they went in
/// whole; false, and nothing changed, when a key was there already (or
/// twice among them). Backfill's chunks and ingest's batches both try it
/// first.
pub(super) async fn pg_copy_direct(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    table: &Table,
    rows: &[Vec<Bound>],
) -> Result<bool, DbError> {
    let engine = Engine::Postgres;
    let err = |e| classify(engine, e);
    sqlx::query(&format!("SAVEPOINT {DIRECT_SAVEPOINT}"))
        .execute(&mut **tx)
        .await
        .map_err(err)?;
    let statement = format!(
        "COPY {} ({}) FROM STDIN",
        quote(engine, &table.name),
        pg_columns(table)
    );
    match pg_copy(tx, &statement, rows).await {
        Ok(_) => {
            sqlx::query(&format!("RELEASE SAVEPOINT {DIRECT_SAVEPOINT}"))
                .execute(&mut **tx)
                .await
                .map_err(err)?;
            Ok(true)
        }
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("23505") => {
            sqlx::query(&format!("ROLLBACK TO SAVEPOINT {DIRECT_SAVEPOINT}"))
                .execute(&mut **tx)
                .await
                .map_err(err)?;
            Ok(false)
        }
        Err(e) => Err(err(e)),
    }
}

/// `COPY` of the chunk into a staging table like `table`, then one `INSERT
/// … SELECT … ON CONFLICT (key) DO NOTHING`; returns the keys it skipped.
async fn pg_copy_insert(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    table: &Table,
    rows: &[Vec<Bound>],
) -> Result<Vec<String>, DbError> {
    let engine = Engine::Postgres;
    let err = |e| classify(engine, e);
    let q = |s: &str| quote(engine, s);
    let stage = q(STAGE_TABLE);
    let cols = pg_columns(table);
    let key = q(&table.key);
    sqlx::query(&format!(
        "CREATE TEMP TABLE {stage} (LIKE {}) ON COMMIT DROP",
        q(&table.name)
    ))
    .execute(&mut **tx)
    .await
    .map_err(err)?;
    pg_copy(tx, &format!("COPY {stage} ({cols}) FROM STDIN"), rows)
        .await
        .map_err(err)?;
    let text = format!(
        "WITH ins AS (INSERT INTO {} ({cols}) SELECT {cols} FROM {stage} ORDER BY {key} \
         ON CONFLICT ({key}) DO NOTHING RETURNING {key}) \
         SELECT s.{key}::text FROM {stage} s WHERE NOT EXISTS (SELECT 1 FROM ins WHERE ins.{key} = s.{key})",
        q(&table.name)
    );
    sqlx::query_scalar::<_, String>(&text)
        .fetch_all(&mut **tx)
        .await
        .map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::{Schema, TableConfig};

    fn table(key_ty: &str) -> Table {
        let cfg: TableConfig = toml::from_str(&format!(
            r#"
            name = "t"
            key = "k"
            time = "ts"
            group = "g"
            [columns]
            k = "{key_ty}"
            ts = "int"
            g = "int"
            "#
        ))
        .unwrap();
        Schema::from_config(&[cfg]).unwrap().tables()[0].clone()
    }

    #[test]
    fn keyset_reads_order_by_the_key_and_never_skip_by_offset() {
        let t = table("uuid");
        let all = TimeRange::default();
        let some = TimeRange {
            from: Some(10),
            to: Some(20),
        };
        let pg = keyset_select(Engine::Postgres, &t, some, true, 500);
        assert!(
            pg.ends_with(
                "FROM \"t\" WHERE \"ts\" >= $1 AND \"ts\" < $2 AND \"k\" > $3::uuid ORDER BY \"k\" LIMIT 500"
            ),
            "{pg}"
        );
        assert!(!pg.contains("OFFSET"));
        let my = keyset_select(Engine::MySql, &t, all, true, 5);
        assert!(
            my.ends_with("FROM `t` WHERE `k` > ? ORDER BY `k` LIMIT 5"),
            "{my}"
        );
        let first = keyset_select(Engine::Sqlite, &t, all, false, 0);
        assert!(
            first.ends_with("FROM \"t\" ORDER BY \"k\" LIMIT 1"),
            "{first}"
        );
        let upper = TimeRange {
            from: None,
            to: Some(7),
        };
        assert_eq!(
            keyset_where(Engine::Postgres, &table("int"), upper, true),
            " WHERE \"ts\" < $1 AND \"k\" > $2"
        );
    }

    #[test]
    fn open_ends_are_stored_as_the_extremes() {
        assert_eq!(TimeRange::default().stored(), (i64::MIN, i64::MAX));
        let r = TimeRange {
            from: Some(-5),
            to: None,
        };
        assert_eq!(r.stored(), (-5, i64::MAX));
        assert_eq!(r.to_string(), "[-5, ∞)");
    }

    #[test]
    fn integer_keys_resume_as_integers() {
        let t = table("int");
        assert!(matches!(key_bind(&t, "-42"), Ok(KeyBind::Int(-42))));
        assert!(matches!(key_bind(&t, "x"), Err(DbError::Schema(_))));
        assert!(matches!(
            key_bind(&table("string"), "x"),
            Ok(KeyBind::Text("x"))
        ));
    }

    #[test]
    fn copy_text_escapes_what_separates_and_keeps_doubles_exact() {
        let rows = vec![vec![
            Bound::Int(Some(i64::MIN)),
            Bound::Float(Some(0.1)),
            Bound::Float(Some(1e300)),
            Bound::Float(Some(f64::NEG_INFINITY)),
            Bound::Bool(Some(true)),
            Bound::Text(Some("a\tb\nc\\d\re 😀".into())),
            Bound::Text(None),
            Bound::Int(None),
        ]];
        let mut out = Vec::new();
        copy_text(&rows, &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "-9223372036854775808\t0.1\t1e300\t-Infinity\tt\ta\\tb\\nc\\\\d\\re 😀\t\\N\t\\N\n"
        );
        // The shortest form reads back as the same double.
        for f in [0.1, 1.0 / 3.0, f64::MAX, f64::MIN_POSITIVE, -0.0, 5e-324] {
            let mut out = Vec::new();
            copy_text(&[vec![Bound::Float(Some(f))]], &mut out);
            let s = String::from_utf8(out).unwrap();
            assert_eq!(s.trim_end().parse::<f64>().unwrap().to_bits(), f.to_bits());
        }
    }

    #[test]
    fn copy_text_escapes_separators_anywhere_in_long_text() {
        // Separators at every position around the 32-byte blocks, alone,
        // in runs, first and last.
        let mut text = String::new();
        for i in 0..200 {
            text.push_str(&"é😀x".repeat(i % 7));
            text.push(['\\', '\t', '\n', '\r'][i % 4]);
            if i % 5 == 0 {
                text.push_str("\\\\\t\n");
            }
        }
        let text = format!("\t{text}\\");
        let mut out = Vec::new();
        copy_text(&[vec![Bound::Text(Some(text.clone()))]], &mut out);
        let mut want = String::new();
        for c in text.chars() {
            match c {
                '\\' => want.push_str("\\\\"),
                '\t' => want.push_str("\\t"),
                '\n' => want.push_str("\\n"),
                '\r' => want.push_str("\\r"),
                c => want.push(c),
            }
        }
        want.push('\n');
        assert_eq!(String::from_utf8(out).unwrap(), want);
        for len in 0..70 {
            let plain = "a".repeat(len);
            let mut out = Vec::new();
            copy_text(&[vec![Bound::Text(Some(plain.clone()))]], &mut out);
            assert_eq!(out, format!("{plain}\n").into_bytes());
        }
    }

    #[test]
    fn the_checkpoint_advances_only_from_where_it_was() {
        let first = checkpoint_advance(Engine::Postgres, false);
        assert!(
            first.ends_with("AND NOT done AND last_key IS NULL"),
            "{first}"
        );
        let next = checkpoint_advance(Engine::MySql, true);
        assert!(next.ends_with("AND NOT done AND last_key = ?"), "{next}");
        assert_eq!(next.matches('?').count(), 12);
        let pg = checkpoint_advance(Engine::Postgres, true);
        assert!(pg.contains("range_to = $11") && pg.ends_with("last_key = $12"));
        let c = BackfillCheckpoint {
            copied: 5,
            duplicates: 2,
            conflicts: 1,
            overwritten: 3,
            rejected: 1,
            ..Default::default()
        };
        // Overwritten rows are counted as copied too.
        assert_eq!(c.rows(), 9);
    }
}
