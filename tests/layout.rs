//! The shape of the source tree: each role keeps its story in its own folder,
//! shared modules import nothing role-specific, and no two top-level modules
//! import each other, directly or through others.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Roles: a subcommand's folder (arguments, start-up, metrics, logic).
const ROLES: &[&str] = &[
    "route", "load", "ingest", "compare", "backfill", "rollout", "demo", "plan", "health",
];

/// Shared modules: what roles are built from.
const SHARED: &[&str] = &[
    "admin", "cli", "config", "db", "flags", "kafka", "logging", "metrics", "offline", "rawjson",
    "routing", "schema", "shutdown",
];

fn rs_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            rs_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Top-level module → the top-level modules its code names through `crate::`.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rs_files(&src, &mut files);
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(&src).unwrap();
        let top = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        if top == "main" || top == "lib" {
            continue;
        }
        let text = std::fs::read_to_string(&f).unwrap();
        let deps = g.entry(top.clone()).or_default();
        for (i, _) in text.match_indices("crate::") {
            let name: String = text[i + 7..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() && name != top {
                deps.insert(name);
            }
        }
        // `use crate::{a, b}` groups.
        for (i, _) in text.match_indices("crate::{") {
            let end = text[i..].find('}').map(|e| i + e).unwrap_or(text.len());
            for part in text[i + 8..end].split(',') {
                let name: String = part
                    .trim()
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() && name != top {
                    deps.insert(name);
                }
            }
        }
    }
    g
}

#[test]
fn every_module_is_a_role_or_shared() {
    for m in graph().keys() {
        assert!(
            ROLES.contains(&m.as_str()) || SHARED.contains(&m.as_str()),
            "src/{m}: declare it a role or a shared module here"
        );
    }
}

#[test]
fn shared_modules_import_no_role() {
    for (m, deps) in graph() {
        if SHARED.contains(&m.as_str()) {
            for d in &deps {
                assert!(
                    !ROLES.contains(&d.as_str()),
                    "shared module {m} imports role {d}"
                );
            }
        }
    }
}

#[test]
fn no_import_cycle() {
    let g = graph();
    // Depth-first search with colours; report the cycle's path.
    fn visit(
        n: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        path: &mut Vec<String>,
    ) {
        match state.get(n) {
            Some(2) => return,
            Some(1) => {
                let start = path.iter().position(|p| p == n).unwrap();
                panic!("import cycle: {} → {n}", path[start..].join(" → "));
            }
            _ => {}
        }
        state.insert(n.to_string(), 1);
        path.push(n.to_string());
        for d in g.get(n).into_iter().flatten() {
            visit(d, g, state, path);
        }
        path.pop();
        state.insert(n.to_string(), 2);
    }
    let mut state = BTreeMap::new();
    for n in g.keys() {
        visit(n, &g, &mut state, &mut Vec::new());
    }
}

#[test]
fn main_only_dispatches() {
    let main =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/main.rs")).unwrap();
    let lines = main.lines().count();
    assert!(
        lines <= 150,
        "src/main.rs has {lines} lines: a role's start-up belongs in its folder"
    );
    for role in ROLES {
        assert!(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join(format!("src/{role}/cli.rs"))
                .exists(),
            "src/{role}/cli.rs: the role's arguments and start-up"
        );
    }
}
