//! Jobs as mistry defines them: the request, the BuildInfo answer, the job ID, and the checks
//! on names that keep everything inside `build_path`.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// `POST /jobs` body. Field names are matched case-insensitively, as Go's encoding/json does.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobRequest {
    /// `Project`: the project's directory name under `projects_path`; required.
    pub project: String,
    /// `Params`: name → value, each written to `data/params/<name>`; names starting with `_`
    /// (opaque) are left out of the job ID. Default none.
    pub params: BTreeMap<String, String>,
    /// `Group`: builds of one group start from the group's last successful build
    /// (incremental); `""` (the default) for none.
    pub group: String,
    /// `Rebuild`: ignore the result cache and the step cache, and read base images again.
    /// Default `false`.
    pub rebuild: bool,
    /// Upstream builds whose artifacts the job sees read-only at `/data/input/<name>/`
    /// (pipelines). Not settable through `POST /jobs`; part of the job ID.
    pub inputs: BTreeMap<String, Input>,
}

/// Why a request could not be served, by either back end of jobs (the HTTP status in
/// parentheses).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobError {
    /// 400.
    #[error("{0}")]
    BadRequest(String),
    /// 404, text contains `Unknown project 'NAME'`.
    #[error("Unknown project '{0}'")]
    UnknownProject(String),
    /// 503: the backlog is full, or mistryd shuts down.
    #[error("Server is overloaded; try again later")]
    Overloaded,
    /// 503: what the answer needs does not answer (the cluster's database, or the agent
    /// holding a build).
    #[error("Service unavailable: {0}")]
    Unavailable(String),
    /// 500.
    #[error("{0}")]
    Internal(String),
}

/// A `POST /jobs` body that is not a job request; the text follows mistry
/// (`Error unmarshalling body ...`). 400.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The body is not JSON.
    #[error("Error unmarshalling body '{body}' to Job: {source}")]
    Json {
        /// The body as sent (lossy UTF-8).
        body: String,
        /// The JSON parser's error.
        #[source]
        source: serde_json::Error,
    },
    /// The body is JSON but not an object.
    #[error("Error unmarshalling body '{body}' to Job: not an object")]
    NotAnObject {
        /// The body as sent (lossy UTF-8).
        body: String,
    },
    /// A known field of the wrong JSON type.
    #[error("Error unmarshalling body to Job: {field} must be {expected}")]
    Field {
        /// The field's JSON name, e.g. `params`.
        field: String,
        /// What it must be, e.g. `a string`.
        expected: &'static str,
    },
}

/// A name that would not stay one path component inside `build_path` ([`check_name`]); `what`
/// says whose name it is (`project`, `group`, `param`...).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The name is empty.
    #[error("{what} name is empty")]
    Empty {
        /// Whose name, e.g. `project`.
        what: String,
    },
    /// The name starts with `.` (also `.` and `..`).
    #[error("invalid {what} name {name:?}: must not start with '.'")]
    Hidden {
        /// Whose name, e.g. `project`.
        what: String,
        /// The name.
        name: String,
    },
    /// The name holds `/` or a NUL byte.
    #[error("invalid {what} name {name:?}: must not contain '/' or NUL")]
    Separator {
        /// Whose name, e.g. `project`.
        what: String,
        /// The name.
        name: String,
    },
    /// The name is longer than 255 bytes (one path component's limit).
    #[error("invalid {what} name: longer than 255 bytes")]
    TooLong {
        /// Whose name, e.g. `project`.
        what: String,
    },
}

impl From<NameError> for JobError {
    fn from(e: NameError) -> Self {
        JobError::BadRequest(e.to_string())
    }
}

impl From<RequestError> for JobError {
    fn from(e: RequestError) -> Self {
        JobError::BadRequest(e.to_string())
    }
}

/// A ready build whose `data/artifacts` a job reads (see [`JobRequest::inputs`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Input {
    /// The upstream build's project.
    pub project: String,
    /// Its job ID (a directory under `<project>/ready/`).
    pub id: String,
}

