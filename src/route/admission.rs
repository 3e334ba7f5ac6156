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
//!
//! Slow clients cannot hold the slots: a body must arrive at
//! `min_body_rate_bytes_per_sec` once `body_rate_grace_ms` have passed (408
//! below), and a new connection that finds every slot taken first closes the
//! connection doing least ([`Shedder`]): an idle keep-alive one, one still
//! sending its headers, or one sending its body below the minimum rate, each
//! at least [`SHED_AFTER`] old. It takes that connection's slot at once, so
//! a normal client is served however many slow ones hold the others.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use hyper::service::Service as _;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore, SemaphorePermit};
use tokio_util::sync::CancellationToken;

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

/// How young a connection is never closed to make room: time to send its
/// headers or the first of its body.
pub const SHED_AFTER: Duration = Duration::from_millis(250);

/// What a connection is doing, for [`Shedder`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    /// Waiting for a request's headers (a new connection).
    Headers = 0,
    /// Headers read; the body arriving.
    Body = 1,
    /// The body read: parsing and writing to the sinks. Never closed.
    Handling = 2,
    /// Answered; kept alive for the next request.
    Idle = 3,
    /// Chosen to be closed to make room: no request of it goes on.
    Closing = 4,
}

/// One connection's progress, shared by its task and its requests.
pub struct Progress {
    phase: AtomicU8,
    /// When the phase began, in µs since the shedder's epoch.
    since_us: AtomicU64,
    /// Body bytes received in this phase (as sent).
    body_bytes: AtomicU64,
    /// Time the body spent waiting on the client (not on admission or
    /// memory), in µs, and since when it is waiting now (µs + 1; 0: not).
    client_us: AtomicU64,
    waiting_since: AtomicU64,
    epoch: Instant,
}

/// What a connection is doing, as the shedder sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ConnView {
    pub phase: Phase,
    /// Since the phase began.
    pub age: Duration,
    pub body_bytes: u64,
    /// How long the body has waited on the client.
    pub client_time: Duration,
}

impl Progress {
    /// A connection accepted at `accepted` (its headers could arrive from
    /// then on, whether or not it waited for a slot).
    fn new(epoch: Instant, accepted: Instant) -> Progress {
        Progress {
            phase: AtomicU8::new(Phase::Headers as u8),
            since_us: AtomicU64::new(accepted.saturating_duration_since(epoch).as_micros() as u64),
            body_bytes: AtomicU64::new(0),
            client_us: AtomicU64::new(0),
            waiting_since: AtomicU64::new(0),
            epoch,
        }
    }

    fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    /// Moves to `phase`; false (and nothing changes) once the connection
    /// is being closed to make room, so that its request goes no further.
    /// The clock is reset first: a shedder that reads the new phase never
    /// pairs it with the old phase's age.
    pub fn enter(&self, phase: Phase) -> bool {
        if self.phase.load(Ordering::Acquire) == Phase::Closing as u8 {
            return false;
        }
        self.body_bytes.store(0, Ordering::Relaxed);
        self.client_us.store(0, Ordering::Relaxed);
        self.waiting_since.store(0, Ordering::Relaxed);
        self.since_us.store(self.now_us(), Ordering::Release);
        let closing = Phase::Closing as u8;
        self.phase
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |p| {
                (p != closing).then_some(phase as u8)
            })
            .is_ok()
    }

    /// The body starts (true) or stops (false) waiting on the client.
    pub fn waiting_on_client(&self, waiting: bool) {
        let now = self.now_us();
        if waiting {
            self.waiting_since.store(now + 1, Ordering::Release);
        } else {
            let since = self.waiting_since.swap(0, Ordering::AcqRel);
            if since > 0 {
                self.client_us
                    .fetch_add(now.saturating_sub(since - 1), Ordering::Relaxed);
            }
        }
    }

    pub fn body_received(&self, n: usize) {
        self.body_bytes.fetch_add(n as u64, Ordering::Relaxed);
    }

    fn view(&self, now_us: u64) -> ConnView {
        let phase = match self.phase.load(Ordering::Acquire) {
            0 => Phase::Headers,
            1 => Phase::Body,
            2 => Phase::Handling,
            3 => Phase::Idle,
            _ => Phase::Closing,
        };
        let since = self.since_us.load(Ordering::Acquire);
        let waiting = match self.waiting_since.load(Ordering::Acquire) {
            0 => 0,
            w => now_us.saturating_sub(w - 1),
        };
        ConnView {
            phase,
            age: Duration::from_micros(now_us.saturating_sub(since)),
            body_bytes: self.body_bytes.load(Ordering::Relaxed),
            client_time: Duration::from_micros(self.client_us.load(Ordering::Relaxed) + waiting),
        }
    }
}

