//! A rollout plan, and the controller's state and decisions as pure data and
//! functions (the I/O lives in `mod.rs`).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Which flag the rollout raises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Stage {
    DualWrite,
    KafkaOnly,
}

/// What a breach rolls back to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Rollback {
    /// The previous step's percentage (0 before the first).
    Previous,
    /// The kill switch: everything legacy.
    Kill,
}

/// The plan, as written in TOML. Unknown keys are errors.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    pub stage: Stage,
    /// Percentages, increasing, each in (0, 100].
    pub steps: Vec<f64>,
    /// How long each step must hold with parity verified before the next.
    pub dwell_secs: f64,
    /// How often parity is checked.
    pub check_interval_secs: f64,
    /// Failed checks (mismatches) on one step before rolling back.
    pub failure_limit: u32,
    #[serde(default = "default_rollback")]
    pub rollback: Rollback,
    /// The comparator's admin address (its `/parity`), e.g. `http://127.0.0.1:9096`.
    #[serde(default)]
    pub parity_url: Option<String>,
    /// Or a Prometheus: the query must return 1 while parity holds, 0 on a breach.
    #[serde(default)]
    pub prometheus_url: Option<String>,
    #[serde(default)]
    pub prometheus_query: Option<String>,
    /// Steps that wait for `switchyard rollout promote` before they are applied.
    #[serde(default)]
    pub manual_gates: Vec<f64>,
    /// URLs that receive a JSON POST on every transition.
    #[serde(default)]
    pub webhooks: Vec<String>,
    /// Where the controller keeps its state (it resumes from it).
    pub state_file: PathBuf,
}

fn default_rollback() -> Rollback {
    Rollback::Previous
}

impl Plan {
    pub fn parse(text: &str) -> Result<Plan, String> {
        let p: Plan = toml::from_str(text).map_err(|e| e.to_string())?;
        p.validate()?;
        Ok(p)
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.steps.is_empty() {
            return Err("steps: at least one".into());
        }
        let mut prev = 0.0;
        for s in &self.steps {
            if !(s.is_finite() && *s > prev && *s <= 100.0) {
                return Err(format!(
                    "steps: {s} — each step must be above the previous one and at most 100"
                ));
            }
            prev = *s;
        }
        if !(self.dwell_secs.is_finite() && self.dwell_secs >= 0.0) {
            return Err("dwell_secs: a number of seconds".into());
        }
        if !(self.check_interval_secs.is_finite() && self.check_interval_secs > 0.0) {
            return Err("check_interval_secs: positive".into());
        }
        if self.failure_limit == 0 {
            return Err("failure_limit: at least 1".into());
        }
        match (
            &self.parity_url,
            &self.prometheus_url,
            &self.prometheus_query,
        ) {
            (Some(_), None, None) | (None, Some(_), Some(_)) => {}
            _ => {
                return Err(
                    "parity source: either parity_url, or prometheus_url with prometheus_query"
                        .into(),
                )
            }
        }
        if let Some(g) = self.manual_gates.iter().find(|g| !self.steps.contains(g)) {
            return Err(format!("manual_gates: {g} is not one of the steps"));
        }
        Ok(())
    }
}

/// Where the controller is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    /// Holding a step, checking parity.
    Running,
    /// The next step is a manual gate: waiting for `rollout promote`.
    WaitingForPromotion,
    /// The last step held with parity verified.
    Done,
    /// A breach past the failure limit: rolled back.
    RolledBack,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Running => "running",
            Status::WaitingForPromotion => "waiting-for-promotion",
            Status::Done => "done",
            Status::RolledBack => "rolled-back",
        }
    }
}

/// One transition, for the record.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Transition {
    pub at: f64,
    pub event: String,
    pub percent: f64,
    pub reason: String,
}

/// Everything the controller must remember across a restart.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct State {
    pub status: Status,
    /// Index into the plan's steps of the step being held.
    pub step: usize,
    /// Unix time the current step was applied.
    pub step_started_at: f64,
    /// Failed checks on the current step.
    pub failures: u32,
    pub checks_passed: u64,
    pub checks_failed: u64,
    /// The highest step index a person promoted to.
    pub promoted: Option<usize>,
    pub history: Vec<Transition>,
}

impl State {
    pub fn new(now: f64) -> State {
        State {
            status: Status::Running,
            step: 0,
            step_started_at: now,
            failures: 0,
            checks_passed: 0,
            checks_failed: 0,
            promoted: None,
            history: Vec::new(),
        }
    }
}

/// A parity check's outcome for the current step's windows.
#[derive(Debug, Clone, PartialEq)]
pub enum Check {
    /// Every window of the step checked and ok.
    Verified,
    /// Not all windows are settled yet (or no data): wait.
    NotYet(String),
    /// Rows missing: a failed check.
    Breach(String),
}

