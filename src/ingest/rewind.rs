//! `switchyard ingest --rewind-to`: a replay of the topic's retained data
//! into NEW. The consumer group's committed offsets are moved back (to a
//! time, through the broker's offsets-for-times lookup; to the earliest
//! retained message; or to given offsets) before the consumer joins its
//! group, and it consumes from there. The idempotent insert skips every row
//! NEW already has, so a replay only brings back what is missing.
//!
//! A rewind never moves a partition forward: it never skips a message the
//! group has not consumed yet (a target beyond where the group would start
//! keeps that partition where it is). It refuses while the group has active
//! members: their next commit would undo the move, or the move would undo
//! theirs.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::util::Timeout;
use rdkafka::{Offset, TopicPartitionList};

/// Where a rewind goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RewindTo {
    /// The earliest message each partition still holds.
    Earliest,
    /// The first message at or after this time (milliseconds since the epoch).
    Time(i64),
    /// Given offsets: (topic, or None for the only topic consumed; partition; offset).
    Offsets(Vec<(Option<String>, i32, i64)>),
}

/// Reads `earliest`, an RFC 3339 time (`2026-12-07T10:00:00Z`,
/// `2026-12-07T11:00:00+01:00`) or `partition:offset,…` (each optionally
/// `topic:partition:offset`).
pub fn parse(spec: &str) -> Result<RewindTo, String> {
    let s = spec.trim();
    if s.eq_ignore_ascii_case("earliest") {
        return Ok(RewindTo::Earliest);
    }
    match chrono::DateTime::parse_from_rfc3339(s) {
        Ok(t) => return Ok(RewindTo::Time(t.timestamp_millis())),
        // A date: a time meant, badly written.
        Err(e) if s.len() >= 5 && s[..4].bytes().all(|b| b.is_ascii_digit()) && s.as_bytes()[4] == b'-' => {
            return Err(format!(
                "--rewind-to {spec:?} is not an RFC 3339 time ({e}): write it as 2026-12-07T10:00:00Z or with an offset, 2026-12-07T11:00:00+01:00"
            ))
        }
        Err(_) => {}
    }
    let mut out = Vec::new();
    for item in s.split(',') {
        let item = item.trim();
        let parts: Vec<&str> = item.split(':').collect();
        let (topic, p, o) = match parts.as_slice() {
            [p, o] => (None, *p, *o),
            [t, p, o] if !t.is_empty() => (Some(t.to_string()), *p, *o),
            _ => {
                return Err(format!(
                    "--rewind-to {spec:?}: expected earliest, an RFC 3339 time \
                     (2026-12-07T10:00:00Z) or partition:offset,… (topic:partition:offset \
                     with several topics); {item:?} is none of them"
                ))
            }
        };
        let partition: i32 =
            p.parse().ok().filter(|p| *p >= 0).ok_or_else(|| {
                format!("--rewind-to: {p:?} in {item:?} is not a partition number")
            })?;
        let offset: i64 = o
            .parse()
            .ok()
            .filter(|o| *o >= 0)
            .ok_or_else(|| format!("--rewind-to: {o:?} in {item:?} is not an offset"))?;
        if out
            .iter()
            .any(|(t, q, _): &(Option<String>, i32, i64)| *t == topic && *q == partition)
        {
            return Err(format!("--rewind-to: partition {partition} is given twice"));
        }
        out.push((topic, partition, offset));
    }
    Ok(RewindTo::Offsets(out))
}

/// One partition's move.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    pub topic: String,
    pub partition: i32,
    /// The committed offset before, if the group had one.
    pub from: Option<i64>,
    /// Where the group resumes.
    pub to: i64,
    /// The target was beyond where the group would start: kept there.
    pub kept: bool,
}

impl std::fmt::Display for Move {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let from = self.from.map_or_else(
            || "none (start of the partition)".to_string(),
            |o| o.to_string(),
        );
        write!(
            f,
            "{}/{}: committed {from} → {}",
            self.topic, self.partition, self.to
        )?;
        if self.kept {
            write!(
                f,
                " (kept: the target is after it, and a rewind never skips a message)"
            )?;
        }
        Ok(())
    }
}

/// Where one partition resumes: the target, or where the group would start
/// anyway (its committed offset, else the earliest retained message) if
/// that is before the target. Never before the earliest retained message.
pub fn resume_at(target: i64, committed: Option<i64>, low: i64) -> (i64, bool) {
    let start = committed.filter(|c| *c >= 0).unwrap_or(low).max(low);
    let target = target.max(low);
    if target > start {
        (start, true)
    } else {
        (target, false)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RewindError {
    #[error(
        "the consumer group {group:?} has {} active member(s) ({}): stop every ingest \
         of the group before rewinding it, since their commits and the rewind would undo each other",
        .members.len(), .members.join(", ")
    )]
    GroupActive { group: String, members: Vec<String> },
    #[error("--rewind-to: {0}")]
    Target(String),
    #[error("the rewind did not complete: {0}")]
    Interrupted(String),
    #[error("cannot rewind: {what}: {source}")]
    Kafka {
        what: String,
        #[source]
        source: KafkaError,
    },
}

