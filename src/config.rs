//! The pipeline configuration: a TOML file (tables, topic, batching, rotation).
//! Endpoints and secrets come from CLI flags and the environment instead.
//! Unknown keys are errors, and everything is validated before anything binds.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::offline::FsyncPolicy;
use crate::schema::{Schema, SchemaError, TableConfig};

/// The configuration compiled into the binary (`config/switchyard.toml`).
pub const EMBEDDED: &str = include_str!("../config/switchyard.toml");

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    pub route: RouteSettings,
    pub offline: OfflineSettings,
    pub kafka: KafkaSettings,
    pub flags: FlagSettings,
    pub tables: Vec<TableConfig>,
}

/// `[route]`: the sidecar's request handling.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSettings {
    /// Salt of the account bucket hash. Changing it reshuffles every account.
    pub salt: String,
    /// Largest request body after decompression (413 beyond).
    pub max_body_bytes: usize,
    /// Requests processed at once (503 + Retry-After beyond).
    pub max_inflight_requests: usize,
    /// Memory that request bodies and what is parsed from them may hold at
    /// once: each body byte takes `BYTES_PER_BODY_BYTE` of it, before
    /// it is buffered (503 + Retry-After beyond).
    pub max_inflight_bytes: usize,
    /// Connections served at once; beyond, a new connection waits (as many
    /// as are served) for `admission_wait_ms`, then gets 503.
    #[serde(default = "defaults::max_connections")]
    pub max_connections: usize,
    /// How long a request waits for a request slot or memory (and a new
    /// connection for a connection slot) before 503 + Retry-After.
    #[serde(default = "defaults::admission_wait_ms")]
    pub admission_wait_ms: u64,
    /// Time allowed for a request's headers to arrive, counted from the
    /// connection's opening or from the previous response (so it also closes
    /// idle keep-alive connections).
    #[serde(default = "defaults::header_read_timeout_ms")]
    pub header_read_timeout_ms: u64,
    /// Time allowed for a whole request body to arrive once its headers
    /// have (408 and the connection closed beyond).
    #[serde(default = "defaults::body_read_timeout_ms")]
    pub body_read_timeout_ms: u64,
    /// The slowest a body may arrive once `body_rate_grace_ms` have passed
    /// since its headers (408 below; 0: no minimum). A connection below it
    /// is also the first closed when a new one finds every slot taken.
    #[serde(default = "defaults::min_body_rate_bytes_per_sec")]
    pub min_body_rate_bytes_per_sec: u64,
    #[serde(default = "defaults::body_rate_grace_ms")]
    pub body_rate_grace_ms: u64,
    /// Bodies parsed at once (parsing is where memory multiplies).
    #[serde(default = "defaults::parse_concurrency")]
    pub parse_concurrency: usize,
    /// Retry-After seconds on 503.
    pub retry_after_secs: u64,
    /// Time allowed to drain on SIGTERM before giving up.
    pub grace_secs: u64,
    /// What happens to a Kafka-only payload the broker did not acknowledge:
    /// `offline` (kept in the offline file, counted) or `reject` (503).
    pub kafka_fallback: KafkaFallback,
}

/// What the router admits per body byte it buffers: the body itself plus
/// what parsing and both sinks make of it (payload copies, the offline line,
/// the producer's copy), measured with the default schema (README, "Memory
/// bound").
pub const BYTES_PER_BODY_BYTE: usize = 8;

/// The admission one body of `body_bytes` takes (one byte more than the
/// limit tells "exactly the limit" from "too large").
pub fn admitted_bytes(body_bytes: usize) -> usize {
    body_bytes
        .saturating_add(1)
        .saturating_mul(BYTES_PER_BODY_BYTE)
}

/// The longest `offline.max_file_age_secs`: a year.
pub const MAX_FILE_AGE_SECS: u64 = 365 * 24 * 3600;

