//! Router throughput and latency for ~2.5 KB payloads, one per request and
//! 100 per request, on each route, against a real tansu broker and real files;
//! with the raw limits of the same machine measured in the same run (fsync'd
//! appends of the same lines, and an rdkafka producer sending the same
//! messages with the same settings), and the router's peak RSS.
//!
//! `cargo bench --bench route` (set SWITCHYARD_BENCH_SECS to change the
//! duration of each scenario, 5 s by default).

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::json;

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

fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

async fn scenario(broker: &Broker, route: &str, batch: usize, secs: u64) -> Figures {
    let topic = unique("bench");
    create_topic(&broker.brokers(), &topic, 4).await;
    let dirs = Dirs::new();
    match route {
        "dual" => set_flag(&dirs.flags, "switchyard-dual-write", json!(100)),
        "kafka" => set_flag(&dirs.flags, "switchyard-kafka-only", json!(100)),
        _ => {}
    }
    let cfg = write_config(switchyard::config::EMBEDDED, &dirs, &topic);
    let mut router = Process::spawn(&cfg, &broker.brokers());
    let workers = if batch == 1 { 32 } else { 8 };
    let stop = Arc::new(AtomicBool::new(false));
    let lat: Arc<Mutex<Vec<Duration>>> = Arc::new(Mutex::new(Vec::new()));
    let mut handles = Vec::new();
    for w in 0..workers {
        let (url, stop, lat) = (router.url(), stop.clone(), lat.clone());
        handles.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut seq = (w as u64) << 40;
            let mut mine = Vec::new();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let body = body_for(batch, &mut seq);
                let t = Instant::now();
                let r = client
                    .post(&url)
                    .header("content-type", "application/x-ndjson")
                    .body(body)
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status() == 200 => {
                        mine.push(t.elapsed());
                        n += batch as u64;
                    }
                    Ok(r) => panic!("status {}", r.status()),
                    Err(e) => panic!("{e}"),
                }
            }
            lat.lock().unwrap().extend(mine);
            n
        }));
    }
    // Warm-up, then measure.
    tokio::time::sleep(Duration::from_secs(1)).await;
    lat.lock().unwrap().clear();
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for h in handles {
        total += h.await.unwrap();
    }
    let elapsed = t0.elapsed().as_secs_f64() + 1.0;
    let rss_kib = peak_rss_kib(router.child.id());
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

/// Raw file limit: the same lines appended and fdatasync'd in groups of
/// `batch`, one writer, no HTTP, no validation.
fn raw_file(batch: usize, secs: u64) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let mut f = std::fs::File::create(dir.path().join("raw.ndjson")).unwrap();
    let mut seq = 0;
    let mut n = 0;
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(secs) {
        let body = body_for(batch.max(32), &mut seq);
        f.write_all(body.as_bytes()).unwrap();
        f.sync_data().unwrap();
        n += batch.max(32);
    }
    n as f64 / t0.elapsed().as_secs_f64()
}

/// Raw producer limit: the same envelopes produced with the router's producer
/// settings (acks=all, idempotent, lz4, linger 5 ms), as fast as acks come.
async fn raw_kafka(broker: &Broker, secs: u64) -> f64 {
    let topic = unique("rawbench");
    create_topic(&broker.brokers(), &topic, 4).await;
    let p: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", broker.brokers())
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("compression.type", "lz4")
        .set("linger.ms", "5")
        .create()
        .unwrap();
    let mut seq = 0u64;
    let mut n = 0;
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(secs) {
        let mut futs = Vec::with_capacity(500);
        let mut values = Vec::with_capacity(500);
        for _ in 0..500 {
            seq += 1;
            values.push((seq % 1000, envelope(seq % 1000, seq, 2300).to_string()));
        }
        for (k, v) in &values {
            let key = k.to_string();
            futs.push(
                p.send_result(FutureRecord::to(&topic).key(&key).payload(v))
                    .unwrap(),
            );
        }
        for f in futs {
            f.await.unwrap().unwrap();
            n += 1;
        }
    }
    n as f64 / t0.elapsed().as_secs_f64()
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
    rt.block_on(async {
        let broker = Broker::start();
        let raw_file_1 = raw_file(1, secs);
        let raw_kafka = raw_kafka(&broker, secs).await;
        println!("raw limits: fsync'd appends {raw_file_1:.0} lines/s (groups of 32); rdkafka producer {raw_kafka:.0} msgs/s");
        println!(
            "{:<8} {:>6} {:>12} {:>10} {:>10} {:>10} {:>12}",
            "route", "batch", "payloads/s", "p50", "p99", "vs raw", "peak RSS"
        );
        for batch in [1usize, 100] {
            for route in ["legacy", "kafka", "dual"] {
                let f = scenario(&broker, route, batch, secs).await;
                let raw = match route {
                    "legacy" => raw_file_1,
                    "kafka" => raw_kafka,
                    _ => raw_file_1.min(raw_kafka),
                };
                println!(
                    "{:<8} {:>6} {:>12.0} {:>10.2?} {:>10.2?} {:>9.2}x {:>9} MiB",
                    route,
                    batch,
                    f.payloads_per_sec,
                    f.p50,
                    f.p99,
                    f.payloads_per_sec / raw,
                    f.rss_kib / 1024
                );
            }
        }
    });
}
