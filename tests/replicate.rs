//! Builds replicate between agents (src/cluster/copies.rs): `GET /api/build/...` on the
//! holder, `fetch_build` on the agent that needs it; no database involved. Then the fetching
//! agent answers for the build as if it had run it (cache hit, artifacts by HTTP and rsync, the
//! group's next incremental build), and a hostile agent's stream is refused whole.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::mistry_client_bin;
use common::server::{
    artifacts, check_artifact_contents, get_bytes, job_id, read, rsync_daemon, Server,
};
use mistry::cluster::copies::{fetch_build, ReplicateError};
use mistry::engine::import::Importer;
use mistry::engine::{JobDir, Layout};
use serde_json::{json, Value};

fn fetch(
    agent: &str,
    build_path: &Path,
    project: &str,
    id: &str,
    with_cache: bool,
) -> Result<JobDir, ReplicateError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(fetch_build(
        agent,
        &Importer::detached(Layout::new(build_path)),
        project,
        id,
        with_cache,
    ))
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The artifacts project's tree, as every transport must deliver it.
fn check_artifacts(target: &Path) {
    check_artifact_contents(target);
    assert_eq!(
        std::fs::read_link(target.join("link-to-dir")).unwrap(),
        Path::new("dir with spaces")
    );
    assert_eq!(
        std::fs::read_link(target.join("link-to-file")).unwrap(),
        Path::new("deep/a/b/c/leaf")
    );
    assert_eq!(read(target.join("link-to-file")), "deep\n");
}

#[test]
fn a_build_fetched_from_another_agent_is_a_cache_hit_with_the_same_artifacts() {
    let a = Server::start(json!({}));
    let b = Server::start(json!({}));
    let request = json!({"project": "artifacts", "params": {"name": "replicated"}});
    let info_a = a.job(request.clone());
    assert_eq!(info_a["ExitCode"], 0, "{info_a}");
    let id = job_id(&info_a);

    // Not there: 404 from the route, NotFound from fetch_build, nothing left behind.
    let (status, body) = get_bytes(&a, "/api/build/artifacts/0123abcd");
    assert_eq!(
        (status, String::from_utf8_lossy(&body).as_ref()),
        (404, "Build artifacts/0123abcd is not ready on this agent")
    );
    let (status, _) = get_bytes(&a, "/api/build/artifacts/..");
    assert_ne!(status, 200);
    let agent = format!("http://{}", a.addr);
    match fetch(&agent, &b.builds(), "artifacts", "0123abcd", false) {
        Err(e @ ReplicateError::NotFound { .. }) => assert_eq!(
            e.to_string(),
            format!(
                "build artifacts/0123abcd is not available from {agent}: Build \
                 artifacts/0123abcd is not ready on this agent"
            )
        ),
        other => panic!("{other:?}"),
    }
    // A name that is not valid is refused before anything is asked.
    match fetch(&agent, &b.builds(), "artifacts", "../x", false) {
        Err(e @ ReplicateError::BadName { .. }) => assert_eq!(
            e.to_string(),
            format!(
                "not fetching build artifacts/../x from {agent}: invalid job name \"../x\": \
                 must not start with '.'"
            )
        ),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        names_in(&b.builds().join("artifacts/pending")),
        Vec::<String>::new()
    );

    let dir = fetch(&agent, &b.builds(), "artifacts", &id, false).unwrap();
    assert_eq!(dir.path(), b.builds().join("artifacts/ready").join(&id));
    assert_eq!(
        names_in(&b.builds().join("artifacts/pending")),
        Vec::<String>::new()
    );
    assert!(
        !dir.data().join("cache").exists(),
        "fetched without its cache"
    );
    // The stored BuildInfo is A's, with B's Path.
    let stored: Value = serde_json::from_str(&read(dir.path().join("build_info.json"))).unwrap();
    let mut expected = info_a.clone();
    let obj = expected.as_object_mut().unwrap();
    obj.remove("ContainerStdouterr");
    obj.remove("ContainerStderr");
    obj.insert(
        "Path".into(),
        dir.data().join("artifacts").display().to_string().into(),
    );
    assert_eq!(stored, expected);
    assert_eq!(
        read(dir.path().join("out.log")),
        read(artifacts(&info_a).join("../../out.log"))
    );

    // B answers the same request from its result cache, with the same job and logs.
    let info_b = b.job(request.clone());
    assert_eq!(info_b["Cached"], true, "{info_b}");
    assert_eq!(info_b["URL"], info_a["URL"]);
    assert_eq!(info_b["Params"], info_a["Params"]);
    assert_eq!(info_b["StartedAt"], info_a["StartedAt"]);
    assert_eq!(info_b["ContainerStdouterr"], info_a["ContainerStdouterr"]);
    assert_eq!(artifacts(&info_b), dir.data().join("artifacts"));
    check_artifacts(&artifacts(&info_b));

    // GET /artifacts: the same tar stream, byte for byte (names, modes, times, links).
    let path = format!("/artifacts/artifacts/{id}");
    let (sa, tar_a) = get_bytes(&a, &path);
    let (sb, tar_b) = get_bytes(&b, &path);
    assert_eq!((sa, sb), (200, 200));
    assert!(tar_a.len() > 20 << 20);
    assert!(tar_a == tar_b, "the artifacts served by B differ from A's");
    let unpacked = b.dir.path().join("from-http");
    std::fs::create_dir(&unpacked).unwrap();
    tar::Archive::new(&tar_b[..]).unpack(&unpacked).unwrap();
    check_artifacts(&unpacked);

    // The rsync transport from B (an rsync daemon rooted at B's build_path), as the client does.
    let daemon = rsync_daemon(&b);
    let target = b.dir.path().join("from-rsync");
    std::fs::create_dir(&target).unwrap();
    let port = b.addr.rsplit(':').next().unwrap().to_string();
    let out = Command::new(mistry_client_bin())
        .args(["build", "--host", "127.0.0.1", "--port", &port])
        .args(["--project", "artifacts", "--transport", "rsync"])
        .args(["--transport-port", &daemon.port.to_string(), "-t"])
        .arg(&target)
        .args(["--", "--name=replicated"])
        .output()
        .unwrap();
    drop(daemon);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    check_artifacts(&target);

    // A failed build replicates too: its BuildInfo is a result B shows (and B re-runs it when
    // asked, as it would its own failed build).
    let failed = a.job(json!({"project": "failing"}));
    assert_eq!(failed["ExitCode"], 127, "{failed}");
    let fid = job_id(&failed);
    let fdir = fetch(&agent, &b.builds(), "failing", &fid, true).unwrap();
    let (status, text) = b.get(&format!("/job/failing/{fid}"), true);
    assert_eq!(status, 200, "{text}");
    let shown: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(shown["buildInfo"]["ExitCode"], 127);
    assert_eq!(
        shown["buildInfo"]["ContainerStderr"],
        failed["ContainerStderr"]
    );
    assert!(
        !b.builds().join("failing/latest").exists(),
        "a failed build is no group start"
    );
    assert!(fdir.data().join("artifacts").is_dir());

    // Fetching again: the build there wins, nothing is downloaded.
    let again = fetch(&agent, &b.builds(), "artifacts", &id, true).unwrap();
    assert_eq!(again, dir);
    assert!(!dir.data().join("cache").exists());
}

