//! Helpers of the pipeline tests (tests/pipelines.rs, tests/web_pipelines.rs, tests/exec.rs,
//! tests/examples.rs): projects and pipeline definitions written into a projects directory, runs
//! posted, run records read.
#![allow(dead_code)]

use std::path::Path;

use serde_json::Value;

use super::server::Server;

/// `text` into `path`, its parent directories created.
pub(crate) fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

/// A busybox project `name` in `projects` that runs `script` (as `/run.sh`).
pub(crate) fn script_project(projects: &Path, name: &str, script: &str) {
    write(
        &projects.join(name).join("Dockerfile"),
        "FROM busybox\nCOPY run.sh /run.sh\nENTRYPOINT [\"/bin/sh\", \"/run.sh\"]\n",
    );
    write(&projects.join(name).join("run.sh"), script);
}

/// A busybox project `name` in `projects` whose CMD is `sh -c CMD` (`cmd` within a JSON
/// string: no `"` or `\`).
pub(crate) fn cmd_project(projects: &Path, name: &str, cmd: &str) {
    write(
        &projects.join(name).join("Dockerfile"),
        &format!("FROM busybox\nCMD [\"/bin/sh\", \"-c\", \"{cmd}\"]\n"),
    );
}

/// The pipeline `name` (`projects/pipelines/NAME.json`).
pub(crate) fn write_pipeline(projects: &Path, name: &str, definition: &str) {
    write(
        &projects.join("pipelines").join(format!("{name}.json")),
        definition,
    );
}

/// `POST /pipelines` with `body`: 201 and the run record.
pub(crate) fn post_run(s: &Server, body: &Value) -> Value {
    let (status, text) = s.post("/pipelines", &body.to_string());
    assert_eq!(status, 201, "{text}");
    serde_json::from_str(&text).unwrap()
}

/// `GET PATH` as JSON: 200 and the answer.
pub(crate) fn get_json(s: &Server, path: &str) -> Value {
    let (status, text) = s.get(path, true);
    assert_eq!(status, 200, "{path}: {text}");
    serde_json::from_str(&text).unwrap()
}

/// The job `name` of a run record.
pub(crate) fn job<'a>(rec: &'a Value, name: &str) -> &'a Value {
    rec["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["name"] == name)
        .unwrap_or_else(|| panic!("no job {name} in {rec}"))
}

/// (name, the string field `field`) of each job of a run record, in its order.
pub(crate) fn job_fields(rec: &Value, field: &str) -> Vec<(String, String)> {
    rec["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| {
            (
                j["name"].as_str().unwrap().to_string(),
                j[field].as_str().unwrap().to_string(),
            )
        })
        .collect()
}
