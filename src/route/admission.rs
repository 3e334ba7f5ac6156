//! Admission: what bounds the router's memory and time whatever clients
//! send. One mechanism in three layers, each bounded and counted:
//!
//! - connections: at most `max_connections` are served; one beyond waits up
//!   to `admission_wait_ms` for a slot (at most as many wait), then gets 503;
//!   hyper's header read timeout closes a connection whose headers (or whose
//!   next request, when kept alive) do not arrive in time;
//! - requests: at most `max_inflight_requests`, each taking its memory from
//!   one budget (`max_inflight_bytes`) *before* it buffers anything:
//!   `BYTES_PER_BODY_BYTE` per body byte, from `Content-Length` when sent and
//!   as the decompressed body grows otherwise, so no request holds more than
//!   it was admitted for; a wait beyond `admission_wait_ms` is a 503;
//! - parsing, where memory multiplies: at most `parse_concurrency` bodies at
//!   once, each line at most `max_line_bytes`.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::service::Service as _;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, SemaphorePermit};

use super::error::ApiError;
use super::metrics::RouteMetrics;
use crate::config::{RouteSettings, BYTES_PER_BODY_BYTE};

/// hyper's read buffer per connection (headers, and body bytes on their way
/// to the handler): its default (~400 KiB) times `max_connections` would be
/// most of the budget.
pub const CONNECTION_BUFFER: usize = 64 * 1024;

/// Request slots, the memory budget and parse slots.
pub struct Admission {
    requests: Semaphore,
    /// The budget in KiB (a semaphore counts in u32).
    memory_kib: Semaphore,
    parses: Semaphore,
    wait: Duration,
    retry_after: u64,
    max_body: usize,
    metrics: RouteMetrics,
}

impl Admission {
    pub fn new(cfg: &RouteSettings, metrics: RouteMetrics) -> Admission {
        Admission {
            requests: Semaphore::new(cfg.max_inflight_requests),
            memory_kib: Semaphore::new(
                cfg.max_inflight_bytes
                    .div_ceil(1024)
                    .min(Semaphore::MAX_PERMITS),
            ),
            parses: Semaphore::new(cfg.parse_concurrency),
            wait: Duration::from_millis(cfg.admission_wait_ms),
            retry_after: cfg.retry_after_secs,
            max_body: cfg.max_body_bytes,
            metrics,
        }
    }

    fn overloaded(&self, what: &str) -> ApiError {
        ApiError::unavailable(
            "overloaded",
            format!("too many {what} in flight"),
            self.retry_after,
        )
    }

    /// A request slot, waited for at most `admission_wait_ms`.
    pub async fn admit(&self) -> Result<Ticket<'_>, ApiError> {
        let slot = match tokio::time::timeout(self.wait, self.requests.acquire()).await {
            Ok(Ok(p)) => p,
            _ => return Err(self.overloaded("requests")),
        };
        self.metrics.inflight_requests.inc();
        Ok(Ticket {
            admission: self,
            _slot: slot,
            memory: None,
            body_capacity: 0,
        })
    }
}

/// One admitted request: its slot and the memory it may hold. Dropping it
/// gives both back.
pub struct Ticket<'a> {
    admission: &'a Admission,
    _slot: SemaphorePermit<'a>,
    memory: Option<SemaphorePermit<'a>>,
    /// The body capacity `memory` covers.
    body_capacity: usize,
}

impl Ticket<'_> {
    pub fn max_body(&self) -> usize {
        self.admission.max_body
    }

    /// Grows `buf` to hold `capacity` bytes, after taking the memory that
    /// takes (`BYTES_PER_BODY_BYTE` per byte: the buffer, what parsing makes
    /// of it, and a reallocation's old copy while it moves).
    pub async fn reserve(&mut self, buf: &mut Vec<u8>, capacity: usize) -> Result<(), ApiError> {
        if capacity > self.body_capacity {
            let want = kib(capacity);
            let have = kib(self.body_capacity);
            if want > have {
                let a = self.admission;
                let more = match tokio::time::timeout(
                    a.wait,
                    a.memory_kib.acquire_many(want - have),
                )
                .await
                {
                    Ok(Ok(p)) => p,
                    _ => return Err(a.overloaded("bytes")),
                };
                match &mut self.memory {
                    Some(m) => m.merge(more),
                    None => self.memory = Some(more),
                }
                a.metrics.inflight_bytes.add((want - have) as i64 * 1024);
            }
            self.body_capacity = capacity;
        }
        buf.reserve_exact(capacity.saturating_sub(buf.len()));
        Ok(())
    }

    /// A parse slot: parsing is where memory multiplies, so only a few run
    /// at once.
    pub async fn parse_slot(&self) -> Result<SemaphorePermit<'_>, ApiError> {
        self.admission
            .parses
            .acquire()
            .await
            .map_err(|_| self.admission.overloaded("parses"))
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        let m = &self.admission.metrics;
        m.inflight_requests.dec();
        if let Some(p) = &self.memory {
            m.inflight_bytes.sub(p.num_permits() as i64 * 1024);
        }
    }
}

