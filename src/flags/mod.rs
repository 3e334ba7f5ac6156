//! Flag sources. Whatever the source (local `flags/` files or LaunchDarkly's
//! streaming service), flags are LaunchDarkly flags evaluated by the
//! LaunchDarkly SDK for an `account` context, so targeting rules behave the same
//! everywhere. The router only sees [`FlagSource`].

pub mod cli;
pub mod folder;
mod launchdarkly;
mod local;
mod metrics;
pub mod store;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use launchdarkly_server_sdk::{Client, ContextBuilder, Flag};
use launchdarkly_server_sdk_evaluation::{evaluate, Context, FlagValue, Segment, Store};
use serde::Serialize;
use serde_json::Value;

pub use folder::FlagFileError;
pub use launchdarkly::{LaunchDarklyFlags, LaunchDarklyOptions, LaunchDarklyStartError};
pub use local::{write_synced, LocalFlags, ReloadOutcome};
pub use metrics::FlagMetrics;

pub use crate::config::FlagKeys;
use crate::routing::FlagValues;

/// What a source says about itself, for `/readyz` and the route explainer.
#[derive(Debug, Clone, Serialize)]
pub struct SourceStatus {
    /// `local` or `launchdarkly`.
    pub kind: &'static str,
    /// True once real flag values were loaded (false: running on safe defaults).
    pub loaded: bool,
    /// False while any flag has a problem (a broken, missing or duplicate
    /// file, an invalid value): its last good value is served meanwhile.
    pub ready: bool,
    /// The last error, if the last reload failed (the previous values stay).
    pub last_error: Option<String>,
    /// Every current problem.
    pub problems: Vec<String>,
    /// Routing flag → where its value comes from (`file`, `last-good`,
    /// `safe-default`).
    pub origins: BTreeMap<String, &'static str>,
}

/// A consistent set of flags, evaluated with the SDK's evaluator: a request
/// reads the three routing flags from one snapshot, never half a reload.
#[derive(Default)]
pub struct Snapshot {
    flags: HashMap<String, Flag>,
}

impl Store for Snapshot {
    fn flag(&self, flag_key: &str) -> Option<Flag> {
        self.flags.get(flag_key).cloned()
    }

    fn segment(&self, _segment_key: &str) -> Option<Segment> {
        None
    }
}

impl Snapshot {
    /// From validated flag JSON (anything that does not parse is left out).
    pub fn from_json(flags: &BTreeMap<String, Value>) -> Snapshot {
        Snapshot {
            flags: flags
                .iter()
                .filter_map(|(k, v)| {
                    serde_json::from_value::<Flag>(v.clone())
                        .ok()
                        .map(|f| (k.clone(), f))
                })
                .collect(),
        }
    }

    fn value(&self, key: &str, ctx: &Context) -> Option<FlagValue> {
        let flag = self.flags.get(key)?;
        evaluate(self, flag, ctx, None).value.cloned()
    }

    /// The three routing flags for one account. A kill switch that cannot be
    /// evaluated fails closed (killed); a percentage is then 0.
    pub fn evaluate(&self, keys: &FlagKeys, account_id: u64) -> FlagValues {
        let Ok(ctx) = ContextBuilder::new(account_id.to_string())
            .kind("account")
            .build()
        else {
            return FlagValues {
                kill_switch: true,
                ..FlagValues::default()
            };
        };
        FlagValues {
            kill_switch: self
                .value(&keys.kill_switch, &ctx)
                .and_then(|v| v.as_bool())
                .unwrap_or(true),
            kafka_only: self
                .value(&keys.kafka_only, &ctx)
                .and_then(|v| v.as_float())
                .unwrap_or(0.0),
            dual_write: self
                .value(&keys.dual_write, &ctx)
                .and_then(|v| v.as_float())
                .unwrap_or(0.0),
        }
    }

    /// Sets the flag-value gauges to what an untargeted account gets.
    pub fn publish(&self, keys: &FlagKeys, metrics: &FlagMetrics) {
        publish_values(&self.evaluate(keys, u64::MAX), metrics);
    }
}

fn publish_values(v: &FlagValues, metrics: &FlagMetrics) {
    for (flag, value) in [
        ("kill_switch", if v.kill_switch { 1.0 } else { 0.0 }),
        ("kafka_only", v.kafka_only),
        ("dual_write", v.dual_write),
    ] {
        metrics.values.with_label_values(&[flag]).set(value);
    }
}

/// Flag values per account. Evaluation must be cheap and never block: it sits
/// in the request path.
pub trait FlagSource: Send + Sync + 'static {
    fn evaluate(&self, account_id: u64) -> FlagValues;
    fn status(&self) -> SourceStatus;
}

/// Evaluates the three routing flags with a LaunchDarkly client. A percentage
/// flag that is missing, off without an off variation, or of the wrong type
/// evaluates to 0; a kill switch that cannot be evaluated fails closed.
pub struct Evaluator {
    client: Arc<Client>,
    keys: FlagKeys,
}

impl Evaluator {
    pub fn new(client: Arc<Client>, keys: FlagKeys) -> Self {
        Evaluator { client, keys }
    }

    /// Sets the flag-value gauges to what an account without individual
    /// targeting gets.
    pub fn publish(&self, metrics: &FlagMetrics) {
        publish_values(&self.evaluate(u64::MAX), metrics);
    }

    pub fn keys(&self) -> &FlagKeys {
        &self.keys
    }

    pub fn evaluate(&self, account_id: u64) -> FlagValues {
        let ctx = match ContextBuilder::new(account_id.to_string())
            .kind("account")
            .build()
        {
            Ok(ctx) => ctx,
            // Cannot happen for a decimal key; the safe default if it ever does.
            Err(_) => return FlagValues::default(),
        };
        FlagValues {
            kill_switch: self
                .client
                .bool_variation(&ctx, &self.keys.kill_switch, true),
            kafka_only: self
                .client
                .float_variation(&ctx, &self.keys.kafka_only, 0.0),
            dual_write: self
                .client
                .float_variation(&ctx, &self.keys.dual_write, 0.0),
        }
    }
}
