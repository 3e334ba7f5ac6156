//! `switchyard flags` against a local server standing in for the LaunchDarkly
//! REST API: the requests it sends (token, project, environment, JSON patch,
//! comment) are checked, and invalid changes never reach the API.

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
}

fn ld_flag(key: &str, variations: Vec<Value>, fallthrough: usize) -> Value {
    json!({
        "key": key,
        "variations": variations.into_iter().map(|v| json!({"value": v})).collect::<Vec<_>>(),
        "environments": {
            "staging": {"on": true, "fallthrough": {"variation": fallthrough}, "offVariation": fallthrough},
            "production": {"on": false, "fallthrough": {"variation": 0}, "offVariation": 0}
        }
    })
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
    api.flags
        .lock()
        .unwrap()
        .get(&key)
        .cloned()
        .map(Json)
        .ok_or(StatusCode::NOT_FOUND)
}

async fn patch_flag(
    State(api): State<Api>,
    Path((project, key)): Path<(String, String)>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Result<Json<Value>, StatusCode> {
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
        return Err(StatusCode::UNAUTHORIZED);
    }
    let mut flags = api.flags.lock().unwrap();
    let flag = flags.get_mut(&key).ok_or(StatusCode::NOT_FOUND)?;
    for op in body["patch"].as_array().ok_or(StatusCode::BAD_REQUEST)? {
        if op["op"] != "replace" {
            return Err(StatusCode::BAD_REQUEST);
        }
        let ptr = op["path"].as_str().ok_or(StatusCode::BAD_REQUEST)?;
        *flag.pointer_mut(ptr).ok_or(StatusCode::BAD_REQUEST)? = op["value"].clone();
    }
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
    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .arg("flags")
        .args(args)
        .args([
            "--ld-api-uri",
            &format!("http://127.0.0.1:{port}"),
            "--ld-project",
            "switchyard",
            "--ld-environment",
            "staging",
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
    assert_eq!(
        patch.3["patch"],
        json!([
            {"op": "replace", "path": "/variations/0/value", "value": 30.0},
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
