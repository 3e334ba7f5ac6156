//! What the comparator expects and what it concluded: pure state and
//! verdicts, no I/O. Windows are slices of a table's time column; a row is
//! expected only because the stream says it was sent (dual or Kafka-only), so
//! an account that moved from legacy to dual mid-window is only expected from
//! the moment it moved.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

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

/// The verdict for a window that was just checked.
/// `due` is when it became checkable; `was_ok` whether a check already found
/// everything (then a missing row is a loss, not lateness).
pub fn verdict(missing: usize, was_ok: bool, now: f64, due: f64, max_lateness: f64) -> Status {
    if missing == 0 {
        Status::Ok
    } else if was_ok || now >= due + max_lateness {
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
    /// Rows in NEW in this window that the stream did not announce.
    pub extra_new: i64,
    /// The group values with the most missing rows: (group, missing).
    pub worst_groups: Vec<(String, usize)>,
    /// A bounded list of missing keys, per database.
    pub missing_ids_old: Vec<String>,
    pub missing_ids_new: Vec<String>,
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
    /// Unix time the last row arrived (a window settles after its last row).
    pub last_arrival: f64,
    pub status: Status,
    pub was_ok: bool,
    /// Unix time the window became checkable, fixed at its first check.
    pub due: Option<f64>,
    pub last: Option<Checked>,
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
    /// redelivery) keeps its strongest expectation (dual over Kafka-only).
    pub fn expect(
        &mut self,
        table: &str,
        time: i64,
        key: String,
        group: String,
        sent: Sent,
        now: f64,
    ) {
        let start = time.div_euclid(self.width) * self.width;
        let w = self
            .map
            .entry((table.to_string(), start))
            .or_insert_with(|| Window {
                table: table.to_string(),
                start,
                end: start + self.width,
                rows: HashMap::new(),
                last_arrival: now,
                status: Status::Open,
                was_ok: false,
                due: None,
                last: None,
            });
        w.last_arrival = now;
        let e = w.rows.entry(key).or_insert(Expected {
            group: group.clone(),
            sent,
        });
        if sent == Sent::Dual {
            e.sent = Sent::Dual;
        }
        // New rows reopen the question for a window already judged.
        if w.status == Status::Ok {
            w.status = Status::Open;
        }
    }

    /// Forgets windows whose last row arrived before `before`.
    pub fn prune(&mut self, before: f64) -> usize {
        let n = self.map.len();
        self.map.retain(|_, w| w.last_arrival >= before);
        n - self.map.len()
    }
}

/// Builds a window's check result from what each database holds.
pub fn judge(
    w: &Window,
    found_old: &std::collections::HashSet<String>,
    found_new: &std::collections::HashSet<String>,
    in_new_by_time: i64,
    max_ids: usize,
    now: f64,
) -> Checked {
    let mut c = Checked {
        at: now,
        ..Checked::default()
    };
    let mut by_group: HashMap<&str, usize> = HashMap::new();
    let mut ids_old = Vec::new();
    let mut ids_new = Vec::new();
    for (key, e) in &w.rows {
        let mut missing_here = false;
        c.expected_new += 1;
        if found_new.contains(key) {
            c.found_new += 1;
        } else {
            c.missing_new += 1;
            ids_new.push(key.clone());
            missing_here = true;
        }
        if e.sent == Sent::Dual {
            c.expected_old += 1;
            if found_old.contains(key) {
                c.found_old += 1;
            } else {
                c.missing_old += 1;
                ids_old.push(key.clone());
                missing_here = true;
            }
        }
        if missing_here {
            *by_group.entry(e.group.as_str()).or_default() += 1;
        }
    }
    ids_old.sort();
    ids_new.sort();
    ids_old.truncate(max_ids);
    ids_new.truncate(max_ids);
    c.missing_ids_old = ids_old;
    c.missing_ids_new = ids_new;
    let mut groups: Vec<(String, usize)> = by_group
        .into_iter()
        .map(|(g, n)| (g.to_string(), n))
        .collect();
    groups.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    groups.truncate(5);
    c.worst_groups = groups;
    c.extra_new = (in_new_by_time - c.found_new as i64).max(0);
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn set(keys: &[&str]) -> HashSet<String> {
        keys.iter().map(|k| k.to_string()).collect()
    }

    #[test]
    fn verdicts() {
        assert_eq!(verdict(0, false, 100.0, 90.0, 60.0), Status::Ok);
        assert_eq!(verdict(3, false, 100.0, 90.0, 60.0), Status::Pending);
        assert_eq!(verdict(3, false, 150.0, 90.0, 60.0), Status::Mismatch);
        // Found before, missing now: a loss, at once.
        assert_eq!(verdict(1, true, 91.0, 90.0, 60.0), Status::Mismatch);
    }

    #[test]
    fn a_row_is_expected_only_where_it_was_sent() {
        let mut ws = Windows::new(60);
        // Minute 0–2: account legacy, nothing in the stream. Minute 3: dual.
        ws.expect("t", 185, "a".into(), "g1".into(), Sent::Dual, 1.0);
        ws.expect("t", 190, "b".into(), "g1".into(), Sent::Kafka, 1.0);
        assert_eq!(ws.map.len(), 1, "one window: [180, 240)");
        let w = &ws.map[&("t".to_string(), 180)];
        assert_eq!((w.start, w.end), (180, 240));
        let c = judge(w, &set(&["a"]), &set(&["a", "b"]), 2, 10, 2.0);
        assert_eq!((c.expected_old, c.expected_new), (1, 2));
        assert_eq!((c.missing_old, c.missing_new, c.extra_new), (0, 0, 0));
    }

    #[test]
    fn missing_rows_are_named_and_grouped() {
        let mut ws = Windows::new(60);
        for (k, g) in [("k1", "p1"), ("k2", "p1"), ("k3", "p2"), ("k4", "p3")] {
            ws.expect("t", 10, k.into(), g.into(), Sent::Dual, 1.0);
        }
        let w = &ws.map[&("t".to_string(), 0)];
        let c = judge(
            w,
            &set(&["k1", "k2", "k3", "k4"]),
            &set(&["k3", "k4"]),
            5,
            1,
            2.0,
        );
        assert_eq!(c.missing_new, 2);
        assert_eq!(c.missing_old, 0);
        assert_eq!(c.missing_ids_new, vec!["k1".to_string()], "bounded to 1");
        assert_eq!(c.worst_groups, vec![("p1".to_string(), 2)]);
        assert_eq!(c.extra_new, 3, "5 in NEW by time, 2 of them expected");
    }

    #[test]
    fn a_replay_keeps_the_strongest_expectation_and_reopens() {
        let mut ws = Windows::new(60);
        ws.expect("t", 1, "k".into(), "g".into(), Sent::Kafka, 1.0);
        ws.map.get_mut(&("t".to_string(), 0)).unwrap().status = Status::Ok;
        ws.expect("t", 1, "k".into(), "g".into(), Sent::Dual, 5.0);
        let w = &ws.map[&("t".to_string(), 0)];
        assert_eq!(w.rows["k"].sent, Sent::Dual);
        assert_eq!(w.status, Status::Open);
        assert_eq!(w.due_at(10.0), 70.0, "after the window's end");
        assert_eq!(ws.prune(6.0), 1);
    }

    #[test]
    fn negative_times_fall_in_the_right_window() {
        let mut ws = Windows::new(60);
        ws.expect("t", -1, "k".into(), "g".into(), Sent::Kafka, 1.0);
        assert!(ws.map.contains_key(&("t".to_string(), -60)));
    }
}
