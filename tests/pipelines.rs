//! Both pipelines into real databases: router → offline files → `load` →
//! MariaDB, and router → Kafka (tansu) → `ingest` → PostgreSQL. Dead letters,
//! two loaders on one folder, two consumers in one group.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use serde_json::json;
use switchyard::admin::Health;
use switchyard::db::Db;
use switchyard::ingest::IngestMetrics;
use switchyard::ingest::{self, IngestOptions, IngestSummary};
use switchyard::load::LoadMetrics;
use switchyard::load::{self, LoadOptions, LoadSummary, Replay};
use switchyard::routing::{bucket, decide, FlagValues, Route};
use switchyard::schema::Schema;
use tokio_util::sync::CancellationToken;

fn load_options(dir: &std::path::Path, batch: usize) -> LoadOptions {
    LoadOptions {
        dir: dir.to_path_buf(),
        batch_size: batch,
        batch_bytes: 8 << 20,
        archive_dir: None,
        loader_id: "test".to_string(),
        poll: Duration::from_millis(50),
        once: true,
        progress: false,
    }
}

async fn load_once(
    opts: LoadOptions,
    schema: &Schema,
    db: &Db,
    replay: Option<(&str, &switchyard::config::KafkaSettings)>,
) -> LoadSummary {
    load_into(opts, schema, db, replay, &prometheus::Registry::new()).await
}

/// [`load_once`] with its metrics in `registry`.
async fn load_into(
    opts: LoadOptions,
    schema: &Schema,
    db: &Db,
    replay: Option<(&str, &switchyard::config::KafkaSettings)>,
    registry: &prometheus::Registry,
) -> LoadSummary {
    let metrics = LoadMetrics::new(registry).unwrap();
    let replay = replay.map(|(b, k)| Replay::new(b, k, &[], &metrics).expect("replay producer"));
    load::run(opts, schema, db, replay, metrics, CancellationToken::new())
        .await
        .expect("load")
}

fn ingest_options(brokers: &str, topic: &str, group: &str, batch: usize) -> IngestOptions {
    IngestOptions {
        brokers: brokers.to_string(),
        topics: vec![topic.to_string()],
        group: group.to_string(),
        batch_size: batch,
        batch_bytes: 8 << 20,
        consumer_timeout: Duration::from_millis(150),
        extra: vec![],
        idle_exit: Some(Duration::from_secs(2)),
    }
}

