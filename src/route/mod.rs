//! `switchyard route`: the sidecar in the API's request path. It validates
//! payloads against the declared schema, decides per account where each one
//! goes (offline file, Kafka, or both) and answers 2xx only once every chosen
//! sink has it durably.

mod admission;
pub mod cli;
mod decode;
mod error;
mod metrics;
mod parse;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use prometheus::Registry;
use serde::Serialize;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use decode::gunzip;
pub use error::ApiError;
pub use parse::{max_line_bytes, parse_body, Framing, Payload, LINE_SLACK};

use crate::config::{KafkaFallback, PipelineConfig};
use crate::flags::{FlagSource, LaunchDarklyFlags, LocalFlags};
use crate::kafka::{KafkaSink, SinkError};
use crate::metrics::encode;
use crate::offline::{self, line_route, LinePrefix, OfflineWriter, WriterConfig};
use crate::routing::{bucket, decide, threshold, Route};
use crate::schema::Schema;
pub use metrics::RouteMetrics;

/// Held (flock) by the router writing a folder.
pub const LOCK_FILE: &str = ".route.lock";

/// Everything `run` needs besides its listeners.
#[derive(Debug, Clone)]
pub struct RouteOptions {
    pub config: PipelineConfig,
    /// `bootstrap.servers`.
    pub kafka_brokers: String,
    /// `--kafka-config` properties (may hold secrets: never logged).
    pub kafka_extra: Vec<(String, String)>,
    /// Flags from LaunchDarkly instead of the local folder.
    pub launchdarkly: Option<crate::flags::LaunchDarklyOptions>,
}

