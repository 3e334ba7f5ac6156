//! `compare --range` speed and memory on 1,000,000 equal rows
//! (SWITCHYARD_BENCH_ROWS to change) in the machine's MariaDB (OLD) and
//! PostgreSQL (NEW), generated inside each database (`generate_series`, the
//! sequence engine) so set-up is quick. It times the range diff of the equal
//! table (checksums computed inside both databases at once), then of the
//! same table with a row deleted, one added and one changed in NEW (the
//! bisection and the streamed segments), and prints rows/s per side and this
//! process's peak RSS. The raw limit in the same run is a plain scan of each
//! table summing an MD5 prefix of one column, both databases at once: the
//! least an in-database content checksum costs.
//!
//! `cargo bench --bench compare_range`

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Instant;

use common::*;
use switchyard::compare::range::{self, RangeRequest, Segment, Tuning};
use switchyard::db::range::KeyKind;

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
        let old = TestDb::mariadb(&schema).await;
        let new = TestDb::postgres(&schema).await;
        let last = rows - 1;
        let t = Instant::now();
        let (fill_old, fill_new) = (
            format!(
                "INSERT INTO raw_item (billable, body, project_id, `timestamp`, uuid, version) \
                 SELECT seq % 2, CONCAT('body ', seq, ' ', REPEAT('x', seq % 40)), seq % 173, \
                 1700000000 + seq, CONCAT(SUBSTR(m, 1, 8), '-', SUBSTR(m, 9, 4), '-', \
                 SUBSTR(m, 13, 4), '-', SUBSTR(m, 17, 4), '-', SUBSTR(m, 21, 12)), seq % 7 \
                 FROM (SELECT seq, MD5(seq) AS m FROM seq_0_to_{last}) s"
            ),
            format!(
                "INSERT INTO raw_item (billable, body, project_id, \"timestamp\", uuid, version) \
                 SELECT g % 2, 'body ' || g || ' ' || repeat('x', (g % 40)::int), g % 173, \
                 1700000000 + g, md5(g::text)::uuid, g % 7 FROM generate_series(0, {last}) g"
            ),
        );
        tokio::join!(old.exec(&fill_old), new.exec(&fill_new));
        new.exec("ANALYZE raw_item").await;
        old.exec("ANALYZE TABLE raw_item").await;
        println!(
            "compare_range: {rows} rows generated in MariaDB and PostgreSQL in {:.1?}",
            t.elapsed()
        );

        let req = RangeRequest {
            table: table.name.clone(),
            key_from: None,
            key_to: None,
            from: None,
            to: None,
            tuning: Tuning::default(),
        };
        let root = Segment::default();
        let before = rss_kib("VmHWM");
        let t = Instant::now();
        let r = range::run(&old.db, &new.db, table, KeyKind::Uuid, &root, &req)
            .await
            .unwrap();
        let equal = t.elapsed();
        assert_eq!(r.status, "equal", "{}", r.text());
        // One segment at a time: the root in one query a side.
        let single = RangeRequest {
            tuning: Tuning {
                concurrency: 1,
                ..Tuning::default()
            },
            ..req.clone()
        };
        let t = Instant::now();
        let r1 = range::run(&old.db, &new.db, table, KeyKind::Uuid, &root, &single)
            .await
            .unwrap();
        let equal_single = t.elapsed();
        assert_eq!(r1.status, "equal", "{}", r1.text());
        assert_eq!((r.work.rows_old, r.work.rows_new), (rows, rows));
        assert_eq!(r.hashing, "sql");

        // One row deleted, one added and one changed in NEW.
        new.exec("DELETE FROM raw_item WHERE uuid = md5('10')::uuid").await;
        new.exec(&format!(
            "UPDATE raw_item SET body = 'B' || substr(body, 2) WHERE uuid = md5('{}')::uuid",
            rows / 2
        ))
        .await;
        new.exec(
            "INSERT INTO raw_item (billable, body, project_id, \"timestamp\", uuid, version) \
             VALUES (0, 'late', 1, 1700000000, md5('extra')::uuid, 1)",
        )
        .await;
        let t = Instant::now();
        let d = range::run(&old.db, &new.db, table, KeyKind::Uuid, &root, &req)
            .await
            .unwrap();
        let differing = t.elapsed();
        assert_eq!(
            (d.differences.missing, d.differences.extra, d.differences.differs),
            (1, 1, 1),
            "{}",
            d.text()
        );
        let peak = rss_kib("VmHWM");

        // Raw: one plain scan per side summing an MD5 prefix of one column,
        // both at once; and a bare COUNT(*).
        let t = Instant::now();
        tokio::join!(
            old.exec(
                "SELECT COUNT(*), SUM(CAST(CONV(SUBSTRING(MD5(body), 1, 15), 16, 10) AS UNSIGNED)) \
                 FROM raw_item"
            ),
            new.exec(
                "SELECT COUNT(*), SUM(('x' || substr(md5(body), 1, 15))::bit(60)::bigint) \
                 FROM raw_item"
            ),
        );
        let raw = t.elapsed();
        // The same, each side's keys in two halves scanned at once.
        let half = "'80000000-0000-0000-0000-000000000000'";
        let hash_old = "SELECT COUNT(*), SUM(CAST(CONV(SUBSTRING(MD5(body), 1, 15), 16, 10) AS UNSIGNED)) FROM raw_item";
        let hash_new = "SELECT COUNT(*), SUM(('x' || substr(md5(body), 1, 15))::bit(60)::bigint) FROM raw_item";
        let (o1, o2, n1, n2) = (
            format!("{hash_old} WHERE uuid < {half}"),
            format!("{hash_old} WHERE uuid >= {half}"),
            format!("{hash_new} WHERE uuid < {half}::uuid"),
            format!("{hash_new} WHERE uuid >= {half}::uuid"),
        );
        let t = Instant::now();
        tokio::join!(old.exec(&o1), old.exec(&o2), new.exec(&n1), new.exec(&n2));
        let raw2 = t.elapsed();
        let t = Instant::now();
        tokio::join!(
            old.exec("SELECT COUNT(*) FROM raw_item"),
            new.exec("SELECT COUNT(*) FROM raw_item")
        );
        let count = t.elapsed();

        let rate = |d: std::time::Duration| rows as f64 / d.as_secs_f64();
        println!(
            "range diff, equal:        {:>10.0} rows/s per side ({equal:.2?}, {} segments, 2 at a time)",
            rate(equal),
            r.work.segments
        );
        println!(
            "range diff, equal, 1 at a time: {:>4.0} rows/s per side ({equal_single:.2?}, {} segment)",
            rate(equal_single),
            r1.work.segments
        );
        println!(
            "range diff, 3 differences: {:>9.0} rows/s per side ({differing:.2?}, {} segments, {}/{} rows streamed)",
            rate(differing),
            d.work.segments,
            d.work.streamed_old,
            d.work.streamed_new
        );
        println!(
            "raw limit, SUM(md5(body)) scan: {:>10.0} rows/s per side ({raw:.2?}); range diff {:.2}× raw",
            rate(raw),
            rate(equal) / rate(raw)
        );
        println!(
            "raw limit, the same in two halves at once: {:>7.0} rows/s per side ({raw2:.2?}); range diff {:.2}× raw",
            rate(raw2),
            rate(equal) / rate(raw2)
        );
        println!(
            "raw COUNT(*):                   {:>10.0} rows/s per side ({count:.2?})",
            rate(count)
        );
        println!(
            "peak RSS {:.1} MiB (before the diffs {:.1} MiB); goal ≥ 1000000 rows/s per side",
            peak as f64 / 1024.0,
            before as f64 / 1024.0
        );
    });
}
