//! Router throughput and latency for ~2.5 KB payloads, against a real tansu
//! broker and real files, with the limits of the same machine measured in
//! the same run:
//!
//! - closed loop (each connection sends its next request when the last is
//!   answered): one payload per request from 16 connections, 100 per request
//!   from 8, on each route, on the default configuration; next to it the
//!   same router with `fsync = "never"` (the ceiling of the legacy route),
//!   the former defaults (`group` 5 ms, linger 5 ms), and a sweep of the
//!   producer's linger;
//! - raw limits: appends of the same lines with an fdatasync per group of as
//!   many lines as the connections can have waiting at once, and an rdkafka
//!   producer with the router's settings keeping 10,000 sends in flight;
//! - open loop (requests sent at a fixed rate whatever the answers, latency
//!   measured from each request's intended send time, as wrk2 does) at 1k,
//!   5k and 10k requests/s: the router, and the same requests answered by a
//!   no-op axum handler in this process, so what the router adds is seen.
//!
//! `cargo bench --bench route` (SWITCHYARD_BENCH_SECS sets the duration of
//! each scenario, 5 s by default).

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use futures_util::stream::{FuturesUnordered, StreamExt};
use hdrhistogram::Histogram;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::json;

/// Connections of the closed loop, by payloads per request.
fn connections(batch: usize) -> usize {
    if batch == 1 {
        16
    } else {
        8
    }
}

/// Connections the open-loop generator sends on.
const OPEN_CONNECTIONS: usize = 32;

struct Figures {
    payloads_per_sec: f64,
    p50: Duration,
    p99: Duration,
    rss_kib: u64,
}

fn body_for(batch: usize, seq: &mut u64) -> String {
    let mut s = String::new();
    for _ in 0..batch {
        *seq += 1;
        // ~2.5 KB rows: the seed's average payload.
        s.push_str(&envelope(*seq % 1000, *seq, 2300).to_string());
        s.push('\n');
    }
    s
}

/// POSTs an NDJSON body and reads the whole answer, which must be a 200.
async fn post(client: &reqwest::Client, url: &str, body: String) {
    let r = client
        .post(url)
        .header("content-type", "application/x-ndjson")
        .body(body)
        .send()
        .await;
    match r {
        Ok(r) if r.status() == 200 => {
            let _ = r.bytes().await;
        }
        Ok(r) => panic!("status {}", r.status()),
        Err(e) => panic!("{e}"),
    }
}

/// `text` with the line `key = …` set to `key = value`.
fn with(text: &str, key: &str, value: &str) -> String {
    let prefix = format!("{key} = ");
    let mut found = false;
    let out: Vec<String> = text
        .lines()
        .map(|l| {
            if l.starts_with(&prefix) {
                found = true;
                format!("{prefix}{value}")
            } else {
                l.to_string()
            }
        })
        .collect();
    assert!(found, "no {key} in the configuration");
    out.join("\n") + "\n"
}

/// A router on `cfg_text`, every account sent on `route`.
fn router(broker: &Broker, topic: &str, route: &str, cfg_text: &str) -> (Process, Dirs) {
    let dirs = Dirs::new();
    match route {
        "dual" => set_flag(&dirs.flags, "switchyard-dual-write", json!(100)),
        "kafka" => {
            // Kafka-only is never above dual-write.
            set_flag(&dirs.flags, "switchyard-dual-write", json!(100));
            set_flag(&dirs.flags, "switchyard-kafka-only", json!(100));
        }
        _ => {}
    }
    let cfg = write_config(cfg_text, &dirs, topic);
    (Process::spawn(&cfg, &broker.brokers()), dirs)
}