/// Why the router could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("schema: {0}")]
    Schema(#[from] crate::schema::SchemaError),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("offline folder {dir}: {source}")]
    Offline { dir: String, source: std::io::Error },
    #[error("flags: {0}")]
    LaunchDarkly(#[from] crate::flags::LaunchDarklyStartError),
    #[error(transparent)]
    Kafka(#[from] SinkError),
    #[error("cannot serve: {0}")]
    Serve(std::io::Error),
}

/// Shared request state.
struct App {
    /// Fingerprint of the salt and flag keys (`switchyard_route_routing_info`).
    routing: String,
    schema: Schema,
    salt: String,
    flags: Arc<dyn FlagSource>,
    writer: OfflineWriter,
    /// The offline folder, probed by `/readyz`.
    offline_dir: std::path::PathBuf,
    kafka: KafkaSink,
    fallback: KafkaFallback,
    metrics: RouteMetrics,
    admission: admission::Admission,
    body_read_timeout: Duration,
    /// The slowest a body may arrive after its grace (0: no minimum).
    min_body_rate: u64,
    body_rate_grace: Duration,
    max_body: usize,
    /// The longest NDJSON line (or JSON body) parsed.
    max_line: usize,
    retry_after: u64,
    draining: AtomicBool,
    registry: Registry,
}

/// Runs the router until `shutdown`, then drains: stops accepting, lets
/// in-flight requests finish (within the grace), flushes the producer, closes
/// the offline file.
pub async fn run(
    opts: RouteOptions,
    listener: TcpListener,
    admin: TcpListener,
    registry: Registry,
    shutdown: CancellationToken,
) -> Result<(), StartError> {
    let cfg = &opts.config;
    let schema = cfg.schema()?;
    let metrics = RouteMetrics::new(&registry)?;

    let kafka = KafkaSink::new(
        &opts.kafka_brokers,
        &cfg.kafka,
        &opts.kafka_extra,
        metrics.kafka.clone(),
    )?;
    match kafka
        .check_topic(Duration::from_millis(cfg.kafka.topic_check_timeout_ms))
        .await
    {
        Ok(partitions) => tracing::info!(topic = kafka.topic(), partitions, "kafka topic found"),
        // A broker that is down must not take the API down with it: start,
        // and let Kafka-routed payloads fall back until it is back.
        Err(e @ SinkError::Unreachable { .. }) => {
            tracing::error!(error = %e, "kafka is unreachable at start; Kafka-routed payloads fall back until it answers")
        }
        Err(e) => return Err(e.into()),
    }

    // Offline folder: create, close what a crash left open, start the writer.
    let dir = cfg.offline.dir.clone();
    let off_err = |source| StartError::Offline {
        dir: dir.display().to_string(),
        source,
    };
    std::fs::create_dir_all(&dir).map_err(off_err)?;
    // One router per folder: an OS lock, released when the process dies, so a
    // crash never leaves a stale lock behind.
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(LOCK_FILE))
        .map_err(off_err)?;
    lock.try_lock().map_err(|e| match e {
        std::fs::TryLockError::WouldBlock => off_err(std::io::Error::other(format!(
            "another router is writing to this folder (it holds {LOCK_FILE})"
        ))),
        std::fs::TryLockError::Error(e) => off_err(e),
    })?;
    let repaired = offline::repair(&dir, Some(&metrics.offline)).map_err(off_err)?;
    if repaired.files > 0 {
        tracing::warn!(
            files = repaired.files,
            torn_bytes = repaired.torn_bytes,
            "repaired offline files left open by a previous run"
        );
    }
    let (writer, writer_thread) = OfflineWriter::start(
        WriterConfig {
            dir: dir.clone(),
            prefix: cfg.offline.prefix.clone(),
            max_file_bytes: cfg.offline.max_file_bytes,
            max_file_age: Duration::from_secs(cfg.offline.max_file_age_secs),
            fsync: cfg.offline.fsync,
            group_commit: Duration::from_millis(cfg.offline.group_commit_ms),
            queue_depth: cfg.offline.queue_depth,
            close_retry: Duration::from_secs(1),
        },
        metrics.offline.clone(),
    )
    .map_err(off_err)?;

    let (flags, flags_task): (Arc<dyn FlagSource>, _) = match &opts.launchdarkly {
        Some(ld) => {
            let flags = LaunchDarklyFlags::start(
                ld,
                cfg.flags.keys.clone(),
                Some(cfg.flags_last_good_file()),
                metrics.flags.clone(),
            )
            .await?;
            let task = flags.watch(Duration::from_secs(1), shutdown.child_token());
            (flags, task)
        }
        None => {
            let flags = LocalFlags::start(
                &cfg.flags.dir,
                cfg.flags.keys.clone(),
                Some(cfg.flags_last_good_file()),
                metrics.flags.clone(),
            );
            metrics.flags.loaded.set(1);
            let task = flags.watch(
                Duration::from_millis(cfg.flags.poll_ms),
                shutdown.child_token(),
            );
            (flags, task)
        }
    };

    let routing = crate::routing::fingerprint(
        &cfg.route.salt,
        &[
            &cfg.flags.keys.kill_switch,
            &cfg.flags.keys.kafka_only,
            &cfg.flags.keys.dual_write,
        ],
    );
    metrics.routing_info.with_label_values(&[&routing]).set(1);
    let app = Arc::new(App {
        routing: routing.clone(),
        max_line: parse::max_line_bytes(&schema),
        schema,
        salt: cfg.route.salt.clone(),
        flags: flags.clone(),
        writer: writer.clone(),
        offline_dir: dir.clone(),
        kafka: kafka.clone(),
        fallback: cfg.route.kafka_fallback,
        metrics: metrics.clone(),
        admission: admission::Admission::new(&cfg.route, metrics.clone()),
        body_read_timeout: Duration::from_millis(cfg.route.body_read_timeout_ms),
        min_body_rate: cfg.route.min_body_rate_bytes_per_sec,
        body_rate_grace: Duration::from_millis(cfg.route.body_rate_grace_ms),
        max_body: cfg.route.max_body_bytes,
        retry_after: cfg.route.retry_after_secs,
        draining: AtomicBool::new(false),
        registry: registry.clone(),
    });
    metrics.ready.set(1.0);

    let ingest_addr = listener.local_addr().map_err(StartError::Serve)?;
    let admin_addr = admin.local_addr().map_err(StartError::Serve)?;
    tracing::info!(%ingest_addr, %admin_addr, "router listening");

    let admin_stop = CancellationToken::new();
    let admin_server = {
        let stop = admin_stop.clone();
        let router = admin_router(app.clone());
        tokio::spawn(crate::admin::serve(admin, router, stop))
    };

    let drain_started = {
        let app = app.clone();
        let shutdown = shutdown.clone();
        async move {
            shutdown.cancelled().await;
            app.draining.store(true, Ordering::SeqCst);
            app.metrics.ready.set(0.0);
            tracing::info!("draining: no new requests; finishing in-flight ones");
        }
    };
    let server = admission::serve(
        listener,
        ingest_router(app.clone()),
        admission::ServeSettings::from(&cfg.route),
        metrics.clone(),
        drain_started,
    );
    let grace = cfg.grace();
    let deadline = {
        let shutdown = shutdown.clone();
        async move {
            shutdown.cancelled().await;
            tokio::time::sleep(grace).await;
        }
    };
    let drain_begun = Instant::now();
    tokio::select! {
        _ = server => {}
        _ = deadline => tracing::error!(grace_secs = grace.as_secs(), "grace period over with requests still in flight; they were not acknowledged"),
    }
    let left = grace
        .saturating_sub(drain_begun.elapsed())
        .max(Duration::from_secs(1));
    if let Err(e) = kafka.flush(left).await {
        tracing::error!(error = %e, in_flight = kafka.in_flight(), "kafka flush did not complete");
    }
    writer.close().await;
    let _ = tokio::task::spawn_blocking(move || writer_thread.join()).await;
    let _ = flags_task.await;
    admin_stop.cancel();
    let _ = admin_server.await;
    drop(lock);
    tracing::info!("router stopped");
    Ok(())
}

fn ingest_router(app: Arc<App>) -> Router {
    Router::new()
        .route("/v1/items", post(ingest))
        .route("/v1/route/{account_id}", get(explain))
        .with_state(app)
}

fn admin_router(app: Arc<App>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(app)
}

async fn metrics_handler(State(app): State<Arc<App>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        encode(&app.registry),
    )
        .into_response()
}

