//! The Kafka sink: an idempotent rdkafka producer (acks=all), keyed by
//! account so one account's payloads stay on one partition, in order.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::sync::Mutex;

use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;

use crate::config::KafkaSettings;
pub mod args;
mod metrics;

use crate::routing::Route;
pub use metrics::{KafkaMetrics, DELIVERY_ERROR_KINDS};

/// Header carrying the route decision (`dual` or `kafka`).
pub const ROUTE_HEADER: &str = "switchyard-route";

/// Properties that carry secrets: never logged.
fn is_secret(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    k.contains("password") || k.contains("secret") || k.contains("key") && !k.ends_with(".location")
}

/// librdkafka reports a down broker many times a second; an operator needs it
/// once, with a count. Errors and logs are let through at most every 10 s.
#[derive(Default)]
pub struct QuietContext {
    last: Mutex<Option<(Instant, u64)>>,
}

impl QuietContext {
    const EVERY: Duration = Duration::from_secs(10);

    /// Returns the number suppressed since the last report, or None to stay quiet.
    fn should_report(&self) -> Option<u64> {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        match *last {
            Some((at, ref mut suppressed)) if at.elapsed() < Self::EVERY => {
                *suppressed += 1;
                None
            }
            Some((_, suppressed)) => {
                *last = Some((Instant::now(), 0));
                Some(suppressed)
            }
            None => {
                *last = Some((Instant::now(), 0));
                Some(0)
            }
        }
    }
}

impl ClientContext for QuietContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error
            | RDKafkaLogLevel::Warning => {
                if let Some(suppressed) = self.should_report() {
                    tracing::warn!(facility = fac, suppressed, "librdkafka: {log_message}");
                }
            }
            _ => tracing::debug!(facility = fac, "librdkafka: {log_message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if let Some(suppressed) = self.should_report() {
            tracing::error!(%error, suppressed, "librdkafka: {reason}");
        }
    }
}

/// Consumers that need no rebalance handling of their own use it too.
impl rdkafka::consumer::ConsumerContext for QuietContext {}

/// Why the sink could not start.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("invalid Kafka producer configuration: {0}")]
    Config(KafkaError),
    #[error("cannot reach the Kafka brokers {brokers} within {timeout_ms} ms: {source}")]
    Unreachable {
        brokers: String,
        timeout_ms: u64,
        source: KafkaError,
    },
    #[error("topic {topic:?} does not exist on {brokers}; create it with the partition count you planned (switchyard does not auto-create topics)")]
    TopicMissing { topic: String, brokers: String },
    #[error("topic {topic:?} is not usable: {error}")]
    TopicError { topic: String, error: String },
}

/// One failed delivery.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct DeliveryError {
    /// Bounded: `timeout`, `queue_full`, `broker`, `canceled`, `breaker_open`.
    pub kind: &'static str,
    pub message: String,
}

/// The producer, its topic and a breaker that skips Kafka for a while after a
/// failure so requests do not each wait a full delivery timeout.
#[derive(Clone)]
pub struct KafkaSink {
    producer: FutureProducer<QuietContext>,
    topic: Arc<str>,
    brokers: Arc<str>,
    metrics: KafkaMetrics,
    delivery_timeout: Duration,
    breaker_cooldown: Duration,
    started: Instant,
    /// Milliseconds since `started` until which the breaker is open.
    open_until_ms: Arc<AtomicU64>,
}

