//! The local flag folder read as one consistent set, validated where it is
//! read. The router and `switchyard flags` / `switchyard rollout` use the same
//! reading, so what an operator is shown is what every router serves.
//!
//! Rules (each broken one is a problem that names the file and the reason):
//! - a file is a LaunchDarkly flag; one key is defined by one file only;
//! - every variation of the kill switch is a boolean, every variation of a
//!   percentage flag a number from 0 to 100 in steps of 0.01 (the routing
//!   resolution: a finer value would be stored and shown but route nobody);
//! - every variation index (fallthrough, off variation, targets, rules,
//!   rollouts) exists;
//! - the Kafka-only percentage served is never above the dual-write one.
//!
//! A flag with a problem keeps its last good value. With none, the kill
//! switch fails closed (killed: every account legacy) and a percentage is 0.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::FlagKeys;

/// A flag file, or the folder, that could not be used.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
#[error("{path}: {reason}")]
pub struct FlagFileError {
    pub path: String,
    pub reason: String,
    /// The flag keys the problem is about (none: the whole folder).
    pub keys: Vec<String>,
}

/// Which routing flag a key is, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    KillSwitch,
    Percent,
    /// A LaunchDarkly migration flag: string stages.
    Migration,
    Other,
}

/// The stages of a LaunchDarkly migration flag.
pub const STAGES: [&str; 6] = ["off", "dualwrite", "shadow", "live", "rampdown", "complete"];

pub fn kind(key: &str, keys: &FlagKeys) -> Kind {
    if key == keys.kill_switch {
        Kind::KillSwitch
    } else if key == keys.kafka_only || key == keys.dual_write {
        Kind::Percent
    } else if keys.migration.as_deref() == Some(key) {
        Kind::Migration
    } else {
        Kind::Other
    }
}

/// Percentages route in 0.01 steps.
pub fn on_resolution(pct: f64) -> bool {
    let scaled = pct * 100.0;
    (scaled - scaled.round()).abs() < 1e-6
}

/// Checks one percentage value: a number from 0 to 100 at 0.01 resolution.
pub fn check_percent(v: &Value) -> Result<f64, String> {
    let Some(p) = v.as_f64() else {
        return Err(format!("{v} is not a number (a percentage from 0 to 100)"));
    };
    if !(p.is_finite() && (0.0..=100.0).contains(&p)) {
        return Err(format!("{p} is not a percentage from 0 to 100"));
    }
    if !on_resolution(p) {
        return Err(format!(
            "{p} is finer than the routing resolution of 0.01 %: it would route nobody"
        ));
    }
    Ok(p)
}

/// Validates one flag's JSON beyond its shape: variation types and every
/// index that points at a variation.
pub fn check_flag(kind: Kind, flag: &Value) -> Result<(), String> {
    let variations = flag["variations"]
        .as_array()
        .ok_or("no \"variations\" list")?;
    for (i, v) in variations.iter().enumerate() {
        match kind {
            Kind::KillSwitch if !v.is_boolean() => {
                return Err(format!(
                    "variation {i} is {v}: the kill switch serves true or false"
                ))
            }
            Kind::Percent => check_percent(v).map_err(|e| format!("variation {i}: {e}"))?,
            Kind::Migration if !v.as_str().is_some_and(|s| STAGES.contains(&s)) => {
                return Err(format!(
                    "variation {i} is {v}: a migration flag serves one of {}",
                    STAGES.join(", ")
                ))
            }
            _ => 0.0,
        };
    }
    let n = variations.len();
    let check = |what: &str, idx: &Value| -> Result<(), String> {
        match idx {
            Value::Null => Ok(()),
            v => match v.as_u64() {
                Some(i) if (i as usize) < n => Ok(()),
                _ => Err(format!(
                    "{what} points at variation {v}, and there are {n} variation(s)"
                )),
            },
        }
    };
    let serve = |what: &str, vr: &Value| -> Result<(), String> {
        check(what, &vr["variation"])?;
        if let Some(rs) = vr["rollout"]["variations"].as_array() {
            for r in rs {
                check(&format!("{what} rollout"), &r["variation"])?;
            }
        }
        Ok(())
    };
    serve("fallthrough", &flag["fallthrough"])?;
    check("offVariation", &flag["offVariation"])?;
    for list in ["targets", "contextTargets"] {
        for t in flag[list].as_array().into_iter().flatten() {
            check(list, &t["variation"])?;
        }
    }
    for (i, r) in flag["rules"].as_array().into_iter().flatten().enumerate() {
        serve(&format!("rule {i}"), r)?;
    }
    if kind != Kind::Other && flag["on"].as_bool() == Some(false) && flag["offVariation"].is_null()
    {
        return Err("off with no offVariation: it would serve nothing".into());
    }
    Ok(())
}

