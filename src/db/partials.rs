//! The bookkeeping tables several comparators share when they split a
//! topic's partitions in one consumer group: each member's heartbeat and the
//! partitions it has read in full, its partial report of every window it
//! holds, and the acknowledgements of mismatched windows, so that any
//! member serves the group's combined verdict. NEW is the coordination
//! point: nothing here knows what a report holds (it is the comparator's
//! JSON), only whose it is and when it was written.

use sqlx::Row;

use super::sql::{placeholder, quote};
use super::{classify, Db, DbError, Engine};

/// One row per member: who, what it reads, when it last wrote.
pub const MEMBERS_TABLE: &str = "switchyard_compare_members";
/// One row per member and window: its partial report.
pub const WINDOWS_TABLE: &str = "switchyard_compare_windows";
/// One row per acknowledged window.
pub const ACKS_TABLE: &str = "switchyard_compare_acks";

/// Rows per multi-row insert of window reports.
const INSERT_ROWS: usize = 200;

/// A member as it last wrote itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberRow {
    pub instance: String,
    /// The member's view of its partitions (the comparator's JSON).
    pub state: String,
    /// Unix milliseconds of the write.
    pub seen_at_ms: i64,
}

/// One member's partial report of one window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowRow {
    pub instance: String,
    pub table: String,
    pub start: i64,
    pub report: String,
}

/// An acknowledged window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckRow {
    pub table: String,
    pub start: i64,
    pub by: String,
    pub at_ms: i64,
}

/// Everything one group has written.
#[derive(Debug, Clone, Default)]
pub struct GroupRows {
    pub members: Vec<MemberRow>,
    pub windows: Vec<WindowRow>,
    pub acks: Vec<AckRow>,
}

/// The tables, per engine (`switchyard db init` creates them).
pub fn create_sql(engine: Engine, collation: &str, options: &str) -> Vec<String> {
    let (bigint, text, name) = match engine {
        Engine::Postgres => ("BIGINT", "TEXT", "TEXT".to_string()),
        // Exact names: two instances or tables differing in case are two.
        Engine::MySql => (
            "BIGINT",
            "LONGTEXT",
            format!("VARCHAR(191) CHARACTER SET utf8mb4 COLLATE {collation}"),
        ),
        Engine::Sqlite => ("INTEGER", "TEXT", "TEXT".to_string()),
    };
    let q = |s: &str| quote(engine, s);
    vec![
        format!(
            "CREATE TABLE IF NOT EXISTS {} (group_id {name} NOT NULL, instance {name} NOT NULL, \
             state {text} NOT NULL, seen_at {bigint} NOT NULL, \
             PRIMARY KEY (group_id, instance)){options}",
            q(MEMBERS_TABLE)
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {} (group_id {name} NOT NULL, instance {name} NOT NULL, \
             table_name {name} NOT NULL, window_start {bigint} NOT NULL, report {text} NOT NULL, \
             PRIMARY KEY (group_id, instance, table_name, window_start)){options}",
            q(WINDOWS_TABLE)
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {} (group_id {name} NOT NULL, table_name {name} NOT NULL, \
             window_start {bigint} NOT NULL, acked_by {text} NOT NULL, acked_at {bigint} NOT NULL, \
             PRIMARY KEY (group_id, table_name, window_start)){options}",
            q(ACKS_TABLE)
        ),
    ]
}

/// A name column as text: MySQL's exact collation makes the driver see bytes.
fn text(engine: Engine, column: &str) -> String {
    match engine {
        Engine::MySql => format!("CAST({column} AS CHAR)"),
        _ => column.to_string(),
    }
}

impl Db {
    /// Fails with [`DbError::MissingTable`] naming the first bookkeeping
    /// table of the comparators' group that is not there.
    pub async fn check_compare_tables(&self, url: &str) -> Result<(), DbError> {
        for name in [MEMBERS_TABLE, WINDOWS_TABLE, ACKS_TABLE] {
            self.require_table(name, url).await?;
        }
        Ok(())
    }

