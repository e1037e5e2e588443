//! Dockerfile parsing: parser directives (`escape`, `syntax`), comments, line continuations,
//! heredocs (`<<EOF`, `<<-EOF`, `<<"EOF"` for RUN, COPY and ADD, as BuildKit reads them), and
//! every instruction into a typed form. Arguments keep their raw text where Docker substitutes
//! variables at build time (the builder expands them with [`Lexer`], Docker's word processing,
//! and the environment of that step).
//!
//! Errors name their line: `line 3: unknown instruction: INVALIDCOMMAND`.

use std::fmt;

pub use crate::lex::{LexError, Lexer, Vars, MAX_EXPANDED, MAX_NESTING};

/// A parse error, with the 1-based line it is on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct ParseError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong, without the line.
    pub message: String,
}

fn err<T>(line: usize, message: impl Into<String>) -> Result<T, ParseError> {
    Err(ParseError {
        line,
        message: message.into(),
    })
}

/// The command of RUN, CMD, ENTRYPOINT, HEALTHCHECK: shell form or exec (JSON) form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Shell form: the text as written, run with the stage's `SHELL` (default `/bin/sh -c`).
    Shell(String),
    /// Exec (JSON array) form: argv as given, no shell.
    Exec(Vec<String>),
}

/// `--name=value` flags before an instruction's arguments.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Flags(pub Vec<(String, Option<String>)>);

impl Flags {
    /// The value of flag `--name`: `"true"` for a flag without a value; `None` when absent.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_deref().unwrap_or("true"))
    }

    /// A boolean flag (`--link`, `--link=true`, `--link=false`); absent is false.
    pub fn enabled(&self, name: &str) -> bool {
        self.get(name) == Some("true")
    }

    /// Every flag must be one of `spec`; a flag Docker knows but we do not support is an error
    /// too (never silently ignored), as is a missing value, a bad boolean, or a repeated flag
    /// other than `--mount`.
    fn check(&self, line: usize, instruction: &str, spec: &[FlagSpec]) -> Result<(), ParseError> {
        for (i, (k, v)) in self.0.iter().enumerate() {
            let Some(f) = spec.iter().find(|f| f.name == k) else {
                return err(line, format!("unknown flag --{k} for {instruction}"));
            };
            match (f.kind, v) {
                (FlagKind::Unsupported(why), _) => {
                    return err(
                        line,
                        format!("{instruction} --{k} is not supported by mistry{why}"),
                    )
                }
                (FlagKind::Value, None) => {
                    return err(
                        line,
                        format!("{instruction} --{k} needs a value (--{k}=...)"),
                    )
                }
                (FlagKind::Value, Some(_)) => {}
                (FlagKind::Bool, None) => {}
                (FlagKind::Bool, Some(b)) if b == "true" || b == "false" => {}
                (FlagKind::Bool, Some(b)) => {
                    return err(
                        line,
                        format!("{instruction} --{k}={b}: expected true or false"),
                    )
                }
            }
            if k != "mount" && self.0[..i].iter().any(|(p, _)| p == k) {
                return err(line, format!("{instruction} --{k} is given twice"));
            }
        }
        Ok(())
    }
}

