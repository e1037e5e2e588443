//! The on-disk layout of build results, mistry's: the one place that knows where a job's files
//! are.
//!
//! ```text
//! <build_path>/<project>/pending/<id>/     while the job runs
//! <build_path>/<project>/ready/<id>/       when it ended (renamed from pending)
//!     data/{cache,artifacts,params/<name>} mounted at /data in the job
//!     out.log                              image build output + job stdout and stderr
//!     stderr.log                           job stderr alone (ContainerStderr)
//!     build_info.json                      BuildInfo without the two log fields
//! <build_path>/<project>/latest            link to the last successful build without a group
//! <build_path>/<project>/groups/<group>    link to the group's last successful build
//! ```

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

use crate::jobs::{self, BuildInfo};

/// Where a job's directory is: `pending/` while it runs, `ready/` once it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// `<build_path>/<project>/pending/<id>`: the job runs (or a crash left it).
    Pending,
    /// `<build_path>/<project>/ready/<id>`: the job ended, success or failure.
    Ready,
}

impl Stage {
    /// The directory's name, also the state `/index/` shows.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Pending => "pending",
            Stage::Ready => "ready",
        }
    }
}

/// The sub-directories of a job's `data/`, mounted at `/data/<name>`.
pub const DATA_DIRS: [&str; 3] = ["cache", "artifacts", "params"];

/// The root of all build results (`build_path`).
#[derive(Debug, Clone)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    /// The layout under `build_path` (the configuration's, canonicalized).
    pub fn new(build_path: impl Into<PathBuf>) -> Layout {
        Layout {
            root: build_path.into(),
        }
    }

    fn project(&self, project: &str) -> PathBuf {
        self.root.join(project)
    }

    /// Job `id` of `project` in `stage` (whether it exists or not).
    pub fn job(&self, project: &str, id: &str, stage: Stage) -> JobDir {
        JobDir {
            project: project.to_string(),
            id: id.to_string(),
            stage,
            path: self.project(project).join(stage.as_str()).join(id),
        }
    }

    /// Every project with a directory of builds (valid names only), sorted.
    pub fn projects(&self) -> Vec<String> {
        let Ok(entries) = fs::read_dir(&self.root) else {
            return Vec::new();
        };
        let mut v: Vec<String> = entries
            .flatten()
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| jobs::check_name("project", n).is_ok())
            .collect();
        v.sort();
        v
    }

    /// The jobs of `project` in `stage`, in no particular order.
    pub fn jobs(&self, project: &str, stage: Stage) -> Vec<JobDir> {
        let Ok(entries) = fs::read_dir(self.project(project).join(stage.as_str())) else {
            return Vec::new();
        };
        entries
            .flatten()
            .map(|e| self.job(project, &e.file_name().to_string_lossy(), stage))
            .collect()
    }

    /// How many jobs `project` has in `stage`.
    pub fn count(&self, project: &str, stage: Stage) -> usize {
        fs::read_dir(self.project(project).join(stage.as_str()))
            .map_or(0, std::iter::Iterator::count)
    }

    /// Make `<project>/<stage>/` (the parent of that stage's job directories).
    pub fn create_stage(&self, project: &str, stage: Stage) -> io::Result<()> {
        fs::create_dir_all(self.project(project).join(stage.as_str()))
    }

    /// The link a successful build moves: `latest`, or `groups/<group>` for a group.
    pub fn link(&self, project: &str, group: &str) -> PathBuf {
        if group.is_empty() {
            self.project(project).join("latest")
        } else {
            self.project(project).join("groups").join(group)
        }
    }

    /// The group's last successful build (where its link points), if it still has a `data/`
    /// and is a build of that group (a build of the same ID replaced by another request's, in
    /// the cluster, is not).
    pub fn last_good(&self, project: &str, group: &str) -> Option<PathBuf> {
        if group.is_empty() {
            return None;
        }
        #[derive(serde::Deserialize)]
        struct Group {
            #[serde(rename = "Group", default)]
            group: String,
        }
        let of_group = |p: &PathBuf| {
            fs::read(p.join("build_info.json"))
                .ok()
                .and_then(|t| serde_json::from_slice::<Group>(&t).ok())
                .is_some_and(|g| g.group == group)
        };
        fs::canonicalize(self.link(project, group))
            .ok()
            .filter(|p| {
                fs::symlink_metadata(p.join("data")).is_ok_and(|m| m.is_dir()) && of_group(p)
            })
    }

    /// `<build_path>/<project>`.
    pub fn project_dir(&self, project: &str) -> PathBuf {
        self.project(project)
    }
}

