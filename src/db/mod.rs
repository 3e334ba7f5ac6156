//! The databases both pipelines write to. One `Db` over PostgreSQL, MySQL /
//! MariaDB or SQLite, chosen by the URL scheme. Every statement is built from
//! the declared schema (names never come from input), every insert is
//! idempotent on the table's unique key, and a batch is written in one
//! transaction together with its bookkeeping (a file checkpoint or dead
//! letters), so a crash at any point neither loses nor duplicates a row.

pub mod args;
pub mod cli;
pub mod digest;
mod metrics;
mod sql;
mod value;

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sqlx::mysql::{MySqlConnectOptions, MySqlPool, MySqlPoolOptions};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use sqlx::Row;

use crate::schema::{OnConflict, Schema, Table};
use digest::Digest;
use std::collections::HashMap;

pub use metrics::SinkMetrics;
pub use replay::{Spooled, ToReplay, REPLAY_TABLE};
pub use sql::{Drift, LiveColumn, CHECKPOINT_TABLE, DEAD_LETTER_TABLE};
pub use value::{row_values, row_values_exact, Bound, ValueError};

/// Which SQL dialect a URL speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Postgres,
    MySql,
    Sqlite,
}

impl Engine {
    /// From a URL's scheme: `postgres://`, `postgresql://`, `mysql://`,
    /// `mariadb://`, `sqlite:`.
    pub fn of_url(url: &str) -> Option<Engine> {
        let scheme = url.split(':').next()?.to_ascii_lowercase();
        match scheme.as_str() {
            "postgres" | "postgresql" => Some(Engine::Postgres),
            "mysql" | "mariadb" => Some(Engine::MySql),
            "sqlite" => Some(Engine::Sqlite),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Engine::Postgres => "postgres",
            Engine::MySql => "mysql",
            Engine::Sqlite => "sqlite",
        }
    }
}

impl fmt::Display for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Query parameters whose value is a secret.
const SECRET_PARAMS: [&str; 9] = [
    "password",
    "sslpassword",
    "pass",
    "pwd",
    "token",
    "access_token",
    "secret",
    "api_key",
    "apikey",
];

/// A URL with its secrets hidden, for logs and errors: the password of the
/// user part (which may itself hold `@`, `/` or `:`) and the value of every
/// secret query parameter (`password`, `sslpassword`, `token`, …).
pub fn redact_url(url: &str) -> String {
    let Some(start) = url.find("://").map(|i| i + 3) else {
        return redact_query(url);
    };
    let (head, query) = match url[start..].find('?') {
        Some(q) => url.split_at(start + q),
        None => (url, ""),
    };
    let rest = &head[start..];
    // The user part ends at the last `@` before the query: a password may
    // hold `/` or `@`, a host never holds `@`.
    let out = match rest.rfind('@') {
        Some(at) => match rest[..at].find(':') {
            Some(colon) => format!("{}{}:***{}", &head[..start], &rest[..colon], &rest[at..]),
            None => head.to_string(),
        },
        None => head.to_string(),
    };
    out + &redact_query(query)
}

/// `?a=1&password=x` with every secret parameter's value hidden.
fn redact_query(s: &str) -> String {
    let Some(q) = s.find('?') else {
        return s.to_string();
    };
    let (head, query) = s.split_at(q + 1);
    let parts: Vec<String> = query
        .split('&')
        .map(|kv| match kv.split_once('=') {
            Some((k, _)) if SECRET_PARAMS.contains(&k.to_ascii_lowercase().as_str()) => {
                format!("{k}=***")
            }
            _ => kv.to_string(),
        })
        .collect();
    format!("{head}{}", parts.join("&"))
}

/// Only the scheme and host (and port) of a URL: for endpoints whose path
/// may itself be the secret (webhooks of chat services).
pub fn redact_endpoint(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(u) => match (u.host_str(), u.port()) {
            (Some(h), Some(p)) => format!("{}://{h}:{p}/…", u.scheme()),
            (Some(h), None) => format!("{}://{h}/…", u.scheme()),
            _ => format!("{}:…", u.scheme()),
        },
        Err(_) => "(not a URL)".to_string(),
    }
}

/// Why a database call failed, as the caller must branch on it.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The URL or options are wrong: a configuration error, not worth retrying.
    #[error("database {url}: {message}")]
    Config { url: String, message: String },
    /// The database refused the data (a type, range or constraint error):
    /// retrying cannot help; the rows go to the dead letter.
    #[error("the database rejected the row: {0}")]
    Rejected(String),
    /// Another loader advanced this file's checkpoint first.
    #[error("the checkpoint of {0} was advanced by another loader")]
    Conflict(String),
    /// The database is down, unreachable or busy: retry later.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// The server refused the connection itself: TLS (a certificate that
    /// does not verify, TLS required or unsupported) or the credentials or
    /// grants. A configuration error: retrying cannot help.
    #[error("the database refused the connection (check its TLS settings and credentials): {0}")]
    Access(String),
    /// A table does not match the declared schema (a column missing, say):
    /// no retry helps, and dead-lettering would refuse every row.
    #[error(
        "the database does not match the configured schema ({0}); see `switchyard db migrate`"
    )]
    Schema(String),
    /// A declared table is missing: `switchyard db init` has not run.
    #[error("table {table} does not exist in {url}; run `switchyard db init --db-url …` first")]
    MissingTable { table: String, url: String },
}

impl DbError {
    pub fn is_transient(&self) -> bool {
        matches!(self, DbError::Unavailable(_))
    }

    /// An error in how the database is configured or reached (exit 2), not
    /// in the data and not an outage.
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            DbError::Config { .. }
                | DbError::Access(_)
                | DbError::MissingTable { .. }
                | DbError::Schema(_)
        )
    }

    /// A bounded label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            DbError::Config { .. } => "config",
            DbError::Rejected(_) => "rejected",
            DbError::Conflict(_) => "conflict",
            DbError::Unavailable(_) => "unavailable",
            DbError::Access(_) => "access",
            DbError::MissingTable { .. } => "missing_table",
            DbError::Schema(_) => "schema",
        }
    }
}

/// Sorts a driver error into "the connection is misconfigured", "the data
/// is bad" and "try again later".
fn classify(engine: Engine, e: sqlx::Error) -> DbError {
    let sqlx::Error::Database(db) = &e else {
        return match e {
            // A handshake that fails, a certificate that does not verify,
            // or options the driver cannot honour.
            sqlx::Error::Tls(_) | sqlx::Error::Configuration(_) => DbError::Access(e.to_string()),
            _ => DbError::Unavailable(e.to_string()),
        };
    };
    let message = db.message().to_string();
    let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
    let number = db
        .try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
        .map_or(0, |m| m.number());
    let sqlite_schema = engine == Engine::Sqlite
        && (message.contains("no such column")
            || message.contains("no such table")
            || message.contains("has no column named"));
    if sqlite_schema {
        return DbError::Schema(message);
    }
    match class_of(engine, &code, number) {
        Class::Schema => DbError::Schema(format!("{message} (code {code})")),
        Class::Access => DbError::Access(format!("{message} (code {code})")),
        Class::Rejected => DbError::Rejected(message),
        Class::Unavailable => DbError::Unavailable(format!("{message} (code {code})")),
    }
}

