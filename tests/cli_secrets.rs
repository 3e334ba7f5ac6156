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
