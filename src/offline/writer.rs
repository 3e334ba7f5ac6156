//! The offline file writer: one thread owns the file. Requests hand it whole
//! batches of lines and wait for an acknowledgement that comes only once the
//! fsync policy is met. With `adaptive` (the default) a sync starts as soon
//! as the previous one ends and covers every batch that queued meanwhile, as
//! PostgreSQL's WAL writer does: one request alone waits for one fdatasync,
//! and under load the cost of a sync is shared by all that queued during the
//! last, without a timer.
//!
//! Acknowledgements: a line's ack waits in the file it was written to
//! ([`OpenFile::unsynced`]) and is answered Ok only by a successful sync of
//! that file (with `never`: by its successful write). Whatever ends a file
//! settles its waiting acks: a clean close syncs first and answers Ok; a file
//! abandoned after a failure (a write whose tail cannot be cut, a failed
//! sync) answers Err. A file that cannot be closed (renamed `.ndjson`) keeps
//! only acknowledged lines and is retried until it closes; the next start's
//! [`super::repair`] closes it otherwise.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use tokio::sync::oneshot;

use super::OfflineMetrics;
use super::{LinePrefix, CLOSED_SUFFIX, OPEN_SUFFIX};

/// When a write counts as durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FsyncPolicy {
    /// Adaptive group commit: fdatasync as soon as the previous sync ends,
    /// covering everything written meanwhile, then acknowledge it. Nothing
    /// waits for a timer; under load the batches that queue during one sync
    /// share the next. Also accepted as `batch`, its former name.
    #[serde(alias = "batch")]
    Adaptive,
    /// fdatasync at most every `group_commit_ms`; writes are acknowledged after
    /// the sync that covers them (each waits up to that interval, even alone).
    Group,
    /// Never sync: acknowledged once written to the kernel (survives a process
    /// crash, not a power loss).
    Never,
}

/// Writer settings.
#[derive(Debug, Clone)]
pub struct WriterConfig {
    pub dir: PathBuf,
    /// File name prefix.
    pub prefix: String,
    /// Close the file once it reaches this size.
    pub max_file_bytes: u64,
    /// Close the file once it is this old (if it holds anything).
    pub max_file_age: Duration,
    pub fsync: FsyncPolicy,
    /// Interval for [`FsyncPolicy::Group`].
    pub group_commit: Duration,
    /// Batches that may wait for the writer; beyond it, submit fails (back-pressure).
    pub queue_depth: usize,
    /// How often files that could not be closed are retried.
    pub close_retry: Duration,
}

/// Why a write was not acknowledged. The payloads were not kept.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WriteError {
    #[error("offline file write failed: {0}")]
    Io(String),
    #[error("offline file writer is closed")]
    Closed,
}

/// Why a batch was not even queued.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("offline file writer queue is full")]
    Busy,
    #[error("offline file writer is closed")]
    Closed,
}

/// The file-system calls of the writer, so that tests can make them fail.
pub(crate) trait Disk: Send {
    /// Creates `path`, which must not exist, for appending.
    fn create_new(&self, path: &Path) -> io::Result<Box<dyn DiskFile>>;
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Makes a create, rename or remove in `dir` durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
}

/// An open offline file.
pub(crate) trait DiskFile: Send {
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()>;
    fn sync_data(&mut self) -> io::Result<()>;
    fn set_len(&mut self, len: u64) -> io::Result<()>;
    fn seek_to(&mut self, pos: u64) -> io::Result<()>;
}

/// The real file system.
struct StdDisk;

impl Disk for StdDisk {
    fn create_new(&self, path: &Path) -> io::Result<Box<dyn DiskFile>> {
        Ok(Box::new(create_new(path)?))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        super::sync_dir(dir)
    }
}

impl DiskFile for File {
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        Write::write_all(self, buf)
    }

    fn sync_data(&mut self) -> io::Result<()> {
        File::sync_data(self)
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        File::set_len(self, len)
    }

    fn seek_to(&mut self, pos: u64) -> io::Result<()> {
        self.seek(io::SeekFrom::Start(pos)).map(|_| ())
    }
}

fn create_new(path: &Path) -> io::Result<File> {
    OpenOptions::new().create_new(true).append(true).open(path)
}

type Ack = oneshot::Sender<Result<(), WriteError>>;

struct Batch {
    lines: Vec<LinePrefix>,
    ack: Ack,
}

enum Msg {
    Write(Batch),
    Close(oneshot::Sender<()>),
}

/// Handle to the writer thread.
#[derive(Clone)]
pub struct OfflineWriter {
    tx: SyncSender<Msg>,
}

impl OfflineWriter {
    /// Starts the writer thread. The folder must exist and be writable; repair
    /// of files left open must have run before.
    pub fn start(
        cfg: WriterConfig,
        metrics: OfflineMetrics,
    ) -> io::Result<(OfflineWriter, thread::JoinHandle<()>)> {
        Self::start_with(cfg, metrics, Box::new(StdDisk))
    }

    /// [`OfflineWriter::start`] on the given file system.
    pub(crate) fn start_with(
        cfg: WriterConfig,
        metrics: OfflineMetrics,
        disk: Box<dyn Disk>,
    ) -> io::Result<(OfflineWriter, thread::JoinHandle<()>)> {
        std::fs::create_dir_all(&cfg.dir)?;
        let last_micros = newest_micros(&cfg.dir)?;
        let (tx, rx) = mpsc::sync_channel(cfg.queue_depth.max(1));
        let handle = thread::Builder::new()
            .name("offline-writer".into())
            .spawn(move || {
                let mut w = Writer {
                    cfg,
                    metrics,
                    disk,
                    file: None,
                    stranded: Vec::new(),
                    next_retry: Instant::now(),
                    last_micros,
                    seq: 0,
                };
                w.run(rx);
            })?;
        Ok((OfflineWriter { tx }, handle))
    }

