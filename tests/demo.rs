//! `switchyard demo` end to end: every role in one process on SQLite and the
//! in-process mock cluster, a walk through the rollout, exit 0 with parity ok
//! and every accepted payload in its databases.

mod common;

use std::process::Command;

use common::*;

#[test]
fn the_demo_walks_the_rollout_and_ends_with_parity_ok() {
    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["demo", "--phase-secs", "2", "--rate", "200"])
        .env("RUST_LOG", "warn")
        .output()
        .expect("run the demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
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
    for line in stdout.lines().filter(|l| l.contains(" rows, expected ")) {
        let nums: Vec<i64> = line
            .split(|c: char| !c.is_ascii_digit())
            .filter(|s| !s.is_empty())
            .filter_map(|s| s.parse().ok())
            .collect();
        let (rows, expected) = (nums[nums.len() - 2], nums[nums.len() - 1]);
        assert_eq!(rows, expected, "{line}");
        assert!(expected > 0, "{line}");
    }
    // With the kill switch on at the end, the last status lines are all legacy.
    let last = stdout
        .lines()
        .rev()
        .find(|l| l.contains("legacy") && l.contains("/s"))
        .unwrap_or_default();
    assert!(
        last.contains("dual     0/s") && last.contains("kafka     0/s"),
        "{last}"
    );
}

/// The same walk against a real broker (`--kafka-brokers`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_runs_against_a_real_broker() {
    let broker = Broker::start();
    create_topic(&broker.brokers(), "switchyard.demo", 2).await;
    let brokers = broker.brokers();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args([
                "demo",
                "--phase-secs",
                "1.5",
                "--rate",
                "200",
                "--kafka-brokers",
                &brokers,
            ])
            .env("RUST_LOG", "warn")
            .output()
            .expect("run the demo")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!("Kafka {}", broker.brokers())),
        "{stdout}"
    );
    assert!(stdout.contains("parity: ok"), "{stdout}");
}