/// Options to open one of the daemon's own files of a job directory (its logs, its BuildInfo),
/// next to `data/`: the job never sees them, and a symlink there (which only something else
/// than the daemon could have made) is refused, never followed.
fn own_file() -> OpenOptions {
    use std::os::unix::fs::OpenOptionsExt;
    let mut o = OpenOptions::new();
    o.custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC);
    o
}

/// Read one of the daemon's own files of a job directory (see [`own_file`]; never blocking on
/// a FIFO).
fn read_own(path: &Path) -> io::Result<Vec<u8>> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut text = Vec::new();
    let mut f = own_file()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)?;
    io::Read::read_to_end(&mut f, &mut text)?;
    Ok(text)
}

/// One job's directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobDir {
    project: String,
    id: String,
    stage: Stage,
    path: PathBuf,
}

impl JobDir {
    /// `<build_path>/<project>/<stage>/<id>`.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// The job's project.
    pub fn project(&self) -> &str {
        &self.project
    }
    /// The job's ID.
    pub fn id(&self) -> &str {
        &self.id
    }
    /// Whether this is the `pending/` or the `ready/` path.
    pub fn stage(&self) -> Stage {
        self.stage
    }
    /// Mounted at `/data` in the job.
    pub fn data(&self) -> PathBuf {
        self.path.join("data")
    }
    /// `data/params`: one file per param.
    pub fn params(&self) -> PathBuf {
        self.data().join("params")
    }
    /// Image build output, the job's stdout and stderr.
    pub fn out_log(&self) -> PathBuf {
        self.path.join("out.log")
    }
    /// The job's stderr alone.
    pub fn stderr_log(&self) -> PathBuf {
        self.path.join("stderr.log")
    }
    fn info_file(&self) -> PathBuf {
        self.path.join("build_info.json")
    }

    /// The same job in `stage`.
    pub fn in_stage(&self, stage: Stage) -> JobDir {
        let base = self
            .path
            .parent()
            .and_then(Path::parent)
            .unwrap_or(&self.path);
        JobDir {
            project: self.project.clone(),
            id: self.id.clone(),
            stage,
            path: base.join(stage.as_str()).join(&self.id),
        }
    }

    /// `Path` of a BuildInfo: the artifacts once the job is ready.
    pub fn artifacts_when_ready(&self) -> PathBuf {
        self.in_stage(Stage::Ready).data().join("artifacts")
    }

    /// Whether the directory exists (`Path::exists`: a link is followed).
    pub fn exists(&self) -> bool {
        self.path.exists()
    }

    /// Whether it is a directory (a link is followed).
    pub fn is_dir(&self) -> bool {
        self.path.is_dir()
    }

    /// The stored BuildInfo (without its log fields); `None` when there is none or it does not
    /// parse.
    pub fn read_info(&self) -> Option<BuildInfo> {
        let text = read_own(&self.info_file()).ok()?;
        serde_json::from_slice(&text).ok()
    }

    /// Only the stored start time (what listing sorts by), so that a job's params are not held
    /// while sorting.
    pub fn read_started_at(&self) -> Option<String> {
        #[derive(serde::Deserialize)]
        struct Started {
            #[serde(rename = "StartedAt", default)]
            started_at: String,
        }
        let text = read_own(&self.info_file()).ok()?;
        serde_json::from_slice::<Started>(&text)
            .ok()
            .map(|s| s.started_at)
    }

