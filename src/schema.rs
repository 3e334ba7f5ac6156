//! The declared schema: which tables exist, their columns and types, the unique
//! key, the time and grouping columns. Everything the router accepts is checked
//! against it, and it is the only place table and column names come from when
//! SQL is written.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;
use serde_json::{Map, Value};

/// A column's declared type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnType {
    /// A JSON integer in the signed 64-bit range (every engine's BIGINT).
    Int,
    /// Any JSON number.
    Float,
    /// A JSON string.
    String,
    /// `true` or `false`.
    Bool,
    /// A string in the canonical 8-4-4-4-12 hexadecimal form.
    Uuid,
    /// Any JSON value but `null` (which is the column's absence, as for
    /// every type), stored as JSON text.
    Json,
}

impl ColumnType {
    fn parse(s: &str) -> Option<ColumnType> {
        Some(match s {
            "int" => ColumnType::Int,
            "float" => ColumnType::Float,
            "string" => ColumnType::String,
            "bool" => ColumnType::Bool,
            "uuid" => ColumnType::Uuid,
            "json" => ColumnType::Json,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            ColumnType::Int => "int",
            ColumnType::Float => "float",
            ColumnType::String => "string",
            ColumnType::Bool => "bool",
            ColumnType::Uuid => "uuid",
            ColumnType::Json => "json",
        }
    }

    fn accepts(self, v: &Value) -> bool {
        match self {
            ColumnType::Int => v.as_i64().is_some() || v.as_u64().is_some(),
            ColumnType::Float => v.is_number(),
            ColumnType::String => v.is_string(),
            ColumnType::Bool => v.is_boolean(),
            ColumnType::Uuid => v.as_str().is_some_and(is_uuid),
            // A null is no value: the consumers bind it as SQL NULL, which
            // a column that is not nullable refuses.
            ColumnType::Json => !v.is_null(),
        }
    }
}

impl fmt::Display for ColumnType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The longest string key, in characters: MySQL/MariaDB index a
/// `VARCHAR(255)` key and PostgreSQL's B-tree takes at most about 2,700
/// bytes, so 255 characters of up to 4 UTF-8 bytes each fit every engine.
pub const MAX_STRING_KEY_CHARS: usize = 255;

/// What makes a value of the right JSON type unstorable in some engine, so
/// the router refuses it rather than accept a row a database will not take.
/// The rules are the intersection of PostgreSQL, MySQL/MariaDB and SQLite.
fn value_problem(ty: ColumnType, v: &Value, is_key: bool) -> Option<String> {
    match ty {
        ColumnType::Int if v.as_i64().is_none() => Some(format!(
            "is outside the signed 64-bit range ({} to {})",
            i64::MIN,
            i64::MAX
        )),
        // A UUID is hexadecimal and dashes: nothing to check beyond its form.
        ColumnType::String => {
            let s = v.as_str()?;
            if s.contains('\0') {
                return Some(NUL_PROBLEM.into());
            }
            let chars = s.chars().count();
            (is_key && chars > MAX_STRING_KEY_CHARS).then(|| {
                format!("is {chars} characters long; a key may have at most {MAX_STRING_KEY_CHARS}")
            })
        }
        ColumnType::Json => has_nul(v).then(|| NUL_PROBLEM.into()),
        _ => None,
    }
}

const NUL_PROBLEM: &str = "contains a NUL character (U+0000), which PostgreSQL cannot store";

/// True if any string or object key inside `v` holds a NUL character.
fn has_nul(v: &Value) -> bool {
    match v {
        Value::String(s) => s.contains('\0'),
        Value::Array(a) => a.iter().any(has_nul),
        Value::Object(o) => o.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
        _ => false,
    }
}

fn is_uuid(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// One declared column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    pub ty: ColumnType,
    /// May be absent or null.
    pub nullable: bool,
}

/// One declared table.
#[derive(Debug, Clone)]
pub struct Table {
    pub name: String,
    /// Columns in declaration order.
    pub columns: Vec<Column>,
    /// The unique key column (idempotent inserts, parity lookups).
    pub key: String,
    /// The time column (parity windows).
    pub time: String,
    /// The grouping column (parity breakdowns).
    pub group: String,
    /// Largest accepted row, as compact JSON bytes.
    pub max_row_bytes: usize,
    /// What the consumers do with a row whose key is stored with other content.
    pub on_conflict: OnConflict,
}

/// What both pipelines do when a row arrives whose key is already stored
/// with other content (a fallback replayed late, a client that reuses keys).
/// Either way the conflict is counted and logged with its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnConflict {
    /// The stored row stays; the refused one is recorded in the dead-letter
    /// table (`reason` says conflict), so nothing sent is lost.
    #[default]
    KeepFirst,
    /// The arriving row replaces the stored one, in the same transaction
    /// (arrival order at the consumer, which a replay can reverse).
    LastWriteWins,
}

