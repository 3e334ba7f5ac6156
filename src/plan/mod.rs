//! `switchyard plan`: the sizing arithmetic for the topic and the consumers.
//! Disk is sized for today's rate over the retention; partitions and
//! consumer processes for the rate after growth (partitions are hard to add
//! later without reshuffling keys).

pub mod cli;
pub mod measure;

use serde::Serialize;

const KIB: f64 = 1024.0;
const MIB: f64 = KIB * KIB;
const TIB: f64 = MIB * MIB;

/// What the operator knows.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Inputs {
    pub events_per_second: f64,
    pub payload_bytes: f64,
    pub retention_days: f64,
    pub replication: u32,
    pub brokers: u32,
    /// Messages per second one consumer process handles on one partition
    /// (measure it: `cargo bench --bench pipelines`).
    pub consumer_throughput: f64,
    /// Expected traffic growth to size partitions for.
    pub growth: f64,
    /// The largest payload the topic must take.
    pub max_payload_bytes: u64,
}

/// What to provision.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Sizing {
    pub input_mib_per_second: f64,
    pub topic_tib: f64,
    pub replicated_tib: f64,
    pub disk_per_broker_tib: f64,
    pub future_events_per_second: f64,
    /// Disk per broker once the growth has happened.
    pub future_disk_per_broker_tib: f64,
    pub consumer_processes: u32,
    pub partitions: u32,
    /// Broker and topic settings, as `key = value`.
    pub settings: Vec<(String, String)>,
    /// Things that do not add up (fewer brokers than replicas, and so on).
    pub warnings: Vec<String>,
}

/// Why inputs cannot be sized.
#[derive(Debug, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct PlanError(pub String);

pub fn size(i: &Inputs) -> Result<Sizing, PlanError> {
    let positive = |name: &str, v: f64| {
        if v.is_finite() && v > 0.0 {
            Ok(())
        } else {
            Err(PlanError(format!("--{name} must be a positive number")))
        }
    };
    positive("events-per-second", i.events_per_second)?;
    positive("payload-bytes", i.payload_bytes)?;
    positive("retention-days", i.retention_days)?;
    positive("consumer-throughput", i.consumer_throughput)?;
    if !(i.growth.is_finite() && i.growth >= 1.0) {
        return Err(PlanError("--growth must be at least 1".into()));
    }
    if i.replication == 0 || i.brokers == 0 {
        return Err(PlanError(
            "--replication and --brokers must be at least 1".into(),
        ));
    }
    let bytes_per_second = i.events_per_second * i.payload_bytes;
    let retention_secs = i.retention_days * 86_400.0;
    let topic = bytes_per_second * retention_secs;
    let replicated = topic * f64::from(i.replication);
    let per_broker = replicated / f64::from(i.brokers);
    let future_eps = i.events_per_second * i.growth;
    let processes = (future_eps / i.consumer_throughput).ceil().max(1.0) as u32;
    // One partition per process at least, spread evenly over the brokers.
    let partitions = processes.max(i.brokers).div_ceil(i.brokers) * i.brokers;
    let mut warnings = Vec::new();
    if i.brokers < i.replication {
        warnings.push(format!(
            "{} brokers cannot hold {} replicas of each partition: add brokers",
            i.brokers, i.replication
        ));
    } else if i.brokers == i.replication {
        warnings.push(
            "as many brokers as replicas: losing one broker leaves partitions under-replicated"
                .into(),
        );
    }
    if i.replication < 3 {
        warnings.push("a replication factor below 3 is not recommended for production".into());
    }
    let min_isr = i.replication.saturating_sub(1).max(1);
    let message_max = (i.max_payload_bytes.saturating_mul(2)).max(1_048_576);
    let settings = vec![
        ("auto.create.topics.enable".into(), "false".into()),
        ("num.partitions (this topic)".into(), partitions.to_string()),
        (
            "default.replication.factor".into(),
            i.replication.to_string(),
        ),
        ("min.insync.replicas".into(), min_isr.to_string()),
        (
            "log.retention.hours".into(),
            format!("{}", (i.retention_days * 24.0).ceil() as u64),
        ),
        ("message.max.bytes".into(), message_max.to_string()),
        ("producer acks".into(), "all".into()),
        ("producer enable.idempotence".into(), "true".into()),
        ("producer message.max.bytes".into(), message_max.to_string()),
    ];
    Ok(Sizing {
        input_mib_per_second: bytes_per_second / MIB,
        topic_tib: topic / TIB,
        replicated_tib: replicated / TIB,
        disk_per_broker_tib: per_broker / TIB,
        future_events_per_second: future_eps,
        future_disk_per_broker_tib: per_broker * i.growth / TIB,
        consumer_processes: processes,
        partitions,
        settings,
        warnings,
    })
}

