//! The rollout controller with real traffic, broker, databases and
//! comparator: a full rollout to 100% with zero mismatches, a rollback when
//! rows vanish from NEW mid-rollout, and the kill switch under load.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use serde_json::{json, Value};
use switchyard::admin::Health;
use switchyard::compare::CompareMetrics;
use switchyard::compare::{parity_router, Comparator, CompareOptions};
use switchyard::flags::store::{FlagStore, Which};
use switchyard::flags::FlagKeys;
use switchyard::ingest::IngestMetrics;
use switchyard::ingest::{self, IngestOptions};
use switchyard::rollout::plan::Plan;
use switchyard::rollout::RolloutMetrics;
use switchyard::rollout::{Controller, Outcome};
use tokio_util::sync::CancellationToken;

fn unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

struct Live {
    /// Held for its lifetime: dropping it stops the broker.
    _broker: Broker,
    dirs: Dirs,
    old: TestDb,
    new: TestDb,
    router: InProcess,
    parity_port: u16,
    /// The ingest consumer's admin port (its `/metrics`).
    ingest_port: u16,
    stop: CancellationToken,
    traffic_stop: Arc<AtomicBool>,
    traffic: Option<tokio::task::JoinHandle<()>>,
    /// (sent at, route) of every payload acknowledged.
    acked: Arc<Mutex<Vec<(Instant, String)>>>,
}

impl Live {
    /// Router, ingest into PostgreSQL, comparator (OLD is not needed for
    /// Kafka-bound parity of a dual-write rollout, but dual rows are checked
    /// in OLD too: the loader runs), and traffic with current timestamps.
    async fn start() -> Live {
        Live::start_with(Duration::from_secs(3), false).await
    }