impl Table {
    pub fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|c| c.name == name)
    }
}

/// The table declarations as written in the TOML configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableConfig {
    /// Table name; letters, digits and `_`, starting with a letter or `_`.
    pub name: String,
    /// The unique key column.
    pub key: String,
    /// The time column (integer seconds since the epoch).
    pub time: String,
    /// The grouping column (for example a project id).
    pub group: String,
    /// Largest accepted row in bytes of compact JSON.
    #[serde(default = "default_max_row_bytes")]
    pub max_row_bytes: usize,
    /// `keep-first` (default) or `last-write-wins`: see [`OnConflict`].
    #[serde(default)]
    pub on_conflict: OnConflict,
    /// Column name → type: `int`, `float`, `string`, `bool`, `uuid`, `json`;
    /// a trailing `?` makes the column nullable (it may be absent or null).
    pub columns: BTreeMap<String, String>,
}

fn default_max_row_bytes() -> usize {
    256 * 1024
}

/// An error in the declared schema itself (configuration, not input).
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SchemaError {
    #[error("table {0:?}: not a valid SQL identifier (letters, digits, '_', not starting with a digit, at most 64)")]
    BadTableName(String),
    #[error("table {table}: column {column:?} is not a valid SQL identifier")]
    BadColumnName { table: String, column: String },
    #[error("table {table}: column {column}: unknown type {ty:?} (int, float, string, bool, uuid, json; '?' suffix for nullable)")]
    BadType {
        table: String,
        column: String,
        ty: String,
    },
    #[error("table {table}: the {role} column {column:?} is not declared")]
    MissingRoleColumn {
        table: String,
        role: &'static str,
        column: String,
    },
    #[error("table {table}: the key column {column:?} cannot be nullable")]
    NullableKey { table: String, column: String },
    #[error("table {0:?} is declared twice")]
    Duplicate(String),
    #[error("no table is declared")]
    Empty,
}

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && s.len() <= 64
}

/// The validated schema.
#[derive(Debug, Clone)]
pub struct Schema {
    tables: Vec<Table>,
}

impl Schema {
    pub fn from_config(tables: &[TableConfig]) -> Result<Schema, SchemaError> {
        if tables.is_empty() {
            return Err(SchemaError::Empty);
        }
        let mut out: Vec<Table> = Vec::with_capacity(tables.len());
        for t in tables {
            if !is_identifier(&t.name) {
                return Err(SchemaError::BadTableName(t.name.clone()));
            }
            if out.iter().any(|o| o.name == t.name) {
                return Err(SchemaError::Duplicate(t.name.clone()));
            }
            let mut columns = Vec::with_capacity(t.columns.len());
            for (name, ty) in &t.columns {
                if !is_identifier(name) {
                    return Err(SchemaError::BadColumnName {
                        table: t.name.clone(),
                        column: name.clone(),
                    });
                }
                let (base, nullable) = match ty.strip_suffix('?') {
                    Some(b) => (b, true),
                    None => (ty.as_str(), false),
                };
                let parsed = ColumnType::parse(base).ok_or_else(|| SchemaError::BadType {
                    table: t.name.clone(),
                    column: name.clone(),
                    ty: ty.clone(),
                })?;
                columns.push(Column {
                    name: name.clone(),
                    ty: parsed,
                    nullable,
                });
            }
            let table = Table {
                name: t.name.clone(),
                columns,
                key: t.key.clone(),
                time: t.time.clone(),
                group: t.group.clone(),
                max_row_bytes: t.max_row_bytes,
                on_conflict: t.on_conflict,
            };
            for (role, col) in [("key", &t.key), ("time", &t.time), ("group", &t.group)] {
                if table.column(col).is_none() {
                    return Err(SchemaError::MissingRoleColumn {
                        table: t.name.clone(),
                        role,
                        column: col.clone(),
                    });
                }
            }
            if table.column(&t.key).is_some_and(|c| c.nullable) {
                return Err(SchemaError::NullableKey {
                    table: t.name.clone(),
                    column: t.key.clone(),
                });
            }
            out.push(table);
        }
        Ok(Schema { tables: out })
    }

    pub fn table(&self, name: &str) -> Option<&Table> {
        self.tables.iter().find(|t| t.name == name)
    }

    pub fn tables(&self) -> &[Table] {
        &self.tables
    }