impl Sizing {
    /// The table a person reads.
    pub fn table(&self, i: &Inputs) -> String {
        let mut out = String::new();
        let mut line = |k: &str, v: String| out.push_str(&format!("{k:<34} {v}\n"));
        line(
            "input",
            format!(
                "{:.1} MiB/s ({} events/s × {} B)",
                self.input_mib_per_second, i.events_per_second, i.payload_bytes
            ),
        );
        line(
            "topic size over retention",
            format!("{:.2} TiB ({} days)", self.topic_tib, i.retention_days),
        );
        line(
            "with replication",
            format!("{:.2} TiB (×{})", self.replicated_tib, i.replication),
        );
        line(
            "disk per broker",
            format!(
                "{:.2} TiB ({} brokers)",
                self.disk_per_broker_tib, i.brokers
            ),
        );
        line(
            "after growth",
            format!(
                "{} events/s (×{}), {:.2} TiB per broker",
                self.future_events_per_second, i.growth, self.future_disk_per_broker_tib
            ),
        );
        line(
            "consumer processes",
            format!(
                "{} ({} events/s ÷ {} msgs/s each)",
                self.consumer_processes, self.future_events_per_second, i.consumer_throughput
            ),
        );
        line(
            "partitions",
            format!(
                "{} (≥ processes, a multiple of the brokers)",
                self.partitions
            ),
        );
        out.push_str("\nsettings\n");
        for (k, v) in &self.settings {
            out.push_str(&format!("  {k:<32} {v}\n"));
        }
        for w in &self.warnings {
            out.push_str(&format!("warning: {w}\n"));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seed() -> Inputs {
        Inputs {
            events_per_second: 10_000.0,
            payload_bytes: 2_500.0,
            retention_days: 7.0,
            replication: 3,
            brokers: 4,
            consumer_throughput: 2_650.0,
            growth: 2.0,
            max_payload_bytes: 262_144,
        }
    }

    #[test]
    fn the_seeds_example() {
        let s = size(&seed()).unwrap();
        // 10,000 events/s × 2.5 KB ≈ 24 MB/s; a week ≈ 13.7 TB; ×3 over 4 brokers ≈ 10.3 TB.
        assert!(
            (s.input_mib_per_second - 23.84).abs() < 0.01,
            "{}",
            s.input_mib_per_second
        );
        assert!((s.topic_tib - 13.75).abs() < 0.01, "{}", s.topic_tib);
        assert!(
            (s.disk_per_broker_tib - 10.31).abs() < 0.01,
            "{}",
            s.disk_per_broker_tib
        );
        // 20,000 events/s at 2,650 msgs/s per consumer → 7.5 → 8 processes.
        assert_eq!(s.future_events_per_second, 20_000.0);
        assert_eq!(s.consumer_processes, 8);
        assert_eq!(s.partitions, 8);
        assert!(s
            .settings
            .contains(&("min.insync.replicas".into(), "2".into())));
        assert!(s
            .settings
            .contains(&("log.retention.hours".into(), "168".into())));
        assert!(s
            .settings
            .contains(&("auto.create.topics.enable".into(), "false".into())));
        assert!(s.warnings.is_empty(), "{:?}", s.warnings);
    }

    #[test]
    fn partitions_spread_over_brokers_and_warnings() {
        let mut i = seed();
        i.growth = 1.0;
        i.brokers = 3;
        let s = size(&i).unwrap();
        assert_eq!(s.consumer_processes, 4);
        assert_eq!(s.partitions, 6, "4 processes on 3 brokers → 6");
        assert!(s.warnings.iter().any(|w| w.contains("under-replicated")));
        i.brokers = 2;
        assert!(size(&i)
            .unwrap()
            .warnings
            .iter()
            .any(|w| w.contains("cannot hold")));
        i.growth = 0.5;
        assert_eq!(size(&i).unwrap_err().0, "--growth must be at least 1");
        let mut j = seed();
        j.payload_bytes = 0.0;
        assert!(size(&j).unwrap_err().0.contains("--payload-bytes"));
    }
}