#[derive(Clone, Copy)]
enum FlagKind {
    /// `--name=value`.
    Value,
    /// `--name` or `--name=true|false`.
    Bool,
    /// Known to Docker, refused here; the text says why or what to do instead.
    Unsupported(&'static str),
}

struct FlagSpec {
    name: &'static str,
    kind: FlagKind,
}

const fn value(name: &'static str) -> FlagSpec {
    FlagSpec {
        name,
        kind: FlagKind::Value,
    }
}

const fn boolean(name: &'static str) -> FlagSpec {
    FlagSpec {
        name,
        kind: FlagKind::Bool,
    }
}

const fn unsupported(name: &'static str, why: &'static str) -> FlagSpec {
    FlagSpec {
        name,
        kind: FlagKind::Unsupported(why),
    }
}

const FROM_FLAGS: &[FlagSpec] = &[value("platform")];
const RUN_FLAGS: &[FlagSpec] = &[
    value("mount"),
    value("network"),
    // `sandbox` (the default) only: `insecure` is refused when the flags are read (run.rs).
    value("security"),
    unsupported("device", " (RUN steps see only the sandbox's own devices)"),
];
const COPY_FLAGS: &[FlagSpec] = &[
    value("from"),
    value("chown"),
    value("chmod"),
    boolean("link"),
    boolean("parents"),
    unsupported("exclude", " (use .dockerignore)"),
];
const ADD_FLAGS: &[FlagSpec] = &[
    value("chown"),
    value("chmod"),
    value("checksum"),
    boolean("link"),
    unsupported(
        "keep-git-dir",
        " (git sources are not supported: clone into the build context instead)",
    ),
    unsupported("exclude", " (use .dockerignore)"),
    unsupported("unpack", ""),
];
const HEALTHCHECK_FLAGS: &[FlagSpec] = &[
    value("interval"),
    value("timeout"),
    value("start-period"),
    value("start-interval"),
    value("retries"),
];

/// A heredoc of RUN, COPY or ADD: `<<EOF`, `<<-EOF` (leading tabs stripped), `<<"EOF"` or
/// `<<'EOF'` (not expanded by COPY/ADD).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heredoc {
    /// The delimiter after quote removal; a COPY/ADD heredoc's file name in a directory.
    pub name: String,
    /// The lines between the instruction and the delimiter as written, each ending in `\n`.
    pub content: String,
    /// Whether COPY/ADD substitute variables in the body (the delimiter is unquoted).
    pub expand: bool,
    /// `<<-`: leading tabs are stripped from each line of the body.
    pub chomp: bool,
}

impl Heredoc {
    /// The body: the content, with leading tabs stripped from each line for `<<-`.
    pub fn body(&self) -> String {
        if !self.chomp {
            return self.content.clone();
        }
        self.content
            .split_inclusive('\n')
            .map(|l| l.trim_start_matches('\t'))
            .collect()
    }
}

/// One word as a heredoc redirection, as BuildKit reads it: `[n]<<[-]WORD` with WORD one word
/// after quote removal. Returns (delimiter, expand, chomp); `expand` is false when any part of
/// WORD is quoted. Anything else (`<<<`, `a<<b`, `"<<EOF"`) is not a heredoc.
pub fn heredoc_word(word: &str) -> Option<(String, bool, bool)> {
    let rest = word.trim_start_matches(|c: char| c.is_ascii_digit());
    let rest = rest.strip_prefix("<<")?;
    let (chomp, rest) = match rest.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, rest),
    };
    if rest.is_empty() || rest.contains('<') {
        return None;
    }
    let mut name = String::new();
    let mut quoted = false;
    let mut chars = rest.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                quoted = true;
                loop {
                    match chars.next()? {
                        '\'' => break,
                        d => name.push(d),
                    }
                }
            }
            '"' => {
                quoted = true;
                loop {
                    match chars.next()? {
                        '"' => break,
                        '\\' => match chars.next()? {
                            d @ ('"' | '\\' | '$') => name.push(d),
                            d => {
                                name.push('\\');
                                name.push(d);
                            }
                        },
                        d => name.push(d),
                    }
                }
            }
            '\\' => name.push(chars.next().unwrap_or('\\')),
            c if c.is_whitespace() => return None,
            c => name.push(c),
        }
    }
    if name.is_empty() {
        return None;
    }
    Some((name, !quoted, chomp))
}

/// The arguments of `HEALTHCHECK` (kept in the image config, never run by mistry).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Healthcheck {
    /// None for `HEALTHCHECK NONE`.
    pub test: Option<Command>,
    /// `--interval`, `--timeout`, `--start-period`, `--start-interval`, `--retries`, as written.
    pub flags: Flags,
}

