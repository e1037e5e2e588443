//! Shared by the end-to-end tests of the `mistry` package.
//!
//! `MISTRY_HELPER_BIN` names the mistryd binary and `MISTRY_TEST_IMAGES` the base images when
//! the tests run as another user (scripts/test.sh's unprivileged run).
#![allow(dead_code)]

pub mod server;

use std::net::TcpListener;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The mistryd binary.
pub fn mistryd_bin() -> std::ffi::OsString {
    std::env::var_os("MISTRY_HELPER_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_mistryd").into())
}

/// The image helper command (`mistryd internal`).
pub fn helper() -> Vec<std::ffi::OsString> {
    vec![mistryd_bin(), "internal".into()]
}

/// The directory of local base images (with `busybox`, from images/recipes/busybox.sh).
pub fn images_dir() -> PathBuf {
    let dir = std::env::var_os("MISTRY_TEST_IMAGES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/images"));
    assert!(
        dir.join("busybox/index.json").is_file(),
        "no busybox image in {}: run scripts/setup.sh",
        dir.display()
    );
    dir
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Poll `cond` every 20 ms for up to 10 s.
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