/// What a database error says, from its SQLSTATE `code` (SQLite: its result
/// code) and, on MySQL, its error `number`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// The connection is refused for its configuration: authentication,
    /// authorisation, an unknown database, TLS demanded.
    Access,
    /// The row is refused: a type, range or constraint error.
    Rejected,
    /// The statement does not fit the tables: a column or table missing.
    Schema,
    /// Anything else: the server is down, busy or failing; retry.
    Unavailable,
}

fn class_of(engine: Engine, code: &str, number: u16) -> Class {
    // SQLSTATE class 28: invalid authorisation (a bad password, no pg_hba
    // entry, which covers "hostssl only"; MySQL's access denied).
    let access = code.starts_with("28")
        || match engine {
            // 3D000: no such database; 42501: no grant.
            Engine::Postgres => code == "3D000" || code == "42501",
            // Access denied (to a database, a table), unknown database, and
            // "connections using insecure transport are prohibited".
            Engine::MySql => matches!(number, 1044 | 1045 | 1049 | 1142 | 3159),
            Engine::Sqlite => false,
        };
    // SQLSTATE classes 22 (data exception), 23 (integrity constraint) and
    // 44 (check option) are about the row, not the server.
    let data_class = ["22", "23", "44"].iter().any(|c| code.starts_with(c));
    let rejected = match engine {
        // 54000: a row beyond an engine limit (an index row too big for a
        // B-tree page: a 10 KB key): no retry stores it.
        Engine::Postgres => data_class || code == "54000",
        Engine::MySql => {
            data_class
                // HY000 data errors: incorrect value, truncated value,
                // invalid JSON, check constraint failed.
                || matches!(number, 1292 | 1366 | 1411 | 3140 | 3819 | 4025)
                // A statement above max_allowed_packet: statements are sized
                // below it, so only a single row that big gets here.
                || number == 1153
        }
        Engine::Sqlite => code
            .parse::<i64>()
            // Primary codes: 18 too big, 19 constraint, 20 type mismatch.
            .map(|c| matches!(c & 0xff, 18..=20))
            .unwrap_or(false),
    };
    let schema = match engine {
        // Undefined column, undefined table.
        Engine::Postgres => code == "42703" || code == "42P01",
        // Unknown column, no such table.
        Engine::MySql => matches!(number, 1054 | 1146),
        Engine::Sqlite => false,
    };
    if access {
        Class::Access
    } else if schema {
        Class::Schema
    } else if rejected {
        Class::Rejected
    } else {
        Class::Unavailable
    }
}

/// A row's key in the text form the databases return it in.
fn key_of(table: &Table, row: &[Bound]) -> String {
    let i = table
        .columns
        .iter()
        .position(|c| c.name == table.key)
        .unwrap_or(0);
    match row.get(i) {
        Some(Bound::Int(Some(v))) => v.to_string(),
        Some(Bound::Text(Some(t))) => t.clone(),
        Some(Bound::Float(Some(f))) => f.to_string(),
        Some(Bound::Bool(Some(b))) => b.to_string(),
        _ => String::new(),
    }
}

/// At most 200 characters of a value, for messages.
pub fn short(s: &str) -> String {
    match s.char_indices().nth(200) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// One dead-lettered input: where it came from, why, and the bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// Unique per input, so a redelivered poison message is recorded once:
    /// `topic/partition/offset` or `file:byte-offset`.
    pub source: String,
    pub reason: String,
    pub payload: String,
}

/// A file checkpoint to advance in the same transaction as its rows.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointUpdate {
    /// The loader identity (`load --loader-id`): loaders of different
    /// folders keep apart checkpoints of files that share a name.
    pub loader: String,
    pub file: String,
    /// The offset this loader read from; None for a file not yet started.
    pub from: Option<u64>,
    pub to: u64,
    pub lines: u64,
    pub done: bool,
}

/// A file's checkpoint as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpoint {
    pub offset: u64,
    pub lines: u64,
    pub done: bool,
}

/// Rows of one table, each already converted to bindable values.
#[derive(Debug, Default, Clone)]
pub struct TableRows {
    pub rows: Vec<Vec<Bound>>,
    /// Where each row came from (`topic/partition/offset`, `file:offset`),
    /// row for row: a conflict is recorded under it. Empty: not recorded.
    pub sources: Vec<String>,
}

impl TableRows {
    pub fn push(&mut self, row: Vec<Bound>, source: String) {
        self.rows.push(row);
        self.sources.push(source);
    }

    /// Takes out row `i` and its source.
    pub fn remove(&mut self, i: usize) -> Vec<Bound> {
        if i < self.sources.len() {
            self.sources.remove(i);
        }
        self.rows.remove(i)
    }
}

/// A row whose key was stored already with other content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    pub key: String,
    /// Where the arriving row came from (empty when not given).
    pub source: String,
    /// The arriving row replaced the stored one (`last-write-wins`).
    pub replaced: bool,
}

/// What a transaction did to one table.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Written {
    pub inserted: u64,
    /// Rows whose key was already present with the same content (a replay
    /// or a redelivery): skipped.
    pub duplicates: u64,
    /// Rows whose key was already present with other content, handled by
    /// the table's `on_conflict`.
    pub conflicts: Vec<Conflict>,
}

/// A connection pool to one database.
#[derive(Clone)]
pub enum Db {
    /// With when to try `COPY` for the next batch.
    Postgres(PgPool, Arc<CopyGate>),
    /// With the statement size limit learnt from the server's
    /// `max_allowed_packet` (a statement above it is refused outright).
    MySql(MySqlPool, Arc<AtomicUsize>),
    Sqlite(SqlitePool),
}

/// Whether a batch tries `COPY` first. A `COPY` refused because a key was
/// stored already is rolled back and the batch inserted again, so it costs
/// a second write; after one refusal the next batches most likely hold
/// stored keys too (a replay, a redelivery after a restart). Each refusal in
/// a row doubles the batches that skip `COPY` (1, 2, 4 … up to 64), and one
/// that goes in resets it: a replay pays for one `COPY` in 64 batches, live
/// traffic for none.
#[derive(Debug, Default)]
pub struct CopyGate {
    skip: AtomicU32,
    refusals: AtomicU32,
}

/// The most batches a refusal makes skip `COPY`: 2^6.
const COPY_SKIP_MAX_SHIFT: u32 = 6;

impl CopyGate {
    /// True if this batch tries `COPY` (one skip used up otherwise).
    fn try_now(&self) -> bool {
        self.skip
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| s.checked_sub(1))
            .is_err()
    }

    fn went_in(&self) {
        self.refusals.store(0, Ordering::Relaxed);
    }

    fn refused(&self) {
        let n = self.refusals.fetch_add(1, Ordering::Relaxed);
        self.skip
            .store(1 << n.min(COPY_SKIP_MAX_SHIFT), Ordering::Relaxed);
    }
}

