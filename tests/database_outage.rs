//! The NEW database (the machine's PostgreSQL) stopped and restarted while
//! `ingest` runs: the consumer retries with backoff, commits no offset while
//! the database is down, and resumes by itself with no row lost or doubled.
//! Its own test binary: it stops a server other tests use, and cargo runs
//! test binaries one at a time.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// Stops the local PostgreSQL cluster; starts it again when dropped, even if
/// the test fails half-way.
struct PgStopped {
    version: String,
}

fn pg_version() -> String {
    let out = std::fs::read_dir("/etc/postgresql")
        .expect("PostgreSQL cluster config in /etc/postgresql")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .next();
    out.expect("a PostgreSQL cluster")
}

fn pg_ctl(version: &str, action: &str) -> bool {
    Command::new("pg_ctlcluster")
        .args([
            "--skip-systemctl-redirect",
            version,
            "main",
            action,
            "-m",
            "fast",
        ])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
        || Command::new("pg_ctlcluster")
            .args(["--skip-systemctl-redirect", version, "main", action])
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
}

impl PgStopped {
    fn stop() -> PgStopped {
        let version = pg_version();
        assert!(pg_ctl(&version, "stop"), "cannot stop PostgreSQL");
        PgStopped { version }
    }

    fn start(self) {
        drop(self)
    }
}

impl Drop for PgStopped {
    fn drop(&mut self) {
        let _ = Command::new("pg_ctlcluster")
            .args(["--skip-systemctl-redirect", &self.version, "main", "start"])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !wait_for_port(5432, Duration::from_millis(200)) && Instant::now() < deadline {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_during_ingestion_loses_nothing() {
    let broker = Broker::start_persistent();
    let topic = unique("outage");
    create_topic(&broker.brokers(), &topic, 2).await;
    let dirs = Dirs::new();
    let cfg_path = write_config(switchyard::config::EMBEDDED, &dirs, &topic);
    let schema = config(&dirs, &topic).schema().unwrap();
    let new = TestDb::postgres(&schema).await;
    let cfg = cfg_path.display().to_string();
    let brokers = broker.brokers();
    let group = unique("g");
    let ingest = Role::spawn(&[
        "ingest",
        "--config",
        &cfg,
        "--kafka-brokers",
        &brokers,
        "--kafka-group",
        &group,
        "--db-url",
        &new.url,
        "--batch-size",
        "200",
    ]);
    let batch = |from: u64, to: u64| -> Vec<(u64, Vec<u8>)> {
        (from..to)
            .map(|i| (i % 100, envelope(i % 100, i, 300).to_string().into_bytes()))
            .collect()
    };
    produce(&broker.brokers(), &topic, &batch(0, 3000)).await;
    eventually("the first rows", Duration::from_secs(30), || async {
        new.count().await == 3000
    })
    .await;

    let stopped = PgStopped::stop();
    // Traffic keeps coming while the database is down.
    produce(&broker.brokers(), &topic, &batch(3000, 6000)).await;
    // Each attempt waits up to the pool's 5 s acquire timeout.
    eventually("the consumer to retry", Duration::from_secs(30), || async {
        ingest.metric("switchyard_ingest_retries_total") >= 2.0
    })
    .await;
    let retries = ingest.metric("switchyard_ingest_retries_total");
    let committed_while_down = ingest.metric("switchyard_ingest_batches_total");
    stopped.start();

    produce(&broker.brokers(), &topic, &batch(6000, 8000)).await;
    eventually(
        "every row after the restart",
        Duration::from_secs(60),
        || async { new.db.count("raw_item").await.ok() == Some(8000) },
    )
    .await;
    let rows = new.raw_items().await; // panics on a duplicate
    assert_eq!(rows.len(), 8000);
    assert!((0..8000).all(|i| rows.contains_key(&uuid_for(i % 100, i))));
    assert!(
        ingest.metric("switchyard_ingest_batches_total") > committed_while_down,
        "batches committed after the restart"
    );
    eprintln!(
        "database outage: {retries} retries while down, {} batches committed in all",
        ingest.metric("switchyard_ingest_batches_total")
    );
}
