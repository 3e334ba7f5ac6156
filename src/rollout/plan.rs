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
    /// The LaunchDarkly migration flag: the share of accounts moved from
    /// `migration_from` to `migration_to`, bucketed by LaunchDarkly.
    Migration,
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
    /// With `stage = "migration"`: the stage accounts leave and the later
    /// stage they move to (e.g. `off` → `dualwrite`, `dualwrite` → `complete`).
    #[serde(default)]
    pub migration_from: Option<String>,
    #[serde(default)]
    pub migration_to: Option<String>,
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
    /// An empty parity report (no window of the step) for this long pauses
    /// the rollout: nothing verifies the step.
    #[serde(default = "default_no_data_pause")]
    pub no_data_pause_secs: f64,
    /// And for this long rolls it back (0: never; the pause holds).
    #[serde(default)]
    pub no_data_rollback_secs: f64,
    /// A parity source unreachable (or answering errors) for this long
    /// pauses the rollout and raises `switchyard_rollout_paused`.
    #[serde(default = "default_source_down")]
    pub source_down_pause_secs: f64,
    /// The new pipeline must keep up for a step to pass, as well as parity
    /// hold: the ingest consumers' admin addresses (each one's `/metrics`,
    /// the largest lag of all counts), e.g. `http://127.0.0.1:9091`.
    #[serde(default)]
    pub lag_urls: Vec<String>,
    /// Or a query on `prometheus_url` that returns the lag in seconds,
    /// e.g. `max(switchyard_ingest_lag_seconds)`.
    #[serde(default)]
    pub lag_prometheus_query: Option<String>,
    /// A lag above this (the age of the oldest message not yet in NEW, in
    /// seconds) pauses the step; once it is back below, the step's hold
    /// starts again, so a step passes only after keeping up for all of it.
    #[serde(default = "default_max_lag")]
    pub max_lag_secs: f64,
    /// And above this many messages behind (0: not gated on messages).
    #[serde(default)]
    pub max_lag_messages: u64,
}

fn default_max_lag() -> f64 {
    30.0
}

fn default_no_data_pause() -> f64 {
    300.0
}

fn default_source_down() -> f64 {
    60.0
}

/// What identifies a plan for resuming: a state file is only resumed by the
/// plan it was written for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanRecord {
    pub stage: Stage,
    /// A migration plan's stages, `from → to`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<String>,
    pub steps: Vec<f64>,
    pub manual_gates: Vec<f64>,
    pub rollback: Rollback,
    /// crc32 of the above, for display.
    pub fingerprint: String,
}

impl PlanRecord {
    pub fn of(plan: &Plan) -> PlanRecord {
        let mut r = PlanRecord {
            stage: plan.stage,
            migration: plan.migration().map(|(f, t)| format!("{f} → {t}")),
            steps: plan.steps.clone(),
            manual_gates: plan.manual_gates.clone(),
            rollback: plan.rollback,
            fingerprint: String::new(),
        };
        let mut text = serde_json::to_string(&(&r.stage, &r.steps, &r.manual_gates, &r.rollback))
            .unwrap_or_default();
        if let Some(m) = &r.migration {
            text.push_str(m);
        }
        r.fingerprint = format!("{:08x}", crc32fast::hash(text.as_bytes()));
        r
    }

    /// What differs from `other` (the plan now), in words; empty if nothing.
    pub fn differences(&self, now: &PlanRecord) -> Vec<String> {
        let mut out = Vec::new();
        if self.stage != now.stage {
            out.push(format!("stage {:?} → {:?}", self.stage, now.stage));
        }
        if self.migration != now.migration {
            out.push(format!(
                "migration {} → {}",
                self.migration.as_deref().unwrap_or("none"),
                now.migration.as_deref().unwrap_or("none")
            ));
        }
        if self.steps != now.steps {
            out.push(format!("steps {:?} → {:?}", self.steps, now.steps));
        }
        if self.manual_gates != now.manual_gates {
            out.push(format!(
                "manual_gates {:?} → {:?}",
                self.manual_gates, now.manual_gates
            ));
        }
        if self.rollback != now.rollback {
            out.push(format!("rollback {:?} → {:?}", self.rollback, now.rollback));
        }
        out
    }
}

/// The two percentage flags, and a migration plan's share.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Levels {
    pub dual_write: f64,
    pub kafka_only: f64,
    /// The percentage of accounts the migration flag serves the plan's
    /// `migration_to` stage (the rest: `migration_from`); 0 for other plans.
    #[serde(default)]
    pub migration: f64,
}

impl Levels {
    pub fn percents(dual_write: f64, kafka_only: f64) -> Levels {
        Levels {
            dual_write,
            kafka_only,
            migration: 0.0,
        }
    }

