//! Start-up glue every role's command line shares: the runtime, usage
//! errors (exit 2), metric registration, duration flags and the admin port.
//! Each role's own arguments and start-up live in its folder (`route/cli.rs`, …).

use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;

use tokio_util::sync::CancellationToken;

use crate::admin;
use crate::config::PipelineConfig;

/// A role's start-up and run: `Err` is an early exit whose message was
/// printed, so every step can end it with `?`.
pub type Exit = Result<ExitCode, ExitCode>;

/// The process exit code of a role's [`Exit`].
pub fn exit(r: Exit) -> ExitCode {
    r.unwrap_or_else(|code| code)
}

/// Prints a usage or configuration error and gives its exit code (2).
pub fn usage(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("switchyard: {message}");
    ExitCode::from(2)
}

/// Prints a run-time failure and gives its exit code (1).
pub fn failure(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("switchyard: {message}");
    ExitCode::FAILURE
}

/// A secret from a file, as Kubernetes mounts one: the content without its
/// trailing line break. An error names the flag and the path, never content.
pub fn secret_file(flag: &str, path: &Path) -> Result<String, ExitCode> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(s.trim_end_matches(['\n', '\r']).to_string()),
        Err(e) => Err(usage(format!("--{flag} {}: {e}", path.display()))),
    }
}

/// The pipeline configuration (`--config`, else the embedded default).
pub fn config(path: Option<&Path>) -> Result<PipelineConfig, ExitCode> {
    PipelineConfig::load(path).map_err(|e| usage(format!("configuration: {e}")))
}

pub fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| failure(format!("cannot start the runtime: {e}")))
}

pub fn secs(name: &str, v: f64) -> Result<std::time::Duration, ExitCode> {
    if v.is_finite() && (0.0..=30.0 * 86400.0).contains(&v) {
        Ok(std::time::Duration::from_secs_f64(v))
    } else {
        Err(usage(format!("--{name} must be between 0 and 30 days")))
    }
}

/// Binds a listening address (ingest or admin).
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, ExitCode> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| failure(format!("cannot listen on {addr}: {e}")))
}

/// A role's admin port (/metrics, /healthz, /readyz and the role's own
/// routes), served until [`AdminPort::finish`].
pub struct AdminPort {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl AdminPort {
    pub async fn start(addr: SocketAddr, router: axum::Router) -> Result<AdminPort, ExitCode> {
        let listener = bind(addr).await?;
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
    m.map_err(|e| failure(format!("metrics: {e}")))
}
