//! Comparator speed on 1,000,000 dual-written rows (SWITCHYARD_BENCH_ROWS to
//! change): the rows are put in the machine's MariaDB (OLD) and PostgreSQL
//! (NEW), the comparator learns them as the stream would deliver them (dual
//! envelopes), then one pass verifies every row, key and content, in both
//! databases. The raw limit in the same run is both databases returning the
//! same rows, with their content digests, by plain range scans at once, with
//! nothing else done.
//!
//! `cargo bench --bench compare`

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;
use switchyard::compare::state::Status;
use switchyard::compare::CompareMetrics;
use switchyard::compare::{Comparator, CompareOptions};
use switchyard::db::{row_values, TableRows};

fn main() {
    let rows: u64 = std::env::var("SWITCHYARD_BENCH_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let schema = switchyard::config::PipelineConfig::load(None)
            .unwrap()
            .schema()
            .unwrap();
        let table = &schema.tables()[0];
        let old = TestDb::mariadb(&schema).await;
        let new = TestDb::postgres(&schema).await;
        // One hour of data time: 60 windows of ~16,700 rows at 1M rows.
        let spread = 3600.0 / rows as f64;
        let envelope_of = |i: u64| {
            let mut e = envelope(i % 5000, i, 100);
            e["row"]["timestamp"] = serde_json::json!(1_700_000_000 + (i as f64 * spread) as i64);
            e
        };
        let t = Instant::now();
        for start in (0..rows).step_by(5000) {
            let mut data = TableRows::default();
            for i in start..(start + 5000).min(rows) {
                let e = envelope_of(i);
                data.rows.push(row_values(table, e["row"].as_object().unwrap()).unwrap());
            }
            let batch = [(table, &data)];
            let (a, b) = tokio::join!(
                old.db.write_batch(&batch, &[], &[], None),
                new.db.write_batch(&batch, &[], &[], None)
            );
            a.unwrap();
            b.unwrap();
        }
        println!("compare: {rows} dual rows written to MariaDB and PostgreSQL in {:.1?}", t.elapsed());

        let cmp = Comparator::new(
            schema.clone(),
            old.db.clone(),
            new.db.clone(),
            CompareOptions {
                brokers: String::new(),
                topic: String::new(),
                group: String::new(),
                extra: vec![],
                window_secs: 60,
                settle: Duration::ZERO,
                max_lateness: Duration::ZERO,
                recheck: Duration::from_secs(3600),
                check_interval: Duration::from_secs(1),
                retain: Duration::from_secs(86_400),
                max_ids: 100,
            },
            CompareMetrics::new(&prometheus::Registry::new()).unwrap(),
        );
        let payloads: Vec<Vec<u8>> = (0..rows).map(|i| envelope_of(i).to_string().into_bytes()).collect();
        let t = Instant::now();
        for p in &payloads {
            cmp.observe(p, Some(b"dual"), 0.0);
        }
        let learn = t.elapsed();
        drop(payloads);
        let t = Instant::now();
        let lookups = cmp.check(true, None).await.unwrap();
        let check = t.elapsed();
        let p = cmp.parity();
        assert_eq!(p.status, Status::Ok, "{}", p.table());
        assert_eq!(p.tables[0].found_old as u64, rows);
        assert_eq!(p.tables[0].found_new as u64, rows);
        // A recheck (deletions): every row verified, so keys only.
        let t = Instant::now();
        cmp.check(true, None).await.unwrap();
        let recheck = t.elapsed();
        assert_eq!(cmp.parity().status, Status::Ok);

        // Raw: the same rows and their content read back by plain range
        // scans of both databases at once (the least a content verification
        // must read), and by plain batched key lookups.
        let t = Instant::now();
        let (a, b) = tokio::join!(
            old.db.digests_in_time_range(table, i64::MIN, i64::MAX),
            new.db.digests_in_time_range(table, i64::MIN, i64::MAX)
        );
        let raw = t.elapsed();
        assert_eq!(a.unwrap().len() as u64, rows);
        assert_eq!(b.unwrap().len() as u64, rows);
        let keys: Vec<String> = (0..rows).map(|i| uuid_for(i % 5000, i)).collect();
        let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        let t = Instant::now();
        assert_eq!(old.db.digests_of_keys(table, &refs).await.unwrap().len() as u64, rows);
        let lookup_old = t.elapsed();
        let t = Instant::now();
        assert_eq!(new.db.digests_of_keys(table, &refs).await.unwrap().len() as u64, rows);
        let lookup_new = t.elapsed();
        println!(
            "row lookups alone (1 database at a time): MariaDB {:.0} rows/s, PostgreSQL {:.0} rows/s",
            rows as f64 / lookup_old.as_secs_f64(),
            rows as f64 / lookup_new.as_secs_f64()
        );
        let per_sec = rows as f64 / check.as_secs_f64();
        let raw_per_sec = rows as f64 / raw.as_secs_f64();
        println!(
            "learn from the stream: {:>10.0} messages/s ({learn:.1?})",
            rows as f64 / learn.as_secs_f64()
        );
        println!(
            "verify (OLD and NEW):  {per_sec:>10.0} rows/s ({check:.1?}, {lookups} lookups, {} windows)",
            p.tables[0].details.len()
        );
        println!(
            "recheck (keys only):   {:>10.0} rows/s ({recheck:.1?})",
            rows as f64 / recheck.as_secs_f64()
        );
        println!(
            "raw range scans (both databases): {raw_per_sec:.0} rows/s ({raw:.1?}); comparator {:.2}× raw; target 200000 rows/s",
            per_sec / raw_per_sec
        );
    });
}
