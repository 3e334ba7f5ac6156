//! Flags from LaunchDarkly's streaming service (or a Relay Proxy / private
//! instance). The SDK keeps the stream and hands every flag and segment to
//! a data store of ours ([`FileStore`], the SDK's persistent data store
//! interface): it validates the routing flags as the local source does,
//! publishes one snapshot per change (a request evaluates its flags from one
//! consistent set, with the SDK's evaluator), and persists the data in the
//! router's own data folder, written whole and synced.
//!
//! At start the router waits a bounded time for the first payload. Without
//! one it routes on the flags persisted by a previous run (`persisted`), or,
//! with nothing persisted (or `--ld-offline-default legacy`), on the safe
//! default: everything legacy. It switches the moment the stream delivers.
//! A lost stream keeps the last values while the SDK reconnects.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use launchdarkly_sdk_transport::HyperTransport;
use launchdarkly_server_sdk::{
    AllData, Client, ConfigBuilder, DataKind, EventProcessorBuilder, NullEventProcessorBuilder,
    PersistentDataStore, PersistentDataStoreBuilder, PersistentDataStoreFactory,
    PersistentStoreError, SerializedItem, ServiceEndpointsBuilder, StreamingDataSourceBuilder,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::folder::{self, FlagFileError, Origin};
use super::FlagMetrics;
use super::{FlagKeys, FlagSource, Snapshot, SourceStatus, WriteReport};
use crate::routing::FlagValues;

/// Where and how to reach LaunchDarkly.
#[derive(Clone)]
pub struct LaunchDarklyOptions {
    /// Server-side SDK key (from `LD_SDK_KEY`; never logged).
    pub sdk_key: String,
    /// Streaming URI (default `https://stream.launchdarkly.com`).
    pub stream_uri: Option<String>,
    /// Base (polling) URI (default `https://sdk.launchdarkly.com`).
    pub base_uri: Option<String>,
    /// Events URI (default `https://events.launchdarkly.com`).
    pub events_uri: Option<String>,
    /// Send evaluation events (off: nothing but the stream leaves the process).
    pub send_events: bool,
    /// How long start-up waits for the first flag payload.
    pub init_timeout: Duration,
    /// First reconnect delay after a lost stream (the SDK backs off from it).
    pub reconnect_delay: Duration,
    /// While LaunchDarkly has not answered: route on the flags persisted by
    /// a previous run (true), or on the safe default, everything legacy.
    pub use_persisted: bool,
    /// With events on and a migration flag: one write in this many is
    /// reported to LaunchDarkly's migration insights (0: none).
    pub migration_sample: u64,
}

impl std::fmt::Debug for LaunchDarklyOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LaunchDarklyOptions")
            .field("sdk_key", &"***")
            .field("stream_uri", &self.stream_uri)
            .field("base_uri", &self.base_uri)
            .field("events_uri", &self.events_uri)
            .field("send_events", &self.send_events)
            .field("init_timeout", &self.init_timeout)
            .field("use_persisted", &self.use_persisted)
            .field("migration_sample", &self.migration_sample)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("LaunchDarkly client: {0}")]
pub struct LaunchDarklyStartError(String);

/// One stored item, as the SDK hands it over.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Item {
    version: u64,
    deleted: bool,
    /// The flag or segment JSON (or the SDK's tombstone).
    item: String,
}

impl Item {
    fn from_sdk(s: SerializedItem) -> Item {
        Item {
            version: s.version,
            deleted: s.deleted,
            item: s.serialized_item,
        }
    }

    fn to_sdk(&self) -> SerializedItem {
        SerializedItem {
            version: self.version,
            deleted: self.deleted,
            serialized_item: self.item.clone(),
        }
    }
}

/// The persisted file.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Persisted {
    source: String,
    saved_at: f64,
    flags: HashMap<String, Item>,
    segments: HashMap<String, Item>,
}

/// Where the values served come from.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Served {
    /// From the stream, this run.
    Live,
    /// From the file a previous run persisted (saved at this Unix time).
    Persisted(f64),
    /// Nothing yet: everything legacy.
    SafeDefault,
}

struct Data {
    flags: HashMap<String, Item>,
    segments: HashMap<String, Item>,
    initialized: bool,
    served: Served,
    /// Last good routing flags (validation keeps them over a bad update).
    good: BTreeMap<String, Value>,
    problems: Vec<FlagFileError>,
}

/// What the SDK's store and the router share.
struct Shared {
    keys: FlagKeys,
    /// False while on the safe default: read on every request, so an atomic
    /// rather than the data lock the stream writes under.
    serving: std::sync::atomic::AtomicBool,
    file: Option<PathBuf>,
    data: Mutex<Data>,
    snapshot: RwLock<Arc<Snapshot>>,
    metrics: FlagMetrics,
}

