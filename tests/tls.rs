//! Real TLS, no mocks. Kafka: tansu behind stunnel (tansu's own TLS flags are
//! unusable), with a throwaway CA made by `openssl`; the router produces
//! zstd-compressed batches over TLS with CA verification and ingest reads them
//! back over TLS; with a CA that does not verify the broker, the router falls
//! back to the offline file, and the consumers (ingest, compare) exit 2.
//! PostgreSQL: the local server's certificate with `sslmode=verify-ca`,
//! checked from the server side (`pg_stat_ssl`). MariaDB: a throwaway server
//! with its own certificate that refuses any connection without TLS; the
//! loader loads into it with `ssl-mode=VERIFY_CA` while replaying to Kafka over
//! TLS, and the comparator reads all three over TLS. A certificate that does
//! not verify, or credentials a server refuses, exit 2 naming the cause, as
//! does a consumer property that would commit offsets on its own.

mod common;

use common::scratch::ScratchMariadb;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::json;
use switchyard::admin::Health;
use switchyard::ingest::{self, IngestMetrics, IngestOptions};
use tokio_util::sync::CancellationToken;

const SNAKEOIL: &str = "/etc/ssl/certs/ssl-cert-snakeoil.pem";

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl (scripts/services installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA (`<name>-ca.pem`) and a server certificate it signed for
/// 127.0.0.1 and localhost (`<name>-server.pem`, `<name>-server.key`).
fn make_ca(dir: &Path, name: &str) -> PathBuf {
    let ca_key = format!("{name}-ca.key");
    let ca = format!("{name}-ca.pem");
    let key = format!("{name}-server.key");
    let csr = format!("{name}-server.csr");
    let crt = format!("{name}-server.pem");
    let ext = dir.join(format!("{name}.ext"));
    std::fs::write(&ext, "subjectAltName=IP:127.0.0.1,DNS:localhost\n").unwrap();
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &ca_key,
            "-out",
            &ca,
            "-days",
            "2",
            "-subj",
            &format!("/CN={name} test CA"),
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            "/CN=localhost",
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-out",
            &crt,
            "-days",
            "2",
            "-extfile",
            ext.to_str().unwrap(),
        ],
    );
    dir.join(ca)
}

/// stunnel accepting TLS on `port` and forwarding to `upstream`.
struct Terminator {
    child: Child,
}

impl Terminator {
    fn start(dir: &Path, name: &str, port: u16, upstream: u16) -> Terminator {
        let conf = dir.join("stunnel.conf");
        std::fs::write(
            &conf,
            format!(
                "foreground = yes\npid =\n[kafka]\naccept = 127.0.0.1:{port}\nconnect = 127.0.0.1:{upstream}\ncert = {}\nkey = {}\n",
                dir.join(format!("{name}-server.pem")).display(),
                dir.join(format!("{name}-server.key")).display()
            ),
        )
        .unwrap();
        let child = Command::new("stunnel4")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn stunnel4 (scripts/services installs it)");
        assert!(
            wait_for_port(port, Duration::from_secs(10)),
            "stunnel did not listen"
        );
        Terminator { child }
    }
}

