//! `switchyard demo`: every role in one process on embedded defaults — the
//! router, the offline loader into SQLite (OLD), the ingest consumer into
//! SQLite (NEW), the comparator — against librdkafka's in-process mock
//! cluster (or a real broker), fed by a synthetic traffic generator, walking
//! a rollout and showing at each step what goes where and the parity verdict.
//!
//! The demo shows its own view on stdout (see [`view`]); the roles' logs go
//! to a file in its work folder (see [`crate::logging`]), kept when the folder is
//! removed.

pub mod cli;
mod traffic;
mod view;

use std::io::Write;
use std::path::{Path, PathBuf};
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
use view::{Drain, Sample, Step, View, Windows};

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
    /// Redraw a table in place (stdout is a terminal) rather than append lines.
    pub live: bool,
    /// With colours (live view only).
    pub color: bool,
    /// The roles log to the work folder's log file (else elsewhere: stderr).
    pub log_to_file: bool,
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

/// The rollout the demo walks.
const PHASES: [Step; 5] = [
    Step {
        title: "legacy only",
        short: "legacy only",
        dual: 0.0,
        kafka: 0.0,
        kill: false,
    },
    Step {
        title: "10% dual-write",
        short: "10% dual-write",
        dual: 10.0,
        kafka: 0.0,
        kill: false,
    },
    Step {
        title: "50% dual-write",
        short: "50% dual-write",
        dual: 50.0,
        kafka: 0.0,
        kill: false,
    },
    Step {
        title: "10% Kafka only (50% dual)",
        short: "10% Kafka only",
        dual: 50.0,
        kafka: 10.0,
        kill: false,
    },
    Step {
        title: "kill switch: everything legacy",
        short: "kill switch",
        dual: 50.0,
        kafka: 10.0,
        kill: true,
    },
];

/// The roles' log, in the work folder.
const LOG_FILE: &str = "demo.log";

/// The demo's work folder: offline files, flags, the SQLite databases and
/// the roles' log. Created before anything starts, so the log is there
/// from the first line.
#[derive(Debug)]
pub struct WorkFolder {
    dir: PathBuf,
}

impl WorkFolder {
    /// A new folder under the system's temporary folder.
    pub fn create() -> Result<WorkFolder, DemoError> {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let dir =
            std::env::temp_dir().join(format!("switchyard-demo-{}-{stamp}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(setup("work folder"))?;
        Ok(WorkFolder { dir })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Where the roles' logs go (unless they go to stderr).
    pub fn log_file(&self) -> PathBuf {
        self.dir.join(LOG_FILE)
    }

    /// Removes the folder and everything in it but the log, which moves next
    /// to it (`<folder>.log`). Returns where the log is, if there is one.
    pub fn remove_but_log(self) -> Option<PathBuf> {
        let log = self.log_file();
        if !log.is_file() {
            let _ = std::fs::remove_dir_all(&self.dir);
            return None;
        }
        let mut beside = self.dir.clone().into_os_string();
        beside.push(".log");
        let beside = PathBuf::from(beside);
        if std::fs::rename(&log, &beside).is_ok() {
            let _ = std::fs::remove_dir_all(&self.dir);
            return Some(beside);
        }
        // Cannot move it: empty the folder around it.
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                let p = e.path();
                if p == log {
                    continue;
                }
                let _ = if p.is_dir() {
                    std::fs::remove_dir_all(&p)
                } else {
                    std::fs::remove_file(&p)
                };
            }
        }
        Some(log)
    }
}

fn setup<E: std::fmt::Display>(what: &str) -> impl Fn(E) -> DemoError + '_ {
    move |e| DemoError::Setup(format!("{what}: {e}"))
}