fn now_unix() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl Shared {
    fn data(&self) -> std::sync::MutexGuard<'_, Data> {
        self.data.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Validates the routing flags, rebuilds the snapshot.
    fn rebuild(&self, d: &mut Data) {
        let mut flags = BTreeMap::new();
        let mut broken = BTreeSet::new();
        let mut problems = Vec::new();
        for (key, item) in &d.flags {
            if item.deleted {
                continue;
            }
            match folder::parse_flag(item.item.as_bytes(), &self.keys) {
                Ok((_, v)) => {
                    flags.insert(key.clone(), v);
                }
                Err(reason) => {
                    broken.insert(key.clone());
                    problems.push(FlagFileError {
                        path: format!("LaunchDarkly flag {key}"),
                        reason,
                        keys: vec![key.clone()],
                    });
                }
            }
        }
        let resolved = folder::settle(
            "LaunchDarkly",
            |key| format!("LaunchDarkly flag {key}"),
            flags,
            broken,
            problems,
            // Before any data, nothing is "missing": it is the safe default.
            d.served == Served::SafeDefault,
            &self.keys,
            &d.good,
        );
        for (key, origin) in &resolved.origins {
            if *origin == Origin::File {
                if let Some(v) = resolved.flags.get(key) {
                    d.good.insert(key.clone(), v.clone());
                }
            }
        }
        let segments: BTreeMap<String, Value> = d
            .segments
            .iter()
            .filter(|(_, i)| !i.deleted)
            .filter_map(|(k, i)| {
                serde_json::from_str::<Value>(&i.item)
                    .ok()
                    .map(|v| (k.clone(), v))
            })
            .collect();
        let snap = if d.served == Served::SafeDefault {
            Snapshot::default()
        } else {
            Snapshot::from_json_with_segments(&resolved.flags, &segments)
        };
        self.metrics
            .report_problems(&d.problems, &resolved.problems);
        d.problems = resolved.problems;
        *self.snapshot.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(snap);
        self.serving.store(
            d.served != Served::SafeDefault,
            std::sync::atomic::Ordering::Release,
        );
        self.metrics.reloads.inc();
    }

    fn persist(&self, d: &Data) {
        let Some(path) = &self.file else {
            return;
        };
        let body = Persisted {
            source: "launchdarkly".into(),
            saved_at: now_unix(),
            flags: d.flags.clone(),
            segments: d.segments.clone(),
        };
        let result = serde_json::to_value(&body)
            .map_err(std::io::Error::other)
            .and_then(|v| super::write_synced(path, &v));
        if let Err(e) = result {
            self.metrics.persist_errors.inc();
            tracing::error!(file = %path.display(), error = %e, "cannot persist the LaunchDarkly flags: a restart while LaunchDarkly is unreachable would route on the safe default");
        }
    }

    fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn publish(&self) {
        let served = self.data().served;
        self.metrics
            .loaded
            .set(i64::from(served != Served::SafeDefault));
        for (state, on) in [
            ("live", served == Served::Live),
            ("persisted", matches!(served, Served::Persisted(_))),
            ("safe-default", served == Served::SafeDefault),
        ] {
            self.metrics
                .source_state
                .with_label_values(&[state])
                .set(i64::from(on));
        }
        self.snapshot().publish(&self.keys, &self.metrics);
    }
}

/// The SDK's persistent data store, backed by memory and a file.
struct FileStore(Arc<Shared>);

impl PersistentDataStore for FileStore {
    fn init(
        &mut self,
        all: AllData<SerializedItem, SerializedItem>,
    ) -> Result<(), PersistentStoreError> {
        let mut d = self.0.data();
        d.flags = all
            .flags
            .into_iter()
            .map(|(k, v)| (k, Item::from_sdk(v)))
            .collect();
        d.segments = all
            .segments
            .into_iter()
            .map(|(k, v)| (k, Item::from_sdk(v)))
            .collect();
        d.initialized = true;
        if d.served != Served::Live {
            tracing::info!("LaunchDarkly flags arrived: routing on live values");
        }
        d.served = Served::Live;
        self.0.rebuild(&mut d);
        self.0.persist(&d);
        drop(d);
        self.0.publish();
        Ok(())
    }

    fn flag(&self, key: &str) -> Result<Option<SerializedItem>, PersistentStoreError> {
        Ok(self.0.data().flags.get(key).map(Item::to_sdk))
    }

    fn segment(&self, key: &str) -> Result<Option<SerializedItem>, PersistentStoreError> {
        Ok(self.0.data().segments.get(key).map(Item::to_sdk))
    }

    fn all_flags(&self) -> Result<HashMap<String, SerializedItem>, PersistentStoreError> {
        Ok(self
            .0
            .data()
            .flags
            .iter()
            .map(|(k, v)| (k.clone(), v.to_sdk()))
            .collect())
    }

