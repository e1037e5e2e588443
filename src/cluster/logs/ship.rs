//! Shipping (see the parent's doc): a job's `out.log` and `stderr.log` read as they grow and
//! inserted in chunks, each announced.

use super::*;

impl Logs {
    // ------------------------------------------------------------------ shipping

    /// Ship the logs of the job whose directory is `dir` (in `pending/` while it runs; its
    /// `ready/` twin is read at the end when a log was not opened before) until
    /// [`Shipper::finish`]. `replaces` when the job may have a previous run's log (a rerun, a
    /// retry): the run starts at once, so that followers do not read the old log meanwhile.
    pub fn ship(self: &Arc<Self>, dir: &JobDir, replaces: bool) -> Shipper {
        let (tx, rx) = watch::channel(false);
        let me = Arc::clone(self);
        let dir = dir.clone();
        let task = tokio::spawn(async move { me.run_shipper(dir, replaces, rx).await });
        Shipper { finish: tx, task }
    }

    /// Ship until finished; a run that ended before anything was shipped, with each log in
    /// one chunk, is not shipped here: its [`WholeLog`] is returned, for the job's end record.
    async fn run_shipper(
        self: Arc<Self>,
        dir: JobDir,
        replaces: bool,
        mut finish: watch::Receiver<bool>,
    ) -> Option<WholeLog> {
        let (project, id) = (dir.project().to_string(), dir.id().to_string());
        let ready = dir.in_stage(crate::engine::Stage::Ready);
        let run = format!(
            "{}-{}",
            self.me(),
            chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default()
        );
        let mut tails = [
            Tail::new(LogStream::Out, dir.out_log(), ready.out_log()),
            Tail::new(LogStream::Stderr, dir.stderr_log(), ready.stderr_log()),
        ];
        let mut started = false;
        let mut finishing = false;
        let mut deadline = None;
        let mut warned = false;
        // A run replacing another starts at once (off the job's critical path). Any other
        // waits for its first output: a short job's log then goes whole with its end record.
        let mut first = replaces;
        loop {
            if !finishing && !first {
                tokio::select! {
                    _ = tokio::time::sleep(self.ship_every) => {}
                    _ = finish.wait_for(|f| *f) => finishing = true,
                }
            }
            first = false;
            if finishing && deadline.is_none() {
                deadline = Some(tokio::time::Instant::now() + FINAL_DEADLINE);
                if !started {
                    Tail::fill_all(&mut tails, true).await;
                    if tails.iter().all(|t| t.buf.len() < CHUNK_MAX) {
                        let chunks = tails
                            .iter_mut()
                            .filter(|t| !t.buf.is_empty())
                            .map(|t| (t.stream, std::mem::take(&mut t.buf)))
                            .collect();
                        return Some(WholeLog { run, chunks });
                    }
                }
            }
            let shipped = async {
                if !started {
                    if !self.start_run(&project, &id, &run).await? {
                        return Ok(false);
                    }
                    started = true;
                }
                for t in &mut tails {
                    if !self
                        .ship_available(&project, &id, &run, t, finishing)
                        .await?
                    {
                        return Ok(false);
                    }
                }
                Ok::<_, ClusterError>(true)
            }
            .await;
            match shipped {
                Ok(true) if finishing => {
                    if let Err(e) = self.notify(&format!("{} end", key_of(&project, &id))).await {
                        tracing::debug!(%project, %id, error = %e, "could not announce the end of the job's log");
                    }
                    return None;
                }
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!(%project, %id, agent = %self.me(), "the job's record is no longer this agent's: its log is not shipped further");
                    return None;
                }
                Err(e) => {
                    if !warned {
                        tracing::warn!(%project, %id, error = %e, "shipping the job's log to the database failed; retrying");
                        warned = true;
                    }
                    if let Some(d) = deadline {
                        if tokio::time::Instant::now() >= d {
                            tracing::warn!(%project, %id, error = %e, "the end of the job's log was not shipped: the database does not answer (it stays in the agent's out.log)");
                            return None;
                        }
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
        }
    }

    /// A run starts: the previous run's chunks go, and followers are told; `Ok(false)` when
    /// the job's record is no longer this agent's.
    async fn start_run(&self, project: &str, id: &str, run: &str) -> Result<bool, ClusterError> {
        let (client, err) = self.client().await?;
        rows::start_run(
            &client,
            project,
            id,
            self.me(),
            &start_notice(project, id, run),
        )
        .await
        .map_err(err)
    }

    /// Ship what `t`'s file holds beyond what was shipped, in chunks; `Ok(false)` when the
    /// job's record is no longer this agent's.
    async fn ship_available(
        &self,
        project: &str,
        id: &str,
        run: &str,
        t: &mut Tail,
        finishing: bool,
    ) -> Result<bool, ClusterError> {
        loop {
            t.fill(finishing).await;
            if t.buf.is_empty() {
                return Ok(true);
            }
            if !self.insert_chunk(project, id, run, t).await? {
                return Ok(false);
            }
            t.pos += t.buf.len() as u64;
            t.buf.clear();
        }
    }

    async fn insert_chunk(
        &self,
        project: &str,
        id: &str,
        run: &str,
        t: &Tail,
    ) -> Result<bool, ClusterError> {
        let payload = format!(
            "{} {} {} {}",
            key_of(project, id),
            t.stream.as_str(),
            t.pos,
            t.buf.len()
        );
        let chunk = rows::Chunk {
            project,
            id,
            stream: t.stream.as_str(),
            pos: t.pos,
            data: &t.buf,
            agent: self.me(),
            run,
        };
        let (client, err) = self.client().await?;
        rows::insert_chunk(&client, &chunk, &payload)
            .await
            .map_err(err)
    }

    async fn notify(&self, payload: &str) -> Result<(), ClusterError> {
        let (client, err) = self.client().await?;
        rows::notify(&client, payload).await.map_err(err)
    }
}

/// A log file as the shipper reads it.
struct Tail {
    stream: LogStream,
    pending: std::path::PathBuf,
    ready: std::path::PathBuf,
    file: Option<std::fs::File>,
    /// The offset of `buf`'s first byte (all before it is shipped).
    pos: u64,
    /// Read, not shipped yet (at most [`CHUNK_MAX`]).
    buf: Vec<u8>,
}

impl Tail {
    fn new(stream: LogStream, pending: std::path::PathBuf, ready: std::path::PathBuf) -> Tail {
        Tail {
            stream,
            pending,
            ready,
            file: None,
            pos: 0,
            buf: Vec::new(),
        }
    }

    /// Read more into `buf`, up to [`CHUNK_MAX`] (the file opened in `pending/`, or in
    /// `ready/` once the job ended): one blocking call, reading what the file has up to the
    /// room left (no zeroed buffer, no read per chunk).
    async fn fill(&mut self, ended: bool) {
        Tail::fill_all(std::slice::from_mut(self), ended).await;
    }

    /// [`Tail::fill`] of every tail in `tails`, in one blocking call (a short job's two logs
    /// are read once, right after its end, on the way to its end's record).
    async fn fill_all(tails: &mut [Tail], ended: bool) {
        let reads: Vec<Option<Read>> = tails.iter_mut().map(|t| t.take_read(ended)).collect();
        if reads.iter().all(Option::is_none) {
            // Every buffer full: nothing to read.
            return;
        }
        let got = tokio::task::spawn_blocking(move || {
            reads
                .into_iter()
                .map(|r| r.and_then(Read::run))
                .collect::<Vec<_>>()
        })
        .await;
        if let Ok(got) = got {
            for (t, g) in tails.iter_mut().zip(got) {
                t.got(g);
            }
        }
    }

    /// The read [`Tail::fill`] makes (the file taken out meanwhile); `None` when `buf` is full.
    fn take_read(&mut self, ended: bool) -> Option<Read> {
        let room = CHUNK_MAX.saturating_sub(self.buf.len());
        if room == 0 {
            return None;
        }
        Some(Read {
            file: self.file.take(),
            path: if ended { &self.ready } else { &self.pending }.clone(),
            room,
        })
    }

    /// A [`Read`]'s result: the file kept open, what it read appended to `buf`.
    fn got(&mut self, got: Option<(std::fs::File, Vec<u8>)>) {
        if let Some((f, more)) = got {
            self.file = Some(f);
            if self.buf.is_empty() {
                self.buf = more;
            } else {
                self.buf.extend_from_slice(&more);
            }
        }
    }
}

/// One blocking read of a [`Tail`]: its file (opened at `path` when it is not yet), at most
/// `room` bytes.
struct Read {
    file: Option<std::fs::File>,
    path: std::path::PathBuf,
    room: usize,
}

impl Read {
    /// To the end of the file or `room` bytes; on an error, what was read before it. `None`
    /// when the file cannot be opened (the tail's file was not open: it stays so).
    fn run(self) -> Option<(std::fs::File, Vec<u8>)> {
        let mut f = match self.file {
            Some(f) => f,
            None => std::fs::File::open(&self.path).ok()?,
        };
        let mut more = Vec::new();
        let _ = std::io::Read::read_to_end(
            &mut std::io::Read::take(&mut f, self.room as u64),
            &mut more,
        );
        Some((f, more))
    }
}

/// A running job's log shipping.
pub struct Shipper {
    finish: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Option<WholeLog>>,
}

impl Shipper {
    /// The job ended (its directory is in `ready/`): ship the rest of its logs and announce
    /// their end; returns once done (or given up after 30 s without the database). A short
    /// run's log, not shipped, is returned whole: it goes with the job's end record (one
    /// statement for both, [`WholeLog`]).
    pub async fn finish(self) -> Option<WholeLog> {
        let _ = self.finish.send(true);
        self.task.await.ok().flatten()
    }
}

/// The whole log of a run that ended before any of it was shipped, each stream in one chunk
/// (at offset 0): recorded with the job's end, in its statement (`records::jobs::record_end`),
/// so a short job costs the database one write for its log and its end. The same rows as
/// shipping: the previous run's chunks go, then each stream's one chunk, all at the record's
/// commit and only if the end is recorded (a fenced run's log is not written). One notice
/// announces them, `start <run>`: a follower reads the run's log from its start on it and
/// finds all of it (the chunks are committed with the notice), then the end's notification
/// (`ended`, same commit, after it) ends the follow — the shipper's chunk and `end` notices
/// would only wake it to read nothing more.
pub struct WholeLog {
    /// The run's token (`<agent>-<nanoseconds>`).
    pub run: String,
    /// Each non-empty stream's bytes.
    pub chunks: Vec<(LogStream, Vec<u8>)>,
}

impl WholeLog {
    /// Its notification on the logs' channel, for job `project/id`: its run's start.
    pub fn notice(&self, project: &str, id: &str) -> String {
        start_notice(project, id, &self.run)
    }
}

/// The notice of run `run` of job `project/id` starting (its log starts again).
fn start_notice(project: &str, id: &str, run: &str) -> String {
    format!("{} start {run}", key_of(project, id))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A log read as it grows: at most a chunk at a time, each read going on from the last, a
    /// file that does not exist yet read once it does.
    #[tokio::test]
    async fn a_tail_reads_a_growing_log_a_chunk_at_a_time() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let (pending, ready) = (dir.path().join("out.log"), dir.path().join("ready.log"));
        let mut tail = Tail::new(LogStream::Out, pending.clone(), ready);
        tail.fill(false).await;
        assert!(tail.buf.is_empty() && tail.file.is_none(), "no file yet");

        let first: Vec<u8> = (0..CHUNK_MAX + 10).map(|i| (i % 251) as u8).collect();
        std::fs::write(&pending, &first).expect("the log written");
        tail.fill(false).await;
        assert_eq!(tail.buf, first[..CHUNK_MAX]);
        tail.fill(false).await;
        assert_eq!(
            tail.buf.len(),
            CHUNK_MAX,
            "a full buffer reads nothing more"
        );

        tail.buf.clear();
        tail.fill(false).await;
        assert_eq!(tail.buf, first[CHUNK_MAX..]);
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&pending)
            .expect("the log opened");
        std::io::Write::write_all(&mut f, b"more").expect("the log grew");
        tail.fill(false).await;
        assert_eq!(tail.buf, [&first[CHUNK_MAX..], &b"more"[..]].concat());
    }

