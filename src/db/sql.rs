//! SQL text per engine. Table and column names come only from the declared
//! schema (validated identifiers), and are quoted anyway.

use sqlx::{Database, Encode, QueryBuilder, Type};

use super::{Bound, Engine, TableRows};
use crate::schema::{Column, ColumnType, Schema, Table};

/// Offline-file checkpoints of the loaders, by loader identity and file
/// name, compared byte for byte. (`switchyard_checkpoint`, keyed by the file
/// name alone in the server's collation, is what versions before it used.)
pub const CHECKPOINT_TABLE: &str = "switchyard_file_checkpoint";
/// Inputs that could not be inserted, with the reason.
pub const DEAD_LETTER_TABLE: &str = "switchyard_dead_letter";

/// Bind parameters per statement: PostgreSQL and MySQL allow 65,535, SQLite 32,766.
fn max_params(engine: Engine) -> usize {
    match engine {
        Engine::Postgres | Engine::MySql => 65_535,
        Engine::Sqlite => 32_766,
    }
}

/// Keeps one statement well under MySQL's default max_allowed_packet (16 MiB).
pub const MAX_STATEMENT_BYTES: usize = 4 << 20;

/// The statement size limit for a MySQL server's `max_allowed_packet`: half
/// of it (the SQL text and the protocol's own framing travel too), never
/// above [`MAX_STATEMENT_BYTES`].
pub fn statement_limit(max_allowed_packet: u64) -> usize {
    usize::try_from(max_allowed_packet / 2)
        .unwrap_or(usize::MAX)
        .clamp(512, MAX_STATEMENT_BYTES)
}

pub fn quote(engine: Engine, ident: &str) -> String {
    match engine {
        Engine::MySql => format!("`{ident}`"),
        Engine::Postgres | Engine::Sqlite => format!("\"{ident}\""),
    }
}

pub fn placeholder(engine: Engine, n: usize) -> String {
    match engine {
        Engine::Postgres => format!("${n}"),
        Engine::MySql | Engine::Sqlite => "?".to_string(),
    }
}

/// MySQL's binary collations without trailing-space padding, best first:
/// MariaDB's, then MySQL 8's. Under the server's default collation
/// (`utf8mb4_general_ci`) a unique key treats `abc`, `ABC` and `ábc` as one
/// value and silently skips the "duplicates"; under `utf8mb4_bin`, which pads,
/// `abc` and `abc ` still collide.
pub const MYSQL_EXACT_COLLATIONS: [&str; 2] = ["utf8mb4_nopad_bin", "utf8mb4_0900_bin"];

const MYSQL_TABLE_OPTIONS: &str = " ENGINE=InnoDB DEFAULT CHARSET=utf8mb4";

/// The statement that gives an existing MySQL key column `collation`.
pub fn mysql_exact_key(table: &Table, collation: &str) -> Option<String> {
    let col = table.column(&table.key)?;
    Some(format!(
        "ALTER TABLE {} MODIFY {} {} CHARACTER SET utf8mb4 COLLATE {collation} NOT NULL",
        quote(Engine::MySql, &table.name),
        quote(Engine::MySql, &col.name),
        column_type(Engine::MySql, col, true)
    ))
}

fn column_type(engine: Engine, col: &Column, is_key: bool) -> &'static str {
    use ColumnType as T;
    match (engine, col.ty) {
        (Engine::Postgres, T::Int) | (Engine::MySql, T::Int) => "BIGINT",
        (Engine::Sqlite, T::Int) => "INTEGER",
        (Engine::Postgres, T::Float) => "DOUBLE PRECISION",
        (Engine::MySql, T::Float) => "DOUBLE",
        (Engine::Sqlite, T::Float) => "REAL",
        (Engine::Postgres, T::String) | (Engine::Sqlite, T::String) => "TEXT",
        // A unique index on MySQL needs a bounded length.
        (Engine::MySql, T::String) if is_key => "VARCHAR(255)",
        (Engine::MySql, T::String) => "LONGTEXT",
        (Engine::Postgres, T::Bool) | (Engine::MySql, T::Bool) => "BOOLEAN",
        (Engine::Sqlite, T::Bool) => "INTEGER",
        (Engine::Postgres, T::Uuid) => "UUID",
        (Engine::MySql, T::Uuid) => "CHAR(36)",
        (Engine::Sqlite, T::Uuid) => "TEXT",
        (Engine::Postgres, T::Json) => "JSONB",
        (Engine::MySql, T::Json) => "JSON",
        (Engine::Sqlite, T::Json) => "TEXT",
    }
}