impl Drop for Terminator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Creates a topic on the broker's own (plain) port, as an operator would on
/// the cluster: its metadata names the terminator's port, which a plain
/// client could not follow.
fn create_topic_behind(broker: &Broker, topic: &str, partitions: u32) {
    let out = Command::new(tansu_bin())
        .args([
            "topic",
            "create",
            "--broker",
            &format!("tcp://127.0.0.1:{}", broker.port),
            "--partitions",
            &partitions.to_string(),
            topic,
        ])
        .output()
        .expect("tansu topic create");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn tls_props(ca: &Path) -> Vec<(String, String)> {
    vec![
        ("security.protocol".into(), "SSL".into()),
        ("ssl.ca.location".into(), ca.display().to_string()),
        (
            "ssl.endpoint.identification.algorithm".into(),
            "https".into(),
        ),
    ]
}

/// Ingest in process with client properties `extra`, until the topic is
/// drained and idle.
async fn ingest_until_idle(
    broker: &Broker,
    topic: &str,
    extra: Vec<(String, String)>,
    schema: &switchyard::schema::Schema,
    db: &switchyard::db::Db,
) -> ingest::IngestSummary {
    let m = IngestMetrics::new(&prometheus::Registry::new()).unwrap();
    ingest::run(
        IngestOptions {
            brokers: broker.brokers(),
            topics: vec![topic.to_string()],
            group: unique("g"),
            batch_size: 100,
            batch_bytes: 8 << 20,
            consumer_timeout: Duration::from_millis(100),
            extra,
            idle_exit: Some(Duration::from_secs(2)),
        },
        schema,
        db,
        m,
        Health::default(),
        CancellationToken::new(),
    )
    .await
    .expect("ingest over TLS")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_and_ingest_speak_tls_to_kafka_and_zstd_batches_go_through() {
    let certs = tempfile::tempdir().unwrap();
    let ca = make_ca(certs.path(), "kafka");
    let other_ca = make_ca(certs.path(), "other");
    let tls_port = free_port();
    let broker = Broker::start_advertising(tls_port);
    let _stunnel = Terminator::start(certs.path(), "kafka", tls_port, broker.port);
    let topic = unique("tls");
    create_topic_behind(&broker, &topic, 2);

    let dirs = Dirs::new();
    let cfg = config(&dirs, &topic);
    let schema = cfg.schema().unwrap();
    set_flag(&dirs.flags, "switchyard-dual-write", json!(100));
    set_flag(&dirs.flags, "switchyard-kafka-only", json!(100));
    let mut opts = options(cfg.clone(), &broker.brokers());
    opts.kafka_extra = tls_props(&ca);
    opts.kafka_extra
        .push(("compression.type".into(), "zstd".into()));
    let router = InProcess::start_opts(opts).await;
    let sent: Vec<_> = (0..40u64).map(|seq| envelope(seq % 9, seq, 500)).collect();
    let (status, v) = post_ndjson(&router.url(), ndjson(&sent)).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        (v["kafka"].as_u64(), v["fallbacks"].as_u64()),
        (Some(40), Some(0)),
        "{v}"
    );
    router.stop().await;

    // ingest reads them over TLS into NEW.
    let new = TestDb::postgres(&schema).await;
    let s = ingest_until_idle(&broker, &topic, tls_props(&ca), &schema, &new.db).await;
    assert_eq!(s.inserted, 40);
    assert_eq!(new.count().await, 40);

    // A CA that does not verify the broker: deliveries fail, so Kafka-only
    // payloads land in the offline file, counted.
    let dirs2 = Dirs::new();
    let mut cfg2 = config(&dirs2, &topic);
    cfg2.kafka.delivery_timeout_ms = 1_500;
    set_flag(&dirs2.flags, "switchyard-dual-write", json!(100));
    set_flag(&dirs2.flags, "switchyard-kafka-only", json!(100));
    let mut opts = options(cfg2, &broker.brokers());
    opts.kafka_extra = tls_props(&other_ca);
    let router = InProcess::start_opts(opts).await;
    let sent: Vec<_> = (100..105u64).map(|seq| envelope(seq, seq, 100)).collect();
    let (status, v) = post_ndjson(&router.url(), ndjson(&sent)).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["fallbacks"].as_u64(), Some(5), "{v}");
    assert_eq!(
        router.counter("switchyard_route_fallbacks_total", &[("route", "kafka")]),
        5.0
    );
    router.stop().await;
    let lines = offline_lines(&dirs2.offline);
    assert_eq!(lines.len(), 5);
    assert!(lines
        .iter()
        .all(|l| l.route.as_deref() == Some("kafka-fallback")));
}

