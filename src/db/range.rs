//! The SQL of `compare --range`: a checksum of a key segment computed inside
//! the database, the ends of a segment, and a segment's rows streamed out in
//! key order, each with the hash of its content.
//!
//! A row's hash is the first 60 bits of the MD5 of a canonical text of its
//! columns, built by each engine's own SQL so that PostgreSQL and MySQL print
//! the same text for the same value: integers in decimal, strings as their
//! UTF-8 bytes with their byte length before them (so no two rows run into
//! one text), UUIDs lower-case, booleans as `t`/`f`, NULL as `N` (never the
//! empty string). Floats and JSON have no such text (their printed forms and
//! JSON key order differ between engines): a table that has either is hashed
//! here instead, from rows streamed in key order through
//! [`super::digest::digest`], the form the stream comparator uses.

use futures_util::TryStreamExt;
use sqlx::Row;
use tokio::sync::mpsc;

use super::{classify, digest, sql, Db, DbError, Digest, Engine};
use crate::schema::{ColumnType, Table};

/// How a table's key is ordered and split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    Int,
    Uuid,
    /// Byte (code point) order: MySQL's exact key collation, and `COLLATE
    /// "C"` on PostgreSQL.
    Text,
}

impl KeyKind {
    /// The kind of `table`'s key; None for a key type no range can split.
    pub fn of(table: &Table) -> Option<KeyKind> {
        match table.column(&table.key)?.ty {
            ColumnType::Int => Some(KeyKind::Int),
            ColumnType::Uuid => Some(KeyKind::Uuid),
            ColumnType::String => Some(KeyKind::Text),
            ColumnType::Float | ColumnType::Bool | ColumnType::Json => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            KeyKind::Int => "integer",
            KeyKind::Uuid => "uuid",
            KeyKind::Text => "string",
        }
    }
}

/// A key value, ordered as both databases order the key column.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Key {
    Int(i64),
    /// The UUID as a number: its order is the order of its lower-case text.
    Uuid(u128),
    Text(String),
}

impl Key {
    /// A key of `kind` from its text (UUIDs in any case); None if it is not one.
    pub fn parse(kind: KeyKind, s: &str) -> Option<Key> {
        match kind {
            KeyKind::Int => s.trim().parse().ok().map(Key::Int),
            KeyKind::Uuid => parse_uuid(s).map(Key::Uuid),
            KeyKind::Text => Some(Key::Text(s.to_string())),
        }
    }
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Key::Int(i) => write!(f, "{i}"),
            Key::Uuid(u) => {
                let h = format!("{u:032x}");
                write!(
                    f,
                    "{}-{}-{}-{}-{}",
                    &h[..8],
                    &h[8..12],
                    &h[12..16],
                    &h[16..20],
                    &h[20..]
                )
            }
            Key::Text(s) => f.write_str(s),
        }
    }
}

fn parse_uuid(s: &str) -> Option<u128> {
    let b = s.as_bytes();
    if b.len() != 36 || [8, 13, 18, 23].iter().any(|&i| b[i] != b'-') {
        return None;
    }
    let hex: String = s.chars().filter(|c| *c != '-').collect();
    if hex.len() != 32 || !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    u128::from_str_radix(&hex, 16).ok()
}

/// Which rows a statement covers: keys in `[lo, hi)` (None: unbounded) and,
/// when given, the time column in `[from, to)`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    pub lo: Option<Key>,
    pub hi: Option<Key>,
    pub from: Option<i64>,
    pub to: Option<i64>,
}

/// A segment's count of rows and sum of their 60-bit row hashes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Checksum {
    pub count: u64,
    pub sum: u128,
}

/// Whether every column of `table` has a canonical text both engines print
/// alike (integers, strings, UUIDs, booleans).
pub fn hashable_in_sql(table: &Table) -> bool {
    table.columns.iter().all(|c| {
        matches!(
            c.ty,
            ColumnType::Int | ColumnType::String | ColumnType::Uuid | ColumnType::Bool
        )
    })
}