impl JobRequest {
    /// Parse a request body; the error text follows mistry (`Error unmarshalling body ...`).
    pub fn parse(body: &[u8]) -> Result<JobRequest, RequestError> {
        let text = || String::from_utf8_lossy(body).into_owned();
        let value: serde_json::Value =
            serde_json::from_slice(body).map_err(|source| RequestError::Json {
                body: text(),
                source,
            })?;
        let obj = value
            .as_object()
            .ok_or_else(|| RequestError::NotAnObject { body: text() })?;
        let mut req = JobRequest::default();
        for (k, v) in obj {
            let bad = |expected: &'static str| RequestError::Field {
                field: k.clone(),
                expected,
            };
            match k.to_ascii_lowercase().as_str() {
                "project" => req.project = v.as_str().ok_or_else(|| bad("a string"))?.to_string(),
                "group" => req.group = v.as_str().ok_or_else(|| bad("a string"))?.to_string(),
                "rebuild" => req.rebuild = v.as_bool().ok_or_else(|| bad("a boolean"))?,
                "params" => {
                    if v.is_null() {
                        continue;
                    }
                    let m = v.as_object().ok_or_else(|| bad("an object of strings"))?;
                    for (pk, pv) in m {
                        let pv = pv.as_str().ok_or_else(|| bad("an object of strings"))?;
                        req.params.insert(pk.clone(), pv.to_string());
                    }
                }
                _ => {}
            }
        }
        Ok(req)
    }
}

/// A name that becomes a path component (project, group, param): not empty, not `.`/`..`, no
/// `/` or NUL, and not hidden (a leading `.` is reserved for the server's own directories).
pub fn check_name(what: &str, name: &str) -> Result<(), NameError> {
    let what = || what.to_string();
    if name.is_empty() {
        return Err(NameError::Empty { what: what() });
    }
    if name == "." || name == ".." || name.starts_with('.') {
        return Err(NameError::Hidden {
            what: what(),
            name: name.to_string(),
        });
    }
    if name.contains('/') || name.contains('\0') {
        return Err(NameError::Separator {
            what: what(),
            name: name.to_string(),
        });
    }
    if name.len() > 255 {
        return Err(NameError::TooLong { what: what() });
    }
    Ok(())
}

/// The job's BuildInfo, with mistry's field names.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BuildInfo {
    /// `Params`: the request's params, opaque ones included.
    #[serde(rename = "Params")]
    pub params: BTreeMap<String, String>,
    /// `Group`: the request's group, `""` if none.
    #[serde(rename = "Group")]
    pub group: String,
    /// `Path`: absolute host path of the artifacts,
    /// `<build_path>/<project>/ready/<id>/data/artifacts`.
    #[serde(rename = "Path")]
    pub path: String,
    /// `Cached`: answered from the result cache without running.
    #[serde(rename = "Cached")]
    pub cached: bool,
    /// `Coalesced`: this request waited for an identical job already running.
    #[serde(rename = "Coalesced")]
    pub coalesced: bool,
    /// `Incremental`: the build started from the group's last successful build.
    #[serde(rename = "Incremental")]
    pub incremental: bool,
    /// `ExitCode`: the job command's exit code; [`NEVER_RAN`] when it did not run.
    #[serde(rename = "ExitCode")]
    pub exit_code: i32,
    /// `ErrBuild`: the error text (image build failure, limit, internal error); `""` when
    /// none.
    #[serde(rename = "ErrBuild")]
    pub err_build: String,
    /// `ContainerStdouterr`: the whole log (image build output, the job's stdout and
    /// stderr); omitted when empty, and never in `build_info.json`.
    #[serde(
        rename = "ContainerStdouterr",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub container_stdouterr: String,
    /// `ContainerStderr`: the job's stderr alone; omitted when empty, and never in
    /// `build_info.json`.
    #[serde(
        rename = "ContainerStderr",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub container_stderr: String,
    /// `TransportMethod`: always `"rsync"`, as mistry.
    #[serde(rename = "TransportMethod")]
    pub transport_method: String,
    /// `StartedAt`: when the job started, RFC 3339.
    #[serde(rename = "StartedAt")]
    pub started_at: String,
    /// `Duration`: nanoseconds; [`UNKNOWN_DURATION`] while unknown.
    #[serde(rename = "Duration")]
    pub duration: i64,
    /// `URL`: `job/<project>/<id>`, relative to the server.
    #[serde(rename = "URL")]
    pub url: String,
    /// Several agents: how many times the job was run again because the agent running it
    /// stopped heartbeating (absent when 0, so a single node's BuildInfo stays mistry's).
    #[serde(rename = "Retries", default, skip_serializing_if = "is_zero")]
    pub retries: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// ExitCode of a job that never ran (e.g. its image did not build).
pub const NEVER_RAN: i32 = -999;
/// Duration while unknown: -1s in nanoseconds, as mistry.
pub const UNKNOWN_DURATION: i64 = -1_000_000_000;

