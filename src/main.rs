//! The switchyard binary: parse, set up logging, dispatch to a role, map
//! errors to exit codes (2: bad configuration or usage, 1: failure at run time).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use switchyard::admin::{self, Health};
use switchyard::compare::{self, state::Status, Comparator, CompareError, CompareOptions};
use switchyard::config::{parse_properties, PipelineConfig};
use switchyard::db::{self, Db, Engine};
use switchyard::flags::LaunchDarklyOptions;
use switchyard::ingest::{self, IngestOptions};
use switchyard::load::{self, LoadOptions, Replay};
use switchyard::metrics::{CompareMetrics, IngestMetrics, LoadMetrics};
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
    /// Legacy offline loader: closed offline files, oldest first, into the OLD database.
    Load(Box<LoadArgs>),
    /// Kafka ingestion consumer: the topic, in batches, into the NEW database.
    Ingest(Box<IngestArgs>),
    /// Shadow comparator: parity of OLD and NEW for what the stream says was sent.
    Compare(Box<CompareArgs>),
    /// Read or change the routing flags (local folder or the LaunchDarkly REST API).
    Flags(Box<FlagsArgs>),
    /// Progressive rollout with parity gates and automatic rollback.
    Rollout(Box<RolloutArgs>),
    /// Every role in one process on embedded defaults (SQLite, an in-process
    /// Kafka), with synthetic traffic, walking a rollout.
    Demo(DemoArgs),
    /// Sizing: disk per broker, partitions and consumer processes.
    Plan(PlanArgs),
    /// Database set-up.
    Db {
        #[command(subcommand)]
        command: DbCommand,
    },
    /// Print the embedded default configuration.
    DefaultConfig,
}

#[derive(Subcommand)]
enum DbCommand {
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

/// How to reach Kafka: the same two flags for every role that talks to it.
#[derive(Args, Clone)]
struct KafkaArgs {
    /// Kafka bootstrap servers.
    #[arg(
        long = "kafka-brokers",
        env = "SWITCHYARD_KAFKA_BROKERS",
        default_value = "127.0.0.1:9092"
    )]
    kafka_brokers: String,
    /// Any librdkafka property, key=value, repeatable (SASL/TLS settings and
    /// secrets go here or in the env variable, comma-separated; never logged).
    #[arg(long = "kafka-config", env = "SWITCHYARD_KAFKA_CONFIG")]
    kafka_config: Vec<String>,
}

/// Where the database is: a URL, or the seed's separate flags.
#[derive(Args, Clone)]
struct DbArgs {
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
    /// Database name (with sqlite: the file).
    #[arg(long, env = "SWITCHYARD_DB_NAME")]
    db_name: Option<String>,
    /// Connections in the pool.
    #[arg(long, env = "SWITCHYARD_DB_POOL", default_value_t = 4)]
    db_pool: u32,
}

impl DbArgs {
    /// The URL, or a usage error that says what is missing.
    fn url(&self, default_engine: Engine) -> Result<String, String> {
        if let Some(u) = &self.db_url {
            return Ok(u.clone());
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
        Ok(db::url_from_parts(
            engine,
            host,
            self.db_port,
            self.db_user.as_deref(),
            self.db_password.as_deref(),
            name,
        ))
    }
}

#[derive(Args)]
struct LoadArgs {
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
    /// Move loaded files here instead of deleting them.
    #[arg(long, env = "SWITCHYARD_LOAD_ARCHIVE_DIR")]
    archive_dir: Option<PathBuf>,
    /// Where unloadable lines go, with the reason (default: OFFLINE_DIR/dead-letter).
    #[arg(long, env = "SWITCHYARD_LOAD_DEAD_LETTER_DIR")]
    dead_letter_dir: Option<PathBuf>,
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

/// Where the routing flags are changed: the local folder, or LaunchDarkly.
#[derive(Args, Clone)]
struct StoreArgs {
    /// Pipeline configuration (TOML): the flags folder and keys.
    #[arg(long, env = "SWITCHYARD_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Local flags folder (overrides flags.dir).
    #[arg(long, env = "SWITCHYARD_FLAGS_DIR", global = true)]
    flags_dir: Option<PathBuf>,
    /// LaunchDarkly API access token: change the flags through the REST API
    /// instead of the local folder (never logged).
    #[arg(long, env = "LD_API_TOKEN", hide_env_values = true, global = true)]
    ld_api_token: Option<String>,
    /// LaunchDarkly API base URI.
    #[arg(
        long,
        env = "LD_API_URI",
        default_value = "https://app.launchdarkly.com",
        global = true
    )]
    ld_api_uri: String,
    /// LaunchDarkly project key.
    #[arg(long, env = "LD_PROJECT", default_value = "default", global = true)]
    ld_project: String,
    /// LaunchDarkly environment key.
    #[arg(
        long,
        env = "LD_ENVIRONMENT",
        default_value = "production",
        global = true
    )]
    ld_environment: String,
}