    pub fn of(stage: Stage, base: Levels, pct: f64) -> Levels {
        match stage {
            Stage::DualWrite => Levels {
                dual_write: pct,
                ..base
            },
            Stage::KafkaOnly => Levels {
                kafka_only: pct,
                ..base
            },
            Stage::Migration => Levels {
                migration: pct,
                ..base
            },
        }
    }

    pub fn stage(&self, stage: Stage) -> f64 {
        match stage {
            Stage::DualWrite => self.dual_write,
            Stage::KafkaOnly => self.kafka_only,
            Stage::Migration => self.migration,
        }
    }
}

/// The share of accounts a migration flag serves `to`, when it serves only
/// `from` and `to`; otherwise what it serves, in words (a change the
/// controller did not make).
pub fn migration_share(
    served: &std::collections::BTreeMap<String, f64>,
    from: &str,
    to: &str,
) -> Result<f64, String> {
    let others: Vec<String> = served
        .iter()
        .filter(|(s, _)| s.as_str() != from && s.as_str() != to)
        .map(|(s, p)| format!("{s} {p} %"))
        .collect();
    if !others.is_empty() {
        return Err(format!(
            "the migration flag serves {} besides {from} and {to}",
            others.join(", ")
        ));
    }
    // Thousandths of a percent, as LaunchDarkly weighs, on the 0.01 grid.
    Ok((served.get(to).copied().unwrap_or(0.0) * 100.0).round() / 100.0)
}

/// The shortest and the longest wait between two parity checks.
pub const MIN_CHECK_INTERVAL_SECS: f64 = 0.001;
pub const MAX_CHECK_INTERVAL_SECS: f64 = 86_400.0;

fn default_rollback() -> Rollback {
    Rollback::Previous
}

impl Plan {
    /// A migration plan's `(from, to)` stages.
    pub fn migration(&self) -> Option<(&str, &str)> {
        match (self.stage, &self.migration_from, &self.migration_to) {
            (Stage::Migration, Some(f), Some(t)) => Some((f.as_str(), t.as_str())),
            _ => None,
        }
    }

