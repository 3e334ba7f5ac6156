//! Several comparators sharing one topic (`compare --scale-out`): they join
//! one Kafka consumer group, which splits the partitions between them; each
//! reads its partitions from their beginning, checks the windows of what it
//! read as a lone comparator would, and writes its partial report of every
//! window, with the partitions it has read in full, to bookkeeping tables
//! in NEW. Every member reads the others' partials back and serves the
//! combined verdict on `/parity`: the database is the only coordination
//! point. A window is combined from every live member's partial; it is ok
//! only when the live members have read every partition of the topic in
//! full, each partition by exactly one of them, otherwise at best pending.
//!
//! A rebalance makes a member forget everything and read its new partitions
//! from their beginning (it never commits an offset), so a partition handed
//! over by a member that died is read again in full by its next owner, and
//! verdicts stay exact. The eager rebalance protocol is required: the
//! cooperative one would hand over partitions without revoking the rest.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::report::{self, Parity, WindowReport};
use super::state::{AckError, Checked, Status};
use super::{now_unix, Comparator, CompareError};
use crate::db::partials::{AckRow, MemberRow};
use crate::db::DbError;
use crate::kafka::QuietContext;

/// How a member of a group runs.
#[derive(Debug, Clone)]
pub struct GroupOptions {
    /// This member's name in the bookkeeping tables (unique in the group).
    pub instance: String,
    /// A member silent for this long no longer counts (crashed).
    pub member_timeout: Duration,
}

/// What a member reads, as it writes it to the bookkeeping table.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberState {
    /// Partitions of the topic (0: not known yet).
    pub partitions: usize,
    /// Partitions the group gave it.
    pub assigned: Vec<i32>,
    /// Those of them it has read from their beginning to where they ended
    /// when it got them: its reports hold all of their rows.
    pub covered: Vec<i32>,
}

/// How far a member has read one of its partitions.
#[derive(Debug, Clone, Copy, Default)]
struct Catch {
    /// The partition's (low, high) watermarks when it was assigned.
    marks: Option<(i64, i64)>,
    /// The first offset read, and the offset after the last one.
    first: Option<i64>,
    next: Option<i64>,
}

impl Catch {
    fn covered(&self) -> bool {
        match self.marks {
            None => false,
            // Read from the beginning (not from an offset someone committed
            // for the group) to where the partition ended when it came.
            Some((low, high)) => {
                high <= low
                    || (self.first.is_some_and(|f| f <= low)
                        && self.next.is_some_and(|n| n >= high))
            }
        }
    }
}

/// This member's partitions and how far it has read each.
#[derive(Debug, Default)]
pub struct Coverage {
    partitions: usize,
    parts: BTreeMap<i32, Catch>,
}

impl Coverage {
    /// The group gave it `parts` (it reads each from its beginning).
    pub fn assign(&mut self, parts: &[i32]) {
        self.parts = parts.iter().map(|p| (*p, Catch::default())).collect();
    }

    /// The group took its partitions back.
    pub fn revoke(&mut self) {
        self.parts.clear();
    }

    pub fn set_partitions(&mut self, n: usize) {
        self.partitions = n;
    }

    /// Where `partition` ended when it was assigned.
    pub fn marks(&mut self, partition: i32, low: i64, high: i64) {
        if let Some(c) = self.parts.get_mut(&partition) {
            c.marks = Some((low, high));
        }
    }

    pub fn owns(&self, partition: i32) -> bool {
        self.parts.contains_key(&partition)
    }

    /// A message at `offset` of `partition` was read.
    pub fn seen(&mut self, partition: i32, offset: i64) {
        if let Some(c) = self.parts.get_mut(&partition) {
            c.first = Some(c.first.unwrap_or(offset).min(offset));
            c.next = Some(c.next.unwrap_or(0).max(offset + 1));
        }
    }

    /// Assigned partitions whose end is not known yet.
    pub fn unmeasured(&self) -> Vec<i32> {
        self.parts
            .iter()
            .filter(|(_, c)| c.marks.is_none())
            .map(|(p, _)| *p)
            .collect()
    }

    pub fn state(&self) -> MemberState {
        MemberState {
            partitions: self.partitions,
            assigned: self.parts.keys().copied().collect(),
            covered: self
                .parts
                .iter()
                .filter(|(_, c)| c.covered())
                .map(|(p, _)| *p)
                .collect(),
        }
    }
}

