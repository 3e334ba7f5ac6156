//! Reading and changing the routing flags where operators keep them: the
//! local `flags/` folder (LaunchDarkly flag JSON, one file a flag) or the
//! LaunchDarkly REST API. Used by `switchyard flags` and the rollout controller.

use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::{json, Value};

use super::FlagKeys;

/// The three routing flags' values for an account without individual targeting.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Current {
    pub kill_switch: bool,
    pub kafka_only: f64,
    pub dual_write: f64,
}

/// Which routing flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    KillSwitch,
    KafkaOnly,
    DualWrite,
}

impl Which {
    /// `kill-switch`, `kafka-only`, `dual-write`, or a configured key.
    pub fn parse(name: &str, keys: &FlagKeys) -> Option<Which> {
        match name {
            "kill-switch" | "kill_switch" => Some(Which::KillSwitch),
            "kafka-only" | "kafka_only" => Some(Which::KafkaOnly),
            "dual-write" | "dual_write" => Some(Which::DualWrite),
            k if k == keys.kill_switch => Some(Which::KillSwitch),
            k if k == keys.kafka_only => Some(Which::KafkaOnly),
            k if k == keys.dual_write => Some(Which::DualWrite),
            _ => None,
        }
    }

    pub fn key(self, keys: &FlagKeys) -> &str {
        match self {
            Which::KillSwitch => &keys.kill_switch,
            Which::KafkaOnly => &keys.kafka_only,
            Which::DualWrite => &keys.dual_write,
        }
    }
}

/// Why a change was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0}")]
    Invalid(String),
    #[error("flag file {path}: {message}")]
    File { path: String, message: String },
    #[error("LaunchDarkly API {what}: {message}")]
    Api { what: String, message: String },
}

/// Checks a new value against the rules: percentages 0–100 at the routing
/// resolution (0.01), the kill switch a boolean, and Kafka-only never above
/// dual-write unless forced (an account would otherwise go straight from
/// legacy to Kafka only, skipping the parity-checked dual stage).
pub fn validate(
    which: Which,
    value: &Value,
    current: &Current,
    force: bool,
) -> Result<Value, StoreError> {
    match which {
        Which::KillSwitch => match value {
            Value::Bool(_) => Ok(value.clone()),
            _ => Err(StoreError::Invalid(
                "the kill switch is true or false".into(),
            )),
        },
        Which::KafkaOnly | Which::DualWrite => {
            let pct = super::folder::check_percent(value).map_err(StoreError::Invalid)?;
            let (kafka, dual) = match which {
                Which::KafkaOnly => (pct, current.dual_write),
                _ => (current.kafka_only, pct),
            };
            if kafka > dual && !force {
                return Err(StoreError::Invalid(format!(
                    "kafka-only ({kafka}) would be above dual-write ({dual}): accounts would skip the dual stage; raise dual-write first or pass --force"
                )));
            }
            Ok(json!(pct))
        }
    }
}

/// The flags as a store shows them, with what is wrong with them.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    /// What an untargeted account is served (problems resolved the way a
    /// router without a last good value resolves them: the kill switch fails
    /// closed, a percentage is 0).
    pub current: Current,
    /// Every problem, each naming its file (or flag), reason and keys.
    pub problems: Vec<super::FlagFileError>,
}

impl Reading {
    /// The problems as lines a person reads.
    pub fn problem_text(&self) -> Vec<String> {
        self.problems.iter().map(ToString::to_string).collect()
    }
}

/// Where the flags live.
pub enum FlagStore {
    Local { dir: PathBuf, keys: FlagKeys },
    LaunchDarkly(Api),
}

/// The LaunchDarkly REST API (v2), for one project and environment.
pub struct Api {
    pub base: String,
    pub token: String,
    pub project: String,
    pub environment: String,
    pub keys: FlagKeys,
    client: reqwest::Client,
}

