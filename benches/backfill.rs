//! The backfill against the raw load paths of the same run: raw_item rows
//! (~300 B) in MariaDB (OLD), backfilled into PostgreSQL (COPY through a
//! staging table, and multi-row INSERTs) and into another MariaDB database,
//! against `COPY … FROM STDIN` of the same rows as CSV into a fresh
//! PostgreSQL table and `LOAD DATA LOCAL INFILE` of them into a fresh
//! MariaDB table (through the `mariadb` client, when it is installed).
//!
//! `cargo bench --bench backfill` (SWITCHYARD_BENCH_ROWS sets the rows,
//! 300,000 by default).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;
use switchyard::backfill::{self, BackfillMetrics, BackfillOptions, ProgressMode};
use switchyard::db::keyset::TimeRange;
use switchyard::db::{row_values, Bound, TableRows};
use switchyard::schema::{Schema, Table};
use tokio_util::sync::CancellationToken;

const BODY: usize = 200;
const GOAL: f64 = 0.7;

fn rows(table: &Table, n: u64) -> Vec<Vec<Bound>> {
    (0..n)
        .map(|i| {
            let e = envelope(i % 300, i, BODY);
            row_values(table, e["row"].as_object().unwrap()).unwrap()
        })
        .collect()
}

/// The rows as CSV (`quote` the text) or tab-separated text, columns in the
/// table's order.
fn text(rows: &[Vec<Bound>], csv: bool) -> String {
    let mut out = String::new();
    for r in rows {
        let fields: Vec<String> = r
            .iter()
            .map(|v| match v {
                Bound::Int(Some(x)) => x.to_string(),
                Bound::Text(Some(s)) if csv => format!("\"{}\"", s.replace('"', "\"\"")),
                Bound::Text(Some(s)) => s.clone(),
                other => panic!("not in raw_item: {other:?}"),
            })
            .collect();
        out.push_str(&fields.join(if csv { "," } else { "\t" }));
        out.push('\n');
    }
    out
}

async fn fill(db: &TestDb, table: &Table, rows: &[Vec<Bound>]) {
    for part in rows.chunks(5_000) {
        let data = TableRows {
            rows: part.to_vec(),
            sources: Vec::new(),
        };
        db.db
            .write_batch(&[(table, &data)], &[], &[], None)
            .await
            .unwrap();
    }
}

/// `COPY … FROM STDIN (FORMAT csv)` of the rows into a fresh table: rows/s.
async fn raw_copy(schema: &Schema, rows: &[Vec<Bound>]) -> f64 {
    use sqlx::Connection;
    let db = TestDb::postgres(schema).await;
    let table = &schema.tables()[0];
    let data = text(rows, true);
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
    assert_eq!(n as usize, rows.len());
    rows.len() as f64 / secs
}

