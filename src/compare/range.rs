//! `switchyard compare --range`: one table verified between OLD and NEW over
//! a key range and/or a time range, without the stream, in constant memory.
//!
//! Each database computes a checksum (count and sum of 60-bit row hashes) of
//! a key segment itself; segments whose checksums differ are split at key
//! boundaries (numeric for integer and UUID keys, by code point past a
//! shared prefix for string keys, never OFFSET) and checked again, down to
//! segments small enough to stream: both sides' (key, hash) pairs then come
//! out in key order and are merged, which names every missing, extra and
//! differing row. A table with a column that has no canonical SQL text
//! (float, JSON) is streamed whole and hashed here with the stream
//! comparator's digest. The search is depth first: what is held is one path
//! of segments and two bounded channels, whatever the table's size.

use std::future::Future;
use std::process::ExitCode;
use std::time::Instant;

use futures_util::StreamExt;
use serde::Serialize;
use tokio::sync::mpsc;

use crate::db::range::{Checksum, Filter, Key, KeyKind};
use crate::db::{Db, DbError};
use crate::schema::Table;

/// A key segment `[lo, hi)`; None is unbounded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Segment {
    pub lo: Option<Key>,
    pub hi: Option<Key>,
}

impl Segment {
    pub fn contains(&self, k: &Key) -> bool {
        self.lo.as_ref().is_none_or(|lo| k >= lo) && self.hi.as_ref().is_none_or(|hi| k < hi)
    }
}

/// Why a range comparison could not finish.
#[derive(Debug, thiserror::Error)]
pub enum RangeError {
    #[error(transparent)]
    Db(#[from] DbError),
    /// A side returned keys out of the order the other side and this process
    /// use (a key column whose collation is not the exact one): merging
    /// would misreport rows, so nothing is reported.
    #[error("the {side} database returned key {key:?} after {prev:?}: its key order is not byte order (check the key column's collation)")]
    Order {
        side: &'static str,
        prev: String,
        key: String,
    },
}

impl RangeError {
    /// A configuration to fix (exit 2), not an outage.
    pub fn is_config(&self) -> bool {
        match self {
            RangeError::Db(e) => e.is_config(),
            RangeError::Order { .. } => true,
        }
    }
}

/// One database's rows of the compared range.
pub trait Side: Sync {
    /// Whether [`Side::checksum`] is available (the database hashes rows).
    fn in_sql(&self) -> bool;
    fn checksum(&self, seg: &Segment) -> impl Future<Output = Result<Checksum, RangeError>> + Send;
    /// The smallest and largest key in `seg`, None when it is empty.
    fn ends(
        &self,
        seg: &Segment,
    ) -> impl Future<Output = Result<Option<(Key, Key)>, RangeError>> + Send;
    /// Sends `seg`'s (key, hash) pairs in key order, in batches; returns
    /// early once the receiver is gone.
    fn rows(
        &self,
        seg: &Segment,
        tx: mpsc::Sender<Vec<(Key, u128)>>,
    ) -> impl Future<Output = Result<(), RangeError>> + Send;
}

/// How the search splits and when it streams.
#[derive(Debug, Clone, Copy)]
pub struct Tuning {
    /// Names listed per kind of difference (the counts are always exact).
    pub max_ids: usize,
    /// A differing segment with at most this many rows on each side is streamed.
    pub threshold: u64,
    /// Children per split.
    pub factor: usize,
    /// Children checksummed at once (each on both sides).
    pub concurrency: usize,
}

impl Default for Tuning {
    fn default() -> Tuning {
        Tuning {
            max_ids: 100,
            threshold: 16_384,
            factor: 32,
            concurrency: 2,
        }
    }
}

/// What differs, with exact counts and the first `max_ids` keys of each kind
/// in key order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Differences {
    /// In OLD, not in NEW.
    pub missing: u64,
    /// In NEW, not in OLD.
    pub extra: u64,
    /// In both, with other content.
    pub differs: u64,
    pub missing_ids: Vec<String>,
    pub extra_ids: Vec<String>,
    pub differing_ids: Vec<String>,
}

/// What one key of a merge is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The OLD row's key comes first: NEW lacks it.
    Missing,
    /// The NEW row's key comes first: OLD lacks it.
    Extra,
    Same,
    Differs,
}

