//! Local flags: a folder of LaunchDarkly flag JSON files (one flag a file),
//! validated as one set ([`super::folder`]) and evaluated with the
//! LaunchDarkly SDK's own evaluator over a snapshot, so targeting rules
//! behave as they do in LaunchDarkly and a request sees one consistent set.
//!
//! The folder is polled rather than watched with inotify: polling a handful of
//! small files every 100 ms costs nothing, and it also sees Kubernetes
//! ConfigMap updates (a symlink swap that inotify watchers routinely miss).
//!
//! The last good flags are persisted in the router's own data folder (flag
//! folders are often read-only ConfigMaps): a router restarted while a file
//! is broken serves what a running router serves, not the safe default.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::folder::{self, Files, FlagFileError, Origin, Resolved};
use super::FlagMetrics;
use super::{FlagKeys, FlagSource, Snapshot, SourceStatus};
use crate::routing::FlagValues;

/// What one reload did.
#[derive(Debug, Default, PartialEq)]
pub struct ReloadOutcome {
    /// True when what is served changed.
    pub changed: bool,
    /// Current problems: their flags keep their last good value.
    pub errors: Vec<FlagFileError>,
}

struct State {
    /// The files as last read (a reload with the same bytes does nothing).
    files: Option<Files>,
    /// The last good flags (from files that were good, or persisted).
    good: BTreeMap<String, Value>,
    resolved: Option<Resolved>,
    loaded_any: bool,
    last_error: Option<String>,
}

/// Flags from a local folder.
pub struct LocalFlags {
    dir: PathBuf,
    keys: FlagKeys,
    /// Where the last good flags are kept across restarts (None: memory only).
    last_good_file: Option<PathBuf>,
    snapshot: RwLock<Arc<Snapshot>>,
    state: Mutex<State>,
    metrics: FlagMetrics,
}

/// The last good flags file: written whole, synced, renamed.
#[derive(serde::Serialize, serde::Deserialize)]
struct Persisted {
    saved_at: f64,
    flags: BTreeMap<String, Value>,
}

