//! Shared by the sandbox integration tests: a private copy of the busybox rootfs per test, the
//! escape probe, and small helpers.
//!
//! `MISTRY_BUSYBOX_ROOTFS` names the template rootfs (default: `target/images/busybox/rootfs`
//! of the workspace, built by `images/recipes/busybox.sh`); `MISTRY_PROBE` a prebuilt probe
//! (default: compiled here from `probe.c` with `cc -static`). `scripts/test.sh` sets both when it
//! runs these tests as an unprivileged user.
#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use sandbox::{Output, Sandbox};

pub(crate) struct Fixture {
    pub dir: tempfile::TempDir,
    pub rootfs: PathBuf,
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub(crate) fn template() -> PathBuf {
    let path = std::env::var_os("MISTRY_BUSYBOX_ROOTFS").map_or_else(
        || workspace().join("target/images/busybox/rootfs"),
        PathBuf::from,
    );
    assert!(
        path.join("bin/busybox").is_file(),
        "no busybox rootfs at {}: run `images/recipes/busybox.sh target/images/busybox` (or scripts/test.sh)",
        path.display()
    );
    path
}

pub(crate) fn probe() -> PathBuf {
    static PROBE: OnceLock<PathBuf> = OnceLock::new();
    PROBE
        .get_or_init(|| {
            if let Some(p) = std::env::var_os("MISTRY_PROBE") {
                return PathBuf::from(p);
            }
            let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/probe.c");
            // One probe per user and source, kept between runs (every test binary, every run
            // used to leave its own copy in the temporary directory).
            let text = std::fs::read(&src).expect("reading tests/probe.c");
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            std::hash::Hash::hash(&text, &mut hasher);
            let uid = nix::unistd::getuid().as_raw();
            let tmp = std::env::temp_dir();
            let out = tmp.join(format!(
                "mistry-probe-{uid}-{:016x}",
                std::hash::Hasher::finish(&hasher)
            ));
            // Only a probe this user made, that nobody else may change.
            let ours = std::fs::symlink_metadata(&out).is_ok_and(|m| {
                use std::os::unix::fs::MetadataExt;
                m.is_file() && m.uid() == uid && m.mode() & 0o022 == 0
            });
            if ours {
                return out;
            }
            let building = tmp.join(format!("mistry-probe-{uid}-{}.tmp", std::process::id()));
            let status = Command::new("cc")
                .args(["-static", "-O2", "-o"])
                .arg(&building)
                .arg(&src)
                .status()
                .expect("running cc to build the probe (apt-get install gcc libc6-dev)");
            assert!(status.success(), "building {}", src.display());
            // Whatever the umask: nobody else may change it (checked above when reused).
            std::fs::set_permissions(&building, std::fs::Permissions::from_mode(0o755))
                .expect("chmod of the probe");
            // Atomic: test binaries running at once each build, the last rename wins. (Refused
            // when another user holds the name: this run's own copy is used then.)
            if std::fs::rename(&building, &out).is_err() {
                return building;
            }
            out
        })
        .clone()
}

/// A fresh, private copy of the busybox rootfs with the probe at `/bin/probe` and a setuid-root
/// copy at `/bin/probe-suid`.
pub(crate) fn fixture() -> Fixture {
    fixture_in(&std::env::temp_dir())
}

/// [`fixture`] in a directory under `parent`.
pub(crate) fn fixture_in(parent: &Path) -> Fixture {
    let dir = tempfile::Builder::new()
        .prefix("mistry-sandbox-test")
        .tempdir_in(parent)
        .expect("tempdir");
    let rootfs = dir.path().join("rootfs");
    let status = Command::new("cp")
        .arg("-a")
        .arg(template())
        .arg(&rootfs)
        .status()
        .expect("cp");
    assert!(status.success());
    let probe_bytes = std::fs::read(probe()).expect("reading the probe");
    for (name, mode) in [("probe", 0o755), ("probe-suid", 0o4755)] {
        let dst = rootfs.join("bin").join(name);
        // Through the sandbox's own writer: a sandbox another test thread starts meanwhile
        // does not get a copy of our descriptor (its exec would fail with ETXTBSY).
        sandbox::write_executable(&dst, &probe_bytes).expect("copying the probe");
        std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }
    Fixture { dir, rootfs }
}

impl Fixture {
    pub(crate) fn sandbox(&self) -> Sandbox {
        Sandbox::new(&self.rootfs)
    }

    /// Run `sh -c script` in a default sandbox.
    pub(crate) fn sh(&self, script: &str) -> Output {
        run(self.sandbox().command(["/bin/sh", "-c", script]))
    }

    /// A host directory beside the rootfs (outside it).
    pub(crate) fn host_dir(&self, name: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::create_dir_all(&p).expect("mkdir");
        p
    }
}

pub(crate) fn run(sb: Sandbox) -> Output {
    sb.output()
        .unwrap_or_else(|e| panic!("sandbox failed to start: {e}"))
}

pub(crate) fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Host processes whose command line contains `marker`.
pub(crate) fn host_processes_with(marker: &str) -> Vec<i32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) {
            if String::from_utf8_lossy(&cmd).contains(marker) {
                found.push(pid);
            }
        }
    }
    found
}

/// A number unlikely to appear in any other process's command line.
pub(crate) fn unique_marker() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{}{:09}", 9_000 + std::process::id() % 1000, nanos)
}

pub(crate) fn is_root() -> bool {
    // SAFETY-free: geteuid via std's metadata of /proc/self is enough.
    std::fs::metadata("/proc/self").is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
}

/// Whether the caller has subordinate ids (so sandbox users other than root exist).
pub(crate) fn has_full_map() -> bool {
    let f = fixture();
    let out = f.sh("cat /proc/self/uid_map | wc -l");
    text(&out.stdout).trim() == "2"
}

/// For tests that need subordinate ids: whether they exist; without them the test is skipped,
/// but fails under `CI` (where scripts/setup.sh gives every test user a range).
pub(crate) fn full_map_or_skip() -> bool {
    if has_full_map() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "needs a subordinate id range (scripts/setup.sh)"
    );
    false
}