fn kafka(what: impl Into<String>) -> impl FnOnce(KafkaError) -> RewindError {
    move |source| RewindError::Kafka {
        what: what.into(),
        source,
    }
}

const TIMEOUT: Duration = Duration::from_secs(15);

/// Moves the committed offsets of `group` on `topics` to `to` and returns
/// the moves, each partition in order. Blocking (run it off the runtime).
pub fn rewind<C: rdkafka::consumer::ConsumerContext>(
    consumer: &BaseConsumer<C>,
    group: &str,
    topics: &[String],
    to: &RewindTo,
) -> Result<Vec<Move>, RewindError> {
    let timeout = Timeout::After(TIMEOUT);
    let groups = consumer
        .fetch_group_list(Some(group), timeout)
        .map_err(kafka(format!("describing the consumer group {group:?}")))?;
    for g in groups.groups() {
        if g.name() == group && !g.members().is_empty() {
            let members = g
                .members()
                .iter()
                .map(|m| format!("{} at {}", m.client_id(), m.client_host()))
                .collect();
            return Err(RewindError::GroupActive {
                group: group.to_string(),
                members,
            });
        }
    }
    // Every partition of the topics, with its watermarks and committed offset.
    let md = consumer
        .fetch_metadata(None, timeout)
        .map_err(kafka("reading the topics' partitions"))?;
    let mut all = TopicPartitionList::new();
    for t in topics {
        let Some(mt) = md.topics().iter().find(|m| m.name() == t) else {
            return Err(RewindError::Target(format!("topic {t:?} does not exist")));
        };
        for p in mt.partitions() {
            all.add_partition(t, p.id());
        }
    }
    if all.count() == 0 {
        return Err(RewindError::Target("the topics have no partitions".into()));
    }
    let committed = consumer
        .committed_offsets(all.clone(), timeout)
        .map_err(kafka("reading the group's committed offsets"))?;
    let committed_of = |t: &str, p: i32| {
        committed
            .find_partition(t, p)
            .and_then(|e| match e.offset() {
                Offset::Offset(o) if o >= 0 => Some(o),
                _ => None,
            })
    };
    let mut marks = BTreeMap::new();
    for e in all.elements() {
        let (low, high) = consumer
            .fetch_watermarks(e.topic(), e.partition(), timeout)
            .map_err(kafka(format!(
                "reading the watermarks of {}/{}",
                e.topic(),
                e.partition()
            )))?;
        marks.insert((e.topic().to_string(), e.partition()), (low, high));
    }
    let targets = targets(consumer, &all, &marks, topics, to)?;
    let mut moves = Vec::new();
    let mut commit = TopicPartitionList::new();
    for ((topic, partition), target) in &targets {
        let (low, _) = marks[&(topic.clone(), *partition)];
        let from = committed_of(topic, *partition);
        let (at, kept) = resume_at(*target, from, low);
        if from != Some(at) {
            commit
                .add_partition_offset(topic, *partition, Offset::Offset(at))
                .map_err(kafka("building the offsets to commit"))?;
        }
        moves.push(Move {
            topic: topic.clone(),
            partition: *partition,
            from,
            to: at,
            kept,
        });
    }
    if commit.count() > 0 {
        // Not a member of the group: a commit outside any generation, which
        // the coordinator accepts only while the group is empty.
        consumer
            .commit(&commit, CommitMode::Sync)
            .map_err(kafka(format!(
                "committing the new offsets of the group {group:?}"
            )))?;
    }
    Ok(moves)
}

