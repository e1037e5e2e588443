//! A store and its builder in a temporary directory, once per snapshot backend: the set-up the
//! image build tests share (`image_build`, `dockerfile_syntax`, `run_mounts`).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use images::{
    BackendKind, BuildError, BuildOptions, BuildStats, Builder, Image, LocalImages, Store,
};

use super::{backends, helper, images_dir, rand_suffix, tempdir_in};

/// A store on one backend and a builder over it, removed when dropped.
pub(crate) struct Env {
    _dir: tempfile::TempDir,
    /// The temporary directory: `store/`, `projects/` and the copies jobs run in.
    pub root: PathBuf,
    /// The builder over `root/store`, with the test base images.
    pub builder: Builder,
}

/// A store on `kind` in a new directory named `<prefix>-…` (under `parent`, for btrfs).
pub(crate) fn env_for(prefix: &str, kind: BackendKind, parent: Option<&Path>) -> Env {
    let dir = tempdir_in(prefix, parent);
    let root = dir.path().to_path_buf();
    let store = Store::open(&root.join("store"), Some(kind), helper()).unwrap();
    assert_eq!(store.backend(), kind);
    let builder = Builder::new(store, vec![Box::new(LocalImages { dir: images_dir() })]);
    Env {
        _dir: dir,
        root,
        builder,
    }
}

/// Run `f` once per backend the machine has (each in its own store).
pub(crate) fn each_backend(prefix: &str, f: impl Fn(&Env)) {
    for (kind, parent) in backends() {
        let env = env_for(prefix, kind, parent.as_deref());
        eprintln!("== backend {kind}");
        f(&env);
    }
}

impl Env {
    /// A build context with `files` (mode 0644, directories 0755, whatever the umask).
    pub(crate) fn project(&self, name: &str, files: &[(&str, &str)]) -> PathBuf {
        let dir = self.root.join("projects").join(name);
        std::fs::create_dir_all(&dir).unwrap();
        for (path, content) in files {
            let p = dir.join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, content).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        dir
    }

    /// Build `ctx` with the options `f` sets; the image or the error, with the build's log.
    pub(crate) fn build_with(
        &self,
        ctx: &Path,
        f: impl FnOnce(&mut BuildOptions),
    ) -> Result<(Image, BuildStats, String), (BuildError, String)> {
        let mut opts = BuildOptions::new(ctx.file_name().unwrap().to_string_lossy(), ctx);
        f(&mut opts);
        let mut log = Vec::new();
        match self.builder.build(&opts, &mut log) {
            Ok((i, s)) => Ok((i, s, String::from_utf8_lossy(&log).into_owned())),
            Err(e) => Err((e, String::from_utf8_lossy(&log).into_owned())),
        }
    }

    /// Build `ctx` with the options `f` sets; its error's text (the build must fail).
    pub(crate) fn fails(&self, ctx: &Path, f: impl FnOnce(&mut BuildOptions)) -> String {
        match self.build_with(ctx, f) {
            Ok((_, _, log)) => panic!("the build succeeded:\n{log}"),
            Err((e, _)) => e.to_string(),
        }
    }

    /// Run `script` with `/bin/sh` in a fresh copy of `image` (its environment; as its user and
    /// in its workdir when `as_image_user`, else as root in `/`), then remove the copy.
    pub(crate) fn run(&self, image: &Image, script: &str, as_image_user: bool) -> sandbox::Output {
        let copy = self.root.join(format!("run-{}", rand_suffix()));
        let target = self
            .builder
            .store
            .job_target(image.snapshot.as_deref(), &copy, true)
            .unwrap();
        let mut sb = target.sandbox().command(["/bin/sh", "-c", script]);
        for (k, v) in image.config.env_pairs() {
            sb = sb.env(k, v);
        }
        if as_image_user && !image.config.workdir.is_empty() {
            sb = sb.cwd(&image.config.workdir);
        }
        if as_image_user && !image.config.user.is_empty() {
            sb = sb.user(sandbox::User::Spec(image.config.user.clone()));
        }
        let out = sb.output().unwrap();
        self.builder.store.remove_tree(&copy).unwrap();
        out
    }

    /// Whether the store's `tmp/` is empty (nothing left behind by a build).
    pub(crate) fn tmp_is_empty(&self) -> bool {
        std::fs::read_dir(self.builder.store.root.join("tmp"))
            .unwrap()
            .count()
            == 0
    }
}
