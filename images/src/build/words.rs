//! The Dockerfile's text and its words: reading it (size-capped, inside the context) and
//! variable substitution under one budget per build.

use std::io::Read;
use std::path::Path;

use super::{step_err, BuildError, BuildOptions};
use crate::dockerfile::{self, Step};
use crate::lex::Lexer;
use crate::oci;

/// The most bytes variable substitution may produce over a whole build (every expanded word
/// of every instruction together): 16 MiB. Each word is capped at
/// [`crate::lex::MAX_EXPANDED`] as it grows; this bounds what many of them can pile up.
pub const MAX_EXPANDED_TOTAL: usize = 16 << 20;

pub(super) fn total_message() -> String {
    format!(
        "variable substitution produced more than {} MiB in this Dockerfile",
        MAX_EXPANDED_TOTAL >> 20
    )
}

/// Bytes produced by variable substitution so far in one build.
pub(super) type Budget = std::rc::Rc<std::cell::Cell<usize>>;

/// Quote removal and substitution of one word of `step`, counted against `budget`.
pub(super) fn expand(
    lexer: &Lexer,
    word: &str,
    vars: &[(String, String)],
    step: &Step,
    budget: &Budget,
) -> Result<String, BuildError> {
    let out = lexer
        .process_word(word, vars)
        .map_err(|e| step_err(step, e.0))?;
    let total = budget.get().saturating_add(out.len());
    budget.set(total);
    if total > MAX_EXPANDED_TOTAL {
        return Err(step_err(step, total_message()));
    }
    Ok(out)
}

/// The body of a COPY/ADD heredoc: substituted as BuildKit does when its delimiter is unquoted
/// (quotes kept), as written otherwise; counted against `budget` like any word.
pub(super) fn expand_heredoc(
    lexer: &Lexer,
    doc: &dockerfile::Heredoc,
    vars: &[(String, String)],
    step: &Step,
    budget: &Budget,
) -> Result<String, BuildError> {
    let body = doc.body();
    if !doc.expand {
        return Ok(body);
    }
    let out = lexer
        .expand_heredoc(&body, vars)
        .map_err(|e| step_err(step, format!("heredoc <<{}: {}", doc.name, e.0)))?;
    let total = budget.get().saturating_add(out.len());
    budget.set(total);
    if total > MAX_EXPANDED_TOTAL {
        return Err(step_err(step, total_message()));
    }
    Ok(out)
}

/// Read a Dockerfile, refusing one larger than [`dockerfile::MAX_DOCKERFILE`] without reading
/// more than that. One inside the context (the default `<context>/Dockerfile`) is resolved
/// inside it: a symlink there cannot make the build read a host file.
pub(super) fn read_dockerfile(context: &Path, path: &Path) -> Result<String, BuildError> {
    let read_err = |source| BuildError::Read {
        path: path.display().to_string(),
        source,
    };
    let file = match path.strip_prefix(context) {
        Ok(rel) => crate::inroot::Root::open(context)
            .and_then(|r| {
                r.open_in(
                    rel,
                    rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::NONBLOCK,
                )
            })
            .map(std::fs::File::from),
        Err(_) => std::fs::File::open(path),
    }
    .map_err(read_err)?;
    if !file.metadata().map_err(read_err)?.is_file() {
        return Err(read_err(std::io::Error::other("not a regular file")));
    }
    let mut text = String::new();
    file.take(dockerfile::MAX_DOCKERFILE as u64 + 1)
        .read_to_string(&mut text)
        .map_err(read_err)?;
    if text.len() > dockerfile::MAX_DOCKERFILE {
        return Err(BuildError::Dockerfile(dockerfile::ParseError {
            line: 1,
            message: format!(
                "the Dockerfile is larger than the limit of {} MiB",
                dockerfile::MAX_DOCKERFILE >> 20
            ),
        }));
    }
    Ok(text)
}

/// The global ARGs (before the first FROM) with BuildKit's automatic platform ARGs first,
/// and the bytes their substitution produced.
pub(super) fn global_args(
    df: &dockerfile::Dockerfile,
    opts: &BuildOptions,
    lexer: &Lexer,
) -> Result<(Vec<(String, String)>, usize), BuildError> {
    // BuildKit's automatic platform ARGs (the build and target platform are the host's).
    let host = oci::Platform::host();
    let mut global_args: Vec<(String, String)> = vec![
        ("BUILDPLATFORM".into(), host.to_string()),
        ("BUILDOS".into(), host.os.clone()),
        ("BUILDARCH".into(), host.arch.clone()),
        ("TARGETPLATFORM".into(), host.to_string()),
        ("TARGETOS".into(), host.os.clone()),
        ("TARGETARCH".into(), host.arch.clone()),
    ];
    let mut expanded_total = 0usize;
    for (i, (name, default)) in df.global_args.iter().enumerate() {
        let line = df.global_arg_lines.get(i).copied().unwrap_or(0);
        let value = match opts.build_args.iter().rev().find(|(k, _)| k == name) {
            Some((_, v)) => Some(v.clone()),
            None => match default {
                Some(d) => Some(
                    lexer
                        .process_word(d, &global_args)
                        .map_err(|e| e.0)
                        .and_then(|v| {
                            expanded_total += v.len();
                            if expanded_total > MAX_EXPANDED_TOTAL {
                                Err(total_message())
                            } else {
                                Ok(v)
                            }
                        })
                        .map_err(|message| BuildError::Step {
                            step: format!("ARG {name}"),
                            line,
                            message,
                        })?,
                ),
                None => None,
            },
        };
        if let Some(v) = value {
            global_args.push((name.clone(), v));
        }
    }
    Ok((global_args, expanded_total))
}
