//! `switchyard rollout`: raises a flag one step at a time, only after the
//! step held its dwell with parity verified for every window since it
//! started, and rolls back by itself when parity breaks past the failure
//! limit.
//!
//! Its state is the plan it belongs to plus the flag levels it set, synced
//! to disk *before* each change as an intent and confirmed after, so a crash
//! between the two is recognised on resume. It never overrides a person:
//! every check re-reads the flags, and a manual change, a kill or unreadable
//! flags pause it (with the reason in `/status`, metrics and logs) until the
//! flags are back where it left them.

pub mod cli;
mod metrics;
pub mod plan;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::flags::store::{FlagStore, Reading, StoreError, Which};
pub use metrics::RolloutMetrics;
use plan::{
    check_start, decide, gate_on_lag, lag_check, lag_of_metrics, migration_share, rollback_target,
    Action, Check, Intent, Lag, LagCheck, Levels, Plan, PlanRecord, Rollback, Stage, State, Status,
    Transition,
};

/// Why the controller stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    #[error("state file {path}: {message}")]
    State { path: String, message: String },
    /// The plan cannot run from here (a configuration error: exit 2).
    #[error("{0}")]
    Plan(String),
    #[error("flags: {0}")]
    Flags(#[from] StoreError),
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Done,
    RolledBack(String),
    /// Stopped by a signal; the state file holds where it was.
    Interrupted,
}

fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The file `rollout promote` writes next to the state file.
pub fn promote_file(state_file: &Path) -> PathBuf {
    let mut p = state_file.as_os_str().to_owned();
    p.push(".promote");
    PathBuf::from(p)
}

/// Writes the state. The default syncs file and folder; tests inject one
/// that fails, to stop the controller between a flag change and its record.
pub trait StateWriter: Send + Sync {
    fn write(&self, path: &Path, state: &State) -> std::io::Result<()>;
}

/// The state file, written whole and synced.
pub struct FileWriter;

impl StateWriter for FileWriter {
    fn write(&self, path: &Path, state: &State) -> std::io::Result<()> {
        let v = serde_json::to_value(state).map_err(std::io::Error::other)?;
        crate::flags::write_synced(path, &v)
    }
}

