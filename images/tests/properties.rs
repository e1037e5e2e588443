//! Property tests (bounded-time fuzzing that runs in `cargo test`): the Dockerfile parser and
//! variable substitution never panic and stay within their caps; the layer unpacker never
//! creates or changes anything outside the root it applies to, whatever the tar holds.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use images::dockerfile;
use images::dockerfile::{Lexer, MAX_EXPANDED};
use images::{apply_layer, Owners};
use proptest::prelude::*;

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn dockerfile_line() -> impl Strategy<Value = String> {
    let keyword = prop::sample::select(vec![
        "FROM",
        "RUN",
        "CMD",
        "LABEL",
        "EXPOSE",
        "ENV",
        "ADD",
        "COPY",
        "ENTRYPOINT",
        "VOLUME",
        "USER",
        "WORKDIR",
        "ARG",
        "ONBUILD",
        "STOPSIGNAL",
        "HEALTHCHECK",
        "SHELL",
        "MAINTAINER",
        "# escape=`",
        "# syntax=x",
        "#",
        "",
        "from",
        "BOGUS",
    ]);
    let arg = prop::sample::select(vec![
        "busybox",
        "AS",
        "x",
        "--from=a",
        "--chown=1:1",
        "--platform=$P",
        "[\"a\",",
        "\"b\"]",
        "[]",
        "k=v",
        "k",
        "=",
        "${A}",
        "${A:-${B}}",
        "$",
        "\\",
        "`",
        "'",
        "\"",
        "NONE",
        "CMD",
        "--interval=1s",
        "a=\"b c\"",
        "${",
        "}",
        "--",
        "-",
    ]);
    (keyword, prop::collection::vec(arg, 0..5))
        .prop_map(|(k, args)| format!("{k} {}", args.join(" ")))
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn parser_never_panics_and_errors_name_a_line(
        lines in prop::collection::vec(dockerfile_line(), 0..25),
        raw in ".{0,200}",
    ) {
        for text in [lines.join("\n"), raw.clone(), format!("{}\n{raw}", lines.join("\\\n"))] {
            let count = text.lines().count();
            match dockerfile::parse(&text) {
                Ok(df) => {
                    for s in &df.steps {
                        prop_assert!(s.line >= 1 && s.line <= count);
                    }
                }
                Err(e) => prop_assert!(
                    e.line >= 1 && e.line <= count.max(1),
                    "line {} of {count}: {e}", e.line
                ),
            }
        }
    }

    #[test]
    fn substitution_never_panics_and_stays_bounded(
        parts in prop::collection::vec(prop::sample::select(vec![
            "$A", "${A}", "${B:-$A$A}", "${A:+x}", "${C-y}", "${C+z}", "'", "\"", "\\", "$",
            "${", "}", "{", " ", "a", "${A:?}", "${A/x}", "`", "$$", "${B:-${A:-${C}}}",
        ]), 0..40),
        a_len in 0usize..300_000,
        escape in prop::sample::select(vec!['\\', '`']),
    ) {
        let word: String = parts.concat();
        let vars = vec![
            ("A".to_string(), "v".repeat(a_len)),
            ("B".to_string(), "b w".to_string()),
        ];
        let lexer = Lexer::new(escape);
        if let Ok(out) = lexer.process_word(&word, &vars) {
            prop_assert!(out.len() <= MAX_EXPANDED);
        }
        if let Ok(words) = lexer.process_words(&word, &vars) {
            prop_assert!(words.iter().map(String::len).sum::<usize>() <= MAX_EXPANDED);
        }
        let _ = lexer.split_raw(&word);
    }
}

#[test]
fn substitution_caps_doubling_and_nesting() {
    let lexer = Lexer::default();
    let vars = vec![("A".to_string(), "x".repeat(600 * 1024))];
    assert_eq!(lexer.process_word("$A", &vars).unwrap().len(), 600 * 1024);
    let e = lexer.process_word("$A${A}", &vars).unwrap_err();
    assert_eq!(e.to_string(), "the expanded text is longer than 1 MiB");
    let e = lexer.process_words("$A \"$A\"", &vars).unwrap_err();
    assert_eq!(e.to_string(), "the expanded text is longer than 1 MiB");
    // Deep nesting is an error, not a stack overflow.
    let deep = format!("{}x{}", "${N:-".repeat(100_000), "}".repeat(100_000));
    let e = lexer.process_word(&deep, &vars).unwrap_err();
    assert_eq!(
        e.to_string(),
        "variable substitutions nested more than 32 deep"
    );
    let ok = format!("{}x{}", "${N:-".repeat(30), "}".repeat(30));
    assert_eq!(lexer.process_word(&ok, &vars).unwrap(), "x");
}

// ---- the unpacker ----

#[derive(Debug, Clone)]
enum Kind {
    File,
    Dir,
    Symlink,
    Hardlink,
    Fifo,
    Whiteout,
    Opaque,
}

