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
    /// Compare the declared tables with the database: columns missing, of
    /// another type, or undeclared and NOT NULL. Prints each with what to
    /// run; exits 1 when anything differs.
    Migrate {
        /// Pipeline configuration (TOML); the embedded default when absent.
        #[arg(long, env = "SWITCHYARD_CONFIG")]
        config: Option<PathBuf>,
        #[command(flatten)]
        db: DbArgs,
        /// Add the missing columns (nullable: the rows already there have
        /// no value for them). Type changes are reported, never applied.
        #[arg(long)]
        apply: bool,
    },
}

pub fn main(command: DbCommand) -> ExitCode {
    exit(match command {
        DbCommand::Init { config, db } => init(config, db),
        DbCommand::Migrate { config, db, apply } => migrate(config, db, apply),
    })
}

/// A database error of `db <verb>` as its exit: 2 for configuration.
fn exit_of(verb: &str, url: &str, e: db::DbError) -> ExitCode {
    let message = format!("db {verb} {}: {e}", db::redact_url(url));
    if e.is_config() {
        usage(message)
    } else {
        failure(message)
    }
}

fn migrate(config: Option<PathBuf>, args: DbArgs, apply: bool) -> Exit {
    let rt = runtime()?;
    let _enter = rt.enter();
    let (_, schema, url, pool) = prepare(config.as_deref(), &args, Engine::Postgres)?;
    rt.block_on(async move {
        let exit = |e| exit_of("migrate", &url, e);
        if apply {
            for s in pool.add_missing_columns(&schema).await.map_err(exit)? {
                println!("applied: {s}");
            }
        }
        let drift = pool.drift(&schema).await.map_err(exit)?;
        pool.close().await;
        if drift.is_empty() {
            println!(
                "{} ({}): the tables match the configuration",
                db::redact_url(&url),
                pool.engine()
            );
            return Ok(ExitCode::SUCCESS);
        }
        for (table, d) in &drift {
            println!("table {table}: {d}");
        }
        Ok(ExitCode::FAILURE)
    })
}

fn init(config: Option<PathBuf>, args: DbArgs) -> Exit {
    let rt = runtime()?;
    // The pool's maintenance task needs the runtime.
    let _enter = rt.enter();
    let (_, schema, url, pool) = prepare(config.as_deref(), &args, Engine::Postgres)?;
    rt.block_on(async move {
        let exit = |e| exit_of("init", &url, e);
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