    pub fn parse(text: &str) -> Result<Plan, String> {
        let p: Plan = toml::from_str(text).map_err(|e| e.to_string())?;
        p.validate()?;
        Ok(p)
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.steps.is_empty() {
            return Err("steps: at least one".into());
        }
        let stages = crate::flags::folder::STAGES;
        let position = |what: &str, s: &Option<String>| -> Result<Option<usize>, String> {
            match s {
                None => Ok(None),
                Some(s) => stages.iter().position(|x| x == s).map(Some).ok_or_else(|| {
                    format!(
                        "{what}: {s:?} is not a migration stage ({})",
                        stages.join(", ")
                    )
                }),
            }
        };
        let from = position("migration_from", &self.migration_from)?;
        let to = position("migration_to", &self.migration_to)?;
        match (self.stage, from, to) {
            (Stage::Migration, Some(f), Some(t)) if f < t => {}
            (Stage::Migration, Some(_), Some(_)) => {
                return Err(format!(
                    "migration_to ({}) must be a later stage than migration_from ({}): a rollout moves accounts forward",
                    stages[to.unwrap_or(0)],
                    stages[from.unwrap_or(0)]
                ))
            }
            (Stage::Migration, _, _) => {
                return Err(
                    "stage \"migration\" needs migration_from and migration_to (e.g. \"off\" and \"dualwrite\")"
                        .into(),
                )
            }
            (_, None, None) => {}
            _ => {
                return Err(
                    "migration_from and migration_to belong to stage = \"migration\" only".into(),
                )
            }
        }
        let mut prev = 0.0;
        for s in &self.steps {
            if !(s.is_finite() && *s > prev && *s <= 100.0) {
                return Err(format!(
                    "steps: {s} — each step must be above the previous one and at most 100"
                ));
            }
            if !crate::flags::folder::on_resolution(*s) {
                return Err(format!(
                    "steps: {s} — finer than the routing resolution of 0.01 %"
                ));
            }
            prev = *s;
        }
        for (what, url) in self
            .parity_url
            .iter()
            .map(|u| ("parity_url", u))
            .chain(self.prometheus_url.iter().map(|u| ("prometheus_url", u)))
            .chain(self.lag_urls.iter().map(|u| ("lag_urls", u)))
            .chain(self.webhooks.iter().map(|u| ("webhooks", u)))
        {
            // A webhook's path may be its secret: never shown.
            let shown = if what == "webhooks" {
                crate::db::redact_endpoint(url)
            } else {
                crate::db::redact_url(url)
            };
            match reqwest::Url::parse(url) {
                Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
                Ok(u) => {
                    return Err(format!(
                        "{what}: {shown:?} — an http:// or https:// URL with a host (scheme {:?})",
                        u.scheme()
                    ))
                }
                Err(e) => {
                    return Err(format!(
                        "{what}: {shown:?} — not a URL ({e}); write it as http://host:port"
                    ))
                }
            }
        }
        for (what, v) in [
            ("no_data_pause_secs", self.no_data_pause_secs),
            ("no_data_rollback_secs", self.no_data_rollback_secs),
            ("source_down_pause_secs", self.source_down_pause_secs),
            ("max_lag_secs", self.max_lag_secs),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(format!("{what}: a number of seconds"));
            }
        }
        if !(self.dwell_secs.is_finite() && self.dwell_secs >= 0.0) {
            return Err("dwell_secs: a number of seconds".into());
        }
        // The controller sleeps this long between checks: at least a
        // millisecond (shorter rounds to no sleep at all), at most a day.
        if !(MIN_CHECK_INTERVAL_SECS..=MAX_CHECK_INTERVAL_SECS).contains(&self.check_interval_secs)
        {
            return Err(format!(
                "check_interval_secs: {} — from {MIN_CHECK_INTERVAL_SECS} to {MAX_CHECK_INTERVAL_SECS} seconds",
                self.check_interval_secs
            ));
        }
        if self.failure_limit == 0 {
            return Err("failure_limit: at least 1".into());
        }
        match (&self.parity_url, &self.prometheus_query) {
            (Some(_), None) | (None, Some(_)) => {}
            _ => {
                return Err(
                    "parity source: either parity_url, or prometheus_url with prometheus_query"
                        .into(),
                )
            }
        }
        let queries = self.prometheus_query.is_some() || self.lag_prometheus_query.is_some();
        if queries != self.prometheus_url.is_some() {
            return Err(if queries {
                "prometheus_query and lag_prometheus_query need prometheus_url".into()
            } else {
                "prometheus_url is set, but neither prometheus_query nor lag_prometheus_query"
                    .into()
            });
        }
        if !self.lag_urls.is_empty() && self.lag_prometheus_query.is_some() {
            return Err("lag source: either lag_urls or lag_prometheus_query, not both".into());
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

    pub fn finished(self) -> bool {
        matches!(self, Status::Done | Status::RolledBack)
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

/// A flag change the controller is about to make, written (and synced)
/// before the change: a crash between the change and its confirmation is
/// recognised on resume by comparing the flags with it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Intent {
    /// `advance`, `start` or `rollback`.
    pub event: String,
    /// The step it applies (None: back to the levels before the rollout).
    pub step: Option<usize>,
    pub levels: Levels,
    /// Also sets the kill switch (a `rollback = "kill"`).
    pub kill: bool,
    pub reason: String,
}

/// Everything the controller must remember across a restart.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct State {
    /// The plan this state belongs to.
    pub plan: PlanRecord,
    pub status: Status,
    /// Index into the plan's steps of the step being held (None: not yet
    /// applied, or rolled back to the levels before the rollout).
    pub step: Option<usize>,
    /// Unix time the current step was applied (or resumed after a pause).
    pub step_started_at: f64,
    /// Failed checks on the current step.
    pub failures: u32,
    pub checks_passed: u64,
    pub checks_failed: u64,
    /// The step index a person promoted to (consumed by the advance).
    pub promoted: Option<usize>,
    /// The flags when the rollout started: the target of a rollback from
    /// the first step.
    pub before: Levels,
    /// The levels the controller last set (and confirmed).
    pub set: Levels,
    /// A change written before it was made, not yet confirmed.
    pub intent: Option<Intent>,
    /// Why the rollout is paused (a manual change, a kill, unreadable flags,
    /// no parity data, an unreachable parity source); None when not.
    pub paused: Option<String>,
    /// Since when the parity reports have been empty, or the source down.
    pub no_data_since: Option<f64>,
    pub source_down_since: Option<f64>,
    /// Since when the lag source has not answered.
    #[serde(default)]
    pub lag_down_since: Option<f64>,
    pub history: Vec<Transition>,
}

impl State {
    pub fn new(plan: &Plan, before: Levels, now: f64) -> State {
        State {
            plan: PlanRecord::of(plan),
            status: Status::Running,
            step: None,
            step_started_at: now,
            failures: 0,
            checks_passed: 0,
            checks_failed: 0,
            promoted: None,
            before,
            set: before,
            intent: None,
            paused: None,
            no_data_since: None,
            source_down_since: None,
            lag_down_since: None,
            history: Vec::new(),
        }
    }

