//! What the comparator expects and what it concluded: pure state and
//! verdicts, no I/O. Windows are slices of a table's time column; a row is
//! expected only because the stream says it was sent (dual or Kafka-only), so
//! an account that moved from legacy to dual mid-window is only expected from
//! the moment it moved.
//!
//! Memory does not grow with the rows retained: a window holds the keys of
//! its *pending* rows only (announced, not yet found everywhere they are
//! due). Once a row is found with the content the stream announced, the
//! window keeps no more of it than a count and a sum of content digests,
//! and of each database only what its last range scan returned for the
//! window, reduced to a count and a sum of key hashes ([`KeySum`]). A later
//! check expects each database's scan to have changed by exactly the rows
//! it found then; any other change (a row deleted, a row nobody announced, a
//! row announced twice) is explained by a drill-down: the window's offset
//! ranges are read again from the topic and their keys looked up, which
//! names every missing or differing row.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::db::digest::{Digest, KeySum};

/// Where a row must be found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Sent {
    /// Dual-written: in OLD and in NEW.
    Dual,
    /// Kafka-only: in NEW.
    Kafka,
}

/// A window's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Still receiving rows, or not settled yet: not checked.
    Open,
    /// Everything expected was found.
    Ok,
    /// Rows missing, still within the allowed lateness.
    Pending,
    /// Rows missing past the allowed lateness, found once and missing now,
    /// stored with other content, or a change nobody could explain.
    Mismatch,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Open => "open",
            Status::Ok => "ok",
            Status::Pending => "pending",
            Status::Mismatch => "mismatch",
        }
    }
}

/// The verdict of one check.
///
/// `defects` are rows lost (found once, missing now) or stored with other
/// content than the stream announced: a mismatch at once, as is a change of
/// a database's rows that no drill-down could explain (`unexplained`).
/// Otherwise `missing` rows are late, not lost, until `max_lateness` after
/// the later of the window's due time and the arrival of the
/// earliest-announced missing row (`earliest_missing`): a row announced
/// after the window was judged gets its own full allowance.
pub fn verdict(
    missing: usize,
    defects: usize,
    unexplained: bool,
    earliest_missing: f64,
    now: f64,
    due: f64,
    max_lateness: f64,
) -> Status {
    if missing == 0 && defects == 0 && !unexplained {
        Status::Ok
    } else if defects > 0 || unexplained || now >= due.max(earliest_missing) + max_lateness {
        Status::Mismatch
    } else {
        Status::Pending
    }
}

/// One pending row.
#[derive(Debug, Clone)]
pub struct Expected {
    pub group: String,
    pub sent: Sent,
    /// Unix time the stream announced it (or raised it from Kafka-only to dual).
    pub arrived: f64,
    /// A check found it in NEW / in OLD: its absence there later is a loss.
    pub found_new: bool,
    pub found_old: bool,
    /// Found once there and missing at the last check: counted out of that
    /// database's scan once, when it went.
    pub lost_new: bool,
    pub lost_old: bool,
    /// The content the stream announced (None: not readable as the
    /// schema's types, so only its presence is checked).
    pub digest: Option<Digest>,
}

impl Expected {
    /// A row the stream announced at `now`.
    pub fn new(group: String, sent: Sent, digest: Option<Digest>, now: f64) -> Expected {
        Expected {
            group,
            sent,
            arrived: now,
            found_new: false,
            found_old: false,
            lost_new: false,
            lost_old: false,
            digest,
        }
    }
}

/// Who acknowledged a mismatched window, and when.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ack {
    pub by: String,
    pub at: f64,
}

/// Why a window could not be acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AckError {
    NoSuchWindow,
    NotMismatched(Status),
    /// The group's bookkeeping table could not record it.
    Unavailable(String),
}

/// The result of the last check of a window.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Checked {
    pub expected_old: usize,
    pub expected_new: usize,
    pub found_old: usize,
    pub found_new: usize,
    pub missing_old: usize,
    pub missing_new: usize,
    /// Rows present with other content than the stream announced.
    pub differs_old: usize,
    pub differs_new: usize,
    /// Rows in NEW in this window that the stream did not announce.
    pub extra_new: i64,
    /// Rows NEW's range scan of the window found (whoever announced them).
    pub scanned_new: u64,
    /// The databases' rows changed in a way no drill-down could explain
    /// (the window's messages are no longer in the topic).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub unexplained: bool,
    /// The group values with the most missing rows: (group, missing).
    pub worst_groups: Vec<(String, usize)>,
    /// A bounded list of missing keys, per database.
    pub missing_ids_old: Vec<String>,
    pub missing_ids_new: Vec<String>,
    /// A bounded list of keys whose content differs, per database.
    pub differing_ids_old: Vec<String>,
    pub differing_ids_new: Vec<String>,
    /// Unix time of the check.
    pub at: f64,
}

/// What a window remembers of its verified rows: found where due, with the
/// announced content. Counts and a content sum, never keys.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Verified {
    /// Rows found in NEW (every verified row) and in OLD (the dual ones).
    pub new: u64,
    pub old: u64,
    /// Wrapping sum of the verified rows' content digests.
    pub content: u128,
}

impl Verified {
    fn add(&mut self, sent: Sent, digest: Option<Digest>) {
        self.new += 1;
        if sent == Sent::Dual {
            self.old += 1;
        }
        self.content = self.content.wrapping_add(digest.unwrap_or_default());
    }
}

/// Rows that are no longer pending and are wrong: lost after being found,
/// or stored with other content. Counted in full, named up to `max_ids`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Defects {
    pub lost_new: usize,
    pub lost_old: usize,
    pub differs_new: usize,
    pub differs_old: usize,
    pub lost_ids_new: Vec<String>,
    pub lost_ids_old: Vec<String>,
    pub differing_ids_new: Vec<String>,
    pub differing_ids_old: Vec<String>,
}

impl Defects {
    pub fn count(&self) -> usize {
        self.lost_new + self.lost_old + self.differs_new + self.differs_old
    }

    fn name(ids: &mut Vec<String>, key: &str, max_ids: usize) {
        if ids.len() < max_ids {
            ids.push(key.to_string());
        }
    }

    pub fn lost(&mut self, new: bool, key: &str, max_ids: usize) {
        if new {
            self.lost_new += 1;
            Self::name(&mut self.lost_ids_new, key, max_ids);
        } else {
            self.lost_old += 1;
            Self::name(&mut self.lost_ids_old, key, max_ids);
        }
    }

