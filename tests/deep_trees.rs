//! Deep directory trees do not take the daemon down (issue 20, class 3). A job that leaves a
//! chain of 100,000 directories in its root filesystem and in its `data/`, a RUN step that
//! makes one and fails, a store whose `tmp/` holds one when mistryd starts, `mistryd purge` and
//! `mistryd doctor` beside such trees: the daemon keeps answering, the next job runs (starting
//! from the chain its group's last build left), and every tree the daemon removes is gone. On
//! each store backend; run as root and as the unprivileged user (scripts/test.sh).
//!
//! Before the walks were iterative, removing such a tree took one stack frame and one open
//! descriptor per level on a 2 MiB thread: the daemon died of a stack overflow, and again at
//! start-up on the same tree in `tmp/`; copies (`cp -a`) failed past `PATH_MAX`.
//!
//! Every store lives on the btrfs of `MISTRY_TEST_BTRFS` (scripts/test.sh sets it), also the
//! plain and overlay ones: removing 100,000 directories on an ext4 mounted with `discard` (as on
//! CI's machine) takes minutes, on btrfs seconds. Without it they run in TMPDIR.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::server::{artifacts, job_id, read, Server};
use common::{mistryd_bin, wait_for};
use rustix::fs::{Mode, OFlags};
use serde_json::{json, Value};

/// Levels of every chain.
const DEPTH: usize = 100_000;

/// `chain.sh DIR N` makes a chain of N (a multiple of 200) directories `d` in DIR, with a file
/// `f` at the bottom, as fast as a busybox shell can: blocks of 200 levels made by `mkdir -p`,
/// the chain so far moved to the bottom of each new block. No path is ever longer than
/// `PATH_MAX`, and no `cd` into the chain (whose `getcwd` would walk it up).
const CHAIN_SH: &str = r#"#!/bin/sh
set -e
cd "$1"
c=d; i=1; while [ $i -lt 199 ]; do c=$c/d; i=$((i+1)); done
mkdir -p d/$c
echo bottom > d/$c/f
n=200; while [ $n -lt "$2" ]; do mkdir -p n/$c && mv d n/$c/ && mv n d; n=$((n+200)); done
"#;

/// A job leaving a chain in `/data/cache` and in `/tmp` (its root filesystem), unless its
/// group's last build left one in `/data/cache`: then it says so.
const DEEP_SH: &str = r#"#!/bin/sh
set -e
mkdir -p /data/artifacts /data/cache
if [ -d /data/cache/d ]; then echo carried > /data/artifacts/cache.txt; exit 0; fi
sh /chain.sh /data/cache 100000
sh /chain.sh /tmp 100000
"#;

fn add_project(s: &Server, name: &str, files: &[(&str, &str)]) {
    let d = s.dir.path().join("projects").join(name);
    std::fs::create_dir_all(&d).unwrap();
    for (f, text) in files {
        std::fs::write(d.join(f), text).unwrap();
    }
}

fn add_projects(s: &Server) {
    add_project(
        s,
        "deep",
        &[
            (
                "Dockerfile",
                "FROM busybox\nCOPY chain.sh deep.sh /\nENTRYPOINT [\"/bin/sh\", \"/deep.sh\"]\n",
            ),
            ("chain.sh", CHAIN_SH),
            ("deep.sh", DEEP_SH),
        ],
    );
    // The same as the image's user: its trees belong to a subordinate id, which only the user
    // namespace may remove or hand over (the tool sandbox's helper).
    add_project(
        s,
        "deepuser",
        &[
            (
                "Dockerfile",
                "FROM busybox\nRUN echo app:x:4321:4321::/home/app:/bin/sh >> /etc/passwd && echo app:x:4321: >> /etc/group\nCOPY chain.sh deep.sh /\nUSER app\nENTRYPOINT [\"/bin/sh\", \"/deep.sh\"]\n",
            ),
            ("chain.sh", CHAIN_SH),
            ("deep.sh", DEEP_SH),
        ],
    );
    add_project(
        s,
        "deeprun",
        &[
            (
                "Dockerfile",
                "FROM busybox\nCOPY chain.sh /\nRUN sh /chain.sh /tmp 100000 && exit 3\nCMD true\n",
            ),
            ("chain.sh", CHAIN_SH),
        ],
    );
}

fn dir_flags() -> OFlags {
    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC
}

