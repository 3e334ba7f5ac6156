//! `switchyard demo`: every role in one process on embedded defaults — the
//! router, the offline loader into SQLite (OLD), the ingest consumer into
//! SQLite (NEW), the comparator — against librdkafka's in-process mock
//! cluster (or a real broker), fed by a synthetic traffic generator, walking
//! a rollout and showing at each step what goes where and the parity verdict.

pub mod cli;
mod traffic;

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::admin::Health;
use crate::compare::state::Status;
use crate::compare::{Comparator, CompareMetrics, CompareOptions};
use crate::config::PipelineConfig;
use crate::db::Db;
use crate::flags::store::{FlagStore, Which};
use crate::ingest::{self, IngestMetrics, IngestOptions};
use crate::load::{self, LoadMetrics, LoadOptions, Replay};
use crate::route::{self, RouteOptions};

pub use traffic::Counts;

/// How the demo runs.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// A real broker instead of the in-process mock cluster.
    pub kafka_brokers: Option<String>,
    /// How long each rollout step is shown.
    pub phase: Duration,
    /// Payloads per second from the traffic generator.
    pub rate: u32,
    /// Keep running (with live updates) after the walk, until Ctrl-C.
    pub follow: bool,
    /// Keep the work folder (files and SQLite databases) afterwards.
    pub keep: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("demo set-up: {0}")]
    Setup(String),
}

/// What the demo saw.
#[derive(Debug, Clone, Default)]
pub struct DemoSummary {
    pub counts: Counts,
    pub old_rows: i64,
    pub new_rows: i64,
    pub parity: String,
    pub mismatched_windows: usize,
}

/// The rollout the demo walks: (title, dual-write %, kafka-only %, kill switch).
const PHASES: [(&str, f64, f64, bool); 5] = [
    ("legacy only", 0.0, 0.0, false),
    ("10% dual-write", 10.0, 0.0, false),
    ("50% dual-write", 50.0, 0.0, false),
    ("10% Kafka only (50% dual)", 50.0, 10.0, false),
    ("kill switch: everything legacy", 50.0, 10.0, true),
];

fn setup<E: std::fmt::Display>(what: &str) -> impl Fn(E) -> DemoError + '_ {
    move |e| DemoError::Setup(format!("{what}: {e}"))
}

