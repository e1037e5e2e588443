//! Builds replicate between agents on demand: an agent that must answer for a build another
//! agent holds (its artifacts, a cache hit, a group's next incremental build) fetches the whole
//! build into its own `build_path`, verified, then renamed into `ready/` atomically.
//!
//! The serving side, `GET /api/build/{project}/{id}[?cache=1]` (`engine::export`, its route the
//! server's): the ready
//! build as an uncompressed tar, streamed, read by fd below the job directory without following
//! a link (the walk of `GET /artifacts`, `crate::tree::append_tree`): `data/`,
//! `data/params/<name>` (regular files only), `data/artifacts/**` (links sent as links),
//! with `?cache=1` the build's complete cache as `data/cache/**` (a layered cache is squashed
//! first and its `cache-flat` sent), then `out.log`, `stderr.log` and, last, `build_info.json`
//! (so a stream cut short lacks it and is refused). Failed builds are served too: their
//! BuildInfo is a result the other agent shows. 404 for a build that is not ready here.
//!
//! The fetching side, [`fetch_build`]: unpacks into a scratch directory the engine gives
//! (`engine::import::Importer::scratch`: `<project>/pending/.fetch-<id>-<pid>-<n>`, removed at
//! daemon start, as every pending build), accepting only the names above, only
//! regular files, directories and (below `data/artifacts` and `data/cache`) symlinks, each
//! created new, never through a link (a name whose parent is not a directory of the stream is
//! refused); modes are kept but for setuid/setgid bits, the files become this daemon's user's.
//! The BuildInfo must parse and name this project and job; its `Path` is rewritten to this
//! agent's. Then the engine places it (`Importer::place`: `renameat2(RENAME_NOREPLACE)` to
//! `ready/<id>` under the project's link lock): a build already there wins. The cluster never
//! writes `ready/` or the links itself.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustix::fs::{AtFlags, Timespec, Timestamps};

use crate::engine::import::{Importer, Placed};
use crate::engine::{Engine, JobDir, Stage};
use crate::jobs::{self, BuildInfo};

/// Why a build could not be fetched from another agent. Every message names the agent, the
/// project and the job.
#[derive(Debug, thiserror::Error)]
pub enum ReplicateError {
    /// A project or job name that is not valid (nothing was asked).
    #[error("not fetching build {project}/{id} from {agent}: {reason}")]
    BadName {
        /// The other agent's URL, without a trailing `/`.
        agent: String,
        /// The project.
        project: String,
        /// The job ID.
        id: String,
        /// Why, on one line.
        reason: String,
    },
    /// The agent has no ready build of that ID (404).
    #[error("build {project}/{id} is not available from {agent}: {message}")]
    NotFound {
        /// The other agent's URL, without a trailing `/`.
        agent: String,
        /// The project.
        project: String,
        /// The job ID.
        id: String,
        /// The agent's message, or the transport error.
        message: String,
    },
    /// The agent could not be reached, answered with another error, or the stream broke off.
    #[error("fetching build {project}/{id} from {agent}: {message}")]
    Transfer {
        /// The other agent's URL, without a trailing `/`.
        agent: String,
        /// The project.
        project: String,
        /// The job ID.
        id: String,
        /// The agent's message, or the transport error.
        message: String,
    },
    /// What the agent sent is not a build this agent accepts (an unsafe name or entry, another
    /// job's BuildInfo, a missing part): nothing of it is kept.
    #[error("refusing build {project}/{id} from {agent}: {reason}")]
    Refused {
        /// The other agent's URL, without a trailing `/`.
        agent: String,
        /// The project.
        project: String,
        /// The job ID.
        id: String,
        /// Why, on one line.
        reason: String,
    },
    /// Writing the build on this agent failed.
    #[error("storing build {project}/{id} fetched from {agent}: {what}: {source}")]
    Io {
        /// The other agent's URL, without a trailing `/`.
        agent: String,
        /// The project.
        project: String,
        /// The job ID.
        id: String,
        /// The step, e.g. `writing build_info.json`.
        what: String,
        /// The I/O error.
        source: io::Error,
    },
}

/// The agent, project and job of one fetch, to make its errors.
#[derive(Clone)]
struct Ctx {
    agent: String,
    project: String,
    id: String,
}

