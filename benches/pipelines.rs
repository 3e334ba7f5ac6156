//! Database throughput of both pipelines, with ~2.5 KB rows (the seed's
//! average payload), against the machine's PostgreSQL and MariaDB and a real
//! tansu broker; with the raw limit of each database measured in the same run
//! on the same rows (`psql \copy` and `LOAD DATA LOCAL INFILE`).
//!
//! - `ingest`: one partition, one consumer (rows/s per partition), at batch
//!   sizes 500, 2,000 and 5,000 — the seed measured 2,500 / 2,650 / 2,300 msgs/s.
//! - `load`: closed offline files into MariaDB at the default batch (2,000).
//!
//! `cargo bench --bench pipelines` (SWITCHYARD_BENCH_ROWS sets the rows per
//! scenario, 30,000 by default).

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use switchyard::admin::Health;
use switchyard::ingest::IngestMetrics;
use switchyard::ingest::{self, IngestOptions};
use switchyard::load::LoadMetrics;
use switchyard::load::{self, LoadOptions};
use switchyard::schema::Schema;
use tokio_util::sync::CancellationToken;

const BODY: usize = 2300;

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// A new one-partition topic holding `rows` envelopes of ~2.5 KB.
async fn fill_topic(broker: &Broker, rows: u64) -> String {
    let topic = unique("bench");
    create_topic(&broker.brokers(), &topic, 1).await;
    let msgs: Vec<(u64, Vec<u8>)> = (0..rows)
        .map(|i| {
            (
                i % 1000,
                envelope(i % 1000, i, BODY).to_string().into_bytes(),
            )
        })
        .collect();
    for chunk in msgs.chunks(5000) {
        produce(&broker.brokers(), &topic, chunk).await;
    }
    topic
}

/// rows/s from the start to the last database commit.
async fn ingest_rate(broker: &Broker, schema: &Schema, rows: u64, batch: usize) -> f64 {
    let topic = fill_topic(broker, rows).await;
    let new = TestDb::postgres(schema).await;
    let metrics = IngestMetrics::new(&prometheus::Registry::new()).unwrap();
    let opts = IngestOptions {
        brokers: broker.brokers(),
        topics: vec![topic],
        group: unique("bench"),
        batch_size: batch,
        batch_bytes: 8 << 20,
        consumer_timeout: Duration::from_millis(150),
        extra: vec![],
        idle_exit: Some(Duration::from_secs(2)),
    };
    let start = unix_now();
    let s = ingest::run(
        opts,
        schema,
        &new.db,
        metrics.clone(),
        Health::default(),
        CancellationToken::new(),
    )
    .await
    .expect("ingest");
    assert_eq!(s.inserted, rows, "{s:?}");
    assert_eq!(new.count().await as u64, rows);
    rows as f64 / (metrics.sink.last_commit.get() - start)
}

/// An rdkafka consumer with the same fetch settings reading the same messages
/// and doing nothing with them: the broker's limit for one partition.
async fn raw_consume(broker: &Broker, rows: u64) -> f64 {
    use rdkafka::consumer::{Consumer, StreamConsumer};
    let topic = fill_topic(broker, rows).await;
    let c: StreamConsumer = rdkafka::config::ClientConfig::new()
        .set("bootstrap.servers", broker.brokers())
        .set("group.id", unique("raw"))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("max.partition.fetch.bytes", "8388608")
        .set("fetch.max.bytes", "67108864")
        .create()
        .unwrap();
    c.subscribe(&[&topic]).unwrap();
    let first = c.recv().await.unwrap().detach();
    let _ = first;
    let t = Instant::now();
    for _ in 1..rows {
        c.recv().await.unwrap();
    }
    (rows - 1) as f64 / t.elapsed().as_secs_f64()
}

fn write_csv(path: &Path, rows: u64) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    for i in 0..rows {
        let e = envelope(i % 1000, i, BODY);
        let r = &e["row"];
        // Column order of the table: billable, body, project_id, timestamp, uuid, version.
        writeln!(
            f,
            "{},{},{},{},{},{}",
            r["billable"],
            r["body"].as_str().unwrap(),
            r["project_id"],
            r["timestamp"],
            r["uuid"].as_str().unwrap(),
            r["version"]
        )
        .unwrap();
    }
    f.flush().unwrap();
}

/// `psql \copy` of the same rows into a fresh table: rows/s.
async fn raw_postgres(schema: &Schema, csv: &Path, rows: u64) -> f64 {
    let db = TestDb::postgres(schema).await;
    let t = Instant::now();
    let out = Command::new("psql")
        .args([
            &db.url,
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            &format!("\\copy raw_item (billable, body, project_id, \"timestamp\", uuid, version) FROM '{}' CSV", csv.display()),
        ])
        .output()
        .expect("psql");
    let secs = t.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(db.count().await as u64, rows);
    rows as f64 / secs
}