/// A live member, as read back from the bookkeeping table.
#[derive(Debug, Clone)]
pub struct Member {
    pub instance: String,
    pub state: MemberState,
}

/// The group as the combined report sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupView {
    /// Live members (written within the member timeout).
    pub members: Vec<String>,
    /// Partitions of the topic.
    pub partitions: usize,
    /// Partitions read in full by exactly one live member.
    pub covered: usize,
    /// Every partition covered, none twice: the combined verdicts are exact.
    pub complete: bool,
    /// Why not, in words.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// Who covers what: complete when every partition of the topic is read in
/// full by exactly one live member.
pub fn view_of(members: &[Member]) -> GroupView {
    let partitions = members
        .iter()
        .map(|m| m.state.partitions)
        .max()
        .unwrap_or(0);
    let mut by: HashMap<i32, usize> = HashMap::new();
    let mut claims: HashMap<i32, usize> = HashMap::new();
    for m in members {
        for p in &m.state.covered {
            *by.entry(*p).or_default() += 1;
        }
        // A partition one member has read and another is reading again
        // (the first stopped answering and the group gave it to the
        // second): the first's reports of it are not current.
        let mine: BTreeSet<i32> = m
            .state
            .assigned
            .iter()
            .chain(&m.state.covered)
            .copied()
            .collect();
        for p in mine {
            *claims.entry(p).or_default() += 1;
        }
    }
    let twice: BTreeSet<i32> = claims
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(p, _)| *p)
        .collect();
    let once: BTreeSet<i32> = by
        .iter()
        .filter(|(_, n)| **n == 1)
        .map(|(p, _)| *p)
        .collect();
    let missing: Vec<i32> = (0..partitions as i32)
        .filter(|p| !by.contains_key(p))
        .collect();
    let problem = if members.is_empty() {
        Some("no live member".to_string())
    } else if partitions == 0 {
        Some("the topic's partitions are not known yet".to_string())
    } else if !twice.is_empty() {
        Some(format!(
            "partitions {twice:?} are claimed by two members (a rebalance in progress)"
        ))
    } else if !missing.is_empty() {
        Some(format!(
            "partitions {missing:?} are not read in full by a live member yet"
        ))
    } else {
        None
    };
    let mut names: Vec<String> = members.iter().map(|m| m.instance.clone()).collect();
    names.sort();
    GroupView {
        members: names,
        partitions,
        covered: once.len(),
        complete: problem.is_none(),
        problem,
    }
}

/// How bad a partial verdict is when combining: a mismatch outweighs a
/// pending window, which outweighs one not checked yet, which outweighs ok.
fn weight(s: Status) -> u8 {
    match s {
        Status::Ok => 0,
        Status::Open => 1,
        Status::Pending => 2,
        Status::Mismatch => 3,
    }
}

fn merge_ids(into: &mut Vec<String>, from: &[String], max_ids: usize) {
    into.extend(from.iter().cloned());
    into.sort();
    into.dedup();
    into.truncate(max_ids);
}

/// The sum of two partial checks of one window.
fn merge_checked(a: &mut Checked, b: &Checked, max_ids: usize) {
    a.expected_old += b.expected_old;
    a.expected_new += b.expected_new;
    a.found_old += b.found_old;
    a.found_new += b.found_new;
    a.missing_old += b.missing_old;
    a.missing_new += b.missing_new;
    a.differs_old += b.differs_old;
    a.differs_new += b.differs_new;
    // Each member scanned the whole window: the rows nobody announced are
    // what the largest scan holds beyond every member's found rows.
    a.scanned_new = a.scanned_new.max(b.scanned_new);
    a.unexplained |= b.unexplained;
    merge_ids(&mut a.missing_ids_old, &b.missing_ids_old, max_ids);
    merge_ids(&mut a.missing_ids_new, &b.missing_ids_new, max_ids);
    merge_ids(&mut a.differing_ids_old, &b.differing_ids_old, max_ids);
    merge_ids(&mut a.differing_ids_new, &b.differing_ids_new, max_ids);
    let mut groups: HashMap<String, usize> = a.worst_groups.drain(..).collect();
    for (g, n) in &b.worst_groups {
        *groups.entry(g.clone()).or_default() += n;
    }
    let mut groups: Vec<(String, usize)> = groups.into_iter().collect();
    groups.sort_by(|x, y| y.1.cmp(&x.1).then_with(|| x.0.cmp(&y.0)));
    groups.truncate(5);
    a.worst_groups = groups;
    a.at = a.at.min(b.at);
}

