//! `switchyard plan` on the seed's own example, as scripts call it.

use std::process::Command;

fn plan(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .arg("plan")
        .args(args)
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