fn entry() -> impl Strategy<Value = (String, Kind, String)> {
    let comp = prop::sample::select(vec!["a", "b", "l", "..", ".", "", "d", "c1"]);
    let name = prop::collection::vec(comp, 1..4).prop_map(|c| c.join("/"));
    let lead = prop::sample::select(vec!["", "/", "./", "../"]);
    let kind = prop::sample::select(vec![
        Kind::File,
        Kind::Dir,
        Kind::Symlink,
        Kind::Symlink,
        Kind::Hardlink,
        Kind::Fifo,
        Kind::Whiteout,
        Kind::Opaque,
    ]);
    let link = prop::sample::select(vec![
        "/",
        "..",
        "../..",
        "../../outside",
        "@OUT",
        "@OUT/keep",
        "a",
        "l/a",
        "/l/../..",
        "l",
        "/a/b",
        "b/../../..",
        "@OUT/new",
        "c1",
        "c1/keep",
    ]);
    (
        (lead, name).prop_map(|(l, n)| format!("{l}{n}")),
        kind,
        link.prop_map(str::to_string),
    )
}

/// A tar with entries written raw (names unchecked, as a hostile layer carries them).
fn raw_tar(entries: &[(String, Kind, String)], outside: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, kind, link) in entries {
        let link = link.replace("@OUT", &outside.display().to_string());
        let (name, ty) = match kind {
            Kind::File => (name.clone(), tar::EntryType::Regular),
            Kind::Dir => (name.clone(), tar::EntryType::Directory),
            Kind::Symlink => (name.clone(), tar::EntryType::Symlink),
            Kind::Hardlink => (name.clone(), tar::EntryType::Link),
            Kind::Fifo => (name.clone(), tar::EntryType::Fifo),
            Kind::Whiteout => {
                let p = Path::new(name);
                let base = p.file_name().map(|n| n.to_string_lossy().into_owned());
                let parent = p
                    .parent()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default();
                let wh = format!(".wh.{}", base.unwrap_or_else(|| "..".into()));
                let full = if parent.is_empty() {
                    wh
                } else {
                    format!("{parent}/{wh}")
                };
                (full, tar::EntryType::Regular)
            }
            Kind::Opaque => (format!("{name}/.wh..wh..opq"), tar::EntryType::Regular),
        };
        if name.len() > 99 || link.len() > 99 {
            continue;
        }
        let data: &[u8] = if ty == tar::EntryType::Regular {
            b"data"
        } else {
            b""
        };
        let mut h = tar::Header::new_gnu();
        h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name.as_bytes());
        h.as_gnu_mut().unwrap().linkname[..link.len()].copy_from_slice(link.as_bytes());
        h.set_mode(0o755);
        h.set_size(data.len() as u64);
        h.set_entry_type(ty);
        h.set_mtime(1_600_000_000);
        h.set_cksum();
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.extend_from_slice(&[0u8; 1024]);
    out
}

/// Everything under `dir` but `skip`: path → (type, mode, size, mtime, content).
fn snapshot(dir: &Path, skip: &Path, out: &mut BTreeMap<PathBuf, String>) {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for p in entries {
        if p == skip {
            continue;
        }
        let m = fs::symlink_metadata(&p).unwrap();
        let content = if m.is_file() {
            fs::read_to_string(&p).unwrap_or_default()
        } else if m.file_type().is_symlink() {
            fs::read_link(&p).unwrap().display().to_string()
        } else {
            String::new()
        };
        out.insert(
            p.clone(),
            format!(
                "{:o} {} {} {} {content}",
                m.mode(),
                m.len(),
                m.mtime(),
                m.nlink()
            ),
        );
        if m.is_dir() {
            snapshot(&p, skip, out);
        }
    }
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn unpacker_never_touches_anything_outside_the_root(
        chain in any::<bool>(),
        lower in prop::collection::vec(entry(), 0..12),
        upper in prop::collection::vec(entry(), 0..12),
    ) {
        // Optionally a chain c1 -> c2 -> ... -> c45 -> the outside directory first (more links
        // than the kernel follows).
        let mut lower = lower;
        if chain {
            let mut links: Vec<(String, Kind, String)> = (1..45)
                .map(|i| (format!("c{i}"), Kind::Symlink, format!("c{}", i + 1)))
                .collect();
            links.push(("c45".into(), Kind::Symlink, "@OUT".into()));
            links.extend(lower);
            lower = links;
        }
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        let outside = tmp.path().join("outside");
        fs::create_dir_all(&root).unwrap();
        fs::create_dir_all(outside.join("sub")).unwrap();
        fs::write(outside.join("keep"), "keep").unwrap();
        fs::write(tmp.path().join("beside"), "beside").unwrap();
        let mut before = BTreeMap::new();
        snapshot(tmp.path(), &root, &mut before);
        for layer in [&lower, &upper] {
            // Errors are fine (hostile entries are refused); escaping is not.
            let _ = apply_layer(&raw_tar(layer, &outside)[..], &root, "sha256:prop", Owners::Ignore);
        }
        let mut after = BTreeMap::new();
        snapshot(tmp.path(), &root, &mut after);
        prop_assert_eq!(before, after);
    }
}
