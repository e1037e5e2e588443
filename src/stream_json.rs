//! Streaming a BuildInfo as JSON with its log fields read from disk chunk by chunk, so that a
//! job that printed a gigabyte never has its log whole in the daemon's memory.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::jobs::BuildInfo;
use crate::streams::{blocking_stream, ByteStream};

/// [`write_with`] as a byte stream produced on a blocking thread as it is read: `prefix`, the
/// BuildInfo `info` with the logs at `stdouterr` and `stderr`, `suffix`. What `POST /jobs` answers
/// and what `GET /job` (JSON) shows of a job on this agent's disk.
pub(crate) fn stream_with(
    prefix: String,
    info: BuildInfo,
    stdouterr: PathBuf,
    stderr: PathBuf,
    suffix: &'static str,
) -> ByteStream {
    blocking_stream(
        move |w| write_with(w, &prefix, &info, &stdouterr, &stderr, suffix),
        |e| tracing::debug!(error = %e, "streaming a BuildInfo stopped"),
    )
}

/// JSON-escape `bytes` (a chunk of a log), keeping an incomplete UTF-8 sequence at the end in
/// `carry` for the next chunk; invalid bytes become U+FFFD.
pub(crate) fn escape_chunk(carry: &mut Vec<u8>, bytes: &[u8], last: bool) -> String {
    let mut data = std::mem::take(carry);
    data.extend_from_slice(bytes);
    let mut text = String::with_capacity(data.len());
    let mut rest = &data[..];
    loop {
        match std::str::from_utf8(rest) {
            Ok(s) => {
                text.push_str(s);
                break;
            }
            Err(e) => {
                let (good, bad) = rest.split_at(e.valid_up_to());
                text.push_str(std::str::from_utf8(good).unwrap_or_default());
                match e.error_len() {
                    Some(n) => {
                        text.push('\u{fffd}');
                        rest = &bad[n..];
                    }
                    None if !last => {
                        carry.extend_from_slice(bad);
                        break;
                    }
                    None => {
                        text.push('\u{fffd}');
                        break;
                    }
                }
            }
        }
    }
    let quoted = serde_json::to_string(&text).unwrap_or_default();
    quoted[1..quoted.len() - 1].to_string()
}

/// Write the BuildInfo as JSON (between `prefix` and `suffix`) to `w`, `ContainerStdouterr` and
/// `ContainerStderr` read from the given files chunk by chunk (each omitted when its file is
/// empty or missing, as mistry does). Blocking: run it off the async runtime (see
/// `server::body::blocking_body`).
pub(crate) fn write_with(
    w: &mut dyn Write,
    prefix: &str,
    info: &BuildInfo,
    stdouterr: &Path,
    stderr: &Path,
    suffix: &str,
) -> std::io::Result<()> {
    let mut fields = match serde_json::to_value(BuildInfo {
        container_stdouterr: String::new(),
        container_stderr: String::new(),
        ..info.clone()
    }) {
        Ok(serde_json::Value::Object(m)) => m,
        _ => serde_json::Map::new(),
    };
    write!(w, "{prefix}{{")?;
    let mut buf = vec![0u8; 64 * 1024];
    for (name, path) in [
        ("ContainerStdouterr", stdouterr),
        ("ContainerStderr", stderr),
    ] {
        fields.remove(name);
        let Ok(mut file) = std::fs::File::open(path) else {
            continue;
        };
        if !file.metadata().is_ok_and(|m| m.len() > 0) {
            continue;
        }
        write!(w, "\"{name}\":\"")?;
        let mut carry = Vec::new();
        loop {
            let n = file.read(&mut buf).unwrap_or(0);
            if n == 0 {
                break;
            }
            w.write_all(escape_chunk(&mut carry, &buf[..n], false).as_bytes())?;
        }
        w.write_all(escape_chunk(&mut carry, &[], true).as_bytes())?;
        w.write_all(b"\",")?;
    }
    let rest = serde_json::to_string(&fields).unwrap_or_else(|_| "{}".into());
    write!(w, "{}{suffix}", &rest[1..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_split_inside_utf8_and_escapes() {
        let text = "é\"\n\u{1F600}";
        let bytes = text.as_bytes();
        let mut carry = Vec::new();
        let mut out = String::new();
        for b in bytes {
            out.push_str(&escape_chunk(&mut carry, std::slice::from_ref(b), false));
        }
        out.push_str(&escape_chunk(&mut carry, &[], true));
        assert_eq!(out, "é\\\"\\n\u{1F600}");
        let mut carry = Vec::new();
        assert_eq!(escape_chunk(&mut carry, b"a\xffb", false), "a\u{fffd}b");
        assert_eq!(escape_chunk(&mut carry, b"\xe2\x82", true), "\u{fffd}");
    }
}
