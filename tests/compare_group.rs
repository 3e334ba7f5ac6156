//! Two comparators splitting one topic (`compare --scale-out`), as child
//! processes in one consumer group over four partitions, beside a lone
//! comparator reading the whole topic: under flag flips their combined
//! verdicts are the lone one's, window by window; rows deleted from NEW are
//! named by both members; one member killed (SIGKILL, no goodbye) and
//! replaced, then one stopped (SIGTERM): each time the partitions are read
//! again in full by their new owner and the verdicts are exact again.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use switchyard::compare::CompareMetrics;
use switchyard::compare::{Comparator, CompareOptions};
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
    cfg_path: std::path::PathBuf,
    old: TestDb,
    new: TestDb,
    router: Option<InProcess>,
    stops: Vec<CancellationToken>,
    lone: Arc<Comparator>,
    group: String,
}

impl Stack {
    async fn start() -> Stack {
        let broker = Broker::start();
        let topic = unique("cmpg");
        create_topic(&broker.brokers(), &topic, 4).await;
        let dirs = Dirs::new();
        let mut cfg = config(&dirs, &topic);
        cfg.offline.max_file_age_secs = 1;
        let cfg_path = write_config(switchyard::config::EMBEDDED, &dirs, &topic);
        let schema = cfg.schema().unwrap();
        let old = TestDb::mariadb(&schema).await;
        let new = TestDb::postgres(&schema).await;
        let router = InProcess::start(cfg.clone(), &broker.brokers()).await;
        let mut stops = Vec::new();
        {
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
            tokio::spawn(async move {
                load::run(opts, &schema, &db, Some(replay), metrics, s)
                    .await
                    .expect("load");
            });
            stops.push(stop);
        }
        {
            let (stop, schema, db) = (CancellationToken::new(), schema.clone(), new.db.clone());
            let opts = IngestOptions {
                brokers: broker.brokers(),
                topics: vec![topic.clone()],
                group: unique("g"),
                batch_size: 500,
                batch_bytes: 8 << 20,
                consumer_timeout: Duration::from_millis(100),
                extra: vec![],
                idle_exit: None,
            };
            let s = stop.clone();
            tokio::spawn(async move {
                let m = IngestMetrics::new(&prometheus::Registry::new()).unwrap();
                ingest::run(
                    opts,
                    &schema,
                    &db,
                    m,
                    switchyard::admin::Health::default(),
                    s,
                )
                .await
                .expect("ingest");
            });
            stops.push(stop);
        }
        let lone = Comparator::new(
            schema,
            old.db.clone(),
            new.db.clone(),
            CompareOptions {
                brokers: broker.brokers(),
                topic: topic.clone(),
                group: unique("cmp"),
                extra: vec![],
                window_secs: 60,
                settle: Duration::from_millis(1500),
                max_lateness: Duration::from_secs(4),
                recheck: Duration::from_millis(500),
                check_interval: Duration::from_millis(200),
                retain: Duration::from_secs(3600),
                max_ids: 50,
            },
            CompareMetrics::new(&prometheus::Registry::new()).unwrap(),
        );
        {
            let (c, stop) = (lone.clone(), CancellationToken::new());
            let s = stop.clone();
            tokio::spawn(async move { c.run(s).await.expect("compare") });
            stops.push(stop);
        }
        Stack {
            broker,
            topic,
            dirs,
            cfg_path,
            old,
            new,
            router: Some(router),
            stops,
            lone,
            group: unique("cmp-group"),
        }
    }

    /// A member of the comparators' group, as its own process.
    fn member(&self, name: &str) -> Role {
        let brokers = self.broker.brokers();
        let cfg = self.cfg_path.display().to_string();
        Role::spawn(&[
            "compare",
            "--scale-out",
            "--instance-id",
            name,
            "--config",
            &cfg,
            "--kafka-brokers",
            &brokers,
            "--kafka-topic",
            &self.topic,
            "--kafka-group",
            &self.group,
            "--kafka-config",
            "session.timeout.ms=6000",
            "--kafka-config",
            "heartbeat.interval.ms=500",
            "--old-db-url",
            &self.old.url,
            "--new-db-url",
            &self.new.url,
            "--window-secs",
            "60",
            "--settle-secs",
            "1.5",
            "--max-lateness-secs",
            "4",
            "--recheck-secs",
            "0.5",
            "--check-interval-secs",
            "0.2",
            "--member-timeout-secs",
            "2",
            "--max-ids",
            "50",
        ])
    }

