//! The operator's tools against a real mistryd: retention (keep N per group, max age, links and
//! pending builds kept, the result cache forgetting), `mistryd purge` (dry run, removal of files
//! owned by subordinate ids, beside the running daemon), `mistryd unshare` and `mistryd doctor`.
//! Run as root and as the unprivileged user (scripts/test.sh).

mod common;

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::server::{job_id, Server};
use common::{mistryd_bin, wait_for, wait_until};
use serde_json::{json, Value};

/// A project whose job leaves files of sandbox uid 1000 and a mode-000 directory in its data.
const OWNERS: &str = "FROM busybox\nCMD [\"/bin/sh\", \"-c\", \"set -e; \
rm -rf /data/artifacts/d /data/artifacts/locked; mkdir -p /data/artifacts/d/sub; echo x > /data/artifacts/d/sub/f; chown -R 1000:1000 /data/artifacts/d; \
echo y > /data/cache/own; chown 1000:1000 /data/cache/own; \
mkdir /data/artifacts/locked; echo z > /data/artifacts/locked/f; chown -R 1000:1000 /data/artifacts/locked; \
chmod 000 /data/artifacts/locked\"]\n";

fn add_project(s: &Server, name: &str, dockerfile: &str) {
    let d = s.dir.path().join("projects").join(name);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("Dockerfile"), dockerfile).unwrap();
}

