//! Properties of every parser of untrusted input. The fuzz targets
//! (`fuzz/fuzz_targets/`) call one function each with libFuzzer's input;
//! `tests/fuzz_regressions.rs` includes this file and replays every corpus
//! and regression input through the same functions on stable. A function
//! returns when its input is refused or accepted as the design says, and
//! panics, naming the property, when it is not.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::path::Path;
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};
use switchyard::config::{admitted_bytes, valid_flag_key, FlagKeys, PipelineConfig};
use switchyard::db::{row_values, row_values_exact, Bound};
use switchyard::flags::folder::{self, Files, Kind, Origin};
use switchyard::flags::Snapshot;
use switchyard::offline::{self, LinePrefix, OfflineLine};
use switchyard::rollout::plan::{Plan, PlanRecord};
use switchyard::route::{self, parse_body, Framing, Payload};
use switchyard::routing::threshold;
use switchyard::schema::{ColumnType, Schema, Table, TableConfig, MAX_STRING_KEY_CHARS};

/// The longest message a refusal may carry: what it quotes of the input is
/// cut at 40 characters, so a message never echoes a body at length.
const MAX_MESSAGE_CHARS: usize = 300;

/// The schema of the embedded default configuration (`config/switchyard.toml`).
static DEFAULT_SCHEMA: LazyLock<Schema> = LazyLock::new(|| {
    let schema = PipelineConfig::load(None).map(|c| c.schema());
    match schema {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => panic!("the embedded schema is valid: {e}"),
        Err(e) => panic!("the embedded configuration is valid: {e}"),
    }
});

/// A table of every column type, nullable and not, with a string key, and
/// one keyed by a UUID with a small row limit.
const TYPED_TABLES: &str = r#"
[[tables]]
name = "every_type"
key = "k"
time = "t"
group = "g"
max_row_bytes = 4096
[tables.columns]
k = "string"
t = "int"
g = "int"
f = "float"
fn = "float?"
s = "string?"
b = "bool?"
u = "uuid?"
j = "json?"
jn = "json"

[[tables]]
name = "by_uuid"
key = "id"
time = "ts"
group = "ts"
max_row_bytes = 256
[tables.columns]
id = "uuid"
ts = "int"
n = "int?"
"#;

static TYPED_SCHEMA: LazyLock<Schema> = LazyLock::new(|| {
    #[derive(serde::Deserialize)]
    struct Tables {
        tables: Vec<TableConfig>,
    }
    let tables: Tables = match toml::from_str(TYPED_TABLES) {
        Ok(t) => t,
        Err(e) => panic!("the typed tables parse: {e}"),
    };
    match Schema::from_config(&tables.tables) {
        Ok(s) => s,
        Err(e) => panic!("the typed tables are a schema: {e}"),
    }
});

fn check_message(what: &str, message: &str) {
    assert!(
        message.chars().count() <= MAX_MESSAGE_CHARS,
        "{what}: a refusal quotes at most {MAX_MESSAGE_CHARS} characters, got {message:?}"
    );
}

// ---------------------------------------------------------------- bodies

/// A request body as the router reads it. The first byte chooses the
/// framing (bit 0: JSON or NDJSON), the encoding (bits 1-2: identity, the
/// rest as a gzip stream as sent, or the rest gzip-compressed here in one or
/// two members) and the line limit (bit 3: a small one).
pub fn route_body(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let framing = if mode & 1 == 0 {
        Framing::Ndjson
    } else {
        Framing::Json
    };
    let schema = &*DEFAULT_SCHEMA;
    let max_line = if mode & 8 == 0 {
        route::max_line_bytes(schema)
    } else {
        rest.len() / 2
    };
    let body = match (mode >> 1) & 3 {
        0 => rest.to_vec(),
        1 => {
            let Some((limit, raw)) = rest.split_first_chunk::<2>() else {
                return;
            };
            match check_gunzip(raw, usize::from(u16::from_le_bytes(*limit))) {
                Some(b) => b,
                None => return,
            }
        }
        _ => {
            check_gzip_round_trip(rest, usize::from(mode >> 4));
            rest.to_vec()
        }
    };
    check_body(schema, &body, framing, max_line);
}

