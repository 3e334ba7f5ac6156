//! `switchyard rollout`: its command line and start-up.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::admin::{self, Health};
use crate::cli::{exit, failure, metrics_or_exit, runtime, usage, AdminPort, Exit};
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

fn load_plan(path: &Path) -> Result<super::plan::Plan, ExitCode> {
    std::fs::read_to_string(path)
        .map_err(|e| e.to_string())
        .and_then(|text| super::plan::Plan::parse(&text))
        .map_err(|e| usage(format!("plan {}: {e}", path.display())))
}

pub fn main(args: RolloutArgs) -> ExitCode {
    exit(match args.command {
        RolloutCommand::Promote { plan } => promote(&plan),
        RolloutCommand::Run {
            plan,
            admin_listen,
            store,
        } => run(&plan, admin_listen, store),
    })
}

fn promote(plan: &Path) -> Exit {
    use super::plan::Status;
    let plan = load_plan(plan)?;
    let state = super::read_state(&plan.state_file)
        .map_err(|e| usage(format!("rollout promote: {e}")))?
        .ok_or_else(|| {
            usage(format!(
                "rollout promote: no rollout state in {}: nothing waits at a gate",
                plan.state_file.display()
            ))
        })?;
    let step = state.step.map(|i| i + 1).unwrap_or(0);
    if state.status != Status::WaitingForPromotion {
        return Err(usage(format!(
            "rollout promote: nothing waits at a gate: the rollout is {} at step {step}",
            state.status.as_str()
        )));
    }
    let next = step + 1;
    std::fs::write(super::promote_file(&plan.state_file), next.to_string()).map_err(failure)?;
    println!("promoted: the controller goes on to step {next} at its next check");
    Ok(ExitCode::SUCCESS)
}

fn run(plan: &Path, admin_listen: SocketAddr, store: StoreArgs) -> Exit {
    use super::{Controller, Outcome};
    let plan = load_plan(plan)?;
    let store = store.store()?;
    let rt = runtime()?;
    rt.block_on(async move {
        let registry = prometheus::Registry::new();
        let metrics = metrics_or_exit(super::RolloutMetrics::new(&registry))?;
        let controller =
            Controller::new(plan, store, metrics).map_err(|e| usage(format!("rollout: {e}")))?;
        let router = admin::router(registry, Health::default())
            .merge(super::status_router(controller.clone()));
        let admin_port = AdminPort::start(admin_listen, router).await?;
        let shutdown = CancellationToken::new();
        crate::shutdown::cancel_on_signal(shutdown.clone());
        let res = match controller.run(shutdown).await {
            Ok(Outcome::Done) => {
                println!("rollout done: {}", controller.status_json());
                Ok(ExitCode::SUCCESS)
            }
            Ok(Outcome::Interrupted) => Ok(ExitCode::SUCCESS),
            Ok(Outcome::RolledBack(why)) => Err(failure(format!("rolled back: {why}"))),
            Err(e @ super::RolloutError::Plan(_)) => Err(usage(format!("rollout: {e}"))),
            Err(e) => {
                eprintln!("switchyard: rollout: {e}");
                Err(ExitCode::from(3))
            }
        };
        admin_port.finish().await;
        res
    })
}
