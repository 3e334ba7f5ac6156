//! `switchyard plan --measure`: the consumer throughput measured on the
//! operator's own broker and database instead of assumed. A throwaway
//! one-partition topic and a throwaway table (named with [`PREFIX`] and a
//! random suffix, so that they can never be a real one) are created, N
//! synthetic payloads are produced with the router's producer, and the
//! partition is consumed once per batch size by the real ingest path into
//! the table. Both are removed afterwards; the run refuses a topic or table
//! that exists already (it only ever works on what it created).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::RDKafkaErrorCode;
use serde::Serialize;
use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;

use crate::admin::Health;
use crate::config::KafkaSettings;
use crate::db::Db;
use crate::ingest::{self, IngestMetrics, IngestOptions};
use crate::kafka::{KafkaMetrics, KafkaSink};
use crate::routing::Route;
use crate::schema::{ColumnType, Schema, Table, TableConfig};

/// Every topic, table and consumer group a measurement creates starts with it.
pub const PREFIX: &str = "switchyard_plan_measure_";

/// A name for this run's topic and table: [`PREFIX`] and 16 random hex digits.
pub fn throwaway_name() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    format!("{PREFIX}{:016x}", h.finish())
}

/// True for a name [`throwaway_name`] makes: nothing else is ever removed.
pub fn is_throwaway(name: &str) -> bool {
    name.strip_prefix(PREFIX)
        .is_some_and(|hex| hex.len() == 16 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The declared table `t` under another name: the rows measured have its
/// shape.
pub fn renamed(t: &TableConfig, name: &str) -> TableConfig {
    let mut c = t.clone();
    c.name = name.to_string();
    c
}

/// The `i`-th synthetic envelope for `table`, close to `payload_bytes`
/// long: every column gets a value of its type, the key a unique one, the
/// time column the current time, and the first text column the padding.
pub fn envelope(table: &Table, i: u64, payload_bytes: usize, now_secs: i64) -> Vec<u8> {
    let mut row = Map::new();
    let mut pad_column = None;
    for c in &table.columns {
        let v = if c.name == table.key {
            match c.ty {
                ColumnType::Int => Value::from(i as i64),
                ColumnType::Uuid => Value::from(synthetic_uuid(i)),
                _ => Value::from(format!("plan-{i}")),
            }
        } else if c.name == table.time {
            Value::from(now_secs)
        } else {
            match c.ty {
                ColumnType::Int => Value::from((i % 1000) as i64),
                ColumnType::Float => Value::from(i as f64 / 4.0),
                ColumnType::Bool => Value::from(i.is_multiple_of(2)),
                ColumnType::Uuid => Value::from(synthetic_uuid(i)),
                ColumnType::Json => serde_json::json!({ "n": i }),
                ColumnType::String => {
                    pad_column.get_or_insert_with(|| c.name.clone());
                    Value::from("")
                }
            }
        };
        row.insert(c.name.clone(), v);
    }
    let env = |row: &Map<String, Value>| serde_json::json!({"account_id": i % 1000, "table": table.name, "row": row});
    if let Some(col) = pad_column {
        let bare = env(&row).to_string().len();
        let pad = payload_bytes
            .saturating_sub(bare)
            .min(table.max_row_bytes.saturating_sub(bare));
        row.insert(col, Value::from("x".repeat(pad)));
    }
    env(&row).to_string().into_bytes()
}

fn synthetic_uuid(i: u64) -> String {
    let h = format!("{i:032x}");
    format!(
        "{}-{}-4{}-8{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}

/// Why a measurement stopped.
#[derive(Debug, thiserror::Error)]
pub enum MeasureError {
    /// The run would have touched something it did not create.
    #[error("refused: {0}")]
    Refused(String),
    #[error("Kafka: {0}")]
    Kafka(String),
    #[error("database: {0}")]
    Db(#[from] crate::db::DbError),
    #[error("ingest: {0}")]
    Ingest(#[from] ingest::IngestError),
    #[error("{0}")]
    Incomplete(String),
}

/// Where a measurement runs: the broker, its client properties, the
/// measurement topic and the schema of its one table.
pub struct Target<'a> {
    pub brokers: &'a str,
    pub extra: &'a [(String, String)],
    pub topic: &'a str,
    pub schema: &'a Schema,
}

impl Target<'_> {
    fn table(&self) -> Result<&Table, MeasureError> {
        self.schema
            .tables()
            .first()
            .ok_or_else(|| MeasureError::Incomplete("no table to measure".into()))
    }
}

/// Producing the payloads.
#[derive(Debug, Clone, Serialize)]
pub struct Produced {
    pub messages: u64,
    pub bytes: u64,
    pub seconds: f64,
    pub msgs_per_sec: f64,
}

/// One consumption of the partition.
#[derive(Debug, Clone, Serialize)]
pub struct Consumed {
    pub batch_size: usize,
    pub messages: u64,
    /// From the partition's assignment to the last database commit.
    pub seconds: f64,
    pub msgs_per_sec: f64,
}

fn admin(
    brokers: &str,
    extra: &[(String, String)],
) -> Result<AdminClient<DefaultClientContext>, MeasureError> {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", brokers);
    for (k, v) in extra {
        cfg.set(k, v);
    }
    cfg.create()
        .map_err(|e| MeasureError::Kafka(crate::kafka::config_problem(&e)))
}

/// Creates the one-partition topic `name`, replicated on as many brokers as
/// the cluster has, up to 3. An existing topic is refused.
pub async fn create_topic(
    brokers: &str,
    extra: &[(String, String)],
    name: &str,
) -> Result<(), MeasureError> {
    if !is_throwaway(name) {
        return Err(MeasureError::Refused(format!(
            "{name:?} is not a measurement topic"
        )));
    }
    let a = admin(brokers, extra)?;
    let md = {
        let client = admin(brokers, extra)?;
        tokio::task::spawn_blocking(move || {
            client
                .inner()
                .fetch_metadata(None, Duration::from_secs(10))
                .map(|m| m.brokers().len())
        })
        .await
        .map_err(|e| MeasureError::Kafka(e.to_string()))?
        .map_err(|e| MeasureError::Kafka(format!("cannot read the cluster's metadata: {e}")))?
    };
    let replication = md.clamp(1, 3) as i32;
    let topic = NewTopic::new(name, 1, TopicReplication::Fixed(replication));
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let res = a
        .create_topics([&topic], &opts)
        .await
        .map_err(|e| MeasureError::Kafka(format!("cannot create the topic {name}: {e}")))?;
    for r in res {
        match r {
            Ok(_) => {}
            Err((t, RDKafkaErrorCode::TopicAlreadyExists)) => {
                return Err(MeasureError::Refused(format!(
                    "the topic {t} exists: a measurement only runs on a topic it created"
                )))
            }
            Err((t, code)) => {
                return Err(MeasureError::Kafka(format!(
                    "cannot create the topic {t}: {code}"
                )))
            }
        }
    }
    Ok(())
}

/// Deletes the measurement topic `name` and the consumer groups named after it.
pub async fn remove_topic(
    brokers: &str,
    extra: &[(String, String)],
    name: &str,
    groups: &[String],
) -> Result<(), MeasureError> {
    if !is_throwaway(name) {
        return Err(MeasureError::Refused(format!(
            "{name:?} is not a measurement topic"
        )));
    }
    let a = admin(brokers, extra)?;
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let res = a
        .delete_topics(&[name], &opts)
        .await
        .map_err(|e| MeasureError::Kafka(format!("cannot delete the topic {name}: {e}")))?;
    for r in res {
        if let Err((t, code)) = r {
            return Err(MeasureError::Kafka(format!(
                "cannot delete the topic {t}: {code}"
            )));
        }
    }
    let ours: Vec<&str> = groups
        .iter()
        .map(String::as_str)
        .filter(|g| g.starts_with(name))
        .collect();
    if !ours.is_empty() {
        // A broker that cannot delete groups leaves them to expire (an
        // empty group's offsets go with offsets.retention.minutes).
        if let Err(e) = a.delete_groups(&ours, &opts).await {
            tracing::warn!(error = %e, "cannot delete the measurement's consumer groups; they expire by themselves");
        }
    }
    Ok(())
}

/// Creates the measurement table `table` (refused if it exists).
pub async fn create_table(db: &Db, table: &Table) -> Result<(), MeasureError> {
    if !is_throwaway(&table.name) {
        return Err(MeasureError::Refused(format!(
            "{:?} is not a measurement table",
            table.name
        )));
    }
    if !db.live_columns(&table.name).await?.is_empty() {
        return Err(MeasureError::Refused(format!(
            "the table {} exists: a measurement only runs on a table it created",
            table.name
        )));
    }
    // Fails, creating nothing, if the table appeared meanwhile.
    Ok(db.create_new_table(table).await?)
}

/// Drops the measurement table `name`.
pub async fn remove_table(db: &Db, name: &str) -> Result<(), MeasureError> {
    if !is_throwaway(name) {
        return Err(MeasureError::Refused(format!(
            "{name:?} is not a measurement table"
        )));
    }
    Ok(db.drop_table(name).await?)
}

/// Produces `messages` synthetic envelopes for `table` to `topic` with the
/// router's producer (its settings and delivery path), 1,000 a delivery
/// and four deliveries in flight, and times it until the last
/// acknowledgement. `progress` is told how many are acknowledged.
pub async fn produce(
    target: &Target<'_>,
    settings: &KafkaSettings,
    messages: u64,
    payload_bytes: usize,
    progress: &mut dyn FnMut(u64),
) -> Result<Produced, MeasureError> {
    let table = target.table()?;
    let mut settings = settings.clone();
    settings.topic = target.topic.to_string();
    let metrics = KafkaMetrics::new(&prometheus::Registry::new(), "plan")
        .map_err(|e| MeasureError::Kafka(e.to_string()))?;
    let sink = KafkaSink::new(target.brokers, &settings, target.extra, metrics)
        .map_err(|e| MeasureError::Kafka(e.to_string()))?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    const CHUNK: u64 = 1000;
    const IN_FLIGHT: usize = 4;
    let started = Instant::now();
    let mut bytes = 0u64;
    let mut acked = 0u64;
    let mut next = 0u64;
    let mut running = futures_util::stream::FuturesUnordered::new();
    loop {
        while running.len() < IN_FLIGHT && next < messages {
            let end = (next + CHUNK).min(messages);
            let chunk: Vec<(u64, Vec<u8>)> = (next..end)
                .map(|i| (i % 1000, envelope(table, i, payload_bytes, now)))
                .collect();
            bytes += chunk.iter().map(|(_, v)| v.len() as u64).sum::<u64>();
            next = end;
            let sink = sink.clone();
            running.push(async move {
                let refs: Vec<(u64, &[u8], Route)> = chunk
                    .iter()
                    .map(|(a, v)| (*a, v.as_slice(), Route::Kafka))
                    .collect();
                sink.deliver(&refs).await
            });
        }
        let Some(results) = futures_util::StreamExt::next(&mut running).await else {
            break;
        };
        for r in results {
            r.map_err(|e| MeasureError::Kafka(format!("a payload was not acknowledged: {e}")))?;
            acked += 1;
        }
        progress(acked);
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(Produced {
        messages: acked,
        bytes,
        seconds,
        msgs_per_sec: acked as f64 / seconds,
    })
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Consumes the one-partition topic (holding `messages` envelopes of the
/// target's table, which is empty in `db`) from its start with the ingest
/// path, batches of `batch_size`, in the consumer group `group`. The
/// rate runs from the partition's assignment to the last database commit.
pub async fn consume(
    target: &Target<'_>,
    group: &str,
    db: &Db,
    batch_size: usize,
    messages: u64,
) -> Result<Consumed, MeasureError> {
    let metrics = IngestMetrics::new(&prometheus::Registry::new())
        .map_err(|e| MeasureError::Kafka(e.to_string()))?;
    let opts = IngestOptions {
        brokers: target.brokers.to_string(),
        topics: vec![target.topic.to_string()],
        group: group.to_string(),
        batch_size,
        batch_bytes: 8 << 20,
        consumer_timeout: Duration::from_millis(150),
        extra: target.extra.to_vec(),
        idle_exit: Some(Duration::from_secs(1)),
    };
    // When the partition is assigned: fetching starts then (the group's
    // join, which a broker may delay on purpose, is not the consumer's rate).
    let assigned = metrics.rebalances.with_label_values(&["assign"]);
    let stop = CancellationToken::new();
    let watch = {
        let (assigned, stop) = (assigned.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                if assigned.get() > 0 {
                    return Some(unix_now());
                }
                tokio::select! {
                    _ = stop.cancelled() => return None,
                    _ = tokio::time::sleep(Duration::from_millis(1)) => {}
                }
            }
        })
    };
    let summary = ingest::run(
        opts,
        target.schema,
        db,
        metrics.clone(),
        Health::default(),
        CancellationToken::new(),
    )
    .await;
    stop.cancel();
    let started = watch.await.ok().flatten();
    let summary = summary?;
    if summary.inserted != messages {
        return Err(MeasureError::Incomplete(format!(
            "batch size {batch_size}: {} of the {messages} messages were inserted ({} read, {} dead letters)",
            summary.inserted, summary.messages, summary.dead_letters
        )));
    }
    let Some(started) = started else {
        return Err(MeasureError::Incomplete(
            "the partition was never assigned".into(),
        ));
    };
    let seconds = (metrics.sink.last_commit.get() - started).max(1e-6);
    Ok(Consumed {
        batch_size,
        messages,
        seconds,
        msgs_per_sec: messages as f64 / seconds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Table {
        let cfg = crate::config::PipelineConfig::load(None).unwrap();
        let t = renamed(&cfg.tables[0], &throwaway_name());
        Schema::from_config(&[t]).unwrap().tables()[0].clone()
    }

    #[test]
    fn names_are_recognised_and_nothing_else_is() {
        let a = throwaway_name();
        assert!(is_throwaway(&a), "{a}");
        assert_ne!(a, throwaway_name());
        for other in [
            "raw_item",
            "switchyard.items",
            PREFIX,
            "switchyard_plan_measure_0123",
            "switchyard_plan_measure_0123456789abcdeg",
            "xswitchyard_plan_measure_0123456789abcdef",
        ] {
            assert!(!is_throwaway(other), "{other}");
        }
    }

    #[test]
    fn envelopes_are_valid_rows_of_the_size_asked_with_unique_keys() {
        let t = table();
        let schema = Schema::from_config(&[renamed(
            &crate::config::PipelineConfig::load(None).unwrap().tables[0],
            &t.name,
        )])
        .unwrap();
        let mut keys = std::collections::HashSet::new();
        for i in [0u64, 1, 999, 123_456_789] {
            let e = envelope(&t, i, 2500, 1_700_000_000);
            assert_eq!(e.len(), 2500, "{i}");
            let v: Value = serde_json::from_slice(&e).unwrap();
            assert_eq!(v["table"], t.name.as_str());
            let row = v["row"].as_object().unwrap();
            schema.check_row(&t.name, row).unwrap();
            assert!(keys.insert(row[&t.key].to_string()));
        }
        // Never above the table's limit, never below the bare row.
        let big = envelope(&t, 1, 10 << 20, 0);
        assert!(big.len() <= t.max_row_bytes, "{}", big.len());
        let small = envelope(&t, 1, 10, 0);
        assert!(small.len() > 10 && small.len() < 400, "{}", small.len());
    }
}
