//! `switchyard demo`: its command line and start-up.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Args;
use tokio_util::sync::CancellationToken;

use super::{logs, view};
use crate::cli::runtime;

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
    if !(args.phase_secs.is_finite() && args.phase_secs > 0.0 && args.phase_secs <= 3600.0) {
        eprintln!("switchyard: --phase-secs must be between 0 and 3600");
        return ExitCode::from(2);
    }
    if args.rate == 0 {
        eprintln!("switchyard: --rate must be at least 1");
        return ExitCode::from(2);
    }
    let work = match crate::demo::WorkFolder::create() {
        Ok(w) => w,
        Err(e) => {
            eprintln!("switchyard: {e}");
            return ExitCode::FAILURE;
        }
    };
    if args.verbose {
        logs::to_stderr(log_json);
    } else if let Err(e) = logs::to_file(&work.log_file(), log_json) {
        eprintln!(
            "switchyard: demo set-up: log file {}: {e}",
            work.log_file().display()
        );
        let _ = std::fs::remove_dir_all(work.path());
        return ExitCode::FAILURE;
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
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    rt.block_on(async move {
        let shutdown = CancellationToken::new();
        crate::shutdown::cancel_on_signal(shutdown.clone());
        let mut out = std::io::stdout();
        match crate::demo::run(opts, work, shutdown, &mut out).await {
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("switchyard: {e}");
                ExitCode::FAILURE
            }
        }
    })
}