/// Reads a state file: None when there is none.
pub fn read_state(path: &Path) -> Result<Option<State>, RolloutError> {
    let err = |message: String| RolloutError::State {
        path: path.display().to_string(),
        message,
    };
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text).map(Some).map_err(|e| {
            err(format!(
                "{e}: not a state this version wrote; remove it to start over"
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(err(e.to_string())),
    }
}

pub struct Controller {
    pub plan: Plan,
    store: FlagStore,
    metrics: RolloutMetrics,
    http: reqwest::Client,
    state: Mutex<State>,
    /// No state file: the levels before the rollout are read at start.
    fresh: AtomicBool,
    /// The flags as last read, for `/status`.
    seen: Mutex<Option<Reading>>,
    /// The new pipeline's lag as last read, for `/status`.
    lag: Mutex<Option<LagCheck>>,
    writer: Box<dyn StateWriter>,
}

impl Controller {
    /// Loads the state file if there is one (resume), else starts fresh. A
    /// state written for another plan is refused, saying what differs.
    pub fn new(
        plan: Plan,
        store: FlagStore,
        metrics: RolloutMetrics,
    ) -> Result<Arc<Controller>, RolloutError> {
        Controller::with_writer(plan, store, metrics, Box::new(FileWriter))
    }

    pub fn with_writer(
        plan: Plan,
        store: FlagStore,
        metrics: RolloutMetrics,
        writer: Box<dyn StateWriter>,
    ) -> Result<Arc<Controller>, RolloutError> {
        let loaded = read_state(&plan.state_file)?;
        let fresh = loaded.is_none();
        let state = match loaded {
            Some(s) => {
                let d = s.plan.differences(&PlanRecord::of(&plan));
                if !d.is_empty() {
                    return Err(RolloutError::Plan(format!(
                        "the state file {} belongs to another plan (fingerprint {}, this one {}): {}. It resumes only the plan it was written for; to start over with this plan, remove the state file (the flags stay as they are: the new rollout starts from them)",
                        plan.state_file.display(),
                        s.plan.fingerprint,
                        PlanRecord::of(&plan).fingerprint,
                        d.join("; ")
                    )));
                }
                if let Some(i) = s.step.filter(|i| *i >= plan.steps.len()) {
                    return Err(RolloutError::Plan(format!(
                        "the state file holds step {} of a plan with {} steps",
                        i + 1,
                        plan.steps.len()
                    )));
                }
                s
            }
            None => State::new(&plan, Levels::percents(0.0, 0.0), now_unix()),
        };
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap_or_default();
        Ok(Arc::new(Controller {
            plan,
            store,
            metrics,
            http,
            state: Mutex::new(state),
            fresh: AtomicBool::new(fresh),
            seen: Mutex::new(None),
            lag: Mutex::new(None),
            writer,
        }))
    }

    pub fn state(&self) -> State {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn seen(&self) -> Option<Reading> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The levels the flags are at, as this plan counts them; an error when
    /// a migration flag serves stages the plan does not move between.
    fn levels(&self, r: &Reading) -> Result<Levels, String> {
        let mut l = Levels::percents(r.current.dual_write, r.current.kafka_only);
        if let Some((from, to)) = self.plan.migration() {
            let served = r
                .migration
                .as_ref()
                .ok_or("the migration flag serves nothing")?;
            l.migration = migration_share(served, from, to)?;
        }
        Ok(l)
    }

    /// Levels in words, for messages.
    fn describe_levels(&self, l: &Levels) -> String {
        match self.plan.migration() {
            Some((from, to)) => {
                format!("{to} {} % / {from} {} %", l.migration, 100.0 - l.migration)
            }
            None => format!(
                "dual-write {} % / kafka-only {} %",
                l.dual_write, l.kafka_only
            ),
        }
    }

    /// The flags as read, in words.
    fn describe(&self, r: &Reading) -> String {
        let killed = if r.current.kill_switch {
            ", killed"
        } else {
            ""
        };
        match (&r.migration, self.plan.migration()) {
            (Some(m), Some(_)) => format!(
                "the migration flag serves {}{killed}",
                m.iter()
                    .map(|(s, p)| format!("{s} {p} %"))
                    .collect::<Vec<_>>()
                    .join(" / ")
            ),
            (None, Some(_)) => format!("the migration flag serves nothing{killed}"),
            _ => format!(
                "dual-write {} % / kafka-only {} %{killed}",
                r.current.dual_write, r.current.kafka_only
            ),
        }
    }

    /// `/status`: the plan, the state, the flags as they are, the history.
    pub fn status_json(&self) -> Value {
        let s = self.state();
        let seen = self.seen();
        let served = seen
            .as_ref()
            .and_then(|r| self.levels(r).ok())
            .map(|l| l.stage(self.plan.stage))
            .unwrap_or_else(|| s.percent(&self.plan));
        json!({
            "status": if s.paused.is_some() && !s.status.finished() { "paused" } else { s.status.as_str() },
            "state": s.status.as_str(),
            "paused": s.paused,
            "stage": self.plan.stage,
            "migration": s.plan.migration,
            "plan": s.plan.fingerprint,
            "step": s.step.map(|i| i + 1),
            "steps": self.plan.steps,
            "percent": served,
            "set": s.set,
            "before": s.before,
            "flags": seen.as_ref().map(|r| json!({"current": r.current, "migration": r.migration, "problems": r.problem_text()})),
            "intent": s.intent,
            "step_started_at": s.step_started_at,
            "failures_on_step": s.failures,
            "failure_limit": self.plan.failure_limit,
            "checks_passed": s.checks_passed,
            "checks_failed": s.checks_failed,
            "lag": self.lag.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(|l| match l {
                LagCheck::KeepingUp(lag) => json!({"state": "keeping-up", "seconds": lag.seconds, "messages": lag.messages}),
                LagCheck::Behind(lag, why) => json!({"state": "behind", "seconds": lag.seconds, "messages": lag.messages, "why": why}),
                LagCheck::Unknown(why) => json!({"state": "unknown", "why": why}),
            }),
            "max_lag_secs": self.plan.max_lag_secs,
            "history": s.history,
        })
    }

    fn save(&self, s: &State) -> Result<(), RolloutError> {
        let path = &self.plan.state_file;
        self.writer
            .write(path, s)
            .map_err(|e| RolloutError::State {
                path: path.display().to_string(),
                message: e.to_string(),
            })?;
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = s.clone();
        self.publish(s);
        Ok(())
    }

    fn publish(&self, s: &State) {
        self.metrics
            .step
            .set(s.step.map(|i| i as i64 + 1).unwrap_or(0));
        let served = self
            .seen()
            .and_then(|r| self.levels(&r).ok())
            .map(|l| l.stage(self.plan.stage))
            .unwrap_or_else(|| s.percent(&self.plan));
        self.metrics.percent.set(served);
        self.metrics
            .paused
            .set(i64::from(s.paused.is_some() && !s.status.finished()));
        for st in [
            Status::Running,
            Status::WaitingForPromotion,
            Status::Done,
            Status::RolledBack,
        ] {
            self.metrics
                .status
                .with_label_values(&[st.as_str()])
                .set(i64::from(st == s.status));
        }
        if let Some(t) = s.history.last() {
            self.metrics.last_transition.set(t.at);
        }
    }

    fn stage_flag(&self) -> Option<Which> {
        match self.plan.stage {
            Stage::DualWrite => Some(Which::DualWrite),
            Stage::KafkaOnly => Some(Which::KafkaOnly),
            Stage::Migration => None,
        }
    }

    async fn transition(
        &self,
        s: &mut State,
        event: &str,
        reason: String,
    ) -> Result<(), RolloutError> {
        let percent = s.percent(&self.plan);
        let t = Transition {
            at: now_unix(),
            event: event.to_string(),
            percent,
            reason,
        };
        tracing::info!(event, percent, reason = %t.reason, step = s.step.map(|i| i + 1), "rollout transition");
        s.history.push(t.clone());
        self.save(s)?;
        for url in &self.plan.webhooks {
            let body = json!({"event": event, "stage": self.plan.stage, "step": s.step.map(|i| i + 1),
                "percent": percent, "reason": t.reason, "at": t.at, "status": s.status.as_str(),
                "paused": s.paused});
            if let Err(e) = self
                .http
                .post(url)
                .json(&body)
                .send()
                .await
                .and_then(|r| r.error_for_status())
            {
                tracing::warn!(url = %crate::db::redact_endpoint(url), error = %e.without_url(), "webhook failed");
            }
        }
        Ok(())
    }

    /// GETs `base` + `path` with `query` and reads the JSON answer; an
    /// error names the source (`what`) and its host, never the whole URL.
    async fn get_json(
        &self,
        what: &str,
        base: &str,
        path: &str,
        query: &[(&str, String)],
    ) -> Result<Value, String> {
        self.get(what, base, path, query)
            .await?
            .json()
            .await
            .map_err(|e| format!("{what} answer unreadable: {}", e.without_url()))
    }

    /// GETs `base` + `path` with `query`: a 2xx answer, or an error that
    /// names the source (`what`) and its host, never the whole URL.
    async fn get(
        &self,
        what: &str,
        base: &str,
        path: &str,
        query: &[(&str, String)],
    ) -> Result<reqwest::Response, String> {
        let url = format!("{}{path}", base.trim_end_matches('/'));
        self.http
            .get(&url)
            .query(query)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|e| {
                format!(
                    "{what} at {}: {}",
                    crate::db::redact_url(base),
                    e.without_url()
                )
            })
    }

    /// The new pipeline's lag, when the plan names a source: the largest
    /// over every ingest consumer (each one's `/metrics`), or a Prometheus
    /// query's value in seconds.
    async fn lag(&self) -> Option<LagCheck> {
        if !self.plan.lag_urls.is_empty() {
            let mut worst: Option<Lag> = None;
            for base in &self.plan.lag_urls {
                let text = match self.get("ingest", base, "/metrics", &[]).await {
                    Ok(r) => match r.text().await {
                        Ok(t) => t,
                        Err(e) => {
                            return Some(LagCheck::Unknown(format!(
                                "ingest answer unreadable: {}",
                                e.without_url()
                            )))
                        }
                    },
                    Err(e) => return Some(LagCheck::Unknown(e)),
                };
                if let Some(l) = lag_of_metrics(&text) {
                    worst = Some(match worst {
                        None => l,
                        Some(w) => Lag {
                            seconds: w.seconds.max(l.seconds),
                            messages: match (w.messages, l.messages) {
                                (Some(a), Some(b)) => Some(a.max(b)),
                                (a, b) => a.or(b),
                            },
                        },
                    });
                }
            }
            return Some(match worst {
                Some(l) => lag_check(&self.plan, l),
                None => {
                    LagCheck::Unknown("no ingest consumer reports a measured partition yet".into())
                }
            });
        }
        let (Some(base), Some(q)) = (&self.plan.prometheus_url, &self.plan.lag_prometheus_query)
        else {
            return None;
        };
        let query = [("query", q.clone())];
        Some(
            match self
                .get_json("prometheus", base, "/api/v1/query", &query)
                .await
            {
                Err(e) => LagCheck::Unknown(e),
                Ok(body) if body["status"] != "success" => LagCheck::Unknown(format!(
                    "prometheus answered {}: {}",
                    body["status"],
                    body["error"].as_str().unwrap_or("no error message")
                )),
                Ok(body) => match body["data"]["result"][0]["value"][1]
                    .as_str()
                    .and_then(|v| v.parse::<f64>().ok())
                    .filter(|v| v.is_finite())
                {
                    Some(v) => lag_check(
                        &self.plan,
                        Lag {
                            seconds: v,
                            messages: None,
                        },
                    ),
                    None => LagCheck::Unknown(format!("prometheus query {q:?} returned no sample")),
                },
            },
        )
    }

    /// Parity for every window that received rows since the step started,
    /// by the comparator's own arrival clock.
    async fn check(&self, s: &State) -> Check {
        if let Some(base) = &self.plan.parity_url {
            let since = [("arrived_since", s.step_started_at.to_string())];
            return match self.get_json("comparator", base, "/parity", &since).await {
                Ok(body) => parity_check(&body, s.step_started_at + self.plan.dwell_secs),
                Err(e) => Check::Unreachable(e),
            };
        }
        if let (Some(base), Some(q)) = (&self.plan.prometheus_url, &self.plan.prometheus_query) {
            let query = [("query", q.clone())];
            return match self
                .get_json("prometheus", base, "/api/v1/query", &query)
                .await
            {
                Ok(body) => prometheus_check(q, &body),
                Err(e) => Check::Unreachable(e),
            };
        }
        Check::Unreachable("no parity source".into())
    }

    /// Starts (or resumes) and runs the plan until it is done, rolled back,
    /// or `shutdown`.
    pub async fn run(
        self: &Arc<Self>,
        shutdown: CancellationToken,
    ) -> Result<Outcome, RolloutError> {
        if let Some(done) = self.start().await? {
            return Ok(done);
        }
        let every = Duration::from_secs_f64(self.plan.check_interval_secs);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(Outcome::Interrupted),
                _ = tokio::time::sleep(every) => {}
            }
            if let Some(done) = self.tick(None).await? {
                return Ok(done);
            }
        }
    }

    fn finished(&self, s: &State) -> Option<Outcome> {
        match s.status {
            Status::Done => Some(Outcome::Done),
            Status::RolledBack => Some(Outcome::RolledBack(
                s.history
                    .iter()
                    .rev()
                    .find(|t| t.event == "rolled-back")
                    .map(|t| t.reason.clone())
                    .unwrap_or_default(),
            )),
            _ => None,
        }
    }

    /// Start-up: a fresh plan reads the levels it starts from and applies
    /// its first step; a resumed one completes (or recognises) an
    /// interrupted change. Returns an outcome if the plan is already over.
    pub async fn start(&self) -> Result<Option<Outcome>, RolloutError> {
        let mut s = self.state();
        self.publish(&s);
        if let Some(done) = self.finished(&s) {
            return Ok(Some(done));
        }
        let reading = self.store.read().await?;
        *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(reading.clone());
        if self.fresh.swap(false, Ordering::SeqCst) {
            if !reading.problems.is_empty() {
                return Err(RolloutError::Plan(format!(
                    "cannot start while the flags have problems: {}",
                    reading.problem_text().join("; ")
                )));
            }
            if reading.current.kill_switch {
                return Err(RolloutError::Plan(
                    "the kill switch is on: release it (`switchyard flags unkill`) before starting a rollout".into(),
                ));
            }
            if self.plan.stage == Stage::Migration && self.store.keys().migration.is_none() {
                return Err(RolloutError::Plan(
                    "a migration plan needs the migration flag configured (flags.keys.migration)"
                        .into(),
                ));
            }
            let now = self
                .levels(&reading)
                .map_err(|e| RolloutError::Plan(format!("cannot start: {e}")))?;
            check_start(&self.plan, now).map_err(RolloutError::Plan)?;
            s = State::new(&self.plan, now, now_unix());
            // A promotion left from an earlier rollout opens no gate here.
            let _ = std::fs::remove_file(promote_file(&self.plan.state_file));
            self.save(&s)?;
            let pct = self.plan.steps[0];
            self.apply(
                &mut s,
                Intent {
                    event: "start".into(),
                    step: Some(0),
                    levels: Levels::of(self.plan.stage, now, pct),
                    kill: false,
                    reason: format!(
                        "step 1 of {} ({pct}%), from {}",
                        self.plan.steps.len(),
                        self.describe_levels(&now)
                    ),
                },
                &reading,
            )
            .await?;
            return Ok(None);
        }
        if let Some(intent) = s.intent.clone() {
            let at = self.levels(&reading).ok();
            let done = at == Some(intent.levels) && (!intent.kill || reading.current.kill_switch);
            if done && reading.problems.is_empty() {
                tracing::warn!(event = %intent.event, "resuming: the interrupted change was applied; recording it");
                self.confirm(&mut s, &intent).await?;
            } else if at == Some(s.set) && reading.problems.is_empty() {
                tracing::warn!(event = %intent.event, "resuming: the interrupted change was not applied; applying it");
                self.apply(&mut s, intent, &reading).await?;
            } else {
                s.intent = None;
                self.pause(
                    &mut s,
                    format!(
                        "on resume the flags are neither what the controller last set nor what it was setting ({}): a manual change; it does not override it",
                        self.describe(&reading)
                    ),
                )
                .await?;
            }
            return Ok(self.finished(&self.state()));
        }
        let why = format!("resumed at step {}", s.step.map(|i| i + 1).unwrap_or(0));
        self.transition(&mut s, "resume", why).await?;
        Ok(None)
    }

    /// Writes the intent (synced), changes the flags, confirms.
    async fn apply(
        &self,
        s: &mut State,
        intent: Intent,
        reading: &Reading,
    ) -> Result<(), RolloutError> {
        s.intent = Some(intent.clone());
        self.save(s)?;
        let comment = format!("rollout {}: {}", intent.event, intent.reason);
        if intent.kill && !reading.current.kill_switch {
            self.store
                .set(Which::KillSwitch, json!(true), false, &comment)
                .await?;
        }
        if let Some((from, to)) = self.plan.migration() {
            self.store
                .set_migration(
                    from,
                    to,
                    intent.levels.migration,
                    reading.migration.as_ref(),
                    &comment,
                )
                .await?;
            if let Ok(r) = self.store.read().await {
                *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
            }
            return self.confirm(s, &intent).await;
        }
        let from = Levels::percents(reading.current.dual_write, reading.current.kafka_only);
        let to = intent.levels;
        // Lowering: Kafka-only first; raising: dual-write first, so that
        // Kafka-only is never above dual-write in between.
        let order = if to.dual_write < from.dual_write || to.kafka_only < from.kafka_only {
            [Which::KafkaOnly, Which::DualWrite]
        } else {
            [Which::DualWrite, Which::KafkaOnly]
        };
        for w in order {
            let (want, have) = match w {
                Which::DualWrite => (to.dual_write, from.dual_write),
                _ => (to.kafka_only, from.kafka_only),
            };
            if want != have || Some(w) == self.stage_flag() {
                self.store.set(w, json!(want), false, &comment).await?;
            }
        }
        if let Ok(r) = self.store.read().await {
            *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
        }
        self.confirm(s, &intent).await
    }

    async fn confirm(&self, s: &mut State, intent: &Intent) -> Result<(), RolloutError> {
        s.set = intent.levels;
        s.step = intent.step;
        s.step_started_at = now_unix();
        s.failures = 0;
        s.intent = None;
        s.paused = None;
        s.no_data_since = None;
        s.source_down_since = None;
        if intent.event == "rollback" {
            s.status = Status::RolledBack;
            self.transition(s, "rolled-back", intent.reason.clone())
                .await
        } else {
            s.status = Status::Running;
            self.transition(s, &intent.event, intent.reason.clone())
                .await
        }
    }

    async fn pause(&self, s: &mut State, why: String) -> Result<(), RolloutError> {
        if s.paused.as_deref() == Some(why.as_str()) {
            return self.save(s);
        }
        let first = s.paused.is_none();
        s.paused = Some(why.clone());
        if first {
            tracing::error!(reason = %why, "rollout paused");
        }
        self.transition(s, "paused", why).await
    }

    /// Consumes a promotion for the gate being waited at; a stale one (for
    /// another step) is removed and ignored.
    fn take_promotion(&self, s: &State) -> Option<usize> {
        let path = promote_file(&self.plan.state_file);
        let text = std::fs::read_to_string(&path).ok()?;
        let _ = std::fs::remove_file(&path);
        let waiting_for = s.step.map(|i| i + 1).unwrap_or(0);
        match text.trim().parse::<usize>() {
            Ok(n) if s.status == Status::WaitingForPromotion && n == waiting_for + 1 => {
                Some(waiting_for)
            }
            _ => {
                tracing::warn!(promotion = %text.trim(), "a promotion for another step was ignored");
                None
            }
        }
    }

    /// One check: re-reads the flags, asks for parity (unless `check` is
    /// given), decides, acts. Returns an outcome when the plan is over.
    pub async fn tick(&self, check: Option<Check>) -> Result<Option<Outcome>, RolloutError> {
        let mut s = self.state();
        if let Some(done) = self.finished(&s) {
            return Ok(Some(done));
        }
        if s.status == Status::WaitingForPromotion {
            if let Some(n) = self.take_promotion(&s) {
                s.promoted = Some(n);
                s.status = Status::Running;
                self.transition(
                    &mut s,
                    "promoted",
                    format!("step {} promoted by hand", n + 1),
                )
                .await?;
            }
        }
        let reading = self.store.read().await;
        let flag_pause = match &reading {
            Err(e) => Some(format!("flags unreadable: {e}")),
            Ok(r) if !r.problems.is_empty() => {
                Some(format!("flag problems: {}", r.problem_text().join("; ")))
            }
            Ok(r) if r.current.kill_switch => Some("the kill switch is on".to_string()),
            Ok(r) => match self.levels(r) {
                Ok(l) if l == s.set => None,
                _ => Some(format!(
                    "manual change: {}, the controller last set {}; it does not override a person: set them back to resume, or remove the state file to start over",
                    self.describe(r),
                    self.describe_levels(&s.set)
                )),
            },
        };
        if let Ok(r) = &reading {
            *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(r.clone());
        }
        if let Some(why) = flag_pause {
            self.pause(&mut s, why).await?;
            return Ok(None);
        }
        let Ok(reading) = reading else {
            return Ok(None);
        };
        let check = match check {
            Some(c) => c,
            None => self.check(&s).await,
        };
        let now = now_unix();
        match &check {
            Check::Verified => {
                s.checks_passed += 1;
                self.metrics.checks.with_label_values(&["passed"]).inc();
            }
            Check::Breach(why) => {
                s.checks_failed += 1;
                self.metrics.checks.with_label_values(&["failed"]).inc();
                tracing::warn!(step = s.step.map(|i| i + 1), failures = s.failures + 1, limit = self.plan.failure_limit, %why, "parity check failed");
            }
            Check::NotYet(why) | Check::NoData(why) => {
                self.metrics.checks.with_label_values(&["pending"]).inc();
                tracing::debug!(%why, "parity not verified yet");
            }
            Check::Unreachable(why) => {
                self.metrics
                    .checks
                    .with_label_values(&["unreachable"])
                    .inc();
                tracing::warn!(%why, "parity source unreachable");
            }
        }
        match &check {
            Check::NoData(_) => {
                s.no_data_since.get_or_insert(now);
            }
            Check::Unreachable(_) => {}
            _ => s.no_data_since = None,
        }
        match &check {
            Check::Unreachable(_) => {
                s.source_down_since.get_or_insert(now);
            }
            _ => s.source_down_since = None,
        }
        let mut action = decide(&self.plan, &s, &check, now);
        if let Some(lag) = self.lag().await {
            match &lag {
                LagCheck::Unknown(why) => {
                    s.lag_down_since.get_or_insert(now);
                    tracing::warn!(%why, "ingest lag unknown");
                }
                LagCheck::KeepingUp(l) | LagCheck::Behind(l, _) => {
                    s.lag_down_since = None;
                    self.metrics.ingest_lag_seconds.set(l.seconds);
                }
            }
            let behind = matches!(lag, LagCheck::Behind(..));
            self.metrics.ingest_behind.set(i64::from(behind));
            if let LagCheck::Behind(l, why) = &lag {
                tracing::warn!(step = s.step.map(|i| i + 1), lag_seconds = l.seconds,
                    lag_messages = ?l.messages, %why, "the new pipeline is behind");
            }
            action = gate_on_lag(&self.plan, &s, &check, action, &lag, now);
            *self.lag.lock().unwrap_or_else(|p| p.into_inner()) = Some(lag);
        }
        if matches!(check, Check::Breach(_)) {
            s.failures += 1;
        }
        if s.paused.is_some() && !matches!(action, Action::Pause(_) | Action::RollBack(_)) {
            // The cause is gone: the step's clock starts again, since what
            // was served meanwhile was not what the step is.
            s.paused = None;
            s.step_started_at = now;
            s.failures = 0;
            self.transition(
                &mut s,
                "unpaused",
                "flags, parity source and ingest lag as expected again".into(),
            )
            .await?;
            return Ok(None);
        }
        match action {
            Action::Hold => self.save(&s)?,
            Action::Pause(why) => self.pause(&mut s, why).await?,
            Action::Advance(n) => {
                let pct = self.plan.steps[n];
                let to = Levels::of(self.plan.stage, s.set, pct);
                let why = format!(
                    "step {} ({pct}%): step {} held {} s with parity verified",
                    n + 1,
                    n,
                    self.plan.dwell_secs
                );
                self.apply(
                    &mut s,
                    Intent {
                        event: "advance".into(),
                        step: Some(n),
                        levels: to,
                        kill: false,
                        reason: why,
                    },
                    &reading,
                )
                .await?;
            }
            Action::WaitForPromotion(n) => {
                if s.status != Status::WaitingForPromotion {
                    s.status = Status::WaitingForPromotion;
                    let why = format!(
                        "step {} ({}%) is a manual gate: run `switchyard rollout promote`",
                        n + 1,
                        self.plan.steps[n]
                    );
                    self.transition(&mut s, "waiting-for-promotion", why)
                        .await?;
                } else {
                    self.save(&s)?;
                }
            }
            Action::Finish => {
                s.status = Status::Done;
                self.transition(&mut s, "done", "last step held with parity verified".into())
                    .await?;
            }
            Action::RollBack(why) => {
                let (step, to) = rollback_target(&self.plan, &s);
                tracing::error!(%why, dual_write = to.dual_write, kafka_only = to.kafka_only, "rolling back");
                self.apply(
                    &mut s,
                    Intent {
                        event: "rollback".into(),
                        step,
                        levels: to,
                        kill: self.plan.rollback == Rollback::Kill,
                        reason: why,
                    },
                    &reading,
                )
                .await?;
            }
        }
        Ok(self.finished(&self.state()))
    }
}