impl LocalFlags {
    /// Loads the persisted last good flags (if any), then the folder. A
    /// missing or empty folder is not an error: every account then routes
    /// legacy (the kill switch fails closed), and `/readyz` says why.
    pub fn start(
        dir: &Path,
        keys: FlagKeys,
        last_good_file: Option<PathBuf>,
        metrics: FlagMetrics,
    ) -> Arc<LocalFlags> {
        let mut good = BTreeMap::new();
        if let Some(path) = &last_good_file {
            match std::fs::read(path) {
                Ok(bytes) => match serde_json::from_slice::<Persisted>(&bytes) {
                    Ok(p) => {
                        // Only what still passes today's checks.
                        for (k, v) in p.flags {
                            if folder::parse_flag(v.to_string().as_bytes(), &keys).is_ok() {
                                good.insert(k, v);
                            }
                        }
                        tracing::info!(file = %path.display(), flags = good.len(), saved_at = p.saved_at, "last good flags loaded");
                    }
                    Err(e) => {
                        tracing::warn!(file = %path.display(), error = %e, "last good flags unreadable: ignored")
                    }
                },
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "last good flags unreadable: ignored")
                }
            }
        }
        let flags = Arc::new(LocalFlags {
            dir: dir.to_path_buf(),
            keys,
            last_good_file,
            snapshot: RwLock::new(Arc::new(Snapshot::default())),
            state: Mutex::new(State {
                files: None,
                good,
                resolved: None,
                loaded_any: false,
                last_error: None,
            }),
            metrics,
        });
        let outcome = flags.reload();
        if !dir.is_dir() {
            tracing::warn!(dir = %dir.display(), "flags folder does not exist: every account routes legacy until it does");
        }
        tracing::info!(
            dir = %dir.display(),
            errors = outcome.errors.len(),
            "local flags loaded"
        );
        flags
    }

    /// Reads the folder and applies what changed.
    pub fn reload(&self) -> ReloadOutcome {
        let files = folder::read_files(&self.dir);
        let mut state = match self.state.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        if state.files.as_ref() == Some(&files) {
            let errors = state
                .resolved
                .as_ref()
                .map(|r| r.problems.clone())
                .unwrap_or_default();
            return ReloadOutcome {
                changed: false,
                errors,
            };
        }
        let resolved = folder::resolve(&self.dir, &files, &self.keys, &state.good);
        state.files = Some(files);
        let changed = state.resolved.as_ref().map(|r| &r.flags) != Some(&resolved.flags);
        // What came from a good file is the new last good value.
        let mut good_changed = false;
        for (key, origin) in &resolved.origins {
            if *origin == Origin::File {
                if let Some(v) = resolved.flags.get(key) {
                    if state.good.get(key) != Some(v) {
                        state.good.insert(key.clone(), v.clone());
                        good_changed = true;
                    }
                }
            }
        }
        if changed {
            let snap = Snapshot::from_json(&resolved.flags);
            *self.snapshot.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(snap);
            state.loaded_any = true;
            self.metrics.reloads.inc();
        }
        let before = state
            .resolved
            .as_ref()
            .map(|r| r.problems.as_slice())
            .unwrap_or_default();
        self.metrics.report_problems(before, &resolved.problems);
        state.last_error = resolved.problems.last().map(ToString::to_string);
        for (key, origin) in &resolved.origins {
            for o in [Origin::File, Origin::LastGood, Origin::SafeDefault] {
                self.metrics
                    .origin
                    .with_label_values(&[flag_label(key, &self.keys), origin_str(o)])
                    .set(i64::from(*origin == o));
            }
        }
        let errors = resolved.problems.clone();
        state.resolved = Some(resolved);
        let good = good_changed.then(|| state.good.clone());
        drop(state);
        if let Some(good) = good {
            self.persist(&good);
        }
        self.publish_values();
        ReloadOutcome { changed, errors }
    }

    fn persist(&self, good: &BTreeMap<String, Value>) {
        let Some(path) = &self.last_good_file else {
            return;
        };
        let saved_at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        let body = Persisted {
            saved_at,
            flags: good.clone(),
        };
        if let Err(e) = write_synced(path, &json!(body)) {
            self.metrics.persist_errors.inc();
            tracing::error!(file = %path.display(), error = %e, "cannot persist the last good flags: a restart while a flag file is broken would fall back to the safe default");
        }
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
                        match tokio::task::spawn_blocking(move || me.reload()).await {
                            Ok(o) if o.changed => tracing::info!(problems = o.errors.len(), "flags reloaded"),
                            Ok(_) => {}
                            Err(e) => tracing::error!(error = %e, "flag reload task failed"),
                        }
                    }
                }
            }
        })
    }

    fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn publish_values(&self) {
        self.snapshot().publish(&self.keys, &self.metrics);
    }
}

fn origin_str(o: Origin) -> &'static str {
    match o {
        Origin::File => "file",
        Origin::LastGood => "last-good",
        Origin::SafeDefault => "safe-default",
    }
}

fn flag_label(key: &str, keys: &FlagKeys) -> &'static str {
    if key == keys.kill_switch {
        "kill_switch"
    } else if key == keys.kafka_only {
        "kafka_only"
    } else {
        "dual_write"
    }
}

/// Writes `value` to `path` so that a crash leaves the old file or the new
/// one, never half: temporary file, fsync, rename, fsync of the folder.
pub fn write_synced(path: &Path, value: &Value) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    let text = serde_json::to_string_pretty(value).map_err(std::io::Error::other)?;
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.write_all(b"\n")?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

impl FlagSource for LocalFlags {
    fn evaluate(&self, account_id: u64) -> FlagValues {
        self.snapshot().evaluate(&self.keys, account_id)
    }

