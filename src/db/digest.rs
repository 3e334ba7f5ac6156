//! Row digests: what the stream announced and what each database holds,
//! reduced to 128 bits each from one canonical form, so that rows compare by
//! content and not only by key.
//!
//! The canonical form is the table's columns in declaration order, each a
//! type tag and its value: integers as 64-bit integers, floats by their
//! 64-bit value (`-0` as `0`), booleans as one byte, strings as their UTF-8
//! bytes, UUIDs lower-case, JSON with object keys sorted and numbers by their
//! 64-bit float value (so `1.0` and `1`, or `-1.3e16` and
//! `-13000000000000000`, agree: `jsonb` and MySQL's JSON print either; two
//! integers beyond 2^53 that round to one double are not told apart).
//! Whitespace and key
//! order inside JSON are what the engines legitimately change; nothing else is
//! normalised, so a truncated, re-encoded or converted value differs.

use serde_json::{Map, Value};
use xxhash_rust::xxh3::Xxh3;

use crate::schema::{ColumnType, Table};

/// One column's value in canonical form.
#[derive(Debug, Clone, PartialEq)]
pub enum Canon {
    Null,
    Int(i64),
    Float(f64),
    Bool(bool),
    Text(String),
}

/// The digest of one row.
pub type Digest = u128;

/// Digests a row given column by column, in the table's order.
pub fn digest(values: &[Canon]) -> Digest {
    let mut h = Xxh3::new();
    for v in values {
        match v {
            Canon::Null => h.update(&[0]),
            Canon::Int(i) => {
                h.update(&[1]);
                h.update(&i.to_le_bytes());
            }
            Canon::Float(f) => {
                h.update(&[2]);
                let f = if *f == 0.0 { 0.0 } else { *f };
                h.update(&f.to_bits().to_le_bytes());
            }
            Canon::Bool(b) => h.update(&[3, u8::from(*b)]),
            Canon::Text(s) => {
                h.update(&[4]);
                h.update(&(s.len() as u64).to_le_bytes());
                h.update(s.as_bytes());
            }
        }
    }
    h.digest128()
}

/// A key's hash: the first 60 bits of the MD5 of its text, the same number
/// PostgreSQL (`('x' || substr(md5(k), 1, 15))::bit(60)::bigint`) and MySQL
/// (`CONV(SUBSTRING(MD5(k), 1, 15), 16, 10)`) compute, so a range's sum is
/// summed inside the database and only two numbers cross the wire. 60 bits
/// make a change that keeps both the count and the sum a 2^-60 chance; the
/// sum of 2^68 of them still fits a `u128` exactly.
pub fn key_hash(key: &str) -> u128 {
    use md5::{Digest as _, Md5};
    let d = Md5::digest(key.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&d[..8]);
    u128::from(u64::from_be_bytes(first) >> 4)
}

/// A set of keys reduced to their count and the sum of their hashes:
/// order-independent, and two sums subtract, so a window knows
/// whether what a database holds for it changed by exactly the rows it
/// expected, without keeping the keys.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeySum {
    pub count: u64,
    pub sum: u128,
}

impl KeySum {
    pub fn of<'a>(keys: impl IntoIterator<Item = &'a str>) -> KeySum {
        let mut s = KeySum::default();
        for k in keys {
            s.add(k);
        }
        s
    }

    pub fn add(&mut self, key: &str) {
        self.count = self.count.wrapping_add(1);
        self.sum = self.sum.wrapping_add(key_hash(key));
    }

    pub fn remove(&mut self, key: &str) {
        self.count = self.count.wrapping_sub(1);
        self.sum = self.sum.wrapping_sub(key_hash(key));
    }
}