/// The canonical text of a row as `engine` builds it, columns in declaration
/// order; None when a column has no such text or the engine has no MD5.
/// `converted`: MySQL text columns whose character set is not `utf8mb4`,
/// converted first (the others are hashed as they are stored, which is
/// cheaper by half).
pub fn canonical_text(engine: Engine, table: &Table, converted: &[String]) -> Option<String> {
    if !hashable_in_sql(table) || engine == Engine::Sqlite {
        return None;
    }
    let q = |s: &str| sql::quote(engine, s);
    // MySQL: the arguments of one CONCAT (a nullable column's as one
    // COALESCE); PostgreSQL: operands of `||`.
    let mut parts: Vec<String> = Vec::with_capacity(table.columns.len() * 3);
    for col in &table.columns {
        let c = q(&col.name);
        let pieces: Vec<String> = match (engine, col.ty) {
            // Decimal text, ended by a comma (no integer text holds one).
            (Engine::Postgres, ColumnType::Int) => vec![format!("{c}::text"), "','".into()],
            (Engine::MySql, ColumnType::Int) => vec![c.clone(), "','".into()],
            // NULL is matched first: a CASE on NULL would fall to ELSE.
            (Engine::Postgres, ColumnType::Bool) => vec![format!(
                "(CASE WHEN {c} IS NULL THEN 'N' WHEN {c} THEN 't' ELSE 'f' END)"
            )],
            // MySQL's BOOLEAN is a TINYINT: any non-zero value reads as true.
            (Engine::MySql, ColumnType::Bool) => vec![format!(
                "CASE WHEN {c} IS NULL THEN 'N' WHEN {c} <> 0 THEN 't' ELSE 'f' END"
            )],
            // Byte length, a colon, the UTF-8 bytes.
            (Engine::Postgres, ColumnType::String) => {
                vec![format!("octet_length({c})::text"), "':'".into(), c.clone()]
            }
            // A uuid's text is always 36 characters.
            (Engine::Postgres, ColumnType::Uuid) => vec!["'36:'".into(), format!("{c}::text")],
            (Engine::MySql, ColumnType::String | ColumnType::Uuid) => {
                let text = if col.ty == ColumnType::Uuid {
                    format!("LOWER({c})")
                } else {
                    c.clone()
                };
                let text = if converted.contains(&col.name) {
                    format!("CONVERT({text} USING utf8mb4)")
                } else {
                    text
                };
                // Binary strings: no collation to mix, and LENGTH counts bytes.
                vec![
                    format!("LENGTH({text})"),
                    "':'".into(),
                    format!("CAST({text} AS BINARY)"),
                ]
            }
            _ => return None,
        };
        if col.nullable && col.ty != ColumnType::Bool {
            let joined = match engine {
                Engine::Postgres => pieces.join(" || "),
                _ => format!("CONCAT({})", pieces.join(", ")),
            };
            parts.push(format!("COALESCE({joined}, 'N')"));
        } else {
            parts.extend(pieces);
        }
    }
    Some(match engine {
        Engine::Postgres => parts.join(" || "),
        _ => format!("CONCAT({})", parts.join(", ")),
    })
}

/// A row's 60-bit hash as a signed 64-bit integer: the first 15 hex digits
/// of the MD5 of its canonical text (as [`digest::key_hash`] takes them).
pub fn row_hash(engine: Engine, table: &Table, converted: &[String]) -> Option<String> {
    let text = canonical_text(engine, table, converted)?;
    Some(match engine {
        Engine::Postgres => format!("('x' || substr(md5({text}), 1, 15))::bit(60)::bigint"),
        _ => format!("CAST(CONV(SUBSTRING(MD5({text}), 1, 15), 16, 10) AS SIGNED)"),
    })
}

/// A value bound to a statement.
#[derive(Debug, Clone, PartialEq)]
pub enum Param {
    Int(i64),
    Text(String),
}

