//! The parity report: `/parity` JSON, the gauges, and the one-shot table.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::{Deserialize, Serialize};

use super::group::GroupView;
use super::state::{Ack, Checked, Status, Windows};
use crate::schema::Schema;

/// The window count label of a mismatch someone acknowledged.
const ACKNOWLEDGED: &str = "acknowledged";

/// Windows listed per table in the report, newest first.
const MAX_WINDOWS: usize = 500;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WindowReport {
    pub start: i64,
    pub end: i64,
    pub status: Status,
    /// Who acknowledged the mismatch, if someone did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acked: Option<Ack>,
    /// Rows the stream announced for this window.
    pub rows: usize,
    /// Unix times (this comparator's clock) of its first and last row.
    pub first_arrival: f64,
    pub last_arrival: f64,
    /// Unix time it became checkable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub due: Option<f64>,
    pub check: Option<Checked>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct TableParity {
    pub table: String,
    /// Windows by status.
    pub windows: BTreeMap<&'static str, usize>,
    pub expected_old: usize,
    pub expected_new: usize,
    pub found_old: usize,
    pub found_new: usize,
    pub missing_old: usize,
    pub missing_new: usize,
    pub differs_old: usize,
    pub differs_new: usize,
    pub extra_new: i64,
    /// found / expected over checked windows (1 when nothing is expected).
    pub parity_old: f64,
    pub parity_new: f64,
    /// Seconds since the newest window verified ok became due.
    pub last_verified_age_secs: Option<f64>,
    pub details: Vec<WindowReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Parity {
    /// The worst verdict of any checked window not acknowledged: ok,
    /// pending, mismatch (open when nothing was checked yet).
    pub status: Status,
    pub generated_at: f64,
    pub tables: Vec<TableParity>,
    /// With `--scale-out`: the group whose partial reports this combines.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<GroupView>,
}

impl Default for Parity {
    fn default() -> Parity {
        Parity {
            status: Status::Open,
            generated_at: 0.0,
            tables: Vec::new(),
            group: None,
        }
    }
}

fn ratio(found: usize, expected: usize) -> f64 {
    if expected == 0 {
        1.0
    } else {
        found as f64 / expected as f64
    }
}

/// Which windows a report covers.
#[derive(Debug, Clone, Copy)]
pub struct Filter {
    /// Overlapping `[from, to)` of the time column.
    pub from: i64,
    pub to: i64,
    /// And received a row at or after this Unix time (arrival clock).
    pub arrived_since: Option<f64>,
}

/// Every window held, as reported: (table, report), in key order.
pub fn reports(ws: &Windows, settle: f64) -> Vec<(String, WindowReport)> {
    ws.map
        .values()
        .map(|w| {
            (
                w.table.clone(),
                WindowReport {
                    start: w.start,
                    end: w.end,
                    status: w.status,
                    acked: w.acked.clone(),
                    rows: w.announced() as usize,
                    first_arrival: w.first_arrival,
                    last_arrival: w.last_arrival,
                    due: Some(w.due.unwrap_or_else(|| w.due_at(settle))),
                    check: w.last.clone(),
                },
            )
        })
        .collect()
}

/// The report over every window held, or only those `filter` selects.
pub fn build(
    ws: &Windows,
    schema: &Schema,
    now: f64,
    settle: f64,
    filter: Option<Filter>,
) -> Parity {
    let all = reports(ws, settle);
    assemble(schema, all.iter().rev(), now, filter)
}

/// The report over `windows` (newest first), or only those `filter` selects.
pub fn assemble<'a>(
    schema: &Schema,
    windows: impl Iterator<Item = &'a (String, WindowReport)>,
    now: f64,
    filter: Option<Filter>,
) -> Parity {
    let mut tables: Vec<TableParity> = schema
        .tables()
        .iter()
        .map(|t| TableParity {
            table: t.name.clone(),
            windows: [Status::Open, Status::Ok, Status::Pending, Status::Mismatch]
                .iter()
                .map(|s| s.as_str())
                .chain([ACKNOWLEDGED])
                .map(|s| (s, 0))
                .collect(),
            ..TableParity::default()
        })
        .collect();
    let mut overall = Status::Open;
    let windows = windows.filter(|(_, w)| {
        filter.is_none_or(|f| {
            w.end > f.from && w.start < f.to && f.arrived_since.is_none_or(|t| w.last_arrival >= t)
        })
    });
    for (table, w) in windows {
        let Some(t) = tables.iter_mut().find(|t| &t.table == table) else {
            continue;
        };
        let label = if w.acked.is_some() {
            ACKNOWLEDGED
        } else {
            w.status.as_str()
        };
        *t.windows.entry(label).or_default() += 1;
        if w.status != Status::Open && w.acked.is_none() {
            overall = overall.max(w.status);
        }
        if let Some(c) = &w.check {
            t.expected_old += c.expected_old;
            t.expected_new += c.expected_new;
            t.found_old += c.found_old;
            t.found_new += c.found_new;
            t.missing_old += c.missing_old;
            t.missing_new += c.missing_new;
            t.differs_old += c.differs_old;
            t.differs_new += c.differs_new;
            t.extra_new += c.extra_new;
        }
        if w.status == Status::Ok {
            let age = now - w.due.unwrap_or(now);
            t.last_verified_age_secs = Some(match t.last_verified_age_secs {
                Some(a) => a.min(age),
                None => age,
            });
        }
        if t.details.len() < MAX_WINDOWS {
            t.details.push(w.clone());
        }
    }
    for t in &mut tables {
        t.parity_old = ratio(t.found_old, t.expected_old);
        t.parity_new = ratio(t.found_new, t.expected_new);
        t.last_verified_age_secs = t.last_verified_age_secs.map(|a| a.max(0.0));
    }
    Parity {
        status: overall,
        generated_at: now,
        tables,
        group: None,
    }
}

impl Parity {
    /// The one-shot table a person reads.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<16} {:>23}  {:<8} {:>15} {:>15} {:>15} {:>7}",
            "table",
            "window [from, to)",
            "status",
            "expected o/n",
            "found o/n",
            "missing o/n",
            "extra"
        );
        for t in &self.tables {
            for w in t.details.iter().rev() {
                let (e, f, m, x) = match &w.check {
                    Some(c) => (
                        format!("{}/{}", c.expected_old, c.expected_new),
                        format!("{}/{}", c.found_old, c.found_new),
                        format!("{}/{}", c.missing_old, c.missing_new),
                        c.extra_new.to_string(),
                    ),
                    None => ("-".into(), "-".into(), "-".into(), "-".into()),
                };
                let _ = writeln!(
                    out,
                    "{:<16} {:>23}  {:<8} {:>15} {:>15} {:>15} {:>7}",
                    t.table,
                    format!("{}–{}", w.start, w.end),
                    if w.acked.is_some() {
                        "acked"
                    } else {
                        w.status.as_str()
                    },
                    e,
                    f,
                    m,
                    x
                );
                if let Some(c) = &w.check {
                    if !c.missing_ids_old.is_empty() {
                        let _ =
                            writeln!(out, "    missing in OLD: {}", c.missing_ids_old.join(", "));
                    }
                    if !c.missing_ids_new.is_empty() {
                        let _ =
                            writeln!(out, "    missing in NEW: {}", c.missing_ids_new.join(", "));
                    }
                    if !c.differing_ids_old.is_empty() {
                        let _ = writeln!(
                            out,
                            "    differs in OLD: {}",
                            c.differing_ids_old.join(", ")
                        );
                    }
                    if !c.differing_ids_new.is_empty() {
                        let _ = writeln!(
                            out,
                            "    differs in NEW: {}",
                            c.differing_ids_new.join(", ")
                        );
                    }
                    if !c.worst_groups.is_empty()
                        && (c.missing_old + c.missing_new + c.differs_old + c.differs_new) > 0
                    {
                        let groups: Vec<String> = c
                            .worst_groups
                            .iter()
                            .map(|(g, n)| format!("{g}: {n}"))
                            .collect();
                        let _ = writeln!(out, "    by group: {}", groups.join(", "));
                    }
                }
            }
            let _ = writeln!(
                out,
                "{:<16} total: expected {}/{}, found {}/{}, missing {}/{}, differs {}/{}, extra {}; parity OLD {:.6}, NEW {:.6}",
                t.table,
                t.expected_old,
                t.expected_new,
                t.found_old,
                t.found_new,
                t.missing_old,
                t.missing_new,
                t.differs_old,
                t.differs_new,
                t.extra_new,
                t.parity_old,
                t.parity_new
            );
        }
        let _ = writeln!(out, "parity: {}", self.status.as_str());
        out
    }
}
