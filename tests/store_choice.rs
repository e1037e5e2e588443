//! The layer store's backend when none is configured: btrfs on btrfs, else overlay where
//! rootless overlayfs works (probed), else plain; an explicit setting wins but never over what
//! the store was made with; the choice and its reason are logged (also by `mistryd image
//! build`), in colour only on a terminal without `NO_COLOR`.

use std::path::{Path, PathBuf};
use std::process::Command;

mod common;

use common::{helper, images_dir, mistryd_bin};
use images::{BackendKind, BuildOptions, Builder, LocalImages, Store};

/// A tiny project on busybox: a RUN step (a snapshot made by the backend) and its result read
/// back in a job root.
fn build_and_check(store: Store, dir: &Path) {
    let ctx = dir.join("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM busybox\nRUN echo built > /built && rm /bin/true\n",
    )
    .unwrap();
    let builder = Builder::new(store, vec![Box::new(LocalImages { dir: images_dir() })]);
    let mut log = Vec::new();
    let (image, _) = builder
        .build(&BuildOptions::new("choice", &ctx), &mut log)
        .unwrap_or_else(|e| panic!("{e}\n{}", String::from_utf8_lossy(&log)));
    let root = builder
        .store
        .job_root(image.snapshot.as_deref(), true)
        .unwrap();
    let out = root
        .sandbox()
        .command([
            "/bin/sh",
            "-c",
            "cat /built; test -e /bin/true || echo gone",
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "built\ngone\n");
}

/// Empty a store through its backend (its snapshots hold files of subordinate ids, which a
/// rootless test cannot remove itself): forget every project's image, then collect garbage.
fn empty_store(path: &Path) {
    let store = Store::open(path, None, helper()).unwrap();
    for e in std::fs::read_dir(path.join("refs")).unwrap() {
        std::fs::remove_file(e.unwrap().path()).unwrap();
    }
    store.collect_garbage().unwrap();
    assert_eq!(
        std::fs::read_dir(path.join("snapshots")).unwrap().count(),
        0
    );
}

fn record(store: &Path) -> String {
    std::fs::read_to_string(store.join("backend")).unwrap()
}

/// The store on the btrfs loop mount: btrfs, as root and rootless (setup.sh mounts it with
/// user_subvol_rm_allowed, which the reason names).
#[test]
fn on_btrfs_the_default_is_btrfs() {
    let Some(parent) = common::btrfs_dir_or_skip() else {
        return;
    };
    let dir = common::tempdir_in("mistry-choice", Some(&parent));
    let path = dir.path().join("store");
    let store = Store::open(&path, None, helper()).unwrap();
    assert_eq!(store.backend(), BackendKind::Btrfs);
    let rm = if nix::unistd::geteuid().is_root() {
        "the store is on btrfs (snapshots are deleted as subvolumes)"
    } else {
        "the store is on btrfs (mounted with user_subvol_rm_allowed: snapshots are deleted as \
         subvolumes)"
    };
    assert_eq!(store.backend_reason(), rm);
    assert_eq!(record(&path), "btrfs\n");
    build_and_check(store, dir.path());
    empty_store(&path);
}

/// On ext4 (this machine's /tmp), overlayfs in a user namespace works (Linux ≥ 5.11): overlay,
/// as root and rootless. The probe's verdict is cached for this kernel and user.
#[test]
fn on_ext4_the_default_is_overlay() {
    let dir = common::tempdir_in("mistry-choice", None);
    assert!(
        !images::is_btrfs(dir.path()),
        "{} must not be on btrfs",
        dir.path().display()
    );
    let path = dir.path().join("store");
    let store = Store::open(&path, None, helper()).unwrap();
    assert_eq!(store.backend(), BackendKind::Overlay);
    assert_eq!(
        store.backend_reason(),
        "the store is on ext4, not btrfs, and overlayfs works in this process's user namespace"
    );
    assert_eq!(record(&path), "overlay\n");
    let probe = std::fs::read_to_string(path.join("overlay-probe")).unwrap();
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert!(
        probe.starts_with(&format!("kernel {} ", release.trim())),
        "{probe}"
    );
    assert!(
        probe.ends_with(&format!(" uid {}\nok\n", nix::unistd::geteuid())),
        "{probe}"
    );
    // Nothing of the probe is left in tmp/.
    assert_eq!(std::fs::read_dir(path.join("tmp")).unwrap().count(), 0);
    build_and_check(store, dir.path());
    // Reopened, it stays what it was made with.
    let again = Store::open(&path, None, helper()).unwrap();
    assert_eq!(again.backend(), BackendKind::Overlay);
    assert_eq!(
        again.backend_reason(),
        format!(
            "the store was made with it ({})",
            path.canonicalize().unwrap().join("backend").display()
        )
    );
    drop(again);
    empty_store(&path);
}

/// `mistryd image build` with overlay unavailable (the test hook `MISTRY_TEST_NO_OVERLAY`):
/// plain, and its stderr says why, without colours (stderr is not a terminal).
#[test]
fn without_overlay_the_default_is_plain_and_the_log_says_why() {
    let dir = common::tempdir_in("mistry-choice", None);
    let ctx = dir.path().join("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(ctx.join("Dockerfile"), "FROM busybox\nRUN touch /x\n").unwrap();
    let store = dir.path().join("store");
    let out = Command::new(mistryd_bin())
        .args(["image", "build", "--store"])
        .arg(&store)
        .arg("--images")
        .arg(images_dir())
        .arg(&ctx)
        .env("MISTRY_TEST_NO_OVERLAY", "1")
        .env_remove("MISTRY_LOG")
        .env_remove("NO_COLOR")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains('\x1b'), "colours on a pipe: {stderr:?}");
    let line = stderr
        .lines()
        .find(|l| l.contains("storage backend"))
        .unwrap_or_else(|| panic!("no backend line in {stderr}"));
    // Reflinks: ext4 has none.
    let tail = "storage backend plain: the store is on ext4, not btrfs, overlayfs does not work \
                here (MISTRY_TEST_NO_OVERLAY is set (a test hook)); this filesystem has no \
                reflinks: every step copies its whole tree";
    assert!(line.contains(" INFO "), "{line}");
    assert!(
        line.ends_with(&format!(
            "{tail} store={}",
            store.canonicalize().unwrap().display()
        )),
        "{line}"
    );
    assert_eq!(record(&store), "plain\n");
    // The hook's verdict is not cached.
    assert!(!store.join("overlay-probe").exists());
    // Without the hook, the store stays plain: what it was made with.
    let reopened = Store::open(&store, None, helper()).unwrap();
    assert_eq!(reopened.backend(), BackendKind::Plain);
    drop(reopened);
    empty_store(&store);
}

/// `--filesystem` / `filesystem` wins for a new store; a store is never reopened with another
/// backend, also one made before stores recorded theirs (found from its snapshots).
#[test]
fn an_explicit_setting_wins_but_not_over_the_store() {
    let dir = common::tempdir_in("mistry-choice", None);
    let path = dir.path().join("store");
    let store = Store::open(&path, Some(BackendKind::Plain), helper()).unwrap();
    assert_eq!(store.backend(), BackendKind::Plain);
    assert_eq!(
        store.backend_reason(),
        "set by the filesystem setting (or --filesystem)"
    );
    drop(store);
    let canonical = path.canonicalize().unwrap();
    let err = Store::open(&path, Some(BackendKind::Overlay), helper()).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "the layer store {} was made with the plain backend, and its snapshots cannot be \
             used as overlay (the filesystem setting or --filesystem): set filesystem to plain, \
             use another store_path, or remove this store",
            canonical.display()
        )
    );
    assert_eq!(
        Store::open(&path, None, helper()).unwrap().backend(),
        BackendKind::Plain
    );
    let err = Store::open(&path, Some(BackendKind::Btrfs), helper()).unwrap_err();
    assert!(
        err.to_string().contains("made with the plain backend"),
        "{err}"
    );

    // A store from before the record: an overlay store with snapshots.
    let old = dir.path().join("old");
    let store = Store::open(&old, Some(BackendKind::Overlay), helper()).unwrap();
    build_and_check(store, dir.path());
    std::fs::remove_file(old.join("backend")).unwrap();
    let err = Store::open(&old, Some(BackendKind::Plain), helper()).unwrap_err();
    assert!(
        err.to_string()
            .contains("was made with the overlay backend (found in its snapshots)"),
        "{err}"
    );
    let store = Store::open(&old, None, helper()).unwrap();
    assert_eq!(store.backend(), BackendKind::Overlay);
    assert_eq!(
        store.backend_reason(),
        "the store's snapshots were made with it"
    );
    assert_eq!(record(&old), "overlay\n");
    drop(store);
    empty_store(&old);
}