    pub fn differs(&mut self, new: bool, key: &str, max_ids: usize) {
        if new {
            self.differs_new += 1;
            Self::name(&mut self.differing_ids_new, key, max_ids);
        } else {
            self.differs_old += 1;
            Self::name(&mut self.differing_ids_old, key, max_ids);
        }
    }
}

/// One table's rows in one slice of its time column.
#[derive(Debug, Clone)]
pub struct Window {
    pub table: String,
    pub start: i64,
    pub end: i64,
    /// Pending rows only: announced, not yet found everywhere they are due.
    pub rows: HashMap<String, Expected>,
    pub verified: Verified,
    /// Verified rows found wrong since (lost, or stored with other content).
    pub defects: Defects,
    /// What the last check's range scan of each database returned.
    pub scanned_new: Option<KeySum>,
    pub scanned_old: Option<KeySum>,
    /// The offsets of the window's messages, per partition (first, last):
    /// where a drill-down reads them again.
    pub positions: BTreeMap<i32, (i64, i64)>,
    /// Unix time the first row arrived.
    pub first_arrival: f64,
    /// Unix time the last row arrived (a window settles after its last row).
    pub last_arrival: f64,
    pub status: Status,
    /// Bumped whenever what is expected changes: a check judges the revision
    /// it snapshot, and rows announced meanwhile wait for the next check.
    pub revision: u64,
    /// Unix time the window became checkable, fixed at its first check.
    pub due: Option<f64>,
    pub last: Option<Checked>,
    /// A person acknowledged the mismatch: it no longer counts in the overall
    /// verdict and the window may be forgotten.
    pub acked: Option<Ack>,
}

impl Window {
    /// When it may be checked: after its end and its last arrival, plus `settle`.
    pub fn due_at(&self, settle: f64) -> f64 {
        (self.end as f64).max(self.last_arrival) + settle
    }

    /// Rows the stream announced for it (a row announced again after it
    /// was verified counts twice until a drill-down recounts).
    pub fn announced(&self) -> u64 {
        self.verified.new
            + (self.defects.lost_new + self.defects.differs_new) as u64
            + self.rows.len() as u64
    }
}

/// Where a message sits in the topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub partition: i32,
    pub offset: i64,
}

/// The windows the comparator holds, keyed by (table, start).
#[derive(Debug, Default)]
pub struct Windows {
    pub width: i64,
    pub map: BTreeMap<(String, i64), Window>,
    /// Bumped whenever everything is forgotten at once: a check that read
    /// the databases for what was held before applies nothing after.
    pub generation: u64,
}

impl Windows {
    pub fn new(width: i64) -> Windows {
        Windows {
            width: width.max(1),
            map: BTreeMap::new(),
            generation: 0,
        }
    }

    /// Forgets every window (this comparator's partitions changed: it reads
    /// those it has now from their beginning).
    pub fn clear(&mut self) {
        self.map.clear();
        self.generation += 1;
    }

    /// Records a row the stream announced. A pending row seen again (a
    /// replay or a redelivery) keeps its strongest expectation (dual over
    /// Kafka-only); a redelivery that changes nothing leaves the window as
    /// it was. A row verified before is pending again: it is looked up
    /// again, and the drill-down its second count causes recounts the window.
    pub fn expect(
        &mut self,
        table: &str,
        time: i64,
        key: String,
        row: Expected,
        at: Option<Position>,
    ) {
        let now = row.arrived;
        let start = time.div_euclid(self.width) * self.width;
        let w = self
            .map
            .entry((table.to_string(), start))
            .or_insert_with(|| Window {
                table: table.to_string(),
                start,
                end: start + self.width,
                rows: HashMap::new(),
                verified: Verified::default(),
                defects: Defects::default(),
                scanned_new: None,
                scanned_old: None,
                positions: BTreeMap::new(),
                first_arrival: now,
                last_arrival: now,
                status: Status::Open,
                revision: 0,
                due: None,
                last: None,
                acked: None,
            });
        if let Some(p) = at {
            let range = w
                .positions
                .entry(p.partition)
                .or_insert((p.offset, p.offset));
            range.0 = range.0.min(p.offset);
            range.1 = range.1.max(p.offset);
        }
        let changed = match w.rows.get_mut(&key) {
            None => {
                w.rows.insert(key, row);
                true
            }
            Some(e) if row.sent == Sent::Dual && e.sent == Sent::Kafka => {
                // Now due in OLD too: not found there yet.
                e.sent = Sent::Dual;
                e.arrived = now;
                e.found_old = false;
                e.lost_old = false;
                true
            }
            Some(_) => false,
        };
        if changed {
            w.last_arrival = now;
            w.revision += 1;
            // New expectations reopen the question for a window judged ok.
            if w.status == Status::Ok {
                w.status = Status::Open;
            }
        }
    }

    /// Forgets windows verified ok (or acknowledged) whose last row arrived
    /// before `before`. Open and pending windows are kept until judged, and a
    /// mismatch until it is resolved or acknowledged, whatever their age.
    pub fn prune(&mut self, before: f64) -> usize {
        let n = self.map.len();
        self.map.retain(|_, w| {
            let settled = w.status == Status::Ok || w.acked.is_some();
            !(settled && w.last_arrival < before)
        });
        n - self.map.len()
    }

    /// Acknowledges a mismatched window.
    pub fn ack(&mut self, table: &str, start: i64, by: &str, now: f64) -> Result<(), AckError> {
        let w = self
            .map
            .get_mut(&(table.to_string(), start))
            .ok_or(AckError::NoSuchWindow)?;
        if w.status != Status::Mismatch {
            return Err(AckError::NotMismatched(w.status));
        }
        w.acked = Some(Ack {
            by: by.to_string(),
            at: now,
        });
        Ok(())
    }

    /// Pending rows held across every window: the comparator's memory.
    pub fn pending(&self) -> usize {
        self.map.values().map(|w| w.rows.len()).sum()
    }
}

/// What a check looked for: the window's pending rows at one revision, and
/// what it remembered of the rest.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub revision: u64,
    pub rows: Vec<(String, Expected)>,
    pub verified: Verified,
    pub defects: Defects,
    pub scanned_new: Option<KeySum>,
    pub scanned_old: Option<KeySum>,
    pub positions: BTreeMap<i32, (i64, i64)>,
}

