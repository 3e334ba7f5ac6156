//! The ingestion consumer stays a good member of its group while its
//! database stalls: it keeps polling (so `max.poll.interval.ms` never
//! expires and it is never pushed out of the group), and its lag keeps
//! being measured from the broker, a new partition's backlog included.

mod common;

use std::time::{Duration, Instant};

use common::*;
use switchyard::admin::Health;
use switchyard::ingest::{self, IngestMetrics, IngestOptions};
use tokio_util::sync::CancellationToken;

/// A metric summed over its labels.
fn sum(registry: &prometheus::Registry, name: &str) -> f64 {
    metric_value(registry, name, &[])
}

async fn wait_until(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A table lock holds every insert for longer than `max.poll.interval.ms`
/// (6 s here). Before, the consumer stopped polling while it waited: its lag
/// froze at 0 and librdkafka left the group after 6 s (a revocation, then
/// commits from a member that no longer owned its partitions).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_stall_longer_than_the_poll_interval_keeps_the_group_and_the_lag_moving() {
    use sqlx::Connection;
    let broker = Broker::start();
    let topic = unique("stall");
    create_topic(&broker.brokers(), &topic, 2).await;
    let dirs = Dirs::new();
    let schema = config(&dirs, &topic).schema().expect("schema");
    let new = TestDb::postgres(&schema).await;
    let message = |i: u64| (i, envelope(i, 9_000 + i, 50).to_string().into_bytes());
    let backlog: Vec<_> = (0..40).map(message).collect();
    produce(&broker.brokers(), &topic, &backlog).await;

    // The database stalls before the consumer starts: its partitions arrive
    // with a backlog it cannot write.
    let mut lock = sqlx::PgConnection::connect(&new.url)
        .await
        .expect("connect");
    sqlx::query("BEGIN")
        .execute(&mut lock)
        .await
        .expect("begin");
    sqlx::query("LOCK TABLE raw_item IN ACCESS EXCLUSIVE MODE")
        .execute(&mut lock)
        .await
        .expect("lock");

    let registry = prometheus::Registry::new();
    let metrics = IngestMetrics::new(&registry).expect("metrics");
    let shutdown = CancellationToken::new();
    let opts = IngestOptions {
        brokers: broker.brokers(),
        topics: vec![topic.clone()],
        group: unique("g"),
        batch_size: 20,
        batch_bytes: 8 << 20,
        consumer_timeout: Duration::from_millis(150),
        extra: vec![
            ("session.timeout.ms".into(), "6000".into()),
            ("max.poll.interval.ms".into(), "6000".into()),
        ],
        idle_exit: None,
    };
    let consumer = tokio::spawn({
        let schema = schema.clone();
        let db = new.db.clone();
        let shutdown = shutdown.clone();
        async move { ingest::run(opts, &schema, &db, metrics, Health::default(), shutdown).await }
    });

    // The backlog shows while nothing can be written: in messages, and in
    // seconds from the oldest message in hand.
    wait_until("the backlog in the lag", Duration::from_secs(30), || {
        sum(&registry, "switchyard_ingest_lag_messages") == 40.0
    })
    .await;
    wait_until("the lag in seconds", Duration::from_secs(10), || {
        sum(&registry, "switchyard_ingest_lag_seconds") > 0.0
    })
    .await;
    let stalled_at = Instant::now();
    // More arrives during the stall, and the lag follows. One message per
    // produce request: tansu answers a ListOffsets query with the base
    // offset of the partition's last batch plus one (Kafka with its end).
    for i in 40..55 {
        produce(&broker.brokers(), &topic, &[message(i)]).await;
    }
    wait_until(
        "the new messages in the lag",
        Duration::from_secs(10),
        || sum(&registry, "switchyard_ingest_lag_messages") == 55.0,
    )
    .await;
    // Well past max.poll.interval.ms with the database still stalled.
    let hold = Duration::from_secs(9).saturating_sub(stalled_at.elapsed());
    tokio::time::sleep(hold).await;
    // (A count would wait on the lock too.)
    assert_eq!(
        sum(&registry, "switchyard_ingest_rows_total"),
        0.0,
        "the lock held every insert"
    );
    sqlx::query("COMMIT")
        .execute(&mut lock)
        .await
        .expect("unlock");

    wait_until("every row", Duration::from_secs(60), || {
        sum(&registry, "switchyard_ingest_rows_total") == 55.0
    })
    .await;
    wait_until("the lag back to zero", Duration::from_secs(30), || {
        sum(&registry, "switchyard_ingest_lag_messages") == 0.0
    })
    .await;
    assert_eq!(new.count().await, 55);
    assert_eq!(
        metric_value(
            &registry,
            "switchyard_ingest_rebalances_total",
            &[("kind", "revoke")]
        ),
        0.0,
        "the consumer was never pushed out of its group"
    );
    assert_eq!(
        sum(&registry, "switchyard_ingest_offset_commit_errors_total"),
        0.0
    );
    shutdown.cancel();
    let summary = consumer.await.expect("join").expect("ingest");
    assert_eq!(
        (summary.inserted, summary.duplicates),
        (55, 0),
        "{summary:?}"
    );
}

/// A transaction holds at most `batch_bytes` of messages (one at least),
/// whatever the message count allows: 60 messages of 100 KiB with a 2,000
/// message batch and 1 MiB of bytes are written in at least 6 transactions
/// of at most 11 messages, and all of them land.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_holds_at_most_batch_bytes_of_messages() {
    // What arrives during a write is kept up to four batches' bytes, then
    // the partition is paused and later resumed from its next offset:
    // records kept one by one (see `Broker::start_persistent`).
    let broker = Broker::start_persistent();
    let topic = unique("bytes");
    create_topic(&broker.brokers(), &topic, 1).await;
    let dirs = Dirs::new();
    let schema = config(&dirs, &topic).schema().unwrap();
    let new = TestDb::postgres(&schema).await;
    let big: Vec<_> = (0..60u64)
        .map(|i| {
            (
                i,
                envelope(i, 20_000 + i, 100 << 10).to_string().into_bytes(),
            )
        })
        .collect();
    produce(&broker.brokers(), &topic, &big).await;
    let registry = prometheus::Registry::new();
    let metrics = IngestMetrics::new(&registry).expect("metrics");
    let opts = IngestOptions {
        brokers: broker.brokers(),
        topics: vec![topic.clone()],
        group: unique("g"),
        batch_size: 2000,
        batch_bytes: 1 << 20,
        // Long enough that no batch closes on time in this test.
        consumer_timeout: Duration::from_secs(5),
        extra: vec![],
        idle_exit: Some(Duration::from_secs(2)),
    };
    let summary = tokio::time::timeout(
        Duration::from_secs(120),
        ingest::run(
            opts,
            &schema,
            &new.db,
            metrics,
            Health::default(),
            CancellationToken::new(),
        ),
    )
    .await
    .expect("ingest finished")
    .expect("ingest ran");
    assert_eq!(summary.inserted, 60, "{summary:?}");
    assert_eq!(new.count().await, 60);
    let batches = sum(&registry, "switchyard_ingest_batches_total");
    assert!(
        batches >= 6.0,
        "{batches} transactions for 6 MiB in 1 MiB batches"
    );
}