async fn closed_loop(
    broker: &Broker,
    route: &str,
    cfg_text: &str,
    batch: usize,
    secs: u64,
) -> Figures {
    let topic = unique("bench");
    create_topic(&broker.brokers(), &topic, 4).await;
    let (mut router, _dirs) = router(broker, &topic, route, cfg_text);
    let stop = Arc::new(AtomicBool::new(false));
    let lat: Arc<Mutex<Vec<Duration>>> = Arc::new(Mutex::new(Vec::new()));
    let measuring = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    for w in 0..connections(batch) {
        let (url, stop, lat, measuring) =
            (router.url(), stop.clone(), lat.clone(), measuring.clone());
        handles.push(tokio::spawn(async move {
            // One client each: one kept-alive connection each.
            let client = reqwest::Client::new();
            let mut seq = (w as u64) << 40;
            let mut mine = Vec::new();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let body = body_for(batch, &mut seq);
                let t = Instant::now();
                post(&client, &url, body).await;
                if measuring.load(Ordering::Relaxed) {
                    mine.push(t.elapsed());
                    n += batch as u64;
                }
            }
            lat.lock().unwrap().extend(mine);
            n
        }));
    }
    // Warm-up, then measure.
    tokio::time::sleep(Duration::from_secs(1)).await;
    measuring.store(true, Ordering::Relaxed);
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for h in handles {
        total += h.await.unwrap();
    }
    let rss_kib = proc_status_kib(router.child.id(), "VmHWM").unwrap_or(0);
    router.signal("TERM");
    let _ = router.child.wait();
    let mut l = lat.lock().unwrap().clone();
    l.sort();
    let q = |p: f64| l[((l.len() - 1) as f64 * p) as usize];
    Figures {
        payloads_per_sec: total as f64 / elapsed,
        p50: q(0.5),
        p99: q(0.99),
        rss_kib,
    }
}

/// Raw file limit: the same lines appended and fdatasync'd `group` at a
/// time (as many as the router's connections can have waiting on one sync),
/// one writer, no HTTP, no validation: lines/s.
fn raw_file(group: usize, secs: u64) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let mut f = std::fs::File::create(dir.path().join("raw.ndjson")).unwrap();
    let mut seq = 0;
    let mut n = 0;
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(secs) {
        let body = body_for(group, &mut seq);
        f.write_all(body.as_bytes()).unwrap();
        f.sync_data().unwrap();
        n += group;
    }
    n as f64 / t0.elapsed().as_secs_f64()
}

/// Sends kept in flight by the raw producer.
const RAW_IN_FLIGHT: usize = 10_000;

/// Raw producer limit: the same envelopes produced with the router's
/// producer settings (acks=all, idempotent, its compression and linger, the
/// murmur2 partitioner), with a sliding window of [`RAW_IN_FLIGHT`] sends in
/// flight: msgs/s acknowledged.
async fn raw_kafka(broker: &Broker, secs: u64) -> f64 {
    let settings = switchyard::config::PipelineConfig::load(None)
        .unwrap()
        .kafka;
    let topic = unique("rawbench");
    create_topic(&broker.brokers(), &topic, 4).await;
    let p: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", broker.brokers())
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("compression.type", &settings.compression)
        .set("linger.ms", settings.linger_ms.to_string())
        .set("partitioner", "murmur2_random")
        .create()
        .unwrap();
    let values: Vec<(String, String)> = (0..1000u64)
        .map(|i| (i.to_string(), envelope(i, i, 2300).to_string()))
        .collect();
    let mut in_flight = FuturesUnordered::new();
    let mut next = 0usize;
    let mut acked = 0u64;
    let t0 = Instant::now();
    let mut counting_from = None;
    let end = t0 + Duration::from_secs(secs + 1);
    while Instant::now() < end {
        while in_flight.len() < RAW_IN_FLIGHT {
            let (k, v) = &values[next % values.len()];
            next += 1;
            in_flight.push(
                p.send_result(FutureRecord::to(&topic).key(k).payload(v))
                    .unwrap(),
            );
        }
        if let Some(r) = in_flight.next().await {
            r.unwrap().unwrap();
            // The first second fills the window: counted from then.
            if counting_from.is_none() && t0.elapsed() >= Duration::from_secs(1) {
                counting_from = Some(Instant::now());
            }
            if counting_from.is_some() {
                acked += 1;
            }
        }
    }
    let counted = counting_from.map_or(1.0, |t: Instant| t.elapsed().as_secs_f64());
    while let Some(r) = in_flight.next().await {
        r.unwrap().unwrap();
    }
    acked as f64 / counted
}

