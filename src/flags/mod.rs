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

use launchdarkly_server_sdk::{ContextBuilder, Flag};
use launchdarkly_server_sdk_evaluation::{evaluate, Context, FlagValue, Segment, Store};
use serde::Serialize;
use serde_json::Value;

pub use folder::FlagFileError;
pub use launchdarkly::{
    report_write, LaunchDarklyFlags, LaunchDarklyOptions, LaunchDarklyStartError, EVENT_CAPACITY,
    EVENT_FLUSH_INTERVAL,
};
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
    /// LaunchDarkly: `live`, `persisted <age>` or `safe default`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
}

/// A consistent set of flags, evaluated with the SDK's evaluator: a request
/// reads the three routing flags from one snapshot, never half a reload.
#[derive(Default)]
pub struct Snapshot {
    flags: HashMap<String, Flag>,
    segments: HashMap<String, Segment>,
}

impl Store for Snapshot {
    fn flag(&self, flag_key: &str) -> Option<Flag> {
        self.flags.get(flag_key).cloned()
    }

    fn segment(&self, segment_key: &str) -> Option<Segment> {
        self.segments.get(segment_key).cloned()
    }
}

impl Snapshot {
    /// From validated flag JSON (anything that does not parse is left out).
    pub fn from_json(flags: &BTreeMap<String, Value>) -> Snapshot {
        Snapshot::from_json_with_segments(flags, &BTreeMap::new())
    }

    /// With the segments rules may refer to.
    pub fn from_json_with_segments(
        flags: &BTreeMap<String, Value>,
        segments: &BTreeMap<String, Value>,
    ) -> Snapshot {
        Snapshot {
            flags: flags
                .iter()
                .filter_map(|(k, v)| {
                    serde_json::from_value::<Flag>(v.clone())
                        .ok()
                        .map(|f| (k.clone(), f))
                })
                .collect(),
            segments: segments
                .iter()
                .filter_map(|(k, v)| {
                    serde_json::from_value::<Segment>(v.clone())
                        .ok()
                        .map(|s| (k.clone(), s))
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
            // A migration flag that cannot be evaluated is `off`: legacy.
            migration: keys.migration.as_ref().map(|k| {
                self.value(k, &ctx)
                    .and_then(|v| match v {
                        FlagValue::Str(s) => crate::routing::stage_route(&s),
                        _ => None,
                    })
                    .unwrap_or(crate::routing::Route::Legacy)
            }),
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

/// How one sink took a payload's write.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SinkOutcome {
    pub latency: std::time::Duration,
    pub ok: bool,
}

/// One payload's write to the sinks its route chose, as LaunchDarkly's
/// migration insights count a write: `old` is the offline file, `new` Kafka
/// (None: not invoked for this route).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WriteReport {
    pub account_id: u64,
    pub old: Option<SinkOutcome>,
    pub new: Option<SinkOutcome>,
}

/// Flag values per account. Evaluation must be cheap and never block: it sits
/// in the request path.
pub trait FlagSource: Send + Sync + 'static {
    fn evaluate(&self, account_id: u64) -> FlagValues;
    fn status(&self) -> SourceStatus;
    /// Whether this request's write is reported ([`FlagSource::track_write`]):
    /// asked once per request, so a source samples cheaply here.
    fn sample_write(&self) -> bool {
        false
    }
    /// Reports a sampled write. Never blocks.
    fn track_write(&self, _write: &WriteReport) {}
}
