//! What both pipelines store is what was sent: duplicates and conflicts told
//! apart on every engine (and handled by the table's `on_conflict`, the same
//! in `load` and `ingest`), JSON numbers of any precision byte for byte,
//! dead letters recorded once with their batch, and checkpoints that keep
//! apart files of different loaders and names that differ only in case.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;
use switchyard::admin::Health;
use switchyard::config::PipelineConfig;
use switchyard::db::{row_values, Db, TableRows, Written};
use switchyard::ingest::{self, IngestMetrics, IngestOptions};
use switchyard::load::{self, LoadMetrics, LoadOptions, LoadSummary};
use switchyard::schema::{Schema, Table, TableConfig};
use tokio_util::sync::CancellationToken;

fn table_config(name: &str, on_conflict: &str) -> TableConfig {
    toml::from_str(&format!(
        r#"
        name = "{name}"
        key = "k"
        time = "ts"
        group = "g"
        on_conflict = "{on_conflict}"
        [columns]
        k = "string"
        ts = "int"
        g = "int"
        body = "string"
        j = "json?"
        "#
    ))
    .expect("table config")
}

fn schema() -> Schema {
    Schema::from_config(&[
        table_config("kept", "keep-first"),
        table_config("replaced", "last-write-wins"),
    ])
    .expect("schema")
}

fn rows(table: &Table, rows: &[(&str, &str)], sources: &[&str]) -> TableRows {
    let mut out = TableRows::default();
    for (i, (k, body)) in rows.iter().enumerate() {
        let r = json!({"k": k, "ts": 1, "g": 1, "body": body, "j": {"n": i}});
        let values = row_values(table, r.as_object().expect("object")).expect("values");
        match sources.get(i) {
            Some(s) => out.push(values, s.to_string()),
            None => out.rows.push(values),
        }
    }
    out
}

async fn write(db: &Db, table: &Table, data: &TableRows) -> Written {
    db.write_batch(&[(table, data)], &[], &[], None)
        .await
        .expect("write")
        .remove(0)
}

async fn body_of(db: &Db, table: &Table, key: &str) -> Option<String> {
    // The comparator's own read: key → content digest; compared with the
    // digest of the row as it was sent.
    let got = db.digests_of_keys(table, &[key]).await.expect("read back");
    got.get(key).map(|d| format!("{d:032x}"))
}

fn digest_of(table: &Table, data: &TableRows, i: usize) -> String {
    use switchyard::db::digest::{canon_of_bound, digest};
    format!("{:032x}", digest(&canon_of_bound(table, &data.rows[i])))
}

