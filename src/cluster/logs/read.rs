//! Reading (see the parent's doc): a job's record and logs from the database — `/job`'s
//! document, a log's tail, a live follower of a job in flight.

use super::*;

impl Logs {
    // ------------------------------------------------------------------ reading

    /// The record of job `project`/`id`; `None` when there is none (or the names are invalid).
    pub async fn record(&self, project: &str, id: &str) -> Result<Option<RemoteJob>, ClusterError> {
        if crate::jobs::check_name("project", project).is_err()
            || crate::jobs::check_name("job", id).is_err()
        {
            return Ok(None);
        }
        let (client, err) = self.client().await?;
        let Some(shown) = rows::shown(&client, project, id).await.map_err(err)? else {
            return Ok(None);
        };
        let info = shown
            .build_info
            .as_deref()
            .and_then(|t| serde_json::from_str::<BuildInfo>(t).ok())
            .unwrap_or_else(|| blank_info(project, id, &shown.request, shown.since));
        Ok(Some(RemoteJob {
            project: project.to_string(),
            id: id.to_string(),
            state: shown.state,
            agent: shown.agent,
            info,
        }))
    }

    /// The size of a job's log in the database.
    pub async fn size(&self, project: &str, id: &str, s: LogStream) -> Result<u64, ClusterError> {
        let (client, err) = self.client().await?;
        rows::size(&client, project, id, s.as_str())
            .await
            .map_err(err)
    }

    /// Up to [`PAGE_ROWS`] chunks of a log covering bytes from `from` on, in order: (offset,
    /// data, run).
    async fn page(
        &self,
        project: &str,
        id: &str,
        s: LogStream,
        from: u64,
    ) -> Result<Vec<(u64, Vec<u8>, String)>, ClusterError> {
        let (client, err) = self.client().await?;
        rows::page(
            &client,
            (project, id, s.as_str()),
            from,
            CHUNK_MAX,
            PAGE_ROWS,
        )
        .await
        .map_err(err)
    }

    /// Send the bytes `[from, to)` of a log (`span`; `to`: `None` for all there is) to `tx`,
    /// page by page; `Ok(false)` when the receiver went away.
    async fn send_range(
        &self,
        project: &str,
        id: &str,
        s: LogStream,
        (from, to): (u64, Option<u64>),
        mut each: impl FnMut(&[u8]) -> Option<Bytes>,
        tx: &mpsc::Sender<Result<Bytes, std::io::Error>>,
    ) -> Result<bool, ClusterError> {
        let mut pos = from;
        loop {
            if to.is_some_and(|t| pos >= t) {
                return Ok(true);
            }
            let page = self.page(project, id, s, pos).await?;
            if page.is_empty() {
                return Ok(true);
            }
            for (start, data, _) in page {
                let end = start + data.len() as u64;
                let end = to.map_or(end, |t| end.min(t));
                if end <= pos {
                    continue;
                }
                // A gap (never expected) is skipped.
                let skip = usize::try_from(pos.saturating_sub(start)).unwrap_or(0);
                let take = usize::try_from(end - start).unwrap_or(0);
                let piece = &data[skip.min(take)..take.min(data.len())];
                pos = end;
                if let Some(b) = each(piece) {
                    if tx.send(Ok(b)).await.is_err() {
                        return Ok(false);
                    }
                }
            }
        }
    }