impl Ctx {
    fn refused(&self, reason: impl Into<String>) -> ReplicateError {
        ReplicateError::Refused {
            agent: self.agent.clone(),
            project: self.project.clone(),
            id: self.id.clone(),
            reason: reason.into(),
        }
    }
    fn transfer(&self, message: impl Into<String>) -> ReplicateError {
        ReplicateError::Transfer {
            agent: self.agent.clone(),
            project: self.project.clone(),
            id: self.id.clone(),
            message: message.into(),
        }
    }
    fn io(&self, what: impl Into<String>) -> impl FnOnce(io::Error) -> ReplicateError + '_ {
        let what = what.into();
        move |source| ReplicateError::Io {
            agent: self.agent.clone(),
            project: self.project.clone(),
            id: self.id.clone(),
            what,
            source,
        }
    }
}

/// The longest entry name accepted: what [`crate::tree::append_tree`] sends (at most
/// [`images::walk::MAX_PATH`] bytes below its root) under `data/artifacts/`.
const MAX_NAME: usize = images::walk::MAX_PATH + "data/artifacts/".len();

/// The largest `build_info.json` accepted (its params included).
const MAX_INFO: u64 = 64 << 20;

/// Fetch ready build `project`/`id` from the agent at `agent_url` (`http://host:port`) into
/// `layout` (this agent's `build_path`): downloaded into a scratch directory under
/// `<project>/pending/`, checked (see the module's documentation), its BuildInfo's `Path`
/// rewritten to this agent's, then renamed to `ready/<id>` atomically. A build already in
/// `ready/<id>` (before, or meanwhile) wins and is returned. `with_cache`: with the build's
/// complete cache as `data/cache` (one tree, no layers), so that the group's next build here
/// continues from it: a successful build fetched with its cache becomes its group's last build
/// on this agent (`groups/<group>`, or `latest`) unless this agent has a newer successful one.
pub async fn fetch_build(
    agent_url: &str,
    importer: &Importer,
    project: &str,
    id: &str,
    with_cache: bool,
) -> Result<JobDir, ReplicateError> {
    let ctx = Ctx {
        agent: agent_url.trim_end_matches('/').to_string(),
        project: project.to_string(),
        id: id.to_string(),
    };
    let importer = importer.clone();
    let c2 = ctx.clone();
    tokio::task::spawn_blocking(move || fetch_blocking(&c2, &importer, with_cache))
        .await
        .map_err(|e| ctx.transfer(format!("the fetch panicked: {e}")))?
}

/// Percent-encode one path segment (names may hold spaces and `?`).
fn encode(segment: &str) -> String {
    let mut s = String::new();
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            s.push(b as char);
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    s
}

/// Counts the bytes read through it.
struct Counting<R> {
    inner: R,
    n: u64,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.n += n as u64;
        Ok(n)
    }
}

fn fetch_blocking(
    ctx: &Ctx,
    importer: &Importer,
    with_cache: bool,
) -> Result<JobDir, ReplicateError> {
    let layout = importer.layout();
    let (project, id) = (ctx.project.as_str(), ctx.id.as_str());
    if let Err(reason) =
        jobs::check_name("project", project).and_then(|()| jobs::check_name("job", id))
    {
        return Err(ReplicateError::BadName {
            agent: ctx.agent.clone(),
            project: project.into(),
            id: id.into(),
            reason: reason.to_string(),
        });
    }
    let ready = layout.job(project, id, Stage::Ready);
    if ready.is_dir() {
        return Ok(ready);
    }
    let url = format!(
        "{}/api/build/{}/{}{}",
        ctx.agent,
        encode(project),
        encode(id),
        if with_cache { "?cache=1" } else { "" }
    );
    let agent = ureq::Agent::new_with_config(
        ureq::config::Config::builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(10)))
            // The serving agent may squash a deep cache before it sends anything.
            .timeout_recv_response(Some(Duration::from_secs(600)))
            .timeout_per_read(Some(Duration::from_secs(120)))
            .build(),
    );
    let mut request = agent.get(&url);
    // Agents' build endpoints answer only each other (the cluster token).
    if let Some(auth) = crate::access::cluster_authorization() {
        request = request.header("authorization", auth);
    }
    let mut resp = request.call().map_err(|e| ctx.transfer(e.to_string()))?;
    let status = resp.status().as_u16();
    if status != 200 {
        let text = resp
            .body_mut()
            .with_config()
            .limit(64 * 1024)
            .read_to_string()
            .unwrap_or_default();
        let message = text.trim().to_string();
        return Err(match status {
            404 => ReplicateError::NotFound {
                agent: ctx.agent.clone(),
                project: project.into(),
                id: id.into(),
                message,
            },
            _ => ctx.transfer(format!("the agent answered {status}: {message}")),
        });
    }
    let body = resp.into_body().into_with_config().limit(u64::MAX).reader();

    let scratch = importer
        .scratch(project, id)
        .map_err(ctx.io("creating a scratch directory in pending/"))?;
    let mut counting = Counting { inner: body, n: 0 };
    let result = unpack_and_place(ctx, importer, &scratch, &ready, &mut counting, with_cache);
    match result {
        Ok(Placed::New) => {
            tracing::info!(
                "fetched build {project}/{id} from {} ({} bytes, {})",
                ctx.agent,
                counting.n,
                if with_cache {
                    "with cache"
                } else {
                    "without cache"
                }
            );
            Ok(ready)
        }
        Ok(Placed::Existing) => {
            importer.discard(&scratch);
            tracing::info!(
                "build {project}/{id} fetched from {} appeared here meanwhile: the local one stays",
                ctx.agent
            );
            Ok(ready)
        }
        Err(e) => {
            importer.discard(&scratch);
            Err(e)
        }
    }
}