/// On MySQL/MariaDB the driver reports a duplicate as an affected row, so
/// before this was counted apart every duplicate was "inserted"; a second
/// version of a stored key was skipped without a word.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_and_conflicts_are_told_apart_on_every_engine() {
    let schema = schema();
    let kept = schema.table("kept").expect("kept").clone();
    let replaced = schema.table("replaced").expect("replaced").clone();
    let dir = tempfile::tempdir().expect("tempdir");
    let pg = TestDb::postgres(&schema).await;
    let my = TestDb::mariadb(&schema).await;
    let lite =
        Db::connect(&format!("sqlite:{}", dir.path().join("c.db").display()), 2).expect("sqlite");
    lite.init(&schema).await.expect("sqlite init");
    for (engine, db) in [("postgres", &pg.db), ("mariadb", &my.db), ("sqlite", &lite)] {
        for table in [&kept, &replaced] {
            let first = rows(table, &[("a", "one"), ("b", "two")], &["f:0", "f:1"]);
            let w = write(db, table, &first).await;
            assert_eq!((w.inserted, w.duplicates), (2, 0), "{engine}: {w:?}");
            assert!(w.conflicts.is_empty(), "{engine}: {w:?}");

            // The same rows again (a redelivery): duplicates, nothing else.
            let w = write(db, table, &first).await;
            assert_eq!((w.inserted, w.duplicates), (0, 2), "{engine}: {w:?}");
            assert!(w.conflicts.is_empty(), "{engine}: {w:?}");

            // A second version of "a" beside a new row, then two versions of
            // one new key in one batch.
            let second = rows(
                table,
                &[("a", "ONE"), ("c", "three"), ("d", "four"), ("d", "FOUR")],
                &["g:0", "g:1", "g:2", "g:3"],
            );
            let w = write(db, table, &second).await;
            assert_eq!((w.inserted, w.duplicates), (2, 0), "{engine}: {w:?}");
            let keys: Vec<(&str, &str, bool)> = w
                .conflicts
                .iter()
                .map(|c| (c.key.as_str(), c.source.as_str(), c.replaced))
                .collect();
            let lww = table.name == "replaced";
            assert_eq!(
                keys,
                vec![("a", "g:0", lww), ("d", "g:3", lww)],
                "{engine} {}",
                table.name
            );
            let (a_wins, d_wins) = if lww { (0, 3) } else { (0, 2) };
            let want_a = if lww {
                digest_of(table, &second, a_wins)
            } else {
                digest_of(table, &first, a_wins)
            };
            assert_eq!(
                body_of(db, table, "a").await,
                Some(want_a),
                "{engine} {}",
                table.name
            );
            assert_eq!(
                body_of(db, table, "d").await,
                Some(digest_of(table, &second, d_wins)),
                "{engine} {}",
                table.name
            );
            // Delivered again: the conflicts are found again, and recorded once.
            let w = write(db, table, &second).await;
            assert_eq!(w.inserted, 0, "{engine}: {w:?}");
            if !lww {
                assert_eq!(w.conflicts.len(), 2, "{engine}: {w:?}");
            }
        }
        // Keep-first records each refused version in the dead-letter table,
        // under its source, once; last-write-wins refuses nothing.
        let dead = db.dead_letters().await.expect("dead letters");
        let mut sources: Vec<&str> = dead.iter().map(|d| d.source.as_str()).collect();
        sources.sort();
        assert_eq!(sources, vec!["g:0", "g:3"], "{engine}: {dead:?}");
        for d in &dead {
            assert!(
                d.reason.contains("conflict") && d.reason.contains("table kept"),
                "{engine}: {}",
                d.reason
            );
            let refused: serde_json::Value = serde_json::from_str(&d.payload).expect("json");
            assert!(
                refused["body"] == "ONE" || refused["body"] == "FOUR",
                "{engine}: {refused}"
            );
        }
    }
}

fn doc_config(dirs: &Dirs, topic: &str) -> PipelineConfig {
    let mut cfg = config(dirs, topic);
    cfg.tables = vec![toml::from_str(
        r#"
        name = "doc"
        key = "k"
        time = "ts"
        group = "g"
        [columns]
        k = "uuid"
        ts = "int"
        g = "int"
        j = "json"
        "#,
    )
    .expect("doc table")];
    cfg
}

fn load_opts(dir: &std::path::Path, loader: &str) -> LoadOptions {
    LoadOptions {
        dir: dir.to_path_buf(),
        batch_size: 100,
        batch_bytes: 8 << 20,
        archive_dir: None,
        loader_id: loader.to_string(),
        poll: Duration::from_millis(50),
        once: true,
        progress: false,
    }
}

async fn load_once(opts: LoadOptions, schema: &Schema, db: &Db) -> (LoadSummary, f64) {
    let registry = prometheus::Registry::new();
    let metrics = LoadMetrics::new(&registry).expect("metrics");
    let s = load::run(opts, schema, db, None, metrics, CancellationToken::new())
        .await
        .expect("load");
    let kept = metric_value(
        &registry,
        "switchyard_load_conflicts_total",
        &[("table", "doc"), ("resolution", "kept")],
    );
    (s, kept)
}