/// Defaults of `[route]` keys a configuration may leave out.
mod defaults {
    pub fn max_connections() -> usize {
        256
    }
    pub fn admission_wait_ms() -> u64 {
        1000
    }
    pub fn header_read_timeout_ms() -> u64 {
        10_000
    }
    pub fn body_read_timeout_ms() -> u64 {
        30_000
    }
    pub fn min_body_rate_bytes_per_sec() -> u64 {
        4096
    }
    pub fn body_rate_grace_ms() -> u64 {
        2000
    }
    pub fn parse_concurrency() -> usize {
        2
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KafkaFallback {
    Offline,
    Reject,
}

/// `[offline]`: the offline files.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OfflineSettings {
    pub dir: PathBuf,
    pub prefix: String,
    pub max_file_bytes: u64,
    pub max_file_age_secs: u64,
    pub fsync: FsyncPolicy,
    pub group_commit_ms: u64,
    pub queue_depth: usize,
}

/// `[kafka]`: topic and producer tuning. Brokers and secrets are CLI/env.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSettings {
    pub topic: String,
    /// none, gzip, snappy, lz4, zstd.
    pub compression: String,
    pub linger_ms: u64,
    /// librdkafka `message.timeout.ms`: how long a payload may wait for an ack.
    pub delivery_timeout_ms: u64,
    /// After a failed delivery, skip Kafka for this long (fallback at once).
    pub breaker_cooldown_ms: u64,
    pub topic_check_timeout_ms: u64,
    /// Extra librdkafka properties (non-secret; secrets via --kafka-config / env).
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

/// `[flags]`: the local flag folder.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlagSettings {
    pub dir: PathBuf,
    pub poll_ms: u64,
    #[serde(default)]
    pub keys: FlagKeys,
    /// Where the router keeps the last good flags across restarts (default:
    /// `flags-last-good.json` in the offline folder, the router's own data
    /// folder; the flags folder is often a read-only ConfigMap).
    #[serde(default)]
    pub last_good_file: Option<PathBuf>,
}

impl PipelineConfig {
    /// The router's last good flags file.
    pub fn flags_last_good_file(&self) -> PathBuf {
        self.flags
            .last_good_file
            .clone()
            .unwrap_or_else(|| self.offline.dir.join("flags-last-good.json"))
    }
}

/// A configuration that cannot be used. The message names the problem.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{path}: {0}", path = .1)]
    Schema(SchemaError, String),
    #[error("{path}: {field}: {message}")]
    Invalid {
        path: String,
        field: &'static str,
        message: String,
    },
}