/// Colours only on a terminal, and never with `NO_COLOR` (<https://no-color.org>): mistryd's
/// logs under `script`'s pseudo-terminal.
#[test]
fn log_colours_only_on_a_terminal_without_no_color() {
    let dir = common::tempdir_in("mistry-choice", None);
    let store = dir.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    let run = |no_color: Option<&str>| -> String {
        // `image gc` opens the store, which logs its backend line at info.
        let cmd = format!(
            "{} image gc --store {}",
            PathBuf::from(mistryd_bin()).display(),
            store.display()
        );
        let mut c = Command::new("script");
        c.args(["-q", "-e", "-c", &cmd, "/dev/null"])
            .env_remove("MISTRY_LOG")
            .env("TERM", "xterm");
        match no_color {
            Some(v) => c.env("NO_COLOR", v),
            None => c.env_remove("NO_COLOR"),
        };
        let out = c.output().expect("script (util-linux)");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{text}");
        assert!(text.contains("storage backend"), "{text}");
        text
    };
    assert!(run(None).contains("\x1b["), "no colours on a terminal");
    assert!(!run(Some("1")).contains('\x1b'), "colours despite NO_COLOR");
    // An empty NO_COLOR does not count (no-color.org).
    assert!(run(Some("")).contains("\x1b["));
}
