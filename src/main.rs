//! The switchyard binary: parse, set up logging, dispatch to a role, map
//! errors to exit codes (2: bad configuration or usage, 1: failure at run time).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use switchyard::config::{parse_key_value, PipelineConfig};
use switchyard::route::{self, RouteOptions, StartError};

/// Move an ingestion pipeline from offline files to Kafka with no downtime
/// and no lost row.
#[derive(Parser)]
#[command(name = "switchyard", version)]
struct Cli {
    /// Log as JSON lines instead of text.
    #[arg(long, env = "SWITCHYARD_LOG_JSON", global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The sidecar: HTTP ingest API, routing, offline-file writer, Kafka producer.
    Route(Box<RouteArgs>),
    /// Print the embedded default configuration.
    DefaultConfig,
}

#[derive(Args)]
struct RouteArgs {
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
    /// Kafka bootstrap servers.
    #[arg(
        long,
        env = "SWITCHYARD_KAFKA_BROKERS",
        default_value = "127.0.0.1:9092"
    )]
    kafka_brokers: String,
    /// Kafka topic (overrides kafka.topic).
    #[arg(long, env = "SWITCHYARD_KAFKA_TOPIC")]
    kafka_topic: Option<String>,
    /// Any librdkafka property, key=value, repeatable (SASL/TLS settings and
    /// secrets go here or in the env variable, comma-separated; never logged).
    #[arg(long = "kafka-config", env = "SWITCHYARD_KAFKA_CONFIG", value_delimiter = ',', value_parser = parse_key_value)]
    kafka_config: Vec<(String, String)>,
    /// Offline file folder (overrides offline.dir).
    #[arg(long, env = "SWITCHYARD_OFFLINE_DIR")]
    offline_dir: Option<PathBuf>,
    /// Local flags folder (overrides flags.dir).
    #[arg(long, env = "SWITCHYARD_FLAGS_DIR")]
    flags_dir: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_json);
    match cli.command {
        Command::DefaultConfig => {
            print!("{}", switchyard::config::EMBEDDED);
            ExitCode::SUCCESS
        }
        Command::Route(args) => run_route(*args),
    }
}

fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rdkafka=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("switchyard: cannot start the runtime: {e}");
            ExitCode::FAILURE
        })
}

fn run_route(args: RouteArgs) -> ExitCode {
    // Validate everything before binding anything.
    let mut config = match PipelineConfig::load(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("switchyard: configuration: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(t) = args.kafka_topic {
        config.kafka.topic = t;
    }
    if let Some(d) = args.offline_dir {
        config.offline.dir = d;
    }
    if let Some(d) = args.flags_dir {
        config.flags.dir = d;
    }
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    rt.block_on(async move {
        let listener = match tokio::net::TcpListener::bind(args.listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("switchyard: cannot listen on {}: {e}", args.listen);
                return ExitCode::FAILURE;
            }
        };
        let admin = match tokio::net::TcpListener::bind(args.admin_listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("switchyard: cannot listen on {}: {e}", args.admin_listen);
                return ExitCode::FAILURE;
            }
        };
        let shutdown = CancellationToken::new();
        switchyard::shutdown::cancel_on_signal(shutdown.clone());
        let opts = RouteOptions {
            config,
            kafka_brokers: args.kafka_brokers,
            kafka_extra: args.kafka_config,
        };
        match route::run(opts, listener, admin, prometheus::Registry::new(), shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("switchyard: {e}");
                match e {
                    StartError::Schema(_) | StartError::Kafka(_) => ExitCode::from(2),
                    _ => ExitCode::FAILURE,
                }
            }
        }
    })
}
