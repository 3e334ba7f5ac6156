//! Ingest's PostgreSQL fast path: a batch whose keys are all new is copied
//! straight into its table (`COPY`); one that meets a stored key goes
//! through the idempotent inserts instead. Both must store the same values:
//! NULLs, edge integers and doubles, booleans, UUIDs, JSON, 4-byte UTF-8
//! and the characters COPY's text format escapes.

mod common;

use common::*;
use switchyard::db::{find_rejected, Bound, DbError, TableRows, Written};
use switchyard::schema::{Schema, Table, TableConfig};

fn table_config(name: &str) -> TableConfig {
    toml::from_str(&format!(
        r#"
        name = "{name}"
        key = "k"
        time = "ts"
        group = "g"
        [columns]
        k = "string"
        ts = "int"
        g = "int"
        f = "float?"
        b = "bool?"
        u = "uuid?"
        j = "json?"
        s = "string?"
        "#
    ))
    .expect("table config")
}

fn schema() -> Schema {
    Schema::from_config(&[table_config("copied"), table_config("inserted")]).expect("schema")
}

const NAMES: [&str; 8] = ["k", "ts", "g", "f", "b", "u", "j", "s"];

/// A column's value in a row of `table`.
fn at<'a>(table: &Table, row: &'a [Bound], name: &str) -> &'a Bound {
    let i = table
        .columns
        .iter()
        .position(|c| c.name == name)
        .expect("column");
    &row[i]
}

fn text(s: &str) -> Bound {
    Bound::Text(Some(s.to_string()))
}