/// What `flate2` reads from a multi-member stream, at most `max + 1` bytes.
fn reference_gunzip(raw: &[u8], max: usize) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(raw)
        .take(max as u64 + 1)
        .read_to_end(&mut out)?;
    Ok(out)
}

/// Decodes `raw` with the router's rules; checks it against `flate2`.
fn check_gunzip(raw: &[u8], max: usize) -> Option<Vec<u8>> {
    let ours = route::gunzip(raw, max);
    if raw.is_empty() {
        let e = ours.err();
        assert_eq!(
            e.map(|e| e.status()),
            Some(400),
            "an empty gzip body is refused"
        );
        return None;
    }
    let reference = reference_gunzip(raw, max);
    match ours {
        Ok(out) => {
            assert!(
                out.len() <= max,
                "decoded gzip never exceeds its limit: {} > {max}",
                out.len()
            );
            match reference {
                Ok(r) => assert!(r == out, "the decoded body is what flate2 decodes"),
                Err(e) => panic!("accepted a gzip stream flate2 refuses ({e})"),
            }
            Some(out)
        }
        Err(e) => {
            assert!(
                matches!(e.status(), 400 | 413),
                "a gzip refusal is 400 or 413: {} {e}",
                e.status()
            );
            check_message("gzip", &e.to_string());
            if let Ok(r) = reference {
                assert!(
                    r.len() > max,
                    "refused ({e}) a whole gzip stream of {} bytes within the limit {max}",
                    r.len()
                );
                // Beyond the limit and corrupt too (flate2 stopped reading
                // at the limit): either refusal is right.
                assert!(
                    e.status() == 413 || e.to_string().contains("invalid gzip"),
                    "a stream beyond the limit is a 413: {e}"
                );
            }
            None
        }
    }
}

/// `body` compressed in one member, or in two cut at `cut` sixteenths of
/// it, decodes back to itself; one byte less of limit is a 413.
fn check_gzip_round_trip(body: &[u8], cut: usize) {
    use std::io::Write;
    let gz = |part: &[u8]| -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        if let Err(err) = e.write_all(part) {
            panic!("gzip into memory: {err}");
        }
        match e.finish() {
            Ok(v) => v,
            Err(err) => panic!("gzip into memory: {err}"),
        }
    };
    let stream = match body.len() * cut / 16 {
        0 => gz(body),
        at => [gz(&body[..at]), gz(&body[at..])].concat(),
    };
    match route::gunzip(&stream, body.len()) {
        Ok(out) => assert!(out == body, "a gzip body decodes to itself"),
        Err(e) => panic!("a whole gzip stream within its limit is refused: {e}"),
    }
    if !body.is_empty() {
        let e = route::gunzip(&stream, body.len() - 1).err();
        assert_eq!(
            e.map(|e| e.status()),
            Some(413),
            "a body one byte over the limit is a 413"
        );
    }
}

/// The lines `parse_body` takes a payload from, in order.
fn payload_lines(body: &[u8], framing: Framing) -> Vec<&[u8]> {
    match framing {
        Framing::Json => vec![body.trim_ascii()],
        Framing::Ndjson => body
            .split(|b| *b == b'\n')
            .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
            .filter(|l| !l.trim_ascii().is_empty())
            .collect(),
    }
}

