//! The `mistry` binary end to end, against fake servers: its help and version, the request it
//! sends, its messages and exit codes, the http transport. (The client against a real mistryd,
//! with every transport, is in the `mistry` package's tests/server.rs.)
//!
//! `MISTRY_CLIENT_BIN` names the binary when the tests run as another user (scripts/test.sh).

mod common;

use std::os::fd::{AsRawFd, OwnedFd};
use std::process::Output;

use common::{fake_server, mistry, read, tar_of, text, Request};
use serde_json::Value;

fn run(args: &[&str]) -> Output {
    mistry().args(args).output().expect("running mistry")
}

/// A loopback port nothing listens on (bound, not listening, held while the fd lives).
fn closed_port() -> (OwnedFd, u16) {
    use nix::sys::socket::{
        bind, getsockname, socket, AddressFamily, SockFlag, SockType, SockaddrIn,
    };
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    bind(fd.as_raw_fd(), &SockaddrIn::new(127, 0, 0, 1, 0)).unwrap();
    let addr: SockaddrIn = getsockname(fd.as_raw_fd()).unwrap();
    (fd, addr.port())
}

fn build(port: u16, args: &[&str]) -> Output {
    mistry()
        .args(["build", "--host", "127.0.0.1", "--port", &port.to_string()])
        .args(args)
        .output()
        .expect("running mistry")
}