fn switchyard(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_switchyard"));
    cmd.args(args).env("RUST_LOG", "warn");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run switchyard");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_over_verified_tls_and_refusals_exit_2() {
    use sqlx::{Connection, Row};
    let dirs = Dirs::new();
    let cfg = config(&dirs, "unused");
    let schema = cfg.schema().unwrap();
    let db = TestDb::postgres(&schema).await;
    let tls_url = format!("{}?sslmode=verify-ca&sslrootcert={SNAKEOIL}", db.url);

    // db init over verified TLS.
    let (code, out) = switchyard(&["db", "init", "--db-url", &tls_url], &[]);
    assert_eq!(code, 0, "{out}");

    // A long-running role: every connection it holds to this database is TLS.
    // The test's own pool is closed first, so the only connections left to
    // this database are the role's.
    db.db.close().await;
    let broker = Broker::start();
    let topic = unique("pgtls");
    create_topic(&broker.brokers(), &topic, 1).await;
    let ingest = Role::spawn(&[
        "ingest",
        "--kafka-brokers",
        &broker.brokers(),
        "--kafka-topics",
        &topic,
        "--kafka-group",
        &unique("g"),
        "--db-url",
        &tls_url,
    ]);
    let mut admin = sqlx::PgConnection::connect(PG_ADMIN).await.unwrap();
    let rows = sqlx::query(
        "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.datname = $1",
    )
    .bind(&db.name)
    .fetch_all(&mut admin)
    .await
    .unwrap();
    let ssl: Vec<bool> = rows.iter().map(|r| r.get(0)).collect();
    assert!(
        !ssl.is_empty() && ssl.iter().all(|s| *s),
        "connections of ingest: {ssl:?}"
    );
    drop(ingest);

    // A certificate that does not verify: exit 2, naming TLS, at once. The
    // snakeoil certificate names localhost only, so verify-full against
    // 127.0.0.1 fails. (A wrong sslrootcert alone would not show it here:
    // OpenSSL keeps the system's roots, and Debian's store holds snakeoil.)
    let certs = tempfile::tempdir().unwrap();
    let bad = format!("{}?sslmode=verify-full&sslrootcert={SNAKEOIL}", db.url);
    let started = std::time::Instant::now();
    let (code, out) = switchyard(&["db", "init", "--db-url", &bad], &[]);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("TLS") || out.to_lowercase().contains("certificate"),
        "{out}"
    );
    let (code, out) = switchyard(
        &[
            "load",
            "--db-url",
            &bad,
            "--no-replay",
            "--offline-dir",
            dirs.offline.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, 2, "load retries a TLS refusal as an outage? {out}");
    assert!(started.elapsed() < Duration::from_secs(30));

    // Refused credentials, with the password from a file: exit 2, the
    // cause named, the password nowhere.
    let secret = certs.path().join("password");
    std::fs::write(&secret, "file-s3cret-9\n").unwrap();
    let (code, out) = switchyard(
        &[
            "db",
            "init",
            "--db-url",
            "postgres://no_such_role@127.0.0.1:5432/postgres",
            "--db-password-file",
            secret.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("refused the connection"), "{out}");
    assert!(!out.contains("file-s3cret-9"), "{out}");
}

/// Secrets given as files never show in errors either: a properties file
/// with a SASL password that librdkafka refuses to use.
#[test]
fn a_kafka_properties_file_is_read_and_its_secrets_never_shown() {
    let dir = tempfile::tempdir().unwrap();
    let props = dir.path().join("kafka.properties");
    std::fs::write(
        &props,
        "# mounted secret\nsecurity.protocol=SASL_SSL\nsasl.mechanisms=SCRAM-SHA-512\nsasl.username=u\nsasl.password=kafka-file-s3cret\nacks=1\n",
    )
    .unwrap();
    let dirs = Dirs::new();
    let (code, out) = switchyard(
        &[
            "route",
            "--kafka-config-file",
            props.to_str().unwrap(),
            "--offline-dir",
            dirs.offline.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("acks=1"),
        "the weakened guarantee is named: {out}"
    );
    assert!(!out.contains("kafka-file-s3cret"), "{out}");
}

/// The legacy path and the comparator over TLS end to end: the loader into a
/// MariaDB that refuses plain connections (`ssl-mode=VERIFY_CA`) while its
/// replayer produces Kafka-fallback lines over TLS; ingest into PostgreSQL
/// over verify-ca; `compare --once` reading Kafka, MariaDB and PostgreSQL over
/// TLS. Then the refusals: a MariaDB CA that does not verify, and a Kafka CA
/// that does not verify for both consumers, exit 2 naming TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loader_replayer_and_comparator_speak_tls_to_mariadb_postgres_and_kafka() {
    use std::os::unix::fs::PermissionsExt;
    let certs = tempfile::tempdir().unwrap();
    let kafka_ca = make_ca(certs.path(), "kafka");
    let other_ca = make_ca(certs.path(), "other");
    let db_ca = make_ca(certs.path(), "db");
    // mariadbd runs as `mysql` and must read its certificate and key.
    std::fs::set_permissions(certs.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    for f in std::fs::read_dir(certs.path()).unwrap() {
        let f = f.unwrap().path();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let at = |f: &str| certs.path().join(f).display().to_string();
    let server = ScratchMariadb::start(&[
        &format!("--ssl-ca={}", db_ca.display()),
        &format!("--ssl-cert={}", at("db-server.pem")),
        &format!("--ssl-key={}", at("db-server.key")),
        "--require-secure-transport=ON",
    ]);

    let dirs = Dirs::new();
    let tls_port = free_port();
    let broker = Broker::start_advertising(tls_port);
    let _stunnel = Terminator::start(certs.path(), "kafka", tls_port, broker.port);
    let topic = unique("tlsold");
    create_topic_behind(&broker, &topic, 2);
    let cfg = config(&dirs, &topic);
    let schema = cfg.schema().unwrap();
    // sqlx prefers TLS by default, so the test's own connections get through.
    let old = TestDb::mariadb_on(&server, &schema).await;
    let plain = format!("{}?ssl-mode=DISABLED", old.url);
    let (code, out) = switchyard(&["db", "init", "--db-url", &plain], &[]);
    assert_eq!(code, 2, "the server takes plain connections? {out}");
    let old_tls = format!("{}?ssl-mode=VERIFY_CA&ssl-ca={}", old.url, db_ca.display());
    let new = TestDb::postgres(&schema).await;
    let new_tls = format!("{}?sslmode=verify-ca&sslrootcert={SNAKEOIL}", new.url);

    // 30 payloads dual-written over TLS, then 5 Kafka-only ones that fall
    // back to the offline file (a CA that does not verify the broker).
    set_flag(&dirs.flags, "switchyard-dual-write", json!(100));
    let mut opts = options(cfg.clone(), &broker.brokers());
    opts.kafka_extra = tls_props(&kafka_ca);
    let router = InProcess::start_opts(opts).await;
    let dual: Vec<_> = (0..30u64).map(|seq| envelope(seq % 7, seq, 300)).collect();
    let (status, v) = post_ndjson(&router.url(), ndjson(&dual)).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["fallbacks"].as_u64(), Some(0), "{v}");
    router.stop().await;
    set_flag(&dirs.flags, "switchyard-dual-write", json!(100));
    set_flag(&dirs.flags, "switchyard-kafka-only", json!(100));
    let mut cfg_bad = cfg.clone();
    cfg_bad.kafka.delivery_timeout_ms = 1_500;
    let mut opts = options(cfg_bad, &broker.brokers());
    opts.kafka_extra = tls_props(&other_ca);
    let router = InProcess::start_opts(opts).await;
    let fallen: Vec<_> = (100..105u64).map(|seq| envelope(seq, seq, 300)).collect();
    let (status, v) = post_ndjson(&router.url(), ndjson(&fallen)).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["fallbacks"].as_u64(), Some(5), "{v}");
    router.stop().await;

    // The loader: dual lines into MariaDB over verified TLS, the fallback
    // lines replayed to Kafka over TLS.
    let kafka_tls = |ca: &Path| -> Vec<String> {
        tls_props(ca)
            .into_iter()
            .flat_map(|(k, v)| ["--kafka-config".to_string(), format!("{k}={v}")])
            .collect()
    };
    let mut load: Vec<String> = [
        "load",
        "--once",
        "--db-url",
        &old_tls,
        "--offline-dir",
        dirs.offline.to_str().unwrap(),
        "--kafka-brokers",
        &broker.brokers(),
        "--kafka-topic",
        &topic,
    ]
    .map(String::from)
    .to_vec();
    load.extend(kafka_tls(&kafka_ca));
    let load: Vec<&str> = load.iter().map(String::as_str).collect();
    let status = Role::run_to_end(&load, Duration::from_secs(120));
    assert!(status.success(), "load over TLS: {status}");
    assert_eq!(old.count().await, 30);

    // ingest over TLS into PostgreSQL over verify-ca: the 30 dual-written
    // messages and the 5 replayed ones.
    let new_db = switchyard::db::Db::connect(&new_tls, 2).unwrap();
    let s = ingest_until_idle(&broker, &topic, tls_props(&kafka_ca), &schema, &new_db).await;
    assert_eq!(s.inserted, 35);

    // The comparator, over TLS to all three: parity holds.
    let compare = |ca: &Path, old_url: &str| -> (i32, String) {
        let mut args: Vec<String> = [
            "compare",
            "--once",
            "--old-db-url",
            old_url,
            "--new-db-url",
            &new_tls,
            "--kafka-brokers",
            &broker.brokers(),
            "--kafka-topic",
            &topic,
            "--kafka-group",
            &unique("cmp"),
        ]
        .map(String::from)
        .to_vec();
        args.extend(kafka_tls(ca));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        switchyard(&args, &[])
    };
    let (code, out) = compare(&kafka_ca, &old_tls);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("ok"), "{out}");

    // Refusals exit 2 and name TLS: MariaDB's certificate against another CA…
    let bad_old = format!(
        "{}?ssl-mode=VERIFY_CA&ssl-ca={}",
        old.url,
        other_ca.display()
    );
    let (code, out) = switchyard(&["db", "init", "--db-url", &bad_old], &[]);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("TLS") || out.to_lowercase().contains("certificate"),
        "{out}"
    );
    // …and the broker's against another CA, for both consumers.
    let (code, out) = compare(&other_ca, &old_tls);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("refused the connection (TLS or SASL)"),
        "{out}"
    );
    let mut ingest_args: Vec<String> = [
        "ingest",
        "--db-url",
        &new_tls,
        "--kafka-brokers",
        &broker.brokers(),
        "--kafka-topics",
        &topic,
        "--kafka-group",
        &unique("g"),
        "--admin-listen",
        "127.0.0.1:0",
    ]
    .map(String::from)
    .to_vec();
    ingest_args.extend(kafka_tls(&other_ca));
    let ingest_args: Vec<&str> = ingest_args.iter().map(String::as_str).collect();
    let (code, out) = switchyard(&ingest_args, &[]);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("refused the connection (TLS or SASL)"),
        "{out}"
    );
}