    /// Checks one row against its table. Returns the table on success.
    pub fn check_row<'a>(
        &'a self,
        table: &str,
        row: &Map<String, Value>,
    ) -> Result<&'a Table, RowError> {
        // The error names the table sent, never the declared ones: the
        // schema is not the client's to enumerate.
        let t = self.table(table).ok_or_else(|| RowError::UnknownTable {
            table: quote(table),
        })?;
        for name in row.keys() {
            if t.column(name).is_none() {
                return Err(RowError::UnknownColumn {
                    table: t.name.clone(),
                    column: quote(name),
                });
            }
        }
        for c in &t.columns {
            match row.get(&c.name) {
                None | Some(Value::Null) if c.name == t.key => {
                    return Err(RowError::MissingKey {
                        table: t.name.clone(),
                        column: c.name.clone(),
                    })
                }
                None | Some(Value::Null) if c.nullable => {}
                None => {
                    return Err(RowError::MissingColumn {
                        table: t.name.clone(),
                        column: c.name.clone(),
                    })
                }
                Some(v) => {
                    if !(c.ty.accepts(v) || (v.is_null() && c.nullable)) {
                        return Err(RowError::WrongType {
                            table: t.name.clone(),
                            column: c.name.clone(),
                            expected: c.ty,
                            found: describe(v),
                        });
                    }
                    if c.name == t.key && v.as_str().is_some_and(str::is_empty) {
                        return Err(RowError::MissingKey {
                            table: t.name.clone(),
                            column: c.name.clone(),
                        });
                    }
                    if let Some(problem) = value_problem(c.ty, v, c.name == t.key) {
                        return Err(RowError::InvalidValue {
                            table: t.name.clone(),
                            column: c.name.clone(),
                            problem,
                        });
                    }
                }
            }
        }
        Ok(t)
    }
}

/// Characters of a refused value an error message quotes.
pub const QUOTED_CHARS: usize = 40;

/// `text` as an error message quotes it: in double quotes, escaped, at most
/// [`QUOTED_CHARS`] characters of it (then `…`), so that what a client
/// sends is never echoed at length.
pub fn quote(text: &str) -> String {
    let mut chars = text.chars();
    let head: String = chars.by_ref().take(QUOTED_CHARS).collect();
    let more = if chars.next().is_some() { "…" } else { "" };
    format!("{head:?}{more}")
}