impl PipelineConfig {
    /// The file at `path`, or the embedded default.
    pub fn load(path: Option<&Path>) -> Result<PipelineConfig, ConfigError> {
        let (name, text) = match path {
            Some(p) => (
                p.display().to_string(),
                std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.display().to_string(),
                    source,
                })?,
            ),
            None => ("embedded configuration".to_string(), EMBEDDED.to_string()),
        };
        Self::parse(&name, &text)
    }

    pub fn parse(name: &str, text: &str) -> Result<PipelineConfig, ConfigError> {
        let cfg: PipelineConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: name.to_string(),
            message: e.to_string(),
        })?;
        cfg.validate(name)?;
        Ok(cfg)
    }

    fn validate(&self, name: &str) -> Result<(), ConfigError> {
        let invalid = |field: &'static str, message: &str| ConfigError::Invalid {
            path: name.to_string(),
            field,
            message: message.to_string(),
        };
        self.schema()
            .map_err(|e| ConfigError::Schema(e, name.to_string()))?;
        if self.route.max_body_bytes == 0 {
            return Err(invalid("route.max_body_bytes", "must be positive"));
        }
        if self.route.max_inflight_requests == 0 {
            return Err(invalid("route.max_inflight_requests", "must be positive"));
        }
        let r = &self.route;
        if (r.max_inflight_bytes as u128) < admitted_bytes(r.max_body_bytes) as u128 {
            return Err(invalid(
                "route.max_inflight_bytes",
                &format!(
                    "must be at least {} (route.max_body_bytes × {}, so that one full request fits)",
                    admitted_bytes(r.max_body_bytes),
                    BYTES_PER_BODY_BYTE
                ),
            ));
        }
        for (field, v) in [
            ("route.max_connections", r.max_connections as u64),
            ("route.header_read_timeout_ms", r.header_read_timeout_ms),
            ("route.body_read_timeout_ms", r.body_read_timeout_ms),
            ("route.body_rate_grace_ms", r.body_rate_grace_ms),
            ("route.parse_concurrency", r.parse_concurrency as u64),
        ] {
            if v == 0 {
                return Err(invalid(field, "must be positive"));
            }
        }
        if self.offline.max_file_bytes < 1024 {
            return Err(invalid("offline.max_file_bytes", "must be at least 1024"));
        }
        // The writer adds it to the instant a file was opened, a sum that
        // overflows (and stops the writer) for ages near 2^63 seconds.
        if !(1..=MAX_FILE_AGE_SECS).contains(&self.offline.max_file_age_secs) {
            return Err(invalid(
                "offline.max_file_age_secs",
                &format!("from 1 to {MAX_FILE_AGE_SECS} (a year)"),
            ));
        }
        if self.offline.prefix.is_empty()
            || !self
                .offline
                .prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return Err(invalid(
                "offline.prefix",
                "letters, digits and '_' only (names must sort by creation time)",
            ));
        }
        if self.offline.queue_depth == 0 {
            return Err(invalid("offline.queue_depth", "must be positive"));
        }
        if self.kafka.topic.is_empty() {
            return Err(invalid("kafka.topic", "must not be empty"));
        }
        if !["none", "gzip", "snappy", "lz4", "zstd"].contains(&self.kafka.compression.as_str()) {
            return Err(invalid(
                "kafka.compression",
                "one of none, gzip, snappy, lz4, zstd",
            ));
        }
        // A request waits for its delivery: past a few minutes its client
        // has long given up, and a linger as long as the delivery timeout
        // fails every message.
        if !(1..=MAX_DELIVERY_TIMEOUT_MS).contains(&self.kafka.delivery_timeout_ms) {
            return Err(invalid(
                "kafka.delivery_timeout_ms",
                "between 1 and 300000 (5 minutes): a request waits for its delivery",
            ));
        }
        if self.kafka.linger_ms > MAX_LINGER_MS
            || self.kafka.linger_ms >= self.kafka.delivery_timeout_ms
        {
            return Err(invalid(
                "kafka.linger_ms",
                "at most 1000 and below kafka.delivery_timeout_ms: every request waits for it",
            ));
        }
        if self.flags.poll_ms == 0 {
            return Err(invalid("flags.poll_ms", "must be positive"));
        }
        let k = &self.flags.keys;
        for (field, key) in [
            ("flags.keys.kill_switch", &k.kill_switch),
            ("flags.keys.kafka_only", &k.kafka_only),
            ("flags.keys.dual_write", &k.dual_write),
        ] {
            // LaunchDarkly's rule for keys; a key is also a file name in the
            // flags folder and a path segment of the REST API.
            if !valid_flag_key(key) {
                return Err(invalid(
                    field,
                    "a flag key: letters, digits, '.', '_' and '-', starting with a letter or digit, at most 256 characters",
                ));
            }
        }
        if let Some(m) = &k.migration {
            if !valid_flag_key(m) || [&k.kill_switch, &k.kafka_only, &k.dual_write].contains(&m) {
                return Err(invalid(
                    "flags.keys.migration",
                    "a flag key (letters, digits, '.', '_', '-'), other than the three routing flags",
                ));
            }
        }
        if k.kill_switch == k.kafka_only
            || k.kill_switch == k.dual_write
            || k.kafka_only == k.dual_write
        {
            return Err(invalid("flags.keys", "the three flag keys must differ"));
        }
        Ok(())
    }

    pub fn schema(&self) -> Result<Schema, SchemaError> {
        Schema::from_config(&self.tables)
    }

    pub fn grace(&self) -> Duration {
        Duration::from_secs(self.route.grace_secs)
    }
}