/// A declared column as the database has it (`information_schema`, or
/// SQLite's `pragma_table_info`): name, type as the engine names it, and
/// whether it may be null or has a default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveColumn {
    pub name: String,
    pub data_type: String,
    pub nullable: bool,
    pub has_default: bool,
}

/// How a live table differs from its declaration, with what to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Drift {
    /// Declared but not in the table: the statement that adds it.
    Missing { column: String, add: String },
    /// In the table with another type than declared.
    Type {
        column: String,
        found: String,
        declared: String,
    },
    /// In the table, not declared, and NOT NULL without a default: every
    /// insert would be refused.
    Required { column: String },
}

impl std::fmt::Display for Drift {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Drift::Missing { column, add } => {
                write!(f, "column {column} is declared but missing; run: {add}")
            }
            Drift::Type {
                column,
                found,
                declared,
            } => write!(
                f,
                "column {column} is {found} in the database but declared {declared}: \
                 change one of them (the data may need converting; not done automatically)"
            ),
            Drift::Required { column } => write!(
                f,
                "column {column} is not declared, but is NOT NULL without a default, so every \
                 insert would be refused: declare it, or give it a default or let it be null"
            ),
        }
    }
}

/// The type names an engine reports for a declared column type.
fn live_type_names(engine: Engine, ty: ColumnType) -> &'static [&'static str] {
    use ColumnType as T;
    match (engine, ty) {
        (Engine::Postgres, T::Int) => &["bigint"],
        (Engine::Postgres, T::Float) => &["double precision"],
        (Engine::Postgres, T::String) => &["text"],
        (Engine::Postgres, T::Bool) => &["boolean"],
        (Engine::Postgres, T::Uuid) => &["uuid"],
        (Engine::Postgres, T::Json) => &["jsonb"],
        (Engine::MySql, T::Int) => &["bigint"],
        (Engine::MySql, T::Float) => &["double"],
        (Engine::MySql, T::String) => &["varchar", "longtext"],
        (Engine::MySql, T::Bool) => &["tinyint"],
        (Engine::MySql, T::Uuid) => &["char"],
        // MariaDB's JSON is LONGTEXT with a JSON_VALID check.
        (Engine::MySql, T::Json) => &["json", "longtext"],
        (Engine::Sqlite, T::Int | T::Bool) => &["integer"],
        (Engine::Sqlite, T::Float) => &["real"],
        (Engine::Sqlite, T::String | T::Uuid | T::Json) => &["text"],
    }
}

/// What differs between `table` as declared and `live` as the database has
/// it: missing columns (with the `ALTER TABLE` that adds each), other types,
/// and undeclared columns that would refuse every insert.
pub fn drift(engine: Engine, table: &Table, live: &[LiveColumn]) -> Vec<Drift> {
    let mut out = Vec::new();
    for col in &table.columns {
        match live.iter().find(|l| l.name == col.name) {
            None => out.push(Drift::Missing {
                column: col.name.clone(),
                // Nullable: the rows already there have no value for it; the
                // router requires it in new rows when it is declared so.
                add: format!(
                    "ALTER TABLE {} ADD COLUMN {} {}",
                    quote(engine, &table.name),
                    quote(engine, &col.name),
                    column_type(engine, col, col.name == table.key)
                ),
            }),
            Some(l) => {
                let found = l.data_type.to_ascii_lowercase();
                if !live_type_names(engine, col.ty).contains(&found.as_str()) {
                    out.push(Drift::Type {
                        column: col.name.clone(),
                        found,
                        declared: column_type(engine, col, col.name == table.key)
                            .to_ascii_lowercase(),
                    });
                }
            }
        }
    }
    for l in live {
        if table.column(&l.name).is_none() && !l.nullable && !l.has_default {
            out.push(Drift::Required {
                column: l.name.clone(),
            });
        }
    }
    out
}

/// An index name within every engine's 63-character limit.
fn index_name(table: &str, column: &str, suffix: &str) -> String {
    let name = format!("{table}_{column}_{suffix}");
    if name.len() <= 60 {
        name
    } else {
        format!("sy_{:08x}_{suffix}", crc32fast::hash(name.as_bytes()))
    }
}

