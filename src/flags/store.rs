//! Reading and changing the routing flags where operators keep them: the
//! local `flags/` folder (LaunchDarkly flag JSON, one file a flag) or the
//! LaunchDarkly REST API. Used by `switchyard flags` and the rollout controller.

use std::collections::BTreeMap;
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
    /// With a migration flag configured: the percentage of untargeted
    /// accounts served each stage (None: it serves nothing usable, which is
    /// one of the problems).
    pub migration: Option<BTreeMap<String, f64>>,
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

impl Api {
    /// A conditional write of the chosen environment: reads the flag, lets
    /// `ops` build the change from it (after a `test` of the environment's
    /// version), and on a conflict reads again, up to [`ATTEMPTS`] times.
    /// `what` names the flag in logs.
    async fn write_env(
        &self,
        key: &str,
        comment: &str,
        what: &str,
        ops: impl Fn(&Value) -> Result<Vec<Value>, StoreError>,
    ) -> Result<(), StoreError> {
        let env = &self.environment;
        for attempt in 0..ATTEMPTS {
            let f = self.fetch(key).await?;
            let version = self.env_version(&f)?;
            let mut all = vec![
                json!({"op": "test", "path": format!("/environments/{env}/version"), "value": version}),
            ];
            all.extend(ops(&f)?);
            if self.patch(key, comment, all).await? {
                return Ok(());
            }
            tracing::warn!(flag = %key, environment = %env, attempt, "{what} changed while it was being set; reading it again");
        }
        Err(conflicts(key))
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

/// The value of variation `i` of `flag`: a local flag lists values, the
/// REST API objects holding them.
fn variation_value(flag: &Value, i: &Value) -> Option<Value> {
    let v = flag["variations"].get(usize::try_from(i.as_u64()?).ok()?)?;
    Some(if v.is_object() {
        v["value"].clone()
    } else {
        v.clone()
    })
}

/// What an environment configuration (`cfg`: `on`, `fallthrough`,
/// `offVariation`) of `flag` serves an untargeted context.
fn served_summary(flag: &Value, cfg: &Value) -> Value {
    let value = |i: &Value| variation_value(flag, i);
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

/// The percentage of untargeted contexts served each value of a string
/// flag (a migration flag's stages) by an environment configuration `cfg`
/// of `flag` (for a local flag, the flag itself). None when it serves
/// nothing, or anything but strings.
pub fn served_weights(flag: &Value, cfg: &Value) -> Option<BTreeMap<String, f64>> {
    let mut out = BTreeMap::new();
    let mut add = |i: &Value, pct: f64| -> Option<()> {
        let v = variation_value(flag, i)?;
        *out.entry(v.as_str()?.to_string()).or_insert(0.0) += pct;
        Some(())
    };
    if cfg["on"].as_bool() != Some(true) {
        add(&cfg["offVariation"], 100.0)?;
    } else if let Some(r) = cfg["fallthrough"]["rollout"]["variations"].as_array() {
        for w in r {
            // LaunchDarkly's weights are thousandths of a percent.
            add(&w["variation"], w["weight"].as_f64()? / 1000.0)?;
        }
    } else {
        add(&cfg["fallthrough"]["variation"], 100.0)?;
    }
    out.retain(|_, p| *p > 0.0);
    (!out.is_empty()).then_some(out)
}

/// The fallthrough that serves `to` to `pct` % of accounts and `from` to
/// the rest, bucketed by LaunchDarkly (the flag's salt and the context
/// key). A rollout already in place over the two keeps its order and its
/// bucketing settings, so raising `pct` only ever moves accounts from `from`
/// to `to`: an account is never sent back. Accounts are bucketed by their
/// `account` context key.
pub fn migration_fallthrough(
    flag: &Value,
    current: &Value,
    from: &str,
    to: &str,
    pct: f64,
) -> Result<Value, String> {
    let index = |stage: &str| {
        flag["variations"]
            .as_array()
            .and_then(|vs| {
                vs.iter().position(|v| {
                    let v = if v.is_object() { &v["value"] } else { v };
                    v.as_str() == Some(stage)
                })
            })
            .ok_or_else(|| {
                format!("the migration flag has no variation {stage:?}: a migration flag has the six stages")
            })
    };
    let (from_i, to_i) = (index(from)?, index(to)?);
    super::folder::check_percent(&json!(pct))?;
    let to_weight = (pct * 1000.0).round() as u64;
    if to_weight == 0 {
        return Ok(json!({"variation": from_i}));
    }
    if to_weight >= 100_000 {
        return Ok(json!({"variation": to_i}));
    }
    let mut rollout = current["rollout"].clone();
    let order: Vec<u64> = rollout["variations"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|w| w["variation"].as_u64())
        .collect();
    let ours = order
        .iter()
        .all(|i| *i == from_i as u64 || *i == to_i as u64);
    if !rollout.is_object() || !ours {
        rollout = json!({});
    }
    let from_first = ours && order.first() == Some(&(from_i as u64));
    let (t, f) = (
        json!({"variation": to_i, "weight": to_weight}),
        json!({"variation": from_i, "weight": 100_000 - to_weight}),
    );
    rollout["variations"] = if from_first {
        json!([f, t])
    } else {
        json!([t, f])
    };
    // The router evaluates `account` contexts; a rollout's kind defaults to
    // `user`, which would bucket every account alike.
    rollout["contextKind"] = json!("account");
    Ok(json!({"rollout": rollout}))
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
                let mut migration = None;
                if let Some(key) = &keys.migration {
                    let f = api.fetch(key).await?;
                    let cfg = &f["environments"][&api.environment];
                    match served_weights(&f, cfg) {
                        Some(w)
                            if w.keys()
                                .all(|s| super::folder::STAGES.contains(&s.as_str())) =>
                        {
                            migration = Some(w)
                        }
                        w => problems.push(super::FlagFileError {
                            path: format!("flag {key}"),
                            reason: match w {
                                Some(w) => format!("serves {w:?}: a migration flag serves stages"),
                                None => {
                                    format!("serves nothing in environment {:?}", api.environment)
                                }
                            },
                            keys: vec![key.clone()],
                        }),
                    }
                }
                Ok(Reading {
                    current,
                    problems,
                    migration,
                })
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
                let (usable, version) = read_usable(dir, &key, keys);
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
                // The kill switch always goes through: a conflict is read
                // again and retried, never a reason to stop.
                api.write_env(&key, comment, "the kill switch", |f| {
                    let idx = find_variation(f, &json!(on)).ok_or_else(|| StoreError::Api {
                        what: format!("flag {key}"),
                        message: format!("no variation with the value {on}"),
                    })?;
                    let replace = |what: &str, value: Value| {
                        json!({"op": "replace", "path": format!("/environments/{env}/{what}"), "value": value})
                    };
                    Ok(if on {
                        vec![replace("offVariation", json!(idx)), replace("on", json!(false))]
                    } else {
                        vec![
                            replace("fallthrough", json!({"variation": idx})),
                            replace("offVariation", json!(idx)),
                            replace("on", json!(true)),
                        ]
                    })
                })
                .await?;
                tracing::info!(flag = %key, killed = on, comment, "kill switch set through the LaunchDarkly API");
            }
        }
        Ok(())
    }
}