/// What a name of the stream is.
#[derive(Debug, PartialEq, Eq)]
enum Part {
    Info,
    Log,
    /// `data`, `data/artifacts`, `data/params`, `data/cache`: directories.
    DataDir,
    /// `data/params/<name>`: a regular file.
    Param,
    /// Below `data/artifacts` or `data/cache`: files, directories and symlinks.
    Tree,
}

/// Which part of a build `path` names; `None` for anything else. Only plain names (no `..`,
/// `.`, root, or empty ones) get here.
fn classify(parts: &[&OsStr], with_cache: bool) -> Option<Part> {
    let s = |p: &OsStr| p.to_str().map(str::to_string);
    let first = s(parts[0])?;
    match (first.as_str(), parts.len()) {
        ("build_info.json", 1) => Some(Part::Info),
        ("out.log" | "stderr.log", 1) => Some(Part::Log),
        ("data", 1) => Some(Part::DataDir),
        ("data", _) => {
            let second = s(parts[1])?;
            let tree = second == "artifacts" || (second == "cache" && with_cache);
            match (second.as_str(), parts.len()) {
                ("params", 2) => Some(Part::DataDir),
                ("params", 3) => {
                    let name = s(parts[2])?;
                    jobs::check_name("param", &name).ok().map(|()| Part::Param)
                }
                (_, 2) if tree => Some(Part::DataDir),
                _ if tree => Some(Part::Tree),
                _ => None,
            }
        }
        _ => None,
    }
}

fn kind_name(t: tar::EntryType) -> String {
    match t {
        tar::EntryType::Link => "a hard link".into(),
        tar::EntryType::Char => "a character device".into(),
        tar::EntryType::Block => "a block device".into(),
        tar::EntryType::Fifo => "a FIFO".into(),
        tar::EntryType::Symlink => "a symlink".into(),
        tar::EntryType::Directory => "a directory".into(),
        tar::EntryType::Regular => "a file".into(),
        other => format!("an entry of type {:?}", other.as_byte() as char),
    }
}

fn timestamps(mtime: u64) -> Timestamps {
    let t = Timespec {
        tv_sec: i64::try_from(mtime).unwrap_or(0),
        tv_nsec: 0,
    };
    Timestamps {
        last_access: t,
        last_modification: t,
    }
}

