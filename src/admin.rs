//! The admin port of the database roles: `/metrics`, `/healthz`, `/readyz`.
//! (The router has its own, with its flag and sink details.)

use std::sync::{Arc, Mutex};

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
    tokio::spawn(async move {
        let res = axum::serve(listener, router)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
        if let Err(e) = res {
            tracing::error!(error = %e, "admin server failed");
        }
    })
}