impl BuildInfo {
    /// Exit code 0 and no `ErrBuild`: the build may be linked and answered from the cache.
    pub fn succeeded(&self) -> bool {
        self.exit_code == 0 && self.err_build.is_empty()
    }
}

/// The IDs of a request (see [`job_ids`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobIds {
    /// mistry's ID, which scripts and clients compute: sha256 of the project, the group, the
    /// non-opaque params (name then value), the inputs and the project's files, concatenated
    /// without separators — so two requests can share it (`{a: "1b2"}` and `{a: "1", b: "2"}`;
    /// group `gx1` and group `g` with `x=1`).
    pub mistry: String,
    /// An ID no other request shares: the same parts, each length-prefixed, after a version
    /// tag. A request goes by it only when mistry's ID is another request's (see
    /// `engine::state::InFlight::admit`).
    pub exact: String,
}

/// What tells a request of a project from another one that shares its job ID: its group and
/// its params but the opaque ones (`_...`, which may differ between requests of one job, as
/// mistry leaves them out of the ID). A build's `build_info.json` (written by the daemon,
/// outside the job's `data/`) holds both; the project is the build's directory. Inputs need no
/// comparing: with the project, group and params equal, mistry's ID can only be equal when the
/// inputs are too (they are hashed `\0`-terminated, names have no NUL, and the project's files
/// that follow start with a name that sorts before `input`: the Dockerfile or smaller).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    group: String,
    params: BTreeMap<String, String>,
}

