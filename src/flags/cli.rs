//! `switchyard flags`: its command line, and where flags are changed
//! (the local folder or LaunchDarkly), shared with `switchyard rollout`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};

use crate::cli::{config, exit, failure, runtime, usage, Exit};

/// Where the routing flags are changed: the local folder, or LaunchDarkly.
#[derive(Args, Clone)]
pub struct StoreArgs {
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
    /// A file holding the LaunchDarkly API access token (a mounted secret).
    #[arg(
        long,
        env = "LD_API_TOKEN_FILE",
        global = true,
        conflicts_with = "ld_api_token"
    )]
    ld_api_token_file: Option<PathBuf>,
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
    pub fn store(&self) -> Result<crate::flags::store::FlagStore, ExitCode> {
        use crate::flags::store::{Api, FlagStore};
        let mut cfg = config(self.config.as_deref())?;
        if let Some(d) = &self.flags_dir {
            cfg.flags.dir = d.clone();
        }
        let keys = cfg.flags.keys.clone();
        let token = match &self.ld_api_token_file {
            Some(path) => Some(crate::cli::secret_file("ld-api-token-file", path)?),
            None => self.ld_api_token.clone(),
        };
        Ok(match &token {
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
pub struct FlagsArgs {
    #[command(subcommand)]
    command: FlagsCommand,
    #[command(flatten)]
    store: StoreArgs,
}

#[derive(Subcommand)]
pub enum FlagsCommand {
    /// Print the three routing flags.
    Get {
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
    /// Per flag (and per LaunchDarkly environment the token can read): what
    /// is served (a value or rollout weights), the version, the last change.
    Status {
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

pub fn main(args: FlagsArgs) -> ExitCode {
    exit(run(args))
}

fn run(args: FlagsArgs) -> Exit {
    use crate::flags::store::{StoreError, Which};
    let store = args.store.store()?;
    if let FlagsCommand::Status { json } = &args.command {
        let json = *json;
        let rt = runtime()?;
        return rt.block_on(async move {
            let v = store.status().await.map_err(failure)?;
            if json {
                println!("{v}");
            } else {
                print_status(&v);
            }
            Ok(ExitCode::SUCCESS)
        });
    }
    let keys = store.keys().clone();
    let (which, value, force, comment) = match &args.command {
        FlagsCommand::Get { .. } | FlagsCommand::Status { .. } => {
            (None, serde_json::Value::Null, false, String::new())
        }
        FlagsCommand::Set {
            flag,
            value,
            force,
            comment,
        } => {
            let w = Which::parse(flag, &keys).ok_or_else(|| {
                usage(format!(
                    "unknown flag {flag:?}: use kill-switch, kafka-only or dual-write"
                ))
            })?;
            let v = serde_json::from_str::<serde_json::Value>(value)
                .map_err(|_| usage(format!("{value:?} is neither a number nor true/false")))?;
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
    let rt = runtime()?;
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
                Ok(ExitCode::SUCCESS)
            }
            Err(e @ StoreError::Invalid(_)) => Err(usage(e)),
            Err(e) => Err(failure(e)),
        }
    })
}

/// `flags status` for a person: one line per flag (and environment).
fn print_status(v: &serde_json::Value) {
    let serves = |e: &serde_json::Value| -> String {
        if let Some(r) = e["rollout"].as_array() {
            r.iter()
                .map(|w| format!("{} {}%", w["value"], w["weight_percent"]))
                .collect::<Vec<_>>()
                .join(" / ")
        } else {
            format!(
                "{}{}",
                e["serves"],
                if e["on"] == false { " (off)" } else { "" }
            )
        }
    };
    for (name, f) in v.as_object().into_iter().flatten() {
        if name == "problems" {
            for p in f.as_array().into_iter().flatten() {
                println!("problem: {}", p.as_str().unwrap_or_default());
            }
            continue;
        }
        match f["environments"].as_object() {
            Some(envs) => {
                for (env, e) in envs {
                    println!(
                        "{name:<12} {env:<14} serves {}  version {}  last modified {}",
                        serves(e),
                        e["version"],
                        e["last_modified"]
                    );
                }
            }
            None => println!(
                "{name:<12} {}  serves {}  version {}",
                f["file"].as_str().unwrap_or_default(),
                f["local"]
                    .as_object()
                    .map(|_| serves(&f["local"]))
                    .unwrap_or_else(|| "nothing (no file)".into()),
                f["version"]
            ),
        }
    }
}