/// The target offset of every partition.
fn targets<C: rdkafka::consumer::ConsumerContext>(
    consumer: &BaseConsumer<C>,
    all: &TopicPartitionList,
    marks: &BTreeMap<(String, i32), (i64, i64)>,
    topics: &[String],
    to: &RewindTo,
) -> Result<BTreeMap<(String, i32), i64>, RewindError> {
    let mut out = BTreeMap::new();
    match to {
        RewindTo::Earliest => {
            for (k, (low, _)) in marks {
                out.insert(k.clone(), *low);
            }
        }
        RewindTo::Time(ms) => {
            let mut q = TopicPartitionList::new();
            for e in all.elements() {
                q.add_partition_offset(e.topic(), e.partition(), Offset::Offset(*ms))
                    .map_err(kafka("building the time lookup"))?;
            }
            let found = consumer
                .offsets_for_times(q, Timeout::After(TIMEOUT))
                .map_err(kafka(
                    "looking the time up in the broker's offsets-for-times",
                ))?;
            for e in found.elements() {
                let key = (e.topic().to_string(), e.partition());
                let (_, high) = marks.get(&key).copied().unwrap_or((0, 0));
                let at = match e.offset() {
                    Offset::Offset(o) if o >= 0 => o.min(high),
                    // No message at or after the time: the end.
                    Offset::End => high,
                    other => {
                        return Err(RewindError::Target(format!(
                            "the broker answered {other:?} for {}/{}",
                            key.0, key.1
                        )))
                    }
                };
                out.insert(key, at);
            }
        }
        RewindTo::Offsets(given) => {
            for (topic, partition, offset) in given {
                let topic = match (topic, topics) {
                    (Some(t), _) => t.clone(),
                    (None, [only]) => only.clone(),
                    (None, _) => {
                        return Err(RewindError::Target(format!(
                            "several topics are consumed: name the topic of partition {partition} (topic:partition:offset)"
                        )))
                    }
                };
                let key = (topic.clone(), *partition);
                let Some((low, high)) = marks.get(&key).copied() else {
                    return Err(RewindError::Target(format!(
                        "{topic}/{partition} is not a partition of the topics consumed"
                    )));
                };
                if *offset < low || *offset > high {
                    return Err(RewindError::Target(format!(
                        "offset {offset} of {topic}/{partition} is outside what it holds, {low} to {high}"
                    )));
                }
                out.insert(key, *offset);
            }
        }
    }
    Ok(out)
}

/// Rewinds the group of `opts` on its topics, with a consumer of its own
/// that never joins the group (so it cannot take partitions from anyone).
pub async fn rewind_group(
    opts: &super::IngestOptions,
    to: &RewindTo,
) -> Result<Vec<Move>, RewindError> {
    crate::kafka::keeps_consumer_guarantees(&opts.extra).map_err(RewindError::Target)?;
    let consumer: BaseConsumer<crate::kafka::QuietContext> = super::client_config(opts)
        .set("statistics.interval.ms", "0")
        .create_with_context(crate::kafka::QuietContext::default())
        .map_err(kafka("creating the consumer"))?;
    let (group, topics, to) = (opts.group.clone(), opts.topics.clone(), to.clone());
    tokio::task::spawn_blocking(move || rewind(&consumer, &group, &topics, &to))
        .await
        .map_err(|e| RewindError::Interrupted(e.to_string()))?
}

impl RewindError {
    /// A mistake of the command line or the credentials (exit 2), not an outage.
    pub fn is_config(&self) -> bool {
        match self {
            RewindError::Target(_) => true,
            RewindError::Kafka { source, .. } => {
                crate::kafka::is_refusal(source) || matches!(source, KafkaError::ClientCreation(_))
            }
            RewindError::GroupActive { .. } | RewindError::Interrupted(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_read_in_every_form() {
        assert_eq!(parse("earliest"), Ok(RewindTo::Earliest));
        assert_eq!(parse(" EARLIEST "), Ok(RewindTo::Earliest));
        assert_eq!(
            parse("2026-12-07T10:00:00Z"),
            Ok(RewindTo::Time(1_796_637_600_000))
        );
        assert_eq!(
            parse("2026-12-07T11:00:00.250+01:00"),
            Ok(RewindTo::Time(1_796_637_600_250))
        );
        assert_eq!(
            parse("0:10,1:20"),
            Ok(RewindTo::Offsets(vec![(None, 0, 10), (None, 1, 20)]))
        );
        assert_eq!(
            parse("events.v1:3:7"),
            Ok(RewindTo::Offsets(vec![(Some("events.v1".into()), 3, 7)]))
        );
    }

    #[test]
    fn bad_targets_are_named() {
        for (bad, says) in [
            ("yesterday", "none of them"),
            ("2026-12-07 10:00", "not an RFC 3339 time"),
            ("2026-12-07", "not an RFC 3339 time"),
            ("0:-1", "not an offset"),
            ("x:1", "not a partition"),
            ("0:1,0:2", "given twice"),
            ("", "none of them"),
            ("1:2:3:4", "none of them"),
        ] {
            let e = parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad:?}: {e}");
        }
    }

    #[test]
    fn a_rewind_never_skips_what_the_group_has_not_consumed() {
        // Back from the committed offset.
        assert_eq!(resume_at(40, Some(100), 0), (40, false));
        // A target after it keeps the committed offset.
        assert_eq!(resume_at(150, Some(100), 0), (100, true));
        // No committed offset: the group starts at the earliest anyway.
        assert_eq!(resume_at(50, None, 10), (10, true));
        assert_eq!(resume_at(10, None, 10), (10, false));
        // Never before what the partition still holds.
        assert_eq!(resume_at(0, Some(100), 30), (30, false));
        // A committed offset older than retention starts at the earliest.
        assert_eq!(resume_at(50, Some(5), 30), (30, true));
    }
}