    /// Queues lines; the receiver resolves once they are durable per policy.
    pub fn submit(
        &self,
        lines: Vec<LinePrefix>,
    ) -> Result<oneshot::Receiver<Result<(), WriteError>>, SubmitError> {
        let (ack, rx) = oneshot::channel();
        match self.tx.try_send(Msg::Write(Batch { lines, ack })) {
            Ok(()) => Ok(rx),
            Err(TrySendError::Full(_)) => Err(SubmitError::Busy),
            Err(TrySendError::Disconnected(_)) => Err(SubmitError::Closed),
        }
    }

    /// Writes lines and waits until they are durable.
    pub async fn write(&self, lines: Vec<LinePrefix>) -> Result<(), WriteError> {
        match self.submit(lines) {
            Ok(rx) => rx.await.unwrap_or(Err(WriteError::Closed)),
            Err(SubmitError::Busy) => Err(WriteError::Io("writer queue is full".into())),
            Err(SubmitError::Closed) => Err(WriteError::Closed),
        }
    }

    /// Syncs and closes the current file after everything queued before it.
    pub async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        // A full queue is waited out: close must come after the queued batches.
        let sender = self.tx.clone();
        let queued = tokio::task::spawn_blocking(move || sender.send(Msg::Close(tx))).await;
        if matches!(queued, Ok(Ok(()))) {
            let _ = rx.await;
        }
    }
}

struct OpenFile {
    file: Box<dyn DiskFile>,
    open_path: PathBuf,
    closed_path: PathBuf,
    /// Bytes written whole.
    len: u64,
    /// Bytes covered by the last successful sync.
    synced_len: u64,
    opened_at: Instant,
    /// Counter of the last line formatted for this file.
    counter: u64,
    /// Counter of the last line in `len`: formatted lines whose write failed
    /// give their numbers back.
    written_counter: u64,
    /// Acks of lines written to this file that wait for its next sync (never
    /// with [`FsyncPolicy::Never`]: acked once written). They live here, not
    /// on the writer, so that they end with this file: Ok only after a sync
    /// of this very file succeeded, Err when it is abandoned.
    unsynced: Vec<Ack>,
    /// When the oldest of `unsynced` was written.
    unsynced_since: Option<Instant>,
}

impl OpenFile {
    fn sync(&mut self, metrics: &OfflineMetrics) -> io::Result<()> {
        let started = Instant::now();
        let res = self.file.sync_data();
        metrics
            .fsync_seconds
            .observe(started.elapsed().as_secs_f64());
        if res.is_ok() {
            self.synced_len = self.len;
        }
        res
    }

    fn take_unsynced(&mut self) -> Vec<Ack> {
        self.unsynced_since = None;
        std::mem::take(&mut self.unsynced)
    }
}

/// A file that is no longer written but not yet closed: its close failed, or
/// it was abandoned and its cut or close failed. Every ack of its lines has
/// been answered; what remains is to make it loadable.
struct Stranded {
    file: Box<dyn DiskFile>,
    open_path: PathBuf,
    closed_path: PathBuf,
    /// The acknowledged lines, which the file keeps; past them, lines whose
    /// acks failed and perhaps a torn write. 0: the file is removed.
    keep_len: u64,
    /// The file may be longer than `keep_len`.
    needs_cut: bool,
    /// Its first `keep_len` bytes are synced.
    synced: bool,
    /// Renamed closed (or removed): only the folder sync is missing.
    renamed: bool,
    /// A retry failure was logged at error level (later ones are not).
    logged: bool,
}

impl Stranded {
    fn new(f: OpenFile, keep_len: u64, needs_cut: bool, synced: bool) -> Stranded {
        Stranded {
            file: f.file,
            open_path: f.open_path,
            closed_path: f.closed_path,
            keep_len,
            needs_cut,
            synced,
            renamed: false,
            logged: false,
        }
    }
}

struct Writer {
    cfg: WriterConfig,
    metrics: OfflineMetrics,
    disk: Box<dyn Disk>,
    file: Option<OpenFile>,
    /// Files to close again, oldest first.
    stranded: Vec<Stranded>,
    /// When `stranded` is retried next.
    next_retry: Instant,
    last_micros: u64,
    seq: u64,
}

impl Writer {
    fn run(&mut self, rx: mpsc::Receiver<Msg>) {
        loop {
            let msg = match self.next_deadline() {
                Some(deadline) => {
                    let wait = deadline.saturating_duration_since(Instant::now());
                    match rx.recv_timeout(wait) {
                        Ok(m) => Some(m),
                        Err(RecvTimeoutError::Timeout) => None,
                        Err(RecvTimeoutError::Disconnected) => break,
                    }
                }
                None => match rx.recv() {
                    Ok(m) => Some(m),
                    Err(_) => break,
                },
            };
            match msg {
                Some(Msg::Write(first)) => {
                    let mut batches = vec![first];
                    let mut close = None;
                    while let Ok(m) = rx.try_recv() {
                        match m {
                            Msg::Write(b) => batches.push(b),
                            Msg::Close(c) => {
                                close = Some(c);
                                break;
                            }
                        }
                    }
                    self.write_batches(batches);
                    if let Some(c) = close {
                        self.shutdown();
                        let _ = c.send(());
                        return;
                    }
                }
                Some(Msg::Close(c)) => {
                    self.shutdown();
                    let _ = c.send(());
                    return;
                }
                None => self.on_timer(),
            }
            // Checked after every message too: under steady load the timer
            // may never fire.
            if !self.stranded.is_empty() && Instant::now() >= self.next_retry {
                self.retry_stranded(false);
            }
        }
        self.shutdown();
    }

