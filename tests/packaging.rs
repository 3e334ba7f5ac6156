//! The Dockerfile and the Kubernetes manifests: every manifest parses, has
//! the fields the project relies on, and runs the binary with flags it has.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

fn manifests() -> Vec<(String, Value)> {
    let mut out: Vec<(String, Value)> = std::fs::read_dir(repo("deploy/kubernetes"))
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|p| {
            let v: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap())
                .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p.file_name().unwrap().to_string_lossy().into_owned(), v)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// The long flags `switchyard <role> --help` lists.
fn flags_of(role: &str) -> Vec<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args([role, "--help"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with("--"))
        .map(|w| {
            w.trim_end_matches(',')
                .split('=')
                .next()
                .unwrap()
                .split('<')
                .next()
                .unwrap()
                .to_string()
        })
        .collect()
}

#[test]
fn every_manifest_is_well_formed_and_uses_real_flags() {
    let all = manifests();
    assert!(all.len() >= 6, "deploy/kubernetes/*.json");
    let names: HashMap<(String, String), &Value> = all
        .iter()
        .map(|(_, v)| {
            (
                (
                    v["kind"].as_str().unwrap().to_string(),
                    v["metadata"]["name"].as_str().unwrap().to_string(),
                ),
                v,
            )
        })
        .collect();
    let mut roles_seen = Vec::new();
    for (file, m) in &all {
        assert!(
            m["apiVersion"].is_string() && m["kind"].is_string(),
            "{file}"
        );
        assert!(m["metadata"]["name"].is_string(), "{file}");
        let kind = m["kind"].as_str().unwrap();
        if !matches!(kind, "Deployment" | "StatefulSet") {
            continue;
        }
        let spec = &m["spec"];
        assert!(spec["replicas"].as_u64().is_some_and(|r| r >= 1), "{file}");
        assert_eq!(
            spec["selector"]["matchLabels"], spec["template"]["metadata"]["labels"],
            "{file}: selector"
        );
        let pod = &spec["template"]["spec"];
        let ann = &spec["template"]["metadata"]["annotations"];
        assert_eq!(
            ann["prometheus.io/scrape"], "true",
            "{file}: scrape annotation"
        );
        let scrape_port = ann["prometheus.io/port"].as_str().unwrap().to_string();
        let volumes: Vec<String> = pod["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|v| v["name"].as_str().unwrap().to_string())
            .chain(
                spec["volumeClaimTemplates"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|v| v["metadata"]["name"].as_str().unwrap().to_string()),
            )
            .collect();
        for c in pod["containers"].as_array().unwrap() {
            for vm in c["volumeMounts"].as_array().into_iter().flatten() {
                assert!(
                    volumes.contains(&vm["name"].as_str().unwrap().to_string()),
                    "{file}: volume {}",
                    vm["name"]
                );
            }
            for e in c["env"].as_array().into_iter().flatten() {
                for (k, r) in [("configMapKeyRef", "ConfigMap"), ("secretKeyRef", "Secret")] {
                    if let Some(name) = e["valueFrom"][k]["name"].as_str() {
                        assert!(
                            names.contains_key(&(r.to_string(), name.to_string())),
                            "{file}: {r} {name} is not in deploy/kubernetes"
                        );
                    }
                }
            }
            let Some(args) = c["args"].as_array() else {
                continue;
            };
            if c["image"]
                .as_str()
                .is_none_or(|i| !i.starts_with("switchyard"))
            {
                continue;
            }
            let args: Vec<&str> = args.iter().map(|a| a.as_str().unwrap()).collect();
            let role = args[0];
            roles_seen.push(role.to_string());
            let known = flags_of(role);
            for a in args.iter().filter(|a| a.starts_with("--")) {
                assert!(
                    known.iter().any(|k| k == a),
                    "{file}: `switchyard {role}` has no {a}"
                );
            }
            let admin = args
                .iter()
                .position(|a| *a == "--admin-listen")
                .map(|i| args[i + 1])
                .unwrap_or("");
            let admin_port = admin.rsplit(':').next().unwrap();
            assert_eq!(
                c["readinessProbe"]["httpGet"]["path"], "/readyz",
                "{file}: {role}"
            );
            assert_eq!(
                c["livenessProbe"]["httpGet"]["path"], "/healthz",
                "{file}: {role}"
            );
            assert_eq!(
                c["readinessProbe"]["httpGet"]["port"]
                    .as_u64()
                    .map(|p| p.to_string())
                    .as_deref(),
                Some(admin_port),
                "{file}: {role} probes its admin port"
            );
            assert_eq!(c["securityContext"]["runAsNonRoot"], true, "{file}: {role}");
            assert!(
                c["resources"]["requests"]["memory"].is_string(),
                "{file}: {role} resources"
            );
            if role == "route" {
                let listen = args
                    .iter()
                    .position(|a| *a == "--listen")
                    .map(|i| args[i + 1])
                    .unwrap();
                assert!(
                    listen.starts_with("127.0.0.1:"),
                    "the router listens on loopback only: {listen}"
                );
                assert_eq!(
                    scrape_port, admin_port,
                    "{file}: Prometheus scrapes the router's admin port"
                );
                let mounts: Vec<&str> = c["volumeMounts"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v["name"].as_str().unwrap())
                    .collect();
                assert!(
                    mounts.contains(&"offline"),
                    "the router writes to the shared volume"
                );
                let loader = pod["containers"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|c| c["args"][0] == "load")
                    .expect("the loader beside the router");
                assert!(
                    loader["volumeMounts"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|v| v["name"] == "offline"),
                    "the loader reads the same volume"
                );
            }
        }
    }
    roles_seen.sort();
    assert_eq!(roles_seen, ["compare", "ingest", "load", "route"]);
    // The flags ConfigMap holds valid flag files for every routing flag.
    let flags = &names[&("ConfigMap".to_string(), "switchyard-flags".to_string())]["data"];
    for key in [
        "switchyard-kill-switch",
        "switchyard-kafka-only",
        "switchyard-dual-write",
    ] {
        let f: Value =
            serde_json::from_str(flags[format!("{key}.json")].as_str().unwrap()).unwrap();
        assert_eq!(f["key"], key);
    }
    // The configuration ConfigMap is the embedded one, and it parses.
    let cfg = names[&("ConfigMap".to_string(), "switchyard-config".to_string())]["data"]
        ["switchyard.toml"]
        .as_str()
        .unwrap();
    switchyard::config::PipelineConfig::parse("configmap", cfg)
        .expect("the ConfigMap's configuration");
}

#[test]
fn the_dockerfile_builds_small_and_runs_as_a_user() {
    let d = std::fs::read_to_string(repo("Dockerfile")).unwrap();
    let froms: Vec<&str> = d.lines().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(froms.len(), 2, "multi-stage: {froms:?}");
    assert!(froms[0].contains(" AS build"), "{froms:?}");
    assert!(
        froms[1].contains("slim"),
        "a small runtime image: {}",
        froms[1]
    );
    assert!(
        d.contains("cargo build --release --locked"),
        "built from the lock file"
    );
    assert!(
        d.contains("COPY --from=build /src/target/release/switchyard /usr/local/bin/switchyard")
    );
    assert!(
        d.contains("COPY config/switchyard.toml") && d.contains("COPY flags "),
        "default schema and flags"
    );
    let user = d.lines().find(|l| l.starts_with("USER ")).expect("USER");
    assert!(!user.contains("root") && user.contains("10001"), "{user}");
    assert!(
        d.contains("HEALTHCHECK") && d.contains("/healthz"),
        "a health check on the admin port"
    );
    assert!(d.contains("ENTRYPOINT [\"/usr/local/bin/switchyard\"]"));
    // Every path the build copies exists.
    for l in d
        .lines()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
    {
        let parts: Vec<&str> = l.split_whitespace().collect();
        for src in &parts[1..parts.len() - 1] {
            assert!(repo(src).exists(), "COPY {src}: not in the repository");
        }
    }
}