/// Runs the demo in `work` (see [`WorkFolder::create`]), then removes it
/// unless `opts.keep`. The last line names the roles' log file.
pub async fn run(
    opts: DemoOptions,
    work: WorkFolder,
    shutdown: CancellationToken,
    out: &mut (dyn Write + Send),
) -> Result<DemoSummary, DemoError> {
    let res = run_in(&opts, work.path(), shutdown, out).await;
    let log = if opts.keep {
        let _ = writeln!(out, "work folder kept: {}", work.path().display());
        Some(work.log_file()).filter(|l| l.is_file())
    } else {
        work.remove_but_log()
    };
    if let Some(log) = log.filter(|_| opts.log_to_file) {
        let _ = writeln!(out, "logs: {}", log.display());
    }
    let _ = out.flush();
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
            batch_bytes: 8 << 20,
            archive_dir: None,
            loader_id: "demo".to_string(),
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
            batch_bytes: 8 << 20,
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
        "switchyard demo: router {url}, Kafka {}\nOLD and NEW databases: SQLite under {}",
        if opts.kafka_brokers.is_some() {
            brokers.as_str()
        } else {
            "in-process mock cluster"
        },
        work.display()
    );
    if opts.log_to_file {
        let _ = writeln!(out, "the roles' logs: {}", work.join(LOG_FILE).display());
    }
    let mut view = View::new(&PHASES, opts.phase, opts.live, opts.color);
    if opts.live {
        let _ = writeln!(out);
    }
    let mut probe = Probe {
        tally: &counts,
        ingest: &ingest_registry,
        load: &load_metrics,
        cmp: &cmp,
        old: &old,
        new: &new,
        started: Instant::now(),
        last: counts.snapshot(),
        rows: (0, 0),
    };
    'walk: for (i, step) in PHASES.iter().enumerate() {
        let set = |w: Which, v: serde_json::Value| store.set(w, v, true, "demo");
        // The kill switch first: a folder without one fails closed.
        set(Which::KillSwitch, json!(step.kill))
            .await
            .map_err(setup("flags"))?;
        set(Which::DualWrite, json!(step.dual))
            .await
            .map_err(setup("flags"))?;
        set(Which::KafkaOnly, json!(step.kafka))
            .await
            .map_err(setup("flags"))?;
        probe.last = counts.snapshot();
        view.begin_step(out, i, probe.last);
        let phase_start = Instant::now();
        while phase_start.elapsed() < opts.phase {
            tokio::select! {
                _ = shutdown.cancelled() => break 'walk,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            view.sample(out, probe.sample().await);
        }
    }
    if opts.follow && !shutdown.is_cancelled() {
        view.following(out);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            view.sample(out, probe.sample().await);
        }
    }
    traffic_stop.cancel();
    let _ = traffic.await;
    let total = counts.snapshot();
    view.end_step(total);
    // Let the pipelines drain and the last windows settle.
    let drain = Instant::now();
    let mut settled = false;
    let (old_expected, new_expected) = (total.legacy + total.dual, total.dual + total.kafka);
    while drain.elapsed() < Duration::from_secs(60) && !shutdown.is_cancelled() {
        let s = probe.sample().await;
        let unsettled = s.windows.open + s.windows.pending;
        settled = unsettled == 0
            && s.old_rows as u64 == old_expected
            && s.new_rows as u64 == new_expected;
        let d = Drain {
            old_expected,
            new_expected,
            unsettled,
        };
        view.draining(out, d, s);
        if settled {
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
        mismatched_windows: windows(&p).mismatch,
    };
    view.finish(out);
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

/// Parity windows by verdict, over every table.
fn windows(p: &crate::compare::Parity) -> Windows {
    let w = |s: &str| {
        p.tables
            .iter()
            .map(|t| t.windows.get(s).copied().unwrap_or(0))
            .sum::<usize>()
    };
    Windows {
        open: w("open"),
        ok: w("ok"),
        pending: w("pending"),
        mismatch: w("mismatch"),
    }
}

/// Takes the samples the view shows, a second apart.
struct Probe<'a> {
    tally: &'a traffic::Tally,
    ingest: &'a prometheus::Registry,
    load: &'a LoadMetrics,
    cmp: &'a Comparator,
    old: &'a Db,
    new: &'a Db,
    started: Instant,
    /// The tally at the previous sample.
    last: Counts,
    /// Rows in OLD and NEW at the previous sample (kept if a count fails).
    rows: (i64, i64),
}

impl Probe<'_> {
    async fn sample(&mut self) -> Sample {
        let now = self.tally.snapshot();
        let rate = Counts {
            legacy: now.legacy - self.last.legacy,
            dual: now.dual - self.last.dual,
            kafka: now.kafka - self.last.kafka,
            errors: now.errors - self.last.errors,
        };
        self.last = now;
        let lag: i64 = self
            .ingest
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
        if let Ok(n) = self.old.count("raw_item").await {
            self.rows.0 = n;
        }
        if let Ok(n) = self.new.count("raw_item").await {
            self.rows.1 = n;
        }
        let p = self.cmp.parity();
        Sample {
            secs: self.started.elapsed().as_secs(),
            rate,
            total: now,
            old_rows: self.rows.0,
            new_rows: self.rows.1,
            lag,
            backlog: self.load.files_pending.get(),
            parity: p.status,
            windows: windows(&p),
        }
    }
}