impl Window {
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            revision: self.revision,
            rows: self
                .rows
                .iter()
                .map(|(k, e)| (k.clone(), e.clone()))
                .collect(),
            verified: self.verified,
            defects: self.defects.clone(),
            scanned_new: self.scanned_new,
            scanned_old: self.scanned_old,
            positions: self.positions.clone(),
        }
    }

    /// Applies a check of `snap`: verified rows leave the pending set for
    /// the counts, differing ones for the defects, rows found in one
    /// database are remembered as found there (unless their expectation
    /// changed meanwhile), a drill-down's recount replaces what was
    /// remembered of the verified rows, and the scans become the next
    /// check's reference. A window that changed since the snapshot is not
    /// ok until checked again; an acknowledgement holds while the window
    /// stays mismatched.
    pub fn settle_check(
        &mut self,
        snap: &Snapshot,
        j: &Judgement,
        drill: Option<&Drill>,
        status: Status,
        max_ids: usize,
    ) {
        if let Some(d) = drill {
            self.verified = d.verified;
            self.defects = d.defects.clone();
        }
        let before: HashMap<&str, Sent> = snap
            .rows
            .iter()
            .map(|(k, e)| (k.as_str(), e.sent))
            .collect();
        for (key, outcome) in &j.outcomes {
            let Some(e) = self.rows.get_mut(key) else {
                continue;
            };
            let unchanged = before.get(key.as_str()) == Some(&e.sent);
            match *outcome {
                Outcome::Verified if unchanged => {
                    self.verified.add(e.sent, e.digest);
                    self.rows.remove(key);
                }
                Outcome::Differs { new, old } if unchanged => {
                    if new {
                        self.defects.differs(true, key, max_ids);
                    } else {
                        self.verified.new += 1;
                        self.verified.content = self
                            .verified
                            .content
                            .wrapping_add(e.digest.unwrap_or_default());
                    }
                    if old {
                        self.defects.differs(false, key, max_ids);
                    } else if e.sent == Sent::Dual {
                        self.verified.old += 1;
                    }
                    self.rows.remove(key);
                }
                Outcome::Verified | Outcome::Differs { .. } => {
                    e.found_new = true;
                    e.lost_new = false;
                }
                Outcome::Found { new, old } => {
                    e.found_new |= new;
                    e.lost_new = e.found_new && !new;
                    if e.sent == Sent::Dual {
                        e.found_old |= old;
                        e.lost_old = e.found_old && !old;
                    }
                }
            }
        }
        // A window's pending set empties as it verifies: give its table
        // back, or every window ever checked keeps the capacity it peaked at.
        if self.rows.is_empty() {
            self.rows = HashMap::new();
        } else if self.rows.capacity() > 4 * self.rows.len() + 64 {
            self.rows.shrink_to_fit();
        }
        // A change nobody could explain keeps the scans it is measured
        // from: it stays a mismatch until the rows are back (or a drill-down
        // explains it), not only for the one check that saw it.
        if !j.checked.unexplained {
            self.scanned_new = Some(j.scan_new);
            if j.scan_old.is_some() {
                self.scanned_old = j.scan_old;
            }
        }
        let status = if status == Status::Ok && self.revision != snap.revision {
            Status::Open
        } else {
            status
        };
        if status != Status::Mismatch {
            self.acked = None;
        }
        self.status = status;
    }
}

/// What became of one pending row in a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Found everywhere it is due with the announced content.
    Verified,
    /// Found with other content (in NEW, in OLD).
    Differs { new: bool, old: bool },
    /// Still pending; found in NEW / OLD now.
    Found { new: bool, old: bool },
}

/// What one check read of a window from the two databases.
#[derive(Debug, Default)]
pub struct Reads {
    /// Key → content digest of (at least) the pending rows found in NEW/OLD.
    pub new: HashMap<String, Digest>,
    pub old: HashMap<String, Digest>,
    /// The range scans of the window, reduced.
    pub scan_new: KeySum,
    /// None: OLD was not read (the window never had a dual row).
    pub scan_old: Option<KeySum>,
}

/// A check's findings about one snapshot.
#[derive(Debug, Clone)]
pub struct Judgement {
    pub checked: Checked,
    pub outcomes: Vec<(String, Outcome)>,
    /// Pending rows found by an earlier check and missing now, and rows
    /// found with other content, this check.
    pub defects: usize,
    /// Pending rows not found where due (late, so far).
    pub missing: usize,
    /// The earliest arrival among the missing rows.
    pub earliest_missing: f64,
    /// A database's rows for the window changed otherwise than by the rows
    /// this check found: a drill-down must explain it.
    pub changed_new: bool,
    pub changed_old: bool,
    pub scan_new: KeySum,
    pub scan_old: Option<KeySum>,
    /// Defects of rows no longer pending, as the snapshot knew them.
    pub settled_defects: usize,
}

/// Did a database's rows change by exactly what this check found: the rows
/// found there for the first time added, the pending rows lost removed?
fn changed(before: Option<KeySum>, now: KeySum, added: &KeySum, lost: &KeySum) -> bool {
    match before {
        None => false,
        Some(b) => {
            let expected = KeySum {
                count: b.count.wrapping_add(added.count).wrapping_sub(lost.count),
                sum: b.sum.wrapping_add(added.sum).wrapping_sub(lost.sum),
            };
            expected != now
        }
    }
}

/// What one check learns of one database, row by row: the keys found there
/// for the first time (or back), the pending rows lost there since the last
/// check, and the keys to name as missing.
struct Side<'a> {
    added: &'a mut KeySum,
    lost: &'a mut KeySum,
    ids: &'a mut Vec<String>,
}

impl Side<'_> {
    /// A pending row's presence in this database; returns (missing, lost):
    /// never found here yet, or found once and gone. A row lost is counted
    /// out of the scan once, when it goes.
    fn look(
        &mut self,
        key: &str,
        stored: Option<&Digest>,
        found: bool,
        was_lost: bool,
    ) -> (bool, bool) {
        match stored {
            Some(_) => {
                if !found || was_lost {
                    self.added.add(key);
                }
                (false, false)
            }
            None => {
                if found && !was_lost {
                    self.lost.add(key);
                }
                self.ids.push(key.to_string());
                (!found, found)
            }
        }
    }
}

