//! The soak: every role in its own process (route, load, ingest, compare)
//! against tansu (SQLite storage), MariaDB as OLD and PostgreSQL as NEW, at
//! a steady rate for a configurable time, with a flag flip every minute and
//! the broker cut off from every client for 10 s every few minutes. Each process's RSS and
//! open file descriptors, and the offline folder's size, are sampled once a
//! second; the soak fails if any of them trends upward after the warm-up, if
//! a row acknowledged is missing from a database it is due in, or if parity
//! ends anything but ok.
//!
//! Not part of the normal suite (it runs for minutes): `scripts/soak [SECS]`
//! runs it in release. Settings: `SWITCHYARD_SOAK_SECS` (1800),
//! `SWITCHYARD_SOAK_RATE` payloads/s (400), `SWITCHYARD_SOAK_CUT_SECS` between
//! broker cuts (180), `SWITCHYARD_SOAK_REPORT` a file for the figures.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use serde_json::{json, Value};
use switchyard::config::EMBEDDED;

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn fds(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count() as u64)
        .unwrap_or(0)
}

fn folder_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

/// Least-squares slope of `ys` against their index (per sample).
fn slope(ys: &[f64]) -> f64 {
    let n = ys.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let mx = (n - 1.0) / 2.0;
    let my = ys.iter().sum::<f64>() / n;
    let (mut num, mut den) = (0.0, 0.0);
    for (i, y) in ys.iter().enumerate() {
        let dx = i as f64 - mx;
        num += dx * (y - my);
        den += dx * dx;
    }
    if den == 0.0 {
        0.0
    } else {
        num / den
    }
}

/// A series trends upward when its fitted growth over the measured span is
/// above both `floor` and a tenth of its median.
fn trends_up(ys: &[f64], floor: f64) -> Option<f64> {
    let mut sorted = ys.to_vec();
    sorted.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let median = sorted.get(sorted.len() / 2).copied().unwrap_or(0.0);
    let growth = slope(ys) * ys.len() as f64;
    (growth > floor.max(median / 10.0)).then_some(growth)
}

