//! `switchyard backfill` from a real MariaDB (OLD) into a real PostgreSQL
//! (NEW): every row equal to OLD's by content digest (and to the row as the
//! consumers bind it), a kill -9 mid-way resumed with every row exactly once,
//! a run beside live ingest writing the same rows with no duplicate and no
//! difference, rows NEW holds with other content reported and kept (replaced
//! with --overwrite), and configuration errors exiting 2.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use switchyard::db::digest::{canon_of_bound, digest, Digest};
use switchyard::db::keyset::{BackfillCheckpoint, TimeRange};
use switchyard::db::{row_values, Bound, Db, DbError, TableRows};
use switchyard::schema::{Schema, Table};

const TABLE: &str = "history";

/// The embedded configuration plus a table of every column type.
fn config_text() -> String {
    format!(
        "{}\n{}",
        switchyard::config::EMBEDDED,
        r#"
[[tables]]
name = "history"
key = "k"
time = "ts"
group = "g"
[tables.columns]
k = "string"
ts = "int"
g = "int"
big = "int?"
f = "float?"
ok = "bool?"
s = "string?"
u = "uuid?"
j = "json?"
"#
    )
}

struct Setup {
    _dir: tempfile::TempDir,
    config: PathBuf,
    schema: Schema,
    old: TestDb,
    new: TestDb,
}

impl Setup {
    async fn new() -> Setup {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("switchyard.toml");
        std::fs::write(&config, config_text()).expect("write config");
        let cfg = switchyard::config::PipelineConfig::load(Some(&config)).expect("config");
        let schema = cfg.schema().expect("schema");
        let old = TestDb::mariadb(&schema).await;
        let new = TestDb::postgres(&schema).await;
        Setup {
            _dir: dir,
            config,
            schema,
            old,
            new,
        }
    }

    fn table(&self) -> &Table {
        self.schema.table(TABLE).expect("declared")
    }