/// `LOAD DATA LOCAL INFILE` of the rows into a fresh MariaDB table through
/// the `mariadb` client: rows/s, or None without the client.
async fn raw_load_data(schema: &Schema, rows: &[Vec<Bound>]) -> Option<f64> {
    let db = TestDb::mariadb(schema).await;
    let table = &schema.tables()[0];
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rows.tsv");
    std::fs::write(&file, text(rows, false)).unwrap();
    let cols: Vec<String> = table
        .columns
        .iter()
        .map(|c| format!("`{}`", c.name))
        .collect();
    let statement = format!(
        "LOAD DATA LOCAL INFILE '{}' INTO TABLE `{}` ({})",
        file.display(),
        table.name,
        cols.join(", ")
    );
    let t = Instant::now();
    let out = std::process::Command::new("mariadb")
        .args([
            "--local-infile=1",
            "-h",
            "127.0.0.1",
            "-P",
            "3306",
            "-u",
            "root",
            &db.name,
            "-e",
            &statement,
        ])
        .output()
        .ok()?;
    let secs = t.elapsed().as_secs_f64();
    if !out.status.success() {
        eprintln!(
            "LOAD DATA LOCAL INFILE: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return None;
    }
    assert_eq!(db.count().await as usize, rows.len());
    Some(rows.len() as f64 / secs)
}

/// Keyset chunks of 5,000 read from OLD and decoded, nothing written: the
/// ceiling OLD sets.
async fn raw_read(schema: &Schema, old: &TestDb, n: u64) -> f64 {
    let table = &schema.tables()[0];
    let t = Instant::now();
    let (mut after, mut total) = (None::<String>, 0u64);
    loop {
        let rows = old
            .db
            .keyset_chunk(table, TimeRange::default(), after.as_deref(), 5_000)
            .await
            .unwrap();
        let Some(last) = rows.last() else { break };
        after = Some(last.key.clone());
        total += rows.len() as u64;
    }
    assert_eq!(total, n);
    n as f64 / t.elapsed().as_secs_f64()
}

/// A backfill of the whole table from `old` into a fresh `new`: rows/s.
async fn backfill_into(schema: &Schema, old: &TestDb, new: &TestDb, copy: bool, n: u64) -> f64 {
    let opts = BackfillOptions {
        table: schema.tables()[0].name.clone(),
        range: TimeRange::default(),
        chunk_rows: 5_000,
        chunk_bytes: 8 << 20,
        max_rows_per_sec: None,
        overwrite: false,
        restart: false,
        max_conflict_keys: 10,
        progress: ProgressMode::Log,
        log_every: Duration::from_secs(3600),
        copy,
    };
    let metrics = BackfillMetrics::new(&prometheus::Registry::new()).unwrap();
    let t = Instant::now();
    let s = backfill::run(
        &opts,
        schema,
        &old.db,
        &new.db,
        metrics,
        CancellationToken::new(),
    )
    .await
    .unwrap();
    let secs = t.elapsed().as_secs_f64();
    assert!(s.done);
    assert_eq!(s.inserted, n);
    assert_eq!(new.count().await as u64, n);
    n as f64 / secs
}

fn main() {
    let n: u64 = std::env::var("SWITCHYARD_BENCH_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let cfg = switchyard::config::PipelineConfig::load(None).unwrap();
        let schema = cfg.schema().unwrap();
        let table = schema.tables()[0].clone();
        let all = rows(&table, n);
        let old = TestDb::mariadb(&schema).await;
        let t = Instant::now();
        fill(&old, &table, &all).await;
        println!(
            "backfill: {n} raw_item rows of ~{} B in MariaDB (filled in {:.1} s)\n",
            BODY + 100,
            t.elapsed().as_secs_f64()
        );
        let copy = raw_copy(&schema, &all).await;
        println!("raw  PostgreSQL COPY FROM STDIN (csv)     {copy:>9.0} rows/s");
        let load = raw_load_data(&schema, &all).await;
        match load {
            Some(l) => println!("raw  MariaDB LOAD DATA LOCAL INFILE       {l:>9.0} rows/s"),
            None => println!("raw  MariaDB LOAD DATA LOCAL INFILE       (not available)"),
        }
        drop(all);
        let read = raw_read(&schema, &old, n).await;
        println!("raw  MariaDB keyset read, 5000 a chunk     {read:>9.0} rows/s");
        println!();
        println!("| backfill MariaDB → | rows/s | vs raw | goal {GOAL}× |");
        println!("|---|---|---|---|");
        for (name, copy_path) in [
            ("PostgreSQL, COPY", true),
            ("PostgreSQL, multi-row INSERT", false),
        ] {
            let new = TestDb::postgres(&schema).await;
            let r = backfill_into(&schema, &old, &new, copy_path, n).await;
            let ratio = r / copy;
            println!(
                "| {name} | {r:.0} | {ratio:.2}× COPY | {} |",
                if ratio >= GOAL { "met" } else { "short" }
            );
        }
        let new = TestDb::mariadb(&schema).await;
        let r = backfill_into(&schema, &old, &new, false, n).await;
        match load {
            Some(l) => println!(
                "| MariaDB, multi-row INSERT | {r:.0} | {:.2}× LOAD DATA | {} |",
                r / l,
                if r / l >= GOAL { "met" } else { "short" }
            ),
            None => println!("| MariaDB, multi-row INSERT | {r:.0} | – | – |"),
        }
    });
}
