//! Shipping (see the parent's doc): a job's `out.log` and `stderr.log` read as they grow and
//! inserted in chunks, each announced.

use super::*;

impl Logs {
    // ------------------------------------------------------------------ shipping

    /// Ship the logs of the job whose directory is `dir` (in `pending/` while it runs; its
    /// `ready/` twin is read at the end when a log was not opened before) until
    /// [`Shipper::finish`].
    pub fn ship(self: &Arc<Self>, dir: &JobDir) -> Shipper {
        let (tx, rx) = watch::channel(false);
        let me = Arc::clone(self);
        let dir = dir.clone();
        let task = tokio::spawn(async move { me.run_shipper(dir, rx).await });
        Shipper { finish: tx, task }
    }

    async fn run_shipper(self: Arc<Self>, dir: JobDir, mut finish: watch::Receiver<bool>) {
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
        // The run starts at once (off the job's critical path: a job that ends within
        // SHIP_EVERY then only ships its chunks).
        let mut first = true;
        loop {
            if !finishing && !first {
                tokio::select! {
                    _ = tokio::time::sleep(SHIP_EVERY) => {}
                    _ = finish.wait_for(|f| *f) => finishing = true,
                }
            }
            first = false;
            if finishing && deadline.is_none() {
                deadline = Some(tokio::time::Instant::now() + FINAL_DEADLINE);
            }
            let shipped = async {
                if !started {
                    self.start_run(&project, &id, &run).await?;
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
                    return;
                }
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!(%project, %id, agent = %self.me(), "the job's record is no longer this agent's: its log is not shipped further");
                    return;
                }
                Err(e) => {
                    if !warned {
                        tracing::warn!(%project, %id, error = %e, "shipping the job's log to the database failed; retrying");
                        warned = true;
                    }
                    if let Some(d) = deadline {
                        if tokio::time::Instant::now() >= d {
                            tracing::warn!(%project, %id, error = %e, "the end of the job's log was not shipped: the database does not answer (it stays in the agent's out.log)");
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
        }
    }

    /// A run starts: the previous run's chunks go, and followers are told.
    async fn start_run(&self, project: &str, id: &str, run: &str) -> Result<(), ClusterError> {
        let (client, err) = self.client().await?;
        let payload = format!("{} start {run}", key_of(project, id));
        rows::start_run(&client, project, id, &payload)
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
    file: Option<tokio::fs::File>,
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
    /// `ready/` once the job ended).
    async fn fill(&mut self, ended: bool) {
        if self.file.is_none() {
            let path = if ended { &self.ready } else { &self.pending };
            self.file = tokio::fs::File::open(path).await.ok();
        }
        let Some(f) = self.file.as_mut() else { return };
        while self.buf.len() < CHUNK_MAX {
            let mut more = vec![0u8; CHUNK_MAX - self.buf.len()];
            match f.read(&mut more).await {
                Ok(0) | Err(_) => return,
                Ok(n) => self.buf.extend_from_slice(&more[..n]),
            }
        }
    }
}

/// A running job's log shipping.
pub struct Shipper {
    finish: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Shipper {
    /// The job ended (its directory is in `ready/`): ship the rest of its logs and announce
    /// their end; returns once done (or given up after 30 s without the database).
    pub async fn finish(self) {
        let _ = self.finish.send(true);
        let _ = self.task.await;
    }
}