impl Api {
    pub fn new(
        base: &str,
        token: String,
        project: String,
        environment: String,
        keys: FlagKeys,
    ) -> Api {
        Api {
            base: base.trim_end_matches('/').to_string(),
            token,
            project,
            environment,
            keys,
            client: reqwest::Client::new(),
        }
    }

    fn url(&self, key: &str) -> String {
        format!("{}/api/v2/flags/{}/{}", self.base, self.project, key)
    }

    /// A flag with the chosen environment only.
    async fn fetch(&self, key: &str) -> Result<Value, StoreError> {
        self.get_flag(key, Some(&self.environment)).await
    }

    /// A flag with every environment the token can read.
    async fn fetch_all(&self, key: &str) -> Result<Value, StoreError> {
        self.get_flag(key, None).await
    }

    async fn get_flag(&self, key: &str, env: Option<&str>) -> Result<Value, StoreError> {
        let err = |message: String| StoreError::Api {
            what: format!("GET flag {key}"),
            message,
        };
        let mut req = self.client.get(self.url(key));
        if let Some(env) = env {
            req = req.query(&[("env", env)]);
        }
        let r = req
            .header("Authorization", &self.token)
            .send()
            .await
            .map_err(|e| err(e.to_string()))?;
        let status = r.status();
        let text = r.text().await.map_err(|e| err(e.to_string()))?;
        if !status.is_success() {
            let message = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|b| b["message"].as_str().map(str::to_string))
                .unwrap_or(text);
            return Err(err(format!("{status} {message}")));
        }
        serde_json::from_str(&text).map_err(|e| err(format!("not a flag: {e}")))
    }

    /// The value served to an untargeted account, and the fallthrough index.
    fn served(&self, flag: &Value) -> Option<(Value, usize)> {
        let env = &flag["environments"][&self.environment];
        let fall = env["fallthrough"]["variation"].as_u64()? as usize;
        let idx = if env["on"].as_bool()? {
            fall
        } else {
            env["offVariation"].as_u64()? as usize
        };
        Some((flag["variations"][idx]["value"].clone(), fall))
    }

    /// The version of the chosen environment's configuration of a flag.
    fn env_version(&self, flag: &Value) -> Result<Value, StoreError> {
        let v = &flag["environments"][&self.environment]["version"];
        if v.is_null() {
            return Err(StoreError::Api {
                what: format!("flag {}", flag["key"].as_str().unwrap_or("?")),
                message: format!("no environment {:?} in the flag", self.environment),
            });
        }
        Ok(v.clone())
    }

    /// A JSON patch touching only the chosen environment (and appending a
    /// variation, which changes no environment), conditional on the
    /// environment's version read: `Ok(false)` when someone changed it
    /// meanwhile.
    async fn patch(&self, key: &str, comment: &str, ops: Vec<Value>) -> Result<bool, StoreError> {
        let err = |message: String| StoreError::Api {
            what: format!("PATCH flag {key}"),
            message,
        };
        let r = self
            .client
            .patch(self.url(key))
            .header("Authorization", &self.token)
            .json(&json!({"comment": comment, "patch": ops}))
            .send()
            .await
            .map_err(|e| err(e.to_string()))?;
        let status = r.status();
        if status.is_success() {
            return Ok(true);
        }
        let body = r.text().await.unwrap_or_default();
        let message = serde_json::from_str::<Value>(&body)
            .ok()
            .and_then(|b| b["message"].as_str().map(str::to_string))
            .unwrap_or_else(|| body.chars().take(300).collect());
        match status.as_u16() {
            409 => Ok(false),
            400 if message.to_ascii_lowercase().contains("test") => Ok(false),
            405 => Err(err(format!(
                "environment {:?} requires approval for changes to {key} (LaunchDarkly answered 405: {message}); nothing was changed: request the change in LaunchDarkly (an approval request for this flag and environment), or use an environment without required approvals",
                self.environment
            ))),
            _ => Err(err(format!("{status}: {message}"))),
        }
    }
}