/// The key column as compared and ordered: byte order for string keys on
/// PostgreSQL, whose database collation is a locale's.
fn key_ordered(engine: Engine, table: &Table, kind: KeyKind) -> String {
    let k = sql::quote(engine, &table.key);
    match (engine, kind) {
        (Engine::Postgres, KeyKind::Text) => format!("{k} COLLATE \"C\""),
        _ => k,
    }
}

/// `FROM t WHERE …` for `filter`, and the values to bind, in order.
pub fn from_where(
    engine: Engine,
    table: &Table,
    kind: KeyKind,
    filter: &Filter,
) -> (String, Vec<Param>) {
    let key = key_ordered(engine, table, kind);
    let time = sql::quote(engine, &table.time);
    let mut conds = Vec::new();
    let mut params = Vec::new();
    let mut bind = |op: &str, col: &str, p: Param, conds: &mut Vec<String>| {
        params.push(p);
        let cast = match (engine, kind, col == key) {
            (Engine::Postgres, KeyKind::Uuid, true) => "::uuid",
            _ => "",
        };
        conds.push(format!(
            "{col} {op} {}{cast}",
            sql::placeholder(engine, params.len())
        ));
    };
    let key_param = |k: &Key| match k {
        Key::Int(i) => Param::Int(*i),
        other => Param::Text(other.to_string()),
    };
    if let Some(lo) = &filter.lo {
        bind(">=", &key, key_param(lo), &mut conds);
    }
    if let Some(hi) = &filter.hi {
        bind("<", &key, key_param(hi), &mut conds);
    }
    if let Some(from) = filter.from {
        bind(">=", &time, Param::Int(from), &mut conds);
    }
    if let Some(to) = filter.to {
        bind("<", &time, Param::Int(to), &mut conds);
    }
    let mut text = format!("FROM {}", sql::quote(engine, &table.name));
    if !conds.is_empty() {
        text.push_str(" WHERE ");
        text.push_str(&conds.join(" AND "));
    }
    (text, params)
}

/// The checksum statement of a segment (count, sum as text) for the row
/// hash expression `hash`.
pub fn checksum_sql(
    engine: Engine,
    table: &Table,
    kind: KeyKind,
    hash: &str,
    filter: &Filter,
) -> (String, Vec<Param>) {
    let (from, params) = from_where(engine, table, kind, filter);
    let text = match engine {
        Engine::Postgres => format!("SELECT COUNT(*), COALESCE(SUM({hash}), 0)::text {from}"),
        _ => format!("SELECT COUNT(*), CAST(COALESCE(SUM({hash}), 0) AS CHAR) {from}"),
    };
    (text, params)
}

/// Rows sent per message of a stream: few enough to keep memory flat,
/// enough to make the channel's cost vanish.
const BATCH: usize = 1024;

/// Collects streamed rows into batches for the channel (the `insert` that
/// `digest_rows!` calls).
struct Batch {
    kind: KeyKind,
    table: String,
    rows: Vec<(Key, u128)>,
    bad: Option<String>,
}

impl Batch {
    fn insert(&mut self, key: String, d: Digest) {
        match Key::parse(self.kind, &key) {
            Some(k) => self.rows.push((k, d)),
            None if self.bad.is_none() => self.bad = Some(key),
            None => {}
        }
    }

    fn check(&mut self) -> Result<(), DbError> {
        match self.bad.take() {
            None => Ok(()),
            Some(k) => Err(DbError::Schema(format!(
                "table {}: the key {:?} is not a {} key",
                self.table,
                super::short(&k),
                self.kind.name()
            ))),
        }
    }
}

macro_rules! bind_all {
    ($q:expr, $params:expr) => {{
        let mut q = $q;
        for p in $params {
            q = match p {
                Param::Int(i) => q.bind(*i),
                Param::Text(s) => q.bind(s.as_str()),
            };
        }
        q
    }};
}

