//! `switchyard demo`: its command line and start-up.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Args;
use tokio_util::sync::CancellationToken;

use super::view;
use crate::cli::{exit, failure, runtime, usage, Exit};
use crate::logging;

#[derive(Args)]
pub struct DemoArgs {
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
    /// The roles' logs on stderr, with the status as plain lines, instead of
    /// a live table and the logs in a file (`demo.log`, kept afterwards).
    #[arg(long, short)]
    verbose: bool,
}

/// Runs the demo. It sets up logging itself (`log_json`: JSON lines): to a
/// file in its work folder, or to stderr with `--verbose`.
pub fn main(args: DemoArgs, log_json: bool) -> ExitCode {
    exit(run(args, log_json))
}

fn run(args: DemoArgs, log_json: bool) -> Exit {
    if !(args.phase_secs.is_finite() && args.phase_secs > 0.0 && args.phase_secs <= 3600.0) {
        return Err(usage("--phase-secs must be between 0 and 3600"));
    }
    if args.rate == 0 {
        return Err(usage("--rate must be at least 1"));
    }
    let work = crate::demo::WorkFolder::create().map_err(failure)?;
    if args.verbose {
        logging::to_stderr(log_json);
    } else if let Err(e) = logging::to_file(&work.log_file(), log_json) {
        let _ = std::fs::remove_dir_all(work.path());
        return Err(failure(format!(
            "demo set-up: log file {}: {e}",
            work.log_file().display()
        )));
    }
    let (terminal, color) = view::terminal_supports_live();
    let opts = crate::demo::DemoOptions {
        kafka_brokers: args.kafka_brokers,
        phase: std::time::Duration::from_secs_f64(args.phase_secs),
        rate: args.rate,
        follow: args.follow,
        keep: args.keep,
        // Logs on stderr would break a table redrawn in place.
        live: !args.verbose && terminal && std::io::stdout().is_terminal(),
        color,
        log_to_file: !args.verbose,
    };
    let rt = runtime()?;
    rt.block_on(async move {
        let shutdown = CancellationToken::new();
        crate::shutdown::cancel_on_signal(shutdown.clone());
        let mut out = std::io::stdout();
        crate::demo::run(opts, work, shutdown, &mut out)
            .await
            .map_err(failure)?;
        Ok(ExitCode::SUCCESS)
    })
}
