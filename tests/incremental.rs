//! Incremental builds: a group's next build sees the last one's `/data/cache`, on every way the
//! daemon can give it (overlay layers, copies, btrfs snapshots), and with layers nothing of the
//! cache is copied: each build keeps only its changes, chains deeper than `cache_layers` are
//! squashed, and retention keeps the layers a kept build sits on.

mod common;

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::server::{artifacts, read, Server};
use serde_json::{json, Value};

/// Job `n` of the group: what it saw in `/data/cache`, then its changes: a new file, the removal
/// of one a build before the last one made (a whiteout over a lower layer), a line appended to
/// a file of the lower layers (a copy-up), and at n = 5 a directory replaced (an opaque one).
const LAYERS_SH: &str = r#"#!/bin/sh
set -e
n=$(cat /data/params/n)
ls /data/cache | tr '\n' ' ' > /data/artifacts/seen.txt
cat /data/cache/dir/log > /data/artifacts/log.txt 2>/dev/null || true
echo "$n" > "/data/cache/f$n"
rm -f "/data/cache/f$((n - 2))"
if [ "$n" = 5 ]; then rm -rf /data/cache/dir; fi
mkdir -p /data/cache/dir
echo "$n" >> /data/cache/dir/log
"#;

fn add_layers_project(s: &Server) {
    let dir = s.dir.path().join("projects/layers");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("Dockerfile"),
        "FROM busybox\nCOPY run.sh /run.sh\nENTRYPOINT [\"/bin/sh\", \"/run.sh\"]\n",
    )
    .unwrap();
    std::fs::write(dir.join("run.sh"), LAYERS_SH).unwrap();
}

fn expected_seen(n: u32) -> String {
    match n {
        1 => String::new(),
        2 => "dir f1 ".into(),
        _ => format!("dir f{} f{} ", n - 2, n - 1),
    }
}

fn expected_log(n: u32) -> String {
    let first = if n > 5 { 5 } else { 1 };
    (first..n).map(|i| format!("{i}\n")).collect()
}

/// The build directory of a BuildInfo (`ready/<id>`).
fn build_dir(info: &Value) -> PathBuf {
    artifacts(info)
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .to_path_buf()
}

fn run_job(s: &Server, n: u32) -> Value {
    let info = s.job(json!({"project": "layers", "group": "g", "params": {"n": n.to_string()}}));
    assert_eq!(
        (&info["ExitCode"], &info["ErrBuild"], &info["Incremental"]),
        (&0.into(), &"".into(), &(n > 1).into()),
        "job {n}: {info}"
    );
    let a = artifacts(&info);
    assert_eq!(read(a.join("seen.txt")), expected_seen(n), "job {n} saw");
    assert_eq!(read(a.join("log.txt")), expected_log(n), "job {n}'s log");
    info
}

fn ready_ids(s: &Server) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(s.builds().join("layers/ready"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

/// A build's cache layers (paths relative to the project; each line also carries the layer
/// build's token, checked here).
fn layers_of(build: &Path) -> Vec<String> {
    let project = build.parent().and_then(Path::parent).unwrap();
    std::fs::read_to_string(build.join("cache-layers"))
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let (path, token) = l.split_once(' ').unwrap();
            let id = path.split('/').nth(1).unwrap();
            let own = std::fs::read_to_string(project.join("ready").join(id).join("cache-token"));
            assert_eq!(own.unwrap().trim(), token, "{l}");
            path.to_string()
        })
        .collect()
}