impl KafkaSink {
    /// Builds the producer. `extra` are `--kafka-config` properties; they win
    /// over the settings file.
    pub fn new(
        brokers: &str,
        settings: &KafkaSettings,
        extra: &[(String, String)],
        metrics: KafkaMetrics,
    ) -> Result<KafkaSink, SinkError> {
        let mut cfg = ClientConfig::new();
        cfg.set("bootstrap.servers", brokers)
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("compression.type", &settings.compression)
            .set("linger.ms", settings.linger_ms.to_string())
            .set(
                "message.timeout.ms",
                settings.delivery_timeout_ms.to_string(),
            )
            // Same partition for a key as the Java clients (murmur2).
            .set("partitioner", "murmur2_random");
        for (k, v) in &settings.properties {
            cfg.set(k, v);
        }
        for (k, v) in extra {
            cfg.set(k, v);
        }
        let shown: Vec<String> = settings
            .properties
            .iter()
            .chain(extra.iter().map(|(k, v)| (k, v)))
            .map(|(k, v)| {
                if is_secret(k) {
                    format!("{k}=***")
                } else {
                    format!("{k}={v}")
                }
            })
            .collect();
        tracing::info!(brokers, topic = %settings.topic, properties = ?shown, "kafka producer configured");
        let producer: FutureProducer<QuietContext> = cfg
            .create_with_context(QuietContext::default())
            .map_err(SinkError::Config)?;
        Ok(KafkaSink {
            producer,
            topic: settings.topic.as_str().into(),
            brokers: brokers.into(),
            metrics,
            delivery_timeout: Duration::from_millis(settings.delivery_timeout_ms),
            breaker_cooldown: Duration::from_millis(settings.breaker_cooldown_ms),
            started: Instant::now(),
            open_until_ms: Arc::new(AtomicU64::new(0)),
        })
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Checks that the topic exists (without creating it: metadata for all
    /// topics never triggers auto-creation). Returns its partition count.
    pub async fn check_topic(&self, timeout: Duration) -> Result<usize, SinkError> {
        let producer = self.producer.clone();
        let topic = self.topic.to_string();
        let brokers = self.brokers.to_string();
        let md = tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(None, Timeout::After(timeout))
        })
        .await
        .map_err(|e| SinkError::TopicError {
            topic: topic.clone(),
            error: e.to_string(),
        })?
        .map_err(|source| SinkError::Unreachable {
            brokers: brokers.clone(),
            timeout_ms: timeout.as_millis() as u64,
            source,
        })?;
        let Some(t) = md.topics().iter().find(|t| t.name() == topic) else {
            return Err(SinkError::TopicMissing { topic, brokers });
        };
        if let Some(err) = t.error() {
            return Err(SinkError::TopicError {
                topic,
                error: format!("{:?}", RDKafkaErrorCode::from(err)),
            });
        }
        Ok(t.partitions().len())
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// True while deliveries are skipped after a failure.
    pub fn breaker_open(&self) -> bool {
        let open = self.now_ms() < self.open_until_ms.load(Ordering::Relaxed);
        self.metrics.breaker_open.set(i64::from(open));
        open
    }

    fn trip(&self) {
        let until = self.now_ms() + self.breaker_cooldown.as_millis() as u64;
        self.open_until_ms.fetch_max(until, Ordering::Relaxed);
        self.metrics.breaker_open.set(1);
    }

    /// Produces every message and waits for every acknowledgement. Results
    /// are in input order. Messages are all enqueued before any is awaited, so
    /// a batch costs one round trip, not one per message.
    pub async fn deliver(
        &self,
        messages: &[(u64, &[u8], Route)],
    ) -> Vec<Result<(), DeliveryError>> {
        if self.breaker_open() {
            return messages
                .iter()
                .map(|_| {
                    Err(DeliveryError {
                        kind: "breaker_open",
                        message: "Kafka failed recently; skipping it during the cool-down".into(),
                    })
                })
                .collect();
        }
        let deadline = Instant::now() + self.delivery_timeout;
        let started = Instant::now();
        let mut pending = Vec::with_capacity(messages.len());
        for (account, value, route) in messages {
            let key = account.to_string();
            let headers = OwnedHeaders::new().insert(Header {
                key: ROUTE_HEADER,
                value: Some(route.as_str()),
            });
            let mut record = FutureRecord::to(&self.topic)
                .key(&key)
                .payload(*value)
                .headers(headers);
            let fut = loop {
                match self.producer.send_result(record) {
                    Ok(f) => break Ok(f),
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r))
                        if Instant::now() < deadline =>
                    {
                        record = r;
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    Err((e, _)) => {
                        let kind = match e {
                            KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull) => {
                                "queue_full"
                            }
                            _ => "broker",
                        };
                        break Err(DeliveryError {
                            kind,
                            message: e.to_string(),
                        });
                    }
                }
            };
            pending.push(fut);
        }
        let mut out = Vec::with_capacity(pending.len());
        for p in pending {
            let r = match p {
                Err(e) => Err(e),
                Ok(fut) => match fut.await {
                    Ok(Ok(_delivery)) => {
                        self.metrics
                            .delivery_seconds
                            .observe(started.elapsed().as_secs_f64());
                        Ok(())
                    }
                    Ok(Err((e, _msg))) => {
                        let kind = match e {
                            KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut) => {
                                "timeout"
                            }
                            _ => "broker",
                        };
                        Err(DeliveryError {
                            kind,
                            message: e.to_string(),
                        })
                    }
                    Err(_canceled) => Err(DeliveryError {
                        kind: "canceled",
                        message: "the producer was dropped before the delivery report".into(),
                    }),
                },
            };
            if let Err(e) = &r {
                self.metrics
                    .delivery_errors
                    .with_label_values(&[e.kind])
                    .inc();
            }
            out.push(r);
        }
        if out.iter().any(|r| r.is_err()) {
            self.trip();
        }
        out
    }

    /// Waits for everything in flight to be acknowledged (or to fail).
    pub async fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        let producer = self.producer.clone();
        tokio::task::spawn_blocking(move || producer.flush(Timeout::After(timeout)))
            .await
            .unwrap_or(Err(KafkaError::Canceled))
    }

    /// Messages not yet acknowledged.
    pub fn in_flight(&self) -> i32 {
        self.producer.in_flight_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_recognised() {
        assert!(is_secret("sasl.password"));
        assert!(is_secret("ssl.key.password"));
        assert!(is_secret("ssl.key.pem"));
        assert!(!is_secret("ssl.key.location"));
        assert!(!is_secret("security.protocol"));
    }
}