/// A JSON value in canonical text: keys sorted, numbers by value.
pub fn canonical_json(v: &Value) -> String {
    fn write(v: &Value, out: &mut String) {
        match v {
            Value::Number(n) => {
                // Integers a double holds exactly stay integers; every other
                // number is its 64-bit float value, shortest form. So `1.0`
                // and `1` agree, and `-1.44e18` and `-1440000000000000000`
                // (what jsonb prints for it) agree.
                const EXACT: f64 = 9_007_199_254_740_992.0; // 2^53
                let f = n.as_f64().unwrap_or(f64::NAN);
                if f.fract() == 0.0 && f.abs() <= EXACT {
                    out.push_str(&(f as i64).to_string());
                } else {
                    out.push_str(&Value::from(f).to_string());
                }
            }
            Value::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write(item, out);
                }
                out.push(']');
            }
            Value::Object(map) => {
                let mut keys: Vec<&String> = map.keys().collect();
                keys.sort();
                out.push('{');
                for (i, k) in keys.into_iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&Value::String(k.clone()).to_string());
                    out.push(':');
                    write(&map[k], out);
                }
                out.push('}');
            }
            other => out.push_str(&other.to_string()),
        }
    }
    let mut out = String::new();
    write(v, &mut out);
    out
}

/// A row of the stream in canonical form; None when a value does not have
/// its column's type (the consumers dead-letter such a row).
pub fn canon_of_json(table: &Table, row: &Map<String, Value>) -> Option<Vec<Canon>> {
    table
        .columns
        .iter()
        .map(|col| {
            let v = match row.get(&col.name) {
                None | Some(Value::Null) => return Some(Canon::Null),
                Some(v) => v,
            };
            Some(match col.ty {
                ColumnType::Int => Canon::Int(v.as_i64()?),
                ColumnType::Float => Canon::Float(v.as_f64()?),
                ColumnType::Bool => Canon::Bool(v.as_bool()?),
                ColumnType::String => Canon::Text(v.as_str()?.to_string()),
                ColumnType::Uuid => Canon::Text(v.as_str()?.to_ascii_lowercase()),
                ColumnType::Json => Canon::Text(canonical_json(v)),
            })
        })
        .collect()
}

/// A row as the consumers bind it, in canonical form: what the database
/// will hold once it is written, to compare with what it holds already.
pub fn canon_of_bound(table: &Table, row: &[super::Bound]) -> Vec<Canon> {
    use super::Bound as B;
    table
        .columns
        .iter()
        .zip(row)
        .map(|(col, v)| match v {
            B::Int(Some(i)) => Canon::Int(*i),
            B::Float(Some(f)) => Canon::Float(*f),
            B::Bool(Some(b)) => Canon::Bool(*b),
            B::Text(Some(t)) if col.ty == ColumnType::Json => canon_of_json_text(t),
            B::Text(Some(t)) => Canon::Text(t.clone()),
            B::Int(None) | B::Float(None) | B::Bool(None) | B::Text(None) => Canon::Null,
        })
        .collect()
}