    /// Posts `n` payloads from `seq0`, in batches of 25, stepping the flags
    /// every 200; returns (dual, Kafka-only) as routed.
    async fn send(&self, seq0: u64, n: u64, steps: &[(u32, u32)]) -> (u64, u64) {
        let router = self.router.as_ref().unwrap();
        let (mut dual, mut kafka) = (0, 0);
        for b in 0..n / 25 {
            if (b * 25) % 200 == 0 {
                let (d, k) = steps[((b * 25 / 200) as usize) % steps.len()];
                set_flag(&self.dirs.flags, DUAL, json!(d));
                set_flag(&self.dirs.flags, KAFKA, json!(k));
                tokio::time::sleep(Duration::from_millis(60)).await;
            }
            let batch: Vec<_> = (0..25)
                .map(|i| {
                    let seq = seq0 + b * 25 + i;
                    envelope(seq % 173, seq, 200)
                })
                .collect();
            let (status, v) = post_ndjson(&router.url(), ndjson(&batch)).await;
            assert_eq!(status, 200, "{v}");
            dual += v["dual"].as_u64().unwrap();
            kafka += v["kafka"].as_u64().unwrap();
        }
        (dual, kafka)
    }

    async fn shutdown(mut self) {
        if let Some(r) = self.router.take() {
            r.stop().await;
        }
        for s in &self.stops {
            s.cancel();
        }
    }
}

async fn parity_of(m: &Role) -> Value {
    let url = format!("http://127.0.0.1:{}/parity", m.admin_port);
    match reqwest::get(&url).await {
        Ok(r) => r.json().await.unwrap_or(Value::Null),
        Err(_) => Value::Null,
    }
}

