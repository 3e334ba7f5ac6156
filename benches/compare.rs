//! Comparator speed and memory on 1,000,000 dual-written rows
//! (SWITCHYARD_BENCH_ROWS to change; SWITCHYARD_BENCH_ROUTE=kafka for
//! Kafka-only rows, in NEW alone): the rows are put in the machine's MariaDB
//! (OLD) and PostgreSQL (NEW) with the consumers' own batch writes (faster
//! than the pipelines could carry them), the comparator learns them window
//! by window as the stream would deliver them, verifying each window once
//! its rows are in, and its RSS is read at each quarter of the rows: it
//! must stay flat as the rows retained grow. The raw limit in the same run is both databases returning the
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

/// This process's RSS figures (`VmRSS`, `VmHWM`), in KiB.
fn rss_kib(field: &str) -> u64 {
    proc_status_kib(std::process::id(), field).unwrap()
}

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
        // SWITCHYARD_BENCH_ROUTE=kafka: Kafka-only rows, in NEW alone (the
        // memory figures at 10M rows without MariaDB's random reads).
        let dual = std::env::var("SWITCHYARD_BENCH_ROUTE").as_deref() != Ok("kafka");
        let route: &[u8] = if dual { b"dual" } else { b"kafka" };
        let old = TestDb::mariadb(&schema).await;
        let new = TestDb::postgres(&schema).await;
        // ~16,700 rows a minute of data time, whatever the rows: 60 windows
        // at 1M rows, 600 at 10M.
        let spread = 3600.0 / 1_000_000.0;
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
                async {
                    if dual {
                        old.db.write_batch(&batch, &[], &[], None).await.map(|_| ())
                    } else {
                        Ok(())
                    }
                },
                new.db.write_batch(&batch, &[], &[], None)
            );
            a.unwrap();
            b.unwrap();
        }
        println!(
            "compare: {rows} {} rows written in {:.1?}",
            if dual { "dual rows, MariaDB and PostgreSQL," } else { "Kafka-only rows, PostgreSQL," },
            t.elapsed()
        );

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
        // The stream, window by window as it would arrive: each window is
        // verified once its rows are in (settle 0), so what the comparator
        // holds is one window's pending rows, whatever the rows retained.
        let per_window = (60.0 / spread).ceil() as u64;
        let (mut learn, mut check) = (Duration::ZERO, Duration::ZERO);
        let mut lookups = 0;
        let mut rss_at: Vec<(u64, u64)> = Vec::new();
        let mut next_sample = rows / 4;
        let mut i = 0;
        while i < rows {
            let first = envelope_of(i)["row"]["timestamp"].as_i64().unwrap();
            let window = first.div_euclid(60) * 60;
            let mut payloads = Vec::with_capacity(per_window as usize + 1);
            while i < rows && envelope_of(i)["row"]["timestamp"].as_i64().unwrap() < window + 60 {
                payloads.push(envelope_of(i).to_string().into_bytes());
                i += 1;
            }
            let t = Instant::now();
            for p in &payloads {
                cmp.observe(p, Some(route), 0.0);
            }
            learn += t.elapsed();
            drop(payloads);
            let t = Instant::now();
            lookups += cmp.check(true, Some((window, window + 60))).await.unwrap();
            check += t.elapsed();
            if i >= next_sample {
                rss_at.push((i, rss_kib("VmRSS")));
                next_sample += rows / 4;
            }
        }
        let peak = rss_kib("VmHWM");
        let p = cmp.parity();
        assert_eq!(p.status, Status::Ok, "{}", p.table());
        if dual {
            assert_eq!(p.tables[0].found_old as u64, rows);
        }
        assert_eq!(p.tables[0].found_new as u64, rows);
        // A recheck (deletions) of every window: keys only, streamed.
        let t = Instant::now();
        cmp.check(true, None).await.unwrap();
        let recheck = t.elapsed();
        assert_eq!(cmp.parity().status, Status::Ok);
        let after_recheck = rss_kib("VmHWM");
        for (n, kib) in &rss_at {
            println!("RSS with {n:>9} rows retained: {:>6.1} MiB", *kib as f64 / 1024.0);
        }
        let (quarter, all) = (rss_at[0].1 as f64, rss_at[rss_at.len() - 1].1 as f64);
        println!(
            "peak RSS {:.1} MiB (after the recheck {:.1} MiB); RSS at all rows / at a quarter: {:.2}× (goal ≤ 1.3×)",
            peak as f64 / 1024.0,
            after_recheck as f64 / 1024.0,
            all / quarter
        );

        // Raw: the same rows and their content read back by plain range
        // scans of both databases at once (the least a content verification
        // must read), and by plain batched key lookups.
        let t = Instant::now();
        let (a, b) = tokio::join!(
            async {
                if dual {
                    old.db.digests_in_time_range(table, i64::MIN, i64::MAX).await.map(|m| m.len())
                } else {
                    Ok(0)
                }
            },
            async { new.db.digests_in_time_range(table, i64::MIN, i64::MAX).await.map(|m| m.len()) }
        );
        let raw = t.elapsed();
        assert_eq!(a.unwrap() as u64, if dual { rows } else { 0 });
        assert_eq!(b.unwrap() as u64, rows);
        let sample = rows.min(200_000);
        let keys: Vec<String> = (0..sample).map(|i| uuid_for(i % 5000, i)).collect();
        let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        let t = Instant::now();
        if dual {
            assert_eq!(old.db.digests_of_keys(table, &refs).await.unwrap().len() as u64, sample);
        }
        let lookup_old = t.elapsed();
        let t = Instant::now();
        assert_eq!(new.db.digests_of_keys(table, &refs).await.unwrap().len() as u64, sample);
        let lookup_new = t.elapsed();
        let old_rate = if dual {
            format!("{:.0}", sample as f64 / lookup_old.as_secs_f64())
        } else {
            "-".to_string()
        };
        println!(
            "row lookups alone ({sample} keys, 1 database at a time): MariaDB {old_rate} rows/s, PostgreSQL {:.0} rows/s",
            sample as f64 / lookup_new.as_secs_f64()
        );
        let per_sec = rows as f64 / check.as_secs_f64();
        let raw_per_sec = rows as f64 / raw.as_secs_f64();
        println!(
            "learn from the stream: {:>10.0} messages/s ({learn:.1?})",
            rows as f64 / learn.as_secs_f64()
        );
        println!(
            "verify ({}):  {per_sec:>10.0} rows/s ({check:.1?}, {lookups} rows judged, {} windows)",
            if dual { "OLD and NEW" } else { "NEW" },
            p.tables[0].windows.values().sum::<usize>()
        );
        println!(
            "recheck (keys only):   {:>10.0} rows/s ({recheck:.1?})",
            rows as f64 / recheck.as_secs_f64()
        );
        println!(
            "raw range scans ({}): {raw_per_sec:.0} rows/s ({raw:.1?}); comparator {:.2}× raw; target 200000 rows/s",
            if dual { "both databases" } else { "NEW" },
            per_sec / raw_per_sec
        );
    });
}