pub async fn run(
    opts: DemoOptions,
    shutdown: CancellationToken,
    out: &mut (dyn Write + Send),
) -> Result<DemoSummary, DemoError> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let work = std::env::temp_dir().join(format!("switchyard-demo-{}-{stamp}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(setup("work folder"))?;
    let res = run_in(&opts, &work, shutdown, out).await;
    if opts.keep {
        let _ = writeln!(out, "work folder kept: {}", work.display());
    } else {
        let _ = std::fs::remove_dir_all(&work);
    }
    res
}

async fn run_in(
    opts: &DemoOptions,
    work: &std::path::Path,
    shutdown: CancellationToken,
    out: &mut (dyn Write + Send),
) -> Result<DemoSummary, DemoError> {
    let topic = "switchyard.demo".to_string();
    // The mock cluster lives (and listens on loopback) as long as this function.
    let mock;
    let brokers = match &opts.kafka_brokers {
        Some(b) => b.clone(),
        None => {
            mock = rdkafka::mocking::MockCluster::new(1).map_err(setup("mock Kafka cluster"))?;
            mock.create_topic(&topic, 4, 1)
                .map_err(setup("mock topic"))?;
            mock.bootstrap_servers()
        }
    };
    let mut cfg = PipelineConfig::load(None).map_err(setup("embedded configuration"))?;
    cfg.offline.dir = work.join("offline");
    cfg.offline.max_file_age_secs = 1;
    cfg.flags.dir = work.join("flags");
    cfg.flags.poll_ms = 50;
    cfg.kafka.topic = topic.clone();
    std::fs::create_dir_all(&cfg.flags.dir).map_err(setup("flags folder"))?;
    std::fs::create_dir_all(&cfg.offline.dir).map_err(setup("offline folder"))?;
    let schema = cfg.schema().map_err(setup("schema"))?;
    let old = Db::connect(&format!("sqlite:{}", work.join("old.db").display()), 4)
        .map_err(setup("OLD database"))?;
    let new = Db::connect(&format!("sqlite:{}", work.join("new.db").display()), 4)
        .map_err(setup("NEW database"))?;
    old.init(&schema).await.map_err(setup("OLD database"))?;
    new.init(&schema).await.map_err(setup("NEW database"))?;
    let store = FlagStore::Local {
        dir: cfg.flags.dir.clone(),
        keys: cfg.flags.keys.clone(),
    };

    let stop = CancellationToken::new();
    let mut tasks = Vec::new();
    // The router, on loopback ports of its own choosing.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(setup("listen"))?;
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(setup("listen"))?;
    let url = format!(
        "http://{}/v1/items",
        listener.local_addr().map_err(setup("listen"))?
    );
    let route_registry = prometheus::Registry::new();
    let route_stop = CancellationToken::new();
    let router = tokio::spawn(route::run(
        RouteOptions {
            config: cfg.clone(),
            kafka_brokers: brokers.clone(),
            kafka_extra: vec![],
            launchdarkly: None,
        },
        listener,
        admin,
        route_registry,
        route_stop.clone(),
    ));
    let load_registry = prometheus::Registry::new();
    let load_metrics = LoadMetrics::new(&load_registry).map_err(setup("metrics"))?;
    {
        let replay = Replay::new(&brokers, &cfg.kafka, &[], &load_metrics)
            .map_err(setup("replay producer"))?;
        let opts = LoadOptions {
            dir: cfg.offline.dir.clone(),
            batch_size: 2000,
            archive_dir: None,
            dead_letter_dir: work.join("dead-letter"),
            poll: Duration::from_millis(200),
            once: false,
            progress: false,
        };
        let (schema, db, s, m) = (
            schema.clone(),
            old.clone(),
            stop.clone(),
            load_metrics.clone(),
        );
        tasks.push(tokio::spawn(async move {
            if let Err(e) = load::run(opts, &schema, &db, Some(replay), m, s).await {
                tracing::error!(error = %e, "demo loader stopped");
            }
        }));
    }
    let ingest_registry = prometheus::Registry::new();
    let ingest_metrics = IngestMetrics::new(&ingest_registry).map_err(setup("metrics"))?;
    {
        let opts = IngestOptions {
            brokers: brokers.clone(),
            topics: vec![topic.clone()],
            group: "switchyard-demo-ingest".into(),
            batch_size: 2000,
            consumer_timeout: Duration::from_millis(150),
            extra: vec![],
            idle_exit: None,
        };
        let (schema, db, s, m) = (
            schema.clone(),
            new.clone(),
            stop.clone(),
            ingest_metrics.clone(),
        );
        tasks.push(tokio::spawn(async move {
            if let Err(e) = ingest::run(opts, &schema, &db, m, Health::default(), s).await {
                tracing::error!(error = %e, "demo ingest stopped");
            }
        }));
    }
    let cmp = Comparator::new(
        schema.clone(),
        old.clone(),
        new.clone(),
        CompareOptions {
            brokers: brokers.clone(),
            topic: topic.clone(),
            group: "switchyard-demo-compare".into(),
            extra: vec![],
            window_secs: 5,
            settle: Duration::from_secs(3),
            max_lateness: Duration::from_secs(20),
            recheck: Duration::from_secs(5),
            check_interval: Duration::from_millis(500),
            retain: Duration::from_secs(3600),
            max_ids: 10,
        },
        CompareMetrics::new(&prometheus::Registry::new()).map_err(setup("metrics"))?,
    );
    {
        let (c, s) = (cmp.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            if let Err(e) = c.run(s).await {
                tracing::error!(error = %e, "demo comparator stopped");
            }
        }));
    }
    // Wait for the router.
    let client = reqwest::Client::new();
    let ready = Instant::now();
    while client
        .get(url.replace("/v1/items", "/v1/route/1"))
        .send()
        .await
        .is_err()
    {
        if ready.elapsed() > Duration::from_secs(30) || router.is_finished() {
            return Err(DemoError::Setup("the router did not start".into()));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let counts = Arc::new(traffic::Tally::default());
    let traffic_stop = CancellationToken::new();
    let traffic = tokio::spawn(traffic::generate(
        url.clone(),
        opts.rate,
        counts.clone(),
        traffic_stop.clone(),
    ));

    let _ = writeln!(
        out,
        "switchyard demo: router {url}, Kafka {}, OLD and NEW in SQLite under {}",
        if opts.kafka_brokers.is_some() {
            brokers.as_str()
        } else {
            "in-process mock cluster"
        },
        work.display()
    );
    let started = Instant::now();
    let mut summary_phase = String::new();
    'walk: for (i, (title, dual, kafka, kill)) in PHASES.iter().enumerate() {
        let set = |w: Which, v: serde_json::Value| store.set(w, v, true, "demo");
        set(Which::DualWrite, json!(dual))
            .await
            .map_err(setup("flags"))?;
        set(Which::KafkaOnly, json!(kafka))
            .await
            .map_err(setup("flags"))?;
        set(Which::KillSwitch, json!(kill))
            .await
            .map_err(setup("flags"))?;
        let _ = writeln!(
            out,
            "\n== step {}/{}: {title} (dual-write {dual}%, kafka-only {kafka}%, kill switch {}) ==",
            i + 1,
            PHASES.len(),
            if *kill { "on" } else { "off" }
        );
        let phase_start = Instant::now();
        let mut last = counts.snapshot();
        while phase_start.elapsed() < opts.phase {
            tokio::select! {
                _ = shutdown.cancelled() => break 'walk,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            let now = counts.snapshot();
            let line = status_line(&now, &last, &ingest_registry, &load_metrics, &cmp, started);
            let _ = writeln!(out, "{line}");
            last = now;
        }
        summary_phase = title.to_string();
    }
    if opts.follow {
        let _ = writeln!(out, "\nfollowing (Ctrl-C to stop)…");
        let mut last = counts.snapshot();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            let now = counts.snapshot();
            let _ = writeln!(
                out,
                "{}",
                status_line(&now, &last, &ingest_registry, &load_metrics, &cmp, started)
            );
            last = now;
        }
    }
    traffic_stop.cancel();
    let _ = traffic.await;
    // Let the pipelines drain and the last windows settle.
    let _ = writeln!(out, "\ntraffic stopped after \"{summary_phase}\"; letting the pipelines drain and parity settle…");
    let total = counts.snapshot();
    let drain = Instant::now();
    let mut settled = false;
    while drain.elapsed() < Duration::from_secs(60) && !shutdown.is_cancelled() {
        let p = cmp.parity();
        let open: usize = p
            .tables
            .iter()
            .map(|t| {
                t.windows.get("open").copied().unwrap_or(0)
                    + t.windows.get("pending").copied().unwrap_or(0)
            })
            .sum();
        let old_rows = old.count("raw_item").await.unwrap_or(0);
        let new_rows = new.count("raw_item").await.unwrap_or(0);
        if open == 0
            && old_rows as u64 == total.legacy + total.dual
            && new_rows as u64 == total.dual + total.kafka
        {
            settled = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let p = cmp.parity();
    let summary = DemoSummary {
        counts: total,
        old_rows: old.count("raw_item").await.unwrap_or(-1),
        new_rows: new.count("raw_item").await.unwrap_or(-1),
        parity: p.status.as_str().to_string(),
        mismatched_windows: p
            .tables
            .iter()
            .map(|t| t.windows.get("mismatch").copied().unwrap_or(0))
            .sum(),
    };
    let _ = writeln!(out, "\n== summary ==");
    let _ = writeln!(
        out,
        "payloads accepted: {} (legacy {}, dual {}, Kafka only {}), refused: {}",
        total.accepted(),
        total.legacy,
        total.dual,
        total.kafka,
        total.errors
    );
    let _ = writeln!(
        out,
        "OLD (offline files → load → SQLite): {} rows, expected {}",
        summary.old_rows,
        total.legacy + total.dual
    );
    let _ = writeln!(
        out,
        "NEW (Kafka → ingest → SQLite):        {} rows, expected {}",
        summary.new_rows,
        total.dual + total.kafka
    );
    for t in &p.tables {
        let _ = writeln!(out, "parity {}: expected OLD/NEW {}/{}, found {}/{}, missing {}/{}, windows ok {} pending {} mismatch {}",
            t.table, t.expected_old, t.expected_new, t.found_old, t.found_new, t.missing_old, t.missing_new,
            t.windows.get("ok").copied().unwrap_or(0), t.windows.get("pending").copied().unwrap_or(0), t.windows.get("mismatch").copied().unwrap_or(0));
    }
    let _ = writeln!(
        out,
        "parity: {}{}",
        summary.parity,
        if settled { "" } else { " (not fully settled)" }
    );

    stop.cancel();
    route_stop.cancel();
    let _ = router.await;
    for t in tasks {
        let _ = t.await;
    }
    if p.status == Status::Mismatch || !settled {
        return Err(DemoError::Setup(format!(
            "parity {} after the walk",
            summary.parity
        )));
    }
    Ok(summary)
}

fn status_line(
    now: &Counts,
    last: &Counts,
    ingest: &prometheus::Registry,
    load: &LoadMetrics,
    cmp: &Arc<Comparator>,
    started: Instant,
) -> String {
    let lag: i64 = ingest
        .gather()
        .iter()
        .filter(|f| f.name() == "switchyard_ingest_lag_messages")
        .flat_map(|f| {
            f.get_metric()
                .iter()
                .map(|m| m.get_gauge().get_value() as i64)
                .collect::<Vec<_>>()
        })
        .sum();
    let p = cmp.parity();
    let w = |s: &str| {
        p.tables
            .iter()
            .map(|t| t.windows.get(s).copied().unwrap_or(0))
            .sum::<usize>()
    };
    format!(
        "{:>4}s  legacy {:>5}/s  dual {:>5}/s  kafka {:>5}/s  │ lag {:>5}  backlog {:>2} files │ parity {:<8} ok {:>3} pending {:>2} mismatch {:>2}",
        started.elapsed().as_secs(),
        now.legacy - last.legacy,
        now.dual - last.dual,
        now.kafka - last.kafka,
        lag,
        load.files_pending.get(),
        p.status.as_str(),
        w("ok"),
        w("pending"),
        w("mismatch"),
    )
}