/// The index of the variation whose value is `value` (numbers compared as
/// numbers), or None.
fn find_variation(flag: &Value, value: &Value) -> Option<usize> {
    flag["variations"].as_array()?.iter().position(|v| {
        let have = &v["value"];
        match (have.as_f64(), value.as_f64()) {
            (Some(a), Some(b)) => a == b,
            _ => have == value,
        }
    })
}

/// What an environment configuration (`cfg`: `on`, `fallthrough`,
/// `offVariation`) of `flag` serves an untargeted context.
fn served_summary(flag: &Value, cfg: &Value) -> Value {
    let value = |i: &Value| {
        i.as_u64().map(|i| {
            let v = &flag["variations"][i as usize];
            if v.is_object() {
                v["value"].clone()
            } else {
                v.clone()
            }
        })
    };
    if cfg["on"].as_bool() != Some(true) {
        return json!({"on": false, "serves": value(&cfg["offVariation"])});
    }
    let fall = &cfg["fallthrough"];
    if let Some(r) = fall["rollout"]["variations"].as_array() {
        let weights: Vec<Value> = r
            .iter()
            .map(|w| json!({"value": value(&w["variation"]), "weight_percent": w["weight"].as_f64().map(|x| x / 1000.0)}))
            .collect();
        return json!({"on": true, "rollout": weights});
    }
    json!({"on": true, "serves": value(&fall["variation"])})
}

/// Conflicting writes retried before giving up.
const ATTEMPTS: usize = 5;

fn conflicts(key: &str) -> StoreError {
    StoreError::Api {
        what: format!("PATCH flag {key}"),
        message: format!("{ATTEMPTS} conflicting writes in a row: someone else keeps changing it"),
    }
}

impl FlagStore {
    pub fn keys(&self) -> &FlagKeys {
        match self {
            FlagStore::Local { keys, .. } => keys,
            FlagStore::LaunchDarkly(api) => &api.keys,
        }
    }

    /// The flags and their problems.
    pub async fn read(&self) -> Result<Reading, StoreError> {
        match self {
            FlagStore::Local { dir, keys } => Ok(read_folder(dir, keys)),
            FlagStore::LaunchDarkly(api) => {
                let keys = &api.keys;
                let mut problems = Vec::new();
                let mut current = Current {
                    kill_switch: true,
                    kafka_only: 0.0,
                    dual_write: 0.0,
                };
                for which in [Which::KillSwitch, Which::KafkaOnly, Which::DualWrite] {
                    let key = which.key(keys);
                    let f = api.fetch(key).await?;
                    let problem = |reason: String| super::FlagFileError {
                        path: format!("flag {key}"),
                        reason,
                        keys: vec![key.to_string()],
                    };
                    let Some((v, _)) = api.served(&f) else {
                        problems.push(problem(format!(
                            "serves nothing in environment {:?}",
                            api.environment
                        )));
                        continue;
                    };
                    match which {
                        Which::KillSwitch => match v.as_bool() {
                            Some(b) => current.kill_switch = b,
                            None => {
                                problems.push(problem(format!("serves {v}, not true or false")))
                            }
                        },
                        Which::KafkaOnly | Which::DualWrite => {
                            match super::folder::check_percent(&v) {
                                Ok(p) if which == Which::KafkaOnly => current.kafka_only = p,
                                Ok(p) => current.dual_write = p,
                                Err(e) => problems.push(problem(e)),
                            }
                        }
                    }
                }
                Ok(Reading { current, problems })
            }
        }
    }

