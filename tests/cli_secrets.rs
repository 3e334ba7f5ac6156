//! No secret reaches `--help`: with every secret-bearing environment
//! variable set, the help of every role and subcommand shows none of them.

use std::process::Command;

const SECRETS: &[(&str, &str)] = &[
    ("SWITCHYARD_KAFKA_CONFIG", "sasl.password=kafka-s3cret-1"),
    ("SWITCHYARD_DB_URL", "postgres://u:db-s3cret-2@h/d"),
    ("SWITCHYARD_DB_PASSWORD", "db-s3cret-3"),
    ("SWITCHYARD_OLD_DB_URL", "mysql://u:old-s3cret-4@h/d"),
    ("SWITCHYARD_NEW_DB_URL", "postgres://u:new-s3cret-5@h/d"),
    ("LD_SDK_KEY", "sdk-s3cret-6"),
    ("LD_API_TOKEN", "api-s3cret-7"),
];

#[test]
fn help_never_shows_a_secret() {
    let commands: &[&[&str]] = &[
        &[],
        &["route"],
        &["load"],
        &["ingest"],
        &["compare"],
        &["flags"],
        &["flags", "set"],
        &["rollout"],
        &["rollout", "run"],
        &["demo"],
        &["plan"],
        &["health"],
        &["db", "init"],
    ];
    for args in commands {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_switchyard"));
        cmd.args(*args).arg("--help");
        for (k, v) in SECRETS {
            cmd.env(k, v);
        }
        let out = cmd.output().expect("run switchyard --help");
        assert!(out.status.success(), "{args:?} --help failed");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("Usage"), "{args:?}: {text}");
        for (k, v) in SECRETS {
            let secret = v.rsplit([':', '=']).next().unwrap_or(v);
            let secret = secret.split('@').next().unwrap_or(secret);
            assert!(
                !text.contains(secret),
                "switchyard {args:?} --help shows {k}'s value:\n{text}"
            );
        }
    }
}

/// A secret with commas in it stays one property, and a mistyped secret
/// property is refused by name (exit 2) without its value: rdkafka's own
/// message would end with it.
#[test]
fn kafka_properties_keep_their_secrets_out_of_errors() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}/x.db", dir.path().display());
    let init = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["db", "init", "--db-url", &format!("{db}?mode=rwc")])
        .output()
        .unwrap();
    assert!(init.status.success(), "{init:?}");
    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args([
            "ingest",
            "--kafka-brokers",
            "127.0.0.1:1",
            "--kafka-config",
            "sasl.password=Sup3r,s3cr=etTail",
            "--kafka-config",
            "sasl.pasword=Typo-s3cret",
            "--db-url",
            &db,
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .env("RUST_LOG", "debug")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(
        text.contains("sasl.pasword"),
        "the property is named: {text}"
    );
    for secret in ["Sup3r", "etTail", "Typo-s3cret"] {
        assert!(!text.contains(secret), "{secret} shown:\n{text}");
    }
}

/// Every line a role logs (at debug, the most it says) and every error it
/// ends with, over runs that carry planted secrets where operators put them
/// — passwords in database URLs (userinfo and `?password=`), Kafka
/// properties, the LaunchDarkly API token — never shows one.
#[test]
fn no_planted_secret_reaches_a_log_line_or_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let offline = dir.path().to_str().unwrap().to_string();
    let admin = || "127.0.0.1:0".to_string();
    const PG_PASSWORD: &str = "Pl4nted-pg-S3cret";
    const MY_PASSWORD: &str = "Pl4nted-my-S3cret";
    const QUERY_PASSWORD: &str = "Pl4nted-query-S3cret";
    const KAFKA_PASSWORD: &str = "Pl4nted-kafka-S3cret";
    const LD_TOKEN: &str = "api-Pl4nted-ld-S3cret";
    let pg = format!("postgres://postgres:{PG_PASSWORD}@127.0.0.1:5432/test");
    let my = format!("mysql://root:{MY_PASSWORD}@127.0.0.1:3306/test");
    let pg_query =
        format!("postgres://postgres@127.0.0.1:5432/no_such_db?password={QUERY_PASSWORD}");
    let kafka = format!("sasl.password={KAFKA_PASSWORD},with=comma");
    let load = |db: &str| -> Vec<String> {
        [
            "load",
            "--once",
            "--no-replay",
            "--offline-dir",
            &offline,
            "--db-url",
            db,
            "--admin-listen",
            "127.0.0.1:0",
        ]
        .map(String::from)
        .to_vec()
    };
    // (what, arguments, environment, expected exit code)
    type Run<'a> = (&'a str, Vec<String>, Vec<(&'a str, &'a str)>, i32);
    let runs: Vec<Run> = vec![
        (
            "db init over PostgreSQL (trust: connects)",
            vec!["db".into(), "init".into(), "--db-url".into(), pg.clone()],
            vec![],
            0,
        ),
        ("load refused by MariaDB", load(&my), vec![], 2),
        (
            "load, password in the query, database missing",
            load(&pg_query),
            vec![],
            2,
        ),
        (
            "compare --once refused by MariaDB",
            vec![
                "compare".into(),
                "--once".into(),
                "--kafka-brokers".into(),
                "127.0.0.1:1".into(),
                "--kafka-topic".into(),
                "t".into(),
                "--old-db-url".into(),
                my.clone(),
                "--new-db-url".into(),
                pg.clone(),
                "--kafka-config".into(),
                kafka.clone(),
                "--admin-listen".into(),
                admin(),
            ],
            vec![],
            2,
        ),
        (
            "flags status with LaunchDarkly unreachable",
            vec!["flags".into(), "status".into()],
            vec![
                ("LD_API_TOKEN", LD_TOKEN),
                ("LD_API_URI", "http://127.0.0.1:1"),
            ],
            1,
        ),
        (
            "flags set with LaunchDarkly unreachable",
            vec![
                "flags".into(),
                "set".into(),
                "dual-write".into(),
                "10".into(),
            ],
            vec![
                ("LD_API_TOKEN", LD_TOKEN),
                ("LD_API_URI", "http://127.0.0.1:1"),
            ],
            1,
        ),
    ];
    for (what, args, env, code) in runs {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_switchyard"));
        cmd.args(&args)
            .env("RUST_LOG", "debug")
            .env("NO_COLOR", "1");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.status.code(), Some(code), "{what}:\n{text}");
        for secret in [
            PG_PASSWORD,
            MY_PASSWORD,
            QUERY_PASSWORD,
            KAFKA_PASSWORD,
            LD_TOKEN,
        ] {
            assert!(!text.contains(secret), "{what} shows {secret}:\n{text}");
        }
    }
}