/// Compares the heads of two key-ordered row streams.
pub fn step(old: &(Key, u128), new: &(Key, u128)) -> Step {
    match old.0.cmp(&new.0) {
        std::cmp::Ordering::Less => Step::Missing,
        std::cmp::Ordering::Greater => Step::Extra,
        std::cmp::Ordering::Equal if old.1 == new.1 => Step::Same,
        std::cmp::Ordering::Equal => Step::Differs,
    }
}

impl Differences {
    pub fn record(&mut self, step: Step, key: &Key, max_ids: usize) {
        let (n, ids) = match step {
            Step::Same => return,
            Step::Missing => (&mut self.missing, &mut self.missing_ids),
            Step::Extra => (&mut self.extra, &mut self.extra_ids),
            Step::Differs => (&mut self.differs, &mut self.differing_ids),
        };
        *n += 1;
        if ids.len() < max_ids {
            ids.push(key.to_string());
        }
    }

    pub fn is_empty(&self) -> bool {
        self.missing == 0 && self.extra == 0 && self.differs == 0
    }
}

/// `ceil(span * i / k)` without overflow, for `span` up to `u128::MAX`.
fn part(span: u128, i: u128, k: u128) -> u128 {
    (span / k) * i + ((span % k) * i).div_ceil(k)
}

/// Points `p_1 < … < p_m` (m < k) with `a < p ≤ b`, evenly spread over
/// `(a, b]` by value: the starts of all children but the first.
fn points_u128(a: u128, b: u128, k: usize) -> Vec<u128> {
    let k = k.max(2) as u128;
    let mut out: Vec<u128> = (1..k).map(|i| a + part(b - a, i, k)).collect();
    out.dedup();
    out.retain(|p| *p > a && *p <= b);
    out
}

/// Code points a split boundary of a string key is built from past the
/// shared prefix (base 0x110000, 4 digits: 84 bits).
const TEXT_DIGITS: usize = 4;
const BASE: u128 = 0x11_0000;

fn text_number(chars: &[char]) -> u128 {
    (0..TEXT_DIGITS).fold(0, |n, i| {
        n * BASE + chars.get(i).map_or(0, |c| u128::from(u32::from(*c)))
    })
}

/// The string of a number of [`text_number`]: trailing zero digits dropped,
/// others made characters both databases take (no NUL, no surrogate).
fn number_text(mut n: u128) -> String {
    let mut digits = [0u32; TEXT_DIGITS];
    for d in digits.iter_mut().rev() {
        *d = (n % BASE) as u32;
        n /= BASE;
    }
    let len = digits.iter().rposition(|d| *d != 0).map_or(0, |i| i + 1);
    digits[..len]
        .iter()
        .map(|&d| match d {
            0 => '\u{1}',
            0xD800..=0xDFFF => '\u{E000}',
            d => char::from_u32(d).unwrap_or('\u{E000}'),
        })
        .collect()
}

/// The split points of the key range `[a, b]` (its smallest and largest key
/// on either side): strictly increasing, each `> a` and `≤ b`, at most
/// `k - 1`. Empty when the range cannot be split (one key).
pub fn split_points(a: &Key, b: &Key, k: usize) -> Vec<Key> {
    let mut out = match (a, b) {
        (Key::Int(x), Key::Int(y)) if x < y => {
            let off = |v: i64| (i128::from(v) - i128::from(i64::MIN)) as u128;
            points_u128(off(*x), off(*y), k)
                .into_iter()
                .map(|p| Key::Int((p as i128 + i128::from(i64::MIN)) as i64))
                .collect()
        }
        (Key::Uuid(x), Key::Uuid(y)) if x < y => {
            points_u128(*x, *y, k).into_iter().map(Key::Uuid).collect()
        }
        (Key::Text(x), Key::Text(y)) if x < y => {
            let xs: Vec<char> = x.chars().collect();
            let ys: Vec<char> = y.chars().collect();
            let shared = xs.iter().zip(&ys).take_while(|(p, q)| p == q).count();
            let prefix: String = xs[..shared].iter().collect();
            let (nx, ny) = (text_number(&xs[shared..]), text_number(&ys[shared..]));
            if nx >= ny {
                Vec::new()
            } else {
                points_u128(nx, ny, k)
                    .into_iter()
                    .map(|p| Key::Text(format!("{prefix}{}", number_text(p))))
                    .collect()
            }
        }
        _ => Vec::new(),
    };
    // Making digits valid characters can move a point: keep only what is
    // strictly inside, in order.
    out.sort();
    out.dedup();
    out.retain(|p| p > a && p <= b);
    out
}