/// The digits of a JSON column stored in each database.
async fn stored_json(t: &TestDb) -> Vec<String> {
    use sqlx::Connection;
    let q = if t.url.starts_with("postgres") {
        "SELECT j::text FROM doc ORDER BY k"
    } else {
        "SELECT CAST(j AS CHAR) FROM doc ORDER BY k"
    };
    if t.url.starts_with("postgres") {
        let mut c = sqlx::PgConnection::connect(&t.url).await.expect("connect");
        sqlx::query_scalar(q)
            .fetch_all(&mut c)
            .await
            .expect("select")
    } else {
        let mut c = sqlx::MySqlConnection::connect(&t.url)
            .await
            .expect("connect");
        sqlx::query_scalar(q)
            .fetch_all(&mut c)
            .await
            .expect("select")
    }
}

/// A 30-digit integer and 31-digit decimals in a JSON column, through the
/// router, the offline file and `load` into MariaDB, and through Kafka and
/// `ingest` into PostgreSQL: the digits arrive as sent (a `serde_json::Value`
/// on the way made `1.2345678901234568e29` of them). Then a second version
/// of one key through both pipelines: each keeps the first and counts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_numbers_of_any_precision_arrive_exactly_and_conflicts_count_in_both_pipelines() {
    let broker = Broker::start();
    let topic = unique("exact");
    create_topic(&broker.brokers(), &topic, 2).await;
    let dirs = Dirs::new();
    let cfg = doc_config(&dirs, &topic);
    let schema = cfg.schema().expect("schema");
    let old = TestDb::mariadb(&schema).await;
    let new = TestDb::postgres(&schema).await;
    set_flag(&dirs.flags, "switchyard-dual-write", json!(100));
    let router = InProcess::start(cfg.clone(), &broker.brokers()).await;

    const BIG: &str = "123456789012345678901234567890";
    const DEC: &str = "0.1234567890123456789012345678901";
    const NEG: &str = "-98765432109876543210.123456789";
    let key = "bad3a155-0000-4000-8000-000000000001";
    // Written by hand: a serde_json::Value here would round them itself.
    let body = format!(
        "{{\"account_id\":7,\"table\":\"doc\",\"row\":{{\"k\":\"{key}\",\"ts\":1,\"g\":1,\
         \"j\":{{\"big\": {BIG}, \"dec\": {DEC}, \"list\": [{NEG}, 1.0]}}}}}}\n"
    );
    let (status, answer) = post_ndjson(&router.url(), body).await;
    assert_eq!(status, 200, "{answer}");
    // The same key with other content.
    let again = format!(
        "{{\"account_id\":7,\"table\":\"doc\",\"row\":{{\"k\":\"{key}\",\"ts\":1,\"g\":1,\"j\":{{\"big\": 1}}}}}}\n"
    );
    let (status, answer) = post_ndjson(&router.url(), again).await;
    assert_eq!(status, 200, "{answer}");
    router.stop().await;

    let (loaded, kept) = load_once(load_opts(&dirs.offline, "exact"), &schema, &old.db).await;
    assert_eq!((loaded.inserted, loaded.conflicts), (1, 1), "{loaded:?}");
    assert_eq!(kept, 1.0);

    let registry = prometheus::Registry::new();
    let metrics = IngestMetrics::new(&registry).expect("metrics");
    let ingested = tokio::time::timeout(
        Duration::from_secs(90),
        ingest::run(
            IngestOptions {
                brokers: broker.brokers(),
                topics: vec![topic.clone()],
                group: unique("g"),
                batch_size: 100,
                batch_bytes: 8 << 20,
                consumer_timeout: Duration::from_millis(150),
                extra: vec![],
                idle_exit: Some(Duration::from_secs(2)),
            },
            &schema,
            &new.db,
            metrics,
            Health::default(),
            CancellationToken::new(),
        ),
    )
    .await
    .expect("ingest went idle")
    .expect("ingest");
    assert_eq!(
        (ingested.inserted, ingested.conflicts),
        (1, 1),
        "{ingested:?}"
    );
    assert_eq!(
        metric_value(
            &registry,
            "switchyard_ingest_conflicts_total",
            &[("table", "doc"), ("resolution", "kept")]
        ),
        1.0
    );

    for db in [&old, &new] {
        let stored = stored_json(db).await;
        assert_eq!(stored.len(), 1, "{}: {stored:?}", db.url);
        for digits in [BIG, DEC, NEG] {
            assert!(
                stored[0].contains(digits),
                "{}: {digits} not in {}",
                db.url,
                stored[0]
            );
        }
        // The first version was kept; the second is in the dead letters.
        let dead = db.db.dead_letters().await.expect("dead letters");
        assert_eq!(dead.len(), 1, "{}: {dead:?}", db.url);
        assert!(dead[0].reason.contains("conflict"), "{}", dead[0].reason);
        assert!(
            dead[0].payload.contains(r#""big":1"#),
            "{}",
            dead[0].payload
        );
    }
}