/// A body accepted whole or refused whole, naming a line of it.
fn check_body(schema: &Schema, body: &[u8], framing: Framing, max_line: usize) {
    match parse_body(schema, body, framing, max_line) {
        Ok(payloads) => {
            let lines = payload_lines(body, framing);
            assert_eq!(payloads.len(), lines.len(), "one payload per line");
            for (p, line) in payloads.iter().zip(lines) {
                check_payload(schema, p, line, max_line);
            }
        }
        Err(e) => {
            assert!(
                matches!(e.status(), 400 | 413 | 422),
                "a refused body is 400, 413 or 422: {} {e}",
                e.status()
            );
            check_message("body", &e.to_string());
            let lines = body.split(|b| *b == b'\n').count();
            let Some(n) = e.line() else {
                assert_eq!(
                    e.code(),
                    "empty_body",
                    "only an empty body names no line: {e}"
                );
                return;
            };
            assert!(
                (1..=lines).contains(&n),
                "the error names line {n} of a body of {lines}"
            );
            if framing == Framing::Json {
                assert_eq!(n, 1, "a JSON body is one line");
                return;
            }
            // The first bad line is named: the lines before it are good,
            // and it is refused alone for the same reason.
            let before: Vec<&[u8]> = body.split(|b| *b == b'\n').take(n - 1).collect();
            let before = before.join(&b'\n');
            if let Err(b) = parse_body(schema, &before, framing, max_line) {
                assert_eq!(
                    b.code(),
                    "empty_body",
                    "the lines before line {n} are good: {b}"
                );
            }
            let Some(line) = body.split(|b| *b == b'\n').nth(n - 1) else {
                panic!("line {n} of the body exists");
            };
            match parse_body(schema, line, framing, max_line) {
                Ok(_) => panic!("line {n} was refused ({e}) but is accepted alone"),
                Err(alone) => assert_eq!(
                    (alone.status(), alone.code()),
                    (e.status(), e.code()),
                    "line {n} alone is refused for the same reason"
                ),
            }
        }
    }
}

/// An accepted payload is the row as sent, re-validates, and is one that
/// both pipelines (the Kafka envelope, the offline line) can bind.
fn check_payload(schema: &Schema, p: &Payload, line: &[u8], max_line: usize) {
    let sent: Value = match serde_json::from_slice(line) {
        Ok(v) => v,
        Err(e) => panic!("an accepted line is JSON: {e}"),
    };
    let row: Map<String, Value> = match serde_json::from_slice(&p.row_json) {
        Ok(r) => r,
        Err(e) => panic!("a payload's row is a JSON object: {e}"),
    };
    assert_eq!(
        Value::Object(row.clone()),
        sent["row"],
        "the row is kept as sent"
    );
    assert_eq!(
        Some(p.account_id),
        sent["account_id"].as_u64(),
        "the account as sent"
    );
    assert_eq!(
        Some(p.table.as_str()),
        sent["table"].as_str(),
        "the table as sent"
    );
    let text = String::from_utf8_lossy(&p.row_json);
    assert_eq!(
        switchyard::rawjson::minify(&text),
        text,
        "the row is compact JSON"
    );
    let table = match schema.check_row(&p.table, &row) {
        Ok(t) => t,
        Err(e) => panic!("an accepted row re-validates: {e}"),
    };
    assert!(
        p.row_json.len() <= table.max_row_bytes,
        "an accepted row is within its limit"
    );
    let envelope: Value = match serde_json::from_slice(&p.envelope_json) {
        Ok(v) => v,
        Err(e) => panic!("the Kafka envelope is JSON: {e}"),
    };
    assert_eq!(
        envelope,
        json!({"account_id": p.account_id, "table": p.table, "row": row}),
        "the Kafka envelope carries the account, the table and the row"
    );
    match parse_body(
        schema,
        &p.envelope_json,
        Framing::Json,
        max_line.max(p.envelope_json.len()),
    ) {
        Ok(again) => {
            assert_eq!(again.len(), 1);
            assert!(
                again[0].row_json == p.row_json && again[0].envelope_json == p.envelope_json,
                "an accepted envelope re-serialised parses to the same payload"
            );
        }
        Err(e) => panic!("an accepted envelope re-serialised is refused: {e}"),
    }
    if let Err(e) = row_values_exact(table, &row, &p.envelope_json) {
        panic!("ingest cannot bind an accepted row: {e}");
    }
    check_writer_line(table, p, "dual", 1);
}