impl Identity {
    /// The identity of a request with `group` and `params` (opaque params dropped).
    pub fn new(group: &str, params: &BTreeMap<String, String>) -> Identity {
        Identity {
            group: group.to_string(),
            params: params
                .iter()
                .filter(|(k, _)| !is_opaque(k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }
    }

    /// The identity of `req`.
    pub fn of(req: &JobRequest) -> Identity {
        Identity::new(&req.group, &req.params)
    }

    /// Whether `info` is a build of a request with this identity.
    pub fn matches(&self, info: &BuildInfo) -> bool {
        self.group == info.group
            && self.params.len() == info.params.keys().filter(|k| !is_opaque(k)).count()
            && self
                .params
                .iter()
                .all(|(k, v)| info.params.get(k) == Some(v))
    }
}

/// A param left out of job IDs (mistry's opaque params).
fn is_opaque(name: &str) -> bool {
    name.starts_with('_')
}

/// The version tag the exact ID starts with.
const EXACT_TAG: &[u8] = b"mistry job id v2\0";

/// The job IDs of a request: mistry's (compatible, ambiguous) and the exact one (see
/// [`JobIds`]), hashing the project directory once. mistry's is sha256 of project, group, the
/// non-opaque params in name order (name then value), then the inputs in name order (none:
/// nothing, so that a job without inputs keeps mistry's ID), then the content of the project
/// directory (every file's path, mode and bytes, in order).
pub fn job_ids(
    project: &str,
    group: &str,
    params: &BTreeMap<String, String>,
    inputs: &BTreeMap<String, Input>,
    project_dir: &Path,
) -> std::io::Result<JobIds> {
    let mut m = Sha256::new();
    m.update(project.as_bytes());
    m.update(group.as_bytes());
    let mut x = Sha256::new();
    x.update(EXACT_TAG);
    field(&mut x, project.as_bytes());
    field(&mut x, group.as_bytes());
    let params: Vec<_> = params.iter().filter(|(k, _)| !is_opaque(k)).collect();
    x.update((params.len() as u64).to_le_bytes());
    for (k, v) in params {
        m.update(k.as_bytes());
        m.update(v.as_bytes());
        field(&mut x, k.as_bytes());
        field(&mut x, v.as_bytes());
    }
    x.update((inputs.len() as u64).to_le_bytes());
    for (name, input) in inputs {
        for part in ["input", name, &input.project, &input.id] {
            m.update(part.as_bytes());
            m.update([0]);
        }
        for part in [name, &input.project, &input.id] {
            field(&mut x, part.as_bytes());
        }
    }
    hash_tree(&mut m, &mut x, project_dir)?;
    Ok(JobIds {
        mistry: hex::encode(m.finalize()),
        exact: hex::encode(x.finalize()),
    })
}

/// A length-prefixed field of the exact ID.
fn field(h: &mut Sha256, bytes: &[u8]) {
    h.update((bytes.len() as u64).to_le_bytes());
    h.update(bytes);
}

/// The project directory into both hashes, in name order. mistry's gets every entry's path,
/// NUL, mode, then a link's target, a directory's entries or a file's bytes, then `0xff`. The
/// exact one gets per entry `E`, its path (length-prefixed), mode and kind — `l` and the link's
/// target (length-prefixed), `d` and its entries then `]`, `f` and the file's sha256, or `o` —
/// and `]` after the top's entries: no file or directory can pass for several.
///
/// Project authors control the tree: it is walked by fd (no link followed) and iteratively with
/// a bounded number of open descriptors ([`images::walk`]); a path longer than
/// [`images::walk::MAX_PATH`] is an error, so hashing stays linear in the tree's size. The names
/// of the directories on the walk's path are held to sort them (a directory's names take about
/// as much memory as its entries on disk).
fn hash_tree(m: &mut Sha256, x: &mut Sha256, project_dir: &Path) -> std::io::Result<()> {
    use images::walk::{Order, Walk, MAX_PATH};
    use rustix::fs::{AtFlags, FileType, Mode, OFlags};
    // The project directory itself is the operator's: a link to it is followed.
    let top = rustix::fs::open(
        project_dir,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| {
        std::io::Error::new(
            std::io::Error::from(e).kind(),
            format!("{}: {e}", project_dir.display()),
        )
    })?;
    let mut w = Walk::new(top, Order::Sorted, project_dir)?;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let Some(e) = w.next_entry()? else {
            x.update(b"]");
            if w.depth() == 0 {
                return Ok(());
            }
            w.leave()?;
            m.update([0xff]); // The end of a directory's entry.
            continue;
        };
        let name = e.name.as_os_str();
        let named = |err: std::io::Error| w.error_at(Some(name), err);
        let Some(rel) = w.rel_path(name, MAX_PATH) else {
            return Err(named(std::io::Error::other(format!(
                "its path is longer than {MAX_PATH} bytes"
            ))));
        };
        let st = rustix::fs::statat(w.dir()?, name, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|err| named(err.into()))?;
        let rel = rel.as_os_str().as_encoded_bytes();
        m.update(rel);
        m.update([0]);
        m.update(st.st_mode.to_le_bytes());
        x.update(b"E");
        field(x, rel);
        x.update(st.st_mode.to_le_bytes());
        match FileType::from_raw_mode(st.st_mode) {
            FileType::Symlink => {
                let target = rustix::fs::readlinkat(w.dir()?, name, Vec::new())
                    .map_err(|err| named(err.into()))?;
                m.update(target.as_bytes());
                x.update(b"l");
                field(x, target.as_bytes());
            }
            FileType::Directory => {
                // Its entries, then 0xff (and `]`) when the walk leaves it.
                x.update(b"d");
                w.enter(name)?;
                continue;
            }
            FileType::RegularFile => {
                let Some((fd, _)) = images::inroot::open_file_at(w.dir()?, name).map_err(named)?
                else {
                    return Err(named(std::io::Error::other("changed while it was read")));
                };
                let mut f = std::fs::File::from(fd);
                let mut content = Sha256::new();
                loop {
                    let n = f.read(&mut buf).map_err(named)?;
                    if n == 0 {
                        break;
                    }
                    m.update(&buf[..n]);
                    content.update(&buf[..n]);
                }
                x.update(b"f");
                x.update(content.finalize());
            }
            _ => x.update(b"o"),
        }
        m.update([0xff]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt as _;

    #[test]
    fn requests_are_case_insensitive() {
        let r = JobRequest::parse(
            br#"{"project": "p", "PARAMS": {"a": "1"}, "Group": "g", "rebuild": true}"#,
        )
        .unwrap();
        assert_eq!(r.project, "p");
        assert_eq!(r.params.get("a").map(String::as_str), Some("1"));
        assert_eq!((r.group.as_str(), r.rebuild), ("g", true));
        let e = JobRequest::parse(b"{nope").unwrap_err().to_string();
        assert!(
            e.starts_with("Error unmarshalling body '{nope' to Job: "),
            "{e}"
        );
        assert!(JobRequest::parse(br#"{"params": {"a": 1}}"#).is_err());
    }

    #[test]
    fn names_stay_inside() {
        for bad in ["", ".", "..", "../x", "a/b", "a\0b", ".hidden"] {
            assert!(check_name("param", bad).is_err(), "{bad:?}");
        }
        assert!(check_name("param", "lockfile-v2_x.y").is_ok());
    }

    #[test]
    fn names_are_refused_with_their_reason_and_capped_at_255_bytes() {
        // The refusal's text (whatever the error's type).
        let refusal = |what: &str, name: &str| check_name(what, name).err().map(|e| e.to_string());
        let said = |s: &str| Some(s.to_string());
        assert_eq!(refusal("group", ""), said("group name is empty"));
        assert_eq!(
            refusal("project", ".."),
            said("invalid project name \"..\": must not start with '.'")
        );
        assert_eq!(
            refusal("param", "a/b"),
            said("invalid param name \"a/b\": must not contain '/' or NUL")
        );
        assert_eq!(
            refusal("param", "/"),
            said("invalid param name \"/\": must not contain '/' or NUL")
        );
        assert_eq!(
            refusal("param", "a\0"),
            said("invalid param name \"a\\0\": must not contain '/' or NUL")
        );
        assert_eq!(refusal("param", &"x".repeat(255)), None);
        assert_eq!(refusal("param", "é"), None);
        for long in [256, 300] {
            assert_eq!(
                refusal("param", &"x".repeat(long)),
                said("invalid param name: longer than 255 bytes"),
                "{long}"
            );
        }
        // Bytes, not characters: 128 two-byte characters are 256 bytes.
        assert!(refusal("param", &"é".repeat(128)).is_some());
    }

    #[test]
    fn build_info_succeeds_only_with_exit_code_0_and_no_error() {
        let mut info: BuildInfo = serde_json::from_value(serde_json::json!({
            "Params": {}, "Group": "", "Path": "p", "Cached": false, "Coalesced": false,
            "Incremental": false, "ExitCode": 0, "ErrBuild": "", "TransportMethod": "rsync",
            "StartedAt": "t", "Duration": UNKNOWN_DURATION, "URL": "u"
        }))
        .unwrap();
        assert!(info.succeeded());
        // mistry's BuildInfo: no Retries while 0.
        let json = serde_json::to_value(&info).unwrap();
        assert_eq!(json.get("Retries"), None);
        assert_eq!(json["ExitCode"], 0);
        info.retries = 2;
        assert_eq!(serde_json::to_value(&info).unwrap()["Retries"], 2);
        info.err_build = "disk limit".into();
        assert!(!info.succeeded());
        info.err_build.clear();
        info.exit_code = 1;
        assert!(!info.succeeded());
        info.exit_code = NEVER_RAN;
        assert!(!info.succeeded());
        // mistry's values for a job that never ran and a duration not known yet.
        let json = serde_json::to_value(&info).unwrap();
        assert_eq!(
            (json["ExitCode"].as_i64(), json["Duration"].as_i64()),
            (Some(-999), Some(-1_000_000_000))
        );
    }

    #[test]
    fn a_requests_identity_is_its_group_and_plain_params() {
        let req = JobRequest::parse(
            br#"{"project": "p", "group": "g", "params": {"x": "1", "_o": "2"}}"#,
        )
        .unwrap();
        assert_eq!(
            Identity::of(&req),
            Identity::new("g", &params(&[("x", "1")]))
        );
        assert_ne!(Identity::of(&req), Identity::default());
    }

    mod props {
        use super::super::*;
        use proptest::prelude::*;
        use serde_json::Value;

        fn json_value() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::Bool),
                any::<i64>().prop_map(Value::from),
                any::<f64>().prop_map(Value::from),
                any::<String>().prop_map(Value::String),
                "[./a-z\\x00]{0,4}".prop_map(Value::String),
            ];
            leaf.prop_recursive(3, 32, 6, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                    prop::collection::btree_map(any::<String>(), inner, 0..6)
                        .prop_map(|m| Value::Object(m.into_iter().collect())),
                ]
            })
        }

        fn field_name() -> impl Strategy<Value = String> {
            prop_oneof![
                Just("project".to_string()),
                Just("Project".to_string()),
                Just("PARAMS".to_string()),
                Just("params".to_string()),
                Just("Group".to_string()),
                Just("rebuild".to_string()),
                any::<String>(),
            ]
        }

        fn request() -> impl Strategy<Value = Value> {
            let params = prop_oneof![
                prop::collection::btree_map(any::<String>(), any::<String>(), 0..6).prop_map(|m| {
                    Value::Object(m.into_iter().map(|(k, v)| (k, Value::String(v))).collect())
                }),
                json_value(),
            ];
            let value = prop_oneof![json_value(), params];
            prop::collection::vec((field_name(), value), 0..8)
                .prop_map(|kv| Value::Object(kv.into_iter().collect()))
        }

        fn assert_safe_name(name: &str) {
            assert!(!name.is_empty());
            assert!(!name.contains('/') && !name.contains('\0'), "{name:?}");
            assert!(
                name != "." && name != ".." && !name.starts_with('.'),
                "{name:?}"
            );
            assert!(name.len() <= 255);
            // One normal path component: it cannot leave the directory it is joined to.
            let parts: Vec<_> = Path::new(name).components().collect();
            assert_eq!(
                parts,
                vec![std::path::Component::Normal(std::ffi::OsStr::new(name))]
            );
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

            #[test]
            fn any_bytes_never_panic(body in prop::collection::vec(any::<u8>(), 0..512)) {
                let _ = JobRequest::parse(&body);
            }

            #[test]
            fn any_json_request_never_panics(req in request()) {
                let body = serde_json::to_vec(&req).unwrap();
                if let Ok(parsed) = JobRequest::parse(&body) {
                    // What was accepted is what was sent (the last of case-insensitive duplicates).
                    for (k, v) in req.as_object().unwrap() {
                        if k.eq_ignore_ascii_case("project") {
                            prop_assert!(v.is_string());
                        }
                    }
                    for name in std::iter::once(&parsed.project)
                        .chain(std::iter::once(&parsed.group))
                        .chain(parsed.params.keys())
                    {
                        if check_name("name", name).is_ok() {
                            assert_safe_name(name);
                        }
                    }
                }
            }

            #[test]
            fn accepted_names_stay_inside(name in prop_oneof![
                any::<String>(),
                "[./\\x00a]{0,6}",
                "\\.{1,3}[a-z/]{0,3}",
            ]) {
                if check_name("param", &name).is_ok() {
                    assert_safe_name(&name);
                }
            }
        }
    }

