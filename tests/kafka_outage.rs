//! One sink's outage never stalls the other: with the broker down, the loader
//! keeps loading OLD and spools what is due to Kafka; when the broker is back
//! the spool drains to the topic, once per line, and the comparator finds
//! parity. A line Kafka refuses for good goes to the dead-letter table instead
//! of being retried forever.

mod common;

use std::time::Duration;

use common::*;
use switchyard::admin::Health;
use switchyard::compare::state::Status;
use switchyard::compare::{Comparator, CompareMetrics, CompareOptions};
use switchyard::ingest::{self, IngestMetrics, IngestOptions};
use switchyard::load::{self, LoadMetrics, LoadOptions, Replay};
use tokio_util::sync::CancellationToken;

const T0: i64 = 1_574_948_156;

fn load_options(dir: &std::path::Path, once: bool) -> LoadOptions {
    LoadOptions {
        dir: dir.to_path_buf(),
        batch_size: 64,
        batch_bytes: 8 << 20,
        archive_dir: None,
        loader_id: "test".to_string(),
        poll: Duration::from_millis(50),
        once,
        progress: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_keeps_loading_while_kafka_is_down_and_the_spool_drains_once_it_is_back() {
    let mut broker = Broker::start_persistent();
    let topic = unique("outage");
    create_topic(&broker.brokers(), &topic, 3).await;
    broker.stop();

    let dirs = Dirs::new();
    let mut cfg = config(&dirs, &topic);
    cfg.kafka.delivery_timeout_ms = 1_500;
    cfg.kafka.breaker_cooldown_ms = 300;
    let schema = cfg.schema().unwrap();
    let old = TestDb::mariadb(&schema).await;
    let new = TestDb::postgres(&schema).await;

    // 100 legacy, 100 dual (whose Kafka leg failed: a dual line and a
    // dual-fallback line), 100 Kafka-only that fell back; interleaved, as the
    // router writes them during an outage.
    let (mut legacy, mut dual, mut kafka) = (Vec::new(), Vec::new(), Vec::new());
    let mut text = String::new();
    let mut counter = 0;
    for seq in 0..300u64 {
        let e = envelope(seq % 37, seq, 120);
        let uuid = e["row"]["uuid"].as_str().unwrap().to_string();
        let routes: &[&str] = match seq % 3 {
            0 => &["legacy"],
            1 => &["dual", "dual-fallback"],
            _ => &["kafka-fallback"],
        };
        for r in routes {
            counter += 1;
            text.push_str(&offline_line(&e, r, counter));
        }
        match seq % 3 {
            0 => legacy.push(uuid),
            1 => dual.push(uuid),
            _ => kafka.push(uuid),
        }
    }
    write_closed_file(
        &dirs.offline,
        "offline-0000000000000001-000001.ndjson",
        &text,
    );

    let registry = prometheus::Registry::new();
    let metrics = LoadMetrics::new(&registry).unwrap();
    let replay = Replay::new(&broker.brokers(), &cfg.kafka, &[], &metrics).unwrap();
    let stop = CancellationToken::new();
    let loader = {
        let (schema, db, stop) = (schema.clone(), old.db.clone(), stop.clone());
        let opts = load_options(&dirs.offline, false);
        tokio::spawn(async move {
            load::run(opts, &schema, &db, Some(replay), metrics, stop)
                .await
                .expect("load")
        })
    };

    // Kafka is down: OLD still gets every legacy and dual row, and the file
    // is finished, while the 200 Kafka-bound lines wait in the spool.
    eventually(
        "OLD to hold every legacy and dual row",
        Duration::from_secs(30),
        || async { old.count().await == 200 },
    )
    .await;
    eventually(
        "the loaded file to be removed",
        Duration::from_secs(10),
        || async {
            switchyard::offline::closed_files(&dirs.offline)
                .unwrap()
                .is_empty()
        },
    )
    .await;
    eventually(
        "the replay backlog gauge to show 200 lines",
        Duration::from_secs(10),
        || async { metric_value(&registry, "switchyard_load_replay_backlog_lines", &[]) == 200.0 },
    )
    .await;
    let mut in_old: Vec<String> = old.raw_items().await.into_keys().collect();
    let mut want_old: Vec<String> = legacy.iter().chain(&dual).cloned().collect();
    in_old.sort();
    want_old.sort();
    assert_eq!(in_old, want_old);
    // The gauges are read together: with lines waiting, the oldest has an age.
    assert!(metric_value(&registry, "switchyard_load_replay_oldest_seconds", &[]) > 0.0);
    assert_eq!(
        metric_value(&registry, "switchyard_load_replayed_total", &[]),
        0.0
    );

    // Kafka is back: the spool drains.
    broker.resume();
    eventually(
        "the replay spool to drain",
        Duration::from_secs(90),
        || async { old.db.replay_backlog().await.map(|(n, _)| n).unwrap_or(1) == 0 },
    )
    .await;
    let consumed = consume_all(&broker.brokers(), &topic, 200, Duration::from_secs(15));
    let mut keys: Vec<String> = consumed
        .iter()
        .map(|c| c.value["row"]["uuid"].as_str().unwrap().to_string())
        .collect();
    keys.sort();
    let mut want: Vec<String> = dual.iter().chain(&kafka).cloned().collect();
    want.sort();
    assert_eq!(
        keys, want,
        "each Kafka-bound line reaches the topic exactly once"
    );
    let routes = |r: &str| consumed.iter().filter(|c| c.route == r).count();
    assert_eq!((routes("dual"), routes("kafka")), (100, 100));
    assert_eq!(
        metric_value(&registry, "switchyard_load_replayed_total", &[]),
        200.0
    );
    stop.cancel();
    let summary = loader.await.unwrap();
    assert_eq!(summary.spooled, 200);
    assert_eq!(summary.replayed, 200);
    assert_eq!(summary.dead_letters, 0);
    // The replayer's last act is to read the backlog again: it is empty.
    assert_eq!(
        metric_value(&registry, "switchyard_load_replay_backlog_lines", &[]),
        0.0
    );
    assert_eq!(
        metric_value(&registry, "switchyard_load_replay_oldest_seconds", &[]),
        0.0
    );

    // NEW gets them through ingest, and the comparator agrees.
    let ingest_stop = CancellationToken::new();
    let opts = IngestOptions {
        brokers: broker.brokers(),
        topics: vec![topic.clone()],
        group: unique("g"),
        batch_size: 100,
        batch_bytes: 8 << 20,
        consumer_timeout: Duration::from_millis(100),
        extra: vec![],
        idle_exit: Some(Duration::from_secs(2)),
    };
    let m = IngestMetrics::new(&prometheus::Registry::new()).unwrap();
    ingest::run(opts, &schema, &new.db, m, Health::default(), ingest_stop)
        .await
        .expect("ingest");
    assert_eq!(new.count().await, 200);
    let cmp = Comparator::new(
        schema.clone(),
        old.db.clone(),
        new.db.clone(),
        CompareOptions {
            brokers: broker.brokers(),
            topic: topic.clone(),
            group: unique("cmp"),
            extra: vec![],
            window_secs: 60,
            settle: Duration::from_millis(0),
            max_lateness: Duration::from_secs(0),
            recheck: Duration::from_secs(60),
            check_interval: Duration::from_millis(200),
            retain: Duration::from_secs(3600),
            max_ids: 20,
        },
        CompareMetrics::new(&prometheus::Registry::new()).unwrap(),
    );
    let p = cmp.once(T0, T0 + 1_000).await.expect("compare");
    let t = &p.tables[0];
    assert_eq!(p.status, Status::Ok, "{}", p.table());
    assert_eq!((t.expected_old, t.found_old), (100, 100), "{}", p.table());
    assert_eq!((t.expected_new, t.found_new), (200, 200), "{}", p.table());
}

/// A line Kafka refuses for good (here: larger than the producer's
/// `message.max.bytes`) is dead-lettered with Kafka's reason and counted;
/// the others are delivered and the spool empties.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_line_kafka_refuses_goes_to_the_dead_letter_table_not_an_endless_retry() {
    let broker = Broker::start();
    let topic = unique("refuse");
    create_topic(&broker.brokers(), &topic, 1).await;
    let dirs = Dirs::new();
    let cfg = config(&dirs, &topic);
    let schema = cfg.schema().unwrap();
    let old = TestDb::mariadb(&schema).await;
    let mut text = String::new();
    let mut offsets = Vec::new();
    for seq in 0..5u64 {
        let body = if seq == 2 { 20_000 } else { 100 };
        offsets.push(text.len());
        text.push_str(&offline_line(
            &envelope(seq, seq, body),
            "kafka-fallback",
            seq + 1,
        ));
    }
    let name = "offline-0000000000000001-000001.ndjson";
    write_closed_file(&dirs.offline, name, &text);

    let registry = prometheus::Registry::new();
    let metrics = LoadMetrics::new(&registry).unwrap();
    let extra = [("message.max.bytes".to_string(), "8192".to_string())];
    let replay = Replay::new(&broker.brokers(), &cfg.kafka, &extra, &metrics).unwrap();
    let summary = tokio::time::timeout(
        Duration::from_secs(60),
        load::run(
            load_options(&dirs.offline, true),
            &schema,
            &old.db,
            Some(replay),
            metrics,
            CancellationToken::new(),
        ),
    )
    .await
    .expect("the loader finished")
    .expect("load");
    assert_eq!(summary.spooled, 5);
    assert_eq!(summary.replayed, 4);
    assert_eq!(summary.dead_letters, 1);
    assert_eq!(old.db.replay_backlog().await.unwrap(), (0, None));
    let dead = old.db.dead_letters().await.unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].source, format!("replay:{name}:{}", offsets[2]));
    assert!(
        dead[0].reason.starts_with("refused by Kafka"),
        "{}",
        dead[0].reason
    );
    assert_eq!(
        metric_value(
            &registry,
            "switchyard_load_dead_letters_total",
            &[("reason", "kafka_refused")]
        ),
        1.0
    );
    let consumed = consume_all(&broker.brokers(), &topic, 4, Duration::from_secs(10));
    assert_eq!(consumed.len(), 4);
    // Nothing went into OLD: these were Kafka-only payloads.
    assert_eq!(old.count().await, 0);
}
