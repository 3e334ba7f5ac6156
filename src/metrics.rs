//! Metric families, grouped per role and registered into a registry that is
//! passed in (no globals), so each test reads its own. Names follow
//! `switchyard_<role>_<what>_<unit>`; labels are bounded sets, never an account.

use prometheus::{
    Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    Opts, Registry,
};

/// Latency buckets from 50 µs to 10 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
];

fn counter(reg: &Registry, name: &str, help: &str) -> prometheus::Result<IntCounter> {
    let c = IntCounter::new(name, help)?;
    reg.register(Box::new(c.clone()))?;
    Ok(c)
}

fn counter_vec(
    reg: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntCounterVec> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    reg.register(Box::new(c.clone()))?;
    Ok(c)
}

fn histogram(reg: &Registry, name: &str, help: &str) -> prometheus::Result<Histogram> {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()))?;
    reg.register(Box::new(h.clone()))?;
    Ok(h)
}

fn int_gauge(reg: &Registry, name: &str, help: &str) -> prometheus::Result<IntGauge> {
    let g = IntGauge::new(name, help)?;
    reg.register(Box::new(g.clone()))?;
    Ok(g)
}

/// Flag source metrics.
#[derive(Clone)]
pub struct FlagMetrics {
    pub reloads: IntCounter,
    pub reload_errors: IntCounter,
    /// Current value per flag (`kill_switch`, `kafka_only`, `dual_write`) for
    /// an account without individual targeting.
    pub values: GaugeVec,
}

/// Offline file writer metrics.
#[derive(Clone)]
pub struct OfflineMetrics {
    pub rotations: IntCounterVec,
    pub fsync_seconds: Histogram,
    pub write_errors: IntCounter,
    pub repaired_files: IntCounter,
    pub torn_bytes: IntCounter,
    pub lines: IntCounter,
    pub bytes: IntCounter,
    pub current_file_bytes: IntGauge,
}

/// Kafka producer metrics.
#[derive(Clone)]
pub struct KafkaMetrics {
    pub delivery_seconds: Histogram,
    pub delivery_errors: IntCounterVec,
    /// 1 while deliveries are being skipped after failures (breaker open).
    pub breaker_open: IntGauge,
}

/// Everything the router exports.
#[derive(Clone)]
pub struct RouteMetrics {
    pub requests: IntCounterVec,
    pub request_seconds: HistogramVec,
    pub payloads: IntCounterVec,
    pub bytes: IntCounterVec,
    pub fallbacks: IntCounterVec,
    pub rejected_payloads: IntCounterVec,
    pub inflight_requests: IntGauge,
    pub inflight_bytes: IntGauge,
    pub ready: Gauge,
    pub flags: FlagMetrics,
    pub offline: OfflineMetrics,
    pub kafka: KafkaMetrics,
}

impl RouteMetrics {
    pub fn new(reg: &Registry) -> prometheus::Result<RouteMetrics> {
        let flag_values = GaugeVec::new(
            Opts::new(
                "switchyard_route_flag_value",
                "Current flag value (percent, or 1/0 for the kill switch) for an untargeted account",
            ),
            &["flag"],
        )?;
        reg.register(Box::new(flag_values.clone()))?;
        let request_seconds = HistogramVec::new(
            HistogramOpts::new(
                "switchyard_route_request_duration_seconds",
                "Time from request received to response, by endpoint",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["endpoint"],
        )?;
        reg.register(Box::new(request_seconds.clone()))?;
        let ready = Gauge::new("switchyard_route_ready", "1 when /readyz answers 200")?;
        reg.register(Box::new(ready.clone()))?;
        Ok(RouteMetrics {
            requests: counter_vec(
                reg,
                "switchyard_route_requests_total",
                "Ingest requests by HTTP status",
                &["status"],
            )?,
            request_seconds,
            payloads: counter_vec(
                reg,
                "switchyard_route_payloads_total",
                "Payloads accepted, by route",
                &["route"],
            )?,
            bytes: counter_vec(
                reg,
                "switchyard_route_payload_bytes_total",
                "Row bytes accepted, by route",
                &["route"],
            )?,
            fallbacks: counter_vec(
                reg,
                "switchyard_route_fallbacks_total",
                "Payloads whose Kafka delivery failed and that were kept in the offline file instead, by reason",
                &["route", "reason"],
            )?,
            rejected_payloads: counter_vec(
                reg,
                "switchyard_route_rejected_total",
                "Requests refused, by reason (invalid input, overload, sink unavailable)",
                &["reason"],
            )?,
            inflight_requests: int_gauge(
                reg,
                "switchyard_route_inflight_requests",
                "Ingest requests being processed",
            )?,
            inflight_bytes: int_gauge(
                reg,
                "switchyard_route_inflight_bytes",
                "Request body bytes held by requests being processed",
            )?,
            ready,
            flags: FlagMetrics {
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
                values: flag_values,
            },
            offline: OfflineMetrics {
                rotations: counter_vec(
                    reg,
                    "switchyard_route_offline_rotations_total",
                    "Offline files closed, by reason (size, age, shutdown, error)",
                    &["reason"],
                )?,
                fsync_seconds: histogram(
                    reg,
                    "switchyard_route_offline_fsync_duration_seconds",
                    "Time spent in fdatasync of the offline file",
                )?,
                write_errors: counter(
                    reg,
                    "switchyard_route_offline_write_errors_total",
                    "Offline file writes or syncs that failed (disk full, unwritable)",
                )?,
                repaired_files: counter(
                    reg,
                    "switchyard_route_offline_repaired_files_total",
                    "Files left open by a crash and closed at start",
                )?,
                torn_bytes: counter(
                    reg,
                    "switchyard_route_offline_torn_bytes_total",
                    "Bytes of torn tails cut from files left open by a crash",
                )?,
                lines: counter(
                    reg,
                    "switchyard_route_offline_lines_total",
                    "Lines written to offline files",
                )?,
                bytes: counter(
                    reg,
                    "switchyard_route_offline_bytes_total",
                    "Bytes written to offline files",
                )?,
                current_file_bytes: int_gauge(
                    reg,
                    "switchyard_route_offline_current_file_bytes",
                    "Size of the offline file being written",
                )?,
            },
            kafka: KafkaMetrics {
                delivery_seconds: histogram(
                    reg,
                    "switchyard_route_kafka_delivery_duration_seconds",
                    "Time from produce to broker acknowledgement",
                )?,
                delivery_errors: counter_vec(
                    reg,
                    "switchyard_route_kafka_delivery_errors_total",
                    "Kafka deliveries that failed, by kind",
                    &["kind"],
                )?,
                breaker_open: int_gauge(
                    reg,
                    "switchyard_route_kafka_breaker_open",
                    "1 while Kafka deliveries are skipped after failures",
                )?,
            },
        })
    }
}

/// The registry in Prometheus text format.
pub fn encode(reg: &Registry) -> String {
    use prometheus::Encoder;
    let mut buf = Vec::new();
    let encoder = prometheus::TextEncoder::new();
    if let Err(e) = encoder.encode(&reg.gather(), &mut buf) {
        tracing::error!(error = %e, "cannot encode metrics");
    }
    String::from_utf8_lossy(&buf).into_owned()
}
