//! The rollout controller and the kill switch against a local flags folder
//! and a stand-in comparator that answers ok, mismatch, empty or 500 on
//! demand: resume, reconciliation with the flags, rollback targets, gates,
//! promotion, and a property test over random sequences of operations.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use switchyard::flags::store::{FlagStore, Which};
use switchyard::flags::{FlagKeys, FlagMetrics, FlagSource, LocalFlags};
use switchyard::rollout::plan::{Plan, State, Status};
use switchyard::rollout::{Controller, Outcome, RolloutError, RolloutMetrics, StateWriter};
use switchyard::routing::{bucket, decide, Route};
use tokio_util::sync::CancellationToken;

const DUAL: &str = "switchyard-dual-write";
const KAFKA: &str = "switchyard-kafka-only";
const KILL: &str = "switchyard-kill-switch";

/// What the stand-in comparator answers.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Answer {
    Ok,
    Mismatch,
    Empty,
    Error,
}

struct Parity {
    port: u16,
    answer: Arc<Mutex<Answer>>,
    /// The `arrived_since` of every request.
    asked: Arc<Mutex<Vec<f64>>>,
}

impl Parity {
    async fn start() -> Parity {
        use axum::extract::Query;
        use axum::http::StatusCode;
        use axum::routing::get;
        let answer = Arc::new(Mutex::new(Answer::Ok));
        let asked: Arc<Mutex<Vec<f64>>> = Arc::default();
        let app = axum::Router::new().route(
            "/parity",
            get({
                let (answer, asked) = (answer.clone(), asked.clone());
                move |Query(q): Query<std::collections::HashMap<String, String>>| {
                    let (answer, asked) = (answer.clone(), asked.clone());
                    async move {
                        if let Some(t) = q.get("arrived_since").and_then(|t| t.parse().ok()) {
                            asked.lock().unwrap().push(t);
                        }
                        let a = *answer.lock().unwrap();
                        let body = match a {
                            Answer::Ok => json!({"status": "ok", "tables": [{"missing_old": 0,
                                "missing_new": 0, "details": [{"status": "ok"}]}]}),
                            Answer::Mismatch => json!({"status": "mismatch", "tables": [{
                                "missing_old": 0, "missing_new": 1, "details": [{"status": "mismatch",
                                "check": {"missing_ids_new": ["u-1"]}}]}]}),
                            Answer::Empty => json!({"status": "open", "tables": [{"details": []}]}),
                            Answer::Error => {
                                return (StatusCode::INTERNAL_SERVER_ERROR, axum::Json(json!({})))
                            }
                        };
                        (StatusCode::OK, axum::Json(body))
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Parity {
            port,
            answer,
            asked,
        }
    }

    fn set(&self, a: Answer) {
        *self.answer.lock().unwrap() = a;
    }
}

struct Setup {
    dir: tempfile::TempDir,
    flags: PathBuf,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let flags = dir.path().join("flags");
        std::fs::create_dir_all(&flags).unwrap();
        set_flag(&flags, KILL, json!(false));
        set_flag(&flags, DUAL, json!(0));
        set_flag(&flags, KAFKA, json!(0));
        Setup { dir, flags }
    }

    fn store(&self) -> FlagStore {
        FlagStore::Local {
            dir: self.flags.clone(),
            keys: FlagKeys::default(),
        }
    }

    fn state_file(&self) -> PathBuf {
        self.dir.path().join("state.json")
    }

    fn plan(&self, extra: &str) -> Plan {
        // One parity source: the default one unless `extra` names Prometheus.
        let source = if extra.contains("prometheus_url") {
            ""
        } else {
            "parity_url = \"http://127.0.0.1:1\"\n"
        };
        let text = format!(
            "stage = \"dual-write\"\nsteps = [10, 20, 30]\ndwell_secs = 0.3\ncheck_interval_secs = 0.1\nfailure_limit = 1\n{source}state_file = \"{}\"\n{extra}",
            self.state_file().display()
        );
        let mut lines: Vec<String> = Vec::new();
        // Later keys replace earlier ones.
        for l in text.lines() {
            let key = l.split('=').next().unwrap_or("").trim().to_string();
            if !key.is_empty() {
                lines.retain(|x| x.split('=').next().unwrap_or("").trim() != key);
            }
            lines.push(l.to_string());
        }
        Plan::parse(&lines.join("\n")).unwrap()
    }

    fn controller(&self, plan: Plan) -> Result<Arc<Controller>, RolloutError> {
        Controller::new(plan, self.store(), metrics())
    }

    async fn levels(&self) -> (f64, f64, bool) {
        let c = self.store().read().await.unwrap().current;
        (c.dual_write, c.kafka_only, c.kill_switch)
    }
}

fn metrics() -> RolloutMetrics {
    RolloutMetrics::new(&prometheus::Registry::new()).unwrap()
}

fn with_parity(extra: &str, p: &Parity) -> String {
    format!("{extra}\nparity_url = \"http://127.0.0.1:{}\"", p.port)
}

fn spawn(
    c: &Arc<Controller>,
) -> (
    tokio::task::JoinHandle<Result<Outcome, RolloutError>>,
    CancellationToken,
) {
    let stop = CancellationToken::new();
    let (c, s) = (c.clone(), stop.clone());
    (tokio::spawn(async move { c.run(s).await }), stop)
}

async fn wait_for(what: &str, c: &Arc<Controller>, f: impl Fn(&State) -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let s = c.state();
        if f(&s) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: {}",
            c.status_json()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_state_resumes_only_the_plan_it_was_written_for() {
    let s = Setup::new();
    let p = Parity::start().await;
    let c = s
        .controller(s.plan(&with_parity(
            "steps = [1, 2, 3, 5, 10]\ndwell_secs = 0.1",
            &p,
        )))
        .unwrap();
    let (run, stop) = spawn(&c);
    wait_for("step 4", &c, |st| st.step == Some(3)).await;
    stop.cancel();
    assert_eq!(run.await.unwrap().unwrap(), Outcome::Interrupted);
    assert_eq!(s.levels().await.0, 5.0);

    for (edit, want) in [
        (
            "steps = [1, 5, 25, 100]\nmanual_gates = [100]",
            "steps [1.0, 2.0, 3.0, 5.0, 10.0] → [1.0, 5.0, 25.0, 100.0]",
        ),
        ("steps = [1, 10]", "steps"),
        (
            "stage = \"kafka-only\"\nsteps = [1, 2, 3, 5, 10]",
            "stage DualWrite → KafkaOnly",
        ),
    ] {
        let e = match s.controller(s.plan(&with_parity(edit, &p))) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("{edit}: resumed a state of another plan"),
        };
        assert!(
            e.contains(want) && e.contains("remove the state file"),
            "{edit}: {e}"
        );
    }
    // The flags were left alone.
    assert_eq!(s.levels().await, (5.0, 0.0, false));
    // The binary says so with exit 2.
    std::fs::write(
        s.dir.path().join("plan.toml"),
        format!(
            "stage = \"dual-write\"\nsteps = [1, 10]\ndwell_secs = 1\ncheck_interval_secs = 1\nfailure_limit = 1\nparity_url = \"http://127.0.0.1:{}\"\nstate_file = \"{}\"\n",
            p.port,
            s.state_file().display()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["rollout", "run", "--plan"])
        .arg(s.dir.path().join("plan.toml"))
        .args(["--admin-listen", "127.0.0.1:0", "--flags-dir"])
        .arg(&s.flags)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("another plan"));
}

#[tokio::test]
async fn a_manual_change_or_a_kill_pauses_and_nothing_is_overridden() {
    let s = Setup::new();
    let p = Parity::start().await;
    let c = s
        .controller(s.plan(&with_parity("dwell_secs = 1", &p)))
        .unwrap();
    let (run, _stop) = spawn(&c);
    wait_for("step 1", &c, |st| st.step == Some(0) && st.paused.is_none()).await;

    // An operator sets dual-write to 0: the controller pauses, not advances.
    s.store()
        .set(Which::DualWrite, json!(0), false, "operator")
        .await
        .unwrap();
    wait_for("paused", &c, |st| st.paused.is_some()).await;
    assert!(c.state().paused.unwrap().contains("manual change"));
    assert_eq!(c.status_json()["status"], "paused");
    assert_eq!(
        c.status_json()["percent"],
        0.0,
        "/status shows the real flag"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(s.levels().await.0, 0.0, "not overridden");
    assert_eq!(c.state().step, Some(0));

    // Set back: it resumes, and the step's clock starts again.
    s.store()
        .set(Which::DualWrite, json!(10), false, "operator")
        .await
        .unwrap();
    wait_for("unpaused", &c, |st| st.paused.is_none()).await;

    // A kill: paused, never advancing while killed.
    s.store()
        .set(Which::KillSwitch, json!(true), false, "operator")
        .await
        .unwrap();
    wait_for("paused by the kill", &c, |st| {
        st.paused.as_deref() == Some("the kill switch is on")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(s.levels().await, (10.0, 0.0, true));
    // Unkilled: the level is the one verified, no jump.
    s.store()
        .set(Which::KillSwitch, json!(false), false, "operator")
        .await
        .unwrap();
    wait_for("unpaused", &c, |st| st.paused.is_none()).await;
    assert_eq!(s.levels().await.0, 10.0);
    let out = tokio::time::timeout(Duration::from_secs(20), run)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(out, Outcome::Done);
    let events: Vec<String> = c.state().history.iter().map(|t| t.event.clone()).collect();
    assert!(
        events.iter().filter(|e| *e == "paused").count() >= 2,
        "{events:?}"
    );
}

#[tokio::test]
async fn a_kafka_only_plan_never_lowers_kafka_only_nor_passes_dual_write() {
    let s = Setup::new();
    let p = Parity::start().await;
    s.store()
        .set(Which::DualWrite, json!(100), false, "t")
        .await
        .unwrap();
    s.store()
        .set(Which::KafkaOnly, json!(20), false, "t")
        .await
        .unwrap();
    let plan = s.plan(&with_parity(
        "stage = \"kafka-only\"\nsteps = [5, 25, 50]",
        &p,
    ));
    let c = s.controller(plan).unwrap();
    let e = c.run(CancellationToken::new()).await.unwrap_err();
    assert!(
        matches!(e, RolloutError::Plan(_)) && e.to_string().contains("never lowers"),
        "{e}"
    );
    assert_eq!(s.levels().await, (100.0, 20.0, false));
    // A step above dual-write is refused at start, not when reached.
    s.store()
        .set(Which::DualWrite, json!(30), false, "t")
        .await
        .unwrap();
    let _ = std::fs::remove_file(s.state_file());
    let c = s
        .controller(s.plan(&with_parity("stage = \"kafka-only\"\nsteps = [25, 50]", &p)))
        .unwrap();
    let e = c.run(CancellationToken::new()).await.unwrap_err();
    assert!(e.to_string().contains("above dual-write"), "{e}");
}

/// Fails the first write after an intent of `event` was written: the
/// process "dies" between the flag change and its confirmation.
struct CrashAfter {
    event: &'static str,
    armed: AtomicBool,
    crashed: AtomicBool,
}

impl StateWriter for CrashAfter {
    fn write(&self, path: &Path, state: &State) -> std::io::Result<()> {
        if self.armed.load(Ordering::SeqCst) && !self.crashed.load(Ordering::SeqCst) {
            self.crashed.store(true, Ordering::SeqCst);
            return Err(std::io::Error::other(
                "killed between the flag change and its record",
            ));
        }
        if state.intent.as_ref().is_some_and(|i| i.event == self.event) {
            self.armed.store(true, Ordering::SeqCst);
        }
        switchyard::rollout::FileWriter.write(path, state)
    }
}

#[tokio::test]
async fn a_crash_between_a_flag_change_and_its_record_is_recognised() {
    for event in ["advance", "rollback"] {
        let s = Setup::new();
        let p = Parity::start().await;
        let dwell = if event == "rollback" {
            "dwell_secs = 1"
        } else {
            "dwell_secs = 0.2"
        };
        let plan = s.plan(&with_parity(dwell, &p));
        let writer = Arc::new(CrashAfter {
            event,
            armed: AtomicBool::new(false),
            crashed: AtomicBool::new(false),
        });
        struct Shared(Arc<CrashAfter>);
        impl StateWriter for Shared {
            fn write(&self, path: &Path, state: &State) -> std::io::Result<()> {
                self.0.write(path, state)
            }
        }
        let c = Controller::with_writer(
            plan.clone(),
            s.store(),
            metrics(),
            Box::new(Shared(writer.clone())),
        )
        .unwrap();
        if event == "rollback" {
            // Reach step 2, then break parity.
            let (run, stop) = spawn(&c);
            wait_for("step 2", &c, |st| st.step == Some(1)).await;
            stop.cancel();
            let _ = run.await;
            assert_eq!(c.state().step, Some(1), "held at step 2");
            p.set(Answer::Mismatch);
            let c = Controller::with_writer(
                plan.clone(),
                s.store(),
                metrics(),
                Box::new(Shared(writer.clone())),
            )
            .unwrap();
            let e = c.run(CancellationToken::new()).await.unwrap_err();
            assert!(e.to_string().contains("killed between"), "{e}");
        } else {
            let e = c.run(CancellationToken::new()).await.unwrap_err();
            assert!(e.to_string().contains("killed between"), "{e}");
        }
        let (dual_at_crash, _, _) = s.levels().await;
        let on_disk: State =
            serde_json::from_str(&std::fs::read_to_string(s.state_file()).unwrap()).unwrap();
        assert!(
            on_disk.intent.is_some(),
            "{event}: the intent was recorded first"
        );
        // Resumed: the change that was made is recognised, not redone from
        // the old step (an account would go dual → legacy → dual) nor undone.
        p.set(Answer::Ok);
        let c = s.controller(plan.clone()).unwrap();
        let (run, stop) = spawn(&c);
        wait_for("resumed", &c, |st| st.intent.is_none()).await;
        let st = c.state();
        assert_eq!(
            st.set.dual_write,
            dual_at_crash,
            "{event}: {}",
            c.status_json()
        );
        assert_eq!(s.levels().await.0, dual_at_crash);
        if event == "rollback" {
            assert_eq!(st.status, Status::RolledBack);
            assert_eq!(dual_at_crash, 10.0, "back to the last step that passed");
        } else {
            assert_eq!(dual_at_crash, 20.0);
        }
        stop.cancel();
        let _ = run.await;
    }
}

#[tokio::test]
async fn rollback_goes_to_the_last_good_levels_and_a_kill_lowers_the_stage_too() {
    for rollback in ["previous", "kill"] {
        let s = Setup::new();
        let p = Parity::start().await;
        s.store()
            .set(Which::DualWrite, json!(30), false, "t")
            .await
            .unwrap();
        s.store()
            .set(Which::KafkaOnly, json!(10), false, "t")
            .await
            .unwrap();
        p.set(Answer::Mismatch);
        let plan = s.plan(&with_parity(
            &format!("steps = [40, 60]\nrollback = \"{rollback}\""),
            &p,
        ));
        let c = s.controller(plan).unwrap();
        let out = c.run(CancellationToken::new()).await.unwrap();
        assert!(matches!(out, Outcome::RolledBack(_)), "{out:?}");
        let (dual, kafka, killed) = s.levels().await;
        assert_eq!(
            (dual, kafka),
            (30.0, 10.0),
            "{rollback}: back to where it started"
        );
        assert_eq!(killed, rollback == "kill");
        assert_eq!(
            c.status_json()["percent"],
            30.0,
            "/status shows the real level"
        );
        if rollback == "kill" {
            // Unkilling restores the level before the rollout, not the failing one.
            s.store()
                .set(Which::KillSwitch, json!(false), false, "t")
                .await
                .unwrap();
            assert_eq!(s.levels().await, (30.0, 10.0, false));
        }
        // The operator can go on from there.
        s.store()
            .set(Which::DualWrite, json!(35), false, "t")
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn a_broken_flag_file_pauses_the_rollout_and_the_kill_switch_still_works() {
    let s = Setup::new();
    let p = Parity::start().await;
    let c = s
        .controller(s.plan(&with_parity("rollback = \"kill\"\ndwell_secs = 5", &p)))
        .unwrap();
    let (run, stop) = spawn(&c);
    wait_for("step 1", &c, |st| st.step == Some(0)).await;
    std::fs::write(
        s.flags.join(format!("{KAFKA}.json")),
        "{\"key\": \"switchyard-ka",
    )
    .unwrap();
    wait_for("paused", &c, |st| {
        st.paused
            .as_deref()
            .is_some_and(|p| p.contains("flag problems"))
    })
    .await;
    // `flags kill` writes the kill switch alone, whatever the others are.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["flags", "kill", "--flags-dir"])
        .arg(&s.flags)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let kill: Value = serde_json::from_str(
        &std::fs::read_to_string(s.flags.join(format!("{KILL}.json"))).unwrap(),
    )
    .unwrap();
    assert_eq!(
        kill["on"], false,
        "killed for everyone, targets included: {kill}"
    );
    // And a router sees it.
    let flags = LocalFlags::start(
        &s.flags,
        FlagKeys::default(),
        None,
        FlagMetrics::new(&prometheus::Registry::new()).unwrap(),
    );
    assert!(flags.evaluate(1).kill_switch);
    assert!(!flags.status().ready, "the broken file is reported");
    // `flags get` names the broken file and fails.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["flags", "get", "--flags-dir"])
        .arg(&s.flags)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("switchyard-kafka-only.json"));
    stop.cancel();
    assert_eq!(run.await.unwrap().unwrap(), Outcome::Interrupted);
    assert_eq!(c.state().status, Status::Running);
}

#[tokio::test]
async fn gates_watch_every_window_since_the_step_and_escalate_without_data() {
    let s = Setup::new();
    let p = Parity::start().await;
    // No data: paused after 0.5 s, rolled back after 1.5 s.
    p.set(Answer::Empty);
    let plan = s.plan(&with_parity(
        "no_data_pause_secs = 0.5\nno_data_rollback_secs = 1.5\nsource_down_pause_secs = 0.5",
        &p,
    ));
    let c = s.controller(plan.clone()).unwrap();
    let (run, _stop) = spawn(&c);
    wait_for("paused for no data", &c, |st| {
        st.paused
            .as_deref()
            .is_some_and(|p| p.contains("no parity data"))
    })
    .await;
    let out = tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    match out {
        Outcome::RolledBack(why) => assert!(why.contains("no parity data"), "{why}"),
        o => panic!("{o:?}"),
    }
    assert_eq!(s.levels().await.0, 0.0);
    // Every check asked for every window since the step started.
    let started = c.state().history[0].at;
    let asked = p.asked.lock().unwrap().clone();
    assert!(!asked.is_empty());
    assert!(
        asked.iter().all(|t| (*t - started).abs() < 1.0),
        "{asked:?} vs {started}"
    );

    // An unreachable source (500) pauses, and a healthy one lifts it.
    let s = Setup::new();
    p.set(Answer::Error);
    let plan = s.plan(&with_parity(
        "source_down_pause_secs = 0.3\ndwell_secs = 0.2",
        &p,
    ));
    let c = s.controller(plan).unwrap();
    let (run, _stop) = spawn(&c);
    wait_for("paused for the source", &c, |st| {
        st.paused
            .as_deref()
            .is_some_and(|p| p.contains("unreachable"))
    })
    .await;
    assert_eq!(s.levels().await.0, 10.0, "held, not advanced");
    p.set(Answer::Ok);
    let out = tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(out, Outcome::Done);
    assert_eq!(s.levels().await.0, 30.0);
}

#[tokio::test]
async fn promote_checks_the_state_and_is_consumed_once() {
    let s = Setup::new();
    let p = Parity::start().await;
    let plan_path = s.dir.path().join("plan.toml");
    std::fs::write(
        &plan_path,
        format!(
            "stage = \"dual-write\"\nsteps = [10, 20]\ndwell_secs = 0.2\ncheck_interval_secs = 0.1\nfailure_limit = 1\nmanual_gates = [20]\nparity_url = \"http://127.0.0.1:{}\"\nstate_file = \"{}\"\n",
            p.port,
            s.state_file().display()
        ),
    )
    .unwrap();
    let promote = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(["rollout", "promote", "--plan"])
            .arg(&plan_path)
            .output()
            .unwrap()
    };
    // Nothing runs: nothing to promote.
    let out = promote();
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let plan = Plan::parse(&std::fs::read_to_string(&plan_path).unwrap()).unwrap();
    let c = s.controller(plan.clone()).unwrap();
    let (run, _stop) = spawn(&c);
    wait_for("the gate", &c, |st| {
        st.status == Status::WaitingForPromotion
    })
    .await;
    assert!(promote().status.success());
    let out = tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(out, Outcome::Done);
    // Done: promote refuses.
    let out = promote();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing waits at a gate"));
    // A promotion left behind opens no gate of a later rollout.
    std::fs::write(switchyard::rollout::promote_file(&s.state_file()), "2").unwrap();
    std::fs::remove_file(s.state_file()).unwrap();
    s.store()
        .set(Which::DualWrite, json!(0), false, "t")
        .await
        .unwrap();
    let c = s.controller(plan).unwrap();
    let (run, stop) = spawn(&c);
    wait_for("the gate again", &c, |st| {
        st.status == Status::WaitingForPromotion
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        c.state().status,
        Status::WaitingForPromotion,
        "still waiting for a person"
    );
    stop.cancel();
    let _ = run.await;
}

/// Operations of the property test.
#[derive(Debug, Clone)]
enum Op {
    Tick(Answer),
    Set(bool, u8),
    Kill,
    Unkill,
    RestartController,
    Break(u8),
    Fix(u8),
    RestartRouter,
}

fn op() -> impl proptest::strategy::Strategy<Value = Op> {
    use proptest::prelude::*;
    prop_oneof![
        6 => prop_oneof![Just(Answer::Ok), Just(Answer::Mismatch), Just(Answer::Empty)].prop_map(Op::Tick),
        1 => (any::<bool>(), 0u8..=10).prop_map(|(d, v)| Op::Set(d, v * 10)),
        1 => Just(Op::Kill),
        1 => Just(Op::Unkill),
        1 => Just(Op::RestartController),
        1 => (0u8..3).prop_map(Op::Break),
        1 => (0u8..3).prop_map(Op::Fix),
        1 => Just(Op::RestartRouter),
    ]
}

fn routes(router: &LocalFlags) -> Vec<Route> {
    (0..400u64)
        .map(|a| decide(bucket("switchyard", a), &router.evaluate(a)).0)
        .collect()
}

async fn property_run(ops: Vec<Op>) -> Result<(), String> {
    let s = Setup::new();
    let data = s.dir.path().join("data");
    let last_good = data.join("flags-last-good.json");
    let router_metrics = || FlagMetrics::new(&prometheus::Registry::new()).unwrap();
    let mut router = LocalFlags::start(
        &s.flags,
        FlagKeys::default(),
        Some(last_good.clone()),
        router_metrics(),
    );
    let plan = s.plan(&format!(
        "steps = [{}]\ndwell_secs = 0\nno_data_pause_secs = 0\nfailure_limit = 3",
        (1..=25)
            .map(|i| (i * 4).to_string())
            .collect::<Vec<_>>()
            .join(", ")
    ));
    let mut c = s.controller(plan.clone()).map_err(|e| e.to_string())?;
    c.start().await.map_err(|e| e.to_string())?;
    router.reload();
    let mut before = routes(&router);
    // Routes when a kill began, and whether a person changed a level since.
    let mut pre_kill: Option<Vec<Route>> = None;
    let mut manual_since_kill = false;
    let mut was_killed = false;
    let mut broken: std::collections::HashMap<u8, Vec<u8>> = Default::default();
    let files = [KILL, DUAL, KAFKA];
    for (i, op) in ops.iter().enumerate() {
        let mut may_lower = false;
        match op {
            Op::Tick(a) => {
                let check = match a {
                    Answer::Ok => switchyard::rollout::plan::Check::Verified,
                    Answer::Mismatch => {
                        switchyard::rollout::plan::Check::Breach("1 missing".into())
                    }
                    _ => switchyard::rollout::plan::Check::NoData("empty".into()),
                };
                let was = c.state().status;
                c.tick(Some(check))
                    .await
                    .map_err(|e| format!("tick: {e}"))?;
                // A rollback is the plan's own explicit rollback.
                may_lower = c.state().status == Status::RolledBack && was != Status::RolledBack;
            }
            Op::Set(dual, v) => {
                let w = if *dual {
                    Which::DualWrite
                } else {
                    Which::KafkaOnly
                };
                let _ = s.store().set(w, json!(*v as f64), false, "operator").await;
                may_lower = true;
                manual_since_kill = true;
            }
            Op::Kill => {
                s.store()
                    .set(Which::KillSwitch, json!(true), false, "k")
                    .await
                    .map_err(|e| format!("kill: {e}"))?;
                may_lower = true;
            }
            Op::Unkill => {
                let _ = s
                    .store()
                    .set(Which::KillSwitch, json!(false), false, "u")
                    .await;
            }
            Op::RestartController => {
                c = s.controller(plan.clone()).map_err(|e| e.to_string())?;
                c.start().await.map_err(|e| format!("restart: {e}"))?;
            }
            Op::Break(f) => {
                let path = s.flags.join(format!("{}.json", files[*f as usize]));
                if let Ok(b) = std::fs::read(&path) {
                    broken.entry(*f).or_insert(b);
                }
                std::fs::write(&path, b"{\"key\": tru").unwrap();
            }
            Op::Fix(f) => {
                if let Some(b) = broken.remove(f) {
                    std::fs::write(s.flags.join(format!("{}.json", files[*f as usize])), b)
                        .unwrap();
                }
                // A person's edit: it may set any level.
                may_lower = true;
                manual_since_kill = true;
            }
            Op::RestartRouter => {
                router = LocalFlags::start(
                    &s.flags,
                    FlagKeys::default(),
                    Some(last_good.clone()),
                    router_metrics(),
                );
            }
        }
        // One poll later.
        router.reload();
        let v = router.evaluate(u64::MAX);
        if v.kafka_only > v.dual_write {
            return Err(format!(
                "op {i} {op:?}: kafka-only {} above dual-write {}",
                v.kafka_only, v.dual_write
            ));
        }
        let after = routes(&router);
        let killed = v.kill_switch;
        if killed && !was_killed {
            // A kill begins (by the switch, or by a file restored to a
            // killed state): what it releases to is bounded by the routes
            // just before it.
            pre_kill = Some(before.clone());
            manual_since_kill = false;
        }
        was_killed = killed;
        if killed && after.iter().any(|r| *r != Route::Legacy) {
            return Err(format!(
                "op {i} {op:?}: killed, yet not every account is legacy"
            ));
        }
        if !killed {
            if let Some(pre) = pre_kill.take() {
                // Released: nothing above what was verified before the kill.
                if !manual_since_kill {
                    if let Some(a) = (0..after.len()).find(|a| after[*a].rank() > pre[*a].rank()) {
                        return Err(format!(
                            "op {i} {op:?}: after the kill, account {a} went to {:?}, beyond {:?} before it ({})",
                            after[a],
                            pre[a],
                            c.status_json()
                        ));
                    }
                }
            }
        }
        if !may_lower && !matches!(op, Op::Unkill) {
            if let Some(a) = (0..after.len()).find(|a| after[*a].rank() < before[*a].rank()) {
                return Err(format!(
                    "op {i} {op:?}: account {a} moved back from {:?} to {:?} ({})",
                    before[a],
                    after[a],
                    c.status_json()
                ));
            }
        }
        before = after;
    }
    Ok(())
}

/// No account ever moves backwards except by a kill, an operator's change or
/// the plan's rollback; Kafka-only never exceeds dual-write; a kill is
/// effective at the next poll of every router.
#[test]
fn random_operations_never_move_an_account_backwards() {
    use proptest::prelude::*;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let runs = AtomicUsize::new(0);
    proptest!(ProptestConfig { cases: 48, ..ProptestConfig::default() }, |(ops in proptest::collection::vec(op(), 1..40))| {
        runs.fetch_add(1, Ordering::Relaxed);
        let r = rt.block_on(property_run(ops));
        prop_assert!(r.is_ok(), "{}", r.unwrap_err());
    });
    assert!(runs.load(Ordering::Relaxed) >= 48);
}

/// The Prometheus parity source against a real Prometheus scraping a gauge
/// whose value the test sets: no sample waits (then pauses), 1 passes the
/// gates, 0 breaches and rolls back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prometheus_parity_source_gates_and_rolls_back() {
    use axum::routing::get;
    // -1: the series is absent (no data).
    let value = Arc::new(Mutex::new(-1i64));
    let app = axum::Router::new().route(
        "/metrics",
        get({
            let value = value.clone();
            move || {
                let v = *value.lock().unwrap();
                async move {
                    if v < 0 {
                        String::new()
                    } else {
                        format!("# TYPE test_parity_ok gauge\ntest_parity_ok {v}\n")
                    }
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let prom = Prometheus::start(None, &[("parity", target)]);
    let s = Setup::new();
    let plan = |extra: &str| {
        s.plan(&format!(
            "prometheus_url = \"http://127.0.0.1:{}\"\nprometheus_query = \"max(test_parity_ok)\"\ndwell_secs = 0.5\nno_data_pause_secs = 2\n{extra}",
            prom.port
        ))
    };
    let c = s.controller(plan("")).unwrap();
    let (run, _stop) = spawn(&c);
    // No sample yet: it holds step 1, then pauses for no data.
    wait_for("paused for no data", &c, |st| {
        st.paused
            .as_deref()
            .is_some_and(|p| p.contains("no sample"))
    })
    .await;
    assert_eq!(s.levels().await.0, 10.0);
    // A healthy ratio: the gates pass to the end.
    *value.lock().unwrap() = 1;
    let out = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(out, Outcome::Done, "{}", c.status_json());
    assert_eq!(s.levels().await.0, 30.0);

    // A bad one: a breach, rolled back to where it started.
    *value.lock().unwrap() = 0;
    std::fs::remove_file(s.state_file()).unwrap();
    s.store()
        .set(Which::DualWrite, json!(0), false, "t")
        .await
        .unwrap();
    // Wait until Prometheus has scraped the 0.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while prom.query("max(test_parity_ok)").await["data"]["result"][0]["value"][1] != "0" {
        assert!(
            std::time::Instant::now() < deadline,
            "prometheus never scraped the 0"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let c = s.controller(plan("")).unwrap();
    let out = tokio::time::timeout(Duration::from_secs(30), c.run(CancellationToken::new()))
        .await
        .unwrap()
        .unwrap();
    match out {
        Outcome::RolledBack(why) => assert!(why.contains("returned 0"), "{why}"),
        o => panic!("{o:?}"),
    }
    assert_eq!(s.levels().await.0, 0.0);
}

/// A migration plan over the local folder, with a router evaluating the
/// flag: each step moves accounts from `off` to `dualwrite` only, and a
/// breach rolls the share back to the last step that passed.
#[tokio::test]
async fn a_migration_rollout_moves_accounts_forward_and_rolls_back_on_a_breach() {
    const MIGRATION: &str = "switchyard-migration";
    let s = Setup::new();
    let keys = FlagKeys {
        migration: Some(MIGRATION.into()),
        ..FlagKeys::default()
    };
    let store = || FlagStore::Local {
        dir: s.flags.clone(),
        keys: keys.clone(),
    };
    // No migration flag yet: refused at start, saying why.
    let p = Parity::start().await;
    let plan = s.plan(&with_parity(
        "stage = \"migration\"\nmigration_from = \"off\"\nmigration_to = \"dualwrite\"\nsteps = [10, 40, 70]\ndwell_secs = 0\nfailure_limit = 1",
        &p,
    ));
    let c = Controller::new(plan.clone(), store(), metrics()).unwrap();
    let e = c.start().await.unwrap_err().to_string();
    assert!(e.contains("migration"), "{e}");
    set_flag(&s.flags, MIGRATION, json!("off"));
    let router = LocalFlags::start(
        &s.flags,
        keys.clone(),
        None,
        FlagMetrics::new(&prometheus::Registry::new()).unwrap(),
    );
    let routes = |router: &LocalFlags| -> Vec<Route> {
        router.reload();
        (0..2000u64)
            .map(|a| decide(bucket("switchyard", a), &router.evaluate(a)).0)
            .collect()
    };
    let mut before = routes(&router);
    assert!(before.iter().all(|r| *r == Route::Legacy));
    let c = Controller::new(plan.clone(), store(), metrics()).unwrap();
    c.start().await.unwrap();
    let mut at = Vec::new();
    for step in [10.0, 40.0, 70.0] {
        let now = routes(&router);
        let back = (0..now.len())
            .filter(|a| before[*a] == Route::Dual && now[*a] != Route::Dual)
            .count();
        assert_eq!(back, 0, "step {step}: accounts sent back");
        let dual = now.iter().filter(|r| **r == Route::Dual).count() as f64 / 20.0;
        assert!((dual - step).abs() < 4.0, "step {step}: {dual} % dual");
        assert_eq!(c.status_json()["percent"], step);
        at.push(now.clone());
        before = now;
        if step < 70.0 {
            c.tick(None).await.unwrap();
        }
    }
    // A breach on the last step: back to 40 %, exactly the accounts of 40 %.
    p.set(Answer::Mismatch);
    let out = c.tick(None).await.unwrap();
    assert!(matches!(out, Some(Outcome::RolledBack(_))), "{out:?}");
    assert_eq!(
        routes(&router),
        at[1],
        "the accounts of the last step that passed"
    );
    assert_eq!(c.status_json()["percent"], 40.0);
    assert_eq!(c.state().status, Status::RolledBack);
}
