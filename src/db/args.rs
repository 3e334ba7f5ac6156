//! Where the database is (a URL, or the seed's separate flags), and the
//! start-up steps of every role that writes to or reads from one.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;
use tokio_util::sync::CancellationToken;

use super::{Db, Engine};
use crate::admin::{self, Health};
use crate::cli::{usage, AdminPort, Exit};
use crate::config::PipelineConfig;
use crate::schema::Schema;

/// Both databases, for the roles that read OLD and NEW (compare, backfill).
#[derive(Args, Clone)]
pub struct OldNewDbArgs {
    /// The OLD database URL.
    #[arg(long, env = "SWITCHYARD_OLD_DB_URL", hide_env_values = true)]
    pub old_db_url: String,
    /// The NEW database URL.
    #[arg(long, env = "SWITCHYARD_NEW_DB_URL", hide_env_values = true)]
    pub new_db_url: String,
    /// A file holding the OLD database's password (a mounted secret), for an
    /// --old-db-url without one.
    #[arg(long, env = "SWITCHYARD_OLD_DB_PASSWORD_FILE")]
    pub old_db_password_file: Option<PathBuf>,
    /// A file holding the NEW database's password, for a --new-db-url without one.
    #[arg(long, env = "SWITCHYARD_NEW_DB_PASSWORD_FILE")]
    pub new_db_password_file: Option<PathBuf>,
}

impl OldNewDbArgs {
    /// Both pools and their URLs, OLD then NEW (lazy pools: a database
    /// that is down is waited for by the caller), `pool` connections each; a
    /// bad URL or password file is a usage error.
    pub fn connect(&self, pool: u32) -> Result<(Db, String, Db, String), ExitCode> {
        let one =
            |url: &str, flag: &str, file: &Option<PathBuf>| -> Result<(Db, String), ExitCode> {
                let url = match file {
                    None => url.to_string(),
                    Some(path) => {
                        let password = crate::cli::secret_file(flag, path)?;
                        super::url_with_password(url, &password)
                            .map_err(|e| usage(format!("--{flag}: {e}")))?
                    }
                };
                let db = Db::connect(&url, pool).map_err(usage)?;
                Ok((db, url))
            };
        let (old, old_url) = one(
            &self.old_db_url,
            "old-db-password-file",
            &self.old_db_password_file,
        )?;
        let (new, new_url) = one(
            &self.new_db_url,
            "new-db-password-file",
            &self.new_db_password_file,
        )?;
        Ok((old, old_url, new, new_url))
    }
}

/// Where the database is: a URL, or the seed's separate flags.
#[derive(Args, Clone)]
pub struct DbArgs {
    /// Database URL: postgres://…, mysql://… (or mariadb://…), sqlite:FILE.
    #[arg(long, env = "SWITCHYARD_DB_URL", hide_env_values = true)]
    db_url: Option<String>,
    /// Engine for --db-host/--db-name: postgres, mysql or sqlite.
    #[arg(long, env = "SWITCHYARD_DB_ENGINE")]
    db_engine: Option<String>,
    /// Database host (instead of --db-url).
    #[arg(long, env = "SWITCHYARD_DB_HOST")]
    db_host: Option<String>,
    /// Database port (the engine's default when absent).
    #[arg(long, env = "SWITCHYARD_DB_PORT")]
    db_port: Option<u16>,
    /// Database user.
    #[arg(long, env = "SWITCHYARD_DB_USER")]
    db_user: Option<String>,
    /// Database password: prefer the environment variable (never logged).
    #[arg(long, env = "SWITCHYARD_DB_PASSWORD", hide_env_values = true)]
    db_password: Option<String>,
    /// A file holding the database password (a mounted secret), for
    /// --db-host/--db-user or a --db-url without a password.
    #[arg(
        long,
        env = "SWITCHYARD_DB_PASSWORD_FILE",
        conflicts_with = "db_password"
    )]
    db_password_file: Option<std::path::PathBuf>,
    /// Database name (with sqlite: the file).
    #[arg(long, env = "SWITCHYARD_DB_NAME")]
    db_name: Option<String>,
    /// Connections in the pool.
    #[arg(long, env = "SWITCHYARD_DB_POOL", default_value_t = 4)]
    db_pool: u32,
}

