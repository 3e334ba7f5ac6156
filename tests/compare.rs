//! The shadow comparator against real databases and a real broker: no false
//! alarm under flag flips, every deleted row found with its id, a stopped
//! consumer shows as pending then mismatch and recovers, and `compare --once`
//! exits by the verdict.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use switchyard::admin::Health;
use switchyard::compare::state::Status;
use switchyard::compare::CompareMetrics;
use switchyard::compare::{Comparator, CompareOptions, Parity};
use switchyard::ingest::IngestMetrics;
use switchyard::ingest::{self, IngestOptions};
use switchyard::load::LoadMetrics;
use switchyard::load::{self, LoadOptions, Replay};
use tokio_util::sync::CancellationToken;

const DUAL: &str = "switchyard-dual-write";
const KAFKA: &str = "switchyard-kafka-only";

struct Stack {
    broker: Broker,
    topic: String,
    dirs: Dirs,
    cfg: switchyard::config::PipelineConfig,
    old: TestDb,
    new: TestDb,
    router: Option<InProcess>,
    ingest: Option<(CancellationToken, tokio::task::JoinHandle<()>)>,
    load: (CancellationToken, tokio::task::JoinHandle<()>),
    cmp: Arc<Comparator>,
    cmp_stop: CancellationToken,
    registry: prometheus::Registry,
    group: String,
}

fn unix() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn compare_options(brokers: &str, topic: &str) -> CompareOptions {
    CompareOptions {
        brokers: brokers.to_string(),
        topic: topic.to_string(),
        group: unique("cmp"),
        extra: vec![],
        window_secs: 60,
        settle: Duration::from_millis(1500),
        max_lateness: Duration::from_secs(4),
        recheck: Duration::from_millis(500),
        check_interval: Duration::from_millis(200),
        retain: Duration::from_secs(3600),
        max_ids: 50,
    }
}

impl Stack {
    async fn start() -> Stack {
        Stack::start_with(|_, _| {}).await
    }

    /// With the flags folder and configuration prepared by `prepare`.
    async fn start_with(
        prepare: impl FnOnce(&Dirs, &mut switchyard::config::PipelineConfig),
    ) -> Stack {
        let broker = Broker::start();
        let topic = unique("cmp");
        create_topic(&broker.brokers(), &topic, 4).await;
        let dirs = Dirs::new();
        let mut cfg = config(&dirs, &topic);
        cfg.offline.max_file_age_secs = 1;
        prepare(&dirs, &mut cfg);
        let schema = cfg.schema().unwrap();
        let old = TestDb::mariadb(&schema).await;
        let new = TestDb::postgres(&schema).await;
        let router = InProcess::start(cfg.clone(), &broker.brokers()).await;
        let load = {
            let (stop, schema, db) = (CancellationToken::new(), schema.clone(), old.db.clone());
            let metrics = LoadMetrics::new(&prometheus::Registry::new()).unwrap();
            let replay = Replay::new(&broker.brokers(), &cfg.kafka, &[], &metrics).unwrap();
            let opts = LoadOptions {
                dir: dirs.offline.clone(),
                batch_size: 500,
                batch_bytes: 8 << 20,
                archive_dir: None,
                loader_id: "test".to_string(),
                poll: Duration::from_millis(100),
                once: false,
                progress: false,
            };
            let s = stop.clone();
            let h = tokio::spawn(async move {
                load::run(opts, &schema, &db, Some(replay), metrics, s)
                    .await
                    .expect("load");
            });
            (stop, h)
        };
        let registry = prometheus::Registry::new();
        let cmp = Comparator::new(
            schema,
            old.db.clone(),
            new.db.clone(),
            compare_options(&broker.brokers(), &topic),
            CompareMetrics::new(&registry).unwrap(),
        );
        let cmp_stop = CancellationToken::new();
        {
            let (c, s) = (cmp.clone(), cmp_stop.clone());
            tokio::spawn(async move { c.run(s).await.expect("compare") });
        }
        let mut stack = Stack {
            broker,
            topic,
            dirs,
            cfg,
            old,
            new,
            router: Some(router),
            ingest: None,
            load,
            cmp,
            cmp_stop,
            registry,
            group: unique("g"),
        };
        stack.start_ingest();
        stack
    }

