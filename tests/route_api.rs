//! The ingest API on a real server (port 0) against a real broker and real
//! files: each route lands where it should, bad input is refused whole, flags
//! flip during traffic without a failed request.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const DUAL: &str = "switchyard-dual-write";
const KAFKA: &str = "switchyard-kafka-only";
const KILL: &str = "switchyard-kill-switch";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_route_lands_where_it_should() {
    let broker = Broker::start();
    let topic = unique("items");
    create_topic(&broker.brokers(), &topic, 4).await;
    let dirs = Dirs::new();
    // Account 1 → Kafka only, account 2 → both, account 3 → legacy (by targeting).
    std::fs::write(
        dirs.flags.join("kafka.json"),
        flag_json(KAFKA, json!(0), &[("1", json!(100))]),
    )
    .unwrap();
    std::fs::write(
        dirs.flags.join("dual.json"),
        flag_json(DUAL, json!(0), &[("1", json!(100)), ("2", json!(100))]),
    )
    .unwrap();
    let router = InProcess::start(config(&dirs, &topic), &broker.brokers()).await;
    let client = reqwest::Client::new();

    // Routes are explained.
    for (account, route) in [(1, "kafka"), (2, "dual"), (3, "legacy")] {
        let r = router.explain(account).await;
        assert_eq!(r["route"], route, "{r}");
        assert!(r["bucket"].as_u64().unwrap() < 10_000);
        assert!(r["why"].as_str().unwrap().len() > 10);
    }

    // One envelope per request, an NDJSON batch, and a gzip'd batch.
    let mut sent: BTreeMap<String, u64> = BTreeMap::new();
    let mut seq = 0;
    for account in [1u64, 2, 3] {
        seq += 1;
        let e = envelope(account, seq, 100);
        sent.insert(e["row"]["uuid"].as_str().unwrap().to_string(), account);
        let r = client
            .post(router.url())
            .header("content-type", "application/json")
            .body(e.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    }
    let mut batch = String::new();
    for i in 0..30u64 {
        seq += 1;
        let e = envelope(1 + i % 3, seq, 2500);
        sent.insert(e["row"]["uuid"].as_str().unwrap().to_string(), 1 + i % 3);
        batch.push_str(&e.to_string());
        batch.push('\n');
    }
    let r = client
        .post(router.url())
        .header("content-type", "application/x-ndjson")
        .body(batch)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let acc: Value = r.json().await.unwrap();
    assert_eq!(
        acc,
        json!({"accepted":30,"legacy":10,"dual":10,"kafka":10,"fallbacks":0})
    );

    let mut batch = String::new();
    for i in 0..9u64 {
        seq += 1;
        let e = envelope(1 + i % 3, seq, 500);
        sent.insert(e["row"]["uuid"].as_str().unwrap().to_string(), 1 + i % 3);
        batch.push_str(&e.to_string());
        batch.push('\n');
    }
    // Two gzip members (as block compressors write them): every line of
    // both is read.
    let gzip = |text: &str| {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(text.as_bytes()).unwrap();
        gz.finish().unwrap()
    };
    let cut = batch.match_indices('\n').nth(3).unwrap().0 + 1;
    let mut members = gzip(&batch[..cut]);
    members.extend(gzip(&batch[cut..]));
    // Bytes after the last member refuse the whole body: nothing is written.
    let mut trailing = members.clone();
    trailing.extend_from_slice(b"trailing bytes");
    let r = client
        .post(router.url())
        .header("content-type", "application/x-ndjson")
        .header("content-encoding", "gzip")
        .body(trailing)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = client
        .post(router.url())
        .header("content-type", "application/x-ndjson")
        .header("content-encoding", "gzip")
        .body(members)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let accepted: serde_json::Value = r.json().await.unwrap();
    assert_eq!(accepted["accepted"], 9, "{accepted}");

    let metrics = reqwest::get(format!("http://{}/metrics", router.admin))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("switchyard_route_payloads_total{route=\"dual\"} 14"),
        "{metrics}"
    );
    router.stop().await;

    // Files: accounts 2 (dual) and 3 (legacy), each once, in order of sending.
    let lines = offline_lines(&dirs.offline);
    let in_files: Vec<(String, u64, String)> = lines
        .iter()
        .map(|l| {
            (
                l.row["uuid"].as_str().unwrap().to_string(),
                l.account_id.unwrap(),
                l.route.clone().unwrap(),
            )
        })
        .collect();
    let want_files: HashSet<&String> = sent
        .iter()
        .filter(|(_, a)| **a != 1)
        .map(|(u, _)| u)
        .collect();
    assert_eq!(in_files.len(), want_files.len());
    for (uuid, account, route) in &in_files {
        assert!(want_files.contains(uuid));
        assert_eq!(route, if *account == 2 { "dual" } else { "legacy" });
    }
    assert!(switchyard::offline::open_files(&dirs.offline)
        .unwrap()
        .is_empty());

    // Topic: accounts 1 (kafka) and 2 (dual), each once, one partition per account.
    let want_topic: HashSet<&String> = sent
        .iter()
        .filter(|(_, a)| **a != 3)
        .map(|(u, _)| u)
        .collect();
    let msgs = consume_all(
        &broker.brokers(),
        &topic,
        want_topic.len(),
        Duration::from_secs(20),
    );
    assert_eq!(msgs.len(), want_topic.len());
    let mut partitions: BTreeMap<String, HashSet<i32>> = BTreeMap::new();
    for m in &msgs {
        let uuid = m.value["row"]["uuid"].as_str().unwrap().to_string();
        assert!(want_topic.contains(&uuid));
        assert_eq!(m.key, m.value["account_id"].to_string());
        assert_eq!(m.route, if m.key == "1" { "kafka" } else { "dual" });
        assert_eq!(m.value["table"], "raw_item");
        partitions
            .entry(m.key.clone())
            .or_default()
            .insert(m.partition);
    }
    assert!(partitions.values().all(|p| p.len() == 1), "{partitions:?}");
}