/// One instruction, with raw (unexpanded) arguments where Docker expands at build time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Instruction {
    /// `FROM [--platform=P] IMAGE [AS NAME]`.
    From {
        /// The image reference, or an earlier stage's name, raw (ARGs not yet expanded).
        image: String,
        /// The stage name after `AS`, lowercased; `None` without one.
        alias: Option<String>,
        /// The `--platform` flag, raw; `None` when absent.
        platform: Option<String>,
    },
    /// RUN; with heredocs, `command` is the shell form as written (`<<EOF`, `cat <<EOF > f`).
    Run {
        /// The command; with heredocs always the shell form.
        command: Command,
        /// RUN's flags (`--mount`, `--network`, `--security`, `--device`), raw.
        flags: Flags,
        /// The heredocs of the line, in order, with their bodies.
        heredocs: Vec<Heredoc>,
    },
    /// COPY and ADD: `sources` and `dest` are raw words; heredoc sources (`COPY <<EOF /f`) are
    /// in `heredocs`, in order, and not in `sources`.
    Copy {
        /// `true` for ADD, `false` for COPY.
        add: bool,
        /// Source words, raw (paths in the context or, with `--from`, in a stage or image;
        /// URLs for ADD).
        sources: Vec<String>,
        /// The destination word, raw.
        dest: String,
        /// COPY/ADD flags (`--from`, `--chown`, `--chmod`, `--link`, ...), raw.
        flags: Flags,
        /// The heredoc sources, in order.
        heredocs: Vec<Heredoc>,
    },
    /// Raw `key=value` words (or the legacy `key value` as one pair).
    Env(Vec<(String, String)>),
    /// Each `NAME` or `NAME=default`, raw; `None` when no default is given.
    Arg(Vec<(String, Option<String>)>),
    /// The directory, raw.
    Workdir(String),
    /// The `USER` value (`name`, `uid`, `name:group`, `uid:gid`), raw.
    User(String),
    /// The image's entrypoint.
    Entrypoint(Command),
    /// The image's default command.
    Cmd(Command),
    /// Raw `key=value` pairs, as [`Instruction::Env`].
    Label(Vec<(String, String)>),
    /// Port words (`80`, `53/udp`), raw.
    Expose(Vec<String>),
    /// Mount-point words, raw (from a JSON array or split as words).
    Volume(Vec<String>),
    /// The signal, raw (`SIGTERM`, `15`).
    StopSignal(String),
    /// `HEALTHCHECK NONE` or `HEALTHCHECK [OPTIONS] CMD command`.
    Healthcheck(Healthcheck),
    /// The trigger instruction as written (checked to parse; run by images built `FROM` this one).
    Onbuild(String),
    /// The shell for later shell-form commands, from a non-empty JSON array.
    Shell(Vec<String>),
    /// The author, as written (deprecated); stored as the image's `maintainer` label.
    Maintainer(String),
}

impl Instruction {
    /// The instruction's keyword in capitals (`ADD` for [`Instruction::Copy`] with `add`).
    pub fn name(&self) -> &'static str {
        match self {
            Instruction::From { .. } => "FROM",
            Instruction::Run { .. } => "RUN",
            Instruction::Copy { add: false, .. } => "COPY",
            Instruction::Copy { add: true, .. } => "ADD",
            Instruction::Env(_) => "ENV",
            Instruction::Arg(_) => "ARG",
            Instruction::Workdir(_) => "WORKDIR",
            Instruction::User(_) => "USER",
            Instruction::Entrypoint(_) => "ENTRYPOINT",
            Instruction::Cmd(_) => "CMD",
            Instruction::Label(_) => "LABEL",
            Instruction::Expose(_) => "EXPOSE",
            Instruction::Volume(_) => "VOLUME",
            Instruction::StopSignal(_) => "STOPSIGNAL",
            Instruction::Healthcheck(_) => "HEALTHCHECK",
            Instruction::Onbuild(_) => "ONBUILD",
            Instruction::Shell(_) => "SHELL",
            Instruction::Maintainer(_) => "MAINTAINER",
        }
    }
}

/// An instruction with where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// 1-based line of the instruction's first line.
    pub line: usize,
    /// The logical line as written (continuations joined), for logs and cache keys.
    pub text: String,
    /// The parsed instruction.
    pub instruction: Instruction,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// A parsed Dockerfile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dockerfile {
    /// The escape character from `# escape=` (default `\`).
    pub escape: char,
    /// The `# syntax=` directive, if any (recorded, not acted on).
    pub syntax: Option<String>,
    /// ARGs before the first FROM (usable in FROM lines).
    pub global_args: Vec<(String, Option<String>)>,
    /// The line of each of `global_args` (for errors).
    pub global_arg_lines: Vec<usize>,
    /// The instructions from the first FROM on, in order (the ARGs before it are in
    /// `global_args`, not here).
    pub steps: Vec<Step>,
}

/// The largest Dockerfile accepted: 1 MiB.
pub const MAX_DOCKERFILE: usize = 1 << 20;

/// The most instructions a Dockerfile may have.
pub const MAX_INSTRUCTIONS: usize = 10_000;

impl Dockerfile {
    /// A [`Lexer`] with this file's escape character, for expanding the steps' words.
    pub fn lexer(&self) -> Lexer {
        Lexer::new(self.escape)
    }
}