/// Which connection to close for a new one, if any: idle ones first (oldest
/// first), then those still sending headers (oldest first), then bodies
/// arriving below `min_rate` bytes/s of the time they waited on their
/// client (slowest first); none younger than [`SHED_AFTER`] (a body: none
/// that waited on its client less), none being handled.
pub fn shed_choice(conns: &[ConnView], min_rate: u64) -> Option<usize> {
    let rank = |c: &ConnView| -> Option<(u8, f64)> {
        match c.phase {
            Phase::Idle if c.age >= SHED_AFTER => Some((0, -c.age.as_secs_f64())),
            Phase::Headers if c.age >= SHED_AFTER => Some((1, -c.age.as_secs_f64())),
            Phase::Body if c.client_time >= SHED_AFTER => {
                let rate = c.body_bytes as f64 / c.client_time.as_secs_f64();
                (rate < min_rate as f64).then_some((2, rate))
            }
            _ => None,
        }
    };
    conns
        .iter()
        .enumerate()
        .filter_map(|(i, c)| rank(c).map(|r| (i, r)))
        .min_by(|a, b| a.1.partial_cmp(&b.1).unwrap_or(std::cmp::Ordering::Equal))
        .map(|(i, _)| i)
}

/// A connection the shedder can close: its progress, the token that closes
/// it, and where it hands its slot.
struct Entry {
    progress: Arc<Progress>,
    close: CancellationToken,
    handoff: Mutex<Option<oneshot::Sender<OwnedSemaphorePermit>>>,
}

/// The connections being served, so that a new one can take the slot of the
/// one doing least.
pub struct Shedder {
    conns: Mutex<HashMap<u64, Arc<Entry>>>,
    next: AtomicU64,
    epoch: Instant,
    min_rate: u64,
}

impl Shedder {
    pub fn new(min_rate: u64) -> Shedder {
        Shedder {
            conns: Mutex::new(HashMap::new()),
            next: AtomicU64::new(0),
            epoch: Instant::now(),
            min_rate,
        }
    }

