//! Flag sources. Whatever the source (local `flags/` files or LaunchDarkly's
//! streaming service), flags are LaunchDarkly flags evaluated by the
//! LaunchDarkly SDK for an `account` context, so targeting rules behave the same
//! everywhere. The router only sees [`FlagSource`].

pub mod cli;
mod launchdarkly;
mod local;
mod metrics;
pub mod store;

use std::sync::Arc;

use launchdarkly_server_sdk::{Client, ContextBuilder};
use serde::Serialize;

pub use launchdarkly::{LaunchDarklyFlags, LaunchDarklyOptions, LaunchDarklyStartError};
pub use local::{FlagFileError, LocalFlags, ReloadOutcome, StartError as LocalStartError};
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
    /// The last error, if the last reload failed (the previous values stay).
    pub last_error: Option<String>,
}

/// Flag values per account. Evaluation must be cheap and never block: it sits
/// in the request path.
pub trait FlagSource: Send + Sync + 'static {
    fn evaluate(&self, account_id: u64) -> FlagValues;
    fn status(&self) -> SourceStatus;
}

/// Evaluates the three routing flags with a LaunchDarkly client. A flag that is
/// missing, off without an off variation, or of the wrong type evaluates to the
/// safe default (kill switch off, 0%).
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
        let v = self.evaluate(u64::MAX);
        for (flag, value) in [
            ("kill_switch", if v.kill_switch { 1.0 } else { 0.0 }),
            ("kafka_only", v.kafka_only),
            ("dual_write", v.dual_write),
        ] {
            metrics.values.with_label_values(&[flag]).set(value);
        }
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
                .bool_variation(&ctx, &self.keys.kill_switch, false),
            kafka_only: self
                .client
                .float_variation(&ctx, &self.keys.kafka_only, 0.0),
            dual_write: self
                .client
                .float_variation(&ctx, &self.keys.dual_write, 0.0),
        }
    }
}