/// Parses and validates one flag file: its key and its JSON.
pub fn parse_flag(bytes: &[u8], keys: &FlagKeys) -> Result<(String, Value), String> {
    let value: Value =
        serde_json::from_slice(bytes).map_err(|e| format!("not a LaunchDarkly flag: {e}"))?;
    let flag: launchdarkly_server_sdk::Flag = serde_json::from_value(value.clone())
        .map_err(|e| format!("not a LaunchDarkly flag: {e}"))?;
    check_flag(kind(&flag.key, keys), &value)?;
    Ok((flag.key, value))
}

/// The variation indexes an untargeted account can be served.
fn served_indexes(flag: &Value) -> Vec<usize> {
    let on = flag["on"].as_bool().unwrap_or(false);
    if !on {
        return flag["offVariation"]
            .as_u64()
            .map(|i| vec![i as usize])
            .unwrap_or_default();
    }
    let fall = &flag["fallthrough"];
    if let Some(i) = fall["variation"].as_u64() {
        return vec![i as usize];
    }
    fall["rollout"]["variations"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["weight"].as_u64() != Some(0))
        .filter_map(|r| r["variation"].as_u64().map(|i| i as usize))
        .collect()
}

/// The lowest and highest percentage an untargeted account is served.
pub fn served_percent(flag: &Value) -> Option<(f64, f64)> {
    let vals: Vec<f64> = served_indexes(flag)
        .into_iter()
        .filter_map(|i| flag["variations"].get(i).and_then(Value::as_f64))
        .collect();
    let lo = vals.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = vals.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (!vals.is_empty()).then_some((lo, hi))
}

/// Whether the kill switch is on for an untargeted account.
pub fn served_kill(flag: &Value) -> Option<bool> {
    let idx = served_indexes(flag);
    if idx.is_empty() {
        return None;
    }
    Some(
        idx.iter()
            .any(|i| flag["variations"].get(*i).and_then(Value::as_bool) == Some(true)),
    )
}

/// A kill switch that is on for everyone (off, serving `true`): what a router
/// with no readable kill-switch file and no last good value uses.
pub fn killed_flag(key: &str) -> Value {
    json!({
        "key": key, "version": 0, "on": false, "targets": [], "contextTargets": [],
        "rules": [], "prerequisites": [], "fallthrough": {"variation": 0},
        "offVariation": 0, "variations": [true], "salt": key,
    })
}

/// One reading of the folder's files.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Files {
    /// Path → bytes, for every `*.json` file read.
    pub bytes: BTreeMap<PathBuf, Vec<u8>>,
    /// The folder could not be listed.
    pub listing_error: Option<FlagFileError>,
}

/// Reads every `*.json` file of the folder (a missing folder reads as empty).
pub fn read_files(dir: &Path) -> Files {
    let mut out = Files::default();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e
            .filter_map(Result::ok)
            .map(|e| e.path())
            .collect::<Vec<_>>(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => {
            out.listing_error = Some(FlagFileError {
                path: dir.display().to_string(),
                reason: format!("cannot list the folder: {e}"),
                keys: Vec::new(),
            });
            return out;
        }
    };
    for path in entries {
        let hidden = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_none_or(|n| n.starts_with('.'));
        if hidden || path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        match std::fs::read(&path) {
            Ok(b) => {
                out.bytes.insert(path, b);
            }
            // Renamed away between listing and reading: the next poll sees it.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                out.bytes.insert(path.clone(), Vec::new());
                tracing::debug!(file = %path.display(), error = %e, "flag file unreadable");
            }
        }
    }
    out
}

/// Where a routing flag's value comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Origin {
    /// Its file, as it is now.
    File,
    /// Its file is missing or broken: the last good value (in memory, or
    /// persisted by a previous run).
    LastGood,
    /// Nothing usable and no last good value: the safe default (killed, 0 %).
    SafeDefault,
}