/// Judges a snapshot against what each database holds.
pub fn judge(snap: &Snapshot, reads: &Reads, max_ids: usize, now: f64) -> Judgement {
    let mut c = Checked {
        at: now,
        ..Checked::default()
    };
    let mut by_group: HashMap<&str, usize> = HashMap::new();
    let (mut ids_old, mut ids_new, mut diff_old, mut diff_new) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut outcomes = Vec::with_capacity(snap.rows.len());
    let (mut defects, mut missing) = (0, 0);
    let mut earliest_missing = f64::INFINITY;
    let (mut added_new, mut added_old) = (KeySum::default(), KeySum::default());
    let (mut lost_new, mut lost_old) = (KeySum::default(), KeySum::default());
    let mut new_side = Side {
        added: &mut added_new,
        lost: &mut lost_new,
        ids: &mut ids_new,
    };
    let mut old_side = Side {
        added: &mut added_old,
        lost: &mut lost_old,
        ids: &mut ids_old,
    };
    for (key, e) in &snap.rows {
        let differs = |stored: &Digest| e.digest.is_some_and(|d| d != *stored);
        let in_new = reads.new.get(key);
        let (mut missing_here, mut lost_here) = new_side.look(key, in_new, e.found_new, e.lost_new);
        let differs_new = in_new.is_some_and(differs);
        let (mut in_old, mut differs_old) = (None, false);
        if e.sent == Sent::Dual {
            in_old = reads.old.get(key);
            differs_old = in_old.is_some_and(differs);
            let (m, l) = old_side.look(key, in_old, e.found_old, e.lost_old);
            missing_here |= m;
            lost_here |= l;
        }
        if in_new.is_none() {
            c.missing_new += 1;
        }
        if e.sent == Sent::Dual && in_old.is_none() {
            c.missing_old += 1;
        }
        if differs_new {
            diff_new.push(key.clone());
        }
        if differs_old {
            diff_old.push(key.clone());
        }
        // A row leaves the pending set only once found everywhere it is
        // due: one that differs in a database and is missing in the other
        // stays pending (and its difference counts now).
        let outcome = if missing_here || lost_here {
            Outcome::Found {
                new: in_new.is_some(),
                old: in_old.is_some(),
            }
        } else if differs_new || differs_old {
            Outcome::Differs {
                new: differs_new,
                old: differs_old,
            }
        } else {
            Outcome::Verified
        };
        if missing_here || lost_here || differs_new || differs_old {
            *by_group.entry(e.group.as_str()).or_default() += 1;
        }
        if lost_here || differs_new || differs_old {
            defects += 1;
        } else if missing_here {
            missing += 1;
            earliest_missing = earliest_missing.min(e.arrived);
        }
        outcomes.push((key.clone(), outcome));
    }
    let pending_new = snap.rows.len();
    let pending_old = snap
        .rows
        .iter()
        .filter(|(_, e)| e.sent == Sent::Dual)
        .count();
    let d = &snap.defects;
    c.expected_new = snap.verified.new as usize + d.lost_new + d.differs_new + pending_new;
    c.expected_old = snap.verified.old as usize + d.lost_old + d.differs_old + pending_old;
    c.missing_new += d.lost_new;
    c.missing_old += d.lost_old;
    c.found_new = c.expected_new - c.missing_new;
    c.found_old = c.expected_old - c.missing_old;
    c.differs_new = d.differs_new + diff_new.len();
    c.differs_old = d.differs_old + diff_old.len();
    let changed_new = changed(snap.scanned_new, reads.scan_new, &added_new, &lost_new);
    let changed_old = match reads.scan_old {
        Some(now) => changed(snap.scanned_old, now, &added_old, &lost_old),
        None => false,
    };
    c.unexplained = changed_new || changed_old;
    let name = |mut known: Vec<String>, mut now: Vec<String>| {
        known.append(&mut now);
        known.sort();
        known.dedup();
        known.truncate(max_ids);
        known
    };
    c.missing_ids_new = name(d.lost_ids_new.clone(), ids_new);
    c.missing_ids_old = name(d.lost_ids_old.clone(), ids_old);
    c.differing_ids_new = name(d.differing_ids_new.clone(), diff_new);
    c.differing_ids_old = name(d.differing_ids_old.clone(), diff_old);
    let mut groups: Vec<(String, usize)> = by_group
        .into_iter()
        .map(|(g, n)| (g.to_string(), n))
        .collect();
    groups.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    groups.truncate(5);
    c.worst_groups = groups;
    c.scanned_new = reads.scan_new.count;
    c.extra_new = (reads.scan_new.count as i64 - c.found_new as i64).max(0);
    Judgement {
        checked: c,
        outcomes,
        defects,
        missing,
        earliest_missing,
        changed_new,
        changed_old,
        scan_new: reads.scan_new,
        scan_old: reads.scan_old,
        settled_defects: d.count(),
    }
}

/// The status of a window after a check: a change of a database's rows
/// that no drill-down explained is a mismatch (fail closed).
pub fn conclude(j: &Judgement, now: f64, due: f64, max_lateness: f64) -> Status {
    verdict(
        j.missing,
        j.defects + j.settled_defects,
        j.checked.unexplained,
        j.earliest_missing,
        now,
        due,
        max_lateness,
    )
}

/// A snapshot whose verified rows a drill-down recounted: judged again
/// with it, the change it explained is no longer a change.
pub fn recounted(snap: &Snapshot, drill: &Drill) -> Snapshot {
    Snapshot {
        verified: drill.verified,
        defects: drill.defects.clone(),
        scanned_new: None,
        scanned_old: None,
        ..snap.clone()
    }
}

/// A drill-down's recount of a window's rows that are not pending: every
/// message of the window read again from the topic, each key looked up.
#[derive(Debug, Clone, Default)]
pub struct Drill {
    pub verified: Verified,
    pub defects: Defects,
}

/// One row a drill-down read again, and where to look for it.
#[derive(Debug, Clone)]
pub struct Reread {
    pub key: String,
    pub sent: Sent,
    pub digest: Option<Digest>,
    /// Look for it in NEW (false: already counted there, raised to dual).
    pub in_new: bool,
}