/// Runs `$body` with `$pool` bound to the concrete pool and `DB` to its driver.
/// Reads rows of `key_and_content` into `out`: key → digest.
macro_rules! digest_rows {
    ($rows:expr, $table:expr, $engine:expr, $out:expr) => {
        for r in &$rows {
            let read = || -> Result<(String, Digest), sqlx::Error> {
                use crate::schema::ColumnType as T;
                use digest::Canon;
                let key: String = r.try_get(0)?;
                let mut values = Vec::with_capacity($table.columns.len());
                for (i, col) in $table.columns.iter().enumerate() {
                    let i = i + 1;
                    values.push(match col.ty {
                        T::Int => r
                            .try_get::<Option<i64>, _>(i)?
                            .map_or(Canon::Null, Canon::Int),
                        T::Float => r
                            .try_get::<Option<f64>, _>(i)?
                            .map_or(Canon::Null, Canon::Float),
                        T::Bool => r
                            .try_get::<Option<bool>, _>(i)?
                            .map_or(Canon::Null, Canon::Bool),
                        T::String => r
                            .try_get::<Option<String>, _>(i)?
                            .map_or(Canon::Null, Canon::Text),
                        T::Uuid => r
                            .try_get::<Option<String>, _>(i)?
                            .map_or(Canon::Null, |u| Canon::Text(u.to_ascii_lowercase())),
                        T::Json => r
                            .try_get::<Option<String>, _>(i)?
                            .map_or(Canon::Null, |t| digest::canon_of_json_text(&t)),
                    });
                }
                Ok((key, digest::digest(&values)))
            };
            let (key, d) = read().map_err(|e| classify($engine, e))?;
            $out.insert(key, d);
        }
    };
}

/// Runs one multi-row insert of `chunk` in `$tx` and gives how many of its
/// rows were skipped as already present. PostgreSQL and SQLite say it by
/// the rows affected; MySQL counts duplicates in a session variable for the
/// whole transaction (`sql::MYSQL_DUPS`, zeroed at its start), so this
/// statement's are the difference from `$dups_so_far`, which it advances.
macro_rules! insert_counting_skipped {
    ($tx:expr, $DB:ty, $engine:expr, $table:expr, $chunk:expr, $dups_so_far:expr) => {{
        let done = sql::insert::<$DB>($engine, $table, $chunk)
            .build()
            .execute(&mut *$tx)
            .await
            .map_err(|e| classify($engine, e))?;
        let n = $chunk.len() as u64;
        if $engine == Engine::MySql {
            let d: Option<i64> =
                sqlx::query_scalar(&format!("SELECT CAST(@{} AS SIGNED)", sql::MYSQL_DUPS))
                    .fetch_one(&mut *$tx)
                    .await
                    .map_err(|e| classify($engine, e))?;
            let total = d.unwrap_or(0).max(0) as u64;
            let this = total.saturating_sub($dups_so_far).min(n);
            $dups_so_far = total;
            this
        } else {
            n - done.rows_affected().min(n)
        }
    }};
}

macro_rules! with_pool {
    ($db:expr, $pool:ident, $DB:ident => $body:expr) => {
        match $db {
            Db::Postgres($pool, _) => {
                #[allow(dead_code)]
                type $DB = sqlx::Postgres;
                $body
            }
            Db::MySql($pool, _) => {
                #[allow(dead_code)]
                type $DB = sqlx::MySql;
                $body
            }
            Db::Sqlite($pool) => {
                #[allow(dead_code)]
                type $DB = sqlx::Sqlite;
                $body
            }
        }
    };
}

// After `with_pool!`, which it uses.
mod replay;
// After `with_pool!` and `digest_rows!`, which it uses.
pub mod keyset;
// After `with_pool!`, which it uses.
pub mod partials;
pub mod range;

/// `COPY` of a table's rows straight into it, where the engine has it: the
/// fast path of [`Db::write_batch`].
trait CopyIn: sqlx::Database {
    /// True if every row went in (none of their keys was stored, none twice
    /// among them); false, with nothing changed, otherwise, and always on an
    /// engine without `COPY`: the caller then inserts them one statement
    /// at a time, which tells duplicates from conflicts.
    async fn copy_in(
        _tx: &mut sqlx::Transaction<'_, Self>,
        _table: &Table,
        _rows: &[Vec<Bound>],
    ) -> Result<bool, DbError> {
        Ok(false)
    }
}

impl CopyIn for sqlx::Postgres {
    async fn copy_in(
        tx: &mut sqlx::Transaction<'_, Self>,
        table: &Table,
        rows: &[Vec<Bound>],
    ) -> Result<bool, DbError> {
        if rows.is_empty() {
            return Ok(true);
        }
        // The values the inserts bind, as COPY text: each parsed by the
        // column's type as a bound parameter cast to it would be.
        keyset::pg_copy_direct(tx, table, rows).await
    }
}

impl CopyIn for sqlx::MySql {}

impl CopyIn for sqlx::Sqlite {}

impl Db {
    /// A lazy pool: a database that is down now is retried by the callers,
    /// a malformed URL is an error now.
    pub fn connect(url: &str, max_connections: u32) -> Result<Db, DbError> {
        let config = |message: String| DbError::Config {
            url: redact_url(url),
            message,
        };
        let engine = Engine::of_url(url).ok_or_else(|| {
            config("unknown scheme: use postgres://, mysql://, mariadb:// or sqlite:".into())
        })?;
        let acquire = Duration::from_secs(5);
        Ok(match engine {
            Engine::Postgres => {
                let opts = PgConnectOptions::from_str(url).map_err(|e| config(e.to_string()))?;
                Db::Postgres(
                    PgPoolOptions::new()
                        .max_connections(max_connections)
                        .acquire_timeout(acquire)
                        .connect_lazy_with(opts),
                    Arc::default(),
                )
            }
            Engine::MySql => {
                let url = url.replacen("mariadb:", "mysql:", 1);
                let opts =
                    MySqlConnectOptions::from_str(&url).map_err(|e| config(e.to_string()))?;
                let limit = Arc::new(AtomicUsize::new(sql::MAX_STATEMENT_BYTES));
                let learnt = limit.clone();
                Db::MySql(
                    MySqlPoolOptions::new()
                        .max_connections(max_connections)
                        .acquire_timeout(acquire)
                        .after_connect(move |conn, _| {
                            let learnt = learnt.clone();
                            Box::pin(async move {
                                let row = sqlx::query("SELECT @@max_allowed_packet")
                                    .fetch_one(&mut *conn)
                                    .await?;
                                let packet = row.try_get::<u64, _>(0).or_else(|_| {
                                    row.try_get::<i64, _>(0).map(|v| v.max(0) as u64)
                                })?;
                                learnt.store(sql::statement_limit(packet), Ordering::Relaxed);
                                Ok(())
                            })
                        })
                        .connect_lazy_with(opts),
                    limit,
                )
            }
            Engine::Sqlite => {
                let opts = SqliteConnectOptions::from_str(url)
                    .map_err(|e| config(e.to_string()))?
                    .create_if_missing(true)
                    .journal_mode(SqliteJournalMode::Wal)
                    .busy_timeout(Duration::from_secs(10));
                Db::Sqlite(
                    SqlitePoolOptions::new()
                        .max_connections(max_connections)
                        .acquire_timeout(acquire)
                        .connect_lazy_with(opts),
                )
            }
        })
    }

    /// When to try `COPY` (PostgreSQL only).
    fn copy_gate(&self) -> Option<&CopyGate> {
        match self {
            Db::Postgres(_, gate) => Some(gate),
            _ => None,
        }
    }

