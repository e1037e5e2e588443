//! A real registry for the tests: Debian's `docker-registry` on 127.0.0.1, on a port the kernel
//! chooses (it logs the address it listens on), filled with `skopeo` from OCI layouts.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{lines_of, wait_for_line};

pub(crate) struct Registry {
    child: Child,
    pub addr: String,
    pub storage: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// User and password of a registry started with `auth`.
pub(crate) const USER: &str = "tester";
pub(crate) const PASSWORD: &str = "s3cret";

impl Registry {
    /// Start a registry; with `auth`, it requires [`USER`] / [`PASSWORD`] (htpasswd).
    pub(crate) fn start(auth: bool) -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let storage = dir.path().join("storage");
        // Port 0: the kernel chooses, the registry logs `listening on ADDR` (at level info).
        let mut config = format!(
            "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:0\n",
            storage.display()
        );
        if auth {
            let htpasswd = dir.path().join("htpasswd");
            let out = Command::new("htpasswd")
                .args(["-Bbc"])
                .arg(&htpasswd)
                .args([USER, PASSWORD])
                .output()
                .expect("htpasswd (apt-get install apache2-utils)");
            assert!(out.status.success());
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: test\n    path: {}\n",
                htpasswd.display()
            ));
        }
        let cfg = dir.path().join("config.yml");
        std::fs::write(&cfg, config).unwrap();
        let mut child = Command::new("docker-registry")
            .arg("serve")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("docker-registry (apt-get install docker-registry)");
        let log = lines_of(child.stderr.take().unwrap());
        let addr = wait_for_line(&log, Duration::from_secs(20), |l| {
            let (_, rest) = l.split_once("msg=\"listening on ")?;
            Some(rest.split('"').next()?.to_string())
        })
        .unwrap_or_else(|out| panic!("the registry did not start:\n{out}"));
        // Its log goes on being read (and dropped) on lines_of's thread.
        drop(log);
        Registry {
            child,
            addr,
            storage,
            _dir: dir,
        }
    }

    /// Copy the OCI layout `layout` (`DIR[:TAG]`) to `name` (`repo:tag`) in the registry.
    pub(crate) fn push(&self, layout: &str, name: &str, creds: bool, all: bool) {
        let mut cmd = super::containers_tool("skopeo", self._dir.path());
        cmd.args(["copy", "--quiet", "--dest-tls-verify=false"]);
        if all {
            cmd.arg("--all");
        }
        if creds {
            cmd.args(["--dest-creds", &format!("{USER}:{PASSWORD}")]);
        }
        let out = cmd
            .arg(format!("oci:{layout}"))
            .arg(format!("docker://{}/{name}", self.addr))
            .output()
            .expect("skopeo");
        assert!(
            out.status.success(),
            "skopeo: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