    /// The hash of a project directory as it was computed before the walk was iterative.
    fn recursive_hash(h: &mut Sha256, base: &Path, dir: &Path) {
        use std::os::unix::fs::MetadataExt;
        let mut entries: Vec<_> = std::fs::read_dir(dir).unwrap().flatten().collect();
        entries.sort_by_key(std::fs::DirEntry::file_name);
        for e in entries {
            let path = e.path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            h.update(
                path.strip_prefix(base)
                    .unwrap()
                    .as_os_str()
                    .as_encoded_bytes(),
            );
            h.update([0]);
            h.update(meta.mode().to_le_bytes());
            if meta.file_type().is_symlink() {
                h.update(
                    std::fs::read_link(&path)
                        .unwrap()
                        .as_os_str()
                        .as_encoded_bytes(),
                );
            } else if meta.is_dir() {
                recursive_hash(h, base, &path);
            } else if meta.is_file() {
                h.update(std::fs::read(&path).unwrap());
            }
            h.update([0xff]);
        }
    }

    #[test]
    fn project_hashes_are_unchanged_and_bounded() {
        // On tmpfs where there is one: 200,000 files and 3000 levels are made and removed.
        let dir = tempfile::Builder::new()
            .tempdir_in("/dev/shm")
            .or_else(|_| tempfile::tempdir())
            .unwrap();
        let d = dir.path();
        for p in ["a/b/c", "a/e", "z", "m/n/o/p"] {
            std::fs::create_dir_all(d.join(p)).unwrap();
        }
        std::fs::write(d.join("Dockerfile"), "FROM busybox\n").unwrap();
        std::fs::write(d.join("a/b/c/f"), "deep").unwrap();
        std::fs::write(d.join("a/b/g"), "").unwrap();
        std::fs::write(d.join("m/n/o/p/q"), vec![7u8; 200_000]).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", d.join("a/link")).unwrap();
        nix::unistd::mkfifo(&d.join("z/fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        let mut old = Sha256::new();
        recursive_hash(&mut old, d, d);
        let mut new = Sha256::new();
        hash_tree(&mut new, &mut Sha256::new(), d).unwrap();
        assert_eq!(hex::encode(new.finalize()), hex::encode(old.finalize()));

        // A flat directory of 200,000 entries; a chain deeper than a path can name: refused
        // with its path, not a crash.
        let flat = d.join("flat");
        std::fs::create_dir(&flat).unwrap();
        for i in 0..200_000 {
            std::fs::File::create(flat.join(i.to_string())).unwrap();
        }
        hash_tree(&mut Sha256::new(), &mut Sha256::new(), d).unwrap();
        let mut cur =
            rustix::fs::open(d, rustix::fs::OFlags::RDONLY, rustix::fs::Mode::empty()).unwrap();
        for _ in 0..3000 {
            rustix::fs::mkdirat(&cur, "d", rustix::fs::Mode::from_raw_mode(0o755)).unwrap();
            cur = rustix::fs::openat(
                &cur,
                "d",
                rustix::fs::OFlags::RDONLY,
                rustix::fs::Mode::empty(),
            )
            .unwrap();
        }
        let e = hash_tree(&mut Sha256::new(), &mut Sha256::new(), d)
            .unwrap_err()
            .to_string();
        assert!(e.contains("/d/d/d/d/d/d/d/d/…(2032 more levels)…/d/d/d/d/d/d/d/d/d: its path is longer than 4096 bytes"), "{e}");
        images::walk::remove_path(&d.join("d")).unwrap();
        images::walk::remove_path(&flat).unwrap();
    }

    #[test]
    fn ids_follow_mistry() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("Dockerfile"), "FROM busybox\n").unwrap();
        let none = BTreeMap::new();
        let id = |group: &str, kv: &[(&str, &str)], inputs: &BTreeMap<String, Input>| {
            job_ids("proj", group, &params(kv), inputs, dir.path()).unwrap()
        };
        let a = id("", &[("x", "1")], &none);
        assert_eq!(a, id("", &[("x", "1")], &none));
        // Opaque params change neither ID; others change both.
        assert_eq!(a, id("", &[("x", "1"), ("_token", "abc")], &none));
        for other in [id("", &[("x", "2")], &none), id("g", &[("x", "1")], &none)] {
            assert_ne!(a.mistry, other.mistry);
            assert_ne!(a.exact, other.exact);
        }
        // Editing any file of the project changes them.
        std::fs::write(dir.path().join("Dockerfile"), "FROM busybox\nRUN true\n").unwrap();
        let edited = id("", &[("x", "1")], &none);
        assert_ne!(a.mistry, edited.mistry);
        assert_ne!(a.exact, edited.exact);
        assert_eq!((a.mistry.len(), a.exact.len()), (64, 64));
        assert_ne!(a.mistry, a.exact);
        // Inputs enter the IDs: another upstream build is another job.
        let input = |id: &str| {
            BTreeMap::from([(
                "deps".to_string(),
                Input {
                    project: "deps".into(),
                    id: id.into(),
                },
            )])
        };
        let with = id("", &[], &input("a"));
        assert_ne!(with, id("", &[], &none));
        assert_ne!(with, id("", &[], &input("b")));
        assert_eq!(with, id("", &[], &input("a")));
    }