    pub fn engine(&self) -> Engine {
        match self {
            Db::Postgres(..) => Engine::Postgres,
            Db::MySql(..) => Engine::MySql,
            Db::Sqlite(_) => Engine::Sqlite,
        }
    }

    /// The most bytes one multi-row statement may carry here.
    fn statement_limit(&self) -> usize {
        match self {
            Db::MySql(_, limit) => limit.load(Ordering::Relaxed),
            _ => sql::MAX_STATEMENT_BYTES,
        }
    }

    pub async fn close(&self) {
        with_pool!(self, pool, DB => pool.close().await)
    }

    /// Creates the declared tables, their key and time indexes, and the
    /// bookkeeping tables. Safe to run again.
    pub async fn init(&self, schema: &Schema) -> Result<(), DbError> {
        let engine = self.engine();
        let collation = self.exact_collation().await?;
        let statements = sql::init_statements(engine, schema, &collation);
        self.execute_all(&statements).await
    }

    /// Creates `table` with its key and time indexes; fails if a table of
    /// that name exists (it is then left as it is).
    pub async fn create_new_table(&self, table: &Table) -> Result<(), DbError> {
        let engine = self.engine();
        let collation = self.exact_collation().await?;
        let statements = sql::table_statements(engine, table, &collation, false);
        self.execute_all(&statements).await
    }

    /// Drops the table `name` if it exists.
    pub async fn drop_table(&self, name: &str) -> Result<(), DbError> {
        let engine = self.engine();
        let statement = format!("DROP TABLE IF EXISTS {}", sql::quote(engine, name));
        self.execute_all(&[statement]).await
    }

    /// Removes every row of the table `name`.
    pub async fn empty_table(&self, name: &str) -> Result<(), DbError> {
        let engine = self.engine();
        let verb = if engine == Engine::Sqlite {
            "DELETE FROM"
        } else {
            "TRUNCATE TABLE"
        };
        let statement = format!("{verb} {}", sql::quote(engine, name));
        self.execute_all(&[statement]).await
    }

    async fn execute_all(&self, statements: &[String]) -> Result<(), DbError> {
        let engine = self.engine();
        with_pool!(self, pool, DB => {
            for s in statements {
                sqlx::query(s)
                    .execute(pool)
                    .await
                    .map_err(|e| classify(engine, e))?;
            }
            Ok(())
        })
    }

    /// The collation text is stored with: on MySQL, the best of
    /// [`sql::MYSQL_EXACT_COLLATIONS`] the server has (else `utf8mb4_bin`,
    /// which pads trailing spaces); empty for the other engines.
    async fn exact_collation(&self) -> Result<String, DbError> {
        let Db::MySql(pool, _) = self else {
            return Ok(String::new());
        };
        let have: Vec<String> = sqlx::query_scalar(
            "SELECT COLLATION_NAME FROM information_schema.COLLATIONS WHERE COLLATION_NAME IN (?, ?)",
        )
        .bind(sql::MYSQL_EXACT_COLLATIONS[0])
        .bind(sql::MYSQL_EXACT_COLLATIONS[1])
        .fetch_all(pool)
        .await
        .map_err(|e| classify(Engine::MySql, e))?;
        Ok(sql::MYSQL_EXACT_COLLATIONS
            .iter()
            .find(|c| have.iter().any(|h| h == *c))
            .unwrap_or(&"utf8mb4_bin")
            .to_string())
    }

    /// The columns `table` has in the database (empty when it does not exist).
    pub async fn live_columns(&self, table: &str) -> Result<Vec<sql::LiveColumn>, DbError> {
        let engine = self.engine();
        let err = |e| classify(engine, e);
        let rows: Vec<(String, String, bool, bool)> = match self {
            Db::Postgres(pool, _) => sqlx::query_as::<_, (String, String, String, bool)>(
                "SELECT column_name::text, data_type::text, is_nullable::text, column_default IS NOT NULL \
                 FROM information_schema.columns WHERE table_schema = current_schema() AND table_name = $1",
            )
            .bind(table)
            .fetch_all(pool)
            .await
            .map_err(err)?
            .into_iter()
            .map(|(n, t, null, d)| (n, t, null == "YES", d))
            .collect(),
            Db::MySql(pool, _) => sqlx::query_as::<_, (String, String, String, i64)>(
                "SELECT CAST(COLUMN_NAME AS CHAR), CAST(DATA_TYPE AS CHAR), CAST(IS_NULLABLE AS CHAR), \
                 CAST(COLUMN_DEFAULT IS NOT NULL AS SIGNED) FROM information_schema.COLUMNS \
                 WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ?",
            )
            .bind(table)
            .fetch_all(pool)
            .await
            .map_err(err)?
            .into_iter()
            .map(|(n, t, null, d)| (n, t, null == "YES", d != 0))
            .collect(),
            Db::Sqlite(pool) => sqlx::query_as::<_, (String, String, i64, i64)>(
                "SELECT name, type, \"notnull\", dflt_value IS NOT NULL FROM pragma_table_info(?)",
            )
            .bind(table)
            .fetch_all(pool)
            .await
            .map_err(err)?
            .into_iter()
            .map(|(n, t, notnull, d)| (n, t, notnull == 0, d != 0))
            .collect(),
        };
        Ok(rows
            .into_iter()
            .map(|(name, data_type, nullable, has_default)| sql::LiveColumn {
                name,
                data_type,
                nullable,
                has_default,
            })
            .collect())
    }

    /// How each declared table in the database differs from its declaration.
    pub async fn drift(&self, schema: &Schema) -> Result<Vec<(String, sql::Drift)>, DbError> {
        let mut out = Vec::new();
        for t in schema.tables() {
            let live = self.live_columns(&t.name).await?;
            if live.is_empty() {
                continue;
            }
            out.extend(
                sql::drift(self.engine(), t, &live)
                    .into_iter()
                    .map(|d| (t.name.clone(), d)),
            );
        }
        Ok(out)
    }

