//! The router on LaunchDarkly's streaming protocol, without the internet: a
//! small local server speaks it (`GET /all`, a `put` with every flag, then
//! `patch` events). The router follows a patch within a second, keeps its
//! values when the stream is lost, and starts on the safe default (legacy)
//! when the server is down, switching as soon as flags arrive.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use switchyard::flags::LaunchDarklyOptions;

const DUAL: &str = "switchyard-dual-write";
const KAFKA: &str = "switchyard-kafka-only";
const KILL: &str = "switchyard-kill-switch";

/// A LaunchDarkly streaming endpoint: the flags it holds, and patches pushed
/// to every open stream.
#[derive(Clone)]
struct LdServer {
    flags: Arc<Mutex<BTreeMap<String, Value>>>,
    patches: broadcast::Sender<String>,
    stop: CancellationToken,
    #[allow(dead_code)]
    port: u16,
}

fn flag(key: &str, value: Value, version: u64) -> Value {
    let mut f: Value = serde_json::from_str(&flag_json(key, value, &[])).unwrap();
    f["version"] = json!(version);
    f
}

impl LdServer {
    async fn start(port: u16, flags: &[(&str, Value)]) -> LdServer {
        let (patches, _) = broadcast::channel(64);
        let server = LdServer {
            flags: Arc::new(Mutex::new(
                flags
                    .iter()
                    .map(|(k, v)| (k.to_string(), flag(k, v.clone(), 1)))
                    .collect(),
            )),
            patches,
            stop: CancellationToken::new(),
            port,
        };
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind the LaunchDarkly test server");
        let me = server.clone();
        tokio::spawn(async move {
            loop {
                let (sock, _) = tokio::select! {
                    _ = me.stop.cancelled() => return,
                    a = listener.accept() => match a { Ok(a) => a, Err(_) => return },
                };
                tokio::spawn(me.clone().stream(sock));
            }
        });
        server
    }

    /// One `GET /all`: the event-stream headers, a `put`, then the patches.
    async fn stream(self, mut sock: tokio::net::TcpStream) {
        let mut req = Vec::new();
        let mut buf = [0u8; 1024];
        while !req.windows(4).any(|w| w == b"\r\n\r\n") {
            match sock.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => req.extend_from_slice(&buf[..n]),
            }
        }
        let head = String::from_utf8_lossy(&req);
        assert!(head.starts_with("GET /all "), "unexpected request: {head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("authorization: sdk-test-key"),
            "the SDK key is sent: {head}"
        );
        let put =
            json!({"path": "/", "data": {"flags": *self.flags.lock().unwrap(), "segments": {}}});
        let mut rx = self.patches.subscribe();
        let hello = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n\r\nevent: put\ndata: {put}\n\n"
        );
        if sock.write_all(hello.as_bytes()).await.is_err() {
            return;
        }
        loop {
            let p = tokio::select! {
                _ = self.stop.cancelled() => return,
                p = rx.recv() => match p { Ok(p) => p, Err(_) => return },
            };
            if sock
                .write_all(format!("event: patch\ndata: {p}\n\n").as_bytes())
                .await
                .is_err()
            {
                return;
            }
        }
    }

    /// Changes a flag and streams the patch.
    fn patch(&self, key: &str, value: Value) {
        let mut flags = self.flags.lock().unwrap();
        let version = flags
            .get(key)
            .and_then(|f| f["version"].as_u64())
            .unwrap_or(0)
            + 1;
        let f = flag(key, value, version);
        flags.insert(key.to_string(), f.clone());
        let _ = self
            .patches
            .send(json!({"path": format!("/flags/{key}"), "data": f}).to_string());
    }

    /// Replaces a flag with the JSON given (its version bumped) and streams it.
    fn patch_raw(&self, key: &str, mut f: Value) {
        let mut flags = self.flags.lock().unwrap();
        let version = flags
            .get(key)
            .and_then(|f| f["version"].as_u64())
            .unwrap_or(0)
            + 1;
        f["version"] = json!(version);
        flags.insert(key.to_string(), f.clone());
        let _ = self
            .patches
            .send(json!({"path": format!("/flags/{key}"), "data": f}).to_string());
    }

    /// Drops every stream and stops listening.
    fn down(&self) {
        self.stop.cancel();
    }
}

fn ld_options(port: u16, init_timeout: Duration) -> LaunchDarklyOptions {
    LaunchDarklyOptions {
        sdk_key: "sdk-test-key".into(),
        stream_uri: Some(format!("http://127.0.0.1:{port}")),
        base_uri: Some(format!("http://127.0.0.1:{port}")),
        events_uri: Some(format!("http://127.0.0.1:{port}")),
        send_events: false,
        init_timeout,
        reconnect_delay: Duration::from_millis(200),
        use_persisted: true,
        migration_sample: 0,
    }
}

