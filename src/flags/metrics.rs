//! Flag source metrics (`switchyard_route_flag_*`: the router is their reader).

use prometheus::{GaugeVec, IntCounter, IntGauge, IntGaugeVec, Opts, Registry};

use crate::metrics::{counter, int_gauge};

/// Flag source metrics.
#[derive(Clone)]
pub struct FlagMetrics {
    pub reloads: IntCounter,
    pub reload_errors: IntCounter,
    /// Current value per flag (`kill_switch`, `kafka_only`, `dual_write`) for
    /// an account without individual targeting.
    pub values: GaugeVec,
    /// 1 once real flag values are loaded; 0 while on the safe default.
    pub loaded: IntGauge,
    /// Current flag problems (broken, missing or duplicate files, invalid
    /// values); the router is not ready while it is above 0.
    pub problems: IntGauge,
    /// 1 for where each routing flag's value comes from (`file`,
    /// `last-good`, `safe-default`).
    pub origin: IntGaugeVec,
    /// Failed writes of the persisted last good flags.
    pub persist_errors: IntCounter,
    /// LaunchDarkly: 1 for what is served (`live`, `persisted`,
    /// `safe-default`).
    pub source_state: IntGaugeVec,
}

impl FlagMetrics {
    pub fn new(reg: &Registry) -> prometheus::Result<FlagMetrics> {
        let values = GaugeVec::new(
            Opts::new(
                "switchyard_route_flag_value",
                "Current flag value (percent, or 1/0 for the kill switch) for an untargeted account",
            ),
            &["flag"],
        )?;
        reg.register(Box::new(values.clone()))?;
        let origin = IntGaugeVec::new(
            Opts::new(
                "switchyard_route_flag_origin",
                "1 for where each routing flag's value comes from (file, last-good, safe-default)",
            ),
            &["flag", "origin"],
        )?;
        reg.register(Box::new(origin.clone()))?;
        let source_state = IntGaugeVec::new(
            Opts::new(
                "switchyard_route_flag_source_state",
                "LaunchDarkly: 1 for what is served (live, persisted by a previous run, safe-default)",
            ),
            &["state"],
        )?;
        reg.register(Box::new(source_state.clone()))?;
        Ok(FlagMetrics {
            source_state,
            problems: int_gauge(
                reg,
                "switchyard_route_flag_problems",
                "Current flag problems (broken, missing or duplicate files, invalid values); last good values are served",
            )?,
            origin,
            persist_errors: counter(
                reg,
                "switchyard_route_flag_persist_errors_total",
                "Failed writes of the persisted last good flags",
            )?,
            reloads: counter(
                reg,
                "switchyard_route_flag_reloads_total",
                "Flag reloads that changed at least one flag",
            )?,
            reload_errors: counter(
                reg,
                "switchyard_route_flag_reload_errors_total",
                "Flag files or updates rejected (last good values kept)",
            )?,
            values,
            loaded: int_gauge(
                reg,
                "switchyard_route_flag_source_loaded",
                "1 once real flag values are loaded; 0 while routing on the safe default (legacy)",
            )?,
        })
    }
}

impl FlagMetrics {
    /// Logs and counts the problems of `now` that `before` did not have (each
    /// once, not every poll), and sets the current count.
    pub fn report_problems(&self, before: &[super::FlagFileError], now: &[super::FlagFileError]) {
        let new: Vec<&super::FlagFileError> = now.iter().filter(|p| !before.contains(p)).collect();
        for p in &new {
            tracing::error!(flag = %p.path, reason = %p.reason, "flag problem; the flag keeps its last good value");
        }
        self.reload_errors.inc_by(new.len() as u64);
        self.problems.set(now.len() as i64);
    }
}