    fn next_deadline(&self) -> Option<Instant> {
        let file = self.file.as_ref().map(|f| {
            let age = f.opened_at + self.cfg.max_file_age;
            match f.unsynced_since {
                Some(t) if self.cfg.fsync == FsyncPolicy::Group => {
                    age.min(t + self.cfg.group_commit)
                }
                _ => age,
            }
        });
        let retry = (!self.stranded.is_empty()).then_some(self.next_retry);
        file.into_iter().chain(retry).min()
    }

    fn on_timer(&mut self) {
        // The timer may have fired for a retry: sync only once it is due.
        let sync_due = self.file.as_ref().is_some_and(|f| {
            f.unsynced_since.is_some_and(|t| {
                self.cfg.fsync != FsyncPolicy::Group || t.elapsed() >= self.cfg.group_commit
            })
        });
        if sync_due {
            self.sync_and_ack();
        }
        if self
            .file
            .as_ref()
            .is_some_and(|f| f.opened_at.elapsed() >= self.cfg.max_file_age)
        {
            self.rotate("age");
        }
    }

    fn shutdown(&mut self) {
        self.close_file("shutdown");
        if !self.stranded.is_empty() {
            self.retry_stranded(true);
        }
        for s in &self.stranded {
            // Its acknowledged lines are whole lines at its start. The next
            // start's `repair` keeps the longest prefix of whole, parseable
            // lines, moves anything after it to `.torn`, syncs and renames
            // the file closed: a file of whole lines is closed as it is.
            // Lines past the acknowledged ones were answered Err: repair
            // keeps them if whole (duplicates, which loading absorbs).
            tracing::error!(file = %s.open_path.display(), "offline file left open at shutdown; the next start's repair closes it");
        }
    }

    fn write_batches(&mut self, batches: Vec<Batch>) {
        let mut buf: Vec<u8> = Vec::new();
        let mut acks: Vec<Ack> = Vec::new();
        let mut lines_in_buf = 0u64;
        for batch in batches {
            let estimate: u64 = batch.lines.iter().map(|l| l.len() as u64 + 32).sum();
            let current = self.file.as_ref().map_or(0, |f| f.len) + buf.len() as u64;
            if current > 0 && current + estimate > self.cfg.max_file_bytes {
                // Close this file first: what is buffered goes in it, synced.
                if self.flush(&mut buf, &mut acks, lines_in_buf) {
                    self.rotate("size");
                }
                lines_in_buf = 0;
            }
            if self.file.is_none() {
                if let Err(e) = self.open_file() {
                    self.fail(vec![batch.ack], &e);
                    continue;
                }
            }
            if let Some(f) = self.file.as_mut() {
                for line in &batch.lines {
                    f.counter += 1;
                    line.write_with_counter(&mut buf, f.counter);
                }
                lines_in_buf += batch.lines.len() as u64;
                acks.push(batch.ack);
            }
        }
        if self.flush(&mut buf, &mut acks, lines_in_buf) {
            match self.cfg.fsync {
                FsyncPolicy::Adaptive => self.sync_and_ack(),
                FsyncPolicy::Group => {
                    // Under steady load the timer may never fire between
                    // messages: sync here once the oldest write is due.
                    if self.file.as_ref().is_some_and(|f| {
                        f.unsynced_since
                            .is_some_and(|t| t.elapsed() >= self.cfg.group_commit)
                    }) {
                        self.sync_and_ack();
                    }
                }
                // Acknowledged by the write itself.
                FsyncPolicy::Never => {}
            }
        }
    }

    /// Writes `buf` to the current file; on success the acks wait for its
    /// sync (with `never` they are answered Ok). On failure they fail, and
    /// the file is cut back to its last whole write or abandoned. Returns
    /// true on success.
    fn flush(&mut self, buf: &mut Vec<u8>, acks: &mut Vec<Ack>, lines: u64) -> bool {
        if buf.is_empty() && acks.is_empty() {
            return true;
        }
        let Some(f) = self.file.as_mut() else {
            let e = io::Error::other("no offline file is open");
            let failed = std::mem::take(acks);
            self.fail(failed, &e);
            buf.clear();
            return false;
        };
        let written = if buf.is_empty() {
            Ok(())
        } else {
            f.file.write_all(buf)
        };
        match written {
            Ok(()) => {
                f.len += buf.len() as u64;
                f.written_counter = f.counter;
                self.metrics.lines.inc_by(lines);
                self.metrics.bytes.inc_by(buf.len() as u64);
                self.metrics.current_file_bytes.set(f.len as i64);
                buf.clear();
                if self.cfg.fsync == FsyncPolicy::Never {
                    for a in acks.drain(..) {
                        let _ = a.send(Ok(()));
                    }
                } else {
                    if f.unsynced_since.is_none() {
                        f.unsynced_since = Some(Instant::now());
                    }
                    f.unsynced.append(acks);
                }
                true
            }
            Err(e) => {
                buf.clear();
                let failed = std::mem::take(acks);
                f.counter = f.written_counter;
                // Cut the file back to what was written whole.
                let cut = f.file.set_len(f.len).and_then(|()| f.file.seek_to(f.len));
                match cut {
                    Ok(()) => {
                        self.fail(failed, &e);
                        // Earlier lines waiting for a sync are settled now,
                        // not left to the timer: a failed write often means
                        // a failing disk. If this sync fails too, they fail.
                        if self.file.as_ref().is_some_and(|f| !f.unsynced.is_empty()) {
                            self.sync_and_ack();
                        }
                    }
                    Err(cut_err) => {
                        tracing::error!(file = %f.open_path.display(), error = %cut_err, cause = %e, "cannot cut a failed write; abandoning the file");
                        if let Some(f) = self.file.take() {
                            self.abandon(f, &e, failed);
                        }
                    }
                }
                false
            }
        }
    }

