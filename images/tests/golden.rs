//! Golden tests of the Dockerfile parser and of variable substitution, data-driven (the layout
//! of BuildKit's `frontend/dockerfile/parser/testfiles` and `shell/envVarTest`):
//!
//! - `tests/golden/parser/<case>/Dockerfile` (or `Dockerfile.gen`, a generated one, for the
//!   size caps) and `expected`: the parsed Dockerfile rendered as text, or `error: <message>`;
//! - `tests/golden/lex/*.txt`: one substitution case a line, `INPUT | EXPECTED`, under `@`
//!   settings (variables, escape character, mode).
//!
//! A changed result fails with a diff of every case that changed. `MISTRY_BLESS=1 cargo test
//! -p images --test golden` rewrites the expected results instead (comment lines, `#` at the
//! top of an `expected` file and anywhere in a `.txt` file, are kept): review the diff before
//! committing it. See docs/testing.md.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use images::dockerfile::{parse, Command, Dockerfile, Flags, Heredoc, Instruction, Lexer};

fn golden_dir(sub: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(sub)
}

fn bless() -> bool {
    std::env::var_os("MISTRY_BLESS").is_some_and(|v| v == "1")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn sorted_entries(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

/// A line diff (longest common subsequence), `-` expected, `+` actual.
fn diff(expected: &str, actual: &str) -> String {
    let a: Vec<&str> = expected.lines().collect();
    let b: Vec<&str> = actual.lines().collect();
    let mut lcs = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j, mut out) = (0, 0, String::new());
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            let _ = writeln!(out, "  {}", a[i]);
            i += 1;
            j += 1;
        } else if j < b.len() && (i == a.len() || lcs[i][j + 1] >= lcs[i + 1][j]) {
            let _ = writeln!(out, "+ {}", b[j]);
            j += 1;
        } else {
            let _ = writeln!(out, "- {}", a[i]);
            i += 1;
        }
    }
    out
}

/// A string as Rust writes it (quoted, escaped), shortened when long (the caps' cases).
fn q(s: &str) -> String {
    if s.len() <= 200 {
        return format!("{s:?}");
    }
    let head: String = s.chars().take(16).collect();
    format!("{head:?}... ({} bytes)", s.len())
}

fn list(v: &[String]) -> String {
    let items: Vec<String> = v.iter().map(|s| q(s)).collect();
    format!("[{}]", items.join(", "))
}

fn flags(f: &Flags) -> String {
    if f.0.is_empty() {
        return String::new();
    }
    let items: Vec<String> =
        f.0.iter()
            .map(|(k, v)| match v {
                Some(v) => format!("--{k}={}", q(v)),
                None => format!("--{k}"),
            })
            .collect();
    format!(" flags [{}]", items.join(" "))
}

fn command(c: &Command) -> String {
    match c {
        Command::Shell(s) => format!("shell {}", q(s)),
        Command::Exec(v) => format!("exec {}", list(v)),
    }
}

fn heredocs(out: &mut String, docs: &[Heredoc]) {
    for h in docs {
        let _ = write!(
            out,
            "\n    heredoc {} expand={} chomp={} content {}",
            q(&h.name),
            h.expand,
            h.chomp,
            q(&h.content)
        );
        if h.chomp {
            let _ = write!(out, " body {}", q(&h.body()));
        }
    }
}

fn instruction(i: &Instruction) -> String {
    let mut out = i.name().to_string();
    let pairs = |v: &[(String, String)]| {
        v.iter()
            .map(|(k, v)| format!(" {}={}", q(k), q(v)))
            .collect::<String>()
    };
    match i {
        Instruction::From {
            image,
            alias,
            platform,
        } => {
            let _ = write!(out, " {}", q(image));
            if let Some(a) = alias {
                let _ = write!(out, " AS {}", q(a));
            }
            if let Some(p) = platform {
                let _ = write!(out, " platform {}", q(p));
            }
        }
        Instruction::Run {
            command: c,
            flags: f,
            heredocs: h,
        } => {
            let _ = write!(out, " {}{}", command(c), flags(f));
            heredocs(&mut out, h);
        }
        Instruction::Copy {
            add: _,
            sources,
            dest,
            flags: f,
            heredocs: h,
        } => {
            let _ = write!(out, " {} -> {}{}", list(sources), q(dest), flags(f));
            heredocs(&mut out, h);
        }
        Instruction::Env(v) | Instruction::Label(v) => out.push_str(&pairs(v)),
        Instruction::Arg(v) => {
            for (k, d) in v {
                match d {
                    Some(d) => {
                        let _ = write!(out, " {}={}", q(k), q(d));
                    }
                    None => {
                        let _ = write!(out, " {}", q(k));
                    }
                }
            }
        }
        Instruction::Workdir(s)
        | Instruction::User(s)
        | Instruction::StopSignal(s)
        | Instruction::Maintainer(s) => {
            let _ = write!(out, " {}", q(s));
        }
        Instruction::Entrypoint(c) | Instruction::Cmd(c) => {
            let _ = write!(out, " {}", command(c));
        }
        Instruction::Expose(v) | Instruction::Volume(v) | Instruction::Shell(v) => {
            let _ = write!(out, " {}", list(v));
        }
        Instruction::Healthcheck(h) => {
            match &h.test {
                None => out.push_str(" NONE"),
                Some(c) => {
                    let _ = write!(out, " {}", command(c));
                }
            }
            out.push_str(&flags(&h.flags));
        }
        Instruction::Onbuild(t) => {
            let _ = write!(out, " {}", q(t));
            // As the builder runs a trigger: parsed again on its own.
            let (kw, rest) = t.split_once(char::is_whitespace).unwrap_or((t, ""));
            match parse(&format!("FROM scratch\n{kw} {rest}\n")) {
                Ok(df) => {
                    let _ = write!(
                        out,
                        "\n    trigger {}",
                        instruction(&df.steps[1].instruction)
                    );
                }
                Err(e) => {
                    let _ = write!(out, "\n    trigger error: {e}");
                }
            }
        }
    }
    out
}

