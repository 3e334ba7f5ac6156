//! switchyard: move an ingestion pipeline from offline files to Kafka with no
//! downtime and no lost row. One module per role, plus the shared parts they use.

pub mod admin;
pub mod backfill;
pub mod cli;
pub mod compare;
pub mod config;
pub mod db;
pub mod demo;
pub mod flags;
pub mod health;
pub mod ingest;
pub mod kafka;
pub mod load;
pub mod logging;
pub mod metrics;
pub mod offline;
pub mod plan;
pub mod rawjson;
pub mod rollout;
pub mod route;
pub mod routing;
pub mod schema;
pub mod shutdown;