/// The children of `seg` at `points` (already inside it): they cover it
/// exactly, in key order.
pub fn children(seg: &Segment, points: &[Key]) -> Vec<Segment> {
    let points: Vec<&Key> = points.iter().filter(|p| seg.contains(p)).collect();
    let mut out = Vec::with_capacity(points.len() + 1);
    let mut lo = seg.lo.clone();
    for p in points {
        if lo.as_ref().is_some_and(|l| p <= l) {
            continue;
        }
        out.push(Segment {
            lo: lo.clone(),
            hi: Some(p.clone()),
        });
        lo = Some(p.clone());
    }
    out.push(Segment {
        lo,
        hi: seg.hi.clone(),
    });
    out
}

/// What a search did, besides the differences.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Work {
    /// Rows in the range on each side.
    pub rows_old: u64,
    pub rows_new: u64,
    /// Segments checksummed (each on both sides).
    pub segments: u64,
    /// Rows streamed out of each side.
    pub streamed_old: u64,
    pub streamed_new: u64,
}

/// Reads one side's batches in order, checking the order.
struct Reader {
    side: &'static str,
    rx: mpsc::Receiver<Vec<(Key, u128)>>,
    batch: std::vec::IntoIter<(Key, u128)>,
    last: Option<Key>,
    read: u64,
}

impl Reader {
    fn new(side: &'static str, rx: mpsc::Receiver<Vec<(Key, u128)>>) -> Reader {
        Reader {
            side,
            rx,
            batch: Vec::new().into_iter(),
            last: None,
            read: 0,
        }
    }

    async fn next(&mut self) -> Result<Option<(Key, u128)>, RangeError> {
        loop {
            if let Some(row) = self.batch.next() {
                if let Some(prev) = &self.last {
                    if row.0 <= *prev {
                        return Err(RangeError::Order {
                            side: self.side,
                            prev: prev.to_string(),
                            key: row.0.to_string(),
                        });
                    }
                }
                self.last = Some(row.0.clone());
                self.read += 1;
                return Ok(Some(row));
            }
            match self.rx.recv().await {
                Some(b) => self.batch = b.into_iter(),
                None => return Ok(None),
            }
        }
    }
}

/// Merges `seg`'s rows of both sides into `diffs`.
async fn merge<S: Side>(
    old: &S,
    new: &S,
    seg: &Segment,
    diffs: &mut Differences,
    work: &mut Work,
    max_ids: usize,
) -> Result<(), RangeError> {
    let (to, ro) = mpsc::channel(4);
    let (tn, rn) = mpsc::channel(4);
    let consume = async {
        let mut a = Reader::new("OLD", ro);
        let mut b = Reader::new("NEW", rn);
        let mut x = a.next().await?;
        let mut y = b.next().await?;
        loop {
            match (&x, &y) {
                (None, None) => break,
                (Some(o), None) => {
                    diffs.record(Step::Missing, &o.0, max_ids);
                    x = a.next().await?;
                }
                (None, Some(n)) => {
                    diffs.record(Step::Extra, &n.0, max_ids);
                    y = b.next().await?;
                }
                (Some(o), Some(n)) => {
                    let s = step(o, n);
                    match s {
                        Step::Missing => {
                            diffs.record(s, &o.0, max_ids);
                            x = a.next().await?;
                        }
                        Step::Extra => {
                            diffs.record(s, &n.0, max_ids);
                            y = b.next().await?;
                        }
                        Step::Same | Step::Differs => {
                            diffs.record(s, &o.0, max_ids);
                            x = a.next().await?;
                            y = b.next().await?;
                        }
                    }
                }
            }
        }
        Ok::<_, RangeError>((a.read, b.read))
    };
    let (po, pn, merged) = tokio::join!(old.rows(seg, to), new.rows(seg, tn), consume);
    let (ra, rb) = merged?;
    po?;
    pn?;
    work.streamed_old += ra;
    work.streamed_new += rb;
    Ok(())
}

