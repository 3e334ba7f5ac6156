//! Metric families, grouped per role and registered into a registry that is
//! passed in (no globals), so each test reads its own. Names follow
//! `switchyard_<role>_<what>_<unit>`; labels are bounded sets, never an account.

use prometheus::{
    Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry,
};

/// Latency buckets from 50 µs to 10 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
];

pub(crate) fn counter(reg: &Registry, name: &str, help: &str) -> prometheus::Result<IntCounter> {
    let c = IntCounter::new(name, help)?;
    reg.register(Box::new(c.clone()))?;
    Ok(c)
}

pub(crate) fn counter_vec(
    reg: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntCounterVec> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    reg.register(Box::new(c.clone()))?;
    Ok(c)
}

/// Creates the series of a bounded label set at zero, so dashboards and alert
/// rules see 0 rather than no data before the first event.
fn zero(c: &IntCounterVec, values: &[&[&str]]) {
    for v in values {
        c.with_label_values(v).inc_by(0);
    }
}

/// Delivery failure kinds (`DeliveryError::kind`).
pub const DELIVERY_ERROR_KINDS: [&str; 5] = [
    "timeout",
    "queue_full",
    "broker",
    "canceled",
    "breaker_open",
];

pub(crate) fn histogram(reg: &Registry, name: &str, help: &str) -> prometheus::Result<Histogram> {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()))?;
    reg.register(Box::new(h.clone()))?;
    Ok(h)
}

pub(crate) fn int_gauge(reg: &Registry, name: &str, help: &str) -> prometheus::Result<IntGauge> {
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
    /// 1 once real flag values are loaded; 0 while on the safe default.
    pub loaded: IntGauge,
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
        let m = RouteMetrics {
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
                loaded: int_gauge(
                    reg,
                    "switchyard_route_flag_source_loaded",
                    "1 once real flag values are loaded; 0 while routing on the safe default (legacy)",
                )?,
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
            kafka: KafkaMetrics::new(reg, "route")?,
        };
        for route in ["dual", "kafka"] {
            for kind in DELIVERY_ERROR_KINDS {
                zero(&m.fallbacks, &[&[route, kind]]);
            }
        }
        Ok(m)
    }
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
        };
        for k in DELIVERY_ERROR_KINDS {
            zero(&m.delivery_errors, &[&[k]]);
        }
        Ok(m)
    }
}

/// Rows per batch: 1 to 10,000.
const BATCH_BUCKETS: &[f64] = &[
    1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2000.0, 3000.0, 5000.0, 10000.0,
];

pub(crate) fn gauge(reg: &Registry, name: &str, help: &str) -> prometheus::Result<Gauge> {
    let g = Gauge::new(name, help)?;
    reg.register(Box::new(g.clone()))?;
    Ok(g)
}

/// What every database-writing role reports: `switchyard_<role>_*`.
#[derive(Clone)]
pub struct SinkMetrics {
    /// Rows by table and outcome (`inserted`, `duplicate`).
    pub rows: IntCounterVec,
    pub batches: IntCounter,
    pub batch_rows: Histogram,
    pub insert_seconds: Histogram,
    /// Retries by reason (`database`, `kafka`).
    pub retries: IntCounterVec,
    /// Dead-lettered inputs by reason (`parse`, `schema`, `rejected`).
    pub dead_letters: IntCounterVec,
    /// Unix time of the last database commit.
    pub last_commit: Gauge,
}

impl SinkMetrics {
    pub fn new(reg: &Registry, role: &str) -> prometheus::Result<SinkMetrics> {
        let batch_rows = Histogram::with_opts(
            HistogramOpts::new(
                format!("switchyard_{role}_batch_rows"),
                "Rows per committed batch",
            )
            .buckets(BATCH_BUCKETS.to_vec()),
        )?;
        reg.register(Box::new(batch_rows.clone()))?;
        let m = SinkMetrics {
            rows: counter_vec(
                reg,
                &format!("switchyard_{role}_rows_total"),
                "Rows written, by table and outcome (inserted, duplicate: key already present)",
                &["table", "outcome"],
            )?,
            batches: counter(
                reg,
                &format!("switchyard_{role}_batches_total"),
                "Batches committed",
            )?,
            batch_rows,
            insert_seconds: histogram(
                reg,
                &format!("switchyard_{role}_insert_duration_seconds"),
                "Time to write and commit one batch",
            )?,
            retries: counter_vec(
                reg,
                &format!("switchyard_{role}_retries_total"),
                "Batches retried after a transient failure, by what failed",
                &["reason"],
            )?,
            dead_letters: counter_vec(
                reg,
                &format!("switchyard_{role}_dead_letters_total"),
                "Inputs sent to the dead letter, by reason (parse, schema, rejected)",
                &["reason"],
            )?,
            last_commit: gauge(
                reg,
                &format!("switchyard_{role}_last_commit_timestamp_seconds"),
                "Unix time of the last successful database commit",
            )?,
        };
        zero(&m.retries, &[&["database"], &["kafka"]]);
        zero(&m.dead_letters, &[&["parse"], &["schema"], &["rejected"]]);
        Ok(m)
    }