    /// Per flag (and, with LaunchDarkly, per environment the token can
    /// read): what is served (a value, or rollout weights), the version, the
    /// last change. For `switchyard flags status`.
    pub async fn status(&self) -> Result<Value, StoreError> {
        let keys = self.keys().clone();
        let mut names = vec![
            ("kill-switch", keys.kill_switch.clone()),
            ("kafka-only", keys.kafka_only.clone()),
            ("dual-write", keys.dual_write.clone()),
        ];
        if let Some(m) = &keys.migration {
            names.push(("migration", m.clone()));
        }
        let mut out = serde_json::Map::new();
        match self {
            FlagStore::Local { dir, .. } => {
                let reading = read_folder(dir, &keys);
                for (name, key) in names {
                    let path = flag_path(dir, &key);
                    let f = read_local(dir, &key).ok().flatten();
                    let modified = std::fs::metadata(&path)
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                        .map(|d| d.as_secs());
                    out.insert(
                        name.to_string(),
                        json!({"key": key, "file": path.display().to_string(),
                            "local": f.as_ref().map(|f| served_summary(f, f)),
                            "version": f.as_ref().map(|f| f["version"].clone()),
                            "modified_unix": modified}),
                    );
                }
                out.insert("problems".into(), json!(reading.problem_text()));
            }
            FlagStore::LaunchDarkly(api) => {
                for (name, key) in names {
                    let f = api.fetch_all(&key).await?;
                    let mut envs = serde_json::Map::new();
                    for (env, cfg) in f["environments"].as_object().into_iter().flatten() {
                        let mut e = served_summary(&f, cfg);
                        e["version"] = cfg["version"].clone();
                        e["last_modified"] = cfg["lastModified"].clone();
                        envs.insert(env.clone(), e);
                    }
                    out.insert(
                        name.to_string(),
                        json!({"key": key, "flag_version": f["_version"], "environments": envs}),
                    );
                }
            }
        }
        Ok(Value::Object(out))
    }

    /// The flags, or an error naming every problem.
    pub async fn get(&self) -> Result<Current, StoreError> {
        let r = self.read().await?;
        if r.problems.is_empty() {
            Ok(r.current)
        } else {
            Err(StoreError::Invalid(format!(
                "the flags have problems: {}",
                r.problem_text().join("; ")
            )))
        }
    }

