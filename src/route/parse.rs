//! Request bodies → validated payloads. Pure: no I/O, so every rejection rule
//! is unit-tested here. A body with any bad line is rejected whole.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

use super::error::ApiError;
use crate::schema::{quote, Schema, QUOTED_CHARS};

/// Room on a line beyond its row's limit: the envelope and whitespace.
pub const LINE_SLACK: usize = 64 * 1024;

/// The longest line (or JSON body) worth parsing: the largest row any table
/// takes plus [`LINE_SLACK`]. Longer is refused before parsing, which is
/// what multiplies memory.
pub fn max_line_bytes(schema: &Schema) -> usize {
    schema
        .tables()
        .iter()
        .map(|t| t.max_row_bytes)
        .max()
        .unwrap_or(0)
        .saturating_add(LINE_SLACK)
}

/// One validated payload, serialised once for both sinks.
#[derive(Debug, Clone)]
pub struct Payload {
    pub account_id: u64,
    pub table: String,
    /// The row as compact JSON.
    pub row_json: Vec<u8>,
    /// `{"account_id":…,"table":…,"row":…}`: the Kafka message value.
    pub envelope_json: Vec<u8>,
}

/// How the body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// One JSON envelope.
    Json,
    /// One envelope per line.
    Ndjson,
}

impl Framing {
    /// From a Content-Type header value (parameters such as charset ignored).
    pub fn from_content_type(ct: &str) -> Option<Framing> {
        let mime = ct
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        match mime.as_str() {
            "application/json" => Some(Framing::Json),
            "application/x-ndjson"
            | "application/ndjson"
            | "application/jsonl"
            | "application/x-jsonlines"
            | "application/jsonlines" => Some(Framing::Ndjson),
            _ => None,
        }
    }
}

const ENVELOPE_FIELDS: &str = "account_id, table, row";

/// Parses and validates a whole body, no line longer than `max_line`.
pub fn parse_body(
    schema: &Schema,
    body: &[u8],
    framing: Framing,
    max_line: usize,
) -> Result<Vec<Payload>, ApiError> {
    let parse_line = |schema: &Schema, line: &[u8], n: usize| {
        if line.len() > max_line {
            return Err(ApiError::input(
                413,
                "row_too_large",
                Some(n),
                format!("the line is {} bytes, more than {max_line} (the largest row any table takes, plus {LINE_SLACK})", line.len()),
            ));
        }
        parse_line(schema, line, n)
    };
    let mut out = Vec::new();
    match framing {
        Framing::Json => {
            let trimmed = body.trim_ascii();
            if trimmed.is_empty() {
                return Err(ApiError::input(
                    400,
                    "empty_body",
                    None,
                    "the body holds no payload",
                ));
            }
            out.push(parse_line(schema, trimmed, 1)?);
        }
        Framing::Ndjson => {
            for (i, raw) in body.split(|b| *b == b'\n').enumerate() {
                let line = raw.strip_suffix(b"\r").unwrap_or(raw);
                if line.trim_ascii().is_empty() {
                    continue;
                }
                out.push(parse_line(schema, line, i + 1)?);
            }
            if out.is_empty() {
                return Err(ApiError::input(
                    400,
                    "empty_body",
                    None,
                    "the body holds no payload",
                ));
            }
        }
    }
    Ok(out)
}

