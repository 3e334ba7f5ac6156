//! `switchyard health`: its command line. Exit 0 when the admin port answers
//! 2xx, 1 when it does not (refused, timed out, or another status), 2 on
//! usage errors, as for every role.

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Args;

use crate::cli::{exit, failure, secs, Exit};

#[derive(Args)]
pub struct HealthArgs {
    /// The role's admin address, as given to its --admin-listen (0.0.0.0 and
    /// [::] are probed on loopback). Same variable as the roles', so a
    /// container that sets it for the role checks the right port.
    #[arg(
        long,
        env = "SWITCHYARD_ADMIN_LISTEN",
        default_value = "127.0.0.1:9090"
    )]
    admin: SocketAddr,
    /// Check /readyz (ready to take traffic) instead of /healthz (alive).
    #[arg(long)]
    ready: bool,
    /// Seconds to wait for the answer.
    #[arg(long, default_value_t = 2.0)]
    timeout_secs: f64,
    /// Print nothing on success.
    #[arg(long, short)]
    quiet: bool,
}

pub fn main(args: HealthArgs) -> ExitCode {
    exit(run(args))
}

fn run(args: HealthArgs) -> Exit {
    let timeout = secs("timeout-secs", args.timeout_secs)?;
    let url = super::url(args.admin, args.ready);
    // One request: a current-thread runtime is enough and starts fastest.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| failure(format!("cannot start the runtime: {e}")))?;
    match rt.block_on(super::check(&url, timeout)) {
        Ok(status) => {
            if !args.quiet {
                println!("{url}: {status}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(why) => Err(failure(format!("health: {why}"))),
    }
}
