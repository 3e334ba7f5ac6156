//! switchyard: move an ingestion pipeline from offline files to Kafka with no
//! downtime and no lost row. One module per role, plus the shared parts they use.

pub mod config;
pub mod flags;
pub mod kafka;
pub mod metrics;
pub mod offline;
pub mod route;
pub mod routing;
pub mod schema;
pub mod shutdown;