/// Open-loop latency, microseconds from each request's intended send time.
struct OpenLoop {
    sent: u64,
    hist: Histogram<u64>,
}

/// Requests of one payload at `rate` per second for `secs`, on
/// [`OPEN_CONNECTIONS`] connections. A pacing thread issues each request's
/// intended time; a free connection sends it, and its latency runs from
/// that time, so a slow answer delays the requests behind it and counts in
/// theirs (no coordinated omission).
async fn open_loop(url: &str, rate: u64, secs: u64) -> OpenLoop {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let total = rate * secs;
    let mut workers = Vec::new();
    for w in 0..OPEN_CONNECTIONS {
        let (rx, url) = (rx.clone(), url.to_string());
        workers.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut seq = (w as u64 + 100) << 40;
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
            loop {
                let intended = { rx.lock().await.recv().await };
                let Some(intended) = intended else { break };
                post(&client, &url, body_for(1, &mut seq)).await;
                hist.saturating_record(intended.elapsed().as_micros() as u64);
            }
            hist
        }));
    }
    // Paced by a thread of its own: tokio's timer is only as fine as 1 ms.
    let pacer = std::thread::spawn(move || {
        let interval = Duration::from_secs_f64(1.0 / rate as f64);
        let t0 = Instant::now();
        for i in 0..total {
            let at = t0 + interval.mul_f64(i as f64);
            let now = Instant::now();
            if at > now {
                std::thread::sleep(at - now);
            }
            if tx.send(at).is_err() {
                break;
            }
        }
    });
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
    for w in workers {
        hist.add(w.await.unwrap()).unwrap();
    }
    pacer.join().unwrap();
    OpenLoop { sent: total, hist }
}

/// A no-op endpoint that reads the body and answers what the router answers
/// for one payload, on a runtime of its own: the HTTP floor.
fn noop_server() -> String {
    use axum::routing::post;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let app = axum::Router::new().route(
                "/v1/items",
                post(|body: bytes::Bytes| async move {
                    std::hint::black_box(body.len());
                    axum::Json(json!({"accepted":1,"legacy":1,"dual":0,"kafka":0,"fallbacks":0}))
                }),
            );
            let l = tokio::net::TcpListener::from_std(listener).unwrap();
            axum::serve(l, app).await.unwrap();
        });
    });
    format!("http://{addr}/v1/items")
}