/// The statements that create `t` with its key and time indexes; with
/// `if_absent` they leave an existing table as it is, otherwise they fail
/// on it.
pub fn table_statements(
    engine: Engine,
    t: &Table,
    collation: &str,
    if_absent: bool,
) -> Vec<String> {
    let mut out = Vec::new();
    let options = if engine == Engine::MySql {
        MYSQL_TABLE_OPTIONS
    } else {
        ""
    };
    let if_not_exists = if if_absent { "IF NOT EXISTS " } else { "" };
    let q = |s: &str| quote(engine, s);
    let mut cols: Vec<String> = t
        .columns
        .iter()
        .map(|c| {
            let is_key = c.name == t.key;
            // UUID keys are validated and lower-cased: they cannot differ
            // in case or padding alone, and legacy readers of OLD keep
            // reading them as text.
            let exact = engine == Engine::MySql && is_key && c.ty == ColumnType::String;
            format!(
                "{} {}{}{}",
                q(&c.name),
                column_type(engine, c, is_key),
                if exact {
                    format!(" CHARACTER SET utf8mb4 COLLATE {collation}")
                } else {
                    String::new()
                },
                if c.nullable { "" } else { " NOT NULL" }
            )
        })
        .collect();
    cols.push(format!(
        "CONSTRAINT {} UNIQUE ({})",
        q(&index_name(&t.name, &t.key, "key")),
        q(&t.key)
    ));
    // (time, key): the comparator's range scans read only this index.
    let time_index = index_name(&t.name, &t.time, "idx");
    if engine == Engine::MySql {
        cols.push(format!(
            "KEY {} ({}, {})",
            q(&time_index),
            q(&t.time),
            q(&t.key)
        ));
    }
    out.push(format!(
        "CREATE TABLE {}{} ({}){}",
        if_not_exists,
        q(&t.name),
        cols.join(", "),
        options
    ));
    if engine != Engine::MySql {
        out.push(format!(
            "CREATE INDEX {}{} ON {} ({}, {})",
            if_not_exists,
            q(&time_index),
            q(&t.name),
            q(&t.time),
            q(&t.key)
        ));
    }
    out
}

/// `collation`: the MySQL key columns' collation (one of
/// [`MYSQL_EXACT_COLLATIONS`] the server has); the other engines compare
/// bytes already. Only the key gets it: the driver reads a column with a
/// binary collation as bytes, so every other text column keeps the default.
pub fn init_statements(engine: Engine, schema: &Schema, collation: &str) -> Vec<String> {
    let mut out = Vec::new();
    let options = if engine == Engine::MySql {
        MYSQL_TABLE_OPTIONS
    } else {
        ""
    };
    let q = |s: &str| quote(engine, s);
    for t in schema.tables() {
        out.extend(table_statements(engine, t, collation, true));
    }
    // A topic name (up to 249 bytes) plus partition and offset must fit a key.
    let (bigint, boolean, text, key) = match engine {
        Engine::Postgres => ("BIGINT", "BOOLEAN", "TEXT", "TEXT"),
        Engine::MySql => ("BIGINT", "BOOLEAN", "LONGTEXT", "VARCHAR(512)"),
        Engine::Sqlite => ("INTEGER", "INTEGER", "TEXT", "TEXT"),
    };
    let charset = options;
    // Two hosts' files may share a name, and `A.ndjson` is not `a.ndjson`.
    let (loader, file) = match engine {
        Engine::MySql => (
            format!("VARCHAR(128) CHARACTER SET utf8mb4 COLLATE {collation}"),
            format!("VARCHAR(512) CHARACTER SET utf8mb4 COLLATE {collation}"),
        ),
        Engine::Postgres | Engine::Sqlite => ("TEXT".to_string(), "TEXT".to_string()),
    };
    out.push(format!(
        "CREATE TABLE IF NOT EXISTS {} (loader {loader} NOT NULL, file {file} NOT NULL, \
         byte_offset {bigint} NOT NULL, line_count {bigint} NOT NULL, done {boolean} NOT NULL, \
         updated_at {bigint} NOT NULL, PRIMARY KEY (loader, file)){charset}",
        q(CHECKPOINT_TABLE)
    ));
    out.push(format!(
        "CREATE TABLE IF NOT EXISTS {} (source {key} NOT NULL PRIMARY KEY, reason {text} NOT NULL, \
         payload {text} NOT NULL, created_at {bigint} NOT NULL){charset}",
        q(DEAD_LETTER_TABLE)
    ));
    out.push(super::replay::create_sql(engine, options));
    out.push(super::keyset::create_sql(engine, collation, options));
    out.extend(super::partials::create_sql(engine, collation, options));
    out
}