/// A Prometheus instant query → a check: 1 while parity holds, 0 on a
/// breach, no sample: no data.
pub fn prometheus_check(query: &str, body: &Value) -> Check {
    if body["status"] != "success" {
        return Check::Unreachable(format!(
            "prometheus answered {}: {}",
            body["status"],
            body["error"].as_str().unwrap_or("no error message")
        ));
    }
    let v = body["data"]["result"][0]["value"][1]
        .as_str()
        .and_then(|v| v.parse::<f64>().ok());
    match v {
        Some(v) if v >= 1.0 => Check::Verified,
        Some(v) => Check::Breach(format!("prometheus query {query:?} returned {v}")),
        None => Check::NoData(format!("prometheus query {query:?} returned no sample")),
    }
}

/// A comparator report of the windows that received rows since the step
/// started → a check. The windows that received rows during the dwell (first
/// arrival before `dwell_end`) must all be checked and ok; later ones, still
/// filling while traffic flows, only must not be mismatched. A report without
/// arrival times (an older comparator) needs every window ok.
pub fn parity_check(body: &Value, dwell_end: f64) -> Check {
    let status = body["status"].as_str().unwrap_or("open");
    let mut windows = 0;
    let mut required = 0;
    let mut unsettled = 0;
    let (mut missing_old, mut missing_new) = (0, 0);
    let (mut differs_old, mut differs_new) = (0, 0);
    let mut ids: Vec<String> = Vec::new();
    for t in body["tables"].as_array().into_iter().flatten() {
        missing_old += t["missing_old"].as_u64().unwrap_or(0);
        missing_new += t["missing_new"].as_u64().unwrap_or(0);
        differs_old += t["differs_old"].as_u64().unwrap_or(0);
        differs_new += t["differs_new"].as_u64().unwrap_or(0);
        for w in t["details"].as_array().into_iter().flatten() {
            windows += 1;
            let during_dwell = w["first_arrival"].as_f64().is_none_or(|a| a < dwell_end);
            if during_dwell {
                required += 1;
                if w["status"] != "ok" && w["status"] != "mismatch" {
                    unsettled += 1;
                }
            }
            for k in [
                "missing_ids_old",
                "missing_ids_new",
                "differing_ids_old",
                "differing_ids_new",
            ] {
                for id in w["check"][k].as_array().into_iter().flatten().take(3) {
                    if ids.len() < 5 {
                        ids.push(id.as_str().unwrap_or_default().to_string());
                    }
                }
            }
        }
    }
    match status {
        "mismatch" => Check::Breach(format!(
            "{missing_old} row(s) missing in OLD, {missing_new} in NEW, {} differing (e.g. {})",
            differs_old + differs_new,
            ids.join(", ")
        )),
        _ if windows == 0 => Check::NoData("no window received rows since the step started".into()),
        // No window of the dwell left (the comparator pruned them while the
        // step was held at a gate, or traffic began after the dwell): any
        // window verified since, and none mismatched, verifies the step.
        _ if required == 0 => {
            let ok = body["tables"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|t| t["details"].as_array().into_iter().flatten())
                .any(|w| w["status"] == "ok");
            if ok {
                Check::Verified
            } else {
                Check::NotYet(format!(
                    "{windows} window(s) since the dwell, none verified yet"
                ))
            }
        }
        _ if unsettled == 0 => Check::Verified,
        _ => Check::NotYet(format!(
            "{unsettled} of {required} window(s) of the dwell not settled"
        )),
    }
}