fn ms(us: u64) -> String {
    format!("{:.2}ms", us as f64 / 1000.0)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn main() {
    let secs: u64 = std::env::var("SWITCHYARD_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let default = switchyard::config::EMBEDDED;
    let cfg = switchyard::config::PipelineConfig::load(None).unwrap();
    rt.block_on(async {
        println!("load average at start: {}", load_average());
        let broker = Broker::start();
        let raw_file_1 = raw_file(connections(1), secs);
        let raw_file_100 = raw_file(connections(100) * 100, secs);
        let raw_kafka = raw_kafka(&broker, secs).await;
        println!(
            "raw limits: fsync'd appends {raw_file_1:.0} lines/s ({} a sync), {raw_file_100:.0} lines/s ({} a sync); \
             rdkafka producer {raw_kafka:.0} msgs/s ({RAW_IN_FLIGHT} in flight, linger {} ms)",
            connections(1),
            connections(100) * 100,
            cfg.kafka.linger_ms
        );
        println!(
            "default configuration: fsync = {:?}, linger {} ms, {}",
            cfg.offline.fsync, cfg.kafka.linger_ms, cfg.kafka.compression
        );
        println!();
        println!(
            "{:<8} {:>5} {:<22} {:>11} {:>9} {:>9} {:>22} {:>9}",
            "route", "batch", "configuration", "payloads/s", "p50", "p99", "vs", "peak RSS"
        );
        let never = with(default, "fsync", "\"never\"");
        let group = with(default, "fsync", "\"group\"");
        let mut ceiling_1 = 0.0;
        for batch in [1usize, 100] {
            let mut rows: Vec<(&str, String, String)> = vec![
                ("legacy", "fsync never".into(), never.clone()),
                ("legacy", "default".into(), default.to_string()),
                ("kafka", "default".into(), default.to_string()),
                ("dual", "default".into(), default.to_string()),
            ];
            if batch == 1 {
                rows.push((
                    "legacy",
                    "group 5 ms (former)".into(),
                    with(&group, "group_commit_ms", "5"),
                ));
                for linger in [0u64, 1, 2, 5] {
                    if linger == cfg.kafka.linger_ms {
                        continue;
                    }
                    rows.push((
                        "kafka",
                        format!("linger {linger} ms"),
                        with(default, "linger_ms", &linger.to_string()),
                    ));
                }
            }
            let mut ceiling = 0.0;
            for (route, label, text) in rows {
                let f = closed_loop(&broker, route, &text, batch, secs).await;
                let raw_file = if batch == 1 { raw_file_1 } else { raw_file_100 };
                let vs = match (route, label.as_str()) {
                    ("legacy", "fsync never") => {
                        ceiling = f.payloads_per_sec;
                        format!("{:.2}x raw file", f.payloads_per_sec / raw_file)
                    }
                    ("legacy", _) => format!(
                        "{:.2}x never {:.2}x raw",
                        f.payloads_per_sec / ceiling,
                        f.payloads_per_sec / raw_file
                    ),
                    ("kafka", _) => format!("{:.2}x raw kafka", f.payloads_per_sec / raw_kafka),
                    _ => format!(
                        "{:.2}x raw (smaller)",
                        f.payloads_per_sec / raw_file.min(raw_kafka)
                    ),
                };
                println!(
                    "{:<8} {:>5} {:<22} {:>11.0} {:>9.2?} {:>9.2?} {:>22} {:>5} MiB",
                    route,
                    batch,
                    label,
                    f.payloads_per_sec,
                    f.p50,
                    f.p99,
                    vs,
                    f.rss_kib / 1024
                );
            }
            if batch == 1 {
                ceiling_1 = ceiling;
            }
        }
        println!(
            "(closed loop: {} connections at 1 payload a request, {} at 100; the legacy ceiling at 1: {ceiling_1:.0} payloads/s)",
            connections(1),
            connections(100)
        );

        println!();
        println!(
            "open loop, 1 payload a request, {OPEN_CONNECTIONS} connections, latency from the intended send time, default configuration"
        );
        println!(
            "{:>7} {:<16} {:>9} {:>9} {:>9} {:>9}   added by the router (p50 / p99 / p99.9)",
            "req/s", "server", "p50", "p99", "p99.9", "max"
        );
        let noop = noop_server();
        for rate in [1000u64, 5000, 10_000] {
            let floor = open_loop(&noop, rate, secs).await;
            let f = |h: &Histogram<u64>| {
                format!(
                    "{:>9} {:>9} {:>9} {:>9}",
                    ms(h.value_at_quantile(0.5)),
                    ms(h.value_at_quantile(0.99)),
                    ms(h.value_at_quantile(0.999)),
                    ms(h.max())
                )
            };
            println!("{rate:>7} {:<16} {}", "no-op axum", f(&floor.hist));
            assert_eq!(floor.hist.len(), floor.sent);
            for route in ["legacy", "dual"] {
                let topic = unique("bench");
                create_topic(&broker.brokers(), &topic, 4).await;
                let (mut r, _dirs) = router(&broker, &topic, route, default);
                // Warm-up: connections, the producer's broker connections.
                let _ = open_loop(&r.url(), rate.min(1000), 1).await;
                let o = open_loop(&r.url(), rate, secs).await;
                assert_eq!(o.hist.len(), o.sent);
                r.signal("TERM");
                let _ = r.child.wait();
                let added = |q: f64| {
                    ms(o.hist
                        .value_at_quantile(q)
                        .saturating_sub(floor.hist.value_at_quantile(q)))
                };
                println!(
                    "{rate:>7} {:<16} {}   {} / {} / {}",
                    format!("router {route}"),
                    f(&o.hist),
                    added(0.5),
                    added(0.99),
                    added(0.999)
                );
            }
        }
        println!();
        println!("load average at end: {}", load_average());
    });
}