/// Two routers' folders may hold files of the same name, and one folder may
/// hold names that differ only in case: each file keeps its own checkpoint
/// (by loader identity and exact name), so every line of each is loaded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_keep_apart_loaders_and_names_that_differ_in_case() {
    let dirs_a = Dirs::new();
    let dirs_b = Dirs::new();
    let cfg = config(&dirs_a, "unused");
    let schema = cfg.schema().expect("schema");
    let old = TestDb::mariadb(&schema).await;
    let lines = |from: u64, n: u64| -> String {
        (from..from + n)
            .map(|i| {
                let e = envelope(i, 500 + i, 20);
                format!(
                    "{}\n",
                    json!({"table":"raw_item","row":e["row"],"counter":i})
                )
            })
            .collect()
    };
    let name = "offline-0000000000000001-000001.ndjson";
    // Host A's file; host B has a file of the same name, longer; folder A
    // also holds a name that differs from the first only in case.
    let text_a = lines(0, 10);
    write_closed_file(&dirs_a.offline, name, &text_a);
    write_closed_file(&dirs_b.offline, name, &lines(100, 25));
    let upper = "OFFLINE-0000000000000001-000001.ndjson";
    write_closed_file(&dirs_a.offline, upper, &lines(200, 7));

    // Loader A committed its first batch of 4 lines before it stopped: the
    // rows and the checkpoint, as `load` writes them.
    let table = schema.table("raw_item").expect("table");
    let mut first = TableRows::default();
    let mut offset = 0;
    for line in text_a.lines().take(4) {
        let v: serde_json::Value = serde_json::from_str(line).expect("line");
        first
            .rows
            .push(row_values(table, v["row"].as_object().expect("row")).expect("values"));
        offset += line.len() as u64 + 1;
    }
    old.db
        .write_batch(
            &[(table, &first)],
            &[],
            &[],
            Some(&switchyard::db::CheckpointUpdate {
                loader: "host-a".into(),
                file: name.into(),
                from: None,
                to: offset,
                lines: 4,
                done: false,
            }),
        )
        .await
        .expect("first batch");

    // Host B's file of the same name is not host A's: all of it loads.
    let (b, _) = load_once(load_opts(&dirs_b.offline, "host-b"), &schema, &old.db).await;
    assert_eq!(b.lines, 25, "{b:?}");
    // Folder A: the upper-case name from its start, the other from its checkpoint.
    let (a, _) = load_once(load_opts(&dirs_a.offline, "host-a"), &schema, &old.db).await;
    assert_eq!(a.lines, 7 + 6, "{a:?}");
    assert_eq!(old.count().await, 42);
}

