//! Shared helpers for integration tests: a real tansu broker per test, topics,
//! a consumer that reads a topic back, and the router started in-process on
//! port 0 or as a child process (for kill -9 and SIGTERM).
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use tokio_util::sync::CancellationToken;

use switchyard::config::PipelineConfig;
use switchyard::route::{self, RouteOptions};

pub mod scratch;

/// The tansu binary: `$SWITCHYARD_TANSU`, else `tansu` on PATH or in ~/.cargo/bin.
/// Missing is a failure, never a skip: `scripts/services` installs it.
pub fn tansu_bin() -> PathBuf {
    if let Ok(p) = std::env::var("SWITCHYARD_TANSU") {
        return PathBuf::from(p);
    }
    if let Ok(path) = std::env::var("PATH") {
        for dir in std::env::split_paths(&path) {
            let c = dir.join("tansu");
            if c.is_file() {
                return c;
            }
        }
    }
    let home = std::env::var("HOME").unwrap_or_default();
    let c = Path::new(&home).join(".cargo/bin/tansu");
    assert!(
        c.is_file(),
        "tansu is not installed: run scripts/services (it installs the broker the tests use)"
    );
    c
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

pub fn wait_for_port(port: u16, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// A tansu broker on a loopback port, killed on drop.
pub struct Broker {
    pub port: u16,
    /// The address clients are told to use (a [`Cut`] proxy's, or `port`).
    advertised: u16,
    child: Option<Child>,
    storage: String,
    /// Started with `--authentication` (SASL/SCRAM required).
    authentication: bool,
    _dir: tempfile::TempDir,
}

impl Broker {
    /// In-memory storage.
    pub fn start() -> Broker {
        Self::start_with("memory://tansu/".to_string(), None)
    }

    /// SQLite storage: data survives a stop and start, and records are kept
    /// one by one. Use it wherever a consumer resumes from a committed offset
    /// (restarts, rebalances): tansu 0.6's memory engine answers a fetch from
    /// an offset inside a record batch with the batches that start at or after
    /// it, so the rest of that batch is never delivered (a real Kafka returns
    /// the whole batch and the client skips what it has).
    pub fn start_persistent() -> Broker {
        // tansu resolves the path against its working directory, which is
        // set to this folder.
        let dir = tempfile::tempdir().expect("tempdir");
        Self::start_with("sqlite://tansu.db".to_string(), Some(dir))
    }

    fn start_with(storage: String, dir: Option<tempfile::TempDir>) -> Broker {
        let dir = dir.unwrap_or_else(|| tempfile::tempdir().expect("tempdir"));
        let port = free_port();
        let mut b = Broker {
            port,
            advertised: port,
            child: None,
            storage,
            authentication: false,
            _dir: dir,
        };
        b.resume();
        b
    }

    /// SQLite storage, telling clients to reach it through `proxy_port` (a
    /// [`Cut`]).
    pub fn start_persistent_advertising(proxy_port: u16) -> Broker {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let mut b = Broker {
            port,
            advertised: proxy_port,
            child: None,
            storage: "sqlite://tansu.db".to_string(),
            authentication: false,
            _dir: dir,
        };
        b.resume();
        b
    }

    /// A broker that tells clients to reach it through `proxy_port`.
    pub fn start_advertising(proxy_port: u16) -> Broker {
        let port = free_port();
        let mut b = Broker {
            port,
            advertised: proxy_port,
            child: None,
            storage: "memory://tansu/".to_string(),
            authentication: false,
            _dir: tempfile::tempdir().expect("tempdir"),
        };
        b.resume();
        b
    }

    /// A broker that requires SASL/SCRAM (SHA-256 and SHA-512) of every
    /// client, for the `users` given, and tells clients to reach it through
    /// `proxy_port` (a TLS terminator). tansu keeps SCRAM credentials only in
    /// its SQLite or PostgreSQL storage, and refuses to store them from an
    /// unauthenticated client once authentication is on: the users and the
    /// `topics` are made first, then the broker restarts with
    /// `--authentication`.
    pub fn start_sasl(proxy_port: u16, users: &[(&str, &str)], topics: &[(&str, u32)]) -> Broker {
        let mut b = Self::start_persistent();
        for (topic, partitions) in topics {
            let out = Command::new(tansu_bin())
                .args([
                    "topic",
                    "create",
                    topic,
                    "--partitions",
                    &partitions.to_string(),
                ])
                .args(["--broker", &format!("tcp://127.0.0.1:{}", b.port)])
                .output()
                .expect("tansu topic create");
            assert!(
                out.status.success(),
                "tansu topic create {topic}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        for (user, password) in users {
            for mechanism in ["scram256", "scram512"] {
                let out = Command::new(tansu_bin())
                    .args(["user", "create", user, password, "--mechanism", mechanism])
                    .args(["--broker", &format!("tcp://127.0.0.1:{}", b.port)])
                    .output()
                    .expect("tansu user create");
                assert!(
                    out.status.success(),
                    "tansu user create {user}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        b.stop();
        b.advertised = proxy_port;
        b.authentication = true;
        b.resume();
        b
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.advertised)
    }

    /// Kills the broker (SIGKILL).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port and storage.
    pub fn resume(&mut self) {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let advertised = format!("tcp://127.0.0.1:{}", self.advertised);
        let log = std::fs::File::create(self._dir.path().join("tansu.log")).expect("log file");
        let child = Command::new(tansu_bin())
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &advertised,
                "--storage-engine",
                &self.storage,
            ])
            .args(self.authentication.then_some("--authentication"))
            .env("RUST_LOG", "warn")
            .current_dir(self._dir.path())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn tansu");
        self.child = Some(child);
        assert!(
            wait_for_port(self.port, Duration::from_secs(20)),
            "tansu did not listen on {}",
            self.port
        );
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}

pub fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{prefix}-{}-{nanos}", std::process::id())
}

pub async fn create_topic(brokers: &str, topic: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("admin client");
    let res = admin
        .create_topics(
            &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("create topic");
    for r in res {
        r.expect("topic created");
    }
}

/// One message read back from the topic.
#[derive(Debug, Clone)]
pub struct Consumed {
    pub key: String,
    pub value: serde_json::Value,
    pub route: String,
    pub partition: i32,
}

/// Reads the topic from the start with a fresh group until `expected`
/// messages arrived or nothing new came for `idle`.
/// Reads the topic from the start with a fresh group until `expected`
/// messages arrived or nothing new came for `idle`. A group that gets no
/// assignment at all from a just-restarted tansu is retried with a new one.
pub fn consume_all(brokers: &str, topic: &str, expected: usize, idle: Duration) -> Vec<Consumed> {
    let out = consume_once(brokers, topic, expected, idle);
    if out.is_empty() && expected > 0 {
        eprintln!("readback of {topic} got nothing; retrying with a new consumer group");
        return consume_once(brokers, topic, expected, idle);
    }
    out
}

fn consume_once(brokers: &str, topic: &str, expected: usize, idle: Duration) -> Vec<Consumed> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique("readback"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut out = Vec::new();
    let mut last = Instant::now();
    while out.len() < expected || last.elapsed() < Duration::from_millis(300) {
        if last.elapsed() > idle {
            break;
        }
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                last = Instant::now();
                let key = m
                    .key()
                    .map(|k| String::from_utf8_lossy(k).into_owned())
                    .unwrap_or_default();
                let value = serde_json::from_slice(m.payload().unwrap_or(b"null"))
                    .expect("message value is JSON");
                let route = m
                    .headers()
                    .and_then(|h| {
                        h.iter()
                            .find(|h| h.key == "switchyard-route")
                            .and_then(|h| h.value)
                            .map(|v| String::from_utf8_lossy(v).into_owned())
                    })
                    .unwrap_or_default();
                out.push(Consumed {
                    key,
                    value,
                    route,
                    partition: m.partition(),
                });
            }
            // Transient (a broker restarting): librdkafka retries by itself;
            // a lasting failure shows as missing messages after `idle`.
            Some(Err(e)) => {
                eprintln!("readback consumer: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
            None => {}
        }
    }
    out
}

/// All lines of every closed offline file, in order.
pub fn offline_lines(dir: &Path) -> Vec<switchyard::offline::OfflineLine> {
    switchyard::offline::closed_files(dir)
        .expect("list offline files")
        .iter()
        .flat_map(|f| switchyard::offline::read_lines(f).expect("read offline file"))
        .collect()
}

/// A 2.5 KB-ish raw_item envelope.
pub fn envelope(account: u64, seq: u64, body_len: usize) -> serde_json::Value {
    serde_json::json!({
        "account_id": account,
        "table": "raw_item",
        "row": {
            "project_id": account % 97,
            "timestamp": 1_574_948_156u64 + seq,
            "body": "x".repeat(body_len),
            "version": 2,
            "billable": 1,
            "uuid": uuid_for(account, seq),
        }
    })
}

/// A deterministic, unique UUID-shaped key per (account, seq).
pub fn uuid_for(account: u64, seq: u64) -> String {
    let a = format!("{account:016x}");
    let s = format!("{seq:016x}");
    format!(
        "{}-{}-{}-{}-{}",
        &a[..8],
        &a[8..12],
        &a[12..16],
        &s[..4],
        &s[4..16]
    )
}

/// A flag file in LaunchDarkly's format, with optional per-account targets.
pub fn flag_json(
    key: &str,
    value: serde_json::Value,
    targets: &[(&str, serde_json::Value)],
) -> String {
    let mut variations = vec![value];
    let mut context_targets = Vec::new();
    for (i, (account, v)) in targets.iter().enumerate() {
        variations.push(v.clone());
        context_targets.push(serde_json::json!({
            "contextKind": "account", "values": [account], "variation": i + 1
        }));
    }
    serde_json::json!({
        "key": key, "version": 1, "on": true, "targets": [], "contextTargets": context_targets,
        "rules": [], "prerequisites": [], "fallthrough": {"variation": 0}, "offVariation": 0,
        "variations": variations, "salt": key,
    })
    .to_string()
}

/// Writes a flag file atomically (write then rename), as an operator's tool would.
pub fn set_flag(dir: &Path, key: &str, value: serde_json::Value) {
    let tmp = dir.join(format!(".{key}.tmp"));
    std::fs::write(&tmp, flag_json(key, value, &[])).expect("write flag");
    std::fs::rename(&tmp, dir.join(format!("{key}.json"))).expect("rename flag");
}

/// Folders for one router.
pub struct Dirs {
    pub root: tempfile::TempDir,
    pub offline: PathBuf,
    pub flags: PathBuf,
}

impl Dirs {
    pub fn new() -> Dirs {
        let root = tempfile::tempdir().expect("tempdir");
        let offline = root.path().join("offline");
        let flags = root.path().join("flags");
        std::fs::create_dir_all(&offline).expect("mkdir");
        std::fs::create_dir_all(&flags).expect("mkdir");
        // A router with no kill-switch file fails closed (everything legacy).
        set_flag(&flags, "switchyard-kill-switch", serde_json::json!(false));
        Dirs {
            root,
            offline,
            flags,
        }
    }
}

pub fn config(dirs: &Dirs, topic: &str) -> PipelineConfig {
    let mut cfg = PipelineConfig::load(None).expect("embedded config");
    cfg.offline.dir = dirs.offline.clone();
    cfg.flags.dir = dirs.flags.clone();
    cfg.flags.poll_ms = 20;
    cfg.kafka.topic = topic.to_string();
    cfg.kafka.delivery_timeout_ms = 3000;
    cfg.kafka.topic_check_timeout_ms = 5000;
    cfg.route.grace_secs = 10;
    cfg
}

pub fn options(cfg: PipelineConfig, brokers: &str) -> RouteOptions {
    RouteOptions {
        config: cfg,
        kafka_brokers: brokers.to_string(),
        kafka_extra: vec![],
        launchdarkly: None,
    }
}

/// Runs the router expecting it to refuse to start; returns why.
pub async fn start_error(cfg: PipelineConfig, brokers: &str) -> route::StartError {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    match route::run(
        options(cfg, brokers),
        listener,
        admin,
        prometheus::Registry::new(),
        CancellationToken::new(),
    )
    .await
    {
        Ok(()) => panic!("the router started"),
        Err(e) => e,
    }
}

/// The router running in this process.
pub struct InProcess {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub shutdown: CancellationToken,
    pub handle: tokio::task::JoinHandle<Result<(), route::StartError>>,
    pub registry: prometheus::Registry,
}

impl InProcess {
    pub async fn start(cfg: PipelineConfig, brokers: &str) -> InProcess {
        Self::start_opts(options(cfg, brokers)).await
    }

    /// With flags from LaunchDarkly (a local test server).
    pub async fn start_with_flags(
        cfg: PipelineConfig,
        brokers: &str,
        ld: switchyard::flags::LaunchDarklyOptions,
    ) -> InProcess {
        let mut opts = options(cfg, brokers);
        opts.launchdarkly = Some(ld);
        Self::start_opts(opts).await
    }

    pub async fn start_opts(opts: RouteOptions) -> InProcess {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let admin = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let admin_addr = admin.local_addr().expect("addr");
        let shutdown = CancellationToken::new();
        let registry = prometheus::Registry::new();
        let handle = tokio::spawn(route::run(
            opts,
            listener,
            admin,
            registry.clone(),
            shutdown.clone(),
        ));
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            assert!(!handle.is_finished(), "router exited at start");
            // Answering is enough: a router with a broken flag file serves
            // (on its last good flags) while saying it is not ready.
            if client
                .get(format!("http://{admin_addr}/readyz"))
                .send()
                .await
                .is_ok()
            {
                break;
            }
            assert!(Instant::now() < deadline, "router not ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        InProcess {
            addr,
            admin: admin_addr,
            shutdown,
            handle,
            registry,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}/v1/items", self.addr)
    }

    /// `GET /v1/route/{account}`.
    pub async fn explain(&self, account: u64) -> serde_json::Value {
        reqwest::get(format!("http://{}/v1/route/{account}", self.addr))
            .await
            .expect("explain request")
            .json()
            .await
            .expect("explain JSON")
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        self.handle
            .await
            .expect("router task")
            .expect("router stopped cleanly");
    }

    pub fn counter(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_value(&self.registry, name, labels)
    }

    /// `GET /readyz` on the admin port: (status code, body).
    pub async fn readyz(&self) -> (u16, serde_json::Value) {
        let r = reqwest::get(format!("http://{}/readyz", self.admin))
            .await
            .expect("readyz request");
        let code = r.status().as_u16();
        (code, r.json().await.expect("readyz JSON"))
    }
}

pub fn metric_value(reg: &prometheus::Registry, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut total = 0.0;
    for fam in reg.gather() {
        if fam.name() != name {
            continue;
        }
        for m in fam.get_metric() {
            let pairs: HashMap<&str, &str> = m
                .get_label()
                .iter()
                .map(|l| (l.name(), l.value()))
                .collect();
            if labels.iter().all(|(k, v)| pairs.get(k) == Some(v)) {
                // Absent kinds read as zero; a histogram reads as its count.
                total += m.get_counter().get_value()
                    + m.get_gauge().get_value()
                    + m.get_histogram().get_sample_count() as f64;
            }
        }
    }
    total
}

/// The router as a child process (for signals).
pub struct Process {
    pub child: Child,
    pub port: u16,
    pub admin_port: u16,
}

impl Process {
    pub fn spawn(config_path: &Path, brokers: &str) -> Process {
        let port = free_port();
        let admin_port = free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args([
                "route",
                "--config",
                &config_path.display().to_string(),
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--admin-listen",
                &format!("127.0.0.1:{admin_port}"),
                "--kafka-brokers",
                brokers,
            ])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn switchyard");
        let mut p = Process {
            child,
            port,
            admin_port,
        };
        assert!(
            wait_for_port(admin_port, Duration::from_secs(20)),
            "router admin port"
        );
        assert!(wait_for_port(port, Duration::from_secs(20)), "router port");
        // The ports are bound before start-up work (repair, topic check): wait for /readyz.
        let deadline = Instant::now() + Duration::from_secs(20);
        while !http_get_ok(admin_port, "/readyz") {
            if let Ok(Some(status)) = p.child.try_wait() {
                panic!("the router exited at start: {status}");
            }
            assert!(Instant::now() < deadline, "router never became ready");
            std::thread::sleep(Duration::from_millis(50));
        }
        p
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/v1/items", self.port)
    }

    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A blocking `GET` on loopback; true on a 200.
pub fn http_get_ok(port: u16, path: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .is_err()
    {
        return false;
    }
    let mut buf = [0u8; 16];
    matches!(s.read(&mut buf), Ok(n) if n >= 12 && &buf[9..12] == b"200")
}

/// Writes a configuration file for a child process.
pub fn write_config(cfg_text: &str, dirs: &Dirs, topic: &str) -> PathBuf {
    let text = cfg_text
        .replace(
            "dir = \"data/offline\"",
            &format!("dir = {:?}", dirs.offline.display().to_string()),
        )
        .replace(
            "dir = \"flags\"",
            &format!("dir = {:?}", dirs.flags.display().to_string()),
        )
        .replace(
            "topic = \"switchyard.items\"",
            &format!("topic = {topic:?}"),
        )
        .replace("poll_ms = 100", "poll_ms = 20")
        .replace("delivery_timeout_ms = 5000", "delivery_timeout_ms = 3000");
    let p = dirs.root.path().join("switchyard.toml");
    std::fs::write(&p, text).expect("write config");
    p
}

/// A loopback TCP proxy in front of the broker that can cut every
/// connection and refuse new ones, then let them through again: the broker
/// is "down" for its clients while it keeps its data.
pub struct Cut {
    pub port: u16,
    upstream: u16,
    gate: std::sync::Mutex<CancellationToken>,
}

impl Cut {
    /// Listens on `port` and forwards to the broker on `upstream`.
    pub async fn start_at(port: u16, upstream: u16) -> std::sync::Arc<Cut> {
        let c = std::sync::Arc::new(Cut {
            port,
            upstream,
            gate: std::sync::Mutex::new(CancellationToken::new()),
        });
        c.clone().open().await;
        c
    }

    async fn open(self: std::sync::Arc<Self>) {
        let gate = CancellationToken::new();
        *self.gate.lock().unwrap() = gate.clone();
        let listener = loop {
            match tokio::net::TcpListener::bind(("127.0.0.1", self.port)).await {
                Ok(l) => break l,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        let upstream = self.upstream;
        tokio::spawn(async move {
            loop {
                let (mut down, _) = tokio::select! {
                    _ = gate.cancelled() => return,
                    a = listener.accept() => match a { Ok(a) => a, Err(_) => return },
                };
                let gate = gate.clone();
                tokio::spawn(async move {
                    let Ok(mut up) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                    else {
                        return;
                    };
                    tokio::select! {
                        _ = gate.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut down, &mut up) => {}
                    }
                });
            }
        });
    }

    /// Every connection dropped, new ones refused.
    pub fn cut(&self) {
        self.gate.lock().unwrap().cancel();
    }

    /// Connections let through again.
    pub async fn restore(self: &std::sync::Arc<Self>) {
        self.clone().open().await;
    }
}

/// A database of its own for one test, dropped afterwards.
pub struct TestDb {
    pub url: String,
    pub name: String,
    pub db: switchyard::db::Db,
    admin_url: Option<String>,
}

pub const PG_ADMIN: &str = "postgres://postgres@127.0.0.1:5432/postgres";
pub const MARIADB_ADMIN: &str = "mysql://root@127.0.0.1:3306/test";

impl TestDb {
    async fn create(admin: &str, scheme: &str, prefix: &str) -> TestDb {
        let host = if scheme == "postgres" {
            "postgres@127.0.0.1:5432"
        } else {
            "root@127.0.0.1:3306"
        };
        Self::create_on(admin, scheme, host, prefix).await
    }

    async fn create_on(admin: &str, scheme: &str, host: &str, prefix: &str) -> TestDb {
        use sqlx::Connection;
        let name = unique(prefix).replace(['-', '.'], "_");
        let create = format!("CREATE DATABASE {name}");
        let res = if scheme == "postgres" {
            match sqlx::PgConnection::connect(admin).await {
                Ok(mut c) => sqlx::query(&create).execute(&mut c).await.map(|_| ()),
                Err(e) => Err(e),
            }
        } else {
            match sqlx::MySqlConnection::connect(admin).await {
                Ok(mut c) => sqlx::query(&create).execute(&mut c).await.map(|_| ()),
                Err(e) => Err(e),
            }
        };
        if let Err(e) = res {
            panic!("cannot create a test database on {admin} ({e}); run scripts/services");
        }
        let url = format!("{scheme}://{host}/{name}");
        let db = switchyard::db::Db::connect(&url, 4).expect("pool");
        TestDb {
            url,
            name,
            db,
            admin_url: Some(admin.to_string()),
        }
    }

    /// A fresh PostgreSQL database with the schema initialised.
    pub async fn postgres(schema: &switchyard::schema::Schema) -> TestDb {
        let t = Self::create(PG_ADMIN, "postgres", "sy").await;
        t.db.init(schema).await.expect("db init (postgres)");
        t
    }

    /// A fresh MariaDB database with the schema initialised.
    pub async fn mariadb(schema: &switchyard::schema::Schema) -> TestDb {
        let t = Self::create(MARIADB_ADMIN, "mysql", "sy").await;
        t.db.init(schema).await.expect("db init (mariadb)");
        t
    }

    /// A fresh database with the schema initialised on a scratch MariaDB.
    pub async fn mariadb_on(
        server: &scratch::ScratchMariadb,
        schema: &switchyard::schema::Schema,
    ) -> TestDb {
        let host = format!("root@127.0.0.1:{}", server.port);
        let t = Self::create_on(&server.url("mysql"), "mysql", &host, "sy").await;
        t.db.init(schema).await.expect("db init (scratch mariadb)");
        t
    }

    /// Runs one statement (test set-up: constraints, counts).
    pub async fn exec(&self, sql: &str) {
        use sqlx::Connection;
        let res = if self.url.starts_with("postgres") {
            let mut c = sqlx::PgConnection::connect(&self.url)
                .await
                .expect("connect");
            sqlx::query(sql).execute(&mut c).await.map(|_| ())
        } else {
            let mut c = sqlx::MySqlConnection::connect(&self.url)
                .await
                .expect("connect");
            sqlx::query(sql).execute(&mut c).await.map(|_| ())
        };
        res.unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// Every raw_item row by uuid: (project_id, timestamp, body, version, billable).
    pub async fn raw_items(&self) -> HashMap<String, (i64, i64, String, i64, i64)> {
        use sqlx::{Connection, Row};
        let mut out = HashMap::new();
        if self.url.starts_with("postgres") {
            let mut c = sqlx::PgConnection::connect(&self.url)
                .await
                .expect("connect");
            for r in sqlx::query("SELECT uuid::text, project_id, \"timestamp\", body, version, billable FROM raw_item")
                .fetch_all(&mut c)
                .await
                .expect("select")
            {
                let prev = out.insert(
                    r.get::<String, _>(0),
                    (r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)),
                );
                assert!(prev.is_none(), "duplicate row in {}", self.name);
            }
        } else {
            let mut c = sqlx::MySqlConnection::connect(&self.url)
                .await
                .expect("connect");
            for r in sqlx::query(
                "SELECT uuid, project_id, `timestamp`, body, version, billable FROM raw_item",
            )
            .fetch_all(&mut c)
            .await
            .expect("select")
            {
                let prev = out.insert(
                    r.get::<String, _>(0),
                    (r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)),
                );
                assert!(prev.is_none(), "duplicate row in {}", self.name);
            }
        }
        out
    }

    pub async fn count(&self) -> i64 {
        self.db.count("raw_item").await.expect("count")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some(admin) = self.admin_url.take() else {
            return;
        };
        let name = self.name.clone();
        let pg = self.url.starts_with("postgres");
        // Drop runs outside any runtime the test may still be using.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                use sqlx::Connection;
                if pg {
                    if let Ok(mut c) = sqlx::PgConnection::connect(&admin).await {
                        let _ =
                            sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                                .execute(&mut c)
                                .await;
                    }
                } else if let Ok(mut c) = sqlx::MySqlConnection::connect(&admin).await {
                    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name}"))
                        .execute(&mut c)
                        .await;
                }
            })
        })
        .join();
    }
}