/// `seg` split at `factor` points between the smallest and the largest key
/// either side holds in it (fewer than two children: not splittable).
async fn split<S: Side>(
    old: &S,
    new: &S,
    seg: &Segment,
    factor: usize,
) -> Result<Vec<Segment>, RangeError> {
    let (eo, en) = futures_util::try_join!(old.ends(seg), new.ends(seg))?;
    let ends = match (eo, en) {
        (Some((a, b)), Some((c, d))) => Some((a.min(c), b.max(d))),
        (one, other) => one.or(other),
    };
    Ok(match &ends {
        Some((a, b)) => children(seg, &split_points(a, b, factor)),
        None => Vec::new(),
    })
}

/// Each segment's checksum on both sides, `concurrency` segments at a time,
/// in the segments' order.
async fn checksums<S: Side>(
    old: &S,
    new: &S,
    segs: Vec<Segment>,
    concurrency: usize,
) -> Result<Vec<(Segment, Checksum, Checksum)>, RangeError> {
    futures_util::stream::iter(segs.into_iter().map(|seg| async move {
        let (a, b) = futures_util::try_join!(old.checksum(&seg), new.checksum(&seg))?;
        Ok::<_, RangeError>((seg, a, b))
    }))
    .buffered(concurrency.max(1))
    .collect::<Vec<_>>()
    .await
    .into_iter()
    .collect()
}

/// Compares `root` between the two sides: checksums and bisection when both
/// hash in SQL, one streamed merge otherwise.
pub async fn diff<S: Side>(
    old: &S,
    new: &S,
    root: &Segment,
    tuning: Tuning,
) -> Result<(Differences, Work), RangeError> {
    let mut diffs = Differences::default();
    let mut work = Work::default();
    if !(old.in_sql() && new.in_sql()) {
        merge(old, new, root, &mut diffs, &mut work, tuning.max_ids).await?;
        work.rows_old = work.streamed_old;
        work.rows_new = work.streamed_new;
        return Ok((diffs, work));
    }
    // A database computes one query on one core: with more than one at a
    // time, the root is checksummed as its children, side by side, as
    // data-diff's threads do; their sums add up to the root's.
    let parts = if tuning.concurrency > 1 {
        split(old, new, root, tuning.factor).await?
    } else {
        Vec::new()
    };
    // Depth first, children in key order: one path of pending siblings.
    let mut stack = Vec::new();
    if parts.len() >= 2 {
        let sums = checksums(old, new, parts, tuning.concurrency).await?;
        work.segments = sums.len() as u64;
        work.rows_old = sums.iter().map(|(_, a, _)| a.count).sum();
        work.rows_new = sums.iter().map(|(_, _, b)| b.count).sum();
        stack.extend(sums.into_iter().rev().filter(|(_, a, b)| a != b));
    } else {
        let (co, cn) = futures_util::try_join!(old.checksum(root), new.checksum(root))?;
        work.segments = 1;
        work.rows_old = co.count;
        work.rows_new = cn.count;
        stack.push((root.clone(), co, cn));
    }
    while let Some((seg, co, cn)) = stack.pop() {
        if co == cn {
            continue;
        }
        if co.count.max(cn.count) <= tuning.threshold {
            merge(old, new, &seg, &mut diffs, &mut work, tuning.max_ids).await?;
            continue;
        }
        let kids = split(old, new, &seg, tuning.factor).await?;
        if kids.len() < 2 {
            merge(old, new, &seg, &mut diffs, &mut work, tuning.max_ids).await?;
            continue;
        }
        let sums = checksums(old, new, kids, tuning.concurrency).await?;
        work.segments += sums.len() as u64;
        stack.extend(sums.into_iter().rev().filter(|(_, a, b)| a != b));
    }
    Ok((diffs, work))
}

/// One side as a database.
pub struct DbSide<'a> {
    pub db: &'a Db,
    pub table: &'a Table,
    pub kind: KeyKind,
    pub from: Option<i64>,
    pub to: Option<i64>,
    /// The row hash expression, when both databases hash in SQL.
    pub hash: Option<String>,
}

impl DbSide<'_> {
    fn filter(&self, seg: &Segment) -> Filter {
        Filter {
            lo: seg.lo.clone(),
            hi: seg.hi.clone(),
            from: self.from,
            to: self.to,
        }
    }
}