    fn start_ingest(&mut self) {
        let stop = CancellationToken::new();
        let (schema, db) = (self.cfg.schema().unwrap(), self.new.db.clone());
        let opts = IngestOptions {
            brokers: self.broker.brokers(),
            topics: vec![self.topic.clone()],
            group: self.group.clone(),
            batch_size: 500,
            batch_bytes: 8 << 20,
            consumer_timeout: Duration::from_millis(100),
            extra: vec![],
            idle_exit: None,
        };
        let s = stop.clone();
        let h = tokio::spawn(async move {
            let m = IngestMetrics::new(&prometheus::Registry::new()).unwrap();
            ingest::run(opts, &schema, &db, m, Health::default(), s)
                .await
                .expect("ingest");
        });
        self.ingest = Some((stop, h));
    }

    async fn stop_ingest(&mut self) {
        if let Some((stop, h)) = self.ingest.take() {
            stop.cancel();
            let _ = h.await;
        }
    }

    /// Posts `n` payloads (seq from `seq0`) in batches of 25; returns (dual, kafka) as routed.
    async fn send(&self, seq0: u64, n: u64) -> (u64, u64) {
        let router = self.router.as_ref().unwrap();
        let (mut dual, mut kafka) = (0, 0);
        for b in 0..n / 25 {
            let batch: Vec<_> = (0..25)
                .map(|i| {
                    let seq = seq0 + b * 25 + i;
                    envelope(seq % 173, seq, 200)
                })
                .collect();
            let (status, v) = post_ndjson(&router.url(), ndjson(&batch)).await;
            assert_eq!(status, 200, "{v}");
            assert_eq!(v["fallbacks"], 0);
            dual += v["dual"].as_u64().unwrap();
            kafka += v["kafka"].as_u64().unwrap();
        }
        (dual, kafka)
    }

    async fn wait_parity<F: Fn(&Parity) -> bool>(
        &self,
        what: &str,
        timeout: Duration,
        f: F,
    ) -> Parity {
        wait_parity_of(&self.cmp, what, timeout, f).await
    }

    async fn shutdown(mut self) {
        if let Some(r) = self.router.take() {
            r.stop().await;
        }
        self.stop_ingest().await;
        self.load.0.cancel();
        let _ = (&mut self.load.1).await;
        self.cmp_stop.cancel();
    }
}

