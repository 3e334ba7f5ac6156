//! `switchyard backfill`: its command line and start-up.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, ValueEnum};
use tokio_util::sync::CancellationToken;

use super::{BackfillMetrics, BackfillOptions, BackfillSummary, ProgressMode};
use crate::admin::{self, Health};
use crate::cli::{config, exit, failure, metrics_or_exit, runtime, secs, usage, AdminPort, Exit};
use crate::db::args::{wait_databases, OldNewDbArgs};
use crate::db::keyset::TimeRange;
use crate::db::{redact_url, Db};

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Progress {
    /// A bar when standard error is a terminal, log lines otherwise.
    Auto,
    /// A progress bar on standard error.
    Bar,
    /// Log lines (`--log-every-secs`).
    Log,
}

#[derive(Args)]
pub struct BackfillArgs {
    /// Pipeline configuration (TOML); the embedded default when absent.
    #[arg(long, env = "SWITCHYARD_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    dbs: OldNewDbArgs,
    /// The declared table to copy.
    #[arg(long, env = "SWITCHYARD_BACKFILL_TABLE")]
    table: String,
    /// First time value (inclusive, the time column's units: seconds); the
    /// table's first row when absent.
    #[arg(long, env = "SWITCHYARD_BACKFILL_FROM", allow_negative_numbers = true)]
    from: Option<i64>,
    /// Last time value (exclusive); past the table's last row when absent.
    /// Pick the start of dual-writing: later rows reach NEW by ingest.
    #[arg(long, env = "SWITCHYARD_BACKFILL_TO", allow_negative_numbers = true)]
    to: Option<i64>,
    /// Rows per chunk: one keyset read of OLD, one transaction in NEW.
    #[arg(long, env = "SWITCHYARD_BACKFILL_CHUNK_ROWS", default_value_t = 5000)]
    chunk_rows: usize,
    /// And at most this many bytes of row data per chunk (at least one row).
    #[arg(long, env = "SWITCHYARD_BACKFILL_CHUNK_BYTES", default_value_t = 8 << 20)]
    chunk_bytes: usize,
    /// Rows per second, at most, so live ingest keeps NEW's capacity (unlimited when absent).
    #[arg(long, env = "SWITCHYARD_BACKFILL_MAX_ROWS_PER_SEC")]
    max_rows_per_sec: Option<f64>,
    /// Replace rows NEW holds under the same key with other content (by
    /// default they are reported and kept).
    #[arg(long, env = "SWITCHYARD_BACKFILL_OVERWRITE")]
    overwrite: bool,
    /// Forget this table and range's checkpoint and start from its first key
    /// (rows already copied are skipped as duplicates).
    #[arg(long)]
    restart: bool,
    /// Conflicting keys named in the log and the summary, at most.
    #[arg(long, default_value_t = 100)]
    max_conflict_keys: usize,
    /// On PostgreSQL, write with multi-row INSERTs instead of COPY through a
    /// staging table (for comparison; COPY is faster).
    #[arg(long)]
    no_copy: bool,
    /// How progress is shown.
    #[arg(long, value_enum, default_value_t = Progress::Auto)]
    progress: Progress,
    /// With log progress: a line this often, in seconds.
    #[arg(long, default_value_t = 10.0)]
    log_every_secs: f64,
    /// Admin address: /metrics, /healthz, /readyz.
    #[arg(
        long,
        env = "SWITCHYARD_ADMIN_LISTEN",
        default_value = "127.0.0.1:9098"
    )]
    admin_listen: SocketAddr,
}

pub fn main(args: BackfillArgs) -> ExitCode {
    exit(run(args))
}

/// The options, or the usage error (exit 2) of the first bad argument.
fn options(args: &BackfillArgs) -> Result<BackfillOptions, ExitCode> {
    if let (Some(f), Some(t)) = (args.from, args.to) {
        if f >= t {
            return Err(usage("--from must be below --to"));
        }
    }
    if args.chunk_rows == 0 {
        return Err(usage("--chunk-rows must be at least 1"));
    }
    if args.chunk_bytes == 0 {
        return Err(usage("--chunk-bytes must be at least 1"));
    }
    if let Some(r) = args.max_rows_per_sec {
        if !(r.is_finite() && r > 0.0) {
            return Err(usage("--max-rows-per-sec must be a positive number"));
        }
    }
    Ok(BackfillOptions {
        table: args.table.clone(),
        range: TimeRange {
            from: args.from,
            to: args.to,
        },
        chunk_rows: args.chunk_rows,
        chunk_bytes: args.chunk_bytes,
        max_rows_per_sec: args.max_rows_per_sec,
        overwrite: args.overwrite,
        restart: args.restart,
        max_conflict_keys: args.max_conflict_keys,
        progress: match args.progress {
            Progress::Auto => ProgressMode::auto(),
            Progress::Bar => ProgressMode::Bar,
            Progress::Log => ProgressMode::Log,
        },
        log_every: secs("log-every-secs", args.log_every_secs)?.max(Duration::from_millis(100)),
        copy: !args.no_copy,
    })
}