async fn ingest_until_idle(opts: IngestOptions, schema: &Schema, db: &Db) -> IngestSummary {
    let metrics = IngestMetrics::new(&prometheus::Registry::new()).unwrap();
    tokio::time::timeout(
        Duration::from_secs(90),
        ingest::run(
            opts,
            schema,
            db,
            metrics,
            Health::default(),
            CancellationToken::new(),
        ),
    )
    .await
    .expect("ingest did not go idle")
    .expect("ingest")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_to_both_databases_end_to_end() {
    let broker = Broker::start();
    let topic = unique("e2e");
    create_topic(&broker.brokers(), &topic, 4).await;
    let dirs = Dirs::new();
    let cfg = config(&dirs, &topic);
    let schema = cfg.schema().unwrap();
    let old = TestDb::mariadb(&schema).await;
    let new = TestDb::postgres(&schema).await;

    set_flag(&dirs.flags, "switchyard-dual-write", json!(60));
    set_flag(&dirs.flags, "switchyard-kafka-only", json!(25));
    let flags = FlagValues {
        kill_switch: false,
        kafka_only: 25.0,
        dual_write: 60.0,
        migration: None,
    };
    let router = InProcess::start(cfg.clone(), &broker.brokers()).await;
    let mut sent: Vec<(String, u64)> = Vec::new();
    for batch in 0..20u64 {
        let mut envelopes = Vec::new();
        for i in 0..30u64 {
            let account = (batch * 31 + i * 7) % 240;
            let e = envelope(account, batch * 1000 + i, 400);
            sent.push((e["row"]["uuid"].as_str().unwrap().to_string(), account));
            envelopes.push(e);
        }
        let (status, answer) = post_ndjson(&router.url(), ndjson(&envelopes)).await;
        assert_eq!(status, 200, "{answer}");
    }
    router.stop().await;

    let loaded = load_once(
        load_options(&dirs.offline, 100),
        &schema,
        &old.db,
        Some((&broker.brokers(), &cfg.kafka)),
    )
    .await;
    let ingested = ingest_until_idle(
        ingest_options(&broker.brokers(), &topic, &unique("g"), 100),
        &schema,
        &new.db,
    )
    .await;
    assert!(
        switchyard::offline::closed_files(&dirs.offline)
            .unwrap()
            .is_empty(),
        "loaded files are deleted"
    );

    let old_rows = old.raw_items().await;
    let new_rows = new.raw_items().await;
    let (mut legacy, mut dual, mut kafka) = (0, 0, 0);
    for (uuid, account) in &sent {
        let route = decide(bucket("switchyard", *account), &flags).0;
        match route {
            Route::Legacy => {
                legacy += 1;
                assert!(
                    old_rows.contains_key(uuid),
                    "{uuid} (legacy) missing in OLD"
                );
                assert!(!new_rows.contains_key(uuid), "{uuid} (legacy) in NEW");
            }
            Route::Dual => {
                dual += 1;
                let (o, n) = (old_rows.get(uuid), new_rows.get(uuid));
                assert!(
                    o.is_some() && n.is_some(),
                    "{uuid} (dual): OLD {o:?} NEW {n:?}"
                );
                assert_eq!(o, n, "{uuid}: dual rows differ");
            }
            Route::Kafka => {
                kafka += 1;
                assert!(new_rows.contains_key(uuid), "{uuid} (kafka) missing in NEW");
                assert!(!old_rows.contains_key(uuid), "{uuid} (kafka) in OLD");
            }
        }
    }
    assert!(
        legacy > 0 && dual > 0 && kafka > 0,
        "{legacy}/{dual}/{kafka}"
    );
    assert_eq!(old_rows.len(), legacy + dual);
    assert_eq!(new_rows.len(), dual + kafka);
    assert_eq!(loaded.lines as usize, legacy + dual);
    assert_eq!(loaded.inserted as usize, legacy + dual);
    assert_eq!(ingested.messages as usize, dual + kafka);
    assert_eq!(ingested.inserted as usize, dual + kafka);
    assert_eq!(ingested.duplicates, 0);
    eprintln!(
        "end to end: {legacy} legacy, {dual} dual, {kafka} kafka; OLD {} rows, NEW {} rows",
        old_rows.len(),
        new_rows.len()
    );
}

/// Kafka-fallback lines (Kafka was down at routing time) are replayed to the
/// topic by the loader and reach NEW through ingest; without replay they load
/// into OLD.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_lines_are_replayed_to_kafka() {
    let broker = Broker::start();
    let topic = unique("replay");
    create_topic(&broker.brokers(), &topic, 2).await;
    let dirs = Dirs::new();
    let cfg = config(&dirs, &topic);
    let schema = cfg.schema().unwrap();
    let old = TestDb::mariadb(&schema).await;
    let new = TestDb::postgres(&schema).await;
    let mut text = String::new();
    let mut expect_old = Vec::new();
    let mut expect_new = Vec::new();
    for i in 0..40u64 {
        let e = envelope(i, i, 100);
        let uuid = e["row"]["uuid"].as_str().unwrap().to_string();
        let lines: Vec<&str> = match i % 3 {
            0 => vec!["kafka-fallback"],
            1 => vec!["dual", "dual-fallback"],
            _ => vec!["legacy"],
        };
        for route in &lines {
            text.push_str(&offline_line(&e, route, i));
        }
        match i % 3 {
            0 => expect_new.push(uuid),
            1 => {
                expect_old.push(uuid.clone());
                expect_new.push(uuid)
            }
            _ => expect_old.push(uuid),
        }
    }
    std::fs::write(
        dirs.offline.join("offline-0000000000000001-000001.ndjson"),
        &text,
    )
    .unwrap();
    let s = load_once(
        load_options(&dirs.offline, 16),
        &schema,
        &old.db,
        Some((&broker.brokers(), &cfg.kafka)),
    )
    .await;
    assert_eq!(s.replayed as usize, expect_new.len());
    ingest_until_idle(
        ingest_options(&broker.brokers(), &topic, &unique("g"), 50),
        &schema,
        &new.db,
    )
    .await;
    let mut o: Vec<String> = old.raw_items().await.into_keys().collect();
    let mut n: Vec<String> = new.raw_items().await.into_keys().collect();
    o.sort();
    n.sort();
    expect_old.sort();
    expect_new.sort();
    assert_eq!(o, expect_old);
    assert_eq!(n, expect_new);
    // The replayed messages carry their original route.
    let routes: HashMap<String, usize> = consume_all(
        &broker.brokers(),
        &topic,
        expect_new.len(),
        Duration::from_secs(5),
    )
    .into_iter()
    .fold(HashMap::new(), |mut m, c| {
        *m.entry(c.route).or_default() += 1;
        m
    });
    assert_eq!(routes.get("kafka"), Some(&14), "{routes:?}");
    assert_eq!(routes.get("dual"), Some(&13), "{routes:?}");

    // --no-replay: the same file loads Kafka-only lines into OLD.
    let dirs2 = Dirs::new();
    std::fs::write(
        dirs2.offline.join("offline-0000000000000001-000001.ndjson"),
        &text,
    )
    .unwrap();
    let old2 = TestDb::mariadb(&schema).await;
    let registry = prometheus::Registry::new();
    let s = load_into(
        load_options(&dirs2.offline, 16),
        &schema,
        &old2.db,
        None,
        &registry,
    )
    .await;
    assert_eq!(s.replayed, 0);
    assert_eq!(old2.count().await, 40);
    // What did not reach Kafka is counted: the 14 Kafka-only rows and the
    // Kafka leg of the 13 dual ones.
    let skipped = |route: &str| {
        metric_value(
            &registry,
            "switchyard_load_replay_skipped_total",
            &[("route", route)],
        )
    };
    assert_eq!(skipped("kafka"), 14.0);
    assert_eq!(skipped("dual"), 13.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_and_rejected_rows_go_to_the_dead_letter_table() {
    let broker = Broker::start();
    let topic = unique("poison");
    create_topic(&broker.brokers(), &topic, 2).await;
    let dirs = Dirs::new();
    let cfg = config(&dirs, &topic);
    let schema = cfg.schema().unwrap();
    let new = TestDb::postgres(&schema).await;
    // A rule of the database the router does not know: it rejects the row.
    new.exec("ALTER TABLE raw_item ADD CONSTRAINT version_small CHECK (version < 1000)")
        .await;

    // Kafka → ingest → PostgreSQL.
    let mut msgs: Vec<(u64, Vec<u8>)> = (0..30u64)
        .map(|i| (i, envelope(i, i, 50).to_string().into_bytes()))
        .collect();
    msgs.push((1, b"not json at all".to_vec()));
    msgs.push((2, json!({"table":"nope","row":{}}).to_string().into_bytes()));
    let mut missing = envelope(3, 9001, 10);
    missing["row"].as_object_mut().unwrap().remove("body");
    msgs.push((3, missing.to_string().into_bytes()));
    let mut big_version = envelope(4, 9002, 10);
    big_version["row"]["version"] = json!(5000);
    msgs.push((4, big_version.to_string().into_bytes()));
    msgs.extend((30..40u64).map(|i| (i, envelope(i, i, 50).to_string().into_bytes())));
    produce(&broker.brokers(), &topic, &msgs).await;
    let group = unique("g");
    let s = ingest_until_idle(
        ingest_options(&broker.brokers(), &topic, &group, 500),
        &schema,
        &new.db,
    )
    .await;
    assert_eq!(s.dead_letters, 4, "{s:?}");
    assert_eq!(new.count().await, 40);
    let dead = new.db.dead_letters().await.unwrap();
    assert_eq!(dead.len(), 4, "{dead:?}");
    let reasons: Vec<&str> = dead.iter().map(|d| d.reason.as_str()).collect();
    for want in [
        "not a switchyard envelope",
        "unknown table \"nope\"",
        "column body: missing",
        "rejected by the database",
    ] {
        assert!(
            reasons.iter().any(|r| r.contains(want)),
            "no {want:?} in {reasons:?}"
        );
    }
    assert!(dead
        .iter()
        .all(|d| d.source.starts_with(&format!("{topic}/"))));
    // Offsets were committed past the poison: a second run finds nothing.
    let again = ingest_until_idle(
        ingest_options(&broker.brokers(), &topic, &group, 500),
        &schema,
        &new.db,
    )
    .await;
    assert_eq!(again.messages, 0, "{again:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unloadable_lines_go_to_the_dead_letter_table_once() {
    let dirs = Dirs::new();
    let schema = config(&dirs, "unused").schema().unwrap();
    let old = TestDb::mariadb(&schema).await;
    old.exec("ALTER TABLE raw_item ADD CONSTRAINT version_small CHECK (version < 1000)")
        .await;
    let mut text = String::new();
    for i in 0..20u64 {
        let e = envelope(i, 100 + i, 50);
        text.push_str(
            &json!({"table":"raw_item","row":e["row"],"route":"legacy","counter":i}).to_string(),
        );
        text.push('\n');
        if i == 5 {
            text.push_str("{\"table\":\"raw_item\",\"row\":{\"uuid\":\n");
        }
        if i == 9 {
            text.push_str(&json!({"table":"other","row":{},"counter":1}).to_string());
            text.push('\n');
        }
        if i == 13 {
            let mut bad = envelope(i, 7777, 10);
            bad["row"]["version"] = json!(4242);
            text.push_str(&json!({"table":"raw_item","row":bad["row"],"counter":1}).to_string());
            text.push('\n');
        }
    }
    std::fs::write(
        dirs.offline.join("offline-0000000000000002-000001.ndjson"),
        &text,
    )
    .unwrap();
    let s = load_once(load_options(&dirs.offline, 8), &schema, &old.db, None).await;
    assert_eq!(s.dead_letters, 3, "{s:?}");
    assert_eq!(old.count().await, 20);
    let dead = dead_lines(&old.db).await;
    assert_eq!(dead.len(), 3, "{dead:?}");
    assert!(dead[0].1.reason.contains("not an offline line"), "{dead:?}");
    assert!(
        dead[1].1.reason.contains("unknown table \"other\""),
        "{dead:?}"
    );
    assert!(
        dead[2].1.reason.contains("rejected by the database"),
        "{dead:?}"
    );
    assert!(dead[2].1.payload.contains("4242"));
    let at = &text[dead[1].0 .1 as usize..];
    assert_eq!(
        at.lines().next(),
        Some(dead[1].1.payload.as_str()),
        "the offset points at the line"
    );
    // Loading the file again (a crash before the files were removed, say)
    // records nothing twice: a dead letter is recorded with its batch.
    std::fs::write(
        dirs.offline.join("offline-0000000000000002-000001.ndjson"),
        &text,
    )
    .unwrap();
    load_once(load_options(&dirs.offline, 8), &schema, &old.db, None).await;
    assert_eq!(dead_lines(&old.db).await.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_loaders_on_one_folder_load_every_line_once() {
    let dirs = Dirs::new();
    let schema = config(&dirs, "unused").schema().unwrap();
    let old = TestDb::mariadb(&schema).await;
    // Without the unique key a double load would show as duplicate rows:
    // only the claim and the checkpoint stand between them.
    old.exec("ALTER TABLE raw_item DROP INDEX raw_item_uuid_key")
        .await;
    let uuids = write_offline_files(&dirs.offline, 12, 400, 200);
    let (a, b) = tokio::join!(
        load_once(load_options(&dirs.offline, 100), &schema, &old.db, None),
        load_once(load_options(&dirs.offline, 100), &schema, &old.db, None),
    );
    eprintln!("loader A {a:?}\nloader B {b:?}");
    assert_eq!(a.lines + b.lines, uuids.len() as u64);
    assert_eq!(a.files + b.files, 12);
    assert!(
        a.files > 0 && b.files > 0,
        "both loaders took files: {a:?} {b:?}"
    );
    let rows = old.raw_items().await; // panics on a duplicate
    assert_eq!(rows.len(), uuids.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_consumers_in_one_group_insert_every_row_once() {
    let broker = Broker::start_persistent();
    let topic = unique("group");
    create_topic(&broker.brokers(), &topic, 4).await;
    let dirs = Dirs::new();
    let cfg_path = write_config(switchyard::config::EMBEDDED, &dirs, &topic);
    let schema = config(&dirs, &topic).schema().unwrap();
    let new = TestDb::postgres(&schema).await;
    let group = unique("g");
    let args = |_: u8| {
        vec![
            "ingest".to_string(),
            "--config".into(),
            cfg_path.display().to_string(),
            "--kafka-brokers".into(),
            broker.brokers(),
            "--kafka-group".into(),
            group.clone(),
            "--db-url".into(),
            new.url.clone(),
            "--batch-size".into(),
            "200".into(),
            "--kafka-config".into(),
            "session.timeout.ms=6000".into(),
            "--kafka-config".into(),
            "heartbeat.interval.ms=500".into(),
        ]
    };
    let a_args = args(0);
    let b_args = args(1);
    let a = Role::spawn(&a_args.iter().map(String::as_str).collect::<Vec<_>>());
    let b = Role::spawn(&b_args.iter().map(String::as_str).collect::<Vec<_>>());
    let n = 4000u64;
    let msgs: Vec<(u64, Vec<u8>)> = (0..n)
        .map(|i| (i % 400, envelope(i % 400, i, 300).to_string().into_bytes()))
        .collect();
    for chunk in msgs.chunks(500) {
        produce(&broker.brokers(), &topic, chunk).await;
    }
    eventually("every row in NEW", Duration::from_secs(60), || async {
        new.count().await == n as i64
    })
    .await;
    let rows = new.raw_items().await;
    assert_eq!(rows.len() as u64, n);
    let (ia, ib) = (
        a.metric("switchyard_ingest_messages_total"),
        b.metric("switchyard_ingest_messages_total"),
    );
    eprintln!("consumer A {ia} messages, consumer B {ib} messages");
    assert!(ia > 0.0 && ib > 0.0, "both members consumed: {ia} / {ib}");
    assert!(ia + ib >= n as f64);
}

/// SQLite on the OLD side (the demo's embedded database): the same loader,
/// and a second pass over the same lines inserts nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loads_into_sqlite_and_skips_what_is_there() {
    let dirs = Dirs::new();
    let schema = config(&dirs, "unused").schema().unwrap();
    let url = format!("sqlite:{}", dirs.root.path().join("old.db").display());
    let db = Db::connect(&url, 2).unwrap();
    db.init(&schema).await.unwrap();
    db.init(&schema).await.expect("init is idempotent");
    let uuids = write_offline_files(&dirs.offline, 3, 500, 100);
    let copy = dirs.root.path().join("copy");
    std::fs::create_dir_all(&copy).unwrap();
    for f in switchyard::offline::closed_files(&dirs.offline).unwrap() {
        std::fs::copy(&f, copy.join(f.file_name().unwrap())).unwrap();
    }
    let first = load_once(load_options(&dirs.offline, 200), &schema, &db, None).await;
    assert_eq!(first.inserted as usize, uuids.len());
    // The same files again (as if re-delivered under new names' checkpoints).
    for f in switchyard::offline::closed_files(&copy).unwrap() {
        let name = f
            .file_name()
            .unwrap()
            .to_string_lossy()
            .replace("offline-", "offline-again-");
        std::fs::rename(&f, dirs.offline.join(name)).unwrap();
    }
    let second = load_once(load_options(&dirs.offline, 200), &schema, &db, None).await;
    assert_eq!(second.inserted, 0, "{second:?}");
    assert_eq!(second.duplicates as usize, uuids.len(), "{second:?}");
    assert_eq!(db.count("raw_item").await.unwrap() as usize, uuids.len());
}

/// A running loader picks up files as they are closed, archives them when
/// asked, reports its backlog, and stops cleanly on shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_loader_follows_the_folder_and_archives() {
    let dirs = Dirs::new();
    let schema = config(&dirs, "unused").schema().unwrap();
    let old = TestDb::mariadb(&schema).await;
    let archive = dirs.root.path().join("archive");
    let mut opts = load_options(&dirs.offline, 100);
    opts.once = false;
    opts.archive_dir = Some(archive.clone());
    let registry = prometheus::Registry::new();
    let metrics = LoadMetrics::new(&registry).unwrap();
    let stop = CancellationToken::new();
    let task = {
        let (schema, db, stop) = (schema.clone(), old.db.clone(), stop.clone());
        tokio::spawn(async move { load::run(opts, &schema, &db, None, metrics, stop).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(old.count().await, 0);
    let uuids = write_offline_files(&dirs.offline, 2, 250, 100);
    eventually("the new files loaded", Duration::from_secs(10), || async {
        old.count().await == uuids.len() as i64
    })
    .await;
    eventually("files archived", Duration::from_secs(5), || async {
        std::fs::read_dir(&archive).map(|d| d.count()).unwrap_or(0) == 2
    })
    .await;
    assert!(switchyard::offline::closed_files(&dirs.offline)
        .unwrap()
        .is_empty());
    // The counters follow the archive step and the next scan of the folder:
    // wait for them rather than race them.
    eventually(
        "files counted and none pending",
        Duration::from_secs(5),
        || async {
            metric_value(&registry, "switchyard_load_files_total", &[]) == 2.0
                && metric_value(&registry, "switchyard_load_files_pending", &[]) == 0.0
        },
    )
    .await;
    assert_eq!(
        metric_value(
            &registry,
            "switchyard_load_rows_total",
            &[("outcome", "inserted")]
        ),
        500.0
    );
    stop.cancel();
    let summary = tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("stops on shutdown")
        .unwrap()
        .unwrap();
    assert_eq!(summary.files, 2);
}

/// Text outside the Basic Multilingual Plane (4-byte UTF-8: emoji, musical
/// symbols, rare CJK) and combining marks arrive unchanged in both databases:
/// route → offline file → load → MariaDB, and route → Kafka → ingest →
/// PostgreSQL, byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_byte_utf8_arrives_byte_for_byte_in_both_databases() {
    let broker = Broker::start();
    let topic = unique("utf8");
    create_topic(&broker.brokers(), &topic, 1).await;
    let dirs = Dirs::new();
    let cfg = config(&dirs, &topic);
    let schema = cfg.schema().unwrap();
    let old = TestDb::mariadb(&schema).await;
    let new = TestDb::postgres(&schema).await;
    set_flag(&dirs.flags, "switchyard-dual-write", json!(100));
    let router = InProcess::start(cfg.clone(), &broker.brokers()).await;

    let texts = [
        "emoji 😀🚀 and a flag 🇫🇷",
        "music 𝄞𝄢, math 𝔸𝕓, old italic 𐌰𐌱",
        "CJK extension B 𠜎𠜱𠝹 next to BMP 漢字",
        "combining e\u{301} vs é, zero-width joiner 👩\u{200d}💻",
        "quote \" backslash \\ tab \t newline \n and \u{1f} control",
    ];
    let mut envelopes = Vec::new();
    let mut want = HashMap::new();
    for (i, t) in texts.iter().enumerate() {
        let mut e = envelope(i as u64, i as u64, 0);
        e["row"]["body"] = json!(t);
        want.insert(
            e["row"]["uuid"].as_str().unwrap().to_string(),
            t.to_string(),
        );
        envelopes.push(e);
    }
    let (status, answer) = post_ndjson(&router.url(), ndjson(&envelopes)).await;
    assert_eq!(status, 200, "{answer}");
    router.stop().await;

    load_once(load_options(&dirs.offline, 100), &schema, &old.db, None).await;
    ingest_until_idle(
        ingest_options(&broker.brokers(), &topic, &unique("g"), 100),
        &schema,
        &new.db,
    )
    .await;
    for (name, db) in [("MariaDB", &old), ("PostgreSQL", &new)] {
        let got: HashMap<String, String> = db
            .raw_items()
            .await
            .into_iter()
            .map(|(k, v)| (k, v.2))
            .collect();
        assert_eq!(got.len(), texts.len(), "{name}");
        for (uuid, text) in &want {
            assert_eq!(
                got[uuid].as_bytes(),
                text.as_bytes(),
                "{name}: the body of {uuid} changed"
            );
        }
    }
}

/// An archive folder on another filesystem (a volume of its own): `rename`
/// fails with EXDEV, so the loader copies, syncs and then removes the file,
/// instead of failing on every restart after its checkpoint said done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_are_archived_across_filesystems() {
    use std::os::unix::fs::MetadataExt;
    let dirs = Dirs::new();
    let schema = config(&dirs, "unused").schema().unwrap();
    let old = TestDb::mariadb(&schema).await;
    let archive = tempfile::tempdir_in("/dev/shm").expect("a tmpfs at /dev/shm");
    let dev = |p: &std::path::Path| std::fs::metadata(p).unwrap().dev();
    assert_ne!(
        dev(&dirs.offline),
        dev(archive.path()),
        "the archive must be on another filesystem for this test"
    );
    let uuids = write_offline_files(&dirs.offline, 3, 40, 100);
    let sent: Vec<Vec<u8>> = switchyard::offline::closed_files(&dirs.offline)
        .unwrap()
        .iter()
        .map(|f| std::fs::read(f).unwrap())
        .collect();
    let mut opts = load_options(&dirs.offline, 50);
    opts.archive_dir = Some(archive.path().to_path_buf());
    let s = load_once(opts, &schema, &old.db, None).await;
    assert_eq!(s.inserted as usize, uuids.len(), "{s:?}");
    assert!(switchyard::offline::closed_files(&dirs.offline)
        .unwrap()
        .is_empty());
    let mut archived: Vec<Vec<u8>> = std::fs::read_dir(archive.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .inspect(|p| assert!(!p.to_string_lossy().ends_with(".partial"), "{p:?}"))
        .map(|p| std::fs::read(p).unwrap())
        .collect();
    let mut sent = sent;
    archived.sort();
    sent.sort();
    assert_eq!(archived, sent, "every file archived whole");
}
