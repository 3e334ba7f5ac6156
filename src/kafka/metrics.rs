//! Producer metrics (`switchyard_<role>_kafka_*`: the router produces, the loader replays).

use prometheus::{Histogram, IntCounter, IntCounterVec, IntGauge, Registry};

use crate::metrics::{counter, counter_vec, histogram, int_gauge, zero};

/// Delivery failure kinds (`DeliveryError::kind`).
pub const DELIVERY_ERROR_KINDS: [&str; 6] = [
    "timeout",
    "queue_full",
    "broker",
    "canceled",
    "breaker_open",
    "refused",
];

/// Kafka producer metrics.
#[derive(Clone)]
pub struct KafkaMetrics {
    pub delivery_seconds: Histogram,
    pub delivery_errors: IntCounterVec,
    /// 1 while deliveries are being skipped after failures (breaker open).
    pub breaker_open: IntGauge,
    /// Producers rebuilt after librdkafka reported a fatal error.
    pub producer_renewals: IntCounter,
}

impl KafkaMetrics {
    /// `switchyard_<role>_kafka_*`: the router produces, the loader replays.
    pub fn new(reg: &Registry, role: &str) -> prometheus::Result<KafkaMetrics> {
        let m = KafkaMetrics {
            delivery_seconds: histogram(
                reg,
                &format!("switchyard_{role}_kafka_delivery_duration_seconds"),
                "Time from produce to broker acknowledgement",
            )?,
            delivery_errors: counter_vec(
                reg,
                &format!("switchyard_{role}_kafka_delivery_errors_total"),
                "Kafka deliveries that failed, by kind",
                &["kind"],
            )?,
            breaker_open: int_gauge(
                reg,
                &format!("switchyard_{role}_kafka_breaker_open"),
                "1 while Kafka deliveries are skipped after failures",
            )?,
            producer_renewals: counter(
                reg,
                &format!("switchyard_{role}_kafka_producer_renewals_total"),
                "Producers rebuilt after a fatal producer error (fenced, sequence gap)",
            )?,
        };
        for k in DELIVERY_ERROR_KINDS {
            zero(&m.delivery_errors, &[&[k]]);
        }
        Ok(m)
    }
}