impl Side for DbSide<'_> {
    fn in_sql(&self) -> bool {
        self.hash.is_some()
    }

    async fn checksum(&self, seg: &Segment) -> Result<Checksum, RangeError> {
        let hash = self.hash.as_deref().unwrap_or("0");
        Ok(self
            .db
            .range_checksum(self.table, self.kind, hash, &self.filter(seg))
            .await?)
    }

    async fn ends(&self, seg: &Segment) -> Result<Option<(Key, Key)>, RangeError> {
        Ok(self
            .db
            .range_ends(self.table, self.kind, &self.filter(seg))
            .await?)
    }

    async fn rows(
        &self,
        seg: &Segment,
        tx: mpsc::Sender<Vec<(Key, u128)>>,
    ) -> Result<(), RangeError> {
        Ok(self
            .db
            .range_rows(
                self.table,
                self.kind,
                &self.filter(seg),
                self.hash.as_deref(),
                tx,
            )
            .await?)
    }
}

/// The report `compare --range` prints.
#[derive(Debug, Clone, Serialize)]
pub struct RangeReport {
    pub table: String,
    /// `equal` or `differs`.
    pub status: &'static str,
    pub key_from: Option<String>,
    pub key_to: Option<String>,
    pub from: Option<i64>,
    pub to: Option<i64>,
    /// `sql`: checksums computed inside both databases; `process`: rows
    /// streamed and digested here.
    pub hashing: &'static str,
    #[serde(flatten)]
    pub work: Work,
    #[serde(flatten)]
    pub differences: Differences,
    pub elapsed_secs: f64,
}

impl RangeReport {
    /// The text a person reads.
    pub fn text(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let range = |a: &Option<String>, b: &Option<String>| {
            format!(
                "[{}, {})",
                a.as_deref().unwrap_or("-∞"),
                b.as_deref().unwrap_or("+∞")
            )
        };
        let _ = writeln!(
            out,
            "table {}: keys {}, time {}",
            self.table,
            range(&self.key_from, &self.key_to),
            range(
                &self.from.map(|v| v.to_string()),
                &self.to.map(|v| v.to_string())
            )
        );
        let _ = writeln!(
            out,
            "rows: OLD {}, NEW {}; missing in NEW {}, extra in NEW {}, differs {}",
            self.work.rows_old,
            self.work.rows_new,
            self.differences.missing,
            self.differences.extra,
            self.differences.differs
        );
        for (what, ids) in [
            ("missing in NEW", &self.differences.missing_ids),
            ("extra in NEW", &self.differences.extra_ids),
            ("differs", &self.differences.differing_ids),
        ] {
            if !ids.is_empty() {
                let _ = writeln!(out, "    {what}: {}", ids.join(", "));
            }
        }
        let _ = writeln!(
            out,
            "hashing: {}; {} segments checksummed, {}/{} rows streamed (OLD/NEW) in {:.3}s",
            self.hashing,
            self.work.segments,
            self.work.streamed_old,
            self.work.streamed_new,
            self.elapsed_secs
        );
        let _ = writeln!(out, "range: {}", self.status);
        out
    }
}

/// What `compare --range` was asked.
#[derive(Debug, Clone)]
pub struct RangeRequest {
    pub table: String,
    pub key_from: Option<String>,
    pub key_to: Option<String>,
    pub from: Option<i64>,
    pub to: Option<i64>,
    pub tuning: Tuning,
}

/// Why a request cannot run: a usage error (exit 2).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("no table {0:?} is declared in the configuration")]
    UnknownTable(String),
    #[error("table {table}: its key type cannot be compared by range")]
    KeyType { table: String },
    #[error("--{flag} {value:?} is not a {kind} key of table {table}")]
    BadKey {
        flag: &'static str,
        value: String,
        kind: &'static str,
        table: String,
    },
}

/// The table, its key kind and the root segment of a request.
pub fn resolve<'a>(
    schema: &'a crate::schema::Schema,
    req: &RangeRequest,
) -> Result<(&'a Table, KeyKind, Segment), RequestError> {
    let table = schema
        .table(&req.table)
        .ok_or_else(|| RequestError::UnknownTable(req.table.clone()))?;
    let kind = KeyKind::of(table).ok_or_else(|| RequestError::KeyType {
        table: table.name.clone(),
    })?;
    let key = |flag: &'static str, v: &Option<String>| -> Result<Option<Key>, RequestError> {
        v.as_deref()
            .map(|s| {
                Key::parse(kind, s).ok_or_else(|| RequestError::BadKey {
                    flag,
                    value: s.to_string(),
                    kind: kind.name(),
                    table: table.name.clone(),
                })
            })
            .transpose()
    };
    let root = Segment {
        lo: key("key-from", &req.key_from)?,
        hi: key("key-to", &req.key_to)?,
    };
    Ok((table, kind, root))
}