/// The number of levels of the chain of `d` in `dir` whose bottom holds `f` = "bottom" (None:
/// no such chain).
fn chain_depth(dir: &Path) -> Option<usize> {
    let mut cur = rustix::fs::open(dir, dir_flags(), Mode::empty()).ok()?;
    let mut depth = 0;
    while let Ok(next) = rustix::fs::openat(&cur, "d", dir_flags(), Mode::empty()) {
        cur = next;
        depth += 1;
    }
    let f = rustix::fs::openat(&cur, "f", OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty()).ok()?;
    let mut text = String::new();
    std::io::Read::read_to_string(&mut std::fs::File::from(f), &mut text).ok()?;
    (text == "bottom\n").then_some(depth)
}

/// A chain of `depth` levels in a new directory `dir`, made here by fd (what a job that died
/// mid-way leaves in the store's `tmp/`).
fn plant_chain(dir: &Path, depth: usize) {
    std::fs::create_dir(dir).unwrap();
    let mut cur = rustix::fs::open(dir, dir_flags(), Mode::empty()).unwrap();
    for _ in 0..depth {
        rustix::fs::mkdirat(&cur, "d", Mode::from_raw_mode(0o755)).unwrap();
        cur = rustix::fs::openat(&cur, "d", dir_flags(), Mode::empty()).unwrap();
    }
    let f = rustix::fs::openat(
        &cur,
        "f",
        OFlags::CREATE | OFlags::WRONLY | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o644),
    )
    .unwrap();
    rustix::io::write(&f, b"bottom\n").unwrap();
}

fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Wait until the store's `tmp/` is empty (job roots and aborted snapshots are removed in the
/// background).
fn wait_tmp_empty(s: &Server, what: &str) {
    let tmp = s.builds().join(".mistry/tmp");
    wait_for(what, Duration::from_secs(120), || entries(&tmp).is_empty());
}

