//! Helpers of the client's end-to-end tests (tests/cli.rs, tests/pipeline_cli.rs): the binary,
//! a fake mistry server, tarballs.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread::JoinHandle;

/// `$MISTRY_CLIENT_BIN` (when the tests run as another user, scripts/test.sh), else the
/// `mistry` cargo built.
pub(crate) fn client_bin() -> PathBuf {
    std::env::var_os("MISTRY_CLIENT_BIN")
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_mistry").into())
        .into()
}

/// The client binary, as a command.
pub(crate) fn mistry() -> Command {
    Command::new(client_bin())
}

pub(crate) fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// One request as the fake server saw it.
#[derive(Debug)]
pub(crate) struct Request {
    pub line: String,
    /// The Accept header.
    pub accept: String,
    pub body: String,
}

/// A fake mistry server: answers the i-th request with `answers[i]` (status, content type,
/// body), then stops; returns its port and the requests it saw.
pub(crate) fn fake_server(
    answers: Vec<(u16, &'static str, Vec<u8>)>,
) -> (u16, JoinHandle<Vec<Request>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let handle = std::thread::spawn(move || {
        let mut seen = Vec::new();
        for (status, ctype, body) in answers {
            let (mut stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            let (mut length, mut accept) = (0usize, String::new());
            loop {
                let mut h = String::new();
                reader.read_line(&mut h).unwrap();
                if h == "\r\n" || h.is_empty() {
                    break;
                }
                let lower = h.to_ascii_lowercase();
                if let Some(v) = lower.strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap();
                }
                if let Some(v) = lower.strip_prefix("accept:") {
                    accept = v.trim().to_string();
                }
            }
            let mut req_body = vec![0u8; length];
            reader.read_exact(&mut req_body).unwrap();
            seen.push(Request {
                line: line.trim_end().to_string(),
                accept,
                body: text(&req_body),
            });
            write!(
                stream,
                "HTTP/1.1 {status} X\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            )
            .unwrap();
            stream.write_all(&body).unwrap();
        }
        seen
    });
    (port, handle)
}

/// A tarball of `files` (name, content): mode 0640, mtime 1,000,000,000.
pub(crate) fn tar_of(files: &[(&str, &str)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, content) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(content.len() as u64);
        h.set_mode(0o640);
        h.set_mtime(1_000_000_000);
        b.append_data(&mut h, name, content.as_bytes()).unwrap();
    }
    b.into_inner().unwrap()
}

pub(crate) fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}