/// Bytes one bound value takes in a statement: its data plus a fixed
/// allowance for its type, length prefix and placeholder.
fn value_bytes(v: &Bound) -> usize {
    8 + match v {
        Bound::Text(Some(s)) => s.len(),
        _ => 8,
    }
}

/// Bytes a row takes in a statement.
pub fn row_bytes(row: &[Bound]) -> usize {
    row.iter().map(value_bytes).sum()
}

/// Slices of `rows` that each fit one statement: under the engine's
/// parameter limit and, counting every row's own size (not an average, so
/// clustered big rows cannot add up past the server's packet limit), under
/// the statement size limit. A row alone above the limit goes on its own.
pub fn chunks<'a>(
    engine: Engine,
    table: &Table,
    rows: &'a TableRows,
    max_bytes: usize,
) -> impl Iterator<Item = &'a [Vec<Bound>]> {
    let by_params = (max_params(engine) / table.columns.len().max(1)).max(1);
    let all = &rows.rows[..];
    let mut start = 0;
    std::iter::from_fn(move || {
        if start >= all.len() {
            return None;
        }
        let mut end = start;
        let mut bytes = 0;
        while end < all.len() && end - start < by_params {
            let b = row_bytes(&all[end]);
            if end > start && bytes + b > max_bytes {
                break;
            }
            bytes += b;
            end += 1;
        }
        let chunk = &all[start..end];
        start = end;
        Some(chunk)
    })
}

/// The MySQL session variable that counts the duplicates of one insert.
pub const MYSQL_DUPS: &str = "sy_dups";

/// The PostgreSQL cast a bound text parameter needs for a column of `ty`.
fn pg_cast(ty: ColumnType) -> Option<&'static str> {
    match ty {
        ColumnType::Uuid => Some("::uuid"),
        ColumnType::Json => Some("::jsonb"),
        _ => None,
    }
}

/// `UPDATE t SET every column = … WHERE key = …`: one row replaced by its
/// newer version (`on_conflict = "last-write-wins"`).
pub fn update_row<'a, DB>(engine: Engine, table: &Table, row: &'a [Bound]) -> QueryBuilder<'a, DB>
where
    DB: Database,
    Option<i64>: Encode<'a, DB> + Type<DB>,
    Option<f64>: Encode<'a, DB> + Type<DB>,
    Option<&'a str>: Encode<'a, DB> + Type<DB>,
    Option<bool>: Encode<'a, DB> + Type<DB>,
{
    let q = |s: &str| quote(engine, s);
    let mut qb = QueryBuilder::new(format!("UPDATE {} SET ", q(&table.name)));
    let cast = |col: &Column| match engine {
        Engine::Postgres => pg_cast(col.ty),
        _ => None,
    };
    let mut key = None;
    let mut first = true;
    for (col, v) in table.columns.iter().zip(row) {
        if col.name == table.key {
            key = Some((col, v));
            continue;
        }
        if !first {
            qb.push(", ");
        }
        first = false;
        qb.push(format!("{} = ", q(&col.name)));
        push_bound(&mut qb, v, cast(col));
    }
    if let Some((col, v)) = key {
        qb.push(format!(" WHERE {} = ", q(&col.name)));
        push_bound(&mut qb, v, cast(col));
    }
    qb
}

/// Binds one value, followed by its PostgreSQL cast when it needs one.
fn push_bound<'a, DB>(qb: &mut QueryBuilder<'a, DB>, v: &'a Bound, cast: Option<&str>)
where
    DB: Database,
    Option<i64>: Encode<'a, DB> + Type<DB>,
    Option<f64>: Encode<'a, DB> + Type<DB>,
    Option<&'a str>: Encode<'a, DB> + Type<DB>,
    Option<bool>: Encode<'a, DB> + Type<DB>,
{
    match v {
        Bound::Int(x) => qb.push_bind(*x),
        Bound::Float(x) => qb.push_bind(*x),
        Bound::Text(x) => qb.push_bind(x.as_deref()),
        Bound::Bool(x) => qb.push_bind(*x),
    };
    if let Some(c) = cast {
        qb.push(c);
    }
}

