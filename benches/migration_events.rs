//! What reporting writes to LaunchDarkly's migration insights costs the
//! router: the time of one report (the SDK's migration evaluation, its
//! tracker and the queued `migration_op` event, through the same
//! `report_write` the router calls), with events sent to a local intake; and
//! that cost per request at the default sample of one write in 100, against
//! the 100 µs of one core a request may take at 10,000 requests/s.
//!
//! `cargo bench --bench migration_events` (SWITCHYARD_BENCH_REPORTS: reports
//! timed, 10,000 by default).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use launchdarkly_server_sdk::{
    Client, ConfigBuilder, EventProcessorBuilder, ServiceEndpointsBuilder, TestData,
};
use serde_json::json;
use switchyard::flags::{
    report_write, SinkOutcome, WriteReport, EVENT_CAPACITY, EVENT_FLUSH_INTERVAL,
};

const KEY: &str = "switchyard-migration";

#[tokio::main]
async fn main() {
    let n: u64 = std::env::var("SWITCHYARD_BENCH_REPORTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    // The intake: counts the migration operations it receives.
    let received = Arc::new(AtomicU64::new(0));
    let app = axum::Router::new().route(
        "/bulk",
        axum::routing::post({
            let received = received.clone();
            move |body: axum::body::Bytes| {
                let received = received.clone();
                async move {
                    use std::io::Read;
                    let mut text = Vec::new();
                    let plain = flate2::read::GzDecoder::new(&body[..])
                        .read_to_end(&mut text)
                        .is_err();
                    let text = if plain { body.to_vec() } else { text };
                    let ops = serde_json::from_slice::<Vec<serde_json::Value>>(&text)
                        .map(|v| v.iter().filter(|e| e["kind"] == "migration_op").count())
                        .unwrap_or(0);
                    received.fetch_add(ops as u64, Ordering::Relaxed);
                    axum::http::StatusCode::ACCEPTED
                }
            }
        }),
    );
    let listener = match tokio::net::TcpListener::bind("127.0.0.1:0").await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("cannot bind the event intake: {e}");
            std::process::exit(1);
        }
    };
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    tokio::spawn(async move { axum::serve(listener, app).await });

    let td = TestData::new();
    let flag = serde_json::from_value(json!({
        "key": KEY, "version": 1, "on": true, "targets": [], "contextTargets": [],
        "rules": [], "prerequisites": [], "salt": "s", "offVariation": 0,
        "fallthrough": {"variation": 1},
        "variations": ["off", "dualwrite", "shadow", "live", "rampdown", "complete"],
    }))
    .expect("a migration flag");
    td.use_preconfigured_flag(flag);
    // The SDK takes all endpoints or none; only events are used (flags come
    // from TestData).
    let local = format!("http://127.0.0.1:{port}");
    let mut endpoints = ServiceEndpointsBuilder::new();
    endpoints
        .events_base_url(&local)
        .streaming_base_url(&local)
        .polling_base_url(&local);
    let mut events = EventProcessorBuilder::<launchdarkly_sdk_transport::HyperTransport>::new();
    // The router's settings.
    events
        .capacity(EVENT_CAPACITY)
        .flush_interval(EVENT_FLUSH_INTERVAL);
    let config = ConfigBuilder::new("bench-sdk-key")
        .service_endpoints(&endpoints)
        .data_source(&td)
        .event_processor(&events)
        .build()
        .expect("SDK config");
    let client = Client::build(config).expect("SDK client");
    client.start_with_default_executor();
    client.wait_for_initialization(Duration::from_secs(5)).await;

    let write = |a: u64| WriteReport {
        account_id: a,
        old: Some(SinkOutcome {
            latency: Duration::from_micros(400),
            ok: true,
        }),
        new: Some(SinkOutcome {
            latency: Duration::from_micros(1500),
            ok: !a.is_multiple_of(50),
        }),
    };
    // Warm-up, then timed in rounds of 1,000 a second (ten times the
    // default sample at 10,000 requests/s), as sampled writes arrive spread
    // over time, not all at once.
    for a in 0..1_000 {
        report_write(&client, KEY, &write(a));
    }
    tokio::time::sleep(EVENT_FLUSH_INTERVAL * 2).await;
    let before = received.load(Ordering::Relaxed);
    let mut busy = Duration::ZERO;
    let mut a = 0;
    while a < n {
        let t = Instant::now();
        for _ in 0..1_000.min(n - a) {
            report_write(&client, KEY, &write(a));
            a += 1;
        }
        busy += t.elapsed();
        tokio::time::sleep(EVENT_FLUSH_INTERVAL).await;
    }
    // The sampling decision every request pays.
    let counter = AtomicU64::new(0);
    let t = Instant::now();
    let mut sampled = 0u64;
    for _ in 0..10_000_000u64 {
        sampled += u64::from(counter.fetch_add(1, Ordering::Relaxed).is_multiple_of(100));
    }
    let decide = t.elapsed().as_secs_f64() / 10_000_000.0;
    std::hint::black_box(sampled);
    tokio::task::spawn_blocking(move || client.close())
        .await
        .ok();
    let got = received.load(Ordering::Relaxed) - before;

    let per_report = busy.as_secs_f64() / n as f64;
    let per_request = decide + per_report / 100.0;
    let budget = 1.0 / 10_000.0;
    println!("migration_op reports: {n} timed, {got} received by the intake");
    println!(
        "one report: {:.2} µs (SDK evaluation + tracker + queued event)",
        per_report * 1e6
    );
    println!("sampling decision: {:.1} ns per request", decide * 1e9);
    println!(
        "per request at 1 in 100: {:.3} µs = {:.4} of a request's 100 µs core budget at 10k req/s",
        per_request * 1e6,
        per_request / budget
    );
}