/// Writes offline files by hand: `files` closed files of `lines` raw_item
/// lines each (route `legacy`). Returns every uuid written.
pub fn write_offline_files(dir: &Path, files: usize, lines: usize, body_len: usize) -> Vec<String> {
    let mut uuids = Vec::new();
    for f in 0..files {
        let mut text = String::new();
        for l in 0..lines {
            let account = ((f * lines + l) % 300) as u64;
            let e = envelope(account, (f * lines + l) as u64, body_len);
            uuids.push(e["row"]["uuid"].as_str().unwrap().to_string());
            text.push_str(&offline_line(&e, "legacy", l as u64));
        }
        let name = format!(
            "offline-{:016}-{:06}.ndjson",
            1_700_000_000_000_000u64 + f as u64,
            0
        );
        write_closed_file(dir, &name, &text);
    }
    uuids
}

/// One offline line (with its newline) for an [`envelope`], as the router
/// writes it.
pub fn offline_line(e: &serde_json::Value, route: &str, counter: u64) -> String {
    let mut line = serde_json::json!({
        "table": e["table"],
        "row": e["row"],
        "account_id": e["account_id"],
        "route": route,
        "counter": counter,
    })
    .to_string();
    line.push('\n');
    line
}

/// A closed offline file `name` holding `text`: written under the `.open`
/// name and renamed when whole, as the router does, so a running loader
/// never sees it half-written.
pub fn write_closed_file(dir: &Path, name: &str, text: &str) {
    let path = dir.join(name);
    let open = path.with_extension("ndjson.open");
    std::fs::write(&open, text).expect("write offline file");
    std::fs::rename(&open, &path).expect("rename offline file");
}

