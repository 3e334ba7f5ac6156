//! `switchyard route`: its command line and start-up.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use tokio_util::sync::CancellationToken;

use super::{RouteOptions, StartError};
use crate::cli::{bind, config, exit, failure, runtime, usage, Exit};
use crate::flags::LaunchDarklyOptions;
use crate::kafka::args::KafkaArgs;

#[derive(Args)]
pub struct RouteArgs {
    /// Pipeline configuration (TOML); the embedded default when absent.
    #[arg(long, env = "SWITCHYARD_CONFIG")]
    config: Option<PathBuf>,
    /// Ingest API address.
    #[arg(long, env = "SWITCHYARD_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Admin address: /metrics, /healthz, /readyz.
    #[arg(
        long,
        env = "SWITCHYARD_ADMIN_LISTEN",
        default_value = "127.0.0.1:9090"
    )]
    admin_listen: SocketAddr,
    #[command(flatten)]
    kafka: KafkaArgs,
    /// Kafka topic (overrides kafka.topic).
    #[arg(long, env = "SWITCHYARD_KAFKA_TOPIC")]
    kafka_topic: Option<String>,
    /// Offline file folder (overrides offline.dir).
    #[arg(long, env = "SWITCHYARD_OFFLINE_DIR")]
    offline_dir: Option<PathBuf>,
    /// Local flags folder (overrides flags.dir).
    #[arg(long, env = "SWITCHYARD_FLAGS_DIR")]
    flags_dir: Option<PathBuf>,
    /// LaunchDarkly server-side SDK key: flags come from LaunchDarkly's
    /// streaming service instead of the local folder (never logged).
    #[arg(long, env = "LD_SDK_KEY", hide_env_values = true)]
    ld_sdk_key: Option<String>,
    /// A file holding the LaunchDarkly SDK key (a mounted secret).
    #[arg(long, env = "LD_SDK_KEY_FILE", conflicts_with = "ld_sdk_key")]
    ld_sdk_key_file: Option<PathBuf>,
    /// LaunchDarkly streaming URI (a Relay Proxy or a private instance).
    #[arg(long, env = "LD_STREAM_URI")]
    ld_stream_uri: Option<String>,
    /// LaunchDarkly base (polling) URI.
    #[arg(long, env = "LD_BASE_URI")]
    ld_base_uri: Option<String>,
    /// LaunchDarkly events URI.
    #[arg(long, env = "LD_EVENTS_URI")]
    ld_events_uri: Option<String>,
    /// Send evaluation events to LaunchDarkly (off by default).
    #[arg(long, env = "LD_SEND_EVENTS")]
    ld_send_events: bool,
    /// With events on and a migration flag (`flags.keys.migration`): one
    /// write in this many is reported to LaunchDarkly's migration insights
    /// (per origin: invoked, latency, error; old = offline file, new =
    /// Kafka). 0 reports none.
    #[arg(long, env = "LD_MIGRATION_SAMPLE", default_value_t = 100)]
    ld_migration_sample: u64,
    /// How long start-up waits for the first flag payload, in milliseconds;
    /// then the router routes on the flags a previous run persisted (or the
    /// safe default) until flags arrive.
    #[arg(long, env = "LD_INIT_TIMEOUT_MS", default_value_t = 5000)]
    ld_init_timeout_ms: u64,
    /// While LaunchDarkly has not answered: `persisted` routes on the flags
    /// a previous run persisted in the offline folder, `legacy` on the safe
    /// default (everything legacy).
    #[arg(
        long,
        env = "LD_OFFLINE_DEFAULT",
        value_enum,
        default_value = "persisted"
    )]
    ld_offline_default: OfflineDefault,
}

/// What a router routes on before LaunchDarkly answers.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum OfflineDefault {
    Persisted,
    Legacy,
}

pub fn main(args: RouteArgs) -> ExitCode {
    exit(run(args))
}

fn run(args: RouteArgs) -> Exit {
    // Validate everything before binding anything.
    let kafka_extra = args.kafka.props()?;
    let mut config = config(args.config.as_deref())?;
    if let Some(t) = args.kafka_topic {
        config.kafka.topic = t;
    }
    if let Some(d) = args.offline_dir {
        config.offline.dir = d;
    }
    if let Some(d) = args.flags_dir {
        config.flags.dir = d;
    }
    let rt = runtime()?;
    rt.block_on(async move {
        let listener = bind(args.listen).await?;
        let admin = bind(args.admin_listen).await?;
        let shutdown = CancellationToken::new();
        crate::shutdown::cancel_on_signal(shutdown.clone());
        let sdk_key = match &args.ld_sdk_key_file {
            Some(path) => Some(crate::cli::secret_file("ld-sdk-key-file", path)?),
            None => args.ld_sdk_key.clone(),
        };
        let launchdarkly = sdk_key.map(|sdk_key| LaunchDarklyOptions {
            sdk_key,
            stream_uri: args.ld_stream_uri.clone(),
            base_uri: args.ld_base_uri.clone(),
            events_uri: args.ld_events_uri.clone(),
            send_events: args.ld_send_events,
            init_timeout: std::time::Duration::from_millis(args.ld_init_timeout_ms),
            reconnect_delay: std::time::Duration::from_millis(500),
            use_persisted: matches!(args.ld_offline_default, OfflineDefault::Persisted),
            migration_sample: args.ld_migration_sample,
        });
        let opts = RouteOptions {
            config,
            kafka_brokers: args.kafka.kafka_brokers,
            kafka_extra,
            launchdarkly,
        };
        match super::run(opts, listener, admin, prometheus::Registry::new(), shutdown).await {
            Ok(()) => Ok(ExitCode::SUCCESS),
            Err(e @ (StartError::Schema(_) | StartError::Kafka(_))) => Err(usage(e)),
            Err(e) => Err(failure(e)),
        }
    })
}
