//! How to reach Kafka: the same flags for every role that talks to it.

use std::process::ExitCode;

use clap::Args;

use crate::config::{parse_properties, parse_properties_file};

/// How to reach Kafka: the same two flags for every role that talks to it.
#[derive(Args, Clone)]
pub struct KafkaArgs {
    /// Kafka bootstrap servers.
    #[arg(
        long = "kafka-brokers",
        env = "SWITCHYARD_KAFKA_BROKERS",
        default_value = "127.0.0.1:9092"
    )]
    pub kafka_brokers: String,
    /// Any librdkafka property, key=value, repeatable: one property each,
    /// its value taken whole, commas included (the env variable: one
    /// property a line). SASL/TLS settings and secrets; never logged.
    #[arg(
        long = "kafka-config",
        env = "SWITCHYARD_KAFKA_CONFIG",
        hide_env_values = true,
        value_delimiter = '\n'
    )]
    pub kafka_config: Vec<String>,
    /// A properties file (`key=value` lines, `#` comments) of librdkafka
    /// properties, e.g. a mounted secret with the SASL credentials;
    /// `--kafka-config` entries win over it.
    #[arg(long = "kafka-config-file", env = "SWITCHYARD_KAFKA_CONFIG_FILE")]
    pub kafka_config_file: Option<std::path::PathBuf>,
}

impl KafkaArgs {
    /// The `--kafka-config-file` then `--kafka-config` properties (later
    /// wins), or the usage exit code.
    pub fn props(&self) -> Result<Vec<(String, String)>, ExitCode> {
        let mut props = match &self.kafka_config_file {
            Some(path) => {
                let text = crate::cli::secret_file("kafka-config-file", path)?;
                parse_properties_file(&text).map_err(|e| {
                    crate::cli::usage(format!("--kafka-config-file {}: {e}", path.display()))
                })?
            }
            None => Vec::new(),
        };
        props.extend(
            parse_properties(&self.kafka_config)
                .map_err(|e| crate::cli::usage(format!("--kafka-config: {e}")))?,
        );
        Ok(props)
    }
}