/// The loader's dead letters in `db`, by (file, offset): the `file:offset`
/// source split, in file and offset order.
pub async fn dead_lines(
    db: &switchyard::db::Db,
) -> Vec<((String, u64), switchyard::db::DeadLetter)> {
    let mut out: Vec<_> = db
        .dead_letters()
        .await
        .expect("dead letters")
        .into_iter()
        .filter_map(|d| {
            let (file, offset) = d.source.rsplit_once(':')?;
            let offset = offset.parse().ok()?;
            Some(((file.to_string(), offset), d))
        })
        .filter(|((file, _), _)| !file.starts_with("replay:"))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// One NDJSON body of envelopes, as a client batches them.
pub fn ndjson<'a>(envelopes: impl IntoIterator<Item = &'a serde_json::Value>) -> String {
    let mut body = String::new();
    for e in envelopes {
        body.push_str(&e.to_string());
        body.push('\n');
    }
    body
}

/// POSTs an NDJSON body to the router: the status and the JSON answer.
pub async fn post_ndjson(url: &str, body: String) -> (u16, serde_json::Value) {
    let r = reqwest::Client::new()
        .post(url)
        .header("content-type", "application/x-ndjson")
        .body(body)
        .send()
        .await
        .expect("POST to the router");
    let status = r.status().as_u16();
    let text = r.text().await.expect("the router's answer");
    let value = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
    (status, value)
}