/// The offline line the writer makes of `p` reads back as `p`, and the
/// loader can bind it.
fn check_writer_line(table: &Table, p: &Payload, route: &str, counter: u64) -> Vec<u8> {
    let mut line = Vec::new();
    LinePrefix::new(&p.table, &p.row_json, p.account_id, route)
        .write_with_counter(&mut line, counter);
    assert!(
        line.ends_with(b"\n") && line.iter().filter(|b| **b == b'\n').count() == 1,
        "an offline line is one line"
    );
    let read: OfflineLine = match serde_json::from_slice(&line) {
        Ok(l) => l,
        Err(e) => panic!("an offline line the writer made does not parse: {e}"),
    };
    let row: Map<String, Value> = serde_json::from_slice(&p.row_json).unwrap_or_default();
    assert_eq!(
        read,
        OfflineLine {
            table: p.table.clone(),
            row,
            account_id: Some(p.account_id),
            route: Some(route.to_string()),
            counter,
        },
        "an offline line reads back as written"
    );
    if let Err(e) = row_values_exact(table, &read.row, &line) {
        panic!("the loader cannot bind an accepted row: {e}");
    }
    line
}

// ---------------------------------------------------------------- rows

/// One row (the input after its first byte, as JSON) against one table of
/// a schema of every column type (the first byte picks it).
pub fn schema_row(data: &[u8]) {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let schema = &*TYPED_SCHEMA;
    let table = &schema.tables()[usize::from(pick) % schema.tables().len()];
    let Ok(Value::Object(row)) = serde_json::from_slice::<Value>(rest) else {
        return;
    };
    let verdict = schema.check_row(&table.name, &row);
    match &verdict {
        Ok(t) => {
            assert_eq!(t.name, table.name);
            check_accepted_row(table, &row);
            let text = match serde_json::to_vec(&row) {
                Ok(t) => t,
                Err(e) => panic!("an accepted row serialises: {e}"),
            };
            let again: Map<String, Value> = match serde_json::from_slice(&text) {
                Ok(r) => r,
                Err(e) => panic!("an accepted row re-serialised parses: {e}"),
            };
            assert_eq!(again, row, "an accepted row re-serialised is the same row");
            if let Err(e) = schema.check_row(&table.name, &again) {
                panic!("an accepted row re-serialised is refused: {e}");
            }
        }
        Err(e) => check_message("row", &e.to_string()),
    }
    // Through the router, the same verdict.
    let mut envelope =
        format!("{{\"account_id\":7,\"table\":\"{}\",\"row\":", table.name).into_bytes();
    envelope.extend_from_slice(rest);
    envelope.push(b'}');
    let routed = parse_body(schema, &envelope, Framing::Json, envelope.len());
    match (&verdict, routed) {
        (_, Err(e)) if e.code() == "duplicate_key" || e.code() == "invalid_json" => {}
        (Ok(_), Err(e)) if e.status() == 413 => {}
        (Ok(_), Ok(p)) => check_payload(schema, &p[0], &envelope, envelope.len()),
        (Ok(_), Err(e)) => panic!("a row the schema accepts is refused by the router: {e}"),
        (Err(e), Ok(_)) => panic!("a row the schema refuses ({e}) is accepted by the router"),
        (Err(e), Err(r)) => assert_eq!(
            (r.status(), r.code()),
            (422, e.code()),
            "the router refuses a row for the schema's reason"
        ),
    }
}