/// The folder resolved into the flags to serve.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    /// Key → flag JSON: what is served.
    pub flags: BTreeMap<String, Value>,
    /// Every problem; empty means every file is good.
    pub problems: Vec<FlagFileError>,
    /// Routing flag key → where its value comes from.
    pub origins: BTreeMap<String, Origin>,
}

/// Resolves a reading against the last good flags: the pure heart of the
/// local source, shared by the router and the command line.
pub fn resolve(
    dir: &Path,
    files: &Files,
    keys: &FlagKeys,
    last_good: &BTreeMap<String, Value>,
) -> Resolved {
    let mut problems: Vec<FlagFileError> = files.listing_error.iter().cloned().collect();
    let mut defined: BTreeMap<String, Vec<(&PathBuf, Value)>> = BTreeMap::new();
    let mut broken: BTreeSet<String> = BTreeSet::new();
    for (path, bytes) in &files.bytes {
        match parse_flag(bytes, keys) {
            Ok((key, v)) => defined.entry(key).or_default().push((path, v)),
            Err(reason) => {
                // The key of a broken file: from the name `<key>.json`, the
                // way `switchyard flags set` writes it.
                let stem = path
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .map(str::to_string);
                broken.extend(stem.clone());
                problems.push(FlagFileError {
                    path: path.display().to_string(),
                    reason,
                    keys: stem.into_iter().collect(),
                });
            }
        }
    }
    let mut flags = BTreeMap::new();
    for (key, defs) in defined {
        if defs.len() > 1 {
            let paths: Vec<String> = defs.iter().map(|(p, _)| p.display().to_string()).collect();
            problems.push(FlagFileError {
                path: dir.display().to_string(),
                reason: format!("flag key {key:?} is defined by {}", paths.join(" and ")),
                keys: vec![key.clone()],
            });
            broken.insert(key);
            continue;
        }
        if let Some((_, v)) = defs.into_iter().next() {
            flags.insert(key, v);
        }
    }
    settle(
        &dir.display().to_string(),
        |key| dir.join(format!("{key}.json")).display().to_string(),
        flags,
        broken,
        problems,
        files.listing_error.is_some(),
        keys,
        last_good,
    )
}