    /// Store `info` (without its log fields, which are the log files) atomically: readers see
    /// the old or the new BuildInfo, never half of one.
    pub fn write_info(&self, info: &BuildInfo) -> io::Result<()> {
        let stored = BuildInfo {
            container_stdouterr: String::new(),
            container_stderr: String::new(),
            ..info.clone()
        };
        let json = serde_json::to_vec_pretty(&stored).map_err(io::Error::other)?;
        let tmp = self.path.join(".build_info.json.tmp");
        io::Write::write_all(
            &mut own_file()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)?,
            &json,
        )?;
        fs::rename(&tmp, self.info_file())
    }

    /// `out.log`, for appending (created if missing).
    pub fn append_log(&self) -> io::Result<File> {
        own_file().create(true).append(true).open(self.out_log())
    }

    /// `stderr.log`, created empty.
    pub fn create_stderr_log(&self) -> io::Result<File> {
        own_file()
            .write(true)
            .create(true)
            .truncate(true)
            .open(self.stderr_log())
    }

    /// Rename this (pending) directory to its place in `ready/`, which must not exist.
    pub fn rename_to_ready(&self) -> io::Result<JobDir> {
        let ready = self.in_stage(Stage::Ready);
        if let Some(parent) = ready.path.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::rename(&self.path, &ready.path)?;
        Ok(ready)
    }

    /// Point `link` at this job's directory, atomically.
    pub fn link_from(&self, link: &Path) -> io::Result<()> {
        if let Some(parent) = link.parent() {
            fs::create_dir_all(parent)?;
        }
        let tmp = link.with_file_name(format!(
            ".{}.tmp-{}",
            link.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            std::process::id()
        ));
        let _ = fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&self.path, &tmp)?;
        fs::rename(&tmp, link)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_follow_mistry() {
        let l = Layout::new("/b");
        let j = l.job("p", "abc", Stage::Pending);
        assert_eq!(j.path(), Path::new("/b/p/pending/abc"));
        assert_eq!(j.data(), Path::new("/b/p/pending/abc/data"));
        assert_eq!(j.params(), Path::new("/b/p/pending/abc/data/params"));
        assert_eq!(j.out_log(), Path::new("/b/p/pending/abc/out.log"));
        assert_eq!(j.stderr_log(), Path::new("/b/p/pending/abc/stderr.log"));
        assert_eq!(
            j.artifacts_when_ready(),
            Path::new("/b/p/ready/abc/data/artifacts")
        );
        assert_eq!(j.in_stage(Stage::Ready), l.job("p", "abc", Stage::Ready));
        assert_eq!(l.link("p", ""), Path::new("/b/p/latest"));
        assert_eq!(l.link("p", "g"), Path::new("/b/p/groups/g"));
    }

    #[test]
    fn info_is_written_whole_and_moves_to_ready() {
        let dir = tempfile::tempdir().unwrap();
        let l = Layout::new(dir.path());
        let j = l.job("p", "id", Stage::Pending);
        fs::create_dir_all(j.path()).unwrap();
        assert_eq!(j.read_info(), None);
        let info = BuildInfo {
            params: Default::default(),
            group: "g".into(),
            path: "x".into(),
            cached: false,
            coalesced: false,
            incremental: true,
            exit_code: 3,
            err_build: String::new(),
            container_stdouterr: "log".into(),
            container_stderr: "err".into(),
            transport_method: "rsync".into(),
            started_at: "2024-01-01T00:00:00Z".into(),
            duration: 1,
            url: "job/p/id".into(),
            retries: 0,
        };
        j.write_info(&info).unwrap();
        let back = j.read_info().unwrap();
        assert_eq!(back.container_stdouterr, "");
        assert_eq!((back.exit_code, back.incremental), (3, true));
        assert_eq!(j.read_started_at().unwrap(), "2024-01-01T00:00:00Z");
        let names: Vec<_> = fs::read_dir(j.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names, ["build_info.json"]);
        let r = j.rename_to_ready().unwrap();
        assert_eq!(r.stage(), Stage::Ready);
        assert!(!j.exists() && r.read_info().is_some());
        assert_eq!(l.count("p", Stage::Ready), 1);
        let link = l.link("p", "g");
        r.link_from(&link).unwrap();
        assert_eq!(l.last_good("p", "g"), None, "no data/ yet");
        fs::create_dir(r.data()).unwrap();
        assert_eq!(
            l.last_good("p", "g").unwrap(),
            r.path().canonicalize().unwrap()
        );
        // A link to another group's build is not followed.
        r.link_from(&l.link("p", "h")).unwrap();
        assert_eq!(l.last_good("p", "h"), None);
        assert_eq!(l.projects(), ["p"]);
    }
}