/// Waits for the comparator's combined verdict to satisfy `f`.
async fn wait_parity_of<F: Fn(&Parity) -> bool>(
    cmp: &Comparator,
    what: &str,
    timeout: Duration,
    f: F,
) -> Parity {
    let deadline = Instant::now() + timeout;
    loop {
        let p = cmp.parity();
        if f(&p) {
            return p;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {}",
            p.table()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn all_settled_ok(p: &Parity, expected_old: u64, expected_new: u64) -> bool {
    let t = &p.tables[0];
    p.status == Status::Ok
        && t.windows["open"] == 0
        && t.windows["pending"] == 0
        && t.windows["mismatch"] == 0
        && t.expected_old as u64 == expected_old
        && t.expected_new as u64 == expected_new
        && t.found_old as u64 == expected_old
        && t.found_new as u64 == expected_new
}

fn compare_once(stack: &Stack, from: i64, to: i64) -> (i32, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args([
            "compare",
            "--once",
            "--kafka-brokers",
            &stack.broker.brokers(),
            "--kafka-topic",
            &stack.topic,
            "--old-db-url",
            &stack.old.url,
            "--new-db-url",
            &stack.new.url,
            "--from",
            &from.to_string(),
            "--to",
            &to.to_string(),
        ])
        .env("RUST_LOG", "warn")
        .output()
        .expect("run compare --once");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// With a migration flag (LaunchDarkly bucketing accounts across stages),
/// the comparator needs nothing more: it takes each message's route from its
/// header, and its verdict is exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_flag_rollout_keeps_parity_exact() {
    const MIGRATION: &str = "switchyard-migration";
    let stack = Stack::start_with(|dirs, cfg| {
        cfg.flags.keys.migration = Some(MIGRATION.into());
        let flag = json!({
            "key": MIGRATION, "version": 1, "on": true, "targets": [], "contextTargets": [],
            "rules": [], "prerequisites": [],
            "fallthrough": {"rollout": {"variations": [
                {"variation": 0, "weight": 30000}, {"variation": 1, "weight": 40000},
                {"variation": 5, "weight": 30000}],
                "contextKind": "account", "bucketBy": "key"}},
            "offVariation": 0,
            "variations": ["off", "dualwrite", "shadow", "live", "rampdown", "complete"],
            "salt": "m",
        });
        std::fs::write(
            dirs.flags.join(format!("{MIGRATION}.json")),
            flag.to_string(),
        )
        .unwrap();
    })
    .await;
    let (dual, kafka) = stack.send(0, 1200).await;
    eprintln!("migration flag: {dual} dual, {kafka} Kafka-only of 1200");
    assert!(
        dual > 0 && kafka > 0 && dual + kafka < 1200,
        "all three stages served"
    );
    let p = stack
        .wait_parity("a clean verdict", Duration::from_secs(60), |p| {
            all_settled_ok(p, dual, dual + kafka)
        })
        .await;
    assert_eq!(p.tables[0].extra_new, 0);
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flag_flips_give_zero_mismatches_and_deleted_rows_are_named() {
    let stack = Stack::start().await;
    let (mut dual, mut kafka) = (0, 0);
    let mut seq = 0;
    // Accounts move legacy → dual → Kafka-only while traffic flows.
    for (d, k) in [(0, 0), (20, 0), (50, 10), (80, 30), (100, 60)] {
        set_flag(&stack.dirs.flags, DUAL, json!(d));
        set_flag(&stack.dirs.flags, KAFKA, json!(k));
        tokio::time::sleep(Duration::from_millis(60)).await;
        let (a, b) = stack.send(seq, 400).await;
        dual += a;
        kafka += b;
        seq += 400;
    }
    eprintln!("sent {seq}: {dual} dual, {kafka} Kafka-only");
    assert!(dual > 0 && kafka > 0);
    let p = stack
        .wait_parity("a clean verdict", Duration::from_secs(60), |p| {
            all_settled_ok(p, dual, dual + kafka)
        })
        .await;
    assert_eq!(p.tables[0].extra_new, 0);
    assert_eq!(
        metric_value(
            &stack.registry,
            "switchyard_compare_windows",
            &[("status", "mismatch")]
        ),
        0.0
    );
    let from = 1_574_948_156i64;
    let to = from + seq as i64;
    let (code, out) = compare_once(&stack, from, to);
    assert_eq!(code, 0, "compare --once on a clean run:\n{out}");
    assert!(out.contains("parity: ok"), "{out}");

    // Delete a few rows from NEW and, separately, from OLD.
    let new_rows: Vec<String> = stack.new.raw_items().await.into_keys().collect();
    let old_rows = stack.old.raw_items().await;
    let dual_rows: Vec<String> = new_rows
        .iter()
        .filter(|u| old_rows.contains_key(*u))
        .cloned()
        .collect();
    let mut gone_new: Vec<String> = new_rows.iter().take(3).cloned().collect();
    let mut gone_old: Vec<String> = dual_rows.iter().rev().take(2).cloned().collect();
    gone_new.sort();
    gone_old.sort();
    let deleted_at = Instant::now();
    for u in &gone_new {
        stack
            .new
            .exec(&format!("DELETE FROM raw_item WHERE uuid = '{u}'"))
            .await;
    }
    for u in &gone_old {
        stack
            .old
            .exec(&format!("DELETE FROM raw_item WHERE uuid = '{u}'"))
            .await;
    }
    let p = stack
        .wait_parity("the deletions found", Duration::from_secs(30), |p| {
            let t = &p.tables[0];
            t.missing_new == 3 && t.missing_old == 2 && p.status == Status::Mismatch
        })
        .await;
    let found_after = deleted_at.elapsed();
    let mut ids_new: Vec<String> = Vec::new();
    let mut ids_old: Vec<String> = Vec::new();
    for w in &p.tables[0].details {
        if let Some(c) = &w.check {
            ids_new.extend(c.missing_ids_new.iter().cloned());
            ids_old.extend(c.missing_ids_old.iter().cloned());
        }
    }
    ids_new.sort();
    ids_old.sort();
    assert_eq!(ids_new, gone_new);
    assert_eq!(ids_old, gone_old);
    // The windows kept no keys of their verified rows: the deleted ones
    // were named by reading the windows' messages again from the topic.
    assert!(
        metric_value(&stack.registry, "switchyard_compare_drill_downs_total", &[]) >= 1.0,
        "named without a drill-down?"
    );
    assert_eq!(
        metric_value(&stack.registry, "switchyard_compare_pending_rows", &[]),
        0.0,
        "no key of a verified row is held"
    );
    eprintln!("deleted rows reported as a mismatch after {found_after:?} (recheck 0.5 s, check every 0.2 s)");
    assert!(
        metric_value(
            &stack.registry,
            "switchyard_compare_missing_rows",
            &[("db", "new")]
        ) == 3.0
    );
    let (code, out) = compare_once(&stack, from, to);
    assert_eq!(code, 1, "compare --once after deletions:\n{out}");
    for u in gone_new.iter().chain(&gone_old) {
        assert!(out.contains(u.as_str()), "{u} not named:\n{out}");
    }
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_consumer_is_pending_then_mismatch_then_recovers() {
    let mut stack = Stack::start().await;
    set_flag(&stack.dirs.flags, DUAL, json!(100));
    set_flag(&stack.dirs.flags, KAFKA, json!(100));
    tokio::time::sleep(Duration::from_millis(60)).await;
    let (_, k1) = stack.send(0, 200).await;
    stack
        .wait_parity("the first rows verified", Duration::from_secs(30), |p| {
            all_settled_ok(p, 0, k1)
        })
        .await;
    stack.stop_ingest().await;
    // New rows in new windows that NEW will not get for now.
    let (_, k2) = stack.send(100_000, 200).await;
    let started = Instant::now();
    stack
        .wait_parity("pending", Duration::from_secs(20), |p| {
            p.status == Status::Pending && p.tables[0].windows["pending"] > 0
        })
        .await;
    let pending_after = started.elapsed();
    stack
        .wait_parity(
            "mismatch after the maximum lateness",
            Duration::from_secs(20),
            |p| p.status == Status::Mismatch && p.tables[0].missing_new as u64 == k2,
        )
        .await;
    let mismatch_after = started.elapsed();
    assert!(
        mismatch_after >= Duration::from_secs(4),
        "not before the maximum lateness: {mismatch_after:?}"
    );
    eprintln!(
        "consumer stopped: pending after {pending_after:?}, mismatch after {mismatch_after:?}"
    );
    stack.start_ingest();
    stack
        .wait_parity("recovery", Duration::from_secs(30), |p| {
            all_settled_ok(p, 0, k1 + k2)
        })
        .await;
    stack.shutdown().await;
}

/// A drill-down reads a window's messages again from its first offset. When
/// that offset lies inside the partition's last record batch, tansu's memory
/// engine answers the fetch with nothing (it serves the batches that start at
/// or after the offset asked for): the drill-down must start earlier rather
/// than wait, or a deleted row in the newest window is never named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_row_in_the_last_record_batch_is_named() {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
    let broker = Broker::start();
    let topic = unique("last-batch");
    create_topic(&broker.brokers(), &topic, 1).await;
    let d = Direct::start().await;
    // Two windows' rows in one record batch: the second window starts
    // inside it.
    let rows: Vec<serde_json::Value> = (0..10u64)
        .map(|seq| {
            let mut e = d.row(seq);
            e["row"]["timestamp"] = json!(d.base + if seq < 5 { 0 } else { 60 } + seq as i64);
            e
        })
        .collect();
    for e in &rows {
        d.insert(&d.new.db, e).await;
    }
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", broker.brokers())
        .set("linger.ms", "500")
        .create()
        .unwrap();
    let sends: Vec<_> = rows
        .iter()
        .map(|e| {
            let payload = e.to_string();
            let headers = OwnedHeaders::new().insert(Header {
                key: switchyard::kafka::ROUTE_HEADER,
                value: Some("kafka"),
            });
            producer
                .send_result(
                    FutureRecord::to(&topic)
                        .key("1")
                        .payload(&payload)
                        .headers(headers),
                )
                .map_err(|(e, _)| e)
                .unwrap()
        })
        .collect();
    for f in sends {
        let delivered = f.await.unwrap().unwrap();
        assert_eq!(delivered.partition, 0);
        assert!(delivered.offset < 10);
    }
    producer.flush(Duration::from_secs(5)).unwrap();

    let mut opts = compare_options(&broker.brokers(), &topic);
    opts.settle = Duration::ZERO;
    let registry = prometheus::Registry::new();
    let cmp = Comparator::new(
        d.schema.clone(),
        d.old.db.clone(),
        d.new.db.clone(),
        opts,
        CompareMetrics::new(&registry).unwrap(),
    );
    let stop = CancellationToken::new();
    let run = {
        let (c, s) = (cmp.clone(), stop.clone());
        tokio::spawn(async move { c.run(s).await })
    };
    wait_parity_of(
        &cmp,
        "both windows verified",
        Duration::from_secs(60),
        |p| {
            p.status == Status::Ok
                && p.tables[0].expected_new == 10
                && p.tables[0].windows["ok"] == 2
        },
    )
    .await;
    let gone = rows[7]["row"]["uuid"].as_str().unwrap().to_string();
    d.new
        .exec(&format!("DELETE FROM raw_item WHERE uuid = '{gone}'"))
        .await;
    let p = wait_parity_of(
        &cmp,
        "the deleted row named",
        Duration::from_secs(60),
        |p| p.status == Status::Mismatch && p.tables[0].missing_new == 1,
    )
    .await;
    let named: Vec<String> = p.tables[0]
        .details
        .iter()
        .filter_map(|w| w.check.as_ref())
        .flat_map(|c| c.missing_ids_new.clone())
        .collect();
    assert_eq!(named, vec![gone]);
    stop.cancel();
    run.await.unwrap().unwrap();
}

/// Verdicts under late arrivals, against the real databases and with the
/// stream fed directly (what the topic would announce), so that every step
/// is ordered by the test and no outcome depends on a race: a window judged
/// ok that receives one more row not yet in NEW is pending, not a mismatch;
/// it is ok once the row lands; with a short allowance the same late row is
/// a mismatch only after the allowance, counted from its own arrival. A
/// mismatch is then acknowledged over the admin API (404 and 409 for the
/// wrong windows) and stops counting in the verdict.
/// A comparator fed directly with what the topic would announce, against
/// real databases, so that every step is ordered by the test.
struct Direct {
    old: TestDb,
    new: TestDb,
    schema: switchyard::schema::Schema,
    /// The start of a window long past, so it is due at once.
    base: i64,
}

impl Direct {
    async fn start() -> Direct {
        let dirs = Dirs::new();
        let schema = config(&dirs, "unused").schema().unwrap();
        Direct {
            old: TestDb::mariadb(&schema).await,
            new: TestDb::postgres(&schema).await,
            schema,
            base: (unix() as i64 - 3600) / 60 * 60,
        }
    }

    fn row(&self, seq: u64) -> serde_json::Value {
        let mut e = envelope(seq, seq, 50);
        e["row"]["timestamp"] = json!(self.base + seq as i64);
        e
    }

    async fn insert(&self, db: &switchyard::db::Db, e: &serde_json::Value) {
        use switchyard::db::{row_values, TableRows};
        let table = self.schema.table("raw_item").unwrap();
        let values = row_values(table, e["row"].as_object().unwrap()).unwrap();
        let rows = TableRows {
            rows: vec![values],
            sources: Vec::new(),
        };
        db.write_batch(&[(table, &rows)], &[], &[], None)
            .await
            .unwrap();
    }

    fn comparator(&self, lateness: Duration) -> (Arc<Comparator>, prometheus::Registry) {
        let mut opts = compare_options("127.0.0.1:9", "unused");
        opts.settle = Duration::ZERO;
        opts.max_lateness = lateness;
        let registry = prometheus::Registry::new();
        let m = CompareMetrics::new(&registry).unwrap();
        let cmp = Comparator::new(
            self.schema.clone(),
            self.old.db.clone(),
            self.new.db.clone(),
            opts,
            m,
        );
        (cmp, registry)
    }
}

fn announce(cmp: &Comparator, e: &serde_json::Value) {
    assert!(cmp.observe(e.to_string().as_bytes(), Some(b"dual"), unix()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_row_is_pending_from_its_arrival_then_ok_or_a_mismatch() {
    let d = Direct::start().await;
    let base = d.base;
    let (cmp, _) = d.comparator(Duration::from_secs(600));
    let a = d.row(1);
    d.insert(&d.old.db, &a).await;
    d.insert(&d.new.db, &a).await;
    announce(&cmp, &a);
    cmp.check(false, None).await.unwrap();
    assert_eq!(cmp.parity().status, Status::Ok);
    // Late: in OLD already, not yet in NEW.
    let b = d.row(2);
    d.insert(&d.old.db, &b).await;
    announce(&cmp, &b);
    cmp.check(false, None).await.unwrap();
    let p = cmp.parity();
    assert_eq!(p.status, Status::Pending, "{}", p.table());
    d.insert(&d.new.db, &b).await;
    cmp.check(false, None).await.unwrap();
    let p = cmp.parity();
    assert_eq!(p.status, Status::Ok, "{}", p.table());

    // A one-second allowance: still late, not lost, then lost after it.
    let (short, registry) = d.comparator(Duration::from_secs(1));
    announce(&short, &a);
    announce(&short, &b);
    short.check(false, None).await.unwrap();
    assert_eq!(short.parity().status, Status::Ok);
    let c = d.row(3);
    d.insert(&d.old.db, &c).await;
    let arrived = Instant::now();
    announce(&short, &c);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    short.check(false, None).await.unwrap();
    let p = short.parity();
    assert_eq!(p.status, Status::Mismatch, "{}", p.table());
    assert!(arrived.elapsed() >= Duration::from_secs(1));
    let t = &p.tables[0];
    assert_eq!(t.missing_new, 1);
    assert_eq!(
        t.details[0].check.as_ref().unwrap().missing_ids_new,
        vec![c["row"]["uuid"].as_str().unwrap().to_string()]
    );

    // Acknowledged over the admin API.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = switchyard::compare::parity_router(short.clone());
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let http = reqwest::Client::new();
    let ack = |table: &str, window: i64| {
        http.post(format!(
            "http://{addr}/parity/ack?table={table}&window={window}&by=test-operator"
        ))
        .send()
    };
    assert_eq!(ack("raw_item", base + 60).await.unwrap().status(), 404);
    assert_eq!(ack("raw_item", base).await.unwrap().status(), 200);
    let p: serde_json::Value = http
        .get(format!("http://{addr}/parity"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(p["status"], "open", "nothing left to judge: {p}");
    assert_eq!(p["tables"][0]["windows"]["acknowledged"], 1, "{p}");
    assert_eq!(
        p["tables"][0]["details"][0]["acked"]["by"], "test-operator",
        "{p}"
    );
    assert_eq!(
        metric_value(&registry, "switchyard_compare_acks_total", &[]),
        1.0
    );
    // The row lands: the window is ok, and no longer a mismatch to acknowledge.
    d.insert(&d.new.db, &c).await;
    short.check(true, None).await.unwrap();
    assert_eq!(short.parity().status, Status::Ok);
    assert_eq!(ack("raw_item", base).await.unwrap().status(), 409);
    server.abort();
}

/// A row that reached NEW with another body under the same key (a
/// truncation, a conversion) is found but differs: the window is a mismatch
/// at once, and the report names the key, apart from missing rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_stored_with_other_content_differs_and_is_named() {
    let d = Direct::start().await;
    let (cmp, registry) = d.comparator(Duration::from_secs(600));
    let rows: Vec<_> = (1..=3).map(|seq| d.row(seq)).collect();
    for e in &rows {
        d.insert(&d.old.db, e).await;
        announce(&cmp, e);
    }
    d.insert(&d.new.db, &rows[0]).await;
    d.insert(&d.new.db, &rows[2]).await;
    let mut altered = rows[1].clone();
    let body = altered["row"]["body"].as_str().unwrap().to_string();
    altered["row"]["body"] = json!(body[..body.len() - 1]);
    d.insert(&d.new.db, &altered).await;
    cmp.check(false, None).await.unwrap();
    let p = cmp.parity();
    assert_eq!(p.status, Status::Mismatch, "{}", p.table());
    let t = &p.tables[0];
    assert_eq!(
        (t.missing_old, t.missing_new, t.differs_old, t.differs_new),
        (0, 0, 0, 1),
        "{}",
        p.table()
    );
    let key = rows[1]["row"]["uuid"].as_str().unwrap().to_string();
    let c = t.details[0].check.as_ref().unwrap();
    assert_eq!(c.differing_ids_new, vec![key.clone()]);
    assert!(
        p.table().contains(&format!("differs in NEW: {key}")),
        "{}",
        p.table()
    );
    assert_eq!(
        metric_value(
            &registry,
            "switchyard_compare_differing_rows",
            &[("table", "raw_item"), ("db", "new")]
        ),
        1.0
    );

    // A window of rows verified before reads only their keys: the content
    // of one new row is still read, and its difference found.
    let (cmp, _) = d.comparator(Duration::from_secs(600));
    for seq in 11..=18 {
        let e = d.row(seq);
        d.insert(&d.old.db, &e).await;
        d.insert(&d.new.db, &e).await;
        announce(&cmp, &e);
    }
    cmp.check(false, None).await.unwrap();
    assert_eq!(cmp.parity().status, Status::Ok);
    let late = d.row(19);
    let mut altered = late.clone();
    altered["row"]["version"] = json!(3);
    d.insert(&d.old.db, &late).await;
    d.insert(&d.new.db, &altered).await;
    announce(&cmp, &late);
    cmp.check(false, None).await.unwrap();
    let p = cmp.parity();
    assert_eq!(p.status, Status::Mismatch, "{}", p.table());
    let c = p.tables[0].details[0].check.clone().unwrap();
    assert_eq!((c.differs_old, c.differs_new), (0, 1), "{}", p.table());
    assert_eq!(
        c.differing_ids_new,
        vec![late["row"]["uuid"].as_str().unwrap().to_string()]
    );
}

/// A window remembers each database's rows as a count and a sum of key
/// hashes; PostgreSQL and MySQL compute that sum themselves (md5 prefixes)
/// and SQLite streams the keys. All three must agree with the sum the
/// comparator computes from the keys it found, or every recheck would be a
/// drill-down (or a false alarm).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_engine_sums_key_hashes_as_the_comparator_does() {
    use switchyard::db::digest::KeySum;
    let d = Direct::start().await;
    let dir = tempfile::tempdir().unwrap();
    let lite = switchyard::db::Db::connect(
        &format!("sqlite://{}/k.db?mode=rwc", dir.path().display()),
        2,
    )
    .unwrap();
    lite.init(&d.schema).await.unwrap();
    let table = d.schema.table("raw_item").unwrap();
    let rows: Vec<serde_json::Value> = (0..300).map(|i| d.row(i)).collect();
    let mut keys = Vec::new();
    for e in &rows {
        for db in [&d.old.db, &d.new.db, &lite] {
            d.insert(db, e).await;
        }
        keys.push(e["row"]["uuid"].as_str().unwrap().to_ascii_lowercase());
    }
    // Rows 0..300 lie in [base, base + 300); count a sub-range too.
    let (from, to) = (d.base + 10, d.base + 250);
    let want = KeySum::of(keys[10..250].iter().map(String::as_str));
    for (name, db) in [
        ("MariaDB", &d.old.db),
        ("PostgreSQL", &d.new.db),
        ("SQLite", &lite),
    ] {
        let got = db.key_sum_in_time_range(table, from, to).await.unwrap();
        assert_eq!(got, want, "{name}");
        let none = db
            .key_sum_in_time_range(table, d.base - 100, d.base)
            .await
            .unwrap();
        assert_eq!(none, KeySum::default(), "{name}: an empty range");
    }
}