fn id_of(info: &Value) -> String {
    build_dir(info)
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

/// `mistryd purge --keep 1` beside the daemon: what it removes (`removed P/ID ...` lines).
fn purge_keep_1(s: &Server) -> String {
    let out = std::process::Command::new(common::mistryd_bin())
        .arg("--config")
        .arg(&s.config)
        .args(["purge", "--keep", "1"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

#[test]
fn with_overlay_layers_a_groups_cache_is_never_copied_and_deep_chains_are_squashed() {
    let s = Server::start(json!({"filesystem": "overlay", "cache_layers": 3}));
    add_layers_project(&s);
    let mut infos = Vec::new();
    for n in 1..=3 {
        infos.push(run_job(&s, n));
    }
    let ids: Vec<String> = infos.iter().map(id_of).collect();
    let b = |info: &Value| build_dir(info);
    // Each build keeps only its own changes: job 3 wrote f3, removed f1 (a whiteout) and
    // appended to dir/log (copied up); f2 stayed in the layer below.
    let cache3 = b(&infos[2]).join("data/cache");
    assert_eq!(read(cache3.join("f3")), "3\n");
    assert!(!cache3.join("f2").exists());
    let whiteout = std::fs::symlink_metadata(cache3.join("f1")).unwrap();
    assert!(whiteout.file_type().is_char_device(), "{whiteout:?}");
    assert_eq!(read(cache3.join("dir/log")), "1\n2\n3\n");
    // ...on the layers of the builds before it, top first, relative to the project.
    assert!(layers_of(&b(&infos[0])).is_empty());
    assert_eq!(
        layers_of(&b(&infos[2])),
        [
            format!("ready/{}/data/cache", ids[1]),
            format!("ready/{}/data/cache", ids[0])
        ]
    );
    // No work directory is left behind.
    assert!(!b(&infos[2]).join("cache-work").exists());
    // Purging down to one build per group squashes the cache of the group's last build first
    // (its next build would sit on the older builds' layers), then removes them.
    let purged = purge_keep_1(&s);
    for id in &ids[..2] {
        assert!(purged.contains(&format!("removed layers/{id}")), "{purged}");
    }
    assert_eq!(ready_ids(&s), [ids[2].clone()]);
    let flat3 = b(&infos[2]).join("cache-flat");
    assert_eq!(names_in(&flat3), ["dir", "f2", "f3"]);
    assert_eq!(read(flat3.join("dir/log")), "1\n2\n3\n");
    // The next build sits on that squashed layer alone.
    let fourth = run_job(&s, 4);
    assert_eq!(
        layers_of(&build_dir(&fourth)),
        [format!("ready/{}/cache-flat", ids[2])]
    );
    // Build 6 sits on three layers (four with its own: deeper than cache_layers = 3): it is
    // squashed in the background into one (job 5 replaced dir/: an opaque directory).
    run_job(&s, 5);
    let sixth = run_job(&s, 6);
    assert_eq!(layers_of(&build_dir(&sixth)).len(), 3);
    let flat6 = build_dir(&sixth).join("cache-flat");
    common::wait_for("the squash of build 6", Duration::from_secs(30), || {
        flat6.is_dir()
    });
    assert_eq!(names_in(&flat6), ["dir", "f5", "f6"]);
    assert_eq!(read(flat6.join("dir/log")), "5\n6\n");
    let seventh = run_job(&s, 7);
    assert_eq!(
        layers_of(&build_dir(&seventh)),
        [format!("ready/{}/cache-flat", id_of(&sixth))]
    );
    for n in 8..=9 {
        run_job(&s, n);
    }
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

/// Retention's `keep` squashes a group's last cache when older builds it would remove are its
/// layers, then removes them; the chain stays right meanwhile.
#[test]
fn retention_squashes_a_chain_longer_than_keep_and_then_removes_the_older_builds() {
    let s = Server::start(json!({"filesystem": "overlay", "retention": {"keep": 1}}));
    add_layers_project(&s);
    let mut last = None;
    for n in 1..=6 {
        last = Some(run_job(&s, n));
    }
    let last = id_of(&last.unwrap());
    common::wait_for(
        "retention down to the last build",
        Duration::from_secs(30),
        || ready_ids(&s) == [last.clone()],
    );
    let flat = s
        .builds()
        .join("layers/ready")
        .join(&last)
        .join("cache-flat");
    assert_eq!(read(flat.join("dir/log")), "5\n6\n");
}

/// A rebuild replaces a build under the same ID: builds whose cache sat on it are squashed
/// first, the rebuilt one merges its layers, and the group goes on from it.
#[test]
fn a_rebuild_of_a_build_in_a_chain_keeps_every_chain_right() {
    let s = Server::start(json!({"filesystem": "overlay"}));
    add_layers_project(&s);
    let infos: Vec<Value> = (1..=3).map(|n| run_job(&s, n)).collect();
    let token2 = read(build_dir(&infos[1]).join("cache-token"));
    let again =
        s.job(json!({"project": "layers", "group": "g", "params": {"n": "2"}, "rebuild": true}));
    assert_eq!(
        (&again["ExitCode"], &again["Incremental"]),
        (&0.into(), &true.into()),
        "{again}"
    );
    assert_eq!(id_of(&again), id_of(&infos[1]));
    assert_eq!(read(artifacts(&again).join("seen.txt")), "dir f2 f3 ");
    // A new build under the old ID: its own token, and its cache a complete tree.
    let b2 = build_dir(&again);
    assert_ne!(read(b2.join("cache-token")), token2);
    assert!(layers_of(&b2).is_empty());
    assert_eq!(names_in(&b2.join("data/cache")), ["dir", "f2", "f3"]);
    // Build 3 sat on the old build 2: it was squashed before that went.
    let flat3 = build_dir(&infos[2]).join("cache-flat");
    assert_eq!(names_in(&flat3), ["dir", "f2", "f3"]);
    assert_eq!(read(flat3.join("dir/log")), "1\n2\n3\n");
    // The group goes on from the rebuilt build (its link moved there).
    let next = s.job(json!({"project": "layers", "group": "g", "params": {"n": "4"}}));
    assert_eq!(next["ExitCode"], 0, "{next}");
    assert_eq!(read(artifacts(&next).join("seen.txt")), "dir f2 f3 ");
    assert_eq!(read(artifacts(&next).join("log.txt")), "1\n2\n3\n2\n");
    assert_eq!(
        layers_of(&build_dir(&next)),
        [format!("ready/{}/data/cache", id_of(&again))]
    );
}

/// Every way of carrying a group's cache gives jobs the same `/data/cache`.
#[test]
fn every_backend_carries_a_groups_cache_the_same_way() {
    let mut configs = vec![
        json!({"filesystem": "overlay", "cache_layers": 2}),
        json!({"filesystem": "overlay", "cache_layers": 0}),
        json!({"filesystem": "plain"}),
    ];
    let btrfs = common::btrfs_dir_or_skip();
    if btrfs.is_some() {
        configs.push(json!({"filesystem": "btrfs"}));
    }
    for config in configs {
        let parent = match config["filesystem"].as_str() {
            Some("btrfs") => btrfs.clone(),
            _ => None,
        };
        let s = Server::start_in(parent.as_deref(), config.clone());
        add_layers_project(&s);
        let mut last = None;
        for n in 1..=7 {
            last = Some(run_job(&s, n));
        }
        let layered = config["cache_layers"].as_u64().is_some_and(|n| n > 0);
        let last = build_dir(&last.unwrap());
        assert_eq!(
            last.join("cache-layers").exists(),
            layered,
            "{config}: {}",
            last.display()
        );
        // A layered build's data/cache holds its own changes only; a copied one all of it.
        assert_eq!(last.join("data/cache/f6").exists(), !layered, "{config}");
        // A job of an image's non-root user writes over what its group's last build left.
        for round in 0..2 {
            let info = s.job(
                json!({"project": "asuser", "group": "u", "params": {"round": round.to_string()}}),
            );
            assert_eq!(
                (&info["ExitCode"], &info["Incremental"]),
                (&0.into(), &(round == 1).into()),
                "{config}: {info}"
            );
        }
    }
}