/// What to do after a check.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Hold,
    /// Apply step `n`.
    Advance(usize),
    WaitForPromotion(usize),
    Finish,
    /// Roll back, with the reason.
    RollBack(String),
}

/// The decision after one check, `now` seconds (unix).
pub fn decide(plan: &Plan, state: &State, check: &Check, now: f64) -> Action {
    match check {
        Check::Breach(why) => {
            if state.failures + 1 >= plan.failure_limit {
                Action::RollBack(format!(
                    "parity breach on step {} ({}%), {} failed check(s): {why}",
                    state.step + 1,
                    plan.steps[state.step],
                    state.failures + 1
                ))
            } else {
                Action::Hold
            }
        }
        Check::NotYet(_) => Action::Hold,
        Check::Verified => {
            if now - state.step_started_at < plan.dwell_secs {
                return Action::Hold;
            }
            let next = state.step + 1;
            if next >= plan.steps.len() {
                return Action::Finish;
            }
            if plan.manual_gates.contains(&plan.steps[next])
                && state.promoted.is_none_or(|p| p < next)
            {
                return Action::WaitForPromotion(next);
            }
            Action::Advance(next)
        }
    }
}

/// The flag value a rollback leaves: the previous step (0 before the first).
pub fn rollback_percent(plan: &Plan, state: &State) -> f64 {
    if state.step == 0 {
        0.0
    } else {
        plan.steps[state.step - 1]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> Plan {
        Plan::parse(
            r#"
            stage = "dual-write"
            steps = [1, 5, 25, 100]
            dwell_secs = 60
            check_interval_secs = 5
            failure_limit = 2
            parity_url = "http://127.0.0.1:9096"
            manual_gates = [100]
            state_file = "s.json"
            "#,
        )
        .unwrap()
    }

    #[test]
    fn plans_are_checked() {
        assert!(plan().validate().is_ok());
        for (bad, want) in [
            ("steps = [5, 1]", "above the previous"),
            ("steps = [101]", "at most 100"),
            ("failure_limit = 0", "at least 1"),
        ] {
            let mut text = r#"
                stage = "dual-write"
                steps = [1, 5]
                dwell_secs = 60
                check_interval_secs = 5
                failure_limit = 2
                parity_url = "http://x"
                state_file = "s.json"
            "#
            .to_string();
            let key = bad.split(' ').next().unwrap();
            text = text
                .lines()
                .filter(|l| !l.trim_start().starts_with(key))
                .collect::<Vec<_>>()
                .join("\n");
            text.push('\n');
            text.push_str(bad);
            let e = Plan::parse(&text).unwrap_err();
            assert!(e.contains(want), "{bad}: {e}");
        }
        assert!(Plan::parse("stage = \"sideways\"").is_err());
    }

    #[test]
    fn a_step_advances_only_after_the_dwell_with_parity_verified() {
        let p = plan();
        let s = State::new(1000.0);
        assert_eq!(decide(&p, &s, &Check::Verified, 1030.0), Action::Hold);
        assert_eq!(
            decide(&p, &s, &Check::NotYet("settling".into()), 1100.0),
            Action::Hold
        );
        assert_eq!(decide(&p, &s, &Check::Verified, 1061.0), Action::Advance(1));
    }

    #[test]
    fn a_breach_rolls_back_at_the_failure_limit() {
        let p = plan();
        let mut s = State::new(0.0);
        s.step = 2;
        assert_eq!(
            decide(&p, &s, &Check::Breach("3 missing".into()), 10.0),
            Action::Hold
        );
        s.failures = 1;
        match decide(&p, &s, &Check::Breach("3 missing".into()), 10.0) {
            Action::RollBack(why) => assert!(
                why.contains("step 3 (25%)") && why.contains("3 missing"),
                "{why}"
            ),
            a => panic!("{a:?}"),
        }
        assert_eq!(rollback_percent(&p, &s), 5.0);
        s.step = 0;
        assert_eq!(rollback_percent(&p, &s), 0.0);
    }

    #[test]
    fn manual_gates_wait_for_a_person() {
        let p = plan();
        let mut s = State::new(0.0);
        s.step = 2;
        assert_eq!(
            decide(&p, &s, &Check::Verified, 100.0),
            Action::WaitForPromotion(3)
        );
        s.promoted = Some(3);
        assert_eq!(decide(&p, &s, &Check::Verified, 100.0), Action::Advance(3));
        s.step = 3;
        assert_eq!(decide(&p, &s, &Check::Verified, 200.0), Action::Finish);
    }
}
