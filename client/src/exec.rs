//! `mistry exec`: run a project's job (or a whole pipeline) on this machine with no server. The
//! client links no engine, so it hands the run to `mistryd exec` (next to the `mistry` binary,
//! else on `PATH`); [`ExecArgs`] is the one definition of the options, shared by both binaries
//! (so the completions of `mistry` know them).

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use clap::Args;

/// Options of `mistry exec` / `mistryd exec`.
#[derive(Debug, Clone, Args)]
pub struct ExecArgs {
    /// The project's directory (one with a Dockerfile); default: the current directory.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["projects", "project"])]
    pub project_dir: Option<PathBuf>,
    /// A projects directory (as a server's `projects_path`), with --project or --pipeline.
    #[arg(long, value_name = "DIR")]
    pub projects: Option<PathBuf>,
    /// The project in --projects to run.
    #[arg(long, requires = "projects", conflicts_with = "pipeline")]
    pub project: Option<String>,
    /// Run the pipeline `<projects>/pipelines/NAME.json` instead of one project.
    #[arg(long, value_name = "NAME", requires = "projects")]
    pub pipeline: Option<String>,
    /// Group (builds of a group start from the group's last successful build).
    #[arg(long, short = 'g', default_value = "")]
    pub group: String,
    /// Where the artifacts are copied to; created if missing.
    #[arg(long, short = 't', value_name = "TARGET")]
    pub target: Option<PathBuf>,
    /// The local state: builds, the layer store, caches (default: $XDG_CACHE_HOME/mistry, else
    /// ~/.cache/mistry).
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Local base images (a directory of OCI layouts, as a server's `images_path`).
    #[arg(long, value_name = "DIR")]
    pub images: Option<PathBuf>,
    /// Rebuild the project's image, ignoring its cache (and re-run a cached job).
    #[arg(long)]
    pub rebuild: bool,
    /// Job params: `--name=value` or `--name value`; `@file` reads the value from a file.
    #[arg(last = true, value_name = "PARAMS")]
    pub params: Vec<String>,
}

/// `mistry exec`: [`ExecArgs`] and the daemon's configuration file, which `mistryd` takes as
/// its global `--config`.
#[derive(Debug, Clone, Args)]
pub struct ExecCommand {
    /// The daemon's configuration file (as `mistryd --config`): the run takes its settings as
    /// the server applies them to a job (network, limits, seccomp, secrets, registries, mounts,
    /// time limits, images_path); its projects_path, build_path and store_path are replaced by
    /// the run's. Unknown or invalid settings are refused.
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Everything else (what `mistryd exec` takes too).
    #[command(flatten)]
    pub args: ExecArgs,
}

impl ExecCommand {
    /// The arguments of `mistryd exec` for this command.
    pub fn to_args(&self) -> Vec<OsString> {
        let mut v: Vec<OsString> = Vec::new();
        if let Some(c) = &self.config {
            v.push("--config".into());
            v.push(c.clone().into_os_string());
        }
        v.extend(self.args.to_args());
        v
    }
}

impl ExecArgs {
    /// The same options as command-line arguments (what `mistry exec` passes to `mistryd exec`).
    pub fn to_args(&self) -> Vec<OsString> {
        let mut v: Vec<OsString> = Vec::new();
        let mut opt = |name: &str, value: Option<&OsString>| {
            if let Some(value) = value {
                v.push(name.into());
                v.push(value.clone());
            }
        };
        let os = |p: &Option<PathBuf>| p.as_ref().map(|p| p.clone().into_os_string());
        opt("--project-dir", os(&self.project_dir).as_ref());
        opt("--projects", os(&self.projects).as_ref());
        opt(
            "--project",
            self.project.clone().map(OsString::from).as_ref(),
        );
        opt(
            "--pipeline",
            self.pipeline.clone().map(OsString::from).as_ref(),
        );
        if !self.group.is_empty() {
            opt("--group", Some(&OsString::from(&self.group)));
        }
        opt("--target", os(&self.target).as_ref());
        opt("--state-dir", os(&self.state_dir).as_ref());
        opt("--images", os(&self.images).as_ref());
        if self.rebuild {
            v.push("--rebuild".into());
        }
        if !self.params.is_empty() {
            v.push("--".into());
            v.extend(self.params.iter().map(OsString::from));
        }
        v
    }
}

/// The `mistryd` binary: next to `exe` (the running `mistry`), else the first on `path`.
pub fn find_mistryd(exe: Option<&Path>, path: Option<&std::ffi::OsStr>) -> Option<PathBuf> {
    let beside = exe.and_then(|e| e.parent()).map(|d| d.join("mistryd"));
    if let Some(b) = beside.filter(|b| is_executable(b)) {
        return Some(b);
    }
    std::env::split_paths(path?)
        .map(|d| d.join("mistryd"))
        .find(|c| is_executable(c))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Run `mistry exec`: replace this process with `mistryd exec ...` (its output, exit code and
/// signals are the run's). Returns only on error.
pub fn exec(cmd: ExecCommand) -> Result<i32> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().ok();
    let Some(mistryd) = find_mistryd(exe.as_deref(), std::env::var_os("PATH").as_deref()) else {
        bail!(
            "mistry exec runs jobs with mistryd, which is neither next to {} nor on PATH: install \
             mistryd beside mistry",
            exe.as_deref()
                .map_or_else(|| "mistry".into(), |e| e.display().to_string())
        );
    };
    let err = std::process::Command::new(&mistryd)
        .arg("exec")
        .args(cmd.to_args())
        .exec();
    bail!("running {}: {err}", mistryd.display())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        a: ExecArgs,
    }

    #[test]
    fn args_round_trip() {
        let argv = [
            "x",
            "--projects",
            "/p",
            "--project",
            "web",
            "-g",
            "main",
            "-t",
            "out dir",
            "--state-dir",
            "/s",
            "--images",
            "/i",
            "--rebuild",
            "--",
            "--a=1",
            "--b",
            "two",
        ];
        let t = T::try_parse_from(argv).unwrap();
        let back: Vec<String> =
            t.a.to_args()
                .into_iter()
                .map(|s| s.into_string().unwrap())
                .collect();
        assert_eq!(
            back,
            [
                "--projects",
                "/p",
                "--project",
                "web",
                "--group",
                "main",
                "--target",
                "out dir",
                "--state-dir",
                "/s",
                "--images",
                "/i",
                "--rebuild",
                "--",
                "--a=1",
                "--b",
                "two"
            ]
        );
        let again = T::try_parse_from(std::iter::once("x".to_string()).chain(back)).unwrap();
        assert_eq!(again.a.params, ["--a=1", "--b", "two"]);
        assert!(T::try_parse_from(["x", "--project-dir", "d", "--projects", "p"]).is_err());
        assert!(T::try_parse_from(["x", "--project", "p"]).is_err());
        assert!(
            T::try_parse_from(["x", "--projects", "p", "--project", "a", "--pipeline", "b"])
                .is_err()
        );
    }

    #[test]
    fn the_config_file_goes_first() {
        #[derive(Parser)]
        struct C {
            #[command(flatten)]
            c: ExecCommand,
        }
        let c = C::try_parse_from([
            "x",
            "--project-dir",
            "d",
            "-c",
            "/etc/m.json",
            "--",
            "--a=1",
        ])
        .unwrap();
        let back: Vec<String> =
            c.c.to_args()
                .into_iter()
                .map(|s| s.into_string().unwrap())
                .collect();
        assert_eq!(
            back,
            [
                "--config",
                "/etc/m.json",
                "--project-dir",
                "d",
                "--",
                "--a=1"
            ]
        );
    }

    #[test]
    fn mistryd_beside_then_on_path() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        let make = |p: &Path| {
            std::fs::write(p, "#!/bin/sh\n").unwrap();
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
        };
        let exe = a.join("mistry");
        let path = std::env::join_paths([&b]).unwrap();
        assert_eq!(find_mistryd(Some(&exe), Some(&path)), None);
        make(&b.join("mistryd"));
        assert_eq!(
            find_mistryd(Some(&exe), Some(&path)),
            Some(b.join("mistryd"))
        );
        make(&a.join("mistryd"));
        assert_eq!(
            find_mistryd(Some(&exe), Some(&path)),
            Some(a.join("mistryd"))
        );
    }
}
