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

/// Checks a new value against the rules: percentages 0–100, the kill switch a
/// boolean, and Kafka-only never above dual-write unless forced (an account
/// would otherwise go straight from legacy to Kafka only, skipping the
/// parity-checked dual stage).
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
            let pct = value
                .as_f64()
                .filter(|p| p.is_finite() && (0.0..=100.0).contains(p))
                .ok_or_else(|| {
                    StoreError::Invalid(format!("{value} is not a percentage between 0 and 100"))
                })?;
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

    async fn fetch(&self, key: &str) -> Result<Value, StoreError> {
        let err = |message: String| StoreError::Api {
            what: format!("GET flag {key}"),
            message,
        };
        let r = self
            .client
            .get(self.url(key))
            .query(&[("env", self.environment.as_str())])
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

    async fn patch(&self, key: &str, comment: &str, ops: Vec<Value>) -> Result<(), StoreError> {
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
        if !status.is_success() {
            let body = r.text().await.unwrap_or_default();
            return Err(err(format!("{status}: {body}")));
        }
        Ok(())
    }
}

impl FlagStore {
    pub fn keys(&self) -> &FlagKeys {
        match self {
            FlagStore::Local { keys, .. } => keys,
            FlagStore::LaunchDarkly(api) => &api.keys,
        }
    }

    pub async fn get(&self) -> Result<Current, StoreError> {
        let keys = self.keys().clone();
        let mut out = Current {
            kill_switch: false,
            kafka_only: 0.0,
            dual_write: 0.0,
        };
        for which in [Which::KillSwitch, Which::KafkaOnly, Which::DualWrite] {
            let v = self.value(which.key(&keys)).await?;
            match which {
                Which::KillSwitch => out.kill_switch = v.as_bool().unwrap_or(false),
                Which::KafkaOnly => out.kafka_only = v.as_f64().unwrap_or(0.0),
                Which::DualWrite => out.dual_write = v.as_f64().unwrap_or(0.0),
            }
        }
        Ok(out)
    }

    /// The served value of one flag (null when the flag does not exist).
    async fn value(&self, key: &str) -> Result<Value, StoreError> {
        match self {
            FlagStore::Local { dir, .. } => Ok(match read_local(dir, key)? {
                Some(f) => served_local(&f),
                None => Value::Null,
            }),
            FlagStore::LaunchDarkly(api) => {
                let f = api.fetch(key).await?;
                Ok(api.served(&f).map(|(v, _)| v).unwrap_or(Value::Null))
            }
        }
    }

    /// Validates and applies one change, recording `comment` where the store
    /// keeps one.
    pub async fn set(
        &self,
        which: Which,
        value: Value,
        force: bool,
        comment: &str,
    ) -> Result<Current, StoreError> {
        let current = self.get().await?;
        let value = validate(which, &value, &current, force)?;
        let key = which.key(self.keys()).to_string();
        match self {
            FlagStore::Local { dir, .. } => {
                let mut f = read_local(dir, &key)?.unwrap_or_else(|| new_flag(&key, &value));
                let fall = f["fallthrough"]["variation"].as_u64().unwrap_or(0) as usize;
                let version = f["version"].as_u64().unwrap_or(0) + 1;
                if f["variations"].get(fall).is_none() {
                    return Err(StoreError::File {
                        path: flag_path(dir, &key).display().to_string(),
                        message: "the fallthrough variation does not exist".into(),
                    });
                }
                f["variations"][fall] = value.clone();
                f["on"] = json!(true);
                f["offVariation"] = json!(fall);
                f["version"] = json!(version);
                write_local(dir, &key, &f)?;
                tracing::info!(flag = %key, %value, comment, "flag set in the local folder");
            }
            FlagStore::LaunchDarkly(api) => {
                let f = api.fetch(&key).await?;
                let (_, fall) = api.served(&f).ok_or_else(|| StoreError::Api {
                    what: format!("flag {key}"),
                    message: format!("no environment {:?} in the flag", api.environment),
                })?;
                let env = &api.environment;
                let ops = match which {
                    Which::KillSwitch => {
                        let idx = f["variations"]
                            .as_array()
                            .and_then(|vs| vs.iter().position(|v| v["value"] == value))
                            .ok_or_else(|| StoreError::Api {
                                what: format!("flag {key}"),
                                message: format!("no variation with the value {value}"),
                            })?;
                        vec![
                            json!({"op": "replace", "path": format!("/environments/{env}/fallthrough/variation"), "value": idx}),
                            json!({"op": "replace", "path": format!("/environments/{env}/on"), "value": true}),
                        ]
                    }
                    Which::KafkaOnly | Which::DualWrite => vec![
                        json!({"op": "replace", "path": format!("/variations/{fall}/value"), "value": value}),
                        json!({"op": "replace", "path": format!("/environments/{env}/on"), "value": true}),
                    ],
                };
                api.patch(&key, comment, ops).await?;
                tracing::info!(flag = %key, %value, comment, "flag set through the LaunchDarkly API");
            }
        }
        self.get().await
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

/// Written whole, then renamed over the old file: a reader never sees half.
fn write_local(dir: &Path, key: &str, flag: &Value) -> Result<(), StoreError> {
    let path = flag_path(dir, key);
    let err = |e: std::io::Error| StoreError::File {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    std::fs::create_dir_all(dir).map_err(err)?;
    let tmp = dir.join(format!(".{key}.json.tmp"));
    let text = serde_json::to_string_pretty(flag).map_err(|e| err(std::io::Error::other(e)))?;
    std::fs::write(&tmp, text + "\n").map_err(err)?;
    std::fs::rename(&tmp, &path).map_err(err)?;
    Ok(())
}

fn served_local(f: &Value) -> Value {
    let idx = if f["on"].as_bool().unwrap_or(false) {
        f["fallthrough"]["variation"].as_u64()
    } else {
        f["offVariation"].as_u64()
    };
    idx.and_then(|i| f["variations"].get(i as usize).cloned())
        .unwrap_or(Value::Null)
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
        assert!(e.to_string().contains("between 0 and 100"), "{e}");
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
    }
}
