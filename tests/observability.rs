//! A real Prometheus scrapes every role (and a rollout controller holding its
//! first step) while traffic flows; then every dashboard panel's query and
//! every alert rule's signal is run against it, and each must parse and return
//! data. `promtool check rules` must pass.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// Every `expr` of every panel of every dashboard, with its panel title.
fn dashboard_queries() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo("dashboards"))
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    assert!(files.len() >= 3, "dashboards/*.json");
    for f in files {
        let d: Value = serde_json::from_str(&std::fs::read_to_string(&f).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        assert!(
            d["uid"].is_string() && d["title"].is_string(),
            "{}",
            f.display()
        );
        for p in d["panels"].as_array().unwrap() {
            if p["type"] == "row" {
                continue;
            }
            let targets = p["targets"].as_array().unwrap();
            assert!(
                !targets.is_empty(),
                "{}: a panel without a query",
                f.display()
            );
            for t in targets {
                out.push((
                    format!(
                        "{} / {}",
                        d["title"].as_str().unwrap(),
                        p["title"].as_str().unwrap()
                    ),
                    t["expr"].as_str().unwrap().to_string(),
                ));
            }
        }
    }
    out
}

/// (alert name, signal): each rule is `<signal> > <threshold>`.
fn alert_signals() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo("dashboards/alerts.yml")).unwrap();
    let mut out = Vec::new();
    let mut name = String::new();
    for line in text.lines() {
        let l = line.trim();
        if let Some(n) = l.strip_prefix("- alert:") {
            name = n.trim().to_string();
        } else if let Some(e) = l.strip_prefix("expr:") {
            let (signal, threshold) = e
                .trim()
                .rsplit_once(" > ")
                .expect("`<signal> > <threshold>`");
            assert!(
                threshold.trim().parse::<f64>().is_ok(),
                "{name}: {threshold}"
            );
            out.push((name.clone(), signal.trim().to_string()));
        }
    }
    assert!(out.len() >= 4, "alert rules");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_panel_and_alert_returns_data_from_a_real_prometheus() {
    let out = Command::new("promtool")
        .args([
            "check",
            "rules",
            &repo("dashboards/alerts.yml").display().to_string(),
        ])
        .output()
        .expect("promtool is not installed: run scripts/services");
    assert!(
        out.status.success(),
        "promtool: {}",
        String::from_utf8_lossy(&out.stdout)
    );

    let broker = Broker::start();
    let topic = unique("obs");
    create_topic(&broker.brokers(), &topic, 2).await;
    let dirs = Dirs::new();
    let text =
        switchyard::config::EMBEDDED.replace("max_file_age_secs = 60", "max_file_age_secs = 1");
    let cfg_path = write_config(&text, &dirs, &topic);
    let schema = config(&dirs, &topic).schema().unwrap();
    let old = TestDb::mariadb(&schema).await;
    let new = TestDb::postgres(&schema).await;
    set_flag(&dirs.flags, "switchyard-dual-write", json!(50));
    set_flag(&dirs.flags, "switchyard-kafka-only", json!(25));
    let (cfg, brokers) = (cfg_path.display().to_string(), broker.brokers());
    let router = Process::spawn(&cfg_path, &brokers);
    let group = unique("g");
    let ingest = Role::spawn(&[
        "ingest",
        "--config",
        &cfg,
        "--kafka-brokers",
        &brokers,
        "--kafka-group",
        &group,
        "--db-url",
        &new.url,
    ]);
    let load = Role::spawn(&[
        "load",
        "--config",
        &cfg,
        "--kafka-brokers",
        &brokers,
        "--db-url",
        &old.url,
    ]);
    let compare = Role::spawn(&[
        "compare",
        "--config",
        &cfg,
        "--kafka-brokers",
        &brokers,
        "--old-db-url",
        &old.url,
        "--new-db-url",
        &new.url,
        "--settle-secs",
        "1",
        "--check-interval-secs",
        "0.5",
        "--recheck-secs",
        "1",
    ]);
    // A rollout controller on the router's flags folder, checking parity
    // against the comparator above. Its first step is the dual-write value
    // already set (kafka-only 25 may not exceed it), and the dwell is an hour:
    // it holds step 1 for the whole test, so its series stay put. The
    // traffic's rows are from 2019, so no window of the step ever holds rows:
    // every check is `pending`, never a breach.
    let plan_path = dirs.root.path().join("plan.toml");
    std::fs::write(
        &plan_path,
        format!(
            r#"
            stage = "dual-write"
            steps = [50, 100]
            dwell_secs = 3600
            check_interval_secs = 0.5
            failure_limit = 1000
            parity_url = "http://127.0.0.1:{}"
            state_file = "{}"
            "#,
            compare.admin_port,
            dirs.root.path().join("rollout-state.json").display()
        ),
    )
    .unwrap();
    let rollout = Role::spawn(&[
        "rollout",
        "run",
        "--plan",
        &plan_path.display().to_string(),
        "--config",
        &cfg,
    ]);
    let targets = [
        ("route", router.admin_port),
        ("ingest", ingest.admin_port),
        ("load", load.admin_port),
        ("compare", compare.admin_port),
        ("rollout", rollout.admin_port),
    ];
    let prom = Prometheus::start(Some(&repo("dashboards/alerts.yml")), &targets);

    // Traffic, with a few refused requests so the error panels have data.
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = {
        let (url, stop) = (router.url(), stop.clone());
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut seq = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let mut body = String::new();
                for _ in 0..20 {
                    seq += 1;
                    body.push_str(&envelope(seq % 211, seq, 300).to_string());
                    body.push('\n');
                }
                let _ = client
                    .post(&url)
                    .header("content-type", "application/x-ndjson")
                    .body(body)
                    .send()
                    .await;
                if seq.is_multiple_of(400) {
                    let _ = client
                        .post(&url)
                        .header("content-type", "application/json")
                        .body("{")
                        .send()
                        .await;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    let deadline = Instant::now() + Duration::from_secs(90);
    // Every role is scraped before any query is judged.
    let all_up = targets.len().to_string();
    loop {
        let up = prom.query("count(up == 1)").await;
        if up["data"]["result"][0]["value"][1] == all_up {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not every role is up in Prometheus: {up}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut pending: Vec<(String, String)> = dashboard_queries()
        .into_iter()
        .chain(
            alert_signals()
                .into_iter()
                .map(|(n, s)| (format!("alert {n}"), s)),
        )
        .collect();
    let total = pending.len();
    while !pending.is_empty() && Instant::now() < deadline {
        let mut still = Vec::new();
        for (what, expr) in pending {
            let q = expr.replace("$__rate_interval", "10s");
            let v = prom.query(&q).await;
            assert_eq!(v["status"], "success", "{what}: {q} does not parse: {v}");
            if v["data"]["result"].as_array().is_none_or(|r| r.is_empty()) {
                still.push((what, expr));
            }
        }
        pending = still;
        if !pending.is_empty() {
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let _ = traffic.await;
    assert!(
        pending.is_empty(),
        "queries without data after 90 s: {:#?}",
        pending
    );
    // The rollout row shows the step the controller holds.
    let status = prom
        .query("max by (status) (switchyard_rollout_status) == 1")
        .await;
    assert_eq!(
        status["data"]["result"][0]["metric"]["status"], "running",
        "{status}"
    );
    let percent = prom.query("max(switchyard_rollout_percent)").await;
    assert_eq!(percent["data"]["result"][0]["value"][1], "50", "{percent}");
    let rules = prom.rules().await;
    let mut n = 0;
    for g in rules["data"]["groups"].as_array().unwrap() {
        for r in g["rules"].as_array().unwrap() {
            n += 1;
            assert_eq!(r["health"], "ok", "rule {}: {}", r["name"], r["lastError"]);
        }
    }
    assert_eq!(n, alert_signals().len());
    eprintln!("{total} panel queries and alert signals returned data; {n} rules evaluated healthy");
}