/// Unpack the stream into `scratch`, check it, store the BuildInfo, and rename it to `ready`.
fn unpack_and_place(
    ctx: &Ctx,
    importer: &Importer,
    scratch: &JobDir,
    ready: &JobDir,
    body: &mut dyn Read,
    with_cache: bool,
) -> Result<Placed, ReplicateError> {
    let root = scratch.path();
    let mut archive = tar::Archive::new(body);
    // Directories made (relative to the scratch directory; "" is the scratch itself), and every
    // name made, so that nothing is written twice or through something of the stream.
    let mut dirs: HashSet<PathBuf> = HashSet::from([PathBuf::new()]);
    let mut made: HashSet<PathBuf> = HashSet::new();
    // Modes and times of directories, applied once their contents are in.
    let mut dir_meta: Vec<(PathBuf, u32, u64)> = Vec::new();
    let mut info_bytes: Option<Vec<u8>> = None;
    let broken = |e: io::Error| ctx.transfer(format!("reading the build's tar stream: {e}"));
    for entry in archive.entries().map_err(broken)? {
        let mut entry = entry.map_err(broken)?;
        let raw = entry.path_bytes().into_owned();
        if raw.len() > MAX_NAME {
            let head = String::from_utf8_lossy(&raw[..64]).into_owned();
            return Err(ctx.refused(format!(
                "entry {head:?}…: its name is longer than {MAX_NAME} bytes (what a build sends \
                 is at most {} bytes below data/artifacts or data/cache)",
                images::walk::MAX_PATH
            )));
        }
        let shown = String::from_utf8_lossy(&raw).into_owned();
        let rel = PathBuf::from(<OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(&raw));
        let mut parts = Vec::new();
        for c in rel.components() {
            match c {
                Component::Normal(n) => parts.push(n),
                _ => {
                    return Err(ctx.refused(format!(
                        "entry {shown:?}: not a plain relative name (absolute, `.` or `..`)"
                    )))
                }
            }
        }
        if parts.is_empty() {
            return Err(ctx.refused("an entry with an empty name"));
        }
        let kind = entry.header().entry_type();
        let part = classify(&parts, with_cache)
            .ok_or_else(|| ctx.refused(format!("unexpected entry {shown:?}")))?;
        let allowed = match part {
            Part::Info | Part::Log | Part::Param => kind == tar::EntryType::Regular,
            Part::DataDir => kind == tar::EntryType::Directory,
            Part::Tree => matches!(
                kind,
                tar::EntryType::Regular | tar::EntryType::Directory | tar::EntryType::Symlink
            ),
        };
        if !allowed {
            return Err(ctx.refused(format!(
                "entry {shown:?} is {} (not accepted there)",
                kind_name(kind)
            )));
        }
        let rel: PathBuf = parts.iter().collect();
        let parent = rel.parent().unwrap_or(Path::new("")).to_path_buf();
        if !dirs.contains(&parent) {
            return Err(ctx.refused(format!(
                "entry {shown:?}: its parent is not a directory of the build (a symlink, a file, \
                 or not sent before it)"
            )));
        }
        if !made.insert(rel.clone()) {
            return Err(ctx.refused(format!("entry {shown:?} is sent twice")));
        }
        let mode = entry.header().mode().map_err(broken)?;
        let mtime = entry.header().mtime().unwrap_or(0);
        let path = root.join(&rel);
        match (part, kind) {
            (Part::Info, _) => {
                let mut buf = Vec::new();
                (&mut entry)
                    .take(MAX_INFO + 1)
                    .read_to_end(&mut buf)
                    .map_err(broken)?;
                if buf.len() as u64 > MAX_INFO {
                    return Err(ctx.refused("build_info.json is larger than 64 MiB"));
                }
                info_bytes = Some(buf);
            }
            (_, tar::EntryType::Directory) => {
                std::fs::DirBuilder::new()
                    .mode(0o700)
                    .create(&path)
                    .map_err(ctx.io(format!("creating {}", path.display())))?;
                dirs.insert(rel.clone());
                dir_meta.push((path, mode & 0o1777, mtime));
            }
            (_, tar::EntryType::Symlink) => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| ctx.refused(format!("symlink {shown:?} has no target")))?
                    .into_owned();
                let target = <OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(&target);
                std::os::unix::fs::symlink(target, &path)
                    .map_err(ctx.io(format!("creating {}", path.display())))?;
                let _ = rustix::fs::utimensat(
                    rustix::fs::CWD,
                    &path,
                    &timestamps(mtime),
                    AtFlags::SYMLINK_NOFOLLOW,
                );
            }
            _ => {
                let what = || format!("writing {}", path.display());
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                    .open(&path)
                    .map_err(ctx.io(what()))?;
                io::copy(&mut entry, &mut file).map_err(|e| {
                    if e.kind() == io::ErrorKind::UnexpectedEof || e.raw_os_error().is_none() {
                        broken(e)
                    } else {
                        ctx.io(what())(e)
                    }
                })?;
                file.set_permissions(std::fs::Permissions::from_mode(mode & 0o777))
                    .map_err(ctx.io(what()))?;
                rustix::fs::futimens(&file, &timestamps(mtime))
                    .map_err(|e| ctx.io(what())(e.into()))?;
            }
        }
    }
    let bytes = info_bytes.ok_or_else(|| {
        ctx.refused("the stream has no build_info.json (it was cut short, or is not a build)")
    })?;
    let mut info: BuildInfo = serde_json::from_slice(&bytes)
        .map_err(|e| ctx.refused(format!("build_info.json is not a BuildInfo: {e}")))?;
    verify(ctx, &info, &dirs)?;
    info.path = ready.artifacts_when_ready().display().to_string();
    info.cached = false;
    info.coalesced = false;
    scratch
        .write_info(&info)
        .map_err(ctx.io("writing build_info.json"))?;
    // Deepest first, so that a read-only directory is made so after its contents.
    dir_meta.sort_by_key(|(p, _, _)| std::cmp::Reverse(p.components().count()));
    for (path, mode, mtime) in &dir_meta {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(*mode))
            .map_err(ctx.io(format!("setting the mode of {}", path.display())))?;
        let _ = rustix::fs::utimensat(
            rustix::fs::CWD,
            path,
            &timestamps(*mtime),
            AtFlags::SYMLINK_NOFOLLOW,
        );
    }
    importer
        .place(scratch, &ctx.project, &ctx.id, &info, with_cache)
        .map_err(|e| {
            ctx.io(format!(
                "placing {} as {}",
                root.display(),
                ready.path().display()
            ))(e)
        })
}

