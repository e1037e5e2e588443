//! libpq's `sslmode` and `sslrootcert`, taken out of a URL or a key=value string before it
//! reaches tokio-postgres (see the parent's doc).

use std::path::PathBuf;

use super::{ParamError, RootCert, SslMode, TlsSettings};

/// Take libpq's `sslmode` and `sslrootcert` out of `url` (a URL or a key=value string): the
/// string left for tokio-postgres, and the settings. Errors are one line, without the URL.
pub fn split(url: &str) -> Result<(String, TlsSettings), ParamError> {
    let (rest, params) = if let Some(scheme_end) = url_prefix_len(url) {
        split_url(url, scheme_end)?
    } else {
        split_key_values(url)?
    };
    let mut mode = None;
    let mut root = None;
    for (key, value) in params {
        match key.as_str() {
            "sslmode" => mode = Some(SslMode::parse(&value)?),
            _ => {
                root = match value.as_str() {
                    "" => None,
                    "system" => Some(RootCert::System),
                    path => Some(RootCert::File(PathBuf::from(path))),
                }
            }
        }
    }
    let mode = match (mode, &root) {
        (None, Some(RootCert::System)) => SslMode::VerifyFull,
        (None, _) => SslMode::Prefer,
        (Some(m), Some(RootCert::System)) if m != SslMode::VerifyFull => {
            return Err(ParamError::WeakMode(m.name()))
        }
        (Some(m), _) => m,
    };
    Ok((rest, TlsSettings { mode, root }))
}

/// The parameters [`split`] takes out.
fn ours(key: &str) -> bool {
    key == "sslmode" || key == "sslrootcert"
}

/// `postgres://` or `postgresql://`: its length.
fn url_prefix_len(url: &str) -> Option<usize> {
    ["postgres://", "postgresql://"]
        .iter()
        .find(|p| url.starts_with(*p))
        .map(|p| p.len())
}

/// Where a URL's query starts (its `?`), as tokio-postgres reads it: the credentials end at the
/// first `@`, the host and path at the first `?` after them.
fn query_start(url: &str, prefix: usize) -> Option<usize> {
    let after = &url[prefix..];
    let from = prefix + after.find('@').map_or(0, |at| at + 1);
    url[from..].find('?').map(|q| from + q)
}

fn split_url(url: &str, prefix: usize) -> Result<(String, Vec<(String, String)>), ParamError> {
    let Some(q) = query_start(url, prefix) else {
        return Ok((url.to_string(), Vec::new()));
    };
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8()
            .map(std::borrow::Cow::into_owned)
            .map_err(|source| ParamError::Encoding {
                text: s.to_string(),
                source,
            })
    };
    let mut kept = Vec::new();
    let mut params = Vec::new();
    for kv in url[q + 1..].split('&') {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        let key = decode(k)?;
        if ours(&key) {
            params.push((key, decode(v)?));
        } else {
            kept.push(kv);
        }
    }
    let mut rest = url[..q].to_string();
    if !kept.is_empty() {
        rest.push('?');
        rest.push_str(&kept.join("&"));
    }
    Ok((rest, params))
}

/// A key=value string's parameters, as tokio-postgres (and libpq) read them: the span of each
/// (from its key to the end of its value), its key and its unescaped value.
fn key_values(s: &str) -> Result<Vec<(std::ops::Range<usize>, String, String)>, ParamError> {
    let mut out = Vec::new();
    let mut it = s.char_indices().peekable();
    loop {
        while it.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let Some(&(start, _)) = it.peek() else {
            return Ok(out);
        };
        let mut key = String::new();
        while let Some((_, c)) = it.next_if(|(_, c)| !c.is_whitespace() && *c != '=') {
            key.push(c);
        }
        while it.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        if it.next_if(|(_, c)| *c == '=').is_none() {
            return Err(ParamError::NoEquals(key));
        }
        while it.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        let quoted = it.next_if(|(_, c)| *c == '\'').is_some();
        let mut closed = false;
        while let Some(&(_, c)) = it.peek() {
            if (quoted && c == '\'') || (!quoted && c.is_whitespace()) {
                break;
            }
            it.next();
            if c == '\\' {
                if let Some((_, escaped)) = it.next() {
                    value.push(escaped);
                }
            } else {
                value.push(c);
            }
        }
        if quoted {
            closed = it.next_if(|(_, c)| *c == '\'').is_some();
        }
        if quoted && !closed {
            return Err(ParamError::Unclosed(key));
        }
        let end = it.peek().map_or(s.len(), |&(i, _)| i);
        out.push((start..end, key, value));
    }
}

fn split_key_values(s: &str) -> Result<(String, Vec<(String, String)>), ParamError> {
    let mut rest = String::new();
    let mut params = Vec::new();
    for (span, key, value) in key_values(s)? {
        if ours(&key) {
            params.push((key, value));
        } else {
            if !rest.is_empty() {
                rest.push(' ');
            }
            rest.push_str(&s[span]);
        }
    }
    Ok((rest, params))
}

/// A key=value string with the value of every `password` replaced by `***` (`None`: it does
/// not parse as key=value).
pub(crate) fn redact_key_values(s: &str) -> Option<String> {
    let params = key_values(s).ok()?;
    let mut out = String::new();
    for (span, key, _) in params {
        if !out.is_empty() {
            out.push(' ');
        }
        if key == "password" {
            out.push_str("password=***");
        } else {
            out.push_str(&s[span]);
        }
    }
    Some(out)
}
