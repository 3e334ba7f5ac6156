//! A bad row never wedges the loader, whatever the server's limits: against a
//! MariaDB with a 64 KiB `max_allowed_packet` (a batch is far bigger), one row
//! that breaks a CHECK constraint in a batch of 3,000 is isolated into the
//! dead letter and every other row loads.

mod common;

use std::time::Duration;

use common::scratch::ScratchMariadb;
use common::*;
use serde_json::json;
use switchyard::load::{self, LoadMetrics, LoadOptions};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_violation_in_a_batch_above_max_allowed_packet_is_isolated() {
    let server = ScratchMariadb::start(&["--max-allowed-packet=65536"]);
    let dirs = Dirs::new();
    let cfg = config(&dirs, "unused");
    let schema = cfg.schema().unwrap();
    let old = TestDb::mariadb_on(&server, &schema).await;
    old.exec("ALTER TABLE raw_item ADD CONSTRAINT version_not_negative CHECK (version >= 0)")
        .await;

    const LINES: u64 = 3_000;
    const BAD: u64 = 1_234;
    let mut text = String::new();
    let mut bad_offset = 0;
    for seq in 0..LINES {
        let mut e = envelope(seq % 50, seq, 300);
        if seq == BAD {
            e["row"]["version"] = json!(-1);
            bad_offset = text.len() as u64;
        }
        text.push_str(&offline_line(&e, "legacy", seq + 1));
    }
    assert!(
        text.len() > 10 * 65_536,
        "the batch is far above the packet limit"
    );
    let name = "offline-0000000000000001-000001.ndjson";
    write_closed_file(&dirs.offline, name, &text);

    let registry = prometheus::Registry::new();
    let metrics = LoadMetrics::new(&registry).unwrap();
    let opts = LoadOptions {
        dir: dirs.offline.clone(),
        batch_size: LINES as usize,
        batch_bytes: 8 << 20,
        archive_dir: None,
        loader_id: "test".to_string(),
        poll: Duration::from_millis(50),
        once: true,
        progress: false,
    };
    let summary = tokio::time::timeout(
        Duration::from_secs(120),
        load::run(
            opts,
            &schema,
            &old.db,
            None,
            metrics,
            CancellationToken::new(),
        ),
    )
    .await
    .expect("the loader finished: no batch is retried forever")
    .expect("load");
    assert_eq!(old.count().await, LINES as i64 - 1);
    assert_eq!(summary.dead_letters, 1);
    let dead = dead_lines(&old.db).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].0, (name.to_string(), bad_offset));
    assert!(
        dead[0].1.reason.contains("version_not_negative"),
        "{}",
        dead[0].1.reason
    );
    assert_eq!(
        metric_value(
            &registry,
            "switchyard_load_dead_letters_total",
            &[("reason", "rejected")]
        ),
        1.0
    );
    // Only the packet-size handling made that possible: nothing was retried
    // as if the database were down.
    assert_eq!(
        metric_value(
            &registry,
            "switchyard_load_retries_total",
            &[("reason", "database")]
        ),
        0.0
    );
}

/// Peak RSS (VmHWM, KiB) of `switchyard load --once` over `dir`, sampled
/// until it exits; the loader must succeed.
fn loader_peak_kib(dir: &std::path::Path, db_url: &str, batch_bytes: usize) -> u64 {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args([
            "load",
            "--once",
            "--no-replay",
            "--progress",
            "never",
            "--offline-dir",
            dir.to_str().unwrap(),
            "--db-url",
            db_url,
            "--batch-size",
            "2000",
            "--batch-bytes",
            &batch_bytes.to_string(),
            "--admin-listen",
            &format!("127.0.0.1:{}", free_port()),
        ])
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap();
    let (status, peak) = wait_with_peak(&mut child);
    assert!(status.success(), "load --once failed: {status}");
    peak
}

