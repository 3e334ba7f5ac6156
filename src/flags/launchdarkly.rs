//! Flags from LaunchDarkly's streaming service (or a Relay Proxy / private
//! instance), through the SDK: the same evaluation as the local source. The
//! router waits a bounded time for the first payload; without one it runs on
//! the safe default (everything legacy) and switches the moment flags arrive.
//! A lost stream keeps the last values while the SDK reconnects.

use std::sync::Arc;
use std::time::Duration;

use launchdarkly_sdk_transport::HyperTransport;
use launchdarkly_server_sdk::{
    Client, ConfigBuilder, EventProcessorBuilder, NullEventProcessorBuilder,
    ServiceEndpointsBuilder, StreamingDataSourceBuilder,
};
use tokio_util::sync::CancellationToken;

use super::FlagMetrics;
use super::{Evaluator, FlagKeys, FlagSource, SourceStatus};
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
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("LaunchDarkly client: {0}")]
pub struct LaunchDarklyStartError(String);

pub struct LaunchDarklyFlags {
    evaluator: Evaluator,
    client: Arc<Client>,
    metrics: FlagMetrics,
}

impl LaunchDarklyFlags {
    pub async fn start(
        opts: &LaunchDarklyOptions,
        keys: FlagKeys,
        metrics: FlagMetrics,
    ) -> Result<Arc<LaunchDarklyFlags>, LaunchDarklyStartError> {
        let err = |e: String| LaunchDarklyStartError(e);
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
        let builder = ConfigBuilder::new(&opts.sdk_key)
            .service_endpoints(&endpoints)
            .data_source(&streaming);
        let builder = if opts.send_events {
            builder.event_processor(&EventProcessorBuilder::<HyperTransport>::new())
        } else {
            builder.event_processor(&NullEventProcessorBuilder::new())
        };
        let config = builder.build().map_err(|e| err(e.to_string()))?;
        let client = Arc::new(Client::build(config).map_err(|e| err(e.to_string()))?);
        client.start_with_default_executor();
        let flags = Arc::new(LaunchDarklyFlags {
            evaluator: Evaluator::new(client.clone(), keys),
            client: client.clone(),
            metrics,
        });
        match client.wait_for_initialization(opts.init_timeout).await {
            Some(true) => {
                tracing::info!(
                    stream = opts.stream_uri.as_deref().unwrap_or("default"),
                    "LaunchDarkly flags loaded"
                );
            }
            _ => {
                tracing::warn!(
                    stream = opts.stream_uri.as_deref().unwrap_or("default"),
                    waited_ms = opts.init_timeout.as_millis() as u64,
                    "no flags from LaunchDarkly yet: every account routes legacy (the safe default) until they arrive"
                );
            }
        }
        flags.publish();
        Ok(flags)
    }

    fn publish(&self) {
        let loaded = self.client.initialized();
        self.metrics.loaded.set(i64::from(loaded));
        if loaded {
            self.evaluator.publish(&self.metrics);
        }
    }

    /// Keeps the flag gauges current until `stop`, then closes the client.
    pub fn watch(
        self: &Arc<Self>,
        every: Duration,
        stop: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let mut was_loaded = me.client.initialized();
            let mut tick = tokio::time::interval(every);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => {}
                }
                let loaded = me.client.initialized();
                if loaded && !was_loaded {
                    tracing::info!("LaunchDarkly flags arrived: routing on real values");
                }
                was_loaded = loaded;
                me.publish();
            }
            me.client.close();
        })
    }
}

impl FlagSource for LaunchDarklyFlags {
    fn evaluate(&self, account_id: u64) -> FlagValues {
        if !self.client.initialized() {
            return FlagValues::default();
        }
        self.evaluator.evaluate(account_id)
    }

    fn status(&self) -> SourceStatus {
        let loaded = self.client.initialized();
        let last_error = (!loaded).then(|| {
            "no flag payload from LaunchDarkly yet: routing on the safe default (legacy)"
                .to_string()
        });
        SourceStatus {
            kind: "launchdarkly",
            loaded,
            // The safe default is a known state, not a broken one: the
            // router serves (everything legacy) while the stream connects.
            ready: true,
            problems: last_error.iter().cloned().collect(),
            last_error,
            origins: Default::default(),
        }
    }
}