fn parse_line(schema: &Schema, line: &[u8], n: usize) -> Result<Payload, ApiError> {
    let bad =
        |status: u16, code: &'static str, msg: String| ApiError::input(status, code, Some(n), msg);
    if let Err(e) = std::str::from_utf8(line) {
        return Err(bad(
            400,
            "invalid_utf8",
            format!("invalid UTF-8 at byte {}", e.valid_up_to()),
        ));
    }
    let value = match serde_json::from_slice::<Strict>(line) {
        Ok(Strict(v)) => v,
        Err(e) if e.to_string().starts_with(DUPLICATE) => {
            return Err(bad(400, "duplicate_key", e.to_string()))
        }
        Err(e) => return Err(bad(400, "invalid_json", format!("invalid JSON: {e}"))),
    };
    let Value::Object(mut obj) = value else {
        return Err(bad(
            400,
            "not_an_object",
            format!("expected a JSON object with {ENVELOPE_FIELDS}; send batches as NDJSON (application/x-ndjson)"),
        ));
    };
    if let Some(extra) = obj
        .keys()
        .find(|k| !matches!(k.as_str(), "account_id" | "table" | "row"))
    {
        return Err(bad(
            400,
            "unknown_field",
            format!(
                "unknown envelope field {} (expected {ENVELOPE_FIELDS})",
                quote(extra)
            ),
        ));
    }
    let account_id = match obj.get("account_id") {
        None | Some(Value::Null) => {
            return Err(bad(400, "missing_account_id", "missing account_id".into()))
        }
        Some(v) => v.as_u64().ok_or_else(|| {
            bad(
                400,
                "invalid_account_id",
                format!(
                    "account_id must be a non-negative integer, found {}",
                    short_value(v)
                ),
            )
        })?,
    };
    let table = match obj.remove("table") {
        None | Some(Value::Null) => return Err(bad(400, "missing_table", "missing table".into())),
        Some(Value::String(s)) => s,
        Some(_) => return Err(bad(400, "invalid_table", "table must be a string".into())),
    };
    let row: Map<String, Value> = match obj.remove("row") {
        None | Some(Value::Null) => return Err(bad(400, "missing_row", "missing row".into())),
        Some(Value::Object(m)) => m,
        Some(_) => return Err(bad(400, "invalid_row", "row must be a JSON object".into())),
    };
    let t = schema
        .check_row(&table, &row)
        .map_err(|e| bad(422, e.code(), e.to_string()))?;
    // The row's own text, so numbers of any precision in JSON columns
    // travel as sent (a `Value` would round them to a double).
    let row_json = match crate::rawjson::row_text(line) {
        Some(raw) => crate::rawjson::minify(raw.get()).into_bytes(),
        None => serde_json::to_vec(&row)
            .map_err(|e| bad(400, "invalid_row", format!("cannot encode row: {e}")))?,
    };
    if row_json.len() > t.max_row_bytes {
        return Err(bad(
            413,
            "row_too_large",
            format!(
                "row is {} bytes, the limit for table {} is {}",
                row_json.len(),
                t.name,
                t.max_row_bytes
            ),
        ));
    }
    let mut envelope = Vec::with_capacity(row_json.len() + table.len() + 48);
    envelope.extend_from_slice(b"{\"account_id\":");
    envelope.extend_from_slice(account_id.to_string().as_bytes());
    envelope.extend_from_slice(b",\"table\":\"");
    // Table names come from the schema: identifiers, nothing to escape.
    envelope.extend_from_slice(t.name.as_bytes());
    envelope.extend_from_slice(b"\",\"row\":");
    envelope.extend_from_slice(&row_json);
    envelope.push(b'}');
    Ok(Payload {
        account_id,
        table: t.name.clone(),
        row_json,
        envelope_json: envelope,
    })
}

/// A refused JSON value as a message shows it: a string quoted, anything
/// else as JSON; at most `QUOTED_CHARS` characters of either.
fn short_value(v: &Value) -> String {
    match v {
        Value::String(s) => quote(s),
        other => {
            let text = other.to_string();
            let mut chars = text.chars();
            let head: String = chars.by_ref().take(QUOTED_CHARS).collect();
            if chars.next().is_some() {
                format!("{head}…")
            } else {
                head
            }
        }
    }
}

const DUPLICATE: &str = "duplicate key";

