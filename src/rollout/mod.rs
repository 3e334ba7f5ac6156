//! `switchyard rollout`: raises a flag one step at a time, only after the
//! step's dwell passed with parity verified for the windows written during
//! it, and rolls back by itself when parity breaks past the failure limit.
//! Its state is a file written after every change, so a restarted controller
//! resumes where it was.

pub mod cli;
mod metrics;
pub mod plan;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::flags::store::{FlagStore, StoreError, Which};
pub use metrics::RolloutMetrics;
use plan::{
    decide, rollback_percent, Action, Check, Plan, Rollback, Stage, State, Status, Transition,
};

/// Why the controller stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    #[error("state file {path}: {message}")]
    State { path: String, message: String },
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

pub struct Controller {
    pub plan: Plan,
    store: FlagStore,
    metrics: RolloutMetrics,
    http: reqwest::Client,
    state: Mutex<State>,
}

impl Controller {
    /// Loads the state file if there is one (resume), else starts at step 1.
    pub fn new(
        plan: Plan,
        store: FlagStore,
        metrics: RolloutMetrics,
    ) -> Result<Arc<Controller>, RolloutError> {
        let state = match std::fs::read_to_string(&plan.state_file) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| RolloutError::State {
                path: plan.state_file.display().to_string(),
                message: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State::new(now_unix()),
            Err(e) => {
                return Err(RolloutError::State {
                    path: plan.state_file.display().to_string(),
                    message: e.to_string(),
                })
            }
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
        }))
    }

    pub fn state(&self) -> State {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// `/status`: the plan, the state and its history.
    pub fn status_json(&self) -> Value {
        let s = self.state();
        json!({
            "status": s.status.as_str(),
            "stage": self.plan.stage,
            "step": s.step + 1,
            "steps": self.plan.steps,
            "percent": self.plan.steps[s.step],
            "step_started_at": s.step_started_at,
            "failures_on_step": s.failures,
            "failure_limit": self.plan.failure_limit,
            "checks_passed": s.checks_passed,
            "checks_failed": s.checks_failed,
            "history": s.history,
        })
    }

    fn save(&self, s: &State) -> Result<(), RolloutError> {
        let path = &self.plan.state_file;
        let err = |e: String| RolloutError::State {
            path: path.display().to_string(),
            message: e,
        };
        let text = serde_json::to_string_pretty(s).map_err(|e| err(e.to_string()))?;
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        std::fs::write(&tmp, text).map_err(|e| err(e.to_string()))?;
        std::fs::rename(&tmp, path).map_err(|e| err(e.to_string()))?;
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = s.clone();
        self.publish(s);
        Ok(())
    }

    fn publish(&self, s: &State) {
        self.metrics.step.set((s.step + 1) as i64);
        self.metrics.percent.set(self.plan.steps[s.step]);
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

    fn stage_flag(&self) -> Which {
        match self.plan.stage {
            Stage::DualWrite => Which::DualWrite,
            Stage::KafkaOnly => Which::KafkaOnly,
        }
    }

    async fn transition(
        &self,
        s: &mut State,
        event: &str,
        percent: f64,
        reason: String,
    ) -> Result<(), RolloutError> {
        let t = Transition {
            at: now_unix(),
            event: event.to_string(),
            percent,
            reason,
        };
        tracing::info!(event, percent, reason = %t.reason, step = s.step + 1, "rollout transition");
        s.history.push(t.clone());
        self.save(s)?;
        for url in &self.plan.webhooks {
            let body = json!({"event": event, "stage": self.plan.stage, "step": s.step + 1,
                "percent": percent, "reason": t.reason, "at": t.at, "status": s.status.as_str()});
            if let Err(e) = self
                .http
                .post(url)
                .json(&body)
                .send()
                .await
                .and_then(|r| r.error_for_status())
            {
                tracing::warn!(%url, error = %e, "webhook failed");
            }
        }
        Ok(())
    }

    /// Parity for the windows written during the current step.
    async fn check(&self, s: &State) -> Check {
        let from = s.step_started_at.floor() as i64;
        let to = (s.step_started_at + self.plan.dwell_secs).ceil() as i64;
        if let Some(base) = &self.plan.parity_url {
            let url = format!("{}/parity", base.trim_end_matches('/'));
            let r = self
                .http
                .get(&url)
                .query(&[("from", from), ("to", to)])
                .send()
                .await
                .and_then(|r| r.error_for_status());
            let body: Value = match r {
                Ok(r) => match r.json().await {
                    Ok(b) => b,
                    Err(e) => return Check::NotYet(format!("parity report unreadable: {e}")),
                },
                Err(e) => return Check::NotYet(format!("comparator unreachable: {e}")),
            };
            return parity_check(&body);
        }
        if let (Some(base), Some(q)) = (&self.plan.prometheus_url, &self.plan.prometheus_query) {
            let url = format!("{}/api/v1/query", base.trim_end_matches('/'));
            let r = self
                .http
                .get(&url)
                .query(&[("query", q.as_str())])
                .send()
                .await;
            let body: Value = match r {
                Ok(r) => r.json().await.unwrap_or(Value::Null),
                Err(e) => return Check::NotYet(format!("prometheus unreachable: {e}")),
            };
            let v = body["data"]["result"][0]["value"][1]
                .as_str()
                .and_then(|v| v.parse::<f64>().ok());
            return match v {
                Some(v) if v >= 1.0 => Check::Verified,
                Some(_) => Check::Breach(format!("prometheus query {q:?} returned 0")),
                None => Check::NotYet("prometheus query returned no data".into()),
            };
        }
        Check::NotYet("no parity source".into())
    }

    /// Runs the plan until it is done, rolled back, or `shutdown`.
    pub async fn run(
        self: &Arc<Self>,
        shutdown: CancellationToken,
    ) -> Result<Outcome, RolloutError> {
        let mut s = self.state();
        self.publish(&s);
        match s.status {
            Status::Done => return Ok(Outcome::Done),
            Status::RolledBack => {
                let why = s
                    .history
                    .last()
                    .map(|t| t.reason.clone())
                    .unwrap_or_default();
                return Ok(Outcome::RolledBack(why));
            }
            _ => {}
        }
        // Apply (again, after a restart) the step being held.
        let pct = self.plan.steps[s.step];
        self.store
            .set(
                self.stage_flag(),
                json!(pct),
                false,
                &format!("rollout step {} ({pct}%)", s.step + 1),
            )
            .await?;
        if s.history.is_empty() {
            self.transition(
                &mut s,
                "start",
                pct,
                format!("step 1 of {}", self.plan.steps.len()),
            )
            .await?;
        } else {
            let why = format!("resumed at step {}", s.step + 1);
            self.transition(&mut s, "resume", pct, why).await?;
        }
        let every = Duration::from_secs_f64(self.plan.check_interval_secs);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(Outcome::Interrupted),
                _ = tokio::time::sleep(every) => {}
            }
            if s.status == Status::WaitingForPromotion {
                if let Ok(text) = std::fs::read_to_string(promote_file(&self.plan.state_file)) {
                    if let Ok(n) = text.trim().parse::<usize>() {
                        s.promoted = Some(n.saturating_sub(1));
                        let _ = std::fs::remove_file(promote_file(&self.plan.state_file));
                        s.status = Status::Running;
                        let pct = self.plan.steps[s.step];
                        self.transition(
                            &mut s,
                            "promoted",
                            pct,
                            format!("step {n} promoted by hand"),
                        )
                        .await?;
                    }
                }
            }
            let check = self.check(&s).await;
            match &check {
                Check::Verified => {
                    s.checks_passed += 1;
                    self.metrics.checks.with_label_values(&["passed"]).inc();
                }
                Check::Breach(why) => {
                    s.checks_failed += 1;
                    s.failures += 1;
                    self.metrics.checks.with_label_values(&["failed"]).inc();
                    tracing::warn!(step = s.step + 1, failures = s.failures, limit = self.plan.failure_limit, %why, "parity check failed");
                }
                Check::NotYet(why) => {
                    self.metrics.checks.with_label_values(&["pending"]).inc();
                    tracing::debug!(%why, "parity not verified yet");
                }
            }
            // `decide` counts the breach itself: judge on the state before it.
            let mut before = s.clone();
            if matches!(check, Check::Breach(_)) {
                before.failures -= 1;
            }
            match decide(&self.plan, &before, &check, now_unix()) {
                Action::Hold => self.save(&s)?,
                Action::Advance(n) => {
                    let pct = self.plan.steps[n];
                    self.store
                        .set(
                            self.stage_flag(),
                            json!(pct),
                            false,
                            &format!("rollout step {} ({pct}%)", n + 1),
                        )
                        .await?;
                    s.step = n;
                    s.step_started_at = now_unix();
                    s.failures = 0;
                    self.transition(
                        &mut s,
                        "advance",
                        pct,
                        format!(
                            "step {} held {} s with parity verified",
                            n, self.plan.dwell_secs
                        ),
                    )
                    .await?;
                }
                Action::WaitForPromotion(n) => {
                    if s.status != Status::WaitingForPromotion {
                        s.status = Status::WaitingForPromotion;
                        let pct = self.plan.steps[s.step];
                        let why = format!(
                            "step {} ({}%) is a manual gate: run `switchyard rollout promote`",
                            n + 1,
                            self.plan.steps[n]
                        );
                        self.transition(&mut s, "waiting-for-promotion", pct, why)
                            .await?;
                    } else {
                        self.save(&s)?;
                    }
                }
                Action::Finish => {
                    s.status = Status::Done;
                    let pct = self.plan.steps[s.step];
                    self.transition(
                        &mut s,
                        "done",
                        pct,
                        "last step held with parity verified".into(),
                    )
                    .await?;
                    return Ok(Outcome::Done);
                }
                Action::RollBack(why) => {
                    let pct = match self.plan.rollback {
                        Rollback::Previous => {
                            let back = rollback_percent(&self.plan, &s);
                            self.store
                                .set(
                                    self.stage_flag(),
                                    json!(back),
                                    true,
                                    &format!("rollback: {why}"),
                                )
                                .await?;
                            back
                        }
                        Rollback::Kill => {
                            self.store
                                .set(
                                    Which::KillSwitch,
                                    json!(true),
                                    true,
                                    &format!("rollback: {why}"),
                                )
                                .await?;
                            self.plan.steps[s.step]
                        }
                    };
                    s.status = Status::RolledBack;
                    tracing::error!(%why, "rolled back");
                    self.transition(&mut s, "rolled-back", pct, why.clone())
                        .await?;
                    return Ok(Outcome::RolledBack(why));
                }
            }
        }
    }
}

