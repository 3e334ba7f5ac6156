//! `switchyard ingest`: its command line and start-up.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use super::{IngestMetrics, IngestOptions};
use crate::cli::{exit, failure, metrics_or_exit, runtime, usage, Exit};
use crate::db::args::{prepare, serve, DbArgs};
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
    /// And at most this many bytes of payloads per transaction (at least
    /// one): a batch's memory is bounded whatever the rows' size.
    #[arg(long, env = "SWITCHYARD_INGEST_BATCH_BYTES", default_value_t = 8 << 20)]
    batch_bytes: usize,
    /// Exit once caught up and idle this many seconds (backfills, benchmarks).
    #[arg(long)]
    idle_exit: Option<f64>,
    /// Replay: before consuming, move the group's committed offsets back to
    /// `earliest`, an RFC 3339 time (the first message at or after it, by
    /// the broker's offsets-for-times lookup) or `partition:offset,…`
    /// (`topic:partition:offset` with several topics), then consume from
    /// there. Never moves a partition forward; refused while the group has
    /// active members. Prints each partition's offsets before and after.
    #[arg(long, value_name = "TIME|earliest|PARTITION:OFFSET,…")]
    rewind_to: Option<String>,
    /// With --rewind-to: move the offsets and exit without consuming (a
    /// one-off job while the group's consumers are stopped).
    #[arg(long, requires = "rewind_to")]
    rewind_only: bool,
    /// Admin address: /metrics, /healthz, /readyz.
    #[arg(
        long,
        env = "SWITCHYARD_ADMIN_LISTEN",
        default_value = "127.0.0.1:9091"
    )]
    admin_listen: SocketAddr,
}

pub fn main(args: IngestArgs) -> ExitCode {
    exit(run(args))
}

fn run(args: IngestArgs) -> Exit {
    let kafka_extra = args.kafka.props()?;
    let rt = runtime()?;
    // The pool's maintenance task needs the runtime.
    let _enter = rt.enter();
    let (cfg, schema, url, pool) = prepare(args.config.as_deref(), &args.db, Engine::Postgres)?;
    if !(args.consumer_timeout > 0.0 && args.consumer_timeout <= 3600.0) {
        return Err(usage(
            "--consumer-timeout must be between 0 and 3600 seconds",
        ));
    }
    if args.batch_size == 0 {
        return Err(usage("--batch-size must be at least 1"));
    }
    if args.batch_bytes == 0 {
        return Err(usage("--batch-bytes must be at least 1"));
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
        batch_bytes: args.batch_bytes,
        consumer_timeout: std::time::Duration::from_secs_f64(args.consumer_timeout),
        extra: kafka_extra,
        idle_exit: args
            .idle_exit
            .map(|s| std::time::Duration::from_secs_f64(s.max(0.0))),
    };
    if let Some(spec) = &args.rewind_to {
        let to = super::rewind::parse(spec).map_err(usage)?;
        match rt.block_on(super::rewind::rewind_group(&opts, &to)) {
            Ok(moves) => {
                for m in &moves {
                    println!("rewind {m}");
                    tracing::info!(topic = %m.topic, partition = m.partition, from = ?m.from,
                        to = m.to, kept = m.kept, group = %opts.group, "offsets rewound");
                }
            }
            Err(e) if e.is_config() => return Err(usage(format!("ingest: {e}"))),
            Err(e) => return Err(failure(format!("ingest: {e}"))),
        }
        if args.rewind_only {
            return Ok(ExitCode::SUCCESS);
        }
    }
    rt.block_on(async {
        let registry = prometheus::Registry::new();
        let metrics = metrics_or_exit(IngestMetrics::new(&registry))?;
        serve(
            args.admin_listen,
            registry,
            &pool,
            &url,
            &schema,
            |health, shutdown| async {
                match super::run(opts, &schema, &pool, metrics, health, shutdown).await {
                    Ok(s) => {
                        tracing::info!(
                            messages = s.messages,
                            inserted = s.inserted,
                            duplicates = s.duplicates,
                            dead_letters = s.dead_letters,
                            batches = s.batches,
                            "ingest consumer stopped"
                        );
                        Ok(ExitCode::SUCCESS)
                    }
                    Err(
                        e @ (super::IngestError::TopicMissing { .. }
                        | super::IngestError::Refused { .. }
                        | super::IngestError::Weakened(_)
                        | super::IngestError::Config(_)),
                    ) => Err(usage(format!("ingest: {e}"))),
                    Err(super::IngestError::Db(e)) if e.is_config() => {
                        Err(usage(format!("ingest: {e}")))
                    }
                    Err(e) => Err(failure(format!("ingest: {e}"))),
                }
            },
        )
        .await
    })
}