impl Db {
    /// The SQL expression of a row's hash of `table` in this database, or
    /// None when it cannot hash rows alike with the other engines: only
    /// PostgreSQL (in a UTF-8 database, so its text is the bytes MySQL's
    /// `utf8mb4` is) and MySQL hash, and only a table whose columns all have
    /// a canonical SQL text.
    pub async fn range_row_hash(&self, table: &Table) -> Result<Option<String>, DbError> {
        let engine = self.engine();
        if canonical_text(engine, table, &[]).is_none() {
            return Ok(None);
        }
        match self {
            Db::Postgres(pool, _) => {
                let enc: String = sqlx::query_scalar("SHOW server_encoding")
                    .fetch_one(pool)
                    .await
                    .map_err(|e| classify(engine, e))?;
                Ok(enc
                    .eq_ignore_ascii_case("UTF8")
                    .then(|| row_hash(engine, table, &[]))
                    .flatten())
            }
            Db::MySql(pool, _) => {
                let sets: Vec<(String, Option<String>)> = sqlx::query_as(
                    "SELECT CAST(COLUMN_NAME AS CHAR), CAST(CHARACTER_SET_NAME AS CHAR) \
                     FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ?",
                )
                .bind(&table.name)
                .fetch_all(pool)
                .await
                .map_err(|e| classify(engine, e))?;
                let converted: Vec<String> = table
                    .columns
                    .iter()
                    .filter(|c| matches!(c.ty, ColumnType::String | ColumnType::Uuid))
                    .filter(|c| {
                        !sets
                            .iter()
                            .any(|(n, cs)| *n == c.name && cs.as_deref() == Some("utf8mb4"))
                    })
                    .map(|c| c.name.clone())
                    .collect();
                Ok(row_hash(engine, table, &converted))
            }
            Db::Sqlite(_) => Ok(None),
        }
    }

    /// The count and hash sum of the rows `filter` selects, computed inside
    /// the database: one range scan, two numbers back.
    pub async fn range_checksum(
        &self,
        table: &Table,
        kind: KeyKind,
        hash: &str,
        filter: &Filter,
    ) -> Result<Checksum, DbError> {
        let engine = self.engine();
        let (text, params) = checksum_sql(engine, table, kind, hash, filter);
        let (count, sum): (i64, String) = with_pool!(self, pool, DB => {
            bind_all!(sqlx::query_as(&text), &params)
                .fetch_one(pool)
                .await
                .map_err(|e| classify(engine, e))?
        });
        let sum = sum.trim().parse::<u128>().map_err(|_| {
            DbError::Unavailable(format!("a row-hash sum that is not a number: {sum:?}"))
        })?;
        Ok(Checksum {
            count: count.max(0) as u64,
            sum,
        })
    }

    /// The smallest and largest key `filter` selects (two index lookups).
    pub async fn range_ends(
        &self,
        table: &Table,
        kind: KeyKind,
        filter: &Filter,
    ) -> Result<Option<(Key, Key)>, DbError> {
        let engine = self.engine();
        let (from, params) = from_where(engine, table, kind, filter);
        let key = sql::key_text(engine, table);
        let order = key_ordered(engine, table, kind);
        let mut ends = Vec::with_capacity(2);
        for dir in ["ASC", "DESC"] {
            let text = format!("SELECT {key} {from} ORDER BY {order} {dir} LIMIT 1");
            let found: Option<String> = with_pool!(self, pool, DB => {
                bind_all!(sqlx::query_scalar(&text), &params)
                    .fetch_optional(pool)
                    .await
                    .map_err(|e| classify(engine, e))?
            });
            let Some(found) = found else {
                return Ok(None);
            };
            let k = Key::parse(kind, &found).ok_or_else(|| {
                DbError::Schema(format!(
                    "table {}: the key {:?} is not a {} key",
                    table.name,
                    super::short(&found),
                    kind.name()
                ))
            })?;
            ends.push(k);
        }
        let hi = ends.pop();
        let lo = ends.pop();
        Ok(lo.zip(hi))
    }