    fn upsert(
        &mut self,
        kind: DataKind,
        key: &str,
        item: SerializedItem,
    ) -> Result<bool, PersistentStoreError> {
        let mut d = self.0.data();
        let map = match kind {
            DataKind::Flag => &mut d.flags,
            DataKind::Segment => &mut d.segments,
        };
        if map.get(key).is_some_and(|e| e.version >= item.version) {
            return Ok(false);
        }
        map.insert(key.to_string(), Item::from_sdk(item));
        self.0.rebuild(&mut d);
        self.0.persist(&d);
        drop(d);
        self.0.publish();
        Ok(true)
    }

    fn is_initialized(&self) -> bool {
        self.0.data().initialized
    }
}

struct Factory(Arc<Shared>);

impl PersistentDataStoreFactory for Factory {
    fn create_persistent_data_store(&self) -> Result<Box<dyn PersistentDataStore>, std::io::Error> {
        Ok(Box::new(FileStore(self.0.clone())))
    }
}

pub struct LaunchDarklyFlags {
    shared: Arc<Shared>,
    client: Arc<Client>,
    /// One write in `every` reported as a migration operation (0: none).
    every: u64,
    writes: std::sync::atomic::AtomicU64,
}

impl LaunchDarklyFlags {
    /// Starts the SDK. `persist` is the router's file for the last known
    /// flags (None: memory only).
    pub async fn start(
        opts: &LaunchDarklyOptions,
        keys: FlagKeys,
        persist: Option<PathBuf>,
        metrics: FlagMetrics,
    ) -> Result<Arc<LaunchDarklyFlags>, LaunchDarklyStartError> {
        let err = |e: String| LaunchDarklyStartError(e);
        let mut data = Data {
            flags: HashMap::new(),
            segments: HashMap::new(),
            initialized: false,
            served: Served::SafeDefault,
            good: BTreeMap::new(),
            problems: Vec::new(),
        };
        if let (Some(path), true) = (&persist, opts.use_persisted) {
            match std::fs::read(path) {
                Ok(bytes) => match serde_json::from_slice::<Persisted>(&bytes) {
                    Ok(p) if p.source == "launchdarkly" => {
                        tracing::info!(file = %path.display(), flags = p.flags.len(), saved_at = p.saved_at, "LaunchDarkly flags of a previous run loaded");
                        data.flags = p.flags;
                        data.segments = p.segments;
                        data.served = Served::Persisted(p.saved_at);
                    }
                    Ok(_) | Err(_) => {
                        tracing::warn!(file = %path.display(), "not LaunchDarkly flags persisted by this router: ignored")
                    }
                },
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "persisted LaunchDarkly flags unreadable: ignored")
                }
            }
        }
        let shared = Arc::new(Shared {
            keys,
            serving: std::sync::atomic::AtomicBool::new(false),
            file: persist,
            data: Mutex::new(data),
            snapshot: RwLock::new(Arc::new(Snapshot::default())),
            metrics,
        });
        {
            let mut d = shared.data();
            shared.rebuild(&mut d);
        }
        let client = Arc::new(build_client(opts, &shared).map_err(err)?);
        client.start_with_default_executor();
        let every = match (&shared.keys.migration, opts.send_events) {
            (Some(_), true) => opts.migration_sample,
            _ => 0,
        };
        let flags = Arc::new(LaunchDarklyFlags {
            shared: shared.clone(),
            client: client.clone(),
            every,
            writes: std::sync::atomic::AtomicU64::new(0),
        });
        match client.wait_for_initialization(opts.init_timeout).await {
            Some(true) => {
                tracing::info!(
                    stream = opts.stream_uri.as_deref().unwrap_or("default"),
                    "LaunchDarkly flags loaded"
                );
            }
            _ => match shared.data().served {
                Served::Persisted(at) => tracing::warn!(
                    stream = opts.stream_uri.as_deref().unwrap_or("default"),
                    waited_ms = opts.init_timeout.as_millis() as u64,
                    age_secs = (now_unix() - at).max(0.0) as u64,
                    "no flags from LaunchDarkly yet: routing on the flags a previous run persisted until they arrive"
                ),
                _ => tracing::warn!(
                    stream = opts.stream_uri.as_deref().unwrap_or("default"),
                    waited_ms = opts.init_timeout.as_millis() as u64,
                    "no flags from LaunchDarkly yet: every account routes legacy (the safe default) until they arrive"
                ),
            },
        }
        shared.publish();
        Ok(flags)
    }

    /// Keeps the flag gauges current until `stop`, then closes the client.
    pub fn watch(
        self: &Arc<Self>,
        every: Duration,
        stop: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => {}
                }
                me.shared.publish();
            }
            me.client.close();
        })
    }
}