/// A column added to the configuration: before, `db init` said
/// "initialised" and added nothing, the roles started, and every insert
/// failed with "undefined column", retried forever while `/readyz` said
/// ready. Now the start-up check names it with the `ALTER TABLE` to run,
/// `db migrate --apply` adds it, and a column dropped under a running role
/// stops it (a configuration error) instead of being retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_column_added_to_the_configuration_is_reported_then_migrated_on_every_engine() {
    let before = schema();
    let after_config = |name: &str| -> TableConfig {
        let mut t = table_config(name, "keep-first");
        t.columns.insert("note".into(), "string?".into());
        t
    };
    let after =
        Schema::from_config(&[after_config("kept"), after_config("replaced")]).expect("schema");
    let dir = tempfile::tempdir().expect("tempdir");
    let lite_path = dir.path().join("m.db");
    let pg = TestDb::postgres(&before).await;
    let my = TestDb::mariadb(&before).await;
    let lite_url = format!("sqlite:{}", lite_path.display());
    let lite = Db::connect(&lite_url, 2).expect("sqlite");
    lite.init(&before).await.expect("sqlite init");
    for (engine, db, url) in [
        ("postgres", &pg.db, pg.url.as_str()),
        ("mariadb", &my.db, my.url.as_str()),
        ("sqlite", &lite, lite_url.as_str()),
    ] {
        // `db init` creates nothing new and reports the same as a role's start.
        db.init(&after).await.expect("init");
        let err = db
            .check_tables(&after, url)
            .await
            .expect_err("the missing column is found");
        let text = err.to_string();
        assert!(err.is_config(), "{engine}: {text}");
        assert!(
            text.contains("table kept: column note is declared but missing; run: ALTER TABLE")
                && text.contains("ADD COLUMN")
                && text.contains("db migrate --apply"),
            "{engine}: {text}"
        );
        let applied = db.add_missing_columns(&after).await.expect("migrate");
        assert_eq!(applied.len(), 2, "{engine}: {applied:?}");
        db.check_tables(&after, url)
            .await
            .expect("the tables match now");
        assert!(db
            .add_missing_columns(&after)
            .await
            .expect("again")
            .is_empty());
        let table = after.table("kept").expect("kept");
        let r = json!({"k": "n1", "ts": 1, "g": 1, "body": "b", "note": "hello"});
        let mut data = TableRows::default();
        data.rows
            .push(row_values(table, r.as_object().expect("object")).expect("values"));
        assert_eq!(write(db, table, &data).await.inserted, 1, "{engine}");
    }
    // A column dropped under a running role: a configuration error, not an
    // outage to retry.
    pg.exec("ALTER TABLE kept DROP COLUMN note").await;
    let table = after.table("kept").expect("kept");
    let r = json!({"k": "n2", "ts": 1, "g": 1, "body": "b", "note": "x"});
    let mut data = TableRows::default();
    data.rows
        .push(row_values(table, r.as_object().expect("object")).expect("values"));
    let err = pg
        .db
        .write_batch(&[(table, &data)], &[], &[], None)
        .await
        .expect_err("refused");
    assert!(
        matches!(err, switchyard::db::DbError::Schema(_)) && err.is_config(),
        "{err:?}"
    );

    // The command line: `db migrate` lists the difference (exit 1), `--apply`
    // adds the column, then it matches (exit 0).
    let cfg_path = dir.path().join("after.toml");
    let mut text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/switchyard.toml"),
    )
    .expect("default config");
    let tables_at = text.find("[[tables]]").expect("tables");
    text.truncate(tables_at);
    for t in ["kept", "replaced"] {
        text.push_str(&format!(
            "[[tables]]\nname = \"{t}\"\nkey = \"k\"\ntime = \"ts\"\ngroup = \"g\"\n\
             [tables.columns]\nk = \"string\"\nts = \"int\"\ng = \"int\"\nbody = \"string\"\n\
             j = \"json?\"\nnote = \"string?\"\n"
        ));
    }
    std::fs::write(&cfg_path, &text).expect("write config");
    let fresh = dir.path().join("cli.db");
    let fresh_url = format!("sqlite:{}", fresh.display());
    let fresh_db = Db::connect(&fresh_url, 1).expect("sqlite");
    fresh_db.init(&before).await.expect("init");
    fresh_db.close().await;
    let run = |apply: bool| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"));
        cmd.args(["db", "migrate", "--config"])
            .arg(&cfg_path)
            .args(["--db-url", &fresh_url]);
        if apply {
            cmd.arg("--apply");
        }
        cmd.output().expect("switchyard db migrate")
    };
    let out = run(false);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("ADD COLUMN \"note\" TEXT"), "{stdout}");
    let out = run(true);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("applied: ALTER TABLE"), "{stdout}");
    assert!(stdout.contains("match the configuration"), "{stdout}");
}