fn describe(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_f64() => "a fractional number",
        Value::Number(_) => "an integer",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Why a row does not fit the declared schema. The text is shown to clients.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RowError {
    /// `table` and `column` are quoted already ([`quote`]).
    #[error("unknown table {table}")]
    UnknownTable { table: String },
    #[error("table {table}: unknown column {column}")]
    UnknownColumn { table: String, column: String },
    #[error("table {table}: missing column {column:?}")]
    MissingColumn { table: String, column: String },
    #[error("table {table}: missing unique key {column:?}")]
    MissingKey { table: String, column: String },
    #[error("table {table}: column {column:?} {problem}")]
    InvalidValue {
        table: String,
        column: String,
        problem: String,
    },
    #[error("table {table}: column {column:?} must be {expected}, found {found}")]
    WrongType {
        table: String,
        column: String,
        expected: ColumnType,
        found: &'static str,
    },
}

impl RowError {
    /// A stable machine-readable code for the error.
    pub fn code(&self) -> &'static str {
        match self {
            RowError::UnknownTable { .. } => "unknown_table",
            RowError::UnknownColumn { .. } => "unknown_column",
            RowError::MissingColumn { .. } => "missing_column",
            RowError::MissingKey { .. } => "missing_key",
            RowError::WrongType { .. } => "wrong_type",
            RowError::InvalidValue { .. } => "invalid_value",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Schema {
        let cfg: TableConfig = toml::from_str(
            r#"
            name = "raw_item"
            key = "uuid"
            time = "timestamp"
            group = "project_id"
            [columns]
            project_id = "int"
            timestamp = "int"
            body = "string?"
            uuid = "uuid"
            "#,
        )
        .unwrap();
        Schema::from_config(&[cfg]).unwrap()
    }

    fn row(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn accepts_a_good_row_and_a_missing_nullable() {
        let s = schema();
        let r = row(
            json!({"project_id":1,"timestamp":2,"body":"x","uuid":"bad3a155-585f-47cb-bc3e-51767d52c2a2"}),
        );
        assert!(s.check_row("raw_item", &r).is_ok());
        let r = row(
            json!({"project_id":1,"timestamp":2,"uuid":"bad3a155-585f-47cb-bc3e-51767d52c2a2"}),
        );
        assert!(s.check_row("raw_item", &r).is_ok());
    }

    #[test]
    fn refuses_values_some_engine_cannot_store() {
        let s = schema();
        let u = "bad3a155-585f-47cb-bc3e-51767d52c2a2";
        let e = s
            .check_row(
                "raw_item",
                &row(json!({"project_id": 9223372036854775808u64, "timestamp": 2, "uuid": u})),
            )
            .unwrap_err();
        assert_eq!(e.code(), "invalid_value");
        assert!(e.to_string().contains("\"project_id\""), "{e}");
        assert!(e.to_string().contains("64-bit"), "{e}");
        let ok = row(json!({"project_id": i64::MIN, "timestamp": i64::MAX, "uuid": u}));
        assert!(s.check_row("raw_item", &ok).is_ok());
        let e = s
            .check_row(
                "raw_item",
                &row(json!({"project_id": 1, "timestamp": 2, "body": "a\0b", "uuid": u})),
            )
            .unwrap_err();
        assert_eq!(e.code(), "invalid_value");
        assert!(
            e.to_string().contains("\"body\"") && e.to_string().contains("NUL"),
            "{e}"
        );
    }

    #[test]
    fn json_with_nul_anywhere_and_long_string_keys_are_refused() {
        let cfg: TableConfig = toml::from_str(
            r#"
            name = "doc"
            key = "id"
            time = "t"
            group = "t"
            [columns]
            id = "string"
            t = "int"
            data = "json?"
            "#,
        )
        .unwrap();
        let s = Schema::from_config(&[cfg]).unwrap();
        for data in [json!({"a": ["x", "\0"]}), json!({"k\0": 1}), json!("\0")] {
            let e = s
                .check_row("doc", &row(json!({"id": "a", "t": 1, "data": data})))
                .unwrap_err();
            assert_eq!(e.code(), "invalid_value", "{data}");
        }
        let e = s
            .check_row("doc", &row(json!({"id": "a", "t": 1, "data": null})))
            .map(|t| t.name.clone());
        assert_eq!(e, Ok("doc".into()), "a nullable json column takes null");
        let strict: TableConfig = toml::from_str(
            "name = \"d\"\nkey = \"id\"\ntime = \"id\"\ngroup = \"id\"\n[columns]\nid = \"int\"\ndata = \"json\"\n",
        )
        .unwrap();
        let s2 = Schema::from_config(&[strict]).unwrap();
        let e = s2
            .check_row("d", &row(json!({"id": 1, "data": null})))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "table d: column \"data\" must be json, found null"
        );
        let longest = "😀".repeat(MAX_STRING_KEY_CHARS);
        assert!(s
            .check_row("doc", &row(json!({"id": longest, "t": 1})))
            .is_ok());
        let e = s
            .check_row("doc", &row(json!({"id": format!("{longest}x"), "t": 1})))
            .unwrap_err();
        assert_eq!(e.code(), "invalid_value");
        assert!(e.to_string().contains("256 characters"), "{e}");
    }

    #[test]
    fn names_what_is_wrong() {
        let s = schema();
        let e = s.check_row("nope", &Map::new()).unwrap_err();
        assert_eq!(e.code(), "unknown_table");
        let e = s
            .check_row(
                "raw_item",
                &row(json!({"project_id":"1","timestamp":2,"uuid":"bad3a155-585f-47cb-bc3e-51767d52c2a2"})),
            )
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "table raw_item: column \"project_id\" must be int, found a string"
        );
        let e = s
            .check_row("raw_item", &row(json!({"project_id":1,"timestamp":2})))
            .unwrap_err();
        assert_eq!(e.code(), "missing_key");
        let e = s
            .check_row(
                "raw_item",
                &row(json!({"project_id":1,"timestamp":2,"uuid":"not-a-uuid"})),
            )
            .unwrap_err();
        assert_eq!(e.code(), "wrong_type");
    }

    #[test]
    fn rejects_bad_declarations() {
        let mut cfg: TableConfig = toml::from_str(
            r#"
            name = "raw item"
            key = "k"
            time = "k"
            group = "k"
            [columns]
            k = "int"
            "#,
        )
        .unwrap();
        assert!(matches!(
            Schema::from_config(&[cfg.clone()]),
            Err(SchemaError::BadTableName(_))
        ));
        cfg.name = "t".into();
        cfg.columns.insert("x".into(), "integer".into());
        assert!(matches!(
            Schema::from_config(&[cfg.clone()]),
            Err(SchemaError::BadType { .. })
        ));
        cfg.columns.remove("x");
        cfg.key = "missing".into();
        assert!(matches!(
            Schema::from_config(&[cfg]),
            Err(SchemaError::MissingRoleColumn { .. })
        ));
    }
}