/// Combines the live members' partial reports window by window. A
/// mismatch someone acknowledged counts only when no other partial of the
/// window is worse than ok or open. An incomplete group is at best pending,
/// and so is a window that became due after `fresh` (the oldest live
/// member's last report): a member that has not reported since cannot
/// vouch for its partitions' rows of it.
pub fn merge(
    partials: Vec<(String, WindowReport)>,
    complete: bool,
    fresh: f64,
    max_ids: usize,
) -> Vec<(String, WindowReport)> {
    let mut by: BTreeMap<(String, i64), Vec<WindowReport>> = BTreeMap::new();
    for (table, r) in partials {
        by.entry((table, r.start)).or_default().push(r);
    }
    by.into_iter()
        .filter_map(|((table, _), parts)| {
            let mut parts = parts.into_iter();
            let mut w = parts.next()?;
            let mut worst = if w.acked.is_some() {
                0
            } else {
                weight(w.status)
            };
            let mut acked = w.acked.take();
            let mut acked_mismatch = acked.is_some();
            for p in parts {
                w.rows += p.rows;
                w.first_arrival = w.first_arrival.min(p.first_arrival);
                w.last_arrival = w.last_arrival.max(p.last_arrival);
                w.due = match (w.due, p.due) {
                    (Some(a), Some(b)) => Some(a.max(b)),
                    (a, b) => a.or(b),
                };
                match (&mut w.check, &p.check) {
                    (Some(a), Some(b)) => merge_checked(a, b, max_ids),
                    (None, Some(b)) => w.check = Some(b.clone()),
                    _ => {}
                }
                if p.acked.is_some() {
                    acked_mismatch = true;
                    acked = acked.or(p.acked);
                } else {
                    worst = worst.max(weight(p.status));
                }
            }
            if let Some(c) = &mut w.check {
                c.extra_new = (c.scanned_new as i64 - c.found_new as i64).max(0);
            }
            let mut status = match worst {
                0 => Status::Ok,
                1 => Status::Open,
                2 => Status::Pending,
                _ => Status::Mismatch,
            };
            if acked_mismatch && worst <= 1 {
                status = Status::Mismatch;
                w.acked = acked;
            }
            let stale = w.due.is_none_or(|d| d > fresh);
            if (!complete || stale) && status == Status::Ok {
                status = Status::Pending;
            }
            w.status = status;
            Some((table, w))
        })
        .collect()
}

/// A member's shared state: its partitions, and the group's last combined view.
pub struct GroupState {
    pub opts: GroupOptions,
    coverage: Mutex<Coverage>,
    /// Bumped at each rebalance.
    epoch: AtomicU64,
    /// The combined windows (newest last) and the group, as last read.
    combined: RwLock<(Vec<(String, WindowReport)>, GroupView)>,
    /// One publication at a time (the timer's and an acknowledgement's).
    publishing: tokio::sync::Mutex<()>,
}

impl GroupState {
    pub fn new(opts: GroupOptions) -> GroupState {
        GroupState {
            opts,
            coverage: Mutex::new(Coverage::default()),
            epoch: AtomicU64::new(0),
            combined: RwLock::new((Vec::new(), GroupView::default())),
            publishing: tokio::sync::Mutex::new(()),
        }
    }

    fn coverage(&self) -> std::sync::MutexGuard<'_, Coverage> {
        self.coverage.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The group consumer's callbacks: a rebalance makes the member forget
/// everything and read its new partitions from their beginning.
pub struct GroupContext {
    quiet: QuietContext,
    cmp: Arc<Comparator>,
    group: Arc<GroupState>,
}

impl ClientContext for GroupContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        self.quiet.log(level, fac, log_message)
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.quiet.error(error, reason)
    }
}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            tracing::info!(partitions = tpl.count(), "comparator partitions revoked");
            self.cmp.reassign(&self.group, None);
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let parts: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
                // From the beginning, whatever offsets the group may hold
                // (a partition counts as read in full only if its reading
                // starts at its low watermark).
                let mut from = TopicPartitionList::new();
                for e in tpl.elements() {
                    let _ = from.add_partition_offset(e.topic(), e.partition(), Offset::Beginning);
                }
                if let Err(e) = consumer.assign(&from) {
                    tracing::warn!(error = %e, "could not read the assigned partitions from their beginning");
                }
                tracing::info!(partitions = ?parts, "comparator partitions assigned; reading them from their beginning");
                self.cmp.reassign(&self.group, Some(&parts));
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "comparator rebalance error"),
            Rebalance::Revoke(_) => {}
        }
    }
}

