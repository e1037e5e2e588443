//! Base images pulled from a real registry: Debian's `docker-registry` on 127.0.0.1, started
//! here per test on a port the kernel chooses (it logs the address it listens on), filled with
//! `skopeo` from the busybox OCI layout.

use std::path::{Path, PathBuf};
use std::process::Command;

mod common;

use common::registry::Registry;
use common::{helper, images_dir};
use images::{
    BackendKind, BuildOptions, Builder, Credentials, Image, Registries, RegistryConfig, Store,
};

fn busybox_layout() -> PathBuf {
    images_dir().join("busybox")
}

struct Env {
    dir: tempfile::TempDir,
    builder: Builder,
}

fn env(config: RegistryConfig) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(
        &dir.path().join("store"),
        Some(BackendKind::Plain),
        helper(),
    )
    .unwrap();
    let builder = Builder::new(store, vec![Box::new(Registries { config })]);
    Env { dir, builder }
}

impl Env {
    fn build(&self, name: &str, dockerfile: &str) -> Result<(Image, String), String> {
        let ctx = self.dir.path().join(name);
        std::fs::create_dir_all(&ctx).unwrap();
        std::fs::write(ctx.join("Dockerfile"), dockerfile).unwrap();
        let mut log = Vec::new();
        let r = self.builder.build(&BuildOptions::new(name, &ctx), &mut log);
        let log = String::from_utf8_lossy(&log).into_owned();
        match r {
            Ok((image, _)) => Ok((image, log)),
            Err(e) => Err(format!("{e}\n{log}")),
        }
    }

    fn blobs(&self) -> usize {
        std::fs::read_dir(self.builder.store.root.join("blobs/sha256"))
            .unwrap()
            .count()
    }
}

fn insecure(reg: &Registry) -> RegistryConfig {
    RegistryConfig {
        insecure: vec![reg.addr.clone()],
        ..Default::default()
    }
}