    /// Streams the rows `filter` selects in key order into `tx`, in batches,
    /// each with its hash: the SQL row hash when `in_sql`, else the content
    /// digest computed here. Stops early, without error, once `tx` is closed.
    pub async fn range_rows(
        &self,
        table: &Table,
        kind: KeyKind,
        filter: &Filter,
        hash: Option<&str>,
        tx: mpsc::Sender<Vec<(Key, u128)>>,
    ) -> Result<(), DbError> {
        let engine = self.engine();
        let (from, params) = from_where(engine, table, kind, filter);
        let order = key_ordered(engine, table, kind);
        let key = sql::key_text(engine, table);
        let in_sql = hash.is_some();
        let projection = match hash {
            Some(h) => format!("{key}, {h}"),
            None => sql::key_and_content(engine, table),
        };
        let text = format!("SELECT {projection} {from} ORDER BY {order}");
        let mut batch = Batch {
            kind,
            table: table.name.clone(),
            rows: Vec::with_capacity(BATCH),
            bad: None,
        };
        with_pool!(self, pool, DB => {
            let mut rows = bind_all!(sqlx::query(&text), &params).fetch(pool);
            let mut chunk = Vec::with_capacity(BATCH);
            loop {
                let next = rows.try_next().await.map_err(|e| classify(engine, e))?;
                let done = next.is_none();
                if let Some(r) = next {
                    chunk.push(r);
                }
                if chunk.len() >= BATCH || (done && !chunk.is_empty()) {
                    if in_sql {
                        for r in &chunk {
                            let k: String = r.try_get(0).map_err(|e| classify(engine, e))?;
                            let h: i64 = r.try_get(1).map_err(|e| classify(engine, e))?;
                            batch.insert(k, h as u64 as u128);
                        }
                    } else {
                        digest_rows!(chunk, table, engine, batch);
                    }
                    chunk.clear();
                    batch.check()?;
                    let full = std::mem::replace(&mut batch.rows, Vec::with_capacity(BATCH));
                    if tx.send(full).await.is_err() {
                        return Ok(());
                    }
                }
                if done {
                    return Ok(());
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(columns: &str) -> Table {
        let cfg: crate::schema::TableConfig = toml::from_str(&format!(
            "name = \"t\"\nkey = \"k\"\ntime = \"ts\"\ngroup = \"ts\"\n[columns]\n{columns}"
        ))
        .unwrap();
        crate::schema::Schema::from_config(&[cfg])
            .unwrap()
            .table("t")
            .unwrap()
            .clone()
    }

    #[test]
    fn uuids_print_and_parse_lower_case() {
        let k = Key::parse(KeyKind::Uuid, "BAD3A155-0000-4000-8000-00000000000F").unwrap();
        assert_eq!(k.to_string(), "bad3a155-0000-4000-8000-00000000000f");
        assert_eq!(Key::parse(KeyKind::Uuid, &k.to_string()), Some(k));
        assert_eq!(
            Key::parse(KeyKind::Uuid, "bad3a155-0000-4000-8000-00000000000"),
            None
        );
        assert_eq!(
            Key::parse(KeyKind::Uuid, "bad3a155+0000-4000-8000-000000000000"),
            None
        );
        assert_eq!(
            Key::parse(KeyKind::Int, "-9223372036854775808"),
            Some(Key::Int(i64::MIN))
        );
        // Numeric order is the order of the lower-case text.
        let a = Key::parse(KeyKind::Uuid, "0fffffff-ffff-ffff-ffff-ffffffffffff").unwrap();
        let b = Key::parse(KeyKind::Uuid, "a0000000-0000-0000-0000-000000000000").unwrap();
        assert!(a < b && a.to_string() < b.to_string());
    }

    #[test]
    fn the_canonical_text_per_engine() {
        let t = table("k = \"uuid\"\nts = \"int\"\ns = \"string?\"\nb = \"bool?\"");
        // Columns in declaration (name) order: b, k, s, ts.
        assert_eq!(
            canonical_text(Engine::Postgres, &t, &[]).unwrap(),
            "(CASE WHEN \"b\" IS NULL THEN 'N' WHEN \"b\" THEN 't' ELSE 'f' END) || \
             '36:' || \"k\"::text || \
             COALESCE(octet_length(\"s\")::text || ':' || \"s\", 'N') || \
             \"ts\"::text || ','"
        );
        assert_eq!(
            canonical_text(Engine::MySql, &t, &[]).unwrap(),
            "CONCAT(CASE WHEN `b` IS NULL THEN 'N' WHEN `b` <> 0 THEN 't' ELSE 'f' END, \
             LENGTH(LOWER(`k`)), ':', CAST(LOWER(`k`) AS BINARY), \
             COALESCE(CONCAT(LENGTH(`s`), ':', CAST(`s` AS BINARY)), 'N'), \
             `ts`, ',')"
        );
        // A column in another character set is converted to UTF-8 first.
        assert!(canonical_text(Engine::MySql, &t, &["s".into()])
            .unwrap()
            .contains("COALESCE(CONCAT(LENGTH(CONVERT(`s` USING utf8mb4)), ':', CAST(CONVERT(`s` USING utf8mb4) AS BINARY)), 'N')"));
        assert!(row_hash(Engine::Postgres, &t, &[])
            .unwrap()
            .starts_with("('x' || substr(md5("));
        assert!(row_hash(Engine::MySql, &t, &[])
            .unwrap()
            .starts_with("CAST(CONV(SUBSTRING(MD5(CONCAT("));
        assert_eq!(canonical_text(Engine::Sqlite, &t, &[]), None);
    }

    #[test]
    fn floats_and_json_are_hashed_in_the_process() {
        for ty in ["float", "json", "float?", "json?"] {
            let t = table(&format!("k = \"uuid\"\nts = \"int\"\nx = \"{ty}\""));
            assert!(!hashable_in_sql(&t), "{ty}");
            assert_eq!(row_hash(Engine::Postgres, &t, &[]), None);
            assert_eq!(row_hash(Engine::MySql, &t, &[]), None);
        }
    }

    #[test]
    fn bounds_are_bound_parameters() {
        let t = table("k = \"uuid\"\nts = \"int\"");
        let k = Key::Uuid(0x8000_0000_0000_0000_0000_0000_0000_0000);
        let f = Filter {
            lo: Some(k.clone()),
            hi: None,
            from: Some(5),
            to: Some(9),
        };
        let (pg, params) = from_where(Engine::Postgres, &t, KeyKind::Uuid, &f);
        assert_eq!(
            pg,
            "FROM \"t\" WHERE \"k\" >= $1::uuid AND \"ts\" >= $2 AND \"ts\" < $3"
        );
        assert_eq!(
            params,
            vec![
                Param::Text("80000000-0000-0000-0000-000000000000".into()),
                Param::Int(5),
                Param::Int(9)
            ]
        );
        let s = table("k = \"string\"\nts = \"int\"");
        let f = Filter {
            lo: None,
            hi: Some(Key::Text("x'; DROP".into())),
            ..Filter::default()
        };
        let (pg, _) = from_where(Engine::Postgres, &s, KeyKind::Text, &f);
        assert_eq!(pg, "FROM \"t\" WHERE \"k\" COLLATE \"C\" < $1");
        let (my, _) = from_where(Engine::MySql, &s, KeyKind::Text, &f);
        assert_eq!(my, "FROM `t` WHERE `k` < ?");
        let (all, p) = from_where(Engine::MySql, &s, KeyKind::Text, &Filter::default());
        assert_eq!((all.as_str(), p.len()), ("FROM `t`", 0));
    }
}