    /// `GET /job/{p}/{id}` as JSON for a job that is not on this agent: `job` (its record) as
    /// `/index/` shows it, with the BuildInfo's logs streamed from the database.
    pub fn document(self: &Arc<Self>, job: RemoteJob) -> ByteStream {
        let prefix = crate::service::document_prefix(job.json());
        let (tx, mut rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(8);
        let me = Arc::clone(self);
        tokio::spawn(async move {
            if let Err(e) = me.write_job(&job, prefix, &tx).await {
                tracing::debug!(project = %job.project, id = %job.id, error = %e, "streaming a job's log from the database stopped");
                let _ = tx.send(Err(std::io::Error::other(e.to_string()))).await;
            }
        });
        Box::pin(stream::poll_fn(move |cx| rx.poll_recv(cx)))
    }

    async fn write_job(
        &self,
        job: &RemoteJob,
        prefix: String,
        tx: &mpsc::Sender<Result<Bytes, std::io::Error>>,
    ) -> Result<(), ClusterError> {
        let (project, id) = (job.project.as_str(), job.id.as_str());
        let mut fields = match serde_json::to_value(BuildInfo {
            container_stdouterr: String::new(),
            container_stderr: String::new(),
            ..job.info.clone()
        }) {
            Ok(serde_json::Value::Object(m)) => m,
            _ => serde_json::Map::new(),
        };
        let send = |s: String| async move { tx.send(Ok(s.into_bytes())).await.is_ok() };
        if !send(format!("{prefix}{{")).await {
            return Ok(());
        }
        for (name, s) in [
            ("ContainerStdouterr", LogStream::Out),
            ("ContainerStderr", LogStream::Stderr),
        ] {
            fields.remove(name);
            if self.size(project, id, s).await? == 0 {
                continue;
            }
            if !send(format!("\"{name}\":\"")).await {
                return Ok(());
            }
            let mut carry = Vec::new();
            let escape = |bytes: &[u8]| {
                let text = crate::stream_json::escape_chunk(&mut carry, bytes, false);
                (!text.is_empty()).then(|| text.into_bytes())
            };
            if !self
                .send_range(project, id, s, (0, None), escape, tx)
                .await?
            {
                return Ok(());
            }
            let last = crate::stream_json::escape_chunk(&mut carry, &[], true);
            if !send(format!("{last}\",")).await {
                return Ok(());
            }
        }
        let rest = serde_json::to_string(&fields).unwrap_or_else(|_| "{}".into());
        send(format!("{}}}", &rest[1..])).await;
        Ok(())
    }

    /// `GET /api/logtail/{p}/{id}[?bytes=N]` for a job that is not on this agent: its
    /// `out.log`'s size and its last `bytes` bytes (all of it without `bytes`); `None` when
    /// there is no record.
    pub async fn log_tail(
        self: &Arc<Self>,
        project: &str,
        id: &str,
        bytes: Option<u64>,
    ) -> Result<Option<(u64, ByteStream)>, ClusterError> {
        if self.record(project, id).await?.is_none() {
            return Ok(None);
        }
        let size = self.size(project, id, LogStream::Out).await?;
        let from = bytes.map_or(0, |n| size.saturating_sub(n));
        let (tx, mut rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(8);
        let me = Arc::clone(self);
        let (p, i) = (project.to_string(), id.to_string());
        tokio::spawn(async move {
            let each = |b: &[u8]| Some(b.to_vec());
            let sent = me
                .send_range(&p, &i, LogStream::Out, (from, Some(size)), each, &tx)
                .await;
            if let Err(e) = sent {
                tracing::debug!(project = %p, id = %i, error = %e, "streaming a log tail from the database stopped");
                let _ = tx.send(Err(std::io::Error::other(e.to_string()))).await;
            }
        });
        Ok(Some((
            size,
            Box::pin(stream::poll_fn(move |cx| rx.poll_recv(cx))),
        )))
    }

    /// The lines of the `out.log` of job `project`/`id` while it is queued or running on any
    /// agent, live, until the job ends; `Ok(None)` when it is not in flight (or unknown).
    pub async fn follow(
        self: &Arc<Self>,
        project: &str,
        id: &str,
    ) -> Result<Option<impl Stream<Item = String> + Send + 'static>, ClusterError> {
        // Subscribed before reading the record: an end announced meanwhile is not missed.
        let events = self.events.subscribe();
        match self.record(project, id).await? {
            Some(job) if job.state.in_flight() => {}
            _ => return Ok(None),
        }
        let f = Follow {
            logs: Arc::clone(self),
            project: project.to_string(),
            id: id.to_string(),
            key: key_of(project, id),
            events,
            run: None,
            pos: 0,
            partial: Vec::new(),
            lines: VecDeque::new(),
            ending: false,
            done: false,
        };
        Ok(Some(stream::unfold(f, |mut f| async move {
            f.next_line().await.map(|l| (l, f))
        })))
    }
}

/// A follower of a job's log (`/log` for a job on another agent).
struct Follow {
    logs: Arc<Logs>,
    project: String,
    id: String,
    key: String,
    events: broadcast::Receiver<LogEvent>,
    /// The run whose chunks are read (a new run restarts the log).
    run: Option<String>,
    /// The offset of the next byte to read.
    pos: u64,
    partial: Vec<u8>,
    lines: VecDeque<String>,
    ending: bool,
    done: bool,
}

impl Follow {
    fn split_lines(&mut self) {
        while let Some(at) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=at).collect();
            self.lines
                .push_back(String::from_utf8_lossy(&line[..line.len() - 1]).into_owned());
        }
    }

    fn restart(&mut self, run: Option<String>) {
        self.run = run;
        self.pos = 0;
        self.partial.clear();
    }

    /// Read the chunks from `pos` on; `Ok(true)` when some were.
    async fn read_more(&mut self) -> Result<bool, ClusterError> {
        let page = self
            .logs
            .page(&self.project, &self.id, LogStream::Out, self.pos)
            .await?;
        if page.is_empty() {
            return Ok(false);
        }
        for (start, data, run) in page {
            match &self.run {
                Some(r) if *r != run => {
                    // Another run replaced the one followed: its log starts again.
                    self.restart(Some(run));
                    return Ok(true);
                }
                Some(_) => {}
                None => self.run = Some(run),
            }
            let end = start + data.len() as u64;
            if end <= self.pos {
                continue;
            }
            let skip = usize::try_from(self.pos.saturating_sub(start)).unwrap_or(0);
            self.partial
                .extend_from_slice(&data[skip.min(data.len())..]);
            self.pos = end;
        }
        self.split_lines();
        Ok(true)
    }

    /// Whether the job is still queued or running (its record says).
    async fn in_flight(&self) -> bool {
        matches!(self.logs.record(&self.project, &self.id).await, Ok(Some(j)) if j.state.in_flight())
    }

    /// Wait for a notification about this job (or a reason to read it again).
    async fn wait(&mut self) {
        let woken = tokio::time::timeout(SAFETY_RECHECK, async {
            loop {
                match self.events.recv().await {
                    Ok(LogEvent::Chunk(k) | LogEvent::LogEnd(k)) if k == self.key => return None,
                    Ok(LogEvent::Start(k, run)) if k == self.key => return Some(Some(run)),
                    Ok(LogEvent::End(k)) if k == self.key => return Some(None),
                    Ok(LogEvent::Reconnected) | Err(broadcast::error::RecvError::Lagged(_)) => {
                        return Some(Some(String::new()))
                    }
                    Ok(_) => continue,
                    Err(broadcast::error::RecvError::Closed) => return Some(None),
                }
            }
        })
        .await;
        match woken {
            Ok(None) => {}
            // A run starts: unless it is the one followed, its log starts again.
            Ok(Some(Some(run))) if !run.is_empty() => {
                if self.run.as_deref() != Some(run.as_str()) {
                    self.restart(Some(run));
                }
            }
            Ok(Some(None)) => self.ending = true,
            // Missed notifications, or none for long: the record says whether it goes on.
            Ok(Some(Some(_))) | Err(_) => {
                if !self.in_flight().await {
                    self.ending = true;
                }
            }
        }
    }

    async fn next_line(&mut self) -> Option<String> {
        loop {
            if let Some(l) = self.lines.pop_front() {
                return Some(l);
            }
            if self.done {
                return None;
            }
            match self.read_more().await {
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) => {
                    tracing::debug!(project = %self.project, id = %self.id, error = %e, "following a log in the database stopped");
                    self.ending = true;
                }
            }
            if self.ending {
                if !self.partial.is_empty() {
                    let rest = std::mem::take(&mut self.partial);
                    self.lines
                        .push_back(String::from_utf8_lossy(&rest).into_owned());
                }
                self.done = true;
                continue;
            }
            self.wait().await;
        }
    }
}
