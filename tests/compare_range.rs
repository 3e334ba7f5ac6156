//! `compare --range` against a real MariaDB (OLD) and PostgreSQL (NEW),
//! without Kafka: 200k equal rows are equal, then one row deleted, one
//! added and one changed by a byte are each named with exact counts; a time
//! range that excludes them is equal; values of every type that the engines
//! store in their own forms (NULLs, 4-byte UTF-8, edge integers, upper-case
//! UUIDs, JSON in another key order, -0) compare equal; usage and
//! configuration errors exit 2.

mod common;

use common::*;
use serde_json::Value;
use switchyard::config::PipelineConfig;

/// Time of row `i`.
const T0: i64 = 1_700_000_000;

/// `switchyard compare --range --json <args>` against OLD and NEW: the exit
/// code and the report.
fn range(old: &str, new: &str, config: Option<&std::path::Path>, args: &[&str]) -> (i32, Value) {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"));
    c.args([
        "compare",
        "--range",
        "--json",
        "--old-db-url",
        old,
        "--new-db-url",
        new,
    ])
    .args(args)
    .env("RUST_LOG", "warn");
    if let Some(p) = config {
        c.arg("--config").arg(p);
    }
    let out = c.output().expect("run compare --range");
    let code = out.status.code().unwrap_or(-1);
    let text = String::from_utf8_lossy(&out.stdout);
    let report = serde_json::from_str(&text).unwrap_or(Value::Null);
    if report.is_null() && code < 2 {
        panic!(
            "compare --range printed no report (exit {code}): {text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    (code, report)
}

/// Rows `[start, end)` of raw_item as multi-row INSERTs of 5,000 (columns
/// in name order: billable, body, project_id, timestamp, uuid, version).
fn raw_item_inserts(mysql: bool, start: u64, end: u64) -> Vec<String> {
    let ts = if mysql {
        "`timestamp`"
    } else {
        "\"timestamp\""
    };
    let mut out = Vec::new();
    let mut i = start;
    while i < end {
        let stop = (i + 5_000).min(end);
        let values: Vec<String> = (i..stop)
            .map(|n| {
                format!(
                    "({}, 'body {n} ünïcode 😀 {}', {}, {}, '{}', {})",
                    n % 2,
                    "x".repeat((n % 40) as usize),
                    n % 173,
                    T0 + n as i64,
                    uuid_for(n % 173, n),
                    n % 7
                )
            })
            .collect();
        out.push(format!(
            "INSERT INTO raw_item (billable, body, project_id, {ts}, uuid, version) VALUES {}",
            values.join(", ")
        ));
        i = stop;
    }
    out
}

fn ids(v: &Value, field: &str) -> Vec<String> {
    v[field]
        .as_array()
        .unwrap_or_else(|| panic!("{field} in {v}"))
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_names_each_missing_extra_and_differing_row_of_200k() {
    const N: u64 = 200_000;
    let schema = PipelineConfig::load(None).unwrap().schema().unwrap();
    let old = TestDb::mariadb(&schema).await;
    let new = TestDb::postgres(&schema).await;
    for s in raw_item_inserts(true, 0, N) {
        old.exec(&s).await;
    }
    for s in raw_item_inserts(false, 0, N) {
        new.exec(&s).await;
    }
    assert_eq!(old.count().await, N as i64);
    assert_eq!(new.count().await, N as i64);

    let (code, r) = range(&old.url, &new.url, None, &["--table", "raw_item"]);
    assert_eq!(code, 0, "{r}");
    assert_eq!(r["status"], "equal");
    assert_eq!(r["hashing"], "sql");
    assert_eq!(r["rows_old"], N);
    assert_eq!(r["rows_new"], N);
    assert_eq!(r["missing"], 0);

    // NEW loses one row, gains one, and one row's body changes by a byte.
    let gone = uuid_for(1_000 % 173, 1_000);
    let changed = uuid_for(150_000 % 173, 150_000);
    let extra = uuid_for(5, 9_999_999);
    new.exec(&format!("DELETE FROM raw_item WHERE uuid = '{gone}'"))
        .await;
    new.exec(&format!(
        "UPDATE raw_item SET body = 'B' || substr(body, 2) WHERE uuid = '{changed}'"
    ))
    .await;
    new.exec(&format!(
        "INSERT INTO raw_item (billable, body, project_id, \"timestamp\", uuid, version) \
         VALUES (0, 'late', 5, {}, '{extra}', 1)",
        T0 + 100
    ))
    .await;

    let (code, r) = range(
        &old.url,
        &new.url,
        None,
        &["--table", "raw_item", "--max-ids", "10"],
    );
    assert_eq!(code, 1, "{r}");
    assert_eq!(r["status"], "differs");
    assert_eq!(
        (r["rows_old"].as_u64(), r["rows_new"].as_u64()),
        (Some(N), Some(N))
    );
    assert_eq!(
        (
            r["missing"].as_u64(),
            r["extra"].as_u64(),
            r["differs"].as_u64()
        ),
        (Some(1), Some(1), Some(1)),
        "{r}"
    );
    assert_eq!(ids(&r, "missing_ids"), vec![gone.clone()]);
    assert_eq!(ids(&r, "extra_ids"), vec![extra.clone()]);
    assert_eq!(ids(&r, "differing_ids"), vec![changed.clone()]);
    // Only the differing segments were streamed.
    assert!(r["segments"].as_u64().unwrap() > 1, "{r}");
    assert!(r["streamed_old"].as_u64().unwrap() < N / 4, "{r}");

    // A time range without the three is equal; one with only the change names it.
    let t = |n: i64| (T0 + n).to_string();
    let (code, r) = range(
        &old.url,
        &new.url,
        None,
        &[
            "--table",
            "raw_item",
            "--from",
            &t(160_000),
            "--to",
            &t(200_000),
        ],
    );
    assert_eq!(code, 0, "{r}");
    assert_eq!(r["rows_old"], 40_000);
    let (code, r) = range(
        &old.url,
        &new.url,
        None,
        &[
            "--table",
            "raw_item",
            "--from",
            &t(140_000),
            "--to",
            &t(160_000),
        ],
    );
    assert_eq!(code, 1, "{r}");
    assert_eq!(
        (
            r["missing"].as_u64(),
            r["extra"].as_u64(),
            r["differs"].as_u64()
        ),
        (Some(0), Some(0), Some(1))
    );

    // A key range: the keys of account 5 hold the extra row only.
    let (code, r) = range(
        &old.url,
        &new.url,
        None,
        &[
            "--table",
            "raw_item",
            "--key-from",
            &uuid_for(5, 0).to_uppercase(),
            "--key-to",
            &uuid_for(6, 0),
        ],
    );
    assert_eq!(code, 1, "{r}");
    assert_eq!(ids(&r, "extra_ids"), vec![extra]);
    assert_eq!(
        (r["missing"].as_u64(), r["differs"].as_u64()),
        (Some(0), Some(0))
    );
    assert_eq!(
        r["rows_new"].as_u64(),
        r["rows_old"].as_u64().map(|n| n + 1)
    );

    // Usage and configuration errors exit 2, never retried.
    assert_eq!(range(&old.url, &new.url, None, &["--table", "nope"]).0, 2);
    assert_eq!(
        range(
            &old.url,
            &new.url,
            None,
            &["--table", "raw_item", "--key-from", "12"]
        )
        .0,
        2
    );
    let bad_user = "mysql://nobody:wrong@127.0.0.1:3306/test";
    assert_eq!(
        range(bad_user, &new.url, None, &["--table", "raw_item"]).0,
        2
    );
    assert_eq!(
        range(&old.url, "ftp://nowhere", None, &["--table", "raw_item"]).0,
        2
    );
}

/// Three tables of every type, stored by each engine in its own form.
const MIXED: &str = r#"
[[tables]]
name = "kinds"
key = "k"
time = "ts"
group = "ts"
[tables.columns]
k = "int"
ts = "int"
n = "int?"
s = "string?"
u = "uuid?"
b = "bool?"

[[tables]]
name = "docs"
key = "k"
time = "ts"
group = "ts"
[tables.columns]
k = "uuid"
ts = "int"
j = "json?"
f = "float?"
s = "string?"

[[tables]]
name = "names"
key = "k"
time = "ts"
group = "ts"
[tables.columns]
k = "string"
ts = "int"
v = "int"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_each_engine_stores_in_its_own_form_compare_equal() {
    let dirs = Dirs::new();
    let text = format!("{}\n{MIXED}", include_str!("../config/switchyard.toml"));
    let path = dirs.root.path().join("mixed.toml");
    std::fs::write(&path, text).unwrap();
    let schema = PipelineConfig::load(Some(&path)).unwrap().schema().unwrap();
    let old = TestDb::mariadb(&schema).await;
    let new = TestDb::postgres(&schema).await;

    // kinds: columns b, k, n, s, ts, u. Upper-case UUIDs in OLD.
    let u = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d";
    let kinds = |mysql: bool| {
        let (t, f, uu) = if mysql {
            ("1", "0", u.to_uppercase())
        } else {
            ("true", "false", u.to_string())
        };
        format!(
            "INSERT INTO kinds (b, k, n, s, ts, u) VALUES \
             (NULL, 1, NULL, NULL, 1, NULL), \
             ({t}, 2, {min}, '', 2, '{uu}'), \
             ({f}, 3, {max}, '😀𝄞 é ', 3, NULL), \
             ({t}, {min}, 0, 'N', 4, NULL), \
             ({f}, {max}, -1, ':', 5, '{uu}')",
            min = i64::MIN,
            max = i64::MAX
        )
    };
    old.exec(&kinds(true)).await;
    new.exec(&kinds(false)).await;

    // docs: columns f, j, k, s, ts. JSON keys in another order, spaced
    // otherwise; -0 and 0; 1.0 and 1.
    let docs = |mysql: bool| {
        let (j1, j2, z) = if mysql {
            (
                r#"{"b": [1.0, 2, {"d": true, "c": "x"}], "a": null}"#,
                r#"[1, "😀"]"#,
                "-0.0",
            )
        } else {
            (
                r#"{"a":null,"b":[1,2,{"c":"x","d":true}]}"#,
                r#"[1,"😀"]"#,
                "0.0",
            )
        };
        format!(
            "INSERT INTO docs (f, j, k, s, ts) VALUES \
             ({z}, '{j1}', 'b7e2d2a8-0000-4000-8000-000000000001', NULL, 1), \
             (0.1, '{j2}', 'b7e2d2a8-0000-4000-8000-000000000002', '', 2), \
             (NULL, NULL, 'b7e2d2a8-0000-4000-8000-000000000003', 'x', 3), \
             (1e300, '\"s\"', 'b7e2d2a8-0000-4000-8000-000000000004', NULL, 4)"
        )
    };
    old.exec(&docs(true)).await;
    new.exec(&docs(false)).await;

    // names: 20,000 string keys (above the streaming threshold, so they
    // are split), some differing only in case, accents or trailing spaces.
    let specials = ["a", "a ", "A", "á", "😀", "user-", "b\t", "~"];
    let names = |i: u64| -> String {
        let mut v: Vec<String> = (i..(i + 5_000).min(20_000))
            .map(|n| format!("('user-{n:05}', {n}, {})", n * 3))
            .collect();
        if i == 0 {
            v.extend(
                specials
                    .iter()
                    .enumerate()
                    .map(|(n, s)| format!("('{s}', {n}, {n})")),
            );
        }
        format!("INSERT INTO names (k, ts, v) VALUES {}", v.join(", "))
    };
    for i in (0..20_000).step_by(5_000) {
        old.exec(&names(i)).await;
        new.exec(&names(i)).await;
    }

    let cfg = Some(path.as_path());
    let (code, r) = range(&old.url, &new.url, cfg, &["--table", "kinds"]);
    assert_eq!(
        (code, &r["hashing"], &r["rows_old"]),
        (0, &Value::from("sql"), &Value::from(5)),
        "{r}"
    );
    let (code, r) = range(&old.url, &new.url, cfg, &["--table", "docs"]);
    assert_eq!(
        (code, &r["hashing"], &r["rows_new"]),
        (0, &Value::from("process"), &Value::from(4)),
        "{r}"
    );
    let (code, r) = range(&old.url, &new.url, cfg, &["--table", "names"]);
    assert_eq!((code, &r["rows_old"]), (0, &Value::from(20_008)), "{r}");

    // NULL is not the empty string, a trailing space counts, and a JSON
    // value changed inside is found.
    new.exec("UPDATE kinds SET s = NULL WHERE k = 2").await;
    new.exec("UPDATE docs SET j = '[1, \"x\"]' WHERE ts = 2")
        .await;
    new.exec("UPDATE names SET v = 7 WHERE k = 'a '").await;
    for (table, key) in [
        ("kinds", "2"),
        ("docs", "b7e2d2a8-0000-4000-8000-000000000002"),
        ("names", "a "),
    ] {
        let (code, r) = range(&old.url, &new.url, cfg, &["--table", table]);
        assert_eq!(code, 1, "{table}: {r}");
        if table == "names" {
            // Split below the root (the string keys' boundaries), then merged.
            assert!(r["segments"].as_u64().unwrap() > 1, "{r}");
            assert!(r["streamed_new"].as_u64().unwrap() < 20_008, "{r}");
        }
        assert_eq!(
            ids(&r, "differing_ids"),
            vec![key.to_string()],
            "{table}: {r}"
        );
        assert_eq!(
            (r["missing"].as_u64(), r["extra"].as_u64()),
            (Some(0), Some(0)),
            "{table}"
        );
    }
}