/// `LOAD DATA LOCAL INFILE` of the same rows into a fresh MariaDB table: rows/s.
async fn raw_mariadb(schema: &Schema, csv: &Path, rows: u64) -> f64 {
    let db = TestDb::mariadb(schema).await;
    let t = Instant::now();
    let out = Command::new("mariadb")
        .args([
            "-h",
            "127.0.0.1",
            "-u",
            "root",
            "--local-infile=1",
            &db.name,
            "-e",
            &format!(
                "LOAD DATA LOCAL INFILE '{}' INTO TABLE raw_item FIELDS TERMINATED BY ',' (billable, body, project_id, `timestamp`, uuid, version)",
                csv.display()
            ),
        ])
        .output()
        .expect("mariadb client");
    let secs = t.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(db.count().await as u64, rows);
    rows as f64 / secs
}

/// The consumer's database write path alone (parse, bind, one transaction
/// per batch into PostgreSQL), without the broker: rows/s.
async fn write_path_rate(schema: &Schema, rows: u64, batch: usize) -> f64 {
    let db = TestDb::postgres(schema).await;
    let table = &schema.tables()[0];
    let payloads: Vec<Vec<u8>> = (0..rows)
        .map(|i| envelope(i % 1000, i, BODY).to_string().into_bytes())
        .collect();
    let t = Instant::now();
    for chunk in payloads.chunks(batch) {
        let mut data = switchyard::db::TableRows::default();
        for p in chunk {
            let v: serde_json::Value = serde_json::from_slice(p).unwrap();
            let row = v["row"].as_object().unwrap();
            data.rows
                .push(switchyard::db::row_values(table, row).unwrap());
        }
        db.db
            .write_batch(&[(table, &data)], &[], &[], None)
            .await
            .unwrap();
    }
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(db.count().await as u64, rows);
    rows as f64 / secs
}

async fn load_rate(schema: &Schema, rows: u64, batch: usize) -> f64 {
    let dirs = Dirs::new();
    let per_file = 5000usize;
    write_offline_files(
        &dirs.offline,
        (rows as usize).div_ceil(per_file),
        per_file,
        BODY,
    );
    let total = (rows as usize).div_ceil(per_file) * per_file;
    let old = TestDb::mariadb(schema).await;
    let metrics = LoadMetrics::new(&prometheus::Registry::new()).unwrap();
    let opts = LoadOptions {
        dir: dirs.offline.clone(),
        batch_size: batch,
        batch_bytes: 8 << 20,
        archive_dir: None,
        loader_id: "bench".to_string(),
        poll: Duration::from_millis(50),
        once: true,
        progress: false,
    };
    let t = Instant::now();
    let s = load::run(
        opts,
        schema,
        &old.db,
        None,
        metrics,
        CancellationToken::new(),
    )
    .await
    .expect("load");
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(s.inserted as usize, total);
    total as f64 / secs
}

fn main() {
    let rows: u64 = std::env::var("SWITCHYARD_BENCH_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let schema = switchyard::config::PipelineConfig::load(None)
            .unwrap()
            .schema()
            .unwrap();
        let broker = Broker::start();
        let csv_dir = tempfile::tempdir().unwrap();
        let csv = csv_dir.path().join("rows.csv");
        write_csv(&csv, rows);
        println!("pipelines: {rows} rows of ~2.5 KB per scenario\n");
        let pg_raw = raw_postgres(&schema, &csv, rows).await;
        println!("raw  PostgreSQL psql \\copy          {pg_raw:>9.0} rows/s");
        let kafka_raw = raw_consume(&broker, rows).await;
        println!("raw  rdkafka consume, 1 partition    {kafka_raw:>9.0} msgs/s");
        println!("\n| ingest → PostgreSQL, 1 partition | rows/s | vs consume | write path alone | vs \\copy | seed |");
        println!("|---|---|---|---|---|---|");
        for (batch, seed) in [
            (500usize, "2,500 (at 1,000)"),
            (2000, "2,650"),
            (5000, "2,300"),
        ] {
            let r = ingest_rate(&broker, &schema, rows, batch).await;
            let w = write_path_rate(&schema, rows, batch).await;
            println!(
                "| batch {batch} | {r:.0} | {:.2}× | {w:.0} | {:.2}× | {seed} |",
                r / kafka_raw,
                w / pg_raw
            );
        }
        let my_raw = raw_mariadb(&schema, &csv, rows).await;
        println!("\nraw  MariaDB LOAD DATA LOCAL INFILE   {my_raw:>9.0} rows/s");
        let l = load_rate(&schema, rows, 2000).await;
        println!(
            "| load → MariaDB, batch 2000 | {l:.0} rows/s | {:.2}× LOAD DATA |",
            l / my_raw
        );
    });
}