#[test]
fn a_group_continues_incrementally_on_the_agent_that_fetched_its_last_build_with_its_cache() {
    let a = Server::start(json!({}));
    let b = Server::start(json!({}));
    let job = |s: &Server, name: &str| {
        let info = s.job(json!({"project": "simple", "group": "g", "params": {"name": name}}));
        assert_eq!(info["ExitCode"], 0, "{info}");
        info
    };
    job(&a, "one");
    let second = job(&a, "two");
    assert_eq!(read(artifacts(&second).join("count.txt")), "2\n");
    let id = job_id(&second);
    let build_a = a.builds().join("simple/ready").join(&id);
    let layered = build_a.join("cache-layers").exists()
        && !read(build_a.join("cache-layers")).trim().is_empty();
    let agent = format!("http://{}", a.addr);
    let dir = fetch(&agent, &b.builds(), "simple", &id, true).unwrap();
    // The cache arrives as one complete tree: no layers, no squashed copy, just data/cache.
    assert_eq!(read(dir.data().join("cache/count")), "2\n");
    let mut top = names_in(dir.path());
    top.retain(|n| n != "stderr.log");
    assert_eq!(top, ["build_info.json", "data", "out.log"]);
    assert_eq!(names_in(&dir.data()), ["artifacts", "cache", "params"]);
    assert_eq!(read(dir.params().join("name")), "two");
    if layered {
        // A merged its layers to send them (and keeps the squashed copy for its next build).
        assert!(build_a.join("cache-flat/count").is_file());
    }
    // It is the group's last build on B now.
    assert_eq!(
        std::fs::canonicalize(b.builds().join("simple/groups/g")).unwrap(),
        std::fs::canonicalize(dir.path()).unwrap()
    );

    // The group's next build on B continues from A's cache.
    let third = job(&b, "three");
    assert_eq!(third["Incremental"], true, "{third}");
    assert_eq!(third["Cached"], false);
    assert_eq!(read(artifacts(&third).join("count.txt")), "3\n");
    assert!(artifacts(&third).starts_with(b.builds()));
    let fourth = job(&b, "four");
    assert_eq!(read(artifacts(&fourth).join("count.txt")), "4\n");
    // The first build is still A's alone: B never saw it.
    assert_eq!(names_in(&b.builds().join("simple/ready")).len(), 3);
}

