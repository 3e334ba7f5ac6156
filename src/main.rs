//! The switchyard binary: parse, set up logging, dispatch to a role. Each
//! role's arguments and start-up live in its own folder (`src/<role>/cli.rs`);
//! exit codes: 0 done, 2 bad configuration or usage, 1 failure at run time.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use switchyard::{backfill, compare, db, demo, flags, health, ingest, load, plan, rollout, route};

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
    Route(Box<route::cli::RouteArgs>),
    /// Legacy offline loader: closed offline files, oldest first, into the OLD database.
    Load(Box<load::cli::LoadArgs>),
    /// Kafka ingestion consumer: the topic, in batches, into the NEW database.
    Ingest(Box<ingest::cli::IngestArgs>),
    /// Shadow comparator: parity of OLD and NEW for what the stream says was sent.
    Compare(Box<compare::cli::CompareArgs>),
    /// Copy one table's history from OLD to NEW: keyset chunks, checkpointed
    /// in NEW, idempotent on the key, rate-limited.
    Backfill(Box<backfill::cli::BackfillArgs>),
    /// Read or change the routing flags (local folder or the LaunchDarkly REST API).
    Flags(Box<flags::cli::FlagsArgs>),
    /// Progressive rollout with parity gates and automatic rollback.
    Rollout(Box<rollout::cli::RolloutArgs>),
    /// Every role in one process on embedded defaults (SQLite, an in-process
    /// Kafka), with synthetic traffic, walking a rollout.
    Demo(demo::cli::DemoArgs),
    /// Sizing: disk per broker, partitions and consumer processes.
    Plan(plan::cli::PlanArgs),
    /// Health check of a running role: GET its admin /healthz (or /readyz);
    /// exit 0 if it answers 2xx, 1 if not (the image's HEALTHCHECK).
    Health(health::cli::HealthArgs),
    /// Database set-up.
    Db {
        #[command(subcommand)]
        command: db::cli::DbCommand,
    },
    /// Print the embedded default configuration.
    DefaultConfig,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo shows its own view and sends the roles' logs to a file.
    if !matches!(cli.command, Command::Demo(_)) {
        switchyard::logging::to_stderr(cli.log_json);
    }
    match cli.command {
        Command::DefaultConfig => {
            print!("{}", switchyard::config::EMBEDDED);
            ExitCode::SUCCESS
        }
        Command::Route(args) => route::cli::main(*args),
        Command::Load(args) => load::cli::main(*args),
        Command::Ingest(args) => ingest::cli::main(*args),
        Command::Compare(args) => compare::cli::main(*args),
        Command::Backfill(args) => backfill::cli::main(*args),
        Command::Flags(args) => flags::cli::main(*args),
        Command::Plan(args) => plan::cli::main(args),
        Command::Demo(args) => demo::cli::main(args, cli.log_json),
        Command::Rollout(args) => rollout::cli::main(*args),
        Command::Db { command } => db::cli::main(command),
        Command::Health(args) => health::cli::main(args),
    }
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