async fn readyz(State(app): State<Arc<App>>) -> Response {
    let draining = app.draining.load(Ordering::SeqCst);
    let flags = app.flags.status();
    // A full or read-only offline disk fails every legacy and dual write:
    // say so before a load balancer sends more.
    let dir = app.offline_dir.clone();
    let offline = tokio::task::spawn_blocking(move || probe_writable(&dir))
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
    let ready = !draining && flags.ready && offline.is_ok();
    let body = json!({
        "ready": ready,
        "draining": draining,
        "offline": {"writable": offline.is_ok(), "error": offline.err()},
        "flags": flags,
        "kafka": {"breaker_open": app.kafka.breaker_open(), "topic": app.kafka.topic()},
    });
    let status = if !ready {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (status, Json(body)).into_response()
}

/// Writes, syncs and removes a small file in the offline folder.
fn probe_writable(dir: &std::path::Path) -> Result<(), String> {
    use std::io::Write;
    let path = dir.join(".readyz-probe");
    let result = std::fs::File::create(&path)
        .and_then(|mut f| {
            f.write_all(&[0u8; 512])?;
            f.sync_data()
        })
        .map_err(|e| format!("the offline folder cannot be written: {e}"));
    let _ = std::fs::remove_file(&path);
    result
}

#[derive(Serialize)]
struct Explanation {
    account_id: u64,
    /// The salt's fingerprint (with the flag keys), not the salt itself.
    routing_fingerprint: String,
    bucket: u32,
    flags: crate::routing::FlagValues,
    thresholds: HashMap<&'static str, u32>,
    route: Route,
    reason: crate::routing::Reason,
    why: &'static str,
    flag_source: crate::flags::SourceStatus,
}

async fn explain(State(app): State<Arc<App>>, Path(account): Path<String>) -> Response {
    // Only the canonical decimal form: `+42` or `042` are not account 42.
    let canonical = !account.is_empty()
        && account.bytes().all(|b| b.is_ascii_digit())
        && (account == "0" || !account.starts_with('0'));
    let Some(account_id) = account.parse::<u64>().ok().filter(|_| canonical) else {
        return ApiError::input(
            400,
            "invalid_account_id",
            None,
            format!(
                "account_id must be a non-negative integer in decimal, found {:?}",
                account.chars().take(40).collect::<String>()
            ),
        )
        .into_response();
    };
    let b = bucket(&app.salt, account_id);
    let flags = app.flags.evaluate(account_id);
    let (route, reason) = decide(b, &flags);
    Json(Explanation {
        account_id,
        routing_fingerprint: app.routing.clone(),
        bucket: b,
        flags,
        thresholds: HashMap::from([
            ("kafka_only", threshold(flags.kafka_only)),
            ("dual_write", threshold(flags.dual_write)),
        ]),
        route,
        reason,
        why: reason.describe(),
        flag_source: app.flags.status(),
    })
    .into_response()
}

impl App {
    /// How much of a refused body is read and dropped, for how long.
    fn admission_linger(&self) -> decode::Linger {
        decode::Linger {
            bytes: self.max_body,
            time: LINGER,
        }
    }
}

/// How long a refused body is read and dropped before the connection closes.
const LINGER: Duration = Duration::from_secs(2);

/// What a successful request did.
#[derive(Debug, Default, Serialize, PartialEq)]
pub struct Accepted {
    pub accepted: usize,
    pub legacy: usize,
    pub dual: usize,
    pub kafka: usize,
    /// Payloads whose Kafka delivery failed and that are safe in the offline file.
    pub fallbacks: usize,
}

async fn ingest(
    State(app): State<Arc<App>>,
    progress: Option<axum::Extension<Arc<admission::Progress>>>,
    headers: HeaderMap,
    mut body: Body,
) -> Response {
    let started = Instant::now();
    let progress = progress.map(|axum::Extension(p)| p);
    let res = ingest_inner(&app, &headers, &mut body, progress.as_deref()).await;
    if let Err(e) = &res {
        // A client that writes its whole body before reading would see the
        // refusal as a reset: read (and drop) the rest a little while, with
        // the request's slot and memory already given back. Not for a body
        // that was too slow to arrive.
        if e.status() != 408 {
            decode::linger(&mut body, app.admission_linger()).await;
        }
    }
    let resp = match res {
        Ok(acc) => (StatusCode::OK, Json(acc)).into_response(),
        Err(e) => {
            let reason = match &e {
                ApiError::Input { .. } => "invalid",
                ApiError::Unavailable { code, .. } => code,
            };
            app.metrics
                .rejected_payloads
                .with_label_values(&[reason])
                .inc();
            let mut resp = e.into_response();
            // A refused body may be partly unread: the connection cannot
            // carry another request.
            resp.headers_mut().insert(
                header::CONNECTION,
                header::HeaderValue::from_static("close"),
            );
            resp
        }
    };
    app.metrics
        .requests
        .with_label_values(&[resp.status().as_str()])
        .inc();
    app.metrics
        .request_seconds
        .with_label_values(&["items"])
        .observe(started.elapsed().as_secs_f64());
    resp
}

async fn ingest_inner(
    app: &App,
    headers: &HeaderMap,
    body: &mut Body,
    progress: Option<&admission::Progress>,
) -> Result<Accepted, ApiError> {
    if app.draining.load(Ordering::SeqCst) {
        return Err(ApiError::unavailable(
            "draining",
            "the router is shutting down",
            app.retry_after,
        ));
    }
    // The body's deadline runs from its headers, waits for admission
    // included.
    let deadline = tokio::time::Instant::now() + app.body_read_timeout;
    let mut ticket = app.admission.admit().await?;

    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let Some(framing) = Framing::from_content_type(ct) else {
        return Err(ApiError::input(
            415,
            "unsupported_media_type",
            None,
            format!(
                "content type {} is not accepted; use application/json (one payload) or application/x-ndjson (a batch)",
                crate::schema::quote(ct)
            ),
        ));
    };

    let encoding = decode::Encoding::from_header(headers.get(header::CONTENT_ENCODING))?;
    let content_length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let bytes = match decode::read(
        body,
        encoding,
        content_length,
        &mut ticket,
        deadline,
        app.body_read_timeout,
        &decode::Pace {
            min_rate: app.min_body_rate,
            grace: app.body_rate_grace,
            progress,
        },
    )
    .await
    {
        Err(e) if e.status() == 408 => {
            let reason = if e.code() == "body_too_slow" {
                "slow_body"
            } else {
                "body"
            };
            app.metrics.timeouts.with_label_values(&[reason]).inc();
            return Err(e);
        }
        res => res?,
    };
    // From here the request is handled to the end; a connection chosen to
    // make room meanwhile stops before any sink is written.
    if progress.is_some_and(|p| !p.enter(admission::Phase::Handling)) {
        return Err(ApiError::unavailable(
            "overloaded",
            "the connection was closed to make room for another",
            app.retry_after,
        ));
    }
    let payloads = {
        let _parsing = ticket.parse_slot().await?;
        parse_body(&app.schema, &bytes, framing, app.max_line)?
    };
    drop(bytes);
    // The ticket is held until both sinks have the payloads: their copies
    // are what it admitted beyond the body.
    let acc = dispatch(app, payloads).await;
    drop(ticket);
    acc
}

/// Sends each payload where its account routes and waits for durability.
async fn dispatch(app: &App, payloads: Vec<Payload>) -> Result<Accepted, ApiError> {
    let mut routes: HashMap<u64, Route> = HashMap::new();
    let mut acc = Accepted {
        accepted: payloads.len(),
        ..Accepted::default()
    };
    let mut file_lines = Vec::new();
    let mut kafka_idx = Vec::new();
    let mut per_route: Vec<Route> = Vec::with_capacity(payloads.len());
    for (i, p) in payloads.iter().enumerate() {
        let route = *routes.entry(p.account_id).or_insert_with(|| {
            let flags = app.flags.evaluate(p.account_id);
            decide(bucket(&app.salt, p.account_id), &flags).0
        });
        per_route.push(route);
        match route {
            Route::Legacy => acc.legacy += 1,
            Route::Dual => acc.dual += 1,
            Route::Kafka => acc.kafka += 1,
        }
        if route.to_file() {
            file_lines.push(LinePrefix::new(
                &p.table,
                &p.row_json,
                p.account_id,
                route.as_str(),
            ));
        }
        if route.to_kafka() {
            kafka_idx.push(i);
        }
    }
    let messages: Vec<(u64, &[u8], Route)> = kafka_idx
        .iter()
        .map(|&i| {
            (
                payloads[i].account_id,
                payloads[i].envelope_json.as_slice(),
                per_route[i],
            )
        })
        .collect();

    // A sampled request times each sink for the flag source's report.
    let track = app.flags.sample_write();
    let file_write = async {
        let t = track.then(Instant::now);
        let r = if file_lines.is_empty() {
            Ok(())
        } else {
            app.writer.write(file_lines).await
        };
        (r, t.map(|t| t.elapsed()))
    };
    let kafka_send = async {
        let t = track.then(Instant::now);
        let r = if messages.is_empty() {
            Vec::new()
        } else {
            app.kafka.deliver(&messages).await
        };
        (r, t.map(|t| t.elapsed()))
    };
    let ((file_res, file_took), (kafka_res, kafka_took)) = tokio::join!(file_write, kafka_send);
    if let (true, Some(&route), Some(first)) = (track, per_route.first(), payloads.first()) {
        // The request's first payload stands for it: its route chose the
        // sinks, and it shares their outcome with the rest of the request.
        let outcome = |took: Option<Duration>, ok: bool| crate::flags::SinkOutcome {
            latency: took.unwrap_or_default(),
            ok,
        };
        app.flags.track_write(&crate::flags::WriteReport {
            account_id: first.account_id,
            old: route
                .to_file()
                .then(|| outcome(file_took, file_res.is_ok())),
            new: route.to_kafka().then(|| {
                let ok = kafka_idx
                    .iter()
                    .position(|i| *i == 0)
                    .and_then(|n| kafka_res.get(n))
                    .is_some_and(|r| r.is_ok());
                outcome(kafka_took, ok)
            }),
        });
    }
    if let Err(e) = file_res {
        return Err(ApiError::unavailable(
            "offline_unavailable",
            format!("the offline file cannot take the payloads: {e}"),
            app.retry_after,
        ));
    }

    let mut fallback_lines = Vec::new();
    for (n, res) in kafka_res.iter().enumerate() {
        let Err(e) = res else { continue };
        let i = kafka_idx[n];
        let p = &payloads[i];
        match per_route[i] {
            // The old pipeline has it from its `dual` line; this marker lets
            // the loader replay the missing Kafka leg.
            Route::Dual => {
                app.metrics
                    .fallbacks
                    .with_label_values(&["dual", e.kind])
                    .inc();
                fallback_lines.push(LinePrefix::new(
                    &p.table,
                    &p.row_json,
                    p.account_id,
                    line_route::DUAL_FALLBACK,
                ));
                acc.fallbacks += 1;
            }
            Route::Kafka => {
                if app.fallback == KafkaFallback::Reject {
                    return Err(ApiError::unavailable(
                        "kafka_unavailable",
                        format!("Kafka did not acknowledge the payload: {e}"),
                        app.retry_after,
                    ));
                }
                app.metrics
                    .fallbacks
                    .with_label_values(&["kafka", e.kind])
                    .inc();
                fallback_lines.push(LinePrefix::new(
                    &p.table,
                    &p.row_json,
                    p.account_id,
                    line_route::KAFKA_FALLBACK,
                ));
                acc.fallbacks += 1;
            }
            Route::Legacy => {}
        }
    }
    if !fallback_lines.is_empty() {
        if let Err(e) = app.writer.write(fallback_lines).await {
            return Err(ApiError::unavailable(
                "no_sink_available",
                format!("Kafka refused the payloads and the offline file cannot take them: {e}"),
                app.retry_after,
            ));
        }
    }

    // One labelled-metric lookup per route, not per payload.
    let mut bytes = [0u64; 3];
    for (p, r) in payloads.iter().zip(&per_route) {
        bytes[usize::from(r.rank())] += p.row_json.len() as u64;
    }
    for (route, count) in [
        (Route::Legacy, acc.legacy),
        (Route::Dual, acc.dual),
        (Route::Kafka, acc.kafka),
    ] {
        if count > 0 {
            let label = [route.as_str()];
            app.metrics
                .payloads
                .with_label_values(&label)
                .inc_by(count as u64);
            app.metrics
                .bytes
                .with_label_values(&label)
                .inc_by(bytes[usize::from(route.rank())]);
        }
    }
    Ok(acc)
}