    /// Adds the declared columns a table lacks (`db migrate --apply`): in one
    /// transaction where the engine allows DDL in one (PostgreSQL, SQLite;
    /// MySQL commits each statement). Returns the statements run.
    pub async fn add_missing_columns(&self, schema: &Schema) -> Result<Vec<String>, DbError> {
        let engine = self.engine();
        let statements: Vec<String> = self
            .drift(schema)
            .await?
            .into_iter()
            .filter_map(|(_, d)| match d {
                sql::Drift::Missing { add, .. } => Some(add),
                _ => None,
            })
            .collect();
        if statements.is_empty() {
            return Ok(statements);
        }
        with_pool!(self, pool, DB => {
            let mut tx = pool.begin().await.map_err(|e| classify(engine, e))?;
            for s in &statements {
                sqlx::query(s)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| classify(engine, e))?;
            }
            tx.commit().await.map_err(|e| classify(engine, e))?;
        });
        Ok(statements)
    }

    /// Fails with [`DbError::MissingTable`] when the table `name` is not
    /// there (`switchyard db init` creates the declared and bookkeeping ones).
    pub async fn require_table(&self, name: &str, url: &str) -> Result<(), DbError> {
        let engine = self.engine();
        let probe = format!("SELECT 1 FROM {} WHERE 1 = 0", sql::quote(engine, name));
        let res = with_pool!(self, pool, DB => sqlx::query(&probe).execute(pool).await.map(|_| ()));
        match res {
            Ok(()) => Ok(()),
            Err(sqlx::Error::Database(e))
                if matches!(e.code().as_deref(), Some("42P01") | Some("42S02"))
                    || e.message().contains("no such table") =>
            {
                Err(DbError::MissingTable {
                    table: name.to_string(),
                    url: redact_url(url),
                })
            }
            Err(e) => Err(classify(engine, e)),
        }
    }

    /// Checks that every declared table and the bookkeeping tables exist.
    pub async fn check_tables(&self, schema: &Schema, url: &str) -> Result<(), DbError> {
        let engine = self.engine();
        let names = schema.tables().iter().map(|t| t.name.as_str()).chain([
            CHECKPOINT_TABLE,
            DEAD_LETTER_TABLE,
            REPLAY_TABLE,
        ]);
        for name in names {
            self.require_table(name, url).await?;
        }
        let drift = self.drift(schema).await?;
        if !drift.is_empty() {
            let lines: Vec<String> = drift
                .iter()
                .map(|(t, d)| format!("table {t}: {d}"))
                .collect();
            let missing = drift
                .iter()
                .any(|(_, d)| matches!(d, sql::Drift::Missing { .. }));
            return Err(DbError::Config {
                url: redact_url(url),
                message: format!(
                    "the tables differ from the configuration, and rows would be refused or lost: {}{}",
                    lines.join("; "),
                    if missing {
                        " (`switchyard db migrate --apply` adds the missing columns)"
                    } else {
                        ""
                    }
                ),
            });
        }
        if let Db::MySql(pool, _) = self {
            let exact = self.exact_collation().await?;
            // UUID keys are validated and lower-cased: no two differ only
            // in case or padding, whatever the collation.
            let string_keys = schema.tables().iter().filter(|t| {
                t.column(&t.key)
                    .is_some_and(|c| c.ty == crate::schema::ColumnType::String)
            });
            for t in string_keys {
                let collation: Option<Option<String>> = sqlx::query_scalar(
                    "SELECT COLLATION_NAME FROM information_schema.COLUMNS \
                     WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ? AND COLUMN_NAME = ?",
                )
                .bind(&t.name)
                .bind(&t.key)
                .fetch_optional(pool)
                .await
                .map_err(|e| classify(engine, e))?;
                if let Some(Some(collation)) = collation {
                    if collation != exact {
                        return Err(DbError::Config {
                            url: redact_url(url),
                            message: format!(
                                "the key column {}.{} compares text with the collation {collation}, under \
                                 which keys that differ only in case, accents or trailing spaces can be one \
                                 key and rows are lost; run: {}",
                                t.name,
                                t.key,
                                sql::mysql_exact_key(t, &exact).unwrap_or_default()
                            ),
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// Inserts `rows` into their tables, records `dead`, spools `replay`
    /// for Kafka and advances `checkpoint`, all in one transaction. On
    /// PostgreSQL each table's rows are first copied straight in under a
    /// savepoint (`COPY`, the raw load's speed); when a key is there already
    /// that is rolled back and they go through the idempotent inserts.
    pub async fn write_batch(
        &self,
        rows: &[(&Table, &TableRows)],
        dead: &[DeadLetter],
        replay: &[ToReplay],
        checkpoint: Option<&CheckpointUpdate>,
    ) -> Result<Vec<Written>, DbError> {
        let engine = self.engine();
        let now = now_micros();
        let limit = self.statement_limit();
        with_pool!(self, pool, DB => {
            let mut tx = pool.begin().await.map_err(|e| classify(engine, e))?;
            let mut all = Vec::with_capacity(rows.len());
            // MySQL: duplicates counted for the whole transaction, read
            // after each statement (the difference is that statement's).
            let mut dups_so_far = 0u64;
            if engine == Engine::MySql {
                sqlx::query(&format!("SET @{} = 0", sql::MYSQL_DUPS))
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| classify(engine, e))?;
            }
            for (table, data) in rows {
                let mut written = Written::default();
                // PostgreSQL: one `COPY` of all the table's rows, when none
                // of their keys is stored (the usual batch). Otherwise, and
                // on the other engines, the inserts below, which count
                // duplicates and conflicts.
                if let Some(gate) = self.copy_gate().filter(|g| g.try_now()) {
                    if <DB as CopyIn>::copy_in(&mut tx, table, &data.rows).await? {
                        gate.went_in();
                        written.inserted = data.rows.len() as u64;
                        all.push(written);
                        continue;
                    }
                    gate.refused();
                }
                let mut at = 0;
                for chunk in sql::chunks(engine, table, data, limit) {
                    let start = at;
                    at += chunk.len();
                    let n = chunk.len() as u64;
                    let skipped =
                        insert_counting_skipped!(tx, DB, engine, table, chunk, dups_so_far);
                    written.inserted += n - skipped;
                    if skipped == 0 {
                        continue;
                    }
                    // Some keys were there already: with the same content (a
                    // duplicate) or not (a conflict). Only read when it happens.
                    let keys: Vec<String> = chunk.iter().map(|r| key_of(table, r)).collect();
                    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
                    let projection = sql::key_and_content(engine, table);
                    let found = sql::key_in_list::<DB>(engine, &projection, table, &refs)
                        .build()
                        .fetch_all(&mut *tx)
                        .await
                        .map_err(|e| classify(engine, e))?;
                    let mut stored: HashMap<String, Digest> = HashMap::with_capacity(found.len());
                    digest_rows!(found, table, engine, stored);
                    let mut conflicts = 0;
                    for (i, row) in chunk.iter().enumerate() {
                        let mine = digest::digest(&digest::canon_of_bound(table, row));
                        match stored.get(&keys[i]) {
                            Some(d) if *d != mine => {}
                            _ => continue,
                        }
                        conflicts += 1;
                        let source = data.sources.get(start + i).cloned().unwrap_or_default();
                        let replaced = table.on_conflict == OnConflict::LastWriteWins;
                        if replaced {
                            sql::update_row::<DB>(engine, table, row)
                                .build()
                                .execute(&mut *tx)
                                .await
                                .map_err(|e| classify(engine, e))?;
                            stored.insert(keys[i].clone(), mine);
                        } else if !source.is_empty() {
                            // Kept the first: the refused version is recorded,
                            // once even if it is delivered again.
                            sqlx::query(&sql::dead_letter_insert(engine))
                                .bind(&source)
                                .bind(format!(
                                    "conflict: table {} already holds key {} with other content; \
                                     the stored row was kept (on_conflict = keep-first)",
                                    table.name,
                                    short(&keys[i])
                                ))
                                .bind(value::row_json(table, row))
                                .bind(now)
                                .execute(&mut *tx)
                                .await
                                .map_err(|e| classify(engine, e))?;
                        }
                        written.conflicts.push(Conflict {
                            key: keys[i].clone(),
                            source,
                            replaced,
                        });
                    }
                    written.duplicates += skipped.saturating_sub(conflicts);
                }
                all.push(written);
            }
            for d in dead {
                sqlx::query(&sql::dead_letter_insert(engine))
                    .bind(&d.source)
                    .bind(&d.reason)
                    .bind(&d.payload)
                    .bind(now)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| classify(engine, e))?;
            }
            let spool = replay::insert_sql(engine);
            for r in replay {
                sqlx::query(&spool)
                    .bind(&r.source)
                    .bind(r.account_id as i64)
                    .bind(r.route)
                    .bind(&r.envelope)
                    .bind(now)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| classify(engine, e))?;
            }
            if let Some(c) = checkpoint {
                let affected = match c.from {
                    None => sqlx::query(&sql::checkpoint_insert(engine))
                        .bind(&c.loader)
                        .bind(&c.file)
                        .bind(c.to as i64)
                        .bind(c.lines as i64)
                        .bind(c.done)
                        .bind(now)
                        .execute(&mut *tx)
                        .await,
                    Some(from) => sqlx::query(&sql::checkpoint_advance(engine))
                        .bind(c.to as i64)
                        .bind(c.lines as i64)
                        .bind(c.done)
                        .bind(now)
                        .bind(&c.loader)
                        .bind(&c.file)
                        .bind(from as i64)
                        .execute(&mut *tx)
                        .await,
                };
                match affected {
                    Ok(r) if r.rows_affected() == 1 => {}
                    Ok(_) => return Err(DbError::Conflict(c.file.clone())),
                    Err(sqlx::Error::Database(e))
                        if e.kind() == sqlx::error::ErrorKind::UniqueViolation =>
                    {
                        return Err(DbError::Conflict(c.file.clone()))
                    }
                    Err(e) => return Err(classify(engine, e)),
                }
            }
            tx.commit().await.map_err(|e| classify(engine, e))?;
            Ok(all)
        })
    }

    /// Tries `rows` in a transaction that is always rolled back: Ok if the
    /// database would take them, `Rejected` with its reason if not.
    pub async fn probe(&self, table: &Table, rows: &TableRows) -> Result<(), DbError> {
        let engine = self.engine();
        let limit = self.statement_limit();
        with_pool!(self, pool, DB => {
            let mut tx = pool.begin().await.map_err(|e| classify(engine, e))?;
            for chunk in sql::chunks(engine, table, rows, limit) {
                let mut qb = sql::insert::<DB>(engine, table, chunk);
                qb.build()
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| classify(engine, e))?;
            }
            tx.rollback().await.map_err(|e| classify(engine, e))?;
            Ok(())
        })
    }

    /// The stored checkpoint of an offline file.
    pub async fn checkpoint(
        &self,
        loader: &str,
        file: &str,
    ) -> Result<Option<Checkpoint>, DbError> {
        let engine = self.engine();
        let q = sql::checkpoint_select(engine);
        let row: Option<(i64, i64, bool)> = with_pool!(self, pool, DB => {
            let r = sqlx::query(&q)
                .bind(loader)
                .bind(file)
                .fetch_optional(pool)
                .await
                .map_err(|e| classify(engine, e))?;
            match r {
                None => None,
                Some(r) => Some((
                    r.try_get::<i64, _>(0).map_err(|e| classify(engine, e))?,
                    r.try_get::<i64, _>(1).map_err(|e| classify(engine, e))?,
                    r.try_get::<bool, _>(2).map_err(|e| classify(engine, e))?,
                )),
            }
        });
        Ok(row.map(|(offset, lines, done)| Checkpoint {
            offset: offset.max(0) as u64,
            lines: lines.max(0) as u64,
            done,
        }))
    }

    /// Forgets a file's checkpoint once the file itself is gone.
    pub async fn forget_checkpoint(&self, loader: &str, file: &str) -> Result<(), DbError> {
        let engine = self.engine();
        let q = sql::checkpoint_delete(engine);
        with_pool!(self, pool, DB => {
            sqlx::query(&q)
                .bind(loader)
                .bind(file)
                .execute(pool)
                .await
                .map_err(|e| classify(engine, e))?;
            Ok(())
        })
    }

    /// The count and the sum of the key hashes of the rows whose time column
    /// is in `[from, to)`: one range scan of the (time, key) index, summed
    /// inside PostgreSQL and MySQL (two numbers come back) and streamed from
    /// SQLite, so the comparator learns whether a window's rows changed
    /// without holding, or even receiving, their keys.
    pub async fn key_sum_in_time_range(
        &self,
        table: &Table,
        from: i64,
        to: i64,
    ) -> Result<digest::KeySum, DbError> {
        use futures_util::TryStreamExt;
        let engine = self.engine();
        let key = sql::key_text(engine, table);
        let range = format!(
            "FROM {} WHERE {t} >= {} AND {t} < {}",
            sql::quote(engine, &table.name),
            sql::placeholder(engine, 1),
            sql::placeholder(engine, 2),
            t = sql::quote(engine, &table.time),
        );
        let summed = |count: i64, sum: String| -> Result<digest::KeySum, DbError> {
            let sum: u128 = sum.trim().parse().map_err(|_| {
                DbError::Unavailable(format!("a key-hash sum that is not a number: {sum:?}"))
            })?;
            Ok(digest::KeySum {
                count: count.max(0) as u64,
                sum,
            })
        };
        let aggregate = match engine {
            Engine::Postgres => Some(format!(
                "SELECT COUNT(*), COALESCE(SUM(('x' || substr(md5({key}), 1, 15))::bit(60)::bigint), 0)::text {range}"
            )),
            Engine::MySql => Some(format!(
                "SELECT COUNT(*), CAST(COALESCE(SUM(CAST(CONV(SUBSTRING(MD5({key}), 1, 15), 16, 10) AS UNSIGNED)), 0) AS CHAR) {range}"
            )),
            Engine::Sqlite => None,
        };
        if let Some(text) = aggregate {
            let (count, sum): (i64, String) = with_pool!(self, pool, DB => {
                sqlx::query_as(&text)
                    .bind(from)
                    .bind(to)
                    .fetch_one(pool)
                    .await
                    .map_err(|e| classify(engine, e))?
            });
            return summed(count, sum);
        }
        let text = format!("SELECT {key} {range}");
        let mut sum = digest::KeySum::default();
        with_pool!(self, pool, DB => {
            let mut keys = sqlx::query_scalar::<_, String>(&text)
                .bind(from)
                .bind(to)
                .fetch(pool);
            while let Some(k) = keys.try_next().await.map_err(|e| classify(engine, e))? {
                sum.add(&k);
            }
        });
        Ok(sum)
    }

    /// The content digest of each of `keys` present in `table` (the
    /// comparator's batched lookup on the unique index). Keys are given and
    /// returned in their text form.
    pub async fn digests_of_keys(
        &self,
        table: &Table,
        keys: &[&str],
    ) -> Result<HashMap<String, Digest>, DbError> {
        use crate::schema::ColumnType;
        let engine = self.engine();
        let key_col = table
            .column(&table.key)
            .map(|c| c.ty)
            .unwrap_or(ColumnType::String);
        let q = |s: &str| sql::quote(engine, s);
        let mut found = HashMap::with_capacity(keys.len());
        let chunk = match engine {
            Engine::Postgres => 10_000,
            Engine::MySql | Engine::Sqlite => 5_000,
        };
        for part in keys.chunks(chunk) {
            match self {
                Db::Postgres(pool, _) => {
                    let cast = match key_col {
                        ColumnType::Uuid => "uuid[]",
                        ColumnType::Int => "bigint[]",
                        _ => "text[]",
                    };
                    let text = format!(
                        "SELECT {} FROM {} WHERE {} = ANY($1::{cast})",
                        sql::key_and_content(engine, table),
                        q(&table.name),
                        q(&table.key)
                    );
                    let query = sqlx::query(&text);
                    let query = if key_col == ColumnType::Int {
                        let ints: Vec<i64> = part.iter().filter_map(|k| k.parse().ok()).collect();
                        query.bind(ints)
                    } else {
                        query.bind(part.to_vec())
                    };
                    let rows = query
                        .fetch_all(pool)
                        .await
                        .map_err(|e| classify(engine, e))?;
                    digest_rows!(rows, table, engine, found);
                }
                Db::MySql(pool, _) => {
                    let rows = sql::key_in_list::<sqlx::MySql>(
                        engine,
                        &sql::key_and_content(engine, table),
                        table,
                        part,
                    )
                    .build()
                    .fetch_all(pool)
                    .await
                    .map_err(|e| classify(engine, e))?;
                    digest_rows!(rows, table, engine, found);
                }
                Db::Sqlite(pool) => {
                    let rows = sql::key_in_list::<sqlx::Sqlite>(
                        engine,
                        &sql::key_and_content(engine, table),
                        table,
                        part,
                    )
                    .build()
                    .fetch_all(pool)
                    .await
                    .map_err(|e| classify(engine, e))?;
                    digest_rows!(rows, table, engine, found);
                }
            }
        }
        Ok(found)
    }

    /// The content digest of every row whose time column is in `[from, to)`,
    /// by key: one range scan.
    pub async fn digests_in_time_range(
        &self,
        table: &Table,
        from: i64,
        to: i64,
    ) -> Result<HashMap<String, Digest>, DbError> {
        let engine = self.engine();
        let text = format!(
            "SELECT {} FROM {} WHERE {t} >= {} AND {t} < {}",
            sql::key_and_content(engine, table),
            sql::quote(engine, &table.name),
            sql::placeholder(engine, 1),
            sql::placeholder(engine, 2),
            t = sql::quote(engine, &table.time),
        );
        let mut found = HashMap::new();
        with_pool!(self, pool, DB => {
            let rows = sqlx::query(&text)
                .bind(from)
                .bind(to)
                .fetch_all(pool)
                .await
                .map_err(|e| classify(engine, e))?;
            digest_rows!(rows, table, engine, found);
        });
        Ok(found)
    }

    /// Rows whose time column is in `[from, to)`.
    pub async fn count_time_range(
        &self,
        table: &Table,
        from: i64,
        to: i64,
    ) -> Result<i64, DbError> {
        let engine = self.engine();
        let text = format!(
            "SELECT COUNT(*) FROM {} WHERE {t} >= {} AND {t} < {}",
            sql::quote(engine, &table.name),
            sql::placeholder(engine, 1),
            sql::placeholder(engine, 2),
            t = sql::quote(engine, &table.time),
        );
        with_pool!(self, pool, DB => {
            sqlx::query_scalar::<_, i64>(&text)
                .bind(from)
                .bind(to)
                .fetch_one(pool)
                .await
                .map_err(|e| classify(engine, e))
        })
    }

    /// Rows in a table (tests, progress reports).
    pub async fn count(&self, table: &str) -> Result<i64, DbError> {
        let engine = self.engine();
        let q = format!("SELECT COUNT(*) FROM {}", sql::quote(engine, table));
        with_pool!(self, pool, DB => {
            let r = sqlx::query(&q).fetch_one(pool).await.map_err(|e| classify(engine, e))?;
            r.try_get::<i64, _>(0).map_err(|e| classify(engine, e))
        })
    }

    /// Dead letters recorded in the database: (source, reason), oldest first.
    pub async fn dead_letters(&self) -> Result<Vec<DeadLetter>, DbError> {
        let engine = self.engine();
        let q = format!(
            "SELECT source, reason, payload FROM {} ORDER BY created_at, source",
            sql::quote(engine, DEAD_LETTER_TABLE)
        );
        with_pool!(self, pool, DB => {
            let rows = sqlx::query(&q).fetch_all(pool).await.map_err(|e| classify(engine, e))?;
            rows.iter()
                .map(|r| {
                    Ok(DeadLetter {
                        source: r.try_get::<String, _>(0).map_err(|e| classify(engine, e))?,
                        reason: r.try_get::<String, _>(1).map_err(|e| classify(engine, e))?,
                        payload: r.try_get::<String, _>(2).map_err(|e| classify(engine, e))?,
                    })
                })
                .collect()
        })
    }
}

/// Waits until the database answers and holds every table. False if
/// cancelled first; an error for a missing table (configuration, not outage).
pub async fn wait_ready(
    db: &Db,
    schema: &Schema,
    url: &str,
    shutdown: &tokio_util::sync::CancellationToken,
) -> Result<bool, DbError> {
    let mut backoff = crate::shutdown::Backoff::default();
    loop {
        match db.check_tables(schema, url).await {
            Ok(()) => return Ok(true),
            Err(e) if e.is_transient() => {
                tracing::warn!(db = %redact_url(url), error = %e, "database not reachable yet; waiting");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(false),
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// `url` with `password` put in its user part (percent-encoded). The URL
/// must name a user and hold no password already.
pub fn url_with_password(url: &str, password: &str) -> Result<String, String> {
    let start = url
        .find("://")
        .map(|i| i + 3)
        .ok_or("a password needs a URL with a user: scheme://user@host/…")?;
    let rest = &url[start..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return Err("the database URL names no user to give the password to".into());
    };
    if rest[..at].contains(':') {
        return Err("the database URL already holds a password; give it in one place".into());
    }
    Ok(format!(
        "{}{}:{}{}",
        &url[..start],
        &rest[..at],
        enc(password),
        &rest[at..]
    ))
}

/// Percent-encoding for a URL's user, password or path: everything but the
/// unreserved characters.
fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A URL from separate parts (the seed's `--db-host --db-user …` flags). The
/// user and password are percent-encoded.
pub fn url_from_parts(
    engine: Engine,
    host: &str,
    port: Option<u16>,
    user: Option<&str>,
    password: Option<&str>,
    name: &str,
) -> String {
    if engine == Engine::Sqlite {
        return format!("sqlite:{name}");
    }
    let auth = match (user, password) {
        (Some(u), Some(p)) => format!("{}:{}@", enc(u), enc(p)),
        (Some(u), None) => format!("{}@", enc(u)),
        _ => String::new(),
    };
    let port = port.map(|p| format!(":{p}")).unwrap_or_default();
    format!("{}://{auth}{host}{port}/{}", engine.name(), enc(name))
}

fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// Logs each conflict of a committed batch once, with its key and source
/// (the first 100 of a batch one by one, the rest as a count).
pub fn log_conflicts(table: &str, conflicts: &[Conflict]) {
    const EACH: usize = 100;
    for c in conflicts.iter().take(EACH) {
        tracing::warn!(
            table,
            key = %short(&c.key),
            source = %c.source,
            resolution = if c.replaced { "replaced" } else { "kept" },
            "a row arrived whose key is stored with other content"
        );
    }
    if conflicts.len() > EACH {
        tracing::warn!(
            table,
            more = conflicts.len() - EACH,
            "more conflicting rows in this batch"
        );
    }
}

/// Why one input did not make it into the database: the pipeline dead-letters
/// it and moves on.
pub fn reject_reason(e: &DbError) -> Option<String> {
    match e {
        DbError::Rejected(m) => Some(m.clone()),
        _ => None,
    }
}

/// Finds the rows of `rows` the database rejects, by halving: `probe` is
/// called O(k log n) times for k bad rows. Returns (index, reason) of each bad
/// row; a transient error stops the search and is returned.
pub async fn find_rejected(
    db: &Db,
    table: &Table,
    rows: &TableRows,
) -> Result<Vec<(usize, String)>, DbError> {
    let mut bad = Vec::new();
    let mut stack = vec![(0usize, rows.rows.len())];
    while let Some((lo, hi)) = stack.pop() {
        if lo >= hi {
            continue;
        }
        let part = TableRows {
            rows: rows.rows[lo..hi].to_vec(),
            sources: Vec::new(),
        };
        match db.probe(table, &part).await {
            Ok(()) => {}
            Err(DbError::Rejected(reason)) => {
                if hi - lo == 1 {
                    bad.push((lo, reason));
                } else {
                    let mid = lo + (hi - lo) / 2;
                    stack.push((mid, hi));
                    stack.push((lo, mid));
                }
            }
            Err(e) => return Err(e),
        }
    }
    bad.sort_by_key(|(i, _)| *i);
    Ok(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_copies_in_a_row_double_the_batches_that_skip_it() {
        let g = CopyGate::default();
        assert!(g.try_now(), "a fresh gate tries COPY");
        g.went_in();
        assert!(g.try_now());
        // Refusals in a row: 1, 2, 4 … then at most 64 batches skip it.
        let tries = |g: &CopyGate| (0..200).take_while(|_| !g.try_now()).count();
        for want in [1, 2, 4, 8, 16, 32, 64, 64] {
            g.refused();
            assert_eq!(tries(&g), want);
        }
        // One that goes in: the next refusal skips one batch again.
        g.went_in();
        g.refused();
        assert_eq!(tries(&g), 1);
    }

    #[test]
    fn engines_by_scheme() {
        assert_eq!(Engine::of_url("postgres://h/db"), Some(Engine::Postgres));
        assert_eq!(Engine::of_url("postgresql://h/db"), Some(Engine::Postgres));
        assert_eq!(Engine::of_url("mariadb://root@h/db"), Some(Engine::MySql));
        assert_eq!(Engine::of_url("mysql://root@h/db"), Some(Engine::MySql));
        assert_eq!(Engine::of_url("sqlite:data/x.db"), Some(Engine::Sqlite));
        assert_eq!(Engine::of_url("oracle://h"), None);
    }

    #[test]
    fn passwords_never_show() {
        assert_eq!(
            redact_url("postgres://ingest:s3cret@db:5432/raw"),
            "postgres://ingest:***@db:5432/raw"
        );
        assert_eq!(redact_url("mysql://root@db/raw"), "mysql://root@db/raw");
        assert_eq!(redact_url("sqlite:x.db"), "sqlite:x.db");
        assert_eq!(
            redact_url("postgres://u:p@ss@h/db"),
            "postgres://u:***@h/db"
        );
        // A password holding `/`, and secrets in the query.
        assert_eq!(
            redact_url("postgres://ingest:s3/cr@et@db:5432/raw?sslmode=require"),
            "postgres://ingest:***@db:5432/raw?sslmode=require"
        );
        assert_eq!(
            redact_url("postgres://ingest@db/raw?password=s3cretQ&sslmode=verify-full"),
            "postgres://ingest@db/raw?password=***&sslmode=verify-full"
        );
        assert_eq!(
            redact_url("mysql://u@h/db?ssl-mode=REQUIRED&SSLPassword=k3y"),
            "mysql://u@h/db?ssl-mode=REQUIRED&SSLPassword=***"
        );
        assert_eq!(redact_url("sqlite:x.db?token=abc"), "sqlite:x.db?token=***");
        let hook = "https://hooks.slack.com/services/T000/B000/XXXXsecret";
        assert_eq!(redact_endpoint(hook), "https://hooks.slack.com/…");
        assert!(!redact_endpoint("http://127.0.0.1:9/x/secret").contains("secret"));
    }

    #[test]
    fn urls_from_parts() {
        assert_eq!(
            url_from_parts(
                Engine::Postgres,
                "db",
                Some(5433),
                Some("ingest"),
                Some("p@ss/w"),
                "mox_raw"
            ),
            "postgres://ingest:p%40ss%2Fw@db:5433/mox_raw"
        );
        assert_eq!(
            url_from_parts(Engine::MySql, "127.0.0.1", None, Some("root"), None, "test"),
            "mysql://root@127.0.0.1/test"
        );
    }

    #[test]
    fn a_password_from_a_file_goes_into_the_url_encoded() {
        assert_eq!(
            url_with_password("postgres://ingest@db:5432/raw?sslmode=require", "p@ss/w:rd")
                .unwrap(),
            "postgres://ingest:p%40ss%2Fw%3Ard@db:5432/raw?sslmode=require"
        );
        assert!(url_with_password("postgres://db/raw", "x").is_err());
        assert!(url_with_password("postgres://u:p@db/raw", "x").is_err());
        assert!(url_with_password("sqlite:x.db", "x").is_err());
    }

    #[test]
    fn error_codes_sort_into_access_row_and_outage() {
        use Class::*;
        let pg = |code| class_of(Engine::Postgres, code, 0);
        let my = |code, n| class_of(Engine::MySql, code, n);
        assert_eq!(pg("28P01"), Access);
        assert_eq!(pg("3D000"), Access);
        assert_eq!(pg("42501"), Access);
        assert_eq!(pg("23505"), Rejected);
        assert_eq!(pg("54000"), Rejected);
        assert_eq!(pg("54001"), Unavailable);
        assert_eq!(pg("22003"), Rejected);
        assert_eq!(pg("57P01"), Unavailable);
        assert_eq!(pg("40001"), Unavailable);
        assert_eq!(my("28000", 1045), Access);
        assert_eq!(my("42000", 1049), Access);
        assert_eq!(my("HY000", 3159), Access);
        assert_eq!(my("HY000", 4025), Rejected);
        assert_eq!(my("08S01", 1153), Rejected);
        assert_eq!(my("HY000", 1205), Unavailable);
        assert_eq!(pg("42703"), Schema);
        assert_eq!(pg("42P01"), Schema);
        assert_eq!(my("42S22", 1054), Schema);
        assert_eq!(my("42S02", 1146), Schema);
        assert_eq!(class_of(Engine::Sqlite, "275", 0), Rejected);
        assert_eq!(class_of(Engine::Sqlite, "5", 0), Unavailable);
    }

    #[test]
    fn bad_url_is_a_config_error() {
        assert!(matches!(
            Db::connect("ftp://x", 1),
            Err(DbError::Config { .. })
        ));
    }
}