fn sasl_props(ca: &Path, mechanism: &str, user: &str, password: &str) -> Vec<(String, String)> {
    let mut props = tls_props(ca);
    props[0].1 = "SASL_SSL".into();
    props.extend([
        ("sasl.mechanism".into(), mechanism.into()),
        ("sasl.username".into(), user.into()),
        ("sasl.password".into(), password.into()),
    ]);
    props
}

/// SASL/SCRAM over TLS end to end, as Amazon MSK and Aiven run it: tansu
/// requiring SCRAM behind the TLS terminator; the router produces with
/// SCRAM-SHA-512 and ingest consumes with SCRAM-SHA-256, the password read
/// from a properties file. A password the broker does not know stops ingest
/// with exit 2, naming the refusal and not the password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sasl_scram_over_tls_end_to_end() {
    let certs = tempfile::tempdir().unwrap();
    let ca = make_ca(certs.path(), "kafka");
    let tls_port = free_port();
    let topic = unique("sasl");
    let broker = Broker::start_sasl(tls_port, &[("alice", "alice-s3cret")], &[(&topic, 2)]);
    let _stunnel = Terminator::start(certs.path(), "kafka", tls_port, broker.port);

    let dirs = Dirs::new();
    let cfg = config(&dirs, &topic);
    let schema = cfg.schema().unwrap();
    set_flag(&dirs.flags, "switchyard-dual-write", json!(100));
    set_flag(&dirs.flags, "switchyard-kafka-only", json!(100));
    let mut opts = options(cfg.clone(), &broker.brokers());
    opts.kafka_extra = sasl_props(&ca, "SCRAM-SHA-512", "alice", "alice-s3cret");
    let router = InProcess::start_opts(opts).await;
    let sent: Vec<_> = (0..20u64).map(|seq| envelope(seq % 5, seq, 200)).collect();
    let (status, v) = post_ndjson(&router.url(), ndjson(&sent)).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        (v["kafka"].as_u64(), v["fallbacks"].as_u64()),
        (Some(20), Some(0)),
        "{v}"
    );
    router.stop().await;

    let new = TestDb::postgres(&schema).await;
    let props = |password: &str| -> PathBuf {
        let path = certs.path().join(format!("{password}.properties"));
        let text: String = sasl_props(&ca, "SCRAM-SHA-256", "alice", password)
            .into_iter()
            .map(|(k, v)| format!("{k}={v}\n"))
            .collect();
        std::fs::write(&path, format!("# mounted secret\n{text}")).unwrap();
        path
    };
    let ingest = |props: &Path| -> (i32, String) {
        switchyard(
            &[
                "ingest",
                "--db-url",
                &new.url,
                "--kafka-brokers",
                &broker.brokers(),
                "--kafka-topics",
                &topic,
                "--kafka-group",
                &unique("g"),
                "--kafka-config-file",
                props.to_str().unwrap(),
                "--idle-exit",
                "2",
                "--admin-listen",
                "127.0.0.1:0",
            ],
            &[],
        )
    };
    let (code, out) = ingest(&props("alice-s3cret"));
    assert_eq!(code, 0, "{out}");
    assert_eq!(new.count().await, 20);

    let (code, out) = ingest(&props("not-alices-password"));
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("refused the connection (TLS or SASL)"),
        "{out}"
    );
    assert!(!out.contains("not-alices-password"), "{out}");
}

