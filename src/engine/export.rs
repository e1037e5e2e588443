//! A ready build of this agent as another agent fetches it (`GET /api/build/{project}/{id}`,
//! whose route is the server's; the fetching side is `cluster::copies`): the build as an
//! uncompressed tar, streamed, read by fd below the job directory without following a link
//! (the walk of `GET /artifacts`, `crate::tree::append_tree`): `data/`, `data/params/<name>`
//! (regular files only), `data/artifacts/**` (links sent as links), with the cache the build's
//! complete cache as `data/cache/**` (a layered cache is squashed first and its `cache-flat`
//! sent), then `out.log`, `stderr.log` and, last, `build_info.json` (so a stream cut short lacks
//! it and is refused). Failed builds are served too: their BuildInfo is a result the other
//! agent shows. The build and the layers its cache sits on are held from retention while it is
//! sent.

use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::path::Path;

use rustix::fs::{Mode, OFlags};

use super::retention::Hold;
use super::{Engine, Stage};
use crate::jobs;

/// Why a build cannot be sent.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// A project or job name that is not valid (400).
    #[error("{0}")]
    BadName(#[from] crate::jobs::NameError),
    /// Not a ready build of this agent (404).
    #[error("Build {project}/{id} is not ready on this agent")]
    NotReady {
        /// The project.
        project: String,
        /// The job ID.
        id: String,
    },
    /// Its cache layers could not be squashed into one tree (500).
    #[error("Build {project}/{id}: its cache could not be merged: {source}")]
    Squash {
        /// The project.
        project: String,
        /// The job ID.
        id: String,
        /// The store's error.
        #[source]
        source: Box<images::StoreError>,
    },
    /// Its directory could not be opened (500).
    #[error("{0}")]
    Open(#[source] rustix::io::Errno),
}

/// A build about to be sent ([`Engine::export_build`]): its directory by fd, where its complete cache is (relative to
/// it), and the holds that keep retention away meanwhile.
pub struct Export {
    job: OwnedFd,
    cache: Option<&'static str>,
    _holds: Vec<Hold>,
}

impl Engine {
    /// Ready build `project/id` of this agent, to send to another one (`GET /api/build`): found
    /// and held from retention, its layered cache squashed when it is asked for (blocking).
    pub fn export_build(
        &self,
        project: &str,
        id: &str,
        with_cache: bool,
    ) -> Result<Export, ExportError> {
        jobs::check_name("project", project).and_then(|()| jobs::check_name("job", id))?;
        export(self, project, id, with_cache)
    }
}

/// See [`Engine::export_build`].
fn export(
    engine: &Engine,
    project: &str,
    id: &str,
    with_cache: bool,
) -> Result<Export, ExportError> {
    let dir = engine.layout.job(project, id, Stage::Ready);
    let not_ready = || ExportError::NotReady {
        project: project.to_string(),
        id: id.to_string(),
    };
    let mut holds: Vec<_> = engine.hold_build(project, id).into_iter().collect();
    if dir.read_info().is_none() {
        return Err(not_ready());
    }
    let layers = if with_cache {
        images::read_cache_layers(dir.path())
    } else {
        Vec::new()
    };
    let cache = if !with_cache {
        None
    } else if layers.is_empty() {
        Some("data/cache")
    } else {
        // The layers below stay while the squash reads them.
        holds.extend(
            layers
                .iter()
                .filter_map(|l| images::layer_build(l))
                .filter_map(|b| engine.hold_build(project, b)),
        );
        if let Err(source) = engine.builder().store.squash_cache(dir.path()) {
            tracing::warn!(%project, %id, error = %source, "could not squash a build's cache for another agent");
            return Err(ExportError::Squash {
                project: project.to_string(),
                id: id.to_string(),
                source: Box::new(source),
            });
        }
        Some(images::CACHE_FLAT)
    };
    let job = rustix::fs::open(
        dir.path(),
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| match e {
        rustix::io::Errno::NOENT => not_ready(),
        e => ExportError::Open(e),
    })?;
    Ok(Export {
        job,
        cache,
        _holds: holds,
    })
}

/// A directory entry made up for a part of the build that is not a directory there (a job
/// removed it): an empty directory, so the other agent's copy matches what this one serves.
fn empty_dir(b: &mut tar::Builder<&mut dyn Write>, name: &str) -> io::Result<()> {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_mode(0o755);
    h.set_size(0);
    b.append_data(&mut h, name, io::empty())
}

impl Export {
    /// Write the build as an uncompressed tar to `out` (blocking; see the module's doc).
    pub fn write(&self, out: &mut dyn Write) -> io::Result<()> {
        write_build(self, out)
    }
}

fn write_build(p: &Export, out: &mut dyn Write) -> io::Result<()> {
    use crate::tree::{append_dir, append_file, append_tree, is_gone, open_beneath};
    let mut b = tar::Builder::new(out);
    match open_beneath(&p.job, Path::new("data"), true) {
        Ok(data) => append_dir(&mut b, &data, Path::new("data"))?,
        Err(e) if is_gone(&e) => empty_dir(&mut b, "data")?,
        Err(e) => return Err(e),
    }
    match open_beneath(&p.job, Path::new("data/params"), true) {
        Ok(params) => {
            append_dir(&mut b, &params, Path::new("data/params"))?;
            // The directory alone (not entered), in name order.
            let mut walk = images::walk::Walk::new(
                rustix::io::fcntl_dupfd_cloexec(&params, 0)?,
                images::walk::Order::Sorted,
                Path::new("data/params"),
            )?;
            while let Some(entry) = walk.next_entry()? {
                let Some(n) = entry.name.to_str() else {
                    continue;
                };
                if jobs::check_name("param", n).is_ok() {
                    append_file(
                        &mut b,
                        &params,
                        Path::new(n),
                        &Path::new("data/params").join(n),
                    )?;
                }
            }
        }
        Err(e) if is_gone(&e) => {}
        Err(e) => return Err(e),
    }
    match open_beneath(&p.job, Path::new("data/artifacts"), true) {
        Ok(root) => append_tree(&mut b, &root, Path::new("data/artifacts"))?,
        Err(e) if is_gone(&e) => empty_dir(&mut b, "data/artifacts")?,
        Err(e) => return Err(e),
    }
    if let Some(cache) = p.cache {
        match open_beneath(&p.job, Path::new(cache), true) {
            Ok(root) => append_tree(&mut b, &root, Path::new("data/cache"))?,
            Err(e) if is_gone(&e) => {}
            Err(e) => return Err(e),
        }
    }
    for name in ["out.log", "stderr.log", "build_info.json"] {
        append_file(&mut b, &p.job, Path::new(name), Path::new(name))?;
    }
    b.into_inner().map(drop)
}