/// `/status` and `/metrics` on the admin port.
pub fn status_router(c: Arc<Controller>) -> axum::Router {
    use axum::extract::State as AxState;
    async fn status(AxState(c): AxState<Arc<Controller>>) -> axum::Json<Value> {
        axum::Json(c.status_json())
    }
    axum::Router::new()
        .route("/status", axum::routing::get(status))
        .with_state(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parity_reports_become_checks() {
        let ok = json!({"status": "ok", "tables": [{"missing_old": 0, "missing_new": 0,
            "details": [{"status": "ok"}, {"status": "ok"}]}]});
        assert_eq!(parity_check(&ok, 100.0), Check::Verified);
        let settling = json!({"status": "ok", "tables": [{"details": [{"status": "ok"}, {"status": "open"}]}]});
        assert!(matches!(parity_check(&settling, 100.0), Check::NotYet(_)));
        let empty = json!({"status": "open", "tables": [{"details": []}]});
        assert!(matches!(parity_check(&empty, 100.0), Check::NoData(_)));
        // A window still filling after the dwell does not hold the step.
        let filling = json!({"status": "ok", "tables": [{"details": [
            {"status": "ok", "first_arrival": 90.0}, {"status": "open", "first_arrival": 120.0}]}]});
        assert_eq!(parity_check(&filling, 100.0), Check::Verified);
        let dwell_open = json!({"status": "ok", "tables": [{"details": [
            {"status": "open", "first_arrival": 90.0}, {"status": "ok", "first_arrival": 120.0}]}]});
        assert!(matches!(parity_check(&dwell_open, 100.0), Check::NotYet(_)));
        // Held at a gate past the comparator's retention: the dwell's windows
        // are gone, later ones verify it (no wedge).
        let pruned = json!({"status": "ok", "tables": [{"details": [
            {"status": "open", "first_arrival": 5000.0}, {"status": "ok", "first_arrival": 4000.0}]}]});
        assert_eq!(parity_check(&pruned, 100.0), Check::Verified);
        let none_yet = json!({"status": "ok", "tables": [{"details": [
            {"status": "open", "first_arrival": 5000.0}]}]});
        assert!(matches!(parity_check(&none_yet, 100.0), Check::NotYet(_)));
        let bad = json!({"status": "mismatch", "tables": [{"missing_old": 0, "missing_new": 2,
            "details": [{"status": "mismatch", "check": {"missing_ids_new": ["a", "b"]}}]}]});
        match parity_check(&bad, 100.0) {
            Check::Breach(why) => {
                assert!(why.contains("2 in NEW") && why.contains("a, b"), "{why}")
            }
            c => panic!("{c:?}"),
        }
    }

    #[test]
    fn prometheus_answers_become_checks() {
        let ok = json!({"status": "success", "data": {"result": [{"value": [1, "1"]}]}});
        assert_eq!(prometheus_check("q", &ok), Check::Verified);
        let bad = json!({"status": "success", "data": {"result": [{"value": [1, "0"]}]}});
        assert!(matches!(prometheus_check("q", &bad), Check::Breach(_)));
        let none = json!({"status": "success", "data": {"result": []}});
        assert!(matches!(prometheus_check("q", &none), Check::NoData(_)));
        let err = json!({"status": "error", "error": "parse error"});
        assert!(matches!(prometheus_check("q", &err), Check::Unreachable(_)));
    }
}