impl Drill {
    /// Counts one chunk of re-read rows against what the databases hold.
    pub fn count(
        &mut self,
        rows: &[Reread],
        new: &HashMap<String, Digest>,
        old: &HashMap<String, Digest>,
        max_ids: usize,
    ) {
        for r in rows {
            let differs = |stored: &Digest| r.digest.is_some_and(|d| d != *stored);
            if r.in_new {
                match new.get(&r.key) {
                    None => self.defects.lost(true, &r.key, max_ids),
                    Some(d) if differs(d) => self.defects.differs(true, &r.key, max_ids),
                    Some(_) => {
                        self.verified.new += 1;
                        self.verified.content = self
                            .verified
                            .content
                            .wrapping_add(r.digest.unwrap_or_default());
                    }
                }
            }
            if r.sent == Sent::Dual {
                match old.get(&r.key) {
                    None => self.defects.lost(false, &r.key, max_ids),
                    Some(d) if differs(d) => self.defects.differs(false, &r.key, max_ids),
                    Some(_) => self.verified.old += 1,
                }
            }
        }
    }

    pub fn finish(&mut self) {
        let d = &mut self.defects;
        for ids in [
            &mut d.lost_ids_new,
            &mut d.lost_ids_old,
            &mut d.differing_ids_new,
            &mut d.differing_ids_old,
        ] {
            ids.sort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn content(key: &str) -> Digest {
        crate::db::digest::digest(&[crate::db::digest::Canon::Text(key.to_string())])
    }

    /// Rows stored with the content each key was announced with.
    fn set(keys: &[&str]) -> HashMap<String, Digest> {
        keys.iter().map(|k| (k.to_string(), content(k))).collect()
    }

    fn reads(old: &[&str], new: &[&str]) -> Reads {
        Reads {
            new: set(new),
            old: set(old),
            scan_new: KeySum::of(new.iter().copied()),
            scan_old: Some(KeySum::of(old.iter().copied())),
        }
    }

    fn row(sent: Sent, key: &str, at: f64) -> Expected {
        Expected::new("g".into(), sent, Some(content(key)), at)
    }

    fn announce(ws: &mut Windows, time: i64, key: &str, sent: Sent, at: f64) {
        ws.expect("t", time, key.into(), row(sent, key, at), None);
    }

    fn w0(ws: &mut Windows) -> &mut Window {
        ws.map.get_mut(&("t".to_string(), 0)).unwrap()
    }

    /// One check of window [0, 60) as the comparator runs it without a
    /// topic to drill down into: snapshot, read, judge, conclude, settle.
    fn check(ws: &mut Windows, old: &[&str], new: &[&str], now: f64, lateness: f64) -> Status {
        let w = w0(ws);
        let snap = w.snapshot();
        let j = judge(&snap, &reads(old, new), 10, now);
        let due = *w.due.get_or_insert(now);
        let status = conclude(&j, now, due, lateness);
        w.settle_check(&snap, &j, None, status, 10);
        w.last = Some(j.checked);
        w.status
    }

    /// The same check with a drill-down that re-reads `announced` (the
    /// window's messages) whenever a database changed unexpectedly.
    fn check_drilled(
        ws: &mut Windows,
        announced: &[(&str, Sent)],
        old: &[&str],
        new: &[&str],
        now: f64,
    ) -> (Status, Judgement) {
        let w = w0(ws);
        let snap = w.snapshot();
        let r = reads(old, new);
        let mut j = judge(&snap, &r, 10, now);
        let mut drill = None;
        if j.changed_new || j.changed_old {
            let mut d = Drill::default();
            let rows: Vec<Reread> = announced
                .iter()
                .filter(|(k, _)| !w.rows.contains_key(*k))
                .map(|(k, s)| Reread {
                    key: k.to_string(),
                    sent: *s,
                    digest: Some(content(k)),
                    in_new: true,
                })
                .collect();
            d.count(&rows, &r.new, &r.old, 10);
            d.finish();
            j = judge(&recounted(&snap, &d), &r, 10, now);
            drill = Some(d);
        }
        let due = *w.due.get_or_insert(now);
        let status = conclude(&j, now, due, 0.0);
        w.settle_check(&snap, &j, drill.as_ref(), status, 10);
        w.last = Some(j.checked.clone());
        (w.status, j)
    }

    #[test]
    fn verdicts() {
        let inf = f64::INFINITY;
        assert_eq!(verdict(0, 0, false, inf, 100.0, 90.0, 60.0), Status::Ok);
        assert_eq!(
            verdict(3, 0, false, 80.0, 100.0, 90.0, 60.0),
            Status::Pending
        );
        assert_eq!(
            verdict(3, 0, false, 80.0, 150.0, 90.0, 60.0),
            Status::Mismatch
        );
        // Found before, missing now: a loss, at once.
        assert_eq!(
            verdict(0, 1, false, inf, 91.0, 90.0, 60.0),
            Status::Mismatch
        );
        // A change nobody could explain: at once.
        assert_eq!(verdict(0, 0, true, inf, 91.0, 90.0, 60.0), Status::Mismatch);
        // Announced long after the window was due: its own allowance.
        assert_eq!(
            verdict(1, 0, false, 140.0, 150.0, 90.0, 60.0),
            Status::Pending
        );
        assert_eq!(
            verdict(1, 0, false, 140.0, 200.0, 90.0, 60.0),
            Status::Mismatch
        );
    }

    #[test]
    fn a_row_is_expected_only_where_it_was_sent() {
        let mut ws = Windows::new(60);
        // Minute 0–2: account legacy, nothing in the stream. Minute 3: dual.
        ws.expect("t", 185, "a".into(), row(Sent::Dual, "a", 1.0), None);
        ws.expect("t", 190, "b".into(), row(Sent::Kafka, "b", 1.0), None);
        assert_eq!(ws.map.len(), 1, "one window: [180, 240)");
        let w = &ws.map[&("t".to_string(), 180)];
        assert_eq!((w.start, w.end), (180, 240));
        let j = judge(&w.snapshot(), &reads(&["a"], &["a", "b"]), 10, 2.0);
        let c = j.checked;
        assert_eq!((c.expected_old, c.expected_new), (1, 2));
        assert_eq!((c.missing_old, c.missing_new, c.extra_new), (0, 0, 0));
    }

    #[test]
    fn missing_rows_are_named_and_grouped() {
        let mut ws = Windows::new(60);
        for (k, g) in [("k1", "p1"), ("k2", "p1"), ("k3", "p2"), ("k4", "p3")] {
            let e = Expected::new(g.into(), Sent::Dual, None, 1.0);
            ws.expect("t", 10, k.into(), e, None);
        }
        let w = &ws.map[&("t".to_string(), 0)];
        let mut r = reads(&["k1", "k2", "k3", "k4"], &["k3", "k4"]);
        r.scan_new.count = 5;
        let j = judge(&w.snapshot(), &r, 1, 2.0);
        let c = j.checked;
        assert_eq!(c.missing_new, 2);
        assert_eq!(c.missing_old, 0);
        assert_eq!(c.missing_ids_new, vec!["k1".to_string()], "bounded to 1");
        assert_eq!(c.worst_groups, vec![("p1".to_string(), 2)]);
        assert_eq!(c.extra_new, 3, "5 in NEW by time, 2 of them expected");
        assert_eq!((j.defects, j.missing), (0, 2));
        assert_eq!(j.earliest_missing, 1.0);
    }

    #[test]
    fn verified_rows_leave_only_counts_behind() {
        let mut ws = Windows::new(60);
        let keys: Vec<String> = (0..1000).map(|i| format!("k{i}")).collect();
        let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        for k in &refs {
            announce(&mut ws, 10, k, Sent::Dual, 1.0);
        }
        assert_eq!(ws.pending(), 1000);
        assert_eq!(check(&mut ws, &refs, &refs, 100.0, 300.0), Status::Ok);
        let w = w0(&mut ws);
        assert!(w.rows.is_empty(), "no key is held once verified");
        assert_eq!(w.rows.capacity(), 0, "nor the room the keys took");
        assert_eq!((w.verified.new, w.verified.old), (1000, 1000));
        let want = refs.iter().fold(0u128, |s, k| s.wrapping_add(content(k)));
        assert_eq!(w.verified.content, want);
        assert_eq!(w.scanned_new, Some(KeySum::of(refs.iter().copied())));
        // A recheck with nothing changed needs nothing but the scans.
        assert_eq!(check(&mut ws, &refs, &refs, 200.0, 300.0), Status::Ok);
        let c = w0(&mut ws).last.clone().unwrap();
        assert_eq!(
            (c.expected_new, c.found_new, c.missing_new),
            (1000, 1000, 0)
        );
        assert_eq!((c.expected_old, c.found_old, c.extra_new), (1000, 1000, 0));
    }

    #[test]
    fn a_replay_keeps_the_strongest_expectation_and_reopens() {
        let mut ws = Windows::new(60);
        announce(&mut ws, 1, "k", Sent::Kafka, 1.0);
        announce(&mut ws, 1, "k", Sent::Kafka, 2.0);
        assert_eq!(
            w0(&mut ws).rows.len(),
            1,
            "a pending row announced twice is one row"
        );
        announce(&mut ws, 1, "k", Sent::Dual, 5.0);
        let w = w0(&mut ws);
        assert_eq!(w.rows["k"].sent, Sent::Dual);
        assert_eq!(w.rows["k"].arrived, 5.0);
        assert_eq!(w.status, Status::Open);
        assert_eq!(w.due_at(10.0), 70.0, "after the window's end");
        assert_eq!(check(&mut ws, &["k"], &["k"], 70.0, 300.0), Status::Ok);
        assert_eq!(w0(&mut ws).verified.old, 1);
    }

    #[test]
    fn a_late_row_after_ok_is_pending_from_its_arrival_then_ok_or_a_mismatch() {
        let mut ws = Windows::new(60);
        announce(&mut ws, 10, "a", Sent::Dual, 50.0);
        assert_eq!(check(&mut ws, &["a"], &["a"], 100.0, 300.0), Status::Ok);
        // Long after the window was due, one more row; not in NEW yet.
        announce(&mut ws, 20, "b", Sent::Dual, 1000.0);
        assert_eq!(w0(&mut ws).status, Status::Open);
        assert_eq!(
            check(&mut ws, &["a", "b"], &["a"], 1010.0, 300.0),
            Status::Pending,
            "late, not lost: its clock starts at its arrival"
        );
        let mut lands = Windows {
            width: 60,
            map: ws.map.clone(),
            generation: 0,
        };
        assert_eq!(
            check(&mut lands, &["a", "b"], &["a", "b"], 1200.0, 300.0),
            Status::Ok,
            "NEW grew by exactly the row found: nothing to explain"
        );
        assert_eq!(
            check(&mut ws, &["a", "b"], &["a"], 1300.0, 300.0),
            Status::Mismatch,
            "past the allowance from its arrival"
        );
    }

    #[test]
    fn a_pending_row_found_then_missing_is_a_loss_at_once() {
        let mut ws = Windows::new(60);
        announce(&mut ws, 10, "a", Sent::Dual, 50.0);
        // In NEW, not yet in OLD: still pending, found in NEW.
        assert_eq!(check(&mut ws, &[], &["a"], 100.0, 300.0), Status::Pending);
        assert!(w0(&mut ws).rows["a"].found_new);
        assert_eq!(check(&mut ws, &[], &[], 110.0, 300.0), Status::Mismatch);
        let c = w0(&mut ws).last.clone().unwrap();
        assert_eq!(c.missing_ids_new, vec!["a".to_string()]);
        assert!(
            !c.unexplained,
            "the loss is the pending row's, no drill-down needed"
        );
        // Still gone: still a loss, and still nothing to explain.
        assert_eq!(check(&mut ws, &[], &[], 120.0, 300.0), Status::Mismatch);
        assert!(!w0(&mut ws).last.as_ref().unwrap().unexplained);
        // Back in NEW, and now in OLD too: verified.
        assert_eq!(check(&mut ws, &["a"], &["a"], 130.0, 300.0), Status::Ok);
        assert!(w0(&mut ws).rows.is_empty());
    }

    #[test]
    fn a_row_differing_in_one_database_and_missing_in_the_other_stays_pending() {
        let mut ws = Windows::new(60);
        announce(&mut ws, 10, "a", Sent::Dual, 50.0);
        let mut r = reads(&[], &["a"]);
        r.new.insert("a".into(), content("a, truncated"));
        let w = w0(&mut ws);
        let snap = w.snapshot();
        let j = judge(&snap, &r, 10, 100.0);
        assert_eq!(j.defects, 1, "the difference counts at once");
        assert_eq!(conclude(&j, 100.0, 100.0, 300.0), Status::Mismatch);
        w.settle_check(&snap, &j, None, Status::Mismatch, 10);
        assert!(w.rows.contains_key("a"), "still looked for in OLD");
        assert_eq!((w.verified.new, w.verified.old), (0, 0));
    }

    #[test]
    fn a_verified_row_deleted_later_is_named_by_the_drill_down() {
        let mut ws = Windows::new(60);
        let announced = [("a", Sent::Dual), ("b", Sent::Dual), ("c", Sent::Kafka)];
        for (k, s) in announced {
            announce(&mut ws, 10, k, s, 50.0);
        }
        let (s, _) = check_drilled(&mut ws, &announced, &["a", "b"], &["a", "b", "c"], 100.0);
        assert_eq!(s, Status::Ok);
        assert!(w0(&mut ws).rows.is_empty());
        // b deleted from NEW: the scan changed, the drill-down names it.
        let (s, j) = check_drilled(&mut ws, &announced, &["a", "b"], &["a", "c"], 110.0);
        assert_eq!(s, Status::Mismatch);
        assert_eq!(j.checked.missing_ids_new, vec!["b".to_string()]);
        assert!(j.checked.missing_ids_old.is_empty());
        assert_eq!((j.checked.expected_new, j.checked.found_new), (3, 2));
        assert!(!j.checked.unexplained);
        // It comes back: the scan changed again, the recount clears it.
        let (s, j) = check_drilled(&mut ws, &announced, &["a", "b"], &["a", "b", "c"], 120.0);
        assert_eq!(s, Status::Ok);
        assert_eq!(j.checked.missing_new, 0);
        // Without a topic to re-read, the same deletion is a mismatch
        // nobody can name, never an ok.
        assert_eq!(
            check(&mut ws, &["a", "b"], &["a", "c"], 130.0, 300.0),
            Status::Mismatch
        );
        assert!(w0(&mut ws).last.as_ref().unwrap().unexplained);
        assert_eq!(
            check(&mut ws, &["a", "b"], &["a", "c"], 140.0, 300.0),
            Status::Mismatch,
            "and on every check after, while the row is gone"
        );
        assert_eq!(
            check(&mut ws, &["a", "b"], &["a", "b", "c"], 150.0, 300.0),
            Status::Ok,
            "back: the scans match what they were measured from"
        );
    }

    #[test]
    fn rows_nobody_announced_and_rows_announced_twice_are_recounted() {
        let mut ws = Windows::new(60);
        let announced = [("a", Sent::Kafka), ("b", Sent::Kafka)];
        for (k, s) in announced {
            announce(&mut ws, 10, k, s, 50.0);
        }
        let (s, _) = check_drilled(&mut ws, &announced, &[], &["a", "b"], 100.0);
        assert_eq!(s, Status::Ok);
        // A row in NEW the stream never announced: extra, not a mismatch.
        let (s, j) = check_drilled(&mut ws, &announced, &[], &["a", "b", "x"], 110.0);
        assert_eq!(s, Status::Ok);
        assert_eq!((j.checked.expected_new, j.checked.extra_new), (2, 1));
        // a announced again after it was verified: pending again, found,
        // and the recount counts it once.
        announce(&mut ws, 10, "a", Sent::Kafka, 120.0);
        let (s, j) = check_drilled(&mut ws, &announced, &[], &["a", "b", "x"], 130.0);
        assert_eq!(s, Status::Ok);
        assert_eq!((j.checked.expected_new, j.checked.found_new), (2, 2));
        assert_eq!(w0(&mut ws).verified.new, 2);
    }

    #[test]
    fn a_check_judges_the_snapshot_it_queried_for() {
        let mut ws = Windows::new(60);
        announce(&mut ws, 10, "a", Sent::Dual, 50.0);
        let snap = w0(&mut ws).snapshot();
        // Announced while the databases were being queried: not in them.
        announce(&mut ws, 11, "b", Sent::Dual, 100.5);
        let j = judge(&snap, &reads(&["a"], &["a"]), 10, 101.0);
        assert_eq!(j.missing, 0, "b was not asked about");
        let status = conclude(&j, 101.0, 100.0, 300.0);
        assert_eq!(status, Status::Ok);
        let w = w0(&mut ws);
        w.settle_check(&snap, &j, None, status, 10);
        assert_eq!(w.status, Status::Open, "b still to be judged");
        assert!(!w.rows.contains_key("a") && w.rows.contains_key("b"));
        assert_eq!(w.verified.new, 1);
    }

    #[test]
    fn only_settled_windows_are_forgotten() {
        let mut ws = Windows::new(60);
        for (start, status) in [
            (0, Status::Ok),
            (60, Status::Pending),
            (120, Status::Mismatch),
            (180, Status::Open),
            (240, Status::Mismatch),
        ] {
            announce(&mut ws, start, "k", Sent::Kafka, 1.0);
            ws.map.get_mut(&("t".to_string(), start)).unwrap().status = status;
        }
        // A window stamped far ahead arrives; it is not due for an hour.
        announce(&mut ws, 1_000_000, "f", Sent::Kafka, 1.0);
        ws.ack("t", 240, "ops", 2.0).unwrap();
        assert_eq!(ws.prune(10.0), 2, "the ok and the acknowledged window");
        let left: Vec<i64> = ws.map.keys().map(|(_, s)| *s).collect();
        assert_eq!(left, vec![60, 120, 180, 999_960]);
        assert_eq!(ws.prune(10.0), 0);
    }

    #[test]
    fn only_a_mismatch_is_acknowledged_and_a_recovery_clears_it() {
        let mut ws = Windows::new(60);
        announce(&mut ws, 10, "a", Sent::Dual, 50.0);
        assert_eq!(ws.ack("t", 60, "ops", 1.0), Err(AckError::NoSuchWindow));
        assert_eq!(
            ws.ack("t", 0, "ops", 1.0),
            Err(AckError::NotMismatched(Status::Open))
        );
        assert_eq!(check(&mut ws, &[], &["a"], 100.0, 0.0), Status::Mismatch);
        ws.ack("t", 0, "ops", 101.0).unwrap();
        assert_eq!(
            w0(&mut ws).acked.as_ref().map(|a| a.by.as_str()),
            Some("ops")
        );
        assert_eq!(check(&mut ws, &[], &["a"], 160.0, 0.0), Status::Mismatch);
        assert!(
            w0(&mut ws).acked.is_some(),
            "still the acknowledged mismatch"
        );
        assert_eq!(check(&mut ws, &["a"], &["a"], 220.0, 0.0), Status::Ok);
        assert!(w0(&mut ws).acked.is_none());
    }

    #[test]
    fn a_row_stored_with_other_content_differs_at_once_and_is_named() {
        let mut ws = Windows::new(60);
        for k in ["a", "b", "c"] {
            announce(&mut ws, 10, k, Sent::Dual, 50.0);
        }
        let mut r = reads(&["a", "b", "c"], &["a", "b", "c"]);
        r.new.insert("b".into(), content("b, truncated"));
        let w = w0(&mut ws);
        let snap = w.snapshot();
        let j = judge(&snap, &r, 10, 60.0);
        assert_eq!((j.missing, j.defects), (0, 1));
        assert_eq!(j.checked.differing_ids_new, vec!["b".to_string()]);
        assert!(j.checked.differing_ids_old.is_empty());
        let status = conclude(&j, 60.0, 60.0, 300.0);
        assert_eq!(
            status,
            Status::Mismatch,
            "no allowance: a stored row does not change later"
        );
        w.settle_check(&snap, &j, None, status, 10);
        assert!(
            w.rows.is_empty(),
            "a differing row is a defect, not pending"
        );
        assert_eq!(
            (w.verified.new, w.verified.old, w.defects.differs_new),
            (2, 3, 1)
        );
        // It stays named on the next check, which reads nothing new.
        assert_eq!(
            check(&mut ws, &["a", "b", "c"], &["a", "b", "c"], 70.0, 300.0),
            Status::Mismatch
        );
        let c = w0(&mut ws).last.clone().unwrap();
        assert_eq!(
            (c.differs_new, c.differing_ids_new.clone()),
            (1, vec!["b".to_string()])
        );
        // A row announced without readable content is checked for presence only.
        let mut ws = Windows::new(60);
        let e = Expected::new("g".into(), Sent::Kafka, None, 55.0);
        ws.expect("t", 11, "d".into(), e, None);
        let mut r = reads(&[], &["d"]);
        r.new.insert("d".into(), content("anything"));
        let j = judge(&w0(&mut ws).snapshot(), &r, 10, 60.0);
        assert_eq!((j.missing, j.defects), (0, 0));
    }

    #[test]
    fn positions_span_each_partitions_messages() {
        let mut ws = Windows::new(60);
        for (p, o) in [(0, 7), (1, 3), (0, 2), (0, 9)] {
            let at = Some(Position {
                partition: p,
                offset: o,
            });
            let k = format!("{p}-{o}");
            ws.expect("t", 10, k.clone(), row(Sent::Kafka, &k, 1.0), at);
        }
        let w = w0(&mut ws);
        assert_eq!(w.positions, BTreeMap::from([(0, (2, 9)), (1, (3, 3))]));
    }

    #[test]
    fn negative_times_fall_in_the_right_window() {
        let mut ws = Windows::new(60);
        announce(&mut ws, -1, "k", Sent::Kafka, 1.0);
        assert!(ws.map.contains_key(&("t".to_string(), -60)));
    }

    proptest! {
        /// Whatever rows are deleted from or altered in either database
        /// after a window was verified, the drill-down names exactly those.
        #[test]
        fn the_drill_down_names_exactly_the_rows_removed_or_altered(
            rows in proptest::collection::vec((any::<bool>(), 0u8..4, 0u8..4), 1..60)
        ) {
            // (dual?, fate in NEW, fate in OLD): 0 kept, 1 deleted, 2 altered, 3 kept.
            let keys: Vec<String> = (0..rows.len()).map(|i| format!("k{i:03}")).collect();
            let announced: Vec<(&str, Sent)> = keys
                .iter()
                .zip(&rows)
                .map(|(k, (dual, _, _))| (k.as_str(), if *dual { Sent::Dual } else { Sent::Kafka }))
                .collect();
            let mut ws = Windows::new(60);
            for (k, s) in &announced {
                announce(&mut ws, 10, k, *s, 50.0);
            }
            let all_new: Vec<&str> = announced.iter().map(|(k, _)| *k).collect();
            let all_old: Vec<&str> = announced
                .iter()
                .filter(|(_, s)| *s == Sent::Dual)
                .map(|(k, _)| *k)
                .collect();
            let (s, _) = check_drilled(&mut ws, &announced, &all_old, &all_new, 100.0);
            prop_assert_eq!(s, Status::Ok);
            let mut r = reads(&all_old, &all_new);
            let (mut gone_new, mut gone_old, mut diff_new, mut diff_old) =
                (vec![], vec![], vec![], vec![]);
            for ((k, s), (_, fate_new, fate_old)) in announced.iter().zip(&rows) {
                match fate_new {
                    1 => {
                        r.new.remove(*k);
                        r.scan_new.remove(k);
                        gone_new.push(k.to_string());
                    }
                    2 => {
                        r.new.insert(k.to_string(), content("altered"));
                        diff_new.push(k.to_string());
                    }
                    _ => {}
                }
                if *s == Sent::Dual {
                    match fate_old {
                        1 => {
                            r.old.remove(*k);
                            if let Some(o) = r.scan_old.as_mut() {
                                o.remove(k);
                            }
                            gone_old.push(k.to_string());
                        }
                        2 => {
                            r.old.insert(k.to_string(), content("altered"));
                            diff_old.push(k.to_string());
                        }
                        _ => {}
                    }
                }
            }
            // An altered row keeps its key: a scan of keys cannot see it, so
            // the drill-down is forced here as a recheck of content would be.
            let w = w0(&mut ws);
            let snap = w.snapshot();
            let mut d = Drill::default();
            let rr: Vec<Reread> = announced
                .iter()
                .map(|(k, s)| Reread { key: k.to_string(), sent: *s, digest: Some(content(k)), in_new: true })
                .collect();
            d.count(&rr, &r.new, &r.old, 1000);
            d.finish();
            let j = judge(&recounted(&snap, &d), &r, 1000, 110.0);
            prop_assert_eq!(&j.checked.missing_ids_new, &gone_new);
            prop_assert_eq!(&j.checked.missing_ids_old, &gone_old);
            prop_assert_eq!(&j.checked.differing_ids_new, &diff_new);
            prop_assert_eq!(&j.checked.differing_ids_old, &diff_old);
            let wrong = gone_new.len() + gone_old.len() + diff_new.len() + diff_old.len();
            let status = conclude(&j, 110.0, 100.0, 300.0);
            prop_assert_eq!(status == Status::Ok, wrong == 0);
            // A deletion alone always shows in the scans.
            let changed = judge(&snap, &r, 1000, 110.0);
            prop_assert_eq!(
                changed.changed_new || changed.changed_old,
                !gone_new.is_empty() || !gone_old.is_empty()
            );
        }
    }
}