/// One bad-input case: a header block, `---`, then the raw body.
struct Case {
    name: String,
    status: u16,
    reason: String,
    content_type: Option<String>,
    gzip: bool,
    /// A Content-Encoding header sent as is (the body is not encoded).
    encoding: Option<String>,
    body: Vec<u8>,
}

fn load_cases(dir: &Path) -> Vec<Case> {
    let mut cases = Vec::new();
    let mut paths: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    paths.sort();
    for p in paths {
        let data = std::fs::read(&p).unwrap();
        let sep = data
            .windows(5)
            .position(|w| w == b"\n---\n")
            .unwrap_or_else(|| panic!("{}: no --- line", p.display()));
        let head = std::str::from_utf8(&data[..sep]).unwrap();
        let mut body = data[sep + 5..].to_vec();
        if body.last() == Some(&b'\n') && !head.contains("keep-final-newline") {
            body.pop();
        }
        let mut case = Case {
            name: p.file_name().unwrap().to_string_lossy().into_owned(),
            status: 0,
            reason: String::new(),
            content_type: Some("application/x-ndjson".into()),
            gzip: false,
            encoding: None,
            body,
        };
        for line in head.lines() {
            let (k, v) = line
                .split_once(':')
                .unwrap_or_else(|| panic!("{}: {line}", p.display()));
            let v = v.trim();
            match k.trim() {
                "status" => case.status = v.parse().unwrap(),
                "reason" => case.reason = v.to_string(),
                "content-type" if v == "none" => case.content_type = None,
                "content-type" => case.content_type = Some(v.to_string()),
                "gzip" => case.gzip = v == "true",
                "content-encoding" => case.encoding = Some(v.to_string()),
                "repeat" => {
                    let n: usize = v.parse().unwrap();
                    case.body = case.body.repeat(n);
                }
                "keep-final-newline" => {}
                other => panic!("{}: unknown header {other}", p.display()),
            }
        }
        assert!(case.status >= 400, "{}: status", case.name);
        assert!(!case.reason.is_empty(), "{}: reason", case.name);
        cases.push(case);
    }
    cases
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_are_refused_whole_and_nothing_is_written() {
    let cases = load_cases(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/bad_inputs"));
    assert!(cases.len() >= 40, "only {} cases", cases.len());
    let broker = Broker::start();
    let topic = unique("bad");
    create_topic(&broker.brokers(), &topic, 1).await;
    let dirs = Dirs::new();
    // Every account to both sinks, so anything written would show.
    set_flag(&dirs.flags, DUAL, json!(100));
    let mut cfg = config(&dirs, &topic);
    cfg.route.max_body_bytes = 65_536;
    cfg.tables[0].max_row_bytes = 4096;
    let router = InProcess::start(cfg, &broker.brokers()).await;
    let client = reqwest::Client::new();
    for c in &cases {
        let mut req = client.post(router.url());
        if let Some(ct) = &c.content_type {
            req = req.header("content-type", ct);
        }
        if let Some(enc) = &c.encoding {
            req = req.header("content-encoding", enc);
        }
        let body = if c.gzip {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            gz.write_all(&c.body).unwrap();
            req = req.header("content-encoding", "gzip");
            gz.finish().unwrap()
        } else {
            c.body.clone()
        };
        let r = req.body(body).send().await.unwrap();
        let status = r.status().as_u16();
        let v: Value = r.json().await.unwrap_or(Value::Null);
        assert_eq!(status, c.status, "{}: {v}", c.name);
        let msg = v["error"]["message"].as_str().unwrap_or_default();
        assert!(
            msg.contains(&c.reason),
            "{}: {msg:?} does not contain {:?}",
            c.name,
            c.reason
        );
    }
    assert_eq!(
        router.counter("switchyard_route_requests_total", &[("status", "200")]),
        0.0
    );
    router.stop().await;
    assert!(
        offline_lines(&dirs.offline).is_empty(),
        "something was written to the offline files"
    );
    let msgs = consume_all(&broker.brokers(), &topic, 0, Duration::from_secs(3));
    assert!(msgs.is_empty(), "something was produced: {msgs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flags_flip_during_traffic_and_no_request_fails() {
    let broker = Broker::start();
    let topic = unique("flip");
    create_topic(&broker.brokers(), &topic, 2).await;
    let dirs = Dirs::new();
    // The default poll interval, so the measured latency is the shipped one.
    let mut cfg = config(&dirs, &topic);
    cfg.flags.poll_ms = 100;
    let router = InProcess::start(cfg, &broker.brokers()).await;
    let url = router.url();
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU64::new(0));
    let ok = Arc::new(AtomicU64::new(0));
    let mut senders = Vec::new();
    for worker in 0..4u64 {
        let (url, stop, failures, ok) = (url.clone(), stop.clone(), failures.clone(), ok.clone());
        senders.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut seq = 0;
            while !stop.load(Ordering::Relaxed) {
                seq += 1;
                let e = envelope(worker * 1000 + seq % 50, worker << 32 | seq, 200);
                match client
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(e.to_string())
                    .send()
                    .await
                {
                    Ok(r) if r.status() == 200 => ok.fetch_add(1, Ordering::Relaxed),
                    _ => failures.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    // Account 7's route, checked after each flip; latency from the file
    // rename to the first request routed the new way.
    let route_of = |v: Value| v["route"].as_str().unwrap_or_default().to_string();
    let mut latencies = Vec::new();
    let steps: Vec<(&str, Value, &str)> = vec![
        (DUAL, json!(100), "dual"),
        (KAFKA, json!(100), "kafka"),
        (KILL, json!(true), "legacy"),
        (KILL, json!(false), "kafka"),
        (KAFKA, json!(0), "dual"),
        (DUAL, json!(0), "legacy"),
    ];
    for round in 0..4 {
        for (key, value, want) in &steps {
            let t0 = Instant::now();
            set_flag(&dirs.flags, key, value.clone());
            loop {
                let v = router.explain(7).await;
                if route_of(v) == *want {
                    break;
                }
                assert!(
                    t0.elapsed() < Duration::from_secs(5),
                    "round {round}: {key} never took effect"
                );
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            latencies.push(t0.elapsed());
            // Spread flips over the poll cycle instead of phase-locking to it.
            let jitter = (latencies.len() as u64 * 37) % 100;
            tokio::time::sleep(Duration::from_millis(100 + jitter)).await;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for s in senders {
        s.await.unwrap();
    }
    latencies.sort();
    let p = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize];
    println!(
        "flag flip-to-effect over {} flips (poll 100 ms): p50 {:?} p99 {:?} max {:?}",
        latencies.len(),
        p(0.5),
        p(0.99),
        latencies[latencies.len() - 1]
    );
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "requests failed during flips"
    );
    assert!(ok.load(Ordering::Relaxed) > 100);
    // Every route carried traffic.
    for r in ["legacy", "dual", "kafka"] {
        assert!(
            router.counter("switchyard_route_payloads_total", &[("route", r)]) > 0.0,
            "{r}"
        );
    }
    assert!(router.counter("switchyard_route_flag_reloads_total", &[]) >= 24.0);
    router.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_flag_file_keeps_the_last_good_values() {
    let broker = Broker::start();
    let topic = unique("broken");
    create_topic(&broker.brokers(), &topic, 1).await;
    let dirs = Dirs::new();
    set_flag(&dirs.flags, DUAL, json!(100));
    let router = InProcess::start(config(&dirs, &topic), &broker.brokers()).await;
    std::fs::write(
        dirs.flags.join(format!("{DUAL}.json")),
        "{\"key\": \"switchyard-dual-write\", \"on\": tru",
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let v = router.explain(7).await;
    assert_eq!(v["route"], "dual");
    assert!(v["flag_source"]["last_error"]
        .as_str()
        .unwrap()
        .contains("not a LaunchDarkly flag"));
    assert!(router.counter("switchyard_route_flag_reload_errors_total", &[]) >= 1.0);
    let (code, body) = router.readyz().await;
    assert_eq!(code, 503, "a broken flag file is not ready: {body}");
    assert_eq!(body["flags"]["ready"], false, "{body}");
    assert_eq!(router.counter("switchyard_route_flag_problems", &[]), 1.0);

    // Only the canonical account form is an account; the error quotes a
    // short prefix of what it refuses.
    for bad in ["+42", "042", "-1", "4x"] {
        let r = reqwest::get(format!("http://{}/v1/route/{bad}", router.addr))
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{bad}");
    }
    let long = "9".repeat(5000);
    let r = reqwest::get(format!("http://{}/v1/route/x{long}", router.addr))
        .await
        .unwrap();
    assert!(
        r.text().await.unwrap().len() < 500,
        "the refused value is not echoed whole"
    );
    let v = router.explain(7).await;
    assert!(v.get("salt").is_none(), "{v}");
    assert_eq!(v["routing_fingerprint"].as_str().unwrap().len(), 8, "{v}");
    router.stop().await;

    // A router restarted while the file is still broken serves what the
    // running one served (its persisted last good flags), not the default.
    let router = InProcess::start(config(&dirs, &topic), &broker.brokers()).await;
    let v = router.explain(7).await;
    assert_eq!(v["route"], "dual", "{v}");
    assert_eq!(
        v["flag_source"]["origins"]["dual_write"], "last-good",
        "{v}"
    );
    // A value of the wrong type is a problem too, not a silent 0.
    std::fs::write(
        dirs.flags.join(format!("{DUAL}.json")),
        flag_json(DUAL, json!("30"), &[]),
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let v = router.explain(7).await;
    assert_eq!(v["route"], "dual", "{v}");
    assert!(
        v["flag_source"]["last_error"]
            .as_str()
            .unwrap()
            .contains("not a number"),
        "{v}"
    );
    // Deleting the kill-switch file does not release a kill.
    set_flag(&dirs.flags, "switchyard-kill-switch", json!(true));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(router.explain(7).await["route"], "legacy");
    std::fs::remove_file(dirs.flags.join("switchyard-kill-switch.json")).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let v = router.explain(7).await;
    assert_eq!(v["route"], "legacy", "{v}");
    router.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_topic_is_named_at_start() {
    let broker = Broker::start();
    let dirs = Dirs::new();
    let cfg = config(&dirs, "no-such-topic");
    let err = start_error(cfg, &broker.brokers()).await;
    let msg = err.to_string();
    assert!(
        msg.contains("topic \"no-such-topic\" does not exist"),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_router_on_the_same_folder_is_refused() {
    let broker = Broker::start();
    let topic = unique("lock");
    create_topic(&broker.brokers(), &topic, 1).await;
    let dirs = Dirs::new();
    let first = InProcess::start(config(&dirs, &topic), &broker.brokers()).await;
    let err = start_error(config(&dirs, &topic), &broker.brokers()).await;
    assert!(
        err.to_string()
            .contains("another router is writing to this folder"),
        "{err}"
    );
    first.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_says_so_when_the_offline_folder_cannot_be_written() {
    let broker = Broker::start();
    let topic = unique("ready");
    create_topic(&broker.brokers(), &topic, 1).await;
    let dirs = Dirs::new();
    let router = InProcess::start(config(&dirs, &topic), &broker.brokers()).await;
    let (code, body) = router.readyz().await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["offline"]["writable"], true);
    // The folder gone (an unmounted volume): not ready, and why.
    let away = dirs.root.path().join("away");
    std::fs::rename(&dirs.offline, &away).unwrap();
    let (code, body) = router.readyz().await;
    assert_eq!(code, 503, "{body}");
    assert!(
        body["offline"]["error"]
            .as_str()
            .unwrap()
            .contains("cannot be written"),
        "{body}"
    );
    std::fs::rename(&away, &dirs.offline).unwrap();
    let (code, body) = router.readyz().await;
    assert_eq!(code, 200, "{body}");
    router.stop().await;
}
