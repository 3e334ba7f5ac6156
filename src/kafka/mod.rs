//! The Kafka sink: an idempotent rdkafka producer (acks=all), keyed by
//! account so one account's payloads stay on one partition, in order.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;

use crate::config::KafkaSettings;
pub mod args;
pub mod breaker;
mod metrics;

use breaker::{Admit, Breaker};

use crate::routing::Route;
pub use metrics::{KafkaMetrics, DELIVERY_ERROR_KINDS};

/// Header carrying the route decision (`dual` or `kafka`).
pub const ROUTE_HEADER: &str = "switchyard-route";

/// A consumer stores and commits its offsets itself, only after the database
/// committed the batch (at least once); a property that lets librdkafka do
/// either on its own is refused, naming it.
pub fn keeps_consumer_guarantees<'a>(
    props: impl IntoIterator<Item = &'a (String, String)>,
) -> Result<(), String> {
    for (k, v) in props {
        let v = v.trim().to_ascii_lowercase();
        if matches!(k.trim(), "enable.auto.commit" | "enable.auto.offset.store") && v != "false" {
            return Err(format!(
                "the Kafka property {k}={v} is refused: offsets are committed only after the \
                 database committed their batch, and only {k}=false allows that"
            ));
        }
    }
    Ok(())
}

/// Properties that carry secrets: never logged.
/// A librdkafka configuration error in words that never show a property's
/// value: rdkafka's own message ends with the key and the value given, which
/// would print a password whose property name was mistyped.
pub fn config_problem(e: &KafkaError) -> String {
    match e {
        KafkaError::ClientConfig(_, _, key, _) if is_secret(key) => {
            format!("property {key:?} refused (its value is not shown)")
        }
        KafkaError::ClientConfig(_, desc, _, _) => desc.clone(),
        other => other.to_string(),
    }
}

fn is_secret(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    k.contains("password") || k.contains("secret") || k.contains("key") && !k.ends_with(".location")
}

/// A 2xx promises the broker acknowledged under `acks=all` with the
/// idempotent producer; a property that weakens either is refused, naming it.
fn keeps_guarantees<'a>(
    props: impl Iterator<Item = (&'a String, &'a String)>,
) -> Result<(), String> {
    for (k, v) in props {
        let v = v.trim().to_ascii_lowercase();
        let weakened = match k.trim() {
            "acks" | "request.required.acks" => v != "all" && v != "-1",
            "enable.idempotence" => v != "true",
            _ => false,
        };
        if weakened {
            return Err(format!(
                "the Kafka property {k}={v} is refused: a 2xx promises that the broker acknowledged \
                 the message with acks=all and enable.idempotence=true, and only those values are allowed"
            ));
        }
    }
    Ok(())
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
    #[error("invalid Kafka producer configuration: {}", config_problem(.0))]
    Config(KafkaError),
    #[error("{0}")]
    Weakened(String),
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
    /// Bounded: `timeout`, `queue_full`, `broker`, `canceled`,
    /// `breaker_open`, `refused`.
    pub kind: &'static str,
    pub message: String,
}

impl DeliveryError {
    /// Kafka answered and refused this message for good (authorisation, a
    /// missing topic, a message too large): retrying cannot help, and it says
    /// nothing about Kafka's health.
    pub fn is_permanent(&self) -> bool {
        self.kind == "refused"
    }
}

/// Delivery error codes that refuse one message for good. Everything else
/// (timeouts, transport, leader changes, a fenced or fatal producer) is an
/// outage to wait out.
fn refused(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        code,
        C::MessageSizeTooLarge
            | C::InvalidMessageSize
            | C::MessageBatchTooLarge
            | C::InvalidMessage
            | C::InvalidRecord
            | C::UnknownTopic
            | C::UnknownTopicOrPartition
            | C::InvalidTopic
            | C::TopicAuthorizationFailed
            | C::ClusterAuthorizationFailed
    )
}

/// A TLS handshake the client refused (a certificate that does not verify, no
/// shared protocol) or SASL credentials the broker refused: configuration to
/// fix, never an outage to wait out. librdkafka reports a connection lost
/// during the handshake as a transport error, not as these.
pub fn is_refusal(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(RDKafkaErrorCode::SSL | RDKafkaErrorCode::Authentication)
    )
}

fn error_kind(e: &KafkaError) -> &'static str {
    match e.rdkafka_error_code() {
        Some(RDKafkaErrorCode::MessageTimedOut) => "timeout",
        Some(RDKafkaErrorCode::QueueFull) => "queue_full",
        Some(code) if refused(code) => "refused",
        _ => "broker",
    }
}