/// A row the schema accepted is one every engine stores: the consumers
/// bind it, each value as sent.
fn check_accepted_row(table: &Table, row: &Map<String, Value>) {
    let bound = match row_values(table, row) {
        Ok(b) => b,
        Err(e) => panic!("a row the router accepts cannot be bound: {e}"),
    };
    for (c, b) in table.columns.iter().zip(&bound) {
        let v = row.get(&c.name).filter(|v| !v.is_null());
        let Some(v) = v else {
            assert!(
                c.nullable,
                "column {}: only a nullable column may be absent",
                c.name
            );
            assert!(
                matches!(
                    b,
                    Bound::Int(None) | Bound::Float(None) | Bound::Bool(None) | Bound::Text(None)
                ),
                "column {}: absent binds null",
                c.name
            );
            continue;
        };
        let ok = match (c.ty, b) {
            (ColumnType::Int, Bound::Int(Some(i))) => v.as_i64() == Some(*i),
            (ColumnType::Float, Bound::Float(Some(f))) => v.as_f64() == Some(*f),
            (ColumnType::Bool, Bound::Bool(Some(x))) => v.as_bool() == Some(*x),
            (ColumnType::String, Bound::Text(Some(s))) => {
                let key_ok = c.name != table.key
                    || (!s.is_empty() && s.chars().count() <= MAX_STRING_KEY_CHARS);
                v.as_str() == Some(s) && !s.contains('\0') && key_ok
            }
            (ColumnType::Uuid, Bound::Text(Some(s))) => {
                v.as_str().map(str::to_ascii_lowercase).as_deref() == Some(s)
                    && s.len() == 36
                    && s.bytes().enumerate().all(|(i, ch)| match i {
                        8 | 13 | 18 | 23 => ch == b'-',
                        _ => ch.is_ascii_hexdigit(),
                    })
            }
            (ColumnType::Json, Bound::Text(Some(s))) => {
                !s.contains('\0') && serde_json::from_str::<Value>(s).ok().as_ref() == Some(v)
            }
            _ => false,
        };
        assert!(ok, "column {} ({}): {v} binds as {b:?}", c.name, c.ty);
    }
}

// ---------------------------------------------------------------- offline files

/// An offline file left open by a crash. Bit 0 of the first byte: the rest
/// is the file as found, or an NDJSON body whose payloads the writer wrote,
/// followed by a line cut short (its length the second byte).
pub fn offline_file(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        check_repair(rest);
        for line in rest.split(|b| *b == b'\n') {
            check_offline_line(line);
        }
        return;
    }
    let Some((&cut, body)) = rest.split_first() else {
        return;
    };
    let schema = &*DEFAULT_SCHEMA;
    let Ok(payloads) = parse_body(schema, body, Framing::Ndjson, route::max_line_bytes(schema))
    else {
        return;
    };
    let routes = ["legacy", "dual", "kafka-fallback", "dual-fallback"];
    let mut file = Vec::new();
    let mut expected = Vec::new();
    for (i, p) in payloads.iter().enumerate() {
        let Some(table) = schema.table(&p.table) else {
            panic!("an accepted payload's table is declared");
        };
        let route = routes[i % routes.len()];
        file.extend(check_writer_line(table, p, route, i as u64 + 1));
        expected.push((p.table.clone(), Some(route.to_string()), i as u64 + 1));
    }
    let whole = file.len();
    if let Some(last) = payloads.last() {
        let mut torn = Vec::new();
        LinePrefix::new(&last.table, &last.row_json, last.account_id, "dual")
            .write_with_counter(&mut torn, 0);
        let n = usize::from(cut) % torn.len();
        file.extend_from_slice(&torn[..n]);
    }
    let kept = check_repair(&file);
    assert_eq!(
        kept.len(),
        whole,
        "repair keeps every whole line and cuts a torn one"
    );
    let read: Vec<OfflineLine> = kept
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| match serde_json::from_slice(l) {
            Ok(x) => x,
            Err(e) => panic!("a kept line is an offline line: {e}"),
        })
        .collect();
    let got: Vec<(String, Option<String>, u64)> = read
        .into_iter()
        .map(|l| (l.table, l.route, l.counter))
        .collect();
    assert_eq!(
        got, expected,
        "the kept lines are the lines written, in order"
    );
}

/// One line as a loader reads it: an offline line reads back as itself
/// once re-serialised, and binding it against its table never panics.
fn check_offline_line(line: &[u8]) {
    let Ok(parsed) = serde_json::from_slice::<OfflineLine>(line) else {
        return;
    };
    let text = match serde_json::to_vec(&parsed) {
        Ok(t) => t,
        Err(e) => panic!("an offline line serialises: {e}"),
    };
    match serde_json::from_slice::<OfflineLine>(&text) {
        Ok(again) => assert_eq!(
            again, parsed,
            "an offline line re-serialised reads the same"
        ),
        Err(e) => panic!("an offline line re-serialised does not parse: {e}"),
    }
    if let Some(table) = DEFAULT_SCHEMA.table(&parsed.table) {
        let _ = row_values_exact(table, &parsed.row, line);
    }
}