/// `INSERT … VALUES (…), (…)` that skips rows whose key is already present.
pub fn insert<'a, DB>(engine: Engine, table: &Table, rows: &'a [Vec<Bound>]) -> QueryBuilder<'a, DB>
where
    DB: Database,
    Option<i64>: Encode<'a, DB> + Type<DB>,
    Option<f64>: Encode<'a, DB> + Type<DB>,
    Option<&'a str>: Encode<'a, DB> + Type<DB>,
    Option<bool>: Encode<'a, DB> + Type<DB>,
{
    let q = |s: &str| quote(engine, s);
    let columns: Vec<String> = table.columns.iter().map(|c| q(&c.name)).collect();
    let mut qb = QueryBuilder::new(format!(
        "INSERT INTO {} ({}) ",
        q(&table.name),
        columns.join(", ")
    ));
    let casts: Vec<Option<&'static str>> = table
        .columns
        .iter()
        .map(|c| match engine {
            Engine::Postgres => pg_cast(c.ty),
            _ => None,
        })
        .collect();
    qb.push_values(rows, |mut b, row| {
        for (v, cast) in row.iter().zip(&casts) {
            match v {
                Bound::Int(x) => b.push_bind(*x),
                Bound::Float(x) => b.push_bind(*x),
                Bound::Text(x) => b.push_bind(x.as_deref()),
                Bound::Bool(x) => b.push_bind(*x),
            };
            if let Some(c) = cast {
                b.push_unseparated(c);
            }
        }
    });
    match engine {
        // The server reports a duplicate as an affected row (the driver asks
        // for found rows), so each one is counted in a session variable
        // instead: `SET @sy_dups = 0` before, `SELECT @sy_dups` after.
        Engine::MySql => qb.push(format!(
            " ON DUPLICATE KEY UPDATE {k} = IF((@{MYSQL_DUPS} := @{MYSQL_DUPS} + 1) > 0, {k}, {k})",
            k = q(&table.key)
        )),
        Engine::Postgres | Engine::Sqlite => {
            qb.push(format!(" ON CONFLICT ({}) DO NOTHING", q(&table.key)))
        }
    };
    qb
}

/// The key column as text, the same form the comparator keeps keys in.
pub fn key_text(engine: Engine, table: &Table) -> String {
    let key = quote(engine, &table.key);
    match engine {
        Engine::Postgres => format!("{key}::text"),
        Engine::MySql => format!("CAST({key} AS CHAR)"),
        Engine::Sqlite => format!("CAST({key} AS TEXT)"),
    }
}

/// The key as text, then every column in declaration order, each in a form
/// the driver decodes for its type (UUID and JSON as text).
pub fn key_and_content(engine: Engine, table: &Table) -> String {
    use crate::schema::ColumnType as T;
    let mut out = key_text(engine, table);
    for col in &table.columns {
        let c = quote(engine, &col.name);
        out.push_str(", ");
        out.push_str(&match (engine, col.ty) {
            (Engine::Postgres, T::Uuid | T::Json) => format!("{c}::text"),
            // The key's binary collation makes the driver see bytes.
            (Engine::MySql, T::Json | T::String | T::Uuid) => format!("CAST({c} AS CHAR)"),
            _ => c,
        });
    }
    out
}

/// `SELECT <projection> FROM t WHERE key IN (…)`, keys bound as text (cast
/// to the key's type on PostgreSQL).
pub fn key_in_list<'a, DB>(
    engine: Engine,
    projection: &str,
    table: &Table,
    keys: &'a [&'a str],
) -> QueryBuilder<'a, DB>
where
    DB: Database,
    &'a str: Encode<'a, DB> + Type<DB>,
{
    let mut qb = QueryBuilder::new(format!(
        "SELECT {} FROM {} WHERE {} IN (",
        projection,
        quote(engine, &table.name),
        quote(engine, &table.key)
    ));
    let cast = match engine {
        Engine::Postgres => match table.column(&table.key).map(|c| c.ty) {
            Some(ColumnType::Uuid) => "::uuid",
            Some(ColumnType::Int) => "::bigint",
            _ => "",
        },
        _ => "",
    };
    let mut sep = qb.separated(", ");
    for k in keys {
        sep.push_bind(*k);
        sep.push_unseparated(cast);
    }
    qb.push(")");
    qb
}

