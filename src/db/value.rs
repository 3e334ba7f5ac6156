//! JSON row values converted to what the drivers bind, column by column in
//! declaration order. The router has already checked rows against the schema;
//! this is the second gate, for files and messages that did not come through it.

use serde_json::{Map, Value};

use crate::schema::{ColumnType, Table};

/// One value ready to bind. A null carries its column's type so PostgreSQL
/// sees a typed parameter.
#[derive(Debug, Clone, PartialEq)]
pub enum Bound {
    Int(Option<i64>),
    Float(Option<f64>),
    Text(Option<String>),
    Bool(Option<bool>),
}

/// Why a row cannot be bound.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ValueError {
    #[error("column {0}: missing and not nullable")]
    Missing(String),
    #[error("column {column}: expected {expected}")]
    Type {
        column: String,
        expected: &'static str,
    },
    #[error("column {0}: integer out of range for a signed 64-bit column")]
    OutOfRange(String),
    #[error("column {0}: not declared in table {1}")]
    Unknown(String, String),
}

/// The row's values in the table's column order.
pub fn row_values(table: &Table, row: &Map<String, Value>) -> Result<Vec<Bound>, ValueError> {
    if let Some(extra) = row.keys().find(|k| table.column(k).is_none()) {
        return Err(ValueError::Unknown(extra.clone(), table.name.clone()));
    }
    let mut out = Vec::with_capacity(table.columns.len());
    for col in &table.columns {
        let v = row.get(&col.name).filter(|v| !v.is_null());
        let Some(v) = v else {
            if !col.nullable {
                return Err(ValueError::Missing(col.name.clone()));
            }
            out.push(match col.ty {
                ColumnType::Int => Bound::Int(None),
                ColumnType::Float => Bound::Float(None),
                ColumnType::Bool => Bound::Bool(None),
                ColumnType::String | ColumnType::Uuid | ColumnType::Json => Bound::Text(None),
            });
            continue;
        };
        let wrong = |expected| ValueError::Type {
            column: col.name.clone(),
            expected,
        };
        out.push(match col.ty {
            ColumnType::Int => match v.as_i64() {
                Some(i) => Bound::Int(Some(i)),
                None if v.as_u64().is_some() => {
                    return Err(ValueError::OutOfRange(col.name.clone()))
                }
                None => return Err(wrong("an integer")),
            },
            ColumnType::Float => Bound::Float(Some(v.as_f64().ok_or_else(|| wrong("a number"))?)),
            ColumnType::String => Bound::Text(Some(
                v.as_str().ok_or_else(|| wrong("a string"))?.to_string(),
            )),
            ColumnType::Bool => Bound::Bool(Some(v.as_bool().ok_or_else(|| wrong("a boolean"))?)),
            // One spelling in every engine, so keys compare equal across them.
            ColumnType::Uuid => Bound::Text(Some(
                v.as_str()
                    .filter(|s| s.len() == 36)
                    .ok_or_else(|| wrong("a uuid"))?
                    .to_ascii_lowercase(),
            )),
            ColumnType::Json => Bound::Text(Some(v.to_string())),
        });
    }
    Ok(out)
}

/// [`row_values`] with JSON columns taken from the text of `line` (an
/// envelope or an offline line whose `row` is `row`): their numbers stay
/// exactly as sent, whatever their precision.
pub fn row_values_exact(
    table: &Table,
    row: &Map<String, Value>,
    line: &[u8],
) -> Result<Vec<Bound>, ValueError> {
    let mut out = row_values(table, row)?;
    if !table.columns.iter().any(|c| c.ty == ColumnType::Json) {
        return Ok(out);
    }
    let Some(members) = crate::rawjson::row_members(line) else {
        return Ok(out);
    };
    for (col, v) in table.columns.iter().zip(out.iter_mut()) {
        if col.ty != ColumnType::Json {
            continue;
        }
        if let (Bound::Text(Some(text)), Some(raw)) = (v, members.get(&col.name)) {
            *text = crate::rawjson::minify(raw.get());
        }
    }
    Ok(out)
}

/// A bound row as a JSON object, columns in declaration order (JSON
/// columns as the text they hold): what a dead letter records of it.
pub fn row_json(table: &Table, row: &[Bound]) -> String {
    let mut out = String::from("{");
    for (i, (col, v)) in table.columns.iter().zip(row).enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&Value::String(col.name.clone()).to_string());
        out.push(':');
        match v {
            Bound::Int(Some(x)) => out.push_str(&x.to_string()),
            Bound::Float(Some(x)) => out.push_str(&Value::from(*x).to_string()),
            Bound::Bool(Some(x)) => out.push_str(if *x { "true" } else { "false" }),
            Bound::Text(Some(t)) if col.ty == ColumnType::Json => out.push_str(t),
            Bound::Text(Some(t)) => out.push_str(&Value::String(t.clone()).to_string()),
            Bound::Int(None) | Bound::Float(None) | Bound::Bool(None) | Bound::Text(None) => {
                out.push_str("null")
            }
        }
    }
    out.push('}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::{Schema, TableConfig};
    use serde_json::json;

    fn table() -> Table {
        let cfg: TableConfig = toml::from_str(
            r#"
            name = "t"
            key = "id"
            time = "ts"
            group = "g"
            [columns]
            id = "uuid"
            ts = "int"
            g = "int"
            score = "float?"
            ok = "bool?"
            extra = "json?"
            "#,
        )
        .unwrap();
        Schema::from_config(&[cfg]).unwrap().tables()[0].clone()
    }

    fn row(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn values_follow_column_order_and_types() {
        let t = table();
        let names: Vec<&str> = t.columns.iter().map(|c| c.name.as_str()).collect();
        let v = row_values(
            &t,
            &row(
                json!({"id": "AAAAAAAA-0000-0000-0000-000000000001", "ts": 5, "g": -1,
                        "extra": {"a": [1, 2]}, "ok": null}),
            ),
        )
        .unwrap();
        let by_name: std::collections::HashMap<_, _> = names.into_iter().zip(v).collect();
        assert_eq!(
            by_name["id"],
            Bound::Text(Some("aaaaaaaa-0000-0000-0000-000000000001".into()))
        );
        assert_eq!(by_name["ts"], Bound::Int(Some(5)));
        assert_eq!(by_name["g"], Bound::Int(Some(-1)));
        assert_eq!(by_name["score"], Bound::Float(None));
        assert_eq!(by_name["ok"], Bound::Bool(None));
        assert_eq!(by_name["extra"], Bound::Text(Some(r#"{"a":[1,2]}"#.into())));
    }

    #[test]
    fn names_what_cannot_be_bound() {
        let t = table();
        let id = "aaaaaaaa-0000-0000-0000-000000000001";
        assert_eq!(
            row_values(&t, &row(json!({"id": id, "g": 1}))),
            Err(ValueError::Missing("ts".into()))
        );
        assert_eq!(
            row_values(&t, &row(json!({"id": id, "ts": u64::MAX, "g": 1}))),
            Err(ValueError::OutOfRange("ts".into()))
        );
        assert_eq!(
            row_values(&t, &row(json!({"id": id, "ts": "x", "g": 1}))),
            Err(ValueError::Type {
                column: "ts".into(),
                expected: "an integer"
            })
        );
        assert_eq!(
            row_values(&t, &row(json!({"id": id, "ts": 1, "g": 1, "zz": 1}))),
            Err(ValueError::Unknown("zz".into(), "t".into()))
        );
    }
}