/// Parse the parser directives at the top of the file (`# escape=`, `# syntax=`, `# check=`);
/// returns (escape, syntax). As in BuildKit, the first line that is not one of them (another
/// comment, `# key=value` with another key, an empty line) ends the directives.
fn directives(lines: &[&str]) -> Result<(char, Option<String>), ParseError> {
    let mut escape = '\\';
    let mut syntax = None;
    let mut seen = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let t = line.trim();
        let Some(body) = t.strip_prefix('#') else {
            break;
        };
        let Some((key, value)) = body.split_once('=') else {
            break;
        };
        let key = key.trim().to_ascii_lowercase();
        let value = value.trim();
        if !matches!(key.as_str(), "escape" | "syntax" | "check") || value.is_empty() {
            break;
        }
        if seen.contains(&key) {
            return err(
                i + 1,
                format!("only one {key} parser directive can be used"),
            );
        }
        match key.as_str() {
            "escape" => {
                escape = match value {
                    "\\" => '\\',
                    "`" => '`',
                    other => {
                        return err(
                            i + 1,
                            format!("invalid escape token {other:?}: must be ` or \\"),
                        )
                    }
                }
            }
            "syntax" => syntax = Some(value.to_string()),
            // `check` configures BuildKit's build checks (linter warnings): none here.
            _ => {}
        }
        seen.push(key);
    }
    Ok((escape, syntax))
}

/// Split a logical line into (flags, rest): the `--flag[=value]` words before the arguments
/// (`--` alone ends them, as in BuildKit).
fn take_flags(rest: &str) -> (Flags, &str) {
    let mut flags = Vec::new();
    let mut rest = rest.trim_start();
    while let Some(after) = rest.strip_prefix("--") {
        let end = after.find(char::is_whitespace).unwrap_or(after.len());
        let flag = &after[..end];
        if flag.is_empty() {
            rest = after.trim_start();
            break;
        }
        match flag.split_once('=') {
            Some((k, v)) => flags.push((k.to_string(), Some(v.to_string()))),
            None => flags.push((flag.to_string(), None)),
        }
        rest = after[end..].trim_start();
    }
    (Flags(flags), rest)
}

/// A JSON array of strings → the exec form (Some); text that is not a JSON array → None (the
/// shell form, as Docker reads `CMD ['a']` or `CMD ["a"`); a JSON array holding anything but
/// strings is an error, as in BuildKit.
fn json_array(line: usize, rest: &str) -> Result<Option<Vec<String>>, ParseError> {
    let t = rest.trim();
    if !t.starts_with('[') {
        return Ok(None);
    }
    let Ok(items) = serde_json::from_str::<Vec<serde_json::Value>>(t) else {
        return Ok(None);
    };
    items
        .into_iter()
        .map(|v| match v {
            serde_json::Value::String(s) => Ok(s),
            _ => err(
                line,
                "when using JSON array syntax, arrays must be comprised of strings only",
            ),
        })
        .collect::<Result<Vec<String>, ParseError>>()
        .map(Some)
}

fn command(line: usize, rest: &str) -> Result<Command, ParseError> {
    Ok(match json_array(line, rest)? {
        Some(v) => Command::Exec(v),
        None => Command::Shell(rest.trim().to_string()),
    })
}

/// Parse `k=v k2=v2` (or legacy `k v`) into raw pairs.
fn pairs(
    lexer: &Lexer,
    line: usize,
    rest: &str,
    name: &str,
) -> Result<Vec<(String, String)>, ParseError> {
    let words = lexer
        .split_raw(rest)
        .map_err(|e| ParseError { line, message: e.0 })?;
    if words.is_empty() {
        return err(line, format!("{name} requires at least one argument"));
    }
    if !words[0].contains('=') {
        let key = words[0].clone();
        let value = rest.trim_start()[key.len()..].trim().to_string();
        if value.is_empty() {
            return err(line, format!("{name} {key} needs a value"));
        }
        return Ok(vec![(key, value)]);
    }
    words
        .into_iter()
        .map(|w| match w.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => err(line, format!("{name} expects key=value, got {w:?}")),
        })
        .collect()
}