/// The rendering an `expected` file holds (after its comment lines).
fn render(df: &Dockerfile, summary: bool) -> String {
    let mut out = String::new();
    // Through the API the builder uses: the lexer of the file, each step's Display.
    let _ = writeln!(out, "escape {:?}", df.lexer().escape);
    assert_eq!(df.lexer().escape, df.escape);
    if let Some(s) = &df.syntax {
        let _ = writeln!(out, "syntax {}", q(s));
    }
    let args: Vec<_> = df.global_args.iter().zip(&df.global_arg_lines).collect();
    let args = if summary && args.len() > 2 {
        let _ = writeln!(out, "{} global args; the first and the last:", args.len());
        vec![args[0], args[args.len() - 1]]
    } else {
        args
    };
    for ((k, d), line) in args {
        match d {
            Some(d) => {
                let _ = writeln!(out, "global arg (line {line}) {}={}", q(k), q(d));
            }
            None => {
                let _ = writeln!(out, "global arg (line {line}) {}", q(k));
            }
        }
    }
    let shown: Vec<_> = if summary && df.steps.len() > 2 {
        let _ = writeln!(out, "{} steps; the first and the last:", df.steps.len());
        vec![&df.steps[0], &df.steps[df.steps.len() - 1]]
    } else {
        df.steps.iter().collect()
    };
    for s in shown {
        let _ = writeln!(out, "{}: {}", s.line, q(&s.to_string()));
        let _ = writeln!(out, "    {}", instruction(&s.instruction));
    }
    out
}

/// A generated Dockerfile: `{"parts": [[TEXT, COUNT], ...]}`, each TEXT repeated COUNT times.
fn generate(spec: &str, path: &Path) -> String {
    let v: serde_json::Value =
        serde_json::from_str(spec).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut text = String::new();
    for part in v["parts"].as_array().expect("parts") {
        let t = part[0].as_str().expect("text");
        let n = part[1].as_u64().expect("count") as usize;
        text.push_str(&t.repeat(n));
    }
    text
}

/// Split an expected file into its leading comment lines and the rest.
fn split_comments(text: &str) -> (String, String) {
    let mut comments = String::new();
    let mut rest = text;
    while rest.starts_with('#') {
        let end = rest.find('\n').map_or(rest.len(), |i| i + 1);
        comments.push_str(&rest[..end]);
        rest = &rest[end..];
    }
    (comments, rest.to_string())
}

