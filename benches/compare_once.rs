//! Peak memory of `switchyard compare --once`, end to end, as the rows grow:
//! for each row count (SWITCHYARD_BENCH_ONCE_ROWS, default
//! "100000,400000,1000000") the rows are written dual to the machine's
//! MariaDB (OLD) and PostgreSQL (NEW) with the consumers' own batch writes,
//! produced to a fresh 4-partition topic on tansu with the dual route header
//! (as the router sends them), and the release binary's `compare --once`
//! reads the topic and verifies every row, key and content, in both
//! databases. Its peak RSS (VmHWM, sampled every 20 ms until it exits) must
//! stay flat as the rows grow.
//!
//! `cargo bench --bench compare_once`

#[path = "../tests/common/mod.rs"]
mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use switchyard::db::{row_values, TableRows};

fn main() {
    let counts: Vec<u64> = std::env::var("SWITCHYARD_BENCH_ONCE_ROWS")
        .unwrap_or_else(|_| "100000,400000,1000000".into())
        .split(',')
        .filter_map(|n| n.trim().parse().ok())
        .collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let broker = Broker::start();
    let mut results = Vec::new();
    rt.block_on(async {
        let schema = switchyard::config::PipelineConfig::load(None)
            .unwrap()
            .schema()
            .unwrap();
        let table = &schema.tables()[0];
        for rows in counts {
            let old = TestDb::mariadb(&schema).await;
            let new = TestDb::postgres(&schema).await;
            let topic = unique("bench-once");
            create_topic(&broker.brokers(), &topic, 4).await;
            // ~16,700 rows a minute of data time, as in the compare bench.
            let spread = 3600.0 / 1_000_000.0;
            let envelope_of = |i: u64| {
                let mut e = envelope(i % 5000, i, 100);
                e["row"]["timestamp"] =
                    serde_json::json!(1_700_000_000 + (i as f64 * spread) as i64);
                e
            };
            let producer: FutureProducer = ClientConfig::new()
                .set("bootstrap.servers", broker.brokers())
                .set("linger.ms", "5")
                .set("partitioner", "murmur2_random")
                .create()
                .unwrap();
            let t = Instant::now();
            for start in (0..rows).step_by(5000) {
                let end = (start + 5000).min(rows);
                let mut data = TableRows::default();
                let mut sends = Vec::new();
                for i in start..end {
                    let e = envelope_of(i);
                    data.rows
                        .push(row_values(table, e["row"].as_object().unwrap()).unwrap());
                    let key = (i % 5000).to_string();
                    let value = e.to_string();
                    loop {
                        let headers = OwnedHeaders::new().insert(Header {
                            key: "switchyard-route",
                            value: Some("dual"),
                        });
                        let rec = FutureRecord::to(&topic)
                            .key(&key)
                            .payload(&value)
                            .headers(headers);
                        match producer.send_result(rec) {
                            Ok(f) => {
                                sends.push(f);
                                break;
                            }
                            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
                        }
                    }
                }
                let batch = [(table, &data)];
                let (a, b) = tokio::join!(
                    old.db.write_batch(&batch, &[], &[], None),
                    new.db.write_batch(&batch, &[], &[], None)
                );
                a.unwrap();
                b.unwrap();
                for f in sends {
                    f.await.unwrap().unwrap();
                }
            }
            println!(
                "compare --once: {rows} dual rows in MariaDB, PostgreSQL and the topic in {:.1?}",
                t.elapsed()
            );
            let t = Instant::now();
            let mut child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
                .args([
                    "compare",
                    "--once",
                    "--kafka-brokers",
                    &broker.brokers(),
                    "--kafka-topic",
                    &topic,
                    "--old-db-url",
                    &old.url,
                    "--new-db-url",
                    &new.url,
                    "--admin-listen",
                    &format!("127.0.0.1:{}", free_port()),
                ])
                .env("RUST_LOG", "warn")
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap();
            let (status, peak) = wait_with_peak(&mut child);
            let took = t.elapsed();
            let mut out = String::new();
            std::io::Read::read_to_string(child.stdout.as_mut().unwrap(), &mut out).unwrap();
            assert!(status.success(), "compare --once failed:\n{out}");
            assert!(out.contains("parity: ok"), "{out}");
            println!(
                "compare --once: {rows} rows verified in {took:.1?} ({:.0} rows/s), peak RSS {:.1} MiB",
                rows as f64 / took.as_secs_f64(),
                peak as f64 / 1024.0
            );
            results.push((rows, peak));
        }
    });
    if let (Some(first), Some(last)) = (results.first(), results.last()) {
        println!(
            "peak RSS at {} rows / at {} rows: {:.2}× for {:.1}× the rows (goal: flat, ≤ 1.3× for 4×)",
            last.0,
            first.0,
            last.1 as f64 / first.1 as f64,
            last.0 as f64 / first.0 as f64
        );
    }
}