fn parse_instruction(
    lexer: &Lexer,
    line: usize,
    keyword: &str,
    rest: &str,
    heredocs: &[Heredoc],
) -> Result<Instruction, ParseError> {
    let upper = keyword.to_ascii_uppercase();
    // Instructions without flags refuse any (BuildKit: "unknown flag"); `--` is dropped.
    let rest = match upper.as_str() {
        "FROM" | "RUN" | "COPY" | "ADD" | "HEALTHCHECK" => rest,
        _ => {
            let (flags, after) = take_flags(rest);
            flags.check(line, &upper, &[])?;
            after
        }
    };
    let need_args = |what: &str| -> Result<(), ParseError> {
        if rest.trim().is_empty() {
            err(line, format!("{what} requires at least one argument"))
        } else {
            Ok(())
        }
    };
    let raw_words = |rest: &str| -> Result<Vec<String>, ParseError> {
        match json_array(line, rest)? {
            Some(v) => Ok(v),
            None => lexer
                .split_raw(rest)
                .map_err(|e| ParseError { line, message: e.0 }),
        }
    };
    Ok(match upper.as_str() {
        "FROM" => {
            let (flags, rest) = take_flags(rest);
            flags.check(line, "FROM", FROM_FLAGS)?;
            let words: Vec<&str> = rest.split_whitespace().collect();
            let (image, alias) = match words.as_slice() {
                [image] => (image.to_string(), None),
                [image, as_, alias] if as_.eq_ignore_ascii_case("as") => {
                    let name = alias.to_ascii_lowercase();
                    if !valid_stage_name(&name) {
                        return err(
                            line,
                            format!(
                                "invalid name for build stage: {alias:?}, name can't start \
                                 with a number or contain symbols"
                            ),
                        );
                    }
                    (image.to_string(), Some(name))
                }
                [] => return err(line, "FROM requires an image"),
                _ => return err(line, "FROM takes IMAGE [AS NAME]"),
            };
            Instruction::From {
                image,
                alias,
                platform: flags.get("platform").map(str::to_string),
            }
        }
        "RUN" => {
            let (flags, rest) = take_flags(rest);
            flags.check(line, "RUN", RUN_FLAGS)?;
            if rest.trim().is_empty() {
                return err(line, "RUN requires a command");
            }
            Instruction::Run {
                command: if heredocs.is_empty() {
                    command(line, rest)?
                } else {
                    Command::Shell(rest.trim().to_string())
                },
                flags,
                heredocs: heredocs.to_vec(),
            }
        }
        "COPY" | "ADD" => {
            let add = upper == "ADD";
            let (flags, rest) = take_flags(rest);
            flags.check(line, &upper, if add { ADD_FLAGS } else { COPY_FLAGS })?;
            let mut words = raw_words(rest)?;
            if words.len() < 2 {
                return err(
                    line,
                    format!("{upper} requires at least two arguments: SRC... DEST"),
                );
            }
            let dest = words.pop().unwrap_or_default();
            if !heredocs.is_empty() && heredoc_word(&dest).is_some() {
                return err(
                    line,
                    format!("{upper}: a heredoc cannot be the destination ({dest})"),
                );
            }
            // Heredoc sources become files named by their delimiter (the last heredoc of that
            // name on the line, as BuildKit looks them up).
            let mut sources = Vec::new();
            let mut docs = Vec::new();
            for w in words {
                let doc = match heredoc_word(&w) {
                    Some((name, _, _)) => heredocs.iter().rev().find(|h| h.name == name),
                    None => None,
                };
                match doc {
                    Some(h) => docs.push(h.clone()),
                    None => sources.push(w),
                }
            }
            Instruction::Copy {
                add,
                sources,
                dest,
                flags,
                heredocs: docs,
            }
        }
        "ENV" => Instruction::Env(pairs(lexer, line, rest, "ENV")?),
        "LABEL" => Instruction::Label(pairs(lexer, line, rest, "LABEL")?),
        "ARG" => {
            need_args("ARG")?;
            let words = lexer
                .split_raw(rest)
                .map_err(|e| ParseError { line, message: e.0 })?;
            Instruction::Arg(
                words
                    .into_iter()
                    .map(|w| match w.split_once('=') {
                        Some(("", _)) => err(line, "ARG names can not be blank"),
                        Some((k, v)) => Ok((k.to_string(), Some(v.to_string()))),
                        None => Ok((w, None)),
                    })
                    .collect::<Result<_, _>>()?,
            )
        }
        "WORKDIR" => {
            need_args("WORKDIR")?;
            Instruction::Workdir(rest.trim().to_string())
        }
        "USER" => {
            need_args("USER")?;
            Instruction::User(rest.trim().to_string())
        }
        "ENTRYPOINT" => {
            need_args("ENTRYPOINT")?;
            Instruction::Entrypoint(command(line, rest)?)
        }
        "CMD" => {
            need_args("CMD")?;
            Instruction::Cmd(command(line, rest)?)
        }
        "EXPOSE" => {
            need_args("EXPOSE")?;
            Instruction::Expose(raw_words(rest)?)
        }
        "VOLUME" => {
            need_args("VOLUME")?;
            Instruction::Volume(raw_words(rest)?)
        }
        "STOPSIGNAL" => {
            need_args("STOPSIGNAL")?;
            Instruction::StopSignal(rest.trim().to_string())
        }
        "HEALTHCHECK" => {
            let (flags, rest) = take_flags(rest);
            flags.check(line, "HEALTHCHECK", HEALTHCHECK_FLAGS)?;
            let t = rest.trim();
            let test = if t.eq_ignore_ascii_case("none") {
                None
            } else {
                let (kw, cmd) = t.split_once(char::is_whitespace).unwrap_or((t, ""));
                if !kw.eq_ignore_ascii_case("cmd") || cmd.trim().is_empty() {
                    return err(line, "HEALTHCHECK takes NONE or [OPTIONS] CMD command");
                }
                Some(command(line, cmd)?)
            };
            Instruction::Healthcheck(Healthcheck { test, flags })
        }
        "ONBUILD" => {
            let t = rest.trim();
            let inner = t
                .split_whitespace()
                .next()
                .unwrap_or("")
                .to_ascii_uppercase();
            match inner.as_str() {
                "" => return err(line, "ONBUILD requires an instruction"),
                "ONBUILD" | "FROM" | "MAINTAINER" => {
                    return err(line, format!("{inner} isn't allowed as an ONBUILD trigger"))
                }
                _ => {}
            }
            // Checked now, run by images built FROM this one (the trigger keeps its heredocs'
            // lines, so that it parses again as it was written).
            let (kw, args) = t.split_once(char::is_whitespace).unwrap_or((t, ""));
            let first = args.lines().next().unwrap_or("");
            parse_instruction(lexer, line, kw, first, heredocs)?;
            Instruction::Onbuild(t.to_string())
        }
        "SHELL" => match json_array(line, rest)? {
            Some(v) if !v.is_empty() => Instruction::Shell(v),
            _ => return err(line, "SHELL requires the arguments to be in JSON form"),
        },
        "MAINTAINER" => {
            need_args("MAINTAINER")?;
            Instruction::Maintainer(rest.trim().to_string())
        }
        _ => return err(line, format!("unknown instruction: {upper}")),
    })
}

