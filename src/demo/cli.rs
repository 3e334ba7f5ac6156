//! `switchyard demo`: its command line and start-up.

use std::process::ExitCode;

use clap::Args;
use tokio_util::sync::CancellationToken;

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
}

pub fn main(args: DemoArgs) -> ExitCode {
    if !(args.phase_secs.is_finite() && args.phase_secs > 0.0 && args.phase_secs <= 3600.0) {
        eprintln!("switchyard: --phase-secs must be between 0 and 3600");
        return ExitCode::from(2);
    }
    if args.rate == 0 {
        eprintln!("switchyard: --rate must be at least 1");
        return ExitCode::from(2);
    }
    let opts = crate::demo::DemoOptions {
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
        crate::shutdown::cancel_on_signal(shutdown.clone());
        let mut out = std::io::stdout();
        match crate::demo::run(opts, shutdown, &mut out).await {
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("switchyard: {e}");
                ExitCode::FAILURE
            }
        }
    })
}
