//! The rollout controller's metrics: `switchyard_rollout_*`.

use prometheus::{Gauge, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

use crate::metrics::{counter_vec, gauge, int_gauge, zero};

/// The rollout controller.
#[derive(Clone)]
pub struct RolloutMetrics {
    /// 1-based index of the step being held.
    pub step: IntGauge,
    pub percent: Gauge,
    /// 1 for the current status (running, waiting-for-promotion, done, rolled-back).
    pub status: IntGaugeVec,
    /// Parity checks by result (passed, failed, pending).
    pub checks: IntCounterVec,
    pub last_transition: Gauge,
    /// 1 while paused (a manual change, a kill, unreadable flags, no parity
    /// data, an unreachable parity source): the reason is in `/status`.
    pub paused: IntGauge,
    /// The new pipeline's lag as the controller last read it (seconds).
    pub ingest_lag_seconds: Gauge,
    /// 1 while the last lag read was above the plan's limits (the rollout
    /// pauses on it).
    pub ingest_behind: IntGauge,
}

impl RolloutMetrics {
    pub fn new(reg: &Registry) -> prometheus::Result<RolloutMetrics> {
        let status = IntGaugeVec::new(
            Opts::new(
                "switchyard_rollout_status",
                "1 for the controller's current status",
            ),
            &["status"],
        )?;
        reg.register(Box::new(status.clone()))?;
        let m = RolloutMetrics {
            step: int_gauge(
                reg,
                "switchyard_rollout_step",
                "1-based index of the step being held",
            )?,
            percent: gauge(
                reg,
                "switchyard_rollout_percent",
                "Flag percentage of the step being held",
            )?,
            status,
            checks: counter_vec(
                reg,
                "switchyard_rollout_checks_total",
                "Parity checks by result (passed, failed, pending, unreachable)",
                &["result"],
            )?,
            last_transition: gauge(
                reg,
                "switchyard_rollout_last_transition_timestamp_seconds",
                "Unix time of the last transition",
            )?,
            paused: int_gauge(
                reg,
                "switchyard_rollout_paused",
                "1 while the rollout is paused (manual change, kill, unreadable flags, no parity data, parity source down, ingest behind)",
            )?,
            ingest_lag_seconds: gauge(
                reg,
                "switchyard_rollout_ingest_lag_seconds",
                "The new pipeline's lag as last read (age of the oldest message not yet in NEW)",
            )?,
            ingest_behind: int_gauge(
                reg,
                "switchyard_rollout_ingest_behind",
                "1 while the new pipeline's lag is above the plan's limits",
            )?,
        };
        zero(
            &m.checks,
            &[&["passed"], &["failed"], &["pending"], &["unreachable"]],
        );
        Ok(m)
    }
}