async fn start_router(broker: &Broker, ld: LaunchDarklyOptions) -> (InProcess, Dirs) {
    let topic = unique("ld");
    create_topic(&broker.brokers(), &topic, 1).await;
    let dirs = Dirs::new();
    let cfg = config(&dirs, &topic);
    let router = InProcess::start_with_flags(cfg, &broker.brokers(), ld).await;
    (router, dirs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_patches_within_a_second_and_keeps_values_when_the_stream_drops() {
    let broker = Broker::start();
    let port = free_port();
    let ld = LdServer::start(
        port,
        &[(DUAL, json!(10)), (KAFKA, json!(0)), (KILL, json!(false))],
    )
    .await;
    let (router, _dirs) = start_router(&broker, ld_options(port, Duration::from_secs(5))).await;
    let v = router.explain(7).await;
    assert_eq!(v["flags"]["dual_write"], 10.0, "{v}");
    assert_eq!(v["flag_source"]["kind"], "launchdarkly");
    assert_eq!(v["flag_source"]["loaded"], true);
    assert_eq!(
        router.counter("switchyard_route_flag_source_loaded", &[]),
        1.0
    );

    let mut lat = Vec::new();
    for pct in 11..=40 {
        let t = Instant::now();
        ld.patch(DUAL, json!(pct));
        loop {
            let v = router.explain(7).await;
            if v["flags"]["dual_write"] == json!(pct as f64) {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(1),
                "patch to {pct} not followed within 1 s: {v}"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        lat.push(t.elapsed());
    }
    lat.sort();
    eprintln!(
        "streaming flip-to-effect over {} patches: p50 {:?}, p99 {:?}, max {:?}",
        lat.len(),
        lat[lat.len() / 2],
        lat[(lat.len() * 99).div_ceil(100) - 1],
        lat[lat.len() - 1]
    );

    // The kill switch wins at once.
    ld.patch(KILL, json!(true));
    let t = Instant::now();
    while router.explain(7).await["route"] != "legacy" {
        assert!(t.elapsed() < Duration::from_secs(1));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    ld.patch(KILL, json!(false));
    tokio::time::sleep(Duration::from_millis(200)).await;

    // The stream is lost and the server stays down: the last values stay.
    ld.down();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let v = router.explain(7).await;
    assert_eq!(v["flags"]["dual_write"], 40.0, "{v}");
    assert_eq!(v["flags"]["kill_switch"], false, "{v}");
    assert_eq!(v["flag_source"]["loaded"], true);
    router.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_on_the_safe_default_and_switches_when_flags_arrive() {
    let broker = Broker::start();
    let port = free_port();
    // Nothing listens on `port` yet.
    let started = Instant::now();
    let (router, _dirs) = start_router(&broker, ld_options(port, Duration::from_millis(700))).await;
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "bounded start-up wait"
    );
    let v = router.explain(7).await;
    assert_eq!(v["route"], "legacy", "{v}");
    assert_eq!(v["flag_source"]["loaded"], false, "{v}");
    assert!(v["flag_source"]["last_error"]
        .as_str()
        .unwrap()
        .contains("safe default"));
    assert_eq!(
        router.counter("switchyard_route_flag_source_loaded", &[]),
        0.0
    );
    // Traffic is accepted meanwhile, all legacy.
    let r = reqwest::Client::new()
        .post(router.url())
        .header("content-type", "application/json")
        .body(envelope(7, 1, 10).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["legacy"], 1);

    let _ld = LdServer::start(
        port,
        &[(DUAL, json!(100)), (KAFKA, json!(0)), (KILL, json!(false))],
    )
    .await;
    let t = Instant::now();
    loop {
        let v = router.explain(7).await;
        if v["route"] == "dual" && v["flag_source"]["loaded"] == true {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "flags never arrived: {v}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("flags arrived {:?} after the server came up", t.elapsed());
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        router.counter("switchyard_route_flag_source_loaded", &[]),
        1.0
    );
    router.stop().await;
}

/// Routes of accounts 0..n, as the router explains them.
async fn routes(router: &InProcess, n: u64) -> Vec<String> {
    let mut out = Vec::new();
    for a in 0..n {
        out.push(
            router.explain(a).await["route"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_while_launchdarkly_is_unreachable_routes_on_the_persisted_flags() {
    let broker = Broker::start();
    let port = free_port();
    let ld = LdServer::start(
        port,
        &[(DUAL, json!(40)), (KAFKA, json!(10)), (KILL, json!(false))],
    )
    .await;
    let topic = unique("ldp");
    create_topic(&broker.brokers(), &topic, 1).await;
    let dirs = Dirs::new();
    let cfg = config(&dirs, &topic);
    let router = InProcess::start_with_flags(
        cfg.clone(),
        &broker.brokers(),
        ld_options(port, Duration::from_secs(5)),
    )
    .await;
    let (_, ready) = router.readyz().await;
    assert_eq!(ready["flags"]["state"], "live", "{ready}");
    let live = routes(&router, 1000).await;
    assert!(live.iter().any(|r| r == "kafka") && live.iter().any(|r| r == "legacy"));
    router.stop().await;
    ld.down();

    // LaunchDarkly unreachable: the same route for every account.
    let router = InProcess::start_with_flags(
        cfg.clone(),
        &broker.brokers(),
        ld_options(port, Duration::from_millis(500)),
    )
    .await;
    assert_eq!(
        routes(&router, 1000).await,
        live,
        "routed on the persisted flags"
    );
    let (code, ready) = router.readyz().await;
    assert_eq!(code, 200, "{ready}");
    assert!(
        ready["flags"]["state"]
            .as_str()
            .unwrap()
            .starts_with("persisted"),
        "{ready}"
    );
    assert_eq!(
        router.counter(
            "switchyard_route_flag_source_state",
            &[("state", "persisted")]
        ),
        1.0
    );
    router.stop().await;

    // Forced to the safe default: everything legacy.
    let mut opts = ld_options(port, Duration::from_millis(500));
    opts.use_persisted = false;
    let router = InProcess::start_with_flags(cfg, &broker.brokers(), opts).await;
    assert!(routes(&router, 200).await.iter().all(|r| r == "legacy"));
    let (_, ready) = router.readyz().await;
    assert_eq!(ready["flags"]["state"], "safe default", "{ready}");
    router.stop().await;
}

/// A LaunchDarkly migration flag whose default rule splits accounts 30/70
/// between `off` and `dualwrite`.
fn migration_flag(key: &str, weights: (u64, u64)) -> Value {
    json!({
        "key": key, "version": 1, "on": true, "targets": [], "contextTargets": [],
        "rules": [], "prerequisites": [],
        "fallthrough": {"rollout": {"variations": [
            {"variation": 0, "weight": weights.0}, {"variation": 1, "weight": weights.1}],
            "contextKind": "account", "bucketBy": "key"}},
        "offVariation": 0,
        "variations": ["off", "dualwrite", "shadow", "live", "rampdown", "complete"],
        "salt": "migration-salt",
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_flag_routes_each_account_as_the_sdk_evaluates_it() {
    use launchdarkly_server_sdk::{
        Client, ConfigBuilder, ContextBuilder, NullEventProcessorBuilder, Stage, TestData,
    };
    const MIGRATION: &str = "switchyard-migration";
    let broker = Broker::start();
    let port = free_port();
    let ld = LdServer::start(port, &[(KILL, json!(false))]).await;
    ld.patch_raw(MIGRATION, migration_flag(MIGRATION, (30_000, 70_000)));
    let topic = unique("ldm");
    create_topic(&broker.brokers(), &topic, 1).await;
    let dirs = Dirs::new();
    let mut cfg = config(&dirs, &topic);
    cfg.flags.keys.migration = Some(MIGRATION.into());
    let router = InProcess::start_with_flags(
        cfg,
        &broker.brokers(),
        ld_options(port, Duration::from_secs(5)),
    )
    .await;

    // The SDK's own answer for the same flag.
    let td = TestData::new();
    td.use_preconfigured_flag(
        serde_json::from_value(migration_flag(MIGRATION, (30_000, 70_000))).unwrap(),
    );
    let config = ConfigBuilder::new("sdk-key")
        .data_source(&td)
        .event_processor(&NullEventProcessorBuilder::new())
        .build()
        .unwrap();
    let sdk = Client::build(config).unwrap();
    sdk.start_with_default_executor();
    assert_eq!(
        sdk.wait_for_initialization(Duration::from_secs(5)).await,
        Some(true)
    );
    let got = routes(&router, 1000).await;
    let mut dual = 0;
    for (a, route) in got.iter().enumerate() {
        let ctx = ContextBuilder::new(a.to_string())
            .kind("account")
            .build()
            .unwrap();
        let (stage, _) = sdk.migration_variation(&ctx, MIGRATION, Stage::Complete);
        let want = match stage {
            Stage::Off => "legacy",
            Stage::Complete => "kafka",
            _ => "dual",
        };
        assert_eq!(route, want, "account {a}: stage {stage}");
        dual += usize::from(route == "dual");
    }
    assert!((600..800).contains(&dual), "about 70 % dual: {dual}");
    let v = router.explain(1).await;
    assert_eq!(v["reason"], "migration-stage", "{v}");

    // Everyone to `off` in the stream: legacy within a second (timed on one
    // dual account, then checked on the others).
    let a0 = got.iter().position(|r| r == "dual").unwrap() as u64;
    ld.patch_raw(MIGRATION, migration_flag(MIGRATION, (100_000, 0)));
    let t = Instant::now();
    while router.explain(a0).await["route"] != "legacy" {
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "the flip took over a second"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(routes(&router, 1000).await.iter().all(|r| r == "legacy"));
    sdk.close();
    router.stop().await;
}

/// LaunchDarkly's event intake (`POST /bulk`), recording every event.
async fn event_intake() -> (u16, Arc<Mutex<Vec<Value>>>) {
    use axum::body::Bytes;
    use axum::http::HeaderMap;
    use std::io::Read;
    let events: Arc<Mutex<Vec<Value>>> = Arc::default();
    let app = axum::Router::new().route(
        "/bulk",
        axum::routing::post({
            let events = events.clone();
            move |headers: HeaderMap, body: Bytes| {
                let events = events.clone();
                async move {
                    let gzip = headers
                        .get("content-encoding")
                        .is_some_and(|v| v.as_bytes() == b"gzip");
                    let mut text = Vec::new();
                    if gzip {
                        flate2::read::GzDecoder::new(&body[..])
                            .read_to_end(&mut text)
                            .unwrap();
                    } else {
                        text = body.to_vec();
                    }
                    let batch: Vec<Value> = serde_json::from_slice(&text).unwrap();
                    events.lock().unwrap().extend(batch);
                    axum::http::StatusCode::ACCEPTED
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (port, events)
}

/// With events on, sampled writes are reported as migration operations: the
/// write, the stage evaluated for the account, and per origin (old: the
/// offline file, new: Kafka) invoked and latency; one in `sample` writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampled_writes_reach_migration_insights_per_origin() {
    const MIGRATION: &str = "switchyard-migration";
    let broker = Broker::start();
    for (sample, requests, want) in [(1u64, 12u64, 12usize), (4, 20, 5)] {
        let port = free_port();
        let ld = LdServer::start(port, &[(KILL, json!(false))]).await;
        // Everyone at `dualwrite`: both sinks.
        ld.patch_raw(MIGRATION, migration_flag(MIGRATION, (0, 100_000)));
        let (events_port, events) = event_intake().await;
        let topic = unique("ldev");
        create_topic(&broker.brokers(), &topic, 1).await;
        let dirs = Dirs::new();
        let mut cfg = config(&dirs, &topic);
        cfg.flags.keys.migration = Some(MIGRATION.into());
        let mut opts = ld_options(port, Duration::from_secs(5));
        opts.send_events = true;
        opts.events_uri = Some(format!("http://127.0.0.1:{events_port}"));
        opts.migration_sample = sample;
        let router = InProcess::start_with_flags(cfg, &broker.brokers(), opts).await;
        for a in 0..requests {
            let (status, body) =
                post_ndjson(&router.url(), format!("{}\n", envelope(a, a, 100))).await;
            assert_eq!(status, 200, "{body}");
            assert_eq!(body["dual"], 1, "{body}");
        }
        // Stopping closes the SDK client, which sends what it queued.
        router.stop().await;
        ld.down();
        let ops: Vec<Value> = events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e["kind"] == "migration_op")
            .cloned()
            .collect();
        assert_eq!(
            ops.len(),
            want,
            "1 in {sample} of {requests} writes: {ops:?}"
        );
        for op in &ops {
            assert_eq!(op["operation"], "write", "{op}");
            assert_eq!(op["evaluation"]["key"], MIGRATION, "{op}");
            assert_eq!(op["evaluation"]["value"], "dualwrite", "{op}");
            assert_eq!(op["context"]["kind"], "account", "{op}");
            let m = op["measurements"].as_array().unwrap();
            let of = |key: &str| m.iter().find(|x| x["key"] == key).cloned();
            assert_eq!(
                of("invoked").unwrap()["values"],
                json!({"old": true, "new": true}),
                "{op}"
            );
            // Whole milliseconds, as LaunchDarkly takes them: present for both.
            let lat = of("latency_ms").unwrap();
            for side in ["old", "new"] {
                assert!(lat["values"][side].as_u64().is_some(), "{op}");
            }
            assert!(of("error").is_none(), "no sink failed: {op}");
        }
    }
}