    /// Records a committed batch: its duration and size, and per table what
    /// was inserted or skipped. Returns the totals.
    pub fn committed<'t>(
        &self,
        elapsed: std::time::Duration,
        batch_rows: usize,
        tables: impl IntoIterator<Item = (&'t str, &'t crate::db::Written)>,
    ) -> crate::db::Written {
        self.insert_seconds.observe(elapsed.as_secs_f64());
        self.batch_rows.observe(batch_rows as f64);
        let mut total = crate::db::Written::default();
        for (table, w) in tables {
            self.rows
                .with_label_values(&[table, "inserted"])
                .inc_by(w.inserted);
            self.rows
                .with_label_values(&[table, "duplicate"])
                .inc_by(w.duplicates);
            total.inserted += w.inserted;
            total.duplicates += w.duplicates;
        }
        self.batches.inc();
        self.last_commit.set(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
        );
        total
    }
}

/// The legacy loader.
#[derive(Clone)]
pub struct LoadMetrics {
    pub sink: SinkMetrics,
    pub files_pending: IntGauge,
    pub bytes_pending: IntGauge,
    pub files_loaded: IntCounter,
    pub bytes_loaded: IntCounter,
    pub rows_per_second: Gauge,
    pub eta_seconds: Gauge,
    /// Fallback lines produced to Kafka, by original route (`kafka`, `dual`).
    pub replayed: IntCounterVec,
    pub kafka: KafkaMetrics,
}

impl LoadMetrics {
    pub fn new(reg: &Registry) -> prometheus::Result<LoadMetrics> {
        let m = LoadMetrics {
            sink: SinkMetrics::new(reg, "load")?,
            files_pending: int_gauge(
                reg,
                "switchyard_load_files_pending",
                "Closed offline files not yet fully loaded",
            )?,
            bytes_pending: int_gauge(
                reg,
                "switchyard_load_bytes_pending",
                "Bytes of offline files not yet loaded",
            )?,
            files_loaded: counter(
                reg,
                "switchyard_load_files_total",
                "Offline files fully loaded (then deleted or archived)",
            )?,
            bytes_loaded: counter(
                reg,
                "switchyard_load_bytes_total",
                "Bytes of offline files loaded",
            )?,
            rows_per_second: gauge(
                reg,
                "switchyard_load_rows_per_second",
                "Lines loaded per second over the last 10 s",
            )?,
            eta_seconds: gauge(
                reg,
                "switchyard_load_eta_seconds",
                "Estimated time to load the backlog at the current rate (-1: unknown)",
            )?,
            replayed: counter_vec(
                reg,
                "switchyard_load_replayed_total",
                "Kafka fallback lines produced to Kafka, by the payload's route",
                &["route"],
            )?,
            kafka: KafkaMetrics::new(reg, "load")?,
        };
        zero(&m.replayed, &[&["kafka"], &["dual"]]);
        Ok(m)
    }
}

/// The Kafka ingestion consumer.
#[derive(Clone)]
pub struct IngestMetrics {
    pub sink: SinkMetrics,
    pub messages: IntCounter,
    pub lag_messages: IntGaugeVec,
    pub lag_seconds: GaugeVec,
    pub rebalances: IntCounterVec,
    pub commit_errors: IntCounter,
    pub dropped_revoked: IntCounter,
}

impl IngestMetrics {
    pub fn new(reg: &Registry) -> prometheus::Result<IngestMetrics> {
        let lag_messages = IntGaugeVec::new(
            Opts::new(
                "switchyard_ingest_lag_messages",
                "Messages between the committed offset and the end of the partition",
            ),
            &["topic", "partition"],
        )?;
        reg.register(Box::new(lag_messages.clone()))?;
        let lag_seconds = GaugeVec::new(
            Opts::new(
                "switchyard_ingest_lag_seconds",
                "Age of the oldest message not yet committed (0 when caught up)",
            ),
            &["topic", "partition"],
        )?;
        reg.register(Box::new(lag_seconds.clone()))?;
        let m = IngestMetrics {
            sink: SinkMetrics::new(reg, "ingest")?,
            messages: counter(
                reg,
                "switchyard_ingest_messages_total",
                "Messages consumed",
            )?,
            lag_messages,
            lag_seconds,
            rebalances: counter_vec(
                reg,
                "switchyard_ingest_rebalances_total",
                "Partition assignments and revocations",
                &["kind"],
            )?,
            commit_errors: counter(
                reg,
                "switchyard_ingest_offset_commit_errors_total",
                "Offset commits that failed after the database commit (rows are redelivered and skipped as duplicates)",
            )?,
            dropped_revoked: counter(
                reg,
                "switchyard_ingest_revoked_dropped_total",
                "Messages dropped uncommitted from a batch because their partition was revoked",
            )?,
        };
        zero(&m.rebalances, &[&["assign"], &["revoke"]]);
        Ok(m)
    }
}

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
                "Parity checks by result (passed, failed, pending)",
                &["result"],
            )?,
            last_transition: gauge(
                reg,
                "switchyard_rollout_last_transition_timestamp_seconds",
                "Unix time of the last transition",
            )?,
        };
        zero(&m.checks, &[&["passed"], &["failed"], &["pending"]]);
        Ok(m)
    }
}

