//! `switchyard plan`: its command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use crate::cli::{config, exit, usage, Exit};

#[derive(Args)]
pub struct PlanArgs {
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

pub fn main(args: PlanArgs) -> ExitCode {
    exit(run(args))
}

fn run(args: PlanArgs) -> Exit {
    let max_payload = match args.max_payload_bytes {
        Some(m) => m,
        None => config(args.config.as_deref())?
            .tables
            .iter()
            .map(|t| t.max_row_bytes as u64)
            .max()
            .unwrap_or(262_144),
    };
    let inputs = crate::plan::Inputs {
        events_per_second: args.events_per_second,
        payload_bytes: args.payload_bytes,
        retention_days: args.retention_days,
        replication: args.replication,
        brokers: args.brokers,
        consumer_throughput: args.consumer_throughput,
        growth: args.growth,
        max_payload_bytes: max_payload,
    };
    let s = crate::plan::size(&inputs).map_err(|e| usage(format!("plan: {e}")))?;
    if args.json {
        println!("{}", serde_json::json!({"inputs": inputs, "sizing": s}));
    } else {
        print!("{}", s.table(&inputs));
    }
    Ok(ExitCode::SUCCESS)
}
