//! The Dockerfile parser on a set of real-world-style Dockerfiles, and its errors.

use images::dockerfile::{parse, Command, Instruction, Lexer};

fn file(name: &str) -> String {
    let path = format!("{}/tests/dockerfiles/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
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
    let e = parse("FROM a\nLABEL novalue\n").unwrap_err();
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
            flags: Default::default()
        }
    );
}