/// A folder for one repair: in memory where the machine has one.
fn scratch() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    let made = if shm.is_dir() {
        tempfile::tempdir_in(shm)
    } else {
        tempfile::tempdir()
    };
    match made {
        Ok(d) => d,
        Err(e) => panic!("a scratch folder: {e}"),
    }
}

/// Repairs `data` as a file left open; returns what it kept. The kept part
/// is a prefix of whole, valid lines, the rest is kept beside it as the
/// torn tail, and repairing the result again changes nothing.
fn check_repair(data: &[u8]) -> Vec<u8> {
    let dir = scratch();
    let kept = repair_once(dir.path(), "offline-1-1", data);
    assert!(
        data.starts_with(&kept),
        "the repaired file is a prefix of the file"
    );
    assert!(
        kept.is_empty() || kept.ends_with(b"\n"),
        "the repaired file ends with a whole line"
    );
    for line in kept.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        assert!(
            serde_json::from_slice::<serde::de::IgnoredAny>(line).is_ok(),
            "every kept line is valid JSON"
        );
    }
    let rest = &data[kept.len()..];
    if let Some(nl) = rest.iter().position(|b| *b == b'\n') {
        assert!(
            serde_json::from_slice::<serde::de::IgnoredAny>(&rest[..nl]).is_err(),
            "repair stops at the first line that is not valid"
        );
    }
    let again = repair_once(dir.path(), "offline-2-1", &kept);
    assert!(again == kept, "repairing a repaired file changes nothing");
    kept
}

fn repair_once(dir: &Path, name: &str, data: &[u8]) -> Vec<u8> {
    let open = dir.join(format!("{name}{}", offline::OPEN_SUFFIX));
    let closed = dir.join(format!("{name}{}", offline::CLOSED_SUFFIX));
    let torn = dir.join(format!(
        "{name}{}{}",
        offline::CLOSED_SUFFIX,
        offline::TORN_SUFFIX
    ));
    if let Err(e) = fs::write(&open, data) {
        panic!("write {}: {e}", open.display());
    }
    let report = match offline::repair(dir, None) {
        Ok(r) => r,
        Err(e) => panic!("repair of a readable folder: {e}"),
    };
    assert_eq!(report.files, 1, "one file left open, one repaired");
    assert!(!open.exists(), "no file stays open after repair");
    let kept = fs::read(&closed).unwrap_or_default();
    assert_eq!(
        closed.exists(),
        !kept.is_empty(),
        "an empty repair leaves no file"
    );
    let tail = fs::read(&torn).unwrap_or_default();
    assert_eq!(
        torn.exists(),
        kept.len() < data.len(),
        "a torn tail is kept iff cut"
    );
    assert!(
        [kept.as_slice(), &tail].concat() == data,
        "kept and torn are the file"
    );
    assert_eq!(report.torn_bytes, tail.len() as u64);
    assert_eq!(
        report.lines_kept,
        kept.iter().filter(|b| **b == b'\n').count()
    );
    for p in [closed, torn] {
        let _ = fs::remove_file(p);
    }
    kept
}

// ---------------------------------------------------------------- flags