/// A database role (`load`, `ingest`) as a child process, ready when its
/// /readyz answers.
pub struct Role {
    pub child: Child,
    pub admin_port: u16,
}

impl Role {
    /// `switchyard <args> --admin-listen 127.0.0.1:<admin_port>`, logging at
    /// `$SWITCHYARD_TEST_LOG` (warn by default).
    fn command(args: &[&str], admin_port: u16) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_switchyard"));
        c.args(args)
            .args(["--admin-listen", &format!("127.0.0.1:{admin_port}")])
            .env(
                "RUST_LOG",
                std::env::var("SWITCHYARD_TEST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        c
    }

    pub fn spawn(args: &[&str]) -> Role {
        let admin_port = free_port();
        let child = Self::command(args, admin_port)
            .spawn()
            .expect("spawn switchyard");
        let mut r = Role { child, admin_port };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !http_get_ok(admin_port, "/readyz") {
            if let Ok(Some(status)) = r.child.try_wait() {
                panic!("switchyard {} exited at start: {status}", args[0]);
            }
            assert!(Instant::now() < deadline, "{} never became ready", args[0]);
            std::thread::sleep(Duration::from_millis(50));
        }
        r
    }

    /// Runs a role that exits by itself (`load --once`) to its end.
    pub fn run_to_end(args: &[&str], timeout: Duration) -> std::process::ExitStatus {
        let mut child = Self::command(args, free_port())
            .spawn()
            .expect("spawn switchyard");
        wait_child(&mut child, timeout)
    }

    /// One metric from the role's /metrics (summed over matching series).
    pub fn metric(&self, name: &str) -> f64 {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.admin_port)) else {
            return f64::NAN;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        if s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
            .is_err()
        {
            return f64::NAN;
        }
        let mut body = String::new();
        let _ = s.read_to_string(&mut body);
        body.lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        wait_child(&mut self.child, timeout)
    }
}