// ---- A hostile agent ----

/// A tar header for `name`, written raw (the tar crate refuses to write `..` and absolute
/// names, which is what this test needs).
fn raw_header(name: &str, kind: tar::EntryType, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name.as_bytes());
    h.set_entry_type(kind);
    h.set_mode(if kind == tar::EntryType::Directory {
        0o755
    } else {
        0o644
    });
    h.set_size(size);
    h.set_mtime(1_700_000_000);
    h
}

/// Appends one raw entry.
fn raw(out: &mut Vec<u8>, name: &str, kind: tar::EntryType, data: &[u8]) {
    let mut h = raw_header(name, kind, data.len() as u64);
    h.set_cksum();
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(data);
    let pad = (512 - data.len() % 512) % 512;
    out.extend(std::iter::repeat_n(0u8, pad));
}

fn info_json(project: &str, id: &str) -> Vec<u8> {
    json!({
        "Params": {"name": "x"}, "Group": "", "Path": format!("/elsewhere/{project}/ready/{id}/data/artifacts"),
        "Cached": false, "Coalesced": false, "Incremental": false, "ExitCode": 0, "ErrBuild": "",
        "TransportMethod": "rsync", "StartedAt": "2024-01-01T00:00:00Z", "Duration": 1,
        "URL": format!("job/{project}/{id}"),
    })
    .to_string()
    .into_bytes()
}

/// A build's stream with `middle` (raw entries) between its directories and its BuildInfo.
fn build_tar(project: &str, id: &str, middle: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    use tar::EntryType::{Directory, Regular};
    let mut t = Vec::new();
    raw(&mut t, "data", Directory, b"");
    raw(&mut t, "data/params", Directory, b"");
    raw(&mut t, "data/params/name", Regular, b"x");
    raw(&mut t, "data/artifacts", Directory, b"");
    raw(&mut t, "data/artifacts/ok.txt", Regular, b"ok\n");
    middle(&mut t);
    raw(&mut t, "out.log", Regular, b"log\n");
    raw(&mut t, "build_info.json", Regular, &info_json(project, id));
    t.extend_from_slice(&[0u8; 1024]);
    t
}

/// An HTTP server that answers every request with `body` as a 200 tar stream.
fn fake_agent(body: Vec<u8>) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                if conn.read(&mut byte).unwrap_or(0) == 0 {
                    break;
                }
                head.push(byte[0]);
            }
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Type: application/x-tar\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = conn.write_all(&body);
        }
    });
    format!("http://{addr}")
}