/// Flag files as LaunchDarkly JSON, up to four split at 0xFF bytes (never
/// in UTF-8). The first byte: bit 0 declares a migration flag key, bit 1
/// resolves against last good flags (else none).
pub fn flag_json(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut keys = FlagKeys::default();
    if mode & 1 == 1 {
        keys.migration = Some("switchyard-migration".into());
    }
    let dir = Path::new("flags");
    let mut files = Files::default();
    for (i, bytes) in rest.split(|b| *b == 0xff).take(4).enumerate() {
        files
            .bytes
            .insert(dir.join(format!("f{i}.json")), bytes.to_vec());
        check_flag_file(bytes, &keys);
    }
    let last_good = if mode & 2 == 2 {
        good_flags(&keys)
    } else {
        BTreeMap::new()
    };
    let resolved = folder::resolve(dir, &files, &keys, &last_good);
    for p in &resolved.problems {
        check_message(
            "flag problem",
            &p.reason.chars().take(MAX_MESSAGE_CHARS).collect::<String>(),
        );
        assert!(!p.path.is_empty(), "a problem names where it is");
    }
    let mut routing = vec![&keys.kill_switch, &keys.kafka_only, &keys.dual_write];
    routing.extend(keys.migration.as_ref());
    for key in routing {
        let origin = resolved.origins.get(key.as_str());
        assert!(origin.is_some(), "routing flag {key} has an origin");
        if let Some(flag) = resolved.flags.get(key.as_str()) {
            let kind = folder::kind(key, &keys);
            if let Err(e) = folder::check_flag(kind, flag) {
                panic!("a served routing flag is invalid: {e}");
            }
        }
    }
    let pct = |k: &str| {
        resolved
            .flags
            .get(k)
            .and_then(folder::served_percent)
            .unwrap_or((0.0, 0.0))
    };
    assert!(
        pct(&keys.kafka_only).1 <= pct(&keys.dual_write).0,
        "the kafka-only percentage served is never above the dual-write one"
    );
    let kill_origin = resolved.origins.get(keys.kill_switch.as_str());
    let snapshot = Snapshot::from_json(&resolved.flags);
    for account in [0, 1, 42, 7_777, u64::MAX] {
        let v = snapshot.evaluate(&keys, account);
        if kill_origin == Some(&Origin::SafeDefault) {
            assert!(
                v.kill_switch,
                "with no kill-switch value every account is killed"
            );
        }
        for p in [v.kafka_only, v.dual_write] {
            assert!(
                folder::check_percent(&json!(p)).is_ok(),
                "a served percentage {p} is valid"
            );
            assert!(
                (f64::from(threshold(p)) - p * 100.0).abs() < 1e-3,
                "{p} routes its buckets"
            );
        }
    }
}

/// One file: an accepted flag re-serialised is accepted as the same flag,
/// and evaluates to values of its kind.
fn check_flag_file(bytes: &[u8], keys: &FlagKeys) {
    match folder::parse_flag(bytes, keys) {
        Ok((key, value)) => {
            let text = match serde_json::to_vec(&value) {
                Ok(t) => t,
                Err(e) => panic!("an accepted flag serialises: {e}"),
            };
            match folder::parse_flag(&text, keys) {
                Ok(again) => assert!(again == (key.clone(), value.clone()), "the same flag"),
                Err(e) => panic!("an accepted flag re-serialised is refused: {e}"),
            }
            let kind = folder::kind(&key, keys);
            let one = BTreeMap::from([(key.clone(), value)]);
            let snapshot = Snapshot::from_json(&one);
            for account in [0, 3, 42, u64::MAX] {
                let v = snapshot.evaluate(keys, account);
                if kind == Kind::Percent {
                    for p in [v.kafka_only, v.dual_write] {
                        assert!(
                            folder::check_percent(&json!(p)).is_ok(),
                            "flag {key} serves {p}, not a valid percentage"
                        );
                    }
                }
            }
        }
        Err(e) => check_message(
            "flag",
            &e.chars().take(MAX_MESSAGE_CHARS).collect::<String>(),
        ),
    }
}

/// The flags a router ran on before: kill switch off, 20 % dual, 10 % Kafka.
fn good_flags(keys: &FlagKeys) -> BTreeMap<String, Value> {
    let flag = |key: &str, v: Value| {
        json!({"key": key, "version": 1, "on": true, "targets": [], "contextTargets": [],
               "rules": [], "prerequisites": [], "fallthrough": {"variation": 0},
               "offVariation": 0, "variations": [v], "salt": key})
    };
    BTreeMap::from([
        (
            keys.kill_switch.clone(),
            flag(&keys.kill_switch, json!(false)),
        ),
        (keys.dual_write.clone(), flag(&keys.dual_write, json!(20))),
        (keys.kafka_only.clone(), flag(&keys.kafka_only, json!(10))),
    ])
}

// ---------------------------------------------------------------- configuration

