//! `switchyard rollout`: its command line and start-up.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::admin::{self, Health};
use crate::cli::{metrics_or_exit, runtime, AdminPort};
use crate::flags::cli::StoreArgs;

#[derive(Args)]
pub struct RolloutArgs {
    #[command(subcommand)]
    command: RolloutCommand,
}

#[derive(Subcommand)]
pub enum RolloutCommand {
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

fn load_plan(path: &std::path::Path) -> Result<super::plan::Plan, ExitCode> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        eprintln!("switchyard: plan {}: {e}", path.display());
        ExitCode::from(2)
    })?;
    super::plan::Plan::parse(&text).map_err(|e| {
        eprintln!("switchyard: plan {}: {e}", path.display());
        ExitCode::from(2)
    })
}

pub fn main(args: RolloutArgs) -> ExitCode {
    use super::{promote_file, Controller, Outcome};
    match args.command {
        RolloutCommand::Promote { plan } => {
            let plan = match load_plan(&plan) {
                Ok(p) => p,
                Err(code) => return code,
            };
            let state: super::plan::State = match std::fs::read_to_string(&plan.state_file)
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
                let metrics = match metrics_or_exit(super::RolloutMetrics::new(&registry)) {
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
                    .merge(super::status_router(controller.clone()));
                let admin_port = match AdminPort::start(admin_listen, router).await {
                    Ok(a) => a,
                    Err(code) => return code,
                };
                let shutdown = CancellationToken::new();
                crate::shutdown::cancel_on_signal(shutdown.clone());
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
