//! `switchyard plan` on the seed's own example, as scripts call it, and
//! `plan --measure` against tansu with PostgreSQL and MariaDB.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use rdkafka::consumer::{BaseConsumer, Consumer};
use switchyard::plan::measure;

fn plan(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .arg("plan")
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run switchyard plan");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_seeds_example_as_json_and_as_a_table() {
    let args = [
        "--events-per-second",
        "10000",
        "--payload-bytes",
        "2500",
        "--retention-days",
        "7",
        "--replication",
        "3",
        "--brokers",
        "4",
        "--consumer-throughput",
        "2650",
        "--growth",
        "2",
    ];
    let mut json_args = args.to_vec();
    json_args.push("--json");
    let (code, out, err) = plan(&json_args);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    let s = &v["sizing"];
    let near = |k: &str, want: f64| {
        let got = s[k].as_f64().unwrap();
        assert!((got - want).abs() < 0.05, "{k}: {got} vs about {want}");
    };
    near("input_mib_per_second", 24.0 - 0.16);
    near("topic_tib", 13.75);
    near("disk_per_broker_tib", 10.31);
    assert_eq!(s["consumer_processes"], 8);
    assert_eq!(s["partitions"], 8);

    let (code, out, _) = plan(&args);
    assert_eq!(code, 0);
    assert!(
        out.contains("10.31 TiB (4 brokers)")
            && out.contains("consumer processes                 8"),
        "{out}"
    );
    assert!(
        out.contains("auto.create.topics.enable        false"),
        "{out}"
    );

    let (code, _, err) = plan(&[
        "--events-per-second",
        "0",
        "--payload-bytes",
        "2500",
        "--brokers",
        "4",
        "--consumer-throughput",
        "2650",
    ]);
    assert_eq!(code, 2);
    assert!(
        err.contains("--events-per-second must be a positive number"),
        "{err}"
    );
}

fn topics(brokers: &str) -> Vec<String> {
    let c: BaseConsumer = rdkafka::config::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("metadata client");
    let md = c
        .fetch_metadata(None, Duration::from_secs(10))
        .expect("metadata");
    md.topics().iter().map(|t| t.name().to_string()).collect()
}

/// Runs `plan --measure` on a database and checks what it reports, what it
/// sized from it, and that its topic and table are gone afterwards.
async fn measure_on(db: &TestDb, broker: &Broker) {
    let brokers = broker.brokers();
    let on = [
        "--measure",
        "--kafka-brokers",
        &brokers,
        "--db-url",
        &db.url,
    ];
    let (code, out, err) = plan(
        &[
            &on[..],
            &[
                "--batch-sizes",
                "100,400",
                "--messages",
                "1200",
                "--payload-bytes",
                "800",
                "--events-per-second",
                "10000",
                "--brokers",
                "3",
                "--json",
            ],
        ]
        .concat(),
    );
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("plan: produced 1200 of 1200"), "{err}");
    assert!(err.contains("plan: consuming with batch size 400"), "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    let m = &v["measured"];
    let name = m["topic"].as_str().unwrap().to_string();
    assert!(measure::is_throwaway(&name), "{name}");
    assert_eq!(m["table"], name.as_str());
    assert_eq!(m["produce"]["messages"], 1200);
    let consumed = m["consume"].as_array().unwrap();
    let sizes: Vec<u64> = consumed
        .iter()
        .map(|c| c["batch_size"].as_u64().unwrap())
        .collect();
    assert_eq!(sizes, vec![100, 400]);
    let mut best = 0.0f64;
    for c in consumed {
        assert_eq!(c["messages"], 1200, "every message at every batch size");
        let rate = c["msgs_per_sec"].as_f64().unwrap();
        assert!(rate > 0.0 && rate.is_finite(), "{c}");
        best = best.max(rate);
    }
    assert_eq!(m["best"]["msgs_per_sec"].as_f64().unwrap(), best);
    // The sizing is computed from the best rate measured.
    assert_eq!(v["inputs"]["consumer_throughput"].as_f64().unwrap(), best);
    let processes = (20_000.0 / best).ceil().max(1.0) as u64;
    assert_eq!(v["sizing"]["consumer_processes"], processes);
    // Nothing is left behind.
    assert!(
        db.db.live_columns(&name).await.unwrap().is_empty(),
        "table {name} left"
    );
    assert!(!topics(&brokers).contains(&name), "topic {name} left");
    // The table as a person reads it.
    let (code, out, err) = plan(
        &[
            &on[..],
            &[
                "--batch-sizes",
                "300",
                "--messages",
                "300",
                "--events-per-second",
                "1000",
                "--brokers",
                "3",
            ],
        ]
        .concat(),
    );
    assert_eq!(code, 0, "{err}");
    let line = out
        .lines()
        .find(|l| l.starts_with("300 "))
        .unwrap_or_else(|| panic!("no line for batch size 300 in {out}"));
    assert!(line.ends_with(" msgs/s"), "{line}");
    assert!(out.contains("consumer processes"), "{out}");
}

/// A tansu broker and a fresh database of the default schema.
async fn services(mariadb: bool) -> (Broker, TestDb) {
    let schema = switchyard::config::PipelineConfig::load(None)
        .unwrap()
        .schema()
        .unwrap();
    let broker = Broker::start_persistent();
    let db = if mariadb {
        TestDb::mariadb(&schema).await
    } else {
        TestDb::postgres(&schema).await
    };
    (broker, db)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn measure_against_tansu_and_postgres() {
    let (broker, db) = services(false).await;
    measure_on(&db, &broker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn measure_against_tansu_and_mariadb() {
    let (broker, db) = services(true).await;
    measure_on(&db, &broker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_measurement_refuses_what_it_did_not_create() {
    let cfg = switchyard::config::PipelineConfig::load(None).unwrap();
    let (broker, db) = services(false).await;
    let name = measure::throwaway_name();
    let schema =
        switchyard::schema::Schema::from_config(&[measure::renamed(&cfg.tables[0], &name)])
            .unwrap();
    let table = &schema.tables()[0];
    let brokers = broker.brokers();
    // A topic or table that exists already is refused, even with its name.
    measure::create_topic(&brokers, &[], &name).await.unwrap();
    let e = measure::create_topic(&brokers, &[], &name)
        .await
        .unwrap_err();
    assert!(matches!(e, measure::MeasureError::Refused(_)), "{e}");
    measure::create_table(&db.db, table).await.unwrap();
    let e = measure::create_table(&db.db, table).await.unwrap_err();
    assert!(matches!(e, measure::MeasureError::Refused(_)), "{e}");
    // A name it does not make is never created nor removed.
    let real = &cfg.schema().unwrap().tables()[0].clone();
    let e = measure::create_table(&db.db, real).await.unwrap_err();
    assert!(matches!(e, measure::MeasureError::Refused(_)), "{e}");
    let e = measure::remove_table(&db.db, "raw_item").await.unwrap_err();
    assert!(matches!(e, measure::MeasureError::Refused(_)), "{e}");
    assert!(!db.db.live_columns("raw_item").await.unwrap().is_empty());
    let e = measure::remove_topic(&brokers, &[], "switchyard.items", &[])
        .await
        .unwrap_err();
    assert!(matches!(e, measure::MeasureError::Refused(_)), "{e}");
    // And what it made, it removes.
    measure::remove_table(&db.db, &name).await.unwrap();
    assert!(db.db.live_columns(&name).await.unwrap().is_empty());
    measure::remove_topic(&brokers, &[], &name, &[])
        .await
        .unwrap();
    assert!(!topics(&brokers).contains(&name));
}