    fn register(&self, accepted: Instant) -> (u64, Arc<Entry>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let e = Arc::new(Entry {
            progress: Arc::new(Progress::new(self.epoch, accepted)),
            close: CancellationToken::new(),
            handoff: Mutex::new(None),
        });
        self.lock().insert(id, e.clone());
        (id, e)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Entry>>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Closes the connection doing least and returns its slot, or None when
    /// every connection is doing its job. The victim leaves the table at
    /// once, so two arrivals never wait on one victim.
    async fn shed(&self, metrics: &RouteMetrics) -> Option<OwnedSemaphorePermit> {
        let (rx, phase) = {
            let mut conns = self.lock();
            let now = self.epoch.elapsed().as_micros() as u64;
            let ids: Vec<u64> = conns.keys().copied().collect();
            let views: Vec<_> = ids.iter().map(|id| conns[id].progress.view(now)).collect();
            let i = shed_choice(&views, self.min_rate)?;
            let victim = conns.get(&ids[i])?.clone();
            // Claimed only if it is still doing what it was chosen for (a
            // body that just finished is being handled: left alone).
            victim
                .progress
                .phase
                .compare_exchange(
                    views[i].phase as u8,
                    Phase::Closing as u8,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .ok()?;
            conns.remove(&ids[i]);
            let (tx, rx) = oneshot::channel();
            *victim.handoff.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
            victim.close.cancel();
            (rx, views[i].phase)
        };
        let label = match phase {
            Phase::Idle => "idle",
            Phase::Headers => "header",
            _ => "body",
        };
        metrics.connections_shed.with_label_values(&[label]).inc();
        tokio::time::timeout(Duration::from_secs(1), rx)
            .await
            .ok()?
            .ok()
    }

    fn unregister(&self, id: u64) {
        self.lock().remove(&id);
    }
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
    pub min_body_rate: u64,
}

impl ServeSettings {
    pub fn from(cfg: &RouteSettings) -> ServeSettings {
        ServeSettings {
            max_connections: cfg.max_connections,
            wait: Duration::from_millis(cfg.admission_wait_ms),
            header_read_timeout: Duration::from_millis(cfg.header_read_timeout_ms),
            min_body_rate: cfg.min_body_rate_bytes_per_sec,
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
        shedder: Arc::new(Shedder::new(settings.min_body_rate)),
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
        let accepted = Instant::now();
        let _ = stream.set_nodelay(true);
        if let Ok(slot) = slots.clone().try_acquire_owned() {
            tokio::spawn(
                conn.clone()
                    .serve(stream, slot, graceful.watcher(), accepted),
            );
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
            let slot = conn.take_slot(&slots, accepted + wait).await;
            conn.metrics.connections_waiting.dec();
            drop(wait_slot);
            match slot {
                Some(slot) => {
                    conn.metrics
                        .connections_limited
                        .with_label_values(&["waited"])
                        .inc();
                    conn.serve(stream, slot, watcher, accepted).await;
                }
                None => {
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
    shedder: Arc<Shedder>,
}

impl Conn {
    /// A slot for a connection that found none free: the slot of the
    /// connection doing least, or one given back, tried every 100 ms until
    /// `deadline`.
    async fn take_slot(
        &self,
        slots: &Arc<Semaphore>,
        deadline: Instant,
    ) -> Option<OwnedSemaphorePermit> {
        loop {
            if let Some(slot) = self.shedder.shed(&self.metrics).await {
                return Some(slot);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            match tokio::time::timeout(
                left.min(Duration::from_millis(100)),
                slots.clone().acquire_owned(),
            )
            .await
            {
                Ok(Ok(slot)) => return Some(slot),
                Ok(Err(_)) => return None,
                Err(_) => {}
            }
        }
    }

    async fn serve(
        self,
        stream: TcpStream,
        slot: OwnedSemaphorePermit,
        watcher: Watcher,
        accepted: Instant,
    ) {
        self.metrics.connections.inc();
        let (id, entry) = self.shedder.register(accepted);
        let svc = {
            let progress = entry.progress.clone();
            let tower = TowerToHyperService::new(self.router);
            hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                progress.enter(Phase::Body);
                req.extensions_mut().insert(progress.clone());
                let answer = tower.call(req);
                let progress = progress.clone();
                async move {
                    let r = answer.await;
                    progress.enter(Phase::Idle);
                    r
                }
            })
        };
        let conn = self.http.serve_connection(TokioIo::new(stream), svc);
        let made_room = tokio::select! {
            r = watcher.watch(conn) => {
                if let Err(e) = r {
                    if e.is_timeout() {
                        // A connection that answered a request and then sent
                        // nothing in time was idle; one that never completed
                        // its headers, slow.
                        let reason = match entry.progress.view(0).phase {
                            Phase::Idle => "idle",
                            _ => "header",
                        };
                        self.metrics.timeouts.with_label_values(&[reason]).inc();
                    }
                }
                false
            }
            _ = entry.close.cancelled() => true,
        };
        self.shedder.unregister(id);
        self.metrics.connections.dec();
        if made_room {
            // The slot goes to the connection that asked for room.
            let handoff = entry
                .handoff
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            if let Some(tx) = handoff {
                let _ = tx.send(slot);
                return;
            }
        }
        drop(slot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn the_connection_doing_least_makes_room() {
        let c = |phase, age_ms: u64, bytes, client_ms: u64| ConnView {
            phase,
            age: MS * age_ms as u32,
            body_bytes: bytes,
            client_time: MS * client_ms as u32,
        };
        // Nothing old enough, or nothing idle, slow or stuck: no room.
        assert_eq!(shed_choice(&[c(Phase::Idle, 100, 0, 0)], 4096), None);
        assert_eq!(
            shed_choice(
                &[
                    c(Phase::Body, 1000, 100_000, 900),
                    c(Phase::Handling, 5000, 0, 0)
                ],
                4096
            ),
            None
        );
        // A body held back by the router (admission, memory), not by its
        // client, is not slow.
        assert_eq!(shed_choice(&[c(Phase::Body, 5000, 0, 100)], 4096), None);
        // Idle before headers before slow bodies; the oldest, the slowest.
        let conns = [
            c(Phase::Body, 2000, 10, 2000),
            c(Phase::Headers, 900, 0, 0),
            c(Phase::Idle, 300, 0, 0),
            c(Phase::Idle, 700, 0, 0),
            c(Phase::Closing, 9000, 0, 0),
        ];
        assert_eq!(shed_choice(&conns, 4096), Some(3));
        assert_eq!(shed_choice(&conns[..2], 4096), Some(1));
        let bodies = [
            c(Phase::Body, 2000, 4000, 2000),
            c(Phase::Body, 1000, 100, 1000),
        ];
        assert_eq!(shed_choice(&bodies, 4096), Some(1));
        assert_eq!(
            shed_choice(&bodies, 0),
            None,
            "no minimum rate: no body is slow"
        );
    }

    #[test]
    fn a_connection_closing_to_make_room_takes_no_further_step() {
        let epoch = Instant::now();
        let p = Progress::new(epoch, epoch);
        assert!(p.enter(Phase::Body));
        p.waiting_on_client(true);
        std::thread::sleep(Duration::from_millis(5));
        p.waiting_on_client(false);
        p.body_received(10);
        let v = p.view(p.now_us());
        assert_eq!(v.body_bytes, 10);
        assert!(v.client_time >= Duration::from_millis(5), "{v:?}");
        p.phase.store(Phase::Closing as u8, Ordering::Release);
        assert!(!p.enter(Phase::Handling));
        assert_eq!(p.view(0).phase, Phase::Closing);
    }
}