impl DbArgs {
    /// The password from --db-password or --db-password-file.
    fn password(&self) -> Result<Option<String>, ExitCode> {
        match &self.db_password_file {
            Some(path) => crate::cli::secret_file("db-password-file", path).map(Some),
            None => Ok(self.db_password.clone()),
        }
    }

    /// The URL, or the usage exit code with what is missing.
    pub fn url(&self, default_engine: Engine) -> Result<String, ExitCode> {
        let password = self.password()?;
        self.url_with(default_engine, password.as_deref())
            .map_err(usage)
    }

    fn url_with(&self, default_engine: Engine, password: Option<&str>) -> Result<String, String> {
        if let Some(u) = &self.db_url {
            return match password {
                None => Ok(u.clone()),
                Some(p) => super::url_with_password(u, p),
            };
        }
        let engine = match self.db_engine.as_deref() {
            None => default_engine,
            Some(e) => Engine::of_url(&format!("{e}:"))
                .ok_or_else(|| format!("--db-engine {e:?}: use postgres, mysql or sqlite"))?,
        };
        let name = self
            .db_name
            .as_deref()
            .ok_or("give --db-url, or --db-host and --db-name")?;
        let host = self.db_host.as_deref().unwrap_or("127.0.0.1");
        Ok(super::url_from_parts(
            engine,
            host,
            self.db_port,
            self.db_user.as_deref(),
            password,
            name,
        ))
    }
}

/// Configuration, schema and database pool, or the exit code of a usage error.
pub fn prepare(
    config: Option<&Path>,
    db: &DbArgs,
    default_engine: Engine,
) -> Result<(PipelineConfig, Schema, String, Db), ExitCode> {
    let cfg = crate::cli::config(config)?;
    let schema = cfg.schema().map_err(|e| usage(format!("schema: {e}")))?;
    let url = db.url(default_engine)?;
    if db.db_pool == 0 {
        return Err(usage("--db-pool must be at least 1"));
    }
    let pool = Db::connect(&url, db.db_pool).map_err(|e| usage(e.to_string()))?;
    Ok((cfg, schema, url, pool))
}

/// Waits until every database answers and holds its tables. Ok(false) when
/// shut down first; a missing table is a usage error (exit 2).
pub async fn wait_databases(
    dbs: &[(&Db, &str)],
    schema: &Schema,
    shutdown: &CancellationToken,
) -> Result<bool, ExitCode> {
    for (db, url) in dbs {
        match super::wait_ready(db, schema, url, shutdown).await {
            Ok(true) => {}
            Ok(false) => return Ok(false),
            Err(e @ super::DbError::Access(_)) => {
                return Err(usage(format!("{}: {e}", super::redact_url(url))))
            }
            Err(e) => return Err(usage(e)),
        }
    }
    Ok(true)
}

/// What every role that writes to a database does around its work: the
/// admin port answers at once (not ready), the database is waited for, then
/// `work` runs with the role's health and shutdown signal; the admin port
/// and the pool are closed whatever the outcome.
pub async fn serve<F, Fut>(
    admin_listen: SocketAddr,
    registry: prometheus::Registry,
    pool: &Db,
    url: &str,
    schema: &Schema,
    work: F,
) -> Exit
where
    F: FnOnce(Health, CancellationToken) -> Fut,
    Fut: Future<Output = Exit>,
{
    let health = Health::starting("waiting for the database");
    let admin_port =
        AdminPort::start(admin_listen, admin::router(registry, health.clone())).await?;
    let shutdown = CancellationToken::new();
    crate::shutdown::cancel_on_signal(shutdown.clone());
    let res = match wait_databases(&[(pool, url)], schema, &shutdown).await {
        Err(code) => Err(code),
        Ok(false) => Ok(ExitCode::SUCCESS),
        Ok(true) => work(health, shutdown).await,
    };
    admin_port.finish().await;
    pool.close().await;
    res
}