fn manifest_digest(layout: &Path) -> String {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn pull_by_tag_and_digest_then_no_network() {
    let reg = Registry::start(false);
    let layout = busybox_layout();
    reg.push(
        &format!("{}:latest", layout.display()),
        "library/busybox:1.35",
        false,
        false,
    );
    let env = env(insecure(&reg));
    let (image, log) = env
        .build(
            "tag",
            &format!(
                "FROM {}/library/busybox:1.35\nRUN test -x /bin/busybox\n",
                reg.addr
            ),
        )
        .unwrap();
    assert!(log.contains("from its registry"), "{log}");
    assert!(env
        .builder
        .rootfs(&image)
        .unwrap()
        .join("etc/passwd")
        .is_file());
    assert_eq!(
        image.config.env,
        ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
    );
    let digest = manifest_digest(&layout);
    let (_, log) = env
        .build(
            "digest",
            &format!("FROM {}/library/busybox@{digest}\nRUN true\n", reg.addr),
        )
        .unwrap();
    assert!(log.contains(&digest), "{log}");
    // The registry is gone: the same references still build, from what was pulled.
    let addr = reg.addr.clone();
    drop(reg);
    env.build(
        "again-tag",
        &format!("FROM {addr}/library/busybox:1.35\nRUN echo again\n"),
    )
    .unwrap();
    env.build(
        "again-digest",
        &format!("FROM {addr}/library/busybox@{digest}\nRUN echo again\n"),
    )
    .unwrap();
}

#[test]
fn a_second_build_from_the_same_base_does_no_network_io() {
    let reg = Registry::start(false);
    reg.push(
        &format!("{}:latest", busybox_layout().display()),
        "base:v1",
        false,
        false,
    );
    let env = env(insecure(&reg));
    let from = format!("FROM {}/base:v1\n", reg.addr);
    env.build("first", &format!("{from}RUN echo one > /one\n"))
        .unwrap();
    let addr = reg.addr.clone();
    drop(reg);
    let (image, log) = env
        .build(
            "second",
            &format!("FROM {addr}/base:v1\nRUN echo two > /two\n"),
        )
        .unwrap();
    assert!(log.contains("(pulled before)"), "{log}");
    assert!(env.builder.rootfs(&image).unwrap().join("two").is_file());
    // A rebuild asks the registry again, and fails without it.
    let ctx = env.dir.path().join("second");
    let mut opts = BuildOptions::new("second", &ctx);
    opts.no_cache = true;
    let err = env.builder.build(&opts, &mut Vec::new()).unwrap_err();
    assert!(err.to_string().contains(&addr), "{err}");
}

#[test]
fn multi_platform_index_picks_the_host_platform() {
    let reg = Registry::start(false);
    let layout = busybox_layout();
    // An index with the busybox manifest for the host platform and another image (a layer with
    // a marker file) for a different one.
    let dir = tempfile::tempdir().unwrap();
    let multi = dir.path().join("multi");
    let copy = Command::new("cp")
        .arg("-a")
        .arg(&layout)
        .arg(&multi)
        .status()
        .unwrap();
    assert!(copy.success());
    let _ = std::fs::remove_dir_all(multi.join("rootfs"));
    let blobs = multi.join("blobs/sha256");
    let put = |data: &[u8]| {
        let d = images::sha256_digest(data);
        std::fs::write(blobs.join(&d[7..]), data).unwrap();
        (d, data.len())
    };
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_uid(0);
    h.set_gid(0);
    h.set_mode(0o644);
    h.set_size(0);
    b.append_data(&mut h, "wrong-platform", &[][..]).unwrap();
    let layer = b.into_inner().unwrap();
    let (ld, ls) = put(&layer);
    let host = images::host_platform().1.to_string();
    let other = if host == "s390x" { "arm64" } else { "s390x" };
    let (cd, cs) = put(format!(r#"{{"architecture":"{other}","os":"linux","rootfs":{{"type":"layers","diff_ids":["{ld}"]}}}}"#).as_bytes());
    let (md, ms) = put(format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{cd}","size":{cs}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{ld}","size":{ls}}}]}}"#
    ).as_bytes());
    let busy = manifest_digest(&layout);
    let busy_size = std::fs::metadata(layout.join("blobs/sha256").join(&busy[7..]))
        .unwrap()
        .len();
    let (id, is) = put(format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{md}","size":{ms},"platform":{{"architecture":"{other}","os":"linux"}}}},{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{busy}","size":{busy_size},"platform":{{"architecture":"{host}","os":"linux"}}}}]}}"#
    ).as_bytes());
    std::fs::write(
        multi.join("index.json"),
        format!(r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.index.v1+json","digest":"{id}","size":{is},"annotations":{{"org.opencontainers.image.ref.name":"latest"}}}}]}}"#),
    )
    .unwrap();
    reg.push(
        &format!("{}:latest", multi.display()),
        "multi:latest",
        false,
        true,
    );
    let env = env(insecure(&reg));
    let (image, log) = env
        .build("multi", &format!("FROM {}/multi\n", reg.addr))
        .unwrap();
    let root = env.builder.rootfs(&image).unwrap();
    assert!(root.join("bin/busybox").is_file(), "{log}");
    assert!(!root.join("wrong-platform").exists());
    // FROM --platform picks another entry; $BUILDPLATFORM is the host's.
    let (image, log) = env
        .build(
            "other",
            &format!("FROM --platform=linux/{other} {}/multi\n", reg.addr),
        )
        .unwrap();
    let root = env.builder.rootfs(&image).unwrap();
    assert!(root.join("wrong-platform").exists(), "{log}");
    assert!(!root.join("bin/busybox").exists());
    let (image, _) = env
        .build(
            "build-platform",
            &format!("FROM --platform=$BUILDPLATFORM {}/multi\n", reg.addr),
        )
        .unwrap();
    assert!(env
        .builder
        .rootfs(&image)
        .unwrap()
        .join("bin/busybox")
        .is_file());
    let err = env
        .build(
            "missing",
            &format!("FROM --platform=linux/mips64le {}/multi\n", reg.addr),
        )
        .unwrap_err();
    assert!(err.contains("pulling the manifest"), "{err}");
}