fn millis(t: f64) -> i64 {
    (t * 1000.0) as i64
}

impl Comparator {
    /// Forgets every window and takes `parts` (None: none) as this member's
    /// partitions; the windows' lock first, as [`Comparator::publish_group`]
    /// takes them, so no partial pairs old windows with new partitions.
    fn reassign(&self, g: &GroupState, parts: Option<&[i32]>) {
        let mut ws = self.windows();
        ws.clear();
        let mut cov = g.coverage();
        match parts {
            Some(p) => cov.assign(p),
            None => cov.revoke(),
        }
        g.epoch.fetch_add(1, Ordering::SeqCst);
    }

    /// Writes this member's partial reports and heartbeat, reads every live
    /// member's back, applies the group's acknowledgements here, and makes
    /// the combination the report `/parity` serves and the gauges show.
    pub(super) async fn publish_group(&self, g: &GroupState) -> Result<(), DbError> {
        let _one = g.publishing.lock().await;
        let now = now_unix();
        let settle = self.opts.settle.as_secs_f64();
        let (mine, state) = {
            let ws = self.windows();
            let cov = g.coverage();
            (report::reports(&ws, settle), cov.state())
        };
        let rows: Vec<(String, i64, String)> = mine
            .iter()
            .filter_map(|(t, r)| Some((t.clone(), r.start, serde_json::to_string(r).ok()?)))
            .collect();
        let member = MemberRow {
            instance: g.opts.instance.clone(),
            state: serde_json::to_string(&state).unwrap_or_default(),
            seen_at_ms: millis(now),
        };
        let group = &self.opts.group;
        self.new.publish_member(group, &member, &rows).await?;
        let timeout = g.opts.member_timeout.as_secs_f64();
        // Long gone members leave no rows behind; the recently silent are
        // only left out of the combination.
        self.new
            .forget_members(group, millis(now - 10.0 * timeout), None)
            .await?;
        self.new
            .forget_acks(group, millis(now - self.opts.retain.as_secs_f64()))
            .await?;
        let all = self.new.read_group(group).await?;
        let live_rows: Vec<&MemberRow> = all
            .members
            .iter()
            .filter(|m| m.seen_at_ms as f64 >= (now - timeout) * 1000.0)
            .collect();
        // A member whose state cannot be read covers nothing: the view is
        // then incomplete, never ok.
        let members: Vec<Member> = live_rows
            .iter()
            .filter_map(|m| {
                Some(Member {
                    instance: m.instance.clone(),
                    state: serde_json::from_str(&m.state).ok()?,
                })
            })
            .collect();
        let fresh = live_rows
            .iter()
            .map(|m| m.seen_at_ms as f64 / 1000.0)
            .fold(f64::INFINITY, f64::min);
        let mut view = view_of(&members);
        let live: HashSet<&str> = members.iter().map(|m| m.instance.as_str()).collect();
        let mut partials: Vec<(String, WindowReport)> = Vec::new();
        let mut unreadable: BTreeSet<&str> = BTreeSet::new();
        for w in all
            .windows
            .iter()
            .filter(|w| live.contains(w.instance.as_str()))
        {
            match serde_json::from_str(&w.report) {
                Ok(r) => partials.push((w.table.clone(), r)),
                Err(_) => {
                    unreadable.insert(w.instance.as_str());
                }
            }
        }
        if !unreadable.is_empty() {
            // Its mismatches would vanish with the reports left out.
            view.complete = false;
            view.problem = Some(format!(
                "reports of {unreadable:?} cannot be read (another version?)"
            ));
        }
        {
            let mut ws = self.windows();
            for a in &all.acks {
                let local = ws.map.get(&(a.table.clone(), a.start));
                if local.is_some_and(|w| w.status == Status::Mismatch && w.acked.is_none()) {
                    let _ = ws.ack(&a.table, a.start, &a.by, a.at_ms as f64 / 1000.0);
                }
            }
        }
        let combined = merge(partials, view.complete, fresh, self.opts.max_ids);
        let mut parity = report::assemble(&self.schema, combined.iter().rev(), now, None);
        parity.group = Some(view.clone());
        self.metrics.set(&parity, &self.schema);
        self.metrics.set_group(&view, state.covered.len());
        *self.parity.write().unwrap_or_else(|p| p.into_inner()) = parity;
        *g.combined.write().unwrap_or_else(|p| p.into_inner()) = (combined, view);
        Ok(())
    }

