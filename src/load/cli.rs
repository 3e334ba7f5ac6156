//! `switchyard load`: its command line and start-up.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use super::{LoadMetrics, LoadOptions, Replay};
use crate::cli::{exit, failure, metrics_or_exit, runtime, usage, Exit};
use crate::db::args::{prepare, serve, DbArgs};
use crate::db::{self, Engine};
use crate::kafka::args::KafkaArgs;

#[derive(Args)]
pub struct LoadArgs {
    /// Pipeline configuration (TOML); the embedded default when absent.
    #[arg(long, env = "SWITCHYARD_CONFIG")]
    config: Option<PathBuf>,
    /// Offline file folder (overrides offline.dir).
    #[arg(long, env = "SWITCHYARD_OFFLINE_DIR")]
    offline_dir: Option<PathBuf>,
    #[command(flatten)]
    db: DbArgs,
    /// Lines per transaction.
    #[arg(long, env = "SWITCHYARD_LOAD_BATCH_SIZE", default_value_t = 2000)]
    batch_size: usize,
    /// And at most this many bytes of lines per transaction (at least
    /// one): a batch's memory is bounded whatever the rows' size.
    #[arg(long, env = "SWITCHYARD_LOAD_BATCH_BYTES", default_value_t = 8 << 20)]
    batch_bytes: usize,
    /// Move loaded files here instead of deleting them.
    #[arg(long, env = "SWITCHYARD_LOAD_ARCHIVE_DIR")]
    archive_dir: Option<PathBuf>,
    /// This loader's name in the checkpoint table (default: the host name).
    /// Loaders that share one offline folder must share it; loaders of
    /// different folders must not, as their files may have the same names.
    #[arg(long, env = "SWITCHYARD_LOADER_ID")]
    loader_id: Option<String>,
    /// How often an idle loader looks for new files, in milliseconds.
    #[arg(long, env = "SWITCHYARD_LOAD_POLL_MS", default_value_t = 500)]
    poll_ms: u64,
    /// Exit once no closed file is left.
    #[arg(long)]
    once: bool,
    /// Load Kafka-fallback lines into the OLD database instead of replaying them to Kafka.
    #[arg(long)]
    no_replay: bool,
    #[command(flatten)]
    kafka: KafkaArgs,
    /// Kafka topic (overrides kafka.topic).
    #[arg(long, env = "SWITCHYARD_KAFKA_TOPIC")]
    kafka_topic: Option<String>,
    /// Admin address: /metrics, /healthz, /readyz.
    #[arg(
        long,
        env = "SWITCHYARD_ADMIN_LISTEN",
        default_value = "127.0.0.1:9095"
    )]
    admin_listen: SocketAddr,
    /// Progress line on stderr: auto (when a terminal), always, never.
    #[arg(long, default_value = "auto")]
    progress: String,
}

pub fn main(args: LoadArgs) -> ExitCode {
    exit(run(args))
}

fn run(args: LoadArgs) -> Exit {
    let kafka_extra = args.kafka.props()?;
    let rt = runtime()?;
    // The pool's maintenance task needs the runtime.
    let _enter = rt.enter();
    let (mut cfg, schema, url, pool) = prepare(args.config.as_deref(), &args.db, Engine::MySql)?;
    if let Some(d) = &args.offline_dir {
        cfg.offline.dir = d.clone();
    }
    if let Some(t) = &args.kafka_topic {
        cfg.kafka.topic = t.clone();
    }
    if args.batch_size == 0 {
        return Err(usage("--batch-size must be at least 1"));
    }
    if args.batch_bytes == 0 {
        return Err(usage("--batch-bytes must be at least 1"));
    }
    let progress = match args.progress.as_str() {
        "auto" => std::io::IsTerminal::is_terminal(&std::io::stderr()),
        "always" => true,
        "never" => false,
        other => {
            return Err(usage(format!(
                "--progress {other:?}: use auto, always or never"
            )))
        }
    };
    let opts = LoadOptions {
        loader_id: match args.loader_id.as_deref().map(str::trim) {
            Some("") => return Err(usage("--loader-id must not be empty")),
            Some(id) if id.len() > 128 => {
                return Err(usage("--loader-id is longer than 128 bytes"))
            }
            Some(id) => id.to_string(),
            None => super::host_name(),
        },
        dir: cfg.offline.dir.clone(),
        batch_size: args.batch_size,
        batch_bytes: args.batch_bytes,
        archive_dir: args.archive_dir.clone(),
        poll: std::time::Duration::from_millis(args.poll_ms.max(10)),
        once: args.once,
        progress,
    };
    rt.block_on(async {
        let registry = prometheus::Registry::new();
        let metrics = metrics_or_exit(LoadMetrics::new(&registry))?;
        let replay = if args.no_replay {
            tracing::warn!("--no-replay: Kafka fallback lines load into OLD only and never reach NEW (counted in switchyard_load_replay_skipped_total)");
            None
        } else {
            let r = Replay::new(&args.kafka.kafka_brokers, &cfg.kafka, &kafka_extra, &metrics)
                .map_err(usage)?;
            Some(r)
        };
        serve(args.admin_listen, registry, &pool, &url, &schema, |health, shutdown| {
            health.ready();
            async {
            tracing::info!(dir = %opts.dir.display(), loader_id = %opts.loader_id, db = %db::redact_url(&url), batch_size = opts.batch_size, "loader started");
            match super::run(opts, &schema, &pool, replay, metrics, shutdown).await {
                Ok(s) => {
                    tracing::info!(files = s.files, lines = s.lines, inserted = s.inserted, duplicates = s.duplicates, conflicts = s.conflicts, replayed = s.replayed, dead_letters = s.dead_letters, "loader stopped");
                    Ok(ExitCode::SUCCESS)
                }
                Err(super::LoadError::Db(e)) if e.is_config() => Err(usage(format!("load: {e}"))),
                Err(e) => Err(failure(format!("load: {e}"))),
            }
            }
        })
        .await
    })
}