/// The shadow comparator.
#[derive(Clone)]
pub struct CompareMetrics {
    pub messages: IntCounter,
    pub bad_messages: IntCounter,
    pub rows_verified: IntCounter,
    pub check_seconds: Histogram,
    pub check_errors: IntCounter,
    pub expected: IntGaugeVec,
    pub found: IntGaugeVec,
    pub missing: IntGaugeVec,
    pub extra: IntGaugeVec,
    pub windows: IntGaugeVec,
    pub parity_ratio: GaugeVec,
    pub last_verified_age: GaugeVec,
}

impl CompareMetrics {
    pub fn new(reg: &Registry) -> prometheus::Result<CompareMetrics> {
        let gauge_vec =
            |name: &str, help: &str, labels: &[&str]| -> prometheus::Result<IntGaugeVec> {
                let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
                reg.register(Box::new(g.clone()))?;
                Ok(g)
            };
        let fgauge_vec =
            |name: &str, help: &str, labels: &[&str]| -> prometheus::Result<GaugeVec> {
                let g = GaugeVec::new(Opts::new(name, help), labels)?;
                reg.register(Box::new(g.clone()))?;
                Ok(g)
            };
        Ok(CompareMetrics {
            messages: counter(reg, "switchyard_compare_messages_total", "Messages read from the topic")?,
            bad_messages: counter(
                reg,
                "switchyard_compare_bad_messages_total",
                "Messages the comparator could not read (not an envelope, unknown table, no key or time)",
            )?,
            rows_verified: counter(
                reg,
                "switchyard_compare_rows_verified_total",
                "Row lookups done (one per expected row and database)",
            )?,
            check_seconds: histogram(
                reg,
                "switchyard_compare_check_duration_seconds",
                "Time of one pass over the due windows",
            )?,
            check_errors: counter(
                reg,
                "switchyard_compare_check_errors_total",
                "Passes that failed (a database unreachable)",
            )?,
            expected: gauge_vec(
                "switchyard_compare_expected_rows",
                "Rows expected in checked windows, by table and database",
                &["table", "db"],
            )?,
            found: gauge_vec(
                "switchyard_compare_found_rows",
                "Expected rows found in checked windows, by table and database",
                &["table", "db"],
            )?,
            missing: gauge_vec(
                "switchyard_compare_missing_rows",
                "Expected rows not found in checked windows, by table and database",
                &["table", "db"],
            )?,
            extra: gauge_vec(
                "switchyard_compare_extra_rows",
                "Rows in NEW in checked windows that the stream did not announce",
                &["table"],
            )?,
            windows: gauge_vec(
                "switchyard_compare_windows",
                "Windows held, by table and status (open, ok, pending, mismatch)",
                &["table", "status"],
            )?,
            parity_ratio: fgauge_vec(
                "switchyard_compare_parity_ratio",
                "Found / expected over checked windows, by table and database",
                &["table", "db"],
            )?,
            last_verified_age: fgauge_vec(
                "switchyard_compare_last_verified_age_seconds",
                "Seconds since the newest window verified ok became due",
                &["table"],
            )?,
        })
    }

    /// Sets the gauges from a report.
    pub fn set(&self, p: &crate::compare::Parity, _schema: &crate::schema::Schema) {
        for t in &p.tables {
            let tb = t.table.as_str();
            for (db, e, f, m, r) in [
                (
                    "old",
                    t.expected_old,
                    t.found_old,
                    t.missing_old,
                    t.parity_old,
                ),
                (
                    "new",
                    t.expected_new,
                    t.found_new,
                    t.missing_new,
                    t.parity_new,
                ),
            ] {
                self.expected.with_label_values(&[tb, db]).set(e as i64);
                self.found.with_label_values(&[tb, db]).set(f as i64);
                self.missing.with_label_values(&[tb, db]).set(m as i64);
                self.parity_ratio.with_label_values(&[tb, db]).set(r);
            }
            self.extra.with_label_values(&[tb]).set(t.extra_new);
            for (status, n) in &t.windows {
                self.windows.with_label_values(&[tb, status]).set(*n as i64);
            }
            self.last_verified_age
                .with_label_values(&[tb])
                .set(t.last_verified_age_secs.unwrap_or(-1.0));
        }
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
