//! `switchyard compare`: its command line and start-up.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use tokio_util::sync::CancellationToken;

use super::group::GroupOptions;
use super::state::Status;
use super::{Comparator, CompareError, CompareMetrics, CompareOptions};
use crate::admin::{self, Health};
use crate::cli::{config, exit, failure, metrics_or_exit, runtime, secs, usage, AdminPort, Exit};
use crate::db::args::{wait_databases, OldNewDbArgs};
use crate::kafka::args::KafkaArgs;

#[derive(Args)]
pub struct CompareArgs {
    /// Pipeline configuration (TOML); the embedded default when absent.
    #[arg(long, env = "SWITCHYARD_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    kafka: KafkaArgs,
    /// Topic (overrides kafka.topic).
    #[arg(long, env = "SWITCHYARD_KAFKA_TOPIC")]
    kafka_topic: Option<String>,
    /// Group id of the comparator's own consumer (it never commits offsets).
    #[arg(
        long,
        env = "SWITCHYARD_COMPARE_GROUP",
        default_value = "switchyard-compare"
    )]
    kafka_group: String,
    #[command(flatten)]
    dbs: OldNewDbArgs,
    /// Window width, in units of the time column (seconds).
    #[arg(long, default_value_t = 60)]
    window_secs: i64,
    /// Check a window this long after its end and its last row (the loaders lag).
    #[arg(long, default_value_t = 30.0)]
    settle_secs: f64,
    /// Missing rows are pending this long, then a mismatch.
    #[arg(long, default_value_t = 300.0)]
    max_lateness_secs: f64,
    /// Check a judged window again this often (finds rows deleted later).
    #[arg(long, default_value_t = 60.0)]
    recheck_secs: f64,
    /// How often due windows are looked for.
    #[arg(long, default_value_t = 5.0)]
    check_interval_secs: f64,
    /// Forget windows whose last row is older than this.
    #[arg(long, default_value_t = 3600.0)]
    retain_secs: f64,
    /// Missing ids listed per window and database.
    #[arg(long, default_value_t = 100)]
    max_ids: usize,
    /// Admin address: /metrics, /healthz, /readyz, /parity.
    #[arg(
        long,
        env = "SWITCHYARD_ADMIN_LISTEN",
        default_value = "127.0.0.1:9096"
    )]
    admin_listen: SocketAddr,
    /// Share the topic with other comparators of the same --kafka-group:
    /// the group splits the partitions, each member writes its partial
    /// reports to bookkeeping tables in NEW (`switchyard db init` creates
    /// them) and serves the combined verdict on /parity.
    #[arg(
        long,
        env = "SWITCHYARD_COMPARE_SCALE_OUT",
        conflicts_with = "one_shot"
    )]
    scale_out: bool,
    /// With --scale-out: this member's name, unique in the group (default:
    /// host name and process id).
    #[arg(long, env = "SWITCHYARD_COMPARE_INSTANCE", requires = "scale_out")]
    instance_id: Option<String>,
    /// With --scale-out: a member silent this long no longer counts; at
    /// least three check intervals.
    #[arg(long, default_value_t = 30.0, requires = "scale_out")]
    member_timeout_secs: f64,
    /// Read the topic to its end, check [--from, --to) now, print, exit (1 on a mismatch).
    #[arg(long, group = "one_shot")]
    once: bool,
    /// Verify one table between OLD and NEW over a key and/or time range
    /// without the stream (no Kafka), print, exit (0 equal, 1 differs, 3 a
    /// database failed).
    #[arg(long, group = "one_shot", requires = "table")]
    range: bool,
    /// With --range: the table to verify.
    #[arg(long, requires = "range")]
    table: Option<String>,
    /// With --range: first key (inclusive).
    #[arg(long, requires = "range")]
    key_from: Option<String>,
    /// With --range: last key (exclusive).
    #[arg(long, requires = "range")]
    key_to: Option<String>,
    /// With --range: segments checksummed at once on each side (each is one
    /// query, on one core of the database server).
    #[arg(long, default_value_t = 2, requires = "range")]
    concurrency: usize,
    /// With --once or --range: first time value (inclusive, time column units).
    #[arg(long, requires = "one_shot")]
    from: Option<i64>,
    /// With --once or --range: last time value (exclusive).
    #[arg(long, requires = "one_shot")]
    to: Option<i64>,
    /// With --once or --range: print the report as JSON instead of a table.
    #[arg(long, requires = "one_shot")]
    json: bool,
}

pub fn main(args: CompareArgs) -> ExitCode {
    exit(run(args))
}

