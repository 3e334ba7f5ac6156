//! Offline files: the legacy sink. One NDJSON file is written at a time, named
//! `<prefix>-<micros>-<seq>.ndjson.open` while open and renamed atomically to
//! `.ndjson` when closed, so a loader never sees a half-written file and the
//! names sort in creation order. Each line is batchelor-compatible:
//! `{"table":…,"row":{…},"account_id":…,"route":…,"counter":N}`.

mod writer;

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use writer::{FsyncPolicy, OfflineWriter, SubmitError, WriteError, WriterConfig};

mod metrics;

pub use metrics::OfflineMetrics;

/// Suffix of the file being written.
pub const OPEN_SUFFIX: &str = ".ndjson.open";
/// Suffix of a closed file, ready for a loader.
pub const CLOSED_SUFFIX: &str = ".ndjson";
/// Suffix of the torn tail cut from a file left open by a crash (kept for inspection).
pub const TORN_SUFFIX: &str = ".torn";

/// The `route` field of a line: what the loader does with it.
pub mod line_route {
    /// Legacy-routed: load into the old database.
    pub const LEGACY: &str = "legacy";
    /// Dual-routed: load into the old database (Kafka has its own copy).
    pub const DUAL: &str = "dual";
    /// A Kafka-only payload Kafka did not acknowledge: replay it to Kafka.
    pub const KAFKA_FALLBACK: &str = "kafka-fallback";
    /// The Kafka leg of a dual payload that Kafka did not acknowledge (its
    /// `dual` line is also in the file): replay it to Kafka only.
    pub const DUAL_FALLBACK: &str = "dual-fallback";
}

/// One line as written in an offline file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OfflineLine {
    pub table: String,
    pub row: serde_json::Map<String, serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account_id: Option<u64>,
    /// One of [`line_route`]; absent in lines written by other tools (legacy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    pub counter: u64,
}

/// The bytes of one line without its closing `,"counter":N}` — the writer adds
/// that, since only it knows the line's position in its file.
#[derive(Debug, Clone)]
pub struct LinePrefix(Vec<u8>);

impl LinePrefix {
    /// `row_json` must be one compact JSON object (already validated).
    pub fn new(table: &str, row_json: &[u8], account_id: u64, route: &str) -> LinePrefix {
        let mut b = Vec::with_capacity(row_json.len() + table.len() + 64);
        b.extend_from_slice(b"{\"table\":");
        // Table names are identifiers from the schema: no escaping needed, but
        // serialising keeps that an invariant of this function, not its callers.
        if serde_json::to_writer(&mut b, table).is_err() {
            b.extend_from_slice(b"\"\"");
        }
        b.extend_from_slice(b",\"row\":");
        b.extend_from_slice(row_json);
        b.extend_from_slice(b",\"account_id\":");
        b.extend_from_slice(account_id.to_string().as_bytes());
        b.extend_from_slice(b",\"route\":\"");
        b.extend_from_slice(route.as_bytes());
        b.push(b'"');
        LinePrefix(b)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Appends the whole line, `counter` its number in the file, to `out`.
    pub fn write_with_counter(&self, out: &mut Vec<u8>, counter: u64) {
        out.extend_from_slice(&self.0);
        out.extend_from_slice(b",\"counter\":");
        out.extend_from_slice(counter.to_string().as_bytes());
        out.extend_from_slice(b"}\n");
    }
}

/// Closed offline files in `dir`, oldest first.
pub fn closed_files(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut out: Vec<PathBuf> = fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with(CLOSED_SUFFIX))
        })
        .collect();
    out.sort();
    Ok(out)
}

/// Files still being written (or left open by a crash).
pub fn open_files(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut out: Vec<PathBuf> = fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with(OPEN_SUFFIX))
        })
        .collect();
    out.sort();
    Ok(out)
}

/// Reads every line of a closed file.
pub fn read_lines(path: &Path) -> io::Result<Vec<OfflineLine>> {
    let data = fs::read(path)?;
    data.split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_slice(l).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: line {}: {e}", path.display(), i + 1),
                )
            })
        })
        .collect()
}

/// What start-up repair did.
#[derive(Debug, Default, PartialEq)]
pub struct RepairReport {
    pub files: usize,
    pub lines_kept: usize,
    pub torn_bytes: u64,
}

