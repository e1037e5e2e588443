//! Streaming a BuildInfo as JSON with its log fields read from disk chunk by chunk, so that a
//! job that printed a gigabyte never has its log whole in the daemon's memory.

use std::io::Read;
use std::path::PathBuf;

use axum::body::{Body, Bytes};
use futures_util::stream;

use crate::jobs::BuildInfo;

/// JSON-escape `bytes` (a chunk of a log), keeping an incomplete UTF-8 sequence at the end in
/// `carry` for the next chunk; invalid bytes become U+FFFD.
pub fn escape_chunk(carry: &mut Vec<u8>, bytes: &[u8], last: bool) -> String {
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

enum Part {
    Text(String),
    File(PathBuf),
}

/// The BuildInfo as a streamed JSON body, `ContainerStdouterr` and `ContainerStderr` read from
/// the given files (each omitted when its file is empty or missing, as mistry does).
pub fn body_with(
    prefix: &str,
    info: &BuildInfo,
    stdouterr: PathBuf,
    stderr: PathBuf,
    suffix: &str,
) -> Body {
    let mut fields = match serde_json::to_value(BuildInfo {
        container_stdouterr: String::new(),
        container_stderr: String::new(),
        ..info.clone()
    }) {
        Ok(serde_json::Value::Object(m)) => m,
        _ => serde_json::Map::new(),
    };
    let mut parts = vec![Part::Text(format!("{prefix}{{"))];
    for (name, path) in [
        ("ContainerStdouterr", stdouterr),
        ("ContainerStderr", stderr),
    ] {
        fields.remove(name);
        if std::fs::metadata(&path)
            .map(|m| m.len() > 0)
            .unwrap_or(false)
        {
            parts.push(Part::Text(format!("\"{name}\":\"")));
            parts.push(Part::File(path));
            parts.push(Part::Text("\",".into()));
        }
    }
    let rest = serde_json::to_string(&fields).unwrap_or_else(|_| "{}".into());
    parts.push(Part::Text(format!("{}{suffix}", &rest[1..])));

    struct State {
        parts: std::vec::IntoIter<Part>,
        file: Option<std::fs::File>,
        carry: Vec<u8>,
    }
    let state = State {
        parts: parts.into_iter(),
        file: None,
        carry: Vec::new(),
    };
    let s = stream::unfold(state, |mut st| async move {
        loop {
            if let Some(f) = st.file.as_mut() {
                let mut buf = vec![0u8; 64 * 1024];
                // Reading a local file in small chunks; the blocking is brief.
                let n = tokio::task::block_in_place(|| f.read(&mut buf)).unwrap_or(0);
                if n > 0 {
                    let out = escape_chunk(&mut st.carry, &buf[..n], false);
                    return Some((Ok::<_, std::io::Error>(Bytes::from(out)), st));
                }
                st.file = None;
                let tail = escape_chunk(&mut st.carry, &[], true);
                if !tail.is_empty() {
                    return Some((Ok(Bytes::from(tail)), st));
                }
                continue;
            }
            match st.parts.next()? {
                Part::Text(t) => return Some((Ok(Bytes::from(t)), st)),
                Part::File(p) => st.file = std::fs::File::open(p).ok(),
            }
        }
    });
    Body::from_stream(s)
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