impl FlagStore {
    /// Points the migration flag's fallthrough at `to` for `pct` % of
    /// untargeted accounts and `from` for the rest, in the one environment
    /// (LaunchDarkly) or the folder. Conditional like [`FlagStore::set`]:
    /// when someone changed the flag meanwhile, it stops and says so unless
    /// the stages served are still what `seen` says.
    pub async fn set_migration(
        &self,
        from: &str,
        to: &str,
        pct: f64,
        seen: Option<&BTreeMap<String, f64>>,
        comment: &str,
    ) -> Result<(), StoreError> {
        let key = self.keys().migration.clone().ok_or_else(|| {
            StoreError::Invalid("no migration flag is configured (flags.keys.migration)".into())
        })?;
        let invalid = |m: String| StoreError::Invalid(format!("{key}: {m}"));
        match self {
            FlagStore::Local { dir, keys } => {
                let (usable, version) = read_usable(dir, &key, keys);
                let mut f = usable.unwrap_or_else(|| {
                    let mut f = new_flag(&key, &json!("off"));
                    f["variations"] = json!(super::folder::STAGES);
                    f
                });
                // A local file may list fewer stages: the two are added
                // (a new variation changes what nobody is served).
                if let Some(vs) = f["variations"].as_array_mut() {
                    for stage in [from, to] {
                        if !vs.iter().any(|v| v.as_str() == Some(stage)) {
                            vs.push(json!(stage));
                        }
                    }
                }
                let fall =
                    migration_fallthrough(&f, &f["fallthrough"], from, to, pct).map_err(invalid)?;
                f["fallthrough"] = fall;
                f["on"] = json!(true);
                f["version"] = json!(version);
                write_local(dir, &key, &f)?;
                tracing::info!(flag = %key, from, to, percent = pct, comment, "migration flag set in the local folder");
            }
            FlagStore::LaunchDarkly(api) => {
                let env = api.environment.clone();
                api.write_env(&key, comment, "the migration flag", |f| {
                    let cfg = &f["environments"][&env];
                    // The decision was made from `seen`: go on only while it holds.
                    let now = served_weights(f, cfg);
                    if seen.is_some() && now.as_ref() != seen {
                        return Err(StoreError::Invalid(format!(
                            "{key} changed in environment {env:?} meanwhile: it served {seen:?} when read, {now:?} now; nothing was written"
                        )));
                    }
                    let fall = migration_fallthrough(f, &cfg["fallthrough"], from, to, pct)
                        .map_err(invalid)?;
                    Ok(vec![
                        json!({"op": "replace", "path": format!("/environments/{env}/fallthrough"), "value": fall}),
                        json!({"op": "replace", "path": format!("/environments/{env}/on"), "value": true}),
                    ])
                })
                .await?;
                tracing::info!(flag = %key, from, to, percent = pct, environment = %env, comment, "migration flag set through the LaunchDarkly API");
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
        migration: keys
            .migration
            .as_ref()
            .and_then(|k| r.flags.get(k))
            .and_then(|f| served_weights(f, f)),
        problems: r.problems,
    }
}

/// A local flag file as a base for a change: the flag if it is good (a
/// broken one is replaced), and the version the change gets (one above the
/// file's, broken or not).
fn read_usable(dir: &Path, key: &str, keys: &FlagKeys) -> (Option<Value>, u64) {
    let old = read_local(dir, key).ok().flatten();
    let version = old
        .as_ref()
        .and_then(|f| f["version"].as_u64())
        .unwrap_or(0)
        + 1;
    let usable = old.filter(|f| super::folder::parse_flag(f.to_string().as_bytes(), keys).is_ok());
    (usable, version)
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

    fn dual_accounts(f: &Value, n: u64) -> Vec<bool> {
        let keys = FlagKeys {
            migration: Some("m".into()),
            ..FlagKeys::default()
        };
        let snap =
            super::super::Snapshot::from_json(&BTreeMap::from([("m".to_string(), f.clone())]));
        (0..n)
            .map(|a| snap.evaluate(&keys, a).migration == Some(crate::routing::Route::Dual))
            .collect()
    }

    #[test]
    fn raising_a_migration_share_only_moves_accounts_forward() {
        let n = 4000;
        let stages = super::super::folder::STAGES;
        let off = json!({"variation": 0});
        // From nothing, and from an operator's rollout listing `from` first.
        let operators = json!({"rollout": {"contextKind": "account", "variations": [
            {"variation": 0, "weight": 80000}, {"variation": 1, "weight": 20000}]}});
        for start in [off, operators] {
            let mut f = new_flag("m", &json!("off"));
            f["variations"] = json!(stages);
            f["fallthrough"] = start;
            let mut before = dual_accounts(&f, n);
            for pct in [20.0, 25.0, 33.33, 50.0, 99.99, 100.0] {
                f["fallthrough"] =
                    migration_fallthrough(&f, &f["fallthrough"], "off", "dualwrite", pct).unwrap();
                let now = dual_accounts(&f, n);
                let moved_back = (0..n as usize).filter(|a| before[*a] && !now[*a]).count();
                assert_eq!(moved_back, 0, "{pct} %: {}", f["fallthrough"]);
                let share = now.iter().filter(|d| **d).count() as f64 * 100.0 / n as f64;
                assert!(
                    (share - pct).abs() < 3.0,
                    "{pct} %: {share} % served dualwrite"
                );
                assert_eq!(
                    served_weights(&f, &f).unwrap().get("dualwrite").copied(),
                    Some(pct)
                );
                before = now;
            }
        }
        // Stages the flag does not have are named.
        let f = json!({"variations": ["off", "live"]});
        let e = migration_fallthrough(&f, &Value::Null, "off", "dualwrite", 5.0).unwrap_err();
        assert!(e.contains("no variation \"dualwrite\""), "{e}");
    }

    #[test]
    fn served_weights_follow_on_off_and_rollouts() {
        let rest = json!({"variations": [{"value": "off"}, {"value": "dualwrite"}]});
        let w = |cfg: Value| served_weights(&rest, &cfg);
        assert_eq!(
            w(json!({"on": false, "offVariation": 1, "fallthrough": {"variation": 0}})),
            Some(BTreeMap::from([("dualwrite".to_string(), 100.0)]))
        );
        assert_eq!(
            w(
                json!({"on": true, "fallthrough": {"rollout": {"variations": [
                {"variation": 1, "weight": 30000}, {"variation": 0, "weight": 70000}]}}})
            ),
            Some(BTreeMap::from([
                ("dualwrite".to_string(), 30.0),
                ("off".to_string(), 70.0)
            ]))
        );
        assert_eq!(
            w(json!({"on": true, "fallthrough": {"variation": 7}})),
            None
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