    /// Validates and applies one change, recording `comment` where the store
    /// keeps one. The kill switch is written alone, whatever state the other
    /// flags are in: it must always work.
    pub async fn set(
        &self,
        which: Which,
        value: Value,
        force: bool,
        comment: &str,
    ) -> Result<Current, StoreError> {
        let key = which.key(self.keys()).to_string();
        if which == Which::KillSwitch {
            let on = value
                .as_bool()
                .ok_or_else(|| StoreError::Invalid("the kill switch is true or false".into()))?;
            self.set_kill(on, comment).await?;
            return Ok(self.read().await?.current);
        }
        let reading = self.read().await?;
        // A problem with the flag being set (or one it is part of, such as
        // kafka-only above dual-write) is what the set repairs; any other
        // problem makes the transition rules unverifiable.
        let others: Vec<String> = reading
            .problems
            .iter()
            .filter(|p| !p.keys.contains(&key))
            .map(ToString::to_string)
            .collect();
        if !others.is_empty() {
            return Err(StoreError::Invalid(format!(
                "cannot change {key} while other flags have problems: {}",
                others.join("; ")
            )));
        }
        let value = validate(which, &value, &reading.current, force)?;
        match self {
            FlagStore::Local { dir, keys } => {
                let mut f = match read_local(dir, &key) {
                    Ok(Some(f))
                        if super::folder::parse_flag(f.to_string().as_bytes(), keys).is_ok() =>
                    {
                        f
                    }
                    Ok(Some(f)) => {
                        let mut n = new_flag(&key, &value);
                        n["version"] = json!(f["version"].as_u64().unwrap_or(0));
                        n
                    }
                    _ => new_flag(&key, &value),
                };
                let fall = f["fallthrough"]["variation"].as_u64().unwrap_or(0) as usize;
                let version = f["version"].as_u64().unwrap_or(0) + 1;
                if f["variations"].get(fall).is_none() {
                    return Err(StoreError::File {
                        path: flag_path(dir, &key).display().to_string(),
                        message: "the fallthrough variation does not exist".into(),
                    });
                }
                f["variations"][fall] = value.clone();
                f["fallthrough"] = json!({"variation": fall});
                f["on"] = json!(true);
                f["offVariation"] = json!(fall);
                f["version"] = json!(version);
                write_local(dir, &key, &f)?;
                tracing::info!(flag = %key, %value, comment, "flag set in the local folder");
            }
            FlagStore::LaunchDarkly(api) => {
                let env = api.environment.clone();
                let seen = match which {
                    Which::KafkaOnly => reading.current.kafka_only,
                    _ => reading.current.dual_write,
                };
                let mut value = value;
                let mut applied = false;
                for attempt in 0..ATTEMPTS {
                    let f = api.fetch(&key).await?;
                    let version = api.env_version(&f)?;
                    if attempt > 0 {
                        // Someone wrote meanwhile: go on only if what the
                        // decision was based on still holds.
                        let now = self.read().await?;
                        let served = match which {
                            Which::KafkaOnly => now.current.kafka_only,
                            _ => now.current.dual_write,
                        };
                        if served != seen {
                            return Err(StoreError::Invalid(format!(
                                "{key} changed in environment {env:?} meanwhile: it served {seen} % when read, {served} % now; nothing was written: run again to decide from the new value"
                            )));
                        }
                        value = validate(which, &value, &now.current, force)?;
                    }
                    let mut ops = vec![
                        json!({"op": "test", "path": format!("/environments/{env}/version"), "value": version}),
                    ];
                    let idx = match find_variation(&f, &value) {
                        Some(i) => i,
                        None => {
                            // A new allowed value: changes no environment.
                            ops.push(json!({"op": "add", "path": "/variations/-", "value": {"value": value}}));
                            f["variations"].as_array().map(Vec::len).unwrap_or(0)
                        }
                    };
                    ops.push(json!({"op": "replace", "path": format!("/environments/{env}/fallthrough"), "value": {"variation": idx}}));
                    ops.push(json!({"op": "replace", "path": format!("/environments/{env}/on"), "value": true}));
                    if api.patch(&key, comment, ops).await? {
                        applied = true;
                        break;
                    }
                    tracing::warn!(flag = %key, environment = %env, attempt, "the flag changed while it was being set; reading it again");
                }
                if !applied {
                    return Err(conflicts(&key));
                }
                tracing::info!(flag = %key, %value, environment = %env, comment, "flag set through the LaunchDarkly API");
            }
        }
        Ok(self.read().await?.current)
    }

