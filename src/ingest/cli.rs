//! `switchyard ingest`: its command line and start-up.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use tokio_util::sync::CancellationToken;

use super::{IngestMetrics, IngestOptions};
use crate::admin::{self, Health};
use crate::cli::{metrics_or_exit, runtime, AdminPort};
use crate::db::args::{prepare, wait_databases, DbArgs};
use crate::db::Engine;
use crate::kafka::args::KafkaArgs;

#[derive(Args)]
pub struct IngestArgs {
    /// Pipeline configuration (TOML); the embedded default when absent.
    #[arg(long, env = "SWITCHYARD_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    kafka: KafkaArgs,
    /// Topics to consume, comma-separated (default: kafka.topic).
    #[arg(long, env = "SWITCHYARD_KAFKA_TOPICS", value_delimiter = ',')]
    kafka_topics: Vec<String>,
    /// Consumer group.
    #[arg(
        long,
        env = "SWITCHYARD_KAFKA_GROUP",
        default_value = "switchyard-ingest"
    )]
    kafka_group: String,
    #[command(flatten)]
    db: DbArgs,
    /// The longest a partial batch waits for more messages, in seconds (e.g. 0.15).
    #[arg(long, env = "SWITCHYARD_CONSUMER_TIMEOUT", default_value_t = 0.15)]
    consumer_timeout: f64,
    /// Messages per transaction.
    #[arg(long, env = "SWITCHYARD_INGEST_BATCH_SIZE", default_value_t = 2000)]
    batch_size: usize,
    /// Exit once caught up and idle this many seconds (backfills, benchmarks).
    #[arg(long)]
    idle_exit: Option<f64>,
    /// Admin address: /metrics, /healthz, /readyz.
    #[arg(
        long,
        env = "SWITCHYARD_ADMIN_LISTEN",
        default_value = "127.0.0.1:9091"
    )]
    admin_listen: SocketAddr,
}

pub fn main(args: IngestArgs) -> ExitCode {
    let kafka_extra = match args.kafka.props() {
        Ok(p) => p,
        Err(code) => return code,
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    // The pool's maintenance task needs the runtime.
    let _enter = rt.enter();
    let (cfg, schema, url, pool) = match prepare(args.config.as_deref(), &args.db, Engine::Postgres)
    {
        Ok(p) => p,
        Err(code) => return code,
    };
    if !(args.consumer_timeout > 0.0 && args.consumer_timeout <= 3600.0) {
        eprintln!("switchyard: --consumer-timeout must be between 0 and 3600 seconds");
        return ExitCode::from(2);
    }
    if args.batch_size == 0 {
        eprintln!("switchyard: --batch-size must be at least 1");
        return ExitCode::from(2);
    }
    let topics = if args.kafka_topics.is_empty() {
        vec![cfg.kafka.topic.clone()]
    } else {
        args.kafka_topics.clone()
    };
    let opts = IngestOptions {
        brokers: args.kafka.kafka_brokers.clone(),
        topics,
        group: args.kafka_group.clone(),
        batch_size: args.batch_size,
        consumer_timeout: std::time::Duration::from_secs_f64(args.consumer_timeout),
        extra: kafka_extra,
        idle_exit: args
            .idle_exit
            .map(|s| std::time::Duration::from_secs_f64(s.max(0.0))),
    };
    rt.block_on(async move {
        let registry = prometheus::Registry::new();
        let metrics = match metrics_or_exit(IngestMetrics::new(&registry)) {
            Ok(m) => m,
            Err(code) => return code,
        };
        let health = Health::starting("waiting for the database");
        let admin_port = match AdminPort::start(
            args.admin_listen,
            admin::router(registry, health.clone()),
        )
        .await
        {
            Ok(a) => a,
            Err(code) => return code,
        };
        let shutdown = CancellationToken::new();
        crate::shutdown::cancel_on_signal(shutdown.clone());
        let code = match wait_databases(&[(&pool, &url)], &schema, &shutdown).await {
            Err(code) => code,
            Ok(false) => ExitCode::SUCCESS,
            Ok(true) => match super::run(opts, &schema, &pool, metrics, health, shutdown).await {
                Ok(s) => {
                    tracing::info!(
                        messages = s.messages,
                        inserted = s.inserted,
                        duplicates = s.duplicates,
                        dead_letters = s.dead_letters,
                        batches = s.batches,
                        "ingest consumer stopped"
                    );
                    ExitCode::SUCCESS
                }
                Err(
                    e @ (super::IngestError::TopicMissing { .. } | super::IngestError::Config(_)),
                ) => {
                    eprintln!("switchyard: ingest: {e}");
                    ExitCode::from(2)
                }
                Err(e) => {
                    eprintln!("switchyard: ingest: {e}");
                    ExitCode::FAILURE
                }
            },
        };
        admin_port.finish().await;
        pool.close().await;
        code
    })
}
