//! Start-up glue every role's command line shares: the runtime, usage
//! errors (exit 2), metric registration, duration flags and the admin port.
//! Each role's own arguments and start-up live in its folder (`route/cli.rs`, …).

use std::net::SocketAddr;
use std::process::ExitCode;

use tokio_util::sync::CancellationToken;

use crate::admin;

/// Prints a usage or configuration error and gives its exit code (2).
pub fn usage(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("switchyard: {message}");
    ExitCode::from(2)
}

pub fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("switchyard: cannot start the runtime: {e}");
            ExitCode::FAILURE
        })
}

pub fn secs(name: &str, v: f64) -> Result<std::time::Duration, ExitCode> {
    if v.is_finite() && (0.0..=30.0 * 86400.0).contains(&v) {
        Ok(std::time::Duration::from_secs_f64(v))
    } else {
        eprintln!("switchyard: --{name} must be between 0 and 30 days");
        Err(ExitCode::from(2))
    }
}

pub async fn bind_admin(addr: SocketAddr) -> Result<tokio::net::TcpListener, ExitCode> {
    tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        eprintln!("switchyard: cannot listen on {addr}: {e}");
        ExitCode::FAILURE
    })
}

/// A role's admin port (/metrics, /healthz, /readyz and the role's own
/// routes), served until [`AdminPort::finish`].
pub struct AdminPort {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl AdminPort {
    pub async fn start(addr: SocketAddr, router: axum::Router) -> Result<AdminPort, ExitCode> {
        let listener = bind_admin(addr).await?;
        let stop = CancellationToken::new();
        let task = admin::spawn(listener, router, stop.clone());
        Ok(AdminPort { stop, task })
    }

    pub async fn finish(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// The role's metric families, or the exit code if they cannot be registered.
pub fn metrics_or_exit<T>(m: prometheus::Result<T>) -> Result<T, ExitCode> {
    m.map_err(|e| {
        eprintln!("switchyard: metrics: {e}");
        ExitCode::FAILURE
    })
}
