//! The comparator's metrics: `switchyard_compare_*`.

use prometheus::{GaugeVec, Histogram, IntCounter, IntGaugeVec, Opts, Registry};

use super::Parity;
use crate::metrics::{counter, histogram};

/// The shadow comparator.
#[derive(Clone)]
pub struct CompareMetrics {
    pub messages: IntCounter,
    pub bad_messages: IntCounter,
    pub rows_verified: IntCounter,
    pub check_seconds: Histogram,
    pub check_errors: IntCounter,
    pub acks: IntCounter,
    pub drill_downs: IntCounter,
    pub pending: prometheus::IntGauge,
    pub expected: IntGaugeVec,
    pub found: IntGaugeVec,
    pub missing: IntGaugeVec,
    pub differs: IntGaugeVec,
    pub extra: IntGaugeVec,
    pub windows: IntGaugeVec,
    pub parity_ratio: GaugeVec,
    pub last_verified_age: GaugeVec,
    /// With `--scale-out`: live members, partitions read in full by one
    /// of them, whether that is all (the verdicts are exact), and this
    /// member's own share.
    pub group_members: prometheus::IntGauge,
    pub group_covered: prometheus::IntGauge,
    pub group_complete: prometheus::IntGauge,
    pub member_partitions: prometheus::IntGauge,
}

impl CompareMetrics {
    pub fn new(reg: &Registry) -> prometheus::Result<CompareMetrics> {
        let gauge_vec =
            |name: &str, help: &str, labels: &[&str]| -> prometheus::Result<IntGaugeVec> {
                let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
                reg.register(Box::new(g.clone()))?;
                Ok(g)
            };
        let fgauge_vec =
            |name: &str, help: &str, labels: &[&str]| -> prometheus::Result<GaugeVec> {
                let g = GaugeVec::new(Opts::new(name, help), labels)?;
                reg.register(Box::new(g.clone()))?;
                Ok(g)
            };
        let gauge = |name: &str, help: &str| -> prometheus::Result<prometheus::IntGauge> {
            let g = prometheus::IntGauge::new(name, help)?;
            reg.register(Box::new(g.clone()))?;
            Ok(g)
        };
        Ok(CompareMetrics {
            group_members: gauge(
                "switchyard_compare_group_members",
                "With --scale-out: live comparators in the group",
            )?,
            group_covered: gauge(
                "switchyard_compare_group_partitions_covered",
                "With --scale-out: partitions read in full by exactly one live comparator",
            )?,
            group_complete: gauge(
                "switchyard_compare_group_complete",
                "With --scale-out: 1 when every partition is read in full by exactly one live comparator (the combined verdicts are exact)",
            )?,
            member_partitions: gauge(
                "switchyard_compare_member_partitions_covered",
                "With --scale-out: partitions this comparator has read in full",
            )?,
            messages: counter(reg, "switchyard_compare_messages_total", "Messages read from the topic")?,
            bad_messages: counter(
                reg,
                "switchyard_compare_bad_messages_total",
                "Messages the comparator could not read (not an envelope, unknown table, no key or time)",
            )?,
            rows_verified: counter(
                reg,
                "switchyard_compare_rows_verified_total",
                "Expected rows judged, per database: looked up while pending, covered by a range scan once verified",
            )?,
            check_seconds: histogram(
                reg,
                "switchyard_compare_check_duration_seconds",
                "Time of one pass over the due windows",
            )?,
            check_errors: counter(
                reg,
                "switchyard_compare_check_errors_total",
                "Passes that failed (a database unreachable)",
            )?,
            acks: counter(
                reg,
                "switchyard_compare_acks_total",
                "Mismatched windows acknowledged by a person (POST /parity/ack)",
            )?,
            drill_downs: counter(
                reg,
                "switchyard_compare_drill_downs_total",
                "Windows read again from the topic because a database's rows for them changed otherwise than by the rows found",
            )?,
            pending: gauge(
                "switchyard_compare_pending_rows",
                "Rows held by key: announced, not yet found everywhere they are due (the comparator's memory)",
            )?,
            expected: gauge_vec(
                "switchyard_compare_expected_rows",
                "Rows expected in checked windows, by table and database",
                &["table", "db"],
            )?,
            found: gauge_vec(
                "switchyard_compare_found_rows",
                "Expected rows found in checked windows, by table and database",
                &["table", "db"],
            )?,
            missing: gauge_vec(
                "switchyard_compare_missing_rows",
                "Expected rows not found in checked windows, by table and database",
                &["table", "db"],
            )?,
            differs: gauge_vec(
                "switchyard_compare_differing_rows",
                "Expected rows found with other content than the stream announced, by table and database",
                &["table", "db"],
            )?,
            extra: gauge_vec(
                "switchyard_compare_extra_rows",
                "Rows in NEW in checked windows that the stream did not announce",
                &["table"],
            )?,
            windows: gauge_vec(
                "switchyard_compare_windows",
                "Windows held, by table and status (open, ok, pending, mismatch, acknowledged)",
                &["table", "status"],
            )?,
            parity_ratio: fgauge_vec(
                "switchyard_compare_parity_ratio",
                "Found / expected over checked windows, by table and database",
                &["table", "db"],
            )?,
            last_verified_age: fgauge_vec(
                "switchyard_compare_last_verified_age_seconds",
                "Seconds since the newest window verified ok became due",
                &["table"],
            )?,
        })
    }

    /// Sets the group's gauges.
    pub fn set_group(&self, v: &super::group::GroupView, mine: usize) {
        self.group_members.set(v.members.len() as i64);
        self.group_covered.set(v.covered as i64);
        self.group_complete.set(i64::from(v.complete));
        self.member_partitions.set(mine as i64);
    }

    /// Sets the gauges from a report.
    pub fn set(&self, p: &Parity, _schema: &crate::schema::Schema) {
        for t in &p.tables {
            let tb = t.table.as_str();
            for (db, e, f, m, d, r) in [
                (
                    "old",
                    t.expected_old,
                    t.found_old,
                    t.missing_old,
                    t.differs_old,
                    t.parity_old,
                ),
                (
                    "new",
                    t.expected_new,
                    t.found_new,
                    t.missing_new,
                    t.differs_new,
                    t.parity_new,
                ),
            ] {
                self.differs.with_label_values(&[tb, db]).set(d as i64);
                self.expected.with_label_values(&[tb, db]).set(e as i64);
                self.found.with_label_values(&[tb, db]).set(f as i64);
                self.missing.with_label_values(&[tb, db]).set(m as i64);
                self.parity_ratio.with_label_values(&[tb, db]).set(r);
            }
            self.extra.with_label_values(&[tb]).set(t.extra_new);
            for (status, n) in &t.windows {
                self.windows.with_label_values(&[tb, status]).set(*n as i64);
            }
            self.last_verified_age
                .with_label_values(&[tb])
                .set(t.last_verified_age_secs.unwrap_or(-1.0));
        }
    }
}
