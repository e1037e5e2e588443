//! Sandbox start-up: run `/bin/true` in the busybox rootfs, side by side with bubblewrap.
//!
//! `cargo bench --bench sandbox_start` (the rootfs comes from `images/recipes/busybox.sh`;
//! `MISTRY_BUSYBOX_ROOTFS` overrides its path, `BENCH_RUNS` the number of runs). The three ways
//! are interleaved run by run so that noise on the machine hits them alike:
//!
//! - `library`: `sandbox::Sandbox::spawn` + `wait` in this process;
//! - `held`: the same with the subordinate id map held (`sandbox::set_held_user_namespaces`), as
//!   the daemon starts its jobs (the same as `library` for a root caller);
//! - `mistryd`: the `mistryd sandbox run` command line, a new process each time (like bwrap);
//!   rootless, each joins the shared held user namespace the first warm-up run registered
//!   (`$XDG_RUNTIME_DIR/mistry` or `/tmp/mistry-<uid>`), as one-shot commands do;
//! - `small`: the same command line as `mistry-sandbox` (`mistryd sandbox run` as a small
//!   program of its own: `MISTRY_SANDBOX_BIN`, else the one beside `MISTRY_BIN`'s mistryd);
//! - `bwrap`: `bwrap --unshare-all --bind ROOTFS / --proc /proc --dev /dev /bin/true`.
//!
//! Target: the `mistryd` median ≤ 5 ms; the one-shot start (`small`) ≤ 1.2 × bwrap's.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{median, ms};

fn p90(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() * 9 / 10]
}

fn time(f: impl FnOnce() -> bool) -> Duration {
    let t = Instant::now();
    assert!(f(), "a benchmark run failed");
    t.elapsed()
}

fn main() {
    let rootfs = std::env::var_os("MISTRY_BUSYBOX_ROOTFS").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/images/busybox/rootfs"),
        PathBuf::from,
    );
    if !rootfs.join("bin/true").exists() {
        eprintln!(
            "no busybox rootfs at {}: run images/recipes/busybox.sh target/images/busybox",
            rootfs.display()
        );
        std::process::exit(1);
    }
    let runs: usize = common::env_num("BENCH_RUNS", 300);
    let mistryd = common::mistryd_bin();
    let mistryd = mistryd.as_str();
    let have_bwrap = common::installed("bwrap");

    let lib = || {
        sandbox::set_held_user_namespaces(false);
        sandbox::Sandbox::new(&rootfs)
            .command(["/bin/true"])
            .status()
            .is_ok_and(|s| s.success())
    };
    // As the daemon starts its sandboxes: the subordinate map held, set up once (rootless; a
    // root caller writes its maps directly either way).
    let held = || {
        sandbox::set_held_user_namespaces(true);
        sandbox::Sandbox::new(&rootfs)
            .command(["/bin/true"])
            .status()
            .is_ok_and(|s| s.success())
    };
    let small_bin = std::env::var("MISTRY_SANDBOX_BIN").unwrap_or_else(|_| {
        std::path::Path::new(mistryd)
            .with_file_name("mistry-sandbox")
            .to_string_lossy()
            .into_owned()
    });
    let small = || {
        Command::new(&small_bin)
            .arg("--rootfs")
            .arg(&rootfs)
            .args(["--", "/bin/true"])
            .status()
            .is_ok_and(|s| s.success())
    };
    let cli = || {
        Command::new(mistryd)
            .args(["sandbox", "run", "--rootfs"])
            .arg(&rootfs)
            .args(["--", "/bin/true"])
            .status()
            .is_ok_and(|s| s.success())
    };
    let bwrap = || {
        Command::new("bwrap")
            .args(["--unshare-all", "--bind"])
            .arg(&rootfs)
            .args(["/", "--proc", "/proc", "--dev", "/dev", "/bin/true"])
            .status()
            .is_ok_and(|s| s.success())
    };

    // Warm-up (the first `mistryd` run registers the shared holder the others join).
    for _ in 0..10 {
        lib();
        held();
        cli();
        small();
        if have_bwrap {
            bwrap();
        }
    }
    let (mut a, mut b, mut c, mut h) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut s1 = Vec::new();
    for _ in 0..runs {
        a.push(time(lib));
        h.push(time(held));
        b.push(time(cli));
        s1.push(time(small));
        if have_bwrap {
            c.push(time(bwrap));
        }
    }
    println!(
        "sandbox start-up, /bin/true in {} ({runs} runs each, interleaved)",
        rootfs.display()
    );
    println!("{:<10} {:>10} {:>10}", "", "median", "p90");
    println!(
        "{:<10} {:>8.2}ms {:>8.2}ms",
        "library",
        ms(median(&mut a)),
        ms(p90(&mut a))
    );
    println!(
        "{:<10} {:>8.2}ms {:>8.2}ms",
        "held",
        ms(median(&mut h)),
        ms(p90(&mut h))
    );
    println!(
        "{:<10} {:>8.2}ms {:>8.2}ms",
        "mistryd",
        ms(median(&mut b)),
        ms(p90(&mut b))
    );
    println!(
        "{:<10} {:>8.2}ms {:>8.2}ms",
        "small",
        ms(median(&mut s1)),
        ms(p90(&mut s1))
    );
    if have_bwrap {
        println!(
            "{:<10} {:>8.2}ms {:>8.2}ms",
            "bwrap",
            ms(median(&mut c)),
            ms(p90(&mut c))
        );
        println!(
            "ratio small/bwrap: {:.2} (target <= 1.2; mistryd/bwrap: {:.2}, library/bwrap: {:.2}, held/bwrap: {:.2}); targets: held <= 3 ms and <= bwrap, mistryd <= 5 ms",
            ms(median(&mut s1)) / ms(median(&mut c)),
            ms(median(&mut b)) / ms(median(&mut c)),
            ms(median(&mut a)) / ms(median(&mut c)),
            ms(median(&mut h)) / ms(median(&mut c)),
        );
    } else {
        println!("bwrap not installed (apt-get install bubblewrap): no comparison");
    }
}