/// A JSON column as a database returned it (text), in canonical form; text
/// that is not JSON is kept as it is, and so differs.
pub fn canon_of_json_text(text: &str) -> Canon {
    match serde_json::from_str::<Value>(text) {
        Ok(v) => Canon::Text(canonical_json(&v)),
        Err(_) => Canon::Text(format!("not json: {text}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn table() -> Table {
        let cfg: crate::schema::TableConfig = toml::from_str(
            r#"
            name = "t"
            key = "k"
            time = "ts"
            group = "g"
            [columns]
            k = "uuid"
            ts = "int"
            g = "int"
            f = "float?"
            b = "bool?"
            s = "string?"
            j = "json?"
            "#,
        )
        .unwrap();
        let schema = crate::schema::Schema::from_config(&[cfg]).unwrap();
        schema.table("t").unwrap().clone()
    }

    fn row(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    fn d(v: Value) -> Digest {
        digest(&canon_of_json(&table(), &row(v)).unwrap())
    }

    const K: &str = "BAD3A155-0000-4000-8000-000000000001";

    #[test]
    fn a_key_hash_is_the_databases_md5_prefix() {
        // md5("abc") = 900150983cd24fb0d6963f7d28e17f72; its first 15 hex
        // digits, 900150983cd24fb, as a number.
        assert_eq!(key_hash("abc"), 0x900150983cd24fb);
        let mut s = KeySum::of(["a", "b"]);
        s.remove("a");
        assert_eq!(s, KeySum::of(["b"]));
    }

    #[test]
    fn the_same_row_in_any_spelling_has_one_digest() {
        let a = d(
            json!({"k": K, "ts": 1, "g": 2, "f": 0.5, "b": true, "s": "é", "j": {"b": [1.0, 2], "a": null}}),
        );
        let b = d(
            json!({"g": 2, "ts": 1, "k": K.to_lowercase(), "f": 0.5, "b": true, "s": "é", "j": {"a": null, "b": [1, 2.0]}}),
        );
        assert_eq!(a, b, "column order, key case, JSON key order and 1.0 vs 1");
        // Absent and null are the same stored value.
        assert_eq!(
            d(json!({"k": K, "ts": 1, "g": 2})),
            d(json!({"k": K, "ts": 1, "g": 2, "f": null, "s": null}))
        );
        assert_eq!(
            d(json!({"k": K, "ts": 1, "g": 2, "f": -0.0})),
            d(json!({"k": K, "ts": 1, "g": 2, "f": 0.0}))
        );
    }

    #[test]
    fn any_changed_value_changes_the_digest() {
        let base =
            json!({"k": K, "ts": 1, "g": 2, "f": 0.5, "b": true, "s": "abc", "j": {"x": "y"}});
        let d0 = d(base.clone());
        for (col, v) in [
            ("ts", json!(2)),
            ("g", json!(3)),
            ("f", json!(0.50000001)),
            ("b", json!(false)),
            ("s", json!("abd")),
            ("s", json!("ab")),
            ("s", json!("abc ")),
            ("s", json!("ABC")),
            ("j", json!({"x": "Y"})),
            ("j", json!({"x": "y", "z": 1})),
            ("f", Value::Null),
        ] {
            let mut changed = base.clone();
            changed[col] = v.clone();
            assert_ne!(d(changed), d0, "{col} = {v}");
        }
        // A string and a JSON column with the same text are different values.
        assert_ne!(digest(&[Canon::Text("1".into())]), digest(&[Canon::Int(1)]));
        // Boundaries between text values count.
        assert_ne!(
            digest(&[Canon::Text("ab".into()), Canon::Text("c".into())]),
            digest(&[Canon::Text("a".into()), Canon::Text("bc".into())])
        );
    }

    #[test]
    fn json_as_the_engines_print_it_matches_what_was_sent() {
        let sent = json!({"b": [1, 2.5, {"d": true, "c": "x"}], "a": 12345678901234u64, "e": -1.357624582551067e16, "f": -1.4399638062441423e18});
        let want = Canon::Text(canonical_json(&sent));
        // PostgreSQL jsonb and MySQL JSON reorder keys and space them out.
        for stored in [
            r#"{"a": 12345678901234, "b": [1, 2.5, {"c": "x", "d": true}], "e": -13576245825510670, "f": -1439963806244142300}"#,
            r#"{"f":-1.4399638062441423e18,"e":-1.357624582551067e16,"b":[1.0,2.5,{"d":true,"c":"x"}],"a":12345678901234}"#,
        ] {
            assert_eq!(canon_of_json_text(stored), want, "{stored}");
        }
        assert_ne!(canon_of_json_text(r#"{"a": 1}"#), want);
        assert_ne!(canon_of_json_text("{not json"), want);
    }

    #[test]
    fn a_value_of_the_wrong_type_has_no_digest() {
        assert!(canon_of_json(&table(), &row(json!({"k": K, "ts": "1", "g": 2}))).is_none());
    }

    /// The consumers' bound form of a row digests as the stream's JSON form
    /// does, so a stored row and an arriving one compare by content.
    #[test]
    fn a_bound_row_digests_as_its_json() {
        let t = table();
        let r = row(
            json!({"k": K.to_ascii_uppercase(), "ts": 7, "g": -2, "f": 0.5, "b": true,
            "s": "x", "j": {"z": 1, "a": [1.0, "y"]}}),
        );
        let bound = super::super::row_values(&t, &r).unwrap();
        assert_eq!(canon_of_bound(&t, &bound), canon_of_json(&t, &r).unwrap());
        let other = row(json!({"k": K, "ts": 7, "g": -2, "s": "x "}));
        let bound = super::super::row_values(&t, &other).unwrap();
        assert_ne!(
            digest(&canon_of_bound(&t, &bound)),
            digest(&canon_of_json(&t, &r).unwrap())
        );
    }
}