    fn status(&self) -> SourceStatus {
        let state = match self.state.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        let problems: Vec<String> = state
            .resolved
            .as_ref()
            .map(|r| r.problems.iter().map(ToString::to_string).collect())
            .unwrap_or_default();
        let origins = state
            .resolved
            .as_ref()
            .map(|r| {
                r.origins
                    .iter()
                    .map(|(k, o)| (flag_label(k, &self.keys).to_string(), origin_str(*o)))
                    .collect()
            })
            .unwrap_or_default();
        SourceStatus {
            kind: "local",
            loaded: state.loaded_any,
            ready: problems.is_empty(),
            last_error: state.last_error.clone(),
            problems,
            origins,
            state: None,
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

    fn kill_flag(on: bool) -> String {
        serde_json::json!({
            "key": "switchyard-kill-switch", "on": true, "targets": [], "contextTargets": [],
            "rules": [], "prerequisites": [], "fallthrough": {"variation": 0},
            "offVariation": 0, "variations": [on], "salt": "s", "version": 1
        })
        .to_string()
    }

    fn metrics() -> FlagMetrics {
        FlagMetrics::new(&prometheus::Registry::new()).unwrap()
    }

    #[test]
    fn loads_targets_keeps_last_good_and_fails_closed() {
        let dir = tempfile::tempdir().unwrap();
        let flags = LocalFlags::start(dir.path(), FlagKeys::default(), None, metrics());
        // Nothing at all: killed, and not ready.
        assert!(flags.evaluate(1).kill_switch);
        assert!(!flags.status().ready);

        std::fs::write(
            dir.path().join("switchyard-kill-switch.json"),
            kill_flag(false),
        )
        .unwrap();
        let file = dir.path().join("switchyard-dual-write.json");
        std::fs::write(
            &file,
            pct_flag("switchyard-dual-write", 25.0, Some(("42", 100.0))),
        )
        .unwrap();
        let o = flags.reload();
        assert!(o.changed && o.errors.is_empty(), "{o:?}");
        assert!(flags.status().ready);
        assert_eq!(flags.evaluate(1).dual_write, 25.0);
        assert_eq!(flags.evaluate(42).dual_write, 100.0);
        assert!(!flags.evaluate(1).kill_switch);

        std::fs::write(&file, "{ not json").unwrap();
        let o = flags.reload();
        assert_eq!(o.errors.len(), 1);
        assert!(o.errors[0].reason.contains("not a LaunchDarkly flag"));
        assert_eq!(flags.evaluate(1).dual_write, 25.0, "last good value kept");
        assert!(flags.status().last_error.is_some());
        assert!(!flags.status().ready);

        // Deleting the kill switch keeps its last good value and says so.
        std::fs::remove_file(dir.path().join("switchyard-kill-switch.json")).unwrap();
        let o = flags.reload();
        assert!(
            o.errors.iter().any(|e| e.reason.contains("missing")),
            "{o:?}"
        );
        assert!(!flags.evaluate(1).kill_switch);
    }

    #[test]
    fn a_restart_serves_the_persisted_last_good_flags() {
        let dir = tempfile::tempdir().unwrap();
        let data = tempfile::tempdir().unwrap();
        let last = data.path().join("flags-last-good.json");
        std::fs::write(
            dir.path().join("switchyard-kill-switch.json"),
            kill_flag(false),
        )
        .unwrap();
        let file = dir.path().join("switchyard-dual-write.json");
        std::fs::write(&file, pct_flag("switchyard-dual-write", 40.0, None)).unwrap();
        let flags = LocalFlags::start(
            dir.path(),
            FlagKeys::default(),
            Some(last.clone()),
            metrics(),
        );
        assert_eq!(flags.evaluate(1).dual_write, 40.0);
        drop(flags);
        // Both files broken while no router runs.
        std::fs::write(&file, "{").unwrap();
        std::fs::write(dir.path().join("switchyard-kill-switch.json"), "").unwrap();
        let flags = LocalFlags::start(dir.path(), FlagKeys::default(), Some(last), metrics());
        let v = flags.evaluate(1);
        assert_eq!(v.dual_write, 40.0);
        assert!(!v.kill_switch);
        assert!(!flags.status().ready);
        assert_eq!(flags.status().origins["dual_write"], "last-good");
    }
}