pub fn dead_letter_insert(engine: Engine) -> String {
    let p = |n| placeholder(engine, n);
    let head = format!(
        "INTO {} (source, reason, payload, created_at) VALUES ({}, {}, {}, {})",
        quote(engine, DEAD_LETTER_TABLE),
        p(1),
        p(2),
        p(3),
        p(4)
    );
    // A redelivered poison message is recorded once.
    match engine {
        Engine::MySql => format!("INSERT IGNORE {head}"),
        Engine::Postgres | Engine::Sqlite => {
            format!("INSERT {head} ON CONFLICT (source) DO NOTHING")
        }
    }
}

pub fn checkpoint_insert(engine: Engine) -> String {
    let p = |n| placeholder(engine, n);
    format!(
        "INSERT INTO {} (loader, file, byte_offset, line_count, done, updated_at) \
         VALUES ({}, {}, {}, {}, {}, {})",
        quote(engine, CHECKPOINT_TABLE),
        p(1),
        p(2),
        p(3),
        p(4),
        p(5),
        p(6)
    )
}

/// Advances only from the offset this loader read: a second loader on the same
/// file finds zero rows updated and backs off.
pub fn checkpoint_advance(engine: Engine) -> String {
    let p = |n| placeholder(engine, n);
    format!(
        "UPDATE {} SET byte_offset = {}, line_count = {}, done = {}, updated_at = {} \
         WHERE loader = {} AND file = {} AND byte_offset = {} AND done = {}",
        quote(engine, CHECKPOINT_TABLE),
        p(1),
        p(2),
        p(3),
        p(4),
        p(5),
        p(6),
        p(7),
        if engine == Engine::Postgres {
            "false"
        } else {
            "0"
        }
    )
}

pub fn checkpoint_select(engine: Engine) -> String {
    format!(
        "SELECT byte_offset, line_count, done FROM {} WHERE loader = {} AND file = {}",
        quote(engine, CHECKPOINT_TABLE),
        placeholder(engine, 1),
        placeholder(engine, 2)
    )
}

