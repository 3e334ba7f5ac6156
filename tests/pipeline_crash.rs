//! kill -9 of each database role in the middle of its work: after a restart
//! no row is lost and none is duplicated.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loader_killed_mid_batch_loses_and_duplicates_nothing() {
    let dirs = Dirs::new();
    let schema = config(&dirs, "unused").schema().unwrap();
    let old = TestDb::mariadb(&schema).await;
    // Without the unique key a replayed batch would show as duplicate rows:
    // only the checkpoint, committed with the rows, prevents them.
    old.exec("ALTER TABLE raw_item DROP INDEX raw_item_uuid_key")
        .await;
    let uuids = write_offline_files(&dirs.offline, 24, 1000, 400);
    let dir = dirs.offline.display().to_string();
    let args = [
        "load",
        "--offline-dir",
        &dir,
        "--db-url",
        &old.url,
        "--batch-size",
        "300",
        "--no-replay",
    ];
    for kill_at in [2_000i64, 9_000, 16_000] {
        let mut loader = Role::spawn(&args);
        eventually("rows to arrive", Duration::from_secs(60), || async {
            old.count().await >= kill_at
        })
        .await;
        loader.kill9();
        eprintln!("killed the loader at {} rows", old.count().await);
    }
    let mut args_once = args.to_vec();
    args_once.push("--once");
    let status = Role::run_to_end(&args_once, Duration::from_secs(120));
    assert!(status.success(), "{status}");
    let rows = old.raw_items().await; // panics on a duplicate
    assert_eq!(rows.len(), uuids.len(), "every line loaded exactly once");
    assert!(uuids.iter().all(|u| rows.contains_key(u)));
    assert!(switchyard::offline::closed_files(&dirs.offline)
        .unwrap()
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_killed_mid_batch_loses_and_duplicates_nothing() {
    let broker = Broker::start_persistent();
    let topic = unique("crash");
    create_topic(&broker.brokers(), &topic, 4).await;
    let dirs = Dirs::new();
    let cfg_path = write_config(switchyard::config::EMBEDDED, &dirs, &topic);
    let schema = config(&dirs, &topic).schema().unwrap();
    let new = TestDb::postgres(&schema).await;
    let n = 20_000u64;
    let msgs: Vec<(u64, Vec<u8>)> = (0..n)
        .map(|i| (i % 500, envelope(i % 500, i, 400).to_string().into_bytes()))
        .collect();
    for chunk in msgs.chunks(2000) {
        produce(&broker.brokers(), &topic, chunk).await;
    }
    let cfg = cfg_path.display().to_string();
    let brokers = broker.brokers();
    let group = unique("g");
    let args = [
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
        "500",
        // A killed member holds its partitions until its session expires.
        "--kafka-config",
        "session.timeout.ms=6000",
        "--kafka-config",
        "heartbeat.interval.ms=500",
    ];
    for kill_at in [2_000i64, 8_000, 14_000] {
        let mut ingest = Role::spawn(&args);
        eventually("rows to arrive", Duration::from_secs(60), || async {
            new.count().await >= kill_at
        })
        .await;
        ingest.kill9();
        eprintln!("killed ingest at {} rows", new.count().await);
    }
    let _ingest = Role::spawn(&args);
    eventually("every row", Duration::from_secs(90), || async {
        new.count().await == n as i64
    })
    .await;
    let rows = new.raw_items().await;
    assert_eq!(rows.len() as u64, n);
    for i in (0..n).step_by(97) {
        assert!(rows.contains_key(&uuid_for(i % 500, i)));
    }
}

/// SIGTERM: each role finishes the batch in hand, commits, and exits 0;
/// a restart carries on from there with nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_both_roles() {
    let broker = Broker::start_persistent();
    let topic = unique("term");
    create_topic(&broker.brokers(), &topic, 2).await;
    let dirs = Dirs::new();
    let cfg_path = write_config(switchyard::config::EMBEDDED, &dirs, &topic);
    let schema = config(&dirs, &topic).schema().unwrap();
    let new = TestDb::postgres(&schema).await;
    let old = TestDb::mariadb(&schema).await;
    let n = 10_000u64;
    let msgs: Vec<(u64, Vec<u8>)> = (0..n)
        .map(|i| (i % 50, envelope(i % 50, i, 400).to_string().into_bytes()))
        .collect();
    produce(&broker.brokers(), &topic, &msgs).await;
    let uuids = write_offline_files(&dirs.offline, 10, 1000, 400);
    let (cfg, brokers, group, dir) = (
        cfg_path.display().to_string(),
        broker.brokers(),
        unique("g"),
        dirs.offline.display().to_string(),
    );
    let ingest_args = [
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
    ];
    let load_args = [
        "load",
        "--offline-dir",
        &dir,
        "--db-url",
        &old.url,
        "--batch-size",
        "200",
        "--no-replay",
    ];
    let mut ingest = Role::spawn(&ingest_args);
    let mut load = Role::spawn(&load_args);
    eventually("both roles at work", Duration::from_secs(30), || async {
        new.count().await > 0 && old.count().await > 0
    })
    .await;
    for role in [&ingest, &load] {
        let status = std::process::Command::new("kill")
            .args(["-TERM", &role.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }
    assert!(ingest.wait_exit(Duration::from_secs(15)).success());
    assert!(load.wait_exit(Duration::from_secs(15)).success());
    let (ingested, loaded) = (new.count().await, old.count().await);
    eprintln!("at SIGTERM: {ingested} ingested, {loaded} loaded");
    let _ingest = Role::spawn(&ingest_args);
    let mut once = load_args.to_vec();
    once.push("--once");
    assert!(Role::run_to_end(&once, Duration::from_secs(60)).success());
    eventually("every message", Duration::from_secs(60), || async {
        new.count().await == n as i64
    })
    .await;
    assert_eq!(old.raw_items().await.len(), uuids.len());
}