    /// `switchyard backfill --table history` between the two, with `extra`.
    fn args(&self, extra: &[&str]) -> Vec<String> {
        let mut a: Vec<String> = [
            "backfill",
            "--config",
            &self.config.display().to_string(),
            "--old-db-url",
            &self.old.url,
            "--new-db-url",
            &self.new.url,
            "--table",
            TABLE,
            "--progress",
            "log",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    }

    /// Runs a backfill to its end: exit code and standard output.
    fn run(&self, extra: &[&str]) -> (Option<i32>, String) {
        run_backfill(&self.args(extra))
    }

    async fn checkpoint(&self, range: TimeRange) -> Option<BackfillCheckpoint> {
        self.new
            .db
            .backfill_checkpoint(TABLE, range)
            .await
            .expect("read the checkpoint")
    }
}

fn run_backfill(args: &[String]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(args)
        .args(["--admin-listen", &format!("127.0.0.1:{}", free_port())])
        .env(
            "RUST_LOG",
            std::env::var("SWITCHYARD_TEST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .expect("run switchyard backfill");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// Row `i` of the history, as the router would have accepted it: keys of
/// mixed case and 4-byte UTF-8, NULLs, the integer extremes, awkward floats,
/// upper-case uuids, nested JSON.
fn history_row(i: u64) -> serde_json::Map<String, Value> {
    let key = match i % 4 {
        0 => format!("k-{i:06}"),
        1 => format!("K-{i:06}"),
        2 => format!("k-😀-{i:06}"),
        _ => format!("ü{i}"),
    };
    let big = match i % 5 {
        0 => json!(i64::MIN),
        1 => json!(i64::MAX),
        2 => Value::Null,
        _ => json!(i as i64 * -7),
    };
    let f = match i % 6 {
        0 => json!(0.1),
        1 => json!(1e300),
        2 => json!(-2.5e-300),
        3 => Value::Null,
        4 => json!(1.0 / 3.0),
        _ => json!(i as f64),
    };
    let mut row = json!({
        "k": key,
        "ts": 1_600_000_000 + i as i64,
        "g": (i % 7) as i64,
        "big": big,
        "f": f,
        "ok": if i.is_multiple_of(3) { Value::Null } else { json!(i.is_multiple_of(2)) },
        "s": if i.is_multiple_of(8) { Value::Null } else { json!(format!("tab\there \"quoted\" back\\slash\nnew 😀🎉 {i}")) },
        "u": if i.is_multiple_of(9) { Value::Null } else { json!(format!("ABCDEF01-2345-4789-8abc-{i:012x}").to_uppercase()) },
        "j": if i.is_multiple_of(10) { Value::Null } else { json!({"n": i, "a": [1, 2.5, null, "😀"], "o": {"z": true, "b": "x\ty"}, "big": 12345678901234u64}) },
    });
    row.as_object_mut().map(std::mem::take).expect("object")
}

/// Rows `range` as the consumers bind them.
fn bound_rows(table: &Table, range: std::ops::Range<u64>) -> Vec<Vec<Bound>> {
    range
        .map(|i| row_values(table, &history_row(i)).expect("a valid row"))
        .collect()
}

/// The position of column `name` (columns are in name order).
fn col(name: &str) -> usize {
    ["big", "f", "g", "j", "k", "ok", "s", "ts", "u"]
        .iter()
        .position(|c| *c == name)
        .expect("a column")
}

fn key_of(row: &[Bound]) -> String {
    match &row[col("k")] {
        Bound::Text(Some(k)) => k.clone(),
        other => panic!("the key is text: {other:?}"),
    }
}

/// Writes `rows` the way the pipelines do (`Db::write_batch`), retrying
/// transient errors (a deadlock with a concurrent writer is one).
async fn write_rows(db: &Db, table: &Table, rows: &[Vec<Bound>], batch: usize) -> (u64, u64) {
    let (mut inserted, mut duplicates) = (0, 0);
    for part in rows.chunks(batch) {
        let data = TableRows {
            rows: part.to_vec(),
            sources: Vec::new(),
        };
        loop {
            match db.write_batch(&[(table, &data)], &[], &[], None).await {
                Ok(w) => {
                    assert!(w[0].conflicts.is_empty(), "{:?}", w[0].conflicts);
                    inserted += w[0].inserted;
                    duplicates += w[0].duplicates;
                    break;
                }
                Err(e @ DbError::Unavailable(_)) => {
                    eprintln!("retrying a write: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("write: {e}"),
            }
        }
    }
    (inserted, duplicates)
}

/// Fills OLD with rows `0..n`, as the loader does.
async fn fill_old(s: &Setup, n: u64) -> Vec<Vec<Bound>> {
    let rows = bound_rows(s.table(), 0..n);
    let (inserted, _) = write_rows(&s.old.db, s.table(), &rows, 500).await;
    assert_eq!(inserted, n);
    rows
}

async fn digests(db: &Db, table: &Table, rows: &[Vec<Bound>]) -> HashMap<String, Digest> {
    let keys: Vec<String> = rows.iter().map(|r| key_of(r)).collect();
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    db.digests_of_keys(table, &refs).await.expect("digests")
}

/// Every row of `rows` is in NEW once, with OLD's content, which is also the
/// content the consumers would have stored for it.
async fn assert_new_equals_old(s: &Setup, rows: &[Vec<Bound>]) {
    let table = s.table();
    let names: Vec<&str> = table.columns.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names[col("k")], "k");
    assert_eq!(
        s.new.db.count(TABLE).await.expect("count NEW") as usize,
        rows.len(),
        "NEW holds each row once"
    );
    let old = digests(&s.old.db, table, rows).await;
    let new = digests(&s.new.db, table, rows).await;
    assert_eq!(old.len(), rows.len(), "OLD has every row");
    for r in rows {
        let k = key_of(r);
        let bound = digest(&canon_of_bound(table, r));
        assert_eq!(old.get(&k), Some(&bound), "OLD row {k} is what was sent");
        assert_eq!(new.get(&k), Some(&bound), "NEW row {k} equals OLD's");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfilled_table_equals_old_row_for_row() {
    let s = Setup::new().await;
    let rows = fill_old(&s, 3_000).await;
    let (code, out) = s.run(&["--chunk-rows", "700"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains(": done;"), "{out}");
    assert_new_equals_old(&s, &rows).await;
    let cp = s
        .checkpoint(TimeRange::default())
        .await
        .expect("a checkpoint");
    assert!(cp.done, "{cp:?}");
    assert_eq!((cp.copied, cp.duplicates, cp.conflicts), (3_000, 0, 0));
    // The highest key in OLD's (byte) order is the last one copied.
    let mut keys: Vec<String> = rows.iter().map(|r| key_of(r)).collect();
    keys.sort();
    assert_eq!(cp.last_key.as_deref(), keys.last().map(String::as_str));

    // A finished range is a no-op.
    let (code, out) = s.run(&["--chunk-rows", "700"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("already done"), "{out}");
    assert_eq!(s.checkpoint(TimeRange::default()).await, Some(cp));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_time_range_copies_its_rows_only_and_has_its_own_checkpoint() {
    let s = Setup::new().await;
    let rows = fill_old(&s, 1_000).await;
    let (from, to) = (1_600_000_100i64, 1_600_000_350i64);
    let (code, out) = s.run(&[
        "--from",
        &from.to_string(),
        "--to",
        &to.to_string(),
        "--chunk-rows",
        "64",
        "--no-copy",
    ]);
    assert_eq!(code, Some(0), "{out}");
    let inside: Vec<Vec<Bound>> = rows
        .iter()
        .filter(|r| matches!(r[col("ts")], Bound::Int(Some(t)) if t >= from && t < to))
        .cloned()
        .collect();
    assert_eq!(inside.len(), 250);
    assert_new_equals_old(&s, &inside).await;
    let range = TimeRange {
        from: Some(from),
        to: Some(to),
    };
    let cp = s.checkpoint(range).await.expect("the range's checkpoint");
    assert!(cp.done && cp.copied == 250, "{cp:?}");
    assert_eq!(s.checkpoint(TimeRange::default()).await, None);
    // The rest, through COPY: the range's rows are duplicates now.
    let (code, out) = s.run(&[]);
    assert_eq!(code, Some(0), "{out}");
    assert_new_equals_old(&s, &rows).await;
    let cp = s
        .checkpoint(TimeRange::default())
        .await
        .expect("checkpoint");
    assert_eq!((cp.copied, cp.duplicates, cp.conflicts), (750, 250, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_mid_way_it_resumes_with_every_row_exactly_once() {
    let s = Setup::new().await;
    let rows = fill_old(&s, 4_000).await;
    // Slowed down so that it is still running when killed.
    let args = s.args(&["--chunk-rows", "100", "--max-rows-per-sec", "400"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut role = Role::spawn(&args);
    eventually("a first checkpoint", Duration::from_secs(30), || async {
        s.checkpoint(TimeRange::default())
            .await
            .is_some_and(|c| c.copied > 0)
    })
    .await;
    assert!(role.metric("switchyard_backfill_chunks_total") >= 1.0);
    role.kill9();
    let cp = s
        .checkpoint(TimeRange::default())
        .await
        .expect("checkpoint");
    assert!(
        !cp.done && cp.copied < 4_000,
        "killed before the end: {cp:?}"
    );
    // What NEW holds is exactly what the checkpoint covers.
    assert_eq!(
        s.new.db.count(TABLE).await.expect("count") as u64,
        cp.copied
    );
    let (code, out) = s.run(&["--chunk-rows", "100"]);
    assert_eq!(code, Some(0), "{out}");
    assert_new_equals_old(&s, &rows).await;
    let end = s
        .checkpoint(TimeRange::default())
        .await
        .expect("checkpoint");
    assert!(end.done);
    // Each row copied once: none read again after the resume.
    assert_eq!((end.copied, end.duplicates), (4_000, 0), "{end:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beside_live_ingest_nothing_is_duplicated_or_different() {
    let s = Setup::new().await;
    let rows = fill_old(&s, 4_000).await;
    let table = s.table().clone();
    // Live ingest has some of the rows already, and writes the others while
    // the backfill runs, newest first (the opposite of the backfill's order).
    let (early, late) = rows.split_at(1_000);
    write_rows(&s.new.db, &table, early, 100).await;
    let mut late: Vec<Vec<Bound>> = late.to_vec();
    late.reverse();
    let ingest = {
        let (db, table) = (s.new.db.clone(), table.clone());
        tokio::spawn(async move { write_rows(&db, &table, &late, 50).await })
    };
    let args = s.args(&["--chunk-rows", "250"]);
    let backfill = tokio::task::spawn_blocking(move || run_backfill(&args));
    let (ingested, dup_ingest) = ingest.await.expect("ingest task");
    let (code, out) = backfill.await.expect("backfill task");
    assert_eq!(code, Some(0), "{out}");
    assert_new_equals_old(&s, &rows).await;
    let cp = s
        .checkpoint(TimeRange::default())
        .await
        .expect("checkpoint");
    assert!(cp.done);
    assert_eq!(cp.conflicts, 0, "{cp:?}");
    // Every row was inserted by exactly one of the two.
    assert_eq!(cp.copied + cp.duplicates, 4_000, "{cp:?}");
    assert_eq!(1_000 + ingested + cp.copied, 4_000, "{cp:?}");
    assert_eq!(ingested + dup_ingest, 3_000);
    assert!(cp.duplicates >= 1_000, "{cp:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_with_other_content_is_reported_and_kept_unless_overwrite() {
    let s = Setup::new().await;
    let table = s.table().clone();
    let rows = fill_old(&s, 200).await;
    // NEW holds row 7 with other content, and row 8 as OLD has it.
    let mut changed = rows[7].clone();
    changed[col("g")] = Bound::Int(Some(42));
    write_rows(&s.new.db, &table, &[changed.clone(), rows[8].clone()], 10).await;
    let key = key_of(&rows[7]);
    let theirs = digest(&canon_of_bound(&table, &changed));
    let ours = digest(&canon_of_bound(&table, &rows[7]));

    let (code, out) = s.run(&["--chunk-rows", "50"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("1 conflicts (0 overwritten)"), "{out}");
    assert!(
        out.contains(&format!("\n  {key}\n")),
        "the key is named: {out}"
    );
    let cp = s
        .checkpoint(TimeRange::default())
        .await
        .expect("checkpoint");
    assert_eq!(
        (cp.copied, cp.duplicates, cp.conflicts, cp.overwritten),
        (198, 1, 1, 0)
    );
    let got = digests(&s.new.db, &table, &rows[7..8]).await;
    assert_eq!(got.get(&key), Some(&theirs), "NEW's row is left alone");

    // --overwrite replaces it (--restart: the range was done).
    let (code, out) = s.run(&["--chunk-rows", "50", "--overwrite", "--restart"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("1 conflicts (1 overwritten)"), "{out}");
    assert!(out.contains(&format!("\n  {key}\n")), "{out}");
    let got = digests(&s.new.db, &table, &rows[7..8]).await;
    assert_eq!(got.get(&key), Some(&ours), "replaced with OLD's version");
    assert_new_equals_old(&s, &rows).await;
    let cp = s
        .checkpoint(TimeRange::default())
        .await
        .expect("checkpoint");
    assert_eq!((cp.copied, cp.duplicates, cp.overwritten), (1, 199, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configuration_errors_exit_2() {
    let s = Setup::new().await;
    let mut unknown = s.args(&[]);
    let i = unknown.iter().position(|a| a == TABLE).expect("table arg");
    unknown[i] = "nope".into();
    assert_eq!(run_backfill(&unknown).0, Some(2));
    let bad_url = s.args(&[]).into_iter().map(|a| {
        if a == s.old.url {
            "ftp://x/y".to_string()
        } else {
            a
        }
    });
    assert_eq!(run_backfill(&bad_url.collect::<Vec<_>>()).0, Some(2));
    let denied = s.args(&[]).into_iter().map(|a| {
        if a == s.old.url {
            a.replace("root@", "no_such_user_sy:wrong@")
        } else {
            a
        }
    });
    assert_eq!(run_backfill(&denied.collect::<Vec<_>>()).0, Some(2));
    let (code, _) = s.run(&["--from", "10", "--to", "5"]);
    assert_eq!(code, Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_new_cannot_take_are_dead_lettered_and_the_rest_copied() {
    let s = Setup::new().await;
    let table = s.table().clone();
    let mut rows = fill_old(&s, 300).await;
    // A NUL character, which MariaDB stores and PostgreSQL refuses, and a
    // NULL where the declaration says there is always a value.
    let mut nul = bound_rows(&table, 1_000..1_001).remove(0);
    nul[col("s")] = Bound::Text(Some("before\0after".into()));
    write_rows(&s.old.db, &table, &[nul.clone()], 1).await;
    s.old.exec("ALTER TABLE history MODIFY g BIGINT NULL").await;
    s.old
        .exec("INSERT INTO history (k, ts, g) VALUES ('no-group', 1600000000, NULL)")
        .await;
    let (code, out) = s.run(&["--chunk-rows", "64"]);
    assert_eq!(code, Some(0), "{out}");
    let cp = s
        .checkpoint(TimeRange::default())
        .await
        .expect("checkpoint");
    assert!(cp.done);
    assert_eq!((cp.copied, cp.rejected), (300, 2), "{cp:?}");
    let mut dead: Vec<(String, String)> = s
        .new
        .db
        .dead_letters()
        .await
        .expect("dead letters")
        .into_iter()
        .map(|d| (d.source, d.reason))
        .collect();
    dead.sort();
    assert_eq!(dead.len(), 2, "{dead:?}");
    assert_eq!(dead[0].0, format!("backfill:history:{}", key_of(&nul)));
    assert_eq!(dead[1].0, "backfill:history:no-group");
    assert!(dead[1].1.contains("column g"), "{dead:?}");
    rows.sort_by_key(|r| key_of(r));
    assert_new_equals_old(&s, &rows).await;
}

/// Neither `--help` with every secret-bearing variable set nor a run whose
/// database URLs carry passwords (refused by MariaDB, at debug level) shows
/// a password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_in_help_logs_or_errors() {
    const OLD_SECRET: &str = "Pl4nted-old-S3cret";
    const NEW_SECRET: &str = "Pl4nted-new-S3cret";
    let old = format!("mysql://root:{OLD_SECRET}@127.0.0.1:3306/test");
    let new = format!("postgres://postgres:{NEW_SECRET}@127.0.0.1:5432/test");
    let help = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["backfill", "--help"])
        .env("SWITCHYARD_OLD_DB_URL", &old)
        .env("SWITCHYARD_NEW_DB_URL", &new)
        .output()
        .expect("backfill --help");
    assert!(help.status.success());
    let dir = tempfile::tempdir().expect("tempdir");
    let password_file = dir.path().join("new-password");
    std::fs::write(&password_file, format!("{NEW_SECRET}\n")).expect("write");
    let run = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["backfill", "--table", "raw_item", "--old-db-url", &old])
        .args(["--new-db-url", "postgres://postgres@127.0.0.1:5432/test"])
        .arg("--new-db-password-file")
        .arg(&password_file)
        .args(["--admin-listen", "127.0.0.1:0"])
        .env("RUST_LOG", "debug")
        .env("NO_COLOR", "1")
        .output()
        .expect("backfill");
    assert_eq!(run.status.code(), Some(2), "refused by MariaDB");
    for out in [help, run] {
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        for secret in [OLD_SECRET, NEW_SECRET] {
            assert!(!text.contains(secret), "shows {secret}:\n{text}");
        }
    }
}