    /// With the comparator's `max_lateness`, and a broker that keeps its
    /// records one by one (`persistent`: a consumer that pauses and resumes
    /// mid-batch gets every message; see `Broker::start_persistent`).
    async fn start_with(max_lateness: Duration, persistent: bool) -> Live {
        let broker = if persistent {
            Broker::start_persistent()
        } else {
            Broker::start()
        };
        let topic = unique("ro");
        create_topic(&broker.brokers(), &topic, 2).await;
        let dirs = Dirs::new();
        let mut cfg = config(&dirs, &topic);
        cfg.offline.max_file_age_secs = 1;
        let schema = cfg.schema().unwrap();
        let old = TestDb::mariadb(&schema).await;
        let new = TestDb::postgres(&schema).await;
        let router = InProcess::start(cfg.clone(), &broker.brokers()).await;
        let stop = CancellationToken::new();
        let ingest_port;
        {
            let (schema, db, s) = (schema.clone(), new.db.clone(), stop.clone());
            let opts = IngestOptions {
                brokers: broker.brokers(),
                topics: vec![topic.clone()],
                group: unique("g"),
                batch_size: 500,
                batch_bytes: 8 << 20,
                consumer_timeout: Duration::from_millis(50),
                extra: vec![],
                idle_exit: None,
            };
            let registry = prometheus::Registry::new();
            let m = IngestMetrics::new(&registry).unwrap();
            let health = Health::default();
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            ingest_port = listener.local_addr().unwrap().port();
            let admin = switchyard::admin::router(registry, health.clone());
            tokio::spawn(async move { axum::serve(listener, admin).await });
            tokio::spawn(async move {
                ingest::run(opts, &schema, &db, m, health, s)
                    .await
                    .expect("ingest");
            });
        }
        {
            let (schema, db, s) = (schema.clone(), old.db.clone(), stop.clone());
            let opts = switchyard::load::LoadOptions {
                dir: dirs.offline.clone(),
                batch_size: 500,
                batch_bytes: 8 << 20,
                archive_dir: None,
                loader_id: "test".to_string(),
                poll: Duration::from_millis(100),
                once: false,
                progress: false,
            };
            tokio::spawn(async move {
                let m = switchyard::load::LoadMetrics::new(&prometheus::Registry::new()).unwrap();
                let _ = switchyard::load::run(opts, &schema, &db, None, m, s).await;
            });
        }
        let cmp = Comparator::new(
            schema,
            old.db.clone(),
            new.db.clone(),
            CompareOptions {
                brokers: broker.brokers(),
                topic: topic.clone(),
                group: unique("cmp"),
                extra: vec![],
                window_secs: 1,
                settle: Duration::from_millis(1500),
                max_lateness,
                recheck: Duration::from_millis(500),
                check_interval: Duration::from_millis(200),
                retain: Duration::from_secs(600),
                max_ids: 20,
            },
            CompareMetrics::new(&prometheus::Registry::new()).unwrap(),
        );
        {
            let (c, s) = (cmp.clone(), stop.clone());
            tokio::spawn(async move { c.run(s).await.expect("compare") });
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let parity_port = listener.local_addr().unwrap().port();
        tokio::spawn(async move { axum::serve(listener, parity_router(cmp)).await });

        let acked = Arc::new(Mutex::new(Vec::new()));
        let traffic_stop = Arc::new(AtomicBool::new(false));
        let traffic = {
            let (url, stop, acked) = (router.url(), traffic_stop.clone(), acked.clone());
            tokio::spawn(async move {
                let client = reqwest::Client::new();
                let mut seq = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    seq += 1;
                    let account = seq % 397;
                    let mut e = envelope(account, seq, 200);
                    e["row"]["timestamp"] = json!(unix() as i64);
                    let sent = Instant::now();
                    if let Ok(r) = client
                        .post(&url)
                        .header("content-type", "application/json")
                        .body(e.to_string())
                        .send()
                        .await
                    {
                        if r.status() == 200 {
                            let v: Value = r.json().await.unwrap_or_default();
                            let route = ["legacy", "dual", "kafka"]
                                .into_iter()
                                .find(|k| v[*k] == 1)
                                .unwrap_or("?");
                            acked.lock().unwrap().push((sent, route.to_string()));
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            })
        };
        Live {
            _broker: broker,
            dirs,
            old,
            new,
            router,
            parity_port,
            ingest_port,
            stop,
            traffic_stop,
            traffic: Some(traffic),
            acked,
        }
    }

    fn store(&self) -> FlagStore {
        FlagStore::Local {
            dir: self.dirs.flags.clone(),
            keys: FlagKeys::default(),
        }
    }

    /// A controller of this stack's flags for `plan(state, dwell_secs)`.
    fn controller(&self, state: &std::path::Path, dwell_secs: f64) -> Arc<Controller> {
        Controller::new(
            self.plan(state, dwell_secs),
            self.store(),
            RolloutMetrics::new(&prometheus::Registry::new()).unwrap(),
        )
        .unwrap()
    }

    /// That controller, running until it ends.
    fn run_controller(
        &self,
        state: &std::path::Path,
        dwell_secs: f64,
    ) -> (
        Arc<Controller>,
        tokio::task::JoinHandle<Result<Outcome, switchyard::rollout::RolloutError>>,
    ) {
        let c = self.controller(state, dwell_secs);
        let run = {
            let c = c.clone();
            tokio::spawn(async move { c.run(CancellationToken::new()).await })
        };
        (c, run)
    }

    fn plan(&self, state: &std::path::Path, dwell_secs: f64) -> Plan {
        self.plan_with(state, dwell_secs, "")
    }

    fn plan_with(&self, state: &std::path::Path, dwell_secs: f64, extra: &str) -> Plan {
        Plan::parse(&format!(
            r#"
            stage = "dual-write"
            steps = [20, 60, 100]
            dwell_secs = {dwell_secs}
            check_interval_secs = 0.5
            failure_limit = 2
            parity_url = "http://127.0.0.1:{}"
            state_file = "{}"
            {extra}
            "#,
            self.parity_port,
            state.display()
        ))
        .unwrap()
    }

    async fn shutdown(mut self) {
        self.traffic_stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.traffic.take() {
            let _ = t.await;
        }
        self.stop.cancel();
        self.router.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_rollout_reaches_100_percent_with_zero_mismatches() {
    let live = Live::start().await;
    let state = live.dirs.root.path().join("rollout.json");
    let c = live.controller(&state, 2.0);
    let outcome = tokio::time::timeout(Duration::from_secs(90), c.run(CancellationToken::new()))
        .await
        .expect("the rollout finished")
        .unwrap();
    assert_eq!(outcome, Outcome::Done, "{}", c.status_json());
    let flags = live.store().get().await.unwrap();
    assert_eq!(flags.dual_write, 100.0);
    let events: Vec<String> = c.state().history.iter().map(|t| t.event.clone()).collect();
    assert_eq!(
        events,
        ["start", "advance", "advance", "done"],
        "{}",
        c.status_json()
    );
    assert_eq!(c.state().checks_failed, 0);
    let parity: Value = reqwest::get(format!("http://127.0.0.1:{}/parity", live.parity_port))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_ne!(parity["status"], "mismatch", "{parity}");
    eprintln!("rollout: {}", c.status_json());
    live.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_lost_mid_rollout_roll_it_back() {
    let live = Live::start().await;
    let state = live.dirs.root.path().join("rollout.json");
    let (c, run) = live.run_controller(&state, 30.0);
    // Hold step 1 (20%) for its dwell: it must not advance in under 30 s.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(c.state().step, Some(0), "{}", c.status_json());
    // Rows vanish from NEW among those written during the step.
    let since = c.state().step_started_at as i64;
    live.new
        .exec(&format!(
            "DELETE FROM raw_item WHERE uuid IN (SELECT uuid FROM raw_item WHERE \"timestamp\" >= {since} ORDER BY \"timestamp\" LIMIT 5)"
        ))
        .await;
    let deleted = unix();
    let mut breach_seen = None;
    let t = Instant::now();
    while !run.is_finished() {
        if breach_seen.is_none() {
            let p: Value = reqwest::get(format!(
                "http://127.0.0.1:{}/parity?from={since}",
                live.parity_port
            ))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
            if p["status"] == "mismatch" {
                breach_seen = Some(unix());
            }
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "no rollback: {}",
            c.status_json()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let outcome = run.await.unwrap().unwrap();
    let Outcome::RolledBack(why) = outcome else {
        panic!("{outcome:?}: {}", c.status_json());
    };
    // The rollback may come before every deleted row's window is checked
    // (the failure limit is reached on the first ones): between 1 and the 5
    // deleted rows are named missing in NEW, none in OLD.
    let missing_new: u64 = why
        .split(" missing in OLD, ")
        .nth(1)
        .and_then(|rest| rest.split(" in NEW").next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no NEW count in {why:?}"));
    assert!((1..=5).contains(&missing_new), "{why}");
    let missing_old = why
        .split(" row(s) missing in OLD")
        .next()
        .and_then(|head| head.split_whitespace().last())
        .unwrap_or_default();
    assert_eq!(missing_old, "0", "{why}");
    let rolled_at = c.state().history.last().unwrap().at;
    let breach = breach_seen.expect("the comparator reported the breach");
    eprintln!(
        "rollback: breach reported {:.2} s after the delete, rolled back {:.2} s after the breach (check every 0.5 s, failure limit 2)",
        breach - deleted,
        rolled_at - breach
    );
    // At the failure limit's second failed check, not later (a count, not a
    // time: the checks' pace depends on the machine).
    assert_eq!(c.state().checks_failed, 2, "{}", c.status_json());
    let flags = live.store().get().await.unwrap();
    assert_eq!(flags.dual_write, 0.0, "back before step 1");
    let saved: Value = serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
    assert_eq!(saved["status"], "rolled-back");
    // A restarted controller does not start again: it reports the rollback.
    let again = live.controller(&state, 30.0);
    assert!(matches!(
        again.run(CancellationToken::new()).await.unwrap(),
        Outcome::RolledBack(_)
    ));
    live.shutdown().await;
}

/// A row that reaches NEW with other content than the stream announced
/// (here: a version already stored under its key, which ingest keeps) is a
/// differing row: the comparator names it and the rollout rolls back, whether
/// or not its window had been judged before it arrived.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_stored_with_other_content_mid_rollout_rolls_it_back() {
    use switchyard::db::{row_values, TableRows};
    let live = Live::start().await;
    let state = live.dirs.root.path().join("rollout.json");
    let (c, run) = live.run_controller(&state, 30.0);
    let t = Instant::now();
    while c.state().step != Some(0) {
        assert!(t.elapsed() < Duration::from_secs(20), "{}", c.status_json());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // An account the first step (20 %) sends to Kafka.
    let mut account = 50_000;
    while live.router.explain(account).await["route"] == "legacy" {
        account += 1;
    }
    let mut sent = envelope(account, 777_777, 200);
    sent["row"]["timestamp"] = json!(unix() as i64);
    let mut stored = sent.clone();
    stored["row"]["body"] = json!("not what the stream carries");
    let schema = config(&live.dirs, "unused").schema().unwrap();
    let table = schema.table("raw_item").unwrap();
    let rows = TableRows {
        rows: vec![row_values(table, stored["row"].as_object().unwrap()).unwrap()],
        sources: Vec::new(),
    };
    live.new
        .db
        .write_batch(&[(table, &rows)], &[], &[], None)
        .await
        .unwrap();
    let (status, body) = post_ndjson(&live.router.url(), ndjson([&sent])).await;
    assert_eq!(status, 200, "{body}");
    let uuid = sent["row"]["uuid"].as_str().unwrap().to_ascii_lowercase();
    let outcome = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("no rollback within 30 s")
        .unwrap()
        .unwrap();
    let Outcome::RolledBack(why) = outcome else {
        panic!("{outcome:?}: {}", c.status_json());
    };
    assert!(why.contains("1 differing"), "{why}");
    assert!(why.contains(&uuid), "{uuid} not named: {why}");
    assert_eq!(live.store().get().await.unwrap().dual_write, 0.0);
    live.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kill_switch_under_load_takes_effect_within_250_ms() {
    let live = Live::start().await;
    let store = live.store();
    store
        .set(Which::DualWrite, json!(100), false, "t")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut lat = Vec::new();
    for _ in 0..10 {
        let flip = Instant::now();
        store
            .set(Which::KillSwitch, json!(true), false, "t")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        // The last request sent after the flip that still went dual.
        let last_dual = live
            .acked
            .lock()
            .unwrap()
            .iter()
            .filter(|(at, r)| *at >= flip && r == "dual")
            .map(|(at, _)| at.duration_since(flip))
            .max()
            .unwrap_or_default();
        lat.push(last_dual);
        store
            .set(Which::KillSwitch, json!(false), false, "t")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    lat.sort();
    let p50 = lat[lat.len() / 2];
    let p99 = lat[lat.len() - 1];
    eprintln!("kill switch flip-to-effect (last dual payload after the flip): p50 {p50:?}, p99 {p99:?} over {} flips", lat.len());
    assert!(p99 <= Duration::from_millis(250), "{lat:?}");
    // Stop the traffic, then every acknowledged payload must reach its databases.
    live.traffic_stop.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (to_old, to_new) = {
        let a = live.acked.lock().unwrap();
        (
            a.iter()
                .filter(|(_, r)| r == "legacy" || r == "dual")
                .count() as i64,
            a.iter().filter(|(_, r)| r == "dual").count() as i64,
        )
    };
    assert!(
        to_old > 100 && to_new > 0,
        "traffic flowed: {to_old} / {to_new}"
    );
    eventually(
        "every acknowledged payload in its databases",
        Duration::from_secs(30),
        || async { live.old.count().await == to_old && live.new.count().await == to_new },
    )
    .await;
    eprintln!("kill switch under load: {to_old} payloads in OLD, {to_new} in NEW, none lost");
    live.shutdown().await;
}

/// Manual gates, webhooks, `/status`-worthy state and resuming after a
/// restart, against a stand-in comparator that always reports parity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gates_webhooks_and_resume() {
    use axum::routing::{get, post};
    let hooks: Arc<Mutex<Vec<Value>>> = Arc::default();
    let app = axum::Router::new()
        .route(
            "/parity",
            get(|| async {
                axum::Json(
                    json!({"status": "ok", "tables": [{"missing_old": 0, "missing_new": 0,
                    "details": [{"status": "ok"}]}]}),
                )
            }),
        )
        .route(
            "/hook",
            post({
                let hooks = hooks.clone();
                move |axum::Json(v): axum::Json<Value>| {
                    let hooks = hooks.clone();
                    async move {
                        hooks.lock().unwrap().push(v);
                        "ok"
                    }
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("flags")).unwrap();
    set_flag(
        &dir.path().join("flags"),
        "switchyard-kill-switch",
        json!(false),
    );
    let state = dir.path().join("state.json");
    let plan_path = dir.path().join("plan.toml");
    std::fs::write(
        &plan_path,
        format!(
            r#"
            stage = "dual-write"
            steps = [10, 50, 100]
            dwell_secs = 0.5
            check_interval_secs = 0.2
            failure_limit = 1
            parity_url = "http://127.0.0.1:{port}"
            manual_gates = [100]
            webhooks = ["http://127.0.0.1:{port}/hook"]
            state_file = "{}"
            "#,
            state.display()
        ),
    )
    .unwrap();
    let plan = || Plan::parse(&std::fs::read_to_string(&plan_path).unwrap()).unwrap();
    let store = || FlagStore::Local {
        dir: dir.path().join("flags"),
        keys: FlagKeys::default(),
    };
    // First run: interrupted while waiting at the gate.
    let c = Controller::new(
        plan(),
        store(),
        RolloutMetrics::new(&prometheus::Registry::new()).unwrap(),
    )
    .unwrap();
    let stop = CancellationToken::new();
    let run = {
        let (c, s) = (c.clone(), stop.clone());
        tokio::spawn(async move { c.run(s).await })
    };
    eventually("the gate", Duration::from_secs(10), || async {
        c.state().status == switchyard::rollout::plan::Status::WaitingForPromotion
    })
    .await;
    assert_eq!(c.status_json()["percent"], 50.0);
    stop.cancel();
    assert_eq!(run.await.unwrap().unwrap(), Outcome::Interrupted);

    // Restarted: it resumes at step 2, still at the gate, until promoted.
    let c = Controller::new(
        plan(),
        store(),
        RolloutMetrics::new(&prometheus::Registry::new()).unwrap(),
    )
    .unwrap();
    assert_eq!(c.state().step, Some(1), "resumed, not restarted");
    let run = {
        let c = c.clone();
        tokio::spawn(async move { c.run(CancellationToken::new()).await })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(c.state().step, Some(1), "a manual gate holds");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args([
            "rollout",
            "promote",
            "--plan",
            &plan_path.display().to_string(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let outcome = tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(outcome, Outcome::Done);
    assert_eq!(store().get().await.unwrap().dual_write, 100.0);
    let events: Vec<String> = c.state().history.iter().map(|t| t.event.clone()).collect();
    assert_eq!(
        events,
        [
            "start",
            "advance",
            "waiting-for-promotion",
            "resume",
            "promoted",
            "advance",
            "done"
        ],
        "{}",
        c.status_json()
    );
    let hooked: Vec<String> = hooks
        .lock()
        .unwrap()
        .iter()
        .map(|h| h["event"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(hooked, events, "a webhook per transition");
}

/// The gate on keeping up: NEW's table is locked against writes (reads go
/// on, so the comparator keeps answering), ingest falls behind, and the
/// step pauses on its lag instead of advancing; once the lock is gone and
/// ingest catches up, the step's hold starts again and the rollout
/// finishes, with no mismatch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_pauses_while_ingest_falls_behind_and_resumes_once_it_catches_up() {
    let live = Live::start_with(Duration::from_secs(120), true).await;
    let state = live.dirs.root.path().join("rollout.json");
    let dwell = 2.0;
    let plan = live.plan_with(
        &state,
        dwell,
        &format!(
            "lag_urls = [\"http://127.0.0.1:{}\"]\nmax_lag_secs = 3",
            live.ingest_port
        ),
    );
    let c = Controller::new(
        plan,
        live.store(),
        RolloutMetrics::new(&prometheus::Registry::new()).unwrap(),
    )
    .unwrap();
    let run = {
        let c = c.clone();
        tokio::spawn(async move { c.run(CancellationToken::new()).await })
    };
    eventually("the first step applied", Duration::from_secs(30), || {
        let c = c.clone();
        async move { c.state().step.is_some() }
    })
    .await;

    // Writes to NEW's table wait for this transaction.
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(&live.new.url).await.unwrap();
    let mut lock = conn.begin().await.unwrap();
    sqlx::query("LOCK TABLE raw_item IN EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();
    eventually("a pause on the lag", Duration::from_secs(60), || {
        let c = c.clone();
        async move {
            c.state()
                .paused
                .is_some_and(|p| p.contains("ingest is behind"))
        }
    })
    .await;
    let paused_on = c.state().step;
    let status = c.status_json();
    assert_eq!(status["lag"]["state"], "behind", "{status}");
    assert!(status["lag"]["seconds"].as_f64().unwrap() > 3.0, "{status}");
    // Held there, however long ingest stays behind.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(c.state().step, paused_on, "{}", c.status_json());
    assert!(c.state().paused.is_some(), "{}", c.status_json());
    lock.rollback().await.unwrap();

    let outcome = tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .expect("the rollout finished")
        .unwrap()
        .unwrap();
    assert_eq!(outcome, Outcome::Done, "{}", c.status_json());
    let h = c.state().history;
    let paused = h
        .iter()
        .position(|t| t.event == "paused" && t.reason.contains("ingest is behind"))
        .expect("a pause on the lag in the history");
    let unpaused = paused
        + h[paused..]
            .iter()
            .position(|t| t.event == "unpaused")
            .expect("the pause lifted");
    let next = h[unpaused..]
        .iter()
        .find(|t| t.event == "advance" || t.event == "done")
        .expect("a step after the pause");
    assert!(
        next.at - h[unpaused].at >= dwell,
        "the step held its whole dwell again after the pause: {}",
        c.status_json()
    );
    assert_eq!(c.state().checks_failed, 0, "{}", c.status_json());
    live.shutdown().await;
}
