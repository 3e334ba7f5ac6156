//! The admin port of the database roles: `/metrics`, `/healthz`, `/readyz`.
//! (The router has its own, with its flag and sink details.)

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use prometheus::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Readiness as the role sees it: ready, or why not.
#[derive(Clone, Default)]
pub struct Health(Arc<Mutex<Option<String>>>);

impl Health {
    /// Not ready until [`Health::ready`] is called.
    pub fn starting(why: &str) -> Health {
        Health(Arc::new(Mutex::new(Some(why.to_string()))))
    }

    pub fn ready(&self) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    pub fn not_ready(&self, why: impl Into<String>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(why.into());
    }

    pub fn reason(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[derive(Clone)]
struct AdminState {
    registry: Registry,
    health: Health,
}

pub fn router(registry: Registry, health: Health) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(AdminState { registry, health })
}

async fn metrics(State(s): State<AdminState>) -> Response {
    (
        [("content-type", "text/plain; version=0.0.4")],
        crate::metrics::encode(&s.registry),
    )
        .into_response()
}

async fn readyz(State(s): State<AdminState>) -> Response {
    match s.health.reason() {
        None => (StatusCode::OK, "ready\n").into_response(),
        Some(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        )
            .into_response(),
    }
}

/// Serves until `stop` is cancelled.
pub fn spawn(
    listener: TcpListener,
    router: Router,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(serve(listener, router, stop))
}

/// Connections an admin port serves at once; more wait in the listen queue.
pub const CONNECTIONS: usize = 64;
/// An admin request's headers must arrive within this, and its answer be
/// ready within [`REQUEST_TIMEOUT`]: admin ports are scraped and probed, so
/// a client slower than that is stuck or hostile.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves an admin router (of any role) until `stop`: at most
/// [`CONNECTIONS`] connections, each with hyper's header read timeout (which
/// also closes idle keep-alive connections) and a whole-request deadline;
/// then lets requests in flight finish.
pub async fn serve(listener: TcpListener, router: Router, stop: CancellationToken) {
    use hyper::service::Service as _;
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;
    let slots = Arc::new(tokio::sync::Semaphore::new(CONNECTIONS));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    loop {
        let slot = tokio::select! {
            _ = stop.cancelled() => break,
            s = slots.clone().acquire_owned() => match s { Ok(s) => s, Err(_) => break },
        };
        let stream = tokio::select! {
            _ = stop.cancelled() => break,
            a = listener.accept() => match a {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "admin: cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let tower = TowerToHyperService::new(router.clone());
        let svc = hyper::service::service_fn(move |req| {
            let answer = tower.call(req);
            async move {
                match tokio::time::timeout(REQUEST_TIMEOUT, answer).await {
                    Ok(r) => r,
                    Err(_) => {
                        Ok((StatusCode::REQUEST_TIMEOUT, "request timed out\n").into_response())
                    }
                }
            }
        });
        let conn = http.serve_connection(TokioIo::new(stream), svc);
        let watched = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = watched.await;
            drop(slot);
        });
    }
    drop(listener);
    if tokio::time::timeout(REQUEST_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("admin: requests still in flight at shutdown were dropped");
    }
}
