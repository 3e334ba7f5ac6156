//! `switchyard plan`: its command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use super::measure::{self as m, Consumed, Produced};

use crate::cli::{config, exit, failure, runtime, usage, Exit};
use crate::db::args::DbArgs;
use crate::kafka::args::KafkaArgs;

#[derive(Args)]
pub struct PlanArgs {
    /// Incoming events per second today.
    #[arg(long)]
    events_per_second: f64,
    /// Average payload size in bytes (with --measure: of the payloads produced).
    #[arg(long, default_value_t = 2500.0)]
    payload_bytes: f64,
    /// How long the topic keeps messages, in days.
    #[arg(long, default_value_t = 7.0)]
    retention_days: f64,
    /// Replication factor.
    #[arg(long, default_value_t = 3)]
    replication: u32,
    /// Number of brokers.
    #[arg(long)]
    brokers: u32,
    /// Messages per second one consumer handles on one partition (or
    /// --measure it).
    #[arg(long, required_unless_present = "measure", conflicts_with = "measure")]
    consumer_throughput: Option<f64>,
    /// Traffic growth to size partitions and consumers for.
    #[arg(long, default_value_t = 2.0)]
    growth: f64,
    /// Largest payload the topic must take (default: the largest table's max_row_bytes).
    #[arg(long)]
    max_payload_bytes: Option<u64>,
    /// Pipeline configuration (TOML), for the default largest payload.
    #[arg(long, env = "SWITCHYARD_CONFIG")]
    config: Option<PathBuf>,
    /// Print JSON for scripts.
    #[arg(long)]
    json: bool,
    /// Measure the consumer throughput on this broker and database: a
    /// throwaway one-partition topic and table are created, --messages
    /// payloads produced with the router's producer and consumed by the
    /// ingest path once per batch size, then both are removed.
    #[arg(long)]
    measure: bool,
    #[command(flatten)]
    kafka: KafkaArgs,
    #[command(flatten)]
    db: DbArgs,
    /// With --measure: the batch sizes to consume with, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1000,2000,5000")]
    batch_sizes: Vec<usize>,
    /// With --measure: payloads produced (and consumed at each batch size).
    #[arg(long, default_value_t = 20_000)]
    messages: u64,
    /// With --measure: the declared table whose shape the payloads have
    /// (default: the first).
    #[arg(long)]
    table: Option<String>,
}

pub fn main(args: PlanArgs) -> ExitCode {
    exit(run(args))
}

fn run(args: PlanArgs) -> Exit {
    let cfg = config(args.config.as_deref())?;
    let max_payload = match args.max_payload_bytes {
        Some(m) => m,
        None => cfg
            .tables
            .iter()
            .map(|t| t.max_row_bytes as u64)
            .max()
            .unwrap_or(262_144),
    };
    let measured = if args.measure {
        Some(measure(&args, &cfg)?)
    } else {
        None
    };
    let consumer_throughput = match (&measured, args.consumer_throughput) {
        (Some(m), _) => m.best.msgs_per_sec,
        (None, Some(t)) => t,
        (None, None) => return Err(usage("plan: give --consumer-throughput or --measure")),
    };
    let inputs = crate::plan::Inputs {
        events_per_second: args.events_per_second,
        payload_bytes: args.payload_bytes,
        retention_days: args.retention_days,
        replication: args.replication,
        brokers: args.brokers,
        consumer_throughput,
        growth: args.growth,
        max_payload_bytes: max_payload,
    };
    let s = crate::plan::size(&inputs).map_err(|e| usage(format!("plan: {e}")))?;
    if args.json {
        println!(
            "{}",
            serde_json::json!({"inputs": inputs, "sizing": s, "measured": measured})
        );
    } else {
        if let Some(m) = &measured {
            print!("{}", m.table());
            println!();
        }
        print!("{}", s.table(&inputs));
    }
    Ok(ExitCode::SUCCESS)
}

/// What `--measure` found.
#[derive(serde::Serialize)]
struct Measured {
    topic: String,
    table: String,
    payload_bytes: usize,
    produce: Produced,
    consume: Vec<Consumed>,
    /// The fastest batch size: the sizing uses its rate.
    best: Consumed,
}

impl Measured {
    fn table(&self) -> String {
        let mut out = format!(
            "measured: {} payloads of {} B, one partition ({}), into {}\n",
            self.produce.messages, self.payload_bytes, self.topic, self.table
        );
        out.push_str(&format!(
            "produce  {:>8} msgs in {:>6.2} s  {:>8.0} msgs/s  (the router's producer)\n",
            self.produce.messages, self.produce.seconds, self.produce.msgs_per_sec
        ));
        out.push_str("batch size  messages   seconds   consumer\n");
        for c in &self.consume {
            out.push_str(&format!(
                "{:<10} {:>9} {:>9.2}   {:.0} msgs/s\n",
                c.batch_size, c.messages, c.seconds, c.msgs_per_sec
            ));
        }
        out.push_str(&format!(
            "best: batch size {} at {:.0} msgs/s per partition (the sizing below uses it)\n",
            self.best.batch_size, self.best.msgs_per_sec
        ));
        out
    }
}