#[test]
fn a_hostile_agents_build_is_refused_whole() {
    use tar::EntryType::{Char, Regular, Symlink};
    let dir = tempfile::Builder::new()
        .prefix("mistry-replicate")
        .tempdir()
        .unwrap();
    let builds = dir.path().join("builds");
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let (project, id) = ("simple", "4f2a");
    let abs = outside.join("abs.txt").display().to_string();
    let link_target = outside.display().to_string();
    type Case = (&'static str, Vec<u8>, String);
    let cases: Vec<Case> = vec![
        (
            "dot-dot",
            build_tar(project, id, |t| {
                raw(t, "data/artifacts/../../../../escaped", Regular, b"x");
            }),
            "entry \"data/artifacts/../../../../escaped\": not a plain relative name \
             (absolute, `.` or `..`)"
                .into(),
        ),
        (
            "absolute",
            build_tar(project, id, |t| raw(t, &abs, Regular, b"x")),
            format!("entry {abs:?}: not a plain relative name (absolute, `.` or `..`)"),
        ),
        (
            "through a symlink",
            build_tar(project, id, |t| {
                let mut h = raw_header("data/artifacts/out", Symlink, 0);
                h.set_link_name(&link_target).unwrap();
                h.set_cksum();
                t.extend_from_slice(h.as_bytes());
                raw(t, "data/artifacts/out/planted", Regular, b"x");
            }),
            "entry \"data/artifacts/out/planted\": its parent is not a directory of the build \
             (a symlink, a file, or not sent before it)"
                .into(),
        ),
        (
            "device",
            build_tar(project, id, |t| {
                let mut h = raw_header("data/artifacts/null", Char, 0);
                h.set_device_major(1).unwrap();
                h.set_device_minor(3).unwrap();
                h.set_cksum();
                t.extend_from_slice(h.as_bytes());
            }),
            "entry \"data/artifacts/null\" is a character device (not accepted there)".into(),
        ),
        (
            "another job's BuildInfo",
            build_tar(project, "0000", |_| {}),
            "its build_info.json is for \"job/simple/0000\", not \"job/simple/4f2a\"".into(),
        ),
        (
            "outside the build's parts",
            build_tar(project, id, |t| {
                raw(t, "cache-layers", Regular, b"ready/x/data/cache\n");
            }),
            "unexpected entry \"cache-layers\"".into(),
        ),
        (
            "cut short",
            {
                let mut t = build_tar(project, id, |_| {});
                // Everything up to the BuildInfo, then the end of the archive.
                let cut = t.len() - 1024 - 512 - info_json(project, id).len().div_ceil(512) * 512;
                t.truncate(cut);
                t.extend_from_slice(&[0u8; 1024]);
                t
            },
            "the stream has no build_info.json (it was cut short, or is not a build)".into(),
        ),
    ];
    for (what, body, reason) in cases {
        let agent = fake_agent(body);
        let err = fetch(&agent, &builds, project, id, false).unwrap_err();
        assert!(
            matches!(err, ReplicateError::Refused { .. }),
            "{what}: {err:?}"
        );
        assert_eq!(
            err.to_string(),
            format!("refusing build {project}/{id} from {agent}: {reason}"),
            "{what}"
        );
        assert_eq!(
            names_in(&builds.join(project).join("ready")),
            Vec::<String>::new(),
            "{what}"
        );
        assert_eq!(
            names_in(&builds.join(project).join("pending")),
            Vec::<String>::new(),
            "{what}"
        );
        assert_eq!(names_in(&outside), Vec::<String>::new(), "{what}");
        assert!(!dir.path().join("escaped").exists() && !builds.join("escaped").exists());
    }
    // The same stream without the hostile part is accepted, its Path rewritten.
    let agent = fake_agent(build_tar(project, id, |_| {}));
    let job = fetch(&agent, &builds, project, id, false).unwrap();
    let info: Value = serde_json::from_str(&read(job.path().join("build_info.json"))).unwrap();
    assert_eq!(
        PathBuf::from(info["Path"].as_str().unwrap()),
        builds.join("simple/ready/4f2a/data/artifacts")
    );
    assert_eq!(read(job.data().join("artifacts/ok.txt")), "ok\n");
    assert_eq!(
        names_in(&builds.join(project).join("pending")),
        Vec::<String>::new()
    );
}

/// Issue 20, class 8: replication carries no set-uid or set-gid bit: not the ones the job set
/// (removed when it ended), not one a file on the serving agent has anyway (`GET /api/build`
/// sends none), and the fetching agent keeps none.
#[test]
fn replication_carries_no_set_id_bits() {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| {
        std::fs::symlink_metadata(p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            .permissions()
            .mode()
            & 0o7777
    };
    let a = Server::start(json!({}));
    let b = Server::start(json!({}));
    let info = a.job(json!({"project": "setid"}));
    assert_eq!(info["ExitCode"], 0, "{info}");
    let id = job_id(&info);
    let art = artifacts(&info);
    std::fs::set_permissions(art.join("plain"), std::fs::Permissions::from_mode(0o4750)).unwrap();
    let (status, tar) = get_bytes(&a, &format!("/api/build/setid/{id}?cache=1"));
    assert_eq!(status, 200);
    let mut archive = tar::Archive::new(&tar[..]);
    let modes: Vec<(String, u32)> = archive
        .entries()
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.path().unwrap().display().to_string(),
                e.header().mode().unwrap(),
            )
        })
        .collect();
    for (name, want) in [
        ("data/artifacts/suid", 0o755),
        ("data/artifacts/sgid-dir", 0o775),
        ("data/artifacts/sgid-dir/both", 0o711),
        ("data/artifacts/plain", 0o750),
        ("data/cache/tool", 0o755),
    ] {
        assert!(modes.contains(&(name.into(), want)), "{name}: {modes:?}");
    }
    assert!(modes.iter().all(|(_, m)| m & 0o6000 == 0), "{modes:?}");

    let dir = fetch(
        &format!("http://{}", a.addr),
        &b.builds(),
        "setid",
        &id,
        true,
    )
    .unwrap();
    for (name, want) in [
        ("artifacts/suid", 0o755),
        ("artifacts/sgid-dir", 0o775),
        ("artifacts/sgid-dir/both", 0o711),
        ("artifacts/plain", 0o750),
        ("cache/tool", 0o755),
    ] {
        assert_eq!(mode(&dir.data().join(name)), want, "{name}");
    }
}
