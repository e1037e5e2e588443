//! A job's log files, bounded (`limits.log`): what the job and its image build write past the
//! limit is dropped, after one line saying so (`[log truncated at 64 MiB]`). The job goes on
//! (its output is still read to the end, so it never blocks on a full pipe), as Docker's log
//! drivers let containers go on. The daemon's own lines (`mistry: ...`) are written to the file
//! directly and are not counted.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsFd;

/// A log file that takes at most `cap` bytes of output.
pub(crate) struct CappedLog {
    file: File,
    cap: Option<u64>,
    written: u64,
    cut: bool,
    /// Whether the last byte written ended a line.
    at_line_start: bool,
}

/// `64 MiB`, `100 KiB`, `1000 bytes`: a limit as the truncation line shows it.
fn size_text(n: u64) -> String {
    match n {
        n if n >= 1 << 30 && n % (1 << 30) == 0 => format!("{} GiB", n >> 30),
        n if n >= 1 << 20 && n % (1 << 20) == 0 => format!("{} MiB", n >> 20),
        n if n >= 1 << 10 && n % (1 << 10) == 0 => format!("{} KiB", n >> 10),
        n => format!("{n} bytes"),
    }
}

impl CappedLog {
    /// `file` (opened for appending, possibly holding something already, which counts), taking
    /// at most `cap` bytes in all (`None`: unbounded).
    pub(crate) fn new(file: File, cap: Option<u64>) -> CappedLog {
        let written = file.metadata().map_or(0, |m| m.len());
        CappedLog {
            file,
            cap,
            written,
            cut: false,
            at_line_start: true,
        }
    }

    /// The line that ends a log cut at `cap` bytes.
    pub(crate) fn marker(cap: u64) -> String {
        format!("[log truncated at {}]", size_text(cap))
    }
}

impl Write for CappedLog {
    /// Always takes all of `buf` (what is past the limit is dropped).
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.cut || buf.is_empty() {
            return Ok(buf.len());
        }
        let room = self
            .cap
            .map_or(u64::MAX, |c| c.saturating_sub(self.written));
        let take = buf.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        if take > 0 {
            self.file.write_all(&buf[..take])?;
            self.written += take as u64;
            self.at_line_start = buf[take - 1] == b'\n';
        }
        if let (Some(cap), true) = (self.cap, take < buf.len()) {
            self.cut = true;
            let newline = if self.at_line_start { "" } else { "\n" };
            writeln!(self.file, "{newline}{}", Self::marker(cap))?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// Copy a job's stdout and stderr (pipes) into `out` (both, as they come) and stderr alone into
/// `err`, until both end. Write errors do not stop the reading: the job must never block on a
/// full pipe.
pub(crate) fn pump(mut streams: [Option<File>; 2], out: &mut CappedLog, err: &mut CappedLog) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let open: Vec<usize> = (0..2).filter(|&i| streams[i].is_some()).collect();
        if open.is_empty() {
            return;
        }
        let ready: Vec<usize> = {
            let mut fds: Vec<PollFd> = open
                .iter()
                .filter_map(|&i| streams[i].as_ref())
                .map(|f| PollFd::new(f.as_fd(), PollFlags::POLLIN))
                .collect();
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => return,
            }
            fds.iter()
                .zip(&open)
                .filter(|(p, _)| p.revents().is_some_and(|r| !r.is_empty()))
                .map(|(_, &i)| i)
                .collect()
        };
        for i in ready {
            let Some(f) = streams[i].as_mut() else {
                continue;
            };
            match f.read(&mut buf) {
                Ok(0) => streams[i] = None,
                Ok(n) => {
                    let _ = out.write_all(&buf[..n]);
                    if i == 1 {
                        let _ = err.write_all(&buf[..n]);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => streams[i] = None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_capped_log_keeps_the_first_bytes_and_says_where_it_was_cut() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.log");
        std::fs::write(&path, "0123").unwrap();
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        let mut log = CappedLog::new(file, Some(10));
        log.write_all(b"abc").unwrap();
        log.write_all(b"defgh").unwrap();
        log.write_all(b"more").unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "0123abcdef\n[log truncated at 10 bytes]\n"
        );
        assert_eq!(CappedLog::marker(64 << 20), "[log truncated at 64 MiB]");
        assert_eq!(CappedLog::marker(100 << 10), "[log truncated at 100 KiB]");
        assert_eq!(CappedLog::marker(2 << 30), "[log truncated at 2 GiB]");

        // Through pipes: both streams in out.log, stderr alone in its own, both bounded, and
        // every byte read (the writers never block).
        let (out_r, out_w) = nix::unistd::pipe().unwrap();
        let (err_r, err_w) = nix::unistd::pipe().unwrap();
        let writer = std::thread::spawn(move || {
            let (mut o, mut e) = (File::from(out_w), File::from(err_w));
            for _ in 0..1000 {
                o.write_all(&[b'o'; 1000]).unwrap();
                e.write_all(&[b'e'; 1000]).unwrap();
            }
        });
        let new = |name: &str| {
            let f = File::create(dir.path().join(name)).unwrap();
            CappedLog::new(f, Some(100 << 10))
        };
        let (mut out, mut err) = (new("both"), new("err"));
        pump([Some(out_r.into()), Some(err_r.into())], &mut out, &mut err);
        writer.join().unwrap();
        for name in ["both", "err"] {
            let text = std::fs::read_to_string(dir.path().join(name)).unwrap();
            assert_eq!(
                text.len(),
                (100 << 10) + "\n[log truncated at 100 KiB]\n".len()
            );
            assert!(text.ends_with("\n[log truncated at 100 KiB]\n"), "{name}");
        }
        let err_text = std::fs::read_to_string(dir.path().join("err")).unwrap();
        assert!(err_text[..100 << 10].bytes().all(|b| b == b'e'));
    }
}