/// A JSON value whose objects, at any depth, name each key once. Parsers
/// differ on repeated keys (first or last wins), so a proxy in front that
/// reads one and a store that keeps the other would disagree on the
/// account or the row: a repeated key is refused instead.
struct Strict(Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Strict, D::Error> {
        d.deserialize_any(StrictVisitor)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Strict;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Strict, E> {
        Ok(Strict(Value::Bool(v)))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Strict, E> {
        Ok(Strict(Value::from(v)))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Strict, E> {
        Ok(Strict(Value::from(v)))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Strict, E> {
        Ok(Strict(Value::from(v)))
    }
    fn visit_str<E>(self, v: &str) -> Result<Strict, E> {
        Ok(Strict(Value::String(v.to_owned())))
    }
    fn visit_string<E>(self, v: String) -> Result<Strict, E> {
        Ok(Strict(Value::String(v)))
    }
    fn visit_unit<E>(self) -> Result<Strict, E> {
        Ok(Strict(Value::Null))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Strict, A::Error> {
        let mut items = Vec::new();
        while let Some(Strict(v)) = seq.next_element()? {
            items.push(v);
        }
        Ok(Strict(Value::Array(items)))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Strict, A::Error> {
        let mut m = Map::new();
        while let Some(k) = map.next_key::<String>()? {
            if m.contains_key(&k) {
                return Err(de::Error::custom(format!("{DUPLICATE} {}", quote(&k))));
            }
            let Strict(v) = map.next_value()?;
            m.insert(k, v);
        }
        Ok(Strict(Value::Object(m)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PipelineConfig;

    fn schema() -> Schema {
        PipelineConfig::load(None).unwrap().schema().unwrap()
    }

    const GOOD: &str = r#"{"account_id":42,"table":"raw_item","row":{"project_id":1,"timestamp":1574948156,"body":"b","version":2,"billable":1,"uuid":"bad3a155-585f-47cb-bc3e-51767d52c2a2"}}"#;

    #[test]
    fn one_envelope_and_a_batch() {
        let s = schema();
        let p = parse_body(&s, GOOD.as_bytes(), Framing::Json, 1 << 20).unwrap();
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].account_id, 42);
        let env: Value = serde_json::from_slice(&p[0].envelope_json).unwrap();
        assert_eq!(env["row"]["uuid"], "bad3a155-585f-47cb-bc3e-51767d52c2a2");
        let batch = format!("{GOOD}\r\n\n{GOOD}\n");
        assert_eq!(
            parse_body(&s, batch.as_bytes(), Framing::Ndjson, 1 << 20)
                .unwrap()
                .len(),
            2
        );
    }

    #[test]
    fn a_bad_line_is_named() {
        let s = schema();
        let batch = format!(
            "{GOOD}\n{}\n",
            GOOD.replace("\"version\":2", "\"version\":\"2\"")
        );
        let e = parse_body(&s, batch.as_bytes(), Framing::Ndjson, 1 << 20).unwrap_err();
        assert_eq!(e.status(), 422);
        assert_eq!(e.line(), Some(2));
        assert!(e.to_string().contains("\"version\" must be int"), "{e}");
    }

    #[test]
    fn repeated_keys_are_refused_by_name_and_line() {
        let s = schema();
        for (bad, key) in [
            (
                GOOD.replace(
                    "{\"account_id\":42,",
                    "{\"account_id\":42,\"account_id\":7,",
                ),
                "account_id",
            ),
            (
                GOOD.replace("\"body\":\"b\",", "\"body\":\"b\",\"body\":\"c\","),
                "body",
            ),
        ] {
            let batch = format!("{GOOD}\n{bad}\n");
            let e = parse_body(&s, batch.as_bytes(), Framing::Ndjson, 1 << 20).unwrap_err();
            assert_eq!(
                (e.status(), e.code(), e.line()),
                (400, "duplicate_key", Some(2))
            );
            assert!(
                e.to_string().contains(&format!("duplicate key \"{key}\"")),
                "{e}"
            );
        }
    }

    #[test]
    fn refused_values_are_quoted_short() {
        let s = schema();
        let long = "x".repeat(10_000);
        let bad = GOOD.replace("\"table\":\"raw_item\"", &format!("\"table\":\"{long}\""));
        let e = parse_body(&s, bad.as_bytes(), Framing::Json, 1 << 20).unwrap_err();
        assert_eq!(e.code(), "unknown_table");
        assert!(e.to_string().len() < 100, "{e}");
        assert!(!e.to_string().contains("raw_item"), "{e}");
        let bad = GOOD.replace("\"account_id\":42", &format!("\"account_id\":\"{long}\""));
        let e = parse_body(&s, bad.as_bytes(), Framing::Json, 1 << 20).unwrap_err();
        assert!(e.to_string().len() < 120, "{e}");
        let e = parse_body(&s, GOOD.as_bytes(), Framing::Json, 100).unwrap_err();
        assert_eq!((e.status(), e.code()), (413, "row_too_large"));
    }

    #[test]
    fn content_types() {
        assert_eq!(
            Framing::from_content_type("application/json; charset=utf-8"),
            Some(Framing::Json)
        );
        assert_eq!(
            Framing::from_content_type("Application/X-NDJSON"),
            Some(Framing::Ndjson)
        );
        assert_eq!(Framing::from_content_type("text/plain"), None);
    }
}