#[test]
fn parser_cases() {
    let mut failures = Vec::new();
    let mut count = 0;
    for dir in sorted_entries(&golden_dir("parser")) {
        if !dir.is_dir() {
            continue;
        }
        count += 1;
        let plain = dir.join("Dockerfile");
        let gen = dir.join("Dockerfile.gen");
        let (text, summary) = if plain.exists() {
            (read(&plain), false)
        } else {
            (generate(&read(&gen), &gen), true)
        };
        let actual = match parse(&text) {
            Ok(df) => render(&df, summary),
            Err(e) => format!("error: {e}\n"),
        };
        let exp_path = dir.join("expected");
        let old = std::fs::read_to_string(&exp_path).unwrap_or_default();
        let (comments, expected) = split_comments(&old);
        if expected != actual {
            if bless() {
                std::fs::write(&exp_path, format!("{comments}{actual}")).unwrap();
            } else {
                failures.push(format!(
                    "{} (- expected, + actual):\n{}",
                    dir.display(),
                    diff(&expected, &actual)
                ));
            }
        }
    }
    assert!(count >= 60, "only {count} parser cases");
    assert!(
        failures.is_empty(),
        "{} parser case(s) changed (MISTRY_BLESS=1 rewrites them; see docs/testing.md):\n\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// How a lex case's input is processed.
#[derive(Clone, Copy, Debug)]
enum Mode {
    /// `Lexer::process_word`: one word, quotes removed, variables expanded.
    Word,
    /// `Lexer::process_words`: split on unquoted whitespace, then processed.
    Words,
    /// `Lexer::split_raw`: split, quotes and escapes kept.
    Raw,
    /// `Lexer::expand_heredoc`: a COPY/ADD heredoc body.
    Heredoc,
}

/// A value in a lex file: as written, `json:"..."` (a JSON string, for spaces at the ends and
/// control characters), or `repeat:N:TEXT` (TEXT N times, for the caps).
fn value(s: &str) -> String {
    if let Some(j) = s.strip_prefix("json:") {
        return serde_json::from_str(j).unwrap_or_else(|e| panic!("{s}: {e}"));
    }
    if let Some(r) = s.strip_prefix("repeat:") {
        let (n, t) = r.split_once(':').expect("repeat:N:TEXT");
        return t.repeat(n.parse().expect("repeat count"));
    }
    s.to_string()
}

const SEP: &str = " | ";

fn lex_file(path: &Path, failures: &mut Vec<String>) -> usize {
    let text = read(path);
    let mut vars: Vec<(String, String)> = Vec::new();
    let mut lexer = Lexer::default();
    let mut mode = Mode::Word;
    let mut out = String::new();
    let mut cases = 0;
    for (n, line) in text.lines().enumerate() {
        let n = n + 1;
        if line.trim().is_empty() || line.starts_with('#') {
            out.push_str(line);
            out.push('\n');
            continue;
        }
        if let Some(setting) = line.strip_prefix('@') {
            out.push_str(line);
            out.push('\n');
            let (key, arg) = setting.split_once(' ').unwrap_or((setting, ""));
            match key {
                "env" => {
                    let (k, v) = arg.split_once('=').expect("@env NAME=VALUE");
                    vars.push((k.to_string(), value(v)));
                }
                "clear" => vars.clear(),
                "escape" => lexer = Lexer::new(arg.chars().next().expect("@escape CHAR")),
                "mode" => {
                    mode = match arg {
                        "word" => Mode::Word,
                        "words" => Mode::Words,
                        "raw" => Mode::Raw,
                        "heredoc" => Mode::Heredoc,
                        other => panic!("{}:{n}: unknown mode {other}", path.display()),
                    }
                }
                other => panic!("{}:{n}: unknown setting @{other}", path.display()),
            }
            continue;
        }
        let Some(at) = line.find(SEP) else {
            panic!("{}:{n}: a case is INPUT | EXPECTED", path.display());
        };
        cases += 1;
        let input = value(line[..at].trim_end());
        let expected = line[at + SEP.len()..].trim();
        let result = match mode {
            Mode::Word => lexer.process_word(&input, &vars).map(|w| q(&w)),
            Mode::Words => lexer.process_words(&input, &vars).map(|w| list(&w)),
            Mode::Raw => lexer.split_raw(&input).map(|w| list(&w)),
            Mode::Heredoc => lexer.expand_heredoc(&input, &vars).map(|w| q(&w)),
        };
        let actual = match result {
            Ok(s) => s,
            Err(e) => format!("error: {e}"),
        };
        if actual != expected {
            failures.push(format!(
                "{}:{n} ({mode:?}, escape {:?}): {}\n  - expected {expected}\n  + actual   {actual}",
                path.display(),
                lexer.escape,
                q(&input),
            ));
        }
        out.push_str(&line[..at + SEP.len()]);
        out.push_str(&actual);
        out.push('\n');
    }
    if bless() && out != text {
        std::fs::write(path, out).unwrap();
        failures.clear();
    }
    cases
}

#[test]
fn lex_cases() {
    let mut failures = Vec::new();
    let mut cases = 0;
    for path in sorted_entries(&golden_dir("lex")) {
        if path.extension().is_some_and(|e| e == "txt") {
            let mut f = Vec::new();
            cases += lex_file(&path, &mut f);
            failures.extend(f);
        }
    }
    assert!(cases >= 150, "only {cases} substitution cases");
    assert!(
        failures.is_empty(),
        "{} substitution case(s) changed (MISTRY_BLESS=1 rewrites them; see docs/testing.md):\n\n{}",
        failures.len(),
        failures.join("\n")
    );
}