#[test]
fn authentication_with_a_docker_config_file() {
    let reg = Registry::start(true);
    reg.push(
        &format!("{}:latest", busybox_layout().display()),
        "private/busybox:1",
        true,
        false,
    );
    let from = format!("FROM {}/private/busybox:1\nRUN true\n", reg.addr);
    // Anonymous: refused, and the message says so.
    let anon = env(insecure(&reg));
    let err = anon.build("anon", &from).unwrap_err();
    assert!(
        err.contains("pulling the manifest: Not authorized"),
        "{err}"
    );
    // Wrong password in the configuration: refused too.
    let mut bad = insecure(&reg);
    bad.credentials.insert(
        reg.addr.clone(),
        Credentials {
            username: common::registry::USER.into(),
            password: "wrong".into(),
        },
    );
    assert!(env(bad).build("bad", &from).is_err());
    // Right credentials from a docker-style config.json.
    let dir = tempfile::tempdir().unwrap();
    let auth_file = dir.path().join("config.json");
    std::fs::write(
        &auth_file,
        format!(
            r#"{{"auths":{{"{}":{{"auth":"dGVzdGVyOnMzY3JldA=="}}}}}}"#,
            reg.addr
        ),
    )
    .unwrap();
    let mut cfg = insecure(&reg);
    cfg.auth_file = Some(auth_file);
    let ok = env(cfg);
    ok.build("ok", &from).unwrap();
}

#[test]
fn plain_http_only_when_insecure() {
    let reg = Registry::start(false);
    reg.push(
        &format!("{}:latest", busybox_layout().display()),
        "busybox:latest",
        false,
        false,
    );
    let env = env(RegistryConfig::default());
    let err = env
        .build("tls", &format!("FROM {}/busybox\n", reg.addr))
        .unwrap_err();
    // The reference once, and the setting that allows plain http (issue 11: it used to be
    // `{addr}/busybox: {addr}/busybox:latest: pulling the manifest: error sending request`).
    assert!(
        err.starts_with(&format!(
            "base image {0}/busybox: {0} answers plain http, not https: to pull busybox:latest \
             over plain http, list {0} in registries.insecure in the configuration \
             (--insecure-registry {0} for mistryd image build)\n",
            reg.addr
        )),
        "{err}"
    );
}

#[test]
fn a_corrupt_blob_is_refused_and_nothing_is_cached() {
    let reg = Registry::start(false);
    let layout = busybox_layout();
    reg.push(
        &format!("{}:latest", layout.display()),
        "corrupt:latest",
        false,
        false,
    );
    // Flip the layer's bytes in the registry's storage (same size).
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            layout
                .join("blobs/sha256")
                .join(&manifest_digest(&layout)[7..]),
        )
        .unwrap(),
    )
    .unwrap();
    let layer = manifest["layers"][0]["digest"].as_str().unwrap()[7..].to_string();
    let data = reg.storage.join(format!(
        "docker/registry/v2/blobs/sha256/{}/{layer}/data",
        &layer[..2]
    ));
    let mut bytes = std::fs::read(&data).unwrap();
    let mid = bytes.len() / 2;
    for b in &mut bytes[mid..mid + 64] {
        *b ^= 0xff;
    }
    std::fs::write(&data, bytes).unwrap();
    let env = env(insecure(&reg));
    let err = env
        .build("corrupt", &format!("FROM {}/corrupt\n", reg.addr))
        .unwrap_err();
    assert!(
        err.contains(&format!("pulling layer sha256:{layer}")),
        "{err}"
    );
    assert!(err.to_lowercase().contains("digest"), "{err}");
    assert_eq!(env.blobs(), 0, "a corrupt blob was cached");
    assert_eq!(
        std::fs::read_dir(env.builder.store.root.join("tmp"))
            .unwrap()
            .count(),
        0
    );
}