/// Runs a request against the two databases.
pub async fn run(
    old: &Db,
    new: &Db,
    table: &Table,
    kind: KeyKind,
    root: &Segment,
    req: &RangeRequest,
) -> Result<RangeReport, RangeError> {
    let started = Instant::now();
    // Both hash in SQL, each with its own expression, or neither does.
    let (ho, hn) = futures_util::try_join!(old.range_row_hash(table), new.range_row_hash(table))?;
    let (ho, hn) = match (ho, hn) {
        (Some(a), Some(b)) => (Some(a), Some(b)),
        _ => (None, None),
    };
    let in_sql = ho.is_some();
    let side = |db, hash| DbSide {
        db,
        table,
        kind,
        from: req.from,
        to: req.to,
        hash,
    };
    let (differences, work) = diff(&side(old, ho), &side(new, hn), root, req.tuning).await?;
    Ok(RangeReport {
        table: table.name.clone(),
        status: if differences.is_empty() {
            "equal"
        } else {
            "differs"
        },
        key_from: root.lo.as_ref().map(Key::to_string),
        key_to: root.hi.as_ref().map(Key::to_string),
        from: req.from,
        to: req.to,
        hashing: if in_sql { "sql" } else { "process" },
        work,
        differences,
        elapsed_secs: started.elapsed().as_secs_f64(),
    })
}

