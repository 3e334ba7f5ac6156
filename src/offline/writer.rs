//! The offline file writer: one thread owns the file. Requests hand it whole
//! batches of lines and wait for an acknowledgement that comes only once the
//! fsync policy is met. Batches that arrive while a sync runs are written and
//! synced together (group commit), so fsync cost is shared under load.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use tokio::sync::oneshot;

use super::OfflineMetrics;
use super::{sync_dir, LinePrefix, CLOSED_SUFFIX, OPEN_SUFFIX};

/// When a write counts as durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FsyncPolicy {
    /// fdatasync after every batch of writes before acknowledging them
    /// (batches that queue up during a sync share the next one).
    Batch,
    /// fdatasync at most every `group_commit_ms`; writes are acknowledged after
    /// the sync that covers them.
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
        fs::create_dir_all(&cfg.dir)?;
        let last_micros = newest_micros(&cfg.dir)?;
        let (tx, rx) = mpsc::sync_channel(cfg.queue_depth.max(1));
        let handle = thread::Builder::new()
            .name("offline-writer".into())
            .spawn(move || {
                let mut w = Writer {
                    cfg,
                    metrics,
                    file: None,
                    unsynced: Vec::new(),
                    unsynced_since: None,
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
    file: File,
    open_path: PathBuf,
    closed_path: PathBuf,
    len: u64,
    synced_len: u64,
    opened_at: Instant,
    counter: u64,
}

struct Writer {
    cfg: WriterConfig,
    metrics: OfflineMetrics,
    file: Option<OpenFile>,
    /// Written but waiting for a sync (group policy).
    unsynced: Vec<Ack>,
    /// When the oldest of `unsynced` was written.
    unsynced_since: Option<Instant>,
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
                        self.close_file("shutdown");
                        let _ = c.send(());
                        return;
                    }
                }
                Some(Msg::Close(c)) => {
                    self.close_file("shutdown");
                    let _ = c.send(());
                    return;
                }
                None => self.on_timer(),
            }
        }
        self.close_file("shutdown");
    }

    fn next_deadline(&self) -> Option<Instant> {
        let f = self.file.as_ref()?;
        let age = f.opened_at + self.cfg.max_file_age;
        match self.unsynced_since {
            Some(t) if self.cfg.fsync == FsyncPolicy::Group => {
                Some(age.min(t + self.cfg.group_commit))
            }
            _ => Some(age),
        }
    }

    fn take_unsynced(&mut self) -> Vec<Ack> {
        self.unsynced_since = None;
        std::mem::take(&mut self.unsynced)
    }

    fn add_unsynced(&mut self, acks: &mut Vec<Ack>) {
        if self.unsynced_since.is_none() && !acks.is_empty() {
            self.unsynced_since = Some(Instant::now());
        }
        self.unsynced.append(acks);
    }

    fn on_timer(&mut self) {
        if !self.unsynced.is_empty() {
            self.sync_and_ack();
        }
        if self
            .file
            .as_ref()
            .is_some_and(|f| f.opened_at.elapsed() >= self.cfg.max_file_age)
        {
            self.close_file("age");
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
                    self.close_file("size");
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
                FsyncPolicy::Batch => self.sync_and_ack(),
                FsyncPolicy::Group => {
                    // Under steady load the timer may never fire between
                    // messages: sync here once the oldest write is due.
                    if self
                        .unsynced_since
                        .is_some_and(|t| t.elapsed() >= self.cfg.group_commit)
                    {
                        self.sync_and_ack();
                    }
                }
                FsyncPolicy::Never => {
                    for a in self.take_unsynced() {
                        let _ = a.send(Ok(()));
                    }
                }
            }
        }
    }

    /// Writes `buf` to the current file; on success the acks join `unsynced`.
    /// On failure the file is cut back to its last good length and the acks
    /// fail. Returns true on success.
    fn flush(&mut self, buf: &mut Vec<u8>, acks: &mut Vec<Ack>, lines: u64) -> bool {
        if buf.is_empty() {
            self.add_unsynced(acks);
            return true;
        }
        let Some(f) = self.file.as_mut() else {
            let e = io::Error::other("no offline file is open");
            let failed = std::mem::take(acks);
            self.fail(failed, &e);
            buf.clear();
            return false;
        };
        match f.file.write_all(buf) {
            Ok(()) => {
                f.len += buf.len() as u64;
                self.metrics.lines.inc_by(lines);
                self.metrics.bytes.inc_by(buf.len() as u64);
                self.metrics.current_file_bytes.set(f.len as i64);
                buf.clear();
                self.add_unsynced(acks);
                true
            }
            Err(e) => {
                buf.clear();
                let failed = std::mem::take(acks);
                self.abandon_tail(&e);
                self.fail(failed, &e);
                false
            }
        }
    }

    /// After a failed write: cut the file back to what was written whole.
    fn abandon_tail(&mut self, cause: &io::Error) {
        let Some(f) = self.file.as_mut() else { return };
        let cut = f.file.set_len(f.len).and_then(|_| {
            use std::io::Seek;
            f.file.seek(io::SeekFrom::Start(f.len)).map(|_| ())
        });
        if let Err(e) = cut {
            // Leave it open-named: the next start's repair cuts the tail.
            tracing::error!(file = %f.open_path.display(), error = %e, cause = %cause, "cannot cut a failed write; abandoning the file");
            self.file = None;
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
        let Some(f) = self.file.as_mut() else {
            // The file was closed (and synced) since: everything is durable.
            for a in self.take_unsynced() {
                let _ = a.send(Ok(()));
            }
            return;
        };
        let started = Instant::now();
        let res = f.file.sync_data();
        self.metrics
            .fsync_seconds
            .observe(started.elapsed().as_secs_f64());
        match res {
            Ok(()) => {
                f.synced_len = f.len;
                for a in self.take_unsynced() {
                    let _ = a.send(Ok(()));
                }
            }
            Err(e) => {
                // After a failed fsync the kernel may have dropped the pages:
                // nothing unsynced can be trusted. Fail it and start afresh.
                let acks: Vec<Ack> = self.take_unsynced();
                if let Some(f) = self.file.as_mut() {
                    f.len = f.synced_len;
                }
                self.abandon_tail(&e);
                self.fail(acks, &e);
                self.close_file("error");
            }
        }
    }

    fn open_file(&mut self) -> io::Result<()> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        // Monotonic even if the clock steps back, so names keep creation order.
        let micros = now.max(self.last_micros + 1);
        self.last_micros = micros;
        self.seq += 1;
        let stem = format!("{}-{micros:016}-{:06}", self.cfg.prefix, self.seq);
        let open_path = self.cfg.dir.join(format!("{stem}{OPEN_SUFFIX}"));
        let closed_path = self.cfg.dir.join(format!("{stem}{CLOSED_SUFFIX}"));
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&open_path)?;
        if self.cfg.fsync != FsyncPolicy::Never {
            // The file's name must be durable before any line in it is acked.
            sync_dir(&self.cfg.dir)?;
        }
        self.file = Some(OpenFile {
            file,
            open_path,
            closed_path,
            len: 0,
            synced_len: 0,
            opened_at: Instant::now(),
            counter: 0,
        });
        Ok(())
    }

    /// Syncs, renames the file closed and acknowledges what waited on a sync.
    fn close_file(&mut self, reason: &'static str) {
        let Some(f) = self.file.take() else {
            for a in self.take_unsynced() {
                let _ = a.send(Ok(()));
            }
            return;
        };
        let res = (if self.cfg.fsync == FsyncPolicy::Never && reason != "shutdown" {
            Ok(())
        } else {
            f.file.sync_data()
        })
        .and_then(|_| fs::rename(&f.open_path, &f.closed_path))
        .and_then(|_| sync_dir(&self.cfg.dir));
        match res {
            Ok(()) => {
                self.metrics.rotations.with_label_values(&[reason]).inc();
                self.metrics.current_file_bytes.set(0);
                tracing::debug!(file = %f.closed_path.display(), bytes = f.len, lines = f.counter, reason, "offline file closed");
                for a in self.take_unsynced() {
                    let _ = a.send(Ok(()));
                }
            }
            Err(e) => {
                let acks: Vec<Ack> = self.take_unsynced();
                self.fail(acks, &e);
                tracing::error!(file = %f.open_path.display(), error = %e, "cannot close offline file; repair at next start will close it");
            }
        }
    }
}

/// The largest creation time in existing file names, so new names sort after them.
fn newest_micros(dir: &Path) -> io::Result<u64> {
    let mut newest = 0;
    for entry in fs::read_dir(dir)? {
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
    use crate::offline::{closed_files, open_files, read_lines};

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

    #[tokio::test]
    async fn rotates_by_size_in_order_and_closes_on_shutdown() {
        for policy in [FsyncPolicy::Batch, FsyncPolicy::Group, FsyncPolicy::Never] {
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
    async fn rotates_by_age() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = cfg(dir.path(), FsyncPolicy::Batch);
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
        let (w, _h) = OfflineWriter::start(cfg(dir.path(), FsyncPolicy::Batch), m.clone()).unwrap();
        // Replace the folder by a file: creating the offline file now fails.
        let path = dir.path().to_path_buf();
        std::fs::remove_dir_all(&path).unwrap();
        std::fs::write(&path, b"not a folder").unwrap();
        let err = w.write(vec![line(1)]).await.unwrap_err();
        assert!(matches!(err, WriteError::Io(_)), "{err}");
        assert_eq!(m.write_errors.get(), 1);
        std::fs::remove_file(&path).unwrap();
    }
}