/// Rows with every value COPY's text format has to get right, in the
/// table's column order: k, ts, g, f, b, u, j, s by name.
fn edge_rows(table: &Table) -> Vec<Vec<Bound>> {
    let texts = [
        "plain",
        "",
        "tab\there",
        "new\nline",
        "carriage\rreturn",
        "back\\slash",
        "\\N",
        "\\.",
        "\\.\nafter an end-of-data marker",
        "4-byte 😀 𝄞 UTF-8, and é",
        "trailing backslash \\",
        "\"quotes\" and 'quotes', commas, semicolons;",
    ];
    let floats = [
        Some(0.1),
        Some(-0.0),
        Some(1e300),
        Some(f64::MIN_POSITIVE),
        Some(5e-324),
        Some(f64::MAX),
        Some(f64::NAN),
        Some(f64::INFINITY),
        Some(f64::NEG_INFINITY),
        Some(1.0 / 3.0),
        None,
        Some(-123.456),
    ];
    let ints = [i64::MIN, i64::MAX, 0, -1, 1, 42];
    let jsons = [
        Some(r#"{"a":"tab\tand\\backslash","n":1.00000000000000000001}"#),
        Some(r#"["😀","\u00e9",null,true]"#),
        None,
        Some(r#""just a string with \" and \n""#),
        Some("12345678901234567890123"),
        Some(r#"{"nested":{"x":[1,2,{"y":"\\N"}]}}"#),
    ];
    (0..texts.len())
        .map(|i| {
            let by_name = [
                text(&format!("key-{i:02}\t{}", texts[i])),
                Bound::Int(Some(ints[i % ints.len()])),
                Bound::Int(Some(ints[(i + 3) % ints.len()])),
                Bound::Float(floats[i]),
                Bound::Bool([Some(true), Some(false), None][i % 3]),
                Bound::Text((i % 4 != 3).then(|| format!("00000000-0000-4000-8000-{i:012x}"))),
                Bound::Text(jsons[i % jsons.len()].map(str::to_string)),
                Bound::Text((i != 1).then(|| texts[i].to_string())),
            ];
            table
                .columns
                .iter()
                .map(|c| {
                    let at = NAMES.iter().position(|n| *n == c.name).expect("column");
                    by_name[at].clone()
                })
                .collect()
        })
        .collect()
}

fn table_rows(rows: &[Vec<Bound>]) -> TableRows {
    let mut out = TableRows::default();
    for (i, r) in rows.iter().enumerate() {
        out.push(r.clone(), format!("t/0/{i}"));
    }
    out
}

/// Every row of `table` as PostgreSQL prints it, by key.
async fn stored(t: &TestDb, table: &str) -> Vec<Vec<Option<String>>> {
    use sqlx::{Connection, Row};
    let mut c = sqlx::PgConnection::connect(&t.url).await.expect("connect");
    let rows = sqlx::query(&format!(
        "SELECT k, ts::text, g::text, f::text, b::text, u::text, j::text, s \
         FROM \"{table}\" ORDER BY k"
    ))
    .fetch_all(&mut c)
    .await
    .expect("select");
    rows.iter()
        .map(|r| (0..8).map(|i| r.get(i)).collect())
        .collect()
}

async fn write(t: &TestDb, table: &Table, rows: &TableRows) -> Result<Written, DbError> {
    t.db.write_batch(&[(table, rows)], &[], &[], None)
        .await
        .map(|mut w| w.remove(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copied_and_inserted_rows_are_stored_alike() {
    let schema = schema();
    let copied = schema.table("copied").expect("copied").clone();
    let inserted = schema.table("inserted").expect("inserted").clone();
    let t = TestDb::postgres(&schema).await;
    let rows = edge_rows(&copied);
    let all = table_rows(&rows);

    // All keys new: copied straight in.
    let w = write(&t, &copied, &all).await.expect("copy");
    assert_eq!((w.inserted, w.duplicates), (rows.len() as u64, 0), "{w:?}");
    assert!(w.conflicts.is_empty());

    // One key stored already: the whole batch goes through the inserts,
    // which skip that row as a duplicate.
    let seed = table_rows(&rows[5..6]);
    write(&t, &inserted, &seed).await.expect("seed");
    let w = write(&t, &inserted, &all).await.expect("insert");
    assert_eq!(
        (w.inserted, w.duplicates),
        (rows.len() as u64 - 1, 1),
        "{w:?}"
    );
    assert!(w.conflicts.is_empty());

    let a = stored(&t, "copied").await;
    let b = stored(&t, "inserted").await;
    assert_eq!(a.len(), rows.len());
    assert_eq!(a, b, "COPY and INSERT stored different values");
    // And what was sent is what is stored (texts byte for byte).
    for (r, s) in rows.iter().zip(&a) {
        let Bound::Text(k) = at(&copied, r, "k") else {
            unreachable!()
        };
        assert_eq!(k, &s[0]);
        let Bound::Text(body) = at(&copied, r, "s") else {
            unreachable!()
        };
        assert_eq!(body, &s[7]);
    }
    for f in ["NaN", "-0", "Infinity", "-Infinity", "1e+300", "5e-324"] {
        assert!(a.iter().any(|r| r[3].as_deref() == Some(f)), "{f}: {a:?}");
    }

    // The same batch again: every row a duplicate, nothing changed.
    let w = write(&t, &copied, &all).await.expect("again");
    assert_eq!((w.inserted, w.duplicates), (0, rows.len() as u64), "{w:?}");
    assert_eq!(stored(&t, "copied").await, a);
}

/// Two versions of one new key in one batch: COPY refuses the batch, and
/// the inserts keep the first and report the second as a conflict.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_twice_in_one_batch_is_still_a_conflict() {
    let schema = schema();
    let table = schema.table("copied").expect("copied").clone();
    let t = TestDb::postgres(&schema).await;
    let mut rows = edge_rows(&table);
    rows.truncate(3);
    let mut second = rows[0].clone();
    let s_at = table.columns.iter().position(|c| c.name == "s").expect("s");
    second[s_at] = text("another version");
    rows.push(second);
    let w = write(&t, &table, &table_rows(&rows)).await.expect("write");
    assert_eq!(w.inserted, 3, "{w:?}");
    assert_eq!(w.conflicts.len(), 1, "{w:?}");
    assert_eq!(w.conflicts[0].source, "t/0/3");
    let s = stored(&t, "copied").await;
    assert_eq!(s.len(), 3);
    assert_eq!(s[0][7].as_deref(), Some("plain"), "the first version kept");
}

/// A value PostgreSQL refuses (a NUL byte in text) fails the batch as a
/// rejected row whichever path meets it, and the search finds that row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_value_is_rejected_and_found() {
    let schema = schema();
    let table = schema.table("copied").expect("copied").clone();
    let t = TestDb::postgres(&schema).await;
    let mut rows = edge_rows(&table);
    let s_at = table.columns.iter().position(|c| c.name == "s").expect("s");
    rows[4][s_at] = text("nul \0 byte");
    let all = table_rows(&rows);
    match write(&t, &table, &all).await {
        Err(DbError::Rejected(_)) => {}
        other => panic!("expected a rejected row, got {other:?}"),
    }
    assert_eq!(t.db.count("copied").await.expect("count"), 0);
    let bad = find_rejected(&t.db, &table, &all).await.expect("search");
    assert_eq!(bad.iter().map(|(i, _)| *i).collect::<Vec<_>>(), vec![4]);
}