    /// The stage flag's percentage the controller holds.
    pub fn percent(&self, plan: &Plan) -> f64 {
        self.set.stage(plan.stage)
    }
}

/// A parity check's outcome for the current step's windows.
#[derive(Debug, Clone, PartialEq)]
pub enum Check {
    /// Every window of the step checked and ok.
    Verified,
    /// Windows not settled yet: wait.
    NotYet(String),
    /// No window at all for the step: nothing verifies it.
    NoData(String),
    /// The parity source did not answer (or answered an error).
    Unreachable(String),
    /// Rows missing or different: a failed check.
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
    /// Pause (or stay paused) with the reason; lifted when the cause goes.
    Pause(String),
}

/// Checks a plan against the flags it starts from: the controller never
/// lowers a flag to reach its first step, and Kafka-only is never above
/// dual-write at any step.
pub fn check_start(plan: &Plan, now: Levels) -> Result<(), String> {
    let first = plan.steps[0];
    let current = now.stage(plan.stage);
    let name = match plan.stage {
        Stage::DualWrite => "dual-write",
        Stage::KafkaOnly => "kafka-only",
        Stage::Migration => "the migration flag's share",
    };
    if first < current {
        let above: Vec<f64> = plan
            .steps
            .iter()
            .copied()
            .filter(|s| *s > current)
            .collect();
        return Err(format!(
            "{name} is at {current} %, above this plan's first step ({first} %): the controller never lowers a flag to start; begin the steps above {current} (for example {above:?})"
        ));
    }
    if plan.stage == Stage::Migration {
        return Ok(());
    }
    if plan.stage == Stage::KafkaOnly {
        if let Some(s) = plan.steps.iter().find(|s| **s > now.dual_write) {
            return Err(format!(
                "step {s} % of kafka-only is above dual-write ({} %): accounts would skip the dual stage; raise dual-write first",
                now.dual_write
            ));
        }
    } else if first < now.kafka_only {
        return Err(format!(
            "dual-write step {first} % is below kafka-only ({} %)",
            now.kafka_only
        ));
    }
    Ok(())
}

/// The decision after one check, `now` seconds (unix). Pauses for flags
/// (manual change, kill, unreadable) are decided before, by the caller.
pub fn decide(plan: &Plan, state: &State, check: &Check, now: f64) -> Action {
    let step = state.step.unwrap_or(0);
    let since = |t: Option<f64>| t.map(|t| now - t).unwrap_or(0.0);
    match check {
        Check::Breach(why) => {
            if state.failures + 1 >= plan.failure_limit {
                Action::RollBack(format!(
                    "parity breach on step {} ({}%), {} failed check(s): {why}",
                    step + 1,
                    plan.steps[step],
                    state.failures + 1
                ))
            } else {
                Action::Hold
            }
        }
        Check::NotYet(_) => Action::Hold,
        Check::NoData(why) => {
            let for_secs = since(state.no_data_since);
            if plan.no_data_rollback_secs > 0.0 && for_secs >= plan.no_data_rollback_secs {
                Action::RollBack(format!(
                    "no parity data for step {} ({}%) for {for_secs:.0} s: {why}",
                    step + 1,
                    plan.steps[step]
                ))
            } else if for_secs >= plan.no_data_pause_secs {
                Action::Pause(format!("no parity data for {for_secs:.0} s: {why}"))
            } else {
                Action::Hold
            }
        }
        Check::Unreachable(why) => {
            let for_secs = since(state.source_down_since);
            if for_secs >= plan.source_down_pause_secs {
                Action::Pause(format!(
                    "parity source unreachable for {for_secs:.0} s: {why}"
                ))
            } else {
                Action::Hold
            }
        }
        Check::Verified => {
            if now - state.step_started_at < plan.dwell_secs {
                return Action::Hold;
            }
            let next = step + 1;
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

/// How far the new pipeline is behind: the age in seconds of the oldest
/// message not yet in NEW, and the messages not yet in NEW.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct Lag {
    pub seconds: f64,
    /// None when the source gives seconds only (a Prometheus query).
    pub messages: Option<i64>,
}

/// A lag reading, for the gate.
#[derive(Debug, Clone, PartialEq)]
pub enum LagCheck {
    /// Within the plan's limits.
    KeepingUp(Lag),
    /// Above a limit, with why.
    Behind(Lag, String),
    /// The source did not answer, or had nothing measured yet.
    Unknown(String),
}

/// A lag reading against the plan's limits.
pub fn lag_check(plan: &Plan, lag: Lag) -> LagCheck {
    if lag.seconds > plan.max_lag_secs {
        return LagCheck::Behind(
            lag,
            format!(
                "ingest is behind: its oldest message not yet in NEW is older than max_lag_secs = {} s",
                plan.max_lag_secs
            ),
        );
    }
    match lag.messages {
        Some(m) if plan.max_lag_messages > 0 && m > plan.max_lag_messages as i64 => {
            LagCheck::Behind(
                lag,
                format!(
                    "ingest is behind: more than max_lag_messages = {} message(s) not yet in NEW",
                    plan.max_lag_messages
                ),
            )
        }
        _ => LagCheck::KeepingUp(lag),
    }
}

/// The largest lag in a role's Prometheus text exposition: the maximum of
/// `switchyard_ingest_lag_seconds` and of `switchyard_ingest_lag_messages`
/// over its partitions. None when it reports no partition (not measured
/// yet, or none assigned).
pub fn lag_of_metrics(text: &str) -> Option<Lag> {
    let mut seconds: Option<f64> = None;
    let mut messages: Option<i64> = None;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') {
            continue;
        }
        let (name, rest) = match line.find(['{', ' ']) {
            Some(i) => line.split_at(i),
            None => continue,
        };
        let value = match rest.rfind('}') {
            Some(i) => &rest[i + 1..],
            None => rest,
        };
        let Ok(v) = value.trim().parse::<f64>() else {
            continue;
        };
        if !v.is_finite() {
            continue;
        }
        match name {
            "switchyard_ingest_lag_seconds" => seconds = Some(seconds.map_or(v, |s| s.max(v))),
            "switchyard_ingest_lag_messages" => {
                let m = v as i64;
                messages = Some(messages.map_or(m, |x| x.max(m)))
            }
            _ => {}
        }
    }
    match (seconds, messages) {
        (None, None) => None,
        (s, m) => Some(Lag {
            seconds: s.unwrap_or(0.0),
            messages: m,
        }),
    }
}

/// The gate on keeping up, over what parity decided: a step does not pass
/// while ingest is behind, or while its lag cannot be read. Parity wins
/// where it must: a rollback stands, and a breach keeps being counted (a
/// pause would forget it).
pub fn gate_on_lag(
    plan: &Plan,
    state: &State,
    check: &Check,
    action: Action,
    lag: &LagCheck,
    now: f64,
) -> Action {
    if matches!(action, Action::RollBack(_)) || matches!(check, Check::Breach(_)) {
        return action;
    }
    match lag {
        LagCheck::KeepingUp(_) => action,
        LagCheck::Behind(_, why) => match action {
            Action::Pause(other) => Action::Pause(format!("{other}; {why}")),
            _ => Action::Pause(why.clone()),
        },
        LagCheck::Unknown(why) => {
            let for_secs = state.lag_down_since.map_or(0.0, |t| now - t);
            if let Action::Pause(other) = action {
                Action::Pause(other)
            } else if for_secs >= plan.source_down_pause_secs {
                Action::Pause(format!(
                    "ingest lag unknown for more than source_down_pause_secs = {} s: {why}",
                    plan.source_down_pause_secs
                ))
            } else if let Some(paused) = &state.paused {
                // Paused (say, for lag): not lifted before the lag is known.
                Action::Pause(paused.clone())
            } else {
                match action {
                    Action::Advance(_) | Action::Finish | Action::WaitForPromotion(_) => {
                        Action::Hold
                    }
                    a => a,
                }
            }
        }
    }
}

/// Where a rollback goes: the last step that passed (the one before the
/// step held), or the levels before the rollout; never Kafka-only above
/// dual-write.
pub fn rollback_target(plan: &Plan, state: &State) -> (Option<usize>, Levels) {
    let (step, pct) = match state.step {
        Some(s) if s > 0 => (Some(s - 1), plan.steps[s - 1]),
        _ => (None, state.before.stage(plan.stage)),
    };
    let mut l = Levels::of(plan.stage, state.set, pct);
    if l.kafka_only > l.dual_write {
        match plan.stage {
            Stage::DualWrite => l.dual_write = l.kafka_only,
            Stage::KafkaOnly => l.kafka_only = l.dual_write,
            Stage::Migration => {}
        }
    }
    (step, l)
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
            ("steps = [0.001, 1]", "resolution"),
            ("parity_url = \"127.0.0.1:19096\"", "http://"),
            ("parity_url = \"ftp://x\"", "http://"),
            ("check_interval_secs = 1e20", "from 0.001 to 86400 seconds"),
            ("check_interval_secs = 1e-12", "from 0.001 to 86400 seconds"),
            ("check_interval_secs = 0", "from 0.001 to 86400 seconds"),
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

    fn state(p: &Plan, step: Option<usize>, at: f64) -> State {
        let mut s = State::new(p, Levels::percents(0.0, 0.0), at);
        s.step = step;
        if let Some(i) = step {
            s.set = Levels::of(p.stage, s.set, p.steps[i]);
        }
        s
    }

    #[test]
    fn a_step_advances_only_after_the_dwell_with_parity_verified() {
        let p = plan();
        let s = state(&p, Some(0), 1000.0);
        assert_eq!(decide(&p, &s, &Check::Verified, 1030.0), Action::Hold);
        assert_eq!(
            decide(&p, &s, &Check::NotYet("settling".into()), 1100.0),
            Action::Hold
        );
        assert_eq!(decide(&p, &s, &Check::Verified, 1061.0), Action::Advance(1));
    }

    #[test]
    fn a_breach_rolls_back_to_the_last_step_that_passed() {
        let p = plan();
        let mut s = state(&p, Some(2), 0.0);
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
        assert_eq!(rollback_target(&p, &s).0, Some(1));
        assert_eq!(rollback_target(&p, &s).1.dual_write, 5.0);
        // From the first step: back to where the rollout started.
        let mut s = state(&p, Some(0), 0.0);
        s.before = Levels::percents(0.5, 0.25);
        s.set.kafka_only = 0.25;
        assert_eq!(rollback_target(&p, &s), (None, s.before));
    }

    #[test]
    fn a_rollback_never_leaves_kafka_only_above_dual_write() {
        // From dual 30 / kafka 10, a dual plan [40, 60] breaching at 40.
        let p = Plan::parse(
            r#"
            stage = "dual-write"
            steps = [40, 60]
            dwell_secs = 1
            check_interval_secs = 1
            failure_limit = 1
            parity_url = "http://127.0.0.1:9096"
            state_file = "s.json"
            "#,
        )
        .unwrap();
        let before = Levels::percents(30.0, 10.0);
        let mut s = State::new(&p, before, 0.0);
        s.step = Some(0);
        s.set = Levels::of(p.stage, before, 40.0);
        let (_, l) = rollback_target(&p, &s);
        assert_eq!(l, before);
        assert!(l.kafka_only <= l.dual_write);
    }

    #[test]
    fn a_plan_never_lowers_a_flag_to_start_and_keeps_kafka_under_dual() {
        let kafka = Plan::parse(
            r#"
            stage = "kafka-only"
            steps = [5, 25, 50]
            dwell_secs = 1
            check_interval_secs = 1
            failure_limit = 1
            parity_url = "http://127.0.0.1:9096"
            state_file = "s.json"
            "#,
        )
        .unwrap();
        let at = |d, k| Levels::percents(d, k);
        let e = check_start(&kafka, at(100.0, 20.0)).unwrap_err();
        assert!(e.contains("never lowers"), "{e}");
        let e = check_start(&kafka, at(30.0, 0.0)).unwrap_err();
        assert!(e.contains("above dual-write"), "{e}");
        assert!(check_start(&kafka, at(50.0, 5.0)).is_ok());
    }

    #[test]
    fn no_data_pauses_then_rolls_back_and_an_unreachable_source_pauses() {
        let mut p = plan();
        p.no_data_pause_secs = 60.0;
        p.no_data_rollback_secs = 120.0;
        let mut s = state(&p, Some(1), 0.0);
        s.no_data_since = Some(100.0);
        let nd = Check::NoData("empty".into());
        assert_eq!(decide(&p, &s, &nd, 130.0), Action::Hold);
        assert!(matches!(decide(&p, &s, &nd, 170.0), Action::Pause(_)));
        assert!(matches!(decide(&p, &s, &nd, 230.0), Action::RollBack(_)));
        s.source_down_since = Some(100.0);
        let down = Check::Unreachable("refused".into());
        assert_eq!(decide(&p, &s, &down, 130.0), Action::Hold);
        assert!(matches!(decide(&p, &s, &down, 161.0), Action::Pause(_)));
    }

    #[test]
    fn manual_gates_wait_for_a_person() {
        let p = plan();
        let mut s = state(&p, Some(2), 0.0);
        assert_eq!(
            decide(&p, &s, &Check::Verified, 100.0),
            Action::WaitForPromotion(3)
        );
        s.promoted = Some(3);
        assert_eq!(decide(&p, &s, &Check::Verified, 100.0), Action::Advance(3));
        s.step = Some(3);
        assert_eq!(decide(&p, &s, &Check::Verified, 200.0), Action::Finish);
    }

    #[test]
    fn migration_plans_move_forward_between_two_stages() {
        let base = r#"
            stage = "migration"
            steps = [10, 50, 100]
            dwell_secs = 1
            check_interval_secs = 1
            failure_limit = 1
            parity_url = "http://127.0.0.1:9096"
            state_file = "s.json"
        "#;
        let p = Plan::parse(&format!(
            "{base}\nmigration_from = \"off\"\nmigration_to = \"dualwrite\""
        ))
        .unwrap();
        assert_eq!(p.migration(), Some(("off", "dualwrite")));
        for (extra, want) in [
            ("", "needs migration_from and migration_to"),
            (
                "migration_from = \"complete\"\nmigration_to = \"off\"",
                "later stage",
            ),
            (
                "migration_from = \"off\"\nmigration_to = \"sideways\"",
                "not a migration stage",
            ),
        ] {
            let e = Plan::parse(&format!("{base}\n{extra}")).unwrap_err();
            assert!(e.contains(want), "{extra}: {e}");
        }
        let e = Plan::parse(&format!(
            "{}\nmigration_from = \"off\"\nmigration_to = \"live\"",
            base.replace("\"migration\"", "\"dual-write\"")
        ))
        .unwrap_err();
        assert!(e.contains("belong to stage"), "{e}");
        // The stages are part of what a state resumes.
        let mut q = p.clone();
        q.migration_to = Some("live".into());
        let d = PlanRecord::of(&p).differences(&PlanRecord::of(&q));
        assert_eq!(
            d,
            vec!["migration off → dualwrite → off → live".to_string()]
        );
        // A rollback goes back to the previous share, the flags untouched.
        let mut s = State::new(&p, Levels::percents(30.0, 10.0), 0.0);
        s.step = Some(1);
        s.set = Levels::of(p.stage, s.set, 50.0);
        let (step, l) = rollback_target(&p, &s);
        assert_eq!(
            (step, l.migration, l.dual_write, l.kafka_only),
            (Some(0), 10.0, 30.0, 10.0)
        );
    }

    #[test]
    fn a_migration_share_counts_only_the_two_stages() {
        let w = |v: &[(&str, f64)]| {
            v.iter()
                .map(|(s, p)| (s.to_string(), *p))
                .collect::<std::collections::BTreeMap<_, _>>()
        };
        assert_eq!(
            migration_share(&w(&[("off", 100.0)]), "off", "dualwrite"),
            Ok(0.0)
        );
        assert_eq!(
            migration_share(
                &w(&[("off", 70.0), ("dualwrite", 30.0)]),
                "off",
                "dualwrite"
            ),
            Ok(30.0)
        );
        assert_eq!(
            migration_share(&w(&[("dualwrite", 12.341)]), "off", "dualwrite"),
            Ok(12.34)
        );
        let e =
            migration_share(&w(&[("off", 50.0), ("live", 50.0)]), "off", "dualwrite").unwrap_err();
        assert!(e.contains("live 50 %"), "{e}");
    }

    #[test]
    fn a_plan_is_identified_by_what_resuming_depends_on() {
        let p = plan();
        let mut q = plan();
        q.dwell_secs = 5.0;
        assert_eq!(PlanRecord::of(&p), PlanRecord::of(&q));
        q.steps = vec![1.0, 10.0];
        let d = PlanRecord::of(&p).differences(&PlanRecord::of(&q));
        assert!(
            d[0].contains("[1.0, 5.0, 25.0, 100.0] → [1.0, 10.0]"),
            "{d:?}"
        );
        assert_ne!(
            PlanRecord::of(&p).fingerprint,
            PlanRecord::of(&q).fingerprint
        );
    }

    #[test]
    fn the_largest_lag_of_every_partition_is_read_from_metrics() {
        let text = "# HELP switchyard_ingest_lag_seconds Age\n\
            # TYPE switchyard_ingest_lag_seconds gauge\n\
            switchyard_ingest_lag_seconds{partition=\"0\",topic=\"t\"} 1.5\n\
            switchyard_ingest_lag_seconds{partition=\"1\",topic=\"t\"} 42\n\
            switchyard_ingest_lag_messages{partition=\"0\",topic=\"t\"} 900\n\
            switchyard_ingest_lag_messages{partition=\"1\",topic=\"t\"} 12\n\
            switchyard_ingest_lag_seconds_total 1000\n\
            switchyard_ingest_messages_total 5\n";
        assert_eq!(
            lag_of_metrics(text),
            Some(Lag {
                seconds: 42.0,
                messages: Some(900)
            })
        );
        // Nothing measured (no partition assigned yet): unknown, not zero.
        assert_eq!(
            lag_of_metrics(
                "# TYPE switchyard_ingest_lag_seconds gauge\nswitchyard_ingest_messages_total 5\n"
            ),
            None
        );
        assert_eq!(
            lag_of_metrics("switchyard_ingest_lag_seconds NaN\n"),
            None,
            "a value that is not a number is no reading"
        );
    }

    fn lag_plan(extra: &str) -> Plan {
        Plan::parse(&format!(
            r#"
            stage = "dual-write"
            steps = [10, 50, 100]
            dwell_secs = 60
            check_interval_secs = 5
            failure_limit = 2
            parity_url = "http://127.0.0.1:9096"
            lag_urls = ["http://127.0.0.1:9091"]
            max_lag_secs = 10
            source_down_pause_secs = 30
            state_file = "s.json"
            {extra}
            "#
        ))
        .unwrap()
    }

    #[test]
    fn lag_limits_in_seconds_and_messages() {
        let p = lag_plan("max_lag_messages = 1000");
        let lag = |seconds, messages| Lag { seconds, messages };
        assert!(matches!(
            lag_check(&p, lag(9.9, Some(1000))),
            LagCheck::KeepingUp(_)
        ));
        match lag_check(&p, lag(10.1, Some(0))) {
            LagCheck::Behind(_, why) => assert!(why.contains("max_lag_secs = 10"), "{why}"),
            other => panic!("{other:?}"),
        }
        match lag_check(&p, lag(0.0, Some(1001))) {
            LagCheck::Behind(_, why) => assert!(why.contains("max_lag_messages = 1000"), "{why}"),
            other => panic!("{other:?}"),
        }
        // Seconds only (a Prometheus query), and messages not gated by default.
        assert!(matches!(
            lag_check(&p, lag(1.0, None)),
            LagCheck::KeepingUp(_)
        ));
        assert!(matches!(
            lag_check(&lag_plan(""), lag(1.0, Some(1 << 40))),
            LagCheck::KeepingUp(_)
        ));
        // The reason does not change with the figure: one transition per pause.
        let a = lag_check(&p, lag(11.0, None));
        let b = lag_check(&p, lag(500.0, None));
        match (a, b) {
            (LagCheck::Behind(_, x), LagCheck::Behind(_, y)) => assert_eq!(x, y),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_step_does_not_pass_while_ingest_is_behind_or_unknown() {
        let p = lag_plan("");
        let s = state(&p, Some(0), 0.0);
        let behind = LagCheck::Behind(Lag::default(), "behind".into());
        let up = LagCheck::KeepingUp(Lag::default());
        let unknown = LagCheck::Unknown("down".into());
        let v = Check::Verified;
        // Behind: a step that would advance pauses instead.
        assert_eq!(
            gate_on_lag(&p, &s, &v, Action::Advance(1), &behind, 100.0),
            Action::Pause("behind".into())
        );
        assert_eq!(
            gate_on_lag(&p, &s, &v, Action::Hold, &behind, 100.0),
            Action::Pause("behind".into())
        );
        // Keeping up: parity decides.
        assert_eq!(
            gate_on_lag(&p, &s, &v, Action::Advance(1), &up, 100.0),
            Action::Advance(1)
        );
        // Parity wins where it must: a rollback, and a breach being counted.
        let breach = Check::Breach("lost".into());
        assert_eq!(
            gate_on_lag(
                &p,
                &s,
                &breach,
                Action::RollBack("lost".into()),
                &behind,
                100.0
            ),
            Action::RollBack("lost".into())
        );
        assert_eq!(
            gate_on_lag(&p, &s, &breach, Action::Hold, &behind, 100.0),
            Action::Hold
        );
        // Both reasons when both pause.
        assert_eq!(
            gate_on_lag(
                &p,
                &s,
                &Check::NoData("x".into()),
                Action::Pause("no data".into()),
                &behind,
                100.0
            ),
            Action::Pause("no data; behind".into())
        );
        // Unknown: no advance, a pause once it lasts, and a pause is not lifted.
        let mut s2 = s.clone();
        s2.lag_down_since = Some(90.0);
        assert_eq!(
            gate_on_lag(&p, &s2, &v, Action::Advance(1), &unknown, 100.0),
            Action::Hold
        );
        assert_eq!(
            gate_on_lag(&p, &s2, &v, Action::Finish, &unknown, 100.0),
            Action::Hold
        );
        match gate_on_lag(&p, &s2, &v, Action::Advance(1), &unknown, 121.0) {
            Action::Pause(why) => assert!(why.contains("unknown") && why.contains("down"), "{why}"),
            other => panic!("{other:?}"),
        }
        s2.paused = Some("behind".into());
        assert_eq!(
            gate_on_lag(&p, &s2, &v, Action::Hold, &unknown, 100.0),
            Action::Pause("behind".into())
        );
    }

    #[test]
    fn lag_sources_are_checked() {
        assert!(lag_plan("").validate().is_ok());
        let base = r#"
            stage = "dual-write"
            steps = [10]
            dwell_secs = 60
            check_interval_secs = 5
            failure_limit = 2
            parity_url = "http://127.0.0.1:9096"
            state_file = "s.json"
        "#;
        for (extra, want) in [
            (
                "lag_urls = [\"http://127.0.0.1:9091\"]\nprometheus_url = \"http://127.0.0.1:9090\"\nlag_prometheus_query = \"max(x)\"",
                "not both",
            ),
            ("max_lag_secs = -1", "max_lag_secs"),
            ("lag_urls = [\"127.0.0.1:9091\"]", "lag_urls"),
            ("prometheus_url = \"http://127.0.0.1:9090\"", "neither"),
        ] {
            let e = Plan::parse(&format!("{base}\n{extra}\n")).unwrap_err();
            assert!(e.contains(want), "{extra}: {e}");
        }
        // A Prometheus lag query beside a comparator's parity: allowed, with its URL.
        let p = Plan::parse(
            r#"
            stage = "dual-write"
            steps = [10]
            dwell_secs = 60
            check_interval_secs = 5
            failure_limit = 2
            parity_url = "http://127.0.0.1:9096"
            prometheus_url = "http://127.0.0.1:9090"
            lag_prometheus_query = "max(switchyard_ingest_lag_seconds)"
            state_file = "s.json"
            "#,
        );
        assert!(p.is_ok(), "{p:?}");
        let e = Plan::parse(
            r#"
            stage = "dual-write"
            steps = [10]
            dwell_secs = 60
            check_interval_secs = 5
            failure_limit = 2
            parity_url = "http://127.0.0.1:9096"
            lag_prometheus_query = "max(switchyard_ingest_lag_seconds)"
            state_file = "s.json"
            "#,
        )
        .unwrap_err();
        assert!(e.contains("need prometheus_url"), "{e}");
    }
}