    fn params(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// A project with a file, an executable, a sub-directory and a link, modes fixed.
    fn fixed_project() -> tempfile::TempDir {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("Dockerfile"), "FROM busybox\nCOPY run.sh /run.sh\n").unwrap();
        std::fs::write(d.join("run.sh"), "#!/bin/sh\necho hi\n").unwrap();
        std::fs::create_dir(d.join("sub")).unwrap();
        std::fs::write(d.join("sub/a.txt"), "a\n").unwrap();
        std::os::unix::fs::symlink("sub/a.txt", d.join("link")).unwrap();
        for (f, mode) in [
            ("Dockerfile", 0o644),
            ("run.sh", 0o755),
            ("sub/a.txt", 0o600),
            ("sub", 0o750),
        ] {
            std::fs::set_permissions(d.join(f), std::fs::Permissions::from_mode(mode)).unwrap();
        }
        dir
    }

    /// mistry's IDs are kept exactly (the values are those of the formula before the exact ID
    /// existed), collisions included; the exact IDs of colliding requests differ.
    #[test]
    fn mistry_ids_are_kept_and_exact_ids_tell_colliding_requests_apart() {
        let dir = fixed_project();
        let none = BTreeMap::new();
        let ids = |group: &str, kv: &[(&str, &str)], inputs: &BTreeMap<String, Input>| {
            job_ids("proj", group, &params(kv), inputs, dir.path()).unwrap()
        };
        let a1b2 = ids("", &[("a", "1b2")], &none);
        let a1_b2 = ids("", &[("a", "1"), ("b", "2")], &none);
        let shared = "bb04c9b1f15ed0f29de2a254d3c67301e10ee3a74b2bfd2922edadb64500aa53";
        assert_eq!(
            (a1b2.mistry.as_str(), a1_b2.mistry.as_str()),
            (shared, shared)
        );
        assert_ne!(a1b2.exact, a1_b2.exact);
        let gx1 = ids("gx1", &[], &none);
        let g_x1 = ids("g", &[("x", "1"), ("_o", "z")], &none);
        let shared = "0b8ac3b31c7befcb180be7a2e6208e635ec20a3f541e1fa490e6a6919c51eb20";
        assert_eq!(
            (gx1.mistry.as_str(), g_x1.mistry.as_str()),
            (shared, shared)
        );
        assert_ne!(gx1.exact, g_x1.exact);
        let up = BTreeMap::from([(
            "up".to_string(),
            Input {
                project: "q".into(),
                id: "abc".into(),
            },
        )]);
        assert_eq!(
            ids("g", &[("x", "1")], &up).mistry,
            "f63557b2919394d9ce8177c6f9672ed49b5278d53de6f8cb4561d1bbed3e4ba5"
        );
        // A param value holding what an input hashes to shares mistry's ID, not the exact one.
        let fake = ids("g", &[("x", "1input\0up\0q\0abc\0")], &none);
        assert_eq!(fake.mistry, ids("g", &[("x", "1")], &up).mistry);
        assert_ne!(fake.exact, ids("g", &[("x", "1")], &up).exact);
        // Project and group boundaries: same files, "proj"+"g" vs "pro"+"jg".
        let other = job_ids("pro", "jg", &params(&[("x", "1")]), &none, dir.path()).unwrap();
        assert_eq!(other.mistry, g_x1.mistry);
        assert_ne!(other.exact, g_x1.exact);
        // A file's bytes cannot pass for a next file in the exact ID (they can in mistry's).
        let one = tempfile::tempdir().unwrap();
        let two = tempfile::tempdir().unwrap();
        std::fs::write(one.path().join("Dockerfile"), "x").unwrap();
        std::fs::write(two.path().join("Dockerfile"), "x").unwrap();
        let mode = std::fs::metadata(two.path().join("Dockerfile"))
            .unwrap()
            .mode();
        let mut tail = b"x\xffe\0".to_vec();
        tail.extend(mode.to_le_bytes());
        tail.extend(b"y");
        std::fs::write(one.path().join("Dockerfile"), &tail).unwrap();
        std::fs::write(two.path().join("e"), "y").unwrap();
        let (one, two) = (
            job_ids("p", "", &none_params(), &none, one.path()).unwrap(),
            job_ids("p", "", &none_params(), &none, two.path()).unwrap(),
        );
        assert_eq!(one.mistry, two.mistry);
        assert_ne!(one.exact, two.exact);
    }