/// Errors after which an idempotent producer's identity (its producer id,
/// epoch and sequences) is no longer accepted by the broker: every later
/// message would fail the same way, whether or not librdkafka raised it as
/// fatal, so the producer is built anew.
fn needs_new_producer(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::ProducerFenced
                | RDKafkaErrorCode::InvalidProducerEpoch
                | RDKafkaErrorCode::InvalidProducerIdMapping
                | RDKafkaErrorCode::UnknownProducerId
                | RDKafkaErrorCode::OutOfOrderSequenceNumber
                | RDKafkaErrorCode::Fatal
        )
    )
}

/// The producer, its topic and a breaker that skips Kafka for a while after a
/// failure so requests do not each wait a full delivery timeout.
#[derive(Clone)]
pub struct KafkaSink {
    /// Replaced when librdkafka reports a fatal error: an idempotent
    /// producer that hit one (fenced, or a sequence gap after an outage)
    /// refuses every later message, so it must be built anew.
    producer: Arc<Mutex<FutureProducer<QuietContext>>>,
    config: Arc<ClientConfig>,
    topic: Arc<str>,
    brokers: Arc<str>,
    metrics: KafkaMetrics,
    delivery_timeout: Duration,
    breaker: Arc<Mutex<Breaker>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
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
        keeps_guarantees(
            settings
                .properties
                .iter()
                .chain(extra.iter().map(|(k, v)| (k, v))),
        )
        .map_err(SinkError::Weakened)?;
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
        let delivery_timeout = Duration::from_millis(settings.delivery_timeout_ms);
        Ok(KafkaSink {
            producer: Arc::new(Mutex::new(producer)),
            config: Arc::new(cfg),
            topic: settings.topic.as_str().into(),
            brokers: brokers.into(),
            metrics,
            delivery_timeout,
            breaker: Arc::new(Mutex::new(Breaker::new(
                Duration::from_millis(settings.breaker_cooldown_ms),
                // A probe resolves within the delivery timeout; the margin
                // covers librdkafka's own scheduling.
                delivery_timeout + Duration::from_secs(5),
            ))),
        })
    }

    fn producer(&self) -> FutureProducer<QuietContext> {
        lock(&self.producer).clone()
    }

    /// Builds a fresh producer if `used` is in a fatal state, or `refused`
    /// names the broker's refusal of its identity (and nobody replaced it
    /// yet). Messages still in the old one fail with it.
    fn renew_if_fatal(&self, used: &FutureProducer<QuietContext>, refused: Option<&KafkaError>) {
        let (code, reason) = match (used.client().fatal_error(), refused) {
            (Some((code, reason)), _) => (code, reason),
            (None, Some(e)) => (
                e.rdkafka_error_code().unwrap_or(RDKafkaErrorCode::Fatal),
                e.to_string(),
            ),
            (None, None) => return,
        };
        let mut current = lock(&self.producer);
        if !std::ptr::eq(current.client().native_ptr(), used.client().native_ptr()) {
            return;
        }
        match self.config.create_with_context(QuietContext::default()) {
            Ok(p) => {
                *current = p;
                self.metrics.producer_renewals.inc();
                tracing::warn!(?code, %reason, "the Kafka producer hit a fatal error; replaced it with a new one");
            }
            Err(e) => {
                tracing::error!(?code, %reason, error = %e, "the Kafka producer hit a fatal error and a new one cannot be built");
            }
        }
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Checks that the topic exists (without creating it: metadata for all
    /// topics never triggers auto-creation). Returns its partition count.
    pub async fn check_topic(&self, timeout: Duration) -> Result<usize, SinkError> {
        let producer = self.producer();
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

    /// True while deliveries are skipped after a failure (open, or a probe
    /// in flight).
    pub fn breaker_open(&self) -> bool {
        let open = lock(&self.breaker).is_skipping(Instant::now());
        self.metrics.breaker_open.set(i64::from(open));
        open
    }

    fn admit(&self) -> Admit {
        let admit = lock(&self.breaker).admit(Instant::now());
        self.metrics
            .breaker_open
            .set(i64::from(admit != Admit::Pass));
        admit
    }

    fn record(&self, admitted: Admit, healthy: bool) {
        let mut b = lock(&self.breaker);
        let now = Instant::now();
        b.record(admitted, healthy, now);
        self.metrics.breaker_open.set(i64::from(b.is_skipping(now)));
    }

    /// Produces every message and waits for every acknowledgement. Results
    /// are in input order. Messages are all enqueued before any is awaited, so
    /// a batch costs one round trip, not one per message.
    pub async fn deliver(
        &self,
        messages: &[(u64, &[u8], Route)],
    ) -> Vec<Result<(), DeliveryError>> {
        let admitted = self.admit();
        if admitted == Admit::Skip {
            self.metrics
                .delivery_errors
                .with_label_values(&["breaker_open"])
                .inc_by(messages.len() as u64);
            return messages
                .iter()
                .map(|_| {
                    Err(DeliveryError {
                        kind: "breaker_open",
                        message: "Kafka failed recently; skipping it until a probe succeeds".into(),
                    })
                })
                .collect();
        }
        let producer = self.producer();
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
                match producer.send_result(record) {
                    Ok(f) => break Ok(f),
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r))
                        if Instant::now() < deadline =>
                    {
                        record = r;
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    Err((e, _)) => {
                        break Err(DeliveryError {
                            kind: error_kind(&e),
                            message: e.to_string(),
                        });
                    }
                }
            };
            pending.push(fut);
        }
        let mut out = Vec::with_capacity(pending.len());
        let mut identity_refused: Option<KafkaError> = None;
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
                        let r = Err(DeliveryError {
                            kind: error_kind(&e),
                            message: e.to_string(),
                        });
                        if needs_new_producer(&e) {
                            identity_refused = Some(e);
                        }
                        r
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
        let unwell = out
            .iter()
            .any(|r| r.as_ref().is_err_and(|e| !e.is_permanent()));
        if unwell || identity_refused.is_some() {
            self.renew_if_fatal(&producer, identity_refused.as_ref());
        }
        self.record(admitted, !unwell);
        out
    }

    /// Waits for everything in flight to be acknowledged (or to fail).
    pub async fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        let producer = self.producer();
        tokio::task::spawn_blocking(move || producer.flush(Timeout::After(timeout)))
            .await
            .unwrap_or(Err(KafkaError::Canceled))
    }

    /// Messages not yet acknowledged.
    pub fn in_flight(&self) -> i32 {
        lock(&self.producer).in_flight_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_that_weaken_the_acknowledgement_are_refused() {
        let check = |k: &str, v: &str| {
            let (k, v) = (k.to_string(), v.to_string());
            keeps_guarantees(std::iter::once((&k, &v)))
        };
        assert!(check("acks", "all").is_ok());
        assert!(check("acks", "-1").is_ok());
        assert!(check("enable.idempotence", "true").is_ok());
        assert!(check("compression.type", "zstd").is_ok());
        let e = check("acks", "1").unwrap_err();
        assert!(e.contains("acks=1"), "{e}");
        assert!(check("request.required.acks", "0").is_err());
        assert!(check("enable.idempotence", "false").is_err());
        assert!(check("acks", "ALL").is_ok());
    }

    #[test]
    fn consumer_properties_that_commit_on_their_own_are_refused() {
        let p = |k: &str, v: &str| vec![(k.to_string(), v.to_string())];
        assert!(keeps_consumer_guarantees(&p("enable.auto.commit", "false")).is_ok());
        assert!(keeps_consumer_guarantees(&p("session.timeout.ms", "45000")).is_ok());
        let e = keeps_consumer_guarantees(&p("enable.auto.commit", "true")).unwrap_err();
        assert!(e.contains("enable.auto.commit=true"), "{e}");
        assert!(keeps_consumer_guarantees(&p("enable.auto.offset.store", "TRUE")).is_err());
    }

    #[test]
    fn a_refused_producer_identity_needs_a_new_producer() {
        use rdkafka::error::KafkaError as E;
        for code in [
            RDKafkaErrorCode::ProducerFenced,
            RDKafkaErrorCode::OutOfOrderSequenceNumber,
            RDKafkaErrorCode::UnknownProducerId,
        ] {
            assert!(needs_new_producer(&E::MessageProduction(code)), "{code:?}");
        }
        for code in [
            RDKafkaErrorCode::MessageTimedOut,
            RDKafkaErrorCode::BrokerTransportFailure,
            RDKafkaErrorCode::MessageSizeTooLarge,
        ] {
            assert!(!needs_new_producer(&E::MessageProduction(code)), "{code:?}");
        }
    }

    #[test]
    fn tls_and_sasl_refusals_are_configuration() {
        use rdkafka::error::KafkaError as E;
        assert!(is_refusal(&E::MessageConsumption(RDKafkaErrorCode::SSL)));
        assert!(is_refusal(&E::Global(RDKafkaErrorCode::Authentication)));
        assert!(is_refusal(&E::MessageConsumptionFatal(
            RDKafkaErrorCode::SSL
        )));
        assert!(!is_refusal(&E::MessageConsumption(
            RDKafkaErrorCode::BrokerTransportFailure
        )));
        assert!(!is_refusal(&E::Global(RDKafkaErrorCode::AllBrokersDown)));
        assert!(!is_refusal(&E::PartitionEOF(0)));
    }

    #[test]
    fn secrets_are_recognised() {
        assert!(is_secret("sasl.password"));
        assert!(is_secret("ssl.key.password"));
        assert!(is_secret("ssl.key.pem"));
        assert!(!is_secret("ssl.key.location"));
        assert!(!is_secret("security.protocol"));
    }
}
