//! `switchyard load`: the legacy offline loader. Closed offline files, oldest
//! first, in batches, into the OLD database. Each batch is inserted in one
//! transaction together with the file's checkpoint (byte offset), so a crash
//! at any point neither loses nor duplicates a row. Several loaders may share
//! a folder: a file is claimed with an OS lock, and the checkpoint only
//! advances from the offset its loader read, so a file is never loaded twice
//! even where locks are not shared (network filesystems).

pub mod cli;
mod metrics;
mod progress;
mod replay;

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;

use crate::db::{
    self, row_values_exact, Checkpoint, CheckpointUpdate, Db, DbError, DeadLetter, TableRows,
    ToReplay,
};

use crate::offline::{self, line_route};
use crate::routing::Route;
use crate::schema::{Schema, Table};
use crate::shutdown::Backoff;

pub use metrics::LoadMetrics;
pub use progress::Progress;
pub use replay::Replay;
use replay::{Replayer, Signals};

/// How the loader runs.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// The offline folder the router writes.
    pub dir: PathBuf,
    /// Lines per transaction.
    pub batch_size: usize,
    /// And at most this many bytes of lines per transaction (at least one
    /// line): what a batch holds in memory is bounded whatever the rows' size.
    pub batch_bytes: usize,
    /// Loaded files are moved here; deleted when None.
    pub archive_dir: Option<PathBuf>,
    /// This loader's identity in the checkpoint table: the same for every
    /// loader of one folder, different for each folder (a host's files may
    /// share their names with another host's).
    pub loader_id: String,
    /// How often an idle loader looks for new files.
    pub poll: Duration,
    /// Exit when no closed file is left (backfills, benchmarks).
    pub once: bool,
    /// Show a progress line on the terminal.
    pub progress: bool,
}

/// Why the loader stopped.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("offline folder {path}: {source}")]
    Folder { path: String, source: io::Error },
    #[error(transparent)]
    Db(#[from] DbError),
}

/// What a run did (returned when it stops).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LoadSummary {
    pub files: u64,
    pub lines: u64,
    pub inserted: u64,
    pub duplicates: u64,
    /// Fallback lines produced to Kafka from the replay spool.
    pub replayed: u64,
    /// Fallback lines committed to the replay spool with their batch.
    pub spooled: u64,
    pub dead_letters: u64,
    /// Rows whose key was stored with other content (`on_conflict`).
    pub conflicts: u64,
}

/// The most bytes of a line a dead letter keeps: statements stay under the
/// smallest packet limit a MySQL server is run with.
const DEAD_LETTER_MAX_BYTES: usize = 1 << 20;

struct Loader<'a> {
    opts: &'a LoadOptions,
    schema: &'a Schema,
    db: &'a Db,
    replay: Option<&'a Replay>,
    signals: &'a Signals,
    metrics: &'a LoadMetrics,
    shutdown: &'a CancellationToken,
    progress: Arc<Progress>,
    summary: LoadSummary,
}

/// Loads until `shutdown` is cancelled (or, with `once`, until the folder is
/// empty and, with replay, the replay spool too).
pub async fn run(
    opts: LoadOptions,
    schema: &Schema,
    db: &Db,
    replay: Option<Replay>,
    metrics: LoadMetrics,
    shutdown: CancellationToken,
) -> Result<LoadSummary, LoadError> {
    let folder = |source| LoadError::Folder {
        path: opts.dir.display().to_string(),
        source,
    };
    if !opts.dir.is_dir() {
        return Err(folder(io::Error::new(
            io::ErrorKind::NotFound,
            "not a folder (the router creates it on its first start)",
        )));
    }
    if let Some(a) = &opts.archive_dir {
        fs::create_dir_all(a).map_err(|source| LoadError::Folder {
            path: a.display().to_string(),
            source,
        })?;
    }
    let progress = Arc::new(Progress::new(metrics.clone()));
    let display = opts
        .progress
        .then(|| progress.spawn_display(shutdown.clone()));
    let signals = Signals::new();
    let mut loader = Loader {
        opts: &opts,
        schema,
        db,
        replay: replay.as_ref(),
        signals: &signals,
        metrics: &metrics,
        shutdown: &shutdown,
        progress,
        summary: LoadSummary::default(),
    };
    // The replayer stops with the process, or when the loader fails.
    let stop_replayer = shutdown.child_token();
    let loading = async {
        let res = loader.run().await;
        if res.is_err() {
            stop_replayer.cancel();
        }
        signals
            .loading_done
            .store(true, std::sync::atomic::Ordering::Release);
        signals.spooled.notify_one();
        res
    };
    let replaying = async {
        match &replay {
            Some(r) => {
                Replayer {
                    db,
                    replay: r,
                    metrics: &metrics,
                    stop: &stop_replayer,
                    signals: &signals,
                    poll: opts.poll,
                }
                .run()
                .await
            }
            None => Default::default(),
        }
    };
    let (res, replayed) = tokio::join!(loading, replaying);
    loader.summary.replayed = replayed.delivered;
    loader.summary.dead_letters += replayed.refused;
    if let Some(d) = display {
        d.abort();
        let _ = d.await;
        eprintln!();
    }
    if let Some(r) = &replay {
        if let Err(e) = r.sink.flush(Duration::from_secs(5)).await {
            tracing::warn!(error = %e, "replay producer flush");
        }
    }
    res.map(|()| loader.summary)
}