impl StoreArgs {
    fn store(&self) -> Result<switchyard::flags::store::FlagStore, ExitCode> {
        use switchyard::flags::store::{Api, FlagStore};
        let mut cfg = PipelineConfig::load(self.config.as_deref()).map_err(|e| {
            eprintln!("switchyard: configuration: {e}");
            ExitCode::from(2)
        })?;
        if let Some(d) = &self.flags_dir {
            cfg.flags.dir = d.clone();
        }
        let keys = cfg.flags.keys.clone();
        Ok(match &self.ld_api_token {
            Some(token) => FlagStore::LaunchDarkly(Api::new(
                &self.ld_api_uri,
                token.clone(),
                self.ld_project.clone(),
                self.ld_environment.clone(),
                keys,
            )),
            None => FlagStore::Local {
                dir: cfg.flags.dir.clone(),
                keys,
            },
        })
    }
}

#[derive(Args)]
struct FlagsArgs {
    #[command(subcommand)]
    command: FlagsCommand,
    #[command(flatten)]
    store: StoreArgs,
}

#[derive(Args)]
struct RolloutArgs {
    #[command(subcommand)]
    command: RolloutCommand,
}

#[derive(Subcommand)]
enum RolloutCommand {
    /// Run (or resume) a plan.
    Run {
        /// The plan (TOML).
        #[arg(long)]
        plan: PathBuf,
        /// Admin address: /metrics, /healthz, /readyz, /status.
        #[arg(
            long,
            env = "SWITCHYARD_ADMIN_LISTEN",
            default_value = "127.0.0.1:9097"
        )]
        admin_listen: SocketAddr,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Let a controller waiting at a manual gate go on to the next step.
    Promote {
        #[arg(long)]
        plan: PathBuf,
    },
}