/// Length of the longest prefix made of whole, parseable lines.
fn valid_prefix_len(data: &[u8]) -> (usize, usize) {
    let mut pos = 0;
    let mut lines = 0;
    while let Some(nl) = data[pos..].iter().position(|b| *b == b'\n') {
        let line = &data[pos..pos + nl];
        if serde_json::from_slice::<serde::de::IgnoredAny>(line).is_err() {
            break;
        }
        pos += nl + 1;
        lines += 1;
    }
    (pos, lines)
}

/// Closes files left open by a crash: the torn last line (an unterminated or
/// unparseable tail) is cut and kept beside it as `.torn`, the rest is synced
/// and renamed closed. A line is only acknowledged after it was written whole,
/// so a torn tail was never acknowledged.
pub fn repair(dir: &Path, metrics: Option<&OfflineMetrics>) -> io::Result<RepairReport> {
    let mut report = RepairReport::default();
    for open in open_files(dir)? {
        let data = fs::read(&open)?;
        let (keep, lines) = valid_prefix_len(&data);
        let closed = closed_name(&open);
        if keep < data.len() {
            let torn = PathBuf::from(format!("{}{TORN_SUFFIX}", closed.display()));
            let mut f = fs::File::create(&torn)?;
            f.write_all(&data[keep..])?;
            f.sync_all()?;
            report.torn_bytes += (data.len() - keep) as u64;
            tracing::warn!(file = %open.display(), torn_bytes = data.len() - keep, kept_to = %torn.display(), "cut a torn tail from an offline file left open");
        }
        if keep == 0 {
            fs::remove_file(&open)?;
        } else {
            let f = fs::OpenOptions::new().write(true).open(&open)?;
            f.set_len(keep as u64)?;
            f.sync_all()?;
            fs::rename(&open, &closed)?;
        }
        report.files += 1;
        report.lines_kept += lines;
        tracing::info!(file = %closed.display(), lines, "closed an offline file left open by a previous run");
    }
    if report.files > 0 {
        sync_dir(dir)?;
    }
    if let Some(m) = metrics {
        m.repaired_files.inc_by(report.files as u64);
        m.torn_bytes.inc_by(report.torn_bytes);
    }
    Ok(report)
}

fn closed_name(open: &Path) -> PathBuf {
    let s = open.to_string_lossy();
    PathBuf::from(format!(
        "{}{CLOSED_SUFFIX}",
        s.strip_suffix(OPEN_SUFFIX).unwrap_or(&s)
    ))
}

/// Makes a rename or a create in `dir` durable.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_is_batchelor_compatible() {
        let p = LinePrefix::new("raw_item", br#"{"uuid":"u","project_id":1}"#, 42, "dual");
        let mut out = Vec::new();
        p.write_with_counter(&mut out, 356);
        assert_eq!(
            out,
            br#"{"table":"raw_item","row":{"uuid":"u","project_id":1},"account_id":42,"route":"dual","counter":356}
"#
        );
        let line: OfflineLine = serde_json::from_slice(&out).unwrap();
        assert_eq!(line.counter, 356);
        assert_eq!(line.account_id, Some(42));
    }

    #[test]
    fn repair_cuts_the_torn_tail_and_closes() {
        let dir = tempfile::tempdir().unwrap();
        let open = dir.path().join(format!("offline-1-1{OPEN_SUFFIX}"));
        fs::write(
            &open,
            b"{\"table\":\"t\",\"row\":{},\"counter\":1}\n{\"table\":\"t\",\"row\":{},\"counter\":2}\n{\"table\":\"t\",\"ro",
        )
        .unwrap();
        let empty = dir.path().join(format!("offline-2-1{OPEN_SUFFIX}"));
        fs::write(&empty, b"{\"tab").unwrap();
        let r = repair(dir.path(), None).unwrap();
        assert_eq!(r.files, 2);
        assert_eq!(r.lines_kept, 2);
        assert_eq!(r.torn_bytes, 16 + 5);
        let closed = closed_files(dir.path()).unwrap();
        assert_eq!(closed.len(), 1);
        assert_eq!(read_lines(&closed[0]).unwrap().len(), 2);
        assert!(open_files(dir.path()).unwrap().is_empty());
        assert!(dir.path().join("offline-1-1.ndjson.torn").exists());
    }
}