/// Each window's verdict and counts, in order.
fn verdicts(p: &Value) -> Vec<(i64, String, [u64; 6])> {
    let mut out: Vec<(i64, String, [u64; 6])> = p["tables"][0]["details"]
        .as_array()
        .map(|ws| {
            ws.iter()
                .map(|w| {
                    let c = &w["check"];
                    let n = |k: &str| c[k].as_u64().unwrap_or(u64::MAX);
                    (
                        w["start"].as_i64().unwrap_or(0),
                        w["status"].as_str().unwrap_or("").to_string(),
                        [
                            n("expected_old"),
                            n("expected_new"),
                            n("found_old"),
                            n("found_new"),
                            n("missing_old"),
                            n("missing_new"),
                        ],
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// Every window checked, none open or pending, the totals as expected.
fn settled(p: &Value, expected_old: u64, expected_new: u64, missing_new: u64) -> bool {
    let t = &p["tables"][0];
    let n = |k: &str| t[k].as_u64().unwrap_or(u64::MAX);
    let want = if missing_new == 0 { "ok" } else { "mismatch" };
    p["status"] == want
        && t["windows"]["open"] == 0
        && t["windows"]["pending"] == 0
        && n("expected_old") == expected_old
        && n("expected_new") == expected_new
        && n("missing_new") == missing_new
        && n("found_new") == expected_new - missing_new
}

fn missing_ids(p: &Value) -> Vec<String> {
    let mut ids: Vec<String> = p["tables"][0]["details"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|w| {
            w["check"]["missing_ids_new"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str().map(String::from))
        })
        .collect();
    ids.sort();
    ids
}

/// Waits until every member's combined view and the lone comparator's are
/// settled at the totals given and agree window by window; meanwhile no
/// view may ever call a window of `never_ok` (rows deleted from it) ok.
async fn agree(
    stack: &Stack,
    members: &[&Role],
    what: &str,
    (old, new, missing): (u64, u64, u64),
    live: usize,
    never_ok: &[i64],
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let lone = serde_json::to_value(stack.lone.parity()).unwrap();
        let mut views = Vec::new();
        for m in members {
            views.push(parity_of(m).await);
        }
        for v in &views {
            for (start, status, _) in verdicts(v) {
                assert!(
                    !(never_ok.contains(&start) && status == "ok"),
                    "window {start} lost rows but is reported ok while {what}: {}",
                    v["group"]
                );
            }
        }
        let all_settled = settled(&lone, old, new, missing)
            && views.iter().all(|v| {
                settled(v, old, new, missing)
                    && v["group"]["complete"] == true
                    && v["group"]["members"].as_array().map(Vec::len) == Some(live)
            });
        if all_settled && views.iter().all(|v| verdicts(v) == verdicts(&lone)) {
            return views.swap_remove(0);
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}:\nlone: {}\nmembers: {}",
            stack.lone.parity().table(),
            views
                .iter()
                .map(|v| format!(
                    "group {} status {} totals {:?}\n{:?}",
                    v["group"],
                    v["status"],
                    (
                        &v["tables"][0]["expected_old"],
                        &v["tables"][0]["expected_new"],
                        &v["tables"][0]["missing_new"],
                        &v["tables"][0]["windows"]
                    ),
                    verdicts(v)
                ))
                .collect::<Vec<_>>()
                .join("\n")
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_agree_with_one_comparator_through_a_kill_and_a_stop() {
    let stack = Stack::start().await;
    let a = stack.member("a");
    let mut b = stack.member("b");
    let steps = [(20, 0), (50, 10), (80, 30), (100, 60), (60, 20)];
    let (dual, kafka) = stack.send(0, 1000, &steps).await;
    eprintln!("phase 1: {dual} dual, {kafka} Kafka-only of 1000");
    assert!(dual > 0 && kafka > 0);
    let started = Instant::now();
    let view = agree(
        &stack,
        &[&a, &b],
        "two members agreeing with the lone comparator",
        (dual, dual + kafka, 0),
        2,
        &[],
    )
    .await;
    eprintln!(
        "two members agree after {:?}: {}",
        started.elapsed(),
        view["group"]
    );
    let (ca, cb) = (
        a.metric("switchyard_compare_member_partitions_covered"),
        b.metric("switchyard_compare_member_partitions_covered"),
    );
    assert!(
        ca >= 1.0 && cb >= 1.0 && ca + cb == 4.0,
        "the partitions are split: a {ca}, b {cb}"
    );

    // Rows deleted from NEW are named in the combined view of each member,
    // whichever member owns them.
    let mut gone: Vec<String> = stack.new.raw_items().await.into_keys().take(2).collect();
    gone.sort();
    for u in &gone {
        stack
            .new
            .exec(&format!("DELETE FROM raw_item WHERE uuid = '{u}'"))
            .await;
    }
    let view = agree(
        &stack,
        &[&a, &b],
        "the deletions named by both members",
        (dual, dual + kafka, 2),
        2,
        &[],
    )
    .await;
    assert_eq!(missing_ids(&view), gone);
    let lossy: Vec<i64> = view["tables"][0]["details"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| {
            w["check"]["missing_ids_new"]
                .as_array()
                .is_some_and(|ids| !ids.is_empty())
        })
        .map(|w| w["start"].as_i64().unwrap())
        .collect();
    assert!(!lossy.is_empty() && lossy.len() <= 2);
    assert_eq!(missing_ids(&parity_of(&b).await), gone);

    // One member dies without leaving (SIGKILL), and its replacement joins
    // once the dead member's session has expired (as a Deployment replaces
    // a killed pod): the group splits the partitions between the two, which
    // read them in full again. (tansu 0.6 hands an expired member's
    // partitions to nobody until a member joins.)
    b.kill9();
    let killed = Instant::now();
    let (dual2, kafka2) = stack.send(1000, 400, &steps).await;
    tokio::time::sleep(Duration::from_secs(9).saturating_sub(killed.elapsed())).await;
    let c = stack.member("c");
    eprintln!("phase 2: {dual2} dual, {kafka2} Kafka-only of 400, member b killed, c started");
    let started = Instant::now();
    let (old_rows, new_rows) = (dual + dual2, dual + kafka + dual2 + kafka2);
    let view = agree(
        &stack,
        &[&a, &c],
        "the survivor and the replacement, exact",
        (old_rows, new_rows, 2),
        2,
        &lossy,
    )
    .await;
    eprintln!(
        "exact again {:?} after the kill: {}",
        started.elapsed(),
        view["group"]
    );
    assert_eq!(missing_ids(&view), gone);
    assert!(view["group"]["members"]
        .as_array()
        .unwrap()
        .iter()
        .all(|m| m != "b"));

    // A member stopped with SIGTERM leaves at once: the survivor reads
    // every partition, alone.
    let mut c = c;
    let status = std::process::Command::new("kill")
        .args(["-TERM", &c.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert!(c.wait_exit(Duration::from_secs(20)).success());
    let (dual3, kafka3) = stack.send(1400, 400, &steps).await;
    eprintln!("phase 3: {dual3} dual, {kafka3} Kafka-only of 400, member c stopped");
    let started = Instant::now();
    let view = agree(
        &stack,
        &[&a],
        "the last member alone, exact",
        (old_rows + dual3, new_rows + dual3 + kafka3, 2),
        1,
        &lossy,
    )
    .await;
    eprintln!(
        "alone and exact {:?} after the stop: {}",
        started.elapsed(),
        view["group"]
    );
    assert_eq!(missing_ids(&view), gone);
    assert_eq!(
        a.metric("switchyard_compare_member_partitions_covered"),
        4.0
    );
    assert_eq!(a.metric("switchyard_compare_group_complete"), 1.0);
    stack.shutdown().await;
}