/// Whether `rest` (an instruction's arguments, flags first) is in exec (JSON) form (or a JSON
/// array that is an error).
fn is_json_form(rest: &str) -> bool {
    !matches!(json_array(0, take_flags(rest).1), Ok(None))
}

/// A build stage's name as BuildKit accepts it: `[a-z][a-z0-9-_.]*`.
fn valid_stage_name(name: &str) -> bool {
    name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c))
}

/// The line without its continuation escape, when it ends in one (before spaces and tabs), as
/// BuildKit's rule is: the escape after any character but the escape itself (`\\` at the end
/// of a line is an escaped escape), or alone on its line.
fn continued(line: &str, escape: char) -> Option<&str> {
    let body = line.trim_end().strip_suffix(escape)?;
    if body.ends_with(escape) {
        None
    } else {
        Some(body)
    }
}

/// The heredocs of a RUN, COPY or ADD line (also as an ONBUILD trigger), their bodies read
/// from `lines[*i..]` (which moves past each delimiter line). None for other instructions and
/// the exec form, as in BuildKit.
fn read_heredocs(
    lines: &[&str],
    i: &mut usize,
    line: usize,
    keyword: &str,
    rest: &str,
) -> Result<Vec<Heredoc>, ParseError> {
    let (keyword, rest) = if keyword.eq_ignore_ascii_case("ONBUILD") {
        let t = rest.trim();
        t.split_once(char::is_whitespace).unwrap_or((t, ""))
    } else {
        (keyword, rest)
    };
    let kw = keyword.to_ascii_uppercase();
    if !matches!(kw.as_str(), "RUN" | "COPY" | "ADD") || !rest.contains("<<") || is_json_form(rest)
    {
        return Ok(Vec::new());
    }
    // Words with quotes and escapes kept, as BuildKit looks for them (its escape is `\`).
    let Ok(words) = Lexer::new('\\').split_raw(rest) else {
        return Ok(Vec::new());
    };
    let mut docs = Vec::new();
    for w in words {
        let Some((name, expand, chomp)) = heredoc_word(&w) else {
            continue;
        };
        let mut content = String::new();
        let mut terminated = false;
        while *i < lines.len() {
            let l = lines[*i];
            *i += 1;
            let candidate = if chomp { l.trim_start_matches('\t') } else { l };
            if candidate == name {
                terminated = true;
                break;
            }
            content.push_str(l);
            content.push('\n');
        }
        if !terminated {
            return err(
                line,
                format!("unterminated heredoc {w}: no line {name:?} ends it"),
            );
        }
        docs.push(Heredoc {
            name,
            content,
            expand,
            chomp,
        });
    }
    Ok(docs)
}