fn mistryd(args: &[&str]) -> (Option<i32>, String) {
    let o = Command::new(mistryd_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        o.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

fn log(s: &Server) -> String {
    let mut all = String::new();
    for n in 1..=3 {
        all += &std::fs::read_to_string(s.dir.path().join(format!("mistryd-{n}.log")))
            .unwrap_or_default();
    }
    all
}

/// `ready/<id>` of a BuildInfo.
fn build_dir(info: &Value) -> PathBuf {
    artifacts(info)
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .to_path_buf()
}

/// A [`Server`] whose directory is removed by the iterative walk when it goes, also after a
/// failure: tempfile's own removal is std's, one stack frame per level, and a chain left
/// behind would overflow the test's stack. What this user may not remove (a subordinate id's)
/// is left for scripts/test.sh to remove.
struct Deep(Server);

impl std::ops::Deref for Deep {
    type Target = Server;
    fn deref(&self) -> &Server {
        &self.0
    }
}

impl std::ops::DerefMut for Deep {
    fn deref_mut(&mut self) -> &mut Server {
        &mut self.0
    }
}

impl Drop for Deep {
    fn drop(&mut self) {
        self.0.kill9();
        if images::walk::remove_path(self.0.dir.path()).is_err() {
            let left = std::mem::replace(&mut self.0.dir, tempfile::tempdir().unwrap());
            eprintln!("left behind: {}", left.keep().display());
        }
    }
}

/// A server for `kind`'s store, on the btrfs of `MISTRY_TEST_BTRFS` (None when the btrfs
/// part is skipped), or for other backends in TMPDIR when that is not set.
fn server(kind: &str) -> Option<Deep> {
    let parent = match (kind, std::env::var_os("MISTRY_TEST_BTRFS")) {
        ("btrfs", _) => Some(common::btrfs_dir_or_skip()?),
        (_, btrfs) => btrfs.map(PathBuf::from),
    };
    let s = Server::start_in(parent.as_deref(), json!({"filesystem": kind}));
    add_projects(&s);
    Some(Deep(s))
}

/// Remove every build by the daemon's purge (the trees of a subordinate id are removed in the
/// user namespace), links first.
fn clean_up(s: &Server, projects: &[&str]) {
    for p in projects {
        for link in ["latest", "groups/g"] {
            let _ = std::fs::remove_file(s.builds().join(p).join(link));
        }
    }
    let config = s.config.to_str().unwrap();
    let (code, out) = mistryd(&["--config", config, "purge", "--keep", "0"]);
    assert_eq!(code, Some(0), "{out}");
    for p in projects {
        assert_eq!(
            entries(&s.builds().join(p).join("ready")),
            Vec::<String>::new()
        );
    }
}

/// Everything on one backend: a failing RUN step, two jobs of a group, purge, a restart on a
/// leftover, doctor.
fn deep_trees_on(kind: &str) {
    let Some(mut s) = server(kind) else {
        return;
    };
    let config = s.config.to_str().unwrap().to_string();

    // A RUN step that makes a chain and fails: the build fails cleanly, tmp/ is emptied.
    let run = s.job(json!({"project": "deeprun"}));
    let err = run["ErrBuild"].as_str().unwrap_or_default();
    assert!(
        err.contains("returned a non-zero code: 3"),
        "{run}\n{}",
        log(&s)
    );
    wait_tmp_empty(&s, "the failed step's snapshot removed");

    // A job leaving chains in its root filesystem and its data/; the next one of its group
    // starts from that data/.
    let a = s.job(json!({"project": "deep", "group": "g", "params": {"n": "1"}}));
    assert_eq!(a["ExitCode"], 0, "{a}\n{}", log(&s));
    assert_eq!(
        chain_depth(&build_dir(&a).join("data/cache")),
        Some(DEPTH),
        "the job made its chain"
    );
    let (code, _) = s.get("/", false);
    assert_eq!(code, 200, "the daemon answers");
    let b = s.job(json!({"project": "deep", "group": "g", "params": {"n": "2"}}));
    assert_eq!(b["ExitCode"], 0, "{b}\n{}", log(&s));
    assert_eq!(b["Incremental"], true, "{b}");
    assert_eq!(read(artifacts(&b).join("cache.txt")), "carried\n");
    wait_tmp_empty(&s, "the jobs' root filesystems removed");

    // purge (the daemon's retention removes the same way): the older build goes.
    let (code, out) = mistryd(&[
        "--config",
        &config,
        "purge",
        "--project",
        "deep",
        "--keep",
        "1",
    ]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("Purged: 1, Failed: 0"), "{out}");
    assert!(!build_dir(&a).exists());
    assert!(build_dir(&b).join("data").is_dir());
    assert_eq!(
        entries(&s.builds().join(".mistry-trash")),
        Vec::<String>::new()
    );

    // mistryd restarts on a store whose tmp/ holds a chain (a job root of a daemon that died),
    // doctor on it first.
    assert!(s.term().success(), "{}", log(&s));
    plant_chain(&s.builds().join(".mistry/tmp/job-1-1"), DEPTH);
    let (code, out) = mistryd(&["--config", &config, "doctor"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("is writable"), "{out}");
    // tmp/ is emptied before mistryd listens.
    s.start_timeout = Duration::from_secs(180);
    s.spawn();
    assert_eq!(
        entries(&s.builds().join(".mistry/tmp")),
        Vec::<String>::new()
    );
    let c = s.job(json!({"project": "simple", "params": {"name": "after"}}));
    assert_eq!(c["ExitCode"], 0, "{c}\n{}", log(&s));
    assert_eq!(job_id(&c).len(), 64);
    clean_up(&s, &["deep", "simple", "deeprun"]);
}

#[test]
fn deep_trees_on_a_plain_store() {
    deep_trees_on("plain");
}

#[test]
fn deep_trees_on_an_overlay_store() {
    deep_trees_on("overlay");
}

#[test]
fn deep_trees_on_a_btrfs_store() {
    deep_trees_on("btrfs");
}

/// The image's user leaves the chains: they belong to a subordinate id, so the daemon hands
/// `data/` over, takes it back, copies and removes them inside the user namespace.
#[test]
fn deep_trees_of_an_images_user() {
    let Some(s) = server("plain") else {
        return;
    };
    let a = s.job(json!({"project": "deepuser", "group": "g", "params": {"n": "1"}}));
    assert_eq!(a["ExitCode"], 0, "{a}\n{}", log(&s));
    let b = s.job(json!({"project": "deepuser", "group": "g", "params": {"n": "2"}}));
    assert_eq!(b["ExitCode"], 0, "{b}\n{}", log(&s));
    assert_eq!(read(artifacts(&b).join("cache.txt")), "carried\n");
    assert_eq!(
        chain_depth(&build_dir(&b).join("data/cache")),
        Some(DEPTH),
        "the chain was carried whole"
    );
    wait_tmp_empty(&s, "the jobs' root filesystems removed");
    clean_up(&s, &["deepuser"]);
}