pub fn checkpoint_delete(engine: Engine) -> String {
    format!(
        "DELETE FROM {} WHERE loader = {} AND file = {}",
        quote(engine, CHECKPOINT_TABLE),
        placeholder(engine, 1),
        placeholder(engine, 2)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PipelineConfig;

    #[test]
    fn ddl_per_engine() {
        let schema = PipelineConfig::load(None).unwrap().schema().unwrap();
        let pg = init_statements(Engine::Postgres, &schema, "").join(";\n");
        assert!(pg.contains("\"uuid\" UUID NOT NULL"), "{pg}");
        assert!(
            pg.contains("CONSTRAINT \"raw_item_uuid_key\" UNIQUE (\"uuid\")"),
            "{pg}"
        );
        assert!(
            pg.contains("CREATE INDEX IF NOT EXISTS \"raw_item_timestamp_idx\""),
            "{pg}"
        );
        let my = init_statements(Engine::MySql, &schema, "utf8mb4_nopad_bin").join(";\n");
        assert!(my.contains("`body` LONGTEXT NOT NULL"), "{my}");
        assert!(
            my.contains("KEY `raw_item_timestamp_idx` (`timestamp`, `uuid`)"),
            "{my}"
        );
        let lite = init_statements(Engine::Sqlite, &schema, "").join(";\n");
        assert!(lite.contains("\"project_id\" INTEGER NOT NULL"), "{lite}");
    }

    #[test]
    fn drift_names_what_to_run() {
        let schema = PipelineConfig::load(None).unwrap().schema().unwrap();
        let t = &schema.tables()[0];
        let live = |skip: &str, retype: Option<(&str, &str)>| -> Vec<LiveColumn> {
            t.columns
                .iter()
                .filter(|c| c.name != skip)
                .map(|c| LiveColumn {
                    name: c.name.clone(),
                    data_type: match retype {
                        Some((name, ty)) if name == c.name => ty.to_string(),
                        _ => live_type_names(Engine::Postgres, c.ty)[0].to_string(),
                    },
                    nullable: c.nullable,
                    has_default: false,
                })
                .collect()
        };
        assert!(drift(Engine::Postgres, t, &live("", None)).is_empty());
        assert_eq!(
            drift(Engine::Postgres, t, &live("billable", None)),
            vec![Drift::Missing {
                column: "billable".into(),
                add: "ALTER TABLE \"raw_item\" ADD COLUMN \"billable\" BIGINT".into()
            }]
        );
        assert_eq!(
            drift(Engine::Postgres, t, &live("", Some(("version", "integer")))),
            vec![Drift::Type {
                column: "version".into(),
                found: "integer".into(),
                declared: "bigint".into()
            }]
        );
        let mut extra = live("", None);
        extra.push(LiveColumn {
            name: "legacy_note".into(),
            data_type: "text".into(),
            nullable: true,
            has_default: false,
        });
        assert!(
            drift(Engine::Postgres, t, &extra).is_empty(),
            "a nullable extra column is fine"
        );
        extra[t.columns.len()].nullable = false;
        assert_eq!(
            drift(Engine::Postgres, t, &extra),
            vec![Drift::Required {
                column: "legacy_note".into()
            }]
        );
    }

    #[test]
    fn long_names_get_short_indexes() {
        let long = "t".repeat(64);
        assert!(index_name(&long, "c", "idx").len() <= 63);
        assert_eq!(index_name("a", "b", "key"), "a_b_key");
    }

    #[test]
    fn statements_fit_the_limits() {
        let schema = PipelineConfig::load(None).unwrap().schema().unwrap();
        let t = &schema.tables()[0];
        let mut row = vec![Bound::Int(Some(1)); t.columns.len()];
        row[0] = Bound::Text(Some("x".repeat(2_500)));
        let rows = TableRows {
            rows: vec![row; 20_000],
            sources: Vec::new(),
        };
        let sizes: Vec<usize> = chunks(Engine::Sqlite, t, &rows, MAX_STATEMENT_BYTES)
            .map(|c| c.len())
            .collect();
        assert!(sizes
            .iter()
            .all(|&n| n * t.columns.len() <= 32_766 && n * 2_500 <= MAX_STATEMENT_BYTES));
        assert!(sizes.len() > 1);
        assert_eq!(sizes.iter().sum::<usize>(), 20_000);
    }

    /// Statements are sized by the rows in them: 70 rows of 250 KB followed
    /// by small ones never make a statement above the limit, whatever the
    /// batch's average.
    #[test]
    fn clustered_big_rows_stay_under_the_statement_limit() {
        let schema = PipelineConfig::load(None).unwrap().schema().unwrap();
        let t = &schema.tables()[0];
        let row = |text: usize| {
            let mut r = vec![Bound::Int(Some(1)); t.columns.len()];
            r[0] = Bound::Text(Some("x".repeat(text)));
            r
        };
        let mut all: Vec<Vec<Bound>> = (0..70).map(|_| row(250_000)).collect();
        all.extend((0..1_930).map(|_| row(10)));
        let rows = TableRows {
            rows: all,
            sources: Vec::new(),
        };
        let mut total = 0;
        for c in chunks(Engine::MySql, t, &rows, MAX_STATEMENT_BYTES) {
            let size: usize = c.iter().map(|r| row_bytes(r)).sum();
            assert!(size <= MAX_STATEMENT_BYTES, "a statement of {size} bytes");
            total += c.len();
        }
        assert_eq!(total, 2_000);
        // One row above the limit still goes, alone.
        let huge = TableRows {
            rows: vec![row(10), row(MAX_STATEMENT_BYTES + 1), row(10)],
            sources: Vec::new(),
        };
        let sizes: Vec<usize> = chunks(Engine::MySql, t, &huge, MAX_STATEMENT_BYTES)
            .map(|c| c.len())
            .collect();
        assert_eq!(sizes, vec![1, 1, 1]);
    }

    #[test]
    fn statement_limit_follows_the_servers_packet_limit() {
        assert_eq!(statement_limit(16 << 20), MAX_STATEMENT_BYTES);
        assert_eq!(statement_limit(64 << 10), 32 << 10);
        assert_eq!(statement_limit(1_024), 512);
        assert_eq!(statement_limit(u64::MAX), MAX_STATEMENT_BYTES);
    }
}
