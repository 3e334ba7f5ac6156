//! Local flags: a folder of LaunchDarkly flag JSON files (one flag a file),
//! fed into the LaunchDarkly SDK through its `TestData` data source.
//!
//! The folder is polled rather than watched with inotify: polling a handful of
//! small files every 100 ms costs nothing, and it also sees Kubernetes
//! ConfigMap updates (a symlink swap that inotify watchers routinely miss).
//! A file that does not parse keeps the last good value of its flag.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use launchdarkly_server_sdk::{Client, ConfigBuilder, Flag, NullEventProcessorBuilder, TestData};
use tokio_util::sync::CancellationToken;

use super::FlagMetrics;
use super::{Evaluator, FlagKeys, FlagSource, SourceStatus};
use crate::routing::FlagValues;

/// A flag file that could not be used.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
#[error("{path}: {reason}")]
pub struct FlagFileError {
    pub path: String,
    pub reason: String,
}

/// What one reload did.
#[derive(Debug, Default, PartialEq)]
pub struct ReloadOutcome {
    /// Flags set or changed.
    pub changed: usize,
    /// Flags whose file disappeared (they now evaluate to the safe default).
    pub removed: usize,
    /// Files that could not be used; their flags keep their last good value.
    pub errors: Vec<FlagFileError>,
}

#[derive(Default)]
struct State {
    /// Path → (bytes last seen, flag key they defined if they parsed).
    files: HashMap<PathBuf, (Vec<u8>, Option<String>)>,
    loaded_any: bool,
    last_error: Option<String>,
}

/// Flags from a local folder.
pub struct LocalFlags {
    dir: PathBuf,
    data: TestData,
    client: Arc<Client>,
    evaluator: Evaluator,
    state: Mutex<State>,
    metrics: FlagMetrics,
}

/// Error starting the local source (the SDK client failed to build).
#[derive(Debug, thiserror::Error)]
#[error("cannot start the flag evaluator: {0}")]
pub struct StartError(String);

impl LocalFlags {
    /// Builds the evaluator and loads the folder once. A missing or empty
    /// folder is not an error: every account then routes legacy.
    pub async fn start(
        dir: &Path,
        keys: FlagKeys,
        metrics: FlagMetrics,
    ) -> Result<Arc<LocalFlags>, StartError> {
        let data = TestData::new();
        let config = ConfigBuilder::new("local-flags")
            .data_source(&data)
            .event_processor(&NullEventProcessorBuilder::new())
            .build()
            .map_err(|e| StartError(e.to_string()))?;
        let client = Arc::new(Client::build(config).map_err(|e| StartError(e.to_string()))?);
        client.start_with_default_executor();
        // TestData initialises synchronously; the wait only orders us after it.
        if client.wait_for_initialization(Duration::from_secs(5)).await != Some(true) {
            return Err(StartError("the flag store did not initialise".into()));
        }
        let flags = Arc::new(LocalFlags {
            dir: dir.to_path_buf(),
            data,
            evaluator: Evaluator::new(client.clone(), keys),
            client,
            state: Mutex::new(State::default()),
            metrics,
        });
        let outcome = flags.reload();
        if !dir.is_dir() {
            tracing::warn!(dir = %dir.display(), "flags folder does not exist: every account routes legacy until it does");
        }
        tracing::info!(
            dir = %dir.display(),
            changed = outcome.changed,
            errors = outcome.errors.len(),
            "local flags loaded"
        );
        Ok(flags)
    }