#[test]
fn help_version_and_completions() {
    let out = run(&["--version"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        text(&out.stdout),
        format!("mistry {}\n", env!("CARGO_PKG_VERSION"))
    );
    let out = run(&["--help"]);
    assert_eq!(out.status.code(), Some(0));
    let help = text(&out.stdout);
    assert!(
        help.starts_with("Client of the mistry build server\n"),
        "{help}"
    );
    assert!(
        help.contains("  build        Build a project on the server and fetch its artifacts"),
        "{help}"
    );
    assert!(
        help.contains("  completions  Print a shell completion script"),
        "{help}"
    );
    // mistry's flags, short forms and defaults.
    let out = run(&["build", "-h"]);
    assert_eq!(out.status.code(), Some(0));
    let help = text(&out.stdout);
    for flag in [
        "Usage: mistry build [OPTIONS] --project <PROJECT> [-- <PARAMS>...]",
        "--host <HOST>",
        "[default: 0.0.0.0]",
        "-p, --port <PORT>",
        "[default: 8462]",
        "--project <PROJECT>",
        "-g, --group <GROUP>",
        "-v, --verbose",
        "--json-result",
        "--rebuild",
        "--timeout <TIMEOUT>",
        "[default: 60m]",
        "--no-wait",
        "--transport <TRANSPORT>",
        "[default: http] [possible values: scp, rsync, http]",
        "--transport-user <TRANSPORT_USER>",
        "--transport-port <TRANSPORT_PORT>",
        "--ssh-config <SSH_CONFIG>",
        "-t, --target <TARGET>",
        "[default: .]",
        "--clear-target",
        "[PARAMS]...",
    ] {
        assert!(help.contains(flag), "{flag} missing from:\n{help}");
    }
    for (shell, marker) in [
        ("bash", "_mistry()"),
        ("zsh", "#compdef mistry"),
        ("fish", "complete -c mistry"),
    ] {
        let out = run(&["completions", shell]);
        assert_eq!(out.status.code(), Some(0));
        assert!(text(&out.stdout).contains(marker), "{shell}");
    }
}

#[test]
fn usage_errors_exit_1() {
    // As mistry's client: every failure exits 1, usage errors too (clap's own code is 2). No
    // project; a bad duration; an unknown transport; an unknown flag; no command; an exec
    // without a project directory for --project; an unknown subcommand.
    for args in [
        &["build"][..],
        &["build", "--project", "p", "--timeout", "5x"],
        &["build", "--project", "p", "--transport", "ftp"],
        &["build", "--project", "p", "--bogus"],
        &[],
        &["exec", "--project", "p"],
        &["frobnicate"],
    ] {
        let out = run(args);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }
    let out = run(&["build", "--project", "p", "--timeout", "5x"]);
    assert!(
        text(&out.stderr).contains("invalid duration \"5x\" (examples: 500ms, 30s, 1h30m)"),
        "{}",
        text(&out.stderr)
    ); // Help and the version are no failures: exit 0, on stdout.
    for args in [
        &["--help"][..],
        &["build", "--help"],
        &["--version"],
        &["exec", "-h"],
    ] {
        let out = run(args);
        assert_eq!(out.status.code(), Some(0), "{args:?}");
        assert!(!out.stdout.is_empty(), "{args:?}");
    }
}

/// Params are checked before anything is sent: nothing listens on the port.
#[test]
fn bad_params_and_target_exit_1_before_connecting() {
    let (_held, port) = closed_port();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("file");
    std::fs::write(&file, "x").unwrap();
    for (params, err) in [
        (
            &["bare"][..],
            "invalid job param \"bare\": expected --name=value or --name value\n".to_string(),
        ),
        (
            &["--dangling"],
            "job param --dangling has no value\n".into(),
        ),
        (&["--=x"], "invalid job param \"--=x\": empty name\n".into()),
        (
            &["--f=@/nonexistent"],
            "reading the value of --f from /nonexistent: No such file or directory (os error 2)\n"
                .into(),
        ),
    ] {
        let mut args = vec!["--project", "p", "--"];
        args.extend_from_slice(params);
        let out = build(port, &args);
        assert_eq!(
            (out.status.code(), text(&out.stderr)),
            (Some(1), err),
            "{params:?}"
        );
        assert_eq!(text(&out.stdout), "");
    }
    let out = build(port, &["--project", "p", "-t", file.to_str().unwrap()]);
    assert_eq!(
        (out.status.code(), text(&out.stderr)),
        (Some(1), format!("target {} is a file\n", file.display()))
    );
}

#[test]
fn an_unreachable_server_is_one_line_and_exit_1() {
    let (_held, port) = closed_port();
    let dir = tempfile::tempdir().unwrap();
    let out = build(
        port,
        &["--project", "p", "-t", dir.path().to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.starts_with(&format!(
            "cannot reach the mistry server at http://127.0.0.1:{port}: "
        )),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}

/// The JobRequest: project, group, params (also from a file), rebuild; `?async` with --no-wait,
/// which prints nothing and creates no target.
#[test]
fn the_request_carries_project_group_params_and_rebuild() {
    let dir = tempfile::tempdir().unwrap();
    let lock = dir.path().join("Gemfile.lock");
    std::fs::write(&lock, "GEM\n  rake\n").unwrap();
    let target = dir.path().join("never");
    let (port, server) = fake_server(vec![(201, "text/plain", Vec::new())]);
    let at_lock = format!("--lock=@{}", lock.display());
    let out = build(
        port,
        &[
            "--project",
            "app",
            "-g",
            "grp",
            "--rebuild",
            "--no-wait",
            "-t",
            target.to_str().unwrap(),
            "--",
            "--a=1",
            "--b",
            "two words",
            &at_lock,
            "--_opaque=x",
        ],
    );
    assert_eq!(
        (out.status.code(), text(&out.stdout), text(&out.stderr)),
        (Some(0), String::new(), String::new())
    );
    let seen = server.join().unwrap();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].line, "POST /jobs?async HTTP/1.1");
    let body: Value = serde_json::from_str(&seen[0].body).unwrap();
    assert_eq!(
        body,
        serde_json::json!({
            "project": "app",
            "group": "grp",
            "rebuild": true,
            "params": {"a": "1", "b": "two words", "lock": "GEM\n  rake\n", "_opaque": "x"},
        })
    );
    assert!(!target.exists());
}

/// The server's answers become mistry's messages and exit codes.
#[test]
fn server_answers_become_messages_and_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path().to_str().unwrap();
    let cases: Vec<(u16, Vec<u8>, &str)> = vec![
        (503, b"Server is overloaded; try again later".to_vec(), "Server is overloaded; try again later\n"),
        (404, b"Unknown project 'p'".to_vec(), "Unknown project 'p'\n"),
        (
            201,
            br#"{"ExitCode": 3, "URL": "job/p/1", "ContainerStderr": "err: x"}"#.to_vec(),
            "Container error logs:\nerr: x\nBuild failed with exit code 3\n",
        ),
        (
            201,
            br#"{"ExitCode": -999, "URL": "job/p/1", "ContainerStderr": ""}"#.to_vec(),
            "Container error logs:\nThere are no container error logs.\nBuild failed with exit code -999\n",
        ),
        (
            201,
            br#"{"ExitCode": 0, "URL": "job/p/1", "ErrBuild": "the job replaced /data/artifacts with a symlink; its artifacts are not served"}"#.to_vec(),
            "Build failed: the job replaced /data/artifacts with a symlink; its artifacts are not served\n",
        ),
    ];
    for (status, answer, err) in cases {
        let (port, server) = fake_server(vec![(status, "application/json", answer)]);
        let out = build(port, &["--project", "p", "-t", t]);
        assert_eq!(
            (out.status.code(), text(&out.stderr)),
            (Some(1), err.to_string()),
            "{status}"
        );
        let stdout = text(&out.stdout);
        if status == 201 {
            assert_eq!(
                stdout,
                format!("Logs can be found at http://127.0.0.1:{port}/job/p/1\n")
            );
        } else {
            assert_eq!(stdout, "");
        }
        assert_eq!(server.join().unwrap()[0].line, "POST /jobs HTTP/1.1");
    }
}

