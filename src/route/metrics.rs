//! Everything the router exports: `switchyard_route_*`.

use prometheus::{
    Gauge, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

use crate::flags::FlagMetrics;
use crate::kafka::{KafkaMetrics, DELIVERY_ERROR_KINDS};
use crate::metrics::{counter_vec, int_gauge, zero, LATENCY_BUCKETS};
use crate::offline::OfflineMetrics;

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
    /// Connections cut for being too slow, by reason (header, idle, body).
    pub timeouts: IntCounterVec,
    /// Connections being served.
    pub connections: IntGauge,
    /// Connections waiting for a slot.
    pub connections_waiting: IntGauge,
    /// Connections that found every slot taken, by outcome (waited, refused).
    pub connections_limited: IntCounterVec,
    /// Connections closed to make room, by what they were doing.
    pub connections_shed: IntCounterVec,
    pub ready: Gauge,
    /// 1, labelled with the fingerprint of the salt and flag keys: replicas
    /// that differ bucket the same account differently.
    pub routing_info: IntGaugeVec,
    pub flags: FlagMetrics,
    pub offline: OfflineMetrics,
    pub kafka: KafkaMetrics,
}

impl RouteMetrics {
    pub fn new(reg: &Registry) -> prometheus::Result<RouteMetrics> {
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
        let routing_info = IntGaugeVec::new(
            Opts::new(
                "switchyard_route_routing_info",
                "1, labelled with the fingerprint of the routing salt and flag keys (replicas must agree)",
            ),
            &["fingerprint"],
        )?;
        reg.register(Box::new(routing_info.clone()))?;
        let m = RouteMetrics {
            routing_info,
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
                "Memory admitted to requests being processed (body bytes times the admission factor)",
            )?,
            timeouts: counter_vec(
                reg,
                "switchyard_route_timeouts_total",
                "Requests and connections cut for being too slow, by reason (header, idle, body: past the body deadline, slow_body: below the minimum body rate)",
                &["reason"],
            )?,
            connections: int_gauge(
                reg,
                "switchyard_route_connections",
                "Ingest connections being served",
            )?,
            connections_waiting: int_gauge(
                reg,
                "switchyard_route_connections_waiting",
                "Ingest connections waiting for a slot (every one taken)",
            )?,
            connections_shed: counter_vec(
                reg,
                "switchyard_route_connections_shed_total",
                "Ingest connections closed to make room for a new one when every slot was taken, by what they were doing (idle, header, body below the minimum rate)",
                &["state"],
            )?,
            connections_limited: counter_vec(
                reg,
                "switchyard_route_connections_limited_total",
                "Ingest connections that found every slot taken, by outcome (waited, refused)",
                &["outcome"],
            )?,
            ready,
            flags: FlagMetrics::new(reg)?,
            offline: OfflineMetrics::new(reg)?,
            kafka: KafkaMetrics::new(reg, "route")?,
        };
        zero(&m.timeouts, &[&["header"], &["idle"], &["body"]]);
        zero(&m.connections_limited, &[&["waited"], &["refused"]]);
        zero(&m.connections_shed, &[&["idle"], &["header"], &["body"]]);
        zero(&m.timeouts, &[&["slow_body"]]);
        for route in ["dual", "kafka"] {
            for kind in DELIVERY_ERROR_KINDS {
                zero(&m.fallbacks, &[&[route, kind]]);
            }
        }
        Ok(m)
    }
}