/// Waits for a child to exit by itself; kills it and fails after `timeout`.
fn wait_child(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(s)) = child.try_wait() {
            return s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the role did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Drop for Role {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Produces raw values to a topic, keyed by account (waits for every ack).
pub async fn produce(brokers: &str, topic: &str, messages: &[(u64, Vec<u8>)]) {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let p: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "5")
        .set("partitioner", "murmur2_random")
        .create()
        .expect("producer");
    let mut pending = Vec::new();
    for (account, value) in messages {
        let key = account.to_string();
        loop {
            match p.send_result(FutureRecord::to(topic).key(&key).payload(value)) {
                Ok(f) => {
                    pending.push(f);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    }
    for f in pending {
        f.await.expect("delivery").expect("acked");
    }
}

/// Polls `f` until it returns true.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A real Prometheus scraping `targets` every second, with `rules` loaded.
pub struct Prometheus {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    pub fn start(rules: Option<&Path>, targets: &[(&str, u16)]) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let jobs: String = targets
            .iter()
            .map(|(job, p)| {
                format!("  - job_name: {job}\n    static_configs:\n      - targets: ['127.0.0.1:{p}']\n")
            })
            .collect();
        let rule_files = rules
            .map(|r| format!("rule_files:\n  - {}\n", r.display()))
            .unwrap_or_default();
        let cfg = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n{rule_files}scrape_configs:\n{jobs}"
        );
        let cfg_path = dir.path().join("prometheus.yml");
        std::fs::write(&cfg_path, cfg).unwrap();
        let child = Command::new("prometheus")
            .args([
                &format!("--config.file={}", cfg_path.display()),
                &format!("--storage.tsdb.path={}", dir.path().join("data").display()),
                &format!("--web.listen-address=127.0.0.1:{port}"),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus is not installed: run scripts/services");
        let prom = Prometheus {
            child,
            port,
            _dir: dir,
        };
        // It listens before its storage is open, answering 503 until then.
        let deadline = Instant::now() + Duration::from_secs(20);
        while !http_get_ok(port, "/-/ready") {
            assert!(Instant::now() < deadline, "prometheus never became ready");
            std::thread::sleep(Duration::from_millis(50));
        }
        prom
    }

    pub async fn query(&self, q: &str) -> serde_json::Value {
        reqwest::Client::new()
            .get(format!("http://127.0.0.1:{}/api/v1/query", self.port))
            .query(&[("query", q)])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    pub async fn rules(&self) -> serde_json::Value {
        reqwest::get(format!("http://127.0.0.1:{}/api/v1/rules", self.port))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A memory cgroup limited to `limit` bytes (v2, else v1), when this
/// machine lets one be made.
pub fn memory_cgroup(prefix: &str, limit: u64) -> Option<PathBuf> {
    let name = unique(prefix);
    for (root, file) in [
        ("/sys/fs/cgroup/unified", "memory.max"),
        ("/sys/fs/cgroup", "memory.max"),
        ("/sys/fs/cgroup/memory", "memory.limit_in_bytes"),
    ] {
        let dir = std::path::Path::new(root).join(&name);
        if std::fs::create_dir(&dir).is_err() {
            continue;
        }
        if std::fs::write(dir.join(file), limit.to_string()).is_ok() {
            // No swap to hide behind (v1 only; absent where swap is off).
            let _ = std::fs::write(dir.join("memory.memsw.limit_in_bytes"), limit.to_string());
            let _ = std::fs::write(dir.join("memory.swap.max"), "0");
            return Some(dir);
        }
        let _ = std::fs::remove_dir(&dir);
    }
    None
}

/// A `/proc/<pid>/status` field in KiB (`VmRSS`, `VmHWM`), if the process
/// is still there.
pub fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .strip_prefix(':')?
                .trim()
                .strip_suffix(" kB")?
                .parse()
                .ok()
        })
}

/// Waits for `child` to exit, sampling its peak RSS (`VmHWM`, KiB) every
/// 10 ms meanwhile: the last sample before the exit.
pub fn wait_with_peak(child: &mut Child) -> (std::process::ExitStatus, u64) {
    let pid = child.id();
    let mut peak = 0;
    loop {
        if let Some(kib) = proc_status_kib(pid, "VmHWM") {
            peak = peak.max(kib);
        }
        if let Some(s) = child.try_wait().expect("wait for the child") {
            return (s, peak);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