fn measure(args: &PlanArgs, cfg: &crate::config::PipelineConfig) -> Result<Measured, ExitCode> {
    if args.batch_sizes.is_empty() || args.batch_sizes.contains(&0) {
        return Err(usage("plan: --batch-sizes must be positive numbers"));
    }
    if args.messages == 0 {
        return Err(usage("plan: --messages must be at least 1"));
    }
    if !(args.payload_bytes.is_finite() && args.payload_bytes >= 1.0) {
        return Err(usage("plan: --payload-bytes must be a positive number"));
    }
    let declared = match &args.table {
        Some(name) => cfg
            .tables
            .iter()
            .find(|t| &t.name == name)
            .ok_or_else(|| usage(format!("plan: --table {name:?} is not declared")))?,
        None => cfg
            .tables
            .first()
            .ok_or_else(|| usage("plan: no table is declared"))?,
    };
    let name = m::throwaway_name();
    let schema = crate::schema::Schema::from_config(&[m::renamed(declared, &name)])
        .map_err(|e| usage(format!("plan: schema: {e}")))?;
    let extra = args.kafka.props()?;
    crate::kafka::keeps_consumer_guarantees(&extra).map_err(|e| usage(format!("plan: {e}")))?;
    let url = args.db.url(crate::db::Engine::Postgres)?;
    let rt = runtime()?;
    let _enter = rt.enter();
    let db = crate::db::Db::connect(&url, 2).map_err(|e| usage(format!("plan: {e}")))?;
    let brokers = args.kafka.kafka_brokers.as_str();
    let target = m::Target {
        brokers,
        extra: &extra,
        topic: &name,
        schema: &schema,
    };
    let res = rt.block_on(async {
        let r = measure_on(args, cfg, &target, &db).await;
        db.close().await;
        r
    });
    res.map_err(|e| match e {
        m::MeasureError::Refused(_) => usage(format!("plan: {e}")),
        m::MeasureError::Db(ref d) if d.is_config() => usage(format!("plan: {e}")),
        e => failure(format!("plan: {e}")),
    })
}

/// Creates the topic and table, measures, and removes what it created
/// whatever the outcome.
async fn measure_on(
    args: &PlanArgs,
    cfg: &crate::config::PipelineConfig,
    target: &m::Target<'_>,
    db: &crate::db::Db,
) -> Result<Measured, m::MeasureError> {
    let table = &target.schema.tables()[0];
    eprintln!("plan: creating the topic {} (one partition)", target.topic);
    m::create_topic(target.brokers, target.extra, target.topic).await?;
    let mut groups = Vec::new();
    let res: Result<Measured, m::MeasureError> = async {
        eprintln!("plan: creating the table {}", table.name);
        m::create_table(db, table).await?;
        let res = measured(args, cfg, target, db, &mut groups).await;
        eprintln!("plan: removing the table {}", table.name);
        let dropped = m::remove_table(db, &table.name).await;
        let out = res?;
        dropped?;
        Ok(out)
    }
    .await;
    eprintln!("plan: removing the topic {}", target.topic);
    let removed = m::remove_topic(target.brokers, target.extra, target.topic, &groups).await;
    let out = res?;
    removed?;
    Ok(out)
}

async fn measured(
    args: &PlanArgs,
    cfg: &crate::config::PipelineConfig,
    target: &m::Target<'_>,
    db: &crate::db::Db,
    groups: &mut Vec<String>,
) -> Result<Measured, m::MeasureError> {
    let table = &target.schema.tables()[0];
    let payload_bytes = args.payload_bytes as usize;
    let total = args.messages;
    let mut shown = 0u64;
    let produce = m::produce(target, &cfg.kafka, total, payload_bytes, &mut |acked| {
        if acked == total || acked >= shown + total / 10 {
            shown = acked;
            eprintln!("plan: produced {acked} of {total}");
        }
    })
    .await?;
    eprintln!(
        "plan: produced {} payloads in {:.2} s ({:.0} msgs/s)",
        produce.messages, produce.seconds, produce.msgs_per_sec
    );
    let mut consume = Vec::new();
    for &batch in &args.batch_sizes {
        db.empty_table(&table.name).await?;
        let group = format!("{}_{batch}_{}", target.topic, consume.len());
        groups.push(group.clone());
        eprintln!("plan: consuming with batch size {batch}");
        let c = m::consume(target, &group, db, batch, total).await?;
        eprintln!(
            "plan: batch size {batch}: {} msgs in {:.2} s, {:.0} msgs/s",
            c.messages, c.seconds, c.msgs_per_sec
        );
        consume.push(c);
    }
    let best = consume
        .iter()
        .max_by(|a, b| a.msgs_per_sec.total_cmp(&b.msgs_per_sec))
        .cloned()
        .ok_or_else(|| m::MeasureError::Incomplete("no batch size measured".into()))?;
    Ok(Measured {
        topic: target.topic.to_string(),
        table: table.name.clone(),
        payload_bytes,
        produce,
        consume,
        best,
    })
}
