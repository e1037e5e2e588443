//! The Dockerfile parser on a set of real-world-style Dockerfiles, and its errors.

use images::dockerfile::{heredoc_word, parse, Command, Heredoc, Instruction, Lexer};

fn file(name: &str) -> String {
    let path = format!("{}/tests/dockerfiles/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(std::string::ToString::to_string).collect()
}

#[test]
fn every_sample_parses() {
    for entry in
        std::fs::read_dir(format!("{}/tests/dockerfiles", env!("CARGO_MANIFEST_DIR"))).unwrap()
    {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let df = parse(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(
            matches!(df.steps[0].instruction, Instruction::From { .. }),
            "{}",
            path.display()
        );
    }
}

#[test]
fn nginx_style_continuations_with_comments_and_blank_lines() {
    let df = parse(&file("nginx.Dockerfile")).unwrap();
    assert_eq!(df.syntax.as_deref(), Some("docker/dockerfile:1"));
    let names: Vec<&str> = df.steps.iter().map(|s| s.instruction.name()).collect();
    assert_eq!(
        names,
        [
            "FROM",
            "LABEL",
            "ENV",
            "ENV",
            "ENV",
            "RUN",
            "COPY",
            "COPY",
            "ENTRYPOINT",
            "EXPOSE",
            "STOPSIGNAL",
            "CMD"
        ]
    );
    let run = &df.steps[5];
    assert_eq!(run.line, 11);
    let Instruction::Run {
        command: Command::Shell(sh),
        ..
    } = &run.instruction
    else {
        panic!("{run:?}")
    };
    assert!(
        sh.starts_with("set -x     && groupadd --system --gid 101 nginx "),
        "{sh}"
    );
    assert!(sh.ends_with("&& rm -rf /var/lib/apt/lists/*"), "{sh}");
    assert!(
        !sh.contains("create nginx user"),
        "comments inside continuations are dropped"
    );
    assert_eq!(
        df.steps[2].instruction,
        Instruction::Env(vec![("NGINX_VERSION".into(), "1.25.3".into())])
    );
    assert_eq!(
        df.steps[11].instruction,
        Instruction::Cmd(Command::Exec(s(&["nginx", "-g", "daemon off;"])))
    );
    assert_eq!(
        df.steps[10].instruction,
        Instruction::StopSignal("SIGQUIT".into())
    );
}

#[test]
fn multi_stage_with_global_args_flags_and_aliases() {
    let df = parse(&file("go-multistage.Dockerfile")).unwrap();
    assert_eq!(
        df.global_args,
        vec![
            ("GO_VERSION".to_string(), Some("1.22".to_string())),
            (
                "BASE".to_string(),
                Some("gcr.io/distroless/static-debian12".to_string())
            )
        ]
    );
    assert_eq!(
        df.steps[0].instruction,
        Instruction::From {
            image: "golang:${GO_VERSION}-bookworm".into(),
            alias: Some("build".into()),
            platform: Some("$BUILDPLATFORM".into()),
        }
    );
    let Instruction::Run { flags, .. } = &df.steps[3].instruction else {
        panic!()
    };
    assert_eq!(flags.get("mount"), Some("type=cache,target=/go/pkg/mod"));
    assert_eq!(
        df.steps[5].instruction,
        Instruction::Arg(vec![("TARGETOS".into(), None), ("TARGETARCH".into(), None)])
    );
    // `as` in lower case, alias normalised.
    let Instruction::From { alias, .. } = &df.steps[7].instruction else {
        panic!()
    };
    assert_eq!(alias.as_deref(), Some("final"));
    let Instruction::Copy {
        add,
        sources,
        dest,
        flags,
        ..
    } = &df.steps[8].instruction
    else {
        panic!()
    };
    assert!(!add);
    assert_eq!((sources.clone(), dest.as_str()), (s(&["/out/app"]), "/app"));
    assert_eq!(flags.get("from"), Some("build"));
    assert_eq!(flags.get("chown"), Some("nonroot:nonroot"));
}

#[test]
fn env_forms_labels_volumes_expose_healthcheck_maintainer() {
    let df = parse(&file("rails.Dockerfile")).unwrap();
    let lexer = Lexer::default();
    let Instruction::Env(pairs) = &df.steps[2].instruction else {
        panic!()
    };
    let expanded: Vec<(String, String)> = pairs
        .iter()
        .map(|(k, v)| (k.clone(), lexer.process_word(v, &Vec::new()).unwrap()))
        .collect();
    assert_eq!(
        expanded,
        vec![
            ("RAILS_ENV".into(), "production".into()),
            ("BUNDLE_WITHOUT".into(), "development test".into()),
            ("LANG".into(), "C.UTF-8".into())
        ]
    );
    assert_eq!(
        df.steps[1].instruction,
        Instruction::Maintainer("Someone <someone@example.com>".into())
    );
    assert_eq!(
        df.steps[9].instruction,
        Instruction::Volume(s(&["/app/log", "/app/tmp"]))
    );
    assert_eq!(
        df.steps[10].instruction,
        Instruction::Expose(s(&["3000/tcp", "3001"]))
    );
    let Instruction::Healthcheck(h) = &df.steps[11].instruction else {
        panic!()
    };
    assert_eq!(h.flags.get("interval"), Some("30s"));
    assert_eq!(
        h.test,
        Some(Command::Shell(
            "curl -f http://localhost:3000/ || exit 1".into()
        ))
    );
    assert_eq!(
        df.steps[12].instruction,
        Instruction::Cmd(Command::Shell("bundle exec puma -C config/puma.rb".into()))
    );
}

#[test]
fn lowercase_instructions_add_onbuild_shell_chmod() {
    let df = parse(&file("node.Dockerfile")).unwrap();
    assert_eq!(
        df.steps[2].instruction,
        Instruction::Env(vec![("HOME".into(), "/home/node".into())])
    );
    let Instruction::Copy { flags, sources, .. } = &df.steps[5].instruction else {
        panic!()
    };
    assert_eq!(flags.get("chmod"), Some("644"));
    assert_eq!(sources, &s(&["package.json", "yarn.lock"]));
    let Instruction::Copy {
        add: true,
        sources,
        dest,
        ..
    } = &df.steps[8].instruction
    else {
        panic!()
    };
    assert_eq!(
        (sources.clone(), dest.as_str()),
        (s(&["https://example.com/config.tar.gz"]), "/tmp/")
    );
    assert_eq!(
        df.steps[10].instruction,
        Instruction::Onbuild("COPY . /home/node/app".into())
    );
    assert_eq!(
        df.steps[11].instruction,
        Instruction::Shell(s(&["/bin/ash", "-eo", "pipefail", "-c"]))
    );
}

#[test]
fn backtick_escape_directive() {
    let df = parse(&file("windows.Dockerfile")).unwrap();
    assert_eq!(df.escape, '`');
    let Instruction::Run {
        command: Command::Shell(sh),
        ..
    } = &df.steps[2].instruction
    else {
        panic!()
    };
    assert_eq!(
        sh,
        "New-Item -ItemType Directory C:\\Example;     Write-Host done"
    );
    let Instruction::Copy { dest, .. } = &df.steps[3].instruction else {
        panic!()
    };
    assert_eq!(dest, "c:\\");
    let Instruction::Healthcheck(h) = &df.steps[5].instruction else {
        panic!()
    };
    assert_eq!(h.test, None);
}

#[test]
fn errors_name_their_line() {
    let e = parse("FROM busybox\nRUN true\n\nINVALIDCOMMAND foo\n").unwrap_err();
    assert_eq!(e.to_string(), "line 4: unknown instruction: INVALIDCOMMAND");
    let e = parse("# comment\nRUN true\n").unwrap_err();
    assert_eq!(
        e.to_string(),
        "line 2: RUN before FROM: the first instruction must be FROM (or ARG)"
    );
    assert_eq!(
        parse("").unwrap_err().to_string(),
        "line 1: the Dockerfile has no FROM instruction"
    );
    let e = parse("FROM a\nSHELL /bin/sh -c\n").unwrap_err();
    assert_eq!(
        e.to_string(),
        "line 2: SHELL requires the arguments to be in JSON form"
    );
    let e = parse("FROM a\nCOPY onlyone\n").unwrap_err();
    assert_eq!(
        e.to_string(),
        "line 2: COPY requires at least two arguments: SRC... DEST"
    );
    let e = parse("FROM a\nCOPY --frm=x a b\n").unwrap_err();
    assert_eq!(e.to_string(), "line 2: unknown flag --frm for COPY");
    let e = parse("FROM a b c d\n").unwrap_err();
    assert_eq!(e.to_string(), "line 1: FROM takes IMAGE [AS NAME]");
    let e = parse("FROM a\nENV\n").unwrap_err();
    assert_eq!(e.to_string(), "line 2: ENV requires at least one argument");
    let e = parse("FROM a\nLABEL a=1 novalue\n").unwrap_err();
    assert_eq!(
        e.to_string(),
        "line 2: LABEL expects key=value, got \"novalue\""
    );
    let e = parse("FROM a\nENV A=\"unterminated\n").unwrap_err();
    assert!(
        e.to_string().starts_with("line 2: unterminated \" quote"),
        "{e}"
    );
    let e = parse("# escape=x\nFROM a\n").unwrap_err();
    assert_eq!(
        e.to_string(),
        "line 1: invalid escape token \"x\": must be ` or \\"
    );
    let e = parse("FROM a\nONBUILD FROM b\n").unwrap_err();
    assert_eq!(
        e.to_string(),
        "line 2: FROM isn't allowed as an ONBUILD trigger"
    );
    let e = parse("FROM a\nRUN \\\n  \\\n").unwrap_err();
    assert_eq!(e.to_string(), "line 2: RUN requires a command");
}

#[test]
fn directives_only_at_the_top() {
    // After an instruction, `# escape=` is a plain comment.
    let df = parse("FROM a\n# escape=`\nRUN echo \\\n  hi\n").unwrap();
    assert_eq!(df.escape, '\\');
    assert_eq!(
        df.steps[1].instruction,
        Instruction::Run {
            command: Command::Shell("echo   hi".into()),
            flags: Default::default(),
            heredocs: Vec::new(),
        }
    );
}

fn heredoc(name: &str, content: &str, expand: bool, chomp: bool) -> Heredoc {
    Heredoc {
        name: name.into(),
        content: content.into(),
        expand,
        chomp,
    }
}

#[test]
fn heredocs_for_run_copy_and_add() {
    let text = "FROM busybox\n\
RUN <<EOF\n\
set -e\n\
# a comment stays in the script\n\
echo hi \\\n\
EOF\n\
RUN <<-'SCRIPT' \n\
\t#!/bin/sh\n\
\techo \"$HOME\"\n\
\t\tSCRIPT\n\
RUN cat <<A >/a && \\\n\
    cat <<\"B\" >/b\n\
first\n\
A\n\
second $x\n\
B\n\
COPY --chmod=600 <<conf.ini <<'raw.txt' /etc/app/\n\
name=$NAME\n\
conf.ini\n\
keep $NAME\n\
raw.txt\n\
ADD <<EOF /greeting\n\
hello\n\
EOF\n\
CMD [\"true\"]\n";
    let df = parse(text).unwrap();
    let names: Vec<&str> = df.steps.iter().map(|s| s.instruction.name()).collect();
    assert_eq!(names, ["FROM", "RUN", "RUN", "RUN", "COPY", "ADD", "CMD"]);
    assert_eq!(
        df.steps.iter().map(|s| s.line).collect::<Vec<_>>(),
        [1, 2, 7, 11, 17, 22, 25]
    );
    assert_eq!(
        df.steps[1].instruction,
        Instruction::Run {
            command: Command::Shell("<<EOF".into()),
            flags: Default::default(),
            heredocs: vec![heredoc(
                "EOF",
                "set -e\n# a comment stays in the script\necho hi \\\n",
                true,
                false
            )],
        }
    );
    let Instruction::Run { heredocs, .. } = &df.steps[2].instruction else {
        panic!()
    };
    assert_eq!(
        heredocs,
        &[heredoc(
            "SCRIPT",
            "\t#!/bin/sh\n\techo \"$HOME\"\n",
            false,
            true
        )]
    );
    assert_eq!(heredocs[0].body(), "#!/bin/sh\necho \"$HOME\"\n");
    let Instruction::Run {
        command, heredocs, ..
    } = &df.steps[3].instruction
    else {
        panic!()
    };
    assert_eq!(
        command,
        &Command::Shell("cat <<A >/a && cat <<\"B\" >/b".into())
    );
    assert_eq!(
        heredocs,
        &[
            heredoc("A", "first\n", true, false),
            heredoc("B", "second $x\n", false, false)
        ]
    );
    assert_eq!(
        df.steps[4].instruction,
        Instruction::Copy {
            add: false,
            sources: vec![],
            dest: "/etc/app/".into(),
            flags: images::dockerfile::Flags(vec![("chmod".into(), Some("600".into()))]),
            heredocs: vec![
                heredoc("conf.ini", "name=$NAME\n", true, false),
                heredoc("raw.txt", "keep $NAME\n", false, false)
            ],
        }
    );
    let Instruction::Copy {
        add: true,
        heredocs,
        sources,
        ..
    } = &df.steps[5].instruction
    else {
        panic!()
    };
    assert!(sources.is_empty());
    assert_eq!(heredocs, &[heredoc("EOF", "hello\n", true, false)]);
}

#[test]
fn heredoc_words_as_buildkit_reads_them() {
    assert_eq!(heredoc_word("<<EOF"), Some(("EOF".into(), true, false)));
    assert_eq!(heredoc_word("<<-EOF"), Some(("EOF".into(), true, true)));
    assert_eq!(heredoc_word("<<'EOF'"), Some(("EOF".into(), false, false)));
    assert_eq!(
        heredoc_word("<<-\"E F\""),
        Some(("E F".into(), false, true))
    );
    assert_eq!(heredoc_word("3<<IN"), Some(("IN".into(), true, false)));
    for not in ["<<<EOF", "a<<EOF", "\"<<EOF\"", "<<", "<<-", "<EOF", "EOF"] {
        assert_eq!(heredoc_word(not), None, "{not}");
    }
    // Not heredocs: inside quotes, a here-string, the exec form.
    let df = parse(
        "FROM a\nRUN echo \"<<EOF\" '<<X'\nRUN cat <<<word\nRUN [\"sh\", \"-c\", \"cat <<EOF\"]\nCOPY a b\n",
    )
    .unwrap();
    for step in &df.steps[1..4] {
        let Instruction::Run { heredocs, .. } = &step.instruction else {
            panic!("{step:?}")
        };
        assert!(heredocs.is_empty(), "{step:?}");
    }
    assert_eq!(df.steps.len(), 5);
}

#[test]
fn heredoc_errors_and_onbuild() {
    let e = parse("FROM a\nRUN <<EOF\necho never ends\n").unwrap_err();
    assert_eq!(
        e.to_string(),
        "line 2: unterminated heredoc <<EOF: no line \"EOF\" ends it"
    );
    // The delimiter must be alone on its line (no spaces), tabs only with <<-.
    let e = parse("FROM a\nRUN <<EOF\nx\nEOF \n\tEOF\n").unwrap_err();
    assert!(
        e.to_string().starts_with("line 2: unterminated heredoc"),
        "{e}"
    );
    let e = parse("FROM a\nCOPY <<EOF <<X\nx\nEOF\ny\nX\n").unwrap_err();
    assert_eq!(
        e.to_string(),
        "line 2: COPY: a heredoc cannot be the destination (<<X)"
    );
    let df = parse("FROM a\nONBUILD RUN <<EOF\necho built\nEOF\nRUN true\n").unwrap();
    assert_eq!(
        df.steps[1].instruction,
        Instruction::Onbuild("RUN <<EOF\necho built\nEOF".into())
    );
    assert_eq!(df.steps[2].line, 5);
    // The stored trigger parses again with its heredoc.
    let again = parse(&format!("FROM b\n{}\n", "RUN <<EOF\necho built\nEOF")).unwrap();
    let Instruction::Run { heredocs, .. } = &again.steps[1].instruction else {
        panic!()
    };
    assert_eq!(heredocs[0].content, "echo built\n");
}

#[test]
fn every_flag_is_known_and_supported_or_an_error() {
    let ok = parse(
        "FROM --platform=linux/amd64 a\n\
         RUN --network=none --security=sandbox --mount=type=cache,target=/c --mount=type=tmpfs,target=/t true\n\
         COPY --from=a --chown=1:1 --chmod=644 --link --parents=true x /y/\n\
         ADD --checksum=sha256:abc --link=false --chown=1 --chmod=600 http://e/x /y\n\
         HEALTHCHECK --interval=5s --timeout=3s --start-period=1s --start-interval=1s --retries=3 CMD true\n",
    )
    .unwrap();
    let Instruction::Copy { flags, .. } = &ok.steps[2].instruction else {
        panic!()
    };
    assert!(flags.enabled("link") && flags.enabled("parents"));
    let Instruction::Copy { flags, .. } = &ok.steps[3].instruction else {
        panic!()
    };
    assert!(!flags.enabled("link"));
    let Instruction::Run { flags, .. } = &ok.steps[1].instruction else {
        panic!()
    };
    assert_eq!(flags.0.iter().filter(|(k, _)| k == "mount").count(), 2);
    for (text, message) in [
        ("FROM --plat=x a\n", "line 1: unknown flag --plat for FROM"),
        ("FROM --platform a\n", "line 1: FROM --platform needs a value (--platform=...)"),
        ("FROM a\nRUN --foo true\n", "line 2: unknown flag --foo for RUN"),
        (
            "FROM a\nRUN --device=/dev/fuse true\n",
            "line 2: RUN --device is not supported by mistry (RUN steps see only the sandbox's own devices)",
        ),
        ("FROM a\nRUN --network=none --network=host true\n", "line 2: RUN --network is given twice"),
        (
            "FROM a\nCOPY --exclude=*.md . /app\n",
            "line 2: COPY --exclude is not supported by mistry (use .dockerignore)",
        ),
        ("FROM a\nCOPY --checksum=sha256:x a b\n", "line 2: unknown flag --checksum for COPY"),
        ("FROM a\nCOPY --link=maybe a b\n", "line 2: COPY --link=maybe: expected true or false"),
        ("FROM a\nCOPY --from a b\n", "line 2: COPY --from needs a value (--from=...)"),
        (
            "FROM a\nADD --keep-git-dir=true https://github.com/x/y.git /src\n",
            "line 2: ADD --keep-git-dir is not supported by mistry (git sources are not supported: clone into the build context instead)",
        ),
        ("FROM a\nADD --parents a b\n", "line 2: unknown flag --parents for ADD"),
        ("FROM a\nADD --from=x a b\n", "line 2: unknown flag --from for ADD"),
        (
            "FROM a\nHEALTHCHECK --interva=1s CMD true\n",
            "line 2: unknown flag --interva for HEALTHCHECK",
        ),
    ] {
        assert_eq!(parse(text).unwrap_err().to_string(), message, "{text}");
    }
}

#[test]
fn heredoc_words_as_buildkit_tests_them() {
    // Adapted from BuildKit's TestParseHeredocHelpers, frontend/dockerfile/parser/
    // parser_heredoc_test.go (github.com/moby/buildkit, Apache-2.0).
    for valid in [
        "<<EOF",
        "<<'EOF'",
        "<<\"EOF\"",
        "<<-EOF",
        "<<-'EOF'",
        "<<-\"EOF\"",
        "<<EO\"F\"",
    ] {
        assert_eq!(
            heredoc_word(valid).map(|h| h.0),
            Some("EOF".into()),
            "{valid}"
        );
    }
    // BuildKit reads these as heredocs too (spaces after `<<`): mistry does not (see the golden
    // case heredoc-space-after-marker).
    for spaced in ["<< EOF", "<<- EOF"] {
        assert_eq!(heredoc_word(spaced), None, "{spaced}");
    }
    // BuildKit: an error when looked at alone; on a line, the line's words do not split, so
    // there is no heredoc either way.
    for unterminated in ["<<'EOF", "<<\"EOF", "<<EOF'", "<<EOF\""] {
        assert_eq!(heredoc_word(unterminated), None, "{unterminated}");
    }
    for not in [
        "", "EOF", "<<", "<<-", "<EOF", "<<<EOF", "<<EOF sh", "<<\"\"", "<<''",
    ] {
        assert_eq!(heredoc_word(not), None, "{not}");
    }
    assert_eq!(
        heredoc_word("<<\"a\\\"b\\\\c\\$d\\e\""),
        Some(("a\"b\\c$d\\e".into(), false, false))
    );
    assert_eq!(heredoc_word("<<a\\ b"), Some(("a b".into(), true, false)));
    assert_eq!(heredoc_word("<<EOF\\"), Some(("EOF\\".into(), true, false)));
    assert_eq!(heredoc_word("12<<-X"), Some(("X".into(), true, true)));
}