    /// The combined report over the windows `filter` selects.
    pub(super) fn group_parity(&self, g: &GroupState, filter: report::Filter) -> Parity {
        let c = g.combined.read().unwrap_or_else(|p| p.into_inner());
        let mut p = report::assemble(&self.schema, c.0.iter().rev(), now_unix(), Some(filter));
        p.group = Some(c.1.clone());
        p
    }

    /// Acknowledges a window the combined view calls a mismatch: recorded in
    /// the bookkeeping table, which every member applies to its partial.
    pub(super) async fn group_ack(
        &self,
        g: &GroupState,
        table: &str,
        start: i64,
        by: &str,
    ) -> Result<(), AckError> {
        let status = {
            let c = g.combined.read().unwrap_or_else(|p| p.into_inner());
            c.0.iter()
                .find(|(t, w)| t == table && w.start == start)
                .map(|(_, w)| w.status)
        };
        match status {
            None => return Err(AckError::NoSuchWindow),
            Some(Status::Mismatch) => {}
            Some(s) => return Err(AckError::NotMismatched(s)),
        }
        let now = now_unix();
        let ack = AckRow {
            table: table.to_string(),
            start,
            by: by.to_string(),
            at_ms: millis(now),
        };
        self.new
            .record_ack(&self.opts.group, &ack)
            .await
            .map_err(|e| AckError::Unavailable(e.to_string()))?;
        let _ = self.windows().ack(table, start, by, now);
        if let Err(e) = self.publish_group(g).await {
            tracing::warn!(error = %e, "the combined report could not be refreshed after the acknowledgement");
        }
        Ok(())
    }