    /// Kill: the flag is turned off and serves `true` to everyone (an off
    /// flag serves its off variation whatever its targets and rules, so
    /// targeted accounts are killed too). Unkill: on, serving `false` by
    /// default (targets and rules apply again).
    async fn set_kill(&self, on: bool, comment: &str) -> Result<(), StoreError> {
        let key = self.keys().kill_switch.clone();
        match self {
            FlagStore::Local { dir, keys } => {
                let old = read_local(dir, &key).ok().flatten();
                let version = old
                    .as_ref()
                    .and_then(|f| f["version"].as_u64())
                    .unwrap_or(0)
                    + 1;
                let usable = old
                    .filter(|f| super::folder::parse_flag(f.to_string().as_bytes(), keys).is_ok());
                let mut f = usable.unwrap_or_else(|| new_flag(&key, &json!(on)));
                let idx = variation_index(&mut f, on);
                if on {
                    f["on"] = json!(false);
                    f["offVariation"] = json!(idx);
                } else {
                    f["on"] = json!(true);
                    f["fallthrough"] = json!({"variation": idx});
                    f["offVariation"] = json!(idx);
                }
                f["version"] = json!(version);
                write_local(dir, &key, &f)?;
                tracing::info!(flag = %key, killed = on, comment, "kill switch set in the local folder");
            }
            FlagStore::LaunchDarkly(api) => {
                let env = api.environment.clone();
                let mut applied = false;
                // The kill switch always goes through: a conflict is read
                // again and retried, never a reason to stop.
                for attempt in 0..ATTEMPTS {
                    let f = api.fetch(&key).await?;
                    let version = api.env_version(&f)?;
                    let idx = find_variation(&f, &json!(on)).ok_or_else(|| StoreError::Api {
                        what: format!("flag {key}"),
                        message: format!("no variation with the value {on}"),
                    })?;
                    let test = json!({"op": "test", "path": format!("/environments/{env}/version"), "value": version});
                    let ops = if on {
                        vec![
                            test,
                            json!({"op": "replace", "path": format!("/environments/{env}/offVariation"), "value": idx}),
                            json!({"op": "replace", "path": format!("/environments/{env}/on"), "value": false}),
                        ]
                    } else {
                        vec![
                            test,
                            json!({"op": "replace", "path": format!("/environments/{env}/fallthrough"), "value": {"variation": idx}}),
                            json!({"op": "replace", "path": format!("/environments/{env}/offVariation"), "value": idx}),
                            json!({"op": "replace", "path": format!("/environments/{env}/on"), "value": true}),
                        ]
                    };
                    if api.patch(&key, comment, ops).await? {
                        applied = true;
                        break;
                    }
                    tracing::warn!(flag = %key, environment = %env, attempt, "the kill switch changed while it was being set; reading it again");
                }
                if !applied {
                    return Err(conflicts(&key));
                }
                tracing::info!(flag = %key, killed = on, comment, "kill switch set through the LaunchDarkly API");
            }
        }
        Ok(())
    }
}

/// The index of the variation serving `value`, added if there is none.
fn variation_index(f: &mut Value, value: bool) -> usize {
    if !f["variations"].is_array() {
        f["variations"] = json!([]);
    }
    let vs = f["variations"].as_array_mut();
    match vs {
        Some(vs) => match vs.iter().position(|v| *v == json!(value)) {
            Some(i) => i,
            None => {
                vs.push(json!(value));
                vs.len() - 1
            }
        },
        None => 0,
    }
}

/// The local folder as a router without last good values resolves it.
pub fn read_folder(dir: &Path, keys: &FlagKeys) -> Reading {
    use super::folder;
    let files = folder::read_files(dir);
    let r = folder::resolve(dir, &files, keys, &Default::default());
    let pct = |k: &str, hi: bool| {
        r.flags
            .get(k)
            .and_then(folder::served_percent)
            .map(|(lo, h)| if hi { h } else { lo })
            .unwrap_or(0.0)
    };
    Reading {
        current: Current {
            kill_switch: r
                .flags
                .get(&keys.kill_switch)
                .and_then(folder::served_kill)
                .unwrap_or(true),
            kafka_only: pct(&keys.kafka_only, true),
            dual_write: pct(&keys.dual_write, false),
        },
        problems: r.problems,
    }
}

fn flag_path(dir: &Path, key: &str) -> PathBuf {
    dir.join(format!("{key}.json"))
}