    /// Reads the folder and applies what changed.
    pub fn reload(&self) -> ReloadOutcome {
        let mut outcome = ReloadOutcome::default();
        let mut seen: Vec<PathBuf> = Vec::new();
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e
                .filter_map(Result::ok)
                .map(|e| e.path())
                .collect::<Vec<_>>(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                outcome.errors.push(FlagFileError {
                    path: self.dir.display().to_string(),
                    reason: format!("cannot list the folder: {e}"),
                });
                Vec::new()
            }
        };
        let mut state = match self.state.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        let listing_failed = !outcome.errors.is_empty();
        for path in entries {
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            seen.push(path.clone());
            let bytes = match std::fs::read(&path) {
                Ok(b) => b,
                // Renamed away between listing and reading: next poll sees it.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    outcome.errors.push(FlagFileError {
                        path: path.display().to_string(),
                        reason: format!("cannot read: {e}"),
                    });
                    continue;
                }
            };
            if state.files.get(&path).is_some_and(|(b, _)| *b == bytes) {
                continue;
            }
            match serde_json::from_slice::<Flag>(&bytes) {
                Ok(flag) => {
                    let key = flag.key.clone();
                    self.data.use_preconfigured_flag(flag);
                    state.files.insert(path, (bytes, Some(key)));
                    outcome.changed += 1;
                }
                Err(e) => {
                    outcome.errors.push(FlagFileError {
                        path: path.display().to_string(),
                        reason: format!("not a LaunchDarkly flag: {e}"),
                    });
                    // Remember the bad bytes so the error is logged once, not
                    // every poll; keep the key of the last good version.
                    let key = state.files.get(&path).and_then(|(_, k)| k.clone());
                    state.files.insert(path, (bytes, key));
                }
            }
        }
        if !listing_failed {
            let gone: Vec<PathBuf> = state
                .files
                .keys()
                .filter(|p| !seen.contains(p))
                .cloned()
                .collect();
            for path in gone {
                if let Some((_, Some(key))) = state.files.remove(&path) {
                    let still_defined = state
                        .files
                        .values()
                        .any(|(_, k)| k.as_deref() == Some(key.as_str()));
                    if !still_defined {
                        if let Some(t) = tombstone(&key) {
                            self.data.use_preconfigured_flag(t);
                        }
                        outcome.removed += 1;
                    }
                }
            }
        }
        if outcome.changed + outcome.removed > 0 {
            state.loaded_any = true;
            self.metrics.reloads.inc();
        }
        if outcome.errors.is_empty() {
            if outcome.changed + outcome.removed > 0 {
                state.last_error = None;
            }
        } else {
            self.metrics
                .reload_errors
                .inc_by(outcome.errors.len() as u64);
            for e in &outcome.errors {
                tracing::error!(file = %e.path, reason = %e.reason, "flag file rejected; its flag keeps its last good value");
            }
            state.last_error = outcome.errors.last().map(ToString::to_string);
        }
        drop(state);
        self.publish_values();
        outcome
    }

    /// Polls the folder every `interval` until `shutdown`.
    pub fn watch(
        self: &Arc<Self>,
        interval: Duration,
        shutdown: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tick.tick() => {
                        let me = this.clone();
                        // File reads are blocking; keep them off the request threads.
                        let outcome = tokio::task::spawn_blocking(move || me.reload()).await;
                        match outcome {
                            Ok(o) if o.changed + o.removed > 0 => {
                                tracing::info!(changed = o.changed, removed = o.removed, "flags reloaded");
                            }
                            Ok(_) => {}
                            Err(e) => tracing::error!(error = %e, "flag reload task failed"),
                        }
                    }
                }
            }
            this.client.close();
        })
    }

    fn publish_values(&self) {
        self.evaluator.publish(&self.metrics);
    }
}

/// A flag that evaluates to the caller's default: off, with no off variation.
fn tombstone(key: &str) -> Option<Flag> {
    serde_json::from_value(serde_json::json!({
        "key": key,
        "on": false,
        "targets": [],
        "rules": [],
        "prerequisites": [],
        "fallthrough": {"variation": 0},
        "offVariation": null,
        "variations": [],
        "salt": "",
    }))
    .ok()
}

impl FlagSource for LocalFlags {
    fn evaluate(&self, account_id: u64) -> FlagValues {
        self.evaluator.evaluate(account_id)
    }

    fn status(&self) -> SourceStatus {
        let state = match self.state.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        SourceStatus {
            kind: "local",
            loaded: state.loaded_any,
            last_error: state.last_error.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pct_flag(key: &str, value: f64, targeted: Option<(&str, f64)>) -> String {
        let mut variations = vec![serde_json::json!(value)];
        let mut context_targets = vec![];
        if let Some((account, v)) = targeted {
            variations.push(serde_json::json!(v));
            context_targets.push(
                serde_json::json!({"contextKind":"account","values":[account],"variation":1}),
            );
        }
        serde_json::json!({
            "key": key, "on": true, "targets": [], "contextTargets": context_targets,
            "rules": [], "prerequisites": [], "fallthrough": {"variation": 0},
            "offVariation": 0, "variations": variations, "salt": "s", "version": 1
        })
        .to_string()
    }

    #[tokio::test]
    async fn loads_targets_keeps_last_good_and_removes() {
        let dir = tempfile::tempdir().unwrap();
        let reg = prometheus::Registry::new();
        let metrics = super::FlagMetrics::new(&reg).unwrap();
        let flags = LocalFlags::start(dir.path(), FlagKeys::default(), metrics)
            .await
            .unwrap();
        assert_eq!(flags.evaluate(1), FlagValues::default());
        assert!(!flags.status().loaded);

        let file = dir.path().join("dual.json");
        std::fs::write(
            &file,
            pct_flag("switchyard-dual-write", 25.0, Some(("42", 100.0))),
        )
        .unwrap();
        let o = flags.reload();
        assert_eq!(o.changed, 1);
        assert_eq!(flags.evaluate(1).dual_write, 25.0);
        assert_eq!(flags.evaluate(42).dual_write, 100.0);

        std::fs::write(&file, "{ not json").unwrap();
        let o = flags.reload();
        assert_eq!(o.errors.len(), 1);
        assert!(o.errors[0].reason.contains("not a LaunchDarkly flag"));
        assert_eq!(flags.evaluate(1).dual_write, 25.0, "last good value kept");
        assert!(flags.status().last_error.is_some());

        std::fs::remove_file(&file).unwrap();
        let o = flags.reload();
        assert_eq!(o.removed, 1);
        assert_eq!(flags.evaluate(42).dual_write, 0.0);
    }
}