fn run(args: CompareArgs) -> Exit {
    let rt = runtime()?;
    // The pools' maintenance tasks need the runtime.
    let _enter = rt.enter();
    if args.range {
        return run_range(&rt, &args);
    }
    let kafka_extra = args.kafka.props()?;
    let cfg = config(args.config.as_deref())?;
    let schema = cfg.schema().map_err(|e| usage(format!("schema: {e}")))?;
    let (old, old_url, new, new_url) = args.dbs.connect(4)?;
    if args.window_secs <= 0 {
        return Err(usage("--window-secs must be positive"));
    }
    let opts = CompareOptions {
        brokers: args.kafka.kafka_brokers.clone(),
        topic: args.kafka_topic.clone().unwrap_or(cfg.kafka.topic.clone()),
        group: args.kafka_group.clone(),
        extra: kafka_extra,
        window_secs: args.window_secs,
        settle: secs("settle-secs", args.settle_secs)?,
        max_lateness: secs("max-lateness-secs", args.max_lateness_secs)?,
        recheck: secs("recheck-secs", args.recheck_secs)?,
        check_interval: secs("check-interval-secs", args.check_interval_secs.max(0.05))?,
        retain: secs("retain-secs", args.retain_secs)?,
        max_ids: args.max_ids,
    };
    let group = if args.scale_out {
        let member_timeout = secs("member-timeout-secs", args.member_timeout_secs)?;
        if member_timeout < opts.check_interval * 3 {
            return Err(usage(
                "--member-timeout-secs must be at least three --check-interval-secs",
            ));
        }
        if opts
            .extra
            .iter()
            .any(|(k, v)| k == "partition.assignment.strategy" && v.contains("cooperative"))
        {
            return Err(usage(
                "--scale-out needs the eager rebalance protocol: partition.assignment.strategy must not be cooperative-sticky",
            ));
        }
        if args.kafka_group.len() > 191 {
            return Err(usage(
                "--kafka-group must be at most 191 bytes with --scale-out (it keys the bookkeeping tables)",
            ));
        }
        let instance = match args.instance_id.clone() {
            Some(i) if i.trim().is_empty() || i.len() > 191 => {
                return Err(usage("--instance-id must be 1 to 191 bytes"))
            }
            Some(i) => i,
            None => default_instance(),
        };
        Some(GroupOptions {
            instance,
            member_timeout,
        })
    } else {
        None
    };
    rt.block_on(async move {
        let registry = prometheus::Registry::new();
        let metrics = metrics_or_exit(CompareMetrics::new(&registry))?;
        let shutdown = CancellationToken::new();
        crate::shutdown::cancel_on_signal(shutdown.clone());
        let dbs = [(&old, old_url.as_str()), (&new, new_url.as_str())];
        if !wait_databases(&dbs, &schema, &shutdown).await? {
            return Ok(ExitCode::SUCCESS);
        }
        if group.is_some() {
            new.check_compare_tables(&new_url).await.map_err(|e| {
                if e.is_config() {
                    usage(format!("compare --scale-out: {e}"))
                } else {
                    failure(format!("compare --scale-out: {e}"))
                }
            })?;
        }
        let cmp = Comparator::new(schema, old, new, opts, metrics);
        if args.once {
            let from = args.from.unwrap_or(i64::MIN);
            let to = args.to.unwrap_or(i64::MAX);
            let p = cmp.once(from, to).await.map_err(|e| {
                if is_config(&e) {
                    usage(format!("compare: {e}"))
                } else {
                    eprintln!("switchyard: compare: {e}");
                    ExitCode::from(3)
                }
            })?;
            if args.json {
                match serde_json::to_string_pretty(&p) {
                    Ok(j) => println!("{j}"),
                    Err(e) => eprintln!("switchyard: {e}"),
                }
            } else {
                print!("{}", p.table());
            }
            return Ok(match p.status {
                Status::Mismatch | Status::Pending => ExitCode::FAILURE,
                Status::Ok | Status::Open => ExitCode::SUCCESS,
            });
        }
        let router =
            admin::router(registry, Health::default()).merge(super::parity_router(cmp.clone()));
        let admin_port = AdminPort::start(args.admin_listen, router).await?;
        let ran = match group {
            Some(g) => cmp.run_in_group(shutdown, g).await,
            None => cmp.run(shutdown).await,
        };
        let res = match ran {
            Ok(()) => Ok(ExitCode::SUCCESS),
            Err(e) if is_config(&e) => Err(usage(format!("compare: {e}"))),
            Err(e) => Err(failure(format!("compare: {e}"))),
        };
        admin_port.finish().await;
        res
    })
}

/// `compare --range`: the databases only, no Kafka.
fn run_range(rt: &tokio::runtime::Runtime, args: &CompareArgs) -> Exit {
    let cfg = config(args.config.as_deref())?;
    let schema = cfg.schema().map_err(|e| usage(format!("schema: {e}")))?;
    let (old, old_url, new, new_url) = args.dbs.connect(4)?;
    let req = super::range::RangeRequest {
        table: args.table.clone().unwrap_or_default(),
        key_from: args.key_from.clone(),
        key_to: args.key_to.clone(),
        from: args.from,
        to: args.to,
        tuning: super::range::Tuning {
            max_ids: args.max_ids,
            concurrency: args.concurrency.clamp(1, 64),
            ..super::range::Tuning::default()
        },
    };
    rt.block_on(async move {
        let shutdown = CancellationToken::new();
        crate::shutdown::cancel_on_signal(shutdown.clone());
        let dbs = [(&old, old_url.as_str()), (&new, new_url.as_str())];
        if !wait_databases(&dbs, &schema, &shutdown).await? {
            return Ok(ExitCode::SUCCESS);
        }
        tokio::select! {
            res = super::range::main(&schema, &old, &new, &req, args.json) => res,
            _ = shutdown.cancelled() => {
                // Not 1: an interrupted comparison found no difference.
                eprintln!("switchyard: compare --range: interrupted; nothing verified");
                Err(ExitCode::from(3))
            }
        }
    })
}

/// The host name (a pod's name) and the process id.
fn default_instance() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "compare".to_string());
    let mut id = format!("{host}-{}", std::process::id());
    id.truncate(191);
    id
}

/// Errors that exit 2: a topic that cannot be read, a refused TLS or SASL
/// handshake, a consumer or database configuration to fix.
fn is_config(e: &CompareError) -> bool {
    match e {
        CompareError::Topic { .. } | CompareError::Config(_) | CompareError::Refused { .. } => true,
        CompareError::Db(e) => e.is_config(),
    }
}
