//! What the comparator expects and what it concluded: pure state and
//! verdicts, no I/O. Windows are slices of a table's time column; a row is
//! expected only because the stream says it was sent (dual or Kafka-only), so
//! an account that moved from legacy to dual mid-window is only expected from
//! the moment it moved.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use crate::db::digest::Digest;

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
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Still receiving rows, or not settled yet: not checked.
    Open,
    /// Everything expected was found.
    Ok,
    /// Rows missing, still within the allowed lateness.
    Pending,
    /// Rows missing past the allowed lateness (or missing after having been
    /// found: a row was lost).
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

/// The verdict for the rows one check looked for.
///
/// A row stored with other content than the stream announced `differs`: a
/// mismatch at once, as no later write changes a stored row.
/// `missing` rows were not found where they are due. A `loss` is a row that an
/// earlier check had found and this one did not: a mismatch at once. Otherwise
/// missing rows are late, not lost, until `max_lateness` after the later of
/// the window's due time and the arrival of the earliest-announced missing row
/// (`earliest_missing`): a row announced after the window was judged gets its
/// own full allowance.
pub fn verdict(
    missing: usize,
    differs: usize,
    loss: bool,
    earliest_missing: f64,
    now: f64,
    due: f64,
    max_lateness: f64,
) -> Status {
    if missing == 0 && differs == 0 {
        Status::Ok
    } else if differs > 0 || loss || now >= due.max(earliest_missing) + max_lateness {
        Status::Mismatch
    } else {
        Status::Pending
    }
}

/// One expected row.
#[derive(Debug, Clone)]
pub struct Expected {
    pub group: String,
    pub sent: Sent,
    /// Unix time the stream announced it (or raised it from Kafka-only to dual).
    pub arrived: f64,
    /// A check found it everywhere it is due: its absence later is a loss.
    pub found: bool,
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
            found: false,
            digest,
        }
    }
}

/// Who acknowledged a mismatched window, and when.
#[derive(Debug, Clone, Serialize)]
pub struct Ack {
    pub by: String,
    pub at: f64,
}

/// Why a window could not be acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckError {
    NoSuchWindow,
    NotMismatched(Status),
}

/// The result of the last check of a window.
#[derive(Debug, Clone, Default, Serialize)]
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

/// One table's rows in one slice of its time column.
#[derive(Debug, Clone)]
pub struct Window {
    pub table: String,
    pub start: i64,
    pub end: i64,
    pub rows: HashMap<String, Expected>,
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
}

/// The windows the comparator holds, keyed by (table, start).
#[derive(Debug, Default)]
pub struct Windows {
    pub width: i64,
    pub map: BTreeMap<(String, i64), Window>,
}

impl Windows {
    pub fn new(width: i64) -> Windows {
        Windows {
            width: width.max(1),
            map: BTreeMap::new(),
        }
    }