#[test]
fn a_flat_series_with_noise_does_not_trend_and_a_leak_does() {
    let flat: Vec<f64> = (0..600).map(|i| 100.0 + ((i * 7) % 13) as f64).collect();
    assert_eq!(trends_up(&flat, 8.0), None);
    let leak: Vec<f64> = (0..600).map(|i| 100.0 + i as f64 * 0.1).collect();
    assert!(trends_up(&leak, 8.0).is_some());
    // A temporary bump that drains (a broker cut's fallback lines) is not a trend.
    let bump: Vec<f64> = (0..600)
        .map(|i| {
            if (200..260).contains(&i) {
                180.0
            } else {
                100.0
            }
        })
        .collect();
    assert_eq!(trends_up(&bump, 8.0), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "runs for minutes: scripts/soak"]
async fn soak() {
    let secs = setting("SWITCHYARD_SOAK_SECS", 1800);
    let rate = setting("SWITCHYARD_SOAK_RATE", 400);
    let cut_every = setting("SWITCHYARD_SOAK_CUT_SECS", 180);
    // The broker is cut off from every client (connections dropped, new ones
    // refused) for 10 s every few minutes, its data kept.
    let proxy = free_port();
    let broker = Broker::start_advertising(proxy);
    let cut = Cut::start_at(proxy, broker.port).await;
    let topic = unique("soak");
    create_topic(&broker.brokers(), &topic, 4).await;
    let dirs = Dirs::new();
    let text = EMBEDDED.replace("max_file_age_secs = 60", "max_file_age_secs = 2");
    let cfg_path = write_config(&text, &dirs, &topic);
    let cfg = switchyard::config::PipelineConfig::parse(
        "soak",
        &std::fs::read_to_string(&cfg_path).unwrap(),
    )
    .unwrap();
    let schema = cfg.schema().unwrap();
    let old = TestDb::mariadb(&schema).await;
    let new = TestDb::postgres(&schema).await;
    set_flag(&dirs.flags, "switchyard-kill-switch", json!(false));
    set_flag(&dirs.flags, "switchyard-dual-write", json!(50));
    set_flag(&dirs.flags, "switchyard-kafka-only", json!(20));
    let brokers = broker.brokers();
    let cfg_arg = cfg_path.display().to_string();
    let offline = dirs.offline.display().to_string();
    let router = Process::spawn(&cfg_path, &brokers);
    let load = Role::spawn(&[
        "load",
        "--config",
        &cfg_arg,
        "--offline-dir",
        &offline,
        "--db-url",
        &old.url,
        "--kafka-brokers",
        &brokers,
    ]);
    let ingest = Role::spawn(&[
        "ingest",
        "--config",
        &cfg_arg,
        "--kafka-brokers",
        &brokers,
        "--kafka-group",
        &unique("soak-ingest"),
        "--db-url",
        &new.url,
    ]);
    let compare = Role::spawn(&[
        "compare",
        "--config",
        &cfg_arg,
        "--kafka-brokers",
        &brokers,
        "--kafka-group",
        &unique("soak-compare"),
        "--old-db-url",
        &old.url,
        "--new-db-url",
        &new.url,
        "--window-secs",
        "10",
    ]);
    let pids = [
        ("route", router.child.id()),
        ("load", load.child.id()),
        ("ingest", ingest.child.id()),
        ("compare", compare.child.id()),
    ];

    // Traffic: batches of 10 payloads at `rate`, accounts spread over 10,000.
    let stop = Arc::new(AtomicBool::new(false));
    let (legacy, dual, kafka, refused) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let traffic = {
        let (url, stop) = (router.url(), stop.clone());
        let (legacy, dual, kafka, refused) =
            (legacy.clone(), dual.clone(), kafka.clone(), refused.clone());
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut tick = tokio::time::interval(Duration::from_secs_f64(10.0 / rate as f64));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut seq = 0u64;
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let mut body = String::new();
                for _ in 0..10 {
                    seq += 1;
                    let mut e = envelope(seq.wrapping_mul(7919) % 10_000, seq, 600);
                    e["row"]["timestamp"] = json!(unix());
                    body.push_str(&e.to_string());
                    body.push('\n');
                }
                let r = client
                    .post(&url)
                    .header("content-type", "application/x-ndjson")
                    .body(body)
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status() == 200 => {
                        let v: Value = r.json().await.unwrap_or_default();
                        for (k, c) in [("legacy", &legacy), ("dual", &dual), ("kafka", &kafka)] {
                            c.fetch_add(v[k].as_u64().unwrap_or(0), Ordering::Relaxed);
                        }
                    }
                    _ => {
                        refused.fetch_add(10, Ordering::Relaxed);
                    }
                }
            }
        })
    };

    // Sampling, flag flips and broker cuts, once a second.
    let started = Instant::now();
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); pids.len() * 2 + 1];
    let mut cuts = 0;
    let mut flips = 0;
    let mut cut_until: Option<Instant> = None;
    let mut next_cut = Duration::from_secs(cut_every);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    while started.elapsed() < Duration::from_secs(secs) {
        tick.tick().await;
        for (i, (name, pid)) in pids.iter().enumerate() {
            let rss = proc_status_kib(*pid, "VmRSS")
                .unwrap_or_else(|| panic!("{name} is gone after {:?}", started.elapsed()));
            samples[2 * i].push(rss as f64);
            samples[2 * i + 1].push(fds(*pid) as f64);
        }
        samples[pids.len() * 2].push(folder_bytes(&dirs.offline) as f64);
        let t = started.elapsed();
        if t.as_secs() > 0 && t.as_secs().is_multiple_of(60) {
            flips += 1;
            let (d, k) = if flips % 2 == 1 { (70, 30) } else { (50, 20) };
            // Raised dual-write first, lowered Kafka-only first: never above.
            if flips % 2 == 1 {
                set_flag(&dirs.flags, "switchyard-dual-write", json!(d));
                set_flag(&dirs.flags, "switchyard-kafka-only", json!(k));
            } else {
                set_flag(&dirs.flags, "switchyard-kafka-only", json!(k));
                set_flag(&dirs.flags, "switchyard-dual-write", json!(d));
            }
        }
        if cut_until.is_none() && t >= next_cut {
            cut.cut();
            cuts += 1;
            cut_until = Some(Instant::now() + Duration::from_secs(10));
            next_cut += Duration::from_secs(cut_every);
        }
        if cut_until.is_some_and(|u| Instant::now() >= u) {
            cut.restore().await;
            cut_until = None;
        }
    }
    if cut_until.is_some() {
        cut.restore().await;
    }
    stop.store(true, Ordering::Relaxed);
    traffic.await.unwrap();
    let (legacy, dual, kafka, refused) = (
        legacy.load(Ordering::Relaxed) as i64,
        dual.load(Ordering::Relaxed) as i64,
        kafka.load(Ordering::Relaxed) as i64,
        refused.load(Ordering::Relaxed),
    );

    // Every acknowledged row lands where it is due: OLD legacy + dual, NEW
    // dual + Kafka (fallbacks replayed by the loader).
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let (o, n) = (old.count().await, new.count().await);
        println!(
            "settling: OLD {o} of {}, NEW {n} of {}",
            legacy + dual,
            dual + kafka
        );
        if o == legacy + dual && n == dual + kafka {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "rows acknowledged and not stored: OLD {o} of {}, NEW {n} of {}; loader: {} files pending, {} lines to replay; ingest lag {}",
            legacy + dual,
            dual + kafka,
            load.metric("switchyard_load_files_pending"),
            load.metric("switchyard_load_replay_backlog_lines"),
            ingest.metric("switchyard_ingest_lag_messages")
        );
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    let parity_url = format!("http://127.0.0.1:{}/parity", compare.admin_port);
    let mut parity = Value::Null;
    let deadline = Instant::now() + Duration::from_secs(600);
    while Instant::now() < deadline {
        parity = reqwest::get(&parity_url)
            .await
            .unwrap()
            .json()
            .await
            .unwrap_or_default();
        if parity["status"] == "ok" || parity["status"] == "mismatch" {
            let open = parity["tables"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|t| t["details"].as_array().into_iter().flatten())
                .filter(|w| w["status"] != "ok" && w["status"] != "mismatch")
                .count();
            if open == 0 {
                break;
            }
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }

    // Figures and trends, after a warm-up of a fifth of the run (at least
    // two minutes when the run allows it).
    let warm = (samples[0].len() / 5).max(120.min(samples[0].len() / 2));
    let mut report = format!(
        "soak: {secs} s at {rate} payloads/s, {flips} flag flips, {cuts} broker cuts; rows acknowledged: {legacy} legacy, {dual} dual, {kafka} kafka ({refused} refused); parity {}\n",
        parity["status"]
    );
    let mut failures = Vec::new();
    for (i, (name, _)) in pids.iter().enumerate() {
        let rss = &samples[2 * i][warm..];
        let fd = &samples[2 * i + 1][warm..];
        report.push_str(&format!(
            "{name:8} RSS {:.1} MiB after warm-up → {:.1} MiB at the end (peak {:.1}); fds {} → {}\n",
            rss[0] / 1024.0,
            rss[rss.len() - 1] / 1024.0,
            rss.iter().copied().fold(0.0, f64::max) / 1024.0,
            fd[0],
            fd[fd.len() - 1]
        ));
        if let Some(g) = trends_up(rss, 8.0 * 1024.0) {
            failures.push(format!("{name} RSS grows: +{:.1} MiB", g / 1024.0));
        }
        if let Some(g) = trends_up(fd, 8.0) {
            failures.push(format!("{name} file descriptors grow: +{g:.0}"));
        }
    }
    let folder = &samples[pids.len() * 2][warm..];
    report.push_str(&format!(
        "offline folder {:.1} MiB after warm-up → {:.1} MiB at the end (peak {:.1})\n",
        folder[0] / 1048576.0,
        folder[folder.len() - 1] / 1048576.0,
        folder.iter().copied().fold(0.0, f64::max) / 1048576.0
    ));
    if let Some(g) = trends_up(folder, 16.0 * 1048576.0) {
        failures.push(format!(
            "the offline folder grows: +{:.1} MiB",
            g / 1048576.0
        ));
    }
    print!("{report}");
    if let Ok(path) = std::env::var("SWITCHYARD_SOAK_REPORT") {
        let _ = std::fs::write(path, &report);
    }
    assert_eq!(parity["status"], "ok", "parity at the end: {parity}");
    assert!(failures.is_empty(), "{}", failures.join("; "));
}