/// What the build of librdkafka supports, whatever broker is at hand: every
/// SASL mechanism the README promises can be configured, each compression
/// codec too, and Kerberos is refused (not built) rather than failing later.
#[test]
fn the_built_librdkafka_offers_the_promised_mechanisms_and_codecs() {
    use rdkafka::consumer::BaseConsumer;
    let make = |props: &[(&str, &str)]| -> Result<BaseConsumer, String> {
        let mut cfg = rdkafka::ClientConfig::new();
        cfg.set("bootstrap.servers", "127.0.0.1:9")
            .set("group.id", "build-check");
        for (k, v) in props {
            cfg.set(*k, *v);
        }
        cfg.create().map_err(|e| e.to_string())
    };
    for mechanism in ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"] {
        let mut props = vec![
            ("security.protocol", "SASL_SSL"),
            ("sasl.mechanism", mechanism),
            ("sasl.username", "u"),
            ("sasl.password", "p"),
        ];
        if mechanism == "OAUTHBEARER" {
            props.truncate(2);
            props.push(("enable.sasl.oauthbearer.unsecure.jwt", "true"));
        }
        if let Err(e) = make(&props) {
            panic!("{mechanism}: {e}");
        }
    }
    let gssapi = make(&[
        ("security.protocol", "SASL_SSL"),
        ("sasl.mechanism", "GSSAPI"),
    ]);
    assert!(gssapi.is_err(), "GSSAPI is not built");
    for codec in ["gzip", "snappy", "lz4", "zstd"] {
        let mut cfg = rdkafka::ClientConfig::new();
        cfg.set("bootstrap.servers", "127.0.0.1:9")
            .set("compression.type", codec);
        let made: Result<rdkafka::producer::BaseProducer, _> = cfg.create();
        if let Err(e) = made {
            panic!("{codec}: {e}");
        }
    }
}

/// `--kafka-config` cannot turn on librdkafka's own offset commits for
/// ingest: offsets move only after the database committed their batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_refuses_properties_that_commit_offsets_on_their_own() {
    let dirs = Dirs::new();
    let schema = config(&dirs, "unused").schema().unwrap();
    let new = TestDb::postgres(&schema).await;
    for prop in ["enable.auto.commit=true", "enable.auto.offset.store=true"] {
        let (code, out) = switchyard(
            &[
                "ingest",
                "--db-url",
                &new.url,
                "--kafka-brokers",
                "127.0.0.1:9",
                "--kafka-topics",
                "t",
                "--kafka-config",
                prop,
                "--admin-listen",
                "127.0.0.1:0",
            ],
            &[],
        );
        assert_eq!(code, 2, "{prop}: {out}");
        assert!(out.contains(&format!("{prop} is refused")), "{out}");
    }
}