/// The http transport: the artifacts of the job the answer names, unpacked into the target
/// (created; emptied first with --clear-target), modes and times kept.
#[test]
fn http_transport_unpacks_the_artifacts_into_the_target() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("a/b");
    let info = br#"{"ExitCode": 0, "URL": "job/app/0123abcd", "Path": "/x/app/ready/0123abcd/data/artifacts"}"#;
    let fetch = |extra: &[&str]| -> (Output, Vec<Request>) {
        let (port, server) = fake_server(vec![
            (201, "application/json", info.to_vec()),
            (
                200,
                "application/x-tar",
                tar_of(&[("out.txt", "artifact\n"), ("sub/deep.txt", "deep\n")]),
            ),
        ]);
        let mut args = vec!["--project", "app", "-t", target.to_str().unwrap()];
        args.extend_from_slice(extra);
        let out = build(port, &args);
        (out, server.join().unwrap())
    };
    let (out, seen) = fetch(&[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(seen[1].line, "GET /artifacts/app/0123abcd HTTP/1.1");
    assert_eq!(read(&target.join("out.txt")), "artifact\n");
    assert_eq!(read(&target.join("sub/deep.txt")), "deep\n");
    let meta = std::fs::metadata(target.join("out.txt")).unwrap();
    assert_eq!((meta.mode() & 0o777, meta.mtime()), (0o640, 1_000_000_000));
    // Without --clear-target what was there stays; with it, it goes.
    std::fs::write(target.join("stale"), "x").unwrap();
    let (out, _) = fetch(&[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(target.join("stale").exists());
    let (out, _) = fetch(&["--clear-target"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(!target.join("stale").exists());
    assert_eq!(read(&target.join("out.txt")), "artifact\n");
}

/// Issue 20, class 8: a server (an older or a hostile one) that sends set-uid and set-gid
/// entries: the client, run as root or not, unpacks none of those bits (the rest of the modes
/// as sent).
#[test]
fn http_transport_unpacks_no_set_id_bits() {
    use std::os::unix::fs::PermissionsExt;
    let mut b = tar::Builder::new(Vec::new());
    for (name, kind, mode) in [
        ("sgid-dir", tar::EntryType::Directory, 0o2775),
        ("sgid-dir/both", tar::EntryType::Regular, 0o6711),
        ("suid", tar::EntryType::Regular, 0o4755),
        ("sticky", tar::EntryType::Directory, 0o1777),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(0);
        h.set_mode(mode);
        h.set_mtime(1_000_000_000);
        b.append_data(&mut h, name, std::io::empty()).unwrap();
    }
    let tar = b.into_inner().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("t");
    let info = br#"{"ExitCode": 0, "URL": "job/app/0123abcd", "Path": "/x/app/ready/0123abcd/data/artifacts"}"#;
    let (port, server) = fake_server(vec![
        (201, "application/json", info.to_vec()),
        (200, "application/x-tar", tar),
    ]);
    let out = build(port, &["--project", "app", "-t", target.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    server.join().unwrap();
    let mode = |name: &str| {
        std::fs::symlink_metadata(target.join(name))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    };
    assert_eq!(
        [
            mode("sgid-dir"),
            mode("sgid-dir/both"),
            mode("suid"),
            mode("sticky")
        ],
        [0o775, 0o711, 0o755, 0o1777]
    );
}
