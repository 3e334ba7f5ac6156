//! `switchyard flags` against a local server standing in for the LaunchDarkly
//! REST API (v2, `PATCH /api/v2/flags/{project}/{key}` with a JSON patch).
//! It implements what the project relies on and refuses the rest:
//! - variations are shared by every environment; each environment has its
//!   own `on`, `fallthrough`, `offVariation` and `version`;
//! - `GET ...?env=X` returns only environment X;
//! - JSON patch operations `test` (a failed one answers 409, LaunchDarkly's
//!   `optimistic_locking_error`), `replace` on `/environments/<env>/...`
//!   paths, and `add` on `/variations/-`; anything else is a 400;
//! - an environment that requires approvals answers 405
//!   (`method_not_allowed`), as LaunchDarkly documents.
//!
//! The requests (token, project, environment, patch, comment) are checked,
//! and invalid changes never reach the API.

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::sync::{Arc, Mutex};

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use axum::Json;
use serde_json::{json, Value};

/// (method, path, authorization, body) of each request.
type Log = Arc<Mutex<Vec<(String, String, String, Value)>>>;

#[derive(Clone, Default)]
struct Api {
    flags: Arc<Mutex<HashMap<String, Value>>>,
    log: Log,
    /// Environments whose changes require approval.
    approvals: Arc<Mutex<Vec<String>>>,
    /// Another writer's change, applied just before the next PATCH.
    race: Arc<Mutex<Option<(String, String, Value)>>>,
}

fn ld_flag(key: &str, variations: Vec<Value>, fallthrough: usize) -> Value {
    json!({
        "key": key,
        "_version": 1,
        "variations": variations.into_iter().enumerate()
            .map(|(i, v)| json!({"_id": format!("{key}-v{i}"), "value": v}))
            .collect::<Vec<_>>(),
        "environments": {
            "staging": {"on": true, "fallthrough": {"variation": fallthrough}, "offVariation": fallthrough, "version": 3},
            "production": {"on": true, "fallthrough": {"variation": 0}, "offVariation": 0, "version": 7}
        }
    })
}

/// Applies a JSON patch the way the stand-in implements it, or says why not.
fn apply_patch(flag: &mut Value, ops: &[Value]) -> Result<(), (StatusCode, Value)> {
    let bad = |m: String| {
        (
            StatusCode::BAD_REQUEST,
            json!({"code": "invalid_request", "message": m}),
        )
    };
    let mut f = flag.clone();
    let mut touched: Vec<String> = Vec::new();
    for op in ops {
        let path = op["path"].as_str().ok_or_else(|| bad("no path".into()))?;
        match op["op"].as_str() {
            Some("test") => {
                if f.pointer(path) != Some(&op["value"]) {
                    return Err((
                        StatusCode::CONFLICT,
                        json!({"code": "optimistic_locking_error", "message": "Conflict. Optimistic lock error. Try again later."}),
                    ));
                }
            }
            Some("replace") => {
                let env = path
                    .strip_prefix("/environments/")
                    .and_then(|r| r.split('/').next())
                    .filter(|e| f["environments"].get(*e).is_some())
                    .ok_or_else(|| {
                        bad(format!("the stand-in does not implement replacing {path}"))
                    })?
                    .to_string();
                *f.pointer_mut(path)
                    .ok_or_else(|| bad(format!("no {path}")))? = op["value"].clone();
                touched.push(env);
            }
            Some("add") if path == "/variations/-" => {
                let n = f["variations"].as_array().map(Vec::len).unwrap_or(0);
                let mut v = op["value"].clone();
                v["_id"] = json!(format!("added-v{n}"));
                f["variations"].as_array_mut().unwrap().push(v);
            }
            other => {
                return Err(bad(format!(
                    "the stand-in does not implement {other:?} on {path}"
                )))
            }
        }
    }
    touched.sort();
    touched.dedup();
    for env in touched {
        let v = f["environments"][&env]["version"].as_u64().unwrap_or(0);
        f["environments"][&env]["version"] = json!(v + 1);
    }
    let v = f["_version"].as_u64().unwrap_or(0);
    f["_version"] = json!(v + 1);
    *flag = f;
    Ok(())
}