/// `--kafka-config` values: each is one `key=value`, the value everything
/// after the first `=`, commas and all (`debug=cgrp,fetch`, a password with
/// a comma). Nothing is split on commas, so no part of a secret can be taken
/// for a property of its own (and logged as an unknown one). Empty entries
/// (a trailing newline in the environment variable) are skipped.
pub fn parse_properties(raw: &[String]) -> Result<Vec<(String, String)>, String> {
    raw.iter()
        .map(|arg| arg.trim_end_matches('\r'))
        .filter(|arg| !arg.trim().is_empty())
        .map(parse_key_value)
        .collect()
}

/// A properties file as Kubernetes mounts a secret: `key=value` lines, blank
/// lines and `#` or `!` comments. An error names the line, never its value
/// (it may be a password).
pub fn parse_properties_file(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_start();
        if line.is_empty() || line.starts_with('#') || line.starts_with('!') {
            continue;
        }
        match line.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => {
                out.push((k.trim().to_string(), v.trim_end_matches('\r').to_string()))
            }
            _ => return Err(format!("line {}: expected key=value", i + 1)),
        }
    }
    Ok(out)
}

pub fn parse_key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        _ => Err(format!("expected key=value, got {s:?}")),
    }
}

/// The flag keys the router evaluates.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FlagKeys {
    /// Boolean: when true, everything goes legacy.
    pub kill_switch: String,
    /// Number 0–100: percentage of buckets sent to Kafka only.
    pub kafka_only: String,
    /// Number 0–100: percentage of buckets sent to both sinks.
    pub dual_write: String,
    /// A LaunchDarkly migration flag (stages off, dualwrite, shadow, live,
    /// rampdown, complete): when set, it routes each account instead of the
    /// two percentages (LaunchDarkly does the bucketing); the kill switch
    /// still wins.
    pub migration: Option<String>,
}

/// A LaunchDarkly flag key: letters, digits, `.`, `_`, `-`, not starting
/// with a punctuation mark (so never `..` or a path).
pub fn valid_flag_key(key: &str) -> bool {
    key.len() <= 256
        && key
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        && !key.contains("..")
}

impl Default for FlagKeys {
    fn default() -> Self {
        FlagKeys {
            kill_switch: "switchyard-kill-switch".into(),
            kafka_only: "switchyard-kafka-only".into(),
            dual_write: "switchyard-dual-write".into(),
            migration: None,
        }
    }
}

/// The longest `kafka.delivery_timeout_ms` accepted.
const MAX_DELIVERY_TIMEOUT_MS: u64 = 300_000;
/// The longest `kafka.linger_ms` accepted.
const MAX_LINGER_MS: u64 = 1_000;

#[cfg(test)]
mod tests {

    #[test]
    fn properties_files_take_comments_and_never_echo_a_value() {
        let text = "# Confluent Cloud\nsecurity.protocol=SASL_SSL\n\n! also a comment\n  sasl.password=p=w#rd\r\nsasl.mechanisms = PLAIN\n";
        assert_eq!(
            parse_properties_file(text).unwrap(),
            vec![
                ("security.protocol".into(), "SASL_SSL".into()),
                ("sasl.password".into(), "p=w#rd".into()),
                ("sasl.mechanisms".into(), " PLAIN".into()),
            ]
        );
        let e = parse_properties_file("a=1\nhunter2\n").unwrap_err();
        assert_eq!(e, "line 2: expected key=value");
    }

    use super::*;

    #[test]
    fn a_property_value_keeps_its_commas() {
        let raw = vec![
            "debug=cgrp,fetch".to_string(),
            "sasl.password=Sup3r,s3cr=etTail".to_string(),
            "sasl.username=a=b".to_string(),
            String::new(),
        ];
        assert_eq!(
            parse_properties(&raw).unwrap(),
            vec![
                ("debug".to_string(), "cgrp,fetch".to_string()),
                ("sasl.password".to_string(), "Sup3r,s3cr=etTail".to_string()),
                ("sasl.username".to_string(), "a=b".to_string()),
            ]
        );
        let e = parse_properties(&["nokey".to_string()]).unwrap_err();
        assert!(e.contains("expected key=value"), "{e}");
    }