/// A comparator report restricted to a step's windows → a check.
pub fn parity_check(body: &Value) -> Check {
    let status = body["status"].as_str().unwrap_or("open");
    let mut windows = 0;
    let mut unsettled = 0;
    let (mut missing_old, mut missing_new) = (0, 0);
    let mut ids: Vec<String> = Vec::new();
    for t in body["tables"].as_array().into_iter().flatten() {
        missing_old += t["missing_old"].as_u64().unwrap_or(0);
        missing_new += t["missing_new"].as_u64().unwrap_or(0);
        for w in t["details"].as_array().into_iter().flatten() {
            windows += 1;
            if w["status"] != "ok" && w["status"] != "mismatch" {
                unsettled += 1;
            }
            for k in ["missing_ids_old", "missing_ids_new"] {
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
            "{missing_old} row(s) missing in OLD, {missing_new} in NEW (e.g. {})",
            ids.join(", ")
        )),
        "ok" if windows > 0 && unsettled == 0 => Check::Verified,
        _ => Check::NotYet(format!("{unsettled} of {windows} window(s) not settled")),
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
        assert_eq!(parity_check(&ok), Check::Verified);
        let settling = json!({"status": "ok", "tables": [{"details": [{"status": "ok"}, {"status": "open"}]}]});
        assert!(matches!(parity_check(&settling), Check::NotYet(_)));
        let empty = json!({"status": "open", "tables": [{"details": []}]});
        assert!(matches!(parity_check(&empty), Check::NotYet(_)));
        let bad = json!({"status": "mismatch", "tables": [{"missing_old": 0, "missing_new": 2,
            "details": [{"status": "mismatch", "check": {"missing_ids_new": ["a", "b"]}}]}]});
        match parity_check(&bad) {
            Check::Breach(why) => {
                assert!(why.contains("2 in NEW") && why.contains("a, b"), "{why}")
            }
            c => panic!("{c:?}"),
        }
    }
}