impl FlagSource for LaunchDarklyFlags {
    fn evaluate(&self, account_id: u64) -> FlagValues {
        if !self
            .shared
            .serving
            .load(std::sync::atomic::Ordering::Acquire)
        {
            return FlagValues::default();
        }
        self.shared
            .snapshot()
            .evaluate(&self.shared.keys, account_id)
    }

    fn sample_write(&self) -> bool {
        self.every > 0
            && self
                .writes
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                .is_multiple_of(self.every)
    }

    fn track_write(&self, w: &WriteReport) {
        if let Some(key) = &self.shared.keys.migration {
            report_write(&self.client, key, w);
        }
    }

    fn status(&self) -> SourceStatus {
        let d = self.shared.data();
        let (loaded, state, last_error) = match d.served {
            Served::Live => (true, "live".to_string(), None),
            Served::Persisted(at) => (
                true,
                format!("persisted {} s ago", (now_unix() - at).max(0.0) as u64),
                Some("no flag payload from LaunchDarkly yet: routing on the flags a previous run persisted".to_string()),
            ),
            Served::SafeDefault => (
                false,
                "safe default".to_string(),
                Some(
                    "no flag payload from LaunchDarkly yet: routing on the safe default (legacy)"
                        .to_string(),
                ),
            ),
        };
        let problems: Vec<String> = d.problems.iter().map(ToString::to_string).collect();
        SourceStatus {
            kind: "launchdarkly",
            loaded,
            // The safe default and persisted flags are known states, not
            // broken ones: the router serves while the stream connects.
            ready: problems.is_empty(),
            last_error: problems.last().cloned().or(last_error),
            problems,
            origins: BTreeMap::new(),
            state: Some(state),
        }
    }
}

/// Events the SDK holds between flushes (its default, 500, is what one in
/// 100 writes at 10,000 requests/s fills in its default 5 s), and how often
/// it sends them.
pub const EVENT_CAPACITY: usize = 5000;
pub const EVENT_FLUSH_INTERVAL: Duration = Duration::from_secs(1);

/// Reports one write as a migration operation for LaunchDarkly's migration
/// insights: the write, the stage the SDK evaluates for the account (an
/// evaluation event too), and per origin (old: the offline file, new:
/// Kafka) whether it was invoked, its latency and its error. The SDK queues
/// it for its next event flush; nothing here waits on the network.
pub fn report_write(client: &Client, key: &str, w: &WriteReport) {
    use launchdarkly_server_sdk::{ContextBuilder, Operation, Origin as Side, Stage};
    let Ok(ctx) = ContextBuilder::new(w.account_id.to_string())
        .kind("account")
        .build()
    else {
        return;
    };
    let (_, tracker) = client.migration_variation(&ctx, key, Stage::Off);
    {
        let Ok(mut t) = tracker.lock() else {
            return;
        };
        t.operation(Operation::Write);
        for (origin, outcome) in [(Side::Old, w.old), (Side::New, w.new)] {
            if let Some(o) = outcome {
                t.invoked(origin);
                t.latency(origin, o.latency);
                if !o.ok {
                    t.error(origin);
                }
            }
        }
    }
    client.track_migration_op(tracker);
}

/// The SDK client, its stream feeding `shared` (built apart: the builders
/// are not `Send` and must not live across an await).
fn build_client(opts: &LaunchDarklyOptions, shared: &Arc<Shared>) -> Result<Client, String> {
    let mut endpoints = ServiceEndpointsBuilder::new();
    if let Some(u) = &opts.stream_uri {
        endpoints.streaming_base_url(u);
    }
    if let Some(u) = &opts.base_uri {
        endpoints.polling_base_url(u);
    }
    if let Some(u) = &opts.events_uri {
        endpoints.events_base_url(u);
    }
    let mut streaming = StreamingDataSourceBuilder::<HyperTransport>::new();
    streaming.initial_reconnect_delay(opts.reconnect_delay);
    // The SDK's own evaluation is not used (the router evaluates its
    // snapshot), so its cache of the store only has to be correct.
    let mut store = PersistentDataStoreBuilder::new(Arc::new(Factory(shared.clone())));
    store.no_caching();
    let builder = ConfigBuilder::new(&opts.sdk_key)
        .service_endpoints(&endpoints)
        .data_source(&streaming)
        .data_store(&store);
    let builder = if opts.send_events {
        let mut events = EventProcessorBuilder::<HyperTransport>::new();
        events
            .capacity(EVENT_CAPACITY)
            .flush_interval(EVENT_FLUSH_INTERVAL);
        builder.event_processor(&events)
    } else {
        builder.event_processor(&NullEventProcessorBuilder::new())
    };
    let config = builder.build().map_err(|e| e.to_string())?;
    Client::build(config).map_err(|e| e.to_string())
}