#[derive(Subcommand)]
enum FlagsCommand {
    /// Print the three routing flags.
    Get {
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
    /// Set one flag: `kill-switch` (true/false), `kafka-only` or `dual-write` (0–100).
    Set {
        flag: String,
        value: String,
        /// Allow kafka-only above dual-write.
        #[arg(long)]
        force: bool,
        /// Recorded with the change (LaunchDarkly audit log).
        #[arg(long, default_value = "set with switchyard flags")]
        comment: String,
    },
    /// Everything legacy, at once.
    Kill {
        #[arg(long, default_value = "kill switch on (switchyard flags kill)")]
        comment: String,
    },
    /// Release the kill switch (the percentages apply again).
    Unkill {
        #[arg(long, default_value = "kill switch off (switchyard flags unkill)")]
        comment: String,
    },
}

#[derive(Args)]
struct DemoArgs {
    /// A real broker instead of librdkafka's in-process mock cluster (the
    /// topic `switchyard.demo` must exist).
    #[arg(long)]
    kafka_brokers: Option<String>,
    /// Seconds each rollout step is shown.
    #[arg(long, default_value_t = 8.0)]
    phase_secs: f64,
    /// Payloads per second from the traffic generator.
    #[arg(long, default_value_t = 500)]
    rate: u32,
    /// Keep running after the walk, until Ctrl-C.
    #[arg(long)]
    follow: bool,
    /// Keep the work folder (offline files, SQLite databases) afterwards.
    #[arg(long)]
    keep: bool,
}

#[derive(Args)]
struct PlanArgs {
    /// Incoming events per second today.
    #[arg(long)]
    events_per_second: f64,
    /// Average payload size in bytes.
    #[arg(long)]
    payload_bytes: f64,
    /// How long the topic keeps messages, in days.
    #[arg(long, default_value_t = 7.0)]
    retention_days: f64,
    /// Replication factor.
    #[arg(long, default_value_t = 3)]
    replication: u32,
    /// Number of brokers.
    #[arg(long)]
    brokers: u32,
    /// Messages per second one consumer handles on one partition (measure it
    /// with `cargo bench --bench pipelines`).
    #[arg(long)]
    consumer_throughput: f64,
    /// Traffic growth to size partitions and consumers for.
    #[arg(long, default_value_t = 2.0)]
    growth: f64,
    /// Largest payload the topic must take (default: the largest table's max_row_bytes).
    #[arg(long)]
    max_payload_bytes: Option<u64>,
    /// Pipeline configuration (TOML), for the default largest payload.
    #[arg(long, env = "SWITCHYARD_CONFIG")]
    config: Option<PathBuf>,
    /// Print JSON for scripts.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct CompareArgs {
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
    /// The OLD database URL.
    #[arg(long, env = "SWITCHYARD_OLD_DB_URL", hide_env_values = true)]
    old_db_url: String,
    /// The NEW database URL.
    #[arg(long, env = "SWITCHYARD_NEW_DB_URL", hide_env_values = true)]
    new_db_url: String,
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
    /// Read the topic to its end, check [--from, --to) now, print, exit (1 on a mismatch).
    #[arg(long)]
    once: bool,
    /// With --once: first time value (inclusive, time column units).
    #[arg(long, requires = "once")]
    from: Option<i64>,
    /// With --once: last time value (exclusive).
    #[arg(long, requires = "once")]
    to: Option<i64>,
    /// With --once: print the report as JSON instead of a table.
    #[arg(long, requires = "once")]
    json: bool,
}

#[derive(Args)]
struct IngestArgs {
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
    /// How long start-up waits for the first flag payload, in milliseconds;
    /// then the router runs on the safe default (legacy) until flags arrive.
    #[arg(long, env = "LD_INIT_TIMEOUT_MS", default_value_t = 5000)]
    ld_init_timeout_ms: u64,
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
        Command::Load(args) => run_load(*args),
        Command::Ingest(args) => run_ingest(*args),
        Command::Compare(args) => run_compare(*args),
        Command::Flags(args) => run_flags(*args),
        Command::Plan(args) => run_plan(args),
        Command::Demo(args) => run_demo(args),
        Command::Rollout(args) => run_rollout(*args),
        Command::Db {
            command: DbCommand::Init { config, db },
        } => run_db_init(config, db),
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

/// `--kafka-config` values, or the usage exit code.
fn kafka_props(raw: &[String]) -> Result<Vec<(String, String)>, ExitCode> {
    parse_properties(raw).map_err(|e| {
        eprintln!("switchyard: --kafka-config: {e}");
        ExitCode::from(2)
    })
}

fn run_route(args: RouteArgs) -> ExitCode {
    let kafka_extra = match kafka_props(&args.kafka.kafka_config) {
        Ok(p) => p,
        Err(code) => return code,
    };
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
        let launchdarkly = args.ld_sdk_key.clone().map(|sdk_key| LaunchDarklyOptions {
            sdk_key,
            stream_uri: args.ld_stream_uri.clone(),
            base_uri: args.ld_base_uri.clone(),
            events_uri: args.ld_events_uri.clone(),
            send_events: args.ld_send_events,
            init_timeout: std::time::Duration::from_millis(args.ld_init_timeout_ms),
            reconnect_delay: std::time::Duration::from_millis(500),
        });
        let opts = RouteOptions {
            config,
            kafka_brokers: args.kafka.kafka_brokers,
            kafka_extra,
            launchdarkly,
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

/// Configuration, schema and database pool, or the exit code of a usage error.
fn prepare(
    config: Option<&std::path::Path>,
    db: &DbArgs,
    default_engine: Engine,
) -> Result<(PipelineConfig, switchyard::schema::Schema, String, Db), ExitCode> {
    let usage = |m: String| {
        eprintln!("switchyard: {m}");
        ExitCode::from(2)
    };
    let cfg = PipelineConfig::load(config).map_err(|e| usage(format!("configuration: {e}")))?;
    let schema = cfg.schema().map_err(|e| usage(format!("schema: {e}")))?;
    let url = db.url(default_engine).map_err(usage)?;
    if db.db_pool == 0 {
        return Err(usage("--db-pool must be at least 1".into()));
    }
    let pool = Db::connect(&url, db.db_pool).map_err(|e| usage(e.to_string()))?;
    Ok((cfg, schema, url, pool))
}

async fn bind_admin(addr: SocketAddr) -> Result<tokio::net::TcpListener, ExitCode> {
    tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        eprintln!("switchyard: cannot listen on {addr}: {e}");
        ExitCode::FAILURE
    })
}

/// A role's admin port (/metrics, /healthz, /readyz and the role's own
/// routes), served until [`AdminPort::finish`].
struct AdminPort {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl AdminPort {
    async fn start(addr: SocketAddr, router: axum::Router) -> Result<AdminPort, ExitCode> {
        let listener = bind_admin(addr).await?;
        let stop = CancellationToken::new();
        let task = admin::spawn(listener, router, stop.clone());
        Ok(AdminPort { stop, task })
    }