    #[test]
    fn producer_timings_are_bounded() {
        let base = PipelineConfig::load(None).unwrap();
        for (linger, timeout, field) in [
            (0, 0, Some("kafka.delivery_timeout_ms")),
            (0, 300_001, Some("kafka.delivery_timeout_ms")),
            (1_001, 5_000, Some("kafka.linger_ms")),
            (500, 500, Some("kafka.linger_ms")),
            (1_000, 300_000, None),
            (0, 1, None),
        ] {
            let mut c = base.clone();
            c.kafka.linger_ms = linger;
            c.kafka.delivery_timeout_ms = timeout;
            match (c.validate("t.toml"), field) {
                (Ok(()), None) => {}
                (Err(e), Some(f)) => assert!(e.to_string().contains(f), "{e}"),
                (r, f) => panic!("linger {linger}, timeout {timeout}: {r:?}, expected {f:?}"),
            }
        }
    }

    #[test]
    fn the_embedded_configuration_is_valid() {
        let cfg = PipelineConfig::load(None).unwrap();
        assert_eq!(cfg.tables[0].name, "raw_item");
        assert_eq!(cfg.offline.fsync, FsyncPolicy::Adaptive);
        // The former name of adaptive is still accepted.
        let old = EMBEDDED.replace("fsync = \"adaptive\"", "fsync = \"batch\"");
        assert_eq!(
            PipelineConfig::parse("x.toml", &old).unwrap().offline.fsync,
            FsyncPolicy::Adaptive
        );
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let bad = EMBEDDED.replace("salt = ", "slat = ");
        let e = PipelineConfig::parse("x.toml", &bad)
            .unwrap_err()
            .to_string();
        assert!(e.contains("slat"), "{e}");
        let bad = EMBEDDED.replace("compression = \"lz4\"", "compression = \"brotli\"");
        let e = PipelineConfig::parse("x.toml", &bad)
            .unwrap_err()
            .to_string();
        assert!(e.contains("kafka.compression"), "{e}");
        let bad = EMBEDDED.replace("fsync = \"adaptive\"", "fsync = \"sometimes\"");
        let e = PipelineConfig::parse("x.toml", &bad)
            .unwrap_err()
            .to_string();
        assert!(e.contains("sometimes"), "{e}");
        let bad = EMBEDDED.replace("key = \"uuid\"", "key = \"id\"");
        let e = PipelineConfig::parse("x.toml", &bad)
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"id\" is not declared"), "{e}");
        let bad = EMBEDDED.replace(
            "[flags]",
            "[flags]\nkeys = { kill_switch = \"../etc\", kafka_only = \"k\", dual_write = \"d\" }",
        );
        let e = PipelineConfig::parse("x.toml", &bad)
            .unwrap_err()
            .to_string();
        assert!(e.contains("flags.keys.kill_switch"), "{e}");
        for age in ["0", "31536001", "9223372036854775807"] {
            let bad = EMBEDDED.replace(
                "max_file_age_secs = 60",
                &format!("max_file_age_secs = {age}"),
            );
            let e = PipelineConfig::parse("x.toml", &bad)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("offline.max_file_age_secs: from 1 to 31536000"),
                "{e}"
            );
        }
    }

    #[test]
    fn flag_keys_are_identifiers() {
        for good in ["switchyard-kill-switch", "a", "A.b_c-1"] {
            assert!(valid_flag_key(good), "{good}");
        }
        for bad in ["", "../x", ".hidden", "a/b", "a..b", "a b", "é"] {
            assert!(!valid_flag_key(bad), "{bad}");
        }
    }

    #[test]
    fn key_values() {
        assert_eq!(
            parse_key_value("sasl.password=a=b").unwrap(),
            ("sasl.password".into(), "a=b".into())
        );
        assert!(parse_key_value("novalue").is_err());
    }
}