/// The budget (KiB) a body capacity takes.
fn kib(body_capacity: usize) -> u32 {
    let bytes = body_capacity.saturating_mul(BYTES_PER_BODY_BYTE);
    u32::try_from(bytes.div_ceil(1024)).unwrap_or(u32::MAX)
}

/// The answer to a connection beyond the limit: the same JSON error as an
/// overloaded request, then the connection is closed.
const REFUSED: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: 79\r\n\r\n{\"error\":{\"code\":\"overloaded\",\"line\":null,\"message\":\"too many connections\"}}\n";

/// How the ingest listener serves.
#[derive(Clone)]
pub struct ServeSettings {
    pub max_connections: usize,
    pub wait: Duration,
    pub header_read_timeout: Duration,
}

impl ServeSettings {
    pub fn from(cfg: &RouteSettings) -> ServeSettings {
        ServeSettings {
            max_connections: cfg.max_connections,
            wait: Duration::from_millis(cfg.admission_wait_ms),
            header_read_timeout: Duration::from_millis(cfg.header_read_timeout_ms),
        }
    }
}

/// Serves `router` on `listener` until `stop`, then stops accepting and lets
/// every connection finish its request in flight (idle ones close at once).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    settings: ServeSettings,
    metrics: RouteMetrics,
    stop: impl Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(settings.max_connections));
    // As many may wait for a slot as are served: the file descriptors and
    // tasks of waiting connections are bounded too.
    let waiting = Arc::new(Semaphore::new(settings.max_connections));
    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout)
        .max_buf_size(CONNECTION_BUFFER);
    let conn = Conn {
        http,
        router,
        metrics: metrics.clone(),
    };
    tokio::pin!(stop);
    loop {
        let stream = tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    // Out of file descriptors, most often: accept again shortly.
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        if let Ok(slot) = slots.clone().try_acquire_owned() {
            tokio::spawn(conn.clone().serve(stream, slot, graceful.watcher()));
            continue;
        }
        let Ok(wait_slot) = waiting.clone().try_acquire_owned() else {
            metrics
                .connections_limited
                .with_label_values(&["refused"])
                .inc();
            let _ = stream.try_write(REFUSED);
            continue;
        };
        let (slots, conn, watcher, wait) = (
            slots.clone(),
            conn.clone(),
            graceful.watcher(),
            settings.wait,
        );
        tokio::spawn(async move {
            conn.metrics.connections_waiting.inc();
            let slot = tokio::time::timeout(wait, slots.acquire_owned()).await;
            conn.metrics.connections_waiting.dec();
            drop(wait_slot);
            match slot {
                Ok(Ok(slot)) => {
                    conn.metrics
                        .connections_limited
                        .with_label_values(&["waited"])
                        .inc();
                    conn.serve(stream, slot, watcher).await;
                }
                _ => {
                    conn.metrics
                        .connections_limited
                        .with_label_values(&["refused"])
                        .inc();
                    refuse(stream).await;
                }
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Answers 503 and closes, reading what the client sent meanwhile so that
/// the close is not a reset that could hide the answer.
async fn refuse(mut stream: TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(REFUSED).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 4096];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<_, std::io::Error>(())
    })
    .await;
}

/// What serving one connection needs.
#[derive(Clone)]
struct Conn {
    http: hyper::server::conn::http1::Builder,
    router: Router,
    metrics: RouteMetrics,
}

impl Conn {
    async fn serve(self, stream: TcpStream, slot: OwnedSemaphorePermit, watcher: Watcher) {
        self.metrics.connections.inc();
        let served = Arc::new(AtomicBool::new(false));
        let svc = {
            let served = served.clone();
            let tower = TowerToHyperService::new(self.router);
            hyper::service::service_fn(move |req| {
                served.store(true, Ordering::Relaxed);
                tower.call(req)
            })
        };
        let conn = self.http.serve_connection(TokioIo::new(stream), svc);
        if let Err(e) = watcher.watch(conn).await {
            if e.is_timeout() {
                // A connection that answered a request and then sent nothing
                // in time was idle; one that never completed its headers, slow.
                let reason = if served.load(Ordering::Relaxed) {
                    "idle"
                } else {
                    "header"
                };
                self.metrics.timeouts.with_label_values(&[reason]).inc();
            }
        }
        self.metrics.connections.dec();
        drop(slot);
    }
}