/// Parse a Dockerfile's text.
pub fn parse(text: &str) -> Result<Dockerfile, ParseError> {
    if text.len() > MAX_DOCKERFILE {
        return err(
            1,
            format!(
                "the Dockerfile is larger than the limit of {} MiB",
                MAX_DOCKERFILE >> 20
            ),
        );
    }
    // A UTF-8 byte order mark is dropped, as BuildKit does.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let lines: Vec<&str> = text.lines().collect();
    let (escape, syntax) = directives(&lines)?;
    let lexer = Lexer::new(escape);
    let mut steps = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let first = i;
        let t = lines[i].trim();
        i += 1;
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        // Join continuation lines (a line ending in the escape character, as BuildKit's
        // rule); comment and empty lines inside a continuation are dropped.
        let mut logical = String::new();
        let mut cur = lines[first].trim_end();
        loop {
            let Some(joined) = continued(cur, escape) else {
                logical.push_str(cur);
                break;
            };
            logical.push_str(joined);
            let mut next = None;
            while i < lines.len() {
                let candidate = lines[i];
                i += 1;
                let nt = candidate.trim();
                if !nt.is_empty() && !nt.starts_with('#') {
                    next = Some(candidate.trim_end());
                    break;
                }
            }
            match next {
                Some(n) => cur = n,
                None => break,
            }
        }
        let logical = logical.trim().to_string();
        let (keyword, rest) = match logical.split_once(char::is_whitespace) {
            Some((k, r)) => (k, r.trim_start()),
            None => (logical.as_str(), ""),
        };
        if steps.len() >= MAX_INSTRUCTIONS {
            return err(
                first + 1,
                format!("more than {MAX_INSTRUCTIONS} instructions in the Dockerfile"),
            );
        }
        // Heredocs: their bodies follow the instruction's last line.
        let body_start = i;
        let heredocs = read_heredocs(&lines, &mut i, first + 1, keyword, rest)?;
        let instruction = if keyword.eq_ignore_ascii_case("ONBUILD") && !heredocs.is_empty() {
            // The trigger is kept with its heredocs' lines, to be parsed again when it runs.
            parse_instruction(&lexer, first + 1, keyword, rest, &heredocs)?;
            Instruction::Onbuild(format!(
                "{}\n{}",
                rest.trim(),
                lines[body_start..i].join("\n")
            ))
        } else {
            parse_instruction(&lexer, first + 1, keyword, rest, &heredocs)?
        };
        steps.push(Step {
            line: first + 1,
            text: logical.clone(),
            instruction,
        });
    }
    // ARGs before the first FROM are global; anything else before it is an error.
    let mut global_args = Vec::new();
    let mut global_arg_lines = Vec::new();
    let mut start = 0;
    for step in &steps {
        match &step.instruction {
            Instruction::Arg(a) => {
                global_args.extend(a.iter().cloned());
                global_arg_lines.extend(a.iter().map(|_| step.line));
                start += 1;
            }
            Instruction::From { .. } => break,
            other => {
                return err(
                    step.line,
                    format!(
                        "{} before FROM: the first instruction must be FROM (or ARG)",
                        other.name()
                    ),
                )
            }
        }
    }
    let steps = steps.split_off(start);
    if steps.is_empty() {
        return err(lines.len().max(1), "the Dockerfile has no FROM instruction");
    }
    Ok(Dockerfile {
        escape,
        syntax,
        global_args,
        global_arg_lines,
        steps,
    })
}
