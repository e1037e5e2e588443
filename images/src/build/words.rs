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
pub(crate) const MAX_EXPANDED_TOTAL: usize = 16 << 20;

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
/// (quotes kept, and `\` the escape character whatever the Dockerfile's `# escape=`), as
/// written otherwise; counted against `budget` like any word.
pub(super) fn expand_heredoc(
    doc: &dockerfile::Heredoc,
    vars: &[(String, String)],
    step: &Step,
    budget: &Budget,
) -> Result<String, BuildError> {
    let body = doc.body();
    if !doc.expand {
        return Ok(body);
    }
    let out = Lexer::default()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dockerfile::Heredoc;

    fn step() -> Step {
        dockerfile::parse("FROM scratch\nENV A=$B\n")
            .unwrap()
            .steps
            .remove(1)
    }

    fn vars(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn message(e: BuildError) -> String {
        match e {
            BuildError::Step { message, line, .. } => format!("line {line}: {message}"),
            other => format!("{other}"),
        }
    }

    #[test]
    fn words_count_against_the_build_budget() {
        let budget = Budget::default();
        let big = vars(&[("B", &"b".repeat(1 << 20))]);
        let lexer = Lexer::default();
        // 16 words of 1 MiB fit the 16 MiB budget exactly; the next byte does not.
        for _ in 0..16 {
            assert_eq!(
                expand(&lexer, "$B", &big, &step(), &budget).unwrap().len(),
                1 << 20
            );
        }
        assert_eq!(budget.get(), MAX_EXPANDED_TOTAL);
        assert_eq!(expand(&lexer, "", &big, &step(), &budget).unwrap(), "");
        let e = expand(&lexer, "x", &big, &step(), &budget).unwrap_err();
        assert_eq!(
            message(e),
            "line 2: variable substitution produced more than 16 MiB in this Dockerfile"
        );
        assert_eq!(budget.get(), MAX_EXPANDED_TOTAL + 1);
        let e = expand(&lexer, "${B", &[], &step(), &Budget::default()).unwrap_err();
        assert_eq!(message(e), "line 2: missing '}' in \"${B\"");
    }

    fn doc(content: &str, expand: bool) -> Heredoc {
        Heredoc {
            name: "EOF".into(),
            content: content.into(),
            expand,
            chomp: true,
        }
    }

    #[test]
    fn heredoc_bodies_are_expanded_unless_quoted_and_counted() {
        let v = vars(&[("B", "bee")]);
        let budget = Budget::default();
        let out = expand_heredoc(&doc("\t$B \\$B '$B'\n", true), &v, &step(), &budget).unwrap();
        assert_eq!(out, "bee $B 'bee'\n");
        assert_eq!(budget.get(), out.len());
        let out = expand_heredoc(&doc("\t$B\n", false), &v, &step(), &budget).unwrap();
        assert_eq!(out, "$B\n");
        assert_eq!(budget.get(), 13, "a quoted body is not counted");
        let e = expand_heredoc(&doc("${B", true), &v, &step(), &budget).unwrap_err();
        assert_eq!(message(e), "line 2: heredoc <<EOF: missing '}' in \"${B\"");
        let full = Budget::default();
        full.set(MAX_EXPANDED_TOTAL);
        assert_eq!(
            expand_heredoc(&doc("", true), &v, &step(), &full).unwrap(),
            ""
        );
        let e = expand_heredoc(&doc("x", true), &v, &step(), &full).unwrap_err();
        assert_eq!(
            message(e),
            "line 2: variable substitution produced more than 16 MiB in this Dockerfile"
        );
    }

    #[test]
    fn the_dockerfile_is_read_capped_and_inside_the_context() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = dir.path().join("ctx");
        std::fs::create_dir(&ctx).unwrap();
        let exact = "#".repeat(dockerfile::MAX_DOCKERFILE);
        std::fs::write(ctx.join("Dockerfile"), &exact).unwrap();
        assert_eq!(
            read_dockerfile(&ctx, &ctx.join("Dockerfile")).unwrap(),
            exact
        );
        std::fs::write(ctx.join("Dockerfile"), format!("{exact}#")).unwrap();
        let e = read_dockerfile(&ctx, &ctx.join("Dockerfile")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Dockerfile line 1: the Dockerfile is larger than the limit of 1 MiB"
        );
        // Outside the context: read as a host path.
        std::fs::write(dir.path().join("other"), "FROM scratch\n").unwrap();
        assert_eq!(
            read_dockerfile(&ctx, &dir.path().join("other")).unwrap(),
            "FROM scratch\n"
        );
        // Inside: a symlink cannot lead out of the context.
        std::os::unix::fs::symlink("../other", ctx.join("link")).unwrap();
        let e = read_dockerfile(&ctx, &ctx.join("link")).unwrap_err();
        assert!(matches!(e, BuildError::Read { .. }), "{e}");
        std::fs::create_dir(ctx.join("dir")).unwrap();
        let e = read_dockerfile(&ctx, &ctx.join("dir")).unwrap_err();
        assert!(e.to_string().ends_with("not a regular file"), "{e}");
        // A FIFO with no writer is refused at once, not waited on.
        nix::unistd::mkfifo(&ctx.join("fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        let e = read_dockerfile(&ctx, &ctx.join("fifo")).unwrap_err();
        assert!(e.to_string().ends_with("not a regular file"), "{e}");
    }

    #[test]
    fn global_args_start_with_the_platform_and_take_build_args() {
        let df = dockerfile::parse(
            "ARG A=${TARGETOS}-x\nARG B=$A/y\nARG C\nARG D=d\nARG E=${Z\nFROM scratch\n",
        )
        .unwrap();
        let mut opts = BuildOptions::new("p", "/nonexistent");
        opts.build_args = vars(&[("D", "first"), ("C", "given"), ("D", "last")]);
        let e = global_args(&df, &opts, &Lexer::default()).unwrap_err();
        assert_eq!(message(e), "line 5: missing '}' in \"${Z\"");
        opts.build_args.push(("E".into(), "e".into()));
        let (args, total) = global_args(&df, &opts, &Lexer::default()).unwrap();
        let host = oci::Platform::host();
        let os = host.os.clone();
        let mut want = vars(&[
            ("BUILDPLATFORM", &host.to_string()),
            ("BUILDOS", &host.os),
            ("BUILDARCH", &host.arch),
            ("TARGETPLATFORM", &host.to_string()),
            ("TARGETOS", &host.os),
            ("TARGETARCH", &host.arch),
        ]);
        want.extend(vars(&[
            ("A", &format!("{os}-x")),
            ("B", &format!("{os}-x/y")),
            ("C", "given"),
            ("D", "last"),
            ("E", "e"),
        ]));
        assert_eq!(args, want);
        assert_eq!(total, 2 * (os.len() + 2) + 2, "only defaults are counted");
    }

    #[test]
    fn global_args_count_against_the_build_budget() {
        // 17 defaults of 1 MiB each (M and A0..A15): the 17th passes the 16 MiB budget.
        let mut text = String::from("ARG B\nARG M=$B$B\n");
        for i in 0..16 {
            text.push_str(&format!("ARG A{i}=$M\n"));
        }
        text.push_str("FROM scratch\n");
        let df = dockerfile::parse(&text).unwrap();
        let mut opts = BuildOptions::new("p", "/nonexistent");
        opts.build_args = vars(&[("B", &"b".repeat(1 << 19))]);
        let e = global_args(&df, &opts, &Lexer::default()).unwrap_err();
        assert_eq!(
            message(e),
            "line 18: variable substitution produced more than 16 MiB in this Dockerfile"
        );
        text = text.replace("ARG A15=$M\n", "");
        let df = dockerfile::parse(&text).unwrap();
        let (_, total) = global_args(&df, &opts, &Lexer::default()).unwrap();
        assert_eq!(total, MAX_EXPANDED_TOTAL);
    }
}
