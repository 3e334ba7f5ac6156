//! `switchyard db`: database set-up.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;

use crate::cli::{exit, failure, runtime, usage, Exit};
use crate::db::args::{prepare, DbArgs};
use crate::db::{self, Engine};

#[derive(Subcommand)]
pub enum DbCommand {
    /// Create the declared tables (unique key, time index) and the pipeline's
    /// bookkeeping tables. Safe to run again.
    Init {
        /// Pipeline configuration (TOML); the embedded default when absent.
        #[arg(long, env = "SWITCHYARD_CONFIG")]
        config: Option<PathBuf>,
        #[command(flatten)]
        db: DbArgs,
    },
}

pub fn main(command: DbCommand) -> ExitCode {
    exit(match command {
        DbCommand::Init { config, db } => init(config, db),
    })
}

fn init(config: Option<PathBuf>, args: DbArgs) -> Exit {
    let rt = runtime()?;
    // The pool's maintenance task needs the runtime.
    let _enter = rt.enter();
    let (_, schema, url, pool) = prepare(config.as_deref(), &args, Engine::Postgres)?;
    rt.block_on(async move {
        let exit = |e: db::DbError| {
            let message = format!("db init {}: {e}", db::redact_url(&url));
            if e.is_config() {
                usage(message)
            } else {
                failure(message)
            }
        };
        pool.init(&schema).await.map_err(exit)?;
        // Tables that existed before are left as they are: say what in them
        // the roles would refuse (a key collation that is not exact).
        pool.check_tables(&schema, &url).await.map_err(exit)?;
        let tables: Vec<&str> = schema.tables().iter().map(|t| t.name.as_str()).collect();
        println!(
            "initialised {} ({}): {} and the bookkeeping tables",
            db::redact_url(&url),
            pool.engine(),
            tables.join(", ")
        );
        pool.close().await;
        Ok(ExitCode::SUCCESS)
    })
}