    /// Records a row the stream announced. A row seen again (a replay or a
    /// redelivery) keeps its strongest expectation (dual over Kafka-only); a
    /// redelivery that changes nothing leaves the window as it was.
    pub fn expect(&mut self, table: &str, time: i64, key: String, row: Expected) {
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
                first_arrival: now,
                last_arrival: now,
                status: Status::Open,
                revision: 0,
                due: None,
                last: None,
                acked: None,
            });
        let changed = match w.rows.get_mut(&key) {
            None => {
                w.rows.insert(key, row);
                true
            }
            Some(e) if row.sent == Sent::Dual && e.sent == Sent::Kafka => {
                // Now due in OLD too: not found there yet.
                e.sent = Sent::Dual;
                e.arrived = now;
                e.found = false;
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
}

/// What a check looked for: the window's expectations at one revision.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub revision: u64,
    pub rows: Vec<(String, Expected)>,
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
        }
    }

    /// Applies the verdict of a check of `snap`: rows found where due are
    /// remembered as found (unless their expectation changed meanwhile), and a
    /// window that changed since the snapshot is not ok until checked again.
    /// An acknowledgement holds while the window stays mismatched.
    pub fn settle_check(&mut self, snap: &Snapshot, j: &Judgement, status: Status) {
        for (key, sent) in &j.found {
            if let Some(e) = self.rows.get_mut(key) {
                if e.sent == *sent {
                    e.found = true;
                }
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

/// A check's findings about one snapshot.
#[derive(Debug, Clone)]
pub struct Judgement {
    pub checked: Checked,
    /// Keys found everywhere they were due at the snapshot.
    pub found: Vec<(String, Sent)>,
    /// A row found by an earlier check is missing now.
    pub loss: bool,
    /// The earliest arrival among the missing rows.
    pub earliest_missing: f64,
}

impl Judgement {
    pub fn missing(&self) -> usize {
        self.checked.missing_old + self.checked.missing_new
    }

    pub fn differs(&self) -> usize {
        self.checked.differs_old + self.checked.differs_new
    }
}

/// Judges a snapshot against what each database holds.
pub fn judge(
    snap: &Snapshot,
    found_old: &HashMap<String, Digest>,
    found_new: &HashMap<String, Digest>,
    in_new_by_time: i64,
    max_ids: usize,
    now: f64,
) -> Judgement {
    let mut c = Checked {
        at: now,
        ..Checked::default()
    };
    let mut by_group: HashMap<&str, usize> = HashMap::new();
    let mut ids_old = Vec::new();
    let mut ids_new = Vec::new();
    let mut diff_old = Vec::new();
    let mut diff_new = Vec::new();
    let mut found = Vec::new();
    let mut loss = false;
    let mut earliest_missing = f64::INFINITY;
    for (key, e) in &snap.rows {
        let mut missing_here = false;
        let mut differs_here = false;
        let differs = |stored: &Digest| e.digest.is_some_and(|d| d != *stored);
        c.expected_new += 1;
        match found_new.get(key) {
            Some(d) => {
                c.found_new += 1;
                if differs(d) {
                    c.differs_new += 1;
                    diff_new.push(key.clone());
                    differs_here = true;
                }
            }
            None => {
                c.missing_new += 1;
                ids_new.push(key.clone());
                missing_here = true;
            }
        }
        if e.sent == Sent::Dual {
            c.expected_old += 1;
            match found_old.get(key) {
                Some(d) => {
                    c.found_old += 1;
                    if differs(d) {
                        c.differs_old += 1;
                        diff_old.push(key.clone());
                        differs_here = true;
                    }
                }
                None => {
                    c.missing_old += 1;
                    ids_old.push(key.clone());
                    missing_here = true;
                }
            }
        }
        if missing_here || differs_here {
            *by_group.entry(e.group.as_str()).or_default() += 1;
        }
        if missing_here {
            loss |= e.found;
            earliest_missing = earliest_missing.min(e.arrived);
        } else if !differs_here {
            found.push((key.clone(), e.sent));
        }
    }
    ids_old.sort();
    ids_new.sort();
    ids_old.truncate(max_ids);
    ids_new.truncate(max_ids);
    c.missing_ids_old = ids_old;
    c.missing_ids_new = ids_new;
    for ids in [&mut diff_old, &mut diff_new] {
        ids.sort();
        ids.truncate(max_ids);
    }
    c.differing_ids_old = diff_old;
    c.differing_ids_new = diff_new;
    let mut groups: Vec<(String, usize)> = by_group
        .into_iter()
        .map(|(g, n)| (g.to_string(), n))
        .collect();
    groups.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    groups.truncate(5);
    c.worst_groups = groups;
    c.extra_new = (in_new_by_time - c.found_new as i64).max(0);
    Judgement {
        checked: c,
        found,
        loss,
        earliest_missing,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows stored with the content each key was announced with.
    fn set(keys: &[&str]) -> HashMap<String, Digest> {
        keys.iter().map(|k| (k.to_string(), content(k))).collect()
    }

    fn content(key: &str) -> Digest {
        crate::db::digest::digest(&[crate::db::digest::Canon::Text(key.to_string())])
    }

    fn w0(ws: &mut Windows) -> &mut Window {
        ws.map.get_mut(&("t".to_string(), 0)).unwrap()
    }

    /// One check of window [0, 60) as the comparator runs it: snapshot,
    /// judge, verdict, settle.
    fn check(ws: &mut Windows, old: &[&str], new: &[&str], now: f64, lateness: f64) -> Status {
        let w = w0(ws);
        let snap = w.snapshot();
        let j = judge(&snap, &set(old), &set(new), new.len() as i64, 10, now);
        let due = *w.due.get_or_insert(now);
        let status = verdict(
            j.missing(),
            j.differs(),
            j.loss,
            j.earliest_missing,
            now,
            due,
            lateness,
        );
        w.settle_check(&snap, &j, status);
        w.status
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
            verdict(1, 0, true, 80.0, 91.0, 90.0, 60.0),
            Status::Mismatch
        );
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
        ws.expect(
            "t",
            185,
            "a".into(),
            Expected::new("g1".into(), Sent::Dual, None, 1.0),
        );
        ws.expect(
            "t",
            190,
            "b".into(),
            Expected::new("g1".into(), Sent::Kafka, None, 1.0),
        );
        assert_eq!(ws.map.len(), 1, "one window: [180, 240)");
        let w = &ws.map[&("t".to_string(), 180)];
        assert_eq!((w.start, w.end), (180, 240));
        let j = judge(&w.snapshot(), &set(&["a"]), &set(&["a", "b"]), 2, 10, 2.0);
        let c = j.checked;
        assert_eq!((c.expected_old, c.expected_new), (1, 2));
        assert_eq!((c.missing_old, c.missing_new, c.extra_new), (0, 0, 0));
    }

    #[test]
    fn missing_rows_are_named_and_grouped() {
        let mut ws = Windows::new(60);
        for (k, g) in [("k1", "p1"), ("k2", "p1"), ("k3", "p2"), ("k4", "p3")] {
            ws.expect(
                "t",
                10,
                k.into(),
                Expected::new(g.into(), Sent::Dual, None, 1.0),
            );
        }
        let w = &ws.map[&("t".to_string(), 0)];
        let j = judge(
            &w.snapshot(),
            &set(&["k1", "k2", "k3", "k4"]),
            &set(&["k3", "k4"]),
            5,
            1,
            2.0,
        );
        let c = j.checked;
        assert_eq!(c.missing_new, 2);
        assert_eq!(c.missing_old, 0);
        assert_eq!(c.missing_ids_new, vec!["k1".to_string()], "bounded to 1");
        assert_eq!(c.worst_groups, vec![("p1".to_string(), 2)]);
        assert_eq!(c.extra_new, 3, "5 in NEW by time, 2 of them expected");
        assert!(!j.loss);
        assert_eq!(j.earliest_missing, 1.0);
    }

    #[test]
    fn a_replay_keeps_the_strongest_expectation_and_reopens() {
        let mut ws = Windows::new(60);
        ws.expect(
            "t",
            1,
            "k".into(),
            Expected::new("g".into(), Sent::Kafka, None, 1.0),
        );
        assert_eq!(check(&mut ws, &[], &["k"], 70.0, 300.0), Status::Ok);
        // The same announcement again changes nothing.
        ws.expect(
            "t",
            1,
            "k".into(),
            Expected::new("g".into(), Sent::Kafka, None, 2.0),
        );
        assert_eq!(w0(&mut ws).status, Status::Ok);
        ws.expect(
            "t",
            1,
            "k".into(),
            Expected::new("g".into(), Sent::Dual, None, 5.0),
        );
        let w = w0(&mut ws);
        assert_eq!(w.rows["k"].sent, Sent::Dual);
        assert!(!w.rows["k"].found, "not looked for in OLD yet");
        assert_eq!(w.status, Status::Open);
        assert_eq!(w.due_at(10.0), 70.0, "after the window's end");
    }

    #[test]
    fn a_late_row_after_ok_is_pending_from_its_arrival_then_ok_or_a_mismatch() {
        let mut ws = Windows::new(60);
        ws.expect(
            "t",
            10,
            "a".into(),
            Expected::new("g".into(), Sent::Dual, None, 50.0),
        );
        assert_eq!(check(&mut ws, &["a"], &["a"], 100.0, 300.0), Status::Ok);
        // Long after the window was due, one more row; not in NEW yet.
        ws.expect(
            "t",
            20,
            "b".into(),
            Expected::new("g".into(), Sent::Dual, None, 1000.0),
        );
        assert_eq!(w0(&mut ws).status, Status::Open);
        assert_eq!(
            check(&mut ws, &["a", "b"], &["a"], 1010.0, 300.0),
            Status::Pending,
            "late, not lost: its clock starts at its arrival"
        );
        let mut lands = Windows {
            width: 60,
            map: ws.map.clone(),
        };
        assert_eq!(
            check(&mut lands, &["a", "b"], &["a", "b"], 1200.0, 300.0),
            Status::Ok
        );
        assert_eq!(
            check(&mut ws, &["a", "b"], &["a"], 1300.0, 300.0),
            Status::Mismatch,
            "past the allowance from its arrival"
        );
    }

    #[test]
    fn a_row_found_then_missing_is_a_loss_at_once() {
        let mut ws = Windows::new(60);
        ws.expect(
            "t",
            10,
            "a".into(),
            Expected::new("g".into(), Sent::Dual, None, 50.0),
        );
        ws.expect(
            "t",
            11,
            "b".into(),
            Expected::new("g".into(), Sent::Dual, None, 50.0),
        );
        assert_eq!(
            check(&mut ws, &["a", "b"], &["a", "b"], 100.0, 300.0),
            Status::Ok
        );
        assert_eq!(
            check(&mut ws, &["a", "b"], &["a"], 110.0, 300.0),
            Status::Mismatch
        );
        // A row never found stays merely late.
        ws.expect(
            "t",
            12,
            "c".into(),
            Expected::new("g".into(), Sent::Dual, None, 120.0),
        );
        let w = w0(&mut ws);
        let j = judge(
            &w.snapshot(),
            &set(&["a", "b"]),
            &set(&["a", "b"]),
            2,
            10,
            130.0,
        );
        assert!(!j.loss);
        assert_eq!(j.earliest_missing, 120.0);
    }

    #[test]
    fn a_check_judges_the_snapshot_it_queried_for() {
        let mut ws = Windows::new(60);
        ws.expect(
            "t",
            10,
            "a".into(),
            Expected::new("g".into(), Sent::Dual, None, 50.0),
        );
        let snap = w0(&mut ws).snapshot();
        // Announced while the databases were being queried: not in them.
        ws.expect(
            "t",
            11,
            "b".into(),
            Expected::new("g".into(), Sent::Dual, None, 100.5),
        );
        let j = judge(&snap, &set(&["a"]), &set(&["a"]), 1, 10, 101.0);
        assert_eq!(j.missing(), 0, "b was not asked about");
        let status = verdict(
            j.missing(),
            j.differs(),
            j.loss,
            j.earliest_missing,
            101.0,
            100.0,
            300.0,
        );
        assert_eq!(status, Status::Ok);
        let w = w0(&mut ws);
        w.settle_check(&snap, &j, status);
        assert_eq!(w.status, Status::Open, "b still to be judged");
        assert!(w.rows["a"].found && !w.rows["b"].found);
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
            ws.expect(
                "t",
                start,
                "k".into(),
                Expected::new("g".into(), Sent::Kafka, None, 1.0),
            );
            ws.map.get_mut(&("t".to_string(), start)).unwrap().status = status;
        }
        // A window stamped far ahead arrives; it is not due for an hour.
        ws.expect(
            "t",
            1_000_000,
            "f".into(),
            Expected::new("g".into(), Sent::Kafka, None, 1.0),
        );
        ws.ack("t", 240, "ops", 2.0).unwrap();
        assert_eq!(ws.prune(10.0), 2, "the ok and the acknowledged window");
        let left: Vec<i64> = ws.map.keys().map(|(_, s)| *s).collect();
        assert_eq!(left, vec![60, 120, 180, 999_960]);
        assert_eq!(ws.prune(10.0), 0);
    }

    #[test]
    fn only_a_mismatch_is_acknowledged_and_a_recovery_clears_it() {
        let mut ws = Windows::new(60);
        ws.expect(
            "t",
            10,
            "a".into(),
            Expected::new("g".into(), Sent::Dual, None, 50.0),
        );
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
            ws.expect(
                "t",
                10,
                k.into(),
                Expected::new("g".into(), Sent::Dual, Some(content(k)), 50.0),
            );
        }
        let mut new = set(&["a", "b", "c"]);
        new.insert("b".into(), content("b, truncated"));
        let w = w0(&mut ws);
        let j = judge(&w.snapshot(), &set(&["a", "b", "c"]), &new, 3, 10, 60.0);
        assert_eq!((j.missing(), j.differs()), (0, 1));
        assert_eq!(j.checked.differing_ids_new, vec!["b".to_string()]);
        assert!(j.checked.differing_ids_old.is_empty());
        assert_eq!(j.found.len(), 2, "b is not remembered as found");
        assert_eq!(
            verdict(
                j.missing(),
                j.differs(),
                j.loss,
                j.earliest_missing,
                60.0,
                60.0,
                300.0
            ),
            Status::Mismatch,
            "no allowance: a stored row does not change later"
        );
        // A row announced without readable content is checked for presence only.
        ws.expect(
            "t",
            11,
            "d".into(),
            Expected::new("g".into(), Sent::Kafka, None, 55.0),
        );
        let mut new = set(&["a", "c", "d"]);
        new.insert("d".into(), content("anything"));
        new.insert("b".into(), content("b"));
        let j = judge(
            &w0(&mut ws).snapshot(),
            &set(&["a", "b", "c"]),
            &new,
            4,
            10,
            60.0,
        );
        assert_eq!((j.missing(), j.differs()), (0, 0));
    }

    #[test]
    fn negative_times_fall_in_the_right_window() {
        let mut ws = Windows::new(60);
        ws.expect(
            "t",
            -1,
            "k".into(),
            Expected::new("g".into(), Sent::Kafka, None, 1.0),
        );
        assert!(ws.map.contains_key(&("t".to_string(), -60)));
    }
}