    #[test]
    fn a_project_dir_that_is_not_a_directory_is_refused_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("Dockerfile");
        std::fs::write(&file, "FROM busybox\n").unwrap();
        let e = job_ids("p", "", &none_params(), &BTreeMap::new(), &file).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::NotADirectory);
        assert_eq!(
            e.to_string(),
            format!("{}: Not a directory (os error 20)", file.display())
        );
        // Nor does a FIFO there block the daemon.
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let e = job_ids("p", "", &none_params(), &BTreeMap::new(), &fifo).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::NotADirectory);
        let missing = dir.path().join("missing");
        let e = job_ids("p", "", &none_params(), &BTreeMap::new(), &missing).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
    }

    fn none_params() -> BTreeMap<String, String> {
        BTreeMap::new()
    }

    #[test]
    fn identities_leave_opaque_params_out() {
        let info = |group: &str, kv: &[(&str, &str)]| BuildInfo {
            params: params(kv),
            group: group.into(),
            path: String::new(),
            cached: false,
            coalesced: false,
            incremental: false,
            exit_code: 0,
            err_build: String::new(),
            container_stdouterr: String::new(),
            container_stderr: String::new(),
            transport_method: "rsync".into(),
            started_at: String::new(),
            duration: 0,
            url: String::new(),
            retries: 0,
        };
        let me = Identity::new("g", &params(&[("x", "1"), ("_o", "a")]));
        assert!(me.matches(&info("g", &[("x", "1")])));
        assert!(me.matches(&info("g", &[("x", "1"), ("_o", "b"), ("_p", "c")])));
        assert!(!me.matches(&info("gx1", &[])));
        assert!(!me.matches(&info("g", &[("x", "1"), ("y", "")])));
        assert!(!me.matches(&info("g", &[("x", "2")])));
        assert!(!me.matches(&info("", &[("x", "1")])));
        assert_eq!(me, Identity::new("g", &params(&[("x", "1")])));
    }
}
