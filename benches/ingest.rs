//! The ingest consumer above a real broker's ceiling: one partition of
//! librdkafka's in-process mock cluster into PostgreSQL, at batch sizes
//! 1,000, 2,000 and 5,000, with ~2.5 KB rows, against the raw limits of the
//! same run: `COPY … FROM STDIN` of the same rows into a fresh table, and
//! an rdkafka consumer that only reads the partition. The consumption is
//! the one `switchyard plan --measure` times (from the partition's
//! assignment to the last database commit).
//!
//! `cargo bench --bench ingest` (SWITCHYARD_BENCH_ROWS sets the rows, 60,000
//! by default; SWITCHYARD_BENCH_KAFKA_CONFIG=`k=v,…` consumer properties).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::mocking::MockCluster;
use switchyard::plan::measure::{self, Target};
use switchyard::schema::Table;

const PAYLOAD: usize = 2500;
const GOAL: f64 = 26_500.0;

/// The rows of `payloads` as CSV, columns in the table's order.
fn csv(table: &Table, payloads: &[Vec<u8>]) -> String {
    let mut out = String::new();
    for p in payloads {
        let v: serde_json::Value = serde_json::from_slice(p).unwrap();
        let row = &v["row"];
        let fields: Vec<String> = table
            .columns
            .iter()
            .map(|c| match &row[&c.name] {
                serde_json::Value::String(s) => format!("\"{}\"", s.replace('"', "\"\"")),
                other => other.to_string(),
            })
            .collect();
        out.push_str(&fields.join(","));
        out.push('\n');
    }
    out
}

/// `COPY … FROM STDIN` of the same rows into a fresh table: rows/s.
async fn raw_copy(schema: &switchyard::schema::Schema, payloads: &[Vec<u8>]) -> f64 {
    use sqlx::Connection;
    let db = TestDb::postgres(schema).await;
    let table = &schema.tables()[0];
    let data = csv(table, payloads);
    let cols: Vec<String> = table
        .columns
        .iter()
        .map(|c| format!("\"{}\"", c.name))
        .collect();
    let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let t = Instant::now();
    let mut copy = conn
        .copy_in_raw(&format!(
            "COPY \"{}\" ({}) FROM STDIN (FORMAT csv)",
            table.name,
            cols.join(", ")
        ))
        .await
        .unwrap();
    for chunk in data.as_bytes().chunks(1 << 20) {
        copy.send(chunk).await.unwrap();
    }
    let n = copy.finish().await.unwrap();
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(n as usize, payloads.len());
    assert_eq!(db.count().await as usize, payloads.len());
    payloads.len() as f64 / secs
}

/// An rdkafka consumer with the ingest fetch settings that only reads the
/// partition: the mock broker's limit.
async fn raw_consume(brokers: &str, topic: &str, rows: u64) -> f64 {
    let c: StreamConsumer = rdkafka::config::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique("raw"))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("max.partition.fetch.bytes", "8388608")
        .set("fetch.max.bytes", "67108864")
        .set("queued.max.messages.kbytes", "16384")
        .create()
        .unwrap();
    c.subscribe(&[topic]).unwrap();
    let _first = c.recv().await.unwrap().detach();
    let t = Instant::now();
    for _ in 1..rows {
        c.recv().await.unwrap();
    }
    (rows - 1) as f64 / t.elapsed().as_secs_f64()
}

fn main() {
    let rows: u64 = std::env::var("SWITCHYARD_BENCH_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let cfg = switchyard::config::PipelineConfig::load(None).unwrap();
        let schema = cfg.schema().unwrap();
        let table = &schema.tables()[0];
        let mock = MockCluster::new(1).unwrap();
        let topic = unique("ingest");
        mock.create_topic(&topic, 1, 1).unwrap();
        let brokers = mock.bootstrap_servers();
        // Consumer properties to try (`k=v,k=v`), as `--kafka-config` gives them.
        let extra: Vec<(String, String)> = std::env::var("SWITCHYARD_BENCH_KAFKA_CONFIG")
            .unwrap_or_default()
            .split(',')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        let target = Target {
            brokers: &brokers,
            extra: &extra,
            topic: &topic,
            schema: &schema,
        };
        let produced = measure::produce(&target, &cfg.kafka, rows, PAYLOAD, &mut |_| {})
            .await
            .unwrap();
        println!(
            "ingest: {rows} rows of {PAYLOAD} B on one partition of the in-process mock cluster \
             (produced at {:.0} msgs/s with the router's producer)\n",
            produced.msgs_per_sec
        );
        let now = 1_700_000_000;
        let payloads: Vec<Vec<u8>> = (0..rows)
            .map(|i| measure::envelope(table, i, PAYLOAD, now))
            .collect();
        let copy = raw_copy(&schema, &payloads).await;
        println!("raw  PostgreSQL COPY FROM STDIN          {copy:>9.0} rows/s");
        let consume = raw_consume(&brokers, &topic, rows).await;
        println!("raw  rdkafka consume, mock, 1 partition  {consume:>9.0} msgs/s");
        println!();
        println!("| ingest mock → PostgreSQL, 1 partition | rows/s | vs COPY | vs consume | goal {GOAL:.0} rows/s, 0.7× COPY |");
        println!("|---|---|---|---|---|");
        for batch in [1000usize, 2000, 5000] {
            let db = TestDb::postgres(&schema).await;
            let group = unique("ingest");
            let c = measure::consume(&target, &group, &db.db, batch, rows)
                .await
                .unwrap();
            assert_eq!(db.count().await as u64, rows);
            let r = c.msgs_per_sec;
            println!(
                "| batch {batch} | {r:.0} | {:.2}× | {:.2}× | {} |",
                r / copy,
                r / consume,
                if r >= GOAL && r / copy >= 0.7 {
                    "met"
                } else {
                    "short"
                }
            );
            if batch == 1000 {
                // A replay: the same messages again, every key stored (the
                // inserts skip each row as a duplicate; COPY is not tried
                // batch after batch).
                let again = measure::consume(&target, &unique("replay"), &db.db, batch, rows)
                    .await
                    .unwrap();
                assert_eq!(db.count().await as u64, rows, "a replay adds nothing");
                let r = again.msgs_per_sec;
                println!(
                    "| replay, batch {batch}, every key stored | {r:.0} | {:.2}× | {:.2}× | (no goal) |",
                    r / copy,
                    r / consume
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    });
}