fn read_local(dir: &Path, key: &str) -> Result<Option<Value>, StoreError> {
    let path = flag_path(dir, key);
    match std::fs::read_to_string(&path) {
        Ok(t) => serde_json::from_str(&t)
            .map(Some)
            .map_err(|e| StoreError::File {
                path: path.display().to_string(),
                message: e.to_string(),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StoreError::File {
            path: path.display().to_string(),
            message: e.to_string(),
        }),
    }
}

/// Written whole, synced, then renamed over the old file: a reader never
/// sees half, and a crash after it returns keeps it.
fn write_local(dir: &Path, key: &str, flag: &Value) -> Result<(), StoreError> {
    let path = flag_path(dir, key);
    super::write_synced(&path, flag).map_err(|e| StoreError::File {
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

fn new_flag(key: &str, value: &Value) -> Value {
    json!({
        "key": key, "version": 0, "on": true, "targets": [], "contextTargets": [],
        "rules": [], "prerequisites": [], "fallthrough": {"variation": 0}, "offVariation": 0,
        "variations": [value], "salt": key,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cur(k: f64, d: f64) -> Current {
        Current {
            kill_switch: false,
            kafka_only: k,
            dual_write: d,
        }
    }

    #[test]
    fn validation_names_what_is_wrong() {
        assert!(validate(Which::DualWrite, &json!(50), &cur(0.0, 0.0), false).is_ok());
        let e = validate(Which::DualWrite, &json!(101), &cur(0.0, 0.0), false).unwrap_err();
        assert!(e.to_string().contains("from 0 to 100"), "{e}");
        assert!(validate(Which::DualWrite, &json!("x"), &cur(0.0, 0.0), false).is_err());
        let e = validate(Which::KafkaOnly, &json!(30), &cur(0.0, 20.0), false).unwrap_err();
        assert!(e.to_string().contains("--force"), "{e}");
        assert!(validate(Which::KafkaOnly, &json!(30), &cur(0.0, 20.0), true).is_ok());
        let e = validate(Which::DualWrite, &json!(10), &cur(20.0, 50.0), false).unwrap_err();
        assert!(e.to_string().contains("above dual-write"), "{e}");
        assert!(validate(Which::KillSwitch, &json!(1), &cur(0.0, 0.0), false).is_err());
    }

    #[tokio::test]
    async fn local_set_and_get_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = FlagStore::Local {
            dir: dir.path().to_path_buf(),
            keys: FlagKeys::default(),
        };
        // No kill-switch file: killed (fails closed), and a problem.
        let r = store.read().await.unwrap();
        assert!(r.current.kill_switch);
        assert!(r.problems[0].reason.contains("failing closed"), "{r:?}");
        assert!(store.get().await.is_err());
        store
            .set(Which::KillSwitch, json!(false), false, "t")
            .await
            .unwrap();
        assert_eq!(store.get().await.unwrap(), cur(0.0, 0.0));
        store
            .set(Which::DualWrite, json!(25), false, "t")
            .await
            .unwrap();
        store
            .set(Which::KafkaOnly, json!(10), false, "t")
            .await
            .unwrap();
        let c = store
            .set(Which::KillSwitch, json!(true), false, "t")
            .await
            .unwrap();
        assert_eq!(
            c,
            Current {
                kill_switch: true,
                kafka_only: 10.0,
                dual_write: 25.0
            }
        );
        let f: Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join("switchyard-dual-write.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(f["version"], 1);
        assert!(store
            .set(Which::KafkaOnly, json!(30), false, "t")
            .await
            .is_err());
        // Kill and unkill work whatever state the other files are in.
        std::fs::write(dir.path().join("switchyard-kafka-only.json"), "{ trunc").unwrap();
        let c = store
            .set(Which::KillSwitch, json!(true), false, "t")
            .await
            .unwrap();
        assert!(c.kill_switch);
        assert!(store
            .set(Which::DualWrite, json!(30), false, "t")
            .await
            .is_err());
        // A truncated kill file is replaced by a good one.
        std::fs::write(dir.path().join("switchyard-kill-switch.json"), "").unwrap();
        store
            .set(Which::KillSwitch, json!(true), false, "t")
            .await
            .unwrap();
        let kill: Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join("switchyard-kill-switch.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(kill["on"], false);
        assert_eq!(
            kill["variations"][kill["offVariation"].as_u64().unwrap() as usize],
            true
        );
    }

    #[test]
    fn sub_resolution_percentages_are_refused() {
        let e = validate(Which::DualWrite, &json!(0.001), &cur(0.0, 0.0), false).unwrap_err();
        assert!(e.to_string().contains("resolution"), "{e}");
        let e = validate(Which::DualWrite, &json!("50"), &cur(0.0, 0.0), false).unwrap_err();
        assert!(e.to_string().contains("not a number"), "{e}");
    }
}