    fn fail(&mut self, acks: Vec<Ack>, e: &io::Error) {
        self.metrics.write_errors.inc();
        tracing::error!(error = %e, dir = %self.cfg.dir.display(), batches = acks.len(), "offline write failed");
        for a in acks {
            let _ = a.send(Err(WriteError::Io(e.to_string())));
        }
    }

    fn sync_and_ack(&mut self) {
        // Acks wait in the file they were written to: without a file, none waits.
        let Some(f) = self.file.as_mut() else { return };
        match f.sync(&self.metrics) {
            Ok(()) => {
                for a in f.take_unsynced() {
                    let _ = a.send(Ok(()));
                }
            }
            Err(e) => {
                // After a failed fsync the kernel may have dropped the pages:
                // nothing unsynced can be trusted. Fail it and start afresh.
                if let Some(f) = self.file.take() {
                    self.abandon(f, &e, Vec::new());
                }
            }
        }
    }

    /// Ends a file after a failure that leaves its unsynced lines untrusted
    /// (a failed sync, a failed write whose tail cannot be cut): `failed` and
    /// every ack still waiting on the file fail. The file is cut back to its
    /// acknowledged lines and closed, now or by a retry; the next batch opens
    /// a new file.
    fn abandon(&mut self, mut f: OpenFile, cause: &io::Error, mut failed: Vec<Ack>) {
        failed.append(&mut f.take_unsynced());
        self.fail(failed, cause);
        self.metrics.current_file_bytes.set(0);
        // The acknowledged lines: with `never` every whole write, otherwise
        // what the last successful sync covered.
        let keep_len = if self.cfg.fsync == FsyncPolicy::Never {
            f.len
        } else {
            f.synced_len
        };
        let s = Stranded::new(f, keep_len, true, false);
        self.close_or_strand(s, "error");
    }

    fn open_file(&mut self) -> io::Result<()> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        // Monotonic even if the clock steps back, so names keep creation order
        // (a file opened after an abandoned one sorts after it).
        let micros = now.max(self.last_micros + 1);
        self.last_micros = micros;
        self.seq += 1;
        let stem = format!("{}-{micros:016}-{:06}", self.cfg.prefix, self.seq);
        let open_path = self.cfg.dir.join(format!("{stem}{OPEN_SUFFIX}"));
        let closed_path = self.cfg.dir.join(format!("{stem}{CLOSED_SUFFIX}"));
        let file = self.disk.create_new(&open_path)?;
        if self.cfg.fsync != FsyncPolicy::Never {
            // The file's name must be durable before any line in it is acked.
            if let Err(e) = self.disk.sync_dir(&self.cfg.dir) {
                // Nothing was written to it: the retries remove it, as
                // the next start's repair would.
                self.strand(Stranded {
                    file,
                    open_path,
                    closed_path,
                    keep_len: 0,
                    needs_cut: false,
                    synced: true,
                    renamed: false,
                    logged: false,
                });
                return Err(e);
            }
        }
        self.file = Some(OpenFile {
            file,
            open_path,
            closed_path,
            len: 0,
            synced_len: 0,
            opened_at: Instant::now(),
            counter: 0,
            written_counter: 0,
            unsynced: Vec::new(),
            unsynced_since: None,
        });
        Ok(())
    }

    /// Closes the current file, then retries the stranded ones: a rotation
    /// is a good time to see whether the disk has recovered.
    fn rotate(&mut self, reason: &'static str) {
        self.close_file(reason);
        if !self.stranded.is_empty() {
            self.retry_stranded(false);
        }
    }

    /// Syncs, acknowledges what waited on a sync, and renames the file closed.
    fn close_file(&mut self, reason: &'static str) {
        let Some(mut f) = self.file.take() else {
            return;
        };
        let sync = self.cfg.fsync != FsyncPolicy::Never || reason == "shutdown";
        if sync {
            if let Err(e) = f.sync(&self.metrics) {
                self.abandon(f, &e, Vec::new());
                return;
            }
        }
        self.metrics.current_file_bytes.set(0);
        // Every line of the file is durable now (with `never`: was acked at
        // its write). Its acks are answered Ok even if the rename below
        // fails: that only delays loading, the lines stay synced under the
        // open name until a retry or the next start's repair renames it.
        for a in f.take_unsynced() {
            let _ = a.send(Ok(()));
        }
        let keep_len = f.len;
        let s = Stranded::new(f, keep_len, false, sync);
        self.close_or_strand(s, reason);
    }

    fn close_or_strand(&mut self, mut s: Stranded, reason: &'static str) {
        match self.finish(&mut s, self.cfg.fsync != FsyncPolicy::Never) {
            Ok(()) => {
                self.metrics.rotations.with_label_values(&[reason]).inc();
                tracing::debug!(file = %s.closed_path.display(), bytes = s.keep_len, reason, "offline file closed");
            }
            Err(e) => {
                tracing::error!(file = %s.open_path.display(), error = %e, reason, retry_every = ?self.cfg.close_retry, "cannot close offline file; retrying (or repair at next start)");
                self.strand(s);
            }
        }
    }

    fn strand(&mut self, s: Stranded) {
        if self.stranded.is_empty() {
            self.next_retry = Instant::now() + self.cfg.close_retry;
        }
        self.stranded.push(s);
    }

    /// Takes a file that is no longer written to its closed state: cut to its
    /// acknowledged lines, synced (if `sync`), renamed closed (removed if
    /// empty) and the folder synced. Resumes where an earlier attempt failed.
    fn finish(&self, s: &mut Stranded, sync: bool) -> io::Result<()> {
        if !s.renamed {
            if s.needs_cut {
                s.file.set_len(s.keep_len)?;
                s.needs_cut = false;
                s.synced = false;
            }
            if sync && !s.synced {
                s.file.sync_data()?;
                s.synced = true;
            }
            let res = if s.keep_len == 0 {
                self.disk.remove_file(&s.open_path)
            } else {
                self.disk.rename(&s.open_path, &s.closed_path)
            };
            match res {
                Ok(()) => {}
                // Renamed or removed by someone else (an operator, a repair
                // run by hand): nothing is left to close, and retrying
                // would fail forever.
                Err(e) if e.kind() == io::ErrorKind::NotFound && !s.open_path.exists() => {
                    tracing::warn!(file = %s.open_path.display(), "an offline file waiting to be closed was moved away by someone else");
                }
                Err(e) => return Err(e),
            }
            s.renamed = true;
        }
        self.disk.sync_dir(&self.cfg.dir)
    }

    /// Tries to close every stranded file once. At shutdown they are synced
    /// even with `never`, like the last file.
    fn retry_stranded(&mut self, shutdown: bool) {
        let sync = self.cfg.fsync != FsyncPolicy::Never || shutdown;
        let mut left = Vec::new();
        for mut s in std::mem::take(&mut self.stranded) {
            match self.finish(&mut s, sync) {
                Ok(()) => {
                    self.metrics.close_retries.with_label_values(&["ok"]).inc();
                    tracing::info!(file = %s.closed_path.display(), bytes = s.keep_len, "closed an offline file left open by an earlier failure");
                }
                Err(e) => {
                    self.metrics
                        .close_retries
                        .with_label_values(&["failed"])
                        .inc();
                    if s.logged {
                        tracing::debug!(file = %s.open_path.display(), error = %e, "offline file still cannot be closed");
                    } else {
                        tracing::error!(file = %s.open_path.display(), error = %e, "offline file still cannot be closed; retrying");
                        s.logged = true;
                    }
                    left.push(s);
                }
            }
        }
        self.stranded = left;
        self.next_retry = Instant::now() + self.cfg.close_retry;
    }
}