async fn get_flag(
    State(api): State<Api>,
    Path((project, key)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Json<Value>, StatusCode> {
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    api.log.lock().unwrap().push((
        "GET".into(),
        format!(
            "/{project}/{key}?env={}",
            q.get("env").cloned().unwrap_or_default()
        ),
        auth.clone(),
        Value::Null,
    ));
    if auth != "api-secret-token" || project != "switchyard" {
        return Err(StatusCode::UNAUTHORIZED);
    }
    let mut f = api
        .flags
        .lock()
        .unwrap()
        .get(&key)
        .cloned()
        .ok_or(StatusCode::NOT_FOUND)?;
    // `env` limits the environments returned.
    if let Some(env) = q.get("env") {
        let only = f["environments"][env].clone();
        f["environments"] = json!({ env.clone(): only });
    }
    Ok(Json(f))
}

type Refusal = (StatusCode, Json<Value>);

fn refusal(status: StatusCode, code: &str, message: &str) -> Refusal {
    (status, Json(json!({"code": code, "message": message})))
}

async fn patch_flag(
    State(api): State<Api>,
    Path((project, key)): Path<(String, String)>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Result<Json<Value>, Refusal> {
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    api.log.lock().unwrap().push((
        "PATCH".into(),
        format!("/{project}/{key}"),
        auth.clone(),
        body.clone(),
    ));
    if auth != "api-secret-token" {
        return Err(refusal(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "Invalid access token",
        ));
    }
    let mut flags = api.flags.lock().unwrap();
    let flag = flags
        .get_mut(&key)
        .ok_or_else(|| refusal(StatusCode::NOT_FOUND, "not_found", "Unknown flag"))?;
    // Another writer got in first.
    if let Some((k, ptr, v)) = api.race.lock().unwrap().take() {
        if k == key {
            apply_patch(flag, &[json!({"op": "replace", "path": ptr, "value": v})]).unwrap();
        }
    }
    let ops = body["patch"]
        .as_array()
        .ok_or_else(|| refusal(StatusCode::BAD_REQUEST, "invalid_request", "no patch"))?;
    let envs: Vec<String> = ops
        .iter()
        .filter_map(|o| {
            o["path"]
                .as_str()?
                .strip_prefix("/environments/")?
                .split('/')
                .next()
                .map(str::to_string)
        })
        .collect();
    if envs
        .iter()
        .any(|e| api.approvals.lock().unwrap().contains(e))
    {
        return Err(refusal(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "Flag configuration updates require approval: action 'updateFallthrough' not allowed",
        ));
    }
    apply_patch(flag, ops).map_err(|(status, body)| (status, Json(body)))?;
    Ok(Json(flag.clone()))
}

async fn serve(api: Api) -> u16 {
    let app = axum::Router::new()
        .route(
            "/api/v2/flags/{project}/{key}",
            get(get_flag).patch(patch_flag),
        )
        .with_state(api);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    port
}

fn flags_cmd(port: u16, args: &[&str]) -> (i32, String, String) {
    flags_cmd_env(port, "staging", args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rest_api_gets_the_right_requests() {
    let api = Api::default();
    {
        let mut f = api.flags.lock().unwrap();
        f.insert(
            "switchyard-dual-write".into(),
            ld_flag("switchyard-dual-write", vec![json!(10)], 0),
        );
        f.insert(
            "switchyard-kafka-only".into(),
            ld_flag("switchyard-kafka-only", vec![json!(0)], 0),
        );
        f.insert(
            "switchyard-kill-switch".into(),
            ld_flag("switchyard-kill-switch", vec![json!(true), json!(false)], 1),
        );
    }
    let port = serve(api.clone()).await;

    let (code, out, err) = tokio::task::spawn_blocking(move || flags_cmd(port, &["get", "--json"]))
        .await
        .unwrap();
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        v,
        json!({"kill_switch": false, "kafka_only": 0.0, "dual_write": 10.0})
    );
    assert!(api
        .log
        .lock()
        .unwrap()
        .iter()
        .all(|(_, p, auth, _)| auth == "api-secret-token"
            && (p.ends_with("?env=staging") || !p.contains('?'))));

    let (code, _, err) = tokio::task::spawn_blocking(move || {
        flags_cmd(
            port,
            &["set", "dual-write", "30", "--comment", "rollout step 3"],
        )
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "{err}");
    let patch = api
        .log
        .lock()
        .unwrap()
        .iter()
        .find(|(m, _, _, _)| m == "PATCH")
        .cloned()
        .expect("a PATCH was sent");
    assert_eq!(patch.1, "/switchyard/switchyard-dual-write");
    assert_eq!(patch.3["comment"], "rollout step 3");
    // Conditional on the environment's version, a new allowed value added
    // (it changes no environment), only staging pointed at it.
    assert_eq!(
        patch.3["patch"],
        json!([
            {"op": "test", "path": "/environments/staging/version", "value": 3},
            {"op": "add", "path": "/variations/-", "value": {"value": 30.0}},
            {"op": "replace", "path": "/environments/staging/fallthrough", "value": {"variation": 1}},
            {"op": "replace", "path": "/environments/staging/on", "value": true}
        ])
    );

    // Refused before any request: kafka-only above dual-write, and out of range.
    let patches_before = api
        .log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.0 == "PATCH")
        .count();
    for args in [["set", "kafka-only", "50"], ["set", "dual-write", "150"]] {
        let (code, _, err) = tokio::task::spawn_blocking(move || flags_cmd(port, &args))
            .await
            .unwrap();
        assert_eq!(code, 2, "{args:?}: {err}");
    }
    let patches_after = api
        .log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.0 == "PATCH")
        .count();
    assert_eq!(
        patches_before, patches_after,
        "no invalid change reached the API"
    );

    let (code, out, err) = tokio::task::spawn_blocking(move || flags_cmd(port, &["kill"]))
        .await
        .unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("kill-switch true"), "{out}");
    let kill = api
        .log
        .lock()
        .unwrap()
        .iter()
        .rev()
        .find(|l| l.0 == "PATCH")
        .cloned()
        .unwrap();
    // Off, serving the `true` variation: targeted accounts are killed too,
    // and only the chosen environment changes.
    assert_eq!(
        kill.3["patch"],
        json!([
            {"op": "test", "path": "/environments/staging/version", "value": 3},
            {"op": "replace", "path": "/environments/staging/offVariation", "value": 0},
            {"op": "replace", "path": "/environments/staging/on", "value": false}
        ])
    );
    let (code, out, _) = tokio::task::spawn_blocking(move || flags_cmd(port, &["unkill"]))
        .await
        .unwrap();
    assert_eq!(code, 0);
    assert!(out.contains("kill-switch false"), "{out}");

    // A wrong token is an error that says so.
    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args([
            "flags",
            "get",
            "--ld-api-uri",
            &format!("http://127.0.0.1:{port}"),
            "--ld-project",
            "switchyard",
        ])
        .env("LD_API_TOKEN", "wrong")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"));
}

fn flags_cmd_env(port: u16, env: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .arg("flags")
        .args(args)
        .args([
            "--ld-api-uri",
            &format!("http://127.0.0.1:{port}"),
            "--ld-project",
            "switchyard",
            "--ld-environment",
            env,
        ])
        .env("LD_API_TOKEN", "api-secret-token")
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn two_environments() -> (Api, u16) {
    let api = Api::default();
    {
        let mut f = api.flags.lock().unwrap();
        // Both environments' fallthrough on the same shared variation.
        f.insert(
            "switchyard-dual-write".into(),
            ld_flag("switchyard-dual-write", vec![json!(0), json!(20)], 0),
        );
        f.insert(
            "switchyard-kafka-only".into(),
            ld_flag("switchyard-kafka-only", vec![json!(0)], 0),
        );
        f.insert(
            "switchyard-kill-switch".into(),
            ld_flag("switchyard-kill-switch", vec![json!(true), json!(false)], 1),
        );
        for k in ["switchyard-dual-write", "switchyard-kafka-only"] {
            f.get_mut(k).unwrap()["environments"]["production"]["fallthrough"]["variation"] =
                json!(0);
        }
        f.get_mut("switchyard-kill-switch").unwrap()["environments"]["production"] =
            json!({"on": true, "fallthrough": {"variation": 1}, "offVariation": 1, "version": 7});
    }
    let port = serve(api.clone()).await;
    (api, port)
}

fn env_of(api: &Api, key: &str, env: &str) -> String {
    serde_json::to_string(&api.flags.lock().unwrap()[key]["environments"][env]).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_write_changes_the_named_environment_only() {
    let (api, port) = two_environments().await;
    let keys = [
        "switchyard-dual-write",
        "switchyard-kafka-only",
        "switchyard-kill-switch",
    ];
    let production: Vec<String> = keys.iter().map(|k| env_of(&api, k, "production")).collect();
    for args in [
        vec!["set", "dual-write", "25"],
        vec!["set", "kafka-only", "20"],
        vec!["kill"],
        vec!["unkill"],
        vec!["set", "dual-write", "20"],
    ] {
        let (code, _, err) =
            tokio::task::spawn_blocking(move || flags_cmd_env(port, "staging", &args))
                .await
                .unwrap();
        assert_eq!(code, 0, "{err}");
    }
    let after: Vec<String> = keys.iter().map(|k| env_of(&api, k, "production")).collect();
    assert_eq!(production, after, "production is byte-for-byte unchanged");
    let (code, out, _) =
        tokio::task::spawn_blocking(move || flags_cmd_env(port, "staging", &["get", "--json"]))
            .await
            .unwrap();
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        v,
        json!({"kill_switch": false, "kafka_only": 20.0, "dual_write": 20.0})
    );
    // 20 already was an allowed value: reused, not added again.
    let dual = api.flags.lock().unwrap()["switchyard-dual-write"].clone();
    let twenties = dual["variations"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["value"].as_f64() == Some(20.0))
        .count();
    assert_eq!(twenties, 1, "{dual}");
    let (code, out, _) =
        tokio::task::spawn_blocking(move || flags_cmd_env(port, "production", &["get", "--json"]))
            .await
            .unwrap();
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        v,
        json!({"kill_switch": false, "kafka_only": 0.0, "dual_write": 0.0})
    );
    // `flags status` shows every environment it can read.
    let (code, out, err) =
        tokio::task::spawn_blocking(move || flags_cmd_env(port, "staging", &["status", "--json"]))
            .await
            .unwrap();
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    let envs = &v["dual-write"]["environments"];
    assert_eq!(envs["staging"]["serves"], 20, "{v}");
    assert_eq!(envs["production"]["serves"], 0, "{v}");
    assert!(envs["staging"]["version"].as_u64().unwrap() > 3, "{v}");
    let (code, out, _) =
        tokio::task::spawn_blocking(move || flags_cmd_env(port, "staging", &["status"]))
            .await
            .unwrap();
    assert_eq!(code, 0);
    assert!(
        out.contains("dual-write   production     serves 0"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrent_change_is_reported_not_overwritten_and_approvals_are_named() {
    let (api, port) = two_environments().await;
    // Another writer moves staging to 20 % between our read and our write.
    *api.race.lock().unwrap() = Some((
        "switchyard-dual-write".into(),
        "/environments/staging/fallthrough".into(),
        json!({"variation": 1}),
    ));
    let (code, _, err) = tokio::task::spawn_blocking(move || {
        flags_cmd_env(port, "staging", &["set", "dual-write", "30"])
    })
    .await
    .unwrap();
    assert_ne!(code, 0);
    assert!(
        err.contains("changed in environment \"staging\" meanwhile")
            && err.contains("0 % when read, 20 % now"),
        "{err}"
    );
    let staging = api.flags.lock().unwrap()["switchyard-dual-write"].clone();
    assert_eq!(
        staging["environments"]["staging"]["fallthrough"]["variation"], 1,
        "the other writer's change stands"
    );
    // A change elsewhere in the environment (same served value) is re-read and applied.
    *api.race.lock().unwrap() = Some((
        "switchyard-kill-switch".into(),
        "/environments/staging/offVariation".into(),
        json!(1),
    ));
    let (code, _, err) =
        tokio::task::spawn_blocking(move || flags_cmd_env(port, "staging", &["kill"]))
            .await
            .unwrap();
    assert_eq!(code, 0, "a kill always goes through: {err}");
    let kill = api.flags.lock().unwrap()["switchyard-kill-switch"].clone();
    assert_eq!(kill["environments"]["staging"]["on"], false, "{kill}");

    // An environment that requires approvals: said so, nothing retried.
    api.approvals.lock().unwrap().push("production".into());
    let before = api
        .log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.0 == "PATCH")
        .count();
    let (code, _, err) = tokio::task::spawn_blocking(move || {
        flags_cmd_env(port, "production", &["set", "dual-write", "20"])
    })
    .await
    .unwrap();
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("requires approval") && err.contains("405"),
        "{err}"
    );
    let after = api
        .log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.0 == "PATCH")
        .count();
    assert_eq!(after, before + 1, "not retried");
}

const MIGRATION: &str = "switchyard-migration";

/// What the migration flag serves in `env`, as percent per stage.
fn served(api: &Api, env: &str) -> std::collections::BTreeMap<String, f64> {
    let f = api.flags.lock().unwrap()[MIGRATION].clone();
    switchyard::flags::store::served_weights(&f, &f["environments"][env]).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_rollout_moves_one_environment_forward_and_never_overwrites() {
    use switchyard::flags::store::{Api as Rest, FlagStore};
    use switchyard::flags::FlagKeys;
    use switchyard::rollout::plan::{Check, Plan, Status};
    use switchyard::rollout::{Controller, RolloutMetrics};

    let (api, port) = two_environments().await;
    api.flags.lock().unwrap().insert(
        MIGRATION.into(),
        ld_flag(
            MIGRATION,
            ["off", "dualwrite", "shadow", "live", "rampdown", "complete"]
                .map(|s| json!(s))
                .to_vec(),
            0,
        ),
    );
    let production = env_of(&api, MIGRATION, "production");
    let keys = FlagKeys {
        migration: Some(MIGRATION.into()),
        ..FlagKeys::default()
    };
    let store = || {
        FlagStore::LaunchDarkly(Rest::new(
            &format!("http://127.0.0.1:{port}"),
            "api-secret-token".into(),
            "switchyard".into(),
            "staging".into(),
            keys.clone(),
        ))
    };
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    let plan = Plan::parse(&format!(
        "stage = \"migration\"\nmigration_from = \"off\"\nmigration_to = \"dualwrite\"\nsteps = [10, 50, 100]\ndwell_secs = 0\ncheck_interval_secs = 1\nfailure_limit = 1\nparity_url = \"http://127.0.0.1:1\"\nstate_file = \"{}\"",
        state.display()
    ))
    .unwrap();
    let metrics = || RolloutMetrics::new(&prometheus::Registry::new()).unwrap();
    let c = Controller::new(plan.clone(), store(), metrics()).unwrap();
    assert_eq!(c.start().await.unwrap(), None);
    let share = |api: &Api| served(api, "staging").get("dualwrite").copied();
    assert_eq!(share(&api), Some(10.0));
    assert_eq!(served(&api, "staging").get("off").copied(), Some(90.0));
    assert_eq!(c.tick(Some(Check::Verified)).await.unwrap(), None);
    assert_eq!(share(&api), Some(50.0));
    // Every write touched staging only, conditional on its version.
    for (method, _, _, body) in api.log.lock().unwrap().iter() {
        if method == "PATCH" {
            let ops = body["patch"].as_array().unwrap();
            assert_eq!(ops[0]["op"], "test", "{body}");
            for op in ops {
                let path = op["path"].as_str().unwrap();
                assert!(path.starts_with("/environments/staging/"), "{body}");
            }
            assert!(
                body["comment"].as_str().unwrap().contains("rollout"),
                "{body}"
            );
        }
    }
    assert_eq!(production, env_of(&api, MIGRATION, "production"));

    // Someone moves staging to `live` for everyone just before the next
    // write: the controller writes nothing over it and says so.
    *api.race.lock().unwrap() = Some((
        MIGRATION.into(),
        "/environments/staging/fallthrough".into(),
        json!({"variation": 3}),
    ));
    let e = c.tick(Some(Check::Verified)).await.unwrap_err().to_string();
    assert!(
        e.contains("changed in environment \"staging\" meanwhile"),
        "{e}"
    );
    assert_eq!(
        served(&api, "staging"),
        std::collections::BTreeMap::from([("live".to_string(), 100.0)])
    );
    // Resumed, it recognises a person's change and pauses.
    let c = Controller::new(plan.clone(), store(), metrics()).unwrap();
    c.start().await.unwrap();
    let s = c.state();
    let why = s.paused.clone().unwrap_or_default();
    assert!(
        why.contains("manual change") && why.contains("live 100 %"),
        "{s:?}"
    );
    // Put back where the controller left it, it resumes and finishes.
    api.flags.lock().unwrap().get_mut(MIGRATION).unwrap()["environments"]["staging"]
        ["fallthrough"] = json!({"rollout": {"variations": [
            {"variation": 1, "weight": 50000}, {"variation": 0, "weight": 50000}]}});
    assert_eq!(c.tick(Some(Check::Verified)).await.unwrap(), None);
    assert!(c.state().paused.is_none(), "{:?}", c.state());
    assert_eq!(c.tick(Some(Check::Verified)).await.unwrap(), None);
    assert_eq!(share(&api), Some(100.0));
    c.tick(Some(Check::Verified)).await.unwrap();
    assert_eq!(c.state().status, Status::Done);
    assert_eq!(production, env_of(&api, MIGRATION, "production"));
}