fn run(args: BackfillArgs) -> Exit {
    let rt = runtime()?;
    // The pools' maintenance tasks need the runtime.
    let _enter = rt.enter();
    let cfg = config(args.config.as_deref())?;
    let schema = cfg.schema().map_err(|e| usage(format!("schema: {e}")))?;
    let opts = options(&args)?;
    if schema.table(&opts.table).is_none() {
        let declared: Vec<&str> = schema.tables().iter().map(|t| t.name.as_str()).collect();
        return Err(usage(format!(
            "--table {:?} is not declared in the configuration (declared: {})",
            opts.table,
            declared.join(", ")
        )));
    }
    let (old, old_url, new, new_url) = args.dbs.connect(2)?;
    rt.block_on(async move {
        let registry = prometheus::Registry::new();
        let metrics = metrics_or_exit(BackfillMetrics::new(&registry))?;
        let health = Health::starting("waiting for the databases");
        let admin_port =
            AdminPort::start(args.admin_listen, admin::router(registry, health.clone())).await?;
        let shutdown = CancellationToken::new();
        crate::shutdown::cancel_on_signal(shutdown.clone());
        let res = work(
            &opts,
            &schema,
            (&old, &old_url),
            (&new, &new_url),
            metrics,
            health,
            shutdown,
        )
        .await;
        admin_port.finish().await;
        old.close().await;
        new.close().await;
        res
    })
}

async fn work(
    opts: &BackfillOptions,
    schema: &crate::schema::Schema,
    (old, old_url): (&Db, &str),
    (new, new_url): (&Db, &str),
    metrics: BackfillMetrics,
    health: Health,
    shutdown: CancellationToken,
) -> Exit {
    let dbs = [(old, old_url), (new, new_url)];
    if !wait_databases(&dbs, schema, &shutdown).await? {
        return Err(failure(
            "backfill: stopped before the databases were reachable",
        ));
    }
    match new.check_backfill_table(new_url).await {
        Ok(()) => {}
        Err(e) if e.is_config() => return Err(usage(format!("backfill: {e}"))),
        // Unreachable again: the run's own retries take it from here.
        Err(_) => {}
    }
    health.ready();
    match super::run(opts, schema, old, new, metrics, shutdown).await {
        Ok(s) => {
            report(opts, &s, redact_url(new_url));
            if s.done {
                Ok(ExitCode::SUCCESS)
            } else {
                Err(failure(format!(
                    "backfill of {} {} stopped before its end; run it again to resume",
                    opts.table, opts.range
                )))
            }
        }
        Err(e) if e.is_config() => Err(usage(format!("backfill: {e}"))),
        Err(e) => Err(failure(format!("backfill: {e}"))),
    }
}

/// The summary on standard output: what this run did, the range's totals,
/// and the conflicting keys.
fn report(opts: &BackfillOptions, s: &BackfillSummary, new: String) {
    let c = &s.checkpoint;
    if s.already_done {
        println!(
            "backfill {} {} into {new}: already done by an earlier run, nothing to do \
             ({} copied, {} duplicates, {} conflicts kept, {} overwritten, {} rejected); \
             --restart copies it again",
            opts.table, opts.range, c.copied, c.duplicates, c.conflicts, c.overwritten, c.rejected
        );
        return;
    }
    println!(
        "backfill {} {} into {new}: {}; this run read {} rows: {} inserted, {} duplicates, \
         {} conflicts ({} overwritten), {} rejected; the range in all: {} copied, {} duplicates, \
         {} conflicts kept, {} overwritten, {} rejected",
        opts.table,
        opts.range,
        if s.done { "done" } else { "not finished" },
        s.read,
        s.inserted,
        s.duplicates,
        s.conflicts,
        s.overwritten,
        s.rejected,
        c.copied,
        c.duplicates,
        c.conflicts,
        c.overwritten,
        c.rejected
    );
    if !s.conflict_keys.is_empty() {
        let what = if opts.overwrite {
            "overwritten with OLD's version"
        } else {
            "kept as NEW holds them; --overwrite replaces them"
        };
        println!("keys NEW holds with other content ({what}):");
        for k in &s.conflict_keys {
            println!("  {}", crate::db::short(k));
        }
        if s.conflicts as usize > s.conflict_keys.len() {
            println!(
                "  … and {} more",
                s.conflicts as usize - s.conflict_keys.len()
            );
        }
    }
}