/// The IDs in `<project>/ready/`.
fn ready(s: &Server, project: &str) -> BTreeSet<String> {
    std::fs::read_dir(s.builds().join(project).join("ready"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Wait up to 10 s for `<project>/ready/` to hold exactly `want`.
fn wait_ready(s: &Server, project: &str, want: &BTreeSet<String>, what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let now = ready(s, project);
        if now == *want {
            return;
        }
        if std::time::Instant::now() > deadline {
            let log =
                std::fs::read_to_string(s.dir.path().join("mistryd-1.log")).unwrap_or_default();
            panic!("{what}: ready holds {now:?}, not {want:?}; log:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn job(s: &Server, project: &str, group: &str, params: Value) -> (String, Value) {
    let info = s.job(json!({"project": project, "group": group, "params": params}));
    (job_id(&info), info)
}

fn mistryd(args: &[&str]) -> Output {
    Command::new(mistryd_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The ID a `removed P/ID (...)` or `would remove P/ID (...)` line names.
fn listed(stdout: &str, prefix: &str) -> BTreeSet<String> {
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix(prefix))
        .map(|l| {
            let (p, rest) = l.split_once('/').unwrap();
            format!("{p}/{}", rest.split(' ').next().unwrap())
        })
        .collect()
}

#[test]
fn retention_keeps_the_last_builds_of_each_group_links_and_running_ones() {
    let s = Server::start(json!({"retention": {"keep": 1}}));
    let (a, _) = job(&s, "simple", "g", json!({"name": "a"}));
    let (b, _) = job(&s, "simple", "g", json!({"name": "b"}));
    // A failed build: newest of its group, but not linked.
    let (c, info) = job(&s, "simple", "g", json!({"name": "c", "code": "3"}));
    assert_eq!(info["ExitCode"], 3);
    let (d, _) = job(&s, "simple", "", json!({"name": "d"}));
    // keep 1: c is the newest of g, b its link target; a goes. d is alone in its group.
    let want: BTreeSet<String> = [&b, &c, &d].into_iter().cloned().collect();
    wait_ready(&s, "simple", &want, "retention after the jobs");
    let link = std::fs::read_link(s.builds().join("simple/groups/g")).unwrap();
    assert_eq!(link.file_name().unwrap().to_string_lossy(), b);
    assert!(
        !s.builds().join(".mistry-trash").exists() || {
            std::fs::read_dir(s.builds().join(".mistry-trash"))
                .unwrap()
                .count()
                == 0
        }
    );

    // A running build of the group is left alone while another one of the group ends.
    let body = json!({"project": "simple", "group": "g", "params": {"name": "slow", "sleep": "3"}});
    let (status, t) = s.post("/jobs?async", &body.to_string());
    assert_eq!(status, 201, "{t}");
    wait_until("a pending build", || s.pending_dirs("simple") > 0);
    let (e, _) = job(&s, "simple", "g", json!({"name": "e"}));
    // e is the newest and linked: c goes; b (no longer linked) stays while the running build,
    // which started from it, runs.
    let want: BTreeSet<String> = [&b, &d, &e].into_iter().cloned().collect();
    wait_ready(&s, "simple", &want, "retention after e");
    assert_eq!(s.pending_dirs("simple"), 1, "the running build was kept");
    wait_for("the slow build", Duration::from_secs(20), || {
        s.pending_dirs("simple") == 0 && !ready(&s, "simple").contains(&b)
    });
    // The slow build is linked now (it ended last) and e is the newest of g: both stay.
    let now = ready(&s, "simple");
    assert_eq!(now.len(), 3, "{now:?}");
    assert!(now.contains(&d) && now.contains(&e), "{now:?}");
    let link = std::fs::read_link(s.builds().join("simple/groups/g")).unwrap();
    let slow = link.file_name().unwrap().to_string_lossy().into_owned();
    assert!(now.contains(&slow) && slow != e, "{now:?} {slow}");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(ready(&s, "simple"), now);

    // The result cache forgot what was purged: the same request runs again.
    let (a2, info) = job(&s, "simple", "g", json!({"name": "a"}));
    assert_eq!(a2, a);
    assert_eq!(info["Cached"], false, "{info}");
    assert_eq!(info["ExitCode"], 0);
    let (_, info) = job(&s, "simple", "g", json!({"name": "a"}));
    assert_eq!(info["Cached"], true, "{info}");
}

#[test]
fn retention_max_age_applies_periodically_and_keeps_links() {
    let s = Server::start(json!({"retention": {"max_age": "2s", "interval": "1s"}}));
    let (a, _) = job(&s, "simple", "g", json!({"name": "a"}));
    let (b, _) = job(&s, "simple", "g", json!({"name": "b"}));
    let (c, _) = job(&s, "simple", "", json!({"name": "c"}));
    assert!(ready(&s, "simple").contains(&a));
    // a grows older than 2 s and goes at a periodic pass; b and c are link targets.
    let want: BTreeSet<String> = [&b, &c].into_iter().cloned().collect();
    wait_ready(&s, "simple", &want, "the periodic pass");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(ready(&s, "simple"), want, "links are never removed");
    // Linked builds are answered from the cache; what was purged runs again.
    let (_, info) = job(&s, "simple", "g", json!({"name": "b"}));
    assert_eq!(info["Cached"], true, "{info}");
    let (_, info) = job(&s, "simple", "g", json!({"name": "a"}));
    assert_eq!(info["Cached"], false, "{info}");
}

/// The host uid of sandbox uid 1000 (this user's subordinate range, as the daemon maps it).
fn host_uid_of_1000() -> u32 {
    let (map, why) = sandbox::choose_id_map(sandbox::IdMapping::Auto);
    match map {
        sandbox::IdMap::Full { subuid, .. } => subuid.start + 999,
        other => panic!("no subordinate ids ({other:?}, {why:?}): scripts/setup.sh gives some"),
    }
}

#[test]
fn purge_lists_exactly_and_removes_files_of_subordinate_ids_beside_the_daemon() {
    let s = Server::start(json!({}));
    add_project(&s, "owners", OWNERS);
    let config = s.config.to_str().unwrap().to_string();
    let (o1, _) = job(&s, "owners", "g", json!({"n": "1"}));
    let (o2, _) = job(&s, "owners", "g", json!({"n": "2"}));
    let (o3, _) = job(&s, "owners", "g", json!({"n": "3"}));
    let (u1, _) = job(&s, "owners", "", json!({"n": "u1"}));
    let (u2, _) = job(&s, "owners", "", json!({"n": "u2"}));
    let (keep_me, _) = job(&s, "simple", "", json!({"name": "x"}));
    let dir = |id: &str| s.builds().join("owners/ready").join(id);
    // The job left files of sandbox uid 1000 (a subordinate id on the host), and a mode-000
    // directory: this user cannot remove them itself (unless root).
    let f = dir(&o1).join("data/artifacts/d/sub/f");
    assert_eq!(std::fs::metadata(&f).unwrap().uid(), host_uid_of_1000());
    let locked = dir(&o1).join("data/artifacts/locked");
    assert_eq!(
        std::fs::symlink_metadata(&locked).unwrap().mode() & 0o7777,
        0
    );
    if !nix::unistd::geteuid().is_root() {
        let e = std::fs::read_dir(&locked).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied);
    }

    // u1 started ten days ago.
    let info_file = dir(&u1).join("build_info.json");
    let mut info: Value = serde_json::from_slice(&std::fs::read(&info_file).unwrap()).unwrap();
    let old = chrono_days_ago(10);
    info["StartedAt"] = json!(old);
    std::fs::write(&info_file, info.to_string()).unwrap();

    let o = mistryd(&["--config", &config, "purge", "--keep", "1", "--dry-run"]);
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let want: BTreeSet<String> = [&o1, &o2, &u1]
        .iter()
        .map(|i| format!("owners/{i}"))
        .collect();
    assert_eq!(listed(&out, "would remove "), want, "{out}");
    assert!(out.ends_with("Would purge: 3\n"), "{out}");
    assert!(
        dir(&o1).is_dir() && dir(&u1).is_dir(),
        "a dry run removes nothing"
    );

    let o = mistryd(&[
        "--config",
        &config,
        "purge",
        "--older-than",
        "7d",
        "--dry-run",
    ]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(
        listed(&out, "would remove "),
        BTreeSet::from([format!("owners/{u1}")]),
        "{out}"
    );
    assert!(out.contains("older than 7d"), "{out}");

    // For real, one project, beside the running daemon.
    let o = mistryd(&[
        "--config",
        &config,
        "purge",
        "--project",
        "owners",
        "--keep",
        "1",
    ]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert_eq!(listed(&out, "removed "), want, "{out}");
    assert!(out.contains("Purged: 3, Failed: 0"), "{out}");
    for id in [&o1, &o2, &u1] {
        assert!(!dir(id).exists(), "{id} is still there");
    }
    for id in [&o3, &u2] {
        assert!(
            dir(id).join("data/artifacts/d/sub/f").is_file(),
            "{id} was kept"
        );
    }
    assert_eq!(ready(&s, "simple"), BTreeSet::from([keep_me]));
    let trash = s.builds().join(".mistry-trash");
    assert_eq!(
        std::fs::read_dir(&trash).unwrap().count(),
        0,
        "trash emptied"
    );

    // The daemon's result cache forgot them: the same request runs again, then is cached.
    let (again, info) = job(&s, "owners", "g", json!({"n": "1"}));
    assert_eq!(
        (again.as_str(), &info["Cached"]),
        (o1.as_str(), &json!(false))
    );
    assert_eq!(info["ExitCode"], 0, "{info}");
    let (_, info) = job(&s, "owners", "g", json!({"n": "1"}));
    assert_eq!(info["Cached"], true);

    // Nothing to purge by: an error naming what to give.
    let o = mistryd(&["--config", &config, "purge"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o).contains("give --keep N or --older-than AGE"),
        "{}",
        text(&o)
    );
}

/// RFC 3339 time `days` ago, as BuildInfo's StartedAt.
fn chrono_days_ago(days: i64) -> String {
    (chrono::Utc::now() - chrono::Duration::days(days)).to_rfc3339()
}

#[test]
fn unshare_runs_in_the_sandboxes_id_mapping() {
    let s = Server::start(json!({}));
    add_project(&s, "owners", OWNERS);
    let (id, _) = job(&s, "owners", "", json!({}));
    let config = s.config.to_str().unwrap().to_string();
    let data = s.builds().join("owners/ready").join(&id).join("data");
    let o = mistryd(&["--config", &config, "unshare", "--", "id", "-u"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "0\n", "{}", text(&o));
    assert!(o.status.success());
    // A file of sandbox uid 1000 is 1000's inside, and the mode-000 directory can be read.
    let f = data.join("artifacts/d/sub/f");
    let o = mistryd(&[
        "--config",
        &config,
        "unshare",
        "--",
        "/bin/sh",
        "-c",
        &format!(
            "stat -c %u {} && cat {}/f",
            f.display(),
            data.join("artifacts/locked").display()
        ),
    ]);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "1000\nz\n",
        "{}",
        text(&o)
    );
    // The exit code is the command's.
    let o = mistryd(&[
        "--config", &config, "unshare", "--", "/bin/sh", "-c", "exit 7",
    ]);
    assert_eq!(o.status.code(), Some(7), "{}", text(&o));
    // And it can delete what the daemon's user cannot.
    let o = mistryd(&[
        "--config",
        &config,
        "unshare",
        "--",
        "rm",
        "-rf",
        data.join("artifacts").to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(!data.join("artifacts").exists());
}

fn doctor(config: &Path, path_env: Option<&str>) -> (i32, String) {
    let mut c = Command::new(mistryd_bin());
    c.args(["--config", config.to_str().unwrap(), "doctor"]);
    if let Some(p) = path_env {
        c.env("PATH", p);
    }
    let o = c.stdin(Stdio::null()).output().unwrap();
    (o.status.code().unwrap_or(-1), text(&o))
}

#[test]
fn doctor_passes_on_this_host_and_names_a_broken_setting() {
    let s = Server::start(json!({}));
    let root = nix::unistd::geteuid().is_root();
    let (code, out) = doctor(&s.config, None);
    assert_eq!(code, 0, "{out}");
    for line in [
        format!("ok    configuration {} loads", s.config.display()),
        "ok    a sandbox starts (user, mount, PID namespaces)".to_string(),
        format!(
            "ok    store_path {} is writable",
            s.builds().canonicalize().unwrap().join(".mistry").display()
        ),
    ] {
        assert!(
            out.lines().any(|l| l == line),
            "no line {line:?} in:\n{out}"
        );
    }
    assert!(
        out.lines()
            .any(|l| l.starts_with("ok    rootless overlayfs works on ")),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("ok    sandbox ids: root = ")),
        "{out}"
    );
    // The default network: slirp4netns starts (in the held user namespace when rootless).
    let how = if root {
        "started for a namespace of the host's user namespace"
    } else {
        "started for a namespace of the held user namespace"
    };
    assert!(
        out.lines()
            .any(|l| l.starts_with("ok    isolated networks start: ") && l.ends_with(how)),
        "{out}"
    );
    if root {
        assert!(
            out.contains("ok    newuidmap/newgidmap: not needed (root writes the id maps itself)"),
            "{out}"
        );
    } else {
        assert!(
            out.lines()
                .any(|l| l.starts_with("ok    ") && l.ends_with("/newuidmap is set-uid root")),
            "{out}"
        );
    }
    assert!(!out.contains("FAIL"), "{out}");
    assert!(out.contains(" checks: 0 failed, "), "{out}");

    // A store_path that cannot be created (under a regular file): FAIL, exit 1.
    let file = s.dir.path().join("a-file");
    std::fs::write(&file, "").unwrap();
    let mut cfg: Value = serde_json::from_slice(&std::fs::read(&s.config).unwrap()).unwrap();
    cfg["store_path"] = json!(file.join("store"));
    let broken = s.dir.path().join("broken.json");
    std::fs::write(&broken, cfg.to_string()).unwrap();
    let (code, out) = doctor(&broken, None);
    assert_eq!(code, 1, "{out}");
    let want = format!(
        "FAIL  store_path {} is not writable: ",
        file.join("store").display()
    );
    assert!(out.lines().any(|l| l.starts_with(&want)), "{out}");

    // A newuidmap that is not set-uid first in PATH: the sandboxes would use it.
    let fake: PathBuf = s.dir.path().join("fake-bin");
    std::fs::create_dir_all(&fake).unwrap();
    std::fs::write(fake.join("newuidmap"), "#!/bin/sh\nexit 1\n").unwrap();
    std::fs::write(fake.join("newgidmap"), "#!/bin/sh\nexit 1\n").unwrap();
    for f in ["newuidmap", "newgidmap"] {
        std::fs::set_permissions(
            fake.join(f),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
    }
    let path = format!("{}:/usr/bin:/bin", fake.display());
    let (code, out) = doctor(&s.config, Some(&path));
    if root {
        // Root writes its maps itself: no helper is needed, nothing fails.
        assert_eq!(code, 0, "{out}");
    } else {
        assert_eq!(code, 1, "{out}");
        let want = format!(
            "FAIL  {} is neither set-uid root nor has file capabilities",
            fake.join("newuidmap").display()
        );
        assert!(out.lines().any(|l| l.starts_with(&want)), "{out}");
    }
}

#[test]
fn purge_to_the_low_water_mark_removes_unlinked_builds_oldest_first() {
    let s = Server::start(json!({}));
    add_project(&s, "owners", OWNERS);
    let (o1, _) = job(&s, "owners", "g", json!({"n": "1"}));
    let (o2, _) = job(&s, "owners", "g", json!({"n": "2"}));
    let (o3, _) = job(&s, "owners", "g", json!({"n": "3"}));
    let (u1, _) = job(&s, "owners", "", json!({"n": "u1"}));
    let (u2, _) = job(&s, "owners", "", json!({"n": "u2"}));
    // The daemon's configuration with a low-water mark this disk cannot reach (99.9% free):
    // every build that no link names goes, oldest first; `groups/g` (o3) and `latest` (u2)
    // stay.
    let mut cfg: Value = serde_json::from_slice(&std::fs::read(&s.config).unwrap()).unwrap();
    cfg["retention"] = json!({"min_free": "99.9%"});
    let low = s.dir.path().join("low-water.json");
    std::fs::write(&low, cfg.to_string()).unwrap();
    let low = low.to_str().unwrap();
    let order = |out: &str, prefix: &str| -> Vec<String> {
        out.lines()
            .filter_map(|l| l.strip_prefix(prefix))
            .map(|l| l.split(' ').next().unwrap().to_string())
            .collect()
    };
    let want: Vec<String> = [&o1, &o2, &u1]
        .iter()
        .map(|i| format!("owners/{i}"))
        .collect();
    let o = mistryd(&["--config", low, "purge", "--dry-run"]);
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(order(&out, "would remove "), want, "{out}");
    let o = mistryd(&["--config", low, "purge"]);
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(order(&out, "removed "), want, "{out}");
    let left: BTreeSet<String> = [o3, u2].into_iter().collect();
    assert_eq!(ready(&s, "owners"), left);
}