    /// Replaces what `member` wrote before: its heartbeat and every window
    /// report, in one transaction (a reader sees the old set or the new).
    pub async fn publish_member(
        &self,
        group: &str,
        member: &MemberRow,
        windows: &[(String, i64, String)],
    ) -> Result<(), DbError> {
        let engine = self.engine();
        let p = |n| placeholder(engine, n);
        let del_member = format!(
            "DELETE FROM {} WHERE group_id = {} AND instance = {}",
            quote(engine, MEMBERS_TABLE),
            p(1),
            p(2)
        );
        let ins_member = format!(
            "INSERT INTO {} (group_id, instance, state, seen_at) VALUES ({}, {}, {}, {})",
            quote(engine, MEMBERS_TABLE),
            p(1),
            p(2),
            p(3),
            p(4)
        );
        let del_windows = format!(
            "DELETE FROM {} WHERE group_id = {} AND instance = {}",
            quote(engine, WINDOWS_TABLE),
            p(1),
            p(2)
        );
        let ins_windows = format!(
            "INSERT INTO {} (group_id, instance, table_name, window_start, report) ",
            quote(engine, WINDOWS_TABLE)
        );
        with_pool!(self, pool, DB => {
            let mut tx = pool.begin().await.map_err(|e| classify(engine, e))?;
            for s in [&del_member, &del_windows] {
                sqlx::query(s)
                    .bind(group)
                    .bind(&member.instance)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| classify(engine, e))?;
            }
            sqlx::query(&ins_member)
                .bind(group)
                .bind(&member.instance)
                .bind(&member.state)
                .bind(member.seen_at_ms)
                .execute(&mut *tx)
                .await
                .map_err(|e| classify(engine, e))?;
            for chunk in windows.chunks(INSERT_ROWS) {
                let mut b = sqlx::QueryBuilder::<DB>::new(&ins_windows);
                b.push_values(chunk, |mut row, (table, start, report)| {
                    row.push_bind(group)
                        .push_bind(&member.instance)
                        .push_bind(table)
                        .push_bind(*start)
                        .push_bind(report);
                });
                b.build()
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| classify(engine, e))?;
            }
            tx.commit().await.map_err(|e| classify(engine, e))?;
        });
        Ok(())
    }

    /// Everything the group's members and acknowledgements hold.
    pub async fn read_group(&self, group: &str) -> Result<GroupRows, DbError> {
        let engine = self.engine();
        let p1 = placeholder(engine, 1);
        let members = format!(
            "SELECT {}, state, seen_at FROM {} WHERE group_id = {p1}",
            text(engine, "instance"),
            quote(engine, MEMBERS_TABLE)
        );
        let windows = format!(
            "SELECT {}, {}, window_start, report FROM {} WHERE group_id = {p1}",
            text(engine, "instance"),
            text(engine, "table_name"),
            quote(engine, WINDOWS_TABLE)
        );
        let acks = format!(
            "SELECT {}, window_start, acked_by, acked_at FROM {} WHERE group_id = {p1}",
            text(engine, "table_name"),
            quote(engine, ACKS_TABLE)
        );
        // One snapshot for the three reads: a member's heartbeat and its
        // reports are read as one publication wrote them, never half of
        // one and half of the next.
        let snapshot = match engine {
            Engine::Postgres => Some("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"),
            // InnoDB's default (REPEATABLE READ) snapshot is taken at the
            // first read; SQLite's read transaction is one snapshot.
            Engine::MySql | Engine::Sqlite => None,
        };
        with_pool!(self, pool, DB => {
            let mut tx = pool.begin().await.map_err(|e| classify(engine, e))?;
            if let Some(s) = snapshot {
                sqlx::query(s)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| classify(engine, e))?;
            }
            let mut fetched = Vec::with_capacity(3);
            for s in [members, windows, acks] {
                fetched.push(
                    sqlx::query(&s)
                        .bind(group)
                        .fetch_all(&mut *tx)
                        .await
                        .map_err(|e| classify(engine, e))?,
                );
            }
            tx.commit().await.map_err(|e| classify(engine, e))?;
            let (a, w, m) = match (fetched.pop(), fetched.pop(), fetched.pop()) {
                (Some(a), Some(w), Some(m)) => (a, w, m),
                _ => return Err(DbError::Unavailable("the group's rows were not read".into())),
            };
            let read = || -> Result<GroupRows, sqlx::Error> {
                let mut out = GroupRows::default();
                for r in &m {
                    out.members.push(MemberRow {
                        instance: r.try_get(0)?,
                        state: r.try_get(1)?,
                        seen_at_ms: r.try_get(2)?,
                    });
                }
                for r in &w {
                    out.windows.push(WindowRow {
                        instance: r.try_get(0)?,
                        table: r.try_get(1)?,
                        start: r.try_get(2)?,
                        report: r.try_get(3)?,
                    });
                }
                for r in &a {
                    out.acks.push(AckRow {
                        table: r.try_get(0)?,
                        start: r.try_get(1)?,
                        by: r.try_get(2)?,
                        at_ms: r.try_get(3)?,
                    });
                }
                Ok(out)
            };
            read().map_err(|e| classify(engine, e))
        })
    }

    /// Removes the members (and their reports) last seen before
    /// `before_ms`, or the one `instance` named (a member leaving). Members
    /// go first, then every report whose member is gone: the order in which
    /// [`Db::publish_member`] writes, so the two never wait on each other,
    /// and a member that reported meanwhile keeps its row and its reports.
    pub async fn forget_members(
        &self,
        group: &str,
        before_ms: i64,
        instance: Option<&str>,
    ) -> Result<(), DbError> {
        let engine = self.engine();
        let p = |n| placeholder(engine, n);
        let members = format!(
            "DELETE FROM {} WHERE group_id = {} AND (seen_at < {} OR instance = {})",
            quote(engine, MEMBERS_TABLE),
            p(1),
            p(2),
            p(3)
        );
        let orphans = format!(
            "DELETE FROM {} WHERE group_id = {} AND instance NOT IN \
             (SELECT instance FROM {} WHERE group_id = {})",
            quote(engine, WINDOWS_TABLE),
            p(1),
            quote(engine, MEMBERS_TABLE),
            p(2)
        );
        with_pool!(self, pool, DB => {
            let mut tx = pool.begin().await.map_err(|e| classify(engine, e))?;
            sqlx::query(&members)
                .bind(group)
                .bind(before_ms)
                .bind(instance.unwrap_or_default())
                .execute(&mut *tx)
                .await
                .map_err(|e| classify(engine, e))?;
            sqlx::query(&orphans)
                .bind(group)
                .bind(group)
                .execute(&mut *tx)
                .await
                .map_err(|e| classify(engine, e))?;
            tx.commit().await.map_err(|e| classify(engine, e))?;
        });
        Ok(())
    }

    /// Records an acknowledgement (a second one of the same window replaces it).
    pub async fn record_ack(&self, group: &str, ack: &AckRow) -> Result<(), DbError> {
        let engine = self.engine();
        let p = |n| placeholder(engine, n);
        let del = format!(
            "DELETE FROM {} WHERE group_id = {} AND table_name = {} AND window_start = {}",
            quote(engine, ACKS_TABLE),
            p(1),
            p(2),
            p(3)
        );
        let ins = format!(
            "INSERT INTO {} (group_id, table_name, window_start, acked_by, acked_at) \
             VALUES ({}, {}, {}, {}, {})",
            quote(engine, ACKS_TABLE),
            p(1),
            p(2),
            p(3),
            p(4),
            p(5)
        );
        with_pool!(self, pool, DB => {
            let mut tx = pool.begin().await.map_err(|e| classify(engine, e))?;
            sqlx::query(&del)
                .bind(group)
                .bind(&ack.table)
                .bind(ack.start)
                .execute(&mut *tx)
                .await
                .map_err(|e| classify(engine, e))?;
            sqlx::query(&ins)
                .bind(group)
                .bind(&ack.table)
                .bind(ack.start)
                .bind(&ack.by)
                .bind(ack.at_ms)
                .execute(&mut *tx)
                .await
                .map_err(|e| classify(engine, e))?;
            tx.commit().await.map_err(|e| classify(engine, e))?;
        });
        Ok(())
    }

    /// Forgets acknowledgements older than `before_ms` (past retention, the
    /// windows they were for are forgotten too).
    pub async fn forget_acks(&self, group: &str, before_ms: i64) -> Result<(), DbError> {
        let engine = self.engine();
        let s = format!(
            "DELETE FROM {} WHERE group_id = {} AND acked_at < {}",
            quote(engine, ACKS_TABLE),
            placeholder(engine, 1),
            placeholder(engine, 2)
        );
        with_pool!(self, pool, DB => {
            sqlx::query(&s)
                .bind(group)
                .bind(before_ms)
                .execute(pool)
                .await
                .map_err(|e| classify(engine, e))?;
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn group_db(dir: &std::path::Path) -> Db {
        let db = Db::connect(&format!("sqlite://{}/g.db?mode=rwc", dir.display()), 2).unwrap();
        let statements = create_sql(Engine::Sqlite, "", "");
        db.execute_all(&statements).await.unwrap();
        db
    }

    fn member(instance: &str, seen_at_ms: i64) -> MemberRow {
        MemberRow {
            instance: instance.to_string(),
            state: "{}".to_string(),
            seen_at_ms,
        }
    }

    #[tokio::test]
    async fn only_stale_or_leaving_members_are_forgotten_with_their_reports() {
        let dir = tempfile::tempdir().unwrap();
        let db = group_db(dir.path()).await;
        for (group, instance, seen_at_ms, start) in [
            ("g", "old", 1_000, 0),
            ("g", "fresh", 5_000, 60),
            ("g", "leaving", 5_000, 120),
            ("other", "old", 1_000, 0),
        ] {
            let report = [("t".to_string(), start, "{}".to_string())];
            db.publish_member(group, &member(instance, seen_at_ms), &report)
                .await
                .unwrap();
        }
        db.forget_members("g", 2_000, None).await.unwrap();
        db.forget_members("g", 0, Some("leaving")).await.unwrap();
        let g = db.read_group("g").await.unwrap();
        let members: Vec<&str> = g.members.iter().map(|m| m.instance.as_str()).collect();
        assert_eq!(members, vec!["fresh"]);
        let reports: Vec<(&str, i64)> = g
            .windows
            .iter()
            .map(|w| (w.instance.as_str(), w.start))
            .collect();
        assert_eq!(reports, vec![("fresh", 60)]);
        let other = db.read_group("other").await.unwrap();
        assert_eq!(other.members.len(), 1, "another group is left alone");
        assert_eq!(other.windows.len(), 1);
    }
}
