//! Registry errors a user can act on: a plain-http registry not listed as insecure names the
//! setting; 401/403/404 name the image and the auth file consulted.

use std::path::Path;

mod common;

use common::registry::Registry;
use common::{helper, images_dir};
use images::{BackendKind, BuildOptions, Builder, Registries, RegistryConfig, Store};

fn build_error(config: RegistryConfig, from: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(
        &dir.path().join("store"),
        Some(BackendKind::Plain),
        helper(),
    )
    .unwrap();
    let builder = Builder::new(store, vec![Box::new(Registries { config })]);
    let ctx = dir.path().join("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(ctx.join("Dockerfile"), format!("FROM {from}\nRUN true\n")).unwrap();
    let mut log = Vec::new();
    match builder.build(&BuildOptions::new("p", &ctx), &mut log) {
        Ok(_) => panic!("FROM {from} built"),
        Err(e) => e.to_string(),
    }
}

fn busybox(reg: &Registry, name: &str, creds: bool) {
    let layout = images_dir().join("busybox");
    reg.push(&format!("{}:latest", layout.display()), name, creds, false);
}

fn no_auth_file(dir: &Path) -> RegistryConfig {
    RegistryConfig {
        auth_file: Some(dir.join("no-such-config.json")),
        ..Default::default()
    }
}

fn reference(reg: &Registry, name: &str) -> String {
    format!("{}/{name}", reg.addr)
}

/// An https pull from a registry that speaks plain http: named as such, with the setting that
/// allows it; the reference once (today's message repeated it and named only the https URL).
#[test]
fn plain_http_registry_not_listed_as_insecure_names_the_setting() {
    let reg = Registry::start(false);
    busybox(&reg, "library/busybox:1", false);
    let dir = tempfile::tempdir().unwrap();
    let from = reference(&reg, "library/busybox:1");
    let addr = &reg.addr;
    assert_eq!(
        build_error(no_auth_file(dir.path()), &from),
        format!(
            "base image {from}: {addr} answers plain http, not https: to pull library/busybox:1 \
             over plain http, list {addr} in registries.insecure in the configuration \
             (--insecure-registry {addr} for mistryd image build)"
        )
    );
    // Listed, it builds.
    let mut config = no_auth_file(dir.path());
    config.insecure = vec![addr.clone()];
    let store = Store::open(&dir.path().join("ok"), Some(BackendKind::Plain), helper()).unwrap();
    let builder = Builder::new(store, vec![Box::new(Registries { config })]);
    let ctx = dir.path().join("okctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(ctx.join("Dockerfile"), format!("FROM {from}\nRUN true\n")).unwrap();
    builder
        .build(&BuildOptions::new("ok", &ctx), &mut Vec::new())
        .unwrap();
}

/// Nothing listens: the https error with its cause (reqwest's message alone hides it).
#[test]
fn unreachable_registry_gives_the_cause() {
    let (_held, port) = common::closed_port();
    let dir = tempfile::tempdir().unwrap();
    let from = format!("127.0.0.1:{port}/library/busybox:1");
    let err = build_error(no_auth_file(dir.path()), &from);
    assert!(
        err.starts_with(&format!(
            "base image {from}: pulling the manifest: cannot reach 127.0.0.1:{port} over https \
             for library/busybox:1: error sending request for url (https://127.0.0.1:{port}/v2/library/busybox/manifests/1)"
        )),
        "{err}"
    );
    assert!(err.ends_with("Connection refused (os error 111)"), "{err}");
}

/// 401 without credentials names the auth file consulted (missing here) and what to set; with
/// wrong ones from an auth file, that file.
#[test]
fn unauthorized_names_the_image_and_the_auth_file() {
    let reg = Registry::start(true);
    busybox(&reg, "private/busybox:1", true);
    let dir = tempfile::tempdir().unwrap();
    let addr = &reg.addr;
    let from = reference(&reg, "private/busybox:1");
    let mut config = no_auth_file(dir.path());
    config.insecure = vec![addr.clone()];
    let missing = dir.path().join("no-such-config.json");
    assert_eq!(
        build_error(config.clone(), &from),
        format!(
            "base image {from}: pulling the manifest: Not authorized (401): {addr} refused \
             private/busybox:1; sent no credentials (the auth file {} does not exist): give \
             credentials for {addr} in \
             registries.auth_file (--registry-auth: a docker-style config.json) or \
             registries.credentials",
            missing.display()
        )
    );
    // An auth file without this registry.
    let file = dir.path().join("config.json");
    std::fs::write(&file, r#"{"auths": {"other.example": {"auth": "dTpw"}}}"#).unwrap();
    config.auth_file = Some(file.clone());
    assert!(build_error(config.clone(), &from).contains(&format!(
        "refused private/busybox:1; sent no credentials (the auth file {} has none for {addr}): \
         give",
        file.display()
    )));
    // Wrong credentials from it.
    std::fs::write(
        &file,
        format!(r#"{{"auths": {{"{addr}": {{"username": "tester", "password": "wrong"}}}}}}"#),
    )
    .unwrap();
    assert_eq!(
        build_error(config.clone(), &from),
        format!(
            "base image {from}: pulling the manifest: Not authorized (401): {addr} refused \
             private/busybox:1; sent credentials for {addr} from {}: check them",
            file.display()
        )
    );
}

/// 404: the repository or tag is not there; the message names it and the credentials sent.
#[test]
fn not_found_names_the_image_and_the_credentials() {
    let reg = Registry::start(true);
    busybox(&reg, "library/busybox:1", true);
    let dir = tempfile::tempdir().unwrap();
    let addr = &reg.addr;
    let file = dir.path().join("config.json");
    std::fs::write(
        &file,
        format!(r#"{{"auths": {{"{addr}": {{"username": "tester", "password": "s3cret"}}}}}}"#),
    )
    .unwrap();
    let config = RegistryConfig {
        insecure: vec![addr.clone()],
        auth_file: Some(file.clone()),
        ..Default::default()
    };
    for name in ["library/busybox:2", "library/nope:1"] {
        let from = reference(&reg, name);
        assert_eq!(
            build_error(config.clone(), &from),
            format!(
                "base image {from}: pulling the manifest: Not found (404): {addr} has no {name} \
                 (no such repository, tag or digest, or not visible to these credentials); sent \
                 credentials for {addr} from {}",
                file.display()
            )
        );
    }
}

/// 403 (Docker's `DENIED`): a stand-in registry that denies everything.
#[test]
fn forbidden_names_the_image_and_the_credentials() {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf);
            let body = r#"{"errors":[{"code":"DENIED","message":"requested access to the resource is denied"}]}"#;
            let _ = write!(
                conn,
                "HTTP/1.1 403 Forbidden\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let mut config = no_auth_file(dir.path());
    config.insecure = vec![addr.clone()];
    let from = format!("{addr}/team/app@sha256:{}", "a".repeat(64));
    assert_eq!(
        build_error(config, &from),
        format!(
            "base image {from}: pulling the manifest: Forbidden (403): {addr} refused \
             team/app@sha256:{}; sent no credentials (the auth file {} does not exist)",
            "a".repeat(64),
            dir.path().join("no-such-config.json").display()
        )
    );
}