impl Loader<'_> {
    async fn run(&mut self) -> Result<(), LoadError> {
        loop {
            if self.shutdown.is_cancelled() {
                return Ok(());
            }
            let files =
                offline::closed_files(&self.opts.dir).map_err(|source| LoadError::Folder {
                    path: self.opts.dir.display().to_string(),
                    source,
                })?;
            self.progress.scanned(&files);
            if files.is_empty() {
                if self.opts.once {
                    return Ok(());
                }
                tokio::select! {
                    _ = self.shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(self.opts.poll) => {}
                }
                continue;
            }
            let mut progressed = false;
            for path in &files {
                if self.shutdown.is_cancelled() {
                    return Ok(());
                }
                progressed |= self.load_file(path).await?;
            }
            if !progressed {
                // Every file is claimed by another loader: wait, do not spin.
                if self.opts.once {
                    return Ok(());
                }
                tokio::select! {
                    _ = self.shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(self.opts.poll) => {}
                }
            }
        }
    }

    /// Loads one file to its end. Returns false when another loader has it.
    async fn load_file(&mut self, path: &Path) -> Result<bool, LoadError> {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let file = match File::open(path) {
            Ok(f) => f,
            // Finished and removed by another loader since the listing.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(source) => {
                return Err(LoadError::Folder {
                    path: path.display().to_string(),
                    source,
                })
            }
        };
        if file.try_lock().is_err() {
            return Ok(false);
        }
        // Opened just before another loader finished and removed it: the
        // lock was free because the file is gone, and so is its checkpoint.
        if !same_file(&file, path) {
            return Ok(false);
        }
        let Some(ckpt) = self.checkpoint(&name).await? else {
            return Ok(true);
        };
        let Some(ckpt) = ckpt else {
            return self.load_from(path, &name, file, None).await;
        };
        if ckpt.done {
            self.finish(path, &name).await?;
            return Ok(true);
        }
        self.load_from(path, &name, file, Some((ckpt.offset, ckpt.lines)))
            .await
    }

    async fn load_from(
        &mut self,
        path: &Path,
        name: &str,
        mut file: File,
        from: Option<(u64, u64)>,
    ) -> Result<bool, LoadError> {
        let io_err = |source| LoadError::Folder {
            path: path.display().to_string(),
            source,
        };
        let (mut offset, mut lines_done) = from.unwrap_or((0, 0));
        let mut started = from.is_some();
        file.seek(SeekFrom::Start(offset)).map_err(io_err)?;
        let mut reader = BufReader::with_capacity(1 << 20, file);
        tracing::debug!(file = name, offset, "loading");
        loop {
            if self.shutdown.is_cancelled() {
                return Ok(true);
            }
            let mut raw: Vec<(u64, Vec<u8>)> = Vec::with_capacity(self.opts.batch_size);
            let mut pos = offset;
            let mut bytes = 0usize;
            while raw.len() < self.opts.batch_size
                && (raw.is_empty() || bytes < self.opts.batch_bytes)
            {
                let mut line = Vec::new();
                let n = reader.read_until(b'\n', &mut line).map_err(io_err)?;
                if n == 0 {
                    break;
                }
                let at = pos;
                pos += n as u64;
                if line.last() == Some(&b'\n') {
                    line.pop();
                }
                if !line.is_empty() {
                    bytes += line.len();
                    raw.push((at, line));
                }
            }
            let at_end = reader.fill_buf().map_err(io_err)?.is_empty();
            let update = CheckpointUpdate {
                loader: self.opts.loader_id.clone(),
                file: name.to_string(),
                from: started.then_some(offset),
                to: pos,
                lines: lines_done + raw.len() as u64,
                done: at_end,
            };
            match self.load_batch(name, raw, &update, pos - offset).await? {
                BatchEnd::Committed => {}
                BatchEnd::Cancelled => return Ok(true),
                BatchEnd::Conflict => {
                    tracing::warn!(file = name, "another loader advanced this file; leaving it");
                    return Ok(true);
                }
            }
            started = true;
            lines_done = update.lines;
            offset = pos;
            if at_end {
                self.finish(path, name).await?;
                return Ok(true);
            }
        }
    }

    /// Parses, replays, dead-letters and inserts one batch with its
    /// checkpoint, all in one transaction: a crash anywhere records nothing
    /// twice.
    async fn load_batch(
        &mut self,
        name: &str,
        raw: Vec<(u64, Vec<u8>)>,
        update: &CheckpointUpdate,
        bytes: u64,
    ) -> Result<BatchEnd, LoadError> {
        let n_lines = raw.len() as u64;
        let mut rows: BTreeMap<usize, (TableRows, Vec<u64>)> = BTreeMap::new();
        let mut replays: Vec<ToReplay> = Vec::new();
        let mut dead: Vec<DeadLetter> = Vec::new();
        for (at, line) in &raw {
            match self.classify(line) {
                Ok(LineAction::Insert { table, values }) => {
                    let entry = rows.entry(table).or_default();
                    entry.0.push(values, format!("{name}:{at}"));
                    entry.1.push(*at);
                }
                Ok(LineAction::Replay {
                    account,
                    envelope,
                    route,
                }) => replays.push(ToReplay {
                    source: format!("{name}:{at}"),
                    account_id: account,
                    route: route.as_str(),
                    envelope,
                }),
                Ok(LineAction::Skip) => {}
                Err((reason, why)) => {
                    self.metrics
                        .sink
                        .dead_letters
                        .with_label_values(&[reason])
                        .inc();
                    dead.push(dead_letter(name, *at, why, line));
                }
            }
        }
        let mut backoff = Backoff::default();
        loop {
            let tables: Vec<(&Table, &TableRows)> = rows
                .iter()
                .map(|(t, (r, _))| (&self.schema.tables()[*t], r))
                .collect();
            let started = Instant::now();
            match self
                .db
                .write_batch(&tables, &dead, &replays, Some(update))
                .await
            {
                Ok(written) => {
                    let tables: Vec<(&str, &db::Written)> = rows
                        .keys()
                        .map(|t| self.schema.tables()[*t].name.as_str())
                        .zip(&written)
                        .collect();
                    for (table, w) in &tables {
                        db::log_conflicts(table, &w.conflicts);
                    }
                    for d in &dead {
                        tracing::warn!(source = %d.source, reason = %d.reason, "dead-lettered a line");
                    }
                    let total = self.metrics.sink.committed(
                        started.elapsed(),
                        n_lines as usize,
                        tables.iter().copied(),
                    );
                    self.summary.inserted += total.inserted;
                    self.summary.duplicates += total.duplicates;
                    self.summary.conflicts += total.conflicts.len() as u64;
                    self.summary.lines += n_lines;
                    self.summary.spooled += replays.len() as u64;
                    if !replays.is_empty() {
                        self.signals.spooled.notify_one();
                    }
                    self.summary.dead_letters += dead.len() as u64;
                    self.progress.loaded(n_lines, bytes);
                    return Ok(BatchEnd::Committed);
                }
                Err(DbError::Conflict(_)) => return Ok(BatchEnd::Conflict),
                Err(DbError::Rejected(reason)) => {
                    tracing::warn!(file = name, %reason, "the database rejected a row; finding which");
                    let mut found = 0;
                    for (t, (r, offsets)) in rows.iter_mut() {
                        let table = &self.schema.tables()[*t];
                        let bad = match db::find_rejected(self.db, table, r).await {
                            Ok(b) => b,
                            Err(e) if e.is_transient() => {
                                if !self.wait_database(&mut backoff, &e).await {
                                    return Ok(BatchEnd::Cancelled);
                                }
                                break;
                            }
                            Err(e) => return Err(e.into()),
                        };
                        for (i, why) in bad.into_iter().rev() {
                            r.remove(i);
                            let at = offsets.remove(i);
                            dead.push(dead_letter(
                                name,
                                at,
                                format!("rejected by the database: {why}"),
                                line_at(&raw, at),
                            ));
                            found += 1;
                        }
                    }
                    self.metrics
                        .sink
                        .dead_letters
                        .with_label_values(&["rejected"])
                        .inc_by(found);
                    // Refused as a whole but no row alone is: wait rather
                    // than retry at once, as for an outage.
                    if found == 0 && !self.wait_database(&mut backoff, &reason).await {
                        return Ok(BatchEnd::Cancelled);
                    }
                }
                Err(e) if e.is_transient() => {
                    if !self.wait_database(&mut backoff, &e).await {
                        return Ok(BatchEnd::Cancelled);
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Counts a database retry and waits its backoff step. False if shut
    /// down first.
    async fn wait_database(
        &self,
        backoff: &mut Backoff,
        error: &(dyn std::fmt::Display + Sync),
    ) -> bool {
        backoff
            .pause(self.shutdown, &self.metrics.sink.retries, "database", error)
            .await
    }

    fn classify(&self, line: &[u8]) -> Result<LineAction, (&'static str, String)> {
        let parsed: OfflineRecord = serde_json::from_slice(line)
            .map_err(|e| ("parse", format!("not an offline line: {e}")))?;
        let Some(t) = self
            .schema
            .tables()
            .iter()
            .position(|t| t.name == parsed.table)
        else {
            return Err(("schema", format!("unknown table {:?}", parsed.table)));
        };
        let table = &self.schema.tables()[t];
        let values =
            row_values_exact(table, &parsed.row, line).map_err(|e| ("schema", e.to_string()))?;
        let replay_route = match parsed.route.as_deref() {
            Some(line_route::KAFKA_FALLBACK) => Some(Route::Kafka),
            Some(line_route::DUAL_FALLBACK) => Some(Route::Dual),
            _ => None,
        };
        match (replay_route, self.replay) {
            (Some(route), Some(_)) => {
                let Some(account) = parsed.account_id else {
                    return Err(("schema", "a Kafka fallback line without account_id".into()));
                };
                // The row as it was written (numbers of any precision);
                // table names are schema identifiers, nothing to escape.
                let row = match crate::rawjson::row_text(line) {
                    Some(raw) => crate::rawjson::minify(raw.get()),
                    None => {
                        serde_json::to_string(&parsed.row).map_err(|e| ("parse", e.to_string()))?
                    }
                };
                let envelope = format!(
                    "{{\"account_id\":{account},\"table\":\"{}\",\"row\":{row}}}",
                    table.name
                );
                Ok(LineAction::Replay {
                    account,
                    envelope,
                    route,
                })
            }
            // Without replay, the dual line of the same payload loads it
            // into OLD; its Kafka leg is dropped, and counted.
            (Some(Route::Dual), None) => {
                self.metrics
                    .replay_skipped
                    .with_label_values(&["dual"])
                    .inc();
                Ok(LineAction::Skip)
            }
            // A Kafka-only payload loads into OLD instead of reaching NEW.
            (Some(_), None) => {
                self.metrics
                    .replay_skipped
                    .with_label_values(&["kafka"])
                    .inc();
                Ok(LineAction::Insert { table: t, values })
            }
            _ => Ok(LineAction::Insert { table: t, values }),
        }
    }

    /// Deletes or archives a fully loaded file, then forgets its checkpoint.
    /// A file already gone (archived before a crash) is not an error.
    async fn finish(&mut self, path: &Path, name: &str) -> Result<(), LoadError> {
        let res = match &self.opts.archive_dir {
            Some(a) => archive(path, a, name),
            None => fs::remove_file(path),
        };
        match res {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(LoadError::Folder {
                    path: path.display().to_string(),
                    source,
                })
            }
        }
        if let Err(e) = offline::sync_dir(&self.opts.dir) {
            tracing::warn!(error = %e, "cannot sync the offline folder");
        }
        self.metrics.files_loaded.inc();
        self.summary.files += 1;
        // A leftover row only costs a little space: never fatal.
        if let Err(e) = self.db.forget_checkpoint(&self.opts.loader_id, name).await {
            tracing::warn!(file = name, error = %e, "cannot forget a finished checkpoint");
        }
        tracing::info!(
            file = name,
            archived = self.opts.archive_dir.is_some(),
            "offline file loaded"
        );
        Ok(())
    }

    /// A file's checkpoint, waiting out a database outage. None if cancelled.
    async fn checkpoint(&self, name: &str) -> Result<Option<Option<Checkpoint>>, LoadError> {
        let mut backoff = Backoff::default();
        loop {
            match self.db.checkpoint(&self.opts.loader_id, name).await {
                Ok(c) => return Ok(Some(c)),
                Err(e) if e.is_transient() => {
                    if !self.wait_database(&mut backoff, &e).await {
                        return Ok(None);
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

enum LineAction {
    Insert {
        table: usize,
        values: Vec<db::Bound>,
    },
    /// Bound for Kafka: goes to the replay spool with the batch.
    Replay {
        account: u64,
        envelope: String,
        route: Route,
    },
    /// A dual payload's Kafka leg, when replay is off: its dual line loads it.
    Skip,
}

enum BatchEnd {
    Committed,
    Cancelled,
    Conflict,
}

/// An offline line as the loader reads it (extra fields are ignored; the
/// counter is optional, as in files written by other tools).
#[derive(serde::Deserialize)]
struct OfflineRecord {
    table: String,
    row: Map<String, Value>,
    #[serde(default)]
    account_id: Option<u64>,
    #[serde(default)]
    route: Option<String>,
}

fn same_file(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// The machine's host name (a pod's name in Kubernetes): the default loader
/// identity.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

fn line_at(raw: &[(u64, Vec<u8>)], at: u64) -> &[u8] {
    raw.iter()
        .find(|(o, _)| *o == at)
        .map(|(_, l)| l.as_slice())
        .unwrap_or_default()
}

/// A line for the dead-letter table, recorded under `file:offset` (so a
/// batch loaded again after a crash records it once). Text as the database
/// stores it: invalid UTF-8 and NUL (which PostgreSQL refuses) replaced by
/// U+FFFD, and at most [`DEAD_LETTER_MAX_BYTES`] of it.
fn dead_letter(file: &str, offset: u64, reason: String, line: &[u8]) -> DeadLetter {
    let mut text = String::from_utf8_lossy(line).replace('\0', "\u{fffd}");
    let mut reason = reason.replace('\0', "\u{fffd}");
    if text.len() > DEAD_LETTER_MAX_BYTES {
        let mut cut = DEAD_LETTER_MAX_BYTES;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        reason.push_str(&format!(
            " (line of {} bytes: the first {cut} are recorded)",
            text.len()
        ));
        text.truncate(cut);
    }
    DeadLetter {
        source: format!("{file}:{offset}"),
        reason,
        payload: text,
    }
}

/// Moves a loaded file into the archive folder. `rename` when both are on
/// one filesystem; across filesystems (EXDEV: an archive volume of its own) a
/// copy under a temporary name, synced and renamed into place, then the
/// original removed. A crash leaves the file in one place or in both, never
/// in neither, and the next attempt finishes the move.
fn archive(path: &Path, dir: &Path, name: &str) -> io::Result<()> {
    let to = dir.join(name);
    match fs::rename(path, &to) {
        Err(e) if e.kind() == io::ErrorKind::CrossesDevices => {
            let partial = dir.join(format!("{name}.partial"));
            fs::copy(path, &partial)?;
            fs::File::open(&partial)?.sync_all()?;
            fs::rename(&partial, &to)?;
            crate::offline::sync_dir(dir)?;
            fs::remove_file(path)
        }
        res => {
            res?;
            crate::offline::sync_dir(dir)
        }
    }
}

/// The loader can run on a spawned task (the demo runs every role in one process).
#[cfg(test)]
#[allow(dead_code)]
fn run_is_send(o: LoadOptions, s: &Schema, d: &Db, m: LoadMetrics, t: CancellationToken) {
    fn is_send<T: Send>(_: &T) {}
    is_send(&run(o, s, d, None, m, t));
}