    async fn finish(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// The role's metric families, or the exit code if they cannot be registered.
fn metrics_or_exit<T>(m: prometheus::Result<T>) -> Result<T, ExitCode> {
    m.map_err(|e| {
        eprintln!("switchyard: metrics: {e}");
        ExitCode::FAILURE
    })
}

/// Waits until every database answers and holds its tables. Ok(false) when
/// shut down first; a missing table is a usage error (exit 2).
async fn wait_databases(
    dbs: &[(&Db, &str)],
    schema: &switchyard::schema::Schema,
    shutdown: &CancellationToken,
) -> Result<bool, ExitCode> {
    for (db, url) in dbs {
        match db::wait_ready(db, schema, url, shutdown).await {
            Ok(true) => {}
            Ok(false) => return Ok(false),
            Err(e) => {
                eprintln!("switchyard: {e}");
                return Err(ExitCode::from(2));
            }
        }
    }
    Ok(true)
}

fn run_db_init(config: Option<PathBuf>, args: DbArgs) -> ExitCode {
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    // The pool's maintenance task needs the runtime.
    let _enter = rt.enter();
    let (_, schema, url, pool) = match prepare(config.as_deref(), &args, Engine::Postgres) {
        Ok(p) => p,
        Err(code) => return code,
    };
    rt.block_on(async move {
        match pool.init(&schema).await {
            Ok(()) => {
                let tables: Vec<&str> = schema.tables().iter().map(|t| t.name.as_str()).collect();
                println!(
                    "initialised {} ({}): {} and the bookkeeping tables",
                    db::redact_url(&url),
                    pool.engine(),
                    tables.join(", ")
                );
                pool.close().await;
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("switchyard: db init {}: {e}", db::redact_url(&url));
                ExitCode::FAILURE
            }
        }
    })
}

fn run_load(args: LoadArgs) -> ExitCode {
    let kafka_extra = match kafka_props(&args.kafka.kafka_config) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    // The pool's maintenance task needs the runtime.
    let _enter = rt.enter();
    let (mut cfg, schema, url, pool) =
        match prepare(args.config.as_deref(), &args.db, Engine::MySql) {
            Ok(p) => p,
            Err(code) => return code,
        };
    if let Some(d) = &args.offline_dir {
        cfg.offline.dir = d.clone();
    }
    if let Some(t) = &args.kafka_topic {
        cfg.kafka.topic = t.clone();
    }
    if args.batch_size == 0 {
        eprintln!("switchyard: --batch-size must be at least 1");
        return ExitCode::from(2);
    }
    let progress = match args.progress.as_str() {
        "auto" => std::io::IsTerminal::is_terminal(&std::io::stderr()),
        "always" => true,
        "never" => false,
        other => {
            eprintln!("switchyard: --progress {other:?}: use auto, always or never");
            return ExitCode::from(2);
        }
    };
    let opts = LoadOptions {
        dead_letter_dir: args
            .dead_letter_dir
            .clone()
            .unwrap_or_else(|| cfg.offline.dir.join("dead-letter")),
        dir: cfg.offline.dir.clone(),
        batch_size: args.batch_size,
        archive_dir: args.archive_dir.clone(),
        poll: std::time::Duration::from_millis(args.poll_ms.max(10)),
        once: args.once,
        progress,
    };
    rt.block_on(async move {
        let registry = prometheus::Registry::new();
        let metrics = match metrics_or_exit(LoadMetrics::new(&registry)) {
            Ok(m) => m,
            Err(code) => return code,
        };
        let replay = if args.no_replay {
            None
        } else {
            match Replay::new(&args.kafka.kafka_brokers, &cfg.kafka, &kafka_extra, &metrics) {
                Ok(r) => Some(r),
                Err(e) => {
                    eprintln!("switchyard: {e}");
                    return ExitCode::from(2);
                }
            }
        };
        let health = Health::starting("waiting for the database");
        let admin_port = match AdminPort::start(args.admin_listen, admin::router(registry, health.clone())).await {
            Ok(a) => a,
            Err(code) => return code,
        };
        let shutdown = CancellationToken::new();
        switchyard::shutdown::cancel_on_signal(shutdown.clone());
        let code = match wait_databases(&[(&pool, &url)], &schema, &shutdown).await {
            Err(code) => code,
            Ok(false) => ExitCode::SUCCESS,
            Ok(true) => {
                health.ready();
                tracing::info!(dir = %opts.dir.display(), db = %db::redact_url(&url), batch_size = opts.batch_size, "loader started");
                match load::run(opts, &schema, &pool, replay, metrics, shutdown).await {
                    Ok(s) => {
                        tracing::info!(files = s.files, lines = s.lines, inserted = s.inserted, duplicates = s.duplicates, replayed = s.replayed, dead_letters = s.dead_letters, "loader stopped");
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("switchyard: load: {e}");
                        ExitCode::FAILURE
                    }
                }
            }
        };
        admin_port.finish().await;
        pool.close().await;
        code
    })
}

fn run_ingest(args: IngestArgs) -> ExitCode {
    let kafka_extra = match kafka_props(&args.kafka.kafka_config) {
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
        switchyard::shutdown::cancel_on_signal(shutdown.clone());
        let code = match wait_databases(&[(&pool, &url)], &schema, &shutdown).await {
            Err(code) => code,
            Ok(false) => ExitCode::SUCCESS,
            Ok(true) => match ingest::run(opts, &schema, &pool, metrics, health, shutdown).await {
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
                    e @ (ingest::IngestError::TopicMissing { .. } | ingest::IngestError::Config(_)),
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

fn secs(name: &str, v: f64) -> Result<std::time::Duration, ExitCode> {
    if v.is_finite() && (0.0..=30.0 * 86400.0).contains(&v) {
        Ok(std::time::Duration::from_secs_f64(v))
    } else {
        eprintln!("switchyard: --{name} must be between 0 and 30 days");
        Err(ExitCode::from(2))
    }
}

fn run_compare(args: CompareArgs) -> ExitCode {
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let _enter = rt.enter();
    let kafka_extra = match kafka_props(&args.kafka.kafka_config) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let usage = |m: String| {
        eprintln!("switchyard: {m}");
        ExitCode::from(2)
    };
    let cfg = match PipelineConfig::load(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => return usage(format!("configuration: {e}")),
    };
    let schema = match cfg.schema() {
        Ok(s) => s,
        Err(e) => return usage(format!("schema: {e}")),
    };
    let (old, new) = match (
        Db::connect(&args.old_db_url, 4),
        Db::connect(&args.new_db_url, 4),
    ) {
        (Ok(o), Ok(n)) => (o, n),
        (Err(e), _) | (_, Err(e)) => return usage(e.to_string()),
    };
    if args.window_secs <= 0 {
        return usage("--window-secs must be positive".into());
    }
    let durations = (|| {
        Ok::<_, ExitCode>((
            secs("settle-secs", args.settle_secs)?,
            secs("max-lateness-secs", args.max_lateness_secs)?,
            secs("recheck-secs", args.recheck_secs)?,
            secs("check-interval-secs", args.check_interval_secs.max(0.05))?,
            secs("retain-secs", args.retain_secs)?,
        ))
    })();
    let (settle, max_lateness, recheck, check_interval, retain) = match durations {
        Ok(d) => d,
        Err(code) => return code,
    };
    let opts = CompareOptions {
        brokers: args.kafka.kafka_brokers.clone(),
        topic: args.kafka_topic.clone().unwrap_or(cfg.kafka.topic.clone()),
        group: args.kafka_group.clone(),
        extra: kafka_extra,
        window_secs: args.window_secs,
        settle,
        max_lateness,
        recheck,
        check_interval,
        retain,
        max_ids: args.max_ids,
    };
    rt.block_on(async move {
        let registry = prometheus::Registry::new();
        let metrics = match metrics_or_exit(CompareMetrics::new(&registry)) {
            Ok(m) => m,
            Err(code) => return code,
        };
        let shutdown = CancellationToken::new();
        switchyard::shutdown::cancel_on_signal(shutdown.clone());
        let dbs = [
            (&old, args.old_db_url.as_str()),
            (&new, args.new_db_url.as_str()),
        ];
        match wait_databases(&dbs, &schema, &shutdown).await {
            Ok(true) => {}
            Ok(false) => return ExitCode::SUCCESS,
            Err(code) => return code,
        }
        let cmp = Comparator::new(schema, old, new, opts, metrics);
        if args.once {
            let from = args.from.unwrap_or(i64::MIN);
            let to = args.to.unwrap_or(i64::MAX);
            return match cmp.once(from, to).await {
                Ok(p) => {
                    if args.json {
                        match serde_json::to_string_pretty(&p) {
                            Ok(j) => println!("{j}"),
                            Err(e) => eprintln!("switchyard: {e}"),
                        }
                    } else {
                        print!("{}", p.table());
                    }
                    match p.status {
                        Status::Mismatch | Status::Pending => ExitCode::FAILURE,
                        Status::Ok | Status::Open => ExitCode::SUCCESS,
                    }
                }
                Err(e) => {
                    eprintln!("switchyard: compare: {e}");
                    ExitCode::from(3)
                }
            };
        }
        let router =
            admin::router(registry, Health::default()).merge(compare::parity_router(cmp.clone()));
        let admin_port = match AdminPort::start(args.admin_listen, router).await {
            Ok(a) => a,
            Err(code) => return code,
        };
        let code = match cmp.run(shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e @ CompareError::Topic { .. }) | Err(e @ CompareError::Config(_)) => {
                eprintln!("switchyard: compare: {e}");
                ExitCode::from(2)
            }
            Err(e) => {
                eprintln!("switchyard: compare: {e}");
                ExitCode::FAILURE
            }
        };
        admin_port.finish().await;
        code
    })
}

fn run_flags(args: FlagsArgs) -> ExitCode {
    use switchyard::flags::store::Which;
    let store = match args.store.store() {
        Ok(s) => s,
        Err(code) => return code,
    };
    let keys = store.keys().clone();
    let (which, value, force, comment) = match &args.command {
        FlagsCommand::Get { .. } => (None, serde_json::Value::Null, false, String::new()),
        FlagsCommand::Set {
            flag,
            value,
            force,
            comment,
        } => {
            let Some(w) = Which::parse(flag, &keys) else {
                eprintln!(
                    "switchyard: unknown flag {flag:?}: use kill-switch, kafka-only or dual-write"
                );
                return ExitCode::from(2);
            };
            let v = match serde_json::from_str::<serde_json::Value>(value) {
                Ok(v) => v,
                Err(_) => {
                    eprintln!("switchyard: {value:?} is neither a number nor true/false");
                    return ExitCode::from(2);
                }
            };
            (Some(w), v, *force, comment.clone())
        }
        FlagsCommand::Kill { comment } => (
            Some(Which::KillSwitch),
            serde_json::json!(true),
            false,
            comment.clone(),
        ),
        FlagsCommand::Unkill { comment } => (
            Some(Which::KillSwitch),
            serde_json::json!(false),
            false,
            comment.clone(),
        ),
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    rt.block_on(async move {
        let res = match which {
            None => store.get().await,
            Some(w) => store.set(w, value, force, &comment).await,
        };
        match res {
            Ok(c) => {
                if matches!(args.command, FlagsCommand::Get { json: true }) {
                    println!("{}", serde_json::json!(c));
                } else {
                    println!(
                        "kill-switch {}  dual-write {}%  kafka-only {}%",
                        c.kill_switch, c.dual_write, c.kafka_only
                    );
                }
                ExitCode::SUCCESS
            }
            Err(e @ switchyard::flags::store::StoreError::Invalid(_)) => {
                eprintln!("switchyard: {e}");
                ExitCode::from(2)
            }
            Err(e) => {
                eprintln!("switchyard: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

fn load_plan(path: &std::path::Path) -> Result<switchyard::rollout::plan::Plan, ExitCode> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        eprintln!("switchyard: plan {}: {e}", path.display());
        ExitCode::from(2)
    })?;
    switchyard::rollout::plan::Plan::parse(&text).map_err(|e| {
        eprintln!("switchyard: plan {}: {e}", path.display());
        ExitCode::from(2)
    })
}

fn run_rollout(args: RolloutArgs) -> ExitCode {
    use switchyard::rollout::{promote_file, Controller, Outcome};
    match args.command {
        RolloutCommand::Promote { plan } => {
            let plan = match load_plan(&plan) {
                Ok(p) => p,
                Err(code) => return code,
            };
            let state: switchyard::rollout::plan::State =
                match std::fs::read_to_string(&plan.state_file)
                    .map_err(|e| e.to_string())
                    .and_then(|t| serde_json::from_str(&t).map_err(|e| e.to_string()))
                {
                    Ok(s) => s,
                    Err(e) => {
                        eprintln!(
                            "switchyard: no rollout state in {}: {e}",
                            plan.state_file.display()
                        );
                        return ExitCode::from(2);
                    }
                };
            let next = state.step + 2;
            if let Err(e) = std::fs::write(promote_file(&plan.state_file), next.to_string()) {
                eprintln!("switchyard: {e}");
                return ExitCode::FAILURE;
            }
            println!("promoted: the controller goes on to step {next} at its next check");
            ExitCode::SUCCESS
        }
        RolloutCommand::Run {
            plan,
            admin_listen,
            store,
        } => {
            let plan = match load_plan(&plan) {
                Ok(p) => p,
                Err(code) => return code,
            };
            let store = match store.store() {
                Ok(s) => s,
                Err(code) => return code,
            };
            let rt = match runtime() {
                Ok(rt) => rt,
                Err(code) => return code,
            };
            rt.block_on(async move {
                let registry = prometheus::Registry::new();
                let metrics =
                    match metrics_or_exit(switchyard::metrics::RolloutMetrics::new(&registry)) {
                        Ok(m) => m,
                        Err(code) => return code,
                    };
                let controller = match Controller::new(plan, store, metrics) {
                    Ok(c) => c,
                    Err(e) => {
                        eprintln!("switchyard: rollout: {e}");
                        return ExitCode::from(2);
                    }
                };
                let router = admin::router(registry, Health::default())
                    .merge(switchyard::rollout::status_router(controller.clone()));
                let admin_port = match AdminPort::start(admin_listen, router).await {
                    Ok(a) => a,
                    Err(code) => return code,
                };
                let shutdown = CancellationToken::new();
                switchyard::shutdown::cancel_on_signal(shutdown.clone());
                let code = match controller.run(shutdown).await {
                    Ok(Outcome::Done) => {
                        println!("rollout done: {}", controller.status_json());
                        ExitCode::SUCCESS
                    }
                    Ok(Outcome::Interrupted) => ExitCode::SUCCESS,
                    Ok(Outcome::RolledBack(why)) => {
                        eprintln!("switchyard: rolled back: {why}");
                        ExitCode::FAILURE
                    }
                    Err(e) => {
                        eprintln!("switchyard: rollout: {e}");
                        ExitCode::from(3)
                    }
                };
                admin_port.finish().await;
                code
            })
        }
    }
}

fn run_plan(args: PlanArgs) -> ExitCode {
    let max_payload = match args.max_payload_bytes {
        Some(m) => m,
        None => match PipelineConfig::load(args.config.as_deref()) {
            Ok(c) => c
                .tables
                .iter()
                .map(|t| t.max_row_bytes as u64)
                .max()
                .unwrap_or(262_144),
            Err(e) => {
                eprintln!("switchyard: configuration: {e}");
                return ExitCode::from(2);
            }
        },
    };
    let inputs = switchyard::plan::Inputs {
        events_per_second: args.events_per_second,
        payload_bytes: args.payload_bytes,
        retention_days: args.retention_days,
        replication: args.replication,
        brokers: args.brokers,
        consumer_throughput: args.consumer_throughput,
        growth: args.growth,
        max_payload_bytes: max_payload,
    };
    match switchyard::plan::size(&inputs) {
        Ok(s) => {
            if args.json {
                println!("{}", serde_json::json!({"inputs": inputs, "sizing": s}));
            } else {
                print!("{}", s.table(&inputs));
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("switchyard: plan: {e}");
            ExitCode::from(2)
        }
    }
}

fn run_demo(args: DemoArgs) -> ExitCode {
    if !(args.phase_secs.is_finite() && args.phase_secs > 0.0 && args.phase_secs <= 3600.0) {
        eprintln!("switchyard: --phase-secs must be between 0 and 3600");
        return ExitCode::from(2);
    }
    if args.rate == 0 {
        eprintln!("switchyard: --rate must be at least 1");
        return ExitCode::from(2);
    }
    let opts = switchyard::demo::DemoOptions {
        kafka_brokers: args.kafka_brokers,
        phase: std::time::Duration::from_secs_f64(args.phase_secs),
        rate: args.rate,
        follow: args.follow,
        keep: args.keep,
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    rt.block_on(async move {
        let shutdown = CancellationToken::new();
        switchyard::shutdown::cancel_on_signal(shutdown.clone());
        let mut out = std::io::stdout();
        match switchyard::demo::run(opts, shutdown, &mut out).await {
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("switchyard: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

#[cfg(test)]
mod tests {
    /// Every subcommand's arguments are unique and well formed (clap checks
    /// this only when a subcommand is first used).
    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