/// Batches are bounded by bytes as well as by lines: 250 rows of 200 KiB
/// (48 MiB, far below the 2,000-line batch) load in 2 MiB transactions, and
/// the loader's peak memory is a fraction of what one 48 MiB batch takes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_holds_at_most_batch_bytes_of_lines() {
    const ROWS: u64 = 250;
    let dirs = Dirs::new();
    let cfg = config(&dirs, "unused");
    let schema = cfg.schema().unwrap();
    let mut text = String::new();
    for seq in 0..ROWS {
        text.push_str(&offline_line(
            &envelope(seq % 7, seq, 200 << 10),
            "legacy",
            seq + 1,
        ));
    }
    assert!(text.len() > 48 << 20);
    let write = |dir: &std::path::Path| {
        write_closed_file(dir, "offline-0000000000000001-000001.ndjson", &text)
    };
    // The same file, loaded whole in one batch, then in 2 MiB batches.
    let whole = TestDb::mariadb(&schema).await;
    write(&dirs.offline);
    let unbounded = loader_peak_kib(&dirs.offline, &whole.url, usize::MAX);
    assert_eq!(whole.count().await, ROWS as i64);
    let bounded_db = TestDb::mariadb(&schema).await;
    write(&dirs.offline);
    let bounded = loader_peak_kib(&dirs.offline, &bounded_db.url, 2 << 20);
    assert_eq!(bounded_db.count().await, ROWS as i64);
    eprintln!(
        "loader peak RSS over 48 MiB of 200 KiB rows: one batch {} MiB, 2 MiB batches {} MiB",
        unbounded / 1024,
        bounded / 1024
    );
    // One whole batch holds the 48 MiB of lines at least once; 2 MiB
    // batches hold a few MiB at a time.
    assert!(unbounded > 48 << 10, "{unbounded} KiB");
    assert!(
        bounded * 2 < unbounded,
        "bounded {bounded} KiB vs unbounded {unbounded} KiB"
    );
}

/// The issue a byte bound settles: rows up to the schema's 256 KiB limit, far
/// fewer than a 2,000-line batch, used to make one batch of hundreds of MiB.
/// Under the manifests' memory limit for the loader (256 MiB; a memory cgroup
/// when this machine lets one be made, else RLIMIT_AS at 4× for the runtime's
/// mappings), 1,000 rows of 250 KiB (244 MiB of lines) load with the
/// default batch settings, and the loader's peak RSS stays well under the
/// limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_rows_load_under_the_manifests_memory_limit() {
    const ROWS: u64 = 1_000;
    const LIMIT: u64 = 256 << 20;
    let dirs = Dirs::new();
    let cfg = config(&dirs, "unused");
    let schema = cfg.schema().unwrap();
    let old = TestDb::mariadb(&schema).await;
    let mut text = String::with_capacity((ROWS as usize) * (251 << 10));
    for seq in 0..ROWS {
        text.push_str(&offline_line(
            &envelope(seq % 7, seq, 250 << 10),
            "legacy",
            seq + 1,
        ));
    }
    assert!(
        text.len() as u64 > 240 << 20,
        "more than the limit's worth of batch"
    );
    write_closed_file(
        &dirs.offline,
        "offline-0000000000000001-000001.ndjson",
        &text,
    );
    drop(text);
    let cgroup = memory_cgroup("switchyard-load-limits", LIMIT);
    let bin = env!("CARGO_BIN_EXE_switchyard");
    let args = format!(
        "load --once --no-replay --progress never --offline-dir {} --db-url {} --admin-listen 127.0.0.1:{}",
        dirs.offline.display(),
        old.url,
        free_port()
    );
    let script = match &cgroup {
        Some(dir) => format!(
            "echo $$ > {}/cgroup.procs && exec {bin} {args}",
            dir.display()
        ),
        None => format!("exec prlimit --as={} {bin} {args}", LIMIT * 4),
    };
    let mut child = std::process::Command::new("sh")
        .args(["-c", &script])
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap();
    let (status, peak) = wait_with_peak(&mut child);
    if let Some(dir) = &cgroup {
        let _ = std::fs::remove_dir(dir);
    }
    eprintln!(
        "loader over {ROWS} rows of 250 KiB under {} MiB (cgroup: {}): peak RSS {} MiB",
        LIMIT >> 20,
        cgroup.is_some(),
        peak / 1024
    );
    assert!(status.success(), "the loader did not finish: {status}");
    assert_eq!(old.count().await, ROWS as i64);
    assert!(peak * 1024 < LIMIT / 2, "peak {peak} KiB");
}