    /// Reads this member's share of the topic and checks its windows until
    /// `shutdown`, writing its partials for the group's combined verdict.
    pub async fn run_in_group(
        self: &Arc<Self>,
        shutdown: CancellationToken,
        opts: GroupOptions,
    ) -> Result<(), CompareError> {
        let g = Arc::new(GroupState::new(opts));
        if self.group.set(g.clone()).is_err() {
            return Err(self.topic_error("this comparator already runs in a group".into()));
        }
        let ctx = GroupContext {
            quiet: QuietContext::default(),
            cmp: self.clone(),
            group: g.clone(),
        };
        // No offset is ever committed: each assignment starts at the
        // beginning of what the topic retains.
        let consumer = Arc::new(self.consumer_with(
            &[
                ("auto.offset.reset", "earliest"),
                ("enable.auto.commit", "false"),
            ],
            ctx,
        )?);
        consumer
            .subscribe(&[&self.opts.topic])
            .map_err(CompareError::Config)?;
        tracing::info!(topic = %self.opts.topic, group = %self.opts.group, instance = %g.opts.instance,
            "comparator joining its group");
        let checker = {
            let (me, stop) = (self.clone(), shutdown.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(me.opts.check_interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tick.tick() => {}
                    }
                    me.windows()
                        .prune(now_unix() - me.opts.retain.as_secs_f64());
                    if let Err(e) = me.check(false, None).await {
                        me.metrics.check_errors.inc();
                        tracing::warn!(error = %e, "parity check failed; retrying next interval");
                    }
                }
            })
        };
        // On its own timer: a long check (a drill-down) must not silence
        // this member into looking dead.
        let publisher = {
            let (me, stop, g) = (self.clone(), shutdown.clone(), g.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(me.opts.check_interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tick.tick() => {}
                    }
                    if let Err(e) = me.publish_group(&g).await {
                        me.metrics.check_errors.inc();
                        tracing::warn!(error = %e, "the group's partial reports could not be written or read; retrying next interval");
                    }
                }
            })
        };
        let oldest = |now: f64| (now - self.opts.retain.as_secs_f64()) * 1000.0;
        let mut measured_epoch = u64::MAX;
        let res = loop {
            let epoch = g.epoch.load(Ordering::SeqCst);
            if epoch != measured_epoch && !g.coverage().unmeasured().is_empty() {
                match self.measure(&consumer, &g, epoch).await {
                    Ok(()) => measured_epoch = epoch,
                    Err(e) => {
                        tracing::warn!(error = %e, "the partitions' ends could not be read; retrying")
                    }
                }
            }
            let m = tokio::select! {
                _ = shutdown.cancelled() => break Ok(()),
                m = tokio::time::timeout(Duration::from_millis(500), consumer.recv()) => m,
            };
            let Ok(m) = m else { continue };
            match m {
                Ok(m) => {
                    let (p, offset) = (
                        rdkafka::Message::partition(&m),
                        rdkafka::Message::offset(&m),
                    );
                    if !g.coverage().owns(p) {
                        continue;
                    }
                    let now = now_unix();
                    let old = rdkafka::Message::timestamp(&m)
                        .to_millis()
                        .is_some_and(|ts| (ts as f64) < oldest(now));
                    if !old {
                        self.observe_message(&m, now);
                    }
                    // After the row is held: a partial that says the
                    // partition is read in full holds all of it.
                    g.coverage().seen(p, offset);
                }
                Err(e) if crate::kafka::is_refusal(&e) => break Err(self.refused(e)),
                Err(e) => {
                    tracing::debug!(error = %e, "comparator consumer error");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        let _ = checker.await;
        let _ = publisher.await;
        // Leave at once rather than after the member timeout.
        if let Err(e) = self
            .new
            .forget_members(&self.opts.group, 0, Some(&g.opts.instance))
            .await
        {
            tracing::warn!(error = %e, "could not remove this member's partial reports");
        }
        consumer.unsubscribe();
        res
    }

    /// Reads the topic's partition count and the watermarks of the
    /// partitions assigned at `epoch`: where each ended when it came.
    async fn measure(
        &self,
        consumer: &Arc<rdkafka::consumer::StreamConsumer<GroupContext>>,
        g: &Arc<GroupState>,
        epoch: u64,
    ) -> Result<(), String> {
        let parts = g.coverage().unmeasured();
        let (n, marks) = super::partition_marks(consumer, &self.opts.topic, Some(parts)).await?;
        let mut cov = g.coverage();
        if g.epoch.load(Ordering::SeqCst) != epoch {
            // Reassigned meanwhile: measure the new partitions instead.
            return Err("the partitions were reassigned while being measured".into());
        }
        cov.set_partitions(n);
        for (p, (low, high)) in marks {
            cov.marks(p, low, high);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(name: &str, partitions: usize, covered: &[i32]) -> Member {
        Member {
            instance: name.into(),
            state: MemberState {
                partitions,
                assigned: covered.to_vec(),
                covered: covered.to_vec(),
            },
        }
    }

    fn window(start: i64, status: Status, found: usize, missing: usize) -> WindowReport {
        WindowReport {
            start,
            end: start + 60,
            status,
            acked: None,
            rows: found + missing,
            first_arrival: 10.0,
            last_arrival: 20.0,
            due: Some(30.0),
            check: Some(Checked {
                expected_new: found + missing,
                found_new: found,
                missing_new: missing,
                scanned_new: 100,
                missing_ids_new: (0..missing).map(|i| format!("k{start}-{i}")).collect(),
                at: 25.0,
                ..Checked::default()
            }),
        }
    }

    #[test]
    fn a_partition_counts_once_read_in_full_to_where_it_ended() {
        let mut c = Coverage::default();
        c.set_partitions(3);
        c.assign(&[0, 1, 2]);
        assert!(c.state().covered.is_empty(), "nothing measured yet");
        c.marks(0, 0, 10);
        c.marks(1, 5, 5);
        c.marks(2, 3, 8);
        assert_eq!(
            c.state().covered,
            vec![1],
            "an empty partition is read in full"
        );
        c.seen(2, 4);
        c.seen(2, 7);
        assert_eq!(
            c.state().covered,
            vec![1],
            "partition 2 read from 4, not from its beginning at 3"
        );
        c.assign(&[0, 1, 2]);
        c.marks(0, 0, 10);
        c.marks(1, 5, 5);
        c.marks(2, 3, 8);
        c.seen(0, 0);
        c.seen(0, 8);
        assert_eq!(c.state().covered, vec![1]);
        c.seen(0, 9);
        c.seen(2, 3);
        c.seen(2, 7);
        assert_eq!(c.state().covered, vec![0, 1, 2]);
        c.seen(7, 1);
        assert!(
            !c.owns(7),
            "a message of a partition not assigned is not owned"
        );
        c.revoke();
        assert_eq!(
            c.state(),
            MemberState {
                partitions: 3,
                ..MemberState::default()
            }
        );
    }

    #[test]
    fn a_group_is_complete_when_each_partition_is_read_by_exactly_one_member() {
        let v = view_of(&[member("a", 4, &[0, 1]), member("b", 4, &[2, 3])]);
        assert!(v.complete, "{v:?}");
        assert_eq!((v.covered, v.members.len()), (4, 2));
        let v = view_of(&[member("a", 4, &[0, 1])]);
        assert!(!v.complete);
        assert!(v.problem.unwrap().contains("[2, 3]"));
        let v = view_of(&[member("a", 4, &[0, 1, 2]), member("b", 4, &[2, 3])]);
        assert!(!v.complete, "partition 2 twice");
        assert_eq!(v.covered, 3);
        let mut reading = member("b", 4, &[2, 3]);
        reading.state.assigned = vec![0, 1, 2, 3];
        let v = view_of(&[member("a", 4, &[0, 1]), reading]);
        assert!(
            !v.complete,
            "a's partitions given to b, which is reading them again: {v:?}"
        );
        assert!(!view_of(&[]).complete);
        assert!(!view_of(&[member("a", 0, &[])]).complete);
    }

    #[test]
    fn partials_add_up_and_the_worst_verdict_wins() {
        let merged = merge(
            vec![
                ("t".into(), window(0, Status::Ok, 40, 0)),
                ("t".into(), window(0, Status::Ok, 60, 0)),
                ("t".into(), window(60, Status::Ok, 10, 0)),
                ("t".into(), window(60, Status::Mismatch, 8, 2)),
                ("t".into(), window(120, Status::Open, 0, 0)),
                ("t".into(), window(120, Status::Pending, 5, 1)),
            ],
            true,
            100.0,
            10,
        );
        assert_eq!(merged.len(), 3);
        let w0 = &merged[0].1;
        assert_eq!(w0.status, Status::Ok);
        let c = w0.check.as_ref().unwrap();
        assert_eq!((c.expected_new, c.found_new, c.extra_new), (100, 100, 0));
        let w1 = &merged[1].1;
        assert_eq!(w1.status, Status::Mismatch);
        let c = w1.check.as_ref().unwrap();
        assert_eq!((c.found_new, c.missing_new), (18, 2));
        assert_eq!(c.missing_ids_new, vec!["k60-0", "k60-1"]);
        assert_eq!(c.extra_new, 100 - 18, "the scan beyond what both found");
        assert_eq!(merged[2].1.status, Status::Pending);
    }

    #[test]
    fn an_incomplete_group_is_never_ok_and_an_ack_holds_only_alone() {
        let merged = merge(
            vec![("t".into(), window(0, Status::Ok, 1, 0))],
            false,
            100.0,
            10,
        );
        assert_eq!(merged[0].1.status, Status::Pending);
        let merged = merge(
            vec![("t".into(), window(0, Status::Ok, 1, 0))],
            true,
            29.0,
            10,
        );
        assert_eq!(
            merged[0].1.status,
            Status::Pending,
            "due at 30, a member last reported at 29"
        );
        let mut acked = window(0, Status::Mismatch, 1, 1);
        acked.acked = Some(super::super::state::Ack {
            by: "ops".into(),
            at: 1.0,
        });
        let merged = merge(
            vec![
                ("t".into(), acked.clone()),
                ("t".into(), window(0, Status::Ok, 3, 0)),
            ],
            true,
            100.0,
            10,
        );
        assert_eq!(merged[0].1.status, Status::Mismatch);
        assert!(merged[0].1.acked.is_some(), "acknowledged, the rest ok");
        let merged = merge(
            vec![
                ("t".into(), acked),
                ("t".into(), window(0, Status::Mismatch, 3, 1)),
            ],
            true,
            100.0,
            10,
        );
        assert!(
            merged[0].1.acked.is_none(),
            "another member's mismatch is not acknowledged"
        );
    }
}