/// The TOML configuration. An accepted one is usable by every role: its
/// schema builds, one full request fits its memory bound, its flag keys are
/// valid and distinct, and every interval a role adds to the clock fits it.
pub fn config_toml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match PipelineConfig::parse("fuzz.toml", text) {
        Ok(cfg) => {
            let schema = match cfg.schema() {
                Ok(s) => s,
                Err(e) => panic!("an accepted configuration's schema is refused: {e}"),
            };
            assert!(route::max_line_bytes(&schema) >= route::LINE_SLACK);
            let r = &cfg.route;
            assert!(r.max_body_bytes > 0 && r.max_inflight_requests > 0);
            assert!(admitted_bytes(r.max_body_bytes) <= r.max_inflight_bytes);
            let k = &cfg.flags.keys;
            for key in [&k.kill_switch, &k.kafka_only, &k.dual_write]
                .into_iter()
                .chain(&k.migration)
            {
                assert!(valid_flag_key(key), "flag key {key:?} is valid");
            }
            assert!(
                k.kill_switch != k.kafka_only
                    && k.kill_switch != k.dual_write
                    && k.kafka_only != k.dual_write
            );
            let now = Instant::now();
            for (what, d) in [
                (
                    "offline.max_file_age_secs",
                    Duration::from_secs(cfg.offline.max_file_age_secs),
                ),
                (
                    "offline.group_commit_ms",
                    Duration::from_millis(cfg.offline.group_commit_ms),
                ),
                (
                    "route.admission_wait_ms",
                    Duration::from_millis(r.admission_wait_ms),
                ),
                (
                    "route.header_read_timeout_ms",
                    Duration::from_millis(r.header_read_timeout_ms),
                ),
                (
                    "route.body_read_timeout_ms",
                    Duration::from_millis(r.body_read_timeout_ms),
                ),
                ("flags.poll_ms", Duration::from_millis(cfg.flags.poll_ms)),
                (
                    "kafka.delivery_timeout_ms",
                    Duration::from_millis(cfg.kafka.delivery_timeout_ms),
                ),
                (
                    "kafka.breaker_cooldown_ms",
                    Duration::from_millis(cfg.kafka.breaker_cooldown_ms),
                ),
                (
                    "kafka.topic_check_timeout_ms",
                    Duration::from_millis(cfg.kafka.topic_check_timeout_ms),
                ),
            ] {
                assert!(
                    now.checked_add(d).is_some(),
                    "{what} = {d:?} overflows the clock"
                );
            }
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.starts_with("fuzz.toml"),
                "a configuration error names the file: {msg}"
            );
        }
    }
}

// ---------------------------------------------------------------- rollout plans

/// A rollout plan. An accepted one has increasing steps on the routing
/// resolution, gates among them, a check interval the controller can sleep,
/// and reads back the same once re-serialised.
pub fn rollout_plan(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let plan = match Plan::parse(text) {
        Ok(p) => p,
        Err(e) => {
            assert!(!e.is_empty(), "a refused plan says why");
            return;
        }
    };
    let mut prev = 0.0;
    for s in &plan.steps {
        assert!(
            *s > prev && *s <= 100.0,
            "steps increase within (0, 100]: {:?}",
            plan.steps
        );
        assert!(
            folder::on_resolution(*s),
            "step {s} is on the routing resolution"
        );
        prev = *s;
    }
    assert!(plan.manual_gates.iter().all(|g| plan.steps.contains(g)));
    match Duration::try_from_secs_f64(plan.check_interval_secs) {
        Ok(d) => assert!(
            !d.is_zero(),
            "check_interval_secs = {} sleeps no time",
            plan.check_interval_secs
        ),
        Err(e) => panic!(
            "check_interval_secs = {} is no duration: {e}",
            plan.check_interval_secs
        ),
    }
    let text = match toml::to_string(&plan) {
        Ok(t) => t,
        Err(e) => panic!("an accepted plan serialises: {e}"),
    };
    match Plan::parse(&text) {
        Ok(again) => assert_eq!(
            PlanRecord::of(&again),
            PlanRecord::of(&plan),
            "an accepted plan re-serialised is the same plan"
        ),
        Err(e) => panic!("an accepted plan re-serialised is refused: {e}\n{text}"),
    }
}
