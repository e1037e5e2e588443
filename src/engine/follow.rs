//! Following a job in flight: its log, line by line, until it is ready. The job's state comes
//! from the engine's memory (its watch channel), never from disk; the log file is read as it
//! grows (the job writes it directly, so it is looked at again every [`LOG_POLL`] while
//! nothing changes).

use std::collections::VecDeque;
use std::time::Duration;

use futures_util::stream::{self, Stream};
use tokio::io::AsyncReadExt;
use tokio::sync::watch;

use super::layout::{JobDir, Stage};
use super::state::Phase;

/// How often a running job's log is read for new lines (a state change wakes the stream at
/// once).
const LOG_POLL: Duration = Duration::from_millis(100);

struct Tail {
    state: watch::Receiver<Phase>,
    file: Option<tokio::fs::File>,
    /// The job's directory in `pending/`.
    dir: JobDir,
    partial: Vec<u8>,
    lines: VecDeque<String>,
    done: bool,
}

impl Tail {
    /// Move the complete lines of `partial` to `lines`.
    fn split_lines(&mut self) {
        while let Some(pos) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=pos).collect();
            self.lines
                .push_back(String::from_utf8_lossy(&line[..line.len() - 1]).into_owned());
        }
    }

    /// The job ended: read what was written since the last read (from `ready/` if the log was
    /// never opened), and end with the last, unterminated line.
    async fn finish(&mut self) {
        if self.file.is_none() {
            let ready = self.dir.in_stage(Stage::Ready).out_log();
            self.file = tokio::fs::File::open(ready).await.ok();
        }
        if let Some(f) = self.file.as_mut() {
            let mut rest = Vec::new();
            let _ = f.read_to_end(&mut rest).await;
            self.partial.extend_from_slice(&rest);
        }
        self.split_lines();
        if !self.partial.is_empty() {
            let rest = std::mem::take(&mut self.partial);
            self.lines
                .push_back(String::from_utf8_lossy(&rest).into_owned());
        }
        self.done = true;
    }
}

/// The lines of the log of the job in `dir` (pending), while `state` says it is in flight.
pub(super) fn lines(state: watch::Receiver<Phase>, dir: JobDir) -> impl Stream<Item = String> {
    let t = Tail {
        state,
        file: None,
        dir,
        partial: Vec::new(),
        lines: VecDeque::new(),
        done: false,
    };
    stream::unfold(t, |mut t| async move {
        loop {
            if let Some(line) = t.lines.pop_front() {
                return Some((line, t));
            }
            if t.done {
                return None;
            }
            if t.file.is_none() {
                t.file = tokio::fs::File::open(t.dir.out_log()).await.ok();
            }
            let mut buf = vec![0u8; 16 * 1024];
            let n = match t.file.as_mut() {
                Some(f) => f.read(&mut buf).await.unwrap_or(0),
                None => 0,
            };
            if n > 0 {
                t.partial.extend_from_slice(&buf[..n]);
                t.split_lines();
                continue;
            }
            let ended = matches!(*t.state.borrow(), Phase::Ready(_));
            if !ended {
                tokio::select! {
                    r = t.state.changed() => {
                        if r.is_ok() {
                            continue;
                        }
                        // The engine dropped the job without a result: stop following it.
                    }
                    _ = tokio::time::sleep(LOG_POLL) => continue,
                }
            }
            t.finish().await;
        }
    })
}