/// The largest creation time in existing file names, so new names sort after them.
fn newest_micros(dir: &Path) -> io::Result<u64> {
    let mut newest = 0;
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        let Some(name) = name.to_str() else { continue };
        // <prefix>-<micros>-<seq>.ndjson[.open|.torn]
        let stem = name.split('.').next().unwrap_or("");
        let mut parts = stem.rsplit('-');
        let _seq = parts.next();
        if let Some(m) = parts.next().and_then(|m| m.parse::<u64>().ok()) {
            newest = newest.max(m);
        }
    }
    Ok(newest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::offline::{closed_files, open_files, read_lines, repair};
    use std::sync::{Arc, Mutex};

    fn metrics() -> OfflineMetrics {
        let reg = prometheus::Registry::new();
        super::OfflineMetrics::new(&reg).unwrap()
    }

    fn cfg(dir: &Path, fsync: FsyncPolicy) -> WriterConfig {
        WriterConfig {
            dir: dir.to_path_buf(),
            prefix: "offline".into(),
            max_file_bytes: 1_000,
            max_file_age: Duration::from_secs(3600),
            fsync,
            group_commit: Duration::from_millis(5),
            queue_depth: 64,
            close_retry: Duration::from_millis(10),
        }
    }

    fn line(i: u64) -> LinePrefix {
        LinePrefix::new(
            "t",
            format!("{{\"id\":{i},\"pad\":\"{}\"}}", "x".repeat(100)).as_bytes(),
            i,
            "legacy",
        )
    }

    /// What the next calls of a [`FaultDisk`] do, and what it saw.
    #[derive(Default)]
    struct Faults {
        /// The write (1-based, over all files) that fails after writing half
        /// its bytes, as on a full disk.
        fail_write: Option<usize>,
        fail_set_len: bool,
        fail_sync: bool,
        fail_rename: bool,
        writes: usize,
        /// Successful file syncs so far.
        syncs: usize,
        /// While set, a file sync waits until it is opened.
        hold_sync: Option<Arc<Gate>>,
    }

    /// Holds syncs back until opened; says whether one is waiting.
    #[derive(Default)]
    struct Gate {
        state: Mutex<(bool, usize)>,
        changed: std::sync::Condvar,
    }

    impl Gate {
        fn pass(&self) {
            let mut s = self.state.lock().unwrap();
            s.1 += 1;
            self.changed.notify_all();
            while !s.0 {
                s = self.changed.wait(s).unwrap();
            }
            s.1 -= 1;
        }

        fn waiting(&self) -> bool {
            self.state.lock().unwrap().1 > 0
        }

        fn open(&self) {
            self.state.lock().unwrap().0 = true;
            self.changed.notify_all();
        }
    }

    /// The real file system in a folder, with injected failures.
    #[derive(Clone, Default)]
    struct FaultDisk(Arc<Mutex<Faults>>);

    impl FaultDisk {
        fn set(&self, f: impl FnOnce(&mut Faults)) {
            f(&mut self.0.lock().unwrap());
        }

        fn writes(&self) -> usize {
            self.0.lock().unwrap().writes
        }

        fn syncs(&self) -> usize {
            self.0.lock().unwrap().syncs
        }
    }

    fn injected(what: &str) -> io::Error {
        io::Error::other(format!("injected {what} failure"))
    }

    impl Disk for FaultDisk {
        fn create_new(&self, path: &Path) -> io::Result<Box<dyn DiskFile>> {
            Ok(Box::new(FaultFile {
                file: create_new(path)?,
                faults: self.0.clone(),
            }))
        }

        fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
            if self.0.lock().unwrap().fail_rename {
                return Err(injected("rename"));
            }
            std::fs::rename(from, to)
        }

        fn remove_file(&self, path: &Path) -> io::Result<()> {
            std::fs::remove_file(path)
        }

        fn sync_dir(&self, dir: &Path) -> io::Result<()> {
            crate::offline::sync_dir(dir)
        }
    }

    struct FaultFile {
        file: File,
        faults: Arc<Mutex<Faults>>,
    }

    impl DiskFile for FaultFile {
        fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
            let fail = {
                let mut f = self.faults.lock().unwrap();
                f.writes += 1;
                f.fail_write == Some(f.writes)
            };
            if fail {
                DiskFile::write_all(&mut self.file, &buf[..buf.len() / 2])?;
                return Err(injected("write"));
            }
            DiskFile::write_all(&mut self.file, buf)
        }

        fn sync_data(&mut self) -> io::Result<()> {
            let gate = self.faults.lock().unwrap().hold_sync.clone();
            if let Some(g) = gate {
                g.pass();
            }
            if self.faults.lock().unwrap().fail_sync {
                return Err(injected("sync"));
            }
            DiskFile::sync_data(&mut self.file)?;
            self.faults.lock().unwrap().syncs += 1;
            Ok(())
        }

        fn set_len(&mut self, len: u64) -> io::Result<()> {
            if self.faults.lock().unwrap().fail_set_len {
                return Err(injected("set_len"));
            }
            DiskFile::set_len(&mut self.file, len)
        }

        fn seek_to(&mut self, pos: u64) -> io::Result<()> {
            DiskFile::seek_to(&mut self.file, pos)
        }
    }

    /// A writer on a [`FaultDisk`]. `group_commit` and `max_file_age` are an
    /// hour, so that an ack with `group` waits until the test ends the file.
    fn start_faulty(
        dir: &Path,
        fsync: FsyncPolicy,
    ) -> (
        OfflineWriter,
        thread::JoinHandle<()>,
        FaultDisk,
        OfflineMetrics,
    ) {
        let mut c = cfg(dir, fsync);
        c.group_commit = Duration::from_secs(3600);
        let disk = FaultDisk::default();
        let m = metrics();
        let (w, h) = OfflineWriter::start_with(c, m.clone(), Box::new(disk.clone())).unwrap();
        (w, h, disk, m)
    }

    /// Polls `cond` until it holds; panics after 10 s.
    async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Submits one line and waits until the writer wrote it (its ack may
    /// still wait for a sync).
    async fn written(
        w: &OfflineWriter,
        disk: &FaultDisk,
        i: u64,
    ) -> oneshot::Receiver<Result<(), WriteError>> {
        let before = disk.writes();
        let rx = w.submit(vec![line(i)]).unwrap();
        wait_for("the write", || disk.writes() > before).await;
        rx
    }

    /// Ids and counters of every line of `path`.
    fn lines_of(path: &Path) -> Vec<(u64, u64)> {
        read_lines(path)
            .unwrap()
            .iter()
            .map(|l| (l.row["id"].as_u64().unwrap(), l.counter))
            .collect()
    }

    #[tokio::test]
    async fn rotates_by_size_in_order_and_closes_on_shutdown() {
        for policy in [
            FsyncPolicy::Adaptive,
            FsyncPolicy::Group,
            FsyncPolicy::Never,
        ] {
            let dir = tempfile::tempdir().unwrap();
            let (w, h) = OfflineWriter::start(cfg(dir.path(), policy), metrics()).unwrap();
            for i in 0..40 {
                w.write(vec![line(i)]).await.unwrap();
            }
            assert_eq!(open_files(dir.path()).unwrap().len(), 1);
            w.close().await;
            h.join().unwrap();
            let files = closed_files(dir.path()).unwrap();
            assert!(files.len() >= 5, "{policy:?}: {} files", files.len());
            let ids: Vec<u64> = files
                .iter()
                .flat_map(|f| read_lines(f).unwrap())
                .map(|l| l.row["id"].as_u64().unwrap())
                .collect();
            assert_eq!(ids, (0..40).collect::<Vec<_>>(), "{policy:?}");
            assert!(open_files(dir.path()).unwrap().is_empty());
        }
    }

    #[tokio::test]
    async fn adaptive_syncs_at_once_and_what_queued_during_a_sync_shares_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = cfg(dir.path(), FsyncPolicy::Adaptive);
        c.group_commit = Duration::from_secs(3600);
        c.max_file_bytes = 1 << 20;
        let disk = FaultDisk::default();
        let (w, h) = OfflineWriter::start_with(c, metrics(), Box::new(disk.clone())).unwrap();
        // Alone, a write is synced and acknowledged without waiting for a
        // timer (the group interval, unused by this policy, is an hour).
        w.write(vec![line(0)]).await.unwrap();
        assert_eq!(disk.syncs(), 1);
        // Hold the next sync: what arrives meanwhile waits for the one after.
        let gate = Arc::new(Gate::default());
        disk.set(|f| f.hold_sync = Some(gate.clone()));
        let first = w.submit(vec![line(1)]).unwrap();
        wait_for("the held sync", || gate.waiting()).await;
        let queued: Vec<_> = (2..10).map(|i| w.submit(vec![line(i)]).unwrap()).collect();
        let writes = disk.writes();
        gate.open();
        first.await.unwrap().unwrap();
        for rx in queued {
            rx.await.unwrap().unwrap();
        }
        // The eight batches that queued during one sync: one write, one sync.
        assert_eq!(disk.writes(), writes + 1);
        assert_eq!(disk.syncs(), 3);
        w.close().await;
        h.join().unwrap();
        let files = closed_files(dir.path()).unwrap();
        let ids: Vec<u64> = files
            .iter()
            .flat_map(|f| lines_of(f))
            .map(|(id, _)| id)
            .collect();
        assert_eq!(ids, (0..10).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn rotates_by_age() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = cfg(dir.path(), FsyncPolicy::Adaptive);
        c.max_file_age = Duration::from_millis(50);
        let (w, _h) = OfflineWriter::start(c, metrics()).unwrap();
        w.write(vec![line(1)]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(closed_files(dir.path()).unwrap().len(), 1);
        assert!(open_files(dir.path()).unwrap().is_empty());
    }

    #[tokio::test]
    async fn an_unwritable_folder_fails_the_write_not_the_process() {
        let dir = tempfile::tempdir().unwrap();
        let m = metrics();
        let (w, _h) =
            OfflineWriter::start(cfg(dir.path(), FsyncPolicy::Adaptive), m.clone()).unwrap();
        // Replace the folder by a file: creating the offline file now fails.
        let path = dir.path().to_path_buf();
        std::fs::remove_dir_all(&path).unwrap();
        std::fs::write(&path, b"not a folder").unwrap();
        let err = w.write(vec![line(1)]).await.unwrap_err();
        assert!(matches!(err, WriteError::Io(_)), "{err}");
        assert_eq!(m.write_errors.get(), 1);
        std::fs::remove_file(&path).unwrap();
    }

    #[tokio::test]
    async fn a_failed_write_that_cannot_be_cut_fails_every_unsynced_ack() {
        for policy in [
            FsyncPolicy::Group,
            FsyncPolicy::Adaptive,
            FsyncPolicy::Never,
        ] {
            let dir = tempfile::tempdir().unwrap();
            let (w, h, disk, m) = start_faulty(dir.path(), policy);
            let mut a = written(&w, &disk, 1).await;
            if policy != FsyncPolicy::Group {
                // Synced (batch) or written (never): acknowledged already.
                (&mut a).await.unwrap().unwrap();
            }
            let first = open_files(dir.path()).unwrap();
            disk.set(|f| {
                f.fail_write = Some(2);
                f.fail_set_len = true;
            });
            let b = w.write(vec![line(2)]).await;
            assert!(matches!(b, Err(WriteError::Io(_))), "{policy:?}: {b:?}");
            if policy == FsyncPolicy::Group {
                // A waited for a sync that never came: its line sits in the
                // abandoned file, before a torn half of B.
                let a = a.await.unwrap();
                assert!(matches!(a, Err(WriteError::Io(_))), "{a:?}");
            }
            // The acks are answered before the file is cut: wait until its
            // cut has failed and a retry has too, then let the disk recover.
            let failed = m.close_retries.with_label_values(&["failed"]);
            wait_for("a failed retry", || failed.get() >= 1).await;
            disk.set(|f| *f = Faults::default());
            let c = written(&w, &disk, 3).await;
            let files = open_files(dir.path()).unwrap();
            assert!(
                files.iter().any(|p| !first.contains(p) && p > &first[0]),
                "{policy:?}: C opened a new file: {files:?}"
            );
            w.close().await;
            h.join().unwrap();
            c.await.unwrap().unwrap();
            assert!(open_files(dir.path()).unwrap().is_empty(), "{policy:?}");
            let closed = closed_files(dir.path()).unwrap();
            let lines: Vec<Vec<(u64, u64)>> = closed.iter().map(|p| lines_of(p)).collect();
            if policy == FsyncPolicy::Group {
                // The abandoned file held no acknowledged line: removed.
                assert_eq!(lines, vec![vec![(3, 1)]]);
            } else {
                // Cut back to A, the acknowledged line.
                assert_eq!(lines, vec![vec![(1, 1)], vec![(3, 1)]], "{policy:?}");
            }
            assert_eq!(
                m.close_retries.with_label_values(&["ok"]).get(),
                1,
                "{policy:?}"
            );
            assert!(m.write_errors.get() >= 1);
        }
    }

    #[tokio::test]
    async fn a_failed_write_cut_back_keeps_the_file_and_syncs_what_came_before() {
        for policy in [
            FsyncPolicy::Group,
            FsyncPolicy::Adaptive,
            FsyncPolicy::Never,
        ] {
            let dir = tempfile::tempdir().unwrap();
            let (w, h, disk, _m) = start_faulty(dir.path(), policy);
            let a = written(&w, &disk, 1).await;
            disk.set(|f| f.fail_write = Some(2));
            let b = w.write(vec![line(2)]).await;
            assert!(matches!(b, Err(WriteError::Io(_))), "{policy:?}: {b:?}");
            // With `group` A was synced on B's failure, not by the timer.
            a.await.unwrap().unwrap();
            // The file goes on: C follows A, with the next counter.
            let c = written(&w, &disk, 3).await;
            assert_eq!(open_files(dir.path()).unwrap().len(), 1);
            w.close().await;
            h.join().unwrap();
            c.await.unwrap().unwrap();
            let closed = closed_files(dir.path()).unwrap();
            assert_eq!(closed.len(), 1, "{policy:?}");
            assert_eq!(lines_of(&closed[0]), vec![(1, 1), (3, 2)], "{policy:?}");
            assert!(open_files(dir.path()).unwrap().is_empty());
        }
    }

    #[tokio::test]
    async fn a_failed_write_whose_prefix_sync_fails_fails_everything() {
        let dir = tempfile::tempdir().unwrap();
        let (w, h, disk, _m) = start_faulty(dir.path(), FsyncPolicy::Group);
        let a = written(&w, &disk, 1).await;
        disk.set(|f| {
            f.fail_write = Some(2);
            f.fail_sync = true;
        });
        let b = w.write(vec![line(2)]).await;
        assert!(matches!(b, Err(WriteError::Io(_))), "{b:?}");
        let a = a.await.unwrap();
        assert!(matches!(a, Err(WriteError::Io(_))), "{a:?}");
        disk.set(|f| *f = Faults::default());
        let c = written(&w, &disk, 3).await;
        w.close().await;
        h.join().unwrap();
        c.await.unwrap().unwrap();
        let closed = closed_files(dir.path()).unwrap();
        let lines: Vec<Vec<(u64, u64)>> = closed.iter().map(|p| lines_of(p)).collect();
        assert_eq!(lines, vec![vec![(3, 1)]]);
        assert!(open_files(dir.path()).unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_failed_sync_fails_every_pending_ack_and_abandons_the_file() {
        for policy in [FsyncPolicy::Adaptive, FsyncPolicy::Group] {
            let dir = tempfile::tempdir().unwrap();
            let mut c = cfg(dir.path(), policy);
            c.group_commit = Duration::from_millis(5);
            let disk = FaultDisk::default();
            let m = metrics();
            let (w, h) = OfflineWriter::start_with(c, m.clone(), Box::new(disk.clone())).unwrap();
            w.write(vec![line(1)]).await.unwrap();
            disk.set(|f| f.fail_sync = true);
            // Two batches: whether they share a sync or not, neither is acked.
            let y1 = w.submit(vec![line(2)]).unwrap();
            let y2 = w.submit(vec![line(3)]).unwrap();
            for y in [y1, y2] {
                let r = y.await.unwrap();
                assert!(matches!(r, Err(WriteError::Io(_))), "{policy:?}: {r:?}");
            }
            disk.set(|f| *f = Faults::default());
            w.write(vec![line(4)]).await.unwrap();
            w.close().await;
            h.join().unwrap();
            assert!(open_files(dir.path()).unwrap().is_empty(), "{policy:?}");
            let closed = closed_files(dir.path()).unwrap();
            let lines: Vec<Vec<(u64, u64)>> = closed.iter().map(|p| lines_of(p)).collect();
            // The first file is cut back to its synced line; the line after
            // the failure went to a new file.
            assert_eq!(lines, vec![vec![(1, 1)], vec![(4, 1)]], "{policy:?}");
            assert!(m.write_errors.get() >= 1);
        }
    }

    #[tokio::test]
    async fn a_file_that_cannot_be_renamed_is_closed_by_a_retry() {
        for policy in [FsyncPolicy::Group, FsyncPolicy::Adaptive] {
            let dir = tempfile::tempdir().unwrap();
            let (w, h, disk, m) = start_faulty(dir.path(), policy);
            let a = written(&w, &disk, 1).await;
            disk.set(|f| f.fail_rename = true);
            // Too big for A's file: A's file is synced and closed first.
            let b = written(&w, &disk, 2).await;
            let big: Vec<LinePrefix> = (10..16).map(line).collect();
            let writes = disk.writes();
            let b2 = w.submit(big).unwrap();
            wait_for("the write after the rotation", || disk.writes() > writes).await;
            // Synced before the rename was tried: durable, so acknowledged,
            // though the file is still open-named.
            a.await.unwrap().unwrap();
            b.await.unwrap().unwrap();
            assert_eq!(open_files(dir.path()).unwrap().len(), 2, "{policy:?}");
            assert!(closed_files(dir.path()).unwrap().is_empty());
            disk.set(|f| f.fail_rename = false);
            let retried = m.close_retries.with_label_values(&["ok"]);
            wait_for("the retried close", || retried.get() == 1).await;
            let closed = closed_files(dir.path()).unwrap();
            assert_eq!(closed.len(), 1, "{policy:?}");
            assert_eq!(lines_of(&closed[0]), vec![(1, 1), (2, 2)]);
            w.close().await;
            h.join().unwrap();
            b2.await.unwrap().unwrap();
            let closed = closed_files(dir.path()).unwrap();
            assert_eq!(closed.len(), 2, "{policy:?}");
            let ids: Vec<u64> = lines_of(&closed[1]).iter().map(|l| l.0).collect();
            assert_eq!(ids, (10..16).collect::<Vec<_>>());
            assert!(open_files(dir.path()).unwrap().is_empty());
        }
    }

    #[tokio::test]
    async fn a_file_still_unrenamable_at_shutdown_is_closed_by_repair() {
        let dir = tempfile::tempdir().unwrap();
        let (w, h, disk, _m) = start_faulty(dir.path(), FsyncPolicy::Adaptive);
        w.write(vec![line(1)]).await.unwrap();
        disk.set(|f| f.fail_rename = true);
        w.close().await;
        h.join().unwrap();
        assert_eq!(open_files(dir.path()).unwrap().len(), 1);
        assert!(closed_files(dir.path()).unwrap().is_empty());
        let r = repair(dir.path(), None).unwrap();
        assert_eq!((r.files, r.lines_kept, r.torn_bytes), (1, 1, 0));
        let closed = closed_files(dir.path()).unwrap();
        assert_eq!(closed.len(), 1);
        assert_eq!(lines_of(&closed[0]), vec![(1, 1)]);
    }
}
