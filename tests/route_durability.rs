//! The durability contract under failure: kill -9 of the router, SIGTERM under
//! load, and the broker stopped mid-load. Every payload that got a 2xx must be
//! in each sink its route chose (or in the offline file as a Kafka fallback),
//! exactly once.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use serde_json::json;
use switchyard::routing::{bucket, decide, FlagValues, Route};

const DUAL: &str = "switchyard-dual-write";
const KAFKA: &str = "switchyard-kafka-only";

/// Acknowledged uuids with their account.
type Acked = Arc<Mutex<Vec<(String, u64)>>>;

/// Senders posting small NDJSON batches until `stop` or until the router is
/// gone. Only 2xx'd payloads are recorded.
fn load(
    url: String,
    workers: u64,
    stop: Arc<AtomicBool>,
) -> (Acked, Vec<tokio::task::JoinHandle<u64>>) {
    let acked: Acked = Arc::new(Mutex::new(Vec::new()));
    let mut handles = Vec::new();
    for w in 0..workers {
        let (url, stop, acked) = (url.clone(), stop.clone(), acked.clone());
        handles.push(tokio::spawn(async move {
            let client = reqwest::Client::builder()
                .timeout(Duration::from_secs(15))
                .build()
                .unwrap();
            let mut seq = 0u64;
            let mut errors = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let mut body = String::new();
                let mut batch = Vec::new();
                for _ in 0..5 {
                    seq += 1;
                    let account = (w * 7919 + seq) % 500;
                    let e = envelope(account, w << 40 | seq, 300);
                    batch.push((e["row"]["uuid"].as_str().unwrap().to_string(), account));
                    body.push_str(&e.to_string());
                    body.push('\n');
                }
                match client
                    .post(&url)
                    .header("content-type", "application/x-ndjson")
                    .body(body)
                    .send()
                    .await
                {
                    Ok(r) if r.status() == 200 => acked.lock().unwrap().extend(batch),
                    Ok(_) => errors += 1,
                    Err(_) => {
                        errors += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
            errors
        }));
    }
    (acked, handles)
}

fn route_of(account: u64, flags: &FlagValues) -> Route {
    decide(bucket("switchyard", account), flags).0
}

/// Checks every acked payload against the files and the topic.
/// Returns (in files, in topic, as kafka fallback). `broker_lost` is how many
/// acknowledged deliveries the broker itself no longer has (the router's
/// acknowledged count minus the topic's): Kafka-bound payloads missing from
/// both the topic and the files may not exceed it.
fn verify(
    acked: &[(String, u64)],
    flags: &FlagValues,
    dirs: &Dirs,
    brokers: &str,
    topic: &str,
    broker_lost: impl Fn(usize) -> usize,
) -> (usize, usize, usize) {
    let mut in_files: HashMap<String, Vec<String>> = HashMap::new();
    for l in offline_lines(&dirs.offline) {
        in_files
            .entry(l.row["uuid"].as_str().unwrap().to_string())
            .or_default()
            .push(l.route.unwrap_or_default());
    }
    let expected_topic = acked
        .iter()
        .filter(|(_, a)| route_of(*a, flags).to_kafka())
        .count();
    let mut in_topic: HashMap<String, usize> = HashMap::new();
    let consumed = consume_all(brokers, topic, expected_topic, Duration::from_secs(10));
    let allowance = broker_lost(consumed.len());
    let mut unaccounted = Vec::new();
    for m in consumed {
        *in_topic
            .entry(m.value["row"]["uuid"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    let (mut f, mut t, mut fb) = (0, 0, 0);
    for (uuid, account) in acked {
        let route = route_of(*account, flags);
        let file_routes = in_files.get(uuid).cloned().unwrap_or_default();
        let topic_count = in_topic.get(uuid).copied().unwrap_or(0);
        match route {
            Route::Legacy => {
                assert_eq!(file_routes, vec!["legacy"], "{uuid} (legacy)");
                assert_eq!(topic_count, 0, "{uuid} (legacy) in the topic");
                f += 1;
            }
            Route::Dual => {
                let replays = file_routes.iter().filter(|r| *r == "dual-fallback").count();
                assert_eq!(
                    file_routes.iter().filter(|r| *r == "dual").count(),
                    1,
                    "{uuid} (dual) in files: {file_routes:?}"
                );
                assert_eq!(file_routes.len(), 1 + replays, "{uuid}: {file_routes:?}");
                assert!(
                    topic_count <= 1 && replays <= 1,
                    "{uuid} (dual): {topic_count} times in the topic, {replays} replay markers"
                );
                if topic_count + replays == 0 {
                    unaccounted.push(uuid.clone());
                }
                f += 1;
                t += topic_count;
                fb += replays;
            }
            Route::Kafka => {
                let fallbacks = file_routes
                    .iter()
                    .filter(|r| *r == "kafka-fallback")
                    .count();
                assert_eq!(fallbacks, file_routes.len(), "{uuid}: {file_routes:?}");
                if topic_count + fallbacks == 0 {
                    unaccounted.push(uuid.clone());
                }
                assert!(
                    topic_count <= 1 && fallbacks <= 1,
                    "{uuid}: {topic_count} in topic, {fallbacks} fallbacks"
                );
                t += topic_count;
                fb += fallbacks;
            }
        }
    }
    if !unaccounted.is_empty() {
        eprintln!(
            "{} Kafka-bound payload(s) in neither the topic nor a fallback line, {allowance} acknowledged deliveries missing from the broker: {unaccounted:?}",
            unaccounted.len()
        );
    }
    assert!(
        unaccounted.len() <= allowance,
        "acknowledged Kafka-bound payloads lost by the router: {unaccounted:?}"
    );
    (f, t, fb)
}

fn mixed_flags(dirs: &Dirs) -> FlagValues {
    set_flag(&dirs.flags, DUAL, json!(70));
    set_flag(&dirs.flags, KAFKA, json!(30));
    FlagValues {
        kill_switch: false,
        kafka_only: 30.0,
        dual_write: 70.0,
        migration: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_load_loses_no_acknowledged_payload() {
    let broker = Broker::start();
    let topic = unique("kill9");
    create_topic(&broker.brokers(), &topic, 4).await;
    let dirs = Dirs::new();
    let flags = mixed_flags(&dirs);
    // The default fsync policy, adaptive: every line synced before its 2xx.
    let cfg = write_config(switchyard::config::EMBEDDED, &dirs, &topic);
    let mut router = Process::spawn(&cfg, &broker.brokers());
    let stop = Arc::new(AtomicBool::new(false));
    let (acked, senders) = load(router.url(), 6, stop.clone());
    tokio::time::sleep(Duration::from_secs(3)).await;
    router.signal("KILL");
    let _ = router.child.wait();
    stop.store(true, Ordering::Relaxed);
    for s in senders {
        s.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 500,
        "only {} acknowledged before the kill",
        acked.len()
    );

    // A crash can also leave half a line (power loss, torn page): add one.
    let open = switchyard::offline::open_files(&dirs.offline).unwrap();
    assert_eq!(
        open.len(),
        1,
        "the file being written stays open-named after kill -9"
    );
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&open[0])
        .unwrap();
    std::io::Write::write_all(&mut f, b"{\"table\":\"raw_item\",\"row\":{\"proj").unwrap();
    drop(f);

    // Restart: the file is repaired and closed; then stop cleanly.
    let restarted = Process::spawn(&cfg, &broker.brokers());
    let still_open = switchyard::offline::open_files(&dirs.offline).unwrap();
    assert!(still_open.is_empty(), "not repaired: {still_open:?}");
    let torn: Vec<_> = std::fs::read_dir(&dirs.offline)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".torn"))
        .collect();
    assert_eq!(
        torn.len(),
        1,
        "the torn tail is kept beside the repaired file"
    );
    restarted.signal("TERM");
    let mut restarted = restarted;
    assert!(restarted.child.wait().unwrap().success());

    let (f, t, _) = verify(&acked, &flags, &dirs, &broker.brokers(), &topic, |_| 0);
    println!(
        "kill -9: {} acknowledged, {f} in files, {t} in the topic",
        acked.len()
    );
    assert!(f > 0 && t > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_drains_and_exits_zero() {
    let broker = Broker::start();
    let topic = unique("term");
    create_topic(&broker.brokers(), &topic, 4).await;
    let dirs = Dirs::new();
    let flags = mixed_flags(&dirs);
    let cfg = write_config(switchyard::config::EMBEDDED, &dirs, &topic);
    let mut router = Process::spawn(&cfg, &broker.brokers());
    let stop = Arc::new(AtomicBool::new(false));
    let (acked, senders) = load(router.url(), 6, stop.clone());
    tokio::time::sleep(Duration::from_secs(2)).await;
    router.signal("TERM");
    let status = tokio::task::spawn_blocking(move || {
        let s = router.child.wait();
        (s, router)
    })
    .await
    .unwrap();
    assert!(status.0.unwrap().success(), "exit code after SIGTERM");
    stop.store(true, Ordering::Relaxed);
    for s in senders {
        s.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() > 300, "only {} acknowledged", acked.len());
    assert!(
        switchyard::offline::open_files(&dirs.offline)
            .unwrap()
            .is_empty(),
        "file closed on shutdown"
    );
    let (f, t, _) = verify(&acked, &flags, &dirs, &broker.brokers(), &topic, |_| 0);
    println!(
        "SIGTERM: {} acknowledged, {f} in files, {t} in the topic",
        acked.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_stopped_mid_load_falls_back_and_loses_nothing() {
    // The broker sits behind a proxy that cuts every connection: to the
    // router it is down (connections reset, new ones refused) while it keeps
    // what it acknowledged, so the read-back afterwards is exact.
    let proxy_port = free_port();
    let broker = Broker::start_advertising(proxy_port);
    let cut = Cut::start_at(proxy_port, broker.port).await;
    let topic = unique("brokerdown");
    create_topic(&broker.brokers(), &topic, 2).await;
    let dirs = Dirs::new();
    let flags = mixed_flags(&dirs);
    let mut cfg = config(&dirs, &topic);
    cfg.kafka.delivery_timeout_ms = 2000;
    cfg.kafka.breaker_cooldown_ms = 1000;
    let router = InProcess::start(cfg, &broker.brokers()).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (acked, senders) = load(router.url(), 4, stop.clone());
    tokio::time::sleep(Duration::from_secs(2)).await;
    cut.cut();
    tokio::time::sleep(Duration::from_secs(5)).await;
    cut.restore().await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, Ordering::Relaxed);
    let mut errors = 0;
    for s in senders {
        errors += s.await.unwrap();
    }
    let fallbacks = router.counter("switchyard_route_fallbacks_total", &[]);
    let delivered =
        router.counter("switchyard_route_kafka_delivery_duration_seconds", &[]) as usize;
    router.stop().await;
    let acked = acked.lock().unwrap().clone();
    // Every acknowledged delivery must be in the topic (the broker was not
    // killed), so no allowance is made for a broker's losses here.
    let _ = delivered;
    let (f, t, fb) = verify(
        &acked,
        &flags,
        &dirs,
        &broker.brokers(),
        &topic,
        |in_topic| delivered.saturating_sub(in_topic),
    );
    println!(
        "broker down: {} acknowledged, {errors} refused, {f} in files, {t} in the topic, {fb} kafka fallbacks ({fallbacks} counted)",
        acked.len()
    );
    assert!(fb > 0, "the outage produced no fallback");
    assert!(fallbacks >= fb as f64);
    assert!(t > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_the_in_flight_bound_requests_get_503_with_retry_after() {
    let mut broker = Broker::start();
    let topic = unique("pressure");
    create_topic(&broker.brokers(), &topic, 1).await;
    let dirs = Dirs::new();
    set_flag(&dirs.flags, DUAL, json!(100));
    set_flag(&dirs.flags, KAFKA, json!(100));
    let mut cfg = config(&dirs, &topic);
    cfg.route.max_inflight_requests = 2;
    // Refused at once rather than after a wait for a slot that frees only
    // when the delivery timeout ends.
    cfg.route.admission_wait_ms = 0;
    cfg.kafka.delivery_timeout_ms = 1500;
    // No breaker: every request waits out the delivery timeout, holding its slot.
    cfg.kafka.breaker_cooldown_ms = 0;
    let router = InProcess::start(cfg, &broker.brokers()).await;
    broker.stop();
    let mut handles = Vec::new();
    for i in 0..8u64 {
        let url = router.url();
        handles.push(tokio::spawn(async move {
            let r = reqwest::Client::new()
                .post(url)
                .header("content-type", "application/json")
                .body(envelope(i, i, 100).to_string())
                .send()
                .await
                .unwrap();
            let retry_after = r
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_string());
            let status = r.status().as_u16();
            let body: serde_json::Value = r.json().await.unwrap();
            (status, retry_after, body)
        }));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (mut ok, mut refused) = (0, 0);
    for h in handles {
        let (status, retry_after, body) = h.await.unwrap();
        match status {
            200 => {
                assert_eq!(body["fallbacks"], 1, "{body}");
                ok += 1;
            }
            503 => {
                assert_eq!(retry_after.as_deref(), Some("1"));
                assert_eq!(body["error"]["code"], "overloaded", "{body}");
                refused += 1;
            }
            other => panic!("status {other}: {body}"),
        }
    }
    assert_eq!(ok, 2, "only the bound's worth of requests is taken");
    assert_eq!(refused, 6);
    router.stop().await;
    // The two accepted payloads are in the offline file as Kafka fallbacks.
    let lines = offline_lines(&dirs.offline);
    assert_eq!(lines.len(), 2);
    assert!(lines
        .iter()
        .all(|l| l.route.as_deref() == Some("kafka-fallback")));
}