    /// A job that ended: every tail read in one go, from `ready/`, each whole up to
    /// [`CHUNK_MAX`]; a file that does not exist reads nothing.
    #[tokio::test]
    async fn an_ended_jobs_tails_are_read_together() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let p = |n: &str| dir.path().join(n);
        std::fs::write(p("ready-out.log"), b"out\n").expect("a log written");
        let big: Vec<u8> = (0..CHUNK_MAX + 3).map(|i| (i % 7) as u8).collect();
        std::fs::write(p("ready-err.log"), &big).expect("a log written");
        let mut tails = [
            Tail::new(LogStream::Out, p("out.log"), p("ready-out.log")),
            Tail::new(LogStream::Stderr, p("err.log"), p("ready-err.log")),
            Tail::new(LogStream::Out, p("none.log"), p("ready-none.log")),
        ];
        Tail::fill_all(&mut tails, true).await;
        assert_eq!(tails[0].buf, b"out\n");
        assert_eq!(tails[1].buf, big[..CHUNK_MAX]);
        assert!(tails[2].buf.is_empty() && tails[2].file.is_none());
        // The files stay open: the rest is read where the first read stopped.
        tails[1].buf.clear();
        tails[1].fill(true).await;
        assert_eq!(tails[1].buf, big[CHUNK_MAX..]);
    }

    /// A whole log is announced by its run's start alone: a follower woken by it reads every
    /// chunk (committed with it), and the job's end notification ends the follow.
    #[test]
    fn a_whole_log_is_announced_once() {
        let whole = WholeLog {
            run: "b1-5".into(),
            chunks: vec![
                (LogStream::Out, b"out".to_vec()),
                (LogStream::Stderr, b"err".to_vec()),
            ],
        };
        assert_eq!(whole.notice("p", "abc"), "p/abc start b1-5");
        assert_eq!(
            super::super::parse_event(CHANNEL, &whole.notice("p", "abc")),
            Some(LogEvent::Start("p/abc".into(), "b1-5".into()))
        );
    }
}
