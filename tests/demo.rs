//! `switchyard demo` end to end: every role in one process on SQLite and the
//! in-process mock cluster, a walk through the rollout, exit 0 with parity ok
//! and every accepted payload in its databases. By default the demo shows
//! only its own view; the roles' logs go to a file the summary names.

mod common;

use std::path::PathBuf;
use std::process::{Command, Output};

use common::*;

/// Runs the demo with `args`, `RUST_LOG` as given (unset if `None`).
fn demo(args: &[&str], rust_log: Option<&str>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_switchyard"));
    cmd.arg("demo").args(args);
    match rust_log {
        Some(v) => cmd.env("RUST_LOG", v),
        None => cmd.env_remove("RUST_LOG"),
    };
    cmd.output().expect("run the demo")
}

/// No log line, no escape sequence: only the demo's own view.
fn assert_quiet(what: &str, text: &str) {
    for needle in [
        " INFO ",
        " WARN ",
        " ERROR ",
        " DEBUG ",
        "switchyard::",
        "\x1b[",
    ] {
        assert!(
            !text.contains(needle),
            "{needle:?} on {what} (log lines belong in the log file):\n{text}"
        );
    }
}

/// The log file the summary names: it exists, holds the roles' log lines
/// in plain text; it is removed once read.
fn assert_log_file(stdout: &str, roles: &[&str]) {
    let path = stdout
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("logs: "))
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("no \"logs: \" line:\n{stdout}"));
    let log = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("the log file {}: {e}", path.display()));
    let _ = std::fs::remove_file(&path);
    assert!(log.contains(" INFO "), "{log}");
    for role in roles {
        assert!(
            log.contains(&format!("switchyard::{role}")),
            "no log line from {role}:\n{log}"
        );
    }
    assert!(!log.contains('\x1b'), "escape sequences in the log:\n{log}");
    // The work folder itself is gone (no --keep).
    let work = path.with_extension("");
    assert!(!work.exists(), "{} is still there", work.display());
}

#[test]
fn the_demo_walks_the_rollout_and_ends_with_parity_ok() {
    let out = demo(&["--phase-secs", "2", "--rate", "200"], None);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
    assert_quiet("stdout", &stdout);
    assert!(stderr.trim().is_empty(), "stderr is not empty:\n{stderr}");
    for step in [
        "legacy only",
        "10% dual-write",
        "50% dual-write",
        "10% Kafka only",
        "kill switch",
    ] {
        assert!(stdout.contains(step), "no step {step:?}:\n{stdout}");
    }
    assert!(stdout.contains("parity: ok"), "{stdout}");
    // The summary's row counts equal what the router accepted.
    let mut counted = 0;
    for line in stdout.lines().filter(|l| l.contains(" rows, expected ")) {
        let nums: Vec<i64> = line
            .split(|c: char| !c.is_ascii_digit())
            .filter(|s| !s.is_empty())
            .filter_map(|s| s.parse().ok())
            .collect();
        let (rows, expected) = (nums[nums.len() - 2], nums[nums.len() - 1]);
        assert_eq!(rows, expected, "{line}");
        assert!(expected > 0, "{line}");
        counted += 1;
    }
    assert_eq!(counted, 2, "{stdout}");
    // With the kill switch on at the end, the last status lines are all legacy.
    let last = stdout
        .lines()
        .skip_while(|l| !l.starts_with("== step 5/5: kill switch"))
        .take_while(|l| !l.trim().is_empty())
        .last()
        .unwrap_or_default();
    assert!(
        last.contains("legacy") && last.contains("dual     0/s") && last.contains("kafka     0/s"),
        "{last}"
    );
    // The table per step ends with the drained pipelines, parity ok.
    let table: Vec<&str> = stdout
        .lines()
        .skip_while(|l| *l != "== per step ==")
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(table.len(), 2 + 5 + 1, "{stdout}");
    assert!(table[6].starts_with("✓ 5 kill switch"), "{stdout}");
    assert!(
        table[7].starts_with("✓ traffic stopped") && table[7].ends_with(" ok"),
        "{stdout}"
    );
    assert_log_file(&stdout, &["route", "load", "ingest", "compare"]);
}

/// The same walk against a real broker (`--kafka-brokers`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_runs_against_a_real_broker() {
    let broker = Broker::start();
    create_topic(&broker.brokers(), "switchyard.demo", 2).await;
    let brokers = broker.brokers();
    let out = tokio::task::spawn_blocking(move || {
        demo(
            &[
                "--phase-secs",
                "1.5",
                "--rate",
                "200",
                "--kafka-brokers",
                &brokers,
            ],
            None,
        )
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert_quiet("stdout", &stdout);
    assert!(stderr.trim().is_empty(), "stderr is not empty:\n{stderr}");
    assert!(
        stdout.contains(&format!("Kafka {}", broker.brokers())),
        "{stdout}"
    );
    assert!(stdout.contains("parity: ok"), "{stdout}");
    assert_log_file(&stdout, &["route", "load", "ingest", "compare"]);
}

/// `--verbose`: the logs on stderr instead of a file, `RUST_LOG` filtering
/// them; stdout keeps the plain view.
#[test]
fn verbose_sends_the_logs_to_stderr_and_rust_log_filters_them() {
    let out = demo(
        &["--phase-secs", "1", "--rate", "100", "--verbose"],
        Some("warn,switchyard::route=info"),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
    assert_quiet("stdout", &stdout);
    assert!(stdout.contains("parity: ok"), "{stdout}");
    assert!(
        !stdout.contains("logs: "),
        "no log file with --verbose:\n{stdout}"
    );
    assert!(stderr.contains("switchyard::route"), "{stderr}");
    let filtered = |l: &&str| {
        l.contains("INFO") && (l.contains("switchyard::load") || l.contains("switchyard::flags"))
    };
    assert!(
        !stderr.lines().any(|l| filtered(&l)),
        "RUST_LOG does not filter:\n{stderr}"
    );
}