/// The second half of a reading, shared by every source: `flags` are the
/// good definitions, `broken` the keys whose definition has a problem. Fills
/// in last good values, fails the kill switch closed, and keeps Kafka-only
/// under dual-write. `unlisted` means the set could not be read at all (no
/// flag counts as missing then). `place` names where a key would be defined.
#[allow(clippy::too_many_arguments)]
pub fn settle(
    source: &str,
    place: impl Fn(&str) -> String,
    mut flags: BTreeMap<String, Value>,
    broken: BTreeSet<String>,
    mut problems: Vec<FlagFileError>,
    unlisted: bool,
    keys: &FlagKeys,
    last_good: &BTreeMap<String, Value>,
) -> Resolved {
    let dir_display = source.to_string();
    for key in &broken {
        flags.remove(key);
    }
    let mut origins = BTreeMap::new();
    let mut routing = vec![&keys.kill_switch, &keys.kafka_only, &keys.dual_write];
    routing.extend(keys.migration.as_ref());
    for key in routing {
        if flags.contains_key(key.as_str()) {
            origins.insert(key.clone(), Origin::File);
            continue;
        }
        if !broken.contains(key.as_str()) && !unlisted {
            // No file defines it. A flag that had a value was deleted: keep
            // the last good value, and say so.
            if last_good.contains_key(key.as_str()) || *key == keys.kill_switch {
                problems.push(FlagFileError {
                    path: place(key),
                    reason: if *key == keys.kill_switch && !last_good.contains_key(key.as_str()) {
                        "no kill-switch file: failing closed, every account routes legacy (run `switchyard flags unkill` to create it)".into()
                    } else {
                        "the file is missing: its last good value stays".into()
                    },
                    keys: vec![key.clone()],
                });
            }
        }
        match last_good.get(key.as_str()) {
            Some(v) => {
                flags.insert(key.clone(), v.clone());
                origins.insert(key.clone(), Origin::LastGood);
            }
            None => {
                if *key == keys.kill_switch {
                    flags.insert(key.clone(), killed_flag(key));
                }
                origins.insert(key.clone(), Origin::SafeDefault);
            }
        }
    }
    // Kafka-only above dual-write would send accounts straight from legacy to
    // Kafka only. Keep the last good value of whichever changed.
    let pct = |flags: &BTreeMap<String, Value>, k: &str| {
        flags.get(k).and_then(served_percent).unwrap_or((0.0, 0.0))
    };
    let (_, kafka_hi) = pct(&flags, &keys.kafka_only);
    let (dual_lo, _) = pct(&flags, &keys.dual_write);
    if kafka_hi > dual_lo {
        problems.push(FlagFileError {
            path: dir_display.clone(),
            reason: format!(
                "kafka-only ({kafka_hi} %) is above dual-write ({dual_lo} %): accounts would skip the dual stage; the last good values stay"
            ),
            keys: vec![keys.kafka_only.clone(), keys.dual_write.clone()],
        });
        for key in [&keys.kafka_only, &keys.dual_write] {
            if origins.get(key.as_str()) != Some(&Origin::File) {
                continue;
            }
            if last_good.get(key.as_str()) == flags.get(key.as_str()) {
                continue;
            }
            match last_good.get(key.as_str()) {
                Some(v) => {
                    flags.insert(key.clone(), v.clone());
                    origins.insert(key.clone(), Origin::LastGood);
                }
                None => {
                    flags.remove(key.as_str());
                    origins.insert(key.clone(), Origin::SafeDefault);
                }
            }
        }
        // Still above (both came from their last good values, or nothing
        // good remains): Kafka-only falls to its safe default; those
        // accounts are dual-written, which loses nothing.
        if pct(&flags, &keys.kafka_only).1 > pct(&flags, &keys.dual_write).0 {
            flags.remove(keys.kafka_only.as_str());
            origins.insert(keys.kafka_only.clone(), Origin::SafeDefault);
        }
    }
    Resolved {
        flags,
        problems,
        origins,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flag(key: &str, variations: Value) -> Vec<u8> {
        json!({
            "key": key, "version": 1, "on": true, "targets": [], "contextTargets": [],
            "rules": [], "prerequisites": [], "fallthrough": {"variation": 0},
            "offVariation": 0, "variations": variations, "salt": "s",
        })
        .to_string()
        .into_bytes()
    }

    fn files(list: &[(&str, Vec<u8>)]) -> Files {
        Files {
            bytes: list
                .iter()
                .map(|(p, b)| (PathBuf::from(format!("/f/{p}")), b.clone()))
                .collect(),
            listing_error: None,
        }
    }

    fn keys() -> FlagKeys {
        FlagKeys::default()
    }

    fn all_good() -> Vec<(&'static str, Vec<u8>)> {
        vec![
            (
                "switchyard-kill-switch.json",
                flag("switchyard-kill-switch", json!([false])),
            ),
            (
                "switchyard-dual-write.json",
                flag("switchyard-dual-write", json!([30])),
            ),
            (
                "switchyard-kafka-only.json",
                flag("switchyard-kafka-only", json!([10])),
            ),
        ]
    }

    #[test]
    fn values_are_checked_by_type_range_and_resolution() {
        let k = keys();
        for (vars, want) in [
            (json!(["30"]), "not a number"),
            (json!([101]), "from 0 to 100"),
            (json!([0.001]), "resolution"),
            (json!([-1]), "from 0 to 100"),
        ] {
            let e = parse_flag(&flag("switchyard-dual-write", vars.clone()), &k).unwrap_err();
            assert!(e.contains(want), "{vars}: {e}");
        }
        assert!(parse_flag(&flag("switchyard-dual-write", json!([12.34])), &k).is_ok());
        let e = parse_flag(&flag("switchyard-kill-switch", json!(["yes"])), &k).unwrap_err();
        assert!(e.contains("true or false"), "{e}");
        // An index past the variations, in a target.
        let mut f: Value =
            serde_json::from_slice(&flag("switchyard-dual-write", json!([5]))).unwrap();
        f["contextTargets"] = json!([{"contextKind":"account","values":["7"],"variation":3}]);
        let e = parse_flag(f.to_string().as_bytes(), &k).unwrap_err();
        assert!(e.contains("contextTargets points at variation 3"), "{e}");
        // A migration flag serves stages.
        let mut mk = k.clone();
        mk.migration = Some("m".into());
        assert!(parse_flag(&flag("m", json!(["off", "dualwrite"])), &mk).is_ok());
        let e = parse_flag(&flag("m", json!(["off", "sideways"])), &mk).unwrap_err();
        assert!(e.contains("migration flag serves one of"), "{e}");
        // Other flags (prerequisites) are only parsed.
        assert!(parse_flag(&flag("something-else", json!(["x"])), &k).is_ok());
    }

    #[test]
    fn a_broken_file_keeps_its_last_good_value() {
        let k = keys();
        let good = resolve(Path::new("/f"), &files(&all_good()), &k, &BTreeMap::new());
        assert!(good.problems.is_empty(), "{:?}", good.problems);
        let mut list = all_good();
        list[1].1 = b"{ trunc".to_vec();
        let r = resolve(Path::new("/f"), &files(&list), &k, &good.flags);
        assert_eq!(r.problems.len(), 1, "{:?}", r.problems);
        assert_eq!(r.origins["switchyard-dual-write"], Origin::LastGood);
        assert_eq!(
            r.flags["switchyard-dual-write"],
            good.flags["switchyard-dual-write"]
        );
        // With no last good value a percentage is 0.
        let r = resolve(Path::new("/f"), &files(&list), &k, &BTreeMap::new());
        assert!(!r.flags.contains_key("switchyard-dual-write"));
        assert_eq!(r.origins["switchyard-dual-write"], Origin::SafeDefault);
    }

    #[test]
    fn the_kill_switch_fails_closed() {
        let k = keys();
        let mut list = all_good();
        list.remove(0);
        let r = resolve(Path::new("/f"), &files(&list), &k, &BTreeMap::new());
        assert_eq!(served_kill(&r.flags["switchyard-kill-switch"]), Some(true));
        assert!(
            r.problems[0].reason.contains("failing closed"),
            "{:?}",
            r.problems
        );
        // A router that had a good value keeps it, and reports the missing file.
        let good = resolve(Path::new("/f"), &files(&all_good()), &k, &BTreeMap::new());
        let r = resolve(Path::new("/f"), &files(&list), &k, &good.flags);
        assert_eq!(served_kill(&r.flags["switchyard-kill-switch"]), Some(false));
        assert!(r.problems[0].reason.contains("missing"), "{:?}", r.problems);
        // Unreadable with nothing good: killed.
        let mut list = all_good();
        list[0].1 = b"".to_vec();
        let r = resolve(Path::new("/f"), &files(&list), &k, &BTreeMap::new());
        assert_eq!(served_kill(&r.flags["switchyard-kill-switch"]), Some(true));
    }

    #[test]
    fn duplicate_keys_are_an_error() {
        let k = keys();
        let mut list = all_good();
        list.push(("other.json", flag("switchyard-dual-write", json!([60]))));
        let r = resolve(Path::new("/f"), &files(&list), &k, &BTreeMap::new());
        assert!(
            r.problems
                .iter()
                .any(|p| p.reason.contains("is defined by")),
            "{:?}",
            r.problems
        );
        assert!(!r.flags.contains_key("switchyard-dual-write"));
        // kafka-only 10 > dual-write 0 now: kafka-only falls back too.
        assert!(!r.flags.contains_key("switchyard-kafka-only"));
    }

    #[test]
    fn kafka_only_above_dual_write_keeps_the_last_good_values() {
        let k = keys();
        let good = resolve(Path::new("/f"), &files(&all_good()), &k, &BTreeMap::new());
        let mut list = all_good();
        list[2].1 = flag("switchyard-kafka-only", json!([40]));
        let r = resolve(Path::new("/f"), &files(&list), &k, &good.flags);
        assert!(
            r.problems[0].reason.contains("above dual-write"),
            "{:?}",
            r.problems
        );
        assert_eq!(
            served_percent(&r.flags["switchyard-kafka-only"]),
            Some((10.0, 10.0))
        );
        assert_eq!(
            served_percent(&r.flags["switchyard-dual-write"]),
            Some((30.0, 30.0))
        );
    }

    #[test]
    fn a_killed_flag_serves_true_whatever_its_targets() {
        assert_eq!(served_kill(&killed_flag("k")), Some(true));
        let f: launchdarkly_server_sdk::Flag = serde_json::from_value(killed_flag("k")).unwrap();
        assert_eq!(f.key, "k");
    }
}
