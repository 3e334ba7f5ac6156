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
    let mut last = Role::spawn(&args_once);
    let status = last.wait_exit(Duration::from_secs(120));
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
        "session.timeout.ms=6000,heartbeat.interval.ms=500",
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
