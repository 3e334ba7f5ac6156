//! Flag source metrics (`switchyard_route_flag_*`: the router is their reader).

use prometheus::{GaugeVec, IntCounter, IntGauge, Opts, Registry};

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
        Ok(FlagMetrics {
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