/// The BuildInfo is this job's, and the build has its `data/artifacts`.
fn verify(ctx: &Ctx, info: &BuildInfo, dirs: &HashSet<PathBuf>) -> Result<(), ReplicateError> {
    let url = format!("job/{}/{}", ctx.project, ctx.id);
    if info.url != url {
        return Err(ctx.refused(format!(
            "its build_info.json is for {:?}, not {url:?}",
            info.url
        )));
    }
    let tail: PathBuf = [ctx.project.as_str(), "ready", &ctx.id, "data", "artifacts"]
        .iter()
        .collect();
    if !Path::new(&info.path).ends_with(&tail) {
        return Err(ctx.refused(format!(
            "its build_info.json's Path {:?} is not this job's artifacts",
            info.path
        )));
    }
    if !info.group.is_empty() {
        jobs::check_name("group", &info.group)
            .map_err(|e| ctx.refused(format!("build_info.json: {e}")))?;
    }
    for k in info.params.keys() {
        jobs::check_name("param", k).map_err(|e| ctx.refused(format!("build_info.json: {e}")))?;
    }
    if !dirs.contains(Path::new("data/artifacts")) {
        return Err(ctx.refused("the build has no data/artifacts directory"));
    }
    Ok(())
}

/// Drop this agent's copy of `project/id`, which ran again on `agent` (or is queued again),
/// if it is still the copy that started at `judged` (see [`Engine::discard_ready`]);
/// whether it went.
pub(super) async fn discard_copy(
    engine: &Arc<Engine>,
    project: &str,
    id: &str,
    agent: Option<&str>,
    judged: &str,
) -> bool {
    let (engine, p, i, j) = (
        Arc::clone(engine),
        project.to_string(),
        id.to_string(),
        judged.to_string(),
    );
    let outcome = tokio::task::spawn_blocking(move || engine.discard_ready(&p, &i, &j))
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()));
    match outcome {
        Ok(true) => {
            tracing::info!(%project, %id, agent = ?agent, "a stale copy went: the job ran again on another agent");
            true
        }
        Ok(false) => false,
        Err(e) => {
            tracing::warn!(%project, %id, error = %e, "could not remove a stale copy");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_of_a_build() {
        let c = |p: &str, cache| {
            let parts: Vec<&OsStr> = p.split('/').map(OsStr::new).collect();
            classify(&parts, cache)
        };
        assert_eq!(c("build_info.json", false), Some(Part::Info));
        assert_eq!(c("out.log", false), Some(Part::Log));
        assert_eq!(c("data", false), Some(Part::DataDir));
        assert_eq!(c("data/artifacts", false), Some(Part::DataDir));
        assert_eq!(c("data/artifacts/a/b", false), Some(Part::Tree));
        assert_eq!(c("data/params/name", false), Some(Part::Param));
        assert_eq!(c("data/params/.x", false), None);
        assert_eq!(c("data/params/x/y", false), None);
        assert_eq!(c("data/cache", false), None);
        assert_eq!(c("data/cache/x", true), Some(Part::Tree));
        assert_eq!(c("cache-layers", true), None);
        assert_eq!(c("data/other", true), None);
        assert_eq!(encode("a b?/1"), "a%20b%3F%2F1");
    }
}