/// `compare --range` from the parsed command line: prints the report and
/// exits 0 when equal, 1 when the range differs, 2 on a usage or
/// configuration error, 3 when a database fails during the comparison (as
/// `compare --once`).
pub async fn main(
    schema: &crate::schema::Schema,
    old: &Db,
    new: &Db,
    req: &RangeRequest,
    json: bool,
) -> Result<ExitCode, ExitCode> {
    let (table, kind, root) =
        resolve(schema, req).map_err(|e| crate::cli::usage(format!("compare --range: {e}")))?;
    let report = run(old, new, table, kind, &root, req).await.map_err(|e| {
        if e.is_config() {
            crate::cli::usage(format!("compare --range: {e}"))
        } else {
            eprintln!("switchyard: compare --range: {e}");
            ExitCode::from(3)
        }
    })?;
    if json {
        match serde_json::to_string_pretty(&report) {
            Ok(j) => println!("{j}"),
            Err(e) => eprintln!("switchyard: {e}"),
        }
    } else {
        print!("{}", report.text());
    }
    Ok(if report.differences.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    /// A side held in memory: its rows, and whether it "hashes in SQL".
    struct Mem {
        rows: BTreeMap<Key, u128>,
        in_sql: bool,
    }

    impl Mem {
        fn of<'a>(&'a self, seg: &'a Segment) -> impl Iterator<Item = (&'a Key, &'a u128)> + 'a {
            self.rows.iter().filter(|(k, _)| seg.contains(k))
        }
    }

    impl Side for Mem {
        fn in_sql(&self) -> bool {
            self.in_sql
        }

        async fn checksum(&self, seg: &Segment) -> Result<Checksum, RangeError> {
            let mut c = Checksum::default();
            for (_, h) in self.of(seg) {
                c.count += 1;
                c.sum = c.sum.wrapping_add(*h);
            }
            Ok(c)
        }

        async fn ends(&self, seg: &Segment) -> Result<Option<(Key, Key)>, RangeError> {
            let mut it = self.of(seg).map(|(k, _)| k.clone());
            let first = it.next();
            let last = it.last().or_else(|| first.clone());
            Ok(first.zip(last))
        }

        async fn rows(
            &self,
            seg: &Segment,
            tx: mpsc::Sender<Vec<(Key, u128)>>,
        ) -> Result<(), RangeError> {
            let all: Vec<(Key, u128)> = self.of(seg).map(|(k, h)| (k.clone(), *h)).collect();
            for chunk in all.chunks(3) {
                if tx.send(chunk.to_vec()).await.is_err() {
                    return Ok(());
                }
            }
            Ok(())
        }
    }

    fn block<T>(f: impl Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(f)
    }

    fn tuning() -> Tuning {
        Tuning {
            max_ids: usize::MAX,
            threshold: 4,
            factor: 4,
            concurrency: 2,
        }
    }

    #[test]
    fn split_points_are_inside_and_ordered() {
        let k = Key::Int;
        assert_eq!(split_points(&k(0), &k(1), 4), vec![k(1)]);
        assert_eq!(split_points(&k(5), &k(5), 4), vec![]);
        assert_eq!(split_points(&k(0), &k(8), 4), vec![k(2), k(4), k(6)]);
        let all = split_points(&k(i64::MIN), &k(i64::MAX), 32);
        assert_eq!(all.len(), 31);
        assert!(all.windows(2).all(|w| w[0] < w[1]));
        assert!(all.iter().all(|p| *p > k(i64::MIN)));
        let u = split_points(&Key::Uuid(0), &Key::Uuid(u128::MAX), 16);
        assert_eq!(u.len(), 15);
        assert_eq!(u[7], Key::Uuid(1 << 127));
        assert_eq!(u[7].to_string(), "80000000-0000-0000-0000-000000000000");
        // Strings split past their shared prefix, into valid characters.
        let t = |s: &str| Key::Text(s.to_string());
        let p = split_points(&t("user-0001"), &t("user-9999"), 4);
        assert!(!p.is_empty());
        for x in &p {
            let Key::Text(s) = x else { panic!() };
            assert!(s.starts_with("user-"), "{s}");
            assert!(!s.contains('\0'));
            assert!(*x > t("user-0001") && *x <= t("user-9999"));
        }
        assert!(split_points(&t("a"), &t("a\u{1}"), 4).len() <= 1);
        assert_eq!(split_points(&t("b"), &t("a"), 4), vec![]);
    }

    #[test]
    fn children_cover_the_segment() {
        let k = Key::Int;
        let seg = Segment {
            lo: None,
            hi: Some(k(10)),
        };
        let c = children(&seg, &[k(3), k(6), k(12)]);
        assert_eq!(
            c,
            vec![
                Segment {
                    lo: None,
                    hi: Some(k(3))
                },
                Segment {
                    lo: Some(k(3)),
                    hi: Some(k(6))
                },
                Segment {
                    lo: Some(k(6)),
                    hi: Some(k(10))
                },
            ]
        );
    }

    #[test]
    fn a_merge_names_each_kind() {
        let k = Key::Int;
        assert_eq!(step(&(k(1), 5), &(k(2), 5)), Step::Missing);
        assert_eq!(step(&(k(3), 5), &(k(2), 5)), Step::Extra);
        assert_eq!(step(&(k(2), 5), &(k(2), 5)), Step::Same);
        assert_eq!(step(&(k(2), 5), &(k(2), 6)), Step::Differs);
        let mut d = Differences::default();
        for i in 0..5 {
            d.record(Step::Missing, &k(i), 2);
        }
        assert_eq!(d.missing, 5);
        assert_eq!(d.missing_ids, vec!["0", "1"]);
    }

    #[test]
    fn keys_out_of_order_are_an_error() {
        struct Backwards;
        impl Side for Backwards {
            fn in_sql(&self) -> bool {
                false
            }
            async fn checksum(&self, _: &Segment) -> Result<Checksum, RangeError> {
                Ok(Checksum::default())
            }
            async fn ends(&self, _: &Segment) -> Result<Option<(Key, Key)>, RangeError> {
                Ok(None)
            }
            async fn rows(
                &self,
                _: &Segment,
                tx: mpsc::Sender<Vec<(Key, u128)>>,
            ) -> Result<(), RangeError> {
                let _ = tx.send(vec![(Key::Int(2), 0), (Key::Int(1), 0)]).await;
                Ok(())
            }
        }
        let e = block(diff(&Backwards, &Backwards, &Segment::default(), tuning()));
        assert!(matches!(e, Err(RangeError::Order { .. })), "{e:?}");
    }

    /// A 60-bit hash of `x` (splitmix64), so changes do not cancel in a sum
    /// any likelier than real row hashes do.
    fn mix(x: u128) -> u128 {
        let mut z = (x as u64).wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        u128::from((z ^ (z >> 31)) >> 4)
    }

    /// The model: a base set of keys, and some removed from OLD, some from
    /// NEW, some altered in NEW.
    fn check(
        keys: Vec<Key>,
        gone_old: Vec<usize>,
        gone_new: Vec<usize>,
        changed: Vec<usize>,
        in_sql: bool,
    ) {
        let base: BTreeMap<Key, u128> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| (k.clone(), mix(i as u128)))
            .collect();
        let pick = |ix: &[usize]| -> Vec<Key> {
            let all: Vec<&Key> = base.keys().collect();
            if all.is_empty() {
                return Vec::new();
            }
            ix.iter().map(|i| all[i % all.len()].clone()).collect()
        };
        let (go, gn, ch) = (pick(&gone_old), pick(&gone_new), pick(&changed));
        let mut old = base.clone();
        let mut new = base.clone();
        for k in &go {
            old.remove(k);
        }
        for k in &gn {
            new.remove(k);
        }
        for k in &ch {
            if let Some(h) = new.get_mut(k) {
                // Another 60-bit hash, as a changed row's would be.
                *h = mix(*h);
            }
        }
        let mut want = Differences::default();
        for k in old
            .keys()
            .chain(new.keys())
            .collect::<std::collections::BTreeSet<_>>()
        {
            let s = match (old.get(k), new.get(k)) {
                (Some(_), None) => Step::Missing,
                (None, Some(_)) => Step::Extra,
                (Some(a), Some(b)) if a != b => Step::Differs,
                _ => continue,
            };
            want.record(s, k, usize::MAX);
        }
        let (o, n) = (Mem { rows: old, in_sql }, Mem { rows: new, in_sql });
        let (got, work) = block(diff(&o, &n, &Segment::default(), tuning())).unwrap();
        assert_eq!(got, want);
        assert_eq!(work.rows_old, o.rows.len() as u64);
        assert_eq!(work.rows_new, n.rows.len() as u64);
    }

    proptest! {
        #[test]
        fn bisection_names_exactly_the_changed_int_keys(
            keys in proptest::collection::btree_set(any::<i64>(), 0..300),
            dense in proptest::collection::btree_set(-200i64..200, 0..200),
            gone_old in proptest::collection::vec(any::<usize>(), 0..8),
            gone_new in proptest::collection::vec(any::<usize>(), 0..8),
            changed in proptest::collection::vec(any::<usize>(), 0..8),
            in_sql in any::<bool>(),
        ) {
            let keys: Vec<Key> = keys.union(&dense).map(|v| Key::Int(*v)).collect();
            check(keys, gone_old, gone_new, changed, in_sql);
        }

        #[test]
        fn bisection_names_exactly_the_changed_uuid_and_string_keys(
            uuids in proptest::collection::btree_set(any::<u128>(), 0..300),
            texts in proptest::collection::btree_set("[a-c\u{e9}\u{1F600}]{0,6}", 0..200),
            gone_old in proptest::collection::vec(any::<usize>(), 0..8),
            gone_new in proptest::collection::vec(any::<usize>(), 0..8),
            changed in proptest::collection::vec(any::<usize>(), 0..8),
        ) {
            let u: Vec<Key> = uuids.into_iter().map(Key::Uuid).collect();
            check(u, gone_old.clone(), gone_new.clone(), changed.clone(), true);
            let t: Vec<Key> = texts.into_iter().map(Key::Text).collect();
            check(t, gone_old, gone_new, changed, true);
        }
    }

    #[test]
    fn a_request_names_a_declared_table_and_keys_of_its_type() {
        let schema = crate::config::PipelineConfig::load(None)
            .unwrap()
            .schema()
            .unwrap();
        let req = |table: &str, from: Option<&str>| RangeRequest {
            table: table.into(),
            key_from: from.map(str::to_string),
            key_to: None,
            from: None,
            to: None,
            tuning: Tuning::default(),
        };
        assert_eq!(
            resolve(&schema, &req("nope", None)).err(),
            Some(RequestError::UnknownTable("nope".into()))
        );
        assert!(matches!(
            resolve(&schema, &req("raw_item", Some("12"))),
            Err(RequestError::BadKey { .. })
        ));
        let (_, kind, root) = resolve(
            &schema,
            &req("raw_item", Some("00000000-0000-0000-0000-00000000000A")),
        )
        .unwrap();
        assert_eq!(kind, KeyKind::Uuid);
        assert_eq!(root.lo, Some(Key::Uuid(10)));
    }
}
